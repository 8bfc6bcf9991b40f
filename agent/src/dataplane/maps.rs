//! The map registry: every map of the eBPF object, once, with what the agent knows of it.
//!
//! Each [`MapSpec`] names the map, the feature module of `dataplane-ebpf/src/` that owns it,
//! its kind, key and value sizes (from the `#[repr(C)]` types in `atoll-dataplane-common`), its
//! flags and its capacity: fixed by the object, or sized by a `dataplane.*` setting
//! ([`SizeSetting`]). Everything the agent does with maps by name comes from [`REGISTRY`]:
//! pinning (every map, in registry order), the loader's sizes, the shape checks of every open,
//! the sizes a pinned dataplane has, and the migrations' tables (`layout`). A root-free test
//! checks that the compiled object's maps are exactly these, with these kinds, sizes and fixed
//! capacities (`dataplane::design_doc`).
//!
//! Decisions:
//! - **A leaf.** This module depends on the shared types only, so every other module of the
//!   dataplane may use it without an import circle.
//! - **The first map sized by a setting defines it** in a pinned dataplane ([`size_map`]):
//!   sizes are fixed when a dataplane is created, and the other maps sized by the same setting
//!   must agree with it.

use atoll_dataplane_common::{
    DnsService, EgressCloud, EgressHost, EgressIn, EgressMeter, EgressOut, EgressRecent,
    EgressRuleKey, EgressRules, EndpointCounters, EndpointInfo, EndpointSlot, FlowIn, FlowKey,
    FlowOut, FlowRecent, IngressAllowKey, IngressFlow, IngressKey, IngressTarget, NextHop,
    OverlayHost, RefusedCount, RefusedKey, RouteKey, VipService, CACHE_SLOTS, DROP_SLOTS,
    ENDPOINT_CACHE_SLOTS,
};
use aya::maps::MapType;

use crate::config::DataplaneConfig;

/// Other hosts one host's overlay knows (`OVERLAY_PEERS`): the hosts its clouds span.
pub const OVERLAY_PEERS_CAPACITY: u32 = 65_536;

pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
pub const MAP_ENDPOINT_CACHE: &str = "ENDPOINT_CACHE";
pub const MAP_ROUTES: &str = "ROUTES";
pub const MAP_DROPS: &str = "DROPS";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_DNS_SERVICE: &str = "DNS_SERVICE";
pub const MAP_SLOT_ENDPOINTS: &str = "SLOT_ENDPOINTS";
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_FLOWS_OUT: &str = "FLOWS_OUT";
pub const MAP_FLOWS_IN: &str = "FLOWS_IN";
pub const MAP_FLOWS_RECENT: &str = "FLOWS_RECENT";
pub const MAP_FLOWS_HELD: &str = "FLOWS_HELD";
pub const MAP_EXPOSURE_FLOW_RATE: &str = "EXPOSURE_FLOW_RATE";
pub const MAP_EXPOSURE_FLOW_CLOCKS: &str = "EXPOSURE_FLOW_CLOCKS";
pub const MAP_OVERLAY_HOST: &str = "OVERLAY_HOST";
pub const MAP_CLOUD_VNIS: &str = "CLOUD_VNIS";
pub const MAP_VNI_CLOUDS: &str = "VNI_CLOUDS";
pub const MAP_OVERLAY_PEERS: &str = "OVERLAY_PEERS";
pub const MAP_EGRESS_HOST: &str = "EGRESS_HOST";
pub const MAP_EGRESS_CLOUDS: &str = "EGRESS_CLOUDS";
pub const MAP_EGRESS_NEVER: &str = "EGRESS_NEVER";
pub const MAP_EGRESS_ALLOW: &str = "EGRESS_ALLOW";
pub const MAP_EGRESS_DENY: &str = "EGRESS_DENY";
pub const MAP_EGRESS_OUT: &str = "EGRESS_OUT";
pub const MAP_EGRESS_IN: &str = "EGRESS_IN";
pub const MAP_EGRESS_RECENT: &str = "EGRESS_RECENT";
pub const MAP_EGRESS_HELD: &str = "EGRESS_HELD";
pub const MAP_EGRESS_REFUSED: &str = "EGRESS_REFUSED";
pub const MAP_EGRESS_METERS: &str = "EGRESS_METERS";
pub const MAP_EGRESS_FLOW_CLOCKS: &str = "EGRESS_FLOW_CLOCKS";
pub const MAP_INGRESS: &str = "INGRESS";
pub const MAP_INGRESS_ALLOW: &str = "INGRESS_ALLOW";
pub const MAP_INGRESS_FLOWS: &str = "INGRESS_FLOWS";

/// Capacity of `INGRESS` (published ports on this host) and of `INGRESS_ALLOW` (their
/// `allow_from` prefixes).
pub const INGRESS_ENTRIES: u32 = 65536;

/// Capacity of `EGRESS_REFUSED` (refused destinations of all clouds; LRU).
pub const EGRESS_REFUSED_ENTRIES: u32 = 16384;

