//! `atoll-guest-agent`: runs inside every microVM (started and respawned by `guest/init`) and
//! serves the host's exec and file sessions over the virtio-serial port `org.atoll.guest.0`
//! (protocol: the crate's library, `atoll_guest`).
//!
//! Decisions:
//! - **A static binary with threads, no async runtime**: it is copied into the initramfs and
//!   must run on busybox alone. One reader thread (this one) owns the port's input and never
//!   blocks on a session; each session has its own thread; frames are written whole under one
//!   lock.
//! - **A session's process is a process group of its own** (`setpgid`), so a kill from the host
//!   (a cancelled request, a timeout) takes its children too.
//! - **The exec ends when its process has exited and its output is drained**: stdout and
//!   stderr are read until both close or, once the process has exited, until they stay quiet
//!   for [`DRAIN_QUIET`]; a daemon the command left behind keeps running (starting a server is
//!   a legitimate exec) but no longer holds the session open.
//! - **Files are written to a temporary name beside the target and renamed into place** once
//!   complete (mode and owner set first), so a cancelled or failed upload never leaves a
//!   half-written file under the real name.
//! - When the host end is not connected, reads of the port return end-of-file (and `poll`
//!   says hang-up): every session ends (its processes killed) and the agent sleeps until the
//!   kernel signals that the host end opened (`SIGIO` from the port, `O_ASYNC`), at most
//!   [`RECONNECT_POLL`] at a time, so an idle VM does not wake for nothing.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::AsRawFd,
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use atoll_guest::{
    Decoder, ExecRequest, FileInfo, FileRequest, Frame, Kind, MAX_CHUNK, PORT_NAME, WINDOW,
};

const RECONNECT_POLL: Duration = Duration::from_secs(1);
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Sessions at once; more are refused with an error.
const MAX_SESSIONS: usize = 256;

fn log(msg: impl std::fmt::Display) {
    eprintln!("atoll-guest-agent: {msg}");
}

/// The port's output, shared by every session: a frame is written whole.
#[derive(Clone)]
struct Out(Arc<Mutex<File>>);

impl Out {
    fn send(&self, f: Frame) {
        let bytes = f.encode();
        let mut file = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // With the host gone, writes fail or vanish; the session ends on the next hello.
        let _ = file.write_all(&bytes);
    }
}

/// Credit to send output, granted by the host.
#[derive(Default)]
struct Credit {
    state: Mutex<(u64, bool)>,
    cv: Condvar,
}

impl Credit {
    fn new(initial: u64) -> Arc<Credit> {
        Arc::new(Credit {
            state: Mutex::new((initial, false)),
            cv: Condvar::new(),
        })
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, bool)> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
    fn add(&self, n: u32) {
        let mut s = self.lock();
        s.0 = s.0.saturating_add(n as u64);
        self.cv.notify_all();
    }
    fn close(&self) {
        self.lock().1 = true;
        self.cv.notify_all();
    }
    fn closed(&self) -> bool {
        self.lock().1
    }
    /// Waits up to `wait` for credit; `None` once closed, else what is available (maybe 0).
    fn available(&self, wait: Duration) -> Option<u64> {
        let mut s = self.lock();
        if s.0 == 0 && !s.1 {
            s = match self.cv.wait_timeout(s, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        (!s.1).then_some(s.0)
    }
    fn take(&self, n: u64) {
        let mut s = self.lock();
        s.0 = s.0.saturating_sub(n);
    }
}

enum Input {
    Data(Vec<u8>),
    End,
}

struct Session {
    credit: Arc<Credit>,
    /// The exec's process group, to kill.
    pgid: Arc<AtomicU64>,
    /// Where input goes (stdin, or the file being written), with the bytes queued there.
    input: Option<(mpsc::Sender<Input>, Arc<AtomicU64>)>,
}

impl Session {
    fn kill(&self) {
        self.credit.close();
        let pg = self.pgid.load(Ordering::SeqCst);
        if pg > 0 {
            // SAFETY: killpg has no memory-safety preconditions; the group is the session's.
            unsafe { libc::killpg(pg as libc::pid_t, libc::SIGKILL) };
        }
    }
}

type Sessions = Arc<Mutex<HashMap<u32, Session>>>;

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, HashMap<u32, Session>> {
    match s.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The device of the port named [`PORT_NAME`] (`/dev/vportNpM`).
fn find_port() -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// `SIGIO` only, blocked in every thread (taken with `sigtimedwait`).
fn sigio() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        set
    }
}

/// Waits for the port's `SIGIO` (the host end opened), at most [`RECONNECT_POLL`].
fn wait_for_host() {
    let set = sigio();
    let t = libc::timespec {
        tv_sec: RECONNECT_POLL.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to a set and a timeout; no siginfo wanted.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &t) };
}

