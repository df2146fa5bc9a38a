//! Heartbeats of one gateway connection, apart from the actor's event processing.
//!
//! A shard whose store or sink is slow stops taking frames, and its reader stops reading
//! (backpressure). Heartbeats must go on meanwhile, or the gateway ends the session after its
//! heartbeat timeout and the events it still had queued for the shard are lost. So each
//! connection runs a heartbeat task of its own, next to its reader and writer. The reader
//! records the sequence and the ACKs, and the task sends the beats through the writer. The
//! actor only receives an event when the connection is a zombie.
//!
//! A connection is a zombie when a beat went unacknowledged for a whole interval while the
//! reader was free to read. While the reader waits for the actor, an ACK may sit unread in the
//! socket, so a missing ACK proves nothing and the task keeps beating.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::connection::Outgoing;
use super::{Event, ShardMsg};
use crate::gateway::ClientPayload;

/// Heartbeat figures of a connection, for the status command.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PulseReading {
    pub(crate) since_last_ack: Option<Duration>,
    pub(crate) latency: Option<Duration>,
}

#[derive(Default)]
struct Beats {
    /// A regular beat went out and its ACK has not been read.
    awaiting_ack: bool,
    sent_at: Option<Instant>,
    /// Reader stalls counted when the regular beat went out.
    stalls_at_beat: u64,
    /// The reader was waiting for the actor when the regular beat went out.
    stalled_at_beat: bool,
    last_ack: Option<Instant>,
    latency: Option<Duration>,
}

/// Heartbeat state of one connection, shared by its reader, its heartbeat task and the actor.
pub(crate) struct Pulse {
    beats: Mutex<Beats>,
    /// Sequence of the newest dispatch read on this connection (or of the resumed session
    /// before the first one); 0 means none.
    seq: AtomicU64,
    /// Times the reader had to wait for the actor to take a frame.
    stalls: AtomicU64,
    /// The reader is waiting for the actor now.
    stalled: AtomicBool,
    /// Woken when the gateway requests a beat (op 1).
    requested: Notify,
}

impl Pulse {
    pub(crate) fn new(seq: u64) -> Arc<Self> {
        Arc::new(Self {
            beats: Mutex::new(Beats::default()),
            seq: AtomicU64::new(seq),
            stalls: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            requested: Notify::new(),
        })
    }

    fn beats(&self) -> std::sync::MutexGuard<'_, Beats> {
        self.beats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the sequence of a dispatch the reader read.
    pub(crate) fn received(&self, seq: u64) {
        self.seq.fetch_max(seq, Ordering::Relaxed);
    }

    /// Records a HEARTBEAT_ACK the reader read.
    pub(crate) fn acknowledged(&self) {
        let now = Instant::now();
        let mut beats = self.beats();
        beats.awaiting_ack = false;
        beats.last_ack = Some(now);
        beats.latency = beats.sent_at.map(|sent| now - sent);
    }

    /// Sends a beat now, as the gateway requested.
    pub(crate) fn beat_requested(&self) {
        self.requested.notify_one();
    }

    /// Records that the reader starts waiting for the actor.
    pub(crate) fn stall_began(&self) {
        self.stalls.fetch_add(1, Ordering::AcqRel);
        self.stalled.store(true, Ordering::Release);
    }

    /// Records that the reader may read again.
    pub(crate) fn stall_ended(&self) {
        self.stalled.store(false, Ordering::Release);
    }

    pub(crate) fn reading(&self) -> PulseReading {
        let beats = self.beats();
        PulseReading {
            since_last_ack: beats.last_ack.map(|at| at.elapsed()),
            latency: beats.latency,
        }
    }

    /// Returns whether the last regular beat is unanswered although the reader could read all
    /// along since it went out.
    fn is_zombie(&self) -> bool {
        let beats = self.beats();
        beats.awaiting_ack
            && !beats.stalled_at_beat
            && !self.stalled.load(Ordering::Acquire)
            && self.stalls.load(Ordering::Acquire) == beats.stalls_at_beat
    }

    /// Marks a regular beat as sent now.
    fn beat_sent(&self) {
        let mut beats = self.beats();
        beats.awaiting_ack = true;
        beats.sent_at = Some(Instant::now());
        beats.stalled_at_beat = self.stalled.load(Ordering::Acquire);
        beats.stalls_at_beat = self.stalls.load(Ordering::Acquire);
    }

    fn payload(&self) -> String {
        let seq = self.seq.load(Ordering::Relaxed);
        ClientPayload::Heartbeat {
            seq: (seq > 0).then_some(seq),
        }
        .encode()
    }
}

