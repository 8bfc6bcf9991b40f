//! End-to-end metering test: exact frames through real endpoints, every counter checked to the
//! byte in the kernel maps and in the agent's OpenMetrics / Prometheus HTTP exposition.
//!
//! Runs as root and fails loudly (never skips) when it is not root or the kernel lacks a
//! feature the dataplane needs.
//!
//! # Scenario
//!
//! Two clouds with overlapping addresses (gateway 10.0.0.1):
//! - cloud 1: tap guests A (10.0.0.2) and B (10.0.0.4), veth guest V (10.0.0.3);
//! - cloud 2: tap guest C (10.0.0.2), veth guest W (10.0.0.3). 10.0.0.4 does not exist here.
//!
//! The test is the guest of every tap (it writes and reads raw frames, so it knows each frame's
//! exact length); the veth guests are real kernel stacks in namespaces, driven through UDP and
//! raw ICMP sockets whose frame sizes follow from the payload: IPv4 without options, so a frame
//! is 14 + 20 + 8 + payload bytes (veth does not pad short frames; the tap side reads every
//! forwarded frame and checks its length, so this is verified, not assumed).
//!
//! Steps, each followed by an exact check of every counter of every endpoint (all directions,
//! classes and drop reasons) and of the host-wide drops against a ledger of what was sent:
//! 1. tap -> tap (A -> B, B answers an echo): UDP of 42 to 1514 bytes, one frame padded to 60.
//! 2. tap -> veth (A -> V, C -> W): ICMP echo answered by the guest kernels, UDP to a socket.
//! 3. veth -> tap (V -> A, W -> C, V -> B): UDP datagrams of known sizes.
//! 4. gateway (class `host`, both directions on the asking endpoint): ARP (also a padded one)
//!    and ICMP echo from taps, ICMP echo from the veth guests' raw sockets.
//! 5. drops: spoofed source IP and MAC, no route in the cloud (also an address that exists only
//!    in the other cloud), unknown ARP target, UDP to the gateway; and no route from a veth
//!    guest.
//! 6. the HTTP exposition: both formats parsed with `prometheus-parse` and compared series by
//!    series with the ledger (every series present, zeros included), cloud totals equal the sum
//!    of their endpoints; HTTP errors (404, 405, garbage) do not stop the server.
//! 7. an endpoint whose device vanished behind the agent's back is exported as `ifindex-<n>`
//!    until `reconcile` removes it (and its share of the cloud totals).
//!
//! # Exactness
//!
//! The test's pin root is private, so only its own endpoints feed these maps. Background
//! traffic is ruled out rather than tolerated: the host side of every endpoint has IPv6 off (the
//! agent does that), the guests' namespaces have IPv6 off, and every address a veth guest talks
//! to has a permanent neighbour entry (the gateway MAC), so the guests never ARP. Hence the
//! counters start at zero and every later value is exactly what the ledger says.
//!
//! A frame sent to a tap before the kernel has activated its transmit queue (just after the
//! guest attached) is metered as `to_guest` but silently dropped, so every tap guest waits for
//! its tap to be operationally up when it attaches (see `common::TapGuest::attach`).
//!
//! Every counted frame is counted by `from_vm` before it is delivered, so once the test has read
//! a frame (or its reply) the counters include it. Frames a tap guest writes are judged
//! synchronously in `write(2)`. The only frames nobody receives are the veth guest's dropped
//! ones: they are followed by a forwarded "fence" datagram the test waits for, and the counter
//! check re-reads the maps until they match exactly, failing if they still differ after
//! [`ARRIVE`] (an over-count never goes away, so it always fails).

mod common;

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use atoll_agent::{
    config::DataplaneConfig,
    endpoint::{Endpoint, Host},
    metrics::{self, Exporter},
};
use atoll_dataplane_common::{
    Direction, DropReason, EndpointCounters, TrafficClass, TrafficCounter,
};
use atoll_testbed::{LinkGuard, PinRoot};
use common::{
    assert_silent, create_tap, create_veth, frame, in_netns, wait_for, GuestUdp, PoolGuard, Sink,
    Tags, TapGuest, VethGuest, ARRIVE, GATEWAY, KERNEL_TTL, TAP_TTL,
};

/// Tap guests A (cloud 1) and C (cloud 2).
const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Veth guests V (cloud 1) and W (cloud 2).
const VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// Tap guest B: exists only in cloud 1.
const ONLY_IN_CLOUD1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
/// Exists in no cloud.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
const TAP_PORT: u16 = 41001;
const VETH_PORT: u16 = 41002;
/// Ethernet + IPv4 (no options) + UDP/ICMP echo headers.
const HEADERS: usize = 14 + 20 + 8;
const TAGS: Tags = Tags {
    tap: "mt",
    veth: "mv",
    netns: "mn",
    pins: "mp",
};

#[test]
fn metering_is_exact_end_to_end() {
    common::run_scenario("metering", &TAGS, scenario);
}

/// The guests; the endpoints are in the ledger.
struct World {
    a: TapGuest,
    b: Option<TapGuest>,
    c: TapGuest,
    v: Veth,
    w: Veth,
}