fn main() {
    // Before any thread starts, so every thread inherits the mask.
    let set = sigio();
    // SAFETY: a valid set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut warned = false;
    let path = loop {
        match find_port() {
            Some(p) => break p,
            None => {
                if !warned {
                    log(format!("no virtio port {PORT_NAME} yet"));
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            log(format!("opening {}: {e}", path.display()));
            std::process::exit(1);
        }
    };
    let mut reader = match file.try_clone() {
        Ok(f) => f,
        Err(e) => {
            log(format!("duplicating {}: {e}", path.display()));
            std::process::exit(1);
        }
    };
    // SIGIO to this process when the host end opens (virtio_console's port-open event).
    // SAFETY: fcntl on an fd this function owns.
    unsafe {
        let fd = file.as_raw_fd();
        libc::fcntl(fd, libc::F_SETOWN, libc::getpid());
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC);
    }
    let out = Out(Arc::new(Mutex::new(file)));
    let sessions: Sessions = Arc::default();
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bad = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => {
                // The host end is not connected: nothing of an earlier connection survives.
                end_all(&sessions);
                decoder.reset();
                wait_for_host();
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(format!("reading {}: {e}", path.display()));
                end_all(&sessions);
                decoder.reset();
                std::thread::sleep(RECONNECT_POLL);
                continue;
            }
        };
        decoder.feed(&buf[..n], |f| match f {
            Ok(f) => handle(f, &out, &sessions),
            Err(e) => {
                bad += 1;
                if bad.is_power_of_two() {
                    log(format!("{bad} bad frames, the last: {e}"));
                }
            }
        });
    }
}

fn end_all(sessions: &Sessions) {
    for (_, s) in lock(sessions).drain() {
        s.kill();
    }
}

fn error(out: &Out, session: u32, msg: impl std::fmt::Display) {
    out.send(Frame::new(
        Kind::Error,
        session,
        msg.to_string().into_bytes(),
    ));
}

fn handle(f: Frame, out: &Out, sessions: &Sessions) {
    let s = f.session;
    match f.kind {
        Kind::Hello => {
            end_all(sessions);
            match f.as_hello() {
                Ok((_, nonce)) => out.send(Frame::hello(Kind::HelloAck, nonce)),
                Err(e) => log(e),
            }
        }
        Kind::Exec | Kind::ReadFile | Kind::WriteFile => {
            if s == 0 || lock(sessions).contains_key(&s) {
                return error(out, s, "session id in use");
            }
            if lock(sessions).len() >= MAX_SESSIONS {
                return error(out, s, format!("at most {MAX_SESSIONS} sessions at once"));
            }
            let started = match f.kind {
                Kind::Exec => f
                    .as_json::<ExecRequest>()
                    .map_err(|e| e.to_string())
                    .and_then(|r| start_exec(s, r, out, sessions)),
                Kind::ReadFile => f
                    .as_json::<FileRequest>()
                    .map_err(|e| e.to_string())
                    .and_then(|r| start_read(s, r, out, sessions)),
                _ => f
                    .as_json::<FileRequest>()
                    .map_err(|e| e.to_string())
                    .and_then(|r| start_write(s, r, out, sessions)),
            };
            if let Err(e) = started {
                error(out, s, e);
            }
        }
        Kind::Input | Kind::InputEnd => {
            let mut map = lock(sessions);
            let Some(sess) = map.get(&s) else { return };
            let Some((tx, queued)) = &sess.input else {
                return;
            };
            let msg = if f.kind == Kind::Input {
                let q = queued.fetch_add(f.body.len() as u64, Ordering::SeqCst);
                if q + f.body.len() as u64 > (WINDOW as u64) + MAX_CHUNK as u64 {
                    if let Some(sess) = map.remove(&s) {
                        sess.kill();
                    }
                    drop(map);
                    return error(out, s, "input beyond the credit granted");
                }
                Input::Data(f.body)
            } else {
                Input::End
            };
            let _ = tx.send(msg);
        }
        Kind::Kill => {
            if let Some(sess) = lock(sessions).remove(&s) {
                sess.kill();
            }
        }
        Kind::Credit => {
            if let (Some(sess), Ok(n)) = (lock(sessions).get(&s), f.as_u32()) {
                sess.credit.add(n);
            }
        }
        // Guest → host kinds coming back: ignored.
        _ => {}
    }
}

