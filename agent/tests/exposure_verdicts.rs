//! Verdict tests for cross-cloud exposures (`dataplane-ebpf/src/exposure.rs`): the NAT in
//! `from_vm` from a consumer to a VIP and from a provider's backend back to the NAT address,
//! run in the kernel with `BPF_PROG_TEST_RUN` on hand-built frames, in the style of
//! `verdicts.rs` and `dns_verdicts.rs`.
//!
//! Unlike those, every test opens a private *pinned* dataplane (`Host::open` on its own
//! `PinRoot`, removed on drop; the host's pins are never touched), so the maps are programmed
//! exactly as the agent programs them: `Dataplane::set_vip` / `remove_vip`,
//! `Host::apply_service`, and the flows are read back with `Dataplane::flows_out` /
//! `flows_in`. The programs are the pinned `from_vm` / `to_vm`; a second handle on the pinned
//! `FLOWS_IN` / `FLOWS_OUT` lets tests occupy NAT ports and simulate LRU evictions.
//!
//! Each run checks:
//! - the verdict (`TC_ACT_SHOT` = 2, `TC_ACT_REDIRECT` = 7) and that exactly the expected drop
//!   reason moved by one, host-wide (`DROPS`) and in the sender's own counters, or none moved;
//! - for translations, the whole output frame byte for byte against an independently built
//!   frame (`atoll_testbed::frame`: addresses, ports, MACs, TTL - 1, IPv4 header and
//!   UDP/TCP checksums computed from scratch), and that it parses with valid checksums;
//! - the flow entries and the `exposure` traffic counters of both endpoints.
//!
//! Test-run facts (see `verdicts.rs`): the skb's device is loopback, ifindex 1, so the sender
//! under test is whichever identity the test put at `ENDPOINTS[1]` (consumer or backend); the
//! redirect target is not exposed, so "redirected to the backend" is checked through the
//! destination MAC and the counter slot of the backend's `NextHop` (each guest has its own
//! MAC and slot). The test run hands the program `CHECKSUM_NONE` skbs and `__sk_buff` cannot
//! make one `CHECKSUM_PARTIAL`; frames with partial checksums (veth guests) are covered by the
//! end-to-end test `exposure.rs` with real TCP and UDP sockets.
//!
//! The backend choice and the alternative NAT ports are predicted with the very hash the
//! programs run (`flow_hash`, `nat_port_candidate` in `atoll-dataplane-common`); the tests
//! assert the predictions against what the loaded programs do.
//!
//! The tests need root (CAP_BPF, CAP_NET_ADMIN); they fail, never skip, without it.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use atoll_agent::{
    config::DataplaneConfig,
    dataplane::DataplaneError,
    dataplane::{Dataplane, MAP_FLOWS_IN, MAP_FLOWS_OUT, PROG_FROM_VM, PROG_TO_VM},
    endpoint::{Host, ServiceSpec, PROTOCOL_TCP, PROTOCOL_UDP},
    types::CloudId,
};
use atoll_dataplane_common::{
    cache_slot, flow_hash, ipv4_to_map, nat_port_candidate, Backend, Direction, DropReason,
    EndpointInfo, FlowIn, FlowKey, FlowOut, NextHop, RouteKey, TrafficClass, VipService,
    CACHE_CREDIT, MAX_BACKENDS, NAT_PORT_TRIES, NEXTHOP_ENDPOINT, NEXTHOP_VIP,
};
use atoll_testbed::{
    frame::{self, Tcp, Udp, TCP_ACK, TCP_PSH},
    PinRoot,
};
use aya::{
    maps::{HashMap, MapData},
    programs::SchedClassifier,
};

// ---------------------------------------------------------------------------------------------
// Topology.
// ---------------------------------------------------------------------------------------------

const TEST_IFINDEX: u32 = 1;
use atoll_testbed::verdict::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

const CONSUMER: u32 = 1;
const PROVIDER: u32 = 2;
const STRANGER: u32 = 3;

const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GW_MAC: [u8; 6] = [0x02, 0xa7, 0, 0, 0, 0x01];

/// A guest endpoint: its identity and the next hop its route points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Guest {
    cloud: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    /// Counter slot and ifindex of its route (the device a redirect to it would use).
    slot: u32,
}

impl Guest {
    fn info(self) -> EndpointInfo {
        EndpointInfo {
            cloud: self.cloud,
            ipv4: map_ip(self.ip),
            gateway_ipv4: map_ip(GW_IP),
            mac: self.mac,
            gateway_mac: GW_MAC,
            slot: self.slot,
        }
    }

    fn hop(self) -> NextHop {
        NextHop {
            ifindex: 100 + self.slot,
            slot: self.slot,
            mac: self.mac,
            flags: NEXTHOP_ENDPOINT,
        }
    }
}

/// The consumer (cloud 1).
const A: Guest = Guest {
    cloud: CONSUMER,
    ip: Ipv4Addr::new(10, 0, 0, 2),
    mac: [0x02, 0xa7, 0x01, 0, 0, 0x02],
    slot: 1,
};
/// Backends (cloud 2). B1 has the consumer's address: the clouds overlap.
const B1: Guest = Guest {
    cloud: PROVIDER,
    ip: Ipv4Addr::new(10, 0, 0, 2),
    mac: [0x02, 0xa7, 0x02, 0, 0, 0x02],
    slot: 21,
};
const B2: Guest = Guest {
    cloud: PROVIDER,
    ip: Ipv4Addr::new(10, 0, 0, 3),
    mac: [0x02, 0xa7, 0x02, 0, 0, 0x03],
    slot: 22,
};
/// A third cloud with no grant.
const C: Guest = Guest {
    cloud: STRANGER,
    ip: Ipv4Addr::new(10, 0, 0, 9),
    mac: [0x02, 0xa7, 0x03, 0, 0, 0x09],
    slot: 31,
};

/// A provider address with no endpoint.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 77);

/// The two transport protocols and their services: TCP VIP 10.0.0.200:80 → backends :8080
/// (NAT 10.0.0.250, grant 1); UDP VIP 10.0.0.201:53 → backends :5353 (NAT 10.0.0.251,
/// grant 2). Both services have B1 and B2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

const BOTH: [Proto; 2] = [Proto::Udp, Proto::Tcp];

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Udp => PROTOCOL_UDP,
            Proto::Tcp => PROTOCOL_TCP,
        }
    }

    fn vip(self) -> Ipv4Addr {
        match self {
            Proto::Udp => Ipv4Addr::new(10, 0, 0, 201),
            Proto::Tcp => Ipv4Addr::new(10, 0, 0, 200),
        }
    }

    fn nat(self) -> Ipv4Addr {
        match self {
            Proto::Udp => Ipv4Addr::new(10, 0, 0, 251),
            Proto::Tcp => Ipv4Addr::new(10, 0, 0, 250),
        }
    }

    fn port(self) -> u16 {
        match self {
            Proto::Udp => 53,
            Proto::Tcp => 80,
        }
    }

    fn backend_port(self) -> u16 {
        match self {
            Proto::Udp => 5353,
            Proto::Tcp => 8080,
        }
    }

    fn grant(self) -> u32 {
        match self {
            Proto::Udp => 2,
            Proto::Tcp => 1,
        }
    }

    fn other(self) -> Proto {
        match self {
            Proto::Udp => Proto::Tcp,
            Proto::Tcp => Proto::Udp,
        }
    }

    /// The standard service of this protocol with `backends` (at `backend_port`).
    fn service(self, grant: u32, backends: &[Guest]) -> VipService {
        let list: Vec<(Ipv4Addr, u16)> = backends
            .iter()
            .map(|b| (b.ip, self.backend_port()))
            .collect();
        service(grant, self, self.nat(), &list)
    }
}

fn service(grant: u32, p: Proto, nat: Ipv4Addr, backends: &[(Ipv4Addr, u16)]) -> VipService {
    assert!(backends.len() <= MAX_BACKENDS);
    let mut svc = VipService {
        grant,
        provider: PROVIDER,
        nat_ipv4: map_ip(nat),
        port: p.port().to_be(),
        protocol: p.number(),
        count: backends.len() as u8,
        backends: [Backend::default(); MAX_BACKENDS],
    };
    for (slot, (ip, port)) in svc.backends.iter_mut().zip(backends) {
        *slot = Backend {
            ipv4: map_ip(*ip),
            port: port.to_be(),
            _pad: 0,
        };
    }
    svc
}

fn map_ip(ip: Ipv4Addr) -> u32 {
    ipv4_to_map(ip.octets())
}

