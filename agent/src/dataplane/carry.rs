//! Counters of an older layout, frozen by a migration and added to the current counters.
//!
//! Decisions:
//! - **Frozen, not copied.** The programs add to per-CPU counters without atomics, so an agent
//!   cannot fold old values into live counters without racing them (a read-modify-write loses
//!   the increments made in between). A migration whose counter layout changed instead keeps
//!   the old map pinned as `carry/<MAP>-v<N>`; once the links run the new programs nothing
//!   writes it (a program still running on the old map at the switch adds to it, which is
//!   still counted), and every read adds it in: [`super::Dataplane::counters`] and
//!   [`super::Dataplane::drop_counters`] see old + new, so usage records and metrics continue
//!   without a gap or a jump.
//! - **Old layouts by table.** Each older counter layout the agent carries is one row of
//!   [`OLDER_COUNTERS`] (its version and words); an old value is read as words and added word
//!   by word, the traffic words (then 4 classes per direction) to their class and direction,
//!   the drop words to their reason (numbers are never reused). Anything else cannot be carried
//!   and the migration refuses it. Since layout 5 the counters keep room for new classes and
//!   reasons, so a new one needs no row here.
//! - **A reused slot starts at zero**: [`Carry::reset`] clears its carried value too.

use std::path::Path;

use atoll_dataplane_common::{DropReason, EndpointCounters, DROP_SLOTS};
use aya::maps::{Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};

use super::{
    error::DataplaneError,
    maps::{MAP_COUNTERS, MAP_DROPS},
    pins,
};
use crate::config::DataplaneConfig;

/// Directory of carried maps inside a layout directory.
pub(super) const DIR: &str = pins::CARRY_DIR;

/// The `EndpointCounters` of older layouts that migrations carry: (layout, words). Each was
/// 16 traffic words then its drop slots: v3 had 29, v4 37.
const OLDER_COUNTERS: [(u32, usize); 2] = [(3, 45), (4, 53)];

/// Words of the traffic part of the older `EndpointCounters` (`[direction][class]` × packets,
/// bytes, with 4 classes per direction).
const TRAFFIC_WORDS: usize = 16;

/// A carried `COUNTERS` map of one older layout, typed by its value's words.
enum OldCounters {
    V3(PerCpuArray<MapData, [u64; 45]>),
    V4(PerCpuArray<MapData, [u64; 53]>),
}

impl OldCounters {
    fn open(version: u32, map: Map) -> Result<Self, aya::maps::MapError> {
        Ok(match version {
            3 => OldCounters::V3(PerCpuArray::try_from(map)?),
            _ => OldCounters::V4(PerCpuArray::try_from(map)?),
        })
    }

    fn add(&self, slot: u32, total: &mut EndpointCounters) -> Result<(), aya::maps::MapError> {
        match self {
            OldCounters::V3(m) => m.get(&slot, 0)?.iter().for_each(|w| add_words(total, w)),
            OldCounters::V4(m) => m.get(&slot, 0)?.iter().for_each(|w| add_words(total, w)),
        }
        Ok(())
    }

    fn reset(&mut self, slot: u32, cpus: usize) -> Result<(), aya::maps::MapError> {
        let values = |e| {
            aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "per-cpu values",
                io_error: e,
            })
        };
        match self {
            OldCounters::V3(m) => m.set(
                slot,
                PerCpuValues::try_from(vec![[0u64; 45]; cpus]).map_err(values)?,
                0,
            ),
            OldCounters::V4(m) => m.set(
                slot,
                PerCpuValues::try_from(vec![[0u64; 53]; cpus]).map_err(values)?,
                0,
            ),
        }
    }
}

/// The layout of a carried counter map's pin name (`COUNTERS-v<N>`), if this build carries it.
fn older_counters(name: &str) -> Option<u32> {
    OLDER_COUNTERS
        .iter()
        .map(|(v, _)| *v)
        .find(|v| name == pin_name(MAP_COUNTERS, *v))
}

/// Pin name of map `map` of layout `from` under [`DIR`].
pub(super) fn pin_name(map: &str, from: u32) -> String {
    format!("{map}-v{from}")
}

