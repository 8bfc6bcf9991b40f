//! `atoll usage`: usage and cost per cloud for a period, from the agent's usage records.
//!
//! Decisions:
//! - Input is what a billing system receives: CloudEvents JSON lines (the agent's file sink, or
//!   its journal). This module parses them with its own types, so it depends only on the
//!   published record schema, not on the agent's code.
//! - Records are deduplicated by CloudEvents `id` (delivery is at least once).
//! - A record belongs to the period containing its window's end (`[from, to)`); windows are one
//!   collection interval long, so this is exact at interval boundaries.
//! - Prices are per GB (10^9 bytes) per direction and traffic class; anything without a price
//!   costs 0. Costs are computed in micro-units from exact byte counts and rounded once.
//! - Input is untrusted: sums are checked (a total past `u64` is an error naming the cloud,
//!   direction and class, never a wrapped number), and every CSV field is quoted per RFC 4180
//!   when it holds a comma, quote or line break; a field that starts with `=`, `+`, `-`, `@`,
//!   tab or CR is prefixed with `'` so a spreadsheet never evaluates it (CSV injection).

use std::{
    collections::{BTreeMap, HashSet},
    io::BufRead,
    path::{Path, PathBuf},
};

use atoll_api::usage::{UsageEvent, EVENT_TYPE};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a usage record: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("reading price file {path}: {source}")]
    ReadPrices {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("price file {path}: {source}")]
    ParsePrices {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("price file {path}: {message}")]
    InvalidPrices { path: PathBuf, message: String },
    #[error("invalid time {0:?}: expected RFC 3339 UTC like 2026-11-01T00:00:00Z")]
    Time(String),
    #[error("summing usage of cloud {cloud} {direction}/{class}: {what} overflows")]
    Overflow {
        cloud: u32,
        direction: String,
        class: String,
        what: &'static str,
    },
}

/// The operator's price list (`[prices]` of the control plane's config, or a price file for
/// `atoll usage`). Unknown keys are rejected; anything without a price costs 0.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// ISO 4217 code, e.g. "USD".
    pub currency: String,
    /// Per vCPU-hour a VM's VMM runs.
    #[serde(default)]
    pub vcpu_hour: f64,
    /// Per GiB-hour of a running VM's memory.
    #[serde(default)]
    pub memory_gib_hour: f64,
    /// Per GiB-month (730 hours) a volume is provisioned.
    #[serde(default)]
    pub volume_gib_month: f64,
    /// Per GB (10^9 bytes) a guest sends, by traffic class.
    #[serde(default)]
    pub from_guest: ClassPrices,
    /// Per GB a guest receives, by traffic class.
    #[serde(default)]
    pub to_guest: ClassPrices,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            currency: "USD".into(),
            vcpu_hour: 0.0,
            memory_gib_hour: 0.0,
            volume_gib_month: 0.0,
            from_guest: ClassPrices::default(),
            to_guest: ClassPrices::default(),
        }
    }
}

/// Metered quantities (of a cloud, in an hour or a period).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Quantities {
    /// Records summed.
    #[serde(default)]
    pub records: u64,
    /// `"<direction>/<class>"` → `[packets, bytes]`.
    #[serde(default)]
    pub traffic: BTreeMap<String, [u64; 2]>,
    #[serde(default)]
    pub vcpu_ms: u64,
    #[serde(default)]
    pub memory_mib_ms: u64,
    #[serde(default)]
    pub volume_gib_ms: u64,
}

impl Quantities {
    /// Adds one record's window (saturating: a hostile host cannot wrap a sum).
    pub fn add_record(&mut self, d: &atoll_api::usage::UsageData) {
        self.records = self.records.saturating_add(1);
        for t in &d.usage.traffic {
            if t.packets == 0 && t.bytes == 0 {
                continue;
            }
            let e = self
                .traffic
                .entry(format!("{}/{}", t.direction, t.class))
                .or_default();
            e[0] = e[0].saturating_add(t.packets);
            e[1] = e[1].saturating_add(t.bytes);
        }
        self.vcpu_ms = self.vcpu_ms.saturating_add(d.usage.vcpu_ms);
        self.memory_mib_ms = self.memory_mib_ms.saturating_add(d.usage.memory_mib_ms);
        self.volume_gib_ms = self.volume_gib_ms.saturating_add(d.usage.volume_gib_ms);
    }

