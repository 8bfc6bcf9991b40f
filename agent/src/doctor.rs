//! `atoll-agent doctor`: checks a host for everything atoll needs, one line per check, each
//! failure with a concrete fix.
//!
//! Decisions:
//! - **Tried, not inferred.** Where a feature can be tried cheaply it is: atoll's own programs
//!   are loaded (the verifier of this kernel accepts them), `from_vm` is attached with TCX to
//!   a throwaway tap and detached, an empty XDP program likewise, `/dev/net/tun` is opened, a
//!   network namespace is created and removed, and QEMU is run with `--version`. Everything
//!   made is named `atldr<pid>…` and removed before the check returns; nothing is pinned.
//! - **Required vs advisory.** A failed check that stops the agent or its VMs from working
//!   is `FAIL` and makes the exit status 1; what only degrades (no kernel BTF, no XDP, KVM
//!   unusable so VMs use TCG, a map filling up, pins waiting for an upgrade) is `warn`. VMM
//!   and image checks are required only with `vm.driver = "qemu"`.
//! - **KVM**: the per-boot probe verdict (`<vm.run_dir>/kvm-probe`) is reported when present;
//!   otherwise, with QEMU and the image installed, the probe boot runs here (a few seconds) and
//!   its verdict is recorded there for the agent; without them only whether `/dev/kvm` opens
//!   is reported.
//! - **Control link** (`control.mode = "remote"`): the token file must exist and hold this
//!   host's token, and a real sync with it must succeed (a sync is also the host's heartbeat,
//!   the one write the doctor causes). The operator token, or a file others can read, warns.
//! - **Read-only on the dataplane.** Capacity and pin checks open pinned maps by path and never
//!   create, migrate or upgrade anything.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode};

use crate::{
    config::{AccelSetting, AgentConfig, ControlMode, VmDriver},
    dataplane::{self, DataplaneError},
    device::Devices,
    scratch::unique_name,
    vm::qemu::{self, QemuInstall},
};
use atoll_api::client::ClientError;
use atoll_dataplane_common::LAYOUT_VERSION;
use hyper::StatusCode;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, degraded or soon to need attention; does not fail the doctor.
    Warn,
    /// A required check failed.
    Fail,
    /// Not applicable with this configuration.
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One check's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do about a `Fail` or `Warn`.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            status: Status::Skip,
            ..Check::ok(name, detail)
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            status: Status::Warn,
            ..Check::fail(name, detail, fix)
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<5} {:<10} {}",
            self.status.label(),
            self.name,
            self.detail
        )?;
        if let Some(fix) = &self.fix {
            write!(f, "; fix: {fix}")?;
        }
        Ok(())
    }
}

/// Every check's outcome, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every required check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(f, "{c}")?;
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        if failed == 0 {
            writeln!(f, "all required checks passed")
        } else {
            writeln!(f, "{failed} required checks failed")
        }
    }
}

/// Runs every check with the paths of `cfg`. Must be called inside a tokio runtime.
pub async fn run(cfg: &AgentConfig) -> Report {
    let mut checks = vec![
        kernel(),
        btf(),
        privileges(),
        bpffs(),
        bpffs_root(&cfg.dataplane.bpffs_root),
        pins(&cfg.dataplane.bpffs_root),
    ];
    checks.extend(programs_and_hooks().await);
    checks.push(tun());
    checks.push(netns());
    checks.push(kvm(cfg).await);
    checks.push(vmm(cfg));
    checks.push(image(cfg));
    checks.extend(capacity(&cfg.dataplane));
    checks.push(control(cfg).await);
    checks.push(egress(&cfg.egress));
    checks.push(overlay(&cfg.overlay, &cfg.egress));
    Report { checks }
}

