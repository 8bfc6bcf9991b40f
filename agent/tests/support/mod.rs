//! Helpers shared by the agent's integration tests.
#![allow(dead_code)]

use std::{net::Ipv4Addr, path::Path, process::Command, sync::Arc};

use atoll_agent::{
    config::DataplaneConfig,
    endpoint::{DeviceSpec, EndpointSpec},
    types::{CloudId, MacAddr},
};
use atoll_testbed::{unique_prefix, PinRoot};

/// A control plane on a fresh SQLite store in `dir` (its operator token in
/// `dir/operator.token`).
pub async fn control_plane(dir: &Path) -> Arc<atoll_control::core::Core> {
    let mut cfg = atoll_control::config::ControlConfig {
        operator_token_file: dir.join("operator.token"),
        store: atoll_control::config::StoreConfig {
            path: dir.join("control.db"),
            ..Default::default()
        },
        ..Default::default()
    };
    // Where ports are published (nothing is sent to these test addresses).
    cfg.clouds.ingress_pool = vec!["198.18.1.16/28".parse().expect("prefix")];
    cfg.start().await.expect("control plane")
}

/// An API served over HTTPS by [`serve_api`], with the CA its certificate was generated
/// with (as a control plane does on its first start).
pub struct ServedApi {
    pub url: String,
    pub ca_file: std::path::PathBuf,
    pub ca_fingerprint: String,
    _dir: tempfile::TempDir,
}

impl ServedApi {
    /// How a client trusts this API: its CA file, under the agent's setting name.
    pub fn trust(&self) -> atoll_control::tls::ClientTls {
        atoll_control::tls::ClientTls {
            trust: atoll_control::tls::Trust::CaFile(self.ca_file.clone()),
            setting: format!("control.ca_file = {}", self.ca_file.display()),
            identity: None,
        }
    }

    /// A client of this API with `token`.
    pub fn client(&self, token: &str) -> atoll_control::client::Client {
        atoll_control::client::Client::with_tls(&self.url, token, Some(&self.trust())).unwrap()
    }
}

