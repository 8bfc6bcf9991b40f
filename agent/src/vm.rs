//! Running the VMs placed on this host: one supervisor task per VM drives its VMM through
//! boot, ready, stop, crash and restart, and tells the converger each change as a [`VmEvent`].
//!
//! Decisions (the host/guest contract is in docs/vm.md):
//! - **A driver interface, one driver.** [`Driver`] is what the supervisor needs of a VMM:
//!   the command line for a VM and the accelerator it will use. Only QEMU's `microvm` is
//!   implemented (and tested); Firecracker or Cloud Hypervisor drivers would implement the
//!   same trait with their own command line or API socket.
//! - **Least privilege.** Each VMM runs as uid and gid `vm.uid_base + <endpoint slot>` with no
//!   supplementary groups (under KVM, `/dev/kvm`'s group only), no capabilities (a uid change
//!   from root drops them all), `no_new_privs`, its own session, a 077 umask and QEMU's
//!   seccomp sandbox. It inherits only its tap queue, its config drive and its volumes as file
//!   descriptors; its own directory `s<slot>/vmm/` is the only place it can write by path, and
//!   the agent resolves no path there ([`jail`]).
//! - **Supervised, not restarted forever.** An exit nobody asked for is reported `crashed`
//!   and restarted after a backoff (1 s, doubling to 30 s) while fewer than `vm.max_restarts`
//!   happened within `vm.restart_window_secs`; one more makes the VM `failed`, with QEMU's
//!   last error line as the message, and it stays down until it is stopped and started again.
//! - **Graceful stop, bounded.** A stop writes `atoll-poweroff` to the guest's console; the
//!   guest syncs and unmounts its volumes and resets, which ends QEMU (`-no-reboot`). After
//!   `vm.stop_timeout_secs` the VMM is killed. A delete kills at once: the VM is going away.
//! - **VMMs outlive the agent.** They run in their own session and are watched through a
//!   pidfd, so a restarted agent adopts a VMM recorded in the VM's runtime directory (pid and
//!   start time, in a record only root writes) once the live process checks out as this VM's
//!   VMM ([`jail::verify`]), instead of starting a second one on the same tap and volumes; QEMU reconnects its console to the new agent's socket by itself. Console
//!   output while no agent listens is lost.
//! - **Ready is the guest's word.** The VM is `running` when its console prints
//!   `atoll-guest: ready` (network and volumes up); `boot_ms` is measured from the VMM's
//!   start to that line.

pub mod console;
pub mod drive;
pub mod guest;
pub mod jail;
pub mod qemu;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use atoll_api::model::{VmState, VolumeFormat, CONSOLE_TAIL_BYTES};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, watch},
};

use crate::{
    config::{AccelSetting, VmConfig},
    types::MacAddr,
};
use console::Console;
use drive::GuestConfig;
use qemu::{Accel, QemuInstall};

/// A VM on this host: `(cloud id, VM name)`.
pub type VmKey = (u32, String);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("guest image {image}: {path} is missing (run `cargo xtask image`)")]
    ImageMissing { image: String, path: PathBuf },
    #[error("VMM {path} is missing (run `cargo xtask image`, or set vm.qemu_root)")]
    VmmMissing { path: PathBuf },
    #[error("preparing {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening volume {path}: {source}")]
    OpenVolume {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening tap {tap}: {source}")]
    OpenTap {
        tap: String,
        source: crate::device::DeviceError,
    },
    #[error("starting the VMM: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the VMM did not connect its console within {0:?}: {1}")]
    ConsoleTimeout(Duration, String),
    #[error("the VMM exited while starting: {0}")]
    ExitedEarly(String),
    #[error("KVM requested (vm.accel = \"kvm\") but unusable: {0}")]
    KvmUnusable(String),
    #[error("watching the VMM process: {0}")]
    Pidfd(#[source] std::io::Error),
}

/// What a VM is made of, as the converger hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub key: VmKey,
    pub fqdn: String,
    pub zone: String,
    pub ipv4: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mac: MacAddr,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The VM's endpoint device and its counter slot (which also names its uid).
    pub tap: String,
    pub slot: u32,
    /// `(volume name, file, format)`, in attach order.
    pub volumes: Vec<(String, PathBuf, VolumeFormat)>,
    pub image: String,
    pub kernel: Option<String>,
    pub user_data: Option<String>,
}

/// A change of a VM's state, from its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub key: VmKey,
    pub state: VmState,
    pub message: Option<String>,
    pub restarts: u32,
    pub boot_ms: Option<u64>,
    pub accel: Option<&'static str>,
}

/// A disk the VMM inherits as a file descriptor.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The fd number the VMM inherits it at, opened read-write unless `read_only`.
    pub fd: i32,
    /// A read-only fd of the same file for a writable disk: QEMU opens an image both ways
    /// and takes from the fd set the fd whose access mode matches.
    pub ro_fd: Option<i32>,
    pub format: VolumeFormat,
    pub serial: String,
    pub read_only: bool,
}

