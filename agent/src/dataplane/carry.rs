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
//! - **Only appended words.** A counter layout may only append words (new drop reasons are new
//!   numbers, never reused), so an old value is read as words and added word by word; anything
//!   else cannot be carried and the migration refuses it.
//! - **A reused slot starts at zero**: [`Carry::reset`] clears its carried value too.

use std::path::Path;

use atoll_dataplane_common::{DropReason, EndpointCounters};
use aya::maps::{Map, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues};

use super::{layout, DataplaneError, MAP_COUNTERS, MAP_DROPS};
use crate::config::DataplaneConfig;

/// Directory of carried maps inside a layout directory.
pub(super) const DIR: &str = "carry";

/// Words of layout v3's `EndpointCounters`: 16 traffic words, 29 drop slots.
const V3_COUNTER_WORDS: usize = 45;

/// Words of the traffic part of `EndpointCounters` (`[direction][class]` × packets, bytes).
const TRAFFIC_WORDS: usize = 16;

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
                && info.value_size() as usize == V3_COUNTER_WORDS * 8
                && info.max_entries() == cfg.max_endpoints
        }
        MAP_DROPS => per_cpu && info.value_size() == 8 && info.max_entries() <= DropReason::SLOTS,
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
    counters: Vec<PerCpuArray<MapData, [u64; V3_COUNTER_WORDS]>>,
    drops: Vec<(PerCpuArray<MapData, u64>, u32)>,
}

impl Carry {
    /// Opens every map under `dir` (none if it does not exist).
    pub(super) fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let mut carry = Carry::default();
        for path in layout::read_dir(dir)? {
            let name = layout::file_name(&path);
            let open_err = |source| DataplaneError::OpenMap {
                path: path.clone(),
                source: Box::new(source),
            };
            let map = || {
                MapData::from_pin(&path)
                    .and_then(Map::from_map_data)
                    .map_err(open_err)
            };
            if name == pin_name(MAP_COUNTERS, 3) {
                carry
                    .counters
                    .push(PerCpuArray::try_from(map()?).map_err(open_err)?);
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
            let per_cpu = map.get(&slot, 0).map_err(read_err(MAP_COUNTERS))?;
            for words in per_cpu.iter() {
                add_words(total, words);
            }
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
            let zeros =
                PerCpuValues::try_from(vec![[0u64; V3_COUNTER_WORDS]; cpus]).map_err(|e| {
                    DataplaneError::UpdateMap {
                        map: MAP_COUNTERS,
                        source: Box::new(aya::maps::MapError::SyscallError(
                            aya::sys::SyscallError {
                                call: "per-cpu values",
                                io_error: e,
                            },
                        )),
                    }
                })?;
            map.set(slot, zeros, 0)
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
    fn traffic_words_match_the_counter_layout() {
        assert_eq!(
            std::mem::size_of::<EndpointCounters>(),
            (TRAFFIC_WORDS + DropReason::SLOTS as usize) * 8,
            "EndpointCounters is traffic words followed by drop slots"
        );
    }

    #[test]
    fn old_words_add_field_by_field() {
        let mut words = [0u64; V3_COUNTER_WORDS];
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
