//! What the simulator saw, for tests and benchmarks to judge a client by.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// A rule of Discord's that a client broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// IDENTIFY inside its bucket's window (answered with op 9 `false`).
    IdentifyTooFast,
    /// IDENTIFY with no session starts left (every session closed, token invalidated).
    SessionStartLimitExceeded,
    /// Wrong or invalidated token (4004).
    AuthenticationFailed,
    /// Shard id or count invalid (4010), or missing while the bot needs sharding (4011).
    InvalidShard,
    /// Intent bits Discord does not define (4013).
    InvalidIntents,
    /// A privileged intent the bot has not enabled (4014).
    DisallowedIntents,
    /// A second IDENTIFY or RESUME on an authenticated connection (4005).
    AlreadyAuthenticated,
    /// A command other than a heartbeat before IDENTIFY or RESUME (4003).
    NotAuthenticated,
    /// A payload over 4096 bytes (4002).
    PayloadTooLarge,
    /// A payload that is not a valid gateway command (4002).
    DecodeError,
    /// More than the allowed sends in the window on one connection (4008).
    SendRateExceeded,
    /// RESUME with a sequence ahead of the session (4007).
    InvalidResumeSequence,
    /// No heartbeat within the timeout (4009).
    HeartbeatTimeout,
    /// An all-members REQUEST_GUILD_MEMBERS inside the guild's window (answered with
    /// RATE_LIMITED).
    MemberRequestRateLimited,
    /// REQUEST_GUILD_MEMBERS for a guild of another shard, or without the intent it needs.
    InvalidMemberRequest,
    /// A query string the gateway does not support (`v`, `encoding`, `compress`).
    InvalidConnectParameters,
}

/// One broken rule.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub connection: u64,
    pub shard: Option<u32>,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    pub detail: String,
}

/// One IDENTIFY received.
#[derive(Clone, Debug, Serialize)]
pub struct IdentifyRecord {
    pub shard: u32,
    pub connection: u64,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
    /// `false` for an IDENTIFY answered with op 9 because its bucket's window was still open.
    pub accepted: bool,
}

/// The end of a connection.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum ConnectionEnd {
    /// The simulator sent a close frame.
    Server { code: u16, reason: String },
    /// The client sent a close frame.
    Client { code: Option<u16> },
    /// The simulator dropped the TCP connection without a close frame.
    Dropped,
    /// The transport ended without a close frame from either side.
    Transport,
}

/// One WebSocket connection.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionRecord {
    pub id: u64,
    /// Shard of the IDENTIFY or RESUME, once one was accepted.
    pub shard: Option<u32>,
    /// `true` if the client connected to the resume address.
    pub resume_address: bool,
    pub compressed: bool,
    pub opened_at_ms: u64,
    pub closed_at_ms: Option<u64>,
    /// Payloads the client sent.
    pub sends: u64,
    pub end: Option<ConnectionEnd>,
}

/// Member requests for one guild.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemberRequestRecord {
    pub shard: u32,
    /// Every REQUEST_GUILD_MEMBERS for the guild.
    pub requests: u64,
    /// The all-members ones among them.
    pub all_members_requests: u64,
    /// Requests answered with RATE_LIMITED.
    pub rate_limited: u64,
    pub chunks_sent: u64,
}

/// One session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionRecord {
    pub shard: u32,
    /// Sequence of the newest dispatch of the session.
    pub last_seq: u64,
    /// Dispatches created for the session, READY included.
    pub dispatches: u64,
    /// Dispatches sent again on RESUME.
    pub replayed: u64,
    pub resumes: u64,
    /// `false` once the session can no longer be resumed.
    pub resumable: bool,
}

/// Everything the simulator recorded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Identifies per bucket, in arrival order.
    pub identifies: BTreeMap<u32, Vec<IdentifyRecord>>,
    pub violations: Vec<Violation>,
    pub violations_by_kind: BTreeMap<ViolationKind, u64>,
    pub connections: Vec<ConnectionRecord>,
    /// Member requests per guild id.
    pub member_requests: BTreeMap<u64, MemberRequestRecord>,
    /// Sessions by session id.
    pub sessions: BTreeMap<String, SessionRecord>,
    /// Dispatches created across all sessions (replays not included).
    pub dispatches_sent: u64,
    pub session_start_remaining: u32,
}

impl Report {
    /// Returns the number of violations of one kind.
    pub fn violation_count(&self, kind: ViolationKind) -> u64 {
        self.violations_by_kind.get(&kind).copied().unwrap_or(0)
    }

    /// Returns every accepted IDENTIFY, across buckets.
    pub fn accepted_identifies(&self) -> usize {
        self.identifies
            .values()
            .flatten()
            .filter(|record| record.accepted)
            .count()
    }

    /// Returns the connection record with this id.
    pub fn connection(&self, id: u64) -> Option<&ConnectionRecord> {
        self.connections.iter().find(|record| record.id == id)
    }
}

/// The shared, lock-protected report a running simulator writes to.
pub(crate) struct Recorder {
    started: Instant,
    report: Mutex<Report>,
}

impl Recorder {
    pub(crate) fn new(started: Instant) -> Self {
        Self {
            started,
            report: Mutex::new(Report::default()),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `change` on the report under its lock.
    pub(crate) fn update<R>(&self, change: impl FnOnce(&mut Report) -> R) -> R {
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut report)
    }

    pub(crate) fn snapshot(&self) -> Report {
        self.update(|report| report.clone())
    }

    pub(crate) fn violation(
        &self,
        kind: ViolationKind,
        connection: u64,
        shard: Option<u32>,
        detail: impl Into<String>,
    ) {
        let detail = detail.into();
        tracing::info!(?kind, connection, shard, %detail, "client broke a gateway rule");
        let at_ms = self.now_ms();
        self.update(|report| {
            *report.violations_by_kind.entry(kind).or_default() += 1;
            report.violations.push(Violation {
                kind,
                connection,
                shard,
                at_ms,
                detail,
            });
        });
    }

    pub(crate) fn with_connection(&self, id: u64, change: impl FnOnce(&mut ConnectionRecord)) {
        self.update(|report| {
            // Connections are appended in id order, so the record is found by binary search.
            if let Ok(index) = report
                .connections
                .binary_search_by_key(&id, |record| record.id)
            {
                change(&mut report.connections[index]);
            }
        });
    }

    pub(crate) fn with_session(&self, session_id: &str, change: impl FnOnce(&mut SessionRecord)) {
        self.update(|report| {
            if let Some(record) = report.sessions.get_mut(session_id) {
                change(record);
            }
        });
    }
}
