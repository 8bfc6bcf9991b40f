//! Cross-cloud exposures: a consumer reaches a provider's service at a VIP in its own range.
//!
//! The agent programs, per grant on this host:
//! - `ROUTES (consumer cloud, VIP)` with [`NEXTHOP_VIP`], and `VIPS (consumer cloud, VIP)` with
//!   the service: grant number, provider cloud, protocol, port, NAT address and backends;
//! - `ROUTES (provider cloud, NAT address)` with [`NEXTHOP_NAT_SOURCE`]: the provider-side
//!   address the consumer's flows come from (one per grant, allocated in the provider's range,
//!   so the provider sees *which* cloud connects).
//!
//! Both are found by the ordinary route lookup in `from_vm` and the flag sends the packet here,
//! so intra-cloud forwarding pays one branch and nothing else; ARP for a VIP or NAT address is
//! answered like for any in-cloud peer.
//!
//! **Consumer → VIP** ([`from_consumer`]): the first packet of a flow picks a backend by a hash
//! of the flow (consistent per flow: the choice is recorded) and a provider-side source port
//! (the consumer's own port if free, else a few hashed alternatives), and records the flow in
//! two LRU maps: `FLOWS_OUT` (consumer's view, for later packets) and `FLOWS_IN` (provider's
//! view of the replies). Source becomes `NAT address:NAT port`, destination `backend:port`.
//!
//! **Provider → NAT address** ([`from_provider`]): only replies of tracked flows pass: the
//! source becomes `VIP:port` and the destination the consumer's `address:port`.
//!
//! Decisions:
//! - **Only granted pairs pass.** A VIP exists only in the consumer cloud's route space (keyed
//!   by cloud, like every route) and a NAT address only in the provider's; a third cloud can
//!   reach neither, and the backend's real address is never routable from another cloud.
//! - **Revocation cuts existing flows** without walking the flow maps: every packet, in both
//!   directions, checks that the grant its flow was admitted under is still the VIP's grant
//!   (`VipService::grant`, unique per grant on this host). A revoked grant's VIP entry is gone
//!   or carries another number, so the packet is dropped (`exposure_revoked`) and its flow entry
//!   deleted. A TCP connection then stalls; the guest's own timeouts end it.
//! - **Flows expire by LRU eviction**, not by timers: no per-flow state machine in the kernel.
//!   Both maps have the same capacity (`dataplane.max_flows`). A consumer flow whose
//!   `FLOWS_OUT` entry was evicted is admitted again as new: same backend (the hash), and its
//!   own `FLOWS_IN` entry, if still there, is recognised and reused. A reply whose `FLOWS_IN`
//!   entry was evicted while `FLOWS_OUT` still holds the flow is dropped (`exposure_no_flow`);
//!   that needs a flow silent in one direction while the maps are full, and is counted.
//! - **A NAT port has one holder: the flow its `FLOWS_IN` entry names.** The `FLOWS_IN` entry
//!   is the port's reservation, taken only with `BPF_NOEXIST`, and every consumer packet of a
//!   known flow checks that it still exists and names this flow ([`holds_nat_port`]; the
//!   lookup also marks it used, so a flow active in either direction keeps both entries).
//!   Otherwise the flow is dead, whatever `FLOWS_OUT` says: its reply half was evicted, and a
//!   sibling guest of the same consumer cloud may have opened a flow from the same source port
//!   to the same backend and taken the port (a guest can force evictions by filling the flow
//!   tables). Keeping on sending from that port would make the backend's replies to this flow
//!   reach the sibling, so the flow is opened again ([`open_flow`] with its old entry): same
//!   backend, its old port if still free (an idle TCP connection survives an eviction), else
//!   the next candidate. Rejected: checking only at admission whether a port is in use by
//!   *any* flow, which needs a reverse index of `FLOWS_OUT` by port (a third map to keep
//!   consistent under LRU eviction) and still leaves a stale `FLOWS_OUT` entry sending from a
//!   port it no longer holds. Replies the backend sends on the old connection after the port
//!   changed hands reach the new holder, as with any NAT that reuses a port.
//! - **Established flows are cached** (as egress's, see "Established flows are cached" in
//!   `egress` for the version that proves a flow still holds its NAT port, the credit, and
//!   torn slots). `FLOWS_RECENT` (slot [`cache_slot`] of the consumer's flow key) holds what
//!   an established consumer flow needs: grant, provider, NAT address, backend and its
//!   device, NAT port, the reservation version (`FLOWS_HELD`) and the translation's checksum
//!   differences. A packet whose slot matches exactly, was admitted under the grant the VIP's
//!   route names now (routes of exposure addresses carry their grant in `NextHop::ifindex`;
//!   the route lookup runs for every packet anyway), whose version is current and whose
//!   backend device `ENDPOINT_CACHE` still says is `(provider, backend)`, is translated
//!   without `VIPS`, `FLOWS_OUT`, `FLOWS_IN` or the backend's route ([`from_cache`]). A spent
//!   credit is renewed by [`refresh`] (`FLOWS_OUT` and `FLOWS_IN` only: the grant and the
//!   backend are checked on every packet anyway); anything else takes the tables and fills
//!   the slot again. A grant number names one service: the agent never gives a number to
//!   another service in place (`Dataplane::set_vip` refuses), so a route naming the flow's
//!   grant proves the grant, as `VIPS` did. Replies (`from_provider`) skip `VIPS` the same
//!   way when the NAT address's route names the flow's grant (one NAT address per live
//!   grant).
//! - **New flows per consumer cloud** are paced (`dataplane.max_new_exposure_flows_per_sec`,
//!   in `EXPOSURE_FLOW_RATE`; a clock per cloud in `EXPOSURE_FLOW_CLOCKS`; beyond it
//!   `exposure_flow_rate_limited`), as egress flows are (see "New flows per cloud" in
//!   docs/design.md): `FLOWS_OUT` and `FLOWS_IN` are LRU maps shared by every cloud on the
//!   host, so a consumer opening flows as fast as it can would push every other cloud's idle
//!   flows out, whose replies are then dropped (`exposure_no_flow`) until their consumer
//!   speaks again. Charged by every flow opened, also one opened again after an eviction
//!   (it takes entries as well); established flows are never charged. One rate for every
//!   consumer cloud of the host, set by the operator: it protects the host's shared tables,
//!   not a tenant's bill. Rejected: the rate per grant (a consumer with many grants would
//!   get many rates) and one clock for egress and exposures together (a cloud's egress
//!   churn would refuse its exposure flows, whose tables it does not touch).
//! - **ICMP is not translated** (`exposure_icmp`): echo to a VIP is not a service, and ICMP
//!   errors would need their embedded headers translated. Within one host every device has the
//!   same MTU, so no fragmentation-needed error can arise on this path; a TCP or UDP socket
//!   learns of an unreachable backend by its own timeout or a TCP reset.
//! - **Fragments are dropped** (`exposure_l4_malformed`): only the first one carries ports.
//! - Checksums: the IPv4 header's is computed in the program, the transport's is updated
//!   by one call of the kernel's helper for the addresses and by the program for the ports
//!   (see `packet::rewrite_with`), so frames with partial checksums (veth guests, VMMs with
//!   offloads) stay valid; a cached flow keeps its translation's differences in its slot.
//!   The TTL is decremented as on any routed hop.
//! - Metering: both endpoints count the frame as [`TrafficClass::Exposure`], the sender "from
//!   guest" and the receiver "to guest".
//!
//! **Exposures across hosts.** The consumer's host translates, wherever the backend runs:
//! - each grant has one NAT address *per consumer host* (allocated by the control plane in the
//!   provider's range), so the backend's host can tell by the destination alone which host a
//!   reply goes back to, with no flow state of its own;
//! - on the consumer's host the backend's route in the provider's space is
//!   [`NEXTHOP_REMOTE`]: the translated frame is rewritten as for a local backend (TTL one
//!   less), encapsulated under the *provider's* network id to the backend's host
//!   ([`overlay::encapsulate`]) and metered `exposure` from the consumer. Such flows are not
//!   cached (the cache proves a backend by its local device);
//! - on the backend's host the NAT address is a [`NEXTHOP_REMOTE_NAT`] route to the consumer
//!   host: `from_overlay` accepts frames from it (the source check holds as for a guest: the
//!   address is routed to the sending host) and meters them `exposure` to the backend; the
//!   backend's replies find the same route in `from_vm` and are encapsulated back without a
//!   TTL decrement (the translation back is the hop), metered `exposure` from the backend;
//! - back on the consumer's host, `from_overlay` hands a frame from a backend (routed to the
//!   sending host) to a NAT address of this host to [`from_remote_backend`], the reply path
//!   of a local backend without the sender's metering: only tracked flows pass, revocation
//!   cuts them the same way.
//!
//! [`NEXTHOP_REMOTE_NAT`]: atoll_dataplane_common::NEXTHOP_REMOTE_NAT

