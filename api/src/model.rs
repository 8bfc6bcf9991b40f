//! The API's resources: what clients send, what the store keeps, what agents receive.
//!
//! Decisions:
//! - **Ids.** A cloud's id is a random non-zero 32-bit number (the dataplane's cloud id), shown
//!   as `c` + 8 hex digits. Random ids need no shared counter, so concurrent creates (and
//!   several control planes on etcd) never contend on one key; a collision is detected by the
//!   create's `Absent` compare and retried. Everything inside a cloud is named by the client
//!   (a DNS label), unique within the cloud.
//! - **Strict input.** Every request body rejects unknown fields; validation errors name the
//!   field (`quotas.vcpus`, `records[0]`), and the API returns them as 4xx JSON.
//! - Stored records are the same types as the API's, serialized as JSON, so there is one
//!   definition of each resource.
//! - **One set of naming rules, applied on both sides.** The functions the API validates
//!   names with ([`validate_label`], [`validate_domain_name`], [`validate_zone_apex`],
//!   [`validate_record_set`]) also make up the checks a host runs on what its sync delivers
//!   (`Placement::validate` and its siblings), so a compromised control plane or store
//!   cannot hand a host a name the API would have refused.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A field-level validation error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A cloud id: non-zero, shown as `c` + 8 lowercase hex digits. The same type is the
/// dataplane's cloud id (the number in every map key), so the API, the agent and the kernel
/// name a cloud alike; 0 is reserved (it cannot be constructed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloudId(u32);

impl CloudId {
    /// `None` for 0, which is reserved.
    pub const fn new(id: u32) -> Option<Self> {
        if id == 0 {
            None
        } else {
            Some(CloudId(id))
        }
    }

    /// The number (the dataplane's key).
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for CloudId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{:08x}", self.0)
    }
}

impl FromStr for CloudId {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            FieldError::new(
                "cloud",
                format!("{s:?} is not a cloud id (c + 8 hex digits)"),
            )
        };
        let hex = s.strip_prefix('c').ok_or_else(bad)?;
        if hex.len() != 8
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        match u32::from_str_radix(hex, 16) {
            Ok(0) | Err(_) => Err(bad()),
            Ok(v) => Ok(CloudId(v)),
        }
    }
}

impl Serialize for CloudId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CloudId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: FieldError| serde::de::Error::custom(e.message))
    }
}

impl utoipa::PartialSchema for CloudId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^c[0-9a-f]{8}$"))
            .examples([serde_json::json!("c1f2e3d4a")])
            .into()
    }
}

impl ToSchema for CloudId {}

/// Checks a DNS label used as a resource name: 1-63 of `a-z0-9-`, not starting or ending with
/// `-`.
pub fn validate_label(field: &str, s: &str) -> Result<(), FieldError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{s:?} is not a name: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"),
        ))
    }
}

/// The longest DNS name in text form, without the final dot (255 bytes on the wire): hosts'
/// DNS servers refuse a zone with a longer name.
pub const MAX_DNS_NAME_LEN: usize = 253;

/// Checks a domain name (a trailing dot is optional): labels as [`validate_label`], at most
/// [`MAX_DNS_NAME_LEN`] characters.
pub fn validate_domain_name(field: &str, s: &str) -> Result<(), FieldError> {
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.split('.').any(|l| validate_label(field, l).is_err()) {
        return Err(FieldError::new(
            field,
            format!("{s:?} is not a domain name"),
        ));
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(FieldError::new(
            field,
            format!(
                "{name} is {} characters; a DNS name holds at most {MAX_DNS_NAME_LEN}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// A cloud's zone apex: `<cloud name>.<suffix>.` (the suffix with or without its final dot).
pub fn zone_apex(cloud_name: &str, suffix: &str) -> String {
    format!("{cloud_name}.{}.", suffix.trim_end_matches('.'))
}

/// Checks that `apex` is a zone apex [`zone_apex`] makes under `suffix`: one label (a cloud's
/// name) directly under it, with the final dot. Anything else would put a cloud's names
/// outside the suffix, or over another cloud's.
pub fn validate_zone_apex(field: &str, apex: &str, suffix: &str) -> Result<(), FieldError> {
    let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
    let label = apex
        .strip_suffix('.')
        .and_then(|a| a.strip_suffix(suffix.as_str()))
        .and_then(|a| a.strip_suffix('.'))
        .ok_or_else(|| {
            FieldError::new(
                field,
                format!("{apex:?} is not a zone directly under {suffix}."),
            )
        })?;
    validate_label(field, label)?;
    validate_domain_name(field, apex)
}

/// An IPv4 prefix such as `10.0.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Net {
    pub fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    pub fn network(&self) -> u32 {
        u32::from(self.addr) & self.mask()
    }

    /// Number of addresses in the prefix.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network()
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 prefix like 10.0.0.0/16"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("{l:?} is not a prefix length (0-32)"))?;
        let net = Ipv4Net { addr, len };
        if u32::from(addr) != net.network() {
            return Err(format!(
                "{s:?} has host bits set (network is {}/{len})",
                Ipv4Addr::from(net.network())
            ));
        }
        Ok(net)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Ipv4Net {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .examples([serde_json::json!("10.0.0.0/16")])
            .into()
    }
}

impl ToSchema for Ipv4Net {}

/// Limits of one cloud. Every create that would exceed one is refused with 409 `quota_exceeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub volume_gib: u64,
    /// Egress bandwidth per VM, Mbit/s (recorded; enforced by the dataplane in a later issue).
    pub bandwidth_mbps: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            vms: 16,
            vcpus: 32,
            memory_mib: 64 * 1024,
            volume_gib: 1024,
            bandwidth_mbps: 1000,
        }
    }
}

/// What a cloud currently uses of its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub volume_gib: u64,
}

/// `POST /v1/clouds`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCloud {
    /// DNS label of the cloud's zone (`<vm>.<name>.<suffix>`); default: the cloud id.
    #[serde(default)]
    pub name: Option<String>,
    /// The cloud's private range; default from the control plane's config (10.0.0.0/16).
    /// Ranges of different clouds may overlap.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "10.0.0.0/16")]
    pub cidr: Option<Ipv4Net>,
    #[serde(default)]
    pub quotas: Option<Quotas>,
    /// Delete the cloud, with everything it holds, this many seconds from now (1 to
    /// [`MAX_CLOUD_TTL_SECS`]). Not with `expires_at`; neither: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Delete the cloud, with everything it holds, at this time (seconds since the Unix
    /// epoch, in the future). Not with `ttl_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// The longest a cloud's expiry may be set ahead: ten years.
pub const MAX_CLOUD_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// `PUT /v1/clouds/{cloud}/expiry`: when the cloud expires, from now on. One of the two, or
/// neither (`{}`): it never expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudExpiry {
    /// Seconds from now (1 to [`MAX_CLOUD_TTL_SECS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Seconds since the Unix epoch, in the future.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A cloud as stored and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Cloud {
    pub id: CloudId,
    pub name: String,
    #[schema(value_type = String, example = "10.0.0.0/16")]
    pub cidr: Ipv4Net,
    /// The gateway address guests use (first address of the range); also their DNS server.
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    pub quotas: Quotas,
    pub usage: Usage,
    /// DNS zone apex, e.g. `prod.atoll.internal.`.
    pub zone: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The cloud's network id on the overlay between hosts (VXLAN VNI, 1 to 16,777,215),
    /// unique among live clouds of the fleet. 0: none (a cloud created before the overlay;
    /// it stays on one host).
    #[serde(default)]
    pub vni: u32,
    /// When the control plane deletes the cloud with everything it holds (seconds since the
    /// Unix epoch); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Its spend budget and where the month's spend stands (`GET` of the cloud only): when
    /// `state` is `exceeded`, its egress and VMs are stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetStatus>,
    /// SHA-256 of the cloud's token, hex. Never returned by the API.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(ignore)]
    pub token_sha256: String,
}

/// `POST /v1/clouds` response: the cloud and its token, shown only this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatedCloud {
    pub cloud: Cloud,
    /// Bearer token scoped to this cloud. Store it: it cannot be read again.
    pub token: String,
}

