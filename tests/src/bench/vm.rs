//! MicroVM benchmarks (issue 6): API call to guest network-ready, and host memory per VM.
//!
//! An embedded control plane (SQLite in a temporary directory) and a converger with the QEMU
//! driver, as the agent runs them, on this host's real dataplane. Each VM is created through
//! the API (`POST /v1/clouds/{c}/vms`) and timed until its host reports it `running`, which
//! it does when the guest's console prints `atoll-guest: ready` (network and volumes up); the
//! status key is watched in the store (an event, no polling).
//!
//! - **Total**: API call → `running` reported.
//! - **Guest boot**: the VMM's start → the ready line (`boot_ms`, measured by the supervisor):
//!   QEMU, firmware, kernel and init, under TCG on this host (its KVM cannot run the guest).
//! - **atoll's own part**: total − guest boot: the API, the store, the sync to the host, the
//!   endpoint (tap, maps), the config drive, the VMM's privilege drop and spawn, and the
//!   report.
//! - **Memory**: proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`) of each VMM
//!   process once its guest is ready, averaged over the VMs of the concurrent round.

use atoll_api::Command;
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use atoll_agent::{
    config::{DataplaneConfig, VmConfig},
    converge::{ConvergeConfig, Converger, Source},
    endpoint::Host,
    vm::VmManager,
};
use atoll_control::{
    client::Client,
    model::{CreatedCloud, Vm},
};
use atoll_testbed::{unique_prefix, LinksWithPrefix, PinRoot};
use serde_json::{json, Value};

/// One VM's timings, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    pub total_ms: f64,
    pub guest_ms: f64,
}

impl Boot {
    pub fn own_ms(&self) -> f64 {
        (self.total_ms - self.guest_ms).max(0.0)
    }
}

pub struct VmBench {
    pub accel: String,
    pub sequential: Vec<Boot>,
    pub concurrent: Vec<Boot>,
    pub pss_per_vm: f64,
    pub memory_mib: u64,
    /// The very first VM, KVM probe included.
    pub first_vm_ms: f64,
    pub exec: crate::exec::ExecBench,
}

/// The `p`-quantile of `v` (sorted copy).
pub fn quantile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn run(smoke: bool) -> Result<VmBench> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(smoke))
}

fn pss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// PIDs of the VMMs recorded under `run_dir`.
fn vmm_pids(run_dir: &Path) -> Vec<u32> {
    std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("vmm.pid")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect()
}

