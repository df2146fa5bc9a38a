//! The fleet-wide session-start budget: JSON `{remaining, total, resets_at_unix_ms}` under
//! `<prefix>/budget`, spent by one transaction per IDENTIFY.
//!
//! The transaction compares the create revision of the lock key, so a lock lost to an expired or
//! revoked lease never spends a start nor covers an IDENTIFY. It also compares the mod revision of
//! the budget key, so a concurrent spend by another process is never overwritten. A compare that
//! fails only because the budget changed is retried with the budget etcd returned.
//!
//! The budget is not read before each spend: the transaction starts from the value and mod
//! revision this process last read or wrote. The spends of one process take turns, so they never
//! invalidate each other's copy, and a spend by another process costs one failed transaction
//! whose else branch returns the current budget. A spend thus takes one round trip while this
//! process is the only one identifying.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actors::coordinator::{IdentifyRefusal, SessionBudget};
use actors::store::PortError;
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::connection::Connection;
use super::lock::HeldLockInfo;
use super::EtcdError;

/// Length of Discord's session-start window, used when neither etcd nor this process's report
/// contains the current window's reset time.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Attempts at the budget transaction before giving up with [`EtcdError::BudgetContention`].
/// Each failed attempt means another process spent a start, so the fleet as a whole progresses.
const SPEND_ATTEMPTS: u32 = 32;

/// The budget as stored in etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredBudget {
    pub(super) remaining: u32,
    pub(super) total: u32,
    /// Wall-clock time (Unix milliseconds) when `remaining` resets to `total`.
    pub(super) resets_at_unix_ms: u64,
}

/// The session-start limit that `GET /gateway/bot` reported to this process.
#[derive(Clone, Copy, Debug)]
pub(super) struct DiscordReport {
    remaining: u32,
    total: u32,
    resets_at_unix_ms: u64,
}

impl DiscordReport {
    /// Anchors the report's relative reset time at `now_ms`, the time it was received.
    pub(super) fn new(budget: SessionBudget, now_ms: u64) -> Self {
        let reset_after_ms = u64::try_from(budget.reset_after.as_millis()).unwrap_or(u64::MAX);
        Self {
            remaining: budget.remaining,
            total: budget.total,
            resets_at_unix_ms: now_ms.saturating_add(reset_after_ms),
        }
    }
}

/// Returns the budget in force at `now_ms`, before this IDENTIFY spends from it.
///
/// The stored budget counts while its reset time is ahead. The report lowers it while the
/// report's own window is open, so a process restarted with a stale or higher report never raises
/// it. Once the stored reset time has passed, the report starts a new window, and if the report
/// has expired as well, the limit is back at `total` for a day, as Discord resets it.
pub(super) fn current_budget(
    stored: Option<StoredBudget>,
    report: &DiscordReport,
    now_ms: u64,
) -> StoredBudget {
    let report_open = report.resets_at_unix_ms > now_ms;
    match stored.filter(|stored| stored.resets_at_unix_ms > now_ms) {
        Some(stored) if report_open => StoredBudget {
            remaining: stored.remaining.min(report.remaining),
            ..stored
        },
        Some(stored) => stored,
        None if report_open => StoredBudget {
            remaining: report.remaining,
            total: report.total,
            resets_at_unix_ms: report.resets_at_unix_ms,
        },
        None => StoredBudget {
            remaining: report.total,
            total: report.total,
            resets_at_unix_ms: now_ms.saturating_add(DAY_MS),
        },
    }
}

/// Returns the wall-clock time in Unix milliseconds. The budget's reset time is shared by
/// processes on different hosts, so it cannot be a monotonic instant.
pub(super) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// The budget key as last read or written: its value and mod revision (0 while the key is
/// missing).
#[derive(Clone, Copy)]
struct Observed {
    budget: Option<StoredBudget>,
    mod_revision: i64,
}

/// The budget of one backend: where it is stored and what Discord reported to this process.
pub(super) struct Budget {
    connection: Connection,
    key: String,
    report: DiscordReport,
    reserve: u32,
    /// The budget key as this process last saw it, `None` before the first spend. Holding the
    /// mutex makes the spends of this process take turns.
    last_seen: tokio::sync::Mutex<Option<Observed>>,
}

