//! The ShardActor's state and its connection lifecycle: dial, permit, lease, IDENTIFY or RESUME,
//! heartbeats, reconnects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::connection::{self, Command, Link, Outgoing};
use super::{
    Event, MemberRequestReason, ShardArgs, ShardMsg, ShardStage, ShardStatus, StabilizeMode,
};
use crate::coordinator::{CoordinatorMsg, Lease};
use crate::gate::{GateMsg, Permit};
use crate::gateway::close::{CloseAction, CloseInitiator};
use crate::gateway::{
    ClientPayload, CloseCode, Identify, IdentifyProperties, RequestGuildMembers, Resume,
    ServerPayload, Snowflake,
};
use crate::names;
use crate::store::ShardRecord;

/// A session that can be resumed.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub(crate) id: String,
    /// Where to RESUME; `None` after it failed, to fall back to the gateway URL.
    pub(crate) resume_url: Option<String>,
}

/// Progress of the GUILD_CREATEs after READY.
#[derive(Default)]
pub(crate) struct GuildProgress {
    pub(crate) total: u32,
    pub(crate) pending: HashSet<u64>,
    pub(crate) timer: Option<JoinHandle<()>>,
}

/// State of one ShardActor incarnation.
pub struct ShardState {
    pub(crate) args: ShardArgs,
    pub(crate) myself: ActorRef<ShardMsg>,
    pub(crate) stage: ShardStage,
    pub(crate) session: Option<Session>,
    /// Sequence of the newest dispatch stored and pushed.
    pub(crate) seq: u64,
    /// Number of the current connection attempt; events of older ones are dropped.
    pub(crate) connection: u64,
    pub(crate) link: Option<Link>,
    /// READY or RESUMED arrived on the current connection; before that the gateway closes a
    /// connection that sends anything but heartbeats, IDENTIFY and RESUME.
    pub(crate) authenticated: bool,
    dial: Option<JoinHandle<()>>,
    reconnect_timer: Option<JoinHandle<()>>,
    /// Consecutive reconnects without a connection that lasted [`STABLE_CONNECTION`] after
    /// READY or RESUMED.
    attempt: u32,
    /// When READY or RESUMED arrived on the current connection.
    connected_at: Option<Instant>,
    pub(crate) permit: Option<Permit>,
    permit_task: Option<JoinHandle<()>>,
    lease_task: Option<JoinHandle<()>>,
    pub(crate) guilds: GuildProgress,
    /// The stabilize hold after READY is over (or was never needed).
    pub(crate) stabilized: bool,
    stabilize_timer: Option<JoinHandle<()>>,
    /// Member requests sent and not yet answered by their last chunk, by guild, with the nonce.
    pub(crate) outstanding: BTreeMap<u64, String>,
    nonce_counter: u64,
    /// When each guild's members were last requested; a new request inside Discord's window
    /// would only be answered with RATE_LIMITED.
    last_requested: HashMap<u64, Instant>,
    /// Member requests waiting for the window of their guild to pass, with their timers.
    pub(crate) deferred: HashMap<u64, JoinHandle<()>>,
    /// Dispatches since the session was last saved.
    pub(crate) unsaved: u64,
    /// Dispatches skipped by sequence gaps, over this incarnation's life.
    pub(crate) missed_events: u64,
    parked: bool,
}

impl ShardState {
    /// Builds the state, resuming the stored session if there is one.
    pub(crate) async fn load(
        myself: ActorRef<ShardMsg>,
        args: ShardArgs,
    ) -> Result<Self, ActorProcessingErr> {
        let stored = args.store.load_shard(args.shard, &args.name).await?;
        let (session, seq) = match stored {
            Some(ShardRecord {
                session_id: Some(id),
                seq,
                resume_url,
                ..
            }) if seq > 0 => {
                tracing::info!(shard = args.shard, seq, "resuming stored session");
                (Some(Session { id, resume_url }), seq)
            }
            _ => (None, 0),
        };

        Ok(Self {
            args,
            myself,
            stage: ShardStage::Connecting,
            session,
            seq,
            connection: 0,
            link: None,
            authenticated: false,
            dial: None,
            reconnect_timer: None,
            attempt: 0,
            connected_at: None,
            permit: None,
            permit_task: None,
            lease_task: None,
            guilds: GuildProgress::default(),
            stabilized: true,
            stabilize_timer: None,
            outstanding: BTreeMap::new(),
            nonce_counter: 0,
            last_requested: HashMap::new(),
            deferred: HashMap::new(),
            unsaved: 0,
            missed_events: 0,
            parked: false,
        })
    }

