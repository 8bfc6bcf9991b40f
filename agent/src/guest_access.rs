//! Guest access: the HTTPS endpoint through which control planes run commands and move files
//! in this host's VMs (their guest agents, `vm::guest`). Kubelet-style: the API's exec and file
//! routes are forwarded by whichever control plane took the request to the VM's host, here.
//!
//! Decisions:
//! - **The same paths and parser as the API** (`/v1/clouds/{cloud}/vms/{vm}/exec` and
//!   `…/files`, `atoll_api::routes::parse`), so a request means the same on both hops and is
//!   validated again here: the control plane is trusted, but not to be right.
//! - **Its own identity, pinned.** At start the agent makes a self-signed certificate (kept in
//!   memory) and a random 256-bit secret and registers both with its host record
//!   (`PUT /v1/hosts/{host}/guest-access`, the host's token); control planes pin that
//!   certificate's fingerprint and present the secret as a bearer token, compared in constant
//!   time. A restart makes new ones and registers them again.
//! - **Streams, with backpressure end to end.** Exec output goes out as NDJSON lines
//!   ([`ExecEvent`]) through a small queue; the guest gets credit for output only once its
//!   line is queued, so a slow client slows the command instead of filling memory. A dropped
//!   response (the client went away, a control plane's request was cancelled) drops the
//!   session, which kills the command in the guest. Past `max_output_bytes` a stream's output
//!   is discarded (still credited) after one `truncated` line.
//! - **Stdin streams in a request of its own** (`POST …/execs/{exec}/stdin`), not as a
//!   duplex body of the exec request: an exec with `stdin_stream` gets a random 128-bit id in
//!   its `started` event, and the first stdin request naming it (same cloud and VM) takes its
//!   input side, once; the body's end closes the command's stdin. Two plain HTTP exchanges
//!   pass through any proxy, where a request body still flowing after the response began
//!   would not.
//! - **Files are streamed** both ways in chunks under the same credit; a download's length is
//!   the size the guest reported (a file that grows is cut there, one that shrinks ends the
//!   response early, which the client sees as a short body); an upload needs its length up
//!   front (`Content-Length`, at most `MAX_FILE_BYTES`), which the guest enforces too.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use atoll_api::{
    model::{
        ErrorBody, ErrorDetail, ExecEvent, GuestAccess, DEFAULT_EXEC_OUTPUT_BYTES,
        DEFAULT_EXEC_TIMEOUT_SECS, MAX_FILE_BYTES,
    },
    routes, Command,
};
use atoll_guest::Kind;
use base64::Engine;
use futures::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Bytes, Frame, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::mpsc};

use crate::{
    config::GuestAccessConfig,
    vm::{
        guest::{Event, GuestError, Guests, InputWriter},
        VmKey,
    },
};

