//! Agent configuration (TOML). Unknown keys are errors, so a typo never silently falls back to
//! a default.
//!
//! Decisions:
//! - **Settings are types.** A setting of a few words is an enum ([`ControlMode`],
//!   [`VmDriver`], [`AccelSetting`]); a name the kernel or a protocol constrains is a newtype
//!   checked when the file is read ([`DeviceName`], [`NetnsName`], [`DnsSuffix`],
//!   [`SinkUrl`]), so code past parsing never re-checks a string, and an error names the key.
//! - **This module is a leaf.** It depends on no other module of the agent but `types`: the
//!   rules it needs (interface and namespace names, the tap pool's prefix) are defined here and
//!   the domain modules use them from here, never the other way round.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::Deserialize;

use crate::types::MacAddr;

/// Declares a setting that takes one of a few words: the enum, its TOML spelling (serde,
/// snake_case, so an unknown word is refused naming the key and the accepted words), and
/// `Display` in the same spelling for messages.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $word)] $variant),+
        }
        impl $name {
            /// The setting's TOML spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice! {
    /// `control.mode`: where this host's desired state comes from.
    ControlMode {
        /// Run the control plane in this process (single host, the default).
        Embedded = "embedded",
        /// Follow the control plane at `control.url`.
        Remote = "remote",
        /// No control plane: endpoints are managed by hand.
        Off = "off",
    }
}

choice! {
    /// `vm.driver`: what runs the VMs placed on this host.
    VmDriver {
        /// Boot every placed VM as a QEMU microvm.
        Qemu = "qemu",
        /// Give VMs their network identity only (tap, maps, DNS); another VMM uses the tap.
        None = "none",
    }
}

choice! {
    /// `vm.accel`: the accelerator VMs run under.
    AccelSetting {
        /// KVM when a probe boot under KVM succeeds, else TCG.
        Auto = "auto",
        /// KVM or nothing: a VM fails if KVM cannot run it.
        Kvm = "kvm",
        /// Software emulation.
        Tcg = "tcg",
    }
}

/// Prefix of the tap pool's spare devices (see the `endpoint` module); VM device names must
/// not start with it.
pub const POOL_PREFIX: &str = "atlq";

/// Declares a newtype over `String` whose values pass `$check` (which returns the reason a
/// value is refused), read from TOML through that check, and used as a `&str`.
macro_rules! checked_name {
    ($(#[$m:meta])* $name:ident, $check:path) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);
        impl $name {
            /// `value` if it is valid, else why not.
            pub fn new(value: &str) -> Result<Self, String> {
                $check(value).map(|()| $name(value.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                $check(&value).map(|()| $name(value))
            }
        }
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// The kernel's rules for an interface name: 1 to 15 bytes (`IFNAMSIZ` with its NUL), not `.`
/// or `..`, no `/`, `:`, whitespace or NUL.
pub fn check_device_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IF_NAMESIZE
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid device name {name:?}: 1-15 bytes, no '/', ':' or whitespace"
        ))
    }
}

/// A network namespace name as `ip netns` keeps it (`/run/netns/<name>`): 1 to 64 of
/// `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn check_netns_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid network namespace name {name:?}: 1-64 of [A-Za-z0-9_.-], not \".\" or \"..\""
        ))
    }
}

/// A DNS suffix: a domain name (not the root), read as a fully qualified name.
fn check_dns_suffix(suffix: &str) -> Result<(), String> {
    let name = hickory_proto::rr::Name::from_ascii(suffix)
        .map_err(|e| format!("invalid DNS suffix {suffix:?}: {e}"))?;
    if suffix.is_empty() || name.is_root() {
        return Err(format!(
            "invalid DNS suffix {suffix:?}: a domain name, not the root"
        ));
    }
    Ok(())
}

/// A usage sink URL: `http://host[:port][/path]` (no credentials, no whitespace).
fn check_sink_url(url: &str) -> Result<(), String> {
    SinkUrl::split(url).map(drop)
}

checked_name!(
    /// A network interface name (see [`check_device_name`]).
    DeviceName,
    check_device_name
);
checked_name!(
    /// A network namespace name (see [`check_netns_name`]).
    NetnsName,
    check_netns_name
);
checked_name!(
    /// A DNS suffix, e.g. `atoll.internal.` (see the `dns` module).
    DnsSuffix,
    check_dns_suffix
);
checked_name!(
    /// Where the usage HTTP sink posts: `http://host[:port][/path]`.
    SinkUrl,
    check_sink_url
);

impl SinkUrl {
    /// `(host, address to connect to, path)` of `url`: the port defaults to 80, the path to `/`.
    pub fn split(url: &str) -> Result<(String, String, String), String> {
        let bad = || format!("invalid sink URL {url:?}: expected http://host[:port][/path]");
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(char::is_whitespace) {
            return Err(bad());
        }
        let addr = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok((authority.into(), addr, path.into()))
    }
}

/// Default bpffs directory for atoll's pins.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/atoll";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub dataplane: DataplaneConfig,
    pub metrics: MetricsConfig,
    pub usage: UsageConfig,
    pub control: ControlLinkConfig,
    pub dns: DnsConfig,
    pub vm: VmConfig,
    pub egress: EgressConfig,
    pub overlay: OverlayConfig,
    pub guest_access: GuestAccessConfig,
}