/// The uplink and the NAT port range (issue 17). Warnings only: no guest reaches the internet
/// yet, so nothing here is required.
pub fn egress(cfg: &crate::config::EgressConfig) -> Check {
    use crate::egress;
    const NAME: &str = "egress";
    let uplink = match egress::uplink(cfg) {
        Ok(u) => u,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("no uplink: {e}"),
                "set egress.uplink to the device towards the internet",
            )
        }
    };
    let addrs: Vec<String> = uplink
        .addresses
        .iter()
        .map(|(a, p)| format!("{a}/{p}"))
        .collect();
    let ports = cfg.nat_ports;
    match egress::ephemeral_ports() {
        Ok((first, last)) if ports.overlaps(first, last) => Check::warn(
            NAME,
            format!(
                "uplink {} ({}); NAT ports {ports} overlap the ephemeral ports {first}-{last}",
                uplink.name,
                addrs.join(", ")
            ),
            "set egress.nat_ports outside net.ipv4.ip_local_port_range",
        ),
        Ok((first, last)) => Check::ok(
            NAME,
            format!(
                "uplink {} ({}); NAT ports {ports} clear of the ephemeral ports {first}-{last}",
                uplink.name,
                addrs.join(", ")
            ),
        ),
        Err(e) => Check::warn(
            NAME,
            e.to_string(),
            "run the agent on Linux with /proc mounted",
        ),
    }
}

/// The overlay (issue 18): this host's underlay address, and whether the underlay is
/// encrypted (the address sits on a WireGuard device). Warnings only: atoll assumes a
/// trusted underlay.
pub fn overlay(
    cfg: &crate::config::OverlayConfig,
    egress_cfg: &crate::config::EgressConfig,
) -> Check {
    const NAME: &str = "overlay";
    if !cfg.enabled {
        return Check::skip(NAME, "overlay.enabled = false");
    }
    let underlay = match crate::overlay::underlay(cfg, egress_cfg) {
        Ok(a) => a,
        Err(e) => {
            return Check::warn(
                NAME,
                e.to_string(),
                "set overlay.underlay to this host's address on the underlay",
            )
        }
    };
    let device = crate::egress::host_addresses()
        .ok()
        .and_then(|list| list.into_iter().find(|a| a.ipv4 == underlay))
        .map(|a| a.device);
    let Some(device) = device else {
        return Check::warn(
            NAME,
            format!("the underlay address {underlay} is on no device of this host"),
            "set overlay.underlay to an address of this host",
        );
    };
    if is_wireguard(&device) {
        Check::ok(
            NAME,
            format!("underlay {underlay} on {device} (WireGuard): encrypted"),
        )
    } else {
        Check::warn(
            NAME,
            format!(
                "underlay {underlay} on {device}: not encrypted (atoll assumes a trusted underlay)"
            ),
            "run the underlay over WireGuard where the kernel has it (docs/operations.md, Overlay)",
        )
    }
}

/// Whether `device` is a WireGuard device (its `DEVTYPE` in sysfs).
fn is_wireguard(device: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{device}/uevent"))
        .is_ok_and(|u| u.lines().any(|l| l == "DEVTYPE=wireguard"))
}

