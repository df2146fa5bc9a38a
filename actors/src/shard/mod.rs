//! The ShardActor: one gateway connection, from dial to steady, with its heartbeats, its session
//! and its reconnects.
//!
//! A shard dials and reads HELLO before it asks for anything, so the identify lease covers only
//! the pacing window. A shard that will request members first takes a stabilize permit. A shard
//! with a stored session resumes and skips both. Timers (stabilize hold, guild wait, member
//! retries) are messages the actor sends itself, tagged with the connection they belong to, and
//! they die with the actor. Heartbeats belong to the connection's own tasks, so that a shard
//! waiting on its store or sink keeps its session.

mod connection;
mod dispatch;
mod heartbeat;
mod stage;
mod state;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;

pub use dispatch::needs_member_backfill;
pub use stage::ShardStage;

use crate::backoff::Backoff;
use crate::coordinator::Lease;
use crate::gate::Permit;
use crate::gateway::close::CloseInitiator;
use crate::gateway::{Intents, Token};
use crate::store::{EventSink, StateStore};
use connection::{DialError, Dialed, Incoming};
use state::ShardState;

/// The origin of a member request; it only labels logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRequestReason {
    /// The cached member count diverged from Discord's at GUILD_CREATE, or the guild was cold.
    Backfill,
    /// The Sweeper's periodic pass.
    Sweep,
    /// An operator asked for it.
    Admin,
}

/// How a shard decides its post-READY flood is absorbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StabilizeMode {
    /// Hold the permit for this long after READY.
    Fixed(Duration),
}

/// A shard as the status command shows it.
#[derive(Clone, Debug)]
pub struct ShardStatus {
    pub shard: u32,
    pub stage: ShardStage,
    pub session_id: Option<String>,
    pub seq: u64,
    /// Milliseconds since the last heartbeat ACK on this connection.
    pub last_ack_ms_ago: Option<u64>,
    /// Round trip of the last acknowledged heartbeat, in milliseconds.
    pub latency_ms: Option<u64>,
    /// Guilds of the last READY.
    pub guilds: u32,
    /// Member requests sent and not yet answered by their last chunk.
    pub outstanding_member_requests: u32,
    /// Dispatches the gateway skipped (sequence gaps) since this actor started.
    pub missed_events: u64,
}

/// Everything a ShardActor needs, built by the Supervisor for each incarnation.
#[derive(Clone)]
pub struct ShardArgs {
    pub shard: u32,
    pub shard_count: u32,
    /// Identify buckets of the bot (`max_concurrency` of `GET /gateway/bot`).
    pub max_concurrency: u32,
    /// Process name: the key of this shard's stored session.
    pub name: String,
    pub token: Token,
    /// Gateway URL from `GET /gateway/bot`, without the query string.
    pub gateway_url: String,
    /// Ask for `zlib-stream` transport compression.
    pub compress: bool,
    pub intents: Intents,
    pub large_threshold: u32,
    /// Request guild members after READY (needs the GUILD_MEMBERS intent). Shards that do not
    /// skip the stabilize gate.
    pub request_members: bool,
    /// Request members of a cached guild when `|discord - cached| / discord` exceeds this; 0
    /// requests only for cold guilds.
    pub divergence_ratio: f64,
    pub stabilize: StabilizeMode,
    /// Cap on any stabilize hold.
    pub stabilize_max: Duration,
    /// How long to wait for the GUILD_CREATEs READY promised before counting the rest as
    /// unavailable.
    pub guild_timeout: Duration,
    /// Dial and HELLO must complete within this.
    pub connect_timeout: Duration,
    pub reconnect_backoff: Backoff,
    /// After op 9, Discord asks clients to wait 1 to 5 seconds; the wait is random up to this.
    pub invalid_session_wait: Duration,
    /// Discord's window for all-members requests of one guild (30 s); a second request inside
    /// it is deferred until the window has passed.
    pub member_request_window: Duration,
    /// No member request goes out before this. A process that follows another one of the same
    /// shards cannot know which guilds that one requested within the window, so it waits one
    /// window.
    pub member_requests_after: Option<std::time::Instant>,
    /// Save the session every this many dispatches (and on every stage change).
    pub save_every: u64,
    pub store: Arc<dyn StateStore>,
    pub sink: Arc<dyn EventSink>,
    /// Receives every stage change, for the Supervisor's progress view.
    pub stage: watch::Sender<ShardStage>,
}

/// Messages a ShardActor accepts.
pub enum ShardMsg {
    /// Request every member of a guild of this shard.
    RequestMembers {
        guild_id: u64,
        reason: MemberRequestReason,
    },
    /// Report the shard's status.
    Status(RpcReplyPort<ShardStatus>),
    /// Save the session and close with a resumable code, then reply whether the session was
    /// saved. The actor stays parked until it is stopped.
    Shutdown(RpcReplyPort<bool>),
    /// Connection events and timers; sent by the actor's own tasks only.
    Event(ShardEvent),
}

/// An event from a ShardActor's own tasks and timers; other actors cannot make one.
pub struct ShardEvent(Event);

impl From<Event> for ShardMsg {
    fn from(event: Event) -> Self {
        Self::Event(ShardEvent(event))
    }
}

/// Events from the actor's own tasks and timers. Each names the connection it belongs to.
pub(crate) enum Event {
    Connect,
    Dialed {
        connection: u64,
        via_resume_url: bool,
        result: Result<Dialed, DialError>,
    },
    Frame {
        connection: u64,
        incoming: Incoming,
    },
    ReaderEnded {
        connection: u64,
        end: CloseInitiator,
    },
    /// The connection's heartbeat task found a beat unacknowledged for a whole interval.
    Zombie {
        connection: u64,
        interval: Duration,
    },
    PermitGranted {
        permit: Permit,
    },
    LeaseGranted {
        lease: Lease,
    },
    StabilizeElapsed {
        connection: u64,
    },
    GuildsTimedOut {
        connection: u64,
    },
    RetryMembers {
        guild_id: u64,
    },
    /// A member request left the socket.
    MemberRequestWritten {
        connection: u64,
        guild_id: u64,
    },
    /// The member request window of a guild whose request was deferred has passed.
    DeferredMembers {
        guild_id: u64,
        reason: MemberRequestReason,
    },
}

/// The ShardActor.
pub struct ShardActor;

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ShardArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let state = ShardState::load(myself.clone(), args).await?;
        myself.cast(ShardMsg::from(Event::Connect))?;
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop().await;
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ShardMsg::RequestMembers { guild_id, reason } => {
                state.request_cached_members(guild_id, reason).await;
            }
            ShardMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            ShardMsg::Shutdown(reply) => {
                let saved = state.shutdown().await;
                let _ = reply.send(saved);
            }
            ShardMsg::Event(ShardEvent(event)) => state.on_event(event).await,
        }
        Ok(())
    }
}
