//! The control plane's core: typed commands in, typed replies out, state in the [`Store`].
//!
//! The HTTP layer ([`crate::api`]) parses requests into a [`Command`] and never touches the
//! store; the core never sees HTTP types.
//!
//! Decisions:
//! - **Every create is one store transaction.** A VM's record, its address (IPAM entry), its
//!   host placement, its volumes' attachment and the cloud's quota usage are written together,
//!   guarded by compares (`Absent` for new keys, `ModRevision` on the cloud record). A failed
//!   create leaves nothing; a lost race is retried from fresh reads. DNS needs no extra write:
//!   zones are derived from the VMs and record sets when served.
//! - **Quota usage lives in the cloud record**, so the compare on the cloud's revision makes the
//!   check-and-update atomic per cloud without locks (and across control planes on etcd).
//! - **IPAM** keeps one key per allocated address (`c/<cloud>/ip/<addr>`); the lowest free
//!   address is allocated and the `Absent` compare makes a double allocation impossible.
//!   Network and broadcast addresses are never allocated; the first host address is the
//!   gateway. Addresses are released in the transaction that deletes their owner.
//! - **Host liveness**: a host's syncs are its heartbeat (its record's `last_seen`, rewritten at
//!   most every [`HEARTBEAT_SECS`]); only hosts heard from within `hosts.timeout_secs` are
//!   placed on. Placed VMs never move by themselves (docs/design.md, Host liveness).
//! - **Placement**: a VM goes to the host of its volumes, else to the live host already holding
//!   most of its cloud (traffic between hosts is not carried yet, so a cloud stays together),
//!   else to the live host with the fewest VMs. Its placement record (`h/<host>/vms/<cloud>/<vm>`) is what the host applies.
//! - **Agents converge by changes**: [`Core::sync`] long-polls for the store events relevant to
//!   one host (its placements, and the zones of clouds it has VMs of) after a revision and
//!   returns them as a [`SyncDelta`]; a host that is too far behind, or new, gets the full state.
//!   Events come from one store watch ([`Feed`]), kept in a bounded in-memory ring.
//! - **Deletes that reach into other clouds are planned within the store's transaction
//!   limit.** Deleting a cloud or an exposure also revokes the grants it gave (the consumers'
//!   imports and VIP addresses) and, for a cloud, the grants it received (the providers' grant
//!   records), so its transaction grows with the grants, while etcd bounds a transaction
//!   ([`Store::max_txn_ops`]: `store.etcd_max_txn_ops`, etcd's `--max-txn-ops`, 128 by default;
//!   a cloud with an exposure granted to 70 clouds could not be deleted). When everything fits,
//!   the delete is one transaction. When it does not, the core first revokes those grants in
//!   transactions of at most the limit (each one exactly what revoking the grants does, which
//!   the delete implies anyway), then re-reads and deletes the resource's own keys in one final
//!   transaction, still guarded by the resource's revision; grants that appeared meanwhile are
//!   revoked the same way first (a lost race is retried from fresh reads, bounded). Atomicity is
//!   thus kept for the resource's own state, not across clouds: a delete that fails after some
//!   revocations (a store error, too much contention) leaves those grants revoked and the
//!   resource in place, which is acceptable because the caller asked for them to go; retrying
//!   the delete finishes it. Every revocation is guarded by the revision of the grant (or of
//!   the consumer's copy of it) as it was read, so a VIP address that a consumer released and
//!   reused meanwhile is never freed. What cannot be removed ahead without breaking the resource (a cloud's placements on
//!   more hosts than the limit holds) is refused before anything is revoked, with
//!   [`CoreError::TxnTooLarge`] naming the limit and the setting.
//! - **A grant writes both cloud records back** (unchanged) and compares them. A grant spans
//!   two clouds, and a cloud delete is guarded only by its own record's revision: without the
//!   write, a grant committed between a delete's reads and its transaction left its other half
//!   (the consumer's import and VIP address, or the provider's grant and NAT address) behind for
//!   good. With it the delete's compare fails and it re-reads, revoking the new grant too; a
//!   grant that loses to the delete re-reads and finds the cloud gone. The cost is that grants
//!   contend on their clouds' records like VM creates do (retried, bounded).
//! - **Grants are offers until the consumer consents.** Creating a grant writes an [`Offer`]:
//!   the provider's record and the consumer's copy under `offers/<consumer>/`, outside the
//!   consumer's own keys, and never reads the consumer's cloud record, so nothing is allocated
//!   in or visible to the consumer (no VIP, import, name or host sync) and the reply and errors
//!   are the same for a cloud id that does not exist. Accepting (or an [`OfferPolicy`] listing
//!   the provider) activates it: the grant's transaction deletes the offer, guarded by its
//!   revision. Pending offers per consumer id are bounded per provider and in all
//!   ([`CoreError::OfferRefused`], one wording for both), and count as grants of their
//!   exposure, so a provider's records stay bounded whatever ids it offers to. A deleted
//!   consumer's copies go; the providers' records stay pending, like offers to an unknown id,
//!   so a provider never learns of the delete. Offers and grants write the exposure record
//!   back (unchanged) as well as the cloud records, so an exposure delete that read them
//!   before re-reads instead of leaving an offer's or grant's other half behind. A grant's
//!   name carries the provider's id, unique where provider names are not.
//! - **Every other transaction has a fixed size**, at most 14 compares or ops (a VM delete with
//!   [`MAX_VOLUMES_PER_VM`] volumes), within [`MIN_STORE_TXN_OPS`], the smallest limit the
//!   configuration accepts.
//! - **Power is desired state, status is reported state.** `start`/`stop` set the VM's `power`
//!   and rewrite its placement in one transaction guarded by the VM's revision; the host sees
//!   the placement change in its sync like any other and reports the state it reaches
//!   (`booting`, `running`, `stopped`, ...). Asking for the power a VM already has is a no-op.
//! - **Console tails are pushed by hosts in their status reports**, only when they changed,
//!   capped at [`CONSOLE_TAIL_BYTES`] (16 KiB; a longer tail is cut to its last bytes on a
//!   character boundary, not refused), and stored beside the status key
//!   (`c/<cloud>/vmconsole/<vm>`, in the report's transaction, guarded by the placement like
//!   the status) and outside the host feed. Reasons: pushing works for remote hosts that accept
//!   no inbound connections, and the store holds a bounded amount per VM. `GET .../console`
//!   reads the stored tail; a VM whose host has reported none has an empty one.
//! - **What hosts cannot hold is refused at the request**, never accepted and then silently
//!   not installed: an exposure holds at most [`MAX_BACKENDS`] backends (the dataplane's
//!   constant, not a copy of it); a record set's name with its zone fits DNS's
//!   [`MAX_DNS_NAME_LEN`], and so does every name atoll derives (`clouds.dns_suffix` is at
//!   most [`MAX_DNS_SUFFIX_LEN`]); a VM cannot take a name that holds a CNAME, nor a record set
//!   a VM's name (both guarded by compares in the writing transaction). A host's DNS server
//!   refuses a zone it cannot hold as a whole, and with it every later change of the zone.
//!   Limits a host sets for itself (`dataplane.max_vips`, `max_endpoints`) are not known here.
//! - **Authorization** happens before any store read: a cloud token only ever names its own
//!   cloud, so a request for another cloud is refused (403) without looking at it; the operator
//!   token administers everything. Tokens are 256-bit random secrets, stored as SHA-256 hashes
//!   (a slow hash adds nothing for secrets of that entropy).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{
    model::*,
    store::{Compare, EventKind, Op, Store, StoreError, Txn, TxnOutcome},
};

/// How often a create is retried after losing a compare to a concurrent writer.
const MAX_RETRIES: usize = 32;
/// Store events kept for agents that are behind; older ones get the full state.
const FEED_CAPACITY: usize = 65_536;
/// The most volumes one VM may hold, so that VM transactions have a bounded size.
pub const MAX_VOLUMES_PER_VM: usize = 8;
/// Defined with the other naming rules in [`crate::model`], which hosts check again.
pub use crate::model::MAX_DNS_NAME_LEN;
/// Backends per exposure: what the dataplane's `VIPS` entry holds (defined once, in
/// `atoll-dataplane-common`).
pub use atoll_dataplane_common::MAX_BACKENDS;
/// The longest `clouds.dns_suffix`: the longest name atoll derives itself, a grant's
/// `<exposure>.<provider>.svc.<consumer>.<suffix>` with three 63-character labels, fits
/// [`MAX_DNS_NAME_LEN`].
pub const MAX_DNS_SUFFIX_LEN: usize = MAX_DNS_NAME_LEN - (3 * 63 + ".svc...".len());
const _: () = assert!(MAX_DNS_SUFFIX_LEN == 57);
/// The smallest store transaction limit the core works with: its largest fixed-size
/// transactions fit (a VM create with [`MAX_VOLUMES_PER_VM`] volumes: 12 ops and 12 compares;
/// a VM delete: 14 ops, its volumes' puts and the cloud, VM, status, console, address and
/// placement keys).
pub const MIN_STORE_TXN_OPS: usize = 16;
const _: () = assert!(MAX_VOLUMES_PER_VM + 6 <= MIN_STORE_TXN_OPS);

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("missing or malformed bearer token")]
    Unauthenticated,
    #[error("this token may not {0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("quota exceeded: {field} would be {wanted}, limit {limit}")]
    QuotaExceeded {
        field: &'static str,
        wanted: u64,
        limit: u64,
    },
    #[error("no live host to place this on (registered hosts are cordoned or have not synced within hosts.timeout_secs)")]
    NoHost,
    #[error("too much contention on {0}; retry")]
    Contention(String),
    #[error(
        "{what} needs one store transaction of {size} operations, over the store's limit of \
         {limit} (store.etcd_max_txn_ops, which must match etcd's --max-txn-ops): {hint}"
    )]
    TxnTooLarge {
        what: String,
        size: usize,
        limit: usize,
        hint: String,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("stored record {key} is corrupt: {source}")]
    CorruptRecord {
        key: String,
        source: serde_json::Error,
    },
    #[error("generating a random token: {0}")]
    Random(String),
    /// An offer over the consumer's bounds of pending offers. Worded the same whether the
    /// consumer exists or not, and without saying which bound was reached.
    #[error(
        "offer refused: too many offers to cloud {0} are pending; withdraw some of yours, or \
         ask the consumer to accept or decline them"
    )]
    OfferRefused(CloudId),
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator,
    Cloud(CloudId),
    /// An agent with its host's token: its own host's sync, status and registration only.
    Host(String),
}

/// Settings of the core (from the control plane's config).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub default_cidr: Ipv4Net,
    pub default_quotas: Quotas,
    /// DNS suffix of all zones, e.g. `atoll.internal`.
    pub dns_suffix: String,
    pub max_exposures_per_cloud: u32,
    pub max_grants_per_exposure: u32,
    /// Pending offers one consumer cloud id holds, from all providers
    /// (`clouds.max_pending_offers_per_cloud`).
    pub max_pending_offers_per_cloud: u32,
    /// Pending offers one consumer cloud id holds from one provider
    /// (`clouds.max_pending_offers_per_provider`).
    pub max_pending_offers_per_provider: u32,
    /// SHA-256 (hex) of the operator token.
    pub operator_token_sha256: String,
    /// A host silent for longer is not live (`hosts.timeout_secs`).
    pub host_timeout_secs: u64,
}

/// A syncing host's `last_seen` is rewritten once it is this old (one store write per host
/// per interval, however often it syncs).
pub const HEARTBEAT_SECS: u64 = 20;

/// The smallest `hosts.timeout_secs`: a healthy host syncs at least every
/// [`crate::api::MAX_SYNC_WAIT`], and its heartbeat may be [`HEARTBEAT_SECS`] stale.
pub const MIN_HOST_TIMEOUT_SECS: u64 = 60 + HEARTBEAT_SECS + 10;