    pub(crate) async fn on_event(&mut self, event: Event) {
        if self.parked {
            return;
        }
        match event {
            Event::Connect => self.connect(),
            Event::Dialed {
                connection,
                via_resume_url,
                result,
            } => {
                if connection == self.connection {
                    self.dialed(via_resume_url, result);
                }
            }
            Event::Frame {
                connection,
                incoming,
            } => {
                if connection == self.connection && self.link.is_some() {
                    self.on_payload(incoming.payload).await;
                }
            }
            Event::ReaderEnded { connection, end } => {
                if connection == self.connection && self.link.is_some() {
                    self.connection_ended(end).await;
                }
            }
            Event::Zombie {
                connection,
                interval,
            } => {
                if connection == self.connection && self.link.is_some() {
                    tracing::info!(
                        shard = self.args.shard,
                        interval_ms = interval.as_millis() as u64,
                        "no heartbeat ACK since the last beat; zombie connection, resuming"
                    );
                    self.close_link(CloseCode::RESUMABLE_CLIENT_CLOSE);
                    self.schedule_reconnect();
                }
            }
            Event::PermitGranted { permit } => self.permit_granted(permit),
            Event::LeaseGranted { lease } => self.lease_granted(lease).await,
            Event::StabilizeElapsed { connection } => {
                if connection == self.connection {
                    self.stabilize_elapsed().await;
                }
            }
            Event::GuildsTimedOut { connection } => {
                if connection == self.connection {
                    self.guilds_timed_out().await;
                }
            }
            Event::RetryMembers { guild_id } => self.send_member_request(guild_id),
            Event::MemberRequestWritten {
                connection,
                guild_id,
            } => {
                // Discord's window runs from the request's arrival; the write is the closest
                // moment the shard can know.
                if connection == self.connection {
                    self.last_requested.insert(guild_id, Instant::now());
                }
            }
            Event::DeferredMembers { guild_id, reason } => {
                self.deferred.remove(&guild_id);
                if self.outstanding.contains_key(&guild_id) {
                    self.send_or_defer(guild_id, reason);
                } else {
                    self.request_cached_members(guild_id, reason).await;
                }
            }
        }
    }

    /// Sets the stage and publishes it.
    pub(crate) fn set_stage(&mut self, stage: ShardStage) {
        if self.stage != stage {
            tracing::debug!(shard = self.args.shard, from = %self.stage, to = %stage, "stage changed");
            self.stage = stage.clone();
            self.args.stage.send_replace(stage);
        }
    }

    /// Starts a new connection attempt: to the resume URL if there is a session with one, to the
    /// gateway URL otherwise.
    fn connect(&mut self) {
        self.reconnect_timer = None;
        self.connection += 1;
        let connection = self.connection;
        self.set_stage(ShardStage::Connecting);

        let resume_url = self.session.as_ref().and_then(|s| s.resume_url.clone());
        let via_resume_url = resume_url.is_some();
        let base = resume_url.unwrap_or_else(|| self.args.gateway_url.clone());
        let url = connection::connect_url(&base, self.args.compress);
        let compress = self.args.compress;
        let timeout = self.args.connect_timeout;
        let actor = self.myself.clone();
        tracing::debug!(shard = self.args.shard, connection, %base, "dialing");
        self.dial = Some(tokio::spawn(async move {
            let result = connection::dial(&url, compress, timeout).await;
            let _ = actor.cast(ShardMsg::from(Event::Dialed {
                connection,
                via_resume_url,
                result,
            }));
        }));
    }

