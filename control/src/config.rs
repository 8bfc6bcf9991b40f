//! The control plane's configuration (TOML). Unknown keys are errors.
//!
//! The same table is read by `atoll serve` (a control plane on its own) and, as `[control]`'s
//! settings, by `atoll-agent run` when the control plane runs inside the agent (the single-host
//! default).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use crate::{
    core::{
        new_operator_token, token_hash, Core, CoreConfig, CoreError, MAX_DNS_SUFFIX_LEN,
        MIN_STORE_TXN_OPS,
    },
    model::{validate_label, EgressMode, Ipv4Net, Quotas},
    store::{
        etcd::{EtcdStore, DEFAULT_MAX_TXN_OPS},
        sqlite::{SqliteOptions, SqliteStore},
        Store, StoreError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("operator token file {path}: {source}")]
    OperatorToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the store: {0}")]
    OpenStore(#[source] StoreError),
    #[error("starting the control plane: {0}")]
    StartCore(#[source] CoreError),
}

/// `store.backend`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite, embedded (the default; one control plane).
    Sqlite,
    /// etcd (several control planes and hosts).
    Etcd,
}

impl std::fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Etcd => "etcd",
        })
    }
}

/// `[store]`: where the control plane keeps its state.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, the default) or `etcd` (several hosts).
    pub backend: StoreBackend,
    /// SQLite database file.
    pub path: PathBuf,
    /// fsync every commit (survives power loss, slower); by default a commit survives a crash
    /// of the process but not of the machine.
    pub synchronous_full: bool,
    /// Store events kept for watchers (SQLite).
    pub history: u64,
    /// etcd client URLs, tried in order.
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every key in etcd.
    pub etcd_prefix: String,
    /// The etcd cluster's `--max-txn-ops` (etcd's default is 128): the most compares or
    /// operations one transaction may hold. The control plane plans its transactions within it
    /// (a delete revokes many grants in several transactions); it must not be higher than
    /// etcd's setting. At least 16.
    pub etcd_max_txn_ops: usize,
    /// CA certificate(s) that sign the etcd servers' certificates (needed for `https://`
    /// endpoints).
    pub etcd_ca_file: Option<PathBuf>,
    /// This control plane's client certificate and key, for etcd's `--client-cert-auth`.
    pub etcd_cert_file: Option<PathBuf>,
    pub etcd_key_file: Option<PathBuf>,
    /// etcd's own authentication, when the cluster has it enabled: the user, and a file
    /// holding its password (keep it 0600; the password is never in this file).
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
}

impl StoreConfig {
    /// etcd's authentication, with the password read from its file.
    pub fn etcd_auth(&self) -> Result<Option<crate::store::etcd::EtcdAuth>, ConfigError> {
        let Some(user) = &self.etcd_user else {
            return Ok(None);
        };
        let path = self
            .etcd_password_file
            .as_ref()
            .ok_or(ConfigError::Invalid {
                key: "store.etcd_password_file",
                message: "store.etcd_user needs its password in store.etcd_password_file".into(),
            })?;
        let password = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Some(crate::store::etcd::EtcdAuth {
            user: user.clone(),
            password: password.trim_end_matches(['\n', '\r']).to_string(),
        }))
    }

    /// TLS towards etcd, when a CA is configured.
    pub fn etcd_tls(&self) -> Option<crate::tls::ClientTls> {
        let ca = self.etcd_ca_file.clone()?;
        Some(crate::tls::ClientTls {
            setting: format!("store.etcd_ca_file = {}", ca.display()),
            trust: crate::tls::Trust::CaFile(ca),
            identity: self.etcd_cert_file.clone().zip(self.etcd_key_file.clone()),
        })
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Sqlite,
            path: PathBuf::from("/var/lib/atoll/control.db"),
            synchronous_full: false,
            history: 100_000,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: "/atoll/".into(),
            etcd_max_txn_ops: DEFAULT_MAX_TXN_OPS,
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_user: None,
            etcd_password_file: None,
        }
    }
}