/// The largest exec request (the API's body limit).
const MAX_EXEC_BODY: usize = 1 << 20;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GuestAccessError {
    #[error("listening on {addr} (guest_access.listen): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "guest_access.url is required when guest_access.listen is {0} (an unspecified address)"
    )]
    NoUrl(SocketAddr),
    #[error("making the guest access certificate: {0}")]
    Tls(#[from] atoll_api::tls::TlsError),
    #[error("drawing the guest access secret: {0}")]
    Random(String),
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The endpoint, listening: what to register, and its task.
#[derive(Debug)]
pub struct GuestAccessServer {
    pub access: GuestAccess,
    pub task: tokio::task::JoinHandle<()>,
}

/// Execs waiting for their stdin stream: exec id → (its VM, the session's input side).
type Waiting = HashMap<String, (VmKey, InputWriter)>;

struct Ctx {
    guests: Arc<Guests>,
    secret: String,
    /// Execs waiting for their stdin stream: id → (VM, the session's input side).
    stdin: std::sync::Mutex<Waiting>,
}

impl Ctx {
    fn stdin(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.stdin.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Binds `cfg.listen`, makes the identity and serves until the task is aborted.
pub async fn start(
    cfg: &GuestAccessConfig,
    guests: Arc<Guests>,
) -> Result<GuestAccessServer, GuestAccessError> {
    let listener =
        TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| GuestAccessError::Listen {
                addr: cfg.listen,
                source,
            })?;
    let bound = listener
        .local_addr()
        .map_err(|source| GuestAccessError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let url = match &cfg.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if bound.ip().is_unspecified() => return Err(GuestAccessError::NoUrl(cfg.listen)),
        None => format!("https://{bound}"),
    };
    let host = url
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(url.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string();
    let (tls, fingerprint) = atoll_api::tls::self_signed(&[host])?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| GuestAccessError::Random(e.to_string()))?;
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let ctx = Arc::new(Ctx {
        guests,
        secret: secret.clone(),
        stdin: Default::default(),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    // Exec output is many small writes: Nagle would hold each behind the
                    // peer's delayed ACK.
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(e) => {
                    tracing::warn!("guest access: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                else {
                    return;
                };
                let service = service_fn(move |req| handle(req, ctx.clone()));
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                drop(permit);
            });
        }
    });
    tracing::info!("guest access (exec and files) at {url}");
    Ok(GuestAccessServer {
        access: GuestAccess {
            url,
            fingerprint,
            secret,
        },
        task,
    })
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
            field: None,
            id: None,
        },
    };
    let mut r = Response::new(full(
        serde_json::to_vec(&body).expect("error bodies serialize"),
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn guest_error(e: GuestError) -> Response<Body> {
    match e {
        GuestError::NoVm => error(
            StatusCode::NOT_FOUND,
            "vm_not_here",
            "the VM does not run on this host",
        ),
        e => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "guest_unavailable",
            e.to_string(),
        ),
    }
}

/// Constant-time equality (the secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(req: Request<Incoming>, ctx: Arc<Ctx>) -> Result<Response<Body>, Infallible> {
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), ctx.secret.as_bytes()));
    if !authorized {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "guest access needs the registered secret",
        ));
    }
    let segs: Vec<&str> = req.uri().path().split('/').collect();
    let (route, cloud, vm) = match segs.as_slice() {
        ["", "v1", "clouds", c, "vms", v, "exec"] if req.method() == hyper::Method::POST => {
            (&routes::EXEC_VM, *c, *v)
        }
        ["", "v1", "clouds", c, "vms", v, "files"] if req.method() == hyper::Method::GET => {
            (&routes::READ_FILE, *c, *v)
        }
        ["", "v1", "clouds", c, "vms", v, "execs", e, "stdin"]
            if req.method() == hyper::Method::POST =>
        {
            let (c, v, e) = (*c, *v, *e);
            let params: HashMap<String, String> = [("cloud", c), ("vm", v), ("exec", e)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            return Ok(
                match routes::parse(&routes::WRITE_EXEC_STDIN, &params, &HashMap::new(), &[]) {
                    Ok(Command::WriteExecStdin { cloud, vm, exec }) => {
                        exec_stdin(&ctx, (cloud.get(), vm), &exec, req.into_body()).await
                    }
                    Ok(_) => error(StatusCode::NOT_FOUND, "no_route", "no such route"),
                    Err(e) => error(StatusCode::BAD_REQUEST, "invalid_field", e.to_string()),
                },
            );
        }
        ["", "v1", "clouds", c, "vms", v, "files"] if req.method() == hyper::Method::PUT => {
            (&routes::WRITE_FILE, *c, *v)
        }
        _ => return Ok(error(StatusCode::NOT_FOUND, "no_route", "no such route")),
    };
    let params: HashMap<String, String> = [("cloud", cloud), ("vm", vm)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut query = HashMap::new();
    for pair in req.uri().query().unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (routes::decode_query(k), routes::decode_query(v)) {
            (Some(k), Some(v)) => {
                query.insert(k, v);
            }
            _ => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "malformed query",
                ))
            }
        }
    }
    let (parts, mut body) = req.into_parts();
    let bytes = if route.id == routes::RouteId::ExecVm {
        let limited = http_body_util::Limited::new(&mut body, MAX_EXEC_BODY);
        match limited.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("reading the body: {e}"),
                ))
            }
        }
    } else {
        Bytes::new()
    };
    let cmd = match routes::parse(route, &params, &query, &bytes) {
        Ok(c) => c,
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                e.to_string(),
            ))
        }
    };
    Ok(match cmd {
        Command::ExecVm { cloud, vm, spec } => exec(&ctx, (cloud.get(), vm), spec).await,
        Command::ReadFile { cloud, vm, spec } => {
            read_file(&ctx.guests, (cloud.get(), vm), spec).await
        }
        Command::WriteFile { cloud, vm, spec } => {
            let length = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            write_file(&ctx.guests, (cloud.get(), vm), spec, length, body).await
        }
        _ => error(StatusCode::NOT_FOUND, "no_route", "no such route"),
    })
}

