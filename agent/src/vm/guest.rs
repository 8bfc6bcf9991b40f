//! The host end of the guest agent's channel: one connection per VM to the Unix socket QEMU
//! serves for the VM's virtio-serial port `org.atoll.guest.0`, with exec and file sessions
//! multiplexed on it (protocol: `atoll_guest`; the guest agent: `guest/agent`).
//!
//! Decisions:
//! - **Connected on first use, kept while it works.** A VM's channel is opened by the first
//!   session and shared by every later one; a broken connection (the VMM restarted, a protocol
//!   error) fails its sessions and the next session connects anew. Every connection starts
//!   with a hello whose random nonce the guest must echo; bytes before that echo are stale
//!   (an earlier connection's output) and skipped.
//! - **The guest is untrusted.** After the hello, any malformed frame, output beyond the credit
//!   granted, input credit beyond the window, or a second `Started`/`FileInfo` in one session
//!   resets the channel: its sessions fail with "guest protocol error", and nothing the guest
//!   sends is buffered beyond one window per session (the credit) plus one frame. Frames for
//!   sessions that already ended are counted and dropped.
//! - **The socket is taken only as the socket it is.** It lives in the VMM's own directory,
//!   which a VMM escape controls: a symlink there to another VM's port (or any root-only
//!   socket) would make the agent a confused deputy. So the path is opened with
//!   `O_PATH | O_NOFOLLOW`, must be a socket, and is connected through `/proc/self/fd/<fd>`
//!   (the inode just checked, whatever the path says after). Hard links are out of the VMM's
//!   reach (other VMs' directories are 0700 of other uids; `fs.protected_hardlinks`).
//! - **Dropping a [`Session`] before its end kills it** (`Kill` to the guest: its process group
//!   is killed, a file being written is abandoned), so a cancelled API request stops its
//!   command.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use atoll_guest::{Decoder, FileInfo, Frame, Kind, MAX_CHUNK, WINDOW};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::{mpsc, Semaphore},
};

use super::VmKey;

/// How long a new connection waits for the guest's hello (the guest agent starts during boot).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("no such VM on this host")]
    NoVm,
    #[error("{path} is not a socket (a symlink?): refused")]
    NotASocket { path: PathBuf },
    #[error("connecting to the guest agent's port ({path}): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest agent did not answer within {0:?} (is the VM running an atoll image?)")]
    HelloTimeout(Duration),
    #[error("the guest agent's channel closed: {0}")]
    Closed(String),
}

/// What a session receives from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    FileInfo(FileInfo),
    /// The end: the process exited.
    Exit {
        code: i32,
        signal: i32,
    },
    /// The end: the file was read or written completely.
    Done,
    /// The end: the guest refused or failed (its message).
    Error(String),
    /// The end: the channel failed (why).
    Lost(String),
}

impl Event {
    fn is_end(&self) -> bool {
        matches!(
            self,
            Event::Exit { .. } | Event::Done | Event::Error(_) | Event::Lost(_)
        )
    }
}

/// Every VM's guest channel on this host, by VM.
#[derive(Debug, Default)]
pub struct Guests {
    vms: Mutex<HashMap<VmKey, Slot>>,
    /// Frames dropped: for ended sessions, or before a connection's hello.
    pub stale_frames: AtomicU64,
    /// Channels reset for a guest's protocol error.
    pub protocol_errors: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    path: PathBuf,
    channel: Option<Arc<Channel>>,
}

impl Guests {
    pub fn new() -> Arc<Guests> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmKey, Slot>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM `key`'s port is served at `path` (a VMM started); an open channel is dropped.
    pub fn insert(&self, key: VmKey, path: PathBuf) {
        if let Some(old) = self.lock().insert(
            key,
            Slot {
                path,
                channel: None,
            },
        ) {
            if let Some(c) = old.channel {
                c.fail("the VM's VMM was replaced");
            }
        }
    }

