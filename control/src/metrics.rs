//! The control plane's metrics: process-global counters and gauges, rendered in the Prometheus
//! text format 0.0.4 and served unauthenticated at `GET /metrics` on a listener of their own
//! (`[metrics]` in the control plane's config, off by default).
//!
//! # Metric families
//!
//! | family | type | labels | set by |
//! |---|---|---|---|
//! | `atoll_build_info` | gauge (always 1) | `version` | this module |
//! | `atoll_api_requests_total` | counter | `route`, `status` | the API router ([`api_request`]) |
//! | `atoll_api_request_seconds` | histogram ([`BUCKETS`]) | `route` | the API router ([`api_request`]) |
//! | `atoll_usage_records_total` | counter | `result` = `accepted` / `duplicate` / `refused` | the core ([`usage_ingested`]) |
//! | `atoll_budget_clouds` | gauge | `state` = `warning` / `exceeded` | the core ([`set_budget_clouds`]) |
//! | `atoll_store_txn_conflicts_total` | counter | (none) | the core ([`store_conflict`]) |
//! | `atoll_hosts` | gauge | `state` = `live` / `stale` | each scrape ([`set_hosts`]) |
//!
//! `route` is the route's id in the route table (`atoll_api::routes::RouteId`, e.g.
//! `CreateVm`, `IngestUsage`), or `OpenApi` (`GET /openapi.json`), `Mcp` (`POST /mcp`) and
//! `Unmatched` (no route for the path or method: 404 and 405); `status` is the exact HTTP
//! status code of the response.
//!
//! # Design decisions
//!
//! - **Process-global state, plain functions.** The recording functions take no handle, so
//!   the core and the router call them where things happen without threading a registry
//!   through. No metrics crate: the families are few and fixed, and the text format is a few
//!   lines of formatting. Two control planes in one process (tests) share the numbers, which
//!   only ever grow.
//! - **Scalars are atomics; per-route series sit behind one mutex.** The label sets of
//!   `atoll_api_requests_total` are not known in advance (status codes), so requests are
//!   counted in a map under a [`Mutex`]: one uncontended lock per request, nothing next to the
//!   request's store round trip. A poisoned lock is used as is (the counters stay consistent:
//!   nothing panics while holding it). At most [`MAX_ROUTES`] route labels are kept; further
//!   ones are counted as `route="other"`, so a caller passing unexpected names cannot grow the
//!   exposition without bound.
//! - **Every route of the table is always present** in `atoll_api_request_seconds` (zeros
//!   included) from the first scrape, so `rate()` sees a series' whole history and the
//!   dashboards' route list is complete; `atoll_api_requests_total` has a series per status
//!   actually returned.
//! - **What a request's duration is.** From the router receiving the request to its handler
//!   returning the response's head: the body of a streamed reply (an exec's output, a file
//!   read) is not included, and a host's long poll (`Sync`, up to a minute) is counted in
//!   full, which is why [`BUCKETS`] reach 60 s and the latency alert leaves `Sync` out.
//!   Requests hyper answers itself (malformed, headers too large) and connections closed by the
//!   header timeout never reach the router and are not counted. An MCP tool call is counted
//!   once, as its `POST /mcp` request.
//! - **Hosts are counted at scrape time** (a store read of the host records, the same as
//!   `GET /v1/hosts`, within [`HOSTS_READ_TIMEOUT`]); when that read fails the family has no
//!   samples in that scrape rather than stale ones. Several control planes over one etcd each
//!   report the same hosts: aggregate with `max`, not `sum`.
//! - **Budget gauges are the core's latest evaluation**, set whenever it evaluates budgets; 0
//!   until it first does.
//! - **The listener is separate and unauthenticated.** `GET /metrics` needs no token, so it is
//!   never on the API's listener: `[metrics] listen` defaults to loopback, and an operator who
//!   opens it to a Prometheus elsewhere firewalls it. It serves only `/metrics` (`GET`, `HEAD`;
//!   others 404/405), always in the text format 0.0.4 (what every Prometheus accepts), with the
//!   API server's timeouts and at most [`MAX_CONNECTIONS`] connections.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock,
    },
    time::Duration,
};

