//! Types shared by the eBPF dataplane and userspace, defined exactly once.
//!
//! Every type that crosses the kernel/userspace boundary lives here, is `#[repr(C)]`, and is
//! padding-free: its size equals the sum of its fields' sizes (checked by the `const` assertions
//! at the bottom), so the bytes the agent writes into a map are exactly the bytes the program
//! reads, with no uninitialised padding.
//!
//! Design decisions recorded here:
//! - IPv4 addresses are stored as `u32` holding the four address octets in network byte order,
//!   i.e. `u32::from_ne_bytes(addr.octets())`. The program compares them against packet bytes
//!   without any byte swapping. Use [`ipv4_to_map`] / [`ipv4_from_map`] in userspace.
//! - Clouds are identified by a dense `u32` [`EndpointInfo::cloud`] chosen by the control plane.
//!   Cloud 0 is reserved and never valid, so a zeroed entry can never match a real cloud.
//! - [`LAYOUT_VERSION`] names the layout of every map below. The agent pins maps under a directory
//!   that carries this version, so a program can never silently misread a map written by another
//!   layout; a layout change bumps the version (migration is the agent's job).
#![cfg_attr(not(test), no_std)]

/// Version of the map layouts defined in this crate. Bump on any change to a map's key, value,
/// or meaning.
pub const LAYOUT_VERSION: u32 = 14;

/// Traffic classes the counters have room for: [`TrafficClass::COUNT`] are used. A new class
/// takes a free one, so adding it changes no map layout.
pub const TRAFFIC_CLASS_SLOTS: usize = 8;

/// Drop reason numbers the counters have room for (`EndpointCounters::drops` and `DROPS`):
/// [`DropReason::SLOTS`] are used (number 0 never is). A new reason takes the next free number,
/// so adding it changes no map layout; past 64 reasons the room grows with a layout version.
pub const DROP_SLOTS: u32 = 64;

/// Identity of one endpoint (a VM's tap or a guest veth), keyed by the host-side ifindex in the
/// `ENDPOINTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The cloud (tenant) this endpoint belongs to; never 0.
    pub cloud: u32,
    /// The guest's IPv4 address (network byte order, see module docs).
    pub ipv4: u32,
    /// The cloud's gateway IPv4 address as the guest sees it (network byte order).
    pub gateway_ipv4: u32,
    /// The guest's MAC address: the only source MAC accepted from it.
    pub mac: [u8; 6],
    /// The gateway MAC the guest talks to; source MAC of every frame delivered to the guest.
    pub gateway_mac: [u8; 6],
    /// Dense index of this endpoint's counters in `COUNTERS` (below `max_endpoints`).
    pub slot: u32,
}

/// One slot of the direct-mapped `ENDPOINT_CACHE` array, indexed by
/// `ifindex & ENDPOINT_CACHE_MASK`. The slot is valid for `ifindex` only if its `ifindex` field
/// equals it; otherwise the programs fall back to the `ENDPOINTS` hash. `ifindex` 0 marks an
/// empty slot (no device has ifindex 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointSlot {
    pub ifindex: u32,
    pub info: EndpointInfo,
}

/// Number of `ENDPOINT_CACHE` slots (a power of two).
pub const ENDPOINT_CACHE_SLOTS: u32 = 1 << 16;
/// Mask applied to an ifindex to find its cache slot.
pub const ENDPOINT_CACHE_MASK: u32 = ENDPOINT_CACHE_SLOTS - 1;

/// Key of the `ROUTES` map: an address inside one cloud. Because the cloud is part of the key,
/// clouds may use overlapping address ranges and an address of another cloud can never be found.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteKey {
    pub cloud: u32,
    /// Destination IPv4 address (network byte order).
    pub ipv4: u32,
}

/// Value of the `ROUTES` map: where a packet to [`RouteKey`] is delivered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// Host-side ifindex of the destination endpoint's device.
    pub ifindex: u32,
    /// The destination endpoint's counter slot (its traffic "to guest" is counted there).
    pub slot: u32,
    /// Destination guest MAC, written as the frame's destination MAC.
    pub mac: [u8; 6],
    /// [`NEXTHOP_ENDPOINT`] for an endpoint; [`NEXTHOP_VIP`] or [`NEXTHOP_NAT_SOURCE`] for an
    /// exposure address: then `ifindex` holds the grant the address belongs to
    /// ([`VipService::grant`], so an established flow is checked against the grant without a
    /// look at `VIPS`; 0 = unknown, the flow takes the `VIPS` path), `slot` and `mac` are 0
    /// and the exposure maps decide.
    pub flags: u16,
}

/// `NextHop::flags`: a local endpoint.
pub const NEXTHOP_ENDPOINT: u16 = 0;
/// `NextHop::flags`: a VIP in a consumer cloud; `VIPS` holds its service.
pub const NEXTHOP_VIP: u16 = 1;
/// `NextHop::flags`: a provider-side NAT source address (where a consumer's flows appear to
/// come from); replies to it are found in `FLOWS_IN`.
pub const NEXTHOP_NAT_SOURCE: u16 = 2;
/// `NextHop::flags`: an endpoint of the same cloud on another host: `ifindex` holds that
/// host's underlay IPv4 address (map order, see [`ipv4_to_map`]), `mac` the guest's MAC, `slot`
/// is 0. `from_vm` encapsulates to it, `from_overlay` accepts from that host only what comes
/// from such an address (see `dataplane-ebpf/src/overlay.rs`).
pub const NEXTHOP_REMOTE: u16 = 3;
/// `NextHop::flags`: on a host running a provider's backends, the NAT address of a grant for
/// one consumer host (in the provider's route space): `ifindex` holds that consumer host's
/// underlay address (map order), `mac` and `slot` are 0. A backend's reply to it is
/// encapsulated to that host without a TTL decrement (the consumer host's translation is the
/// hop) and metered `exposure`; `from_overlay` accepts from that host frames from this
/// address to local endpoints, metered `exposure` (see "Exposures across hosts" in
/// `dataplane-ebpf/src/exposure.rs`).
pub const NEXTHOP_REMOTE_NAT: u16 = 4;

/// The value of the one-entry `OVERLAY_HOST` array: this host's end of the overlay. All zero
/// (the array's initial value): no overlay, and a packet to a remote endpoint is dropped
/// (`overlay_off`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayHost {
    /// ifindex of the VXLAN device (external mode): frames the programs do not encapsulate
    /// themselves (GSO, or too big for the underlay) are redirected to it with a tunnel key.
    pub vxlan_ifindex: u32,
    /// This host's underlay address, the outer source (map order).
    pub underlay_ipv4: u32,
    /// ifindex of the device holding the underlay address: frames the programs encapsulate
    /// are redirected to it (`bpf_redirect_neigh`), and `from_underlay` on its ingress
    /// decapsulates what is sent to this host. 0: every frame takes the VXLAN device.
    pub underlay_ifindex: u32,
    /// The VXLAN UDP port, network byte order (both ends use the same).
    pub port_be: u16,
    /// The largest IPv4 packet the underlay carries (its MTU): a frame whose encapsulation
    /// would exceed it takes the VXLAN device, which fragments.
    pub underlay_mtu: u16,
}