/// A request to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateCloud(CreateCloud),
    ListClouds {
        after: Option<CloudId>,
        limit: usize,
    },
    GetCloud(CloudId),
    DeleteCloud(CloudId),
    /// Give the cloud a new token; the old one stops working at once.
    RotateCloudToken(CloudId),
    CreateVm(CloudId, CreateVm),
    ListVms(CloudId),
    GetVm(CloudId, String),
    DeleteVm(CloudId, String),
    /// Set the VM's power to running (a no-op if it is).
    StartVm(CloudId, String),
    /// Set the VM's power to stopped (a no-op if it is).
    StopVm(CloudId, String),
    /// The tail of the VM's console as its host last reported it.
    GetConsole(CloudId, String),
    CreateVolume(CloudId, CreateVolume),
    ListVolumes(CloudId),
    GetVolume(CloudId, String),
    DeleteVolume(CloudId, String),
    AttachVolume(CloudId, String, AttachVolume),
    DetachVolume(CloudId, String),
    PutRecordSet(CloudId, String, RecordType, PutRecordSet),
    ListRecordSets(CloudId),
    DeleteRecordSet(CloudId, String, RecordType),
    CreateExposure(CloudId, CreateExposure),
    ListExposures(CloudId),
    GetExposure(CloudId, String),
    DeleteExposure(CloudId, String),
    /// Offer an exposure to a consumer (accepted at once if the consumer's policy lists the
    /// provider).
    CreateGrant(CloudId, String, CreateGrant),
    ListGrants(CloudId, String),
    /// Revoke a grant, or withdraw a pending offer.
    RevokeGrant(CloudId, String, CloudId),
    /// The provider's pending offers of an exposure.
    ListExposureOffers(CloudId, String),
    ListImports(CloudId),
    DeleteImport(CloudId, CloudId, String),
    /// The pending offers a cloud received.
    ListOffers(CloudId),
    /// `(consumer, provider, exposure)`: make the offer an active grant.
    AcceptOffer(CloudId, CloudId, String),
    DeclineOffer(CloudId, CloudId, String),
    GetOfferPolicy(CloudId),
    PutOfferPolicy(CloudId, OfferPolicy),
    RegisterHost(String),
    IssueHostToken(String),
    /// Cordons (`true`) or uncordons a host.
    CordonHost(String, bool),
    ListHosts,
    ReportStatus(String, StatusReport),
}

/// The core's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    CreatedCloud(Box<CreatedCloud>),
    CloudToken(Box<CloudToken>),
    Cloud(Box<Cloud>),
    Clouds(Vec<Cloud>),
    Vm(Box<Vm>),
    Vms(Vec<Vm>),
    Console(Console),
    Volume(Volume),
    Volumes(Vec<Volume>),
    RecordSet(RecordSet),
    RecordSets(Vec<RecordSet>),
    Exposure(Exposure),
    Exposures(Vec<Exposure>),
    Grant(Grant),
    Grants(Vec<Grant>),
    /// Rendered as 202 Accepted: an offer is not a grant yet.
    Offer(Offer),
    Offers(Vec<Offer>),
    OfferPolicy(OfferPolicy),
    Host(HostInfo),
    HostToken(Box<HostToken>),
    Hosts(Vec<HostInfo>),
    /// Created-or-replaced/deleted with nothing to return.
    Done,
}

mod keys {
    use super::CloudId;

    pub fn cloud(c: CloudId) -> String {
        format!("clouds/{c}")
    }
    pub fn inside(c: CloudId) -> String {
        format!("c/{c}/")
    }
    pub fn vms(c: CloudId) -> String {
        format!("c/{c}/vms/")
    }
    pub fn vm(c: CloudId, vm: &str) -> String {
        format!("c/{c}/vms/{vm}")
    }
    pub fn vm_status(c: CloudId, vm: &str) -> String {
        format!("c/{c}/vmstatus/{vm}")
    }
    pub fn vm_statuses(c: CloudId) -> String {
        format!("c/{c}/vmstatus/")
    }
    /// The tail of a VM's console. Like the status key, not a kind that [`super::zone_cloud`]
    /// or [`super::service_cloud`] name, so its changes never reach host syncs.
    pub fn vm_console(c: CloudId, vm: &str) -> String {
        format!("c/{c}/vmconsole/{vm}")
    }
    pub fn ips(c: CloudId) -> String {
        format!("c/{c}/ip/")
    }
    pub fn ip(c: CloudId, ip: std::net::Ipv4Addr) -> String {
        format!("c/{c}/ip/{ip}")
    }
    pub fn volumes(c: CloudId) -> String {
        format!("c/{c}/volumes/")
    }
    pub fn volume(c: CloudId, v: &str) -> String {
        format!("c/{c}/volumes/{v}")
    }
    pub fn records(c: CloudId) -> String {
        format!("c/{c}/dns/")
    }
    pub fn record(c: CloudId, name: &str, t: &str) -> String {
        format!("c/{c}/dns/{name}/{t}")
    }
    pub fn exposures(c: CloudId) -> String {
        format!("c/{c}/exposures/")
    }
    pub fn exposure(c: CloudId, e: &str) -> String {
        format!("c/{c}/exposures/{e}")
    }
    pub fn grants(c: CloudId, e: &str) -> String {
        format!("c/{c}/grants/{e}/")
    }
    pub fn all_grants(c: CloudId) -> String {
        format!("c/{c}/grants/")
    }
    pub fn grant(c: CloudId, e: &str, consumer: CloudId) -> String {
        format!("c/{c}/grants/{e}/{consumer}")
    }
    /// A host's failure to install the grant `(provider, consumer, vip)`: under the provider,
    /// so deleting the provider removes it, and of no kind that reaches host syncs.
    pub fn service_failure(
        provider: CloudId,
        consumer: CloudId,
        vip: std::net::Ipv4Addr,
    ) -> String {
        format!("c/{provider}/svcstatus/{consumer}/{vip}")
    }
    pub fn service_failures(provider: CloudId) -> String {
        format!("c/{provider}/svcstatus/")
    }
    pub fn imports(c: CloudId) -> String {
        format!("c/{c}/imports/")
    }
    pub fn import(consumer: CloudId, provider: CloudId, e: &str) -> String {
        format!("c/{consumer}/imports/{provider}/{e}")
    }
    /// The provider's record of a pending offer.
    pub fn offer(c: CloudId, e: &str, consumer: CloudId) -> String {
        format!("c/{c}/offers/{e}/{consumer}")
    }
    pub fn offers(c: CloudId, e: &str) -> String {
        format!("c/{c}/offers/{e}/")
    }
    pub fn all_offers(c: CloudId) -> String {
        format!("c/{c}/offers/")
    }
    /// The consumer's copy of a pending offer: outside the consumer's own keys (`c/<cloud>/`),
    /// so that an offer writes nothing into a cloud, and the same whether the cloud exists.
    pub fn inbox_entry(consumer: CloudId, provider: CloudId, e: &str) -> String {
        format!("offers/{consumer}/{provider}/{e}")
    }
    pub fn inbox(consumer: CloudId) -> String {
        format!("offers/{consumer}/")
    }
    pub fn inbox_from(consumer: CloudId, provider: CloudId) -> String {
        format!("offers/{consumer}/{provider}/")
    }
    /// The cloud's [`super::OfferPolicy`]; no trailing kind, so no zone or service depends on it.
    pub fn offer_policy(c: CloudId) -> String {
        format!("c/{c}/offerpolicy")
    }
    pub fn hosts() -> &'static str {
        "hosts/"
    }
    pub fn host(h: &str) -> String {
        format!("hosts/{h}")
    }
    pub fn host_all(h: &str) -> String {
        format!("h/{h}/")
    }
    pub fn placement(h: &str, c: CloudId, vm: &str) -> String {
        format!("h/{h}/vms/{c}/{vm}")
    }
    pub fn placements_of(h: &str, c: CloudId) -> String {
        format!("h/{h}/vms/{c}/")
    }
    pub fn volume_placement(h: &str, c: CloudId, v: &str) -> String {
        format!("h/{h}/volumes/{c}/{v}")
    }
    pub fn volume_placements_of(h: &str, c: CloudId) -> String {
        format!("h/{h}/volumes/{c}/")
    }
}

/// One store change kept for agents.
struct FeedEvent {
    revision: u64,
    key: String,
    /// The new value of a put under `h/`; `None` for deletes and for keys whose value agents
    /// do not need.
    value: Option<Vec<u8>>,
    deleted: bool,
}

#[derive(Default)]
struct FeedState {
    ring: VecDeque<FeedEvent>,
    /// Every event after this revision is in `ring`.
    complete_after: u64,
    /// Per host: per cloud, the placement keys (VMs and volumes) it holds.
    placements: HashMap<String, HashMap<CloudId, HashSet<String>>>,
    /// Registered hosts and when each was last heard from (their records' `last_seen`).
    hosts: BTreeMap<String, u64>,
    /// Hosts the operator cordoned.
    cordoned: HashSet<String>,
}

/// The store watch that feeds host syncs (see the module docs).
struct Feed {
    state: Mutex<FeedState>,
    latest: watch::Sender<u64>,
}

/// Parses `h/<host>/<vms|volumes>/<cloud>/<name>`.
fn parse_placement_key(key: &str) -> Option<(&str, bool, CloudId, &str)> {
    let rest = key.strip_prefix("h/")?;
    let (host, rest) = rest.split_once('/')?;
    let (kind, rest) = rest.split_once('/')?;
    let (cloud, name) = rest.split_once('/')?;
    let vm = match kind {
        "vms" => true,
        "volumes" => false,
        _ => return None,
    };
    Some((host, vm, cloud.parse().ok()?, name))
}

/// The cloud a key belongs to if it is the cloud's record (`clouds/<c>`) or lies under
/// `c/<c>/<kind>/` with `kind` one of `kinds`.
fn cloud_of(key: &str, kinds: &[&str]) -> Option<CloudId> {
    if let Some(c) = key.strip_prefix("clouds/") {
        return c.parse().ok();
    }
    let rest = key.strip_prefix("c/")?;
    let (cloud, rest) = rest.split_once('/')?;
    let (kind, _) = rest.split_once('/')?;
    kinds.contains(&kind).then(|| cloud.parse().ok()).flatten()
}

/// The cloud whose zone a key belongs to, if a change of it changes the zone.
fn zone_cloud(key: &str) -> Option<CloudId> {
    cloud_of(key, &["vms", "dns", "imports"])
}

/// The provider cloud whose services (active grants, resolved) a key's change may change:
/// its exposures, its grants, its VMs (backends' addresses) and the cloud itself.
fn service_cloud(key: &str) -> Option<CloudId> {
    cloud_of(key, &["vms", "exposures", "grants"])
}

impl FeedState {
    fn apply(&mut self, key: &str, value: &[u8], deleted: bool) {
        if let Some((host, _, cloud, _)) = parse_placement_key(key) {
            let clouds = self.placements.entry(host.to_string()).or_default();
            if deleted {
                if let Some(set) = clouds.get_mut(&cloud) {
                    set.remove(key);
                    if set.is_empty() {
                        clouds.remove(&cloud);
                    }
                }
            } else {
                clouds.entry(cloud).or_default().insert(key.to_string());
            }
        } else if let Some(h) = key.strip_prefix("hosts/") {
            if deleted {
                self.hosts.remove(h);
                self.cordoned.remove(h);
            } else {
                // The record is the truth (heartbeats are written to it).
                let info = serde_json::from_slice::<HostInfo>(value).ok();
                let seen = info
                    .as_ref()
                    .map_or(0, |i| i.last_seen.max(i.registered_at));
                self.hosts.insert(h.to_string(), seen);
                if info.is_some_and(|i| i.cordoned) {
                    self.cordoned.insert(h.to_string());
                } else {
                    self.cordoned.remove(h);
                }
            }
        }
    }

    fn load(&self, host: &str) -> usize {
        self.placements
            .get(host)
            .map(|c| c.values().map(|s| s.len()).sum())
            .unwrap_or(0)
    }
}

