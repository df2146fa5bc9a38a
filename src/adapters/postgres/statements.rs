//! The SQL of a flush: prepared statements, the plan that turns a [`Batch`] into statement
//! calls, and the two ways to run a plan.
//!
//! Every statement takes whole columns as arrays (`unnest($1::int8[], …)`), so a flush runs one
//! statement per table and kind of write whatever its row count. Measured with
//! `cargo bench --bench store -- --candidates` (PostgreSQL 15, one connection, 2 cores,
//! ~600-byte members), `unnest` was the fastest member upsert that also returns what the count
//! maintenance needs; the figures are in the benchmark's documentation.

use std::collections::HashMap;

use std::future::poll_fn;
use std::task::Poll;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, TryFutureExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::batch::{Batch, RowWrite, TableWrites};
use super::jsonb::Jsonb;
use super::schema::Table;

/// The statements of a flush, prepared once per connection.
pub(super) struct Statements {
    /// `DELETE` of every row of some guilds, per table.
    clear: Vec<Statement>,
    clear_member_counts: Statement,
    clear_thread_parents: Statement,
    remove_guilds: Statement,
    /// `DELETE` by key, per table. The members statement also lowers the counts.
    remove: Vec<Statement>,
    put_guilds: Statement,
    merge_guilds: Statement,
    /// Upsert by key, per table. The members statement also raises the counts.
    put: Vec<Statement>,
    merge_members: Statement,
    put_shards: Statement,
    read_member_counts: Statement,
}

/// Raises the member count of each guild by the rows a member upsert inserted.
///
/// `xmax = 0` is true for a row version that the statement inserted and false for one it
/// updated, because `ON CONFLICT DO UPDATE` locks the row before updating it and the lock is
/// kept in the new version's `xmax`. This holds for PostgreSQL 9.5 and later. The store's tests
/// compare every count with `COUNT(*)` to catch a change in that behaviour.
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
        })
    }
}

/// The columns of one statement call, one element per row.
#[derive(Clone)]
pub(super) enum Columns<'a> {
    /// Guild ids.
    Guilds(Vec<i64>),
    /// (guild id, key) pairs: a row key, or a thread's parent channel.
    Keys(Vec<i64>, Vec<i64>),
    /// Guild objects: guild id, data.
    GuildRows(Vec<i64>, Vec<Jsonb<'a>>),
    /// Rows: guild id, key, data.
    Rows(Vec<i64>, Vec<i64>, Vec<Jsonb<'a>>),
    /// Threads: guild id, thread id, parent channel id, data.
    Threads(Vec<i64>, Vec<i64>, Vec<Option<i64>>, Vec<Jsonb<'a>>),
    /// Shard records: shard id, process name, sequence, session id, status, resume URL.
    Shards {
        shards: Vec<i32>,
        names: Vec<&'a str>,
        seqs: Vec<i64>,
        sessions: Vec<&'a str>,
        statuses: Vec<&'a str>,
        resume_urls: Vec<Option<&'a str>>,
    },
}

impl<'a> Columns<'a> {
    pub fn len(&self) -> usize {
        match self {
            Columns::Guilds(guilds)
            | Columns::Keys(guilds, _)
            | Columns::GuildRows(guilds, _)
            | Columns::Rows(guilds, _, _)
            | Columns::Threads(guilds, _, _, _) => guilds.len(),
            Columns::Shards { shards, .. } => shards.len(),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        match self {
            Columns::Guilds(guilds) => vec![guilds],
            Columns::Keys(guilds, keys) => vec![guilds, keys],
            Columns::GuildRows(guilds, data) => vec![guilds, data],
            Columns::Rows(guilds, keys, data) => vec![guilds, keys, data],
            Columns::Threads(guilds, ids, parents, data) => vec![guilds, ids, parents, data],
            Columns::Shards {
                shards,
                names,
                seqs,
                sessions,
                statuses,
                resume_urls,
            } => vec![shards, names, seqs, sessions, statuses, resume_urls],
        }
    }

    /// Returns the columns of row `index` alone.
    fn row(&self, index: usize) -> Columns<'a> {
        fn one<T: Clone>(column: &[T], index: usize) -> Vec<T> {
            vec![column[index].clone()]
        }
        match self {
            Columns::Guilds(guilds) => Columns::Guilds(one(guilds, index)),
            Columns::Keys(guilds, keys) => Columns::Keys(one(guilds, index), one(keys, index)),
            Columns::GuildRows(guilds, data) => {
                Columns::GuildRows(one(guilds, index), one(data, index))
            }
            Columns::Rows(guilds, keys, data) => {
                Columns::Rows(one(guilds, index), one(keys, index), one(data, index))
            }
            Columns::Threads(guilds, ids, parents, data) => Columns::Threads(
                one(guilds, index),
                one(ids, index),
                one(parents, index),
                one(data, index),
            ),
            Columns::Shards {
                shards,
                names,
                seqs,
                sessions,
                statuses,
                resume_urls,
            } => Columns::Shards {
                shards: one(shards, index),
                names: one(names, index),
                seqs: one(seqs, index),
                sessions: one(sessions, index),
                statuses: one(statuses, index),
                resume_urls: one(resume_urls, index),
            },
        }
    }

    /// Returns the guild id (the shard id for shard records) and the key of row `index`, for
    /// logs.
    fn describe(&self, index: usize) -> (i64, Option<i64>) {
        match self {
            Columns::Guilds(guilds) | Columns::GuildRows(guilds, _) => (guilds[index], None),
            Columns::Keys(guilds, keys)
            | Columns::Rows(guilds, keys, _)
            | Columns::Threads(guilds, keys, _, _) => (guilds[index], Some(keys[index])),
            Columns::Shards { shards, .. } => (i64::from(shards[index]), None),
        }
    }
}

/// One statement call of a flush.
pub(super) struct Call<'a> {
    statement: &'a Statement,
    /// The table written, for logs.
    table: &'static str,
    columns: Columns<'a>,
}

/// The statement calls of one flush, in the order they run.
pub(super) struct Plan<'a> {
    calls: Vec<Call<'a>>,
    /// Guilds whose member count is read back after the writes.
    member_guilds: Vec<i64>,
}

