//! Identify pacing per bucket, the daily session-start limit and session expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::SimConfig;
use super::{lock, Shared};

/// The result of checking an IDENTIFY against Discord's limits.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IdentifyDecision {
    /// Start a session; one session start was used.
    Accept,
    /// The bucket's window is still open for this long: op 9 `false`.
    TooFast { bucket: u32, wait: Duration },
    /// No session starts are left: Discord ends every session and resets the token.
    LimitExhausted,
}

/// Pacing and budget state, behind one lock so that the decision and its bookkeeping are atomic.
pub(crate) struct IdentifyState {
    /// When each bucket last accepted an IDENTIFY.
    buckets: Vec<Option<Instant>>,
    remaining: u32,
    reset_at: Instant,
    /// `false` once the token was reset for exceeding the session-start limit.
    pub(crate) token_valid: bool,
}

impl IdentifyState {
    pub(crate) fn new(config: &SimConfig, now: Instant) -> Self {
        Self {
            buckets: vec![None; config.max_concurrency as usize],
            remaining: config.session_start_remaining,
            reset_at: now + config.session_start_reset,
            token_valid: true,
        }
    }

    /// Decides on an IDENTIFY of `shard` arriving at `now`.
    pub(crate) fn decide(
        &mut self,
        config: &SimConfig,
        shard: u32,
        now: Instant,
    ) -> IdentifyDecision {
        self.refill(config, now);
        if self.remaining == 0 {
            return IdentifyDecision::LimitExhausted;
        }

        let bucket = actors::gateway::identify_bucket(shard, config.max_concurrency);
        let last = &mut self.buckets[bucket as usize];
        if let Some(opened) = *last {
            let elapsed = now.saturating_duration_since(opened);
            if elapsed < config.identify_window {
                return IdentifyDecision::TooFast {
                    bucket,
                    wait: config.identify_window - elapsed,
                };
            }
        }

        *last = Some(now);
        self.remaining -= 1;
        IdentifyDecision::Accept
    }

    /// Returns `remaining` and `reset_after` as `GET /gateway/bot` reports them.
    pub(crate) fn budget(&mut self, config: &SimConfig, now: Instant) -> (u32, Duration) {
        self.refill(config, now);
        (self.remaining, self.reset_at.saturating_duration_since(now))
    }

    pub(crate) fn remaining(&self) -> u32 {
        self.remaining
    }

    fn refill(&mut self, config: &SimConfig, now: Instant) {
        if now >= self.reset_at {
            self.remaining = config.session_start_total;
            self.reset_at = now + config.session_start_reset;
        }
    }
}

/// Forgets sessions whose connection ended more than `session_expiry` ago, until shutdown.
pub(crate) async fn expire_sessions(shared: Arc<Shared>) {
    let period =
        (shared.config.session_expiry / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }

        let now = Instant::now();
        let mut expired = Vec::new();
        lock(&shared.sessions).retain(|id, session| {
            let state = session.lock();
            let gone = state.detached_at.is_some_and(|at| {
                now.saturating_duration_since(at) >= shared.config.session_expiry
            });
            if gone {
                expired.push(id.clone());
            }
            !gone
        });
        for id in expired {
            tracing::debug!(session = %id, "session expired");
            shared
                .recorder
                .with_session(&id, |record| record.resumable = false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimConfig {
        SimConfig {
            shards: 4,
            max_concurrency: 2,
            session_start_total: 3,
            session_start_remaining: 3,
            ..SimConfig::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn bucket_rejects_inside_window() {
        let config = config();
        let start = Instant::now();
        let mut state = IdentifyState::new(&config, start);
        assert_eq!(state.decide(&config, 0, start), IdentifyDecision::Accept);
        assert_eq!(state.decide(&config, 1, start), IdentifyDecision::Accept);
        let early = start + Duration::from_secs(4);
        assert_eq!(
            state.decide(&config, 2, early),
            IdentifyDecision::TooFast {
                bucket: 0,
                wait: Duration::from_secs(1)
            }
        );
        assert_eq!(
            state.decide(&config, 2, start + Duration::from_secs(5)),
            IdentifyDecision::Accept
        );
    }

    #[test]
    fn budget_runs_out_and_refills() {
        let config = config();
        let start = Instant::now();
        let mut state = IdentifyState::new(&config, start);
        for (i, shard) in [0, 1, 2].into_iter().enumerate() {
            let at = start + Duration::from_secs(10 * i as u64);
            assert_eq!(state.decide(&config, shard, at), IdentifyDecision::Accept);
        }
        let later = start + Duration::from_secs(60);
        assert_eq!(
            state.decide(&config, 3, later),
            IdentifyDecision::LimitExhausted
        );
        let after_reset = start + config.session_start_reset;
        assert_eq!(
            state.decide(&config, 3, after_reset),
            IdentifyDecision::Accept
        );
        assert_eq!(state.remaining(), 2);
    }
}