/// VXLAN network identifiers are 24 bits.
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// Backends per exposure the dataplane can choose from.
pub const MAX_BACKENDS: usize = 16;

/// One backend of an exposure: a provider VM's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Provider-cloud IPv4 (network byte order).
    pub ipv4: u32,
    /// Port in network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `VIPS`, keyed by [`RouteKey`] `(consumer cloud, VIP)`: one grant of an exposure to
/// the consumer, with the exposure's backends inline (one lookup finds everything the first
/// packet of a flow needs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipService {
    /// Non-zero, unique on this host among live grants, never reused for another grant while
    /// flows of the old one may exist: a flow records it and is cut when it no longer matches
    /// (revocation takes effect for existing flows).
    pub grant: u32,
    /// The provider cloud.
    pub provider: u32,
    /// Provider-side source address of this consumer's flows (network byte order).
    pub nat_ipv4: u32,
    /// The port consumers connect to on the VIP (network byte order).
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Backends in use, `backends[..count]`; 0 means none is available (new flows dropped).
    pub count: u8,
    pub backends: [Backend; MAX_BACKENDS],
}

/// Key of the connection-tracking maps: a flow as seen in one cloud.
///
/// `FLOWS_OUT` is keyed by the consumer's view of the first packet `(consumer cloud, consumer
/// address:port → VIP:port)`; `FLOWS_IN` by the provider's view of a reply
/// `(provider cloud, backend:port → NAT address:NAT port)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub cloud: u32,
    pub src_ipv4: u32,
    pub dst_ipv4: u32,
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of `FLOWS_OUT`: how a consumer's flow is translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowOut {
    /// The grant the flow was admitted under (see [`VipService::grant`]).
    pub grant: u32,
    pub backend_ipv4: u32,
    /// Network byte order.
    pub backend_port: u16,
    /// The source port on the provider side (network byte order).
    pub nat_port: u16,
}

/// Value of `FLOWS_IN`: how a provider's reply is translated back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowIn {
    pub grant: u32,
    pub consumer_cloud: u32,
    pub consumer_ipv4: u32,
    pub vip: u32,
    /// Network byte order.
    pub consumer_port: u16,
    /// Network byte order.
    pub vip_port: u16,
}

/// One slot of `FLOWS_RECENT`, a direct-mapped cache in front of `FLOWS_OUT`, `FLOWS_IN`,
/// `VIPS` and the backend's route (slot [`cache_slot`] of the consumer's flow key): what an
/// established consumer flow needs, as the tables had it, valid for `credit` more packets and
/// while `FLOWS_HELD[held_slot]` is still `held_version` (see [`EgressRecent`]). Written by
/// the programs only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecent {
    pub key: FlowKey,
    /// The grant the flow was admitted under; used only while the VIP's route names it.
    pub grant: u32,
    pub provider: u32,
    pub nat_ipv4: u32,
    pub backend_ipv4: u32,
    /// The backend endpoint's device, used only while `ENDPOINT_CACHE` says that device is
    /// `(provider, backend_ipv4)`.
    pub backend_ifindex: u32,
    /// [`cache_slot`] of the flow's reply key (16 bits: [`CACHE_BITS`]), and the reservation
    /// version read there before `FLOWS_IN` confirmed the flow holds its NAT port (see
    /// [`EgressRecent`]).
    pub held_slot: u16,
    pub credit: u16,
    /// Network byte order.
    pub backend_port: u16,
    /// Network byte order.
    pub nat_port: u16,
    pub held_version: u64,
    /// The translation's checksum differences, folded to 16 bits (0: none): the addresses'
    /// (IPv4 and pseudo header) and the ports', computed once when the slot is filled.
    pub addresses_diff: u16,
    pub ports_diff: u16,
    /// The slot's sequence word (see [`SLOT_WRITERS`]).
    pub seq: u32,
}

/// The value of the one-entry `EGRESS_HOST` array: this host's way out (see
/// `dataplane-ebpf/src/egress.rs`). All zero (the array's initial value): egress is off, and
/// every packet leaving its cloud is dropped as `no_route_in_cloud`, as before egress existed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressHost {
    /// ifindex of the uplink device; 0 = egress off on this host.
    pub uplink_ifindex: u32,
    /// The host's egress address, for clouds without their own (network byte order).
    pub egress_ipv4: u32,
    /// First NAT port (host byte order): NAT ports are `first .. first + count`.
    pub nat_port_first: u16,
    /// Number of NAT ports (at least 1 when egress is on).
    pub nat_port_count: u16,
    /// The gateway MAC guests see: source MAC of replies delivered to them.
    pub gateway_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `EgressCloud::mode`: nothing leaves the cloud.
pub const EGRESS_MODE_DENY: u32 = 0;
/// `EgressCloud::mode`: everything but the always-denied set and the cloud's deny rules.
pub const EGRESS_MODE_ALLOW: u32 = 1;
/// `EgressCloud::mode`: only the cloud's allow rules (and the addresses learnt from allowed
/// names), minus the always-denied set and its deny rules.
pub const EGRESS_MODE_ALLOWLIST: u32 = 2;

/// Value of `EGRESS_CLOUDS`, keyed by cloud: a cloud's egress on this host. A cloud without an
/// entry reaches nothing outside its range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCloud {
    /// The cloud's address range (network byte order, masked) and its mask: destinations
    /// inside it never leave the host as egress.
    pub range_ipv4: u32,
    pub range_mask: u32,
    /// The cloud's own egress address; 0 = the host's (`EgressHost::egress_ipv4`).
    pub egress_ipv4: u32,
    /// Changes whenever what this cloud may reach changes (its policy, the always-denied set):
    /// a flow admitted under another generation is checked again, and cut if no longer
    /// allowed.
    pub generation: u32,
    /// `EGRESS_MODE_*`.
    pub mode: u32,
    /// New egress flows per second this cloud may open on this host, with a second's worth
    /// of burst (`egress.max_new_flows_per_sec`); 0 = no limit (what entries written before
    /// the limit existed hold in this word).
    pub new_flows_per_sec: u32,
    /// Bytes per second leaving the host for this cloud (Ethernet frames as the uplink sends
    /// them); 0 = no limit.
    pub rate_bytes_per_sec: u64,
    /// How far ahead of now the rate's virtual clock may run: the burst, in nanoseconds of
    /// the rate.
    pub burst_ns: u64,
    /// Bytes the cloud may send out in the current period; [`NO_BUDGET`] = no budget.
    pub budget_bytes: u64,
    /// The current budget period's number (the agent's UTC hour, day or month); usage counted
    /// under another number starts again from 0.
    pub budget_period: u64,
}

/// `EgressCloud::budget_bytes`: no budget.
pub const NO_BUDGET: u64 = u64::MAX;

/// Value of `EGRESS_METERS`, keyed by cloud: the state of its rate limit and budget, written
/// by the programs only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressMeter {
    /// The rate's virtual clock (`CLOCK_BOOTTIME` ns): when the bytes sent so far would have
    /// left at the rate.
    pub next_ns: u64,
    /// Bytes sent out in `period`.
    pub used_bytes: u64,
    /// The budget period `used_bytes` counts.
    pub period: u64,
}