/// A veth guest with its sockets.
struct Veth {
    guest: VethGuest,
    udp: GuestUdp,
    icmp: GuestIcmp,
}

fn scenario() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    // Host::open spawns its netlink connection on this runtime; the blocking packet I/O runs on
    // this plain thread, the metrics server on the runtime's workers.
    let _rt_ctx = rt.enter();
    let pins = PinRoot::new(TAGS.pins);
    let cfg = DataplaneConfig {
        bpffs_root: pins.path().to_path_buf(),
        // No spare taps: every device of this dataplane is an endpoint.
        tap_pool: 0,
        ..DataplaneConfig::default()
    };
    let mut links: Vec<LinkGuard> = Vec::new();
    let _pool = PoolGuard;
    let mut host = Host::open(&cfg).unwrap_or_else(|e| {
        panic!("Host::open: {e} ({e:?}); the test needs bpffs, CAP_BPF/CAP_NET_ADMIN and TCX")
    });
    let gw_mac = host.gateway_mac().0;

    // The metrics server, on its own handle of the same pins, as `atoll-agent run` starts it.
    let exporter = Exporter::open(&cfg).unwrap_or_else(|e| panic!("Exporter::open: {e}"));
    let listener = rt
        .block_on(metrics::bind("127.0.0.1:0".parse().expect("address")))
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().expect("local address");
    let server = ServerGuard(rt.spawn(metrics::serve(listener, exporter)));

    let t = Instant::now();
    let mut ledger = Ledger::default();
    let (ep_a, a) = create_tap(&rt, &mut host, &mut links, &TAGS, 1, TAP_IP, gw_mac);
    let (ep_b, b) = create_tap(&rt, &mut host, &mut links, &TAGS, 1, ONLY_IN_CLOUD1, gw_mac);
    let (ep_c, c) = create_tap(&rt, &mut host, &mut links, &TAGS, 2, TAP_IP, gw_mac);
    let (ep_v, v) = create_veth(&rt, &mut host, &mut links, &TAGS, 1, VETH_IP);
    let (ep_w, w) = create_veth(&rt, &mut host, &mut links, &TAGS, 2, VETH_IP);
    for ep in [&ep_a, &ep_b, &ep_c, &ep_v, &ep_w] {
        ledger.add(ep);
    }
    let v = Veth::new(v, gw_mac);
    let w = Veth::new(w, gw_mac);
    let mut world = World {
        a,
        b: Some(b),
        c,
        v,
        w,
    };
    println!(
        "metering: 5 endpoints in 2 clouds created in {:.2?}; metrics at http://{addr}/metrics",
        t.elapsed()
    );
    let eps = Eps {
        a: &ep_a,
        b: &ep_b,
        c: &ep_c,
        v: &ep_v,
        w: &ep_w,
    };

    step("0 nothing counted yet", || {
        check_kernel(&host, &ledger, "setup");
        check_http(addr, &ledger, "setup");
    });
    step("1 tap -> tap", || {
        tap_to_tap(&world, &eps, &mut ledger);
        check_kernel(&host, &ledger, "tap -> tap");
    });
    step("2 tap -> veth", || {
        tap_to_veth(&world, &eps, &mut ledger);
        check_kernel(&host, &ledger, "tap -> veth");
    });
    step("3 veth -> tap", || {
        veth_to_tap(&world, &eps, &mut ledger);
        check_kernel(&host, &ledger, "veth -> tap");
    });
    step("4 gateway", || {
        gateway(&world, &eps, &mut ledger);
        check_kernel(&host, &ledger, "gateway");
    });
    step("5 drops", || {
        drops(&world, &eps, &mut ledger);
        check_kernel(&host, &ledger, "drops");
    });
    step("6 HTTP exposition", || {
        let mut sinks: Vec<Sink<'_>> = vec![Sink::Tap(&world.a), Sink::Tap(&world.c)];
        sinks.extend(world.b.as_ref().map(Sink::Tap));
        sinks.extend([Sink::Udp(&world.v.udp), Sink::Udp(&world.w.udp)]);
        assert_silent(&sinks, "after all steps: no frame left unaccounted");
        check_kernel(&host, &ledger, "before scraping");
        check_http(addr, &ledger, "after all steps");
        http_errors(addr, &ledger);
        check_kernel(&host, &ledger, "after scraping");
    });
    step("7 vanished device", || {
        vanished_device(&mut world, &mut host, &mut links, &ep_b, &mut ledger, addr)
    });

    let t = Instant::now();
    assert!(!server.0.is_finished(), "the metrics server stopped early");
    drop(server);
    drop(world);
    rt.block_on(host.destroy())
        .unwrap_or_else(|e| panic!("destroy: {e}"));
    println!("metering: teardown in {:.2?}", t.elapsed());
}

fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    println!("metering: step {name} ok ({:.2?})", t.elapsed());
    out
}

/// Aborts the metrics server (which drops its dataplane handle) on drop.
struct ServerGuard(tokio::task::JoinHandle<Result<(), metrics::MetricsError>>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Eps<'a> {
    a: &'a Endpoint,
    b: &'a Endpoint,
    c: &'a Endpoint,
    v: &'a Endpoint,
    w: &'a Endpoint,
}

