//! The IdentifyCoordinator: grants the identify lease of a bucket to one shard at a time and
//! frees the bucket on its own timer.
//!
//! Discord accepts one IDENTIFY per bucket (`shard_id % max_concurrency`) per 5 seconds. A shard
//! dials and reads HELLO first, then asks for its bucket's lease, calls
//! [`CoordinatorMsg::BeginIdentify`], sends IDENTIFY and reports [`CoordinatorMsg::IdentifyWritten`]
//! once the frame left its socket. The coordinator releases the bucket `pacing + grace` after
//! that report, whether READY arrived or not, so a slow READY never wedges a bucket. Timing the
//! hold from the write rather than from the grant keeps a shard whose writer task ran late from
//! shortening the gap to the next IDENTIFY. A holder that stops or hands the lease back before IDENTIFY frees the bucket at once.
//! The release timer belongs to the coordinator: a restarted shard cannot carry it along, and a
//! timer of an old lease finds a newer lease id and does nothing.
//!
//! Two things keep the hand-over between holders short. While a bucket is held and shards wait
//! for it, the coordinator already acquires the next backend lock, so a fleet-wide backend queues
//! it behind the holder and grants it as soon as the holder's lock is released. And the backend's
//! `begin_identify` runs in a task of its own, so a round trip to the backend for one bucket never
//! delays the timers and grants of the others.

mod backend;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

pub use backend::{BackendLock, IdentifyBackend, IdentifyRefusal, InProcessBackend, SessionBudget};

use crate::store::PortError;

/// The right to send one IDENTIFY in a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Unique for the coordinator's lifetime; timers and messages name the lease they are for.
    pub id: u64,
    pub bucket: u32,
}

/// Settings of the coordinator.
#[derive(Clone)]
pub struct CoordinatorArgs {
    pub max_concurrency: u32,
    /// How long a bucket stays held after IDENTIFY; Discord's window is 5 s.
    pub pacing: Duration,
    /// Added to `pacing` to absorb clock and network jitter between this process and Discord.
    pub grace: Duration,
    /// A lease whose holder has not called `BeginIdentify` after this long is taken back.
    pub unsent_timeout: Duration,
    /// First delay before retrying a backend that failed; doubles up to 30 s.
    pub backend_retry: Duration,
    pub backend: Arc<dyn IdentifyBackend>,
}

/// One bucket in the status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketStatus {
    pub bucket: u32,
    /// Shard holding the lease, if any.
    pub holder: Option<u32>,
    /// `true` once the holder sent IDENTIFY (the bucket then frees on the timer).
    pub sent: bool,
    /// Milliseconds the lease has been held.
    pub held_ms: Option<u64>,
    /// Waiting shards, in the order they will be served.
    pub waiting: Vec<u32>,
    /// Leases granted in this bucket so far.
    pub granted: u64,
}

/// Messages of the coordinator.
pub enum CoordinatorMsg {
    /// Ask for the lease of a shard's bucket. The reply comes when it is granted; a requester
    /// that is gone by then (its reply port closed) is skipped.
    Acquire {
        shard: u32,
        holder: ActorId,
        reply: RpcReplyPort<Lease>,
    },
    /// The holder is about to send IDENTIFY: replies `true` and starts the release timer if the
    /// lease is still held (in this process and in the backend) and a session start is left,
    /// `false` otherwise, in which case IDENTIFY must not be sent.
    BeginIdentify {
        lease: Lease,
        reply: RpcReplyPort<bool>,
    },
    /// The holder's IDENTIFY left its socket: the pacing window starts now.
    IdentifyWritten { lease: Lease },
    /// The holder gives back a lease it did not use. Ignored once IDENTIFY was begun: the bucket
    /// then frees only on the timer.
    Release { lease: Lease },
    /// An actor stopped: its waits are dropped and an unused lease it held is freed.
    HolderStopped { holder: ActorId },
    /// Report every bucket.
    Status(RpcReplyPort<Vec<BucketStatus>>),
    /// Stop granting, free every unused lease at once, and reply once every lease whose IDENTIFY
    /// went out has reached the end of its pacing window and was released. A process that exits
    /// after this leaves no bucket locked behind it.
    Drain(RpcReplyPort<()>),
    /// Internal: the result of the backend's `begin_identify` for a `BeginIdentify`, with the
    /// holder's reply port.
    BeginFinished {
        lease: Lease,
        result: Result<(), IdentifyRefusal>,
        reply: RpcReplyPort<bool>,
    },
    /// Internal: the result of a backend acquire.
    BackendAcquired {
        bucket: u32,
        result: Result<BackendLock, String>,
    },
    /// Internal: retry a bucket whose backend acquire failed (sent by the coordinator's own
    /// timer only).
    Retry { bucket: u32 },
    /// Internal: the pacing window of a lease ended.
    PacingElapsed { lease: Lease },
    /// Internal: a lease was held too long without IDENTIFY.
    UnsentElapsed { lease: Lease },
    /// Internal: the session-start budget's reset time passed.
    BudgetReset,
}