/// The control plane link: for `remote`, the token file (present, private, a token for this
/// host) and a real sync with it.
pub async fn control(cfg: &AgentConfig) -> Check {
    const NAME: &str = "control";
    let c = &cfg.control;
    match c.mode {
        ControlMode::Remote => {}
        ControlMode::Off => return Check::skip(NAME, "control.mode = \"off\""),
        #[cfg(feature = "embedded")]
        ControlMode::Embedded => {
            return Check::ok(
                NAME,
                format!("embedded control plane (API at {})", c.embedded.listen),
            )
        }
        #[cfg(not(feature = "embedded"))]
        ControlMode::Embedded => {
            return Check::fail(
                NAME,
                "control.mode = \"embedded\", but this agent was built without it",
                "set control.mode = \"remote\", or build the agent with the `embedded` feature",
            )
        }
    }
    let host = c.host_name();
    let path = &c.token_file;
    let issue = format!(
        "on the control plane: atoll host token {host} | jq -r .token > {} (mode 0600)",
        path.display()
    );
    let token = match std::fs::read_to_string(path) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            return Check::fail(
                NAME,
                format!("control.token_file {}: {e}", path.display()),
                issue,
            )
        }
    };
    if let Some(rest) = token.strip_prefix("atl_host_") {
        let owner = rest.split_once('_').map_or("", |(n, _)| n);
        if owner != host {
            return Check::fail(
                NAME,
                format!(
                    "{} holds the token of host {owner:?}, not of {host:?}",
                    path.display()
                ),
                issue,
            );
        }
    }
    let clients = match c.clients(&token) {
        Ok(cl) => cl,
        Err(e) => return Check::fail(
            NAME,
            e.to_string(),
            "set control.url to https://host:port and control.ca_file or control.ca_fingerprint",
        ),
    };
    let sync = atoll_api::Command::Sync {
        host: host.clone(),
        after: 0,
        wait_ms: 0,
    };
    // Every control plane listed: the token must hold on each; one not answering is a
    // warning while another does (the agent uses the others).
    let mut unreachable = Vec::new();
    for client in clients {
        let client = client.with_timeout(Duration::from_secs(5));
        match client.execute(&sync).await {
            Ok(_) => {}
            Err(ClientError::Api { status, body }) if !status.is_server_error() => {
                return Check::fail(
                    NAME,
                    format!(
                        "{} refused this host's token: {status} {}",
                        client.base(),
                        body.error.message
                    ),
                    if status == StatusCode::UNAUTHORIZED {
                        format!("the token was replaced or never issued; {issue}")
                    } else {
                        issue
                    },
                );
            }
            Err(e) => unreachable.push(format!("cannot sync with {}: {e}", client.base())),
        }
    }
    if unreachable.len() == c.url.0.len() {
        return Check::fail(
            NAME,
            unreachable.join("; "),
            "check control.url and that atoll-control runs and is reachable from here",
        );
    }
    if !unreachable.is_empty() {
        return Check::warn(
            NAME,
            format!("{} (the agent uses the others)", unreachable.join("; ")),
            "check that every control plane in control.url runs and is reachable from here",
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777);
    if mode & 0o077 != 0 {
        return Check::warn(
            NAME,
            format!("{} is readable by others (mode {mode:o})", path.display()),
            format!("chmod 600 {}", path.display()),
        );
    }
    if token.starts_with("atl_op_") {
        return Check::warn(
            NAME,
            format!(
                "{} holds the operator token: this host can act on every cloud",
                path.display()
            ),
            format!("give it its own token: {issue}"),
        );
    }
    Check::ok(
        NAME,
        format!("host {host} syncs with {} using its own token", c.url),
    )
}

fn kernel() -> Check {
    const NAME: &str = "kernel";
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(6, 6, 0) => {
            Check::ok(NAME, format!("Linux {release} (TCX needs >= 6.6)"))
        }
        Ok(_) => Check::fail(
            NAME,
            format!("Linux {release} is older than 6.6, which TCX (bpf_link on tc) needs"),
            "boot a kernel >= 6.6 (Debian 12: the bookworm-backports kernel)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot read the kernel version: {e}"),
            "run on Linux >= 6.6",
        ),
    }
}

