//! Spend benchmarks (issue 20), on the embedded SQLite store in a temporary directory:
//!
//! 1. **Ingest**: hosts deliver usage records (`POST /v1/hosts/{host}/usage`, batches of 256,
//!    four hosts at once, each with its own clouds, a network and a compute record per VM and
//!    interval) over HTTP; records per second, kept once each and rolled up per cloud and
//!    hour in the same transactions. Then the same batches again (a redelivery: every record a
//!    duplicate). Baseline, in the same run: what an operator ran before, `atoll usage` pricing
//!    the same records from a JSON-lines file (`control::usage::report`, in process).
//! 2. **Queries at 100k clouds**: 100,000 clouds' rollups for one hour, plus a month of hours
//!    for the clouds asked, are written straight to the store (as ingest would have left them;
//!    placing 100k clouds' VMs is not what is measured); then a cloud's usage for a month
//!    (p50/p99), every cloud's for the hour (`GET /v1/usage`) and its FOCUS export.

use super::fleet::pct;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use atoll_api::{
    model::{HostToken, UsageBatch, MAX_USAGE_BATCH},
    usage::{Counters, Resource, Traffic, UsageData, UsageEvent, EVENT_TYPE},
    Command,
};
use atoll_control::{
    api,
    client::Client,
    config::{ControlConfig, StoreConfig},
    core::{Core, Principal, Reply},
    model::{CloudId, CreatedCloud},
    store::{Op, Txn},
    usage::Quantities,
};
use serde_json::json;

pub struct SpendBench {
    pub records: usize,
    pub hosts: usize,
    pub ingest_per_sec: f64,
    pub redeliver_per_sec: f64,
    pub offline_per_sec: f64,
    pub clouds: usize,
    pub cloud_month_p50: Duration,
    pub cloud_month_p99: Duration,
    pub fleet_hour: Duration,
    pub focus_hour: Duration,
    pub focus_bytes: usize,
}

pub fn run(smoke: bool) -> Result<SpendBench> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(smoke))
}

/// A network record (all six class pairs, as agents write them) or a compute record.
fn record(cloud: u32, host: usize, vm: usize, seq: u64, end_ms: u64, compute: bool) -> UsageEvent {
    let inc = format!("bench{host}-{}{vm}", if compute { "vmm" } else { "" });
    let mut usage = Counters::default();
    let mut resource = None;
    if compute {
        usage.vcpu_ms = 2_000;
        usage.memory_mib_ms = 256_000;
        resource = Some(Resource::Vm {
            name: format!("vm{vm}"),
            vcpus: 2,
            memory_mib: 256,
        });
    } else {
        for d in ["from_guest", "to_guest"] {
            for k in ["intra_cloud", "exposure", "host", "external", "cross_host"] {
                usage.traffic.push(Traffic {
                    direction: d.into(),
                    class: k.into(),
                    packets: seq % 7,
                    bytes: seq * 1500 % 100_000,
                });
            }
        }
    }
    UsageEvent {
        specversion: "1.0".into(),
        id: format!("{inc}-{seq}"),
        source: format!("atoll/agent/bench-{host}"),
        ty: EVENT_TYPE.into(),
        subject: format!("{cloud}/x"),
        time: String::new(),
        datacontenttype: "application/json".into(),
        data: UsageData {
            cloud,
            endpoint: if compute {
                String::new()
            } else {
                format!("atv{vm}")
            },
            incarnation: inc,
            seq,
            start_unix_ms: end_ms - 1000,
            end_unix_ms: end_ms,
            is_final: false,
            usage: usage.clone(),
            cumulative: usage,
            resource,
        },
    }
}

