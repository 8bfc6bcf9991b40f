//! Verdicts as a real tap gives them: the test plays the VMs, writing raw frames into each tap's
//! queue fd as a VMM does (`device::open_tap_queue`) and reading what the dataplane delivers
//! from the other taps' fds. Needs root.
//!
//! `BPF_PROG_TEST_RUN` (`verdicts.rs`, `exposure_verdicts.rs`) hands the programs a frame
//! exactly as built, so it cannot show what the kernel does to a frame between the tap and
//! TC: it moves the outer VLAN tag of a frame a guest writes into the skb's metadata
//! (`skb_vlan_untag`, before TC runs) and frees a tagged frame too short for that without
//! running any TC program (`kfree_skb` counts it there). These tests hold the verdicts for what
//! a guest can actually write.
//!
//! # Topology
//!
//! Cloud 1 (consumer): A 10.0.0.2 and its sibling S 10.0.0.3. Cloud 2 (provider): B 10.0.0.2
//! (the consumer's address: clouds overlap), the only backend of cloud 1's VIP
//! 10.0.0.200:80/TCP → B:8080, NAT address 10.0.0.250. One backend makes the reply-side keys
//! of A's and S's flows collide whenever their NAT ports do.
//!
//! # Ordering instead of waiting
//!
//! A frame written into a tap is run through `from_vm` (and, when redirected, into the target
//! tap's queue) within the `write` syscall: tun hands it to `netif_receive_skb` in the
//! writer's context. So after a batch of frames that must vanish, one ordinary *marker* frame
//! whose delivery is expected is written; the first frame the receiving tap then yields must
//! be the marker's, and the counters read after the writes are final. No test waits for an
//! absence.

mod support;

use std::{net::Ipv4Addr, os::fd::OwnedFd, time::Duration};

use atoll_agent::{
    dataplane::{self, MAP_FLOWS_IN},
    device,
    endpoint::{Endpoint, Host, ServiceSpec, PROTOCOL_TCP},
    types::{CloudId, MacAddr},
};
use atoll_dataplane_common::{
    ipv4_to_map, Direction, DropReason, EndpointCounters, FlowIn, FlowKey, TrafficClass,
};
use atoll_testbed::{
    frame::{self, Tcp, TCP_ACK, TCP_PSH},
    unique_name, unique_prefix, LinksWithPrefix, PinRoot,
};
use aya::maps::{HashMap, MapData};

const CONSUMER: u32 = 1;
const PROVIDER: u32 = 2;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);
const NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 250);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// How long a frame that must arrive is waited for.
const ARRIVE: Duration = Duration::from_secs(3);
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// One guest: its endpoint and the tap queue the test writes and reads as its VMM.
struct Vm {
    ep: Endpoint,
    q: OwnedFd,
}

impl Vm {
    fn mac(&self) -> [u8; 6] {
        self.ep.mac.0
    }

    fn write(&self, f: &[u8]) {
        frame::write_frame(&self.q, f);
    }

    /// The next frame the dataplane delivered to this guest.
    fn next(&self, what: &str) -> Vec<u8> {
        frame::read_frame(&self.q, ARRIVE)
            .unwrap_or_else(|| panic!("{what}: nothing arrived at {}", self.ep.ipv4))
    }
}

/// A private pinned dataplane with A, S and B on taps and the VIP installed.
struct Bed {
    host: Host,
    a: Vm,
    s: Vm,
    b: Vm,
    gw: [u8; 6],
    rt: tokio::runtime::Runtime,
    _links: LinksWithPrefix,
    _pins: PinRoot,
}

