//! The in-memory part of the store: the ids of cached guilds and the member count of each guild,
//! so that `apply`, `member_count`, `guild_ids_after` and `totals` need no query.
//!
//! The guild ids change when `apply` queues a write, because `Applied::new_guild` must follow
//! the order of the stream (two GUILD_CREATEs of one guild in one batch: only the first is new).
//! The counts change when a flush commits, with the counts the flush read back in its own
//! transaction. They are exact as of the last committed flush, and lag the queued writes by at
//! most one flush. Reading `guild_member_counts` instead would return the same committed values
//! for a query per call, and would fail while PostgreSQL is down.

use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use super::events::GuildEffect;

/// Cached guild ids and member counts.
///
/// Memory grows with the guild count: about 50 bytes per guild for both maps together (an
/// estimate from the entry sizes of `BTreeSet<u64>` and `HashMap<u64, u64>`).
#[derive(Debug, Default)]
pub(super) struct Mirror {
    guilds: RwLock<BTreeSet<u64>>,
    member_counts: RwLock<HashMap<u64, u64>>,
    /// Sum of `member_counts`, including guilds whose guild object is not cached.
    member_total: AtomicU64,
}

impl Mirror {
    /// Builds the mirror from the stored guild ids and member counts.
    pub fn load(guilds: BTreeSet<u64>, member_counts: HashMap<u64, u64>) -> Self {
        let total = member_counts.values().sum();
        Self {
            guilds: RwLock::new(guilds),
            member_counts: RwLock::new(member_counts),
            member_total: AtomicU64::new(total),
        }
    }

    /// Records what a queued dispatch does to the cached guilds. Returns whether it cached a
    /// guild that was not cached.
    pub fn record(&self, effect: GuildEffect) -> bool {
        match effect {
            GuildEffect::None => false,
            GuildEffect::Create(guild) => write(&self.guilds).insert(guild),
            GuildEffect::Update(guild) => {
                write(&self.guilds).insert(guild);
                false
            }
            GuildEffect::Delete(guild) => {
                write(&self.guilds).remove(&guild);
                false
            }
        }
    }

    /// Returns the committed member count of a cached guild, `None` for a guild not cached.
    pub fn member_count(&self, guild: u64) -> Option<u64> {
        if !read(&self.guilds).contains(&guild) {
            return None;
        }
        Some(read(&self.member_counts).get(&guild).copied().unwrap_or(0))
    }

    pub fn guild_ids_after(&self, cursor: u64, limit: u32) -> Vec<u64> {
        let guilds = read(&self.guilds);
        let after = (Bound::Excluded(cursor), Bound::Unbounded);
        guilds.range(after).take(limit as usize).copied().collect()
    }

    pub fn guild_count(&self) -> u64 {
        read(&self.guilds).len() as u64
    }

    pub fn member_total(&self) -> u64 {
        self.member_total.load(Ordering::Relaxed)
    }

    /// Sets the counts of the guilds a flush wrote members of. A guild of `guilds` missing
    /// from `counts` has no count row any more (its members were removed with the guild).
    pub fn set_member_counts(&self, guilds: &[i64], counts: &HashMap<i64, i64>) {
        let mut member_counts = write(&self.member_counts);
        let (mut added, mut removed) = (0u64, 0u64);
        for guild in guilds {
            let key = *guild as u64;
            let new = counts.get(guild).map(|count| (*count).max(0) as u64);
            let old = match new {
                Some(count) => member_counts.insert(key, count),
                None => member_counts.remove(&key),
            };
            let (old, new) = (old.unwrap_or(0), new.unwrap_or(0));
            added += new.saturating_sub(old);
            removed += old.saturating_sub(new);
        }
        // Changed under the lock, so that two flushes never interleave their totals.
        self.member_total.fetch_add(added, Ordering::Relaxed);
        self.member_total.fetch_sub(removed, Ordering::Relaxed);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every write above leaves the maps consistent at each step, so the data of a poisoned
    // lock is still sound.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
