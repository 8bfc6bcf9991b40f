//! The control plane's key-value store: an etcd v3-shaped interface (keys, opaque values,
//! revisions, compare-and-swap transactions, watches from a revision) with two backends.
//!
//! - [`sqlite`]: the default, embedded store (one file, one process, group-committed writes).
//! - [`etcd`]: an etcd v3 cluster through its HTTP/JSON gateway, for replicated control planes.
//!
//! Decisions:
//! - **The etcd data model, not a richer one.** Callers get exactly what etcd offers (point and
//!   prefix reads, multi-key transactions guarded by existence and `mod_revision` compares,
//!   ordered watches that resume from a revision), so the embedded store can be swapped for etcd
//!   without touching the callers, and one test suite (`control/tests/store.rs`) runs against
//!   both backends.
//! - **Revisions.** Every committed transaction gets the next revision (the first write of a new
//!   SQLite store is revision 1; a new etcd cluster starts at revision 1 *before* any write, so
//!   its first write is 2). A transaction whose compares fail commits nothing and does not bump
//!   the revision. SQLite bumps the revision for every committed transaction, even one without
//!   ops; etcd does not bump it for a transaction that changes nothing (no ops, or deletes of
//!   absent keys) and then reports the current revision. Callers must treat revisions as
//!   ordered tokens, never count on them.
//! - **Transactions** are validated the way etcd validates them, for both backends: a key may be
//!   written by at most one op of a transaction (`Put`/`Delete` of the same key twice, or a
//!   `Put`/`Delete` inside a `DeletePrefix` of the same transaction, is
//!   [`StoreError::InvalidTxn`]); two deletes of overlapping ranges are allowed. So the order of
//!   ops inside a transaction never matters.
//! - **Transaction size.** etcd refuses a transaction whose compares, success ops or failure
//!   ops number more than its `--max-txn-ops` (default 128). [`Txn::size`] counts the way etcd
//!   does; the etcd store is told the cluster's limit (`store.etcd_max_txn_ops`), reports it
//!   through [`Store::max_txn_ops`] and refuses a bigger transaction itself, before sending it
//!   ([`StoreError::TxnTooLarge`]), so callers can plan around the limit instead of discovering
//!   it. SQLite has no limit (`None`). If etcd's own limit is lower than the configured one,
//!   etcd's refusal is [`StoreError::EtcdTooManyOps`], naming both settings.
//! - **Watch batches** hold every event of one revision (one transaction) that matches the
//!   prefix, in op order; revisions without a matching event are skipped. A `Delete` event's
//!   `kv` has an empty value, `create_revision` 0 and `mod_revision` = the revision of the
//!   delete.
//! - **Compaction.** Watches read history, and history is bounded (SQLite keeps the last
//!   `history` revisions, etcd keeps what its compaction leaves). `Compacted { requested,
//!   compacted }` means the history after `requested` is gone and the oldest revision a watch may
//!   start after is `compacted`; the caller must re-read the state (range) and watch from the
//!   revision of that read.
//! - **One error enum** ([`StoreError`]) for the module and both backends; variants name the
//!   failed operation and carry the source. Nothing here panics on bad data: a corrupt row or an
//!   unexpected etcd answer is an error.

pub mod etcd;
pub mod sqlite;

use std::{collections::HashSet, path::PathBuf};

/// One key and its value at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision that created the key (since it was last absent).
    pub create_revision: u64,
    /// The revision that last wrote the key.
    pub mod_revision: u64,
}

/// A condition of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Present(String),
    /// The key exists and was last written at exactly this revision.
    ModRevision(String, u64),
}

/// A write of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Deletes every key starting with `prefix` (every key, if `prefix` is empty).
    DeletePrefix {
        prefix: String,
    },
}

/// If every compare holds, all `success` ops are applied atomically at one new revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
}