impl Bed {
    /// Devices and pins are named with `tag` (one per test: tests run in parallel, and each
    /// checks that nothing named with its tag is left).
    fn new(tag: &str) -> Self {
        let pins = PinRoot::new(tag);
        let links = LinksWithPrefix(unique_prefix(tag));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut host = {
            let _entered = rt.enter();
            Host::open(&support::cfg(&pins, 16, 0)).expect("opening a private dataplane")
        };
        let mut vm = |cloud: u32, octet: u8| {
            let name = unique_name(tag);
            let ep = rt
                .block_on(host.create_endpoint(&support::tap(&name, cloud, octet)))
                .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            let q = device::open_tap_queue(&name, true).expect("opening the tap as a VMM");
            // Frames sent to a tap before the kernel activates its queue are dropped.
            device::wait_until_up(&name, ARRIVE).expect("tap up");
            Vm { ep, q }
        };
        let (a, s, b) = (vm(CONSUMER, 2), vm(CONSUMER, 3), vm(PROVIDER, 2));
        host.apply_service(&ServiceSpec {
            consumer: CloudId::new(CONSUMER).unwrap(),
            vip: VIP,
            provider: CloudId::new(PROVIDER).unwrap(),
            nat: NAT,
            protocol: PROTOCOL_TCP,
            port: VIP_PORT,
            backends: vec![(b.ep.ipv4, BACKEND_PORT)],
        })
        .expect("installing the VIP");
        let gw = host.gateway_mac().0;
        Bed {
            host,
            a,
            s,
            b,
            gw,
            rt,
            _links: links,
            _pins: pins,
        }
    }

    fn counters(&self, vm: &Vm) -> EndpointCounters {
        self.host
            .dataplane()
            .counters(vm.ep.slot)
            .expect("endpoint counters")
    }

    fn host_drops(&self) -> Vec<(DropReason, u64)> {
        self.host.dataplane().drop_counters().expect("DROPS")
    }

    /// A second handle on the pinned `FLOWS_IN`, for what only LRU eviction does.
    fn flows_in(&self) -> HashMap<MapData, FlowKey, FlowIn> {
        let path = self
            .host
            .dataplane()
            .pin_dir()
            .join("maps")
            .join(MAP_FLOWS_IN);
        MapData::from_pin(&path)
            .and_then(aya::maps::Map::from_map_data)
            .and_then(HashMap::try_from)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    }

    // Frames a guest writes.

    fn arp_request(&self, from: &Vm, target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&from.mac());
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&from.mac());
        f.extend_from_slice(&from.ep.ipv4.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    fn echo(&self, from: &Vm, to: Ipv4Addr) -> Vec<u8> {
        atoll_testbed::frame::echo_frame(from.ep.mac, MacAddr(self.gw), from.ep.ipv4, to, 98)
    }

    fn to_vip(&self, from: &Vm, sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut t = Tcp::syn(from.mac(), self.gw, (from.ep.ipv4, sport), (VIP, VIP_PORT));
        if !payload.is_empty() {
            t.flags = TCP_PSH | TCP_ACK;
        }
        t.frame(payload)
    }

    /// B's answer to a segment it received (addresses and ports swapped), carrying `payload`.
    fn answer(&self, got: &[u8], payload: &[u8]) -> Vec<u8> {
        let seg = frame::parse_tcp(got)
            .expect("a TCP segment at the backend")
            .addr;
        Tcp {
            src_mac: self.b.mac(),
            dst_mac: self.gw,
            src: seg.dst,
            dst: seg.src,
            sport: seg.dport,
            dport: seg.sport,
            seq: 7,
            ack: 0,
            flags: TCP_PSH | TCP_ACK,
        }
        .frame(payload)
    }
}

/// `f` with a tag `(tpid, tci)` inserted after the MAC addresses.
fn tagged(f: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend_from_slice(&tpid.to_be_bytes());
    t.extend_from_slice(&tci.to_be_bytes());
    t.extend_from_slice(&f[12..]);
    t
}

/// Every tagging a guest may try: one 802.1Q tag, one 802.1ad tag (VID 0: a priority tag
/// still fills the metadata), and QinQ (802.1ad outside, 802.1Q inside).
fn taggings(f: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("802.1Q", tagged(f, ETH_P_8021Q, 5)),
        ("802.1ad", tagged(f, ETH_P_8021AD, 0)),
        (
            "QinQ",
            tagged(&tagged(f, ETH_P_8021Q, 7), ETH_P_8021AD, 100),
        ),
    ]
}

