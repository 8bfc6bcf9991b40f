//! The overlay: one cloud across many hosts, over VXLAN whose network id is the cloud.
//!
//! The programs choose the tunnel per packet (the remote host from the route, the VNI from
//! the cloud), so a host needs no device, FDB entry or route per remote host or cloud.
//!
//! **Sending** ([`to_remote`], from `from_vm`): the route lookup every packet makes finds a
//! destination of the sender's cloud on another host ([`NEXTHOP_REMOTE`]: the route carries
//! that host's underlay address and the guest's MAC). The frame is rewritten as for a local
//! endpoint (gateway → guest MAC, TTL one less) and encapsulated ([`encapsulate`]) with the
//! cloud's VNI (`CLOUD_VNIS`), this host's underlay address as the outer source and the remote
//! host's as the destination. Metered `cross_host`, "from guest", on the sender.
//!
//! **Two ways out.** With an underlay device (`OverlayHost::underlay_ifindex`: the device
//! holding the underlay address), a frame is encapsulated *in place*: `bpf_skb_adjust_room`
//! opens 50 bytes after its Ethernet header (with the encapsulation flags, so a checksum the
//! guest left to offload is still completed on the inner packet), the program writes the
//! outer IPv4, UDP and VXLAN headers and a copy of the Ethernet header, and
//! `bpf_redirect_neigh` hands it to the underlay device, the kernel choosing the next hop and
//! its MAC from its routes and neighbours. Two kinds of frame take the host's VXLAN device
//! (external mode) instead, their tunnel key set with `bpf_skb_set_tunnel_key`: GSO
//! aggregates (the device segments them; writing headers before one would leave segmentation
//! to the underlay device's offloads) and frames that would not fit the underlay once
//! encapsulated (`underlay_mtu`; the device fragments them, see "No outer DF"). Without an
//! underlay device every frame takes the VXLAN device.
//!
//! **Receiving**, two entries with the same checks: [`from_underlay`] (TCX ingress of the
//! underlay device, first on it) takes the VXLAN frames the programs send: IPv4 without
//! options, not a fragment, UDP to this host's underlay address and VXLAN port, no UDP
//! checksum, the VXLAN flags atoll sends, not GSO, and nothing after the datagram (a trailer
//! would reach the guest and its metering; the kernel's path trims it). It checks them (below), removes the outer
//! headers (`bpf_skb_adjust_room`) and delivers. Everything else goes on ([`Verdict::Next`]):
//! to `from_uplink` when the underlay device is the uplink, else to the kernel, whose VXLAN
//! device decapsulates what is VXLAN (GSO aggregates built by the underlay device's GRO,
//! fragments reassembled, frames with a UDP checksum) and hands it, with its tunnel key, to
//! [`from_overlay`] on the device's ingress. Every check is a numbered drop, the same on both:
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
//!   Geneve would carry the same key in the same place (8 bytes of header without options),
//!   so a host with Geneve could use it behind this module without a change to the checks.
//! - **The programs encapsulate, not the device**, for the frames they can: the VXLAN
//!   device in external mode allocates a metadata dst, looks a route up and builds the
//!   headers per frame, and the receiving host's IP and UDP stacks and the device's receive
//!   path run before `from_overlay`; skipping both made a frame across hosts about 1.7× as
//!   fast as on the device (docs/benchmarks.md). The device stays for what the programs do
//!   not do themselves (segmentation, fragmentation), so nothing a guest sends is refused
//!   for its size or offloads.
//! - **The outer UDP source port is a hash of the inner flow** (so the underlay's ECMP
//!   spreads flows, as the kernel's device does); **the UDP checksum is zero** (RFC 7348
//!   allows it over IPv4; the inner packet carries its own). `from_underlay` takes only
//!   frames without one: a frame with a checksum goes to the kernel, which verifies it.
//! - **The underlay is trusted to deliver, not to speak**: a frame's outer source is taken as
//!   the sending host (the underlay is a private network, as AWS's substrate is), but what it
//!   may say is bounded by what the control plane placed on it. The underlay is not encrypted
//!   by atoll (this kernel has neither WireGuard nor IPsec ESP; docs/operations.md says how to
//!   run it over WireGuard where the kernel has it).
//! - **No outer DF**: a frame too big for the underlay after encapsulation takes the VXLAN
//!   device and is fragmented rather than dropped; guests are given an MTU that leaves room
//!   for the 50 bytes of encapsulation, so this happens only if a guest raises its own MTU.
//!   The headers the programs write carry no DF either, with a random IP id, so an underlay
//!   path narrower than `overlay.underlay_mtu` fragments them too.
//! - ARP for a remote address is answered by `from_vm` like for a local one (the route exists);
//!   nothing but IPv4 crosses the overlay.