/// `POST /v1/clouds/{cloud}/token` response: the cloud and its new token, shown only this once.
/// The token it replaces stops working at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudToken {
    pub cloud: Cloud,
    /// Bearer token scoped to this cloud. Store it: it cannot be read again. A new one
    /// replaces it.
    pub token: String,
}

/// `POST /v1/clouds/{cloud}/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Guest kernel image name (resolved by the host's VM driver).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Root image name.
    #[serde(default)]
    pub image: Option<String>,
    /// Names of volumes of this cloud to attach (at most 8).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// A script the guest runs as root once its network and volumes are up (at most 64 KiB).
    #[serde(default)]
    pub user_data: Option<String>,
    /// Boot the VM once it is placed (default); `false` creates it stopped.
    #[serde(default = "default_true")]
    pub start: bool,
    /// Anti-affinity group (a DNS label): VMs of this cloud naming the same group are never
    /// placed on one host. Creating one fails (`anti_affinity`, 409) when every live host
    /// that can take it already holds one, or when the cloud cannot span hosts.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// Stop the VM after this many seconds without a packet in or out and without a console
    /// session (1 to [`MAX_IDLE_TIMEOUT_SECS`]); its address, name and volumes stay, and
    /// starting it again is `POST …/start`. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u32>,
}

/// The longest idle timeout a VM may have: 30 days.
pub const MAX_IDLE_TIMEOUT_SECS: u32 = 30 * 24 * 3600;

impl CreateVm {
    /// A VM named `name` with the API's defaults but 64 MiB of memory (tests and benchmarks).
    pub fn named(name: &str) -> Self {
        CreateVm {
            name: name.into(),
            vcpus: default_vcpus(),
            memory_mib: 64,
            kernel: None,
            image: None,
            volumes: vec![],
            user_data: None,
            start: true,
            anti_affinity: None,
            idle_timeout_secs: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    128
}

/// Why a VM was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Its owner asked (`POST …/stop`, or created it stopped).
    Request,
    /// Its idle timeout passed without a packet in or out or a console session.
    Idle,
    /// Its cloud's spend reached the cloud's budget (it starts again when the budget is raised
    /// or lifted, or a new month begins).
    Budget,
}

/// What the VM's owner asked for: the VM running or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    #[default]
    Running,
    Stopped,
}

/// Lifecycle state of a VM as reported by its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Accepted; its host has not applied it yet.
    Pending,
    /// Its network identity is live on its host (tap, maps, DNS); no VMM runs for it (the host
    /// runs no VM driver, or the VM is not started).
    NetworkReady,
    /// Its VMM runs; the guest has not reported its network up yet.
    Booting,
    /// The guest reported its network and volumes up.
    Running,
    /// Asked to stop; the guest is shutting down.
    Stopping,
    /// Stopped on request; its network identity and volumes stay.
    Stopped,
    /// Its VMM exited without being asked to; the host restarts it (see `restarts`) until the
    /// restart budget is spent, then reports `failed`.
    Crashed,
    /// Its host failed to apply it or gave up restarting it; see `message`.
    Failed,
}

/// A VM as stored and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub cloud: CloudId,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: Option<String>,
    pub image: Option<String>,
    pub volumes: Vec<String>,
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    /// `<name>.<cloud zone>`.
    pub fqdn: String,
    pub host: String,
    pub created_at: u64,
    /// Running or stopped, as last asked (`start`/`stop`).
    #[serde(default)]
    pub power: Power,
    #[serde(default)]
    pub user_data: Option<String>,
    /// Its anti-affinity group, as created (see `CreateVm::anti_affinity`).
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// Its idle timeout, as created (see `CreateVm::idle_timeout_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u32>,
    /// Why it is stopped, when `power` is `stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_by: Option<StopReason>,
    /// Filled in from the host's reports when returned by the API.
    #[serde(default)]
    pub status: Option<VmStatus>,
    /// Whether the VM's host is live (see `HostInfo::live`). When it is not, `status` is the
    /// last the host reported and may no longer hold. Computed when read.
    #[serde(default)]
    pub host_live: bool,
}

/// What a host reports about a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    pub state: VmState,
    /// Host device (tap) name.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// Seconds since the Unix epoch.
    pub updated_at: u64,
    /// Unrequested VMM exits the host restarted it after, in the current restart window.
    #[serde(default)]
    pub restarts: u32,
    /// Milliseconds from the VMM's start to the guest reporting its network up (last boot).
    #[serde(default)]
    pub boot_ms: Option<u64>,
    /// `kvm` or `tcg`: how the VMM runs the guest.
    #[serde(default)]
    pub accel: Option<String>,
}

/// `GET /v1/clouds/{cloud}/vms/{vm}/console`: the tail of the VM's serial console as its host
/// last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Console {
    /// The last bytes of the console (at most `CONSOLE_TAIL_BYTES`), lossily UTF-8.
    pub text: String,
    /// Seconds since the Unix epoch.
    pub updated_at: u64,
}

/// The most a host reports of a VM's console.
pub const CONSOLE_TAIL_BYTES: usize = 16 * 1024;

/// The largest `user_data` accepted.
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// Volume image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeFormat {
    #[default]
    Raw,
    Qcow2,
}

/// `POST /v1/clouds/{cloud}/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size_gib: u64,
    #[serde(default)]
    pub format: VolumeFormat,
}

/// A volume: a sparse file under the cloud's directory on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    pub cloud: CloudId,
    pub name: String,
    pub size_gib: u64,
    pub format: VolumeFormat,
    pub host: String,
    /// The VM it is attached to.
    pub attached_to: Option<String>,
    pub created_at: u64,
}

/// `POST /v1/clouds/{cloud}/volumes/{volume}/attach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    pub vm: String,
}

/// DNS record type of user records.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum RecordType {
    A,
    Aaaa,
    Cname,
    Txt,
}

impl RecordType {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordType::A => "A",
            RecordType::Aaaa => "AAAA",
            RecordType::Cname => "CNAME",
            RecordType::Txt => "TXT",
        }
    }
}

/// `PUT /v1/clouds/{cloud}/dns/{name}/{type}`: a record set, replacing any existing one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutRecordSet {
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Values in their text form: addresses, a target name, or TXT strings.
    pub values: Vec<String>,
}

fn default_ttl() -> u32 {
    60
}

/// A DNS record set of a cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecordSet {
    /// Relative name within the cloud's zone (`www`, `db.internal`, `@` for the apex).
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub ttl: u32,
    pub values: Vec<String>,
    /// True for the records atoll maintains for VMs (read-only).
    #[serde(default)]
    pub automatic: bool,
}

/// Validates a record set's relative name and values.
pub fn validate_record_set(
    name: &str,
    rtype: RecordType,
    rs: &PutRecordSet,
) -> Result<(), FieldError> {
    if name.ends_with(".svc") {
        return Err(FieldError::new(
            "name",
            "names under `svc` are reserved for the services granted to this cloud \
             (<exposure>.<provider>.svc)",
        ));
    }
    validate_record_set_shape(name, rtype, rs)
}

/// [`validate_record_set`] without the names reserved for the control plane's own records
/// (a grant's `<exposure>.<provider>.svc`): what a host checks of every record it serves.
pub fn validate_record_set_shape(
    name: &str,
    rtype: RecordType,
    rs: &PutRecordSet,
) -> Result<(), FieldError> {
    if name != "@" {
        if name.len() > 190 {
            return Err(FieldError::new("name", "longer than 190 characters"));
        }
        for label in name.split('.') {
            validate_label("name", label)?;
        }
    }
    if rs.ttl == 0 || rs.ttl > 86_400 {
        return Err(FieldError::new("ttl", "must be 1 to 86400 seconds"));
    }
    if rs.values.is_empty() || rs.values.len() > 64 {
        return Err(FieldError::new("values", "must hold 1 to 64 values"));
    }
    for (i, v) in rs.values.iter().enumerate() {
        let field = format!("values[{i}]");
        match rtype {
            RecordType::A => {
                v.parse::<Ipv4Addr>().map_err(|_| {
                    FieldError::new(&field, format!("{v:?} is not an IPv4 address"))
                })?;
            }
            RecordType::Aaaa => {
                v.parse::<Ipv6Addr>().map_err(|_| {
                    FieldError::new(&field, format!("{v:?} is not an IPv6 address"))
                })?;
            }
            RecordType::Cname => {
                if rs.values.len() != 1 {
                    return Err(FieldError::new("values", "a CNAME has exactly one value"));
                }
                validate_domain_name(&field, v)?;
            }
            RecordType::Txt => {
                if v.len() > 255 {
                    return Err(FieldError::new(&field, "a TXT string is at most 255 bytes"));
                }
            }
        }
    }
    Ok(())
}