/// Data of the per-cloud LPM tries `EGRESS_ALLOW` and `EGRESS_DENY`: the cloud's 32 bits come
/// first and are always matched whole (a prefix length is `32 + address bits`), so one trie
/// serves every cloud and no cloud's rule can match another cloud's packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EgressRuleKey {
    pub cloud: u32,
    /// Network byte order.
    pub ipv4: u32,
}

/// One port rule of an [`EgressRules`] entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// `CLOCK_BOOTTIME` nanoseconds after which the rule no longer applies (an address learnt
    /// from a DNS answer: its TTL plus a grace period); 0 = never.
    pub expires_ns: u64,
    /// Ports `first..=last` (host byte order); a packet without ports (ICMP) matches only
    /// `0..=65535`.
    pub first: u16,
    pub last: u16,
    /// `IPPROTO_TCP`, `IPPROTO_UDP`, or 0 for any protocol.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Port rules one prefix of a cloud can carry: the rules of the prefix itself and of every
/// shorter prefix of the same cloud covering it (the agent merges them, so the longest match
/// alone decides). More are cut by the agent, failing closed (see `agent/src/egress.rs`).
pub const RULES_PER_PREFIX: usize = 8;

/// Value of `EGRESS_ALLOW` and `EGRESS_DENY`: the rules that apply to the addresses of one
/// prefix; a packet matches if any of `rules[..count]` does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    pub rules: [PortRule; RULES_PER_PREFIX],
    pub count: u32,
    pub _pad: u32,
}

/// Value of `EGRESS_OUT`, keyed by the guest's view of a flow `(cloud, guest:port → remote:port)`
/// ([`FlowKey`]; ICMP echo: the identifier as source port, destination port 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressOut {
    /// Source address on the uplink (network byte order).
    pub egress_ipv4: u32,
    /// `EgressCloud::generation` the flow was last allowed under.
    pub generation: u32,
    /// Source port (ICMP: identifier) on the uplink, network byte order.
    pub nat_port: u16,
    pub _pad: u16,
}

/// Value of `EGRESS_IN`, keyed by the uplink's view of a reply `(0, remote:port → egress
/// address:NAT port)` ([`FlowKey`] with cloud 0, which no cloud has): the flow it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressIn {
    pub cloud: u32,
    pub guest_ipv4: u32,
    /// `EgressCloud::generation` the flow was admitted under: a reply of a flow whose cloud
    /// still has it needs no look at `EGRESS_OUT` (written once, when the port is reserved).
    pub generation: u32,
    /// Network byte order.
    pub guest_port: u16,
    pub _pad: u16,
}

impl EgressIn {
    /// True if both name the same flow (the generation is when it was admitted, not who).
    #[inline(always)]
    pub const fn same_flow(&self, other: &EgressIn) -> bool {
        self.cloud == other.cloud
            && self.guest_ipv4 == other.guest_ipv4
            && self.guest_port == other.guest_port
    }
}

/// log2 of the number of slots of each direct-mapped flow cache (`EGRESS_RECENT`,
/// `FLOWS_RECENT`: 65,536 slots of 48 and 64 bytes, 3 and 4 MiB) and reservation version
/// array (`EGRESS_HELD`, `FLOWS_HELD`: 65,536 `u64`, 512 KiB).
pub const CACHE_BITS: u32 = 16;
/// Number of slots of each flow cache.
pub const CACHE_SLOTS: u32 = 1 << CACHE_BITS;

/// The slot of a flow key in a flow cache: the key as two 64-bit words (the addresses; the
/// ports, cloud and protocol, rotated by 32 bits), combined, multiplied, folded and multiplied
/// again, so the top bits depend on every bit of the key: two dependent 64-bit
/// multiplications, not [`flow_hash`]'s chain of four 32-bit mixes, which cost ~10 ns per
/// packet on the established path. Cheaper cuts failed on real key patterns: fields XORed
/// before one 32-bit multiplication cancelled out where they vary together (the address and
/// port of a ring of services: 250 flows in 9 slots), and one multiplication per word without
/// the fold mixed fields in the high bits too little (250 reply keys in 75 slots); this one
/// spreads those rings, sequential source ports and random keys as uniformly as chance (unit
/// test `cache_slots_spread`). A slot only decides where the exact key is looked for, so a
/// guest that steers its flows onto others' slots costs them the flow-table lookup, nothing
/// else.
#[inline(always)]
pub const fn cache_slot(key: &FlowKey) -> u32 {
    let addresses = ((key.src_ipv4 as u64) << 32) | key.dst_ipv4 as u64;
    let rest = ((key.src_port as u64) << 48)
        | ((key.dst_port as u64) << 32)
        | (key.cloud ^ ((key.protocol as u32) << 24)) as u64;
    let mut h = (addresses ^ rest.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // 28, not 32: a fold by half the word left sequential clouds 4% short of chance.
    h ^= h >> 28;
    h = h.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (h >> (64 - CACHE_BITS)) as u32
}

/// Packets a flow sends on a matching cache slot before the flow table is looked at again
/// (which also keeps the flow's entry recently used there).
pub const CACHE_CREDIT: u16 = 32;

/// One slot of `EGRESS_RECENT`, a direct-mapped cache in front of `EGRESS_OUT` and the
/// reservation check in `EGRESS_IN` (slot [`cache_slot`] of the guest's flow key): the flow's
/// translation as its `EGRESS_OUT` entry had it, valid for `credit` more packets and while
/// `EGRESS_HELD[held_slot]`, the version of the NAT port reservations whose reply keys fall
/// in that slot, is still `held_version` (read before `EGRESS_IN` confirmed the flow holds
/// its port; every new reservation increments it). Versions are 64-bit: a 32-bit one could be
/// brought back to a value a victim recorded by 2^32 reservations steered into its slot
/// (hours at the new-flow rates measured here), and the victim would then send up to
/// `credit` packets from a port another flow holds. Written by the programs only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressRecent {
    pub key: FlowKey,
    pub egress_ipv4: u32,
    pub generation: u32,
    pub held_slot: u32,
    pub held_version: u64,
    /// Network byte order.
    pub nat_port: u16,
    pub credit: u16,
    /// The slot's sequence word (see [`SLOT_WRITERS`]).
    pub seq: u32,
}

/// The low half of a cache slot's `seq`: how many writers are filling the slot now; the high
/// half counts completed writes (wrapping). A reader uses a slot only if no writer was active
/// when it began and `seq` is unchanged when it has read what it needs; a writer that finds
/// another writer active, or sees one come and go while it writes, leaves the slot empty (see
/// `dataplane-ebpf/src/flowcache.rs`).
pub const SLOT_WRITERS: u32 = 0xFFFF;

