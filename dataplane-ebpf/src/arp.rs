//! ARP responder: the guest's only L2 neighbour is the gateway.
//!
//! Requests for the gateway address and for addresses of the guest's own cloud are answered
//! with the gateway MAC (all in-cloud peers are reached through the gateway, so a guest may
//! treat its whole subnet as on-link). Nothing else is answered, and no ARP frame is ever
//! forwarded to another endpoint: there is no broadcast domain.

use atoll_dataplane_common::{Direction, DropReason, EndpointInfo, TrafficClass};

use crate::{
    metering,
    packet::{self, ArpEthIpv4, EthHdr, Packet},
    route, Verdict,
};

const ARP_HTYPE_ETHERNET: [u8; 2] = [0, 1];
const ARP_PTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ARP_OP_REQUEST: [u8; 2] = [0, 1];
const ARP_OP_REPLY: [u8; 2] = [0, 2];

#[inline(always)]
pub fn answer(pkt: &Packet, eth: *mut EthHdr, ep: &EndpointInfo, ifindex: u32) -> Verdict {
    // SAFETY: bounds-checked by the caller.
    let dst_mac = unsafe { &(*eth).dst };
    if !packet::is_broadcast_mac(dst_mac) && !packet::mac_eq(dst_mac, &ep.gateway_mac) {
        return Verdict::Drop(if packet::is_group_mac(dst_mac) {
            DropReason::GroupDestinationMac
        } else {
            DropReason::NotToGatewayMac
        });
    }
    let Some(arp) = pkt.ptr::<ArpEthIpv4>(EthHdr::LEN) else {
        return Verdict::Drop(DropReason::ArpMalformed);
    };
    // SAFETY: `arp` was bounds-checked by `Packet::ptr`.
    let a = unsafe { &mut *arp };
    if a.htype != ARP_HTYPE_ETHERNET || a.ptype != ARP_PTYPE_IPV4 || a.hlen != 6 || a.plen != 4 {
        return Verdict::Drop(DropReason::ArpMalformed);
    }
    let spa = u32::from_ne_bytes(a.spa);
    let tpa = u32::from_ne_bytes(a.tpa);
    // Replies, gratuitous announcements (target == sender) and RFC 5227 probes (sender 0.0.0.0)
    // resolve nothing; answering a probe would make the guest believe its address is taken.
    if a.op != ARP_OP_REQUEST || spa == 0 || spa == tpa {
        return Verdict::Drop(DropReason::ArpNotRequest);
    }
    if spa != ep.ipv4 || !packet::mac_eq(&a.sha, &ep.mac) {
        return Verdict::Drop(DropReason::ArpSpoofed);
    }
    if tpa != ep.gateway_ipv4 && route::lookup(ep.cloud, tpa).is_none() {
        return Verdict::Drop(DropReason::ArpUnknownTarget);
    }
    // Turn the request into the reply in place and send it back out of the same device.
    a.op = ARP_OP_REPLY;
    packet::write_mac(&mut a.tha, &ep.mac);
    packet::write_ipv4(&mut a.tpa, spa.to_ne_bytes());
    packet::write_mac(&mut a.sha, &ep.gateway_mac);
    packet::write_ipv4(&mut a.spa, tpa.to_ne_bytes());
    // SAFETY: bounds-checked by the caller.
    unsafe {
        packet::write_mac(&mut (*eth).dst, &ep.mac);
        packet::write_mac(&mut (*eth).src, &ep.gateway_mac);
    }
    // Request and answer are both traffic with the host's services.
    metering::traffic(ep.slot, Direction::FromGuest, TrafficClass::Host, pkt.len);
    metering::traffic(ep.slot, Direction::ToGuest, TrafficClass::Host, pkt.len);
    Verdict::Redirect(ifindex)
}
