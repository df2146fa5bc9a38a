//! The guild-state cache in PostgreSQL: [`PostgresStore`].
//!
//! `apply` parses and checks a dispatch on the caller's task and queues its row writes. One
//! writer task per store takes them in order, coalesces them per table and commits each batch
//! in one transaction (see `writer`). The queue is bounded in rows: when it is full, `apply`
//! waits, which stops the calling shard from reading its socket until the database catches up.
//! No write is dropped while PostgreSQL is down or restarting. Only a row that PostgreSQL
//! rejects as invalid is left out of its batch, with a warning (see `statements`).
//!
//! `member_count`, `guild_ids_after` and `totals` read an in-memory mirror (see `mirror`)
//! instead of querying. Shard records and the inherent row reads query the database on a second
//! connection.
//!
//! NOTE: connections are made without TLS, so the server must be reached over loopback or a
//! trusted network. TLS needs a connector crate (`postgres-native-tls` or `tokio-postgres-rustls`).

mod batch;
mod events;
mod execute;
mod jsonb;
mod mirror;
mod payload;
mod plan;
mod schema;
mod statements;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub(crate) use super::error_chain;
use actors::store::{Applied, CacheTotals, CursorStore, PortError, ShardRecord, StateStore};
use async_trait::async_trait;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config};

pub use jsonb::Jsonb;
pub use schema::Table;

use events::{guild_hint, parse_dispatch};
use mirror::Mirror;
use writer::{connect, Message, Writer, WriterSettings};

/// The name of this backend in [`PortError::Unavailable`].
const BACKEND: &str = "postgres";

/// Settings of a [`PostgresStore`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Connection string, as key-value pairs (`host=127.0.0.1 user=postgres dbname=cache`) or
    /// as a URL (`postgresql://postgres@127.0.0.1/cache`).
    pub url: String,
    /// Maximum writes per flush. A batch is committed as soon as it contains this many writes
    /// (rows before coalescing; one shard record counts as one).
    pub batch_rows: usize,
    /// Maximum time a write waits in a batch for more writes before the batch is committed.
    pub max_age: Duration,
    /// Capacity of the queue, in rows written and not yet committed. `apply` waits while the
    /// queue is full. A dispatch with more rows than this waits for an empty queue and then
    /// takes all of it.
    pub queue_rows: usize,
    /// Wait before the first retry of a failed flush. It doubles with each failed attempt, up
    /// to `retry_backoff_max`.
    pub retry_backoff: Duration,
    /// Maximum wait between two attempts of a failed flush.
    pub retry_backoff_max: Duration,
    /// Maximum time one flush attempt may take before its connection is dropped and the
    /// attempt counts as failed.
    pub flush_timeout: Duration,
    /// Maximum time to open a connection.
    pub connect_timeout: Duration,
}

impl PostgresOptions {
    /// Returns the default settings for a connection string.
    ///
    /// 5,000 writes per batch (five full GUILD_MEMBERS_CHUNKs) let the writer reach about
    /// 124,000 member rows/s against 120,000 at 1,000, with a flush of about 40 ms (measured
    /// with `cargo bench --bench store`, PostgreSQL 15, 2 cores, ~600-byte members). The queue
    /// has room for ten such batches.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            batch_rows: 5_000,
            max_age: Duration::from_millis(20),
            queue_rows: 50_000,
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// A failure of the PostgreSQL store.
///
/// The messages include the server's error (tokio-postgres shows only "db error" for one).
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("invalid PostgreSQL connection string: {}", error_chain(.0))]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("invalid option {option} = {value}: {reason}")]
    InvalidOption {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("failed to connect to PostgreSQL: {}{}", error_chain(.0), connect_hint(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error(
        "the database encoding is {encoding}, but the cache stores any Unicode text; \
         use a database created with ENCODING 'UTF8'"
    )]
    Encoding { encoding: String },
    #[error("{operation} failed: {}", error_chain(.source))]
    Query {
        operation: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the PostgreSQL writer task stopped")]
    WriterStopped,
}

/// Returns what to do about a connection error the operator can fix, or nothing.
fn connect_hint(error: &tokio_postgres::Error) -> &'static str {
    match error.code() {
        Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) => {
            "; create the database first (createdb NAME) or fix store.postgres_url"
        }
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD)
        | Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION) => {
            "; check the user and password in store.postgres_url"
        }
        _ => "",
    }
}