/// Key of `INGRESS`: a published address and port on the uplink.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IngressKey {
    /// Network byte order.
    pub ipv4: u32,
    /// Network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of `INGRESS`: the VM port a published address and port lead to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressTarget {
    pub cloud: u32,
    /// Network byte order.
    pub guest_ipv4: u32,
    /// Unique on this host among live publications, never reused while flows of it may
    /// exist: flows record it and are cut when it no longer matches (unpublishing cuts them).
    pub serial: u32,
    /// Network byte order.
    pub guest_port: u16,
    /// 1: only sources in `INGRESS_ALLOW` under `serial` may connect; 0: anyone.
    pub restricted: u8,
    pub _pad: u8,
}

/// Data of the LPM trie `INGRESS_ALLOW`: a publication's serial (always matched whole, a
/// prefix length is `32 + source bits`) and a source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IngressAllowKey {
    pub serial: u32,
    /// Network byte order.
    pub ipv4: u32,
}

/// Value of `INGRESS_FLOWS`, keyed by the guest's view of a connection to its published port
/// `(cloud, guest:port → remote:port)`: where the guest's replies appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressFlow {
    /// Network byte order.
    pub public_ipv4: u32,
    pub serial: u32,
    /// Network byte order.
    pub public_port: u16,
    pub _pad: u16,
}

/// Key of `EGRESS_REFUSED`: a destination a cloud's guest was refused, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RefusedKey {
    pub cloud: u32,
    /// Network byte order.
    pub ipv4: u32,
    /// Destination port as read from the packet (network byte order); 0 for ICMP.
    pub port: u16,
    pub protocol: u8,
    /// The `DropReason` number (`egress_never`, `egress_denied` or `egress_revoked`).
    pub reason: u8,
}

/// Value of `EGRESS_REFUSED`: how often, and when last (`CLOCK_BOOTTIME` ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusedCount {
    pub count: u64,
    pub last_ns: u64,
}

/// Tries for a free NAT port of a new egress flow before it is refused.
pub const EGRESS_NAT_PORT_TRIES: u32 = 8;

/// NAT ports one cloud's flows may take on an egress address it shares with other clouds (the
/// host's): a window of the host's range, placed by the cloud's number. Without it, one cloud
/// opening as many flows to one destination as the range has ports would leave none for any
/// other cloud's flows to that destination until its entries aged out of the LRU maps. With
/// it, a cloud fills at most its own window, which overlaps another cloud's by
/// window² / range on average (about 230 ports with the default range of 4,536), so the other
/// cloud's 8 tries all land in the full window with odds of about (230 / 1,024)⁸ < 10⁻⁵; two
/// clouds whose windows happen to lie close together share most ports, as all clouds did
/// before. The price: at most 1,024 live flows per cloud to one
/// destination address, port and protocol through the host's address; a cloud that needs
/// more gets an egress address of its own, where its window is the whole range.
pub const EGRESS_NAT_PORTS_PER_CLOUD: u32 = 1024;

/// The NAT port of try `attempt` (0 to `EGRESS_NAT_PORT_TRIES - 1`) for a flow of `cloud` with
/// `hash`, in host byte order: inside the cloud's window of `window` ports (at most `count`;
/// see [`EGRESS_NAT_PORTS_PER_CLOUD`]) of `first .. first + count` (`count` at least 1),
/// wrapping at the range's end.
#[inline(always)]
pub const fn egress_nat_port(
    cloud: u32,
    hash: u32,
    attempt: u32,
    window: u32,
    first: u16,
    count: u16,
) -> u16 {
    let count = if count == 0 { 1 } else { count as u32 };
    let window = if window == 0 || window > count {
        count
    } else {
        window
    };
    let start = mix(cloud) % count;
    let offset = mix(hash ^ attempt.wrapping_mul(0x9e37_79b9)) % window;
    (first as u32 + (start + offset) % count) as u16
}

/// The port guests send DNS to (UDP and TCP) at their gateway address, and the port the DNS
/// server listens on inside atoll's DNS namespace.
pub const DNS_PORT: u16 = 53;

/// The value of the one-entry `DNS_SERVICE` array: where `from_vm` sends DNS queries a guest
/// addresses to its gateway, and how `from_dns` maps replies back.
///
/// A query from the endpoint with counter slot `s` is translated statelessly to
/// `proxy(s) → server_ipv4:53`, where `proxy(s) = proxy_base + s` (as 32-bit integers); the
/// reply to `proxy(s)` is translated back to `gateway → guest`. Proxy addresses and the server
/// address exist only inside atoll's DNS namespace, so they never collide with guests' or the
/// host's addresses. `ifindex` 0 means no DNS service: `from_vm` then drops DNS to the gateway as
/// `gateway_service_unavailable`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsService {
    /// Host-side ifindex of the DNS device (a veth whose peer is in the DNS namespace); 0 = off.
    pub ifindex: u32,
    /// The DNS server's address inside the DNS namespace (network byte order).
    pub server_ipv4: u32,
    /// Proxy address of slot 0 (network byte order).
    pub proxy_base: u32,
    /// Number of proxy addresses: slots at or above it have none.
    pub proxy_count: u32,
    /// MAC of the DNS namespace's interface: destination MAC of translated queries.
    pub server_mac: [u8; 6],
    /// MAC of the host-side DNS device: source MAC of translated queries.
    pub device_mac: [u8; 6],
}

impl DnsService {
    /// No DNS service (the array's initial, zeroed value).
    pub const OFF: DnsService = DnsService {
        ifindex: 0,
        server_ipv4: 0,
        proxy_base: 0,
        proxy_count: 0,
        server_mac: [0; 6],
        device_mac: [0; 6],
    };
}

/// What the `kfree_skb` program needs to know of the running kernel and of the agent, set by
/// the agent in the program's read-only global when it loads the object (never a map: it is
/// part of the loaded program, so a program and its values are replaced together).
///
/// aya 0.14 emits no CO-RE relocations for Rust, so the program cannot name kernel structure
/// fields; the agent reads their byte offsets from the running kernel's BTF
/// (`/sys/kernel/btf/vmlinux`) and the program reads the fields with `bpf_probe_read_kernel`.
/// All zero (never set): the program counts nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KfreeSkbConfig {
    /// `sk_buff.dev` (a pointer).
    pub skb_dev: u32,
    /// `sk_buff.len` (`u32`).
    pub skb_len: u32,
    /// `sk_buff.protocol` (`__be16`).
    pub skb_protocol: u32,
    /// `sk_buff.vlan_all` (`u32`, 0: no VLAN tag in the metadata).
    pub skb_vlan_all: u32,
    /// `net_device.ifindex` (`int`).
    pub dev_ifindex: u32,
    /// `net_device.nd_net.net` (a pointer).
    pub dev_net: u32,
    /// `net.ns.inum` (`unsigned int`): the network namespace's inode number.
    pub net_inum: u32,
    /// The value of `SKB_DROP_REASON_NOT_SPECIFIED` (what a plain `kfree_skb` passes).
    pub reason_not_specified: u32,
    /// The inode number of the agent's network namespace, where its endpoint devices live
    /// (ifindexes are per namespace).
    pub netns_inum: u32,
}

/// Which way a frame crosses the endpoint, from its guest's point of view.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    FromGuest = 0,
    ToGuest = 1,
}

