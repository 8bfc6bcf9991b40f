//! Drop accounting: one per-CPU counter per [`DropReason`], lock-free.

use atoll_dataplane_common::{DropReason, DROP_SLOTS};
use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Drops per reason, indexed by the reason's number (slot 0 unused). Per-CPU `u64`s: userspace
/// sums the CPUs.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_SLOTS, 0);

#[inline(always)]
pub fn count(reason: DropReason) {
    if let Some(c) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs (preemption is
        // disabled); the pointer comes from a successful lookup.
        unsafe { *c += 1 };
    }
}
