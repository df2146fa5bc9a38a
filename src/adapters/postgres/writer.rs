//! The writer task: one per store, with its own connection. It takes writes from the queue in
//! order, coalesces them into a batch, commits the batch in one transaction, then acknowledges
//! it: the member counts of the mirror are updated, the queue space is released and the callers
//! waiting on the flush are woken.
//!
//! A batch that fails for any reason but bad data is retried as it is, on a new connection, with
//! exponential backoff, until it commits. Retrying is safe even when a commit's reply was lost,
//! because every statement sets rows to their final value and the counts follow the rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::store::ShardRecord;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio_postgres::{Client, Config, NoTls};

use super::batch::Batch;
use super::events::Op;
use super::execute::is_data_error;
use super::mirror::Mirror;
use super::plan::Plan;
use super::schema::apply_schema;
use super::statements::Statements;
use super::{error_chain, PostgresError};

/// A request to the writer.
pub(super) enum Message {
    /// The writes of one dispatch, holding their queue space until they are committed.
    Write {
        ops: Vec<Op>,
        permit: OwnedSemaphorePermit,
    },
    /// A shard record, committed with or after every write queued before it.
    SaveShard {
        record: ShardRecord,
        done: oneshot::Sender<()>,
    },
    /// Wakes `done` once every write queued before it is committed.
    Flush { done: oneshot::Sender<()> },
}

/// The writer's settings, from `PostgresOptions`.
#[derive(Clone, Debug)]
pub(super) struct WriterSettings {
    pub batch_rows: usize,
    pub max_age: Duration,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub flush_timeout: Duration,
}

/// A batch with what its acknowledgement releases.
#[derive(Default)]
struct Pending {
    batch: Batch,
    permits: Vec<OwnedSemaphorePermit>,
    waiters: Vec<oneshot::Sender<()>>,
}

impl Pending {
    fn add(&mut self, message: Message) {
        match message {
            Message::Write { ops, permit } => {
                for op in ops {
                    self.batch.add(op);
                }
                self.permits.push(permit);
            }
            Message::SaveShard { record, done } => {
                self.batch.add_shard(record);
                self.waiters.push(done);
            }
            Message::Flush { done } => self.waiters.push(done),
        }
    }
}

/// A connection with its prepared statements.
struct Session {
    client: Client,
    statements: Statements,
}

/// A committed batch.
struct Flushed {
    /// Member count of each guild of `member_guilds` that has one after the commit.
    counts: HashMap<i64, i64>,
    /// Guilds whose members the batch wrote.
    member_guilds: Vec<i64>,
    /// Statements run.
    statements: usize,
}

/// The state of an outage, from the first failed flush attempt to the next commit.
struct Outage {
    since: Instant,
    failures: u32,
}

/// The cause of a failed flush attempt.
#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error(transparent)]
    Connect(#[from] PostgresError),
    #[error("flush failed: {}", error_chain(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("flush timed out after {0:?}")]
    TimedOut(Duration),
}

pub(super) struct Writer {
    receiver: mpsc::UnboundedReceiver<Message>,
    settings: WriterSettings,
    config: Config,
    mirror: Arc<Mirror>,
    session: Option<Session>,
    flushes: u64,
}

impl Writer {
    /// Creates a writer on an open connection.
    pub async fn start(
        receiver: mpsc::UnboundedReceiver<Message>,
        settings: WriterSettings,
        config: Config,
        mirror: Arc<Mirror>,
        client: Client,
    ) -> Result<Self, PostgresError> {
        let statements =
            Statements::prepare(&client)
                .await
                .map_err(|source| PostgresError::Query {
                    operation: "preparing the statements",
                    source,
                })?;
        Ok(Self {
            receiver,
            settings,
            config,
            mirror,
            session: Some(Session { client, statements }),
            flushes: 0,
        })
    }

    /// Runs until every sender is dropped and every queued write is committed.
    pub async fn run(mut self) {
        while let Some(pending) = self.collect().await {
            self.flush(pending).await;
        }
        tracing::info!(
            flushes = self.flushes,
            "PostgreSQL writer stopped after committing every queued write"
        );
    }

