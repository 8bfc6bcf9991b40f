//! Cross-cloud exposures end to end in the real kernel: veth guests in their own namespaces,
//! real TCP and UDP sockets, the real programs. Needs root.
//!
//! # Scenario
//!
//! Cloud 1 (consumer, guest A 10.0.0.2), cloud 2 (provider, guests B1 10.0.0.2 and B2
//! 10.0.0.3: the same range as the consumer) and cloud 3 (a stranger, guest C 10.0.0.9).
//! Cloud 2 exposes TCP 8080 on B1 and B2 to cloud 1 at VIP 10.0.0.200:80 (NAT address
//! 10.0.0.250 on the provider side) and UDP 5353 on B1 at 10.0.0.201:53 (NAT 10.0.0.251).
//!
//! 1. 16 TCP connections from A to the VIP: each lands on a backend, which sees the NAT address
//!    as its peer (the consumer's identity), data flows both ways, and both backends get flows.
//! 2. UDP from A to the UDP VIP and back, and TCP to the VIP found by its DNS name: A asks its
//!    gateway (the host's DNS server) for `web.c00000002.svc.one.atoll.internal.` (the name
//!    the control plane gives a grant: exposure, provider's id, `svc`, consumer's zone) with
//!    hickory-resolver and connects to the answer; C gets NXDOMAIN for the same name.
//! 3. Nothing else crosses: C cannot reach the VIP or the backends' real addresses, A cannot
//!    reach a backend's real address or another port of the VIP, and B1 cannot open a flow to
//!    the NAT address; each drop is counted under its reason.
//! 4. Counters: A's exposure traffic equals the sum of B1's and B2's, in both directions.
//! 5. Revocation: a live TCP flow carries data, the grant is replaced (same VIP, new grant)
//!    and the flow is cut in both directions (`exposure_revoked`), while a new connection works;
//!    then the grant is removed and nothing reaches the VIP any more.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use atoll_agent::{
    config::{DnsConfig, Ipv4Network},
    dns::{netns, DnsPlane, DnsServer, DnsView, ForwardPolicy, Record, RecordData, Zone},
    endpoint::{DeviceSpec, EndpointSpec, Host, ServiceSpec, PROTOCOL_TCP, PROTOCOL_UDP},
    types::{CloudId, MacAddr},
};
use atoll_dataplane_common::{Direction, DropReason, TrafficClass};
use atoll_testbed::{frame, guest::TapGuest, unique_name, LinksWithPrefix, PinRoot};

const TAGS: [&str; 4] = ["xv", "xn", "xp", "xd"];
/// The checksum test's own names: the tests of this file run at once, and each removes what
/// carries its tags.
const CHECKSUM_TAGS: [&str; 4] = ["yv", "yn", "yp", "yt"];
const SERVICE_NAME: &str = "web.c00000002.svc.one.atoll.internal.";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 201);
const TCP_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 250);
const UDP_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 251);
const ARRIVE: Duration = Duration::from_secs(3);
/// How long a packet that must not arrive is waited for.
const SILENCE: Duration = Duration::from_millis(400);

#[test]
fn consumers_reach_granted_services_and_nothing_else_crosses() {
    support::require_root();
    support::leaves_nothing(&TAGS, scenario);
}

use support::VethGuest as Guest;