fn btf() -> Check {
    const NAME: &str = "btf";
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        Check::ok(NAME, format!("{} present", path.display()))
    } else {
        Check::fail(
            NAME,
            format!(
                "{} missing: kfree_skb (which counts the frames the kernel frees before TC) \
                 attaches to a BTF tracepoint and reads kernel structures by their BTF offsets",
                path.display()
            ),
            "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

/// Effective capabilities atoll needs: CAP_NET_ADMIN (12), CAP_SYS_ADMIN (21, namespaces and
/// mounts), CAP_BPF (39).
fn privileges() -> Check {
    const NAME: &str = "privileges";
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
    ]
    .iter()
    .filter(|(bit, _)| eff & (1 << bit) == 0)
    .map(|(_, name)| *name)
    .collect();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if missing.is_empty() {
        Check::ok(
            NAME,
            format!("uid {uid} with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"),
        )
    } else {
        Check::fail(
            NAME,
            format!("uid {uid} lacks {}", missing.join(", ")),
            "run atoll-agent as root (sudo, or a systemd unit without User=)",
        )
    }
}

fn bpffs() -> Check {
    const NAME: &str = "bpffs";
    match dataplane::check_bpffs(Path::new("/sys/fs/bpf")) {
        Ok(()) => Check::ok(NAME, "/sys/fs/bpf is a bpffs"),
        Err(_) => Check::fail(
            NAME,
            "no bpffs mounted at /sys/fs/bpf",
            "mount -t bpf bpf /sys/fs/bpf (and in /etc/fstab: \
             bpf /sys/fs/bpf bpf defaults 0 0)",
        ),
    }
}

fn bpffs_root(root: &Path) -> Check {
    const NAME: &str = "bpffs_root";
    match dataplane::check_bpffs(root) {
        Ok(()) => Check::ok(
            NAME,
            format!("dataplane.bpffs_root {} is on a bpffs", root.display()),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("dataplane.bpffs_root {}: {e}", root.display()),
            "set dataplane.bpffs_root to a directory under /sys/fs/bpf, e.g. /sys/fs/bpf/atoll",
        ),
    }
}

/// The pinned layout and build, if any.
fn pins(root: &Path) -> Check {
    const NAME: &str = "pins";
    let versions = match dataplane::layout_versions(root) {
        Ok(v) => v,
        Err(e) => return Check::fail(NAME, e.to_string(), "check the permissions of bpffs_root"),
    };
    if let Some(v) = versions.iter().find(|v| **v > LAYOUT_VERSION) {
        return Check::fail(
            NAME,
            format!("pins of layout v{v} are newer than this agent (v{LAYOUT_VERSION})"),
            "install the newer agent again (downgrades across a layout change are not supported)",
        );
    }
    if let Some(v) = versions.iter().find(|v| **v < LAYOUT_VERSION) {
        return Check::warn(
            NAME,
            format!("pins of layout v{v} under {}", root.display()),
            "`atoll-agent migrate` (or `atoll-agent run`) migrates them hitlessly",
        );
    }
    if versions.is_empty() {
        return Check::ok(NAME, format!("nothing pinned under {} yet", root.display()));
    }
    let dir = dataplane::layout_dir(root);
    let builds = dataplane::pinned_builds(&dir).unwrap_or_default();
    let this = dataplane::build_id();
    if builds == [this.clone()] {
        Check::ok(
            NAME,
            format!("layout v{LAYOUT_VERSION}, programs of this build ({this})"),
        )
    } else {
        Check::warn(
            NAME,
            format!(
                "layout v{LAYOUT_VERSION}, programs of build {} (this build is {this})",
                if builds.is_empty() {
                    "(unrecorded)".into()
                } else {
                    builds.join("+")
                }
            ),
            "`atoll-agent run` (or `atoll-agent migrate`) upgrades them in place without \
             dropping packets",
        )
    }
}

/// Loads atoll's programs, then attaches `from_vm` with TCX and an empty program with XDP to a
/// throwaway tap.
async fn programs_and_hooks() -> Vec<Check> {
    let mut ebpf = match dataplane::load_unpinned(16) {
        Ok(e) => e,
        Err(e) => {
            let fix = match &e {
                DataplaneError::MissingCapability { .. } => "run as root",
                _ => {
                    "use a kernel >= 6.6 with CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF and \
                     CONFIG_BPF_JIT"
                }
            };
            return vec![
                Check::fail("programs", e.to_string(), fix),
                Check::skip("tcx", "not tried: the programs did not load"),
                Check::skip("xdp", "not tried: the programs did not load"),
            ];
        }
    };
    let mut out = vec![Check::ok(
        "programs",
        "from_vm, to_vm, from_dns and kfree_skb pass this kernel's verifier",
    )];
    let devices = match Devices::new() {
        Ok(d) => d,
        Err(e) => {
            out.push(Check::fail("tcx", format!("netlink: {e}"), "run as root"));
            return out;
        }
    };
    let name = unique_name("dr");
    let ifindex = match devices.create_tap(&name, None) {
        Ok(i) => i,
        Err(e) => {
            out.push(Check::fail(
                "tcx",
                format!("creating a throwaway tap: {e}"),
                "modprobe tun; run as root",
            ));
            out.push(Check::skip("xdp", "not tried: no test device"));
            return out;
        }
    };
    out.push(tcx(&mut ebpf, &name));
    out.push(xdp(&name));
    drop(ebpf);
    if let Err(e) = devices.delete(&name, ifindex).await {
        out.push(Check::fail(
            "cleanup",
            format!("deleting the throwaway tap {name}: {e}"),
            format!("ip link del {name}"),
        ));
    }
    out
}

fn tcx(ebpf: &mut aya::Ebpf, device: &str) -> Check {
    const NAME: &str = "tcx";
    let prog: Result<&mut SchedClassifier, String> = ebpf
        .program_mut(dataplane::PROG_FROM_VM)
        .ok_or_else(|| "from_vm missing from the object".to_string())
        .and_then(|p| {
            p.try_into()
                .map_err(|e: aya::programs::ProgramError| e.to_string())
        });
    let attached = prog.and_then(|p| {
        let id = p
            .attach_with_options(
                device,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|e| e.to_string())?;
        p.detach(id).map_err(|e| e.to_string())
    });
    match attached {
        Ok(()) => Check::ok(
            NAME,
            format!("from_vm attached with TCX to {device} and detached"),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("attaching from_vm with TCX to a test tap: {e}"),
            "use a kernel >= 6.6 (TCX) and run as root",
        ),
    }
}

/// XDP is not on atoll's path today (see docs/design.md, "TCX on endpoints, not XDP"), so a
/// failure is advisory.
fn xdp(device: &str) -> Check {
    const NAME: &str = "xdp";
    if dataplane::BASELINE_OBJECT.is_empty() {
        return Check::skip(NAME, "this build has no baseline XDP program to try");
    }
    let tried = (|| -> Result<(), String> {
        let mut ebpf = aya::Ebpf::load(dataplane::BASELINE_OBJECT).map_err(|e| e.to_string())?;
        let prog: &mut Xdp = ebpf
            .program_mut("empty_xdp")
            .ok_or("empty_xdp missing")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| e.to_string())?;
        let id = prog
            .attach(device, XdpMode::default())
            .map_err(|e| e.to_string())?;
        prog.detach(id).map_err(|e| e.to_string())
    })();
    match tried {
        Ok(()) => Check::ok(
            NAME,
            format!("an empty XDP program attached to {device} and detached"),
        ),
        Err(e) => Check::warn(
            NAME,
            format!("XDP attach failed ({e}); atoll does not use XDP today"),
            "none needed",
        ),
    }
}