/// A streamed response body and the queue that feeds it.
fn stream(depth: usize) -> (mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>, Body) {
    let (tx, rx) = mpsc::channel(depth);
    let s = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        tx,
        BodyExt::boxed_unsync(StreamBody::new(StreamExt::boxed(s))),
    )
}

fn line(e: &ExecEvent) -> Result<Frame<Bytes>, std::io::Error> {
    let mut v = serde_json::to_vec(e).expect("exec events serialize");
    v.push(b'\n');
    Ok(Frame::data(Bytes::from(v)))
}

async fn exec(
    ctx: &Arc<Ctx>,
    key: (u32, String),
    spec: atoll_api::model::ExecVm,
) -> Response<Body> {
    let guests = &ctx.guests;
    let b64 = base64::engine::general_purpose::STANDARD;
    let stdin = match spec.stdin_base64.as_deref().map(|s| b64.decode(s)) {
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("stdin_base64: {e}"),
            )
        }
        None => None,
    };
    let req = atoll_guest::ExecRequest {
        argv: spec.argv.clone(),
        env: spec.env.clone().into_iter().collect(),
        cwd: spec.cwd.clone(),
        stdin: stdin.is_some() || spec.stdin_stream,
    };
    let body = serde_json::to_vec(&req).expect("exec requests serialize");
    let mut session = match guests.open(&key, Kind::Exec, body).await {
        Ok(s) => s,
        Err(e) => return guest_error(e),
    };
    let timeout = Duration::from_secs(
        spec.timeout_secs
            .unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS)
            .into(),
    );
    let cap = spec.max_output_bytes.unwrap_or(DEFAULT_EXEC_OUTPUT_BYTES);
    if let Some(data) = stdin {
        let w = session.writer();
        tokio::spawn(async move {
            if w.input(&data).await.is_ok() {
                w.end_input();
            }
        });
    }
    let exec_id = match spec.stdin_stream {
        true => {
            let mut raw = [0u8; 16];
            if let Err(e) = getrandom::fill(&mut raw) {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("drawing an exec id: {e}"),
                );
            }
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            ctx.stdin()
                .insert(id.clone(), (key.clone(), session.writer()));
            Some(id)
        }
        false => None,
    };
    let (tx, body) = stream(16);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        // Whatever ends the exec, its stdin can no longer be claimed.
        struct Forget(Arc<Ctx>, Option<String>);
        impl Drop for Forget {
            fn drop(&mut self) {
                if let Some(id) = &self.1 {
                    self.0.stdin().remove(id);
                }
            }
        }
        let _forget = Forget(ctx, exec_id.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let mut caps = [OutputCap::new(cap), OutputCap::new(cap)];
        loop {
            let event = tokio::select! {
                e = session.next() => e,
                _ = tokio::time::sleep_until(deadline) => {
                    drop(session);
                    let _ = tx
                        .send(line(&ExecEvent::Exit { code: None, signal: Some(9), timed_out: true }))
                        .await;
                    return;
                }
                _ = tx.closed() => return,
            };
            let Some(event) = event else { return };
            // Output is acknowledged to the guest (credit) once it is passed on.
            let (out, credit) = match event {
                Event::Started { pid } => (
                    vec![ExecEvent::Started {
                        pid,
                        exec_id: exec_id.clone(),
                    }],
                    0,
                ),
                Event::Stdout(d) => (capped(&mut caps[0], "stdout", &d), d.len()),
                Event::Stderr(d) => (capped(&mut caps[1], "stderr", &d), d.len()),
                Event::Exit { code, signal } => (
                    vec![ExecEvent::Exit {
                        code: (signal < 0).then_some(code),
                        signal: (signal >= 0).then_some(signal),
                        timed_out: false,
                    }],
                    0,
                ),
                Event::Error(message) | Event::Lost(message) => {
                    (vec![ExecEvent::Error { message }], 0)
                }
                Event::FileInfo(_) | Event::Done => (
                    vec![ExecEvent::Error {
                        message: "the guest answered an exec as a file".into(),
                    }],
                    0,
                ),
            };
            for e in out {
                if tx.send(line(&e)).await.is_err() {
                    return;
                }
            }
            if credit > 0 {
                session.credit(credit);
            }
        }
    });
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Streams a request's body to the stdin of the exec `id` (of VM `key`), then closes it.
async fn exec_stdin(
    ctx: &Arc<Ctx>,
    key: (u32, String),
    id: &str,
    mut body: Incoming,
) -> Response<Body> {
    let writer = {
        let mut m = ctx.stdin();
        match m.get(id) {
            Some((k, _)) if *k == key => m.remove(id).map(|(_, w)| w),
            _ => None,
        }
    };
    let Some(w) = writer else {
        return error(
            StatusCode::NOT_FOUND,
            "no_such_exec",
            "no running exec with that id waits for its stdin here",
        );
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if w.input(&d).await.is_err() {
                        return error(StatusCode::GONE, "exec_ended", "the exec ended");
                    }
                }
            }
            Err(e) => {
                // A broken stream still closes stdin: the command sees its end.
                w.end_input();
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("reading the body: {e}"),
                );
            }
        }
    }
    w.end_input();
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn file_request(spec: &atoll_api::model::FileSpec, max: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&atoll_guest::FileRequest {
        path: spec.path.clone(),
        mode: spec.mode,
        uid: spec.uid,
        gid: spec.gid,
        max_bytes: max,
    })
    .expect("file requests serialize")
}