impl Txn {
    /// The size etcd's `--max-txn-ops` limits: the longest of the compare, success and failure
    /// lists (the etcd backend's failure branch holds one read per compare).
    pub fn size(&self) -> usize {
        self.compares.len().max(self.success.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and the ops were applied; `revision` is the store revision after the
    /// transaction.
    Committed { revision: u64 },
    /// Compare number `failed_compare` (the first one that was false) did not hold; nothing was
    /// written.
    Failed { failed_compare: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of a key. For `Delete`, `kv.value` is empty, `kv.create_revision` is 0 and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// Every event of one revision under the watched prefix, in op order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: u64,
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening store lock file {path}: {source}")]
    OpenLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating store database {path}: {source}")]
    CreateDatabase {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} is in use by another process (lock {lock} is held)")]
    Locked { path: PathBuf, lock: PathBuf },
    #[error("opening store database {path}: {source}")]
    OpenDatabase {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("setting up store database {path}: {source}")]
    SetupDatabase {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store database {path} did not switch to WAL mode (journal_mode is {mode:?})")]
    NoWal { path: PathBuf, mode: String },
    #[error("starting the store writer thread: {0}")]
    SpawnWriter(#[source] std::io::Error),
    #[error("store query: {0}")]
    Query(#[source] rusqlite::Error),
    #[error("store write: {0}")]
    Write(#[source] rusqlite::Error),
    #[error("corrupt store row: {0}")]
    Corrupt(String),
    #[error("the store writer thread is gone")]
    WriterGone,
    #[error("store read task failed: {0}")]
    ReadTask(#[source] tokio::task::JoinError),
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    #[error(
        "a transaction of {size} operations is over the store's limit of {limit} \
         (store.etcd_max_txn_ops, etcd's --max-txn-ops)"
    )]
    TxnTooLarge { size: usize, limit: usize },
    #[error(
        "etcd refused a transaction of {size} operations as too many although \
         store.etcd_max_txn_ops is {limit}: etcd's --max-txn-ops is lower; set both to the same value"
    )]
    EtcdTooManyOps { size: usize, limit: usize },
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("invalid etcd endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("etcd authentication as user {user:?} failed (store.etcd_user, store.etcd_password_file): {reason}")]
    EtcdAuth { user: String, reason: String },
    #[error("TLS with etcd at {url} failed: {cause} (settings store.etcd_ca_file, store.etcd_cert_file, store.etcd_key_file)")]
    EtcdTls { url: String, cause: String },
    #[error("etcd request to {url}: {source}")]
    EtcdRequest {
        url: String,
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading etcd response from {url}: {source}")]
    EtcdBody { url: String, source: hyper::Error },
    #[error("etcd answered {status}: {body}")]
    EtcdResponse { status: u16, body: String },
    #[error("decoding etcd response from {url}: {source}")]
    EtcdJson {
        url: String,
        source: serde_json::Error,
    },
    #[error("etcd returned invalid base64 in {field}: {source}")]
    EtcdBase64 {
        field: &'static str,
        source: base64::DecodeError,
    },
    #[error("etcd returned a key that is not UTF-8: {0}")]
    EtcdKeyNotUtf8(#[source] std::string::FromUtf8Error),
    #[error("etcd returned key {key:?} outside the namespace {prefix:?}")]
    EtcdKeyOutsideNamespace { key: String, prefix: String },
    #[error("etcd returned an invalid answer: {0}")]
    EtcdInvalid(String),
    #[error("etcd canceled the watch: {reason}")]
    WatchCanceled { reason: String },
    #[error("history after revision {requested} is compacted; watch after {compacted} or later")]
    Compacted { requested: u64, compacted: u64 },
    #[error("the watch stream closed")]
    WatchClosed,
}

/// A store handle; cheap to clone (every backend keeps its state behind an `Arc`).
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Etcd(etcd::EtcdStore),
}

impl From<sqlite::SqliteStore> for Store {
    fn from(s: sqlite::SqliteStore) -> Self {
        Store::Sqlite(s)
    }
}

impl From<etcd::EtcdStore> for Store {
    fn from(s: etcd::EtcdStore) -> Self {
        Store::Etcd(s)
    }
}

impl Store {
    /// The key's current value, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self {
            Store::Sqlite(s) => s.get(key).await,
            Store::Etcd(s) => s.get(key).await,
        }
    }

    /// Keys starting with `prefix`, ascending, strictly after `start_after` if given, at most
    /// `limit` (0 = no limit).
    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        match self {
            Store::Sqlite(s) => s.range(prefix, start_after, limit).await,
            Store::Etcd(s) => s.range(prefix, start_after, limit).await,
        }
    }

    /// The number of keys starting with `prefix`.
    pub async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.count(prefix).await,
            Store::Etcd(s) => s.count(prefix).await,
        }
    }

    /// The largest [`Txn::size`] the store accepts; `None` if there is no limit (SQLite).
    pub fn max_txn_ops(&self) -> Option<usize> {
        match self {
            Store::Sqlite(_) => None,
            Store::Etcd(s) => Some(s.max_txn_ops()),
        }
    }

    /// Applies `txn.success` atomically if every compare holds. A transaction bigger than
    /// [`Store::max_txn_ops`] is [`StoreError::TxnTooLarge`] and is not sent.
    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        validate_txn(&txn)?;
        if let Some(limit) = self.max_txn_ops() {
            if txn.size() > limit {
                return Err(StoreError::TxnTooLarge {
                    size: txn.size(),
                    limit,
                });
            }
        }
        match self {
            Store::Sqlite(s) => s.txn(txn).await,
            Store::Etcd(s) => s.txn(txn).await,
        }
    }

