//! The Sweeper: one per process, it sends a member request for every cached guild in turn to the
//! guild's shard actor, at a fixed rate, so that member caches that drifted are refreshed.
//!
//! It pages through cached guild ids in ascending order (`id > cursor`, `batch` at a time, never
//! the whole set in memory), skips guilds whose shard belongs to another process, and sends
//! [`ShardMsg::RequestMembers`] to the owning shard actor. The cursor is stored under the process
//! name, so a restarted Sweeper goes on where the last one stopped, and it wraps to the start
//! after the highest id. At 12 requests/s a pass over 1M guilds of this process takes about 23
//! hours (1M / 12 s). Guilds of other processes are skipped without waiting.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::gateway::shard_for_guild;
use crate::names;
use crate::shard::{MemberRequestReason, ShardMsg};
use crate::store::{CursorStore, PortError, StateStore};

/// Largest backlog of request slots made up after the Sweeper fell behind (a slow store query,
/// a busy runtime). Slots older than this are dropped, so a stall is followed by about one
/// second's worth of requests at once rather than a burst of everything missed.
const MAX_CATCH_UP: Duration = Duration::from_secs(1);

/// Wait before the next query when the cache contains no guild at all.
const EMPTY_CACHE_POLL: Duration = Duration::from_secs(5);

/// Settings of the Sweeper.
#[derive(Clone)]
pub struct SweeperArgs {
    /// Source of the guild ids to sweep.
    pub store: Arc<dyn StateStore>,
    pub cursors: Arc<dyn CursorStore>,
    /// Process name (`--name`): the key of the stored cursor and the prefix of the shard actors'
    /// registry names.
    pub name: String,
    /// Shards of the bot, over all processes.
    pub shard_count: u32,
    /// Shards run by this process. Guilds of other shards are skipped.
    pub shards: Range<u32>,
    /// Guild ids read per store query.
    pub batch: u32,
    /// Member requests per second over all shards of this process.
    pub requests_per_second: f64,
    /// Start paused, so that nothing is requested until [`SweeperMsg::Resume`].
    pub start_paused: bool,
    /// Time between two saves of the cursor while it moves. The cursor is also saved on pause
    /// and on stop.
    pub cursor_save_interval: Duration,
    /// Delays between retries after a failed store query.
    pub retry: Backoff,
}

impl SweeperArgs {
    /// Checks the settings that would make the Sweeper misbehave.
    ///
    /// # Errors
    ///
    /// [`SweeperArgsError`] naming the first invalid setting.
    pub fn validate(&self) -> Result<(), SweeperArgsError> {
        if !(self.requests_per_second.is_finite() && self.requests_per_second > 0.0) {
            return Err(SweeperArgsError::InvalidRate(self.requests_per_second));
        }
        if self.batch == 0 {
            return Err(SweeperArgsError::ZeroBatch);
        }
        if self.shards.is_empty() || self.shards.end > self.shard_count {
            return Err(SweeperArgsError::InvalidShards {
                shards: self.shards.clone(),
                shard_count: self.shard_count,
            });
        }
        Ok(())
    }

    /// Returns the time between two member requests.
    fn request_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.requests_per_second)
    }
}

/// Invalid [`SweeperArgs`].
#[derive(Debug, thiserror::Error)]
pub enum SweeperArgsError {
    #[error("invalid sweep rate {0} requests/s: expected a positive finite number")]
    InvalidRate(f64),
    #[error("invalid sweep batch 0: expected at least 1 guild id per query")]
    ZeroBatch,
    #[error(
        "invalid shard range {}..{} for {shard_count} shards: expected a non-empty range \
         within 0..{shard_count}",
        shards.start, shards.end
    )]
    InvalidShards {
        shards: Range<u32>,
        shard_count: u32,
    },
}

/// The Sweeper in the status output. Counters cover the life of this actor, not earlier
/// incarnations.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepStatus {
    /// Id of the last guild handled, or `None` until the stored cursor is loaded. 0 is the
    /// start of a pass.
    pub cursor: Option<u64>,
    pub paused: bool,
    /// Member requests handed to shard actors.
    pub requests_sent: u64,
    /// Guilds passed over because their shard belongs to another process.
    pub skipped_other_range: u64,
    /// Guilds passed over because their shard actor was not running.
    pub shard_not_found: u64,
    /// Passes that reached the highest cached id and wrapped to the start.
    pub passes_completed: u64,
    /// Failed store queries (guild ids and cursor loads).
    pub store_errors: u64,
    pub requests_per_second: f64,
    pub batch: u32,
}