/// `[guest_access]`: the HTTPS endpoint control planes reach this host's guest agents through
/// (exec and files; see the `guest_access` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GuestAccessConfig {
    /// Address and port to listen on. The default, loopback on a free port, serves the
    /// embedded control plane; with remote control planes, listen where they reach the host.
    pub listen: std::net::SocketAddr,
    /// The URL control planes use (`https://<address>:<port>`); default: the listen address,
    /// which must then be a specific one.
    pub url: Option<String>,
}

impl Default for GuestAccessConfig {
    fn default() -> Self {
        GuestAccessConfig {
            listen: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            url: None,
        }
    }
}

/// `[overlay]`: this host's clouds reaching their endpoints on other hosts (see the `overlay`
/// module and `dataplane-ebpf/src/overlay.rs`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OverlayConfig {
    /// Carry clouds across hosts over VXLAN. Off by default: a host alone needs no overlay,
    /// and the underlay is the operator's network to choose.
    pub enabled: bool,
    /// This host's address on the underlay (the outer source of what it sends, and what it
    /// registers with the control plane); unset: the first IPv4 address of the uplink
    /// (`egress.uplink`, else the device of the default route).
    pub underlay: Option<Ipv4Addr>,
    /// The VXLAN device the agent creates (external mode).
    pub device: DeviceName,
    /// UDP port of the overlay, the same on every host of the fleet.
    pub port: u16,
    /// MTU of the underlay; guests are given 50 bytes less (the encapsulation).
    pub underlay_mtu: u32,
}

/// Bytes VXLAN adds over IPv4: outer IPv4 (20), UDP (8), VXLAN (8) and inner Ethernet (14).
pub const OVERLAY_OVERHEAD: u32 = 50;

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig {
            enabled: false,
            underlay: None,
            device: DeviceName("atoll-vx0".into()),
            port: 4789,
            underlay_mtu: 1500,
        }
    }
}

impl OverlayConfig {
    /// The MTU guests get: the underlay's less the encapsulation.
    pub fn guest_mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(OVERLAY_OVERHEAD)
    }
}

/// `[egress]`: how this host's guests reach the internet (see the `egress` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Attach to the uplink and let clouds out under their policies. Off by default:
    /// attaching a program to the host's uplink is the operator's decision; off, no cloud
    /// reaches anything outside its range, whatever its policy.
    pub enabled: bool,
    /// The device towards the internet; unset: the device of the IPv4 default route.
    pub uplink: Option<DeviceName>,
    /// Source ports of the egress addresses used for NAT (`"first-last"`, at least 1024 ports,
    /// none below 1024). The agent reserves them (`net.ipv4.ip_local_reserved_ports`) so no
    /// socket of the host binds one, and refuses a range that overlaps the host's ephemeral
    /// ports (`net.ipv4.ip_local_port_range`).
    pub nat_ports: NatPorts,
    /// Networks no guest reaches whatever its cloud's policy, besides the built-in ones (see
    /// the `egress` module).
    pub never: Vec<Ipv4Network>,
    /// New egress flows per second each cloud may open on this host, with a second's worth of
    /// burst; beyond it a new flow is dropped (`egress_flow_rate_limited`). The flow tables
    /// are shared by every cloud on the host (least recently used flows are evicted when
    /// full), so this bounds how fast one cloud can push the others' idle flows out. 0: no
    /// limit.
    pub max_new_flows_per_sec: u32,
}

/// `egress.max_new_flows_per_sec` and `dataplane.max_new_exposure_flows_per_sec` by default: at 5,000 new flows per second one cloud alone
/// takes most of a minute to cycle the default flow tables (`dataplane.max_flows`), far
/// beyond what one agent's cloud opens from one host in normal use.
pub const DEFAULT_MAX_NEW_FLOWS_PER_SEC: u32 = 5_000;

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            enabled: false,
            uplink: None,
            nat_ports: NatPorts {
                first: 61000,
                last: 65535,
            },
            never: Vec::new(),
            max_new_flows_per_sec: DEFAULT_MAX_NEW_FLOWS_PER_SEC,
        }
    }
}

/// A range of ports, both ends included, of at least [`NatPorts::MIN_LEN`] ports above 1023.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct NatPorts {
    pub first: u16,
    pub last: u16,
}

impl NatPorts {
    /// The fewest ports a range may hold: each is one concurrent flow per destination.
    pub const MIN_LEN: u32 = 1024;

    /// How many ports the range holds.
    pub fn count(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn overlaps(&self, first: u16, last: u16) -> bool {
        self.first <= last && first <= self.last
    }
}

impl TryFrom<String> for NatPorts {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like \"61000-65535\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        let r = NatPorts { first, last };
        if first < 1024 || first > last || r.count() < Self::MIN_LEN {
            return Err(format!(
                "{s:?}: NAT ports must be at least {} ports, none below 1024",
                Self::MIN_LEN
            ));
        }
        Ok(r)
    }
}

