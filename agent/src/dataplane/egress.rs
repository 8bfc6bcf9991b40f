//! The egress maps (see `dataplane-ebpf/src/egress.rs`): the host's uplink, each cloud's
//! entry, the always-denied set, the rule tries and the flow tables, and the `from_uplink`
//! link.
//!
//! The rule tries (`EGRESS_ALLOW`, `EGRESS_DENY`) are written by [`RuleTries`], a handle of its
//! own opened from the pins: the DNS server installs addresses learnt from answers on its own
//! thread, before the answer reaches the guest, without going through the converger.

use std::path::{Path, PathBuf};

use atoll_dataplane_common::{
    EgressCloud, EgressHost, EgressIn, EgressMeter, EgressOut, EgressRuleKey, EgressRules, FlowKey,
    RefusedCount, RefusedKey,
};
use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Map, MapData, MapError,
};

use super::{
    error::{ignore_missing, insert_error, DataplaneError},
    pins::UPLINK_LINK_PREFIX,
    Dataplane, HostHook, MAP_EGRESS_ALLOW, MAP_EGRESS_CLOUDS, MAP_EGRESS_DENY,
    MAP_EGRESS_FLOW_CLOCKS, MAP_EGRESS_HOST, MAP_EGRESS_IN, MAP_EGRESS_METERS, MAP_EGRESS_NEVER,
    MAP_EGRESS_OUT, MAP_EGRESS_REFUSED,
};

const BPF_ANY: u64 = 0;

fn read_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::ReadMap {
        map,
        source: Box::new(source),
    }
}

fn update_err(map: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::UpdateMap {
        map,
        source: Box::new(source),
    }
}

impl Dataplane {
    /// The host's uplink, egress address and NAT ports as the programs see them.
    pub fn egress_host(&self) -> Result<EgressHost, DataplaneError> {
        self.egress_host
            .get(&0, 0)
            .map_err(read_err(MAP_EGRESS_HOST))
    }

    /// Sets the host's egress (all zero: egress off).
    pub fn set_egress_host(&mut self, host: EgressHost) -> Result<(), DataplaneError> {
        self.egress_host
            .set(0, host, 0)
            .map_err(update_err(MAP_EGRESS_HOST))
    }

    /// Installs or replaces `cloud`'s egress entry (replaced whole: programs never see a
    /// half-written one).
    pub fn set_egress_cloud(
        &mut self,
        cloud: u32,
        entry: EgressCloud,
    ) -> Result<(), DataplaneError> {
        let capacity = self.max_endpoints;
        self.egress_clouds
            .insert(cloud, entry, BPF_ANY)
            .map_err(|e| {
                insert_error(
                    e,
                    MAP_EGRESS_CLOUDS,
                    format!("egress of cloud {cloud}"),
                    capacity,
                    "max_endpoints",
                )
            })
    }

    /// Removes `cloud`'s egress entry (it reaches nothing outside its range any more), then
    /// its meter and its new-flow clock.
    pub fn remove_egress_cloud(&mut self, cloud: u32) -> Result<(), DataplaneError> {
        ignore_missing(self.egress_clouds.remove(&cloud), MAP_EGRESS_CLOUDS)?;
        ignore_missing(self.egress_meters.remove(&cloud), MAP_EGRESS_METERS)?;
        ignore_missing(
            self.egress_flow_clocks.remove(&cloud),
            MAP_EGRESS_FLOW_CLOCKS,
        )
    }

    /// The state of `cloud`'s rate limit and budget, if the programs metered it yet.
    pub fn egress_meter(&self, cloud: u32) -> Result<Option<EgressMeter>, DataplaneError> {
        match self.egress_meters.get(&cloud, 0) {
            Ok(m) => Ok(Some(m)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::ReadMap {
                map: MAP_EGRESS_METERS,
                source: Box::new(source),
            }),
        }
    }

