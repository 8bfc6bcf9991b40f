//! The public ingress maps (see `dataplane-ebpf/src/ingress.rs`): published ports, their
//! `allow_from` prefixes and the connections that came in.
//!
//! Order of writes: a publication's allowed sources are written before its entry (a
//! restricted port never accepts anyone while its list is being written) and removed after
//! it.

use std::net::Ipv4Addr;

use atoll_dataplane_common::{FlowKey, IngressAllowKey, IngressFlow, IngressKey, IngressTarget};
use aya::maps::{lpm_trie::Key, MapError};

use super::{
    error::{ignore_missing, insert_error, DataplaneError},
    maps::INGRESS_ENTRIES,
    Dataplane, MAP_INGRESS, MAP_INGRESS_ALLOW, MAP_INGRESS_FLOWS,
};

const BPF_ANY: u64 = 0;

fn allow_key(serial: u32, (addr, len): (Ipv4Addr, u8)) -> Key<IngressAllowKey> {
    let len = len.min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let masked = Ipv4Addr::from(u32::from(addr) & mask);
    Key::new(
        32 + u32::from(len),
        IngressAllowKey {
            serial,
            ipv4: u32::from_ne_bytes(masked.octets()),
        },
    )
}

impl Dataplane {
    /// Publishes `target` at `key`, accepting sources in `allow` (if `target.restricted`).
    pub fn set_ingress(
        &mut self,
        key: IngressKey,
        target: IngressTarget,
        allow: &[(Ipv4Addr, u8)],
    ) -> Result<(), DataplaneError> {
        for prefix in allow {
            self.ingress_allow
                .insert(&allow_key(target.serial, *prefix), 1u8, BPF_ANY)
                .map_err(|e| {
                    insert_error(
                        e,
                        MAP_INGRESS_ALLOW,
                        format!("allowed source {}/{}", prefix.0, prefix.1),
                        INGRESS_ENTRIES,
                        "(fixed)",
                    )
                })?;
        }
        self.ingress.insert(key, target, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                MAP_INGRESS,
                "a published port".into(),
                INGRESS_ENTRIES,
                "(fixed)",
            )
        })
    }

    /// Unpublishes `key`, then forgets its allowed sources (found by its serial in the trie,
    /// so a restarted agent removes what an earlier run wrote); returns what it held.
    pub fn remove_ingress(
        &mut self,
        key: IngressKey,
    ) -> Result<Option<IngressTarget>, DataplaneError> {
        let Some(target) = self.ingress_entry(key)? else {
            return Ok(None);
        };
        ignore_missing(self.ingress.remove(&key), MAP_INGRESS)?;
        for prefix in self.ingress_allowed(target.serial)? {
            ignore_missing(
                self.ingress_allow.remove(&allow_key(target.serial, prefix)),
                MAP_INGRESS_ALLOW,
            )?;
        }
        Ok(Some(target))
    }

    /// The sources publication `serial` accepts (its `INGRESS_ALLOW` prefixes), sorted.
    pub fn ingress_allowed(&self, serial: u32) -> Result<Vec<(Ipv4Addr, u8)>, DataplaneError> {
        let mut out: Vec<(Ipv4Addr, u8)> = self
            .ingress_allow
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_INGRESS_ALLOW,
                source: Box::new(source),
            })?
            .into_iter()
            .filter(|k| k.data().serial == serial)
            .map(|k| {
                (
                    Ipv4Addr::from(k.data().ipv4.to_ne_bytes()),
                    k.prefix_len().saturating_sub(32) as u8,
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    pub fn ingress_entry(&self, key: IngressKey) -> Result<Option<IngressTarget>, DataplaneError> {
        match self.ingress.get(&key, 0) {
            Ok(t) => Ok(Some(t)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::ReadMap {
                map: MAP_INGRESS,
                source: Box::new(source),
            }),
        }
    }

    /// Every published port.
    pub fn ingress_entries(&self) -> Result<Vec<(IngressKey, IngressTarget)>, DataplaneError> {
        self.ingress
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_INGRESS,
                source: Box::new(source),
            })
    }

    /// Connections that came in to published ports, the guests' view.
    pub fn ingress_flows(&self) -> Result<Vec<(FlowKey, IngressFlow)>, DataplaneError> {
        self.ingress_flows
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DataplaneError::ReadMap {
                map: MAP_INGRESS_FLOWS,
                source: Box::new(source),
            })
    }
}