/// Transport protocol of an exposure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One backend of an exposure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub vm: String,
    pub port: u16,
}

/// `POST /v1/clouds/{cloud}/exposures`: a service this cloud offers to others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExposure {
    pub name: String,
    pub protocol: Protocol,
    /// The port consumers connect to on their VIP.
    pub port: u16,
    /// 1 to 16 backends (what the dataplane holds per exposure).
    pub backends: Vec<Backend>,
}

/// An exposure as stored and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exposure {
    pub cloud: CloudId,
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub backends: Vec<Backend>,
    /// Records written before every grant became an offer carry it; it is read and ignored
    /// (every grant now needs the consumer's consent).
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub require_acceptance: bool,
    pub created_at: u64,
}

/// `POST /v1/clouds/{cloud}/exposures/{exposure}/grants`: offer the exposure to a consumer
/// cloud. The reply is an [`Offer`], the same for a cloud id that exists and one that does not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGrant {
    pub consumer: CloudId,
}

/// State of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Only in records written before grants became offers (an exposure with
    /// `require_acceptance`): never applied by hosts; revoke it and offer again.
    Offered,
    /// Consented to, installed on the hosts that need it, and able to carry traffic.
    Active,
    /// Consented to, but no packet can pass: the provider's VMs and the consumer's run on
    /// different hosts that the overlay does not join (a host without it, or a provider without
    /// a network id). Shown in replies, never stored; `reason` says which hosts.
    Unreachable,
    /// A host failed to install it; `reason` carries the host's error. Shown in replies, never
    /// stored.
    Failed,
}

/// Where an offer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OfferState {
    /// Waiting for the consumer: nothing exists in the consumer (no VIP, no name, nothing on
    /// its hosts). An offer to a cloud id that does not exist stays pending until withdrawn.
    Pending,
    /// The consumer lists the provider in its `accept_from`: the grant is active (see the
    /// consumer's imports and the provider's grants).
    Accepted,
}

/// An exposure offered to a consumer cloud, until the consumer accepts or declines it or the
/// provider withdraws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub provider: CloudId,
    pub exposure: String,
    pub consumer: CloudId,
    pub protocol: Protocol,
    pub port: u16,
    pub state: OfferState,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// `GET`/`PUT /v1/clouds/{cloud}/offer-policy`: which providers' offers the cloud accepts
/// without being asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfferPolicy {
    /// Provider clouds whose offers become active grants at once (at most
    /// [`MAX_ACCEPT_FROM`]). Applies to offers made after it is set.
    #[serde(default)]
    pub accept_from: Vec<CloudId>,
}

/// The most providers an [`OfferPolicy`] lists.
pub const MAX_ACCEPT_FROM: usize = 256;

/// What a cloud's VMs may reach outside the cloud (`GET`/`PUT /v1/clouds/{cloud}/egress`).
///
/// Status: stored, validated and served; hosts do not enforce it yet (the egress dataplane,
/// issue 17, is not built), so today every mode behaves as `deny`, as all clouds did before.
///
/// Whatever the policy, some destinations are never reachable: the host's own addresses,
/// link-local and metadata (169.254.0.0/16), loopback, the underlay and management networks
/// and the operator's list (the control plane's `egress.always_deny`). Exposures and the cloud's
/// own addresses are not egress and are not affected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    pub mode: EgressMode,
    /// In `allowlist` mode, what is reachable (nothing else is); at most
    /// [`MAX_EGRESS_RULES`]. Must be empty in the other modes.
    #[serde(default)]
    pub allow: Vec<EgressRule>,
    /// Denied in `allow` and `allowlist` mode, before any allow rule: CIDRs only (a domain is
    /// refused: address lists are never complete, so a deny by name leaks); at most
    /// [`MAX_EGRESS_RULES`]. Must be empty in `deny` mode.
    #[serde(default)]
    pub deny: Vec<EgressRule>,
    /// How much the cloud may send out, per host (absent: unlimited).
    #[serde(default, skip_serializing_if = "EgressLimits::is_unlimited")]
    pub limits: EgressLimits,
}

impl EgressPolicy {
    /// The policy that lets nothing out.
    pub fn deny_all() -> Self {
        EgressPolicy {
            mode: EgressMode::Deny,
            allow: Vec::new(),
            deny: Vec::new(),
            limits: EgressLimits::default(),
        }
    }

    /// The same policy with domain names in lower case (DNS names compare without case).
    pub fn normalized(mut self) -> Self {
        for r in self.allow.iter_mut().chain(self.deny.iter_mut()) {
            if let Some(d) = &mut r.domain {
                *d = d.trim_end_matches('.').to_ascii_lowercase();
            }
        }
        self
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        for (list, rules) in [("allow", &self.allow), ("deny", &self.deny)] {
            if rules.len() > MAX_EGRESS_RULES {
                return Err(FieldError::new(
                    list,
                    format!(
                        "{} rules; a policy holds at most {MAX_EGRESS_RULES} per list",
                        rules.len()
                    ),
                ));
            }
            for (i, r) in rules.iter().enumerate() {
                r.validate(&format!("{list}[{i}]"))?;
            }
        }
        self.limits.validate()?;
        match self.mode {
            EgressMode::Deny if !self.allow.is_empty() || !self.deny.is_empty() => {
                Err(FieldError::new(
                    if self.allow.is_empty() { "deny" } else { "allow" },
                    "mode \"deny\" takes no rules: nothing leaves the cloud",
                ))
            }
            EgressMode::Allow if !self.allow.is_empty() => Err(FieldError::new(
                "allow",
                "mode \"allow\" takes deny rules only (everything else is allowed); use mode \"allowlist\" to list what is allowed",
            )),
            _ => match self.deny.iter().position(|r| r.domain.is_some()) {
                Some(i) => Err(FieldError::new(
                    format!("deny[{i}].domain"),
                    "deny rules take CIDRs only: address lists are never complete, so a deny by name leaks; use mode \"allowlist\" to allow names",
                )),
                None => Ok(()),
            },
        }
    }
}

/// A cloud's egress limits on each host it runs on: a rate (a token bucket in the dataplane)
/// and a byte budget per period; past the budget, egress is dropped until the next period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressLimits {
    /// Bytes per second (IP packets' lengths), at least [`MIN_EGRESS_RATE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1000)]
    pub rate_bytes_per_sec: Option<u64>,
    /// Bytes the cloud may send out per period, at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<ByteBudget>,
}

/// The lowest egress rate: one full-size packet should not take longer than about a second.
pub const MIN_EGRESS_RATE: u64 = 1000;
/// The highest egress rate a limit may name (100 Gbit/s).
pub const MAX_EGRESS_RATE: u64 = 12_500_000_000;

impl EgressLimits {
    pub fn is_unlimited(&self) -> bool {
        self.rate_bytes_per_sec.is_none() && self.budget.is_none()
    }

    fn validate(&self) -> Result<(), FieldError> {
        if let Some(r) = self.rate_bytes_per_sec {
            if !(MIN_EGRESS_RATE..=MAX_EGRESS_RATE).contains(&r) {
                return Err(FieldError::new(
                    "limits.rate_bytes_per_sec",
                    format!(
                        "{r}: a rate is {MIN_EGRESS_RATE} to {MAX_EGRESS_RATE} bytes per second"
                    ),
                ));
            }
        }
        if let Some(b) = &self.budget {
            if b.bytes == 0 {
                return Err(FieldError::new(
                    "limits.budget.bytes",
                    "a budget of 0 bytes is mode \"deny\"",
                ));
            }
        }
        Ok(())
    }
}

