//! Egress: a guest's packets to the world, checked against its cloud's policy and
//! source-NATed to an egress address on the host's uplink; replies translated back.
//!
//! **Out** ([`from_guest`], from `from_vm` when the route lookup misses): a destination inside
//! the cloud's range stays `no_route_in_cloud` (an address with no endpoint here); a cloud
//! without an `EGRESS_CLOUDS` entry, or a host whose `EGRESS_HOST` has no uplink, reaches
//! nothing outside either. Otherwise a tracked flow (`EGRESS_OUT`) is translated at once; a new
//! one is decided by [`decide`], given a NAT port, recorded in both flow tables and sent.
//!
//! **Back** ([`from_uplink`], TC ingress of the uplink): a TCP/UDP packet or ICMP echo reply
//! whose `(remote, egress address, ports)` is in `EGRESS_IN`, or an ICMP error
//! (unreachable, fragmentation needed, time exceeded) whose embedded header is, is translated
//! to its guest and redirected to the guest's device. TCP or UDP to a NAT port of the host's
//! egress address that no flow holds (a late reply of an evicted or cut flow, or a probe) is
//! dropped (`uplink_no_flow`): handed to the host's stack it would be answered with a reset
//! or a port unreachable, which would end the remote side of a connection whose guest may
//! still reopen it on the same port after an eviction, and tell a scanner which ports are in
//! use. Everything else passes untouched: the uplink carries the host's own traffic, and no
//! NAT port is a port of the host's (the agent reserves the range, see
//! `agent/src/egress.rs`). A cloud's own egress address is not the host's (the operator
//! routes it to the host; the host's stack drops what it does not own, silently).
//!
//! **Public ingress** uses the same translation and the same way out: a TCP or UDP packet
//! on the uplink that is no flow's reply and is addressed to a published port is DNATed to
//! its VM ([`to_published`]), and the VM's replies are SNATed back before its cloud's policy
//! is consulted (see `ingress`, which owns the maps).
//!
//! Decisions:
//! - **Policy order, first match wins** ([`decide`]): the always-denied set (`EGRESS_NEVER`,
//!   one LPM trie for all clouds), the mode (`deny` refuses here), the cloud's deny rules, and
//!   in `allowlist` mode its allow rules (CIDR rules and addresses learnt from DNS answers of
//!   allowed names). Rules are LPM tries keyed `(cloud, address)`: one lookup per trie costs
//!   the same for one rule or a hundred thousand. The agent merges into each prefix the port
//!   rules of the shorter prefixes covering it, so the longest match alone decides.
//! - **Learnt addresses expire in the kernel**: a rule carries `expires_ns`, compared with
//!   `bpf_ktime_get_boot_ns`, so a new flow to an address whose answer has expired is denied
//!   without waiting for the agent to delete it. An established flow is not cut when its
//!   name's TTL ends (only a policy change cuts flows): resolvers cache, and a download must
//!   not break at a TTL.
//! - **A changed policy cuts live flows** without walking the flow tables: the agent gives
//!   the cloud a new `generation` with every change; a flow records the generation it was
//!   allowed under, and a packet (either direction) of a flow of another generation is decided
//!   again: allowed, the flow takes the new generation; refused, both entries are deleted and
//!   the packet dropped (`egress_revoked`). The unchanged case costs one comparison.
//! - **Connection tracking mirrors the exposure NAT** (see `exposure`): two LRU maps, the
//!   reply half (`EGRESS_IN`) is the NAT port's reservation taken with `BPF_NOEXIST`, and every
//!   outgoing packet checks that its flow still holds it. `EGRESS_IN` keys carry cloud 0 (no
//!   cloud's number), `EGRESS_OUT` keys the guest's cloud, so clouds with the same addresses
//!   never share an entry. NAT ports come from the host's reserved range
//!   (`EgressHost::nat_port_first`, `nat_port_count`), hashed per flow with a few tries; on
//!   the host's address, which clouds share, inside the cloud's window of the range, so no
//!   cloud can hold every port to a destination (`EGRESS_NAT_PORTS_PER_CLOUD`).
//! - **Established flows are cached.** An established packet looked its flow up in
//!   `EGRESS_OUT` and its reservation up in `EGRESS_IN`; the two LRU lookups were about 40%
//!   of the path (measured: skipping the reservation's alone took it from ~97 to ~67 ns).
//!   `EGRESS_RECENT`, a direct-mapped array (slot [`cache_slot`] of the flow key), holds the
//!   flow's translation, valid for [`CACHE_CREDIT`] packets and only on an exact match of
//!   every key field (no hash decides: a guest steering its flows onto others' slots only
//!   sends them to the tables). That the flow still holds its NAT port is proved by a
//!   version: `EGRESS_HELD[cache_slot(reply key)]` is incremented by every new reservation of
//!   a port whose reply key falls there, and the slot records the version read *before*
//!   `EGRESS_IN` confirmed the hold. A flow that takes a port (after the previous holder's
//!   entry was evicted) increments it after its insert, so the previous holder's next packet
//!   sees another version and looks `EGRESS_IN` up, as it did on every packet before: "A NAT
//!   port has one holder" (see `exposure`) holds at once. Unrelated reservations that share
//!   the slot only send flows to the tables. The increment is not atomic: two CPUs may both
//!   store the same value, which still differs from every version read before either. A
//!   flow's own reservation moves the version it would record, so a flow is cached by its
//!   second packet. What the credit relaxes: an `EGRESS_IN` entry evicted while nobody takes
//!   its port, or an `EGRESS_OUT` entry evicted, is noticed (and the flow opened again, on the
//!   same port) within 32 packets instead of at once, and outgoing packets refresh the
//!   tables' LRU recency every 32nd packet (replies still every time). The policy is never
//!   cached: the generation is compared with the cloud's on every packet, and a renewed or cut
//!   flow's slot is emptied. Measured cost: two more random memory accesses for a flow's
//!   first packet.
//! - **Slots are never read torn**: slots are shared by all CPUs and many words long, so each
//!   carries a sequence word; readers use a slot only if no write overlapped their reads, and
//!   overlapping writers leave it empty (see `flowcache`). Before, a packet could match a
//!   slot's key while another CPU rewrote the rest, and leave with another flow's NAT address
//!   and port (`a_cache_slot_written_by_two_cpus_at_once_is_never_read_torn`, in
//!   `egress_verdicts` and `exposure_verdicts`, counts such packets: dozens to hundreds in
//!   150,000 per CPU without the reader's check, none with it).
//! - **Replies skip `EGRESS_OUT`.** `EGRESS_IN` records the generation its flow was admitted
//!   under; a reply of a flow whose cloud still has that generation is delivered after one
//!   flow lookup. Other replies look at `EGRESS_OUT` as before (decide again, cut or renew).
//!   The `EGRESS_IN` entry is never rewritten in place (LRU elements can be reused by another
//!   key while a program holds a pointer): a flow that outlived a policy change keeps the
//!   slower reply path until it is opened again.
//! - **Out through the uplink only**, by `bpf_redirect_neigh` to the uplink without next-hop
//!   parameters: the kernel looks the route up with the uplink as output device and the next
//!   hop's neighbour entry (resolving it if needed), and writes the MACs. Rejected:
//!   `bpf_fib_lookup` then `bpf_redirect`, which saves the neighbour output but refuses to
//!   work unless forwarding is enabled on the device it is given (`IN_DEV_FORWARD`, also
//!   with `BPF_FIB_LOOKUP_OUTPUT`): forwarding on the uplink would make the host route
//!   whatever arrives there for addresses not its own (a cloud's pool address included).
//!   No MTU is checked here: GSO frames are segmented by the uplink.
//! - **ICMP**: echo requests are translated by identifier (the identifier is the "port");
//!   errors for tracked flows are translated by their embedded header (its source address and
//!   port, its header checksum, and the outer ICMP checksum); the embedded transport checksum
//!   is left as is (the quote is truncated; no receiver checks it). Any other ICMP from a guest
//!   is dropped (`egress_unsupported`); from the uplink it passes to the host.
//! - **Fragments** are refused leaving (`egress_unsupported`) and pass untouched arriving
//!   (TC runs before reassembly): a guest must not rely on fragmented replies.
//! - The TTL is decremented both ways, as on any routed hop; checksums as in
//!   `packet::rewrite_with` (one helper call for the addresses, the ports folded in by the
//!   program), so frames with partial checksums stay valid. Metering: `external` on the guest's
//!   endpoint, from guest going out and to guest coming back.

