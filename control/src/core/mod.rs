//! The control plane's core: typed commands in, typed replies out, state in the [`Store`].
//!
//! The HTTP layer ([`crate::api`]) parses requests into a [`Command`] and never touches the
//! store; the core never sees HTTP types.
//!
//! One file per resource, each an `impl Core` block with that resource's operations:
//! [`clouds`], [`vms`], [`volumes`], [`dns`], [`exposures`] (offers, grants, revocations),
//! [`hosts`] (registration, heartbeats, status reports), [`placement`], [`auth`] (tokens and
//! authorization), [`feed`] (the store watch) and [`sync`] (what hosts apply); [`keys`] is the
//! store's key layout. Every read-modify-write is one [`optimistic!`] transaction, the core's
//! only retry loop. This file holds the commands, the replies, the errors and the dispatch.
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
//! - **Placement**: a VM goes to the host of its volumes; else, for a cloud with a VNI whose
//!   hosts all run the overlay, to the least loaded live overlay host (it spreads); else to the
//!   live host already holding most of its cloud (a host without the overlay reaches no
//!   other), else to the live host with the fewest VMs. Its placement record (`h/<host>/vms/<cloud>/<vm>`) is what the host applies.
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

pub use atoll_api::{Command, Issuer, Reply};

use crate::{
    model::*,
    store::{Compare, EventKind, Op, Store, StoreError, Txn, TxnOutcome},
};

mod auth;
mod budget;
mod clouds;
mod dns;
mod egress;
mod expiry;
mod exposures;
mod feed;
mod hosts;
mod keys;
mod placement;
mod publications;
mod sync;
mod usage;
use usage::USAGE_GRACE_SECS;
mod vms;
mod volumes;

pub use auth::{authorize_host, new_operator_token, token_hash};
use auth::{new_cloud_token, random_bytes};
use exposures::Revocation;
use feed::{
    egress_cloud, parse_placement_key, published_cloud, service_cloud, zone_cloud, Feed, FeedEvent,
    FeedState,
};
use vms::{console_tail, placement};

/// How often a create is retried after losing a compare to a concurrent writer.
pub(crate) const MAX_RETRIES: usize = 32;
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
    /// The egress mode of a new cloud (`clouds.default_egress`).
    pub default_egress: EgressMode,
    /// Addresses the operator gives clouds as their own egress address
    /// (`clouds.egress_pool`).
    pub egress_pool: Vec<Ipv4Net>,
    /// Addresses where clouds publish VM ports (`clouds.ingress_pool`).
    pub ingress_pool: Vec<Ipv4Net>,
    /// DNS suffix of all zones, e.g. `atoll.internal`.
    pub dns_suffix: String,
    pub max_exposures_per_cloud: u32,
    /// Published ports of one cloud (`clouds.max_publications_per_cloud`).
    pub max_publications_per_cloud: u32,
    pub max_grants_per_exposure: u32,
    /// Pending offers one consumer cloud id holds, from all providers
    /// (`clouds.max_pending_offers_per_cloud`).
    pub max_pending_offers_per_cloud: u32,
    /// Pending offers one consumer cloud id holds from one provider
    /// (`clouds.max_pending_offers_per_provider`).
    pub max_pending_offers_per_provider: u32,
    /// NAT addresses of one grant, one per consumer host
    /// (`clouds.max_nat_addresses_per_grant`).
    pub max_nat_addresses_per_grant: u32,
    /// SHA-256 (hex) of the operator token.
    pub operator_token_sha256: String,
    /// A host silent for longer is not live (`hosts.timeout_secs`).
    pub host_timeout_secs: u64,
    /// The price list (`[prices]`).
    pub prices: crate::usage::Prices,
    /// Raw usage records older than this are deleted and refused
    /// (`usage.record_retention_days`).
    pub usage_retention_secs: u64,
    /// Who bills (FOCUS `BillingAccountId`/`Name`, `InvoiceIssuerName`): `[prices]
    /// billing_account`.
    pub billing_account: String,
}

/// A syncing host's `last_seen` is rewritten once it is this old (one store write per host
/// per interval, however often it syncs).
pub const HEARTBEAT_SECS: u64 = 20;

/// The smallest `hosts.timeout_secs`: a healthy host syncs at least every
/// [`atoll_api::routes::MAX_SYNC_WAIT_MS`], and its heartbeat may be [`HEARTBEAT_SECS`] stale.
pub const MIN_HOST_TIMEOUT_SECS: u64 = 60 + HEARTBEAT_SECS + 10;

