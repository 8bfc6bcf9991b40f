//! The pinned eBPF dataplane: load once, then always work from bpffs pins.
//!
//! Pin layout under `<bpffs_root>/v<LAYOUT_VERSION>/`:
//!
//! | path | what |
//! |---|---|
//! | `maps/ENDPOINTS`, `maps/ROUTES`, `maps/DROPS`, ... | the maps (see docs/design.md) |
//! | `progs/from_vm`, `progs/to_vm`, `progs/from_dns`, `progs/kfree_skb` | the loaded programs |
//! | `links/<ifindex>-in`, `links/<ifindex>-out` | the TCX links of each endpoint device |
//! | `links/dns-<ifindex>` | the TCX link of `from_dns` on the host-side DNS device |
//! | `links/kfree-skb` | the link of `kfree_skb` on the kernel's `kfree_skb` tracepoint (one per layout) |
//! | `build-<id>` | an empty directory: the build of the pinned programs ([`build_id`]) |
//! | `carry/COUNTERS-v<N>`, `carry/DROPS-v<N>` | counters of layout N, frozen by a migration |
//!
//! Decisions:
//! - bpffs refuses names containing '.', so pin names use '-' only.
//! - The object declares its maps unpinned; the agent pins them. Tests and benchmarks load
//!   private copies of the same object without touching the host's pins.
//! - First creation happens in a temporary directory that is renamed into place, so a crash
//!   half-way never leaves a partial layout that a later start would trust.
//! - After creation (and on every later start) everything is opened from the pins: one code
//!   path, and a restarted agent continues with the very maps and programs in the kernel.
//! - Links are pinned and their fds closed at once: the kernel keeps them attached, the agent
//!   holds no per-endpoint file descriptors, and the dataplane works while the agent is down.
//! - The version in the directory name is the map layout version: an agent never opens maps of
//!   another layout. [`prepare`] (what `atoll-agent run` and `atoll-agent migrate` do first)
//!   migrates the pins of the previous layout into the current one (see `layout`), and
//!   [`Dataplane::open`] refuses while pins of another layout exist, naming that command.
//! - Every open checks each pinned map's type, key and value size, flags and capacity against
//!   what this build expects (aya reuses a pinned map without looking at it), so a map of another
//!   shape is a clear error, never a silent misread.
//! - `build-<id>` beside the pins names the build of the eBPF object whose programs are pinned
//!   ([`build_id`], a hash of the embedded object). [`prepare`] upgrades the programs of another
//!   build in place: loads the new object against the pinned maps, swaps the program of every
//!   pinned TCX link with one `BPF_LINK_UPDATE` each, re-pins the programs, then the marker
//!   (see `upgrade`). No frame meets a device without a program at any point.
//! - `kfree_skb` (a BTF tracepoint program, see `dataplane-ebpf/src/freed.rs`) is loaded with
//!   the other programs, given the kernel's field offsets read from its BTF (`kernel`), and
//!   attached once per layout when the layout is created; its link is pinned like the TCX
//!   links. Tracing links cannot have their program replaced (`BPF_LINK_UPDATE` is for TCX,
//!   XDP, cgroup and a few others), so an upgrade attaches the new program first and then
//!   renames its link pin over the old one and closes the old link, which detaches the old
//!   program before the upgrade goes on: no frame goes uncounted; one freed in the
//!   microseconds both are attached is counted twice.
//! - `carry/` holds counter maps of an older layout frozen by a migration: their values are added
//!   to the current counters, so no increment is lost (see `carry`).
//! - **Modules, each owning one thing, imported only downwards** (no circles): `error` (the
//!   error type; a leaf), `maps` (the map registry; a leaf), `kernel` (BTF, feature probes and
//!   what the kernel's refusals mean), `pins` (the layout's directories, loading the object,
//!   pinning programs, the build marker), `links` (link pins and `BPF_LINK_UPDATE`), `carry`
//!   (frozen counters), `layout` (shape checks and migrations), `upgrade` (in-place program
//!   upgrades), and this file's `Dataplane` (endpoints and their maps; `exposure` adds its VIP
//!   methods).

use std::{
    io,
    path::{Path, PathBuf},
};

use atoll_dataplane_common::{
    DnsService, DropReason, EgressCloud, EgressHost, EgressIn, EgressMeter, EgressOut,
    EndpointCounters, EndpointInfo, EndpointSlot, FlowIn, FlowKey, FlowOut, IngressAllowKey,
    IngressFlow, IngressKey, IngressTarget, NextHop, OverlayHost, RefusedCount, RefusedKey,
    RouteKey, VipService, ENDPOINT_CACHE_MASK,
};
use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{links::FdLink, tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType},
};

use crate::config::DataplaneConfig;

mod carry;
mod egress;
mod error;
mod exposure;
mod ingress;
mod kernel;
mod layout;
mod links;
pub mod maps;
mod overlay;
mod pins;
mod upgrade;

