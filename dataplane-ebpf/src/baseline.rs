//! Baseline programs for benchmarks: the cheapest possible XDP and TC programs. The
//! dataplane's per-packet cost is reported as the difference to these, measured in the same
//! run with BPF_PROG_TEST_RUN. They are never attached to a device.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, TC_ACT_OK},
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// Calibration: the reference "one hash lookup + per-CPU counter" XDP program whose cost on the
/// machine that set the targets is recorded in FACTS.md (16 ns there, empty XDP 5 ns), so
/// results from slower or faster machines can be put in proportion.
#[map]
static CAL_KEYS: HashMap<u32, u32> = HashMap::with_max_entries(1024, 0);
#[map]
static CAL_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn lookup_count_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: ctx.ctx is the kernel-provided xdp_md, valid for the run.
    let key = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: read-only lookup of a plain u32.
    if unsafe { CAL_KEYS.get(key) }.is_some() {
        if let Some(c) = CAL_COUNT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot from a successful lookup.
            unsafe { *c += 1 };
        }
    }
    XDP_PASS
}

#[xdp]
pub fn empty_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

// TC_ACT_OK is generated per target and is not `i32` on every one of them.
#[allow(clippy::unnecessary_cast)]
#[classifier]
pub fn empty_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
