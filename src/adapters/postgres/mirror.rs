//! The in-memory part of the store: the ids of cached guilds and the member count of each guild,
//! so that `apply`, `member_count`, `guild_ids_after` and `totals` need no query.
//!
//! Whether a guild is cached changes when `apply` queues a write, because
//! `Applied::new_guild` must follow the order of the stream (two GUILD_CREATEs of one guild in
//! one batch: only the first is new). The counts change when a flush commits, with the counts
//! the flush read back in its own transaction. They are exact as of the last committed flush,
//! and lag the queued writes by at most one flush. Reading `guild_member_counts` instead would
//! return the same committed values for a query per call, and would fail while PostgreSQL is
//! down.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::events::GuildEffect;

/// The mirror's entry for one guild.
#[derive(Clone, Copy, Debug, Default)]
struct GuildEntry {
    /// The guild object is cached (a GUILD_CREATE or GUILD_UPDATE was applied, and no
    /// GUILD_DELETE after it).
    cached: bool,
    /// Committed member rows, also counted for a guild that is not cached.
    members: u64,
}

#[derive(Debug, Default)]
struct Guilds {
    /// Entries by guild id, for lookups in O(1).
    entries: HashMap<u64, GuildEntry>,
    /// Ids of the cached guilds in order, for `guild_ids_after`.
    cached: BTreeSet<u64>,
    /// Sum of the member counts of all entries.
    member_total: u64,
}

impl Guilds {
    /// Drops an entry that neither is cached nor has members.
    fn forget_if_empty(&mut self, guild: u64) {
        if let Some(entry) = self.entries.get(&guild) {
            if !entry.cached && entry.members == 0 {
                self.entries.remove(&guild);
            }
        }
    }
}

/// Cached guild ids and member counts.
///
/// Memory grows with the guild count: about 60 bytes per guild (an estimate from the entry
/// sizes of the hash map and the ordered set).
#[derive(Debug, Default)]
pub(super) struct Mirror {
    guilds: RwLock<Guilds>,
}

impl Mirror {
    /// Builds the mirror from the stored guild ids and member counts.
    pub fn load(cached: BTreeSet<u64>, member_counts: HashMap<u64, u64>) -> Self {
        let mut guilds = Guilds {
            member_total: member_counts.values().sum(),
            ..Guilds::default()
        };
        for (guild, members) in member_counts {
            guilds.entries.insert(
                guild,
                GuildEntry {
                    cached: false,
                    members,
                },
            );
        }
        for guild in &cached {
            guilds.entries.entry(*guild).or_default().cached = true;
        }
        guilds.cached = cached;

        Self {
            guilds: RwLock::new(guilds),
        }
    }

    /// Records what a queued dispatch does to the cached guilds. Returns whether it cached a
    /// guild that was not cached.
    pub fn record(&self, effect: GuildEffect) -> bool {
        let (guild, cache) = match effect {
            GuildEffect::None => return false,
            GuildEffect::Create(guild) | GuildEffect::Update(guild) => (guild, true),
            GuildEffect::Delete(guild) => (guild, false),
        };

        let mut guilds = write(&self.guilds);
        let entry = guilds.entries.entry(guild).or_default();
        let was_cached = std::mem::replace(&mut entry.cached, cache);
        if cache {
            guilds.cached.insert(guild);
        } else {
            guilds.cached.remove(&guild);
            guilds.forget_if_empty(guild);
        }

        // GUILD_UPDATE caches a guild too, but only GUILD_CREATE reports it as new.
        matches!(effect, GuildEffect::Create(_)) && !was_cached
    }

    /// Returns the committed member count of a cached guild, `None` for a guild not cached.
    pub fn member_count(&self, guild: u64) -> Option<u64> {
        let guilds = read(&self.guilds);
        let entry = guilds.entries.get(&guild)?;
        entry.cached.then_some(entry.members)
    }

    pub fn guild_ids_after(&self, cursor: u64, limit: u32) -> Vec<u64> {
        let guilds = read(&self.guilds);
        let after = (Bound::Excluded(cursor), Bound::Unbounded);
        guilds
            .cached
            .range(after)
            .take(limit as usize)
            .copied()
            .collect()
    }

    pub fn guild_count(&self) -> u64 {
        read(&self.guilds).cached.len() as u64
    }

    /// Returns the member rows of all guilds, including guilds that are not cached.
    pub fn member_total(&self) -> u64 {
        read(&self.guilds).member_total
    }

    /// Sets the counts of the guilds a flush wrote members of. A guild of `flushed` missing
    /// from `counts` has no count row any more (its members were removed with the guild).
    pub fn set_member_counts(&self, flushed: &[i64], counts: &HashMap<i64, i64>) {
        let mut guilds = write(&self.guilds);
        for guild in flushed {
            let members = counts.get(guild).map_or(0, |count| (*count).max(0) as u64);
            let key = *guild as u64;

            let entry = guilds.entries.entry(key).or_default();
            let old = std::mem::replace(&mut entry.members, members);
            guilds.member_total = guilds.member_total - old + members;
            guilds.forget_if_empty(key);
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Every write above leaves the maps consistent at each step, so the data of a poisoned
    // lock is still sound.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_new_once() {
        let mirror = Mirror::default();

        assert!(mirror.record(GuildEffect::Create(1)));
        assert!(!mirror.record(GuildEffect::Create(1)));
        assert!(!mirror.record(GuildEffect::Update(2)));
        assert!(!mirror.record(GuildEffect::Create(2)));
        assert_eq!(mirror.guild_ids_after(0, 10), [1, 2]);

        assert!(!mirror.record(GuildEffect::Delete(1)));
        assert_eq!(mirror.member_count(1), None);
        assert!(mirror.record(GuildEffect::Create(1)));
    }

    #[test]
    fn counts_follow_flushes() {
        let mirror = Mirror::load(BTreeSet::from([1]), HashMap::from([(1, 5), (3, 2)]));
        assert_eq!(mirror.member_count(1), Some(5));
        assert_eq!(mirror.member_count(3), None, "guild 3 is not cached");
        assert_eq!(mirror.member_total(), 7);

        mirror.record(GuildEffect::Create(2));
        assert_eq!(mirror.member_count(2), Some(0));

        mirror.set_member_counts(&[1, 2, 3], &HashMap::from([(1, 4), (2, 9)]));
        assert_eq!(mirror.member_count(1), Some(4));
        assert_eq!(mirror.member_count(2), Some(9));
        assert_eq!(mirror.member_total(), 13);
        assert_eq!(mirror.guild_count(), 2);
    }
}