fn sum_drops(c: &EndpointCounters) -> u64 {
    c.drops.iter().sum()
}

fn traffic(c: &EndpointCounters) -> [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT] {
    // The classes in use (the counters keep room for more, always zero).
    c.traffic
        .map(|d| std::array::from_fn(|k| (d[k].packets, d[k].bytes)))
}

/// The host-wide drops that moved between two reads.
fn moved(before: &[(DropReason, u64)], after: &[(DropReason, u64)]) -> Vec<(DropReason, u64)> {
    after
        .iter()
        .zip(before)
        .filter(|(a, b)| a.1 != b.1)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect()
}

fn tap_rx_packets(vm: &Vm) -> u64 {
    let name = vm.ep.name.as_deref().expect("a named endpoint");
    std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/rx_packets"))
        .expect("rx_packets")
        .trim()
        .parse()
        .expect("a number")
}

/// The traffic counters of `c` minus those of `base`.
fn traffic_delta(
    c: &EndpointCounters,
    base: &EndpointCounters,
) -> [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT] {
    let (now, was) = (traffic(c), traffic(base));
    std::array::from_fn(|d| {
        std::array::from_fn(|t| (now[d][t].0 - was[d][t].0, now[d][t].1 - was[d][t].1))
    })
}

fn times(
    n: u64,
    t: [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT],
) -> [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT] {
    t.map(|d| d.map(|(p, b)| (n * p, n * b)))
}

/// Counters of the whole bed: host-wide drops and each guest's counters.
struct Snapshot {
    drops: Vec<(DropReason, u64)>,
    a: EndpointCounters,
    s: EndpointCounters,
    b: EndpointCounters,
}

impl Bed {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            drops: self.host_drops(),
            a: self.counters(&self.a),
            s: self.counters(&self.s),
            b: self.counters(&self.b),
        }
    }

    fn destroy(self) {
        let Bed { host, rt, .. } = self;
        rt.block_on(host.destroy())
            .expect("destroying the dataplane");
    }
}