    /// Waits for the first message, then takes more until the batch has `batch_rows` writes or
    /// its first message is `max_age` old. Returns `None` once the queue is closed and empty.
    ///
    /// Messages that are already queued are always taken, but a batch with a caller waiting on
    /// it (`save_shard`, `flush`) waits for no more: that caller holds up its shard.
    async fn collect(&mut self) -> Option<Pending> {
        let first = self.receiver.recv().await?;
        let deadline = tokio::time::Instant::now() + self.settings.max_age;
        let mut pending = Pending::default();
        pending.add(first);

        while pending.batch.writes < self.settings.batch_rows {
            let message = match self.receiver.try_recv() {
                Ok(message) => message,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) if !pending.waiters.is_empty() => break,
                Err(TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, self.receiver.recv()).await {
                        Ok(Some(message)) => message,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            pending.add(message);
        }
        Some(pending)
    }

    /// Commits a batch, retrying until it succeeds, then acknowledges it: the mirror takes the
    /// new member counts, the queue space is released and the waiting callers are woken.
    async fn flush(&mut self, pending: Pending) {
        let Pending {
            batch,
            permits,
            waiters,
        } = pending;

        // A flush request with no writes of its own: everything queued before it is already
        // committed, because batches commit in queue order.
        if batch.is_empty() {
            drop(permits);
            acknowledge(waiters);
            return;
        }

        let started = Instant::now();
        let flushed = self.commit(&batch).await;

        self.mirror
            .set_member_counts(&flushed.member_guilds, &flushed.counts);
        drop(permits);
        acknowledge(waiters);

        self.flushes += 1;
        tracing::debug!(
            flush = self.flushes,
            rows = batch.writes,
            statements = flushed.statements,
            member_guilds = flushed.member_guilds.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flush committed"
        );
    }

    /// Commits a batch, retrying with backoff until it succeeds. Logs the first failure of an
    /// outage as a warning and its end as information.
    async fn commit(&mut self, batch: &Batch) -> Flushed {
        let mut outage: Option<Outage> = None;

        let flushed = loop {
            let error = match self.try_flush(batch).await {
                Ok(flushed) => break flushed,
                Err(error) => error,
            };

            // The connection may be broken or stuck in a transaction, so the next attempt
            // starts on a new one, which also applies the schema again.
            self.session = None;
            let outage = outage.get_or_insert_with(|| {
                tracing::warn!(
                    %error,
                    rows = batch.writes,
                    "PostgreSQL write failed; retrying with backoff, and apply waits while the queue is full"
                );
                Outage {
                    since: Instant::now(),
                    failures: 0,
                }
            });
            outage.failures += 1;

            let delay = backoff(&self.settings, outage.failures);
            tracing::debug!(
                %error,
                failures = outage.failures,
                delay_ms = delay.as_millis() as u64,
                "flush attempt failed"
            );
            tokio::time::sleep(delay).await;
        };

        if let Some(outage) = outage {
            tracing::info!(
                down_ms = outage.since.elapsed().as_millis() as u64,
                failed_attempts = outage.failures,
                rows = batch.writes,
                "PostgreSQL writes recovered"
            );
        }
        flushed
    }

    /// Makes one attempt at committing a batch.
    async fn try_flush(&mut self, batch: &Batch) -> Result<Flushed, FlushError> {
        let timeout = self.settings.flush_timeout;
        let session = self.session().await?;
        let plan = Plan::new(batch, &session.statements);
        let member_guilds = plan.member_guilds().to_vec();
        let statements = plan.statement_count();

        let attempt = plan.execute(&session.client, &session.statements);
        let error = match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(counts)) => {
                return Ok(Flushed {
                    counts,
                    member_guilds,
                    statements,
                })
            }
            Ok(Err(error)) if is_data_error(&error) => error,
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => return Err(FlushError::TimedOut(timeout)),
        };

        // PostgreSQL rejected a value. The transaction is rolled back, so run the batch again
        // with each bad row left out, rather than failing the rows around it.
        let error = error_chain(&error);
        tracing::warn!(%error, rows = batch.writes, "flush rejected by PostgreSQL; retrying it row by row where it fails");
        let attempt = plan.execute_isolated(&mut session.client, &session.statements);
        let (counts, rejected) = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result?,
            Err(_) => return Err(FlushError::TimedOut(timeout)),
        };
        for row in rejected {
            tracing::warn!(
                table = row.table,
                guild_id = row.guild_id,
                key = row.key,
                error = error_chain(&row.error),
                "row rejected by PostgreSQL and left out of the cache"
            );
        }
        Ok(Flushed {
            counts,
            member_guilds,
            statements,
        })
    }

    /// Returns the open session, connecting first if there is none.
    async fn session(&mut self) -> Result<&mut Session, PostgresError> {
        if self
            .session
            .as_ref()
            .is_some_and(|session| session.client.is_closed())
        {
            self.session = None;
        }
        if self.session.is_none() {
            let mut client = connect(&self.config).await?;
            apply_schema(&mut client).await?;
            let statements =
                Statements::prepare(&client)
                    .await
                    .map_err(|source| PostgresError::Query {
                        operation: "preparing the statements",
                        source,
                    })?;
            self.session = Some(Session { client, statements });
        }
        self.session.as_mut().ok_or(PostgresError::WriterStopped)
    }
}

fn acknowledge(waiters: Vec<oneshot::Sender<()>>) {
    for waiter in waiters {
        // A caller that stopped waiting has dropped its receiver, and the send fails harmlessly.
        let _ = waiter.send(());
    }
}

/// Opens a connection and drives it on its own task until it closes.
pub(super) async fn connect(config: &Config) -> Result<Client, PostgresError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(PostgresError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            let error = error_chain(&error);
            tracing::debug!(%error, "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}

/// Returns the wait before retry number `failures` (1 for the first): `retry_backoff`,
/// doubling up to `retry_backoff_max`.
fn backoff(settings: &WriterSettings, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    settings
        .retry_backoff
        .saturating_mul(1 << exponent)
        .min(settings.retry_backoff_max)
}