/// A guest's refusal of a file: 404 for a missing one, else 400.
fn file_refused(message: String) -> Response<Body> {
    if message.contains("(os error 2)") {
        error(StatusCode::NOT_FOUND, "no_such_file", message)
    } else {
        error(StatusCode::BAD_REQUEST, "file_error", message)
    }
}

async fn read_file(
    guests: &Arc<Guests>,
    key: (u32, String),
    spec: atoll_api::model::FileSpec,
) -> Response<Body> {
    let mut session = match guests
        .open(&key, Kind::ReadFile, file_request(&spec, None))
        .await
    {
        Ok(s) => s,
        Err(e) => return guest_error(e),
    };
    let info = match session.next().await {
        Some(Event::FileInfo(i)) => i,
        Some(Event::Error(m)) => return file_refused(m),
        Some(Event::Lost(m)) => return guest_error(GuestError::Closed(m)),
        other => {
            return error(
                StatusCode::BAD_GATEWAY,
                "guest_protocol",
                format!("the guest answered a read with {other:?}"),
            )
        }
    };
    if info.size > MAX_FILE_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!(
                "{} is {} bytes, over {MAX_FILE_BYTES}",
                spec.path, info.size
            ),
        );
    }
    let (tx, body) = stream(8);
    let size = info.size;
    tokio::spawn(async move {
        let mut left = size;
        loop {
            let ev = tokio::select! {
                e = session.next() => e,
                _ = tx.closed() => return,
            };
            match ev {
                Some(Event::Stdout(d)) => {
                    let n = d.len();
                    let keep = (n as u64).min(left) as usize;
                    left -= keep as u64;
                    if keep > 0 {
                        let mut d = d;
                        d.truncate(keep);
                        if tx.send(Ok(Frame::data(Bytes::from(d)))).await.is_err() {
                            return;
                        }
                    }
                    session.credit(n);
                }
                Some(Event::Done) | None => return,
                Some(other) => {
                    let _ = tx
                        .send(Err(std::io::Error::other(format!(
                            "the read failed in the guest: {other:?}"
                        ))))
                        .await;
                    return;
                }
            }
        }
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, size.into());
    h.insert(
        "x-atoll-mode",
        format!("{:o}", info.mode).parse().expect("octal digits"),
    );
    h.insert("x-atoll-uid", info.uid.into());
    h.insert("x-atoll-gid", info.gid.into());
    r
}

