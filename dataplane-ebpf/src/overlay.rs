//! The overlay: one cloud across many hosts, over VXLAN whose network id is the cloud.
//!
//! Every host runs one VXLAN device in external (collect_md) mode; the programs choose the
//! tunnel per packet, so a host needs no device, FDB entry or route per remote host or cloud.
//!
//! **Sending** ([`to_remote`], from `from_vm`): the route lookup every packet makes finds a
//! destination of the sender's cloud on another host ([`NEXTHOP_REMOTE`]: the route carries
//! that host's underlay address and the guest's MAC). The frame is rewritten as for a local
//! endpoint (gateway → guest MAC, TTL one less), the tunnel key (remote underlay address,
//! the cloud's VNI from `CLOUD_VNIS`, this host's underlay address as the outer source) is
//! set and the frame is redirected to the VXLAN device, which encapsulates and routes it on
//! the underlay. Metered `cross_host`, "from guest", on the sender.
//!
//! **Receiving** ([`from_overlay`], TCX ingress of the VXLAN device; the kernel has
//! decapsulated and hands the program the tunnel key): every check is a numbered drop.
//! - the VNI names a cloud of this host (`VNI_CLOUDS`), else `overlay_unknown_vni`;
//! - the outer source is a known host (`OVERLAY_PEERS`), else `overlay_unknown_peer`;
//! - the inner frame is IPv4 without options, else `overlay_malformed`;
//! - the inner source is an address the control plane placed on *that* host: its route in the
//!   cloud is [`NEXTHOP_REMOTE`] naming the outer source, else `overlay_spoofed_source`. A
//!   host cannot speak for another host's VMs, nor for this host's, nor for an address that
//!   is nobody's; the route lookup is the one table that says where each address lives;
//!   The sending host's NAT address of a grant ([`NEXTHOP_REMOTE_NAT`]) passes the same way:
//!   a consumer's flow translated on that host, to a backend here, metered `exposure`;
//! - the destination is an endpoint on this host, else `overlay_not_local`; or, from a guest
//!   of the sending host, a NAT address of this host: a backend's reply, translated back by
//!   the `exposure` module ("Exposures across hosts" there).
//!
//! Then the frame gets the destination endpoint's gateway MAC as its source and is redirected
//! to the endpoint's device, where `to_vm` checks it as any delivery; metered `cross_host`,
//! "to guest", on the receiver. The TTL is not decremented again: the two hosts are one hop.
//!
//! Decisions:
//! - **VXLAN, not Geneve**: this kernel has no Geneve, and VXLAN's 24-bit network id holds a
//!   VNI per live cloud, which the control plane allocates (16.7M live clouds per fleet).
//!   Geneve would carry the same key the same way (`bpf_skb_set_tunnel_key` is shared), so a
//!   host with Geneve could use it behind this module without a change to the checks.
//! - **The underlay is trusted to deliver, not to speak**: a frame's outer source is taken as
//!   the sending host (the underlay is a private network, as AWS's substrate is), but what it
//!   may say is bounded by what the control plane placed on it. The underlay is not encrypted
//!   by atoll (this kernel has neither WireGuard nor IPsec ESP; docs/operations.md says how to
//!   run it over WireGuard where the kernel has it).
//! - **No outer DF**: a frame too big for the underlay after encapsulation is fragmented by the
//!   underlay rather than dropped; guests are given an MTU that leaves room for the 50 bytes of
//!   encapsulation, so this happens only if a guest raises its own MTU.
//! - ARP for a remote address is answered by `from_vm` like for a local one (the route exists);
//!   nothing but IPv4 crosses the overlay.

use atoll_dataplane_common::{
    Direction, DropReason, NextHop, OverlayHost, TrafficClass, NEXTHOP_ENDPOINT,
    NEXTHOP_NAT_SOURCE, NEXTHOP_REMOTE, NEXTHOP_REMOTE_NAT,
};
use aya_ebpf::{
    bindings::bpf_tunnel_key,
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::map,
    maps::{Array, HashMap},
    programs::TcContext,
};

