//! etcd for tests: members started in a network namespace the test made, alone (the store and
//! API suites) or as a cluster ([`EtcdCluster`], the fleet tests that kill a member).
//!
//! A member is `ip netns exec <ns> etcd ...` with its data in tmpfs when there is one (etcd
//! fsyncs every write) and its log in a file read into panic messages. The kernel kills it if
//! the test thread dies without running the guard (`PR_SET_PDEATHSIG`), so no etcd outlives a
//! test. Members listen on 127.0.0.1 inside the namespace, so nothing reaches the host's
//! network.

use std::{
    fs::File,
    io::{Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

/// How one member is started.
#[derive(Debug)]
pub struct MemberSpec<'a> {
    pub netns: &'a str,
    pub name: &'a str,
    pub data_dir: &'a Path,
    /// `http://127.0.0.1:<port>` or `https://...` (then `extra` carries the TLS flags).
    pub client_url: &'a str,
    pub peer_url: &'a str,
    /// etcd's `--initial-cluster`: `name=peer_url,...` of every member.
    pub initial_cluster: &'a str,
    pub extra: &'a [String],
    pub log: &'a Path,
}

/// Starts one member (see the module docs); panics with a clear message when etcd is not
/// installed or cannot be started.
pub fn spawn_member(spec: &MemberSpec<'_>) -> Child {
    let etcd =
        find_in_path("etcd").expect("etcd is not installed (Debian: apt-get install etcd-server)");
    let log = File::create(spec.log).expect("etcd log file");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", spec.netns])
        .arg(&etcd)
        .args(["--name", spec.name, "--data-dir"])
        .arg(spec.data_dir)
        .args([
            "--listen-client-urls",
            spec.client_url,
            "--advertise-client-urls",
            spec.client_url,
            "--listen-peer-urls",
            spec.peer_url,
            "--initial-advertise-peer-urls",
            spec.peer_url,
            "--initial-cluster",
            spec.initial_cluster,
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ])
        .args(spec.extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it makes the
    // kernel kill etcd (`ip netns exec` execs it) if the test thread dies without running
    // the guard.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawning ip netns exec etcd")
}

/// A temporary directory for etcd data: in tmpfs when there is one.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("atoll-etcd-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::Builder::new().prefix("atoll-etcd-").tempdir())
        .expect("tempdir")
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// One member of an [`EtcdCluster`].
pub struct Member {
    pub name: String,
    /// Where clients reach it (inside the cluster's namespace).
    pub client_url: String,
    port: u16,
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("client_url", &self.client_url)
            .finish_non_exhaustive()
    }
}

impl Member {
    fn alive(&self) -> bool {
        self.child
            .lock()
            .expect("lock")
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A cluster of etcd members in one network namespace: member `i` serves clients at
/// `http://127.0.0.1:{2379 + 10 i}` and its peers at the next port. Dropping it kills every
/// member and removes their data (the namespace is the caller's).
#[derive(Debug)]
pub struct EtcdCluster {
    netns: String,
    pub members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members in `netns` (which must exist, with `lo` up). They elect a leader on
    /// their own; see [`EtcdCluster::wait_for_leader`].
    pub fn start(netns: &str, n: usize) -> EtcdCluster {
        crate::require_root("an etcd cluster");
        let dir = data_dir();
        let port = |i: usize| 2379 + 10 * u16::try_from(i).expect("a few members");
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", port(i) + 1))
            .collect();
        let initial = initial.join(",");
        let members = (0..n)
            .map(|i| {
                let name = format!("m{i}");
                let client_url = format!("http://127.0.0.1:{}", port(i));
                let log = dir.path().join(format!("{name}.log"));
                let child = spawn_member(&MemberSpec {
                    netns,
                    name: &name,
                    data_dir: &dir.path().join(&name),
                    client_url: &client_url,
                    peer_url: &format!("http://127.0.0.1:{}", port(i) + 1),
                    initial_cluster: &initial,
                    extra: &[],
                    log: &log,
                });
                Member {
                    name,
                    client_url,
                    port: port(i),
                    child: Mutex::new(Some(child)),
                    log,
                }
            })
            .collect();
        EtcdCluster {
            netns: netns.to_string(),
            members,
            _dir: dir,
        }
    }

    /// Every member's client URL, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Kills member `i` now (SIGKILL: no goodbye to its peers).
    pub fn kill(&self, i: usize) {
        if let Some(child) = self.members[i].child.lock().expect("lock").as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The member every live member names as its leader, once they agree on a live one and
    /// that is a majority of the cluster; panics with the members' logs after 30 s.
    pub fn wait_for_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.leader() {
                return i;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| format!("--- {}:\n{}", m.name, m.log_text()))
                    .collect();
                panic!(
                    "the etcd cluster has no leader after 30 s:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agreed live leader, if there is one now.
    pub fn leader(&self) -> Option<usize> {
        let path = PathBuf::from(format!("/run/netns/{}", self.netns));
        let statuses: Vec<(usize, Status)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.alive())
            .filter_map(|(i, m)| {
                let port = m.port;
                atoll_agent::dns::netns::run_in(&path, move || status(port))
                    .ok()
                    .flatten()
                    .map(|s| (i, s))
            })
            .collect();
        if statuses.len() * 2 <= self.members.len() {
            return None;
        }
        let leader = statuses.first()?.1.leader.clone();
        if leader.is_empty() || statuses.iter().any(|(_, s)| s.leader != leader) {
            return None;
        }
        statuses
            .iter()
            .find(|(_, s)| s.member_id == leader)
            .map(|(i, _)| *i)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Some(mut child) = m.child.lock().ok().and_then(|mut c| c.take()) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

struct Status {
    member_id: String,
    leader: String,
}

/// `/v3/maintenance/status` of the member at 127.0.0.1:`port` (in the calling thread's
/// namespace), by a plain HTTP/1.1 request; `None` when it does not answer.
fn status(port: u16) -> Option<Status> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let body = "{}";
    write!(
        s,
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let json: serde_json::Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1)?).ok()?;
    // int64 fields are strings in etcd's JSON gateway; either way, compare their text.
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    Some(Status {
        member_id: text(&json["header"]["member_id"]),
        leader: text(&json["leader"]),
    })
}