pub use egress::{RuleKind, RuleTries};
pub use error::DataplaneError;
use error::*;
use kernel::attach_error;
pub use layout::{layout_versions, map_usage, unapplied_sizes, MapUsage};
use pins::*;
pub use pins::{
    build_id, check_bpffs, layout_dir, load_unpinned, pinned_builds, BUILD_MARKER_PREFIX,
    KFREE_SKB_LINK, OBJECT, PROG_FROM_DNS, PROG_FROM_OVERLAY, PROG_FROM_UNDERLAY, PROG_FROM_UPLINK,
    PROG_FROM_VM, PROG_KFREE_SKB, PROG_TO_VM,
};
pub use upgrade::{prepare, Prepared};

/// A program on the ingress of one device of the host, not of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostHook {
    /// `from_dns` on the host-side DNS device.
    Dns,
    /// `from_uplink` on the uplink (egress).
    Uplink,
    /// `from_overlay` on the VXLAN device.
    Overlay,
    /// `from_underlay` on the device holding the underlay address, first on its ingress
    /// (before `from_uplink` when the uplink is the underlay; it passes on what is not its).
    Underlay,
}

impl HostHook {
    fn link_prefix(self) -> &'static str {
        match self {
            HostHook::Dns => DNS_LINK_PREFIX,
            HostHook::Uplink => UPLINK_LINK_PREFIX,
            HostHook::Overlay => OVERLAY_LINK_PREFIX,
            HostHook::Underlay => UNDERLAY_LINK_PREFIX,
        }
    }

    fn program(self) -> &'static str {
        match self {
            HostHook::Dns => PROG_FROM_DNS,
            HostHook::Uplink => PROG_FROM_UPLINK,
            HostHook::Overlay => PROG_FROM_OVERLAY,
            HostHook::Underlay => PROG_FROM_UNDERLAY,
        }
    }

    /// Where on the hook the program goes: `from_underlay` before any other program (it
    /// passes on what is not its); the others after those attached already.
    fn order(self) -> LinkOrder {
        match self {
            HostHook::Underlay => LinkOrder::first(),
            _ => LinkOrder::default(),
        }
    }
}

/// Empty XDP and TC programs (`empty_xdp`, `empty_tc`) that benchmarks use as their baseline.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/atoll-baseline.o"));

/// Map names in the object (the registry, [`maps::REGISTRY`], says the rest).
pub use maps::{
    MAP_CLOUD_VNIS, MAP_COUNTERS, MAP_DNS_SERVICE, MAP_DROPS, MAP_EGRESS_ALLOW, MAP_EGRESS_CLOUDS,
    MAP_EGRESS_DENY, MAP_EGRESS_FLOW_CLOCKS, MAP_EGRESS_HOST, MAP_EGRESS_IN, MAP_EGRESS_METERS,
    MAP_EGRESS_NEVER, MAP_EGRESS_OUT, MAP_EGRESS_REFUSED, MAP_ENDPOINTS, MAP_ENDPOINT_CACHE,
    MAP_EXPOSURE_FLOW_CLOCKS, MAP_EXPOSURE_FLOW_RATE, MAP_FLOWS_IN, MAP_FLOWS_OUT, MAP_INGRESS,
    MAP_INGRESS_ALLOW, MAP_INGRESS_FLOWS, MAP_OVERLAY_HOST, MAP_OVERLAY_PEERS, MAP_ROUTES,
    MAP_SLOT_ENDPOINTS, MAP_VIPS, MAP_VNI_CLOUDS,
};
const BPF_NOEXIST: u64 = 1;

/// An endpoint device's two TCX hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Ingress: what the guest sends.
    FromVm,
    /// Egress: what is delivered to the guest.
    ToVm,
}