use atoll_dataplane_common::{
    cache_slot, flow_hash, nat_port_candidate, Direction, DropReason, EndpointInfo, FlowIn,
    FlowKey, FlowOut, FlowRecent, NextHop, RouteKey, TrafficClass, VipService, CACHE_CREDIT,
    CACHE_SLOTS, MAX_BACKENDS, NAT_PORT_TRIES, NEXTHOP_ENDPOINT, NEXTHOP_NAT_SOURCE,
    NEXTHOP_REMOTE, NEXTHOP_VIP,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
    programs::TcContext,
};

use crate::{
    endpoint,
    flowcache::{
        held_version, read_begin, read_valid, reserved, same_key, still_held, write_key, write_slot,
    },
    metering, overlay, pace,
    packet::{self, Diffs, EthHdr, Ipv4Hdr, Packet, Ports, Rewrite, IPPROTO_ICMP},
    route, Verdict,
};

/// `(consumer cloud, VIP)` → the granted service. Sized by the agent (`dataplane.max_vips`).
/// Not preallocated: memory is used per grant, and a replaced entry (new backends) is freed
/// only after an RCU grace period, so the agent may update it in place while programs read it.
#[map]
pub static VIPS: HashMap<RouteKey, VipService> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// Consumer's view of a flow → its translation. Sized by the agent (`dataplane.max_flows`).
#[map]
pub static FLOWS_OUT: LruHashMap<FlowKey, FlowOut> = LruHashMap::with_max_entries(131072, 0);