use atoll_dataplane_common::{
    cache_slot, egress_nat_port, flow_hash, Direction, DropReason, EgressCloud, EgressHost,
    EgressIn, EgressMeter, EgressOut, EgressRecent, EgressRuleKey, EgressRules, EndpointInfo,
    FlowKey, IngressFlow, NextHop, RefusedCount, RefusedKey, TrafficClass, CACHE_CREDIT,
    CACHE_SLOTS, EGRESS_MODE_ALLOW, EGRESS_MODE_ALLOWLIST, EGRESS_NAT_PORTS_PER_CLOUD,
    EGRESS_NAT_PORT_TRIES, NEXTHOP_ENDPOINT, NO_BUDGET, RULES_PER_PREFIX,
};
use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap},
    programs::TcContext,
};

use crate::{
    exposure::flow_key,
    flowcache::{
        held_version, read_begin, read_valid, reserved, same_key, still_held, write_key, write_slot,
    },
    ingress, metering, pace,
    packet::{
        self, EthHdr, Ipv4Hdr, Packet, Ports, Rewrite, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_CHECK_OFFSET, L4_OFFSET,
    },
    route, Verdict,
};

/// This host's uplink, egress address and NAT ports (one entry; zero = egress off).
#[map]
pub static EGRESS_HOST: Array<EgressHost> = Array::with_max_entries(1, 0);

/// Cloud → its range, mode, egress address and policy generation. Sized by the agent
/// (`dataplane.max_endpoints`: a host runs at most that many clouds).
#[map]
pub static EGRESS_CLOUDS: HashMap<u32, EgressCloud> = HashMap::with_max_entries(65536, 0);

/// The always-denied set, for every cloud: address prefix → 1.
#[map]
pub static EGRESS_NEVER: LpmTrie<u32, u8> = LpmTrie::with_max_entries(4096, 0);

/// `(cloud, prefix)` → the cloud's allow rules for it (CIDR rules and learnt addresses).
#[map]
pub static EGRESS_ALLOW: LpmTrie<EgressRuleKey, EgressRules> =
    LpmTrie::with_max_entries(1 << 20, 0);

/// `(cloud, prefix)` → the cloud's deny rules for it.
#[map]
pub static EGRESS_DENY: LpmTrie<EgressRuleKey, EgressRules> = LpmTrie::with_max_entries(1 << 20, 0);

/// Guest's view of a flow → its translation. Sized by the agent (`dataplane.max_flows`).
#[map]
pub static EGRESS_OUT: LruHashMap<FlowKey, EgressOut> = LruHashMap::with_max_entries(131072, 0);

/// Uplink's view of a reply → the flow it belongs to. Same size as `EGRESS_OUT`.
#[map]
pub static EGRESS_IN: LruHashMap<FlowKey, EgressIn> = LruHashMap::with_max_entries(131072, 0);

/// Translations of flows recently found in `EGRESS_OUT`, direct-mapped by flow key (see
/// "Established flows are cached" in the module docs).
#[map]
pub static EGRESS_RECENT: Array<EgressRecent> = Array::with_max_entries(CACHE_SLOTS, 0);

/// Versions of the NAT port reservations, by [`cache_slot`] of their reply keys: incremented
/// by every new reservation (see "Established flows are cached" in the module docs).
#[map]
pub static EGRESS_HELD: Array<u64> = Array::with_max_entries(CACHE_SLOTS, 0);

/// Cloud → the state of its rate limit and budget (programs only; the agent removes a
/// cloud's entry with its egress). Sized by the agent (`dataplane.max_endpoints`).
#[map]
pub static EGRESS_METERS: HashMap<u32, EgressMeter> = HashMap::with_max_entries(65536, 0);

/// Cloud → the virtual clock of its new-flow rate (`CLOCK_BOOTTIME` ns: when the flows
/// opened so far would have been opened at the rate). Programs only; the agent removes a
/// cloud's entry with its egress. Sized by the agent (`dataplane.max_endpoints`).
#[map]
pub static EGRESS_FLOW_CLOCKS: HashMap<u32, u64> = HashMap::with_max_entries(65536, 0);

