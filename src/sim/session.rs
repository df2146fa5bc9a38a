//! Gateway sessions: sequence numbers, the replay buffer and the connection a session is attached
//! to.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use actors::gateway::payload::encode_dispatch;
use actors::gateway::Intents;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::report::Recorder;

/// What a connection task is told to do. Frames and closes share one queue so that a close is
/// sent after every frame queued before it.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A gateway payload, already encoded.
    Frame(Arc<str>),
    /// Send a close frame with this code and end the connection.
    Close { code: u16, reason: String },
    /// End the connection without a close frame.
    Drop,
}

pub(crate) type OutgoingSender = mpsc::UnboundedSender<Outgoing>;

/// A session created by an accepted IDENTIFY.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) shard: u32,
    pub(crate) intents: Intents,
    pub(crate) large_threshold: u32,
    state: Mutex<SessionState>,
}

pub(crate) struct SessionState {
    /// Sequence of the newest dispatch; 0 before READY.
    pub(crate) seq: u64,
    /// The newest dispatches, oldest first, bounded by the resume buffer size.
    buffer: VecDeque<(u64, Arc<str>)>,
    buffer_limit: usize,
    /// The connection that receives new dispatches, if any.
    pub(crate) attached: Option<(u64, OutgoingSender)>,
    /// When the last connection ended; `None` while attached.
    pub(crate) detached_at: Option<Instant>,
    /// `false` once the session can no longer be resumed.
    pub(crate) resumable: bool,
}

/// Why a RESUME cannot continue a session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResumeError {
    /// The session is invalid or expired: op 9 `false`.
    NotResumable,
    /// The client's sequence is ahead of the session: close 4007.
    SequenceAhead { requested: u64, latest: u64 },
    /// The client's sequence is older than the replay buffer: op 9 `false`.
    SequenceTooOld { requested: u64, oldest: u64 },
}

impl Session {
    pub(crate) fn new(
        id: String,
        shard: u32,
        intents: Intents,
        large_threshold: u32,
        buffer_limit: usize,
    ) -> Self {
        Self {
            id,
            shard,
            intents,
            large_threshold,
            state: Mutex::new(SessionState {
                seq: 0,
                buffer: VecDeque::new(),
                buffer_limit,
                attached: None,
                detached_at: Some(Instant::now()),
                resumable: true,
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Assigns the next sequence number to an event, keeps it for replay and sends it to the
    /// attached connection. Returns the sequence, or `None` for a session that is no longer
    /// resumable (its events are gone, as on Discord).
    pub(crate) fn dispatch(
        &self,
        event: &str,
        data: &RawValue,
        recorder: &Recorder,
    ) -> Option<u64> {
        let mut state = self.lock();
        if !state.resumable {
            return None;
        }

        state.seq += 1;
        let seq = state.seq;
        let frame: Arc<str> = encode_dispatch(seq, event, data).into();
        if state.buffer.len() == state.buffer_limit {
            state.buffer.pop_front();
        }
        state.buffer.push_back((seq, frame.clone()));
        if let Some((_, sender)) = &state.attached {
            // A closed queue means the connection is ending; the frame stays in the buffer for a
            // resume.
            let _ = sender.send(Outgoing::Frame(frame));
        }

        recorder.update(|report| {
            report.dispatches_sent += 1;
            if let Some(record) = report.sessions.get_mut(&self.id) {
                record.last_seq = seq;
                record.dispatches += 1;
            }
        });
        Some(seq)
    }

    /// Attaches a connection that just identified.
    pub(crate) fn attach(&self, connection: u64, sender: OutgoingSender) {
        let mut state = self.lock();
        state.attached = Some((connection, sender));
        state.detached_at = None;
    }

    /// Detaches a connection that ended, if it is the attached one.
    pub(crate) fn detach(&self, connection: u64) {
        let mut state = self.lock();
        if matches!(state.attached, Some((id, _)) if id == connection) {
            state.attached = None;
            state.detached_at = Some(Instant::now());
        }
    }

    /// Makes the session unresumable and detaches its connection.
    pub(crate) fn invalidate(&self, recorder: &Recorder) {
        let mut state = self.lock();
        state.resumable = false;
        state.buffer.clear();
        state.attached = None;
        state.detached_at.get_or_insert_with(Instant::now);
        drop(state);
        recorder.with_session(&self.id, |record| record.resumable = false);
    }

    /// Resumes the session on a new connection: queues every buffered dispatch after `seq` on it,
    /// then attaches it, under one lock so that no new dispatch lands between the replay and the
    /// live stream. Returns the displaced connection's queue, if another one was attached, and the
    /// number of dispatches replayed.
    pub(crate) fn resume(
        &self,
        seq: u64,
        connection: u64,
        sender: OutgoingSender,
    ) -> Result<(Option<OutgoingSender>, u64), ResumeError> {
        let mut state = self.lock();
        if !state.resumable {
            return Err(ResumeError::NotResumable);
        }
        if seq > state.seq {
            return Err(ResumeError::SequenceAhead {
                requested: seq,
                latest: state.seq,
            });
        }
        if let Some(&(oldest, _)) = state.buffer.front() {
            if seq + 1 < oldest {
                return Err(ResumeError::SequenceTooOld {
                    requested: seq,
                    oldest,
                });
            }
        }

        let mut replayed = 0;
        for (_, frame) in state.buffer.iter().filter(|(s, _)| *s > seq) {
            let _ = sender.send(Outgoing::Frame(frame.clone()));
            replayed += 1;
        }
        let displaced = state
            .attached
            .replace((connection, sender))
            .map(|(_, previous)| previous);
        state.detached_at = None;
        Ok((displaced, replayed))
    }
}