use atoll_api::routes::{RouteId, ROUTES};
use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use crate::core::{Command, Core, Principal};

/// The only path served.
pub const PATH: &str = "/metrics";
/// `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Default address of the listener (`[metrics] listen`): loopback only.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9481));
/// Concurrent connections of the metrics listener.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a scrape waits for the host records.
pub const HOSTS_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bounds (seconds) of the buckets of `atoll_api_request_seconds` (and `+Inf`).
pub const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0,
];
/// Distinct `route` labels kept; more are counted as `other`.
pub const MAX_ROUTES: usize = 256;

/// `route` of requests that matched no route (404, 405).
pub const ROUTE_UNMATCHED: &str = "Unmatched";
/// `route` of `GET /openapi.json`.
pub const ROUTE_OPENAPI: &str = "OpenApi";
/// `route` of `POST /mcp`.
pub const ROUTE_MCP: &str = "Mcp";
/// `route` past [`MAX_ROUTES`].
const ROUTE_OTHER: &str = "other";

// ---------------------------------------------------------------------------------------------
// State

#[derive(Debug, Default, Clone)]
struct RouteStats {
    statuses: BTreeMap<u16, u64>,
    /// Non-cumulative counts per bucket of [`BUCKETS`]; the last one is `+Inf`.
    buckets: [u64; BUCKETS.len() + 1],
    count: u64,
    sum: f64,
}

/// All the numbers; the process has one ([`REGISTRY`]), tests make their own.
struct Registry {
    routes: Mutex<BTreeMap<String, RouteStats>>,
    usage_accepted: AtomicU64,
    usage_duplicate: AtomicU64,
    usage_refused: AtomicU64,
    budget_warning: AtomicU64,
    budget_exceeded: AtomicU64,
    store_conflicts: AtomicU64,
    hosts_known: AtomicBool,
    hosts_live: AtomicU64,
    hosts_stale: AtomicU64,
}

static REGISTRY: Registry = Registry::new();

/// The `route` label of a route of the table: its id's name (`CreateVm`).
pub fn route_label(id: RouteId) -> &'static str {
    static LABELS: OnceLock<Vec<(RouteId, String)>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| {
        ROUTES
            .iter()
            .map(|r| (r.id, format!("{:?}", r.id)))
            .collect()
    });
    labels
        .iter()
        .find(|(i, _)| *i == id)
        .map_or(ROUTE_OTHER, |(_, l)| l.as_str())
}

impl Registry {
    const fn new() -> Self {
        Registry {
            routes: Mutex::new(BTreeMap::new()),
            usage_accepted: AtomicU64::new(0),
            usage_duplicate: AtomicU64::new(0),
            usage_refused: AtomicU64::new(0),
            budget_warning: AtomicU64::new(0),
            budget_exceeded: AtomicU64::new(0),
            store_conflicts: AtomicU64::new(0),
            hosts_known: AtomicBool::new(false),
            hosts_live: AtomicU64::new(0),
            hosts_stale: AtomicU64::new(0),
        }
    }

