//! Frames the kernel frees before any TC program runs, counted where the kernel frees them.
//!
//! A guest's VLAN-tagged frame (802.1Q or 802.1ad) of 14 to 19 bytes never reaches `from_vm`:
//! `__netif_receive_skb_core` calls `skb_vlan_untag` before the TC hook, which cannot pull the
//! tag and the inner ethertype (6 bytes behind the MAC addresses) and frees the skb with
//! `kfree_skb` (reason `SKB_DROP_REASON_NOT_SPECIFIED`). `kfree_skb` (a BTF tracepoint,
//! `tp_btf/kfree_skb`, one program and link per host) runs when the kernel frees a dropped
//! skb and counts such a frame as `vlan_tagged`, for its endpoint and host-wide, exactly as
//! `from_vm` counts its drops (docs/design.md, "What a tap delivers to TC").
//!
//! Decisions:
//! - **A tracepoint, not XDP.** XDP on the tap would see these frames (tun runs it before the
//!   skb exists) but costs every frame (generic XDP for QEMU's vnet-header writes) and would
//!   be a third link per tap. The tracepoint costs nothing on the forwarding path: it runs only
//!   for skbs the kernel drops, and returns after the first field that does not match.
//! - **Offsets from the running kernel's BTF, set at load.** aya 0.14 has no CO-RE
//!   relocations for Rust, so the program cannot name `sk_buff` fields. The agent reads their
//!   byte offsets (and the drop reason's value) from `/sys/kernel/btf/vmlinux` when it loads
//!   the object and sets them in the read-only global `KFREE_SKB_CONFIG`
//!   ([`KfreeSkbConfig`]); the program reads with `bpf_probe_read_kernel`, which cannot
//!   fault. A kernel whose BTF lacks a field, or gives it another size, is refused at load
//!   (never misread).
//! - **Exactly what `skb_vlan_untag` frees when its pull fails:** reason `NOT_SPECIFIED`,
//!   `skb->protocol` 802.1Q or 802.1ad (set by `eth_type_trans` from the outer ethertype), no
//!   tag in the metadata (`vlan_all` 0: the untag did not happen), `skb->len` below 6 (the
//!   pull it needed; `len` then counts the bytes behind the MAC header), `skb->dev` in the
//!   agent's network namespace (ifindexes are per namespace) and an endpoint. A tagged frame
//!   of 20 bytes or more has its tag moved into the metadata and its protocol replaced by the
//!   inner one before `from_vm` sees it, and `from_vm`'s drops are freed with reason
//!   `TC_INGRESS`: no frame is counted by both programs.
//! - Devices without an identity (a spare tap is down; a claimed one is being programmed) are
//!   not counted: `from_vm` counts their frames as `unknown_endpoint` host-wide, this program
//!   cannot tell such a device from any other device of the host.

use atoll_dataplane_common::{EndpointInfo, KfreeSkbConfig};
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};

use crate::{endpoint, packet};

/// Set by the agent at load (see the module docs); all zero: count nothing.
#[unsafe(no_mangle)]
static KFREE_SKB_CONFIG: KfreeSkbConfig = KfreeSkbConfig {
    skb_dev: 0,
    skb_len: 0,
    skb_protocol: 0,
    skb_vlan_all: 0,
    dev_ifindex: 0,
    dev_net: 0,
    net_inum: 0,
    reason_not_specified: 0,
    netns_inum: 0,
};

/// Bytes `skb_vlan_untag` pulls behind the MAC header: the tag and the inner ethertype.
const UNTAG_PULL: u32 = 6;

/// One field of the loader-set configuration.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: a plain read of a read-only global; volatile so the loader's value is used.
        unsafe { core::ptr::read_volatile(&raw const KFREE_SKB_CONFIG.$field) }
    };
}

/// Reads a `T` at `base + offset` in kernel memory; `None` if it cannot be read.
#[inline(always)]
fn read<T>(base: usize, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting; the
    // value is plain data (integers and pointers that are only read through this helper).
    unsafe { bpf_probe_read_kernel((base + offset as usize) as *const T).ok() }
}

/// The endpoint whose guest wrote the freed skb, if it is a tagged frame too short for the
/// kernel to untag (see the module docs).
#[inline(always)]
pub fn try_kfree_skb(ctx: &BtfTracePointContext) -> Option<&'static EndpointInfo> {
    // Arguments of the tracepoint: skb, location, reason, rx_sk.
    let reason: u32 = ctx.arg(2);
    if config!(skb_len) == 0 || reason != config!(reason_not_specified) {
        return None;
    }
    let skb: usize = ctx.arg::<*const u8>(0) as usize;
    let protocol = u16::from_be(read::<u16>(skb, config!(skb_protocol))?);
    if protocol != packet::ETH_P_8021Q && protocol != packet::ETH_P_8021AD {
        return None;
    }
    if read::<u32>(skb, config!(skb_vlan_all))? != 0
        || read::<u32>(skb, config!(skb_len))? >= UNTAG_PULL
    {
        return None;
    }
    let dev = read::<usize>(skb, config!(skb_dev))?;
    if dev == 0 {
        return None;
    }
    let net = read::<usize>(dev, config!(dev_net))?;
    if net == 0 || read::<u32>(net, config!(net_inum))? != config!(netns_inum) {
        return None;
    }
    endpoint::lookup(read::<u32>(dev, config!(dev_ifindex))?)
}
