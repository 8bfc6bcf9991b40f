//! A VMM's runtime directory as the agent sees it, and how the agent recognises a VMM it did
//! not start itself. The VMM is untrusted: a guest that escapes into it holds its uid, so
//! nothing the agent (root) does may be steered by what that uid can write.
//!
//! Decisions (docs/design.md, "Trust boundaries", VMM → agent):
//! - **Layout.** `<vm.run_dir>` is root's, mode 0711. Each VM has `s<slot>/`, owned by root and
//!   the VM's gid, mode 0710: it holds what only the agent writes (`identity`, `vmm.pid`,
//!   `config.tar`, each 0600 root) and the agent's console socket (`console.sock`, root and the
//!   VM's gid, 0660, which QEMU connects to). Inside it, `vmm/` is the VMM's own (its uid, 0700):
//!   its working directory and the only place it can write by path (QEMU's `shell.sock`).
//! - **No path the VMM can write is ever resolved by the agent.** `s<slot>/` is opened once as
//!   a directory fd (`O_NOFOLLOW`), checked and made root's; every record is created with
//!   `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` after an `unlinkat`, read with `O_NOFOLLOW`, and the
//!   console socket is bound under `/proc/self/fd/<dirfd>/` and given its owner and mode with
//!   `fchownat(AT_SYMLINK_NOFOLLOW)`, so even a swapped path component could not redirect a
//!   write. The agent never writes, chowns or reads inside `vmm/`; it only removes it whole
//!   before each launch (std's `remove_dir_all` unlinks links instead of following them).
//! - **The older layout** (before this module: `s<slot>/` owned by the VM's uid, records inside)
//!   is taken over in place: the directory is made root's before anything in it is read, so the
//!   VMM cannot write there any more, and every record in it is then only a candidate that the
//!   facts below must confirm. A running VMM of that layout is adopted (its console reconnects
//!   to the same path); its shell socket stays where it was until its next start.
//! - **A VMM is named by facts it cannot forge.** The agent holds a pidfd for every VMM it
//!   started. After an agent restart, a recorded pid is adopted (or, if it belongs to another VM
//!   that held the slot, killed) only if the live process runs with the slot's uid and gid
//!   (real, effective, saved and filesystem), executes the driver's program, has this VM's name
//!   on its command line (for adoption), and has the start time recorded beside the pid. The
//!   facts are read while a pidfd is held, and the pidfd is checked to be still running after
//!   the reads, so a pid reused in between cannot pass. What is refused is logged.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use tokio::{io::unix::AsyncFd, net::UnixListener};

/// Records the agent keeps in `s<slot>/`.
pub const IDENTITY: &str = "identity";
pub const PID: &str = "vmm.pid";
pub const CONFIG_DRIVE: &str = "config.tar";
pub const CONSOLE_SOCKET: &str = "console.sock";
/// The VMM's own directory inside `s<slot>/`.
pub const VMM_DIR: &str = "vmm";

/// Records are small; anything longer is not one of ours.
const MAX_RECORD: u64 = 4096;

fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir_at(dir: RawFd, name: &CString) -> io::Result<OwnedFd> {
    // SAFETY: openat with a NUL-terminated name; a non-negative result is a fresh fd we own.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which we own for the call.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// Creates `dir` and its missing parents (root's, mode 0711 whatever the umask), gives an
/// existing `dir` mode 0711, and refuses one that is not root's: the VMMs must traverse it and
/// nothing else.
pub fn ensure_run_root(dir: &Path) -> io::Result<()> {
    atoll_api::private::create_dir_all(dir, 0o711)?;
    let meta = std::fs::symlink_metadata(dir)?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory owned by root (uid {})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o7777 != 0o711 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

/// A VM's `s<slot>/`, held open.
pub struct SlotDir {
    fd: OwnedFd,
    path: PathBuf,
    /// It was of the older layout (the VMM's) and has just been made root's.
    pub migrated: bool,
}

impl std::fmt::Debug for SlotDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotDir").finish_non_exhaustive()
    }
}