/// The control plane's core. Cheap to share (`Arc`).
pub struct Core {
    store: Store,
    cfg: CoreConfig,
    feed: Arc<Feed>,
    /// Budgets' cost of earlier hours ([`budget::Prior`]).
    budget_prior: budget::Prior,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn now() -> u64 {
    now_ms() / 1000
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// Runs one optimistic transaction: `attempt` (an async block) reads what it needs, builds a
/// [`Txn`] guarded by the revisions it read (`Absent`, `ModRevision` compares) and commits it,
/// answering [`done`] with the result or [`retry`] when a compare failed (a concurrent writer
/// won) and it must read again. Attempts are bounded ([`MAX_RETRIES`]); running out is
/// [`CoreError::Contention`] on `what`. Errors end the transaction at once. This is the only
/// retry loop of the core: every read-modify-write goes through it.
///
/// A macro rather than a method taking an async closure: the futures of `AsyncFnMut` closures
/// cannot be proven `Send` for every lifetime (a compiler limitation), which axum's handlers
/// need; an async block awaited in place borrows what it likes.
macro_rules! optimistic {
    ($what:expr, async $attempt:block $(,)?) => {{
        let mut outcome = None;
        for _ in 0..$crate::core::MAX_RETRIES {
            let attempt: Result<$crate::core::Attempt<_>, CoreError> = async $attempt.await;
            if let $crate::core::Attempt::Done(v) = attempt? {
                outcome = Some(v);
                break;
            }
            $crate::metrics::store_conflict();
        }
        outcome.ok_or_else(|| CoreError::Contention($what))
    }};
}
pub(crate) use optimistic;

/// How one attempt of [`optimistic!`] ended.
pub(crate) enum Attempt<T> {
    Done(T),
    Retry,
}

/// Ends an optimistic transaction with `v`.
fn done<T>(v: T) -> Result<Attempt<T>, CoreError> {
    Ok(Attempt::Done(v))
}

/// Asks [`optimistic!`] to read again and retry: a compare failed.
fn retry<T>() -> Result<Attempt<T>, CoreError> {
    Ok(Attempt::Retry)
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

/// Writes the grant index key of every grant written before the index existed, once per
/// store (`migrations/grantidx` marks it done): one pass over every cloud's keys. A grant
/// revoked while the pass runs may leave its index key behind, which only makes its
/// provider's changes wake the consumer's hosts needlessly.
async fn migrate_grant_index(store: &Store) -> Result<(), CoreError> {
    if store.get(keys::grant_index_migrated()).await?.is_some() {
        return Ok(());
    }
    let mut after: Option<String> = None;
    let mut ops = Vec::new();
    loop {
        let page = store.range("c/", after.as_deref(), 10_000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for kv in &page {
            // c/<provider>/grants/<exposure>/<consumer>
            let mut parts = kv.key.splitn(5, '/');
            let (Some("c"), Some(p), Some("grants"), Some(e), Some(c)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                continue;
            };
            let (Ok(p), Ok(c)) = (p.parse(), c.parse()) else {
                continue;
            };
            ops.push(put(keys::grant_index(p, c, e), &""));
        }
    }
    ops.push(put(keys::grant_index_migrated().to_string(), &""));
    for chunk in ops.chunks(64) {
        store
            .txn(Txn {
                compares: Vec::new(),
                success: chunk.to_vec(),
            })
            .await?;
    }
    Ok(())
}

impl Core {
    /// Starts the core on `store`: loads host placements and starts the store watch that feeds
    /// [`Core::sync`].
    pub async fn start(store: Store, cfg: CoreConfig) -> Result<Arc<Core>, CoreError> {
        migrate_grant_index(&store).await?;
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
                state.apply(&kv.key, &kv.value, false, kv.mod_revision);
            }
        }
        for kv in store.range(keys::hosts(), None, 0).await? {
            state.apply(&kv.key, &kv.value, false, kv.mod_revision);
        }
        let mut after: Option<String> = None;
        loop {
            let page = store
                .range(keys::grant_indexes(), after.as_deref(), 10_000)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for kv in &page {
                state.apply(&kv.key, &kv.value, false, kv.mod_revision);
            }
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
                            st.apply(&ev.kv.key, &ev.kv.value, deleted, batch.revision);
                            // Host records (registrations, heartbeats) matter to scheduling
                            // only, and the expiry index to the reaper, never to a host's
                            // sync: they neither fill the ring nor wake the long polls.
                            if ev.kv.key.starts_with(keys::hosts())
                                || ev.kv.key.starts_with(keys::expiries())
                            {
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
                        tracing::error!("store watch ended: {e}; agents fall back to full syncs");
                        let mut st = f.state.lock().expect("feed lock");
                        st.complete_after = u64::MAX;
                        drop(st);
                        f.latest.send_replace(u64::MAX);
                        return;
                    }
                }
            }
        });
        let core = Arc::new(Core {
            store,
            cfg,
            feed,
            budget_prior: Default::default(),
        });
        expiry::spawn_reaper(Arc::downgrade(&core));
        Ok(core)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Executes one command for `principal`.
    pub async fn execute(&self, principal: Principal, cmd: Command) -> Result<Reply, CoreError> {
        self.authorize(&principal, &cmd)?;
        use Command::*;
        match cmd {
            CreateCloud { spec: req } => self.create_cloud(req).await,
            ListClouds { after, limit } => match principal {
                Principal::Operator => self.list_clouds(after, limit).await,
                Principal::Cloud(c) => Ok(Reply::Clouds(vec![self.cloud(c).await?.1])),
                Principal::Host(_) => Err(CoreError::Forbidden("list clouds".into())),
            },
            GetCloud { cloud: c } => {
                let mut cloud = self.cloud(c).await?.1;
                cloud.budget = self.budget(c).await?.map(|(_, b)| b);
                Ok(Reply::Cloud(Box::new(cloud)))
            }
            DeleteCloud { cloud: c } => self.delete_cloud(c).await,
            RotateCloudToken { cloud: c } => self.rotate_cloud_token(c).await,
            SetCloudExpiry { cloud: c, expiry } => self.set_cloud_expiry(c, expiry).await,
            CreateVm {
                cloud: c,
                spec: req,
            } => self.create_vm(c, req).await,
            ListVms { cloud: c } => self.list_vms(c).await,
            GetVm { cloud: c, vm: name } => {
                Ok(Reply::Vm(Box::new(self.vm_with_status(c, &name).await?)))
            }
            DeleteVm { cloud: c, vm: name } => self.delete_vm(c, &name).await,
            StartVm { cloud: c, vm: name } => self.set_power(c, &name, Power::Running).await,
            StopVm { cloud: c, vm: name } => self.set_power(c, &name, Power::Stopped).await,
            GetConsole { cloud: c, vm: name } => self.console(c, &name).await,
            ExecVm { cloud: c, vm, .. }
            | WriteExecStdin { cloud: c, vm, .. }
            | ReadFile { cloud: c, vm, .. }
            | WriteFile { cloud: c, vm, .. } => self.guest_target(c, &vm).await,
            CreateVolume {
                cloud: c,
                spec: req,
            } => self.create_volume(c, req).await,
            ListVolumes { cloud: c } => Ok(Reply::Volumes(
                self.list::<Volume>(&keys::volumes(c)).await?,
            )),
            GetVolume {
                cloud: c,
                volume: name,
            } => Ok(Reply::Volume(self.volume(c, &name).await?.1)),
            DeleteVolume {
                cloud: c,
                volume: name,
            } => self.delete_volume(c, &name).await,
            AttachVolume {
                cloud: c,
                volume: name,
                spec: req,
            } => self.attach_volume(c, &name, Some(req.vm)).await,
            DetachVolume {
                cloud: c,
                volume: name,
            } => self.attach_volume(c, &name, None).await,
            PutRecordSet {
                cloud: c,
                name,
                rtype: t,
                spec: req,
            } => self.put_record_set(c, name, t, req).await,
            ListRecordSets { cloud: c } => self.list_record_sets(c).await,
            DeleteRecordSet {
                cloud: c,
                name,
                rtype: t,
            } => self.delete_record_set(c, &name, t).await,
            CreateExposure {
                cloud: c,
                spec: req,
            } => self.create_exposure(c, req).await,
            ListExposures { cloud: c } => {
                Ok(Reply::Exposures(self.list(&keys::exposures(c)).await?))
            }
            GetExposure {
                cloud: c,
                exposure: name,
            } => Ok(Reply::Exposure(self.exposure(c, &name).await?.1)),
            DeleteExposure {
                cloud: c,
                exposure: name,
            } => self.delete_exposure(c, &name).await,
            CreateGrant {
                cloud: c,
                exposure: exp,
                spec: req,
            } => self.create_offer(c, &exp, req.consumer).await,
            ListGrants {
                cloud: c,
                exposure: exp,
            } => {
                self.exposure(c, &exp).await?;
                let grants = self.list(&keys::grants(c, &exp)).await?;
                Ok(Reply::Grants(self.effective(grants).await?))
            }
            RevokeGrant {
                cloud: c,
                exposure: exp,
                consumer,
            } => self.revoke_grant(c, &exp, consumer).await,
            ListExposureOffers {
                cloud: c,
                exposure: exp,
            } => {
                self.exposure(c, &exp).await?;
                Ok(Reply::Offers(self.list(&keys::offers(c, &exp)).await?))
            }
            ListImports { cloud: c } => {
                let grants = self.list(&keys::imports(c)).await?;
                Ok(Reply::Grants(self.effective(grants).await?))
            }
            DeleteImport {
                cloud: c,
                provider,
                exposure: exp,
            } => self.revoke_grant(provider, &exp, c).await,
            ListOffers { cloud: c } => {
                self.cloud(c).await?;
                Ok(Reply::Offers(self.list(&keys::inbox(c)).await?))
            }
            AcceptOffer {
                cloud: c,
                provider,
                exposure: exp,
            } => self.accept_offer(c, provider, &exp).await,
            DeclineOffer {
                cloud: c,
                provider,
                exposure: exp,
            } => self.decline_offer(c, provider, &exp).await,
            GetOfferPolicy { cloud: c } => {
                self.cloud(c).await?;
                Ok(Reply::OfferPolicy(self.offer_policy(c).await?))
            }
            PutOfferPolicy { cloud: c, policy } => self.put_offer_policy(c, policy).await,
            GetEgressPolicy { cloud: c } => {
                self.cloud(c).await?;
                Ok(Reply::EgressPolicy(self.egress_policy(c).await?))
            }
            PutEgressPolicy { cloud: c, policy } => self.put_egress_policy(c, policy).await,
            ListDenied { cloud: c } => self.list_denied(c).await,
            GetEgressAddress { cloud: c } => {
                self.cloud(c).await?;
                match self.egress_address(c).await? {
                    Some((_, a)) => Ok(Reply::EgressAddress(a)),
                    None => Err(CoreError::NotFound(format!("egress address of cloud {c}"))),
                }
            }
            AssignEgressAddress { cloud: c, spec } => self.assign_egress_address(c, spec).await,
            ReleaseEgressAddress { cloud: c } => self.release_egress_address(c).await,
            Publish { cloud: c, spec } => self.publish(c, spec).await,
            ListPublications { cloud: c } => Ok(Reply::Publications(self.publications(c).await?)),
            Unpublish {
                cloud: c,
                publication,
            } => self.unpublish(c, &publication).await,
            RegisterHost { host: name } => self.register_host(name).await,
            IssueHostToken { host: name } => self.issue_host_token(name).await,
            SetHostUnderlay { host, spec } => self.set_host_underlay(host, spec).await,
            SetGuestAccess { host, spec } => self.set_guest_access(host, spec).await,
            CordonHost {
                host: name,
                cordoned,
            } => self.cordon_host(name, cordoned).await,
            ListHosts => {
                let hosts = self.list::<HostInfo>(keys::hosts()).await?;
                Ok(Reply::Hosts(
                    hosts.into_iter().map(|h| self.host_view(h)).collect(),
                ))
            }
            Sync {
                host,
                after,
                wait_ms,
            } => Ok(Reply::Sync(Box::new(
                self.sync(principal, &host, after, Duration::from_millis(wait_ms))
                    .await?,
            ))),
            ReportStatus { host, report } => self.report_status(&host, report).await,
            IngestUsage { host, batch } => self.ingest_usage(&host, batch).await,
            GetUsage { cloud: c, from, to } => self.usage(c, from, to).await,
            SetBudget { cloud: c, budget } => self.set_budget(c, budget).await,
            LiftBudget { cloud: c } => self.lift_budget(c).await,
            GetFleetUsage { from, to, focus } => {
                if focus {
                    self.focus_export(from, to).await
                } else {
                    self.fleet_usage(from, to).await
                }
            }
        }
    }

    async fn commit(&self, txn: Txn) -> Result<Option<u64>, CoreError> {
        Ok(match self.store.txn(txn).await? {
            TxnOutcome::Committed { revision } => Some(revision),
            TxnOutcome::Failed { .. } => None,
        })
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
}

/// The core as the [`ControlPlane`](atoll_api::ControlPlane) of an agent that runs it in its
/// own process: commands run with the operator's authority.
#[derive(Debug, Clone)]
pub struct Embedded(pub Arc<Core>);

#[async_trait::async_trait]
impl atoll_api::ControlPlane for Embedded {
    async fn execute(&self, cmd: Command) -> Result<Reply, atoll_api::ControlPlaneError> {
        self.0
            .execute(Principal::Operator, cmd)
            .await
            .map_err(|e| atoll_api::ControlPlaneError::Embedded(Box::new(e)))
    }
}
