//! The Redis event sink: each event goes to `RPUSH gateway:events:<EVENT_NAME> <data as JSON>`
//! on every target whose whitelist takes it, as the replaced service wrote it for the downstream
//! workers.
//!
//! Each target has a bounded buffer and one writer task with its own auto-reconnecting
//! connection. The writer sends its buffer in batches, each batch one pipeline of RPUSH commands
//! with one command per run of consecutive events under the same key, and resends a batch until
//! Redis accepts it. Delivery is at least once. A pipeline whose replies time out may have run,
//! so its resend can push duplicates. Events are lost only when a target with
//! [`Overflow::Drop`] drops them, or when the sink is closed or dropped before delivering them.
//!
//! - `push` waits for room in a full buffer (the shard stops reading its socket), unless the
//!   target drops events ([`Overflow::Drop`]).
//! - `flush` returns once Redis has accepted every event pushed before the call, on every target
//!   (a target with [`Overflow::Drop`] that is down is not waited for), or fails after
//!   `flush_timeout` so the shard saves its sequence later.
//! - [`RedisSink::close`] delivers what it can within `close_timeout`.

mod options;
mod target;
mod writer;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actors::store::{EventSink, PortError};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use redis::aio::ConnectionManager;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use options::{
    parse_multi_redis, parse_whitelist, Overflow, RedisSinkOptions, TargetOptions, DEFAULT_ADDRESS,
    DEFAULT_KEY_PREFIX,
};
pub use target::TargetStats;

use options::redact;
use target::{Event, Filter, Target};
use writer::{Writer, WriterSettings};

/// The backend name in [`PortError::Unavailable`].
const BACKEND: &str = "redis";

/// A failure of the Redis sink, carried as the source of [`PortError::Unavailable`].
#[derive(Debug, thiserror::Error)]
pub enum RedisSinkError {
    #[error("invalid Redis sink options: {0}")]
    InvalidOptions(String),
    /// One entry per target that could not be reached, as `address: error`.
    #[error("failed to connect to Redis: {}; check that the server runs and the address is right", .0.join("; "))]
    Connect(Vec<String>),
    #[error("events not accepted within {timeout:?}: {pending}; the caller retries")]
    FlushTimedOut { timeout: Duration, pending: String },
    #[error("the Redis sink is closed")]
    Closed,
    #[error("{events} events not delivered within the close timeout of {timeout:?}: {pending}")]
    Undelivered {
        events: u64,
        timeout: Duration,
        pending: String,
    },
}

impl From<RedisSinkError> for PortError {
    fn from(error: RedisSinkError) -> Self {
        PortError::Unavailable {
            backend: BACKEND,
            source: Box::new(error),
        }
    }
}

