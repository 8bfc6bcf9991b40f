//! The embedded store: one SQLite database file, opened by one process at a time.
//!
//! Decisions:
//! - **Durability: WAL with `synchronous=NORMAL` by default, `FULL` on request.** A commit in
//!   WAL mode is a `write()` of the transaction's frames to the `-wal` file; once that returns
//!   the frames are in the kernel's page cache, so a crash of this process (even `kill -9`) cannot
//!   lose an acknowledged write, and the next open replays the WAL. Only a power loss or kernel
//!   crash can lose the last commits before the next checkpoint's fsync (the database itself
//!   stays consistent). That is the trade we want for a control plane whose state is also
//!   re-derivable from the hosts, and it keeps a commit free of fsync. `synchronous_full` makes
//!   every commit fsync the WAL, for hosts that must survive power loss without losing an
//!   acknowledged write. Tested: `kill -9` during a write loop loses nothing
//!   (`control/tests/store.rs`).
//! - **One writer thread, group commit.** The write connection is owned by a dedicated thread
//!   that drains a bounded queue and commits up to [`MAX_BATCH`] queued transactions in one
//!   SQLite transaction. Each store transaction still gets its own revision and its compares are
//!   evaluated, in queue order, against the state including the earlier transactions of the
//!   batch, so the result is the same as committing them one by one; the callers are answered
//!   (oneshot channels) only after the SQLite commit. A SQLite error in a batch rolls the batch
//!   back and retries its transactions one by one, so one bad transaction fails alone. The
//!   bounded queue gives back-pressure instead of unbounded memory under overload.
//! - **Checkpoints run off the writer thread.** SQLite's automatic checkpoint runs inside the
//!   committing connection and fsyncs twice, which put 10-50 ms stalls into the p99 commit
//!   latency on a disk. The writer connection replaces it with a WAL hook that only records the
//!   WAL's size; once it exceeds [`CHECKPOINT_FRAMES`] pages a checkpointer thread with its own
//!   connection runs `PRAGMA wal_checkpoint(PASSIVE)`, concurrently with the writer. With
//!   reads always in flight, SQLite never finds a moment to restart the WAL by itself (a read
//!   that starts while the WAL has frames not yet copied pins it), and it grew without bound:
//!   1.5 GB after 120k cloud creates. So once the WAL passes [`WAL_LIMIT_FRAMES`] pages the
//!   writer itself runs a `RESTART` checkpoint between two transactions: the passive
//!   checkpoints have already copied all but the last few thousand pages, so this pause is
//!   short, and the next write starts the WAL from its beginning (measured: WAL ≤ 85 MB and
//!   about 1.1 KB of database per cloud over 100k creates, create p99 unchanged). The WAL file
//!   is not truncated while the store is open (no `journal_size_limit`): truncating it on a
//!   filesystem mounted with `discard` stalled a commit for ~100 ms here; it is reused from its
//!   start after every restart instead, and deleted on close.
//!   Measured on this 2-core VM (ext4 on a ~230 MB/s virtual disk, runs interleaved), against
//!   SQLite's own checkpoint every 500 pages: 1.5-1.9x the throughput (64 in flight), and at
//!   5,000 creates/s a p99 of 1-3 ms in most runs instead of 8-20 ms (both with occasional
//!   20-150 ms filesystem stalls; see `sqlite_throughput` in `control/tests/store.rs`).
//! - **Reads** run on a small pool of read connections ([`READERS`]) on tokio's blocking pool;
//!   WAL lets them run concurrently with the writer and each statement sees a committed
//!   snapshot that includes every acknowledged transaction.
//! - **Schema.** `kv(key, value, create_rev, mod_rev)` (`WITHOUT ROWID`: the key is the primary
//!   key and the only lookup), `meta` (one row: current revision and the compacted revision),
//!   `history(rev, seq, key, kind, value, create_rev)` with one row per event, kept for the last
//!   `history` revisions (trimmed in the same SQLite transaction that adds new ones; watches from
//!   before that get `Compacted`). Keys are compared bytewise (SQLite `BINARY` collation on UTF-8
//!   text); a prefix is the range `[prefix, prefix ‖ 0xF5)`. `PRAGMA user_version` records the
//!   schema version.
//! - **Watches** in this process are woken by a tokio `watch` channel carrying the revision of
//!   the last commit, then read the new history rows (in chunks of [`WATCH_CHUNK`] revisions).
//! - **Memory is bounded**, independent of the number of keys: every connection's page cache is
//!   limited to [`CACHE_KIB`] KiB and nothing per key is kept in memory.
//! - **One process at a time**: an exclusive `flock` on `<path>.lock`, held by the writer thread
//!   until its connection is closed. A second open (from any process, including this one) fails
//!   with [`StoreError::Locked`].
//! - A transaction whose caller stops waiting (future dropped) may still commit.

