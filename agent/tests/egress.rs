//! Egress inside a test's own internet (`atoll_testbed::internet`), the agent's host being the
//! internet's host namespace:
//! - the host side: the uplink is the default route's device with its address, the
//!   never-reachable set holds the host's address and network, the NAT port range is refused
//!   where it overlaps the ephemeral ports and otherwise reserved (in the test's namespace
//!   only: the machine's own setting is untouched), and the doctor reports it;
//! - the packet path with real sockets: two clouds with the same addresses reach a server
//!   over TCP, UDP and ICMP at once, the server sees each cloud's egress address, replies
//!   reach the right guest, the counters are exact, the always-denied addresses stay
//!   unreachable, `deny` lets nothing out, and a policy change cuts a live TCP flow.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use atoll_agent::{
    config::{DeviceName, EgressConfig, NatPorts},
    dns::netns,
    doctor::{self, Status},
    egress::{self, EgressError},
    endpoint::{CloudEgressSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_api::model::{EgressMode, EgressPolicy, EgressRule, Ipv4Net};
use atoll_dataplane_common::{Direction, DropReason, TrafficClass};
use atoll_testbed::{
    guest::in_netns,
    internet::{Echo, Internet, HOST_IP, ROUTER_IP, UPLINK},
    leaves_nothing, unique_prefix, PinRoot,
};
use support::{require_root, VethGuest};

const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[test]
fn uplink_never_set_and_nat_ports_in_the_hosts_namespace() {
    require_root();
    let machine_reserved = std::fs::read_to_string(RESERVED).unwrap();
    leaves_nothing(&[unique_prefix("eg")], || {
        let net = Internet::build("eg").expect("building the internet");
        let got = in_netns(&net.host, || {
            let cfg = EgressConfig::default();
            let uplink = egress::uplink(&cfg).unwrap();
            let host = egress::host_addresses().unwrap();
            let never: Vec<String> = egress::never(&cfg, &host)
                .iter()
                .map(|n| n.to_string())
                .collect();
            let missing = egress::uplink(&EgressConfig {
                uplink: Some(DeviceName::new("nope0").unwrap()),
                ..EgressConfig::default()
            })
            .unwrap_err();
            let check = doctor::egress(&cfg);

            // The default range is clear of the default ephemeral ports: reserved, idempotent.
            assert!(!egress::nat_ports_reserved(cfg.nat_ports).unwrap());
            egress::reserve_nat_ports(cfg.nat_ports).unwrap();
            egress::reserve_nat_ports(cfg.nat_ports).unwrap();
            assert!(egress::nat_ports_reserved(cfg.nat_ports).unwrap());
            let reserved = std::fs::read_to_string(RESERVED).unwrap();
            // A range inside the ephemeral ports is refused and reserves nothing.
            let inside = NatPorts::try_from("40000-41023".to_string()).unwrap();
            let overlap = egress::reserve_nat_ports(inside).unwrap_err();
            assert!(!egress::nat_ports_reserved(inside).unwrap());
            (uplink, never, missing, check, reserved, overlap)
        });
        let (uplink, never, missing, check, reserved, overlap) = got;
        assert_eq!(
            (uplink.name.as_str(), &uplink.addresses[..]),
            (UPLINK, &[(HOST_IP, 24)][..])
        );
        for n in [
            "198.18.0.0/24",
            "198.18.0.2/32",
            "127.0.0.0/8",
            "169.254.0.0/16",
        ] {
            assert!(never.contains(&n.to_string()), "{n} in {never:?}");
        }
        assert!(
            matches!(missing, EgressError::NoUplink(ref d) if d == "nope0"),
            "{missing}"
        );
        assert_eq!(check.status, Status::Ok, "{check}");
        assert!(
            check.detail.contains("uplink uplink0 (198.18.0.2/24)"),
            "{check}"
        );
        assert_eq!(reserved.trim(), "61000-65535");
        assert!(
            matches!(
                overlap,
                EgressError::PortsOverlap {
                    first: 32768,
                    last: 60999,
                    ..
                }
            ),
            "{overlap}"
        );

        // The world has no default route: no uplink, a warning that says what to set.
        let check = in_netns(&net.world, || doctor::egress(&EgressConfig::default()));
        assert_eq!(check.status, Status::Warn, "{check}");
        assert!(
            check.fix.as_deref().unwrap().contains("egress.uplink"),
            "{check}"
        );
    });
    assert_eq!(
        std::fs::read_to_string(RESERVED).unwrap(),
        machine_reserved,
        "the machine's own reserved ports are untouched"
    );
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The server both clouds reach.
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 7);
/// Cloud 2's own egress address (from an operator pool the world routes to the host).
const OWN_ADDRESS: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const ARRIVE: Duration = Duration::from_secs(3);
/// How long a packet that must not arrive is waited for. (Each test names what it creates
/// with tags of its own: the tests of this file run at once, and each checks that nothing
/// named with its tags is left.)
const SILENCE: Duration = Duration::from_millis(500);

fn cloud(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

fn policy(mode: EgressMode) -> EgressPolicy {
    EgressPolicy {
        mode,
        ..EgressPolicy::deny_all()
    }
}

fn spec(policy: EgressPolicy, address: Option<Ipv4Addr>) -> CloudEgressSpec {
    CloudEgressSpec {
        policy,
        cidr: Some(Ipv4Net {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            len: 24,
        }),
        address,
    }
}

fn in_guest<T: Send>(g: &VethGuest, f: impl FnOnce() -> T + Send) -> T {
    netns::run_in(&g.ns.path(), f).expect("entering the guest namespace")
}

/// `(packets, bytes)` of the `external` class from and to the guest of `slot`.
fn external(host: &Host, slot: u32) -> [(u64, u64); 2] {
    let c = host.dataplane().counters(slot).expect("counters");
    let t = |d: Direction| {
        let x = c.traffic[d as usize][TrafficClass::External as usize];
        (x.packets, x.bytes)
    };
    [t(Direction::FromGuest), t(Direction::ToGuest)]
}

fn drops(host: &Host, slot: u32, r: DropReason) -> u64 {
    host.dataplane().counters(slot).expect("counters").drops[r as usize]
}

/// One UDP round trip from the guest's socket to the server; the echo's payload.
fn udp_round(sock: &UdpSocket, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    sock.send_to(msg, SERVER)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf)?;
    assert_eq!(
        from,
        SocketAddr::V4(SERVER),
        "the reply comes from the server"
    );
    Ok(buf[..n].to_vec())
}

/// Sends `msg` on `s` and reads the echo; an error if it does not come back.
fn tcp_round(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

#[test]
fn clouds_with_the_same_addresses_reach_the_internet_under_their_policies() {
    require_root();
    let tags = ["ei", "en", "ev", "ep"];
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let net = Internet::build("ei").expect("building the internet");
        net.add_server(*SERVER.ip()).unwrap();
        // The operator's pool is routed to the host.
        net.world
            .sh(&format!("ip route add 198.18.1.0/24 via {HOST_IP}"))
            .unwrap();
        let echo = Echo::start(&net, SERVER).expect("echo server");
        in_netns(&net.host, move || internet_scenario(echo));
    });
}