/// Capacity of `EGRESS_NEVER` (prefixes of the always-denied set).
pub const EGRESS_NEVER_ENTRIES: u32 = 4096;
/// Capacity of `EGRESS_ALLOW` and `EGRESS_DENY`, each: prefixes of all clouds' rules and
/// learnt addresses on this host (LPM tries are never preallocated: the capacity is a bound).
pub const EGRESS_RULE_ENTRIES: u32 = 1 << 20;

/// `BPF_F_NO_PREALLOC`.
pub const NO_PREALLOC: u32 = 1;

/// A `dataplane.*` setting that sizes maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSetting {
    MaxEndpoints,
    MaxRoutes,
    MaxVips,
    MaxFlows,
}

impl SizeSetting {
    pub const ALL: [SizeSetting; 4] = [
        SizeSetting::MaxEndpoints,
        SizeSetting::MaxRoutes,
        SizeSetting::MaxVips,
        SizeSetting::MaxFlows,
    ];

    /// The setting's key under `[dataplane]`.
    pub const fn name(self) -> &'static str {
        match self {
            SizeSetting::MaxEndpoints => "max_endpoints",
            SizeSetting::MaxRoutes => "max_routes",
            SizeSetting::MaxVips => "max_vips",
            SizeSetting::MaxFlows => "max_flows",
        }
    }

    /// Its value in `cfg`.
    pub fn get(self, cfg: &DataplaneConfig) -> u32 {
        match self {
            SizeSetting::MaxEndpoints => cfg.max_endpoints,
            SizeSetting::MaxRoutes => cfg.max_routes,
            SizeSetting::MaxVips => cfg.max_vips,
            SizeSetting::MaxFlows => cfg.max_flows,
        }
    }

    /// Sets it in `cfg`.
    pub fn set(self, cfg: &mut DataplaneConfig, n: u32) {
        match self {
            SizeSetting::MaxEndpoints => cfg.max_endpoints = n,
            SizeSetting::MaxRoutes => cfg.max_routes = n,
            SizeSetting::MaxVips => cfg.max_vips = n,
            SizeSetting::MaxFlows => cfg.max_flows = n,
        }
    }
}

/// How many entries a map has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// Fixed by the object.
    Fixed(u32),
    /// From a `dataplane.*` setting.
    Config(SizeSetting),
}

/// One map of the object.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    /// The module of `dataplane-ebpf/src/` that declares it.
    pub owner: &'static str,
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub capacity: Capacity,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

const fn spec(
    name: &'static str,
    owner: &'static str,
    kind: MapType,
    key_size: u32,
    value_size: u32,
    flags: u32,
    capacity: Capacity,
) -> MapSpec {
    MapSpec {
        name,
        owner,
        kind,
        key_size,
        value_size,
        flags,
        capacity,
    }
}

use Capacity::{Config, Fixed};
use SizeSetting::*;