    /// The per-route series, with every route of the table (and the router's own labels)
    /// present from the first use.
    fn routes(&self) -> MutexGuard<'_, BTreeMap<String, RouteStats>> {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if routes.is_empty() {
            let table = ROUTES.iter().map(|r| route_label(r.id));
            for r in table.chain([ROUTE_OPENAPI, ROUTE_MCP, ROUTE_UNMATCHED]) {
                routes.insert(r.to_string(), RouteStats::default());
            }
        }
        routes
    }

    fn api_request(&self, route: &str, status: u16, seconds: f64) {
        let seconds = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        let bucket = BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(BUCKETS.len());
        let mut routes = self.routes();
        let key = if routes.contains_key(route) || routes.len() < MAX_ROUTES {
            route
        } else {
            ROUTE_OTHER
        };
        if !routes.contains_key(key) {
            routes.insert(key.to_string(), RouteStats::default());
        }
        if let Some(s) = routes.get_mut(key) {
            *s.statuses.entry(status).or_insert(0) += 1;
            s.buckets[bucket] += 1;
            s.count += 1;
            s.sum += seconds;
        }
    }

    fn usage_ingested(&self, accepted: u64, duplicates: u64, refused: u64) {
        self.usage_accepted.fetch_add(accepted, Ordering::Relaxed);
        self.usage_duplicate
            .fetch_add(duplicates, Ordering::Relaxed);
        self.usage_refused.fetch_add(refused, Ordering::Relaxed);
    }

    fn set_budget_clouds(&self, warning: u64, exceeded: u64) {
        self.budget_warning.store(warning, Ordering::Relaxed);
        self.budget_exceeded.store(exceeded, Ordering::Relaxed);
    }

    fn set_hosts(&self, live: u64, stale: u64) {
        self.hosts_live.store(live, Ordering::Relaxed);
        self.hosts_stale.store(stale, Ordering::Relaxed);
        self.hosts_known.store(true, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(64 * 1024);
        family(
            &mut out,
            "atoll_build_info",
            "gauge",
            "The control plane's build; the value is always 1.",
        );
        sample(
            &mut out,
            "atoll_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            "1",
        );

        // Copied out under the lock, formatted outside it.
        let routes: Vec<(String, RouteStats)> = self
            .routes()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        family(
            &mut out,
            "atoll_api_requests_total",
            "counter",
            "API requests answered, by route (the route table's id) and HTTP status code.",
        );
        for (route, s) in &routes {
            for (status, n) in &s.statuses {
                sample(
                    &mut out,
                    "atoll_api_requests_total",
                    &[("route", route), ("status", &status.to_string())],
                    &n.to_string(),
                );
            }
        }
        family(
            &mut out,
            "atoll_api_request_seconds",
            "histogram",
            "Time from receiving an API request to answering it (the response's head), by route.",
        );
        for (route, s) in &routes {
            let mut cumulative = 0u64;
            for (i, n) in s.buckets.iter().enumerate() {
                cumulative += n;
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                sample(
                    &mut out,
                    "atoll_api_request_seconds_bucket",
                    &[("route", route), ("le", &le)],
                    &cumulative.to_string(),
                );
            }
            sample(
                &mut out,
                "atoll_api_request_seconds_sum",
                &[("route", route)],
                &s.sum.to_string(),
            );
            sample(
                &mut out,
                "atoll_api_request_seconds_count",
                &[("route", route)],
                &s.count.to_string(),
            );
        }

        family(
            &mut out,
            "atoll_usage_records_total",
            "counter",
            "Usage records hosts delivered, by result: accepted (kept), duplicate (kept before), refused.",
        );
        for (result, n) in [
            ("accepted", &self.usage_accepted),
            ("duplicate", &self.usage_duplicate),
            ("refused", &self.usage_refused),
        ] {
            sample(
                &mut out,
                "atoll_usage_records_total",
                &[("result", result)],
                &n.load(Ordering::Relaxed).to_string(),
            );
        }
        family(
            &mut out,
            "atoll_budget_clouds",
            "gauge",
            "Clouds past their budget's warning threshold (warning) or past the budget (exceeded).",
        );
        for (state, n) in [
            ("warning", &self.budget_warning),
            ("exceeded", &self.budget_exceeded),
        ] {
            sample(
                &mut out,
                "atoll_budget_clouds",
                &[("state", state)],
                &n.load(Ordering::Relaxed).to_string(),
            );
        }
        family(
            &mut out,
            "atoll_store_txn_conflicts_total",
            "counter",
            "Optimistic store transactions that lost their compare to a concurrent write and were retried.",
        );
        sample(
            &mut out,
            "atoll_store_txn_conflicts_total",
            &[],
            &self.store_conflicts.load(Ordering::Relaxed).to_string(),
        );
        family(
            &mut out,
            "atoll_hosts",
            "gauge",
            "Registered hosts, by state: live (heard from within hosts.timeout_secs) or stale.",
        );
        if self.hosts_known.load(Ordering::Relaxed) {
            for (state, n) in [("live", &self.hosts_live), ("stale", &self.hosts_stale)] {
                sample(
                    &mut out,
                    "atoll_hosts",
                    &[("state", state)],
                    &n.load(Ordering::Relaxed).to_string(),
                );
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Recording (the process's numbers)

/// Counts one API request on `route` (a [`route_label`], or [`ROUTE_OPENAPI`], [`ROUTE_MCP`],
/// [`ROUTE_UNMATCHED`]) answered with `status` after `seconds`. A negative or non-finite
/// duration counts as 0.
pub fn api_request(route: &str, status: u16, seconds: f64) {
    REGISTRY.api_request(route, status, seconds);
}

/// Counts usage records a host delivered (`POST /v1/hosts/{host}/usage`): `accepted` kept,
/// `duplicates` already kept before (same id), `refused` rejected (invalid, or for a cloud or
/// endpoint the control plane does not know).
pub fn usage_ingested(accepted: u64, duplicates: u64, refused: u64) {
    REGISTRY.usage_ingested(accepted, duplicates, refused);
}

/// Sets how many clouds are past their budget's warning threshold (`warning`, not yet
/// exceeded) and past the budget itself (`exceeded`), as of the latest evaluation.
pub fn set_budget_clouds(warning: u64, exceeded: u64) {
    REGISTRY.set_budget_clouds(warning, exceeded);
}

/// Counts one optimistic transaction that lost its compare and is retried (or given up).
pub fn store_conflict() {
    REGISTRY.store_conflicts.fetch_add(1, Ordering::Relaxed);
}

/// Sets the registered hosts by liveness (`hosts.timeout_secs`).
pub fn set_hosts(live: u64, stale: u64) {
    REGISTRY.set_hosts(live, stale);
}

/// Forgets the hosts (they could not be read): `atoll_hosts` has no samples until the next
/// [`set_hosts`].
pub fn clear_hosts() {
    REGISTRY.hosts_known.store(false, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// The process's exposition, Prometheus text format 0.0.4. Every family has its `HELP` and
/// `TYPE`, whether or not it has samples yet.
pub fn render() -> String {
    REGISTRY.render()
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let mut escaped = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    let _ = writeln!(out, "# HELP {name} {escaped}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            atoll_api::metrics_text::escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

// ---------------------------------------------------------------------------------------------
// Serving

/// Counts the registered hosts by liveness into [`set_hosts`] (or [`clear_hosts`] if they
/// cannot be read in time).
async fn refresh_hosts(core: &Core) {
    let read = core.execute(Principal::Operator, Command::ListHosts);
    match tokio::time::timeout(HOSTS_READ_TIMEOUT, read).await {
        Ok(Ok(atoll_api::Reply::Hosts(hosts))) => {
            let live = hosts.iter().filter(|h| h.live).count() as u64;
            set_hosts(live, hosts.len() as u64 - live);
        }
        Ok(Ok(other)) => {
            tracing::warn!("metrics: listing hosts answered {other:?}");
            clear_hosts();
        }
        Ok(Err(e)) => {
            tracing::warn!("metrics: listing hosts: {e}");
            clear_hosts();
        }
        Err(_) => {
            tracing::warn!(
                "metrics: listing hosts took longer than {} s",
                HOSTS_READ_TIMEOUT.as_secs()
            );
            clear_hosts();
        }
    }
}

/// The metrics listener's router: `GET /metrics` (and `HEAD`), the hosts counted from `core`
/// at each scrape when there is one.
pub fn router(core: Option<Arc<Core>>) -> Router {
    let handler = move || {
        let core = core.clone();
        async move {
            if let Some(core) = &core {
                refresh_hosts(core).await;
            }
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], render()).into_response()
        }
    };
    Router::new()
        .route(PATH, get(handler))
        .fallback(|| async { plain(StatusCode::NOT_FOUND, "not found; try GET /metrics\n") })
        .method_not_allowed_fallback(|| async {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed; use GET\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            r
        })
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Serves `GET /metrics` on `listener` (plain HTTP, the API server's default timeouts, at
/// most [`MAX_CONNECTIONS`] connections) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    core: Option<Arc<Core>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = crate::api::Limits {
        max_connections: MAX_CONNECTIONS,
        ..crate::api::Limits::default()
    };
    crate::api::serve_router(router(core), listener, limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels exactly as rendered).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    // Each test has a registry of its own (tests run in parallel, and the process's numbers
    // are the router's and the core's), except the listener's, which uses a route name of
    // its own on the process's.

    #[test]
    fn families_have_help_and_type_once() {
        let s = Registry::new().render();
        for (family, ty) in [
            ("atoll_build_info", "gauge"),
            ("atoll_api_requests_total", "counter"),
            ("atoll_api_request_seconds", "histogram"),
            ("atoll_usage_records_total", "counter"),
            ("atoll_budget_clouds", "gauge"),
            ("atoll_store_txn_conflicts_total", "counter"),
            ("atoll_hosts", "gauge"),
        ] {
            assert_eq!(
                s.matches(&format!("# TYPE {family} {ty}\n")).count(),
                1,
                "{family}: {s}"
            );
            assert_eq!(s.matches(&format!("# HELP {family} ")).count(), 1);
        }
        assert_eq!(s.matches("# TYPE ").count(), 7);
        assert!(s.contains(&format!(
            "\natoll_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        // Every sample belongs to the family declared last before it.
        let mut current = "";
        for l in s.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                current = t.split(' ').next().unwrap();
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(
                    name == current
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(current)),
                    "{name} under {current}"
                );
            }
        }
        // The process's exposition has the same families.
        let process = render();
        for l in s.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(process.contains(&format!("{l}\n")), "{l}");
        }
    }

    #[test]
    fn every_route_of_the_table_has_a_histogram() {
        let s = Registry::new().render();
        for r in ROUTES {
            let label = route_label(r.id);
            assert_eq!(label, format!("{:?}", r.id));
            assert!(
                s.contains(&format!(
                    "\natoll_api_request_seconds_bucket{{route=\"{label}\",le=\"+Inf\"}} 0\n"
                )),
                "{label}"
            );
        }
        for r in [ROUTE_OPENAPI, ROUTE_MCP, ROUTE_UNMATCHED] {
            assert!(s.contains(&format!(
                "\natoll_api_request_seconds_count{{route=\"{r}\"}} 0\n"
            )));
        }
        assert_eq!(route_label(RouteId::CreateVm), "CreateVm");
        // No request yet: no request series.
        assert!(!s.contains("\natoll_api_requests_total{"), "{s}");
    }

    #[test]
    fn requests_and_histogram() {
        let reg = Registry::new();
        let route = "CreateVm";
        reg.api_request(route, 201, 0.003);
        reg.api_request(route, 201, 0.2);
        reg.api_request(route, 500, 100.0);
        reg.api_request(route, 404, f64::NAN);
        reg.api_request(route, 404, -1.0);
        let s = reg.render();
        let v = |series: &str| value(&s, series).unwrap_or_else(|| panic!("{series}: {s}"));
        for (status, n) in [(201, 2.0), (500, 1.0), (404, 2.0)] {
            assert_eq!(
                v(&format!(
                    "atoll_api_requests_total{{route=\"{route}\",status=\"{status}\"}}"
                )),
                n
            );
        }
        let bucket = |le: &str| {
            v(&format!(
                "atoll_api_request_seconds_bucket{{route=\"{route}\",le=\"{le}\"}}"
            ))
        };
        assert_eq!(bucket("0.001"), 2.0, "NaN and negative count as 0");
        assert_eq!(bucket("0.0025"), 2.0);
        assert_eq!(bucket("0.005"), 3.0);
        assert_eq!(bucket("0.25"), 4.0);
        assert_eq!(bucket("60"), 4.0);
        assert_eq!(bucket("+Inf"), 5.0);
        assert_eq!(
            v(&format!(
                "atoll_api_request_seconds_count{{route=\"{route}\"}}"
            )),
            5.0
        );
        let sum = v(&format!(
            "atoll_api_request_seconds_sum{{route=\"{route}\"}}"
        ));
        assert!((sum - 100.203).abs() < 1e-9, "{sum}");
        // Buckets are in order, one per bound.
        let les: Vec<String> = s
            .lines()
            .filter_map(|l| {
                l.strip_prefix(&format!(
                    "atoll_api_request_seconds_bucket{{route=\"{route}\",le=\""
                ))
            })
            .map(|l| l.split('"').next().unwrap().to_string())
            .collect();
        let mut want: Vec<String> = BUCKETS.iter().map(|b| b.to_string()).collect();
        want.push("+Inf".into());
        assert_eq!(les, want);
        // Another route is untouched.
        assert_eq!(
            v("atoll_api_request_seconds_bucket{route=\"GetVm\",le=\"+Inf\"}"),
            0.0
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let reg = Registry::new();
        reg.api_request("we\"ird\\na\nme", 200, 0.0);
        let s = reg.render();
        assert!(
            s.contains(r#"atoll_api_requests_total{route="we\"ird\\na\nme",status="200"} 1"#),
            "{s}"
        );
        assert!(
            !s.lines().any(|l| l.starts_with("me\"")),
            "a raw newline leaked"
        );
    }

    #[test]
    fn scalars() {
        let reg = Registry::new();
        let s = reg.render();
        for series in [
            "atoll_usage_records_total{result=\"accepted\"}",
            "atoll_usage_records_total{result=\"duplicate\"}",
            "atoll_usage_records_total{result=\"refused\"}",
            "atoll_store_txn_conflicts_total",
            "atoll_budget_clouds{state=\"warning\"}",
            "atoll_budget_clouds{state=\"exceeded\"}",
        ] {
            assert_eq!(value(&s, series), Some(0.0), "{series}: {s}");
        }
        assert!(s.contains("# TYPE atoll_hosts gauge\n"));
        assert!(!s.contains("\natoll_hosts{"), "unknown until set: {s}");
        reg.usage_ingested(3, 2, 1);
        reg.usage_ingested(1, 0, 0);
        reg.store_conflicts.fetch_add(2, Ordering::Relaxed);
        reg.set_budget_clouds(4, 1);
        reg.set_hosts(3, 1);
        let s = reg.render();
        for (series, want) in [
            ("atoll_usage_records_total{result=\"accepted\"}", 4.0),
            ("atoll_usage_records_total{result=\"duplicate\"}", 2.0),
            ("atoll_usage_records_total{result=\"refused\"}", 1.0),
            ("atoll_store_txn_conflicts_total", 2.0),
            ("atoll_budget_clouds{state=\"warning\"}", 4.0),
            ("atoll_budget_clouds{state=\"exceeded\"}", 1.0),
            ("atoll_hosts{state=\"live\"}", 3.0),
            ("atoll_hosts{state=\"stale\"}", 1.0),
        ] {
            assert_eq!(value(&s, series), Some(want), "{series}: {s}");
        }
        reg.set_budget_clouds(0, 2);
        reg.hosts_known.store(false, Ordering::Relaxed);
        let s = reg.render();
        assert_eq!(
            value(&s, "atoll_budget_clouds{state=\"warning\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "atoll_budget_clouds{state=\"exceeded\"}"),
            Some(2.0)
        );
        assert!(!s.contains("\natoll_hosts{"), "{s}");
    }

    #[test]
    fn route_labels_are_bounded() {
        let reg = Registry::new();
        for i in 0..MAX_ROUTES + 10 {
            reg.api_request(&format!("Bounded{i}"), 200, 0.0);
        }
        reg.api_request("CreateVm", 201, 0.0);
        let s = reg.render();
        let routes: std::collections::BTreeSet<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix("atoll_api_request_seconds_count{route=\""))
            .map(|l| l.split('"').next().unwrap())
            .collect();
        assert_eq!(
            routes.len(),
            MAX_ROUTES + 1,
            "the table's routes, others, `other`"
        );
        assert!(routes.contains(ROUTE_OTHER));
        assert_eq!(
            value(
                &s,
                "atoll_api_requests_total{route=\"CreateVm\",status=\"201\"}"
            ),
            Some(1.0),
            "known routes are still counted as themselves"
        );
    }

    async fn get_raw(addr: SocketAddr, raw: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the whole response within 5 s")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn listener_serves_metrics_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, None, async {
            let _ = stopped.await;
        }));
        let req = |method: &str, path: &str| {
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        };
        api_request("TestListener", 204, 0.01);
        let r = get_raw(addr, &req("GET", "/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            r.contains(&format!("content-type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(r.contains("\r\n\r\n# HELP atoll_build_info "), "{r}");
        assert!(
            r.contains("\natoll_api_requests_total{route=\"TestListener\",status=\"204\"} 1\n"),
            "{r}"
        );
        let r = get_raw(addr, &req("HEAD", "/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
        for path in ["/", "/metrics/", "/v1/clouds", "/openapi.json"] {
            let r = get_raw(addr, &req("GET", path)).await;
            assert!(r.starts_with("HTTP/1.1 404 "), "{path}: {r}");
        }
        let r = get_raw(addr, &req("POST", "/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        assert!(r.contains("allow: GET, HEAD\r\n"), "{r}");
        let r = get_raw(addr, "\x00garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        // Still serving after all that; then stops when told.
        let r = get_raw(addr, &req("GET", "/metrics?x=1")).await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops on shutdown")
            .unwrap()
            .unwrap();
    }

    /// The API router counts every request once by route id and status, and the metrics
    /// listener with a core counts its hosts. The process's numbers are shared with other
    /// tests of this crate, so increases are compared, at least what this test caused.
    #[tokio::test]
    async fn the_router_counts_requests_and_the_listener_counts_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::config::ControlConfig {
            operator_token_file: dir.path().join("operator.token"),
            store: crate::config::StoreConfig {
                path: dir.path().join("control.db"),
                ..Default::default()
            },
            ..Default::default()
        };
        let core = cfg.start().await.expect("start control plane");
        let token = cfg.operator_token().unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = api.local_addr().unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_m, stopped_m) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(crate::api::serve(core.clone(), api, async {
            let _ = stopped.await;
        }));
        tokio::spawn(serve(metrics, Some(core), async {
            let _ = stopped_m.await;
        }));
        let scrape = || async {
            let r = get_raw(
                metrics_addr,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
            r.split_once("\r\n\r\n").unwrap().1.to_string()
        };
        let count = |s: &str, route: &str, status: u16| {
            value(
                s,
                &format!("atoll_api_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
            )
            .unwrap_or(0.0)
        };
        let before = scrape().await;
        let send = |method: &str, path: &str, auth: bool| {
            let auth = if auth {
                format!("Authorization: Bearer {token}\r\n")
            } else {
                String::new()
            };
            let raw = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            async move { get_raw(api_addr, &raw).await }
        };
        let cases = [
            ("GET", "/v1/clouds", false, "ListClouds", 401),
            ("GET", "/v1/clouds", true, "ListClouds", 200),
            ("PUT", "/v1/hosts/metrics-host", true, "RegisterHost", 200),
            ("GET", "/openapi.json", false, ROUTE_OPENAPI, 200),
            ("GET", "/mcp", false, ROUTE_UNMATCHED, 405),
            ("GET", "/v1/no-such-thing", true, ROUTE_UNMATCHED, 404),
        ];
        for (method, path, auth, _, status) in cases {
            let r = send(method, path, auth).await;
            assert!(
                r.starts_with(&format!("HTTP/1.1 {status} ")),
                "{method} {path}: {r}"
            );
        }
        let after = scrape().await;
        for (method, path, _, route, status) in cases {
            let same = cases
                .iter()
                .filter(|c| c.3 == route && c.4 == status)
                .count() as f64;
            assert!(
                count(&after, route, status) - count(&before, route, status) >= same,
                "{method} {path}: {route} {status}\n{after}"
            );
        }
        let seconds = |s: &str| {
            value(s, "atoll_api_request_seconds_count{route=\"ListClouds\"}").unwrap_or(0.0)
        };
        assert!(seconds(&after) - seconds(&before) >= 2.0, "{after}");
        // The host registered above, live since it just registered.
        assert!(
            value(&after, "atoll_hosts{state=\"live\"}").unwrap_or(0.0) >= 1.0,
            "{after}"
        );
        assert!(
            value(&after, "atoll_hosts{state=\"stale\"}").is_some(),
            "{after}"
        );
        let _ = stop.send(());
        let _ = stop_m.send(());
    }
}