    /// Every cloud's egress entry.
    pub fn egress_clouds(&self) -> Result<Vec<(u32, EgressCloud)>, DataplaneError> {
        self.egress_clouds
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_CLOUDS))
    }

    /// Makes the always-denied set exactly `prefixes` (address, length): new ones are added
    /// before stale ones are removed, so no prefix that stays is ever missing.
    pub fn set_never(
        &mut self,
        prefixes: &[(std::net::Ipv4Addr, u8)],
    ) -> Result<(), DataplaneError> {
        let want: Vec<Key<u32>> = prefixes
            .iter()
            .map(|(a, len)| {
                let masked = std::net::Ipv4Addr::from(u32::from(*a) & mask(*len));
                Key::new(
                    u32::from((*len).min(32)),
                    u32::from_ne_bytes(masked.octets()),
                )
            })
            .collect();
        for k in &want {
            self.egress_never.insert(k, 1u8, BPF_ANY).map_err(|e| {
                insert_error(
                    e,
                    MAP_EGRESS_NEVER,
                    "an always-denied prefix".into(),
                    super::maps::EGRESS_NEVER_ENTRIES,
                    "(fixed)",
                )
            })?;
        }
        let have: Vec<Key<u32>> = self
            .egress_never
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_NEVER))?;
        for k in have {
            if !want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            {
                ignore_missing(self.egress_never.remove(&k), MAP_EGRESS_NEVER)?;
            }
        }
        Ok(())
    }

    /// The always-denied set: (address, length).
    pub fn never(&self) -> Result<Vec<(std::net::Ipv4Addr, u8)>, DataplaneError> {
        let keys = self
            .egress_never
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_NEVER))?;
        let mut out: Vec<_> = keys
            .into_iter()
            .map(|k| {
                (
                    std::net::Ipv4Addr::from(k.data().to_ne_bytes()),
                    k.prefix_len() as u8,
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Tracked egress flows, guests' view.
    pub fn egress_flows_out(&self) -> Result<Vec<(FlowKey, EgressOut)>, DataplaneError> {
        self.egress_out
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_OUT))
    }

    /// Tracked egress flows, the uplink's view of their replies.
    pub fn egress_flows_in(&self) -> Result<Vec<(FlowKey, EgressIn)>, DataplaneError> {
        self.egress_in
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_IN))
    }

    /// Refused destinations, as the programs recorded them.
    pub fn egress_refused(&self) -> Result<Vec<(RefusedKey, RefusedCount)>, DataplaneError> {
        self.egress_refused
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(MAP_EGRESS_REFUSED))
    }

    /// Attaches `from_uplink` to the ingress of the uplink and pins the link as
    /// `links/uplink-<ifindex>`, unless that pin exists (the agent restarted, same device).
    /// Pins of `from_uplink` on other devices are removed first (one uplink per host).
    pub fn attach_uplink(&mut self, ifname: &str, ifindex: u32) -> Result<(), DataplaneError> {
        self.attach_host_hook(HostHook::Uplink, ifname, ifindex)
    }

    /// Removes every pinned `from_uplink` link.
    pub fn detach_uplink(&mut self) -> Result<(), DataplaneError> {
        self.detach_host_hook(HostHook::Uplink)
    }

    /// ifindexes with a pinned `from_uplink` link.
    pub fn uplink_links(&self) -> Result<Vec<u32>, DataplaneError> {
        self.links_named(UPLINK_LINK_PREFIX)
    }

    /// A handle of its own on the rule tries (see module docs).
    pub fn rule_tries(&self) -> Result<RuleTries, DataplaneError> {
        RuleTries::open(&self.dir.join("maps"))
    }
}

/// The netmask of a prefix length, host byte order.
fn mask(len: u8) -> u32 {
    match len {
        0 => 0,
        l if l >= 32 => u32::MAX,
        l => u32::MAX << (32 - l),
    }
}

/// Which rule trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    Allow,
    Deny,
}