/// Provider's view of a reply → the consumer flow it belongs to. Same size as `FLOWS_OUT`.
#[map]
pub static FLOWS_IN: LruHashMap<FlowKey, FlowIn> = LruHashMap::with_max_entries(131072, 0);

/// What established consumer flows need, by flow key (see "Established flows are cached").
#[map]
pub static FLOWS_RECENT: Array<FlowRecent> = Array::with_max_entries(CACHE_SLOTS, 0);

/// Versions of the NAT port reservations, by [`cache_slot`] of their reply keys: incremented
/// by every new reservation (see "Established flows are cached").
#[map]
pub static FLOWS_HELD: Array<u64> = Array::with_max_entries(CACHE_SLOTS, 0);

/// The new-flow rate of every consumer cloud on this host, flows per second
/// (`dataplane.max_new_exposure_flows_per_sec`, written by the agent; 0, the array's initial
/// value: no limit). See "New flows per consumer cloud".
#[map]
pub static EXPOSURE_FLOW_RATE: Array<u32> = Array::with_max_entries(1, 0);

/// Consumer cloud → the virtual clock of its new-flow rate (`pace`). Programs only. LRU,
/// sized by the agent (`dataplane.max_vips`: every consumer cloud here has a VIP): an idle
/// cloud's clock may be evicted, which only gives it a fresh second of burst.
#[map]
pub static EXPOSURE_FLOW_CLOCKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

const BPF_NOEXIST: u64 = 1;
const BPF_ANY: u64 = 0;

/// The transport header of a packet to a VIP or NAT address.
struct L4 {
    protocol: u8,
    check_offset: usize,
    ports: *mut Ports,
    /// Ports as read natively from the packet (network byte order in memory).
    src_port: u16,
    dst_port: u16,
}

/// From `from_vm` after the route lookup found an exposure address (`hop_flags`). The caller
/// checked the sender's identity, the IPv4 header, `total_len` and the TTL.
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    total_len: u16,
    ep: &EndpointInfo,
    (hop_flags, route_grant): (u16, u32),
) -> Verdict {
    let l4 = match parse_l4(pkt, ip, total_len) {
        Ok(l4) => l4,
        Err(reason) => return Verdict::Drop(reason),
    };
    match hop_flags {
        NEXTHOP_VIP => from_consumer(ctx, pkt, eth, ip, ep, &l4, route_grant),
        NEXTHOP_NAT_SOURCE => from_provider(ctx, pkt, eth, ip, ep, &l4, route_grant),
        _ => Verdict::Drop(DropReason::NoRouteInCloud),
    }
}

#[inline(always)]
fn parse_l4(pkt: &Packet, ip: *mut Ipv4Hdr, total_len: u16) -> Result<L4, DropReason> {
    // SAFETY: `ip` was bounds-checked by the caller.
    let (protocol, fragment) = unsafe { ((*ip).protocol, (*ip).is_fragment()) };
    if protocol == IPPROTO_ICMP {
        return Err(DropReason::ExposureIcmp);
    }
    if fragment {
        return Err(DropReason::ExposureL4Malformed);
    }
    let Some((check_offset, ports, src_port, dst_port)) =
        packet::transport_ports(pkt, protocol, total_len)
    else {
        return Err(DropReason::ExposureL4Malformed);
    };
    Ok(L4 {
        protocol,
        check_offset,
        ports,
        src_port,
        dst_port,
    })
}

/// A flow key, its padding zeroed with volatile byte stores: a `_pad: [0; 3]` literal
/// compiles to calls into an out-of-line, byte-looping `memset` (at the key and again at
/// every copy of it, e.g. per NAT port try), as array copies do (see "No `[u8; N]` copies in
/// eBPF" in docs/design.md).
#[inline(always)]
pub(crate) fn flow_key(
    cloud: u32,
    src_ipv4: u32,
    dst_ipv4: u32,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
) -> FlowKey {
    let mut key = core::mem::MaybeUninit::<FlowKey>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field is written through raw field pointers before `assume_init`.
    unsafe {
        core::ptr::addr_of_mut!((*k).cloud).write(cloud);
        core::ptr::addr_of_mut!((*k).src_ipv4).write(src_ipv4);
        core::ptr::addr_of_mut!((*k).dst_ipv4).write(dst_ipv4);
        core::ptr::addr_of_mut!((*k).src_port).write(src_port);
        core::ptr::addr_of_mut!((*k).dst_port).write(dst_port);
        core::ptr::addr_of_mut!((*k).protocol).write(protocol);
        let pad = core::ptr::addr_of_mut!((*k)._pad) as *mut u8;
        core::ptr::write_volatile(pad, 0);
        core::ptr::write_volatile(pad.add(1), 0);
        core::ptr::write_volatile(pad.add(2), 0);
        key.assume_init()
    }
}

