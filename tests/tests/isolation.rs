//! End-to-end isolation test: real guests, real devices, the pinned eBPF dataplane.
//!
//! Runs as root and fails loudly (never skips) when it is not root or the kernel lacks a
//! feature the dataplane needs.
//!
//! # Scenario
//!
//! Three clouds use the *same* addresses: 10.0.0.0/24, gateway 10.0.0.1, guests 10.0.0.2 and
//! 10.0.0.3. In each of them
//! - 10.0.0.2 is a persistent tap created by the agent; the test itself is that guest: it
//!   attaches to the tap (`TUNSETIFF`, `IFF_TAP | IFF_NO_PI`) and reads and writes raw Ethernet
//!   frames, answering ICMP echo requests itself;
//! - 10.0.0.3 is a veth whose peer `eth0` lives in its own network namespace (a real kernel
//!   stack); the test watches it with a UDP socket and a packet socket created in that
//!   namespace.
//!
//! Cloud 3 has one more tap guest, 10.0.0.9: an address that exists only in cloud 3. Cloud 4
//! has two veth guests (10.0.0.2 and 10.0.0.3 again) for a real TCP connection, and UDP and
//! packet sockets that must never see anything of clouds 1 to 3.
//!
//! The agent keeps a warm pool of [`POOL`] spare taps: the taps of clouds 1 and 2 are claimed
//! from it (renamed, already attached), the others are created cold, and a refilled pool of
//! idle spares sits next to the guests for the rest of the test.
//!
//! Steps, each asserting the exact drop-counter deltas of the reasons its frames trigger (and
//! zero for every other reason that background guest traffic cannot trigger, see [`NOISY`]):
//! 1. ARP: the gateway and same-cloud peers are answered with the gateway MAC; 10.0.0.9 only in
//!    cloud 3.
//! 2. Gateway: ICMP echo is answered (tap and veth guests); other services are dropped.
//! 3. Tap guests send ICMP echo and UDP to 10.0.0.3: only their own cloud's veth guest gets
//!    them (MACs rewritten, TTL decremented, checksums valid); nothing reaches another cloud.
//! 4. Veth guests send UDP and `ping` to 10.0.0.2: only their own cloud's tap gets them.
//! 5. 10.0.0.9 is reachable inside cloud 3 and unroutable (`NoRouteInCloud`) from clouds 1, 2.
//! 6. Spoofed and invalid frames (source MAC, source IP, ARP sender, TTL 1, bypassing the
//!    gateway MAC) are dropped with their reasons and received nowhere.
//! 7. TCP between the two veth guests of cloud 4, a few dozen KiB each way.
//! 8. Creating an endpoint whose name or (cloud, address) already exists fails with the typed
//!    error and leaves nothing behind (no device, no veth peer, no leaked spare tap).
//! 9. Resume from pins: with no `Host` alive the dataplane keeps forwarding and counting drops;
//!    reopening the same pin root lists the same endpoints and rediscovers the spare taps.
//! 10. Deletion: some endpoints with `delete_endpoint`, the rest with `destroy`; afterwards no
//!     device, namespace or pin with this test's prefix remains.
//!
//! Every wait is bounded: `poll(2)` with [`ARRIVE`] for what must arrive, and a [`SILENCE`]
//! window for what must not. There are no sleeps: the frames a tap guest writes are judged
//! synchronously in `write(2)`, and every negative check ends with such a silence window.
//!
//! The test drives everything from one plain thread: the agent's async calls run through
//! `Runtime::block_on` on a multi-thread runtime (which also runs the netlink connection), so the
//! blocking packet I/O never runs on a runtime worker. Sockets are created in the namespaces by
//! short-lived threads that `setns(2)` into them. RAII guards (namespaces, links, pins, spare
//! taps, child processes) clean up on failure too, and the test checks afterwards that nothing
//! with its name prefixes is left.

mod common;

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Instant,
};

use atoll_agent::{
    config::DataplaneConfig,
    dataplane::{layout_dir, DataplaneError},
    device::{self, DeviceError},
    endpoint::{DeviceSpec, Endpoint, EndpointError, EndpointSpec, Host},
    types::CloudId,
};
use atoll_dataplane_common::DropReason;
use atoll_testbed::{unique_name, LinkGuard, PinRoot};
use common::{
    assert_silent, cloud_id, create_tap, create_veth, frame, guest_mac, in_netns, join, pool_links,
    spawn_in_netns, wait_readable, GuestUdp, PoolGuard, Sink, Sniffer, Tags, TapGuest, VethGuest,
    ARRIVE, GATEWAY, KERNEL_TTL, TAP_TTL,
};

