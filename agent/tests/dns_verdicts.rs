//! Verdict tests for DNS at the gateway: the stateless translation in `from_vm` (guest →
//! DNS server) and in `from_dns` (DNS server → guest), run in the kernel with
//! `BPF_PROG_TEST_RUN` on hand-built frames, in the style of `verdicts.rs`.
//!
//! Every test loads a private copy of the embedded object (unpinned maps), installs one guest
//! endpoint (ifindex 1, the test run's loopback device, with a non-zero counter slot) and a DNS
//! service, runs one program on a frame and checks:
//! - the verdict and that exactly the expected drop counter moved (or none);
//! - for translations, the output frame byte for byte: MACs, addresses, TTL untouched, the IPv4
//!   header checksum and the UDP/TCP checksum equal to a full recomputation over the rewritten
//!   packet (pseudo header included), everything else unchanged;
//! - the `host` class counters of the asking endpoint.
//!
//! Covered: UDP and TCP both ways, checksum carries over many headers, UDP checksum 0, proxy
//! addresses across an octet boundary, a round trip through `from_vm`, `from_dns` and `to_vm`,
//! malformed and truncated queries, DNS switched off, ports other than 53, foreign frames on the
//! DNS device and replies for slots without endpoint.
//!
//! The test run hands the programs `CHECKSUM_NONE` frames, so the helpers' partial-checksum
//! path is exercised by the end-to-end test (`dns.rs`, veth and tap guests) instead.
//!
//! The tests need root (CAP_BPF); they fail, never skip, without it.

use std::collections::BTreeMap;

use atoll_agent::dataplane::{
    read_drop_counters, sum_counters, MAP_COUNTERS, MAP_DNS_SERVICE, MAP_DROPS, MAP_ENDPOINTS,
    MAP_ROUTES, MAP_SLOT_ENDPOINTS, OBJECT, PROG_FROM_DNS, PROG_FROM_VM, PROG_TO_VM,
};
use atoll_dataplane_common::{
    ipv4_to_map, Direction, DnsService, DropReason, EndpointCounters, EndpointInfo, TrafficClass,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};

type Ip4 = [u8; 4];

/// The ifindex the test run's skb carries (loopback): the guest's device.
const GUEST_IFINDEX: u32 = 1;
const CLOUD: u32 = 7;
const GUEST_MAC: Mac = [0x02, 0xa7, 0, 0, 0, 0x02];
const GW_MAC: Mac = [0x02, 0xa7, 0, 0, 0, 0x01];
const GUEST_IP: Ip4 = [10, 0, 0, 2];
const GW_IP: Ip4 = [10, 0, 0, 1];
/// The guest's counter slot: its proxy address is `PROXY_BASE + 300` = 100.127.1.44.
const GUEST_SLOT: u32 = 300;
const GUEST_PROXY: Ip4 = [100, 127, 1, 44];

const DNS_IFINDEX: u32 = 99;
const SERVER_IP: Ip4 = [100, 126, 0, 53];
const PROXY_BASE: Ip4 = [100, 127, 0, 0];
const PROXY_COUNT: u32 = 1024;
const SERVER_MAC: Mac = [0x02, 0xa7, 0x53, 0, 0, 0x01];
const DEVICE_MAC: Mac = [0x02, 0xa7, 0x53, 0, 0, 0x02];

const DNS_PORT: u16 = 53;
const GUEST_PORT: u16 = 40123;

