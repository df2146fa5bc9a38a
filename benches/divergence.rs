//! How many guilds the GUILD_CREATE divergence check sends for their members after a session is
//! lost, for several ratios and several amounts of missed traffic.
//!
//! Run with `cargo bench --bench divergence`. The world is the one `make run` connects to
//! (64 shards, 4000 guilds, largest guild 20,000 members, seed 1), and its traffic is the
//! simulator's own mix, where a guild's share of member joins and leaves grows with its size.
//!
//! For each amount of missed traffic, each shard's world first records every guild's member count
//! (the cache after a full member fetch, which the maintained count equals after each flush).
//! Then the world moves on by that many dispatches per shard, which the bot never receives because
//! its session was lost. The shard that identifies again compares Discord's new count with the
//! cached one through [`actors::shard::needs_member_backfill`], the function a ShardActor uses.
//!
//! One line per case: `result bench-divergence missed=<dispatches per shard> ratio=<r>
//! guilds=<n> stale=<n> requested=<n> requested_stale=<n> fetched_members=<n>
//! worst_left=<ratio>`, where `stale` counts guilds whose member count changed, and
//! `worst_left` is the largest divergence among the guilds not requested.
//!
//! Environment: `BENCH_DIVERGENCE_MISSED`, comma-separated dispatches per shard (default
//! `100,1000,10000,100000`).

use std::collections::BTreeMap;
use std::time::Instant;

use actors::gateway::{Intents, Snowflake};
use actors::shard::needs_member_backfill;
use shardvisor::sim::world::{generate, WorldConfig};

const RATIOS: [f64; 7] = [0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1];

/// Outcome of one ratio after one amount of missed traffic.
#[derive(Default)]
struct Tally {
    guilds: u64,
    stale: u64,
    requested: u64,
    requested_stale: u64,
    fetched_members: u64,
    worst_left: f64,
}

fn main() {
    let missed = missed_amounts();
    let config = WorldConfig {
        seed: 1,
        guilds: 4000,
        shard_count: 64,
        largest_guild: 20_000,
    };
    for missed in missed {
        let started = Instant::now();
        let mut tallies: BTreeMap<u64, Tally> = BTreeMap::new();
        for mut world in generate(&config) {
            let cached: BTreeMap<Snowflake, u64> = world
                .guild_ids()
                .into_iter()
                .filter_map(|id| Some((id, world.member_count(id)?)))
                .collect();
            for _ in 0..missed {
                world.next_event(Intents::ALL);
            }
            for id in world.guild_ids() {
                let discord = world.member_count(id);
                let cached_count = cached.get(&id).copied();
                let stale = cached_count != discord;
                for ratio in RATIOS {
                    let tally = tallies.entry(ratio.to_bits()).or_default();
                    tally.guilds += 1;
                    tally.stale += u64::from(stale);
                    if needs_member_backfill(discord, cached_count, ratio) {
                        tally.requested += 1;
                        tally.requested_stale += u64::from(stale);
                        tally.fetched_members += discord.unwrap_or(0);
                    } else if let (Some(discord), Some(cached)) = (discord, cached_count) {
                        let divergence = discord.abs_diff(cached) as f64 / discord.max(1) as f64;
                        tally.worst_left = tally.worst_left.max(divergence);
                    }
                }
            }
        }
        eprintln!(
            "missed={missed}: worlds advanced and compared in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for ratio in RATIOS {
            let tally = &tallies[&ratio.to_bits()];
            println!(
                "result bench-divergence missed={missed} ratio={ratio} guilds={} stale={} \
                 requested={} requested_stale={} fetched_members={} worst_left={:.4}",
                tally.guilds,
                tally.stale,
                tally.requested,
                tally.requested_stale,
                tally.fetched_members,
                tally.worst_left,
            );
        }
    }
}

fn missed_amounts() -> Vec<u64> {
    let Ok(text) = std::env::var("BENCH_DIVERGENCE_MISSED") else {
        return vec![100, 1000, 10_000, 100_000];
    };
    text.split(',')
        .map(|part| {
            part.trim().parse().unwrap_or_else(|_| {
                panic!("invalid BENCH_DIVERGENCE_MISSED entry {part:?}: expected a whole number of dispatches, such as 1000")
            })
        })
        .collect()
}