/// Destinations refused by the policy → how often and when last, for the API's denied list
/// (the agent reads it every few seconds). LRU: a guest hammering many destinations evicts
/// the oldest, never blocks a new one.
#[map]
pub static EGRESS_REFUSED: LruHashMap<RefusedKey, RefusedCount> =
    LruHashMap::with_max_entries(16384, 0);

const BPF_NOEXIST: u64 = 1;
const BPF_ANY: u64 = 0;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// Ethernet + IPv4 + ICMP header + the embedded IPv4 header + 8 bytes of its payload.
pub const ICMP_ERROR_BYTES: u32 = 14 + 20 + 8 + 20 + 8;
/// Where the embedded IPv4 header of an ICMP error starts.
const INNER_IP_OFFSET: usize = L4_OFFSET + 8;
const INNER_L4_OFFSET: usize = INNER_IP_OFFSET + Ipv4Hdr::LEN;
const ICMP_CHECK_OFFSET: usize = L4_OFFSET + 2;

/// The transport part of a packet: protocol, ports as read natively (ICMP echo: identifier as
/// source port, destination 0) and where its checksum and ports are.
struct L4 {
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    /// The checksum to update for a port change (TCP/UDP: with the pseudo header; ICMP: the
    /// ICMP checksum, without).
    check_offset: usize,
}

#[inline(always)]
fn host() -> Option<&'static EgressHost> {
    EGRESS_HOST.get(0).filter(|h| h.uplink_ifindex != 0)
}

/// From `from_vm` when the route lookup missed. The caller checked the sender's identity, the
/// IPv4 header (no options), `total_len` and the TTL.
#[inline(always)]
pub fn from_guest(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    total_len: u16,
    ep: &EndpointInfo,
) -> Verdict {
    let (Some(host), Some(cloud)) = (host(), cloud(ep.cloud)) else {
        return Verdict::Drop(DropReason::NoRouteInCloud);
    };
    // SAFETY: `ip` was bounds-checked by the caller.
    let daddr = unsafe { (*ip).daddr() };
    if daddr & cloud.range_mask == cloud.range_ipv4 {
        return Verdict::Drop(DropReason::NoRouteInCloud);
    }
    let l4 = match guest_l4(pkt, ip, total_len) {
        Ok(l4) => l4,
        Err(reason) => return Verdict::Drop(reason),
    };
    let key = flow_key(
        ep.cloud,
        ep.ipv4,
        daddr,
        l4.src_port,
        l4.dst_port,
        l4.protocol,
    );
    let recent = recent_flow(&key);
    let out = match recent {
        Some((flow, _)) => Some(flow),
        // SAFETY: the value is copied out at once.
        None => unsafe { EGRESS_OUT.get(key) }.copied(),
    };
    if out.is_none() && l4.protocol != IPPROTO_ICMP {
        // A reply to a connection to a published port is not egress (see `ingress`).
        match ingress::reply(&key) {
            Ok(Some(f)) => {
                if let Err(reason) = within_limits(ep.cloud, cloud, pkt.len) {
                    return Verdict::Drop(reason);
                }
                let public = EgressOut {
                    egress_ipv4: f.public_ipv4,
                    generation: 0,
                    nat_port: f.public_port,
                    _pad: 0,
                };
                return send_out(ctx, pkt, eth, ip, ep, host, &l4, (daddr, &public));
            }
            Err(reason) => return Verdict::Drop(reason),
            Ok(None) => {}
        }
    }
    let flow = match out {
        Some(f) if f.generation != cloud.generation => {
            if decide(ep.cloud, cloud, daddr, l4.protocol, l4.dst_port).is_err() {
                forget(&key, &f);
                return refuse(ep.cloud, daddr, &l4, DropReason::EgressRevoked);
            }
            renew(&key, f, cloud.generation)
        }
        Some(f) if recent.is_some_and(|(_, held)| held) || holds_nat_port(&key, &f) => f,
        previous => {
            if let Err(reason) = decide(ep.cloud, cloud, daddr, l4.protocol, l4.dst_port) {
                return refuse(ep.cloud, daddr, &l4, reason);
            }
            if let Err(reason) = new_flow_allowed(ep.cloud, cloud) {
                return Verdict::Drop(reason);
            }
            match open_flow(&key, host, cloud, previous) {
                Ok(f) => f,
                Err(reason) => return Verdict::Drop(reason),
            }
        }
    };
    if let Err(reason) = within_limits(ep.cloud, cloud, pkt.len) {
        if reason == DropReason::EgressBudgetSpent {
            return refuse(ep.cloud, daddr, &l4, reason);
        }
        return Verdict::Drop(reason);
    }
    send_out(ctx, pkt, eth, ip, ep, host, &l4, (daddr, &flow))
}

/// Charges a flow about to be opened (or opened again after an eviction: either takes
/// entries in the shared flow tables) to `cloud`'s new-flow rate, or refuses it: a virtual
/// clock (`pace`) with a second of burst, each flow costing `1 s / rate`. A cloud whose clock
/// cannot be stored (map full) is refused.
#[inline(always)]
fn new_flow_allowed(cloud_id: u32, cloud: &EgressCloud) -> Result<(), DropReason> {
    let Some(interval_ns) = 1_000_000_000u64.checked_div(cloud.new_flows_per_sec as u64) else {
        return Ok(());
    };
    let clock = match EGRESS_FLOW_CLOCKS.get_ptr_mut(cloud_id) {
        Some(c) => c,
        None => {
            let _ = EGRESS_FLOW_CLOCKS.insert(cloud_id, 0, BPF_NOEXIST);
            match EGRESS_FLOW_CLOCKS.get_ptr_mut(cloud_id) {
                Some(c) => c,
                None => return Err(DropReason::EgressFlowRateLimited),
            }
        }
    };
    // SAFETY: a value of this map from a successful lookup, valid for the program run.
    if unsafe { pace::admit(clock, interval_ns, 1_000_000_000) } {
        Ok(())
    } else {
        Err(DropReason::EgressFlowRateLimited)
    }
}