impl Veth {
    fn new(guest: VethGuest, gw_mac: frame::Mac) -> Self {
        // Permanent neighbours: the guest never sends ARP, so everything it sends is known.
        let mac = gw_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let script = [GATEWAY, TAP_IP, ONLY_IN_CLOUD1, NOWHERE]
            .map(|ip| format!("ip neigh replace {ip} lladdr {mac} dev eth0 nud permanent"))
            .join(" && ");
        guest
            .ns
            .sh(&script)
            .unwrap_or_else(|e| panic!("{}: static neighbours: {e}", guest.label));
        let udp = GuestUdp::bind(&guest, VETH_PORT);
        let icmp = GuestIcmp::open(&guest);
        Veth { guest, udp, icmp }
    }
}

// ---------------------------------------------------------------------------------------------
// Steps

/// A UDP payload of `len` bytes that names the step.
fn payload(tag: &str, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = format!("metering/{tag}/").into_bytes();
    p.resize(len, b'.');
    p.truncate(len);
    p
}

/// UDP payload sizes for frames of 42 (empty), 60 (minimum Ethernet), 171 and 1514 bytes.
const UDP_SIZES: [usize; 4] = [0, 18, 129, 1472];

fn tap_to_tap(world: &World, eps: &Eps<'_>, ledger: &mut Ledger) {
    let (a, b) = (&world.a, world.b.as_ref().expect("B exists"));
    for len in UDP_SIZES {
        let p = payload("a-to-b", len);
        let f = a.udp(ONLY_IN_CLOUD1, TAP_PORT, TAP_PORT, &p);
        assert_eq!(f.len(), HEADERS + len);
        a.send(&f);
        ledger.forwarded(eps.a, eps.b, f.len());
        let got = b.expect_ipv4("UDP from A", TAP_IP, TAP_TTL - 1);
        assert_eq!(14 + got.len(), f.len(), "forwarded frame length");
        let ip = frame::parse_ipv4(&got).expect("parsed above");
        assert_eq!(frame::parse_udp(&ip).expect("UDP").payload, &p[..]);
    }
    // A short frame padded to the Ethernet minimum: the padding is metered too.
    let mut f = a.udp(ONLY_IN_CLOUD1, TAP_PORT, TAP_PORT, b"pad");
    assert_eq!(f.len(), HEADERS + 3);
    f.resize(60, 0);
    a.send(&f);
    ledger.forwarded(eps.a, eps.b, 60);
    let got = b.expect_ipv4("padded UDP from A", TAP_IP, TAP_TTL - 1);
    assert_eq!(14 + got.len(), 60, "padding is forwarded");
    // An echo request from A that B (the test) answers.
    let p = payload("a-echo-b", 56);
    let f = a.icmp_echo(ONLY_IN_CLOUD1, 0x3101, 1, &p);
    a.send(&f);
    ledger.forwarded(eps.a, eps.b, f.len());
    let got = b.expect_ipv4("echo request from A", TAP_IP, TAP_TTL - 1);
    let ip = frame::parse_ipv4(&got).expect("parsed above");
    let icmp = frame::parse_icmp(&ip).expect("ICMP");
    assert_eq!((icmp.ty, icmp.id, icmp.seq), (8, 0x3101, 1));
    let reply = b.icmp(TAP_IP, 0, icmp.id, icmp.seq, icmp.payload);
    assert_eq!(reply.len(), f.len());
    b.send(&reply);
    ledger.forwarded(eps.b, eps.a, reply.len());
    let got = a.expect_ipv4("echo reply from B", ONLY_IN_CLOUD1, TAP_TTL - 1);
    assert_eq!(14 + got.len(), reply.len());
}

fn tap_to_veth(world: &World, eps: &Eps<'_>, ledger: &mut Ledger) {
    for (tap, tap_ep, veth, veth_ep) in [
        (&world.a, eps.a, &world.v, eps.v),
        (&world.c, eps.c, &world.w, eps.w),
    ] {
        // ICMP echo, answered by the guest's kernel with a reply of the same size.
        for (seq, len) in [(1u16, 0usize), (2, 56), (3, 1472)] {
            let p = payload("tap-echo-veth", len);
            let f = tap.icmp_echo(VETH_IP, 0x3200, seq, &p);
            assert_eq!(f.len(), HEADERS + len);
            tap.send(&f);
            ledger.forwarded(tap_ep, veth_ep, f.len());
            let got = tap.expect_ipv4("echo reply from the veth guest", VETH_IP, KERNEL_TTL - 1);
            let ip = frame::parse_ipv4(&got).expect("parsed above");
            let icmp = frame::parse_icmp(&ip).expect("ICMP");
            assert_eq!(
                (icmp.ty, icmp.id, icmp.seq, icmp.payload),
                (0, 0x3200, seq, &p[..]),
                "{}: echo reply",
                tap.label
            );
            assert_eq!(14 + got.len(), f.len(), "echo reply frame length");
            ledger.forwarded(veth_ep, tap_ep, f.len());
        }
        // UDP to the guest's socket (no reply).
        for len in UDP_SIZES {
            let p = payload("tap-udp-veth", len);
            let f = tap.udp(VETH_IP, TAP_PORT, VETH_PORT, &p);
            tap.send(&f);
            ledger.forwarded(tap_ep, veth_ep, f.len());
            let (got, from) = veth.udp.recv("UDP from the tap guest");
            assert_eq!((got, from), (p, SocketAddr::from((TAP_IP, TAP_PORT))));
        }
    }
}

