//! `cargo xtask install` / `uninstall`: atoll on a host with systemd.
//!
//! Installs, under `--root` (default `/`; a directory for packaging and for the tests):
//! the release binaries in `usr/local/bin`, the checked-in units of `deploy/systemd/` in
//! `etc/systemd/system`, the commented default configs of `deploy/` in `etc/atoll` (mode 0600,
//! never over an existing file), and the docs in `usr/local/share/doc/atoll`. Then the units
//! are checked with `systemd-analyze verify`, and systemd is reloaded where it runs as PID 1
//! (where it does not, as on CI, that is said, and the units are still verified).
//!
//! Decisions:
//! - **Uninstall removes what install wrote**: binaries, units, docs, and configs still equal
//!   to the shipped defaults. A config an operator edited, and the state under
//!   `/var/lib/atoll` (tenants' volumes, the store, usage journals), are kept and listed with
//!   the command that removes them: an uninstall must never destroy data. The dataplane,
//!   devices and VMs are removed by `atoll-agent cleanup`, which uninstall runs first when the
//!   agent binary is installed.
//! - Units are enabled but not started by install: starting the agent takes over the host's
//!   networking for guests and is the operator's decision.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

/// `(source relative to the workspace, destination relative to the root, mode, config)`.
const FILES: &[(&str, &str, u32, bool)] = &[
    (
        "target/release/atoll-agent",
        "usr/local/bin/atoll-agent",
        0o755,
        false,
    ),
    ("target/release/atoll", "usr/local/bin/atoll", 0o755, false),
    (
        "deploy/systemd/atoll-agent.service",
        "etc/systemd/system/atoll-agent.service",
        0o644,
        false,
    ),
    (
        "deploy/systemd/atoll-control.service",
        "etc/systemd/system/atoll-control.service",
        0o644,
        false,
    ),
    ("deploy/agent.toml", "etc/atoll/agent.toml", 0o600, true),
    ("deploy/control.toml", "etc/atoll/control.toml", 0o600, true),
    (
        "docs/design.md",
        "usr/local/share/doc/atoll/design.md",
        0o644,
        false,
    ),
    (
        "docs/vm.md",
        "usr/local/share/doc/atoll/vm.md",
        0o644,
        false,
    ),
    (
        "docs/operations.md",
        "usr/local/share/doc/atoll/operations.md",
        0o644,
        false,
    ),
];

/// The units, relative to the root.
pub const UNITS: &[&str] = &[
    "etc/systemd/system/atoll-agent.service",
    "etc/systemd/system/atoll-control.service",
];

fn systemd_is_pid1() -> bool {
    fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// Copies the files from `workspace` under `root`.
pub fn install(workspace: &Path, root: &Path) -> Result<()> {
    for (src, dst, mode, config) in FILES {
        let from = workspace.join(src);
        let to = root.join(dst);
        if *config && to.exists() {
            eprintln!("xtask install: keeping {} (exists)", to.display());
            continue;
        }
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // Into a temporary name, then renamed: a running binary is replaced, not rewritten.
        let tmp = to.with_extension("atoll-new");
        fs::copy(&from, &tmp)
            .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
        fs::rename(&tmp, &to)?;
        eprintln!("xtask install: {}", to.display());
    }
    verify_units(root)?;
    if root == Path::new("/") && systemd_is_pid1() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        run(Command::new("systemctl").args(["enable", "atoll-agent.service"]))?;
        eprintln!("xtask install: enabled atoll-agent.service; start it with `systemctl start atoll-agent`");
    } else if root == Path::new("/") {
        eprintln!(
            "xtask install: systemd is not PID 1 on this machine: the units are installed and \
             verified, but not loaded; run `atoll-agent --config /etc/atoll/agent.toml run` by hand"
        );
    }
    Ok(())
}