/// What a guest asks for, with the guest that must answer or receive it.
fn requests(bed: &Bed) -> [(&'static str, Vec<u8>, &Vm); 4] {
    let a = &bed.a;
    [
        ("ARP for the gateway", bed.arp_request(a, GATEWAY), a),
        ("echo to the gateway", bed.echo(a, GATEWAY), a),
        (
            "IPv4 to a peer of the cloud",
            bed.echo(a, bed.s.ep.ipv4),
            &bed.s,
        ),
        ("TCP to the VIP", bed.to_vip(a, 40000, b""), &bed.b),
    ]
}

/// Writes `marker` from A and checks that the first frame `to` then yields is the marker's
/// (same length and ethertype as `marker`: an answered or forwarded tagged frame would carry
/// its tag again, 4 or 8 bytes longer), so nothing written before it reached `to`.
fn marker_first(from: &Vm, marker: &[u8], to: &Vm, what: &str) {
    from.write(marker);
    let got = to.next(what);
    assert_eq!(
        (got.len(), &got[12..14]),
        (marker.len(), &marker[12..14]),
        "{what}: the first frame to arrive must be the untagged marker's, so the frame written \
         before it was not delivered; got {got:02x?}"
    );
}

#[test]
fn tagged_frames_from_a_tap_are_dropped_as_vlan_tagged() {
    support::require_root();
    support::leaves_nothing(&["tv"], || {
        let bed = Bed::new("tv");
        let a = &bed.a;
        let requests = requests(&bed);
        // Untagged, each is answered or delivered (so the silence below means something).
        let start = bed.snapshot();
        for (what, f, to) in &requests {
            a.write(f);
            to.next(what);
        }
        let before = bed.snapshot();
        let rx = tap_rx_packets(a);
        let mut written = 0u64;
        for (what, f, to) in &requests {
            for (tagging, t) in taggings(f) {
                a.write(&t);
                written += 1;
                marker_first(a, f, to, &format!("{what}, {tagging}"));
            }
        }
        let after = bed.snapshot();
        assert_eq!(
            rx + 2 * written,
            tap_rx_packets(a),
            "the tap took every frame"
        );
        assert_eq!(
            moved(&before.drops, &after.drops),
            vec![(DropReason::VlanTagged, written)],
            "host-wide: exactly one vlan_tagged drop per tagged frame, nothing else"
        );
        let vlan = DropReason::VlanTagged as usize;
        assert_eq!(
            after.a.drops[vlan] - before.a.drops[vlan],
            written,
            "A's vlan_tagged"
        );
        assert_eq!(
            sum_drops(&after.a) - sum_drops(&before.a),
            written,
            "no other drop of A's"
        );
        // Only the markers were metered: three copies of the untagged round.
        for (who, s0, s1, s2) in [
            ("A", &start.a, &before.a, &after.a),
            ("S", &start.s, &before.s, &after.s),
            ("B", &start.b, &before.b, &after.b),
        ] {
            assert_eq!(
                traffic_delta(s2, s1),
                times(3, traffic_delta(s1, s0)),
                "{who}'s traffic: the markers only"
            );
        }
        assert_eq!(
            sum_drops(&after.s),
            sum_drops(&before.s),
            "S dropped nothing"
        );
        assert_eq!(
            sum_drops(&after.b),
            sum_drops(&before.b),
            "B dropped nothing"
        );
        bed.destroy();
    });
}

/// The traffic one marker meters on each guest.
struct Marker {
    a: [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT],
    s: [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT],
    b: [[(u64, u64); TrafficClass::COUNT]; Direction::COUNT],
}

/// A tap refuses a write shorter than an Ethernet header. A tagged frame of 14 to 19 bytes is
/// taken (the tap's `rx_packets` counts it) and freed by the kernel's `skb_vlan_untag` before
/// any TC program runs, because it cannot pull the tag and the inner ethertype (6 bytes behind
/// the MAC addresses and TPID); `kfree_skb` counts it there as `vlan_tagged`, for the endpoint
/// and host-wide. From 20 bytes on the tag is moved into the metadata and `from_vm` drops the
/// frame as `vlan_tagged` however little follows it. Either way exactly one `vlan_tagged` per
/// frame, nothing else moves, nothing is delivered.
#[test]
fn short_tagged_frames_are_counted_as_vlan_tagged() {
    use std::os::fd::AsRawFd;
    support::require_root();
    support::leaves_nothing(&["tw"], || {
        let bed = Bed::new("tw");
        let a = &bed.a;
        let marker = bed.echo(a, bed.s.ep.ipv4);
        let full = tagged(&marker, ETH_P_8021Q, 5);
        for len in [12usize, 13] {
            // SAFETY: `full` is valid for `len` bytes.
            let n = unsafe { libc::write(a.q.as_raw_fd(), full.as_ptr().cast(), len) };
            let err = std::io::Error::last_os_error();
            assert_eq!(
                (n, err.raw_os_error()),
                (-1, Some(libc::EINVAL)),
                "a {len}-byte write is refused by the tap"
            );
        }
        // What the marker alone meters.
        let start = bed.snapshot();
        marker_first(a, &marker, &bed.s, "the marker alone");
        let end = bed.snapshot();
        let alone = Marker {
            a: traffic_delta(&end.a, &start.a),
            s: traffic_delta(&end.s, &start.s),
            b: traffic_delta(&end.b, &start.b),
        };
        assert_eq!(
            moved(&start.drops, &end.drops),
            vec![],
            "the marker is not dropped"
        );
        let vlan = DropReason::VlanTagged as usize;
        for tpid in [ETH_P_8021Q, ETH_P_8021AD] {
            let full = tagged(&marker, tpid, 5);
            for (lens, what) in [(14..=19, "freed before TC"), (20..=23, "seen by from_vm")] {
                let n = lens.clone().count() as u64;
                let before = bed.snapshot();
                let rx = tap_rx_packets(a);
                for len in lens {
                    a.write(&full[..len]);
                }
                // The frames are freed (and counted) within the writes; the marker proves
                // nothing of them reached S.
                marker_first(a, &marker, &bed.s, &format!("{tpid:#x}, {what}"));
                let after = bed.snapshot();
                assert_eq!(
                    rx + n + 1,
                    tap_rx_packets(a),
                    "{tpid:#x}, {what}: the tap took every frame and the marker"
                );
                assert_eq!(
                    moved(&before.drops, &after.drops),
                    vec![(DropReason::VlanTagged, n)],
                    "{tpid:#x}, {what}: host-wide, one vlan_tagged per frame and nothing else"
                );
                assert_eq!(
                    after.a.drops[vlan] - before.a.drops[vlan],
                    n,
                    "{tpid:#x}, {what}: A's vlan_tagged"
                );
                assert_eq!(
                    sum_drops(&after.a) - sum_drops(&before.a),
                    n,
                    "{tpid:#x}, {what}: no other drop of A's"
                );
                for (who, b, c) in [("S", &before.s, &after.s), ("B", &before.b, &after.b)] {
                    assert_eq!(
                        sum_drops(c),
                        sum_drops(b),
                        "{tpid:#x}, {what}: {who} dropped"
                    );
                }
                for (who, b, c, m) in [
                    ("A", &before.a, &after.a, &alone.a),
                    ("S", &before.s, &after.s, &alone.s),
                    ("B", &before.b, &after.b, &alone.b),
                ] {
                    assert_eq!(
                        traffic_delta(c, b),
                        *m,
                        "{tpid:#x}, {what}: {who}'s traffic is the marker's only"
                    );
                }
            }
        }
        bed.destroy();
    });
}

/// The program the link pinned at `path` runs.
fn link_program(path: &std::path::Path) -> u32 {
    let link = aya::programs::links::PinnedLink::from_pin(path).expect("the pinned link");
    aya::programs::links::FdLink::from(link)
        .info()
        .expect("link info")
        .program_id()
}

/// A program upgrade cannot swap `kfree_skb`'s program under its link (tracing links take no
/// `BPF_LINK_UPDATE`): it attaches the new program and replaces the old link. Once the
/// upgrade has returned, each short tagged frame is counted once: by the new program, not
/// also by the old one.
#[test]
fn short_tagged_frames_are_counted_once_after_an_upgrade() {
    support::require_root();
    support::leaves_nothing(&["tu"], || {
        let bed = Bed::new("tu");
        let a = &bed.a;
        let dir = bed.host.dataplane().pin_dir().to_path_buf();
        let link = dir.join("links").join(dataplane::KFREE_SKB_LINK);
        let old_program = link_program(&link);
        // Pretend the pinned programs came from another build.
        let marker = |id: &str| dir.join(format!("{}{id}", dataplane::BUILD_MARKER_PREFIX));
        std::fs::rename(marker(&dataplane::build_id()), marker("00000000deadbeef"))
            .expect("renaming the build marker");
        let prepared =
            dataplane::prepare(&support::cfg(&bed._pins, 16, 0)).expect("upgrading the programs");
        assert!(prepared.upgraded_from.is_some(), "{prepared}");
        assert_ne!(
            link_program(&link),
            old_program,
            "the tracepoint's link runs the new program"
        );
        let echo = bed.echo(a, bed.s.ep.ipv4);
        for tpid in [ETH_P_8021Q, ETH_P_8021AD] {
            let full = tagged(&echo, tpid, 5);
            let before = bed.snapshot();
            for len in 14..=19 {
                a.write(&full[..len]);
            }
            marker_first(a, &echo, &bed.s, &format!("{tpid:#x} after the upgrade"));
            let after = bed.snapshot();
            assert_eq!(
                moved(&before.drops, &after.drops),
                vec![(DropReason::VlanTagged, 6)],
                "{tpid:#x}: counted once each, host-wide"
            );
            assert_eq!(
                sum_drops(&after.a) - sum_drops(&before.a),
                6,
                "{tpid:#x}: counted once each for A"
            );
        }
        bed.destroy();
    });
}

/// The NAT port of a segment the backend received (it must come from the NAT address).
fn nat_port_of(got: &[u8], what: &str) -> u16 {
    let seg = frame::parse_tcp(got).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(seg.addr.src, NAT, "{what}: from the NAT address");
    seg.addr.sport
}

/// Checks that `got` is the backend's answer `payload`, translated back to `sport` of `vm`.
fn answered(vm: &Vm, got: &[u8], sport: u16, payload: &[u8], what: &str) {
    let seg = frame::parse_tcp(got).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (
            seg.addr.src,
            seg.addr.sport,
            seg.addr.dst,
            seg.addr.dport,
            seg.payload
        ),
        (VIP, VIP_PORT, vm.ep.ipv4, sport, payload),
        "{what}: {}",
        String::from_utf8_lossy(seg.payload)
    );
}

