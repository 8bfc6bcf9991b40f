//! Metrics: the dataplane's counters in the OpenMetrics / Prometheus text exposition format,
//! served over HTTP at `GET /metrics`.
//!
//! # Metric families
//!
//! | family | type | labels |
//! |---|---|---|
//! | `atoll_endpoint_packets_total` | counter | `cloud`, `endpoint`, `direction`, `class` |
//! | `atoll_endpoint_bytes_total` | counter | `cloud`, `endpoint`, `direction`, `class` |
//! | `atoll_endpoint_drops_total` | counter | `cloud`, `endpoint`, `reason` |
//! | `atoll_drops_total` | counter | `reason` |
//! | `atoll_endpoints` | gauge | `cloud` |
//! | `atoll_cloud_packets_total` | counter | `cloud`, `direction`, `class` |
//! | `atoll_cloud_bytes_total` | counter | `cloud`, `direction`, `class` |
//! | `atoll_usage_quarantined_records_total` | counter | (none; with usage records on) |
//! | `atoll_usage_journal_bytes` | gauge | (none; with usage records on) |
//! | `atoll_map_entries` | gauge | `map` |
//! | `atoll_map_capacity` | gauge | `map` |
//!
//! `direction` is `from_guest` / `to_guest`, `class` one of `intra_cloud`, `exposure`, `host`,
//! `external`, and `reason` a [`DropReason`] name: the names come from the shared crate, so the
//! kernel's numbering and the exposition can never disagree. Bytes are Ethernet frame lengths
//! (`skb->len`, no FCS), see `docs/design.md` ("Metering").
//!
//! `map` is the pinned name of a map whose capacity a `[dataplane]` setting fixes when the
//! dataplane is created: `ENDPOINTS` (`max_endpoints`), `ROUTES` (`max_routes`) and `VIPS`
//! (`max_vips`); `atoll_map_entries / atoll_map_capacity` is how full it is (what
//! `atoll-agent doctor` warns about past 90%, and `deploy/prometheus/atoll-rules.yml` alerts on).
//!
//! # Design decisions
//!
//! - **Read straight from the pinned maps.** The exporter owns its own [`Dataplane`] handle
//!   (opened from the same config as the agent's `Host`), so a scrape takes no lock on the
//!   agent and keeps working while endpoints are created or deleted. The maps are the only
//!   state: nothing is cached between scrapes.
//! - **Every series is always present.** Each endpoint exports all directions x classes and all
//!   drop reasons, zeros included, and the host-wide drops all reasons; a series never appears
//!   in the middle of a time range, so `rate()` and `increase()` see its whole history.
//! - **`endpoint` is the host device name** (stable across agent restarts and what operators
//!   see in `ip link`); if the device is gone while its dataplane entry still exists (a VMM
//!   deleted its tap while the agent was down, before `reconcile`), it is `ifindex-<n>`.
//! - **Cloud totals are summed in userspace** over the cloud's current endpoints, from the very
//!   same counter reads as the endpoint series of that scrape, so within one exposition a cloud
//!   total always equals the sum of its endpoints. Deleting an endpoint removes its share, which
//!   Prometheus treats as a counter reset; bill from the endpoint series (or from
//!   `increase()`, which handles resets), and use the cloud totals for dashboards.
//! - **A scrape is not an atomic snapshot.** Endpoints are read one after another while
//!   traffic flows; every counter only grows, so each value is exact for the instant it was
//!   read. Per-CPU values are summed here, in userspace.
//! - **Content negotiation is minimal but correct.** A client that accepts
//!   `application/openmetrics-text` (version 1.0.0 or unversioned) at least as much as the
//!   plain text format gets OpenMetrics 1.0.0 (counter families named without `_total` in
//!   `HELP`/`TYPE`, `# EOF` at the end); everyone else (no `Accept`, `*/*`, `text/plain`) gets
//!   the Prometheus text format 0.0.4. An `Accept` header naming neither is disregarded (RFC
//!   9110 allows it) rather than answered with 406, so `curl -H 'Accept: foo'` still works.
//! - **HTTP surface.** Only `/metrics` exists (other paths: 404); it answers `GET` and `HEAD`
//!   (HEAD is part of GET's semantics; other methods: 405 with `Allow`). Query strings are
//!   ignored. Malformed requests are answered by hyper itself (400, 414, 431) and close that
//!   connection only. Each connection is its own task, connections are capped at
//!   [`MAX_CONNECTIONS`], and headers must arrive within [`HEADER_READ_TIMEOUT`] (which also
//!   closes idle keep-alive connections), so slow or stuck clients cannot pile up. Collecting
//!   and rendering run on the blocking pool: they are syscalls plus string formatting, and
//!   the agent's runtime has a single thread.
//! - **Map fill walks the keys.** The kernel keeps no entry count of a hash map that user space
//!   can read (`bpf_map_info` has none), so a scrape counts `ENDPOINTS`, `ROUTES` and `VIPS`
//!   by walking their keys with `BPF_MAP_GET_NEXT_KEY` (the same walk as `atoll-agent doctor`,
//!   [`crate::dataplane::map_usage`]): one syscall per entry, so a few milliseconds per
//!   10,000 entries. That is acceptable for maps of up to ~100k entries each (the defaults are
//!   65,536); past that, scrape less often or raise Prometheus's `scrape_timeout`. The LRU flow
//!   tables (`max_flows`) are left out on purpose: full is their steady state (the kernel
//!   evicts the least recently used flow), and walking 262,144 keys of each on every scrape
//!   would cost more than the answer is worth. Fixed-size arrays are always "full" and left out
//!   too.
//! - **Size.** About 4 KB of text per endpoint (40 series), so 1000 endpoints are ~4 MB per
//!   scrape; the zero-valued drop reasons are the bulk of it (the price of stable series).

