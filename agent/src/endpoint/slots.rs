//! Counter slots: which `COUNTERS` slot each endpoint holds, and the ones no endpoint holds.
//!
//! Decisions:
//! - **Rebuilt from the pinned maps on every start** (the slots of `ENDPOINTS` entries are
//!   taken, the rest free), so the maps stay the only state.
//! - **Reused as late as possible**: taken from the front, freed slots go to the back, so a DNS
//!   reply in flight to a deleted endpoint's proxy address does not reach a new holder of its
//!   slot (see the `dns` module). A slot taken but never used by a device (its endpoint failed
//!   to be created) goes back to the front.

use std::collections::VecDeque;

use crate::dataplane::{Dataplane, DataplaneError};

/// The free counter slots of one dataplane.
#[derive(Debug, Default)]
pub(super) struct Slots {
    free: VecDeque<u32>,
}

impl Slots {
    /// The slots no endpoint in `dataplane` holds.
    pub(super) fn find(dataplane: &Dataplane) -> Result<Self, DataplaneError> {
        let max = dataplane.max_endpoints();
        let mut used = vec![false; max as usize];
        for (_, info) in dataplane.endpoints()? {
            if let Some(u) = used.get_mut(info.slot as usize) {
                *u = true;
            }
        }
        Ok(Slots {
            free: (0..max).filter(|s| !used[*s as usize]).collect(),
        })
    }

    /// The slot free the longest; `None` when every slot is held.
    pub(super) fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// Returns a slot `take` gave out that no device used: it may be the next one again.
    pub(super) fn untake(&mut self, slot: u32) {
        self.free.push_front(slot);
    }

    /// Frees the slot of a deleted endpoint: reused last.
    pub(super) fn release(&mut self, slot: u32) {
        self.free.push_back(slot);
    }
}