/// The provider's key of B's replies to `nat_port` (as `FLOWS_IN` holds it).
fn reply_key(b: &Vm, nat_port: u16) -> FlowKey {
    FlowKey {
        cloud: PROVIDER,
        src_ipv4: ipv4_to_map(b.ep.ipv4.octets()),
        dst_ipv4: ipv4_to_map(NAT.octets()),
        src_port: BACKEND_PORT.to_be(),
        dst_port: nat_port.to_be(),
        protocol: PROTOCOL_TCP,
        _pad: [0; 3],
    }
}

/// Issue 15 item 9: A's flow to the VIP loses its reply-side `FLOWS_IN` entry (deleted by key
/// here, which is what LRU eviction does; a guest can force evictions by filling the flow
/// tables) while its `FLOWS_OUT` entry lives on, and its sibling S opens a flow from the same
/// source port to the same (only) backend. Whichever of A and S sends first, the two flows
/// must reach the backend from different NAT ports, and the backend's answer to each reaches
/// only the guest that sent it: S never receives what B sends A.
#[test]
fn a_sibling_never_takes_over_the_nat_port_of_a_live_flow() {
    support::require_root();
    support::leaves_nothing(&["tx"], || {
        let bed = Bed::new("tx");
        let (a, s, b) = (&bed.a, &bed.s, &bed.b);
        let mut flows_in = bed.flows_in();
        for (sport, sibling_first) in [(40001u16, true), (40002, false)] {
            let what = format!(
                "source port {sport}, {} first",
                if sibling_first { "S" } else { "A" }
            );
            a.write(&bed.to_vip(a, sport, b""));
            let syn = b.next(&format!("{what}: A's SYN"));
            let port = nat_port_of(&syn, &what);
            b.write(&bed.answer(&syn, b"welcome A"));
            answered(a, &a.next(&what), sport, b"welcome A", &what);

            flows_in
                .remove(&reply_key(b, port))
                .expect("A's FLOWS_IN entry");

            let sibling_opens = || {
                s.write(&bed.to_vip(s, sport, b""));
                b.next(&format!("{what}: S's SYN"))
            };
            let a_sends = || {
                a.write(&bed.to_vip(a, sport, b"more from A"));
                b.next(&format!("{what}: A's data"))
            };
            let (from_a, from_s) = if sibling_first {
                let from_s = sibling_opens();
                (a_sends(), from_s)
            } else {
                let from_a = a_sends();
                (from_a, sibling_opens())
            };
            let (port_a, port_s) = (nat_port_of(&from_a, &what), nat_port_of(&from_s, &what));
            assert_ne!(
                port_a, port_s,
                "{what}: two live flows to one backend share NAT port {port_a}"
            );
            b.write(&bed.answer(&from_a, b"for A"));
            b.write(&bed.answer(&from_s, b"for S"));
            answered(a, &a.next(&what), sport, b"for A", &format!("{what}: at A"));
            answered(s, &s.next(&what), sport, b"for S", &format!("{what}: at S"));
            // And nothing more reached S (the marker is the next frame it gets).
            marker_first(
                a,
                &bed.echo(a, s.ep.ipv4),
                s,
                &format!("{what}: after the answers"),
            );
        }
        drop(flows_in);
        bed.destroy();
    });
}