/// Serves `core`'s API over HTTPS (a generated CA and certificate) on a fresh loopback port
/// until the test ends.
pub async fn serve_api(core: Arc<atoll_control::core::Core>) -> ServedApi {
    let dir = tempfile::tempdir().unwrap();
    let (paths, ca_fingerprint, _) =
        atoll_control::tls::ensure_generated(dir.path(), &["127.0.0.1".to_string()]).unwrap();
    let tls = atoll_control::tls::server_config(&paths.cert_file, &paths.key_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(atoll_control::api::serve_tls(
        core,
        listener,
        atoll_control::api::Limits::default(),
        Some(tls),
        std::future::pending(),
    ));
    ServedApi {
        url,
        ca_file: paths.ca_file,
        ca_fingerprint,
        _dir: dir,
    }
}

/// `read()` once it has stopped changing: two equal reads 200 ms apart, or the last read
/// after 10 s. For counters of traffic that ends without an event to wait for (a guest
/// kernel's TCP teardown after the exchange that caused it has returned).
pub fn settled<T: PartialEq>(read: impl Fn() -> T) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = read();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = read();
        if now == last || std::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

pub fn require_root() {
    atoll_testbed::require_root("this test");
}

pub fn cfg(pins: &PinRoot, max_endpoints: u32, tap_pool: u32) -> DataplaneConfig {
    DataplaneConfig {
        bpffs_root: pins.path().into(),
        max_endpoints,
        max_routes: max_endpoints,
        tap_pool,
        ..DataplaneConfig::default()
    }
}

pub fn tap(name: &str, cloud: u32, last_octet: u8) -> EndpointSpec {
    EndpointSpec {
        name: name.into(),
        cloud: CloudId::new(cloud).expect("non-zero"),
        ipv4: Ipv4Addr::new(10, 0, 0, last_octet),
        mac: MacAddr::local(u32::from(last_octet) + (cloud << 8)),
        gateway: Ipv4Addr::new(10, 0, 0, 1),
        device: DeviceSpec::Tap { owner_uid: None },
    }
}

/// The next frame on a tap queue within 2 s.
pub fn read_frame(fd: &std::os::fd::OwnedFd) -> Option<Vec<u8>> {
    atoll_testbed::frame::read_frame(fd, std::time::Duration::from_secs(2))
}

pub use atoll_testbed::guest::VethGuest;

/// A veth guest of cloud number `cloud` (see [`atoll_testbed::guest::veth_guest`]).
pub fn veth_guest(
    rt: &tokio::runtime::Runtime,
    host: &mut atoll_agent::endpoint::Host,
    tags: (&str, &str),
    cloud: u32,
    ip: Ipv4Addr,
    mac: MacAddr,
    gateway: Ipv4Addr,
) -> VethGuest {
    let cloud = CloudId::new(cloud).expect("non-zero");
    atoll_testbed::guest::veth_guest(rt, host, tags, cloud, ip, mac, gateway)
}

/// Runs `scenario`, then checks that no link, namespace or bpffs pin named with one of `tags`
/// (see `unique_name`) is left, also when the scenario failed (its panic is resumed).
pub fn leaves_nothing(tags: &[&str], scenario: impl FnOnce() + std::panic::UnwindSafe) {
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    atoll_testbed::leaves_nothing(&prefixes, scenario)
}

/// Links, namespaces and pins of this process named with one of `tags`.
pub fn leftovers(tags: &[&str]) -> Vec<String> {
    let prefixes: Vec<String> = tags.iter().map(|t| unique_prefix(t)).collect();
    atoll_testbed::leftovers(&prefixes)
}

// ---------------------------------------------------------------------------------------------
// DNS from a guest: hickory-resolver inside the guest's namespace, asking its gateway.

pub mod dns {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::Duration,
    };

    use atoll_agent::dns::netns;
    use atoll_testbed::NetNs;
    use hickory_proto::{
        op::ResponseCode,
        rr::{RData, RecordType},
    };
    use hickory_resolver::{
        config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts},
        lookup::Lookup,
        net::{runtime::TokioRuntimeProvider, DnsError, NetError},
        Resolver,
    };

    #[derive(Clone, Copy, Debug)]
    pub enum Transport {
        Udp,
        Tcp,
    }

    /// Resolves `name` from inside the guest namespace `ns` with hickory-resolver, nameserver = the
    /// guest's gateway, over one transport only (no cache, one attempt).
    pub fn resolve(
        ns: &NetNs,
        gateway: Ipv4Addr,
        timeout: Duration,
        t: Transport,
        name: &str,
        ty: RecordType,
    ) -> Result<Lookup, NetError> {
        let name = name.to_string();
        netns::run_in(&ns.path(), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("current-thread runtime");
            rt.block_on(async move {
                let server = match t {
                    Transport::Udp => NameServerConfig::udp(IpAddr::V4(gateway)),
                    Transport::Tcp => NameServerConfig::tcp(IpAddr::V4(gateway)),
                };
                let config = ResolverConfig::from_parts(None, vec![], vec![server]);
                let mut opts = ResolverOpts::default();
                opts.attempts = 1;
                opts.timeout = timeout;
                opts.cache_size = 0;
                opts.use_hosts_file = ResolveHosts::Never;
                let resolver =
                    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
                        .with_options(opts)
                        .build()?;
                resolver.lookup(name.as_str(), ty).await
            })
        })
        .expect("entering the guest namespace")
    }

    pub fn addresses(l: &Lookup) -> Vec<Ipv4Addr> {
        l.answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    pub fn rcode_of(r: &Result<Lookup, NetError>) -> Option<ResponseCode> {
        match r {
            Err(NetError::Dns(DnsError::NoRecordsFound(n))) => Some(n.response_code),
            Err(NetError::Dns(DnsError::ResponseCode(c))) => Some(*c),
            _ => None,
        }
    }
}

/// `atoll-agent run` with its embedded control plane (the single-host default) on a private
/// bpffs root, tap prefix, DNS namespace, port and state directory. Killed and cleaned up
/// (`atoll-agent cleanup`: VMMs, devices, pins, DNS namespace) on drop, so a failing test
/// leaves nothing either.
pub struct EmbeddedAgent {
    pub dir: tempfile::TempDir,
    pub config: std::path::PathBuf,
    pub url: String,
    pub token: String,
    pub prefix: String,
    host: String,
    /// The network namespace it runs in (`ip netns exec`); `None`: the test's.
    netns: Option<String>,
    child: std::process::Child,
    cleaned: bool,
    _pins: PinRoot,
    _links: atoll_testbed::LinksWithPrefix,
}