/// The event output on one or more Redis servers. Implements [`EventSink`].
pub struct RedisSink {
    targets: Vec<Arc<Target>>,
    key_prefix: String,
    flush_timeout: Duration,
    close_timeout: Duration,
    /// Cancelled by `close`: writers deliver what is queued and stop, the statistics stop.
    closing: CancellationToken,
    /// Cancelled when `close` runs out of time, or on drop: writers stop at once.
    abort: CancellationToken,
    /// Writer tasks, taken by `close`.
    writers: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisSink {
    /// Checks the options, connects to every target and starts the writers.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] with [`RedisSinkError::InvalidOptions`] for invalid options,
    /// or [`RedisSinkError::Connect`] naming every target that did not reply to PING within
    /// `connect_timeout`. A target that is down at start fails the start, so a wrong address
    /// shows at once rather than as a stalled sink.
    pub async fn connect(options: RedisSinkOptions) -> Result<Self, PortError> {
        options.validate().map_err(RedisSinkError::InvalidOptions)?;
        let settings = WriterSettings {
            batch_events: options.batch_events,
            connect_timeout: options.connect_timeout,
            response_timeout: options.response_timeout,
            retry_min: options.retry_min,
            retry_max: options.retry_max,
        };
        let connections = connect_all(&options.targets, &settings).await?;

        let closing = CancellationToken::new();
        let abort = CancellationToken::new();
        let mut targets = Vec::with_capacity(connections.len());
        let mut writers = Vec::with_capacity(connections.len());
        for (target_options, (client, connection)) in options.targets.iter().zip(connections) {
            let filter = Filter::new(target_options.whitelist.as_deref(), &options.whitelist);
            let overflow = target_options.overflow.unwrap_or(options.overflow);
            let label = redact(&target_options.address);
            let (target, queue) = Target::new(label, filter, overflow, options.buffer_events);
            let target = Arc::new(target);
            let whitelist = match target.filter().names() {
                Some(names) => names.join(","),
                None => "every event".to_owned(),
            };
            tracing::info!(
                target = %target.label,
                %whitelist,
                ?overflow,
                "redis target connected"
            );

            let writer = Writer::new(
                target.clone(),
                client,
                connection,
                queue,
                settings.clone(),
                closing.clone(),
                abort.clone(),
            );
            writers.push(tokio::spawn(writer.run()));
            targets.push(target);
        }

        if let Some(interval) = options.stats_interval {
            tokio::spawn(log_stats(targets.clone(), interval, closing.clone()));
        }
        tracing::info!(
            targets = targets.len(),
            buffer_events = options.buffer_events,
            batch_events = options.batch_events,
            "redis sink started"
        );

        Ok(Self {
            targets,
            key_prefix: options.key_prefix,
            flush_timeout: options.flush_timeout,
            close_timeout: options.close_timeout,
            closing,
            abort,
            writers: Mutex::new(writers),
        })
    }

    /// Returns the statistics of every target, in the order of the options.
    pub fn stats(&self) -> Vec<TargetStats> {
        self.targets.iter().map(|target| target.stats()).collect()
    }

    /// Stops accepting events, delivers the buffered ones within `close_timeout`, then stops
    /// the writers. Pushes waiting for room fail. A second call returns `Ok` at once, whatever
    /// the first returned.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] with [`RedisSinkError::Undelivered`] when events were still
    /// buffered at the deadline; they are lost.
    pub async fn close(&self) -> Result<(), PortError> {
        let writers = std::mem::take(&mut *lock(&self.writers));
        if writers.is_empty() {
            return Ok(());
        }

        self.closing.cancel();
        for target in &self.targets {
            target.close_buffer();
        }

        let mut stopped = Box::pin(join_all(writers));
        let results = match tokio::time::timeout(self.close_timeout, &mut stopped).await {
            Ok(results) => results,
            Err(_) => {
                // Writers that still hold events stop now; their events are counted below.
                self.abort.cancel();
                stopped.await
            }
        };
        for result in results {
            if let Err(error) = result {
                tracing::error!(%error, "redis writer task failed");
            }
        }

        for stats in self.stats() {
            tracing::info!(
                target = %stats.address,
                pushed = stats.pushed,
                dropped = stats.dropped,
                reconnects = stats.reconnects,
                resent = stats.resent,
                "redis target closed"
            );
        }
        let events: u64 = self.targets.iter().map(|target| target.undelivered()).sum();
        if events == 0 {
            tracing::info!("redis sink closed");
            return Ok(());
        }

        let pending = self.describe_pending();
        tracing::warn!(events, %pending, "redis sink closed with events not delivered");
        Err(RedisSinkError::Undelivered {
            events,
            timeout: self.close_timeout,
            pending,
        }
        .into())
    }

    /// Lists the targets with events not accepted yet, for error messages.
    fn describe_pending(&self) -> String {
        let mut pending = String::new();
        for target in &self.targets {
            let events = target.undelivered();
            if events == 0 {
                continue;
            }
            if !pending.is_empty() {
                pending.push_str(", ");
            }
            let state = if target.stats().up { "up" } else { "down" };
            let _ = write!(pending, "{}: {events} events, target {state}", target.label);
        }
        pending
    }
}

#[async_trait]
impl EventSink for RedisSink {
    async fn push(&self, event: &str, data: &RawValue) -> Result<(), PortError> {
        // Every slot is taken before any event is queued. A push that fails or is cancelled
        // while it waits for room has then queued nothing, so the shard's retry does not push
        // the event twice to the targets that had room.
        let mut slots = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            if !target.accepts(event) {
                continue;
            }
            match target.reserve().await {
                Ok(Some(slot)) => slots.push((target, slot)),
                Ok(None) => {}
                Err(_) => return Err(RedisSinkError::Closed.into()),
            }
        }
        if slots.is_empty() {
            tracing::trace!(event, "event not pushed: no target takes it now");
            return Ok(());
        }

