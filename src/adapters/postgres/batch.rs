//! One flush worth of writes, coalesced: each row keeps only its last write, so that one
//! statement never touches the same key twice (PostgreSQL rejects an upsert that does, with
//! "ON CONFLICT DO UPDATE command cannot affect row a second time").
//!
//! A flush runs the removals by range first (every row of a guild in a table, or the threads of
//! some channels), then the removals by key, then the upserts. Replaying a batch in that order
//! gives the same rows as applying its writes one by one, because a range removal drops or
//! turns into a removal every pending write it covers (see [`TableWrites::clear_parents`]).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use actors::store::ShardRecord;

use super::events::{Json, Op};
use super::payload::merge_objects;
use super::schema::Table;

/// The last write of one row within a batch.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum RowWrite {
    /// Store the row. `parent` is a thread's channel.
    Put {
        row: Json,
        parent: Option<i64>,
    },
    /// Set these top-level fields of the stored row, or store them as the row.
    Merge(Json),
    Remove,
}

/// The writes of one table within a batch.
#[derive(Default)]
pub(super) struct TableWrites {
    /// Guilds whose rows in this table are all removed before the row writes run.
    pub cleared: HashSet<i64>,
    /// (guild, parent channel) pairs whose threads are removed before the row writes run.
    /// Used by the threads table only.
    pub cleared_parents: HashSet<(i64, i64)>,
    /// Row writes by guild, then by row key.
    pub rows: HashMap<i64, HashMap<i64, RowWrite>>,
}

impl TableWrites {
    fn put(&mut self, guild: i64, key: i64, write: RowWrite) {
        self.rows.entry(guild).or_default().insert(key, write);
    }

    fn merge(&mut self, guild: i64, key: i64, fields: Json) {
        merge_into(self.rows.entry(guild).or_default().entry(key), fields);
    }

    /// Removes every row of a guild. Pending writes of the guild are dropped: the range
    /// removal runs before them and would remove what they write anyway.
    fn clear(&mut self, guild: i64) {
        self.cleared.insert(guild);
        self.rows.remove(&guild);
        self.cleared_parents
            .retain(|(cleared, _)| *cleared != guild);
    }