    pub fn add(&mut self, o: &Quantities) {
        self.records = self.records.saturating_add(o.records);
        for (k, v) in &o.traffic {
            let e = self.traffic.entry(k.clone()).or_default();
            e[0] = e[0].saturating_add(v[0]);
            e[1] = e[1].saturating_add(v[1]);
        }
        self.vcpu_ms = self.vcpu_ms.saturating_add(o.vcpu_ms);
        self.memory_mib_ms = self.memory_mib_ms.saturating_add(o.memory_mib_ms);
        self.volume_gib_ms = self.volume_gib_ms.saturating_add(o.volume_gib_ms);
    }

    /// Network totals per direction and class.
    pub fn traffic(&self) -> Vec<atoll_api::usage::Traffic> {
        self.traffic
            .iter()
            .filter_map(|(k, v)| {
                let (direction, class) = k.split_once('/')?;
                Some(atoll_api::usage::Traffic {
                    direction: direction.into(),
                    class: class.into(),
                    packets: v[0],
                    bytes: v[1],
                })
            })
            .collect()
    }
}

const HOUR_MS: u128 = 3_600_000;

/// `quantity × price / per`, in 10^-9 of the currency, rounded down; saturates (a price is
/// finite and not negative, validated).
fn cost_nanos(quantity: u64, price: f64, per: u128) -> u64 {
    let price_nanos = (price * 1e9).round() as u128;
    u64::try_from(u128::from(quantity).saturating_mul(price_nanos) / per).unwrap_or(u64::MAX)
}

/// Adds `items` to `into`, by SKU (quantities and costs summed; the pricing quantity follows).
pub fn merge_items(
    into: &mut Vec<atoll_api::model::UsageItem>,
    items: Vec<atoll_api::model::UsageItem>,
) {
    for i in items {
        match into.iter_mut().find(|x| x.sku == i.sku) {
            Some(x) => {
                x.quantity = x.quantity.saturating_add(i.quantity);
                x.pricing_quantity += i.pricing_quantity;
                x.cost_nanos = x.cost_nanos.saturating_add(i.cost_nanos);
                x.cost = atoll_api::model::nanos_decimal(x.cost_nanos);
            }
            None => into.push(i),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassPrices {
    #[serde(default)]
    pub intra_cloud: f64,
    #[serde(default)]
    pub exposure: f64,
    #[serde(default)]
    pub host: f64,
    #[serde(default)]
    pub external: f64,
    /// Between a cloud's endpoints on different hosts (the overlay).
    #[serde(default)]
    pub cross_host: f64,
}

impl Prices {
    pub fn load(path: &Path) -> Result<Self, UsageError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsageError::ReadPrices {
            path: path.into(),
            source,
        })?;
        let p: Prices = toml::from_str(&text).map_err(|source| UsageError::ParsePrices {
            path: path.into(),
            source,
        })?;
        p.validate().map_err(|message| UsageError::InvalidPrices {
            path: path.into(),
            message,
        })?;
        Ok(p)
    }

    /// The priced items of `q` (non-zero quantities only), compute and storage first, then
    /// network by direction and class.
    pub fn items(&self, q: &Quantities) -> Vec<atoll_api::model::UsageItem> {
        let item = |sku: String,
                    category: &str,
                    quantity: u64,
                    unit: &str,
                    per: u128,
                    pricing_unit: &str,
                    unit_price: f64| {
            let cost = cost_nanos(quantity, unit_price, per);
            atoll_api::model::UsageItem {
                sku,
                category: category.into(),
                quantity,
                unit: unit.into(),
                pricing_quantity: quantity as f64 / per as f64,
                pricing_unit: pricing_unit.into(),
                unit_price,
                cost_nanos: cost,
                cost: atoll_api::model::nanos_decimal(cost),
            }
        };
        let mut out = Vec::new();
        if q.vcpu_ms > 0 {
            out.push(item(
                "compute-vcpu".into(),
                "compute",
                q.vcpu_ms,
                "vcpu_ms",
                HOUR_MS,
                "vCPU-Hours",
                self.vcpu_hour,
            ));
        }
        if q.memory_mib_ms > 0 {
            out.push(item(
                "compute-memory".into(),
                "compute",
                q.memory_mib_ms,
                "mib_ms",
                HOUR_MS * 1024,
                "GiB-Hours",
                self.memory_gib_hour,
            ));
        }
        if q.volume_gib_ms > 0 {
            out.push(item(
                "storage-volume".into(),
                "storage",
                q.volume_gib_ms,
                "gib_ms",
                HOUR_MS * 730,
                "GiB-Months",
                self.volume_gib_month,
            ));
        }
        for (k, v) in &q.traffic {
            let Some((direction, class)) = k.split_once('/') else {
                continue;
            };
            if v[1] == 0 {
                continue;
            }
            out.push(item(
                format!("network-{direction}-{class}"),
                "network",
                v[1],
                "bytes",
                1_000_000_000,
                "GB",
                self.per_gb(direction, class),
            ));
        }
        out
    }

    /// Checks the currency and that every price is finite and not negative.
    pub fn validate(&self) -> Result<(), String> {
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("currency must be a three-letter ISO 4217 code such as \"USD\"".into());
        }
        let c = [&self.from_guest, &self.to_guest];
        let all = [self.vcpu_hour, self.memory_gib_hour, self.volume_gib_month]
            .into_iter()
            .chain(
                c.iter()
                    .flat_map(|c| [c.intra_cloud, c.exposure, c.host, c.external, c.cross_host]),
            );
        for v in all {
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                return Err("prices must be finite, not negative and at most 1000000".into());
            }
        }
        Ok(())
    }

    /// Price per GB of a direction and class; 0 for anything unpriced.
    pub fn per_gb(&self, direction: &str, class: &str) -> f64 {
        let c = match direction {
            "from_guest" => &self.from_guest,
            "to_guest" => &self.to_guest,
            _ => return 0.0,
        };
        match class {
            "intra_cloud" => c.intra_cloud,
            "exposure" => c.exposure,
            "host" => c.host,
            "external" => c.external,
            "cross_host" => c.cross_host,
            _ => 0.0,
        }
    }
}

