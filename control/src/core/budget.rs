//! Spend budgets: a cloud's spend per calendar month (UTC) against an amount the operator set.
//!
//! Decisions:
//! - **Kept at `c/<c>/budget`** (goes with the cloud): the budget, and where the month's spend
//!   stands ([`BudgetStatus`]), with the last changes of state as events (at most
//!   [`MAX_EVENTS`]; each is also logged). The key is one the hosts' egress follows
//!   (`feed::egress_cloud`), so a change of state reaches the cloud's hosts.
//! - **Evaluated when usage arrives** (each ingest that brought a cloud records, after they are
//!   rolled up) and when the operator sets it: the month's hourly rollups, priced, against the
//!   amount (the earlier hours' cost cached per control plane for up to ten minutes within an
//!   hour, so a delivery reads only the current hour's rollups). So enforcement lags spend by a delivery interval (a second or so), and a host that
//!   cannot deliver delays it: a budget is a brake, not a hard real-time cap.
//! - **At the amount**: the cloud's VMs stop (`stopped_by: budget`, the reason in their
//!   status) and its egress stops (hosts receive its policy as `deny`, its own policy kept);
//!   starting or creating a running VM, or creating a volume, is refused (`409
//!   budget_exceeded`) while it lasts. Its volumes stay (they keep costing: storage is
//!   provisioned, not used; deleting data is the owner's call, not a brake's). Raising the budget
//!   over the spend, lifting it or a new month starts again exactly the VMs the budget stopped.
//! - **Past `warn_percent`**: a warning event only.

use std::collections::BTreeMap;

use super::*;
use atoll_api::model::{Budget, BudgetEvent, BudgetState, BudgetStatus};

/// Events kept per budget.
pub const MAX_EVENTS: usize = 16;

/// The states of the budgets this control plane evaluated since it started, for the
/// `atoll_budget_clouds` gauge (each cloud with usage is evaluated every delivery interval, so
/// after a restart the gauge is whole again within one; with several control planes, each
/// counts those it evaluated: the alert takes the max).
static STATES: std::sync::Mutex<BTreeMap<CloudId, BudgetState>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Per cloud with a budget: the cost of its month's hours before the current one, as
/// `(month start, current hour, cost, computed at)`. An evaluation then reads only the current
/// hour's rollups (one per host), not the month's (744 per host), on every delivery; the cache
/// is recomputed when the hour turns, or after [`PRIOR_TTL_SECS`] (records a host delivers
/// late for an earlier hour count from then).
pub(super) type Prior = std::sync::Mutex<BTreeMap<CloudId, (u64, u64, u64, u64)>>;

/// How long the cost of a month's earlier hours is reused.
const PRIOR_TTL_SECS: u64 = 600;

/// A deleted cloud's budget is gone with it.
pub(super) fn forget(core: &Core, c: CloudId) {
    track(c, None);
    core.budget_prior
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&c);
}

fn track(c: CloudId, state: Option<BudgetState>) {
    let mut m = STATES.lock().unwrap_or_else(|p| p.into_inner());
    match state {
        Some(s) => m.insert(c, s),
        None => m.remove(&c),
    };
    let count = |s| m.values().filter(|v| **v == s).count() as u64;
    crate::metrics::set_budget_clouds(count(BudgetState::Warning), count(BudgetState::Exceeded));
}

fn budget_key(c: CloudId) -> String {
    format!("c/{c}/budget")
}

/// The start (seconds since the epoch) of the UTC month holding `secs`.
pub fn month_start(secs: u64) -> u64 {
    let stamp = crate::usage::rfc3339(secs.saturating_mul(1000));
    crate::usage::parse_rfc3339(&format!("{}-01T00:00:00Z", &stamp[..7]))
        .map(|ms| ms / 1000)
        .unwrap_or(0)
}

impl Core {
    /// The cloud's budget and its record's revision.
    pub(super) async fn budget(
        &self,
        c: CloudId,
    ) -> Result<Option<(u64, BudgetStatus)>, CoreError> {
        let key = budget_key(c);
        Ok(match self.store.get(&key).await? {
            Some(kv) => Some((kv.mod_revision, decode(&key, &kv.value)?)),
            None => None,
        })
    }

    /// Whether the cloud is over its budget (starting VMs is refused then).
    pub(super) async fn over_budget(&self, c: CloudId) -> Result<bool, CoreError> {
        Ok(self
            .budget(c)
            .await?
            .is_some_and(|(_, b)| b.state == BudgetState::Exceeded))
    }

    pub(super) fn refuse_over_budget() -> CoreError {
        CoreError::Conflict {
            code: "budget_exceeded",
            message: "the cloud's spend reached its budget: its VMs cannot start until the \
                      operator raises or lifts the budget, or the month ends"
                .into(),
        }
    }

