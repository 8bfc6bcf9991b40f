//! Cross-cloud exposure benchmarks.
//!
//! 1. **ns/packet of the translated path** with BPF_PROG_TEST_RUN, measured like the isolation
//!    path (64-byte frame, calls of 250 repeats, the kernel's own per-run time) and in the same
//!    interleaved rounds as the baselines, next to the intra-cloud forward on the same loaded
//!    object. test_run re-runs the program on the frame it rewrote, so the plane is built to
//!    make every repeat a real translation: a ring of 250 UDP VIPs in the consumer's cloud, VIP
//!    *i* (10.1.0.*i*, port 1000 + *i*) served by one backend at the address and port of VIP
//!    *i*+1 in the provider's cloud, with the consumer's own address as NAT address. The
//!    translated frame (NAT address:port → backend) is then a packet of the consumer to VIP
//!    *i*+1, and one call of 250 repeats walks the whole ring: 250 different flows, each
//!    translated once (addresses, destination port, both checksums, MACs, TTL).
//!    - *established*: every call sends the same frame, whose 250 flows were opened before the
//!      rounds: each repeat is an established flow, found as the agent's dataplane finds one
//!      (its `FLOWS_RECENT` slot, and `FLOWS_OUT` and `FLOWS_IN` every 33rd time): the plane is programmed as
//!      the agent programs it, each ring backend an endpoint of its own (device, `ENDPOINTS`
//!      and `ENDPOINT_CACHE` entries) and each exposure address's route carrying its grant.
//!    - *established, hot*: the same on a second ring of 2 VIPs (10.3.0.0 and .1), whose two
//!      flows stay in the CPU's caches, as the intra-cloud forward's one route does.
//!    - *spread*, in calls of one packet: the forward to 250 peers in turn (10.0.1.*i*, each an
//!      endpoint with its own route and counters) against the ring's 250 established flows in
//!      turn, and the empty TC program, interleaved call by call. The forward cannot be spread
//!      within a call (it rewrites only MACs and TTL, so every repeat finds the same route),
//!      and the ring of 250 against the forward to one peer compares 250 cold route lookups
//!      with one hot one, not the two paths (see the report).
//!    - *first packet*: every call uses a source port never used before, so each of its 250
//!      repeats opens a flow (VIPS lookup, flow hash, `FLOWS_IN` insert of the consumer's own
//!      port — free, so no second try — and `FLOWS_OUT` insert). Measured twice: with flow maps
//!      large enough for every flow of the run (no eviction), and with maps of the agent's
//!      default `max_flows` filled beforehand, so every insert takes an LRU eviction path.
//!
//!    The NAT address equals the consumer's address and the source port stays, as for a flow
//!    whose consumer port is free on the provider side: the same work runs as for any flow
//!    (`packet::rewrite_with`: one checksum helper call for the addresses, here the
//!    destination, and the ports' difference, here the destination port's, folded in by the
//!    program). VIPS also holds `grants` other grants (and ROUTES their two routes each), so
//!    the figures are for a host with that many grants.
//! 2. **Grants per second and memory per grant**: `Host::apply_service` (the agent's path:
//!    grant number, `VIPS` entry, VIP route, NAT route) for N grants with distinct consumer
//!    clouds, VIPs and NAT addresses, on a pinned dataplane sized for them. Kernel memory:
//!    `VIPS` is not preallocated, and the kernel's `memlock` figure for such a hash map
//!    (/proc/self/fdinfo) counts its live elements, so its growth over N grants is the
//!    per-grant cost the kernel accounts; `/proc/meminfo` Slab growth over the same inserts is
//!    reported as a cross-check (system-wide, so noisier, but it includes the allocator's
//!    rounding to its size classes). `ROUTES` is preallocated at `max_routes`: a grant's two
//!    routes cost two slots of its fixed memory (memlock / max_entries each).

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use atoll_agent::{
    config::DataplaneConfig,
    dataplane::{
        MAP_CLOUD_VNIS, MAP_COUNTERS, MAP_ENDPOINTS, MAP_ENDPOINT_CACHE, MAP_FLOWS_IN,
        MAP_FLOWS_OUT, MAP_OVERLAY_HOST, MAP_OVERLAY_PEERS, MAP_ROUTES, MAP_VIPS, MAP_VNI_CLOUDS,
        OBJECT, PROG_FROM_UNDERLAY, PROG_FROM_VM,
    },
    endpoint::{Host, ServiceSpec, PROTOCOL_UDP},
    types::CloudId,
};
use atoll_dataplane_common::{
    ipv4_to_map, Backend, EndpointInfo, EndpointSlot, FlowKey, FlowOut, NextHop, OverlayHost,
    RouteKey, VipService, ENDPOINT_CACHE_MASK, MAX_BACKENDS, NEXTHOP_NAT_SOURCE, NEXTHOP_REMOTE,
    NEXTHOP_VIP,
};
use atoll_testbed::{frame, PinRoot};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};

