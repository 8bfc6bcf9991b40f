//! `atoll-agent`: the per-host daemon and its operator commands.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context, Result};
use std::sync::Arc;

use atoll_agent::converge::{ConvergeConfig, ConvergeError, Converger, DnsSink, Remote, Source};
use atoll_agent::dns::{DnsPlane, DnsServer, DnsView, ForwardPolicy};
use atoll_agent::usage::{compact, deliver_pending, FileSink, HttpSink, Recorder, Sink};
use atoll_agent::{
    config::{AgentConfig, ControlMode, VmDriver},
    endpoint::{DeviceSpec, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_api::model::SyncDelta;
#[cfg(feature = "embedded")]
use atoll_control::api;
use clap::{Parser, Subcommand};

/// atoll's per-host agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). Defaults apply when absent.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load (or resume) the pinned dataplane and run until SIGTERM/SIGINT. The dataplane keeps
    /// running after the agent exits.
    Run,
    /// Show endpoints and drop counters of the pinned dataplane.
    Status,
    /// Two clouds with overlapping addresses on this host: isolation verdicts and counters.
    Demo,
    /// Manage endpoints by hand (the control plane does this in production).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Remove every endpoint device, link and pin of atoll's dataplane.
    Cleanup,
    /// Bring the pins to this agent without starting it: migrate pins of the previous map
    /// layout and upgrade programs of another build in place (what `run` does first), hitless.
    Migrate,
    /// Check this host for what atoll needs (kernel, bpffs, privileges, TCX, tun, netns, KVM,
    /// VMM, guest image, map capacity); exits 1 if a required check fails.
    Doctor,
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Create an endpoint: a persistent tap (default) or a veth into a namespace.
    Add {
        #[arg(long)]
        name: String,
        /// The cloud: its API id (`c0000002a`) or its number (42); not 0.
        #[arg(long, value_parser = parse_cloud)]
        cloud: CloudId,
        #[arg(long)]
        ip: Ipv4Addr,
        #[arg(long)]
        mac: MacAddr,
        #[arg(long)]
        gateway: Ipv4Addr,
        /// Create a veth whose peer (named by --peer) goes into this namespace file.
        #[arg(long, requires = "peer")]
        netns: Option<PathBuf>,
        #[arg(long)]
        peer: Option<String>,
        /// Owner uid of the tap (for an unprivileged VMM).
        #[arg(long, conflicts_with = "netns")]
        owner: Option<u32>,
    },
    /// Delete an endpoint by its host device name.
    Del { name: String },
}

/// Exit status of a configuration error (clap's usage errors exit with 2 too); every other
/// failure exits with 1 (see docs/operations.md).
const EXIT_CONFIG: i32 = 2;

fn main() {
    atoll_api::logging::init();
    if let Err(e) = real_main() {
        // Every error's message already names its cause, so print the top one only.
        eprintln!("atoll-agent: {e}");
        let config = e
            .downcast_ref::<atoll_agent::config::ConfigError>()
            .is_some();
        std::process::exit(if config { EXIT_CONFIG } else { 1 });
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let cfg = match &cli.config {
        Some(p) => AgentConfig::load(p)?,
        None => AgentConfig::default(),
    };
    // Two workers: the embedded control plane's API is served beside the agent's own loop.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Run => run(&cfg).await,
            Cmd::Status => status(&cfg),
            Cmd::Demo => Ok(atoll_agent::demo::run().await?),
            Cmd::Migrate => {
                let prepared = atoll_agent::dataplane::prepare(&cfg.dataplane)?;
                println!("atoll-agent: {prepared}");
                Ok(())
            }
            Cmd::Doctor => {
                let report = atoll_agent::doctor::run(&cfg).await;
                print!("{report}");
                std::io::Write::flush(&mut std::io::stdout())?;
                if !report.passed() {
                    std::process::exit(1);
                }
                Ok(())
            }
            Cmd::Endpoint(e) => endpoint(&cfg, e).await,
            Cmd::Cleanup => {
                // VMMs first: they hold taps and volumes.
                let killed = atoll_agent::vm::kill_recorded(&cfg.vm).await;
                if killed > 0 {
                    println!("killed {killed} VMM processes");
                }
                // The DNS namespace and device pair, whatever state they are in.
                atoll_agent::dns::DnsPlane::remove(&cfg.dns).await?;
                if atoll_agent::overlay::remove_device(&cfg.overlay).await? {
                    println!("removed the overlay device {}", cfg.overlay.device);
                }
                if nothing_pinned(&cfg.dataplane.bpffs_root)? {
                    println!(
                        "nothing pinned under {}",
                        cfg.dataplane.bpffs_root.display()
                    );
                    return Ok(());
                }
                let mut host = Host::open(&cfg.dataplane)?;
                if cfg.usage.enabled {
                    host.set_usage(Recorder::open_with(
                        &cfg.usage.journal_dir,
                        &cfg.usage.source(),
                        cfg.usage.limits(),
                    )?);
                }
                host.destroy().await?;
                let _ = std::fs::remove_dir(&cfg.dataplane.bpffs_root);
                println!(
                    "removed all endpoints and pins under {}",
                    cfg.dataplane.bpffs_root.display()
                );
                Ok(())
            }
        }
    })
}