    fn dialed(
        &mut self,
        via_resume_url: bool,
        result: Result<connection::Dialed, connection::DialError>,
    ) {
        self.dial = None;
        let dialed = match result {
            Ok(dialed) => dialed,
            Err(error) => {
                if via_resume_url {
                    // Discord's advice: a resume URL that fails is dropped for the gateway URL.
                    if let Some(session) = &mut self.session {
                        session.resume_url = None;
                    }
                    tracing::warn!(shard = self.args.shard, %error, "resume URL failed; falling back to the gateway URL");
                } else {
                    tracing::warn!(shard = self.args.shard, %error, "gateway connection failed");
                }
                self.schedule_reconnect();
                return;
            }
        };

        self.link = Some(Link::start(
            dialed,
            self.seq,
            self.connection,
            self.myself.clone(),
        ));

        match self.session.clone() {
            Some(session) => self.send_resume(&session),
            None => self.begin_identify(),
        }
    }

    fn send_resume(&mut self, session: &Session) {
        let resume = ClientPayload::Resume(Resume {
            token: self.args.token.clone(),
            session_id: session.id.clone(),
            seq: self.seq,
        });
        self.send_urgent(resume.encode());
        tracing::debug!(shard = self.args.shard, seq = self.seq, "RESUME sent");
        self.set_stage(ShardStage::Resuming);
    }

    /// Takes the stabilize permit if this shard needs one, then asks for the lease.
    fn begin_identify(&mut self) {
        if self.args.request_members && self.permit.is_none() {
            self.set_stage(ShardStage::WaitingForPermit);
            if self.permit_task.is_none() {
                let gate = names::gate(&self.args.name);
                let actor = self.myself.clone();
                let shard = self.args.shard;
                let holder = self.myself.get_id();
                self.permit_task = Some(tokio::spawn(async move {
                    let permit = call_until_answered(&gate, |reply| GateMsg::Acquire {
                        shard,
                        holder,
                        reply,
                    })
                    .await;
                    let _ = actor.cast(ShardMsg::from(Event::PermitGranted { permit }));
                }));
            }
            return;
        }
        self.request_lease();
    }

    fn permit_granted(&mut self, permit: Permit) {
        self.permit_task = None;
        self.permit = Some(permit);
        if self.stage == ShardStage::WaitingForPermit && self.link.is_some() {
            self.request_lease();
        }
    }

    fn request_lease(&mut self) {
        let bucket = crate::gateway::identify_bucket(self.args.shard, self.args.max_concurrency);
        self.set_stage(ShardStage::WaitingForLease { bucket });
        if self.lease_task.is_some() {
            return;
        }
        let coordinator = names::coordinator(&self.args.name);
        let actor = self.myself.clone();
        let shard = self.args.shard;
        let holder = self.myself.get_id();
        self.lease_task = Some(tokio::spawn(async move {
            let lease = call_until_answered(&coordinator, |reply| CoordinatorMsg::Acquire {
                shard,
                holder,
                reply,
            })
            .await;
            let _ = actor.cast(ShardMsg::from(Event::LeaseGranted { lease }));
        }));
    }

    async fn lease_granted(&mut self, lease: Lease) {
        self.lease_task = None;
        let waiting = matches!(self.stage, ShardStage::WaitingForLease { .. });
        if !waiting || self.link.is_none() {
            // The connection that asked is gone: hand the lease back at once.
            self.cast_coordinator(CoordinatorMsg::Release { lease });
            return;
        }

        let begun = match names::lookup::<CoordinatorMsg>(&names::coordinator(&self.args.name)) {
            Some(coordinator) => coordinator
                .call(|reply| CoordinatorMsg::BeginIdentify { lease, reply }, None)
                .await
                .ok(),
            None => None,
        };
        if !matches!(begun, Some(CallResult::Success(true))) {
            tracing::debug!(
                shard = self.args.shard,
                lease = lease.id,
                "lease lost before IDENTIFY; asking again"
            );
            self.request_lease();
            return;
        }

        let identify = ClientPayload::Identify(Identify {
            token: self.args.token.clone(),
            properties: IdentifyProperties::default(),
            compress: None,
            large_threshold: Some(self.args.large_threshold),
            shard: Some([self.args.shard, self.args.shard_count]),
            presence: None,
            intents: self.args.intents.0,
        });
        let (written, on_written) = tokio::sync::oneshot::channel();
        if let Some(link) = &self.link {
            let _ = link
                .urgent
                .send(Outgoing::UrgentReported(identify.encode(), written));
        }
        let coordinator = names::coordinator(&self.args.name);
        tokio::spawn(async move {
            if on_written.await.is_ok() {
                if let Some(coordinator) = names::lookup::<CoordinatorMsg>(&coordinator) {
                    let _ = coordinator.cast(CoordinatorMsg::IdentifyWritten { lease });
                }
            }
        });
        tracing::debug!(
            shard = self.args.shard,
            bucket = lease.bucket,
            "IDENTIFY sent"
        );
        self.set_stage(ShardStage::Identifying);
    }

