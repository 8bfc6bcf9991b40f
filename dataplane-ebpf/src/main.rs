//! atoll's dataplane: the eBPF programs attached to every endpoint device.
//!
//! An endpoint is a VM's tap or the host side of a guest's veth. Two TCX programs sit on it:
//! - [`from_vm`] on ingress sees every frame the guest sends;
//! - [`to_vm`] on egress sees every frame about to be delivered to the guest.
//!
//! One more program, [`from_dns`], sits on the ingress of the host-side DNS device (a veth whose
//! peer is in atoll's DNS namespace): it turns the DNS server's replies back into answers from
//! each guest's gateway (see [`dns`]).
//!
//! One more, [`from_uplink`], sits on the ingress of the host's uplink: replies of the guests'
//! internet flows, translated back to them (see [`egress`]).
//!
//! Two more carry the overlay (see [`overlay`]): [`from_underlay`] on the ingress of the device
//! holding the host's underlay address decapsulates the frames of the clouds' endpoints on
//! other hosts, checks and delivers them; [`from_overlay`] on the ingress of the host's VXLAN
//! device does the same for those the kernel decapsulates (GSO aggregates and fragments).
//!
//! One program per host, [`kfree_skb`], runs on the kernel's `kfree_skb` tracepoint (when it
//! frees a dropped skb, never on the forwarding path): it counts the frames a guest writes
//! that the kernel frees before any TC program runs (see [`freed`]).
//!
//! Design decisions:
//! - **TC (TCX), not XDP, on endpoints.** Guests hand the host frames with partial checksums and
//!   GSO (veth peers always, VMMs with vnet headers); an XDP redirect drops that metadata and the
//!   receiving guest discards the frames. At TC the `sk_buff` keeps it, so real TCP works through
//!   redirects. An XDP fast path for offload-free taps can be added later behind the same
//!   [`Verdict`] logic.
//! - **Routed L3, no shared L2.** Guests only ever talk to a gateway MAC; ARP for the gateway and
//!   for in-cloud peers is answered here; frames are forwarded by rewriting MACs, decrementing
//!   the TTL and redirecting to the destination endpoint's device.
//! - **Isolation by construction.** The forwarding table is keyed by `(cloud, address)`, and the
//!   cloud comes from the *ingress device*, never from the packet. An address of another cloud
//!   cannot be looked up, so overlapping ranges are safe and cross-cloud traffic has no path.
//! - **Tags the kernel hid are tags.** Before TC runs, the kernel moves the outer VLAN tag of a
//!   frame a guest writes into the skb's metadata, so the frame `from_vm` reads looks
//!   untagged, and a redirect or answer would get the tag back on egress. `from_vm` checks the
//!   metadata (`packet::vlan_tag_in_metadata`) before the ethertype. Tagged frames too short
//!   for the kernel to untag (14 to 19 bytes) are freed before TC and cannot be seen here;
//!   [`kfree_skb`] counts them where the kernel frees them (docs/design.md, "What a tap
//!   delivers to TC").
//! - Every packet costs O(1): one hash lookup for the endpoint, one for the route.
//! - Thin entry points named by direction call `try_*` functions returning a [`Verdict`]; drops
//!   are counted per reason in [`drop`] (host-wide) and per endpoint in [`metering`], which also
//!   counts every forwarded or answered frame per direction and traffic class.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `flowcache`'s 32-bit atomic add is assembly (the bpfel target has no 32-bit atomics).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

mod arp;
mod dns;
mod drop;
mod egress;
mod endpoint;
mod exposure;
mod flowcache;
mod freed;
mod gateway;
mod ingress;
mod metering;
mod overlay;
mod pace;
mod packet;
mod route;

use atoll_dataplane_common::{DropReason, EndpointInfo};
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_redirect, bpf_redirect_neigh},
    macros::{btf_tracepoint, classifier},
    programs::{BtfTracePointContext, TcContext},
};

use crate::packet::{EthHdr, Ipv4Hdr, Packet, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6};

