//! Hosts: registration, cordoning, host tokens, heartbeats (a host's syncs, written at most
//! every [`HEARTBEAT_SECS`]) and the status reports in which hosts push VM states, console
//! tails and failed services.

use super::*;

/// The record of a host registered now.
pub(super) fn new_host(name: &str) -> HostInfo {
    HostInfo {
        name: name.to_string(),
        registered_at: now(),
        token_sha256: String::new(),
        last_seen: now(),
        live: false,
        cordoned: false,
        underlay: None,
    }
}

impl Core {
    pub(super) async fn register_host(&self, name: String) -> Result<Reply, CoreError> {
        validate_label("name", &name)?;
        let (info, revision): (HostInfo, u64) = match self.store.get(&keys::host(&name)).await? {
            Some(kv) => (decode(&kv.key, &kv.value)?, kv.mod_revision),
            None => {
                let info = new_host(&name);
                let revision = self
                    .commit(Txn {
                        compares: vec![Compare::Absent(keys::host(&name))],
                        success: vec![put(keys::host(&name), &info)],
                    })
                    .await?
                    // Registered meanwhile by another request: the watch brings that record.
                    .unwrap_or(0);
                (info, revision)
            }
        };
        self.host_recorded(&info, revision);
        // A registration is a sign of life, too.
        self.heartbeat(&name).await?;
        Ok(Reply::Host(self.host_view(info)))
    }