/// `systemd-analyze verify` of the installed units. For another root, a copy of each unit whose
/// `ExecStart=` names the root's binaries is verified against this host's systemd (its
/// `--root` would look for systemd's own targets in the root too).
pub fn verify_units(root: &Path) -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let mut units = Vec::new();
    for u in UNITS {
        let path = root.join(u);
        if root == Path::new("/") {
            units.push(path);
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let rooted = text.replace(
            "ExecStart=/usr/local/bin/",
            &format!("ExecStart={}/usr/local/bin/", root.display()),
        );
        let copy = scratch.path().join(path.file_name().context("unit name")?);
        fs::write(&copy, rooted)?;
        units.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .context("running systemd-analyze (Debian package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings about other units of the host are not ours; any line naming ours is.
    anyhow::ensure!(
        out.status.success() && !stderr.contains("atoll"),
        "systemd-analyze verify found problems in the units:\n{stderr}"
    );
    eprintln!("xtask install: units verified by systemd-analyze");
    Ok(())
}

/// Removes what `install` wrote under `root` (see the module docs for what stays).
pub fn uninstall(workspace: &Path, root: &Path) -> Result<Vec<PathBuf>> {
    let agent = root.join("usr/local/bin/atoll-agent");
    if root == Path::new("/") && agent.exists() {
        if systemd_is_pid1() {
            let _ = Command::new("systemctl")
                .args([
                    "disable",
                    "--now",
                    "atoll-agent.service",
                    "atoll-control.service",
                ])
                .status();
        }
        let config = root.join("etc/atoll/agent.toml");
        let mut cleanup = Command::new(&agent);
        if config.exists() {
            cleanup.arg("--config").arg(&config);
        }
        run(cleanup.arg("cleanup"))?;
    }
    let mut kept = Vec::new();
    for (src, dst, _, config) in FILES {
        let path = root.join(dst);
        if !path.exists() {
            continue;
        }
        if *config && fs::read(&path).ok() != fs::read(workspace.join(src)).ok() {
            kept.push(path);
            continue;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        eprintln!("xtask uninstall: removed {}", path.display());
    }
    for dir in ["usr/local/share/doc/atoll", "etc/atoll"] {
        // Only when empty.
        let _ = fs::remove_dir(root.join(dir));
    }
    for state in ["var/lib/atoll", "var/lib/atoll-control"] {
        if root.join(state).exists() {
            kept.push(root.join(state));
        }
    }
    for k in &kept {
        eprintln!(
            "xtask uninstall: kept {} (edited config or data); remove it with `rm -r {}`",
            k.display(),
            k.display()
        );
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Install into a directory with stand-in binaries, verify the units there, uninstall:
    /// nothing of atoll's is left but an edited config.
    #[test]
    fn install_verify_and_uninstall_into_a_root() {
        let ws = tempfile::tempdir().unwrap();
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for (src, _, _, _) in FILES {
            let to = ws.path().join(src);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            if src.starts_with("target/") {
                // systemd-analyze checks that ExecStart's binary exists and is executable.
                fs::write(&to, "#!/bin/sh\n").unwrap();
            } else if real.join(src).exists() {
                fs::copy(real.join(src), &to).unwrap();
            } else {
                fs::write(&to, "stand-in\n").unwrap();
            }
        }
        let root = tempfile::tempdir().unwrap();
        install(ws.path(), root.path()).unwrap();
        for (_, dst, mode, _) in FILES {
            let m = fs::metadata(root.path().join(dst)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(m.permissions().mode() & 0o777, *mode, "{dst}");
        }
        // A second install keeps the (edited) config.
        fs::write(root.path().join("etc/atoll/agent.toml"), "# edited\n").unwrap();
        install(ws.path(), root.path()).unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("etc/atoll/agent.toml")).unwrap(),
            "# edited\n"
        );
        let kept = uninstall(ws.path(), root.path()).unwrap();
        assert_eq!(kept, vec![root.path().join("etc/atoll/agent.toml")]);
        for (_, dst, _, _) in FILES.iter().filter(|f| !f.3) {
            assert!(!root.path().join(dst).exists(), "{dst} left");
        }
        assert!(!root.path().join("etc/atoll/control.toml").exists());
    }

    /// A unit with a mistake is refused by the verification.
    #[test]
    fn a_broken_unit_fails_verification() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("usr/local/bin");
        fs::create_dir_all(&bin).unwrap();
        for b in ["atoll-agent", "atoll"] {
            fs::write(bin.join(b), "#!/bin/sh\n").unwrap();
            fs::set_permissions(
                bin.join(b),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
        }
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let units = root.path().join("etc/systemd/system");
        fs::create_dir_all(&units).unwrap();
        fs::copy(
            real.join("deploy/systemd/atoll-control.service"),
            units.join("atoll-control.service"),
        )
        .unwrap();
        let agent = fs::read_to_string(real.join("deploy/systemd/atoll-agent.service")).unwrap();
        fs::write(
            units.join("atoll-agent.service"),
            agent.replace("KillMode=process", "KillMode=bogus"),
        )
        .unwrap();
        let err = verify_units(root.path()).unwrap_err().to_string();
        assert!(err.contains("kill mode"), "{err}");
    }
}