use std::{
    collections::VecDeque,
    ffi::OsString,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
};

use rusqlite::{
    types::{ToSqlOutput, ValueRef},
    Connection, OpenFlags, OptionalExtension, ToSql, TransactionBehavior,
};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::{
    prefix_end, Compare, Event, EventKind, KeyValue, Op, StoreError, Txn, TxnOutcome, WatchBatch,
};

/// Most store transactions committed in one SQLite transaction.
pub const MAX_BATCH: usize = 256;
/// Queued transactions before `txn` waits for room.
const QUEUE: usize = 4096;
/// Read connections (and concurrent reads).
pub const READERS: usize = 4;
/// Page cache limit of every connection, in KiB.
pub const CACHE_KIB: u32 = 8000;
/// Revisions a watch reads from history at a time.
pub const WATCH_CHUNK: u64 = 1024;
/// WAL size (pages) at which the checkpointer runs a passive checkpoint.
pub const CHECKPOINT_FRAMES: u32 = 4000;
/// WAL size (pages) at which the checkpointer holds the writer back to restart the WAL.
pub const WAL_LIMIT_FRAMES: u32 = 16_384;
/// The schema written by this code (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const KIND_PUT: i64 = 0;
const KIND_DELETE: i64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// fsync every commit (`synchronous=FULL`): survive power loss, at a cost in latency.
    pub synchronous_full: bool,
    /// Revisions of history kept for watches (at least 1).
    pub history: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous_full: false,
            history: 100_000,
        }
    }
}

/// A handle to an open SQLite store; cheap to clone. The database is closed (and its lock
/// released) when the last handle and the last watch are dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