/// What to do with a frame. Every path through the programs ends in exactly one verdict.
// No `Debug`: formatting code has no place in a kernel program.
#[allow(missing_debug_implementations)]
pub enum Verdict {
    /// Let the kernel continue with the frame unchanged.
    Pass,
    /// Redirect to the egress of this ifindex (another endpoint, or back to the sender).
    Redirect(u32),
    /// Redirect to the egress of this ifindex, the kernel filling in the MACs from its
    /// neighbour table (resolving the next hop first if needed): `bpf_redirect_neigh`.
    RedirectNeigh(u32),
    /// Drop it and count the reason.
    Drop(DropReason),
    /// Not this program's: on to the next program on the hook, else the kernel (TCX's
    /// `TCX_NEXT`; the last program's "next" is the kernel's usual path).
    Next,
}

/// Ingress of an endpoint device: frames the guest sends.
#[classifier]
pub fn from_vm(ctx: TcContext) -> i32 {
    let ep = endpoint::lookup(packet::ifindex(&ctx));
    apply(try_from_vm(&ctx, ep), ep)
}

/// Egress of an endpoint device: frames about to reach the guest.
#[classifier]
pub fn to_vm(ctx: TcContext) -> i32 {
    let ep = endpoint::lookup(packet::ifindex(&ctx));
    apply(try_to_vm(&ctx, ep), ep)
}

/// Ingress of the host-side DNS device: replies of the DNS server, translated back to the
/// asking guest (see [`dns`]).
#[classifier]
pub fn from_dns(ctx: TcContext) -> i32 {
    apply(dns::try_from_dns(&ctx), None)
}

/// Ingress of the host's uplink: replies of guests' egress flows, translated back to them;
/// everything else passes untouched (see [`egress`]).
#[classifier]
pub fn from_uplink(ctx: TcContext) -> i32 {
    apply(egress::from_uplink(&ctx), None)
}

/// Ingress of the host's VXLAN device: frames from endpoints on other hosts, delivered to
/// endpoints here if their host may send them (see [`overlay`]).
#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let verdict = arrived(&ctx, overlay::from_overlay(&ctx));
    apply(verdict, None)
}

/// Ingress of the device holding the host's underlay address: frames of endpoints on other
/// hosts encapsulated to this one are decapsulated and delivered as on the VXLAN device;
/// everything else goes on to the next program on the device (`from_uplink` when the uplink
/// is the underlay) or the kernel (see [`overlay`]).
#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let verdict = arrived(&ctx, overlay::from_underlay(&ctx));
    apply(verdict, None)
}

/// Delivers what arrived over the overlay: checked and done, or a backend's reply for the
/// `exposure` module to translate back.
#[inline(always)]
fn arrived(ctx: &TcContext, arrival: overlay::Arrival) -> Verdict {
    match arrival {
        overlay::Arrival::Done(v) => v,
        overlay::Arrival::ToNat {
            pkt,
            eth,
            ip,
            total_len,
            provider,
            backend,
            grant,
        } => exposure::from_remote_backend(
            ctx,
            &pkt,
            (eth, ip),
            total_len,
            (provider, backend),
            grant,
        ),
    }
}

/// The kernel freed a dropped skb (`tp_btf/kfree_skb`): counts a guest's tagged frame that
/// was too short for the kernel to untag, as `from_vm` counts a drop (see [`freed`]).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    if let Some(ep) = freed::try_kfree_skb(&ctx) {
        count_drop(DropReason::VlanTagged, Some(ep));
    }
    0
}

// The TC_ACT_* constants are generated per target and are not `i32` on every one of them.
#[allow(clippy::unnecessary_cast)]
#[inline(always)]
fn apply(v: Verdict, ep: Option<&EndpointInfo>) -> i32 {
    match v {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Next => TC_ACT_UNSPEC,
        // SAFETY: bpf_redirect only records the target in per-CPU state; any ifindex is safe,
        // an invalid one makes the kernel drop the frame.
        Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        // SAFETY: as above; without parameters the kernel looks the next hop up itself from
        // the frame's destination address.
        Verdict::RedirectNeigh(ifindex) => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        Verdict::Drop(reason) => {
            count_drop(reason, ep);
            TC_ACT_SHOT as i32
        }
    }
}