impl Direction {
    pub const COUNT: usize = 2;
    pub const ALL: [Direction; 2] = [Direction::FromGuest, Direction::ToGuest];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::FromGuest => "from_guest",
            Direction::ToGuest => "to_guest",
        }
    }
}

/// What a metered frame was, for billing. Numbers are part of the map layout.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficClass {
    /// Between endpoints of the same cloud.
    IntraCloud = 0,
    /// Through a cross-cloud exposure (consumer or provider side).
    Exposure = 1,
    /// With the host's services: the gateway (ARP, ICMP echo), DNS.
    Host = 2,
    /// With the outside world.
    External = 3,
    /// With endpoints of the same cloud on other hosts, through the overlay.
    CrossHost = 4,
}

impl TrafficClass {
    pub const COUNT: usize = 5;
    pub const ALL: [TrafficClass; 5] = [
        TrafficClass::IntraCloud,
        TrafficClass::Exposure,
        TrafficClass::Host,
        TrafficClass::External,
        TrafficClass::CrossHost,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            TrafficClass::IntraCloud => "intra_cloud",
            TrafficClass::Exposure => "exposure",
            TrafficClass::Host => "host",
            TrafficClass::External => "external",
            TrafficClass::CrossHost => "cross_host",
        }
    }
}

/// Packets and bytes (Ethernet frame length as the host sees it, without FCS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// One endpoint's counters on one CPU: the value of the per-CPU `COUNTERS` array at the
/// endpoint's slot. Userspace sums the CPUs. Counters only ever grow while the slot belongs to
/// an endpoint; the agent zeroes a slot before giving it to a new endpoint.
///
/// Sized by [`TRAFFIC_CLASS_SLOTS`] and [`DROP_SLOTS`], not by the classes and reasons in use,
/// so that a new traffic class or drop reason needs no layout change (the unused words stay 0).
/// The cost is memory: 768 bytes per endpoint per CPU where the used words take 424.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointCounters {
    /// Indexed by `[Direction][TrafficClass]`.
    pub traffic: [[TrafficCounter; TRAFFIC_CLASS_SLOTS]; Direction::COUNT],
    /// Frames from (or, for `to_vm` reasons, to) this endpoint dropped, by reason number
    /// (index 0 unused).
    pub drops: [u64; DROP_SLOTS as usize],
}

impl EndpointCounters {
    pub const ZERO: EndpointCounters = EndpointCounters {
        traffic: [[TrafficCounter {
            packets: 0,
            bytes: 0,
        }; TRAFFIC_CLASS_SLOTS]; Direction::COUNT],
        drops: [0; DROP_SLOTS as usize],
    };
}

/// Why the dataplane dropped a frame. The number of each reason is part of the map layout and is
/// never reused for another meaning: retire a reason by leaving its number unused.
///
/// The table is documented with the verdict for each case in `docs/design.md`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The device the frame arrived on has no `ENDPOINTS` entry (being created or deleted).
    UnknownEndpoint = 1,
    /// Shorter than an Ethernet header.
    TruncatedEthernet = 2,
    /// Source MAC is not the endpoint's MAC.
    SpoofedSourceMac = 3,
    /// 802.1Q / 802.1ad tagged frame: guests get no VLANs.
    VlanTagged = 4,
    /// IPv6 is not routed yet (see docs/design.md).
    Ipv6NotSupported = 5,
    /// Any ethertype other than IPv4, ARP, IPv6 and VLAN tags.
    NonIpEthertype = 6,
    /// ARP shorter than an Ethernet/IPv4 ARP packet, or not Ethernet/IPv4 ARP.
    ArpMalformed = 7,
    /// ARP sender MAC or sender IP is not the endpoint's.
    ArpSpoofed = 8,
    /// ARP request for an address that is neither the gateway nor in the endpoint's cloud.
    ArpUnknownTarget = 9,
    /// ARP that is not a request (replies, gratuitous announcements): nothing to learn.
    ArpNotRequest = 10,
    /// Shorter than the IPv4 header it announces, or than `total_length`.
    Ipv4Truncated = 11,
    /// Version is not 4, IHL < 5, or `total_length` smaller than the header.
    Ipv4Malformed = 12,
    /// IPv4 header carries options (IHL > 5).
    Ipv4Options = 13,
    /// Source IPv4 is not the endpoint's address.
    SpoofedSourceIp = 14,
    /// TTL was 0 or 1; no ICMP time exceeded is generated.
    TtlExceeded = 15,
    /// Destination MAC is broadcast or multicast (IPv4 frames).
    GroupDestinationMac = 16,
    /// Destination IPv4 is limited broadcast or multicast.
    GroupDestinationIp = 17,
    /// Unicast destination MAC is not the gateway's: there is no shared L2.
    NotToGatewayMac = 18,
    /// Destination is not an address of the sender's cloud (this covers every other cloud).
    NoRouteInCloud = 19,
    /// To the gateway address, but not a service the gateway answers.
    GatewayServiceUnavailable = 20,
    /// ICMP echo to the gateway that is truncated, fragmented, or not an echo request.
    GatewayIcmpMalformed = 21,
    /// To the guest (egress): frame not produced by the dataplane (wrong MACs), e.g. from the host stack.
    ToVmForeignFrame = 22,
    /// To the guest (egress): IPv4 destination is not the endpoint's address.
    ToVmWrongDestination = 23,
    /// To the guest (egress): ethertype other than IPv4 or ARP, or truncated.
    ToVmNotAllowed = 24,
    /// UDP or TCP to the gateway that is a fragment, or whose transport header is cut short (by
    /// the frame or by the IPv4 total length): no port to serve it on.
    GatewayL4Malformed = 25,
    /// On the DNS device: anything but an unfragmented, option-free IPv4 UDP/TCP packet from the
    /// DNS server's port 53 to a proxy address (ARP, IPv6, ICMP errors, other addresses).
    DnsForeignFrame = 26,
    /// On the DNS device: a reply to the proxy address of a slot that has no endpoint (deleted
    /// while its query was answered).
    DnsUnknownSlot = 27,
    /// A DNS query or reply whose address or checksum rewrite failed in the kernel (no memory to
    /// make the frame writable).
    DnsRewriteFailed = 28,
    /// To a VIP with a protocol or port its exposure does not serve, or a VIP whose grant is gone.
    ExposureNoService = 29,
    /// A new flow to a VIP whose exposure has no backend, or whose chosen backend is not a live endpoint on this host.
    ExposureNoBackend = 30,
    /// A new flow found no free provider-side source port for its NAT address after a few tries.
    ExposureNatPortsExhausted = 31,
    /// To a NAT source address with no tracked flow (expired, evicted, or never opened): replies only.
    ExposureNoFlow = 32,
    /// A packet of a tracked flow whose grant was revoked or replaced: the flow is cut and forgotten.
    ExposureRevoked = 33,
    /// To a VIP or NAT source address: a fragment, a transport header cut short, or neither UDP nor TCP.
    ExposureL4Malformed = 34,
    /// ICMP to a VIP or a NAT source address: deliberately not translated (see docs/design.md).
    ExposureIcmp = 35,
    /// An exposure translation whose checksum or port rewrite failed in the kernel.
    ExposureRewriteFailed = 36,
    /// Leaving the cloud to an address of the always-denied set (the host's addresses and
    /// networks, link-local and metadata, loopback, the operator's list), whatever the policy.
    EgressNever = 37,
    /// Leaving the cloud where its egress policy refuses: mode `deny`, a deny rule, or not on
    /// the allowlist (an address learnt from an allowed name counts until its TTL and grace
    /// period end).
    EgressDenied = 38,
    /// Leaving the cloud as anything but unfragmented TCP, UDP or ICMP echo request with its
    /// header complete.
    EgressUnsupported = 39,
    /// A new egress flow found no free NAT port on its egress address after a few tries.
    EgressNatPortsExhausted = 40,
    /// A packet of a tracked egress flow that its cloud's changed policy no longer allows:
    /// the flow is cut and forgotten.
    EgressRevoked = 41,
    /// An egress or reply translation whose checksum or address rewrite failed in the kernel.
    EgressRewriteFailed = 42,
    /// On the uplink: a reply of a tracked egress flow whose guest has no endpoint on this
    /// host any more.
    UplinkNoEndpoint = 43,
    /// Leaving the cloud faster than its egress rate limit on this host (token bucket).
    EgressRateLimited = 44,
    /// Leaving the cloud after its egress byte budget for the period on this host is spent.
    EgressBudgetSpent = 45,
    /// On the uplink: to a published port from a source its `allow_from` does not list.
    IngressNotAllowed = 46,
    /// A packet of a connection to a published port that was unpublished (or published
    /// again): the flow is cut and forgotten.
    IngressRevoked = 47,
    /// On the uplink: TCP or UDP to a NAT port of the host's egress address that no flow holds
    /// (a reply after its flow was evicted or cut, or a probe), dropped rather than handed to
    /// the host's stack, which would answer with a reset or a port unreachable.
    UplinkNoFlow = 48,
    /// A new egress flow beyond its cloud's new-flow rate on this host
    /// (`egress.max_new_flows_per_sec`): one cloud cannot churn the flow tables all clouds
    /// share.
    EgressFlowRateLimited = 49,
    /// A new exposure flow (or one opened again after an eviction) beyond its consumer
    /// cloud's new-flow rate on this host (`dataplane.max_new_exposure_flows_per_sec`): one
    /// cloud cannot churn the exposure flow tables all clouds share.
    ExposureFlowRateLimited = 50,
    /// To an endpoint of the cloud on another host while this host has no overlay.
    OverlayOff = 51,
    /// To an endpoint of the cloud on another host, but the cloud has no network id here.
    OverlayNoVni = 52,
    /// The tunnel key could not be set (sending) or the frame carried none (receiving: the
    /// overlay device's own traffic without a tunnel, such as its PMTU errors).
    OverlayTunnelKey = 53,
    /// Received on the overlay with a network id no cloud of this host has.
    OverlayUnknownVni = 54,
    /// Received on the overlay from an outer source that is not a known host.
    OverlayUnknownPeer = 55,
    /// Received on the overlay with an inner source address the control plane did not place on
    /// the sending host (a host speaking for another host's VMs, or a spoofed address).
    OverlaySpoofedSource = 56,
    /// Received on the overlay for an address that is not an endpoint on this host.
    OverlayNotLocal = 57,
    /// Received on the overlay: not an Ethernet frame carrying a well-formed IPv4 packet
    /// without options.
    OverlayMalformed = 58,
    /// To an endpoint on another host: the frame could not be encapsulated in place (no room
    /// for the outer headers, or they could not be written).
    OverlayEncapFailed = 59,
    /// Received on the underlay for this host: the outer headers could not be removed.
    OverlayDecapFailed = 60,
}