    async fn on_payload(&mut self, payload: ServerPayload) {
        match payload {
            ServerPayload::Dispatch(dispatch) => self.on_dispatch(dispatch).await,
            // The connection's heartbeat task takes these; the reader never forwards them.
            ServerPayload::HeartbeatAck | ServerPayload::Heartbeat => {}
            ServerPayload::Reconnect => {
                tracing::info!(shard = self.args.shard, "gateway asked to reconnect");
                self.reconnect(CloseCode::RESUMABLE_CLIENT_CLOSE, Duration::ZERO)
                    .await;
            }
            ServerPayload::InvalidSession { resumable } => {
                tracing::info!(
                    shard = self.args.shard,
                    resumable,
                    "session invalidated by the gateway"
                );
                if !resumable {
                    self.drop_session().await;
                }
                let max = self.args.invalid_session_wait;
                let wait = max.mul_f64(0.2 + 0.8 * rand::random::<f64>());
                self.reconnect(CloseCode::RESUMABLE_CLIENT_CLOSE, wait)
                    .await;
            }
            ServerPayload::Hello(_) => {
                tracing::debug!(shard = self.args.shard, "second HELLO ignored");
            }
        }
    }

    pub(crate) fn send_urgent(&self, text: String) {
        if let Some(link) = &self.link {
            let _ = link.urgent.send(Outgoing::Urgent(text));
        }
    }

    /// Handles a connection that ended without this shard closing it.
    async fn connection_ended(&mut self, end: CloseInitiator) {
        self.teardown_connection();
        match CloseAction::after(end) {
            CloseAction::Resume => {
                tracing::info!(
                    shard = self.args.shard,
                    ?end,
                    "gateway connection closed; resuming"
                );
            }
            CloseAction::Reidentify => {
                tracing::info!(
                    shard = self.args.shard,
                    ?end,
                    "gateway connection closed; session lost, identifying anew"
                );
                self.drop_session().await;
            }
            CloseAction::Fatal(code) => {
                let hint = code.fatal_hint().unwrap_or("check the configuration");
                tracing::error!(shard = self.args.shard, %code, hint, "gateway closed the shard with a fatal code; not reconnecting");
                self.drop_session().await;
                self.set_stage(ShardStage::Fatal { code });
                self.release_permit();
                self.save().await;
                self.parked = true;
                return;
            }
        }
        self.schedule_reconnect();
    }

    /// Closes the connection from this side with `code` and reconnects after `wait`.
    async fn reconnect(&mut self, code: CloseCode, wait: Duration) {
        self.close_link(code);
        if CloseAction::after(CloseInitiator::Client(code)) == CloseAction::Reidentify {
            self.drop_session().await;
        }
        self.schedule_reconnect_after(wait);
    }

    fn close_link(&mut self, code: CloseCode) {
        if let Some(link) = self.link.take() {
            link.close(code);
        }
        self.teardown_connection();
    }

    /// Stops everything tied to the current connection.
    fn teardown_connection(&mut self) {
        self.link = None;
        self.authenticated = false;
        if let Some(timer) = self.guilds.timer.take() {
            timer.abort();
        }
        if let Some(timer) = self.stabilize_timer.take() {
            timer.abort();
        }
        // A connection that ends during the stabilize hold ends the hold: the flood it guarded
        // is over, and the next READY (after a new IDENTIFY) takes a permit again.
        if !self.stabilized {
            self.stabilized = true;
            self.release_permit();
        }
    }