use crate::{frame_to, median, CHUNK, GUEST, GW, PEER};

/// VIPs in the ring: one call of `CHUNK` repeats visits each once.
pub const RING: u32 = CHUNK;
/// VIPs in the hot ring: two flows, so a call's repeats alternate between two translations
/// whose state stays in the CPU's caches (a ring of one would translate nothing: its backend
/// would sit at its own VIP's address and port).
const HOT_RING: u32 = 2;
const CONSUMER: u32 = 1;
const PROVIDER: u32 = 2;
const CONSUMER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Source port of the established flows.
const ESTABLISHED_PORT: u16 = 1999;
/// Device of the ring's backend *i*: `BACKEND_IFINDEX + i` (the hot ring's follow).
const BACKEND_IFINDEX: u32 = 100;
/// Device of the intra-cloud peer *i* of the spread forward (10.0.1.*i*): `PEER_IFINDEX + i`.
const PEER_IFINDEX: u32 = 1000;
/// The consumer cloud's endpoint on another host (the overlay).
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
/// This host's and the other host's underlay addresses, and the consumer cloud's VNI.
const UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const REMOTE_UNDERLAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const CONSUMER_VNI: u32 = 101;
const VXLAN_PORT: u16 = 4789;
/// Counter slots: the consumer 0, the intra-cloud peer 1, then one per backend and peer.
const FIRST_SLOT: u32 = 2;
/// Grant numbers: the ring's, the hot ring's, then the filler's.
const FILLER_GRANT: u32 = 1 + RING + HOT_RING;
/// The agent's default `max_flows`.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

fn map_ip(ip: Ipv4Addr) -> u32 {
    ipv4_to_map(ip.octets())
}

/// A ring of VIPs (module docs): VIP *i* at `base + i`, port `port + i`, grant `grant + i`,
/// its backend (at VIP *i*+1's address and port) on device `ifindex + i` with counter slot
/// `slot + i`.
#[derive(Clone, Copy)]
struct Ring {
    base: u32,
    port: u16,
    len: u32,
    grant: u32,
    ifindex: u32,
    slot: u32,
}

/// The ring of `RING` flows: every repeat of a call is another flow.
const SPREAD: Ring = Ring {
    base: 0x0a01_0000,
    port: 1000,
    len: RING,
    grant: 1,
    ifindex: BACKEND_IFINDEX,
    slot: FIRST_SLOT,
};

/// The ring of `HOT_RING` flows.
const HOT: Ring = Ring {
    base: 0x0a03_0000,
    port: 3000,
    len: HOT_RING,
    grant: 1 + RING,
    ifindex: BACKEND_IFINDEX + RING,
    slot: FIRST_SLOT + RING,
};

impl Ring {
    fn vip(&self, i: u32) -> (Ipv4Addr, u16) {
        let i = i % self.len;
        (Ipv4Addr::from(self.base + i), self.port + i as u16)
    }
}

/// The intra-cloud peer *i* of the spread forward: its address, device and counter slot.
fn peer(i: u32) -> (Ipv4Addr, u32, u32) {
    (
        Ipv4Addr::new(10, 0, 1, i as u8),
        PEER_IFINDEX + i,
        FIRST_SLOT + RING + HOT_RING + i,
    )
}

/// This host's end of the overlay; `in_place`: with an underlay device (4243), so frames are
/// encapsulated by the program, else by the VXLAN device (4242).
fn overlay_host(in_place: bool) -> OverlayHost {
    OverlayHost {
        vxlan_ifindex: 4242,
        underlay_ipv4: map_ip(UNDERLAY),
        underlay_ifindex: if in_place { 4243 } else { 0 },
        port_be: VXLAN_PORT.to_be(),
        underlay_mtu: 1500,
    }
}