fn internet_scenario(echo: Echo) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pins = PinRoot::new("ep");
    let mut host = rt
        .block_on(async { Host::open(&support::cfg(&pins, 64, 0)) })
        .unwrap();
    let enabled = egress::enable(
        &mut host,
        &EgressConfig {
            enabled: true,
            ..EgressConfig::default()
        },
    )
    .expect("enabling egress");
    assert_eq!(
        (enabled.uplink.name.as_str(), enabled.address),
        (UPLINK, HOST_IP)
    );
    host.set_cloud_egress(cloud(1), &spec(policy(EgressMode::Allow), None))
        .unwrap();
    host.set_cloud_egress(
        cloud(2),
        &spec(policy(EgressMode::Allow), Some(OWN_ADDRESS)),
    )
    .unwrap();
    host.set_cloud_egress(cloud(3), &spec(policy(EgressMode::Deny), None))
        .unwrap();
    let mut guest = |c: u32| {
        let mac = MacAddr::local(0x00e1_0000 | c << 8 | 2);
        support::veth_guest(&rt, &mut host, ("en", "ev"), c, GUEST_IP, mac, GATEWAY)
    };
    let (a, b, d) = (guest(1), guest(2), guest(3));
    let (sa, sb, sd) = (a.ep.slot, b.ep.slot, d.ep.slot);
    let nat_ports = 61000..=65535u16;

    // 1. UDP from both clouds' 10.0.0.2 at once: each gets its own echo, the server sees the
    //    host's address for cloud 1 and cloud 2's own address, from NAT ports.
    let ua = in_guest(&a, || UdpSocket::bind("0.0.0.0:4000")).unwrap();
    let ub = in_guest(&b, || UdpSocket::bind("0.0.0.0:4000")).unwrap();
    for s in [&ua, &ub] {
        s.set_read_timeout(Some(ARRIVE)).unwrap();
    }
    let before = [external(&host, sa), external(&host, sb)];
    for i in 0..5 {
        ua.send_to(format!("a{i}").as_bytes(), SERVER).unwrap();
        ub.send_to(format!("b{i}").as_bytes(), SERVER).unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = ua.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "cloud 1's echo: {e}; drops {:?}; external {:?}; peers {:?}; flows {:?} {:?}",
                host.dataplane()
                    .drop_counters()
                    .unwrap()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .collect::<Vec<_>>(),
                external(&host, sa),
                echo.peers.lock().unwrap(),
                host.dataplane().egress_flows_out().unwrap(),
                host.dataplane().egress_flows_in().unwrap(),
            )
        });
        assert_eq!(&buf[..n], format!("a{i}").as_bytes());
        let (n, _) = ub.recv_from(&mut buf).expect("cloud 2's echo");
        assert_eq!(&buf[..n], format!("b{i}").as_bytes());
    }
    let peers = echo.peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 10, "{peers:?}");
    let from_a: Vec<_> = peers.iter().filter(|p| *p.ip() == HOST_IP).collect();
    let from_b: Vec<_> = peers.iter().filter(|p| *p.ip() == OWN_ADDRESS).collect();
    assert_eq!((from_a.len(), from_b.len()), (5, 5), "{peers:?}");
    assert!(
        peers.iter().all(|p| nat_ports.contains(&p.port())),
        "NAT ports come from the reserved range: {peers:?}"
    );
    assert_eq!(
        from_a
            .iter()
            .map(|p| p.port())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1,
        "one flow, one port"
    );
    // Exact counters: 5 datagrams each way, Ethernet + IPv4 + UDP + 2 bytes.
    let frame = 14 + 20 + 8 + 2;
    for (slot, before) in [(sa, before[0]), (sb, before[1])] {
        let now = external(&host, slot);
        assert_eq!(
            [
                (now[0].0 - before[0].0, now[0].1 - before[0].1),
                (now[1].0 - before[1].0, now[1].1 - before[1].1)
            ],
            [(5, 5 * frame), (5, 5 * frame)],
            "slot {slot}"
        );
    }

    // 2. TCP from both, including a transfer large enough for many segments and offloads.
    let connect = |g: &VethGuest| {
        let s = in_guest(g, || {
            TcpStream::connect_timeout(&SocketAddr::V4(SERVER), ARRIVE)
        })
        .expect("connecting to the server");
        s.set_read_timeout(Some(ARRIVE)).unwrap();
        s
    };
    let mut ta = connect(&a);
    let mut tb = connect(&b);
    assert_eq!(
        tcp_round(&mut ta, b"hello from a").unwrap(),
        b"hello from a"
    );
    assert_eq!(
        tcp_round(&mut tb, b"hello from b").unwrap(),
        b"hello from b"
    );
    let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    assert_eq!(tcp_round(&mut tb, &big).unwrap(), big);
    let peers = echo.peers.lock().unwrap().clone();
    assert!(peers[10..].iter().any(|p| *p.ip() == HOST_IP), "{peers:?}");
    assert!(
        peers[10..].iter().any(|p| *p.ip() == OWN_ADDRESS),
        "{peers:?}"
    );

    // 3. ICMP echo through the NAT, for both.
    assert!(a.ping(*SERVER.ip()), "cloud 1 pings the server");
    assert!(b.ping(*SERVER.ip()), "cloud 2 pings the server");

    // 4. The always-denied set: the host's address and the uplink's network, in any mode.
    let never = drops(&host, sb, DropReason::EgressNever);
    assert!(!b.ping(HOST_IP));
    assert!(!b.ping(ROUTER_IP));
    assert_eq!(drops(&host, sb, DropReason::EgressNever), never + 2);

    // 5. `deny`: nothing leaves cloud 3.
    let ud = in_guest(&d, || UdpSocket::bind("0.0.0.0:4000")).unwrap();
    ud.set_read_timeout(Some(SILENCE)).unwrap();
    assert!(udp_round(&ud, b"let me out").is_err());
    assert!(!d.ping(*SERVER.ip()));
    assert_eq!(drops(&host, sd, DropReason::EgressDenied), 2);
    assert_eq!(external(&host, sd), [(0, 0), (0, 0)]);

    // 6. A policy change cuts a live flow: cloud 1 to `allowlist` without the server; its
    //    open connection stops at its next packet, cloud 2's goes on.
    let allowlist = EgressPolicy {
        mode: EgressMode::Allowlist,
        allow: vec!["198.19.0.99/32".parse::<EgressRule>().unwrap()],
        ..EgressPolicy::deny_all()
    };
    host.set_cloud_egress(cloud(1), &spec(allowlist, None))
        .unwrap();
    ta.set_read_timeout(Some(SILENCE)).unwrap();
    let cut = match tcp_round(&mut ta, b"still there?") {
        Ok(_) => false,
        Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    };
    assert!(cut, "cloud 1's connection is cut");
    assert!(drops(&host, sa, DropReason::EgressRevoked) >= 1);
    assert_eq!(tcp_round(&mut tb, b"and b?").unwrap(), b"and b?");
    // Allowed again: a new connection works.
    host.set_cloud_egress(cloud(1), &spec(policy(EgressMode::Allow), None))
        .unwrap();
    let mut ta = connect(&a);
    assert_eq!(tcp_round(&mut ta, b"back").unwrap(), b"back");
    drop((ta, tb, ua, ub, ud));
    drop((a, b, d));
    drop(host);
    drop(pins);
}