impl EmbeddedAgent {
    /// Starts the agent with `extra` appended to its config (e.g. a `[vm]` section; the
    /// default here is `driver = "none"`), and waits until it converges.
    pub fn start(tag: &str, extra: &str) -> Self {
        Self::start_with_dns(tag, extra, "")
    }

    /// As [`EmbeddedAgent::start`], with `dns_extra` added to the `[dns]` section (e.g.
    /// `forward = [...]`).
    pub fn start_with_dns(tag: &str, extra: &str, dns_extra: &str) -> Self {
        Self::start_as(tag, AgentRole::solo(), extra, dns_extra)
    }

    /// An agent named `role.host` in `role.netns` (the caller's namespace: `None`), with the
    /// embedded control plane on `role.listen` or following the control plane `role.remote`.
    pub fn start_as(tag: &str, role: AgentRole<'_>, extra: &str, dns_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinRoot::new(tag);
        let prefix = unique_prefix(tag);
        let links = atoll_testbed::LinksWithPrefix(prefix.clone());
        let listen = role.listen.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let dns = atoll_testbed::unique_name(tag);
        let token_file = dir.path().join("op.token");
        let config = dir.path().join("agent.toml");
        let vm = if extra.contains("[vm]") {
            String::new()
        } else {
            "[vm]\ndriver = \"none\"\n".to_string()
        };
        let usage = if extra.contains("[usage]") {
            ""
        } else {
            "[usage]\nenabled = false\n"
        };
        let control = match role.remote {
            None => format!(
                "[control.embedded]\nlisten = \"{listen}\"\noperator_token_file = \"{}\"\n\
                 [control.embedded.store]\npath = \"{}\"\n[control.embedded.tls]\ndir = \"{}\"\n",
                token_file.display(),
                dir.path().join("control.db").display(),
                dir.path().join("tls").display(),
            ),
            Some((url, ca_file, token)) => {
                let host_token = dir.path().join("host.token");
                std::fs::write(&host_token, token).unwrap();
                format!(
                    "[control]\nmode = \"remote\"\nurl = \"{url}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n",
                    ca_file.display(),
                    host_token.display()
                )
            }
        };
        // `[control]` keys first; a remote role's own `[control]` header repeats the table,
        // so its keys are merged into the one table here.
        let control = control.replacen("[control]\n", "", 1);
        std::fs::write(
            &config,
            format!(
                "[dataplane]\nbpffs_root = \"{}\"\ntap_pool = 1\n[metrics]\nenabled = false\n\
                 {usage}[dns]\nnamespace = \"{dns}\"\ndevice = \"{dns}\"\n{dns_extra}\
                 [control]\nhost = \"{}\"\ntap_prefix = \"{prefix}\"\nvolumes_dir = \"{}\"\n\
                 {control}{vm}{extra}",
                pins.path().display(),
                role.host,
                dir.path().join("volumes").display(),
            ),
        )
        .unwrap();
        let netns = role.netns.map(|n| n.name().to_string());
        let child = spawn_agent(&config, netns.as_deref());
        let mut agent = EmbeddedAgent {
            url: format!("https://{listen}"),
            token: String::new(),
            dir,
            config,
            prefix,
            host: role.host.to_string(),
            netns,
            child,
            cleaned: false,
            _pins: pins,
            _links: links,
        };
        agent.wait_converging();
        if role.remote.is_none() {
            agent.token = std::fs::read_to_string(&token_file).unwrap();
        }
        agent
    }

