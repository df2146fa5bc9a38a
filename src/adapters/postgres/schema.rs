//! The tables, created at connect when missing.
//!
//! Column names and keys match the tables of the service this store replaces, so that an
//! existing database is used as it is: each cached object is a `jsonb` column `data`, keyed as
//! Discord keys it. The additions are `threads.parent_id` (so that deleting a channel deletes
//! its threads), `shards.status` and `shards.resume_url`, `guild_member_counts` (the member
//! count per guild), and a unique index wherever an existing table lacks one that an upsert
//! needs.

use tokio_postgres::{Client, Transaction};

use super::PostgresError;

/// A table of guild contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Roles by role id.
    Roles,
    /// Guild channels by channel id, threads excluded.
    Channels,
    /// Active threads by channel id, with their parent channel.
    Threads,
    /// Custom emojis by emoji id.
    Emojis,
    /// Members by (guild id, user id).
    Members,
    /// Presences by (guild id, user id). An offline presence is removed rather than stored, so
    /// a missing presence means offline.
    Presences,
    /// Voice states by (guild id, user id), one per user connected to a voice channel.
    VoiceStates,
}

impl Table {
    /// Every table, in the order of [`Table::index`].
    pub const ALL: [Table; 7] = [
        Table::Roles,
        Table::Channels,
        Table::Threads,
        Table::Emojis,
        Table::Members,
        Table::Presences,
        Table::VoiceStates,
    ];

    /// Returns the SQL name of the table.
    pub fn name(self) -> &'static str {
        match self {
            Table::Roles => "roles",
            Table::Channels => "channels",
            Table::Threads => "threads",
            Table::Emojis => "emojis",
            Table::Members => "members",
            Table::Presences => "presence",
            Table::VoiceStates => "voice_states",
        }
    }

    /// Returns the column that keys a row within its guild.
    pub fn key_column(self) -> &'static str {
        match self {
            Table::Members | Table::Presences | Table::VoiceStates => "user_id",
            Table::Roles | Table::Channels | Table::Threads | Table::Emojis => "id",
        }
    }

    /// Returns the primary key, the conflict target of upserts.
    pub(crate) fn primary_key(self) -> &'static str {
        match self {
            Table::Members | Table::Presences | Table::VoiceStates => "guild_id, user_id",
            Table::Roles | Table::Channels | Table::Threads | Table::Emojis => "id, guild_id",
        }
    }

    /// Returns the position of the table in [`Table::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Key of the advisory lock held while the schema is applied, so that processes starting
/// together do not race on `CREATE TABLE IF NOT EXISTS` (which can fail with a unique
/// violation on `pg_type` when two run at once).
const SCHEMA_LOCK: i64 = 0x7368_6172_6476_6973;