const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// Exists only in cloud 3 (as a second tap guest there).
const ONLY_IN_CLOUD3: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
const TAP_PORT: u16 = 40001;
const VETH_PORT: u16 = 40002;
const TCP_PORT: u16 = 40003;
/// Spare taps in the agent's warm pool.
const POOL: u32 = 2;
/// `testbed::unique_name` tags: taps, veths, namespaces, pin root.
const TAGS: Tags = Tags {
    tap: "it",
    veth: "iv",
    netns: "in",
    pins: "ip",
};

/// Drop reasons that guests' or the host's background traffic can trigger on their own
/// (gratuitous ARP, multicast, IPv6, host-stack frames, devices mid-creation). Their deltas are
/// never asserted; every other reason's delta is asserted exactly in every step.
const NOISY: [DropReason; 6] = [
    DropReason::UnknownEndpoint,
    DropReason::ArpNotRequest,
    DropReason::GroupDestinationMac,
    DropReason::GroupDestinationIp,
    DropReason::Ipv6NotSupported,
    DropReason::ToVmForeignFrame,
];

#[test]
fn clouds_are_isolated_end_to_end() {
    common::run_scenario("isolation", &TAGS, scenario);
}

fn scenario() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    // Host::open spawns its netlink connection on this runtime; its async calls are driven with
    // `block_on` from this (plain) thread, which does all the blocking packet I/O.
    let _rt_ctx = rt.enter();
    let pins = PinRoot::new(TAGS.pins);
    let cfg = DataplaneConfig {
        bpffs_root: pins.path().to_path_buf(),
        tap_pool: POOL,
        ..DataplaneConfig::default()
    };
    let mut links: Vec<LinkGuard> = Vec::new();
    let _pool = PoolGuard;
    let mut host = Host::open(&cfg).unwrap_or_else(|e| {
        panic!("Host::open: {e} ({e:?}); the test needs bpffs, CAP_BPF/CAP_NET_ADMIN and TCX")
    });
    let start = drops(&host);
    // The taps of clouds 1 and 2 are claimed from the warm pool, the others are created cold.
    refill_pool(&rt, &mut host);

    let t = Instant::now();
    let mut created = Vec::new();
    let gw_mac = host.gateway_mac().0;
    let mut clouds = Vec::new();
    for n in 1..=3 {
        let (ep, tap) = create_tap(&rt, &mut host, &mut links, &TAGS, n, TAP_IP, gw_mac);
        created.push(ep);
        let (ep, veth) = create_veth(&rt, &mut host, &mut links, &TAGS, n, VETH_IP);
        created.push(ep);
        let udp = GuestUdp::bind(&veth, VETH_PORT);
        let sniffer = Sniffer::open(&veth);
        clouds.push(Cloud {
            n,
            id: cloud_id(n),
            tap,
            veth,
            udp,
            sniffer,
        });
    }
    let (ep, extra) = create_tap(&rt, &mut host, &mut links, &TAGS, 3, ONLY_IN_CLOUD3, gw_mac);
    created.push(ep);
    let (ep_a, pair_a) = create_veth(&rt, &mut host, &mut links, &TAGS, 4, TAP_IP);
    let (ep_b, pair_b) = create_veth(&rt, &mut host, &mut links, &TAGS, 4, VETH_IP);
    created.extend([ep_a, ep_b]);
    created.sort_by_key(|e| e.ifindex);
    assert_eq!(
        host.pool_len(),
        0,
        "clouds 1 and 2 must have claimed both spare taps"
    );
    // Spare taps stay around for the whole test; they must never receive anything either.
    refill_pool(&rt, &mut host);
    let pair_watch = [&pair_a, &pair_b].map(|g| (GuestUdp::bind(g, VETH_PORT), Sniffer::open(g)));
    let world = World {
        clouds,
        extra,
        pair: [pair_a, pair_b],
        pair_watch,
    };
    assert_eq!(
        host.endpoints().expect("listing endpoints"),
        created,
        "endpoints() must list exactly the created endpoints"
    );
    println!(
        "isolation: {} endpoints in 4 clouds created in {:.2?} (pins at {})",
        created.len(),
        t.elapsed(),
        host.dataplane().pin_dir().display()
    );
    assert_drops(&host, &start, &[], "setup");

    step("1 ARP", || arp(&world, &host));
    step("2 gateway", || gateway(&world, &host));
    step("3 tap guests -> 10.0.0.3", || tap_to_veth(&world, &host));
    step("4 veth guests -> 10.0.0.2", || veth_to_tap(&world, &host));
    step("5 address of another cloud", || {
        other_cloud_address(&world, &host)
    });
    step("6 spoofed and invalid frames", || spoofing(&world, &host));
    step("7 TCP in cloud 4", || {
        let before = drops(&host);
        tcp_exchange(&world.pair[0], &world.pair[1], 48 * 1024, 80 * 1024);
        assert_drops(&host, &before, &[], "TCP");
    });
    step("8 duplicates", || {
        duplicates(&rt, &mut host, &world, &mut links)
    });

    let host = step("9 resume from pins", || {
        resume_from_pins(host, &cfg, &world, &created)
    });
    step("10 deletion", || {
        deletion(&rt, host, &pins, &world, &created)
    });
}