struct Inner {
    path: PathBuf,
    queue: mpsc::Sender<WriteRequest>,
    /// Revision of the last commit, published by the writer thread.
    revision: watch::Receiver<u64>,
    readers: Mutex<Vec<Connection>>,
    read_permits: Arc<Semaphore>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the queue so the writer thread finishes its batch and exits, then wait for it:
        // it closes the database and releases the lock, so the path can be reopened at once.
        self.readers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

struct WriteRequest {
    txn: Txn,
    reply: oneshot::Sender<Result<TxnOutcome, StoreError>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, taking the lock `<path>.lock`.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let lock = lock(&path)?;
        // Created private before SQLite opens it: SQLite gives its WAL and shared-memory files
        // the database file's mode, so the whole store is private whatever the umask.
        crate::private::file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StoreError::CreateDatabase {
                path: path.clone(),
                source,
            })?;
        let conn = Connection::open(&path).map_err(|source| StoreError::OpenDatabase {
            path: path.clone(),
            source,
        })?;
        let setup = |source| StoreError::SetupDatabase {
            path: path.clone(),
            source,
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(setup)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal { path, mode });
        }
        let synchronous = if options.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous={synchronous};
             PRAGMA cache_size=-{CACHE_KIB};
             PRAGMA busy_timeout=5000;"
        ))
        .map_err(setup)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(setup)?;
        if version != 0 && version != SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version}, this build knows {SCHEMA_VERSION}",
                path.display()
            )));
        }
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS kv (
                 key TEXT PRIMARY KEY NOT NULL,
                 value BLOB NOT NULL,
                 create_rev INTEGER NOT NULL,
                 mod_rev INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (
                 id INTEGER PRIMARY KEY CHECK (id = 0),
                 revision INTEGER NOT NULL,
                 compacted INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (0, 0, 0);
             CREATE TABLE IF NOT EXISTS history (
                 rev INTEGER NOT NULL,
                 seq INTEGER NOT NULL,
                 key TEXT NOT NULL,
                 kind INTEGER NOT NULL,
                 value BLOB,
                 create_rev INTEGER NOT NULL,
                 PRIMARY KEY (rev, seq)
             ) WITHOUT ROWID;
             PRAGMA user_version={SCHEMA_VERSION};
             COMMIT;"
        ))
        .map_err(setup)?;
        conn.set_prepared_statement_cache_capacity(32);
        // SAFETY: `conn.handle()` is the open connection's handle; the hook is a plain function
        // without state (the argument is null) that stays valid for the program's lifetime, and it
        // replaces SQLite's automatic checkpoint for this connection only. The connection is
        // used on the writer thread only, so the hook runs there.
        unsafe {
            rusqlite::ffi::sqlite3_wal_hook(conn.handle(), Some(wal_hook), std::ptr::null_mut());
        }
        let (revision, compacted) = read_meta(&conn)?;
        let checkpointer_conn = open_connection(&path, false)?;
        let (checkpoint, checkpoint_rx) = std::sync::mpsc::sync_channel(1);
        let checkpointer = std::thread::Builder::new()
            .name("atoll-store-ckpt".into())
            .spawn(move || run_checkpointer(checkpointer_conn, checkpoint_rx))
            .map_err(StoreError::SpawnWriter)?;

        let (revision_tx, revision_rx) = watch::channel(revision);
        let (queue, queue_rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            conn,
            revision,
            compacted,
            history: options.history.max(1),
            notify: revision_tx,
            checkpoint: Some(checkpoint),
            checkpointer: Some(checkpointer),
            _lock: lock,
        };
        let writer = std::thread::Builder::new()
            .name("atoll-store-writer".into())
            .spawn(move || writer.run(queue_rx))
            .map_err(StoreError::SpawnWriter)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                queue,
                revision: revision_rx,
                readers: Mutex::new(Vec::new()),
                read_permits: Arc::new(Semaphore::new(READERS)),
                writer: Some(writer),
            }),
        })
    }

    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT key, value, create_rev, mod_rev FROM kv WHERE key = ?1")
                .map_err(StoreError::Query)?;
            let mut rows = stmt.query([&key]).map_err(StoreError::Query)?;
            match rows.next().map_err(StoreError::Query)? {
                Some(row) => Ok(Some(kv_from_row(row)?)),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn range(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let end = prefix_end(prefix);
        // Every key with the prefix is > start_after when start_after < prefix.
        let (lower, exclusive) = match start_after {
            Some(after) if after >= prefix => (after.to_owned(), true),
            _ => (prefix.to_owned(), false),
        };
        let limit = i64::try_from(limit).ok().filter(|&l| l > 0).unwrap_or(-1);
        self.read(move |conn| {
            let sql = if exclusive {
                "SELECT key, value, create_rev, mod_rev FROM kv
                 WHERE key > ?1 AND key < ?2 ORDER BY key LIMIT ?3"
            } else {
                "SELECT key, value, create_rev, mod_rev FROM kv
                 WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT ?3"
            };
            let mut stmt = conn.prepare_cached(sql).map_err(StoreError::Query)?;
            let mut rows = stmt
                .query(rusqlite::params![lower, TextBytes(&end), limit])
                .map_err(StoreError::Query)?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::Query)? {
                out.push(kv_from_row(row)?);
            }
            Ok(out)
        })
        .await
    }

    pub async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let prefix = prefix.to_owned();
        self.read(move |conn| {
            let end = prefix_end(&prefix);
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM kv WHERE key >= ?1 AND key < ?2")
                .and_then(|mut s| {
                    s.query_row(rusqlite::params![prefix, TextBytes(&end)], |r| r.get(0))
                })
                .map_err(StoreError::Query)?;
            u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative count {n}")))
        })
        .await
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .queue
            .send(WriteRequest { txn, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// The revision of the last commit (kept in memory by the writer; no I/O).
    pub async fn revision(&self) -> Result<u64, StoreError> {
        Ok(*self.inner.revision.borrow())
    }

    pub async fn watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> Result<SqliteWatch, StoreError> {
        let revision = self.inner.revision.clone();
        let (_, compacted) = self.read(read_meta).await?;
        if after_revision < compacted {
            return Err(StoreError::Compacted {
                requested: after_revision,
                compacted,
            });
        }
        Ok(SqliteWatch {
            store: self.clone(),
            prefix: prefix.to_owned(),
            after: after_revision,
            revision,
            pending: VecDeque::new(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on a pooled read connection on tokio's blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = Arc::clone(&self.inner.read_permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::WriterGone)?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path, true)?,
            };
            let result = f(&conn);
            inner
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            result
        })
        .await
        .map_err(StoreError::ReadTask)?
    }
}

/// Batches of history for one [`SqliteStore::watch`].
pub struct SqliteWatch {
    store: SqliteStore,
    prefix: String,
    /// Every revision up to this one has been read from history.
    after: u64,
    revision: watch::Receiver<u64>,
    pending: VecDeque<WatchBatch>,
}

impl std::fmt::Debug for SqliteWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWatch").finish_non_exhaustive()
    }
}