/// `[clouds]`: defaults and limits of clouds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudsConfig {
    /// Range of a cloud created without one.
    pub default_cidr: String,
    pub default_quotas: Quotas,
    /// The egress mode a new cloud starts with (`deny`, `allow` or `allowlist` with no
    /// rules); each cloud changes its own through the API.
    pub default_egress: EgressMode,
    /// Addresses the operator may give clouds as their own egress address (IPv4 prefixes;
    /// a prefix's network and broadcast addresses are not given below /31). They must be
    /// routed to the hosts; see docs/operations.md.
    pub egress_pool: Vec<Ipv4Net>,
    /// Addresses where clouds publish VM ports on the internet (`atoll publish`), each port
    /// number once per address and protocol. They must be routed to the hosts; see
    /// docs/operations.md.
    pub ingress_pool: Vec<Ipv4Net>,
    /// Suffix of every cloud's zone: `<vm>.<cloud>.<suffix>`.
    pub dns_suffix: String,
    pub max_exposures_per_cloud: u32,
    /// Published ports of one cloud (`atoll publish`): one cloud cannot take a popular port
    /// at every address of `ingress_pool`, nor fill its hosts' `INGRESS` maps.
    pub max_publications_per_cloud: u32,
    /// Grants and pending offers of one exposure.
    pub max_grants_per_exposure: u32,
    /// Pending offers to one cloud id, from all providers; more are refused (`offer_refused`).
    pub max_pending_offers_per_cloud: u32,
    /// Pending offers to one cloud id from one provider, so that one provider cannot fill a
    /// consumer's offers alone.
    pub max_pending_offers_per_provider: u32,
    /// NAT addresses one grant takes from its provider's range: one per host running the
    /// consumer's VMs, so a consumer spreading over the fleet cannot use up the provider's
    /// addresses. A consumer host beyond it does not get the service (logged).
    pub max_nat_addresses_per_grant: u32,
}

impl Default for CloudsConfig {
    fn default() -> Self {
        CloudsConfig {
            default_cidr: "10.0.0.0/16".into(),
            default_quotas: Quotas::default(),
            default_egress: EgressMode::Deny,
            egress_pool: Vec::new(),
            ingress_pool: Vec::new(),
            dns_suffix: "atoll.internal".into(),
            max_exposures_per_cloud: 1_000,
            max_publications_per_cloud: 64,
            max_grants_per_exposure: 10_000,
            max_pending_offers_per_cloud: 64,
            max_pending_offers_per_provider: 16,
            max_nat_addresses_per_grant: 32,
        }
    }
}

/// `[api]`: the API server's limits (see `api::server`): timeouts and the connection cap
/// that keep it serving ordinary clients while others hold connections open or trickle bytes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// A request's headers must be complete this long after the server starts waiting for
    /// them (a new connection, or the previous response sent); also closes idle keep-alive
    /// connections. At least 1.
    pub header_read_timeout_secs: u64,
    /// A request's body must be complete this long after the handler starts reading it (after
    /// authorization), else 408. At least 1.
    pub request_timeout_secs: u64,
    /// A connection that moves no byte for this long while no request is being handled is
    /// closed (a client that stopped reading its response). At least 1.
    pub idle_timeout_secs: u64,
    /// Connections open at once; further clients wait in the listen backlog until one closes.
    /// At least 1.
    pub max_connections: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        let d = crate::api::Limits::default();
        ApiConfig {
            header_read_timeout_secs: d.header_read_timeout.as_secs(),
            request_timeout_secs: d.request_timeout.as_secs(),
            idle_timeout_secs: d.idle_timeout.as_secs(),
            max_connections: d.max_connections,
        }
    }
}

impl ApiConfig {
    /// The server's limits.
    pub fn limits(&self) -> crate::api::Limits {
        crate::api::Limits {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            max_connections: self.max_connections,
        }
    }
}

/// Host liveness (see `core`: hosts heartbeat through their syncs).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HostsConfig {
    /// A host not heard from (sync, registration) for this long is not live: no new VM or
    /// volume is placed on it. At least [`crate::core::MIN_HOST_TIMEOUT_SECS`].
    pub timeout_secs: u64,
}

impl Default for HostsConfig {
    fn default() -> Self {
        HostsConfig { timeout_secs: 120 }
    }
}

