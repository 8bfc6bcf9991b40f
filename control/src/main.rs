//! `atoll`: the control plane server (`atoll serve`) and its CLI.
//!
//! Every resource command speaks the HTTP API (`--url`, `ATOLL_URL`) with a bearer token
//! (`--token`, `ATOLL_TOKEN`, or the operator token file) and prints the JSON reply, so scripts
//! and agents can use it as well as people. `atoll usage` prices usage records offline.
//! `atoll vm console` is the exception: it prints the console text itself, so it can be piped.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use atoll_api::Reply;
use atoll_control::{
    api,
    client::Client,
    config::ControlConfig,
    core::Command,
    model::*,
    tls::{ClientTls, Trust},
    usage::{fleet_table, focus_csv, parse_rfc3339, report, table, Prices},
};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// atoll control plane and CLI.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// API base URL.
    #[arg(
        long,
        global = true,
        env = "ATOLL_URL",
        default_value = "https://127.0.0.1:7480"
    )]
    url: String,
    /// CA certificate the API's certificate must be signed by (default: the CA a control
    /// plane on this host generated, /var/lib/atoll/tls/ca.pem, when present).
    #[arg(long, global = true, env = "ATOLL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the API's certificate or of its CA (the control plane prints
    /// its CA's on first start).
    #[arg(long, global = true, env = "ATOLL_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// Bearer token (a cloud's token or the operator's).
    #[arg(long, global = true, env = "ATOLL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File to read the token from when no token is given.
    #[arg(long, global = true, default_value = "/etc/atoll/operator.token")]
    token_file: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane API server.
    Serve {
        /// Config file (TOML); built-in defaults if omitted.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Clouds: create (returns its token), list, get, delete, token (rotates it).
    #[command(subcommand)]
    Cloud(CloudCmd),
    /// VMs of a cloud.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Volumes of a cloud.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// DNS record sets of a cloud.
    #[command(subcommand)]
    Dns(DnsCmd),
    /// Services a cloud exposes to other clouds, and their grants.
    #[command(subcommand)]
    Exposure(ExposureCmd),
    /// Exposures granted to a cloud (accepted offers).
    #[command(subcommand)]
    Import(ImportCmd),
    /// Offers of exposures made to a cloud: list, accept, decline, and the providers whose
    /// offers it accepts without being asked.
    #[command(subcommand)]
    Offer(OfferCmd),
    /// What a cloud's VMs may reach outside the cloud.
    #[command(subcommand)]
    Egress(EgressCmd),
    /// VM ports published on the internet (public ingress).
    #[command(subcommand)]
    Publication(PublicationCmd),
    /// Registered hosts (operator).
    #[command(subcommand)]
    Host(HostCmd),
    /// Print the OpenAPI document.
    Openapi,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Serve MCP (the Model Context Protocol) on stdin and stdout: one tool per API route
    /// the token may call, each a request to the API at `--url` with the token (a cloud's, for
    /// an agent confined to its cloud). JSON-RPC, one message per line; logs go to stderr.
    Mcp,
    /// Usage and cost per cloud for a period: every cloud's, from the control plane
    /// (operator; `GET /v1/usage`), or from usage record files (CloudEvents JSON lines) priced
    /// with `--prices`.
    Usage {
        /// Usage record files (the agent's file sink or journal); duplicates are ignored.
        /// None: ask the control plane.
        files: Vec<PathBuf>,
        /// Price file (TOML, as `[prices]` of the control plane's config), for files.
        #[arg(long)]
        prices: Option<PathBuf>,
        /// Start of the period (inclusive), RFC 3339 UTC (default: files, everything; the
        /// control plane, an hour before `--to`).
        #[arg(long)]
        from: Option<String>,
        /// End of the period (exclusive), RFC 3339 UTC (default: files, everything; the
        /// control plane, now). The control plane widens the period to whole hours.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Subcommand)]
enum CloudCmd {
    Create {
        #[arg(long)]
        name: Option<String>,
        /// Private range, e.g. 10.0.0.0/16.
        #[arg(long)]
        cidr: Option<String>,
        /// Quotas as JSON, e.g. '{"vms":4,"vcpus":8}'.
        #[arg(long)]
        quotas: Option<String>,
        /// Delete the cloud with everything in it this long from now: seconds, or a number
        /// with s, m, h or d (`90m`, `2h`, `7d`).
        #[arg(long, value_parser = parse_duration_secs)]
        ttl: Option<u64>,
    },
    /// Set when the cloud expires (deleted with everything in it), from now on: one of
    /// `--ttl`, `--at` or `--never`. The cloud's own token or the operator's.
    #[command(group = clap::ArgGroup::new("when").required(true).args(["ttl", "at", "never"]))]
    Expire {
        cloud: CloudId,
        /// This long from now: seconds, or a number with s, m, h or d.
        #[arg(long, value_parser = parse_duration_secs, conflicts_with_all = ["at", "never"])]
        ttl: Option<u64>,
        /// At this time, in seconds since the Unix epoch.
        #[arg(long, conflicts_with = "never")]
        at: Option<u64>,
        /// Never.
        #[arg(long)]
        never: bool,
    },
    List {
        #[arg(long)]
        after: Option<CloudId>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    Get {
        cloud: CloudId,
    },
    Delete {
        cloud: CloudId,
    },
    /// Issue the cloud a new token (the cloud's own token or the operator's). The old token
    /// stops working at once; the new one is printed once.
    Token {
        cloud: CloudId,
    },
    /// The cloud's metered quantities and their cost, itemised, in the hours [--from, --to)
    /// (seconds since the epoch, widened to whole hours; default the last hour), with the time
    /// its usage is complete up to and its budget.
    Usage {
        cloud: CloudId,
        #[arg(long)]
        from: Option<u64>,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Set or raise the cloud's spend budget per calendar month (operator); `--lift` removes
    /// it. At the budget the cloud's VMs and egress stop until it is raised or lifted.
    Budget {
        cloud: CloudId,
        /// In the price list's currency.
        #[arg(long, required_unless_present = "lift")]
        amount: Option<f64>,
        /// Percent of the amount past which a warning is recorded.
        #[arg(long, default_value_t = 80)]
        warn_percent: u32,
        #[arg(long, conflicts_with = "amount")]
        lift: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    Create {
        cloud: CloudId,
        name: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        image: Option<String>,
        /// A volume to attach (repeatable).
        #[arg(long = "volume")]
        volumes: Vec<String>,
        /// A script the guest runs as root once its network and volumes are up (`-`: stdin;
        /// at most 64 KiB of UTF-8).
        #[arg(long)]
        user_data_file: Option<PathBuf>,
        /// Create the VM stopped (start it with `atoll vm start`).
        #[arg(long)]
        stopped: bool,
        /// Anti-affinity group: VMs of the cloud naming the same group never share a host.
        #[arg(long)]
        anti_affinity: Option<String>,
        /// Stop the VM after this long without a packet in or out or a console session
        /// (seconds, or a number with s, m, h or d); start it again with `atoll vm start`.
        #[arg(long, value_parser = parse_duration_secs)]
        idle_timeout: Option<u64>,
    },
    List {
        cloud: CloudId,
    },
    /// A VM with its status.
    Get {
        cloud: CloudId,
        name: String,
    },
    Delete {
        cloud: CloudId,
        name: String,
    },
    /// Boot a stopped VM (a no-op if it runs).
    Start {
        cloud: CloudId,
        name: String,
    },
    /// Shut a VM down; its address, name and volumes stay (a no-op if it is stopped).
    Stop {
        cloud: CloudId,
        name: String,
    },
    /// Print the tail of a VM's serial console (the text itself, not JSON).
    Console {
        cloud: CloudId,
        name: String,
    },
    /// Run a command in a running VM (through its guest agent, not its network): its stdout
    /// and stderr stream here as they come, and its exit code is atoll's (128 + the signal if
    /// it was killed, 124 at the timeout, 125 if it could not run). Stdin, when it is not a
    /// terminal, streams to the command as it comes (its end closes the command's stdin).
    /// Ctrl-C kills the command.
    Exec {
        cloud: CloudId,
        name: String,
        /// An environment variable, `NAME=value` (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// The working directory in the guest (default /root).
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this long (seconds, or with s, m, h; default 10m).
        #[arg(long, value_parser = parse_duration_secs)]
        timeout: Option<u64>,
        /// Output kept per stream (default 1 MiB); the rest is discarded with a notice.
        #[arg(long)]
        max_output_bytes: Option<u64>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Copy a file into a VM (`atoll vm cp <cloud> <local> <vm>:<path>`) or out of one
    /// (`atoll vm cp <cloud> <vm>:<path> <local>`); `-` is stdin or stdout. Files are streamed
    /// (at most 1 GiB); an upload replaces the file whole once complete.
    Cp {
        cloud: CloudId,
        src: String,
        dst: String,
        /// The uploaded file's mode, octal (default 644).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
        /// The uploaded file's owner (default 0).
        #[arg(long)]
        uid: Option<u32>,
        /// The uploaded file's group (default 0).
        #[arg(long)]
        gid: Option<u32>,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        cloud: CloudId,
        name: String,
        #[arg(long)]
        size_gib: u64,
        #[arg(long, value_enum, default_value = "raw")]
        format: CliFormat,
    },
    List {
        cloud: CloudId,
    },
    Get {
        cloud: CloudId,
        name: String,
    },
    Delete {
        cloud: CloudId,
        name: String,
    },
    Attach {
        cloud: CloudId,
        name: String,
        vm: String,
    },
    Detach {
        cloud: CloudId,
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CliFormat {
    Raw,
    Qcow2,
}

#[derive(Subcommand)]
enum DnsCmd {
    List {
        cloud: CloudId,
    },
    /// Create or replace a record set.
    Set {
        cloud: CloudId,
        name: String,
        /// A, AAAA, CNAME or TXT.
        #[arg(value_parser = parse_rtype)]
        rtype: RecordType,
        #[arg(required = true)]
        values: Vec<String>,
        #[arg(long, default_value_t = 60)]
        ttl: u32,
    },
    Delete {
        cloud: CloudId,
        name: String,
        #[arg(value_parser = parse_rtype)]
        rtype: RecordType,
    },
}

#[derive(Subcommand)]
enum ExposureCmd {
    Create {
        cloud: CloudId,
        name: String,
        #[arg(long, value_enum)]
        protocol: CliProtocol,
        #[arg(long)]
        port: u16,
        /// Backend `vm:port` (repeatable).
        #[arg(long = "backend", required = true)]
        backends: Vec<String>,
    },
    List {
        cloud: CloudId,
    },
    Get {
        cloud: CloudId,
        name: String,
    },
    Delete {
        cloud: CloudId,
        name: String,
    },
    /// Offer an exposure to a consumer cloud; it becomes a grant when the consumer accepts
    /// (at once if the consumer's offer policy lists this cloud).
    Grant {
        cloud: CloudId,
        name: String,
        consumer: CloudId,
    },
    /// Active grants of an exposure.
    Grants {
        cloud: CloudId,
        name: String,
    },
    /// Pending offers of an exposure.
    Offers {
        cloud: CloudId,
        name: String,
    },
    /// Revoke a grant, or withdraw a pending offer.
    Revoke {
        cloud: CloudId,
        name: String,
        consumer: CloudId,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CliProtocol {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum ImportCmd {
    List {
        cloud: CloudId,
    },
    /// Give up a grant.
    Delete {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
}

#[derive(Subcommand)]
enum OfferCmd {
    /// Pending offers made to the cloud.
    List { cloud: CloudId },
    /// Accept an offer: a VIP and a name in the cloud, the grant active.
    Accept {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
    /// Decline an offer.
    Decline {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
    /// Show the providers whose offers the cloud accepts without being asked.
    Policy { cloud: CloudId },
    /// Set the providers whose later offers the cloud accepts without being asked (none:
    /// every offer waits for `offer accept`).
    AcceptFrom {
        cloud: CloudId,
        providers: Vec<CloudId>,
    },
}

#[derive(Subcommand)]
enum PublicationCmd {
    /// Publish a VM's port at an address of the operator's pool, the same port number.
    Add {
        cloud: CloudId,
        vm: String,
        port: u16,
        #[arg(long, value_enum, default_value = "tcp")]
        protocol: CliProtocol,
        /// A source prefix that may connect (repeat); none: anyone.
        #[arg(long = "allow-from", value_name = "CIDR")]
        allow_from: Vec<Ipv4Net>,
    },
    /// List the cloud's publications.
    List { cloud: CloudId },
    /// Unpublish (`<vm>-<protocol>-<port>`); live connections are cut.
    Remove { cloud: CloudId, name: String },
}

#[derive(Subcommand)]
enum EgressCmd {
    /// Show the cloud's egress policy.
    Show { cloud: CloudId },
    /// Replace the cloud's egress policy; live flows it no longer allows are cut.
    Set {
        cloud: CloudId,
        #[arg(long, value_enum)]
        mode: CliEgressMode,
        /// A destination the cloud may reach (allowlist mode; repeat):
        /// `<cidr|address|domain>[:<tcp|udp>][:<port>|<first>-<last>]`, e.g. `*.pypi.org:tcp:443`.
        #[arg(long = "allow", value_name = "RULE")]
        allow: Vec<EgressRule>,
        /// A destination denied before any allow rule (allow and allowlist mode; repeat):
        /// CIDRs or addresses only, with optional protocol and ports.
        #[arg(long = "deny", value_name = "RULE")]
        deny: Vec<EgressRule>,
        /// Egress rate limit per host, bytes per second.
        #[arg(long, value_name = "BYTES_PER_SEC")]
        rate: Option<u64>,
        /// Egress byte budget per host and period: `<bytes>/<hour|day|month>`, e.g.
        /// `10000000000/month`; past it egress stops until the next period.
        #[arg(long, value_name = "BYTES/PERIOD", value_parser = parse_budget)]
        budget: Option<ByteBudget>,
    },
    /// What the cloud's VMs were refused recently, and why, from every host.
    Denied { cloud: CloudId },
    /// Show the cloud's own egress address.
    Address { cloud: CloudId },
    /// Give the cloud an egress address of the pool, its alone (operator).
    Assign {
        cloud: CloudId,
        /// This address of the pool (default: the first free one).
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
    },
    /// Take the cloud's egress address back to the pool (operator).
    Release { cloud: CloudId },
}

/// `<bytes>/<hour|day|month>`.
fn parse_budget(s: &str) -> Result<ByteBudget, String> {
    let (bytes, period) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not <bytes>/<hour|day|month>"))?;
    Ok(ByteBudget {
        bytes: bytes
            .parse()
            .map_err(|_| format!("{bytes:?} is not a number of bytes"))?,
        period: match period {
            "hour" => BudgetPeriod::Hour,
            "day" => BudgetPeriod::Day,
            "month" => BudgetPeriod::Month,
            p => return Err(format!("{p:?} is not a period (hour, day or month)")),
        },
    })
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliEgressMode {
    /// Nothing leaves the cloud.
    Deny,
    /// Everything but the deny rules and the always-denied destinations.
    Allow,
    /// Only what the allow rules name.
    Allowlist,
}

#[derive(Subcommand)]
enum HostCmd {
    /// List registered hosts.
    List,
    /// Issue a host's token, registering the host (operator). It replaces any earlier token
    /// and is printed once: put it in that agent's `control.token_file`.
    Token { name: String },
    /// Place no new VMs or volumes on a host (operator); what runs there stays.
    Cordon { name: String },
    /// Place on a host again (operator).
    Uncordon { name: String },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    /// FinOps FOCUS CSV (from the control plane: FOCUS 1.2).
    Focus,
    /// The control plane's JSON.
    Json,
}

fn main() {
    atoll_control::logging::init();
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("atoll: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let tls = client_tls(&cli);
    match cli.command {
        Cmd::Serve { config } => {
            let cfg = match config {
                Some(p) => ControlConfig::load(&p)?,
                None => ControlConfig::default(),
            };
            runtime()?.block_on(serve(cfg))
        }
        Cmd::Openapi => {
            println!("{}", serde_json::to_string_pretty(&atoll_api::openapi())?);
            Ok(())
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "atoll", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Usage {
            files,
            prices,
            from,
            to,
            format,
        } if !files.is_empty() => {
            let Some(prices) = prices else {
                anyhow::bail!("pricing usage files needs --prices <file>");
            };
            let prices = Prices::load(&prices)?;
            let from = parse_rfc3339(from.as_deref().unwrap_or("1970-01-01T00:00:00Z"))?;
            let to = parse_rfc3339(to.as_deref().unwrap_or("9999-12-31T23:59:59Z"))?;
            let r = report(&files, &prices, from, to)?;
            print!(
                "{}",
                match format {
                    Format::Table => table(&r),
                    Format::Focus => focus_csv(&r),
                    Format::Json => anyhow::bail!(
                        "--format json is the control plane's; use table or focus for files"
                    ),
                }
            );
            Ok(())
        }
        Cmd::Usage {
            ref prices,
            ref from,
            ref to,
            format,
            ..
        } => {
            if prices.is_some() {
                anyhow::bail!(
                    "--prices prices usage files; the control plane uses its own price list"
                );
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let to = match to {
                Some(t) => parse_rfc3339(t)? / 1000,
                None => now + 1,
            };
            let from = match from {
                Some(f) => parse_rfc3339(f)? / 1000,
                None => to.saturating_sub(3600),
            };
            let client = Client::with_tls(&cli.url, &token(&cli)?, tls.as_ref())?;
            let cmd = Command::GetFleetUsage {
                from,
                to,
                focus: format == Format::Focus,
            };
            match runtime()?.block_on(client.execute(&cmd))? {
                Reply::Csv(csv) => print!("{csv}"),
                Reply::FleetUsage(u) if format == Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&*u)?)
                }
                Reply::FleetUsage(u) => print!("{}", fleet_table(&u)),
                other => anyhow::bail!("unexpected reply {other:?}"),
            }
            Ok(())
        }
        Cmd::Mcp => {
            let client = Client::with_tls(&cli.url, token(&cli)?.trim(), tls.as_ref())?;
            runtime()?.block_on(mcp_stdio(client))
        }
        _ => {
            let client = Client::with_tls(&cli.url, &token(&cli)?, tls.as_ref())?;
            let cmd = cli.command;
            match runtime()?.block_on(resource(&client, cmd))? {
                Output::Json(value) if value.is_null() => {}
                Output::Json(value) => println!("{}", serde_json::to_string_pretty(&value)?),
                Output::Text(text) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .context("writing to stdout")?;
                }
                Output::Exit(code) => std::process::exit(code),
            }
            Ok(())
        }
    }
}

/// The token of the CLI's requests: `--token` (`ATOLL_TOKEN`), else the operator token file.
fn token(cli: &Cli) -> Result<String> {
    match &cli.token {
        Some(t) => Ok(t.clone()),
        None => std::fs::read_to_string(&cli.token_file).with_context(|| {
            format!(
                "no --token or ATOLL_TOKEN, and reading {}",
                cli.token_file.display()
            )
        }),
    }
}

/// `atoll mcp`: MCP's stdio transport, one JSON-RPC message per line each way, answered in
/// order (see `atoll_api::mcp`). Ends when stdin does.
async fn mcp_stdio(client: Client) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let server = atoll_api::mcp::Server::new(client, env!("CARGO_PKG_VERSION"));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(reply) = server.handle(&line).await {
            let mut text = serde_json::to_string(&reply)?;
            text.push('\n');
            out.write_all(text.as_bytes())
                .await
                .context("writing stdout")?;
            out.flush().await.context("writing stdout")?;
        }
    }
    Ok(())
}

/// The CLI's trust in the API: a pinned fingerprint, a CA file, or the CA a control plane on
/// this host generated.
fn client_tls(cli: &Cli) -> Option<ClientTls> {
    let (trust, setting) = if let Some(fp) = &cli.ca_fingerprint {
        (
            Trust::Fingerprint(fp.clone()),
            format!("--ca-fingerprint (ATOLL_CA_FINGERPRINT) {fp}"),
        )
    } else if let Some(file) = &cli.ca_file {
        (
            Trust::CaFile(file.clone()),
            format!("--ca-file (ATOLL_CA_FILE) {}", file.display()),
        )
    } else {
        let local = PathBuf::from(DEFAULT_CA_FILE);
        if !local.exists() {
            return None;
        }
        (
            Trust::CaFile(local),
            format!("the local control plane's CA {DEFAULT_CA_FILE} (set --ca-file or --ca-fingerprint)"),
        )
    };
    Some(ClientTls {
        trust,
        setting,
        identity: None,
    })
}

/// Where a control plane with default settings keeps its generated CA.
const DEFAULT_CA_FILE: &str = "/var/lib/atoll/tls/ca.pem";

async fn serve(cfg: ControlConfig) -> Result<()> {
    let tls = cfg.server_tls()?;
    let core = cfg.start().await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let (scheme, about) = ControlConfig::describe_tls(&tls);
    tracing::info!(
        "control plane API on {scheme}://{}{about}",
        listener.local_addr()?
    );
    // `[metrics]`: on a listener of its own, until the API server stops. Its failure is logged
    // and does not stop the API (Prometheus's `up` shows it).
    let metrics = if cfg.metrics.enabled {
        let l = tokio::net::TcpListener::bind(cfg.metrics.listen)
            .await
            .with_context(|| format!("metrics.listen: listening on {}", cfg.metrics.listen))?;
        let path = atoll_control::metrics::PATH;
        tracing::info!("control plane metrics on http://{}{path}", l.local_addr()?);
        let serve = atoll_control::metrics::serve(l, Some(core.clone()), std::future::pending());
        Some(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("the metrics listener stopped: {e}");
            }
        }))
    } else {
        None
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    api::serve_tls(
        core,
        listener,
        cfg.api.limits(),
        tls.map(|t| t.config),
        shutdown,
    )
    .await?;
    if let Some(m) = metrics {
        m.abort();
    }
    Ok(())
}

type Json = serde_json::Value;

/// What a resource command prints.
enum Output {
    /// Pretty-printed; nothing for `null` (204).
    Json(Json),
    /// Written as is.
    Text(String),
    /// Already written; the process exits with this code (an exec's).
    Exit(i32),
}

/// The user data in `path` (`-`: stdin), checked against the API's limit before sending.
fn read_user_data(path: &Path) -> Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("--user-data-file: reading stdin (UTF-8)")?;
    } else {
        text = std::fs::read_to_string(path)
            .with_context(|| format!("--user-data-file: reading {} (UTF-8)", path.display()))?;
    }
    if text.len() > MAX_USER_DATA_BYTES {
        anyhow::bail!(
            "--user-data-file: {} bytes, the API accepts at most {MAX_USER_DATA_BYTES}",
            text.len()
        );
    }
    Ok(text)
}

/// The API command a CLI command stands for, sent along the route table by the typed client.
async fn resource(c: &Client, cmd: Cmd) -> Result<Output> {
    let cmd = match cmd {
        Cmd::Cloud(CloudCmd::Create {
            name,
            cidr,
            quotas,
            ttl,
        }) => {
            let mut body = serde_json::json!({});
            if let Some(t) = ttl {
                body["ttl_secs"] = t.into();
            }
            if let Some(n) = name {
                body["name"] = n.into();
            }
            if let Some(c) = cidr {
                body["cidr"] = c.into();
            }
            if let Some(q) = quotas {
                body["quotas"] = serde_json::from_str(&q).context("--quotas is not JSON")?;
            }
            Command::CreateCloud {
                spec: serde_json::from_value(body).context("--cidr or --quotas")?,
            }
        }
        Cmd::Cloud(CloudCmd::List { after, limit }) => Command::ListClouds { after, limit },
        // Exactly one of the three (clap's group); `--never` sends neither time.
        Cmd::Cloud(CloudCmd::Expire {
            cloud,
            ttl,
            at,
            never: _,
        }) => Command::SetCloudExpiry {
            cloud,
            expiry: atoll_api::model::CloudExpiry {
                ttl_secs: ttl,
                expires_at: at,
            },
        },
        Cmd::Cloud(CloudCmd::Get { cloud }) => Command::GetCloud { cloud },
        Cmd::Cloud(CloudCmd::Delete { cloud }) => Command::DeleteCloud { cloud },
        Cmd::Cloud(CloudCmd::Token { cloud }) => Command::RotateCloudToken { cloud },
        Cmd::Cloud(CloudCmd::Budget {
            cloud, lift: true, ..
        }) => Command::LiftBudget { cloud },
        Cmd::Cloud(CloudCmd::Budget {
            cloud,
            amount,
            warn_percent,
            ..
        }) => Command::SetBudget {
            cloud,
            budget: Budget {
                amount: amount.unwrap_or_default(),
                warn_percent,
            },
        },
        Cmd::Cloud(CloudCmd::Usage { cloud, from, to }) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let to = to.unwrap_or(now + 1);
            Command::GetUsage {
                cloud,
                from: from.unwrap_or(to.saturating_sub(3600)),
                to,
            }
        }
        Cmd::Vm(VmCmd::Create {
            cloud,
            name,
            vcpus,
            memory_mib,
            kernel,
            image,
            volumes,
            user_data_file,
            stopped,
            anti_affinity,
            idle_timeout,
        }) => Command::CreateVm {
            cloud,
            spec: CreateVm {
                name,
                vcpus,
                memory_mib,
                kernel,
                image,
                volumes,
                user_data: user_data_file.as_deref().map(read_user_data).transpose()?,
                start: !stopped,
                anti_affinity,
                idle_timeout_secs: idle_timeout
                    .map(|t| u32::try_from(t).context("--idle-timeout is too long"))
                    .transpose()?,
            },
        },
        Cmd::Vm(VmCmd::List { cloud }) => Command::ListVms { cloud },
        Cmd::Vm(VmCmd::Get { cloud, name }) => Command::GetVm { cloud, vm: name },
        Cmd::Vm(VmCmd::Delete { cloud, name }) => Command::DeleteVm { cloud, vm: name },
        Cmd::Vm(VmCmd::Start { cloud, name }) => Command::StartVm { cloud, vm: name },
        Cmd::Vm(VmCmd::Stop { cloud, name }) => Command::StopVm { cloud, vm: name },
        Cmd::Vm(VmCmd::Console { cloud, name }) => {
            let console: Console = c.run(&Command::GetConsole { cloud, vm: name }).await?;
            return Ok(Output::Text(console.text));
        }
        Cmd::Vm(VmCmd::Exec {
            cloud,
            name,
            env,
            cwd,
            timeout,
            max_output_bytes,
            argv,
        }) => {
            let mut spec = atoll_api::model::ExecVm::argv(argv);
            spec.env = env.into_iter().collect();
            spec.cwd = cwd;
            spec.timeout_secs = timeout.map(|t| t.min(u32::MAX as u64) as u32);
            spec.max_output_bytes = max_output_bytes;
            spec.stdin_stream = !std::io::IsTerminal::is_terminal(&std::io::stdin());
            return exec(
                c,
                Command::ExecVm {
                    cloud,
                    vm: name,
                    spec,
                },
            )
            .await;
        }
        Cmd::Vm(VmCmd::Cp {
            cloud,
            src,
            dst,
            mode,
            uid,
            gid,
        }) => {
            copy(c, cloud, &src, &dst, (mode, uid, gid)).await?;
            return Ok(Output::Json(Json::Null));
        }
        Cmd::Volume(VolumeCmd::Create {
            cloud,
            name,
            size_gib,
            format,
        }) => Command::CreateVolume {
            cloud,
            spec: CreateVolume {
                name,
                size_gib,
                format: match format {
                    CliFormat::Raw => VolumeFormat::Raw,
                    CliFormat::Qcow2 => VolumeFormat::Qcow2,
                },
            },
        },
        Cmd::Volume(VolumeCmd::List { cloud }) => Command::ListVolumes { cloud },
        Cmd::Volume(VolumeCmd::Get { cloud, name }) => Command::GetVolume {
            cloud,
            volume: name,
        },
        Cmd::Volume(VolumeCmd::Delete { cloud, name }) => Command::DeleteVolume {
            cloud,
            volume: name,
        },
        Cmd::Volume(VolumeCmd::Attach { cloud, name, vm }) => Command::AttachVolume {
            cloud,
            volume: name,
            spec: AttachVolume { vm },
        },
        Cmd::Volume(VolumeCmd::Detach { cloud, name }) => Command::DetachVolume {
            cloud,
            volume: name,
        },
        Cmd::Dns(DnsCmd::List { cloud }) => Command::ListRecordSets { cloud },
        Cmd::Dns(DnsCmd::Set {
            cloud,
            name,
            rtype,
            values,
            ttl,
        }) => Command::PutRecordSet {
            cloud,
            name,
            rtype,
            spec: PutRecordSet { ttl, values },
        },
        Cmd::Dns(DnsCmd::Delete { cloud, name, rtype }) => {
            Command::DeleteRecordSet { cloud, name, rtype }
        }
        Cmd::Exposure(ExposureCmd::Create {
            cloud,
            name,
            protocol,
            port,
            backends,
        }) => {
            let backends = backends
                .iter()
                .map(|b| {
                    let (vm, port) = b.split_once(':').context("--backend must be vm:port")?;
                    Ok(Backend {
                        vm: vm.to_string(),
                        port: port.parse().context("--backend port")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Command::CreateExposure {
                cloud,
                spec: CreateExposure {
                    name,
                    protocol: match protocol {
                        CliProtocol::Tcp => Protocol::Tcp,
                        CliProtocol::Udp => Protocol::Udp,
                    },
                    port,
                    backends,
                },
            }
        }
        Cmd::Exposure(ExposureCmd::List { cloud }) => Command::ListExposures { cloud },
        Cmd::Exposure(ExposureCmd::Get { cloud, name }) => Command::GetExposure {
            cloud,
            exposure: name,
        },
        Cmd::Exposure(ExposureCmd::Delete { cloud, name }) => Command::DeleteExposure {
            cloud,
            exposure: name,
        },
        Cmd::Exposure(ExposureCmd::Grant {
            cloud,
            name,
            consumer,
        }) => Command::CreateGrant {
            cloud,
            exposure: name,
            spec: CreateGrant { consumer },
        },
        Cmd::Exposure(ExposureCmd::Grants { cloud, name }) => Command::ListGrants {
            cloud,
            exposure: name,
        },
        Cmd::Exposure(ExposureCmd::Offers { cloud, name }) => Command::ListExposureOffers {
            cloud,
            exposure: name,
        },
        Cmd::Exposure(ExposureCmd::Revoke {
            cloud,
            name,
            consumer,
        }) => Command::RevokeGrant {
            cloud,
            exposure: name,
            consumer,
        },
        Cmd::Import(ImportCmd::List { cloud }) => Command::ListImports { cloud },
        Cmd::Import(ImportCmd::Delete {
            cloud,
            provider,
            exposure,
        }) => Command::DeleteImport {
            cloud,
            provider,
            exposure,
        },
        Cmd::Offer(OfferCmd::List { cloud }) => Command::ListOffers { cloud },
        Cmd::Offer(OfferCmd::Accept {
            cloud,
            provider,
            exposure,
        }) => Command::AcceptOffer {
            cloud,
            provider,
            exposure,
        },
        Cmd::Offer(OfferCmd::Decline {
            cloud,
            provider,
            exposure,
        }) => Command::DeclineOffer {
            cloud,
            provider,
            exposure,
        },
        Cmd::Offer(OfferCmd::Policy { cloud }) => Command::GetOfferPolicy { cloud },
        Cmd::Egress(EgressCmd::Show { cloud }) => Command::GetEgressPolicy { cloud },
        Cmd::Egress(EgressCmd::Address { cloud }) => Command::GetEgressAddress { cloud },
        Cmd::Egress(EgressCmd::Denied { cloud }) => Command::ListDenied { cloud },
        Cmd::Publication(PublicationCmd::Add {
            cloud,
            vm,
            port,
            protocol,
            allow_from,
        }) => Command::Publish {
            cloud,
            spec: Publish {
                vm,
                protocol: match protocol {
                    CliProtocol::Tcp => Protocol::Tcp,
                    CliProtocol::Udp => Protocol::Udp,
                },
                port,
                allow_from,
            },
        },
        Cmd::Publication(PublicationCmd::List { cloud }) => Command::ListPublications { cloud },
        Cmd::Publication(PublicationCmd::Remove { cloud, name }) => Command::Unpublish {
            cloud,
            publication: name,
        },
        Cmd::Egress(EgressCmd::Assign { cloud, address }) => Command::AssignEgressAddress {
            cloud,
            spec: AssignEgressAddress { address },
        },
        Cmd::Egress(EgressCmd::Release { cloud }) => Command::ReleaseEgressAddress { cloud },
        Cmd::Egress(EgressCmd::Set {
            cloud,
            mode,
            allow,
            deny,
            rate,
            budget,
        }) => Command::PutEgressPolicy {
            cloud,
            policy: EgressPolicy {
                mode: match mode {
                    CliEgressMode::Deny => EgressMode::Deny,
                    CliEgressMode::Allow => EgressMode::Allow,
                    CliEgressMode::Allowlist => EgressMode::Allowlist,
                },
                allow,
                deny,
                limits: EgressLimits {
                    rate_bytes_per_sec: rate,
                    budget,
                },
            },
        },
        Cmd::Offer(OfferCmd::AcceptFrom { cloud, providers }) => Command::PutOfferPolicy {
            cloud,
            policy: OfferPolicy {
                accept_from: providers,
            },
        },
        Cmd::Host(HostCmd::List) => Command::ListHosts,
        Cmd::Host(HostCmd::Token { name }) => Command::IssueHostToken { host: name },
        Cmd::Host(HostCmd::Cordon { name }) => Command::CordonHost {
            host: name,
            cordoned: true,
        },
        Cmd::Host(HostCmd::Uncordon { name }) => Command::CordonHost {
            host: name,
            cordoned: false,
        },
        Cmd::Serve { .. }
        | Cmd::Openapi
        | Cmd::Completions { .. }
        | Cmd::Usage { .. }
        | Cmd::Mcp => {
            unreachable!("handled before connecting")
        }
    };
    let reply = c.execute(&cmd).await?;
    Ok(Output::Json(match reply.to_json() {
        Some(json) => serde_json::from_slice(&json)?,
        None => Json::Null,
    }))
}

/// A record type, as the API spells it (case-insensitive).
fn parse_rtype(s: &str) -> Result<RecordType, String> {
    let params = std::collections::HashMap::from([("type".to_string(), s.to_string())]);
    atoll_api::routes::record_type(&params).map_err(|e| e.message)
}

/// A duration in seconds: a number of seconds, or a number with `s`, `m`, `h` or `d`.
/// `NAME=value` (`--env`).
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected NAME=value")),
    }
}

/// An octal mode (`644`, `0755`).
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?}: expected an octal mode, at most 7777"))
}

/// Streams the CLI's stdin to the exec `id` of `cmd`'s VM until it ends.
fn stream_stdin(c: &Client, cmd: &Command, id: String) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncReadExt;
    let Command::ExecVm { cloud, vm, .. } = cmd else {
        anyhow::bail!("not an exec");
    };
    let target = Command::WriteExecStdin {
        cloud: *cloud,
        vm: vm.clone(),
        exec: id,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match stdin.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf.into())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let c = c.clone();
    Ok(tokio::spawn(async move {
        if let Err(e) = c.exec_stdin(&target, rx).await {
            eprintln!("atoll: sending stdin: {e}");
        }
    }))
}

/// Runs an exec, writing its output as it comes; its exit code is the CLI's.
async fn exec(c: &Client, cmd: Command) -> Result<Output> {
    use atoll_api::model::ExecEvent;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut events = c.exec(&cmd).await?;
    let mut code = 125;
    let mut feeding = None;
    let work = async {
        while let Some(e) = events.next().await {
            match e? {
                ExecEvent::Started { exec_id, .. } => {
                    if let Some(id) = exec_id {
                        feeding = Some(stream_stdin(c, &cmd, id)?);
                    }
                }
                ExecEvent::Stdout { data } => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b64.decode(data)?)?;
                    out.flush()?;
                }
                ExecEvent::Stderr { data } => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&b64.decode(data)?)?;
                    err.flush()?;
                }
                ExecEvent::Truncated { stream, limit } => {
                    eprintln!("atoll: {stream} truncated at {limit} bytes (--max-output-bytes)");
                }
                ExecEvent::Exit {
                    code: c,
                    signal,
                    timed_out,
                } => {
                    code = match (c, signal, timed_out) {
                        (_, _, true) => {
                            eprintln!("atoll: the command timed out and was killed");
                            124
                        }
                        (Some(c), _, _) => c,
                        (None, Some(s), _) => 128 + s,
                        (None, None, _) => 125,
                    };
                }
                ExecEvent::Error { message } => {
                    eprintln!("atoll: exec failed: {message}");
                    code = 125;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        r = work => r?,
        // Dropping the stream closes the connection: the command is killed.
        _ = tokio::signal::ctrl_c() => code = 130,
    }
    if let Some(f) = feeding {
        f.abort();
    }
    Ok(Output::Exit(code))
}

/// `atoll vm cp`: one side is `<vm>:<path>`, the other local (`-`: stdin or stdout).
async fn copy(
    c: &Client,
    cloud: CloudId,
    src: &str,
    dst: &str,
    (mode, uid, gid): (Option<u32>, Option<u32>, Option<u32>),
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let remote = |s: &str| {
        s.split_once(':')
            .filter(|(vm, path)| !vm.is_empty() && !vm.contains('/') && path.starts_with('/'))
            .map(|(vm, path)| (vm.to_string(), path.to_string()))
    };
    match (remote(src), remote(dst)) {
        (Some((vm, path)), None) => {
            let cmd = Command::ReadFile {
                cloud,
                vm,
                spec: atoll_api::model::FileSpec {
                    path,
                    mode: None,
                    uid: None,
                    gid: None,
                },
            };
            let mut d = c.download(&cmd).await?;
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if dst == "-" {
                Box::new(tokio::io::stdout())
            } else {
                Box::new(
                    tokio::fs::File::create(dst)
                        .await
                        .with_context(|| format!("creating {dst}"))?,
                )
            };
            let mut got = 0u64;
            while let Some(chunk) = d.chunk().await {
                let chunk = chunk?;
                got += chunk.len() as u64;
                out.write_all(&chunk).await.context("writing")?;
            }
            out.flush().await?;
            if got != d.size {
                anyhow::bail!("the download ended after {got} of {} bytes", d.size);
            }
            Ok(())
        }
        (None, Some((vm, path))) => {
            let (length, mut input): (u64, Box<dyn tokio::io::AsyncRead + Unpin + Send>) =
                if src == "-" {
                    // A length is needed up front: stdin is read whole (within the limit).
                    let mut data = Vec::new();
                    tokio::io::stdin()
                        .take(atoll_api::model::MAX_FILE_BYTES + 1)
                        .read_to_end(&mut data)
                        .await?;
                    (data.len() as u64, Box::new(std::io::Cursor::new(data)))
                } else {
                    let f = tokio::fs::File::open(src)
                        .await
                        .with_context(|| format!("opening {src}"))?;
                    (f.metadata().await?.len(), Box::new(f))
                };
            let cmd = Command::WriteFile {
                cloud,
                vm,
                spec: atoll_api::model::FileSpec {
                    path,
                    mode,
                    uid,
                    gid,
                },
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let reader = tokio::spawn(async move {
                let mut left = length;
                while left > 0 {
                    let mut buf = vec![0u8; (left.min(256 * 1024)) as usize];
                    let n = match input.read(&mut buf).await {
                        Ok(0) => {
                            let _ = tx
                                .send(Err(std::io::Error::other("the file shrank while read")))
                                .await;
                            return;
                        }
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    buf.truncate(n);
                    left -= n as u64;
                    if tx.send(Ok(buf.into())).await.is_err() {
                        return;
                    }
                }
            });
            let r = c.upload(&cmd, length, rx).await;
            reader.abort();
            Ok(r?)
        }
        _ => anyhow::bail!(
            "give one side as <vm>:<absolute path> and the other as a local path (or -)"
        ),
    }
}

fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        other => return Err(format!("unknown unit {other:?}: use s, m, h or d")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds, or a number with s, m, h or d"))?;
    n.checked_mul(scale)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} must be positive and not overflow"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_secs;

    #[test]
    fn durations_parse_with_units_and_refuse_the_rest() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("15m"), Ok(900));
        assert_eq!(parse_duration_secs("2h"), Ok(7200));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        for bad in [
            "",
            "h",
            "0",
            "0h",
            "-1",
            "1w",
            "1.5h",
            "99999999999999999999d",
            "1 h",
        ] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?}");
        }
    }
}