/// The dataplane as pinned in the kernel.
pub struct Dataplane {
    dir: PathBuf,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    cache: Array<MapData, EndpointSlot>,
    routes: HashMap<MapData, RouteKey, NextHop>,
    drops: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, EndpointCounters>,
    dns_service: Array<MapData, DnsService>,
    slot_endpoints: Array<MapData, u32>,
    vips: HashMap<MapData, RouteKey, VipService>,
    flows_out: HashMap<MapData, FlowKey, FlowOut>,
    flows_in: HashMap<MapData, FlowKey, FlowIn>,
    egress_host: Array<MapData, EgressHost>,
    egress_clouds: HashMap<MapData, u32, EgressCloud>,
    egress_never: LpmTrie<MapData, u32, u8>,
    egress_out: HashMap<MapData, FlowKey, EgressOut>,
    egress_in: HashMap<MapData, FlowKey, EgressIn>,
    egress_refused: HashMap<MapData, RefusedKey, RefusedCount>,
    egress_meters: HashMap<MapData, u32, EgressMeter>,
    egress_flow_clocks: HashMap<MapData, u32, u64>,
    exposure_flow_rate: Array<MapData, u32>,
    overlay_host: Array<MapData, OverlayHost>,
    cloud_vnis: HashMap<MapData, u32, u32>,
    vni_clouds: HashMap<MapData, u32, u32>,
    overlay_peers: HashMap<MapData, u32, u32>,
    from_overlay: SchedClassifier,
    from_underlay: SchedClassifier,
    ingress: HashMap<MapData, IngressKey, IngressTarget>,
    ingress_allow: LpmTrie<MapData, IngressAllowKey, u8>,
    ingress_flows: HashMap<MapData, FlowKey, IngressFlow>,
    from_vm: SchedClassifier,
    to_vm: SchedClassifier,
    from_dns: SchedClassifier,
    from_uplink: SchedClassifier,
    max_endpoints: u32,
    max_routes: u32,
    max_vips: u32,
    /// Counters of an older layout frozen by a migration, added to the current ones.
    carry: carry::Carry,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane").finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Opens the pinned dataplane under `cfg.bpffs_root`, creating and pinning it first if this
    /// host has none of the current layout.
    ///
    /// Refuses while pins of another layout version exist (see [`prepare`]), and checks every
    /// pinned map against what this build expects.
    pub fn open(cfg: &DataplaneConfig) -> Result<Self, DataplaneError> {
        check_bpffs(&cfg.bpffs_root)?;
        layout::refuse_other_layouts(&cfg.bpffs_root)?;
        let dir = layout_dir(&cfg.bpffs_root);
        if !dir.join("progs").join(PROG_FROM_DNS).exists() {
            create_pins(cfg, &dir)?;
        }
        // Map sizes are the pinned ones (fixed at creation); see `layout::pinned_sizes`.
        layout::check_maps(&dir.join("maps"), cfg)?;
        let carry = carry::Carry::open(&dir.join(carry::DIR))?;
        let open_map = |name: &str| -> Result<Map, DataplaneError> {
            let path = dir.join("maps").join(name);
            let map = MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|source| DataplaneError::OpenMap {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            Ok(map)
        };
        let typed = |name: &str, e: MapError| DataplaneError::OpenMap {
            path: dir.join("maps").join(name),
            source: Box::new(e),
        };
        let endpoints: HashMap<MapData, u32, EndpointInfo> =
            HashMap::try_from(open_map(MAP_ENDPOINTS)?).map_err(|e| typed(MAP_ENDPOINTS, e))?;
        let cache: Array<MapData, EndpointSlot> = Array::try_from(open_map(MAP_ENDPOINT_CACHE)?)
            .map_err(|e| typed(MAP_ENDPOINT_CACHE, e))?;
        let routes: HashMap<MapData, RouteKey, NextHop> =
            HashMap::try_from(open_map(MAP_ROUTES)?).map_err(|e| typed(MAP_ROUTES, e))?;
        let counters: PerCpuArray<MapData, EndpointCounters> =
            PerCpuArray::try_from(open_map(MAP_COUNTERS)?).map_err(|e| typed(MAP_COUNTERS, e))?;
        let drops: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open_map(MAP_DROPS)?).map_err(|e| typed(MAP_DROPS, e))?;
        let dns_service: Array<MapData, DnsService> =
            Array::try_from(open_map(MAP_DNS_SERVICE)?).map_err(|e| typed(MAP_DNS_SERVICE, e))?;
        let slot_endpoints: Array<MapData, u32> = Array::try_from(open_map(MAP_SLOT_ENDPOINTS)?)
            .map_err(|e| typed(MAP_SLOT_ENDPOINTS, e))?;
        let vips: HashMap<MapData, RouteKey, VipService> =
            HashMap::try_from(open_map(MAP_VIPS)?).map_err(|e| typed(MAP_VIPS, e))?;
        let flows_out: HashMap<MapData, FlowKey, FlowOut> =
            HashMap::try_from(open_map(MAP_FLOWS_OUT)?).map_err(|e| typed(MAP_FLOWS_OUT, e))?;
        let flows_in: HashMap<MapData, FlowKey, FlowIn> =
            HashMap::try_from(open_map(MAP_FLOWS_IN)?).map_err(|e| typed(MAP_FLOWS_IN, e))?;
        let egress_host: Array<MapData, EgressHost> =
            Array::try_from(open_map(MAP_EGRESS_HOST)?).map_err(|e| typed(MAP_EGRESS_HOST, e))?;
        let egress_clouds: HashMap<MapData, u32, EgressCloud> =
            HashMap::try_from(open_map(MAP_EGRESS_CLOUDS)?)
                .map_err(|e| typed(MAP_EGRESS_CLOUDS, e))?;
        let egress_never: LpmTrie<MapData, u32, u8> =
            LpmTrie::try_from(open_map(MAP_EGRESS_NEVER)?)
                .map_err(|e| typed(MAP_EGRESS_NEVER, e))?;
        let egress_out: HashMap<MapData, FlowKey, EgressOut> =
            HashMap::try_from(open_map(MAP_EGRESS_OUT)?).map_err(|e| typed(MAP_EGRESS_OUT, e))?;
        let egress_in: HashMap<MapData, FlowKey, EgressIn> =
            HashMap::try_from(open_map(MAP_EGRESS_IN)?).map_err(|e| typed(MAP_EGRESS_IN, e))?;
        let egress_refused: HashMap<MapData, RefusedKey, RefusedCount> =
            HashMap::try_from(open_map(MAP_EGRESS_REFUSED)?)
                .map_err(|e| typed(MAP_EGRESS_REFUSED, e))?;
        let egress_meters: HashMap<MapData, u32, EgressMeter> =
            HashMap::try_from(open_map(MAP_EGRESS_METERS)?)
                .map_err(|e| typed(MAP_EGRESS_METERS, e))?;
        let egress_flow_clocks: HashMap<MapData, u32, u64> =
            HashMap::try_from(open_map(MAP_EGRESS_FLOW_CLOCKS)?)
                .map_err(|e| typed(MAP_EGRESS_FLOW_CLOCKS, e))?;
        let exposure_flow_rate: Array<MapData, u32> =
            Array::try_from(open_map(MAP_EXPOSURE_FLOW_RATE)?)
                .map_err(|e| typed(MAP_EXPOSURE_FLOW_RATE, e))?;
        let overlay_host: Array<MapData, OverlayHost> =
            Array::try_from(open_map(MAP_OVERLAY_HOST)?).map_err(|e| typed(MAP_OVERLAY_HOST, e))?;
        let cloud_vnis: HashMap<MapData, u32, u32> =
            HashMap::try_from(open_map(MAP_CLOUD_VNIS)?).map_err(|e| typed(MAP_CLOUD_VNIS, e))?;
        let vni_clouds: HashMap<MapData, u32, u32> =
            HashMap::try_from(open_map(MAP_VNI_CLOUDS)?).map_err(|e| typed(MAP_VNI_CLOUDS, e))?;
        let overlay_peers: HashMap<MapData, u32, u32> =
            HashMap::try_from(open_map(MAP_OVERLAY_PEERS)?)
                .map_err(|e| typed(MAP_OVERLAY_PEERS, e))?;
        let ingress: HashMap<MapData, IngressKey, IngressTarget> =
            HashMap::try_from(open_map(MAP_INGRESS)?).map_err(|e| typed(MAP_INGRESS, e))?;
        let ingress_allow: LpmTrie<MapData, IngressAllowKey, u8> =
            LpmTrie::try_from(open_map(MAP_INGRESS_ALLOW)?)
                .map_err(|e| typed(MAP_INGRESS_ALLOW, e))?;
        let ingress_flows: HashMap<MapData, FlowKey, IngressFlow> =
            HashMap::try_from(open_map(MAP_INGRESS_FLOWS)?)
                .map_err(|e| typed(MAP_INGRESS_FLOWS, e))?;
        let capacity = |name: &str, default: u32| {
            aya::maps::MapInfo::from_pin(dir.join("maps").join(name))
                .map(|i| i.max_entries())
                .unwrap_or(default)
        };
        let max_endpoints = capacity(MAP_ENDPOINTS, cfg.max_endpoints);
        let max_routes = capacity(MAP_ROUTES, cfg.max_routes);
        let max_vips = capacity(MAP_VIPS, cfg.max_vips);
        let open_prog = |name: &str| {
            let path = dir.join("progs").join(name);
            SchedClassifier::from_pin(&path).map_err(|source| DataplaneError::OpenProgram {
                path,
                source: Box::new(source),
            })
        };
        Ok(Dataplane {
            from_vm: open_prog(PROG_FROM_VM)?,
            to_vm: open_prog(PROG_TO_VM)?,
            from_dns: open_prog(PROG_FROM_DNS)?,
            from_uplink: open_prog(PROG_FROM_UPLINK)?,
            from_overlay: open_prog(PROG_FROM_OVERLAY)?,
            from_underlay: open_prog(PROG_FROM_UNDERLAY)?,
            dir,
            endpoints,
            cache,
            routes,
            drops,
            counters,
            dns_service,
            slot_endpoints,
            vips,
            flows_out,
            flows_in,
            egress_host,
            egress_clouds,
            egress_never,
            egress_out,
            egress_in,
            egress_refused,
            egress_meters,
            egress_flow_clocks,
            exposure_flow_rate,
            overlay_host,
            cloud_vnis,
            vni_clouds,
            overlay_peers,
            ingress,
            ingress_allow,
            ingress_flows,
            max_endpoints,
            max_routes,
            max_vips,
            carry,
        })
    }