/// Messages of the Sweeper.
pub enum SweeperMsg {
    /// Stop requesting and save the cursor. Guilds already read stay queued.
    Pause,
    /// Request again, from the cursor.
    Resume,
    Status(RpcReplyPort<SweepStatus>),
    /// The pacing timer, which the Sweeper sends to itself only.
    Tick(Tick),
}

/// A pacing timer event. Only this module can make one, and a tick of an earlier schedule
/// (before a pause or resume) is ignored.
pub struct Tick {
    schedule: u64,
}

/// Counts of the current pass since the last wrap or, in the first pass of this actor, since it
/// started. They feed the log line at the end of the pass.
struct PassStats {
    started: Instant,
    requests: u64,
    skipped: u64,
    not_found: u64,
}

impl PassStats {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            requests: 0,
            skipped: 0,
            not_found: 0,
        }
    }
}

/// Outcome of handling one guild id.
enum Handled {
    Requested,
    OtherRange,
    NotFound,
}

/// Next step of a tick: a guild id to handle or a wait.
enum Next {
    /// A guild id to handle.
    Guild(u64),
    /// Nothing to do before this delay.
    Wait(Duration),
}

/// State of the Sweeper.
pub struct SweeperState {
    args: SweeperArgs,
    interval: Duration,
    cursor: Option<u64>,
    saved_cursor: Option<u64>,
    last_save: Instant,
    /// Guild ids read from the store and not handled yet, ascending, all above `cursor`.
    queue: VecDeque<u64>,
    paused: bool,
    /// Increased on pause and resume, so that ticks scheduled before are dropped and only one
    /// schedule runs at a time.
    schedule: u64,
    timer: Option<JoinHandle<Result<(), MessagingErr<SweeperMsg>>>>,
    /// When the next member request is due. Advanced by exactly one interval per request.
    next_due: Instant,
    /// Consecutive failed store queries, for the retry backoff.
    failures: u32,
    status: SweepStatus,
    pass: PassStats,
}

/// The Sweeper actor.
pub struct Sweeper;

impl Actor for Sweeper {
    type Msg = SweeperMsg;
    type State = SweeperState;
    type Arguments = SweeperArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SweeperArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.validate()?;
        let mut state = SweeperState::new(args);

        // A failed load is retried by the first tick that needs the cursor.
        let _ = state.load_cursor().await;

        let args = &state.args;
        tracing::info!(
            name = %args.name,
            shards_start = args.shards.start,
            shards_stop = args.shards.end,
            shard_count = args.shard_count,
            requests_per_second = args.requests_per_second,
            batch = args.batch,
            cursor = state.cursor,
            paused = state.paused,
            "sweeper started"
        );
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if !state.paused {
            state.next_due = Instant::now();
            state.schedule_tick(&myself, Duration::ZERO);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel_tick();
        state.save_cursor().await;
        tracing::info!(
            name = %state.args.name,
            cursor = state.cursor,
            requests_sent = state.status.requests_sent,
            "sweeper stopped"
        );
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SweeperMsg::Pause => state.pause().await,
            SweeperMsg::Resume => state.resume(&myself),
            SweeperMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            SweeperMsg::Tick(tick) => state.tick(&myself, tick).await,
        }
        Ok(())
    }
}

impl SweeperState {
    fn new(args: SweeperArgs) -> Self {
        let status = SweepStatus {
            cursor: None,
            paused: args.start_paused,
            requests_sent: 0,
            skipped_other_range: 0,
            shard_not_found: 0,
            passes_completed: 0,
            store_errors: 0,
            requests_per_second: args.requests_per_second,
            batch: args.batch,
        };
        Self {
            interval: args.request_interval(),
            paused: args.start_paused,
            args,
            cursor: None,
            saved_cursor: None,
            last_save: Instant::now(),
            queue: VecDeque::new(),
            schedule: 0,
            timer: None,
            next_due: Instant::now(),
            failures: 0,
            status,
            pass: PassStats::new(),
        }
    }