/// Counts a drop host-wide and, with a known endpoint, in its counters.
#[inline(always)]
fn count_drop(reason: DropReason, ep: Option<&EndpointInfo>) {
    drop::count(reason);
    if let Some(ep) = ep {
        metering::dropped(ep.slot, reason);
    }
}

#[inline(always)]
fn try_from_vm(ctx: &TcContext, ep: Option<&EndpointInfo>) -> Verdict {
    let ifindex = packet::ifindex(ctx);
    let Some(ep) = ep else {
        return Verdict::Drop(DropReason::UnknownEndpoint);
    };
    let pkt = Packet::new(ctx);
    let Some(eth) = pkt.ptr::<EthHdr>(0) else {
        return Verdict::Drop(DropReason::TruncatedEthernet);
    };
    // SAFETY: `eth` was bounds-checked against the packet by `Packet::ptr`.
    let (src, ether_type) = unsafe { (&(*eth).src, (*eth).ether_type) };
    if !packet::mac_eq(src, &ep.mac) {
        return Verdict::Drop(DropReason::SpoofedSourceMac);
    }
    // A tag the kernel already moved into the skb's metadata: the header below shows the
    // inner ethertype, and forwarding would put the tag back on the wire (see
    // `packet::vlan_tag_in_metadata`). A second (QinQ) tag stays in the header and is caught
    // by the ethertype match.
    if packet::vlan_tag_in_metadata(ctx) {
        return Verdict::Drop(DropReason::VlanTagged);
    }
    match u16::from_be(ether_type) {
        ETH_P_IP => match route::forward_ipv4(ctx, &pkt, eth, ep, ifindex) {
            route::Forward::Done(v) => v,
            route::Forward::Outside { ip, total_len } => {
                egress::from_guest(ctx, &pkt, eth, ip, total_len, ep)
            }
            route::Forward::Service {
                ip,
                total_len,
                flags,
                grant,
            } => exposure::translate(ctx, &pkt, eth, ip, total_len, ep, (flags, grant)),
            route::Forward::Remote { hop } => {
                overlay::to_remote(ctx, ep.cloud, ep.slot, pkt.len, hop)
            }
        },
        ETH_P_ARP => arp::answer(&pkt, eth, ep, ifindex),
        ETH_P_IPV6 => Verdict::Drop(DropReason::Ipv6NotSupported),
        packet::ETH_P_8021Q | packet::ETH_P_8021AD => Verdict::Drop(DropReason::VlanTagged),
        _ => Verdict::Drop(DropReason::NonIpEthertype),
    }
}

#[inline(always)]
fn try_to_vm(ctx: &TcContext, ep: Option<&EndpointInfo>) -> Verdict {
    let Some(ep) = ep else {
        return Verdict::Drop(DropReason::UnknownEndpoint);
    };
    let pkt = Packet::new(ctx);
    let Some(eth) = pkt.ptr::<EthHdr>(0) else {
        return Verdict::Drop(DropReason::TruncatedEthernet);
    };
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (dst, src, ether_type) = unsafe { (&(*eth).dst, &(*eth).src, (*eth).ether_type) };
    if !packet::mac_eq(dst, &ep.mac) || !packet::mac_eq(src, &ep.gateway_mac) {
        return Verdict::Drop(DropReason::ToVmForeignFrame);
    }
    match u16::from_be(ether_type) {
        ETH_P_ARP => Verdict::Pass,
        ETH_P_IP => {
            let Some(ip) = pkt.ptr::<Ipv4Hdr>(EthHdr::LEN) else {
                return Verdict::Drop(DropReason::Ipv4Truncated);
            };
            // SAFETY: bounds-checked by `Packet::ptr`.
            let daddr = unsafe { (*ip).daddr() };
            if daddr != ep.ipv4 {
                return Verdict::Drop(DropReason::ToVmWrongDestination);
            }
            Verdict::Pass
        }
        _ => Verdict::Drop(DropReason::ToVmNotAllowed),
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds (for `cargo clippy --workspace` and `cargo test`) have nothing to run.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