/// Usage kept by the control plane.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Raw usage records (the audit trail, and what redeliveries are found by) are deleted
    /// once their window ended this many days ago, and records that old are refused: a host
    /// that delivers later than this (down for longer, its journal kept) would otherwise be
    /// counted twice. The hourly rollups (what costs are computed from) are kept. At least 2.
    pub record_retention_days: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            record_retention_days: 35,
        }
    }
}

/// Whether the API speaks TLS.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// HTTPS (the default).
    On,
    /// Plain HTTP: only with a loopback listen address.
    Off,
}

/// `[tls]`: the API's HTTPS (see [`crate::tls`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub mode: TlsMode,
    /// Certificate chain (PEM) and key of the API; both or neither. Without them a CA and a
    /// server certificate are generated in `dir` on first start.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Where the generated identity lives (`ca.pem` is what clients trust).
    pub dir: PathBuf,
    /// Names and addresses the generated certificate carries besides `localhost`, 127.0.0.1,
    /// ::1, the host name and the listen address (those clients use to reach the API).
    pub names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: TlsMode::On,
            cert_file: None,
            key_file: None,
            dir: PathBuf::from("/var/lib/atoll/tls"),
            names: Vec::new(),
        }
    }
}

/// The API's TLS as started: the configuration, and for a generated identity its CA.
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The generated CA's file and fingerprint, and whether it was made on this start.
    pub generated: Option<(PathBuf, String, bool)>,
}

/// The control plane's whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Address the API listens on.
    pub listen: SocketAddr,
    pub api: ApiConfig,
    /// File holding the operator token (created with a new random token, mode 0600, if
    /// missing). The store only ever sees its hash.
    pub operator_token_file: PathBuf,
    pub store: StoreConfig,
    pub clouds: CloudsConfig,
    pub hosts: HostsConfig,
    pub tls: TlsConfig,
    /// The price list: what a cloud's usage costs.
    pub prices: crate::usage::Prices,
    pub usage: UsageConfig,
    pub billing: BillingConfig,
    /// The Prometheus endpoint (`crate::metrics`), off by default.
    pub metrics: MetricsConfig,
}

/// `[metrics]`: `GET /metrics` (Prometheus text format, no token) on a listener of its own,
/// never the API's. `atoll serve` starts it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// Address and port, e.g. `"127.0.0.1:9481"`; unauthenticated, so keep it on loopback or
    /// firewall it.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: crate::metrics::DEFAULT_LISTEN,
        }
    }
}

