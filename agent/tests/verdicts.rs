//! Verdict tests for the eBPF dataplane programs `from_vm` and `to_vm`, run in the kernel with
//! `BPF_PROG_TEST_RUN` on hand-built frames.
//!
//! Every test loads its own private copy of the embedded object (`atoll_agent::dataplane::OBJECT`;
//! its maps are unpinned, so tests never share state and never touch the host's pins), fills
//! `ENDPOINTS` / `ROUTES`, runs one program on a frame and checks:
//! - the verdict (`TC_ACT_SHOT` = 2, `TC_ACT_OK` = 0, `TC_ACT_REDIRECT` = 7);
//! - for every drop, that exactly the expected `DROPS` counter went up by exactly one and no
//!   other reason moved; for passes and redirects, that no counter moved;
//! - for redirects, the rewritten output frame byte for byte (MACs, TTL, checksums, payload).
//!
//! Covered: in-cloud forwarding of ICMP/UDP/TCP, cloud isolation and overlapping addresses,
//! source MAC/IP and ARP anti-spoofing, truncation at every header boundary, malformed IPv4,
//! TTL expiry, fragments, VLAN/IPv6/other ethertypes, group MAC/IP destinations, the ARP
//! responder, the gateway's ICMP echo responder, unknown endpoints, and the egress filter.
//!
//! Test-run facts these tests rely on (and assert where they are observable):
//! - Without `ctx_in` the skb's device is the loopback device of the current network namespace,
//!   so `skb->ifindex` is 1: the endpoint under test lives at `ENDPOINTS[1]`.
//! - `bpf_redirect` only records its target, which the test run does not expose: a redirect is
//!   checked through the return value 7 and the rewritten frame.
//! - The kernel refuses, with `EINVAL` and before the program runs, skb test input shorter than
//!   an Ethernet header (14 bytes) and, for the IPv4 / IPv6 ethertypes, shorter than Ethernet +
//!   the fixed network header (34 / 54 bytes). So `TruncatedEthernet`, and `Ipv4Truncated` for
//!   frames without a complete IPv4 header, cannot be reached by a test run; the tests assert
//!   the refusal instead (see
//!   `test_run_refuses_frames_shorter_than_their_link_and_network_headers`).
//!
//! The tests need root (CAP_BPF, CAP_NET_ADMIN); they fail, never skip, without it.

use std::collections::BTreeMap;

use atoll_agent::dataplane::{
    read_drop_counters, sum_counters, MAP_COUNTERS, MAP_DROPS, MAP_ENDPOINTS, MAP_ENDPOINT_CACHE,
    MAP_ROUTES, OBJECT, PROG_FROM_VM, PROG_TO_VM,
};
use atoll_dataplane_common::{
    ipv4_to_map, Direction, DropReason, EndpointCounters, EndpointInfo, EndpointSlot, NextHop,
    RouteKey, TrafficClass, ENDPOINT_CACHE_MASK, ENDPOINT_CACHE_SLOTS,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{ProgramError, SchedClassifier},
    sys::SyscallError,
    Ebpf, EbpfLoader,
};

// ---------------------------------------------------------------------------------------------
// Addresses of the test topology.
// ---------------------------------------------------------------------------------------------

type Ip4 = [u8; 4];

/// The ifindex the test run's skb carries (loopback).
const TEST_IFINDEX: u32 = 1;

const CLOUD: u32 = 7;
const OTHER_CLOUD: u32 = 8;

const GUEST_MAC: Mac = [0x02, 0xa7, 0, 0, 0, 0x02];
const GW_MAC: Mac = [0x02, 0xa7, 0, 0, 0, 0x01];
const GUEST_IP: Ip4 = [10, 0, 0, 2];
const GW_IP: Ip4 = [10, 0, 0, 1];
/// Counter slot of the guest endpoint.
const GUEST_SLOT: u32 = 0;

/// In cloud 7 *and* in cloud 8 (overlapping), with different next hops.
const PEER_IP: Ip4 = [10, 0, 0, 3];
const PEER_MAC: Mac = [0x02, 0xa7, 0, 0, 0, 0x03];
const PEER_IFINDEX: u32 = 42;
const OTHER_PEER_MAC: Mac = [0x02, 0xa7, 0, 0, 0x08, 0x03];
const OTHER_PEER_IFINDEX: u32 = 44;

/// Only in cloud 8.
const OTHER_ONLY_IP: Ip4 = [10, 0, 0, 4];
const OTHER_ONLY_MAC: Mac = [0x02, 0xa7, 0, 0, 0x08, 0x04];
const OTHER_ONLY_IFINDEX: u32 = 43;

const ZERO_MAC: Mac = [0; 6];

use atoll_testbed::verdict::{try_run, verdict_name, Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const ARP_LEN: usize = 28;
const ICMP_ECHO_LEN: usize = 8;

fn endpoint(cloud: u32) -> EndpointInfo {
    EndpointInfo {
        cloud,
        ipv4: ipv4_to_map(GUEST_IP),
        gateway_ipv4: ipv4_to_map(GW_IP),
        mac: GUEST_MAC,
        gateway_mac: GW_MAC,
        slot: GUEST_SLOT,
    }
}

// ---------------------------------------------------------------------------------------------
// Frames: the testbed's builders, composed for this topology.
// ---------------------------------------------------------------------------------------------

use atoll_testbed::frame::{
    checksum_verifies,
    layers::{
        arp, ethernet, icmp, udp, Ipv4Packet as Ipv4, Mac, TcpHeader, BROADCAST, ETH_P_8021AD,
        ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    },
    recomputed, TCP_SYN,
};

fn icmp_echo_request(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    icmp(8, 0, id, seq, data)
}

/// A SYN with an MSS option (1460).
fn tcp_syn(src: Ip4, dst: Ip4, sport: u16, dport: u16) -> Vec<u8> {
    TcpHeader {
        sport,
        dport,
        seq: 0x1234_5678,
        ack: 0,
        flags: TCP_SYN,
        options: vec![2, 4, 0x05, 0xb4],
    }
    .segment(src, dst, &[])
}

/// The three transport protocols forwarding is checked with.
#[derive(Clone, Copy, Debug)]
enum L4 {
    Icmp,
    Udp,
    Tcp,
}

const ALL_L4: [L4; 3] = [L4::Icmp, L4::Udp, L4::Tcp];

/// A packet from the guest to `dst` carrying `l4`.
fn guest_packet(dst: Ip4, l4: L4) -> Ipv4 {
    let (protocol, payload) = match l4 {
        L4::Icmp => (
            PROTO_ICMP,
            icmp_echo_request(0x4242, 1, b"atoll-ping-payload"),
        ),
        L4::Udp => (
            PROTO_UDP,
            udp(GUEST_IP, dst, 40000, 53, b"\x12\x34 some query"),
        ),
        L4::Tcp => (PROTO_TCP, tcp_syn(GUEST_IP, dst, 40001, 443)),
    };
    Ipv4::new(GUEST_IP, dst, protocol, payload)
}

/// `packet` as the guest sends it: to the gateway MAC, from its own MAC.
fn from_guest(packet: &Ipv4) -> Vec<u8> {
    ethernet(GW_MAC, GUEST_MAC, ETH_P_IP, &packet.bytes())
}

/// ICMP echo request from the guest to `dst`.
fn guest_echo(dst: Ip4, data: &[u8]) -> Ipv4 {
    Ipv4::new(
        GUEST_IP,
        dst,
        PROTO_ICMP,
        icmp_echo_request(0x0b0b, 7, data),
    )
}

/// A broadcast ARP request from the guest for `tpa`.
fn guest_arp_request(tpa: Ip4) -> Vec<u8> {
    ethernet(
        BROADCAST,
        GUEST_MAC,
        ETH_P_ARP,
        &arp(1, GUEST_MAC, GUEST_IP, ZERO_MAC, tpa),
    )
}

/// The reply `from_vm` must turn a guest's ARP request for `tpa` into.
fn expected_arp_reply(tpa: Ip4) -> Vec<u8> {
    ethernet(
        GUEST_MAC,
        GW_MAC,
        ETH_P_ARP,
        &arp(2, GW_MAC, tpa, GUEST_MAC, GUEST_IP),
    )
}

/// A frame as the dataplane delivers it to the guest (egress of the guest's device).
fn to_guest(packet: &Ipv4) -> Vec<u8> {
    ethernet(GUEST_MAC, GW_MAC, ETH_P_IP, &packet.bytes())
}

/// A 46-byte zero body behind an Ethernet header, from the guest to the gateway MAC.
fn guest_frame_with_type(ether_type: u16) -> Vec<u8> {
    ethernet(GW_MAC, GUEST_MAC, ether_type, &[0u8; 46])
}

// ---------------------------------------------------------------------------------------------
// The dataplane under test.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Prog {
    FromVm,
    ToVm,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::FromVm => PROG_FROM_VM,
            Prog::ToVm => PROG_TO_VM,
        }
    }
}