#[inline(always)]
fn from_consumer(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ep: &EndpointInfo,
    l4: &L4,
    route_grant: u32,
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    let vip = unsafe { (*ip).daddr() };
    let key = flow_key(
        ep.cloud,
        ep.ipv4,
        vip,
        l4.src_port,
        l4.dst_port,
        l4.protocol,
    );
    if let Some(v) = from_cache(ctx, pkt, (eth, ip), ep, l4, &key, route_grant) {
        return v;
    }
    // SAFETY: entries are replaced whole by the agent, never written in place.
    let Some(svc) = (unsafe {
        VIPS.get(RouteKey {
            cloud: ep.cloud,
            ipv4: vip,
        })
    }) else {
        return Verdict::Drop(DropReason::ExposureNoService);
    };
    if svc.protocol != l4.protocol || svc.port != l4.dst_port {
        return Verdict::Drop(DropReason::ExposureNoService);
    }
    let service = Granted {
        grant: svc.grant,
        provider: svc.provider,
        nat_ipv4: svc.nat_ipv4,
    };
    // SAFETY: the value is copied out at once.
    let flow = match unsafe { FLOWS_OUT.get(key) }.copied() {
        Some(f) if f.grant != svc.grant => {
            forget_recent(&key);
            let _ = FLOWS_OUT.remove(key);
            return Verdict::Drop(DropReason::ExposureRevoked);
        }
        Some(f) => match holds_nat_port(&key, &service, &f) {
            Some(version) => (f, Some(version)),
            // The reply half was evicted, or its NAT port now belongs to another flow: this
            // flow is dead and is opened again (see "A NAT port has one holder" in the module
            // docs).
            None => match new_flow_allowed(ep.cloud)
                .and_then(|()| open_flow(&key, svc, &service, Some(f)))
            {
                Ok(f) => (f, None),
                Err(reason) => return Verdict::Drop(reason),
            },
        },
        None => {
            match new_flow_allowed(ep.cloud).and_then(|()| open_flow(&key, svc, &service, None)) {
                Ok(f) => (f, None),
                Err(reason) => return Verdict::Drop(reason),
            }
        }
    };
    let (flow, confirmed) = flow;
    let hop = match route::lookup(svc.provider, flow.backend_ipv4) {
        Some(hop) if hop.flags == NEXTHOP_ENDPOINT || hop.flags == NEXTHOP_REMOTE => hop,
        _ => return Verdict::Drop(DropReason::ExposureNoBackend),
    };
    let t = Translation::to_backend(
        (ep.ipv4, vip),
        &service,
        (flow.backend_ipv4, flow.backend_port),
        flow.nat_port,
    )
    .rewrite(l4);
    let diffs = Diffs::of(&t);
    if hop.flags == NEXTHOP_REMOTE {
        return to_remote_backend(
            ctx,
            pkt,
            (eth, ip),
            ep,
            l4,
            (hop, svc.provider),
            (&t, diffs),
        );
    }
    let (ifindex, slot, mac) = (hop.ifindex, hop.slot, hop.mac);
    // A flow just opened is cached by its next packet, which confirms its hold (its own
    // reservation moved the version it would read now).
    if let Some(version) = confirmed {
        remember_recent(&key, &service, &flow, (ifindex, diffs), version);
    }
    deliver_to(
        ctx,
        pkt,
        (eth, ip),
        (Some(ep.slot), &ep.gateway_mac),
        l4,
        (ifindex, slot, &mac),
        (&t, diffs),
    )
}

/// Rewrites the frame with `t` (addresses, ports, TTL, checksums by `diffs`) and the MACs
/// `(source, destination)`; the frame's pointers are invalid afterwards.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    l4: &L4,
    macs: (&[u8; 6], &[u8; 6]),
    (t, diffs): (&Rewrite, Diffs),
) -> Result<(), DropReason> {
    // SAFETY: the callers pass `eth`, `ip` and `l4.ports` bounds-checked against this frame,
    // with no helper run since they were derived.
    let rewritten = unsafe {
        packet::rewrite_with(
            ctx,
            eth,
            ip,
            l4.ports,
            Some(macs),
            l4.protocol,
            l4.check_offset,
            t,
            diffs,
        )
    };
    if rewritten {
        Ok(())
    } else {
        Err(DropReason::ExposureRewriteFailed)
    }
}