use atoll_api::metrics_text::escape_label_value;
use std::{
    collections::BTreeMap, convert::Infallible, fmt::Write as _, io, net::SocketAddr, sync::Arc,
    time::Duration,
};

use atoll_dataplane_common::{
    Direction, DropReason, EndpointCounters, TrafficClass, TrafficCounter,
};
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::{
    config::DataplaneConfig,
    dataplane::{Dataplane, DataplaneError, MapUsage},
    device,
};

/// The only path served.
pub const PATH: &str = "/metrics";
/// `Content-Type` of the OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text exposition.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Concurrent connections; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must be complete within this time (idle keep-alive connections are
/// closed after it, too).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("opening the dataplane for metrics: {0}")]
    OpenDataplane(#[source] DataplaneError),
    #[error("listing endpoints for metrics: {0}")]
    ListEndpoints(#[source] DataplaneError),
    #[error("looking up endpoint ifindex {ifindex}: {source}")]
    ReadEndpoint {
        ifindex: u32,
        source: DataplaneError,
    },
    #[error("reading the counters of endpoint ifindex {ifindex} (slot {slot}): {source}")]
    ReadCounters {
        ifindex: u32,
        slot: u32,
        source: DataplaneError,
    },
    #[error("reading the host-wide drop counters: {0}")]
    ReadDrops(#[source] DataplaneError),
    #[error("counting the entries of the dataplane's maps: {0}")]
    ReadMapFill(#[source] DataplaneError),
    #[error("binding the metrics listener on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("accepting a metrics connection: {0}")]
    Accept(#[source] io::Error),
    #[error("collecting metrics (task failed): {0}")]
    Collect(#[source] tokio::task::JoinError),
}

/// The text format of an exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0.0.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }

    /// The format for a request's `Accept` header (see module docs).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let (mut q, mut version) = (1.0f32, None);
            for param in parts {
                let Some((k, v)) = param.split_once('=') else {
                    continue;
                };
                let v = v.trim().trim_matches('"');
                match k.trim().to_ascii_lowercase().as_str() {
                    // An unparsable weight disqualifies the range.
                    "q" => {
                        q = v
                            .parse::<f32>()
                            .ok()
                            .filter(|q| q.is_finite())
                            .unwrap_or(0.0)
                    }
                    "version" => version = Some(v.to_string()),
                    _ => {}
                }
            }
            let version = version.as_deref();
            match media.as_str() {
                "application/openmetrics-text" if matches!(version, None | Some("1.0.0")) => {
                    openmetrics = openmetrics.max(q)
                }
                "text/plain" if matches!(version, None | Some("0.0.4")) => text = text.max(q),
                "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// One endpoint's counters as read in one scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSample {
    pub ifindex: u32,
    /// Host device name; `None` if the device no longer exists.
    pub name: Option<String>,
    pub cloud: u32,
    pub counters: EndpointCounters,
}

impl EndpointSample {
    /// The `endpoint` label: the device name, or `ifindex-<n>` if the device is gone.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("ifindex-{}", self.ifindex),
        }
    }
}

/// Everything one exposition shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub endpoints: Vec<EndpointSample>,
    /// Host-wide drops for every reason (including frames of no endpoint).
    pub drops: Vec<(DropReason, u64)>,
    /// The usage journal, when usage records are on.
    pub usage: Option<UsageJournal>,
    /// How full the maps sized by a `[dataplane]` setting are (`ENDPOINTS`, `ROUTES`, `VIPS`).
    pub maps: Vec<MapUsage>,
}

impl Snapshot {
    /// A snapshot in which every metric family has samples: two clouds, three endpoints (one
    /// whose device is gone), every drop reason, the usage journal and every map of
    /// [`crate::dataplane::map_usage`]. For tests outside this crate that check which metric
    /// names the exposition has (the dashboards' test in `atoll-tests`); the values mean
    /// nothing.
    #[doc(hidden)]
    pub fn example() -> Snapshot {
        let counters = |seed: u64| {
            let mut c = EndpointCounters::ZERO;
            for d in Direction::ALL {
                for k in TrafficClass::ALL {
                    let t = &mut c.traffic[d as usize][k as usize];
                    t.packets = seed * 100 + d as u64 * 10 + k as u64;
                    t.bytes = t.packets * 60;
                }
            }
            for r in DropReason::ALL {
                c.drops[r as usize] = seed * 1000 + r as u64;
            }
            c
        };
        let map = |map: &'static str, setting: &'static str, used: u32| MapUsage {
            map,
            used,
            max_entries: 65536,
            setting,
        };
        Snapshot {
            endpoints: vec![
                EndpointSample {
                    ifindex: 7,
                    name: Some("tap-b".into()),
                    cloud: 2,
                    counters: counters(1),
                },
                EndpointSample {
                    ifindex: 9,
                    name: None,
                    cloud: 1,
                    counters: counters(2),
                },
                EndpointSample {
                    ifindex: 5,
                    name: Some("we\"ird\\na\nme".into()),
                    cloud: 2,
                    counters: counters(3),
                },
            ],
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, *r as u64 * 3))
                .collect(),
            usage: Some(UsageJournal {
                quarantined: 2,
                bytes: 300,
            }),
            maps: vec![
                map(crate::dataplane::MAP_ENDPOINTS, "max_endpoints", 3),
                map(crate::dataplane::MAP_ROUTES, "max_routes", 6),
                map(crate::dataplane::MAP_VIPS, "max_vips", 0),
            ],
        }
    }
}