async fn run_async(smoke: bool) -> Result<VmBench> {
    let (sequential_n, concurrent_n) = if smoke { (1, 2) } else { (10, 8) };
    let memory_mib = 64;
    let dir = tempfile::tempdir()?;
    let (core, url, op_token) = crate::control::start(dir.path()).await?;
    let op = Client::new(&url, &op_token)?;
    let pins = PinRoot::new("bv");
    let prefix = unique_prefix("v");
    let _links = LinksWithPrefix(prefix.clone());
    let mut host = Host::open(&DataplaneConfig {
        bpffs_root: pins.path().into(),
        tap_pool: 16,
        ..DataplaneConfig::default()
    })?;
    host.refill_pool().await?;
    let source = Source::new(atoll_control::core::Embedded(core.clone()));
    source.register("bench").await?;
    let vm_cfg = VmConfig {
        run_dir: dir.path().join("run"),
        state_dir: dir.path().join("state"),
        ..VmConfig::default()
    };
    let run_dir = vm_cfg.run_dir.clone();
    let (vmm, mut events) = VmManager::new(vm_cfg.clone());
    // Guest access, as the agent serves it (the exec bench's path).
    let guests = vmm.guests();
    let access = atoll_agent::guest_access::start(
        &atoll_agent::config::GuestAccessConfig::default(),
        guests.clone(),
    )
    .await?;
    source
        .register_guest_access("bench", access.access.clone())
        .await?;
    let mut conv = Converger::new(
        ConvergeConfig {
            host: "bench".into(),
            tap_prefix: prefix.clone(),
            volumes_dir: dir.path().join("volumes"),
        },
        source,
        None,
    )
    .with_vms(vmm, &vm_cfg.default_image);
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
                Some(ev) = events.recv() => conv.vm_event(ev).await?,
                _ = refill.tick() => { host.refill_some(Duration::from_millis(5)).await?; }
            }
        }
        conv.kill_vms().await;
        host.destroy().await?;
        anyhow::Ok(())
    });

    // Creates `n` VMs at once, each in a cloud of its own, and times each to `running`.
    let round = |n: usize| {
        let op = op.clone();
        let url = url.clone();
        let core = core.clone();
        let run_dir = run_dir.clone();
        async move {
            let rev = core.store().revision().await?;
            let mut watch = core.store().watch("c/", rev).await?;
            let mut clouds = Vec::new();
            for _ in 0..n {
                let c: CreatedCloud = op
                    .run(&Command::CreateCloud {
                        spec: serde_json::from_value(json!({})).unwrap(),
                    })
                    .await?;
                clouds.push(c);
            }
            let mut started = std::collections::HashMap::new();
            let mut calls = Vec::new();
            for c in &clouds {
                let cc = Client::new(&url, &c.token)?;
                let id = c.cloud.id;
                started.insert(format!("c/{id}/vmstatus/vm"), Instant::now());
                calls.push(tokio::spawn(async move {
                    let _: Vm = cc
                        .run(&Command::CreateVm {
                            cloud: id,
                            spec: serde_json::from_value(
                                json!({"name": "vm", "memory_mib": memory_mib}),
                            )
                            .unwrap(),
                        })
                        .await?;
                    anyhow::Ok(())
                }));
            }
            for c in calls {
                c.await??;
            }
            let mut boots = Vec::new();
            let mut accel = String::new();
            while boots.len() < n {
                let batch = tokio::time::timeout(Duration::from_secs(120), watch.next())
                    .await
                    .context("VMs not running within 120 s")??;
                for ev in batch.events {
                    let Some(t) = started.get(&ev.kv.key) else {
                        continue;
                    };
                    let v: Value = serde_json::from_slice(&ev.kv.value)?;
                    anyhow::ensure!(v["state"] != "failed", "VM failed: {v}");
                    if v["state"] == "running" {
                        boots.push(Boot {
                            total_ms: t.elapsed().as_secs_f64() * 1e3,
                            guest_ms: v["boot_ms"].as_f64().unwrap_or(0.0),
                        });
                        accel = v["accel"].as_str().unwrap_or("").to_string();
                        started.remove(&ev.kv.key);
                    }
                }
            }
            let pss: u64 = vmm_pids(&run_dir).iter().map(|&p| pss_bytes(p)).sum();
            for c in &clouds {
                let _: () = op.run(&Command::DeleteCloud { cloud: c.cloud.id }).await?;
            }
            anyhow::Ok((boots, accel, pss))
        }
    };
    // The first VM after a host boot also pays the KVM probe (cached per boot afterwards):
    // timed apart, not in the figures.
    let (warm, _, _) = round(1).await?;
    let first_vm_ms = warm[0].total_ms;
    let mut sequential = Vec::new();
    let mut accel = String::new();
    for _ in 0..sequential_n {
        let (b, a, _) = round(1).await?;
        sequential.extend(b);
        accel = a;
    }
    let (concurrent, _, pss) = round(concurrent_n).await?;

    // Exec and files on one running VM.
    let c: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({})).unwrap(),
        })
        .await?;
    let cc = Client::new(&url, &c.token)?;
    let id = c.cloud.id;
    let _: Vm = cc
        .run(&Command::CreateVm {
            cloud: id,
            spec: serde_json::from_value(json!({"name": "ex", "memory_mib": 256})).unwrap(),
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v: Vm = cc
            .run(&Command::GetVm {
                cloud: id,
                vm: "ex".into(),
            })
            .await?;
        if v.status.as_ref().map(|s| s.state) == Some(atoll_control::model::VmState::Running) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the exec bench's VM did not boot: {v:?}"
        );
        // A bench, not a test: polling the API is the simple way here.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shell = vm_dir(&run_dir, id.get(), "ex")?.join("vmm/shell.sock");
    let exec = crate::exec::measure(&cc, &guests, id, "ex", &shell, smoke).await?;
    let _: () = op.run(&Command::DeleteCloud { cloud: id }).await?;
    access.task.abort();
    let _ = stop_tx.send(());
    agent.await??;
    Ok(VmBench {
        accel,
        sequential,
        concurrent,
        pss_per_vm: pss as f64 / concurrent_n as f64,
        memory_mib,
        first_vm_ms,
        exec,
    })
}