    /// The versioned pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Attaches `from_vm` (ingress) and `to_vm` (egress) to a device with TCX and pins both
    /// links. Stale pins of an earlier device with the same ifindex are replaced.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        for hook in [Hook::FromVm, Hook::ToVm] {
            remove_pin(&self.link_pin(ifindex, hook))?;
            self.attach_hook(ifname, ifindex, hook)?;
        }
        Ok(())
    }

    /// Attaches and pins the hooks of a live device whose pins are missing (a crash between
    /// the two attaches), leaving a pinned link alone: unpinning a link releases it from a
    /// kernel work queue, later, so detaching and attaching the same program again could fail
    /// with `EEXIST`. Returns how many it attached.
    pub fn attach_missing(&mut self, ifname: &str, ifindex: u32) -> Result<usize, DataplaneError> {
        let mut attached = 0;
        for hook in [Hook::FromVm, Hook::ToVm] {
            if !self.link_pin(ifindex, hook).exists() {
                self.attach_hook(ifname, ifindex, hook)?;
                attached += 1;
            }
        }
        Ok(attached)
    }

    /// Attaches one hook with TCX and pins its link (the pin must not exist).
    pub fn attach_hook(
        &mut self,
        ifname: &str,
        ifindex: u32,
        hook: Hook,
    ) -> Result<(), DataplaneError> {
        let path = self.link_pin(ifindex, hook);
        let (prog, name, kind) = match hook {
            Hook::FromVm => (&mut self.from_vm, PROG_FROM_VM, TcAttachType::Ingress),
            Hook::ToVm => (&mut self.to_vm, PROG_TO_VM, TcAttachType::Egress),
        };
        attach_pinned(prog, name, (ifname, kind, LinkOrder::default()), &path)
    }

    fn link_pin(&self, ifindex: u32, hook: Hook) -> PathBuf {
        let suffix = match hook {
            Hook::FromVm => "in",
            Hook::ToVm => "out",
        };
        self.dir.join("links").join(format!("{ifindex}-{suffix}"))
    }

    /// Removes the link pins of `ifindex`, which detaches the programs (no fd holds them).
    pub fn detach(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        for suffix in ["in", "out"] {
            remove_pin(&self.dir.join("links").join(format!("{ifindex}-{suffix}")))?;
        }
        Ok(())
    }

    /// ifindexes that have pinned links (either or both: a process killed between the two
    /// pins of [`Dataplane::attach`] or [`Dataplane::detach`] leaves one).
    pub fn attached(&self) -> Result<Vec<u32>, DataplaneError> {
        let dir = self.dir.join("links");
        let entries = std::fs::read_dir(&dir).map_err(|source| DataplaneError::CreatePinDir {
            path: dir.clone(),
            source,
        })?;
        let mut out: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix("-in")
                    .or_else(|| name.strip_suffix("-out"))?
                    .parse()
                    .ok()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Whether both of `ifindex`'s links (`from_vm` and `to_vm`) are pinned.
    pub fn fully_attached(&self, ifindex: u32) -> bool {
        [Hook::FromVm, Hook::ToVm]
            .iter()
            .all(|h| self.link_pin(ifindex, *h).exists())
    }

    /// Adds an endpoint identity. Fails if the ifindex already has one.
    pub fn insert_endpoint(
        &mut self,
        ifindex: u32,
        info: EndpointInfo,
    ) -> Result<(), DataplaneError> {
        self.endpoints
            .insert(ifindex, info, BPF_NOEXIST)
            .map_err(|e| {
                insert_error(
                    e,
                    MAP_ENDPOINTS,
                    format!("endpoint ifindex {ifindex}"),
                    self.max_endpoints,
                    "max_endpoints",
                )
            })?;
        self.place_in_cache(ifindex, info)?;
        // Last: `from_dns` finds the endpoint of a slot only once its identity is complete.
        self.set_slot_endpoint(info.slot, ifindex)
    }

    /// Records which endpoint holds a counter slot (0: none), for `from_dns`.
    fn set_slot_endpoint(&mut self, slot: u32, ifindex: u32) -> Result<(), DataplaneError> {
        self.slot_endpoints
            .set(slot, ifindex, 0)
            .map_err(|source| DataplaneError::UpdateMap {
                map: MAP_SLOT_ENDPOINTS,
                source: Box::new(source),
            })
    }

    /// The ifindex recorded for a counter slot (0: none).
    pub fn slot_endpoint(&self, slot: u32) -> Result<u32, DataplaneError> {
        self.slot_endpoints
            .get(&slot, 0)
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_SLOT_ENDPOINTS,
                source: Box::new(source),
            })
    }

    /// Puts the identity in its direct-mapped cache slot unless another live endpoint holds it
    /// (that one keeps the slot; this endpoint is then served by the hash).
    fn place_in_cache(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError> {
        let current = self.cache_slot(ifindex)?;
        let held = current.ifindex != 0
            && current.ifindex != ifindex
            && self.endpoint(current.ifindex)?.is_some();
        if held {
            return Ok(());
        }
        self.cache
            .set(
                ifindex & ENDPOINT_CACHE_MASK,
                EndpointSlot { ifindex, info },
                0,
            )
            .map_err(|source| DataplaneError::UpdateMap {
                map: MAP_ENDPOINT_CACHE,
                source: Box::new(source),
            })
    }

    /// The identity cached for `ifindex`, if its cache slot holds it.
    pub fn cached_endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, DataplaneError> {
        let slot = self.cache_slot(ifindex)?;
        Ok((slot.ifindex == ifindex).then_some(slot.info))
    }

    /// The cache slot `ifindex` maps to, whoever holds it.
    fn cache_slot(&self, ifindex: u32) -> Result<EndpointSlot, DataplaneError> {
        self.cache
            .get(&(ifindex & ENDPOINT_CACHE_MASK), 0)
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_ENDPOINT_CACHE,
                source: Box::new(source),
            })
    }

    /// Adds a route. Fails if the (cloud, address) pair is already routed.
    pub fn insert_route(&mut self, key: RouteKey, hop: NextHop) -> Result<(), DataplaneError> {
        self.routes.insert(key, hop, BPF_NOEXIST).map_err(|e| {
            let ip = std::net::Ipv4Addr::from(atoll_dataplane_common::ipv4_from_map(key.ipv4));
            insert_error(
                e,
                MAP_ROUTES,
                format!("route {ip} in cloud {}", key.cloud),
                self.max_routes,
                "max_routes",
            )
        })
    }

    /// Removes an endpoint identity; absent entries are not an error.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        // First: no DNS reply is steered to this endpoint any more. (A slot the map cannot
        // hold was never recorded, so a failed read means there is nothing to clear.)
        if let Some(info) = self.endpoint(ifindex)? {
            if self.slot_endpoint(info.slot).ok() == Some(ifindex) {
                self.set_slot_endpoint(info.slot, 0)?;
            }
        }
        let slot = ifindex & ENDPOINT_CACHE_MASK;
        let current = self.cache_slot(ifindex)?;
        if current.ifindex == ifindex {
            let empty = EndpointSlot {
                ifindex: 0,
                info: EndpointInfo {
                    cloud: 0,
                    ipv4: 0,
                    gateway_ipv4: 0,
                    mac: [0; 6],
                    gateway_mac: [0; 6],
                    slot: 0,
                },
            };
            self.cache
                .set(slot, empty, 0)
                .map_err(|source| DataplaneError::UpdateMap {
                    map: MAP_ENDPOINT_CACHE,
                    source: Box::new(source),
                })?;
        }
        ignore_missing(self.endpoints.remove(&ifindex), MAP_ENDPOINTS)
    }

    /// Removes a route; absent entries are not an error.
    pub fn remove_route(&mut self, key: RouteKey) -> Result<(), DataplaneError> {
        ignore_missing(self.routes.remove(&key), MAP_ROUTES)
    }

    pub fn route(&self, key: RouteKey) -> Result<Option<NextHop>, DataplaneError> {
        match self.routes.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::ReadMap {
                map: MAP_ROUTES,
                source: Box::new(source),
            }),
        }
    }

    pub fn endpoint(&self, ifindex: u32) -> Result<Option<EndpointInfo>, DataplaneError> {
        match self.endpoints.get(&ifindex, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::ReadMap {
                map: MAP_ENDPOINTS,
                source: Box::new(source),
            }),
        }
    }

    pub fn endpoints(&self) -> Result<Vec<(u32, EndpointInfo)>, DataplaneError> {
        self.endpoints
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_ENDPOINTS,
                source: Box::new(source),
            })
    }

    pub fn routes(&self) -> Result<Vec<(RouteKey, NextHop)>, DataplaneError> {
        self.routes
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_ROUTES,
                source: Box::new(source),
            })
    }

    /// Capacity of the endpoint map, which is also the number of counter slots.
    pub fn max_endpoints(&self) -> u32 {
        self.max_endpoints
    }

    /// The counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<EndpointCounters, DataplaneError> {
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_COUNTERS,
                source: Box::new(source),
            })?;
        let mut total = sum_counters(per_cpu.iter());
        self.carry.add_counters(slot, &mut total)?;
        Ok(total)
    }

    /// Zeroes `slot` on every CPU (before the slot is given to a new endpoint).
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let update = |source| DataplaneError::UpdateMap {
            map: MAP_COUNTERS,
            source: Box::new(source),
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            update(MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }))
        })?;
        let zeros = PerCpuValues::try_from(vec![EndpointCounters::ZERO; cpus]).map_err(|e| {
            update(MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            }))
        })?;
        self.counters.set(slot, zeros, 0).map_err(update)?;
        self.carry.reset(slot, cpus)
    }

    /// Drop counters summed over CPUs, for every reason (zeros included).
    pub fn drop_counters(&self) -> Result<Vec<(DropReason, u64)>, DataplaneError> {
        let mut drops = read_drop_counters(&self.drops)?;
        self.carry.add_drops(&mut drops)?;
        Ok(drops)
    }

    /// The DNS service `from_vm` sends DNS to (`ifindex` 0: none).
    pub fn dns_service(&self) -> Result<DnsService, DataplaneError> {
        self.dns_service
            .get(&0, 0)
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_DNS_SERVICE,
                source: Box::new(source),
            })
    }

    /// Sets (or with [`DnsService::OFF`] clears) where DNS to the gateway goes. The device must
    /// exist, be up and carry `from_dns` ([`Dataplane::attach_dns`]) before it is set here.
    pub fn set_dns_service(&mut self, service: DnsService) -> Result<(), DataplaneError> {
        self.dns_service
            .set(0, service, 0)
            .map_err(|source| DataplaneError::UpdateMap {
                map: MAP_DNS_SERVICE,
                source: Box::new(source),
            })
    }

    /// Attaches `from_dns` to the ingress of the host-side DNS device and pins the link as
    /// `links/dns-<ifindex>`, unless that pin exists already (the agent restarted and the device
    /// is the same). Pins of `from_dns` on other (earlier) devices are removed.
    pub fn attach_dns(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_host_hook(HostHook::Dns, ifname, ifindex)
    }

    /// Removes every pinned `from_dns` link (detaching it from a device that still exists).
    pub fn detach_dns(&mut self) -> Result<(), DataplaneError> {
        self.detach_host_hook(HostHook::Dns)
    }

    /// Attaches `hook`'s program to the ingress of `ifname` and pins the link as
    /// `links/<prefix><ifindex>`, unless that pin exists already (the agent restarted and the
    /// device is the same). The hook's pins on other (earlier) devices are removed: one device
    /// per hook.
    pub(crate) fn attach_host_hook(
        &mut self,
        hook: HostHook,
        ifname: &str,
        ifindex: u32,
    ) -> Result<(), DataplaneError> {
        let links = self.dir.join("links");
        let prefix = hook.link_prefix();
        for stale in self.links_named(prefix)? {
            if stale != ifindex {
                remove_pin(&links.join(format!("{prefix}{stale}")))?;
            }
        }
        let path = links.join(format!("{prefix}{ifindex}"));
        if path.exists() {
            return Ok(());
        }
        let prog = match hook {
            HostHook::Dns => &mut self.from_dns,
            HostHook::Uplink => &mut self.from_uplink,
            HostHook::Overlay => &mut self.from_overlay,
            HostHook::Underlay => &mut self.from_underlay,
        };
        attach_pinned(
            prog,
            hook.program(),
            (ifname, TcAttachType::Ingress, hook.order()),
            &path,
        )
    }

    /// Removes every pinned link of `hook` (detaching it from a device that still exists).
    pub(crate) fn detach_host_hook(&mut self, hook: HostHook) -> Result<(), DataplaneError> {
        let links = self.dir.join("links");
        let prefix = hook.link_prefix();
        for ifindex in self.links_named(prefix)? {
            remove_pin(&links.join(format!("{prefix}{ifindex}")))?;
        }
        Ok(())
    }

    /// ifindexes with a pinned `from_dns` link.
    pub fn dns_links(&self) -> Result<Vec<u32>, DataplaneError> {
        self.links_named(DNS_LINK_PREFIX)
    }

    /// ifindexes of the link pins named `<prefix><ifindex>`.
    fn links_named(&self, prefix: &str) -> Result<Vec<u32>, DataplaneError> {
        let dir = self.dir.join("links");
        let entries = std::fs::read_dir(&dir).map_err(|source| DataplaneError::CreatePinDir {
            path: dir.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok())
            .collect())
    }

    /// Removes every pin of this layout: all links detach, and maps and programs are freed once
    /// nothing else holds them.
    pub fn destroy(self) -> Result<(), DataplaneError> {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(|source| DataplaneError::Unpin { path: dir, source })
    }
}