/// A private copy of the dataplane: both programs loaded, maps held directly.
struct Dataplane {
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    cache: Array<MapData, EndpointSlot>,
    routes: HashMap<MapData, RouteKey, NextHop>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, EndpointCounters>,
}

fn assert_root() {
    atoll_testbed::require_root("the verdict tests");
}

impl Dataplane {
    /// Loaded, with empty `ENDPOINTS` and `ROUTES`.
    fn empty() -> Self {
        Self::empty_with_metering(true)
    }

    /// As `empty`, with metering compiled out at load (`METERING` = 0) when `metering` is false.
    fn empty_with_metering(metering: bool) -> Self {
        assert_root();
        // Small maps: every test (one per thread) holds its own copy.
        let mut ebpf = EbpfLoader::new()
            .override_global("METERING", &u32::from(metering), true)
            .map_max_entries(MAP_ENDPOINTS, 64)
            .map_max_entries(MAP_ROUTES, 64)
            .map_max_entries(MAP_COUNTERS, 64)
            .load(OBJECT)
            .expect("loading the embedded eBPF object");
        for name in [PROG_FROM_VM, PROG_TO_VM] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from the object"))
                .try_into()
                .expect("program is a SchedClassifier");
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name} (verifier): {e:?}"));
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .unwrap_or_else(|| panic!("map {name} missing from the object"))
        };
        let endpoints = HashMap::try_from(take(MAP_ENDPOINTS)).expect("ENDPOINTS type");
        let cache = Array::try_from(take(MAP_ENDPOINT_CACHE)).expect("ENDPOINT_CACHE type");
        let routes = HashMap::try_from(take(MAP_ROUTES)).expect("ROUTES type");
        let drops = PerCpuArray::try_from(take(MAP_DROPS)).expect("DROPS type");
        let counters = PerCpuArray::try_from(take(MAP_COUNTERS)).expect("COUNTERS type");
        Dataplane {
            ebpf,
            endpoints,
            cache,
            routes,
            drops,
            counters,
        }
    }

    /// The standard topology: the guest (cloud 7) on ifindex 1, peer 10.0.0.3 in cloud 7;
    /// cloud 8 has 10.0.0.4 and its own 10.0.0.3.
    fn new() -> Self {
        let mut dp = Self::empty();
        dp.set_endpoint(TEST_IFINDEX, endpoint(CLOUD));
        dp.add_route(CLOUD, PEER_IP, PEER_IFINDEX, PEER_MAC);
        dp.add_route(
            OTHER_CLOUD,
            OTHER_ONLY_IP,
            OTHER_ONLY_IFINDEX,
            OTHER_ONLY_MAC,
        );
        dp.add_route(OTHER_CLOUD, PEER_IP, OTHER_PEER_IFINDEX, OTHER_PEER_MAC);
        dp
    }

    fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) {
        self.endpoints
            .insert(ifindex, info, 0)
            .expect("writing ENDPOINTS");
    }

    /// Writes a slot of the direct-mapped endpoint cache (as the agent does on create).
    fn set_cache_slot(&mut self, ifindex_in_slot: u32, info: EndpointInfo) {
        let slot = ifindex_in_slot & ENDPOINT_CACHE_MASK;
        self.cache
            .set(
                slot,
                EndpointSlot {
                    ifindex: ifindex_in_slot,
                    info,
                },
                0,
            )
            .expect("writing ENDPOINT_CACHE");
    }

    fn remove_endpoint(&mut self, ifindex: u32) {
        self.endpoints
            .remove(&ifindex)
            .expect("removing from ENDPOINTS");
    }

    fn add_route(&mut self, cloud: u32, ip: Ip4, ifindex: u32, mac: Mac) {
        let key = RouteKey {
            cloud,
            ipv4: ipv4_to_map(ip),
        };
        // Next hops use their ifindex as counter slot (all below the test map size).
        let hop = NextHop {
            ifindex,
            slot: ifindex,
            mac,
            flags: 0,
        };
        self.routes.insert(key, hop, 0).expect("writing ROUTES");
    }

    /// The metering counters of `slot`, summed over CPUs.
    fn metered(&self, slot: u32) -> EndpointCounters {
        let per_cpu = self.counters.get(&slot, 0).expect("reading COUNTERS");
        sum_counters(per_cpu.iter())
    }

    fn counters(&self) -> Vec<(DropReason, u64)> {
        read_drop_counters(&self.drops).expect("reading DROPS")
    }

    /// Runs `prog` once on `frame`; `Err` is the syscall's error.
    fn try_run(&self, prog: Prog, frame: &[u8]) -> Result<Run, ProgramError> {
        let classifier: &SchedClassifier = self
            .ebpf
            .program(prog.name())
            .expect("program present")
            .try_into()
            .expect("program is a SchedClassifier");
        try_run(classifier, frame, || self.counters())
    }

    fn run(&self, prog: Prog, frame: &[u8], what: &str) -> Run {
        self.try_run(prog, frame)
            .unwrap_or_else(|e| panic!("{what}: test run of {} failed: {e:?}", prog.name()))
    }

    /// Asserts a drop counted exactly once under `reason` and under nothing else.
    fn expect_drop(&self, prog: Prog, frame: &[u8], reason: DropReason, what: &str) {
        let r = self.run(prog, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_SHOT, &BTreeMap::from([(reason, 1)])),
            "{what}: {} should drop with {reason:?}; got {} ({}) and counter changes {:?}\n\
             frame: {frame:02x?}",
            prog.name(),
            r.ret,
            verdict_name(r.ret),
            r.drops,
        );
    }

    /// Asserts `from_vm` redirects without counting a drop; returns the rewritten frame.
    fn expect_redirect(&self, frame: &[u8], what: &str) -> Vec<u8> {
        let r = self.run(Prog::FromVm, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_REDIRECT, &BTreeMap::new()),
            "{what}: from_vm should redirect without drops; got {} ({}) and counter changes \
             {:?}\nframe: {frame:02x?}",
            r.ret,
            verdict_name(r.ret),
            r.drops,
        );
        assert_eq!(
            r.out.len(),
            frame.len(),
            "{what}: the frame length must not change"
        );
        r.out
    }

    /// Asserts `prog` passes the frame unchanged without counting a drop.
    fn expect_pass(&self, prog: Prog, frame: &[u8], what: &str) {
        let r = self.run(prog, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_OK, &BTreeMap::new()),
            "{what}: {} should pass without drops; got {} ({}) and counter changes {:?}\n\
             frame: {frame:02x?}",
            prog.name(),
            r.ret,
            verdict_name(r.ret),
            r.drops,
        );
        assert_eq!(r.out, frame, "{what}: a passed frame must be unchanged");
    }
}

/// Checks a forwarded frame against its input: MACs rewritten, TTL decremented, header checksum
/// valid and equal to a full recomputation, everything else unchanged.
fn assert_forwarded(input: &[u8], out: &[u8], next_hop_mac: Mac, what: &str) {
    assert_eq!(out.len(), input.len(), "{what}: length");
    assert_eq!(
        out[0..6],
        next_hop_mac,
        "{what}: destination MAC = next hop"
    );
    assert_eq!(out[6..12], GW_MAC, "{what}: source MAC = gateway");
    assert_eq!(out[12..14], input[12..14], "{what}: ethertype");
    let ip_in = &input[ETH_LEN..ETH_LEN + IPV4_LEN];
    let ip_out = &out[ETH_LEN..ETH_LEN + IPV4_LEN];
    assert_eq!(ip_out[8], ip_in[8] - 1, "{what}: TTL decremented by one");
    assert!(
        checksum_verifies(ip_out),
        "{what}: IPv4 header checksum invalid: {ip_out:02x?}"
    );
    assert_eq!(
        u16::from_be_bytes([ip_out[10], ip_out[11]]),
        recomputed(ip_out, 10),
        "{what}: IPv4 header checksum differs from a full recomputation"
    );
    for (i, (a, b)) in ip_in.iter().zip(ip_out).enumerate() {
        if i != 8 && i != 10 && i != 11 {
            assert_eq!(a, b, "{what}: IPv4 header byte {i} changed");
        }
    }
    assert_eq!(
        out[ETH_LEN + IPV4_LEN..],
        input[ETH_LEN + IPV4_LEN..],
        "{what}: payload changed"
    );
}

// ---------------------------------------------------------------------------------------------
// from_vm: forwarding and isolation.
// ---------------------------------------------------------------------------------------------

#[test]
fn forwards_icmp_udp_tcp_to_in_cloud_peer() {
    let dp = Dataplane::new();
    for l4 in ALL_L4 {
        for ttl in [2u8, 64, 128, 255] {
            let mut p = guest_packet(PEER_IP, l4);
            p.ttl = ttl;
            let what = format!("{l4:?} ttl {ttl} to 10.0.0.3");
            let frame = from_guest(&p);
            let out = dp.expect_redirect(&frame, &what);
            assert_forwarded(&frame, &out, PEER_MAC, &what);
            // Independently built expectation of the whole frame.
            let mut expected = p.clone();
            expected.ttl = ttl - 1;
            assert_eq!(
                out,
                ethernet(PEER_MAC, GW_MAC, ETH_P_IP, &expected.bytes()),
                "{what}"
            );
        }
    }
}