/// Tables and indexes. Every statement is idempotent.
///
/// The indexes on `guild_id` serve the deletes by guild (GUILD_DELETE, and the lists that
/// GUILD_CREATE replaces). Members get no index besides the primary key, whose first column
/// is `guild_id`, because every index costs time on the member upserts that dominate a
/// reconnect.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS guilds (
    id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS members (
    guild_id int8 NOT NULL,
    user_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE IF NOT EXISTS roles (
    id int8 NOT NULL,
    guild_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (id, guild_id)
);
CREATE INDEX IF NOT EXISTS roles_guild_id ON roles (guild_id);

CREATE TABLE IF NOT EXISTS channels (
    id int8 NOT NULL,
    guild_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (id, guild_id)
);
CREATE INDEX IF NOT EXISTS channels_guild_id ON channels (guild_id);

CREATE TABLE IF NOT EXISTS emojis (
    id int8 NOT NULL,
    guild_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (id, guild_id)
);
CREATE INDEX IF NOT EXISTS emojis_guild_id ON emojis (guild_id);

CREATE TABLE IF NOT EXISTS threads (
    id int8 NOT NULL,
    guild_id int8 NOT NULL,
    parent_id int8,
    data jsonb NOT NULL,
    PRIMARY KEY (id, guild_id)
);
ALTER TABLE threads ADD COLUMN IF NOT EXISTS parent_id int8;
CREATE INDEX IF NOT EXISTS threads_guild_id_parent_id ON threads (guild_id, parent_id);

CREATE TABLE IF NOT EXISTS presence (
    guild_id int8 NOT NULL,
    user_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE IF NOT EXISTS voice_states (
    guild_id int8 NOT NULL,
    user_id int8 NOT NULL,
    data jsonb NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE IF NOT EXISTS shards (
    id int4 NOT NULL,
    name text NOT NULL,
    seq int8 NOT NULL,
    sess text NOT NULL,
    PRIMARY KEY (id, name)
);
ALTER TABLE shards ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS sweep_cursors (
    name text PRIMARY KEY,
    cursor int8 NOT NULL
);
ALTER TABLE shards ADD COLUMN IF NOT EXISTS resume_url text;
";

/// The member count table, created and filled from `members` in one step so that counts are
/// exact even for a database whose members were written before the table existed.
const MEMBER_COUNTS: &str = "
CREATE TABLE guild_member_counts (
    guild_id int8 NOT NULL,
    count int8 NOT NULL,
    PRIMARY KEY (guild_id)
);
INSERT INTO guild_member_counts (guild_id, count)
    SELECT guild_id, count(*) FROM members GROUP BY guild_id;
";

/// The columns of every `ON CONFLICT` target of the writer, sorted by name, by table. Each needs
/// a unique index on exactly these columns, or the upsert fails.
const CONFLICT_TARGETS: [(&str, &[&str]); 10] = [
    ("guilds", &["id"]),
    ("members", &["guild_id", "user_id"]),
    ("roles", &["guild_id", "id"]),
    ("channels", &["guild_id", "id"]),
    ("emojis", &["guild_id", "id"]),
    ("threads", &["guild_id", "id"]),
    ("presence", &["guild_id", "user_id"]),
    ("voice_states", &["guild_id", "user_id"]),
    ("shards", &["id", "name"]),
    ("guild_member_counts", &["guild_id"]),
];

/// Creates a unique index on `columns` of `table` unless one exists.
///
/// The tables created above have one as their primary key. A table of the same name that
/// existed before may be keyed otherwise (a `threads` table keyed by `id` alone, say), and
/// without the index every flush would fail on the upsert and be retried forever.
async fn ensure_unique_index(
    transaction: &Transaction<'_>,
    table: &str,
    columns: &[&str],
) -> Result<(), PostgresError> {
    let query = |operation| move |source| PostgresError::Query { operation, source };

    let sql = "SELECT EXISTS (
        SELECT 1 FROM pg_index AS i
        WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indnatts = $2
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
               FROM pg_attribute AS a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = $3::text[])";
    let width = i16::try_from(columns.len()).unwrap_or(i16::MAX);
    let exists: bool = transaction
        .query_one(sql, &[&table, &width, &columns])
        .await
        .map_err(query("looking up the unique indexes"))?
        .get(0);
    if exists {
        return Ok(());
    }

    let name = format!("{table}_{}_key", columns.join("_"));
    let sql = format!(
        "CREATE UNIQUE INDEX {name} ON {table} ({})",
        columns.join(", ")
    );
    transaction
        .batch_execute(&sql)
        .await
        .map_err(query("creating a unique index for the upserts"))?;
    tracing::info!(table, index = %name, "unique index created for the upserts");
    Ok(())
}

/// Checks the database encoding and creates the missing tables, in one transaction.
pub(super) async fn apply_schema(client: &mut Client) -> Result<(), PostgresError> {
    let query = |operation| move |source| PostgresError::Query { operation, source };

    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .map_err(query("reading the server encoding"))?
        .get(0);
    // The JSON text is sent as UTF-8 and every cached string may contain any Unicode
    // character, which only a UTF8 database can store.
    if encoding != "UTF8" {
        return Err(PostgresError::Encoding { encoding });
    }

    let transaction = client
        .transaction()
        .await
        .map_err(query("starting the schema transaction"))?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(query("locking the schema"))?;
    // `CREATE … IF NOT EXISTS` sends a NOTICE for each table that exists, at every start.
    transaction
        .batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(query("quieting the schema notices"))?;
    transaction
        .batch_execute(TABLES)
        .await
        .map_err(query("creating the tables"))?;

    let counts_missing: bool = transaction
        .query_one("SELECT to_regclass('guild_member_counts') IS NULL", &[])
        .await
        .map_err(query("looking up guild_member_counts"))?
        .get(0);
    if counts_missing {
        transaction
            .batch_execute(MEMBER_COUNTS)
            .await
            .map_err(query("creating guild_member_counts"))?;
        tracing::info!("guild_member_counts created from the stored members");
    }

    for (table, columns) in CONFLICT_TARGETS {
        ensure_unique_index(&transaction, table, columns).await?;
    }

    transaction
        .commit()
        .await
        .map_err(query("committing the schema"))?;
    Ok(())
}