use atoll_testbed::verdict::{Run, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;

// ---------------------------------------------------------------------------------------------
// Frames: the testbed's builders, composed for this topology.
// ---------------------------------------------------------------------------------------------

use atoll_testbed::frame::{
    layers::{
        ethernet, l4_checksum, l4_checksum_offset, udp, Ipv4Packet as Ipv4, Mac, TcpHeader,
        ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
    },
    recomputed, TCP_ACK, TCP_PSH,
};

/// A UDP datagram or TCP segment (PSH|ACK) from `sport` to `dport` with a correct checksum.
fn l4(protocol: u8, src: Ip4, dst: Ip4, sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    if protocol == PROTO_UDP {
        udp(src, dst, sport, dport, data)
    } else {
        TcpHeader {
            sport,
            dport,
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            flags: TCP_PSH | TCP_ACK,
            options: Vec::new(),
        }
        .segment(src, dst, data)
    }
}

/// The guest's DNS query to its gateway (payload: a fake DNS message).
fn query(protocol: u8) -> Ipv4 {
    let data = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00\x00\x01\x00\x01";
    Ipv4::new(
        GUEST_IP,
        GW_IP,
        protocol,
        l4(protocol, GUEST_IP, GW_IP, GUEST_PORT, DNS_PORT, data),
    )
}

fn from_guest(p: &Ipv4) -> Vec<u8> {
    ethernet(GW_MAC, GUEST_MAC, ETH_P_IP, &p.bytes())
}

/// The DNS server's reply to the guest's proxy address, as it leaves the DNS namespace (NOARP:
/// both MACs are the namespace interface's).
fn reply(protocol: u8) -> Ipv4 {
    let data = b"\x12\x34\x85\x80\x00\x01\x00\x01\x00\x00\x00\x00answer-bytes";
    Ipv4::new(
        SERVER_IP,
        GUEST_PROXY,
        protocol,
        l4(protocol, SERVER_IP, GUEST_PROXY, DNS_PORT, GUEST_PORT, data),
    )
}

fn from_server(p: &Ipv4) -> Vec<u8> {
    ethernet(SERVER_MAC, SERVER_MAC, ETH_P_IP, &p.bytes())
}

// ---------------------------------------------------------------------------------------------
// The dataplane under test.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Prog {
    FromVm,
    ToVm,
    FromDns,
}

impl Prog {
    fn name(self) -> &'static str {
        match self {
            Prog::FromVm => PROG_FROM_VM,
            Prog::ToVm => PROG_TO_VM,
            Prog::FromDns => PROG_FROM_DNS,
        }
    }
}

struct Dataplane {
    ebpf: Ebpf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, EndpointCounters>,
    service: Array<MapData, DnsService>,
    slots: Array<MapData, u32>,
}

fn guest() -> EndpointInfo {
    EndpointInfo {
        cloud: CLOUD,
        ipv4: ipv4_to_map(GUEST_IP),
        gateway_ipv4: ipv4_to_map(GW_IP),
        mac: GUEST_MAC,
        gateway_mac: GW_MAC,
        slot: GUEST_SLOT,
    }
}

fn service() -> DnsService {
    DnsService {
        ifindex: DNS_IFINDEX,
        server_ipv4: ipv4_to_map(SERVER_IP),
        proxy_base: ipv4_to_map(PROXY_BASE),
        proxy_count: PROXY_COUNT,
        server_mac: SERVER_MAC,
        device_mac: DEVICE_MAC,
    }
}

