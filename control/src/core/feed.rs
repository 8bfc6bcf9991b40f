//! The host feed: one store watch keeps the placements, host records and a bounded ring of
//! recent events in memory ([`FeedState`]), from which [`Core::sync`] answers long polls
//! without reading the store; an agent further behind than the ring gets the full state.

use super::*;

/// One store change kept for agents.
pub(super) struct FeedEvent {
    pub(super) revision: u64,
    pub(super) key: String,
    /// The new value of a put under `h/`; `None` for deletes and for keys whose value agents
    /// do not need.
    pub(super) value: Option<Vec<u8>>,
    pub(super) deleted: bool,
}

#[derive(Default)]
pub(super) struct FeedState {
    pub(super) ring: VecDeque<FeedEvent>,
    /// Every event after this revision is in `ring`.
    pub(super) complete_after: u64,
    /// Per host: per cloud, the placement keys (VMs and volumes) it holds.
    pub(super) placements: HashMap<String, HashMap<CloudId, HashSet<String>>>,
    /// Registered hosts and when each was last heard from (their records' `last_seen`).
    pub(super) hosts: BTreeMap<String, u64>,
    /// Hosts the operator cordoned.
    pub(super) cordoned: HashSet<String>,
    /// Hosts with an underlay address (their overlay is on).
    pub(super) overlay: HashSet<String>,
    /// The store revision of each host record applied: an older one arriving later (the
    /// watch delivering a change [`Core::host_recorded`] applied ahead of it, followed by a
    /// newer one) is ignored, so a cordon or an underlay address never reverts for a moment.
    pub(super) host_revisions: HashMap<String, u64>,
    /// The grant index (`grantidx/`), per consumer: its `(provider, exposure)` grants. Only
    /// for routing events to hosts: what a sync sends is read from the store.
    pub(super) providers: HashMap<CloudId, HashSet<(CloudId, String)>>,
    /// Per host, placements picked and not yet committed or given up (see
    /// [`Core::pick_host`]): counted in its load, so concurrent creates spread instead of all
    /// reading the same least-loaded host.
    pub(super) pending: HashMap<String, usize>,
}

/// The store watch that feeds host syncs (see the module docs).
pub(super) struct Feed {
    pub(super) state: Mutex<FeedState>,
    pub(super) latest: watch::Sender<u64>,
}

/// Parses `h/<host>/<vms|volumes>/<cloud>/<name>`.
pub(super) fn parse_placement_key(key: &str) -> Option<(&str, bool, CloudId, &str)> {
    let rest = key.strip_prefix("h/")?;
    let (host, rest) = rest.split_once('/')?;
    let (kind, rest) = rest.split_once('/')?;
    let (cloud, name) = rest.split_once('/')?;
    let vm = match kind {
        "vms" => true,
        "volumes" => false,
        _ => return None,
    };
    Some((host, vm, cloud.parse().ok()?, name))
}

/// The cloud a key belongs to if it is the cloud's record (`clouds/<c>`) or lies under
/// `c/<c>/<kind>/` with `kind` one of `kinds`.
pub(super) fn cloud_of(key: &str, kinds: &[&str]) -> Option<CloudId> {
    if let Some(c) = key.strip_prefix("clouds/") {
        return c.parse().ok();
    }
    let rest = key.strip_prefix("c/")?;
    let (cloud, rest) = rest.split_once('/')?;
    let (kind, _) = rest.split_once('/')?;
    kinds.contains(&kind).then(|| cloud.parse().ok()).flatten()
}

/// The cloud whose zone a key belongs to, if a change of it changes the zone.
pub(super) fn zone_cloud(key: &str) -> Option<CloudId> {
    cloud_of(key, &["vms", "dns", "imports"])
}

/// The cloud whose egress a key changes (`c/<c>/egress`, its address, its budget).
pub(super) fn egress_cloud(key: &str) -> Option<CloudId> {
    let rest = key.strip_prefix("c/")?;
    let c = rest
        .strip_suffix("/egress")
        .or_else(|| rest.strip_suffix("/egressaddr"))
        .or_else(|| rest.strip_suffix("/budget"))?;
    c.parse().ok()
}

