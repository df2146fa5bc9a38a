//! Where bucket locks and the session-start budget live: in this process, or fleet-wide in etcd.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use crate::store::PortError;

/// A bucket lock taken from a backend. `handle` identifies it to the backend that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLock {
    pub bucket: u32,
    pub handle: u64,
}

/// Discord's daily session-start limit as `GET /gateway/bot` reported it, and the reserve below
/// which this fleet stops identifying. Exceeding the limit makes Discord end every session and
/// reset the token, so the last starts are kept for emergencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionBudget {
    pub total: u32,
    pub remaining: u32,
    /// Time until `remaining` resets to `total`.
    pub reset_after: Duration,
    /// IDENTIFY is refused while `remaining` is at or below this.
    pub reserve: u32,
}

/// Why an IDENTIFY must not be sent.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyRefusal {
    /// The bucket lock expired or was taken over (a partition, a revoked lease).
    #[error("the bucket lock was lost")]
    LockLost,
    /// The session-start budget reached the reserve.
    #[error("session starts at the reserve: {remaining} left, reserve {reserve}; the budget resets in {reset_in:?}")]
    BudgetExhausted {
        remaining: u32,
        reserve: u32,
        reset_in: Duration,
    },
    /// The backend could not be asked.
    #[error(transparent)]
    Unavailable(#[from] PortError),
}

/// The lock service behind the IdentifyCoordinator. Inside one process the coordinator already
/// serves one holder per bucket; the backend extends that to every process of the bot.
#[async_trait]
pub trait IdentifyBackend: Send + Sync + 'static {
    /// Returns the backend's name for logs and status.
    fn name(&self) -> &'static str;

    /// Takes the lock of a bucket, waiting while another process holds it. `hold` is the longest
    /// the caller will keep it; a backend with expiring locks lets it lapse after that.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the backend cannot be reached; the caller retries.
    async fn acquire(&self, bucket: u32, hold: Duration) -> Result<BackendLock, PortError>;

    /// Confirms right before IDENTIFY that the lock is still held and spends one session start,
    /// as one atomic step, so that neither a lost lock nor an exhausted budget ever covers an
    /// IDENTIFY.
    ///
    /// # Errors
    ///
    /// An [`IdentifyRefusal`]; IDENTIFY must not be sent.
    async fn begin_identify(&self, lock: BackendLock) -> Result<(), IdentifyRefusal>;

    /// Releases a lock.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the backend cannot be reached; an expiring lock then
    /// lapses on its own.
    async fn release(&self, lock: BackendLock) -> Result<(), PortError>;
}

/// The backend of a single process: every bucket is free as soon as the coordinator asks, since
/// the coordinator itself serializes the holders of a bucket, and the budget is counted here.
#[derive(Debug)]
pub struct InProcessBackend {
    budget: Mutex<LocalBudget>,
    /// No lock is granted before this: an earlier process of the same shards may have sent an
    /// IDENTIFY whose window is still open, and this process cannot know when.
    quiet_until: Option<tokio::time::Instant>,
}

#[derive(Debug)]
struct LocalBudget {
    budget: SessionBudget,
    resets_at: Instant,
}

impl InProcessBackend {
    /// Creates the backend with the budget `GET /gateway/bot` reported.
    pub fn new(budget: SessionBudget) -> Self {
        Self {
            budget: Mutex::new(LocalBudget {
                resets_at: Instant::now() + budget.reset_after,
                budget,
            }),
            quiet_until: None,
        }
    }

    /// Grants no lock until `quiet` has passed from now. A process that starts after another
    /// one of the same shards stopped, possibly by a crash right after an IDENTIFY, waits out
    /// the window that IDENTIFY may have opened.
    pub fn quiet_for(mut self, quiet: Duration) -> Self {
        self.quiet_until = Some(tokio::time::Instant::now() + quiet);
        self
    }

    /// Creates a backend with Discord's default budget (1000 starts) and no reserve, for tests.
    pub fn unlimited() -> Self {
        Self::new(SessionBudget {
            total: u32::MAX,
            remaining: u32::MAX,
            reset_after: Duration::from_secs(24 * 60 * 60),
            reserve: 0,
        })
    }
}

#[async_trait]
impl IdentifyBackend for InProcessBackend {
    fn name(&self) -> &'static str {
        "in-process"
    }

    async fn acquire(&self, bucket: u32, _hold: Duration) -> Result<BackendLock, PortError> {
        if let Some(until) = self.quiet_until {
            tokio::time::sleep_until(until).await;
        }
        Ok(BackendLock { bucket, handle: 0 })
    }

    async fn begin_identify(&self, _lock: BackendLock) -> Result<(), IdentifyRefusal> {
        let mut local = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= local.resets_at {
            local.budget.remaining = local.budget.total;
            local.resets_at = now + Duration::from_secs(24 * 60 * 60);
        }
        let budget = &mut local.budget;
        if budget.remaining <= budget.reserve {
            return Err(IdentifyRefusal::BudgetExhausted {
                remaining: budget.remaining,
                reserve: budget.reserve,
                reset_in: local.resets_at.saturating_duration_since(now),
            });
        }
        budget.remaining -= 1;
        Ok(())
    }

    async fn release(&self, _lock: BackendLock) -> Result<(), PortError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_backend_grants_after_quiet() {
        let quiet = Duration::from_millis(5250);
        let backend = InProcessBackend::unlimited().quiet_for(quiet);
        let started = tokio::time::Instant::now();
        backend.acquire(3, Duration::from_secs(5)).await.unwrap();
        assert_eq!(started.elapsed(), quiet);
        // Only the start is quiet.
        backend.acquire(3, Duration::from_secs(5)).await.unwrap();
        assert_eq!(started.elapsed(), quiet);
    }

    #[tokio::test]
    async fn budget_stops_at_reserve() {
        let backend = InProcessBackend::new(SessionBudget {
            total: 1000,
            remaining: 3,
            reset_after: Duration::from_secs(60),
            reserve: 1,
        });
        let lock = backend.acquire(0, Duration::from_secs(5)).await.unwrap();
        assert!(backend.begin_identify(lock).await.is_ok());
        assert!(backend.begin_identify(lock).await.is_ok());
        let refusal = backend.begin_identify(lock).await.unwrap_err();
        assert!(
            matches!(
                refusal,
                IdentifyRefusal::BudgetExhausted {
                    remaining: 1,
                    reserve: 1,
                    ..
                }
            ),
            "{refusal:?}"
        );
        assert!(refusal.to_string().contains("resets in"), "{refusal}");
    }
}