/// One cloud's usage of one direction and class in the period.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub cloud: u32,
    pub direction: String,
    pub class: String,
    pub packets: u64,
    pub bytes: u64,
    pub unit_price: f64,
    pub cost: f64,
}

/// The report: lines sorted by cloud, direction, class; plus counts of what was read.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub from_ms: u64,
    pub to_ms: u64,
    pub currency: String,
    pub lines: Vec<Line>,
    pub records: usize,
    pub duplicates: usize,
}

impl Report {
    /// Total cost per cloud.
    pub fn cloud_totals(&self) -> BTreeMap<u32, f64> {
        let mut t = BTreeMap::new();
        for l in &self.lines {
            *t.entry(l.cloud).or_insert(0.0) += l.cost;
        }
        t
    }
}

/// Reads usage records from JSON-lines files and prices the period `[from_ms, to_ms)`.
pub fn report(
    files: &[PathBuf],
    prices: &Prices,
    from_ms: u64,
    to_ms: u64,
) -> Result<Report, UsageError> {
    let mut seen = HashSet::new();
    let mut sums: BTreeMap<(u32, String, String), (u64, u64)> = BTreeMap::new();
    let (mut records, mut duplicates) = (0, 0);
    for path in files {
        let f = std::fs::File::open(path).map_err(|source| UsageError::Read {
            path: path.clone(),
            source,
        })?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| UsageError::Read {
                path: path.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parse = |source| UsageError::Parse {
                path: path.clone(),
                line: i + 1,
                source,
            };
            // Other events may share a sink: skipped by type, before the schema is applied.
            let raw: serde_json::Value = serde_json::from_str(&line).map_err(parse)?;
            if raw.get("type").and_then(|t| t.as_str()) != Some(EVENT_TYPE) {
                continue;
            }
            let ev: UsageEvent = serde_json::from_value(raw).map_err(parse)?;
            if !seen.insert(ev.id) {
                duplicates += 1;
                continue;
            }
            records += 1;
            if ev.data.end_unix_ms < from_ms || ev.data.end_unix_ms >= to_ms {
                continue;
            }
            for t in ev.data.usage.traffic {
                let overflow = |what| UsageError::Overflow {
                    cloud: ev.data.cloud,
                    direction: t.direction.clone(),
                    class: t.class.clone(),
                    what,
                };
                let e = sums
                    .entry((ev.data.cloud, t.direction.clone(), t.class.clone()))
                    .or_insert((0, 0));
                e.0 =
                    e.0.checked_add(t.packets)
                        .ok_or_else(|| overflow("packets"))?;
                e.1 = e.1.checked_add(t.bytes).ok_or_else(|| overflow("bytes"))?;
            }
        }
    }
    let lines = sums
        .into_iter()
        .filter(|(_, (p, b))| *p > 0 || *b > 0)
        .map(|((cloud, direction, class), (packets, bytes))| {
            let unit_price = prices.per_gb(&direction, &class);
            // Exact bytes times micro-units per GB, rounded once. Prices are validated finite
            // and non-negative, so the cast saturates at worst; the product is checked.
            let micro = (bytes as u128)
                .checked_mul((unit_price * 1e6).round() as u128)
                .ok_or_else(|| UsageError::Overflow {
                    cloud,
                    direction: direction.clone(),
                    class: class.clone(),
                    what: "cost",
                })?
                / 1_000_000_000u128;
            Ok(Line {
                cloud,
                direction,
                class,
                packets,
                bytes,
                unit_price,
                cost: micro as f64 / 1e6,
            })
        })
        .collect::<Result<_, UsageError>>()?;
    Ok(Report {
        from_ms,
        to_ms,
        currency: prices.currency.clone(),
        lines,
        records,
        duplicates,
    })
}