    fn wait_converging(&mut self) {
        let stderr = self.child.stderr.take().unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok);
        let mut seen = Vec::new();
        for want in [
            "DNS for guests at their gateway".to_string(),
            format!("converging host {}", self.host),
        ] {
            let found = lines.by_ref().any(|l| {
                let hit = l.contains(&want);
                seen.push(l);
                hit
            });
            assert!(
                found,
                "the agent did not print {want:?}; it printed:\n{}",
                seen.join("\n")
            );
        }
        std::thread::spawn(move || lines.for_each(drop));
    }

    /// Kills the agent with SIGKILL (nothing of it runs on) and starts it again on the same
    /// config, pins and state; waits until it converges.
    pub fn restart_after_kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_agent(&self.config, self.netns.as_deref());
        self.wait_converging();
    }

    /// The agent's bpffs root (its dataplane's pins).
    pub fn pins_path(&self) -> &Path {
        self._pins.path()
    }

    /// A client of the API with `token` (the operator's: [`EmbeddedAgent::token`]), over
    /// HTTPS trusting the CA the agent's control plane generated on its first start.
    pub fn client(&self, token: &str) -> atoll_control::client::Client {
        let ca = self.dir.path().join("tls/ca.pem");
        let tls = atoll_control::tls::ClientTls {
            trust: atoll_control::tls::Trust::CaFile(ca.clone()),
            setting: format!("--ca-file {}", ca.display()),
            identity: None,
        };
        atoll_control::client::Client::with_tls(&self.url, token, Some(&tls)).unwrap()
    }

    /// Kills the agent and runs `atoll-agent cleanup`; returns cleanup's output.
    pub fn cleanup(&mut self) -> std::process::Output {
        self.cleaned = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
        agent_command(self.netns.as_deref())
            .arg("--config")
            .arg(&self.config)
            .arg("cleanup")
            .output()
            .expect("running atoll-agent cleanup")
    }
}

/// `atoll-agent`, in network namespace `netns` when there is one. Entered by `setns` in the
/// child, not by `ip netns exec`, which mounts a `/sys` of its own and so hides the bpffs
/// under `/sys/fs/bpf`.
fn agent_command(netns: Option<&str>) -> Command {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let mut c = Command::new(env!("CARGO_BIN_EXE_atoll-agent"));
    if let Some(ns) = netns {
        let path = format!("/run/netns/{ns}");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns is async-signal-safe and changes only the child's network namespace;
        // the fd stays open in the closure until the command is dropped.
        unsafe {
            c.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c
}

/// Who an [`EmbeddedAgent`] is: its host name, namespace and control plane.
#[derive(Debug, Clone, Copy)]
pub struct AgentRole<'a> {
    pub host: &'a str,
    pub netns: Option<&'a atoll_testbed::NetNs>,
    /// The embedded control plane's listen address (default: a free loopback port).
    pub listen: Option<std::net::SocketAddr>,
    /// Follow this control plane instead: (URL, its CA file, this host's token).
    pub remote: Option<(&'a str, &'a Path, &'a str)>,
}

impl AgentRole<'_> {
    /// The single-host default: host `solo`, the caller's namespace, embedded control plane.
    pub fn solo() -> Self {
        AgentRole {
            host: "solo",
            netns: None,
            listen: None,
            remote: None,
        }
    }
}

/// Starts `atoll-agent run` under umask 000, so every file it creates must get its private
/// mode from the agent itself (checked by the microVM test's walk of its directories).
fn spawn_agent(config: &Path, netns: Option<&str>) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = agent_command(netns);
    cmd.arg("--config")
        .arg(config)
        .arg("run")
        .stderr(std::process::Stdio::piped());
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

impl Drop for EmbeddedAgent {
    fn drop(&mut self) {
        if !self.cleaned {
            let _ = self.cleanup();
        }
    }
}

/// Connections held open against a TLS server until dropped: `idle` that send nothing, and
/// `slow` that start a TLS handshake record and then send one byte of it every 100 ms
/// (slowloris). Bounded in number and time (the test's).
pub struct HeldConnections {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: Option<std::thread::JoinHandle<()>>,
    _idle: Vec<std::net::TcpStream>,
}

impl HeldConnections {
    pub fn open(addr: std::net::SocketAddr, idle: usize, slow: usize) -> Self {
        let connect = || std::net::TcpStream::connect(addr).expect("connecting to the API");
        let idle: Vec<_> = (0..idle).map(|_| connect()).collect();
        let mut slow: Vec<_> = (0..slow)
            .map(|_| {
                let mut s = connect();
                // A handshake record of 512 bytes, announced and never finished.
                let _ = std::io::Write::write_all(&mut s, &[0x16, 0x03, 0x01, 0x02, 0x00]);
                s
            })
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let writer = std::thread::spawn(move || {
            // At most 10 minutes of trickling; the server may close a connection any time.
            for _ in 0..6000 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                for s in slow.iter_mut() {
                    let _ = std::io::Write::write_all(s, &[0]);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        HeldConnections {
            stop,
            writer: Some(writer),
            _idle: idle,
        }
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}
