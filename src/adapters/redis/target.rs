//! The state one target shares between the pushing shards, `flush` and its writer task: the
//! bounded buffer, the delivery progress and the counters.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Semaphore, SemaphorePermit, TryAcquireError};

use super::options::Overflow;

/// One event as a target sends it: the list key and the JSON text.
#[derive(Debug)]
pub(super) struct Event {
    pub(super) key: String,
    pub(super) data: Bytes,
}

/// The event names a target receives.
#[derive(Debug)]
pub(super) enum Filter {
    All,
    Only(HashSet<String>),
}

impl Filter {
    /// Builds the filter of a target: its own list when it has a non-empty one, else the global
    /// whitelist, and every event when both are empty.
    pub(super) fn new(own: Option<&[String]>, global: &[String]) -> Self {
        let names = match own {
            Some(own) if !own.is_empty() => own,
            _ => global,
        };
        if names.is_empty() {
            Self::All
        } else {
            Self::Only(names.iter().cloned().collect())
        }
    }

    fn accepts(&self, event: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.contains(event),
        }
    }

    /// Returns the names for the start-up log, or `None` for every event.
    pub(super) fn names(&self) -> Option<Vec<&str>> {
        match self {
            Self::All => None,
            Self::Only(names) => {
                let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
                names.sort_unstable();
                Some(names)
            }
        }
    }
}

/// How far the writer has got, watched by `flush`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Progress {
    /// Events taken from the queue and accepted by Redis, in queue order. It moves a whole
    /// batch at a time, so every event counted before it has been accepted.
    pub(super) resolved: u64,
    /// The last attempt to send failed and no later one has succeeded.
    pub(super) down: bool,
}

/// Statistics of one target, from [`super::RedisSink::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetStats {
    /// The target's address with any credentials replaced by `***`.
    pub address: String,
    /// Events Redis accepted.
    pub pushed: u64,
    /// Events in the buffer now, including the batch being sent.
    pub buffered: u64,
    /// Events dropped because the buffer was full (only with [`Overflow::Drop`]).
    pub dropped: u64,
    /// Outages that ended after the connection had failed or timed out.
    pub reconnects: u64,
    /// Events sent again after a failed or timed-out attempt. Duplicates in Redis can come only
    /// from these, so this is an upper bound on them.
    pub resent: u64,
    /// Whether the last attempt to send succeeded (or none has failed yet).
    pub up: bool,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) pushed: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) resent: AtomicU64,
}

/// Error of a target that is closed: the event was not queued.
#[derive(Debug)]
pub(super) struct Closed;

/// A target's buffer and counters.
///
/// The buffer is a semaphore of free slots in front of an unbounded channel. `push` takes a
/// slot before it queues an event, and the writer gives it back once Redis accepts the event.
/// The slots therefore bound both the queued events and the batch in flight.
#[derive(Debug)]
pub(super) struct Target {
    /// Address with credentials hidden, for logs.
    pub(super) label: String,
    filter: Filter,
    pub(super) overflow: Overflow,
    capacity: usize,
    slots: Semaphore,
    queue: mpsc::UnboundedSender<Arc<Event>>,
    /// Events queued so far; `flush` waits until the writer has resolved this many.
    queued: AtomicU64,
    progress: watch::Sender<Progress>,
    pub(super) counters: Counters,
    /// Whether the buffer is in a dropping episode, so that it is logged once.
    dropping: AtomicBool,
    /// Events dropped in the current episode.
    dropped_in_episode: AtomicU64,
}

impl Target {
    /// Creates a target and returns the receiving end of its queue, for its writer.
    pub(super) fn new(
        label: String,
        filter: Filter,
        overflow: Overflow,
        capacity: usize,
    ) -> (Self, mpsc::UnboundedReceiver<Arc<Event>>) {
        let (queue, receiver) = mpsc::unbounded_channel();
        let target = Self {
            label,
            filter,
            overflow,
            capacity,
            slots: Semaphore::new(capacity),
            queue,
            queued: AtomicU64::new(0),
            progress: watch::Sender::new(Progress::default()),
            counters: Counters::default(),
            dropping: AtomicBool::new(false),
            dropped_in_episode: AtomicU64::new(0),
        };
        (target, receiver)
    }