#[test]
fn forwarding_keeps_the_header_checksum_valid_across_carries() {
    // Sweep the id so the incremental update meets every low/high byte combination, including
    // carries out of the high byte.
    let dp = Dataplane::new();
    let mut checked = 0;
    for id in (0..=u16::MAX).step_by(257) {
        for ttl in [2u8, 17, 64, 255] {
            let mut p = guest_packet(PEER_IP, L4::Udp);
            p.id = id;
            p.ttl = ttl;
            let frame = from_guest(&p);
            if frame[ETH_LEN + 10..ETH_LEN + 12] == [0xFE, 0xFF] {
                continue; // the -0 edge case has its own test
            }
            let what = format!("UDP id {id:#06x} ttl {ttl}");
            let out = dp.expect_redirect(&frame, &what);
            assert_forwarded(&frame, &out, PEER_MAC, &what);
            checked += 1;
        }
    }
    assert!(checked > 1000);
}

/// Finds an IP id for which the header checksum of `p` (before forwarding) is `want`.
fn id_with_header_checksum(p: &Ipv4, want: u16) -> u16 {
    (0..=u16::MAX)
        .find(|id| {
            let mut q = p.clone();
            q.id = *id;
            u16::from_be_bytes(q.header()[10..12].try_into().unwrap()) == want
        })
        .expect("some id gives every checksum")
}

#[test]
fn ttl_decrement_checksum_edge_case_matches_full_recompute() {
    // Header checksum 0xFEFF before forwarding: after the TTL decrement the other header words
    // sum to 0xFFFF (-0), so the correct checksum is its complement 0x0000. Adding 0x0100 with
    // end-around carry (RFC 1624 eqn. 2) yields 0xFFFF here instead; RFC 1624 section 3 shows
    // this very case, and the kernel's ip_decrease_ttl() maps the result to 0x0000 (its comment:
    // "The function in 2.2 was invalid, producing wrong result for check=0xFEFF"). A receiver
    // that sums the header accepts both; one that recomputes and compares rejects 0xFFFF.
    let dp = Dataplane::new();
    let mut p = guest_packet(PEER_IP, L4::Icmp);
    p.id = id_with_header_checksum(&p, 0xFEFF);
    let frame = from_guest(&p);
    let out = dp.expect_redirect(&frame, "TTL decrement edge case");
    let ip_out = &out[ETH_LEN..ETH_LEN + IPV4_LEN];
    assert!(
        checksum_verifies(ip_out),
        "header must verify: {ip_out:02x?}"
    );
    assert_eq!(
        ip_out[10..12],
        [0x00, 0x00],
        "checksum after TTL decrement should be the fully recomputed 0x0000 (as \
         ip_decrease_ttl() writes), not -0 (0xFFFF)"
    );
}

#[test]
fn cross_cloud_destination_has_no_route() {
    let dp = Dataplane::new();
    for l4 in ALL_L4 {
        let frame = from_guest(&guest_packet(OTHER_ONLY_IP, l4));
        dp.expect_drop(
            Prog::FromVm,
            &frame,
            DropReason::NoRouteInCloud,
            &format!("{l4:?} to 10.0.0.4 (cloud 8 only)"),
        );
    }
    for dst in [
        [10, 0, 0, 9],
        [192, 168, 1, 1],
        [0, 0, 0, 0],
        [10, 0, 0, 255],
    ] {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&guest_packet(dst, L4::Udp)),
            DropReason::NoRouteInCloud,
            &format!("UDP to {dst:?} (nowhere)"),
        );
    }
    // The guest's own address has no route in this topology either.
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&guest_packet(GUEST_IP, L4::Icmp)),
        DropReason::NoRouteInCloud,
        "ICMP to itself without a route",
    );
}

#[test]
fn overlapping_addresses_are_looked_up_in_the_senders_cloud() {
    let mut dp = Dataplane::new();
    let frame = from_guest(&guest_packet(PEER_IP, L4::Icmp));

    let out = dp.expect_redirect(&frame, "cloud 7 -> 10.0.0.3");
    assert_forwarded(&frame, &out, PEER_MAC, "cloud 7 -> 10.0.0.3");

    // The same device, addresses and frame, but the endpoint now belongs to cloud 8.
    dp.set_endpoint(TEST_IFINDEX, endpoint(OTHER_CLOUD));
    let out = dp.expect_redirect(&frame, "cloud 8 -> 10.0.0.3");
    assert_forwarded(&frame, &out, OTHER_PEER_MAC, "cloud 8 -> 10.0.0.3");

    let frame4 = from_guest(&guest_packet(OTHER_ONLY_IP, L4::Icmp));
    let out = dp.expect_redirect(&frame4, "cloud 8 -> 10.0.0.4");
    assert_forwarded(&frame4, &out, OTHER_ONLY_MAC, "cloud 8 -> 10.0.0.4");

    // A second private copy in cloud 8 from the start agrees, and the first is independent.
    let mut dp8 = Dataplane::new();
    dp8.set_endpoint(TEST_IFINDEX, endpoint(OTHER_CLOUD));
    let out = dp8.expect_redirect(&frame, "second copy, cloud 8 -> 10.0.0.3");
    assert_forwarded(
        &frame,
        &out,
        OTHER_PEER_MAC,
        "second copy, cloud 8 -> 10.0.0.3",
    );
    dp.set_endpoint(TEST_IFINDEX, endpoint(CLOUD));
    let out = dp.expect_redirect(&frame, "back in cloud 7 -> 10.0.0.3");
    assert_forwarded(&frame, &out, PEER_MAC, "back in cloud 7 -> 10.0.0.3");
    dp.expect_drop(
        Prog::FromVm,
        &frame4,
        DropReason::NoRouteInCloud,
        "back in cloud 7 -> 10.0.0.4",
    );
}

#[test]
fn a_cloud_without_routes_reaches_nothing() {
    let mut dp = Dataplane::new();
    dp.set_endpoint(TEST_IFINDEX, endpoint(99));
    for dst in [PEER_IP, OTHER_ONLY_IP] {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&guest_packet(dst, L4::Tcp)),
            DropReason::NoRouteInCloud,
            &format!("cloud 99 -> {dst:?}"),
        );
        dp.expect_drop(
            Prog::FromVm,
            &guest_arp_request(dst),
            DropReason::ArpUnknownTarget,
            &format!("cloud 99 ARP for {dst:?}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// from_vm: anti-spoofing.
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_source_mac_is_dropped_before_anything_else() {
    let dp = Dataplane::new();
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 to peer", from_guest(&guest_packet(PEER_IP, L4::Icmp))),
        ("IPv4 to gateway", from_guest(&guest_echo(GW_IP, b""))),
        ("ARP request", guest_arp_request(GW_IP)),
        ("IPv6", guest_frame_with_type(ETH_P_IPV6)),
        ("VLAN", guest_frame_with_type(ETH_P_8021Q)),
        ("LLDP", guest_frame_with_type(0x88cc)),
        (
            "bare ARP ethertype",
            ethernet(GW_MAC, GUEST_MAC, ETH_P_ARP, &[]),
        ),
    ];
    for src in [
        GW_MAC,
        PEER_MAC,
        BROADCAST,
        ZERO_MAC,
        [0x02, 0xa7, 0, 0, 0, 0x12],
        [0x03, 0xa7, 0, 0, 0, 0x02],
    ] {
        for (name, frame) in &bodies {
            let mut f = frame.clone();
            f[6..12].copy_from_slice(&src);
            dp.expect_drop(
                Prog::FromVm,
                &f,
                DropReason::SpoofedSourceMac,
                &format!("{name} from {src:02x?}"),
            );
        }
    }
}

#[test]
fn wrong_source_ip_is_dropped() {
    let dp = Dataplane::new();
    for src in [
        PEER_IP,
        OTHER_ONLY_IP,
        GW_IP,
        [0, 0, 0, 0],
        [10, 0, 0, 20],
        [2, 0, 0, 10],
    ] {
        for dst in [PEER_IP, GW_IP, OTHER_ONLY_IP, [255, 255, 255, 255]] {
            let mut p = guest_packet(dst, L4::Icmp);
            p.src = src;
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&p),
                DropReason::SpoofedSourceIp,
                &format!("from {src:?} to {dst:?}"),
            );
        }
    }
}