    fn schedule_reconnect(&mut self) {
        // Only a connection that lasted starts the backoff over. One that the gateway ends
        // right after READY or RESUMED, again and again (another process resuming the same
        // sessions, say), backs off like a failed dial.
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_CONNECTION)
        {
            self.attempt = 0;
        }
        self.attempt += 1;
        if self.attempt == FLAPPING_ATTEMPTS {
            tracing::warn!(
                shard = self.args.shard,
                attempts = self.attempt,
                "shard keeps losing its connection soon after connecting; backing off. If another process runs this shard under the same name, stop one of them"
            );
        }
        let delay = if self.attempt == 1 {
            Duration::ZERO
        } else {
            self.args.reconnect_backoff.delay(self.attempt - 1)
        };
        self.schedule_reconnect_after(delay);
    }

    fn schedule_reconnect_after(&mut self, delay: Duration) {
        self.set_stage(ShardStage::Reconnecting {
            attempt: self.attempt,
        });
        let actor = self.myself.clone();
        if let Some(timer) = self.reconnect_timer.take() {
            timer.abort();
        }
        self.reconnect_timer = Some(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = actor.cast(ShardMsg::from(Event::Connect));
        }));
    }

    /// Forgets the session: the next connection identifies.
    pub(crate) async fn drop_session(&mut self) {
        self.session = None;
        self.seq = 0;
        self.save().await;
    }

    /// Marks the connection as established at READY or RESUMED. The reconnect backoff starts
    /// over once it has lasted [`STABLE_CONNECTION`], and the member requests
    /// still outstanding from an earlier connection go out on this one, each once its guild's
    /// window allows.
    pub(crate) fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
        self.authenticated = true;
        let outstanding: Vec<u64> = self.outstanding.keys().copied().collect();
        for guild_id in outstanding {
            self.send_or_defer(guild_id, MemberRequestReason::Backfill);
        }
    }

    /// Starts the stabilize hold after READY, for a shard holding a permit.
    pub(crate) fn start_stabilize_hold(&mut self) {
        let Some(permit) = self.permit else {
            self.stabilized = true;
            return;
        };
        self.cast_gate(GateMsg::Holding { permit });
        self.stabilized = false;
        let StabilizeMode::Fixed(hold) = self.args.stabilize;
        let hold = hold.min(self.args.stabilize_max);
        let connection = self.connection;
        let actor = self.myself.clone();
        self.stabilize_timer = Some(tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let _ = actor.cast(ShardMsg::from(Event::StabilizeElapsed { connection }));
        }));
    }

    async fn stabilize_elapsed(&mut self) {
        self.stabilize_timer = None;
        self.stabilized = true;
        self.release_permit();
        self.update_progress().await;
    }

    fn cast_gate(&self, message: GateMsg) {
        if let Some(gate) = names::lookup::<GateMsg>(&names::gate(&self.args.name)) {
            let _ = gate.cast(message);
        }
    }

    fn cast_coordinator(&self, message: CoordinatorMsg) {
        if let Some(coordinator) =
            names::lookup::<CoordinatorMsg>(&names::coordinator(&self.args.name))
        {
            let _ = coordinator.cast(message);
        }
    }

    pub(crate) fn release_permit(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.cast_gate(GateMsg::Release { permit });
        }
    }

    /// Starts waiting for the guilds READY listed.
    pub(crate) fn expect_guilds(&mut self, guilds: impl IntoIterator<Item = u64>) {
        self.guilds.pending = guilds.into_iter().collect();
        self.guilds.total = self.guilds.pending.len() as u32;
        let connection = self.connection;
        let actor = self.myself.clone();
        let timeout = self.args.guild_timeout;
        if let Some(timer) = self.guilds.timer.take() {
            timer.abort();
        }
        self.guilds.timer = Some(tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = actor.cast(ShardMsg::from(Event::GuildsTimedOut { connection }));
        }));
    }

    async fn guilds_timed_out(&mut self) {
        self.guilds.timer = None;
        if !self.guilds.pending.is_empty() {
            tracing::info!(
                shard = self.args.shard,
                unavailable = self.guilds.pending.len(),
                "guilds did not arrive after READY; counting them as unavailable"
            );
            self.guilds.pending.clear();
        }
        self.update_progress().await;
    }

    /// Moves the stage forward once the guilds arrived and the hold is over.
    pub(crate) async fn update_progress(&mut self) {
        let pending = self.guilds.pending.len() as u32;
        let next = if pending > 0 {
            ShardStage::StreamingGuilds { pending }
        } else if !self.stabilized {
            ShardStage::Stabilizing
        } else {
            ShardStage::Steady
        };
        let changed = self.stage.name() != next.name();
        self.set_stage(next);
        if changed {
            if let Some(timer) = self.guilds.timer.take().filter(|_| pending == 0) {
                timer.abort();
            }
            self.save().await;
        }
    }

    /// Queues an all-members request for a guild of this shard.
    /// Requests a guild's members unless the guild is no longer cached. A sweep page, an
    /// operator or a deferred request may name a guild the bot has left since; Discord would
    /// ignore the request and the simulator counts it as a broken rule.
    pub(crate) async fn request_cached_members(
        &mut self,
        guild_id: u64,
        reason: MemberRequestReason,
    ) {
        let cached = self.args.store.member_count(guild_id).await;
        if matches!(cached, Ok(None)) {
            tracing::debug!(
                shard = self.args.shard,
                guild_id,
                ?reason,
                "member request for a guild no longer cached skipped"
            );
            return;
        }
        self.request_members(guild_id, reason);
    }

    pub(crate) fn request_members(&mut self, guild_id: u64, reason: MemberRequestReason) {
        let owner = crate::gateway::shard_for_guild(guild_id, self.args.shard_count);
        if owner != self.args.shard {
            tracing::warn!(
                shard = self.args.shard,
                guild_id,
                owner,
                "member request for a guild of another shard ignored"
            );
            return;
        }
        if !self.args.request_members {
            tracing::debug!(
                shard = self.args.shard,
                guild_id,
                "member requests are off for this shard"
            );
            return;
        }
        if self.outstanding.contains_key(&guild_id) {
            return;
        }
        if let Some(wait) = self.window_wait(guild_id) {
            self.defer_member_request(guild_id, reason, wait);
            return;
        }
        self.nonce_counter += 1;
        let nonce = format!("{}.{}", self.args.shard, self.nonce_counter);
        self.outstanding.insert(guild_id, nonce);
        tracing::trace!(
            shard = self.args.shard,
            guild_id,
            ?reason,
            "member request queued"
        );
        self.send_member_request(guild_id);
    }

    /// Returns how long a new request for a guild must wait for Discord's member request
    /// window, timed from the last request written, or `None` if it may go now.
    fn window_wait(&self, guild_id: u64) -> Option<Duration> {
        let window = self.args.member_request_window;
        let guild = self
            .last_requested
            .get(&guild_id)
            .map(Instant::elapsed)
            .filter(|since| *since < window)
            .map(|since| window - since + DEFER_MARGIN);
        let process = self
            .args
            .member_requests_after
            .and_then(|after| after.checked_duration_since(Instant::now()))
            .map(|wait| wait + DEFER_MARGIN);
        guild.max(process)
    }

    /// Sends a request again after `wait`, unless one for the guild is already deferred.
    fn defer_member_request(&mut self, guild_id: u64, reason: MemberRequestReason, wait: Duration) {
        if self.deferred.contains_key(&guild_id) {
            return;
        }
        tracing::debug!(
            shard = self.args.shard,
            guild_id,
            ?reason,
            wait_ms = wait.as_millis() as u64,
            "members requested within the window; request deferred"
        );
        let actor = self.myself.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = actor.cast(ShardMsg::from(Event::DeferredMembers { guild_id, reason }));
        });
        self.deferred.insert(guild_id, timer);
    }

    /// Sends an outstanding request now, or once its guild's window has passed.
    fn send_or_defer(&mut self, guild_id: u64, reason: MemberRequestReason) {
        match self.window_wait(guild_id) {
            Some(wait) => self.defer_member_request(guild_id, reason, wait),
            None => self.send_member_request(guild_id),
        }
    }

    /// Sends (again) the request of an outstanding guild, through the send limiter. Before READY
    /// or RESUMED the request stays outstanding and goes out when the session is up.
    pub(crate) fn send_member_request(&self, guild_id: u64) {
        if !self.authenticated {
            return;
        }
        let (Some(nonce), Some(link)) = (self.outstanding.get(&guild_id), &self.link) else {
            return;
        };
        let request = RequestGuildMembers::all_members(Snowflake(guild_id), Some(nonce.clone()));
        let _ = link.commands.send(Command {
            text: ClientPayload::RequestGuildMembers(request).encode(),
            members_of: Some(guild_id),
        });
    }

    /// Saves the session and the stage, once every event pushed so far is delivered. Returns
    /// whether the record was saved.
    pub(crate) async fn save(&mut self) -> bool {
        if let Err(error) = self.args.sink.flush().await {
            tracing::warn!(shard = self.args.shard, %error, "event sink not flushed; the session is saved with the next save");
            return false;
        }
        let record = ShardRecord {
            shard: self.args.shard,
            name: self.args.name.clone(),
            seq: self.seq,
            session_id: self.session.as_ref().map(|s| s.id.clone()),
            resume_url: self.session.as_ref().and_then(|s| s.resume_url.clone()),
            status: self.stage.name().to_owned(),
        };
        match self.args.store.save_shard(&record).await {
            Ok(()) => {
                self.unsaved = 0;
                true
            }
            Err(error) => {
                tracing::warn!(shard = self.args.shard, %error, "failed to save the shard session; retrying with the next save");
                false
            }
        }
    }

    pub(crate) fn status(&self) -> ShardStatus {
        let pulse = self
            .link
            .as_ref()
            .map(|link| link.pulse.reading())
            .unwrap_or_default();
        ShardStatus {
            shard: self.args.shard,
            stage: self.stage.clone(),
            session_id: self.session.as_ref().map(|s| s.id.clone()),
            seq: self.seq,
            last_ack_ms_ago: pulse.since_last_ack.map(|d| d.as_millis() as u64),
            latency_ms: pulse.latency.map(|l| l.as_millis() as u64),
            guilds: self.guilds.total,
            outstanding_member_requests: self.outstanding.len() as u32,
            missed_events: self.missed_events,
        }
    }

    /// Graceful shutdown: save the session and close with a resumable code, so that the next
    /// process resumes instead of identifying.
    /// Returns whether the session was saved.
    pub(crate) async fn shutdown(&mut self) -> bool {
        self.parked = true;
        self.close_link(CloseCode::RESUMABLE_CLIENT_CLOSE);
        self.stop_tasks();
        self.save().await
    }

    /// Stops every task and timer of this incarnation.
    pub(crate) async fn stop(&mut self) {
        if !self.parked {
            self.close_link(CloseCode::RESUMABLE_CLIENT_CLOSE);
            self.save().await;
        }
        self.stop_tasks();
    }

    fn stop_tasks(&mut self) {
        for (_, timer) in self.deferred.drain() {
            timer.abort();
        }
        for task in [
            self.dial.take(),
            self.reconnect_timer.take(),
            self.permit_task.take(),
            self.lease_task.take(),
            self.stabilize_timer.take(),
            self.guilds.timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
    }
}