impl From<PostgresError> for PortError {
    fn from(error: PostgresError) -> Self {
        PortError::Unavailable {
            backend: BACKEND,
            source: Box::new(error),
        }
    }
}

/// The guild-state cache in PostgreSQL. See the module documentation.
///
/// Dropping the store closes the queue. The writer task then commits what is queued, retrying
/// while PostgreSQL is down, and stops. [`PostgresStore::close`] waits for that.
pub struct PostgresStore {
    sender: mpsc::UnboundedSender<Message>,
    /// Queue space in rows. A queued dispatch keeps its share until its batch commits.
    queue: Arc<Semaphore>,
    queue_rows: u32,
    mirror: Arc<Mirror>,
    reader: Reader,
    writer: JoinHandle<()>,
}

impl PostgresStore {
    /// Connects, creates the missing tables, loads the cached guild ids and member counts, and
    /// starts the writer.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] with a [`PostgresError`] when an option is invalid, the
    /// database cannot be reached, or its encoding is not UTF8.
    pub async fn connect(options: PostgresOptions) -> Result<Self, PortError> {
        let config = parse_options(&options)?;

        let mut client = connect(&config).await?;
        schema::apply_schema(&mut client).await?;
        let mirror = Arc::new(load_mirror(&client).await?);

        let queue_rows = u32::try_from(options.queue_rows).unwrap_or(u32::MAX);
        let (sender, receiver) = mpsc::unbounded_channel();
        let settings = WriterSettings {
            batch_rows: options.batch_rows,
            max_age: options.max_age,
            retry_backoff: options.retry_backoff,
            retry_backoff_max: options.retry_backoff_max,
            flush_timeout: options.flush_timeout,
        };
        let writer =
            Writer::start(receiver, settings, config.clone(), mirror.clone(), client).await?;

        tracing::info!(
            guilds = mirror.guild_count(),
            members = mirror.member_total(),
            batch_rows = options.batch_rows,
            queue_rows,
            "PostgreSQL store connected"
        );
        Ok(Self {
            sender,
            queue: Arc::new(Semaphore::new(queue_rows as usize)),
            queue_rows,
            mirror,
            reader: Reader::new(config),
            writer: tokio::spawn(writer.run()),
        })
    }

    /// Returns once every write queued before the call is committed.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the writer task has stopped.
    pub async fn flush(&self) -> Result<(), PortError> {
        let (done, committed) = oneshot::channel();
        self.send(Message::Flush { done })?;
        committed
            .await
            .map_err(|_| PostgresError::WriterStopped.into())
    }

    /// Commits every queued write and stops the writer.
    pub async fn close(self) {
        let Self { sender, writer, .. } = self;
        drop(sender);
        if let Err(error) = writer.await {
            tracing::warn!(%error, "PostgreSQL writer task failed");
        }
    }