async fn run(cfg: &AgentConfig) -> Result<()> {
    // Migrations and program upgrades happen here, before anything opens the dataplane.
    let prepared = atoll_agent::dataplane::prepare(&cfg.dataplane)?;
    tracing::info!("pins: {prepared}");
    for (setting, want, have) in
        atoll_agent::dataplane::unapplied_sizes(&cfg.dataplane.bpffs_root, &cfg.dataplane)
    {
        tracing::warn!(
            "dataplane.{setting} = {want} is not applied: the pinned maps \
             hold {have} entries (sizes are fixed when the dataplane is created; to resize, \
             drain the host, `atoll-agent cleanup`, then `atoll-agent run`)"
        );
    }
    let mut host = Host::open(&cfg.dataplane)?;
    let stale = host.reconcile()?;
    if cfg.egress.enabled {
        let e = atoll_agent::egress::enable(&mut host, &cfg.egress)?;
        tracing::info!(
            "egress through {} from {} (NAT ports {}, {} never-reachable networks)",
            e.uplink.name,
            e.address,
            cfg.egress.nat_ports,
            e.never.len()
        );
    } else {
        host.disable_egress()?;
    }
    let underlay =
        if cfg.overlay.enabled {
            let o = atoll_agent::overlay::enable(&mut host, &cfg.overlay, &cfg.egress).await?;
            tracing::info!(
            "overlay on {} from {} (UDP {}, guests' MTU {}; encapsulated by the programs on {})",
            o.device,
            o.underlay,
            cfg.overlay.port,
            cfg.overlay.guest_mtu(),
            o.underlay_device.as_deref().unwrap_or("no device: all through the VXLAN device")
        );
            Some(o.underlay)
        } else {
            host.disable_overlay()?;
            None
        };
    host.refill_pool().await?;
    let eps = host.endpoints()?;
    tracing::info!(
        "dataplane at {} with {} endpoints ({} stale removed or repaired), {} spare taps",
        host.dataplane().pin_dir().display(),
        eps.len(),
        stale,
        host.pool_len()
    );
    // The metrics server reads the pinned maps through its own handle: no lock on `host`.
    let metrics = if cfg.metrics.enabled {
        let mut exporter = atoll_agent::metrics::Exporter::open(&cfg.dataplane)?;
        if cfg.usage.enabled {
            exporter = exporter.with_usage_journal(cfg.usage.journal_dir.clone());
        }
        let listener = atoll_agent::metrics::bind(cfg.metrics.listen).await?;
        tracing::info!(
            "metrics at http://{}{}",
            listener.local_addr()?,
            atoll_agent::metrics::PATH
        );
        Some(tokio::spawn(atoll_agent::metrics::serve(
            listener, exporter,
        )))
    } else {
        None
    };
    let metrics_stopped = async move {
        match metrics {
            Some(task) => match task.await {
                // main prints only the top error message: each of these names its cause.
                Ok(Ok(())) => anyhow::anyhow!("the metrics server stopped"),
                Ok(Err(e)) => anyhow::Error::new(e),
                Err(e) => anyhow::anyhow!("the metrics server task failed: {e}"),
            },
            None => std::future::pending().await,
        }
    };
    if cfg.usage.enabled {
        host.set_usage(Recorder::open_with(
            &cfg.usage.journal_dir,
            &cfg.usage.source(),
            cfg.usage.limits(),
        )?);
        tracing::info!(
            "usage records every {} s into {}",
            cfg.usage.interval_secs,
            cfg.usage.journal_dir.display()
        );
    }
    let (mut converger, dns_server, mut vm_events) =
        start_control(cfg, &mut host, underlay).await?;
    // Consoles are reported at most every 2 s, and only when they changed.
    let mut consoles = tokio::time::interval(std::time::Duration::from_secs(2));
    consoles.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sync_wait = std::time::Duration::from_secs(30);
    let mut next_sync = next_delta(converger.as_ref(), sync_wait);
    // Spare taps are refilled in short batches (5 ms of work at most) between changes, so a
    // refill never delays a VM create by more than that.
    let mut refill = tokio::time::interval(std::time::Duration::from_millis(20));
    // What the DNS server refused, reported to the control plane when it changed.
    let mut denied = tokio::time::interval(std::time::Duration::from_secs(5));
    refill.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(cfg.usage.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    tokio::pin!(metrics_stopped);
    let mut usage = match host.usage_collector(&cfg.dataplane) {
        Some(c) => Some(UsageWork {
            collector: Arc::new(c?),
            control: converger
                .as_ref()
                .filter(|_| cfg.usage.deliver_to_control)
                .map(|c| (c.source().0.clone(), c.host().to_string())),
            collecting: None,
            delivering: None,
        }),
        None => None,
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            e = &mut metrics_stopped => return Err(e),
            _ = tick.tick(), if cfg.usage.enabled => {
                if let Some(u) = usage.as_mut() {
                    u.tick(&cfg.usage);
                }
            }
            delta = &mut next_sync => {
                if let Some(c) = converger.as_mut() {
                    match delta {
                        Ok(delta) => {
                            if let Err(e) = c.apply(&mut host, delta).await {
                                tracing::error!("{e}");
                            }
                        }
                        Err(e) => {
                            // The control plane is unreachable or restarting: retry shortly.
                            tracing::warn!("{e}; retrying in 1 s");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                }
                next_sync = next_delta(converger.as_ref(), sync_wait);
            }
            Some(ev) = recv_vm_event(&mut vm_events) => {
                if let Some(c) = converger.as_mut() {
                    if let Err(e) = c.vm_event(ev).await {
                        tracing::error!("{e}");
                    }
                }
            }
            _ = consoles.tick(), if vm_events.is_some() => {
                if let Some(c) = converger.as_mut() {
                    if let Err(e) = c.report_consoles().await {
                        tracing::error!("{e}");
                    }
                    if let Err(e) = c.report_idle(&host).await {
                        tracing::error!("reporting idle VMs: {e}");
                    }
                }
            }
            _ = denied.tick(), if converger.is_some() => {
                if let Err(e) = host.egress_tables().prune() {
                    tracing::error!("removing expired egress addresses: {e}");
                }
                if let Err(e) = host.refresh_budget_periods() {
                    tracing::error!("moving egress budgets to the current period: {e}");
                }
                match host.refused_destinations() {
                    Ok(refused) => {
                        if let Some(c) = converger.as_ref() {
                            c.record_refused(refused);
                        }
                    }
                    Err(e) => tracing::error!("reading refused destinations: {e}"),
                }
                if let Some(c) = converger.as_mut() {
                    if let Err(e) = c.report_denied().await {
                        tracing::error!("reporting denied destinations: {e}");
                    }
                }
            }
            _ = refill.tick() => {
                if let Err(e) = host.refill_some(std::time::Duration::from_millis(5)).await {
                    tracing::error!("refilling the tap pool: {e}");
                }
            }
        }
    }
    if cfg.usage.enabled {
        if let Some(u) = usage.as_mut() {
            // The last records before stopping: wait for what runs, then one more round.
            u.finish().await;
            u.tick(&cfg.usage);
            u.finish().await;
        }
    }
    if let Some(server) = dns_server {
        if let Err(e) = server.shutdown().await {
            tracing::error!("stopping the DNS server: {e}");
        }
    }
    tracing::info!("stopping; the dataplane stays pinned and keeps forwarding, VMs keep running");
    Ok(())
}

/// Starts the embedded control plane (store, core, API server) as this agent's source.
#[cfg(feature = "embedded")]
async fn embedded(c: &atoll_agent::config::ControlLinkConfig) -> Result<Source> {
    let tls = c
        .embedded
        .server_tls()
        .map_err(|e| anyhow::anyhow!("control.embedded.{e}"))?;
    let core = c.embedded.start().await?;
    let listener = tokio::net::TcpListener::bind(c.embedded.listen)
        .await
        .with_context(|| format!("listening on control.embedded.listen {}", c.embedded.listen))?;
    let (scheme, about) = atoll_control::config::ControlConfig::describe_tls(&tls);
    tracing::info!(
        "control plane API at {scheme}://{} (store: {}){about}",
        listener.local_addr()?,
        c.embedded.store.backend
    );
    // `[control.embedded.metrics]`: the control plane's metrics on a listener of their own.
    if c.embedded.metrics.enabled {
        let l = tokio::net::TcpListener::bind(c.embedded.metrics.listen)
            .await
            .with_context(|| {
                format!(
                    "control.embedded.metrics.listen: listening on {}",
                    c.embedded.metrics.listen
                )
            })?;
        tracing::info!(
            "control plane metrics on http://{}{}",
            l.local_addr()?,
            atoll_control::metrics::PATH
        );
        let serve = atoll_control::metrics::serve(l, Some(core.clone()), std::future::pending());
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("the control plane's metrics listener stopped: {e}");
            }
        });
    }
    let api_core = core.clone();
    let limits = c.embedded.api.limits();
    let tls = tls.map(|t| t.config);
    tokio::spawn(async move {
        let serving = api::serve_tls(api_core, listener, limits, tls, std::future::pending());
        if let Err(e) = serving.await {
            tracing::error!("control plane API stopped: {e}");
        }
    });
    Ok(Source(Arc::new(atoll_control::core::Embedded(core))))
}