/// One boot of a VM, in terms any VMM understands; a [`Driver`] turns it into its command.
#[derive(Debug, Clone)]
pub struct VmPlan {
    pub name: String,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mac: String,
    /// Inherited fd of the tap queue.
    pub tap_fd: i32,
    pub disks: Vec<Disk>,
    /// The agent's listening console socket (the VMM connects to it).
    pub console_socket: PathBuf,
    /// The operator shell socket the VMM listens on (the guest's `hvc0`).
    pub shell_socket: PathBuf,
    /// The guest agent's port socket the VMM listens on (`org.atoll.guest.0`).
    pub guest_socket: PathBuf,
}

/// How to run a VMM process.
#[derive(Debug, Clone)]
pub struct VmmCommand {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

/// What the supervisor needs of a VMM.
pub trait Driver: Send + Sync + 'static {
    /// The process that runs `plan`.
    fn command(&self, plan: &VmPlan) -> VmmCommand;
    /// How guests run here (probing once if needed).
    fn accel(&self, kernel: &Path, initrd: &Path) -> Result<Accel, VmError>;
    /// Whether the VMM binary is installed.
    fn check(&self) -> Result<(), VmError>;
    /// The executable every VMM of this driver runs: a process found after an agent restart
    /// is taken for a VMM only if it executes this file.
    fn program(&self) -> PathBuf;
}

/// The QEMU `microvm` driver.
pub struct Qemu {
    install: QemuInstall,
    accel: AccelSetting,
    probe_cache: PathBuf,
    probed: Mutex<Option<Result<Accel, String>>>,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu").finish_non_exhaustive()
    }
}

impl Qemu {
    pub fn new(cfg: &VmConfig) -> Self {
        Qemu {
            install: QemuInstall {
                root: cfg.qemu_root.clone(),
            },
            accel: cfg.accel,
            probe_cache: cfg.run_dir.join("kvm-probe"),
            probed: Mutex::new(None),
        }
    }
}

impl Driver for Qemu {
    fn command(&self, plan: &VmPlan) -> VmmCommand {
        VmmCommand {
            program: self.install.binary(),
            args: self.install.args(plan),
            env: self.install.env(),
        }
    }

    fn program(&self) -> PathBuf {
        self.install.binary()
    }

    fn check(&self) -> Result<(), VmError> {
        let path = self.install.binary();
        if path.is_file() {
            Ok(())
        } else {
            Err(VmError::VmmMissing { path })
        }
    }

    fn accel(&self, kernel: &Path, initrd: &Path) -> Result<Accel, VmError> {
        match self.accel {
            AccelSetting::Tcg => return Ok(Accel::Tcg),
            AccelSetting::Kvm => {}
            _ if !Path::new("/dev/kvm").exists() => return Ok(Accel::Tcg),
            _ => {}
        }
        let mut probed = self.probed.lock().expect("probe lock");
        if probed.is_none() {
            *probed = Some(cached_probe(&self.probe_cache, || {
                qemu::probe_kvm(&self.install, kernel, initrd, Duration::from_secs(10))
            }));
            if let Some(Err(why)) = probed.as_ref() {
                tracing::warn!("VMs run under TCG: {why}");
            }
        }
        match (probed.as_ref().expect("set"), self.accel) {
            (Ok(a), _) => Ok(*a),
            (Err(why), AccelSetting::Kvm) => Err(VmError::KvmUnusable(why.clone())),
            (Err(_), _) => Ok(Accel::Tcg),
        }
    }
}

/// The KVM probe's verdict, cached per boot of the host in `path` (a probe boots a guest).
fn cached_probe(path: &Path, probe: impl FnOnce() -> Result<(), String>) -> Result<Accel, String> {
    let verdict = recorded_probe(path).unwrap_or_else(|| {
        let verdict = probe();
        record_probe(path, &verdict);
        verdict
    });
    verdict.map(|()| Accel::Kvm)
}

/// The KVM probe verdict recorded in `path` for this boot of the host (`<boot id>\nkvm` or
/// `<boot id>\ntcg <why>`), if one was: by the agent or by `atoll-agent doctor`.
pub fn recorded_probe(path: &Path) -> Option<Result<(), String>> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != boot.trim() {
        return None;
    }
    match lines.next()? {
        "kvm" => Some(Ok(())),
        other => Some(Err(other.trim_start_matches("tcg ").to_string())),
    }
}

/// Records a KVM probe verdict for this boot in `path`. Best effort: without the record the
/// next reader only probes again.
pub fn record_probe(path: &Path, verdict: &Result<(), String>) {
    let Ok(boot) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        return;
    };
    let line = match verdict {
        Ok(()) => "kvm".to_string(),
        // One line: the reason is whatever the probe said.
        Err(why) => format!("tcg {}", why.replace('\n', " ")),
    };
    if let Some(dir) = path.parent() {
        // The VMMs' runtime root when this is `<vm.run_dir>/kvm-probe`: they must traverse it.
        let _ = atoll_api::private::create_dir_all(dir, 0o711);
    }
    if let Ok(mut f) = atoll_api::private::create_file(path) {
        use std::io::Write;
        let _ = write!(f, "{}\n{line}\n", boot.trim());
    }
}

