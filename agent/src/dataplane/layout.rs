//! Map layout versions: what every pinned map must look like, and the migration of the
//! previous layout's pins into the current one.
//!
//! Decisions:
//! - **Checked, not trusted.** aya opens a pinned map by path without comparing it with the
//!   object's definition, and a program would then read whatever bytes are there. So every
//!   open compares each pinned map's type, key and value size, flags and capacity with
//!   [`expected`]: a mismatch under the same layout version is a clear error
//!   ([`DataplaneError::MapMismatch`]). Capacities sized by a setting are the pinned ones
//!   (fixed when the dataplane is created, see [`pinned_sizes`]): maps sized by one setting
//!   must agree ([`DataplaneError::MapCapacity`]), and a configured size the pins do not have
//!   is reported ([`unapplied_sizes`]: `run` warns, the doctor too), not an error, so
//!   changing a size in the config never takes a running host's agent down.
//! - **Migration reuses kernel maps.** A layout version names the meaning of every map, so a
//!   migration is a per-version table ([`steps_from`]) saying, for each map of the current
//!   layout, whether the old map means the same (`Keep`: the very same kernel map is pinned
//!   into the new layout, so no entry is copied and none can be missed while traffic flows:
//!   identities, routes, the endpoint cache, DNS service and slots), holds counters whose new
//!   layout only appends words (`Carry`: reused if its shape is unchanged, else frozen under
//!   `carry/` and added to the new counters, see the `carry` module), or is new (`New`:
//!   created empty). Copying entries would race with the programs that keep writing counters
//!   and flow tables; reusing or freezing the old map loses nothing.
//! - **Order.** The new layout is built in a temporary directory (reused maps pinned again,
//!   new maps created, programs loaded against them and pinned, the build marker) and renamed
//!   into place; then every pinned TCX link of the old layout gets the new program with one
//!   `BPF_LINK_UPDATE` and its pin is moved into the new `links/`; last, the old directory is
//!   removed (freeing the old programs and the maps nothing references any more). A crash at
//!   any point is resumed by the next start: the new layout exists and shares `ENDPOINTS`
//!   with the old one, so only the remaining links are switched.
//! - **Only from the previous version.** Older pins are refused with the manual path (drain,
//!   remove); downgrades across a layout change are refused.

use std::path::{Path, PathBuf};

use atoll_dataplane_common::{
    DnsService, DropReason, EndpointCounters, EndpointInfo, EndpointSlot, FlowIn, FlowKey, FlowOut,
    NextHop, RouteKey, VipService, ENDPOINT_CACHE_SLOTS, LAYOUT_VERSION,
};
use aya::maps::{MapData, MapInfo, MapType};

use super::{
    attach_kfree_skb, carry, create_layout_dirs, layout_dir, load_object, pin_programs, rename,
    tmp_dir, upgrade, DataplaneError, MAPS, MAP_COUNTERS, MAP_DNS_SERVICE, MAP_DROPS,
    MAP_ENDPOINTS, MAP_ENDPOINT_CACHE, MAP_FLOWS_IN, MAP_FLOWS_OUT, MAP_ROUTES, MAP_SLOT_ENDPOINTS,
    MAP_VIPS,
};
use crate::config::DataplaneConfig;

/// `BPF_F_NO_PREALLOC`.
const NO_PREALLOC: u32 = 1;

/// How many entries a map has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Capacity {
    /// Fixed by the object.
    Fixed(u32),
    /// From `dataplane.<setting>`.
    Config(&'static str),
}

/// What a pinned map must look like for this build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Shape {
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub capacity: Capacity,
}

