//! End-to-end events per second: the built-in simulator's traffic through 64 shards, the memory
//! store and the event output. One process runs the same workload twice, first with the in-memory
//! sink, then with Redis (a private `redis-server` on a free loopback port, which the benchmark
//! starts and stops).
//!
//! Run with `make bench-events` (`cargo bench --bench events`). The last two lines are
//! `result bench-events sink=memory events_per_s=<n> lost=<n>` and the same for `sink=redis`.
//!
//! - events_per_s: events the shards passed to the sink (`Service::sink.pushed()`) per second
//!   over a fixed window that starts after every shard is steady and a warm-up. With Redis these
//!   are events taken into the sink's buffer; Redis accepts them later, and `lost` checks that
//!   it did.
//! - lost: events a shard took (sequence up to the one it saved at the graceful shutdown) that
//!   are not in the sink afterwards. No member is requested, so every dispatch is pushed (READY,
//!   every GUILD_CREATE of a first run, the traffic) and a shard's saved sequence is the number
//!   of its events that must be in the sink: lost = sum of saved sequences - events in the sink,
//!   or 0 when the sink contains more (at-least-once copies).
//!
//! The simulator runs in the same process on the same two cores, so the rate is that of the
//! whole pipeline including the gateway side, not of the service alone. `RUST_LOG` sets a log
//! filter, and without it only errors are logged.

#[path = "../tests/support/redis.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::store::StateStore;
use redis::AsyncCommands;
use redis_server::RedisServer;
use shardvisor::adapters::memory::MemorySink;
use shardvisor::config::{Config, Overrides};
use shardvisor::run::Service;

/// Shards, all in one identify round. The simulator's traffic ticks at the timer's 1 ms
/// resolution, so a shard gets at most about 750 events/s at this rate (measured). On this
/// project's 2-core machine, 16 shards offered 12,000 events/s, which both sinks carried in full.
/// 64 shards ask for more than the two cores can generate and carry, so the result is the
/// pipeline's maximum.
const SHARDS: u32 = 64;

/// Traffic events per second per shard that the simulator is asked for.
const DISPATCH_RATE: f64 = 1000.0;

/// Time after every shard is steady before the window opens, so that the GUILD_CREATEs are done
/// and the Redis buffer has reached its steady level.
const WARM_UP: Duration = Duration::from_secs(3);

/// The measured window.
const WINDOW: Duration = Duration::from_secs(10);

/// Prefix of every list key the Redis sink writes.
const KEY_PREFIX: &str = "gateway:events:";

/// One run's measurement.
struct Measurement {
    events_per_s: f64,
    /// Traffic the simulator sent per second over the window.
    offered_per_s: f64,
    /// Events the output took per second over the window: Redis accepted them, or the
    /// in-memory sink stored them.
    delivered_per_s: f64,
    lost: u64,
    /// Sequence gaps the shards saw, summed: events the gateway skipped.
    missed: u64,
}

fn config(name: &str, events: &str) -> Config {
    let file = format!(
        r#"
        [process]
        shards = {SHARDS}
        [identify]
        pacing = "300ms"
        grace = "50ms"
        [stabilize]
        permits = {SHARDS}
        hold = "100ms"
        max_hold = "1s"
        [gateway]
        guild_timeout = "10s"
        [backfill]
        request_members = false
        [sweep]
        enabled = false
        [events]
        {events}
        [simulator]
        max_concurrency = {SHARDS}
        guilds = {guilds}
        largest_guild = 300
        identify_window = "300ms"
        dispatch_rate = {DISPATCH_RATE:?}
        "#,
        guilds = SHARDS * 6,
    );
    let overrides = Overrides {
        name: Some(name.to_owned()),
        ..Overrides::default()
    };
    Config::from_sources(Some(("bench", &file)), &BTreeMap::new(), &overrides)
        .unwrap_or_else(|errors| panic!("bench configuration invalid:\n{errors}"))
}

/// Returns the sequence gaps the shards saw, summed over every shard.
async fn missed_events(service: &Service) -> u64 {
    use actors::names;
    use actors::shard::ShardMsg;
    use ractor::rpc::CallResult;

    let mut missed = 0;
    for shard in 0..SHARDS {
        let name = names::shard(&service.config.process.name, shard);
        let actor = names::lookup::<ShardMsg>(&name)
            .unwrap_or_else(|| panic!("shard {shard} is not registered"));
        match actor
            .call(ShardMsg::Status, Some(Duration::from_secs(10)))
            .await
        {
            Ok(CallResult::Success(status)) => missed += status.missed_events,
            _ => panic!("shard {shard} did not return its status within 10 s"),
        }
    }
    missed
}