/// Refused by the config's validation already; kept for a config built in code.
#[cfg(not(feature = "embedded"))]
async fn embedded(_: &atoll_agent::config::ControlLinkConfig) -> Result<Source> {
    anyhow::bail!(
        "control.mode = \"embedded\": this agent was built without the embedded control plane"
    )
}

/// Starts the link to the control plane per `[control]`: the embedded control plane (store,
/// core and API server) or a client of a remote one; registers this host.
type VmEvents = tokio::sync::mpsc::UnboundedReceiver<atoll_agent::vm::VmEvent>;

async fn recv_vm_event(rx: &mut Option<VmEvents>) -> Option<atoll_agent::vm::VmEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn start_control(
    cfg: &AgentConfig,
    host: &mut Host,
    underlay: Option<std::net::Ipv4Addr>,
) -> Result<(
    Option<Converger>,
    Option<atoll_agent::dns::DnsServer>,
    Option<VmEvents>,
)> {
    let c = &cfg.control;
    let source = match c.mode {
        ControlMode::Off => return Ok((None, None, None)),
        ControlMode::Remote => {
            let token = std::fs::read_to_string(&c.token_file).with_context(|| {
                format!("reading control.token_file {}", c.token_file.display())
            })?;
            Source(Arc::new(Remote::new(
                c.clients(&token)?,
                Some(c.token_file.clone()),
            )))
        }
        ControlMode::Embedded => embedded(c).await?,
    };
    // The guests' DNS server at their gateway address, fed by the converger.
    let (dns, server): (Option<Arc<dyn DnsSink>>, _) = if cfg.dns.enabled {
        let plane = DnsPlane::ensure(host, &cfg.dns).await?;
        let view = DnsView::new(ForwardPolicy::from_upstreams(&cfg.dns.forward));
        view.set_learn_sink(host.egress_tables());
        let server = DnsServer::start(&plane, view.clone())?;
        tracing::info!("DNS for guests at their gateway (split horizon per endpoint)");
        (Some(Arc::new(view)), Some(server))
    } else {
        (None, None)
    };
    let name = c.host_name();
    source.register(&name).await?;
    if let Some(u) = underlay {
        source.register_underlay(&name, u).await?;
    }
    // Compute and storage are metered with the usage records.
    let meters = host.usage().map(|r| (r.meters(), r.boot_id().to_string()));
    let vmm = if cfg.vm.driver == VmDriver::Qemu {
        let (mut vmm, rx) = atoll_agent::vm::VmManager::new(cfg.vm.clone());
        if let Some((m, boot_id)) = &meters {
            vmm = vmm.with_meters(m.clone(), boot_id);
        }
        if cfg.overlay.enabled {
            vmm = vmm.with_guest_mtu(cfg.overlay.guest_mtu());
        }
        // Exec and files: control planes reach the guest agents through this endpoint.
        let access = atoll_agent::guest_access::start(&cfg.guest_access, vmm.guests()).await?;
        source
            .register_guest_access(&name, access.access.clone())
            .await?;
        Some((vmm, rx))
    } else {
        None
    };
    tracing::info!(host = %name, "converging host {name} ({} control plane)", c.mode);
    let conv = ConvergeConfig {
        host: name,
        tap_prefix: c.tap_prefix.clone(),
        volumes_dir: c.volumes_dir.clone(),
    };
    let mut converger = Converger::new(conv, source, dns);
    if let Some((m, _)) = meters {
        converger = converger.with_meters(m);
    }
    if cfg.dns.enabled {
        converger = converger.with_dns_suffix(&cfg.dns.suffix);
    }
    let mut events = None;
    if let Some((vmm, rx)) = vmm {
        converger = converger.with_vms(vmm, &cfg.vm.default_image);
        events = Some(rx);
        tracing::info!(
            "VMs run under QEMU from {} (images in {})",
            cfg.vm.qemu_root.display(),
            cfg.vm.images_dir.display()
        );
    }
    Ok((Some(converger), server, events))
}