/// What the metrics show of the usage journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageJournal {
    /// Records ever set aside as unreadable (lines of its quarantine file).
    pub quarantined: u64,
    /// Bytes its segments hold.
    pub bytes: u64,
}

/// Reads the pinned dataplane's counters.
pub struct Exporter {
    dataplane: Dataplane,
    /// `dataplane.bpffs_root`, whose current layout's maps are counted for the map fill.
    bpffs_root: std::path::PathBuf,
    usage_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// Opens its own handle on the pinned dataplane (creating the pins if absent, like the
    /// agent).
    pub fn open(cfg: &DataplaneConfig) -> Result<Self, MetricsError> {
        Ok(Exporter {
            dataplane: Dataplane::open(cfg).map_err(MetricsError::OpenDataplane)?,
            bpffs_root: cfg.bpffs_root.clone(),
            usage_dir: None,
        })
    }

    /// Also exports the state of the usage journal in `dir`.
    pub fn with_usage_journal(mut self, dir: std::path::PathBuf) -> Self {
        self.usage_dir = Some(dir);
        self
    }

    /// Reads every endpoint's counters, the host-wide drops and how full the maps are.
    pub fn snapshot(&self) -> Result<Snapshot, MetricsError> {
        let mut endpoints = Vec::new();
        for (ifindex, info) in self
            .dataplane
            .endpoints()
            .map_err(MetricsError::ListEndpoints)?
        {
            let counters = self.dataplane.counters(info.slot).map_err(|source| {
                MetricsError::ReadCounters {
                    ifindex,
                    slot: info.slot,
                    source,
                }
            })?;
            let name = device::ifname(ifindex);
            // No device: either it vanished behind the agent's back (exported as
            // `ifindex-<n>` until reconciled) or the endpoint was deleted during this scrape
            // (skipped, so no one-scrape series appears).
            if name.is_none() {
                let still = self
                    .dataplane
                    .endpoint(ifindex)
                    .map_err(|source| MetricsError::ReadEndpoint { ifindex, source })?;
                if still.is_none() {
                    continue;
                }
            }
            endpoints.push(EndpointSample {
                ifindex,
                name,
                cloud: info.cloud,
                counters,
            });
        }
        let drops = self
            .dataplane
            .drop_counters()
            .map_err(MetricsError::ReadDrops)?;
        let usage = self.usage_dir.as_deref().map(|dir| UsageJournal {
            quarantined: crate::usage::quarantined(dir),
            bytes: crate::usage::journal_bytes(dir),
        });
        // `None`: nothing pinned, which cannot be while `self.dataplane` is open, short of
        // someone removing the pins under it; then there is nothing to count.
        let maps = crate::dataplane::map_usage(&self.bpffs_root)
            .map_err(MetricsError::ReadMapFill)?
            .unwrap_or_default();
        Ok(Snapshot {
            endpoints,
            drops,
            usage,
            maps,
        })
    }