impl DropReason {
    /// Every reason, in numeric order.
    pub const ALL: [DropReason; 60] = [
        DropReason::UnknownEndpoint,
        DropReason::TruncatedEthernet,
        DropReason::SpoofedSourceMac,
        DropReason::VlanTagged,
        DropReason::Ipv6NotSupported,
        DropReason::NonIpEthertype,
        DropReason::ArpMalformed,
        DropReason::ArpSpoofed,
        DropReason::ArpUnknownTarget,
        DropReason::ArpNotRequest,
        DropReason::Ipv4Truncated,
        DropReason::Ipv4Malformed,
        DropReason::Ipv4Options,
        DropReason::SpoofedSourceIp,
        DropReason::TtlExceeded,
        DropReason::GroupDestinationMac,
        DropReason::GroupDestinationIp,
        DropReason::NotToGatewayMac,
        DropReason::NoRouteInCloud,
        DropReason::GatewayServiceUnavailable,
        DropReason::GatewayIcmpMalformed,
        DropReason::ToVmForeignFrame,
        DropReason::ToVmWrongDestination,
        DropReason::ToVmNotAllowed,
        DropReason::GatewayL4Malformed,
        DropReason::DnsForeignFrame,
        DropReason::DnsUnknownSlot,
        DropReason::DnsRewriteFailed,
        DropReason::ExposureNoService,
        DropReason::ExposureNoBackend,
        DropReason::ExposureNatPortsExhausted,
        DropReason::ExposureNoFlow,
        DropReason::ExposureRevoked,
        DropReason::ExposureL4Malformed,
        DropReason::ExposureIcmp,
        DropReason::ExposureRewriteFailed,
        DropReason::EgressNever,
        DropReason::EgressDenied,
        DropReason::EgressUnsupported,
        DropReason::EgressNatPortsExhausted,
        DropReason::EgressRevoked,
        DropReason::EgressRewriteFailed,
        DropReason::UplinkNoEndpoint,
        DropReason::EgressRateLimited,
        DropReason::EgressBudgetSpent,
        DropReason::IngressNotAllowed,
        DropReason::IngressRevoked,
        DropReason::UplinkNoFlow,
        DropReason::EgressFlowRateLimited,
        DropReason::ExposureFlowRateLimited,
        DropReason::OverlayOff,
        DropReason::OverlayNoVni,
        DropReason::OverlayTunnelKey,
        DropReason::OverlayUnknownVni,
        DropReason::OverlayUnknownPeer,
        DropReason::OverlaySpoofedSource,
        DropReason::OverlayNotLocal,
        DropReason::OverlayMalformed,
        DropReason::OverlayEncapFailed,
        DropReason::OverlayDecapFailed,
    ];

    /// Size of the drop counter array: one slot per number, slot 0 unused.
    pub const SLOTS: u32 = 61;