/// A consumer's translated flow to a backend on another host (`hop`, a route of the
/// provider's): rewritten (gateway → the backend's MAC, TTL one less, addresses and ports),
/// encapsulated under the provider's network id to the backend's host, metered `exposure`
/// from the consumer (the backend's host meters its side). Not cached: the cache proves a
/// backend by its local device.
#[inline(always)]
fn to_remote_backend(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    ep: &EndpointInfo,
    l4: &L4,
    (hop, provider): (&NextHop, u32),
    (t, diffs): (&Rewrite, Diffs),
) -> Verdict {
    if let Err(reason) = rewrite(ctx, (eth, ip), l4, (&ep.gateway_mac, &hop.mac), (t, diffs)) {
        return Verdict::Drop(reason);
    }
    match overlay::encapsulate(ctx, provider, hop.ifindex) {
        Ok(verdict) => {
            metering::traffic(
                ep.slot,
                Direction::FromGuest,
                TrafficClass::Exposure,
                pkt.len,
            );
            verdict
        }
        Err(reason) => Verdict::Drop(reason),
    }
}

/// What a flow needs of its grant's service.
#[derive(Clone, Copy)]
struct Granted {
    grant: u32,
    provider: u32,
    nat_ipv4: u32,
}

/// An established consumer flow as its `FLOWS_RECENT` slot had it (read whole between the
/// slot's sequence checks).
struct Cached {
    service: Granted,
    backend_ipv4: u32,
    backend_ifindex: u32,
    held: (u32, u64),
    credit: u16,
    backend_port: u16,
    nat_port: u16,
    diffs: Diffs,
}

/// An established consumer flow delivered from its `FLOWS_RECENT` slot, if the slot, read
/// untorn, matches the flow exactly and was admitted under the grant the VIP's route names
/// now (`route_grant`; 0: unknown, no fast path), the flow still holds its NAT port (the
/// reservation version) and its backend's device is still the backend's
/// (`ENDPOINT_CACHE`); its credit is taken by one or, spent, renewed by [`refresh`]. `None`:
/// the tables decide.
#[inline(always)]
fn from_cache(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    ep: &EndpointInfo,
    l4: &L4,
    key: &FlowKey,
    route_grant: u32,
) -> Option<Verdict> {
    if route_grant == 0 {
        return None;
    }
    let s = FLOWS_RECENT.get_ptr_mut(cache_slot(key))?;
    // SAFETY: a value of an array (never freed), read between its sequence checks (see
    // `flowcache`); the credit store is outside them (a stale credit only moves a refresh).
    let c = unsafe {
        let seq = core::ptr::addr_of_mut!((*s).seq);
        let begun = read_begin(seq)?;
        if (*s).grant != route_grant || !same_key(&(*s).key, key) {
            return None;
        }
        let c = Cached {
            service: Granted {
                grant: (*s).grant,
                provider: (*s).provider,
                nat_ipv4: (*s).nat_ipv4,
            },
            backend_ipv4: (*s).backend_ipv4,
            backend_ifindex: (*s).backend_ifindex,
            held: ((*s).held_slot as u32, (*s).held_version),
            credit: (*s).credit,
            backend_port: (*s).backend_port,
            nat_port: (*s).nat_port,
            diffs: Diffs {
                addresses: (*s).addresses_diff,
                ports: (*s).ports_diff,
            },
        };
        if !read_valid(seq, begun) {
            return None;
        }
        c
    };
    if !still_held(&FLOWS_HELD, c.held) {
        return None;
    }
    let info = endpoint::cached(c.backend_ifindex)?;
    if info.cloud != c.service.provider || info.ipv4 != c.backend_ipv4 {
        return None;
    }
    if c.credit != 0 {
        // SAFETY: as above.
        unsafe { (*s).credit = c.credit - 1 };
    } else if !refresh(key, s, &c) {
        return None;
    }
    let w = Rewrite {
        src: (key.src_ipv4, c.service.nat_ipv4),
        dst: (key.dst_ipv4, c.backend_ipv4),
        src_port: (l4.src_port, c.nat_port),
        dst_port: (l4.dst_port, c.backend_port),
    };
    Some(deliver_to(
        ctx,
        pkt,
        (eth, ip),
        (Some(ep.slot), &ep.gateway_mac),
        l4,
        (c.backend_ifindex, info.slot, &info.mac),
        (&w, c.diffs),
    ))
}

/// Fills the `FLOWS_RECENT` slot of `key`, with the backend's device, the translation's
/// checksum differences and the reservation version read before its hold was confirmed.
#[inline(always)]
fn remember_recent(
    key: &FlowKey,
    service: &Granted,
    flow: &FlowOut,
    (backend_ifindex, diffs): (u32, Diffs),
    (held_slot, held_version): (u32, u64),
) {
    if let Some(s) = FLOWS_RECENT.get_ptr_mut(cache_slot(key)) {
        // SAFETY: a value of an array (never freed), written under its sequence word (see
        // `flowcache`).
        unsafe {
            write_slot(
                core::ptr::addr_of_mut!((*s).seq),
                core::ptr::addr_of_mut!((*s).key),
                || {
                    write_key(core::ptr::addr_of_mut!((*s).key), key);
                    (*s).grant = service.grant;
                    (*s).provider = service.provider;
                    (*s).nat_ipv4 = service.nat_ipv4;
                    (*s).backend_ipv4 = flow.backend_ipv4;
                    (*s).backend_ifindex = backend_ifindex;
                    (*s).held_slot = held_slot as u16;
                    (*s).held_version = held_version;
                    (*s).backend_port = flow.backend_port;
                    (*s).nat_port = flow.nat_port;
                    (*s).addresses_diff = diffs.addresses;
                    (*s).ports_diff = diffs.ports;
                    (*s).credit = CACHE_CREDIT;
                },
            );
        }
    }
}

