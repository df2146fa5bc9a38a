//! The Discord gateway protocol as shardvisor speaks it, on both sides of the connection.
//!
//! - [`opcode`]: the opcodes of gateway payloads.
//! - [`payload`]: typed payloads for every opcode a bot sends or receives, and the frame
//!   envelope around them. Dispatch data that the product only forwards stays raw JSON.
//! - [`close`]: the close codes and the one place that decides resume, new session or fatal.
//! - [`compression`]: the `zlib-stream` transport compression, one context per connection.
//! - [`token`]: the bot token, which never prints.
//! - [`intents`]: gateway intent bits and the privileged ones.
//! - [`snowflake`]: Discord ids, which travel as strings.

pub mod close;
pub mod compression;
pub mod events;
pub mod intents;
pub mod opcode;
pub mod payload;
pub mod snowflake;
pub mod token;

pub use close::{CloseAction, CloseCode};
pub use compression::{Deflater, InflateError, Inflater, ZLIB_SUFFIX};
pub use intents::Intents;
pub use opcode::OpCode;
pub use payload::{
    ClientPayload, DecodeError, Dispatch, Frame, GuildMembersChunkHeader, Hello, Identify,
    IdentifyProperties, RateLimited, RateLimitedMeta, Ready, RequestGuildMembers, Resume,
    ServerPayload, SessionStartLimit, UnavailableGuild,
};
pub use snowflake::Snowflake;
pub use token::Token;

/// Gateway API version this product speaks.
pub const API_VERSION: u8 = 10;

/// Largest payload a client may send, in bytes. Discord closes a connection with 4002 above it.
pub const MAX_CLIENT_PAYLOAD_BYTES: usize = 4096;

/// Commands a client may send per [`SEND_LIMIT_WINDOW`] on one connection, heartbeats included.
/// Discord closes the connection with 4008 when a client exceeds it.
pub const SEND_LIMIT: u32 = 120;

/// Window of [`SEND_LIMIT`].
pub const SEND_LIMIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Window within which Discord accepts one IDENTIFY per rate-limit bucket.
pub const IDENTIFY_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// Returns the shard that receives the events of a guild: `(guild_id >> 22) % shard_count`.
///
/// # Panics
///
/// Panics if `shard_count` is 0.
pub const fn shard_for_guild(guild_id: u64, shard_count: u32) -> u32 {
    ((guild_id >> 22) % shard_count as u64) as u32
}

/// Returns the identify rate-limit bucket of a shard: `shard_id % max_concurrency`.
///
/// # Panics
///
/// Panics if `max_concurrency` is 0.
pub const fn identify_bucket(shard_id: u32, max_concurrency: u32) -> u32 {
    shard_id % max_concurrency
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_for_guild_uses_timestamp_bits() {
        // 41771983423143937 is the example guild id of Discord's sharding documentation.
        let guild_id = 41_771_983_423_143_937;
        assert_eq!(guild_id >> 22, 9_959_216_934);
        assert_eq!(
            shard_for_guild(guild_id, 16),
            (9_959_216_934_u64 % 16) as u32
        );
        assert_eq!(shard_for_guild(guild_id, 1), 0);
    }

    #[test]
    fn identify_bucket_is_modulo_concurrency() {
        assert_eq!(identify_bucket(0, 16), 0);
        assert_eq!(identify_bucket(17, 16), 1);
        assert_eq!(identify_bucket(5, 1), 0);
    }
}
