//! The plan of a flush: a [`Batch`] turned into statement calls, in the order they run.

use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use super::batch::{Batch, RowWrite, TableWrites};
use super::jsonb::Jsonb;
use super::schema::Table;
use super::statements::Statements;

/// Maximum rows per statement.
///
/// The `unnest` upsert costs the server more CPU per row as its arrays grow: about 7 µs per
/// ~600-byte member at 1,000 rows, 10 at 2,000 and 11 at 10,000. Statements of 1,000 rows,
/// several in one pipelined transaction of 5,000 to 10,000 rows, wrote about 142,000 rows/s,
/// the most of every candidate. Binary COPY into a temporary table and a merge came next with
/// about 135,000. Measured with `cargo bench --bench store -- --candidates` (PostgreSQL 15,
/// 2 cores, fresh rows).
pub(super) const MAX_STATEMENT_ROWS: usize = 1_000;

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

    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
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

    /// Returns the columns of rows `start..end`.
    pub(super) fn range(&self, start: usize, end: usize) -> Columns<'a> {
        fn part<T: Clone>(column: &[T], start: usize, end: usize) -> Vec<T> {
            column[start..end].to_vec()
        }
        match self {
            Columns::Guilds(guilds) => Columns::Guilds(part(guilds, start, end)),
            Columns::Keys(guilds, keys) => {
                Columns::Keys(part(guilds, start, end), part(keys, start, end))
            }
            Columns::GuildRows(guilds, data) => {
                Columns::GuildRows(part(guilds, start, end), part(data, start, end))
            }
            Columns::Rows(guilds, keys, data) => Columns::Rows(
                part(guilds, start, end),
                part(keys, start, end),
                part(data, start, end),
            ),
            Columns::Threads(guilds, ids, parents, data) => Columns::Threads(
                part(guilds, start, end),
                part(ids, start, end),
                part(parents, start, end),
                part(data, start, end),
            ),
            Columns::Shards {
                shards,
                names,
                seqs,
                sessions,
                statuses,
                resume_urls,
            } => Columns::Shards {
                shards: part(shards, start, end),
                names: part(names, start, end),
                seqs: part(seqs, start, end),
                sessions: part(sessions, start, end),
                statuses: part(statuses, start, end),
                resume_urls: part(resume_urls, start, end),
            },
        }
    }

    /// Returns the guild id (the shard id for shard records) and the key of row `index`, for
    /// logs.
    pub(super) fn describe(&self, index: usize) -> (i64, Option<i64>) {
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
    pub(super) statement: &'a Statement,
    /// The table written, for logs.
    pub(super) table: &'static str,
    pub(super) columns: Columns<'a>,
}

/// The statement calls of one flush, in the order they run.
pub(super) struct Plan<'a> {
    pub(super) calls: Vec<Call<'a>>,
    /// Guilds whose member count is read back after the writes.
    pub(super) member_guilds: Vec<i64>,
}

/// Row writes of one table, split by kind and sorted by key. Sorted statements lock rows in key
/// order, which makes deadlocks between two processes writing the same rows unlikely. A
/// deadlock that still happens (SQLSTATE 40P01) fails the flush, which is then retried.
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

    /// Adds a call, split into calls of at most [`MAX_STATEMENT_ROWS`] rows. Any split is
    /// correct, because the rows of one batch have distinct keys.
    fn push(&mut self, statement: &'a Statement, table: &'static str, columns: Columns<'a>) {
        let rows = columns.len();
        if rows <= MAX_STATEMENT_ROWS {
            if rows > 0 {
                self.calls.push(Call {
                    statement,
                    table,
                    columns,
                });
            }
            return;
        }

        for start in (0..rows).step_by(MAX_STATEMENT_ROWS) {
            let end = (start + MAX_STATEMENT_ROWS).min(rows);
            self.calls.push(Call {
                statement,
                table,
                columns: columns.range(start, end),
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

    pub fn member_guilds(&self) -> &[i64] {
        &self.member_guilds
    }
}