impl RuleKind {
    fn map(self) -> &'static str {
        match self {
            RuleKind::Allow => MAP_EGRESS_ALLOW,
            RuleKind::Deny => MAP_EGRESS_DENY,
        }
    }
}

/// `EGRESS_ALLOW` and `EGRESS_DENY`, opened from their pins.
pub struct RuleTries {
    allow: LpmTrie<MapData, EgressRuleKey, EgressRules>,
    deny: LpmTrie<MapData, EgressRuleKey, EgressRules>,
}

impl std::fmt::Debug for RuleTries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleTries").finish_non_exhaustive()
    }
}

/// A key of a rule trie: the cloud's 32 bits and `len` bits of the address.
fn rule_key(cloud: u32, addr: std::net::Ipv4Addr, len: u8) -> Key<EgressRuleKey> {
    let masked = std::net::Ipv4Addr::from(u32::from(addr) & mask(len));
    Key::new(
        32 + u32::from(len.min(32)),
        EgressRuleKey {
            cloud,
            ipv4: u32::from_ne_bytes(masked.octets()),
        },
    )
}

impl RuleTries {
    /// Opens both tries pinned under `maps`.
    pub fn open(maps: &Path) -> Result<Self, DataplaneError> {
        let open =
            |name: &str| -> Result<LpmTrie<MapData, EgressRuleKey, EgressRules>, DataplaneError> {
                let path: PathBuf = maps.join(name);
                let err = |source| DataplaneError::OpenMap {
                    path: path.clone(),
                    source: Box::new(source),
                };
                let map = MapData::from_pin(&path)
                    .and_then(Map::from_map_data)
                    .map_err(err)?;
                LpmTrie::try_from(map).map_err(err)
            };
        Ok(RuleTries {
            allow: open(MAP_EGRESS_ALLOW)?,
            deny: open(MAP_EGRESS_DENY)?,
        })
    }

    fn trie(&mut self, kind: RuleKind) -> &mut LpmTrie<MapData, EgressRuleKey, EgressRules> {
        match kind {
            RuleKind::Allow => &mut self.allow,
            RuleKind::Deny => &mut self.deny,
        }
    }

    /// Installs or replaces the rules of `(cloud, addr/len)`.
    pub fn insert(
        &mut self,
        kind: RuleKind,
        cloud: u32,
        (addr, len): (std::net::Ipv4Addr, u8),
        rules: &EgressRules,
    ) -> Result<(), DataplaneError> {
        let key = rule_key(cloud, addr, len);
        self.trie(kind).insert(&key, rules, BPF_ANY).map_err(|e| {
            insert_error(
                e,
                kind.map(),
                format!("egress rule {addr}/{len} of cloud {cloud}"),
                super::maps::EGRESS_RULE_ENTRIES,
                "(fixed)",
            )
        })
    }

    /// Removes the rules of `(cloud, addr/len)` (absent: nothing to do).
    pub fn remove(
        &mut self,
        kind: RuleKind,
        cloud: u32,
        (addr, len): (std::net::Ipv4Addr, u8),
    ) -> Result<(), DataplaneError> {
        let key = rule_key(cloud, addr, len);
        ignore_missing(self.trie(kind).remove(&key), kind.map())
    }

    /// Every entry of one trie: `(cloud, (address, length), rules)`.
    #[allow(clippy::type_complexity)]
    pub fn entries(
        &self,
        kind: RuleKind,
    ) -> Result<Vec<(u32, (std::net::Ipv4Addr, u8), EgressRules)>, DataplaneError> {
        let trie = match kind {
            RuleKind::Allow => &self.allow,
            RuleKind::Deny => &self.deny,
        };
        trie.iter()
            .map(|r| {
                r.map(|(k, v)| {
                    let d = k.data();
                    (
                        d.cloud,
                        (
                            std::net::Ipv4Addr::from(d.ipv4.to_ne_bytes()),
                            (k.prefix_len().saturating_sub(32)) as u8,
                        ),
                        v,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err(kind.map()))
    }
}
