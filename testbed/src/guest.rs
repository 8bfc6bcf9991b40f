//! Guests the tests drive: a veth endpoint whose peer is a real kernel stack in a namespace of
//! its own ([`VethGuest`], one type for every suite) with its sockets ([`GuestUdp`], the
//! packet socket [`Sniffer`]) and the child processes run in it ([`ChildGuard`]), and a tap
//! endpoint whose guest is the test itself, writing and reading frames as a VMM does
//! ([`TapGuest`]).

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    panic,
    process::{Child, Command, Stdio},
    thread,
};

use atoll_agent::{
    endpoint::{DeviceSpec, Endpoint, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};

use crate::{
    frame::layers::{self as frame, Mac},
    unique_name,
    wait::{wait_for, ARRIVE},
    NetNs,
};

/// A veth endpoint and its guest: the peer `eth0` in a namespace of its own, at `ip`/24 with a
/// default route via the gateway.
#[derive(Debug)]
pub struct VethGuest {
    /// What messages call it (`cloud 1 veth 10.0.0.2`).
    pub label: String,
    /// The host-side device's name.
    pub host: String,
    pub ns: NetNs,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// The endpoint as the agent created it.
    pub ep: Endpoint,
}

/// Creates a veth guest: namespace named with `ns_tag`, host device named with `dev_tag`
/// (see [`unique_name`]).
#[allow(clippy::too_many_arguments)]
pub fn veth_guest(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    (ns_tag, dev_tag): (&str, &str),
    cloud: CloudId,
    ip: Ipv4Addr,
    mac: MacAddr,
    gateway: Ipv4Addr,
) -> VethGuest {
    let ns = NetNs::new(&unique_name(ns_tag)).expect("creating the guest's namespace");
    let name = unique_name(dev_tag);
    let spec = EndpointSpec {
        name: name.clone(),
        cloud,
        ipv4: ip,
        mac,
        gateway,
        device: DeviceSpec::Veth {
            peer_name: "eth0".into(),
            netns: ns.path(),
        },
    };
    let ep = rt
        .block_on(host.create_endpoint(&spec))
        .unwrap_or_else(|e| panic!("creating veth endpoint {name}: {e} ({e:?})"));
    ns.configure_guest("eth0", ip, 24, gateway)
        .expect("configuring the guest");
    VethGuest {
        label: format!("cloud {cloud} veth {ip}"),
        host: name,
        ns,
        mac,
        ip,
        ep,
    }
}

impl VethGuest {
    /// Whether one ping from the guest to `dst` is answered within a second.
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.ns
            .succeeds(&["ping", "-c", "1", "-W", "1", "-q", &dst.to_string()])
            .expect("running ping")
    }

    /// Starts `ping -c1` with a payload pattern; the caller answers it.
    pub fn spawn_ping(&self, dst: Ipv4Addr, pattern: &str) -> ChildGuard {
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(["ping", "-c", "1", "-W", "2", "-q", "-p", pattern])
            .arg(dst.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ping");
        ChildGuard(Some(child))
    }
}

/// A child process that is killed and reaped if the test fails before waiting for it.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Waits for the child and asserts it succeeded (its output in the message otherwise).
    pub fn expect_success(mut self, what: &str) {
        let out = self
            .0
            .take()
            .expect("not yet waited")
            .wait_with_output()
            .expect("waiting for child");
        assert!(
            out.status.success(),
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tap guests (the test is the guest)

/// TTL of every IPv4 packet the tap guests write.
pub const TAP_TTL: u8 = 64;

/// The test acting as the guest of a tap endpoint.
#[derive(Debug)]
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
// Veth guests' threads and sockets

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
#[derive(Debug)]
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
#[derive(Debug)]
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