impl SqliteWatch {
    pub async fn next(&mut self) -> Result<WatchBatch, StoreError> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Ok(batch);
            }
            // Mark the current value seen before reading, so a commit after this line wakes
            // `changed()` below.
            let current = *self.revision.borrow_and_update();
            if current > self.after {
                let after = self.after;
                let upto = current.min(after.saturating_add(WATCH_CHUNK));
                let prefix = self.prefix.clone();
                let (batches, compacted) = self
                    .store
                    .read(move |conn| read_history(conn, &prefix, after, upto))
                    .await?;
                if after < compacted {
                    return Err(StoreError::Compacted {
                        requested: after,
                        compacted,
                    });
                }
                self.after = upto;
                self.pending = batches;
                continue;
            }
            if self.revision.changed().await.is_err() && *self.revision.borrow() <= self.after {
                return Err(StoreError::WatchClosed);
            }
        }
    }
}

/// Binds bytes as SQLite TEXT without UTF-8 validation (for range ends, see [`prefix_end`]).
struct TextBytes<'a>(&'a [u8]);

impl ToSql for TextBytes<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(self.0)))
    }
}

fn lock(path: &Path) -> Result<File, StoreError> {
    let mut lock_path = OsString::from(path.as_os_str());
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = crate::private::file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|source| StoreError::OpenLock {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock takes a file descriptor, which `file` owns and keeps open for the call; no
    // memory is shared with the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StoreError::Locked {
                path: path.to_path_buf(),
                lock: lock_path,
            });
        }
        return Err(StoreError::OpenLock {
            path: lock_path,
            source,
        });
    }
    Ok(file)
}

/// A read connection (`query_only`) or the checkpointer's connection.
fn open_connection(path: &Path, query_only: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::OpenDatabase {
        path: path.to_path_buf(),
        source,
    })?;
    let query_only = u8::from(query_only);
    conn.execute_batch(&format!(
        "PRAGMA query_only={query_only}; PRAGMA cache_size=-{CACHE_KIB}; PRAGMA busy_timeout=5000;"
    ))
    .map_err(|source| StoreError::SetupDatabase {
        path: path.to_path_buf(),
        source,
    })?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// (revision, compacted)