impl Dataplane {
    /// The guest at ifindex 1 (slot 300, recorded in `SLOT_ENDPOINTS`) and the DNS service on.
    fn new() -> Self {
        atoll_testbed::require_root("the DNS verdict tests");
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_ENDPOINTS, 64)
            .map_max_entries(MAP_ROUTES, 64)
            .map_max_entries(MAP_COUNTERS, 1024)
            .map_max_entries(MAP_SLOT_ENDPOINTS, 1024)
            .load(OBJECT)
            .expect("loading the embedded eBPF object");
        for name in [PROG_FROM_VM, PROG_TO_VM, PROG_FROM_DNS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing"))
                .try_into()
                .expect("a SchedClassifier");
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name} (verifier): {e:?}"));
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .unwrap_or_else(|| panic!("map {name} missing"))
        };
        let mut dp = Dataplane {
            endpoints: HashMap::try_from(take(MAP_ENDPOINTS)).expect("ENDPOINTS"),
            drops: PerCpuArray::try_from(take(MAP_DROPS)).expect("DROPS"),
            counters: PerCpuArray::try_from(take(MAP_COUNTERS)).expect("COUNTERS"),
            service: Array::try_from(take(MAP_DNS_SERVICE)).expect("DNS_SERVICE"),
            slots: Array::try_from(take(MAP_SLOT_ENDPOINTS)).expect("SLOT_ENDPOINTS"),
            ebpf,
        };
        dp.endpoints
            .insert(GUEST_IFINDEX, guest(), 0)
            .expect("ENDPOINTS");
        dp.set_slot(GUEST_SLOT, GUEST_IFINDEX);
        dp.set_service(service());
        dp
    }

    fn set_service(&mut self, s: DnsService) {
        self.service.set(0, s, 0).expect("DNS_SERVICE");
    }

    fn set_slot(&mut self, slot: u32, ifindex: u32) {
        self.slots.set(slot, ifindex, 0).expect("SLOT_ENDPOINTS");
    }

    fn metered(&self, slot: u32) -> EndpointCounters {
        sum_counters(self.counters.get(&slot, 0).expect("COUNTERS").iter())
    }

    fn run(&self, prog: Prog, frame: &[u8], what: &str) -> Run {
        let classifier: &SchedClassifier = self
            .ebpf
            .program(prog.name())
            .expect("program")
            .try_into()
            .expect("classifier");
        atoll_testbed::verdict::run(
            classifier,
            prog.name(),
            frame,
            || read_drop_counters(&self.drops).expect("DROPS"),
            what,
        )
    }

    fn expect_drop(&self, prog: Prog, frame: &[u8], reason: DropReason, what: &str) {
        let r = self.run(prog, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_SHOT, &BTreeMap::from([(reason, 1)])),
            "{what}: {} should drop with {reason:?}\nframe: {frame:02x?}",
            prog.name(),
        );
    }

    fn expect_redirect(&self, prog: Prog, frame: &[u8], what: &str) -> Vec<u8> {
        let r = self.run(prog, frame, what);
        assert_eq!(
            (r.ret, &r.drops),
            (TC_ACT_REDIRECT, &BTreeMap::new()),
            "{what}: {} should redirect without drops\nframe: {frame:02x?}",
            prog.name(),
        );
        assert_eq!(r.out.len(), frame.len(), "{what}: length changed");
        r.out
    }
}

/// Checks a translated frame: MACs and addresses as expected, TTL and everything else
/// unchanged, both checksums equal to a full recomputation.
fn assert_translated(input: &[u8], out: &[u8], macs: (Mac, Mac), addrs: (Ip4, Ip4), what: &str) {
    assert_eq!(out[0..6], macs.0, "{what}: destination MAC");
    assert_eq!(out[6..12], macs.1, "{what}: source MAC");
    assert_eq!(out[12..14], input[12..14], "{what}: ethertype");
    let (ip_in, ip_out) = (&input[ETH_LEN..], &out[ETH_LEN..]);
    assert_eq!(ip_out[12..16], addrs.0, "{what}: source address");
    assert_eq!(ip_out[16..20], addrs.1, "{what}: destination address");
    for i in (0..IPV4_LEN).filter(|i| !(10..20).contains(i)) {
        assert_eq!(
            ip_in[i], ip_out[i],
            "{what}: IPv4 header byte {i} (TTL is byte 8)"
        );
    }
    assert_eq!(
        ip_out[10..12],
        recomputed(&ip_out[..IPV4_LEN], 10).to_be_bytes(),
        "{what}: IPv4 header checksum differs from a full recomputation"
    );
    let total = usize::from(u16::from_be_bytes([ip_out[2], ip_out[3]]));
    let protocol = ip_out[9];
    let at = l4_checksum_offset(protocol);
    let (seg_in, seg_out) = (&ip_in[IPV4_LEN..total], &ip_out[IPV4_LEN..total]);
    let stored = u16::from_be_bytes([seg_out[at], seg_out[at + 1]]);
    if protocol == PROTO_UDP && seg_in[at..at + 2] == [0, 0] {
        assert_eq!(
            stored, 0,
            "{what}: a zero UDP checksum (none) must stay zero"
        );
    } else {
        assert_eq!(
            stored,
            l4_checksum(addrs.0, addrs.1, protocol, seg_out),
            "{what}: transport checksum differs from a full recomputation"
        );
    }
    for i in (0..seg_in.len()).filter(|i| *i != at && *i != at + 1) {
        assert_eq!(seg_in[i], seg_out[i], "{what}: transport byte {i} changed");
    }
    assert_eq!(
        out[ETH_LEN + total..],
        input[ETH_LEN + total..],
        "{what}: padding"
    );
}