/// Fills the tap pool and checks that it holds exactly [`POOL`] spare taps.
fn refill_pool(rt: &tokio::runtime::Runtime, host: &mut Host) {
    rt.block_on(host.refill_pool())
        .unwrap_or_else(|e| panic!("filling the tap pool: {e}"));
    assert_eq!(host.pool_len(), POOL as usize);
    assert_eq!(
        pool_links().len(),
        POOL as usize,
        "spare taps: {:?}",
        pool_links()
    );
}

fn step<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    println!("isolation: step {name} ok ({:.2?})", t.elapsed());
    out
}

// ---------------------------------------------------------------------------------------------
// The clouds

/// One of clouds 1 to 3: a tap guest at 10.0.0.2 and a veth guest at 10.0.0.3.
struct Cloud {
    n: u32,
    id: CloudId,
    tap: TapGuest,
    veth: VethGuest,
    /// Bound to 10.0.0.3:VETH_PORT in the veth guest.
    udp: GuestUdp,
    /// Every frame arriving at the veth guest's eth0.
    sniffer: Sniffer,
}

impl Cloud {
    fn marker(&self, step: &str) -> Vec<u8> {
        marker(step, self.n)
    }
}

struct World {
    clouds: Vec<Cloud>,
    /// Cloud 3's 10.0.0.9.
    extra: TapGuest,
    /// Cloud 4's two veth guests.
    pair: [VethGuest; 2],
    /// Watchers on cloud 4's guests, which must never see any of clouds 1 to 3's traffic.
    pair_watch: [(GuestUdp, Sniffer); 2],
}

impl World {
    /// Everything that must stay silent once a step's expected frames were consumed: every tap,
    /// every veth guest's UDP socket (clouds 1 to 4), and every veth guest for incoming frames
    /// carrying any of the markers `forbidden(cloud)` gives for its cloud.
    fn sinks(&self, forbidden: impl Fn(u32) -> Vec<Vec<u8>>) -> Vec<Sink<'_>> {
        let mut out: Vec<Sink<'_>> = self.clouds.iter().map(|c| Sink::Tap(&c.tap)).collect();
        out.push(Sink::Tap(&self.extra));
        for c in &self.clouds {
            out.push(Sink::Udp(&c.udp));
            out.push(Sink::Sniffer(&c.sniffer, forbidden(c.n)));
        }
        for (udp, sniffer) in &self.pair_watch {
            out.push(Sink::Udp(udp));
            out.push(Sink::Sniffer(sniffer, forbidden(4)));
        }
        out
    }
}

/// For [`World::sinks`]: the markers of `step` of every cloud but the sniffer's own.
fn foreign(step: &str) -> impl Fn(u32) -> Vec<Vec<u8>> + '_ {
    move |n| {
        (1..=3)
            .filter(|&o| o != n)
            .map(|o| marker(step, o))
            .collect()
    }
}

