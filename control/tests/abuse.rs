//! The API under abuse, against the real server on loopback: idle and slowloris connections are
//! closed after the header-read timeout while an ordinary client is still served; connections
//! over the cap wait until one is freed; a caller without a valid token gets its 401/403 before
//! any of its body is read; a body that does not arrive gets 408; and a 500 (the store really
//! failing: etcd killed under a running `atoll serve`) carries an error id and no internals,
//! which go to the server's stderr under the same id.
//!
//! Every server, etcd and namespace is owned by a guard, so a failing test leaves nothing.

mod support;

use atoll_api::routes;
use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use atoll_control::{
    api,
    client::Client,
    config::{ApiConfig, ControlConfig, StoreConfig},
    core::Core,
    model::*,
};
use hyper::Method;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

/// A control plane on SQLite serving on 127.0.0.1 with `api` limits until dropped.
struct Server {
    addr: SocketAddr,
    url: String,
    op: Client,
    _core: Arc<Core>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn server(api: ApiConfig) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ControlConfig {
        operator_token_file: dir.path().join("operator.token"),
        store: StoreConfig {
            path: dir.path().join("control.db"),
            ..StoreConfig::default()
        },
        api,
        ..ControlConfig::default()
    };
    cfg.validate().expect("valid config");
    let core = cfg.start().await.expect("control plane");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(api::serve_with_limits(
        core.clone(),
        listener,
        cfg.api.limits(),
        async {
            let _ = rx.await;
        },
    ));
    let url = format!("http://{addr}");
    let op = Client::new(&url, &cfg.operator_token().unwrap()).unwrap();
    Server {
        addr,
        url,
        op,
        _core: core,
        _dir: dir,
        _stop: tx,
    }
}

/// Reads from `s` until the server closes it (EOF or reset).
async fn until_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// 50 connections that send nothing and 50 that send a header byte every 100 ms: an ordinary
/// request is served while all of them are held, and the server closes every one of them once
/// the header-read timeout has passed (never before). Before the limits existed they were held
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_are_closed_and_clients_still_served() {
    const N: usize = 50;
    let timeout = Duration::from_secs(3);
    let srv = server(ApiConfig {
        header_read_timeout_secs: timeout.as_secs(),
        ..ApiConfig::default()
    })
    .await;
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut held = JoinSet::new();
    for _ in 0..N {
        // Taken before connecting: the server's clock for it starts later.
        let opened = Instant::now();
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        let tx = closed_tx.clone();
        held.spawn(async move {
            until_closed(&mut s).await;
            let _ = tx.send(("idle", opened.elapsed()));
        });
    }
    let mut started = Vec::new();
    for _ in 0..N {
        let opened = Instant::now();
        let s = TcpStream::connect(srv.addr).await.expect("connect");
        let tx = closed_tx.clone();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        started.push(first_rx);
        held.spawn(async move {
            let (mut r, mut w) = s.into_split();
            let head = format!(
                "GET {} HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                routes::LIST_CLOUDS.path
            );
            let mut bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
            let mut first = Some(first_tx);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if w.write_all(&[bytes.next().unwrap()]).await.is_err() {
                            break;
                        }
                        if let Some(f) = first.take() {
                            let _ = f.send(());
                        }
                    }
                    r = r.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                }
            }
            let _ = tx.send(("slowloris", opened.elapsed()));
        });
    }
    drop(closed_tx);
    for f in started {
        f.await.expect("a slowloris connection sent its first byte");
    }
    // An ordinary client, while all of them are held.
    let clouds: Vec<Cloud> = srv
        .op
        .call(Method::GET, routes::LIST_CLOUDS.path, None::<&Value>)
        .await
        .expect("an ordinary request is served");
    assert!(clouds.is_empty());
    assert!(
        closed_rx.is_empty(),
        "the ordinary request was served while every connection was still held"
    );
    // Every held connection is closed by the server, none before the header-read timeout.
    let mut closed = 0;
    while closed < 2 * N {
        let (kind, after) = tokio::time::timeout(Duration::from_secs(60), closed_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {closed} of {} connections closed", 2 * N))
            .expect("a connection task ended without reporting");
        assert!(
            after >= timeout,
            "a {kind} connection was closed after {after:?}, before the header-read timeout"
        );
        closed += 1;
    }
}

/// With `max_connections` held by idle connections, a new client waits in the listen backlog
/// and is served once the server has closed one of them (header-read timeout), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_is_freed() {
    const CAP: usize = 4;
    let srv = server(ApiConfig {
        header_read_timeout_secs: 2,
        max_connections: CAP,
        ..ApiConfig::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(TcpStream::connect(srv.addr).await.expect("connect"));
    }
    // A fresh client (no pooled connection), on a new connection past the cap.
    let fresh = Client::new(&srv.url, srv.op.token()).unwrap();
    let _: Vec<Cloud> = fresh
        .call(Method::GET, routes::LIST_CLOUDS.path, None::<&Value>)
        .await
        .expect("served once a connection is freed");
    // The server closed an idle connection before it accepted this client's: its EOF is
    // already queued on that socket.
    let mut closed = 0;
    for s in &idle {
        let mut buf = [0u8; 64];
        if matches!(s.try_read(&mut buf), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= 1,
        "the client was served while all {CAP} idle connections were open"
    );
}

/// Sends `head` (a request without its body, or with part of it) and returns the response's
/// status line and body, failing after 10 s.
async fn answer_to(addr: SocketAddr, head: String, trickle_body: bool) -> (String, Value) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    w.write_all(head.as_bytes()).await.expect("send head");
    let trickle = async move {
        // A body byte every 100 ms, for as long as the server lets us.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if !trickle_body || w.write_all(b" ").await.is_err() {
                // Keep the write half open: closing it would end the body.
                std::future::pending::<()>().await;
            }
        }
    };
    let read = async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&out);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        out
    };
    let out = tokio::select! {
        out = tokio::time::timeout(Duration::from_secs(10), read) => out.expect("no answer within 10 s"),
        () = trickle => unreachable!(),
    };
    let text = String::from_utf8(out).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a full response");
    let status = head.lines().next().unwrap().to_string();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A request whose token is missing, made up, or another cloud's is answered 401/403 without