/// Who bills, as FOCUS exports name it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// FOCUS `BillingAccountId`/`BillingAccountName` and `InvoiceIssuerName`: the operator's
    /// account that the clouds' charges are billed to.
    pub account: String,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            account: "atoll".into(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: "127.0.0.1:7480".parse().expect("valid address"),
            api: ApiConfig::default(),
            operator_token_file: PathBuf::from("/etc/atoll/operator.token"),
            store: StoreConfig::default(),
            clouds: CloudsConfig::default(),
            hosts: HostsConfig::default(),
            tls: TlsConfig::default(),
            prices: crate::usage::Prices::default(),
            usage: UsageConfig::default(),
            billing: BillingConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl ControlConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg: ControlConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if let Err(m) = self.prices.validate() {
            return invalid("prices", m);
        }
        if !(2..=36_500).contains(&self.usage.record_retention_days) {
            return invalid(
                "usage.record_retention_days",
                "2 to 36500 (longer than any host stays away with undelivered usage)".into(),
            );
        }
        if self.billing.account.is_empty()
            || self.billing.account.len() > 100
            || self.billing.account.chars().any(char::is_control)
        {
            return invalid(
                "billing.account",
                "1-100 characters, no control characters".into(),
            );
        }
        if self.metrics.enabled {
            let m = self.metrics.listen;
            if m.port() == 0 {
                return invalid(
                    "metrics.listen",
                    "needs a fixed port (0 would pick a random one)".into(),
                );
            }
            if m.ip().is_multicast() {
                return invalid("metrics.listen", format!("{m} is not a unicast address"));
            }
            if m.port() == self.listen.port()
                && (m.ip() == self.listen.ip()
                    || m.ip().is_unspecified()
                    || self.listen.ip().is_unspecified())
            {
                return invalid(
                    "metrics.listen",
                    format!(
                        "{m} overlaps the API's listen address {}: metrics need a port of their own",
                        self.listen
                    ),
                );
            }
        }
        if self.tls.mode == TlsMode::Off && !self.listen.ip().is_loopback() {
            return invalid(
                "tls.mode",
                format!(
                    "\"off\" needs a loopback listen address, not {}: tokens must not cross a network in clear text",
                    self.listen
                ),
            );
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return invalid(
                "tls.cert_file",
                "set tls.cert_file and tls.key_file together".into(),
            );
        }
        if self.store.etcd_cert_file.is_some() != self.store.etcd_key_file.is_some() {
            return invalid(
                "store.etcd_cert_file",
                "set store.etcd_cert_file and store.etcd_key_file together".into(),
            );
        }
        if self.store.etcd_cert_file.is_some() && self.store.etcd_ca_file.is_none() {
            return invalid(
                "store.etcd_ca_file",
                "a client certificate needs the cluster's CA (store.etcd_ca_file)".into(),
            );
        }
        if self.store.backend == StoreBackend::Etcd && self.store.etcd_endpoints.is_empty() {
            return invalid("store.etcd_endpoints", "needs at least one URL".into());
        }
        if self.store.etcd_max_txn_ops < MIN_STORE_TXN_OPS {
            return invalid(
                "store.etcd_max_txn_ops",
                format!(
                    "{} is too small: the control plane's largest fixed-size transaction needs \
                     {MIN_STORE_TXN_OPS}",
                    self.store.etcd_max_txn_ops
                ),
            );
        }
        for (key, v) in [
            (
                "api.header_read_timeout_secs",
                self.api.header_read_timeout_secs,
            ),
            ("api.request_timeout_secs", self.api.request_timeout_secs),
            ("api.idle_timeout_secs", self.api.idle_timeout_secs),
            ("api.max_connections", self.api.max_connections as u64),
            (
                "clouds.max_nat_addresses_per_grant",
                u64::from(self.clouds.max_nat_addresses_per_grant),
            ),
        ] {
            if v == 0 {
                return invalid(key, "must be at least 1".into());
            }
        }
        if self.hosts.timeout_secs < crate::core::MIN_HOST_TIMEOUT_SECS {
            return invalid(
                "hosts.timeout_secs",
                format!(
                    "{} is too small: a healthy host may be silent for up to {} s (its longest \
                     sync wait plus the heartbeat interval)",
                    self.hosts.timeout_secs,
                    crate::core::MIN_HOST_TIMEOUT_SECS
                ),
            );
        }
        if let Err(e) = self.clouds.default_cidr.parse::<Ipv4Net>() {
            return invalid("clouds.default_cidr", e);
        }
        let suffix = self.clouds.dns_suffix.trim_end_matches('.');
        if suffix.len() > MAX_DNS_SUFFIX_LEN {
            return invalid(
                "clouds.dns_suffix",
                format!(
                    "{} characters; at most {MAX_DNS_SUFFIX_LEN}, so that every name atoll \
                     derives (<exposure>.<provider>.svc.<cloud>.<suffix>) fits DNS's {} \
                     characters",
                    suffix.len(),
                    crate::core::MAX_DNS_NAME_LEN
                ),
            );
        }
        for label in suffix.split('.') {
            if validate_label("dns_suffix", label).is_err() {
                return invalid(
                    "clouds.dns_suffix",
                    format!("{:?} is not a domain name", self.clouds.dns_suffix),
                );
            }
        }
        Ok(())
    }

    /// The API's TLS, or `None` for plain HTTP (`tls.mode = "off"`, loopback only). Without
    /// configured files the generated identity in `tls.dir` is used, made on first start.
    pub fn server_tls(&self) -> Result<Option<ServerTls>, ConfigError> {
        if self.tls.mode == TlsMode::Off {
            return Ok(None);
        }
        let tls_err = |key, e: crate::tls::TlsError| ConfigError::Invalid {
            key,
            message: e.to_string(),
        };
        let (cert, key, generated) = match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone(), None),
            _ => {
                let mut names = vec![
                    "localhost".to_string(),
                    "127.0.0.1".to_string(),
                    "::1".to_string(),
                ];
                if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
                    let h = h.trim();
                    if !h.is_empty() {
                        names.push(h.to_string());
                    }
                }
                if !self.listen.ip().is_unspecified() {
                    names.push(self.listen.ip().to_string());
                }
                names.extend(self.tls.names.iter().cloned());
                names.dedup();
                let (paths, fp, created) = crate::tls::ensure_generated(&self.tls.dir, &names)
                    .map_err(|e| tls_err("tls.dir", e))?;
                (
                    paths.cert_file,
                    paths.key_file,
                    Some((paths.ca_file, fp, created)),
                )
            }
        };
        let config =
            crate::tls::server_config(&cert, &key).map_err(|e| tls_err("tls.cert_file", e))?;
        Ok(Some(ServerTls { config, generated }))
    }

    /// The API's TLS as a line for the log: the URL scheme, and for a generated identity the CA
    /// file and fingerprint clients pin.
    pub fn describe_tls(tls: &Option<ServerTls>) -> (&'static str, String) {
        match tls {
            None => ("http", " (plain HTTP: tls.mode = \"off\", loopback only)".into()),
            Some(ServerTls {
                generated: Some((ca, fp, created)),
                ..
            }) => (
                "https",
                format!(
                    " ({} CA {}, SHA-256 fingerprint {fp}: clients use --ca-file or --ca-fingerprint)",
                    if *created { "generated a new" } else { "generated" },
                    ca.display()
                ),
            ),
            Some(_) => ("https", " (certificate from tls.cert_file)".into()),
        }
    }

    /// Reads the operator token, creating the file with a new token if it does not exist.
    pub fn operator_token(&self) -> Result<String, ConfigError> {
        let path = &self.operator_token_file;
        let err = |source| ConfigError::OperatorToken {
            path: path.clone(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(t.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                if let Some(dir) = path.parent() {
                    crate::private::create_dir_all(dir, 0o700).map_err(err)?;
                }
                let token =
                    new_operator_token().map_err(|e| err(std::io::Error::other(e.to_string())))?;
                let mut f = crate::private::file_options()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(err)?;
                f.write_all(format!("{token}\n").as_bytes()).map_err(err)?;
                f.sync_all().map_err(err)?;
                Ok(token)
            }
            Err(e) => Err(err(e)),
        }
    }

    /// Opens the configured store.
    pub async fn open_store(&self) -> Result<Store, ConfigError> {
        match self.store.backend {
            StoreBackend::Etcd => Ok(Store::Etcd(
                EtcdStore::connect_with(
                    self.store.etcd_endpoints.clone(),
                    self.store.etcd_prefix.clone(),
                    self.store.etcd_tls().as_ref(),
                    self.store.etcd_auth()?,
                )
                .await
                .map_err(ConfigError::OpenStore)?
                .with_max_txn_ops(self.store.etcd_max_txn_ops),
            )),
            StoreBackend::Sqlite => {
                if let Some(dir) = self.store.path.parent() {
                    crate::private::create_dir_all(dir, 0o700).map_err(|source| {
                        ConfigError::Read {
                            path: dir.into(),
                            source,
                        }
                    })?;
                }
                let opts = SqliteOptions {
                    synchronous_full: self.store.synchronous_full,
                    history: self.store.history,
                };
                Ok(Store::Sqlite(
                    SqliteStore::open(&self.store.path, opts).map_err(ConfigError::OpenStore)?,
                ))
            }
        }
    }

    /// Opens the store and starts the core.
    pub async fn start(&self) -> Result<Arc<Core>, ConfigError> {
        let token = self.operator_token()?;
        let store = self.open_store().await?;
        let cfg = CoreConfig {
            default_cidr: self.clouds.default_cidr.parse().map_err(|message| {
                ConfigError::Invalid {
                    key: "clouds.default_cidr",
                    message,
                }
            })?,
            default_quotas: self.clouds.default_quotas,
            default_egress: self.clouds.default_egress,
            egress_pool: self.clouds.egress_pool.clone(),
            ingress_pool: self.clouds.ingress_pool.clone(),
            dns_suffix: self.clouds.dns_suffix.trim_end_matches('.').to_string(),
            max_exposures_per_cloud: self.clouds.max_exposures_per_cloud,
            max_publications_per_cloud: self.clouds.max_publications_per_cloud,
            max_grants_per_exposure: self.clouds.max_grants_per_exposure,
            max_pending_offers_per_cloud: self.clouds.max_pending_offers_per_cloud,
            max_pending_offers_per_provider: self.clouds.max_pending_offers_per_provider,
            max_nat_addresses_per_grant: self.clouds.max_nat_addresses_per_grant,
            operator_token_sha256: token_hash(&token),
            host_timeout_secs: self.hosts.timeout_secs,
            prices: self.prices.clone(),
            usage_retention_secs: self.usage.record_retention_days * 86_400,
            billing_account: self.billing.account.clone(),
        };
        Core::start(store, cfg)
            .await
            .map_err(ConfigError::StartCore)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ControlConfig, String> {
        let cfg: ControlConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// The config `cargo xtask install` ships for atoll-control.service is valid.
    #[test]
    fn shipped_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/control.toml");
        let cfg = parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(cfg.listen.port(), 7480);
        assert!(cfg
            .operator_token_file
            .starts_with("/var/lib/atoll-control"));
        assert!(cfg.store.path.starts_with("/var/lib/atoll-control"));
    }

    /// New clouds' egress mode is a typed setting: `deny` unless configured.
    #[test]
    fn default_egress_is_a_mode() {
        assert_eq!(parse("").unwrap().clouds.default_egress, EgressMode::Deny);
        let cfg = parse("[clouds]\ndefault_egress = \"allowlist\"\n").unwrap();
        assert_eq!(cfg.clouds.default_egress, EgressMode::Allowlist);
        let cfg = parse("[clouds]\negress_pool = [\"203.0.113.0/28\"]\n").unwrap();
        assert_eq!(
            cfg.clouds.egress_pool,
            vec!["203.0.113.0/28".parse().unwrap()]
        );
        let e = parse("[clouds]\negress_pool = [\"203.0.113.1/28\"]\n").unwrap_err();
        assert!(e.contains("egress_pool") && e.contains("host bits"), "{e}");
        let e = parse("[clouds]\ndefault_egress = \"open\"\n").unwrap_err();
        assert!(
            e.contains("default_egress") && e.contains("`deny`, `allow`, `allowlist`"),
            "{e}"
        );
    }

    /// A suffix so long that the names atoll derives under it would not fit DNS is refused.
    #[test]
    fn dns_suffix_leaves_room_for_every_derived_name() {
        let label = |n: usize| "a".repeat(n);
        let fits = format!("{}.{}", label(28), label(28));
        assert_eq!(fits.len(), MAX_DNS_SUFFIX_LEN);
        let cfg = parse(&format!("[clouds]\ndns_suffix = \"{fits}.\"\n")).unwrap();
        assert_eq!(cfg.clouds.dns_suffix, format!("{fits}."));
        let e = parse(&format!("[clouds]\ndns_suffix = \"{fits}a\"\n")).unwrap_err();
        assert!(
            e.starts_with("clouds.dns_suffix: 58 characters; at most 57"),
            "{e}"
        );
    }

    #[test]
    fn api_limits_default_and_are_validated() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.api.limits(), crate::api::Limits::default());
        let cfg = parse(
            "[api]\nheader_read_timeout_secs = 2\nrequest_timeout_secs = 3\n\
             idle_timeout_secs = 4\nmax_connections = 5\n",
        )
        .unwrap();
        let l = cfg.api.limits();
        assert_eq!(
            (
                l.header_read_timeout,
                l.request_timeout,
                l.idle_timeout,
                l.max_connections
            ),
            (
                Duration::from_secs(2),
                Duration::from_secs(3),
                Duration::from_secs(4),
                5
            )
        );
        let e = parse("[api]\nmax_connections = 0\n").unwrap_err();
        assert_eq!(e, "api.max_connections: must be at least 1");
        let e = parse("[api]\nheader_read_timeout_secs = 0\n").unwrap_err();
        assert!(e.starts_with("api.header_read_timeout_secs"), "{e}");
        assert!(
            parse("[api]\nheader_timeout_secs = 1\n").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn the_store_backend_is_one_of_its_words() {
        assert_eq!(parse("").unwrap().store.backend, StoreBackend::Sqlite);
        let cfg =
            parse("[store]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n");
        assert_eq!(cfg.unwrap().store.backend, StoreBackend::Etcd);
        let e = parse("[store]\nbackend = \"mysql\"\n").unwrap_err();
        assert!(
            e.contains("backend") && e.contains("mysql") && e.contains("`sqlite` or `etcd`"),
            "{e}"
        );
    }

    #[test]
    fn host_timeout_has_a_floor() {
        assert_eq!(parse("").unwrap().hosts.timeout_secs, 120);
        let floor = crate::core::MIN_HOST_TIMEOUT_SECS;
        let cfg = parse(&format!("[hosts]\ntimeout_secs = {floor}\n")).unwrap();
        assert_eq!(cfg.hosts.timeout_secs, floor);
        let e = parse(&format!("[hosts]\ntimeout_secs = {}\n", floor - 1)).unwrap_err();
        assert!(e.starts_with("hosts.timeout_secs: "), "{e}");
        assert!(
            parse("[hosts]\ntimeout = 100\n").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn etcd_max_txn_ops_defaults_to_etcds_default_and_is_validated() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.store.etcd_max_txn_ops, 128);
        let cfg = parse("[store]\nbackend = \"etcd\"\netcd_max_txn_ops = 1024\n").unwrap();
        assert_eq!(cfg.store.etcd_max_txn_ops, 1024);
        assert_eq!(
            parse("[store]\netcd_max_txn_ops = 16\n")
                .unwrap()
                .store
                .etcd_max_txn_ops,
            MIN_STORE_TXN_OPS
        );
        let e = parse("[store]\netcd_max_txn_ops = 15\n").unwrap_err();
        assert!(
            e.starts_with("store.etcd_max_txn_ops: 15 is too small"),
            "{e}"
        );
        for bad in [
            "[store]\netcd_max_txn_ops = -1\n",
            "[store]\netcd_max_txn_ops = \"128\"\n",
            "[store]\netcd_max_txn_op = 128\n",
            "etcd_max_txn_ops = 128\n",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("too small"), "{bad:?} parsed: {e}");
        }
    }

    #[test]
    fn metrics_listener_is_off_by_default_and_validated() {
        let cfg = parse("").unwrap();
        assert!(!cfg.metrics.enabled);
        assert_eq!(cfg.metrics.listen, "127.0.0.1:9481".parse().unwrap());
        let cfg = parse("[metrics]\nenabled = true\n").unwrap();
        assert!(cfg.metrics.enabled);
        assert_eq!(cfg.metrics.listen, crate::metrics::DEFAULT_LISTEN);
        let cfg = parse("[metrics]\nenabled = true\nlisten = \"[::1]:9100\"\n").unwrap();
        assert_eq!(cfg.metrics.listen, "[::1]:9100".parse().unwrap());
        // Off: the address is not checked.
        parse("[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let e = parse("[metrics]\nenabled = true\nport = 1\n").unwrap_err();
        assert!(e.contains("port"), "{e}");
        for (bad, why) in [
            ("listen = \"127.0.0.1:0\"", "fixed port"),
            ("listen = \"224.0.0.1:9481\"", "unicast"),
            ("listen = \"127.0.0.1:7480\"", "overlaps"),
            ("listen = \"0.0.0.0:7480\"", "overlaps"),
            ("listen = \"localhost:9481\"", "invalid socket address"),
            ("listen = 9481", "invalid type"),
        ] {
            let e = parse(&format!("[metrics]\nenabled = true\n{bad}\n")).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // The commented example of the shipped config, uncommented, is valid.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/control.toml");
        let shipped = std::fs::read_to_string(path).unwrap();
        let example: String = shipped
            .lines()
            .skip_while(|l| l.trim() != "# [metrics]")
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        assert!(
            example.starts_with("[metrics]\n"),
            "deploy/control.toml: {example}"
        );
        let cfg = parse(&example).unwrap();
        assert!(cfg.metrics.enabled);
    }
}