fn finish(s: u32, sessions: &Sessions) {
    lock(sessions).remove(&s);
}

fn start_exec(s: u32, r: ExecRequest, out: &Out, sessions: &Sessions) -> Result<(), String> {
    let Some(program) = r.argv.first() else {
        return Err("argv is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(&r.argv[1..])
        .env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .env("HOME", "/root")
        .envs(r.env.iter().map(|(k, v)| (k, v)))
        .current_dir(r.cwd.as_deref().unwrap_or("/root"))
        .stdin(if r.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {program:?}: {e}"))?;
    let pid = child.id();
    out.send(Frame::u32(Kind::Started, s, pid));
    let credit = Credit::new(WINDOW as u64);
    let input = child.stdin.take().map(|stdin| {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        let (o, q) = (out.clone(), queued.clone());
        std::thread::spawn(move || feed(s, stdin, rx, q, o));
        (tx, queued)
    });
    lock(sessions).insert(
        s,
        Session {
            credit: credit.clone(),
            pgid: Arc::new(AtomicU64::new(pid as u64)),
            input,
        },
    );
    let (out, sessions) = (out.clone(), sessions.clone());
    std::thread::spawn(move || {
        let (code, signal) = pump(s, &mut child, &credit, &out);
        finish(s, &sessions);
        out.send(Frame::exit(s, code, signal));
    });
    Ok(())
}

/// Writes a session's input to its process's stdin, granting credit back as it goes.
fn feed(s: u32, mut to: impl Write, rx: mpsc::Receiver<Input>, queued: Arc<AtomicU64>, out: Out) {
    while let Ok(Input::Data(d)) = rx.recv() {
        queued.fetch_sub(d.len() as u64, Ordering::SeqCst);
        if to.write_all(&d).is_err() {
            // The process closed its stdin: the rest is discarded, still credited.
            while let Ok(Input::Data(d)) = rx.recv() {
                queued.fetch_sub(d.len() as u64, Ordering::SeqCst);
                out.send(Frame::u32(Kind::InputCredit, s, d.len() as u32));
            }
            return;
        }
        out.send(Frame::u32(Kind::InputCredit, s, d.len() as u32));
    }
}

/// Sends a process's stdout and stderr under credit until both close (or stay quiet after
/// the process exited); returns its exit code and signal.
fn pump(s: u32, child: &mut Child, credit: &Credit, out: &Out) -> (i32, i32) {
    use std::os::unix::process::ExitStatusExt;
    let fd = |o: Option<std::os::fd::OwnedFd>| o.map(File::from);
    let mut fds = [
        (Kind::Stdout, fd(child.stdout.take().map(Into::into))),
        (Kind::Stderr, fd(child.stderr.take().map(Into::into))),
    ];
    let mut open = [true, true];
    let mut exited: Option<(Instant, std::process::ExitStatus)> = None;
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        if !open[0] && !open[1] {
            break;
        }
        if exited.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some((Instant::now(), st));
            }
        }
        if let Some((at, _)) = exited {
            if at.elapsed() > DRAIN_QUIET {
                break;
            }
        }
        let Some(avail) = credit.available(Duration::from_millis(100)) else {
            break; // killed
        };
        if avail == 0 {
            continue;
        }
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let mut which = Vec::new();
        for (i, (_, f)) in fds.iter().enumerate() {
            let Some(f) = f.as_ref().filter(|_| open[i]) else {
                continue;
            };
            pfds.push(libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            which.push(i);
        }
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if r <= 0 {
            continue;
        }
        for (p, &i) in pfds.iter().zip(&which) {
            if p.revents == 0 {
                continue;
            }
            let want = (avail as usize).min(MAX_CHUNK);
            let (kind, f) = &mut fds[i];
            let n = match f {
                Some(f) => f.read(&mut buf[..want]),
                None => Ok(0),
            };
            match n {
                Ok(0) | Err(_) => open[i] = false,
                Ok(n) => {
                    credit.take(n as u64);
                    out.send(Frame::new(*kind, s, buf[..n].to_vec()));
                    if let Some((_, st)) = exited {
                        // Output is still coming: the quiet period starts again.
                        exited = Some((Instant::now(), st));
                    }
                }
            }
            break; // credit changed: recompute
        }
    }
    let status = match exited {
        Some((_, st)) => Ok(st),
        None if credit.closed() => {
            // SAFETY: killpg has no memory-safety preconditions; the group is the session's.
            unsafe { libc::killpg(child.id() as libc::pid_t, libc::SIGKILL) };
            child.wait()
        }
        None => child.wait(),
    };
    match status {
        Ok(st) => (st.code().unwrap_or(-1), st.signal().unwrap_or(-1)),
        Err(_) => (-1, -1),
    }
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(format!("{path:?}: not an absolute path"));
    }
    Ok(p)
}

