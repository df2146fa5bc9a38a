//! The SQL of a flush, prepared once per connection.
//!
//! Every statement takes whole columns as arrays (`unnest($1::int8[], …)`), so a flush runs one
//! statement per table and kind of write for every 1,000 rows (see `plan::MAX_STATEMENT_ROWS`).
//! `unnest` was chosen with `cargo bench --bench store -- --candidates`, which compares it with
//! multi-row `VALUES` and with binary COPY into a temporary table.

use tokio_postgres::{Client, Statement};

use super::schema::Table;

/// The statements of a flush, prepared once per connection.
pub(super) struct Statements {
    /// `DELETE` of every row of some guilds, per table.
    pub(super) clear: Vec<Statement>,
    pub(super) clear_member_counts: Statement,
    pub(super) clear_thread_parents: Statement,
    pub(super) remove_guilds: Statement,
    /// `DELETE` by key, per table. The members statement also lowers the counts.
    pub(super) remove: Vec<Statement>,
    pub(super) put_guilds: Statement,
    pub(super) merge_guilds: Statement,
    /// Upsert by key, per table. The members statement also raises the counts.
    pub(super) put: Vec<Statement>,
    pub(super) merge_members: Statement,
    pub(super) put_shards: Statement,
    pub(super) read_member_counts: Statement,
    pub(super) begin: Statement,
    pub(super) commit: Statement,
}

/// Raises the member count of each guild by the rows a member upsert inserted.
///
/// `xmax = 0` is true for a row version that the statement inserted and false for one it
/// updated, which carries the updating transaction's id from the row lock that
/// `ON CONFLICT DO UPDATE` takes. This is an implementation detail of PostgreSQL, checked on
/// version 15 by the store's tests, which compare every count with `COUNT(*)`.
///
/// Rows whose data is unchanged are not updated at all (the `WHERE` of `DO UPDATE`): a
/// reconnect sends mostly unchanged members again, and skipping them writes no new row
/// versions.
fn upsert_members(set_data: &str) -> String {
    format!(
        "WITH written AS (
            INSERT INTO members AS m (guild_id, user_id, data)
            SELECT * FROM unnest($1::int8[], $2::int8[], $3::jsonb[])
            ON CONFLICT (guild_id, user_id) DO UPDATE SET data = {set_data}
                WHERE m.data IS DISTINCT FROM {set_data}
            RETURNING m.guild_id, m.xmax = 0 AS inserted
        )
        INSERT INTO guild_member_counts AS c (guild_id, count)
        SELECT guild_id, count(*) FROM written WHERE inserted GROUP BY guild_id
        ON CONFLICT (guild_id) DO UPDATE SET count = c.count + EXCLUDED.count"
    )
}

/// Removes members by key and lowers the count of each guild by the rows removed.
const REMOVE_MEMBERS: &str = "
WITH removed AS (
    DELETE FROM members AS m
    USING unnest($1::int8[], $2::int8[]) AS k(guild_id, user_id)
    WHERE m.guild_id = k.guild_id AND m.user_id = k.user_id
    RETURNING m.guild_id
)
UPDATE guild_member_counts AS c SET count = c.count - r.removed
FROM (SELECT guild_id, count(*) AS removed FROM removed GROUP BY guild_id) AS r
WHERE c.guild_id = r.guild_id";

const PUT_THREADS: &str = "
INSERT INTO threads AS t (guild_id, id, parent_id, data)
SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::jsonb[])
ON CONFLICT (id, guild_id) DO UPDATE SET parent_id = EXCLUDED.parent_id, data = EXCLUDED.data";

/// Stores shard records. `sess` is `NOT NULL` in the replaced service's table, so a shard
/// without a session stores the empty string.
const PUT_SHARDS: &str = "
INSERT INTO shards (id, name, seq, sess, status, resume_url)
SELECT * FROM unnest($1::int4[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[])
ON CONFLICT (id, name) DO UPDATE
SET seq = EXCLUDED.seq, sess = EXCLUDED.sess, status = EXCLUDED.status,
    resume_url = EXCLUDED.resume_url";

impl Statements {
    pub async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let mut clear = Vec::new();
        let mut remove = Vec::new();
        let mut put = Vec::new();
        for table in Table::ALL {
            let (name, key) = (table.name(), table.key_column());
            let sql = format!("DELETE FROM {name} WHERE guild_id = ANY($1::int8[])");
            clear.push(client.prepare(&sql).await?);

            let sql = match table {
                Table::Members => REMOVE_MEMBERS.to_owned(),
                _ => format!(
                    "DELETE FROM {name} AS t USING unnest($1::int8[], $2::int8[]) AS k(guild_id, key)
                     WHERE t.guild_id = k.guild_id AND t.{key} = k.key"
                ),
            };
            remove.push(client.prepare(&sql).await?);

            let sql = match table {
                Table::Members => upsert_members("EXCLUDED.data"),
                Table::Threads => PUT_THREADS.to_owned(),
                _ => format!(
                    "INSERT INTO {name} AS t (guild_id, {key}, data)
                     SELECT * FROM unnest($1::int8[], $2::int8[], $3::jsonb[])
                     ON CONFLICT ({primary_key}) DO UPDATE SET data = EXCLUDED.data",
                    primary_key = table.primary_key()
                ),
            };
            put.push(client.prepare(&sql).await?);
        }

        Ok(Self {
            clear,
            clear_member_counts: client
                .prepare("DELETE FROM guild_member_counts WHERE guild_id = ANY($1::int8[])")
                .await?,
            clear_thread_parents: client
                .prepare(
                    "DELETE FROM threads AS t USING unnest($1::int8[], $2::int8[]) AS p(guild_id, parent_id)
                     WHERE t.guild_id = p.guild_id AND t.parent_id = p.parent_id",
                )
                .await?,
            remove_guilds: client
                .prepare("DELETE FROM guilds WHERE id = ANY($1::int8[])")
                .await?,
            remove,
            put_guilds: client
                .prepare(
                    "INSERT INTO guilds (id, data) SELECT * FROM unnest($1::int8[], $2::jsonb[])
                     ON CONFLICT (id) DO UPDATE SET data = EXCLUDED.data",
                )
                .await?,
            merge_guilds: client
                .prepare(
                    "INSERT INTO guilds AS g (id, data) SELECT * FROM unnest($1::int8[], $2::jsonb[])
                     ON CONFLICT (id) DO UPDATE SET data = g.data || EXCLUDED.data",
                )
                .await?,
            put,
            merge_members: client
                .prepare(&upsert_members("m.data || EXCLUDED.data"))
                .await?,
            put_shards: client.prepare(PUT_SHARDS).await?,
            read_member_counts: client
                .prepare(
                    "SELECT guild_id, count FROM guild_member_counts WHERE guild_id = ANY($1::int8[])",
                )
                .await?,
            begin: client.prepare("BEGIN").await?,
            commit: client.prepare("COMMIT").await?,
        })
    }
}
