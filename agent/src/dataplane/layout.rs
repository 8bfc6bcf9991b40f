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
//!   migration is a table ([`MIGRATIONS`], one row per layout change, composed by
//!   [`steps_from`] from the pinned version on) saying, for each map of the current layout,
//!   whether the old map means the same (`Keep`: the very same kernel map is pinned into the
//!   new layout, so no entry is copied and none can be missed while traffic flows:
//!   identities, routes, the endpoint cache, DNS service and slots), holds counters whose every
//!   old word keeps its meaning (`Carry`: reused if its shape is unchanged, else frozen under
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
//! - **From the versions the table reaches** ([`OLDEST_MIGRATED`] on). Older pins are refused
//!   with the manual path (drain, remove); downgrades across a layout change are refused.

use std::path::Path;

use atoll_dataplane_common::{EndpointInfo, NextHop, RouteKey, VipService, LAYOUT_VERSION};
use aya::maps::{MapData, MapInfo};

use super::{
    carry,
    error::DataplaneError,
    links,
    maps::{self, Capacity, MapSpec, SizeSetting, MAP_ENDPOINTS, MAP_ROUTES, MAP_VIPS},
    pins::*,
};
use crate::config::DataplaneConfig;

/// The sizes of the dataplane pinned under `maps`: each setting from the capacity of the map
/// that defines it ([`maps::size_map`]) where that map is pinned, else from `cfg`. Sizes are
/// fixed when a dataplane is created, so a changed setting applies to the next one created
/// (see [`unapplied_sizes`]).
pub(super) fn pinned_sizes(maps: &Path, cfg: &DataplaneConfig) -> DataplaneConfig {
    let mut sizes = cfg.clone();
    for setting in SizeSetting::ALL {
        if let Ok(info) = MapInfo::from_pin(maps.join(maps::size_map(setting))) {
            setting.set(&mut sizes, info.max_entries());
        }
    }
    sizes
}

/// Size settings of `cfg` that the dataplane pinned under `root` does not apply: (setting,
/// configured, pinned).
pub fn unapplied_sizes(root: &Path, cfg: &DataplaneConfig) -> Vec<(&'static str, u32, u32)> {
    let sizes = pinned_sizes(&layout_dir(root).join("maps"), cfg);
    SizeSetting::ALL
        .iter()
        .map(|s| (s.name(), s.get(cfg), s.get(&sizes)))
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
    let want = maps::find(name).ok_or_else(|| DataplaneError::MapMismatch {
        path: path.into(),
        problem: "this build has no such map".into(),
    })?;
    if let Some(problem) = shape_problem(&info, want) {
        return Err(DataplaneError::MapMismatch {
            path: path.into(),
            problem,
        });
    }
    if let Capacity::Config(setting) = want.capacity {
        let expected = setting.get(sizes);
        if info.max_entries() != expected {
            return Err(DataplaneError::MapCapacity {
                path: path.into(),
                pinned: info.max_entries(),
                expected,
                setting: setting.name(),
            });
        }
    }
    Ok(info)
}

/// Why `info` does not have the shape `want` (capacities from the config are checked apart).
pub(super) fn shape_problem(info: &MapInfo, want: &MapSpec) -> Option<String> {
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
    for m in &maps::REGISTRY {
        check_map(&maps.join(m.name), m.name, &sizes)?;
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
        supported: OLDEST_MIGRATED,
    }
}

/// What a migration does with one map of the current layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Same meaning and shape: the old kernel map becomes the new layout's.
    Keep,
    /// Counters whose new layout keeps the meaning of every old word: reused if the shape is
    /// unchanged, else frozen under `carry/` (see the `carry` module) and a new map created.
    Carry,
    /// New in this layout: created empty.
    New,
}

/// One layout change: what each map of layout `to` does with the map of layout `to - 1`. A
/// map missing from a row is kept (`Step::Keep`).
struct Migration {
    to: u32,
    steps: &'static [(&'static str, Step)],
}