    /// Stable snake_case name, used in metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::TruncatedEthernet => "truncated_ethernet",
            DropReason::SpoofedSourceMac => "spoofed_source_mac",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::Ipv6NotSupported => "ipv6_not_supported",
            DropReason::NonIpEthertype => "non_ip_ethertype",
            DropReason::ArpMalformed => "arp_malformed",
            DropReason::ArpSpoofed => "arp_spoofed",
            DropReason::ArpUnknownTarget => "arp_unknown_target",
            DropReason::ArpNotRequest => "arp_not_request",
            DropReason::Ipv4Truncated => "ipv4_truncated",
            DropReason::Ipv4Malformed => "ipv4_malformed",
            DropReason::Ipv4Options => "ipv4_options",
            DropReason::SpoofedSourceIp => "spoofed_source_ip",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::GroupDestinationMac => "group_destination_mac",
            DropReason::GroupDestinationIp => "group_destination_ip",
            DropReason::NotToGatewayMac => "not_to_gateway_mac",
            DropReason::NoRouteInCloud => "no_route_in_cloud",
            DropReason::GatewayServiceUnavailable => "gateway_service_unavailable",
            DropReason::GatewayIcmpMalformed => "gateway_icmp_malformed",
            DropReason::ToVmForeignFrame => "to_vm_foreign_frame",
            DropReason::ToVmWrongDestination => "to_vm_wrong_destination",
            DropReason::ToVmNotAllowed => "to_vm_not_allowed",
            DropReason::GatewayL4Malformed => "gateway_l4_malformed",
            DropReason::DnsForeignFrame => "dns_foreign_frame",
            DropReason::DnsUnknownSlot => "dns_unknown_slot",
            DropReason::DnsRewriteFailed => "dns_rewrite_failed",
            DropReason::ExposureNoService => "exposure_no_service",
            DropReason::ExposureNoBackend => "exposure_no_backend",
            DropReason::ExposureNatPortsExhausted => "exposure_nat_ports_exhausted",
            DropReason::ExposureNoFlow => "exposure_no_flow",
            DropReason::ExposureRevoked => "exposure_revoked",
            DropReason::ExposureL4Malformed => "exposure_l4_malformed",
            DropReason::ExposureIcmp => "exposure_icmp",
            DropReason::ExposureRewriteFailed => "exposure_rewrite_failed",
            DropReason::EgressNever => "egress_never",
            DropReason::EgressDenied => "egress_denied",
            DropReason::EgressUnsupported => "egress_unsupported",
            DropReason::EgressNatPortsExhausted => "egress_nat_ports_exhausted",
            DropReason::EgressRevoked => "egress_revoked",
            DropReason::EgressRewriteFailed => "egress_rewrite_failed",
            DropReason::UplinkNoEndpoint => "uplink_no_endpoint",
            DropReason::EgressRateLimited => "egress_rate_limited",
            DropReason::EgressBudgetSpent => "egress_budget_spent",
            DropReason::IngressNotAllowed => "ingress_not_allowed",
            DropReason::IngressRevoked => "ingress_revoked",
            DropReason::UplinkNoFlow => "uplink_no_flow",
            DropReason::EgressFlowRateLimited => "egress_flow_rate_limited",
            DropReason::ExposureFlowRateLimited => "exposure_flow_rate_limited",
            DropReason::OverlayOff => "overlay_off",
            DropReason::OverlayNoVni => "overlay_no_vni",
            DropReason::OverlayTunnelKey => "overlay_tunnel_key",
            DropReason::OverlayUnknownVni => "overlay_unknown_vni",
            DropReason::OverlayUnknownPeer => "overlay_unknown_peer",
            DropReason::OverlaySpoofedSource => "overlay_spoofed_source",
            DropReason::OverlayNotLocal => "overlay_not_local",
            DropReason::OverlayMalformed => "overlay_malformed",
            DropReason::OverlayEncapFailed => "overlay_encap_failed",
            DropReason::OverlayDecapFailed => "overlay_decap_failed",
        }
    }

    /// The reason with number `n`, if any.
    pub const fn from_u32(n: u32) -> Option<DropReason> {
        if n == 0 || n as usize > Self::ALL.len() {
            return None;
        }
        Some(Self::ALL[n as usize - 1])
    }
}

/// A well-mixed 32-bit hash (the "lowbias32" finaliser). Shared so that tests predict the
/// programs' choices (backends, NAT ports) with the very code the programs run.
#[inline(always)]
pub const fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// The hash of a flow: picks its backend (`hash % backends`) and its alternative NAT ports
/// ([`nat_port_candidate`]). Fields as the program reads them (addresses and ports in network
/// byte order in memory).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    let ports = ((key.src_port as u32) << 16) | key.dst_port as u32;
    mix(key.cloud ^ mix(key.src_ipv4 ^ mix(key.dst_ipv4 ^ mix(ports ^ key.protocol as u32))))
}

/// Tries for a free provider-side source (NAT) port before a new flow is refused: the
/// consumer's own port first, then alternatives.
pub const NAT_PORT_TRIES: u32 = 4;
/// Alternative NAT ports are chosen from `[NAT_PORT_BASE, 65535]`.
pub const NAT_PORT_BASE: u32 = 1024;

/// The alternative NAT port of try `attempt` (1 to `NAT_PORT_TRIES - 1`) for a flow of `hash`,
/// in host byte order.
#[inline(always)]
pub const fn nat_port_candidate(hash: u32, attempt: u32) -> u16 {
    (NAT_PORT_BASE + mix(hash ^ attempt) % (65536 - NAT_PORT_BASE)) as u16
}