    /// The VM `key` is gone: its sessions fail.
    pub fn remove(&self, key: &VmKey) {
        if let Some(c) = self.lock().remove(key).and_then(|s| s.channel) {
            c.fail("the VM stopped");
        }
    }

    /// VMs with a session open (activity for idle timeouts).
    pub fn busy(&self) -> HashSet<VmKey> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.channel.as_ref().is_some_and(|c| c.active() > 0))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Opens a session on the VM's channel (connecting it first if needed) with `kind`/`body`
    /// as its first frame.
    pub async fn open(
        self: &Arc<Self>,
        key: &VmKey,
        kind: Kind,
        body: Vec<u8>,
    ) -> Result<Session, GuestError> {
        let (path, existing) = {
            let vms = self.lock();
            let s = vms.get(key).ok_or(GuestError::NoVm)?;
            (s.path.clone(), s.channel.clone())
        };
        let channel = match existing.filter(|c| !c.dead.load(Ordering::SeqCst)) {
            Some(c) => c,
            None => {
                let c = Channel::connect(&path, self.clone()).await?;
                let mut vms = self.lock();
                match vms.get_mut(key) {
                    Some(s) if s.path == path => {
                        // Another session may have connected meanwhile: keep one.
                        match s.channel.clone().filter(|o| !o.dead.load(Ordering::SeqCst)) {
                            Some(other) => {
                                c.fail("superseded");
                                other
                            }
                            None => {
                                s.channel = Some(c.clone());
                                c
                            }
                        }
                    }
                    _ => {
                        c.fail("the VM stopped");
                        return Err(GuestError::NoVm);
                    }
                }
            }
        };
        channel.open(kind, body)
    }
}

/// The socket inode at `path`, not following a symlink: `Err(None)` if it is not a socket.
fn open_socket(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, Option<std::io::Error>> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| Some(std::io::Error::other(e)))?;
    // SAFETY: a valid NUL-terminated path; the fd returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Some(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: `stat` is plain old data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills `st` for the valid fd `fd`.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(Some(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(None);
    }
    Ok(owned)
}

/// One connection to a guest agent.
#[derive(Debug)]
pub struct Channel {
    out: mpsc::UnboundedSender<Vec<u8>>,
    state: Mutex<State>,
    dead: AtomicBool,
    guests: Arc<Guests>,
}

#[derive(Debug, Default)]
struct State {
    next: u32,
    sessions: HashMap<u32, Peer>,
    why: Option<String>,
}

/// A session as the reader sees it.
#[derive(Debug)]
struct Peer {
    tx: mpsc::UnboundedSender<Event>,
    /// Output bytes received, and the credit granted (the initial window included).
    received: u64,
    granted: Arc<AtomicU64>,
    input: Arc<Semaphore>,
    /// Input credit the guest returned beyond what was sent (a violation if over the window).
    started: bool,
}