/// Confirms a cached flow whose credit ran out against the tables, as every packet of it did
/// before it was cached: `FLOWS_OUT` still holds it as cached, and `FLOWS_IN` still names it
/// as its NAT port's holder (both lookups mark the entries used, so a flow active in either
/// direction keeps both). Then its slot gets a new credit and the reservation version read
/// before the confirmation. `VIPS` and the backend's route are not needed: the grant and the
/// backend's device are checked on every packet. False: the flow takes the tables' path.
/// The slot is written under its sequence word, and only if it still holds `key`.
#[inline(always)]
fn refresh(key: &FlowKey, s: *mut FlowRecent, c: &Cached) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(flow) = (unsafe { FLOWS_OUT.get(key) }).copied() else {
        return false;
    };
    if flow.grant != c.service.grant
        || flow.backend_ipv4 != c.backend_ipv4
        || flow.backend_port != c.backend_port
        || flow.nat_port != c.nat_port
    {
        return false;
    }
    let Some((_, version)) = holds_nat_port(key, &c.service, &flow) else {
        return false;
    };
    // SAFETY: `s` is a value of an array (never freed), written under its sequence word (see
    // `flowcache`).
    unsafe {
        write_slot(
            core::ptr::addr_of_mut!((*s).seq),
            core::ptr::addr_of_mut!((*s).key),
            || {
                if same_key(&(*s).key, key) {
                    (*s).held_version = version;
                    (*s).credit = CACHE_CREDIT;
                }
            },
        );
    }
    true
}

/// Empties the `FLOWS_RECENT` slot of `key` if it holds `key`.
#[inline(always)]
fn forget_recent(key: &FlowKey) {
    if let Some(s) = FLOWS_RECENT.get_ptr_mut(cache_slot(key)) {
        // SAFETY: as in `remember_recent`.
        unsafe {
            if same_key(&(*s).key, key) {
                (*s).credit = 0;
            }
        }
    }
}

/// The provider-side half of a consumer flow: `FLOWS_IN`'s key for the backend's replies to
/// the flow's NAT port, and the value that sends them back to the consumer.
#[inline(always)]
fn reply_half(
    key: &FlowKey,
    service: &Granted,
    backend_ipv4: u32,
    backend_port: u16,
    nat_port: u16,
) -> (FlowKey, FlowIn) {
    let reply = flow_key(
        service.provider,
        backend_ipv4,
        service.nat_ipv4,
        backend_port,
        nat_port,
        key.protocol,
    );
    let back = FlowIn {
        grant: service.grant,
        consumer_cloud: key.cloud,
        consumer_ipv4: key.src_ipv4,
        vip: key.dst_ipv4,
        consumer_port: key.src_port,
        vip_port: key.dst_port,
    };
    (reply, back)
}

/// The reservation version of the flow's NAT port (`held_version`, read first) if the flow
/// `key` → `flow` still holds the port: its `FLOWS_IN` entry exists and sends replies back to
/// this very flow. The lookup also marks the entry used, so a flow active in either direction
/// keeps both halves in the LRU maps.
#[inline(always)]
fn holds_nat_port(key: &FlowKey, service: &Granted, flow: &FlowOut) -> Option<(u32, u64)> {
    let (reply, back) = reply_half(
        key,
        service,
        flow.backend_ipv4,
        flow.backend_port,
        flow.nat_port,
    );
    let version = held_version(&FLOWS_HELD, &reply);
    // SAFETY: the value is only compared.
    unsafe { FLOWS_IN.get(reply) }
        .is_some_and(|f| *f == back)
        .then_some(version)
}

/// Charges a consumer flow about to be opened (or opened again after an eviction: either
/// takes entries in the shared flow tables) to its cloud's new-flow rate, or refuses it (see
/// "New flows per consumer cloud"): a virtual clock (`pace`) with a second of burst, each
/// flow costing `1 s / rate`. A clock that cannot be stored is refused (fail closed; the map
/// is LRU, so only a failed allocation gets there).
#[inline(always)]
fn new_flow_allowed(cloud: u32) -> Result<(), DropReason> {
    let rate = EXPOSURE_FLOW_RATE.get(0).copied().unwrap_or(0);
    let Some(interval_ns) = 1_000_000_000u64.checked_div(rate as u64) else {
        return Ok(());
    };
    let clock = match EXPOSURE_FLOW_CLOCKS.get_ptr_mut(cloud) {
        Some(c) => c,
        None => {
            let _ = EXPOSURE_FLOW_CLOCKS.insert(cloud, 0, BPF_NOEXIST);
            match EXPOSURE_FLOW_CLOCKS.get_ptr_mut(cloud) {
                Some(c) => c,
                None => return Err(DropReason::ExposureFlowRateLimited),
            }
        }
    };
    // SAFETY: a value of this map from a successful lookup, valid for the program run.
    if unsafe { pace::admit(clock, interval_ns, 1_000_000_000) } {
        Ok(())
    } else {
        Err(DropReason::ExposureFlowRateLimited)
    }
}

