//! Expedited RCU grace periods while the agent changes TCX links and devices.
//!
//! Every TCX attach and detach commits with `synchronize_rcu()` under the RTNL lock, so a cold
//! tap endpoint (two attaches) waits two normal grace periods: about 25 ms per tap measured on
//! the development host (nested virtualisation), and deleting a tap costs about 34 ms. With
//! `/sys/kernel/rcu_expedited` = 1 the kernel expedites those waits (IPIs instead of waiting
//! for every CPU to pass a quiescent state): 0.4 ms per attached tap and 16 ms per delete,
//! measured the same way (20 spare taps created, attached and destroyed; `cargo xtask bench`
//! reports cold creates both ways).
//!
//! Decision: the agent turns the setting on **only while** it attaches, detaches or deletes
//! endpoint devices, and restores it afterwards ([`Expedite::hold`]); `dataplane.expedite_rcu
//! = false` turns this off. A host-wide permanent `rcupdate.rcu_expedited=1` would affect every
//! `synchronize_rcu()` caller at all times; holding it for the few milliseconds of a batch of
//! link changes confines the effect (other callers in that window only get faster, at the
//! cost of a few IPIs). If the operator already set it, the agent leaves it alone.
//!
//! Several agents (and tests) on one host share the knob, so holders register in a small file
//! under `/run` guarded by `flock`: `<prior value> <pid> <pid> ...`. The first holder records
//! the prior value and sets 1, the last one restores it. Holders that died without releasing
//! (kill -9) are pruned by pid when the registry is next touched, so the knob is never left
//! on by a crashed agent once another atoll process runs. Within one process the holds are
//! counted, so nested and concurrent holds are cheap and never block each other.
//!
//! If the knob or the registry cannot be written (no such file, read-only sysfs in a
//! container, not root), holding does nothing: link changes are just slower.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// The kernel's knob.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";
/// The holders' registry.
pub const REGISTRY: &str = "/run/atoll-rcu-expedited";

#[derive(Debug, thiserror::Error)]
pub enum ExpediteError {
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Where the knob and the registry are (real paths in the agent, temporary files in tests).
#[derive(Debug, Clone)]
pub struct Expedite {
    knob: PathBuf,
    registry: PathBuf,
    enabled: bool,
}

/// Per-process state of one (knob, registry) pair: how many holds are live.
struct Local {
    registry: PathBuf,
    holds: usize,
}

static LOCAL: Mutex<Vec<Local>> = Mutex::new(Vec::new());

/// While alive, the knob is 1 (if it could be set). Dropping it releases the hold.
#[must_use = "the knob is restored when the guard is dropped"]
pub struct ExpediteGuard {
    owner: Option<Expedite>,
}

impl std::fmt::Debug for ExpediteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpediteGuard").finish_non_exhaustive()
    }
}

impl Drop for ExpediteGuard {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            owner.release();
        }
    }
}

impl Expedite {
    /// The host's knob and registry; `enabled = false` makes every hold a no-op.
    pub fn host(enabled: bool) -> Self {
        Expedite {
            knob: KNOB.into(),
            registry: REGISTRY.into(),
            enabled,
        }
    }

    /// A knob and registry at other paths (tests).
    pub fn at(knob: impl Into<PathBuf>, registry: impl Into<PathBuf>) -> Self {
        Expedite {
            knob: knob.into(),
            registry: registry.into(),
            enabled: true,
        }
    }

    /// Expedites grace periods until the guard is dropped. Never fails: if the knob cannot be
    /// set, the guard does nothing (see module docs).
    pub fn hold(&self) -> ExpediteGuard {
        if !self.enabled {
            return ExpediteGuard { owner: None };
        }
        let mut local = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = local.iter_mut().find(|l| l.registry == self.registry) {
            l.holds += 1;
            return ExpediteGuard {
                owner: Some(self.clone()),
            };
        }
        match self.update(|r| {
            r.holders.push(std::process::id());
        }) {
            Ok(()) => {
                local.push(Local {
                    registry: self.registry.clone(),
                    holds: 1,
                });
                ExpediteGuard {
                    owner: Some(self.clone()),
                }
            }
            Err(_) => ExpediteGuard { owner: None },
        }
    }

    fn release(&self) {
        let mut local = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = local.iter().position(|l| l.registry == self.registry) else {
            return;
        };
        local[i].holds -= 1;
        if local[i].holds > 0 {
            return;
        }
        local.swap_remove(i);
        let me = std::process::id();
        // Best effort: a failure leaves our pid registered, and the next process to touch the
        // registry prunes it once we have exited.
        let _ = self.update(|r| r.holders.retain(|p| *p != me));
    }