fn tun() -> Check {
    const NAME: &str = "tun";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => Check::ok(NAME, "/dev/net/tun opens"),
        Err(e) => Check::fail(
            NAME,
            format!("/dev/net/tun: {e}"),
            "modprobe tun (and in a container: pass --device /dev/net/tun)",
        ),
    }
}

fn netns() -> Check {
    const NAME: &str = "netns";
    let name = unique_name("dr");
    let made = crate::dns::netns::ensure(&name);
    let removed = crate::dns::netns::remove(&name);
    match (made, removed) {
        (Ok(_), Ok(())) => Check::ok(NAME, "a network namespace was created and removed"),
        (Err(e), _) | (Ok(_), Err(e)) => Check::fail(
            NAME,
            format!("network namespace {name}: {e}"),
            "run as root with CAP_SYS_ADMIN on a kernel with CONFIG_NET_NS; /run must be writable",
        ),
    }
}

fn install(cfg: &AgentConfig) -> QemuInstall {
    QemuInstall {
        root: cfg.vm.qemu_root.clone(),
    }
}

fn image_files(cfg: &AgentConfig) -> (PathBuf, PathBuf) {
    let dir = cfg.vm.images_dir.join(&cfg.vm.default_image);
    (dir.join("vmlinux"), dir.join("initramfs.cpio.gz"))
}

