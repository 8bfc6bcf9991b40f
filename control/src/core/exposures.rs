//! Exposures, offers and grants (PrivateLink-style): the provider's exposure, the offer
//! the consumer consents to (or its offer policy accepts), the grant that allocates the
//! consumer's VIP and import, and [`Revocation`]s, the guarded ops that undo a grant or an
//! offer on both sides. Grants and offers write both cloud records and the exposure back so
//! that a concurrent delete re-reads (see the module docs of [`super`]).

use super::*;

/// Revoking one grant: the provider's grant record, the consumer's import, the grant's index
/// key, the consumer's VIP address and the provider's NAT addresses (the grant's and those of
/// further consumer hosts) go, guarded by the revision of the record (grant or import, which
/// are always written together, also when a host's NAT address is added) it was read from.
pub(super) struct Revocation {
    pub(super) guard: Compare,
    pub(super) ops: Vec<Op>,
}

impl Revocation {
    pub(super) fn new(g: &Grant, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![
                Op::Delete {
                    key: keys::grant(g.provider, &g.exposure, g.consumer),
                },
                Op::Delete {
                    key: keys::import(g.consumer, g.provider, &g.exposure),
                },
                Op::Delete {
                    key: keys::ip(g.consumer, g.vip),
                },
                Op::Delete {
                    key: keys::ip(g.provider, g.nat_ipv4),
                },
                Op::Delete {
                    key: keys::grant_index(g.provider, g.consumer, &g.exposure),
                },
            ]
            .into_iter()
            .chain(
                g.host_nats
                    .iter()
                    .filter(|n| n.ipv4 != g.nat_ipv4)
                    .map(|n| Op::Delete {
                        key: keys::ip(g.provider, n.ipv4),
                    }),
            )
            .collect(),
        }
    }

    /// Withdrawing (or declining) a pending offer: the provider's record and the consumer's
    /// copy, which are always written together, guarded by the one read.
    pub(super) fn offer(o: &Offer, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![
                Op::Delete {
                    key: keys::offer(o.provider, &o.exposure, o.consumer),
                },
                Op::Delete {
                    key: keys::inbox_entry(o.consumer, o.provider, &o.exposure),
                },
            ],
        }
    }

    /// A deleted consumer's copy of an offer it received. The provider's record stays
    /// pending, as an offer to a cloud that never existed does: the provider learns nothing.
    pub(super) fn received_offer(o: &Offer, read_key: &str, read_revision: u64) -> Self {
        Revocation {
            guard: Compare::ModRevision(read_key.to_string(), read_revision),
            ops: vec![Op::Delete {
                key: keys::inbox_entry(o.consumer, o.provider, &o.exposure),
            }],
        }
    }
}

impl Core {
    /// Grants as they stand: an active grant that a host failed to install is `failed` with
    /// the host's error, and one whose provider and consumer run on different hosts that the
    /// overlay does not join (a host without it, or a provider without a network id) is
    /// `unreachable`; see [`GrantState`].
    pub(super) async fn effective(&self, mut grants: Vec<Grant>) -> Result<Vec<Grant>, CoreError> {
        let mut failures: HashMap<CloudId, HashMap<String, ServiceFailure>> = HashMap::new();
        for g in &grants {
            if g.state == GrantState::Active && !failures.contains_key(&g.provider) {
                let found = self
                    .list_kv::<ServiceFailure>(&keys::service_failures(g.provider))
                    .await?
                    .into_iter()
                    .map(|(k, _, f)| (k, f))
                    .collect();
                failures.insert(g.provider, found);
            }
        }
        let mut vnis: HashMap<CloudId, u32> = HashMap::new();
        for g in &grants {
            if g.state == GrantState::Active && !vnis.contains_key(&g.provider) {
                let vni = match self.cloud(g.provider).await {
                    Ok((_, c)) => c.vni,
                    Err(CoreError::NotFound(_)) => 0,
                    Err(e) => return Err(e),
                };
                vnis.insert(g.provider, vni);
            }
        }
        let st = self.feed.state.lock().expect("feed lock");
        let hosts_of = |c: CloudId| -> BTreeSet<&String> {
            st.placements
                .iter()
                .filter(|(_, clouds)| clouds.contains_key(&c))
                .map(|(h, _)| h)
                .collect()
        };
        for g in grants.iter_mut().filter(|g| g.state == GrantState::Active) {
            let key = keys::service_failure(g.provider, g.consumer, g.vip);
            // A failure reported for an earlier grant with the same VIP does not count.
            if let Some(f) = failures
                .get(&g.provider)
                .and_then(|m| m.get(&key))
                .filter(|f| f.at >= g.created_at)
            {
                g.state = GrantState::Failed;
                g.reason = Some(format!("host {}: {}", f.host, f.message));
                continue;
            }
            // Every consumer host must reach the provider: on a host of its own, or over the
            // overlay (both ends on it, and the provider with a network id).
            let (p, c) = (hosts_of(g.provider), hosts_of(g.consumer));
            let vni = vnis.get(&g.provider).copied().unwrap_or(0);
            let joined = |h: &String| vni != 0 && st.overlay.contains(h);
            let over = p.iter().any(|h| joined(h));
            let stranded =
                !p.is_empty() && c.iter().any(|ch| !(p.contains(*ch) || over && joined(ch)));
            if stranded {
                let apart: BTreeSet<&String> = p.union(&c).copied().collect();
                let names = apart
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                g.state = GrantState::Unreachable;
                g.reason = Some(if vni == 0 {
                    format!(
                        "the provider's VMs and the consumer's run on different hosts ({names}) and the provider has no network id (created before the overlay)"
                    )
                } else {
                    format!(
                        "the provider's VMs and the consumer's run on different hosts ({names}), not all of them on the overlay"
                    )
                });
            }
        }
        Ok(grants)
    }