impl Channel {
    async fn connect(
        path: &std::path::Path,
        guests: Arc<Guests>,
    ) -> Result<Arc<Channel>, GuestError> {
        let err = |source| GuestError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let inode = open_socket(path).map_err(|e| match e {
            None => GuestError::NotASocket {
                path: path.to_path_buf(),
            },
            Some(e) => err(e),
        })?;
        let stream = UnixStream::connect(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&inode)
        ))
        .await
        .map_err(err)?;
        drop(inode);
        let (mut rd, mut wr) = stream.into_split();
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| GuestError::Closed(e.to_string()))?;
        let nonce = u64::from_le_bytes(nonce);
        wr.write_all(&Frame::hello(Kind::Hello, nonce).encode())
            .await
            .map_err(|e| GuestError::Closed(format!("writing the hello: {e}")))?;
        // Skip everything until the guest echoes this connection's nonce.
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut leftover = Vec::new();
        let waited = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                let n = rd
                    .read(&mut buf)
                    .await
                    .map_err(|e| GuestError::Closed(e.to_string()))?;
                if n == 0 {
                    return Err(GuestError::Closed("the VMM closed the port".into()));
                }
                let mut found = None;
                let mut stale = 0;
                // Frames after the hello in the same read are the session's: keep the bytes.
                for (i, chunk) in buf[..n].split_inclusive(|&b| b == 0).enumerate() {
                    if found.is_some() {
                        leftover.extend_from_slice(chunk);
                        continue;
                    }
                    decoder.feed(chunk, |f| match f {
                        Ok(f)
                            if f.kind == Kind::HelloAck
                                && f.as_hello().ok() == Some((atoll_guest::VERSION, nonce)) =>
                        {
                            found = Some(i)
                        }
                        _ => stale += 1,
                    });
                }
                guests.stale_frames.fetch_add(stale, Ordering::Relaxed);
                if found.is_some() {
                    return Ok(());
                }
            }
        })
        .await;
        match waited {
            Ok(r) => r?,
            Err(_) => return Err(GuestError::HelloTimeout(HELLO_TIMEOUT)),
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let channel = Arc::new(Channel {
            out: tx,
            state: Mutex::new(State {
                next: 1,
                ..State::default()
            }),
            dead: AtomicBool::new(false),
            guests,
        });
        let c = channel.clone();
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if let Err(e) = wr.write_all(&bytes).await {
                    c.fail(&format!("writing to the port: {e}"));
                    return;
                }
            }
        });
        let c = Arc::downgrade(&channel);
        tokio::spawn(async move {
            let mut decoder = Decoder::new();
            let mut pending = leftover;
            loop {
                let Some(ch) = c.upgrade() else { return };
                if !pending.is_empty() {
                    let bytes = std::mem::take(&mut pending);
                    ch.receive(&mut decoder, &bytes);
                }
                if ch.dead.load(Ordering::SeqCst) {
                    return;
                }
                drop(ch);
                let n = match rd.read(&mut buf).await {
                    Ok(0) => {
                        if let Some(ch) = c.upgrade() {
                            ch.fail("the VMM closed the port");
                        }
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        if let Some(ch) = c.upgrade() {
                            ch.fail(&format!("reading the port: {e}"));
                        }
                        return;
                    }
                };
                pending.extend_from_slice(&buf[..n]);
            }
        });
        Ok(channel)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn active(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Ends the channel: every session gets [`Event::Lost`].
    fn fail(&self, why: &str) {
        self.dead.store(true, Ordering::SeqCst);
        let mut st = self.lock();
        st.why.get_or_insert_with(|| why.to_string());
        for (_, p) in st.sessions.drain() {
            p.input.close();
            let _ = p.tx.send(Event::Lost(why.to_string()));
        }
    }

    fn send(&self, f: &Frame) {
        let _ = self.out.send(f.encode());
    }

    fn violation(&self, what: String) {
        self.guests.protocol_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("guest agent protocol error, channel reset: {what}");
        self.fail(&format!("guest protocol error: {what}"));
    }

    fn receive(&self, decoder: &mut Decoder, bytes: &[u8]) {
        let mut frames = Vec::new();
        decoder.feed(bytes, |f| frames.push(f));
        for f in frames {
            if self.dead.load(Ordering::SeqCst) {
                return;
            }
            match f {
                Ok(f) => self.dispatch(f),
                Err(e) => return self.violation(e.to_string()),
            }
        }
    }

    fn dispatch(&self, f: Frame) {
        let mut st = self.lock();
        let Some(p) = st.sessions.get_mut(&f.session) else {
            self.guests.stale_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let event = match f.kind {
            Kind::Started | Kind::FileInfo if p.started => {
                drop(st);
                return self.violation(format!("a second {:?} in session {}", f.kind, f.session));
            }
            Kind::Started => {
                p.started = true;
                match f.as_u32() {
                    Ok(pid) => Event::Started { pid },
                    Err(e) => {
                        drop(st);
                        return self.violation(e.to_string());
                    }
                }
            }
            Kind::FileInfo => {
                p.started = true;
                match f.as_json() {
                    Ok(i) => Event::FileInfo(i),
                    Err(e) => {
                        drop(st);
                        return self.violation(e.to_string());
                    }
                }
            }
            Kind::Stdout | Kind::Stderr => {
                p.received += f.body.len() as u64;
                if p.received > p.granted.load(Ordering::SeqCst) {
                    drop(st);
                    return self
                        .violation(format!("output beyond the credit in session {}", f.session));
                }
                if f.kind == Kind::Stdout {
                    Event::Stdout(f.body)
                } else {
                    Event::Stderr(f.body)
                }
            }
            Kind::InputCredit => match f.as_u32() {
                Ok(n) if (p.input.available_permits() as u64) + (n as u64) <= WINDOW as u64 => {
                    p.input.add_permits(n as usize);
                    return;
                }
                _ => {
                    drop(st);
                    return self.violation(format!(
                        "input credit beyond the window in session {}",
                        f.session
                    ));
                }
            },
            Kind::Exit => match f.as_exit() {
                Ok((code, signal)) => Event::Exit { code, signal },
                Err(e) => {
                    drop(st);
                    return self.violation(e.to_string());
                }
            },
            Kind::Done => Event::Done,
            Kind::Error => Event::Error(
                String::from_utf8_lossy(&f.body[..f.body.len().min(4096)]).into_owned(),
            ),
            k => {
                drop(st);
                return self.violation(format!("{k:?} from the guest"));
            }
        };
        let end = event.is_end();
        let _ = p.tx.send(event);
        if end {
            if let Some(p) = st.sessions.remove(&f.session) {
                p.input.close();
            }
        }
    }

    fn open(self: &Arc<Self>, kind: Kind, body: Vec<u8>) -> Result<Session, GuestError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let granted = Arc::new(AtomicU64::new(WINDOW as u64));
        let input = Arc::new(Semaphore::new(WINDOW as usize));
        let id = {
            let mut st = self.lock();
            if self.dead.load(Ordering::SeqCst) {
                return Err(GuestError::Closed(st.why.clone().unwrap_or_default()));
            }
            let id = st.next;
            st.next = st.next.wrapping_add(1).max(1);
            st.sessions.insert(
                id,
                Peer {
                    tx,
                    received: 0,
                    granted: granted.clone(),
                    input: input.clone(),
                    started: false,
                },
            );
            id
        };
        self.send(&Frame::new(kind, id, body));
        Ok(Session {
            id,
            channel: self.clone(),
            rx,
            granted,
            input,
            ended: false,
        })
    }
}