const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// The shape of map `name` in this build (the `#[repr(C)]` types shared with the programs).
pub(super) fn expected(name: &str) -> Option<Shape> {
    let shape = |kind, key_size, value_size, flags, capacity| Shape {
        kind,
        key_size,
        value_size,
        flags,
        capacity,
    };
    Some(match name {
        MAP_ENDPOINTS => shape(
            MapType::Hash,
            size::<u32>(),
            size::<EndpointInfo>(),
            0,
            Capacity::Config("max_endpoints"),
        ),
        MAP_ENDPOINT_CACHE => shape(
            MapType::Array,
            size::<u32>(),
            size::<EndpointSlot>(),
            0,
            Capacity::Fixed(ENDPOINT_CACHE_SLOTS),
        ),
        MAP_ROUTES => shape(
            MapType::Hash,
            size::<RouteKey>(),
            size::<NextHop>(),
            0,
            Capacity::Config("max_routes"),
        ),
        MAP_DROPS => shape(
            MapType::PerCpuArray,
            size::<u32>(),
            size::<u64>(),
            0,
            Capacity::Fixed(DropReason::SLOTS),
        ),
        MAP_COUNTERS => shape(
            MapType::PerCpuArray,
            size::<u32>(),
            size::<EndpointCounters>(),
            0,
            Capacity::Config("max_endpoints"),
        ),
        MAP_DNS_SERVICE => shape(
            MapType::Array,
            size::<u32>(),
            size::<DnsService>(),
            0,
            Capacity::Fixed(1),
        ),
        MAP_SLOT_ENDPOINTS => shape(
            MapType::Array,
            size::<u32>(),
            size::<u32>(),
            0,
            Capacity::Config("max_endpoints"),
        ),
        MAP_VIPS => shape(
            MapType::Hash,
            size::<RouteKey>(),
            size::<VipService>(),
            NO_PREALLOC,
            Capacity::Config("max_vips"),
        ),
        MAP_FLOWS_OUT => shape(
            MapType::LruHash,
            size::<FlowKey>(),
            size::<FlowOut>(),
            0,
            Capacity::Config("max_flows"),
        ),
        MAP_FLOWS_IN => shape(
            MapType::LruHash,
            size::<FlowKey>(),
            size::<FlowIn>(),
            0,
            Capacity::Config("max_flows"),
        ),
        _ => return None,
    })
}

fn configured(cfg: &DataplaneConfig, setting: &str) -> u32 {
    match setting {
        "max_endpoints" => cfg.max_endpoints,
        "max_routes" => cfg.max_routes,
        "max_vips" => cfg.max_vips,
        _ => cfg.max_flows,
    }
}

/// Each size setting and the map whose capacity defines it in a pinned dataplane.
const SIZED_BY: [(&str, &str); 4] = [
    ("max_endpoints", MAP_ENDPOINTS),
    ("max_routes", MAP_ROUTES),
    ("max_vips", MAP_VIPS),
    ("max_flows", MAP_FLOWS_OUT),
];

/// The sizes of the dataplane pinned under `maps`: each setting from the capacity of the map
/// that defines it where that map is pinned, else from `cfg`. Sizes are fixed when a dataplane
/// is created, so a changed setting applies to the next one created (see
/// [`unapplied_sizes`]).
pub(super) fn pinned_sizes(maps: &Path, cfg: &DataplaneConfig) -> DataplaneConfig {
    let mut sizes = cfg.clone();
    for (setting, map) in SIZED_BY {
        if let Ok(info) = MapInfo::from_pin(maps.join(map)) {
            let n = info.max_entries();
            match setting {
                "max_endpoints" => sizes.max_endpoints = n,
                "max_routes" => sizes.max_routes = n,
                "max_vips" => sizes.max_vips = n,
                _ => sizes.max_flows = n,
            }
        }
    }
    sizes
}

/// Size settings of `cfg` that the dataplane pinned under `root` does not apply: (setting,
/// configured, pinned).
pub fn unapplied_sizes(root: &Path, cfg: &DataplaneConfig) -> Vec<(&'static str, u32, u32)> {
    let sizes = pinned_sizes(&layout_dir(root).join("maps"), cfg);
    SIZED_BY
        .iter()
        .map(|(setting, _)| {
            (
                *setting,
                configured(cfg, setting),
                configured(&sizes, setting),
            )
        })
        .filter(|(_, want, have)| want != have)
        .collect()
}