#[test]
fn arp_with_foreign_sender_is_dropped() {
    let dp = Dataplane::new();
    let cases = [
        (
            "sender MAC of the peer",
            arp(1, PEER_MAC, GUEST_IP, ZERO_MAC, GW_IP),
        ),
        (
            "sender MAC of the gateway",
            arp(1, GW_MAC, GUEST_IP, ZERO_MAC, GW_IP),
        ),
        (
            "zero sender MAC",
            arp(1, ZERO_MAC, GUEST_IP, ZERO_MAC, PEER_IP),
        ),
        (
            "sender IP of the peer",
            arp(1, GUEST_MAC, PEER_IP, ZERO_MAC, GW_IP),
        ),
        (
            "sender IP of the gateway",
            arp(1, GUEST_MAC, GW_IP, ZERO_MAC, PEER_IP),
        ),
        (
            "foreign sender IP",
            arp(1, GUEST_MAC, [10, 0, 0, 77], ZERO_MAC, GW_IP),
        ),
        ("both foreign", arp(1, PEER_MAC, PEER_IP, ZERO_MAC, GW_IP)),
    ];
    for (name, body) in cases {
        for dst in [BROADCAST, GW_MAC] {
            dp.expect_drop(
                Prog::FromVm,
                &ethernet(dst, GUEST_MAC, ETH_P_ARP, &body),
                DropReason::ArpSpoofed,
                &format!("{name} to {dst:02x?}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation.
// ---------------------------------------------------------------------------------------------

fn is_einval(r: &Result<Run, ProgramError>) -> bool {
    matches!(
        r,
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::EINVAL)
    )
}

/// Asserts the kernel refuses `frame` with EINVAL before running `prog`: no counter changes.
fn expect_refused_by_kernel(dp: &Dataplane, prog: Prog, frame: &[u8], what: &str) {
    let before = dp.counters();
    let r = dp.try_run(prog, frame);
    assert!(
        is_einval(&r),
        "{what}: {} with {} bytes: expected EINVAL from BPF_PROG_TEST_RUN, got {}",
        prog.name(),
        frame.len(),
        match &r {
            Ok(run) => format!("verdict {} and counter changes {:?}", run.ret, run.drops),
            Err(e) => format!("{e:?}"),
        }
    );
    assert_eq!(dp.counters(), before, "{what}: no counter may change");
}

/// Minimum `data_in` length BPF_PROG_TEST_RUN accepts for a SCHED_CLS program, by ethertype
/// (measured on Linux 6.18). The kernel derives `skb->protocol` with `eth_type_trans()` and
/// refuses with EINVAL, before the program runs, anything shorter than an Ethernet header and
/// IPv4/IPv6 frames too short for their fixed network header.
fn test_run_min_len(ether_type: u16) -> usize {
    match ether_type {
        ETH_P_IP => ETH_LEN + IPV4_LEN,
        ETH_P_IPV6 => ETH_LEN + 40,
        _ => ETH_LEN,
    }
}

#[test]
fn test_run_refuses_frames_shorter_than_their_link_and_network_headers() {
    // Consequences for the programs: their `TruncatedEthernet` branches, the "shorter than the
    // IPv4 header" half of `Ipv4Truncated` (from_vm) and to_vm's `Ipv4Truncated` cannot be
    // reached through a test run; those frames are refused here instead. (A real device does
    // not hand TC frames shorter than its hard header either; short IPv4 frames can still
    // arrive from a guest and then take the program's own bounds checks.)
    let mut dp = Dataplane::new();
    for round in ["with endpoint", "without endpoint"] {
        if round == "without endpoint" {
            dp.remove_endpoint(TEST_IFINDEX);
        }
        for ether_type in [ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q, 0x88cc, 0x0000] {
            let frame = ethernet(GW_MAC, GUEST_MAC, ether_type, &[0x45; 66]);
            let min = test_run_min_len(ether_type);
            for prog in [Prog::FromVm, Prog::ToVm] {
                for len in 0..min {
                    expect_refused_by_kernel(
                        &dp,
                        prog,
                        &frame[..len],
                        &format!("{round}, ethertype {ether_type:#06x}"),
                    );
                }
                for len in min..frame.len() {
                    dp.run(
                        prog,
                        &frame[..len],
                        &format!("{round}, ethertype {ether_type:#06x}, {len} bytes"),
                    );
                }
            }
        }
    }
}

#[test]
fn ipv4_truncated_at_every_length() {
    let dp = Dataplane::new();
    let frame = from_guest(&guest_packet(PEER_IP, L4::Icmp));
    // Shorter than Ethernet + IPv4 header: refused by the kernel (see
    // test_run_refuses_frames_shorter_than_their_link_and_network_headers).
    for len in 0..ETH_LEN + IPV4_LEN {
        expect_refused_by_kernel(&dp, Prog::FromVm, &frame[..len], "short IPv4 frame");
    }
    // Complete IPv4 header, total_length beyond the frame.
    for len in ETH_LEN + IPV4_LEN..frame.len() {
        dp.expect_drop(
            Prog::FromVm,
            &frame[..len],
            DropReason::Ipv4Truncated,
            &format!("ICMP to peer truncated to {len} bytes"),
        );
    }
    dp.expect_redirect(&frame, "the untruncated frame");
}

#[test]
fn ipv4_total_length_beyond_the_frame_is_truncated() {
    let dp = Dataplane::new();
    for l4 in ALL_L4 {
        for extra in [1u16, 2, 100, 1500, u16::MAX / 2] {
            let mut p = guest_packet(PEER_IP, l4);
            let real = (IPV4_LEN + p.payload.len()) as u16;
            p.total_len = Some(real.saturating_add(extra));
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&p),
                DropReason::Ipv4Truncated,
                &format!("{l4:?} total_length {} bytes beyond the frame", extra),
            );
        }
        let mut p = guest_packet(PEER_IP, l4);
        p.total_len = Some(u16::MAX);
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&p),
            DropReason::Ipv4Truncated,
            &format!("{l4:?} total_length 65535"),
        );
    }
}

#[test]
fn ethernet_padding_after_the_ipv4_packet_is_forwarded() {
    // A 42-byte frame padded to the 60-byte Ethernet minimum: total_length < frame is fine.
    let dp = Dataplane::new();
    let p = Ipv4::new(
        GUEST_IP,
        PEER_IP,
        PROTO_UDP,
        udp(GUEST_IP, PEER_IP, 1, 2, &[]),
    );
    let mut frame = from_guest(&p);
    frame.resize(60, 0);
    let out = dp.expect_redirect(&frame, "padded UDP");
    assert_forwarded(&frame, &out, PEER_MAC, "padded UDP");
}

#[test]
fn arp_truncated_at_every_length() {
    let dp = Dataplane::new();
    let frame = guest_arp_request(GW_IP);
    assert_eq!(frame.len(), ETH_LEN + ARP_LEN);
    for len in ETH_LEN..frame.len() {
        dp.expect_drop(
            Prog::FromVm,
            &frame[..len],
            DropReason::ArpMalformed,
            &format!("ARP request truncated to {len} bytes"),
        );
    }
    dp.expect_redirect(&frame, "the untruncated ARP request");
}

#[test]
fn gateway_echo_truncated_inside_the_icmp_header() {
    let dp = Dataplane::new();
    let full = icmp_echo_request(1, 1, b"");
    assert_eq!(full.len(), ICMP_ECHO_LEN);
    for keep in 0..ICMP_ECHO_LEN {
        // total_length matches the frame: the IPv4 layer is intact, ICMP is cut short.
        let p = Ipv4::new(GUEST_IP, GW_IP, PROTO_ICMP, full[..keep].to_vec());
        let frame = from_guest(&p);
        assert_eq!(frame.len(), ETH_LEN + IPV4_LEN + keep);
        dp.expect_drop(
            Prog::FromVm,
            &frame,
            DropReason::GatewayIcmpMalformed,
            &format!("echo to gateway with {keep} ICMP bytes"),
        );
    }
}