/// Charges `bytes` leaving `cloud` to its rate limit and budget, or refuses them.
///
/// Rate: a virtual clock (`next_ns`, see `pace`) with `burst_ns` of burst, each packet
/// costing `bytes / rate`. Budget: bytes of the current period, reset when the agent
/// moves to the next period. Both are read and written without atomics: two CPUs sending
/// for one cloud at the same instant may both pass on one token (the rate holds within a
/// packet per CPU, the budget may be exceeded by as much; see docs/design.md).
#[inline(always)]
fn within_limits(cloud_id: u32, cloud: &EgressCloud, bytes: u32) -> Result<(), DropReason> {
    if cloud.rate_bytes_per_sec == 0 && cloud.budget_bytes == NO_BUDGET {
        return Ok(());
    }
    let meter = match EGRESS_METERS.get_ptr_mut(cloud_id) {
        Some(m) => m,
        None => {
            let _ = EGRESS_METERS.insert(
                cloud_id,
                EgressMeter {
                    next_ns: 0,
                    used_bytes: 0,
                    period: cloud.budget_period,
                },
                BPF_NOEXIST,
            );
            match EGRESS_METERS.get_ptr_mut(cloud_id) {
                Some(m) => m,
                // The map is full: a cloud with limits that cannot be metered is held to them
                // by refusing (fail closed).
                None => return Err(DropReason::EgressRateLimited),
            }
        }
    };
    let bytes = bytes as u64;
    // SAFETY: a value of this map from a successful lookup, valid for the program run; plain
    // integer loads and stores (see the function docs on concurrency).
    unsafe {
        if cloud.budget_bytes != NO_BUDGET {
            if (*meter).period != cloud.budget_period {
                (*meter).period = cloud.budget_period;
                (*meter).used_bytes = 0;
            }
            if (*meter).used_bytes + bytes > cloud.budget_bytes {
                return Err(DropReason::EgressBudgetSpent);
            }
        }
        if let Some(cost_ns) = (bytes * 1_000_000_000).checked_div(cloud.rate_bytes_per_sec) {
            if !pace::admit(
                core::ptr::addr_of_mut!((*meter).next_ns),
                cost_ns,
                cloud.burst_ns,
            ) {
                return Err(DropReason::EgressRateLimited);
            }
        }
        if cloud.budget_bytes != NO_BUDGET {
            (*meter).used_bytes += bytes;
        }
    }
    Ok(())
}

/// Records a refused destination in `EGRESS_REFUSED` and drops the packet. The count is not
/// atomic: two CPUs refusing the same destination at once may count one (a diagnostic, not a
/// bill; the drop counters are exact).
#[inline(always)]
fn refuse(cloud: u32, daddr: u32, l4: &L4, reason: DropReason) -> Verdict {
    let key = RefusedKey {
        cloud,
        ipv4: daddr,
        port: l4.dst_port,
        protocol: l4.protocol,
        reason: reason as u8,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    match EGRESS_REFUSED.get_ptr_mut(key) {
        // SAFETY: a value of this map from a successful lookup; plain integer stores.
        Some(v) => unsafe {
            (*v).count += 1;
            (*v).last_ns = now;
        },
        None => {
            let _ = EGRESS_REFUSED.insert(
                key,
                RefusedCount {
                    count: 1,
                    last_ns: now,
                },
                BPF_NOEXIST,
            );
        }
    }
    Verdict::Drop(reason)
}

#[inline(always)]
fn cloud(cloud: u32) -> Option<&'static EgressCloud> {
    // SAFETY: entries are replaced whole by the agent, never written in place.
    unsafe { EGRESS_CLOUDS.get(cloud) }
}

/// The transport header of a guest's packet leaving: TCP, UDP or ICMP echo request, complete
/// and unfragmented.
#[inline(always)]
fn guest_l4(pkt: &Packet, ip: *mut Ipv4Hdr, total_len: u16) -> Result<L4, DropReason> {
    // SAFETY: `ip` was bounds-checked by the caller.
    let (protocol, fragment) = unsafe { ((*ip).protocol, (*ip).is_fragment()) };
    if fragment {
        return Err(DropReason::EgressUnsupported);
    }
    if protocol == IPPROTO_ICMP {
        if (total_len as usize) < Ipv4Hdr::LEN + 8 {
            return Err(DropReason::EgressUnsupported);
        }
        let Some(echo) = pkt.ptr::<packet::IcmpEcho>(L4_OFFSET) else {
            return Err(DropReason::EgressUnsupported);
        };
        // SAFETY: bounds-checked by `Packet::ptr`.
        let (kind, code, id) = unsafe { ((*echo).icmp_type, (*echo).code, (*echo).id) };
        if kind != ICMP_ECHO_REQUEST || code != 0 {
            return Err(DropReason::EgressUnsupported);
        }
        return Ok(L4 {
            protocol,
            src_port: u16::from_ne_bytes(id),
            dst_port: 0,
            check_offset: ICMP_CHECK_OFFSET,
        });
    }
    let Some((check_offset, _, src_port, dst_port)) =
        packet::transport_ports(pkt, protocol, total_len)
    else {
        return Err(DropReason::EgressUnsupported);
    };
    Ok(L4 {
        protocol,
        src_port,
        dst_port,
        check_offset,
    })
}

/// May `cloud` reach `daddr` with `protocol` to `port` (as read natively; 0 for ICMP)?
/// See "Policy order" in the module docs.
#[inline(always)]
fn decide(
    cloud_id: u32,
    cloud: &EgressCloud,
    daddr: u32,
    protocol: u8,
    port: u16,
) -> Result<(), DropReason> {
    if EGRESS_NEVER.get(Key::new(32, daddr)).is_some() {
        return Err(DropReason::EgressNever);
    }
    let mode = cloud.mode;
    if mode != EGRESS_MODE_ALLOW && mode != EGRESS_MODE_ALLOWLIST {
        return Err(DropReason::EgressDenied);
    }
    let key = Key::new(
        64,
        EgressRuleKey {
            cloud: cloud_id,
            ipv4: daddr,
        },
    );
    let port = u16::from_be(port);
    let now = if mode == EGRESS_MODE_ALLOWLIST {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_boot_ns() }
    } else {
        0
    };
    if EGRESS_DENY
        .get(&key)
        .is_some_and(|r| matches(r, protocol, port, now))
    {
        return Err(DropReason::EgressDenied);
    }
    if mode == EGRESS_MODE_ALLOWLIST
        && !EGRESS_ALLOW
            .get(&key)
            .is_some_and(|r| matches(r, protocol, port, now))
    {
        return Err(DropReason::EgressDenied);
    }
    Ok(())
}