/// How a supervisor is asked to end its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopMode {
    Run,
    Graceful,
    Kill,
}

struct Handle {
    spec: VmSpec,
    stop: watch::Sender<StopMode>,
    task: tokio::task::JoinHandle<()>,
    console: Arc<Mutex<Option<Console>>>,
}

struct Ctx {
    cfg: VmConfig,
    driver: Arc<dyn Driver>,
    events: mpsc::UnboundedSender<VmEvent>,
    /// The MTU guests are given (the overlay's room; `None`: the guest's default).
    guest_mtu: Option<u32>,
    /// Compute metering: each VMM run from its start to its exit, and this boot's id.
    meters: Option<(crate::usage::Meters, String)>,
}

/// The VMs this host runs.
pub struct VmManager {
    ctx: Arc<Ctx>,
    vms: HashMap<VmKey, Handle>,
    guests: Arc<guest::Guests>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager").finish_non_exhaustive()
    }
}

impl VmManager {
    /// A manager with the QEMU driver; its events arrive on the returned receiver.
    pub fn new(cfg: VmConfig) -> (Self, mpsc::UnboundedReceiver<VmEvent>) {
        let driver: Arc<dyn Driver> = Arc::new(Qemu::new(&cfg));
        Self::with_driver(cfg, driver)
    }

    /// Gives every guest started from now on `mtu` on its interface (the overlay's underlay
    /// MTU less the encapsulation: see `config::OverlayConfig::guest_mtu`). Must be called
    /// before any VM starts.
    pub fn with_guest_mtu(mut self, mtu: u32) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.guest_mtu = Some(mtu);
        }
        self
    }

    /// Meters every VMM run into `meters` (compute usage; see [`crate::usage`]). Must be
    /// called before any VM starts.
    pub fn with_meters(mut self, meters: crate::usage::Meters, boot_id: &str) -> Self {
        if let Some(ctx) = Arc::get_mut(&mut self.ctx) {
            ctx.meters = Some((meters, boot_id.to_string()));
        }
        self
    }

    pub fn with_driver(
        cfg: VmConfig,
        driver: Arc<dyn Driver>,
    ) -> (Self, mpsc::UnboundedReceiver<VmEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            VmManager {
                ctx: Arc::new(Ctx {
                    cfg,
                    driver,
                    events: tx,
                    guest_mtu: None,
                    meters: None,
                }),
                vms: HashMap::new(),
                guests: guest::Guests::new(),
            },
            rx,
        )
    }

    /// Whether a supervisor runs for `key` (booting, running, stopping or restarting).
    pub fn is_active(&self, key: &VmKey) -> bool {
        self.vms.get(key).is_some_and(|h| !h.task.is_finished())
    }

    /// The spec the VM runs with, if active.
    pub fn running_spec(&self, key: &VmKey) -> Option<&VmSpec> {
        self.vms
            .get(key)
            .filter(|h| !h.task.is_finished())
            .map(|h| &h.spec)
    }

    /// Starts supervising `spec` (booting it, or adopting its VMM if one is alive). A VM that
    /// is already active keeps running as it is: a changed spec applies at its next start.
    pub fn start(&mut self, spec: VmSpec) {
        if self.is_active(&spec.key) {
            return;
        }
        self.guests
            .insert(spec.key.clone(), guest_socket(&self.ctx.cfg, spec.slot));
        let (stop, stop_rx) = watch::channel(StopMode::Run);
        let console = Arc::new(Mutex::new(None));
        let task = tokio::spawn(supervise(
            self.ctx.clone(),
            spec.clone(),
            stop_rx,
            console.clone(),
        ));
        self.vms.insert(
            spec.key.clone(),
            Handle {
                spec,
                stop,
                task,
                console,
            },
        );
    }

    /// Asks the VM to power off (killed after `vm.stop_timeout_secs`); its supervisor reports
    /// `stopped` when it is down. Returns at once.
    pub fn stop(&mut self, key: &VmKey) {
        if let Some(h) = self.vms.get(key) {
            h.stop.send_if_modified(|m| {
                let was = *m;
                if was == StopMode::Run {
                    *m = StopMode::Graceful;
                }
                was == StopMode::Run
            });
        }
    }

    /// Kills the VM's VMM and waits for its supervisor to end (a delete).
    pub async fn kill(&mut self, key: &VmKey) {
        self.guests.remove(key);
        if let Some(h) = self.vms.remove(key) {
            let _ = h.stop.send(StopMode::Kill);
            let _ = h.task.await;
        }
    }

    /// The guest agents' channels of this host's VMs (exec and files).
    pub fn guests(&self) -> Arc<guest::Guests> {
        self.guests.clone()
    }

    /// The active VMs with an operator shell session open (a connection to their `hvc0`
    /// socket). Empty if the sockets cannot be listed.
    pub fn shell_sessions(&self) -> HashSet<VmKey> {
        let connected = match connected_unix_paths() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("listing Unix sockets for shell sessions: {e}");
                return HashSet::new();
            }
        };
        self.vms
            .iter()
            .filter(|(_, h)| !h.task.is_finished())
            .filter(|(_, h)| connected.contains(&shell_socket(&self.ctx.cfg, h.spec.slot)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Consoles that printed something since the last call: `(key, tail)`.
    pub fn console_changes(&mut self) -> Vec<(VmKey, String)> {
        let mut out = Vec::new();
        self.vms.retain(|key, h| {
            if let Some(c) = h.console.lock().expect("console lock").as_mut() {
                if let Some(t) = c.take_changed_tail() {
                    out.push((key.clone(), t));
                }
            }
            // Ended supervisors (stopped, failed) are forgotten once their console is read.
            !h.task.is_finished()
        });
        out
    }

    /// Stops supervising every VM and leaves its VMM running, as an agent that exits does; a
    /// new manager adopts them.
    pub fn detach(self) {
        for h in self.vms.into_values() {
            h.task.abort();
        }
    }

    /// Kills every VMM (`atoll-agent cleanup`); running VMs are otherwise left running when
    /// the agent stops.
    pub async fn kill_all(&mut self) {
        let keys: Vec<VmKey> = self.vms.keys().cloned().collect();
        for k in keys {
            self.kill(&k).await;
        }
    }
}

/// Kills every VMM recorded under `cfg.run_dir` (a live process of the slot's uid running the
/// driver's program, started when recorded) and removes the runtime directories; returns how
/// many were killed (`atoll-agent cleanup`).
pub async fn kill_recorded(cfg: &VmConfig) -> usize {
    let program = Qemu::new(cfg).program();
    let mut killed = 0;
    for e in std::fs::read_dir(&cfg.run_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(slot) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix('s'))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let uid = cfg.uid_base.saturating_add(slot);
        let Ok(dir) = jail::SlotDir::open(&cfg.run_dir, slot, uid) else {
            continue;
        };
        if let Some(fd) = recorded_vmm(&dir, uid, &program, None) {
            if jail::pidfd_signal(fd.get_ref(), libc::SIGKILL).is_ok() {
                let _ = fd.readable().await;
                killed += 1;
            }
        }
        let _ = std::fs::remove_dir_all(dir.path());
    }
    killed
}