/// A human-readable table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "usage {} .. {} ({} records, {} duplicates ignored)\n{:>6}  {:<10}  {:<11}  {:>12}  {:>16}  {:>10}  {:>12}\n",
        rfc3339(r.from_ms),
        rfc3339(r.to_ms),
        r.records,
        r.duplicates,
        "CLOUD",
        "DIRECTION",
        "CLASS",
        "PACKETS",
        "BYTES",
        "PER GB",
        "COST"
    );
    for l in &r.lines {
        out += &format!(
            "{:>6}  {:<10}  {:<11}  {:>12}  {:>16}  {:>10.4}  {:>12.6}\n",
            l.cloud, l.direction, l.class, l.packets, l.bytes, l.unit_price, l.cost
        );
    }
    for (cloud, cost) in r.cloud_totals() {
        out += &format!("{cloud:>6}  total{:>62.6} {}\n", cost, r.currency);
    }
    out
}

/// The control plane's fleet usage as a table: per cloud, each item and its cost.
pub fn fleet_table(u: &atoll_api::model::FleetUsage) -> String {
    let mut out = format!(
        "usage {} .. {} (complete to {})\n{:<10}  {:<28}  {:>20}  {:<10}  {:>10}  {:>16}\n",
        rfc3339(u.from * 1000),
        rfc3339(u.to * 1000),
        rfc3339(u.complete_to * 1000),
        "CLOUD",
        "SKU",
        "QUANTITY",
        "UNIT",
        "PRICE",
        "COST"
    );
    for c in &u.clouds {
        for i in &c.items {
            out += &format!(
                "{:<10}  {:<28}  {:>20.9}  {:<10}  {:>10.6}  {:>16}\n",
                c.cloud.to_string(),
                i.sku,
                i.pricing_quantity,
                i.pricing_unit,
                i.unit_price,
                i.cost
            );
        }
        out += &format!(
            "{:<10}  {:<74}  {:>16}\n",
            c.cloud.to_string(),
            "total",
            c.cost
        );
    }
    out += &format!(
        "{:<10}  {:<74}  {:>16} {}\n",
        "all", "total", u.cost, u.currency
    );
    out
}