fn veth_to_tap(world: &World, eps: &Eps<'_>, ledger: &mut Ledger) {
    let b = world.b.as_ref().expect("B exists");
    for (veth, veth_ep, tap, tap_ep, dst) in [
        (&world.v, eps.v, &world.a, eps.a, TAP_IP),
        (&world.w, eps.w, &world.c, eps.c, TAP_IP),
        (&world.v, eps.v, b, eps.b, ONLY_IN_CLOUD1),
    ] {
        for len in [1usize, 18, 200, 1472] {
            let p = payload("veth-udp-tap", len);
            send_udp(veth, dst, &p);
            let got = tap.expect_ipv4("UDP from the veth guest", VETH_IP, KERNEL_TTL - 1);
            assert_eq!(
                14 + got.len(),
                HEADERS + len,
                "{}: frame length of a {len}-byte datagram from {}",
                tap.label,
                veth.guest.label
            );
            let ip = frame::parse_ipv4(&got).expect("parsed above");
            let udp = frame::parse_udp(&ip).expect("UDP");
            assert_eq!(
                (udp.sport, udp.dport, udp.payload),
                (VETH_PORT, TAP_PORT, &p[..])
            );
            ledger.forwarded(veth_ep, tap_ep, HEADERS + len);
        }
    }
}

fn gateway(world: &World, eps: &Eps<'_>, ledger: &mut Ledger) {
    for (tap, ep) in [(&world.a, eps.a), (&world.c, eps.c)] {
        // ARP for the gateway (42 bytes), and for an in-cloud peer padded to 60 bytes; both are
        // answered in place, so the reply has the request's length.
        let f = tap.arp_request(GATEWAY);
        assert_eq!(f.len(), 42);
        tap.send(&f);
        ledger.host(ep, 42);
        assert_eq!(tap.expect_arp_reply(GATEWAY).len(), 42);
        let mut f = tap.arp_request(VETH_IP);
        f.resize(60, 0);
        tap.send(&f);
        ledger.host(ep, 60);
        assert_eq!(tap.expect_arp_reply(VETH_IP).len(), 60);
        // ICMP echo to the gateway.
        for (seq, len) in [(1u16, 0usize), (2, 100)] {
            let p = payload("tap-echo-gw", len);
            let f = tap.icmp_echo(GATEWAY, 0x3400, seq, &p);
            tap.send(&f);
            ledger.host(ep, f.len());
            let got = tap.expect_ipv4("echo reply from the gateway", GATEWAY, TAP_TTL);
            assert_eq!(14 + got.len(), f.len());
            let ip = frame::parse_ipv4(&got).expect("parsed above");
            let icmp = frame::parse_icmp(&ip).expect("ICMP");
            assert_eq!((icmp.ty, icmp.id, icmp.seq), (0, 0x3400, seq));
        }
    }
    for (veth, ep) in [(&world.v, eps.v), (&world.w, eps.w)] {
        for (seq, len) in [(1u16, 8usize), (2, 56), (3, 1000)] {
            let p = payload("veth-echo-gw", len);
            veth.icmp.echo(GATEWAY, 0x3500, seq, &p);
            veth.icmp.expect_echo_reply(GATEWAY, 0x3500, seq, &p);
            ledger.host(ep, HEADERS + len);
        }
    }
}

fn drops(world: &World, eps: &Eps<'_>, ledger: &mut Ledger) {
    let a = &world.a;
    let udp_from = |src: Ipv4Addr, dst: Ipv4Addr| {
        frame::ipv4(
            src,
            dst,
            TAP_TTL,
            frame::PROTO_UDP,
            &frame::udp(src, dst, TAP_PORT, VETH_PORT, b"metering/spoofed"),
        )
    };
    for src in [Ipv4Addr::new(10, 0, 0, 77), VETH_IP] {
        a.send(&a.eth_ipv4(&udp_from(src, VETH_IP)));
        ledger.dropped(eps.a, DropReason::SpoofedSourceIp);
    }
    a.send(&frame::ethernet(
        a.gw_mac,
        [0x02, 0x55, 0, 0, 0, 1],
        frame::ETH_P_IP,
        &udp_from(TAP_IP, VETH_IP),
    ));
    ledger.dropped(eps.a, DropReason::SpoofedSourceMac);
    a.send(&a.udp(NOWHERE, TAP_PORT, VETH_PORT, b"metering/nowhere"));
    ledger.dropped(eps.a, DropReason::NoRouteInCloud);
    a.send(&a.arp_request(Ipv4Addr::new(10, 0, 0, 77)));
    ledger.dropped(eps.a, DropReason::ArpUnknownTarget);
    a.send(&a.udp(GATEWAY, TAP_PORT, 53, b"metering/dns?"));
    ledger.dropped(eps.a, DropReason::GatewayServiceUnavailable);
    // 10.0.0.4 exists in cloud 1 only: from cloud 2 there is no route to it.
    let c = &world.c;
    c.send(&c.udp(ONLY_IN_CLOUD1, TAP_PORT, TAP_PORT, b"metering/cloud-1-only"));
    ledger.dropped(eps.c, DropReason::NoRouteInCloud);
    c.send(&c.icmp_echo(ONLY_IN_CLOUD1, 0x3600, 1, b"metering/cloud-1-only"));
    ledger.dropped(eps.c, DropReason::NoRouteInCloud);
    // From a veth guest's kernel: two datagrams without a route, then a fence that is forwarded
    // to C and waited for.
    for _ in 0..2 {
        send_udp(&world.w, NOWHERE, b"metering/veth-nowhere");
        ledger.dropped(eps.w, DropReason::NoRouteInCloud);
    }
    let fence = payload("fence", 30);
    send_udp(&world.w, TAP_IP, &fence);
    let got = c.expect_ipv4("the fence from W", VETH_IP, KERNEL_TTL - 1);
    assert_eq!(14 + got.len(), HEADERS + fence.len());
    ledger.forwarded(eps.w, eps.c, HEADERS + fence.len());
}