impl fmt::Display for NatPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// `[vm]`: how this host runs the VMs placed on it (see the `vm` module and docs/vm.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `qemu`: boot every placed VM as a QEMU microvm; `none`: give VMs their network
    /// identity only (tap, maps, DNS) and leave the tap to another VMM.
    pub driver: VmDriver,
    /// Root of the QEMU tree `cargo xtask image` unpacks (`usr/bin/qemu-system-x86_64`, its
    /// libraries and firmware); `/` for a system-wide QEMU 7.2.
    pub qemu_root: PathBuf,
    /// Guest images: `<images_dir>/<image>/vmlinux` and `initramfs.cpio.gz`.
    pub images_dir: PathBuf,
    /// Image of VMs that name none.
    pub default_image: String,
    /// `auto` (KVM when a probe boot under KVM succeeds, else TCG), `kvm` or `tcg`.
    pub accel: AccelSetting,
    /// Per-VM runtime files (config drive, sockets, pid).
    pub run_dir: PathBuf,
    /// Per-VM console logs.
    pub state_dir: PathBuf,
    /// Each VM's VMM runs as uid and gid `uid_base + <endpoint slot>` (no passwd entry needed).
    pub uid_base: u32,
    /// Unrequested VMM exits restarted within `restart_window_secs`; one more marks the VM
    /// `failed`.
    pub max_restarts: u32,
    pub restart_window_secs: u64,
    /// How long a stop waits for the guest to power off before the VMM is killed.
    pub stop_timeout_secs: u64,
    /// Bytes of console log kept per VM (the current file and one rotated file, each at most
    /// half of this).
    pub console_max_bytes: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            driver: VmDriver::Qemu,
            qemu_root: PathBuf::from("/var/lib/atoll/vmm/qemu-7.2"),
            images_dir: PathBuf::from("/var/lib/atoll/images"),
            default_image: "default".into(),
            accel: AccelSetting::Auto,
            run_dir: PathBuf::from("/run/atoll/vms"),
            state_dir: PathBuf::from("/var/lib/atoll/vms"),
            uid_base: 2_000_000_000,
            max_restarts: 3,
            restart_window_secs: 600,
            stop_timeout_secs: 10,
            console_max_bytes: 1 << 20,
        }
    }
}

/// `[control.embedded]`: the embedded control plane's config, with the `embedded` feature
/// (the only place the agent's library names `atoll-control`).
#[cfg(feature = "embedded")]
pub type EmbeddedConfig = atoll_control::config::ControlConfig;
/// `[control.embedded]` in an agent built without the `embedded` feature: refused unless
/// empty (see [`AgentConfig::validate`]).
#[cfg(not(feature = "embedded"))]
pub type EmbeddedConfig = toml::Table;

/// `control.url`: one URL or a list, each a control plane serving the same store (several
/// `atoll serve` over one etcd cluster). Decided: the agent talks to one at a time (the
/// first that answers, kept while it answers) rather than to all at once: every control
/// plane serves the same revisions, so a sync continues on another from where it was.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlUrls(pub Vec<String>);

impl From<&str> for ControlUrls {
    fn from(url: &str) -> Self {
        ControlUrls(vec![url.to_string()])
    }
}

impl From<String> for ControlUrls {
    fn from(url: String) -> Self {
        ControlUrls(vec![url])
    }
}

impl std::fmt::Display for ControlUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl<'de> Deserialize<'de> for ControlUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a URL or a list of URLs")]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(url) => ControlUrls(vec![url]),
            OneOrMany::Many(urls) => ControlUrls(urls),
        })
    }
}

/// `[control]`: where this host's desired state comes from.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlLinkConfig {
    /// `embedded`: run the control plane in this process (single host, the default);
    /// `remote`: follow the control plane at `url`; `off`: endpoints are managed by hand.
    pub mode: ControlMode,
    /// This host's name in the control plane (a DNS label); default: the hostname.
    pub host: Option<String>,
    /// `remote`: the control plane's API URL, or several control planes' URLs over one store
    /// (`["https://a:7480", "https://b:7480"]`): the agent moves to the next when one does not
    /// answer.
    pub url: ControlUrls,
    /// `remote`: the CA certificate that signs the control plane's certificate (its
    /// generated `ca.pem`, or the operator's CA).
    pub ca_file: Option<PathBuf>,
    /// `remote`: instead, the SHA-256 fingerprint of the control plane's certificate or CA.
    pub ca_fingerprint: Option<String>,
    /// `remote`: file with this host's token (`atoll host token <host>`: it reaches only this
    /// host's sync, status and registration) or, less safely, the operator token.
    pub token_file: PathBuf,
    /// Prefix of VM device names (1 to 10 bytes; a counter of up to 5 follows).
    pub tap_prefix: String,
    /// Directory of volume files (`<dir>/<cloud>/<volume>.raw|.qcow2`).
    pub volumes_dir: PathBuf,
    /// `embedded`: the control plane's settings (the keys of `atoll serve --config`).
    pub embedded: EmbeddedConfig,
}

impl Default for ControlLinkConfig {
    fn default() -> Self {
        ControlLinkConfig {
            mode: ControlMode::Embedded,
            host: None,
            url: ControlUrls::from("https://127.0.0.1:7480"),
            ca_file: None,
            ca_fingerprint: None,
            token_file: PathBuf::from("/etc/atoll/host.token"),
            tap_prefix: "atv".into(),
            volumes_dir: PathBuf::from("/var/lib/atoll/volumes"),
            embedded: EmbeddedConfig::default(),
        }
    }
}

