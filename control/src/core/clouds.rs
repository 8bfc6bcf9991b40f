//! Clouds: create (a random id, a random overlay network id held by `vni/<n>`, its gateway
//! address and its record in one transaction; a taken id or VNI is another try),
//! token rotation, listing, and delete, which revokes the grants and offers the cloud gave
//! and received within the store's transaction limit (see the module docs of [`super`]).

use super::*;

/// Overlay network ids (VXLAN VNIs, 24 bits, 0 unused): the fleet's limit of live clouds.
pub(super) const VNI_COUNT: u32 = (1 << 24) - 1;

pub(super) fn validate_quotas(q: &Quotas) -> Result<(), FieldError> {
    let checks: [(&str, u64, u64); 5] = [
        ("quotas.vms", q.vms as u64, 100_000),
        ("quotas.vcpus", q.vcpus as u64, 1_000_000),
        ("quotas.memory_mib", q.memory_mib, 1 << 34),
        ("quotas.volume_gib", q.volume_gib, 1 << 24),
        ("quotas.bandwidth_mbps", q.bandwidth_mbps as u64, 1_000_000),
    ];
    for (field, v, max) in checks {
        if v > max {
            return Err(FieldError::new(field, format!("at most {max}")));
        }
    }
    Ok(())
}

impl Core {
    pub(super) async fn cloud(&self, c: CloudId) -> Result<(u64, Cloud), CoreError> {
        let (rev, mut cloud): (u64, Cloud) =
            self.read(&keys::cloud(c), || format!("cloud {c}")).await?;
        cloud.token_sha256.clear();
        Ok((rev, cloud))
    }

    /// The cloud record including its token hash (to write it back).
    pub(super) async fn cloud_record(&self, c: CloudId) -> Result<(u64, Cloud), CoreError> {
        self.read(&keys::cloud(c), || format!("cloud {c}")).await
    }

    pub(super) async fn create_cloud(&self, req: CreateCloud) -> Result<Reply, CoreError> {
        if let Some(name) = &req.name {
            validate_label("name", name)?;
        }
        let cidr = req.cidr.unwrap_or(self.cfg.default_cidr);
        if !(8..=28).contains(&cidr.len) {
            return Err(FieldError::new("cidr", "prefix length must be 8 to 28").into());
        }
        let quotas = req.quotas.unwrap_or(self.cfg.default_quotas);
        validate_quotas(&quotas)?;
        let expires_at = super::expiry::expiry_time(req.ttl_secs, req.expires_at, now())?;
        optimistic!("cloud ids".into(), async {
            let Some(id) = CloudId::new(u32::from_le_bytes(random_bytes::<4>()?)) else {
                return retry();
            };
            let token = new_cloud_token(id)?;
            // A random network id: the holder key's compare makes it unique among live
            // clouds, and a taken one is another try (see `vni` in docs/design.md).
            let vni = u32::from_le_bytes(random_bytes::<4>()?) % VNI_COUNT + 1;
            let name = req.name.clone().unwrap_or_else(|| id.to_string());
            let gateway = Ipv4Addr::from(cidr.network() + 1);
            let cloud = Cloud {
                id,
                zone: zone_apex(&name, &self.cfg.dns_suffix),
                name,
                cidr,
                gateway,
                quotas,
                usage: Usage::default(),
                created_at: now(),
                vni,
                expires_at,
                budget: None,
                token_sha256: token_hash(&token),
            };
            let mut txn = Txn {
                compares: vec![
                    Compare::Absent(keys::cloud(id)),
                    Compare::Absent(keys::vni_holder(vni)),
                ],
                success: vec![
                    put(keys::cloud(id), &cloud),
                    put(keys::vni_holder(vni), &id),
                    put(
                        keys::egress_policy(id),
                        &EgressPolicy {
                            mode: self.cfg.default_egress,
                            ..EgressPolicy::deny_all()
                        },
                    ),
                    Op::Put {
                        key: keys::ip(id, gateway),
                        value: b"\"gateway\"".to_vec(),
                    },
                ],
            };
            if let Some(at) = expires_at {
                txn.success.push(put(keys::expiry(at, id), &id));
            }
            if self.commit(txn).await?.is_some() {
                let mut cloud = cloud;
                cloud.token_sha256.clear();
                return done(Reply::CreatedCloud(Box::new(CreatedCloud { cloud, token })));
            }
            retry()
        })
    }