use atoll_dataplane_common::{
    Direction, DropReason, NextHop, OverlayHost, TrafficClass, NEXTHOP_ENDPOINT,
    NEXTHOP_NAT_SOURCE, NEXTHOP_REMOTE, NEXTHOP_REMOTE_NAT,
};
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
    },
    helpers::{bpf_get_prandom_u32, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    macros::map,
    maps::{Array, HashMap},
    programs::TcContext,
};

use crate::{
    endpoint, metering,
    packet::{self, EthHdr, Ipv4Hdr, Packet, ETH_P_IP, IPPROTO_UDP},
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

/// What encapsulation adds in front of a frame's IPv4 packet: outer IPv4, UDP and VXLAN
/// headers and the inner Ethernet header (the frame's own becomes the outer one).
pub const ENCAP_LEN: u32 = 20 + 8 + 8 + 14;

/// What encapsulation adds to a frame's length (Ethernet header included) to make the outer
/// IPv4 packet: outer IPv4, UDP and VXLAN headers.
const OUTER_IP_OVERHEAD: u32 = 20 + 8 + 8;

/// `bpf_skb_adjust_room` flags of an in-place encapsulation: IPv4 outside, UDP, an Ethernet
/// header inside (so a checksum the guest left to offload is still completed on the inner
/// packet, and GSO would know the tunnel).
const ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

/// The headers written between the frame's Ethernet header and its IPv4 packet.
#[repr(C)]
struct Outer {
    ip: [u8; 20],
    udp: [u8; 8],
    vxlan: [u8; 8],
    inner_eth: [u8; 14],
}

/// The VXLAN header's flags byte: a valid network id follows (RFC 7348).
const VXLAN_FLAG_VNI: u8 = 0x08;

/// From `from_vm`: a frame of `cloud` rewritten for the remote endpoint (or consumer host's
/// NAT address) `hop`, encapsulated to its host; metered `cross_host` (`exposure` for a NAT
/// address).
#[inline(always)]
pub fn to_remote(ctx: &TcContext, cloud: u32, slot: u32, len: u32, hop: &NextHop) -> Verdict {
    match encapsulate(ctx, cloud, hop.ifindex) {
        Ok(verdict) => {
            let class = if hop.flags == NEXTHOP_REMOTE_NAT {
                TrafficClass::Exposure
            } else {
                TrafficClass::CrossHost
            };
            metering::traffic(slot, Direction::FromGuest, class, len);
            verdict
        }
        Err(reason) => Verdict::Drop(reason),
    }
}

/// Encapsulates a frame of `cloud` to the host at `remote` (underlay address, map order):
/// in place and to the underlay device when it can (module docs, "Two ways out"), else by
/// setting its tunnel key for the VXLAN device. The frame is already rewritten for its
/// destination; the verdict sends it on.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, cloud: u32, remote: u32) -> Result<Verdict, DropReason> {
    let Some(host) = OVERLAY_HOST.get(0).filter(|h| h.vxlan_ifindex != 0) else {
        return Err(DropReason::OverlayOff);
    };
    // SAFETY: only read.
    let Some(vni) = (unsafe { CLOUD_VNIS.get(cloud) }).copied() else {
        return Err(DropReason::OverlayNoVni);
    };
    if host.underlay_ifindex != 0 && fits_in_place(ctx, host) {
        encapsulate_in_place(ctx, host, vni, remote)?;
        return Ok(Verdict::RedirectNeigh(host.underlay_ifindex));
    }
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
    Ok(Verdict::Redirect(host.vxlan_ifindex))
}

/// True if the frame can be encapsulated in place: not a GSO super-frame (the VXLAN device
/// segments those) and small enough for the underlay once encapsulated (else the device
/// fragments it).
#[inline(always)]
fn fits_in_place(ctx: &TcContext, host: &OverlayHost) -> bool {
    // SAFETY: `ctx.skb.skb` is the program's context; the verifier turns this load into a
    // read of the skb's GSO size.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    !gso && ctx.len() + OUTER_IP_OVERHEAD <= host.underlay_mtu as u32
}

