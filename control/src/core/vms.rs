//! VMs: address allocation (the lowest free address, one `Absent`-guarded key each),
//! create (record, address, placement, volume attachments and quota usage in one
//! transaction), power (desired state) and status (reported state), console tails, delete.

use super::*;

/// What a VM's host applies for it.
pub(super) fn placement(vm: &Vm, cloud: &Cloud) -> Placement {
    Placement {
        cloud: vm.cloud,
        vm: vm.name.clone(),
        ipv4: vm.ipv4,
        gateway: cloud.gateway,
        mac: guest_mac(vm.ipv4),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        volumes: vm.volumes.clone(),
        fqdn: vm.fqdn.clone(),
        zone: cloud.zone.clone(),
        power: vm.power,
        kernel: vm.kernel.clone(),
        image: vm.image.clone(),
        user_data: vm.user_data.clone(),
        idle_timeout_secs: vm.idle_timeout_secs,
    }
}

/// The last [`CONSOLE_TAIL_BYTES`] bytes of `text` at most, starting on a character boundary.
pub(super) fn console_tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(CONSOLE_TAIL_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

pub(super) fn pending(at: u64) -> VmStatus {
    VmStatus {
        state: VmState::Pending,
        device: None,
        message: None,
        updated_at: at,
        restarts: 0,
        boot_ms: None,
        accel: None,
    }
}

impl Core {
    pub(super) async fn allocate_ip(&self, cloud: &Cloud) -> Result<Ipv4Addr, CoreError> {
        let used: HashSet<Ipv4Addr> = self
            .store
            .range(&keys::ips(cloud.id), None, 0)
            .await?
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.parse().ok())
            .collect();
        let net = cloud.cidr.network();
        let last = net + (cloud.cidr.size() as u32 - 1);
        (net + 1..last)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| CoreError::QuotaExceeded {
                field: "addresses",
                wanted: cloud.cidr.size(),
                limit: cloud.cidr.size() - 2,
            })
    }

    /// The hosts of cloud `c`'s VMs in anti-affinity group `group`.
    async fn group_hosts(&self, c: CloudId, group: &str) -> Result<BTreeSet<String>, CoreError> {
        Ok(self
            .list::<Vm>(&keys::vms(c))
            .await?
            .into_iter()
            .filter(|vm| vm.anti_affinity.as_deref() == Some(group))
            .map(|vm| vm.host)
            .collect())
    }

    pub(super) async fn create_vm(&self, c: CloudId, req: CreateVm) -> Result<Reply, CoreError> {
        validate_label("name", &req.name)?;
        if !(1..=64).contains(&req.vcpus) {
            return Err(FieldError::new("vcpus", "must be 1 to 64").into());
        }
        if !(16..=1 << 20).contains(&req.memory_mib) {
            return Err(FieldError::new("memory_mib", "must be 16 to 1048576").into());
        }
        if req.start && self.over_budget(c).await? {
            return Err(Self::refuse_over_budget());
        }
        for (field, v) in [("kernel", &req.kernel), ("image", &req.image)] {
            if let Some(v) = v {
                validate_label(field, v)?;
            }
        }
        if let Some(u) = &req.user_data {
            if u.len() > MAX_USER_DATA_BYTES {
                return Err(FieldError::new(
                    "user_data",
                    format!(
                        "{} bytes, at most {MAX_USER_DATA_BYTES} are accepted",
                        u.len()
                    ),
                )
                .into());
            }
        }
        if req.volumes.len() > MAX_VOLUMES_PER_VM {
            return Err(FieldError::new(
                "volumes",
                format!("a VM holds at most {MAX_VOLUMES_PER_VM} volumes"),
            )
            .into());
        }
        if let Some(g) = &req.anti_affinity {
            validate_label("anti_affinity", g)?;
        }
        if let Some(t) = req.idle_timeout_secs {
            if !(1..=MAX_IDLE_TIMEOUT_SECS).contains(&t) {
                return Err(FieldError::new(
                    "idle_timeout_secs",
                    format!("must be 1 to {MAX_IDLE_TIMEOUT_SECS} (30 days)"),
                )
                .into());
            }
        }
        let mut seen = HashSet::new();
        for (i, v) in req.volumes.iter().enumerate() {
            validate_label(&format!("volumes[{i}]"), v)?;
            if !seen.insert(v) {
                return Err(FieldError::new(format!("volumes[{i}]"), "listed twice").into());
            }
        }
        optimistic!(format!("cloud {c}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            if self.store.get(&keys::vm(c, &req.name)).await?.is_some() {
                return Err(conflict(
                    "exists",
                    format!("VM {} exists in cloud {c}", req.name),
                ));
            }
            // A CNAME excludes every other record at its name, so the zone could not hold the
            // VM's automatic A record beside it (hosts would refuse the whole zone).
            let cname = keys::record(c, &req.name, RecordType::Cname.as_str());
            if self.store.get(&cname).await?.is_some() {
                return Err(conflict(
                    "cname_conflict",
                    format!(
                        "{} holds a CNAME record set, which excludes the VM's automatic A record",
                        req.name
                    ),
                ));
            }
            let u = cloud.usage;
            check_quota("vms", u.vms as u64 + 1, cloud.quotas.vms as u64)?;
            check_quota(
                "vcpus",
                (u.vcpus + req.vcpus) as u64,
                cloud.quotas.vcpus as u64,
            )?;
            check_quota(
                "memory_mib",
                u.memory_mib + req.memory_mib,
                cloud.quotas.memory_mib,
            )?;
            let mut compares = vec![
                Compare::ModRevision(keys::cloud(c), rev),
                Compare::Absent(keys::vm(c, &req.name)),
                Compare::Absent(cname),
            ];
            let mut ops = Vec::new();
            let mut host = None;
            for (i, name) in req.volumes.iter().enumerate() {
                let (vrev, mut vol) = self.volume(c, name).await?;
                if let Some(vm) = &vol.attached_to {
                    return Err(conflict(
                        "attached",
                        format!("volumes[{i}]: {name} is attached to VM {vm}"),
                    ));
                }
                if host.get_or_insert_with(|| vol.host.clone()) != &vol.host {
                    return Err(conflict(
                        "hosts_differ",
                        "the volumes are on different hosts",
                    ));
                }
                vol.attached_to = Some(req.name.clone());
                compares.push(Compare::ModRevision(keys::volume(c, name), vrev));
                ops.push(put(keys::volume(c, name), &vol));
            }
            // Hosts holding a VM of the anti-affinity group (read under the cloud record's
            // revision, which every create of the cloud changes).
            // The pick counts in its host's load until this attempt ends (committed: the
            // placement counts itself).
            let mut _reserved = None;
            let avoid = match &req.anti_affinity {
                Some(g) => self.group_hosts(c, g).await?,
                None => BTreeSet::new(),
            };
            let host = match host {
                Some(h) if avoid.contains(&h) => {
                    return Err(conflict(
                        "anti_affinity",
                        format!(
                        "the volumes are on host {h}, which holds a VM of anti-affinity group {}",
                        req.anti_affinity.as_deref().unwrap_or_default()
                    ),
                    ))
                }
                Some(h) => h,
                None => {
                    let (h, r) = self.pick_host(c, cloud.vni, &avoid)?;
                    _reserved = Some(r);
                    h
                }
            };
            let ip = self.allocate_ip(&cloud).await?;
            compares.push(Compare::Absent(keys::ip(c, ip)));
            cloud.usage.vms += 1;
            cloud.usage.vcpus += req.vcpus;
            cloud.usage.memory_mib += req.memory_mib;
            let vm = Vm {
                cloud: c,
                name: req.name.clone(),
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                kernel: req.kernel.clone(),
                image: req.image.clone(),
                volumes: req.volumes.clone(),
                ipv4: ip,
                fqdn: format!("{}.{}", req.name, cloud.zone),
                host: host.clone(),
                created_at: now(),
                power: if req.start {
                    Power::Running
                } else {
                    Power::Stopped
                },
                stopped_by: (!req.start).then_some(StopReason::Request),
                idle_timeout_secs: req.idle_timeout_secs,
                user_data: req.user_data.clone(),
                status: None,
                host_live: false,
                anti_affinity: req.anti_affinity.clone(),
            };
            let placement = placement(&vm, &cloud);
            ops.push(put(keys::cloud(c), &cloud));
            ops.push(put(keys::vm(c, &vm.name), &vm));
            ops.push(put(keys::ip(c, ip), &format!("vm:{}", vm.name)));
            ops.push(put(keys::placement(&host, c, &vm.name), &placement));
            if self
                .commit(Txn {
                    compares,
                    success: ops,
                })
                .await?
                .is_some()
            {
                self.placed(&keys::placement(&host, c, &vm.name));
                let mut vm = vm;
                vm.status = Some(pending(vm.created_at));
                vm.host_live = self.host_live(&vm.host);
                return done(Reply::Vm(Box::new(vm)));
            }
            retry()
        })
    }

    pub(super) async fn vm(&self, c: CloudId, name: &str) -> Result<(u64, Vm), CoreError> {
        self.read(&keys::vm(c, name), || format!("VM {name} in cloud {c}"))
            .await
    }

    pub(super) async fn vm_with_status(&self, c: CloudId, name: &str) -> Result<Vm, CoreError> {
        let (_, vm) = self.vm(c, name).await?;
        self.with_status(vm).await
    }

    /// `vm` with its last reported status (pending if none).
    pub(super) async fn with_status(&self, mut vm: Vm) -> Result<Vm, CoreError> {
        vm.status = match self.store.get(&keys::vm_status(vm.cloud, &vm.name)).await? {
            Some(kv) => Some(decode(&kv.key, &kv.value)?),
            None => Some(pending(vm.created_at)),
        };
        vm.host_live = self.host_live(&vm.host);
        Ok(vm)
    }

    /// Start or stop: the VM's power and its placement, guarded by the VM's revision.
    pub(super) async fn set_power(
        &self,
        c: CloudId,
        name: &str,
        power: Power,
    ) -> Result<Reply, CoreError> {
        optimistic!(format!("VM {name}"), async {
            let (vrev, mut vm) = self.vm(c, name).await?;
            if vm.power == power {
                return done(Reply::Vm(Box::new(self.with_status(vm).await?)));
            }
            if power == Power::Running && self.over_budget(c).await? {
                return Err(Self::refuse_over_budget());
            }
            vm.power = power;
            vm.stopped_by = (power == Power::Stopped).then_some(StopReason::Request);
            if self.write_power(&vm, vrev).await? {
                return done(Reply::Vm(Box::new(self.with_status(vm).await?)));
            }
            retry()
        })
    }

    /// Writes `vm` (its power changed) and its placement, if the VM's record is still at
    /// revision `vrev`; false if it is not (the caller reads again).
    pub(super) async fn write_power(&self, vm: &Vm, vrev: u64) -> Result<bool, CoreError> {
        let (c, name) = (vm.cloud, vm.name.as_str());
        let (_, cloud) = self.cloud(c).await?;
        let placement = placement(vm, &cloud);
        let txn = Txn {
            compares: vec![Compare::ModRevision(keys::vm(c, name), vrev)],
            success: vec![
                put(keys::vm(c, name), vm),
                put(keys::placement(&vm.host, c, name), &placement),
            ],
        };
        Ok(self.commit(txn).await?.is_some())
    }

    /// Stops a VM its host (`host`) found idle: only a VM placed there, with an idle
    /// timeout, running; guarded by the VM's revision (a start or stop racing it wins).
    pub(super) async fn stop_idle(&self, host: &str, r: &VmRef) -> Result<(), CoreError> {
        let (c, name) = (r.cloud, r.vm.as_str());
        optimistic!(format!("VM {name}"), async {
            let (vrev, mut vm) = self.vm(c, name).await?;
            if vm.host != host || vm.power != Power::Running || vm.idle_timeout_secs.is_none() {
                return done(());
            }
            vm.power = Power::Stopped;
            vm.stopped_by = Some(StopReason::Idle);
            if self.write_power(&vm, vrev).await? {
                tracing::info!(
                    "VM {name} of cloud {c} idle for {} s on {host}: stopped",
                    vm.idle_timeout_secs.unwrap_or_default()
                );
                return done(());
            }
            retry()
        })
    }

    pub(super) async fn console(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        self.vm(c, name).await?;
        Ok(Reply::Console(
            match self.store.get(&keys::vm_console(c, name)).await? {
                Some(kv) => decode(&kv.key, &kv.value)?,
                None => Console {
                    text: String::new(),
                    updated_at: 0,
                },
            },
        ))
    }

    pub(super) async fn list_vms(&self, c: CloudId) -> Result<Reply, CoreError> {
        self.cloud(c).await?;
        let mut vms: Vec<Vm> = self.list(&keys::vms(c)).await?;
        let statuses = self.store.range(&keys::vm_statuses(c), None, 0).await?;
        let mut by_name = HashMap::new();
        for kv in statuses {
            let name = kv.key.rsplit('/').next().unwrap_or_default().to_string();
            by_name.insert(name, decode::<VmStatus>(&kv.key, &kv.value)?);
        }
        for vm in &mut vms {
            vm.status = Some(
                by_name
                    .remove(&vm.name)
                    .unwrap_or_else(|| pending(vm.created_at)),
            );
            vm.host_live = self.host_live(&vm.host);
        }
        Ok(Reply::Vms(vms))
    }

    pub(super) async fn delete_vm(&self, c: CloudId, name: &str) -> Result<Reply, CoreError> {
        optimistic!(format!("VM {name}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            let (vrev, vm) = self.vm(c, name).await?;
            let mut compares = vec![
                Compare::ModRevision(keys::cloud(c), rev),
                Compare::ModRevision(keys::vm(c, name), vrev),
            ];
            cloud.usage.vms = cloud.usage.vms.saturating_sub(1);
            cloud.usage.vcpus = cloud.usage.vcpus.saturating_sub(vm.vcpus);
            cloud.usage.memory_mib = cloud.usage.memory_mib.saturating_sub(vm.memory_mib);
            let mut ops = vec![
                put(keys::cloud(c), &cloud),
                Op::Delete {
                    key: keys::vm(c, name),
                },
                Op::Delete {
                    key: keys::vm_status(c, name),
                },
                Op::Delete {
                    key: keys::vm_console(c, name),
                },
                Op::Delete {
                    key: keys::ip(c, vm.ipv4),
                },
                Op::Delete {
                    key: keys::placement(&vm.host, c, name),
                },
            ];
            // Its publications go with it.
            let published: Vec<(String, u64, Publication)> =
                self.list_kv(&keys::publications(c)).await?;
            for (key, prev, p) in published.iter().filter(|(_, _, p)| p.vm == name) {
                compares.push(Compare::ModRevision(key.clone(), *prev));
                ops.extend(super::publications::publication_deletes(p));
            }
            for v in &vm.volumes {
                if let Ok((volrev, mut vol)) = self.volume(c, v).await {
                    vol.attached_to = None;
                    compares.push(Compare::ModRevision(keys::volume(c, v), volrev));
                    ops.push(put(keys::volume(c, v), &vol));
                }
            }
            if self
                .commit(Txn {
                    compares,
                    success: ops,
                })
                .await?
                .is_some()
            {
                return done(Reply::Done);
            }
            retry()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_keeps_the_last_bytes_on_a_char_boundary() {
        assert_eq!(console_tail("short"), "short");
        let exact = "x".repeat(CONSOLE_TAIL_BYTES);
        assert_eq!(console_tail(&exact), exact);
        // "é" is two bytes: the cut at len - CONSOLE_TAIL_BYTES falls inside one of them.
        let long = format!("{}{}", "é".repeat(CONSOLE_TAIL_BYTES / 2), "x");
        let tail = console_tail(&long);
        assert_eq!(tail.len(), CONSOLE_TAIL_BYTES - 1);
        assert!(tail.starts_with('é') && tail.ends_with('x'));
        assert!(long.ends_with(tail));
    }
}