/// True if any of `rules` covers the packet (deny rules never expire: `now` is then 0).
#[inline(always)]
fn matches(rules: &EgressRules, protocol: u8, port: u16, now: u64) -> bool {
    let count = rules.count as usize;
    for i in 0..RULES_PER_PREFIX {
        if i >= count {
            break;
        }
        let r = &rules.rules[i];
        let live = r.expires_ns == 0 || now < r.expires_ns;
        let proto = r.protocol == 0 || r.protocol == protocol;
        let ports = if protocol == IPPROTO_ICMP {
            r.first == 0 && r.last == u16::MAX
        } else {
            r.first <= port && port <= r.last
        };
        if live && proto && ports {
            return true;
        }
    }
    false
}

/// The flow's translation from its `EGRESS_RECENT` slot, if that matches the key exactly and
/// has credit left, and whether the flow still holds its NAT port by the slot (no new
/// reservation in its reply key's `EGRESS_HELD` slot since the flow was confirmed).
#[inline(always)]
fn recent_flow(key: &FlowKey) -> Option<(EgressOut, bool)> {
    let s = EGRESS_RECENT.get_ptr_mut(cache_slot(key))?;
    // SAFETY: a value of an array (never freed), read between its sequence checks (see
    // `flowcache`); the credit store is outside them (a stale credit only moves a refresh).
    let (flow, recorded) = unsafe {
        let seq = core::ptr::addr_of_mut!((*s).seq);
        let begun = read_begin(seq)?;
        let credit = (*s).credit;
        if credit == 0 || !same_key(&(*s).key, key) {
            return None;
        }
        let read = (
            EgressOut {
                egress_ipv4: (*s).egress_ipv4,
                generation: (*s).generation,
                nat_port: (*s).nat_port,
                _pad: 0,
            },
            ((*s).held_slot, (*s).held_version),
        );
        if !read_valid(seq, begun) {
            return None;
        }
        (*s).credit = credit - 1;
        read
    };
    Some((flow, still_held(&EGRESS_HELD, recorded)))
}

/// Fills the `EGRESS_RECENT` slot of `key` with its translation and the reservation version
/// read at `held` before its hold was confirmed.
#[inline(always)]
fn remember_flow(key: &FlowKey, flow: &EgressOut, (held_slot, held_version): (u32, u64)) {
    if let Some(s) = EGRESS_RECENT.get_ptr_mut(cache_slot(key)) {
        // SAFETY: a value of an array (never freed), written under its sequence word (see
        // `flowcache`).
        unsafe {
            write_slot(
                core::ptr::addr_of_mut!((*s).seq),
                core::ptr::addr_of_mut!((*s).key),
                || {
                    write_key(core::ptr::addr_of_mut!((*s).key), key);
                    (*s).egress_ipv4 = flow.egress_ipv4;
                    (*s).generation = flow.generation;
                    (*s).held_slot = held_slot;
                    (*s).held_version = held_version;
                    (*s).nat_port = flow.nat_port;
                    (*s).credit = CACHE_CREDIT;
                },
            );
        }
    }
}

/// Empties the `EGRESS_RECENT` slot of `key` if it holds `key`.
#[inline(always)]
fn forget_flow(key: &FlowKey) {
    if let Some(s) = EGRESS_RECENT.get_ptr_mut(cache_slot(key)) {
        // SAFETY: a value of an array (never freed); a credit store, outside the sequence
        // word as a reader's (a credit taken from another flow's slot only moves its refresh).
        unsafe {
            if same_key(&(*s).key, key) {
                (*s).credit = 0;
            }
        }
    }
}

/// `EGRESS_IN`'s key for the replies of `key` translated to `egress_ipv4:nat_port`.
#[inline(always)]
fn reply_key(key: &FlowKey, egress_ipv4: u32, nat_port: u16) -> FlowKey {
    if key.protocol == IPPROTO_ICMP {
        flow_key(0, key.dst_ipv4, egress_ipv4, 0, nat_port, key.protocol)
    } else {
        flow_key(
            0,
            key.dst_ipv4,
            egress_ipv4,
            key.dst_port,
            nat_port,
            key.protocol,
        )
    }
}

#[inline(always)]
fn reply_value(key: &FlowKey, generation: u32) -> EgressIn {
    EgressIn {
        cloud: key.cloud,
        guest_ipv4: key.src_ipv4,
        generation,
        guest_port: key.src_port,
        _pad: 0,
    }
}

/// True if the flow still holds its NAT port: its `EGRESS_IN` entry exists and names it (the
/// lookup also marks it used). Confirmed, the flow's `EGRESS_RECENT` slot is filled with the
/// reservation version read before the lookup. See "A NAT port has one holder" in `exposure`
/// and "Established flows are cached" in the module docs.
#[inline(always)]
fn holds_nat_port(key: &FlowKey, flow: &EgressOut) -> bool {
    let reply = reply_key(key, flow.egress_ipv4, flow.nat_port);
    let version = held_version(&EGRESS_HELD, &reply);
    // SAFETY: the value is only compared.
    let held = unsafe { EGRESS_IN.get(reply) }.is_some_and(|v| v.same_flow(&reply_value(key, 0)));
    if held {
        remember_flow(key, flow, version);
    }
    held
}

/// Records that the flow is allowed under `generation` (its `EGRESS_IN` entry keeps the
/// generation it was admitted under: its replies look at `EGRESS_OUT` from now on).
#[inline(always)]
fn renew(key: &FlowKey, mut flow: EgressOut, generation: u32) -> EgressOut {
    flow.generation = generation;
    let _ = EGRESS_OUT.insert(key, flow, BPF_ANY);
    // The next packet confirms the hold and fills the slot with the new generation.
    forget_flow(key);
    flow
}

