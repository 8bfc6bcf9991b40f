//! Clouds that expire (issue 19): a cloud created with a time to live or an expiry time
//! (`CreateCloud::ttl_secs`, `expires_at`), or given one later (`PUT …/expiry`, which also
//! extends or clears it), is deleted at that time with everything it holds, by the same
//! transaction as an explicit delete (so on every host, its grants and offers revoked).
//!
//! Decisions:
//! - **An index in the store, not a timer in memory.** Each cloud that expires has a key
//!   `expiry/<time>/<cloud>` written and removed in the transactions that set, change or
//!   clear its expiry and that delete the cloud. Every control plane runs a reaper that reads
//!   the head of that index every [`REAP_INTERVAL`] and deletes the clouds that are due, so
//!   expiry survives restarts and fail-over (any control plane on the store does it; a
//!   restarted one catches up at once) and costs one small range read per interval
//!   whatever the number of clouds. Expiry is accurate to that interval.
//! - **Only if still due.** The reaper deletes a cloud only if its record, read in the
//!   delete's own transaction, still expires by now: a cloud extended between the index read
//!   and the delete is kept. Two control planes reaping the same cloud race like two deletes:
//!   one wins, the other finds it gone. An index key whose cloud is gone is removed.
//! - **Bounded**: at most [`MAX_CLOUD_TTL_SECS`] ahead (ten years), and an expiry time must be
//!   in the future (a past one is refused rather than taken as "delete now": that is
//!   `DELETE`).
//! - The index's changes do not reach hosts' syncs (the feed skips them like host records).

use std::sync::Weak;

use super::*;

/// How often each control plane looks for clouds that are due.
pub(super) const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Clouds deleted per look, at most (the rest at the next).
const REAP_BATCH: usize = 64;

/// The expiry time given as a time to live or a time, if any, at `now`: validated (module
/// docs).
pub(super) fn expiry_time(
    ttl_secs: Option<u64>,
    expires_at: Option<u64>,
    now: u64,
) -> Result<Option<u64>, FieldError> {
    match (ttl_secs, expires_at) {
        (Some(_), Some(_)) => Err(FieldError::new(
            "expires_at",
            "give ttl_secs or expires_at, not both",
        )),
        (Some(ttl), None) => {
            if !(1..=MAX_CLOUD_TTL_SECS).contains(&ttl) {
                return Err(FieldError::new(
                    "ttl_secs",
                    format!("must be 1 to {MAX_CLOUD_TTL_SECS} (ten years)"),
                ));
            }
            Ok(Some(now + ttl))
        }
        (None, Some(at)) => {
            if at <= now {
                return Err(FieldError::new(
                    "expires_at",
                    format!(
                        "must be in the future (now is {now}); to delete now, DELETE the cloud"
                    ),
                ));
            }
            if at - now > MAX_CLOUD_TTL_SECS {
                return Err(FieldError::new(
                    "expires_at",
                    format!("must be at most {MAX_CLOUD_TTL_SECS} s (ten years) from now"),
                ));
            }
            Ok(Some(at))
        }
        (None, None) => Ok(None),
    }
}

/// Starts the reaper of this control plane; it ends when the core is dropped.
pub(super) fn spawn_reaper(core: Weak<Core>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(core) = core.upgrade() else { return };
            if let Err(e) = core.reap_expired(now()).await {
                tracing::warn!("deleting expired clouds: {e}");
            }
            if let Err(e) = core.purge_usage(now()).await {
                tracing::warn!("deleting usage records past their retention: {e}");
            }
        }
    });
}

impl Core {
    /// Sets, changes or clears (`{}`) when cloud `c` expires.
    pub(super) async fn set_cloud_expiry(
        &self,
        c: CloudId,
        expiry: CloudExpiry,
    ) -> Result<Reply, CoreError> {
        let at = expiry_time(expiry.ttl_secs, expiry.expires_at, now())?;
        optimistic!(format!("cloud {c}"), async {
            let (rev, mut cloud) = self.cloud_record(c).await?;
            let mut txn = Txn {
                compares: vec![Compare::ModRevision(keys::cloud(c), rev)],
                success: vec![],
            };
            if let Some(old) = cloud.expires_at {
                txn.success.push(Op::Delete {
                    key: keys::expiry(old, c),
                });
            }
            cloud.expires_at = at;
            txn.success.push(put(keys::cloud(c), &cloud));
            if let Some(new) = at {
                txn.success.push(put(keys::expiry(new, c), &c));
            }
            if self.commit(txn).await?.is_some() {
                cloud.token_sha256.clear();
                return done(Reply::Cloud(Box::new(cloud)));
            }
            retry()
        })
    }

    /// Deletes the clouds due by `now` (at most [`REAP_BATCH`]); returns how many.
    pub(super) async fn reap_expired(&self, now: u64) -> Result<usize, CoreError> {
        let due = self.store.range(keys::expiries(), None, REAP_BATCH).await?;
        let mut deleted = 0;
        for kv in due {
            let Some((at, c)) = keys::parse_expiry(&kv.key) else {
                tracing::warn!("removing a malformed expiry index key {}", kv.key);
                self.drop_index_key(&kv.key, kv.mod_revision).await?;
                continue;
            };
            if at > now {
                break;
            }
            match self.delete_cloud_if(c, Some(now)).await {
                Ok(true) => {
                    tracing::info!("cloud {c} expired at {at}: deleted with everything it held");
                    deleted += 1;
                }
                // Extended meanwhile: its new key is elsewhere in the index.
                Ok(false) => {}
                Err(CoreError::NotFound(_)) => {
                    self.drop_index_key(&kv.key, kv.mod_revision).await?;
                }
                Err(e) => tracing::warn!("cloud {c} expired at {at} but is not deleted: {e}"),
            }
        }
        Ok(deleted)
    }

    /// Removes an index key nothing else changed since it was read.
    async fn drop_index_key(&self, key: &str, rev: u64) -> Result<(), CoreError> {
        self.commit(Txn {
            compares: vec![Compare::ModRevision(key.to_string(), rev)],
            success: vec![Op::Delete {
                key: key.to_string(),
            }],
        })
        .await?;
        Ok(())
    }
}
