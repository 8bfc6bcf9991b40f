//! Usage records: what each endpoint sent and received per interval, as CloudEvents 1.0 JSON
//! lines, written to a durable journal first and then delivered at least once to sinks.
//!
//! Decisions:
//! - **The kernel counters are the source of truth** and only grow while an endpoint exists
//!   (they live in pinned maps, so an agent restart or kill -9 loses no increment). A record
//!   carries both its window's `usage` and the endpoint's `cumulative` counters; the next record
//!   is the difference between the kernel's cumulative counters and the last *journaled*
//!   cumulative ones. So a crash before a record is journaled loses nothing (the next record
//!   covers the gap) and a record that was journaled is never computed again (no double count).
//! - **Deterministic ids.** An endpoint incarnation is `<boot id>-<ifindex>` (ifindexes are not
//!   reused within a boot; pinned maps do not survive a reboot); a record's id is
//!   `<incarnation>-<seq>`. Ids are only ever delivered after the record is in the journal, so
//!   an id always names the same content; consumers deduplicate by id.
//! - **Journal.** One append-only file of JSON lines, fsync'd after every batch. A torn last
//!   line (crash mid-write) is cut off on open; a failed write (e.g. disk full) is rolled back
//!   to the previous length, reported, and retried next interval with the counters still in the
//!   kernel, so nothing is lost.
//! - **Compute and storage are metered by time** ([`Meters`]): the VM supervisor registers
//!   each VMM run (incarnation `<boot id>-vmm-<pid>-<process start ticks>`, which names the
//!   same process after an agent restart, since VMMs outlive the agent) from its start to its
//!   exit, and the converger each volume (incarnation `vol-<cloud>-<name>-<created_at>`, from
//!   the control plane's creation time, which survives reboots) from its creation until it is
//!   removed. A record's window runs from the incarnation's last journaled record (or its
//!   start) to now (or its end, in its final record); its quantity is size times window, and its
//!   `cumulative` the last journaled one plus that. So an agent restart resumes from the journal:
//!   nothing is counted twice, and a VMM that ran on meanwhile is metered for the whole time.
//!   What is lost: a VMM that exits while no agent runs is metered up to its last record (its
//!   exit time is unknown), and a volume removed while no agent runs likewise.
//! - **Delivery.** Each sink has a cursor (byte offset into the journal) persisted atomically
//!   after the sink acknowledged a batch. A crash between acknowledgement and cursor update
//!   re-delivers that batch: at least once, never zero times.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use atoll_dataplane_common::EndpointCounters;

pub use atoll_api::usage::{Counters, Resource, Traffic, UsageData, UsageEvent, EVENT_TYPE};
use serde::{Deserialize, Serialize};
/// Journal file name inside the journal directory.
pub const JOURNAL_FILE: &str = "usage.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("opening usage journal {path}: {source}")]
    OpenJournal { path: PathBuf, source: io::Error },
    #[error("reading usage journal {path} at line {line}: {source}")]
    ReadJournal {
        path: PathBuf,
        line: usize,
        source: io::Error,
    },
    #[error("usage journal {path} line {line} is not a usage record: {source}")]
    ParseJournal {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("writing usage journal {path} (records kept in the kernel counters, retried next interval): {source}")]
    AppendJournal { path: PathBuf, source: io::Error },
    #[error("setting aside unreadable line {line} of usage journal {path}: {source}")]
    Quarantine {
        path: PathBuf,
        line: usize,
        source: io::Error,
    },
    #[error("usage journal {path} holds {bytes} bytes, at its limit usage.journal_max_bytes = {max} (the sinks are behind); usage stays in the kernel counters and is journaled once delivery frees space")]
    JournalFull { path: PathBuf, bytes: u64, max: u64 },
    #[error("usage journal {path} is in use by another process (a running atoll-agent?); one writer at a time")]
    Locked { path: PathBuf },
    #[error("reading cursor {path}: {source}")]
    ReadCursor { path: PathBuf, source: io::Error },
    #[error("writing cursor {path}: {source}")]
    WriteCursor { path: PathBuf, source: io::Error },
    #[error("delivering to sink {sink}: {source}")]
    Deliver { sink: String, source: io::Error },
    #[error("encoding a usage record: {0}")]
    Encode(#[source] serde_json::Error),
}

/// One endpoint's state as collected from the dataplane.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub incarnation: String,
    pub cloud: u32,
    pub endpoint: String,
    pub counters: EndpointCounters,
}

/// The last journaled record of an incarnation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub endpoint: String,
    pub seq: u64,
    pub end_unix_ms: u64,
    pub cumulative: Counters,
    pub is_final: bool,
}

impl Baseline {
    fn of(ev: &UsageEvent) -> Self {
        Baseline {
            endpoint: ev.data.endpoint.clone(),
            seq: ev.data.seq,
            end_unix_ms: ev.data.end_unix_ms,
            cumulative: ev.data.cumulative.clone(),
            is_final: ev.data.is_final,
        }
    }
}

/// How large the journal may grow (`[usage]` in the agent's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// A segment is closed (and a new one begun) once it holds this many bytes.
    pub segment_bytes: u64,
    /// Periodic records are not journaled while the segments hold this many bytes (the
    /// kernel counters keep the usage until delivery frees space); final records always are.
    pub max_bytes: u64,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits {
            segment_bytes: 16 << 20,
            max_bytes: 1 << 30,
        }
    }
}

/// The baselines as of the start of segment `segment`: replaying the segments from there on
/// rebuilds the journal's state, so the segments before it are needed only for delivery.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    segment: u64,
    baselines: BTreeMap<String, Baseline>,
}

/// The file of segment `n`: `usage.jsonl` is segment 0 (the single file of earlier
/// versions), then `usage-<n>.jsonl`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    if n == 0 {
        dir.join(JOURNAL_FILE)
    } else {
        dir.join(format!("usage-{n}.jsonl"))
    }
}