/// FinOps FOCUS-style CSV (a subset of FOCUS 1.0 columns; one row per cloud, direction and
/// class; the cloud is the sub-account).
pub fn focus_csv(r: &Report) -> String {
    let mut out = String::from(
        "BillingPeriodStart,BillingPeriodEnd,ChargePeriodStart,ChargePeriodEnd,ChargeCategory,ChargeDescription,\
ProviderName,ServiceName,ServiceCategory,SubAccountId,SkuId,ConsumedQuantity,ConsumedUnit,PricingQuantity,\
PricingUnit,ListUnitPrice,ListCost,BilledCost,EffectiveCost,BillingCurrency\n",
    );
    let (from, to) = (rfc3339(r.from_ms), rfc3339(r.to_ms));
    for l in &r.lines {
        let gb = l.bytes as f64 / 1e9;
        let fields = [
            from.clone(),
            to.clone(),
            from.clone(),
            to.clone(),
            "Usage".into(),
            format!("Network {} {} traffic", l.direction, l.class),
            "atoll".into(),
            "atoll network".into(),
            "Networking".into(),
            l.cloud.to_string(),
            format!("network-{}-{}", l.direction, l.class),
            format!("{gb:.9}"),
            "GB".into(),
            format!("{gb:.9}"),
            "GB".into(),
            format!("{:.6}", l.unit_price),
            format!("{:.6}", l.cost),
            format!("{:.6}", l.cost),
            format!("{:.6}", l.cost),
            r.currency.clone(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out += &row.join(",");
        out.push('\n');
    }
    out
}

/// One CSV field: quoted (RFC 4180) when it holds a separator, quote or line break, and never
/// read as a formula by a spreadsheet.
fn csv_field(f: &str) -> String {
    let f = if f.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{f}")
    } else {
        f.to_string()
    };
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<u64, UsageError> {
    let err = || UsageError::Time(s.into());
    let body = s.strip_suffix('Z').ok_or_else(err)?;
    let (date, time) = body.split_once('T').ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<&str> = hms.split(':').collect();
    if d.len() != 3 || t.len() != 3 || frac.is_empty() || frac.len() > 3 {
        return Err(err());
    }
    let num = |x: &str| x.parse::<i64>().map_err(|_| err());
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (hh, mm, ss) = (num(t[0])?, num(t[1])?, num(t[2])?);
    let ms = num(&format!("{frac:0<3}"))?;
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || y < 1970
    {
        return Err(err());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000 + ms) as u64)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC (seconds precision).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = atoll_api::usage::civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, cloud: u32, end: u64, dir: &str, class: &str, bytes: u64) -> String {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"dev.atoll.usage.v1","subject":"s","time":"t","datacontenttype":"application/json","data":{{"cloud":{cloud},"endpoint":"e","incarnation":"i","seq":1,"start_unix_ms":0,"end_unix_ms":{end},"final":false,"usage":{{"traffic":[{{"direction":"{dir}","class":"{class}","packets":1,"bytes":{bytes}}}],"drops":{{}}}},"cumulative":{{"traffic":[],"drops":{{}}}}}}}}"#
        )
    }

    fn prices() -> Prices {
        Prices {
            currency: "USD".into(),
            from_guest: ClassPrices {
                external: 0.09,
                exposure: 0.01,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn items_price_each_quantity_exactly_and_round_down_once() {
        let p = Prices {
            vcpu_hour: 0.04,
            memory_gib_hour: 0.005,
            volume_gib_month: 0.1,
            ..prices()
        };
        let mut q = Quantities {
            vcpu_ms: 2 * 3_600_000,
            memory_mib_ms: 512 * 3_600_000,
            volume_gib_ms: 10 * 730 * 3_600_000,
            ..Default::default()
        };
        q.traffic
            .insert("from_guest/external".into(), [3, 1_500_000_001]);
        q.traffic.insert("to_guest/intra_cloud".into(), [1, 0]);
        let items = p.items(&q);
        let by: BTreeMap<&str, &atoll_api::model::UsageItem> =
            items.iter().map(|i| (i.sku.as_str(), i)).collect();
        assert_eq!(by.len(), 4, "zero bytes are no item: {items:?}");
        // 2 vCPU-hours, half a GiB-hour, 10 GiB-months.
        assert_eq!(by["compute-vcpu"].cost_nanos, 80_000_000);
        assert_eq!(by["compute-memory"].cost_nanos, 2_500_000);
        assert_eq!(by["storage-volume"].cost_nanos, 1_000_000_000);
        assert_eq!(by["storage-volume"].cost, "1.000000000");
        // 1.500000001 GB at 0.09: 0.13500000009, rounded down to the nano.
        assert_eq!(by["network-from_guest-external"].cost_nanos, 135_000_000);
        assert_eq!(by["network-from_guest-external"].quantity, 1_500_000_001);
        let mut merged = items.clone();
        merge_items(&mut merged, items);
        assert_eq!(merged.len(), 4);
        assert_eq!(merged[0].cost_nanos, 160_000_000);
        assert_eq!(merged[0].quantity, 4 * 3_600_000);
    }

    #[test]
    fn price_lists_refuse_nonsense() {
        for bad in [
            Prices {
                vcpu_hour: -1.0,
                ..Default::default()
            },
            Prices {
                memory_gib_hour: f64::NAN,
                ..Default::default()
            },
            Prices {
                volume_gib_month: f64::INFINITY,
                ..Default::default()
            },
            Prices {
                currency: "usd".into(),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(Prices::default().validate().is_ok());
    }

    #[test]
    fn prices_dedups_and_filters_by_period() {
        let dir = std::env::temp_dir().join(format!("atlusage{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("u.jsonl");
        let lines = [
            record("a-1", 1, 1000, "from_guest", "external", 2_000_000_000),
            record("a-1", 1, 1000, "from_guest", "external", 2_000_000_000), // duplicate
            record("a-2", 1, 2000, "from_guest", "exposure", 500_000_000),
            record("b-1", 2, 1500, "to_guest", "external", 7_000_000_000), // unpriced direction
            record("c-1", 3, 9000, "from_guest", "external", 1_000_000_000), // outside the period
        ];
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let r = report(&[f], &prices(), 0, 5000).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((r.records, r.duplicates), (4, 1));
        let totals = r.cloud_totals();
        assert!(
            (totals[&1] - (2.0 * 0.09 + 0.5 * 0.01)).abs() < 1e-9,
            "{totals:?}"
        );
        assert_eq!(totals[&2], 0.0);
        assert!(!totals.contains_key(&3));
        let csv = focus_csv(&r);
        assert_eq!(csv.lines().count(), 1 + 3);
        assert!(csv.contains(",1,network-from_guest-external,2.000000000,GB,2.000000000,GB,0.090000,0.180000,0.180000,0.180000,USD"), "{csv}");
        assert!(table(&r).contains("total"));
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        let dir = std::env::temp_dir().join(format!("atlusagebad{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("u.jsonl");
        std::fs::write(&f, "{not json}\n").unwrap();
        let e = report(std::slice::from_ref(&f), &prices(), 0, 1).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let p = dir.join("p.toml");
        std::fs::write(&p, "currency = \"USD\"\n[from_guest]\nexternall = 1.0\n").unwrap();
        assert!(Prices::load(&p)
            .unwrap_err()
            .to_string()
            .contains("externall"));
        std::fs::write(&p, "currency = \"dollars\"\n").unwrap();
        assert!(matches!(
            Prices::load(&p),
            Err(UsageError::InvalidPrices { .. })
        ));
        std::fs::write(&p, "currency = \"EUR\"\n[to_guest]\nhost = -1.0\n").unwrap();
        assert!(matches!(
            Prices::load(&p),
            Err(UsageError::InvalidPrices { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn sums_are_checked_and_csv_fields_escaped() {
        let dir = std::env::temp_dir().join(format!("atl-usage-ovf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.jsonl");
        let big = u64::MAX - 1;
        std::fs::write(
            &f,
            [
                record("a", 1, 2000, "from_guest", "external", big),
                record("b", 1, 2001, "from_guest", "external", 2),
            ]
            .join("\n")
                + "\n",
        )
        .unwrap();
        let err = report(std::slice::from_ref(&f), &prices(), 0, u64::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                UsageError::Overflow {
                    cloud: 1,
                    what: "bytes",
                    ..
                }
            ),
            "{err}"
        );
        // A class carrying separators, quotes, a line break and a formula stays one field.
        let hostile = "x,\\\"=cmd|' /C calc'!A0\\n";
        std::fs::write(&f, record("c", 1, 2000, "from_guest", hostile, 5) + "\n").unwrap();
        let r = report(&[f], &prices(), 0, u64::MAX).unwrap();
        let csv = focus_csv(&r);
        // One quoted field, its quotes doubled and its line break kept inside the quotes.
        assert!(
            csv.contains(",Usage,\"Network from_guest x,\"\"=cmd|' /C calc'!A0\n traffic\",atoll,"),
            "{csv}"
        );
        assert!(
            csv.contains(",\"network-from_guest-x,\"\"=cmd|' /C calc'!A0\n\","),
            "{csv}"
        );
        assert_eq!(csv_field("=1+1"), "'=1+1");
        assert_eq!(csv_field("-5"), "'-5");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rfc3339_round_trips() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T12:34:56Z",
            "2026-11-24T00:00:00Z",
        ] {
            assert_eq!(rfc3339(parse_rfc3339(s).unwrap()), s);
        }
        assert_eq!(parse_rfc3339("2026-11-24T00:00:00.5Z").unwrap() % 1000, 500);
    }
}
