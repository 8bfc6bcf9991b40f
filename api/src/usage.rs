//! The usage-record schema: what hosts write to their journals and deliver to sinks, and what
//! billing reads (`atoll usage`). One definition, here, for the writer (the agent) and every
//! reader.
//!
//! A record is a CloudEvents 1.0 envelope (structured mode, JSON) of type [`EVENT_TYPE`]
//! around one window of one metered thing ([`UsageData`]); ids are deterministic, so
//! at-least-once delivery is deduplicated by id. Three kinds of things are metered
//! ([`UsageData::kind`]):
//! - **network**: an endpoint's traffic per direction and class, from the kernel's counters;
//! - **compute**: one VMM run (from its start to its exit) of a VM: `vcpu_ms` and
//!   `memory_mib_ms` ([`Resource::Vm`]);
//! - **storage**: a volume while it is provisioned on the host: `volume_gib_ms`
//!   ([`Resource::Volume`]).
//!
//! Time-based quantities are integers in milliseconds times the size (vCPUs, MiB, GiB): exact,
//! summable, and far from overflow (a 1 TiB VM for a year is 3.3e16 MiB-ms). Records of all
//! kinds share the journal, the id scheme, the `cumulative` baseline and the sinks.

use std::collections::{BTreeMap, HashMap};

use atoll_dataplane_common::{Direction, DropReason, EndpointCounters, TrafficClass};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// CloudEvents `type` of usage records.
pub const EVENT_TYPE: &str = "dev.atoll.usage.v1";

/// A CloudEvents 1.0 envelope around [`UsageData`] (structured mode, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// `<cloud>/<endpoint>`.
    pub subject: String,
    /// End of the window, RFC 3339 UTC.
    pub time: String,
    pub datacontenttype: String,
    pub data: UsageData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageData {
    pub cloud: u32,
    /// Host device name of the endpoint (network records); empty for compute and storage.
    pub endpoint: String,
    pub incarnation: String,
    /// 1 for the first record of an incarnation, then +1.
    pub seq: u64,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    /// True for the last record of an endpoint, written before it is deleted.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// What happened in this window.
    pub usage: Counters,
    /// Everything since the endpoint was created (the baseline for the next record).
    pub cumulative: Counters,
    /// What a compute or storage record meters; absent: an endpoint's traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
}

impl UsageData {
    /// `network`, `compute` or `storage`.
    pub fn kind(&self) -> &'static str {
        match self.resource {
            None => "network",
            Some(Resource::Vm { .. }) => "compute",
            Some(Resource::Volume { .. }) => "storage",
        }
    }
}

/// A thing metered by time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Resource {
    /// A VM's VMM while it runs, with the size it was started with.
    Vm {
        name: String,
        vcpus: u32,
        memory_mib: u64,
    },
    /// A volume while it is provisioned.
    Volume { name: String, size_gib: u64 },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Packets and bytes per direction and class, and drops per reason (non-zero only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Counters {
    pub traffic: Vec<Traffic>,
    pub drops: BTreeMap<String, u64>,
    /// vCPU-milliseconds (compute records).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vcpu_ms: u64,
    /// Memory, MiB-milliseconds (compute records).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_mib_ms: u64,
    /// Provisioned volume, GiB-milliseconds (storage records).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub volume_gib_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Traffic {
    pub direction: String,
    pub class: String,
    pub packets: u64,
    pub bytes: u64,
}

impl Counters {
    /// All direction × class pairs (zeros included, so every record has the same shape) and
    /// the non-zero drops.
    pub fn from_kernel(c: &EndpointCounters) -> Self {
        let mut traffic = Vec::with_capacity(Direction::COUNT * TrafficClass::COUNT);
        for d in Direction::ALL {
            for k in TrafficClass::ALL {
                let t = c.traffic[d as usize][k as usize];
                traffic.push(Traffic {
                    direction: d.name().into(),
                    class: k.name().into(),
                    packets: t.packets,
                    bytes: t.bytes,
                });
            }
        }
        let drops = DropReason::ALL
            .iter()
            .filter(|r| c.drops[**r as usize] > 0)
            .map(|r| (r.name().to_string(), c.drops[*r as usize]))
            .collect();
        Counters {
            traffic,
            drops,
            ..Counters::default()
        }
    }

    /// `self - baseline`, field by field. If any field went down, the counters were reset
    /// (which the agent never does to a live endpoint) and `self` is returned whole.
    pub fn since(&self, baseline: &Counters) -> Counters {
        let base_t: HashMap<(&str, &str), &Traffic> = baseline
            .traffic
            .iter()
            .map(|t| ((t.direction.as_str(), t.class.as_str()), t))
            .collect();
        let mut out = self.clone();
        for t in out.traffic.iter_mut() {
            if let Some(b) = base_t.get(&(t.direction.as_str(), t.class.as_str())) {
                if t.packets < b.packets || t.bytes < b.bytes {
                    return self.clone();
                }
                t.packets -= b.packets;
                t.bytes -= b.bytes;
            }
        }
        for (reason, n) in out.drops.iter_mut() {
            let b = baseline.drops.get(reason).copied().unwrap_or(0);
            if *n < b {
                return self.clone();
            }
            *n -= b;
        }
        if baseline.drops.keys().any(|k| !self.drops.contains_key(k)) {
            return self.clone();
        }
        for (v, b) in [
            (&mut out.vcpu_ms, baseline.vcpu_ms),
            (&mut out.memory_mib_ms, baseline.memory_mib_ms),
            (&mut out.volume_gib_ms, baseline.volume_gib_ms),
        ] {
            if *v < b {
                return self.clone();
            }
            *v -= b;
        }
        out.drops.retain(|_, n| *n > 0);
        out
    }

    /// Bytes of one direction and class.
    pub fn bytes(&self, direction: &str, class: &str) -> u64 {
        self.traffic
            .iter()
            .filter(|t| t.direction == direction && t.class == class)
            .map(|t| t.bytes)
            .sum()
    }
}

/// The civil date `(year, month, day)` of a day counted from 1970-01-01 (Howard Hinnant's
/// algorithm, unsigned: atoll's times are never before the epoch). The one copy for every
/// RFC 3339 timestamp atoll writes.
pub fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(month <= 2), month, day)
}
