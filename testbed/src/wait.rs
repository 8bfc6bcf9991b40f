//! Bounded waits: for something that must arrive ([`wait_for`], panicking after [`ARRIVE`]) and
//! for silence that must hold ([`assert_silent`] over a [`SILENCE`] window, a bounded negative
//! check, never synchronisation). Every wait polls the fds it waits on.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use crate::{
    frame::layers as frame,
    guest::{GuestUdp, Sniffer, TapGuest},
};

/// Bound for anything that must arrive.
pub const ARRIVE: Duration = Duration::from_secs(2);
/// Window in which something must *not* arrive (a bounded negative check, not synchronisation).
pub const SILENCE: Duration = Duration::from_millis(300);

/// Indexes of the fds that became readable within `timeout`.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> Vec<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
        return Vec::new();
    }
    (0..pfds.len()).filter(|&i| pfds[i].revents != 0).collect()
}

pub fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Polls `fd` until `take` returns something, or panics after [`ARRIVE`].
pub fn wait_for<T>(fd: RawFd, what: &str, mut take: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + ARRIVE;
    loop {
        if let Some(v) = take() {
            return v;
        }
        let Some(left) = remaining(deadline) else {
            panic!("nothing arrived within {ARRIVE:?}: {what}");
        };
        wait_readable(&[fd], left);
    }
}

/// Something that must receive nothing during a [`SILENCE`] window.
#[derive(Debug)]
pub enum Sink<'a> {
    /// A tap guest: no frame at all (nothing reaches a tap unless the test caused it).
    Tap(&'a TapGuest),
    /// A veth guest's UDP socket: no datagram at all.
    Udp(&'a GuestUdp),
    /// A veth guest's packet socket: no incoming frame containing any of these markers.
    Sniffer(&'a Sniffer, Vec<Vec<u8>>),
}

impl Sink<'_> {
    pub fn fd(&self) -> RawFd {
        match self {
            Sink::Tap(t) => t.fd.as_raw_fd(),
            Sink::Udp(u) => u.sock.as_raw_fd(),
            Sink::Sniffer(s, _) => s.fd.as_raw_fd(),
        }
    }

    /// Reads what is queued; describes the first offending packet.
    pub fn offence(&self) -> Option<String> {
        match self {
            Sink::Tap(t) => t
                .try_recv()
                .map(|f| format!("{} received {}", t.label, frame::describe(&f))),
            Sink::Udp(u) => u.try_recv().map(|(d, from)| {
                format!(
                    "{} received a datagram from {from}: {:?}",
                    u.label,
                    String::from_utf8_lossy(&d)
                )
            }),
            Sink::Sniffer(s, markers) => {
                while let Some(f) = s.try_recv_incoming() {
                    if markers.iter().any(|m| frame::contains(&f, m)) {
                        return Some(format!("{} received {}", s.label, frame::describe(&f)));
                    }
                }
                None
            }
        }
    }
}

/// Asserts that no sink receives anything offending for [`SILENCE`].
pub fn assert_silent(sinks: &[Sink<'_>], what: &str) {
    let deadline = Instant::now() + SILENCE;
    let fds: Vec<RawFd> = sinks.iter().map(Sink::fd).collect();
    loop {
        for s in sinks {
            if let Some(offence) = s.offence() {
                panic!("{what}: {offence}");
            }
        }
        let Some(left) = remaining(deadline) else {
            return;
        };
        wait_readable(&fds, left);
    }
}