    /// Records `name`'s underlay address (it must be registered). Unchanged: no write.
    pub(super) async fn set_host_underlay(
        &self,
        name: String,
        spec: HostUnderlay,
    ) -> Result<Reply, CoreError> {
        validate_label("host", &name)?;
        spec.validate()?;
        optimistic!(format!("host {name}"), async {
            let (rev, mut info): (u64, HostInfo) = self
                .read(&keys::host(&name), || format!("host {name}"))
                .await?;
            if info.underlay == Some(spec.underlay) {
                return done(Reply::Host(self.host_view(info)));
            }
            // One host per underlay address: other hosts send this one's guests' frames there.
            let hosts: Vec<HostInfo> = self.list(keys::hosts()).await?;
            if let Some(other) = hosts
                .iter()
                .find(|h| h.name != name && h.underlay == Some(spec.underlay))
            {
                return Err(CoreError::Conflict {
                    code: "underlay_taken",
                    message: format!(
                        "host {} has the underlay address {} already",
                        other.name, spec.underlay
                    ),
                });
            }
            info.underlay = Some(spec.underlay);
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::host(&name), rev)],
                success: vec![
                    put(keys::host(&name), &info),
                    put(keys::underlay(&name), &spec.underlay),
                ],
            };
            if let Some(revision) = self.commit(txn).await? {
                self.host_recorded(&info, revision);
                return done(Reply::Host(self.host_view(info)));
            }
            retry()
        })
    }

    /// Records where `name`'s guest agents are reached (it must be registered). Unchanged: no
    /// write.
    pub(super) async fn set_guest_access(
        &self,
        name: String,
        spec: GuestAccess,
    ) -> Result<Reply, CoreError> {
        validate_label("host", &name)?;
        spec.validate()?;
        let _: (u64, HostInfo) = self
            .read(&keys::host(&name), || format!("host {name}"))
            .await?;
        let key = keys::guest_access(&name);
        if let Some(kv) = self.store.get(&key).await? {
            if decode::<GuestAccess>(&key, &kv.value)? == spec {
                return Ok(Reply::Done);
            }
        }
        self.commit(Txn {
            compares: vec![Compare::Present(keys::host(&name))],
            success: vec![put(key, &spec)],
        })
        .await?;
        Ok(Reply::Done)
    }

    /// Where VM `vm` of cloud `c`'s guest agent is reached: it must be running (as far as the
    /// control plane knows) on a host that registered its guest access.
    pub(super) async fn guest_target(&self, c: CloudId, vm: &str) -> Result<Reply, CoreError> {
        let (_, v) = self.vm(c, vm).await?;
        if v.power != Power::Running {
            return Err(CoreError::Conflict {
                code: "vm_not_running",
                message: format!("VM {vm} is stopped; start it first"),
            });
        }
        let key = keys::guest_access(&v.host);
        let Some(kv) = self.store.get(&key).await? else {
            return Err(CoreError::Conflict {
                code: "no_guest_access",
                message: format!(
                    "host {} has not registered its guest access (its agent is not up, or \
                     predates exec)",
                    v.host
                ),
            });
        };
        Ok(Reply::Guest(Box::new(GuestTarget {
            host: v.host,
            access: decode(&key, &kv.value)?,
            cloud: c,
            vm: vm.to_string(),
        })))
    }

    /// Sets whether `name` takes new placements (it must be registered).
    pub(super) async fn cordon_host(
        &self,
        name: String,
        cordoned: bool,
    ) -> Result<Reply, CoreError> {
        validate_label("host", &name)?;
        optimistic!(format!("host {name}"), async {
            let (rev, mut info): (u64, HostInfo) = self
                .read(&keys::host(&name), || format!("host {name}"))
                .await?;
            info.cordoned = cordoned;
            info.live = false;
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::host(&name), rev)],
                success: vec![put(keys::host(&name), &info)],
            };
            if let Some(revision) = self.commit(txn).await? {
                self.host_recorded(&info, revision);
                return done(Reply::Host(self.host_view(info)));
            }
            retry()
        })
    }

    /// A host record as the API shows it: no token hash, liveness computed.
    pub(super) fn host_view(&self, mut h: HostInfo) -> HostInfo {
        h.token_sha256.clear();
        h.last_seen = h.last_seen.max(h.registered_at);
        h.live = self.live_at(h.last_seen, now());
        h
    }

    /// Records that `host` was heard from, at most once per [`HEARTBEAT_SECS`] (store writes
    /// stay at one per host per interval). Never creates a host record, and never overwrites a
    /// concurrent change of it (a token rotation): a lost compare is left to the next sync.
    pub(super) async fn heartbeat(&self, host: &str) -> Result<(), CoreError> {
        let now = now();
        if self
            .last_seen(host)
            .is_none_or(|s| now < s + HEARTBEAT_SECS)
        {
            return Ok(());
        }
        let Some(kv) = self.store.get(&keys::host(host)).await? else {
            return Ok(());
        };
        let mut info: HostInfo = decode(&kv.key, &kv.value)?;
        if now < info.last_seen + HEARTBEAT_SECS {
            return Ok(());
        }
        info.last_seen = now;
        info.live = false;
        let txn = Txn {
            compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
            success: vec![put(kv.key, &info)],
        };
        if let Some(revision) = self.commit(txn).await? {
            self.host_recorded(&info, revision);
        }
        Ok(())
    }

    /// Registers `name` if needed and gives it a new token, which replaces any earlier one
    /// (rotation: the old token stops working at once).
    pub(super) async fn issue_host_token(&self, name: String) -> Result<Reply, CoreError> {
        validate_label("name", &name)?;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?);
        let token = format!("atl_host_{name}_{secret}");
        optimistic!(format!("host {name}"), async {
            let (compare, mut info) = match self.store.get(&keys::host(&name)).await? {
                Some(kv) => (
                    Compare::ModRevision(kv.key.clone(), kv.mod_revision),
                    decode::<HostInfo>(&kv.key, &kv.value)?,
                ),
                None => (Compare::Absent(keys::host(&name)), new_host(&name)),
            };
            info.token_sha256 = token_hash(&token);
            let txn = Txn {
                compares: vec![compare],
                success: vec![put(keys::host(&name), &info)],
            };
            if let Some(revision) = self.commit(txn).await? {
                self.host_recorded(&info, revision);
                let host = self.host_view(info);
                return done(Reply::HostToken(Box::new(HostToken {
                    host,
                    token: token.clone(),
                })));
            }
            retry()
        })
    }

    pub(super) async fn report_status(
        &self,
        host: &str,
        report: StatusReport,
    ) -> Result<Reply, CoreError> {
        validate_label("host", host)?;
        for r in &report.vms {
            // Only VMs placed on this host: a host cannot write another's status. A VM deleted
            // or moved meanwhile fails the compare; its status no longer matters.
            let key = keys::placement(host, r.cloud, &r.vm);
            let mut success = vec![put(keys::vm_status(r.cloud, &r.vm), &r.status)];
            if let Some(text) = &r.console {
                let console = Console {
                    text: console_tail(text).to_string(),
                    updated_at: now(),
                };
                success.push(put(keys::vm_console(r.cloud, &r.vm), &console));
            }
            let txn = Txn {
                compares: vec![Compare::Present(key)],
                success,
            };
            self.commit(txn).await?;
        }
        for r in &report.idle {
            // Only VMs placed on this host (a host cannot stop another's), with an idle
            // timeout, running: anything else is ignored (a report racing a start, a delete
            // or a change of host).
            if let Err(e) = self.stop_idle(host, r).await {
                match e {
                    CoreError::NotFound(_) => {}
                    e => return Err(e),
                }
            }
        }
        for s in &report.services {
            // Only of clouds this host runs: a host cannot mark another's grant failed.
            let runs = |c: CloudId| {
                let st = self.feed.state.lock().expect("feed lock");
                st.placements.get(host).is_some_and(|m| m.contains_key(&c))
            };
            if !runs(s.provider) && !runs(s.consumer) {
                continue;
            }
            let key = keys::service_failure(s.provider, s.consumer, s.vip);
            match &s.error {
                Some(message) => {
                    let failure = ServiceFailure {
                        host: host.to_string(),
                        message: message.chars().take(512).collect(),
                        at: now(),
                    };
                    self.commit(Txn {
                        compares: vec![],
                        success: vec![put(key, &failure)],
                    })
                    .await?;
                }
                None => {
                    // Installed here now: clear this host's failure, not another host's.
                    if let Some(kv) = self.store.get(&key).await? {
                        let f: ServiceFailure = decode(&key, &kv.value)?;
                        if f.host == host {
                            self.commit(Txn {
                                compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                                success: vec![Op::Delete { key }],
                            })
                            .await?;
                        }
                    }
                }
            }
        }
        for d in &report.denied {
            // Only of clouds this host runs, bounded; the host's list replaces its last one.
            let runs = {
                let st = self.feed.state.lock().expect("feed lock");
                st.placements
                    .get(host)
                    .is_some_and(|m| m.contains_key(&d.cloud))
            };
            if !runs {
                continue;
            }
            d.validate()?;
            let entries: Vec<DeniedDestination> = d
                .entries
                .iter()
                .map(|e| DeniedDestination {
                    host: host.to_string(),
                    ..e.clone()
                })
                .collect();
            self.commit(Txn {
                compares: vec![Compare::Present(keys::cloud(d.cloud))],
                success: vec![put(keys::denied(d.cloud, host), &entries)],
            })
            .await?;
        }
        Ok(Reply::Done)
    }

    /// A cloud's denied destinations from every host, the most recent first.
    pub(super) async fn list_denied(&self, c: CloudId) -> Result<Reply, CoreError> {
        self.cloud(c).await?;
        let mut all: Vec<DeniedDestination> = Vec::new();
        for kv in self.store.range(&keys::all_denied(c), None, 0).await? {
            let entries: Vec<DeniedDestination> = decode(&kv.key, &kv.value)?;
            all.extend(entries);
        }
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.count.cmp(&a.count)));
        Ok(Reply::Denied(all))
    }
}
