//! Faults a test or an operator injects into a running simulator.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;

/// The shards a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    All,
    Shard(u32),
}

impl Target {
    /// Returns `true` if the fault hits `shard`.
    pub fn matches(self, shard: u32) -> bool {
        match self {
            Self::All => true,
            Self::Shard(target) => target == shard,
        }
    }
}

/// A fault. Connection faults hit every connection of the target shards that has identified or
/// resumed; the others change how the simulator treats the target from now on.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Send op 7 RECONNECT.
    Reconnect,
    /// Send op 9 INVALID_SESSION. With `resumable: false` the session is dropped first, so a
    /// RESUME of it fails as well.
    InvalidSession { resumable: bool },
    /// Send a close frame with this code, 1000 included. After 4007, 4009 and the fatal codes
    /// (4004, 4010 to 4014) the session can no longer be resumed, as on Discord.
    Close { code: u16 },
    /// End the TCP connection without a close frame.
    Drop,
    /// Send op 1: the client must answer with a heartbeat at once.
    RequestHeartbeat,
    /// Stop (`true`) or resume (`false`) acknowledging heartbeats.
    SilenceHeartbeats { silent: bool },
    /// Hold READY for this long after later IDENTIFYs of the target.
    DelayReady {
        #[serde(with = "humantime_serde_compat")]
        delay: Duration,
    },
    /// Leave out the last `count` GUILD_CREATEs after the next READY of each target shard.
    WithholdGuilds { count: u32 },
    /// Answer the next all-members REQUEST_GUILD_MEMBERS of each target shard with RATE_LIMITED,
    /// whatever its guild's window says.
    RateLimitMembers {
        #[serde(with = "humantime_serde_compat")]
        retry_after: Duration,
    },
    /// Drop the target's sessions, so that RESUME is answered with op 9 `false`. Connections stay
    /// open.
    ExpireSessions,
    /// Make the resume address refuse connections (`true`) or accept them again (`false`).
    /// The target is ignored.
    RefuseResumeAddress { refuse: bool },
}

/// Parses durations such as "250ms" or "5s" in fault files and commands.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {error}; write it like \"250ms\" or \"5s\""
            ))
        })
    }
}

/// The standing faults, read by connections as they go.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    silent_all: bool,
    silent_shards: HashMap<u32, bool>,
    ready_delay_all: Option<Duration>,
    ready_delay: HashMap<u32, Duration>,
    withhold_all: Option<u32>,
    withhold: HashMap<u32, u32>,
    rate_limit_all: Option<Duration>,
    rate_limit: HashMap<u32, Duration>,
    /// Shards whose next all-members request was already answered by the `All` fault.
    rate_limit_all_used: HashSet<u32>,
}

impl FaultState {
    pub(crate) fn set_silent(&mut self, target: Target, silent: bool) {
        match target {
            Target::All => {
                self.silent_all = silent;
                self.silent_shards.clear();
            }
            Target::Shard(shard) => {
                self.silent_shards.insert(shard, silent);
            }
        }
    }

    pub(crate) fn is_silent(&self, shard: u32) -> bool {
        self.silent_shards
            .get(&shard)
            .copied()
            .unwrap_or(self.silent_all)
    }

    pub(crate) fn set_ready_delay(&mut self, target: Target, delay: Duration) {
        match target {
            Target::All => {
                self.ready_delay_all = Some(delay);
                self.ready_delay.clear();
            }
            Target::Shard(shard) => {
                self.ready_delay.insert(shard, delay);
            }
        }
    }

    /// Returns the extra READY delay of a shard, if a fault set one.
    pub(crate) fn ready_delay(&self, shard: u32) -> Option<Duration> {
        self.ready_delay
            .get(&shard)
            .copied()
            .or(self.ready_delay_all)
    }

    pub(crate) fn set_withhold(&mut self, target: Target, count: u32) {
        match target {
            Target::All => {
                self.withhold_all = Some(count);
                self.withhold.clear();
            }
            Target::Shard(shard) => {
                self.withhold.insert(shard, count);
            }
        }
    }

    /// Returns how many GUILD_CREATEs to leave out after this READY of `shard`. A shard-specific
    /// setting is used once; the `All` setting applies to every READY until changed.
    pub(crate) fn take_withhold(&mut self, shard: u32) -> u32 {
        self.withhold
            .remove(&shard)
            .or(self.withhold_all)
            .unwrap_or(0)
    }

    pub(crate) fn set_rate_limit(&mut self, target: Target, retry_after: Duration) {
        match target {
            Target::All => {
                self.rate_limit_all = Some(retry_after);
                self.rate_limit_all_used.clear();
            }
            Target::Shard(shard) => {
                self.rate_limit.insert(shard, retry_after);
            }
        }
    }

    /// Returns the forced `retry_after` for this all-members request of `shard`, once per shard.
    pub(crate) fn take_rate_limit(&mut self, shard: u32) -> Option<Duration> {
        if let Some(retry_after) = self.rate_limit.remove(&shard) {
            return Some(retry_after);
        }
        let retry_after = self.rate_limit_all?;
        self.rate_limit_all_used
            .insert(shard)
            .then_some(retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_parses_from_json() {
        let fault: Fault =
            serde_json::from_str(r#"{"kind":"delay_ready","delay":"250ms"}"#).unwrap();
        assert_eq!(
            fault,
            Fault::DelayReady {
                delay: Duration::from_millis(250)
            }
        );
        let error = serde_json::from_str::<Fault>(r#"{"kind":"delay_ready","delay":"soon"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"soon\""), "{error}");
    }

    #[test]
    fn shard_setting_overrides_all() {
        let mut state = FaultState::default();
        state.set_silent(Target::All, true);
        state.set_silent(Target::Shard(3), false);
        assert!(state.is_silent(1));
        assert!(!state.is_silent(3));
    }

    #[test]
    fn rate_limit_fault_fires_once_per_shard() {
        let mut state = FaultState::default();
        state.set_rate_limit(Target::All, Duration::from_secs(2));
        assert_eq!(state.take_rate_limit(1), Some(Duration::from_secs(2)));
        assert_eq!(state.take_rate_limit(1), None);
        assert_eq!(state.take_rate_limit(2), Some(Duration::from_secs(2)));
    }
}