/// The journal's segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            let n = if name == JOURNAL_FILE {
                0
            } else {
                name.strip_prefix("usage-")?
                    .strip_suffix(".jsonl")?
                    .parse()
                    .ok()?
            };
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Bytes the journal's segments hold in `dir`.
pub fn journal_bytes(dir: &Path) -> u64 {
    segments(dir)
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Every record in the journal in `dir`, oldest first (set-aside lines skipped).
pub fn read_journal(dir: &Path) -> io::Result<Vec<UsageEvent>> {
    let mut out = Vec::new();
    for (_, path) in segments(dir) {
        for line in std::fs::read_to_string(path)?.lines() {
            if !line.trim().is_empty() {
                out.push(
                    serde_json::from_str(line)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                );
            }
        }
    }
    Ok(out)
}

/// File of the records set aside because they could not be read.
pub const QUARANTINE_FILE: &str = "quarantine.jsonl";
const CHECKPOINT_FILE: &str = "checkpoint.json";

/// How many records were ever set aside in `dir` (lines of its quarantine file).
pub fn quarantined(dir: &Path) -> u64 {
    std::fs::read(dir.join(QUARANTINE_FILE))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// The durable journal of usage records: numbered segment files, a checkpoint of the
/// baselines at the start of the newest ones, and the sinks' cursors.
pub struct Journal {
    dir: PathBuf,
    segment: u64,
    file: File,
    len: u64,
    baselines: HashMap<String, Baseline>,
    limits: JournalLimits,
    quarantined: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating) the journal in `dir` with the default limits.
    pub fn open(dir: &Path) -> Result<Self, UsageError> {
        Self::open_with(dir, JournalLimits::default())
    }

    /// Opens (creating) the journal in `dir`: loads the checkpoint, replays the segments from
    /// it on, cuts off a torn last line, and sets aside every other line that is not a usage
    /// record (see [`Journal::quarantined_now`]).
    pub fn open_with(dir: &Path, limits: JournalLimits) -> Result<Self, UsageError> {
        let open_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UsageError::OpenJournal { path, source }
        };
        atoll_api::private::create_dir_all(dir, 0o700).map_err(open_err(dir))?;
        let cp_path = dir.join(CHECKPOINT_FILE);
        let checkpoint: Checkpoint = match std::fs::read(&cp_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| UsageError::ParseJournal {
                    path: cp_path.clone(),
                    line: 1,
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Checkpoint::default(),
            Err(source) => {
                return Err(UsageError::OpenJournal {
                    path: cp_path,
                    source,
                })
            }
        };
        let mut baselines: HashMap<String, Baseline> = checkpoint.baselines.into_iter().collect();
        let mut replay: Vec<(u64, PathBuf)> = segments(dir)
            .into_iter()
            .filter(|(n, _)| *n >= checkpoint.segment)
            .collect();
        if replay.is_empty() {
            replay.push((checkpoint.segment, segment_path(dir, checkpoint.segment)));
        }
        let mut quarantined = 0;
        let last = replay.len() - 1;
        let mut current = None;
        for (i, (n, path)) in replay.into_iter().enumerate() {
            let mut file = open_segment(&path)?;
            let (good_len, set_aside) =
                replay_segment(dir, &path, &mut file, i == last, &mut baselines)?;
            quarantined += set_aside;
            if i == last {
                current = Some((n, path, file, good_len));
            }
        }
        let (segment, path, mut file, len) = current.expect("at least one segment");
        file.seek(SeekFrom::Start(len)).map_err(open_err(&path))?;
        if quarantined > 0 {
            tracing::warn!(
                "usage journal {}: set aside {quarantined} unreadable records in {}",
                dir.display(),
                dir.join(QUARANTINE_FILE).display()
            );
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            segment,
            file,
            len,
            baselines,
            limits,
            quarantined,
        })
    }

    /// The segment records are appended to now.
    pub fn path(&self) -> PathBuf {
        segment_path(&self.dir, self.segment)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> JournalLimits {
        self.limits
    }

    /// Unreadable records this open set aside.
    pub fn quarantined_now(&self) -> u64 {
        self.quarantined
    }

    pub fn baseline(&self, incarnation: &str) -> Option<&Baseline> {
        self.baselines.get(incarnation)
    }

    /// Appends records and fsyncs. On failure the file is cut back to its previous length and
    /// no baseline moves, so the same usage is recomputed next time.
    pub fn append(&mut self, events: &[UsageEvent]) -> Result<(), UsageError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for ev in events {
            serde_json::to_writer(&mut buf, ev).map_err(UsageError::Encode)?;
            buf.push(b'\n');
        }
        let result = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            let _ = self.file.sync_data();
            return Err(UsageError::AppendJournal {
                path: self.path(),
                source,
            });
        }
        self.len += buf.len() as u64;
        for ev in events {
            self.baselines
                .insert(ev.data.incarnation.clone(), Baseline::of(ev));
        }
        Ok(())
    }

    /// Begins a new segment once the current one is full: first a checkpoint of the baselines
    /// of `live` incarnations (any other incarnation is gone for good: ifindexes are not reused
    /// within a boot), then the new, empty segment. A crash between the two leaves a
    /// checkpoint whose segment [`Journal::open`] creates.
    pub fn rotate_if_full(&mut self, live: &HashSet<String>) -> Result<bool, UsageError> {
        if self.len < self.limits.segment_bytes {
            return Ok(false);
        }
        let next = self.segment + 1;
        self.baselines.retain(|inc, _| live.contains(inc));
        let checkpoint = Checkpoint {
            segment: next,
            baselines: self
                .baselines
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let bytes = serde_json::to_vec(&checkpoint).map_err(UsageError::Encode)?;
        let cp_path = self.dir.join(CHECKPOINT_FILE);
        write_atomic(&cp_path, &bytes).map_err(|source| UsageError::AppendJournal {
            path: cp_path,
            source,
        })?;
        let file = open_segment(&segment_path(&self.dir, next))?;
        sync_dir(&self.dir);
        self.file = file;
        self.segment = next;
        self.len = 0;
        Ok(true)
    }
}

/// Opens (creating, private) a segment for reading and writing.
fn open_segment(path: &Path) -> Result<File, UsageError> {
    atoll_api::private::file_options()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|source| UsageError::OpenJournal {
            path: path.into(),
            source,
        })
}

/// Replays one segment into `baselines`; returns its readable length and how many lines were
/// set aside. A torn last line of the newest segment (a crash mid-write) is cut off; any other
/// line that is not a usage record is copied to the quarantine file and blanked in place
/// (spaces, same length), so no byte offset (cursor) moves and nothing delivered is lost.
fn replay_segment(
    dir: &Path,
    path: &Path,
    file: &mut File,
    newest: bool,
    baselines: &mut HashMap<String, Baseline>,
) -> Result<(u64, u64), UsageError> {
    let read_err = |line: usize| {
        let path = path.to_path_buf();
        move |source| UsageError::ReadJournal { path, line, source }
    };
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).map_err(read_err(0))?;
    file.read_to_end(&mut bytes).map_err(read_err(0))?;
    let mut offset = 0usize;
    let mut set_aside = 0;
    let mut n = 0;
    while offset < bytes.len() {
        n += 1;
        let end = bytes[offset..].iter().position(|&b| b == b'\n');
        let Some(end) = end.map(|e| offset + e) else {
            if newest {
                // A torn last line: cut off.
                file.set_len(offset as u64).map_err(read_err(n))?;
                file.sync_data().map_err(read_err(n))?;
                return Ok((offset as u64, set_aside));
            }
            // An older segment never ends torn unless damaged: set the rest aside, keeping
            // the length (the last byte becomes the line's end).
            quarantine(dir, path, file, offset, bytes.len(), n)?;
            return Ok((bytes.len() as u64, set_aside + 1));
        };
        let line = &bytes[offset..end];
        if !line.iter().all(|&b| b == b' ') {
            match serde_json::from_slice::<UsageEvent>(line) {
                Ok(ev) => {
                    baselines.insert(ev.data.incarnation.clone(), Baseline::of(&ev));
                }
                Err(_) => {
                    quarantine(dir, path, file, offset, end + 1, n)?;
                    set_aside += 1;
                }
            }
        }
        offset = end + 1;
    }
    Ok((bytes.len() as u64, set_aside))
}