fn cloud(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

// ---------------------------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------------------------

/// A UDP datagram or TCP segment (PSH|ACK, fixed sequence numbers) between two addresses.
fn l4_frame(
    p: Proto,
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    match p {
        Proto::Udp => Udp {
            src_mac,
            dst_mac,
            src,
            dst,
            sport,
            dport,
        }
        .frame(payload),
        Proto::Tcp => Tcp {
            src_mac,
            dst_mac,
            src,
            dst,
            sport,
            dport,
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            flags: TCP_PSH | TCP_ACK,
        }
        .frame(payload),
    }
}

/// The consumer A's packet from `sport` to the service's VIP and port.
fn to_vip(p: Proto, sport: u16, payload: &[u8]) -> Vec<u8> {
    l4_frame(
        p,
        (A.mac, GW_MAC),
        (A.ip, sport),
        (p.vip(), p.port()),
        payload,
    )
}

/// Backend `b`'s reply from the service's backend port to `nat_port` of the NAT address.
fn to_nat(p: Proto, b: Guest, nat_port: u16, payload: &[u8]) -> Vec<u8> {
    l4_frame(
        p,
        (b.mac, GW_MAC),
        (b.ip, p.backend_port()),
        (p.nat(), nat_port),
        payload,
    )
}

/// `f` with its TTL set to `ttl` (header checksum recomputed).
fn with_ttl(mut f: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame::set_ttl(&mut f, ttl);
    f
}

/// Addressing of a parsed UDP or TCP frame, and whether both checksums verify.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    ttl: u8,
    checksums_ok: bool,
}

fn seen(p: Proto, f: &[u8]) -> Seen {
    match p {
        Proto::Udp => {
            let x = frame::parse_udp(f).unwrap_or_else(|e| panic!("{e}: {f:02x?}"));
            Seen {
                macs: (x.addr.src_mac, x.addr.dst_mac),
                src: (x.addr.src, x.addr.sport),
                dst: (x.addr.dst, x.addr.dport),
                ttl: x.ttl,
                checksums_ok: x.ip_checksum_ok && x.udp_checksum_ok,
            }
        }
        Proto::Tcp => {
            let x = frame::parse_tcp(f).unwrap_or_else(|e| panic!("{e}: {f:02x?}"));
            Seen {
                macs: (x.addr.src_mac, x.addr.dst_mac),
                src: (x.addr.src, x.addr.sport),
                dst: (x.addr.dst, x.addr.dport),
                ttl: x.ttl,
                checksums_ok: x.ip_checksum_ok && x.tcp_checksum_ok,
            }
        }
    }
}

/// Applies `edit` to the IPv4 header and payload of `f` (from byte 14), then recomputes the
/// header checksum, so only what `edit` did is wrong.
fn edit_ipv4(mut f: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut ip = f.split_off(14);
    edit(&mut ip);
    f.extend_from_slice(&ip);
    frame::refresh_ipv4_checksum(&mut f);
    f
}

/// Sets the IPv4 total length.
fn set_total_len(ip: &mut [u8], len: usize) {
    ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// The programs' choices, predicted with the shared code they run (`atoll-dataplane-common`).
// ---------------------------------------------------------------------------------------------

/// The NAT ports `open_flow` tries, in order: the consumer's own port, then the alternatives.
fn nat_port_candidates(key: &FlowKey) -> [u16; NAT_PORT_TRIES as usize] {
    let hash = flow_hash(key);
    let mut c = [u16::from_be(key.src_port); NAT_PORT_TRIES as usize];
    for (attempt, port) in c.iter_mut().enumerate().skip(1) {
        *port = nat_port_candidate(hash, attempt as u32);
    }
    c
}

/// The consumer A's flow key for `sport` → the service of `p`.
fn consumer_key(p: Proto, sport: u16) -> FlowKey {
    flow_key(CONSUMER, (A.ip, sport), (p.vip(), p.port()), p)
}

/// The provider's key of a reply from backend `b` to `nat_port`.
fn reply_key(p: Proto, b: Guest, nat_port: u16) -> FlowKey {
    flow_key(PROVIDER, (b.ip, p.backend_port()), (p.nat(), nat_port), p)
}

fn flow_key(cloud: u32, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), p: Proto) -> FlowKey {
    FlowKey {
        cloud,
        src_ipv4: map_ip(src.0),
        dst_ipv4: map_ip(dst.0),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
        protocol: p.number(),
        _pad: [0; 3],
    }
}

/// The backend the kernel picks for `key` among `backends` (in service order).
fn predicted_backend(key: &FlowKey, backends: &[Guest]) -> Guest {
    backends[(flow_hash(key) % backends.len() as u32) as usize]
}

// ---------------------------------------------------------------------------------------------
// The dataplane under test.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Prog {
    FromVm,
    ToVm,
}

struct Run {
    ret: u32,
    out: Vec<u8>,
    /// Host-wide drop counters that moved, by how much.
    drops: BTreeMap<DropReason, u64>,
    /// The sender's own drop counters that moved.
    sender_drops: BTreeMap<DropReason, u64>,
}

/// A private pinned dataplane (see module docs) with the standard topology.
struct Plane {
    host: Host,
    from_vm: SchedClassifier,
    to_vm: SchedClassifier,
    /// Second handles on the pinned flow maps, for what the agent never does itself.
    flows_in: HashMap<MapData, FlowKey, FlowIn>,
    flows_out: HashMap<MapData, FlowKey, FlowOut>,
    /// The identity at `ENDPOINTS[1]`.
    sender: Guest,
    _rt: tokio::runtime::Runtime,
    // Last: the pins go once every handle above is closed.
    _pins: PinRoot,
}