/// `bytes` per `period`, the period starting at its UTC boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ByteBudget {
    #[schema(minimum = 1)]
    pub bytes: u64,
    pub period: BudgetPeriod,
}

/// A budget's period: an hour, a day or a calendar month, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    Hour,
    Day,
    Month,
}

/// `GET`/`PUT`/`DELETE /v1/clouds/{cloud}/egress/address`: an address of the operator's pool
/// (`clouds.egress_pool`) that is this cloud's alone, so a third party can allow exactly this
/// cloud. Its VMs' egress leaves from it instead of their host's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressAddress {
    pub cloud: CloudId,
    #[schema(value_type = String)]
    pub address: Ipv4Addr,
}

/// Body of `PUT /v1/clouds/{cloud}/egress/address` (operator): this address of the pool, or
/// the first free one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignEgressAddress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<Ipv4Addr>,
}

/// The most rules in each list of an [`EgressPolicy`].
pub const MAX_EGRESS_RULES: usize = 1024;

/// How a cloud reaches the internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressMode {
    /// Nothing leaves the cloud.
    Deny,
    /// Everything except the `deny` rules and the always-denied destinations.
    Allow,
    /// Only what an `allow` rule names, minus the `deny` rules.
    Allowlist,
}

/// One destination of an egress policy: exactly one of `cidr` and `domain`, optionally narrowed
/// to a protocol and a port range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Net>,
    /// A name (`api.example.com`) or every name under one (`*.example.com`, not the apex
    /// itself). Enforced through the cloud's DNS: the addresses an allowed name resolves to
    /// are reachable for the answer's TTL; a name no rule allows is not resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        pattern = "^(\\*\\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
        max_length = 253
    )]
    pub domain: Option<String>,
    /// Only this protocol (default: TCP, UDP and ICMP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Only these destination ports (TCP and UDP; a rule with ports never matches ICMP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
}

impl EgressRule {
    fn validate(&self, field: &str) -> Result<(), FieldError> {
        match (&self.cidr, &self.domain) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(FieldError::new(
                    field,
                    "a rule names exactly one of cidr and domain",
                ))
            }
            (None, Some(d)) => {
                let name = d.strip_prefix("*.").unwrap_or(d);
                validate_domain_name(&format!("{field}.domain"), name)?;
                if name.contains('*') {
                    return Err(FieldError::new(
                        format!("{field}.domain"),
                        "a wildcard is a leading \"*.\" only",
                    ));
                }
            }
            (Some(_), None) => {}
        }
        if let Some(p) = &self.ports {
            if p.first == 0 || p.first > p.last {
                return Err(FieldError::new(
                    format!("{field}.ports"),
                    format!(
                        "{}-{} is not a port range: 1 <= first <= last <= 65535",
                        p.first, p.last
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The CLI's form of a rule: `<cidr or domain>[:<tcp|udp>][:<port>|<first>-<last>]`, e.g.
/// `198.18.0.0/15`, `*.pypi.org:tcp:443`, `10.9.0.0/16:udp:5000-5100`. A port needs a protocol.
impl FromStr for EgressRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let dest = parts.next().unwrap_or_default();
        let (cidr, domain) = if dest.contains('/') {
            (Some(dest.parse::<Ipv4Net>()?), None)
        } else if dest.parse::<Ipv4Addr>().is_ok() {
            (Some(format!("{dest}/32").parse::<Ipv4Net>()?), None)
        } else {
            (None, Some(dest.to_string()))
        };
        let protocol = match parts.next() {
            None => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some(p) => return Err(format!("{p:?} is not a protocol (tcp or udp)")),
        };
        let ports = match parts.next() {
            None => None,
            Some(p) => {
                let port = |v: &str| {
                    v.parse::<u16>()
                        .map_err(|_| format!("{v:?} is not a port (1-65535)"))
                };
                let (first, last) = match p.split_once('-') {
                    Some((a, b)) => (port(a)?, port(b)?),
                    None => (port(p)?, port(p)?),
                };
                Some(PortRange { first, last })
            }
        };
        if parts.next().is_some() {
            return Err(format!(
                "{s:?}: a rule is <cidr or domain>[:<tcp|udp>][:<port>|<first>-<last>]"
            ));
        }
        Ok(EgressRule {
            cidr,
            domain,
            protocol,
            ports,
        })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.cidr, &self.domain) {
            (Some(c), _) => write!(f, "{c}")?,
            (None, Some(d)) => write!(f, "{d}")?,
            (None, None) => write!(f, "?")?,
        }
        if let Some(p) = self.protocol {
            write!(f, ":{}", if p == Protocol::Tcp { "tcp" } else { "udp" })?;
        }
        match self.ports {
            Some(r) if r.first == r.last => write!(f, ":{}", r.first),
            Some(r) => write!(f, ":{}-{}", r.first, r.last),
            None => Ok(()),
        }
    }
}

/// Ports `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    #[schema(minimum = 1)]
    pub first: u16,
    #[schema(minimum = 1)]
    pub last: u16,
}

/// A grant of an exposure to a consumer cloud, seen by both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub provider: CloudId,
    pub exposure: String,
    pub consumer: CloudId,
    pub state: GrantState,
    /// The address the consumer reaches the exposure at, in the consumer's range.
    #[schema(value_type = String)]
    pub vip: Ipv4Addr,
    /// The name the consumer resolves: `<exposure>.<provider cloud id>.svc.<consumer zone>`,
    /// unique in the consumer's zone (provider names need not be unique).
    pub fqdn: String,
    /// Where the consumer's flows come from, as the provider's VMs see them: an address in
    /// the provider's range, one per grant, so the provider can tell consumers apart. With
    /// the consumer on several hosts, this is the first host's; see `host_nats`.
    #[schema(value_type = String)]
    pub nat_ipv4: Ipv4Addr,
    pub created_at: u64,
    /// The NAT address of each consumer host that has needed one (the consumer's host
    /// translates, and a backend's host sends replies back to the host the address names):
    /// the first host gets `nat_ipv4`, every other one an address of its own in the provider's
    /// range. Allocated when that host first syncs the grant; freed with the grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_nats: Vec<HostNat>,
    /// Why the grant is not `active` (`unreachable`, `failed`); computed for each reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One consumer host's NAT address of a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostNat {
    pub host: String,
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
}

/// A host's failure to install one exposure service (a grant), as the control plane keeps it
/// until the host reports it installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFailure {
    pub host: String,
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// A host (agent) registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    /// SHA-256 of the host's token, hex (empty: none issued). Never returned by the API.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(ignore)]
    pub token_sha256: String,
    /// When the host was last heard from (registration or sync), seconds since the Unix
    /// epoch; kept to within the heartbeat interval.
    #[serde(default)]
    pub last_seen: u64,
    /// Heard from within `hosts.timeout_secs`: new VMs and volumes are placed only on live
    /// hosts. Computed when read (what a record in the store says is ignored).
    #[serde(default)]
    pub live: bool,
    /// Set by the operator (`cordon`): no new VMs or volumes are placed on the host; what runs
    /// there stays. `uncordon` clears it.
    #[serde(default)]
    pub cordoned: bool,
    /// The host's address on the underlay between hosts, registered by the host itself
    /// (`PUT /v1/hosts/{host}/underlay`); none: the host runs no overlay, and a cloud with
    /// VMs there reaches no other host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub underlay: Option<Ipv4Addr>,
}

/// `PUT /v1/hosts/{host}/underlay`: the host's address on the underlay (the outer source of
/// what its overlay sends; where other hosts send to its guests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostUnderlay {
    #[schema(value_type = String)]
    pub underlay: Ipv4Addr,
}

impl HostUnderlay {
    pub fn validate(&self) -> Result<(), FieldError> {
        let a = self.underlay;
        if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
            return Err(FieldError::new(
                "underlay",
                "must be a unicast address of the host",
            ));
        }
        Ok(())
    }
}

/// `POST /v1/hosts/{host}/token` response: the host and its new token, shown only this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostToken {
    pub host: HostInfo,
    /// Bearer token scoped to this host's sync and status routes (the agent's
    /// `control.token_file`). Store it: it cannot be read again. A new one replaces it.
    pub token: String,
}