/// A pidfd of the VMM recorded in `dir`, if the live process checks out as one of this slot's
/// (and, with `name`, as this VM's); a refused record is logged.
fn recorded_vmm(
    dir: &jail::SlotDir,
    uid: u32,
    program: &Path,
    name: Option<&str>,
) -> Option<AsyncFd<OwnedFd>> {
    let (pid, start) = dir.recorded_pid()?;
    let want = jail::Expected {
        uid,
        program,
        name,
        start,
    };
    match jail::verify(pid, &want) {
        Ok(fd) => Some(fd),
        Err(why) => {
            tracing::warn!(
                pid,
                "refusing pid {pid} recorded in {}: {why}",
                dir.path().display()
            );
            None
        }
    }
}

/// The VM's runtime directory: by endpoint slot, which is unique on the host and short enough
/// for socket paths.
fn run_dir(cfg: &VmConfig, slot: u32) -> PathBuf {
    cfg.run_dir.join(format!("s{slot}"))
}

/// The operator shell socket of the VM in slot `slot` (QEMU listens on it: the guest's `hvc0`).
fn shell_socket(cfg: &VmConfig, slot: u32) -> PathBuf {
    run_dir(cfg, slot).join(jail::VMM_DIR).join("shell.sock")
}

/// The guest agent's port socket of the VM in slot `slot` (QEMU listens on it).
fn guest_socket(cfg: &VmConfig, slot: u32) -> PathBuf {
    run_dir(cfg, slot).join(jail::VMM_DIR).join("guest.sock")
}

/// Paths of the Unix sockets of this network namespace with a connection (`/proc/net/unix`,
/// state `SS_CONNECTED`): an accepted connection shows its listener's path.
fn connected_unix_paths() -> std::io::Result<HashSet<PathBuf>> {
    let text = std::fs::read_to_string("/proc/net/unix")?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[5] == "03").then(|| PathBuf::from(f[7]))
        })
        .collect())
}

fn state_dir(cfg: &VmConfig, key: &VmKey) -> PathBuf {
    cfg.state_dir.join(key.0.to_string()).join(&key.1)
}

/// The identity line a runtime directory records, so a VMM found there after a restart is
/// adopted only by the same VM.
fn identity(spec: &VmSpec) -> String {
    format!("{} {} {} {}\n", spec.key.0, spec.key.1, spec.ipv4, spec.tap)
}

