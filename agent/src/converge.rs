//! Converging this host to the control plane's desired state.
//!
//! The agent long-polls the control plane for changes of its host's state after the last
//! revision it applied ([`Source::sync`]), applies them — VM endpoints (tap, identity, route),
//! volume files, DNS zones — and reports each VM's status back.
//!
//! Decisions:
//! - **Changes, not polls.** A sync returns only what changed after a revision; a new agent,
//!   one that restarted, or one that fell behind the control plane's event window gets the full
//!   state (`full`), and then removes whatever it has that is not in it. So a restart needs no
//!   local state beyond the pinned dataplane: endpoints are matched to VMs by their
//!   `(cloud, address)` identity in the maps, not by device name.
//! - **Embedded or remote.** With the control plane in the same process (the single-host
//!   default) the source calls the core directly; otherwise it speaks the HTTP API with the
//!   host's token (`atoll host token`; the operator token works too). Both return the same
//!   [`SyncDelta`]s.
//! - **Applying never blocks on a long poll**: [`Source::sync`] borrows nothing of the host, so
//!   the agent's loop selects between it, usage ticks and signals, and applies a delta with
//!   the host borrowed only while applying.
//! - **Volumes are sparse files** `<volumes_dir>/<cloud>/<name>.raw|.qcow2`, created once and
//!   never truncated or recreated (an existing file keeps its data); qcow2 images are made by
//!   `qemu-img`. A removed volume's file is deleted; so is its cloud's directory once empty.
//! - Device names are `<tap_prefix><n>` with a host-local counter, skipping names in use
//!   (`Host::unused_name`: the device layer knows which names are taken).
//! - **Names are checked where a delta arrives** ([`Converger::apply`] screens it first), with
//!   the control plane's own rules (`Placement::validate` and its siblings in
//!   `atoll_api::model`, built from the functions the API validates requests with), so
//!   a compromised control plane or store cannot make this root process build a path
//!   (volumes, VM state and runtime directories, images and kernels), a config drive or a DNS
//!   owner from a name the API would have refused: no `/`, `..`, NUL or overlong names, zones
//!   only directly under `dns.suffix`. One place, before anything is built, rather than at
//!   each use, so no later path can forget it. A refused VM is reported `failed` with the
//!   reason and otherwise left as it was; a refused volume, removal or zone is logged and
//!   skipped; a zone loses only its refused records. The rest of the delta applies.
//! - **VMs** (with a [`VmManager`], i.e. `vm.driver = "qemu"`): a placement whose power is
//!   `running` gets its VMM started once its endpoint and volumes exist, `stopped` gets it
//!   stopped; supervisor events ([`Converger::vm_event`]) and console changes
//!   ([`Converger::report_consoles`]) are reported as they happen. A placement changed while
//!   its VM runs (a volume attached, say) applies at the VM's next start. A VM whose
//!   supervisor gave up (`failed`) is not started again by later deltas; a stop and a start
//!   of the VM are what retry it. Without a manager a VM is its network identity only
//!   (`network_ready`), for hosts whose taps another VMM opens.
//! - **Egress policies** come per cloud (`SyncDelta.egress`), are re-checked (a refused one
//!   becomes `deny`: egress fails closed), held, and passed to the DNS server
//!   ([`DnsSink::set_egress`]), which forwards only the names they allow.
//! - **Exposure services** come per provider cloud as its complete set of active grants
//!   ([`ProviderServices`]); the host installs each (VIP, NAT address, backends) and removes
//!   the provider's services that are not in the set. A full state removes the services of
//!   providers it does not list. A service that cannot be applied is logged and retried with
//!   the next change of its provider; it never blocks the rest of the delta.
//! - **The overlay** comes per cloud as its network id and the complete set of its VMs on
//!   other hosts (`SyncDelta.remote`); the host writes the network id, the peers and the
//!   remote routes, and removes what the set no longer has (all clouds' on a full state,
//!   which lists every cloud the host runs). Applied whether or not this host's overlay is
//!   on: with it off, packets to remote addresses are dropped as `overlay_off`, counted.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use atoll_api::{
    client::{Client, ClientError},
    model::{
        CloudPublications, CloudRemotes, DeniedDestination, DeniedReport, EgressPolicy, FieldError,
        Ipv4Net, Placement, Power, Protocol, ProviderServices, ServiceReport, StatusReport,
        SyncDelta, VmRef, VmReport, VmState, VmStatus, VolumeFormat, VolumePlacement, Zone,
    },
};
use atoll_api::{Command, ControlPlane, ControlPlaneError, Reply};