/// A row that PostgreSQL rejected and that was left out of its flush.
pub(super) struct RejectedRow {
    pub table: &'static str,
    pub guild_id: i64,
    pub key: Option<i64>,
    pub error: tokio_postgres::Error,
}

/// Row writes of one table, split by kind and sorted by key. Sorting makes every flush lock
/// rows in the same order, so two processes writing the same tables cannot deadlock on them.
struct SplitRows<'a> {
    puts: Vec<(i64, i64, Option<i64>, &'a str)>,
    merges: Vec<(i64, i64, &'a str)>,
    removes: Vec<(i64, i64)>,
}

fn split_rows(writes: &TableWrites) -> SplitRows<'_> {
    let mut split = SplitRows {
        puts: Vec::new(),
        merges: Vec::new(),
        removes: Vec::new(),
    };
    for (guild, rows) in &writes.rows {
        for (key, write) in rows {
            match write {
                RowWrite::Put { row, parent } => split.puts.push((*guild, *key, *parent, row)),
                RowWrite::Merge(fields) => split.merges.push((*guild, *key, fields)),
                RowWrite::Remove => split.removes.push((*guild, *key)),
            }
        }
    }
    split
        .puts
        .sort_unstable_by_key(|(guild, key, ..)| (*guild, *key));
    split
        .merges
        .sort_unstable_by_key(|(guild, key, _)| (*guild, *key));
    split.removes.sort_unstable();
    split
}

fn sorted(ids: impl IntoIterator<Item = i64>) -> Vec<i64> {
    let mut ids: Vec<i64> = ids.into_iter().collect();
    ids.sort_unstable();
    ids
}

impl<'a> Plan<'a> {
    /// Orders a batch's writes: removals by range, removals by key, upserts, shard records.
    pub fn new(batch: &'a Batch, statements: &'a Statements) -> Self {
        let mut plan = Plan {
            calls: Vec::new(),
            member_guilds: batch.member_guilds(),
        };

        plan.add_range_removals(batch, statements);
        plan.add_guild_writes(batch, statements);
        for table in Table::ALL {
            plan.add_row_writes(table, batch.writes_of(table), statements);
        }
        plan.add_shards(batch, statements);
        plan
    }

    fn push(&mut self, statement: &'a Statement, table: &'static str, columns: Columns<'a>) {
        if columns.len() > 0 {
            self.calls.push(Call {
                statement,
                table,
                columns,
            });
        }
    }

