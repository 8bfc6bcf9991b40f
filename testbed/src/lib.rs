//! What atoll's tests and benchmarks build their scenes with, in one place (`publish = false`):
//! uniquely named network namespaces and bpffs pin directories (from the agent's `scratch`
//! module, which its demo and doctor use too), guards that delete devices on drop, one frame
//! builder and parser with checksums ([`frame`]), and the one root check.
//!
//! Everything a test creates carries the `atl` prefix plus the process id and a counter, and is
//! removed on drop, also when the test fails or panics; CI checks that nothing is left behind.

use std::process::Command;

pub use atoll_agent::scratch::{run, unique_name, unique_prefix, NetNs, PinRoot};

pub mod frame;

/// Fails the calling test, loudly, unless it runs as root: tests that create namespaces,
/// devices, pins or programs need CAP_NET_ADMIN and CAP_BPF, and must never pass by skipping.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (network namespaces, devices, bpffs pins, eBPF programs): run the \
         root tests as root (`cargo xtask test`, or `cargo test --workspace` as root)"
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
        let Ok(out) = run(Command::new("ip").args(["-o", "link", "show"])) else {
            return;
        };
        for line in out.lines() {
            // "12: name@if3: <...>" or "12: name: <...>"
            let Some(name) = line
                .split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n))
            else {
                continue;
            };
            if name.starts_with(&self.0) {
                let _ = run(Command::new("ip").args(["link", "del", name]));
            }
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