    /// Commits a delete that revokes grants (see the module docs): `own` deletes the resource's
    /// own keys (all of them under `own_prefix` but a few) guarded by its revision. With the
    /// `revocations` in one transaction if that fits the store's limit; else the revocations
    /// are committed first, in transactions of at most the limit, and nothing of `own` is.
    /// `Ok(true)` if the delete is committed; `Ok(false)` if the caller must re-read and call
    /// again (a compare failed, or the revocations went ahead). `too_large` makes the error for
    /// an `own` over the limit, returned before anything is revoked.
    pub(super) async fn commit_delete(
        &self,
        own: Txn,
        own_prefix: &str,
        revocations: Vec<Revocation>,
        too_large: impl FnOnce(usize, usize) -> CoreError,
    ) -> Result<bool, CoreError> {
        let mut whole = own.clone();
        for r in &revocations {
            whole.compares.push(r.guard.clone());
            whole.success.extend(
                r.ops
                    .iter()
                    .filter(|op| !matches!(op, Op::Delete { key } if key.starts_with(own_prefix)))
                    .cloned(),
            );
        }
        let limit = match self.store.max_txn_ops() {
            Some(limit) if whole.size() > limit => limit,
            _ => return Ok(self.commit(whole).await?.is_some()),
        };
        if own.size() > limit {
            return Err(too_large(own.size(), limit));
        }
        let mut chunk = Txn::default();
        for r in revocations {
            if chunk.compares.len() + 1 > limit || chunk.success.len() + r.ops.len() > limit {
                // A chunk whose guard fails is left for the re-read; the others go ahead.
                self.commit(std::mem::take(&mut chunk)).await?;
            }
            chunk.compares.push(r.guard);
            chunk.success.extend(r.ops);
        }
        if !chunk.success.is_empty() {
            self.commit(chunk).await?;
        }
        Ok(false)
    }

    pub(super) async fn exposure(
        &self,
        c: CloudId,
        name: &str,
    ) -> Result<(u64, Exposure), CoreError> {
        self.read(&keys::exposure(c, name), || {
            format!("exposure {name} of cloud {c}")
        })
        .await
    }