/// The name a VM's VMM carries on its command line (QEMU's `-name`).
fn vmm_name(spec: &VmSpec) -> String {
    format!("atoll-{}-{}", spec.key.0, spec.key.1)
}

/// One running VMM.
struct Vmm {
    pidfd: AsyncFd<OwnedFd>,
    /// Our child (exit status available), or an adopted process.
    child: Option<std::process::Child>,
    console: Option<UnixStream>,
    listener: UnixListener,
    started: Instant,
    /// When it was started (ms since the epoch; for an adopted one, when it was adopted).
    started_unix_ms: u64,
    adopted: bool,
    /// Its runtime directory, held open.
    dir: jail::SlotDir,
}

enum Ended {
    Requested,
    Killed,
    Unexpected(String),
}

async fn supervise(
    ctx: Arc<Ctx>,
    spec: VmSpec,
    mut stop: watch::Receiver<StopMode>,
    console: Arc<Mutex<Option<Console>>>,
) {
    let key = spec.key.clone();
    let send = |state: VmState, message: Option<String>, restarts: u32, boot_ms, accel| {
        let _ = ctx.events.send(VmEvent {
            key: key.clone(),
            state,
            message,
            restarts,
            boot_ms,
            accel,
        });
    };
    let sdir = state_dir(&ctx.cfg, &key);
    match Console::open(
        &sdir.join("console.log"),
        ctx.cfg.console_max_bytes,
        CONSOLE_TAIL_BYTES,
    ) {
        Ok(c) => *console.lock().expect("console lock") = Some(c),
        Err(e) => {
            tracing::error!(cloud = %key.0, vm = %key.1, "console log of VM {}/{}: {e}", key.0, key.1)
        }
    }
    let mut crashes: Vec<Instant> = Vec::new();
    loop {
        let restarts = crashes.len() as u32;
        let accel = match launch_accel(&ctx, &spec).await {
            Ok(a) => a,
            Err(e) => return send(VmState::Failed, Some(e.to_string()), restarts, None, None),
        };
        send(VmState::Booting, None, restarts, None, Some(accel.as_str()));
        let mut vmm = match launch(&ctx, &spec, accel).await {
            Ok(v) => v,
            Err(e) => {
                return send(
                    VmState::Failed,
                    Some(e.to_string()),
                    restarts,
                    None,
                    Some(accel.as_str()),
                )
            }
        };
        if vmm.adopted {
            send(VmState::Running, None, restarts, None, Some(accel.as_str()));
        }
        let on_line = |status: GuestStatus| match status {
            GuestStatus::Ready(boot_ms) => send(
                VmState::Running,
                None,
                restarts,
                Some(boot_ms),
                Some(accel.as_str()),
            ),
            // The VMM keeps running, so its console and shell stay there to look into.
            GuestStatus::Failed(why) => send(
                VmState::Failed,
                Some(format!("guest: {why}")),
                restarts,
                None,
                Some(accel.as_str()),
            ),
        };
        let metered = meter_start(&ctx, &spec, &vmm);
        let ended = run(&ctx, &spec, &mut vmm, &mut stop, &console, on_line).await;
        if let (Some(inc), Some((meters, _))) = (&metered, &ctx.meters) {
            meters.end(inc, crate::usage::now_unix_ms());
        }
        let _ = vmm.dir.remove(jail::PID);
        match ended {
            Ended::Requested => {
                return send(VmState::Stopped, None, restarts, None, Some(accel.as_str()))
            }
            Ended::Killed => return,
            Ended::Unexpected(why) => {
                let window = Duration::from_secs(ctx.cfg.restart_window_secs);
                crashes.retain(|t| t.elapsed() < window);
                if crashes.len() as u32 >= ctx.cfg.max_restarts {
                    return send(
                        VmState::Failed,
                        Some(format!(
                            "{why}; not restarted: {} restarts within {} s",
                            crashes.len(),
                            ctx.cfg.restart_window_secs
                        )),
                        crashes.len() as u32,
                        None,
                        Some(accel.as_str()),
                    );
                }
                crashes.push(Instant::now());
                let n = crashes.len() as u32;
                send(VmState::Crashed, Some(why), n, None, Some(accel.as_str()));
                let backoff =
                    Duration::from_millis(1000u64 << (n - 1).min(5)).min(Duration::from_secs(30));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    r = stop.wait_for(|m| *m != StopMode::Run) => {
                        if matches!(r.map(|m| *m), Ok(StopMode::Graceful)) {
                            send(VmState::Stopped, None, n, None, Some(accel.as_str()));
                        }
                        return;
                    }
                }
            }
        }
    }
}