fn read_meta(conn: &Connection) -> Result<(u64, u64), StoreError> {
    let (revision, compacted): (i64, i64) = conn
        .prepare_cached("SELECT revision, compacted FROM meta WHERE id = 0")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(StoreError::Query)?;
    Ok((rev_from_sql(revision)?, rev_from_sql(compacted)?))
}

/// History events under `prefix` with `after < rev <= upto`, grouped by revision, and the
/// compacted revision, from one snapshot.
fn read_history(
    conn: &Connection,
    prefix: &str,
    after: u64,
    upto: u64,
) -> Result<(VecDeque<WatchBatch>, u64), StoreError> {
    let tx = conn.unchecked_transaction().map_err(StoreError::Query)?;
    let (_, compacted) = read_meta(&tx)?;
    let mut batches: VecDeque<WatchBatch> = VecDeque::new();
    if after < compacted {
        return Ok((batches, compacted));
    }
    let end = prefix_end(prefix);
    let mut stmt = tx
        .prepare_cached(
            "SELECT rev, key, kind, value, create_rev FROM history
             WHERE rev > ?1 AND rev <= ?2 AND key >= ?3 AND key < ?4 ORDER BY rev, seq",
        )
        .map_err(StoreError::Query)?;
    let mut rows = stmt
        .query(rusqlite::params![
            rev_to_sql(after)?,
            rev_to_sql(upto)?,
            prefix,
            TextBytes(&end)
        ])
        .map_err(StoreError::Query)?;
    while let Some(row) = rows.next().map_err(StoreError::Query)? {
        let rev = rev_from_sql(row.get(0).map_err(StoreError::Query)?)?;
        let key = text(row, 1)?;
        let kind: i64 = row.get(2).map_err(StoreError::Query)?;
        let event = match kind {
            KIND_PUT => Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key,
                    value: blob(row, 3)?,
                    create_revision: rev_from_sql(row.get(4).map_err(StoreError::Query)?)?,
                    mod_revision: rev,
                },
            },
            KIND_DELETE => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key,
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                },
            },
            other => {
                return Err(StoreError::Corrupt(format!(
                    "history event kind {other} at revision {rev}"
                )))
            }
        };
        match batches.back_mut() {
            Some(batch) if batch.revision == rev => batch.events.push(event),
            _ => batches.push_back(WatchBatch {
                revision: rev,
                events: vec![event],
            }),
        }
    }
    Ok((batches, compacted))
}

fn kv_from_row(row: &rusqlite::Row<'_>) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: text(row, 0)?,
        value: blob(row, 1)?,
        create_revision: rev_from_sql(row.get(2).map_err(StoreError::Query)?)?,
        mod_revision: rev_from_sql(row.get(3).map_err(StoreError::Query)?)?,
    })
}

fn text(row: &rusqlite::Row<'_>, i: usize) -> Result<String, StoreError> {
    match row.get_ref(i).map_err(StoreError::Query)? {
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| StoreError::Corrupt(format!("key {bytes:?} is not UTF-8"))),
        other => Err(StoreError::Corrupt(format!(
            "key of type {} instead of text",
            other.data_type()
        ))),
    }
}

fn blob(row: &rusqlite::Row<'_>, i: usize) -> Result<Vec<u8>, StoreError> {
    match row.get_ref(i).map_err(StoreError::Query)? {
        ValueRef::Blob(bytes) => Ok(bytes.to_vec()),
        other => Err(StoreError::Corrupt(format!(
            "value of type {} instead of blob",
            other.data_type()
        ))),
    }
}

fn rev_from_sql(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative revision {v}")))
}

fn rev_to_sql(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("revision {v} out of range")))
}