/// Every map of the object, in pinning order.
pub const REGISTRY: [MapSpec; 33] = [
    spec(
        MAP_ENDPOINTS,
        "endpoint",
        MapType::Hash,
        size::<u32>(),
        size::<EndpointInfo>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_ENDPOINT_CACHE,
        "endpoint",
        MapType::Array,
        size::<u32>(),
        size::<EndpointSlot>(),
        0,
        Fixed(ENDPOINT_CACHE_SLOTS),
    ),
    spec(
        MAP_ROUTES,
        "route",
        MapType::Hash,
        size::<RouteKey>(),
        size::<NextHop>(),
        0,
        Config(MaxRoutes),
    ),
    spec(
        MAP_DROPS,
        "drop",
        MapType::PerCpuArray,
        size::<u32>(),
        size::<u64>(),
        0,
        Fixed(DROP_SLOTS),
    ),
    spec(
        MAP_COUNTERS,
        "metering",
        MapType::PerCpuArray,
        size::<u32>(),
        size::<EndpointCounters>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_DNS_SERVICE,
        "dns",
        MapType::Array,
        size::<u32>(),
        size::<DnsService>(),
        0,
        Fixed(1),
    ),
    spec(
        MAP_SLOT_ENDPOINTS,
        "dns",
        MapType::Array,
        size::<u32>(),
        size::<u32>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_VIPS,
        "exposure",
        MapType::Hash,
        size::<RouteKey>(),
        size::<VipService>(),
        NO_PREALLOC,
        Config(MaxVips),
    ),
    spec(
        MAP_FLOWS_OUT,
        "exposure",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<FlowOut>(),
        0,
        Config(MaxFlows),
    ),
    spec(
        MAP_FLOWS_IN,
        "exposure",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<FlowIn>(),
        0,
        Config(MaxFlows),
    ),
    spec(
        MAP_FLOWS_RECENT,
        "exposure",
        MapType::Array,
        size::<u32>(),
        size::<FlowRecent>(),
        0,
        Fixed(CACHE_SLOTS),
    ),
    spec(
        MAP_FLOWS_HELD,
        "exposure",
        MapType::Array,
        size::<u32>(),
        size::<u64>(),
        0,
        Fixed(CACHE_SLOTS),
    ),
    spec(
        MAP_EXPOSURE_FLOW_RATE,
        "exposure",
        MapType::Array,
        size::<u32>(),
        size::<u32>(),
        0,
        Fixed(1),
    ),
    spec(
        MAP_EXPOSURE_FLOW_CLOCKS,
        "exposure",
        MapType::LruHash,
        size::<u32>(),
        size::<u64>(),
        0,
        Config(MaxVips),
    ),
    spec(
        MAP_OVERLAY_HOST,
        "overlay",
        MapType::Array,
        size::<u32>(),
        size::<OverlayHost>(),
        0,
        Fixed(1),
    ),
    spec(
        MAP_CLOUD_VNIS,
        "overlay",
        MapType::Hash,
        size::<u32>(),
        size::<u32>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_VNI_CLOUDS,
        "overlay",
        MapType::Hash,
        size::<u32>(),
        size::<u32>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_OVERLAY_PEERS,
        "overlay",
        MapType::Hash,
        size::<u32>(),
        size::<u32>(),
        0,
        Fixed(OVERLAY_PEERS_CAPACITY),
    ),
    spec(
        MAP_EGRESS_HOST,
        "egress",
        MapType::Array,
        size::<u32>(),
        size::<EgressHost>(),
        0,
        Fixed(1),
    ),
    spec(
        MAP_EGRESS_CLOUDS,
        "egress",
        MapType::Hash,
        size::<u32>(),
        size::<EgressCloud>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_EGRESS_NEVER,
        "egress",
        MapType::LpmTrie,
        4 + size::<u32>(),
        size::<u8>(),
        NO_PREALLOC,
        Fixed(EGRESS_NEVER_ENTRIES),
    ),
    spec(
        MAP_EGRESS_ALLOW,
        "egress",
        MapType::LpmTrie,
        4 + size::<EgressRuleKey>(),
        size::<EgressRules>(),
        NO_PREALLOC,
        Fixed(EGRESS_RULE_ENTRIES),
    ),
    spec(
        MAP_EGRESS_DENY,
        "egress",
        MapType::LpmTrie,
        4 + size::<EgressRuleKey>(),
        size::<EgressRules>(),
        NO_PREALLOC,
        Fixed(EGRESS_RULE_ENTRIES),
    ),
    spec(
        MAP_EGRESS_OUT,
        "egress",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<EgressOut>(),
        0,
        Config(MaxFlows),
    ),
    spec(
        MAP_EGRESS_IN,
        "egress",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<EgressIn>(),
        0,
        Config(MaxFlows),
    ),
    spec(
        MAP_EGRESS_RECENT,
        "egress",
        MapType::Array,
        size::<u32>(),
        size::<EgressRecent>(),
        0,
        Fixed(CACHE_SLOTS),
    ),
    spec(
        MAP_EGRESS_HELD,
        "egress",
        MapType::Array,
        size::<u32>(),
        size::<u64>(),
        0,
        Fixed(CACHE_SLOTS),
    ),
    spec(
        MAP_EGRESS_REFUSED,
        "egress",
        MapType::LruHash,
        size::<RefusedKey>(),
        size::<RefusedCount>(),
        0,
        Fixed(EGRESS_REFUSED_ENTRIES),
    ),
    spec(
        MAP_EGRESS_METERS,
        "egress",
        MapType::Hash,
        size::<u32>(),
        size::<EgressMeter>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_EGRESS_FLOW_CLOCKS,
        "egress",
        MapType::Hash,
        size::<u32>(),
        size::<u64>(),
        0,
        Config(MaxEndpoints),
    ),
    spec(
        MAP_INGRESS,
        "ingress",
        MapType::Hash,
        size::<IngressKey>(),
        size::<IngressTarget>(),
        NO_PREALLOC,
        Fixed(INGRESS_ENTRIES),
    ),
    spec(
        MAP_INGRESS_ALLOW,
        "ingress",
        MapType::LpmTrie,
        4 + size::<IngressAllowKey>(),
        size::<u8>(),
        NO_PREALLOC,
        Fixed(INGRESS_ENTRIES),
    ),
    spec(
        MAP_INGRESS_FLOWS,
        "ingress",
        MapType::LruHash,
        size::<FlowKey>(),
        size::<IngressFlow>(),
        0,
        Config(MaxFlows),
    ),
];

/// The map named `name`, if the object has one.
pub fn find(name: &str) -> Option<&'static MapSpec> {
    REGISTRY.iter().find(|m| m.name == name)
}

/// The map whose capacity defines `setting` in a pinned dataplane: the first sized by it.
pub fn size_map(setting: SizeSetting) -> &'static str {
    REGISTRY
        .iter()
        .find(|m| m.capacity == Config(setting))
        .map(|m| m.name)
        .expect("every setting sizes a map")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_setting_sizes_a_map() {
        let mut names: Vec<_> = REGISTRY.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        assert_eq!(size_map(MaxEndpoints), MAP_ENDPOINTS);
        assert_eq!(size_map(MaxFlows), MAP_FLOWS_OUT);
        for s in SizeSetting::ALL {
            let mut cfg = DataplaneConfig::default();
            s.set(&mut cfg, 12_345);
            assert_eq!(s.get(&cfg), 12_345, "{}", s.name());
        }
    }
}