use crate::{
    endpoint, metering,
    packet::{self, EthHdr, Ipv4Hdr, Packet, ETH_P_IP},
    route, Verdict,
};

/// This host's end of the overlay (one entry; all zero: none). Written by the agent.
#[map]
pub static OVERLAY_HOST: Array<OverlayHost> = Array::with_max_entries(1, 0);

/// Cloud → its VNI, for the clouds this host runs. Written by the agent with `VNI_CLOUDS`
/// (sized by the agent: `dataplane.max_endpoints`).
#[map]
pub static CLOUD_VNIS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// VNI → cloud, the reverse of `CLOUD_VNIS`.
#[map]
pub static VNI_CLOUDS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// Underlay address (map order) of every other host this host's clouds span → 1.
#[map]
pub static OVERLAY_PEERS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// `size_of::<bpf_tunnel_key>()`: the whole key, with the local address.
const TUNNEL_KEY_SIZE: u32 = core::mem::size_of::<bpf_tunnel_key>() as u32;

/// Outer TTL of encapsulated frames.
const TUNNEL_TTL: u8 = 64;

/// From `from_vm`: a frame of `cloud` rewritten for the remote endpoint (or consumer host's
/// NAT address) `hop`, encapsulated to its host; metered `cross_host` (`exposure` for a NAT
/// address).
#[inline(always)]
pub fn to_remote(ctx: &TcContext, cloud: u32, slot: u32, len: u32, hop: &NextHop) -> Verdict {
    match encapsulate(ctx, cloud, hop.ifindex) {
        Ok(vxlan) => {
            let class = if hop.flags == NEXTHOP_REMOTE_NAT {
                TrafficClass::Exposure
            } else {
                TrafficClass::CrossHost
            };
            metering::traffic(slot, Direction::FromGuest, class, len);
            Verdict::Redirect(vxlan)
        }
        Err(reason) => Verdict::Drop(reason),
    }
}

/// Sets the tunnel key of a frame of `cloud` to the host at `remote` (underlay address, map
/// order); the VXLAN device to redirect it to. The frame is already rewritten for its
/// destination.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, cloud: u32, remote: u32) -> Result<u32, DropReason> {
    let Some(host) = OVERLAY_HOST.get(0).filter(|h| h.vxlan_ifindex != 0) else {
        return Err(DropReason::OverlayOff);
    };
    // SAFETY: only read.
    let Some(vni) = (unsafe { CLOUD_VNIS.get(cloud) }).copied() else {
        return Err(DropReason::OverlayNoVni);
    };
    // SAFETY: all-zero is a valid `bpf_tunnel_key` (integers and unions of integers).
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The key takes addresses in host byte order; routes and `OverlayHost` hold them as read
    // from the wire (map order).
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(remote);
    key.__bindgen_anon_3.local_ipv4 = u32::from_be(host.underlay_ipv4);
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: `ctx.skb.skb` is the program's context; `key` is a valid key of the size passed.
    let set = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            TUNNEL_KEY_SIZE,
            aya_ebpf::bindings::BPF_F_ZERO_CSUM_TX as u64,
        )
    };
    if set != 0 {
        return Err(DropReason::OverlayTunnelKey);
    }
    Ok(host.vxlan_ifindex)
}

/// What [`from_overlay`] decided.
#[allow(missing_debug_implementations)]
pub enum Arrival {
    /// Delivered or dropped here.
    Done(Verdict),
    /// A provider's backend on the sending host replying to this host's NAT address of a
    /// grant: the `exposure` module translates it back to its consumer.
    ToNat {
        pkt: Packet,
        eth: *mut EthHdr,
        ip: *mut Ipv4Hdr,
        total_len: u16,
        /// The provider cloud (the frame's VNI) and the backend's address.
        provider: u32,
        backend: u32,
        /// The grant the NAT address's route names.
        grant: u32,
    },
}