/// `inner` (an Ethernet frame) as the host at `src` encapsulates it to `dst` under `vni`:
/// outer Ethernet, IPv4 (TTL 64, checksum set), UDP (no checksum) and VXLAN headers.
fn encapsulate(inner: &[u8], (src, dst): (Ipv4Addr, Ipv4Addr), vni: u32) -> Vec<u8> {
    let mut udp = Vec::with_capacity(16 + inner.len());
    udp.extend_from_slice(&50_000u16.to_be_bytes());
    udp.extend_from_slice(&VXLAN_PORT.to_be_bytes());
    udp.extend_from_slice(&((16 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0, 0x08, 0, 0, 0]);
    udp.extend_from_slice(&(vni << 8).to_be_bytes());
    udp.extend_from_slice(inner);
    let ip = frame::layers::Ipv4Packet::new(src.octets(), dst.octets(), 17, udp);
    frame::layers::ethernet(GW, PEER, 0x0800, &ip.bytes())
}

/// A loaded dataplane for the exposure path (module docs) and the source ports it used.
pub struct Plane {
    ebpf: Ebpf,
    /// The intra-cloud frame (to 10.0.0.3), for the comparison on the same object.
    forward: &'static [u8],
    /// The same to the cloud's endpoint on another host (10.0.3.1, over the overlay).
    remote: &'static [u8],
    /// That endpoint's frame to the consumer as its host encapsulates it to this one.
    encapsulated: Vec<u8>,
    /// One frame per intra-cloud peer (`peer`), for the spread forward.
    peer_frames: Vec<Vec<u8>>,
    /// One frame per VIP of the ring, each the established flow's, for calls of one packet.
    ring_frames: Vec<Vec<u8>>,
    next_port: u16,
    /// Flows opened so far (first-packet calls and the warm-up).
    pub opened: u64,
    pub flows: u32,
}

impl Plane {
    /// `grants` other grants in the maps, flow maps of `flows` entries. With `fill`, first
    /// packets are sent until the flow maps have evicted (the LRU is full).
    pub fn new(grants: u32, flows: u32, fill: bool) -> Result<Self> {
        let vips = grants + RING + HOT_RING + 16;
        let routes = 2 * grants + 3 * RING + 2 * HOT_RING + 16;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_ENDPOINTS, RING + HOT_RING + 16)
            .map_max_entries(MAP_COUNTERS, FIRST_SLOT + 2 * RING + HOT_RING + 16)
            .map_max_entries(MAP_ROUTES, routes)
            .map_max_entries(MAP_VIPS, vips)
            .map_max_entries(MAP_FLOWS_OUT, flows)
            .map_max_entries(MAP_FLOWS_IN, flows)
            .load(OBJECT)
            .context("loading the dataplane object")?;
        let consumer = EndpointInfo {
            cloud: CONSUMER,
            ipv4: map_ip(CONSUMER_IP),
            gateway_ipv4: ipv4_to_map([10, 0, 0, 1]),
            mac: GUEST,
            gateway_mac: GW,
            slot: 0,
        };
        // Each ring backend is an endpoint of its own, as the agent writes one: its device,
        // its identity in `ENDPOINTS`, its `ENDPOINT_CACHE` slot and its counters.
        let backends: Vec<(u32, EndpointInfo)> = [SPREAD, HOT]
            .iter()
            .flat_map(|r| {
                (0..r.len).map(|i| {
                    (
                        r.ifindex + i,
                        EndpointInfo {
                            cloud: PROVIDER,
                            ipv4: map_ip(r.vip(i).0),
                            gateway_ipv4: map_ip(Ipv4Addr::new(10, 0, 0, 1)),
                            mac: PEER,
                            gateway_mac: GW,
                            slot: r.slot + i,
                        },
                    )
                })
            })
            .collect();
        {
            let mut eps: HashMap<_, u32, EndpointInfo> =
                HashMap::try_from(ebpf.map_mut(MAP_ENDPOINTS).context("ENDPOINTS")?)?;
            eps.insert(1, consumer, 0)?;
            for (ifindex, info) in &backends {
                eps.insert(ifindex, info, 0)?;
            }
        }
        {
            let mut cache: Array<_, EndpointSlot> =
                Array::try_from(ebpf.map_mut(MAP_ENDPOINT_CACHE).context("ENDPOINT_CACHE")?)?;
            cache.set(
                1 & ENDPOINT_CACHE_MASK,
                EndpointSlot {
                    ifindex: 1,
                    info: consumer,
                },
                0,
            )?;
            for &(ifindex, info) in &backends {
                cache.set(
                    ifindex & ENDPOINT_CACHE_MASK,
                    EndpointSlot { ifindex, info },
                    0,
                )?;
            }
        }
        // An exposure address's route carries its grant, as the agent writes it.
        let service_hop = |grant: u32, flags: u16| NextHop {
            ifindex: grant,
            slot: 0,
            mac: [0; 6],
            flags,
        };
        let endpoint_hop = |ifindex: u32, slot: u32| NextHop {
            ifindex,
            slot,
            mac: PEER,
            flags: 0,
        };
        let key = |cloud: u32, ip: Ipv4Addr| RouteKey {
            cloud,
            ipv4: map_ip(ip),
        };
        {
            let mut routes: HashMap<_, RouteKey, NextHop> =
                HashMap::try_from(ebpf.map_mut(MAP_ROUTES).context("ROUTES")?)?;
            // The intra-cloud peer, as in the isolation planes.
            routes.insert(
                key(CONSUMER, Ipv4Addr::new(10, 0, 0, 3)),
                endpoint_hop(3, 1),
                0,
            )?;
            // The ring's grants share one NAT address (the consumer's own, module docs): its
            // route names no single grant.
            routes.insert(
                key(PROVIDER, CONSUMER_IP),
                service_hop(0, NEXTHOP_NAT_SOURCE),
                0,
            )?;
            for r in [SPREAD, HOT] {
                for i in 0..r.len {
                    let (vip, _) = r.vip(i);
                    routes.insert(key(CONSUMER, vip), service_hop(r.grant + i, NEXTHOP_VIP), 0)?;
                    // The backend at VIP i's address (serving VIP i-1) lives in the provider's
                    // cloud, on its own device with its own counters.
                    routes.insert(
                        key(PROVIDER, vip),
                        endpoint_hop(r.ifindex + i, r.slot + i),
                        0,
                    )?;
                }
            }
            // The consumer's own address, where the overlay delivers to it.
            routes.insert(key(CONSUMER, CONSUMER_IP), endpoint_hop(1, 0), 0)?;
            // An endpoint of the cloud on another host: the overlay's encapsulation.
            routes.insert(
                key(CONSUMER, REMOTE_IP),
                NextHop {
                    ifindex: map_ip(REMOTE_UNDERLAY),
                    slot: 0,
                    mac: PEER,
                    flags: NEXTHOP_REMOTE,
                },
                0,
            )?;
            // The spread forward's peers, each an endpoint with its own route and counters.
            for i in 0..RING {
                let (ip, ifindex, slot) = peer(i);
                routes.insert(key(CONSUMER, ip), endpoint_hop(ifindex, slot), 0)?;
            }
            for j in 0..grants {
                let (cloud, vip, nat) = filler(j);
                let grant = FILLER_GRANT + j;
                routes.insert(key(cloud, vip), service_hop(grant, NEXTHOP_VIP), 0)?;
                routes.insert(
                    key(PROVIDER, nat),
                    service_hop(grant, NEXTHOP_NAT_SOURCE),
                    0,
                )?;
            }
        }
        {
            let mut table: HashMap<_, RouteKey, VipService> =
                HashMap::try_from(ebpf.map_mut(MAP_VIPS).context("VIPS")?)?;
            for r in [SPREAD, HOT] {
                for i in 0..r.len {
                    let (vip, port) = r.vip(i);
                    let svc = service(r.grant + i, CONSUMER_IP, port, &[r.vip(i + 1)]);
                    table.insert(key(CONSUMER, vip), svc, 0)?;
                }
            }
            for j in 0..grants {
                let (cloud, vip, nat) = filler(j);
                let backends = [
                    (Ipv4Addr::new(10, 0, 0, 2), 8080),
                    (Ipv4Addr::new(10, 0, 0, 3), 8080),
                ];
                table.insert(
                    key(cloud, vip),
                    service(FILLER_GRANT + j, nat, 80, &backends),
                    0,
                )?;
            }
        }
        {
            let mut host: Array<_, OverlayHost> =
                Array::try_from(ebpf.map_mut(MAP_OVERLAY_HOST).context("OVERLAY_HOST")?)?;
            host.set(0, overlay_host(false), 0)?;
        }
        {
            let mut vnis: HashMap<_, u32, u32> =
                HashMap::try_from(ebpf.map_mut(MAP_CLOUD_VNIS).context("CLOUD_VNIS")?)?;
            vnis.insert(CONSUMER, CONSUMER_VNI, 0)?;
            let mut clouds: HashMap<_, u32, u32> =
                HashMap::try_from(ebpf.map_mut(MAP_VNI_CLOUDS).context("VNI_CLOUDS")?)?;
            clouds.insert(CONSUMER_VNI, CONSUMER, 0)?;
            let mut peers: HashMap<_, u32, u32> =
                HashMap::try_from(ebpf.map_mut(MAP_OVERLAY_PEERS).context("OVERLAY_PEERS")?)?;
            peers.insert(map_ip(REMOTE_UNDERLAY), 1, 0)?;
        }
        {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(PROG_FROM_UNDERLAY)
                .context("from_underlay")?
                .try_into()?;
            prog.load()?;
        }
        {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(PROG_FROM_VM)
                .context("from_vm")?
                .try_into()?;
            prog.load()?;
        }
        let mut plane = Plane {
            ebpf,
            forward: Vec::leak(frame_to(GW, GUEST, CONSUMER_IP, Ipv4Addr::new(10, 0, 0, 3))),
            remote: Vec::leak(frame_to(GW, GUEST, CONSUMER_IP, REMOTE_IP)),
            encapsulated: encapsulate(
                &frame_to(GUEST, PEER, REMOTE_IP, CONSUMER_IP),
                (REMOTE_UNDERLAY, UNDERLAY),
                CONSUMER_VNI,
            ),
            peer_frames: (0..RING)
                .map(|i| frame_to(GW, GUEST, CONSUMER_IP, peer(i).0))
                .collect(),
            ring_frames: (0..RING)
                .map(|i| ring_frame(&SPREAD, i, ESTABLISHED_PORT))
                .collect(),
            next_port: ESTABLISHED_PORT + 1,
            opened: 0,
            flows,
        };
        // Open the established flows.
        plane.run(1, |_| ESTABLISHED_PORT)?;
        plane.run_frame(&ring_frame(&HOT, 0, ESTABLISHED_PORT), 1, CHUNK)?;
        plane.opened += u64::from(RING + HOT_RING);
        if fill {
            // Enough first packets that the LRU maps must have evicted (module docs).
            let calls = (flows + flows / 4).div_ceil(RING);
            plane.first_packets(calls)?;
        }
        Ok(plane)
    }

    fn prog(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(PROG_FROM_VM)
            .context("from_vm")?
            .try_into()?)
    }

    /// Runs `calls` calls of `CHUNK` repeats, the frame of call `c` from source port
    /// `port(c)`; returns the mean kernel time per packet. Every call must end in a redirect.
    fn run(&self, calls: u32, mut port: impl FnMut(u32) -> u16) -> Result<f64> {
        let mut total = 0.0;
        for c in 0..calls {
            total += self.run_frame(&ring_frame(&SPREAD, 0, port(c)), 1, CHUNK)?;
        }
        Ok(total / f64::from(calls.max(1)))
    }

    /// Runs `calls` calls of `repeat` repeats of `frame`; returns the mean kernel time per
    /// packet. Every call must end in a redirect.
    fn run_frame(&self, frame: &[u8], calls: u32, repeat: u32) -> Result<f64> {
        let prog = self.prog()?;
        let mut total = 0u128;
        for _ in 0..calls {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..Default::default()
            })?;
            if r.return_value != 7 {
                bail!(
                    "exposure plane: verdict {} instead of a redirect, drops {:?}",
                    r.return_value,
                    crate::drops(&self.ebpf)
                );
            }
            total += r.duration.as_nanos();
        }
        Ok(total as f64 / f64::from(calls.max(1)))
    }

    /// The spread paths in calls of one packet: `rounds` times, the empty TC program, the
    /// intra-cloud forward to peer *c* (of `RING`, each an endpoint with its own route and
    /// counters) and the established flow of ring VIP *c*, interleaved call by call so the
    /// machine's drift touches all three alike. Mean ns per packet of each.
    pub fn spread(&self, empty_tc: &SchedClassifier, calls: u32) -> Result<(f64, f64, f64)> {
        let mut total = (0u128, 0.0, 0.0);
        for c in 0..calls {
            let i = c as usize % RING as usize;
            let r = empty_tc.test_run(TestRunOptions {
                data_in: Some(&self.peer_frames[i]),
                repeat: 1,
                ..Default::default()
            })?;
            if r.return_value != 0 {
                bail!("empty TC program: verdict {}", r.return_value);
            }
            total.0 += r.duration.as_nanos();
            total.1 += self.run_frame(&self.peer_frames[i], 1, 1)?;
            total.2 += self.run_frame(&self.ring_frames[i], 1, 1)?;
        }
        let n = f64::from(calls.max(1));
        Ok((total.0 as f64 / n, total.1 / n, total.2 / n))
    }

    /// Mean ns per packet over `calls` calls in which every packet opens a new flow.
    pub fn first_packets(&mut self, calls: u32) -> Result<f64> {
        let start = self.next_port;
        if u32::from(start) + calls > u32::from(u16::MAX) {
            bail!("out of fresh source ports");
        }
        self.next_port += calls as u16;
        self.opened += u64::from(calls) * u64::from(RING);
        self.run(calls, |c| start + c as u16)
    }

    /// Mean ns per packet over `calls` calls of established flows.
    pub fn established(&self, calls: u32) -> Result<f64> {
        self.run(calls, |_| ESTABLISHED_PORT)
    }

    /// Mean ns per packet over `calls` calls of the hot ring's two established flows.
    pub fn established_hot(&self, calls: u32) -> Result<f64> {
        self.run_frame(&ring_frame(&HOT, 0, ESTABLISHED_PORT), calls, CHUNK)
    }

    /// The intra-cloud forward on this plane: ns per packet, `calls` calls.
    pub fn intra_cloud(&self, calls: u32) -> Result<f64> {
        crate::measure(self.prog()?, self.forward, calls * CHUNK, 7, CHUNK, 1)
    }

    /// The intra-cloud forward to an endpoint on another host (tunnel key set, redirect to
    /// the VXLAN device): ns per packet, `calls` calls.
    pub fn cross_host(&self, calls: u32) -> Result<f64> {
        crate::measure(self.prog()?, self.remote, calls * CHUNK, 7, CHUNK, 1)
    }

    /// Calls of one packet, interleaved: the intra-cloud forward, the forward to an endpoint
    /// on another host encapsulated in place (`from_vm` with an underlay device), and that
    /// endpoint's encapsulated frame to the consumer decapsulated and delivered
    /// (`from_underlay`): mean ns per packet of each. One packet per call because both
    /// programs change the frame's length, and a test run's repeats reuse one `sk_buff`.
    pub fn overlay_singles(&mut self, calls: u32) -> Result<(f64, f64, f64)> {
        self.set_overlay_host(true)?;
        let measured = self.overlay_singles_in_place(calls);
        self.set_overlay_host(false)?;
        measured
    }

    fn overlay_singles_in_place(&self, calls: u32) -> Result<(f64, f64, f64)> {
        let underlay: &SchedClassifier = self
            .ebpf
            .program(PROG_FROM_UNDERLAY)
            .context("from_underlay")?
            .try_into()?;
        let once = |prog: &SchedClassifier, frame: &[u8], what: &str| -> Result<u128> {
            let r = prog.test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..Default::default()
            })?;
            if r.return_value != 7 {
                bail!("{what}: verdict {} instead of a redirect", r.return_value);
            }
            Ok(r.duration.as_nanos())
        };
        let mut total = (0u128, 0u128, 0u128);
        for _ in 0..calls {
            total.0 += once(self.prog()?, self.forward, "intra-cloud forward")?;
            total.1 += once(self.prog()?, self.remote, "encapsulation in place")?;
            total.2 += once(underlay, &self.encapsulated, "decapsulation")?;
        }
        let n = calls.max(1) as f64;
        Ok((total.0 as f64 / n, total.1 as f64 / n, total.2 as f64 / n))
    }

    fn set_overlay_host(&mut self, in_place: bool) -> Result<()> {
        let mut host: Array<_, OverlayHost> = Array::try_from(
            self.ebpf
                .map_mut(MAP_OVERLAY_HOST)
                .context("OVERLAY_HOST")?,
        )?;
        host.set(0, overlay_host(in_place), 0)?;
        Ok(())
    }

    /// Fails if any packet was dropped, or (for maps with room) if the flows in `FLOWS_OUT`
    /// are not exactly the flows opened: every first packet did open one.
    pub fn check(&self, expect_all_flows: bool) -> Result<()> {
        let drops = crate::drops(&self.ebpf)?;
        if !drops.is_empty() {
            bail!("exposure plane dropped packets: {drops:?}");
        }
        if expect_all_flows {
            let map: HashMap<_, FlowKey, FlowOut> =
                HashMap::try_from(self.ebpf.map(MAP_FLOWS_OUT).context("FLOWS_OUT")?)?;
            let n = map.keys().count() as u64;
            if n != self.opened {
                bail!("FLOWS_OUT holds {n} flows, {} were opened", self.opened);
            }
        }
        Ok(())
    }
}

