//! Egress policies: what a cloud's VMs may reach outside the cloud (`EgressPolicy`).
//!
//! Decisions:
//! - **Written at create.** A new cloud gets a policy of `clouds.default_egress`'s mode in the
//!   same transaction as its record, so changing the operator's default later changes no
//!   existing cloud. A cloud with no policy key (created before egress existed) has the
//!   policy it always had: `deny`.
//! - **Names are stored in lower case**, without a final dot: DNS compares names without
//!   case, and hosts match answers against the stored form.
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