async fn kvm(cfg: &AgentConfig) -> Check {
    const NAME: &str = "kvm";
    let strict = cfg.vm.accel == AccelSetting::Kvm;
    // `why` is shown after the consequence, so the line reads the same for every cause.
    let unusable = |lead: &str, why: Option<String>| {
        let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
        if strict {
            Check::fail(
                NAME,
                format!("{lead}: vm.accel = \"kvm\" makes every VM fail{why}"),
                "set vm.accel = \"auto\" (TCG fallback) or fix KVM",
            )
        } else {
            Check::warn(
                NAME,
                format!("{lead}: VMs will use TCG{why}"),
                "enable hardware virtualization (or nested KVM) for faster VMs",
            )
        }
    };
    const CANNOT_RUN: &str = "KVM present but cannot run guests";
    if cfg.vm.driver == VmDriver::None || cfg.vm.accel == AccelSetting::Tcg {
        return Check::skip(
            NAME,
            format!(
                "vm.driver = \"{}\", vm.accel = \"{}\"",
                cfg.vm.driver, cfg.vm.accel
            ),
        );
    }
    if !Path::new("/dev/kvm").exists() {
        return unusable("no /dev/kvm", None);
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return unusable(
            "KVM present but /dev/kvm does not open",
            Some(e.to_string()),
        );
    }
    let cache = cfg.vm.run_dir.join("kvm-probe");
    if let Some(verdict) = crate::vm::recorded_probe(&cache) {
        return match verdict {
            Ok(()) => Check::ok(NAME, "KVM runs guests (probe recorded this boot)"),
            Err(why) => unusable(CANNOT_RUN, Some(why)),
        };
    }
    let (kernel, initrd) = image_files(cfg);
    let qemu = install(cfg);
    if !(qemu.binary().is_file() && kernel.is_file() && initrd.is_file()) {
        return Check::ok(
            NAME,
            "/dev/kvm opens (probe boot not tried: VMM or guest image missing)",
        );
    }
    let probed = tokio::task::spawn_blocking(move || {
        qemu::probe_kvm(&qemu, &kernel, &initrd, Duration::from_secs(10))
    })
    .await
    .unwrap_or_else(|e| Err(format!("probe task: {e}")));
    // The agent reads the verdict instead of booting a probe guest itself.
    crate::vm::record_probe(&cache, &probed);
    match probed {
        Ok(()) => Check::ok(NAME, "KVM runs guests (probe boot)"),
        Err(why) => unusable(CANNOT_RUN, Some(why)),
    }
}

fn vmm(cfg: &AgentConfig) -> Check {
    const NAME: &str = "vmm";
    if cfg.vm.driver != VmDriver::Qemu {
        return Check::skip(NAME, format!("vm.driver = \"{}\"", cfg.vm.driver));
    }
    let qemu = install(cfg);
    let fix = format!(
        "cargo xtask image (unpacks QEMU 7.2 into {}), or set vm.qemu_root",
        cfg.vm.qemu_root.display()
    );
    let out = Command::new(qemu.binary())
        .env_clear()
        .envs(qemu.env())
        .arg("--version")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let version = String::from_utf8_lossy(&o.stdout);
            Check::ok(
                NAME,
                version.lines().next().unwrap_or("QEMU").trim().to_string(),
            )
        }
        Ok(o) => Check::fail(
            NAME,
            format!(
                "{} --version failed ({}): {}",
                qemu.binary().display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            fix,
        ),
        Err(e) => Check::fail(NAME, format!("{}: {e}", qemu.binary().display()), fix),
    }
}

