//! The stage of a shard, from dial to steady.

use std::fmt;

use crate::gateway::CloseCode;

/// Where a shard is on its way to steady. Each variant carries what the status command shows
/// about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardStage {
    /// Dialing the gateway and waiting for HELLO.
    Connecting,
    /// Connected, waiting for a stabilize permit before asking for the identify lease.
    WaitingForPermit,
    /// Connected, waiting for the identify lease of its bucket.
    WaitingForLease { bucket: u32 },
    /// IDENTIFY sent, waiting for READY.
    Identifying,
    /// RESUME sent, waiting for RESUMED.
    Resuming,
    /// READY received; GUILD_CREATEs of `pending` guilds still to come.
    StreamingGuilds { pending: u32 },
    /// Every guild arrived; holding the stabilize permit until the flood is absorbed.
    Stabilizing,
    /// Streaming live events.
    Steady,
    /// Disconnected, reconnecting after a backoff.
    Reconnecting { attempt: u32 },
    /// Stopped by a close code that must not be retried.
    Fatal { code: CloseCode },
    /// The Supervisor stopped restarting the shard: it failed too often in a short time.
    GaveUp { restarts: u32 },
}

impl ShardStage {
    /// Returns `true` once the shard streams live events with its backlog absorbed.
    pub const fn is_steady(&self) -> bool {
        matches!(self, Self::Steady)
    }

    /// Returns `true` for a shard that stopped for good.
    pub const fn is_fatal(&self) -> bool {
        matches!(self, Self::Fatal { .. } | Self::GaveUp { .. })
    }

    /// Returns the stage's name as logs, status output and the `shards` table show it.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::WaitingForPermit => "waiting_for_permit",
            Self::WaitingForLease { .. } => "waiting_for_lease",
            Self::Identifying => "identifying",
            Self::Resuming => "resuming",
            Self::StreamingGuilds { .. } => "streaming_guilds",
            Self::Stabilizing => "stabilizing",
            Self::Steady => "steady",
            Self::Reconnecting { .. } => "reconnecting",
            Self::Fatal { .. } => "fatal",
            Self::GaveUp { .. } => "gave_up",
        }
    }
}

impl fmt::Display for ShardStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WaitingForLease { bucket } => write!(f, "waiting_for_lease(bucket {bucket})"),
            Self::StreamingGuilds { pending } => write!(f, "streaming_guilds({pending} pending)"),
            Self::Reconnecting { attempt } => write!(f, "reconnecting(attempt {attempt})"),
            Self::Fatal { code } => write!(f, "fatal({code})"),
            Self::GaveUp { restarts } => write!(f, "gave_up(after {restarts} restarts)"),
            other => f.write_str(other.name()),
        }
    }
}