#[test]
fn gateway_echo_cut_short_by_total_length_is_malformed_despite_padding() {
    // The ICMP message is what total_length says, not what the frame carries: an echo request
    // whose total_length leaves fewer than 8 ICMP bytes is truncated even if Ethernet padding
    // (here: the rest of a complete echo header, as a guest may pad to 60 bytes) follows.
    // Every case is run before asserting, so a failure lists all of them.
    let dp = Dataplane::new();
    let full = icmp_echo_request(0x0101, 1, b"");
    let mut wrong = Vec::new();
    for keep in 0..ICMP_ECHO_LEN {
        let mut p = Ipv4::new(GUEST_IP, GW_IP, PROTO_ICMP, full.clone());
        p.total_len = Some((IPV4_LEN + keep) as u16);
        let mut frame = from_guest(&p);
        frame.resize(60, 0);
        let r = dp.run(Prog::FromVm, &frame, "padded short echo");
        let expected = BTreeMap::from([(DropReason::GatewayIcmpMalformed, 1)]);
        if r.ret != TC_ACT_SHOT || r.drops != expected {
            wrong.push(format!(
                "total_length {} ({keep} ICMP bytes): {} ({}), counter changes {:?}",
                IPV4_LEN + keep,
                r.ret,
                verdict_name(r.ret),
                r.drops
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "echo requests to the gateway with fewer than 8 ICMP bytes by total_length (frame \
         padded to 60 bytes) must drop with GatewayIcmpMalformed; instead:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed IPv4, TTL, fragments.
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_ipv4_headers() {
    let dp = Dataplane::new();
    let base = guest_packet(PEER_IP, L4::Icmp);
    let with = |f: &dyn Fn(&mut Ipv4)| {
        let mut p = base.clone();
        f(&mut p);
        from_guest(&p)
    };
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "version 6",
            with(&|p| p.version = 6),
            DropReason::Ipv4Malformed,
        ),
        (
            "version 0",
            with(&|p| p.version = 0),
            DropReason::Ipv4Malformed,
        ),
        (
            "version 15",
            with(&|p| p.version = 15),
            DropReason::Ipv4Malformed,
        ),
        (
            "IHL 0",
            with(&|p| p.ihl = Some(0)),
            DropReason::Ipv4Malformed,
        ),
        (
            "IHL 4",
            with(&|p| p.ihl = Some(4)),
            DropReason::Ipv4Malformed,
        ),
        (
            "version 6 and IHL 6",
            with(&|p| {
                p.version = 6;
                p.options = vec![1, 1, 1, 0];
            }),
            DropReason::Ipv4Malformed,
        ),
        (
            "IHL 6 (NOP options)",
            with(&|p| p.options = vec![1, 1, 1, 0]),
            DropReason::Ipv4Options,
        ),
        (
            "IHL 15 (40 option bytes)",
            with(&|p| p.options = vec![1; 40]),
            DropReason::Ipv4Options,
        ),
        (
            "IHL 6 claimed, no option bytes",
            with(&|p| p.ihl = Some(6)),
            DropReason::Ipv4Options,
        ),
        (
            "total_length 0",
            with(&|p| p.total_len = Some(0)),
            DropReason::Ipv4Malformed,
        ),
        (
            "total_length 19",
            with(&|p| p.total_len = Some(19)),
            DropReason::Ipv4Malformed,
        ),
    ];
    for (name, frame, reason) in cases {
        dp.expect_drop(Prog::FromVm, &frame, reason, name);
    }
    // total_length exactly the header (no payload) is well formed and forwarded.
    let frame = with(&|p| p.payload.clear());
    let out = dp.expect_redirect(&frame, "total_length 20");
    assert_forwarded(&frame, &out, PEER_MAC, "total_length 20");
}

#[test]
fn ttl_zero_and_one_expire() {
    let dp = Dataplane::new();
    for ttl in [0u8, 1] {
        for l4 in ALL_L4 {
            for dst in [PEER_IP, OTHER_ONLY_IP] {
                let mut p = guest_packet(dst, l4);
                p.ttl = ttl;
                dp.expect_drop(
                    Prog::FromVm,
                    &from_guest(&p),
                    DropReason::TtlExceeded,
                    &format!("{l4:?} TTL {ttl} to {dst:?}"),
                );
            }
        }
    }
}

#[test]
fn ttl_does_not_apply_to_the_gateway_itself() {
    // Packets addressed to the gateway are delivered locally, not forwarded.
    let dp = Dataplane::new();
    for ttl in [0u8, 1] {
        let mut p = guest_echo(GW_IP, b"x");
        p.ttl = ttl;
        let out = dp.expect_redirect(&from_guest(&p), &format!("echo TTL {ttl} to gateway"));
        assert_eq!(out, expected_echo_reply(&p), "echo TTL {ttl} to gateway");
    }
}

#[test]
fn fragments_to_a_peer_are_forwarded() {
    let dp = Dataplane::new();
    for (name, frag_off) in [
        ("MF", 0x2000u16),
        ("MF with DF", 0x6000),
        ("offset 1", 0x0001),
        ("offset 185 with MF", 0x20b9),
        ("last offset", 0x1FFF),
        ("DF only (not a fragment)", 0x4000),
        ("no flags", 0x0000),
    ] {
        for l4 in ALL_L4 {
            let mut p = guest_packet(PEER_IP, l4);
            p.frag_off = frag_off;
            let what = format!("{l4:?} {name} to peer");
            let frame = from_guest(&p);
            let out = dp.expect_redirect(&frame, &what);
            assert_forwarded(&frame, &out, PEER_MAC, &what);
        }
    }
}

#[test]
fn fragmented_echo_to_the_gateway_is_malformed() {
    let dp = Dataplane::new();
    for (name, frag_off) in [
        ("MF", 0x2000u16),
        ("MF with DF", 0x6000),
        ("offset 1", 0x0001),
        ("offset 185, last", 0x00b9),
    ] {
        let mut p = guest_echo(GW_IP, b"fragment");
        p.frag_off = frag_off;
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&p),
            DropReason::GatewayIcmpMalformed,
            &format!("echo {name} to gateway"),
        );
    }
    // DF alone is not a fragment.
    let mut p = guest_echo(GW_IP, b"whole");
    p.frag_off = 0x4000;
    let out = dp.expect_redirect(&from_guest(&p), "echo DF to gateway");
    assert_eq!(out, expected_echo_reply(&p));
}

// ---------------------------------------------------------------------------------------------
// Ethertypes and group destinations.
// ---------------------------------------------------------------------------------------------

#[test]
fn non_ipv4_ethertypes() {
    let dp = Dataplane::new();
    let cases = [
        (ETH_P_8021Q, DropReason::VlanTagged),
        (ETH_P_8021AD, DropReason::VlanTagged),
        (ETH_P_IPV6, DropReason::Ipv6NotSupported),
        (0x88cc, DropReason::NonIpEthertype), // LLDP
        (0x0000, DropReason::NonIpEthertype), // 802.3 length field
        (0x05dc, DropReason::NonIpEthertype), // 802.3 length 1500
        (0x8035, DropReason::NonIpEthertype), // RARP
        (0x9100, DropReason::NonIpEthertype), // pre-standard QinQ
        (0x88e5, DropReason::NonIpEthertype), // MACsec
        (0x8847, DropReason::NonIpEthertype), // MPLS
        (0xffff, DropReason::NonIpEthertype),
        (0x0008, DropReason::NonIpEthertype), // IPv4 byte-swapped
        (0x0608, DropReason::NonIpEthertype), // ARP byte-swapped
    ];
    for (ether_type, reason) in cases {
        for dst in [GW_MAC, BROADCAST] {
            dp.expect_drop(
                Prog::FromVm,
                &ethernet(dst, GUEST_MAC, ether_type, &[0u8; 46]),
                reason,
                &format!("ethertype {ether_type:#06x} to {dst:02x?}"),
            );
        }
    }
    // A real IPv4 packet inside an 802.1Q tag is still a VLAN frame.
    let inner = guest_packet(PEER_IP, L4::Icmp).bytes();
    let mut tagged = vec![0x00, 0x05, 0x08, 0x00]; // VID 5, inner type IPv4
    tagged.extend_from_slice(&inner);
    dp.expect_drop(
        Prog::FromVm,
        &ethernet(GW_MAC, GUEST_MAC, ETH_P_8021Q, &tagged),
        DropReason::VlanTagged,
        "IPv4 in VLAN 5",
    );
}

#[test]
fn ipv4_to_group_or_foreign_macs() {
    let dp = Dataplane::new();
    let packet = guest_packet(PEER_IP, L4::Udp).bytes();
    let cases = [
        (BROADCAST, DropReason::GroupDestinationMac),
        ([0x01, 0x00, 0x5e, 0, 0, 1], DropReason::GroupDestinationMac),
        ([0x33, 0x33, 0, 0, 0, 1], DropReason::GroupDestinationMac),
        ([0x03, 0xa7, 0, 0, 0, 0x01], DropReason::GroupDestinationMac), // gateway MAC | group bit
        (PEER_MAC, DropReason::NotToGatewayMac),
        (GUEST_MAC, DropReason::NotToGatewayMac),
        (ZERO_MAC, DropReason::NotToGatewayMac),
        ([0x02, 0xa7, 0, 0, 0, 0x11], DropReason::NotToGatewayMac),
        ([0x12, 0xa7, 0, 0, 0, 0x01], DropReason::NotToGatewayMac),
    ];
    for (dst, reason) in cases {
        dp.expect_drop(
            Prog::FromVm,
            &ethernet(dst, GUEST_MAC, ETH_P_IP, &packet),
            reason,
            &format!("IPv4 to MAC {dst:02x?}"),
        );
    }
}

#[test]
fn ipv4_to_group_addresses() {
    let dp = Dataplane::new();
    for dst in [
        [255, 255, 255, 255],
        [224, 0, 0, 1],
        [224, 0, 0, 251],
        [239, 255, 255, 250],
        [233, 1, 2, 3],
    ] {
        for l4 in ALL_L4 {
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&guest_packet(dst, l4)),
                DropReason::GroupDestinationIp,
                &format!("{l4:?} to {dst:?}"),
            );
        }
    }
    // 240.0.0.0/4 is not multicast: it is simply not routed.
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&guest_packet([240, 0, 0, 1], L4::Udp)),
        DropReason::NoRouteInCloud,
        "UDP to 240.0.0.1",
    );
}

// ---------------------------------------------------------------------------------------------
// from_vm: ARP responder.
// ---------------------------------------------------------------------------------------------