    pub(super) fn accepts(&self, event: &str) -> bool {
        self.filter.accepts(event)
    }

    pub(super) fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Takes a buffer slot for one event. Returns `None` when the buffer is full and the target
    /// drops events; with [`Overflow::Wait`] it waits for a slot instead.
    pub(super) async fn reserve(&self) -> Result<Option<SemaphorePermit<'_>>, Closed> {
        let permit = match self.overflow {
            Overflow::Wait => self.slots.acquire().await.map_err(|_| Closed)?,
            Overflow::Drop => match self.slots.try_acquire() {
                Ok(permit) => permit,
                Err(TryAcquireError::NoPermits) => {
                    self.record_drop();
                    return Ok(None);
                }
                Err(TryAcquireError::Closed) => return Err(Closed),
            },
        };

        if self.dropping.load(Ordering::Relaxed) && self.dropping.swap(false, Ordering::Relaxed) {
            let dropped = self.dropped_in_episode.swap(0, Ordering::Relaxed);
            tracing::info!(
                target = %self.label,
                dropped,
                "redis target buffer has room again; events are accepted"
            );
        }
        Ok(Some(permit))
    }

    fn record_drop(&self) {
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_in_episode.fetch_add(1, Ordering::Relaxed);
        if !self.dropping.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target = %self.label,
                buffer_events = self.capacity,
                "redis target buffer full; dropping events until it has room"
            );
        }
    }

    /// Queues an event in the slot taken by [`Self::reserve`].
    pub(super) fn enqueue(
        &self,
        event: Arc<Event>,
        slot: SemaphorePermit<'_>,
    ) -> Result<(), Closed> {
        // Counted before it is sent, so that the mark read by a later `flush` covers every
        // event already in the queue. Events still on their way in only raise the mark, and
        // the writer resolves events in queue order.
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.queue.send(event).map_err(|_| Closed)?;

        // The writer returns the slot once Redis accepts the event.
        slot.forget();
        Ok(())
    }

    /// Returns the number of events queued so far, the mark that `flush` waits for.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    /// Waits until every event up to `mark` is accepted, or, for a target that drops events,
    /// until the target is down.
    pub(super) async fn settled(&self, mark: u64) {
        let skip_when_down = self.overflow == Overflow::Drop;
        let mut progress = self.progress.subscribe();
        // The sender lives in `self`, so the wait ends only when the condition holds.
        let _ = progress
            .wait_for(|progress| progress.resolved >= mark || (skip_when_down && progress.down))
            .await;
    }

    /// Returns the number of queued events Redis has not accepted yet.
    pub(super) fn undelivered(&self) -> u64 {
        self.queued()
            .saturating_sub(self.progress.borrow().resolved)
    }

    /// Records a batch as accepted and frees its slots.
    pub(super) fn resolve(&self, events: usize) {
        self.slots.add_permits(events);
        self.progress
            .send_modify(|progress| progress.resolved += events as u64);
    }

    pub(super) fn set_down(&self, down: bool) {
        self.progress.send_if_modified(|progress| {
            let changed = progress.down != down;
            progress.down = down;
            changed
        });
    }

    /// Makes every waiting and later `reserve` fail, for shutdown.
    pub(super) fn close_buffer(&self) {
        self.slots.close();
    }

    pub(super) fn stats(&self) -> TargetStats {
        let free = self.slots.available_permits();
        TargetStats {
            address: self.label.clone(),
            pushed: self.counters.pushed.load(Ordering::Relaxed),
            buffered: self.capacity.saturating_sub(free) as u64,
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            reconnects: self.counters.reconnects.load(Ordering::Relaxed),
            resent: self.counters.resent.load(Ordering::Relaxed),
            up: !self.progress.borrow().down,
        }
    }
}
