//! Usage records delivered by hosts; a cloud's (and the fleet's) metered quantities and cost.
//!
//! Decisions:
//! - **Kept once per id.** A record is stored at
//!   `usage/<cloud>/<window end, ms, 20 digits>/<id>`: a record's id always names the same
//!   content (the agent's journal guarantees it), so a redelivery (at least once) finds its key
//!   and is counted a duplicate. The records are the audit trail; queries never read them.
//! - **Rolled up per cloud, hour and host, in the same transaction.** Each record is added to
//!   its cloud's hour (the hour its window ended) from its host at
//!   `usagehour/<cloud>/<hour>/<host>` and, for the operator's view, at
//!   `usagefleet/<hour>/<cloud>/<host>`: one transaction per (cloud, hour) group of a batch
//!   writes the new records (each compared absent) and the rollup (compared at the revision it
//!   was read), so a record is in its rollup exactly once, whatever is retried, redelivered or
//!   killed. Per host, because a host delivers its batches one after the other: hosts never
//!   contend on a rollup, however many of them a cloud spans. A cloud's month is 744 rollups
//!   per host it ran on; the fleet's hour one range. Hours are also what FOCUS wants (charge
//!   periods aligned to the hour); a query adds an hour's hosts up before pricing it.
//! - **Priced when read**, with the price list of the control plane's config
//!   (`[prices]`): each hour's quantity times the price, rounded down to 10^-9 of the currency,
//!   summed. A price change therefore re-prices every period read afterwards; atoll keeps no
//!   invoices (a billing system that needs frozen prices exports FOCUS when it closes a period).
//! - **Complete up to**: each host tells, after delivering its journal to the end, the time of
//!   its last collection before (`complete_to_ms` of an ingest, sent each interval even with no
//!   records; kept at `usagecomplete/<host>`). A cloud's usage is complete up to the least of
//!   its hosts' (those it is placed on and those that ever delivered some of it, remembered at
//!   `usagefrom/<cloud>/<host>`); the fleet's up to the least of every host that runs a cloud.
//!   A host that is down holds its clouds' completeness back, as it should.
//! - **A host speaks for the clouds it runs**: a record is refused unless its cloud is placed on
//!   the delivering host, or was within [`USAGE_GRACE_SECS`] (the final records of a deleted
//!   VM or volume arrive after the delete: the control plane notes, at most hourly, that the
//!   host runs the cloud, at `usagefrom/<cloud>/<host>`), or the cloud was deleted while it
//!   ran there, for as long (each delete attempt first writes `usagegrace/<cloud>/<host>` for
//!   each of its VM hosts, which may not have delivered yet). A host cannot
//!   write usage for a cloud it never ran; it is trusted with its own VMs' traffic and time.
//! - **Usage outlives its cloud** (billing needs it): deleting a cloud leaves its records and
//!   rollups.
//! - **Raw records are kept for `usage.record_retention_days`** (35 by default), then deleted
//!   by every control plane's reaper one hour of the fleet at a time (the clouds of an hour are
//!   those of `usagefleet/<hour>/`; the hour purged up to is `usagepurged`); rollups stay. A
//!   record older than that is refused at ingest, as it could no longer be found a duplicate.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::usage::{merge_items, Quantities};
use atoll_api::model::{nanos_decimal, CloudCost, FleetUsage, UsageItem};
use atoll_api::usage::UsageEvent;

/// How long after a cloud's delete its hosts may deliver its usage.
pub const USAGE_GRACE_SECS: u64 = 86_400;

/// The longest period one fleet query reads (the operator pages through longer ones).
pub const MAX_FLEET_PERIOD_SECS: u64 = 31 * 86_400;

const HOUR: u64 = 3600;

fn usage_key(r: &UsageEvent, cloud: CloudId) -> String {
    format!("usage/{cloud}/{:020}/{}", r.data.end_unix_ms, r.id)
}

fn hour_key(cloud: CloudId, hour: u64, host: &str) -> String {
    format!("usagehour/{cloud}/{hour:012}/{host}")
}