/// Writes the outer headers in front of the frame's IPv4 packet: its Ethernet header stays
/// first (the outer one; `bpf_redirect_neigh` fills in its addresses) and is copied inside.
/// The UDP source port is a hash of the inner flow (so the underlay spreads flows over its
/// paths, as the kernel's VXLAN device does); the UDP checksum is zero (RFC 7348 allows it
/// over IPv4, and the inner packet has its own); DF is clear, as on the device.
#[inline(always)]
fn encapsulate_in_place(
    ctx: &TcContext,
    host: &OverlayHost,
    vni: u32,
    remote: u32,
) -> Result<(), DropReason> {
    let len = ctx.len();
    let pkt = Packet::new(ctx);
    let (Some(eth), Some(ip)) = (pkt.ptr::<[u8; 14]>(0), pkt.ptr::<Ipv4Hdr>(EthHdr::LEN)) else {
        return Err(DropReason::OverlayEncapFailed);
    };
    // SAFETY: both bounds-checked by `Packet::ptr`.
    let (inner_eth, saddr, daddr, protocol) =
        unsafe { (*eth, (*ip).saddr(), (*ip).daddr(), (*ip).protocol) };
    let ports = match pkt.ptr::<u32>(packet::L4_OFFSET) {
        // SAFETY: bounds-checked by `Packet::ptr`; read unaligned.
        Some(p) => unsafe { core::ptr::read_unaligned(p) },
        None => 0,
    };
    let hash = (saddr ^ daddr.rotate_left(16) ^ ports ^ protocol as u32).wrapping_mul(0x9E37_79B1);
    let sport = 0xC000 | (hash >> 18) as u16;
    let ip_len = (len + OUTER_IP_OVERHEAD) as u16;
    let udp_len = ip_len - 20;
    // SAFETY: the helper takes no pointer.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    let (s, d) = (host.underlay_ipv4.to_ne_bytes(), remote.to_ne_bytes());
    let [lh, ll] = ip_len.to_be_bytes();
    let [ih, il] = id.to_be_bytes();
    let mut ip = [
        0x45,
        0,
        lh,
        ll,
        ih,
        il,
        0,
        0,
        TUNNEL_TTL,
        IPPROTO_UDP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        d[0],
        d[1],
        d[2],
        d[3],
    ];
    let [ch, cl] = ipv4_header_checksum(&ip).to_be_bytes();
    ip[10] = ch;
    ip[11] = cl;
    let [sh, sl] = sport.to_be_bytes();
    let [ph, pl] = host.port_be.to_ne_bytes();
    let [uh, ul] = udp_len.to_be_bytes();
    let v = vni.to_be_bytes();
    let outer = Outer {
        ip,
        udp: [sh, sl, ph, pl, uh, ul, 0, 0],
        vxlan: [VXLAN_FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0],
        inner_eth,
    };
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| DropReason::OverlayEncapFailed)?;
    ctx.store(EthHdr::LEN, &outer, 0)
        .map_err(|_| DropReason::OverlayEncapFailed)
}

/// The Internet checksum of an IPv4 header whose checksum field is zero.
#[inline(always)]
fn ipv4_header_checksum(h: &[u8; 20]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
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

/// Ingress of the VXLAN device: a frame the kernel decapsulated (module docs).
#[inline(always)]
pub fn from_overlay(ctx: &TcContext) -> Arrival {
    // SAFETY: all-zero is a valid `bpf_tunnel_key`.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `ctx.skb.skb` is the program's context; `key` is writable for the size passed.
    let got = unsafe { bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, TUNNEL_KEY_SIZE, 0) };
    if got != 0 {
        return Arrival::from(DropReason::OverlayTunnelKey);
    }
    // SAFETY: an IPv4 tunnel (no `BPF_F_TUNINFO_IPV6`): the union holds `remote_ipv4`.
    let peer = u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 });
    match admit(key.tunnel_id, peer) {
        Ok(cloud) => arrive(ctx, cloud, peer),
        Err(reason) => Arrival::from(reason),
    }
}

/// The outer UDP header.
#[repr(C)]
struct UdpHdr {
    sport: [u8; 2],
    /// Network byte order, read natively.
    dport: u16,
    len: [u8; 2],
    check: u16,
}