fn cloud(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

fn guest(rt: &tokio::runtime::Runtime, host: &mut Host, c: u32, ip: Ipv4Addr) -> Guest {
    let mac = MacAddr::local(0x00e0_0000 | c << 8 | u32::from(ip.octets()[3]));
    support::veth_guest(rt, host, ("xn", "xv"), c, ip, mac, GATEWAY)
}

fn in_ns<T: Send>(g: &Guest, f: impl FnOnce() -> T + Send) -> T {
    netns::run_in(&g.ns.path(), f).expect("entering the guest namespace")
}

fn tcp_spec() -> ServiceSpec {
    ServiceSpec {
        consumer: cloud(1),
        vip: TCP_VIP,
        provider: cloud(2),
        nat: TCP_NAT,
        protocol: PROTOCOL_TCP,
        port: 80,
        backends: vec![
            (Ipv4Addr::new(10, 0, 0, 2), 8080),
            (Ipv4Addr::new(10, 0, 0, 3), 8080),
        ],
    }
}

/// Connects from the guest (sockets keep the namespace they were made in).
fn connect(g: &Guest, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_ns(g, || TcpStream::connect_timeout(&to, timeout)).inspect(|s| {
        s.set_read_timeout(Some(ARRIVE)).unwrap();
    })
}

/// Accepts the connection that arrived on one of `listeners`; returns its index and stream.
fn accept_any(listeners: &[&TcpListener]) -> (usize, TcpStream, SocketAddr) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of pollfds for its length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, ARRIVE.as_millis() as i32) };
    assert!(n > 0, "no connection arrived at any backend");
    let i = fds
        .iter()
        .position(|f| f.revents & libc::POLLIN != 0)
        .unwrap();
    let (s, peer) = listeners[i].accept().expect("accept");
    s.set_read_timeout(Some(ARRIVE)).unwrap();
    (i, s, peer)
}

fn exchange(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) {
    from.write_all(msg).expect("sending");
    let mut buf = vec![0; msg.len()];
    to.read_exact(&mut buf).expect("receiving");
    assert_eq!(buf, msg);
}

/// True if no data arrives on `s` within `SILENCE`: nothing at all, or the connection was
/// reset (a retransmission admitted as a new flow under a new grant meets no socket at the
/// backend, which answers with a reset: also a cut).
fn cut(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(SILENCE)).unwrap();
    let mut buf = [0u8; 64];
    let r = s.read(&mut buf);
    let _ = s.set_read_timeout(Some(ARRIVE));
    match r {
        Ok(n) => n == 0,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::ConnectionReset
        ),
    }
}

fn exposure(host: &Host, slot: u32) -> [(u64, u64); 2] {
    let c = host.dataplane().counters(slot).expect("counters");
    let t = |d: Direction| {
        let x = c.traffic[d as usize][TrafficClass::Exposure as usize];
        (x.packets, x.bytes)
    };
    [t(Direction::FromGuest), t(Direction::ToGuest)]
}

fn drops(host: &Host, slot: u32, r: DropReason) -> u64 {
    host.dataplane().counters(slot).expect("counters").drops[r as usize]
}

