//! DNS at the gateway address: stateless translation between a guest and the host's DNS server.
//!
//! Guests send DNS (UDP and TCP, port 53) to their gateway address. Clouds use overlapping
//! addresses, so the host cannot receive these on the gateway address itself, and the server
//! must know *which endpoint* asks (split horizon), not just its address. So:
//!
//! - [`to_server`] (from `from_vm`, after the anti-spoofing checks, for UDP/TCP to the gateway):
//!   `guest:port → gateway:53` becomes `proxy(slot):port → server:53`, where `proxy(slot)` is
//!   the asking endpoint's own address in atoll's DNS namespace (`proxy_base + slot`), and the
//!   frame is redirected to the host-side DNS device, whose peer lives in that namespace.
//! - [`try_from_dns`] (TC ingress of the host-side DNS device, i.e. what leaves the DNS
//!   namespace): `server:53 → proxy(slot):port` becomes `gateway:53 → guest:port`, and the frame
//!   is redirected to the endpoint's device (whose `to_vm` checks it as any other delivery).
//!
//! Decisions:
//! - **Stateless.** The slot is encoded in the proxy address, so no connection table exists and
//!   TCP works like UDP. `SLOT_ENDPOINTS` maps a slot back to its endpoint's ifindex; the
//!   endpoint's identity (which must carry that slot) supplies address, gateway and MACs.
//! - **Checksums with the kernel's helpers.** Addresses are written in place, then
//!   `bpf_l3_csum_replace` fixes the IPv4 header and `bpf_l4_csum_replace` with
//!   `BPF_F_PSEUDO_HDR` the UDP/TCP checksum, exactly as the kernel's own NAT does. This keeps
//!   frames with a partial checksum (`CHECKSUM_PARTIAL`, what veth guests and the DNS namespace
//!   send) correct: the helper adjusts the pseudo-header sum the checksum field then holds. For
//!   UDP `BPF_F_MARK_MANGLED_0` leaves a zero ("no checksum") untouched and never produces one.
//! - TTL is not touched (the guest talks to its gateway, no hop is crossed).
//! - Only the gateway branch of `from_vm` reaches this module: forwarding of other traffic pays
//!   nothing for DNS.

use atoll_dataplane_common::{
    Direction, DnsService, DropReason, EndpointInfo, TrafficClass, DNS_PORT,
};
use aya_ebpf::{macros::map, maps::Array, programs::TcContext};

use crate::{
    endpoint, metering,
    packet::{
        self, fix_address_checksums, l4_layout, EthHdr, Ipv4Hdr, Packet, Ports, ETH_P_IP, L4_OFFSET,
    },
    Verdict,
};

/// Where DNS goes (one entry, written by the agent; zeroed = no DNS service).
#[map]
pub static DNS_SERVICE: Array<DnsService> = Array::with_max_entries(1, 0);

/// Counter slot → host-side ifindex of the endpoint holding it (0: none). Sized by the agent to
/// `max_endpoints`; written by `Dataplane::insert_endpoint` / `remove_endpoint`.
#[map]
pub static SLOT_ENDPOINTS: Array<u32> = Array::with_max_entries(65536, 0);

#[inline(always)]
fn service() -> Option<&'static DnsService> {
    DNS_SERVICE.get(0).filter(|s| s.ifindex != 0)
}