/// Admits a consumer flow: a new one (`previous` is `None`: backend by flow hash), or one whose
/// NAT port was lost (`previous`: it keeps its backend and, if still free, its NAT port).
/// Writes both flow entries.
#[inline(always)]
fn open_flow(
    key: &FlowKey,
    svc: &VipService,
    service: &Granted,
    previous: Option<FlowOut>,
) -> Result<FlowOut, DropReason> {
    let hash = flow_hash(key);
    let (backend_ipv4, backend_port, first_port) = match previous {
        Some(f) => (f.backend_ipv4, f.backend_port, f.nat_port),
        None => {
            let count = svc.count as u32;
            if count == 0 {
                return Err(DropReason::ExposureNoBackend);
            }
            let index = (hash % count) as usize;
            if index >= MAX_BACKENDS {
                return Err(DropReason::ExposureNoBackend);
            }
            let Some(backend) = svc.backends.get(index) else {
                return Err(DropReason::ExposureNoBackend);
            };
            (backend.ipv4, backend.port, key.src_port)
        }
    };
    // A backend with no live endpoint here gets no flow entries, so it holds no NAT port
    // (an established flow whose backend goes away is dropped in `from_consumer` instead and
    // resumes when the backend returns).
    if route::lookup(svc.provider, backend_ipv4)
        .is_none_or(|h| h.flags != NEXTHOP_ENDPOINT && h.flags != NEXTHOP_REMOTE)
    {
        return Err(DropReason::ExposureNoBackend);
    }
    let (mut reply, back) = reply_half(key, service, backend_ipv4, backend_port, first_port);
    let mut found = false;
    for attempt in 0..NAT_PORT_TRIES {
        if attempt > 0 {
            reply.dst_port = nat_port_candidate(hash, attempt).to_be();
        }
        // Only a port no entry holds is taken (`BPF_NOEXIST` is atomic against other CPUs).
        if FLOWS_IN.insert(reply, back, BPF_NOEXIST).is_ok() {
            reserved(&FLOWS_HELD, &reply);
            found = true;
            break;
        }
        // Taken: by this very flow (its `FLOWS_OUT` entry was evicted) it can be reused.
        // SAFETY: the value is only compared.
        if unsafe { FLOWS_IN.get(reply) }.is_some_and(|f| *f == back) {
            found = true;
            break;
        }
    }
    if !found {
        return Err(DropReason::ExposureNatPortsExhausted);
    }
    let flow = FlowOut {
        grant: svc.grant,
        backend_ipv4,
        backend_port,
        nat_port: reply.dst_port,
    };
    if FLOWS_OUT.insert(key, flow, BPF_ANY).is_err() {
        let _ = FLOWS_IN.remove(reply);
        return Err(DropReason::ExposureNatPortsExhausted);
    }
    Ok(flow)
}

#[inline(always)]
fn from_provider(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ep: &EndpointInfo,
    l4: &L4,
    route_grant: u32,
) -> Verdict {
    reply(
        ctx,
        pkt,
        (eth, ip),
        l4,
        (ep.cloud, ep.ipv4),
        Some(ep),
        route_grant,
    )
}

/// From `from_overlay`: a backend of `provider` at `backend` on the sending host replies to
/// this host's NAT address of a grant (whose route names `route_grant`); the frame is
/// translated back to its consumer here as `from_provider` does for a local backend, and
/// metered `exposure` to the consumer (the backend's host metered its side). The sending
/// host did not decrement the TTL (the translation here is the hop).
#[inline(always)]
pub fn from_remote_backend(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    total_len: u16,
    (provider, backend): (u32, u32),
    route_grant: u32,
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    if unsafe { (*ip).ttl } <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded);
    }
    let l4 = match parse_l4(pkt, ip, total_len) {
        Ok(l4) => l4,
        Err(reason) => return Verdict::Drop(reason),
    };
    reply(
        ctx,
        pkt,
        (eth, ip),
        &l4,
        (provider, backend),
        None,
        route_grant,
    )
}