async fn run_async(smoke: bool) -> Result<SpendBench> {
    let (hosts, clouds_per_host, ticks, query_clouds) = if smoke {
        (2, 4, 40, 2_000)
    } else {
        (4, 64, 400, 100_000)
    };
    let dir = tempfile::tempdir()?;
    let cfg = ControlConfig {
        operator_token_file: dir.path().join("operator.token"),
        store: StoreConfig {
            path: dir.path().join("control.db"),
            ..StoreConfig::default()
        },
        prices: atoll_control::usage::Prices {
            vcpu_hour: 0.04,
            memory_gib_hour: 0.005,
            from_guest: atoll_control::usage::ClassPrices {
                external: 0.09,
                ..Default::default()
            },
            ..Default::default()
        },
        ..ControlConfig::default()
    };
    let core = cfg.start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(api::serve(core.clone(), listener, std::future::pending()));
    let op = Client::new(&url, &cfg.operator_token()?)?;

    // Each host runs a VM of each of its clouds (placed while it is the only live host).
    let mut streams = Vec::new();
    for h in 0..hosts {
        let name = format!("bench-{h}");
        let t: HostToken = op
            .run(&Command::IssueHostToken { host: name.clone() })
            .await?;
        let hc = Client::new(&url, &t.token)?;
        hc.run::<atoll_api::model::HostInfo>(&Command::RegisterHost { host: name.clone() })
            .await?;
        let mut clouds = Vec::new();
        for c in 0..clouds_per_host {
            let created: CreatedCloud = op
                .run(&Command::CreateCloud {
                    spec: serde_json::from_value(json!({"name": format!("h{h}c{c}")}))?,
                })
                .await?;
            op.run::<atoll_api::model::Vm>(&Command::CreateVm {
                cloud: created.cloud.id,
                spec: serde_json::from_value(json!({"name": "vm", "start": false}))?,
            })
            .await?;
            clouds.push(created.cloud.id.get());
        }
        // Cordoned once placed: the next host's clouds go to the next host.
        op.run::<atoll_api::model::HostInfo>(&Command::CordonHost {
            host: name.clone(),
            cordoned: true,
        })
        .await?;
        let now = atoll_agent::usage::now_unix_ms();
        let mut records = Vec::new();
        for tick in 0..ticks as u64 {
            for (vm, cloud) in clouds.iter().enumerate() {
                let end = now - (ticks as u64 - tick) * 1000;
                records.push(record(*cloud, h, vm, tick + 1, end, false));
                records.push(record(*cloud, h, vm, tick + 1, end, true));
            }
        }
        streams.push((name, hc, records));
    }
    let total: usize = streams.iter().map(|s| s.2.len()).sum();

    // The offline baseline reads the same records from a file.
    let file = dir.path().join("usage.jsonl");
    let mut text = String::new();
    for (_, _, records) in &streams {
        for r in records {
            text += &serde_json::to_string(r)?;
            text.push('\n');
        }
    }
    std::fs::write(&file, text)?;
    let t = Instant::now();
    let prices = atoll_control::usage::Prices::default();
    atoll_control::usage::report(&[file], &prices, 0, u64::MAX)?;
    let offline_per_sec = total as f64 / t.elapsed().as_secs_f64();

    let deliver = |streams: &Vec<(String, Client, Vec<UsageEvent>)>| {
        let jobs: Vec<_> = streams
            .iter()
            .map(|(host, c, records)| {
                let (host, c, records) = (host.clone(), c.clone(), records.clone());
                tokio::spawn(async move {
                    let mut kept = (0u64, 0u64);
                    for batch in records.chunks(MAX_USAGE_BATCH) {
                        let r = c
                            .execute(&Command::IngestUsage {
                                host: host.clone(),
                                batch: UsageBatch {
                                    records: batch.to_vec(),
                                    complete_to_ms: None,
                                },
                            })
                            .await?;
                        let Reply::UsageIngested(r) = r else {
                            anyhow::bail!("not an ingest reply: {r:?}");
                        };
                        anyhow::ensure!(r.refused == 0, "refused records: {r:?}");
                        kept.0 += u64::from(r.accepted);
                        kept.1 += u64::from(r.duplicates);
                    }
                    Ok(kept)
                })
            })
            .collect();
        async move {
            let mut kept = (0, 0);
            for j in jobs {
                let k = j.await??;
                kept.0 += k.0;
                kept.1 += k.1;
            }
            anyhow::Ok(kept)
        }
    };
    let t = Instant::now();
    let kept = deliver(&streams).await?;
    let ingest_per_sec = total as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(
        kept == (total as u64, 0),
        "first delivery kept {kept:?} of {total}"
    );
    let t = Instant::now();
    let kept = deliver(&streams).await?;
    let redeliver_per_sec = total as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(kept == (0, total as u64), "redelivery kept {kept:?}");

    // 2. Queries: `query_clouds` clouds' rollups for one hour, a month of them for 100.
    let hour = atoll_agent::usage::now_unix_ms() / 1000 / 3600 * 3600 - 3600;
    let q = {
        let mut q = Quantities {
            records: 2,
            vcpu_ms: 3_600_000,
            memory_mib_ms: 512 * 3_600_000,
            ..Quantities::default()
        };
        q.traffic
            .insert("from_guest/external".into(), [1000, 1_500_000]);
        serde_json::to_vec(&q)?
    };
    let base = 0x4000_0000u32;
    let all: Vec<u32> = (0..query_clouds as u32).map(|i| base + i).collect();
    let asked: Vec<u32> = all.iter().step_by(query_clouds / 100).copied().collect();
    seed(&core, &all, hour, 1, &q).await?;
    seed(&core, &asked, hour - 743 * 3600, 743, &q).await?;
    let mut month = Vec::new();
    for id in asked {
        let cloud = CloudId::new(id).context("cloud id")?;
        let t = Instant::now();
        let r = core
            .execute(
                Principal::Operator,
                Command::GetUsage {
                    cloud,
                    from: hour - 743 * 3600,
                    to: hour + 3600,
                },
            )
            .await?;
        month.push(t.elapsed());
        let Reply::Usage(u) = r else {
            anyhow::bail!("not usage: {r:?}")
        };
        anyhow::ensure!(u.records >= 2, "no usage read for {cloud}");
    }
    let t = Instant::now();
    let r = op
        .execute(&Command::GetFleetUsage {
            from: hour,
            to: hour + 3600,
            focus: false,
        })
        .await?;
    let fleet_hour = t.elapsed();
    let Reply::FleetUsage(f) = r else {
        anyhow::bail!("not fleet usage: {r:?}")
    };
    anyhow::ensure!(f.clouds.len() >= query_clouds, "{} clouds", f.clouds.len());
    let t = Instant::now();
    let r = op
        .execute(&Command::GetFleetUsage {
            from: hour,
            to: hour + 3600,
            focus: true,
        })
        .await?;
    let focus_hour = t.elapsed();
    let Reply::Csv(csv) = r else {
        anyhow::bail!("not a FOCUS export: {r:?}")
    };
    Ok(SpendBench {
        records: total,
        hosts,
        ingest_per_sec,
        redeliver_per_sec,
        offline_per_sec,
        clouds: query_clouds,
        cloud_month_p50: pct(&mut month, 0.5),
        cloud_month_p99: pct(&mut month, 0.99),
        fleet_hour,
        focus_hour,
        focus_bytes: csv.len(),
    })
}

