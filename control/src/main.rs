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
use atoll_control::{
    api,
    client::Client,
    config::ControlConfig,
    model::*,
    tls::{ClientTls, Trust},
    usage::{focus_csv, parse_rfc3339, report, table, Prices},
};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use hyper::Method;

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
    /// Registered hosts (operator).
    #[command(subcommand)]
    Host(HostCmd),
    /// Print the OpenAPI document.
    Openapi,
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Usage and cost per cloud for a period, from usage record files (CloudEvents JSON lines).
    Usage {
        /// Usage record files (the agent's file sink or journal); duplicates are ignored.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Price file (TOML): currency and per-GB prices per direction and class.
        #[arg(long)]
        prices: PathBuf,
        /// Start of the period (inclusive), RFC 3339 UTC.
        #[arg(long, default_value = "1970-01-01T00:00:00Z")]
        from: String,
        /// End of the period (exclusive), RFC 3339 UTC.
        #[arg(long, default_value = "9999-12-31T23:59:59Z")]
        to: String,
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
    },
    List {
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    Get {
        cloud: String,
    },
    Delete {
        cloud: String,
    },
    /// Issue the cloud a new token (the cloud's own token or the operator's). The old token
    /// stops working at once; the new one is printed once.
    Token {
        cloud: String,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    Create {
        cloud: String,
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
    },
    List {
        cloud: String,
    },
    /// A VM with its status.
    Get {
        cloud: String,
        name: String,
    },
    Delete {
        cloud: String,
        name: String,
    },
    /// Boot a stopped VM (a no-op if it runs).
    Start {
        cloud: String,
        name: String,
    },
    /// Shut a VM down; its address, name and volumes stay (a no-op if it is stopped).
    Stop {
        cloud: String,
        name: String,
    },
    /// Print the tail of a VM's serial console (the text itself, not JSON).
    Console {
        cloud: String,
        name: String,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        cloud: String,
        name: String,
        #[arg(long)]
        size_gib: u64,
        #[arg(long, value_enum, default_value = "raw")]
        format: CliFormat,
    },
    List {
        cloud: String,
    },
    Get {
        cloud: String,
        name: String,
    },
    Delete {
        cloud: String,
        name: String,
    },
    Attach {
        cloud: String,
        name: String,
        vm: String,
    },
    Detach {
        cloud: String,
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
        cloud: String,
    },
    /// Create or replace a record set.
    Set {
        cloud: String,
        name: String,
        /// A, AAAA, CNAME or TXT.
        rtype: String,
        #[arg(required = true)]
        values: Vec<String>,
        #[arg(long, default_value_t = 60)]
        ttl: u32,
    },
    Delete {
        cloud: String,
        name: String,
        rtype: String,
    },
}

#[derive(Subcommand)]
enum ExposureCmd {
    Create {
        cloud: String,
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
        cloud: String,
    },
    Get {
        cloud: String,
        name: String,
    },
    Delete {
        cloud: String,
        name: String,
    },
    /// Offer an exposure to a consumer cloud; it becomes a grant when the consumer accepts
    /// (at once if the consumer's offer policy lists this cloud).
    Grant {
        cloud: String,
        name: String,
        consumer: String,
    },
    /// Active grants of an exposure.
    Grants {
        cloud: String,
        name: String,
    },
    /// Pending offers of an exposure.
    Offers {
        cloud: String,
        name: String,
    },
    /// Revoke a grant, or withdraw a pending offer.
    Revoke {
        cloud: String,
        name: String,
        consumer: String,
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
        cloud: String,
    },
    /// Give up a grant.
    Delete {
        cloud: String,
        provider: String,
        exposure: String,
    },
}

#[derive(Subcommand)]
enum OfferCmd {
    /// Pending offers made to the cloud.
    List { cloud: String },
    /// Accept an offer: a VIP and a name in the cloud, the grant active.
    Accept {
        cloud: String,
        provider: String,
        exposure: String,
    },
    /// Decline an offer.
    Decline {
        cloud: String,
        provider: String,
        exposure: String,
    },
    /// Show the providers whose offers the cloud accepts without being asked.
    Policy { cloud: String },
    /// Set the providers whose later offers the cloud accepts without being asked (none:
    /// every offer waits for `offer accept`).
    AcceptFrom {
        cloud: String,
        providers: Vec<String>,
    },
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

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    /// FinOps FOCUS-style CSV.
    Focus,
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
            println!("{}", serde_json::to_string_pretty(&api::openapi())?);
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
        } => {
            let prices = Prices::load(&prices)?;
            let r = report(&files, &prices, parse_rfc3339(&from)?, parse_rfc3339(&to)?)?;
            print!(
                "{}",
                match format {
                    Format::Table => table(&r),
                    Format::Focus => focus_csv(&r),
                }
            );
            Ok(())
        }
        cmd => {
            let token = match cli.token {
                Some(t) => t,
                None => std::fs::read_to_string(&cli.token_file).with_context(|| {
                    format!(
                        "no --token or ATOLL_TOKEN, and reading {}",
                        cli.token_file.display()
                    )
                })?,
            };
            let client = Client::with_tls(&cli.url, &token, tls.as_ref())?;
            match runtime()?.block_on(resource(&client, cmd))? {
                Output::Json(value) if value.is_null() => {}
                Output::Json(value) => println!("{}", serde_json::to_string_pretty(&value)?),
                Output::Text(text) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .context("writing to stdout")?;
                }
            }
            Ok(())
        }
    }
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
    Ok(())
}

