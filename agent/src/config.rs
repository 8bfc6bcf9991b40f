//! Agent configuration (TOML). Unknown keys are errors, so a typo never silently falls back to
//! a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::types::MacAddr;

/// Default bpffs directory for atoll's pins.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/atoll";

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub dataplane: DataplaneConfig,
    pub metrics: MetricsConfig,
    pub usage: UsageConfig,
}

/// Usage records (see the `usage` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Journal usage records while `atoll-agent run` runs and when endpoints are deleted.
    pub enabled: bool,
    /// Directory of the durable journal and the sinks' cursors.
    pub journal_dir: PathBuf,
    /// Seconds between records of each endpoint (1 to 86400).
    pub interval_secs: u64,
    /// CloudEvents `source`; default `atoll/agent/<hostname>`.
    pub source: Option<String>,
    /// Append delivered records to this JSON-lines file.
    pub file_sink: Option<PathBuf>,
    /// POST delivered records to this `http://host[:port]/path` URL.
    pub http_sink: Option<String>,
    /// Timeout of one HTTP delivery, seconds (1 to 300).
    pub http_timeout_secs: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            journal_dir: PathBuf::from("/var/lib/atoll/usage"),
            interval_secs: 60,
            source: None,
            file_sink: None,
            http_sink: None,
            http_timeout_secs: 5,
        }
    }
}

impl UsageConfig {
    /// The CloudEvents source: configured, or `atoll/agent/<hostname>`.
    pub fn source(&self) -> String {
        self.source.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("atoll/agent/{}", host.trim())
        })
    }
}

/// Dataplane sizing and identity.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Directory on a bpffs under which atoll pins programs, maps and links.
    pub bpffs_root: PathBuf,
    /// Capacity of the endpoint map (endpoints on this host). Fixed when the maps are first
    /// created; changing it later needs a migration.
    pub max_endpoints: u32,
    /// Capacity of the route map (addresses reachable in all clouds on this host).
    pub max_routes: u32,
    /// The MAC address guests see for their gateway.
    pub gateway_mac: MacAddr,
    /// Spare taps kept created and attached, so a tap endpoint is created without waiting for
    /// the kernel's RCU grace periods (see `endpoint` module docs). 0 disables the pool.
    pub tap_pool: u32,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            max_endpoints: 65536,
            max_routes: 65536,
            gateway_mac: MacAddr([0x02, 0xa7, 0x00, 0x00, 0x00, 0x01]),
            tap_pool: 8,
        }
    }
}

/// Default address of the metrics endpoint (`GET /metrics`): loopback only.
pub const DEFAULT_METRICS_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9469),
);

