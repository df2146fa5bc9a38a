//! A Discord gateway simulator on loopback, strict enough to judge a client by.
//!
//! It serves `GET /api/v10/gateway/bot` and the WebSocket gateway (`?v=10&encoding=json`, optional
//! `compress=zlib-stream`) on one address, and the same gateway on a second address handed out as
//! `resume_gateway_url`. It enforces Discord's rules with configurable times ([`SimConfig`]),
//! records what a client did ([`Report`]) and takes injected faults ([`Fault`]).
//!
//! - [`config`]: every window and rate.
//! - [`world`]: the generated guilds and the steady traffic.
//! - [`session`]: sequence numbers and the replay buffer.
//! - `server` and `connection`: the HTTP API and the gateway protocol of one connection.
//! - `writer`: the task that writes a connection's frames in order, apart from its read loop.
//! - `stream`: READY, GUILD_CREATEs, steady traffic and member chunks of a session.
//! - [`fault`] and [`report`]: what tests inject and what they read back.

pub mod config;
mod connection;
pub mod fault;
mod identify;
pub mod report;
mod server;
mod session;
mod stream;
pub mod world;
mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, SimConfig};
pub use fault::{Fault, Target};
pub use report::{Report, ViolationKind};

use fault::FaultState;
use identify::IdentifyState;
use report::Recorder;
use session::{Outgoing, OutgoingSender, Session};
use world::ShardWorld;

/// A connection that can be reached by faults and by the session-start limit.
pub(crate) struct ConnectionHandle {
    pub(crate) shard: Option<u32>,
    pub(crate) session: Option<Arc<Session>>,
    pub(crate) sender: OutgoingSender,
}

/// State shared by the listeners, connections and traffic tasks of one simulator.
pub(crate) struct Shared {
    pub(crate) config: SimConfig,
    pub(crate) recorder: Recorder,
    pub(crate) worlds: Vec<Mutex<ShardWorld>>,
    pub(crate) sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub(crate) connections: Mutex<HashMap<u64, ConnectionHandle>>,
    pub(crate) identify: Mutex<IdentifyState>,
    pub(crate) faults: Mutex<FaultState>,
    /// When each guild's all-members window opened.
    pub(crate) member_windows: Mutex<HashMap<u64, Instant>>,
    pub(crate) gateway_url: String,
    pub(crate) resume_url: String,
    pub(crate) shutdown: CancellationToken,
}

/// Locks a mutex, taking the data of a poisoned one: a panicking connection task must not stop
/// the whole simulator.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Returns the session with this id, if it is still known.
    pub(crate) fn session(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(id).cloned()
    }

    /// Sends `outgoing` to every identified connection of the target; returns how many.
    fn send_to(&self, target: Target, outgoing: impl Fn() -> Outgoing) -> usize {
        let connections = lock(&self.connections);
        connections
            .values()
            .filter(|handle| handle.shard.is_some_and(|shard| target.matches(shard)))
            .filter(|handle| handle.sender.send(outgoing()).is_ok())
            .count()
    }

    /// Drops every session of the target so that RESUME fails; returns how many.
    fn expire_sessions(&self, target: Target) -> usize {
        let expired: Vec<Arc<Session>> = lock(&self.sessions)
            .values()
            .filter(|session| target.matches(session.shard))
            .cloned()
            .collect();
        for session in &expired {
            session.invalidate(&self.recorder);
        }
        expired.len()
    }
}

/// A running simulator. Dropping it does not stop it: call [`Simulator::shutdown`].
pub struct Simulator {
    shared: Arc<Shared>,
    address: SocketAddr,
    resume_address: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    resume: Mutex<server::ResumeListener>,
}

impl Simulator {
    /// Binds both addresses, generates the world and starts serving.
    ///
    /// # Errors
    ///
    /// Returns an error for an invalid setting or an address that cannot be bound.
    pub async fn start(config: SimConfig) -> Result<Self, StartError> {
        let config = config.validate()?;
        let listener = bind(config.listen).await?;
        let resume_listener = bind(config.resume_listen).await?;
        let address = listener.local_addr()?;
        let resume_address = resume_listener.local_addr()?;

        let worlds = world::generate(&config.world)
            .into_iter()
            .map(Mutex::new)
            .collect();
        let started = Instant::now();
        let shared = Arc::new(Shared {
            identify: Mutex::new(IdentifyState::new(&config, started)),
            recorder: Recorder::new(started),
            worlds,
            sessions: Mutex::default(),
            connections: Mutex::default(),
            faults: Mutex::default(),
            member_windows: Mutex::default(),
            gateway_url: format!("ws://{address}"),
            resume_url: format!("ws://{resume_address}"),
            shutdown: CancellationToken::new(),
            config,
        });
        shared.recorder.update(|report| {
            report.session_start_remaining = shared.config.session_start_remaining;
        });

        let main = tokio::spawn(server::serve(listener, shared.clone(), false));
        let resume = server::ResumeListener::start(resume_listener, shared.clone())?;
        let expiry = tokio::spawn(identify::expire_sessions(shared.clone()));
        tracing::info!(%address, %resume_address, shards = shared.config.shards, "gateway simulator started");

        Ok(Self {
            shared,
            address,
            resume_address,
            tasks: vec![main, expiry],
            resume: Mutex::new(resume),
        })
    }

    /// Returns the address of the HTTP API and the gateway.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the address handed out as `resume_gateway_url`.
    pub fn resume_address(&self) -> SocketAddr {
        self.resume_address
    }