/// The consumer's 64-byte UDP frame from `sport` to VIP `start` of `ring`, TTL 255.
fn ring_frame(ring: &Ring, start: u32, sport: u16) -> Vec<u8> {
    let (vip, port) = ring.vip(start);
    let mut f = frame::Udp {
        src_mac: GUEST,
        dst_mac: GW,
        src: CONSUMER_IP,
        dst: vip,
        sport,
        dport: port,
    }
    .frame(&[0x5a; 22]);
    frame::set_ttl(&mut f, 255);
    debug_assert_eq!(f.len(), 64);
    f
}

/// Grant `j` of the filler: its consumer cloud, VIP and NAT address.
fn filler(j: u32) -> (u32, Ipv4Addr, Ipv4Addr) {
    (
        1000 + j,
        Ipv4Addr::from(0x0a02_0000 + j),
        Ipv4Addr::from(0x6440_0000 + j),
    )
}

fn service(grant: u32, nat: Ipv4Addr, port: u16, backends: &[(Ipv4Addr, u16)]) -> VipService {
    let mut svc = VipService {
        grant,
        provider: PROVIDER,
        nat_ipv4: map_ip(nat),
        port: port.to_be(),
        protocol: PROTOCOL_UDP,
        count: backends.len() as u8,
        backends: [Backend::default(); MAX_BACKENDS],
    };
    for (b, (ip, p)) in svc.backends.iter_mut().zip(backends) {
        *b = Backend {
            ipv4: map_ip(*ip),
            port: p.to_be(),
            _pad: 0,
        };
    }
    svc
}

