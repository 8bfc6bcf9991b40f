//! What atoll's tests and benchmarks build their scenes with, in one place (`publish = false`):
//! uniquely named network namespaces and bpffs pin directories, etcd members and clusters ([`etcd`]), (from the agent's `scratch`
//! module, which its demo and doctor use too), guards that delete devices on drop, one frame
//! builder and parser with checksums ([`frame`]), a test's own internet ([`internet`]), and the one
//! root check.
//!
//! Everything a test creates carries the `atl` prefix plus the process id and a counter, and is
//! removed on drop, also when the test fails or panics; CI checks that nothing is left behind.

use std::process::Command;

pub use atoll_agent::scratch::{run, unique_name, unique_prefix, NetNs, PinRoot};

pub mod etcd;
pub mod frame;
pub mod guest;
pub mod internet;
pub mod verdict;
pub mod wait;

/// Fails the calling test, loudly, unless it runs as root: tests that create namespaces,
/// devices, pins or programs need CAP_NET_ADMIN and CAP_BPF, and must never pass by skipping.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (network namespaces, devices, bpffs pins, eBPF programs): run the \
         root tests as root (`cargo xtask test`; README, Tests)"
    );
}

/// Deletes every host device whose name starts with a prefix on drop: put one at the top of a
/// test that names its devices with `unique_name(tag)` (prefix `unique_prefix(tag)`), so a
/// failing test leaves nothing behind.
pub struct LinksWithPrefix(pub String);

impl std::fmt::Debug for LinksWithPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinksWithPrefix").finish_non_exhaustive()
    }
}

impl Drop for LinksWithPrefix {
    fn drop(&mut self) {
        for name in host_links() {
            if name.starts_with(&self.0) {
                let _ = run(Command::new("ip").args(["link", "del", &name]));
            }
        }
    }
}

/// The names of the host's devices (none if `ip` fails).
pub fn host_links() -> Vec<String> {
    let Ok(out) = run(Command::new("ip").args(["-o", "link", "show"])) else {
        return Vec::new();
    };
    out.lines()
        // "12: name@if3: <...>" or "12: name: <...>"
        .filter_map(|line| line.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Devices, network namespaces and bpffs pins whose names start with one of `prefixes`.
pub fn leftovers(prefixes: &[String]) -> Vec<String> {
    let ours = |n: &str| prefixes.iter().any(|p| n.starts_with(p.as_str()));
    let mut left: Vec<String> = host_links()
        .into_iter()
        .filter(|n| ours(n))
        .map(|n| format!("link {n}"))
        .collect();
    let netns = run(Command::new("ip").args(["netns", "list"])).expect("ip netns list");
    for line in netns.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if ours(name) {
            left.push(format!("netns {name}"));
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf").expect("listing /sys/fs/bpf") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        if ours(&name) {
            left.push(format!("pins /sys/fs/bpf/{name}"));
        }
    }
    left
}

/// Runs `scenario`, then fails if it left a device, namespace or pin named with one of
/// `prefixes` behind, also when the scenario failed (its panic is resumed, with what was left
/// printed).
pub fn leaves_nothing<R>(
    prefixes: &[String],
    scenario: impl FnOnce() -> R + std::panic::UnwindSafe,
) -> R {
    let outcome = std::panic::catch_unwind(scenario);
    // Everything the scenario created is dropped by now, also after a panic.
    let left = leftovers(prefixes);
    match outcome {
        Ok(r) => {
            assert!(left.is_empty(), "left behind after the test: {left:#?}");
            r
        }
        Err(p) => {
            if !left.is_empty() {
                eprintln!("also left behind after the failure: {left:#?}");
            }
            std::panic::resume_unwind(p)
        }
    }
}

/// A host device deleted on drop (for taps and veths a test creates outside an endpoint).
pub struct LinkGuard(pub String);

impl std::fmt::Debug for LinkGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkGuard").finish_non_exhaustive()
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["link", "del", &self.0]));
    }
}