impl ControlLinkConfig {
    /// How a remote agent trusts the control plane (`None`: plain `http://`, loopback only).
    pub fn client_tls(&self) -> Option<atoll_api::tls::ClientTls> {
        use atoll_api::tls::{ClientTls, Trust};
        let (trust, setting) = match (&self.ca_fingerprint, &self.ca_file) {
            (Some(fp), _) => (
                Trust::Fingerprint(fp.clone()),
                format!("control.ca_fingerprint = {fp}"),
            ),
            (None, Some(f)) => (
                Trust::CaFile(f.clone()),
                format!("control.ca_file = {}", f.display()),
            ),
            (None, None) => return None,
        };
        Some(ClientTls {
            trust,
            setting,
            identity: None,
        })
    }

    /// A client of each remote control plane (`url`'s order) with `token`.
    pub fn clients(
        &self,
        token: &str,
    ) -> Result<Vec<atoll_api::client::Client>, atoll_api::client::ClientError> {
        if self.url.0.is_empty() {
            return Err(atoll_api::client::ClientError::InvalidUrl(String::new()));
        }
        let tls = self.client_tls();
        self.url
            .0
            .iter()
            .map(|url| atoll_api::client::Client::with_tls(url, token, tls.as_ref()))
            .collect()
    }

    /// This host's name: configured, or the hostname's first label.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            host.trim()
                .split('.')
                .next()
                .unwrap_or("host")
                .to_ascii_lowercase()
        })
    }
}

/// The per-host DNS server guests reach at their gateway address (see the `dns` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve DNS to guests at their gateway address.
    pub enabled: bool,
    /// Every cloud's zone lives under this suffix; names under it that are not in the asking
    /// guest's own zone are answered NXDOMAIN (never forwarded).
    pub suffix: DnsSuffix,
    /// Name of atoll's DNS network namespace (`/run/netns/<namespace>`), created if missing.
    pub namespace: NetnsName,
    /// Host-side name of the veth pair into the DNS namespace.
    pub device: DeviceName,
    /// Proxy addresses: the endpoint with counter slot `s` asks from the `s`-th address. Exists
    /// only inside the DNS namespace; needs at least `dataplane.max_endpoints` addresses.
    pub proxy_network: Ipv4Network,
    /// The DNS server's address inside the DNS namespace (outside `proxy_network`).
    pub server_address: Ipv4Addr,
    /// Upstream resolvers (`ip:port`) for names outside `suffix`, tried in order from the
    /// host's network namespace; empty: such names are refused.
    pub forward: Vec<SocketAddr>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            suffix: DnsSuffix("atoll.internal.".into()),
            namespace: NetnsName("atoll-dns".into()),
            device: DeviceName("atoll-dns".into()),
            proxy_network: Ipv4Network {
                addr: Ipv4Addr::new(100, 127, 0, 0),
                prefix: 16,
            },
            server_address: Ipv4Addr::new(100, 126, 0, 53),
            forward: Vec::new(),
        }
    }
}

impl DnsConfig {
    /// Checks the `[dns]` table against itself and the dataplane's size; the message names the
    /// offending key.
    pub fn validate(&self, dataplane: &DataplaneConfig) -> Result<(), String> {
        let net = &self.proxy_network;
        if net.size() < u64::from(dataplane.max_endpoints) {
            return Err(format!(
                "dns.proxy_network {net} has {} addresses but dataplane.max_endpoints is {}: \
                 use a shorter prefix",
                net.size(),
                dataplane.max_endpoints
            ));
        }
        let s = self.server_address;
        if net.contains(s) {
            return Err(format!(
                "dns.server_address {s} must lie outside dns.proxy_network {net}"
            ));
        }
        if s.is_unspecified() || s.is_loopback() || s.is_multicast() || s.is_broadcast() {
            return Err(format!(
                "dns.server_address {s} must be a unicast, non-loopback address"
            ));
        }
        for f in &self.forward {
            if f.port() == 0 || f.ip().is_unspecified() || f.ip().is_multicast() {
                return Err(format!(
                    "dns.forward: {f} must be a unicast address with a non-zero port"
                ));
            }
        }
        Ok(())
    }
}

/// An IPv4 network `a.b.c.d/prefix` with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Network {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Network {
    /// Number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u64::from(u32::from(a).wrapping_sub(u32::from(self.addr))) < self.size()
    }
}

impl fmt::Display for Ipv4Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Error parsing an [`Ipv4Network`].
#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 network {0:?}: expected a.b.c.d/prefix (0-32) with no host bits set")]
pub struct ParseNetworkError(pub String);