    /// Returns the stored guild object, without the lists that have tables of their own.
    pub async fn guild(&self, guild_id: u64) -> Result<Option<Value>, PortError> {
        let rows = self
            .reader
            .query(
                "SELECT data FROM guilds WHERE id = $1",
                &[&(guild_id as i64)],
            )
            .await?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    /// Returns the stored rows of one table of a guild by key (user id for members, presences
    /// and voice states; object id otherwise).
    pub async fn table(
        &self,
        guild_id: u64,
        table: Table,
    ) -> Result<BTreeMap<u64, Value>, PortError> {
        let sql = format!(
            "SELECT {key}, data FROM {name} WHERE guild_id = $1",
            key = table.key_column(),
            name = table.name()
        );
        let rows = self.reader.query(&sql, &[&(guild_id as i64)]).await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1)))
            .collect())
    }

    /// Returns the stored members of a guild in user id order.
    pub async fn members(&self, guild_id: u64) -> Result<Vec<Value>, PortError> {
        Ok(self
            .table(guild_id, Table::Members)
            .await?
            .into_values()
            .collect())
    }

    /// Returns the stored member count of a guild from `guild_member_counts`, `None` when the
    /// guild has no count row. [`StateStore::member_count`] reads the in-memory copy instead.
    pub async fn stored_member_count(&self, guild_id: u64) -> Result<Option<u64>, PortError> {
        let rows = self
            .reader
            .query(
                "SELECT count FROM guild_member_counts WHERE guild_id = $1",
                &[&(guild_id as i64)],
            )
            .await?;
        Ok(rows.first().map(|row| row.get::<_, i64>(0) as u64))
    }

    fn send(&self, message: Message) -> Result<(), PortError> {
        self.sender
            .send(message)
            .map_err(|_| PostgresError::WriterStopped.into())
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn apply(&self, shard: u32, event: &str, data: &RawValue) -> Result<Applied, PortError> {
        let dispatch = parse_dispatch(event, data).map_err(|reason| PortError::InvalidEvent {
            event: event.to_owned(),
            guild: guild_hint(event, data),
            reason,
        })?;
        if dispatch.ops.is_empty() {
            tracing::trace!(shard, event, "dispatch not cached");
            return Ok(Applied::default());
        }

        // Queue space first, so that a caller that gives up while waiting leaves no trace.
        let rows = u32::try_from(dispatch.ops.len()).unwrap_or(u32::MAX);
        let permit = self
            .queue
            .clone()
            .acquire_many_owned(rows.clamp(1, self.queue_rows.max(1)))
            .await
            .map_err(|_| PostgresError::WriterStopped)?;

        let new_guild = self.mirror.record(dispatch.effect);
        self.send(Message::Write {
            ops: dispatch.ops,
            permit,
        })?;

        tracing::trace!(shard, event, rows, new_guild, "dispatch queued");
        Ok(Applied { new_guild })
    }

    async fn member_count(&self, guild_id: u64) -> Result<Option<u64>, PortError> {
        Ok(self.mirror.member_count(guild_id))
    }

    async fn guild_ids_after(&self, cursor: u64, limit: u32) -> Result<Vec<u64>, PortError> {
        Ok(self.mirror.guild_ids_after(cursor, limit))
    }

    async fn load_shard(&self, shard: u32, name: &str) -> Result<Option<ShardRecord>, PortError> {
        let Ok(id) = i32::try_from(shard) else {
            return Ok(None);
        };
        let rows = self
            .reader
            .query(
                "SELECT seq, sess, status, resume_url FROM shards WHERE id = $1 AND name = $2",
                &[&id, &name],
            )
            .await?;
        Ok(rows.first().map(|row| {
            let session: String = row.get(1);
            ShardRecord {
                shard,
                name: name.to_owned(),
                seq: row.get::<_, i64>(0).max(0) as u64,
                session_id: (!session.is_empty()).then_some(session),
                status: row.get(2),
                resume_url: row.get(3),
            }
        }))
    }

    async fn save_shard(&self, record: &ShardRecord) -> Result<(), PortError> {
        if i32::try_from(record.shard).is_err() || i64::try_from(record.seq).is_err() {
            return Err(PortError::InvalidEvent {
                event: "shard record".to_owned(),
                guild: None,
                reason: format!(
                    "shard {} or sequence {} does not fit the int4 and int8 columns of shards",
                    record.shard, record.seq
                ),
            });
        }

        let (done, committed) = oneshot::channel();
        self.send(Message::SaveShard {
            record: record.clone(),
            done,
        })?;
        committed
            .await
            .map_err(|_| PostgresError::WriterStopped.into())
    }

    async fn totals(&self) -> Result<CacheTotals, PortError> {
        Ok(CacheTotals {
            guilds: self.mirror.guild_count(),
            members: self.mirror.member_total(),
        })
    }
}

/// How long [`PostgresStore::claim_shards`] waits for a shard another connection holds.
const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// The shards of one process name claimed in PostgreSQL: one session-level advisory lock per
/// `(name, shard)`, held on a connection of its own until this value is dropped or the
/// connection breaks.
pub struct ShardClaim {
    _client: Client,
}