/// A VM's network identity as its host applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub cloud: CloudId,
    pub vm: String,
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    #[schema(value_type = String)]
    pub gateway: Ipv4Addr,
    /// The guest's MAC, `02:a8:` + its IPv4 address.
    pub mac: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub volumes: Vec<String>,
    /// The VM's fully qualified name (`<vm>.<zone>`, trailing dot).
    pub fqdn: String,
    /// The cloud's zone apex (trailing dot): the guest's DNS search domain.
    pub zone: String,
    pub power: Power,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub user_data: Option<String>,
    /// The VM's idle timeout: the host reports it idle (`StatusReport::idle`) after this many
    /// seconds without a packet in or out or a console session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u32>,
}

/// A volume its host must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumePlacement {
    pub cloud: CloudId,
    pub name: String,
    pub size_gib: u64,
    pub format: VolumeFormat,
    /// When the control plane created it (ms since the epoch): its storage is metered from
    /// then, and it names the volume's metering incarnation. 0 (placements of older control
    /// planes): metered from when the host first sees it.
    #[serde(default)]
    pub created_at_ms: u64,
}

/// One record of a cloud's zone as agents serve it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ZoneRecord {
    /// Fully qualified, with the trailing dot.
    pub fqdn: String,
    #[serde(rename = "type")]
    pub rtype: RecordType,
    pub ttl: u32,
    pub values: Vec<String>,
}

/// A cloud's whole zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub cloud: CloudId,
    pub apex: String,
    pub records: Vec<ZoneRecord>,
}

/// Changes of a host's desired state since a revision (`GET /v1/hosts/{host}/sync`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncDelta {
    /// Pass as `after` in the next request.
    pub revision: u64,
    /// The delta is the whole state: anything the host has that is not in it must go.
    pub full: bool,
    pub vms: Vec<Placement>,
    /// `(cloud, vm)` pairs removed from this host.
    pub removed_vms: Vec<VmRef>,
    pub volumes: Vec<VolumePlacement>,
    pub removed_volumes: Vec<VolumeRef>,
    pub zones: Vec<Zone>,
    pub removed_zones: Vec<CloudId>,
    /// For each provider cloud listed, the complete set of its active grants this host
    /// applies (empty: none any more). Providers not listed are unchanged, unless `full`.
    #[serde(default)]
    pub services: Vec<ProviderServices>,
    /// The egress policies (and own addresses) of clouds with VMs on this host: those that
    /// changed, and those of clouds whose placements here changed (so a cloud arriving gets
    /// its policy); applying one again changes nothing.
    #[serde(default)]
    pub egress: Vec<CloudEgress>,
    /// Clouds whose egress policy this host no longer holds (no VMs of theirs here any more).
    #[serde(default)]
    pub removed_egress: Vec<CloudId>,
    /// For each cloud listed, the complete set of its publications of VMs on this host
    /// (empty: none any more). Clouds not listed are unchanged, unless `full`.
    #[serde(default)]
    pub published: Vec<CloudPublications>,
    /// For each cloud listed, its network id and the complete set of its VMs on other hosts
    /// that this host's overlay routes to (vni 0 and empty: the cloud has no VMs here any
    /// more, or no network id). Clouds not listed are unchanged, unless `full`.
    #[serde(default)]
    pub remote: Vec<CloudRemotes>,
}

/// A cloud's VMs on other hosts, as one host's overlay routes to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudRemotes {
    pub cloud: CloudId,
    /// The cloud's network id (see [`Cloud::vni`]); 0: none.
    pub vni: u32,
    /// Its VMs on other hosts: all of them for a cloud with VMs here; for a provider whose
    /// consumers run here (and that has no VMs here), only its exposures' backends.
    pub endpoints: Vec<RemoteEndpoint>,
    /// For a provider with VMs here: the NAT addresses its grants have for consumer hosts
    /// other than this one (its backends here reply to them there).
    #[serde(default)]
    pub nats: Vec<RemoteNat>,
}

/// A grant's NAT address for one consumer host (see [`Grant::host_nats`]), as a provider's
/// host routes its backends' replies to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteNat {
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    pub host: String,
    /// The consumer host's underlay address.
    #[schema(value_type = String)]
    pub underlay: Ipv4Addr,
}

/// A VM on another host: where its frames go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteEndpoint {
    pub vm: String,
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    /// The guest's MAC (`02:a8:` + its IPv4 address, as in [`Placement::mac`]).
    pub mac: String,
    pub host: String,
    /// The host's underlay address.
    #[schema(value_type = String)]
    pub underlay: Ipv4Addr,
}

/// `POST /v1/clouds/{cloud}/publications`: publish a VM's TCP or UDP port on the internet, at
/// an address of the operator's pool (`clouds.ingress_pool`) and the same port number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    pub vm: String,
    pub protocol: Protocol,
    #[schema(minimum = 1)]
    pub port: u16,
    /// Sources that may connect; empty: anyone.
    #[serde(default)]
    pub allow_from: Vec<Ipv4Net>,
}

/// The most `allow_from` prefixes of one publication.
pub const MAX_ALLOW_FROM: usize = 64;

impl Publish {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_label("vm", &self.vm)?;
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1 to 65535"));
        }
        if self.allow_from.len() > MAX_ALLOW_FROM {
            return Err(FieldError::new(
                "allow_from",
                format!("at most {MAX_ALLOW_FROM} prefixes"),
            ));
        }
        Ok(())
    }

    /// The publication's name: `<vm>-<protocol>-<port>`.
    pub fn name(&self) -> String {
        publication_name(&self.vm, self.protocol, self.port)
    }
}

/// A publication's name, `<vm>-<tcp|udp>-<port>`.
pub fn publication_name(vm: &str, protocol: Protocol, port: u16) -> String {
    let p = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    format!("{vm}-{p}-{port}")
}

/// A VM port published on the internet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Publication {
    pub cloud: CloudId,
    /// `<vm>-<protocol>-<port>`: what `DELETE` names.
    pub name: String,
    pub vm: String,
    pub protocol: Protocol,
    pub port: u16,
    pub allow_from: Vec<Ipv4Net>,
    /// Where the internet reaches it: this address, the same port.
    #[schema(value_type = String)]
    pub address: Ipv4Addr,
    /// The VM's address in its cloud.
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
}

/// The complete publications of a cloud whose VMs run on the host receiving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudPublications {
    pub cloud: CloudId,
    pub publications: Vec<Publication>,
}

/// A cloud's egress policy, as its hosts receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudEgress {
    pub cloud: CloudId,
    pub policy: EgressPolicy,
    /// The cloud's own egress address, if the operator gave it one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<Ipv4Addr>,
    /// The cloud's address range: destinations inside it never leave the host as egress. A
    /// host that is not told (a control plane older than this field) lets nothing of the cloud
    /// out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Ipv4Net>,
}

// What a host checks again of what it receives (see the module's decisions): it never builds
// a path, a config drive or a DNS owner from a name the API would have refused.

impl Placement {
    /// Checks every name a host builds something from: the VM's (runtime and state
    /// directories, the VMM's name), its volumes' (files, mount points in the guest), its
    /// kernel's and image's (files under the host's images directory), its zone (under
    /// `dns_suffix` when the host knows it) and its fqdn (`<vm>.<zone>`), and its MAC (the
    /// guest MAC of its address).
    pub fn validate(&self, dns_suffix: Option<&str>) -> Result<(), FieldError> {
        validate_label("vm", &self.vm)?;
        for (i, v) in self.volumes.iter().enumerate() {
            validate_label(&format!("volumes[{i}]"), v)?;
        }
        for (field, v) in [("kernel", &self.kernel), ("image", &self.image)] {
            if let Some(v) = v {
                validate_label(field, v)?;
            }
        }
        match dns_suffix {
            Some(suffix) => validate_zone_apex("zone", &self.zone, suffix)?,
            None => validate_domain_name("zone", &self.zone)?,
        }
        if !self.zone.ends_with('.') {
            return Err(FieldError::new("zone", "must end with '.'"));
        }
        if self
            .idle_timeout_secs
            .is_some_and(|t| !(1..=MAX_IDLE_TIMEOUT_SECS).contains(&t))
        {
            return Err(FieldError::new(
                "idle_timeout_secs",
                format!("must be 1 to {MAX_IDLE_TIMEOUT_SECS}"),
            ));
        }
        if self.fqdn != format!("{}.{}", self.vm, self.zone) {
            return Err(FieldError::new(
                "fqdn",
                format!("{:?} is not {}.{}", self.fqdn, self.vm, self.zone),
            ));
        }
        if self.mac != guest_mac(self.ipv4) {
            return Err(FieldError::new(
                "mac",
                format!("{:?} is not the guest MAC of {}", self.mac, self.ipv4),
            ));
        }
        Ok(())
    }
}