fn send_udp(veth: &Veth, dst: Ipv4Addr, payload: &[u8]) {
    let n = veth
        .udp
        .sock
        .send_to(payload, (dst, TAP_PORT))
        .unwrap_or_else(|e| panic!("{}: sending UDP to {dst}: {e}", veth.guest.label));
    assert_eq!(n, payload.len());
}

/// The HTTP server's error paths: none of them stops it or changes a counter.
fn http_errors(addr: SocketAddr, ledger: &Ledger) {
    let r = http(
        addr,
        b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404, "unknown path");
    let r = http(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert_eq!(r.status, 405, "POST");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n"[..],
        b"GET /metrics HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET /metrics\r\n\r\n",
    ] {
        let r = http(addr, garbage);
        assert!(
            (400..500).contains(&r.status),
            "garbage {:?} got {}",
            String::from_utf8_lossy(garbage),
            r.status
        );
    }
    // A client that leaves half-way through its request.
    let mut s = TcpStream::connect_timeout(&addr, ARRIVE).expect("connect");
    s.write_all(b"GET /metr").expect("write");
    drop(s);
    // Still serving, with the same values.
    check_http(addr, ledger, "after HTTP errors");
}

/// B's tap disappears without the agent (as if its VMM deleted it): B is exported as
/// `ifindex-<n>` until `reconcile` removes it.
fn vanished_device(
    world: &mut World,
    host: &mut Host,
    links: &mut Vec<LinkGuard>,
    ep_b: &Endpoint,
    ledger: &mut Ledger,
    addr: SocketAddr,
) {
    let b = world.b.take().expect("B exists");
    drop(b);
    let name = ep_b.name.clone().expect("named");
    let pos = links
        .iter()
        .position(|l| l.0 == name)
        .expect("B's link guard");
    drop(links.remove(pos));
    assert!(
        atoll_agent::device::ifindex(&name).is_none(),
        "{name} still exists"
    );
    ledger.rename(ep_b.ifindex, &format!("ifindex-{}", ep_b.ifindex));
    check_kernel(host, ledger, "vanished device");
    check_http(addr, ledger, "vanished device");
    assert_eq!(host.reconcile().expect("reconcile"), 1);
    ledger.remove(ep_b.ifindex);
    check_http(addr, ledger, "after reconcile");
}

// ---------------------------------------------------------------------------------------------
// The ledger: what the test sent, as the counters must show it

#[derive(Clone)]
struct Expected {
    label: String,
    cloud: u32,
    slot: u32,
    counters: EndpointCounters,
}

#[derive(Default)]
struct Ledger {
    /// By ifindex.
    endpoints: BTreeMap<u32, Expected>,
    /// Host-wide drops (absent reasons are 0).
    drops: BTreeMap<DropReason, u64>,
}

impl Ledger {
    fn add(&mut self, ep: &Endpoint) {
        self.endpoints.insert(
            ep.ifindex,
            Expected {
                label: ep.name.clone().expect("named"),
                cloud: ep.cloud.get(),
                slot: ep.slot,
                counters: EndpointCounters::ZERO,
            },
        );
    }

    fn rename(&mut self, ifindex: u32, label: &str) {
        self.endpoints.get_mut(&ifindex).expect("known").label = label.into();
    }

    fn remove(&mut self, ifindex: u32) {
        self.endpoints.remove(&ifindex).expect("known");
    }

    fn traffic(&mut self, ep: &Endpoint, dir: Direction, class: TrafficClass, bytes: usize) {
        let e = self.endpoints.get_mut(&ep.ifindex).expect("known endpoint");
        let t = &mut e.counters.traffic[dir as usize][class as usize];
        t.packets += 1;
        t.bytes += bytes as u64;
    }

