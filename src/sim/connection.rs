//! One gateway connection as Discord runs it: HELLO, heartbeats, IDENTIFY or RESUME, member
//! requests, the per-connection send limit, and the close codes of every broken rule.
//!
//! The read loop here owns the protocol state. It hands every frame and close to the
//! connection's [`Writer`], so reading and the heartbeat deadline go on while a write to a client
//! that stopped reading is blocked.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::gateway::{
    ClientPayload, CloseCode, DecodeError, Deflater, Hello, Identify, Intents, RateLimited,
    RateLimitedMeta, RequestGuildMembers, Resume, ServerPayload, MAX_CLIENT_PAYLOAD_BYTES,
};
use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use serde_json::value::{to_raw_value, RawValue};
use tokio::sync::mpsc;

use super::identify::IdentifyDecision;
use super::report::{
    ConnectionEnd, ConnectionRecord, MemberRequestRecord, SessionRecord, ViolationKind,
};
use super::session::{Outgoing, OutgoingSender, ResumeError, Session};
use super::writer::Writer;
use super::{lock, ConnectionHandle, Shared};

/// Lowest and highest `large_threshold` Discord accepts in IDENTIFY; 50 when absent.
const LARGE_THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 50..=250;

/// The query string of a gateway connection.
#[derive(Clone, Debug)]
pub(crate) struct ConnectParams {
    compress: bool,
    resume_address: bool,
    /// Close code and reason for parameters the simulator does not serve.
    rejection: Option<(u16, String)>,
}

impl ConnectParams {
    pub(crate) fn parse(query: &HashMap<String, String>, resume_address: bool) -> Self {
        let mut rejection = None;
        match query.get("v").map(String::as_str) {
            Some("10") => {}
            other => {
                rejection = Some((
                    CloseCode::INVALID_API_VERSION.0,
                    format!(
                        "invalid API version {}: connect with v=10",
                        other.unwrap_or("(missing)")
                    ),
                ));
            }
        }
        match query.get("encoding").map(String::as_str) {
            None | Some("json") => {}
            Some(other) => {
                rejection = Some((
                    CloseCode::DECODE_ERROR.0,
                    format!("encoding {other:?} is not served by the simulator: use encoding=json"),
                ));
            }
        }
        let compress = match query.get("compress").map(String::as_str) {
            None => false,
            Some("zlib-stream") => true,
            Some(other) => {
                rejection = Some((
                    CloseCode::DECODE_ERROR.0,
                    format!("compress {other:?} is not served by the simulator: use compress=zlib-stream or leave it out"),
                ));
                false
            }
        };
        Self {
            compress,
            resume_address,
            rejection,
        }
    }
}

/// Serves one upgraded connection until it ends.
pub(crate) async fn run(socket: WebSocket, shared: Arc<Shared>, params: ConnectParams) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let opened_at_ms = shared.recorder.now_ms();
    let id = shared.recorder.update(|report| {
        let id = report.connections.len() as u64 + 1;
        report.connections.push(ConnectionRecord {
            id,
            shard: None,
            resume_address: params.resume_address,
            compressed: params.compress,
            opened_at_ms,
            closed_at_ms: None,
            sends: 0,
            end: None,
        });
        id
    });
    lock(&shared.connections).insert(
        id,
        ConnectionHandle {
            shard: None,
            session: None,
            sender: sender.clone(),
        },
    );

    let span = tracing::debug_span!("sim_connection", connection = id);
    let (sink, stream) = socket.split();
    let writer = span.in_scope(|| Writer::spawn(sink, params.compress.then(Deflater::new)));
    let mut connection = Connection {
        id,
        heartbeat_deadline: Instant::now() + shared.config.heartbeat_timeout,
        shared,
        stream,
        writer,
        receiver,
        sender,
        session: None,
        sends: VecDeque::new(),
    };
    let end = tracing::Instrument::instrument(connection.serve(params.rejection), span).await;
    connection.finish(end);
}