    pub(super) async fn set_budget(&self, c: CloudId, budget: Budget) -> Result<Reply, CoreError> {
        budget.validate()?;
        self.cloud(c).await?;
        let key = budget_key(c);
        optimistic!(format!("the budget of {c}"), async {
            let (compare, st) = match self.budget(c).await? {
                Some((rev, old)) => (
                    Compare::ModRevision(key.clone(), rev),
                    BudgetStatus {
                        budget: budget.clone(),
                        ..old
                    },
                ),
                None => (
                    Compare::Absent(key.clone()),
                    BudgetStatus {
                        budget: budget.clone(),
                        period_start: month_start(now()),
                        spent_nanos: 0,
                        state: BudgetState::Ok,
                        events: Vec::new(),
                    },
                ),
            };
            let txn = Txn {
                compares: vec![compare],
                success: vec![put(key.clone(), &st)],
            };
            if self.commit(txn).await?.is_some() {
                return done(());
            }
            retry()
        })?;
        match self.evaluate_budget(c).await? {
            Some(st) => Ok(Reply::BudgetStatus(Box::new(st))),
            None => Err(CoreError::Contention(format!("the budget of {c}"))),
        }
    }

    pub(super) async fn lift_budget(&self, c: CloudId) -> Result<Reply, CoreError> {
        self.cloud(c).await?;
        let key = budget_key(c);
        let was = optimistic!(format!("the budget of {c}"), async {
            let Some((rev, st)) = self.budget(c).await? else {
                return done(None);
            };
            let txn = Txn {
                compares: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![Op::Delete { key: key.clone() }],
            };
            if self.commit(txn).await?.is_some() {
                return done(Some(st.state));
            }
            retry()
        })?;
        if was.is_none() {
            return Err(CoreError::NotFound(format!("a budget of cloud {c}")));
        }
        track(c, None);
        if was == Some(BudgetState::Exceeded) {
            self.budget_power(c, false).await?;
        }
        Ok(Reply::Done)
    }

    /// Prices the month's usage against the budget and acts on a change of state; the status
    /// (`None`: no budget).
    pub(super) async fn evaluate_budget(
        &self,
        c: CloudId,
    ) -> Result<Option<BudgetStatus>, CoreError> {
        let key = budget_key(c);
        for _ in 0..MAX_RETRIES {
            let Some((rev, mut st)) = self.budget(c).await? else {
                return Ok(None);
            };
            let now = now();
            let period = month_start(now);
            let spent = self.month_spend(c, period, now).await?;
            let amount = st.budget.amount_nanos();
            let state = if spent >= amount {
                BudgetState::Exceeded
            } else if u128::from(spent) * 100
                >= u128::from(amount) * u128::from(st.budget.warn_percent)
            {
                BudgetState::Warning
            } else {
                BudgetState::Ok
            };
            let was = st.state;
            track(c, Some(state));
            if state == was && spent == st.spent_nanos && period == st.period_start {
                return Ok(Some(st));
            }
            if state != was {
                st.events.push(BudgetEvent {
                    at: now,
                    state,
                    spent_nanos: spent,
                });
                let over = st.events.len().saturating_sub(MAX_EVENTS);
                st.events.drain(..over);
            }
            (st.spent_nanos, st.period_start, st.state) = (spent, period, state);
            let txn = Txn {
                compares: vec![Compare::ModRevision(key.clone(), rev)],
                success: vec![put(key.clone(), &st)],
            };
            if self.commit(txn).await?.is_none() {
                continue;
            }
            if state != was {
                tracing::warn!(
                    cloud = %c,
                    "cloud {c}: spend {} of budget {} {}: {state:?}",
                    atoll_api::model::nanos_decimal(spent),
                    st.budget.amount,
                    self.cfg.prices.currency
                );
                if state == BudgetState::Exceeded {
                    self.budget_power(c, true).await?;
                } else if was == BudgetState::Exceeded {
                    self.budget_power(c, false).await?;
                }
            }
            return Ok(Some(st));
        }
        Err(CoreError::Contention(format!("the budget of {c}")))
    }

    /// The cloud's spend in the month from `period` up to now: the earlier hours' (cached) and
    /// the current one's.
    async fn month_spend(&self, c: CloudId, period: u64, now: u64) -> Result<u64, CoreError> {
        let hour = now / 3600 * 3600;
        let cached = self
            .budget_prior
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&c)
            .filter(|(p, h, _, at)| *p == period && *h == hour && now < at + PRIOR_TTL_SECS)
            .map(|v| v.2);
        let prior = match cached {
            Some(cost) => cost,
            None => {
                let (_, _, cost) = self.price(&self.cloud_hours(c, period, hour).await?);
                self.budget_prior
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(c, (period, hour, cost, now));
                cost
            }
        };
        let (_, _, current) = self.price(&self.cloud_hours(c, hour, hour + 3600).await?);
        Ok(prior.saturating_add(current))
    }

    /// Stops the cloud's running VMs for its budget (`stop`), or starts again those its
    /// budget stopped.
    async fn budget_power(&self, c: CloudId, stop: bool) -> Result<(), CoreError> {
        let vms: Vec<Vm> = self.list(&keys::vms(c)).await?;
        for v in vms {
            let name = v.name.clone();
            optimistic!(format!("VM {name}"), async {
                let (vrev, mut vm) = self.vm(c, &name).await?;
                if stop {
                    if vm.power != Power::Running {
                        return done(());
                    }
                    vm.power = Power::Stopped;
                    vm.stopped_by = Some(StopReason::Budget);
                } else {
                    if vm.stopped_by != Some(StopReason::Budget) {
                        return done(());
                    }
                    vm.power = Power::Running;
                    vm.stopped_by = None;
                }
                if self.write_power(&vm, vrev).await? {
                    return done(());
                }
                retry()
            })?;
        }
        Ok(())
    }
}