/// Bytes of an encapsulated frame `from_underlay` reads before decapsulating: outer Ethernet,
/// IPv4, UDP and VXLAN headers and the inner Ethernet header.
const ENCAPSULATED_HEADERS: u32 = EthHdr::LEN as u32 + ENCAP_LEN;

/// Ingress of the underlay device: a VXLAN frame to this host is checked as on the VXLAN
/// device and decapsulated here; anything else goes on to the next program or the kernel
/// ([`Verdict::Next`]), including VXLAN this program leaves to the kernel: GSO aggregates,
/// fragments, and frames with a UDP checksum or VXLAN flags atoll does not send (the
/// kernel's device validates them and `from_overlay` checks what it delivers).
#[inline(always)]
pub fn from_underlay(ctx: &TcContext) -> Arrival {
    let next = Arrival::Done(Verdict::Next);
    let Some(host) = OVERLAY_HOST.get(0).filter(|h| h.underlay_ifindex != 0) else {
        return next;
    };
    // SAFETY: `ctx.skb.skb` is the program's context; a read of the skb's GSO size.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return next;
    }
    let pkt = Packet::with_headers(ctx, ENCAPSULATED_HEADERS);
    let (Some(eth), Some(ip), Some(udp), Some(vxlan), Some(inner)) = (
        pkt.ptr::<EthHdr>(0),
        pkt.ptr::<Ipv4Hdr>(EthHdr::LEN),
        pkt.ptr::<UdpHdr>(packet::L4_OFFSET),
        pkt.ptr::<[u8; 8]>(packet::L4_OFFSET + 8),
        pkt.ptr::<EthHdr>(packet::L4_OFFSET + 16),
    ) else {
        return next;
    };
    // SAFETY: all bounds-checked by `Packet::ptr`.
    let (ether_type, outer, udp, vxlan, inner_type) =
        unsafe { ((*eth).ether_type, &*ip, &*udp, *vxlan, (*inner).ether_type) };
    if u16::from_be(ether_type) != ETH_P_IP
        || outer.version_ihl != 0x45
        || outer.protocol != IPPROTO_UDP
        || outer.is_fragment()
        || outer.daddr() != host.underlay_ipv4
        || udp.dport != host.port_be
        || udp.check != 0
        || vxlan[0] != VXLAN_FLAG_VNI
        || vxlan[1] | vxlan[2] | vxlan[3] | vxlan[7] != 0
    {
        return next;
    }
    // Exactly one datagram (atoll sends no trailer; the kernel's path trims any other), so a
    // sender cannot pad what a guest receives and is metered for.
    let ip_len = outer.total_len() as u32;
    if ip_len < ENCAP_LEN + Ipv4Hdr::LEN as u32
        || EthHdr::LEN as u32 + ip_len != pkt.len
        || u16::from_be_bytes(udp.len) as u32 != ip_len - Ipv4Hdr::LEN as u32
    {
        return next;
    }
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    let peer = outer.saddr();
    let cloud = match admit(vni, peer) {
        Ok(cloud) => cloud,
        Err(reason) => return Arrival::from(reason),
    };
    if u16::from_be(inner_type) != ETH_P_IP {
        return Arrival::from(DropReason::OverlayMalformed);
    }
    // The outer IPv4, UDP and VXLAN headers and the inner Ethernet header go; the outer
    // Ethernet header (IPv4, like the inner one) stays, its addresses set on delivery.
    if ctx
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .is_err()
    {
        return Arrival::from(DropReason::OverlayDecapFailed);
    }
    arrive(ctx, cloud, peer)
}

/// The cloud of network id `vni` if it has one here and `peer` (an outer source, map order)
/// is a known host.
#[inline(always)]
fn admit(vni: u32, peer: u32) -> Result<u32, DropReason> {
    // SAFETY: only read.
    let Some(cloud) = (unsafe { VNI_CLOUDS.get(vni) }).copied() else {
        return Err(DropReason::OverlayUnknownVni);
    };
    // SAFETY: only read.
    if unsafe { OVERLAY_PEERS.get(peer) }.is_none() {
        return Err(DropReason::OverlayUnknownPeer);
    }
    Ok(cloud)
}

/// A decapsulated frame of `cloud` from the host at `peer`: its inner checks and delivery
/// (module docs, "Receiving").
#[inline(always)]
fn arrive(ctx: &TcContext, cloud: u32, peer: u32) -> Arrival {
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