/// Every layout change the agent migrates, oldest first; the next one is one more row (and,
/// for counters, one more entry in `carry::OLDER_COUNTERS`).
const MIGRATIONS: &[Migration] = &[
    // v4, exposures: `NextHop`'s reserved `u16` (always 0) became `flags`, where 0 is
    // `NEXTHOP_ENDPOINT`, so v3 routes mean the same; drop reasons 29-36 were appended;
    // `VIPS` and the flow tables are new.
    Migration {
        to: 4,
        steps: &[
            (maps::MAP_DROPS, Step::Carry),
            (maps::MAP_COUNTERS, Step::Carry),
            (maps::MAP_VIPS, Step::New),
            (maps::MAP_FLOWS_OUT, Step::New),
            (maps::MAP_FLOWS_IN, Step::New),
        ],
    },
    // v5, counter headroom: `EndpointCounters` holds 8 traffic classes per direction and 64
    // drop numbers, `DROPS` 64, so new classes and reasons need no layout change.
    Migration {
        to: 5,
        steps: &[
            (maps::MAP_DROPS, Step::Carry),
            (maps::MAP_COUNTERS, Step::Carry),
        ],
    },
    // v6, egress and public ingress: drop reasons 37-47 took free numbers (no carry needed); the egress maps
    // and ingress maps are new.
    Migration {
        to: 6,
        steps: &[
            (maps::MAP_EGRESS_HOST, Step::New),
            (maps::MAP_EGRESS_CLOUDS, Step::New),
            (maps::MAP_EGRESS_NEVER, Step::New),
            (maps::MAP_EGRESS_ALLOW, Step::New),
            (maps::MAP_EGRESS_DENY, Step::New),
            (maps::MAP_EGRESS_OUT, Step::New),
            (maps::MAP_EGRESS_IN, Step::New),
            (maps::MAP_EGRESS_REFUSED, Step::New),
            (maps::MAP_EGRESS_METERS, Step::New),
            (maps::MAP_INGRESS, Step::New),
            (maps::MAP_INGRESS_ALLOW, Step::New),
            (maps::MAP_INGRESS_FLOWS, Step::New),
        ],
    },
    // v7, cached established flows: `EgressIn` gained the generation its flow was admitted
    // under (egress flows reopen on their next packet, on their old port when it is free);
    // the flow caches are new; an exposure address's route carries its grant in
    // `NextHop::ifindex`, where v6 routes have 0, which means "unknown" (those flows take the
    // `VIPS` path until the agent rewrites the route, which it does when it applies the
    // grant), so `ROUTES` is kept.
    Migration {
        to: 7,
        steps: &[
            (maps::MAP_EGRESS_IN, Step::New),
            (maps::MAP_EGRESS_RECENT, Step::New),
            (maps::MAP_EGRESS_HELD, Step::New),
            (maps::MAP_FLOWS_RECENT, Step::New),
            (maps::MAP_FLOWS_HELD, Step::New),
        ],
    },
    // v8, 64-bit reservation versions (a 32-bit one could be wrapped back to a value a
    // cached flow recorded): the flow caches and version arrays are new again.
    Migration {
        to: 8,
        steps: &[
            (maps::MAP_EGRESS_RECENT, Step::New),
            (maps::MAP_EGRESS_HELD, Step::New),
            (maps::MAP_FLOWS_RECENT, Step::New),
            (maps::MAP_FLOWS_HELD, Step::New),
        ],
    },
    // v9, cached exposure flows carry their checksum differences (`FlowRecent`'s padding
    // became `addresses_diff` and `ports_diff`, which a v8 slot has as 0): `FLOWS_RECENT` is
    // new; the versions keep their meaning.
    Migration {
        to: 9,
        steps: &[(maps::MAP_FLOWS_RECENT, Step::New)],
    },
    // v10, cache slots carry a sequence word (`seq`, where the padding was; `FlowRecent`'s
    // `held_slot` became 16 bits to make room): both flow caches are new.
    Migration {
        to: 10,
        steps: &[
            (maps::MAP_EGRESS_RECENT, Step::New),
            (maps::MAP_FLOWS_RECENT, Step::New),
        ],
    },
    // v11, a new-flow rate per cloud: `EGRESS_FLOW_CLOCKS` is new; `EgressCloud`'s padding
    // became `new_flows_per_sec`, where a v10 entry's 0 means "no limit" (the agent writes
    // the limit with the cloud's next change, or when egress is enabled), so
    // `EGRESS_CLOUDS` is kept; drop reasons 48 and 49 took free counter slots.
    Migration {
        to: 11,
        steps: &[(maps::MAP_EGRESS_FLOW_CLOCKS, Step::New)],
    },
    // v12, a new-flow rate per consumer cloud for exposures: `EXPOSURE_FLOW_RATE` and
    // `EXPOSURE_FLOW_CLOCKS` are new (the agent writes the rate when it opens the
    // dataplane); drop reason 50 took a free counter slot.
    Migration {
        to: 12,
        steps: &[
            (maps::MAP_EXPOSURE_FLOW_RATE, Step::New),
            (maps::MAP_EXPOSURE_FLOW_CLOCKS, Step::New),
        ],
    },
    // v13, the overlay: its four maps are new, `NextHop::flags` has a new value (remote
    // endpoints; no older route carries it), a new program (`from_overlay`) and traffic class
    // (`cross_host`, a free counter slot); drop reasons 51-58 took free counter slots.
    Migration {
        to: 13,
        steps: &[
            (maps::MAP_OVERLAY_HOST, Step::New),
            (maps::MAP_CLOUD_VNIS, Step::New),
            (maps::MAP_VNI_CLOUDS, Step::New),
            (maps::MAP_OVERLAY_PEERS, Step::New),
        ],
    },
    // v14, the programs encapsulate and decapsulate themselves: `OverlayHost` gained the
    // underlay device, UDP port and MTU (so `OVERLAY_HOST` is new, written again when the
    // agent turns the overlay on), a new program (`from_underlay`); drop reasons 59 and 60
    // took free counter slots.
    Migration {
        to: 14,
        steps: &[(maps::MAP_OVERLAY_HOST, Step::New)],
    },
];

/// The oldest layout [`MIGRATIONS`] reach the current one from.
const OLDEST_MIGRATED: u32 = 3;

/// The migration into the current layout from `version`, map by map: the rows from `version`
/// on, composed (a map new in any of them is new; else carried if any carries it; else kept).
pub(super) fn steps_from(version: u32) -> Option<Vec<(&'static str, Step)>> {
    if !(OLDEST_MIGRATED..LAYOUT_VERSION).contains(&version) {
        return None;
    }
    let rows: Vec<&Migration> = MIGRATIONS.iter().filter(|m| m.to > version).collect();
    Some(
        maps::REGISTRY
            .iter()
            .map(|m| {
                let steps = rows.iter().filter_map(|r| {
                    r.steps
                        .iter()
                        .find(|(name, _)| *name == m.name)
                        .map(|(_, s)| *s)
                });
                let step = steps.fold(Step::Keep, |acc, s| match (acc, s) {
                    (Step::New, _) | (_, Step::New) => Step::New,
                    (Step::Carry, _) | (_, Step::Carry) => Step::Carry,
                    _ => Step::Keep,
                });
                (m.name, step)
            })
            .collect(),
    )
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
    let mut programs = links::Programs::open(&new.join("progs"), "")?;
    let switched =
        links::switch_links(&mut programs, &old.join("links"), Some(&new.join("links")))?;
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
        mark_build(&tmp)?;
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