/// The control plane's core. Cheap to share (`Arc`).
pub struct Core {
    store: Store,
    cfg: CoreConfig,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 of a token, lowercase hex.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The record of a host registered now.
fn new_host(name: &str) -> HostInfo {
    HostInfo {
        name: name.to_string(),
        registered_at: now(),
        token_sha256: String::new(),
        last_seen: now(),
        live: false,
        cordoned: false,
    }
}

/// The operator, or the host itself.
pub fn authorize_host(p: &Principal, host: &str) -> Result<(), CoreError> {
    match p {
        Principal::Operator => Ok(()),
        Principal::Host(own) if own == host => Ok(()),
        Principal::Host(_) => Err(CoreError::Forbidden(format!("act as host {host}"))),
        Principal::Cloud(_) => Err(CoreError::Forbidden("manage hosts".into())),
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CoreError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| CoreError::Random(e.to_string()))?;
    Ok(buf)
}

/// A new random token of cloud `c`: `atl_<cloud>_<256-bit secret>`.
fn new_cloud_token(c: CloudId) -> Result<String, CoreError> {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    Ok(format!("atl_{c}_{secret}"))
}

/// A new random operator token.
pub fn new_operator_token() -> Result<String, CoreError> {
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
    Ok(format!("atl_op_{secret}"))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, CoreError> {
    serde_json::from_slice(value).map_err(|source| CoreError::CorruptRecord {
        key: key.to_string(),
        source,
    })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("model types serialize")
}

fn put<T: serde::Serialize>(key: String, v: &T) -> Op {
    Op::Put {
        key,
        value: encode(v),
    }
}

/// Revoking one grant: the provider's grant record, the consumer's import, the consumer's VIP
/// address and the provider's NAT address go, guarded by the revision of the record (grant or
/// import, which are always written together) it was read from.
struct Revocation {
    guard: Compare,
    ops: Vec<Op>,
}

impl Revocation {
    fn new(g: &Grant, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![
                Op::Delete {
                    key: keys::grant(g.provider, &g.exposure, g.consumer),
                },
                Op::Delete {
                    key: keys::import(g.consumer, g.provider, &g.exposure),
                },
                Op::Delete {
                    key: keys::ip(g.consumer, g.vip),
                },
                Op::Delete {
                    key: keys::ip(g.provider, g.nat_ipv4),
                },
            ],
        }
    }

    /// Withdrawing (or declining) a pending offer: the provider's record and the consumer's
    /// copy, which are always written together, guarded by the one read.
    fn offer(o: &Offer, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![
                Op::Delete {
                    key: keys::offer(o.provider, &o.exposure, o.consumer),
                },
                Op::Delete {
                    key: keys::inbox_entry(o.consumer, o.provider, &o.exposure),
                },
            ],
        }
    }

    /// A deleted consumer's copy of an offer it received. The provider's record stays
    /// pending, as an offer to a cloud that never existed does: the provider learns nothing.
    fn received_offer(o: &Offer, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![Op::Delete {
                key: keys::inbox_entry(o.consumer, o.provider, &o.exposure),
            }],
        }
    }
}

fn conflict(code: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::Conflict {
        code,
        message: message.into(),
    }
}

fn check_quota(field: &'static str, wanted: u64, limit: u64) -> Result<(), CoreError> {
    if wanted > limit {
        Err(CoreError::QuotaExceeded {
            field,
            wanted,
            limit,
        })
    } else {
        Ok(())
    }
}