    /// The current store revision.
    pub async fn revision(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.revision().await,
            Store::Etcd(s) => s.revision().await,
        }
    }

    /// Events for keys under `prefix` with revision > `after_revision`, in order, then live
    /// ones. `Err(StoreError::Compacted { .. })` if history after `after_revision` is gone.
    pub async fn watch(&self, prefix: &str, after_revision: u64) -> Result<Watch, StoreError> {
        match self {
            Store::Sqlite(s) => Ok(Watch::Sqlite(s.watch(prefix, after_revision).await?)),
            Store::Etcd(s) => Ok(Watch::Etcd(s.watch(prefix, after_revision).await?)),
        }
    }
}

/// A stream of [`WatchBatch`]es from [`Store::watch`].
#[derive(Debug)]
pub enum Watch {
    Sqlite(sqlite::SqliteWatch),
    Etcd(etcd::EtcdWatch),
}

impl Watch {
    /// Waits for the next batch. `Compacted` if the watch fell so far behind that the history it
    /// needs is gone; `WatchClosed` if the backend went away (re-watch from the last revision).
    pub async fn next(&mut self) -> Result<WatchBatch, StoreError> {
        match self {
            Watch::Sqlite(w) => w.next().await,
            Watch::Etcd(w) => w.next().await,
        }
    }
}

/// etcd's rule (`checkIntervals`): a key may be written by at most one op of a transaction.
/// Overlapping deletes are allowed.
fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    let mut puts: HashSet<&str> = HashSet::new();
    let mut deletes: HashSet<&str> = HashSet::new();
    for op in &txn.success {
        match op {
            Op::Put { key, .. } => {
                if deletes.contains(key.as_str()) || !puts.insert(key) {
                    return Err(StoreError::InvalidTxn(format!(
                        "key {key:?} is written by two ops"
                    )));
                }
            }
            Op::Delete { key } => {
                if puts.contains(key.as_str()) {
                    return Err(StoreError::InvalidTxn(format!(
                        "key {key:?} is written by two ops"
                    )));
                }
                deletes.insert(key);
            }
            Op::DeletePrefix { .. } => {}
        }
    }
    for op in &txn.success {
        let Op::DeletePrefix { prefix } = op else {
            continue;
        };
        if let Some(key) = puts.iter().find(|k| k.starts_with(prefix.as_str())) {
            return Err(StoreError::InvalidTxn(format!(
                "key {key:?} is put inside DeletePrefix {prefix:?}"
            )));
        }
    }
    Ok(())
}

/// The smallest string greater than every string starting with `prefix`, as bytes: `prefix`
/// followed by 0xF5, a byte that never occurs in UTF-8 (so the result is deliberately not UTF-8;
/// both backends compare keys bytewise).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = Vec::with_capacity(prefix.len() + 1);
    end.extend_from_slice(prefix.as_bytes());
    end.push(0xF5);
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> Op {
        Op::Put {
            key: k.into(),
            value: vec![],
        }
    }

    #[test]
    fn txn_validation_matches_etcd() {
        let ok = |ops: Vec<Op>| {
            validate_txn(&Txn {
                compares: vec![],
                success: ops,
            })
            .is_ok()
        };
        assert!(ok(vec![put("a"), put("b")]));
        assert!(!ok(vec![put("a"), put("a")]));
        assert!(!ok(vec![put("a"), Op::Delete { key: "a".into() }]));
        assert!(!ok(vec![Op::Delete { key: "a".into() }, put("a")]));
        assert!(ok(vec![
            Op::Delete { key: "a".into() },
            Op::Delete { key: "a".into() }
        ]));
        assert!(!ok(vec![
            Op::DeletePrefix {
                prefix: "a/".into()
            },
            put("a/b")
        ]));
        assert!(ok(vec![
            Op::DeletePrefix {
                prefix: "a/".into()
            },
            Op::Delete { key: "a/b".into() },
            put("b")
        ]));
    }
}