/// Copies bytes `[start, end)` of a segment to the quarantine file (durably) and then blanks
/// them in place with spaces, the last byte a newline.
fn quarantine(
    dir: &Path,
    path: &Path,
    file: &mut File,
    start: usize,
    end: usize,
    line: usize,
) -> Result<(), UsageError> {
    let err = |source| UsageError::Quarantine {
        path: path.to_path_buf(),
        line,
        source,
    };
    let mut raw = vec![0u8; end - start];
    file.seek(SeekFrom::Start(start as u64)).map_err(err)?;
    file.read_exact(&mut raw).map_err(err)?;
    if raw.last() != Some(&b'\n') {
        raw.push(b'\n');
    }
    let mut q = atoll_api::private::file_options()
        .create(true)
        .append(true)
        .open(dir.join(QUARANTINE_FILE))
        .map_err(err)?;
    q.write_all(&raw)
        .and_then(|()| q.sync_data())
        .map_err(err)?;
    let mut blank = vec![b' '; end - start];
    if let Some(last) = blank.last_mut() {
        *last = b'\n';
    }
    file.seek(SeekFrom::Start(start as u64)).map_err(err)?;
    file.write_all(&blank)
        .and_then(|()| file.sync_data())
        .map_err(err)?;
    tracing::warn!(
        "usage journal {} line {line} is not a usage record: set aside",
        path.display()
    );
    Ok(())
}

/// Deletes the segments no one needs any more: behind the checkpoint (not needed to rebuild
/// baselines) and behind every sink's cursor (delivered everywhere). Without sinks the journal
/// is its own record, kept up to `limits.max_bytes` (oldest segments behind the checkpoint
/// go first). Returns how many segments were deleted.
pub fn compact(dir: &Path, sinks: &[&str], limits: JournalLimits) -> Result<usize, UsageError> {
    let kept_from = match std::fs::read(dir.join(CHECKPOINT_FILE)) {
        Ok(b) => serde_json::from_slice::<Checkpoint>(&b)
            .map(|c| c.segment)
            .unwrap_or(0),
        Err(_) => 0,
    };
    let mut delivered_to = u64::MAX;
    for name in sinks {
        delivered_to = delivered_to.min(read_cursor(&cursor_path(dir, name))?.0);
    }
    let all = segments(dir);
    let mut total: u64 = all
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let mut removed = 0;
    for (n, path) in all {
        if n >= kept_from {
            break;
        }
        let delete = if sinks.is_empty() {
            total > limits.max_bytes
        } else {
            n < delivered_to
        };
        if !delete {
            break;
        }
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(&path).map_err(|source| UsageError::OpenJournal {
            path: path.clone(),
            source,
        })?;
        total = total.saturating_sub(len);
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir);
    }
    Ok(removed)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Builds the next record of every snapshot against the journal's baselines. `window_start_ms`
/// is used for an incarnation's first record (the previous collection time).
pub fn build_records(
    journal: &Journal,
    snapshots: &[Snapshot],
    source: &str,
    window_start_ms: u64,
    now_ms: u64,
    is_final: bool,
) -> Vec<UsageEvent> {
    let empty = Counters::from_kernel(&EndpointCounters::ZERO);
    snapshots
        .iter()
        .filter(|s| !journal.baseline(&s.incarnation).is_some_and(|b| b.is_final))
        .map(|s| {
            let cumulative = Counters::from_kernel(&s.counters);
            let base = journal.baseline(&s.incarnation);
            let usage = cumulative.since(base.map(|b| &b.cumulative).unwrap_or(&empty));
            let seq = base.map(|b| b.seq).unwrap_or(0) + 1;
            let start = base
                .map(|b| b.end_unix_ms)
                .unwrap_or(window_start_ms)
                .min(now_ms);
            UsageEvent {
                specversion: "1.0".into(),
                id: format!("{}-{seq}", s.incarnation),
                source: source.into(),
                ty: EVENT_TYPE.into(),
                subject: format!("{}/{}", s.cloud, s.endpoint),
                time: rfc3339_ms(now_ms),
                datacontenttype: "application/json".into(),
                data: UsageData {
                    cloud: s.cloud,
                    endpoint: s.endpoint.clone(),
                    incarnation: s.incarnation.clone(),
                    seq,
                    start_unix_ms: start,
                    end_unix_ms: now_ms,
                    is_final,
                    usage,
                    cumulative,
                    resource: None,
                },
            }
        })
        .collect()
}

/// A thing metered by time: a VMM run or a provisioned volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meter {
    pub cloud: u32,
    pub resource: Resource,
    /// When it began (ms since the epoch): the start of its first window.
    pub since_ms: u64,
    /// When it ended, once it has: its final record ends there.
    pub until_ms: Option<u64>,
}

/// The things metered by time on this host, by incarnation; shared by the VM supervisors and
/// the converger (who start and end them) and the recorder (who journals them each interval).
#[derive(Debug, Clone, Default)]
pub struct Meters(std::sync::Arc<std::sync::Mutex<BTreeMap<String, Meter>>>);

impl Meters {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Meter>> {
        // A poisoned lock only means a panic elsewhere; the map is consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins metering `incarnation` (kept as it is if already metered).
    pub fn start(&self, incarnation: &str, meter: Meter) {
        self.lock().entry(incarnation.to_string()).or_insert(meter);
    }

    /// Ends `incarnation` at `at_ms` (its final record is journaled next interval).
    pub fn end(&self, incarnation: &str, at_ms: u64) {
        if let Some(m) = self.lock().get_mut(incarnation) {
            m.until_ms.get_or_insert(at_ms);
        }
    }

    /// Ends the running meter of a volume.
    pub fn end_volume(&self, cloud: u32, name: &str, at_ms: u64) {
        for m in self.lock().values_mut() {
            if m.cloud == cloud
                && matches!(&m.resource, Resource::Volume { name: n, .. } if n == name)
            {
                m.until_ms.get_or_insert(at_ms);
            }
        }
    }