/// A host with egress on (inside the calling thread's namespace, the internet's host) and
/// one veth guest of cloud 1 at 10.0.0.2 under `policy`; names tagged `(pins, netns,
/// device)`.
fn one_guest(
    (pins_tag, ns_tag, dev_tag): (&str, &str, &str),
    policy: EgressPolicy,
) -> (tokio::runtime::Runtime, PinRoot, Host, VethGuest) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pins = PinRoot::new(pins_tag);
    let mut host = rt
        .block_on(async { Host::open(&support::cfg(&pins, 64, 0)) })
        .unwrap();
    egress::enable(
        &mut host,
        &EgressConfig {
            enabled: true,
            ..EgressConfig::default()
        },
    )
    .unwrap();
    host.set_cloud_egress(cloud(1), &spec(policy, None))
        .unwrap();
    let mac = MacAddr::local(0x00e2_0102);
    let g = support::veth_guest(&rt, &mut host, (ns_tag, dev_tag), 1, GUEST_IP, mac, GATEWAY);
    (rt, pins, host, g)
}

/// A server behind a 1,280-byte link: the world router's "fragmentation needed" for a guest's
/// full-size segments is translated back to the guest (by its quoted header), the guest
/// learns the path MTU, and a large TCP transfer completes both ways.
#[test]
fn path_mtu_discovery_works_across_the_nat() {
    require_root();
    let tags = ["em", "mn", "mv", "mp", "ef"];
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let net = Internet::build("em").expect("building the internet");
        let far_ip = Ipv4Addr::new(198, 19, 1, 10);
        let far = net.add_far_server("ef", far_ip, 1280).unwrap();
        let echo = Echo::start_in(&far, SocketAddrV4::new(far_ip, 7)).unwrap();
        in_netns(&net.host, move || {
            let (rt, pins, host, g) = one_guest(("mp", "mn", "mv"), policy(EgressMode::Allow));
            let mut s = in_guest(&g, || {
                TcpStream::connect_timeout(&SocketAddr::V4(SocketAddrV4::new(far_ip, 7)), ARRIVE)
            })
            .expect("connecting to the far server");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let big: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
            let mut reader = s.try_clone().unwrap();
            let expect = big.len();
            let received = std::thread::spawn(move || {
                let mut got = vec![0u8; expect];
                reader.read_exact(&mut got).map(|_| got)
            });
            s.write_all(&big).unwrap();
            let got = received.join().unwrap().expect("the whole echo");
            assert!(got == big, "the echo is the transfer");
            let route =
                g.ns.exec(&["ip", "-4", "route", "get", &far_ip.to_string()])
                    .unwrap();
            assert!(
                route.contains("mtu 1280"),
                "the guest learnt the path MTU: {route}"
            );
            drop((s, g, host, pins, echo, rt));
        });
        drop(far);
    });
}