fn fleet_key(hour: u64, cloud: CloudId, host: &str) -> String {
    format!("usagefleet/{hour:012}/{cloud}/{host}")
}

/// Adds `q` to `hour`'s entry (rollups of one hour from several hosts are priced as one).
fn merge_hour(hours: &mut BTreeMap<u64, Quantities>, hour: u64, q: &Quantities) {
    hours.entry(hour).or_default().add(q);
}

fn usage_from_key(cloud: CloudId, host: &str) -> String {
    format!("usagefrom/{cloud}/{host}")
}

fn complete_key(host: &str) -> String {
    format!("usagecomplete/{host}")
}

/// An operator's period, widened to whole hours and at most [`MAX_FLEET_PERIOD_SECS`].
fn fleet_period(from: u64, to: u64) -> Result<(u64, u64), CoreError> {
    let (from, to) = hours(from, to);
    if to.saturating_sub(from) > MAX_FLEET_PERIOD_SECS {
        return Err(CoreError::Invalid(FieldError::new(
            "to",
            format!(
                "at most {MAX_FLEET_PERIOD_SECS} seconds after from; page through longer periods"
            ),
        )));
    }
    Ok((from, to))
}

/// `[from, to)` widened to whole hours.
pub fn hours(from: u64, to: u64) -> (u64, u64) {
    (from / HOUR * HOUR, to.div_ceil(HOUR).saturating_mul(HOUR))
}

impl Core {
    pub(super) async fn ingest_usage(
        &self,
        host: &str,
        batch: UsageBatch,
    ) -> Result<Reply, CoreError> {
        validate_label("host", host)?;
        batch.validate()?;
        let mut out = UsageIngested {
            accepted: 0,
            duplicates: 0,
            refused: 0,
        };
        // Per cloud: whether the host may deliver it, and whether it runs it now.
        let mut allowed: HashMap<CloudId, (bool, bool)> = HashMap::new();
        let mut groups: BTreeMap<(CloudId, u64), Vec<&UsageEvent>> = BTreeMap::new();
        let mut latest = 0;
        for r in &batch.records {
            latest = latest.max(r.data.end_unix_ms);
            let Some(cloud) = CloudId::new(r.data.cloud) else {
                out.refused += 1;
                continue;
            };
            let ok = match allowed.get(&cloud) {
                Some((ok, _)) => *ok,
                None => {
                    let runs = {
                        let st = self.feed.state.lock().expect("feed lock");
                        st.placements
                            .get(host)
                            .is_some_and(|m| m.contains_key(&cloud))
                    };
                    let ok = runs
                        || self.ran_recently(host, cloud).await?
                        || self.may_deliver_after_delete(host, cloud).await?;
                    allowed.insert(cloud, (ok, runs));
                    ok
                }
            };
            if !ok {
                out.refused += 1;
                continue;
            }
            if r.data.end_unix_ms / 1000 + self.cfg.usage_retention_secs < now() {
                out.refused += 1;
                tracing::warn!(
                    host,
                    "usage record {} of {cloud} refused: its window ended more than \
                     usage.record_retention_days ago",
                    r.id
                );
                continue;
            }
            let hour = r.data.end_unix_ms / 1000 / HOUR * HOUR;
            groups.entry((cloud, hour)).or_default().push(r);
        }
        // Records, the rollup and the fleet's copy of it: at most the store's limit per
        // transaction.
        let limit = self
            .store
            .max_txn_ops()
            .unwrap_or(128)
            .max(MIN_STORE_TXN_OPS)
            - 2;
        let mut spent = std::collections::BTreeSet::new();
        for ((cloud, hour), records) in groups {
            for chunk in records.chunks(limit) {
                let (accepted, duplicates) = self.ingest_group(cloud, hour, host, chunk).await?;
                out.accepted += accepted;
                out.duplicates += duplicates;
                if accepted > 0 {
                    spent.insert(cloud);
                }
            }
        }
        crate::metrics::usage_ingested(
            u64::from(out.accepted),
            u64::from(out.duplicates),
            u64::from(out.refused),
        );
        for cloud in spent {
            self.evaluate_budget(cloud).await?;
        }
        for (cloud, _) in allowed.into_iter().filter(|(_, (_, runs))| *runs) {
            self.note_usage_host(cloud, host).await?;
        }
        // What the host says it has delivered, or else its last window's end (a host delivers
        // its journal in order); never past now.
        let complete = batch.complete_to_ms.unwrap_or(latest).min(now_ms());
        if complete > 0 {
            self.advance_complete(host, complete).await?;
        }
        Ok(Reply::UsageIngested(out))
    }