fn map_info(path: &Path) -> Result<MapInfo, DataplaneError> {
    MapInfo::from_pin(path).map_err(|source| DataplaneError::OpenMap {
        path: path.into(),
        source: Box::new(source),
    })
}

/// Checks one pinned map against its expected shape, and its capacity against `sizes` (the
/// dataplane's, see [`pinned_sizes`]: maps sized by one setting must agree).
pub(super) fn check_map(
    path: &Path,
    name: &str,
    sizes: &DataplaneConfig,
) -> Result<MapInfo, DataplaneError> {
    let info = map_info(path)?;
    let want = expected(name).ok_or_else(|| DataplaneError::MapMismatch {
        path: path.into(),
        problem: "this build has no such map".into(),
    })?;
    if let Some(problem) = shape_problem(&info, &want) {
        return Err(DataplaneError::MapMismatch {
            path: path.into(),
            problem,
        });
    }
    if let Capacity::Config(setting) = want.capacity {
        let expected = configured(sizes, setting);
        if info.max_entries() != expected {
            return Err(DataplaneError::MapCapacity {
                path: path.into(),
                pinned: info.max_entries(),
                expected,
                setting,
            });
        }
    }
    Ok(info)
}

/// Why `info` does not have the shape `want` (capacities from the config are checked apart).
pub(super) fn shape_problem(info: &MapInfo, want: &Shape) -> Option<String> {
    let kind = info.map_type().ok();
    if kind != Some(want.kind) {
        return Some(format!("type is {kind:?}, expected {:?}", want.kind));
    }
    if info.key_size() != want.key_size {
        return Some(format!(
            "key size is {} bytes, expected {}",
            info.key_size(),
            want.key_size
        ));
    }
    if info.value_size() != want.value_size {
        return Some(format!(
            "value size is {} bytes, expected {}",
            info.value_size(),
            want.value_size
        ));
    }
    if info.map_flags() != want.flags {
        return Some(format!(
            "flags are {:#x}, expected {:#x}",
            info.map_flags(),
            want.flags
        ));
    }
    match want.capacity {
        Capacity::Fixed(n) if info.max_entries() != n => Some(format!(
            "max_entries is {}, expected {n}",
            info.max_entries()
        )),
        _ => None,
    }
}

/// Checks every map pinned under `maps` (capacities against each other, see
/// [`pinned_sizes`]); returns the dataplane's sizes.
pub(super) fn check_maps(
    maps: &Path,
    cfg: &DataplaneConfig,
) -> Result<DataplaneConfig, DataplaneError> {
    let sizes = pinned_sizes(maps, cfg);
    for name in MAPS {
        check_map(&maps.join(name), name, &sizes)?;
    }
    Ok(sizes)
}

/// Layout versions pinned under `root` (`v<N>` directories), ascending.
pub fn layout_versions(root: &Path) -> Result<Vec<u32>, DataplaneError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DataplaneError::ReadPinDir {
                path: root.into(),
                source,
            })
        }
    };
    let mut out: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// For [`super::Dataplane::open`]: any layout but the current one is an error naming what to do.
pub(super) fn refuse_other_layouts(root: &Path) -> Result<(), DataplaneError> {
    match layout_versions(root)?
        .into_iter()
        .find(|v| *v != LAYOUT_VERSION)
    {
        None => Ok(()),
        Some(v) if v > LAYOUT_VERSION => Err(DataplaneError::NewerLayout {
            root: root.into(),
            found: v,
        }),
        Some(v) if steps_from(v).is_some() => Err(DataplaneError::MigrationPending {
            root: root.into(),
            found: v,
        }),
        Some(v) => Err(unsupported(root, v)),
    }
}

