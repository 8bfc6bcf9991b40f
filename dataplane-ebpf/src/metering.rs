//! Per-endpoint metering: packets and bytes per direction and traffic class, and drops per
//! reason, in per-CPU counters (lock-free, no atomics: each CPU owns its copy).
//!
//! Both directions are counted where the dataplane decides: `from_vm` counts the sender's
//! "from guest" and, for the frame it hands to another endpoint (or back to the sender), that
//! endpoint's "to guest" (its slot travels in the route's `NextHop`). Bytes are `skb->len`, the
//! Ethernet frame as the host sees it.
//!
//! `METERING` is a read-only global the loader may set to 0 (benchmarks measure the cost of
//! metering that way); the verifier then removes the counting code entirely.

use atoll_dataplane_common::{Direction, DropReason, EndpointCounters, TrafficClass};
use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Endpoint slot → counters. Sized by the agent to `max_endpoints`.
#[map]
pub static COUNTERS: PerCpuArray<EndpointCounters> = PerCpuArray::with_max_entries(65536, 0);

#[unsafe(no_mangle)]
static METERING: u32 = 1;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a plain read of a read-only global; volatile so the loader's value is used.
    unsafe { core::ptr::read_volatile(&METERING) != 0 }
}

#[inline(always)]
pub fn traffic(slot: u32, dir: Direction, class: TrafficClass, bytes: u32) {
    if !enabled() {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value from a successful lookup; only this CPU writes it during the
        // program run. The indexes are enum discriminants below the array lengths.
        unsafe {
            let t = &mut (*c).traffic[dir as usize][class as usize];
            t.packets += 1;
            t.bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn dropped(slot: u32, reason: DropReason) {
    if !enabled() {
        return;
    }
    let r = reason as usize;
    if r >= DropReason::SLOTS as usize {
        return;
    }
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value from a successful lookup; `r` is bounds-checked above.
        unsafe { (*c).drops[r] += 1 };
    }
}