struct Connection {
    id: u64,
    shared: Arc<Shared>,
    /// The read half of the WebSocket. The write half belongs to `writer`.
    stream: SplitStream<WebSocket>,
    writer: Writer,
    /// Frames and closes from the session and from faults. The read loop forwards frames to
    /// `writer` at once and handles closes and drops itself, so a drop ends the connection even
    /// while a write is blocked.
    receiver: mpsc::UnboundedReceiver<Outgoing>,
    sender: OutgoingSender,
    /// Set by an accepted IDENTIFY or RESUME.
    session: Option<Arc<Session>>,
    /// Arrival times of the client's payloads inside the send-limit window.
    sends: VecDeque<Instant>,
    /// The connection times out unless a heartbeat arrives before this.
    heartbeat_deadline: Instant,
}

impl Connection {
    async fn serve(&mut self, rejection: Option<(u16, String)>) -> ConnectionEnd {
        if let Some((code, reason)) = rejection {
            self.shared.recorder.violation(
                ViolationKind::InvalidConnectParameters,
                self.id,
                None,
                reason.clone(),
            );
            return self.close(code, reason).await;
        }

        let hello = ServerPayload::Hello(Hello {
            heartbeat_interval: u64::try_from(self.shared.config.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
        });
        self.send_frame(&hello.encode());

        loop {
            let deadline = tokio::time::Instant::from_std(self.heartbeat_deadline);
            tokio::select! {
                () = self.shared.shutdown.cancelled() => return ConnectionEnd::Dropped,
                incoming = self.stream.next() => {
                    let flow = match incoming {
                        None | Some(Err(_)) => ControlFlow::Break(ConnectionEnd::Transport),
                        Some(Ok(Message::Text(text))) => self.receive(text.as_bytes()).await,
                        Some(Ok(Message::Binary(bytes))) => self.receive(&bytes).await,
                        Some(Ok(Message::Close(frame))) => {
                            ControlFlow::Break(self.client_closed(frame.map(|frame| frame.code)))
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => ControlFlow::Continue(()),
                    };
                    if let ControlFlow::Break(end) = flow {
                        return end;
                    }
                }
                outgoing = self.receiver.recv() => {
                    // The connection holds a sender itself, so the queue never closes here.
                    let Some(outgoing) = outgoing else { return ConnectionEnd::Dropped };
                    match outgoing {
                        Outgoing::Frame(frame) => self.writer.frame(frame),
                        Outgoing::Close { code, reason } => {
                            self.invalidate_after_close(code);
                            return self.close(code, reason).await;
                        }
                        Outgoing::Drop => return ConnectionEnd::Dropped,
                    }
                }
                // The writer ends on its own only when a write failed.
                () = self.writer.ended() => return ConnectionEnd::Transport,
                () = tokio::time::sleep_until(deadline) => {
                    self.violation(ViolationKind::HeartbeatTimeout, "no heartbeat within the timeout".to_owned());
                    if let Some(session) = &self.session {
                        session.invalidate(&self.shared.recorder);
                    }
                    return self.close(CloseCode::SESSION_TIMED_OUT.0, "session timed out".to_owned()).await;
                }
            }
        }
    }

    /// Handles one payload from the client.
    async fn receive(&mut self, bytes: &[u8]) -> ControlFlow<ConnectionEnd> {
        self.shared
            .recorder
            .with_connection(self.id, |record| record.sends += 1);

        let now = Instant::now();
        let window = self.shared.config.send_limit_window;
        while self
            .sends
            .front()
            .is_some_and(|at| now.duration_since(*at) >= window)
        {
            self.sends.pop_front();
        }
        self.sends.push_back(now);
        if self.sends.len() > self.shared.config.send_limit as usize {
            let detail = format!(
                "{} payloads within {:?}, limit {}",
                self.sends.len(),
                window,
                self.shared.config.send_limit
            );
            self.violation(ViolationKind::SendRateExceeded, detail);
            return self
                .close_break(CloseCode::RATE_LIMITED, "rate limited")
                .await;
        }

        if bytes.len() > MAX_CLIENT_PAYLOAD_BYTES {
            let detail = format!("{} bytes, limit {MAX_CLIENT_PAYLOAD_BYTES}", bytes.len());
            self.violation(ViolationKind::PayloadTooLarge, detail);
            return self
                .close_break(CloseCode::DECODE_ERROR, "payload too large")
                .await;
        }

        let payload = match ClientPayload::decode(bytes) {
            Ok(payload) => payload,
            Err(error) => {
                self.violation(ViolationKind::DecodeError, error.to_string());
                // Discord closes an opcode it does not take from clients with 4001, and a
                // payload it cannot parse with 4002.
                let (code, reason) = match error {
                    DecodeError::UnknownOpcode(_) | DecodeError::WrongDirection { .. } => {
                        (CloseCode::UNKNOWN_OPCODE, "unknown opcode")
                    }
                    _ => (CloseCode::DECODE_ERROR, "decode error"),
                };
                return self.close_break(code, reason).await;
            }
        };

        match payload {
            ClientPayload::Heartbeat { .. } => {
                self.heartbeat_deadline = now + self.shared.config.heartbeat_timeout;
                let silent = self
                    .shard()
                    .is_some_and(|shard| lock(&self.shared.faults).is_silent(shard));
                if !silent {
                    self.send_frame(&ServerPayload::HeartbeatAck.encode());
                }
                ControlFlow::Continue(())
            }
            ClientPayload::Identify(identify) => self.identify(identify).await,
            ClientPayload::Resume(resume) => self.resume(resume).await,
            other => {
                let Some(session) = self.session.clone() else {
                    let detail = format!("opcode {:?} before IDENTIFY or RESUME", other.opcode());
                    self.violation(ViolationKind::NotAuthenticated, detail);
                    return self
                        .close_break(CloseCode::NOT_AUTHENTICATED, "not authenticated")
                        .await;
                };
                if let ClientPayload::RequestGuildMembers(request) = other {
                    self.request_members(&session, request);
                }
                ControlFlow::Continue(())
            }
        }
    }

    async fn identify(&mut self, identify: Identify) -> ControlFlow<ConnectionEnd> {
        if self.session.is_some() {
            self.violation(
                ViolationKind::AlreadyAuthenticated,
                "second IDENTIFY".to_owned(),
            );
            return self
                .close_break(CloseCode::ALREADY_AUTHENTICATED, "already authenticated")
                .await;
        }
        if !self.token_valid(&identify.token) {
            self.violation(
                ViolationKind::AuthenticationFailed,
                "IDENTIFY with an invalid token".to_owned(),
            );
            return self
                .close_break(CloseCode::AUTHENTICATION_FAILED, "authentication failed")
                .await;
        }

        let config = &self.shared.config;
        let shard = match identify.shard {
            None if config.shards > 1 => {
                let detail = format!(
                    "IDENTIFY without shard while the bot needs {} shards",
                    config.shards
                );
                self.violation(ViolationKind::InvalidShard, detail);
                return self
                    .close_break(CloseCode::SHARDING_REQUIRED, "sharding required")
                    .await;
            }
            None => 0,
            Some([id, count]) if count != config.shards || id >= count => {
                let detail = format!(
                    "shard [{id}, {count}] for a bot of {} shards",
                    config.shards
                );
                self.violation(ViolationKind::InvalidShard, detail);
                return self
                    .close_break(CloseCode::INVALID_SHARD, "invalid shard")
                    .await;
            }
            Some([id, _]) => id,
        };

        let intents = Intents(identify.intents);
        if intents.unknown_bits() != 0 {
            let detail = format!("unknown intent bits {:#x}", intents.unknown_bits());
            self.violation(ViolationKind::InvalidIntents, detail);
            return self
                .close_break(CloseCode::INVALID_INTENTS, "invalid intent(s)")
                .await;
        }
        let privileged = intents.intersection(Intents::PRIVILEGED);
        if !config.privileged_intents.contains(privileged) {
            let detail = format!(
                "privileged intents {:#x} requested, {:#x} enabled",
                privileged.0, config.privileged_intents.0
            );
            self.violation(ViolationKind::DisallowedIntents, detail);
            return self
                .close_break(CloseCode::DISALLOWED_INTENTS, "disallowed intent(s)")
                .await;
        }

        let large_threshold = identify
            .large_threshold
            .unwrap_or(*LARGE_THRESHOLD_RANGE.start());
        if !LARGE_THRESHOLD_RANGE.contains(&large_threshold) {
            let detail = format!("large_threshold {large_threshold} outside 50..=250");
            self.violation(ViolationKind::DecodeError, detail);
            return self
                .close_break(CloseCode::DECODE_ERROR, "decode error")
                .await;
        }

        let decision = lock(&self.shared.identify).decide(config, shard, Instant::now());
        self.record_identify(shard, decision == IdentifyDecision::Accept);
        match decision {
            IdentifyDecision::Accept => {
                self.start_session(shard, intents, large_threshold);
                ControlFlow::Continue(())
            }
            IdentifyDecision::TooFast { bucket, wait } => {
                let detail = format!("bucket {bucket} window open for another {wait:?}");
                self.violation(ViolationKind::IdentifyTooFast, detail);
                self.send_frame(&ServerPayload::InvalidSession { resumable: false }.encode());
                ControlFlow::Continue(())
            }
            IdentifyDecision::LimitExhausted => {
                self.violation(
                    ViolationKind::SessionStartLimitExceeded,
                    "IDENTIFY with no session starts remaining; token reset".to_owned(),
                );
                self.reset_token();
                self.close_break(CloseCode::AUTHENTICATION_FAILED, "authentication failed")
                    .await
            }
        }
    }

    /// Creates the session of an accepted IDENTIFY and starts READY, the GUILD_CREATEs and the
    /// steady traffic.
    fn start_session(&mut self, shard: u32, intents: Intents, large_threshold: u32) {
        let shared = &self.shared;
        let id = format!("{:032x}", rand::random::<u128>());
        let session = Arc::new(Session::new(
            id.clone(),
            shard,
            intents,
            large_threshold,
            shared.config.resume_buffer,
        ));
        shared.recorder.update(|report| {
            report.session_start_remaining = lock(&shared.identify).remaining();
            report.sessions.insert(
                id.clone(),
                SessionRecord {
                    shard,
                    resumable: true,
                    ..SessionRecord::default()
                },
            );
        });
        lock(&shared.sessions).insert(id, session.clone());
        session.attach(self.id, self.sender.clone());
        tokio::spawn(super::stream::stream_session(
            shared.clone(),
            session.clone(),
        ));
        self.attach(&session);
    }

    async fn resume(&mut self, resume: Resume) -> ControlFlow<ConnectionEnd> {
        if self.session.is_some() {
            self.violation(
                ViolationKind::AlreadyAuthenticated,
                "RESUME on an authenticated connection".to_owned(),
            );
            return self
                .close_break(CloseCode::ALREADY_AUTHENTICATED, "already authenticated")
                .await;
        }
        if !self.token_valid(&resume.token) {
            self.violation(
                ViolationKind::AuthenticationFailed,
                "RESUME with an invalid token".to_owned(),
            );
            return self
                .close_break(CloseCode::AUTHENTICATION_FAILED, "authentication failed")
                .await;
        }

        let Some(session) = self.shared.session(&resume.session_id) else {
            tracing::debug!(session = %resume.session_id, "resume of an unknown session");
            return self.invalid_session();
        };
        match session.resume(resume.seq, self.id, self.sender.clone()) {
            Ok((displaced, replayed)) => {
                if let Some(previous) = displaced {
                    let _ = previous.send(Outgoing::Close {
                        code: CloseCode::UNKNOWN_ERROR.0,
                        reason: "session resumed on another connection".to_owned(),
                    });
                }
                self.shared.recorder.with_session(&session.id, |record| {
                    record.resumes += 1;
                    record.replayed += replayed;
                });
                self.attach(&session);
                // Discord's RESUMED carries a `_trace` of the servers involved.
                let resumed = RawValue::from_string(r#"{"_trace":["shardvisor-sim"]}"#.to_owned())
                    .expect("the RESUMED data is JSON");
                session.dispatch("RESUMED", &resumed, &self.shared.recorder);
                ControlFlow::Continue(())
            }
            Err(ResumeError::SequenceAhead { requested, latest }) => {
                let detail = format!("RESUME at seq {requested}, session is at {latest}");
                self.violation(ViolationKind::InvalidResumeSequence, detail);
                session.invalidate(&self.shared.recorder);
                self.close_break(CloseCode::INVALID_SEQUENCE, "invalid seq")
                    .await
            }
            Err(error) => {
                tracing::debug!(session = %session.id, ?error, "resume refused");
                self.invalid_session()
            }
        }
    }

    fn request_members(&mut self, session: &Arc<Session>, request: RequestGuildMembers) {
        let shared = &self.shared;
        let guild_id = request.guild_id;
        let shard = session.shard;
        let all_members = request.is_all_members();

        if all_members && !session.intents.contains(Intents::GUILD_MEMBERS) {
            let detail = format!(
                "all-members request for guild {guild_id} without the GUILD_MEMBERS intent"
            );
            self.violation(ViolationKind::InvalidMemberRequest, detail);
            return;
        }
        let Some(plan) =
            lock(&shared.worlds[shard as usize]).plan_member_request(&request, session.intents)
        else {
            let detail = format!("guild {guild_id} is not on shard {shard}");
            self.violation(ViolationKind::InvalidMemberRequest, detail);
            return;
        };

        shared.recorder.update(|report| {
            let record = report
                .member_requests
                .entry(guild_id.get())
                .or_insert_with(|| MemberRequestRecord {
                    shard,
                    ..MemberRequestRecord::default()
                });
            record.requests += 1;
            if all_members {
                record.all_members_requests += 1;
            }
        });

        if all_members {
            if let Some(retry_after) = self.member_window_closed(guild_id.get(), shard) {
                let limited = RateLimited {
                    opcode: actors::gateway::OpCode::RequestGuildMembers.code(),
                    retry_after: retry_after.as_secs_f64(),
                    meta: RateLimitedMeta {
                        guild_id,
                        nonce: request.nonce.clone(),
                    },
                };
                let data = to_raw_value(&limited).expect("RATE_LIMITED serializes");
                session.dispatch("RATE_LIMITED", &data, &shared.recorder);
                shared.recorder.update(|report| {
                    if let Some(record) = report.member_requests.get_mut(&guild_id.get()) {
                        record.rate_limited += 1;
                    }
                });
                return;
            }
        }

        tokio::spawn(super::stream::send_member_chunks(
            shared.clone(),
            session.clone(),
            guild_id.get(),
            plan,
        ));
    }

    /// Returns `retry_after` if an all-members request for the guild must be answered with
    /// RATE_LIMITED, and opens the guild's window otherwise.
    fn member_window_closed(&self, guild_id: u64, shard: u32) -> Option<Duration> {
        let shared = &self.shared;
        if let Some(forced) = lock(&shared.faults).take_rate_limit(shard) {
            return Some(forced);
        }

        let now = Instant::now();
        let mut windows = lock(&shared.member_windows);
        if let Some(opened) = windows.get(&guild_id) {
            let elapsed = now.saturating_duration_since(*opened);
            if elapsed < shared.config.member_request_window {
                let retry_after = shared.config.member_request_window - elapsed;
                drop(windows);
                let detail = format!("guild {guild_id} window open for another {retry_after:?}");
                self.violation(ViolationKind::MemberRequestRateLimited, detail);
                return Some(retry_after);
            }
        }
        windows.insert(guild_id, now);
        None
    }

    fn token_valid(&self, token: &actors::gateway::Token) -> bool {
        lock(&self.shared.identify).token_valid && token == &self.shared.config.token
    }

    /// Ends every session and closes every connection with 4004, as Discord does when a bot
    /// exceeds its daily session starts.
    fn reset_token(&self) {
        let shared = &self.shared;
        lock(&shared.identify).token_valid = false;
        let sessions: Vec<Arc<Session>> = lock(&shared.sessions).drain().map(|(_, s)| s).collect();
        for session in sessions {
            session.invalidate(&shared.recorder);
        }
        for (id, handle) in lock(&shared.connections).iter() {
            if *id != self.id {
                let _ = handle.sender.send(Outgoing::Close {
                    code: CloseCode::AUTHENTICATION_FAILED.0,
                    reason: "authentication failed".to_owned(),
                });
            }
        }
    }

    fn attach(&mut self, session: &Arc<Session>) {
        self.session = Some(session.clone());
        if let Some(handle) = lock(&self.shared.connections).get_mut(&self.id) {
            handle.shard = Some(session.shard);
            handle.session = Some(session.clone());
        }
        let shard = session.shard;
        self.shared
            .recorder
            .with_connection(self.id, |record| record.shard = Some(shard));
    }

    fn shard(&self) -> Option<u32> {
        self.session.as_ref().map(|session| session.shard)
    }

    fn record_identify(&self, shard: u32, accepted: bool) {
        let bucket = actors::gateway::identify_bucket(shard, self.shared.config.max_concurrency);
        let at_ms = self.shared.recorder.now_ms();
        let connection = self.id;
        self.shared.recorder.update(|report| {
            report
                .identifies
                .entry(bucket)
                .or_default()
                .push(super::report::IdentifyRecord {
                    shard,
                    connection,
                    at_ms,
                    accepted,
                });
        });
    }

    fn violation(&self, kind: ViolationKind, detail: String) {
        self.shared
            .recorder
            .violation(kind, self.id, self.shard(), detail);
    }

    /// After these server closes Discord drops the session; after the others it stays
    /// resumable.
    fn invalidate_after_close(&self, code: u16) {
        let code = CloseCode(code);
        if matches!(code.0, 4007 | 4009) || code.is_fatal() {
            if let Some(session) = &self.session {
                session.invalidate(&self.shared.recorder);
            }
        }
    }

    /// A client close with 1000 or 1001 ends its session, per Discord's documentation.
    fn client_closed(&self, code: Option<u16>) -> ConnectionEnd {
        if let (Some(code), Some(session)) = (code, &self.session) {
            if CloseCode(code).invalidates_when_sent_by_client() {
                session.invalidate(&self.shared.recorder);
            }
        }
        ConnectionEnd::Client { code }
    }

    fn invalid_session(&self) -> ControlFlow<ConnectionEnd> {
        self.send_frame(&ServerPayload::InvalidSession { resumable: false }.encode());
        ControlFlow::Continue(())
    }

    /// Queues a frame after every frame queued before it. A failed write shows up as the end of
    /// the writer in the read loop.
    fn send_frame(&self, frame: &str) {
        self.writer.frame(frame.into());
    }

    /// Queues the close frame after every frame queued before it and waits until the writer has
    /// written it. The end is the close, whether or not the frame reached the client.
    async fn close(&mut self, code: u16, reason: String) -> ConnectionEnd {
        tracing::debug!(code, %reason, "closing connection");
        self.writer.close(code, reason.clone());

        // A client that stopped reading may never take the queued frames, so the wait for the
        // close frame is bounded. One heartbeat timeout is the simulator's choice: Discord does
        // not document how long it waits.
        let limit = tokio::time::sleep(self.shared.config.heartbeat_timeout);
        tokio::select! {
            () = self.writer.ended() => {}
            () = self.shared.shutdown.cancelled() => {}
            () = next_drop(&mut self.receiver) => {}
            () = limit => tracing::debug!("close frame not written within the heartbeat timeout"),
        }
        ConnectionEnd::Server { code, reason }
    }

    async fn close_break(&mut self, code: CloseCode, reason: &str) -> ControlFlow<ConnectionEnd> {
        self.invalidate_after_close(code.0);
        ControlFlow::Break(self.close(code.0, reason.to_owned()).await)
    }

    /// Records the end, detaches the session and removes the connection from the registry.
    /// Dropping `self` stops the writer and closes the socket.
    fn finish(self, end: ConnectionEnd) {
        let closed_at_ms = self.shared.recorder.now_ms();
        self.shared.recorder.with_connection(self.id, |record| {
            record.closed_at_ms = Some(closed_at_ms);
            record.end = Some(end);
        });
        if let Some(session) = &self.session {
            session.detach(self.id);
        }
        lock(&self.shared.connections).remove(&self.id);
    }
}

/// Waits for [`Outgoing::Drop`] on a closing connection. Frames and closes queued after the
/// connection's own close are not sent. A resumable session still keeps the frames in its replay
/// buffer.
async fn next_drop(receiver: &mut mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(outgoing) = receiver.recv().await {
        if matches!(outgoing, Outgoing::Drop) {
            return;
        }
    }
}
