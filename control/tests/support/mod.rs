//! Test backends for the store suite (`store.rs`) and the API suite (`api.rs`): a fresh SQLite
//! store in a temporary directory, or a fresh etcd in a network namespace of its own (so
//! parallel tests can all use 127.0.0.1:2379 and nothing on the host is touched). Every etcd
//! case runs on a dedicated thread with its own tokio runtime ([`block_on_in_netns`]); that
//! thread first enters the namespace, so every socket its runtime opens (worker and blocking
//! threads are created by it and inherit the namespace) is in there: the store's connections to
//! etcd, and for the API suite also the API server's listener on 127.0.0.1 and the test's
//! clients. No traffic leaves the namespace's loopback.
//!
//! etcd runs with its defaults, like a stock install: notably `--max-txn-ops` stays 128, so a
//! transaction the core would send that a default etcd refuses fails here too.
//!
//! Each test binary that includes this module uses only part of it, hence `allow(dead_code)`.

#![allow(dead_code)]

use std::{
    fs::File,
    future::Future,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::Mutex,
    time::{Duration, Instant},
};

use atoll_control::store::{
    etcd::EtcdStore,
    sqlite::{SqliteOptions, SqliteStore},
    Store, Watch, WatchBatch,
};

/// History kept by the SQLite stores of the suite: small, so compaction is reachable.
pub const SQLITE_HISTORY: u64 = 16;
pub const ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Namespace of the etcd store under test.
pub const ETCD_PREFIX: &str = "/atoll-test/";

pub enum Backend {
    Sqlite,
    Etcd(EtcdStore),
}

/// What a case gets: the store under test and its backend.
pub struct Env {
    pub store: Store,
    pub backend: Backend,
}

impl Env {
    /// Makes the history up to the current revision unavailable to watches: compacts etcd; the
    /// SQLite stores keep only [`SQLITE_HISTORY`] revisions, so the case writes more than that
    /// before calling this.
    pub async fn compact(&self) {
        if let Backend::Etcd(etcd) = &self.backend {
            let revision = self.store.revision().await.expect("revision");
            etcd.compact(revision).await.expect("etcd compaction");
        }
    }
}

/// The next batch of `watch`, failing the test after 10 s.
pub async fn next_batch(watch: &mut Watch) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("no watch batch within 10 s")
        .expect("watch")
}

/// The runtime every case runs on: multi-threaded, so a case's concurrent requests really race.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `case` against a fresh SQLite store.
pub fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(
        dir.path().join("store.db"),
        SqliteOptions {
            synchronous_full: false,
            history: SQLITE_HISTORY,
        },
    )
    .expect("open sqlite store");
    runtime().block_on(case(Env {
        store: store.into(),
        backend: Backend::Sqlite,
    }));
}

/// Runs `case` against a fresh etcd in a network namespace of its own.
pub fn run_etcd<F, Fut>(case: F)
where
    F: FnOnce(Env) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let server = EtcdServer::start();
    block_on_in_netns(&server.netns, || async {
        let etcd = server.connect_when_ready(ETCD_PREFIX).await;
        case(Env {
            store: etcd.clone().into(),
            backend: Backend::Etcd(etcd),
        })
        .await;
    });
}

/// Runs the future `make` returns to completion on a new thread that first enters network
/// namespace `netns`, on a [`runtime`] of its own built there (so all of its sockets are in the
/// namespace). The runtime, and every task still on it, is dropped before this returns; a panic
/// of the case is propagated (the caller's guards, e.g. an [`EtcdServer`], still clean up).
pub fn block_on_in_netns<F, Fut>(netns: &str, make: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(netns);
                runtime().block_on(make());
            })
            .join()
    });
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

pub use atoll_testbed::{require_root, unique_name};

/// Runs a command that must succeed.
fn run(cmd: &mut Command) {
    atoll_testbed::run(cmd).unwrap_or_else(|e| panic!("{e}"));
}

/// Moves the calling thread into network namespace `name` (threads it creates later inherit
/// it).
pub fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: `ns` is an open namespace file for the duration of the call; setns changes only
    // the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
}

/// One etcd member in network namespace `netns`, listening on 127.0.0.1:2379 there. Dropping it
/// kills etcd and deletes the namespace and the data directory, also when the test panics.
pub struct EtcdServer {
    pub netns: String,
    child: Mutex<Option<Child>>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The files of an etcd that speaks TLS and wants client certificates, made by a CA of the
/// test's (see [`EtcdServer::start_tls`]).
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca_fingerprint: String,
}