fn host_traffic(c: &EndpointCounters, dir: Direction) -> (u64, u64) {
    let t = c.traffic[dir as usize][TrafficClass::Host as usize];
    (t.packets, t.bytes)
}

// ---------------------------------------------------------------------------------------------
// Translations.
// ---------------------------------------------------------------------------------------------

#[test]
fn queries_to_the_gateway_go_to_the_server_from_the_proxy_address() {
    let dp = Dataplane::new();
    let mut bytes = 0;
    for (n, protocol) in [PROTO_UDP, PROTO_TCP].into_iter().enumerate() {
        let frame = from_guest(&query(protocol));
        let out = dp.expect_redirect(Prog::FromVm, &frame, &format!("query, protocol {protocol}"));
        assert_translated(
            &frame,
            &out,
            (SERVER_MAC, DEVICE_MAC),
            (GUEST_PROXY, SERVER_IP),
            &format!("query, protocol {protocol}"),
        );
        bytes += frame.len() as u64;
        let m = dp.metered(GUEST_SLOT);
        assert_eq!(
            host_traffic(&m, Direction::FromGuest),
            (n as u64 + 1, bytes)
        );
        assert_eq!(host_traffic(&m, Direction::ToGuest), (0, 0));
    }
}

#[test]
fn replies_from_the_server_reach_the_guest_from_its_gateway() {
    let dp = Dataplane::new();
    let mut bytes = 0;
    for (n, protocol) in [PROTO_UDP, PROTO_TCP].into_iter().enumerate() {
        let frame = from_server(&reply(protocol));
        let out = dp.expect_redirect(
            Prog::FromDns,
            &frame,
            &format!("reply, protocol {protocol}"),
        );
        assert_translated(
            &frame,
            &out,
            (GUEST_MAC, GW_MAC),
            (GW_IP, GUEST_IP),
            &format!("reply, protocol {protocol}"),
        );
        bytes += frame.len() as u64;
        let m = dp.metered(GUEST_SLOT);
        assert_eq!(host_traffic(&m, Direction::ToGuest), (n as u64 + 1, bytes));
        assert_eq!(host_traffic(&m, Direction::FromGuest), (0, 0));
        assert_eq!(m.drops.iter().sum::<u64>(), 0);
    }
}

#[test]
fn a_round_trip_passes_to_vm() {
    let dp = Dataplane::new();
    for protocol in [PROTO_UDP, PROTO_TCP] {
        let query = dp.expect_redirect(Prog::FromVm, &from_guest(&query(protocol)), "query");
        // The server answers by swapping addresses and ports, as a socket does.
        let mut answer = query.clone();
        answer[0..6].copy_from_slice(&SERVER_MAC);
        answer[6..12].copy_from_slice(&SERVER_MAC);
        let ip = ETH_LEN;
        let (src, dst) = (
            answer[ip + 12..ip + 16].to_vec(),
            answer[ip + 16..ip + 20].to_vec(),
        );
        answer[ip + 12..ip + 16].copy_from_slice(&dst);
        answer[ip + 16..ip + 20].copy_from_slice(&src);
        let l4 = ip + IPV4_LEN;
        let (sport, dport) = (answer[l4..l4 + 2].to_vec(), answer[l4 + 2..l4 + 4].to_vec());
        answer[l4..l4 + 2].copy_from_slice(&dport);
        answer[l4 + 2..l4 + 4].copy_from_slice(&sport);
        let delivered = dp.expect_redirect(Prog::FromDns, &answer, "answer");
        assert_eq!(
            delivered,
            {
                let mut expected = from_guest(&self::query(protocol));
                // The guest receives its own query mirrored: gateway:53 → guest:port.
                expected[0..6].copy_from_slice(&GUEST_MAC);
                expected[6..12].copy_from_slice(&GW_MAC);
                expected[ip + 12..ip + 16].copy_from_slice(&GW_IP);
                expected[ip + 16..ip + 20].copy_from_slice(&GUEST_IP);
                expected[l4..l4 + 2].copy_from_slice(&DNS_PORT.to_be_bytes());
                expected[l4 + 2..l4 + 4].copy_from_slice(&GUEST_PORT.to_be_bytes());
                expected
            },
            "protocol {protocol}: the round trip restores every byte (checksums included)"
        );
        let r = dp.run(Prog::ToVm, &delivered, "delivery");
        assert_eq!(
            (r.ret, r.drops.len()),
            (TC_ACT_OK, 0),
            "to_vm passes the answer"
        );
    }
}

