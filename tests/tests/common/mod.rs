//! Helpers shared by the end-to-end tests (`isolation`, `metering`): guests on taps (the test
//! writes and reads their frames) and in network namespaces (veth peers with a real kernel
//! stack), frame builders and parsers, bounded waits, and the leftover check.
//!
//! Each test binary uses a different subset, hence `allow(dead_code)`.
#![allow(dead_code)]

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    panic, thread,
    time::{Duration, Instant},
};

use atoll_agent::{
    endpoint::{DeviceSpec, Endpoint, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
pub use atoll_testbed::guest::VethGuest;
use atoll_testbed::{guest::veth_guest, unique_name, LinkGuard, NetNs};
use frame::Mac;

/// Every cloud's gateway address in the tests.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// TTL of every IPv4 packet the tap guests write.
pub const TAP_TTL: u8 = 64;
/// Default TTL of the veth guests' kernels.
pub const KERNEL_TTL: u8 = 64;
/// Bound for anything that must arrive.
pub const ARRIVE: Duration = Duration::from_secs(2);
/// Window in which something must *not* arrive (a bounded negative check, not synchronisation).
pub const SILENCE: Duration = Duration::from_millis(300);

/// The `testbed::unique_name` tags of one test: its names are recognisable (and checked for
/// leftovers) by these.
pub struct Tags {
    pub tap: &'static str,
    pub veth: &'static str,
    pub netns: &'static str,
    pub pins: &'static str,
}

impl Tags {
    pub fn all(&self) -> [&'static str; 4] {
        [self.tap, self.veth, self.netns, self.pins]
    }
}

pub fn cloud_id(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

pub fn guest_mac(cloud: u32, ip: Ipv4Addr) -> MacAddr {
    MacAddr::local(0x00c1_0000 | cloud << 8 | u32::from(ip.octets()[3]))
}

/// Creates a tap endpoint (gateway [`GATEWAY`]) and attaches the test to it as its guest.
pub fn create_tap(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    links: &mut Vec<LinkGuard>,
    tags: &Tags,
    cloud: u32,
    ip: Ipv4Addr,
    gw_mac: Mac,
) -> (Endpoint, TapGuest) {
    let name = unique_name(tags.tap);
    links.push(LinkGuard(name.clone()));
    let mac = guest_mac(cloud, ip);
    let spec = EndpointSpec {
        name: name.clone(),
        cloud: cloud_id(cloud),
        ipv4: ip,
        mac,
        gateway: GATEWAY,
        device: DeviceSpec::Tap { owner_uid: None },
    };
    let ep = rt
        .block_on(host.create_endpoint(&spec))
        .unwrap_or_else(|e| panic!("creating tap endpoint {name}: {e} ({e:?})"));
    let tap = TapGuest::attach(&format!("cloud {cloud} tap {ip}"), &name, mac.0, ip, gw_mac);
    (ep, tap)
}

/// Creates a veth endpoint whose peer `eth0` is a configured guest (`ip`/24, default route via
/// [`GATEWAY`]) in a new namespace.
pub fn create_veth(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    links: &mut Vec<LinkGuard>,
    tags: &Tags,
    cloud: u32,
    ip: Ipv4Addr,
) -> (Endpoint, VethGuest) {
    let guest = veth_guest(
        rt,
        host,
        (tags.netns, tags.veth),
        cloud_id(cloud),
        ip,
        guest_mac(cloud, ip),
        GATEWAY,
    );
    links.push(LinkGuard(guest.host.clone()));
    (guest.ep.clone(), guest)
}

// ---------------------------------------------------------------------------------------------
// Waiting for things to arrive or not

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

// ---------------------------------------------------------------------------------------------
// Tap guests (the test is the guest)

/// The test acting as the guest of a tap endpoint.
pub struct TapGuest {
    pub label: String,
    /// Host device name.
    pub name: String,
    pub fd: OwnedFd,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub gw_mac: Mac,
}

impl TapGuest {
    /// Attaches to the agent's persistent tap, as a VMM would (non-blocking fd), and waits until
    /// the kernel has activated the tap's transmit queue.
    ///
    /// Attaching a queue turns the carrier on, but the qdisc that delivers frames to the queue
    /// is only activated afterwards by the kernel's link watch work; until then every frame
    /// sent to the tap is silently dropped (measured: over half of the frames sent right after
    /// attaching were lost). The same work then sets the operational state to up, so waiting
    /// for that (bounded by [`ARRIVE`]) makes the first frame to this guest arrive.
    pub fn attach(label: &str, name: &str, mac: Mac, ip: Ipv4Addr, gw_mac: Mac) -> Self {
        let fd = atoll_agent::device::open_tap_queue(name, true)
            .unwrap_or_else(|e| panic!("attaching to tap {name}: {e}"));
        atoll_agent::device::wait_until_up(name, ARRIVE)
            .unwrap_or_else(|e| panic!("tap {name} after attaching: {e}"));
        TapGuest {
            label: label.into(),
            name: name.into(),
            fd,
            mac,
            ip,
            gw_mac,
        }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is a valid buffer of `frame.len()` bytes.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}: writing a frame: {}",
            self.label,
            io::Error::last_os_error()
        );
    }

    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is a valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                io::ErrorKind::WouldBlock,
                "{}: read: {e}",
                self.label
            );
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    /// The next frame; panics after [`ARRIVE`].
    pub fn recv(&self, what: &str) -> Vec<u8> {
        wait_for(
            self.fd.as_raw_fd(),
            &format!("{}: {what}", self.label),
            || self.try_recv(),
        )
    }

    /// An IPv4 packet from the gateway MAC to this guest, from `src` with TTL `ttl` and a valid
    /// header checksum; returns the IPv4 packet.
    pub fn expect_ipv4(&self, what: &str, src: Ipv4Addr, ttl: u8) -> Vec<u8> {
        let f = self.recv(what);
        let ctx = format!(
            "{} expecting {what}, got {}",
            self.label,
            frame::describe(&f)
        );
        let eth = frame::parse_eth(&f).unwrap_or_else(|| panic!("{ctx}"));
        assert_eq!(
            (eth.dst, eth.src, eth.ethertype),
            (self.mac, self.gw_mac, frame::ETH_P_IP),
            "{ctx}: Ethernet header"
        );
        let ip = frame::parse_ipv4(eth.payload).unwrap_or_else(|| panic!("{ctx}: not IPv4"));
        assert_eq!(
            (ip.src, ip.dst, ip.ttl),
            (src, self.ip, ttl),
            "{ctx}: IPv4 header"
        );
        assert!(ip.header_checksum_ok, "{ctx}: bad IPv4 header checksum");
        eth.payload.to_vec()
    }

    /// The gateway's ARP reply for `target`; returns the whole frame.
    pub fn expect_arp_reply(&self, target: Ipv4Addr) -> Vec<u8> {
        let f = self.recv(&format!("ARP reply for {target}"));
        let ctx = format!(
            "{} expecting ARP reply for {target}, got {}",
            self.label,
            frame::describe(&f)
        );
        let eth = frame::parse_eth(&f).unwrap_or_else(|| panic!("{ctx}"));
        assert_eq!(
            (eth.dst, eth.src, eth.ethertype),
            (self.mac, self.gw_mac, frame::ETH_P_ARP),
            "{ctx}: Ethernet header"
        );
        let arp = frame::parse_arp(eth.payload).unwrap_or_else(|| panic!("{ctx}: short ARP"));
        assert_eq!(
            arp,
            frame::Arp {
                op: 2,
                sha: self.gw_mac,
                spa: target,
                tha: self.mac,
                tpa: self.ip,
            },
            "{ctx}"
        );
        f
    }

    pub fn arp_request(&self, target: Ipv4Addr) -> Vec<u8> {
        let arp = frame::arp(1, self.mac, self.ip, [0; 6], target);
        frame::ethernet(frame::BROADCAST, self.mac, frame::ETH_P_ARP, &arp)
    }

    /// An IPv4 packet in a frame from this guest to the gateway MAC.
    pub fn eth_ipv4(&self, packet: &[u8]) -> Vec<u8> {
        frame::ethernet(self.gw_mac, self.mac, frame::ETH_P_IP, packet)
    }

    pub fn udp(&self, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let udp = frame::udp(self.ip, dst, sport, dport, payload);
        self.eth_ipv4(&frame::ipv4(self.ip, dst, TAP_TTL, frame::PROTO_UDP, &udp))
    }

    pub fn icmp(&self, dst: Ipv4Addr, ty: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let icmp = frame::icmp(ty, 0, id, seq, payload);
        self.eth_ipv4(&frame::ipv4(
            self.ip,
            dst,
            TAP_TTL,
            frame::PROTO_ICMP,
            &icmp,
        ))
    }

    pub fn icmp_echo(&self, dst: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        self.icmp(dst, 8, id, seq, payload)
    }
}