impl Budget {
    pub(super) fn new(
        connection: Connection,
        key: String,
        report: DiscordReport,
        reserve: u32,
    ) -> Self {
        Self {
            connection,
            key,
            report,
            reserve,
            last_seen: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// Spends one session start if the lock is still held and the budget is above the reserve.
    pub(super) async fn spend(&self, lock: &HeldLockInfo) -> Result<(), IdentifyRefusal> {
        let mut last_seen = self.last_seen.lock().await;
        let (fresh, mut observed) = match *last_seen {
            Some(observed) => (false, observed),
            None => (true, self.read().await.map_err(PortError::from)?),
        };
        let outcome = self.spend_from(lock, fresh, &mut observed).await;
        *last_seen = Some(observed);
        outcome
    }

    /// Runs the spend transaction from `observed` until it succeeds, finds the lock lost or the
    /// budget at the reserve. `observed` is left at the budget as last seen, and `fresh` is
    /// `true` when it was read from etcd during this spend.
    async fn spend_from(
        &self,
        lock: &HeldLockInfo,
        mut fresh: bool,
        observed: &mut Observed,
    ) -> Result<(), IdentifyRefusal> {
        for attempt in 1..=SPEND_ATTEMPTS {
            let now_ms = unix_ms_now();
            let current = current_budget(observed.budget, &self.report, now_ms);
            if current.remaining <= self.reserve {
                if fresh {
                    return Err(self.refusal(current, now_ms));
                }
                // A copy from an earlier spend may be outdated (an operator may have deleted
                // the key to reset it), so only a budget read now refuses.
                *observed = self.read().await.map_err(PortError::from)?;
                fresh = true;
                continue;
            }

            let next = StoredBudget {
                remaining: current.remaining - 1,
                ..current
            };
            let spent = self
                .try_spend(lock, observed, &next)
                .await
                .map_err(PortError::from)?;
            match spent {
                Spent::Done(revision) => {
                    tracing::debug!(
                        bucket = lock.bucket,
                        lease = %lock.lease,
                        remaining = next.remaining,
                        revision,
                        attempt,
                        "session start spent"
                    );
                    *observed = Observed {
                        budget: Some(next),
                        mod_revision: revision,
                    };
                    return Ok(());
                }
                Spent::LockLost => {
                    tracing::debug!(
                        bucket = lock.bucket,
                        lease = %lock.lease,
                        "lock key gone or replaced at begin_identify"
                    );
                    return Err(IdentifyRefusal::LockLost);
                }
                Spent::BudgetChanged(latest) => {
                    *observed = latest;
                    fresh = true;
                }
            }
        }
        Err(PortError::from(EtcdError::BudgetContention {
            key: self.key.clone(),
            attempts: SPEND_ATTEMPTS,
        })
        .into())
    }

    fn refusal(&self, current: StoredBudget, now_ms: u64) -> IdentifyRefusal {
        IdentifyRefusal::BudgetExhausted {
            remaining: current.remaining,
            reserve: self.reserve,
            reset_in: Duration::from_millis(current.resets_at_unix_ms.saturating_sub(now_ms)),
        }
    }

    async fn read(&self) -> Result<Observed, EtcdError> {
        let key = self.key.clone();
        let response = self
            .connection
            .call("budget read", move |mut client| async move {
                client.get(key, None).await
            })
            .await?;
        self.observe(response.kvs().first())
    }

    fn observe(&self, entry: Option<&KeyValue>) -> Result<Observed, EtcdError> {
        let Some(entry) = entry else {
            return Ok(Observed {
                budget: None,
                mod_revision: 0,
            });
        };
        let budget =
            serde_json::from_slice(entry.value()).map_err(|source| EtcdError::InvalidBudget {
                key: self.key.clone(),
                source,
            })?;
        Ok(Observed {
            budget: Some(budget),
            mod_revision: entry.mod_revision(),
        })
    }

    /// Runs the spend transaction once. It writes `next` if the lock key still has its create
    /// revision and the budget its mod revision, and reads both keys back otherwise. The
    /// revision of a successful transaction is the budget key's new mod revision.
    async fn try_spend(
        &self,
        lock: &HeldLockInfo,
        observed: &Observed,
        next: &StoredBudget,
    ) -> Result<Spent, EtcdError> {
        let value = serde_json::to_vec(next).map_err(|source| EtcdError::InvalidBudget {
            key: self.key.clone(),
            source,
        })?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(lock.key.as_str(), CompareOp::Equal, lock.create_revision),
                Compare::mod_revision(self.key.as_str(), CompareOp::Equal, observed.mod_revision),
            ])
            .and_then([TxnOp::put(self.key.as_str(), value, None)])
            .or_else([
                TxnOp::get(lock.key.as_str(), None),
                TxnOp::get(self.key.as_str(), None),
            ]);
        let response = self
            .connection
            .call("budget transaction", move |mut client| async move {
                client.txn(txn).await
            })
            .await?;
        if response.succeeded() {
            let revision = response.header().map_or(0, |header| header.revision());
            return Ok(Spent::Done(revision));
        }

        let reads = response.op_responses();
        let (Some(TxnOpResponse::Get(lock_read)), Some(TxnOpResponse::Get(budget_read))) =
            (reads.first(), reads.get(1))
        else {
            // The else branch consists of the two reads above, so any other shape means the lock
            // cannot be confirmed.
            return Ok(Spent::LockLost);
        };
        let lock_held = lock_read
            .kvs()
            .first()
            .is_some_and(|entry| entry.create_revision() == lock.create_revision);
        if !lock_held {
            return Ok(Spent::LockLost);
        }
        Ok(Spent::BudgetChanged(
            self.observe(budget_read.kvs().first())?,
        ))
    }
}