impl Core {
    /// Starts the core on `store`: loads host placements and starts the store watch that feeds
    /// [`Core::sync`].
    pub async fn start(store: Store, cfg: CoreConfig) -> Result<Arc<Core>, CoreError> {
        let revision = store.revision().await?;
        let mut state = FeedState {
            complete_after: revision,
            ..FeedState::default()
        };
        let mut after: Option<String> = None;
        loop {
            let page = store.range("h/", after.as_deref(), 10_000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for kv in &page {
                state.apply(&kv.key, &kv.value, false);
            }
        }
        for kv in store.range(keys::hosts(), None, 0).await? {
            state.apply(&kv.key, &kv.value, false);
        }
        let (latest, _) = watch::channel(revision);
        let feed = Arc::new(Feed {
            state: Mutex::new(state),
            latest,
        });
        let mut stream = store.watch("", revision).await?;
        let f = feed.clone();
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(batch) => {
                        let mut st = f.state.lock().expect("feed lock");
                        let mut kept = false;
                        for ev in batch.events {
                            let deleted = matches!(ev.kind, EventKind::Delete);
                            st.apply(&ev.kv.key, &ev.kv.value, deleted);
                            // Host records (registrations, heartbeats) matter to scheduling
                            // only, never to a host's sync: they neither fill the ring nor
                            // wake the long polls.
                            if ev.kv.key.starts_with(keys::hosts()) {
                                continue;
                            }
                            kept = true;
                            let keep_value = !deleted && ev.kv.key.starts_with("h/");
                            st.ring.push_back(FeedEvent {
                                revision: batch.revision,
                                value: keep_value.then_some(ev.kv.value),
                                key: ev.kv.key,
                                deleted,
                            });
                        }
                        while st.ring.len() > FEED_CAPACITY {
                            if let Some(old) = st.ring.pop_front() {
                                st.complete_after = old.revision;
                            }
                        }
                        drop(st);
                        if kept {
                            f.latest.send_replace(batch.revision);
                        }
                    }
                    Err(e) => {
                        eprintln!(
                            "atoll control: store watch ended: {e}; agents fall back to full syncs"
                        );
                        let mut st = f.state.lock().expect("feed lock");
                        st.complete_after = u64::MAX;
                        drop(st);
                        f.latest.send_replace(u64::MAX);
                        return;
                    }
                }
            }
        });
        Ok(Arc::new(Core { store, cfg, feed }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Resolves a bearer token to its principal.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, CoreError> {
        if token.starts_with("atl_op_") {
            return if ct_eq(&token_hash(token), &self.cfg.operator_token_sha256) {
                Ok(Principal::Operator)
            } else {
                Err(CoreError::Unauthenticated)
            };
        }
        if let Some(rest) = token.strip_prefix("atl_host_") {
            // Host names are labels (no '_'), so the first '_' ends the name.
            let name = rest
                .split_once('_')
                .map(|(n, _)| n)
                .filter(|n| validate_label("host", n).is_ok())
                .ok_or(CoreError::Unauthenticated)?;
            let Some(kv) = self.store.get(&keys::host(name)).await? else {
                return Err(CoreError::Unauthenticated);
            };
            let h: HostInfo = decode(&kv.key, &kv.value)?;
            return if !h.token_sha256.is_empty() && ct_eq(&token_hash(token), &h.token_sha256) {
                Ok(Principal::Host(name.to_string()))
            } else {
                Err(CoreError::Unauthenticated)
            };
        }
        let cloud: CloudId = token
            .strip_prefix("atl_")
            .and_then(|t| t.split_once('_'))
            .and_then(|(c, _)| c.parse().ok())
            .ok_or(CoreError::Unauthenticated)?;
        let Some(kv) = self.store.get(&keys::cloud(cloud)).await? else {
            return Err(CoreError::Unauthenticated);
        };
        let c: Cloud = decode(&kv.key, &kv.value)?;
        if ct_eq(&token_hash(token), &c.token_sha256) {
            Ok(Principal::Cloud(cloud))
        } else {
            Err(CoreError::Unauthenticated)
        }
    }

    fn authorize(&self, p: &Principal, cmd: &Command) -> Result<(), CoreError> {
        use Command::*;
        let operator_only = |what: &str| match p {
            Principal::Operator => Ok(()),
            _ => Err(CoreError::Forbidden(what.to_string())),
        };
        let cloud = match cmd {
            CreateCloud(_) => return operator_only("create clouds"),
            ListClouds { .. } => {
                return match p {
                    Principal::Host(_) => Err(CoreError::Forbidden("list clouds".into())),
                    _ => Ok(()),
                }
            }
            RegisterHost(h) | ReportStatus(h, _) => return authorize_host(p, h),
            IssueHostToken(_) | CordonHost(..) | ListHosts => return operator_only("manage hosts"),
            GetCloud(c)
            | DeleteCloud(c)
            | RotateCloudToken(c)
            | CreateVm(c, _)
            | ListVms(c)
            | GetVm(c, _)
            | DeleteVm(c, _)
            | StartVm(c, _)
            | StopVm(c, _)
            | GetConsole(c, _)
            | CreateVolume(c, _)
            | ListVolumes(c)
            | GetVolume(c, _)
            | DeleteVolume(c, _)
            | AttachVolume(c, ..)
            | DetachVolume(c, _)
            | PutRecordSet(c, ..)
            | ListRecordSets(c)
            | DeleteRecordSet(c, ..)
            | CreateExposure(c, _)
            | ListExposures(c)
            | GetExposure(c, _)
            | DeleteExposure(c, _)
            | CreateGrant(c, ..)
            | ListGrants(c, _)
            | RevokeGrant(c, ..)
            | ListExposureOffers(c, _)
            | ListImports(c)
            | DeleteImport(c, ..)
            | ListOffers(c)
            | AcceptOffer(c, ..)
            | DeclineOffer(c, ..)
            | GetOfferPolicy(c)
            | PutOfferPolicy(c, _) => *c,
        };
        match p {
            Principal::Operator => Ok(()),
            Principal::Cloud(own) if *own == cloud => Ok(()),
            _ => Err(CoreError::Forbidden(format!("access cloud {cloud}"))),
        }
    }

    /// Executes one command for `principal`.
    pub async fn execute(&self, principal: Principal, cmd: Command) -> Result<Reply, CoreError> {
        self.authorize(&principal, &cmd)?;
        use Command::*;
        match cmd {
            CreateCloud(req) => self.create_cloud(req).await,
            ListClouds { after, limit } => match principal {
                Principal::Operator => self.list_clouds(after, limit).await,
                Principal::Cloud(c) => Ok(Reply::Clouds(vec![self.cloud(c).await?.1])),
                Principal::Host(_) => Err(CoreError::Forbidden("list clouds".into())),
            },
            GetCloud(c) => Ok(Reply::Cloud(Box::new(self.cloud(c).await?.1))),
            DeleteCloud(c) => self.delete_cloud(c).await,
            RotateCloudToken(c) => self.rotate_cloud_token(c).await,
            CreateVm(c, req) => self.create_vm(c, req).await,
            ListVms(c) => self.list_vms(c).await,
            GetVm(c, name) => Ok(Reply::Vm(Box::new(self.vm_with_status(c, &name).await?))),
            DeleteVm(c, name) => self.delete_vm(c, &name).await,
            StartVm(c, name) => self.set_power(c, &name, Power::Running).await,
            StopVm(c, name) => self.set_power(c, &name, Power::Stopped).await,
            GetConsole(c, name) => self.console(c, &name).await,
            CreateVolume(c, req) => self.create_volume(c, req).await,
            ListVolumes(c) => Ok(Reply::Volumes(
                self.list::<Volume>(&keys::volumes(c)).await?,
            )),
            GetVolume(c, name) => Ok(Reply::Volume(self.volume(c, &name).await?.1)),
            DeleteVolume(c, name) => self.delete_volume(c, &name).await,
            AttachVolume(c, name, req) => self.attach_volume(c, &name, Some(req.vm)).await,
            DetachVolume(c, name) => self.attach_volume(c, &name, None).await,
            PutRecordSet(c, name, t, req) => self.put_record_set(c, name, t, req).await,
            ListRecordSets(c) => self.list_record_sets(c).await,
            DeleteRecordSet(c, name, t) => self.delete_record_set(c, &name, t).await,
            CreateExposure(c, req) => self.create_exposure(c, req).await,
            ListExposures(c) => Ok(Reply::Exposures(self.list(&keys::exposures(c)).await?)),
            GetExposure(c, name) => Ok(Reply::Exposure(self.exposure(c, &name).await?.1)),
            DeleteExposure(c, name) => self.delete_exposure(c, &name).await,
            CreateGrant(c, exp, req) => self.create_offer(c, &exp, req.consumer).await,
            ListGrants(c, exp) => {
                self.exposure(c, &exp).await?;
                let grants = self.list(&keys::grants(c, &exp)).await?;
                Ok(Reply::Grants(self.effective(grants).await?))
            }
            RevokeGrant(c, exp, consumer) => self.revoke_grant(c, &exp, consumer).await,
            ListExposureOffers(c, exp) => {
                self.exposure(c, &exp).await?;
                Ok(Reply::Offers(self.list(&keys::offers(c, &exp)).await?))
            }
            ListImports(c) => {
                let grants = self.list(&keys::imports(c)).await?;
                Ok(Reply::Grants(self.effective(grants).await?))
            }
            DeleteImport(c, provider, exp) => self.revoke_grant(provider, &exp, c).await,
            ListOffers(c) => {
                self.cloud(c).await?;
                Ok(Reply::Offers(self.list(&keys::inbox(c)).await?))
            }
            AcceptOffer(c, provider, exp) => self.accept_offer(c, provider, &exp).await,
            DeclineOffer(c, provider, exp) => self.decline_offer(c, provider, &exp).await,
            GetOfferPolicy(c) => {
                self.cloud(c).await?;
                Ok(Reply::OfferPolicy(self.offer_policy(c).await?))
            }
            PutOfferPolicy(c, policy) => self.put_offer_policy(c, policy).await,
            RegisterHost(name) => self.register_host(name).await,
            IssueHostToken(name) => self.issue_host_token(name).await,
            CordonHost(name, cordoned) => self.cordon_host(name, cordoned).await,
            ListHosts => {
                let hosts = self.list::<HostInfo>(keys::hosts()).await?;
                Ok(Reply::Hosts(
                    hosts.into_iter().map(|h| self.host_view(h)).collect(),
                ))
            }
            ReportStatus(host, report) => self.report_status(&host, report).await,
        }
    }

    async fn commit(&self, txn: Txn) -> Result<Option<u64>, CoreError> {
        Ok(match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision } => Some(revision),
            TxnOutcome::Failed { .. } => None,
        })
    }

    /// Grants as they stand: an active grant that a host failed to install is `failed` with
    /// the host's error, and one whose provider and consumer run on different hosts is
    /// `unreachable` (traffic between hosts is not carried yet); see [`GrantState`].
    async fn effective(&self, mut grants: Vec<Grant>) -> Result<Vec<Grant>, CoreError> {
        let mut failures: HashMap<CloudId, HashMap<String, ServiceFailure>> = HashMap::new();
        for g in &grants {
            if g.state == GrantState::Active && !failures.contains_key(&g.provider) {
                let found = self
                    .list_kv::<ServiceFailure>(&keys::service_failures(g.provider))
                    .await?
                    .into_iter()
                    .map(|(k, _, f)| (k, f))
                    .collect();
                failures.insert(g.provider, found);
            }
        }
        let st = self.feed.state.lock().expect("feed lock");
        let hosts_of = |c: CloudId| -> BTreeSet<&String> {
            st.placements
                .iter()
                .filter(|(_, clouds)| clouds.contains_key(&c))
                .map(|(h, _)| h)
                .collect()
        };
        for g in grants.iter_mut().filter(|g| g.state == GrantState::Active) {
            let key = keys::service_failure(g.provider, g.consumer, g.vip);
            // A failure reported for an earlier grant with the same VIP does not count.
            if let Some(f) = failures
                .get(&g.provider)
                .and_then(|m| m.get(&key))
                .filter(|f| f.at >= g.created_at)
            {
                g.state = GrantState::Failed;
                g.reason = Some(format!("host {}: {}", f.host, f.message));
                continue;
            }
            let (p, c) = (hosts_of(g.provider), hosts_of(g.consumer));
            if !p.is_empty() && !c.is_empty() && p.is_disjoint(&c) {
                let names = |s: &BTreeSet<&String>| {
                    s.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(", ")
                };
                g.state = GrantState::Unreachable;
                g.reason = Some(format!(
                    "the provider's VMs run on host {}, the consumer's on host {}: traffic between hosts is not carried yet",
                    names(&p),
                    names(&c)
                ));
            }
        }
        Ok(grants)
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<T>, CoreError> {
        Ok(self
            .list_kv(prefix)
            .await?
            .into_iter()
            .map(|(_, _, v)| v)
            .collect())
    }

    /// Every record under `prefix` with its key and `mod_revision`.
    async fn list_kv<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, u64, T)>, CoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.range(prefix, after.as_deref(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            let full = page.len() == 1000;
            for kv in page {
                let v = decode(&kv.key, &kv.value)?;
                out.push((kv.key, kv.mod_revision, v));
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// Commits a delete that revokes grants (see the module docs): `own` deletes the resource's
    /// own keys (all of them under `own_prefix` but a few) guarded by its revision. With the
    /// `revocations` in one transaction if that fits the store's limit; else the revocations
    /// are committed first, in transactions of at most the limit, and nothing of `own` is.
    /// `Ok(true)` if the delete is committed; `Ok(false)` if the caller must re-read and call
    /// again (a compare failed, or the revocations went ahead). `too_large` makes the error for
    /// an `own` over the limit, returned before anything is revoked.
    async fn commit_delete(
        &self,
        own: Txn,
        own_prefix: &str,
        revocations: Vec<Revocation>,
        too_large: impl FnOnce(usize, usize) -> CoreError,
    ) -> Result<bool, CoreError> {
        let mut whole = own.clone();
        for r in &revocations {
            whole.compares.push(r.guard.clone());
            whole.success.extend(
                r.ops
                    .iter()
                    .filter(|op| !matches!(op, Op::Delete { key } if key.starts_with(own_prefix)))
                    .cloned(),
            );
        }
        let limit = match self.store.max_txn_ops() {
            Some(limit) if whole.size() > limit => limit,
            _ => return Ok(self.commit(whole).await?.is_some()),
        };
        if own.size() > limit {
            return Err(too_large(own.size(), limit));
        }
        let mut chunk = Txn::default();
        for r in revocations {
            if chunk.compares.len() + 1 > limit || chunk.success.len() + r.ops.len() > limit {
                // A chunk whose guard fails is left for the re-read; the others go ahead.
                self.commit(std::mem::take(&mut chunk)).await?;
            }
            chunk.compares.push(r.guard);
            chunk.success.extend(r.ops);
        }
        if !chunk.success.is_empty() {
            self.commit(chunk).await?;
        }
        Ok(false)
    }

    async fn read<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(u64, T), CoreError> {
        let kv = self
            .store
            .get(key)
            .await?
            .ok_or_else(|| CoreError::NotFound(what()))?;
        Ok((kv.mod_revision, decode(key, &kv.value)?))
    }

    async fn cloud(&self, c: CloudId) -> Result<(u64, Cloud), CoreError> {
        let (rev, mut cloud): (u64, Cloud) =
            self.read(&keys::cloud(c), || format!("cloud {c}")).await?;
        cloud.token_sha256.clear();
        Ok((rev, cloud))
    }

    /// The cloud record including its token hash (to write it back).
    async fn cloud_record(&self, c: CloudId) -> Result<(u64, Cloud), CoreError> {
        self.read(&keys::cloud(c), || format!("cloud {c}")).await
    }

    // ----- clouds -----

    async fn create_cloud(&self, req: CreateCloud) -> Result<Reply, CoreError> {
        if let Some(name) = &req.name {
            validate_label("name", name)?;
        }
        let cidr = req.cidr.unwrap_or(self.cfg.default_cidr);
        if !(8..=28).contains(&cidr.len) {
            return Err(FieldError::new("cidr", "prefix length must be 8 to 28").into());
        }
        let quotas = req.quotas.unwrap_or(self.cfg.default_quotas);
        validate_quotas(&quotas)?;
        for _ in 0..MAX_RETRIES {
            let raw = u32::from_le_bytes(random_bytes::<4>()?);
            if raw == 0 {
                continue;
            }
            let id = CloudId(raw);
            let token = new_cloud_token(id)?;
            let name = req.name.clone().unwrap_or_else(|| id.to_string());
            let gateway = Ipv4Addr::from(cidr.network() + 1);
            let cloud = Cloud {
                id,
                zone: zone_apex(&name, &self.cfg.dns_suffix),
                name,
                cidr,
                gateway,
                quotas,
                usage: Usage::default(),
                created_at: now(),
                token_sha256: token_hash(&token),
            };
            let txn = Txn {
                compares: vec![Compare::Absent(keys::cloud(id))],
                success: vec![
                    put(keys::cloud(id), &cloud),
                    Op::Put {
                        key: keys::ip(id, gateway),
                        value: b"\"gateway\"".to_vec(),
                    },
                ],
            };
            if self.commit(txn).await?.is_some() {
                let mut cloud = cloud;
                cloud.token_sha256.clear();
                return Ok(Reply::CreatedCloud(Box::new(CreatedCloud { cloud, token })));
            }
        }
        Err(CoreError::Contention("cloud ids".into()))
    }

    /// Gives cloud `c` a new token, which replaces its hash in the cloud record (guarded by the
    /// record's revision, retried on a lost race). Every request authenticates against the
    /// stored hash (nothing caches it), so the old token stops working at once, on every
    /// control plane sharing the store.
    async fn rotate_cloud_token(&self, c: CloudId) -> Result<Reply, CoreError> {
        let token = new_cloud_token(c)?;
        for _ in 0..MAX_RETRIES {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            cloud.token_sha256 = token_hash(&token);
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::cloud(c), rev)],
                success: vec![put(keys::cloud(c), &cloud)],
            };
            if self.commit(txn).await?.is_some() {
                cloud.token_sha256.clear();
                return Ok(Reply::CloudToken(Box::new(CloudToken { cloud, token })));
            }
        }
        Err(CoreError::Contention(format!("cloud {c}")))
    }

    async fn list_clouds(&self, after: Option<CloudId>, limit: usize) -> Result<Reply, CoreError> {
        let start = after.map(keys::cloud);
        let limit = limit.clamp(1, 1000);
        let page = self.store.range("clouds/", start.as_deref(), limit).await?;
        let mut out = Vec::with_capacity(page.len());
        for kv in page {
            let mut c: Cloud = decode(&kv.key, &kv.value)?;
            c.token_sha256.clear();
            out.push(c);
        }
        Ok(Reply::Clouds(out))
    }

    async fn delete_cloud(&self, c: CloudId) -> Result<Reply, CoreError> {
        for _ in 0..MAX_RETRIES {
            let (rev, _) = self.cloud(c).await?;
            let vms: Vec<Vm> = self.list(&keys::vms(c)).await?;
            let volumes: Vec<Volume> = self.list(&keys::volumes(c)).await?;
            let exports: Vec<(String, u64, Grant)> = self.list_kv(&keys::all_grants(c)).await?;
            let imports: Vec<(String, u64, Grant)> = self.list_kv(&keys::imports(c)).await?;
            let offered: Vec<(String, u64, Offer)> = self.list_kv(&keys::all_offers(c)).await?;
            let received: Vec<(String, u64, Offer)> = self.list_kv(&keys::inbox(c)).await?;
            let mut ops = vec![
                Op::Delete {
                    key: keys::cloud(c),
                },
                Op::DeletePrefix {
                    prefix: keys::inside(c),
                },
            ];
            let hosts: BTreeSet<&str> = vms.iter().map(|v| v.host.as_str()).collect();
            for h in &hosts {
                ops.push(Op::DeletePrefix {
                    prefix: keys::placements_of(h, c),
                });
            }
            let vhosts: BTreeSet<&str> = volumes.iter().map(|v| v.host.as_str()).collect();
            for h in &vhosts {
                ops.push(Op::DeletePrefix {
                    prefix: keys::volume_placements_of(h, c),
                });
            }
            let own = Txn {
                compares: vec![Compare::ModRevision(keys::cloud(c), rev)],
                success: ops,
            };
            // Grants this cloud gave (the consumers' imports and VIPs go too) and grants it
            // received (the providers' grant records go too).
            let mut revocations = Vec::with_capacity(exports.len() + imports.len());
            for (key, grev, g) in &exports {
                revocations.push(Revocation::new(g, key, *grev));
            }
            for (key, grev, g) in &imports {
                revocations.push(Revocation::new(g, key, *grev));
            }
            // Offers it made (the consumers' copies go too) and its copies of offers it
            // received (the providers' records stay pending: see `Revocation::received_offer`).
            for (key, orev, o) in &offered {
                revocations.push(Revocation::offer(o, key, *orev));
            }
            for (key, orev, o) in &received {
                revocations.push(Revocation::received_offer(o, key, *orev));
            }
            let placements = hosts.len() + vhosts.len();
            let too_large = |size, limit| CoreError::TxnTooLarge {
                what: format!("deleting cloud {c}"),
                size,
                limit,
                hint: format!(
                    "removing its VM and volume placements takes {placements} of them (one per \
                     host and kind); delete some of its VMs and volumes first, or raise both \
                     limits"
                ),
            };
            if self
                .commit_delete(own, &keys::inside(c), revocations, too_large)
                .await?
            {
                return Ok(Reply::Done);
            }
        }
        Err(CoreError::Contention(format!("cloud {c}")))
    }

    // ----- VMs -----

    async fn allocate_ip(&self, cloud: &Cloud) -> Result<Ipv4Addr, CoreError> {
        let used: HashSet<Ipv4Addr> = self
            .store
            .range(&keys::ips(cloud.id), None, 0)
            .await?
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
            .collect();
        let net = cloud.cidr.network();
        let last = net + (cloud.cidr.size() as u32 - 1);
        (net + 1..last)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| CoreError::QuotaExceeded {
                field: "addresses",
                wanted: cloud.cidr.size(),
                limit: cloud.cidr.size() - 2,
            })
    }

    /// The host for a new VM or volume of cloud `c`: the live, uncordoned host holding most of
    /// the cloud's placements, so its VMs reach each other (traffic between hosts is not
    /// carried yet); for a cloud with none there, the live, uncordoned host with the fewest
    /// placements.
    fn pick_host(&self, c: CloudId) -> Result<String, CoreError> {
        let st = self.feed.state.lock().expect("feed lock");
        let now = now();
        let usable = |h: &String| {
            st.hosts.get(h).is_some_and(|seen| self.live_at(*seen, now)) && !st.cordoned.contains(h)
        };
        let home = st
            .placements
            .iter()
            .filter_map(|(h, clouds)| clouds.get(&c).map(|keys| (h, keys.len())))
            .filter(|(h, _)| usable(h))
            .max_by_key(|(h, n)| (*n, std::cmp::Reverse(*h)))
            .map(|(h, _)| h.clone());
        if let Some(h) = home {
            return Ok(h);
        }
        st.hosts
            .keys()
            .filter(|h| usable(h))
            .min_by_key(|h| st.load(h))
            .cloned()
            .ok_or(CoreError::NoHost)
    }

    /// Makes a committed placement visible to [`Core::pick_host`] at once, before the store
    /// watch delivers it, so the next create of the same cloud finds its host.
    fn placed(&self, key: &str) {
        self.feed
            .state
            .lock()
            .expect("feed lock")
            .apply(key, b"", false);
    }

    /// Whether a host last heard from at `seen` is live at `now`.
    fn live_at(&self, seen: u64, now: u64) -> bool {
        now.saturating_sub(seen) <= self.cfg.host_timeout_secs
    }

    /// Whether `host` is registered and live.
    fn host_live(&self, host: &str) -> bool {
        self.last_seen(host).is_some_and(|s| self.live_at(s, now()))
    }

    /// When the scheduler last knew `host` to be alive; `None` if it is not registered.
    fn last_seen(&self, host: &str) -> Option<u64> {
        let st = self.feed.state.lock().expect("feed lock");
        st.hosts.get(host).copied()
    }

    /// Makes a committed host record visible to scheduling at once, the way the store watch
    /// applies it when it arrives.
    fn host_recorded(&self, info: &HostInfo) {
        let mut st = self.feed.state.lock().expect("feed lock");
        st.apply(&keys::host(&info.name), &encode(info), false);
    }

    async fn create_vm(&self, c: CloudId, req: CreateVm) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        if !(1..=64).contains(&req.vcpus) {
            return Err(FieldError::new("vcpus", "must be 1 to 64").into());
        }
        if !(16..=1 << 20).contains(&req.memory_mib) {
            return Err(FieldError::new("memory_mib", "must be 16 to 1048576").into());
        }
        for (field, v) in [("kernel", &req.kernel), ("image", &req.image)] {
            if let Some(v) = v {
                validate_label(field, v)?;
            }
        }
        if let Some(u) = &req.user_data {
            if u.len() > MAX_USER_DATA_BYTES {
                return Err(FieldError::new(
                    "user_data",
                    format!(
                        "{} bytes, at most {MAX_USER_DATA_BYTES} are accepted",
                        u.len()
                    ),
                )
                .into());
            }
        }
        if req.volumes.len() > MAX_VOLUMES_PER_VM {
            return Err(FieldError::new(
                "volumes",
                format!("a VM holds at most {MAX_VOLUMES_PER_VM} volumes"),
            )
            .into());
        }
        let mut seen = HashSet::new();
        for (i, v) in req.volumes.iter().enumerate() {
            validate_label(&format!("volumes[{i}]"), v)?;
            if !seen.insert(v) {
                return Err(FieldError::new(format!("volumes[{i}]"), "listed twice").into());
            }
        }
        for _ in 0..MAX_RETRIES {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            if self.store.get(&keys::vm(c, &req.name)).await?.is_some() {
                return Err(conflict(
                    "exists",
                    format!("VM {} exists in cloud {c}", req.name),
                ));
            }
            // A CNAME excludes every other record at its name, so the zone could not hold the
            // VM's automatic A record beside it (hosts would refuse the whole zone).
            let cname = keys::record(c, &req.name, RecordType::Cname.as_str());
            if self.store.get(&cname).await?.is_some() {
                return Err(conflict(
                    "cname_conflict",
                    format!(
                        "{} holds a CNAME record set, which excludes the VM's automatic A record",
                        req.name
                    ),
                ));
            }
            let u = cloud.usage;
            check_quota("vms", u.vms as u64 + 1, cloud.quotas.vms as u64)?;
            check_quota(
                "vcpus",
                (u.vcpus + req.vcpus) as u64,
                cloud.quotas.vcpus as u64,
            )?;
            check_quota(
                "memory_mib",
                u.memory_mib + req.memory_mib,
                cloud.quotas.memory_mib,
            )?;
            let mut compares = vec![
                Compare::ModRevision(keys::cloud(c), rev),
                Compare::Absent(keys::vm(c, &req.name)),
                Compare::Absent(cname),
            ];
            let mut ops = Vec::new();
            let mut host = None;
            for (i, name) in req.volumes.iter().enumerate() {
                let (vrev, mut vol) = self.volume(c, name).await?;
                if let Some(vm) = &vol.attached_to {
                    return Err(conflict(
                        "attached",
                        format!("volumes[{i}]: {name} is attached to VM {vm}"),
                    ));
                }
                if host.get_or_insert_with(|| vol.host.clone()) != &vol.host {
                    return Err(conflict(
                        "hosts_differ",
                        "the volumes are on different hosts",
                    ));
                }
                vol.attached_to = Some(req.name.clone());
                compares.push(Compare::ModRevision(keys::volume(c, name), vrev));
                ops.push(put(keys::volume(c, name), &vol));
            }
            let host = match host {
                Some(h) => h,
                None => self.pick_host(c)?,
            };
            let ip = self.allocate_ip(&cloud).await?;
            compares.push(Compare::Absent(keys::ip(c, ip)));
            cloud.usage.vms += 1;
            cloud.usage.vcpus += req.vcpus;
            cloud.usage.memory_mib += req.memory_mib;
            let vm = Vm {
                cloud: c,
                name: req.name.clone(),
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                kernel: req.kernel.clone(),
                image: req.image.clone(),
                volumes: req.volumes.clone(),
                ipv4: ip,
                fqdn: format!("{}.{}", req.name, cloud.zone),
                host: host.clone(),
                created_at: now(),
                power: if req.start {
                    Power::Running
                } else {
                    Power::Stopped
                },
                user_data: req.user_data.clone(),
                status: None,
                host_live: false,
            };
            let placement = placement(&vm, &cloud);
            ops.push(put(keys::cloud(c), &cloud));
            ops.push(put(keys::vm(c, &vm.name), &vm));
            ops.push(put(keys::ip(c, ip), &format!("vm:{}", vm.name)));
            ops.push(put(keys::placement(&host, c, &vm.name), &placement));
            if self
                .commit(Txn {
                    compares,
                    success: ops,
                })
                .await?
                .is_some()
            {
                self.placed(&keys::placement(&host, c, &vm.name));
                let mut vm = vm;
                vm.status = Some(pending(vm.created_at));
                vm.host_live = self.host_live(&vm.host);
                return Ok(Reply::Vm(Box::new(vm)));
            }
        }
        Err(CoreError::Contention(format!("cloud {c}")))
    }

    async fn vm(&self, c: CloudId, name: &str) -> Result<(u64, Vm), CoreError> {
        self.read(&keys::vm(c, name), || format!("VM {name} in cloud {c}"))
            .await
    }

    async fn vm_with_status(&self, c: CloudId, name: &str) -> Result<Vm, CoreError> {
        let (_, vm) = self.vm(c, name).await?;
        self.with_status(vm).await
    }

    /// `vm` with its last reported status (pending if none).
    async fn with_status(&self, mut vm: Vm) -> Result<Vm, CoreError> {
        vm.status = match self.store.get(&keys::vm_status(vm.cloud, &vm.name)).await? {
            Some(kv) => Some(decode(&kv.key, &kv.value)?),
            None => Some(pending(vm.created_at)),
        };
        vm.host_live = self.host_live(&vm.host);
        Ok(vm)
    }

    /// Start or stop: the VM's power and its placement, guarded by the VM's revision.
    async fn set_power(&self, c: CloudId, name: &str, power: Power) -> Result<Reply, CoreError> {
        for _ in 0..MAX_RETRIES {
            let (vrev, mut vm) = self.vm(c, name).await?;
            if vm.power == power {
                return Ok(Reply::Vm(Box::new(self.with_status(vm).await?)));
            }
            vm.power = power;
            let (_, cloud) = self.cloud(c).await?;
            let placement = placement(&vm, &cloud);
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::vm(c, name), vrev)],
                success: vec![
                    put(keys::vm(c, name), &vm),
                    put(keys::placement(&vm.host, c, name), &placement),
                ],
            };
            if self.commit(txn).await?.is_some() {
                return Ok(Reply::Vm(Box::new(self.with_status(vm).await?)));
            }
        }
        Err(CoreError::Contention(format!("VM {name}")))
    }

    async fn console(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        self.vm(c, name).await?;
        Ok(Reply::Console(
            match self.store.get(&keys::vm_console(c, name)).await? {
                Some(kv) => decode(&kv.key, &kv.value)?,
                None => Console {
                    text: String::new(),
                    updated_at: 0,
                },
            },
        ))
    }

    async fn list_vms(&self, c: CloudId) -> Result<Reply, CoreError> {
        self.cloud(c).await?;
        let mut vms: Vec<Vm> = self.list(&keys::vms(c)).await?;
        let statuses = self.store.range(&keys::vm_statuses(c), None, 0).await?;
        let mut by_name = HashMap::new();
        for kv in statuses {
            let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
            by_name.insert(name, decode::<VmStatus>(&kv.key, &kv.value)?);
        }
        for vm in &mut vms {
            vm.status = Some(
                by_name
                    .remove(&vm.name)
                    .unwrap_or_else(|| pending(vm.created_at)),
            );
            vm.host_live = self.host_live(&vm.host);
        }
        Ok(Reply::Vms(vms))
    }

    async fn delete_vm(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        for _ in 0..MAX_RETRIES {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            let (vrev, vm) = self.vm(c, name).await?;
            let mut compares = vec![
                Compare::ModRevision(keys::cloud(c), rev),
                Compare::ModRevision(keys::vm(c, name), vrev),
            ];
            cloud.usage.vms = cloud.usage.vms.saturating_sub(1);
            cloud.usage.vcpus = cloud.usage.vcpus.saturating_sub(vm.vcpus);
            cloud.usage.memory_mib = cloud.usage.memory_mib.saturating_sub(vm.memory_mib);
            let mut ops = vec![
                put(keys::cloud(c), &cloud),
                Op::Delete {
                    key: keys::vm(c, name),
                },
                Op::Delete {
                    key: keys::vm_status(c, name),
                },
                Op::Delete {
                    key: keys::vm_console(c, name),
                },
                Op::Delete {
                    key: keys::ip(c, vm.ipv4),
                },
                Op::Delete {
                    key: keys::placement(&vm.host, c, name),
                },
            ];
            for v in &vm.volumes {
                if let Ok((volrev, mut vol)) = self.volume(c, v).await {
                    vol.attached_to = None;
                    compares.push(Compare::ModRevision(keys::volume(c, v), volrev));
                    ops.push(put(keys::volume(c, v), &vol));
                }
            }
            if self
                .commit(Txn {
                    compares,
                    success: ops,
                })
                .await?
                .is_some()
            {
                return Ok(Reply::Done);
            }
        }
        Err(CoreError::Contention(format!("VM {name}")))
    }

    // ----- volumes -----

    async fn volume(&self, c: CloudId, name: &str) -> Result<(u64, Volume), CoreError> {
        self.read(&keys::volume(c, name), || {
            format!("volume {name} in cloud {c}")
        })
        .await
    }

    async fn create_volume(&self, c: CloudId, req: CreateVolume) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        if !(1..=65_536).contains(&req.size_gib) {
            return Err(FieldError::new("size_gib", "must be 1 to 65536").into());
        }
        for _ in 0..MAX_RETRIES {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            if self.store.get(&keys::volume(c, &req.name)).await?.is_some() {
                return Err(conflict(
                    "exists",
                    format!("volume {} exists in cloud {c}", req.name),
                ));
            }
            let wanted = cloud.usage.volume_gib + req.size_gib;
            check_quota("volume_gib", wanted, cloud.quotas.volume_gib)?;
            cloud.usage.volume_gib = wanted;
            let host = self.pick_host(c)?;
            let vol = Volume {
                cloud: c,
                name: req.name.clone(),
                size_gib: req.size_gib,
                format: req.format,
                host: host.clone(),
                attached_to: None,
                created_at: now(),
            };
            let placement = VolumePlacement {
                cloud: c,
                name: req.name.clone(),
                size_gib: req.size_gib,
                format: req.format,
            };
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::cloud(c), rev),
                    Compare::Absent(keys::volume(c, &req.name)),
                ],
                success: vec![
                    put(keys::cloud(c), &cloud),
                    put(keys::volume(c, &req.name), &vol),
                    put(keys::volume_placement(&host, c, &req.name), &placement),
                ],
            };
            if self.commit(txn).await?.is_some() {
                self.placed(&keys::volume_placement(&host, c, &req.name));
                return Ok(Reply::Volume(vol));
            }
        }
        Err(CoreError::Contention(format!("cloud {c}")))
    }

    async fn delete_volume(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        for _ in 0..MAX_RETRIES {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            let (vrev, vol) = self.volume(c, name).await?;
            if let Some(vm) = &vol.attached_to {
                return Err(conflict(
                    "attached",
                    format!("volume {name} is attached to VM {vm}; detach it first"),
                ));
            }
            cloud.usage.volume_gib = cloud.usage.volume_gib.saturating_sub(vol.size_gib);
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::cloud(c), rev),
                    Compare::ModRevision(keys::volume(c, name), vrev),
                ],
                success: vec![
                    put(keys::cloud(c), &cloud),
                    Op::Delete {
                        key: keys::volume(c, name),
                    },
                    Op::Delete {
                        key: keys::volume_placement(&vol.host, c, name),
                    },
                ],
            };
            if self.commit(txn).await?.is_some() {
                return Ok(Reply::Done);
            }
        }
        Err(CoreError::Contention(format!("volume {name}")))
    }

    async fn attach_volume(
        &self,
        c: CloudId,
        name: &str,
        to: Option<String>,
    ) -> Result<Reply, CoreError> {
        if let Some(vm) = &to {
            validate_label("vm", vm)?;
        }
        for _ in 0..MAX_RETRIES {
            let (vrev, mut vol) = self.volume(c, name).await?;
            let target = match (&to, &vol.attached_to) {
                (Some(_), Some(cur)) => {
                    return Err(conflict(
                        "attached",
                        format!("volume {name} is attached to VM {cur}"),
                    ))
                }
                (None, None) => {
                    return Err(conflict(
                        "not_attached",
                        format!("volume {name} is not attached"),
                    ))
                }
                (Some(vm), None) => vm.clone(),
                (None, Some(cur)) => cur.clone(),
            };
            let (mrev, mut vm) = self.vm(c, &target).await?;
            if vm.host != vol.host {
                return Err(conflict(
                    "hosts_differ",
                    format!(
                        "volume {name} is on host {} but VM {target} is on {}",
                        vol.host, vm.host
                    ),
                ));
            }
            if to.is_some() {
                if vm.volumes.len() >= MAX_VOLUMES_PER_VM {
                    return Err(conflict(
                        "too_many_volumes",
                        format!(
                            "VM {target} holds {} volumes, the most a VM may hold",
                            vm.volumes.len()
                        ),
                    ));
                }
                vol.attached_to = Some(target.clone());
                vm.volumes.push(name.to_string());
            } else {
                vol.attached_to = None;
                vm.volumes.retain(|v| v != name);
            }
            let (_, cloud) = self.cloud(c).await?;
            let placement = placement(&vm, &cloud);
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::volume(c, name), vrev),
                    Compare::ModRevision(keys::vm(c, &target), mrev),
                ],
                success: vec![
                    put(keys::volume(c, name), &vol),
                    put(keys::vm(c, &target), &vm),
                    put(keys::placement(&vm.host, c, &target), &placement),
                ],
            };
            if self.commit(txn).await?.is_some() {
                return Ok(Reply::Volume(vol));
            }
        }
        Err(CoreError::Contention(format!("volume {name}")))
    }

    // ----- DNS -----

    async fn put_record_set(
        &self,
        c: CloudId,
        name: String,
        rtype: RecordType,
        req: PutRecordSet,
    ) -> Result<Reply, CoreError> {
        validate_record_set(&name, rtype, &req)?;
        let (_, cloud) = self.cloud(c).await?;
        // Hosts' DNS servers refuse a record with a name over DNS's 253 characters: the name
        // must fit with the zone's apex.
        if name != "@" {
            validate_domain_name("name", &format!("{name}.{}", cloud.zone))?;
        }
        if !name.contains('.') && self.store.get(&keys::vm(c, &name)).await?.is_some() {
            return Err(conflict(
                "reserved",
                format!("{name} is VM {name}'s automatic name"),
            ));
        }
        // CNAME excludes every other type at the same name.
        let at_name = self
            .store
            .range(&format!("{}{name}/", keys::records(c)), None, 0)
            .await?;
        let others: Vec<&str> = at_name
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .filter(|t| *t != rtype.as_str())
            .collect();
        if (rtype == RecordType::Cname && !others.is_empty())
            || (rtype != RecordType::Cname && others.contains(&"CNAME"))
        {
            return Err(conflict(
                "cname_conflict",
                format!("{name} cannot hold a CNAME and other records"),
            ));
        }
        let rs = RecordSet {
            name: name.clone(),
            rtype,
            ttl: req.ttl,
            values: req.values,
            automatic: false,
        };
        let mut compares = vec![Compare::Present(keys::cloud(c))];
        if !name.contains('.') {
            // A VM created meanwhile under this name (see above).
            compares.push(Compare::Absent(keys::vm(c, &name)));
        }
        let txn = Txn {
            compares,
            success: vec![put(keys::record(c, &name, rtype.as_str()), &rs)],
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok(Reply::RecordSet(rs)),
            TxnOutcome::Failed { failed_compare: 0 } => {
                Err(CoreError::NotFound(format!("cloud {c}")))
            }
            TxnOutcome::Failed { .. } => Err(conflict(
                "reserved",
                format!("{name} is VM {name}'s automatic name"),
            )),
        }
    }

    async fn list_record_sets(&self, c: CloudId) -> Result<Reply, CoreError> {
        let (_, cloud) = self.cloud(c).await?;
        let mut out: Vec<RecordSet> = self.list(&keys::records(c)).await?;
        for vm in self.list::<Vm>(&keys::vms(c)).await? {
            out.push(RecordSet {
                name: vm.name,
                rtype: RecordType::A,
                ttl: 30,
                values: vec![vm.ipv4.to_string()],
                automatic: true,
            });
        }
        for g in self.list::<Grant>(&keys::imports(c)).await? {
            if g.state == GrantState::Active {
                out.push(RecordSet {
                    name: g
                        .fqdn
                        .strip_suffix(&format!(".{}", cloud.zone))
                        .unwrap_or(&g.fqdn)
                        .to_string(),
                    rtype: RecordType::A,
                    ttl: 30,
                    values: vec![g.vip.to_string()],
                    automatic: true,
                });
            }
        }
        Ok(Reply::RecordSets(out))
    }

    async fn delete_record_set(
        &self,
        c: CloudId,
        name: &str,
        rtype: RecordType,
    ) -> Result<Reply, CoreError> {
        let key = keys::record(c, name, rtype.as_str());
        let txn = Txn {
            compares: vec![Compare::Present(key.clone())],
            success: vec![Op::Delete { key }],
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::Done),
            None => Err(CoreError::NotFound(format!(
                "record set {name} {} in cloud {c}",
                rtype.as_str()
            ))),
        }
    }

    /// The zone of a cloud as hosts serve it: VMs' names, record sets, active imports.
    pub async fn zone(&self, c: CloudId) -> Result<Option<Zone>, CoreError> {
        let Ok((_, cloud)) = self.cloud(c).await else {
            return Ok(None);
        };
        let mut records = Vec::new();
        let Reply::RecordSets(sets) = self.list_record_sets(c).await? else {
            unreachable!("list_record_sets returns RecordSets")
        };
        for rs in sets {
            let fqdn = if rs.name == "@" {
                cloud.zone.clone()
            } else if rs.automatic && rs.name.ends_with('.') {
                rs.name.clone()
            } else {
                format!("{}.{}", rs.name, cloud.zone)
            };
            records.push(ZoneRecord {
                fqdn,
                rtype: rs.rtype,
                ttl: rs.ttl,
                values: rs.values,
            });
        }
        Ok(Some(Zone {
            cloud: c,
            apex: cloud.zone,
            records,
        }))
    }

    // ----- exposures and grants -----

    async fn exposure(&self, c: CloudId, name: &str) -> Result<(u64, Exposure), CoreError> {
        self.read(&keys::exposure(c, name), || {
            format!("exposure {name} of cloud {c}")
        })
        .await
    }

    async fn create_exposure(&self, c: CloudId, req: CreateExposure) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        if req.port == 0 {
            return Err(FieldError::new("port", "must be 1 to 65535").into());
        }
        if req.backends.is_empty() || req.backends.len() > MAX_BACKENDS {
            return Err(FieldError::new(
                "backends",
                format!(
                    "{} backends: must hold 1 to {MAX_BACKENDS} (what the dataplane holds per \
                     exposure)",
                    req.backends.len()
                ),
            )
            .into());
        }
        for (i, b) in req.backends.iter().enumerate() {
            validate_label(&format!("backends[{i}].vm"), &b.vm)?;
            if b.port == 0 {
                return Err(
                    FieldError::new(format!("backends[{i}].port"), "must be 1 to 65535").into(),
                );
            }
            if self.store.get(&keys::vm(c, &b.vm)).await?.is_none() {
                return Err(FieldError::new(
                    format!("backends[{i}].vm"),
                    format!("no VM {} in this cloud", b.vm),
                )
                .into());
            }
        }
        self.cloud(c).await?;
        let count = self.store.count(&keys::exposures(c)).await?;
        check_quota(
            "exposures",
            count + 1,
            self.cfg.max_exposures_per_cloud as u64,
        )?;
        let exp = Exposure {
            cloud: c,
            name: req.name.clone(),
            protocol: req.protocol,
            port: req.port,
            backends: req.backends,
            require_acceptance: false,
            created_at: now(),
        };
        let txn = Txn {
            compares: vec![
                Compare::Present(keys::cloud(c)),
                Compare::Absent(keys::exposure(c, &req.name)),
            ],
            success: vec![put(keys::exposure(c, &req.name), &exp)],
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok(Reply::Exposure(exp)),
            TxnOutcome::Failed { failed_compare: 0 } => {
                Err(CoreError::NotFound(format!("cloud {c}")))
            }
            TxnOutcome::Failed { .. } => {
                Err(conflict("exists", format!("exposure {} exists", req.name)))
            }
        }
    }

    async fn delete_exposure(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        for _ in 0..MAX_RETRIES {
            let (rev, _) = self.exposure(c, name).await?;
            let grants: Vec<(String, u64, Grant)> = self.list_kv(&keys::grants(c, name)).await?;
            let offers: Vec<(String, u64, Offer)> = self.list_kv(&keys::offers(c, name)).await?;
            let own = Txn {
                compares: vec![Compare::ModRevision(keys::exposure(c, name), rev)],
                success: vec![
                    Op::Delete {
                        key: keys::exposure(c, name),
                    },
                    Op::DeletePrefix {
                        prefix: keys::grants(c, name),
                    },
                ],
            };
            // The consumers' imports and VIPs go too, and its pending offers.
            let revocations = grants
                .iter()
                .map(|(key, grev, g)| Revocation::new(g, key, *grev))
                .chain(
                    offers
                        .iter()
                        .map(|(key, orev, o)| Revocation::offer(o, key, *orev)),
                )
                .collect();
            let too_large = |size, limit| CoreError::TxnTooLarge {
                what: format!("deleting exposure {name}"),
                size,
                limit,
                hint: "raise both limits".into(),
            };
            if self
                .commit_delete(own, &keys::grants(c, name), revocations, too_large)
                .await?
            {
                return Ok(Reply::Done);
            }
        }
        Err(CoreError::Contention(format!("exposure {name}")))
    }

    /// Offers exposure `exp_name` of `c` to `consumer` (see the module docs, "Grants are
    /// offers"). Never reads the consumer's cloud record: the reply, and every error, is the
    /// same whether `consumer` exists, unless the consumer's policy lists `c`.
    async fn create_offer(
        &self,
        c: CloudId,
        exp_name: &str,
        consumer: CloudId,
    ) -> Result<Reply, CoreError> {
        if consumer == c {
            return Err(FieldError::new("consumer", "a cloud cannot grant to itself").into());
        }
        // Offers count as grants of the exposure: a provider's records stay bounded however
        // many cloud ids it offers to.
        let (_, exp) = self.exposure(c, exp_name).await?;
        let count = self.store.count(&keys::grants(c, exp_name)).await?
            + self.store.count(&keys::offers(c, exp_name)).await?;
        check_quota("grants", count + 1, self.cfg.max_grants_per_exposure as u64)?;
        if self.offer_policy(consumer).await?.accept_from.contains(&c) {
            if let Some(g) = self.activate(c, exp_name, consumer, None).await? {
                return Ok(Reply::Offer(Offer {
                    provider: c,
                    exposure: g.exposure,
                    consumer,
                    protocol: exp.protocol,
                    port: exp.port,
                    state: OfferState::Accepted,
                    created_at: g.created_at,
                }));
            }
            // The consumer was deleted meanwhile: an offer like to any unknown id.
        }
        // What the provider knows already (its own records) is told before any bound.
        if self
            .store
            .get(&keys::grant(c, exp_name, consumer))
            .await?
            .is_some()
        {
            return Err(conflict(
                "exists",
                format!("exposure {exp_name} is already granted to {consumer}"),
            ));
        }
        if self
            .store
            .get(&keys::offer(c, exp_name, consumer))
            .await?
            .is_some()
        {
            return Err(conflict(
                "exists",
                format!("exposure {exp_name} is already offered to {consumer}"),
            ));
        }
        // The consumer's bounds, counted on its inbox, which exists alike for unknown ids.
        let pending = self.store.count(&keys::inbox(consumer)).await?;
        let from_here = self.store.count(&keys::inbox_from(consumer, c)).await?;
        if pending >= self.cfg.max_pending_offers_per_cloud as u64
            || from_here >= self.cfg.max_pending_offers_per_provider as u64
        {
            return Err(CoreError::OfferRefused(consumer));
        }
        for _ in 0..MAX_RETRIES {
            let (erev, exp) = self.exposure(c, exp_name).await?;
            // The provider's records are written back unchanged, so that a delete of the
            // exposure or of the provider that read its offers before this one commits fails
            // its compare and re-reads (as grants do, see the module docs).
            let (prev, provider) = self.cloud_record(c).await?;
            let offer = Offer {
                provider: c,
                exposure: exp_name.to_string(),
                consumer,
                protocol: exp.protocol,
                port: exp.port,
                state: OfferState::Pending,
                created_at: now(),
            };
            let txn = Txn {
                compares: vec![
                    Compare::Absent(keys::grant(c, exp_name, consumer)),
                    Compare::Absent(keys::offer(c, exp_name, consumer)),
                    Compare::ModRevision(keys::exposure(c, exp_name), erev),
                    Compare::ModRevision(keys::cloud(c), prev),
                ],
                success: vec![
                    put(keys::offer(c, exp_name, consumer), &offer),
                    put(keys::inbox_entry(consumer, c, exp_name), &offer),
                    put(keys::exposure(c, exp_name), &exp),
                    put(keys::cloud(c), &provider),
                ],
            };
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { .. } => return Ok(Reply::Offer(offer)),
                TxnOutcome::Failed { failed_compare: 0 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already granted to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { failed_compare: 1 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already offered to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { .. } => continue,
            }
        }
        Err(CoreError::Contention(format!("exposure {exp_name}")))
    }

    /// Makes exposure `exp_name` of `provider` an active grant to `consumer`: the VIP from the
    /// consumer's range, the NAT address from the provider's, the grant and the consumer's
    /// import. With `offer` (its key and revision as read), the pending offer it accepts goes
    /// in the same transaction. `None` if the consumer does not exist.
    async fn activate(
        &self,
        provider_id: CloudId,
        exp_name: &str,
        consumer: CloudId,
        offer: Option<(&Offer, String, u64)>,
    ) -> Result<Option<Grant>, CoreError> {
        let c = provider_id;
        for _ in 0..MAX_RETRIES {
            // Re-read every round: an exposure (or provider) deleted meanwhile is a 404.
            let (erev, exp) = self.exposure(c, exp_name).await?;
            // Both cloud records and the exposure are written back unchanged: a delete of
            // either cloud or of the exposure that read its grants before this one commits
            // then fails its compare and re-reads, so it revokes this grant too instead of
            // leaving its halves behind.
            let (prev, provider) = self.cloud_record(c).await?;
            let (crev, ccloud) = match self.cloud_record(consumer).await {
                Ok(v) => v,
                Err(CoreError::NotFound(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            let vip = self.allocate_ip(&ccloud).await?;
            let nat_ipv4 = self.allocate_ip(&provider).await?;
            let grant = Grant {
                reason: None,
                provider: c,
                exposure: exp_name.to_string(),
                consumer,
                state: GrantState::Active,
                vip,
                // The provider's id, not its name: names of clouds are not unique, ids are,
                // and (id, exposure) is the grant's key, so no two grants share a name.
                fqdn: format!("{}.{c}.svc.{}", exp.name, ccloud.zone),
                nat_ipv4,
                created_at: now(),
            };
            let mut txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::exposure(c, exp_name), erev),
                    Compare::ModRevision(keys::cloud(consumer), crev),
                    Compare::Absent(keys::grant(c, exp_name, consumer)),
                    Compare::Absent(keys::ip(consumer, vip)),
                    Compare::Absent(keys::ip(c, nat_ipv4)),
                    Compare::ModRevision(keys::cloud(c), prev),
                ],
                success: vec![
                    put(keys::grant(c, exp_name, consumer), &grant),
                    put(keys::import(consumer, c, exp_name), &grant),
                    put(keys::ip(consumer, vip), &format!("vip:{c}/{exp_name}")),
                    put(keys::ip(c, nat_ipv4), &format!("nat:{consumer}/{exp_name}")),
                    put(keys::cloud(c), &provider),
                    put(keys::cloud(consumer), &ccloud),
                    put(keys::exposure(c, exp_name), &exp),
                ],
            };
            match &offer {
                Some((o, key, rev)) => {
                    let r = Revocation::offer(o, key, *rev);
                    txn.compares.push(r.guard);
                    txn.success.extend(r.ops);
                }
                None => txn
                    .compares
                    .push(Compare::Absent(keys::offer(c, exp_name, consumer))),
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { .. } => return Ok(Some(grant)),
                TxnOutcome::Failed { failed_compare: 2 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already granted to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { failed_compare: 6 } => {
                    return Err(match offer {
                        Some(_) => CoreError::NotFound(format!(
                            "offer of {provider_id}/{exp_name} to {consumer}"
                        )),
                        None => conflict(
                            "exists",
                            format!("exposure {exp_name} is already offered to {consumer}"),
                        ),
                    })
                }
                TxnOutcome::Failed { .. } => continue,
            }
        }
        Err(CoreError::Contention(format!("cloud {consumer}")))
    }

    /// The consumer accepts a pending offer: it becomes an active grant.
    async fn accept_offer(
        &self,
        consumer: CloudId,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let key = keys::offer(provider, exp, consumer);
        let (rev, o): (u64, Offer) = self
            .read(&key, || format!("offer of {provider}/{exp} to {consumer}"))
            .await?;
        match self
            .activate(provider, exp, consumer, Some((&o, key, rev)))
            .await?
        {
            Some(g) => Ok(Reply::Grant(
                self.effective(vec![g]).await?.pop().expect("one grant"),
            )),
            None => Err(CoreError::NotFound(format!("cloud {consumer}"))),
        }
    }

    /// The consumer declines a pending offer: both records go.
    async fn decline_offer(
        &self,
        consumer: CloudId,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let key = keys::inbox_entry(consumer, provider, exp);
        let (rev, o): (u64, Offer) = self
            .read(&key, || format!("offer of {provider}/{exp} to {consumer}"))
            .await?;
        self.commit_revocation(Revocation::offer(&o, &key, rev), provider, exp)
            .await
    }

    async fn commit_revocation(
        &self,
        r: Revocation,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let txn = Txn {
            compares: vec![r.guard],
            success: r.ops,
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::Done),
            None => Err(CoreError::Contention(format!("grant {provider}/{exp}"))),
        }
    }

    /// Revokes an active grant, or withdraws a pending offer.
    async fn revoke_grant(
        &self,
        provider: CloudId,
        exp: &str,
        consumer: CloudId,
    ) -> Result<Reply, CoreError> {
        let gkey = keys::grant(provider, exp, consumer);
        if let Some(kv) = self.store.get(&gkey).await? {
            let g: Grant = decode(&kv.key, &kv.value)?;
            let r = Revocation::new(&g, &gkey, kv.mod_revision);
            return self.commit_revocation(r, provider, exp).await;
        }
        let okey = keys::offer(provider, exp, consumer);
        let (rev, o): (u64, Offer) = self
            .read(&okey, || format!("grant of {provider}/{exp} to {consumer}"))
            .await?;
        self.commit_revocation(Revocation::offer(&o, &okey, rev), provider, exp)
            .await
    }

    /// A cloud's offer policy (empty if never set, or if the cloud does not exist).
    async fn offer_policy(&self, c: CloudId) -> Result<OfferPolicy, CoreError> {
        match self.store.get(&keys::offer_policy(c)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Ok(OfferPolicy::default()),
        }
    }

    async fn put_offer_policy(&self, c: CloudId, req: OfferPolicy) -> Result<Reply, CoreError> {
        if req.accept_from.len() > MAX_ACCEPT_FROM {
            return Err(FieldError::new(
                "accept_from",
                format!(
                    "{} providers; at most {MAX_ACCEPT_FROM}",
                    req.accept_from.len()
                ),
            )
            .into());
        }
        let mut accept_from = req.accept_from;
        accept_from.sort();
        accept_from.dedup();
        let policy = OfferPolicy { accept_from };
        let txn = Txn {
            compares: vec![Compare::Present(keys::cloud(c))],
            success: vec![put(keys::offer_policy(c), &policy)],
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::OfferPolicy(policy)),
            None => Err(CoreError::NotFound(format!("cloud {c}"))),
        }
    }

    // ----- hosts -----

    async fn register_host(&self, name: String) -> Result<Reply, CoreError> {
        validate_label("name", &name)?;
        let info: HostInfo = match self.store.get(&keys::host(&name)).await? {
            Some(kv) => decode(&kv.key, &kv.value)?,
            None => {
                let info = new_host(&name);
                self.store
                    .txn(Txn {
                        compares: vec![Compare::Absent(keys::host(&name))],
                        success: vec![put(keys::host(&name), &info)],
                    })
                    .await?;
                info
            }
        };
        self.host_recorded(&info);
        // A registration is a sign of life, too.
        self.heartbeat(&name).await?;
        Ok(Reply::Host(self.host_view(info)))
    }

    /// Sets whether `name` takes new placements (it must be registered).
    async fn cordon_host(&self, name: String, cordoned: bool) -> Result<Reply, CoreError> {
        validate_label("host", &name)?;
        for _ in 0..MAX_RETRIES {
            let (rev, mut info): (u64, HostInfo) = self
                .read(&keys::host(&name), || format!("host {name}"))
                .await?;
            info.cordoned = cordoned;
            info.live = false;
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::host(&name), rev)],
                success: vec![put(keys::host(&name), &info)],
            };
            if self.commit(txn).await?.is_some() {
                self.host_recorded(&info);
                return Ok(Reply::Host(self.host_view(info)));
            }
        }
        Err(CoreError::Contention(format!("host {name}")))
    }

    /// A host record as the API shows it: no token hash, liveness computed.
    fn host_view(&self, mut h: HostInfo) -> HostInfo {
        h.token_sha256.clear();
        h.last_seen = h.last_seen.max(h.registered_at);
        h.live = self.live_at(h.last_seen, now());
        h
    }

    /// Records that `host` was heard from, at most once per [`HEARTBEAT_SECS`] (store writes
    /// stay at one per host per interval). Never creates a host record, and never overwrites a
    /// concurrent change of it (a token rotation): a lost compare is left to the next sync.
    async fn heartbeat(&self, host: &str) -> Result<(), CoreError> {
        let now = now();
        if self
            .last_seen(host)
            .is_none_or(|s| now < s + HEARTBEAT_SECS)
        {
            return Ok(());
        }
        let Some(kv) = self.store.get(&keys::host(host)).await? else {
            return Ok(());
        };
        let mut info: HostInfo = decode(&kv.key, &kv.value)?;
        if now < info.last_seen + HEARTBEAT_SECS {
            return Ok(());
        }
        info.last_seen = now;
        info.live = false;
        let txn = Txn {
            compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
            success: vec![put(kv.key, &info)],
        };
        if self.commit(txn).await?.is_some() {
            self.host_recorded(&info);
        }
        Ok(())
    }

    /// Registers `name` if needed and gives it a new token, which replaces any earlier one
    /// (rotation: the old token stops working at once).
    async fn issue_host_token(&self, name: String) -> Result<Reply, CoreError> {
        validate_label("name", &name)?;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
        let token = format!("atl_host_{name}_{secret}");
        for _ in 0..MAX_RETRIES {
            let (compare, mut info) = match self.store.get(&keys::host(&name)).await? {
                Some(kv) => (
                    Compare::ModRevision(kv.key.clone(), kv.mod_revision),
                    decode::<HostInfo>(&kv.key, &kv.value)?,
                ),
                None => (Compare::Absent(keys::host(&name)), new_host(&name)),
            };
            info.token_sha256 = token_hash(&token);
            let txn = Txn {
                compares: vec![compare],
                success: vec![put(keys::host(&name), &info)],
            };
            if self.commit(txn).await?.is_some() {
                self.host_recorded(&info);
                let host = self.host_view(info);
                return Ok(Reply::HostToken(Box::new(HostToken { host, token })));
            }
        }
        Err(CoreError::Contention(format!("host {name}")))
    }

    async fn report_status(&self, host: &str, report: StatusReport) -> Result<Reply, CoreError> {
        validate_label("host", host)?;
        for r in &report.vms {
            // Only VMs placed on this host: a host cannot write another's status. A VM deleted
            // or moved meanwhile fails the compare; its status no longer matters.
            let key = keys::placement(host, r.cloud, &r.vm);
            let mut success = vec![put(keys::vm_status(r.cloud, &r.vm), &r.status)];
            if let Some(text) = &r.console {
                let console = Console {
                    text: console_tail(text).to_string(),
                    updated_at: now(),
                };
                success.push(put(keys::vm_console(r.cloud, &r.vm), &console));
            }
            let txn = Txn {
                compares: vec![Compare::Present(key)],
                success,
            };
            self.commit(txn).await?;
        }
        for s in &report.services {
            // Only of clouds this host runs: a host cannot mark another's grant failed.
            let runs = |c: CloudId| {
                let st = self.feed.state.lock().expect("feed lock");
                st.placements.get(host).is_some_and(|m| m.contains_key(&c))
            };
            if !runs(s.provider) && !runs(s.consumer) {
                continue;
            }
            let key = keys::service_failure(s.provider, s.consumer, s.vip);
            match &s.error {
                Some(message) => {
                    let failure = ServiceFailure {
                        host: host.to_string(),
                        message: message.chars().take(512).collect(),
                        at: now(),
                    };
                    self.commit(Txn {
                        compares: vec![],
                        success: vec![put(key, &failure)],
                    })
                    .await?;
                }
                None => {
                    // Installed here now: clear this host's failure, not another host's.
                    if let Some(kv) = self.store.get(&key).await? {
                        let f: ServiceFailure = decode(&key, &kv.value)?;
                        if f.host == host {
                            self.commit(Txn {
                                compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                                success: vec![Op::Delete { key }],
                            })
                            .await?;
                        }
                    }
                }
            }
        }
        Ok(Reply::Done)
    }

    /// Changes of `host`'s desired state after revision `after` (0: everything), waiting up to
    /// `wait` for some to happen. Only the operator (or the in-process agent) may call it.
    pub async fn sync(
        &self,
        principal: Principal,
        host: &str,
        after: u64,
        wait: Duration,
    ) -> Result<SyncDelta, CoreError> {
        authorize_host(&principal, host)?;
        validate_label("host", host)?;
        // Every sync is a sign of life (see `heartbeat` for the write rate).
        self.heartbeat(host).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.feed.latest.subscribe();
        let mut after = after;
        loop {
            let latest = *rx.borrow_and_update();
            let events = {
                let st = self.feed.state.lock().expect("feed lock");
                if after == 0 || after < st.complete_after || latest == u64::MAX {
                    None
                } else {
                    let relevant: Vec<(String, Option<Vec<u8>>, bool)> = if latest > after {
                        let prefix = keys::host_all(host);
                        let clouds = st.placements.get(host);
                        st.ring
                            .iter()
                            .filter(|e| e.revision > after)
                            .filter(|e| {
                                let here = |c: CloudId| clouds.is_some_and(|m| m.contains_key(&c));
                                e.key.starts_with(&prefix)
                                    || zone_cloud(&e.key).is_some_and(here)
                                    || service_cloud(&e.key).is_some_and(here)
                            })
                            .map(|e| (e.key.clone(), e.value.clone(), e.deleted))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    Some(relevant)
                }
            };
            let Some(events) = events else {
                return self.snapshot(host).await;
            };
            if !events.is_empty() {
                return self.delta(host, latest, events).await;
            }
            after = after.max(latest);
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return Ok(SyncDelta { revision: after, ..SyncDelta::default() });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(SyncDelta { revision: after, ..SyncDelta::default() });
                }
            }
        }
    }

    async fn delta(
        &self,
        host: &str,
        revision: u64,
        events: Vec<(String, Option<Vec<u8>>, bool)>,
    ) -> Result<SyncDelta, CoreError> {
        let mut vms: BTreeMap<(CloudId, String), Option<Placement>> = BTreeMap::new();
        let mut volumes: BTreeMap<(CloudId, String), Option<VolumePlacement>> = BTreeMap::new();
        let mut touched: BTreeSet<CloudId> = BTreeSet::new();
        let mut providers: BTreeSet<CloudId> = BTreeSet::new();
        for (key, value, deleted) in events {
            if let Some(p) = service_cloud(&key) {
                providers.insert(p);
            }
            if let Some((h, is_vm, cloud, name)) = parse_placement_key(&key) {
                if h != host {
                    continue;
                }
                touched.insert(cloud);
                let id = (cloud, name.to_string());
                if is_vm {
                    let v = match (&value, deleted) {
                        (Some(v), false) => Some(decode(&key, v)?),
                        _ => None,
                    };
                    vms.insert(id, v);
                } else {
                    let v = match (&value, deleted) {
                        (Some(v), false) => Some(decode(&key, v)?),
                        _ => None,
                    };
                    volumes.insert(id, v);
                }
            } else if let Some(c) = zone_cloud(&key) {
                touched.insert(c);
            }
        }
        let mut d = SyncDelta {
            revision,
            ..SyncDelta::default()
        };
        for ((cloud, vm), p) in vms {
            match p {
                Some(p) => d.vms.push(p),
                None => d.removed_vms.push(VmRef { cloud, vm }),
            }
        }
        for ((cloud, name), p) in volumes {
            match p {
                Some(p) => d.volumes.push(p),
                None => d.removed_volumes.push(VolumeRef { cloud, name }),
            }
        }
        let present: HashSet<CloudId> = {
            let st = self.feed.state.lock().expect("feed lock");
            st.placements
                .get(host)
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default()
        };
        for c in touched {
            match present.contains(&c) {
                true => match self.zone(c).await? {
                    Some(z) => d.zones.push(z),
                    None => d.removed_zones.push(c),
                },
                false => d.removed_zones.push(c),
            }
        }
        // A placement change can also make a provider appear on or leave this host.
        providers.extend(d.vms.iter().map(|p| p.cloud));
        providers.extend(d.removed_vms.iter().map(|r| r.cloud));
        for p in providers {
            let services = match present.contains(&p) {
                true => self.services_of(p).await?,
                false => Vec::new(),
            };
            d.services.push(ProviderServices {
                provider: p,
                services,
            });
        }
        Ok(d)
    }

    /// The active grants of provider `p`, resolved for a host's dataplane. Hosts apply the
    /// services of the providers that have VMs on them: a backend is reached on its own host,
    /// where the NAT happens (see docs/design.md, "Exposures").
    async fn services_of(&self, p: CloudId) -> Result<Vec<Service>, CoreError> {
        let exposures: Vec<Exposure> = self.list(&keys::exposures(p)).await?;
        if exposures.is_empty() {
            return Ok(Vec::new());
        }
        let vms: HashMap<String, Ipv4Addr> = self
            .list::<Vm>(&keys::vms(p))
            .await?
            .into_iter()
            .map(|v| (v.name, v.ipv4))
            .collect();
        let mut out = Vec::new();
        for e in exposures {
            let backends: Vec<ServiceBackend> = e
                .backends
                .iter()
                .filter_map(|b| {
                    vms.get(&b.vm).map(|ip| ServiceBackend {
                        ipv4: *ip,
                        port: b.port,
                    })
                })
                .collect();
            let grants: Vec<Grant> = self.list(&keys::grants(p, &e.name)).await?;
            for g in grants.into_iter().filter(|g| g.state == GrantState::Active) {
                out.push(Service {
                    consumer: g.consumer,
                    vip: g.vip,
                    nat_ipv4: g.nat_ipv4,
                    protocol: e.protocol,
                    port: e.port,
                    backends: backends.clone(),
                });
            }
        }
        Ok(out)
    }

    async fn snapshot(&self, host: &str) -> Result<SyncDelta, CoreError> {
        let revision = self.store.revision().await?;
        let mut d = SyncDelta {
            revision,
            full: true,
            ..SyncDelta::default()
        };
        let mut clouds = BTreeSet::new();
        for kv in self.store.range(&keys::host_all(host), None, 0).await? {
            let Some((_, is_vm, cloud, _)) = parse_placement_key(&kv.key) else {
                continue;
            };
            clouds.insert(cloud);
            if is_vm {
                d.vms.push(decode(&kv.key, &kv.value)?);
            } else {
                d.volumes.push(decode(&kv.key, &kv.value)?);
            }
        }
        for c in clouds {
            if let Some(z) = self.zone(c).await? {
                d.zones.push(z);
            }
            let services = self.services_of(c).await?;
            if !services.is_empty() {
                d.services.push(ProviderServices {
                    provider: c,
                    services,
                });
            }
        }
        Ok(d)
    }
}