    /// Gives cloud `c` a new token, which replaces its hash in the cloud record (guarded by the
    /// record's revision, retried on a lost race). Every request authenticates against the
    /// stored hash (nothing caches it), so the old token stops working at once, on every
    /// control plane sharing the store.
    pub(super) async fn rotate_cloud_token(&self, c: CloudId) -> Result<Reply, CoreError> {
        let token = new_cloud_token(c)?;
        optimistic!(format!("cloud {c}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            cloud.token_sha256 = token_hash(&token);
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::cloud(c), rev)],
                success: vec![put(keys::cloud(c), &cloud)],
            };
            if self.commit(txn).await?.is_some() {
                cloud.token_sha256.clear();
                return done(Reply::CloudToken(Box::new(CloudToken {
                    cloud,
                    token: token.clone(),
                })));
            }
            retry()
        })
    }

    pub(super) async fn list_clouds(
        &self,
        after: Option<CloudId>,
        limit: usize,
    ) -> Result<Reply, CoreError> {
        let start = after.map(keys::cloud);
        let limit = limit.clamp(1, 1000);
        let page = self.store.range("clouds/", start.as_deref(), limit).await?;
        let mut out = Vec::with_capacity(page.len());
        for kv in page {
            let mut c: Cloud = decode(&kv.key, &kv.value)?;
            c.token_sha256.clear();
            out.push(c);
        }
        Ok(Reply::Clouds(out))
    }

    pub(super) async fn delete_cloud(&self, c: CloudId) -> Result<Reply, CoreError> {
        self.delete_cloud_if(c, None).await?;
        super::budget::forget(self, c);
        Ok(Reply::Done)
    }

    /// Deletes cloud `c` with everything it holds; with `expired_by`, only if the cloud
    /// (as read in the same transaction) expires at or before that time. Returns whether it
    /// was deleted.
    pub(super) async fn delete_cloud_if(
        &self,
        c: CloudId,
        expired_by: Option<u64>,
    ) -> Result<bool, CoreError> {
        optimistic!(format!("cloud {c}"), async {
            let (rev, cloud) = self.cloud(c).await?;
            if let Some(t) = expired_by {
                if cloud.expires_at.is_none_or(|at| at > t) {
                    return done(false);
                }
            }
            let vms: Vec<Vm> = self.list(&keys::vms(c)).await?;
            let volumes: Vec<Volume> = self.list(&keys::volumes(c)).await?;
            let exports: Vec<(String, u64, Grant)> = self.list_kv(&keys::all_grants(c)).await?;
            let imports: Vec<(String, u64, Grant)> = self.list_kv(&keys::imports(c)).await?;
            let offered: Vec<(String, u64, Offer)> = self.list_kv(&keys::all_offers(c)).await?;
            let received: Vec<(String, u64, Offer)> = self.list_kv(&keys::inbox(c)).await?;
            let egress_address = self.egress_address(c).await?;
            let published: Vec<Publication> = self.list(&keys::publications(c)).await?;
            let mut ops = vec![
                Op::Delete {
                    key: keys::cloud(c),
                },
                Op::DeletePrefix {
                    prefix: keys::inside(c),
                },
            ];
            // Its published addresses and ports are free again.
            for p in &published {
                ops.extend(super::publications::publication_deletes(p));
            }
            // Its expiry goes from the index.
            if let Some(at) = cloud.expires_at {
                ops.push(Op::Delete {
                    key: keys::expiry(at, c),
                });
            }
            // Its network id is free again.
            if cloud.vni != 0 {
                ops.push(Op::Delete {
                    key: keys::vni_holder(cloud.vni),
                });
            }
            // Its egress address goes back to the pool (its own key is under the prefix).
            if let Some((_, a)) = &egress_address {
                ops.push(Op::Delete {
                    key: keys::egress_address_holder(a.address),
                });
            }
            let hosts: BTreeSet<&str> = vms.iter().map(|v| v.host.as_str()).collect();
            for h in &hosts {
                ops.push(Op::DeletePrefix {
                    prefix: keys::placements_of(h, c),
                });
            }
            let vhosts: BTreeSet<&str> = volumes.iter().map(|v| v.host.as_str()).collect();
            for h in &vhosts {
                ops.push(Op::DeletePrefix {
                    prefix: keys::volume_placements_of(h, c),
                });
            }
            let own = Txn {
                compares: vec![Compare::ModRevision(keys::cloud(c), rev)],
                success: ops,
            };
            // Grants this cloud gave (the consumers' imports and VIPs go too) and grants it
            // received (the providers' grant records go too).
            let mut revocations = Vec::with_capacity(exports.len() + imports.len());
            for (key, grev, g) in &exports {
                revocations.push(Revocation::new(g, key, *grev));
            }
            for (key, grev, g) in &imports {
                revocations.push(Revocation::new(g, key, *grev));
            }
            // Offers it made (the consumers' copies go too) and its copies of offers it
            // received (the providers' records stay pending: see `Revocation::received_offer`).
            for (key, orev, o) in &offered {
                revocations.push(Revocation::offer(o, key, *orev));
            }
            for (key, orev, o) in &received {
                revocations.push(Revocation::received_offer(o, key, *orev));
            }
            let placements = hosts.len() + vhosts.len();
            let too_large = |size, limit| CoreError::TxnTooLarge {
                what: format!("deleting cloud {c}"),
                size,
                limit,
                hint: format!(
                    "removing its VM and volume placements takes {placements} of them (one per \
                         host and kind); delete some of its VMs and volumes first, or raise both \
                         limits"
                ),
            };
            // Its endpoints' final usage records arrive after the delete: the hosts that ran it
            // may still deliver them for a day. Written first, apart (the delete's own
            // transaction is as large as the store allows); harmless while the cloud exists,
            // and every attempt renews them.
            let grace: Vec<Op> = hosts
                .iter()
                .map(|h| put(keys::usage_grace(c, h), &(now() + USAGE_GRACE_SECS)))
                .collect();
            for chunk in grace.chunks(64) {
                self.commit(Txn {
                    compares: vec![],
                    success: chunk.to_vec(),
                })
                .await?;
            }
            if self
                .commit_delete(own, &keys::inside(c), revocations, too_large)
                .await?
            {
                return done(true);
            }
            retry()
        })
    }
}