// ---------------------------------------------------------------------------------------------
// Veth guests (a real kernel stack in a namespace)

/// Runs `f` on a thread that has entered the network namespace `ns`; sockets created there stay
/// in that namespace.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = ns.path();
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: setns only changes this thread's network namespace; the fd is valid.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        f()
    })
}

pub fn in_netns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    join(spawn_in_netns(ns, f))
}

pub fn join<T>(h: thread::JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|p| panic::resume_unwind(p))
}

/// A non-blocking UDP socket inside a veth guest.
pub struct GuestUdp {
    pub label: String,
    pub sock: UdpSocket,
}

impl GuestUdp {
    pub fn bind(guest: &VethGuest, port: u16) -> Self {
        let addr = SocketAddrV4::new(guest.ip, port);
        let sock = in_netns(&guest.ns, move || UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("binding UDP {addr} in {}: {e}", guest.label));
        sock.set_nonblocking(true).expect("O_NONBLOCK");
        GuestUdp {
            label: format!("{} UDP socket", guest.label),
            sock,
        }
    }

    pub fn try_recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                buf.truncate(n);
                Some((buf, from))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{}: recv: {e}", self.label),
        }
    }

    pub fn recv(&self, what: &str) -> (Vec<u8>, SocketAddr) {
        wait_for(
            self.sock.as_raw_fd(),
            &format!("{}: {what}", self.label),
            || self.try_recv(),
        )
    }
}