/// One exec or file transfer. Dropped before its end, it is killed in the guest.
#[derive(Debug)]
pub struct Session {
    id: u32,
    channel: Arc<Channel>,
    rx: mpsc::UnboundedReceiver<Event>,
    granted: Arc<AtomicU64>,
    input: Arc<Semaphore>,
    ended: bool,
}

impl Session {
    /// The next event; after an end event, `None`.
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let e = self
            .rx
            .recv()
            .await
            .unwrap_or_else(|| Event::Lost("the channel closed".into()));
        self.ended = e.is_end();
        Some(e)
    }

    /// Grants the guest `n` more bytes of output (call once they are passed on).
    pub fn credit(&self, n: usize) {
        if n == 0 || self.ended {
            return;
        }
        self.granted.fetch_add(n as u64, Ordering::SeqCst);
        self.channel
            .send(&Frame::u32(Kind::Credit, self.id, n as u32));
    }

    /// A handle that sends the session's input, for use beside [`Session::next`].
    pub fn writer(&self) -> InputWriter {
        InputWriter {
            id: self.id,
            channel: self.channel.clone(),
            input: self.input.clone(),
        }
    }
}

/// Sends a session's input (stdin, a file's contents) under the guest's credit.
#[derive(Debug, Clone)]
pub struct InputWriter {
    id: u32,
    channel: Arc<Channel>,
    input: Arc<Semaphore>,
}