impl VolumePlacement {
    /// Checks the volume's name (its file's name on the host).
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_label("name", &self.name)
    }
}

impl VolumeRef {
    /// Checks the volume's name (its file's name on the host).
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_label("name", &self.name)
    }
}

impl VmRef {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_label("vm", &self.vm)
    }
}

impl Zone {
    /// Checks the apex: directly under `dns_suffix` when the host knows it, else a domain
    /// name. Its records are checked one by one ([`ZoneRecord::validate`]).
    pub fn validate_apex(&self, dns_suffix: Option<&str>) -> Result<(), FieldError> {
        match dns_suffix {
            Some(suffix) => validate_zone_apex("apex", &self.apex, suffix),
            None if self.apex.ends_with('.') => validate_domain_name("apex", &self.apex),
            None => Err(FieldError::new("apex", "must end with '.'")),
        }
    }
}

impl ZoneRecord {
    /// Checks a record of the zone at `apex` as a record set of the cloud is checked
    /// ([`validate_record_set`]), its owner at or under the apex, within DNS's length.
    pub fn validate(&self, apex: &str) -> Result<(), FieldError> {
        let name = if self.fqdn == apex {
            "@"
        } else {
            self.fqdn
                .strip_suffix(apex)
                .and_then(|n| n.strip_suffix('.'))
                .ok_or_else(|| {
                    FieldError::new("fqdn", format!("{:?} is not under {apex}", self.fqdn))
                })?
        };
        validate_domain_name("fqdn", &self.fqdn)?;
        let set = PutRecordSet {
            ttl: self.ttl,
            values: self.values.clone(),
        };
        validate_record_set_shape(name, self.rtype, &set)
    }
}

/// The active grants of one provider cloud, as a host's dataplane applies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderServices {
    pub provider: CloudId,
    pub services: Vec<Service>,
}

/// One active grant, resolved: the consumer's VIP, the provider's NAT address and the
/// backends' addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub consumer: CloudId,
    #[schema(value_type = String)]
    pub vip: Ipv4Addr,
    #[schema(value_type = String)]
    pub nat_ipv4: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
    /// Backends whose VM exists, in the exposure's order.
    pub backends: Vec<ServiceBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceBackend {
    #[schema(value_type = String)]
    pub ipv4: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    pub cloud: CloudId,
    pub vm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    pub cloud: CloudId,
    pub name: String,
}

/// `POST /v1/hosts/{host}/status`: what the host applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub vms: Vec<VmReport>,
    /// Exposure services whose installation changed: failed, or installed after a failure.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceReport>,
    /// Each listed cloud's recent denied destinations on this host, complete (it replaces
    /// what the host reported of the cloud before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<DeniedReport>,
    /// Running VMs of this host with an idle timeout that passed it: the control plane stops
    /// them (`stopped_by: idle`). Ignored for a VM of another host, without an idle timeout,
    /// or not running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub idle: Vec<VmRef>,
}

/// A host's recent denied destinations of one cloud (at most [`MAX_DENIED_PER_HOST`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeniedReport {
    pub cloud: CloudId,
    pub entries: Vec<DeniedDestination>,
}

/// The most denied destinations a host keeps and reports per cloud (the least recent go).
pub const MAX_DENIED_PER_HOST: usize = 64;

/// Something a cloud's VMs tried to reach and were refused, and how often
/// (`GET /v1/clouds/{cloud}/egress/denied`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeniedDestination {
    /// The name asked for, when the refusal was of a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 253)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    pub reason: DenyReason,
    pub count: u64,
    /// Seconds since the Unix epoch.
    pub last_seen: u64,
    /// The host that refused it (set by the control plane).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The cloud's egress policy does not allow the name (its DNS question was not
    /// forwarded).
    NameNotAllowed,
    /// The cloud's egress policy does not allow the address, protocol or port (mode `deny`,
    /// a deny rule, not on the allowlist, or a learnt address whose answer expired).
    AddressNotAllowed,
    /// A flow the cloud's changed policy no longer allows was cut.
    FlowRevoked,
    /// An address no cloud may reach: the host's own, its networks, link-local and
    /// metadata, loopback, or the operator's list.
    AlwaysDenied,
    /// The cloud's egress byte budget for the period on this host is spent.
    BudgetSpent,
}

impl DeniedReport {
    /// What a control plane accepts from a host: bounded, names DNS-sized.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.entries.len() > MAX_DENIED_PER_HOST {
            return Err(FieldError::new(
                "denied.entries",
                format!("at most {MAX_DENIED_PER_HOST} per cloud"),
            ));
        }
        if self.entries.iter().any(|e| {
            e.name
                .as_ref()
                .is_some_and(|n| n.len() > MAX_DNS_NAME_LEN + 1)
        }) {
            return Err(FieldError::new(
                "denied.entries.name",
                "longer than a DNS name",
            ));
        }
        Ok(())
    }
}

/// A host's word on one exposure service (a grant, named by its provider, consumer and VIP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceReport {
    pub provider: CloudId,
    pub consumer: CloudId,
    #[schema(value_type = String)]
    pub vip: Ipv4Addr,
    /// Why the host could not install it; `None`: installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    pub cloud: CloudId,
    pub vm: String,
    pub status: VmStatus,
    /// The tail of the console (at most `CONSOLE_TAIL_BYTES`), when it changed since the last
    /// report of this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_field`, `not_found`, `quota_exceeded`.
    pub code: String,
    pub message: String,
    /// The offending request field, when there is one (`quotas.vcpus`, `values[1]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// On a 500: the id under which the control plane logged what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The MAC atoll gives a guest: `02:a8:` + its IPv4 address (unique within a cloud, and guests