/// Encodes an IPv4 address for a map (see module docs).
pub const fn ipv4_to_map(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Decodes an IPv4 address read from a map.
pub const fn ipv4_from_map(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}

// Padding-free layouts: a size mismatch here means the compiler inserted padding.
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 4 + 4 + 4 + 6 + 6 + 4);
const _: () = assert!(core::mem::size_of::<EndpointSlot>() == 4 + 28);
const _: () = assert!(ENDPOINT_CACHE_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<RouteKey>() == 4 + 4);
const _: () = assert!(core::mem::size_of::<NextHop>() == 4 + 4 + 6 + 2);
const _: () = assert!(core::mem::size_of::<DnsService>() == 4 * 4 + 6 + 6);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
const _: () = assert!(core::mem::size_of::<VipService>() == 4 * 3 + 2 + 1 + 1 + 8 * MAX_BACKENDS);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 4 * 3 + 2 + 2 + 1 + 3);
const _: () = assert!(core::mem::size_of::<FlowOut>() == 4 + 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<FlowIn>() == 4 * 4 + 2 + 2);
const _: () = assert!(MAX_BACKENDS <= u8::MAX as usize);
const _: () = assert!(core::mem::size_of::<TrafficCounter>() == 16);
const _: () = assert!(
    core::mem::size_of::<EndpointCounters>()
        == 16 * TRAFFIC_CLASS_SLOTS * Direction::COUNT + 8 * DROP_SLOTS as usize
);
// The room the layout keeps: a class or reason beyond it needs a layout version.
const _: () = assert!(TrafficClass::COUNT <= TRAFFIC_CLASS_SLOTS);
const _: () = assert!(DropReason::SLOTS <= DROP_SLOTS);
const _: () = assert!(DropReason::ALL.len() as u32 + 1 == DropReason::SLOTS);
const _: () = assert!(core::mem::size_of::<KfreeSkbConfig>() == 4 * 9);
const _: () = assert!(core::mem::size_of::<EgressHost>() == 4 + 4 + 2 + 2 + 6 + 2);
const _: () = assert!(core::mem::size_of::<EgressCloud>() == 4 * 6 + 8 * 4);
const _: () = assert!(core::mem::size_of::<EgressMeter>() == 8 * 3);
const _: () = assert!(core::mem::size_of::<EgressRuleKey>() == 4 + 4);
const _: () = assert!(core::mem::size_of::<PortRule>() == 8 + 2 + 2 + 1 + 3);
const _: () = assert!(core::mem::size_of::<EgressRules>() == 16 * RULES_PER_PREFIX + 4 + 4);
const _: () = assert!(core::mem::size_of::<EgressOut>() == 4 + 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<EgressIn>() == 4 + 4 + 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<EgressRecent>() == 20 + 4 * 3 + 8 + 2 + 2 + 4);
const _: () = assert!(core::mem::size_of::<FlowRecent>() == 64);
const _: () = assert!(CACHE_BITS <= 16);
const _: () = assert!(core::mem::size_of::<RefusedKey>() == 4 + 4 + 2 + 1 + 1);
const _: () = assert!(core::mem::size_of::<IngressKey>() == 4 + 2 + 1 + 1);
const _: () = assert!(core::mem::size_of::<IngressTarget>() == 4 * 3 + 2 + 1 + 1);
const _: () = assert!(core::mem::size_of::<IngressAllowKey>() == 4 + 4);
const _: () = assert!(core::mem::size_of::<IngressFlow>() == 4 + 4 + 2 + 2);
const _: () = assert!(core::mem::size_of::<RefusedCount>() == 8 + 8);
const _: () = assert!(core::mem::size_of::<OverlayHost>() == 4 + 4 + 4 + 2 + 2);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have no
    // padding (asserted above), so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RouteKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowOut {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowIn {}
    // SAFETY: as above: u32s only, no padding (asserted).
    unsafe impl aya::Pod for super::KfreeSkbConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressHost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressCloud {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressMeter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressRuleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressRules {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressOut {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressIn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressRecent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowRecent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RefusedKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressAllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IngressFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RefusedCount {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OverlayHost {}
    // SAFETY: as above: u64 counters in arrays, no padding (asserted).
    unsafe impl aya::Pod for super::TrafficCounter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EndpointCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cloud: u32, src: [u8; 4], dst: [u8; 4], ports: (u16, u16), protocol: u8) -> FlowKey {
        FlowKey {
            cloud,
            src_ipv4: ipv4_to_map(src),
            dst_ipv4: ipv4_to_map(dst),
            src_port: ports.0.to_be(),
            dst_port: ports.1.to_be(),
            protocol,
            _pad: [0; 3],
        }
    }

    /// Distinct slots of `keys`, and what uniform chance would give (expected distinct values
    /// of n draws from `CACHE_SLOTS`).
    fn spread(keys: &[FlowKey]) -> (usize, f64) {
        let slots: std::collections::HashSet<u32> = keys.iter().map(cache_slot).collect();
        let (n, m) = (keys.len() as f64, f64::from(CACHE_SLOTS));
        (slots.len(), m * (1.0 - (1.0 - 1.0 / m).powf(n)))
    }

    #[test]
    fn cache_slots_spread() {
        let ring = |i: u32| [10, 1, 0, (i % 250) as u8];
        let patterns: Vec<(&str, Vec<FlowKey>)> = vec![
            // A ring of services: consumer flows, and the replies of their backends.
            (
                "ring out",
                (0..250)
                    .map(|i| key(1, [10, 0, 0, 2], ring(i), (1999, 1000 + i as u16), 17))
                    .collect(),
            ),
            (
                "ring replies",
                (1..251)
                    .map(|i| {
                        key(
                            2,
                            ring(i),
                            [10, 0, 0, 2],
                            (1000 + (i % 250) as u16, 1999),
                            17,
                        )
                    })
                    .collect(),
            ),
            // One guest's connections from sequential source ports to one server.
            (
                "source ports",
                (0..4000)
                    .map(|i| key(1, [10, 0, 0, 2], [1, 2, 3, 4], (30000 + i as u16, 443), 6))
                    .collect(),
            ),
            // Replies to sequential NAT ports, and the same flow in many clouds.
            (
                "NAT ports",
                (0..4000)
                    .map(|i| key(0, [1, 2, 3, 4], [198, 18, 0, 2], (443, 61000 + i as u16), 6))
                    .collect(),
            ),
            (
                "clouds",
                (1..4001)
                    .map(|c| key(c, [10, 0, 0, 2], [1, 2, 3, 4], (40000, 443), 6))
                    .collect(),
            ),
            (
                "guests",
                (0..4000u32)
                    .map(|i| {
                        let [_, _, b, a] = i.to_be_bytes();
                        key(1, [10, 0, b, a], [1, 2, 3, 4], (40000, 443), 6)
                    })
                    .collect(),
            ),
        ];
        for (name, keys) in patterns {
            let (got, chance) = spread(&keys);
            assert!(
                got as f64 >= chance * 0.97,
                "{name}: {} keys in {got} slots, chance gives {chance:.0}",
                keys.len()
            );
        }
    }

    #[test]
    fn a_clouds_nat_ports_stay_in_its_window_of_the_range() {
        let (first, count) = (61_000u16, 4_536u16);
        // Offsets from each cloud's window start, over many flows and every try.
        for cloud in [1u32, 2, 77, 1 << 20] {
            let start = mix(cloud) % u32::from(count);
            let mut seen = std::collections::HashSet::new();
            for hash in 0..20_000u32 {
                for attempt in 0..EGRESS_NAT_PORT_TRIES {
                    let port = egress_nat_port(
                        cloud,
                        mix(hash),
                        attempt,
                        EGRESS_NAT_PORTS_PER_CLOUD,
                        first,
                        count,
                    );
                    assert!(
                        (u32::from(first)..u32::from(first) + u32::from(count))
                            .contains(&u32::from(port)),
                        "{port}"
                    );
                    let offset =
                        (u32::from(port - first) + u32::from(count) - start) % u32::from(count);
                    assert!(
                        offset < EGRESS_NAT_PORTS_PER_CLOUD,
                        "cloud {cloud}: {offset}"
                    );
                    seen.insert(port);
                }
            }
            assert_eq!(
                seen.len(),
                EGRESS_NAT_PORTS_PER_CLOUD as usize,
                "the whole window"
            );
        }
        // Alone on its own address (window = range), or a range smaller than a window: the
        // whole range.
        for (window, count) in [(4_536, 4_536u16), (EGRESS_NAT_PORTS_PER_CLOUD, 100)] {
            let ports: std::collections::HashSet<u16> = (0..50_000u32)
                .map(|h| egress_nat_port(3, mix(h), 0, window, first, count))
                .collect();
            assert_eq!(ports.len(), count as usize);
        }
    }

    #[test]
    fn reasons_are_numbered_densely_and_round_trip() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32 + 1, "{r:?} out of order");
            assert_eq!(DropReason::from_u32(*r as u32), Some(*r));
        }
        assert_eq!(DropReason::from_u32(0), None);
        assert_eq!(DropReason::from_u32(DropReason::SLOTS), None);
    }

    #[test]
    fn reason_names_are_unique() {
        for a in DropReason::ALL {
            for b in DropReason::ALL {
                if a != b {
                    assert_ne!(a.name(), b.name());
                }
            }
        }
    }
}