/// its body being read: a large announced body that is never sent, or one trickled a byte at a
/// time. With a valid token a body announced over the limit is 413 before it is read, and one
/// that does not arrive is 408 after the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_read_only_after_authorization() {
    let srv = server(ApiConfig {
        request_timeout_secs: 1,
        ..ApiConfig::default()
    })
    .await;
    let a: CreatedCloud = srv
        .op
        .call(
            Method::POST,
            routes::CREATE_CLOUD.path,
            Some(&json!({"name": "a"})),
        )
        .await
        .unwrap();
    let b: CreatedCloud = srv
        .op
        .call(
            Method::POST,
            routes::CREATE_CLOUD.path,
            Some(&json!({"name": "b"})),
        )
        .await
        .unwrap();
    let id = a.cloud.id;
    let head = |auth: Option<&str>, len: usize| {
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            routes::CREATE_VM.at(&[&id])
        )
    };
    let forged = format!("atl_{id}_not-the-secret");
    for (what, auth, trickle, want, code) in [
        ("no token", None, false, "401", "unauthenticated"),
        (
            "a made-up token",
            Some(forged.as_str()),
            false,
            "401",
            "unauthenticated",
        ),
        (
            "a made-up token, trickled body",
            Some(forged.as_str()),
            true,
            "401",
            "unauthenticated",
        ),
        (
            "another cloud's token",
            Some(b.token.as_str()),
            true,
            "403",
            "forbidden",
        ),
    ] {
        let (status, v) = answer_to(srv.addr, head(auth, 1_000_000), trickle).await;
        assert!(
            status.starts_with(&format!("HTTP/1.1 {want}")),
            "{what}: {status} {v}"
        );
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
    }
    let (status, v) = answer_to(srv.addr, head(Some(&a.token), 2 << 20), false).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status} {v}");
    let (status, v) = answer_to(srv.addr, head(Some(&a.token), 100), true).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status} {v}");
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["field"].as_str()),
        (Some("request_timeout"), Some("body")),
        "{v}"
    );
    let vms: Vec<Vm> = Client::new(&srv.url, &a.token)
        .unwrap()
        .call(Method::GET, &routes::LIST_VMS.at(&[&id]), None::<&Value>)
        .await
        .unwrap();
    assert!(vms.is_empty(), "nothing was created");
}

/// `atoll serve` in a network namespace, its stderr lines sent to a channel; killed on drop.
struct Serve {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// The next stderr line containing `needle`, failing after 30 s.
    fn line_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?} from atoll serve: {e}"),
            }
        }
    }
}

/// The store really fails (etcd is killed under a running `atoll serve`): the 500 carries an
/// error id and no etcd URL, key or store text; the server's stderr has the error with the
/// URL under the same id.
#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "needs root: etcd runs in a network namespace of its own (cargo xtask test runs it)"
)]
fn a_500_carries_an_error_id_and_internals_go_to_the_log() {
    let etcd = support::EtcdServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("operator.token");
    let config = dir.path().join("control.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:7480\"\noperator_token_file = {:?}\n[store]\nbackend = \"etcd\"\netcd_endpoints = [\"{}\"]\netcd_prefix = \"{}\"\n[tls]\nmode = \"off\"\n",
            token_file, support::ETCD_ENDPOINT, support::ETCD_PREFIX
        ),
    )
    .unwrap();
    support::block_on_in_netns(&etcd.netns, || async {
        etcd.connect_when_ready(support::ETCD_PREFIX).await;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_atoll"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // This thread is in the namespace, so the child is too.
        let mut child = cmd.spawn().expect("spawn atoll serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let serve = Serve { child, lines };
        serve.line_with("control plane API on http://127.0.0.1:7480");
        let op_token = std::fs::read_to_string(&token_file).unwrap();
        let op = Client::new("http://127.0.0.1:7480", &op_token).unwrap();
        let a: CreatedCloud = op
            .call(
                Method::POST,
                routes::CREATE_CLOUD.path,
                Some(&json!({"name": "a"})),
            )
            .await
            .expect("create a cloud");
        etcd.kill();
        let cloud = Client::new("http://127.0.0.1:7480", &a.token).unwrap();
        let (status, body) = cloud
            .send(
                Method::GET,
                &routes::GET_CLOUD.at(&[&a.cloud.id]),
                None::<&Value>,
                Duration::ZERO,
            )
            .await
            .expect("an answer");
        assert_eq!(status, hyper::StatusCode::INTERNAL_SERVER_ERROR);
        let text = String::from_utf8_lossy(&body).to_string();
        let v: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(v.error.code, "internal", "{text}");
        let id = v
            .error
            .id
            .clone()
            .unwrap_or_else(|| panic!("no error id: {text}"));
        assert!(
            id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        for secret in [
            "127.0.0.1",
            "2379",
            "http",
            "etcd",
            "clouds/",
            support::ETCD_PREFIX,
            "store",
        ] {
            assert!(
                !text.to_lowercase().contains(secret),
                "the 500 names {secret:?}: {text}"
            );
        }
        let logged = serve.line_with(&id);
        assert!(
            logged.contains(&format!("error {id}:")) && logged.contains(support::ETCD_ENDPOINT),
            "the log line under the id has the details: {logged}"
        );
    });
}