/// never share an L2 segment).
pub fn guest_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:a8:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_check_names_with_the_api_rules() {
        let suffix = "atoll.internal.";
        assert!(validate_zone_apex("apex", "prod.atoll.internal.", suffix).is_ok());
        assert_eq!(zone_apex("prod", "atoll.internal"), "prod.atoll.internal.");
        for bad in [
            "atoll.internal.",
            "a.b.atoll.internal.",
            "prod.atoll.internal",
            "evil.example.",
            "-x.atoll.internal.",
            "prodatoll.internal.",
        ] {
            assert!(validate_zone_apex("apex", bad, suffix).is_err(), "{bad}");
        }
        let ipv4 = Ipv4Addr::new(10, 0, 0, 2);
        let p = Placement {
            cloud: CloudId::new(1).unwrap(),
            vm: "web".into(),
            ipv4,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            mac: guest_mac(ipv4),
            vcpus: 1,
            memory_mib: 64,
            volumes: vec!["data".into()],
            fqdn: "web.prod.atoll.internal.".into(),
            zone: "prod.atoll.internal.".into(),
            power: Power::Running,
            kernel: Some("vmlinux".into()),
            image: None,
            user_data: None,
            idle_timeout_secs: Some(600),
        };
        assert_eq!(p.validate(Some(suffix)), Ok(()));
        assert_eq!(p.validate(None), Ok(()));
        let field = |f: &dyn Fn(&mut Placement)| {
            let mut q = p.clone();
            f(&mut q);
            q.validate(Some(suffix)).unwrap_err().field
        };
        assert_eq!(field(&|q| q.vm = "../x".into()), "vm");
        assert_eq!(
            field(&|q| q.kernel = Some("../../etc/shadow".into())),
            "kernel"
        );
        assert_eq!(field(&|q| q.image = Some("..".into())), "image");
        assert_eq!(
            field(&|q| q.idle_timeout_secs = Some(0)),
            "idle_timeout_secs"
        );
        assert_eq!(field(&|q| q.volumes = vec!["a\0".into()]), "volumes[0]");
        assert_eq!(
            field(&|q| q.fqdn = "other.prod.atoll.internal.".into()),
            "fqdn"
        );
        assert_eq!(field(&|q| q.mac = "02:a8:0a:00:00:09".into()), "mac");
        let rec = |fqdn: &str| ZoneRecord {
            fqdn: fqdn.into(),
            rtype: RecordType::A,
            ttl: 30,
            values: vec!["10.0.0.2".into()],
        };
        let apex = "prod.atoll.internal.";
        assert!(rec("web.prod.atoll.internal.").validate(apex).is_ok());
        assert!(rec("prod.atoll.internal.").validate(apex).is_ok());
        assert!(rec("a.b.svc.prod.atoll.internal.").validate(apex).is_ok());
        for bad in [
            "x.evil.example.",
            "xprod.atoll.internal.",
            "under_score.prod.atoll.internal.",
            "a..prod.atoll.internal.",
        ] {
            assert!(rec(bad).validate(apex).is_err(), "{bad}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exec and files (the guest agent; docs/design.md, MicroVMs, "Exec and files")

/// The most arguments of one exec, and the most bytes of its argv, environment and directory.
pub const MAX_EXEC_ARGS: usize = 1024;
pub const MAX_EXEC_SPEC_BYTES: usize = 64 * 1024;
/// The most stdin an exec request carries (it is part of the JSON body).
pub const MAX_EXEC_STDIN_BYTES: usize = 512 * 1024;
/// Output kept per stream when the request names no cap, and the largest cap it may name.
pub const DEFAULT_EXEC_OUTPUT_BYTES: u64 = 1 << 20;
pub const MAX_EXEC_OUTPUT_BYTES: u64 = 64 << 20;
/// An exec's timeout when the request names none, and the longest it may name.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u32 = 600;
pub const MAX_EXEC_TIMEOUT_SECS: u32 = 86_400;
/// The largest file uploaded or downloaded in one request.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// `POST /v1/clouds/{cloud}/vms/{vm}/exec`: a command to run in a running VM. The reply is a
/// stream of [`ExecEvent`]s, one JSON object per line (`application/x-ndjson`), ending with
/// `exit` or `error`; closing the connection kills the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecVm {
    /// The program and its arguments; a program without `/` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment variables (`PATH` and `HOME` default to the guest's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The working directory (default `/root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Standard input, base64 (at most 512 KiB decoded); without it (and without
    /// `stdin_stream`), stdin is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Keep stdin open for a stream: the `started` event names the exec (`exec_id`), and one
    /// `POST …/execs/{exec}/stdin` sends its stdin as it comes; the end of that request's body
    /// closes it. Not with `stdin_base64`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin_stream: bool,
    /// Seconds until the command is killed (default 600, at most 86400); the stream then
    /// ends with `exit` and `timed_out: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// Bytes of stdout, and separately of stderr, passed on (default 1 MiB, at most 64 MiB);
    /// past it the stream says `truncated` once for that stream and the rest is discarded
    /// while the command runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

impl ExecVm {
    /// A command with the defaults.
    pub fn argv<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecVm {
            argv: argv.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            stdin_base64: None,
            stdin_stream: false,
            timeout_secs: None,
            max_output_bytes: None,
        }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(FieldError::new("argv", "must name a program"));
        }
        if self.argv.len() > MAX_EXEC_ARGS {
            return Err(FieldError::new(
                "argv",
                format!("at most {MAX_EXEC_ARGS} arguments"),
            ));
        }
        let nul = |s: &str| s.contains('\0');
        if self.argv.iter().any(|a| nul(a)) {
            return Err(FieldError::new("argv", "must not contain NUL bytes"));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || nul(k) || nul(v) {
                return Err(FieldError::new(
                    format!("env.{k}"),
                    "names are non-empty without `=`; names and values without NUL",
                ));
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || nul(cwd) {
                return Err(FieldError::new("cwd", "must be an absolute path"));
            }
        }
        let size: usize = self.argv.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.cwd.as_ref().map_or(0, String::len);
        if size > MAX_EXEC_SPEC_BYTES {
            return Err(FieldError::new(
                "argv",
                format!("argv, env and cwd together are over {MAX_EXEC_SPEC_BYTES} bytes"),
            ));
        }
        if let Some(t) = self.timeout_secs {
            if t == 0 || t > MAX_EXEC_TIMEOUT_SECS {
                return Err(FieldError::new(
                    "timeout_secs",
                    format!("must be 1 to {MAX_EXEC_TIMEOUT_SECS}"),
                ));
            }
        }
        if let Some(m) = self.max_output_bytes {
            if m > MAX_EXEC_OUTPUT_BYTES {
                return Err(FieldError::new(
                    "max_output_bytes",
                    format!("at most {MAX_EXEC_OUTPUT_BYTES}"),
                ));
            }
        }
        if self.stdin_stream && self.stdin_base64.is_some() {
            return Err(FieldError::new(
                "stdin_stream",
                "stdin comes either with the request (stdin_base64) or as a stream, not both",
            ));
        }
        if let Some(s) = &self.stdin_base64 {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(b) if b.len() <= MAX_EXEC_STDIN_BYTES => {}
                Ok(_) => {
                    return Err(FieldError::new(
                        "stdin_base64",
                        format!("at most {MAX_EXEC_STDIN_BYTES} bytes decoded"),
                    ))
                }
                Err(e) => return Err(FieldError::new("stdin_base64", format!("not base64: {e}"))),
            }
        }
        Ok(())
    }
}

/// One line of an exec's reply stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecEvent {
    /// The command started as process `pid` in the guest; `exec_id` names it for its stdin
    /// stream (with `stdin_stream`).
    Started {
        pid: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exec_id: Option<String>,
    },
    /// Output, base64 (chunks may split characters).
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The stream's output passed `max_output_bytes`; the rest of it is discarded.
    Truncated {
        stream: String,
        limit: u64,
    },
    /// The end: the command exited with `code`, or was killed by `signal`; `timed_out` if
    /// atoll killed it at its timeout.
    Exit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
    },
    /// The end: the command could not run or its channel failed.
    Error {
        message: String,
    },
}

/// `PUT /v1/hosts/{host}/guest-access`: where control planes reach this host's guest agents
/// (exec and files): an HTTPS URL whose certificate has this SHA-256 fingerprint, and the
/// bearer secret it requires. Registered by the host at start; never returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestAccess {
    pub url: String,
    pub fingerprint: String,
    pub secret: String,
}

impl GuestAccess {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.url.starts_with("https://") || self.url.len() > 256 {
            return Err(FieldError::new(
                "url",
                "must be an https:// URL (at most 256 bytes)",
            ));
        }
        let hex = self.fingerprint.chars().filter(|c| *c != ':').count();
        if hex != 64
            || !self
                .fingerprint
                .chars()
                .all(|c| c == ':' || c.is_ascii_hexdigit())
        {
            return Err(FieldError::new(
                "fingerprint",
                "must be a SHA-256 (64 hex digits)",
            ));
        }
        if !(32..=128).contains(&self.secret.len())
            || !self.secret.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(FieldError::new(
                "secret",
                "must be 32-128 letters and digits",
            ));
        }
        Ok(())
    }
}

/// Where a VM's guest agent is reached: the host's [`GuestAccess`] and the VM (the control
/// plane's answer to an exec or file command, which its HTTP layer forwards; never rendered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTarget {
    pub host: String,
    pub access: GuestAccess,
    pub cloud: CloudId,
    pub vm: String,
}

/// A file's path and, for an upload, its mode and owner (`…/files` query parameters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