/// The writer thread's state: the only connection that writes.
struct Writer {
    conn: Connection,
    revision: u64,
    compacted: u64,
    history: u64,
    notify: watch::Sender<u64>,
    /// Wakes the checkpointer; dropped (so it exits) when the writer exits.
    checkpoint: Option<std::sync::mpsc::SyncSender<()>>,
    checkpointer: Option<JoinHandle<()>>,
    /// Released when the thread exits, after `conn` is closed.
    _lock: File,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.checkpoint = None;
        if let Some(checkpointer) = self.checkpointer.take() {
            let _ = checkpointer.join();
        }
    }
}

thread_local! {
    /// Pages in the WAL after the writer thread's last commit (set by [`wal_hook`]).
    static WAL_FRAMES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// SQLite's WAL hook on the write connection: records the WAL size. Replaces the automatic
/// checkpoint, which would run (and fsync) on the writer thread.
unsafe extern "C" fn wal_hook(
    _arg: *mut std::ffi::c_void,
    _db: *mut rusqlite::ffi::sqlite3,
    _name: *const std::ffi::c_char,
    frames: std::ffi::c_int,
) -> std::ffi::c_int {
    let _ = WAL_FRAMES.try_with(|f| f.set(u32::try_from(frames).unwrap_or(0)));
    rusqlite::ffi::SQLITE_OK
}

/// Checkpoints whenever the writer says the WAL is large; exits when the writer does.
fn run_checkpointer(conn: Connection, wake: std::sync::mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        // A failed checkpoint is retried on the next wake-up; the data is safe in the WAL.
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
    }
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<WriteRequest>) {
        let mut batch: Vec<WriteRequest> = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = queue.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let txns: Vec<&Txn> = batch.iter().map(|r| &r.txn).collect();
            let outcomes: Vec<Result<TxnOutcome, StoreError>> = match self.commit(&txns) {
                Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                Err(error) if batch.len() == 1 => vec![Err(error)],
                // Find the transaction(s) that fail: commit each on its own.
                Err(_) => batch
                    .iter()
                    .map(|request| {
                        self.commit(&[&request.txn]).and_then(|o| {
                            o.into_iter()
                                .next()
                                .ok_or_else(|| StoreError::Corrupt("no outcome".into()))
                        })
                    })
                    .collect(),
            };
            // Publish the revision before answering, so a caller that reads `revision()` after
            // its commit sees at least its own revision.
            if *self.notify.borrow() != self.revision {
                self.notify.send_replace(self.revision);
            }
            let frames = WAL_FRAMES.with(|f| f.get());
            if frames >= WAL_LIMIT_FRAMES {
                // Restart the WAL from here, between transactions (see module docs). The
                // checkpointer has already copied all but the last few thousand frames.
                let _ = self
                    .conn
                    .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
                WAL_FRAMES.with(|f| f.set(0));
            } else if frames >= CHECKPOINT_FRAMES {
                if let Some(checkpoint) = &self.checkpoint {
                    // Full: a wake-up is already pending.
                    let _ = checkpoint.try_send(());
                }
            }
            for (request, outcome) in batch.drain(..).zip(outcomes) {
                let _ = request.reply.send(outcome);
            }
        }
    }

    /// Commits `txns` in one SQLite transaction; on error nothing is committed and the state is
    /// unchanged.
    fn commit(&mut self, txns: &[&Txn]) -> Result<Vec<TxnOutcome>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::Write)?;
        let mut revision = self.revision;
        let mut outcomes = Vec::with_capacity(txns.len());
        for txn in txns {
            if let Some(failed_compare) = first_failed_compare(&tx, &txn.compares)? {
                outcomes.push(TxnOutcome::Failed { failed_compare });
                continue;
            }
            revision += 1;
            apply(&tx, revision, &txn.success)?;
            outcomes.push(TxnOutcome::Committed { revision });
        }
        let mut compacted = self.compacted;
        if revision != self.revision {
            let floor = revision.saturating_sub(self.history);
            if floor > compacted {
                let floor_sql = rev_to_sql(floor)?;
                tx.prepare_cached("DELETE FROM history WHERE rev <= ?1")
                    .and_then(|mut s| s.execute([floor_sql]))
                    .map_err(StoreError::Write)?;
                compacted = floor;
            }
            let meta = [rev_to_sql(revision)?, rev_to_sql(compacted)?];
            tx.prepare_cached("UPDATE meta SET revision = ?1, compacted = ?2 WHERE id = 0")
                .and_then(|mut s| s.execute(meta))
                .map_err(StoreError::Write)?;
        }
        tx.commit().map_err(StoreError::Write)?;
        self.revision = revision;
        self.compacted = compacted;
        Ok(outcomes)
    }
}