fn start_read(s: u32, r: FileRequest, out: &Out, sessions: &Sessions) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let path = absolute(&r.path)?;
    let mut file = File::open(path).map_err(|e| format!("{}: {e}", r.path))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", r.path))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", r.path));
    }
    out.send(Frame::json(
        Kind::FileInfo,
        s,
        &FileInfo {
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        },
    ));
    let credit = Credit::new(WINDOW as u64);
    lock(sessions).insert(
        s,
        Session {
            credit: credit.clone(),
            pgid: Arc::default(),
            input: None,
        },
    );
    let (out, sessions) = (out.clone(), sessions.clone());
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        let result = loop {
            let Some(avail) = credit.available(Duration::from_secs(1)) else {
                break Ok(false);
            };
            if avail == 0 {
                continue;
            }
            match file.read(&mut buf[..(avail as usize).min(MAX_CHUNK)]) {
                Ok(0) => break Ok(true),
                Ok(n) => {
                    credit.take(n as u64);
                    out.send(Frame::new(Kind::Stdout, s, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        finish(s, &sessions);
        match result {
            Ok(true) => out.send(Frame::new(Kind::Done, s, Vec::new())),
            Ok(false) => {}
            Err(e) => error(&out, s, format!("reading: {e}")),
        }
    });
    Ok(())
}

fn start_write(s: u32, r: FileRequest, out: &Out, sessions: &Sessions) -> Result<(), String> {
    let path = absolute(&r.path)?.to_path_buf();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("{}: no file name", r.path));
    };
    // The agent's pid too: a name left by a killed agent is never this one's.
    let tmp = dir.join(format!(
        ".{}.atoll-{}-{s}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: creating it: {e}", r.path))?;
    let (tx, rx) = mpsc::channel();
    let queued = Arc::new(AtomicU64::new(0));
    lock(sessions).insert(
        s,
        Session {
            credit: Credit::new(0),
            pgid: Arc::default(),
            input: Some((tx, queued.clone())),
        },
    );
    let (out, sessions) = (out.clone(), sessions.clone());
    std::thread::spawn(move || {
        let result = write_file(s, file, &tmp, &path, &r, rx, &queued, &out);
        finish(s, &sessions);
        match result {
            Ok(true) => out.send(Frame::new(Kind::Done, s, Vec::new())),
            Ok(false) => {
                let _ = std::fs::remove_file(&tmp);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                error(&out, s, e);
            }
        }
    });
    Ok(())
}

/// Writes the session's input to `tmp`, then sets mode and owner and renames it to `path`.
/// `Ok(false)`: the session was abandoned (killed) before its end.
#[allow(clippy::too_many_arguments)]
fn write_file(
    s: u32,
    mut file: File,
    tmp: &Path,
    path: &Path,
    r: &FileRequest,
    rx: mpsc::Receiver<Input>,
    queued: &AtomicU64,
    out: &Out,
) -> Result<bool, String> {
    let mut written = 0u64;
    loop {
        match rx.recv() {
            Ok(Input::Data(d)) => {
                queued.fetch_sub(d.len() as u64, Ordering::SeqCst);
                written += d.len() as u64;
                if r.max_bytes.is_some_and(|m| written > m) {
                    return Err(format!("more than the announced {} bytes", written - 1));
                }
                file.write_all(&d)
                    .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
                out.send(Frame::u32(Kind::InputCredit, s, d.len() as u32));
            }
            Ok(Input::End) => break,
            Err(_) => return Ok(false),
        }
    }
    let (uid, gid) = (r.uid.unwrap_or(0), r.gid.unwrap_or(0));
    // SAFETY: fchown on an fd this function owns; no memory is passed.
    if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } != 0 {
        return Err(format!(
            "owner {uid}:{gid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(
        r.mode.unwrap_or(0o644) & 0o7777,
    ))
    .map_err(|e| format!("mode: {e}"))?;
    file.sync_all()
        .map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    std::fs::rename(tmp, path)
        .map_err(|e| format!("{}: putting it in place: {e}", path.display()))?;
    Ok(true)
}
