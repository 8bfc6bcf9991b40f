//! Egress policies: what a cloud's VMs may reach outside the cloud (`EgressPolicy`).
//!
//! Decisions:
//! - **Written at create.** A new cloud gets a policy of `clouds.default_egress`'s mode in the
//!   same transaction as its record, so changing the operator's default later changes no
//!   existing cloud. A cloud with no policy key (created before egress existed) has the
//!   policy it always had: `deny`.
//! - **Names are stored in lower case**, without a final dot: DNS compares names without
//!   case, and hosts match answers against the stored form.
//! - **Own egress addresses** come from the operator's pool (`clouds.egress_pool`); a cloud
//!   holds at most one, and an address at most one cloud: `egressaddr/<ip>` names its holder
//!   and is written with `Compare::Absent` in the same transaction as the cloud's
//!   `c/<id>/egressaddr`, so two clouds can never hold one address, even through two control
//!   planes. Deleting the cloud deletes both. Without an address of its own a cloud's egress
//!   leaves from its host's address.
//! - Hosts receive the policies of the clouds they run VMs of with their sync (`c/<id>/egress`
//!   is a key the feed routes to the hosts of the cloud, see `feed::egress_cloud`); enforcing
//!   them is the egress dataplane's (not built yet).

use super::*;

impl Core {
    /// A cloud's egress policy (`deny` if it has none).
    pub(super) async fn egress_policy(&self, c: CloudId) -> Result<EgressPolicy, CoreError> {
        match self.store.get(&keys::egress_policy(c)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Ok(EgressPolicy::deny_all()),
        }
    }

    /// A cloud's own egress address with its revision, if it has one.
    pub(super) async fn egress_address(
        &self,
        c: CloudId,
    ) -> Result<Option<(u64, EgressAddress)>, CoreError> {
        match self.store.get(&keys::egress_address(c)).await? {
            Some(kv) => Ok(Some((kv.mod_revision, decode(&kv.key, &kv.value)?))),
            None => Ok(None),
        }
    }

    /// What a host of cloud `c` applies of its egress: the policy and its own address.
    /// A cloud over its budget gets `deny` (its own policy stays, for when it is back).
    pub(super) async fn cloud_egress(&self, c: CloudId) -> Result<CloudEgress, CoreError> {
        let mut policy = self.egress_policy(c).await?;
        if self.over_budget(c).await? {
            policy.mode = EgressMode::Deny;
            policy.allow.clear();
            policy.deny.clear();
        }
        Ok(CloudEgress {
            cloud: c,
            policy,
            address: self.egress_address(c).await?.map(|(_, a)| a.address),
            cidr: Some(self.cloud(c).await?.1.cidr),
        })
    }

    pub(super) async fn assign_egress_address(
        &self,
        c: CloudId,
        req: AssignEgressAddress,
    ) -> Result<Reply, CoreError> {
        if self.cfg.egress_pool.is_empty() {
            return Err(CoreError::Conflict {
                code: "no_egress_pool",
                message: "this control plane has no egress addresses to give (clouds.egress_pool)"
                    .into(),
            });
        }
        if let Some(a) = req.address {
            if !self.cfg.egress_pool.iter().any(|n| n.contains(a)) {
                return Err(FieldError::new(
                    "address",
                    format!("{a} is not in clouds.egress_pool"),
                )
                .into());
            }
        }
        optimistic!(format!("egress address of cloud {c}"), async {
            self.cloud(c).await?;
            let held = self.egress_address(c).await?;
            let address = match req.address {
                Some(a) => a,
                None => match &held {
                    // Asking again for any address keeps the one it has.
                    Some((_, h)) => h.address,
                    None => match self.free_pool_address().await? {
                        Some(a) => a,
                        None => {
                            return Err(CoreError::Conflict {
                                code: "egress_pool_exhausted",
                                message: "every address of clouds.egress_pool is held by a cloud"
                                    .into(),
                            })
                        }
                    },
                },
            };
            let record = EgressAddress { cloud: c, address };
            if held.as_ref().is_some_and(|(_, h)| h.address == address) {
                return done(Reply::EgressAddress(record));
            }
            let mut compares = vec![
                Compare::Present(keys::cloud(c)),
                Compare::Absent(keys::egress_address_holder(address)),
            ];
            let mut success = vec![
                put(keys::egress_address_holder(address), &c),
                put(keys::egress_address(c), &record),
            ];
            match &held {
                Some((rev, old)) => {
                    compares.push(Compare::ModRevision(keys::egress_address(c), *rev));
                    success.push(Op::Delete {
                        key: keys::egress_address_holder(old.address),
                    });
                }
                None => compares.push(Compare::Absent(keys::egress_address(c))),
            }
            if self.commit(Txn { compares, success }).await?.is_some() {
                return done(Reply::EgressAddress(record));
            }
            // Lost a race, or the address is another cloud's: which one, on the next read.
            if req.address.is_some()
                && self
                    .store
                    .get(&keys::egress_address_holder(address))
                    .await?
                    .is_some_and(|kv| kv.value != encode(&c))
            {
                return Err(CoreError::Conflict {
                    code: "egress_address_taken",
                    message: format!("{address} is another cloud's egress address"),
                });
            }
            retry()
        })
    }

    /// The first address of the pool no cloud holds (a prefix's network and broadcast
    /// addresses are skipped below /31).
    async fn free_pool_address(&self) -> Result<Option<Ipv4Addr>, CoreError> {
        let held: std::collections::HashSet<String> = self
            .store
            .range(keys::egress_address_holders(), None, 0)
            .await?
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        for net in &self.cfg.egress_pool {
            let (first, last) = (net.network(), net.network() + (net.size() - 1) as u32);
            let (first, last) = if net.len < 31 {
                (first + 1, last - 1)
            } else {
                (first, last)
            };
            for ip in first..=last {
                let ip = Ipv4Addr::from(ip);
                if !held.contains(&keys::egress_address_holder(ip)) {
                    return Ok(Some(ip));
                }
            }
        }
        Ok(None)
    }

    pub(super) async fn release_egress_address(&self, c: CloudId) -> Result<Reply, CoreError> {
        optimistic!(format!("egress address of cloud {c}"), async {
            self.cloud(c).await?;
            let Some((rev, held)) = self.egress_address(c).await? else {
                return Err(CoreError::NotFound(format!("egress address of cloud {c}")));
            };
            let txn = Txn {
                compares: vec![Compare::ModRevision(keys::egress_address(c), rev)],
                success: vec![
                    Op::Delete {
                        key: keys::egress_address(c),
                    },
                    Op::Delete {
                        key: keys::egress_address_holder(held.address),
                    },
                ],
            };
            if self.commit(txn).await?.is_some() {
                return done(Reply::Done);
            }
            retry()
        })
    }

    pub(super) async fn put_egress_policy(
        &self,
        c: CloudId,
        req: EgressPolicy,
    ) -> Result<Reply, CoreError> {
        let policy = req.normalized();
        policy.validate()?;
        let txn = Txn {
            compares: vec![Compare::Present(keys::cloud(c))],
            success: vec![put(keys::egress_policy(c), &policy)],
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::EgressPolicy(policy)),
            None => Err(CoreError::NotFound(format!("cloud {c}"))),
        }
    }
}