use crate::{
    endpoint::{
        CloudEgressSpec, DeviceSpec, EndpointError, EndpointSpec, Host, PublishSpec, ServiceSpec,
        PROTOCOL_TCP, PROTOCOL_UDP,
    },
    types::{CloudId, MacAddr},
    vm::{VmEvent, VmKey, VmManager, VmSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error("listing the exposure services in the dataplane: {0}")]
    ListServices(#[source] EndpointError),
    #[error("syncing with the control plane: {0}")]
    Sync(#[source] ControlPlaneError),
    #[error("registering host {host}: {source}")]
    Register {
        host: String,
        source: ControlPlaneError,
    },
    #[error("reporting status: {0}")]
    Report(#[source] ControlPlaneError),
    #[error("the control plane answered {command} with {reply}")]
    UnexpectedReply {
        command: &'static str,
        reply: String,
    },
    #[error("listing endpoints: {0}")]
    ListEndpoints(#[source] EndpointError),
    #[error("refusing {what} from the control plane: {source}")]
    RefuseName { what: String, source: FieldError },
}

fn refuse(what: String, source: FieldError) -> ConvergeError {
    ConvergeError::RefuseName { what, source }
}

/// Where the desired state comes from: the control plane in this process
/// (`atoll_control::core::Embedded`) or one elsewhere, through its API ([`Remote`]).
#[derive(Clone, Debug)]
pub struct Source(pub Arc<dyn ControlPlane>);

/// The API clients of a remote source (one per control plane, all serving one store), and
/// the file their token came from.
///
/// - **Failover.** Requests go to the control plane that last answered. One that cannot be
///   reached (no connection, TLS included) is passed over for the next in `control.url`'s
///   order, for any request, since it was never sent. A sync (a read) also moves on when the
///   control plane fails it after it was sent (connection lost, timed out, a 5xx); other
///   requests return that error (they may have been applied) and the agent's loop retries
///   them, on the next control plane, since the failure moved the preference on. A sync
///   continues from the same revision on any control plane: revisions are the store's.
/// - **Token rotation.** A request refused as unauthenticated re-reads the token file and, if
///   the token in it changed (the operator rotated it), retries once with the new one, so a
///   rotation needs no agent restart.
#[derive(Clone)]
pub struct Remote {
    clients: Arc<std::sync::Mutex<Vec<Client>>>,
    preferred: Arc<std::sync::atomic::AtomicUsize>,
    token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

impl Remote {
    /// A source of the control planes behind `clients` (at least one; in order of preference).
    pub fn new(clients: Vec<Client>, token_file: Option<std::path::PathBuf>) -> Self {
        assert!(!clients.is_empty(), "a remote source needs a control plane");
        Remote {
            clients: Arc::new(std::sync::Mutex::new(clients)),
            preferred: Arc::default(),
            token_file,
        }
    }

    fn clients(&self) -> Vec<Client> {
        self.clients.lock().expect("client lock").clone()
    }

    /// The URL of the control plane requests go to now.
    pub fn current(&self) -> String {
        let clients = self.clients();
        let i = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % clients.len();
        clients[i].base().to_string()
    }

    /// Runs `f` on the preferred control plane and, while `moves_on` says the failure was the
    /// control plane's, on the next ones (each once); see the type's docs.
    async fn with_client<T, F, Fut>(
        &self,
        moves_on: impl Fn(&ClientError) -> bool,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.clients().len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            match self.with_token(i, &f).await {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if e.unserved() => {
                    // Whatever happens next, the next request starts elsewhere.
                    self.preferred.store((i + 1) % n, Ordering::Relaxed);
                    if n > 1 {
                        tracing::warn!(
                            "control plane {} did not serve a request: {e}",
                            self.clients()[i].base()
                        );
                    }
                    if !moves_on(&e) {
                        return Err(e);
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one control plane was tried"))
    }

    /// `f` with client `i`, again with a re-read token if the first was refused.
    async fn with_token<T, F, Fut>(&self, i: usize, f: &F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let client = self.clients()[i].clone();
        match f(client.clone()).await {
            Err(ClientError::Api { status, .. })
                if status == hyper::StatusCode::UNAUTHORIZED && self.reload(&client) =>
            {
                f(self.clients()[i].clone()).await
            }
            r => r,
        }
    }

    /// Re-reads the token file; whether it held a token other than `used`'s (then every
    /// control plane's client sends the new one).
    fn reload(&self, used: &Client) -> bool {
        let Some(path) = &self.token_file else {
            return false;
        };
        let Ok(token) = std::fs::read_to_string(path) else {
            return false;
        };
        if token.trim() == used.token() {
            return false;
        }
        tracing::warn!(
            "the control plane refused the token; using the new one in {}",
            path.display()
        );
        let mut clients = self.clients.lock().expect("client lock");
        for c in clients.iter_mut() {
            *c = c.with_token(&token);
        }
        true
    }
}

#[async_trait::async_trait]
impl ControlPlane for Remote {
    async fn execute(&self, cmd: Command) -> Result<Reply, ControlPlaneError> {
        let cmd = &cmd;
        let read_only = matches!(cmd, Command::Sync { .. });
        Ok(self
            .with_client(
                |e| read_only || e.never_sent(),
                |c| async move { c.execute(cmd).await },
            )
            .await?)
    }
}

impl Source {
    pub fn new(control_plane: impl ControlPlane + 'static) -> Self {
        Source(Arc::new(control_plane))
    }

    /// Registers `host` (idempotent).
    pub async fn register(&self, host: &str) -> Result<(), ConvergeError> {
        let cmd = Command::RegisterHost {
            host: host.to_string(),
        };
        self.0
            .execute(cmd)
            .await
            .map(drop)
            .map_err(|source| ConvergeError::Register {
                host: host.to_string(),
                source,
            })
    }

    /// Registers `host`'s underlay address (the overlay is on).
    pub async fn register_underlay(
        &self,
        host: &str,
        underlay: std::net::Ipv4Addr,
    ) -> Result<(), ConvergeError> {
        self.registering(
            host,
            Command::SetHostUnderlay {
                host: host.to_string(),
                spec: atoll_api::model::HostUnderlay { underlay },
            },
        )
        .await
    }

    /// Registers where control planes reach `host`'s guest agents.
    pub async fn register_guest_access(
        &self,
        host: &str,
        spec: atoll_api::model::GuestAccess,
    ) -> Result<(), ConvergeError> {
        self.registering(
            host,
            Command::SetGuestAccess {
                host: host.to_string(),
                spec,
            },
        )
        .await
    }

    /// Sends one of `host`'s registrations.
    async fn registering(&self, host: &str, cmd: Command) -> Result<(), ConvergeError> {
        self.0
            .execute(cmd)
            .await
            .map(drop)
            .map_err(|source| ConvergeError::Register {
                host: host.to_string(),
                source,
            })
    }

    /// Changes after `after`, waiting up to `wait` for some.
    pub async fn sync(
        &self,
        host: &str,
        after: u64,
        wait: Duration,
    ) -> Result<SyncDelta, ConvergeError> {
        let cmd = Command::Sync {
            host: host.to_string(),
            after,
            wait_ms: wait.as_millis().try_into().unwrap_or(u64::MAX),
        };
        match self.0.execute(cmd).await.map_err(ConvergeError::Sync)? {
            Reply::Sync(delta) => Ok(*delta),
            other => Err(ConvergeError::UnexpectedReply {
                command: "a sync",
                reply: format!("{other:?}"),
            }),
        }
    }

    pub async fn report(&self, host: &str, report: StatusReport) -> Result<(), ConvergeError> {
        let cmd = Command::ReportStatus {
            host: host.to_string(),
            report,
        };
        self.0
            .execute(cmd)
            .await
            .map(drop)
            .map_err(ConvergeError::Report)
    }
}

/// What the converger tells the host's DNS server.
pub trait DnsSink: Send + Sync {
    /// The endpoint with counter slot `slot` belongs to `cloud`.
    fn set_endpoint(&self, slot: u32, cloud: CloudId);
    fn remove_endpoint(&self, slot: u32);
    fn set_zone(&self, cloud: CloudId, zone: &Zone);
    fn remove_zone(&self, cloud: CloudId);
    /// `cloud`'s egress policy (which names its questions may be forwarded for).
    fn set_egress(&self, _cloud: CloudId, _policy: &EgressPolicy) {}
    fn remove_egress(&self, _cloud: CloudId) {}
    /// The destinations the dataplane refused for `cloud`, complete.
    fn set_refused(&self, _cloud: CloudId, _entries: Vec<DeniedDestination>) {}
    /// The complete refusal lists of the clouds whose refusals changed since the last call.
    fn take_denied(&self) -> Vec<DeniedReport> {
        Vec::new()
    }
}

/// Settings of the converger.
#[derive(Debug, Clone)]
pub struct ConvergeConfig {
    /// This host's name in the control plane.
    pub host: String,
    /// Prefix of VM device names (at most 10 bytes).
    pub tap_prefix: String,
    pub volumes_dir: PathBuf,
}

/// A VM endpoint this host has applied.
#[derive(Debug, Clone)]
struct Applied {
    device: String,
    ipv4: Ipv4Addr,
    slot: u32,
}

/// Applies deltas to a [`Host`] and reports the result.
pub struct Converger {
    cfg: ConvergeConfig,
    source: Source,
    dns: Option<Arc<dyn DnsSink>>,
    revision: u64,
    vms: HashMap<(u32, String), Applied>,
    vmm: Option<VmManager>,
    /// The status last reported of each VM with a VMM.
    statuses: HashMap<VmKey, VmStatus>,
    default_image: String,
    /// The DNS suffix every zone must sit directly under (`dns.suffix`), when this host
    /// serves DNS.
    dns_suffix: Option<String>,
    /// The egress policies of the clouds with VMs here, as received (the dataplane and the DNS
    /// server enforce them).
    egress: HashMap<CloudId, EgressPolicy>,
    /// Exposure services this host failed to install, as last reported:
    /// `(provider, consumer, vip)` → the error.
    reported_failures: HashMap<(u32, u32, Ipv4Addr), String>,
    /// The VMs with an idle timeout that should run, and what they did last
    /// ([`Converger::report_idle`]).
    idle: HashMap<VmKey, IdleWatch>,
    /// Storage metering: each volume from its creation until it is removed.
    meters: Option<crate::usage::Meters>,
}

/// A running VM's idle timeout and its last activity.
#[derive(Debug, Clone)]
struct IdleWatch {
    timeout: Duration,
    /// Packets in and out of its endpoint when last read.
    packets: u64,
    /// When its packets last changed, a shell session was last seen, it (re)started, or it
    /// was last reported idle (so a report the control plane did not act on is repeated
    /// after another timeout, not every tick).
    since: std::time::Instant,
}

impl std::fmt::Debug for Converger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Converger").finish_non_exhaustive()
    }
}

/// What one applied delta did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub created: usize,
    pub deleted: usize,
    pub failed: usize,
}

fn status(state: VmState, device: Option<String>, message: Option<String>) -> VmStatus {
    VmStatus {
        state,
        device,
        message,
        updated_at: now(),
        restarts: 0,
        boot_ms: None,
        accel: None,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Converger {
    pub fn new(cfg: ConvergeConfig, source: Source, dns: Option<Arc<dyn DnsSink>>) -> Self {
        Converger {
            cfg,
            source,
            dns,
            revision: 0,
            vms: HashMap::new(),
            vmm: None,
            statuses: HashMap::new(),
            default_image: String::new(),
            dns_suffix: None,
            egress: HashMap::new(),
            reported_failures: HashMap::new(),
            idle: HashMap::new(),
            meters: None,
        }
    }

    /// Meters every volume this host holds into `meters` (storage usage; see
    /// [`crate::usage`]).
    pub fn with_meters(mut self, meters: crate::usage::Meters) -> Self {
        self.meters = Some(meters);
        self
    }

    /// Refuses zones (and placements whose zone is) not directly under `suffix`: the
    /// host's `dns.suffix`, the only names its DNS server answers for.
    pub fn with_dns_suffix(mut self, suffix: &str) -> Self {
        self.dns_suffix = Some(suffix.to_string());
        self
    }

    /// Runs the placed VMs with `vmm`, booting `default_image` for VMs that name none.
    pub fn with_vms(mut self, vmm: VmManager, default_image: &str) -> Self {
        self.vmm = Some(vmm);
        self.default_image = default_image.to_string();
        self
    }

    /// Kills every VMM this converger runs (tests and benchmarks: the agent itself leaves VMs
    /// running when it stops).
    pub async fn kill_vms(&mut self) {
        if let Some(v) = self.vmm.as_mut() {
            v.kill_all().await;
        }
    }

    /// Records a supervisor's event and reports it (with the console's tail if it changed).
    pub async fn vm_event(&mut self, ev: VmEvent) -> Result<(), ConvergeError> {
        if !self.vms.contains_key(&ev.key) {
            return Ok(()); // deleted meanwhile
        }
        let prev = self.statuses.get(&ev.key);
        let status = VmStatus {
            state: ev.state,
            device: self.vms.get(&ev.key).map(|a| a.device.clone()),
            message: ev.message,
            updated_at: now(),
            restarts: ev.restarts,
            // A boot time stays known until the next boot measures one.
            boot_ms: ev.boot_ms.or_else(|| {
                prev.and_then(|p| p.boot_ms)
                    .filter(|_| ev.state != VmState::Booting)
            }),
            accel: ev.accel.map(str::to_string),
        };
        self.statuses.insert(ev.key.clone(), status);
        self.report_keys(&[ev.key]).await
    }

    /// Reports the running VMs whose idle timeout passed: no packet in or out of their
    /// endpoint (any class, either direction, in the dataplane's counters) and no operator
    /// shell session since then. Each is reported once per timeout it stays idle; the
    /// control plane stops it, and the stop arrives with a sync like any other.
    pub async fn report_idle(&mut self, host: &Host) -> Result<(), ConvergeError> {
        let Some(vmm) = self.vmm.as_ref() else {
            return Ok(());
        };
        if self.idle.is_empty() {
            return Ok(());
        }
        // An operator shell or an exec or file session through the guest agent: activity.
        let mut sessions = vmm.shell_sessions();
        sessions.extend(vmm.guests().busy());
        let now = std::time::Instant::now();
        let mut idle = Vec::new();
        for (key, w) in self.idle.iter_mut() {
            let Some(a) = self.vms.get(key) else { continue };
            let booted = self
                .statuses
                .get(key)
                .is_some_and(|s| s.state == VmState::Running);
            let packets = match host.dataplane().counters(a.slot) {
                Ok(c) => c
                    .traffic
                    .iter()
                    .flatten()
                    .map(|t| t.packets)
                    .fold(0u64, u64::wrapping_add),
                Err(e) => {
                    tracing::warn!("counters of VM {}/{}: {e}", key.0, key.1);
                    continue;
                }
            };
            if !booted || !vmm.is_active(key) || packets != w.packets || sessions.contains(key) {
                w.packets = packets;
                w.since = now;
                continue;
            }
            if now.duration_since(w.since) >= w.timeout {
                if let Some(cloud) = CloudId::new(key.0) {
                    idle.push(VmRef {
                        cloud,
                        vm: key.1.clone(),
                    });
                    w.since = now;
                }
            }
        }
        if idle.is_empty() {
            return Ok(());
        }
        tracing::info!("reporting {} idle VMs", idle.len());
        self.source
            .report(
                &self.cfg.host,
                StatusReport {
                    idle,
                    ..Default::default()
                },
            )
            .await
    }

    /// Reports the VMs whose console printed something since the last report.
    pub async fn report_consoles(&mut self) -> Result<(), ConvergeError> {
        self.report_keys(&[]).await
    }

    /// Reports `keys` (their last status) and every changed console.
    async fn report_keys(&mut self, keys: &[VmKey]) -> Result<(), ConvergeError> {
        let mut consoles: HashMap<VmKey, String> = match self.vmm.as_mut() {
            Some(m) => m.console_changes().into_iter().collect(),
            None => HashMap::new(),
        };
        let mut reports = Vec::new();
        for k in keys {
            if let (Some(st), Some(cloud)) = (self.statuses.get(k), CloudId::new(k.0)) {
                reports.push(VmReport {
                    cloud,
                    vm: k.1.clone(),
                    status: st.clone(),
                    console: consoles.remove(k),
                });
            }
        }
        for (k, text) in consoles {
            if let (Some(st), Some(cloud)) = (self.statuses.get(&k), CloudId::new(k.0)) {
                reports.push(VmReport {
                    cloud,
                    vm: k.1.clone(),
                    status: st.clone(),
                    console: Some(text),
                });
            }
        }
        // At most 32 consoles of 16 KiB per request: far below the API's 1 MiB body limit.
        for chunk in reports.chunks(32) {
            self.source
                .report(
                    &self.cfg.host,
                    StatusReport {
                        vms: chunk.to_vec(),
                        ..Default::default()
                    },
                )
                .await?;
        }
        Ok(())
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn host(&self) -> &str {
        &self.cfg.host
    }

    /// The revision applied last (0 before the first sync).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A future for the next delta; borrows nothing of `self`.
    pub fn next_delta(
        &self,
        wait: Duration,
    ) -> impl std::future::Future<Output = Result<SyncDelta, ConvergeError>> + Send + 'static {
        let source = self.source.clone();
        let host = self.cfg.host.clone();
        let after = self.revision;
        async move { source.sync(&host, after, wait).await }
    }

    /// Takes every item out of `delta` that names something the control plane could not
    /// have accepted ([`Placement::validate`] and its siblings, the control plane's own
    /// rules), each with a log line; a zone loses only its bad records, unless its apex is
    /// bad. Returns the refused placements with why, to be reported `failed`.
    fn screen(&self, delta: &mut SyncDelta) -> Vec<(Placement, ConvergeError)> {
        let suffix = self.dns_suffix.as_deref();
        let logged = |e: ConvergeError| {
            tracing::warn!("refused: {e}");
            e
        };
        let mut refused = Vec::new();
        for p in std::mem::take(&mut delta.vms) {
            match p.validate(suffix) {
                Ok(()) => delta.vms.push(p),
                Err(e) => {
                    let e = logged(refuse(format!("VM {}/{:?}", p.cloud, p.vm), e));
                    refused.push((p, e));
                }
            }
        }
        delta.removed_vms.retain(|r| {
            r.validate()
                .map_err(|e| {
                    logged(refuse(
                        format!("the removal of VM {}/{:?}", r.cloud, r.vm),
                        e,
                    ))
                })
                .is_ok()
        });
        delta.volumes.retain(|v| {
            v.validate()
                .map_err(|e| logged(refuse(format!("volume {}/{:?}", v.cloud, v.name), e)))
                .is_ok()
        });
        delta.removed_volumes.retain(|v| {
            v.validate()
                .map_err(|e| {
                    logged(refuse(
                        format!("the removal of volume {}/{:?}", v.cloud, v.name),
                        e,
                    ))
                })
                .is_ok()
        });
        delta.zones.retain_mut(|z| {
            if let Err(e) = z.validate_apex(suffix) {
                logged(refuse(format!("the zone of cloud {}", z.cloud), e));
                return false;
            }
            let (cloud, apex) = (z.cloud, z.apex.clone());
            z.records.retain(|r| {
                r.validate(&apex)
                    .map_err(|e| {
                        logged(refuse(
                            format!("record {:?} {} of cloud {cloud}", r.fqdn, r.rtype.as_str()),
                            e,
                        ))
                    })
                    .is_ok()
            });
            true
        });
        // A refused egress policy fails closed: the cloud gets `deny` rather than keeping an
        // older policy or the host's forwarding as configured.
        for e in &mut delta.egress {
            if let Err(err) = e.policy.validate() {
                logged(refuse(
                    format!("the egress policy of cloud {}", e.cloud),
                    err,
                ));
                e.policy = EgressPolicy::deny_all();
            }
        }
        refused
    }

    /// Applies `delta` to `host` and reports the VMs' status; returns what changed. Names
    /// are checked first ([`Converger::screen`]): a refused VM is reported `failed` with the
    /// reason and left as it was (not created, started, changed or removed); other refused
    /// items are logged and skipped; the rest applies.
    pub async fn apply(
        &mut self,
        host: &mut Host,
        mut delta: SyncDelta,
    ) -> Result<ApplyStats, ConvergeError> {
        let mut out = ApplyStats::default();
        let mut reports = Vec::new();
        let refused = self.screen(&mut delta);
        if delta.full {
            self.adopt(host)?;
            // Endpoints adopted after a restart are known by address until named here.
            for p in &delta.vms {
                if let Some(a) = self.vms.remove(&(p.cloud.get(), format!("@{}", p.ipv4))) {
                    self.vms.insert((p.cloud.get(), p.vm.clone()), a);
                }
            }
            // A refused placement still names a VM the host keeps as it is.
            let want: HashSet<(u32, String)> = delta
                .vms
                .iter()
                .chain(refused.iter().map(|(p, _)| p))
                .map(|p| (p.cloud.get(), p.vm.clone()))
                .collect();
            let stale: Vec<(u32, String)> = self
                .vms
                .keys()
                .filter(|k| !want.contains(*k))
                .cloned()
                .collect();
            for key in stale {
                self.delete_vm(host, &key).await;
                out.deleted += 1;
            }
            let want_vols: HashSet<(String, String)> = delta
                .volumes
                .iter()
                .map(|v| (v.cloud.to_string(), v.name.clone()))
                .collect();
            self.remove_stale_volumes(&want_vols);
        }
        for r in &delta.removed_vms {
            if self.vms.contains_key(&(r.cloud.get(), r.vm.clone())) {
                self.delete_vm(host, &(r.cloud.get(), r.vm.clone())).await;
                out.deleted += 1;
            }
        }
        for r in &delta.removed_volumes {
            self.remove_volume(&r.cloud.to_string(), &r.name);
        }
        for v in &delta.volumes {
            match self.create_volume(v) {
                Ok(()) => self.meter_volume(v),
                Err(e) => {
                    tracing::error!(cloud = %v.cloud, volume = %v.name, "creating volume {}/{}: {e}", v.cloud, v.name)
                }
            }
        }
        for p in &delta.vms {
            let status = match self.ensure_vm(host, p).await {
                Ok((device, created)) => {
                    out.created += usize::from(created);
                    let state = VmState::NetworkReady;
                    self.power(p, &device)
                        .unwrap_or_else(|| status(state, Some(device), None))
                }
                Err(message) => {
                    out.failed += 1;
                    status(VmState::Failed, None, Some(message))
                }
            };
            reports.push(VmReport {
                cloud: p.cloud,
                vm: p.vm.clone(),
                status,
                console: None,
            });
        }
        if delta.full {
            let listed: HashSet<CloudId> = delta.egress.iter().map(|e| e.cloud).collect();
            let mut gone: HashSet<CloudId> = self
                .egress
                .keys()
                .filter(|c| !listed.contains(c))
                .copied()
                .collect();
            // What a previous run of the agent left in the dataplane, too.
            match host.egress_clouds() {
                Ok(ids) => gone.extend(
                    ids.into_iter()
                        .filter_map(CloudId::new)
                        .filter(|c| !listed.contains(c)),
                ),
                Err(e) => tracing::error!("listing the clouds' egress: {e}"),
            }
            for c in gone {
                self.forget_egress(host, c);
            }
        }
        for c in &delta.removed_egress {
            self.forget_egress(host, *c);
        }
        for e in &delta.egress {
            tracing::debug!(cloud = %e.cloud, mode = ?e.policy.mode, "egress policy received");
            // Rules and entry first, then the DNS server: a name it forwards under the new
            // policy is learnt into rules that exist.
            let spec = CloudEgressSpec {
                policy: e.policy.clone(),
                cidr: e.cidr,
                address: e.address,
            };
            if let Err(err) = host.set_cloud_egress(e.cloud, &spec) {
                // Fail closed: what the cloud could reach before must not outlive a policy
                // this host could not apply.
                tracing::error!(cloud = %e.cloud, "applying the egress policy: {err}");
                if let Err(err) = host.remove_cloud_egress(e.cloud) {
                    tracing::error!(cloud = %e.cloud, "removing the egress of cloud {}: {err}", e.cloud);
                }
            }
            if let Some(dns) = &self.dns {
                dns.set_egress(e.cloud, &e.policy);
            }
            self.egress.insert(e.cloud, e.policy.clone());
        }
        apply_publications(host, &delta.published, delta.full);
        apply_remotes(host, &delta.remote, delta.full);
        if let Some(dns) = &self.dns {
            for c in &delta.removed_zones {
                dns.remove_zone(*c);
            }
            for z in &delta.zones {
                dns.set_zone(z.cloud, z);
            }
        }
        if delta.full {
            let listed: HashSet<u32> = delta.services.iter().map(|p| p.provider.get()).collect();
            let installed = host.services().map_err(ConvergeError::ListServices)?;
            for (_, s) in installed {
                if !listed.contains(&s.provider.get()) {
                    if let Err(e) = host.remove_service(s.consumer, s.vip) {
                        tracing::error!(consumer = %s.consumer, vip = %s.vip, "{e}");
                    }
                }
            }
        }
        let mut services = Vec::new();
        for p in &delta.services {
            // Report what changed since the last report: a new or different failure, or an
            // install after a failure. Services no longer sent are forgotten.
            let mut sent = HashSet::new();
            for r in apply_services(host, p)? {
                let key = (r.provider.get(), r.consumer.get(), r.vip);
                sent.insert(key);
                if self.reported_failures.get(&key) != r.error.as_ref() {
                    match &r.error {
                        Some(e) => self.reported_failures.insert(key, e.clone()),
                        None => self.reported_failures.remove(&key),
                    };
                    services.push(r);
                }
            }
            self.reported_failures
                .retain(|k, _| k.0 != p.provider.get() || sent.contains(k));
        }
        self.revision = delta.revision;
        if !reports.is_empty() || !services.is_empty() {
            self.source
                .report(
                    &self.cfg.host,
                    StatusReport {
                        vms: reports,
                        services,
                        ..Default::default()
                    },
                )
                .await?;
        }
        // Apart, so that a control plane choking on a name it sent cannot lose the reports of
        // the rest.
        let refused: Vec<VmReport> = refused
            .into_iter()
            .map(|(p, e)| VmReport {
                cloud: p.cloud,
                vm: p.vm,
                status: status(VmState::Failed, None, Some(e.to_string())),
                console: None,
            })
            .collect();
        out.failed += refused.len();
        if !refused.is_empty() {
            if let Err(e) = self
                .source
                .report(
                    &self.cfg.host,
                    StatusReport {
                        vms: refused,
                        ..Default::default()
                    },
                )
                .await
            {
                tracing::warn!("reporting refused VMs: {e}");
            }
        }
        Ok(out)
    }

    /// Starts or stops the VM of placement `p` (endpoint `device` live) per its power; the
    /// status to report, or `None` without a VM manager.
    fn power(&mut self, p: &Placement, device: &str) -> Option<VmStatus> {
        let key: VmKey = (p.cloud.get(), p.vm.clone());
        let slot = self.vms.get(&key)?.slot;
        let spec = VmSpec {
            key: key.clone(),
            fqdn: p.fqdn.clone(),
            zone: p.zone.clone(),
            ipv4: p.ipv4,
            gateway: p.gateway,
            mac: p.mac.parse().ok()?,
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            tap: device.to_string(),
            slot,
            volumes: p
                .volumes
                .iter()
                .map(|name| {
                    let (path, format) = self.volume_file(&p.cloud.to_string(), name);
                    (name.clone(), path, format)
                })
                .collect(),
            image: p
                .image
                .clone()
                .unwrap_or_else(|| self.default_image.clone()),
            kernel: p.kernel.clone(),
            user_data: p.user_data.clone(),
        };
        let vmm = self.vmm.as_mut()?;
        let last = self.statuses.get(&key).cloned();
        let active = vmm.is_active(&key);
        // An idle timeout applies while the VM should run; a start begins its count anew.
        match (p.power, p.idle_timeout_secs) {
            (Power::Running, Some(t)) => {
                let timeout = Duration::from_secs(u64::from(t));
                let w = self.idle.entry(key.clone()).or_insert(IdleWatch {
                    timeout,
                    packets: 0,
                    since: std::time::Instant::now(),
                });
                w.timeout = timeout;
                if !active {
                    w.since = std::time::Instant::now();
                }
            }
            _ => {
                self.idle.remove(&key);
            }
        }
        let st = match p.power {
            Power::Running if active => {
                last.unwrap_or_else(|| status(VmState::Booting, None, None))
            }
            // A VM its supervisor gave up on stays failed until stopped and started again.
            Power::Running if last.as_ref().is_some_and(|s| s.state == VmState::Failed) => {
                last.expect("checked")
            }
            Power::Running => {
                vmm.start(spec);
                status(VmState::Booting, None, None)
            }
            Power::Stopped if active => {
                vmm.stop(&key);
                VmStatus {
                    state: VmState::Stopping,
                    updated_at: now(),
                    ..last.unwrap_or_else(|| status(VmState::Stopping, None, None))
                }
            }
            Power::Stopped => VmStatus {
                state: VmState::Stopped,
                message: None,
                updated_at: now(),
                ..last.unwrap_or_else(|| status(VmState::Stopped, None, None))
            },
        };
        let st = VmStatus {
            device: Some(device.to_string()),
            ..st
        };
        self.statuses.insert(key, st.clone());
        Some(st)
    }

    /// Reports what the clouds here were refused since the last report (their complete
    /// lists), if anything changed.
    /// Hands the destinations the dataplane refused (`Host::refused_destinations`) to the
    /// DNS server's denied lists, for the clouds this host holds a policy of.
    pub fn record_refused(&self, refused: Vec<(CloudId, DeniedDestination)>) {
        let Some(dns) = &self.dns else {
            return;
        };
        let mut per_cloud: HashMap<CloudId, Vec<DeniedDestination>> =
            self.egress.keys().map(|c| (*c, Vec::new())).collect();
        for (cloud, d) in refused {
            if let Some(list) = per_cloud.get_mut(&cloud) {
                list.push(d);
            }
        }
        for (cloud, entries) in per_cloud {
            dns.set_refused(cloud, entries);
        }
    }

    pub async fn report_denied(&mut self) -> Result<(), ConvergeError> {
        let Some(dns) = &self.dns else {
            return Ok(());
        };
        let denied = dns.take_denied();
        if denied.is_empty() {
            return Ok(());
        }
        self.source
            .report(
                &self.cfg.host,
                StatusReport {
                    denied,
                    ..Default::default()
                },
            )
            .await
    }

    fn forget_egress(&mut self, host: &mut Host, cloud: CloudId) {
        self.egress.remove(&cloud);
        if let Err(e) = host.remove_cloud_egress(cloud) {
            tracing::error!(cloud = %cloud, "removing the egress of cloud {cloud}: {e}");
        }
        if let Some(dns) = &self.dns {
            dns.remove_egress(cloud);
        }
    }

    /// The egress policy this host holds for `cloud`, as received.
    pub fn egress_policy(&self, cloud: CloudId) -> Option<&EgressPolicy> {
        self.egress.get(&cloud)
    }

    /// A volume's file on this host and its format (raw unless a qcow2 file exists).
    fn volume_file(&self, cloud: &str, name: &str) -> (PathBuf, VolumeFormat) {
        let qcow2 = self.volume_path(cloud, name, VolumeFormat::Qcow2);
        if qcow2.exists() {
            (qcow2, VolumeFormat::Qcow2)
        } else {
            (
                self.volume_path(cloud, name, VolumeFormat::Raw),
                VolumeFormat::Raw,
            )
        }
    }

    /// Rebuilds the VM table from the dataplane: endpoints whose device has our prefix are
    /// VMs, known by `(cloud, address)`; the placements of the full state name them.
    fn adopt(&mut self, host: &Host) -> Result<(), ConvergeError> {
        if !self.vms.is_empty() {
            return Ok(());
        }
        for e in host.endpoints().map_err(ConvergeError::ListEndpoints)? {
            let Some(name) = e.name.filter(|n| n.starts_with(&self.cfg.tap_prefix)) else {
                continue;
            };
            // The VM's name is not in the dataplane; use a placeholder keyed by address until
            // the full state names it (see `ensure_vm`).
            self.vms.insert(
                (e.cloud.get(), format!("@{}", e.ipv4)),
                Applied {
                    device: name,
                    ipv4: e.ipv4,
                    slot: e.slot,
                },
            );
            if let Some(dns) = &self.dns {
                dns.set_endpoint(e.slot, e.cloud);
            }
        }
        Ok(())
    }

    async fn ensure_vm(
        &mut self,
        host: &mut Host,
        p: &Placement,
    ) -> Result<(String, bool), String> {
        let cloud = p.cloud;
        let mac: MacAddr = p.mac.parse().map_err(|e| format!("{e}"))?;
        let key = (p.cloud.get(), p.vm.clone());
        if let Some(a) = self.vms.get(&key) {
            if a.ipv4 == p.ipv4 {
                return Ok((a.device.clone(), false));
            }
            // Same VM name, new address (deleted and recreated meanwhile): replace it.
            self.delete_vm(host, &key).await;
        }
        let name = host.unused_name(&self.cfg.tap_prefix);
        let spec = EndpointSpec {
            name: name.clone(),
            cloud,
            ipv4: p.ipv4,
            mac,
            gateway: p.gateway,
            device: DeviceSpec::Tap { owner_uid: None },
        };
        let ep = host
            .create_endpoint(&spec)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(dns) = &self.dns {
            dns.set_endpoint(ep.slot, cloud);
        }
        self.vms.insert(
            key,
            Applied {
                device: name.clone(),
                ipv4: p.ipv4,
                slot: ep.slot,
            },
        );
        Ok((name, true))
    }

    async fn delete_vm(&mut self, host: &mut Host, key: &(u32, String)) {
        self.idle.remove(key);
        let Some(a) = self.vms.remove(key) else {
            return;
        };
        // The VMM goes first: it holds the tap and the volumes.
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.kill(key).await;
        }
        self.statuses.remove(key);
        if let Some(dns) = &self.dns {
            dns.remove_endpoint(a.slot);
        }
        match host.delete_endpoint(&a.device).await {
            Ok(()) | Err(EndpointError::NotFound(_)) => {}
            Err(e) => {
                tracing::error!(cloud = %key.0, vm = %key.1, endpoint = %a.device, "deleting VM {}/{}: {e}", key.0, key.1)
            }
        }
    }

    fn volume_path(&self, cloud: &str, name: &str, format: VolumeFormat) -> PathBuf {
        let ext = match format {
            VolumeFormat::Raw => "raw",
            VolumeFormat::Qcow2 => "qcow2",
        };
        self.cfg
            .volumes_dir
            .join(cloud)
            .join(format!("{name}.{ext}"))
    }

    fn create_volume(&self, v: &VolumePlacement) -> std::io::Result<()> {
        let path = self.volume_path(&v.cloud.to_string(), &v.name, v.format);
        if path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("volume paths have a directory");
        atoll_api::private::create_dir_all(dir, 0o700)?;
        let bytes = v.size_gib << 30;
        match v.format {
            VolumeFormat::Raw => {
                // Written to a temporary name and renamed, so a crash never leaves a short file
                // under the volume's name.
                let tmp = dir.join(format!(".{}.tmp", v.name));
                let f = atoll_api::private::create_file(&tmp)?;
                f.set_len(bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            }
            VolumeFormat::Qcow2 => {
                let tmp = dir.join(format!(".{}.qcow2.tmp", v.name));
                // Created private first: qemu-img truncates it and keeps its mode.
                atoll_api::private::create_file(&tmp)?;
                let out = std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&tmp)
                    .arg(bytes.to_string())
                    .output()?;
                if !out.status.success() {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(std::io::Error::other(format!(
                        "qemu-img create failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                std::fs::rename(&tmp, &path)
            }
        }
    }

    /// Meters a volume this host holds (from its creation by the control plane).
    fn meter_volume(&self, v: &VolumePlacement) {
        let Some(meters) = &self.meters else { return };
        let now = crate::usage::now_unix_ms();
        let since_ms = if v.created_at_ms == 0 {
            now
        } else {
            v.created_at_ms.min(now)
        };
        meters.start(
            &crate::usage::volume_incarnation(v.cloud.get(), &v.name, v.created_at_ms),
            crate::usage::Meter {
                cloud: v.cloud.get(),
                resource: crate::usage::Resource::Volume {
                    name: v.name.clone(),
                    size_gib: v.size_gib,
                },
                since_ms,
                until_ms: None,
            },
        );
    }

    fn remove_volume(&self, cloud: &str, name: &str) {
        if let (Some(meters), Ok(id)) = (&self.meters, cloud.parse::<CloudId>()) {
            meters.end_volume(id.get(), name, crate::usage::now_unix_ms());
        }
        for f in [VolumeFormat::Raw, VolumeFormat::Qcow2] {
            let p = self.volume_path(cloud, name, f);
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(cloud, volume = name, "removing volume {}: {e}", p.display());
                }
            }
        }
        // Only succeeds when empty.
        let _ = std::fs::remove_dir(self.cfg.volumes_dir.join(cloud));
    }

    fn remove_stale_volumes(&self, want: &HashSet<(String, String)>) {
        let Ok(clouds) = std::fs::read_dir(&self.cfg.volumes_dir) else {
            return;
        };
        for c in clouds.flatten() {
            let cloud = c.file_name().to_string_lossy().into_owned();
            if cloud.parse::<CloudId>().is_err() {
                continue; // not ours
            }
            let Ok(files) = std::fs::read_dir(c.path()) else {
                continue;
            };
            for f in files.flatten() {
                let file = f.file_name().to_string_lossy().into_owned();
                let Some((name, _)) = file.rsplit_once('.') else {
                    continue;
                };
                if !want.contains(&(cloud.clone(), name.to_string())) {
                    self.remove_volume(&cloud, name);
                }
            }
        }
    }

    /// The volume directory (for tests and tools).
    pub fn volumes_dir(&self) -> &Path {
        &self.cfg.volumes_dir
    }
}

/// The host's DNS server view follows the converger: endpoints by slot, zones by cloud.
impl DnsSink for crate::dns::DnsView {
    fn set_endpoint(&self, slot: u32, cloud: CloudId) {
        crate::dns::DnsView::set_endpoint(self, slot, cloud);
    }

    fn set_egress(&self, cloud: CloudId, policy: &EgressPolicy) {
        crate::dns::DnsView::set_egress(self, cloud, policy);
    }

    fn remove_egress(&self, cloud: CloudId) {
        crate::dns::DnsView::remove_egress(self, cloud);
    }

    fn set_refused(&self, cloud: CloudId, entries: Vec<DeniedDestination>) {
        crate::dns::DnsView::set_refused(self, cloud, entries);
    }

    fn take_denied(&self) -> Vec<DeniedReport> {
        crate::dns::DnsView::take_denied(self)
    }

    fn remove_endpoint(&self, slot: u32) {
        crate::dns::DnsView::remove_endpoint(self, slot);
    }

    fn set_zone(&self, cloud: CloudId, zone: &Zone) {
        use crate::dns::{Record, RecordData};
        use atoll_api::model::RecordType;
        let mut records = Vec::new();
        for r in &zone.records {
            for v in &r.values {
                let data = match r.rtype {
                    RecordType::A => v.parse().map(RecordData::A).ok(),
                    RecordType::Aaaa => v.parse().map(RecordData::Aaaa).ok(),
                    RecordType::Cname => Some(RecordData::Cname(v.clone())),
                    // A TXT record set's values are one record's character strings.
                    RecordType::Txt => None,
                };
                if let Some(data) = data {
                    records.push(Record {
                        name: r.fqdn.clone(),
                        ttl: r.ttl,
                        data,
                    });
                }
            }
            if r.rtype == RecordType::Txt {
                records.push(Record {
                    name: r.fqdn.clone(),
                    ttl: r.ttl,
                    data: RecordData::Txt(r.values.clone()),
                });
            }
        }
        let z = crate::dns::Zone {
            apex: zone.apex.clone(),
            records,
        };
        // The converger checked every name (`screen`); a refusal here keeps the previous zone.
        if let Err(e) = crate::dns::DnsView::set_zone(self, cloud, z) {
            tracing::error!(cloud = %cloud, "DNS zone of cloud {cloud}: {e}");
        }
    }

    fn remove_zone(&self, cloud: CloudId) {
        crate::dns::DnsView::remove_zone(self, cloud);
    }
}

/// Makes the provider's installed services exactly `p.services`; returns each service's
/// outcome (an error is the host's reason, reported to the control plane). Services no longer
/// sent are removed first, so a full `VIPS` map makes room for the ones that replace them.
/// Makes the host's publications those `published` lists for the clouds it lists (all of
/// them if `full`). An unchanged publication is left alone (its connections go on); a
/// changed one is published again (its connections are cut, as the change may have narrowed
/// who may connect).
fn apply_publications(host: &mut Host, published: &[CloudPublications], full: bool) {
    let listed: HashSet<CloudId> = published.iter().map(|p| p.cloud).collect();
    let want: Vec<PublishSpec> = published
        .iter()
        .flat_map(|cp| cp.publications.iter())
        .filter(|p| p.allow_from.len() <= atoll_api::model::MAX_ALLOW_FROM)
        .map(|p| {
            let mut allow_from: Vec<Ipv4Net> = p
                .allow_from
                .iter()
                .map(|n| Ipv4Net {
                    addr: std::net::Ipv4Addr::from(n.network()),
                    len: n.len,
                })
                .collect();
            allow_from.sort_by_key(|n| (n.addr, n.len));
            allow_from.dedup();
            PublishSpec {
                cloud: p.cloud,
                guest: (p.ipv4, p.port),
                protocol: match p.protocol {
                    Protocol::Tcp => PROTOCOL_TCP,
                    Protocol::Udp => PROTOCOL_UDP,
                },
                public: (p.address, p.port),
                allow_from,
            }
        })
        .collect();
    let have = match host.published() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("listing the published ports: {e}");
            return;
        }
    };
    for h in &have {
        let ours = full || listed.contains(&h.cloud);
        let wanted = want
            .iter()
            .any(|w| w.public == h.public && w.protocol == h.protocol);
        if ours && !wanted {
            if let Err(e) = host.unpublish(h.public, h.protocol) {
                tracing::error!(cloud = %h.cloud, "unpublishing {}:{}: {e}", h.public.0, h.public.1);
            }
        }
    }
    for w in &want {
        if have.contains(w) {
            continue;
        }
        if let Err(e) = host.publish(w) {
            tracing::error!(cloud = %w.cloud, "publishing {}:{}: {e}", w.public.0, w.public.1);
        }
    }
}

fn apply_services(
    host: &mut Host,
    p: &ProviderServices,
) -> Result<Vec<ServiceReport>, ConvergeError> {
    let mut outcomes = Vec::new();
    let provider = p.provider;
    let keep: HashSet<(u32, Ipv4Addr)> = p
        .services
        .iter()
        .map(|s| (s.consumer.get(), s.vip))
        .collect();
    for (_, s) in host.services().map_err(ConvergeError::ListServices)? {
        if s.provider == provider && !keep.contains(&(s.consumer.get(), s.vip)) {
            if let Err(e) = host.remove_service(s.consumer, s.vip) {
                tracing::error!(consumer = %s.consumer, vip = %s.vip, "{e}");
            }
        }
    }
    for s in &p.services {
        let consumer = s.consumer;
        let spec = ServiceSpec {
            consumer,
            vip: s.vip,
            provider,
            nat: s.nat_ipv4,
            protocol: match s.protocol {
                Protocol::Tcp => PROTOCOL_TCP,
                Protocol::Udp => PROTOCOL_UDP,
            },
            port: s.port,
            backends: s.backends.iter().map(|b| (b.ipv4, b.port)).collect(),
        };
        let result = host.apply_service(&spec);
        if let Err(e) = &result {
            tracing::error!(provider = %p.provider, "{e}");
        }
        outcomes.push(ServiceReport {
            provider: p.provider,
            consumer: s.consumer,
            vip: s.vip,
            error: result.err().map(|e| e.to_string()),
        });
    }
    Ok(outcomes)
}

/// Makes the host's overlay state for the clouds `remote` lists (all clouds if `full`) what it
/// says: each cloud's network id, the routes to its VMs on other hosts, and the peers those
/// routes lead to (see "Overlay" in docs/design.md). Written in the dataplane's order: network
/// ids and peers before the routes that need them, stale routes before the network ids and
/// peers nothing needs any more. An entry that cannot apply (a MAC that does not parse, this
/// host's own underlay address, an address a local endpoint holds) is logged and skipped.
fn apply_remotes(host: &mut Host, remote: &[CloudRemotes], full: bool) {
    if remote.is_empty() && !full {
        return;
    }
    let own = host.overlay_underlay().ok().flatten();
    let refused = |u: Ipv4Addr| Some(u) == own || u.is_unspecified() || u.is_loopback();
    let listed: HashMap<CloudId, &CloudRemotes> = remote.iter().map(|r| (r.cloud, r)).collect();
    let mut want: HashMap<(CloudId, Ipv4Addr), RemoteHop> = HashMap::new();
    for r in remote.iter().filter(|r| r.vni != 0) {
        for e in &r.endpoints {
            let Ok(mac) = e.mac.parse::<MacAddr>() else {
                tracing::warn!(cloud = %r.cloud, vm = %e.vm, "refused: MAC {:?} of a remote VM", e.mac);
                continue;
            };
            if refused(e.underlay) {
                tracing::warn!(cloud = %r.cloud, vm = %e.vm, "refused: remote VM on underlay address {}", e.underlay);
                continue;
            }
            want.insert((r.cloud, e.ipv4), RemoteHop::Guest(mac, e.underlay));
        }
        for n in &r.nats {
            if refused(n.underlay) {
                tracing::warn!(cloud = %r.cloud, host = %n.host, "refused: NAT address {} on underlay address {}", n.ipv4, n.underlay);
                continue;
            }
            want.insert((r.cloud, n.ipv4), RemoteHop::Nat(n.underlay));
        }
    }
    let have: Vec<((CloudId, Ipv4Addr), RemoteHop)> =
        match (host.remote_endpoints(), host.remote_nats()) {
            (Ok(guests), Ok(nats)) => guests
                .into_iter()
                .map(|(c, ip, mac, u)| ((c, ip), RemoteHop::Guest(mac, u)))
                .chain(
                    nats.into_iter()
                        .map(|(c, ip, u)| ((c, ip), RemoteHop::Nat(u))),
                )
                .collect(),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("listing the remote routes: {e}");
                return;
            }
        };
    let ours = |c: &CloudId| full || listed.contains_key(c);
    for r in remote.iter().filter(|r| r.vni != 0) {
        if let Err(e) = host.set_cloud_vni(r.cloud, r.vni) {
            tracing::error!(cloud = %r.cloud, "{e}");
        }
    }
    let peers: HashSet<Ipv4Addr> = want.values().map(RemoteHop::underlay).collect();
    for p in &peers {
        if let Err(e) = host.add_overlay_peer(*p) {
            tracing::error!("{e}");
        }
    }
    // Routes whose update failed keep their old next hop.
    let mut unchanged: HashSet<(CloudId, Ipv4Addr)> = HashSet::new();
    for (&(cloud, ip), &hop) in &want {
        let current = have.iter().find(|h| h.0 == (cloud, ip)).map(|h| h.1);
        if current == Some(hop) {
            continue;
        }
        // Another kind of route there (an address reused): it goes first.
        if let Some(old) = current.filter(|old| !old.same_kind(&hop)) {
            if let Err(e) = old.remove(host, cloud, ip) {
                tracing::error!(cloud = %cloud, "{e}");
                unchanged.insert((cloud, ip));
                continue;
            }
        }
        if let Err(e) = hop.set(host, cloud, ip) {
            tracing::error!(cloud = %cloud, "{e}");
            unchanged.insert((cloud, ip));
        }
    }
    // Peers still needed, derived rather than read back: those of the routes wanted (an extra
    // one for a route that failed to apply is harmless) and of every route left as it was (not
    // ours, not removed, or not updated).
    let mut used = peers;
    for &(key, hop) in &have {
        let (cloud, ip) = key;
        if ours(&cloud) && !want.contains_key(&key) {
            match hop.remove(host, cloud, ip) {
                Ok(()) => continue,
                Err(e) => tracing::error!(cloud = %cloud, "{e}"),
            }
        }
        if !want.contains_key(&key) || unchanged.contains(&key) {
            used.insert(hop.underlay());
        }
    }
    match host.cloud_vnis() {
        Ok(vnis) => {
            for (cloud, _) in vnis {
                let keep = listed.get(&cloud).map_or(!full, |r| r.vni != 0);
                if !keep {
                    if let Err(e) = host.remove_cloud_vni(cloud) {
                        tracing::error!(cloud = %cloud, "{e}");
                    }
                }
            }
        }
        Err(e) => tracing::error!("{e}"),
    }
    match host.overlay_peers() {
        Ok(all) => {
            for p in all.into_iter().filter(|p| !used.contains(p)) {
                if let Err(e) = host.remove_overlay_peer(p) {
                    tracing::error!("{e}");
                }
            }
        }
        Err(e) => tracing::error!("{e}"),
    }
}

/// A route to another host: a guest there, or a grant's NAT address for that consumer host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteHop {
    Guest(MacAddr, Ipv4Addr),
    Nat(Ipv4Addr),
}

impl RemoteHop {
    fn underlay(&self) -> Ipv4Addr {
        match self {
            RemoteHop::Guest(_, u) | RemoteHop::Nat(u) => *u,
        }
    }

    fn same_kind(&self, other: &RemoteHop) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    fn set(&self, host: &mut Host, cloud: CloudId, ip: Ipv4Addr) -> Result<(), EndpointError> {
        match *self {
            RemoteHop::Guest(mac, u) => host.set_remote_endpoint(cloud, ip, mac, u),
            RemoteHop::Nat(u) => host.set_remote_nat(cloud, ip, u),
        }
    }

    fn remove(&self, host: &mut Host, cloud: CloudId, ip: Ipv4Addr) -> Result<(), EndpointError> {
        match self {
            RemoteHop::Guest(..) => host.remove_remote_endpoint(cloud, ip),
            RemoteHop::Nat(_) => host.remove_remote_nat(cloud, ip),
        }
    }
}
