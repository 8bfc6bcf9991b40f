//! The one `BPF_PROG_TEST_RUN` harness of the verdict suites: run a TC program once on a
//! hand-built frame and report its verdict, the frame it left, and the drop counters that
//! moved, so a suite asserts "dropped once, under this reason and nothing else" the same way
//! everywhere.

use std::collections::BTreeMap;

use atoll_dataplane_common::DropReason;
use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// A verdict's name, for messages.
pub fn verdict_name(ret: u32) -> &'static str {
    match ret {
        TC_ACT_OK => "TC_ACT_OK",
        TC_ACT_SHOT => "TC_ACT_SHOT",
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT",
        _ => "unexpected verdict",
    }
}

/// One run of a program.
#[derive(Debug)]
pub struct Run {
    /// The program's return value (a `TC_ACT_*`).
    pub ret: u32,
    /// The frame after the program, `data_size_out` bytes.
    pub out: Vec<u8>,
    /// Drop counters that changed, with how much they grew.
    pub drops: BTreeMap<DropReason, u64>,
}

impl Run {
    /// Whether the program dropped the frame and counted it once under `reason` only.
    pub fn dropped_once(&self, reason: DropReason) -> bool {
        self.ret == TC_ACT_SHOT && self.drops == BTreeMap::from([(reason, 1)])
    }
}

/// The counters of `after` that differ from `before`, by how much they grew.
pub fn moved(
    before: &[(DropReason, u64)],
    after: &[(DropReason, u64)],
) -> BTreeMap<DropReason, u64> {
    before
        .iter()
        .zip(after)
        .filter(|((_, b), (_, a))| a != b)
        .map(|((r, b), (_, a))| (*r, a.wrapping_sub(*b)))
        .collect()
}

/// Runs `prog` once on `frame`, reading the drop counters with `drops` before and after.
/// `Err` is the syscall's error (the kernel refuses some frames outright).
pub fn try_run(
    prog: &SchedClassifier,
    frame: &[u8],
    drops: impl Fn() -> Vec<(DropReason, u64)>,
) -> Result<Run, ProgramError> {
    let before = drops();
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    });
    let after = drops();
    let r = result?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        ret: r.return_value,
        out,
        drops: moved(&before, &after),
    })
}

/// [`try_run`], panicking with `what` if the kernel refuses the run.
pub fn run(
    prog: &SchedClassifier,
    name: &str,
    frame: &[u8],
    drops: impl Fn() -> Vec<(DropReason, u64)>,
    what: &str,
) -> Run {
    try_run(prog, frame, drops).unwrap_or_else(|e| panic!("{what}: test run of {name}: {e:?}"))
}

/// Runs `prog` on every `(frame, expected)` pair of `flows` at once, pair *i* from a thread
/// pinned to CPU *i*, `rounds` times each; returns, per pair, how many runs did not redirect
/// exactly `expected`. For races between CPUs on shared maps: needs `flows.len()` CPUs
/// (panics without them, never passes silently).
pub fn race_redirects(
    prog: &SchedClassifier,
    flows: &[(Vec<u8>, Vec<u8>)],
    rounds: usize,
) -> Vec<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= flows.len(),
        "this race needs {} CPUs; this machine has {cpus}",
        flows.len()
    );
    std::thread::scope(|scope| {
        let workers: Vec<_> = flows
            .iter()
            .enumerate()
            .map(|(cpu, (frame, expected))| {
                scope.spawn(move || {
                    pin_to_cpu(cpu);
                    let mut out = vec![0u8; frame.len() + 256];
                    let mut wrong = 0;
                    for _ in 0..rounds {
                        let r = prog
                            .test_run(TestRunOptions {
                                data_in: Some(frame),
                                data_out: Some(&mut out),
                                repeat: 1,
                                ..Default::default()
                            })
                            .expect("test run");
                        let n = r.data_size_out as usize;
                        if r.return_value != TC_ACT_REDIRECT || out[..n] != expected[..] {
                            wrong += 1;
                        }
                    }
                    wrong
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: `set` is a valid, zeroed cpu_set_t; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