impl SlotDir {
    /// Opens (creating if needed) `<run_dir>/s<slot>` and makes it root's with the VM's `gid`,
    /// mode 0710, before anything in it is looked at.
    pub fn open(run_dir: &Path, slot: u32, gid: u32) -> io::Result<SlotDir> {
        ensure_run_root(run_dir)?;
        let name = format!("s{slot}");
        let path = run_dir.join(&name);
        let root = File::open(run_dir)?;
        let cname = cstr(&name)?;
        // SAFETY: mkdirat with a NUL-terminated name; EEXIST is handled below.
        if unsafe { libc::mkdirat(root.as_raw_fd(), cname.as_ptr(), 0o700) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        let fd = open_dir_at(root.as_raw_fd(), &cname)?;
        let st = fstat(fd.as_raw_fd())?;
        // SAFETY: fchown/fchmod on an fd we own.
        check(unsafe { libc::fchown(fd.as_raw_fd(), 0, gid) })?;
        // SAFETY: as above.
        check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o710) })?;
        Ok(SlotDir {
            fd,
            path,
            migrated: st.st_uid != 0,
        })
    }

    /// The directory's path (for the VMM's command line; the agent itself works on the fd).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the held directory, whatever happens to the path meanwhile.
    fn fd_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    fn unlink(&self, name: &str, flags: libc::c_int) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: unlinkat on our directory fd with a NUL-terminated name.
        match check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), flags) }) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Removes the record `name` (a link there is removed, never followed).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.unlink(name, 0)
    }

    /// Replaces the record `name` with `bytes` (a new file, root's, 0600).
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.remove(name)?;
        let c = cstr(name)?;
        // SAFETY: openat with a NUL-terminated name; O_EXCL | O_NOFOLLOW never opens an existing
        // file or link. A non-negative result is a fresh fd we own.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(bytes)
    }

    /// Opens the record `name` for reading, only if it is a regular file (never a link).
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        let c = cstr(name)?;
        // SAFETY: openat with a NUL-terminated name; O_NONBLOCK keeps a planted fifo from
        // blocking. A non-negative result is a fresh fd we own.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        let st = fstat(f.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is not a regular file"),
            ));
        }
        Ok(f)
    }

    /// The record `name` as text, if it is a regular file of at most 4 KiB.
    pub fn read(&self, name: &str) -> Option<String> {
        let mut s = String::new();
        self.open_read(name)
            .ok()?
            .take(MAX_RECORD)
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    }

    /// The recorded VMM: `(pid, start time)`.
    pub fn recorded_pid(&self) -> Option<(i32, u64)> {
        let text = self.read(PID)?;
        let mut it = text.split_whitespace();
        let pid: i32 = it.next()?.parse().ok()?;
        let start: u64 = it.next()?.parse().ok()?;
        (pid > 0).then_some((pid, start))
    }

    /// Binds the console socket the VMM connects to: root's, the VM's `gid`, mode 0660.
    pub fn bind_console(&self, gid: u32) -> io::Result<UnixListener> {
        self.remove(CONSOLE_SOCKET)?;
        let listener = UnixListener::bind(self.fd_path(CONSOLE_SOCKET))?;
        let c = cstr(CONSOLE_SOCKET)?;
        // SAFETY: fchownat on our directory fd with a NUL-terminated name, not following a link.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                0,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: fchmodat on our directory fd; the entry is the socket just bound in a
        // directory only root can write.
        check(unsafe { libc::fchmodat(self.fd.as_raw_fd(), c.as_ptr(), 0o660, 0) })?;
        Ok(listener)
    }

    /// Replaces `vmm/` with a new, empty directory of `uid` (mode 0700) and returns its path.
    pub fn reset_vmm_dir(&self, uid: u32) -> io::Result<PathBuf> {
        match std::fs::remove_dir_all(self.fd_path(VMM_DIR)) {
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => self.remove(VMM_DIR)?,
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let c = cstr(VMM_DIR)?;
        // SAFETY: mkdirat / fchownat / fchmodat on our directory fd with a NUL-terminated name;
        // the entry was just created in a directory only root can write.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), 0o700) })?;
        // SAFETY: as above.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                uid,
                uid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: as above.
        check(unsafe { libc::fchmodat(self.fd.as_raw_fd(), c.as_ptr(), 0o700, 0) })?;
        Ok(self.path.join(VMM_DIR))
    }
}

/// What a live process must be for the agent to take it as a VMM.
#[derive(Debug)]
pub struct Expected<'a> {
    /// The slot's uid (and gid).
    pub uid: u32,
    /// The driver's program, as configured (compared after resolving links).
    pub program: &'a Path,
    /// A command-line argument that names the VM (`<name>` or `<name>,…`), when the VM matters.
    pub name: Option<&'a str>,
    /// The start time recorded beside the pid (clock ticks since boot).
    pub start: u64,
}

/// A pidfd for `pid`, if the live process is what `want` says; otherwise why not.
pub fn verify(pid: i32, want: &Expected<'_>) -> Result<AsyncFd<OwnedFd>, String> {
    let pidfd = pidfd_open(pid).map_err(|e| format!("no such process ({e})"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading its status: {e}"))?;
    for field in ["Uid", "Gid"] {
        let ids = proc_field(&status, field).unwrap_or_default();
        let ok = ids.len() == 4 && ids.iter().all(|&id| id == want.uid);
        if !ok {
            return Err(format!(
                "runs with {field} {ids:?}, not the slot's {}",
                want.uid
            ));
        }
    }
    let program =
        std::fs::canonicalize(want.program).unwrap_or_else(|_| want.program.to_path_buf());
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("reading its executable: {e}"))?;
    if exe != program {
        return Err(format!(
            "executes {}, not {}",
            exe.display(),
            program.display()
        ));
    }
    if let Some(name) = want.name {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| format!("reading its command line: {e}"))?;
        let named = cmdline.split(|&b| b == 0).any(|arg| {
            arg.strip_prefix(name.as_bytes())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b","))
        });
        if !named {
            return Err(format!("its command line does not name {name}"));
        }
    }
    match proc_start_time(pid) {
        Some(t) if t == want.start => {}
        t => {
            return Err(format!(
                "started at {t:?}, not at the recorded {}",
                want.start
            ))
        }
    }
    // The reads above were of `pid`; it is still the process the pidfd holds only if that
    // process has not exited (a pid is reused only after its process is reaped).
    if exited(pidfd.get_ref()) {
        return Err("it exited while being checked".into());
    }
    Ok(pidfd)
}

/// The four ids of a `/proc/<pid>/status` line such as `Uid:`.
fn proc_field(status: &str, field: &str) -> Option<Vec<u32>> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time in clock ticks since boot.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The wall-clock time (ms since the epoch) of a start time in clock ticks since boot: the
/// boot time of `/proc/stat` (whole seconds) plus the ticks.
pub fn start_unix_ms(start_ticks: u64) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(btime * 1000 + start_ticks * 1000 / hz)
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable then).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n != 0
}

pub fn pidfd_open(pid: i32) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the OwnedFd moves into the AsyncFd, which therefore owns the same open fd for
    // its whole lifetime.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

pub fn pidfd_signal(fd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: signals the process the pidfd refers to (never a reused pid); info is null.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