    fn status(&self) -> SweepStatus {
        SweepStatus {
            cursor: self.cursor,
            paused: self.paused,
            ..self.status.clone()
        }
    }

    async fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        self.cancel_tick();
        self.save_cursor().await;
        tracing::debug!(cursor = self.cursor, "sweeper paused");
    }

    fn resume(&mut self, myself: &ActorRef<SweeperMsg>) {
        if !self.paused {
            return;
        }
        self.paused = false;
        self.next_due = Instant::now();
        self.schedule_tick(myself, Duration::ZERO);
        tracing::debug!(cursor = self.cursor, "sweeper resumed");
    }

    /// Sends the member requests that are due, saves the cursor if it is time, and schedules
    /// the next tick.
    async fn tick(&mut self, myself: &ActorRef<SweeperMsg>, tick: Tick) {
        if tick.schedule != self.schedule || self.paused {
            return;
        }
        self.timer = None;

        let delay = self.send_due_requests().await;

        if self.last_save.elapsed() >= self.args.cursor_save_interval {
            self.save_cursor().await;
        }
        self.schedule_tick(myself, delay);
    }

    /// Handles guild ids until the next request is not due yet, and returns the delay until
    /// the next tick.
    ///
    /// The pacing is an absolute schedule: each request moves `next_due` one interval later,
    /// and the next tick is set for `next_due`. Time spent in store queries and in the mailbox
    /// therefore does not add up, so the long-run rate stays exact. Awaiting a rate limiter
    /// (such as `leaky-bucket`) inside the handler would do the same pacing but block the
    /// mailbox between requests, delaying Pause and Status by up to one interval.
    async fn send_due_requests(&mut self) -> Duration {
        let now = Instant::now();
        if let Some(earliest) = now.checked_sub(MAX_CATCH_UP) {
            self.next_due = self.next_due.max(earliest);
        }

        // One store query per tick at most, so that a run of skipped guilds does not keep
        // Pause and Status waiting.
        let mut queried = false;
        while self.next_due <= now {
            let guild = match self.next_guild(&mut queried).await {
                Next::Guild(guild) => guild,
                Next::Wait(delay) => return delay,
            };
            match self.handle_guild(guild) {
                Handled::Requested | Handled::NotFound => self.next_due += self.interval,
                Handled::OtherRange => {}
            }
        }
        self.next_due.saturating_duration_since(now)
    }

    /// Returns the next guild id to handle, reading a page from the store when the queue is
    /// empty.
    async fn next_guild(&mut self, queried: &mut bool) -> Next {
        if let Some(guild) = self.queue.pop_front() {
            return Next::Guild(guild);
        }
        if *queried {
            return Next::Wait(Duration::ZERO);
        }
        *queried = true;

        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => match self.load_cursor().await {
                Ok(cursor) => cursor,
                Err(retry) => return Next::Wait(retry),
            },
        };
        match self
            .args
            .store
            .guild_ids_after(cursor, self.args.batch)
            .await
        {
            Ok(page) if page.is_empty() => Next::Wait(self.end_pass(cursor)),
            Ok(page) => {
                self.failures = 0;
                tracing::trace!(cursor, guilds = page.len(), "sweep page read");
                self.queue.extend(page);
                match self.queue.pop_front() {
                    Some(guild) => Next::Guild(guild),
                    None => Next::Wait(Duration::ZERO),
                }
            }
            Err(error) => Next::Wait(self.store_failed(&error, "reading guild ids failed")),
        }
    }

    /// Wraps the cursor after the highest cached id, and returns the delay before the next
    /// tick. A cache with no guild at all completes no pass.
    fn end_pass(&mut self, cursor: u64) -> Duration {
        self.failures = 0;
        if cursor == 0 {
            tracing::trace!("no cached guild to sweep");
            return EMPTY_CACHE_POLL;
        }

        self.status.passes_completed += 1;
        tracing::info!(
            pass = self.status.passes_completed,
            requests = self.pass.requests,
            skipped_other_range = self.pass.skipped,
            shard_not_found = self.pass.not_found,
            duration_s = self.pass.started.elapsed().as_secs(),
            last_guild_id = cursor,
            "sweep pass completed"
        );
        self.cursor = Some(0);
        self.pass = PassStats::new();
        Duration::ZERO
    }

    /// Requests the members of a guild from its shard actor, unless another process owns the
    /// shard. The actor is looked up by name each time because a restarted shard actor is a new
    /// actor under the same name.
    fn handle_guild(&mut self, guild_id: u64) -> Handled {
        self.cursor = Some(guild_id);
        let shard = shard_for_guild(guild_id, self.args.shard_count);

        if !self.args.shards.contains(&shard) {
            self.status.skipped_other_range += 1;
            self.pass.skipped += 1;
            return Handled::OtherRange;
        }

        let request = ShardMsg::RequestMembers {
            guild_id,
            reason: MemberRequestReason::Sweep,
        };
        let name = names::shard(&self.args.name, shard);
        let sent =
            names::lookup::<ShardMsg>(&name).is_some_and(|actor| actor.cast(request).is_ok());
        if sent {
            tracing::trace!(shard, guild_id, "sweep member request sent");
            self.status.requests_sent += 1;
            self.pass.requests += 1;
            Handled::Requested
        } else {
            tracing::debug!(shard, guild_id, "shard actor not running, guild skipped");
            self.status.shard_not_found += 1;
            self.pass.not_found += 1;
            Handled::NotFound
        }
    }

    /// Loads the stored cursor into `self.cursor` and returns it. A process that never saved
    /// one starts at 0. A failed load returns the delay before the next attempt.
    async fn load_cursor(&mut self) -> Result<u64, Duration> {
        match self.args.cursors.load_cursor(&self.args.name).await {
            Ok(stored) => {
                let cursor = stored.unwrap_or(0);
                self.cursor = Some(cursor);
                self.saved_cursor = stored;
                self.failures = 0;
                tracing::debug!(cursor, "sweep cursor loaded");
                Ok(cursor)
            }
            Err(error) => Err(self.store_failed(&error, "loading the sweep cursor failed")),
        }
    }

    /// Saves the cursor if it moved since the last save. A failed save is retried at the next
    /// save time.
    async fn save_cursor(&mut self) {
        self.last_save = Instant::now();
        let Some(cursor) = self.cursor else {
            return;
        };
        if self.saved_cursor == Some(cursor) {
            return;
        }
        match self.args.cursors.save_cursor(&self.args.name, cursor).await {
            Ok(()) => {
                self.saved_cursor = Some(cursor);
                tracing::debug!(cursor, "sweep cursor saved");
            }
            Err(error) => {
                tracing::warn!(%error, cursor, "saving the sweep cursor failed, retrying later");
            }
        }
    }

    /// Counts and logs a failed store query, and returns the delay before the next attempt.
    fn store_failed(&mut self, error: &PortError, message: &'static str) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.status.store_errors += 1;
        let retry = self.args.retry.delay(self.failures);
        tracing::warn!(
            %error,
            cursor = self.cursor,
            attempt = self.failures,
            retry_in_ms = retry.as_millis() as u64,
            "{message}, retrying"
        );
        retry
    }

    fn schedule_tick(&mut self, myself: &ActorRef<SweeperMsg>, delay: Duration) {
        self.cancel_tick();
        let schedule = self.schedule;
        self.timer = Some(myself.send_after(delay, move || SweeperMsg::Tick(Tick { schedule })));
    }

    /// Drops the pending tick, if any. Any tick already in the mailbox is ignored because the
    /// schedule number changed.
    fn cancel_tick(&mut self) {
        self.schedule += 1;
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;
    use serde_json::value::RawValue;

    use super::*;
    use crate::store::{Applied, CacheTotals, ShardRecord};

    /// A guild-id table and cursor table whose queries can be made to fail.
    #[derive(Default)]
    struct TestStore {
        guilds: Mutex<BTreeSet<u64>>,
        cursors: Mutex<HashMap<String, u64>>,
        /// `guild_ids_after` calls that fail before the next one succeeds.
        query_failures: AtomicU32,
        /// `load_cursor` calls that fail before the next one succeeds.
        load_failures: AtomicU32,
    }

    impl TestStore {
        fn with_guilds(guilds: impl IntoIterator<Item = u64>) -> Arc<Self> {
            let store = Self::default();
            store.guilds.lock().unwrap().extend(guilds);
            Arc::new(store)
        }

        fn cursor(&self, name: &str) -> Option<u64> {
            self.cursors.lock().unwrap().get(name).copied()
        }
    }

    fn unavailable() -> PortError {
        PortError::Unavailable {
            backend: "test",
            source: "connection refused".into(),
        }
    }

    fn take_failure(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }

    #[async_trait]
    impl StateStore for TestStore {
        async fn apply(&self, _: u32, _: &str, _: &RawValue) -> Result<Applied, PortError> {
            Ok(Applied::default())
        }

        async fn member_count(&self, _: u64) -> Result<Option<u64>, PortError> {
            Ok(None)
        }

        async fn guild_ids_after(&self, cursor: u64, limit: u32) -> Result<Vec<u64>, PortError> {
            if take_failure(&self.query_failures) {
                return Err(unavailable());
            }
            let guilds = self.guilds.lock().unwrap();
            let ids = guilds.range(cursor + 1..).take(limit as usize);
            Ok(ids.copied().collect())
        }

        async fn load_shard(&self, _: u32, _: &str) -> Result<Option<ShardRecord>, PortError> {
            Ok(None)
        }

        async fn save_shard(&self, _: &ShardRecord) -> Result<(), PortError> {
            Ok(())
        }

        async fn totals(&self) -> Result<CacheTotals, PortError> {
            Ok(CacheTotals::default())
        }
    }

    #[async_trait]
    impl CursorStore for TestStore {
        async fn load_cursor(&self, name: &str) -> Result<Option<u64>, PortError> {
            if take_failure(&self.load_failures) {
                return Err(unavailable());
            }
            Ok(self.cursor(name))
        }

        async fn save_cursor(&self, name: &str, cursor: u64) -> Result<(), PortError> {
            self.cursors.lock().unwrap().insert(name.to_owned(), cursor);
            Ok(())
        }
    }

    /// Member requests received by the test shard actors: shard, guild id and reason, in the
    /// order received.
    type RequestLog = Arc<Mutex<Vec<(u32, u64, MemberRequestReason)>>>;

    /// A stand-in ShardActor that records the member requests it receives.
    struct RecordingShard;

    impl Actor for RecordingShard {
        type Msg = ShardMsg;
        type State = (u32, RequestLog);
        type Arguments = (u32, RequestLog);

        async fn pre_start(
            &self,
            _myself: ActorRef<Self::Msg>,
            args: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(args)
        }

        async fn handle(
            &self,
            _myself: ActorRef<Self::Msg>,
            message: Self::Msg,
            (shard, log): &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let ShardMsg::RequestMembers { guild_id, reason } = message {
                log.lock().unwrap().push((*shard, guild_id, reason));
            }
            Ok(())
        }
    }

    /// Shard actors and a Sweeper under one process name. Each test uses its own process name,
    /// so tests running in parallel never see each other's actors in ractor's global registry.
    struct Harness {
        process: String,
        store: Arc<TestStore>,
        log: RequestLog,
        shards: Vec<ActorRef<ShardMsg>>,
    }

    impl Harness {
        async fn new(process: &str, store: Arc<TestStore>, shards: Range<u32>) -> Self {
            let mut harness = Self {
                process: process.to_owned(),
                store,
                log: RequestLog::default(),
                shards: Vec::new(),
            };
            for shard in shards {
                harness.start_shard(shard).await;
            }
            harness
        }

        async fn start_shard(&mut self, shard: u32) {
            let name = names::shard(&self.process, shard);
            let (actor, _) = Actor::spawn(Some(name), RecordingShard, (shard, self.log.clone()))
                .await
                .expect("test shard actor starts");
            self.shards.push(actor);
        }

        fn args(&self, shard_count: u32, shards: Range<u32>, rate: f64) -> SweeperArgs {
            SweeperArgs {
                store: self.store.clone(),
                cursors: self.store.clone(),
                name: self.process.clone(),
                shard_count,
                shards,
                batch: 5,
                requests_per_second: rate,
                start_paused: false,
                cursor_save_interval: Duration::from_secs(1),
                retry: Backoff {
                    base: Duration::from_millis(100),
                    max: Duration::from_secs(1),
                },
            }
        }

        async fn sweeper(&self, args: SweeperArgs) -> ActorRef<SweeperMsg> {
            let (sweeper, _) = Actor::spawn(None, Sweeper, args)
                .await
                .expect("sweeper starts");
            sweeper
        }

        /// Returns the guild ids requested so far, in order.
        fn requested(&self) -> Vec<u64> {
            let log = self.log.lock().unwrap();
            log.iter().map(|&(_, guild, _)| guild).collect()
        }

        async fn stop(self, sweeper: ActorRef<SweeperMsg>) {
            sweeper.stop_and_wait(None, None).await.unwrap();
            for shard in self.shards {
                shard.stop_and_wait(None, None).await.unwrap();
            }
        }
    }

    /// Returns the `round`-th guild id (from 0) that lands on `shard` of `shard_count`. Ids
    /// ascend with `round * shard_count + shard`.
    fn guild_on(shard: u32, shard_count: u32, round: u32) -> u64 {
        let timestamp = u64::from(round * shard_count + shard) + 1_000 * u64::from(shard_count);
        (timestamp << 22) | 7
    }

    /// Guild ids of `rounds` rounds over every shard, ascending.
    fn guilds(shard_count: u32, rounds: u32) -> Vec<u64> {
        (0..rounds)
            .flat_map(|round| {
                (0..shard_count).map(move |shard| guild_on(shard, shard_count, round))
            })
            .collect()
    }

    async fn status(sweeper: &ActorRef<SweeperMsg>) -> SweepStatus {
        ractor::call!(sweeper, SweeperMsg::Status).expect("sweeper replies")
    }

    /// Sleeps in simulated time. Requests go out at 0, 1, 2, ... intervals after the start,
    /// so sleeping `n` intervals plus half of one lets exactly `n + 1` requests out.
    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn requests_follow_id_order() {
        let ids = guilds(4, 3);
        let harness = Harness::new("sweep-order", TestStore::with_guilds(ids.clone()), 0..4).await;
        let sweeper = harness.sweeper(harness.args(4, 0..4, 10.0)).await;

        // 12 requests at 10/s: the last goes out at 1.1 s.
        sleep_ms(1_150).await;

        let log = harness.log.lock().unwrap().clone();
        let expected: Vec<_> = ids
            .iter()
            .map(|&id| (shard_for_guild(id, 4), id, MemberRequestReason::Sweep))
            .collect();
        assert_eq!(log, expected);
        let status = status(&sweeper).await;
        assert_eq!(status.requests_sent, 12);
        assert_eq!(status.cursor, ids.last().copied());
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn other_range_skipped_and_counted() {
        let ids = guilds(4, 3);
        let store = TestStore::with_guilds(ids.clone());
        let harness = Harness::new("sweep-range", store, 1..3).await;
        let sweeper = harness.sweeper(harness.args(4, 1..3, 10.0)).await;

        // Six guilds are on shards 1 and 2, and skipped guilds take no request slot.
        sleep_ms(550).await;

        let in_range: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|&id| (1..3).contains(&shard_for_guild(id, 4)))
            .collect();
        assert_eq!(harness.requested(), in_range);
        let last = *in_range.last().unwrap();
        let skipped = ids
            .iter()
            .filter(|&&id| id < last && !(1..3).contains(&shard_for_guild(id, 4)))
            .count();
        let status = status(&sweeper).await;
        assert_eq!(status.requests_sent, 6);
        assert_eq!(status.skipped_other_range, skipped as u64);
        assert_eq!(status.shard_not_found, 0);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn rate_is_respected() {
        // One shard of four is ours, so three guilds in four are skipped between requests.
        let harness =
            Harness::new("sweep-rate", TestStore::with_guilds(guilds(4, 500)), 0..1).await;
        let mut args = harness.args(4, 0..1, 12.0);
        args.batch = 50;
        let sweeper = harness.sweeper(args).await;

        let mut previous = 0;
        for second in 1..=10 {
            sleep_ms(1_000).await;
            let sent = status(&sweeper).await.requests_sent;
            let in_second = sent - previous;
            assert!(
                (11..=13).contains(&in_second),
                "second {second}: {in_second} requests, expected 12 ± 1"
            );
            previous = sent;
        }
        assert!(
            (119..=121).contains(&previous),
            "{previous} requests in 10 s"
        );
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rate_is_respected() {
        let harness = Harness::new("sweep-slow", TestStore::with_guilds(guilds(1, 50)), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 0.5)).await;

        // At 0.5/s requests go out at 0, 2, 4, ... s: six by 10.5 s.
        sleep_ms(10_500).await;

        assert_eq!(status(&sweeper).await.requests_sent, 6);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn pause_stops_and_resume_continues() {
        let ids = guilds(1, 50);
        let harness = Harness::new("sweep-pause", TestStore::with_guilds(ids.clone()), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(450).await;
        sweeper.cast(SweeperMsg::Pause).unwrap();
        let paused = status(&sweeper).await;
        assert!(paused.paused);
        assert_eq!(paused.requests_sent, 5);
        assert_eq!(
            harness.store.cursor("sweep-pause"),
            Some(ids[4]),
            "cursor saved on pause"
        );

        sleep_ms(5_000).await;
        assert_eq!(
            status(&sweeper).await.requests_sent,
            5,
            "requests while paused"
        );

        sweeper.cast(SweeperMsg::Resume).unwrap();
        sleep_ms(450).await;

        let resumed = status(&sweeper).await;
        assert!(!resumed.paused);
        assert_eq!(resumed.requests_sent, 10);
        assert_eq!(harness.requested(), ids[..10]);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn start_paused_waits_for_resume() {
        let ids = guilds(1, 5);
        let harness = Harness::new(
            "sweep-start-paused",
            TestStore::with_guilds(ids.clone()),
            0..1,
        )
        .await;
        let mut args = harness.args(1, 0..1, 10.0);
        args.start_paused = true;
        let sweeper = harness.sweeper(args).await;

        sleep_ms(2_000).await;
        assert!(harness.requested().is_empty());
        assert!(status(&sweeper).await.paused);

        sweeper.cast(SweeperMsg::Resume).unwrap();
        sleep_ms(50).await;
        assert_eq!(harness.requested(), ids[..1]);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cursor_wraps_at_end() {
        let ids = guilds(1, 3);
        let harness = Harness::new("sweep-wrap", TestStore::with_guilds(ids.clone()), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(750).await;

        let expected: Vec<u64> = ids.iter().copied().cycle().take(8).collect();
        assert_eq!(harness.requested(), expected);
        let status = status(&sweeper).await;
        assert_eq!(status.passes_completed, 2);
        assert_eq!(status.cursor, Some(ids[1]));
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn new_sweeper_continues_from_saved_cursor() {
        let ids = guilds(1, 20);
        let harness =
            Harness::new("sweep-restart", TestStore::with_guilds(ids.clone()), 0..1).await;

        let first = harness.sweeper(harness.args(1, 0..1, 10.0)).await;
        sleep_ms(450).await;
        first.stop_and_wait(None, None).await.unwrap();
        assert_eq!(
            harness.store.cursor("sweep-restart"),
            Some(ids[4]),
            "cursor saved on stop"
        );

        let second = harness.sweeper(harness.args(1, 0..1, 10.0)).await;
        sleep_ms(250).await;

        assert_eq!(harness.requested(), ids[..8]);
        harness.stop(second).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cursor_saved_periodically() {
        let ids = guilds(1, 50);
        let harness = Harness::new("sweep-save", TestStore::with_guilds(ids.clone()), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(2_050).await;

        // The save interval is 1 s, so the stored cursor is at most 1 s (10 requests) behind.
        let stored = harness.store.cursor("sweep-save").expect("cursor saved");
        let position = ids.iter().position(|&id| id == stored).unwrap();
        assert!(
            (10..=20).contains(&position),
            "stored cursor at guild {position}"
        );
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn missing_shard_actor_counted() {
        let ids = guilds(2, 5);
        // Only shard 0 has an actor, so the guilds of shard 1 are not found.
        let harness =
            Harness::new("sweep-missing", TestStore::with_guilds(ids.clone()), 0..1).await;
        let sweeper = harness.sweeper(harness.args(2, 0..2, 10.0)).await;

        sleep_ms(950).await;

        let on_shard_0: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|&id| shard_for_guild(id, 2) == 0)
            .collect();
        assert_eq!(harness.requested(), on_shard_0);
        let status = status(&sweeper).await;
        assert_eq!(status.requests_sent, 5);
        assert_eq!(status.shard_not_found, 5);
        assert_eq!(status.skipped_other_range, 0);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn restarted_shard_actor_found_by_name() {
        let ids = guilds(1, 20);
        let mut harness =
            Harness::new("sweep-rename", TestStore::with_guilds(ids.clone()), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(250).await;
        let old = harness.shards.pop().unwrap();
        old.stop_and_wait(None, None).await.unwrap();
        sleep_ms(200).await;
        harness.start_shard(0).await;
        sleep_ms(200).await;

        // Three requests before the stop, two lost while no actor ran, two to the new actor.
        assert_eq!(
            harness.requested(),
            [ids[0], ids[1], ids[2], ids[5], ids[6]]
        );
        assert_eq!(status(&sweeper).await.shard_not_found, 2);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn store_errors_retried_with_backoff() {
        let ids = guilds(1, 10);
        let store = TestStore::with_guilds(ids.clone());
        store.query_failures.store(3, Ordering::Relaxed);
        let harness = Harness::new("sweep-errors", store, 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        // Retries wait at most 0.1 s, 0.2 s and 0.4 s.
        sleep_ms(800).await;
        let recovering = status(&sweeper).await;
        assert_eq!(recovering.store_errors, 3);
        assert!(
            recovering.requests_sent >= 1,
            "no request after the store recovered"
        );

        sleep_ms(2_000).await;
        assert_eq!(
            harness.requested()[..10],
            ids,
            "guilds lost to the failures"
        );
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn cursor_load_failure_keeps_position() {
        let ids = guilds(1, 10);
        let store = TestStore::with_guilds(ids.clone());
        store.save_cursor("sweep-load", ids[6]).await.unwrap();
        store.load_failures.store(2, Ordering::Relaxed);
        let harness = Harness::new("sweep-load", store, 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(1_000).await;

        // The failed loads do not restart the pass at 0: the sweep goes on after ids[6].
        assert_eq!(status(&sweeper).await.store_errors, 2);
        assert_eq!(harness.requested()[..3], ids[7..]);
        harness.stop(sweeper).await;
    }

    #[tokio::test(start_paused = true)]
    async fn empty_cache_completes_no_pass() {
        let harness = Harness::new("sweep-empty", TestStore::with_guilds([]), 0..1).await;
        let sweeper = harness.sweeper(harness.args(1, 0..1, 10.0)).await;

        sleep_ms(1_000).await;
        let idle = status(&sweeper).await;
        assert_eq!(idle.passes_completed, 0);
        assert_eq!(idle.requests_sent, 0);

        // Guilds cached later are found at the next poll.
        let ids = guilds(1, 2);
        harness.store.guilds.lock().unwrap().extend(&ids);
        sleep_ms(EMPTY_CACHE_POLL.as_millis() as u64 + 200).await;
        assert_eq!(harness.requested()[..2], ids);
        harness.stop(sweeper).await;
    }

    #[tokio::test]
    async fn invalid_args_rejected() {
        let harness = Harness::new("sweep-invalid", TestStore::with_guilds([]), 0..0).await;
        let valid = harness.args(4, 0..4, 12.0);
        assert!(valid.validate().is_ok());

        // (case, how it breaks valid arguments, the error it must name)
        type Case = (&'static str, fn(&mut SweeperArgs), &'static str);
        let cases: [Case; 6] = [
            (
                "zero rate",
                |args| args.requests_per_second = 0.0,
                "invalid sweep rate 0",
            ),
            (
                "NaN rate",
                |args| args.requests_per_second = f64::NAN,
                "invalid sweep rate NaN",
            ),
            (
                "infinite rate",
                |args| args.requests_per_second = f64::INFINITY,
                "invalid sweep rate inf",
            ),
            ("zero batch", |args| args.batch = 0, "invalid sweep batch 0"),
            (
                "empty range",
                |args| args.shards = 2..2,
                "invalid shard range 2..2 for 4 shards",
            ),
            (
                "range past count",
                |args| args.shards = 2..5,
                "invalid shard range 2..5 for 4 shards",
            ),
        ];
        for (case, change, expected) in cases {
            let mut args = valid.clone();
            change(&mut args);
            let error = args.validate().expect_err(case);
            assert!(error.to_string().starts_with(expected), "{case}: {error}");
        }

        let mut args = valid;
        args.batch = 0;
        assert!(Actor::spawn(None, Sweeper, args).await.is_err());
    }
}
