//! The ports the actors write through: the guild-state cache and the event output. The service
//! provides the adapters (in memory, PostgreSQL, Redis); the actors see only these traits.

use async_trait::async_trait;
use serde_json::value::RawValue;

/// A failure of the state store or the event sink.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The backend is unreachable or failed; the write can be retried.
    #[error("{backend} unavailable: {source}")]
    Unavailable {
        backend: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The event cannot be applied; retrying will not help.
    #[error("invalid {event} payload{}: {reason}", guild.map(|g| format!(" for guild {g}")).unwrap_or_default())]
    InvalidEvent {
        event: String,
        guild: Option<u64>,
        reason: String,
    },
}

/// What applying a dispatch to the cache found out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The event was a GUILD_CREATE for a guild the cache did not hold.
    pub new_guild: bool,
}

/// The persisted state of one shard, keyed by shard id and process name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardRecord {
    pub shard: u32,
    /// Process name (`--name`): several processes may run the same shard ids for different bots.
    pub name: String,
    /// Sequence of the newest dispatch whose effects are stored and pushed.
    pub seq: u64,
    pub session_id: Option<String>,
    pub resume_url: Option<String>,
    /// The shard's stage, as shown by the status command.
    pub status: String,
}

/// Row counts of the cache, for summaries and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheTotals {
    pub guilds: u64,
    pub members: u64,
}

/// The guild-state cache.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Applies one dispatch (GUILD_CREATE, member chunks and every other cached event). Events the
    /// cache does not keep are accepted and ignored.
    ///
    /// # Errors
    ///
    /// [`PortError::InvalidEvent`] for a payload that cannot be applied (the rest of the stream
    /// goes on), [`PortError::Unavailable`] when the backend failed.
    async fn apply(&self, shard: u32, event: &str, data: &RawValue) -> Result<Applied, PortError>;

    /// Returns the cached member count of a guild, read in O(1), or `None` for a guild not cached.
    async fn member_count(&self, guild_id: u64) -> Result<Option<u64>, PortError>;

    /// Returns up to `limit` cached guild ids greater than `cursor`, ascending.
    async fn guild_ids_after(&self, cursor: u64, limit: u32) -> Result<Vec<u64>, PortError>;

    /// Returns the stored state of a shard, if any.
    async fn load_shard(&self, shard: u32, name: &str) -> Result<Option<ShardRecord>, PortError>;

    /// Stores the state of a shard. A store that writes in batches commits the record after
    /// every write applied before this call, so a stored sequence never runs ahead of the cache.
    async fn save_shard(&self, record: &ShardRecord) -> Result<(), PortError>;

    /// Returns the cache's row counts.
    async fn totals(&self) -> Result<CacheTotals, PortError>;
}

/// The event output for downstream workers.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Pushes one dispatch's data under its event name.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the event could not be accepted.
    async fn push(&self, event: &str, data: &RawValue) -> Result<(), PortError>;

    /// Returns once every event pushed before the call has been accepted by every target. A
    /// shard calls it before it saves its sequence, so a stored sequence never passes an event
    /// that was not delivered.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when a target could not take the events in time; the caller
    /// retries.
    async fn flush(&self) -> Result<(), PortError> {
        Ok(())
    }
}

/// Where the Sweeper keeps its position, so a restart goes on where it stopped.
#[async_trait]
pub trait CursorStore: Send + Sync + 'static {
    /// Returns the stored cursor of a process, or `None` before the first save.
    async fn load_cursor(&self, name: &str) -> Result<Option<u64>, PortError>;

    /// Stores the cursor of a process.
    async fn save_cursor(&self, name: &str, cursor: u64) -> Result<(), PortError>;
}