/// The TLS endpoint of [`EtcdServer::start_tls`].
pub const ETCD_TLS_ENDPOINT: &str = "https://127.0.0.1:2379";

impl EtcdServer {
    pub fn start() -> EtcdServer {
        Self::start_with(ETCD_ENDPOINT, &[])
    }

    /// An etcd serving `https://127.0.0.1:2379` with `--client-cert-auth`: its server and
    /// client certificates come from a new CA whose files are written to `dir`.
    pub fn start_tls(dir: &Path) -> (EtcdServer, EtcdTls) {
        use atoll_control::tls::Ca;
        let ca = Ca::new("atoll test etcd CA").expect("CA");
        // Usable as a client certificate too: etcd's HTTP gateway dials its own gRPC server
        // with it under --client-cert-auth.
        let server = ca
            .issue(
                "etcd",
                &["127.0.0.1".to_string(), "localhost".to_string()],
                true,
                true,
            )
            .expect("server certificate");
        let client = ca
            .issue("atoll control plane", &[], false, true)
            .expect("client certificate");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).expect("writing a certificate");
            p
        };
        let tls = EtcdTls {
            ca_file: write("ca.pem", &ca.cert_pem()),
            client_cert: write("client.pem", &client.cert_pem),
            client_key: write("client.key", &client.key_pem),
            ca_fingerprint: ca.fingerprint(),
        };
        let cert = write("server.pem", &server.cert_pem);
        let key = write("server.key", &server.key_pem);
        let args: Vec<String> = vec![
            "--cert-file".into(),
            cert.display().to_string(),
            "--key-file".into(),
            key.display().to_string(),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            tls.ca_file.display().to_string(),
        ];
        (Self::start_with(ETCD_TLS_ENDPOINT, &args), tls)
    }

    fn start_with(endpoint: &str, extra: &[String]) -> EtcdServer {
        require_root("an etcd test");
        let dir = atoll_testbed::etcd::data_dir();
        let netns = unique_name("st");
        run(Command::new("ip").args(["netns", "add", &netns]));
        let mut server = EtcdServer {
            netns,
            child: Mutex::new(None),
            log: dir.path().join("etcd.log"),
            _dir: dir,
        };
        run(Command::new("ip").args(["-n", &server.netns, "link", "set", "lo", "up"]));
        let child = atoll_testbed::etcd::spawn_member(&atoll_testbed::etcd::MemberSpec {
            netns: &server.netns,
            name: "atoll-test",
            data_dir: &server._dir.path().join("data"),
            client_url: endpoint,
            peer_url: "http://127.0.0.1:2380",
            initial_cluster: "atoll-test=http://127.0.0.1:2380",
            extra,
            log: &server.log,
        });
        *server.child.get_mut().expect("lock") = Some(child);
        server
    }

    /// Kills etcd now (the namespace and data stay until the guard drops): the store's
    /// requests fail from here on.
    pub fn kill(&self) {
        if let Some(child) = self.child.lock().expect("lock").as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects once etcd serves requests (polling, bounded by 30 s); fails with etcd's log if
    /// it exits or never gets ready.
    pub async fn connect_when_ready(&self, prefix: &str) -> EtcdStore {
        self.connect_when_ready_with(ETCD_ENDPOINT, prefix, None)
            .await
    }

    /// [`EtcdServer::connect_when_ready`] at `endpoint` with `tls`.
    pub async fn connect_when_ready_with(
        &self,
        endpoint: &str,
        prefix: &str,
        tls: Option<&atoll_control::tls::ClientTls>,
    ) -> EtcdStore {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match EtcdStore::connect_with(vec![endpoint.into()], prefix.into(), tls, None).await {
                Ok(store) => return store,
                Err(e) => {
                    let exited = self
                        .child
                        .lock()
                        .expect("lock")
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        panic!("etcd exited ({status}) before serving: {}", self.log_text());
                    }
                    if Instant::now() > deadline {
                        panic!("etcd not ready after 30 s ({e}): {}", self.log_text());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.get_mut().ok().and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// The path of this test binary, to re-run one of its (ignored) helper tests as a child.
pub fn this_test_binary() -> PathBuf {
    std::env::current_exe().expect("current_exe")
}

pub fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}