impl Plane {
    /// A, B1, B2 and C with their routes, the TCP and UDP services (B1 and B2 each), and A
    /// sending.
    fn new() -> Self {
        support::require_root();
        let pins = PinRoot::new("ev");
        let cfg = DataplaneConfig {
            bpffs_root: pins.path().into(),
            max_endpoints: 64,
            max_routes: 64,
            max_vips: 64,
            max_flows: 4096,
            tap_pool: 0,
            ..DataplaneConfig::default()
        };
        // The host's netlink connection (unused here) needs a runtime to register with.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut host = {
            let _entered = rt.enter();
            Host::open(&cfg).expect("opening a private pinned dataplane")
        };
        let dir = host.dataplane().pin_dir().to_path_buf();
        let prog = |name: &str| {
            SchedClassifier::from_pin(dir.join("progs").join(name))
                .unwrap_or_else(|e| panic!("opening pinned {name}: {e}"))
        };
        fn map<V: aya::Pod>(dir: &std::path::Path, name: &str) -> HashMap<MapData, FlowKey, V> {
            MapData::from_pin(dir.join("maps").join(name))
                .and_then(aya::maps::Map::from_map_data)
                .and_then(HashMap::try_from)
                .unwrap_or_else(|e| panic!("opening pinned {name}: {e}"))
        }
        let (from_vm, to_vm) = (prog(PROG_FROM_VM), prog(PROG_TO_VM));
        let (flows_in, flows_out) = (map(&dir, MAP_FLOWS_IN), map(&dir, MAP_FLOWS_OUT));
        let dp = host.dataplane_mut();
        for g in [A, B1, B2, C] {
            dp.insert_route(
                RouteKey {
                    cloud: g.cloud,
                    ipv4: map_ip(g.ip),
                },
                g.hop(),
            )
            .expect("route");
        }
        dp.insert_endpoint(TEST_IFINDEX, A.info())
            .expect("endpoint");
        // The providers' guests on devices of their own, as the agent writes them: an
        // established flow's cached path checks its backend's device in `ENDPOINT_CACHE`.
        for g in [B1, B2, C] {
            dp.insert_endpoint(g.hop().ifindex, g.info())
                .expect("backend endpoint");
        }
        let mut plane = Plane {
            host,
            from_vm,
            to_vm,
            flows_in,
            flows_out,
            sender: A,
            _rt: rt,
            _pins: pins,
        };
        for p in BOTH {
            plane.set_vip(p.vip(), p.service(p.grant(), &[B1, B2]));
        }
        plane
    }

    fn dp(&self) -> &Dataplane {
        self.host.dataplane()
    }

    fn set_vip(&mut self, vip: Ipv4Addr, svc: VipService) {
        self.host
            .dataplane_mut()
            .set_vip(CONSUMER, map_ip(vip), svc)
            .expect("set_vip");
    }

    /// Puts `g`'s identity on the test device: the next runs are `g` sending.
    fn send_as(&mut self, g: Guest) {
        if self.sender == g {
            return;
        }
        let dp = self.host.dataplane_mut();
        dp.remove_endpoint(TEST_IFINDEX).expect("removing endpoint");
        dp.insert_endpoint(TEST_IFINDEX, g.info())
            .expect("inserting endpoint");
        self.sender = g;
    }

    fn remove_route(&mut self, cloud: u32, ip: Ipv4Addr) {
        self.host
            .dataplane_mut()
            .remove_route(RouteKey {
                cloud,
                ipv4: map_ip(ip),
            })
            .expect("removing route");
    }

    fn sender_drops(&self) -> [u64; atoll_dataplane_common::DROP_SLOTS as usize] {
        self.dp()
            .counters(self.sender.slot)
            .expect("counters")
            .drops
    }

    fn run(&self, prog: Prog, frame: &[u8], what: &str) -> Run {
        let classifier = match prog {
            Prog::FromVm => &self.from_vm,
            Prog::ToVm => &self.to_vm,
        };
        let sender_before = self.sender_drops();
        let r = atoll_testbed::verdict::run(
            classifier,
            &format!("{prog:?}"),
            frame,
            || self.dp().drop_counters().expect("DROPS"),
            what,
        );
        let sender_after = self.sender_drops();
        Run {
            ret: r.ret,
            out: r.out,
            drops: r.drops,
            sender_drops: DropReason::ALL
                .iter()
                .map(|r| (*r, sender_after[*r as usize] - sender_before[*r as usize]))
                .filter(|(_, n)| *n != 0)
                .collect(),
        }
    }

    /// Asserts `from_vm` drops `frame` and counts it once under `reason`, host-wide and for
    /// the sender, and under nothing else.
    fn expect_drop(&self, frame: &[u8], reason: DropReason, what: &str) {
        let r = self.run(Prog::FromVm, frame, what);
        let once = BTreeMap::from([(reason, 1)]);
        assert_eq!(
            (r.ret, &r.drops, &r.sender_drops),
            (TC_ACT_SHOT, &once, &once),
            "{what}: from_vm should drop with {reason:?} (sender {:?})\nframe: {frame:02x?}",
            self.sender,
        );
    }

    /// Asserts `from_vm` redirects `frame` without counting a drop; returns the output.
    fn expect_redirect(&self, frame: &[u8], what: &str) -> Vec<u8> {
        let r = self.run(Prog::FromVm, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_REDIRECT, &BTreeMap::new()),
            "{what}: from_vm should redirect without drops (sender {:?})\nframe: {frame:02x?}",
            self.sender,
        );
        assert_eq!(r.out.len(), frame.len(), "{what}: the length changed");
        r.out
    }

    fn flows_out(&self) -> BTreeMap<Key, FlowOut> {
        self.dp()
            .flows_out()
            .expect("flows_out")
            .into_iter()
            .map(|(k, v)| (Key(k), v))
            .collect()
    }

    fn flows_in(&self) -> BTreeMap<Key, FlowIn> {
        self.dp()
            .flows_in()
            .expect("flows_in")
            .into_iter()
            .map(|(k, v)| (Key(k), v))
            .collect()
    }

    /// Occupies a NAT port: a `FLOWS_IN` entry of another consumer flow at `key`.
    fn occupy(&mut self, key: FlowKey) {
        let other = FlowIn {
            grant: 77,
            consumer_cloud: CONSUMER,
            consumer_ipv4: map_ip(Ipv4Addr::new(10, 0, 0, 99)),
            vip: map_ip(Ipv4Addr::new(10, 0, 0, 99)),
            consumer_port: 9u16.to_be(),
            vip_port: 9u16.to_be(),
        };
        self.flows_in.insert(key, other, 0).expect("FLOWS_IN");
    }

    /// Non-zero traffic counters of `slot`: `(direction, class) → (packets, bytes)`.
    fn traffic(&self, slot: u32) -> BTreeMap<(Direction, TrafficClass), (u64, u64)> {
        let c = self.dp().counters(slot).expect("counters");
        let mut out = BTreeMap::new();
        for d in [Direction::FromGuest, Direction::ToGuest] {
            for t in TrafficClass::ALL {
                let x = c.traffic[d as usize][t as usize];
                if x.packets != 0 || x.bytes != 0 {
                    out.insert((d, t), (x.packets, x.bytes));
                }
            }
        }
        out
    }
}

/// `FlowKey` ordered for maps of expected entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key(FlowKey);