impl FileSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.path.starts_with('/') || self.path.contains('\0') || self.path.len() > 4096 {
            return Err(FieldError::new(
                "path",
                "must be an absolute path (at most 4096 bytes)",
            ));
        }
        if self.path.ends_with('/') {
            return Err(FieldError::new("path", "must name a file, not a directory"));
        }
        if self.mode.is_some_and(|m| m > 0o7777) {
            return Err(FieldError::new("mode", "must be at most 07777"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Usage through the control plane (issue 20, first part: network quantities)

/// The most records one ingest carries.
pub const MAX_USAGE_BATCH: usize = 256;

/// `POST /v1/hosts/{host}/usage`: journaled usage records a host delivers (at least once; the
/// control plane keeps each id once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    pub records: Vec<crate::usage::UsageEvent>,
    /// The host has delivered every record whose window ended by this time (ms since the
    /// epoch) with this batch: its journal up to its last collection. Sent with an empty batch
    /// each interval, so the control plane knows how complete each cloud's usage is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_to_ms: Option<u64>,
}

impl UsageBatch {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.records.len() > MAX_USAGE_BATCH {
            return Err(FieldError::new(
                "records",
                format!("at most {MAX_USAGE_BATCH} records per batch"),
            ));
        }
        for (i, r) in self.records.iter().enumerate() {
            let ok_id = !r.id.is_empty()
                && r.id.len() <= 200
                && r.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok_id {
                return Err(FieldError::new(
                    format!("records[{i}].id"),
                    "1-200 letters, digits, '-', '_', '.'",
                ));
            }
            if r.ty != crate::usage::EVENT_TYPE {
                return Err(FieldError::new(
                    format!("records[{i}].type"),
                    format!("must be {}", crate::usage::EVENT_TYPE),
                ));
            }
            if r.data.end_unix_ms < r.data.start_unix_ms || r.data.cloud == 0 {
                return Err(FieldError::new(
                    format!("records[{i}].data"),
                    "a window that ends before it starts, or cloud 0",
                ));
            }
            if r.data.usage.traffic.len() > 64 || r.data.usage.drops.len() > 128 {
                return Err(FieldError::new(
                    format!("records[{i}].data.usage"),
                    "more traffic or drop entries than exist",
                ));
            }
            // Time-based quantities are size times window, never more (a host cannot bill a
            // VM for more than it ran); a network record carries none.
            let ms = u128::from(r.data.end_unix_ms - r.data.start_unix_ms);
            let u = &r.data.usage;
            let (vcpus, mib, gib) = match &r.data.resource {
                None => (0, 0, 0),
                Some(crate::usage::Resource::Vm {
                    vcpus, memory_mib, ..
                }) => (u128::from(*vcpus), u128::from(*memory_mib), 0),
                Some(crate::usage::Resource::Volume { size_gib, .. }) => {
                    (0, 0, u128::from(*size_gib))
                }
            };
            if u128::from(u.vcpu_ms) > vcpus * ms
                || u128::from(u.memory_mib_ms) > mib * ms
                || u128::from(u.volume_gib_ms) > gib * ms
                || (r.data.resource.is_some() && !u.traffic.is_empty())
            {
                return Err(FieldError::new(
                    format!("records[{i}].data.usage"),
                    "more vCPU, memory or volume time than the resource's size times the \
                     window, or traffic in a compute or storage record",
                ));
            }
        }
        Ok(())
    }
}

/// What an ingest kept: new records, and those it had already (by id) or refused (a cloud the
/// host does not run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageIngested {
    pub accepted: u32,
    pub duplicates: u32,
    pub refused: u32,
}

/// `GET /v1/clouds/{cloud}/usage?from=&to=`: a cloud's metered quantities and their cost in
/// the hours `[from, to)` (seconds since the Unix epoch, widened to whole hours: usage is kept
/// per cloud and hour, each record in the hour its window ended), as its hosts delivered them
/// so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudUsage {
    pub cloud: CloudId,
    pub from: u64,
    pub to: u64,
    /// Every host that runs (or ran, until the cloud's delete) the cloud's VMs and volumes
    /// delivered its records up to this time (seconds since the epoch); later usage may still
    /// arrive.
    pub complete_to: u64,
    /// Records summed.
    pub records: u64,
    /// ISO 4217 code of the costs.
    pub currency: String,
    /// Each metered SKU, with its quantity and cost (non-zero quantities only).
    pub items: Vec<UsageItem>,
    /// The sum of the items' costs, in 10^-9 of the currency.
    pub cost_nanos: u64,
    /// The same, as a decimal (`"0.012345678"`).
    pub cost: String,
    /// Network bytes and packets per direction and class (non-zero only).
    pub traffic: Vec<crate::usage::Traffic>,
    /// The cloud's budget and where its spend stands, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetStatus>,
}

/// One priced quantity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageItem {
    /// `compute-vcpu`, `compute-memory`, `storage-volume` or
    /// `network-<direction>-<class>`.
    pub sku: String,
    /// `compute`, `storage` or `network`.
    pub category: String,
    /// The metered quantity in `unit`, exact.
    pub quantity: u64,
    /// `vcpu_ms`, `mib_ms`, `gib_ms` or `bytes`.
    pub unit: String,
    /// The quantity in `pricing_unit`.
    pub pricing_quantity: f64,
    /// `vCPU-Hours`, `GiB-Hours` (memory), `GiB-Months` (volumes; a month is 730 hours) or
    /// `GB` (10^9 bytes): FOCUS's unit format.
    pub pricing_unit: String,
    /// Price per pricing unit.
    pub unit_price: f64,
    /// In 10^-9 of the currency: the sum over hours of each hour's quantity times the price,
    /// rounded down.
    pub cost_nanos: u64,
    /// The same, as a decimal.
    pub cost: String,
}

/// A cloud's spend budget (`PUT /v1/clouds/{cloud}/budget`, operator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The spend allowed per calendar month (UTC), in the price list's currency.
    pub amount: f64,
    /// Percent of `amount` past which a warning is recorded (default 80).
    #[serde(default = "default_budget_warn")]
    pub warn_percent: u32,
}

fn default_budget_warn() -> u32 {
    80
}

impl Budget {
    pub fn validate(&self) -> Result<(), FieldError> {
        if !self.amount.is_finite() || !(0.0..=1e9).contains(&self.amount) {
            return Err(FieldError::new("amount", "0 to 10^9, finite"));
        }
        if !(1..=100).contains(&self.warn_percent) {
            return Err(FieldError::new("warn_percent", "1 to 100"));
        }
        Ok(())
    }

    /// The amount in 10^-9 of the currency.
    pub fn amount_nanos(&self) -> u64 {
        (self.amount * 1e9).round() as u64
    }
}

/// Where a cloud's spend stands against its budget this month (as of the last usage its
/// hosts delivered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetStatus {
    pub budget: Budget,
    /// Start of the month (seconds since the epoch).
    pub period_start: u64,
    /// Spent this month, in 10^-9 of the currency.
    pub spent_nanos: u64,
    pub state: BudgetState,
    /// What happened, latest last (at most 16): each change of state.
    #[serde(default)]
    pub events: Vec<BudgetEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetState {
    /// Below the warning threshold.
    #[default]
    Ok,
    /// Past `warn_percent`.
    Warning,
    /// At or past the amount: egress stopped, VMs stopped.
    Exceeded,
}

/// A change of a budget's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetEvent {
    /// Seconds since the epoch.
    pub at: u64,
    pub state: BudgetState,
    pub spent_nanos: u64,
}

/// `GET /v1/usage?from=&to=`: every cloud's usage (the operator's view), with the hours
/// widened as for a cloud's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetUsage {
    pub from: u64,
    pub to: u64,
    /// Every live host delivered its records up to this time.
    pub complete_to: u64,
    pub currency: String,
    /// Clouds with usage in the period, by id.
    pub clouds: Vec<CloudCost>,
    pub cost_nanos: u64,
    pub cost: String,
}

/// One cloud's line in [`FleetUsage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudCost {
    pub cloud: CloudId,
    pub records: u64,
    pub items: Vec<UsageItem>,
    pub cost_nanos: u64,
    pub cost: String,
}

/// `nanos` (10^-9 of a currency unit) as an exact decimal with nine places.
pub fn nanos_decimal(nanos: u64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}