    /// A full exposition in `format`.
    pub fn render(&self, format: Format) -> Result<String, MetricsError> {
        Ok(render(&self.snapshot()?, format))
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

type Collect = Arc<dyn Fn() -> Result<Snapshot, MetricsError> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until a fatal accept error (per-connection errors only
/// end that connection). Must run inside a tokio runtime with timers enabled.
pub async fn serve(listener: TcpListener, exporter: Exporter) -> Result<(), MetricsError> {
    serve_with(listener, Arc::new(move || exporter.snapshot())).await
}

async fn serve_with(listener: TcpListener, collect: Collect) -> Result<(), MetricsError> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            // The semaphore is never closed.
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if accept_error_is_transient(&e) => {
                // Out of fds or memory: back off instead of spinning; the connection stays in
                // the backlog.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            Err(e) => return Err(MetricsError::Accept(e)),
        };
        let collect = collect.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, collect.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            // Errors (client gone, malformed request already answered by hyper) only end this
            // connection.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

fn accept_error_is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::EHOSTUNREACH
        )
    )
}

async fn handle(
    req: Request<Incoming>,
    collect: Collect,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != PATH {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found; try GET /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed; use GET\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let accept = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let format = Format::negotiate((!accept.is_empty()).then_some(accept.as_str()));
    let rendered = tokio::task::spawn_blocking(move || collect().map(|s| render(&s, format)))
        .await
        .map_err(MetricsError::Collect)
        .and_then(|r| r);
    Ok(match rendered {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            r
        }
        Err(e) => {
            tracing::error!("metrics: {e}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("collecting metrics failed: {e}\n"),
            )
        }
    })
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// Renders a snapshot. Endpoints are ordered by cloud, then endpoint label, then ifindex;
/// clouds by number.
pub fn render(snapshot: &Snapshot, format: Format) -> String {
    let mut endpoints: Vec<(&EndpointSample, String, String)> = snapshot
        .endpoints
        .iter()
        .map(|e| (e, e.cloud.to_string(), e.label()))
        .collect();
    endpoints.sort_by(|a, b| (a.0.cloud, &a.2, a.0.ifindex).cmp(&(b.0.cloud, &b.2, b.0.ifindex)));
    let mut clouds: BTreeMap<u32, (usize, EndpointCounters)> = BTreeMap::new();
    for (e, _, _) in &endpoints {
        let (n, total) = clouds.entry(e.cloud).or_insert((0, EndpointCounters::ZERO));
        *n += 1;
        add_traffic(total, &e.counters);
    }
    let clouds: Vec<(String, usize, EndpointCounters)> = clouds
        .into_iter()
        .map(|(c, (n, t))| (c.to_string(), n, t))
        .collect();

    let mut w = Writer::new(format);
    for (family, help, field) in [
        (
            "atoll_endpoint_packets",
            "Frames metered on an endpoint, by direction (from the guest's point of view) and traffic class.",
            Field::Packets,
        ),
        (
            "atoll_endpoint_bytes",
            "Bytes (Ethernet frame length, no FCS) metered on an endpoint, by direction and traffic class.",
            Field::Bytes,
        ),
    ] {
        w.family(family, Kind::Counter, help);
        for (e, cloud, name) in &endpoints {
            for dir in Direction::ALL {
                for class in TrafficClass::ALL {
                    let t = &e.counters.traffic[dir as usize][class as usize];
                    w.sample(
                        family,
                        Kind::Counter,
                        &[
                            ("cloud", cloud),
                            ("endpoint", name),
                            ("direction", dir.name()),
                            ("class", class.name()),
                        ],
                        field.of(t),
                    );
                }
            }
        }
    }
    w.family(
        "atoll_endpoint_drops",
        Kind::Counter,
        "Frames from (or, for to_vm reasons, to) an endpoint dropped by the dataplane, by reason.",
    );
    for (e, cloud, name) in &endpoints {
        for r in DropReason::ALL {
            w.sample(
                "atoll_endpoint_drops",
                Kind::Counter,
                &[("cloud", cloud), ("endpoint", name), ("reason", r.name())],
                e.counters.drops[r as usize],
            );
        }
    }
    w.family(
        "atoll_drops",
        Kind::Counter,
        "Frames dropped by the dataplane on this host, by reason (including frames of no endpoint).",
    );
    for r in DropReason::ALL {
        let n = snapshot
            .drops
            .iter()
            .find(|(d, _)| *d == r)
            .map_or(0, |(_, n)| *n);
        w.sample("atoll_drops", Kind::Counter, &[("reason", r.name())], n);
    }
    w.family(
        "atoll_endpoints",
        Kind::Gauge,
        "Endpoints on this host, by cloud.",
    );
    for (cloud, n, _) in &clouds {
        w.sample(
            "atoll_endpoints",
            Kind::Gauge,
            &[("cloud", cloud)],
            *n as u64,
        );
    }
    for (family, help, field) in [
        (
            "atoll_cloud_packets",
            "Frames metered on the cloud's current endpoints on this host (sum of atoll_endpoint_packets_total).",
            Field::Packets,
        ),
        (
            "atoll_cloud_bytes",
            "Bytes metered on the cloud's current endpoints on this host (sum of atoll_endpoint_bytes_total).",
            Field::Bytes,
        ),
    ] {
        w.family(family, Kind::Counter, help);
        for (cloud, _, total) in &clouds {
            for dir in Direction::ALL {
                for class in TrafficClass::ALL {
                    let t = &total.traffic[dir as usize][class as usize];
                    w.sample(
                        family,
                        Kind::Counter,
                        &[
                            ("cloud", cloud),
                            ("direction", dir.name()),
                            ("class", class.name()),
                        ],
                        field.of(t),
                    );
                }
            }
        }
    }
    if let Some(u) = snapshot.usage {
        w.family(
            "atoll_usage_quarantined_records",
            Kind::Counter,
            "Usage journal lines set aside as unreadable (kept in the journal's quarantine.jsonl).",
        );
        w.sample(
            "atoll_usage_quarantined_records",
            Kind::Counter,
            &[],
            u.quarantined,
        );
        w.family(
            "atoll_usage_journal_bytes",
            Kind::Gauge,
            "Bytes held by the usage journal's segments (bounded by usage.journal_max_bytes).",
        );
        w.sample("atoll_usage_journal_bytes", Kind::Gauge, &[], u.bytes);
    }
    w.family(
        "atoll_map_entries",
        Kind::Gauge,
        "Entries in a dataplane map whose capacity a [dataplane] setting fixes (ENDPOINTS: max_endpoints, ROUTES: max_routes, VIPS: max_vips).",
    );
    for m in &snapshot.maps {
        w.sample(
            "atoll_map_entries",
            Kind::Gauge,
            &[("map", m.map)],
            u64::from(m.used),
        );
    }
    w.family(
        "atoll_map_capacity",
        Kind::Gauge,
        "Capacity (max_entries) of a dataplane map, fixed when the dataplane was created.",
    );
    for m in &snapshot.maps {
        w.sample(
            "atoll_map_capacity",
            Kind::Gauge,
            &[("map", m.map)],
            u64::from(m.max_entries),
        );
    }
    w.finish()
}

fn add_traffic(total: &mut EndpointCounters, c: &EndpointCounters) {
    for (td, cd) in total.traffic.iter_mut().zip(c.traffic.iter()) {
        for (t, x) in td.iter_mut().zip(cd.iter()) {
            t.packets = t.packets.wrapping_add(x.packets);
            t.bytes = t.bytes.wrapping_add(x.bytes);
        }
    }
}

#[derive(Clone, Copy)]
enum Field {
    Packets,
    Bytes,
}

impl Field {
    fn of(self, t: &TrafficCounter) -> u64 {
        match self {
            Field::Packets => t.packets,
            Field::Bytes => t.bytes,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

struct Writer {
    format: Format,
    out: String,
}

impl Writer {
    fn new(format: Format) -> Self {
        Writer {
            format,
            out: String::new(),
        }
    }

    /// `HELP` and `TYPE` of a family. `name` is the family name, without `_total`.
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (ty, suffix) = match kind {
            Kind::Counter => ("counter", "_total"),
            Kind::Gauge => ("gauge", ""),
        };
        // OpenMetrics names the family, the Prometheus text format the sample.
        let suffix = match self.format {
            Format::OpenMetrics => "",
            Format::Text => suffix,
        };
        let help = escape_help(help, self.format);
        let _ = writeln!(self.out, "# HELP {name}{suffix} {help}");
        let _ = writeln!(self.out, "# TYPE {name}{suffix} {ty}");
    }

    fn sample(&mut self, family: &str, kind: Kind, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(family);
        if kind == Kind::Counter {
            self.out.push_str("_total");
        }
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// `HELP` text escapes backslash and line feed, and in OpenMetrics also double quote.
fn escape_help(v: &str, format: Format) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example without the usage journal (its families are checked on their own).
    fn snapshot() -> Snapshot {
        Snapshot {
            usage: None,
            ..Snapshot::example()
        }
    }

    fn lines(s: &str, prefix: &str) -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn openmetrics_families_and_eof() {
        let s = render(&snapshot(), Format::OpenMetrics);
        assert!(s.ends_with("\n# EOF\n"), "{s}");
        assert_eq!(s.matches("# EOF").count(), 1);
        for (family, ty) in [
            ("atoll_endpoint_packets", "counter"),
            ("atoll_endpoint_bytes", "counter"),
            ("atoll_endpoint_drops", "counter"),
            ("atoll_drops", "counter"),
            ("atoll_endpoints", "gauge"),
            ("atoll_cloud_packets", "counter"),
            ("atoll_cloud_bytes", "counter"),
        ] {
            assert_eq!(
                lines(&s, &format!("# TYPE {family} ")),
                vec![format!("# TYPE {family} {ty}")]
            );
            assert_eq!(lines(&s, &format!("# HELP {family} ")).len(), 1, "{family}");
        }
        // Every sample line of a counter ends in _total; families are contiguous.
        let mut seen = Vec::new();
        for l in s.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            if !["atoll_endpoints", "atoll_map_entries", "atoll_map_capacity"].contains(&name) {
                assert!(name.ends_with("_total"), "{l}");
            }
            if seen.last() != Some(&name.to_string()) {
                assert!(!seen.contains(&name.to_string()), "{name} not contiguous");
                seen.push(name.to_string());
            }
        }
    }

    #[test]
    fn text_format_names_samples_in_help_and_type() {
        let s = render(&snapshot(), Format::Text);
        assert!(!s.contains("# EOF"));
        assert!(s.contains("# TYPE atoll_endpoint_packets_total counter\n"));
        assert!(s.contains("# TYPE atoll_endpoints gauge\n"));
        assert!(s.contains("# HELP atoll_drops_total Frames dropped"));
        // Same samples as OpenMetrics.
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            samples(&s),
            samples(&render(&snapshot(), Format::OpenMetrics))
        );
    }

    #[test]
    fn every_series_is_present_with_exact_values() {
        let s = render(&snapshot(), Format::Text);
        let count = |p: &str| s.lines().filter(|l| l.starts_with(p)).count();
        assert_eq!(
            count("atoll_endpoint_packets_total{"),
            3 * 2 * TrafficClass::COUNT
        );
        assert_eq!(
            count("atoll_endpoint_bytes_total{"),
            3 * 2 * TrafficClass::COUNT
        );
        assert_eq!(
            count("atoll_endpoint_drops_total{"),
            3 * DropReason::ALL.len()
        );
        assert_eq!(count("atoll_drops_total{"), DropReason::ALL.len());
        assert_eq!(count("atoll_endpoints{"), 2);
        assert_eq!(
            count("atoll_cloud_packets_total{"),
            2 * 2 * TrafficClass::COUNT
        );
        assert_eq!(
            count("atoll_cloud_bytes_total{"),
            2 * 2 * TrafficClass::COUNT
        );
        assert!(s.contains(
            "\natoll_endpoint_packets_total{cloud=\"2\",endpoint=\"tap-b\",direction=\"to_guest\",class=\"host\"} 112\n"
        ));
        assert!(s.contains(
            "\natoll_endpoint_bytes_total{cloud=\"2\",endpoint=\"tap-b\",direction=\"to_guest\",class=\"host\"} 6720\n"
        ));
        assert!(s.contains(
            "\natoll_endpoint_drops_total{cloud=\"1\",endpoint=\"ifindex-9\",reason=\"no_route_in_cloud\"} 2019\n"
        ));
        assert!(s.contains("\natoll_drops_total{reason=\"to_vm_not_allowed\"} 72\n"));
        assert!(s.contains("\natoll_endpoints{cloud=\"1\"} 1\n"));
        assert!(s.contains("\natoll_endpoints{cloud=\"2\"} 2\n"));
        // Cloud 2 = endpoints with seeds 1 and 3: 100+300 + 2*(d*10+k).
        assert!(s.contains(
            "\natoll_cloud_packets_total{cloud=\"2\",direction=\"from_guest\",class=\"exposure\"} 402\n"
        ));
        assert!(s.contains(
            "\natoll_cloud_bytes_total{cloud=\"2\",direction=\"from_guest\",class=\"exposure\"} 24120\n"
        ));
        assert!(s.contains(
            "\natoll_cloud_packets_total{cloud=\"1\",direction=\"to_guest\",class=\"external\"} 213\n"
        ));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let s = render(&snapshot(), Format::OpenMetrics);
        assert!(s.contains(r#"endpoint="we\"ird\\na\nme""#), "{s}");
        assert!(!s.lines().any(|l| l == "me\""), "a raw newline leaked");
        let mut out = String::new();
        escape_label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b\"c\nd"#);
        assert_eq!(
            escape_help("x\"y\\z\n", Format::OpenMetrics),
            r#"x\"y\\z\n"#
        );
        assert_eq!(escape_help("x\"y\\z\n", Format::Text), r#"x"y\\z\n"#);
    }

    #[test]
    fn ordering_is_by_cloud_then_name() {
        let s = render(&snapshot(), Format::Text);
        let order: Vec<&str> = s
            .lines()
            .filter(|l| {
                l.starts_with("atoll_endpoint_drops_total{")
                    && l.contains("reason=\"unknown_endpoint\"")
            })
            .map(|l| {
                l.split("endpoint=\"")
                    .nth(1)
                    .unwrap()
                    .split("\",")
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(order, vec!["ifindex-9", "tap-b", r#"we\"ird\\na\nme"#]);
    }

    #[test]
    fn no_endpoints_still_has_all_families() {
        let mut snap = Snapshot {
            endpoints: Vec::new(),
            drops: Vec::new(),
            usage: None,
            maps: Vec::new(),
        };
        let s = render(&snap, Format::OpenMetrics);
        assert_eq!(s.lines().filter(|l| l.starts_with("# TYPE")).count(), 9);
        assert!(s.contains("# TYPE atoll_map_entries gauge\n"), "{s}");
        assert!(s.contains("# TYPE atoll_map_capacity gauge\n"), "{s}");
        snap.usage = Some(UsageJournal {
            quarantined: 2,
            bytes: 300,
        });
        let s = render(&snap, Format::OpenMetrics);
        assert!(
            s.contains("\natoll_usage_quarantined_records_total 2\n"),
            "{s}"
        );
        assert!(s.contains("\natoll_usage_journal_bytes 300\n"), "{s}");
        assert_eq!(
            s.lines()
                .filter(|l| l.starts_with("atoll_drops_total{"))
                .count(),
            DropReason::ALL.len(),
            "missing reasons are zeros"
        );
    }

    #[test]
    fn map_fill_per_map() {
        let s = render(&snapshot(), Format::Text);
        assert!(s.contains("# TYPE atoll_map_entries gauge\n"), "{s}");
        assert!(s.contains("# TYPE atoll_map_capacity gauge\n"), "{s}");
        for (map, used) in [("ENDPOINTS", 3), ("ROUTES", 6), ("VIPS", 0)] {
            assert!(
                s.contains(&format!("\natoll_map_entries{{map=\"{map}\"}} {used}\n")),
                "{map}: {s}"
            );
            assert!(
                s.contains(&format!("\natoll_map_capacity{{map=\"{map}\"}} 65536\n")),
                "{map}: {s}"
            );
        }
        // The same samples in OpenMetrics (gauges have no suffix in either format).
        let om = render(&snapshot(), Format::OpenMetrics);
        assert!(
            om.contains("\natoll_map_entries{map=\"ROUTES\"} 6\n"),
            "{om}"
        );
        assert!(om.contains("# TYPE atoll_map_capacity gauge\n"), "{om}");
        // Every family of the example has samples (what the dashboards' test relies on).
        let ex = render(&Snapshot::example(), Format::Text);
        for family in ex.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = family.split(' ').next().unwrap();
            assert!(
                ex.lines()
                    .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
                "{name} has no sample in the example"
            );
        }
    }

    #[test]
    fn negotiation() {
        use Format::*;
        let cases = [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some("text/plain"), Text),
            (Some("application/openmetrics-text"), OpenMetrics),
            (Some("Application/OpenMetrics-Text; Version=1.0.0"), OpenMetrics),
            (Some("application/openmetrics-text;version=0.0.1"), Text),
            (Some("application/openmetrics-text;version=2.0.0"), Text),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/openmetrics-text;q=bogus"), Text),
            (Some("application/openmetrics-text;q=0.2, text/plain;q=0.5"), Text),
            (Some("application/openmetrics-text;q=0.5, text/plain"), Text),
            (Some("application/openmetrics-text, */*"), OpenMetrics),
            // What Prometheus sends.
            (
                Some("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
                OpenMetrics,
            ),
            (Some("application/json"), Text),
            (Some(";;;,,=;q=="), Text),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    // The HTTP layer with a fake collector: routing, methods, formats, errors.
    async fn request(addr: SocketAddr, raw: &[u8]) -> String {
        use std::io::{Read, Write};
        let raw = raw.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&raw).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out)
                .expect("the whole response within 5 s");
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn http_routes_methods_and_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fail.clone();
        let collect: Collect = Arc::new(move || {
            if f.load(std::sync::atomic::Ordering::Relaxed) {
                Err(MetricsError::ReadDrops(DataplaneError::EntryExists {
                    map: "DROPS",
                    what: "test".into(),
                }))
            } else {
                Ok(snapshot())
            }
        });
        let server = tokio::spawn(serve_with(listener, collect));
        let get = |path: &str, extra: &str| {
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
        };
        let r = request(addr, get("/metrics", "").as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            r.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{r}"
        );
        assert!(
            r.contains("\r\n\r\n# HELP atoll_endpoint_packets_total "),
            "{r}"
        );
        let r = request(
            addr,
            get("/metrics?x=1", "Accept: application/openmetrics-text\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            r.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(r.ends_with("# EOF\n"), "{r}");
        let r = request(
            addr,
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
        for path in ["/", "/metrics/", "/metricsx", "/favicon.ico"] {
            let r = request(addr, get(path, "").as_bytes()).await;
            assert!(r.starts_with("HTTP/1.1 404 "), "{path}: {r}");
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"] {
            let raw = format!(
                "{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let r = request(addr, raw.as_bytes()).await;
            assert!(r.starts_with("HTTP/1.1 405 "), "{method}: {r}");
            assert!(r.contains("allow: GET, HEAD\r\n"), "{r}");
        }
        for garbage in [
            &b"\x00\x01\x02garbage\r\n\r\n"[..],
            b"GET /metrics HTTP/9.9\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        ] {
            let r = request(addr, garbage).await;
            assert!(r.starts_with("HTTP/1.1 400 "), "{garbage:?}: {r}");
        }
        let big = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(1 << 20)
        );
        let r = request(addr, big.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{}", &r[..r.len().min(200)]);
        // A client that connects and leaves without a word.
        drop(tokio::net::TcpStream::connect(addr).await.unwrap());
        fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = request(addr, get("/metrics", "").as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
        fail.store(false, std::sync::atomic::Ordering::Relaxed);
        // Still serving, and keep-alive works for several requests on one connection.
        let two = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n{}",
            get("/metrics", "")
        );
        let r = request(addr, two.as_bytes()).await;
        assert_eq!(r.matches("HTTP/1.1 200 ").count(), 2, "{}", &r[..200]);
        assert!(!server.is_finished());
        server.abort();
    }
}
