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
//! - **ICMP is not translated** (`exposure_icmp`): echo to a VIP is not a service, and ICMP
//!   errors would need their embedded headers translated. Within one host every device has the
//!   same MTU, so no fragmentation-needed error can arise on this path; a TCP or UDP socket
//!   learns of an unreachable backend by its own timeout or a TCP reset.
//! - **Fragments are dropped** (`exposure_l4_malformed`): only the first one carries ports.
//! - Checksums: the IPv4 header's is computed in the program, the transport's is updated
//!   with two calls of the kernel's helper with precomputed differences, one for the
//!   addresses and one for the ports (see `packet::rewrite`), so frames with partial
//!   checksums (veth guests, VMMs with offloads) stay valid; the TTL is decremented as on any
//!   routed hop.
//! - Metering: both endpoints count the frame as [`TrafficClass::Exposure`], the sender "from
//!   guest" and the receiver "to guest".

use atoll_dataplane_common::{
    flow_hash, nat_port_candidate, Direction, DropReason, EndpointInfo, FlowIn, FlowKey, FlowOut,
    RouteKey, TrafficClass, VipService, MAX_BACKENDS, NAT_PORT_TRIES, NEXTHOP_ENDPOINT,
    NEXTHOP_NAT_SOURCE, NEXTHOP_VIP,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};