async fn launch_accel(ctx: &Arc<Ctx>, spec: &VmSpec) -> Result<Accel, VmError> {
    ctx.driver.check()?;
    let (kernel, initrd) = image_files(&ctx.cfg, spec)?;
    let driver = ctx.driver.clone();
    tokio::task::spawn_blocking(move || driver.accel(&kernel, &initrd))
        .await
        .unwrap_or(Ok(Accel::Tcg))
}

fn image_files(cfg: &VmConfig, spec: &VmSpec) -> Result<(PathBuf, PathBuf), VmError> {
    let dir = cfg.images_dir.join(&spec.image);
    let kernel = dir.join(spec.kernel.as_deref().unwrap_or("vmlinux"));
    let initrd = dir.join("initramfs.cpio.gz");
    for p in [&kernel, &initrd] {
        if !p.is_file() {
            return Err(VmError::ImageMissing {
                image: spec.image.clone(),
                path: p.clone(),
            });
        }
    }
    Ok((kernel, initrd))
}

fn prepare<T>(path: &Path, r: std::io::Result<T>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Prepare {
        path: path.to_path_buf(),
        source,
    })
}

/// Begins metering a started (or adopted) VMM: from its start to its exit, by its process.
fn meter_start(ctx: &Ctx, spec: &VmSpec, vmm: &Vmm) -> Option<String> {
    let (meters, boot_id) = ctx.meters.as_ref()?;
    let (pid, ticks) = vmm.dir.recorded_pid()?;
    let inc = crate::usage::vmm_incarnation(boot_id, pid, ticks);
    // An adopted VMM started before this agent: its start is its process's (used only if the
    // journal has no record of it yet).
    let since_ms = if vmm.adopted {
        jail::start_unix_ms(ticks).unwrap_or(vmm.started_unix_ms)
    } else {
        vmm.started_unix_ms
    };
    meters.start(
        &inc,
        crate::usage::Meter {
            cloud: spec.key.0,
            resource: crate::usage::Resource::Vm {
                name: spec.key.1.clone(),
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            },
            since_ms,
            until_ms: None,
        },
    );
    Some(inc)
}

