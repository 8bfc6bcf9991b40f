//! What the flow caches of `egress` and `exposure` share: exact key compares and stores, and
//! the NAT port reservation versions (see "Established flows are cached" in `egress`). Each
//! feature module owns its caches and version arrays; this module owns no map.

use atoll_dataplane_common::{cache_slot, FlowKey};
use aya_ebpf::maps::Array;

/// True if both keys are the same flow (field by field: an array compare of the padding
/// would compile to a `memcmp` loop).
#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
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
pub unsafe fn write_key(dst: *mut FlowKey, key: &FlowKey) {
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

/// The slot of `reply` in `versions` and the reservation version it holds now.
#[inline(always)]
pub fn held_version(versions: &Array<u64>, reply: &FlowKey) -> (u32, u64) {
    let slot = cache_slot(reply);
    (slot, versions.get(slot).copied().unwrap_or(0))
}

/// True if `versions` still holds the version a flow recorded, `(slot, version)`: no new
/// reservation of a port whose reply key falls in that slot since.
#[inline(always)]
pub fn still_held(versions: &Array<u64>, (slot, version): (u32, u64)) -> bool {
    versions.get(slot).is_some_and(|v| *v == version)
}

/// Marks a new reservation of `reply`'s NAT port: the flow that held it before (its entry was
/// evicted) finds its cached flow out of date on its next packet.
#[inline(always)]
pub fn reserved(versions: &Array<u64>, reply: &FlowKey) {
    if let Some(v) = versions.get_ptr_mut(cache_slot(reply)) {
        // SAFETY: a value of an array (never freed). Not atomic: two CPUs reserving ports of
        // one slot at once may both store the same increment, which still differs from every
        // version a flow read before either reservation. 64 bits: never wraps (see
        // `EgressRecent`).
        unsafe { *v = (*v).wrapping_add(1) };
    }
}