/// Whether the old map `name` at `path` can be carried into this layout; a clear error if not.
pub(super) fn check_carryable(
    path: &Path,
    name: &str,
    info: &MapInfo,
    cfg: &DataplaneConfig,
) -> Result<(), DataplaneError> {
    let per_cpu = info.map_type().ok() == Some(MapType::PerCpuArray) && info.key_size() == 4;
    let ok = match name {
        MAP_COUNTERS => {
            per_cpu
                && OLDER_COUNTERS
                    .iter()
                    .any(|(_, words)| info.value_size() as usize == words * 8)
                && info.max_entries() == cfg.max_endpoints
        }
        MAP_DROPS => per_cpu && info.value_size() == 8 && info.max_entries() <= DROP_SLOTS,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(DataplaneError::MapMismatch {
        path: path.into(),
        problem: format!(
            "cannot be carried into this layout (type {:?}, key {} B, value {} B, {} entries)",
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries()
        ),
    })
}

/// The carried maps of one layout directory.
#[derive(Default)]
pub(super) struct Carry {
    counters: Vec<OldCounters>,
    drops: Vec<(PerCpuArray<MapData, u64>, u32)>,
}

impl Carry {
    /// Opens every map under `dir` (none if it does not exist).
    pub(super) fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let mut carry = Carry::default();
        for path in pins::read_dir(dir)? {
            let name = pins::file_name(&path);
            let open_err = |source| DataplaneError::OpenMap {
                path: path.clone(),
                source: Box::new(source),
            };
            let map = || {
                MapData::from_pin(&path)
                    .and_then(Map::from_map_data)
                    .map_err(open_err)
            };
            if let Some(version) = older_counters(&name) {
                carry
                    .counters
                    .push(OldCounters::open(version, map()?).map_err(open_err)?);
            } else if name.starts_with(&format!("{MAP_DROPS}-v")) {
                let len = MapInfo::from_pin(&path).map_err(open_err)?.max_entries();
                carry
                    .drops
                    .push((PerCpuArray::try_from(map()?).map_err(open_err)?, len));
            } else {
                return Err(DataplaneError::MapMismatch {
                    path,
                    problem: "not a counter map this build can carry".into(),
                });
            }
        }
        Ok(carry)
    }

    /// Adds the carried counters of `slot` to `total`.
    pub(super) fn add_counters(
        &self,
        slot: u32,
        total: &mut EndpointCounters,
    ) -> Result<(), DataplaneError> {
        for map in &self.counters {
            map.add(slot, total).map_err(read_err(MAP_COUNTERS))?;
        }
        Ok(())
    }

    /// Adds the carried host-wide drop counters.
    pub(super) fn add_drops(&self, drops: &mut [(DropReason, u64)]) -> Result<(), DataplaneError> {
        for (map, len) in &self.drops {
            for (reason, n) in drops.iter_mut() {
                let index = *reason as u32;
                if index < *len {
                    let per_cpu = map.get(&index, 0).map_err(read_err(MAP_DROPS))?;
                    *n += per_cpu.iter().sum::<u64>();
                }
            }
        }
        Ok(())
    }

    /// Zeroes the carried counters of `slot` (it goes to a new endpoint).
    pub(super) fn reset(&mut self, slot: u32, cpus: usize) -> Result<(), DataplaneError> {
        for map in &mut self.counters {
            map.reset(slot, cpus)
                .map_err(|source| DataplaneError::UpdateMap {
                    map: MAP_COUNTERS,
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }
}

fn read_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::ReadMap {
        map,
        source: Box::new(source),
    }
}

/// Adds an older counter value, read as words, to `total`: the traffic words first
/// (`[direction][class]` × packets, bytes), then the drop slots it has.
fn add_words(total: &mut EndpointCounters, words: &[u64]) {
    for (i, w) in words.iter().enumerate() {
        if i < TRAFFIC_WORDS {
            let t = &mut total.traffic[i / 8][(i % 8) / 2];
            if i % 2 == 0 {
                t.packets += w;
            } else {
                t.bytes += w;
            }
        } else if let Some(d) = total.drops.get_mut(i - TRAFFIC_WORDS) {
            *d += w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atoll_dataplane_common::{Direction, TrafficClass};

    #[test]
    fn older_layouts_are_traffic_words_then_drop_slots() {
        for ((version, words), slots) in OLDER_COUNTERS.iter().zip([29, 37]) {
            assert_eq!(*words, TRAFFIC_WORDS + slots, "v{version}");
            assert!(slots <= DROP_SLOTS as usize && slots <= DropReason::SLOTS as usize);
            assert_eq!(
                older_counters(&format!("COUNTERS-v{version}")),
                Some(*version)
            );
        }
        assert_eq!(older_counters("COUNTERS-v5"), None);
    }

    #[test]
    fn old_words_add_field_by_field() {
        let mut words = [0u64; 45];
        // [to_guest][host] bytes: direction 1, class 2, second word.
        words[8 + 2 * 2 + 1] = 7;
        // [from_guest][intra_cloud] packets.
        words[0] = 3;
        // drop slot 19 (no_route_in_cloud).
        words[TRAFFIC_WORDS + 19] = 5;
        let mut total = EndpointCounters::ZERO;
        total.traffic[Direction::FromGuest as usize][TrafficClass::IntraCloud as usize].packets = 1;
        add_words(&mut total, &words);
        add_words(&mut total, &words);
        let t = &total.traffic;
        assert_eq!(
            t[Direction::ToGuest as usize][TrafficClass::Host as usize].bytes,
            14
        );
        assert_eq!(
            t[Direction::FromGuest as usize][TrafficClass::IntraCloud as usize].packets,
            7
        );
        assert_eq!(total.drops[DropReason::NoRouteInCloud as usize], 10);
        assert_eq!(total.drops.iter().sum::<u64>(), 10);
    }
}
