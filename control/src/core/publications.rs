//! Publications: a cloud publishes a VM's TCP or UDP port on the internet, at an address of
//! the operator's pool (`clouds.ingress_pool`) and the same port number.
//!
//! Decisions:
//! - **The same port number** on the first pool address where it is free for the protocol:
//!   the publisher chose the port; only the address is the operator's. Each
//!   `(address, protocol, port)` has one holder (`pubport/…`, written with `Compare::Absent`
//!   in the transaction that writes the publication), so two clouds never share one.
//! - A publication is named `<vm>-<protocol>-<port>`: publishing the same port again is a
//!   conflict, not a second address.
//! - **Bounded per cloud** (`clouds.max_publications_per_cloud`, 409 `quota_exceeded`,
//!   field `quotas.publications`): counted before the transaction, as exposures are, so
//!   publishes of one cloud in flight at the same moment all pass the count at the limit
//!   (the overshoot is bounded by the tenant's concurrency, not by the pool); a cloud cannot
//!   take a popular port at every pool address, nor fill its hosts' `INGRESS` maps.
//! - The VM's host receives the publications of its cloud's VMs there with its sync
//!   (`SyncDelta.published`); deleting the VM or the cloud unpublishes (their holders go in
//!   the same transaction).

use super::*;

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

impl Core {
    pub(super) async fn publications(&self, c: CloudId) -> Result<Vec<Publication>, CoreError> {
        self.cloud(c).await?;
        self.list(&keys::publications(c)).await
    }

    pub(super) async fn publish(&self, c: CloudId, req: Publish) -> Result<Reply, CoreError> {
        req.validate()?;
        if self.cfg.ingress_pool.is_empty() {
            return Err(CoreError::Conflict {
                code: "no_ingress_pool",
                message: "this control plane has no addresses to publish ports at \
                          (clouds.ingress_pool)"
                    .into(),
            });
        }
        let name = req.name();
        let proto = protocol_name(req.protocol);
        self.cloud(c).await?;
        let count = self.store.count(&keys::publications(c)).await?;
        check_quota(
            "publications",
            count + 1,
            self.cfg.max_publications_per_cloud as u64,
        )?;
        optimistic!(format!("publication {name}"), async {
            self.cloud(c).await?;
            let (_, vm) = self.vm(c, &req.vm).await?;
            if self
                .store
                .get(&keys::publication(c, &name))
                .await?
                .is_some()
            {
                return Err(CoreError::Conflict {
                    code: "already_published",
                    message: format!("{name} is published already"),
                });
            }
            let held: std::collections::HashSet<String> = self
                .store
                .range(keys::published_ports(), None, 0)
                .await?
                .into_iter()
                .map(|kv| kv.key)
                .collect();
            let Some(address) = self.cfg.ingress_pool.iter().find_map(|net| {
                let (first, last) = (net.network(), net.network() + (net.size() - 1) as u32);
                let (first, last) = if net.len < 31 {
                    (first + 1, last - 1)
                } else {
                    (first, last)
                };
                (first..=last)
                    .map(Ipv4Addr::from)
                    .find(|ip| !held.contains(&keys::published_port(*ip, proto, req.port)))
            }) else {
                return Err(CoreError::Conflict {
                    code: "ingress_pool_exhausted",
                    message: format!(
                        "{proto} port {} is published at every address of clouds.ingress_pool",
                        req.port
                    ),
                });
            };
            let publication = Publication {
                cloud: c,
                name: name.clone(),
                vm: req.vm.clone(),
                protocol: req.protocol,
                port: req.port,
                allow_from: req.allow_from.clone(),
                address,
                ipv4: vm.ipv4,
            };
            let holder = keys::published_port(address, proto, req.port);
            let txn = Txn {
                compares: vec![
                    Compare::Present(keys::cloud(c)),
                    Compare::Present(keys::vm(c, &req.vm)),
                    Compare::Absent(keys::publication(c, &name)),
                    Compare::Absent(holder.clone()),
                ],
                success: vec![
                    put(holder, &c),
                    put(keys::publication(c, &name), &publication),
                ],
            };
            if self.commit(txn).await?.is_some() {
                return done(Reply::Publication(publication));
            }
            retry()
        })
    }

    pub(super) async fn unpublish(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        optimistic!(format!("publication {name}"), async {
            self.cloud(c).await?;
            let Some(kv) = self.store.get(&keys::publication(c, name)).await? else {
                return Err(CoreError::NotFound(format!("publication {name}")));
            };
            let p: Publication = decode(&kv.key, &kv.value)?;
            let txn = Txn {
                compares: vec![Compare::ModRevision(
                    keys::publication(c, name),
                    kv.mod_revision,
                )],
                success: publication_deletes(&p),
            };
            if self.commit(txn).await?.is_some() {
                return done(Reply::Done);
            }
            retry()
        })
    }

    /// The publications of cloud `c` whose VM runs on `host`.
    pub(super) async fn publications_on(
        &self,
        c: CloudId,
        host: &str,
    ) -> Result<Vec<Publication>, CoreError> {
        let all: Vec<Publication> = self.list(&keys::publications(c)).await?;
        if all.is_empty() {
            return Ok(all);
        }
        let here: std::collections::HashSet<String> = self
            .list::<Vm>(&keys::vms(c))
            .await?
            .into_iter()
            .filter(|v| v.host == host)
            .map(|v| v.name)
            .collect();
        Ok(all.into_iter().filter(|p| here.contains(&p.vm)).collect())
    }
}

/// The operations that delete a publication and free its address and port.
pub(super) fn publication_deletes(p: &Publication) -> Vec<Op> {
    vec![
        Op::Delete {
            key: keys::publication(p.cloud, &p.name),
        },
        Op::Delete {
            key: keys::published_port(p.address, protocol_name(p.protocol), p.port),
        },
    ]
}