fn image(cfg: &AgentConfig) -> Check {
    const NAME: &str = "image";
    if cfg.vm.driver != VmDriver::Qemu {
        return Check::skip(NAME, format!("vm.driver = \"{}\"", cfg.vm.driver));
    }
    let (kernel, initrd) = image_files(cfg);
    let missing: Vec<String> = [&kernel, &initrd]
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        Check::ok(
            NAME,
            format!(
                "guest image {:?}: vmlinux and initramfs.cpio.gz present",
                cfg.vm.default_image
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!("missing {}", missing.join(", ")),
            format!(
                "cargo xtask image (builds it into {}), or set vm.images_dir / vm.default_image",
                cfg.vm.images_dir.display()
            ),
        )
    }
}

/// Share of entries used in the pinned endpoint, route and VIP maps (above 90% warns), and
/// size settings the pinned maps do not have.
fn capacity(cfg: &crate::config::DataplaneConfig) -> Vec<Check> {
    const NAME: &str = "capacity";
    let root = &cfg.bpffs_root;
    let mut out: Vec<Check> = dataplane::unapplied_sizes(root, cfg)
        .into_iter()
        .map(|(setting, want, have)| {
            Check::warn(
                NAME,
                format!("dataplane.{setting} = {want} is not applied: the pinned maps hold {have}"),
                "sizes are fixed when the dataplane is created: drain the host, \
                 `atoll-agent cleanup`, then `atoll-agent run`",
            )
        })
        .collect();
    out.extend(usage(root));
    out
}

fn usage(root: &Path) -> Vec<Check> {
    const NAME: &str = "capacity";
    match dataplane::map_usage(root) {
        Ok(None) => vec![Check::skip(NAME, "no dataplane pinned")],
        Err(e) => vec![Check::warn(
            NAME,
            format!("reading the pinned maps: {e}"),
            "atoll-agent status",
        )],
        Ok(Some(usage)) => usage
            .into_iter()
            .map(|u| {
                let pct = u64::from(u.used) * 100 / u64::from(u.max_entries.max(1));
                let detail = format!("{} {} of {} entries ({pct}%)", u.map, u.used, u.max_entries);
                if pct > 90 {
                    Check::warn(
                        NAME,
                        detail,
                        format!(
                            "map sizes are fixed when the dataplane is created: move endpoints \
                             to another host, or raise dataplane.{} and recreate the dataplane \
                             (drain, `atoll-agent cleanup`, `atoll-agent run`)",
                            u.setting
                        ),
                    )
                } else {
                    Check::ok(NAME, detail)
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_status_and_fix() {
        let c = Check::fail(
            "bpffs",
            "no bpffs mounted at /sys/fs/bpf",
            "mount -t bpf bpf /sys/fs/bpf",
        );
        assert_eq!(
            c.to_string(),
            "FAIL  bpffs      no bpffs mounted at /sys/fs/bpf; fix: mount -t bpf bpf /sys/fs/bpf"
        );
        let report = Report {
            checks: vec![Check::ok("tun", "/dev/net/tun opens"), c],
        };
        assert!(!report.passed());
        assert!(report.to_string().ends_with("1 required checks failed\n"));
        let warn_only = Report {
            checks: vec![Check::warn("kvm", "no /dev/kvm", "enable it")],
        };
        assert!(warn_only.passed(), "warnings do not fail the doctor");
    }
}
