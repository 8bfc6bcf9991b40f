//! Short-lived kernel objects with unique names: network namespaces and bpffs pin directories
//! that the demo and the doctor's probes create and remove again on drop, also on an error
//! or a panic.
//!
//! Everything created here carries the `atl` prefix plus the process id and a counter. The
//! tests use these through the `atoll-testbed` crate, which adds what only tests need (frame
//! builders, device guards, the root check); no test code lives in this library.

use std::{
    io,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::types::radix36;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique name `atl<tag><pid36, 5 digits><n36>` of at most 15 bytes, for devices, namespaces
/// and pins. The pid has a fixed width (base 36, 5 digits cover pid_max 2^22), so no two
/// processes can produce the same name.
pub fn unique_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{}{}", unique_prefix(tag), radix36(u64::from(n)));
    assert!(name.len() < 16, "name {name} too long: shorten the tag");
    name
}

/// The prefix shared by every name `unique_name(tag)` returns in this process.
pub fn unique_prefix(tag: &str) -> String {
    format!("atl{tag}{:0>5}", radix36(u64::from(std::process::id())))
}

/// Runs a command and returns its stdout, or an error carrying its stderr.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let out: Output = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetNs").finish_non_exhaustive()
    }
}

impl NetNs {
    /// Creates a namespace with loopback up and IPv6 disabled (so guests emit no router
    /// solicitations or MLD reports that would show up as drops).
    pub fn new(name: &str) -> io::Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs { name: name.into() };
        ns.sh("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; ip link set lo up")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path usable with setns, e.g. for creating a veth peer inside it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Runs a program inside the namespace and returns whether it exited successfully.
    pub fn succeeds(&self, args: &[&str]) -> io::Result<bool> {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        Ok(st.success())
    }

    /// Runs a shell snippet inside the namespace.
    pub fn sh(&self, script: &str) -> io::Result<String> {
        self.exec(&["sh", "-c", script])
    }

    /// Configures a guest interface: IPv6 off, `addr/prefix`, up, default route via `gateway`.
    pub fn configure_guest(
        &self,
        ifname: &str,
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Ipv4Addr,
    ) -> io::Result<()> {
        self.sh(&format!(
            "echo 1 > /proc/sys/net/ipv6/conf/{ifname}/disable_ipv6 && \
             ip addr add {addr}/{prefix} dev {ifname} && ip link set {ifname} up && \
             ip route add default via {gateway} dev {ifname}"
        ))?;
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// A bpffs directory for one test's or the demo's pins, removed (with everything pinned under
/// it, which detaches its links) on drop.
pub struct PinRoot {
    path: PathBuf,
}

impl std::fmt::Debug for PinRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinRoot").finish_non_exhaustive()
    }
}

impl PinRoot {
    pub fn new(tag: &str) -> Self {
        PinRoot {
            path: PathBuf::from("/sys/fs/bpf").join(unique_name(tag)),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unique_names_fit_ifnamsiz() {
        let a = super::unique_name("xy");
        let b = super::unique_name("xy");
        assert_ne!(a, b);
        assert!(a.len() <= 15 && a.starts_with("atl"));
    }
}