/// One round of the exposure figures, ns per packet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    /// Calls of `CHUNK` repeats: the intra-cloud forward to one peer, the ring's `RING`
    /// established flows, the hot ring's two, and first packets (maps with room; full maps).
    pub intra: f64,
    pub established: f64,
    pub established_hot: f64,
    pub first: f64,
    pub first_full: f64,
    /// Calls of one packet: the empty TC program, the intra-cloud forward to `RING` peers in
    /// turn, and the ring's `RING` established flows in turn.
    pub empty_single: f64,
    pub intra_spread: f64,
    pub established_spread: f64,
    /// Calls of `CHUNK` repeats: the forward to an endpoint on another host (the overlay's
    /// encapsulation).
    pub cross_host: f64,
    /// Calls of one packet (`Plane::overlay_singles`): the intra-cloud forward, the
    /// forward encapsulated in place, the decapsulation.
    pub intra_single: f64,
    pub encap_single: f64,
    pub decap_single: f64,
    /// Calls of one packet of each spread path per round.
    pub spread_calls: u32,
}

impl Round {
    const N: usize = 12;

    fn fields(&self) -> [f64; Self::N] {
        [
            self.intra,
            self.established,
            self.established_hot,
            self.first,
            self.first_full,
            self.empty_single,
            self.intra_spread,
            self.established_spread,
            self.cross_host,
            self.intra_single,
            self.encap_single,
            self.decap_single,
        ]
    }