    /// Removes the guild's threads whose parent is one of `parents`. A pending thread write
    /// with one of these parents becomes a removal rather than being dropped: the stored row
    /// may have another parent, which the range removal would not match.
    fn clear_parents(&mut self, guild: i64, parents: &[i64]) {
        self.cleared_parents
            .extend(parents.iter().map(|parent| (guild, *parent)));
        let Some(rows) = self.rows.get_mut(&guild) else {
            return;
        };
        for write in rows.values_mut() {
            if let RowWrite::Put {
                parent: Some(parent),
                ..
            } = write
            {
                if parents.contains(parent) {
                    *write = RowWrite::Remove;
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cleared.is_empty() && self.cleared_parents.is_empty() && self.rows.is_empty()
    }
}

/// Combines a merge with the pending write of the same row.
fn merge_into(entry: Entry<'_, i64, RowWrite>, fields: Json) {
    match entry {
        Entry::Vacant(vacant) => {
            vacant.insert(RowWrite::Merge(fields));
        }
        Entry::Occupied(mut occupied) => {
            let merged = match occupied.get() {
                RowWrite::Put { row, parent } => RowWrite::Put {
                    row: merge_objects(row, &fields),
                    parent: *parent,
                },
                RowWrite::Merge(earlier) => RowWrite::Merge(merge_objects(earlier, &fields)),
                // The row is gone by then, so the merge stores the fields as the row.
                RowWrite::Remove => RowWrite::Put {
                    row: fields,
                    parent: None,
                },
            };
            occupied.insert(merged);
        }
    }
}

/// The coalesced writes of one flush.
#[derive(Default)]
pub(super) struct Batch {
    /// Guild object writes by guild id.
    pub guilds: HashMap<i64, RowWrite>,
    /// Writes of each table, indexed by [`Table::index`].
    pub tables: [TableWrites; 7],
    /// The newest record of each shard, by (shard id, process name).
    pub shards: HashMap<(u32, String), ShardRecord>,
    /// Writes added, counted before coalescing.
    pub writes: usize,
}

impl Batch {
    /// Adds a write after every write added before.
    pub fn add(&mut self, op: Op) {
        self.writes += 1;
        match op {
            Op::PutGuild { guild, object } => {
                let write = RowWrite::Put {
                    row: object,
                    parent: None,
                };
                self.guilds.insert(guild, write);
            }
            Op::MergeGuild { guild, fields } => merge_into(self.guilds.entry(guild), fields),
            Op::RemoveGuild { guild } => {
                self.guilds.insert(guild, RowWrite::Remove);
                for writes in &mut self.tables {
                    writes.clear(guild);
                }
            }
            Op::Put {
                table,
                guild,
                id,
                parent,
                row,
            } => self
                .table(table)
                .put(guild, id, RowWrite::Put { row, parent }),
            Op::MergeMember {
                guild,
                user,
                fields,
            } => self.table(Table::Members).merge(guild, user, fields),
            Op::Remove { table, guild, id } => self.table(table).put(guild, id, RowWrite::Remove),
            Op::Clear { table, guild } => self.table(table).clear(guild),
            Op::ClearThreads { guild, parents } => {
                self.table(Table::Threads).clear_parents(guild, &parents);
            }
        }
    }

    /// Adds a shard record, replacing an older record of the same shard in this batch.
    pub fn add_shard(&mut self, record: ShardRecord) {
        self.writes += 1;
        self.shards
            .insert((record.shard, record.name.clone()), record);
    }

    pub fn table(&mut self, table: Table) -> &mut TableWrites {
        &mut self.tables[table.index()]
    }

    pub fn writes_of(&self, table: Table) -> &TableWrites {
        &self.tables[table.index()]
    }

    /// Returns the guilds whose member count this batch may change, ascending.
    pub fn member_guilds(&self) -> Vec<i64> {
        let members = self.writes_of(Table::Members);
        let mut guilds: Vec<i64> = members
            .cleared
            .iter()
            .chain(members.rows.keys())
            .copied()
            .collect::<HashSet<i64>>()
            .into_iter()
            .collect();
        guilds.sort_unstable();
        guilds
    }

    pub fn is_empty(&self) -> bool {
        self.guilds.is_empty()
            && self.shards.is_empty()
            && self.tables.iter().all(TableWrites::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUILD: i64 = 10;

    fn put(table: Table, id: i64, row: &str) -> Op {
        Op::Put {
            table,
            guild: GUILD,
            id,
            parent: None,
            row: row.into(),
        }
    }

    fn thread(id: i64, parent: i64) -> Op {
        Op::Put {
            table: Table::Threads,
            guild: GUILD,
            id,
            parent: Some(parent),
            row: format!(r#"{{"id":"{id}"}}"#).into(),
        }
    }

    fn row(batch: &Batch, table: Table, id: i64) -> Option<&RowWrite> {
        batch.writes_of(table).rows.get(&GUILD)?.get(&id)
    }

    #[test]
    fn last_write_of_a_key_wins() {
        let mut batch = Batch::default();
        batch.add(put(Table::Members, 1, r#"{"nick":"a"}"#));
        batch.add(Op::Remove {
            table: Table::Members,
            guild: GUILD,
            id: 1,
        });
        batch.add(put(Table::Members, 1, r#"{"nick":"b"}"#));
        batch.add(put(Table::Members, 2, r#"{"nick":"c"}"#));

        assert_eq!(batch.writes, 4);
        assert_eq!(batch.writes_of(Table::Members).rows[&GUILD].len(), 2);
        assert_eq!(
            row(&batch, Table::Members, 1),
            Some(&RowWrite::Put {
                row: r#"{"nick":"b"}"#.into(),
                parent: None
            })
        );
    }

    #[test]
    fn merges_combine_with_pending_writes() {
        let mut batch = Batch::default();
        let merge = |fields: &str| Op::MergeMember {
            guild: GUILD,
            user: 1,
            fields: fields.into(),
        };

        batch.add(merge(r#"{"nick":"a","mute":false}"#));
        batch.add(merge(r#"{"nick":"b"}"#));
        assert_eq!(
            row(&batch, Table::Members, 1),
            Some(&RowWrite::Merge(r#"{"mute":false,"nick":"b"}"#.into()))
        );

        batch.add(put(Table::Members, 1, r#"{"deaf":true,"nick":"c"}"#));
        batch.add(merge(r#"{"nick":"d"}"#));
        assert_eq!(
            row(&batch, Table::Members, 1),
            Some(&RowWrite::Put {
                row: r#"{"deaf":true,"nick":"d"}"#.into(),
                parent: None
            })
        );

        batch.add(Op::Remove {
            table: Table::Members,
            guild: GUILD,
            id: 1,
        });
        batch.add(merge(r#"{"nick":"e"}"#));
        assert_eq!(
            row(&batch, Table::Members, 1),
            Some(&RowWrite::Put {
                row: r#"{"nick":"e"}"#.into(),
                parent: None
            })
        );
    }

    #[test]
    fn clear_drops_pending_writes_of_the_guild() {
        let mut batch = Batch::default();
        batch.add(put(Table::Roles, 1, "{}"));
        batch.add(Op::Clear {
            table: Table::Roles,
            guild: GUILD,
        });
        batch.add(put(Table::Roles, 2, "{}"));

        let roles = batch.writes_of(Table::Roles);
        assert!(roles.cleared.contains(&GUILD));
        assert_eq!(row(&batch, Table::Roles, 1), None);
        assert!(row(&batch, Table::Roles, 2).is_some());
    }

    #[test]
    fn clear_parents_turns_covered_threads_into_removals() {
        let mut batch = Batch::default();
        batch.add(thread(1, 100));
        batch.add(thread(2, 200));
        batch.add(Op::ClearThreads {
            guild: GUILD,
            parents: vec![100],
        });
        batch.add(thread(3, 100));

        assert_eq!(row(&batch, Table::Threads, 1), Some(&RowWrite::Remove));
        assert!(matches!(
            row(&batch, Table::Threads, 2),
            Some(RowWrite::Put { .. })
        ));
        assert!(matches!(
            row(&batch, Table::Threads, 3),
            Some(RowWrite::Put { .. })
        ));
        let threads = batch.writes_of(Table::Threads);
        assert!(threads.cleared_parents.contains(&(GUILD, 100)));
    }

    #[test]
    fn remove_guild_clears_every_table() {
        let mut batch = Batch::default();
        batch.add(put(Table::Members, 1, "{}"));
        batch.add(put(Table::Emojis, 2, "{}"));
        batch.add(Op::RemoveGuild { guild: GUILD });
        batch.add(put(Table::Members, 3, "{}"));

        assert_eq!(batch.guilds.get(&GUILD), Some(&RowWrite::Remove));
        for table in Table::ALL {
            assert!(
                batch.writes_of(table).cleared.contains(&GUILD),
                "{table:?} not cleared"
            );
        }
        assert_eq!(row(&batch, Table::Members, 1), None);
        assert_eq!(row(&batch, Table::Emojis, 2), None);
        assert!(row(&batch, Table::Members, 3).is_some());
        assert_eq!(batch.member_guilds(), [GUILD]);
    }
}