struct Waiter {
    holder: ActorId,
    reply: RpcReplyPort<Lease>,
}

/// How far the holder of a lease has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Granted, no `BeginIdentify` yet: a release or a stopped holder frees the bucket at once.
    Granted,
    /// The backend is confirming the lock and spending a session start. Its result may allow an
    /// IDENTIFY, so nothing but that result frees the bucket.
    Beginning,
    /// `BeginIdentify` succeeded: the bucket now frees only on the pacing timer.
    Sent,
    /// The holder reported the IDENTIFY written; the pacing timer runs from then.
    Written,
}

struct Holding {
    lease: Lease,
    shard: u32,
    holder: ActorId,
    since: Instant,
    stage: Stage,
    lock: BackendLock,
    /// The pending timer of this lease, aborted when the lease ends first.
    timer: Option<JoinHandle<()>>,
}

impl Holding {
    /// Returns `true` once `BeginIdentify` succeeded, when the bucket frees only on the timer.
    fn sent(&self) -> bool {
        matches!(self.stage, Stage::Sent | Stage::Written)
    }

    /// Replaces the lease's timer with a pacing timer of `hold`.
    fn restart_timer(&mut self, myself: &ActorRef<CoordinatorMsg>, hold: Duration) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
        let lease = self.lease;
        let coordinator = myself.clone();
        self.timer = Some(tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let _ = coordinator.cast(CoordinatorMsg::PacingElapsed { lease });
        }));
    }
}

#[derive(Default)]
struct Bucket {
    /// Waiters keyed by (shard, arrival), so shards are served in shard order.
    waiters: BTreeMap<(u32, u64), Waiter>,
    holding: Option<Holding>,
    /// A backend lock acquired for the next waiter while the bucket was still held.
    ready: Option<BackendLock>,
    /// A backend acquire (or the timer before retrying one) is in flight.
    acquiring: Option<JoinHandle<()>>,
    failures: u32,
    granted: u64,
}

/// State of the coordinator.
pub struct CoordinatorState {
    args: CoordinatorArgs,
    buckets: Vec<Bucket>,
    next_lease: u64,
    next_arrival: u64,
    /// Buckets whose backend is failing, so an outage is logged once, not per retry.
    failing: HashMap<u32, Instant>,
    /// No lease is granted before this: the session-start budget is at its reserve.
    budget_blocked_until: Option<Instant>,
    /// Set by `Drain`: nothing is granted any more; the replies wait for the last release.
    draining: Vec<RpcReplyPort<()>>,
    drained: bool,
    /// Backend releases in flight, awaited before a drain is answered.
    releases: Vec<JoinHandle<()>>,
}

/// The IdentifyCoordinator actor.
pub struct IdentifyCoordinator;

