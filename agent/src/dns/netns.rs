//! Named network namespaces, made the way `ip netns add` makes them (so `ip netns` lists, enters
//! and deletes them too), and running code inside one.
//!
//! Decisions:
//! - A namespace is kept alive by a bind mount of its nsfs inode on `/run/netns/<name>`; no
//!   process has to stay in it. `/run/netns` is made a shared mount point first (as iproute2
//!   does), so the mount propagates to mount namespaces created later.
//! - [`ensure`] is idempotent: an existing nsfs mount is reused (the agent restarted), an empty
//!   leftover file (a crash between creating the file and mounting) is mounted over.
//! - Code runs in a namespace on a short-lived thread that `setns(2)`s into it ([`run_in`]);
//!   sockets created there stay in that namespace for their whole life, wherever they are used.

use std::{
    ffi::CString,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

/// Where named network namespaces are mounted.
pub const RUN_DIR: &str = "/run/netns";
const NSFS_MAGIC: i64 = 0x6e73_6673;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace name {0:?}: 1-64 of [A-Za-z0-9_.-], not \".\" or \"..\"")]
    InvalidName(String),
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("making {path} a shared mount point: {source}")]
    ShareRunDir { path: PathBuf, source: io::Error },
    #[error("creating the mount point {path}: {source}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("creating a network namespace: {0}")]
    Unshare(#[source] io::Error),
    #[error("mounting the new network namespace on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("unmounting network namespace {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
    #[error("removing {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("a thread working in network namespace {0} panicked")]
    ThreadPanicked(PathBuf),
}

/// Checks a namespace name (a file name under [`RUN_DIR`]).
pub fn validate_name(name: &str) -> Result<(), NetnsError> {
    crate::config::check_netns_name(name).map_err(|_| NetnsError::InvalidName(name.into()))
}

/// `/run/netns/<name>`.
pub fn path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

/// True if `path` is a mounted network namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs only writes into the zeroed struct we own; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == NSFS_MAGIC
}

/// Creates the named namespace unless it exists; returns its path.
pub fn ensure(name: &str) -> Result<PathBuf, NetnsError> {
    validate_name(name)?;
    let target = path(name);
    if is_mounted(&target) {
        return Ok(target);
    }
    std::fs::create_dir_all(RUN_DIR).map_err(|source| NetnsError::CreateDir {
        path: RUN_DIR.into(),
        source,
    })?;
    share_run_dir()?;
    let created = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
    {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(source) => {
            return Err(NetnsError::CreateFile {
                path: target,
                source,
            })
        }
    };
    let mounted = std::thread::scope(|s| {
        s.spawn(|| mount_new_namespace(&target))
            .join()
            .unwrap_or_else(|_| Err(NetnsError::ThreadPanicked(target.clone())))
    });
    if mounted.is_err() && created {
        let _ = std::fs::remove_file(&target);
    }
    mounted.map(|()| target.clone())
}

/// On the calling (short-lived) thread: a new network namespace, bind-mounted on `target`.
fn mount_new_namespace(target: &Path) -> Result<(), NetnsError> {
    // SAFETY: unshare only changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Unshare(io::Error::last_os_error()));
    }
    let mount_err = |source| NetnsError::Mount {
        path: target.into(),
        source,
    };
    let dst =
        CString::new(target.as_os_str().as_bytes()).map_err(|e| mount_err(io::Error::other(e)))?;
    // SAFETY: both paths are NUL-terminated; a bind mount takes no data.
    let rc = unsafe {
        libc::mount(
            c"/proc/thread-self/ns/net".as_ptr(),
            dst.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes [`RUN_DIR`] a shared mount point, bind-mounting it on itself first if it is not a
/// mount point yet (exactly what iproute2 does).
fn share_run_dir() -> Result<(), NetnsError> {
    let share = || {
        // SAFETY: a propagation change takes no source, type or data.
        let rc = unsafe {
            libc::mount(
                c"".as_ptr(),
                c"/run/netns".as_ptr(),
                c"none".as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let err = |source| NetnsError::ShareRunDir {
        path: RUN_DIR.into(),
        source,
    };
    match share() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // SAFETY: both paths are NUL-terminated; a bind mount takes no data.
            let rc = unsafe {
                libc::mount(
                    c"/run/netns".as_ptr(),
                    c"/run/netns".as_ptr(),
                    c"none".as_ptr(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(err(io::Error::last_os_error()));
            }
            share().map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Removes the named namespace (unmount and unlink); a missing one is not an error. The
/// namespace itself ends when nothing (process, socket, device) uses it any more.
pub fn remove(name: &str) -> Result<(), NetnsError> {
    validate_name(name)?;
    let target = path(name);
    if !target.exists() {
        return Ok(());
    }
    if is_mounted(&target) {
        let c = CString::new(target.as_os_str().as_bytes()).map_err(|e| NetnsError::Unmount {
            path: target.clone(),
            source: io::Error::other(e),
        })?;
        // SAFETY: `c` is NUL-terminated; MNT_DETACH unmounts lazily.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::EINVAL) {
                return Err(NetnsError::Unmount {
                    path: target,
                    source,
                });
            }
        }
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: target,
            source,
        }),
    }
}

/// Runs `f` on a new thread that has entered the network namespace at `ns` and returns its
/// result. Sockets `f` creates belong to that namespace.
pub fn run_in<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = std::fs::File::open(ns).map_err(|source| NetnsError::Open {
        path: ns.into(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns only changes this thread's network namespace; the fd is open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Enter {
                    path: ns.into(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetnsError::ThreadPanicked(ns.into())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["atoll-dns", "a", "atl_x.1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