    /// What is metered now.
    pub fn snapshot(&self) -> Vec<(String, Meter)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Forgets ended meters whose final record is journaled.
    fn forget(&self, done: &[String]) {
        let mut m = self.lock();
        for k in done {
            if m.get(k).is_some_and(|m| m.until_ms.is_some()) {
                m.remove(k);
            }
        }
    }
}

/// The incarnation of a VMM run: its process, which outlives the agent.
pub fn vmm_incarnation(boot_id: &str, pid: i32, start_ticks: u64) -> String {
    format!("{boot_id}-vmm-{pid}-{start_ticks}")
}

/// The incarnation of a volume: its creation by the control plane.
pub fn volume_incarnation(cloud: u32, name: &str, created_at: u64) -> String {
    format!("vol-{cloud}-{name}-{created_at}")
}

/// The next record of each meter against the journal's baselines (ended ones final).
pub fn build_meter_records(
    journal: &Journal,
    meters: &[(String, Meter)],
    source: &str,
    now_ms: u64,
) -> Vec<UsageEvent> {
    meters
        .iter()
        .filter(|(inc, _)| !journal.baseline(inc).is_some_and(|b| b.is_final))
        .map(|(inc, m)| {
            let base = journal.baseline(inc);
            let start = base.map(|b| b.end_unix_ms).unwrap_or(m.since_ms);
            let end = m.until_ms.unwrap_or(now_ms).max(start);
            let ms = end - start;
            let mut usage = Counters::default();
            let name = match &m.resource {
                Resource::Vm {
                    name,
                    vcpus,
                    memory_mib,
                } => {
                    usage.vcpu_ms = u64::from(*vcpus).saturating_mul(ms);
                    usage.memory_mib_ms = memory_mib.saturating_mul(ms);
                    format!("vm/{name}")
                }
                Resource::Volume { name, size_gib } => {
                    usage.volume_gib_ms = size_gib.saturating_mul(ms);
                    format!("volume/{name}")
                }
            };
            let mut cumulative = base.map(|b| b.cumulative.clone()).unwrap_or_default();
            cumulative.vcpu_ms = cumulative.vcpu_ms.saturating_add(usage.vcpu_ms);
            cumulative.memory_mib_ms = cumulative.memory_mib_ms.saturating_add(usage.memory_mib_ms);
            cumulative.volume_gib_ms = cumulative.volume_gib_ms.saturating_add(usage.volume_gib_ms);
            let seq = base.map(|b| b.seq).unwrap_or(0) + 1;
            UsageEvent {
                specversion: "1.0".into(),
                id: format!("{inc}-{seq}"),
                source: source.into(),
                ty: EVENT_TYPE.into(),
                subject: format!("{}/{name}", m.cloud),
                time: rfc3339_ms(end),
                datacontenttype: "application/json".into(),
                data: UsageData {
                    cloud: m.cloud,
                    endpoint: String::new(),
                    incarnation: inc.clone(),
                    seq,
                    start_unix_ms: start,
                    end_unix_ms: end,
                    is_final: m.until_ms.is_some(),
                    usage,
                    cumulative,
                    resource: Some(m.resource.clone()),
                },
            }
        })
        .collect()
}

/// Turns snapshots into journaled records: the journal, this host's CloudEvents `source`, the
/// boot id for incarnations, and the time of the last collection (start of the next window).
pub struct Recorder {
    /// Exclusive `flock` on `<dir>/lock`: one writer per journal. The kernel releases it when
    /// the process dies, also on kill -9.
    _lock: File,
    journal: Journal,
    source: String,
    boot_id: String,
    last_tick_ms: u64,
    meters: Meters,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Opens the journal in `dir` with the default limits; `source` is the CloudEvents source
    /// (e.g. `atoll/agent/<host>`).
    pub fn open(dir: &Path, source: &str) -> Result<Self, UsageError> {
        Self::open_with(dir, source, JournalLimits::default())
    }