/// Writes `hours` hourly rollups from `first` for `clouds`, both copies (the cloud's and the
/// fleet's), 500 keys per transaction.
async fn seed(
    core: &Arc<Core>,
    clouds: &[u32],
    first: u64,
    hours: u64,
    value: &[u8],
) -> Result<()> {
    let mut txn = Txn::default();
    for id in clouds {
        let cloud = CloudId::new(*id).context("cloud id")?;
        for h in 0..hours {
            let hour = first + h * 3600;
            for key in [
                format!("usagehour/{cloud}/{hour:012}/bench"),
                format!("usagefleet/{hour:012}/{cloud}/bench"),
            ] {
                txn.success.push(Op::Put {
                    key,
                    value: value.to_vec(),
                });
            }
            if txn.success.len() >= 500 {
                core.store().txn(std::mem::take(&mut txn)).await?;
            }
        }
    }
    if !txn.success.is_empty() {
        core.store().txn(txn).await?;
    }
    Ok(())
}

pub const HEADING: &str = "## Spend (issue 20)";

/// The report's section.
pub fn report(b: &SpendBench) -> String {
    format!(
        "\n{HEADING}\n\n\
         Reproduce: `cargo build --release -p atoll-tests --bin bench && target/release/bench --spend-only`.\n\
         Embedded control plane on SQLite (WAL, `synchronous = FULL`), API over loopback HTTP.\n\n\
         | what | result |\n|---|---|\n\
         | ingest, {} records (network + compute, batches of 256, {} hosts at once) | {:.0} records/s |\n\
         | redelivery of the same (all duplicates) | {:.0} records/s |\n\
         | baseline: `atoll usage` pricing the same records from a file, in process | {:.0} records/s |\n\
         | a cloud's usage for a month (744 hourly rollups), {} clouds in the store, p50 / p99 | {:?} / {:?} |\n\
         | every cloud's usage for an hour (`GET /v1/usage`), {} clouds | {:?} |\n\
         | the same hour as FOCUS 1.2 ({} bytes) | {:?} |\n\n\
         What it means: an agent delivers two records per VM and one per volume each interval (60 s \
         by default), so at this rate one control plane on SQLite takes the usage of about {:.0} \
         VMs; a redelivery costs as much as a delivery (each duplicate is found by its key). The \
         offline baseline only sums records in memory (no durability, no dedup across runs): it \
         is the ceiling, not a like-for-like. A cloud's query reads its own rollups only, so \
         it does not grow with the number of clouds; the fleet's hour reads every cloud's rollup \
         and the FOCUS export also each cloud's name (one read per cloud).\n",
        b.records,
        b.hosts,
        b.ingest_per_sec,
        b.redeliver_per_sec,
        b.offline_per_sec,
        b.clouds,
        b.cloud_month_p50,
        b.cloud_month_p99,
        b.clouds,
        b.fleet_hour,
        b.focus_bytes,
        b.focus_hour,
        b.ingest_per_sec * 60.0 / 2.0,
    )
}