/// The next sync of `converger`, or never when there is no control plane.
fn next_delta(
    converger: Option<&Converger>,
    wait: std::time::Duration,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<SyncDelta, ConvergeError>> + Send>> {
    match converger {
        Some(c) => Box::pin(c.next_delta(wait)),
        None => Box::pin(std::future::pending()),
    }
}

/// The usage work of one tick, off the async runtime: a collection (one record per endpoint,
/// on the collector's own dataplane handle) and, independently, a delivery to the sinks
/// followed by a compaction of the journal. Each is skipped while its previous run is still
/// going, so a slow sink delays delivery, never collection, and neither delays the event loop.
/// Failures are reported and retried next tick; the kernel counters and the journal keep
/// everything meanwhile.
struct UsageWork {
    collector: Arc<atoll_agent::endpoint::UsageCollector>,
    /// The control plane and this host's name, when records go there too.
    control: Option<(Arc<dyn atoll_api::ControlPlane>, String)>,
    collecting: Option<tokio::task::JoinHandle<()>>,
    delivering: Option<tokio::task::JoinHandle<()>>,
}

impl UsageWork {
    fn tick(&mut self, cfg: &atoll_agent::config::UsageConfig) {
        if self.collecting.as_ref().is_none_or(|d| d.is_finished()) {
            let collector = self.collector.clone();
            self.collecting = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = collector.collect() {
                    tracing::error!("{e}");
                }
            }));
        }
        if self.delivering.as_ref().is_some_and(|d| !d.is_finished()) {
            return;
        }
        let cfg = cfg.clone();
        let control = self.control.clone();
        let rt = tokio::runtime::Handle::current();
        // Read before delivery starts: every record of that collection is journaled.
        let collected = self.collector.last_collected_ms();
        self.delivering = Some(tokio::task::spawn_blocking(move || {
            deliver(&cfg, control, collected, rt)
        }));
    }

    /// Waits for the running work (at shutdown).
    async fn finish(&mut self) {
        for t in [self.collecting.take(), self.delivering.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.await;
        }
    }
}