/// The runtime directory of VM `vm` of cloud `cloud` (it records the VM's identity).
fn vm_dir(run_dir: &Path, cloud: u32, vm: &str) -> Result<std::path::PathBuf> {
    for e in std::fs::read_dir(run_dir)?.flatten() {
        let id = std::fs::read_to_string(e.path().join("identity")).unwrap_or_default();
        let mut f = id.split_whitespace();
        if f.next() == Some(&cloud.to_string()) && f.next() == Some(vm) {
            return Ok(e.path());
        }
    }
    anyhow::bail!(
        "no runtime directory for {cloud}/{vm} under {}",
        run_dir.display()
    )
}

/// One table row: p50/p99 of total, guest boot and atoll's own part.
fn row(label: &str, v: &[Boot]) -> String {
    let col = |f: fn(&Boot) -> f64| v.iter().map(f).collect::<Vec<f64>>();
    let (t, g, o) = (col(|b| b.total_ms), col(|b| b.guest_ms), col(Boot::own_ms));
    format!(
        "| {label} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms |",
        quantile(&t, 0.5),
        quantile(&t, 0.99),
        quantile(&g, 0.5),
        quantile(&g, 0.99),
        quantile(&o, 0.5),
        quantile(&o, 0.99)
    )
}

fn rows(vb: &VmBench) -> (String, String) {
    (
        row(
            &format!("one VM at a time ({})", vb.sequential.len()),
            &vb.sequential,
        ),
        row(
            &format!("{} VMs at once", vb.concurrent.len()),
            &vb.concurrent,
        ),
    )
}

fn pss_mib(vb: &VmBench) -> f64 {
    vb.pss_per_vm / f64::from(1u32 << 20)
}

/// What the bench prints.
pub fn summary(vb: &VmBench) -> String {
    let (seq, par) = rows(vb);
    format!(
        "microVMs ({}; first VM with the KVM probe {:.0} ms): API call to guest network-ready, p50/p99 total | guest boot | atoll's own:\n{seq}\n{par}\nhost memory per VM ({} MiB guest): {:.1} MiB PSS\n{}",
        vb.accel,
        vb.first_vm_ms,
        vb.memory_mib,
        pss_mib(vb),
        crate::exec::summary(&vb.exec)
    )
}

/// The report's section heading.
pub const HEADING: &str = "## MicroVMs (issue 6)";

/// The report's section.
pub fn section(vb: &VmBench) -> String {
    let (seq, par) = rows(vb);
    format!(
        "\n{HEADING}\n\n\
         QEMU 7.2 `microvm` under **{accel}** (this host's `/dev/kvm` is a nested PVM that cannot run the guest; the agent probes it and falls back), guest kernel and initramfs from `cargo xtask image`, {mem} MiB guests, embedded control plane and the agent's converger with the QEMU driver on this host's dataplane. Each VM in a cloud of its own, created through the API and timed until its host reports it `running` (the guest printed `atoll-guest: ready`: network and volumes up), seen through a store watch. *Guest boot* is the supervisor's `boot_ms`, from the VMM's start to that line; *atoll's own* is the rest: API, store, sync, endpoint, config drive, privilege drop and spawn, report. Method: `tests/src/bench/vm.rs`; `bench --vm-only` reruns this section alone.\n\n\
         | API call → guest network-ready | total p50 | total p99 | guest boot p50 | guest boot p99 | atoll's own p50 | atoll's own p99 |\n\
         |---|---:|---:|---:|---:|---:|---:|\n\
         {seq}\n{par}\n\n\
         The first VM after a host boot also pays the KVM probe (a probe boot under KVM, which fails here and is then cached for the boot): **{first:.0} ms** API call to ready, not in the rows above.\n\n\
         Host memory per VM: **{pss:.1} MiB** proportional set size of its VMM process with a {mem} MiB guest booted to ready (guest RAM it touched, TCG's translated code, QEMU; the kernel and initramfs mappings are shared between VMs; docs/vm.md). The agent keeps a 16 KiB console tail per VM besides.\n",
        accel = vb.accel,
        mem = vb.memory_mib,
        first = vb.first_vm_ms,
        pss = pss_mib(vb),
    )
}