impl From<DropReason> for Arrival {
    #[inline(always)]
    fn from(reason: DropReason) -> Self {
        Arrival::Done(Verdict::Drop(reason))
    }
}

/// Ingress of the VXLAN device: a decapsulated frame from another host (module docs).
#[inline(always)]
pub fn from_overlay(ctx: &TcContext) -> Arrival {
    // SAFETY: all-zero is a valid `bpf_tunnel_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `ctx.skb.skb` is the program's context; `key` is writable for the size passed.
    let got = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, TUNNEL_KEY_SIZE, 0) };
    if got != 0 {
        return Arrival::from(DropReason::OverlayTunnelKey);
    }
    // SAFETY: only read.
    let Some(cloud) = (unsafe { VNI_CLOUDS.get(key.tunnel_id) }).copied() else {
        return Arrival::from(DropReason::OverlayUnknownVni);
    };
    // SAFETY: an IPv4 tunnel (no `BPF_F_TUNINFO_IPV6`): the union holds `remote_ipv4`.
    let peer = u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 });
    // SAFETY: only read.
    if unsafe { OVERLAY_PEERS.get(peer) }.is_none() {
        return Arrival::from(DropReason::OverlayUnknownPeer);
    }
    let pkt = Packet::new(ctx);
    let Some(eth) = pkt.ptr::<EthHdr>(0) else {
        return Arrival::from(DropReason::OverlayMalformed);
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Arrival::from(DropReason::OverlayMalformed);
    }
    let Some(ip) = pkt.ptr::<Ipv4Hdr>(EthHdr::LEN) else {
        return Arrival::from(DropReason::OverlayMalformed);
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (version_ihl, total_len, saddr, daddr) = unsafe {
        let h = &*ip;
        (h.version_ihl, h.total_len(), h.saddr(), h.daddr())
    };
    if version_ihl != 0x45
        || (total_len as usize) < Ipv4Hdr::LEN
        || EthHdr::LEN + total_len as usize > pkt.len as usize
    {
        return Arrival::from(DropReason::OverlayMalformed);
    }
    // A guest of the sending host, or the sending host's NAT address of a grant (then the
    // frame is a consumer's flow to a backend here, translated on its host).
    let source = match route::lookup(cloud, saddr) {
        Some(h)
            if (h.flags == NEXTHOP_REMOTE || h.flags == NEXTHOP_REMOTE_NAT)
                && h.ifindex == peer =>
        {
            h.flags
        }
        _ => return Arrival::from(DropReason::OverlaySpoofedSource),
    };
    let Some(hop) = route::lookup(cloud, daddr) else {
        return Arrival::from(DropReason::OverlayNotLocal);
    };
    if hop.flags == NEXTHOP_NAT_SOURCE && source == NEXTHOP_REMOTE {
        return Arrival::ToNat {
            pkt,
            eth,
            ip,
            total_len,
            provider: cloud,
            backend: saddr,
            grant: hop.ifindex,
        };
    }
    if hop.flags != NEXTHOP_ENDPOINT {
        return Arrival::from(DropReason::OverlayNotLocal);
    }
    let Some(to) = endpoint::lookup(hop.ifindex).filter(|e| e.cloud == cloud) else {
        return Arrival::from(DropReason::OverlayNotLocal);
    };
    // SAFETY: bounds-checked by `Packet::ptr`; the program may write to the frame.
    unsafe {
        packet::write_mac(&mut (*eth).src, &to.gateway_mac);
        packet::write_mac(&mut (*eth).dst, &hop.mac);
    }
    let class = if source == NEXTHOP_REMOTE_NAT {
        TrafficClass::Exposure
    } else {
        TrafficClass::CrossHost
    };
    metering::traffic(hop.slot, Direction::ToGuest, class, pkt.len);
    Arrival::Done(Verdict::Redirect(hop.ifindex))
}