/// Delivers the journal to every configured sink, then deletes the segments all of them have.
/// The control plane also learns, once the journal is delivered to its end, that this host's
/// usage is complete up to `collected` (the last collection before delivery began).
fn deliver(
    cfg: &atoll_agent::config::UsageConfig,
    control: Option<(Arc<dyn atoll_api::ControlPlane>, String)>,
    collected: u64,
    rt: tokio::runtime::Handle,
) {
    let dir = cfg.journal_dir.clone();
    let mut sinks: Vec<Box<dyn Sink + Send>> = Vec::new();
    let mut names = Vec::new();
    if let Some((cp, host)) = control {
        let mut sink = atoll_agent::usage::ControlSink::new(cp, &host, rt);
        match deliver_pending(&dir, &mut sink, 1 << 20) {
            Ok(_) => {
                if let Err(e) = sink.mark_complete(collected) {
                    tracing::error!("telling the control plane usage is complete: {e}");
                }
            }
            Err(e) => tracing::error!("{e}"),
        }
        names.push(sink.name().to_string());
    }
    if let Some(path) = &cfg.file_sink {
        sinks.push(Box::new(FileSink::new(
            path.clone(),
            cfg.file_sink_max_bytes,
            cfg.file_sink_keep,
        )));
    }
    if let Some(url) = &cfg.http_sink {
        match HttpSink::new(url, std::time::Duration::from_secs(cfg.http_timeout_secs)) {
            Ok(s) => sinks.push(Box::new(s)),
            Err(e) => tracing::error!("usage.http_sink: {e}"),
        }
    }
    for sink in sinks.iter_mut() {
        if let Err(e) = deliver_pending(&dir, sink.as_mut(), 1 << 20) {
            tracing::error!("{e}");
        }
    }
    names.extend(sinks.iter().map(|s| s.name().to_string()));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if let Err(e) = compact(&dir, &names, cfg.limits()) {
        tracing::error!("{e}");
    }
}

