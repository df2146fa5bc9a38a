//! Exponential backoff with full jitter, for reconnects and restarts.

use std::time::Duration;

/// Exponential backoff: attempt `n` (from 1) waits a random time in `[base × 2^(n-1) / 2,
/// base × 2^(n-1)]`, capped at `max`. Half the delay is random so that a thousand shards that
/// dropped together do not come back in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Returns the delay before attempt `attempt` (1 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jitter = rand::random::<f64>();
        ceiling.mul_f64(0.5 + jitter / 2.0)
    }

    /// Returns the largest delay attempt `attempt` can get.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        self.base.saturating_mul(1 << exponent).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(backoff.ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff.ceiling(4), Duration::from_millis(800));
        assert_eq!(backoff.ceiling(30), Duration::from_secs(5));
        for attempt in 1..10 {
            let delay = backoff.delay(attempt);
            let ceiling = backoff.ceiling(attempt);
            assert!(
                delay <= ceiling,
                "attempt {attempt}: {delay:?} > {ceiling:?}"
            );
            assert!(
                delay >= ceiling / 2,
                "attempt {attempt}: {delay:?} < half of {ceiling:?}"
            );
        }
    }
}
