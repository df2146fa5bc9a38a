//! The tables, created at connect when missing.
//!
//! Column names and keys match the tables of the service this store replaces, so that an
//! existing database is used as it is: each cached object is a `jsonb` column `data`, keyed as
//! Discord keys it. Two additions: `threads.parent_id` (so that deleting a channel deletes its
//! threads) and `guild_member_counts` (the member count per guild, read in O(1)).

use tokio_postgres::Client;

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

    transaction
        .commit()
        .await
        .map_err(query("committing the schema"))?;
    Ok(())
}