impl PostgresStore {
    /// Claims `shards` under `name`, so that a second process started with the same name and an
    /// overlapping range stops at start instead of resuming the same sessions as this one.
    ///
    /// # Errors
    ///
    /// [`ClaimError::Taken`] names the first shard another process holds.
    pub async fn claim_shards(
        &self,
        name: &str,
        shards: std::ops::Range<u32>,
    ) -> Result<ShardClaim, ClaimError> {
        let client = connect(&self.reader.config).await?;
        // A predecessor killed a moment ago holds its locks until the server notices that its
        // connection closed.
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        for shard in shards {
            let shard_key = i32::try_from(shard).unwrap_or(i32::MAX);
            loop {
                let row = client
                    .query_one(
                        "SELECT pg_try_advisory_lock(hashtext('shardvisor:' || $1), $2)",
                        &[&name, &shard_key],
                    )
                    .await
                    .map_err(|source| PostgresError::Query {
                        operation: "claiming the shards",
                        source,
                    })?;
                if row.get::<_, bool>(0) {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ClaimError::Taken {
                        name: name.to_owned(),
                        shard,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(ShardClaim { _client: client })
    }
}

/// A failed [`PostgresStore::claim_shards`].
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("shard {shard} of process name {name:?} is run by another process that uses this database; stop it, or give this process another --name or a disjoint --start/--stop range")]
    Taken { name: String, shard: u32 },
    #[error(transparent)]
    Postgres(#[from] PostgresError),
}

/// Sweep cursors in the `sweep_cursors` table, so a restarted process goes on where its Sweeper
/// stopped. They are written on the read connection: a cursor needs no batching.
#[async_trait]
impl CursorStore for PostgresStore {
    async fn load_cursor(&self, name: &str) -> Result<Option<u64>, PortError> {
        let rows = self
            .reader
            .query("SELECT cursor FROM sweep_cursors WHERE name = $1", &[&name])
            .await?;
        Ok(rows.first().map(|row| row.get::<_, i64>(0).max(0) as u64))
    }

    async fn save_cursor(&self, name: &str, cursor: u64) -> Result<(), PortError> {
        let cursor = i64::try_from(cursor).map_err(|_| PortError::InvalidEvent {
            event: "sweep cursor".to_owned(),
            guild: None,
            reason: format!("cursor {cursor} does not fit the int8 column of sweep_cursors"),
        })?;
        self.reader
            .query(
                "INSERT INTO sweep_cursors (name, cursor) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET cursor = excluded.cursor",
                &[&name, &cursor],
            )
            .await?;
        Ok(())
    }
}

/// Checks the options and builds the connection settings.
fn parse_options(options: &PostgresOptions) -> Result<Config, PostgresError> {
    let invalid = |option, value: String, reason| PostgresError::InvalidOption {
        option,
        value,
        reason,
    };
    if options.batch_rows == 0 {
        return Err(invalid("batch_rows", "0".into(), "must be at least 1"));
    }
    if options.queue_rows == 0 {
        return Err(invalid("queue_rows", "0".into(), "must be at least 1"));
    }
    if options.retry_backoff.is_zero() || options.retry_backoff > options.retry_backoff_max {
        let value = format!("{:?}", options.retry_backoff);
        return Err(invalid(
            "retry_backoff",
            value,
            "must be above zero and at most retry_backoff_max",
        ));
    }

    let mut config: Config = options.url.parse().map_err(PostgresError::InvalidUrl)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(options.connect_timeout);
    }
    if config.get_application_name().is_none() {
        config.application_name("shardvisor");
    }
    Ok(config)
}

/// Reads the cached guild ids and the member counts.
async fn load_mirror(client: &Client) -> Result<Mirror, PostgresError> {
    let query = |operation| move |source| PostgresError::Query { operation, source };

    let guilds: BTreeSet<u64> = client
        .query("SELECT id FROM guilds", &[])
        .await
        .map_err(query("loading the cached guild ids"))?
        .iter()
        .map(|row| row.get::<_, i64>(0) as u64)
        .collect();
    let counts: HashMap<u64, u64> = client
        .query("SELECT guild_id, count FROM guild_member_counts", &[])
        .await
        .map_err(query("loading the member counts"))?
        .iter()
        .map(|row| {
            (
                row.get::<_, i64>(0) as u64,
                row.get::<_, i64>(1).max(0) as u64,
            )
        })
        .collect();
    Ok(Mirror::load(guilds, counts))
}

/// The connection for reads, opened on first use and again after it breaks.
struct Reader {
    config: Config,
    client: Mutex<Option<Client>>,
}

impl Reader {
    fn new(config: Config) -> Self {
        Self {
            config,
            client: Mutex::new(None),
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PostgresError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect(&self.config).await?);
        }
        let client = guard.as_ref().ok_or(PostgresError::WriterStopped)?;

        let result = client.query(sql, params).await;
        if result.is_err() && client.is_closed() {
            *guard = None;
        }
        result.map_err(|source| PostgresError::Query {
            operation: "reading the cache",
            source,
        })
    }
}
