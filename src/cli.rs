//! Command-line interface: `shardvisor sim` runs the gateway simulator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use actors::gateway::{Intents, Token};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::sim::world::WorldConfig;
use crate::sim::SimConfig;

/// Holds the Discord gateway shards of one large bot.
#[derive(Debug, Parser)]
#[command(name = "shardvisor", version, about)]
pub struct Cli {
    /// Log format on standard error [default: log.format of the configuration, else human].
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: bring every shard of the range up, print the summary, serve until a stop
    /// signal.
    Run(RunArgs),
    /// Run the Discord gateway simulator until Ctrl-C, then print its report as JSON.
    Sim(Box<SimArgs>),
}

/// Settings of `shardvisor run`. Everything else is in the configuration file.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file over the built-in defaults (the repository's config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Process name (process.name).
    #[arg(long)]
    pub name: Option<String>,
    /// Shard count of the bot (process.shards).
    #[arg(long)]
    pub shards: Option<u32>,
    /// First shard of this process (process.start).
    #[arg(long)]
    pub start: Option<u32>,
    /// One past the last shard of this process (process.stop).
    #[arg(long)]
    pub stop: Option<u32>,
    /// Exit right after the summary: 0 if every shard is steady with no identify violation, 1
    /// otherwise.
    #[arg(long)]
    pub exit_when_stable: bool,
}

/// Settings of `shardvisor sim`. Durations take units: "250ms", "5s", "1h".
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address of the HTTP API and the gateway.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address handed out as resume_gateway_url.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub resume_listen: SocketAddr,
    /// The only bot token the simulator accepts. It is never printed.
    #[arg(
        long,
        env = "SHARDVISOR_SIM_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bot token the simulator accepts.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Shard count of the simulated bot.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// Identify rate-limit buckets (Discord's max_concurrency).
    #[arg(long, default_value_t = 1)]
    pub max_concurrency: u32,
    /// Guilds across all shards.
    #[arg(long, default_value_t = 2000)]
    pub guilds: u32,
    /// Member count of the largest guild.
    #[arg(long, default_value_t = 250_000)]
    pub largest_guild: u32,
    /// Seed of the generated guilds and traffic.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Heartbeat interval sent in HELLO.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "41250ms")]
    pub heartbeat_interval: Duration,
    /// Silence after which a connection is closed with 4009 [default: interval + 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// One IDENTIFY per bucket per window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub identify_window: Duration,
    /// Daily session starts (session_start_limit.total).
    #[arg(long, default_value_t = 1000)]
    pub session_start_total: u32,
    /// Session starts left at start [default: the total].
    #[arg(long)]
    pub session_start_remaining: Option<u32>,
    /// Period after which the session starts reset.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub session_start_reset: Duration,
    /// Privileged intents enabled for the bot, comma-separated: guild_members, guild_presences,
    /// message_content, or none.
    #[arg(long, default_value = "guild_members,guild_presences,message_content", value_parser = parse_privileged)]
    pub privileged_intents: Intents,
    /// One all-members REQUEST_GUILD_MEMBERS per guild per window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub member_request_window: Duration,
    /// Client payloads allowed per send-limit window on one connection.
    #[arg(long, default_value_t = 120)]
    pub send_limit: u32,
    /// Window of the send limit.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub send_limit_window: Duration,
    /// Dispatches kept per session for replay on RESUME.
    #[arg(long, default_value_t = 10_000)]
    pub resume_buffer: usize,
    /// How long a session stays resumable after its connection ended.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    pub session_expiry: Duration,
    /// Steady dispatches per second per live session; 0 turns traffic off.
    #[arg(long, default_value_t = 1.0)]
    pub dispatch_rate: f64,
    /// Delay between an accepted IDENTIFY and READY.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub ready_delay: Duration,
    /// Delay between two GUILD_CREATEs after READY.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub guild_create_interval: Duration,
    /// Also write the final report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn parse_privileged(text: &str) -> Result<Intents, String> {
    let mut intents = Intents::default();
    for name in text
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        intents = intents
            | match name {
                "none" => Intents::default(),
                "guild_members" => Intents::GUILD_MEMBERS,
                "guild_presences" => Intents::GUILD_PRESENCES,
                "message_content" => Intents::MESSAGE_CONTENT,
                other => {
                    return Err(format!(
                        "unknown privileged intent {other:?}: use guild_members, guild_presences, message_content or none"
                    ))
                }
            };
    }
    Ok(intents)
}

impl SimArgs {
    /// Builds the simulator settings, reading the token from `--token`, the environment or
    /// `--token-file`.
    ///
    /// # Errors
    ///
    /// Returns a message naming the missing or unreadable token source.
    pub fn to_config(&self) -> Result<SimConfig, String> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Token::new(token.as_str()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    format!("failed to read the token file {}: {error}", path.display())
                })?;
                Token::new(text)
            }
            (None, None) => return Err(
                "missing simulator token: pass --token, --token-file or set SHARDVISOR_SIM_TOKEN"
                    .to_owned(),
            ),
        };
        if token.is_empty() {
            return Err("the simulator token is empty: pass a non-empty token".to_owned());
        }

        Ok(SimConfig {
            listen: self.listen,
            resume_listen: self.resume_listen,
            token,
            shards: self.shards,
            max_concurrency: self.max_concurrency,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self
                .heartbeat_timeout
                .unwrap_or(self.heartbeat_interval + Duration::from_secs(10)),
            identify_window: self.identify_window,
            session_start_total: self.session_start_total,
            session_start_remaining: self
                .session_start_remaining
                .unwrap_or(self.session_start_total),
            session_start_reset: self.session_start_reset,
            privileged_intents: self.privileged_intents,
            member_request_window: self.member_request_window,
            send_limit: self.send_limit,
            send_limit_window: self.send_limit_window,
            resume_buffer: self.resume_buffer,
            session_expiry: self.session_expiry,
            dispatch_rate: self.dispatch_rate,
            ready_delay: self.ready_delay,
            guild_create_interval: self.guild_create_interval,
            world: WorldConfig {
                seed: self.seed,
                guilds: self.guilds,
                shard_count: self.shards,
                largest_guild: self.largest_guild,
            },
        })
    }
}
