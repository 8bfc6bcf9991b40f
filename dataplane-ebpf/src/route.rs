//! In-cloud IPv4 forwarding: `(cloud, destination)` → next hop, MAC rewrite, TTL decrement,
//! redirect.
//!
//! A destination without a route is handed back as [`Forward::Outside`] for the `egress`
//! module, which drops it as `no_route_in_cloud` unless it is outside the cloud's range and
//! its policy lets it out.
//!
//! A next hop that is not an endpoint (a granted service's VIP, a NAT source) is handed back to
//! the program's entry as [`Forward::Service`], which passes it to the `exposure` module:
//! `exposure` looks routes up here, so `route` must not call into `exposure` (no import
//! circle between features). An endpoint on another host is handed back as
//! [`Forward::Remote`], already rewritten as for a local one, for the `overlay` module.

use atoll_dataplane_common::{
    Direction, DropReason, EndpointInfo, NextHop, RouteKey, TrafficClass, NEXTHOP_ENDPOINT,
    NEXTHOP_REMOTE, NEXTHOP_REMOTE_NAT,
};
use aya_ebpf::{macros::map, maps::HashMap, programs::TcContext};

use crate::{
    gateway, metering,
    packet::{self, EthHdr, Ipv4Hdr, Packet},
    Verdict,
};

/// `(cloud, IPv4)` → destination endpoint. The cloud in the key is always the *sender's*
/// cloud (taken from its device), which is what isolates clouds.
#[map]
pub static ROUTES: HashMap<RouteKey, NextHop> = HashMap::with_max_entries(65536, 0);

#[inline(always)]
pub fn lookup(cloud: u32, ipv4: u32) -> Option<&'static NextHop> {
    // SAFETY: valid for the program run; entries are never rewritten in place (see
    // endpoint::lookup).
    unsafe { ROUTES.get(RouteKey { cloud, ipv4 }) }
}

/// What [`forward_ipv4`] decided.
pub enum Forward {
    /// Forwarded, answered or dropped here.
    Done(Verdict),
    /// No route in the sender's cloud: outside its range, it is `egress`'s to decide.
    Outside { ip: *mut Ipv4Hdr, total_len: u16 },
    /// The destination is a service (`NextHop::flags`): translation is `exposure`'s.
    Service {
        ip: *mut Ipv4Hdr,
        total_len: u16,
        flags: u16,
        /// The grant the address belongs to (`NextHop::ifindex` of an exposure address).
        grant: u32,
    },
    /// An endpoint of the sender's cloud on another host, or a consumer host's NAT address of
    /// a grant ([`NEXTHOP_REMOTE_NAT`]), the frame rewritten for it (MACs; the TTL only for an
    /// endpoint: a NAT address's host translates, which is the hop): the `overlay` module
    /// encapsulates and meters it.
    Remote { hop: &'static NextHop },
}

impl From<Verdict> for Forward {
    #[inline(always)]
    fn from(v: Verdict) -> Self {
        Forward::Done(v)
    }
}

#[inline(always)]
pub fn forward_ipv4(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ep: &EndpointInfo,
    ifindex: u32,
) -> Forward {
    // SAFETY: `eth` was bounds-checked by the caller.
    let dst_mac = unsafe { &(*eth).dst };
    if packet::is_group_mac(dst_mac) {
        return Verdict::Drop(DropReason::GroupDestinationMac).into();
    }
    if !packet::mac_eq(dst_mac, &ep.gateway_mac) {
        return Verdict::Drop(DropReason::NotToGatewayMac).into();
    }
    let Some(ip) = pkt.ptr::<Ipv4Hdr>(EthHdr::LEN) else {
        return Verdict::Drop(DropReason::Ipv4Truncated).into();
    };
    // SAFETY: `ip` was bounds-checked by `Packet::ptr`; all reads below stay inside it.
    let (version_ihl, total_len, saddr, daddr, ttl) = unsafe {
        let h = &*ip;
        (h.version_ihl, h.total_len(), h.saddr(), h.daddr(), h.ttl)
    };
    if version_ihl >> 4 != 4 || version_ihl & 0x0F < 5 {
        return Verdict::Drop(DropReason::Ipv4Malformed).into();
    }
    if version_ihl & 0x0F != 5 {
        return Verdict::Drop(DropReason::Ipv4Options).into();
    }
    if (total_len as usize) < Ipv4Hdr::LEN {
        return Verdict::Drop(DropReason::Ipv4Malformed).into();
    }
    if EthHdr::LEN + total_len as usize > pkt.len as usize {
        return Verdict::Drop(DropReason::Ipv4Truncated).into();
    }
    if saddr != ep.ipv4 {
        return Verdict::Drop(DropReason::SpoofedSourceIp).into();
    }
    let first_octet = daddr.to_ne_bytes()[0];
    if daddr == u32::MAX || first_octet & 0xF0 == 0xE0 {
        return Verdict::Drop(DropReason::GroupDestinationIp).into();
    }
    if daddr == ep.gateway_ipv4 {
        return gateway::answer(ctx, pkt, eth, ip, total_len, ep, ifindex).into();
    }
    if ttl <= 1 {
        return Verdict::Drop(DropReason::TtlExceeded).into();
    }
    let Some(hop) = lookup(ep.cloud, daddr) else {
        return Forward::Outside { ip, total_len };
    };
    if hop.flags == NEXTHOP_REMOTE {
        rewrite_for(eth, ip, ep, hop, ttl);
        return Forward::Remote { hop };
    }
    if hop.flags == NEXTHOP_REMOTE_NAT {
        // SAFETY: `eth` is a bounds-checked pointer into this frame; the program may write.
        unsafe {
            packet::write_mac(&mut (*eth).src, &ep.gateway_mac);
            packet::write_mac(&mut (*eth).dst, &hop.mac);
        }
        return Forward::Remote { hop };
    }
    if hop.flags != NEXTHOP_ENDPOINT {
        return Forward::Service {
            ip,
            total_len,
            flags: hop.flags,
            grant: hop.ifindex,
        };
    }
    metering::traffic(
        ep.slot,
        Direction::FromGuest,
        TrafficClass::IntraCloud,
        pkt.len,
    );
    metering::traffic(
        hop.slot,
        Direction::ToGuest,
        TrafficClass::IntraCloud,
        pkt.len,
    );
    rewrite_for(eth, ip, ep, hop, ttl);
    Forward::Done(Verdict::Redirect(hop.ifindex))
}

/// Rewrites a frame for its next hop: from the gateway to the destination guest's MAC, the
/// TTL (`ttl`, above 1) one less, as on any routed hop.
#[inline(always)]
fn rewrite_for(eth: *mut EthHdr, ip: *mut Ipv4Hdr, ep: &EndpointInfo, hop: &NextHop, ttl: u8) {
    // SAFETY: `eth` and `ip` are bounds-checked pointers into this frame; the program may write
    // to the frame (TC direct packet access unclones the skb first).
    unsafe {
        packet::write_mac(&mut (*eth).src, &ep.gateway_mac);
        packet::write_mac(&mut (*eth).dst, &hop.mac);
        (*ip).ttl = ttl - 1;
        // TTL is the high byte of its 16-bit word: the word drops by 0x0100, so the checksum
        // grows by 0x0100 in wire order.
        (*ip).check = packet::csum_add_be((*ip).check, u16::from_ne_bytes([0x01, 0x00]));
    }
}