    pub(super) async fn create_exposure(
        &self,
        c: CloudId,
        req: CreateExposure,
    ) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        if req.port == 0 {
            return Err(FieldError::new("port", "must be 1 to 65535").into());
        }
        if req.backends.is_empty() || req.backends.len() > MAX_BACKENDS {
            return Err(FieldError::new(
                "backends",
                format!(
                    "{} backends: must hold 1 to {MAX_BACKENDS} (what the dataplane holds per \
                     exposure)",
                    req.backends.len()
                ),
            )
            .into());
        }
        for (i, b) in req.backends.iter().enumerate() {
            validate_label(&format!("backends[{i}].vm"), &b.vm)?;
            if b.port == 0 {
                return Err(
                    FieldError::new(format!("backends[{i}].port"), "must be 1 to 65535").into(),
                );
            }
            if self.store.get(&keys::vm(c, &b.vm)).await?.is_none() {
                return Err(FieldError::new(
                    format!("backends[{i}].vm"),
                    format!("no VM {} in this cloud", b.vm),
                )
                .into());
            }
        }
        self.cloud(c).await?;
        let count = self.store.count(&keys::exposures(c)).await?;
        check_quota(
            "exposures",
            count + 1,
            self.cfg.max_exposures_per_cloud as u64,
        )?;
        let exp = Exposure {
            cloud: c,
            name: req.name.clone(),
            protocol: req.protocol,
            port: req.port,
            backends: req.backends,
            require_acceptance: false,
            created_at: now(),
        };
        let txn = Txn {
            compares: vec![
                Compare::Present(keys::cloud(c)),
                Compare::Absent(keys::exposure(c, &req.name)),
            ],
            success: vec![put(keys::exposure(c, &req.name), &exp)],
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok(Reply::Exposure(exp)),
            TxnOutcome::Failed { failed_compare: 0 } => {
                Err(CoreError::NotFound(format!("cloud {c}")))
            }
            TxnOutcome::Failed { .. } => {
                Err(conflict("exists", format!("exposure {} exists", req.name)))
            }
        }
    }

    pub(super) async fn delete_exposure(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        optimistic!(format!("exposure {name}"), async {
            let (rev, _) = self.exposure(c, name).await?;
            let grants: Vec<(String, u64, Grant)> = self.list_kv(&keys::grants(c, name)).await?;
            let offers: Vec<(String, u64, Offer)> = self.list_kv(&keys::offers(c, name)).await?;
            let own = Txn {
                compares: vec![Compare::ModRevision(keys::exposure(c, name), rev)],
                success: vec![
                    Op::Delete {
                        key: keys::exposure(c, name),
                    },
                    Op::DeletePrefix {
                        prefix: keys::grants(c, name),
                    },
                ],
            };
            // The consumers' imports and VIPs go too, and its pending offers.
            let revocations = grants
                .iter()
                .map(|(key, grev, g)| Revocation::new(g, key, *grev))
                .chain(
                    offers
                        .iter()
                        .map(|(key, orev, o)| Revocation::offer(o, key, *orev)),
                )
                .collect();
            let too_large = |size, limit| CoreError::TxnTooLarge {
                what: format!("deleting exposure {name}"),
                size,
                limit,
                hint: "raise both limits".into(),
            };
            if self
                .commit_delete(own, &keys::grants(c, name), revocations, too_large)
                .await?
            {
                return done(Reply::Done);
            }
            retry()
        })
    }

    /// Offers exposure `exp_name` of `c` to `consumer` (see the module docs, "Grants are
    /// offers"). Never reads the consumer's cloud record: the reply, and every error, is the
    /// same whether `consumer` exists, unless the consumer's policy lists `c`.
    pub(super) async fn create_offer(
        &self,
        c: CloudId,
        exp_name: &str,
        consumer: CloudId,
    ) -> Result<Reply, CoreError> {
        if consumer == c {
            return Err(FieldError::new("consumer", "a cloud cannot grant to itself").into());
        }
        // Offers count as grants of the exposure: a provider's records stay bounded however
        // many cloud ids it offers to.
        let (_, exp) = self.exposure(c, exp_name).await?;
        let count = self.store.count(&keys::grants(c, exp_name)).await?
            + self.store.count(&keys::offers(c, exp_name)).await?;
        check_quota("grants", count + 1, self.cfg.max_grants_per_exposure as u64)?;
        if self.offer_policy(consumer).await?.accept_from.contains(&c) {
            if let Some(g) = self.activate(c, exp_name, consumer, None).await? {
                return Ok(Reply::Offer(Offer {
                    provider: c,
                    exposure: g.exposure,
                    consumer,
                    protocol: exp.protocol,
                    port: exp.port,
                    state: OfferState::Accepted,
                    created_at: g.created_at,
                }));
            }
            // The consumer was deleted meanwhile: an offer like to any unknown id.
        }
        // What the provider knows already (its own records) is told before any bound.
        if self
            .store
            .get(&keys::grant(c, exp_name, consumer))
            .await?
            .is_some()
        {
            return Err(conflict(
                "exists",
                format!("exposure {exp_name} is already granted to {consumer}"),
            ));
        }
        if self
            .store
            .get(&keys::offer(c, exp_name, consumer))
            .await?
            .is_some()
        {
            return Err(conflict(
                "exists",
                format!("exposure {exp_name} is already offered to {consumer}"),
            ));
        }
        // The consumer's bounds, counted on its inbox, which exists alike for unknown ids.
        let pending = self.store.count(&keys::inbox(consumer)).await?;
        let from_here = self.store.count(&keys::inbox_from(consumer, c)).await?;
        if pending >= self.cfg.max_pending_offers_per_cloud as u64
            || from_here >= self.cfg.max_pending_offers_per_provider as u64
        {
            return Err(CoreError::OfferRefused(consumer));
        }
        optimistic!(format!("exposure {exp_name}"), async {
            let (erev, exp) = self.exposure(c, exp_name).await?;
            // The provider's records are written back unchanged, so that a delete of the
            // exposure or of the provider that read its offers before this one commits fails
            // its compare and re-reads (as grants do, see the module docs).
            let (prev, provider) = self.cloud_record(c).await?;
            let offer = Offer {
                provider: c,
                exposure: exp_name.to_string(),
                consumer,
                protocol: exp.protocol,
                port: exp.port,
                state: OfferState::Pending,
                created_at: now(),
            };
            let txn = Txn {
                compares: vec![
                    Compare::Absent(keys::grant(c, exp_name, consumer)),
                    Compare::Absent(keys::offer(c, exp_name, consumer)),
                    Compare::ModRevision(keys::exposure(c, exp_name), erev),
                    Compare::ModRevision(keys::cloud(c), prev),
                ],
                success: vec![
                    put(keys::offer(c, exp_name, consumer), &offer),
                    put(keys::inbox_entry(consumer, c, exp_name), &offer),
                    put(keys::exposure(c, exp_name), &exp),
                    put(keys::cloud(c), &provider),
                ],
            };
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { .. } => return done(Reply::Offer(offer)),
                TxnOutcome::Failed { failed_compare: 0 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already granted to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { failed_compare: 1 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already offered to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { .. } => {}
            }
            retry()
        })
    }

    /// Makes exposure `exp_name` of `provider` an active grant to `consumer`: the VIP from the
    /// consumer's range, the NAT address from the provider's, the grant and the consumer's
    /// import. With `offer` (its key and revision as read), the pending offer it accepts goes
    /// in the same transaction. `None` if the consumer does not exist.
    pub(super) async fn activate(
        &self,
        provider_id: CloudId,
        exp_name: &str,
        consumer: CloudId,
        offer: Option<(&Offer, String, u64)>,
    ) -> Result<Option<Grant>, CoreError> {
        let c = provider_id;
        optimistic!(format!("cloud {consumer}"), async {
            // Re-read every round: an exposure (or provider) deleted meanwhile is a 404.
            let (erev, exp) = self.exposure(c, exp_name).await?;
            // Both cloud records and the exposure are written back unchanged: a delete of
            // either cloud or of the exposure that read its grants before this one commits
            // then fails its compare and re-reads, so it revokes this grant too instead of
            // leaving its halves behind.
            let (prev, provider) = self.cloud_record(c).await?;
            let (crev, ccloud) = match self.cloud_record(consumer).await {
                Ok(v) => v,
                Err(CoreError::NotFound(_)) => return done(None),
                Err(e) => return Err(e),
            };
            let vip = self.allocate_ip(&ccloud).await?;
            let nat_ipv4 = self.allocate_ip(&provider).await?;
            let grant = Grant {
                reason: None,
                provider: c,
                exposure: exp_name.to_string(),
                consumer,
                state: GrantState::Active,
                vip,
                // The provider's id, not its name: names of clouds are not unique, ids are,
                // and (id, exposure) is the grant's key, so no two grants share a name.
                fqdn: format!("{}.{c}.svc.{}", exp.name, ccloud.zone),
                nat_ipv4,
                created_at: now(),
                host_nats: Vec::new(),
            };
            let mut txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::exposure(c, exp_name), erev),
                    Compare::ModRevision(keys::cloud(consumer), crev),
                    Compare::Absent(keys::grant(c, exp_name, consumer)),
                    Compare::Absent(keys::ip(consumer, vip)),
                    Compare::Absent(keys::ip(c, nat_ipv4)),
                    Compare::ModRevision(keys::cloud(c), prev),
                ],
                success: vec![
                    put(keys::grant(c, exp_name, consumer), &grant),
                    put(keys::import(consumer, c, exp_name), &grant),
                    put(keys::grant_index(c, consumer, exp_name), &""),
                    put(keys::ip(consumer, vip), &format!("vip:{c}/{exp_name}")),
                    put(keys::ip(c, nat_ipv4), &format!("nat:{consumer}/{exp_name}")),
                    put(keys::cloud(c), &provider),
                    put(keys::cloud(consumer), &ccloud),
                    put(keys::exposure(c, exp_name), &exp),
                ],
            };
            match &offer {
                Some((o, key, rev)) => {
                    let r = Revocation::offer(o, key, *rev);
                    txn.compares.push(r.guard);
                    txn.success.extend(r.ops);
                }
                None => txn
                    .compares
                    .push(Compare::Absent(keys::offer(c, exp_name, consumer))),
            }
            match self.store.txn(txn).await? {
                TxnOutcome::Committed { .. } => return done(Some(grant)),
                TxnOutcome::Failed { failed_compare: 2 } => {
                    return Err(conflict(
                        "exists",
                        format!("exposure {exp_name} is already granted to {consumer}"),
                    ))
                }
                TxnOutcome::Failed { failed_compare: 6 } => {
                    return Err(match offer {
                        Some(_) => CoreError::NotFound(format!(
                            "offer of {provider_id}/{exp_name} to {consumer}"
                        )),
                        None => conflict(
                            "exists",
                            format!("exposure {exp_name} is already offered to {consumer}"),
                        ),
                    })
                }
                TxnOutcome::Failed { .. } => {}
            }
            retry()
        })
    }

    /// The consumer accepts a pending offer: it becomes an active grant.
    pub(super) async fn accept_offer(
        &self,
        consumer: CloudId,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let key = keys::offer(provider, exp, consumer);
        let (rev, o): (u64, Offer) = self
            .read(&key, || format!("offer of {provider}/{exp} to {consumer}"))
            .await?;
        match self
            .activate(provider, exp, consumer, Some((&o, key, rev)))
            .await?
        {
            Some(g) => Ok(Reply::Grant(
                self.effective(vec![g]).await?.pop().expect("one grant"),
            )),
            None => Err(CoreError::NotFound(format!("cloud {consumer}"))),
        }
    }

    /// The consumer declines a pending offer: both records go.
    pub(super) async fn decline_offer(
        &self,
        consumer: CloudId,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let key = keys::inbox_entry(consumer, provider, exp);
        let (rev, o): (u64, Offer) = self
            .read(&key, || format!("offer of {provider}/{exp} to {consumer}"))
            .await?;
        self.commit_revocation(Revocation::offer(&o, &key, rev), provider, exp)
            .await
    }

    pub(super) async fn commit_revocation(
        &self,
        r: Revocation,
        provider: CloudId,
        exp: &str,
    ) -> Result<Reply, CoreError> {
        let txn = Txn {
            compares: vec![r.guard],
            success: r.ops,
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::Done),
            None => Err(CoreError::Contention(format!("grant {provider}/{exp}"))),
        }
    }

    /// Revokes an active grant, or withdraws a pending offer.
    pub(super) async fn revoke_grant(
        &self,
        provider: CloudId,
        exp: &str,
        consumer: CloudId,
    ) -> Result<Reply, CoreError> {
        let gkey = keys::grant(provider, exp, consumer);
        if let Some(kv) = self.store.get(&gkey).await? {
            let g: Grant = decode(&kv.key, &kv.value)?;
            let r = Revocation::new(&g, &gkey, kv.mod_revision);
            return self.commit_revocation(r, provider, exp).await;
        }
        let okey = keys::offer(provider, exp, consumer);
        let (rev, o): (u64, Offer) = self
            .read(&okey, || format!("grant of {provider}/{exp} to {consumer}"))
            .await?;
        self.commit_revocation(Revocation::offer(&o, &okey, rev), provider, exp)
            .await
    }

    /// A cloud's offer policy (empty if never set, or if the cloud does not exist).
    pub(super) async fn offer_policy(&self, c: CloudId) -> Result<OfferPolicy, CoreError> {
        match self.store.get(&keys::offer_policy(c)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Ok(OfferPolicy::default()),
        }
    }

    pub(super) async fn put_offer_policy(
        &self,
        c: CloudId,
        req: OfferPolicy,
    ) -> Result<Reply, CoreError> {
        if req.accept_from.len() > MAX_ACCEPT_FROM {
            return Err(FieldError::new(
                "accept_from",
                format!(
                    "{} providers; at most {MAX_ACCEPT_FROM}",
                    req.accept_from.len()
                ),
            )
            .into());
        }
        let mut accept_from = req.accept_from;
        accept_from.sort();
        accept_from.dedup();
        let policy = OfferPolicy { accept_from };
        let txn = Txn {
            compares: vec![Compare::Present(keys::cloud(c))],
            success: vec![put(keys::offer_policy(c), &policy)],
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::OfferPolicy(policy)),
            None => Err(CoreError::NotFound(format!("cloud {c}"))),
        }
    }
}
