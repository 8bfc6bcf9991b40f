//! Usage records delivered by hosts, and a cloud's metered quantities (issue 20's first part).
//!
//! Decisions:
//! - **Kept once per id, in time order.** A record is stored at
//!   `usage/<cloud>/<window end, ms, 20 digits>/<id>`: a record's id always names the same
//!   content (the agent's journal guarantees it), so a redelivery (at least once) finds its key
//!   and is counted a duplicate, and a period's records are one range scan.
//! - **A host speaks for the clouds it runs**: a record is refused unless its cloud is placed on
//!   the delivering host, or was deleted while it ran there, for [`USAGE_GRACE_SECS`] after
//!   (the final records of a deleted cloud's endpoints arrive after the delete; each delete
//!   attempt first writes `usagegrace/<cloud>/<host>` for each of its VM hosts). A host cannot write usage
//!   for a cloud it never ran; it is trusted with its own VMs' traffic.
//! - **Usage outlives its cloud** (billing needs it): deleting a cloud leaves its records.

use super::*;
use atoll_api::usage::{Traffic, UsageEvent};

/// How long after a cloud's delete its hosts may deliver its usage.
pub const USAGE_GRACE_SECS: u64 = 86_400;

fn usage_key(r: &UsageEvent, cloud: CloudId) -> String {
    format!("usage/{cloud}/{:020}/{}", r.data.end_unix_ms, r.id)
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
        for r in &batch.records {
            let Some(cloud) = CloudId::new(r.data.cloud) else {
                out.refused += 1;
                continue;
            };
            let runs = {
                let st = self.feed.state.lock().expect("feed lock");
                st.placements
                    .get(host)
                    .is_some_and(|m| m.contains_key(&cloud))
            };
            if !runs && !self.may_deliver_after_delete(host, cloud).await? {
                out.refused += 1;
                continue;
            }
            let key = usage_key(r, cloud);
            let committed = self
                .commit(Txn {
                    compares: vec![Compare::Absent(key.clone())],
                    success: vec![put(key, r)],
                })
                .await?;
            match committed {
                Some(_) => out.accepted += 1,
                None => out.duplicates += 1,
            }
        }
        Ok(Reply::UsageIngested(out))
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

    pub(super) async fn usage(&self, c: CloudId, from: u64, to: u64) -> Result<Reply, CoreError> {
        let prefix = format!("usage/{c}/");
        let (from_ms, to_ms) = (from.saturating_mul(1000), to.saturating_mul(1000));
        let mut after = format!("{prefix}{from_ms:020}");
        let mut sums: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
        let mut records = 0u64;
        'pages: loop {
            let page = self.store.range(&prefix, Some(&after), 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.key.clone();
            for kv in &page {
                let r: UsageEvent = decode(&kv.key, &kv.value)?;
                if r.data.end_unix_ms >= to_ms {
                    break 'pages;
                }
                records += 1;
                for t in &r.data.usage.traffic {
                    let e = sums
                        .entry((t.direction.clone(), t.class.clone()))
                        .or_default();
                    e.0 += t.packets;
                    e.1 += t.bytes;
                }
            }
            if page.len() < 1000 {
                break;
            }
        }
        let traffic = sums
            .into_iter()
            .filter(|(_, (p, b))| *p > 0 || *b > 0)
            .map(|((direction, class), (packets, bytes))| Traffic {
                direction,
                class,
                packets,
                bytes,
            })
            .collect();
        Ok(Reply::Usage(Box::new(CloudUsage {
            cloud: c,
            from,
            to,
            records,
            traffic,
        })))
    }
}
