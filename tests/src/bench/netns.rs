//! A network namespace the benchmarks build their hosts in: tools run inside it (`setns`
//! between fork and exec, so they see only its devices) and tap queues opened inside it.

use std::{
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context, Result};
use atoll_agent::device::open_tap_queue;
use atoll_testbed::{unique_name, NetNs};

/// A uniquely named namespace (removed on drop) and an open handle on it.
pub struct Ns {
    pub ns: NetNs,
    file: File,
}

impl Ns {
    pub fn new(tag: &str) -> Result<Self> {
        let ns = NetNs::new(&unique_name(tag))?;
        let file = File::open(ns.path()).context("opening the namespace")?;
        Ok(Ns { ns, file })
    }

    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `program` started directly in the namespace (`setns` between fork and exec).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and calls only setns, which
        // is async-signal-safe; `fd` is open in the parent for the duration of the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        cmd
    }

    /// Runs `program` in the namespace with `stdin`; its stdout, or an error with its stderr.
    pub fn run(&self, program: &str, args: &[&str], stdin: &str) -> Result<String> {
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} (is it installed?)"))?;
        // A tool that fails stops reading: its exit status and stderr say why, not the pipe.
        let written = child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes());
        let out = child.wait_with_output()?;
        if out.status.success() {
            written.with_context(|| format!("writing to {program}"))?;
        } else {
            bail!(
                "{program} {args:?} in {} failed ({}): {}",
                self.ns.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `f` on a short-lived thread inside the namespace (device lookups by name, sockets and
    /// tun fds are the namespace's).
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns changes only this short-lived thread's network namespace.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error()).context("entering the namespace");
                }
                f()
            })
            .join()
            .map_err(|_| anyhow!("a thread in the namespace panicked"))?
        })
    }

    /// Opens a queue of tap `name` in the namespace.
    pub fn open_tap(&self, name: &str) -> Result<OwnedFd> {
        self.inside(|| Ok(open_tap_queue(name, true)?))
    }
}