    /// Opens the journal in `dir` with `limits`.
    pub fn open_with(dir: &Path, source: &str, limits: JournalLimits) -> Result<Self, UsageError> {
        let lock_path = dir.join("lock");
        atoll_api::private::create_dir_all(dir, 0o700).map_err(|source| {
            UsageError::OpenJournal {
                path: dir.into(),
                source,
            }
        })?;
        let lock = atoll_api::private::file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| UsageError::OpenJournal {
                path: lock_path.clone(),
                source,
            })?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                UsageError::Locked { path: dir.into() }
            } else {
                UsageError::OpenJournal {
                    path: lock_path,
                    source: e,
                }
            });
        }
        let journal = Journal::open_with(dir, limits)?;
        let boot_id = boot_id().map_err(|source| UsageError::OpenJournal {
            path: "/proc/sys/kernel/random/boot_id".into(),
            source,
        })?;
        Ok(Recorder {
            _lock: lock,
            journal,
            source: source.into(),
            boot_id,
            last_tick_ms: now_unix_ms(),
            meters: Meters::default(),
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The meters journaled with each periodic collection.
    pub fn meters(&self) -> Meters {
        self.meters.clone()
    }

    /// The time of the last periodic collection (ms since the epoch): every record whose
    /// window ended by then is in the journal.
    pub fn last_collected_ms(&self) -> u64 {
        self.last_tick_ms
    }

    /// This boot's id (part of incarnations).
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn incarnation(&self, ifindex: u32) -> String {
        incarnation(&self.boot_id, ifindex)
    }

    /// The endpoint name of an incarnation's last record, if any.
    pub fn last_name(&self, incarnation: &str) -> Option<&str> {
        self.journal
            .baseline(incarnation)
            .map(|b| b.endpoint.as_str())
    }

    /// Builds and journals one record per snapshot; returns how many were written. A periodic
    /// collection (`is_final` false) holds every live endpoint: it is refused while the journal
    /// is at `max_bytes` (the kernel counters keep the usage), and it may begin a new segment.
    pub fn record(&mut self, snapshots: &[Snapshot], is_final: bool) -> Result<usize, UsageError> {
        if !is_final {
            let bytes = journal_bytes(self.journal.dir());
            let max = self.journal.limits().max_bytes;
            if bytes >= max {
                return Err(UsageError::JournalFull {
                    path: self.journal.dir().to_path_buf(),
                    bytes,
                    max,
                });
            }
        }
        let now = now_unix_ms().max(self.last_tick_ms);
        let mut events = build_records(
            &self.journal,
            snapshots,
            &self.source,
            self.last_tick_ms,
            now,
            is_final,
        );
        // Meters go with the periodic collection (a final network record is written alone,
        // at once, before its endpoint goes away).
        let meters = if is_final {
            Vec::new()
        } else {
            self.meters.snapshot()
        };
        events.extend(build_meter_records(
            &self.journal,
            &meters,
            &self.source,
            now,
        ));
        self.journal.append(&events)?;
        if !is_final {
            self.last_tick_ms = now;
            let ended: Vec<String> = meters
                .iter()
                .filter(|(_, m)| m.until_ms.is_some())
                .map(|(k, _)| k.clone())
                .collect();
            self.meters.forget(&ended);
            let live: HashSet<String> = snapshots
                .iter()
                .map(|s| s.incarnation.clone())
                .chain(
                    meters
                        .iter()
                        .filter(|(_, m)| m.until_ms.is_none())
                        .map(|(k, _)| k.clone()),
                )
                .collect();
            self.journal.rotate_if_full(&live)?;
        }
        Ok(events.len())
    }
}

/// `<boot id>-<ifindex>`: names one endpoint from creation to deletion.
pub fn incarnation(boot_id: &str, ifindex: u32) -> String {
    format!("{boot_id}-{ifindex}")
}

/// This boot's id (hex, no dashes).
pub fn boot_id() -> Result<String, io::Error> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    Ok(raw.trim().replace('-', ""))
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = atoll_api::usage::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Delivers to the control plane (`POST /v1/hosts/{host}/usage` with the host's token, or the
/// embedded one in process): batches of at most [`atoll_api::model::MAX_USAGE_BATCH`] records.
/// A failed call leaves the cursor (retried next interval; the control plane keeps each id
/// once); records it refuses one by one (a cloud this host does not run) are acknowledged,
/// since sending them again cannot change the answer, and logged.
pub struct ControlSink {
    cp: std::sync::Arc<dyn atoll_api::ControlPlane>,
    host: String,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for ControlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSink")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl ControlSink {
    /// A sink for `host` through `cp`; [`Sink::deliver`] blocks on `rt` (call it off the
    /// runtime, as the agent's delivery does).
    pub fn new(
        cp: std::sync::Arc<dyn atoll_api::ControlPlane>,
        host: &str,
        rt: tokio::runtime::Handle,
    ) -> Self {
        ControlSink {
            cp,
            host: host.to_string(),
            rt,
        }
    }
}

impl ControlSink {
    /// Tells the control plane that everything up to `at_ms` is delivered (call after the
    /// journal was delivered to its end, with the time of the collection before).
    pub fn mark_complete(&mut self, at_ms: u64) -> Result<(), io::Error> {
        let cmd = atoll_api::Command::IngestUsage {
            host: self.host.clone(),
            batch: atoll_api::model::UsageBatch {
                records: Vec::new(),
                complete_to_ms: Some(at_ms),
            },
        };
        self.rt
            .block_on(self.cp.execute(cmd))
            .map(drop)
            .map_err(io::Error::other)
    }
}

impl Sink for ControlSink {
    fn name(&self) -> &str {
        "control"
    }

    fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error> {
        let mut records = Vec::new();
        for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            records.push(serde_json::from_slice::<UsageEvent>(line).map_err(io::Error::other)?);
        }
        for batch in records.chunks(atoll_api::model::MAX_USAGE_BATCH) {
            let cmd = atoll_api::Command::IngestUsage {
                host: self.host.clone(),
                batch: atoll_api::model::UsageBatch {
                    records: batch.to_vec(),
                    complete_to_ms: None,
                },
            };
            let reply = self
                .rt
                .block_on(self.cp.execute(cmd))
                .map_err(io::Error::other)?;
            if let atoll_api::Reply::UsageIngested(r) = reply {
                if r.refused > 0 {
                    tracing::warn!(
                        "the control plane refused {} usage records (clouds this host does not run)",
                        r.refused
                    );
                }
            }
        }
        Ok(())
    }
}

/// Where records go after the journal.
pub trait Sink {
    /// Stable name, used for the cursor file.
    fn name(&self) -> &str;
    /// Delivers complete JSON lines (each ending in '\n'); returns once they are durable at the
    /// sink. An error leaves the cursor where it was.
    fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error>;
}

/// Appends records to a JSON-lines file and fsyncs it; once the file holds `max_bytes` it is
/// rotated to `<file>.1` (older ones shift up to `<file>.<keep>`, the oldest dropped), so a
/// reader of the sink has `keep + 1` files of history and the disk holds at most about
/// `(keep + 1) * max_bytes`.
pub struct FileSink {
    name: String,
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
}

impl std::fmt::Debug for FileSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSink").finish_non_exhaustive()
    }
}

impl FileSink {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        FileSink {
            name: "file".into(),
            path,
            max_bytes,
            keep: keep.max(1),
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&self) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir);
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error> {
        if let Some(dir) = self.path.parent() {
            atoll_api::private::create_dir_all(dir, 0o700)?;
        }
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if len > 0 && len + lines.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let mut f = atoll_api::private::file_options()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(lines)?;
        f.sync_data()
    }
}

/// POSTs batches as a CloudEvents JSON batch (`application/cloudevents-batch+json`) to an
/// `http://host:port/path` URL; only a 2xx response acknowledges. Plain HTTP: put a local TLS
/// relay in front for remote collectors.
pub struct HttpSink {
    name: String,
    host: String,
    addr: String,
    path: String,
    timeout: std::time::Duration,
}

impl std::fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink").finish_non_exhaustive()
    }
}

impl crate::config::UsageConfig {
    /// The journal's size limits.
    pub fn limits(&self) -> JournalLimits {
        JournalLimits {
            segment_bytes: self.journal_segment_bytes,
            max_bytes: self.journal_max_bytes,
        }
    }
}

impl HttpSink {
    /// Parses `http://host[:port][/path]` (see [`SinkUrl`](crate::config::SinkUrl)).
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Self, io::Error> {
        let (host, addr, path) = crate::config::SinkUrl::split(url)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(HttpSink {
            name: "http".into(),
            host,
            addr,
            path,
            timeout,
        })
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error> {
        use std::net::{TcpStream, ToSocketAddrs};
        let text = std::str::from_utf8(lines)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut body = String::with_capacity(lines.len() + 2);
        body.push('[');
        for (i, l) in text.lines().filter(|l| !l.is_empty()).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(l);
        }
        body.push(']');
        let addr = self.addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} resolves to nothing", self.addr),
            )
        })?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/cloudevents-batch+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut status = String::new();
        BufReader::new(&stream).read_line(&mut status)?;
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        match code {
            Some(c) if (200..300).contains(&c) => Ok(()),
            _ => Err(io::Error::other(format!(
                "sink answered {:?}",
                status.trim_end()
            ))),
        }
    }
}

/// Delivers everything in the journal in `dir` past the sink's cursor, segment by segment,
/// in batches of at most `max_batch` bytes (whole lines), advancing the cursor after each
/// acknowledged batch. Lines set aside (blank) are skipped. A cursor behind the oldest segment
/// (a sink added after older segments were deleted) starts there. Returns the number of
/// records delivered.
pub fn deliver_pending(
    dir: &Path,
    sink: &mut dyn Sink,
    max_batch: usize,
) -> Result<usize, UsageError> {
    let cpath = cursor_path(dir, sink.name());
    let (mut seg, mut offset) = read_cursor(&cpath)?;
    let segs = segments(dir);
    let mut delivered = 0;
    for (i, (n, path)) in segs.iter().enumerate() {
        if *n < seg {
            continue;
        }
        if *n > seg {
            (seg, offset) = (*n, 0);
        }
        delivered += deliver_segment(path, &cpath, seg, &mut offset, sink, max_batch)?;
        // A segment older than the newest is closed (only the newest grows): move past it.
        if let Some((next, _)) = segs.get(i + 1) {
            (seg, offset) = (*next, 0);
            write_cursor(&cpath, seg, offset)?;
        }
    }
    Ok(delivered)
}