    fn from_fields(f: [f64; Self::N], spread_calls: u32) -> Self {
        let [intra, established, established_hot, first, first_full, empty_single, intra_spread, established_spread, cross_host, intra_single, encap_single, decap_single] =
            f;
        Round {
            intra,
            established,
            established_hot,
            first,
            first_full,
            empty_single,
            intra_spread,
            established_spread,
            cross_host,
            intra_single,
            encap_single,
            decap_single,
            spread_calls,
        }
    }

    /// The established flow over the intra-cloud forward, like for like: the hot ring over
    /// the forward to one peer (calls of `CHUNK`), and the spread ring over the forward to
    /// `RING` peers, each less the empty program (calls of one; the call's own overhead is
    /// the same for both and would flatter the ratio).
    pub fn ratios(&self) -> (f64, f64) {
        (
            self.established_hot / self.intra,
            (self.established_spread - self.empty_single) / (self.intra_spread - self.empty_single),
        )
    }
}

/// One round of the exposure figures; `singles` calls of one packet for the spread paths.
pub fn measure_round(
    roomy: &mut Plane,
    full: &mut Plane,
    empty_tc: &SchedClassifier,
    repeats: u32,
    first: u32,
) -> Result<Round> {
    let calls = repeats.div_ceil(CHUNK);
    let first_calls = first.div_ceil(CHUNK);
    let spread_calls = repeats / 50;
    let (empty_single, intra_spread, established_spread) = roomy.spread(empty_tc, spread_calls)?;
    let (intra_single, encap_single, decap_single) = roomy.overlay_singles(spread_calls)?;
    Ok(Round {
        intra: roomy.intra_cloud(calls)?,
        established: roomy.established(calls)?,
        established_hot: roomy.established_hot(calls)?,
        first: roomy.first_packets(first_calls)?,
        first_full: full.first_packets(first_calls)?,
        empty_single,
        intra_spread,
        established_spread,
        cross_host: roomy.cross_host(calls)?,
        intra_single,
        encap_single,
        decap_single,
        spread_calls,
    })
}