/// Starts (or adopts) the VMM of `spec` and waits for its console to connect.
async fn launch(ctx: &Arc<Ctx>, spec: &VmSpec, accel: Accel) -> Result<Vmm, VmError> {
    let cfg = &ctx.cfg;
    let uid = cfg.uid_base + spec.slot;
    let dir_path = run_dir(cfg, spec.slot);
    let dir = prepare(&dir_path, jail::SlotDir::open(&cfg.run_dir, spec.slot, uid))?;
    if dir.migrated {
        tracing::info!(
            cloud = %spec.key.0,
            vm = %spec.key.1,
            "VM {}/{}: took {} over from its VMM's uid (older layout); its records are checked against the live process",
            spec.key.0,
            spec.key.1,
            dir_path.display()
        );
    }
    let console_path = dir_path.join(jail::CONSOLE_SOCKET);
    let listener = prepare(&console_path, dir.bind_console(uid))?;
    let program = ctx.driver.program();
    let name = vmm_name(spec);
    if dir.read(jail::IDENTITY).as_deref() == Some(identity(spec).as_str()) {
        if let Some(pidfd) = recorded_vmm(&dir, uid, &program, Some(&name)) {
            return Ok(Vmm {
                pidfd,
                child: None,
                console: None,
                listener,
                started: Instant::now(),
                started_unix_ms: crate::usage::now_unix_ms(),
                adopted: true,
                dir,
            });
        }
    } else if let Some(fd) = recorded_vmm(&dir, uid, &program, None) {
        // A VMM left from another VM in this slot (its delete did not finish) must go first.
        let _ = jail::pidfd_signal(fd.get_ref(), libc::SIGKILL);
        let _ = fd.readable().await;
    }
    prepare(&dir_path, dir.remove(jail::PID))?;
    prepare(
        &dir_path,
        dir.write(jail::IDENTITY, identity(spec).as_bytes()),
    )?;
    let vmm_dir = prepare(&dir_path, dir.reset_vmm_dir(uid))?;

    let (kernel, initrd) = image_files(cfg, spec)?;
    let guest = GuestConfig {
        hostname: spec.key.1.clone(),
        fqdn: spec.fqdn.clone(),
        ipv4: spec.ipv4,
        gateway: spec.gateway,
        nameserver: spec.gateway,
        search: spec.zone.clone(),
        volumes: spec
            .volumes
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| (format!("atoll-v{i}"), name.clone()))
            .collect(),
        user_data: spec.user_data.clone(),
        mtu: ctx.guest_mtu,
    };
    let drive_path = dir_path.join(jail::CONFIG_DRIVE);
    prepare(&drive_path, dir.write(jail::CONFIG_DRIVE, &guest.archive()))?;
    let drive = prepare(&drive_path, dir.open_read(jail::CONFIG_DRIVE))?;
    let mut files: Vec<OwnedFd> = vec![drive.into()];
    for (_, path, _) in &spec.volumes {
        for write in [true, false] {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map_err(|source| VmError::OpenVolume {
                    path: path.clone(),
                    source,
                })?;
            files.push(f.into());
        }
    }
    let tap =
        crate::device::open_tap_queue(&spec.tap, false).map_err(|source| VmError::OpenTap {
            tap: spec.tap.clone(),
            source,
        })?;
    files.push(tap);
    // Inherited at 3, 4, ...: the config drive, each volume read-write and read-only, then
    // the tap.
    let fd_at = |i: usize| 3 + i as i32;
    let mut disks = vec![Disk {
        fd: fd_at(0),
        ro_fd: None,
        format: VolumeFormat::Raw,
        serial: "atoll-config".into(),
        read_only: true,
    }];
    for (i, (_, _, format)) in spec.volumes.iter().enumerate() {
        disks.push(Disk {
            fd: fd_at(1 + 2 * i),
            ro_fd: Some(fd_at(2 + 2 * i)),
            format: *format,
            serial: format!("atoll-v{i}"),
            read_only: false,
        });
    }
    let vm = VmPlan {
        name,
        accel,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel,
        initrd,
        mac: spec.mac.to_string(),
        tap_fd: fd_at(files.len() - 1),
        disks,
        console_socket: console_path.clone(),
        shell_socket: shell_socket(cfg, spec.slot),
        guest_socket: guest_socket(cfg, spec.slot),
    };
    let sdir = state_dir(cfg, &spec.key);
    prepare(&sdir, atoll_api::private::create_dir_all(&sdir, 0o700))?;
    let log_path = sdir.join("vmm.log");
    let log = prepare(&log_path, atoll_api::private::create_file(&log_path))?;
    let mut groups = Vec::new();
    if accel == Accel::Kvm {
        if let Ok(m) = std::fs::metadata("/dev/kvm") {
            use std::os::unix::fs::MetadataExt;
            groups.push(m.gid());
        }
    }
    let cmd = ctx.driver.command(&vm);
    let started_unix_ms = crate::usage::now_unix_ms();
    let child =
        spawn_unprivileged(&cmd, &files, uid, &groups, &vmm_dir, log).map_err(VmError::Spawn)?;
    drop(files);
    let pid = child.id() as i32;
    let pidfd = jail::pidfd_open(pid).map_err(VmError::Pidfd)?;
    let start_time = jail::proc_start_time(pid).unwrap_or(0);
    prepare(
        &dir_path.join(jail::PID),
        dir.write(jail::PID, format!("{pid} {start_time}\n").as_bytes()),
    )?;
    let mut vmm = Vmm {
        pidfd,
        child: Some(child),
        console: None,
        listener,
        started: Instant::now(),
        started_unix_ms,
        adopted: false,
        dir,
    };
    // QEMU connects its console before the guest runs.
    let timeout = Duration::from_secs(10);
    tokio::select! {
        r = tokio::time::timeout(timeout, vmm.listener.accept()) => match r {
            Ok(Ok((s, _))) => vmm.console = Some(s),
            Ok(Err(e)) => return Err(VmError::Prepare { path: console_path, source: e }),
            Err(_) => {
                kill_vmm(&mut vmm).await;
                return Err(VmError::ConsoleTimeout(timeout, last_line(&log_path)));
            }
        },
        _ = vmm.pidfd.readable() => {
            reap(&mut vmm);
            return Err(VmError::ExitedEarly(last_line(&log_path)));
        }
    }
    Ok(vmm)
}