    fn add_range_removals(&mut self, batch: &'a Batch, statements: &'a Statements) {
        for table in Table::ALL {
            let cleared = sorted(batch.writes_of(table).cleared.iter().copied());
            self.push(
                &statements.clear[table.index()],
                table.name(),
                Columns::Guilds(cleared),
            );
        }

        let members_cleared = &batch.writes_of(Table::Members).cleared;
        self.push(
            &statements.clear_member_counts,
            "guild_member_counts",
            Columns::Guilds(sorted(members_cleared.iter().copied())),
        );

        let mut parents: Vec<(i64, i64)> = batch
            .writes_of(Table::Threads)
            .cleared_parents
            .iter()
            .copied()
            .collect();
        parents.sort_unstable();
        let (guilds, parents) = parents.into_iter().unzip();
        self.push(
            &statements.clear_thread_parents,
            "threads",
            Columns::Keys(guilds, parents),
        );
    }

    fn add_guild_writes(&mut self, batch: &'a Batch, statements: &'a Statements) {
        let mut writes: Vec<(&i64, &RowWrite)> = batch.guilds.iter().collect();
        writes.sort_unstable_by_key(|(guild, _)| **guild);

        let mut removes = Vec::new();
        let (mut puts, mut put_data) = (Vec::new(), Vec::new());
        let (mut merges, mut merge_data) = (Vec::new(), Vec::new());
        for (guild, write) in writes {
            match write {
                RowWrite::Put { row, .. } => {
                    puts.push(*guild);
                    put_data.push(Jsonb(row));
                }
                RowWrite::Merge(fields) => {
                    merges.push(*guild);
                    merge_data.push(Jsonb(fields));
                }
                RowWrite::Remove => removes.push(*guild),
            }
        }

        self.push(
            &statements.remove_guilds,
            "guilds",
            Columns::Guilds(removes),
        );
        self.push(
            &statements.put_guilds,
            "guilds",
            Columns::GuildRows(puts, put_data),
        );
        self.push(
            &statements.merge_guilds,
            "guilds",
            Columns::GuildRows(merges, merge_data),
        );
    }

    fn add_row_writes(
        &mut self,
        table: Table,
        writes: &'a TableWrites,
        statements: &'a Statements,
    ) {
        let split = split_rows(writes);

        let (guilds, keys) = split.removes.into_iter().unzip();
        self.push(
            &statements.remove[table.index()],
            table.name(),
            Columns::Keys(guilds, keys),
        );

        let put = &statements.put[table.index()];
        let columns = if table == Table::Threads {
            let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (guild, id, parent, row) in split.puts {
                columns.0.push(guild);
                columns.1.push(id);
                columns.2.push(parent);
                columns.3.push(Jsonb(row));
            }
            Columns::Threads(columns.0, columns.1, columns.2, columns.3)
        } else {
            let mut columns = (Vec::new(), Vec::new(), Vec::new());
            for (guild, key, _, row) in split.puts {
                columns.0.push(guild);
                columns.1.push(key);
                columns.2.push(Jsonb(row));
            }
            Columns::Rows(columns.0, columns.1, columns.2)
        };
        self.push(put, table.name(), columns);

        // Only members are merged (GUILD_MEMBER_UPDATE); `Batch` creates no other merges.
        let mut columns = (Vec::new(), Vec::new(), Vec::new());
        for (guild, key, fields) in split.merges {
            columns.0.push(guild);
            columns.1.push(key);
            columns.2.push(Jsonb(fields));
        }
        self.push(
            &statements.merge_members,
            table.name(),
            Columns::Rows(columns.0, columns.1, columns.2),
        );
    }

    fn add_shards(&mut self, batch: &'a Batch, statements: &'a Statements) {
        let mut records: Vec<_> = batch.shards.values().collect();
        records.sort_unstable_by(|a, b| (a.shard, &a.name).cmp(&(b.shard, &b.name)));

        let columns = Columns::Shards {
            // `PostgresStore::save_shard` rejects ids and sequences beyond these types.
            shards: records.iter().map(|r| r.shard as i32).collect(),
            names: records.iter().map(|r| r.name.as_str()).collect(),
            seqs: records.iter().map(|r| r.seq as i64).collect(),
            sessions: records
                .iter()
                .map(|r| r.session_id.as_deref().unwrap_or(""))
                .collect(),
            statuses: records.iter().map(|r| r.status.as_str()).collect(),
            resume_urls: records.iter().map(|r| r.resume_url.as_deref()).collect(),
        };
        self.push(&statements.put_shards, "shards", columns);
    }

    pub fn statement_count(&self) -> usize {
        self.calls.len()
    }