/// The cloud whose publications a key is (`c/<c>/pub/<name>`).
pub(super) fn published_cloud(key: &str) -> Option<CloudId> {
    cloud_of(key, &["pub"])
}

/// The provider cloud whose services (active grants, resolved) a key's change may change:
/// its exposures, its grants, its VMs (backends' addresses) and the cloud itself.
pub(super) fn service_cloud(key: &str) -> Option<CloudId> {
    cloud_of(key, &["vms", "exposures", "grants"])
}

impl FeedState {
    /// Applies a change of `key` made at store `revision` (placements: any revision).
    pub(super) fn apply(&mut self, key: &str, value: &[u8], deleted: bool, revision: u64) {
        if let Some((host, _, cloud, _)) = parse_placement_key(key) {
            let clouds = self.placements.entry(host.to_string()).or_default();
            if deleted {
                if let Some(set) = clouds.get_mut(&cloud) {
                    set.remove(key);
                    if set.is_empty() {
                        clouds.remove(&cloud);
                    }
                }
            } else {
                clouds.entry(cloud).or_default().insert(key.to_string());
            }
        } else if let Some((p, c, e)) = keys::parse_grant_index(key) {
            if deleted {
                let forget = |m: &mut HashMap<CloudId, HashSet<(CloudId, String)>>,
                              k: CloudId,
                              v: (CloudId, String)| {
                    if let Some(set) = m.get_mut(&k) {
                        set.remove(&v);
                        if set.is_empty() {
                            m.remove(&k);
                        }
                    }
                };
                forget(&mut self.providers, c, (p, e.to_string()));
            } else {
                self.providers
                    .entry(c)
                    .or_default()
                    .insert((p, e.to_string()));
            }
        } else if let Some(h) = key.strip_prefix("hosts/") {
            if self.host_revisions.get(h).is_some_and(|r| *r > revision) {
                return;
            }
            self.host_revisions.insert(h.to_string(), revision);
            if deleted {
                self.hosts.remove(h);
                self.cordoned.remove(h);
                self.overlay.remove(h);
            } else {
                // The record is the truth (heartbeats are written to it).
                let info = serde_json::from_slice::<HostInfo>(value).ok();
                let seen = info
                    .as_ref()
                    .map_or(0, |i| i.last_seen.max(i.registered_at));
                self.hosts.insert(h.to_string(), seen);
                if info.as_ref().is_some_and(|i| i.underlay.is_some()) {
                    self.overlay.insert(h.to_string());
                } else {
                    self.overlay.remove(h);
                }
                if info.is_some_and(|i| i.cordoned) {
                    self.cordoned.insert(h.to_string());
                } else {
                    self.cordoned.remove(h);
                }
            }
        }
    }

    /// The clouds whose changes concern `host`: those with placements there, and the
    /// providers of grants to them (their exposures' backends and services are applied
    /// there, see "Exposures across hosts" in docs/design.md).
    pub(super) fn concerned(&self, host: &str) -> HashSet<CloudId> {
        let mut out: HashSet<CloudId> = self
            .placements
            .get(host)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        let here: Vec<CloudId> = out.iter().copied().collect();
        for c in here {
            if let Some(ps) = self.providers.get(&c) {
                out.extend(ps.iter().map(|(p, _)| *p));
            }
        }
        out
    }

    /// The providers of consumer `c`'s grants.
    pub(super) fn providers_of(&self, c: CloudId) -> impl Iterator<Item = CloudId> + '_ {
        self.providers
            .get(&c)
            .into_iter()
            .flat_map(|s| s.iter().map(|(p, _)| *p))
    }

    pub(super) fn load(&self, host: &str) -> usize {
        self.placements
            .get(host)
            .map(|c| c.values().map(|s| s.len()).sum())
            .unwrap_or(0)
            + self.pending.get(host).copied().unwrap_or(0)
    }
}