/// Drives a started VMM until it ends: console to the log and the tail, the ready line,
/// reconnects of an adopted VMM's console, and stop requests.
async fn run(
    ctx: &Arc<Ctx>,
    spec: &VmSpec,
    vmm: &mut Vmm,
    stop: &mut watch::Receiver<StopMode>,
    console: &Arc<Mutex<Option<Console>>>,
    on_line: impl Fn(GuestStatus),
) -> Ended {
    let mut buf = vec![0u8; 16 * 1024];
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut requested = None;
    let log_path = state_dir(&ctx.cfg, &spec.key).join("vmm.log");
    loop {
        let mode = *stop.borrow_and_update();
        if mode != StopMode::Run && requested.is_none() {
            requested = Some(mode);
            match mode {
                StopMode::Kill => {
                    kill_vmm(vmm).await;
                    return Ended::Killed;
                }
                _ => {
                    if let Some(c) = vmm.console.as_mut() {
                        let _ = c.write_all(b"\natoll-poweroff\n").await;
                    }
                    deadline = Some(
                        tokio::time::Instant::now()
                            + Duration::from_secs(ctx.cfg.stop_timeout_secs),
                    );
                }
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        tokio::select! {
            _ = vmm.pidfd.readable() => {
                let status = reap(vmm);
                // Drain what the guest printed last.
                let started = vmm.started;
                if let Some(c) = vmm.console.as_mut() {
                    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await {
                        if n == 0 { break; }
                        feed(console, &buf[..n], started, &on_line);
                    }
                }
                return match requested {
                    Some(_) => Ended::Requested,
                    None => Ended::Unexpected(match status {
                        Some(s) => format!("the VMM exited ({s}): {}", last_line(&log_path)),
                        None => "the VMM exited".into(),
                    }),
                };
            }
            r = read_console(vmm.console.as_mut(), &mut buf) => match r {
                Ok(0) | Err(_) => vmm.console = None,
                Ok(n) => feed(console, &buf[..n], vmm.started, &on_line),
            },
            a = vmm.listener.accept(), if vmm.console.is_none() => {
                if let Ok((s, _)) = a {
                    vmm.console = Some(s);
                    if requested == Some(StopMode::Graceful) {
                        if let Some(c) = vmm.console.as_mut() {
                            let _ = c.write_all(b"\natoll-poweroff\n").await;
                        }
                    }
                }
            }
            _ = stop.changed(), if requested.is_none() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                kill_vmm(vmm).await;
                return Ended::Requested;
            }
        }
    }
}

async fn read_console(c: Option<&mut UnixStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match c {
        Some(c) => c.read(buf).await,
        None => std::future::pending().await,
    }
}

/// A status line of the guest's init.
enum GuestStatus {
    /// Network and volumes up, this many milliseconds after the VMM started.
    Ready(u64),
    Failed(String),
}

fn feed(
    console: &Arc<Mutex<Option<Console>>>,
    bytes: &[u8],
    started: Instant,
    on_line: &impl Fn(GuestStatus),
) {
    let lines = match console.lock().expect("console lock").as_mut() {
        Some(c) => c.push(bytes),
        None => Vec::new(),
    };
    for l in lines {
        if l == console::READY_LINE {
            on_line(GuestStatus::Ready(started.elapsed().as_millis() as u64));
        } else if let Some(why) = l.strip_prefix(console::FAILED_PREFIX) {
            on_line(GuestStatus::Failed(
                String::from_utf8_lossy(why).into_owned(),
            ));
        }
    }
}

async fn kill_vmm(vmm: &mut Vmm) {
    let _ = jail::pidfd_signal(vmm.pidfd.get_ref(), libc::SIGKILL);
    let _ = vmm.pidfd.readable().await;
    reap(vmm);
}

/// Collects our child's exit status (an adopted process is reaped by its own parent).
fn reap(vmm: &mut Vmm) -> Option<std::process::ExitStatus> {
    vmm.child.as_mut().and_then(|c| c.wait().ok())
}

fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .chars()
        .take(300)
        .collect()
}

/// Spawns `program` as `uid`/`uid` with `groups` only, no capabilities and `no_new_privs`, in
/// its own session, inheriting `files` at fds 3, 4, … and nothing else (every other fd of the
/// agent is close-on-exec).
fn spawn_unprivileged(
    vmm: &VmmCommand,
    files: &[OwnedFd],
    uid: u32,
    groups: &[u32],
    cwd: &Path,
    stderr: std::fs::File,
) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // Move the sources above every target first, so no dup2 below clobbers a source.
    let base = 3 + files.len() as i32 + 64;
    let mut high = Vec::with_capacity(files.len());
    for f in files {
        // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd (closed on exec) or -1.
        let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, base) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by nothing else.
        high.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let srcs: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = std::process::Command::new(&vmm.program);
    cmd.env_clear()
        .envs(vmm.env.iter().map(|(k, v)| (k, v)))
        .args(&vmm.args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on memory prepared before the fork (`srcs`, `groups`);
    // it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            for (i, &src) in srcs.iter().enumerate() {
                // dup2 clears close-on-exec on the target.
                check(libc::dup2(src, 3 + i as i32))?;
            }
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(uid, uid, uid))?;
            check(libc::setresuid(uid, uid, uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            libc::umask(0o077);
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(high);
    child
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::unique_name;

    #[test]
    fn probe_verdicts_are_recorded_per_boot() {
        let dir = std::env::temp_dir().join(unique_name("dq"));
        let path = dir.join("run").join("kvm-probe");
        assert_eq!(recorded_probe(&path), None);
        record_probe(&path, &Err("KVM internal error\nat rip 0".into()));
        assert_eq!(
            recorded_probe(&path),
            Some(Err("KVM internal error at rip 0".into()))
        );
        // A recorded verdict is used instead of probing.
        assert_eq!(
            cached_probe(&path, || panic!("must not probe")),
            Err("KVM internal error at rip 0".into())
        );
        record_probe(&path, &Ok(()));
        assert_eq!(recorded_probe(&path), Some(Ok(())));
        // Another boot's verdict is not used: the probe runs and its verdict is recorded.
        std::fs::write(&path, "another-boot\nkvm\n").unwrap();
        assert_eq!(recorded_probe(&path), None);
        assert_eq!(cached_probe(&path, || Err("no".into())), Err("no".into()));
        assert_eq!(recorded_probe(&path), Some(Err("no".into())));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