/// The outcome of one spend transaction.
enum Spent {
    /// The start was spent at this revision.
    Done(i64),
    /// The lock key is gone or was created again.
    LockLost,
    /// Another process changed the budget first, leaving this budget.
    BudgetChanged(Observed),
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn report(remaining: u32, resets_in_ms: u64) -> DiscordReport {
        DiscordReport {
            remaining,
            total: 1000,
            resets_at_unix_ms: NOW + resets_in_ms,
        }
    }

    fn stored(remaining: u32, resets_at_unix_ms: u64) -> StoredBudget {
        StoredBudget {
            remaining,
            total: 1000,
            resets_at_unix_ms,
        }
    }

    #[test]
    fn missing_key_takes_report() {
        let current = current_budget(None, &report(40, 5_000), NOW);
        assert_eq!(current, stored(40, NOW + 5_000));
    }

    #[test]
    fn higher_report_never_raises_stored() {
        let current = current_budget(Some(stored(7, NOW + 9_000)), &report(900, 5_000), NOW);
        assert_eq!(current, stored(7, NOW + 9_000));
    }

    #[test]
    fn lower_report_lowers_stored() {
        let current = current_budget(Some(stored(70, NOW + 9_000)), &report(30, 5_000), NOW);
        assert_eq!(current, stored(30, NOW + 9_000));
    }

    #[test]
    fn expired_report_leaves_stored() {
        let current = current_budget(Some(stored(70, NOW + 9_000)), &report(3, 0), NOW);
        assert_eq!(current, stored(70, NOW + 9_000));
    }

    #[test]
    fn expired_key_takes_report() {
        let current = current_budget(Some(stored(2, NOW)), &report(990, 60_000), NOW);
        assert_eq!(current, stored(990, NOW + 60_000));
    }

    #[test]
    fn both_expired_reset_to_total() {
        let current = current_budget(Some(stored(2, NOW - 1)), &report(5, 0), NOW);
        assert_eq!(current, stored(1000, NOW + DAY_MS));
    }

    #[test]
    fn budget_json_field_names() {
        let json = serde_json::to_string(&stored(5, 42)).unwrap();
        assert_eq!(
            json,
            r#"{"remaining":5,"total":1000,"resets_at_unix_ms":42}"#
        );
    }
}