/// UDP or TCP from a guest to its gateway (the caller checked the guest's identity, the IPv4
/// header and that `total_len` fits in the frame). Port 53 goes to the DNS server; anything
/// else is a service the gateway does not offer.
#[inline(always)]
pub fn to_server(
    ctx: &TcContext,
    pkt: &Packet,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    total_len: u16,
    protocol: u8,
    ep: &EndpointInfo,
) -> Verdict {
    let Some((l4_len, check_offset)) = l4_layout(protocol) else {
        return Verdict::Drop(DropReason::GatewayServiceUnavailable);
    };
    // SAFETY: `ip` was bounds-checked by the caller.
    let fragment = unsafe { (*ip).is_fragment() };
    // The transport header must lie inside the IPv4 packet, not in Ethernet padding.
    if fragment || (total_len as usize) < Ipv4Hdr::LEN + l4_len {
        return Verdict::Drop(DropReason::GatewayL4Malformed);
    }
    let Some(ports) = pkt.ptr::<Ports>(L4_OFFSET) else {
        return Verdict::Drop(DropReason::GatewayL4Malformed);
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let dst_port = u16::from_be_bytes(unsafe { (*ports).dst });
    if dst_port != DNS_PORT {
        return Verdict::Drop(DropReason::GatewayServiceUnavailable);
    }
    let Some(svc) = service() else {
        return Verdict::Drop(DropReason::GatewayServiceUnavailable);
    };
    if ep.slot >= svc.proxy_count {
        return Verdict::Drop(DropReason::GatewayServiceUnavailable);
    }
    let proxy = u32::from_be(svc.proxy_base).wrapping_add(ep.slot).to_be();
    // SAFETY: `eth` and `ip` are bounds-checked pointers into this frame (see route.rs for
    // writes). No helper has run since they were derived.
    unsafe {
        packet::write_mac(&mut (*eth).dst, &svc.server_mac);
        packet::write_mac(&mut (*eth).src, &svc.device_mac);
        packet::write_ipv4(&mut (*ip).saddr, proxy.to_ne_bytes());
        packet::write_ipv4(&mut (*ip).daddr, svc.server_ipv4.to_ne_bytes());
    }
    // From here on the frame is only touched through helpers (they invalidate packet pointers).
    let fixed = fix_address_checksums(
        ctx,
        protocol,
        check_offset,
        (ep.ipv4, proxy),
        (ep.gateway_ipv4, svc.server_ipv4),
    );
    if !fixed {
        return Verdict::Drop(DropReason::DnsRewriteFailed);
    }
    metering::traffic(ep.slot, Direction::FromGuest, TrafficClass::Host, pkt.len);
    Verdict::Redirect(svc.ifindex)
}

/// Ingress of the host-side DNS device: replies leaving the DNS namespace. Drops are counted
/// host-wide only (no endpoint has been identified when they happen).
#[inline(always)]
pub fn try_from_dns(ctx: &TcContext) -> Verdict {
    let foreign = Verdict::Drop(DropReason::DnsForeignFrame);
    let Some(svc) = service() else {
        return foreign;
    };
    let pkt = Packet::new(ctx);
    let Some(eth) = pkt.ptr::<EthHdr>(0) else {
        return foreign;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return foreign;
    }
    let Some(ip) = pkt.ptr::<Ipv4Hdr>(EthHdr::LEN) else {
        return foreign;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (version_ihl, total_len, fragment, protocol, saddr, daddr) = unsafe {
        let h = &*ip;
        (
            h.version_ihl,
            h.total_len() as usize,
            h.is_fragment(),
            h.protocol,
            h.saddr(),
            h.daddr(),
        )
    };
    let Some((l4_len, check_offset)) = l4_layout(protocol) else {
        return foreign;
    };
    if version_ihl != 0x45
        || fragment
        || total_len < Ipv4Hdr::LEN + l4_len
        || EthHdr::LEN + total_len > pkt.len as usize
        || saddr != svc.server_ipv4
    {
        return foreign;
    }
    let Some(ports) = pkt.ptr::<Ports>(L4_OFFSET) else {
        return foreign;
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    if u16::from_be_bytes(unsafe { (*ports).src }) != DNS_PORT {
        return foreign;
    }
    let slot = u32::from_be(daddr).wrapping_sub(u32::from_be(svc.proxy_base));
    if slot >= svc.proxy_count {
        return foreign;
    }
    let ifindex = match SLOT_ENDPOINTS.get(slot) {
        Some(&i) if i != 0 => i,
        _ => return Verdict::Drop(DropReason::DnsUnknownSlot),
    };
    // The identity must still hold this slot: a stale `SLOT_ENDPOINTS` entry never delivers.
    let ep = match endpoint::lookup(ifindex) {
        Some(ep) if ep.slot == slot => ep,
        _ => return Verdict::Drop(DropReason::DnsUnknownSlot),
    };
    // SAFETY: bounds-checked pointers into this frame; no helper has run yet.
    unsafe {
        packet::write_mac(&mut (*eth).dst, &ep.mac);
        packet::write_mac(&mut (*eth).src, &ep.gateway_mac);
        packet::write_ipv4(&mut (*ip).saddr, ep.gateway_ipv4.to_ne_bytes());
        packet::write_ipv4(&mut (*ip).daddr, ep.ipv4.to_ne_bytes());
    }
    let fixed = fix_address_checksums(
        ctx,
        protocol,
        check_offset,
        (saddr, ep.gateway_ipv4),
        (daddr, ep.ipv4),
    );
    if !fixed {
        return Verdict::Drop(DropReason::DnsRewriteFailed);
    }
    metering::traffic(ep.slot, Direction::ToGuest, TrafficClass::Host, pkt.len);
    Verdict::Redirect(ifindex)
}
