//! What a host applies: [`Core::sync`] long-polls the feed for the changes relevant to one
//! host after a revision (its placements, the zones and services of the clouds it holds)
//! and answers with a [`SyncDelta`]; a host too far behind, or new, gets a full snapshot.

use super::*;

impl Core {
    /// Changes of `host`'s desired state after revision `after` (0: everything), waiting up to
    /// `wait` for some to happen. Only the operator (or the in-process agent) may call it.
    pub async fn sync(
        &self,
        principal: Principal,
        host: &str,
        after: u64,
        wait: Duration,
    ) -> Result<SyncDelta, CoreError> {
        authorize_host(&principal, host)?;
        validate_label("host", host)?;
        // Every sync is a sign of life (see `heartbeat` for the write rate).
        self.heartbeat(host).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.feed.latest.subscribe();
        let mut after = after;
        loop {
            let latest = *rx.borrow_and_update();
            let events = {
                let st = self.feed.state.lock().expect("feed lock");
                if after == 0 || after < st.complete_after || latest == u64::MAX {
                    None
                } else {
                    let relevant: Vec<(String, Option<Vec<u8>>, bool)> = if latest > after {
                        let prefix = keys::host_all(host);
                        let clouds = st.placements.get(host);
                        st.ring
                            .iter()
                            .filter(|e| e.revision > after)
                            .filter(|e| {
                                let here = |c: CloudId| clouds.is_some_and(|m| m.contains_key(&c));
                                e.key.starts_with(&prefix)
                                    || zone_cloud(&e.key).is_some_and(here)
                                    || service_cloud(&e.key).is_some_and(here)
                                    || egress_cloud(&e.key).is_some_and(here)
                                    || published_cloud(&e.key).is_some_and(here)
                                    // Another host's VMs of a cloud here: the remote set.
                                    || parse_placement_key(&e.key)
                                        .is_some_and(|(_, is_vm, c, _)| is_vm && here(c))
                                    // A host's underlay address, the host sharing a cloud.
                                    || e.key.strip_prefix(keys::underlays()).is_some_and(|h| {
                                        st.placements
                                            .get(h)
                                            .is_some_and(|m| m.keys().any(|c| here(*c)))
                                    })
                            })
                            .map(|e| (e.key.clone(), e.value.clone(), e.deleted))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    Some(relevant)
                }
            };
            let Some(events) = events else {
                return self.snapshot(host).await;
            };
            if !events.is_empty() {
                return self.delta(host, latest, events).await;
            }
            after = after.max(latest);
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        return Ok(SyncDelta { revision: after, ..SyncDelta::default() });
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(SyncDelta { revision: after, ..SyncDelta::default() });
                }
            }
        }
    }

    pub(super) async fn delta(
        &self,
        host: &str,
        revision: u64,
        events: Vec<(String, Option<Vec<u8>>, bool)>,
    ) -> Result<SyncDelta, CoreError> {
        let mut vms: BTreeMap<(CloudId, String), Option<Placement>> = BTreeMap::new();
        let mut volumes: BTreeMap<(CloudId, String), Option<VolumePlacement>> = BTreeMap::new();
        let mut touched: BTreeSet<CloudId> = BTreeSet::new();
        let mut providers: BTreeSet<CloudId> = BTreeSet::new();
        // Clouds whose egress policy this host must receive again: a changed policy, or VMs
        // of the cloud arriving on or leaving the host.
        let mut egress: BTreeSet<CloudId> = BTreeSet::new();
        // Clouds whose publications on this host may have changed.
        let mut published: BTreeSet<CloudId> = BTreeSet::new();
        // Clouds whose remote set (VMs on other hosts) this host must receive again.
        let mut remote: BTreeSet<CloudId> = BTreeSet::new();
        // Hosts whose underlay address changed: the clouds they share with this host, once
        // the placements are known.
        let mut other_hosts: BTreeSet<String> = BTreeSet::new();
        for (key, value, deleted) in events {
            if let Some(h) = key.strip_prefix(keys::underlays()) {
                other_hosts.insert(h.to_string());
                continue;
            }
            if let Some(c) = egress_cloud(&key) {
                egress.insert(c);
            }
            if let Some(c) = published_cloud(&key) {
                published.insert(c);
            }
            if let Some(p) = service_cloud(&key) {
                providers.insert(p);
            }
            if let Some((h, is_vm, cloud, name)) = parse_placement_key(&key) {
                if is_vm {
                    remote.insert(cloud);
                }
                if h != host {
                    continue;
                }
                touched.insert(cloud);
                egress.insert(cloud);
                published.insert(cloud);
                let id = (cloud, name.to_string());
                if is_vm {
                    let v = match (&value, deleted) {
                        (Some(v), false) => Some(decode(&key, v)?),
                        _ => None,
                    };
                    vms.insert(id, v);
                } else {
                    let v = match (&value, deleted) {
                        (Some(v), false) => Some(decode(&key, v)?),
                        _ => None,
                    };
                    volumes.insert(id, v);
                }
            } else if let Some(c) = zone_cloud(&key) {
                touched.insert(c);
            }
        }
        let mut d = SyncDelta {
            revision,
            ..SyncDelta::default()
        };
        for ((cloud, vm), p) in vms {
            match p {
                Some(p) => d.vms.push(p),
                None => d.removed_vms.push(VmRef { cloud, vm }),
            }
        }
        for ((cloud, name), p) in volumes {
            match p {
                Some(p) => d.volumes.push(p),
                None => d.removed_volumes.push(VolumeRef { cloud, name }),
            }
        }
        let present: HashSet<CloudId> = {
            let st = self.feed.state.lock().expect("feed lock");
            st.placements
                .get(host)
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default()
        };
        for c in touched {
            match present.contains(&c) {
                true => match self.zone(c).await? {
                    Some(z) => d.zones.push(z),
                    None => d.removed_zones.push(c),
                },
                false => d.removed_zones.push(c),
            }
        }
        for c in egress {
            match present.contains(&c) {
                true => d.egress.push(self.cloud_egress(c).await?),
                false => d.removed_egress.push(c),
            }
        }
        {
            let st = self.feed.state.lock().expect("feed lock");
            for h in &other_hosts {
                if let Some(m) = st.placements.get(h) {
                    remote.extend(m.keys().copied().filter(|c| present.contains(c)));
                }
            }
        }
        if !remote.is_empty() {
            let underlays = self.underlays().await?;
            for c in remote {
                d.remote.push(match present.contains(&c) {
                    true => self.remotes_of(c, host, &underlays).await?,
                    false => CloudRemotes {
                        cloud: c,
                        vni: 0,
                        endpoints: Vec::new(),
                    },
                });
            }
        }
        for c in published {
            let publications = match present.contains(&c) {
                true => self.publications_on(c, host).await?,
                false => Vec::new(),
            };
            d.published.push(CloudPublications {
                cloud: c,
                publications,
            });
        }
        // A placement change can also make a provider appear on or leave this host.
        providers.extend(d.vms.iter().map(|p| p.cloud));
        providers.extend(d.removed_vms.iter().map(|r| r.cloud));
        for p in providers {
            let services = match present.contains(&p) {
                true => self.services_of(p).await?,
                false => Vec::new(),
            };
            d.services.push(ProviderServices {
                provider: p,
                services,
            });
        }
        Ok(d)
    }

    /// The active grants of provider `p`, resolved for a host's dataplane. Hosts apply the
    /// services of the providers that have VMs on them: a backend is reached on its own host,
    /// where the NAT happens (see docs/design.md, "Exposures").
    pub(super) async fn services_of(&self, p: CloudId) -> Result<Vec<Service>, CoreError> {
        let exposures: Vec<Exposure> = self.list(&keys::exposures(p)).await?;
        if exposures.is_empty() {
            return Ok(Vec::new());
        }
        let vms: HashMap<String, Ipv4Addr> = self
            .list::<Vm>(&keys::vms(p))
            .await?
            .into_iter()
            .map(|v| (v.name, v.ipv4))
            .collect();
        let mut out = Vec::new();
        for e in exposures {
            let backends: Vec<ServiceBackend> = e
                .backends
                .iter()
                .filter_map(|b| {
                    vms.get(&b.vm).map(|ip| ServiceBackend {
                        ipv4: *ip,
                        port: b.port,
                    })
                })
                .collect();
            let grants: Vec<Grant> = self.list(&keys::grants(p, &e.name)).await?;
            for g in grants.into_iter().filter(|g| g.state == GrantState::Active) {
                out.push(Service {
                    consumer: g.consumer,
                    vip: g.vip,
                    nat_ipv4: g.nat_ipv4,
                    protocol: e.protocol,
                    port: e.port,
                    backends: backends.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Every host's underlay address (hosts without one are left out).
    pub(super) async fn underlays(&self) -> Result<HashMap<String, Ipv4Addr>, CoreError> {
        let mut out = HashMap::new();
        for kv in self.store.range(keys::underlays(), None, 0).await? {
            let Some(h) = kv.key.strip_prefix(keys::underlays()) else {
                continue;
            };
            out.insert(h.to_string(), decode(&kv.key, &kv.value)?);
        }
        Ok(out)
    }

    /// Cloud `c`'s VMs on hosts other than `host` that have an underlay address, with its
    /// network id (see "Overlay" in docs/design.md). A cloud without a network id has none.
    pub(super) async fn remotes_of(
        &self,
        c: CloudId,
        host: &str,
        underlays: &HashMap<String, Ipv4Addr>,
    ) -> Result<CloudRemotes, CoreError> {
        let vni = match self.cloud(c).await {
            Ok((_, cloud)) => cloud.vni,
            Err(CoreError::NotFound(_)) => 0,
            Err(e) => return Err(e),
        };
        let endpoints = if vni == 0 {
            Vec::new()
        } else {
            self.list::<Vm>(&keys::vms(c))
                .await?
                .into_iter()
                .filter(|v| v.host != host)
                .filter_map(|v| {
                    underlays.get(&v.host).map(|u| RemoteEndpoint {
                        mac: guest_mac(v.ipv4),
                        ipv4: v.ipv4,
                        underlay: *u,
                        host: v.host,
                        vm: v.name,
                    })
                })
                .collect()
        };
        Ok(CloudRemotes {
            cloud: c,
            vni,
            endpoints,
        })
    }

    pub(super) async fn snapshot(&self, host: &str) -> Result<SyncDelta, CoreError> {
        let revision = self.store.revision().await?;
        let mut d = SyncDelta {
            revision,
            full: true,
            ..SyncDelta::default()
        };
        let mut clouds = BTreeSet::new();
        for kv in self.store.range(&keys::host_all(host), None, 0).await? {
            let Some((_, is_vm, cloud, _)) = parse_placement_key(&kv.key) else {
                continue;
            };
            clouds.insert(cloud);
            if is_vm {
                d.vms.push(decode(&kv.key, &kv.value)?);
            } else {
                d.volumes.push(decode(&kv.key, &kv.value)?);
            }
        }
        let underlays = if clouds.is_empty() {
            HashMap::new()
        } else {
            self.underlays().await?
        };
        for c in clouds {
            let remotes = self.remotes_of(c, host, &underlays).await?;
            if remotes.vni != 0 {
                d.remote.push(remotes);
            }
            if let Some(z) = self.zone(c).await? {
                d.zones.push(z);
            }
            d.egress.push(self.cloud_egress(c).await?);
            let publications = self.publications_on(c, host).await?;
            if !publications.is_empty() {
                d.published.push(CloudPublications {
                    cloud: c,
                    publications,
                });
            }
            let services = self.services_of(c).await?;
            if !services.is_empty() {
                d.services.push(ProviderServices {
                    provider: c,
                    services,
                });
            }
        }
        Ok(d)
    }
}