impl FromStr for Ipv4Network {
    type Err = ParseNetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseNetworkError(s.into());
        let (addr, prefix) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        if prefix > 32 {
            return Err(err());
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(err());
        }
        Ok(Ipv4Network { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Ipv4Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Usage records (see the `usage` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Journal usage records while `atoll-agent run` runs and when endpoints are deleted.
    pub enabled: bool,
    /// Directory of the durable journal and the sinks' cursors.
    pub journal_dir: PathBuf,
    /// Seconds between records of each endpoint (1 to 86400).
    pub interval_secs: u64,
    /// CloudEvents `source`; default `atoll/agent/<hostname>`.
    pub source: Option<String>,
    /// Append delivered records to this JSON-lines file.
    pub file_sink: Option<PathBuf>,
    /// POST delivered records to this `http://host[:port]/path` URL.
    pub http_sink: Option<SinkUrl>,
    /// Timeout of one HTTP delivery, seconds (1 to 300).
    pub http_timeout_secs: u64,
    /// The journal is written in segments of this many bytes (at least 64 KiB); a segment is
    /// deleted once every sink has it and it is behind the baselines' checkpoint.
    pub journal_segment_bytes: u64,
    /// Periodic records pause while the journal holds this many bytes (at least two segments);
    /// the kernel counters keep the usage meanwhile. See docs/operations.md for the bound.
    pub journal_max_bytes: u64,
    /// The file sink is rotated (`<file>.1` … `<file>.<keep>`) once it holds this many bytes.
    pub file_sink_max_bytes: u64,
    /// Rotated file sink files kept (1 to 100).
    pub file_sink_keep: u32,
    /// Deliver records to the control plane too (`POST /v1/hosts/{host}/usage`, with the
    /// host's token), which keeps them for its usage API; on whenever there is one.
    pub deliver_to_control: bool,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            journal_dir: PathBuf::from("/var/lib/atoll/usage"),
            interval_secs: 60,
            source: None,
            file_sink: None,
            http_sink: None,
            http_timeout_secs: 5,
            journal_segment_bytes: 16 << 20,
            journal_max_bytes: 1 << 30,
            file_sink_max_bytes: 256 << 20,
            file_sink_keep: 3,
            deliver_to_control: true,
        }
    }
}

impl UsageConfig {
    /// The CloudEvents source: configured, or `atoll/agent/<hostname>`.
    pub fn source(&self) -> String {
        self.source.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("atoll/agent/{}", host.trim())
        })
    }
}

/// Dataplane sizing and identity.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Directory on a bpffs under which atoll pins programs, maps and links.
    pub bpffs_root: PathBuf,
    /// Capacity of the endpoint map (endpoints on this host). Fixed when the maps are first
    /// created; changing it later needs a migration.
    pub max_endpoints: u32,
    /// Capacity of the route map (addresses reachable in all clouds on this host).
    pub max_routes: u32,
    /// Capacity of the VIP map: exposure grants whose consumer has endpoints on this host.
    pub max_vips: u32,
    /// Capacity of each connection-tracking map of exposure flows (LRU: the least recently
    /// used flow is evicted when full).
    pub max_flows: u32,
    /// The MAC address guests see for their gateway.
    pub gateway_mac: MacAddr,
    /// Spare taps kept created and attached, so a tap endpoint is created without waiting for
    /// the kernel's RCU grace periods (see `endpoint` module docs). 0 disables the pool.
    pub tap_pool: u32,
    /// Expedite the kernel's RCU grace periods (`/sys/kernel/rcu_expedited`) while the agent
    /// attaches, detaches or deletes endpoint devices, and restore the setting afterwards (see
    /// the `expedite` module): a cold tap endpoint takes about 0.5 ms instead of two normal
    /// grace periods.
    pub expedite_rcu: bool,
    /// New exposure flows per second each consumer cloud may open on this host, with a
    /// second's worth of burst; beyond it a new flow is dropped
    /// (`exposure_flow_rate_limited`). The exposure flow tables (`max_flows` each) are shared
    /// by every cloud on the host, so this bounds how fast one cloud can push the others' idle
    /// flows out, as `egress.max_new_flows_per_sec` does for egress. 0: no limit.
    pub max_new_exposure_flows_per_sec: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            max_endpoints: 65536,
            max_routes: 65536,
            max_vips: 65536,
            max_flows: 262_144,
            gateway_mac: MacAddr([0x02, 0xa7, 0x00, 0x00, 0x00, 0x01]),
            tap_pool: 8,
            expedite_rcu: true,
            max_new_exposure_flows_per_sec: DEFAULT_MAX_NEW_FLOWS_PER_SEC,
        }
    }
}

/// Default address of the metrics endpoint (`GET /metrics`): loopback only.
pub const DEFAULT_METRICS_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9469),
);