/// A byte budget cuts real UDP traffic at its byte count (counted in the kernel and seen at
/// the server), and a rate limit holds: what reaches the server never exceeds the rate over
/// the time taken plus the burst.
#[test]
fn budgets_and_rates_hold_on_real_traffic() {
    require_root();
    let tags = ["eb", "bn", "bv", "bp"];
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let net = Internet::build("eb").expect("building the internet");
        net.add_server(*SERVER.ip()).unwrap();
        let echo = Echo::start(&net, SERVER).expect("echo server");
        let received = echo.received.clone();
        in_netns(&net.host, move || {
            let budget: EgressPolicy = serde_json::from_value(serde_json::json!({
                "mode": "allow",
                "limits": {"budget": {"bytes": 20_000, "period": "day"}}
            }))
            .unwrap();
            let (rt, pins, mut host, g) = one_guest(("bp", "bn", "bv"), budget);
            let sock = in_guest(&g, || UdpSocket::bind("0.0.0.0:4000")).unwrap();
            // 1,042-byte frames (1,000 bytes of payload): 19 fit in 20,000 bytes.
            let payload = [9u8; 1000];
            for _ in 0..30 {
                sock.send_to(&payload, SERVER).unwrap();
            }
            let at_server = support::settled(|| *received.lock().unwrap());
            assert_eq!(
                at_server,
                19 * 1000,
                "the server got exactly the budget's frames"
            );
            assert_eq!(host.egress_budget_used(cloud(1)).unwrap(), 19 * 1042);
            assert_eq!(
                drops(&host, g.ep.slot, DropReason::EgressBudgetSpent),
                11,
                "the rest is refused, counted"
            );

            // 100,000 B/s: burst 64 KiB. 400 frames sent as fast as the guest can.
            let rate: EgressPolicy = serde_json::from_value(serde_json::json!({
                "mode": "allow",
                "limits": {"rate_bytes_per_sec": 100_000}
            }))
            .unwrap();
            host.set_cloud_egress(cloud(1), &spec(rate, None)).unwrap();
            let before = *received.lock().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..400 {
                sock.send_to(&payload, SERVER).unwrap();
            }
            let elapsed = start.elapsed().as_secs_f64();
            let at_server = support::settled(|| *received.lock().unwrap()) - before;
            let frames = at_server / 1000;
            let allowed = (100_000.0 * elapsed + 65_536.0) / 1042.0 + 1.0;
            assert!(
                (frames as f64) <= allowed,
                "{frames} frames in {elapsed:.3} s: more than the rate allows ({allowed:.1})"
            );
            assert!(frames >= 60, "the burst passes: {frames} frames");
            assert_eq!(
                drops(&host, g.ep.slot, DropReason::EgressRateLimited),
                400 - frames,
                "every other frame is refused, counted"
            );
            drop((sock, g, host, pins, rt));
        });
        drop(echo);
    });
}

