//! The gateway address itself: answers ICMP echo (so `ping <gateway>` works as guests expect)
//! and hands UDP/TCP to [`dns::to_server`] (DNS on port 53); every other packet to the gateway
//! is dropped as a service not offered.

use atoll_dataplane_common::{Direction, DropReason, EndpointInfo, TrafficClass};

use aya_ebpf::programs::TcContext;

use crate::{
    dns, metering,
    packet::{self, EthHdr, IcmpEcho, Ipv4Hdr, Packet, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    Verdict,
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    total_len: u16,
    ep: &EndpointInfo,
    ifindex: u32,
) -> Verdict {
    // SAFETY: `ip` was bounds-checked by the caller.
    let (protocol, fragment) = unsafe { ((*ip).protocol, (*ip).is_fragment()) };
    if protocol == IPPROTO_UDP || protocol == IPPROTO_TCP {
        return dns::to_server(ctx, pkt, eth, ip, total_len, protocol, ep);
    }
    if protocol != IPPROTO_ICMP {
        return Verdict::Drop(DropReason::GatewayServiceUnavailable);
    }
    let Some(icmp) = pkt.ptr::<IcmpEcho>(EthHdr::LEN + Ipv4Hdr::LEN) else {
        return Verdict::Drop(DropReason::GatewayIcmpMalformed);
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let icmp = unsafe { &mut *icmp };
    // The echo header must lie inside the IPv4 packet, not just inside the frame (Ethernet
    // padding after a short packet is not ICMP).
    let short = (total_len as usize) < Ipv4Hdr::LEN + core::mem::size_of::<IcmpEcho>();
    if fragment || short || icmp.icmp_type != ICMP_ECHO_REQUEST || icmp.code != 0 {
        return Verdict::Drop(DropReason::GatewayIcmpMalformed);
    }
    icmp.icmp_type = ICMP_ECHO_REPLY;
    // The type/code word drops by 0x0800, so the checksum grows by 0x0800 (wire order).
    icmp.check = packet::csum_add_be(icmp.check, u16::from_ne_bytes([0x08, 0x00]));
    // SAFETY: `eth` and `ip` are bounds-checked pointers into this frame. Swapping source and
    // destination addresses leaves the IPv4 header checksum unchanged.
    unsafe {
        let h = &mut *ip;
        let (saddr, daddr) = (h.saddr(), h.daddr());
        packet::write_ipv4(&mut h.saddr, daddr.to_ne_bytes());
        packet::write_ipv4(&mut h.daddr, saddr.to_ne_bytes());
        packet::write_mac(&mut (*eth).dst, &ep.mac);
        packet::write_mac(&mut (*eth).src, &ep.gateway_mac);
    }
    // Request and answer are both traffic with the host's services.
    metering::traffic(ep.slot, Direction::FromGuest, TrafficClass::Host, pkt.len);
    metering::traffic(ep.slot, Direction::ToGuest, TrafficClass::Host, pkt.len);
    Verdict::Redirect(ifindex)
}