/// How long a connection must stay up after READY or RESUMED for the reconnect backoff to start
/// over when it ends.
const STABLE_CONNECTION: Duration = Duration::from_secs(30);

/// Reconnects in a row after which a shard warns that it keeps losing its connection.
const FLAPPING_ATTEMPTS: u32 = 5;

/// Added to a deferred member request's wait. The gateway times its window from the arrival of
/// the last request, which comes after the write that the shard records by the transit time.
const DEFER_MARGIN: Duration = Duration::from_millis(500);

/// How long a shard waits before looking a singleton up again after it was not running or
/// stopped before answering (the Supervisor is restarting it).
const SINGLETON_RETRY: Duration = Duration::from_millis(100);

/// Calls the actor registered under `name` until it answers, looking it up again after each
/// failure, so that a restarted coordinator or gate is found under its name.
async fn call_until_answered<M, T>(name: &str, build: impl Fn(ractor::RpcReplyPort<T>) -> M) -> T
where
    M: ractor::Message,
    T: Send + 'static,
{
    loop {
        if let Some(actor) = names::lookup::<M>(name) {
            if let Ok(CallResult::Success(answer)) = actor.call(&build, None).await {
                return answer;
            }
        }
        tokio::time::sleep(SINGLETON_RETRY).await;
    }
}
