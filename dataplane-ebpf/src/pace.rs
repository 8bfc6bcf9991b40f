//! Virtual clocks, the token buckets of the rate limits (`egress`'s byte rate and new-flow
//! rate, `exposure`'s new-flow rate). A clock holds when what was admitted so far would have
//! been admitted at the rate (`CLOCK_BOOTTIME` ns); something costing `cost_ns` passes if the
//! clock is at most `burst_ns` ahead of now, and moves it on by its cost. One word per
//! bucket, no refill step. Each feature module owns the maps that hold its clocks; this
//! module owns none.
//!
//! Not atomic: two CPUs admitting for one bucket at the same instant may both pass on one
//! token, so a rate holds within one admission per CPU (docs/design.md). An atomic
//! compare-and-swap loop is not available to this build (see `flowcache`), and the error is
//! bounded by the number of CPUs.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;

/// Admits something costing `cost_ns` against the clock at `clock` with `burst_ns` of burst:
/// true (and the clock moved on) or false (unchanged).
///
/// # Safety
/// `clock` points at a `u64` of a map value from a successful lookup, valid for the program
/// run.
#[inline(always)]
pub unsafe fn admit(clock: *mut u64, cost_ns: u64, burst_ns: u64) -> bool {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: the caller's contract; plain integer loads and stores (see the module docs).
    unsafe {
        let at = if *clock > now { *clock } else { now };
        if at - now > burst_ns {
            return false;
        }
        *clock = at + cost_ns;
    }
    true
}