    /// Runs the plan in one transaction and returns the member count of every guild in
    /// `member_guilds` that has one after it.
    ///
    /// The statements are pipelined: all are sent before the first reply is read, which saves a
    /// round trip per statement. They run in the order sent, and an error aborts the
    /// transaction, so the first error in plan order is the one returned.
    pub async fn execute(
        &self,
        client: &mut Client,
        statements: &Statements,
    ) -> Result<HashMap<i64, i64>, tokio_postgres::Error> {
        let transaction = client.transaction().await?;

        let params: Vec<_> = self
            .calls
            .iter()
            .map(|call| call.columns.params())
            .collect();
        let count_params: [&(dyn ToSql + Sync); 1] = [&self.member_guilds];
        let mut requests: Vec<BoxFuture<'_, Result<Vec<Row>, tokio_postgres::Error>>> = self
            .calls
            .iter()
            .zip(&params)
            .map(|(call, params)| {
                transaction
                    .execute(call.statement, params)
                    .map_ok(|_| Vec::new())
                    .boxed()
            })
            .collect();
        requests.push(
            transaction
                .query(&statements.read_member_counts, &count_params)
                .boxed(),
        );

        let mut replies = pipeline(requests).await;
        let counts = replies.pop().unwrap_or_else(|| Ok(Vec::new()));
        if let Some(error) = replies.into_iter().find_map(Result::err) {
            return Err(error);
        }
        let counts = counts?;

        transaction.commit().await?;
        Ok(read_counts(&counts))
    }

    /// Runs the plan in one transaction like [`Plan::execute`], but leaves out each row that
    /// PostgreSQL rejects with a data error and returns those rows.
    ///
    /// Each call runs under a savepoint, and a call that fails is run again row by row, so the
    /// cost stays low unless many rows are bad. Any other error ends the attempt.
    pub async fn execute_isolated(
        &self,
        client: &mut Client,
        statements: &Statements,
    ) -> Result<(HashMap<i64, i64>, Vec<RejectedRow>), tokio_postgres::Error> {
        let mut transaction = client.transaction().await?;
        let mut rejected = Vec::new();

        for call in &self.calls {
            let savepoint = transaction.savepoint("call").await?;
            match savepoint
                .execute(call.statement, &call.columns.params())
                .await
            {
                Ok(_) => {
                    savepoint.commit().await?;
                    continue;
                }
                Err(error) if is_data_error(&error) => savepoint.rollback().await?,
                Err(error) => return Err(error),
            }

            for index in 0..call.columns.len() {
                let row = call.columns.row(index);
                let savepoint = transaction.savepoint("row").await?;
                match savepoint.execute(call.statement, &row.params()).await {
                    Ok(_) => savepoint.commit().await?,
                    Err(error) if is_data_error(&error) => {
                        savepoint.rollback().await?;
                        let (guild_id, key) = call.columns.describe(index);
                        rejected.push(RejectedRow {
                            table: call.table,
                            guild_id,
                            key,
                            error,
                        });
                    }
                    Err(error) => return Err(error),
                }
            }
        }

        let counts = transaction
            .query(&statements.read_member_counts, &[&self.member_guilds])
            .await?;
        transaction.commit().await?;
        Ok((read_counts(&counts), rejected))
    }

    pub fn member_guilds(&self) -> &[i64] {
        &self.member_guilds
    }
}

/// Polls the requests in order until all are done and returns their results in that order.
///
/// tokio-postgres sends a request when its future is first polled, so polling in list order
/// sends them in list order. `join_all` gives no such promise once it holds more than a few
/// dozen futures.
async fn pipeline<T>(mut requests: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut replies: Vec<Option<T>> = requests.iter().map(|_| None).collect();
    poll_fn(|context| {
        let mut done = true;
        for (request, reply) in requests.iter_mut().zip(replies.iter_mut()) {
            if reply.is_some() {
                continue;
            }
            match request.as_mut().poll(context) {
                Poll::Ready(value) => *reply = Some(value),
                Poll::Pending => done = false,
            }
        }
        if done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    replies.into_iter().flatten().collect()
}

fn read_counts(rows: &[Row]) -> HashMap<i64, i64> {
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

/// Returns whether PostgreSQL rejected the rows of a statement, which retrying the same rows
/// cannot fix: SQLSTATE classes 21 (cardinality violation, such as an upsert touching one row
/// twice), 22 (data exception), 23 (integrity constraint violation) and 54 (program limit
/// exceeded). Any other error is retried as it is.
pub(super) fn is_data_error(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(&code.code()[..2], "21" | "22" | "23" | "54"))
}
