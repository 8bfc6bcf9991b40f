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
                        let here = |c: CloudId| clouds.is_some_and(|m| m.contains_key(&c));
                        // Clouds with VMs here and the providers of grants to them.
                        let concerned = st.concerned(host);
                        let concerns = |c: CloudId| concerned.contains(&c);
                        // Whose hosts' addresses matter here: the clouds concerned, and the
                        // consumers of providers here (their hosts' NAT routes).
                        let addressed = |c: CloudId| concerns(c) || st.providers_of(c).any(here);
                        // The ring is in revision order: start at the first event after
                        // `after` (a scan from the front cost every woken host the whole
                        // ring: with 1,000 hosts and a full ring, 150 ms per change).
                        let start = st.ring.partition_point(|e| e.revision <= after);
                        st.ring
                            .range(start..)
                            .filter(|e| {
                                e.key.starts_with(&prefix)
                                    || zone_cloud(&e.key).is_some_and(here)
                                    || service_cloud(&e.key).is_some_and(concerns)
                                    || egress_cloud(&e.key).is_some_and(here)
                                    || published_cloud(&e.key).is_some_and(here)
                                    // Another host's VMs of a cloud here or of a provider to
                                    // one: the remote set.
                                    || parse_placement_key(&e.key)
                                        .is_some_and(|(_, is_vm, c, _)| is_vm && concerns(c))
                                    // A grant given or received by a cloud here.
                                    || keys::parse_grant_index(&e.key)
                                        .is_some_and(|(p, c, _)| here(p) || here(c))
                                    // A host's underlay address, the host sharing a cloud.
                                    || e.key.strip_prefix(keys::underlays()).is_some_and(|h| {
                                        st.placements
                                            .get(h)
                                            .is_some_and(|m| m.keys().any(|c| addressed(*c)))
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
                // Its backends' set (exposures, grants) or its grants' NAT addresses.
                remote.insert(p);
            }
            if let Some((p, _, _)) = keys::parse_grant_index(&key) {
                providers.insert(p);
                remote.insert(p);
            }
            if let Some((h, is_vm, cloud, name)) = parse_placement_key(&key) {
                if is_vm {
                    remote.insert(cloud);
                }
                if h != host {
                    continue;
                }
                // A consumer arriving or leaving: its providers' services and backends.
                {
                    let st = self.feed.state.lock().expect("feed lock");
                    for p in st.providers_of(cloud) {
                        providers.insert(p);
                        remote.insert(p);
                    }
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
        let concerned = {
            let st = self.feed.state.lock().expect("feed lock");
            let concerned = st.concerned(host);
            for h in &other_hosts {
                if let Some(m) = st.placements.get(h) {
                    for c in m.keys() {
                        if concerned.contains(c) {
                            remote.insert(*c);
                        }
                        // A consumer host of a provider here: the NAT routes to it.
                        remote.extend(st.providers_of(*c).filter(|p| present.contains(p)));
                    }
                }
            }
            concerned
        };
        if !remote.is_empty() {
            let underlays = self.underlays().await?;
            for c in remote {
                d.remote.push(match concerned.contains(&c) {
                    true => self.remotes_of(c, host, &present, &underlays).await?,
                    false => CloudRemotes {
                        cloud: c,
                        vni: 0,
                        endpoints: Vec::new(),
                        nats: Vec::new(),
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
            let services = match concerned.contains(&p) {
                true => self.services_for(p, host, &present).await?,
                false => Vec::new(),
            };
            d.services.push(ProviderServices {
                provider: p,
                services,
            });
        }
        Ok(d)
    }

    /// The active grants of provider `p` to consumers with VMs on `host` (`present`: the
    /// clouds there), resolved for its dataplane: the consumer's host translates, wherever
    /// the backends run, from its own NAT address of the grant (allocated here when the host
    /// first needs one, see [`Core::host_nat`]). See "Exposures across hosts" in
    /// docs/design.md.
    pub(super) async fn services_for(
        &self,
        p: CloudId,
        host: &str,
        present: &HashSet<CloudId>,
    ) -> Result<Vec<Service>, CoreError> {
        // From the store, not the feed's grant index: a snapshot reports the store's revision,
        // which the index may not have reached yet.
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
            let grants: Vec<(String, u64, Grant)> = self.list_kv(&keys::grants(p, &e.name)).await?;
            for (key, rev, g) in grants {
                if g.state != GrantState::Active || !present.contains(&g.consumer) {
                    continue;
                }
                let (consumer, vip) = (g.consumer, g.vip);
                let Some(nat_ipv4) = self.host_nat(g, &key, rev, host).await? else {
                    continue;
                };
                out.push(Service {
                    consumer,
                    vip,
                    nat_ipv4,
                    protocol: e.protocol,
                    port: e.port,
                    backends: backends.clone(),
                });
            }
        }
        Ok(out)
    }

    /// The NAT address of grant `g` (read at `key`, revision `rev`) for consumer host `host`:
    /// the one it has, or a new one: the grant's own `nat_ipv4` for its first consumer host,
    /// an address of the provider's range for any other, recorded in the grant and its import
    /// (written together, so a revocation guarded by either sees it). `None`: the grant went
    /// meanwhile, or no address is left in the provider's range (logged; its consumers on
    /// this host cannot reach it until one is).
    pub(super) async fn host_nat(
        &self,
        mut g: Grant,
        key: &str,
        mut rev: u64,
        host: &str,
    ) -> Result<Option<Ipv4Addr>, CoreError> {
        for _ in 0..MAX_RETRIES {
            if let Some(n) = g.host_nats.iter().find(|n| n.host == host) {
                return Ok(Some(n.ipv4));
            }
            if g.host_nats.len() >= self.cfg.max_nat_addresses_per_grant as usize {
                tracing::warn!(
                    "no NAT address for host {host} of the grant of {}/{} to {}: it has {} \
                     (clouds.max_nat_addresses_per_grant)",
                    g.provider,
                    g.exposure,
                    g.consumer,
                    g.host_nats.len()
                );
                return Ok(None);
            }
            let first = g.host_nats.is_empty();
            let ipv4 = if first {
                g.nat_ipv4
            } else {
                let provider = match self.cloud(g.provider).await {
                    Ok((_, c)) => c,
                    Err(CoreError::NotFound(_)) => return Ok(None),
                    Err(e) => return Err(e),
                };
                match self.allocate_ip(&provider).await {
                    Ok(ip) => ip,
                    Err(e @ CoreError::QuotaExceeded { .. }) => {
                        tracing::warn!(
                            "no NAT address for host {host} of the grant of {}/{} to {}: {e}",
                            g.provider,
                            g.exposure,
                            g.consumer
                        );
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            };
            g.host_nats.push(HostNat {
                host: host.to_string(),
                ipv4,
            });
            let mut txn = Txn {
                compares: vec![Compare::ModRevision(key.to_string(), rev)],
                success: vec![
                    put(key.to_string(), &g),
                    put(keys::import(g.consumer, g.provider, &g.exposure), &g),
                ],
            };
            if !first {
                txn.compares
                    .push(Compare::Absent(keys::ip(g.provider, ipv4)));
                txn.success.push(put(
                    keys::ip(g.provider, ipv4),
                    &format!("hostnat:{}/{}@{host}", g.consumer, g.exposure),
                ));
            }
            if let TxnOutcome::Committed { .. } = self.store.txn(txn).await? {
                return Ok(Some(ipv4));
            }
            match self.store.get(key).await? {
                Some(kv) => {
                    g = decode(&kv.key, &kv.value)?;
                    rev = kv.mod_revision;
                }
                None => return Ok(None),
            }
        }
        Err(CoreError::Contention(format!(
            "the NAT address of host {host} for {}/{}",
            g.provider, g.exposure
        )))
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
    /// For a cloud without VMs on `host` (`present`: the clouds there), a provider of grants
    /// to clouds there, only its exposures' backends. For a cloud with VMs there, also the
    /// NAT addresses its grants have for other consumer hosts.
    pub(super) async fn remotes_of(
        &self,
        c: CloudId,
        host: &str,
        present: &HashSet<CloudId>,
        underlays: &HashMap<String, Ipv4Addr>,
    ) -> Result<CloudRemotes, CoreError> {
        let vni = match self.cloud(c).await {
            Ok((_, cloud)) => cloud.vni,
            Err(CoreError::NotFound(_)) => 0,
            Err(e) => return Err(e),
        };
        let mut out = CloudRemotes {
            cloud: c,
            vni,
            endpoints: Vec::new(),
            nats: Vec::new(),
        };
        if vni == 0 {
            return Ok(out);
        }
        let here = present.contains(&c);
        let backends: Option<HashSet<String>> = if here {
            None
        } else {
            let mut names = HashSet::new();
            for e in self.list::<Exposure>(&keys::exposures(c)).await? {
                names.extend(e.backends.into_iter().map(|b| b.vm));
            }
            Some(names)
        };
        out.endpoints = self
            .list::<Vm>(&keys::vms(c))
            .await?
            .into_iter()
            .filter(|v| v.host != host)
            .filter(|v| backends.as_ref().is_none_or(|b| b.contains(&v.name)))
            .filter_map(|v| {
                underlays.get(&v.host).map(|u| RemoteEndpoint {
                    mac: guest_mac(v.ipv4),
                    ipv4: v.ipv4,
                    underlay: *u,
                    host: v.host,
                    vm: v.name,
                })
            })
            .collect();
        if here {
            for g in self.list::<Grant>(&keys::all_grants(c)).await? {
                if g.state != GrantState::Active {
                    continue;
                }
                out.nats.extend(
                    g.host_nats
                        .into_iter()
                        .filter(|n| n.host != host)
                        .filter_map(|n| {
                            underlays.get(&n.host).map(|u| RemoteNat {
                                ipv4: n.ipv4,
                                underlay: *u,
                                host: n.host,
                            })
                        }),
                );
            }
        }
        Ok(out)
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
        let present: HashSet<CloudId> = clouds.iter().copied().collect();
        // The providers of grants to clouds here (their backends and services), from the
        // clouds' imports in the store: the snapshot reports the store's revision, which the
        // feed's grant index may not have reached yet.
        let mut providers: BTreeSet<CloudId> = BTreeSet::new();
        for c in &clouds {
            for g in self.list::<Grant>(&keys::imports(*c)).await? {
                if g.state == GrantState::Active && !present.contains(&g.provider) {
                    providers.insert(g.provider);
                }
            }
        }
        for p in providers {
            let remotes = self.remotes_of(p, host, &present, &underlays).await?;
            if remotes.vni != 0 {
                d.remote.push(remotes);
            }
            let services = self.services_for(p, host, &present).await?;
            if !services.is_empty() {
                d.services.push(ProviderServices {
                    provider: p,
                    services,
                });
            }
        }
        for c in clouds {
            let remotes = self.remotes_of(c, host, &present, &underlays).await?;
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
            let services = self.services_for(c, host, &present).await?;
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