/// What a VM's host applies for it.
fn placement(vm: &Vm, cloud: &Cloud) -> Placement {
    Placement {
        cloud: vm.cloud,
        vm: vm.name.clone(),
        ipv4: vm.ipv4,
        gateway: cloud.gateway,
        mac: guest_mac(vm.ipv4),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        volumes: vm.volumes.clone(),
        fqdn: vm.fqdn.clone(),
        zone: cloud.zone.clone(),
        power: vm.power,
        kernel: vm.kernel.clone(),
        image: vm.image.clone(),
        user_data: vm.user_data.clone(),
    }
}

/// The last [`CONSOLE_TAIL_BYTES`] bytes of `text` at most, starting on a character boundary.
fn console_tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(CONSOLE_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn pending(at: u64) -> VmStatus {
    VmStatus {
        state: VmState::Pending,
        device: None,
        message: None,
        updated_at: at,
        restarts: 0,
        boot_ms: None,
        accel: None,
    }
}

fn validate_quotas(q: &Quotas) -> Result<(), FieldError> {
    let checks: [(&str, u64, u64); 5] = [
        ("quotas.vms", q.vms as u64, 100_000),
        ("quotas.vcpus", q.vcpus as u64, 1_000_000),
        ("quotas.memory_mib", q.memory_mib, 1 << 34),
        ("quotas.volume_gib", q.volume_gib, 1 << 24),
        ("quotas.bandwidth_mbps", q.bandwidth_mbps as u64, 1_000_000),
    ];
    for (field, v, max) in checks {
        if v > max {
            return Err(FieldError::new(field, format!("at most {max}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_keeps_the_last_bytes_on_a_char_boundary() {
        assert_eq!(console_tail("short"), "short");
        let exact = "x".repeat(CONSOLE_TAIL_BYTES);
        assert_eq!(console_tail(&exact), exact);
        // "é" is two bytes: the cut at len - CONSOLE_TAIL_BYTES falls inside one of them.
        let long = format!("{}{}", "é".repeat(CONSOLE_TAIL_BYTES / 2), "x");
        let tail = console_tail(&long);
        assert_eq!(tail.len(), CONSOLE_TAIL_BYTES - 1);
        assert!(tail.starts_with('é') && tail.ends_with('x'));
        assert!(long.ends_with(tail));
    }
}
