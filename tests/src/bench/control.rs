//! Control plane benchmarks (issue 4), on the embedded SQLite store in a temporary directory:
//!
//! 1. **Cloud creates over HTTP**: `POST /v1/clouds` from 16 concurrent keep-alive clients
//!    against the API served in this process; p50/p99 of each request and clouds per second.
//!    A create is acknowledged only once its transaction is committed (WAL, crash-safe).
//! 2. **To a live dataplane**: a cloud, then a VM in it, through the API; the time until the
//!    host's converger has created the VM's endpoint (tap, maps) and reported it ready, seen
//!    through a store watch on the status key (an event, no polling). Sequential, with the
//!    converger running as it does in the agent (tap pool refilled between changes).
//! 3. **Memory per cloud**: resident memory of this process before and after creating N
//!    clouds through the core (64 concurrent), divided by N; and the database size per cloud.

use super::fleet::pct;
use atoll_api::Command;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use atoll_agent::{
    config::DataplaneConfig,
    converge::{ConvergeConfig, Converger, Source},
    endpoint::Host,
};
use atoll_control::{
    api,
    client::Client,
    config::{ControlConfig, StoreConfig},
    core::{Core, Principal, Reply},
    model::{CreateCloud, CreatedCloud, Vm},
};
use atoll_testbed::{unique_prefix, LinksWithPrefix, PinRoot};
use serde_json::{json, Value};

pub struct ControlBench {
    pub creates: usize,
    pub create_p50: Duration,
    pub create_p99: Duration,
    pub clouds_per_sec: f64,
    pub live: usize,
    pub live_p50: Duration,
    pub live_p99: Duration,
    pub vm_live_p50: Duration,
    pub vm_live_p99: Duration,
    pub memory_clouds: usize,
    pub rss_per_cloud: f64,
    pub db_per_cloud: f64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// An embedded control plane on SQLite in `dir`, its API on loopback: (core, URL, operator
/// token). Shared with the VM benchmark.
pub async fn start(dir: &std::path::Path) -> Result<(Arc<Core>, String, String)> {
    let cfg = ControlConfig {
        operator_token_file: dir.join("operator.token"),
        store: StoreConfig {
            path: dir.join("control.db"),
            ..StoreConfig::default()
        },
        ..ControlConfig::default()
    };
    let core = cfg.start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api::serve(core.clone(), listener, std::future::pending()));
    Ok((core, url, cfg.operator_token()?))
}

pub fn run(smoke: bool) -> Result<ControlBench> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(smoke))
}