impl Actor for IdentifyCoordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: CoordinatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if args.max_concurrency == 0 {
            return Err("max_concurrency must be at least 1".into());
        }
        tracing::info!(
            backend = args.backend.name(),
            buckets = args.max_concurrency,
            pacing_ms = args.pacing.as_millis() as u64,
            grace_ms = args.grace.as_millis() as u64,
            "identify coordinator started"
        );
        Ok(CoordinatorState {
            buckets: (0..args.max_concurrency)
                .map(|_| Bucket::default())
                .collect(),
            args,
            next_lease: 1,
            next_arrival: 0,
            failing: HashMap::new(),
            budget_blocked_until: None,
            draining: Vec::new(),
            drained: false,
            releases: Vec::new(),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for bucket in &mut state.buckets {
            if let Some(task) = bucket.acquiring.take() {
                task.abort();
            }
            // A lock whose IDENTIFY went out must outlive its pacing window: releasing it
            // here would let another process identify inside the window. It lapses with its
            // lease instead. Unused locks are released at once. That includes a lock whose
            // `begin_identify` is still running, since its result can no longer reach the holder.
            if let Some(holding) = bucket.holding.take() {
                if let Some(timer) = &holding.timer {
                    timer.abort();
                }
                if !holding.sent() {
                    let _ = state.args.backend.release(holding.lock).await;
                }
            }
            if let Some(lock) = bucket.ready.take() {
                let _ = state.args.backend.release(lock).await;
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CoordinatorMsg::Acquire {
                shard,
                holder,
                reply,
            } => state.enqueue(&myself, shard, holder, reply),
            CoordinatorMsg::BeginIdentify { lease, reply } => {
                state.begin_identify(&myself, lease, reply)
            }
            CoordinatorMsg::BeginFinished {
                lease,
                result,
                reply,
            } => state.begin_finished(&myself, lease, result, reply),
            CoordinatorMsg::Release { lease } => {
                state.release_unsent(&myself, lease, "handed back")
            }
            CoordinatorMsg::HolderStopped { holder } => state.holder_stopped(&myself, holder),
            CoordinatorMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            CoordinatorMsg::Drain(reply) => state.drain(&myself, reply),
            CoordinatorMsg::BackendAcquired { bucket, result } => {
                state.backend_acquired(&myself, bucket, result);
            }
            CoordinatorMsg::Retry { bucket } => {
                state.buckets[bucket as usize].acquiring = None;
                state.pump(&myself, bucket);
            }
            CoordinatorMsg::IdentifyWritten { lease } => state.identify_written(&myself, lease),
            CoordinatorMsg::PacingElapsed { lease } => state.pacing_elapsed(&myself, lease),
            CoordinatorMsg::BudgetReset => {
                if state
                    .budget_blocked_until
                    .is_some_and(|until| Instant::now() >= until)
                {
                    tracing::info!("session-start budget reset; identifying again");
                    state.budget_blocked_until = None;
                    for bucket in 0..state.buckets.len() as u32 {
                        state.pump(&myself, bucket);
                    }
                }
            }
            CoordinatorMsg::UnsentElapsed { lease } => {
                state.release_unsent(&myself, lease, "not used in time");
            }
        }
        Ok(())
    }
}

impl CoordinatorState {
    fn enqueue(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        shard: u32,
        holder: ActorId,
        reply: RpcReplyPort<Lease>,
    ) {
        let bucket = crate::gateway::identify_bucket(shard, self.args.max_concurrency);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        tracing::debug!(shard, bucket, "lease requested");
        self.buckets[bucket as usize]
            .waiters
            .insert((shard, arrival), Waiter { holder, reply });
        self.pump(myself, bucket);
    }

    /// Grants the ready lock of a free bucket to its first waiter, and starts a backend acquire
    /// whenever shards wait and no lock is ready or being acquired. The acquire starts while the
    /// bucket is still held, so the next lock is queued before the holder's window ends.
    fn pump(&mut self, myself: &ActorRef<CoordinatorMsg>, bucket: u32) {
        if self.drained {
            self.answer_drain();
            return;
        }
        if self.budget_blocked_until.is_some() {
            return;
        }
        let state = &mut self.buckets[bucket as usize];
        state.waiters.retain(|_, waiter| !waiter.reply.is_closed());
        if state.waiters.is_empty() {
            if let Some(lock) = state.ready.take() {
                self.release_backend(lock);
            }
            return;
        }
        if state.holding.is_none() {
            if let Some(lock) = state.ready.take() {
                self.grant(myself, bucket, lock);
            }
        }

        let state = &mut self.buckets[bucket as usize];
        if state.acquiring.is_some() || state.ready.is_some() || state.waiters.is_empty() {
            return;
        }
        let backend = self.args.backend.clone();
        let hold = self.args.pacing * 2 + self.args.grace + self.args.unsent_timeout;
        let coordinator = myself.clone();
        state.acquiring = Some(tokio::spawn(async move {
            let result = backend
                .acquire(bucket, hold)
                .await
                .map_err(|error| error.to_string());
            let _ = coordinator.cast(CoordinatorMsg::BackendAcquired { bucket, result });
        }));
    }

    fn backend_acquired(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        bucket: u32,
        result: Result<BackendLock, String>,
    ) {
        let retry_base = self.args.backend_retry;
        let state = &mut self.buckets[bucket as usize];
        state.acquiring = None;

        let lock = match result {
            Ok(lock) => lock,
            Err(error) => {
                state.failures += 1;
                let delay = backoff(retry_base, state.failures);
                if self.failing.insert(bucket, Instant::now()).is_none() {
                    tracing::warn!(bucket, %error, retry_ms = delay.as_millis() as u64, "identify backend failed; no shard of this bucket identifies until it recovers");
                }
                // The retry timer takes the place of the acquire, so nothing else starts one.
                let coordinator = myself.clone();
                state.acquiring = Some(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = coordinator.cast(CoordinatorMsg::Retry { bucket });
                }));
                return;
            }
        };
        state.failures = 0;
        if let Some(since) = self.failing.remove(&bucket) {
            tracing::info!(
                bucket,
                outage_ms = since.elapsed().as_millis() as u64,
                "identify backend recovered"
            );
        }

        // A lock that arrives during a drain or while the budget is at the reserve would only
        // keep other processes out of the bucket.
        let unusable = self.drained || self.budget_blocked_until.is_some();
        let state = &mut self.buckets[bucket as usize];
        if unusable || state.ready.is_some() {
            self.release_backend(lock);
            return;
        }
        state.ready = Some(lock);
        self.pump(myself, bucket);
    }

    /// Hands a backend lock to the first waiter still listening.
    fn grant(&mut self, myself: &ActorRef<CoordinatorMsg>, bucket: u32, lock: BackendLock) {
        let unsent_timeout = self.args.unsent_timeout;
        let state = &mut self.buckets[bucket as usize];
        while let Some(((shard, _), waiter)) = state.waiters.pop_first() {
            let lease = Lease {
                id: self.next_lease,
                bucket,
            };
            self.next_lease += 1;
            if waiter.reply.send(lease).is_err() {
                continue;
            }

            tracing::debug!(shard, bucket, lease = lease.id, "lease granted");
            let coordinator = myself.clone();
            let timer = tokio::spawn(async move {
                tokio::time::sleep(unsent_timeout).await;
                let _ = coordinator.cast(CoordinatorMsg::UnsentElapsed { lease });
            });
            state.granted += 1;
            state.holding = Some(Holding {
                lease,
                shard,
                holder: waiter.holder,
                since: Instant::now(),
                stage: Stage::Granted,
                lock,
                timer: Some(timer),
            });
            return;
        }

        // Every waiter left while the backend was acquiring.
        self.release_backend(lock);
    }

    /// Asks the backend, in a task of its own, to confirm the lock and spend a session start.
    /// The holder gets its reply when the backend has finished (`begin_finished`).
    fn begin_identify(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        lease: Lease,
        reply: RpcReplyPort<bool>,
    ) {
        let holding = self
            .buckets
            .get_mut(lease.bucket as usize)
            .and_then(|bucket| bucket.holding.as_mut())
            .filter(|h| h.lease == lease && h.stage == Stage::Granted);
        let Some(holding) = holding else {
            let _ = reply.send(false);
            return;
        };
        holding.stage = Stage::Beginning;

        let backend = self.args.backend.clone();
        let lock = holding.lock;
        let coordinator = myself.clone();
        tokio::spawn(async move {
            let result = backend.begin_identify(lock).await;
            let _ = coordinator.cast(CoordinatorMsg::BeginFinished {
                lease,
                result,
                reply,
            });
        });
    }

    fn begin_finished(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        lease: Lease,
        result: Result<(), IdentifyRefusal>,
        reply: RpcReplyPort<bool>,
    ) {
        // Only this result ends the `Beginning` stage, so the lease is still held here.
        let bucket = &mut self.buckets[lease.bucket as usize];
        let Some(holding) = bucket
            .holding
            .as_mut()
            .filter(|h| h.lease == lease && h.stage == Stage::Beginning)
        else {
            let _ = reply.send(false);
            return;
        };
        if let Err(refusal) = result {
            let shard = holding.shard;
            let lock = holding.lock;
            if let Some(timer) = holding.timer.take() {
                timer.abort();
            }
            bucket.holding = None;
            self.release_backend(lock);
            self.refused(myself, lease.bucket, shard, refusal);
            let _ = reply.send(false);
            return;
        }

        // Until the holder reports the write, the bucket is held long enough for a write that
        // takes a whole extra pacing window; a holder that never reports (its connection died)
        // thus frees the bucket late, never early.
        holding.stage = Stage::Sent;
        let hold = self.args.pacing * 2 + self.args.grace;
        holding.restart_timer(myself, hold);
        tracing::debug!(
            bucket = lease.bucket,
            shard = holding.shard,
            lease = lease.id,
            "IDENTIFY begun"
        );
        let _ = reply.send(true);
    }

    /// Handles a refused IDENTIFY. A lost lock is retried at once; an exhausted budget stops
    /// every grant until it resets, since any IDENTIFY below the reserve risks the token.
    fn refused(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        bucket: u32,
        shard: u32,
        refusal: IdentifyRefusal,
    ) {
        match refusal {
            IdentifyRefusal::BudgetExhausted { reset_in, .. } => {
                let until = Instant::now() + reset_in;
                if self.budget_blocked_until.is_none() {
                    tracing::error!(shard, %refusal, "IDENTIFY refused: session starts are at the reserve; no shard identifies until the budget resets, resumes go on");
                }
                self.budget_blocked_until = Some(until);
                // Queued locks would keep the other processes out of their buckets until the
                // reset.
                let ready: Vec<BackendLock> = self
                    .buckets
                    .iter_mut()
                    .filter_map(|bucket| bucket.ready.take())
                    .collect();
                for lock in ready {
                    self.release_backend(lock);
                }
                let coordinator = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(reset_in).await;
                    let _ = coordinator.cast(CoordinatorMsg::BudgetReset);
                });
            }
            IdentifyRefusal::LockLost => {
                tracing::warn!(
                    bucket,
                    shard,
                    "bucket lock lost before IDENTIFY; asking again"
                );
                self.pump(myself, bucket);
            }
            IdentifyRefusal::Unavailable(error) => {
                tracing::warn!(bucket, shard, %error, "identify backend failed before IDENTIFY; asking again");
                self.pump(myself, bucket);
            }
        }
    }

    fn identify_written(&mut self, myself: &ActorRef<CoordinatorMsg>, lease: Lease) {
        let hold = self.args.pacing + self.args.grace;
        let Some(bucket) = self.buckets.get_mut(lease.bucket as usize) else {
            return;
        };
        if let Some(holding) = bucket
            .holding
            .as_mut()
            .filter(|h| h.lease == lease && h.stage == Stage::Sent)
        {
            holding.stage = Stage::Written;
            holding.restart_timer(myself, hold);
        }
    }

    fn pacing_elapsed(&mut self, myself: &ActorRef<CoordinatorMsg>, lease: Lease) {
        let Some(bucket) = self.buckets.get_mut(lease.bucket as usize) else {
            return;
        };
        if bucket
            .holding
            .as_ref()
            .is_some_and(|h| h.lease == lease && h.sent())
        {
            self.free(myself, lease.bucket);
        }
    }

    fn release_unsent(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        lease: Lease,
        why: &'static str,
    ) {
        let Some(bucket) = self.buckets.get_mut(lease.bucket as usize) else {
            return;
        };
        if bucket
            .holding
            .as_ref()
            .is_some_and(|h| h.lease == lease && h.stage == Stage::Granted)
        {
            tracing::debug!(
                bucket = lease.bucket,
                lease = lease.id,
                why,
                "unused lease freed"
            );
            self.free(myself, lease.bucket);
        }
    }

    fn holder_stopped(&mut self, myself: &ActorRef<CoordinatorMsg>, holder: ActorId) {
        for index in 0..self.buckets.len() {
            let bucket = &mut self.buckets[index];
            bucket.waiters.retain(|_, waiter| waiter.holder != holder);
            let unsent = bucket
                .holding
                .as_ref()
                .is_some_and(|h| h.holder == holder && h.stage == Stage::Granted);
            if unsent {
                tracing::debug!(
                    bucket = index,
                    "holder stopped before IDENTIFY; bucket freed"
                );
                self.free(myself, index as u32);
            }
        }
    }

    /// Ends the bucket's current lease and serves the next waiter.
    fn free(&mut self, myself: &ActorRef<CoordinatorMsg>, bucket: u32) {
        if let Some(mut holding) = self.buckets[bucket as usize].holding.take() {
            if let Some(timer) = holding.timer.take() {
                timer.abort();
            }
            self.release_backend(holding.lock);
        }
        self.pump(myself, bucket);
    }

    fn release_backend(&mut self, lock: BackendLock) {
        let backend = self.args.backend.clone();
        self.releases.retain(|task| !task.is_finished());
        self.releases.push(tokio::spawn(async move {
            if let Err(error) = backend.release(lock).await {
                log_release_error(lock, &error);
            }
        }));
    }

    fn drain(&mut self, myself: &ActorRef<CoordinatorMsg>, reply: RpcReplyPort<()>) {
        self.drained = true;
        self.draining.push(reply);
        for index in 0..self.buckets.len() {
            let bucket = &mut self.buckets[index];
            bucket.waiters.clear();
            if let Some(task) = bucket.acquiring.take() {
                task.abort();
            }
            if let Some(lock) = bucket.ready.take() {
                self.release_backend(lock);
            }
            let bucket = &self.buckets[index];
            let unsent = bucket
                .holding
                .as_ref()
                .is_some_and(|h| h.stage == Stage::Granted);
            if unsent {
                self.free(myself, index as u32);
            }
        }
        tracing::info!(
            held = self.buckets.iter().filter(|b| b.holding.is_some()).count(),
            "identify coordinator draining: waiting for the pacing windows still open"
        );
        self.answer_drain();
    }

    /// Replies to the drain requests once no bucket is held any more.
    fn answer_drain(&mut self) {
        if self.buckets.iter().any(|bucket| bucket.holding.is_some()) {
            return;
        }
        // The process may exit right after the answer, so the releases in flight finish first.
        let replies: Vec<RpcReplyPort<()>> = self.draining.drain(..).collect();
        let releases: Vec<JoinHandle<()>> = self.releases.drain(..).collect();
        if replies.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for release in releases {
                let _ = release.await;
            }
            for reply in replies {
                let _ = reply.send(());
            }
        });
    }

    fn status(&self) -> Vec<BucketStatus> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(index, bucket)| BucketStatus {
                bucket: index as u32,
                holder: bucket.holding.as_ref().map(|h| h.shard),
                sent: bucket.holding.as_ref().is_some_and(Holding::sent),
                held_ms: bucket
                    .holding
                    .as_ref()
                    .map(|h| h.since.elapsed().as_millis() as u64),
                waiting: bucket.waiters.keys().map(|(shard, _)| *shard).collect(),
                granted: bucket.granted,
            })
            .collect()
    }
}

fn log_release_error(lock: BackendLock, error: &PortError) {
    tracing::warn!(bucket = lock.bucket, %error, "failed to release a bucket lock; it lapses when its lease expires");
}

/// Returns `base × 2^(failures-1)`, capped at 30 s.
fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests;