/// The OpenMetrics / Prometheus endpoint (see the `metrics` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve metrics while `atoll-agent run` runs.
    pub enabled: bool,
    /// Address and port to listen on, e.g. `"127.0.0.1:9469"` or `"[::1]:9469"`.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `key` is the setting's path (`dns.suffix`), empty when the error is not about one.
    #[error("parsing config {path}: {}{source}", if key.is_empty() { String::new() } else { format!("{key}: ") })]
    Parse {
        path: PathBuf,
        key: String,
        source: Box<toml::de::Error>,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Parse {
                    path: path.into(),
                    key: if key == "." { String::new() } else { key },
                    source: Box::new(e.into_inner()),
                }
            })?;
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        };
        let d = &cfg.dataplane;
        if d.max_endpoints == 0 || d.max_routes == 0 || d.max_vips == 0 || d.max_flows == 0 {
            return Err(invalid(
                "dataplane.max_endpoints, max_routes, max_vips and max_flows must be > 0",
            ));
        }
        if !d.gateway_mac.is_valid_unicast() {
            return Err(invalid(
                "dataplane.gateway_mac must be a unicast, non-zero MAC",
            ));
        }
        if !d.bpffs_root.is_absolute() {
            return Err(invalid("dataplane.bpffs_root must be an absolute path"));
        }
        let o = &cfg.overlay;
        if o.port == 0 {
            return Err(invalid("overlay.port must not be 0"));
        }
        if !(576..=65_535).contains(&o.underlay_mtu) {
            return Err(invalid(
                "overlay.underlay_mtu must be between 576 and 65535 (guests get 50 bytes less)",
            ));
        }
        if let Some(a) = o.underlay {
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
                return Err(invalid(
                    "overlay.underlay must be a unicast address of this host",
                ));
            }
        }
        let m = &cfg.metrics;
        if m.listen.port() == 0 {
            return Err(invalid(
                "metrics.listen needs a fixed port (0 would pick a random one)",
            ));
        }
        if m.listen.ip().is_multicast() {
            return Err(invalid("metrics.listen must be a unicast address"));
        }
        let u = &cfg.usage;
        if !(1..=86_400).contains(&u.interval_secs) {
            return Err(invalid("usage.interval_secs must be between 1 and 86400"));
        }
        if !(1..=300).contains(&u.http_timeout_secs) {
            return Err(invalid("usage.http_timeout_secs must be between 1 and 300"));
        }
        if !u.journal_dir.is_absolute() || u.file_sink.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid(
                "usage.journal_dir and usage.file_sink must be absolute paths",
            ));
        }
        if u.source.as_ref().is_some_and(|s| s.trim().is_empty()) {
            return Err(invalid("usage.source must not be empty"));
        }
        if u.journal_segment_bytes < 64 << 10 {
            return Err(invalid(
                "usage.journal_segment_bytes must be at least 65536",
            ));
        }
        if u.journal_max_bytes < u.journal_segment_bytes.saturating_mul(2) {
            return Err(invalid(
                "usage.journal_max_bytes must be at least twice usage.journal_segment_bytes",
            ));
        }
        if u.file_sink_max_bytes < 64 << 10 || !(1..=100).contains(&u.file_sink_keep) {
            return Err(invalid(
                "usage.file_sink_max_bytes must be at least 65536 and usage.file_sink_keep between 1 and 100",
            ));
        }
        let c = &cfg.control;
        if c.mode != ControlMode::Off {
            atoll_api::model::validate_label("control.host", &c.host_name())
                .map_err(|e| invalid(&format!("control.host: {}", e.message)))?;
        }
        if c.tap_prefix.is_empty()
            || c.tap_prefix.len() > 10
            || !c
                .tap_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(invalid("control.tap_prefix must be 1 to 10 of a-z, 0-9"));
        }
        if c.tap_prefix.starts_with(POOL_PREFIX) {
            return Err(invalid(
                "control.tap_prefix must not start with the tap pool's prefix atlq",
            ));
        }
        if !c.volumes_dir.is_absolute() {
            return Err(invalid("control.volumes_dir must be an absolute path"));
        }
        if c.mode == ControlMode::Remote {
            if c.url.0.is_empty() {
                return Err(invalid(
                    "control.url: give at least one control plane's URL",
                ));
            }
            let mut seen = std::collections::HashSet::new();
            if let Some(twice) = c
                .url
                .0
                .iter()
                .find(|u| !seen.insert(u.trim_end_matches('/')))
            {
                return Err(invalid(&format!("control.url: {twice} is listed twice")));
            }
            c.clients("x")
                .map_err(|e| invalid(&format!("control.url: {e}")))?;
        }
        #[cfg(not(feature = "embedded"))]
        if c.mode == ControlMode::Embedded || !c.embedded.is_empty() {
            return Err(invalid(
                "control.mode = \"embedded\": this agent was built without the embedded control plane (feature `embedded`); set control.mode = \"remote\" or \"off\"",
            ));
        }
        #[cfg(feature = "embedded")]
        if c.mode == ControlMode::Embedded {
            c.embedded
                .validate()
                .map_err(|e| invalid(&format!("control.embedded.{e}")))?;
            let norm = |s: &str| s.trim_end_matches('.').to_ascii_lowercase();
            if cfg.dns.enabled && norm(&c.embedded.clouds.dns_suffix) != norm(&cfg.dns.suffix) {
                return Err(invalid(
                    "control.embedded.clouds.dns_suffix must equal dns.suffix (the zones the control plane names are the ones the DNS server answers)",
                ));
            }
        }
        cfg.dns.validate(&cfg.dataplane).map_err(|m| invalid(&m))?;
        cfg.vm.validate(&cfg.dataplane).map_err(|m| invalid(&m))?;
        Ok(cfg)
    }
}