/// Delivers segment `seg` at `path` from `offset` to its current end.
fn deliver_segment(
    path: &Path,
    cpath: &Path,
    seg: u64,
    offset: &mut u64,
    sink: &mut dyn Sink,
    max_batch: usize,
) -> Result<usize, UsageError> {
    let err = |source| UsageError::OpenJournal {
        path: path.into(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let len = file.metadata().map_err(err)?.len();
    if *offset > len {
        // The segment was replaced; start over (at least once).
        *offset = 0;
    }
    let mut delivered = 0;
    while *offset < len {
        file.seek(SeekFrom::Start(*offset)).map_err(err)?;
        let mut chunk = vec![0u8; max_batch.min((len - *offset) as usize)];
        file.read_exact(&mut chunk).map_err(err)?;
        let batch = match chunk.iter().rposition(|b| *b == b'\n') {
            Some(end) => {
                chunk.truncate(end + 1);
                chunk
            }
            None => {
                // A single line longer than the batch: send it alone.
                let mut line = Vec::new();
                file.seek(SeekFrom::Start(*offset)).map_err(err)?;
                BufReader::new(&file)
                    .read_until(b'\n', &mut line)
                    .map_err(err)?;
                if !line.ends_with(b"\n") {
                    break;
                }
                line
            }
        };
        let records: Vec<u8> = batch
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| !l.iter().all(|&b| b == b' ' || b == b'\n'))
            .flatten()
            .copied()
            .collect();
        if !records.is_empty() {
            sink.deliver(&records)
                .map_err(|source| UsageError::Deliver {
                    sink: sink.name().into(),
                    source,
                })?;
        }
        *offset += batch.len() as u64;
        delivered += records.iter().filter(|b| **b == b'\n').count();
        write_cursor(cpath, seg, *offset)?;
    }
    Ok(delivered)
}

fn cursor_path(dir: &Path, sink: &str) -> PathBuf {
    dir.join(format!("{sink}.cursor"))
}

/// A sink's cursor: `(segment, byte offset)`; a bare offset (earlier versions) is in segment 0.
fn read_cursor(path: &Path) -> Result<(u64, u64), UsageError> {
    let bad = |e: std::num::ParseIntError| UsageError::ReadCursor {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    };
    match std::fs::read_to_string(path) {
        Ok(s) => match s.split_once(' ') {
            Some((seg, off)) => Ok((
                seg.trim().parse().map_err(bad)?,
                off.trim().parse().map_err(bad)?,
            )),
            None => Ok((0, s.trim().parse().map_err(bad)?)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, 0)),
        Err(source) => Err(UsageError::ReadCursor {
            path: path.into(),
            source,
        }),
    }
}

/// Writes the cursor atomically.
fn write_cursor(path: &Path, segment: u64, offset: u64) -> Result<(), UsageError> {
    write_atomic(path, format!("{segment} {offset}").as_bytes()).map_err(|source| {
        UsageError::WriteCursor {
            path: path.into(),
            source,
        }
    })
}

/// Replaces `path` atomically (a private temporary file, fsync, rename, fsync of the
/// directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = atoll_api::private::create_file(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_dataplane_common::{Direction, DropReason, TrafficClass};

    fn counters(packets: u64, bytes: u64, drops: u64) -> EndpointCounters {
        let mut c = EndpointCounters::ZERO;
        c.traffic[Direction::FromGuest as usize][TrafficClass::IntraCloud as usize].packets =
            packets;
        c.traffic[Direction::FromGuest as usize][TrafficClass::IntraCloud as usize].bytes = bytes;
        c.drops[DropReason::SpoofedSourceIp as usize] = drops;
        c
    }

    fn snap(inc: &str, c: EndpointCounters) -> Snapshot {
        Snapshot {
            incarnation: inc.into(),
            cloud: 3,
            endpoint: "tap0".into(),
            counters: c,
        }
    }

    #[test]
    fn http_sink_posts_a_batch_and_needs_a_2xx() {
        use std::{io::Read as _, net::TcpListener};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            for status in ["503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Read until the body announced by Content-Length has arrived.
                loop {
                    let n = s.read(&mut buf).unwrap();
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            assert!(head.contains("application/cloudevents-batch+json"));
                            bodies.push(body.to_string());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .unwrap();
            }
            bodies
        });
        let mut sink = HttpSink::new(
            &format!("http://127.0.0.1:{port}/usage"),
            std::time::Duration::from_secs(2),
        )
        .unwrap();
        let lines = b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n";
        assert!(
            sink.deliver(lines).is_err(),
            "503 is not an acknowledgement"
        );
        sink.deliver(lines).unwrap();
        let bodies = server.join().unwrap();
        assert_eq!(bodies[1], "[{\"id\":\"a\"},{\"id\":\"b\"}]");
        // Nobody listening: a clear error, not a hang.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut sink = HttpSink::new(
            &format!("http://127.0.0.1:{port}/"),
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        assert!(sink.deliver(lines).is_err());
        for bad in ["https://x/", "http://", "ftp://a", "http://u@h/"] {
            assert!(
                HttpSink::new(bad, std::time::Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn recorder_resumes_after_restart_without_double_counting() {
        let dir = tmpdir("ur");
        let mut r = Recorder::open(&dir, "atoll/test").unwrap();
        let inc = r.incarnation(12);
        assert_eq!(
            r.record(&[snap(&inc, counters(4, 400, 0))], false).unwrap(),
            1
        );
        assert!(
            matches!(
                Recorder::open(&dir, "other"),
                Err(UsageError::Locked { .. })
            ),
            "one writer"
        );
        drop(r);
        let mut r = Recorder::open(&dir, "atoll/test").unwrap();
        assert_eq!(r.last_name(&inc), Some("tap0"));
        r.record(&[snap(&inc, counters(6, 700, 0))], true).unwrap();
        let text = std::fs::read_to_string(r.journal().path()).unwrap();
        let events: Vec<UsageEvent> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let total: u64 = events
            .iter()
            .map(|e| e.data.usage.bytes("from_guest", "intra_cloud"))
            .sum();
        assert_eq!(
            total, 700,
            "records sum to the kernel's cumulative counters"
        );
        assert_eq!(events[1].id, format!("{inc}-2"));
        assert!(events[1].data.is_final);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn meters_add_up_to_their_lifetimes_across_a_restart_and_end_once() {
        let dir = tmpdir("um");
        let mut r = Recorder::open(&dir, "atoll/test").unwrap();
        let now = now_unix_ms();
        let vm = Meter {
            cloud: 7,
            resource: Resource::Vm {
                name: "web".into(),
                vcpus: 2,
                memory_mib: 512,
            },
            since_ms: now - 10_000,
            until_ms: None,
        };
        let vol = Meter {
            cloud: 7,
            resource: Resource::Volume {
                name: "data".into(),
                size_gib: 3,
            },
            since_ms: now - 4_000,
            until_ms: None,
        };
        r.meters().start("vmm-1", vm.clone());
        r.meters().start("vol-1", vol.clone());
        assert_eq!(r.record(&[], false).unwrap(), 2);
        // A restarted agent (kill -9: the meters are gone, the journal stays) meters the same
        // VMM again, with the start it finds; the journal's baseline wins.
        drop(r);
        let mut r = Recorder::open(&dir, "atoll/test").unwrap();
        r.meters().start(
            "vmm-1",
            Meter {
                since_ms: now - 99_000,
                ..vm
            },
        );
        r.meters().start("vol-1", vol);
        let end = now_unix_ms() + 5_000;
        r.meters().end("vmm-1", end);
        r.meters().end_volume(7, "data", end);
        assert_eq!(r.record(&[], false).unwrap(), 2);
        assert!(
            r.meters().snapshot().is_empty(),
            "ended meters are forgotten"
        );
        assert_eq!(r.record(&[], false).unwrap(), 0);
        let events: Vec<UsageEvent> = std::fs::read_to_string(r.journal().path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let sum = |f: fn(&Counters) -> u64| events.iter().map(|e| f(&e.data.usage)).sum::<u64>();
        let vm_ms = end - (now - 10_000);
        assert_eq!(sum(|c| c.vcpu_ms), 2 * vm_ms);
        assert_eq!(sum(|c| c.memory_mib_ms), 512 * vm_ms);
        assert_eq!(sum(|c| c.volume_gib_ms), 3 * (end - (now - 4_000)));
        let finals: Vec<&UsageEvent> = events.iter().filter(|e| e.data.is_final).collect();
        assert_eq!(finals.len(), 2);
        for f in finals {
            assert_eq!(f.data.end_unix_ms, end);
            assert_eq!(f.data.seq, 2);
        }
        assert_eq!(events[0].data.kind(), "compute");
        assert_eq!(events[1].data.kind(), "storage");
        assert_eq!(events[0].subject, "7/vm/web");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(crate::scratch::unique_name(tag));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_795_478_400_000), "2026-11-24T00:00:00.000Z");
    }

    #[test]
    fn records_are_deltas_against_the_journal_and_ids_are_sequential() {
        let dir = tmpdir("uj");
        let mut j = Journal::open(&dir).unwrap();
        let r1 = build_records(
            &j,
            &[snap("b-7", counters(10, 1000, 1))],
            "atoll/test",
            0,
            1000,
            false,
        );
        assert_eq!(r1[0].id, "b-7-1");
        assert_eq!(r1[0].data.usage.bytes("from_guest", "intra_cloud"), 1000);
        j.append(&r1).unwrap();
        let r2 = build_records(
            &j,
            &[snap("b-7", counters(15, 1600, 1))],
            "atoll/test",
            0,
            2000,
            false,
        );
        assert_eq!(r2[0].id, "b-7-2");
        assert_eq!(r2[0].data.start_unix_ms, 1000);
        assert_eq!(r2[0].data.usage.bytes("from_guest", "intra_cloud"), 600);
        assert!(r2[0].data.usage.drops.is_empty(), "no new drops");
        // Not journaled yet: a restart recomputes the same id with everything since record 1.
        let j2 = Journal::open(&dir).unwrap();
        let again = build_records(
            &j2,
            &[snap("b-7", counters(20, 2000, 2))],
            "atoll/test",
            0,
            3000,
            false,
        );
        assert_eq!(again[0].id, "b-7-2");
        assert_eq!(again[0].data.usage.bytes("from_guest", "intra_cloud"), 1000);
        assert_eq!(again[0].data.usage.drops.get("spoofed_source_ip"), Some(&1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_last_line_is_cut_and_final_records_end_an_incarnation() {
        let dir = tmpdir("ut");
        let mut j = Journal::open(&dir).unwrap();
        let r = build_records(&j, &[snap("b-1", counters(1, 60, 0))], "s", 0, 10, true);
        j.append(&r).unwrap();
        let good = std::fs::metadata(j.path()).unwrap().len();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(j.path())
            .unwrap();
        f.write_all(b"{\"specversion\":\"1.0\",\"id\":\"b-1-2\"")
            .unwrap();
        drop(f);
        let j = Journal::open(&dir).unwrap();
        assert_eq!(std::fs::metadata(j.path()).unwrap().len(), good);
        assert!(j.baseline("b-1").unwrap().is_final);
        assert!(
            build_records(&j, &[snap("b-1", counters(1, 60, 0))], "s", 0, 20, false).is_empty()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn delivery_resumes_from_the_cursor_and_retries_failures() {
        struct Flaky {
            fail: bool,
            got: Vec<u8>,
        }
        impl Sink for Flaky {
            fn name(&self) -> &str {
                "flaky"
            }
            fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error> {
                if self.fail {
                    return Err(io::Error::other("sink down"));
                }
                self.got.extend_from_slice(lines);
                Ok(())
            }
        }
        let dir = tmpdir("ud");
        let mut j = Journal::open(&dir).unwrap();
        for t in 1..=5u64 {
            let r = build_records(
                &j,
                &[snap("b-2", counters(t, t * 100, 0))],
                "s",
                0,
                t,
                false,
            );
            j.append(&r).unwrap();
        }
        let mut sink = Flaky {
            fail: true,
            got: Vec::new(),
        };
        assert!(deliver_pending(&dir, &mut sink, 300).is_err());
        sink.fail = false;
        assert_eq!(deliver_pending(&dir, &mut sink, 300).unwrap(), 5);
        assert_eq!(
            deliver_pending(&dir, &mut sink, 300).unwrap(),
            0,
            "nothing twice"
        );
        assert_eq!(sink.got, std::fs::read(j.path()).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sink that keeps what it got.
    struct Keep {
        got: Vec<u8>,
    }

    impl Sink for Keep {
        fn name(&self) -> &str {
            "keep"
        }
        fn deliver(&mut self, lines: &[u8]) -> Result<(), io::Error> {
            self.got.extend_from_slice(lines);
            Ok(())
        }
    }

    fn ids(bytes: &[u8]) -> Vec<String> {
        std::str::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<UsageEvent>(l).unwrap().id)
            .collect()
    }

    #[test]
    fn segments_rotate_compact_behind_the_cursors_and_rebuild_from_the_checkpoint() {
        let dir = tmpdir("us");
        let limits = JournalLimits {
            segment_bytes: 3000,
            max_bytes: 1 << 20,
        };
        let mut r = Recorder::open_with(&dir, "s", limits).unwrap();
        let (a, gone) = (r.incarnation(1), r.incarnation(2));
        let mut sink = Keep { got: Vec::new() };
        let mut total = 0;
        for t in 1..=40u64 {
            let mut snaps = vec![snap(&a, counters(t, t * 100, 0))];
            if t <= 3 {
                snaps.push(snap(&gone, counters(t, t, 0)));
            }
            total += r.record(&snaps, false).unwrap();
            if t % 7 == 0 {
                deliver_pending(&dir, &mut sink, 1000).unwrap();
                compact(&dir, &["keep"], limits).unwrap();
            }
        }
        deliver_pending(&dir, &mut sink, 1000).unwrap();
        compact(&dir, &["keep"], limits).unwrap();
        let segs = segments(&dir);
        assert!(segs.len() <= 2, "delivered segments are deleted: {segs:?}");
        assert!(segs[0].0 >= 5, "rotated: {segs:?}");
        // Every record delivered exactly once, in order.
        let got = ids(&sink.got);
        assert_eq!(got.len(), total);
        let want: Vec<String> = (1..=40).map(|n| format!("{a}-{n}")).collect();
        assert_eq!(
            got.iter()
                .filter(|i| i.starts_with(&a))
                .cloned()
                .collect::<Vec<_>>(),
            want
        );
        drop(r);
        // Reopened from the checkpoint and the segments after it: the next record continues.
        let mut r = Recorder::open_with(&dir, "s", limits).unwrap();
        assert_eq!(
            r.journal().baseline(&gone),
            None,
            "a gone incarnation is dropped"
        );
        r.record(&[snap(&a, counters(41, 4150, 0))], false).unwrap();
        deliver_pending(&dir, &mut sink, 1000).unwrap();
        let last: UsageEvent = serde_json::from_str(
            std::str::from_utf8(&sink.got)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(last.id, format!("{a}-41"));
        assert_eq!(last.data.usage.bytes("from_guest", "intra_cloud"), 150);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_journal_pauses_periodic_records_and_loses_nothing() {
        let dir = tmpdir("uf");
        let limits = JournalLimits {
            segment_bytes: 2000,
            max_bytes: 4000,
        };
        let mut r = Recorder::open_with(&dir, "s", limits).unwrap();
        let a = r.incarnation(1);
        let mut t = 0;
        let err = loop {
            t += 1;
            match r.record(&[snap(&a, counters(t, t * 10, 0))], false) {
                Ok(_) => assert!(t < 100, "never full"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, UsageError::JournalFull { .. }), "{err}");
        assert!(journal_bytes(&dir) < limits.max_bytes + limits.segment_bytes);
        // A final record is still journaled.
        let b = r.incarnation(2);
        assert_eq!(r.record(&[snap(&b, counters(1, 5, 0))], true).unwrap(), 1);
        // Delivery frees space; the next record covers the paused window.
        let mut sink = Keep { got: Vec::new() };
        deliver_pending(&dir, &mut sink, 1 << 20).unwrap();
        compact(&dir, &["keep"], limits).unwrap();
        r.record(&[snap(&a, counters(t, t * 10, 0))], false)
            .unwrap();
        deliver_pending(&dir, &mut sink, 1 << 20).unwrap();
        let sum: u64 = std::str::from_utf8(&sink.got)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<UsageEvent>(l).unwrap())
            .filter(|e| e.data.incarnation == a)
            .map(|e| e.data.usage.bytes("from_guest", "intra_cloud"))
            .sum();
        assert_eq!(sum, t * 10, "records sum to the kernel's counters");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_set_aside_and_nothing_delivered_is_lost() {
        let dir = tmpdir("uq");
        let mut j = Journal::open(&dir).unwrap();
        for t in 1..=3u64 {
            let r = build_records(&j, &[snap("b-3", counters(t, t * 10, 0))], "s", 0, t, false);
            j.append(&r).unwrap();
        }
        let mut sink = Keep { got: Vec::new() };
        deliver_pending(&dir, &mut sink, 1 << 20).unwrap();
        let delivered = sink.got.clone();
        // Damage the second record in the middle of the journal, then write more.
        let mut bytes = std::fs::read(j.path()).unwrap();
        let second = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        bytes[second + 5] = b'#';
        bytes[second + 9] = 0xff;
        std::fs::write(j.path(), &bytes).unwrap();
        drop(j);
        let mut j = Journal::open(&dir).unwrap();
        assert_eq!(j.quarantined_now(), 1);
        assert_eq!(quarantined(&dir), 1);
        let q = std::fs::read(dir.join(QUARANTINE_FILE)).unwrap();
        assert_eq!(
            q.len(),
            bytes[second..].iter().position(|&b| b == b'\n').unwrap() + 1
        );
        assert_eq!(
            std::fs::metadata(j.path()).unwrap().len(),
            bytes.len() as u64
        );
        assert_eq!(
            j.baseline("b-3").unwrap().seq,
            3,
            "the other records still count"
        );
        let r = build_records(&j, &[snap("b-3", counters(4, 40, 0))], "s", 0, 4, false);
        j.append(&r).unwrap();
        deliver_pending(&dir, &mut sink, 1 << 20).unwrap();
        assert!(
            sink.got.starts_with(&delivered),
            "what was delivered stays delivered"
        );
        assert_eq!(ids(&sink.got[delivered.len()..]), vec!["b-3-4".to_string()]);
        // A second open finds nothing more to set aside.
        drop(j);
        assert_eq!(Journal::open(&dir).unwrap().quarantined_now(), 0);
        assert_eq!(quarantined(&dir), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cursors_of_earlier_versions_and_the_file_sink_rotate() {
        let dir = tmpdir("uc");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("file.cursor"), "42").unwrap();
        assert_eq!(read_cursor(&dir.join("file.cursor")).unwrap(), (0, 42));
        write_cursor(&dir.join("file.cursor"), 3, 7).unwrap();
        assert_eq!(read_cursor(&dir.join("file.cursor")).unwrap(), (3, 7));
        let path = dir.join("records.jsonl");
        let mut f = FileSink::new(path.clone(), 100, 2);
        for i in 0..10 {
            f.deliver(format!("{{\"n\":{i:040}}}\n").as_bytes())
                .unwrap();
        }
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("records"))
            .collect();
        files.sort();
        assert_eq!(
            files,
            ["records.jsonl", "records.jsonl.1", "records.jsonl.2"]
        );
        for n in &files {
            assert!(std::fs::metadata(dir.join(n)).unwrap().len() <= 100, "{n}");
        }
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains(&format!("{:040}", 9)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
