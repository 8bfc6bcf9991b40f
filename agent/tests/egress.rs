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
/// How long a packet that must not arrive is waited for.
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
