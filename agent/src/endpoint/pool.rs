//! The tap pool: spare taps, created and attached ahead of time, that a tap endpoint claims by
//! renaming one (see the `endpoint` module's docs for why).
//!
//! A spare tap is a device with pinned links and no `ENDPOINTS` entry, so every frame on it is
//! dropped as `unknown_endpoint` (it is down anyway), and the pool is rediscovered from the pins
//! after a restart with no other state ([`TapPool::find`]).

use std::time::{Duration, Instant};

use super::EndpointError;
use crate::{
    config::POOL_PREFIX,
    dataplane::Dataplane,
    device::{self, Devices},
    expedite::Expedite,
};

/// The spare taps of one dataplane, and how many it keeps.
#[derive(Debug)]
pub(super) struct TapPool {
    spares: Vec<(String, u32)>,
    target: u32,
}

impl TapPool {
    /// The spare taps already pinned in `dataplane`; refills keep `target` of them.
    pub(super) fn find(dataplane: &Dataplane, target: u32) -> Result<Self, EndpointError> {
        let err = |source| EndpointError::Unprogram {
            name: "*".into(),
            source,
        };
        let mut spares = Vec::new();
        for ifindex in dataplane.attached().map_err(err)? {
            if dataplane.endpoint(ifindex).map_err(err)?.is_none()
                && dataplane.fully_attached(ifindex)
            {
                if let Some(name) = device::ifname(ifindex).filter(|n| n.starts_with(POOL_PREFIX)) {
                    spares.push((name, ifindex));
                }
            }
        }
        Ok(TapPool { spares, target })
    }

    pub(super) fn len(&self) -> usize {
        self.spares.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.spares.is_empty()
    }

    /// Whether the device `ifindex` is a spare.
    pub(super) fn holds(&self, ifindex: u32) -> bool {
        self.spares.iter().any(|(_, i)| *i == ifindex)
    }

    /// Empties the pool, handing its spares (name, ifindex) to the caller.
    pub(super) fn drain(&mut self) -> Vec<(String, u32)> {
        std::mem::take(&mut self.spares)
    }

    /// Creates spare taps until the pool is full or `budget` has passed (at least one tap if
    /// the pool is short; no budget: until full). Returns how many it created.
    pub(super) async fn refill(
        &mut self,
        dataplane: &mut Dataplane,
        devices: &Devices,
        expedite: &Expedite,
        budget: Option<Duration>,
    ) -> Result<usize, EndpointError> {
        if self.spares.len() >= self.target as usize {
            return Ok(0);
        }
        let started = Instant::now();
        let _expedited = expedite.hold();
        let mut created = 0;
        while self.spares.len() < self.target as usize {
            if created > 0 && budget.is_some_and(|b| started.elapsed() >= b) {
                break;
            }
            let name = pool_name();
            // Held (not persistent) until both links are pinned: a crash in between leaves
            // no device, only link pins of a vanished ifindex, which `reconcile` removes.
            let (ifindex, held) = devices
                .create_tap_held(&name, None)
                .map_err(EndpointError::CreateDevice)?;
            if let Err(source) = dataplane.attach(&name, ifindex) {
                let _ = dataplane.detach(ifindex);
                drop(held);
                return Err(EndpointError::Program { name, source });
            }
            if let Err(e) = held.persist() {
                let _ = dataplane.detach(ifindex);
                return Err(EndpointError::CreateDevice(e));
            }
            self.spares.push((name, ifindex));
            created += 1;
        }
        Ok(created)
    }

    /// Takes a spare tap and gives it the endpoint's name (and owner); `None` if the pool is
    /// empty. A spare that fails to be renamed is deleted, not reused.
    pub(super) async fn claim(
        &mut self,
        dataplane: &mut Dataplane,
        devices: &Devices,
        name: &str,
        owner_uid: Option<u32>,
    ) -> Result<Option<u32>, EndpointError> {
        let Some((spare, ifindex)) = self.spares.pop() else {
            return Ok(None);
        };
        if let Err(e) = devices.rename_tap(&spare, ifindex, name, owner_uid).await {
            let _ = dataplane.detach(ifindex);
            let _ = devices.delete(&spare, ifindex).await;
            return Err(EndpointError::CreateDevice(e));
        }
        Ok(Some(ifindex))
    }
}

fn pool_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // 4 + 6 + 5 = 15 bytes: the full pid (pid_max is at most 2^22) and a per-process counter.
    format!("{}{:05x}", pool_process_prefix(), n & 0xfffff)
}

/// The prefix of the spare taps this process creates.
pub fn pool_process_prefix() -> String {
    format!("{POOL_PREFIX}{:06x}", std::process::id())
}