fn unsupported(root: &Path, found: u32) -> DataplaneError {
    DataplaneError::MigrationUnsupported {
        root: root.into(),
        found,
        supported: LAYOUT_VERSION - 1,
    }
}

/// What a migration does with one map of the current layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Same meaning and shape: the old kernel map becomes the new layout's.
    Keep,
    /// Counters whose new layout appends words: reused if the shape is unchanged, else frozen
    /// under `carry/` (see the `carry` module) and a new map created.
    Carry,
    /// New in this layout: created empty.
    New,
}

/// The migration into the current layout from `version`, map by map.
pub(super) fn steps_from(version: u32) -> Option<[(&'static str, Step); 10]> {
    match version {
        // v3 → v4 (exposures): `NextHop`'s reserved `u16` (always 0) became `flags`, where 0
        // is `NEXTHOP_ENDPOINT`, so v3 routes mean the same; drop reasons 29-36 were appended
        // (`EndpointCounters.drops` and `DROPS` grew); `VIPS` and the flow tables are new.
        3 => Some([
            (MAP_ENDPOINTS, Step::Keep),
            (MAP_ENDPOINT_CACHE, Step::Keep),
            (MAP_ROUTES, Step::Keep),
            (MAP_DROPS, Step::Carry),
            (MAP_COUNTERS, Step::Carry),
            (MAP_DNS_SERVICE, Step::Keep),
            (MAP_SLOT_ENDPOINTS, Step::Keep),
            (MAP_VIPS, Step::New),
            (MAP_FLOWS_OUT, Step::New),
            (MAP_FLOWS_IN, Step::New),
        ]),
        _ => None,
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Migrated {
    pub links: usize,
    pub stale_links: usize,
    pub carried: Vec<String>,
}

/// Migrates the pins of layout `from` under `root` into the current layout (see module docs).
pub(super) fn migrate(
    cfg: &DataplaneConfig,
    root: &Path,
    from: u32,
) -> Result<Migrated, DataplaneError> {
    let steps = steps_from(from).ok_or_else(|| unsupported(root, from))?;
    let old = root.join(format!("v{from}"));
    let new = layout_dir(root);
    let mut report = Migrated::default();
    if new.exists() {
        ensure_same_dataplane(&old, &new)?;
    } else {
        // Kept maps keep their sizes; new maps sized by the same setting must match them.
        let sizes = pinned_sizes(&old.join("maps"), cfg);
        report.carried = build_new_layout(&sizes, &old, &new, from, &steps)?;
    }
    let mut programs = upgrade::Programs::open(&new.join("progs"), "")?;
    let switched =
        upgrade::switch_links(&mut programs, &old.join("links"), Some(&new.join("links")))?;
    report.links = switched.switched;
    report.stale_links = switched.stale;
    std::fs::remove_dir_all(&old).map_err(|source| DataplaneError::Unpin { path: old, source })?;
    Ok(report)
}

/// A resumed migration: the new layout must have been built from the old one (same kernel map
/// behind both `ENDPOINTS` pins).
fn ensure_same_dataplane(old: &Path, new: &Path) -> Result<(), DataplaneError> {
    let id = |dir: &Path| map_info(&dir.join("maps").join(MAP_ENDPOINTS)).map(|i| i.id());
    if id(old)? != id(new)? {
        return Err(DataplaneError::MigrationDiverged {
            old: old.into(),
            new: new.into(),
        });
    }
    Ok(())
}

/// Builds the current layout at `new` from the maps of `old`; returns the carried maps.
fn build_new_layout(
    cfg: &DataplaneConfig,
    old: &Path,
    new: &Path,
    from: u32,
    steps: &[(&'static str, Step)],
) -> Result<Vec<String>, DataplaneError> {
    let tmp = tmp_dir(new);
    let result = (|| {
        create_layout_dirs(&tmp)?;
        let mut carried = Vec::new();
        for (name, step) in steps {
            let old_path = old.join("maps").join(name);
            match step {
                Step::New => {}
                Step::Keep => {
                    check_map(&old_path, name, cfg)?;
                    repin(&old_path, &tmp.join("maps").join(name))?;
                }
                Step::Carry => {
                    let same = check_map(&old_path, name, cfg).is_ok();
                    let target = if same {
                        tmp.join("maps").join(name)
                    } else {
                        let info = map_info(&old_path)?;
                        carry::check_carryable(&old_path, name, &info, cfg)?;
                        carried.push(name.to_string());
                        tmp.join(carry::DIR).join(carry::pin_name(name, from))
                    };
                    repin(&old_path, &target)?;
                }
            }
        }
        // Counters an earlier migration froze stay frozen.
        for entry in read_dir(&old.join(carry::DIR))? {
            repin(&entry, &tmp.join(carry::DIR).join(file_name(&entry)))?;
        }
        let mut ebpf = load_object(cfg, &tmp.join("maps"))?;
        pin_programs(&mut ebpf, &tmp.join("progs"), "")?;
        attach_kfree_skb(&mut ebpf, &tmp.join("links"))?;
        upgrade::mark_build(&tmp)?;
        rename(&tmp, new)?;
        Ok(carried)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Pins the map pinned at `from` also at `to` (the same kernel map).
fn repin(from: &Path, to: &Path) -> Result<(), DataplaneError> {
    let map = MapData::from_pin(from).map_err(|source| DataplaneError::OpenMap {
        path: from.into(),
        source: Box::new(source),
    })?;
    map.pin(to).map_err(|e| DataplaneError::Pin {
        path: to.into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Entries of a pin directory (none if it does not exist).
pub(super) fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()).map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DataplaneError::ReadPinDir {
            path: dir.into(),
            source,
        }),
    }
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// How full one pinned map is (for `atoll-agent doctor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapUsage {
    pub map: &'static str,
    pub used: u32,
    pub max_entries: u32,
    /// The setting that sizes it.
    pub setting: &'static str,
}

/// Entries used vs capacity of the pinned `ENDPOINTS`, `ROUTES` and `VIPS` maps of the current
/// layout under `root`; `None` if nothing is pinned there. Opens nothing else and creates
/// nothing.
pub fn map_usage(root: &Path) -> Result<Option<Vec<MapUsage>>, DataplaneError> {
    let maps = layout_dir(root).join("maps");
    if !maps.exists() {
        return Ok(None);
    }
    let endpoints = count::<u32, EndpointInfo>(&maps, MAP_ENDPOINTS, "max_endpoints")?;
    let routes = count::<RouteKey, NextHop>(&maps, MAP_ROUTES, "max_routes")?;
    let vips = count::<RouteKey, VipService>(&maps, MAP_VIPS, "max_vips")?;
    Ok(Some(vec![endpoints, routes, vips]))
}

/// Entries of the pinned hash map `map` (keys walked with `BPF_MAP_GET_NEXT_KEY`).
fn count<K: aya::Pod, V: aya::Pod>(
    maps: &Path,
    map: &'static str,
    setting: &'static str,
) -> Result<MapUsage, DataplaneError> {
    let path = maps.join(map);
    let open_err = |source| DataplaneError::OpenMap {
        path: path.clone(),
        source: Box::new(source),
    };
    let info = map_info(&path)?;
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let typed: aya::maps::HashMap<MapData, K, V> = aya::maps::Map::from_map_data(data)
        .and_then(aya::maps::HashMap::try_from)
        .map_err(open_err)?;
    let mut used = 0u32;
    for key in typed.keys() {
        key.map_err(|source| DataplaneError::ReadMap {
            map,
            source: Box::new(source),
        })?;
        used += 1;
    }
    Ok(MapUsage {
        map,
        used,
        max_entries: info.max_entries(),
        setting,
    })
}