fn scenario() {
    // Multi-threaded: the DNS server answers while the test thread waits for a resolver.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pins = PinRoot::new("xp");
    let _links = LinksWithPrefix(atoll_testbed::unique_prefix("xv"));
    let _dns_links = LinksWithPrefix(atoll_testbed::unique_prefix("xd"));
    let mut host = rt
        .block_on(async { Host::open(&support::cfg(&pins, 64, 0)) })
        .unwrap();
    let dns_cfg = DnsConfig {
        namespace: atoll_agent::config::NetnsName::new(&unique_name("xd")).unwrap(),
        device: atoll_agent::config::DeviceName::new(&unique_name("xd")).unwrap(),
        proxy_network: "100.127.0.0/26".parse::<Ipv4Network>().expect("network"),
        ..DnsConfig::default()
    };
    struct NamespaceGuard(String);
    impl Drop for NamespaceGuard {
        fn drop(&mut self) {
            let _ = netns::remove(&self.0);
        }
    }
    let _dns_ns = NamespaceGuard(dns_cfg.namespace.to_string());
    let plane = rt
        .block_on(DnsPlane::ensure(&mut host, &dns_cfg))
        .expect("DNS plane");
    let a = guest(&rt, &mut host, 1, Ipv4Addr::new(10, 0, 0, 2));
    let b1 = guest(&rt, &mut host, 2, Ipv4Addr::new(10, 0, 0, 2));
    let b2 = guest(&rt, &mut host, 2, Ipv4Addr::new(10, 0, 0, 3));
    let c = guest(&rt, &mut host, 3, Ipv4Addr::new(10, 0, 0, 9));
    let tcp_grant = host.apply_service(&tcp_spec()).expect("TCP service");
    let udp = ServiceSpec {
        vip: UDP_VIP,
        nat: UDP_NAT,
        protocol: PROTOCOL_UDP,
        port: 53,
        backends: vec![(Ipv4Addr::new(10, 0, 0, 2), 5353)],
        ..tcp_spec()
    };
    let udp_grant = host.apply_service(&udp).expect("UDP service");
    assert_ne!(tcp_grant, udp_grant);
    assert_eq!(
        host.apply_service(&tcp_spec()).unwrap(),
        tcp_grant,
        "an unchanged grant keeps its number"
    );
    let l1 = in_ns(&b1, || TcpListener::bind("0.0.0.0:8080")).expect("B1 listens");
    let l2 = in_ns(&b2, || TcpListener::bind("0.0.0.0:8080")).expect("B2 listens");
    let vip: SocketAddr = (TCP_VIP, 80).into();

    // 1. TCP through the VIP, spread over both backends.
    let mut per_backend = [0usize; 2];
    for i in 0..16u8 {
        let mut client = connect(&a, vip, ARRIVE).expect("connecting to the VIP");
        assert_eq!(client.peer_addr().unwrap(), vip);
        let (which, mut server, peer) = accept_any(&[&l1, &l2]);
        per_backend[which] += 1;
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(TCP_NAT),
            "the provider sees the consumer's NAT address"
        );
        let backend = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)][which];
        assert_eq!(server.local_addr().unwrap(), (backend, 8080).into());
        exchange(&mut client, &mut server, format!("request {i}").as_bytes());
        exchange(
            &mut server,
            &mut client,
            format!("answer {i} from {which}").as_bytes(),
        );
        // A larger transfer: many segments, with the guests' offloads in play.
        let big = vec![i; 200_000];
        let mut received = Vec::new();
        client.write_all(&big).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        server
            .read_to_end(&mut received)
            .expect("the whole transfer");
        assert_eq!(received, big);
    }
    assert!(
        per_backend.iter().all(|n| *n > 0),
        "both backends get flows: {per_backend:?}"
    );

    // 2. UDP through its VIP and back.
    let server = in_ns(&b1, || UdpSocket::bind("0.0.0.0:5353")).expect("B1 UDP");
    server.set_read_timeout(Some(ARRIVE)).unwrap();
    let client = in_ns(&a, || UdpSocket::bind("0.0.0.0:0")).expect("A UDP");
    client.set_read_timeout(Some(ARRIVE)).unwrap();
    client.send_to(b"udp ping", (UDP_VIP, 53)).unwrap();
    let mut buf = [0u8; 64];
    let (n, peer) = server.recv_from(&mut buf).expect("UDP at the backend");
    assert_eq!(
        (&buf[..n], peer.ip()),
        (&b"udp ping"[..], std::net::IpAddr::V4(UDP_NAT))
    );
    server.send_to(b"udp pong", peer).unwrap();
    let (n, from) = client.recv_from(&mut buf).expect("UDP answer");
    assert_eq!((&buf[..n], from), (&b"udp pong"[..], (UDP_VIP, 53).into()));

    // ... and TCP to the VIP by its DNS name, in the consumer's horizon only.
    let view = DnsView::new(ForwardPolicy::Refuse);
    for g in [&a, &b1, &b2, &c] {
        view.set_endpoint(g.ep.slot, g.ep.cloud);
    }
    view.set_zone(
        cloud(1),
        Zone {
            apex: "one.atoll.internal.".into(),
            records: vec![Record {
                name: SERVICE_NAME.into(),
                ttl: 30,
                data: RecordData::A(TCP_VIP),
            }],
        },
    )
    .expect("consumer zone");
    let dns_server = {
        let _entered = rt.enter();
        DnsServer::start(&plane, view).expect("DNS server")
    };
    let ask = |g: &Guest| {
        support::dns::resolve(
            &g.ns,
            GATEWAY,
            ARRIVE,
            support::dns::Transport::Udp,
            SERVICE_NAME,
            hickory_proto::rr::RecordType::A,
        )
    };
    let found = support::dns::addresses(&ask(&a).expect("the consumer resolves the service"));
    assert_eq!(found, vec![TCP_VIP]);
    let mut by_name = connect(&a, (found[0], 80).into(), ARRIVE).expect("connecting by name");
    let (_, mut server_by_name, _) = accept_any(&[&l1, &l2]);
    exchange(&mut by_name, &mut server_by_name, b"by name");
    drop((by_name, server_by_name));
    assert_eq!(
        support::dns::rcode_of(&ask(&c)),
        Some(hickory_proto::op::ResponseCode::NXDomain),
        "a stranger does not see the consumer's service name"
    );
    rt.block_on(dns_server.shutdown())
        .expect("stopping the DNS server");

    // 3. Nothing else crosses.
    // The guests treat their /24 as on-link, so what has no route is refused at ARP already.
    let no_route = |g: &Guest| {
        drops(&host, g.ep.slot, DropReason::NoRouteInCloud)
            + drops(&host, g.ep.slot, DropReason::ArpUnknownTarget)
    };
    let before = no_route(&c);
    assert!(
        connect(&c, vip, SILENCE).is_err(),
        "a stranger reaches the VIP"
    );
    assert!(
        connect(&c, (Ipv4Addr::new(10, 0, 0, 2), 8080).into(), SILENCE).is_err(),
        "a stranger reaches a backend's real address"
    );
    assert!(
        no_route(&c) >= before + 2,
        "the stranger's attempts are counted"
    );
    let before = no_route(&a);
    assert!(
        connect(&a, (Ipv4Addr::new(10, 0, 0, 3), 8080).into(), SILENCE).is_err(),
        "the consumer reaches a backend's real address"
    );
    assert!(no_route(&a) > before);
    let before = drops(&host, a.ep.slot, DropReason::ExposureNoService);
    assert!(connect(&a, (TCP_VIP, 81).into(), SILENCE).is_err());
    assert!(drops(&host, a.ep.slot, DropReason::ExposureNoService) > before);
    let before = drops(&host, b1.ep.slot, DropReason::ExposureNoFlow);
    assert!(
        connect(&b1, (TCP_NAT, 80).into(), SILENCE).is_err(),
        "the provider opens a flow to the consumer"
    );
    assert!(drops(&host, b1.ep.slot, DropReason::ExposureNoFlow) > before);

    // 4. Both sides count the same exposure traffic.
    let [a_out, a_in] = exposure(&host, a.ep.slot);
    let [b1_out, b1_in] = exposure(&host, b1.ep.slot);
    let [b2_out, b2_in] = exposure(&host, b2.ep.slot);
    assert!(
        a_out.0 > 16 * 3 && a_in.0 > 16 * 2,
        "exposure traffic counted"
    );
    assert_eq!(
        a_out,
        (b1_in.0 + b2_in.0, b1_in.1 + b2_in.1),
        "consumer → providers"
    );
    assert_eq!(
        a_in,
        (b1_out.0 + b2_out.0, b1_out.1 + b2_out.1),
        "providers → consumer"
    );
    assert_eq!(exposure(&host, c.ep.slot), [(0, 0), (0, 0)]);

    // 5. Revocation cuts live flows.
    let mut client = connect(&a, vip, ARRIVE).expect("connecting");
    let (_, mut server, _) = accept_any(&[&l1, &l2]);
    exchange(&mut client, &mut server, b"before");
    host.remove_service(cloud(1), TCP_VIP).unwrap();
    let regrant = host.apply_service(&tcp_spec()).expect("granted again");
    assert!(
        regrant > tcp_grant.max(udp_grant),
        "a new grant gets a new number"
    );
    let revoked = |g: &Guest| drops(&host, g.ep.slot, DropReason::ExposureRevoked);
    let (a0, b0) = (revoked(&a), revoked(&b1) + revoked(&b2));
    client.write_all(b"after").unwrap();
    assert!(
        cut(&mut server),
        "the consumer's data crossed a revoked grant"
    );
    // The write may already fail if the connection was reset meanwhile.
    let _ = server.write_all(b"back");
    assert!(
        cut(&mut client),
        "the provider's data crossed a revoked grant"
    );
    assert!(revoked(&a) > a0 && revoked(&b1) + revoked(&b2) > b0);
    let mut fresh = connect(&a, vip, ARRIVE).expect("a new connection under the new grant");
    let (_, mut fresh_server, _) = accept_any(&[&l1, &l2]);
    exchange(&mut fresh, &mut fresh_server, b"new grant");
    exchange(&mut fresh_server, &mut fresh, b"works");
    host.remove_service(cloud(1), TCP_VIP).unwrap();
    host.remove_service(cloud(1), UDP_VIP).unwrap();
    assert!(host.services().unwrap().is_empty());
    fresh.write_all(b"gone").unwrap();
    assert!(cut(&mut fresh_server), "data crossed a removed grant");
    assert!(
        connect(&a, vip, SILENCE).is_err(),
        "a removed VIP still answers"
    );

    drop((client, server, fresh, fresh_server, l1, l2));
    rt.block_on(host.destroy()).expect("destroying the host");
    drop((a, b1, b2, c));
}