/// A TCP connection from `src` (any port) to `dst`, giving up after `timeout` (a blocking
/// connect bounded by `SO_SNDTIMEO`).
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: socket() takes constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own from here on.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let local = sockaddr(SocketAddrV4::new(src, 0));
    let remote = sockaddr(dst);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on our fd with valid, correctly sized arguments.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
            || libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0
            || libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    stream.set_read_timeout(Some(ARRIVE))?;
    Ok(stream)
}

/// A VM port published on the uplink: a client in the internet reaches it (its address seen
/// by the VM), `allow_from` refuses other sources, the cloud's `deny` policy does not stop
/// the VM's replies, and unpublishing cuts the live connection. On the way, a connection to
/// a NAT port of the host's address (no flow's) is silent and counted as `uplink_no_flow`,
/// while the host's stack still refuses one to its own closed port.
#[test]
fn a_published_port_is_reached_from_the_internet_and_unpublishing_cuts() {
    use atoll_agent::endpoint::{PublishSpec, PROTOCOL_TCP};
    use std::net::TcpListener;
    require_root();
    let tags = ["ip", "pn", "pv", "pp"];
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let net = Internet::build("ip").expect("building the internet");
        let client_ip = *SERVER.ip();
        net.add_server(client_ip).unwrap();
        net.world
            .sh(&format!("ip route add 198.18.1.0/24 via {HOST_IP}"))
            .unwrap();
        let public = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 20), 80);
        let world = net.world.path();
        in_netns(&net.host, move || {
            let (rt, pins, mut host, g) = one_guest(("pp", "pn", "pv"), policy(EgressMode::Deny));
            let listener = in_guest(&g, || TcpListener::bind("0.0.0.0:8080")).unwrap();
            host.publish(&PublishSpec {
                cloud: cloud(1),
                guest: (GUEST_IP, 8080),
                protocol: PROTOCOL_TCP,
                public: (*public.ip(), public.port()),
                allow_from: vec![Ipv4Net {
                    addr: Ipv4Addr::new(198, 19, 0, 0),
                    len: 16,
                }],
            })
            .unwrap();
            let from_world = |src: Ipv4Addr, timeout: Duration| {
                netns::run_in(&world, move || connect_from(src, public, timeout))
                    .expect("entering the world")
            };
            let host_drops = |h: &Host, r: DropReason| {
                h.dataplane()
                    .drop_counters()
                    .unwrap()
                    .into_iter()
                    .find(|(x, _)| *x == r)
                    .map(|(_, n)| n)
                    .unwrap_or(0)
            };
            // From the router's address: not in allow_from.
            assert!(from_world(ROUTER_IP, SILENCE).is_err(), "refused source");
            assert!(host_drops(&host, DropReason::IngressNotAllowed) >= 1);
            // From an allowed address: in, both ways, the client's address seen by the VM.
            let mut client = from_world(client_ip, ARRIVE).expect("allowed source connects");
            let (mut server, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), std::net::IpAddr::V4(client_ip));
            server.set_read_timeout(Some(ARRIVE)).unwrap();
            client.write_all(b"hello vm").unwrap();
            let mut buf = [0u8; 8];
            server.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello vm");
            server.write_all(b"hello net").unwrap();
            let mut buf = [0u8; 9];
            client.read_exact(&mut buf).unwrap();
            assert_eq!(
                &buf, b"hello net",
                "the VM's reply goes out although its cloud is deny"
            );
            assert!(external(&host, g.ep.slot)[1].0 > 0, "metered external");

            // The host's own address: a NAT port no flow holds is dropped and counted (the
            // host's stack would refuse it with a reset); another closed port is the host's,
            // whose stack refuses it.
            let to_host = |port: u16, timeout: Duration| {
                let dst = SocketAddrV4::new(HOST_IP, port);
                netns::run_in(&world, move || connect_from(client_ip, dst, timeout))
                    .expect("entering the world")
            };
            let before = host_drops(&host, DropReason::UplinkNoFlow);
            let e = to_host(61000, SILENCE).expect_err("a NAT port answers");
            assert_ne!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "a NAT port no flow holds is silent: {e}"
            );
            assert!(host_drops(&host, DropReason::UplinkNoFlow) > before);
            let e = to_host(9, ARRIVE).expect_err("nothing listens on port 9");
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "the host's own port: {e}"
            );

            // Unpublished: the VM's next packet is cut, the client hears nothing more.
            host.unpublish((*public.ip(), public.port()), PROTOCOL_TCP)
                .unwrap();
            server.write_all(b"late").unwrap();
            client.set_read_timeout(Some(SILENCE)).unwrap();
            let mut buf = [0u8; 4];
            assert!(client.read_exact(&mut buf).is_err(), "cut");
            assert!(drops(&host, g.ep.slot, DropReason::IngressRevoked) >= 1);
            drop((client, server, listener, g, host, pins, rt));
        });
    });
}