/// Deletes both halves of a cut flow.
#[inline(always)]
fn forget(key: &FlowKey, flow: &EgressOut) {
    let reply = reply_key(key, flow.egress_ipv4, flow.nat_port);
    // SAFETY: the value is only compared.
    if unsafe { EGRESS_IN.get(reply) }.is_some_and(|v| v.same_flow(&reply_value(key, 0))) {
        let _ = EGRESS_IN.remove(reply);
    }
    forget_flow(key);
    let _ = EGRESS_OUT.remove(key);
}

/// Admits a flow: a NAT port (its previous one first, if it had one and it is free again)
/// reserved in `EGRESS_IN`, then its `EGRESS_OUT` entry.
#[inline(always)]
fn open_flow(
    key: &FlowKey,
    host: &EgressHost,
    cloud: &EgressCloud,
    previous: Option<EgressOut>,
) -> Result<EgressOut, DropReason> {
    // A cloud alone on its own address may use the whole range; on the host's, its window.
    let (egress_ipv4, window) = if cloud.egress_ipv4 != 0 {
        (cloud.egress_ipv4, host.nat_port_count as u32)
    } else {
        (host.egress_ipv4, EGRESS_NAT_PORTS_PER_CLOUD)
    };
    let hash = flow_hash(key);
    let back = reply_value(key, cloud.generation);
    let mut nat_port = 0u16;
    for attempt in 0..EGRESS_NAT_PORT_TRIES {
        let candidate = match previous {
            Some(p) if attempt == 0 && p.egress_ipv4 == egress_ipv4 => p.nat_port,
            _ => egress_nat_port(
                key.cloud,
                hash,
                attempt,
                window,
                host.nat_port_first,
                host.nat_port_count,
            )
            .to_be(),
        };
        let reply = reply_key(key, egress_ipv4, candidate);
        // Only a port no entry holds is taken (`BPF_NOEXIST` is atomic against other CPUs).
        if EGRESS_IN.insert(reply, back, BPF_NOEXIST).is_ok() {
            reserved(&EGRESS_HELD, &reply);
            nat_port = candidate;
            break;
        }
        // Taken: by this very flow (its `EGRESS_OUT` entry was evicted) it can be reused.
        // SAFETY: the value is only compared.
        if unsafe { EGRESS_IN.get(reply) }.is_some_and(|v| v.same_flow(&back)) {
            nat_port = candidate;
            break;
        }
    }
    if nat_port == 0 {
        return Err(DropReason::EgressNatPortsExhausted);
    }
    let flow = EgressOut {
        egress_ipv4,
        generation: cloud.generation,
        nat_port,
        _pad: 0,
    };
    if EGRESS_OUT.insert(key, flow, BPF_ANY).is_err() {
        let _ = EGRESS_IN.remove(reply_key(key, egress_ipv4, nat_port));
        return Err(DropReason::EgressNatPortsExhausted);
    }
    // Not cached yet: the flow's next packet confirms its hold and fills its slot (its own
    // reservation moved the version it would have read now).
    Ok(flow)
}

/// Sends the translated frame out of the uplink: rewrites it, meters it and redirects it
/// (the kernel routes it and writes its MACs, see "Out through the uplink" in the module docs).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn send_out(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ep: &EndpointInfo,
    host: &EgressHost,
    l4: &L4,
    (daddr, flow): (u32, &EgressOut),
) -> Verdict {
    let rewritten = rewrite(
        ctx,
        pkt,
        eth,
        ip,
        None,
        l4,
        Rewrite {
            src: (ep.ipv4, flow.egress_ipv4),
            dst: (daddr, daddr),
            src_port: (l4.src_port, flow.nat_port),
            dst_port: (l4.dst_port, l4.dst_port),
        },
    );
    if !rewritten {
        return Verdict::Drop(DropReason::EgressRewriteFailed);
    }
    metering::traffic(
        ep.slot,
        Direction::FromGuest,
        TrafficClass::External,
        pkt.len,
    );
    Verdict::RedirectNeigh(host.uplink_ifindex)
}

/// Writes a translation (see [`packet::rewrite_with`]) into a TCP, UDP or ICMP echo frame.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    macs: Option<(&[u8; 6], &[u8; 6])>,
    l4: &L4,
    w: Rewrite,
) -> bool {
    // The identifier of an ICMP echo, or the ports of TCP/UDP: re-derived here, after the
    // caller's helpers (none runs between this and the writes).
    let ports_at = if l4.protocol == IPPROTO_ICMP {
        L4_OFFSET + 4
    } else {
        L4_OFFSET
    };
    let Some(ports) = pkt.ptr::<Ports>(ports_at) else {
        return false;
    };
    // SAFETY: `eth`, `ip` and `ports` are bounds-checked pointers into this frame and no
    // helper has run since they were derived.
    unsafe {
        packet::rewrite_with(
            ctx,
            eth,
            ip,
            ports,
            macs,
            l4.protocol,
            l4.check_offset,
            &w,
            packet::Diffs::of(&w),
        )
    }
}