    /// Stores the new records of one cloud and hour and adds them to the hour's rollup, in
    /// one transaction; returns `(accepted, duplicates)`.
    async fn ingest_group(
        &self,
        cloud: CloudId,
        hour: u64,
        host: &str,
        records: &[&UsageEvent],
    ) -> Result<(u32, u32), CoreError> {
        let mut pending: Vec<&UsageEvent> = records.to_vec();
        let mut duplicates = 0;
        let hkey = hour_key(cloud, hour, host);
        for _ in 0..64 {
            if pending.is_empty() {
                return Ok((0, duplicates));
            }
            let (compare, mut q) = match self.store.get(&hkey).await? {
                Some(kv) => (
                    Compare::ModRevision(hkey.clone(), kv.mod_revision),
                    decode::<Quantities>(&hkey, &kv.value)?,
                ),
                None => (Compare::Absent(hkey.clone()), Quantities::default()),
            };
            let mut txn = Txn {
                compares: vec![compare],
                success: Vec::new(),
            };
            for r in &pending {
                let key = usage_key(r, cloud);
                q.add_record(&r.data);
                txn.compares.push(Compare::Absent(key.clone()));
                txn.success.push(put(key, *r));
            }
            txn.success.push(put(hkey.clone(), &q));
            txn.success.push(put(fleet_key(hour, cloud, host), &q));
            if self.commit(txn).await?.is_some() {
                return Ok((pending.len() as u32, duplicates));
            }
            // A record was here already (a redelivery), or the rollup moved (another
            // delivery of the same cloud and hour): drop the first, retry for the second.
            let mut fresh = Vec::with_capacity(pending.len());
            for r in pending {
                if self.store.get(&usage_key(r, cloud)).await?.is_some() {
                    duplicates += 1;
                } else {
                    fresh.push(r);
                }
            }
            pending = fresh;
        }
        Err(CoreError::Contention(format!("the usage of {cloud}")))
    }

    /// Remembers that `host` runs `cloud` (its usage of the cloud is complete only once this
    /// host's is, and it may deliver the cloud's last records after the cloud left it): the
    /// time, rewritten once an hour at most.
    async fn note_usage_host(&self, cloud: CloudId, host: &str) -> Result<(), CoreError> {
        let key = usage_from_key(cloud, host);
        let compare = match self.store.get(&key).await? {
            None => Compare::Absent(key.clone()),
            Some(kv) if decode::<u64>(&key, &kv.value)? + 3600 < now() => {
                Compare::ModRevision(key.clone(), kv.mod_revision)
            }
            Some(_) => return Ok(()),
        };
        self.commit(Txn {
            compares: vec![compare],
            success: vec![put(key, &now())],
        })
        .await?;
        Ok(())
    }

    /// Whether `host` ran `cloud` within [`USAGE_GRACE_SECS`] (its VMs or volumes left it
    /// since; their last records come after).
    async fn ran_recently(&self, host: &str, cloud: CloudId) -> Result<bool, CoreError> {
        let key = usage_from_key(cloud, host);
        Ok(match self.store.get(&key).await? {
            Some(kv) => decode::<u64>(&key, &kv.value)? + USAGE_GRACE_SECS + 3600 >= now(),
            None => false,
        })
    }