impl Key {
    fn tuple(&self) -> (u32, u32, u32, u16, u16, u8) {
        let k = self.0;
        (
            k.cloud, k.src_ipv4, k.dst_ipv4, k.src_port, k.dst_port, k.protocol,
        )
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

fn flow_out(grant: u32, backend: (Ipv4Addr, u16), nat_port: u16) -> FlowOut {
    FlowOut {
        grant,
        backend_ipv4: map_ip(backend.0),
        backend_port: backend.1.to_be(),
        nat_port: nat_port.to_be(),
    }
}

fn flow_in(p: Proto, grant: u32, consumer_port: u16) -> FlowIn {
    FlowIn {
        grant,
        consumer_cloud: CONSUMER,
        consumer_ipv4: map_ip(A.ip),
        vip: map_ip(p.vip()),
        consumer_port: consumer_port.to_be(),
        vip_port: p.port().to_be(),
    }
}

/// The frame A's packet must become on its way to backend `b` from `nat_port`.
fn translated_to_backend(p: Proto, b: Guest, nat_port: u16, payload: &[u8]) -> Vec<u8> {
    with_ttl(
        l4_frame(
            p,
            (GW_MAC, b.mac),
            (p.nat(), nat_port),
            (b.ip, p.backend_port()),
            payload,
        ),
        63,
    )
}

/// The frame backend `b`'s reply must become on its way to A at `consumer_port`.
fn translated_to_consumer(p: Proto, consumer_port: u16, payload: &[u8]) -> Vec<u8> {
    with_ttl(
        l4_frame(
            p,
            (GW_MAC, A.mac),
            (p.vip(), p.port()),
            (A.ip, consumer_port),
            payload,
        ),
        63,
    )
}

fn exposure_counters(
    from: (u64, u64),
    to: (u64, u64),
) -> BTreeMap<(Direction, TrafficClass), (u64, u64)> {
    let mut m = BTreeMap::new();
    if from.0 != 0 {
        m.insert((Direction::FromGuest, TrafficClass::Exposure), from);
    }
    if to.0 != 0 {
        m.insert((Direction::ToGuest, TrafficClass::Exposure), to);
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Consumer → VIP.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_first_packet_goes_to_a_backend_from_the_nat_address() {
    let plane = Plane::new();
    let mut a_bytes = 0;
    let mut backend_bytes = BTreeMap::new();
    for p in BOTH {
        let sport = 40000;
        let key = consumer_key(p, sport);
        let b = predicted_backend(&key, &[B1, B2]);
        // UDP: a datagram; TCP: a SYN, as a connection starts.
        let (frame, expected) = match p {
            Proto::Udp => (
                to_vip(p, sport, b"first datagram"),
                translated_to_backend(p, b, sport, b"first datagram"),
            ),
            Proto::Tcp => {
                let syn = Tcp::syn(A.mac, GW_MAC, (A.ip, sport), (p.vip(), p.port()));
                let translated = Tcp {
                    src_mac: GW_MAC,
                    dst_mac: b.mac,
                    src: p.nat(),
                    dst: b.ip,
                    dport: p.backend_port(),
                    ..syn
                };
                (syn.frame(&[]), with_ttl(translated.frame(&[]), 63))
            }
        };
        let what = format!("{p:?} A:{sport} → VIP");
        let out = plane.expect_redirect(&frame, &what);
        assert_eq!(
            out,
            expected,
            "{what}: to backend {b:?} from NAT {}:{sport}, TTL 63, checksums from scratch",
            p.nat()
        );
        assert_eq!(
            seen(p, &out),
            Seen {
                macs: (GW_MAC, b.mac),
                src: (p.nat(), sport),
                dst: (b.ip, p.backend_port()),
                ttl: 63,
                checksums_ok: true,
            },
            "{what}"
        );
        // Both views of the flow are recorded.
        assert_eq!(
            plane.flows_out().get(&Key(key)),
            Some(&flow_out(p.grant(), (b.ip, p.backend_port()), sport)),
            "{what}: FLOWS_OUT"
        );
        assert_eq!(
            plane.flows_in().get(&Key(reply_key(p, b, sport))),
            Some(&flow_in(p, p.grant(), sport)),
            "{what}: FLOWS_IN"
        );
        // Metered as exposure: A from the guest, the backend to the guest.
        a_bytes += frame.len() as u64;
        let n = if p == Proto::Udp { 1 } else { 2 };
        assert_eq!(
            plane.traffic(A.slot),
            exposure_counters((n, a_bytes), (0, 0)),
            "{what}: A's counters"
        );
        let to = backend_bytes.entry(b.slot).or_insert((0, 0));
        *to = (to.0 + 1, to.1 + frame.len() as u64);
        for g in [B1, B2] {
            let to = backend_bytes.get(&g.slot).copied().unwrap_or((0, 0));
            assert_eq!(
                plane.traffic(g.slot),
                exposure_counters((0, 0), to),
                "{what}: {g:?}'s counters"
            );
        }
    }
    assert_eq!(plane.flows_out().len(), 2);
    assert_eq!(plane.flows_in().len(), 2);
}

#[test]
fn translations_keep_checksums_exact_across_many_flows() {
    // Source ports and payload words walk both checksums through many values, including the
    // carries an incremental update must wrap around; every output is compared with a frame
    // built from scratch.
    let plane = Plane::new();
    for p in BOTH {
        for i in 0..600u16 {
            let sport = 1 + i.wrapping_mul(109);
            let payload = [(i >> 8) as u8, i as u8, 0xff, 0x00, (i * 7) as u8];
            let frame = to_vip(p, sport, &payload[..usize::from(i % 6)]);
            let what = format!("{p:?} A:{sport}, payload {i}");
            let out = plane.expect_redirect(&frame, &what);
            let b = predicted_backend(&consumer_key(p, sport), &[B1, B2]);
            assert_eq!(
                out,
                translated_to_backend(p, b, sport, &payload[..usize::from(i % 6)]),
                "{what}"
            );
            assert!(seen(p, &out).checksums_ok, "{what}");
        }
    }
}

#[test]
fn a_zero_udp_checksum_stays_zero_both_ways() {
    let mut plane = Plane::new();
    let p = Proto::Udp;
    let mut frame = to_vip(p, 40000, b"no checksum");
    frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let out = plane.expect_redirect(&frame, "UDP without checksum to the VIP");
    assert_eq!(
        out[40..42],
        [0, 0],
        "a zero UDP checksum (none) must stay zero"
    );
    let b = predicted_backend(&consumer_key(p, 40000), &[B1, B2]);
    let mut expected = translated_to_backend(p, b, 40000, b"no checksum");
    expected[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(out, expected);
    plane.send_as(b);
    let mut reply = to_nat(p, b, 40000, b"none back");
    reply[40..42].copy_from_slice(&[0, 0]);
    let out = plane.expect_redirect(&reply, "UDP reply without checksum");
    let mut expected = translated_to_consumer(p, 40000, b"none back");
    expected[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(out, expected);
}

#[test]
fn established_flows_keep_their_backend_when_the_backends_change() {
    let mut plane = Plane::new();
    for p in BOTH {
        // Flows from many ports: each lands where the hash says, and both backends get some.
        let mut chosen = BTreeMap::new();
        for sport in 20000..20256u16 {
            let out = plane.expect_redirect(&to_vip(p, sport, b"x"), "spread");
            let b = predicted_backend(&consumer_key(p, sport), &[B1, B2]);
            assert_eq!(
                seen(p, &out).dst,
                (b.ip, p.backend_port()),
                "{p:?} :{sport}"
            );
            chosen.insert(sport, b);
        }
        let on_b1 = chosen.values().filter(|b| **b == B1).count();
        assert!(
            (64..=192).contains(&on_b1),
            "{p:?}: 256 flows spread over 2 backends, {on_b1} on B1"
        );
        // Reverse the list (same grant, as an in-place update does): established flows stay.
        plane.set_vip(p.vip(), p.service(p.grant(), &[B2, B1]));
        let mut moved_if_new = 0;
        for (&sport, &b) in &chosen {
            let out = plane.expect_redirect(&to_vip(p, sport, b"y"), "after the reorder");
            assert_eq!(
                out,
                translated_to_backend(p, b, sport, b"y"),
                "{p:?} :{sport} stays on {b:?}"
            );
            if predicted_backend(&consumer_key(p, sport), &[B2, B1]) != b {
                moved_if_new += 1;
            }
        }
        assert!(
            moved_if_new > 0,
            "{p:?}: the reorder must change the choice of some flows for the test to mean anything"
        );
        // New flows use the new order.
        for sport in 30000..30032u16 {
            let out = plane.expect_redirect(&to_vip(p, sport, b"z"), "a new flow");
            let b = predicted_backend(&consumer_key(p, sport), &[B2, B1]);
            assert_eq!(seen(p, &out).dst, (b.ip, p.backend_port()));
        }
        // Down to one backend: the grant's flows continue where they were (documented: an
        // in-place update keeps the grant), new ones all go to B1.
        plane.set_vip(p.vip(), p.service(p.grant(), &[B1]));
        for (&sport, &b) in chosen.iter().take(16) {
            let out = plane.expect_redirect(&to_vip(p, sport, b"w"), "after the shrink");
            assert_eq!(seen(p, &out).dst.0, b.ip);
        }
        let out = plane.expect_redirect(&to_vip(p, 31000, b"v"), "a new flow, one backend");
        assert_eq!(seen(p, &out).dst.0, B1.ip);
    }
}

#[test]
fn replies_are_translated_back_to_the_consumer() {
    let mut plane = Plane::new();
    let mut a_to = (0, 0);
    for p in BOTH {
        plane.send_as(A);
        let sport = 40123;
        let query = to_vip(p, sport, b"request");
        let there = plane.expect_redirect(&query, "request");
        let b = predicted_backend(&consumer_key(p, sport), &[B1, B2]);
        let b_before = plane.traffic(b.slot);
        plane.send_as(b);
        let reply = to_nat(p, b, sport, b"response!");
        let out = plane.expect_redirect(&reply, &format!("{p:?} reply from {b:?}"));
        assert_eq!(out, translated_to_consumer(p, sport, b"response!"));
        assert_eq!(
            seen(p, &out),
            Seen {
                macs: (GW_MAC, A.mac),
                src: (p.vip(), p.port()),
                dst: (A.ip, sport),
                ttl: 63,
                checksums_ok: true,
            }
        );
        a_to = (a_to.0 + 1, a_to.1 + reply.len() as u64);
        assert_eq!(
            plane
                .traffic(A.slot)
                .get(&(Direction::ToGuest, TrafficClass::Exposure)),
            Some(&a_to),
            "A counts the reply to the guest"
        );
        let b_after = plane.traffic(b.slot);
        let from = |m: &BTreeMap<_, (u64, u64)>| {
            m.get(&(Direction::FromGuest, TrafficClass::Exposure))
                .copied()
                .unwrap_or((0, 0))
        };
        assert_eq!(
            from(&b_after),
            (
                from(&b_before).0 + 1,
                from(&b_before).1 + reply.len() as u64
            ),
            "the backend counts the reply from the guest"
        );

        // A round trip: the backend answers the translated request by swapping addresses and
        // ports, as a socket does; A receives its own request mirrored, from the VIP, and
        // to_vm passes it.
        let mut answer = there.clone();
        answer[0..6].copy_from_slice(&GW_MAC);
        answer[6..12].copy_from_slice(&b.mac);
        let (src, dst) = (answer[26..30].to_vec(), answer[30..34].to_vec());
        answer[26..30].copy_from_slice(&dst);
        answer[30..34].copy_from_slice(&src);
        let (sp, dp) = (answer[34..36].to_vec(), answer[36..38].to_vec());
        answer[34..36].copy_from_slice(&dp);
        answer[36..38].copy_from_slice(&sp);
        let delivered = plane.expect_redirect(&answer, "answer");
        a_to = (a_to.0 + 1, a_to.1 + answer.len() as u64);
        let mut expected = l4_frame(
            p,
            (GW_MAC, A.mac),
            (p.vip(), p.port()),
            (A.ip, sport),
            b"request",
        );
        // The request went out with TTL 63 and came back through one more hop (for TCP only
        // the ports were swapped, not the sequence numbers: `l4_frame` uses the same ones).
        frame::set_ttl(&mut expected, 62);
        assert_eq!(
            delivered, expected,
            "{p:?}: the round trip restores every byte"
        );
        plane.send_as(A);
        let r = plane.run(Prog::ToVm, &delivered, "delivery");
        assert_eq!(
            (r.ret, r.drops.len()),
            (TC_ACT_OK, 0),
            "to_vm passes the answer"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Drops.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_reply_without_a_flow_is_dropped() {
    let mut plane = Plane::new();
    for p in BOTH {
        plane.send_as(B1);
        plane.expect_drop(
            &to_nat(p, B1, 40000, b"unsolicited"),
            DropReason::ExposureNoFlow,
            &format!("{p:?}: B1 opens a flow to the NAT address"),
        );
        // A flow exists; anything not exactly its reply has none.
        plane.send_as(A);
        plane.expect_redirect(&to_vip(p, 40000, b"q"), "the flow");
        let b = predicted_backend(&consumer_key(p, 40000), &[B1, B2]);
        let other = if b == B1 { B2 } else { B1 };
        plane.send_as(other);
        plane.expect_drop(
            &to_nat(p, other, 40000, b"r"),
            DropReason::ExposureNoFlow,
            "the other backend answers",
        );
        plane.send_as(b);
        plane.expect_drop(
            &to_nat(p, b, 40001, b"r"),
            DropReason::ExposureNoFlow,
            "another NAT port",
        );
        plane.expect_drop(
            &l4_frame(
                p,
                (b.mac, GW_MAC),
                (b.ip, p.backend_port() + 1),
                (p.nat(), 40000),
                b"r",
            ),
            DropReason::ExposureNoFlow,
            "from another backend port",
        );
        plane.expect_drop(
            &l4_frame(
                p.other(),
                (b.mac, GW_MAC),
                (b.ip, p.backend_port()),
                (p.nat(), 40000),
                b"r",
            ),
            DropReason::ExposureNoFlow,
            "the other protocol",
        );
        plane.expect_redirect(&to_nat(p, b, 40000, b"r"), "the real reply");
        // An evicted FLOWS_IN entry (LRU) while FLOWS_OUT still holds the flow.
        plane
            .flows_in
            .remove(&reply_key(p, b, 40000))
            .expect("FLOWS_IN entry");
        plane.expect_drop(
            &to_nat(p, b, 40000, b"r"),
            DropReason::ExposureNoFlow,
            "FLOWS_IN entry evicted",
        );
    }
}

#[test]
fn only_the_granted_protocol_and_port_are_a_service() {
    let mut plane = Plane::new();
    for p in BOTH {
        let vip = p.vip();
        for (q, port, what) in [
            (p.other(), p.port(), "the other protocol"),
            (p, p.port() + 1, "another port"),
            (p, p.backend_port(), "the backend port"),
            (
                p.other(),
                p.other().port(),
                "the other service's protocol and port",
            ),
        ] {
            plane.expect_drop(
                &l4_frame(q, (A.mac, GW_MAC), (A.ip, 40000), (vip, port), b"x"),
                DropReason::ExposureNoService,
                &format!("{q:?} to {vip}:{port}: {what}"),
            );
        }
    }
    assert!(plane.flows_out().is_empty() && plane.flows_in().is_empty());
    // A VIP route whose service is gone (removal writes the route first, see
    // dataplane/exposure.rs; simulated here) has no service.
    let vip = Ipv4Addr::new(10, 0, 0, 202);
    plane.set_vip(vip, Proto::Tcp.service(9, &[B1]));
    plane
        .host
        .dataplane_mut()
        .remove_vip(CONSUMER, map_ip(vip))
        .unwrap();
    plane
        .host
        .dataplane_mut()
        .insert_route(
            RouteKey {
                cloud: CONSUMER,
                ipv4: map_ip(vip),
            },
            NextHop {
                ifindex: 0,
                slot: 0,
                mac: [0; 6],
                flags: NEXTHOP_VIP,
            },
        )
        .unwrap();
    plane.expect_drop(
        &l4_frame(Proto::Tcp, (A.mac, GW_MAC), (A.ip, 1), (vip, 80), b""),
        DropReason::ExposureNoService,
        "a VIP route without service",
    );
}

#[test]
fn icmp_to_a_vip_or_a_nat_address_is_not_translated() {
    let mut plane = Plane::new();
    fn echo(src: Guest, dst: Ipv4Addr) -> Vec<u8> {
        let mac = atoll_agent::types::MacAddr(src.mac);
        let gw = atoll_agent::types::MacAddr(GW_MAC);
        atoll_testbed::frame::echo_frame(mac, gw, src.ip, dst, 98)
    }
    for p in BOTH {
        plane.send_as(A);
        plane.expect_drop(&echo(A, p.vip()), DropReason::ExposureIcmp, "ping the VIP");
        plane.expect_redirect(&to_vip(p, 40000, b"q"), "a flow");
        plane.send_as(B1);
        plane.expect_drop(
            &echo(B1, p.nat()),
            DropReason::ExposureIcmp,
            "ping the NAT address",
        );
    }
}

#[test]
fn fragments_and_cut_transport_headers_are_malformed() {
    let mut plane = Plane::new();
    for p in BOTH {
        let header = match p {
            Proto::Udp => 8,
            Proto::Tcp => 20,
        };
        plane.send_as(A);
        plane.expect_redirect(&to_vip(p, 40000, b"q"), "the flow");
        let b = predicted_backend(&consumer_key(p, 40000), &[B1, B2]);
        for (sender, to, good) in [
            (A, "VIP", to_vip(p, 40000, b"payload")),
            (b, "NAT", to_nat(p, b, 40000, b"payload")),
        ] {
            plane.send_as(sender);
            // Fragments: the first (MF) and later ones (offset), with and without DF.
            for frag in [0x2000u16, 0x0001, 0x2001, 0x4001, 0x1fff] {
                let f = edit_ipv4(good.clone(), |ip| {
                    ip[6..8].copy_from_slice(&frag.to_be_bytes())
                });
                plane.expect_drop(
                    &f,
                    DropReason::ExposureL4Malformed,
                    &format!("{p:?} to {to}: fragment {frag:#06x}"),
                );
            }
            // The transport header cut short, frame and total length agreeing.
            for keep in 0..header {
                let f = edit_ipv4(good[..34 + keep].to_vec(), |ip| {
                    set_total_len(ip, 20 + keep)
                });
                plane.expect_drop(
                    &f,
                    DropReason::ExposureL4Malformed,
                    &format!("{p:?} to {to}: {keep} transport bytes"),
                );
            }
            // The total length cuts the header though the frame carries all of it (padding).
            for keep in 0..header {
                let f = edit_ipv4(good.clone(), |ip| set_total_len(ip, 20 + keep));
                plane.expect_drop(
                    &f,
                    DropReason::ExposureL4Malformed,
                    &format!("{p:?} to {to}: total length leaves {keep} transport bytes"),
                );
            }
            // Not UDP or TCP at all.
            for proto in [0u8, 2, 47, 50, 132, 255] {
                let f = edit_ipv4(good.clone(), |ip| ip[9] = proto);
                plane.expect_drop(
                    &f,
                    DropReason::ExposureL4Malformed,
                    &format!("IP protocol {proto} to {to}"),
                );
            }
            // A frame cut inside the packet its total length announces.
            plane.expect_drop(
                &good[..good.len() - 1],
                DropReason::Ipv4Truncated,
                &format!("{p:?} to {to}: one byte short"),
            );
        }
    }
    // TTL: checked before the exposure (no flow is opened).
    plane.send_as(A);
    let f = with_ttl(to_vip(Proto::Udp, 50000, b"q"), 1);
    plane.expect_drop(&f, DropReason::TtlExceeded, "TTL 1 to the VIP");
    assert!(
        !plane
            .flows_out()
            .contains_key(&Key(consumer_key(Proto::Udp, 50000))),
        "no flow for an expired packet"
    );
}

#[test]
fn services_without_a_live_backend_drop_new_flows() {
    let mut plane = Plane::new();
    for p in BOTH {
        plane.send_as(A);
        // No backend at all.
        plane.set_vip(p.vip(), p.service(p.grant(), &[]));
        let flows_in = plane.flows_in().len();
        plane.expect_drop(
            &to_vip(p, 40000, b"q"),
            DropReason::ExposureNoBackend,
            "empty backend list",
        );
        assert!(!plane.flows_out().contains_key(&Key(consumer_key(p, 40000))));
        assert_eq!(plane.flows_in().len(), flows_in, "no NAT port taken");
        // A backend address without an endpoint route: unrouted, or an exposure address of
        // the provider (its NAT address).
        for nowhere in [NOWHERE, p.nat(), p.other().nat()] {
            plane.set_vip(
                p.vip(),
                service(p.grant(), p, p.nat(), &[(nowhere, p.backend_port())]),
            );
            plane.expect_drop(
                &to_vip(p, 40000, b"q"),
                DropReason::ExposureNoBackend,
                &format!("{p:?}: backend {nowhere} has no endpoint"),
            );
            assert!(
                !plane.flows_out().contains_key(&Key(consumer_key(p, 40000))),
                "{p:?}: no flow to backend {nowhere}"
            );
            assert_eq!(plane.flows_in().len(), flows_in, "no NAT port taken");
        }
        // An established flow whose backend endpoint goes away, then comes back.
        plane.set_vip(p.vip(), p.service(p.grant(), &[B2]));
        plane.expect_redirect(&to_vip(p, 41000, b"q"), "to B2");
        plane.remove_route(PROVIDER, B2.ip);
        plane.expect_drop(
            &to_vip(p, 41000, b"q"),
            DropReason::ExposureNoBackend,
            "B2's endpoint gone",
        );
        plane
            .host
            .dataplane_mut()
            .insert_route(
                RouteKey {
                    cloud: PROVIDER,
                    ipv4: map_ip(B2.ip),
                },
                B2.hop(),
            )
            .unwrap();
        let out = plane.expect_redirect(&to_vip(p, 41000, b"q"), "B2 back");
        assert_eq!(out, translated_to_backend(p, B2, 41000, b"q"));
        // The consumer gone: replies of its flows have nowhere to go.
        plane.remove_route(CONSUMER, A.ip);
        plane.send_as(B2);
        plane.expect_drop(
            &to_nat(p, B2, 41000, b"r"),
            DropReason::ExposureNoFlow,
            "the consumer's endpoint gone",
        );
        plane
            .host
            .dataplane_mut()
            .insert_route(
                RouteKey {
                    cloud: CONSUMER,
                    ipv4: map_ip(A.ip),
                },
                A.hop(),
            )
            .unwrap();
        plane.expect_redirect(&to_nat(p, B2, 41000, b"r"), "the consumer back");
        let _ = plane.flows_out.remove(&consumer_key(p, 41000));
        let _ = plane.flows_in.remove(&reply_key(p, B2, 41000));
    }
}

#[test]
fn a_replaced_grant_cuts_its_flows_in_both_directions() {
    let mut plane = Plane::new();
    for (p, reply_first) in [(Proto::Udp, false), (Proto::Tcp, true)] {
        plane.send_as(A);
        let sport = 42000;
        // Three packets: the flow is cached and its last packet took the cached path.
        for _ in 0..3 {
            plane.expect_redirect(&to_vip(p, sport, b"q"), "the flow");
        }
        let b = predicted_backend(&consumer_key(p, sport), &[B1, B2]);
        plane.send_as(b);
        plane.expect_redirect(&to_nat(p, b, sport, b"r"), "its reply");
        // A new grant for the same VIP and service (revoke + grant again).
        let new_grant = 100 + p.grant();
        plane.set_vip(p.vip(), p.service(new_grant, &[B1, B2]));
        let consumer_side = |plane: &mut Plane| {
            plane.send_as(A);
            plane.expect_drop(
                &to_vip(p, sport, b"q"),
                DropReason::ExposureRevoked,
                &format!("{p:?}: A's next packet of the old flow"),
            );
            assert!(
                !plane.flows_out().contains_key(&Key(consumer_key(p, sport))),
                "the consumer's view of the flow is removed"
            );
        };
        let provider_side = |plane: &mut Plane| {
            plane.send_as(b);
            plane.expect_drop(
                &to_nat(p, b, sport, b"r"),
                DropReason::ExposureRevoked,
                &format!("{p:?}: the backend's next reply of the old flow"),
            );
            assert!(
                !plane.flows_in().contains_key(&Key(reply_key(p, b, sport))),
                "the provider's view of the flow is removed"
            );
            // Nothing left to translate it with.
            plane.expect_drop(
                &to_nat(p, b, sport, b"r"),
                DropReason::ExposureNoFlow,
                "a reply after the cut",
            );
        };
        if reply_first {
            provider_side(&mut plane);
            consumer_side(&mut plane);
        } else {
            consumer_side(&mut plane);
            provider_side(&mut plane);
        }
        // The consumer is still granted (by the new grant): its next packet is a new flow.
        plane.send_as(A);
        let out = plane.expect_redirect(&to_vip(p, sport, b"q"), "a new flow, new grant");
        assert_eq!(out, translated_to_backend(p, b, sport, b"q"));
        assert_eq!(
            plane.flows_out().get(&Key(consumer_key(p, sport))),
            Some(&flow_out(new_grant, (b.ip, p.backend_port()), sport))
        );
    }
    // A grant number given to another service in place (another provider) is refused: the
    // programs take a route naming a flow's grant as proof the flow is granted. With a new
    // number, the old provider's NAT address goes with the old service: its replies are cut.
    let p = Proto::Udp;
    let mut svc = p.service(102, &[B1, B2]);
    svc.provider = 4;
    let refused = plane
        .host
        .dataplane_mut()
        .set_vip(CONSUMER, map_ip(p.vip()), svc);
    assert!(
        matches!(refused, Err(DataplaneError::EntryExists { .. })),
        "{refused:?}"
    );
    svc.grant = 103;
    plane.set_vip(p.vip(), svc);
    let b = predicted_backend(&consumer_key(p, 42000), &[B1, B2]);
    plane.send_as(b);
    plane.expect_drop(
        &to_nat(p, b, 42000, b"r"),
        DropReason::NoRouteInCloud,
        "reply from the old provider",
    );
    // Removed: nothing reaches either address any more.
    plane
        .host
        .dataplane_mut()
        .remove_vip(CONSUMER, map_ip(Proto::Tcp.vip()))
        .unwrap();
    plane.send_as(A);
    plane.expect_drop(
        &to_vip(Proto::Tcp, 42000, b"q"),
        DropReason::NoRouteInCloud,
        "a removed VIP",
    );
    let b = predicted_backend(&consumer_key(Proto::Tcp, 42000), &[B1, B2]);
    plane.send_as(b);
    plane.expect_drop(
        &to_nat(Proto::Tcp, b, 42000, b"r"),
        DropReason::NoRouteInCloud,
        "the NAT address of a removed VIP",
    );
}

#[test]
fn apply_service_renumbers_a_changed_grant_and_cuts_its_flows() {
    let mut plane = Plane::new();
    let p = Proto::Tcp;
    let vip = Ipv4Addr::new(10, 0, 0, 210);
    let spec = ServiceSpec {
        consumer: cloud(CONSUMER),
        vip,
        provider: cloud(PROVIDER),
        nat: Ipv4Addr::new(10, 0, 0, 240),
        protocol: PROTOCOL_TCP,
        port: 80,
        backends: vec![(B1.ip, 8080), (B2.ip, 8080)],
    };
    let grant = plane.host.apply_service(&spec).expect("apply_service");
    assert!(
        grant > Proto::Udp.grant().max(Proto::Tcp.grant()),
        "numbers above the map's"
    );
    let frame = |sport| l4_frame(p, (A.mac, GW_MAC), (A.ip, sport), (vip, 80), b"q");
    let key = |sport| flow_key(CONSUMER, (A.ip, sport), (vip, 80), p);
    let b = predicted_backend(&key(43000), &[B1, B2]);
    let out = plane.expect_redirect(&frame(43000), "through apply_service");
    assert_eq!(seen(p, &out).src, (spec.nat, 43000));
    // Backends reordered: the same grant, the flow stays.
    let reordered = ServiceSpec {
        backends: vec![(B2.ip, 8080), (B1.ip, 8080)],
        ..spec.clone()
    };
    assert_eq!(plane.host.apply_service(&reordered).unwrap(), grant);
    let out = plane.expect_redirect(&frame(43000), "after the reorder");
    assert_eq!(seen(p, &out).dst.0, b.ip);
    // Another NAT address: a new grant; the old NAT address is gone, the old flow is cut.
    let moved = ServiceSpec {
        nat: Ipv4Addr::new(10, 0, 0, 241),
        ..reordered
    };
    let regrant = plane.host.apply_service(&moved).unwrap();
    assert!(regrant > grant);
    assert_eq!(
        plane
            .dp()
            .route(RouteKey {
                cloud: PROVIDER,
                ipv4: map_ip(spec.nat)
            })
            .unwrap(),
        None,
        "the old NAT route is removed"
    );
    plane.expect_drop(&frame(43000), DropReason::ExposureRevoked, "the old flow");
    let out = plane.expect_redirect(&frame(43000), "new flow");
    assert_eq!(seen(p, &out).src, (moved.nat, 43000));
    plane.send_as(b);
    plane.expect_drop(
        &l4_frame(p, (b.mac, GW_MAC), (b.ip, 8080), (spec.nat, 43000), b"r"),
        DropReason::NoRouteInCloud,
        "a reply to the old NAT address",
    );
    assert!(plane.host.remove_service(cloud(CONSUMER), vip).unwrap());
    plane.send_as(A);
    plane.expect_drop(&frame(43000), DropReason::NoRouteInCloud, "removed");
}

// ---------------------------------------------------------------------------------------------
// NAT ports.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_taken_nat_port_is_replaced_by_a_hashed_one() {
    let mut plane = Plane::new();
    for p in BOTH {
        plane.set_vip(p.vip(), p.service(p.grant(), &[B1]));
        for taken in 1..4usize {
            plane.send_as(A);
            let sport = 44000 + taken as u16;
            let key = consumer_key(p, sport);
            let candidates = nat_port_candidates(&key);
            assert_eq!(candidates[0], sport);
            for c in &candidates[..taken] {
                plane.occupy(reply_key(p, B1, *c));
            }
            let nat_port = candidates[taken];
            assert!(nat_port >= 1024 && !candidates[..taken].contains(&nat_port));
            let what = format!("{p:?} :{sport} with {taken} NAT ports taken");
            let out = plane.expect_redirect(&to_vip(p, sport, b"q"), &what);
            assert_eq!(
                out,
                translated_to_backend(p, B1, nat_port, b"q"),
                "{what}: from NAT port {nat_port}"
            );
            assert_eq!(
                plane.flows_out().get(&Key(key)),
                Some(&flow_out(p.grant(), (B1.ip, p.backend_port()), nat_port))
            );
            assert_eq!(
                plane.flows_in().get(&Key(reply_key(p, B1, nat_port))),
                Some(&flow_in(p, p.grant(), sport))
            );
            // The reply to that port reaches the consumer's own port.
            plane.send_as(B1);
            let out = plane.expect_redirect(&to_nat(p, B1, nat_port, b"r"), &what);
            assert_eq!(out, translated_to_consumer(p, sport, b"r"));
            // FLOWS_OUT evicted (LRU): the flow is admitted again, recognises its own
            // FLOWS_IN entry behind the taken ports and keeps its NAT port.
            plane.send_as(A);
            plane.flows_out.remove(&key).expect("FLOWS_OUT entry");
            let out = plane.expect_redirect(&to_vip(p, sport, b"q"), "after an eviction");
            assert_eq!(out, translated_to_backend(p, B1, nat_port, b"q"));
        }
    }
}

/// A sibling of A in the consumer cloud (not in the standard topology: its route is added by
/// the test that needs it).
const S: Guest = Guest {
    cloud: CONSUMER,
    ip: Ipv4Addr::new(10, 0, 0, 3),
    mac: [0x02, 0xa7, 0x01, 0, 0, 0x03],
    slot: 2,
};

/// Issue 15 item 9, in a test run (the real-tap version is `tap_verdicts.rs`,
/// `a_sibling_never_takes_over_the_nat_port_of_a_live_flow`): A's reply-side entry is evicted
/// while its `FLOWS_OUT` entry lives; the sibling S opens a flow from the same port to the only
/// backend and takes the free NAT port; A's next packet finds its port held by S, so its flow
/// is opened again on the next candidate port, and the backend's replies to each port reach
/// only their own guest.
#[test]
fn a_flow_whose_nat_port_was_taken_moves_to_another_one() {
    let mut plane = Plane::new();
    plane
        .host
        .dataplane_mut()
        .insert_route(
            RouteKey {
                cloud: S.cloud,
                ipv4: map_ip(S.ip),
            },
            S.hop(),
        )
        .expect("S's route");
    for p in BOTH {
        plane.set_vip(p.vip(), p.service(p.grant(), &[B1]));
        let sport = 46000;
        let what = format!("{p:?}");
        plane.send_as(A);
        // Three packets: the second confirms the hold and caches the flow, the third takes
        // the cached path (`FLOWS_RECENT`), which must notice the take-over below too.
        for _ in 0..3 {
            let out = plane.expect_redirect(&to_vip(p, sport, b"q"), &what);
            assert_eq!(out, translated_to_backend(p, B1, sport, b"q"));
        }
        plane
            .flows_in
            .remove(&reply_key(p, B1, sport))
            .expect("A's FLOWS_IN entry");

        plane.send_as(S);
        let from_s = l4_frame(p, (S.mac, GW_MAC), (S.ip, sport), (p.vip(), p.port()), b"s");
        let out = plane.expect_redirect(&from_s, &format!("{what}: S opens"));
        assert_eq!(seen(p, &out).src, (p.nat(), sport), "S takes the free port");

        plane.send_as(A);
        let moved_to = nat_port_candidates(&consumer_key(p, sport))[1];
        let out = plane.expect_redirect(&to_vip(p, sport, b"q"), &format!("{what}: A again"));
        assert_eq!(
            out,
            translated_to_backend(p, B1, moved_to, b"q"),
            "{what}: A's flow moves to its next candidate port, not S's"
        );
        assert_eq!(
            plane.flows_out().get(&Key(consumer_key(p, sport))),
            Some(&flow_out(p.grant(), (B1.ip, p.backend_port()), moved_to))
        );
        // Every flow's reply half sends replies back to that flow.
        for (k, f) in plane.flows_out() {
            if k.0.protocol != p.number() {
                continue;
            }
            let back = plane
                .flows_in()
                .get(&Key(reply_key(p, B1, u16::from_be(f.nat_port))))
                .copied()
                .expect("a reply half");
            assert_eq!(
                (back.consumer_ipv4, back.consumer_port),
                (k.0.src_ipv4, k.0.src_port),
                "{what}: the NAT port of {k:?} is held by another flow"
            );
        }

        plane.send_as(B1);
        let out = plane.expect_redirect(&to_nat(p, B1, moved_to, b"r"), &what);
        assert_eq!(out, translated_to_consumer(p, sport, b"r"), "{what}: to A");
        let out = plane.expect_redirect(&to_nat(p, B1, sport, b"r"), &what);
        let at = seen(p, &out);
        assert_eq!(
            (at.macs.1, at.dst),
            (S.mac, (S.ip, sport)),
            "{what}: the reply to S's port reaches S"
        );
    }
}

#[test]
fn all_nat_ports_taken_refuses_the_flow() {
    let mut plane = Plane::new();
    for p in BOTH {
        plane.set_vip(p.vip(), p.service(p.grant(), &[B1]));
        let sport = 45000;
        let key = consumer_key(p, sport);
        for c in nat_port_candidates(&key) {
            plane.occupy(reply_key(p, B1, c));
        }
        let flows_in = plane.flows_in();
        plane.expect_drop(
            &to_vip(p, sport, b"q"),
            DropReason::ExposureNatPortsExhausted,
            &format!("{p:?}: all 4 NAT ports taken"),
        );
        assert!(!plane.flows_out().contains_key(&Key(key)));
        assert_eq!(plane.flows_in(), flows_in, "the other flows are untouched");
        // One port freed: admitted on it.
        let last = nat_port_candidates(&key)[3];
        plane.flows_in.remove(&reply_key(p, B1, last)).unwrap();
        let out = plane.expect_redirect(&to_vip(p, sport, b"q"), "one port free");
        assert_eq!(out, translated_to_backend(p, B1, last, b"q"));
    }
}

// ---------------------------------------------------------------------------------------------
// Isolation and robustness.
// ---------------------------------------------------------------------------------------------

#[test]
fn nobody_else_reaches_the_exposure_addresses() {
    let mut plane = Plane::new();
    for p in BOTH {
        plane.send_as(A);
        plane.expect_redirect(&to_vip(p, 40000, b"q"), "a flow");
        // A stranger: neither the VIP nor the NAT address nor the backends exist in its cloud.
        plane.send_as(C);
        for dst in [p.vip(), p.nat(), B2.ip] {
            plane.expect_drop(
                &l4_frame(p, (C.mac, GW_MAC), (C.ip, 40000), (dst, p.port()), b"x"),
                DropReason::NoRouteInCloud,
                &format!("the stranger to {dst}"),
            );
        }
        // The consumer cannot reach the NAT address or the backend B2's address.
        plane.send_as(A);
        for dst in [p.nat(), B2.ip] {
            plane.expect_drop(
                &l4_frame(
                    p,
                    (A.mac, GW_MAC),
                    (A.ip, 40000),
                    (dst, p.backend_port()),
                    b"x",
                ),
                DropReason::NoRouteInCloud,
                &format!("the consumer to {dst}"),
            );
        }
        // The provider has no VIP.
        plane.send_as(B2);
        plane.expect_drop(
            &l4_frame(
                p,
                (B2.mac, GW_MAC),
                (B2.ip, 40000),
                (p.vip(), p.port()),
                b"x",
            ),
            DropReason::NoRouteInCloud,
            "the provider to the VIP",
        );
    }
    assert!(
        plane.traffic(C.slot).is_empty(),
        "the stranger moved no traffic"
    );
}

/// A small deterministic generator (xorshift32) for the mutation sweep.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
}

#[test]
fn malformed_frames_on_the_exposure_paths_are_all_counted() {
    // Truncations at every length and random corruptions of requests to the VIPs and replies
    // to the NAT addresses: every frame gets a verdict, every drop is counted exactly once
    // (host-wide and for the sender) and nothing else is.
    let mut plane = Plane::new();
    let mut rng = Rng(0x2545_f491);
    let (mut dropped, mut redirected, mut runs) = (0u64, 0u64, 0u64);
    let mut reasons = BTreeMap::new();
    for p in BOTH {
        plane.send_as(A);
        plane.expect_redirect(&to_vip(p, 40000, b"q"), "a flow");
        let b = predicted_backend(&consumer_key(p, 40000), &[B1, B2]);
        for (sender, good) in [
            (A, to_vip(p, 40000, b"some request payload")),
            (b, to_nat(p, b, 40000, b"some reply payload")),
        ] {
            plane.send_as(sender);
            let mut cases = Vec::new();
            for len in 34..good.len() {
                cases.push(good[..len].to_vec());
                // The same cut with a total length that agrees with it.
                cases.push(edit_ipv4(good[..len].to_vec(), |ip| {
                    let n = ip.len();
                    set_total_len(ip, n)
                }));
            }
            for _ in 0..1500 {
                let mut f = good.clone();
                for _ in 0..1 + rng.below(3) {
                    // Mostly the IPv4 and transport headers, sometimes anywhere.
                    let at = if rng.below(4) == 0 {
                        rng.below(f.len())
                    } else {
                        14 + rng.below(40)
                    };
                    f[at] = rng.next() as u8;
                }
                if rng.below(3) == 0 {
                    frame::refresh_ipv4_checksum(&mut f);
                }
                cases.push(f);
            }
            for f in cases {
                let r = plane.run(Prog::FromVm, &f, "mutant");
                runs += 1;
                match r.ret {
                    TC_ACT_SHOT => {
                        dropped += 1;
                        assert_eq!(r.drops.len(), 1, "one reason per drop: {f:02x?}");
                        assert_eq!(r.drops.values().sum::<u64>(), 1, "{f:02x?}");
                        assert_eq!(
                            r.sender_drops, r.drops,
                            "counted for the sender too: {f:02x?}"
                        );
                        *reasons.entry(*r.drops.keys().next().unwrap()).or_insert(0) += 1;
                    }
                    TC_ACT_REDIRECT | TC_ACT_OK => {
                        redirected += 1;
                        assert!(r.drops.is_empty(), "{f:02x?}");
                        assert_eq!(r.out.len(), f.len(), "{f:02x?}");
                    }
                    other => panic!("verdict {other} for {f:02x?}"),
                }
            }
        }
    }
    assert_eq!(dropped + redirected, runs);
    for r in [
        DropReason::ExposureL4Malformed,
        DropReason::Ipv4Truncated,
        DropReason::ExposureNoService,
        DropReason::ExposureNoFlow,
    ] {
        assert!(
            reasons.get(&r).copied().unwrap_or(0) > 0,
            "the sweep should reach {r:?}: {reasons:?}"
        );
    }
    assert!(redirected > 0, "some mutants are still valid: {reasons:?}");
}

/// The cached path of established flows (`FLOWS_RECENT`, module docs of `exposure.rs`): once
/// cached, a flow is translated without its flow table entries, for at most `CACHE_CREDIT`
/// packets, after which it looks them up again (here: admitted again, same backend and port);
/// and it never outlives its backend's endpoint.
#[test]
fn cached_flows_go_back_to_the_tables_within_the_credit_and_never_outlive_their_backend() {
    let mut plane = Plane::new();
    let p = Proto::Udp;
    plane.set_vip(p.vip(), p.service(p.grant(), &[B1]));
    plane.send_as(A);
    let sport = 47000;
    for _ in 0..2 {
        let out = plane.expect_redirect(&to_vip(p, sport, b"q"), "the flow, cached");
        assert_eq!(out, translated_to_backend(p, B1, sport, b"q"));
    }
    plane
        .flows_out
        .remove(&consumer_key(p, sport))
        .expect("FLOWS_OUT entry");
    let mut sent = 0;
    while !plane.flows_out().contains_key(&Key(consumer_key(p, sport))) {
        assert!(
            sent <= CACHE_CREDIT,
            "{sent} packets after its entry went, the flow still runs from the cache"
        );
        let out = plane.expect_redirect(&to_vip(p, sport, b"q"), "the flow, entry gone");
        assert_eq!(out, translated_to_backend(p, B1, sport, b"q"));
        sent += 1;
    }
    assert!(sent > 1, "the cache was never used ({sent} packet)");
    // The backend's endpoint goes (its device and route): the cached path does not deliver
    // to the device any more.
    plane.expect_redirect(&to_vip(p, sport, b"q"), "cached again");
    let dp = plane.host.dataplane_mut();
    dp.remove_endpoint(B1.hop().ifindex).expect("B1's endpoint");
    dp.remove_route(RouteKey {
        cloud: B1.cloud,
        ipv4: map_ip(B1.ip),
    })
    .expect("B1's route");
    plane.expect_drop(
        &to_vip(p, sport, b"q"),
        DropReason::ExposureNoBackend,
        "a flow whose backend is gone",
    );
}

/// Two flows of A whose keys share a `FLOWS_RECENT` slot, sent from two CPUs at once: each
/// packet finds the slot holding the other flow, takes the tables and fills the slot with
/// its own flow, while the other CPU reads the slot for its packet. Every output must be its
/// own flow's translation (backend, NAT port, checksums): a packet that matched the slot's
/// key while the other CPU was rewriting the rest would leave with the other flow's backend
/// and NAT port (a torn slot). Needs two CPUs; fails without them.
#[test]
fn a_cache_slot_written_by_two_cpus_at_once_is_never_read_torn() {
    const ROUNDS: usize = 150_000;
    let plane = Plane::new();
    let p = Proto::Udp;
    // Two source ports whose keys share a slot and whose flows go to different backends.
    let mut by_slot = std::collections::HashMap::new();
    let (first, second) = (1..=u16::MAX)
        .find_map(|s| {
            let key = consumer_key(p, s);
            let b = predicted_backend(&key, &[B1, B2]);
            match by_slot.insert(cache_slot(&key), (s, b)) {
                Some((other, ob)) if ob != b => Some((other, s)),
                _ => None,
            }
        })
        .expect("two colliding ports");
    let flows: Vec<(Vec<u8>, Vec<u8>)> = [first, second]
        .iter()
        .map(|&s| {
            let payload = s.to_be_bytes();
            let b = predicted_backend(&consumer_key(p, s), &[B1, B2]);
            let frame = to_vip(p, s, &payload);
            let expected = translated_to_backend(p, b, s, &payload);
            assert_eq!(plane.expect_redirect(&frame, "opening"), expected);
            (frame, expected)
        })
        .collect();
    let torn = atoll_testbed::verdict::race_redirects(&plane.from_vm, &flows, ROUNDS);
    assert_eq!(
        torn,
        vec![0, 0],
        "packets sent with the other flow's translation, per CPU, of {ROUNDS} each"
    );
}

#[test]
fn a_consumer_opens_new_flows_at_its_rate_and_established_ones_go_on() {
    let mut plane = Plane::new();
    assert_eq!(
        plane.dp().exposure_flow_rate().unwrap(),
        atoll_agent::config::DEFAULT_MAX_NEW_FLOWS_PER_SEC,
        "Host::open applies dataplane.max_new_exposure_flows_per_sec"
    );
    plane.host.set_exposure_flow_rate(1).unwrap();
    let p = Proto::Udp;
    // One new flow per second with a second of burst: the clock may run a second ahead of
    // now, so two flows open at once and the third is refused and counted (unless a second
    // passed between these test runs).
    plane.expect_redirect(&to_vip(p, 41000, b"1"), "first flow");
    plane.expect_redirect(&to_vip(p, 41001, b"2"), "second flow");
    plane.expect_drop(
        &to_vip(p, 41002, b"3"),
        DropReason::ExposureFlowRateLimited,
        "third flow",
    );
    assert!(
        !plane
            .flows_out()
            .keys()
            .any(|k| k.0.src_port == 41002u16.to_be()),
        "a refused flow takes no entry"
    );
    // Established flows are not charged, nor are replies.
    for i in 0..40u16 {
        plane.expect_redirect(&to_vip(p, 41000 + i % 2, b"more"), "an established flow");
    }
    // Without a limit, it opens.
    plane.host.set_exposure_flow_rate(0).unwrap();
    plane.expect_redirect(&to_vip(p, 41002, b"3"), "no limit");
}