impl InputWriter {
    /// Sends `data`, waiting for credit as needed.
    pub async fn input(&self, mut data: &[u8]) -> Result<(), GuestError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_CHUNK);
            let permit = self
                .input
                .acquire_many(n as u32)
                .await
                .map_err(|_| GuestError::Closed("the session ended".into()))?;
            permit.forget();
            self.channel
                .send(&Frame::new(Kind::Input, self.id, data[..n].to_vec()));
            data = &data[n..];
        }
        Ok(())
    }

    /// The end of the input.
    pub fn end_input(&self) {
        self.channel
            .send(&Frame::new(Kind::InputEnd, self.id, Vec::new()));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Input writers still held (a stdin stream) fail from now on.
        self.input.close();
        if !self.ended {
            let removed = self.channel.lock().sessions.remove(&self.id).is_some();
            if removed {
                self.channel
                    .send(&Frame::new(Kind::Kill, self.id, Vec::new()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The host end against a scripted guest on a Unix socket (what QEMU's chardev gives it):
    //! stale bytes before the hello, a lying and a flooding guest.

    use super::*;
    use tokio::net::UnixListener;

    /// A guest that answers the hello (after `stale` bytes), then runs `script` on the stream.
    async fn guest<F, Fut>(stale: Vec<u8>, script: F) -> (Arc<Guests>, VmKey, tempfile::TempDir)
    where
        F: FnOnce(tokio::net::UnixStream, Vec<Frame>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // One connection: a second one is refused.
            drop(listener);
            s.write_all(&stale).await.unwrap();
            let mut d = Decoder::new();
            let mut buf = vec![0u8; 4096];
            let mut frames = Vec::new();
            // The hello, then the session's first frame.
            while frames.len() < 2 {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the host closed before opening a session");
                d.feed(&buf[..n], |f| frames.push(f.unwrap()));
                if let Some(h) = frames.first().filter(|f| f.kind == Kind::Hello) {
                    if frames.len() == 1 {
                        let (_, nonce) = h.as_hello().unwrap();
                        // A stale hello of another connection first: ignored by the host.
                        s.write_all(&Frame::hello(Kind::HelloAck, nonce ^ 1).encode())
                            .await
                            .unwrap();
                        s.write_all(&Frame::hello(Kind::HelloAck, nonce).encode())
                            .await
                            .unwrap();
                    }
                }
            }
            script(s, frames).await;
        });
        let guests = Guests::new();
        let key = (1, "vm".to_string());
        guests.insert(key.clone(), path);
        (guests, key, dir)
    }

    async fn drain(session: &mut Session) -> Vec<Event> {
        let mut all = Vec::new();
        while let Some(e) = session.next().await {
            all.push(e);
        }
        all
    }

    #[tokio::test]
    async fn a_well_behaved_guest_after_stale_bytes() {
        // Half a frame and a whole one of an earlier connection, then the hello.
        let mut stale = Frame::new(Kind::Stdout, 7, b"old".to_vec()).encode();
        stale.drain(..2);
        stale.extend(Frame::exit(7, 0, -1).encode());
        let (guests, key, _dir) = guest(stale, |mut s, frames| async move {
            assert_eq!(frames[1].kind, Kind::Exec);
            let id = frames[1].session;
            for f in [
                Frame::u32(Kind::Started, id, 42),
                Frame::new(Kind::Stdout, id, b"hi".to_vec()),
                Frame::new(Kind::Stdout, 999, b"nobody's".to_vec()),
                Frame::exit(id, 0, -1),
            ] {
                s.write_all(&f.encode()).await.unwrap();
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        let mut session = guests.open(&key, Kind::Exec, b"{}".to_vec()).await.unwrap();
        assert_eq!(
            drain(&mut session).await,
            [
                Event::Started { pid: 42 },
                Event::Stdout(b"hi".to_vec()),
                Event::Exit {
                    code: 0,
                    signal: -1
                }
            ]
        );
        assert!(guests.stale_frames.load(Ordering::SeqCst) >= 3);
        assert_eq!(guests.protocol_errors.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_guest_that_floods_past_its_credit_loses_the_channel() {
        let (guests, key, _dir) = guest(Vec::new(), |mut s, frames| async move {
            let id = frames[1].session;
            let chunk = Frame::new(Kind::Stdout, id, vec![b'x'; MAX_CHUNK]).encode();
            // The window and then some, without waiting for credit.
            for _ in 0..(WINDOW as usize / MAX_CHUNK + 2) {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        })
        .await;
        let mut session = guests.open(&key, Kind::Exec, b"{}".to_vec()).await.unwrap();
        let all = drain(&mut session).await;
        let got: usize = all
            .iter()
            .map(|e| match e {
                Event::Stdout(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert!(got <= WINDOW as usize, "{got} bytes passed the window");
        assert!(
            matches!(all.last(), Some(Event::Lost(m)) if m.contains("protocol error")),
            "{:?}",
            all.last()
        );
        assert_eq!(guests.protocol_errors.load(Ordering::SeqCst), 1);
        // The channel is gone: the next session connects anew (and is refused: the script
        // takes one connection).
        assert!(matches!(
            guests.open(&key, Kind::Exec, b"{}".to_vec()).await,
            Err(GuestError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn a_lying_guest_loses_the_channel() {
        let lies: Vec<fn(u32) -> Vec<u8>> = vec![
            // Garbage after the hello.
            |_| vec![9, 9, 9, 0],
            // A second start.
            |id| {
                let mut v = Frame::u32(Kind::Started, id, 1).encode();
                v.extend(Frame::u32(Kind::Started, id, 2).encode());
                v
            },
            // Input credit it never owed.
            |id| Frame::u32(Kind::InputCredit, id, 1).encode(),
            // A host's frame kind.
            |id| Frame::new(Kind::Kill, id, vec![]).encode(),
            // A malformed exit.
            |id| Frame::new(Kind::Exit, id, vec![1]).encode(),
        ];
        for (i, lie) in lies.into_iter().enumerate() {
            let (guests, key, _dir) = guest(Vec::new(), move |mut s, frames| async move {
                s.write_all(&lie(frames[1].session)).await.unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            })
            .await;
            let mut session = guests.open(&key, Kind::Exec, b"{}".to_vec()).await.unwrap();
            let all = drain(&mut session).await;
            assert!(
                matches!(all.last(), Some(Event::Lost(m)) if m.contains("protocol error")),
                "lie {i}: {all:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_symlink_in_place_of_the_socket_is_refused() {
        // A VMM escape points its VM's port at another VM's (a working guest here).
        let (guests, _, dir) = guest(Vec::new(), |_, _| async {}).await;
        let elsewhere = tempfile::tempdir().unwrap();
        let link = elsewhere.path().join("guest.sock");
        std::os::unix::fs::symlink(dir.path().join("guest.sock"), &link).unwrap();
        let key = (2, "escaped".to_string());
        guests.insert(key.clone(), link);
        assert!(matches!(
            guests.open(&key, Kind::Exec, b"{}".to_vec()).await,
            Err(GuestError::NotASocket { .. })
        ));
        // The socket itself is taken.
        assert!(guests
            .open(&(1, "vm".to_string()), Kind::Exec, b"{}".to_vec())
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn dropping_a_session_kills_it_in_the_guest() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (guests, key, _dir) = guest(Vec::new(), |mut s, frames| async move {
            let id = frames[1].session;
            let mut d = Decoder::new();
            let mut buf = vec![0u8; 4096];
            // The kill may have come with the session's first frame.
            let mut got = frames.clone();
            while !got.iter().any(|f: &Frame| f.kind == Kind::Kill) {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                d.feed(&buf[..n], |f| got.push(f.unwrap()));
            }
            let kill = got.iter().find(|f| f.kind == Kind::Kill).unwrap();
            let _ = tx.send(kill.session == id);
        })
        .await;
        let session = guests.open(&key, Kind::Exec, b"{}".to_vec()).await.unwrap();
        assert_eq!(guests.busy().len(), 1);
        drop(session);
        assert!(rx.await.unwrap(), "the kill named another session");
        assert!(guests.busy().is_empty());
    }
}