/// A reply of the provider's `sender` (`(provider, address)`) to a NAT address: only replies
/// of tracked flows pass, translated back to their consumer. `from`: the sender's endpoint
/// when it is on this host (metered there too), `None` for a backend on another host.
#[inline(always)]
fn reply(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    l4: &L4,
    (provider, sender): (u32, u32),
    from: Option<&EndpointInfo>,
    route_grant: u32,
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    let nat = unsafe { (*ip).daddr() };
    let key = flow_key(provider, sender, nat, l4.src_port, l4.dst_port, l4.protocol);
    // SAFETY: the value is copied out at once.
    let Some(flow) = (unsafe { FLOWS_IN.get(key) }).copied() else {
        return Verdict::Drop(DropReason::ExposureNoFlow);
    };
    // The grant must still be the VIP's (revocation cuts existing flows): the NAT address's
    // route names it (one NAT address per live grant), else `VIPS` decides.
    let granted = (route_grant != 0 && route_grant == flow.grant)
        // SAFETY: only read.
        || unsafe {
            VIPS.get(RouteKey {
                cloud: flow.consumer_cloud,
                ipv4: flow.vip,
            })
        }
        .is_some_and(|svc| svc.grant == flow.grant && svc.provider == provider);
    if !granted {
        let _ = FLOWS_IN.remove(key);
        return Verdict::Drop(DropReason::ExposureRevoked);
    }
    deliver(
        ctx,
        pkt,
        (eth, ip),
        from,
        l4,
        (flow.consumer_cloud, flow.consumer_ipv4),
        Translation {
            src: (sender, flow.vip),
            dst: (nat, flow.consumer_ipv4),
            src_port: flow.vip_port,
            dst_port: flow.consumer_port,
        }
        .rewrite(l4),
    )
}

/// A translated frame's new addressing; addresses as `(old, new)`.
struct Translation {
    src: (u32, u32),
    dst: (u32, u32),
    src_port: u16,
    dst_port: u16,
}

impl Translation {
    /// A consumer's packet from `consumer` to `vip`, to its backend `(address, port)`, from
    /// the service's NAT address and `nat_port`.
    #[inline(always)]
    fn to_backend(
        (consumer, vip): (u32, u32),
        service: &Granted,
        (backend_ipv4, backend_port): (u32, u16),
        nat_port: u16,
    ) -> Self {
        Translation {
            src: (consumer, service.nat_ipv4),
            dst: (vip, backend_ipv4),
            src_port: nat_port,
            dst_port: backend_port,
        }
    }

    /// The frame's rewrite: the ports of `l4` to this translation's.
    #[inline(always)]
    fn rewrite(&self, l4: &L4) -> Rewrite {
        Rewrite {
            src: self.src,
            dst: self.dst,
            src_port: (l4.src_port, self.src_port),
            dst_port: (l4.dst_port, self.dst_port),
        }
    }
}

/// A reply back to its consumer endpoint `to` (`(cloud, address)`, found in `ROUTES`; not a
/// live endpoint here: `exposure_no_flow`), from the endpoint `from` (`None`: a backend on
/// another host; the frame then gets the consumer's gateway MAC as its source).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    from: Option<&EndpointInfo>,
    l4: &L4,
    to: (u32, u32),
    t: Rewrite,
) -> Verdict {
    let Some(hop) = route::lookup(to.0, to.1) else {
        return Verdict::Drop(DropReason::ExposureNoFlow);
    };
    if hop.flags != NEXTHOP_ENDPOINT {
        return Verdict::Drop(DropReason::ExposureNoFlow);
    }
    let (ifindex, slot, mac) = (hop.ifindex, hop.slot, hop.mac);
    let (from_slot, gateway_mac) = match from {
        Some(ep) => (Some(ep.slot), &ep.gateway_mac),
        None => match endpoint::lookup(ifindex) {
            Some(consumer) => (None, &consumer.gateway_mac),
            None => return Verdict::Drop(DropReason::ExposureNoFlow),
        },
    };
    deliver_to(
        ctx,
        pkt,
        (eth, ip),
        (from_slot, gateway_mac),
        l4,
        (ifindex, slot, &mac),
        (&t, Diffs::of(&t)),
    )
}

/// Rewrites the frame for the endpoint `(ifindex, slot, mac)` with `t` and its checksum
/// differences, from `gateway_mac`, meters it on both endpoints (the sender's slot: `None`
/// when it is on another host) and redirects it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn deliver_to(
    ctx: &TcContext,
    pkt: &Packet,
    (eth, ip): (*mut EthHdr, *mut Ipv4Hdr),
    (from_slot, gateway_mac): (Option<u32>, &[u8; 6]),
    l4: &L4,
    (ifindex, slot, mac): (u32, u32, &[u8; 6]),
    (t, diffs): (&Rewrite, Diffs),
) -> Verdict {
    if let Err(reason) = rewrite(ctx, (eth, ip), l4, (gateway_mac, mac), (t, diffs)) {
        return Verdict::Drop(reason);
    }
    if let Some(from) = from_slot {
        metering::traffic(from, Direction::FromGuest, TrafficClass::Exposure, pkt.len);
    }
    metering::traffic(slot, Direction::ToGuest, TrafficClass::Exposure, pkt.len);
    Verdict::Redirect(ifindex)
}