/// An `AF_PACKET` socket on a veth guest's eth0: sees every frame that reaches the guest.
pub struct Sniffer {
    pub label: String,
    pub fd: OwnedFd,
}

impl Sniffer {
    pub fn open(guest: &VethGuest) -> Self {
        let fd = in_netns(&guest.ns, || -> io::Result<OwnedFd> {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket call; the result is checked.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    proto as libc::c_int,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        })
        .unwrap_or_else(|e| panic!("packet socket in {}: {e}", guest.label));
        Sniffer {
            label: guest.label.clone(),
            fd,
        }
    }

    /// The next queued frame that arrived at the guest (not one it sent).
    pub fn try_recv_incoming(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `sll` are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                assert_eq!(
                    e.kind(),
                    io::ErrorKind::WouldBlock,
                    "{}: recv: {e}",
                    self.label
                );
                return None;
            }
            if sll.sll_pkttype != libc::PACKET_OUTGOING {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }

    /// The next incoming frame containing `marker`; panics after [`ARRIVE`].
    pub fn expect_marked(&self, marker: &[u8]) -> Vec<u8> {
        let what = format!(
            "{}: frame with {:?}",
            self.label,
            String::from_utf8_lossy(marker)
        );
        wait_for(self.fd.as_raw_fd(), &what, || loop {
            let f = self.try_recv_incoming()?;
            if frame::contains(&f, marker) {
                return Some(f);
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup check

/// The prefix of every name `unique_name(tag)` gives this process, for each of `tags`.
pub fn prefixes(tags: &Tags) -> Vec<String> {
    tags.all()
        .iter()
        .map(|t| atoll_testbed::unique_prefix(t))
        .collect()
}

/// Prefix of the spare taps this process's `Host` creates.
pub fn pool_prefix() -> String {
    atoll_agent::endpoint::pool_process_prefix()
}

pub use atoll_testbed::host_links;

/// This process's spare taps.
pub fn pool_links() -> Vec<String> {
    let prefix = pool_prefix();
    host_links()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Deletes this process's spare taps on drop (they are persistent and carry no testbed name).
pub struct PoolGuard;

impl Drop for PoolGuard {
    fn drop(&mut self) {
        for name in pool_links() {
            drop(LinkGuard(name));
        }
    }
}

/// Links, namespaces and pins whose names carry this test's prefixes.
/// Runs an end-to-end scenario as root, then fails if anything it created (names with `tags`'
/// prefixes, spare taps, pins) is left behind, also when the scenario panicked.
pub fn run_scenario(name: &str, tags: &Tags, scenario: fn()) {
    atoll_testbed::require_root(&format!("the {name} test"));
    let started = std::time::Instant::now();
    let mut prefixes = prefixes(tags);
    prefixes.push(pool_prefix());
    atoll_testbed::leaves_nothing(&prefixes, scenario);
    println!("{name}: passed in {:.2?}", started.elapsed());
}

pub fn leftovers(tags: &Tags) -> Vec<String> {
    let mut prefixes = prefixes(tags);
    prefixes.push(pool_prefix());
    atoll_testbed::leftovers(&prefixes)
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Building and parsing Ethernet, ARP, IPv4, UDP and ICMP, with checksums.
pub use atoll_testbed::frame::layers as frame;
