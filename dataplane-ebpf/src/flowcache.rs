//! What the flow caches of `egress` and `exposure` share: exact key compares and stores, the
//! NAT port reservation versions (see "Established flows are cached" in `egress`), and the
//! slots' sequence words. Each feature module owns its caches and version arrays; this module
//! owns no map.
//!
//! **Slots are never read torn.** A slot is shared by all CPUs and is many words long, so a
//! packet could match a slot's key while another CPU rewrites the rest for another flow, and
//! leave with that flow's translation (its NAT port, its backend, possibly another cloud's);
//! `exposure_verdicts` reproduced it (hundreds of packets in 150,000 per CPU) before this. So
//! every slot carries a sequence word (`seq`, see [`SLOT_WRITERS`]), a seqlock whose writers
//! also exclude each other without a compare-and-swap (the eBPF build targets the generic CPU,
//! which has atomic add but not `BPF_CMPXCHG`, and `-mcpu=v3` changes code generation enough
//! to fail the verifier elsewhere):
//! - a writer ([`write_slot`]) gives up if a writer is active; else it adds 1 (active), writes,
//!   adds 0x10000 (a full barrier: its stores are visible before it reads on) and reads the
//!   word back: anything but its own two additions means another writer overlapped, and it
//!   empties the slot (key cloud 0, which no flow has) while still active; last it adds
//!   0xFFFF (inactive, one more completed write). Of two overlapping writers each sees the
//!   other's addition at its check or never started, so an overlap always ends empty.
//! - a reader ([`read_begin`], [`read_valid`]) uses a slot only if no writer was active when
//!   it began and the word is unchanged after it read every field it uses: no write overlapped
//!   the read. Loads are ordered on x86 (the only target the dataplane is built for) and the
//!   reads sit between two volatile loads with compiler fences.
//!
//! Rejected: per-CPU slots (one writer each), whose memory is slots × possible CPUs (7 MiB per
//! CPU at 65,536 slots); and a slot fingerprint over every field, which costs a hash per
//! packet. The credit decrement readers store is outside the protocol: a lost or stale credit
//! only moves the next refresh.

use atoll_dataplane_common::{cache_slot, FlowKey, SLOT_WRITERS};
use aya_ebpf::maps::Array;
use core::sync::atomic::{compiler_fence, Ordering};

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

/// Adds `n` to a slot's sequence word atomically: a 32-bit `BPF_ATOMIC` add (`lock xadd`,
/// a full barrier on x86), written as assembly because Rust's bpfel target has no 32-bit
/// atomics. The assembly may touch any memory, so the compiler moves no access across it.
///
/// # Safety
/// `seq` points at the `seq` field of a slot (a value of an array, never freed, 4-aligned).
#[inline(always)]
unsafe fn seq_add(seq: *mut u32, n: u32) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's contract: `seq` is a valid, aligned map value field; the field is
    // only ever accessed atomically or by volatile loads.
    unsafe {
        core::arch::asm!(
            "lock *(u32 *)({p} + 0) += {n}",
            p = in(reg) seq,
            n = in(reg) n as u64,
            options(nostack),
        );
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above (the host build of this crate is only type-checked, never run).
    unsafe {
        core::sync::atomic::AtomicU32::from_ptr(seq).fetch_add(n, Ordering::SeqCst);
    }
}

/// The sequence word of a slot as a reader begins, if no writer is active.
///
/// # Safety
/// As [`seq_add`].
#[inline(always)]
pub unsafe fn read_begin(seq: *const u32) -> Option<u32> {
    // SAFETY: the caller's contract.
    let s = unsafe { core::ptr::read_volatile(seq) };
    compiler_fence(Ordering::SeqCst);
    (s & SLOT_WRITERS == 0).then_some(s)
}

/// True if no write touched the slot since [`read_begin`] returned `begun`: what was read in
/// between is one writer's.
///
/// # Safety
/// As [`seq_add`].
#[inline(always)]
pub unsafe fn read_valid(seq: *const u32, begun: u32) -> bool {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the caller's contract.
    unsafe { core::ptr::read_volatile(seq) == begun }
}

/// Writes a slot with `write` under its sequence word (see the module docs): not at all if
/// another writer is active, and emptied (its key's cloud set to 0, which no flow has) if one
/// overlapped.
///
/// # Safety
/// As [`seq_add`]; `key` is the same slot's key and `write` writes only fields of that slot.
#[inline(always)]
pub unsafe fn write_slot(seq: *mut u32, key: *mut FlowKey, write: impl FnOnce()) {
    // SAFETY: the caller's contract.
    unsafe {
        let before = core::ptr::read_volatile(seq);
        if before & SLOT_WRITERS != 0 {
            return;
        }
        seq_add(seq, 1);
        write();
        seq_add(seq, 0x1_0000);
        if core::ptr::read_volatile(seq) != before.wrapping_add(0x1_0001) {
            (*key).cloud = 0;
        }
        seq_add(seq, 0xFFFF);
    }
}