/// Both kinds of transport checksum come out of an exposure right: the consumer's sockets
/// hand the programs partial checksums (its veth offloads them), the tap backend's frames
/// carry full ones. The tap has no checksum offload, so the kernel completes a partial
/// checksum from the field the programs left before the backend reads the frame: a wrong
/// field is a wrong checksum there. The consumer's kernel verifies the backend's full
/// checksums and drops what does not verify. Many datagrams of one flow (its first packet
/// takes the tables, the rest its cache slot, with the refreshes the credit forces) and a
/// TCP handshake and segment.
#[test]
fn partial_and_full_checksums_both_come_out_right() {
    support::require_root();
    support::leaves_nothing(&CHECKSUM_TAGS, checksums);
}

/// The next IPv4 frame at the tap guest (anything else the host sends there is skipped).
fn next_ipv4(tap: &TapGuest, what: &str) -> Vec<u8> {
    loop {
        let f = tap.recv(what);
        if f.len() > 14 && f[12..14] == [0x08, 0x00] {
            return f;
        }
    }
}

fn checksums() {
    const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pins = PinRoot::new("yp");
    let _links = LinksWithPrefix(atoll_testbed::unique_prefix("yv"));
    let _taps = LinksWithPrefix(atoll_testbed::unique_prefix("yt"));
    let mut host = rt
        .block_on(async { Host::open(&support::cfg(&pins, 16, 0)) })
        .unwrap();
    let a = support::veth_guest(
        &rt,
        &mut host,
        ("yn", "yv"),
        1,
        Ipv4Addr::new(10, 0, 0, 2),
        MacAddr::local(0x00e0_0102),
        GATEWAY,
    );
    let name = unique_name("yt");
    let mac = MacAddr::local(0x00e0_0202);
    rt.block_on(host.create_endpoint(&EndpointSpec {
        name: name.clone(),
        cloud: cloud(2),
        ipv4: BACKEND,
        mac,
        gateway: GATEWAY,
        device: DeviceSpec::Tap { owner_uid: None },
    }))
    .expect("the tap backend");
    let tap = TapGuest::attach("backend", &name, mac.0, BACKEND, host.gateway_mac().0);
    let udp = ServiceSpec {
        vip: UDP_VIP,
        nat: UDP_NAT,
        protocol: PROTOCOL_UDP,
        port: 53,
        backends: vec![(BACKEND, 5353)],
        ..tcp_spec()
    };
    host.apply_service(&udp).expect("UDP service");
    host.apply_service(&ServiceSpec {
        backends: vec![(BACKEND, 8080)],
        ..tcp_spec()
    })
    .expect("TCP service");

    // UDP: 80 datagrams of one flow, each of another length and content (so the checksums
    // take many values), out with partial checksums and back with full ones.
    let client = in_ns(&a, || UdpSocket::bind("0.0.0.0:0")).expect("A UDP");
    client.set_read_timeout(Some(ARRIVE)).unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..80u16 {
        let out: Vec<u8> = (0..7 + 13 * i).map(|b| (b as u8) ^ (i as u8)).collect();
        client.send_to(&out, (UDP_VIP, 53)).unwrap();
        let f = next_ipv4(&tap, &format!("datagram {i}"));
        let p = frame::parse_udp(&f).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        assert_eq!(
            (p.addr.src, p.addr.dst, p.addr.dport, p.payload),
            (UDP_NAT, BACKEND, 5353, &out[..]),
            "datagram {i} at the backend"
        );
        assert!(
            p.ip_checksum_ok && p.udp_checksum_ok,
            "datagram {i}: the partial checksum was completed wrong (0x{:04x})",
            p.udp_checksum
        );
        let back: Vec<u8> = out.iter().rev().map(|b| b.wrapping_add(1)).collect();
        tap.send(
            &frame::Udp {
                src_mac: mac.0,
                dst_mac: host.gateway_mac().0,
                src: BACKEND,
                dst: UDP_NAT,
                sport: 5353,
                dport: p.addr.sport,
            }
            .frame(&back),
        );
        let (n, from) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("reply {i} (dropped if its checksum is wrong): {e}"));
        assert_eq!(
            (&buf[..n], from),
            (&back[..], (UDP_VIP, 53).into()),
            "reply {i}"
        );
    }

    // TCP: the handshake completes only if the consumer's kernel verifies the backend's
    // SYN-ACK; the SYN, the ACK and a data segment reach the backend with valid checksums.
    let ns = a.ns.path().to_path_buf();
    let connecting = std::thread::spawn(move || {
        netns::run_in(&ns, || {
            TcpStream::connect_timeout(&(TCP_VIP, 80).into(), ARRIVE)
        })
        .expect("entering the guest namespace")
    });
    let f = next_ipv4(&tap, "the SYN");
    let syn = frame::parse_tcp(&f).expect("a TCP frame");
    assert_eq!(
        (syn.addr.src, syn.addr.dst, syn.addr.dport, syn.addr.flags),
        (TCP_NAT, BACKEND, 8080, frame::TCP_SYN)
    );
    assert!(
        syn.ip_checksum_ok && syn.tcp_checksum_ok,
        "the SYN's checksum"
    );
    let reply = |seq: u32, ack: u32, flags: u8| {
        frame::Tcp {
            src_mac: mac.0,
            dst_mac: host.gateway_mac().0,
            src: BACKEND,
            dst: TCP_NAT,
            sport: 8080,
            dport: syn.addr.sport,
            seq,
            ack,
            flags,
        }
        .frame(&[])
    };
    tap.send(&reply(
        0x0100_0000,
        syn.addr.seq.wrapping_add(1),
        frame::TCP_SYN | frame::TCP_ACK,
    ));
    let mut stream = connecting
        .join()
        .unwrap()
        .expect("the handshake (a SYN-ACK with a wrong checksum is dropped)");
    let f = next_ipv4(&tap, "the ACK");
    let ack = frame::parse_tcp(&f).expect("a TCP frame");
    assert_eq!(ack.addr.flags & frame::TCP_ACK, frame::TCP_ACK);
    assert!(ack.tcp_checksum_ok, "the ACK's checksum");
    stream.write_all(b"through the exposure").unwrap();
    let f = next_ipv4(&tap, "the data");
    let data = frame::parse_tcp(&f).expect("a TCP frame");
    assert_eq!(data.payload, b"through the exposure");
    assert!(data.tcp_checksum_ok, "the data segment's checksum");
    tap.send(&reply(
        0x0100_0001,
        data.addr.seq.wrapping_add(data.payload.len() as u32),
        frame::TCP_ACK | frame::TCP_RST,
    ));

    drop((stream, client, tap));
    rt.block_on(host.destroy()).expect("destroying the host");
    drop(a);
}