impl VmConfig {
    pub fn validate(&self, dataplane: &DataplaneConfig) -> Result<(), String> {
        for (key, p) in [
            ("vm.qemu_root", &self.qemu_root),
            ("vm.images_dir", &self.images_dir),
            ("vm.run_dir", &self.run_dir),
            ("vm.state_dir", &self.state_dir),
        ] {
            if !p.is_absolute() {
                return Err(format!("{key} must be an absolute path"));
            }
        }
        atoll_api::model::validate_label("vm.default_image", &self.default_image)
            .map_err(|e| format!("vm.default_image: {}", e.message))?;
        // Every slot's uid must be a valid, unprivileged id (and not -1, "no change").
        let top = u64::from(self.uid_base) + u64::from(dataplane.max_endpoints);
        if self.uid_base < 65_536 || top >= u64::from(u32::MAX) {
            return Err(format!(
                "vm.uid_base {} with dataplane.max_endpoints {}: the per-VM ids must lie in 65536..{}",
                self.uid_base,
                dataplane.max_endpoints,
                u32::MAX
            ));
        }
        if self.stop_timeout_secs == 0 || self.stop_timeout_secs > 600 {
            return Err("vm.stop_timeout_secs must be 1 to 600".into());
        }
        if self.restart_window_secs == 0 {
            return Err("vm.restart_window_secs must be > 0".into());
        }
        if self.console_max_bytes < 64 * 1024 {
            return Err("vm.console_max_bytes must be at least 65536".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented default config `cargo xtask install` ships is valid, and is the defaults.
    #[test]
    fn settings_of_a_few_words_are_enums_naming_the_key_and_the_words() {
        let p = Path::new("/etc/atoll/agent.toml");
        let c = AgentConfig::parse(
            "[control]\nmode = \"off\"\n[vm]\ndriver = \"none\"\naccel = \"tcg\"\n",
            p,
        )
        .unwrap();
        assert_eq!(
            (c.control.mode, c.vm.driver, c.vm.accel),
            (ControlMode::Off, VmDriver::None, AccelSetting::Tcg)
        );
        assert_eq!(c.vm.accel.to_string(), "tcg");
        for (text, key, words) in [
            (
                "[control]\nmode = \"local\"\n",
                "mode",
                "`embedded`, `remote`, `off`",
            ),
            (
                "[vm]\ndriver = \"firecracker\"\n",
                "driver",
                "`qemu` or `none`",
            ),
            ("[vm]\naccel = \"hvf\"\n", "accel", "`auto`, `kvm`, `tcg`"),
        ] {
            let e = AgentConfig::parse(text, p).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains(words) && e.contains("agent.toml"),
                "{e}"
            );
        }
    }

    #[test]
    fn shipped_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            AgentConfig::parse(&text, &path).unwrap(),
            AgentConfig::default()
        );
    }