    /// Deletes the raw records of the oldest hour past the retention (one hour per call: the
    /// reaper calls it every second); returns how many it deleted.
    pub(super) async fn purge_usage(&self, now: u64) -> Result<usize, CoreError> {
        const CURSOR: &str = "usagepurged";
        let (compare, hour) = match self.store.get(CURSOR).await? {
            Some(kv) => (
                Compare::ModRevision(CURSOR.into(), kv.mod_revision),
                decode::<u64>(CURSOR, &kv.value)?,
            ),
            None => {
                // From the oldest hour of any usage.
                let first = self.store.range("usagefleet/", None, 1).await?;
                let Some(kv) = first.first() else {
                    return Ok(0);
                };
                let hour = kv.key["usagefleet/".len()..]
                    .split('/')
                    .next()
                    .and_then(|h| h.parse::<u64>().ok())
                    .unwrap_or(0);
                (Compare::Absent(CURSOR.into()), hour)
            }
        };
        if hour + HOUR + self.cfg.usage_retention_secs > now {
            return Ok(0);
        }
        let limit = self
            .store
            .max_txn_ops()
            .unwrap_or(128)
            .max(MIN_STORE_TXN_OPS);
        let bound_ms = (hour + HOUR) * 1000;
        let prefix = format!("usagefleet/{hour:012}/");
        let mut deleted = 0;
        let mut purged = std::collections::BTreeSet::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.range(&prefix, after.as_deref(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for kv in &page {
                let Some(Ok(cloud)) = kv.key[prefix.len()..]
                    .split('/')
                    .next()
                    .map(str::parse::<CloudId>)
                else {
                    continue;
                };
                // One purge per cloud (a key per host that ran it).
                if !purged.insert(cloud) {
                    continue;
                }
                // Its records up to the hour's end: older hours' are gone already.
                let records = format!("usage/{cloud}/");
                let end = format!("{records}{bound_ms:020}");
                loop {
                    let old: Vec<String> = self
                        .store
                        .range(&records, None, limit)
                        .await?
                        .into_iter()
                        .map(|kv| kv.key)
                        .take_while(|k| *k < end)
                        .collect();
                    if old.is_empty() {
                        break;
                    }
                    deleted += old.len();
                    let full = old.len() == limit;
                    self.commit(Txn {
                        compares: Vec::new(),
                        success: old.into_iter().map(|key| Op::Delete { key }).collect(),
                    })
                    .await?;
                    if !full {
                        break;
                    }
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        // Another control plane may have moved the cursor meanwhile (it deleted the same).
        self.commit(Txn {
            compares: vec![compare],
            success: vec![put(CURSOR.into(), &(hour + HOUR))],
        })
        .await?;
        Ok(deleted)
    }

    /// Records that `host` delivered its journal up to `end_ms`.
    async fn advance_complete(&self, host: &str, end_ms: u64) -> Result<(), CoreError> {
        let key = complete_key(host);
        for _ in 0..16 {
            let compare = match self.store.get(&key).await? {
                Some(kv) => {
                    if decode::<u64>(&key, &kv.value)? >= end_ms {
                        return Ok(());
                    }
                    Compare::ModRevision(key.clone(), kv.mod_revision)
                }
                None => Compare::Absent(key.clone()),
            };
            let txn = Txn {
                compares: vec![compare],
                success: vec![put(key.clone(), &end_ms)],
            };
            if self.commit(txn).await?.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The least of `hosts`' delivered times (seconds); `now` when there are none.
    async fn complete_to(&self, hosts: impl IntoIterator<Item = String>) -> Result<u64, CoreError> {
        let mut least: Option<u64> = None;
        for h in hosts {
            let key = complete_key(&h);
            let t = match self.store.get(&key).await? {
                Some(kv) => decode::<u64>(&key, &kv.value)? / 1000,
                None => 0,
            };
            least = Some(least.map_or(t, |l| l.min(t)));
        }
        Ok(least.unwrap_or_else(now))
    }

    /// Whether `host` may deliver usage of `cloud`, which it does not run: only if the cloud
    /// was deleted while it ran there, within the grace period.
    async fn may_deliver_after_delete(
        &self,
        host: &str,
        cloud: CloudId,
    ) -> Result<bool, CoreError> {
        if self.store.get(&keys::cloud(cloud)).await?.is_some() {
            return Ok(false);
        }
        let key = keys::usage_grace(cloud, host);
        Ok(match self.store.get(&key).await? {
            Some(kv) => decode::<u64>(&key, &kv.value)? >= now(),
            None => false,
        })
    }

    /// The hosts a cloud's usage comes from: those it is placed on, and those that delivered
    /// some of it.
    async fn usage_hosts(&self, c: CloudId) -> Result<Vec<String>, CoreError> {
        let mut hosts: Vec<String> = {
            let st = self.feed.state.lock().expect("feed lock");
            st.placements
                .iter()
                .filter(|(_, m)| m.contains_key(&c))
                .map(|(h, _)| h.clone())
                .collect()
        };
        let prefix = format!("usagefrom/{c}/");
        for kv in self.store.range(&prefix, None, 10_000).await? {
            if let Some(h) = kv.key.strip_prefix(&prefix) {
                if !hosts.iter().any(|x| x == h) {
                    hosts.push(h.to_string());
                }
            }
        }
        Ok(hosts)
    }

    /// A cloud's quantities per hour in `[from, to)` (whole hours, seconds).
    pub(super) async fn cloud_hours(
        &self,
        c: CloudId,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Quantities)>, CoreError> {
        let prefix = format!("usagehour/{c}/");
        // `range` starts after its cursor: `<prefix><from>` sorts before that hour's keys
        // (`<prefix><from>/<host>`), and `<prefix><to>` before those of the end hour.
        let end = format!("{prefix}{to:012}");
        let mut after = format!("{prefix}{from:012}");
        let mut out = BTreeMap::new();
        'pages: loop {
            let page = self.store.range(&prefix, Some(&after), 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            for kv in &page {
                if kv.key >= end {
                    break 'pages;
                }
                let hour = kv.key[prefix.len()..]
                    .split('/')
                    .next()
                    .and_then(|h| h.parse::<u64>().ok());
                if let Some(hour) = hour.filter(|h| *h >= from) {
                    merge_hour(&mut out, hour, &decode(&kv.key, &kv.value)?);
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Prices each hour and sums the items by SKU.
    pub(super) fn price(&self, hours: &[(u64, Quantities)]) -> (Quantities, Vec<UsageItem>, u64) {
        let mut total = Quantities::default();
        let mut items = Vec::new();
        for (_, q) in hours {
            total.add(q);
            merge_items(&mut items, self.cfg.prices.items(q));
        }
        let cost = items
            .iter()
            .fold(0u64, |a, i| a.saturating_add(i.cost_nanos));
        (total, items, cost)
    }

    pub(super) async fn usage(&self, c: CloudId, from: u64, to: u64) -> Result<Reply, CoreError> {
        let (from, to) = hours(from, to);
        let hours = self.cloud_hours(c, from, to).await?;
        let (total, items, cost) = self.price(&hours);
        let complete_to = self.complete_to(self.usage_hosts(c).await?).await?;
        Ok(Reply::Usage(Box::new(CloudUsage {
            cloud: c,
            from,
            to,
            complete_to,
            records: total.records,
            currency: self.cfg.prices.currency.clone(),
            items,
            cost_nanos: cost,
            cost: nanos_decimal(cost),
            traffic: total.traffic(),
            budget: self.budget(c).await?.map(|(_, b)| b),
        })))
    }

    /// Every cloud's quantities per hour in `[from, to)` (whole hours).
    pub(super) async fn fleet_hours(
        &self,
        from: u64,
        to: u64,
    ) -> Result<BTreeMap<CloudId, Vec<(u64, Quantities)>>, CoreError> {
        let prefix = "usagefleet/";
        let end = format!("usagefleet/{to:012}");
        let mut after = format!("usagefleet/{from:012}");
        let mut out: BTreeMap<CloudId, BTreeMap<u64, Quantities>> = BTreeMap::new();
        'pages: loop {
            let page = self.store.range(prefix, Some(&after), 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            for kv in &page {
                if kv.key >= end {
                    break 'pages;
                }
                let mut parts = kv.key[prefix.len()..].split('/');
                let (Some(Ok(hour)), Some(Ok(cloud))) = (
                    parts.next().map(str::parse::<u64>),
                    parts.next().map(str::parse::<CloudId>),
                ) else {
                    continue;
                };
                if hour >= from {
                    merge_hour(
                        out.entry(cloud).or_default(),
                        hour,
                        &decode(&kv.key, &kv.value)?,
                    );
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        Ok(out
            .into_iter()
            .map(|(c, hours)| (c, hours.into_iter().collect()))
            .collect())
    }

    pub(super) async fn fleet_usage(&self, from: u64, to: u64) -> Result<Reply, CoreError> {
        let (from, to) = fleet_period(from, to)?;
        let mut clouds = Vec::new();
        let mut total = 0u64;
        for (cloud, hours) in self.fleet_hours(from, to).await? {
            let (q, items, cost) = self.price(&hours);
            total = total.saturating_add(cost);
            clouds.push(CloudCost {
                cloud,
                records: q.records,
                items,
                cost_nanos: cost,
                cost: nanos_decimal(cost),
            });
        }
        let hosts: Vec<String> = {
            let st = self.feed.state.lock().expect("feed lock");
            st.placements
                .iter()
                .filter(|(_, m)| !m.is_empty())
                .map(|(h, _)| h.clone())
                .collect()
        };
        let complete_to = self.complete_to(hosts).await?;
        Ok(Reply::FleetUsage(Box::new(FleetUsage {
            from,
            to,
            complete_to,
            currency: self.cfg.prices.currency.clone(),
            clouds,
            cost_nanos: total,
            cost: nanos_decimal(total),
        })))
    }
}

impl Core {
    /// Every cloud's usage in the period as FOCUS 1.2 rows: one per cloud, hour and SKU.
    pub(super) async fn focus_export(&self, from: u64, to: u64) -> Result<Reply, CoreError> {
        use crate::focus::{Category, Charge, Export};
        let (from, to) = fleet_period(from, to)?;
        let mut charges = Vec::new();
        for (cloud, hours) in self.fleet_hours(from, to).await? {
            // The cloud's name while it exists (a deleted cloud's charges keep its id).
            let name = match self.store.get(&keys::cloud(cloud)).await? {
                Some(kv) => decode::<Cloud>(&kv.key, &kv.value)?.name,
                None => String::new(),
            };
            for (hour, q) in hours {
                for i in self.cfg.prices.items(&q) {
                    let category = match i.category.as_str() {
                        "compute" => Category::Compute,
                        "storage" => Category::Storage,
                        _ => Category::Network,
                    };
                    charges.push(Charge {
                        cloud_id: cloud.to_string(),
                        cloud_name: name.clone(),
                        hour_start_unix: hour,
                        description: describe(&i),
                        sku: i.sku,
                        category,
                        pricing_quantity: i.pricing_quantity,
                        consumed_unit: i.pricing_unit.clone(),
                        pricing_unit: i.pricing_unit,
                        consumed_quantity: i.pricing_quantity,
                        unit_price: i.unit_price,
                        cost_nanos: i.cost_nanos,
                    });
                }
            }
        }
        let export = Export {
            provider: "atoll",
            billing_account_id: &self.cfg.billing_account,
            billing_account_name: &self.cfg.billing_account,
            currency: &self.cfg.prices.currency,
            billing_period_start_unix: from,
            billing_period_end_unix: to,
            region: None,
        };
        Ok(Reply::Csv(crate::focus::csv(&export, &charges)))
    }
}

/// A charge's description: what was metered, in words.
fn describe(i: &UsageItem) -> String {
    match i.sku.as_str() {
        "compute-vcpu" => "VM vCPU time".into(),
        "compute-memory" => "VM memory time".into(),
        "storage-volume" => "Provisioned volume storage".into(),
        sku => match sku.strip_prefix("network-") {
            Some(rest) => format!("Network traffic {}", rest.replace('-', " ")),
            None => sku.to_string(),
        },
    }
}