#[test]
fn arp_request_for_the_gateway_is_answered() {
    let dp = Dataplane::new();
    let frame = guest_arp_request(GW_IP);
    let out = dp.expect_redirect(&frame, "ARP for gateway");
    // Field by field for readable failures, then the whole frame.
    let a = &out[ETH_LEN..];
    assert_eq!(out[0..6], GUEST_MAC, "eth dst = guest");
    assert_eq!(out[6..12], GW_MAC, "eth src = gateway");
    assert_eq!(out[12..14], [0x08, 0x06], "ethertype ARP");
    assert_eq!(a[0..6], [0, 1, 0x08, 0x00, 6, 4], "htype/ptype/hlen/plen");
    assert_eq!(a[6..8], [0, 2], "op = reply");
    assert_eq!(a[8..14], GW_MAC, "sha = gateway MAC");
    assert_eq!(a[14..18], GW_IP, "spa = gateway IP");
    assert_eq!(a[18..24], GUEST_MAC, "tha = guest MAC");
    assert_eq!(a[24..28], GUEST_IP, "tpa = guest IP");
    assert_eq!(out, expected_arp_reply(GW_IP));
}

#[test]
fn arp_request_for_an_in_cloud_peer_is_answered_with_the_gateway_mac() {
    let dp = Dataplane::new();
    let out = dp.expect_redirect(&guest_arp_request(PEER_IP), "ARP for 10.0.0.3");
    assert_eq!(out, expected_arp_reply(PEER_IP));
}

#[test]
fn arp_request_variants_that_are_answered() {
    let dp = Dataplane::new();
    // Unicast to the gateway MAC (cache refresh).
    let unicast = ethernet(
        GW_MAC,
        GUEST_MAC,
        ETH_P_ARP,
        &arp(1, GUEST_MAC, GUEST_IP, GW_MAC, GW_IP),
    );
    let out = dp.expect_redirect(&unicast, "unicast ARP to gateway MAC");
    assert_eq!(out, expected_arp_reply(GW_IP));
    // Target hardware address set to broadcast (some stacks do).
    let tha_ff = ethernet(
        BROADCAST,
        GUEST_MAC,
        ETH_P_ARP,
        &arp(1, GUEST_MAC, GUEST_IP, BROADCAST, PEER_IP),
    );
    let out = dp.expect_redirect(&tha_ff, "ARP with tha ff:ff..");
    assert_eq!(out, expected_arp_reply(PEER_IP));
    // Padded to the Ethernet minimum: the padding is carried along untouched.
    let mut padded = guest_arp_request(GW_IP);
    padded.resize(60, 0xA5);
    let out = dp.expect_redirect(&padded, "padded ARP");
    let mut expected = expected_arp_reply(GW_IP);
    expected.resize(60, 0xA5);
    assert_eq!(out, expected, "padded ARP");
}

#[test]
fn arp_request_outside_the_cloud_is_not_answered() {
    let mut dp = Dataplane::new();
    for tpa in [OTHER_ONLY_IP, [10, 0, 0, 9], [10, 0, 0, 255], [8, 8, 8, 8]] {
        dp.expect_drop(
            Prog::FromVm,
            &guest_arp_request(tpa),
            DropReason::ArpUnknownTarget,
            &format!("ARP for {tpa:?} from cloud 7"),
        );
    }
    // From cloud 8, 10.0.0.4 is known.
    dp.set_endpoint(TEST_IFINDEX, endpoint(OTHER_CLOUD));
    let out = dp.expect_redirect(
        &guest_arp_request(OTHER_ONLY_IP),
        "ARP for 10.0.0.4 in cloud 8",
    );
    assert_eq!(out, expected_arp_reply(OTHER_ONLY_IP));
}

#[test]
fn arp_that_is_not_a_request_is_dropped() {
    let dp = Dataplane::new();
    let cases = [
        ("reply", arp(2, GUEST_MAC, GUEST_IP, GW_MAC, GW_IP)),
        ("op 0", arp(0, GUEST_MAC, GUEST_IP, ZERO_MAC, GW_IP)),
        (
            "RARP request op 3",
            arp(3, GUEST_MAC, GUEST_IP, ZERO_MAC, GW_IP),
        ),
        (
            "op 0x0100",
            arp(0x0100, GUEST_MAC, GUEST_IP, ZERO_MAC, GW_IP),
        ),
        (
            "gratuitous request",
            arp(1, GUEST_MAC, GUEST_IP, ZERO_MAC, GUEST_IP),
        ),
        (
            "gratuitous reply",
            arp(2, GUEST_MAC, GUEST_IP, BROADCAST, GUEST_IP),
        ),
        (
            "probe for own IP",
            arp(1, GUEST_MAC, [0, 0, 0, 0], ZERO_MAC, GUEST_IP),
        ),
        (
            "probe for gateway IP",
            arp(1, GUEST_MAC, [0, 0, 0, 0], ZERO_MAC, GW_IP),
        ),
    ];
    for (name, body) in cases {
        dp.expect_drop(
            Prog::FromVm,
            &ethernet(BROADCAST, GUEST_MAC, ETH_P_ARP, &body),
            DropReason::ArpNotRequest,
            name,
        );
    }
}

#[test]
fn arp_with_wrong_format_is_malformed() {
    let dp = Dataplane::new();
    let good = arp(1, GUEST_MAC, GUEST_IP, ZERO_MAC, GW_IP);
    let patch = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let cases = [
        ("htype 6 (IEEE 802)", patch(0, &[0, 6])),
        ("htype 0", patch(0, &[0, 0])),
        ("htype byte-swapped", patch(0, &[1, 0])),
        ("ptype IPv6", patch(2, &[0x86, 0xdd])),
        ("ptype byte-swapped", patch(2, &[0x00, 0x08])),
        ("hlen 8", patch(4, &[8])),
        ("hlen 0", patch(4, &[0])),
        ("plen 16", patch(5, &[16])),
        ("plen 0", patch(5, &[0])),
    ];
    for (name, body) in cases {
        dp.expect_drop(
            Prog::FromVm,
            &ethernet(BROADCAST, GUEST_MAC, ETH_P_ARP, &body),
            DropReason::ArpMalformed,
            name,
        );
    }
}