async fn write_file(
    guests: &Arc<Guests>,
    key: (u32, String),
    spec: atoll_api::model::FileSpec,
    length: Option<u64>,
    mut body: Incoming,
) -> Response<Body> {
    let Some(length) = length else {
        return error(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "an upload needs Content-Length",
        );
    };
    if length > MAX_FILE_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("uploads are limited to {MAX_FILE_BYTES} bytes"),
        );
    }
    let mut session = match guests
        .open(&key, Kind::WriteFile, file_request(&spec, Some(length)))
        .await
    {
        Ok(s) => s,
        Err(e) => return guest_error(e),
    };
    let w = session.writer();
    let mut received = 0u64;
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            e = session.next() => {
                return match e {
                    Some(Event::Error(m)) => file_refused(m),
                    Some(Event::Lost(m)) => guest_error(GuestError::Closed(m)),
                    other => error(StatusCode::BAD_GATEWAY, "guest_protocol", format!("the guest answered a write with {other:?}")),
                };
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("reading the body: {e}"),
                )
            }
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    received += d.len() as u64;
                    if received > length {
                        return error(StatusCode::BAD_REQUEST, "bad_body", "body over its length");
                    }
                    // A guest that refused meanwhile ends the session; its error comes next.
                    if w.input(&d).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    if received != length {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the body ended after {received} of {length} bytes"),
        );
    }
    w.end_input();
    match session.next().await {
        Some(Event::Done) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Some(Event::Error(m)) => file_refused(m),
        Some(Event::Lost(m)) => guest_error(GuestError::Closed(m)),
        other => error(
            StatusCode::BAD_GATEWAY,
            "guest_protocol",
            format!("the guest answered a write with {other:?}"),
        ),
    }
}

/// How much of one output stream (stdout or stderr) an exec still passes on.
struct OutputCap {
    limit: u64,
    sent: u64,
    truncated: bool,
}

impl OutputCap {
    fn new(limit: u64) -> Self {
        OutputCap {
            limit,
            sent: 0,
            truncated: false,
        }
    }
}

/// The events for a chunk of `stream`: what fits under the cap, and a `truncated` marker the
/// first time it does not.
fn capped(c: &mut OutputCap, stream: &str, d: &[u8]) -> Vec<ExecEvent> {
    use base64::Engine;
    let keep = c.limit.saturating_sub(c.sent).min(d.len() as u64) as usize;
    c.sent += keep as u64;
    let mut v = Vec::new();
    if keep > 0 {
        let data = base64::engine::general_purpose::STANDARD.encode(&d[..keep]);
        v.push(if stream == "stdout" {
            ExecEvent::Stdout { data }
        } else {
            ExecEvent::Stderr { data }
        });
    }
    if keep < d.len() && !c.truncated {
        c.truncated = true;
        v.push(ExecEvent::Truncated {
            stream: stream.into(),
            limit: c.limit,
        });
    }
    v
}