/// No layout of any version is pinned under `root` (pins of another version are not "nothing":
/// opening the dataplane then explains what to do with them).
fn nothing_pinned(root: &std::path::Path) -> Result<bool> {
    Ok(atoll_agent::dataplane::layout_versions(root)?.is_empty())
}

fn status(cfg: &AgentConfig) -> Result<()> {
    if nothing_pinned(&cfg.dataplane.bpffs_root)? {
        println!(
            "no dataplane pinned under {}",
            cfg.dataplane.bpffs_root.display()
        );
        return Ok(());
    }
    let host = Host::open(&cfg.dataplane)?;
    println!(
        "{:<16} {:>7} {:<9} {:<15} {:<17} GATEWAY",
        "DEVICE", "IFINDEX", "CLOUD", "IPV4", "MAC"
    );
    for e in host.endpoints()? {
        println!(
            "{:<16} {:>7} {:<9} {:<15} {:<17} {}",
            e.name.as_deref().unwrap_or("(gone)"),
            e.ifindex,
            e.cloud,
            e.ipv4,
            e.mac,
            e.gateway
        );
    }
    println!("\ndrops:");
    for (r, n) in host.dataplane().drop_counters()? {
        println!("  {:<28} {n}", r.name());
    }
    Ok(())
}

async fn endpoint(cfg: &AgentConfig, cmd: EndpointCmd) -> Result<()> {
    let mut host = Host::open(&cfg.dataplane)?;
    match cmd {
        EndpointCmd::Add {
            name,
            cloud,
            ip,
            mac,
            gateway,
            netns,
            peer,
            owner,
        } => {
            let device = match (netns, peer) {
                (Some(netns), Some(peer_name)) => DeviceSpec::Veth { peer_name, netns },
                _ => DeviceSpec::Tap { owner_uid: owner },
            };
            let ep = host
                .create_endpoint(&EndpointSpec {
                    name,
                    cloud,
                    ipv4: ip,
                    mac,
                    gateway,
                    device,
                })
                .await?;
            println!(
                "created {} (ifindex {})",
                ep.name.unwrap_or_default(),
                ep.ifindex
            );
        }
        EndpointCmd::Del { name } => {
            // The endpoint's final usage record is written before it goes away.
            if cfg.usage.enabled {
                host.set_usage(Recorder::open_with(
                    &cfg.usage.journal_dir,
                    &cfg.usage.source(),
                    cfg.usage.limits(),
                )?);
            }
            host.delete_endpoint(&name).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// A cloud on the command line: the API's form (`c0000002a`) or a number, not 0.
fn parse_cloud(s: &str) -> Result<CloudId, String> {
    match s.parse::<u32>() {
        Ok(n) => CloudId::new(n).ok_or_else(|| "0 is not a cloud".to_string()),
        Err(_) => s.parse::<CloudId>().map_err(|e| e.message),
    }
}