type Json = serde_json::Value;

/// What a resource command prints.
enum Output {
    /// Pretty-printed; nothing for `null` (204).
    Json(Json),
    /// Written as is.
    Text(String),
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

async fn resource(c: &Client, cmd: Cmd) -> Result<Output> {
    let none: Option<&Json> = None;
    let get = |path: String| async move { c.call::<Json, Json>(Method::GET, &path, None).await };
    let del = |path: String| async move { c.call::<Json, Json>(Method::DELETE, &path, None).await };
    let post = |path: String| async move { c.call::<Json, Json>(Method::POST, &path, None).await };
    Ok(Output::Json(match cmd {
        Cmd::Cloud(CloudCmd::Create { name, cidr, quotas }) => {
            let mut body = serde_json::json!({});
            if let Some(n) = name {
                body["name"] = n.into();
            }
            if let Some(c) = cidr {
                body["cidr"] = c.into();
            }
            if let Some(q) = quotas {
                body["quotas"] = serde_json::from_str(&q).context("--quotas is not JSON")?;
            }
            c.call(Method::POST, "/v1/clouds", Some(&body)).await?
        }
        Cmd::Cloud(CloudCmd::List { after, limit }) => {
            let after = after.map(|a| format!("&after={a}")).unwrap_or_default();
            get(format!("/v1/clouds?limit={limit}{after}")).await?
        }
        Cmd::Cloud(CloudCmd::Get { cloud }) => get(format!("/v1/clouds/{cloud}")).await?,
        Cmd::Cloud(CloudCmd::Delete { cloud }) => del(format!("/v1/clouds/{cloud}")).await?,
        Cmd::Cloud(CloudCmd::Token { cloud }) => post(format!("/v1/clouds/{cloud}/token")).await?,
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
        }) => {
            let body = CreateVm {
                name,
                vcpus,
                memory_mib,
                kernel,
                image,
                volumes,
                user_data: user_data_file.as_deref().map(read_user_data).transpose()?,
                start: !stopped,
            };
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/vms"),
                Some(&body),
            )
            .await?
        }
        Cmd::Vm(VmCmd::List { cloud }) => get(format!("/v1/clouds/{cloud}/vms")).await?,
        Cmd::Vm(VmCmd::Get { cloud, name }) => {
            get(format!("/v1/clouds/{cloud}/vms/{name}")).await?
        }
        Cmd::Vm(VmCmd::Delete { cloud, name }) => {
            del(format!("/v1/clouds/{cloud}/vms/{name}")).await?
        }
        Cmd::Vm(VmCmd::Start { cloud, name }) => {
            post(format!("/v1/clouds/{cloud}/vms/{name}/start")).await?
        }
        Cmd::Vm(VmCmd::Stop { cloud, name }) => {
            post(format!("/v1/clouds/{cloud}/vms/{name}/stop")).await?
        }
        Cmd::Vm(VmCmd::Console { cloud, name }) => {
            let console: Console = c
                .call(
                    Method::GET,
                    &format!("/v1/clouds/{cloud}/vms/{name}/console"),
                    none,
                )
                .await?;
            return Ok(Output::Text(console.text));
        }
        Cmd::Volume(VolumeCmd::Create {
            cloud,
            name,
            size_gib,
            format,
        }) => {
            let body = CreateVolume {
                name,
                size_gib,
                format: match format {
                    CliFormat::Raw => VolumeFormat::Raw,
                    CliFormat::Qcow2 => VolumeFormat::Qcow2,
                },
            };
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/volumes"),
                Some(&body),
            )
            .await?
        }
        Cmd::Volume(VolumeCmd::List { cloud }) => {
            get(format!("/v1/clouds/{cloud}/volumes")).await?
        }
        Cmd::Volume(VolumeCmd::Get { cloud, name }) => {
            get(format!("/v1/clouds/{cloud}/volumes/{name}")).await?
        }
        Cmd::Volume(VolumeCmd::Delete { cloud, name }) => {
            del(format!("/v1/clouds/{cloud}/volumes/{name}")).await?
        }
        Cmd::Volume(VolumeCmd::Attach { cloud, name, vm }) => {
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/volumes/{name}/attach"),
                Some(&AttachVolume { vm }),
            )
            .await?
        }
        Cmd::Volume(VolumeCmd::Detach { cloud, name }) => {
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/volumes/{name}/detach"),
                none,
            )
            .await?
        }
        Cmd::Dns(DnsCmd::List { cloud }) => get(format!("/v1/clouds/{cloud}/dns")).await?,
        Cmd::Dns(DnsCmd::Set {
            cloud,
            name,
            rtype,
            values,
            ttl,
        }) => {
            c.call(
                Method::PUT,
                &format!("/v1/clouds/{cloud}/dns/{name}/{rtype}"),
                Some(&PutRecordSet { ttl, values }),
            )
            .await?
        }
        Cmd::Dns(DnsCmd::Delete { cloud, name, rtype }) => {
            del(format!("/v1/clouds/{cloud}/dns/{name}/{rtype}")).await?
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
            let body = CreateExposure {
                name,
                protocol: match protocol {
                    CliProtocol::Tcp => Protocol::Tcp,
                    CliProtocol::Udp => Protocol::Udp,
                },
                port,
                backends,
            };
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/exposures"),
                Some(&body),
            )
            .await?
        }
        Cmd::Exposure(ExposureCmd::List { cloud }) => {
            get(format!("/v1/clouds/{cloud}/exposures")).await?
        }
        Cmd::Exposure(ExposureCmd::Get { cloud, name }) => {
            get(format!("/v1/clouds/{cloud}/exposures/{name}")).await?
        }
        Cmd::Exposure(ExposureCmd::Delete { cloud, name }) => {
            del(format!("/v1/clouds/{cloud}/exposures/{name}")).await?
        }
        Cmd::Exposure(ExposureCmd::Grant {
            cloud,
            name,
            consumer,
        }) => {
            let body = serde_json::json!({ "consumer": consumer });
            c.call(
                Method::POST,
                &format!("/v1/clouds/{cloud}/exposures/{name}/grants"),
                Some(&body),
            )
            .await?
        }
        Cmd::Exposure(ExposureCmd::Grants { cloud, name }) => {
            get(format!("/v1/clouds/{cloud}/exposures/{name}/grants")).await?
        }
        Cmd::Exposure(ExposureCmd::Offers { cloud, name }) => {
            get(format!("/v1/clouds/{cloud}/exposures/{name}/offers")).await?
        }
        Cmd::Exposure(ExposureCmd::Revoke {
            cloud,
            name,
            consumer,
        }) => {
            del(format!(
                "/v1/clouds/{cloud}/exposures/{name}/grants/{consumer}"
            ))
            .await?
        }
        Cmd::Import(ImportCmd::List { cloud }) => {
            get(format!("/v1/clouds/{cloud}/imports")).await?
        }
        Cmd::Import(ImportCmd::Delete {
            cloud,
            provider,
            exposure,
        }) => del(format!("/v1/clouds/{cloud}/imports/{provider}/{exposure}")).await?,
        Cmd::Offer(OfferCmd::List { cloud }) => get(format!("/v1/clouds/{cloud}/offers")).await?,
        Cmd::Offer(OfferCmd::Accept {
            cloud,
            provider,
            exposure,
        }) => {
            post(format!(
                "/v1/clouds/{cloud}/offers/{provider}/{exposure}/accept"
            ))
            .await?
        }
        Cmd::Offer(OfferCmd::Decline {
            cloud,
            provider,
            exposure,
        }) => del(format!("/v1/clouds/{cloud}/offers/{provider}/{exposure}")).await?,
        Cmd::Offer(OfferCmd::Policy { cloud }) => {
            get(format!("/v1/clouds/{cloud}/offer-policy")).await?
        }
        Cmd::Offer(OfferCmd::AcceptFrom { cloud, providers }) => {
            c.call(
                Method::PUT,
                &format!("/v1/clouds/{cloud}/offer-policy"),
                Some(&serde_json::json!({ "accept_from": providers })),
            )
            .await?
        }
        Cmd::Host(HostCmd::List) => get("/v1/hosts".into()).await?,
        Cmd::Host(HostCmd::Token { name }) => post(format!("/v1/hosts/{name}/token")).await?,
        Cmd::Host(HostCmd::Cordon { name }) => post(format!("/v1/hosts/{name}/cordon")).await?,
        Cmd::Host(HostCmd::Uncordon { name }) => post(format!("/v1/hosts/{name}/uncordon")).await?,
        Cmd::Serve { .. } | Cmd::Openapi | Cmd::Completions { .. } | Cmd::Usage { .. } => {
            unreachable!("handled before connecting")
        }
    }))
}