/// A payload unique to a step and cloud, to recognise frames in packet captures.
fn marker(step: &str, cloud: u32) -> Vec<u8> {
    format!(
        "atoll-isolation/{step}/cloud-{cloud}/{}",
        std::process::id()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Steps

fn arp(world: &World, host: &Host) {
    let before = drops(host);
    for c in &world.clouds {
        for target in [GATEWAY, VETH_IP] {
            c.tap.send(&c.tap.arp_request(target));
            c.tap.expect_arp_reply(target);
        }
    }
    // 10.0.0.9 is answered in cloud 3 only.
    let c3 = &world.clouds[2];
    c3.tap.send(&c3.tap.arp_request(ONLY_IN_CLOUD3));
    c3.tap.expect_arp_reply(ONLY_IN_CLOUD3);
    world.extra.send(&world.extra.arp_request(TAP_IP));
    world.extra.expect_arp_reply(TAP_IP);
    for c in &world.clouds[..2] {
        c.tap.send(&c.tap.arp_request(ONLY_IN_CLOUD3));
    }
    // Nobody answers 10.0.0.4, which exists nowhere.
    c3.tap.send(&c3.tap.arp_request(Ipv4Addr::new(10, 0, 0, 4)));
    assert_silent(&world.sinks(foreign("arp")), "ARP for unknown targets");
    assert_drops(host, &before, &[(DropReason::ArpUnknownTarget, 3)], "ARP");
}

fn gateway(world: &World, host: &Host) {
    let before = drops(host);
    for c in &world.clouds {
        assert!(
            c.veth.ping(GATEWAY),
            "{}: ping 10.0.0.1 failed",
            c.veth.label
        );
        let payload = c.marker("gateway");
        c.tap
            .send(&c.tap.icmp_echo(GATEWAY, 0x4700 + c.n as u16, 1, &payload));
        let reply = c
            .tap
            .expect_ipv4("echo reply from the gateway", GATEWAY, TAP_TTL);
        let ip = frame::parse_ipv4(&reply).expect("parsed above");
        let icmp = frame::parse_icmp(&ip).expect("ICMP echo reply");
        assert_eq!(
            (icmp.ty, icmp.code, icmp.id, icmp.seq, icmp.payload),
            (0, 0, 0x4700 + c.n as u16, 1, &payload[..]),
            "gateway echo reply"
        );
        assert!(
            icmp.checksum_ok,
            "gateway echo reply has a bad ICMP checksum"
        );
        // The gateway offers no other service: UDP to it is dropped.
        c.tap
            .send(&c.tap.udp(GATEWAY, TAP_PORT, 53, b"not a service"));
    }
    assert_silent(&world.sinks(foreign("gateway")), "gateway");
    assert_drops(
        host,
        &before,
        &[(DropReason::GatewayServiceUnavailable, 3)],
        "gateway",
    );
}

/// Each tap guest sends ICMP echo and UDP to 10.0.0.3: only its own cloud's veth guest receives
/// them.
fn tap_to_veth(world: &World, host: &Host) {
    let before = drops(host);
    for c in &world.clouds {
        let payload = c.marker("tap-to-veth");
        c.tap
            .send(&c.tap.icmp_echo(VETH_IP, 0x5100 + c.n as u16, 7, &payload));
        let reply = c
            .tap
            .expect_ipv4("echo reply from 10.0.0.3", VETH_IP, KERNEL_TTL - 1);
        let ip = frame::parse_ipv4(&reply).expect("parsed above");
        let icmp = frame::parse_icmp(&ip).expect("ICMP echo reply");
        assert_eq!(
            (icmp.ty, icmp.code, icmp.id, icmp.seq, icmp.payload),
            (0, 0, 0x5100 + c.n as u16, 7, &payload[..]),
            "{}: echo reply from 10.0.0.3",
            c.tap.label
        );
        assert!(icmp.checksum_ok, "echo reply has a bad ICMP checksum");
        udp_tap_to_veth(c, &payload);
    }
    assert_silent(
        &world.sinks(foreign("tap-to-veth")),
        "tap guests -> 10.0.0.3",
    );
    assert_drops(host, &before, &[], "tap guests -> 10.0.0.3");
}

/// Each veth guest sends UDP and pings 10.0.0.2 (answered by the test on the tap): only its own
/// cloud's tap receives them.
fn veth_to_tap(world: &World, host: &Host) {
    let before = drops(host);
    for c in &world.clouds {
        udp_veth_to_tap(c, &c.marker("veth-to-tap"), 17);
        // `ping -p` fills the payload with a pattern naming step and cloud; the sniffers of the
        // other clouds must never see the (echoed) pattern.
        let pattern = format!("a7150b{:02x}", c.n);
        let ping = c.veth.spawn_ping(TAP_IP, &pattern);
        let request = c
            .tap
            .expect_ipv4("echo request from 10.0.0.3", VETH_IP, KERNEL_TTL - 1);
        let ip = frame::parse_ipv4(&request).expect("parsed above");
        let icmp = frame::parse_icmp(&ip).expect("ICMP echo request");
        assert_eq!((icmp.ty, icmp.code), (8, 0), "expected an echo request");
        assert!(icmp.checksum_ok, "echo request has a bad ICMP checksum");
        let reply = c.tap.icmp(VETH_IP, 0, icmp.id, icmp.seq, icmp.payload);
        c.tap.send(&reply);
        ping.expect_success(&format!("{}: ping 10.0.0.2", c.veth.label));
    }
    let sinks = world.sinks(|n| {
        let mut m = foreign("veth-to-tap")(n);
        m.extend(
            (1..=3)
                .filter(|&o| o != n)
                .map(|o| vec![0xa7, 0x15, 0x0b, o as u8]),
        );
        m
    });
    assert_silent(&sinks, "veth guests -> 10.0.0.2");
    assert_drops(host, &before, &[], "veth guests -> 10.0.0.2");
}

/// 10.0.0.9 exists only in cloud 3: reachable there, `NoRouteInCloud` from clouds 1 and 2.
fn other_cloud_address(world: &World, host: &Host) {
    let before = drops(host);
    let c3 = &world.clouds[2];
    let payload = c3.marker("only-in-3");
    c3.tap
        .send(&c3.tap.udp(ONLY_IN_CLOUD3, TAP_PORT, VETH_PORT, &payload));
    let got = world
        .extra
        .expect_ipv4("UDP from cloud 3's 10.0.0.2", TAP_IP, TAP_TTL - 1);
    let ip = frame::parse_ipv4(&got).expect("parsed above");
    let udp = frame::parse_udp(&ip).expect("UDP");
    assert_eq!(
        (udp.sport, udp.dport, udp.payload),
        (TAP_PORT, VETH_PORT, &payload[..])
    );
    assert!(udp.checksum_ok, "UDP checksum after forwarding");
    for c in &world.clouds[..2] {
        let payload = c.marker("only-in-3");
        c.tap
            .send(&c.tap.udp(ONLY_IN_CLOUD3, TAP_PORT, VETH_PORT, &payload));
        c.tap
            .send(&c.tap.icmp_echo(ONLY_IN_CLOUD3, 0x6100, 1, &payload));
    }
    assert_silent(
        &world.sinks(foreign("only-in-3")),
        "address of another cloud",
    );
    assert_drops(
        host,
        &before,
        &[(DropReason::NoRouteInCloud, 4)],
        "address of another cloud",
    );
}

/// Every tap guest sends frames with forged or invalid headers towards its peer and gateway:
/// all are dropped with their reasons and received nowhere (not even by the own cloud).
fn spoofing(world: &World, host: &Host) {
    let before = drops(host);
    let mut sent = BTreeMap::new();
    let mut count = |r: DropReason| *sent.entry(r).or_insert(0u64) += 1;
    for c in &world.clouds {
        let tap = &c.tap;
        let payload = marker("spoof", 0);
        let udp = |src: Ipv4Addr, ttl: u8| {
            frame::ipv4(
                src,
                VETH_IP,
                ttl,
                frame::PROTO_UDP,
                &frame::udp(src, VETH_IP, TAP_PORT, VETH_PORT, &payload),
            )
        };
        // The peer's MAC, another cloud's guest MAC, a random local MAC.
        for src_mac in [
            c.veth.mac.0,
            guest_mac(c.n % 3 + 1, TAP_IP).0,
            [0x02, 1, 2, 3, 4, 5],
        ] {
            tap.send(&frame::ethernet(
                tap.gw_mac,
                src_mac,
                frame::ETH_P_IP,
                &udp(TAP_IP, TAP_TTL),
            ));
            count(DropReason::SpoofedSourceMac);
        }
        // The peer's address, an unused address, the gateway's address.
        for src_ip in [VETH_IP, Ipv4Addr::new(10, 0, 0, 77), GATEWAY] {
            tap.send(&tap.eth_ipv4(&udp(src_ip, TAP_TTL)));
            count(DropReason::SpoofedSourceIp);
        }
        // An echo request to the gateway from the peer's address gets no reply.
        let echo = frame::ipv4(
            VETH_IP,
            GATEWAY,
            TAP_TTL,
            frame::PROTO_ICMP,
            &frame::icmp(8, 0, 1, 1, &payload),
        );
        tap.send(&tap.eth_ipv4(&echo));
        count(DropReason::SpoofedSourceIp);
        // ARP claiming the peer's address.
        let arp = frame::arp(1, tap.mac, VETH_IP, [0; 6], GATEWAY);
        tap.send(&frame::ethernet(
            frame::BROADCAST,
            tap.mac,
            frame::ETH_P_ARP,
            &arp,
        ));
        count(DropReason::ArpSpoofed);
        // Straight to the peer's MAC: there is no shared L2.
        tap.send(&frame::ethernet(
            c.veth.mac.0,
            tap.mac,
            frame::ETH_P_IP,
            &udp(TAP_IP, TAP_TTL),
        ));
        count(DropReason::NotToGatewayMac);
        // TTL 1 cannot be forwarded.
        tap.send(&tap.eth_ipv4(&udp(TAP_IP, 1)));
        count(DropReason::TtlExceeded);
    }
    let sinks = world.sinks(|_| vec![marker("spoof", 0)]);
    assert_silent(&sinks, "spoofed frames");
    let expected: Vec<(DropReason, u64)> = sent.into_iter().collect();
    assert_drops(host, &before, &expected, "spoofed frames");
}

fn duplicates(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    world: &World,
    links: &mut Vec<LinkGuard>,
) {
    let before = drops(host);
    let listed = host.endpoints().expect("listing endpoints");
    let c1 = &world.clouds[0];
    let spec = |name: &str, ip: Ipv4Addr, device: DeviceSpec| EndpointSpec {
        name: name.into(),
        cloud: c1.id,
        ipv4: ip,
        mac: guest_mac(1, ip),
        gateway: GATEWAY,
        device,
    };
    let tap = || DeviceSpec::Tap { owner_uid: None };
    let veth = |peer: &str| DeviceSpec::Veth {
        peer_name: peer.into(),
        netns: c1.veth.ns.path(),
    };
    let no_eth9 = || {
        !c1.veth
            .ns
            .succeeds(&["ip", "link", "show", "eth9"])
            .expect("ip link show")
    };

    // A name that exists, for both device kinds: the typed error, nothing touched.
    for (name, device) in [
        (c1.tap.name.as_str(), tap()),
        (c1.veth.host.as_str(), veth("eth9")),
    ] {
        let err = rt
            .block_on(host.create_endpoint(&spec(name, Ipv4Addr::new(10, 0, 0, 50), device)))
            .expect_err("an existing name must be refused");
        assert!(
            matches!(&err, EndpointError::CreateDevice(DeviceError::Exists(n)) if n == name),
            "existing name {name}: {err:?}"
        );
    }
    assert!(no_eth9(), "a refused veth left its peer in the namespace");

    // An existing (cloud, address): the typed error and no device left behind.
    for (ip, device) in [(VETH_IP, tap()), (TAP_IP, veth("eth9"))] {
        let name = unique_name(if device == tap() { TAGS.tap } else { TAGS.veth });
        links.push(LinkGuard(name.clone()));
        let err = rt
            .block_on(host.create_endpoint(&spec(&name, ip, device)))
            .expect_err("a duplicate (cloud, address) must be refused");
        assert!(
            matches!(
                &err,
                EndpointError::Program {
                    name: n,
                    source: DataplaneError::EntryExists { map: "ROUTES", .. },
                } if *n == name
            ),
            "duplicate {ip} in cloud 1: {err:?}"
        );
        assert!(
            device::ifindex(&name).is_none(),
            "refused endpoint {name} left its device behind"
        );
    }
    assert!(no_eth9(), "a refused veth left its peer in the namespace");
    // The refused tap claimed a spare tap (renamed, then deleted): none may leak.
    assert_eq!(
        pool_links().len(),
        host.pool_len(),
        "a refused tap endpoint leaked a spare tap: {:?}",
        pool_links()
    );
    refill_pool(rt, host);
    assert_eq!(
        host.endpoints().expect("listing endpoints"),
        listed,
        "refused endpoints must not change the endpoint list"
    );
    // The original owners of those addresses still get their traffic.
    udp_tap_to_veth(c1, b"after duplicates: tap -> veth");
    udp_veth_to_tap(c1, b"after duplicates: veth -> tap", 5);
    c1.tap.send(&c1.tap.arp_request(GATEWAY));
    c1.tap.expect_arp_reply(GATEWAY);
    assert_silent(&world.sinks(foreign("duplicates")), "duplicates");
    assert_drops(host, &before, &[], "duplicates");
}

/// Drops the `Host`, checks that the pinned dataplane keeps forwarding and counting with no
/// agent object alive, then reopens the same pin root.
fn resume_from_pins(
    host: Host,
    cfg: &DataplaneConfig,
    world: &World,
    created: &[Endpoint],
) -> Host {
    let gw_mac = host.gateway_mac().0;
    let listed = host.endpoints().expect("listing endpoints");
    assert_eq!(listed, created);
    let spares = host.pool_len();
    let before = drops(&host);
    drop(host);
    let c1 = &world.clouds[0];
    udp_tap_to_veth(c1, b"resume: tap -> veth");
    udp_veth_to_tap(c1, b"resume: veth -> tap", 9);
    assert!(
        c1.veth.ping(GATEWAY),
        "gateway must answer with no agent alive"
    );
    tcp_exchange(&world.pair[0], &world.pair[1], 4096, 4096);
    let c2 = &world.clouds[1];
    c2.tap.send(&frame::ethernet(
        gw_mac,
        c2.veth.mac.0,
        frame::ETH_P_IP,
        &frame::ipv4(
            TAP_IP,
            VETH_IP,
            TAP_TTL,
            frame::PROTO_UDP,
            &frame::udp(TAP_IP, VETH_IP, TAP_PORT, VETH_PORT, b"resume spoof"),
        ),
    ));
    assert_silent(&world.sinks(foreign("resume")), "resume");
    let mut host = Host::open(cfg).unwrap_or_else(|e| panic!("reopening the dataplane: {e}"));
    assert_eq!(
        host.endpoints().expect("listing endpoints after reopening"),
        listed,
        "a reopened Host must list the same endpoints"
    );
    assert_eq!(
        host.pool_len(),
        spares,
        "a reopened Host must rediscover its spare taps"
    );
    assert_eq!(
        host.reconcile().expect("reconcile"),
        0,
        "nothing is stale after a plain restart"
    );
    assert_drops(
        &host,
        &before,
        &[(DropReason::SpoofedSourceMac, 1)],
        "resume (counted with no agent alive)",
    );
    host
}

/// Deletes two endpoints one by one and the rest with `destroy`; checks devices and pins.
fn deletion(
    rt: &tokio::runtime::Runtime,
    mut host: Host,
    pins: &PinRoot,
    world: &World,
    created: &[Endpoint],
) {
    let links_dir = layout_dir(pins.path()).join("links");
    let tap1 = &world.clouds[0].tap;
    let tap1_index = device::ifindex(&tap1.name).expect("tap of cloud 1 exists");
    rt.block_on(host.delete_endpoint(&tap1.name))
        .unwrap_or_else(|e| panic!("deleting {}: {e}", tap1.name));
    assert!(device::ifindex(&tap1.name).is_none(), "tap still exists");
    for suffix in ["in", "out"] {
        let pin = links_dir.join(format!("{tap1_index}-{suffix}"));
        assert!(!pin.exists(), "{} still pinned", pin.display());
    }
    assert!(
        !world.clouds[0].veth.ping(TAP_IP),
        "cloud 1's 10.0.0.2 was deleted but still answers"
    );
    let veth2 = &world.clouds[1].veth;
    rt.block_on(host.delete_endpoint(&veth2.host))
        .unwrap_or_else(|e| panic!("deleting {}: {e}", veth2.host));
    assert!(device::ifindex(&veth2.host).is_none(), "veth still exists");
    assert!(
        !veth2
            .ns
            .succeeds(&["ip", "link", "show", "eth0"])
            .expect("ip link show"),
        "the guest side of a deleted veth must be gone"
    );
    let gone = [tap1.name.clone(), veth2.host.clone()];
    let remaining: Vec<Endpoint> = created
        .iter()
        .filter(|e| !gone.contains(e.name.as_ref().expect("named")))
        .cloned()
        .collect();
    assert_eq!(host.endpoints().expect("listing endpoints"), remaining);
    let err = rt
        .block_on(host.delete_endpoint("atlnosuchdev"))
        .expect_err("deleting a missing endpoint must fail");
    assert!(
        matches!(&err, EndpointError::NotFound(n) if n == "atlnosuchdev"),
        "{err:?}"
    );
    let totals: Vec<String> = drops(&host)
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{} {n}", r.name()))
        .collect();
    println!("isolation: drop counters at the end: {}", totals.join(", "));
    rt.block_on(host.destroy())
        .unwrap_or_else(|e| panic!("destroy: {e}"));
    for ep in created {
        let name = ep.name.as_deref().expect("named");
        assert!(
            device::ifindex(name).is_none(),
            "{name} survived Host::destroy"
        );
    }
    assert!(
        !layout_dir(pins.path()).exists(),
        "destroy must remove the pinned layout"
    );
    assert_eq!(
        pool_links(),
        Vec::<String>::new(),
        "spare taps survived Host::destroy"
    );
}

/// UDP from the cloud's tap guest to its veth guest: checked on the guest's socket and, for the
/// rewritten headers, on its packet socket.
fn udp_tap_to_veth(c: &Cloud, payload: &[u8]) {
    c.tap
        .send(&c.tap.udp(VETH_IP, TAP_PORT, VETH_PORT, payload));
    let (got, from) = c.udp.recv("UDP from the tap guest");
    assert_eq!(
        (&got[..], from),
        (payload, SocketAddr::from((TAP_IP, TAP_PORT))),
        "{}: datagram from the tap guest",
        c.veth.label
    );
    let seen = c.sniffer.expect_marked(payload);
    let eth = frame::parse_eth(&seen).expect("Ethernet");
    assert_eq!(
        (eth.dst, eth.src),
        (c.veth.mac.0, c.tap.gw_mac),
        "{}: MACs of a forwarded frame",
        c.veth.label
    );
    let ip = frame::parse_ipv4(eth.payload).expect("IPv4");
    assert_eq!((ip.src, ip.dst, ip.ttl), (TAP_IP, VETH_IP, TAP_TTL - 1));
    assert!(
        ip.header_checksum_ok,
        "IPv4 header checksum after the TTL decrement"
    );
}

/// UDP from the cloud's veth guest (TTL `ttl`) to its tap guest.
fn udp_veth_to_tap(c: &Cloud, payload: &[u8], ttl: u32) {
    c.udp.sock.set_ttl(ttl).expect("IP_TTL");
    c.udp
        .sock
        .send_to(payload, (TAP_IP, TAP_PORT))
        .expect("sending UDP from the veth guest");
    let got = c
        .tap
        .expect_ipv4("UDP from 10.0.0.3", VETH_IP, ttl as u8 - 1);
    let ip = frame::parse_ipv4(&got).expect("parsed above");
    assert_eq!(ip.protocol, frame::PROTO_UDP);
    let udp = frame::parse_udp(&ip).expect("UDP");
    assert_eq!(
        (udp.sport, udp.dport, udp.payload),
        (VETH_PORT, TAP_PORT, payload),
        "{}: datagram from the veth guest",
        c.tap.label
    );
    assert!(
        udp.checksum != 0 && udp.checksum_ok,
        "{}: UDP checksum {:#06x} of the veth guest's datagram is not complete and valid",
        c.tap.label,
        udp.checksum
    );
}

/// A TCP connection from `b` to `a` (both in cloud 4): `up` bytes to the server, `down` back.
fn tcp_exchange(a: &VethGuest, b: &VethGuest, up: usize, down: usize) {
    let server_ip = a.ip;
    let listener = in_netns(&a.ns, move || TcpListener::bind((server_ip, TCP_PORT)))
        .expect("TCP listen in cloud 4");
    listener.set_nonblocking(true).expect("O_NONBLOCK");
    let to_server = pattern(up, 1);
    let to_client = pattern(down, 2);
    let reply = to_client.clone();
    let server = thread::spawn(move || -> io::Result<(Vec<u8>, SocketAddr)> {
        if wait_readable(&[listener.as_raw_fd()], ARRIVE * 2).is_empty() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no TCP connection"));
        }
        let (mut s, peer) = listener.accept()?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(ARRIVE * 2))?;
        s.set_write_timeout(Some(ARRIVE * 2))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(&reply)?;
        s.shutdown(Shutdown::Write)?;
        Ok((got, peer))
    });
    let sent = to_server.clone();
    let client = spawn_in_netns(&b.ns, move || -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((server_ip, TCP_PORT)), ARRIVE)?;
        s.set_read_timeout(Some(ARRIVE * 2))?;
        s.set_write_timeout(Some(ARRIVE * 2))?;
        s.write_all(&sent)?;
        s.shutdown(Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    let client_got = join(client).expect("TCP client in cloud 4");
    let (server_got, peer) = join(server).expect("TCP server in cloud 4");
    assert_eq!(
        peer,
        SocketAddr::from((b.ip, peer.port())),
        "TCP peer address"
    );
    assert!(
        server_got == to_server,
        "server received {} of {up} bytes, or wrong ones",
        server_got.len()
    );
    assert!(
        client_got == to_client,
        "client received {} of {down} bytes, or wrong ones",
        client_got.len()
    );
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251 + seed * 7) % 251) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Drop counters

fn drops(host: &Host) -> BTreeMap<DropReason, u64> {
    host.dataplane()
        .drop_counters()
        .expect("reading drop counters")
        .into_iter()
        .collect()
}

/// Asserts the change of every non-[`NOISY`] counter since `before`: `expected` for the listed
/// reasons, zero for all others.
fn assert_drops(
    host: &Host,
    before: &BTreeMap<DropReason, u64>,
    expected: &[(DropReason, u64)],
    what: &str,
) {
    let after = drops(host);
    let mut wrong = Vec::new();
    for r in DropReason::ALL {
        let delta = after[&r] - before[&r];
        let want = expected
            .iter()
            .find(|(e, _)| *e == r)
            .map_or(0, |(_, n)| *n);
        assert!(
            !NOISY.contains(&r) || want == 0,
            "test bug: {r:?} is noisy and cannot be asserted"
        );
        if !NOISY.contains(&r) && delta != want {
            wrong.push(format!("{}: {delta} (expected {want})", r.name()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: wrong drop counts: {}",
        wrong.join(", ")
    );
}