        let queued = Arc::new(Event {
            key: format!("{}{event}", self.key_prefix),
            data: Bytes::copy_from_slice(data.get().as_bytes()),
        });
        let targets = slots.len();
        for (target, slot) in slots {
            target
                .enqueue(queued.clone(), slot)
                .map_err(|_| RedisSinkError::Closed)?;
        }
        tracing::trace!(event, bytes = queued.data.len(), targets, "event queued");
        Ok(())
    }

    async fn flush(&self) -> Result<(), PortError> {
        if self.closing.is_cancelled() {
            return Err(RedisSinkError::Closed.into());
        }

        let marks: Vec<u64> = self.targets.iter().map(|target| target.queued()).collect();
        let settled = async {
            for (target, mark) in self.targets.iter().zip(marks) {
                target.settled(mark).await;
            }
        };
        if tokio::time::timeout(self.flush_timeout, settled)
            .await
            .is_ok()
        {
            return Ok(());
        }

        let pending = self.describe_pending();
        tracing::debug!(%pending, "redis flush timed out");
        Err(RedisSinkError::FlushTimedOut {
            timeout: self.flush_timeout,
            pending,
        }
        .into())
    }
}

impl Drop for RedisSink {
    /// Stops the writers at once. Buffered events are lost unless `close` delivered them.
    fn drop(&mut self) {
        let events: u64 = self.targets.iter().map(|target| target.undelivered()).sum();
        if events > 0 && !self.abort.is_cancelled() {
            tracing::warn!(
                events,
                "redis sink dropped without close; buffered events are lost"
            );
        }
        self.closing.cancel();
        self.abort.cancel();
    }
}

/// Connects to every target at once and checks that each replies to PING.
async fn connect_all(
    targets: &[TargetOptions],
    settings: &WriterSettings,
) -> Result<Vec<(redis::Client, ConnectionManager)>, RedisSinkError> {
    let attempts = targets
        .iter()
        .map(|target| connect_target(&target.address, settings));
    let results = join_all(attempts).await;

    let mut connections = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for (target, result) in targets.iter().zip(results) {
        match result {
            Ok(connection) => connections.push(connection),
            Err(error) => failures.push(format!("{}: {error}", redact(&target.address))),
        }
    }
    if failures.is_empty() {
        Ok(connections)
    } else {
        Err(RedisSinkError::Connect(failures))
    }
}

async fn connect_target(
    address: &str,
    settings: &WriterSettings,
) -> Result<(redis::Client, ConnectionManager), String> {
    let client = redis::Client::open(address).map_err(|error| error.to_string())?;
    let config = settings.connection_config();

    let connect = async {
        let mut connection = ConnectionManager::new_with_config(client.clone(), config).await?;
        // PING also shows a missing password (NOAUTH), which connecting alone does not.
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await?;
        Ok::<_, redis::RedisError>(connection)
    };
    match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(connection)) => Ok((client, connection)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("timed out after {:?}", settings.connect_timeout)),
    }
}

/// Logs one statistics line per target every `interval` until the sink closes.
async fn log_stats(targets: Vec<Arc<Target>>, interval: Duration, closing: CancellationToken) {
    let start = tokio::time::Instant::now() + interval;
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for target in &targets {
            let stats = target.stats();
            tracing::info!(
                target = %stats.address,
                pushed = stats.pushed,
                buffered = stats.buffered,
                dropped = stats.dropped,
                reconnects = stats.reconnects,
                resent = stats.resent,
                up = stats.up,
                "redis target stats"
            );
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