    /// Returns the base URL of the HTTP API, e.g. `http://127.0.0.1:4000/api/v10`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v10", self.address)
    }

    /// Returns the gateway URL as `GET /gateway/bot` gives it (no query string).
    pub fn gateway_url(&self) -> &str {
        &self.shared.gateway_url
    }

    /// Returns the resume URL as READY gives it (no query string).
    pub fn resume_url(&self) -> &str {
        &self.shared.resume_url
    }

    /// Returns the settings in use.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Returns a copy of everything recorded so far.
    pub fn report(&self) -> Report {
        self.shared.recorder.snapshot()
    }

    /// Returns the ids of a shard's guilds, sorted (guilds joined by the traffic included).
    pub fn guild_ids(&self, shard: u32) -> Vec<actors::gateway::Snowflake> {
        self.shared
            .worlds
            .get(shard as usize)
            .map(|world| lock(world).guild_ids())
            .unwrap_or_default()
    }

    /// Returns a guild as its GUILD_CREATE would carry it now (every intent, `large_threshold`
    /// 250, so a large guild lists only some members), or `None` for an unknown guild.
    pub fn guild(&self, guild_id: actors::gateway::Snowflake) -> Option<serde_json::Value> {
        let shard = actors::gateway::shard_for_guild(guild_id.get(), self.shared.config.shards);
        let world = lock(self.shared.worlds.get(shard as usize)?);
        let data = world.guild_create(guild_id, 250, actors::gateway::Intents::ALL)?;
        serde_json::from_str(data.get()).ok()
    }

    /// Returns every member of a guild, as the chunks of an all-members request list them.
    pub fn members(&self, guild_id: actors::gateway::Snowflake) -> Vec<serde_json::Value> {
        let shard = actors::gateway::shard_for_guild(guild_id.get(), self.shared.config.shards);
        let Some(world) = self.shared.worlds.get(shard as usize) else {
            return Vec::new();
        };
        let world = lock(world);
        let request = actors::gateway::RequestGuildMembers::all_members(guild_id, None);
        let Some(plan) = world.plan_member_request(&request, actors::gateway::Intents::ALL) else {
            return Vec::new();
        };
        let mut members = Vec::new();
        for index in 0..plan.chunk_count() {
            let chunk = world.member_chunk(&plan, index);
            if let Ok(mut chunk) = serde_json::from_str::<serde_json::Value>(chunk.get()) {
                if let Some(serde_json::Value::Array(list)) =
                    chunk.get_mut("members").map(serde_json::Value::take)
                {
                    members.extend(list);
                }
            }
        }
        members
    }

    /// Injects a fault. Returns how many connections or sessions it hit (for standing faults,
    /// the number of shards it applies to, with `All` counted as the shard count).
    pub fn inject(&self, target: Target, fault: Fault) -> usize {
        tracing::info!(?target, ?fault, "injecting fault");
        let shared = &self.shared;
        let target_size = match target {
            Target::All => shared.config.shards as usize,
            Target::Shard(_) => 1,
        };
        match fault {
            Fault::Reconnect => shared.send_to(target, || {
                Outgoing::Frame(actors::gateway::ServerPayload::Reconnect.encode().into())
            }),
            Fault::InvalidSession { resumable } => {
                if !resumable {
                    shared.expire_sessions(target);
                }
                shared.send_to(target, || {
                    Outgoing::Frame(
                        actors::gateway::ServerPayload::InvalidSession { resumable }
                            .encode()
                            .into(),
                    )
                })
            }
            Fault::Close { code } => shared.send_to(target, || Outgoing::Close {
                code,
                reason: "closed by an injected fault".to_owned(),
            }),
            Fault::Drop => shared.send_to(target, || Outgoing::Drop),
            Fault::RequestHeartbeat => shared.send_to(target, || {
                Outgoing::Frame(actors::gateway::ServerPayload::Heartbeat.encode().into())
            }),
            Fault::SilenceHeartbeats { silent } => {
                lock(&shared.faults).set_silent(target, silent);
                target_size
            }
            Fault::DelayReady { delay } => {
                lock(&shared.faults).set_ready_delay(target, delay);
                target_size
            }
            Fault::WithholdGuilds { count } => {
                lock(&shared.faults).set_withhold(target, count);
                target_size
            }
            Fault::RateLimitMembers { retry_after } => {
                lock(&shared.faults).set_rate_limit(target, retry_after);
                target_size
            }
            Fault::ExpireSessions => shared.expire_sessions(target),
            Fault::RefuseResumeAddress { refuse } => {
                let mut resume = lock(&self.resume);
                if refuse {
                    resume.refuse();
                } else if let Err(error) = resume.accept(self.resume_address, shared.clone()) {
                    tracing::warn!(%error, address = %self.resume_address, "failed to reopen the resume address");
                    return 0;
                }
                1
            }
        }
    }

    /// Stops serving: closes every connection without a close frame and ends every task.
    /// Returns the final report.
    pub async fn shutdown(mut self) -> Report {
        self.shared.shutdown.cancel();
        self.shared.send_to(Target::All, || Outgoing::Drop);
        lock(&self.resume).refuse();
        let report = self.report();
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
        report
    }
}

impl Drop for Simulator {
    /// Stops the tasks of a simulator dropped without [`Simulator::shutdown`] (a failed start,
    /// a panicking test), rather than leaving them to fail on closed sockets.
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Failure to start a simulator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("failed to bind the simulator address: {0}")]
    Bind(#[from] std::io::Error),
}

async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("failed to bind {address}: {error}; pick a free port or use port 0"),
        )
    })
}