pub struct Grants {
    pub grants: u32,
    pub total: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// `VIPS` memlock growth per grant (its element).
    pub vips_memlock: f64,
    /// `VIPS` memlock of the empty map per slot of `max_vips` (hash buckets, fixed).
    pub vips_slot: f64,
    /// /proc/meminfo Slab growth per grant (may be negative: system-wide).
    pub slab: f64,
    /// One preallocated `ROUTES` slot (a grant takes two).
    pub route_slot: f64,
    /// One preallocated flow entry in `FLOWS_OUT` plus one in `FLOWS_IN`.
    pub flow_pair: f64,
    pub max_flows: u32,
}

impl Grants {
    pub fn per_second(&self) -> f64 {
        f64::from(self.grants) / self.total.as_secs_f64()
    }

    /// Kernel memory of a grant: its `VIPS` element, its share of the `VIPS` buckets and two
    /// preallocated route slots.
    pub fn per_grant(&self) -> f64 {
        self.vips_memlock + self.vips_slot + 2.0 * self.route_slot
    }
}

fn fdinfo_memlock(path: &Path) -> Result<u64> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock for {}", path.display()))
}

fn slab_bytes() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no Slab in /proc/meminfo")
}

/// `n` grants through `Host::apply_service` on a fresh pinned dataplane (module docs).
pub fn grants(n: u32) -> Result<Grants> {
    let pins = PinRoot::new("bg");
    let cfg = DataplaneConfig {
        bpffs_root: pins.path().into(),
        max_endpoints: 64,
        max_routes: 2 * n + 64,
        max_vips: n + 64,
        max_flows: DEFAULT_MAX_FLOWS,
        tap_pool: 0,
        ..DataplaneConfig::default()
    };
    // The host's netlink connection (unused here) registers with a runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = rt.enter();
    let mut host = Host::open(&cfg)?;
    let maps = host.dataplane().pin_dir().join("maps");
    let specs: Vec<ServiceSpec> = (0..n)
        .map(|i| ServiceSpec {
            consumer: CloudId::new(1 + i).expect("non-zero"),
            vip: Ipv4Addr::from(0x0a80_0000 + i),
            provider: CloudId::new(2_000_000 + i % 1000).expect("non-zero"),
            nat: Ipv4Addr::from(0x6440_0000 + i),
            protocol: PROTOCOL_UDP,
            port: 53,
            backends: vec![
                (Ipv4Addr::new(10, 0, 0, 2), 5353),
                (Ipv4Addr::new(10, 0, 0, 3), 5353),
            ],
        })
        .collect();
    let vips_before = fdinfo_memlock(&maps.join(MAP_VIPS))?;
    let slab_before = slab_bytes()?;
    let mut each = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for spec in &specs {
        let t = Instant::now();
        host.apply_service(spec)?;
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    let slab_after = slab_bytes()?;
    let vips_after = fdinfo_memlock(&maps.join(MAP_VIPS))?;
    let installed = host.dataplane().vips()?.len();
    if installed != n as usize {
        bail!("{installed} VIPs installed, {n} granted");
    }
    let routes = fdinfo_memlock(&maps.join(MAP_ROUTES))?;
    let flows =
        fdinfo_memlock(&maps.join(MAP_FLOWS_OUT))? + fdinfo_memlock(&maps.join(MAP_FLOWS_IN))?;
    drop(host);
    drop(pins);
    each.sort();
    let pct = |p: f64| each[((each.len() as f64 - 1.0) * p).round() as usize];
    Ok(Grants {
        grants: n,
        total,
        p50: pct(0.5),
        p99: pct(0.99),
        vips_memlock: vips_after.saturating_sub(vips_before) as f64 / f64::from(n),
        vips_slot: vips_before as f64 / f64::from(cfg.max_vips),
        slab: (slab_after as f64 - slab_before as f64) / f64::from(n),
        route_slot: routes as f64 / f64::from(cfg.max_routes),
        flow_pair: flows as f64 / f64::from(cfg.max_flows),
        max_flows: cfg.max_flows,
    })
}

/// Median of each figure over the rounds.
pub fn medians(rounds: &[Round]) -> Round {
    let mut out = [0.0; Round::N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = median(rounds.iter().map(|r| r.fields()[i]).collect());
    }
    Round::from_fields(out, rounds.first().map_or(0, |r| r.spread_calls))
}
