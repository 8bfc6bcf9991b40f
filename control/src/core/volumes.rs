//! Volumes: create (placed on a host, counted in the cloud's quota), attach to a VM (which
//! then runs on the volume's host), delete when detached.

use super::*;

impl Core {
    pub(super) async fn volume(&self, c: CloudId, name: &str) -> Result<(u64, Volume), CoreError> {
        self.read(&keys::volume(c, name), || {
            format!("volume {name} in cloud {c}")
        })
        .await
    }

    pub(super) async fn create_volume(
        &self,
        c: CloudId,
        req: CreateVolume,
    ) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        // A volume costs from its creation: none while the cloud is over its budget.
        if self.over_budget(c).await? {
            return Err(Self::refuse_over_budget());
        }
        if !(1..=65_536).contains(&req.size_gib) {
            return Err(FieldError::new("size_gib", "must be 1 to 65536").into());
        }
        optimistic!(format!("cloud {c}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            if self.store.get(&keys::volume(c, &req.name)).await?.is_some() {
                return Err(conflict(
                    "exists",
                    format!("volume {} exists in cloud {c}", req.name),
                ));
            }
            let wanted = cloud.usage.volume_gib + req.size_gib;
            check_quota("volume_gib", wanted, cloud.quotas.volume_gib)?;
            cloud.usage.volume_gib = wanted;
            let (host, _reserved) = self.pick_host(c, cloud.vni, &BTreeSet::new())?;
            let created_at_ms = now_ms();
            let vol = Volume {
                cloud: c,
                name: req.name.clone(),
                size_gib: req.size_gib,
                format: req.format,
                host: host.clone(),
                attached_to: None,
                created_at: created_at_ms / 1000,
            };
            let placement = VolumePlacement {
                cloud: c,
                name: req.name.clone(),
                size_gib: req.size_gib,
                format: req.format,
                created_at_ms,
            };
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::cloud(c), rev),
                    Compare::Absent(keys::volume(c, &req.name)),
                ],
                success: vec![
                    put(keys::cloud(c), &cloud),
                    put(keys::volume(c, &req.name), &vol),
                    put(keys::volume_placement(&host, c, &req.name), &placement),
                ],
            };
            if self.commit(txn).await?.is_some() {
                self.placed(&keys::volume_placement(&host, c, &req.name));
                return done(Reply::Volume(vol));
            }
            retry()
        })
    }

    pub(super) async fn delete_volume(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        optimistic!(format!("volume {name}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            let (vrev, vol) = self.volume(c, name).await?;
            if let Some(vm) = &vol.attached_to {
                return Err(conflict(
                    "attached",
                    format!("volume {name} is attached to VM {vm}; detach it first"),
                ));
            }
            cloud.usage.volume_gib = cloud.usage.volume_gib.saturating_sub(vol.size_gib);
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::cloud(c), rev),
                    Compare::ModRevision(keys::volume(c, name), vrev),
                ],
                success: vec![
                    put(keys::cloud(c), &cloud),
                    Op::Delete {
                        key: keys::volume(c, name),
                    },
                    Op::Delete {
                        key: keys::volume_placement(&vol.host, c, name),
                    },
                ],
            };
            if self.commit(txn).await?.is_some() {
                return done(Reply::Done);
            }
            retry()
        })
    }

    pub(super) async fn attach_volume(
        &self,
        c: CloudId,
        name: &str,
        to: Option<String>,
    ) -> Result<Reply, CoreError> {
        if let Some(vm) = &to {
            validate_label("vm", vm)?;
        }
        optimistic!(format!("volume {name}"), async {
            let (vrev, mut vol) = self.volume(c, name).await?;
            let target = match (&to, &vol.attached_to) {
                (Some(_), Some(cur)) => {
                    return Err(conflict(
                        "attached",
                        format!("volume {name} is attached to VM {cur}"),
                    ))
                }
                (None, None) => {
                    return Err(conflict(
                        "not_attached",
                        format!("volume {name} is not attached"),
                    ))
                }
                (Some(vm), None) => vm.clone(),
                (None, Some(cur)) => cur.clone(),
            };
            let (mrev, mut vm) = self.vm(c, &target).await?;
            if vm.host != vol.host {
                return Err(conflict(
                    "hosts_differ",
                    format!(
                        "volume {name} is on host {} but VM {target} is on {}",
                        vol.host, vm.host
                    ),
                ));
            }
            if to.is_some() {
                if vm.volumes.len() >= MAX_VOLUMES_PER_VM {
                    return Err(conflict(
                        "too_many_volumes",
                        format!(
                            "VM {target} holds {} volumes, the most a VM may hold",
                            vm.volumes.len()
                        ),
                    ));
                }
                vol.attached_to = Some(target.clone());
                vm.volumes.push(name.to_string());
            } else {
                vol.attached_to = None;
                vm.volumes.retain(|v| v != name);
            }
            let (_, cloud) = self.cloud(c).await?;
            let placement = placement(&vm, &cloud);
            let txn = Txn {
                compares: vec![
                    Compare::ModRevision(keys::volume(c, name), vrev),
                    Compare::ModRevision(keys::vm(c, &target), mrev),
                ],
                success: vec![
                    put(keys::volume(c, name), &vol),
                    put(keys::vm(c, &target), &vm),
                    put(keys::placement(&vm.host, c, &target), &placement),
                ],
            };
            if self.commit(txn).await?.is_some() {
                return done(Reply::Volume(vol));
            }
            retry()
        })
    }
}