    /// A frame forwarded from one endpoint's guest to another's.
    fn forwarded(&mut self, from: &Endpoint, to: &Endpoint, bytes: usize) {
        self.traffic(from, Direction::FromGuest, TrafficClass::IntraCloud, bytes);
        self.traffic(to, Direction::ToGuest, TrafficClass::IntraCloud, bytes);
    }

    /// A request the gateway answered in place (same length).
    fn host(&mut self, ep: &Endpoint, bytes: usize) {
        self.traffic(ep, Direction::FromGuest, TrafficClass::Host, bytes);
        self.traffic(ep, Direction::ToGuest, TrafficClass::Host, bytes);
    }

    fn dropped(&mut self, ep: &Endpoint, reason: DropReason) {
        let e = self.endpoints.get_mut(&ep.ifindex).expect("known endpoint");
        e.counters.drops[reason as usize] += 1;
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    fn host_drops(&self, r: DropReason) -> u64 {
        self.drops.get(&r).copied().unwrap_or(0)
    }
}

/// Every counter that differs, described.
fn differences(label: &str, want: &EndpointCounters, got: &EndpointCounters) -> Vec<String> {
    let mut out = Vec::new();
    for dir in Direction::ALL {
        for class in TrafficClass::ALL {
            let (w, g): (&TrafficCounter, &TrafficCounter) = (
                &want.traffic[dir as usize][class as usize],
                &got.traffic[dir as usize][class as usize],
            );
            if w != g {
                out.push(format!(
                    "{label} {}/{}: {} packets {} bytes (expected {} packets {} bytes)",
                    dir.name(),
                    class.name(),
                    g.packets,
                    g.bytes,
                    w.packets,
                    w.bytes
                ));
            }
        }
    }
    for r in DropReason::ALL {
        let (w, g) = (want.drops[r as usize], got.drops[r as usize]);
        if w != g {
            out.push(format!("{label} drops {}: {g} (expected {w})", r.name()));
        }
    }
    if want.drops[0] != got.drops[0] {
        out.push(format!("{label} drops slot 0: {}", got.drops[0]));
    }
    out
}

fn kernel_differences(host: &Host, ledger: &Ledger) -> Vec<String> {
    let dp = host.dataplane();
    let mut out = Vec::new();
    for e in ledger.endpoints.values() {
        let got = dp.counters(e.slot).expect("reading counters");
        out.extend(differences(&e.label, &e.counters, &got));
    }
    for (r, n) in dp.drop_counters().expect("reading drop counters") {
        if n != ledger.host_drops(r) {
            out.push(format!(
                "host drops {}: {n} (expected {})",
                r.name(),
                ledger.host_drops(r)
            ));
        }
    }
    out
}

/// Asserts that every counter in the kernel maps equals the ledger (re-reading for at most
/// [`ARRIVE`] while they differ, see module docs).
fn check_kernel(host: &Host, ledger: &Ledger, what: &str) {
    let deadline = Instant::now() + ARRIVE;
    loop {
        let diff = kernel_differences(host, ledger);
        if diff.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: kernel counters differ:\n  {}", diff.join("\n  "));
        }
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------------
// The HTTP exposition

type Series = (String, BTreeMap<String, String>);

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Every series the exposition must contain, with its value.
fn expected_series(ledger: &Ledger) -> BTreeMap<Series, u64> {
    let mut out = BTreeMap::new();
    let mut clouds: BTreeMap<u32, (u64, EndpointCounters)> = BTreeMap::new();
    for e in ledger.endpoints.values() {
        let cloud = e.cloud.to_string();
        let (n, total) = clouds.entry(e.cloud).or_insert((0, EndpointCounters::ZERO));
        *n += 1;
        for dir in Direction::ALL {
            for class in TrafficClass::ALL {
                let t = e.counters.traffic[dir as usize][class as usize];
                let labels = [
                    ("cloud", cloud.as_str()),
                    ("endpoint", e.label.as_str()),
                    ("direction", dir.name()),
                    ("class", class.name()),
                ];
                out.insert(series("atoll_endpoint_packets_total", &labels), t.packets);
                out.insert(series("atoll_endpoint_bytes_total", &labels), t.bytes);
                let sum = &mut total.traffic[dir as usize][class as usize];
                sum.packets += t.packets;
                sum.bytes += t.bytes;
            }
        }
        for r in DropReason::ALL {
            out.insert(
                series(
                    "atoll_endpoint_drops_total",
                    &[
                        ("cloud", &cloud),
                        ("endpoint", &e.label),
                        ("reason", r.name()),
                    ],
                ),
                e.counters.drops[r as usize],
            );
        }
    }
    for r in DropReason::ALL {
        out.insert(
            series("atoll_drops_total", &[("reason", r.name())]),
            ledger.host_drops(r),
        );
    }
    for (cloud, (n, total)) in clouds {
        let cloud = cloud.to_string();
        out.insert(series("atoll_endpoints", &[("cloud", &cloud)]), n);
        for dir in Direction::ALL {
            for class in TrafficClass::ALL {
                let t = total.traffic[dir as usize][class as usize];
                let labels = [
                    ("cloud", cloud.as_str()),
                    ("direction", dir.name()),
                    ("class", class.name()),
                ];
                out.insert(series("atoll_cloud_packets_total", &labels), t.packets);
                out.insert(series("atoll_cloud_bytes_total", &labels), t.bytes);
            }
        }
    }
    out
}

const FAMILIES: [&str; 7] = [
    "atoll_endpoint_packets_total",
    "atoll_endpoint_bytes_total",
    "atoll_endpoint_drops_total",
    "atoll_drops_total",
    "atoll_endpoints",
    "atoll_cloud_packets_total",
    "atoll_cloud_bytes_total",
];

/// Scrapes both formats and compares every series with the ledger.
fn check_http(addr: SocketAddr, ledger: &Ledger, what: &str) {
    let want = expected_series(ledger);
    let mut parsed = Vec::new();
    for (accept, content_type, format) in [
        (
            Some("application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
            metrics::OPENMETRICS_CONTENT_TYPE,
            metrics::Format::OpenMetrics,
        ),
        (None, metrics::TEXT_CONTENT_TYPE, metrics::Format::Text),
    ] {
        let ctx = format!("{what}: {format:?} scrape");
        let r = get_metrics(addr, accept);
        assert_eq!(r.status, 200, "{ctx}: {}", r.body);
        assert_eq!(r.header("content-type"), Some(content_type), "{ctx}");
        match format {
            metrics::Format::OpenMetrics => {
                assert!(r.body.ends_with("\n# EOF\n"), "{ctx}: no # EOF at the end")
            }
            metrics::Format::Text => assert!(!r.body.contains("# EOF"), "{ctx}"),
        }
        let scrape = prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("{ctx}: parsing: {e}"));
        for family in FAMILIES {
            // OpenMetrics names counter families without `_total`.
            let doc_name = match format {
                metrics::Format::OpenMetrics => family.trim_end_matches("_total"),
                metrics::Format::Text => family,
            };
            assert!(
                scrape.docs.contains_key(doc_name),
                "{ctx}: no HELP for {doc_name}"
            );
        }
        let mut got: BTreeMap<Series, u64> = BTreeMap::new();
        // Map fill is the host's state, not the ledger's: each map's entries fit its capacity.
        let mut maps: BTreeMap<(String, String), f64> = BTreeMap::new();
        for s in &scrape.samples {
            if let ("atoll_map_entries" | "atoll_map_capacity", prometheus_parse::Value::Gauge(v)) =
                (s.metric.as_str(), &s.value)
            {
                maps.insert((s.metric.clone(), s.labels.get("map").unwrap_or("").to_string()), *v);
            }
        }
        for ((metric, map), entries) in maps.iter().filter(|((m, _), _)| m == "atoll_map_entries") {
            let capacity = maps
                .get(&("atoll_map_capacity".to_string(), map.clone()))
                .unwrap_or_else(|| panic!("{ctx}: no capacity of map {map}"));
            assert!(
                *entries <= *capacity && *capacity > 0.0,
                "{ctx}: {metric}{{map={map}}} = {entries} of {capacity}"
            );
        }
        for s in scrape
            .samples
            .iter()
            .filter(|s| !s.metric.starts_with("atoll_map_"))
        {
            let value = match (&s.value, format) {
                (prometheus_parse::Value::Gauge(v), _) if s.metric == "atoll_endpoints" => *v,
                (prometheus_parse::Value::Counter(v), metrics::Format::Text)
                    if s.metric.ends_with("_total") =>
                {
                    *v
                }
                // The parser only knows Prometheus naming: OpenMetrics counter samples (named
                // `<family>_total`) come back untyped. Their TYPE lines are checked below.
                (prometheus_parse::Value::Untyped(v), metrics::Format::OpenMetrics)
                    if s.metric.ends_with("_total") =>
                {
                    *v
                }
                (v, _) => panic!("{ctx}: {} has an unexpected type: {v:?}", s.metric),
            };
            assert!(
                value >= 0.0 && value.fract() == 0.0 && value < 2f64.powi(53),
                "{ctx}: {} = {value}",
                s.metric
            );
            let labels: BTreeMap<String, String> =
                s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let key = (s.metric.clone(), labels);
            assert!(
                got.insert(key.clone(), value as u64).is_none(),
                "{ctx}: duplicate series {key:?}"
            );
        }
        if format == metrics::Format::OpenMetrics {
            for family in FAMILIES {
                let (name, ty) = match family.strip_suffix("_total") {
                    Some(base) => (base, "counter"),
                    None => (family, "gauge"),
                };
                let line = format!("# TYPE {name} {ty}");
                assert_eq!(
                    r.body.lines().filter(|l| *l == line).count(),
                    1,
                    "{ctx}: {line}"
                );
            }
        }
        assert_same_series(&want, &got, &ctx);
        assert_cloud_totals(&got, &ctx);
        parsed.push(got);
    }
    assert_eq!(parsed[0], parsed[1], "{what}: the two formats disagree");
}

fn assert_same_series(want: &BTreeMap<Series, u64>, got: &BTreeMap<Series, u64>, ctx: &str) {
    let mut diff = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            Some(g) if g == w => {}
            Some(g) => diff.push(format!("{k:?} = {g} (expected {w})")),
            None => diff.push(format!("{k:?} missing (expected {w})")),
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            diff.push(format!("{k:?} = {g} unexpected"));
        }
    }
    assert!(
        diff.is_empty(),
        "{ctx}: {} series differ:\n  {}",
        diff.len(),
        diff.join("\n  ")
    );
}