#[test]
fn arp_to_a_mac_other_than_broadcast_or_gateway_is_dropped() {
    let dp = Dataplane::new();
    let body = arp(1, GUEST_MAC, GUEST_IP, ZERO_MAC, PEER_IP);
    let cases = [
        (PEER_MAC, DropReason::NotToGatewayMac),
        (GUEST_MAC, DropReason::NotToGatewayMac),
        (ZERO_MAC, DropReason::NotToGatewayMac),
        ([0x01, 0x00, 0x5e, 0, 0, 1], DropReason::GroupDestinationMac),
        (
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xfe],
            DropReason::GroupDestinationMac,
        ),
    ];
    for (dst, reason) in cases {
        dp.expect_drop(
            Prog::FromVm,
            &ethernet(dst, GUEST_MAC, ETH_P_ARP, &body),
            reason,
            &format!("ARP to {dst:02x?}"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// from_vm: the gateway address.
// ---------------------------------------------------------------------------------------------

/// The echo reply the gateway must produce for `request` (a guest's echo request to it).
fn expected_echo_reply(request: &Ipv4) -> Vec<u8> {
    let m = &request.payload;
    let word = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    to_guest(&Ipv4 {
        src: request.dst,
        dst: request.src,
        payload: icmp(0, m[1], word(4), word(6), &m[8..]),
        ..request.clone()
    })
}

#[test]
fn echo_request_to_the_gateway_is_answered() {
    let dp = Dataplane::new();
    let data56: Vec<u8> = (0..56u8).collect();
    for data in [&b""[..], b"x", b"odd!!", &data56] {
        let p = guest_echo(GW_IP, data);
        let frame = from_guest(&p);
        let what = format!("echo to gateway with {} data bytes", data.len());
        let out = dp.expect_redirect(&frame, &what);
        let ip = &out[ETH_LEN..ETH_LEN + IPV4_LEN];
        let icmp_out = &out[ETH_LEN + IPV4_LEN..];
        assert_eq!(out[0..6], GUEST_MAC, "{what}: eth dst = guest");
        assert_eq!(out[6..12], GW_MAC, "{what}: eth src = gateway");
        assert_eq!(ip[12..16], GW_IP, "{what}: IP src = gateway");
        assert_eq!(ip[16..20], GUEST_IP, "{what}: IP dst = guest");
        assert_eq!(ip[8], p.ttl, "{what}: TTL untouched");
        assert!(checksum_verifies(ip), "{what}: IPv4 checksum: {ip:02x?}");
        assert_eq!(icmp_out[0], 0, "{what}: type echo reply");
        assert_eq!(icmp_out[1], 0, "{what}: code 0");
        assert!(
            checksum_verifies(icmp_out),
            "{what}: ICMP checksum: {icmp_out:02x?}"
        );
        assert_eq!(
            icmp_out[4..],
            frame[ETH_LEN + IPV4_LEN + 4..],
            "{what}: id/seq/data"
        );
        assert_eq!(out, expected_echo_reply(&p), "{what}: whole frame");
    }
}

#[test]
fn echo_reply_checksum_is_valid_across_carries() {
    let dp = Dataplane::new();
    let mut checked = 0;
    for id in (0..=u16::MAX).step_by(97) {
        let p = Ipv4::new(
            GUEST_IP,
            GW_IP,
            PROTO_ICMP,
            icmp_echo_request(id, 3, b"abc"),
        );
        if p.payload[2..4] == [0xF7, 0xFF] {
            continue; // the -0 edge case has its own test
        }
        let out = dp.expect_redirect(&from_guest(&p), &format!("echo id {id:#06x}"));
        assert_eq!(out, expected_echo_reply(&p), "echo id {id:#06x}");
        checked += 1;
    }
    assert!(checked > 600);
}

#[test]
fn echo_reply_checksum_edge_case_matches_full_recompute() {
    // Request checksum 0xF7FF: after type 8 -> 0 the reply's other words sum to 0xFFFF (-0),
    // so the correct checksum is 0x0000. Adding 0x0800 with end-around carry yields 0xFFFF
    // instead (the RFC 1624 section 3 case; see the TTL edge-case test above).
    let dp = Dataplane::new();
    let id = (0..=u16::MAX)
        .find(|id| icmp_echo_request(*id, 3, b"abc")[2..4] == [0xF7, 0xFF])
        .expect("some id gives checksum 0xF7FF");
    let p = Ipv4::new(
        GUEST_IP,
        GW_IP,
        PROTO_ICMP,
        icmp_echo_request(id, 3, b"abc"),
    );
    let out = dp.expect_redirect(&from_guest(&p), "echo reply edge case");
    let icmp_out = &out[ETH_LEN + IPV4_LEN..];
    assert!(checksum_verifies(icmp_out), "ICMP checksum must verify");
    assert_eq!(
        icmp_out[2..4],
        [0x00, 0x00],
        "echo reply checksum should be the fully recomputed 0x0000, not -0 (0xFFFF)"
    );
}

#[test]
fn other_traffic_to_the_gateway_is_dropped() {
    let dp = Dataplane::new();
    let unavailable = [
        ("UDP (DNS)", guest_packet(GW_IP, L4::Udp)),
        ("TCP SYN", guest_packet(GW_IP, L4::Tcp)),
        ("GRE", Ipv4::new(GUEST_IP, GW_IP, 47, vec![0; 8])),
        (
            "protocol 0",
            Ipv4::new(GUEST_IP, GW_IP, 0, vec![8, 0, 0, 0, 0, 0, 0, 0]),
        ),
    ];
    for (name, p) in unavailable {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&p),
            DropReason::GatewayServiceUnavailable,
            &format!("{name} to gateway"),
        );
    }
    let malformed = [
        ("timestamp request (13)", icmp(13, 0, 1, 1, &[0; 12])),
        ("echo reply (0)", icmp(0, 0, 1, 1, b"")),
        ("destination unreachable (3)", icmp(3, 3, 0, 0, &[0; 28])),
        ("echo request with code 1", icmp(8, 1, 1, 1, b"")),
        ("echo request with code 255", icmp(8, 255, 1, 1, b"")),
    ];
    for (name, m) in malformed {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&Ipv4::new(GUEST_IP, GW_IP, PROTO_ICMP, m)),
            DropReason::GatewayIcmpMalformed,
            &format!("ICMP {name} to gateway"),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Unknown endpoint.
// ---------------------------------------------------------------------------------------------

#[test]
fn frames_on_a_device_without_endpoint_are_dropped() {
    let mut dp = Dataplane::new();
    dp.remove_endpoint(TEST_IFINDEX);
    // Another device's entry does not make ifindex 1 known.
    dp.set_endpoint(2, endpoint(CLOUD));
    let frames = [
        ("IPv4 to peer", from_guest(&guest_packet(PEER_IP, L4::Icmp))),
        ("echo to gateway", from_guest(&guest_echo(GW_IP, b""))),
        ("ARP request", guest_arp_request(GW_IP)),
        (
            "delivery to guest",
            to_guest(&guest_packet(GUEST_IP, L4::Udp)),
        ),
        ("bare Ethernet header", ethernet(ZERO_MAC, ZERO_MAC, 0, &[])),
        (
            "spoofed source MAC",
            ethernet(GW_MAC, PEER_MAC, ETH_P_IP, &[0; 46]),
        ),
    ];
    for prog in [Prog::FromVm, Prog::ToVm] {
        for (name, frame) in &frames {
            dp.expect_drop(
                prog,
                frame,
                DropReason::UnknownEndpoint,
                &format!("{name} on an unknown device"),
            );
        }
    }
}

#[test]
fn empty_endpoints_map_drops_everything() {
    let dp = Dataplane::empty();
    for prog in [Prog::FromVm, Prog::ToVm] {
        dp.expect_drop(
            prog,
            &from_guest(&guest_packet(PEER_IP, L4::Tcp)),
            DropReason::UnknownEndpoint,
            "TCP with no endpoints at all",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// to_vm: the egress filter.
// ---------------------------------------------------------------------------------------------

#[test]
fn to_vm_passes_ipv4_for_the_guest() {
    let dp = Dataplane::new();
    for l4 in ALL_L4 {
        let mut p = guest_packet(GUEST_IP, l4);
        p.src = PEER_IP;
        dp.expect_pass(
            Prog::ToVm,
            &to_guest(&p),
            &format!("{l4:?} from peer to guest"),
        );
    }
    // to_vm does not police the IPv4 layer beyond the destination address.
    let mut odd = guest_packet(GUEST_IP, L4::Icmp);
    odd.src = [192, 0, 2, 1];
    odd.ttl = 1;
    odd.frag_off = 0x2000;
    dp.expect_pass(Prog::ToVm, &to_guest(&odd), "TTL 1 fragment from anywhere");
}

#[test]
fn to_vm_passes_what_from_vm_produces() {
    let mut dp = Dataplane::new();
    // Replies to the guest itself (ARP, echo) go out of the same device.
    for request in [
        guest_arp_request(GW_IP),
        guest_arp_request(PEER_IP),
        from_guest(&guest_echo(GW_IP, b"loop")),
    ] {
        let reply = dp.expect_redirect(&request, "reply generation");
        dp.expect_pass(Prog::ToVm, &reply, "reply delivered to the guest");
    }
    // A forwarded frame is delivered to the peer: make ifindex 1 the peer's device.
    let forwarded = dp.expect_redirect(&from_guest(&guest_packet(PEER_IP, L4::Tcp)), "forward");
    dp.set_endpoint(
        TEST_IFINDEX,
        EndpointInfo {
            cloud: CLOUD,
            ipv4: ipv4_to_map(PEER_IP),
            gateway_ipv4: ipv4_to_map(GW_IP),
            mac: PEER_MAC,
            gateway_mac: GW_MAC,
            slot: PEER_IFINDEX,
        },
    );
    dp.expect_pass(
        Prog::ToVm,
        &forwarded,
        "forwarded frame delivered to the peer",
    );
}

#[test]
fn to_vm_drops_ipv4_for_another_address() {
    let dp = Dataplane::new();
    for dst in [
        PEER_IP,
        GW_IP,
        [255, 255, 255, 255],
        [224, 0, 0, 1],
        [0, 0, 0, 0],
        [2, 0, 0, 10],
    ] {
        let mut p = guest_packet(dst, L4::Udp);
        p.src = GW_IP;
        dp.expect_drop(
            Prog::ToVm,
            &to_guest(&p),
            DropReason::ToVmWrongDestination,
            &format!("to {dst:?}"),
        );
    }
}

#[test]
fn to_vm_drops_frames_with_foreign_macs() {
    let dp = Dataplane::new();
    let packet = guest_packet(GUEST_IP, L4::Icmp).bytes();
    let arp_reply = arp(2, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP);
    let macs = [
        ("dst broadcast", BROADCAST, GW_MAC),
        ("dst multicast", [0x01, 0x00, 0x5e, 0, 0, 1], GW_MAC),
        ("dst peer", PEER_MAC, GW_MAC),
        ("dst gateway", GW_MAC, GW_MAC),
        ("src guest", GUEST_MAC, GUEST_MAC),
        ("src peer (host stack, bridge)", GUEST_MAC, PEER_MAC),
        ("src zero", GUEST_MAC, ZERO_MAC),
        ("both swapped", GW_MAC, GUEST_MAC),
    ];
    for (name, dst, src) in macs {
        for (kind, ether_type, body) in [
            ("IPv4", ETH_P_IP, &packet),
            ("ARP", ETH_P_ARP, &arp_reply),
            ("IPv6", ETH_P_IPV6, &vec![0u8; 40]),
        ] {
            dp.expect_drop(
                Prog::ToVm,
                &ethernet(dst, src, ether_type, body),
                DropReason::ToVmForeignFrame,
                &format!("{kind} with {name}"),
            );
        }
    }
}

#[test]
fn to_vm_passes_arp_with_the_right_macs() {
    let dp = Dataplane::new();
    for (name, body) in [
        ("reply", arp(2, GW_MAC, GW_IP, GUEST_MAC, GUEST_IP)),
        (
            "request from the gateway",
            arp(1, GW_MAC, GW_IP, ZERO_MAC, GUEST_IP),
        ),
    ] {
        dp.expect_pass(
            Prog::ToVm,
            &ethernet(GUEST_MAC, GW_MAC, ETH_P_ARP, &body),
            &format!("ARP {name}"),
        );
    }
}

#[test]
fn to_vm_drops_other_ethertypes() {
    let dp = Dataplane::new();
    for ether_type in [
        ETH_P_IPV6,
        ETH_P_8021Q,
        ETH_P_8021AD,
        0x88cc,
        0x0000,
        0x8035,
        0xffff,
    ] {
        dp.expect_drop(
            Prog::ToVm,
            &ethernet(GUEST_MAC, GW_MAC, ether_type, &[0u8; 46]),
            DropReason::ToVmNotAllowed,
            &format!("ethertype {ether_type:#06x}"),
        );
    }
}

#[test]
fn to_vm_truncated_ipv4_is_refused_by_the_kernel() {
    // to_vm's Ipv4Truncated covers frames shorter than Ethernet + IPv4 header, which a test run
    // cannot deliver: the kernel refuses them (EINVAL) before the program runs.
    let dp = Dataplane::new();
    let frame = to_guest(&guest_packet(GUEST_IP, L4::Icmp));
    for len in 0..ETH_LEN + IPV4_LEN {
        expect_refused_by_kernel(&dp, Prog::ToVm, &frame[..len], "short IPv4 frame to guest");
    }
    // A complete header-only packet (total_length 20) is delivered.
    let mut empty = guest_packet(GUEST_IP, L4::Icmp);
    empty.payload.clear();
    dp.expect_pass(Prog::ToVm, &to_guest(&empty), "header-only packet");
}

// ---------------------------------------------------------------------------------------------
// The direct-mapped endpoint cache in front of ENDPOINTS.
// ---------------------------------------------------------------------------------------------

#[test]
fn identity_in_the_cache_slot_is_used_without_the_hash() {
    let mut dp = Dataplane::empty();
    dp.set_cache_slot(TEST_IFINDEX, endpoint(CLOUD));
    dp.add_route(CLOUD, PEER_IP, PEER_IFINDEX, PEER_MAC);
    let input = from_guest(&guest_echo(PEER_IP, b"cache"));
    let out = dp.expect_redirect(&input, "echo to the peer, identity only in the cache");
    assert_forwarded(&input, &out, PEER_MAC, "cache hit");
    // The same slot's identity also serves to_vm.
    dp.expect_pass(
        Prog::ToVm,
        &to_guest(&guest_packet_from_peer()),
        "delivery with identity only in the cache",
    );
}

#[test]
fn cache_slot_of_another_ifindex_falls_back_to_the_hash() {
    let mut dp = Dataplane::empty();
    // Slot 1 belongs to ifindex 65537 in cloud 8; ifindex 1 (cloud 7) lives in the hash only.
    dp.set_cache_slot(TEST_IFINDEX + ENDPOINT_CACHE_SLOTS, endpoint(OTHER_CLOUD));
    dp.set_endpoint(TEST_IFINDEX, endpoint(CLOUD));
    dp.add_route(CLOUD, PEER_IP, PEER_IFINDEX, PEER_MAC);
    dp.add_route(OTHER_CLOUD, PEER_IP, OTHER_PEER_IFINDEX, OTHER_PEER_MAC);
    let input = from_guest(&guest_echo(PEER_IP, b"fallback"));
    let out = dp.expect_redirect(&input, "echo with a colliding cache slot");
    assert_forwarded(
        &input,
        &out,
        PEER_MAC,
        "must use cloud 7 from the hash, not the slot",
    );
}

#[test]
fn empty_cache_slot_and_no_hash_entry_is_unknown() {
    let mut dp = Dataplane::empty();
    dp.set_cache_slot(TEST_IFINDEX + ENDPOINT_CACHE_SLOTS, endpoint(CLOUD));
    dp.add_route(CLOUD, PEER_IP, PEER_IFINDEX, PEER_MAC);
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&guest_echo(PEER_IP, b"x")),
        DropReason::UnknownEndpoint,
        "slot held by another ifindex, no hash entry",
    );
}

/// An IPv4 echo from the in-cloud peer to the guest, as `to_vm` sees it.
fn guest_packet_from_peer() -> Ipv4 {
    Ipv4::new(
        PEER_IP,
        GUEST_IP,
        PROTO_ICMP,
        icmp_echo_request(7, 1, b"peer"),
    )
}

// ---------------------------------------------------------------------------------------------
// Metering.
// ---------------------------------------------------------------------------------------------

fn traffic(c: &EndpointCounters, dir: Direction, class: TrafficClass) -> (u64, u64) {
    let t = c.traffic[dir as usize][class as usize];
    (t.packets, t.bytes)
}

#[test]
fn forwarding_is_metered_on_both_endpoints() {
    let dp = Dataplane::new();
    let sizes = [60usize, 98, 1514];
    let mut total = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        let pad = size - (ETH_LEN + IPV4_LEN + ICMP_ECHO_LEN);
        let frame = from_guest(&guest_echo(PEER_IP, &vec![i as u8; pad]));
        assert_eq!(frame.len(), *size);
        dp.expect_redirect(&frame, "metered echo");
        total += *size as u64;
    }
    let n = sizes.len() as u64;
    let src = dp.metered(GUEST_SLOT);
    let dst = dp.metered(PEER_IFINDEX);
    assert_eq!(
        traffic(&src, Direction::FromGuest, TrafficClass::IntraCloud),
        (n, total)
    );
    assert_eq!(
        traffic(&dst, Direction::ToGuest, TrafficClass::IntraCloud),
        (n, total)
    );
    // Nothing else moved on either side.
    assert_eq!(
        traffic(&src, Direction::ToGuest, TrafficClass::IntraCloud),
        (0, 0)
    );
    assert_eq!(
        traffic(&dst, Direction::FromGuest, TrafficClass::IntraCloud),
        (0, 0)
    );
    for class in [
        TrafficClass::Exposure,
        TrafficClass::Host,
        TrafficClass::External,
    ] {
        for dir in Direction::ALL {
            assert_eq!(traffic(&src, dir, class), (0, 0), "{dir:?} {class:?}");
            assert_eq!(traffic(&dst, dir, class), (0, 0), "{dir:?} {class:?}");
        }
    }
    assert!(src.drops.iter().all(|d| *d == 0));
}

#[test]
fn gateway_answers_are_metered_as_host_traffic() {
    let dp = Dataplane::new();
    let arp = guest_arp_request(GW_IP);
    dp.expect_redirect(&arp, "ARP for the gateway");
    let echo = from_guest(&guest_echo(GW_IP, b"ping the gateway"));
    dp.expect_redirect(&echo, "echo to the gateway");
    let bytes = (arp.len() + echo.len()) as u64;
    let c = dp.metered(GUEST_SLOT);
    assert_eq!(
        traffic(&c, Direction::FromGuest, TrafficClass::Host),
        (2, bytes)
    );
    assert_eq!(
        traffic(&c, Direction::ToGuest, TrafficClass::Host),
        (2, bytes)
    );
    assert_eq!(
        traffic(&c, Direction::FromGuest, TrafficClass::IntraCloud),
        (0, 0)
    );
}

#[test]
fn drops_are_metered_per_endpoint_and_reason() {
    let dp = Dataplane::new();
    let mut spoofed = guest_echo(PEER_IP, b"x");
    spoofed.src = [10, 0, 0, 99];
    for _ in 0..3 {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&spoofed),
            DropReason::SpoofedSourceIp,
            "spoof",
        );
    }
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&guest_echo(OTHER_ONLY_IP, b"x")),
        DropReason::NoRouteInCloud,
        "other cloud",
    );
    let c = dp.metered(GUEST_SLOT);
    for reason in DropReason::ALL {
        let want = match reason {
            DropReason::SpoofedSourceIp => 3,
            DropReason::NoRouteInCloud => 1,
            _ => 0,
        };
        assert_eq!(c.drops[reason as usize], want, "{reason:?}");
    }
    // Dropped frames are not traffic.
    for dir in Direction::ALL {
        for class in TrafficClass::ALL {
            assert_eq!(traffic(&c, dir, class), (0, 0));
        }
    }
}

#[test]
fn metering_can_be_disabled_at_load() {
    let mut dp = Dataplane::empty_with_metering(false);
    dp.set_endpoint(TEST_IFINDEX, endpoint(CLOUD));
    dp.add_route(CLOUD, PEER_IP, PEER_IFINDEX, PEER_MAC);
    dp.expect_redirect(
        &from_guest(&guest_echo(PEER_IP, b"x")),
        "forward, unmetered",
    );
    assert_eq!(dp.metered(GUEST_SLOT), EndpointCounters::ZERO);
    assert_eq!(dp.metered(PEER_IFINDEX), EndpointCounters::ZERO);
}