    /// Applies `change` to the registry under its lock, prunes dead holders, and sets the knob
    /// to 1 while there are holders, else back to the recorded prior value.
    fn update(&self, change: impl FnOnce(&mut Registry)) -> Result<(), ExpediteError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.registry)
            .map_err(|source| ExpediteError::Open {
                path: self.registry.clone(),
                source,
            })?;
        let _lock = Flock::exclusive(&file).map_err(|source| ExpediteError::Lock {
            path: self.registry.clone(),
            source,
        })?;
        let mut text = String::new();
        (&file)
            .read_to_string(&mut text)
            .map_err(|source| ExpediteError::Read {
                path: self.registry.clone(),
                source,
            })?;
        let mut reg = Registry::parse(&text);
        // Holders recorded (alive or not) mean the knob was set by atoll and `prior` is the
        // operator's value; with none, the knob's current value is the operator's.
        let had_holders = !reg.holders.is_empty();
        reg.holders.retain(|p| pid_alive(*p));
        let knob = read_knob(&self.knob)?;
        if !had_holders {
            reg.prior = knob;
        }
        change(&mut reg);
        reg.holders.sort_unstable();
        reg.holders.dedup();
        let want = if reg.holders.is_empty() {
            reg.prior
        } else {
            b'1'
        };
        if knob != want {
            write_knob(&self.knob, want)?;
        }
        let write = |source| ExpediteError::Write {
            path: self.registry.clone(),
            source,
        };
        file.set_len(0).map_err(write)?;
        (&file).rewind().map_err(write)?;
        (&file).write_all(reg.render().as_bytes()).map_err(write)?;
        Ok(())
    }
}

/// The registry's content.
#[derive(Debug, PartialEq)]
struct Registry {
    /// The knob's value before the first holder set it (`b'0'` or `b'1'`).
    prior: u8,
    holders: Vec<u32>,
}

impl Registry {
    fn parse(text: &str) -> Self {
        let mut words = text.split_whitespace();
        let prior = match words.next() {
            Some("1") => b'1',
            _ => b'0',
        };
        Registry {
            prior,
            holders: words.filter_map(|w| w.parse().ok()).collect(),
        }
    }

    fn render(&self) -> String {
        let mut s = String::from(self.prior as char);
        for p in &self.holders {
            s.push(' ');
            s.push_str(&p.to_string());
        }
        s.push('\n');
        s
    }
}

fn read_knob(path: &Path) -> Result<u8, ExpediteError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExpediteError::Read {
        path: path.into(),
        source,
    })?;
    Ok(if text.trim() == "0" { b'0' } else { b'1' })
}

fn write_knob(path: &Path, value: u8) -> Result<(), ExpediteError> {
    std::fs::write(path, [value, b'\n']).map_err(|source| ExpediteError::Write {
        path: path.into(),
        source,
    })
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists; no signal is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An exclusive `flock` on a file, released on drop.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a File) -> io::Result<Self> {
        loop {
            // SAFETY: flock on a file descriptor owned by `file`, which outlives the guard.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Flock(file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocks the lock taken in `exclusive` on the same, still open descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(knob: &str) -> (tempfile::TempDir, Expedite) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("knob"), knob).unwrap();
        let e = Expedite::at(dir.path().join("knob"), dir.path().join("registry"));
        (dir, e)
    }

    fn knob(dir: &tempfile::TempDir) -> String {
        std::fs::read_to_string(dir.path().join("knob"))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn sets_while_held_and_restores() {
        let (dir, e) = setup("0\n");
        {
            let _a = e.hold();
            assert_eq!(knob(&dir), "1");
            {
                let _b = e.hold();
                assert_eq!(knob(&dir), "1");
            }
            assert_eq!(knob(&dir), "1", "an inner release must not restore");
        }
        assert_eq!(knob(&dir), "0");
        let reg = std::fs::read_to_string(dir.path().join("registry")).unwrap();
        assert_eq!(reg, "0\n");
    }

    #[test]
    fn leaves_an_operator_setting_alone() {
        let (dir, e) = setup("1\n");
        {
            let _a = e.hold();
            assert_eq!(knob(&dir), "1");
        }
        assert_eq!(knob(&dir), "1");
    }

    #[test]
    fn prunes_a_dead_holder_and_restores_its_prior_value() {
        let (dir, e) = setup("1\n");
        // A crashed holder: it recorded prior 0, set the knob, and died (u32::MAX does not fit
        // a pid, so it is never alive).
        std::fs::write(dir.path().join("registry"), format!("0 {}\n", u32::MAX)).unwrap();
        {
            let _a = e.hold();
            assert_eq!(knob(&dir), "1");
        }
        assert_eq!(
            knob(&dir),
            "0",
            "the crashed holder's prior value is restored"
        );
    }

    #[test]
    fn other_live_holders_keep_it_set() {
        let (dir, e) = setup("0\n");
        // pid 1 (init) is alive: another process holds it.
        std::fs::write(dir.path().join("registry"), "0 1\n").unwrap();
        std::fs::write(dir.path().join("knob"), "1\n").unwrap();
        {
            let _a = e.hold();
        }
        assert_eq!(knob(&dir), "1");
        let reg = std::fs::read_to_string(dir.path().join("registry")).unwrap();
        assert_eq!(reg, "0 1\n");
    }

    #[test]
    fn unwritable_knob_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let e = Expedite::at(dir.path().join("missing/knob"), dir.path().join("registry"));
        let g = e.hold();
        assert!(g.owner.is_none());
        assert!(Expedite::host(false).hold().owner.is_none());
    }

    #[test]
    fn registry_round_trips() {
        let r = Registry::parse("1 20 30\n");
        assert_eq!(
            r,
            Registry {
                prior: b'1',
                holders: vec![20, 30]
            }
        );
        assert_eq!(r.render(), "1 20 30\n");
        assert_eq!(Registry::parse("garbage").prior, b'0');
    }
}