/// TC ingress of the uplink: replies of tracked flows go back to their guests; everything
/// else passes (see module docs).
#[inline(always)]
pub fn from_uplink(ctx: &TcContext) -> Verdict {
    let Some(host) = host() else {
        return Verdict::Pass;
    };
    let pkt = Packet::with_headers(ctx, ICMP_ERROR_BYTES);
    let Some(eth) = pkt.ptr::<EthHdr>(0) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    if u16::from_be(unsafe { (*eth).ether_type }) != packet::ETH_P_IP {
        return Verdict::Pass;
    }
    let Some(ip) = pkt.ptr::<Ipv4Hdr>(EthHdr::LEN) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (version_ihl, total_len, fragment, protocol, saddr, daddr, ttl) = unsafe {
        let h = &*ip;
        (
            h.version_ihl,
            h.total_len(),
            h.is_fragment(),
            h.protocol,
            h.saddr(),
            h.daddr(),
            h.ttl,
        )
    };
    if version_ihl != 0x45
        || fragment
        || (total_len as usize) < Ipv4Hdr::LEN + 8
        || EthHdr::LEN + total_len as usize > pkt.len as usize
    {
        return Verdict::Pass;
    }
    let Some(ports) = pkt.ptr::<Ports>(L4_OFFSET) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (first, second) = unsafe {
        (
            u16::from_ne_bytes((*ports).src),
            u16::from_ne_bytes((*ports).dst),
        )
    };
    if protocol == IPPROTO_ICMP {
        let [kind, code] = first.to_ne_bytes();
        return match kind {
            ICMP_ECHO_REPLY if code == 0 => {
                let Some(echo) = pkt.ptr::<packet::IcmpEcho>(L4_OFFSET) else {
                    return Verdict::Pass;
                };
                // SAFETY: bounds-checked by `Packet::ptr`.
                let id = u16::from_ne_bytes(unsafe { (*echo).id });
                let key = flow_key(0, saddr, daddr, 0, id, protocol);
                let l4 = L4 {
                    protocol,
                    src_port: 0,
                    dst_port: id,
                    check_offset: ICMP_CHECK_OFFSET,
                };
                back_in(ctx, &pkt, eth, ip, host, &l4, &key, ttl, saddr)
            }
            ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => {
                icmp_error(ctx, &pkt, eth, ip, host, daddr, ttl)
            }
            _ => Verdict::Pass,
        };
    }
    let Some((_, check_offset)) = packet::l4_layout(protocol) else {
        return Verdict::Pass;
    };
    let key = flow_key(0, saddr, daddr, first, second, protocol);
    let l4 = L4 {
        protocol,
        src_port: first,
        dst_port: second,
        check_offset,
    };
    back_in(ctx, &pkt, eth, ip, host, &l4, &key, ttl, saddr)
}

/// A tracked flow and the route to its guest's endpoint.
struct Tracked {
    flow: EgressIn,
    hop: &'static NextHop,
}

/// The tracked flow a packet on the uplink belongs to, if the flow is still allowed and its
/// guest is here. `Err` drops (the flow is cut or its guest gone); `Ok(None)` is not ours.
///
/// A function of its own (a BPF-to-BPF call): inlined into both callers, the compiler merged
/// the "not ours" path with the translation's and copied an undefined register there, which
/// the verifier refuses (`!read_ok`).
#[inline(never)]
fn tracked(key: &FlowKey, remote_port: u16) -> Result<Option<Tracked>, DropReason> {
    // SAFETY: the value is copied out at once.
    let Some(flow) = (unsafe { EGRESS_IN.get(key) }).copied() else {
        return Ok(None);
    };
    let out_key = if key.protocol == IPPROTO_ICMP {
        flow_key(
            flow.cloud,
            flow.guest_ipv4,
            key.src_ipv4,
            flow.guest_port,
            0,
            key.protocol,
        )
    } else {
        flow_key(
            flow.cloud,
            flow.guest_ipv4,
            key.src_ipv4,
            flow.guest_port,
            remote_port,
            key.protocol,
        )
    };
    let Some(cloud) = cloud(flow.cloud) else {
        return Err(cut(key, &out_key));
    };
    // Admitted under the cloud's current policy: nothing to decide (the common case).
    if flow.generation == cloud.generation {
        return deliverable(flow);
    }
    // SAFETY: the value is copied out at once.
    let out = unsafe { EGRESS_OUT.get(out_key) }.copied();
    let generation = out.map_or(flow.generation, |o| o.generation);
    if generation != cloud.generation {
        if decide(flow.cloud, cloud, key.src_ipv4, key.protocol, remote_port).is_err() {
            return Err(cut(key, &out_key));
        }
        // The guest's half, if it was evicted, is opened again by the guest's next packet
        // (which finds its port reserved for it).
        if let Some(out) = out {
            renew(&out_key, out, cloud.generation);
        }
    }
    deliverable(flow)
}

/// Cuts the flow of the reply key `key` (whose `EGRESS_IN` entry was just read) and of its
/// guest's half `out_key`: both entries and the cache slot go.
#[inline(always)]
fn cut(key: &FlowKey, out_key: &FlowKey) -> DropReason {
    let _ = EGRESS_IN.remove(key);
    forget_flow(out_key);
    let _ = EGRESS_OUT.remove(out_key);
    DropReason::EgressRevoked
}

#[inline(always)]
fn deliverable(flow: EgressIn) -> Result<Option<Tracked>, DropReason> {
    match route::lookup(flow.cloud, flow.guest_ipv4) {
        Some(hop) if hop.flags == NEXTHOP_ENDPOINT => Ok(Some(Tracked { flow, hop })),
        _ => Err(DropReason::UplinkNoEndpoint),
    }
}

/// A reply (TCP, UDP, ICMP echo reply) of a tracked flow, back to its guest.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn back_in(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    host: &EgressHost,
    l4: &L4,
    key: &FlowKey,
    ttl: u8,
    saddr: u32,
) -> Verdict {
    let Tracked { flow, hop } = match tracked(key, l4.src_port) {
        Ok(Some(t)) => t,
        Ok(None) if l4.protocol != IPPROTO_ICMP => {
            return to_published(ctx, pkt, eth, ip, host, l4, key, ttl);
        }
        Ok(None) => return Verdict::Pass,
        Err(reason) => return Verdict::Drop(reason),
    };
    if ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    let rewritten = rewrite(
        ctx,
        pkt,
        eth,
        ip,
        Some((&host.gateway_mac, &hop.mac)),
        l4,
        Rewrite {
            src: (saddr, saddr),
            dst: (key.dst_ipv4, flow.guest_ipv4),
            src_port: (l4.src_port, l4.src_port),
            dst_port: (l4.dst_port, flow.guest_port),
        },
    );
    to_guest(rewritten, hop, pkt.len)
}

/// True if `port` (as read natively) is in the host's NAT port range.
#[inline(always)]
fn is_nat_port(host: &EgressHost, port: u16) -> bool {
    let p = u16::from_be(port) as u32;
    let first = host.nat_port_first as u32;
    p >= first && p < first + host.nat_port_count as u32
}