/// The OpenMetrics / Prometheus endpoint (see the `metrics` module).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve metrics while `atoll-agent run` runs.
    pub enabled: bool,
    /// Address and port to listen on, e.g. `"127.0.0.1:9469"` or `"[::1]:9469"`.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })?;
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        };
        let d = &cfg.dataplane;
        if d.max_endpoints == 0 || d.max_routes == 0 {
            return Err(invalid(
                "dataplane.max_endpoints and dataplane.max_routes must be > 0",
            ));
        }
        if !d.gateway_mac.is_valid_unicast() {
            return Err(invalid(
                "dataplane.gateway_mac must be a unicast, non-zero MAC",
            ));
        }
        if !d.bpffs_root.is_absolute() {
            return Err(invalid("dataplane.bpffs_root must be an absolute path"));
        }
        let m = &cfg.metrics;
        if m.listen.port() == 0 {
            return Err(invalid(
                "metrics.listen needs a fixed port (0 would pick a random one)",
            ));
        }
        if m.listen.ip().is_multicast() {
            return Err(invalid("metrics.listen must be a unicast address"));
        }
        let u = &cfg.usage;
        if !(1..=86_400).contains(&u.interval_secs) {
            return Err(invalid("usage.interval_secs must be between 1 and 86400"));
        }
        if !(1..=300).contains(&u.http_timeout_secs) {
            return Err(invalid("usage.http_timeout_secs must be between 1 and 300"));
        }
        if !u.journal_dir.is_absolute() || u.file_sink.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(invalid(
                "usage.journal_dir and usage.file_sink must be absolute paths",
            ));
        }
        if let Some(url) = &u.http_sink {
            crate::usage::HttpSink::new(url, std::time::Duration::from_secs(1))
                .map_err(|e| invalid(&format!("usage.http_sink: {e}")))?;
        }
        if u.source.as_ref().is_some_and(|s| s.trim().is_empty()) {
            return Err(invalid("usage.source must not be empty"));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let p = Path::new("t.toml");
        assert_eq!(AgentConfig::parse("", p).unwrap(), AgentConfig::default());
        let c = AgentConfig::parse("[dataplane]\nmax_endpoints = 10\n", p).unwrap();
        assert_eq!(c.dataplane.max_endpoints, 10);
    }

    #[test]
    fn usage_section_is_validated() {
        let p = Path::new("t.toml");
        let c = AgentConfig::parse(
            "[usage]\ninterval_secs = 5\nfile_sink = \"/tmp/u.jsonl\"\nhttp_sink = \"http://127.0.0.1:9/u\"\n",
            p,
        )
        .unwrap();
        assert_eq!(c.usage.interval_secs, 5);
        for bad in [
            "[usage]\ninterval_secs = 0\n",
            "[usage]\nhttp_timeout_secs = 0\n",
            "[usage]\njournal_dir = \"rel\"\n",
            "[usage]\nhttp_sink = \"https://x/\"\n",
            "[usage]\nsource = \" \"\n",
            "[usage]\nintervall = 3\n",
        ] {
            assert!(AgentConfig::parse(bad, p).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let p = Path::new("t.toml");
        let e = AgentConfig::parse("[dataplane]\nmax_endpoint = 10\n", p).unwrap_err();
        assert!(e.to_string().contains("max_endpoint"), "{e}");
        assert!(AgentConfig::parse("[dataplan]\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_routes = 0\n", p).is_err());
        assert!(
            AgentConfig::parse("[dataplane]\ngateway_mac = \"ff:ff:ff:ff:ff:ff\"\n", p).is_err()
        );
        assert!(AgentConfig::parse("[dataplane]\ngateway_mac = \"nope\"\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nbpffs_root = \"rel\"\n", p).is_err());
        assert!(AgentConfig::parse("[dataplane]\nmax_routes = -1\n", p).is_err());
    }

    #[test]
    fn metrics_defaults_and_overrides() {
        let p = Path::new("t.toml");
        let d = AgentConfig::parse("", p).unwrap().metrics;
        assert!(d.enabled);
        assert_eq!(d.listen, "127.0.0.1:9469".parse().unwrap());
        let c = AgentConfig::parse("[metrics]\nlisten = \"[::1]:9100\"\n", p).unwrap();
        assert_eq!(c.metrics.listen, "[::1]:9100".parse().unwrap());
        assert!(c.metrics.enabled, "unset keys keep their defaults");
        let c = AgentConfig::parse("[metrics]\nenabled = false\n", p).unwrap();
        assert!(!c.metrics.enabled);
        assert_eq!(c.metrics.listen, DEFAULT_METRICS_LISTEN);
    }

    #[test]
    fn metrics_rejects_unknown_keys_and_bad_values() {
        let p = Path::new("t.toml");
        let e = AgentConfig::parse("[metrics]\nlisten_addr = \"127.0.0.1:1\"\n", p).unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        for bad in [
            "listen = \"127.0.0.1\"",
            "listen = \"localhost:9469\"",
            "listen = \"127.0.0.1:65536\"",
            "listen = \"::1:9469\"",
            "listen = 9469",
            "listen = \"127.0.0.1:0\"",
            "listen = \"224.0.0.1:9469\"",
            "enabled = \"yes\"",
        ] {
            let text = format!("[metrics]\n{bad}\n");
            assert!(AgentConfig::parse(&text, p).is_err(), "accepted {bad}");
        }
        let e = AgentConfig::parse("[metrics]\nlisten = \"127.0.0.1:0\"\n", p).unwrap_err();
        assert!(e.to_string().contains("metrics.listen"), "{e}");
    }
}