#[test]
fn checksums_stay_exact_across_carries() {
    let dp = Dataplane::new();
    // Different IP ids and payload words walk both checksums through all values, including
    // the ones where an incremental update must carry around (0x0000 / 0xFFFF).
    for protocol in [PROTO_UDP, PROTO_TCP] {
        for k in 0..2048u16 {
            let id = k.wrapping_mul(0x9e37);
            let mut q = query(protocol);
            q.id = id;
            let data = [(k >> 8) as u8, k as u8, 0x5a, (k & 0xff) as u8];
            q.payload = l4(protocol, GUEST_IP, GW_IP, GUEST_PORT + k, DNS_PORT, &data);
            let frame = from_guest(&q);
            let what = format!("query protocol {protocol} id {id:#06x}");
            let out = dp.expect_redirect(Prog::FromVm, &frame, &what);
            assert_translated(
                &frame,
                &out,
                (SERVER_MAC, DEVICE_MAC),
                (GUEST_PROXY, SERVER_IP),
                &what,
            );
            let mut r = reply(protocol);
            r.id = id;
            r.payload = l4(
                protocol,
                SERVER_IP,
                GUEST_PROXY,
                DNS_PORT,
                GUEST_PORT + k,
                &data,
            );
            let frame = from_server(&r);
            let what = format!("reply protocol {protocol} id {id:#06x}");
            let out = dp.expect_redirect(Prog::FromDns, &frame, &what);
            assert_translated(&frame, &out, (GUEST_MAC, GW_MAC), (GW_IP, GUEST_IP), &what);
        }
    }
}

#[test]
fn a_zero_udp_checksum_stays_zero_both_ways() {
    let dp = Dataplane::new();
    let mut q = query(PROTO_UDP);
    q.payload[6..8].copy_from_slice(&[0, 0]);
    let frame = from_guest(&q);
    let out = dp.expect_redirect(Prog::FromVm, &frame, "query without checksum");
    assert_translated(
        &frame,
        &out,
        (SERVER_MAC, DEVICE_MAC),
        (GUEST_PROXY, SERVER_IP),
        "query",
    );
    let mut r = reply(PROTO_UDP);
    r.payload[6..8].copy_from_slice(&[0, 0]);
    let frame = from_server(&r);
    let out = dp.expect_redirect(Prog::FromDns, &frame, "reply without checksum");
    assert_translated(
        &frame,
        &out,
        (GUEST_MAC, GW_MAC),
        (GW_IP, GUEST_IP),
        "reply",
    );
}

#[test]
fn ethernet_padding_after_a_short_query_is_kept() {
    let dp = Dataplane::new();
    let mut frame = from_guest(&query(PROTO_UDP));
    frame.extend_from_slice(&[0xee; 9]);
    let out = dp.expect_redirect(Prog::FromVm, &frame, "padded query");
    assert_translated(
        &frame,
        &out,
        (SERVER_MAC, DEVICE_MAC),
        (GUEST_PROXY, SERVER_IP),
        "padded",
    );
}