/// A TCP or UDP packet on the uplink that is no egress flow's reply: translated to the VM
/// port its address and port are published for (see `ingress`), dropped if addressed to a
/// NAT port of the host's egress address (`uplink_no_flow`, see the module docs), else
/// passed to the host.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_published(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    host: &EgressHost,
    l4: &L4,
    key: &FlowKey,
    ttl: u8,
) -> Verdict {
    let (remote, public) = (key.src_ipv4, key.dst_ipv4);
    let target = match ingress::published(public, l4.dst_port, l4.protocol, remote) {
        Ok(Some(t)) => t,
        Ok(None) if public == host.egress_ipv4 && is_nat_port(host, l4.dst_port) => {
            return Verdict::Drop(DropReason::UplinkNoFlow);
        }
        Ok(None) => return Verdict::Pass,
        Err(reason) => return Verdict::Drop(reason),
    };
    let hop = match route::lookup(target.cloud, target.guest_ipv4) {
        Some(hop) if hop.flags == NEXTHOP_ENDPOINT => hop,
        _ => return Verdict::Drop(DropReason::UplinkNoEndpoint),
    };
    if ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    ingress::record(
        &flow_key(
            target.cloud,
            target.guest_ipv4,
            remote,
            target.guest_port,
            l4.src_port,
            l4.protocol,
        ),
        IngressFlow {
            public_ipv4: public,
            serial: target.serial,
            public_port: l4.dst_port,
            _pad: 0,
        },
    );
    let rewritten = rewrite(
        ctx,
        pkt,
        eth,
        ip,
        Some((&host.gateway_mac, &hop.mac)),
        l4,
        Rewrite {
            src: (remote, remote),
            dst: (public, target.guest_ipv4),
            src_port: (l4.src_port, l4.src_port),
            dst_port: (l4.dst_port, target.guest_port),
        },
    );
    to_guest(rewritten, hop, pkt.len)
}

/// An ICMP error about a packet a guest sent out: translated by its embedded header (see
/// module docs). Not about a tracked flow: passes.
#[inline(always)]
fn icmp_error(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    host: &EgressHost,
    daddr: u32,
    ttl: u8,
) -> Verdict {
    let (Some(inner), Some(inner_ports)) = (
        pkt.ptr::<Ipv4Hdr>(INNER_IP_OFFSET),
        pkt.ptr::<Ports>(INNER_L4_OFFSET),
    ) else {
        return Verdict::Pass;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (inner_vihl, inner_protocol, inner_src, inner_dst, inner_check, sport, dport) = unsafe {
        let h = &*inner;
        (
            h.version_ihl,
            h.protocol,
            h.saddr(),
            h.daddr(),
            h.check,
            u16::from_ne_bytes((*inner_ports).src),
            u16::from_ne_bytes((*inner_ports).dst),
        )
    };
    // The quoted packet went out from our egress address: it must be the error's destination.
    if inner_vihl != 0x45 || inner_src != daddr {
        return Verdict::Pass;
    }
    // The quoted packet's reply key: ICMP echo by identifier (the quote's bytes 4-5).
    let (key, remote_port) = match inner_protocol {
        IPPROTO_TCP | IPPROTO_UDP => (
            flow_key(0, inner_dst, inner_src, dport, sport, inner_protocol),
            dport,
        ),
        IPPROTO_ICMP => {
            let Some(echo) = pkt.ptr::<packet::IcmpEcho>(INNER_L4_OFFSET) else {
                return Verdict::Pass;
            };
            // SAFETY: bounds-checked by `Packet::ptr`.
            let (kind, id) = unsafe { ((*echo).icmp_type, (*echo).id) };
            if kind != ICMP_ECHO_REQUEST {
                return Verdict::Pass;
            }
            (
                flow_key(
                    0,
                    inner_dst,
                    inner_src,
                    0,
                    u16::from_ne_bytes(id),
                    inner_protocol,
                ),
                0,
            )
        }
        _ => return Verdict::Pass,
    };
    let Tracked { flow, hop } = match tracked(&key, remote_port) {
        Ok(Some(t)) => t,
        Ok(None) => return Verdict::Pass,
        Err(reason) => return Verdict::Drop(reason),
    };
    if ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    // The quote: source address and port back to the guest's, its header checksum adjusted;
    // the ICMP checksum covers all three changes; the outer header's destination and TTL.
    let guest = flow.guest_ipv4;
    let new_check = packet::csum_replace4(inner_check, inner_src, guest);
    let id_offset = if inner_protocol == IPPROTO_ICMP {
        INNER_L4_OFFSET + 4
    } else {
        INNER_L4_OFFSET
    };
    let old_port = key.dst_port;
    // SAFETY: `eth`, `ip` and `inner` are bounds-checked pointers into this frame and no
    // helper has run since they were derived (the helpers below invalidate them; none is
    // used after).
    unsafe {
        packet::write_mac(&mut (*eth).src, &host.gateway_mac);
        packet::write_mac(&mut (*eth).dst, &hop.mac);
        let h = &mut *ip;
        h.ttl -= 1;
        h.check = packet::csum_add_be(h.check, u16::from_ne_bytes([0x01, 0x00]));
        packet::write_ipv4(&mut h.daddr, guest.to_ne_bytes());
        let i = &mut *inner;
        packet::write_ipv4(&mut i.saddr, guest.to_ne_bytes());
        i.check = new_check;
    }
    let ok = ctx
        .store(id_offset, &flow.guest_port.to_ne_bytes(), 0)
        .is_ok()
        && ctx
            .l3_csum_replace(IPV4_CHECK_OFFSET, daddr as u64, guest as u64, 4)
            .is_ok()
        && ctx
            .l4_csum_replace(ICMP_CHECK_OFFSET, inner_src as u64, guest as u64, 4)
            .is_ok()
        && ctx
            .l4_csum_replace(ICMP_CHECK_OFFSET, inner_check as u64, new_check as u64, 2)
            .is_ok()
        && ctx
            .l4_csum_replace(
                ICMP_CHECK_OFFSET,
                old_port as u64,
                flow.guest_port as u64,
                2,
            )
            .is_ok();
    to_guest(ok, hop, pkt.len)
}

/// The end of every translation towards a guest: a failed rewrite drops, else the frame is
/// metered `external` to the guest and redirected to its device.
#[inline(always)]
fn to_guest(rewritten: bool, hop: &NextHop, bytes: u32) -> Verdict {
    if !rewritten {
        return Verdict::Drop(DropReason::EgressRewriteFailed);
    }
    metering::traffic(hop.slot, Direction::ToGuest, TrafficClass::External, bytes);
    Verdict::Redirect(hop.ifindex)
}