/// Cloud totals equal the sum of their endpoints' series, and `atoll_endpoints` their number
/// (computed from the scrape itself).
fn assert_cloud_totals(got: &BTreeMap<Series, u64>, ctx: &str) {
    let mut sums: BTreeMap<Series, u64> = BTreeMap::new();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for ((name, labels), v) in got {
        let total = match name.as_str() {
            "atoll_endpoint_packets_total" => "atoll_cloud_packets_total",
            "atoll_endpoint_bytes_total" => "atoll_cloud_bytes_total",
            _ => continue,
        };
        let mut l = labels.clone();
        l.remove("endpoint");
        *sums.entry((total.to_string(), l)).or_insert(0) += v;
        if name == "atoll_endpoint_packets_total"
            && labels["direction"] == "from_guest"
            && labels["class"] == "intra_cloud"
        {
            *counts.entry(labels["cloud"].clone()).or_insert(0) += 1;
        }
    }
    let totals: BTreeMap<Series, u64> = got
        .iter()
        .filter(|((n, _), _)| n.starts_with("atoll_cloud_"))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(totals, sums, "{ctx}: cloud totals != sum of endpoints");
    let gauges: BTreeMap<String, u64> = got
        .iter()
        .filter(|((n, _), _)| n == "atoll_endpoints")
        .map(|((_, l), v)| (l["cloud"].clone(), *v))
        .collect();
    assert_eq!(gauges, counts, "{ctx}: atoll_endpoints");
}

struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn get_metrics(addr: SocketAddr, accept: Option<&str>) -> HttpResponse {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    http(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

/// A minimal HTTP/1.1 client: sends `raw`, reads until the server closes, parses the response
/// (which must carry a Content-Length that matches its body).
fn http(addr: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect_timeout(&addr, ARRIVE).expect("connecting to the server");
    s.set_read_timeout(Some(ARRIVE * 5)).expect("SO_RCVTIMEO");
    s.set_write_timeout(Some(ARRIVE)).expect("SO_SNDTIMEO");
    s.write_all(raw).expect("sending the request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("reading the response to {:?}: {e}", raw.escape_ascii()));
    let text = String::from_utf8(buf).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let r = HttpResponse {
        status,
        headers,
        body: body.to_string(),
    };
    let len: usize = r
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    assert_eq!(r.body.len(), len, "body length vs Content-Length");
    r
}

// ---------------------------------------------------------------------------------------------
// Raw ICMP in a veth guest

/// A raw ICMP socket in a veth guest (the kernel adds a 20-byte IPv4 header).
struct GuestIcmp {
    label: String,
    fd: OwnedFd,
}

impl GuestIcmp {
    fn open(guest: &VethGuest) -> Self {
        let fd = in_netns(&guest.ns, || -> io::Result<OwnedFd> {
            // SAFETY: plain socket call; the result is checked.
            let raw = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    libc::IPPROTO_ICMP,
                )
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .unwrap_or_else(|e| panic!("raw ICMP socket in {}: {e}", guest.label));
        GuestIcmp {
            label: format!("{} ICMP socket", guest.label),
            fd,
        }
    }

    fn echo(&self, dst: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) {
        let msg = frame::icmp(8, 0, id, seq, payload);
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: `msg` and `sin` are valid for the sizes passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            msg.len() as isize,
            "{}: sendto: {}",
            self.label,
            io::Error::last_os_error()
        );
    }

    fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
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
        buf.truncate(n as usize);
        Some(buf)
    }

    /// Waits for the echo reply (an IPv4 packet) and checks it. A raw socket also gets the echo
    /// requests the guest's kernel answered earlier: everything else queued is skipped.
    fn expect_echo_reply(&self, from: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) {
        let what = format!("{}: echo reply {id:#x}/{seq} from {from}", self.label);
        let is_reply = |p: &[u8]| {
            frame::parse_ipv4(p).is_some_and(|ip| {
                ip.src == from
                    && frame::parse_icmp(&ip).is_some_and(|m| (m.ty, m.id, m.seq) == (0, id, seq))
            })
        };
        let packet = wait_for(self.fd.as_raw_fd(), &what, || loop {
            let p = self.try_recv()?;
            if is_reply(&p) {
                return Some(p);
            }
        });
        let ip = frame::parse_ipv4(&packet).unwrap_or_else(|| panic!("{what}: not IPv4"));
        assert_eq!(ip.src, from, "{what}");
        let icmp = frame::parse_icmp(&ip).unwrap_or_else(|| panic!("{what}: not ICMP"));
        assert_eq!(
            (icmp.ty, icmp.code, icmp.id, icmp.seq, icmp.payload),
            (0, 0, id, seq, payload),
            "{what}"
        );
        assert!(icmp.checksum_ok, "{what}: bad ICMP checksum");
        assert_eq!(packet.len(), 20 + 8 + payload.len(), "{what}: length");
    }
}