fn first_failed_compare(
    tx: &rusqlite::Transaction<'_>,
    compares: &[Compare],
) -> Result<Option<usize>, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT mod_rev FROM kv WHERE key = ?1")
        .map_err(StoreError::Write)?;
    for (i, compare) in compares.iter().enumerate() {
        let key = match compare {
            Compare::Absent(key) | Compare::Present(key) | Compare::ModRevision(key, _) => key,
        };
        let mod_rev: Option<i64> = stmt
            .query_row([key], |r| r.get(0))
            .optional()
            .map_err(StoreError::Write)?;
        let holds = match compare {
            Compare::Absent(_) => mod_rev.is_none(),
            Compare::Present(_) => mod_rev.is_some(),
            Compare::ModRevision(_, want) => {
                mod_rev.is_some_and(|m| u64::try_from(m).ok() == Some(*want))
            }
        };
        if !holds {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

fn apply(tx: &rusqlite::Transaction<'_>, revision: u64, ops: &[Op]) -> Result<(), StoreError> {
    let rev = rev_to_sql(revision)?;
    let mut seq: i64 = 0;
    let mut record = |key: &str, kind: i64, value: Option<&[u8]>, create_rev: i64| {
        let result = tx
            .prepare_cached(
                "INSERT INTO history (rev, seq, key, kind, value, create_rev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| s.execute(rusqlite::params![rev, seq, key, kind, value, create_rev]));
        seq += 1;
        result.map(|_| ()).map_err(StoreError::Write)
    };
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let create_rev: i64 = tx
                    .prepare_cached(
                        "INSERT INTO kv (key, value, create_rev, mod_rev) VALUES (?1, ?2, ?3, ?3)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                                                         mod_rev = excluded.mod_rev
                         RETURNING create_rev",
                    )
                    .and_then(|mut s| s.query_row(rusqlite::params![key, value, rev], |r| r.get(0)))
                    .map_err(StoreError::Write)?;
                record(key, KIND_PUT, Some(value), create_rev)?;
            }
            Op::Delete { key } => {
                let deleted = tx
                    .prepare_cached("DELETE FROM kv WHERE key = ?1")
                    .and_then(|mut s| s.execute([key]))
                    .map_err(StoreError::Write)?;
                if deleted > 0 {
                    record(key, KIND_DELETE, None, 0)?;
                }
            }
            Op::DeletePrefix { prefix } => {
                let end = prefix_end(prefix);
                let mut keys: Vec<String> = Vec::new();
                {
                    let mut stmt = tx
                        .prepare_cached("DELETE FROM kv WHERE key >= ?1 AND key < ?2 RETURNING key")
                        .map_err(StoreError::Write)?;
                    let mut rows = stmt
                        .query(rusqlite::params![prefix, TextBytes(&end)])
                        .map_err(StoreError::Write)?;
                    while let Some(row) = rows.next().map_err(StoreError::Write)? {
                        keys.push(text(row, 0)?);
                    }
                }
                keys.sort_unstable();
                for key in &keys {
                    record(key, KIND_DELETE, None, 0)?;
                }
            }
        }
    }
    Ok(())
}