/// The event output of a run.
enum Output<'a> {
    Memory,
    Redis(&'a RedisServer),
}

impl Output<'_> {
    /// Returns the events the output contains: everything pushed for the in-memory sink,
    /// everything Redis accepted for the Redis sink.
    async fn delivered(&self, memory: Option<&MemorySink>) -> u64 {
        match self {
            Self::Memory => memory.expect("the in-memory sink is configured").total(),
            Self::Redis(server) => redis_events(server).await,
        }
    }
}

/// Starts the service, measures the window and shuts it down.
async fn run(label: &str, config: Config, output: Output<'_>) -> Measurement {
    let service = Service::start(config).await.expect("service starts");
    let summary = service.wait_until_stable().await;
    assert!(
        summary.is_clean(),
        "{label}: shards not steady: {summary:?}"
    );
    tokio::time::sleep(WARM_UP).await;

    let simulator = service.simulator.as_ref().expect("embedded simulator");
    let memory = service.memory_sink.clone();
    let pushed_before = service.sink.pushed();
    let sent_before = simulator.report().dispatches_sent;
    let delivered_before = output.delivered(memory.as_deref()).await;
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let pushed = service.sink.pushed() - pushed_before;
    let sent = simulator.report().dispatches_sent - sent_before;
    let delivered = output.delivered(memory.as_deref()).await - delivered_before;
    let elapsed = started.elapsed().as_secs_f64();

    let missed = missed_events(&service).await;
    let sessions = simulator.report().sessions.len();
    if sessions != SHARDS as usize {
        eprintln!(
            "{label}: {sessions} sessions for {SHARDS} shards; `lost` counts only each shard's last"
        );
    }
    let store: Arc<dyn StateStore> = service.store.clone();
    let name = service.config.process.name.clone();
    service.shutdown().await;
    let in_sink = output.delivered(memory.as_deref()).await;

    let mut saved = 0;
    for shard in 0..SHARDS {
        let record = store
            .load_shard(shard, &name)
            .await
            .expect("the memory store reads")
            .unwrap_or_else(|| panic!("{label}: shard {shard} saved no session"));
        saved += record.seq;
    }
    eprintln!(
        "{label}: in {elapsed:.1} s the simulator sent {sent}, the shards pushed {pushed}, the output took {delivered}; \
         after the shutdown the saved sequences sum to {saved} and the output contains {in_sink}; sequence gaps {missed}"
    );
    Measurement {
        events_per_s: pushed as f64 / elapsed,
        offered_per_s: sent as f64 / elapsed,
        delivered_per_s: delivered as f64 / elapsed,
        lost: saved.saturating_sub(in_sink),
        missed,
    }
}

/// Returns the number of entries in every list of the sink on a server.
async fn redis_events(server: &RedisServer) -> u64 {
    let mut connection = server.connection().await;
    let keys: Vec<String> = connection
        .keys(format!("{KEY_PREFIX}*"))
        .await
        .unwrap_or_else(|error| panic!("KEYS on {} failed: {error}", server.url()));
    let mut total = 0;
    for key in keys {
        let length: u64 = connection
            .llen(&key)
            .await
            .unwrap_or_else(|error| panic!("LLEN {key} failed: {error}"));
        total += length;
    }
    total
}

fn result_line(sink: &str, measurement: &Measurement) -> String {
    format!(
        "result bench-events sink={sink} events_per_s={:.0} lost={}",
        measurement.events_per_s, measurement.lost
    )
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();

    let memory = run(
        "memory",
        config("bench-events-memory", "sink = \"memory\""),
        Output::Memory,
    )
    .await;

    let server = RedisServer::start().await;
    let events = format!("sink = \"redis\"\nredis_url = \"{}\"", server.url());
    let redis = run(
        "redis",
        config("bench-events-redis", &events),
        Output::Redis(&server),
    )
    .await;

    for (sink, measurement) in [("memory", &memory), ("redis", &redis)] {
        eprintln!(
            "{sink}: offered {:.0} events/s, pushed {:.0} events/s, delivered {:.0} events/s, sequence gaps {}",
            measurement.offered_per_s,
            measurement.events_per_s,
            measurement.delivered_per_s,
            measurement.missed
        );
    }
    println!("{}", result_line("memory", &memory));
    println!("{}", result_line("redis", &redis));
}