async fn run_async(smoke: bool) -> Result<ControlBench> {
    let (creates, live_n, memory_n) = if smoke {
        (400, 10, 2_000)
    } else {
        (20_000, 300, 1_000_000)
    };
    let dir = tempfile::tempdir()?;
    let (core, url, op_token) = start(dir.path()).await?;
    let op = Client::new(&url, &op_token)?;

    // 1. Cloud creates over HTTP, 16 concurrent clients.
    let (mut lat, clouds_per_sec) = create_clouds(&op, creates).await?;
    let create_p50 = pct(&mut lat, 0.5);
    let create_p99 = pct(&mut lat, 0.99);

    // 2. Cloud + VM to a live endpoint on this host.
    let pins = PinRoot::new("bc");
    let prefix = unique_prefix("c");
    let _links = LinksWithPrefix(prefix.clone());
    let mut host = Host::open(&DataplaneConfig {
        bpffs_root: pins.path().into(),
        tap_pool: 16,
        ..DataplaneConfig::default()
    })?;
    host.refill_pool().await?;
    let source = Source::new(atoll_control::core::Embedded(core.clone()));
    source.register("bench").await?;
    let mut conv = Converger::new(
        ConvergeConfig {
            host: "bench".into(),
            tap_prefix: prefix.clone(),
            volumes_dir: dir.path().join("volumes"),
        },
        source,
        None,
    );
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let mut refill = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = &mut stop_rx => break,
                d = conv.next_delta(Duration::from_secs(30)) => {
                    let d = d?;
                    conv.apply(&mut host, d).await?;
                }
                _ = refill.tick() => { host.refill_some(Duration::from_millis(5)).await?; }
            }
        }
        host.destroy().await?;
        anyhow::Ok(())
    });
    let mut live = Vec::new();
    let mut vm_live = Vec::new();
    let rev = core.store().revision().await?;
    let mut watch = core.store().watch("c/", rev).await?;
    for _ in 0..live_n {
        let t = Instant::now();
        let c: CreatedCloud = op
            .run(&Command::CreateCloud {
                spec: serde_json::from_value(json!({})).unwrap(),
            })
            .await?;
        let cc = Client::new(&url, &c.token)?;
        let tv = Instant::now();
        let _: Vm = cc
            .run(&Command::CreateVm {
                cloud: c.cloud.id,
                spec: serde_json::from_value(json!({"name": "vm"})).unwrap(),
            })
            .await?;
        let status_key = format!("c/{}/vmstatus/vm", c.cloud.id);
        'wait: loop {
            let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .context("VM not live within 10 s")??;
            for ev in batch.events {
                if ev.kv.key == status_key {
                    let v: Value = serde_json::from_slice(&ev.kv.value)?;
                    anyhow::ensure!(v["state"] == "network_ready", "VM failed: {v}");
                    break 'wait;
                }
            }
        }
        live.push(t.elapsed());
        vm_live.push(tv.elapsed());
    }
    let _ = stop_tx.send(());
    agent.await??;
    let live_p50 = pct(&mut live, 0.5);
    let live_p99 = pct(&mut live, 0.99);
    let vm_live_p50 = pct(&mut vm_live, 0.5);
    let vm_live_p99 = pct(&mut vm_live, 0.99);

    // 3. Memory per cloud, through the core.
    let rss0 = rss_bytes();
    let db = dir.path().join("control.db");
    let size = |p: &std::path::Path| {
        ["", "-wal"]
            .iter()
            .map(|s| {
                std::fs::metadata(format!("{}{s}", p.display()))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .sum::<u64>()
    };
    let db0 = size(&db);
    let mut tasks = Vec::new();
    for w in 0..64 {
        let core = core.clone();
        let n = memory_n / 64 + usize::from(w < memory_n % 64);
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                match core
                    .execute(
                        Principal::Operator,
                        Command::CreateCloud {
                            spec: CreateCloud::default(),
                        },
                    )
                    .await?
                {
                    Reply::CreatedCloud(_) => {}
                    other => anyhow::bail!("unexpected reply {other:?}"),
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rss1 = rss_bytes();
    let db1 = size(&db);
    Ok(ControlBench {
        creates,
        create_p50,
        create_p99,
        clouds_per_sec,
        live: live_n,
        live_p50,
        live_p99,
        vm_live_p50,
        vm_live_p99,
        memory_clouds: memory_n,
        rss_per_cloud: rss1.saturating_sub(rss0) as f64 / memory_n as f64,
        db_per_cloud: db1.saturating_sub(db0) as f64 / memory_n as f64,
    })
}

/// The route table's cost, measured in one run: the same cloud creates (16 concurrent
/// keep-alive clients, the typed client) against the API's router (`api::router`: one generic
/// handler per route of the table, access check, body read, `routes::parse`, `Reply::to_json`)
/// and against a hand-written handler for `POST /v1/clouds` alone (bearer token, `Json`
/// extractor, the same `Core::execute`), as the API was written before the table. Both are
/// served by `axum::serve` on loopback from the same core and store, in interleaved rounds, so
/// the store's growth and the machine's drift fall on both alike.
#[derive(Debug)]
pub struct RouterAb {
    pub rounds: usize,
    pub per_round: usize,
    /// Median over the rounds of each round's p50 create latency: (table, hand-written).
    pub p50: (Duration, Duration),
    /// Median over the rounds of each round's creates per second: (table, hand-written).
    pub rate: (f64, f64),
}

async fn direct_create(
    axum::extract::State(core): axum::extract::State<Arc<Core>>,
    headers: axum::http::HeaderMap,
    axum::Json(spec): axum::Json<CreateCloud>,
) -> axum::response::Response {
    use axum::{http::StatusCode, response::IntoResponse};
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    match core.authenticate(token.trim()).await {
        Ok(Principal::Operator) => {}
        Ok(_) => return StatusCode::FORBIDDEN.into_response(),
        Err(_) => return StatusCode::UNAUTHORIZED.into_response(),
    }
    match core
        .execute(Principal::Operator, Command::CreateCloud { spec })
        .await
    {
        Ok(Reply::CreatedCloud(c)) => (StatusCode::CREATED, axum::Json(c)).into_response(),
        Ok(_) | Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `n` cloud creates over HTTP from 16 concurrent keep-alive clients: each create's latency
/// and the creates per second.
async fn create_clouds(op: &Client, n: usize) -> Result<(Vec<Duration>, f64)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let op = op.clone();
        let k = n / 16 + usize::from(w < n % 16);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(k);
            for _ in 0..k {
                let t = Instant::now();
                let _: CreatedCloud = op
                    .run(&Command::CreateCloud {
                        spec: CreateCloud::default(),
                    })
                    .await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    Ok((lat, rate))
}

/// One round of the A/B: (p50, creates per second).
async fn create_round(op: &Client, n: usize) -> Result<(Duration, f64)> {
    let (mut lat, rate) = create_clouds(op, n).await?;
    Ok((pct(&mut lat, 0.5), rate))
}

pub fn router_ab(smoke: bool) -> Result<RouterAb> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (rounds, per_round) = if smoke { (2, 100) } else { (7, 5_000) };
        let dir = tempfile::tempdir()?;
        let cfg = ControlConfig {
            operator_token_file: dir.path().join("operator.token"),
            store: StoreConfig {
                path: dir.path().join("control.db"),
                ..StoreConfig::default()
            },
            ..ControlConfig::default()
        };
        let core = cfg.start().await?;
        let token = cfg.operator_token()?;
        let serve = |router: axum::Router| async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            tokio::spawn(async move { axum::serve(listener, router).await });
            anyhow::Ok(url)
        };
        let table = serve(api::router(core.clone(), Duration::from_secs(30))).await?;
        let direct = serve(
            axum::Router::new()
                .route(
                    atoll_api::routes::CREATE_CLOUD.path,
                    axum::routing::post(direct_create),
                )
                .with_state(core.clone()),
        )
        .await?;
        let (table, direct) = (Client::new(&table, &token)?, Client::new(&direct, &token)?);
        // Warm-up of both (connections, the store's first pages).
        create_round(&table, per_round / 5).await?;
        create_round(&direct, per_round / 5).await?;
        let (mut t, mut d) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate which goes first, so neither always meets the fresher store.
            if round % 2 == 0 {
                t.push(create_round(&table, per_round).await?);
                d.push(create_round(&direct, per_round).await?);
            } else {
                d.push(create_round(&direct, per_round).await?);
                t.push(create_round(&table, per_round).await?);
            }
        }
        let median_p50 = |v: &[(Duration, f64)]| {
            let mut x: Vec<Duration> = v.iter().map(|r| r.0).collect();
            pct(&mut x, 0.5)
        };
        let median_rate = |v: &[(Duration, f64)]| {
            let mut x: Vec<f64> = v.iter().map(|r| r.1).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        Ok(RouterAb {
            rounds,
            per_round,
            p50: (median_p50(&t), median_p50(&d)),
            rate: (median_rate(&t), median_rate(&d)),
        })
    })
}