    /// `control.url` is one URL or a list of control planes; an empty list, a URL listed
    /// twice and a bad URL in the list are refused, naming the key.
    #[test]
    fn control_url_is_one_or_several_control_planes() {
        let p = Path::new("agent.toml");
        let remote = |url: &str| {
            AgentConfig::parse(
                &format!(
                    "[control]\nmode = \"remote\"\nca_fingerprint = \"{}\"\nurl = {url}\n",
                    "ab".repeat(32)
                ),
                p,
            )
        };
        let one = remote("\"https://10.1.0.1:7480\"").unwrap();
        assert_eq!(one.control.url.0, ["https://10.1.0.1:7480"]);
        let two = remote("[\"https://10.1.0.1:7480\", \"https://10.1.0.2:7480\"]").unwrap();
        assert_eq!(
            two.control.url.0,
            ["https://10.1.0.1:7480", "https://10.1.0.2:7480"]
        );
        assert_eq!(two.control.clients("t").unwrap().len(), 2);
        assert_eq!(
            two.control.url.to_string(),
            "https://10.1.0.1:7480, https://10.1.0.2:7480"
        );
        for (bad, says) in [
            ("[]", "at least one"),
            (
                "[\"https://10.1.0.1:7480\", \"https://10.1.0.1:7480/\"]",
                "listed twice",
            ),
            (
                "[\"https://10.1.0.1:7480\", \"http://10.1.0.2:7480\"]",
                "http://",
            ),
            ("7", "a URL or a list of URLs"),
        ] {
            let e = remote(bad).unwrap_err().to_string();
            assert!(e.contains("url") && e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let p = Path::new("t.toml");
        assert_eq!(AgentConfig::parse("", p).unwrap(), AgentConfig::default());
        let c = AgentConfig::parse("[dataplane]\nmax_endpoints = 10\n", p).unwrap();
        assert_eq!(c.dataplane.max_endpoints, 10);
    }

    #[test]
    fn usage_section_is_validated() {
        let p = Path::new("t.toml");
        let c = AgentConfig::parse(
            "[usage]\ninterval_secs = 5\nfile_sink = \"/tmp/u.jsonl\"\nhttp_sink = \"http://127.0.0.1:9/u\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.usage.interval_secs, 5);
        for bad in [
            "[usage]\ninterval_secs = 0\n",
            "[usage]\nhttp_timeout_secs = 0\n",
            "[usage]\njournal_dir = \"rel\"\n",
            "[usage]\nhttp_sink = \"https://x/\"\n",
            "[usage]\nsource = \" \"\n",
            "[usage]\nintervall = 3\n",
        ] {
            assert!(AgentConfig::parse(bad, p).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let p = Path::new("t.toml");
        let e = AgentConfig::parse("[dataplane]\nmax_endpoint = 10\n", p).unwrap_err();
        assert!(e.to_string().contains("max_endpoint"), "{e}");
        assert!(AgentConfig::parse("[dataplan]\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_routes = 0\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_flows = 0\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_vips = 0\n", p).is_err());
        assert!(
            AgentConfig::parse("[dataplane]\ngateway_mac = \"ff:ff:ff:ff:ff:ff\"\n", p).is_err()
        );
        assert!(AgentConfig::parse("[dataplane]\ngateway_mac = \"nope\"\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nbpffs_root = \"rel\"\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_routes = -1\n", p).is_err());
    }

    #[test]
    fn metrics_defaults_and_overrides() {
        let p = Path::new("t.toml");
        let d = AgentConfig::parse("", p).unwrap().metrics;
        assert!(d.enabled);
        assert_eq!(d.listen, "127.0.0.1:9469".parse().unwrap());
        let c = AgentConfig::parse("[metrics]\nlisten = \"[::1]:9100\"\n", p).unwrap();
        assert_eq!(c.metrics.listen, "[::1]:9100".parse().unwrap());
        assert!(c.metrics.enabled, "unset keys keep their defaults");
        let c = AgentConfig::parse("[metrics]\nenabled = false\n", p).unwrap();
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.listen, DEFAULT_METRICS_LISTEN);
    }

    #[test]
    fn metrics_rejects_unknown_keys_and_bad_values() {
        let p = Path::new("t.toml");
        let e = AgentConfig::parse("[metrics]\nlisten_addr = \"127.0.0.1:1\"\n", p).unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        for bad in [
            "listen = \"127.0.0.1\"",
            "listen = \"localhost:9469\"",
            "listen = \"127.0.0.1:65536\"",
            "listen = \"::1:9469\"",
            "listen = 9469",
            "listen = \"127.0.0.1:0\"",
            "listen = \"224.0.0.1:9469\"",
            "enabled = \"yes\"",
        ] {
            let text = format!("[metrics]\n{bad}\n");
            assert!(AgentConfig::parse(&text, p).is_err(), "accepted {bad}");
        }
        let e = AgentConfig::parse("[metrics]\nlisten = \"127.0.0.1:0\"\n", p).unwrap_err();
        assert!(e.to_string().contains("metrics.listen"), "{e}");
    }

    #[test]
    #[cfg(feature = "embedded")]
    fn dns_defaults_and_overrides() {
        let p = Path::new("t.toml");
        let d = AgentConfig::parse("", p).unwrap().dns;
        assert!(d.enabled);
        assert_eq!(d.suffix.as_str(), "atoll.internal.");
        assert_eq!(d.proxy_network.to_string(), "100.127.0.0/16");
        assert!(d.forward.is_empty());
        let c = AgentConfig::parse(
            "[dataplane]\nmax_endpoints = 1000\n[dns]\nsuffix = \"corp.example\"\n\
             namespace = \"atl-dns-1\"\ndevice = \"atldns1\"\n\
             proxy_network = \"10.200.0.0/22\"\nserver_address = \"10.201.0.1\"\n\
             forward = [\"192.0.2.53:53\", \"[2001:db8::1]:5353\"]\n\
             [control.embedded.clouds]\ndns_suffix = \"corp.example\"\n",
            p,
        )
        .unwrap()
        .dns;
        // The embedded control plane must name the zones the DNS server answers for.
        let e = AgentConfig::parse("[dns]\nsuffix = \"corp.example\"\n", p).unwrap_err();
        assert!(
            e.to_string().contains("dns_suffix must equal dns.suffix"),
            "{e}"
        );
        assert!(AgentConfig::parse(
            "[dns]\nsuffix = \"corp.example\"\n[control]\nmode = \"off\"\n",
            p
        )
        .is_ok());
        assert_eq!(d.server_address, Ipv4Addr::new(100, 126, 0, 53));
        assert_eq!(c.proxy_network.size(), 1024);
        assert_eq!(c.forward.len(), 2);
    }

    #[test]
    fn dns_rejects_unknown_keys_and_bad_values() {
        let p = Path::new("t.toml");
        let e = AgentConfig::parse("[dns]\nforwarders = []\n", p).unwrap_err();
        assert!(e.to_string().contains("forwarders"), "{e}");
        for (bad, key) in [
            ("suffix = \"\"", "dns.suffix"),
            ("suffix = \".\"", "dns.suffix"),
            ("suffix = \"a..b\"", "dns.suffix"),
            ("namespace = \"a/b\"", "dns.namespace"),
            ("namespace = \"..\"", "dns.namespace"),
            ("device = \"much-too-long-name\"", "dns.device"),
            ("proxy_network = \"100.127.0.0/17\"", "dns.proxy_network"),
            ("proxy_network = \"100.127.0.1/16\"", "proxy_network"),
            ("proxy_network = \"100.127.0.0/33\"", "proxy_network"),
            ("server_address = \"100.127.0.53\"", "dns.server_address"),
            ("server_address = \"127.0.0.1\"", "dns.server_address"),
            ("forward = [\"192.0.2.1:0\"]", "dns.forward"),
            ("forward = [\"192.0.2.1\"]", "forward"),
            ("enabled = 1", "enabled"),
        ] {
            let e = AgentConfig::parse(&format!("[dns]\n{bad}\n"), p)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad}"));
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv4_networks() {
        let n: Ipv4Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(Ipv4Addr::new(10, 255, 0, 1)));
        assert!(!n.contains(Ipv4Addr::new(11, 0, 0, 0)));
        assert!(!n.contains(Ipv4Addr::new(9, 255, 255, 255)));
        assert_eq!("0.0.0.0/0".parse::<Ipv4Network>().unwrap().size(), 1 << 32);
        for bad in ["10.0.0.0", "10.0.0.0/", "10.0.0.1/8", "x/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<Ipv4Network>().is_err(), "{bad}");
        }
    }
}