use crate::{
    metering,
    packet::{self, EthHdr, Ipv4Hdr, Packet, Ports, Rewrite, IPPROTO_ICMP},
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
    hop_flags: u16,
) -> Verdict {
    let l4 = match parse_l4(pkt, ip, total_len) {
        Ok(l4) => l4,
        Err(reason) => return Verdict::Drop(reason),
    };
    match hop_flags {
        NEXTHOP_VIP => from_consumer(ctx, pkt, eth, ip, ep, &l4),
        NEXTHOP_NAT_SOURCE => from_provider(ctx, pkt, eth, ip, ep, &l4),
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

/// True if both keys are the same flow (field by field: an array compare of the padding
/// would compile to a `memcmp` loop).
#[inline(always)]
pub(crate) fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    a.cloud == b.cloud
        && a.src_ipv4 == b.src_ipv4
        && a.dst_ipv4 == b.dst_ipv4
        && a.src_port == b.src_port
        && a.dst_port == b.dst_port
        && a.protocol == b.protocol
}

/// Stores `key` at `dst` field by field (a struct copy with the padding array compiles to a
/// byte-looping `memcpy`).
///
/// # Safety
/// `dst` must be valid for writes (a map value from a successful lookup).
#[inline(always)]
pub(crate) unsafe fn write_key(dst: *mut FlowKey, key: &FlowKey) {
    // SAFETY: the caller guarantees `dst` is writable.
    unsafe {
        (*dst).cloud = key.cloud;
        (*dst).src_ipv4 = key.src_ipv4;
        (*dst).dst_ipv4 = key.dst_ipv4;
        (*dst).src_port = key.src_port;
        (*dst).dst_port = key.dst_port;
        (*dst).protocol = key.protocol;
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
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    let vip = unsafe { (*ip).daddr() };
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
    let key = flow_key(
        ep.cloud,
        ep.ipv4,
        vip,
        l4.src_port,
        l4.dst_port,
        l4.protocol,
    );
    // SAFETY: the value is copied out at once.
    let flow = match unsafe { FLOWS_OUT.get(key) }.copied() {
        Some(f) if f.grant != svc.grant => {
            let _ = FLOWS_OUT.remove(key);
            return Verdict::Drop(DropReason::ExposureRevoked);
        }
        Some(f) if holds_nat_port(&key, svc, &f) => f,
        // The reply half was evicted, or its NAT port now belongs to another flow: this flow
        // is dead and is opened again (see "A NAT port has one holder" in the module docs).
        previous => match open_flow(&key, svc, previous) {
            Ok(f) => f,
            Err(reason) => return Verdict::Drop(reason),
        },
    };
    deliver(
        ctx,
        pkt,
        eth,
        ip,
        ep,
        l4,
        Translation {
            to: (svc.provider, flow.backend_ipv4),
            missing: DropReason::ExposureNoBackend,
            src: (ep.ipv4, svc.nat_ipv4),
            dst: (vip, flow.backend_ipv4),
            src_port: flow.nat_port,
            dst_port: flow.backend_port,
        },
    )
}

/// The provider-side half of a consumer flow: `FLOWS_IN`'s key for the backend's replies to
/// the flow's NAT port, and the value that sends them back to the consumer.
#[inline(always)]
fn reply_half(
    key: &FlowKey,
    svc: &VipService,
    backend_ipv4: u32,
    backend_port: u16,
    nat_port: u16,
) -> (FlowKey, FlowIn) {
    let reply = flow_key(
        svc.provider,
        backend_ipv4,
        svc.nat_ipv4,
        backend_port,
        nat_port,
        key.protocol,
    );
    let back = FlowIn {
        grant: svc.grant,
        consumer_cloud: key.cloud,
        consumer_ipv4: key.src_ipv4,
        vip: key.dst_ipv4,
        consumer_port: key.src_port,
        vip_port: key.dst_port,
    };
    (reply, back)
}

/// True if the flow `key` → `flow` still holds its NAT port: its `FLOWS_IN` entry exists and
/// sends replies back to this very flow. The lookup also marks the entry used, so a flow
/// active in either direction keeps both halves in the LRU maps.
#[inline(always)]
fn holds_nat_port(key: &FlowKey, svc: &VipService, flow: &FlowOut) -> bool {
    let (reply, back) = reply_half(
        key,
        svc,
        flow.backend_ipv4,
        flow.backend_port,
        flow.nat_port,
    );
    // SAFETY: the value is only compared.
    unsafe { FLOWS_IN.get(reply) }.is_some_and(|f| *f == back)
}

/// Admits a consumer flow: a new one (`previous` is `None`: backend by flow hash), or one whose
/// NAT port was lost (`previous`: it keeps its backend and, if still free, its NAT port).
/// Writes both flow entries.
#[inline(always)]
fn open_flow(
    key: &FlowKey,
    svc: &VipService,
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
    // (an established flow whose backend goes away is dropped in `deliver` instead and
    // resumes when the backend returns).
    if route::lookup(svc.provider, backend_ipv4).is_none_or(|h| h.flags != NEXTHOP_ENDPOINT) {
        return Err(DropReason::ExposureNoBackend);
    }
    let (mut reply, back) = reply_half(key, svc, backend_ipv4, backend_port, first_port);
    let mut found = false;
    for attempt in 0..NAT_PORT_TRIES {
        if attempt > 0 {
            reply.dst_port = nat_port_candidate(hash, attempt).to_be();
        }
        // Only a port no entry holds is taken (`BPF_NOEXIST` is atomic against other CPUs).
        if FLOWS_IN.insert(reply, back, BPF_NOEXIST).is_ok() {
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
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    let nat = unsafe { (*ip).daddr() };
    let key = flow_key(
        ep.cloud,
        ep.ipv4,
        nat,
        l4.src_port,
        l4.dst_port,
        l4.protocol,
    );
    // SAFETY: the value is copied out at once.
    let Some(flow) = (unsafe { FLOWS_IN.get(key) }).copied() else {
        return Verdict::Drop(DropReason::ExposureNoFlow);
    };
    // The grant must still be the VIP's (revocation cuts existing flows).
    // SAFETY: only read.
    let granted = unsafe {
        VIPS.get(RouteKey {
            cloud: flow.consumer_cloud,
            ipv4: flow.vip,
        })
    }
    .is_some_and(|svc| svc.grant == flow.grant && svc.provider == ep.cloud);
    if !granted {
        let _ = FLOWS_IN.remove(key);
        return Verdict::Drop(DropReason::ExposureRevoked);
    }
    deliver(
        ctx,
        pkt,
        eth,
        ip,
        ep,
        l4,
        Translation {
            to: (flow.consumer_cloud, flow.consumer_ipv4),
            missing: DropReason::ExposureNoFlow,
            src: (ep.ipv4, flow.vip),
            dst: (nat, flow.consumer_ipv4),
            src_port: flow.vip_port,
            dst_port: flow.consumer_port,
        },
    )
}

/// Where a translated frame goes and its new addressing; addresses as `(old, new)`.
struct Translation {
    /// The receiving endpoint `(cloud, address)`, found in `ROUTES`.
    to: (u32, u32),
    /// Why the frame is dropped if the receiver is not a live endpoint on this host.
    missing: DropReason,
    src: (u32, u32),
    dst: (u32, u32),
    src_port: u16,
    dst_port: u16,
}

/// Rewrites the frame for its receiver, meters it on both endpoints and redirects it.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ep: &EndpointInfo,
    l4: &L4,
    t: Translation,
) -> Verdict {
    let Some(hop) = route::lookup(t.to.0, t.to.1) else {
        return Verdict::Drop(t.missing);
    };
    if hop.flags != NEXTHOP_ENDPOINT {
        return Verdict::Drop(t.missing);
    }
    let (ifindex, slot, mac) = (hop.ifindex, hop.slot, hop.mac);
    if !rewrite(ctx, eth, ip, l4, (&ep.gateway_mac, &mac), &t) {
        return Verdict::Drop(DropReason::ExposureRewriteFailed);
    }
    metering::traffic(
        ep.slot,
        Direction::FromGuest,
        TrafficClass::Exposure,
        pkt.len,
    );
    metering::traffic(slot, Direction::ToGuest, TrafficClass::Exposure, pkt.len);
    Verdict::Redirect(ifindex)
}

/// Writes the translation into the frame (see [`packet::rewrite`]).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    l4: &L4,
    macs: (&[u8; 6], &[u8; 6]),
    w: &Translation,
) -> bool {
    let r = Rewrite {
        src: w.src,
        dst: w.dst,
        src_port: (l4.src_port, w.src_port),
        dst_port: (l4.dst_port, w.dst_port),
    };
    // SAFETY: `eth`, `ip` and `l4.ports` are bounds-checked pointers into this frame and no
    // helper has run since they were derived.
    unsafe {
        packet::rewrite(
            ctx,
            eth,
            ip,
            l4.ports,
            Some(macs),
            l4.protocol,
            l4.check_offset,
            &r,
        )
    }
}