/// Sums a per-CPU drop counter array (shared by the pinned dataplane and private test loads).
pub fn read_drop_counters<T: std::borrow::Borrow<MapData>>(
    drops: &PerCpuArray<T, u64>,
) -> Result<Vec<(DropReason, u64)>, DataplaneError> {
    DropReason::ALL
        .iter()
        .map(|r| {
            let per_cpu = drops
                .get(&(*r as u32), 0)
                .map_err(|source| DataplaneError::ReadMap {
                    map: MAP_DROPS,
                    source: Box::new(source),
                })?;
            Ok((*r, per_cpu.iter().sum()))
        })
        .collect()
}

/// Sums per-CPU counter values.
pub fn sum_counters<'a>(per_cpu: impl Iterator<Item = &'a EndpointCounters>) -> EndpointCounters {
    let mut total = EndpointCounters::ZERO;
    for c in per_cpu {
        for (td, cd) in total.traffic.iter_mut().zip(c.traffic.iter()) {
            for (t, x) in td.iter_mut().zip(cd.iter()) {
                t.packets += x.packets;
                t.bytes += x.bytes;
            }
        }
        for (t, x) in total.drops.iter_mut().zip(c.drops.iter()) {
            *t += x;
        }
    }
    total
}

/// Attaches `prog` to `ifname` with TCX at `order` and pins the link at `path`.
fn attach_pinned(
    prog: &mut SchedClassifier,
    name: &'static str,
    (ifname, kind, order): (&str, TcAttachType, LinkOrder),
    path: &Path,
) -> Result<(), DataplaneError> {
    let id = prog
        .attach_with_options(ifname, kind, TcAttachOptions::TcxOrder(order))
        .map_err(|source| attach_error(name, ifname, source))?;
    let link = prog
        .take_link(id)
        .map_err(|source| DataplaneError::Attach {
            program: name,
            device: ifname.into(),
            source: Box::new(source),
        })?;
    let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::AttachLink {
        program: name,
        device: ifname.into(),
        source: Box::new(source),
    })?;
    fd_link.pin(path).map_err(|e| DataplaneError::Pin {
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(())
}

/// docs/design.md cannot drift from the code: its maps table names exactly the maps the agent
/// pins, which are exactly the eBPF object's, and its drop-reason table is the shared
/// `DropReason` table, numbers and names in order. Root-free: the object is only parsed.
#[cfg(test)]
mod design_doc {
    use super::*;

    fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
        let start = doc
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("docs/design.md has no {heading:?}"));
        let rest = &doc[start + heading.len() + 2..];
        &rest[..rest.find("\n## ").unwrap_or(rest.len())]
    }

    /// The first cell of every table row of `text` whose first cell is code (`` `X` ``).
    fn first_code_cells(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_string()))
            .collect()
    }

    #[test]
    fn design_doc_tables_match_the_code() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/design.md"))
                .expect("docs/design.md");
        let mut documented = first_code_cells(section(&doc, "## Maps"));
        documented.sort();
        let mut pinned: Vec<String> = maps::REGISTRY.iter().map(|m| m.name.to_string()).collect();
        pinned.sort();
        assert_eq!(documented, pinned, "docs/design.md's maps table");
        let object = aya_obj::Object::parse(OBJECT).expect("the eBPF object parses");
        let mut in_object: Vec<String> = object
            .maps
            .keys()
            .filter(|m| !m.starts_with('.'))
            .cloned()
            .collect();
        in_object.sort();
        assert_eq!(in_object, pinned, "the eBPF object's maps");
        let mut programs: Vec<&str> = object.programs.keys().map(String::as_str).collect();
        programs.sort();
        let mut known = PINNED_PROGS.to_vec();
        known.sort();
        assert_eq!(programs, known, "the eBPF object's programs");
        // The license the object declares to the kernel is the eBPF crates' Cargo license.
        assert_eq!(object.license.to_str().unwrap(), "Dual MIT/GPL");
        for manifest in [
            concat!(env!("CARGO_MANIFEST_DIR"), "/../dataplane-ebpf/Cargo.toml"),
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../dataplane-ebpf/common/Cargo.toml"
            ),
        ] {
            let text = std::fs::read_to_string(manifest).unwrap();
            assert!(
                text.lines()
                    .any(|l| l == "license = \"MIT OR GPL-2.0-only\""),
                "{manifest}: the license must be the object's (Dual MIT/GPL)"
            );
        }

        let rows: Vec<(u32, String)> = section(&doc, "## Drop reasons")
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix('|')?.split('|').map(str::trim);
                let n = cells.next()?.parse().ok()?;
                let name = cells.next()?.trim_matches('`').to_string();
                Some((n, name))
            })
            .collect();
        let code: Vec<(u32, String)> = atoll_dataplane_common::DropReason::ALL
            .iter()
            .map(|r| (*r as u32, r.name().to_string()))
            .collect();
        assert_eq!(rows, code, "docs/design.md's drop-reason table");
    }

    /// The map registry is the object's maps: kind, key and value sizes, flags and, where the
    /// object fixes it, capacity (maps sized by a setting are resized by the loader).
    #[test]
    fn the_objects_maps_are_the_registrys() {
        let object = aya_obj::Object::parse(OBJECT).expect("the eBPF object parses");
        for m in &maps::REGISTRY {
            let o = object
                .maps
                .get(m.name)
                .unwrap_or_else(|| panic!("{} is not in the object", m.name));
            assert_eq!(o.map_type(), m.kind as u32, "{}: kind {:?}", m.name, m.kind);
            assert_eq!(o.key_size(), m.key_size, "{}: key size", m.name);
            assert_eq!(o.value_size(), m.value_size, "{}: value size", m.name);
            assert_eq!(o.map_flags(), m.flags, "{}: flags", m.name);
            if let maps::Capacity::Fixed(n) = m.capacity {
                assert_eq!(o.max_entries(), n, "{}: max_entries", m.name);
            }
        }
    }

    /// A new drop reason or traffic class changes no map: the counters are sized by the room
    /// they keep (`DROP_SLOTS`, `TRAFFIC_CLASS_SLOTS`), never by the reasons and classes in use,
    /// and the reasons and classes in use fit that room with space left. So the registry's
    /// shapes, which the shape checks and migrations compare pins with, are the same whatever
    /// `DropReason::ALL` and `TrafficClass::ALL` hold.
    #[test]
    fn a_new_drop_reason_or_traffic_class_needs_no_layout_change() {
        use atoll_dataplane_common::{
            Direction, DropReason, TrafficClass, TrafficCounter, DROP_SLOTS, TRAFFIC_CLASS_SLOTS,
        };
        let counters = maps::find(MAP_COUNTERS).unwrap();
        assert_eq!(
            counters.value_size as usize,
            Direction::COUNT * TRAFFIC_CLASS_SLOTS * std::mem::size_of::<TrafficCounter>()
                + DROP_SLOTS as usize * 8
        );
        assert_eq!(
            maps::find(MAP_DROPS).unwrap().capacity,
            maps::Capacity::Fixed(DROP_SLOTS)
        );
        const _: () = assert!(DropReason::SLOTS < DROP_SLOTS, "room for another reason");
        const _: () = assert!(
            TrafficClass::COUNT < TRAFFIC_CLASS_SLOTS,
            "room for a class"
        );
        // The highest number a new reason would take is counted on both sides.
        let next = DropReason::SLOTS as usize;
        let mut c = atoll_dataplane_common::EndpointCounters::ZERO;
        c.drops[next] += 1;
        c.traffic[Direction::ToGuest as usize][TrafficClass::COUNT].packets += 1;
        assert_eq!(c.drops.iter().sum::<u64>(), 1);
    }
}