// ---------------------------------------------------------------------------------------------
// from_vm: what is not translated.
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_udp_and_tcp_to_the_gateway() {
    let dp = Dataplane::new();
    for protocol in [PROTO_UDP, PROTO_TCP] {
        let header_len = if protocol == PROTO_UDP { 8 } else { 20 };
        // Fragments: first (more-fragments) and later ones.
        for frag_off in [0x2000, 0x0005, 0x2010] {
            let mut q = query(protocol);
            q.frag_off = frag_off;
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&q),
                DropReason::GatewayL4Malformed,
                &format!("protocol {protocol} fragment {frag_off:#06x}"),
            );
        }
        // Transport header cut short by the total length (the rest is Ethernet padding).
        for l4_len in 0..header_len {
            let mut q = query(protocol);
            q.total_len = Some((IPV4_LEN + l4_len) as u16);
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&q),
                DropReason::GatewayL4Malformed,
                &format!("protocol {protocol}, {l4_len} transport bytes in the packet"),
            );
        }
        // Frame cut short: the IPv4 total length no longer fits.
        let frame = from_guest(&query(protocol));
        for len in ETH_LEN + IPV4_LEN..frame.len() {
            dp.expect_drop(
                Prog::FromVm,
                &frame[..len],
                DropReason::Ipv4Truncated,
                &format!("protocol {protocol} query cut to {len} bytes"),
            );
        }
        // The dropped frames are metered as drops of the guest, not as DNS traffic.
        let m = dp.metered(GUEST_SLOT);
        assert_eq!(host_traffic(&m, Direction::FromGuest), (0, 0));
    }
}

#[test]
fn other_ports_and_a_switched_off_service_are_unavailable() {
    let mut dp = Dataplane::new();
    for protocol in [PROTO_UDP, PROTO_TCP] {
        for port in [0, 52, 54, 853, 5353, 53 << 8] {
            let q = Ipv4::new(
                GUEST_IP,
                GW_IP,
                protocol,
                l4(protocol, GUEST_IP, GW_IP, GUEST_PORT, port, b"x"),
            );
            dp.expect_drop(
                Prog::FromVm,
                &from_guest(&q),
                DropReason::GatewayServiceUnavailable,
                &format!("protocol {protocol} to gateway port {port}"),
            );
        }
    }
    // A slot beyond the proxy range has no proxy address.
    let mut small = service();
    small.proxy_count = GUEST_SLOT;
    dp.set_service(small);
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&query(PROTO_UDP)),
        DropReason::GatewayServiceUnavailable,
        "slot outside the proxy range",
    );
    dp.set_service(DnsService::OFF);
    for protocol in [PROTO_UDP, PROTO_TCP] {
        dp.expect_drop(
            Prog::FromVm,
            &from_guest(&query(protocol)),
            DropReason::GatewayServiceUnavailable,
            &format!("protocol {protocol} query while DNS is off"),
        );
    }
    dp.expect_drop(
        Prog::FromDns,
        &from_server(&reply(PROTO_UDP)),
        DropReason::DnsForeignFrame,
        "a reply while DNS is off",
    );
}

#[test]
fn queries_are_checked_for_spoofing_first() {
    let dp = Dataplane::new();
    let mut q = query(PROTO_UDP);
    q.src = [10, 0, 0, 9];
    q.payload = l4(PROTO_UDP, q.src, GW_IP, GUEST_PORT, DNS_PORT, b"q");
    dp.expect_drop(
        Prog::FromVm,
        &from_guest(&q),
        DropReason::SpoofedSourceIp,
        "query from another address",
    );
    let frame = ethernet(
        GW_MAC,
        [0x02, 0, 0, 0, 0, 9],
        ETH_P_IP,
        &query(PROTO_UDP).bytes(),
    );
    dp.expect_drop(
        Prog::FromVm,
        &frame,
        DropReason::SpoofedSourceMac,
        "other MAC",
    );
}

// ---------------------------------------------------------------------------------------------
// from_dns: what is not translated.
// ---------------------------------------------------------------------------------------------

