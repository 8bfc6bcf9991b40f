//! DNS record sets and the zones derived from them: a zone is never stored, it is computed
//! from the cloud's VMs, record sets and imports when served. A VM's name and a record set's
//! name exclude each other, guarded by compares in the writing transaction.

use super::*;

impl Core {
    pub(super) async fn put_record_set(
        &self,
        c: CloudId,
        name: String,
        rtype: RecordType,
        req: PutRecordSet,
    ) -> Result<Reply, CoreError> {
        validate_record_set(&name, rtype, &req)?;
        let (_, cloud) = self.cloud(c).await?;
        // Hosts' DNS servers refuse a record with a name over DNS's 253 characters: the name
        // must fit with the zone's apex.
        if name != "@" {
            validate_domain_name("name", &format!("{name}.{}", cloud.zone))?;
        }
        if !name.contains('.') && self.store.get(&keys::vm(c, &name)).await?.is_some() {
            return Err(conflict(
                "reserved",
                format!("{name} is VM {name}'s automatic name"),
            ));
        }
        // CNAME excludes every other type at the same name.
        let at_name = self
            .store
            .range(&format!("{}{name}/", keys::records(c)), None, 0)
            .await?;
        let others: Vec<&str> = at_name
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next())
            .filter(|t| *t != rtype.as_str())
            .collect();
        if (rtype == RecordType::Cname && !others.is_empty())
            || (rtype != RecordType::Cname && others.contains(&"CNAME"))
        {
            return Err(conflict(
                "cname_conflict",
                format!("{name} cannot hold a CNAME and other records"),
            ));
        }
        let rs = RecordSet {
            name: name.clone(),
            rtype,
            ttl: req.ttl,
            values: req.values,
            automatic: false,
        };
        let mut compares = vec![Compare::Present(keys::cloud(c))];
        if !name.contains('.') {
            // A VM created meanwhile under this name (see above).
            compares.push(Compare::Absent(keys::vm(c, &name)));
        }
        let txn = Txn {
            compares,
            success: vec![put(keys::record(c, &name, rtype.as_str()), &rs)],
        };
        match self.store.txn(txn).await? {
            TxnOutcome::Committed { .. } => Ok(Reply::RecordSet(rs)),
            TxnOutcome::Failed { failed_compare: 0 } => {
                Err(CoreError::NotFound(format!("cloud {c}")))
            }
            TxnOutcome::Failed { .. } => Err(conflict(
                "reserved",
                format!("{name} is VM {name}'s automatic name"),
            )),
        }
    }

    pub(super) async fn list_record_sets(&self, c: CloudId) -> Result<Reply, CoreError> {
        let (_, cloud) = self.cloud(c).await?;
        let mut out: Vec<RecordSet> = self.list(&keys::records(c)).await?;
        for vm in self.list::<Vm>(&keys::vms(c)).await? {
            out.push(RecordSet {
                name: vm.name,
                rtype: RecordType::A,
                ttl: 30,
                values: vec![vm.ipv4.to_string()],
                automatic: true,
            });
        }
        for g in self.list::<Grant>(&keys::imports(c)).await? {
            if g.state == GrantState::Active {
                out.push(RecordSet {
                    name: g
                        .fqdn
                        .strip_suffix(&format!(".{}", cloud.zone))
                        .unwrap_or(&g.fqdn)
                        .to_string(),
                    rtype: RecordType::A,
                    ttl: 30,
                    values: vec![g.vip.to_string()],
                    automatic: true,
                });
            }
        }
        Ok(Reply::RecordSets(out))
    }

    pub(super) async fn delete_record_set(
        &self,
        c: CloudId,
        name: &str,
        rtype: RecordType,
    ) -> Result<Reply, CoreError> {
        let key = keys::record(c, name, rtype.as_str());
        let txn = Txn {
            compares: vec![Compare::Present(key.clone())],
            success: vec![Op::Delete { key }],
        };
        match self.commit(txn).await? {
            Some(_) => Ok(Reply::Done),
            None => Err(CoreError::NotFound(format!(
                "record set {name} {} in cloud {c}",
                rtype.as_str()
            ))),
        }
    }

    /// The zone of a cloud as hosts serve it: VMs' names, record sets, active imports.
    pub async fn zone(&self, c: CloudId) -> Result<Option<Zone>, CoreError> {
        let Ok((_, cloud)) = self.cloud(c).await else {
            return Ok(None);
        };
        let mut records = Vec::new();
        let Reply::RecordSets(sets) = self.list_record_sets(c).await? else {
            unreachable!("list_record_sets returns RecordSets")
        };
        for rs in sets {
            let fqdn = if rs.name == "@" {
                cloud.zone.clone()
            } else if rs.automatic && rs.name.ends_with('.') {
                rs.name.clone()
            } else {
                format!("{}.{}", rs.name, cloud.zone)
            };
            records.push(ZoneRecord {
                fqdn,
                rtype: rs.rtype,
                ttl: rs.ttl,
                values: rs.values,
            });
        }
        Ok(Some(Zone {
            cloud: c,
            apex: cloud.zone,
            records,
        }))
    }
}
