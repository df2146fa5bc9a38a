//! Settings of the simulator: every Discord window and rate, so tests can run Discord's rules at a
//! smaller time scale.

use std::net::SocketAddr;
use std::time::Duration;

use actors::gateway::{Intents, Token};

use super::world::WorldConfig;

/// Settings of one simulator. [`SimConfig::default`] has Discord's documented values.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address of the HTTP API and the gateway. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address handed out as `resume_gateway_url`. Port 0 picks a free port.
    pub resume_listen: SocketAddr,
    /// The only token accepted in IDENTIFY, RESUME and `Authorization: Bot <token>`.
    pub token: Token,
    /// Shard count of the bot. IDENTIFY must carry exactly this count (4010 otherwise), and
    /// `GET /gateway/bot` recommends it.
    pub shards: u32,
    /// Identify rate-limit buckets: a shard's bucket is `shard_id % max_concurrency`.
    pub max_concurrency: u32,
    /// Sent in HELLO. Discord: 41.25 s.
    pub heartbeat_interval: Duration,
    /// Silence after which a connection is closed with 4009 and its session dropped. Discord does
    /// not document it; the default is one interval plus 10 s.
    pub heartbeat_timeout: Duration,
    /// One IDENTIFY per bucket per window. Discord: 5 s.
    pub identify_window: Duration,
    /// `session_start_limit.total`. Discord: 1000 for most bots.
    pub session_start_total: u32,
    /// `session_start_limit.remaining` at start.
    pub session_start_remaining: u32,
    /// Period after which `remaining` resets to `total`. Discord: 24 h.
    pub session_start_reset: Duration,
    /// Privileged intents enabled for the bot; IDENTIFY with another privileged intent gets 4014.
    pub privileged_intents: Intents,
    /// One all-members REQUEST_GUILD_MEMBERS per guild per window. Discord: 30 s.
    pub member_request_window: Duration,
    /// Client sends allowed per [`SimConfig::send_limit_window`] on a connection. Discord: 120.
    pub send_limit: u32,
    /// Discord: 60 s.
    pub send_limit_window: Duration,
    /// Dispatches kept per session for replay on RESUME.
    pub resume_buffer: usize,
    /// How long a session stays resumable after its connection ended.
    pub session_expiry: Duration,
    /// Steady dispatches per second per live session; 0 turns the traffic off.
    pub dispatch_rate: f64,
    /// Delay between an accepted IDENTIFY and READY.
    pub ready_delay: Duration,
    /// Delay between two GUILD_CREATEs after READY; zero streams them at once.
    pub guild_create_interval: Duration,
    /// Guilds, members and their traffic.
    pub world: WorldConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        let heartbeat_interval = Duration::from_millis(41_250);
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            resume_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: Token::new("simulator-token"),
            shards: 1,
            max_concurrency: 1,
            heartbeat_interval,
            heartbeat_timeout: heartbeat_interval + Duration::from_secs(10),
            identify_window: Duration::from_secs(5),
            session_start_total: 1000,
            session_start_remaining: 1000,
            session_start_reset: Duration::from_secs(24 * 60 * 60),
            privileged_intents: Intents::PRIVILEGED,
            member_request_window: Duration::from_secs(30),
            send_limit: 120,
            send_limit_window: Duration::from_secs(60),
            resume_buffer: 10_000,
            session_expiry: Duration::from_secs(120),
            dispatch_rate: 1.0,
            ready_delay: Duration::ZERO,
            guild_create_interval: Duration::ZERO,
            world: WorldConfig {
                seed: 1,
                guilds: 100,
                shard_count: 1,
                largest_guild: 250_000,
            },
        }
    }
}

/// An invalid simulator setting.
#[derive(Debug, thiserror::Error)]
#[error("invalid simulator setting {key} = {value}: {fix}")]
pub struct ConfigError {
    pub key: &'static str,
    pub value: String,
    pub fix: &'static str,
}

impl SimConfig {
    /// Checks the settings and aligns the world's shard count with `shards`.
    ///
    /// # Errors
    ///
    /// Returns the first invalid setting, with its value and the fix.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let error = |key, value: String, fix| Err(ConfigError { key, value, fix });
        if self.shards == 0 {
            return error("shards", "0".into(), "use at least 1");
        }
        if self.max_concurrency == 0 {
            return error("max_concurrency", "0".into(), "use at least 1");
        }
        if self.identify_window.is_zero() {
            return error(
                "identify_window",
                "0".into(),
                "use a positive duration; Discord's is 5s",
            );
        }
        if self.heartbeat_interval.is_zero() {
            return error("heartbeat_interval", "0".into(), "use a positive duration");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return error(
                "heartbeat_timeout",
                format!("{:?}", self.heartbeat_timeout),
                "use more than heartbeat_interval, or clients time out between two beats",
            );
        }
        if self.session_start_remaining > self.session_start_total {
            return error(
                "session_start_remaining",
                self.session_start_remaining.to_string(),
                "use at most session_start_total",
            );
        }
        if self.send_limit == 0 || self.send_limit_window.is_zero() {
            return error(
                "send_limit",
                format!("{} per {:?}", self.send_limit, self.send_limit_window),
                "use a positive count and window",
            );
        }
        if self.resume_buffer == 0 {
            return error("resume_buffer", "0".into(), "use at least 1");
        }
        if !self.dispatch_rate.is_finite() || self.dispatch_rate < 0.0 {
            return error(
                "dispatch_rate",
                self.dispatch_rate.to_string(),
                "use a finite rate of 0 or more events per second",
            );
        }
        if self.privileged_intents.0 & !Intents::PRIVILEGED.0 != 0 {
            return error(
                "privileged_intents",
                self.privileged_intents.0.to_string(),
                "use only the privileged bits GUILD_MEMBERS, GUILD_PRESENCES and MESSAGE_CONTENT",
            );
        }
        if self.world.largest_guild < 2 {
            return error(
                "largest_guild",
                self.world.largest_guild.to_string(),
                "use at least 2 members",
            );
        }
        self.world.shard_count = self.shards;
        Ok(self)
    }
}