#[test]
fn foreign_frames_on_the_dns_device_are_dropped() {
    let dp = Dataplane::new();
    let with = |f: &dyn Fn(&mut Ipv4)| {
        let mut r = reply(PROTO_UDP);
        f(&mut r);
        from_server(&r)
    };
    let udp_from = |src: Ip4, sport: u16, dst: Ip4| {
        from_server(&Ipv4::new(
            src,
            dst,
            PROTO_UDP,
            l4(PROTO_UDP, src, dst, sport, GUEST_PORT, b"r"),
        ))
    };
    let below = [100, 126, 255, 255];
    let above = [100, 127, (PROXY_COUNT >> 8) as u8, PROXY_COUNT as u8];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ARP", ethernet([0xff; 6], SERVER_MAC, ETH_P_ARP, &[0; 28])),
        (
            "IPv6",
            ethernet(SERVER_MAC, SERVER_MAC, ETH_P_IPV6, &[0x60; 60]),
        ),
        ("ICMP from the server", {
            let p = Ipv4::new(
                SERVER_IP,
                GUEST_PROXY,
                PROTO_ICMP,
                vec![3, 3, 0, 0, 0, 0, 0, 0],
            );
            from_server(&p)
        }),
        (
            "UDP from another address",
            udp_from([100, 126, 0, 54], 53, GUEST_PROXY),
        ),
        (
            "UDP from another port",
            udp_from(SERVER_IP, 5353, GUEST_PROXY),
        ),
        (
            "to an address below the proxy range",
            udp_from(SERVER_IP, 53, below),
        ),
        (
            "to the first address above the range",
            udp_from(SERVER_IP, 53, above),
        ),
        ("to a guest address", udp_from(SERVER_IP, 53, GUEST_IP)),
        ("fragment", with(&|r| r.frag_off = 0x2000)),
        ("later fragment", with(&|r| r.frag_off = 0x0010)),
        ("IPv4 options", with(&|r| r.ihl = Some(6))),
        ("IPv4 version 5", with(&|r| r.version = 5)),
        (
            "UDP header beyond the total length",
            with(&|r| r.total_len = Some(27)),
        ),
        (
            "total length beyond the frame",
            with(&|r| r.total_len = Some(200)),
        ),
        ("TCP header beyond the total length", {
            let mut r = reply(PROTO_TCP);
            r.total_len = Some(39);
            from_server(&r)
        }),
    ];
    for (what, frame) in cases {
        dp.expect_drop(Prog::FromDns, &frame, DropReason::DnsForeignFrame, what);
    }
    let frame = from_server(&reply(PROTO_TCP));
    for len in ETH_LEN + IPV4_LEN..frame.len() {
        dp.expect_drop(
            Prog::FromDns,
            &frame[..len],
            DropReason::DnsForeignFrame,
            &format!("reply cut to {len} bytes"),
        );
    }
    // Nothing was charged to the guest.
    let m = dp.metered(GUEST_SLOT);
    assert_eq!(host_traffic(&m, Direction::ToGuest), (0, 0));
}

#[test]
fn replies_for_slots_without_their_endpoint_are_dropped() {
    let mut dp = Dataplane::new();
    let to_slot = |slot: u32| {
        let proxy = (u32::from_be_bytes(PROXY_BASE) + slot).to_be_bytes();
        from_server(&Ipv4::new(
            SERVER_IP,
            proxy,
            PROTO_UDP,
            l4(PROTO_UDP, SERVER_IP, proxy, DNS_PORT, GUEST_PORT, b"r"),
        ))
    };
    dp.expect_drop(
        Prog::FromDns,
        &to_slot(0),
        DropReason::DnsUnknownSlot,
        "slot 0, no endpoint",
    );
    dp.expect_drop(
        Prog::FromDns,
        &to_slot(PROXY_COUNT - 1),
        DropReason::DnsUnknownSlot,
        "last slot, no endpoint",
    );
    // A stale entry: the slot names a device whose identity holds another slot.
    dp.set_slot(7, GUEST_IFINDEX);
    dp.expect_drop(
        Prog::FromDns,
        &to_slot(7),
        DropReason::DnsUnknownSlot,
        "stale slot entry",
    );
    // An entry naming a device without identity.
    dp.set_slot(8, 55);
    dp.expect_drop(
        Prog::FromDns,
        &to_slot(8),
        DropReason::DnsUnknownSlot,
        "device without identity",
    );
    // The guest's own slot still works, and its entry cleared stops it.
    dp.expect_redirect(Prog::FromDns, &to_slot(GUEST_SLOT), "the guest's slot");
    dp.set_slot(GUEST_SLOT, 0);
    dp.expect_drop(
        Prog::FromDns,
        &to_slot(GUEST_SLOT),
        DropReason::DnsUnknownSlot,
        "cleared",
    );
}