/// Beats every `interval`, the first after a random part of it, as Discord requires, so that
/// shards reconnecting together do not beat together. Ends when the writer is gone or after telling the
/// actor that the connection is a zombie.
pub(crate) async fn run(
    pulse: Arc<Pulse>,
    interval: Duration,
    urgent: mpsc::UnboundedSender<Outgoing>,
    connection: u64,
    actor: ActorRef<ShardMsg>,
) {
    let mut next = Instant::now() + interval.mul_f64(rand::random::<f64>());
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                if pulse.is_zombie() {
                    let _ = actor.cast(ShardMsg::from(Event::Zombie { connection, interval }));
                    return;
                }
                pulse.beat_sent();
                if urgent.send(Outgoing::Urgent(pulse.payload())).is_err() {
                    return;
                }
                next = Instant::now() + interval;
            }
            // A requested beat does not move the regular schedule.
            () = pulse.requested.notified() => {
                pulse.beats().sent_at = Some(Instant::now());
                if urgent.send(Outgoing::Urgent(pulse.payload())).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ractor::{Actor, ActorProcessingErr, ActorRef};

    use super::*;
    use crate::shard::ShardEvent;

    /// Stands in for the ShardActor and reports the zombie events it receives.
    struct Probe;

    impl Actor for Probe {
        type Msg = ShardMsg;
        type State = mpsc::UnboundedSender<u64>;
        type Arguments = mpsc::UnboundedSender<u64>;

        async fn pre_start(
            &self,
            _myself: ActorRef<ShardMsg>,
            zombies: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(zombies)
        }

        async fn handle(
            &self,
            _myself: ActorRef<ShardMsg>,
            message: ShardMsg,
            zombies: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let ShardMsg::Event(ShardEvent(Event::Zombie { connection, .. })) = message {
                let _ = zombies.send(connection);
            }
            Ok(())
        }
    }

    const INTERVAL: Duration = Duration::from_secs(10);

    struct Beating {
        pulse: Arc<Pulse>,
        sent: mpsc::UnboundedReceiver<Outgoing>,
        zombies: mpsc::UnboundedReceiver<u64>,
        task: tokio::task::JoinHandle<()>,
        probe: ActorRef<ShardMsg>,
    }

    impl Beating {
        async fn start(seq: u64) -> Self {
            let (zombies_tx, zombies) = mpsc::unbounded_channel();
            let (probe, _) = Actor::spawn(None, Probe, zombies_tx).await.unwrap();
            let pulse = Pulse::new(seq);
            let (urgent, sent) = mpsc::unbounded_channel();
            let task = tokio::spawn(run(pulse.clone(), INTERVAL, urgent, 7, probe.clone()));
            Self {
                pulse,
                sent,
                zombies,
                task,
                probe,
            }
        }

        /// Waits for the next beat and returns its sequence.
        async fn next_beat(&mut self) -> Option<u64> {
            let Some(Outgoing::Urgent(text)) = self.sent.recv().await else {
                panic!("the heartbeat task sent something other than a beat");
            };
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(value["op"], 1, "not a heartbeat: {text}");
            value["d"].as_u64()
        }

        async fn stop(self) {
            self.task.abort();
            self.probe.stop(None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_beats_go_on_with_the_newest_sequence() {
        let mut beating = Beating::start(0).await;
        assert_eq!(beating.next_beat().await, None);
        for seq in [5, 9, 30] {
            beating.pulse.acknowledged();
            beating.pulse.received(seq);
            assert_eq!(beating.next_beat().await, Some(seq));
        }
        assert!(beating.pulse.reading().latency.is_some());
        assert!(beating.zombies.try_recv().is_err());
        beating.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_beat_means_zombie() {
        let mut beating = Beating::start(12).await;
        assert_eq!(beating.next_beat().await, Some(12));
        assert_eq!(beating.zombies.recv().await, Some(7));
        // The task ends after reporting: no beat follows.
        assert!(beating.sent.recv().await.is_none());
        beating.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_reader_excuses_missing_acks() {
        let mut beating = Beating::start(0).await;
        beating.next_beat().await;
        beating.pulse.stall_began();
        for _ in 0..20 {
            beating.next_beat().await;
        }
        // A stall that ends just before a check still excuses the beat sent during it.
        beating.pulse.stall_ended();
        beating.next_beat().await;
        // The beat sent after the stall is judged on its own: no ACK means a zombie.
        assert_eq!(beating.zombies.recv().await, Some(7));
        beating.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn short_stall_after_a_beat_excuses_it() {
        let mut beating = Beating::start(0).await;
        beating.next_beat().await;
        beating.pulse.stall_began();
        beating.pulse.stall_ended();
        beating.next_beat().await;
        assert!(beating.zombies.try_recv().is_err());
        beating.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn requested_beat_keeps_schedule() {
        let mut beating = Beating::start(3).await;
        beating.next_beat().await;
        let regular = tokio::time::Instant::now();
        beating.pulse.acknowledged();
        beating.pulse.beat_requested();
        assert_eq!(beating.next_beat().await, Some(3));
        assert_eq!(tokio::time::Instant::now(), regular);
        beating.next_beat().await;
        assert_eq!(tokio::time::Instant::now(), regular + INTERVAL);
        beating.stop().await;
    }
}
