//! The Redis event sink against private `redis-server` processes: list keys and order, the
//! whitelists of several targets, batching at volume, outages with a full buffer, the drop
//! policy, `flush`, `close`, duplicates after timeouts, and the `MULTI_REDIS` and
//! `WHITELIST_EVENTS` parsers.
//!
//! Each test starts its own servers on free loopback ports and never uses the shared server.

#[path = "support/redis.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actors::store::{EventSink, PortError};
use redis::AsyncCommands;
use redis_server::RedisServer;
use serde_json::value::RawValue;
use shardvisor::adapters::redis::{
    parse_multi_redis, parse_whitelist, Overflow, RedisSink, RedisSinkOptions, TargetOptions,
    TargetStats,
};
use tokio::time::Instant;

/// Maximum wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(10);

/// How long something that should not happen is watched for.
const PENDING: Duration = Duration::from_millis(400);

/// Options for one sink on the given servers: small buffers and short waits.
fn options(servers: &[&RedisServer]) -> RedisSinkOptions {
    RedisSinkOptions {
        targets: servers
            .iter()
            .map(|server| TargetOptions::new(server.url()))
            .collect(),
        buffer_events: 1_000,
        batch_events: 100,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        flush_timeout: Duration::from_secs(5),
        close_timeout: Duration::from_secs(5),
        retry_min: Duration::from_millis(10),
        retry_max: Duration::from_millis(100),
        stats_interval: None,
        ..RedisSinkOptions::default()
    }
}

/// Sends the sink's log to the test output, shown for a failed test. `RUST_LOG` sets the filter.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("shardvisor=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

async fn connect(options: RedisSinkOptions) -> RedisSink {
    init_logging();
    RedisSink::connect(options)
        .await
        .unwrap_or_else(|error| panic!("failed to connect the sink: {error}"))
}

/// Returns the JSON text of an event: its id and some padding.
fn payload(id: u64, padding: usize) -> Box<RawValue> {
    let text = format!(r#"{{"id":{id},"pad":"{}"}}"#, "x".repeat(padding));
    RawValue::from_string(text).expect("the payload is valid JSON")
}

async fn push(sink: &RedisSink, event: &str, id: u64) {
    let data = payload(id, 8);
    sink.push(event, &data)
        .await
        .unwrap_or_else(|error| panic!("push of {event} {id} failed: {error}"));
}

/// Runs a future that should finish, failing the test after [`WAIT`].
async fn within<T>(operation: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{operation} did not finish within {WAIT:?}"))
}

/// Flushes until it succeeds, as a shard does, failing the test after [`WAIT`].
async fn flush_until_delivered(sink: &RedisSink) {
    let deadline = Instant::now() + WAIT;
    loop {
        match sink.flush().await {
            Ok(()) => return,
            Err(error) if Instant::now() < deadline => {
                eprintln!("flush failed, retrying: {error}");
            }
            Err(error) => panic!("flush did not succeed within {WAIT:?}: {error}"),
        }
    }
}

/// Polls the statistics of one target until `condition` holds, failing after [`WAIT`].
async fn wait_for_stats(
    sink: &RedisSink,
    target: usize,
    expected: &str,
    condition: impl Fn(&TargetStats) -> bool,
) -> TargetStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = sink.stats().swap_remove(target);
        if condition(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "target {target} did not reach {expected} within {WAIT:?}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Returns the list of an event on a server, as JSON texts.
async fn list(server: &RedisServer, event: &str) -> Vec<String> {
    let mut connection = server.connection().await;
    connection
        .lrange(format!("gateway:events:{event}"), 0, -1)
        .await
        .unwrap_or_else(|error| panic!("LRANGE of {event} failed: {error}"))
}

/// Returns the ids of a list, in list order.
async fn list_ids(server: &RedisServer, event: &str) -> Vec<u64> {
    list(server, event)
        .await
        .iter()
        .map(|text| {
            let value: serde_json::Value = serde_json::from_str(text)
                .unwrap_or_else(|error| panic!("{text} in {event} is not JSON: {error}"));
            value["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{text} in {event} has no id"))
        })
        .collect()
}

/// Returns the event names that have a list on a server.
async fn event_names(server: &RedisServer) -> BTreeSet<String> {
    let mut connection = server.connection().await;
    let keys: Vec<String> = connection
        .keys("gateway:events:*")
        .await
        .unwrap_or_else(|error| panic!("KEYS failed: {error}"));
    keys.iter()
        .map(|key| key.trim_start_matches("gateway:events:").to_owned())
        .collect()
}

/// Returns one numeric field of `INFO <section>`, such as `total_writes_processed`, or the
/// `calls` of a `cmdstat_` line.
async fn info_number(server: &RedisServer, section: &str, field: &str) -> u64 {
    let mut connection = server.connection().await;
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("INFO {section} failed: {error}"));
    for line in info.lines() {
        let Some(value) = line
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
        else {
            continue;
        };
        let number = value
            .split(',')
            .next()
            .and_then(|first| first.rsplit('=').next())
            .and_then(|number| number.trim().parse().ok());
        if let Some(number) = number {
            return number;
        }
    }
    0
}

/// Checks that every id of `expected` is in `ids` at least once, that the first copies keep
/// push order, and returns the number of extra copies.
fn check_at_least_once(ids: &[u64], expected: std::ops::Range<u64>) -> BTreeMap<u64, u64> {
    let mut copies: BTreeMap<u64, u64> = BTreeMap::new();
    let mut first_seen: Vec<u64> = Vec::new();
    for &id in ids {
        let count = copies.entry(id).or_default();
        if *count == 0 {
            first_seen.push(id);
        }
        *count += 1;
    }

    let missing: Vec<u64> = expected
        .clone()
        .filter(|id| !copies.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "events lost: {missing:?}");
    let unexpected: Vec<u64> = copies
        .keys()
        .copied()
        .filter(|id| !expected.contains(id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "events that were not pushed in this phase: {unexpected:?}"
    );
    assert_eq!(
        first_seen,
        expected.collect::<Vec<u64>>(),
        "first copies out of push order"
    );

    copies.retain(|_, count| *count > 1);
    copies
}

fn is_unavailable(error: &PortError) -> bool {
    matches!(
        error,
        PortError::Unavailable {
            backend: "redis",
            ..
        }
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_lists_in_push_order() {
    let server = RedisServer::start().await;
    let sink = connect(options(&[&server])).await;
    let names = [
        "MESSAGE_CREATE",
        "MESSAGE_CREATE",
        "TYPING_START",
        "GUILD_CREATE",
    ];

    let mut expected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for id in 0..400u64 {
        let name = names[id as usize % names.len()];
        let data = payload(id, 16);
        expected
            .entry(name)
            .or_default()
            .push(data.get().to_owned());
        sink.push(name, &data).await.expect("push failed");
    }
    within("flush", sink.flush()).await.expect("flush failed");

    for (name, texts) in &expected {
        assert_eq!(&list(&server, name).await, texts, "list of {name}");
    }
    let expected_names: BTreeSet<String> = expected.keys().map(|name| name.to_string()).collect();
    assert_eq!(event_names(&server).await, expected_names);

    let stats = sink.stats().swap_remove(0);
    assert_eq!(stats.pushed, 400);
    assert_eq!(stats.buffered, 0);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.resent, 0);
    assert!(stats.up);
    assert_eq!(stats.address, server.url());
    within("close", sink.close()).await.expect("close failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_whitelist_skips_other_events() {
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.whitelist = parse_whitelist("MESSAGE_CREATE, GUILD_CREATE").expect("valid whitelist");
    let sink = connect(options).await;

    for id in 0..50 {
        for name in [
            "MESSAGE_CREATE",
            "TYPING_START",
            "GUILD_CREATE",
            "PRESENCE_UPDATE",
        ] {
            push(&sink, name, id).await;
        }
    }
    within("flush", sink.flush()).await.expect("flush failed");

    let names = event_names(&server).await;
    assert_eq!(
        names,
        BTreeSet::from(["GUILD_CREATE".to_owned(), "MESSAGE_CREATE".to_owned()])
    );
    assert_eq!(
        list_ids(&server, "MESSAGE_CREATE").await,
        (0..50).collect::<Vec<u64>>()
    );
    assert_eq!(
        list_ids(&server, "GUILD_CREATE").await,
        (0..50).collect::<Vec<u64>>()
    );
    assert_eq!(sink.stats()[0].pushed, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_use_own_or_global_whitelist() {
    let own = RedisServer::start().await;
    let global = RedisServer::start().await;
    let everything = RedisServer::start().await;
    let names = [
        "MESSAGE_CREATE",
        "GUILD_CREATE",
        "TYPING_START",
        "PRESENCE_UPDATE",
    ];

    // The first two targets come from a MULTI_REDIS value under a global whitelist: the one
    // with its own list ignores the global one, the one with [] follows it.
    let json = format!(
        r#"{{"{}": ["MESSAGE_CREATE"], "{}": []}}"#,
        own.url(),
        global.url()
    );
    let mut with_whitelist = options(&[]);
    with_whitelist.targets = parse_multi_redis(&json).expect("valid MULTI_REDIS");
    with_whitelist.whitelist = parse_whitelist("GUILD_CREATE,TYPING_START").expect("valid");
    let sink = connect(with_whitelist).await;

    // Without a global whitelist, a target with [] takes every event.
    let json = format!(r#"{{"{}": []}}"#, everything.url());
    let mut without_whitelist = options(&[]);
    without_whitelist.targets = parse_multi_redis(&json).expect("valid MULTI_REDIS");
    let sink_for_all = connect(without_whitelist).await;

    for id in 0..20 {
        for name in names {
            push(&sink, name, id).await;
            push(&sink_for_all, name, id).await;
        }
    }
    within("flush", sink.flush()).await.expect("flush failed");
    within("flush", sink_for_all.flush())
        .await
        .expect("flush failed");

    let ids: Vec<u64> = (0..20).collect();
    assert_eq!(
        event_names(&own).await,
        BTreeSet::from(["MESSAGE_CREATE".to_owned()])
    );
    assert_eq!(list_ids(&own, "MESSAGE_CREATE").await, ids);
    assert_eq!(
        event_names(&global).await,
        BTreeSet::from(["GUILD_CREATE".to_owned(), "TYPING_START".to_owned()])
    );
    assert_eq!(list_ids(&global, "GUILD_CREATE").await, ids);
    assert_eq!(list_ids(&global, "TYPING_START").await, ids);
    let all: BTreeSet<String> = names.iter().map(|name| name.to_string()).collect();
    assert_eq!(event_names(&everything).await, all);
    for name in names {
        assert_eq!(list_ids(&everything, name).await, ids, "list of {name}");
    }

    let pushed: Vec<u64> = sink.stats().iter().map(|stats| stats.pushed).collect();
    assert_eq!(pushed, [20, 40]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_is_batched_and_pipelined() {
    const EVENTS: u64 = 50_000;
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.buffer_events = 10_000;
    options.batch_events = 1_000;
    let sink = connect(options).await;
    let names = ["MESSAGE_CREATE", "TYPING_START", "PRESENCE_UPDATE"];
    let writes_before = info_number(&server, "stats", "total_writes_processed").await;

    // Runs of 10 events under one name, so consecutive events can share an RPUSH.
    let started = Instant::now();
    let push_all = async {
        for id in 0..EVENTS {
            let name = names[(id / 10) as usize % names.len()];
            let data = payload(id, 200);
            sink.push(name, &data).await.expect("push failed");
        }
        sink.flush().await.expect("flush failed");
    };
    within("pushing 50,000 events", push_all).await;
    let elapsed = started.elapsed();
    eprintln!(
        "{EVENTS} events of about 220 bytes in {elapsed:?}: {:.0} events/s",
        EVENTS as f64 / elapsed.as_secs_f64()
    );

    let mut expected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for id in 0..EVENTS {
        let name = names[(id / 10) as usize % names.len()];
        expected.entry(name).or_default().push(id);
    }
    for (name, ids) in &expected {
        assert_eq!(&list_ids(&server, name).await, ids, "list of {name}");
    }
    assert_eq!(sink.stats()[0].pushed, EVENTS);

    // One RPUSH per event or one round trip per event would reach EVENTS here.
    let rpush_calls = info_number(&server, "commandstats", "cmdstat_rpush").await;
    let writes = info_number(&server, "stats", "total_writes_processed").await - writes_before;
    eprintln!("RPUSH commands: {rpush_calls}, reply writes: {writes}");
    assert!(
        rpush_calls <= EVENTS / 5,
        "{rpush_calls} RPUSH commands for {EVENTS} events in runs of 10"
    );
    assert!(
        writes <= EVENTS / 10,
        "{writes} reply writes (round trips) for {EVENTS} events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_blocks_push_loses_nothing() {
    const BUFFER: u64 = 200;
    const FIRST: u64 = 100;
    const LAST: u64 = 700;
    let mut server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.buffer_events = BUFFER as usize;
    options.batch_events = 50;
    options.flush_timeout = Duration::from_millis(300);
    let sink = Arc::new(connect(options).await);

    for id in 0..FIRST {
        push(&sink, "MESSAGE_CREATE", id).await;
    }
    within("flush", sink.flush()).await.expect("flush failed");
    assert_eq!(
        list_ids(&server, "MESSAGE_CREATE").await,
        (0..FIRST).collect::<Vec<u64>>()
    );

    // Redis keeps nothing on disk, so the restarted server contains only what is pushed from
    // here on.
    server.stop().await;
    let pushed = Arc::new(AtomicU64::new(0));
    let pusher = tokio::spawn({
        let sink = sink.clone();
        let pushed = pushed.clone();
        async move {
            for id in FIRST..LAST {
                push(&sink, "MESSAGE_CREATE", id).await;
                pushed.fetch_add(1, Ordering::SeqCst);
            }
        }
    });

    // The buffer can fill before the writer's first attempt fails, so both are awaited.
    wait_for_stats(&sink, 0, "a full buffer on a target down", |stats| {
        stats.buffered == BUFFER && !stats.up
    })
    .await;
    let mut pusher = pusher;
    let still_pending = tokio::time::timeout(PENDING, &mut pusher).await.is_err();
    assert!(still_pending, "push returned while the buffer was full");
    assert_eq!(
        pushed.load(Ordering::SeqCst),
        BUFFER,
        "pushes accepted with a full buffer"
    );

    let error = sink
        .flush()
        .await
        .expect_err("flush succeeded while Redis was down");
    assert!(is_unavailable(&error), "unexpected flush error: {error}");
    assert!(
        error.to_string().contains("not accepted"),
        "flush error: {error}"
    );

    server.restart().await;
    within("the blocked pushes", &mut pusher)
        .await
        .expect("the pusher task failed");
    flush_until_delivered(&sink).await;

    let ids = list_ids(&server, "MESSAGE_CREATE").await;
    let duplicates = check_at_least_once(&ids, FIRST..LAST);
    let extra_copies: u64 = duplicates.values().map(|count| count - 1).sum();
    let stats = sink.stats().swap_remove(0);
    eprintln!(
        "duplicates after the restart: {extra_copies}, resent: {}",
        stats.resent
    );
    assert!(
        extra_copies <= stats.resent,
        "{extra_copies} duplicates but only {} events were resent: {duplicates:?}",
        stats.resent
    );
    assert_eq!(stats.pushed, LAST - FIRST + FIRST);
    assert_eq!(stats.buffered, 0);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.reconnects, 1);
    assert!(stats.up);
    within("close", sink.close()).await.expect("close failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_policy_keeps_live_target_flowing() {
    const BUFFER: u64 = 50;
    const EVENTS: u64 = 500;
    let live = RedisServer::start().await;
    let mut dead = RedisServer::start().await;
    let mut options = options(&[&live, &dead]);
    options.buffer_events = BUFFER as usize;
    options.batch_events = 10;
    options.flush_timeout = Duration::from_secs(3);
    options.targets[1].overflow = Some(Overflow::Drop);
    let sink = connect(options).await;

    dead.kill().await;
    let push_all = async {
        for id in 0..EVENTS {
            push(&sink, "MESSAGE_CREATE", id).await;
        }
    };
    within("pushes with a dead target that drops", push_all).await;
    within("flush", sink.flush())
        .await
        .expect("flush waited for the dead target that drops");

    assert_eq!(
        list_ids(&live, "MESSAGE_CREATE").await,
        (0..EVENTS).collect::<Vec<u64>>()
    );
    let stats = sink.stats();
    assert_eq!(stats[0].pushed, EVENTS);
    assert_eq!(stats[0].dropped, 0);
    assert_eq!(stats[1].pushed, 0);
    assert_eq!(stats[1].buffered, BUFFER);
    assert_eq!(stats[1].dropped, EVENTS - BUFFER);
    assert!(!stats[1].up);

    // Once back, the target delivers its buffer: the first events, pushed before it filled.
    dead.restart().await;
    wait_for_stats(&sink, 1, "an empty buffer", |stats| stats.buffered == 0).await;
    push(&sink, "MESSAGE_CREATE", EVENTS).await;
    within("flush", sink.flush()).await.expect("flush failed");

    let mut expected: Vec<u64> = (0..BUFFER).collect();
    expected.push(EVENTS);
    assert_eq!(list_ids(&dead, "MESSAGE_CREATE").await, expected);
    let stats = sink.stats().swap_remove(1);
    assert_eq!(stats.pushed, BUFFER + 1);
    assert_eq!(stats.dropped, EVENTS - BUFFER);
    assert_eq!(stats.reconnects, 1);
    assert!(stats.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_until_redis_accepts() {
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.response_timeout = Duration::from_secs(30);
    options.flush_timeout = Duration::from_secs(30);
    let sink = connect(options).await;

    server.pause().await;
    for id in 0..10 {
        push(&sink, "MESSAGE_CREATE", id).await;
    }
    let mut flush = Box::pin(sink.flush());
    let still_pending = tokio::time::timeout(PENDING, &mut flush).await.is_err();
    assert!(still_pending, "flush returned while Redis was paused");
    assert_eq!(sink.stats()[0].pushed, 0);

    server.resume().await;
    within("flush", flush).await.expect("flush failed");
    assert_eq!(
        list_ids(&server, "MESSAGE_CREATE").await,
        (0..10).collect::<Vec<u64>>()
    );
    let stats = sink.stats().swap_remove(0);
    assert_eq!(stats.pushed, 10);
    assert_eq!(stats.resent, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_duplicate_only_the_resent_batch() {
    const BATCH: u64 = 20;
    const EVENTS: u64 = 100;
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.batch_events = BATCH as usize;
    options.connect_timeout = Duration::from_millis(300);
    options.response_timeout = Duration::from_millis(200);
    let sink = connect(options).await;

    // The first batch is sent to a paused server, times out and is resent. The commands
    // already written still run once the server resumes, so its events may land twice.
    server.pause().await;
    for id in 0..EVENTS {
        push(&sink, "MESSAGE_CREATE", id).await;
    }
    wait_for_stats(&sink, 0, "a resent batch", |stats| stats.resent > 0).await;
    server.resume().await;
    flush_until_delivered(&sink).await;

    let ids = list_ids(&server, "MESSAGE_CREATE").await;
    let duplicates = check_at_least_once(&ids, 0..EVENTS);
    let extra_copies: u64 = duplicates.values().map(|count| count - 1).sum();
    let stats = sink.stats().swap_remove(0);
    eprintln!("duplicates: {duplicates:?}, resent: {}", stats.resent);
    let outside: Vec<u64> = duplicates
        .keys()
        .copied()
        .filter(|id| *id >= BATCH)
        .collect();
    assert!(
        outside.is_empty(),
        "events after the first batch were duplicated: {outside:?}"
    );
    assert!(
        extra_copies <= stats.resent,
        "{extra_copies} duplicates but only {} events were resent",
        stats.resent
    );
    assert_eq!(stats.pushed, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_buffered_events() {
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.buffer_events = 5_000;
    let sink = connect(options).await;

    for id in 0..2_000 {
        push(&sink, "MESSAGE_CREATE", id).await;
    }
    within("close", sink.close()).await.expect("close failed");

    assert_eq!(
        list_ids(&server, "MESSAGE_CREATE").await,
        (0..2_000).collect::<Vec<u64>>()
    );
    let error = sink
        .push("MESSAGE_CREATE", &payload(2_000, 0))
        .await
        .expect_err("push after close succeeded");
    assert!(error.to_string().contains("closed"), "push error: {error}");
    let error = sink.flush().await.expect_err("flush after close succeeded");
    assert!(error.to_string().contains("closed"), "flush error: {error}");
    within("second close", sink.close())
        .await
        .expect("second close failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_undelivered_events() {
    const BUFFER: u64 = 30;
    let mut server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.buffer_events = BUFFER as usize;
    options.close_timeout = Duration::from_millis(300);
    let sink = Arc::new(connect(options).await);

    server.kill().await;
    let blocked = tokio::spawn({
        let sink = sink.clone();
        async move {
            for id in 0..=BUFFER {
                let data = payload(id, 0);
                sink.push("MESSAGE_CREATE", &data).await?;
            }
            Ok::<(), PortError>(())
        }
    });
    wait_for_stats(&sink, 0, "a full buffer", |stats| stats.buffered == BUFFER).await;

    let error = within("close", sink.close())
        .await
        .expect_err("close succeeded with Redis down");
    assert!(is_unavailable(&error), "unexpected close error: {error}");
    assert!(
        error
            .to_string()
            .contains(&format!("{BUFFER} events not delivered")),
        "close error: {error}"
    );
    let pushed = within("the blocked push", blocked)
        .await
        .expect("the pusher task panicked");
    let error = pushed.expect_err("the push waiting for room succeeded after close");
    assert!(error.to_string().contains("closed"), "push error: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_for_unreachable_target() {
    let server = RedisServer::start().await;
    let port = redis_server::free_port();
    let address = format!("redis://127.0.0.1:{port}");
    let mut options = options(&[&server]);
    options.targets.push(TargetOptions::new(address.clone()));

    let error = match RedisSink::connect(options).await {
        Ok(_) => panic!("connected to {address} where nothing listens"),
        Err(error) => error,
    };
    assert!(is_unavailable(&error), "unexpected error: {error}");
    let message = error.to_string();
    assert!(
        message.contains(&address),
        "error lacks the address: {message}"
    );
    assert!(
        !message.contains(&server.url()),
        "error names the reachable target: {message}"
    );
}

/// A change that makes the options invalid.
type Breakage = fn(&mut RedisSinkOptions);

#[tokio::test]
async fn connect_rejects_invalid_options() {
    let cases: [(&str, Breakage); 3] = [
        ("http://127.0.0.1:1", |options| {
            options.targets = vec![TargetOptions::new("http://127.0.0.1:1")]
        }),
        ("\"message_create\"", |options| {
            options.whitelist = vec!["message_create".to_owned()]
        }),
        ("buffer_events = 0", |options| options.buffer_events = 0),
    ];
    for (expected, change) in cases {
        let mut options = RedisSinkOptions::default();
        change(&mut options);
        let error = match RedisSink::connect(options).await {
            Ok(_) => panic!("invalid options accepted: {expected}"),
            Err(error) => error,
        };
        assert!(is_unavailable(&error), "unexpected error: {error}");
        assert!(
            error.to_string().contains(expected),
            "error lacks {expected}: {error}"
        );
    }
}

#[test]
fn parse_whitelist_reads_names() {
    assert_eq!(parse_whitelist(""), Ok(Vec::<String>::new()));
    assert_eq!(parse_whitelist(" , "), Ok(Vec::<String>::new()));
    assert_eq!(
        parse_whitelist(" MESSAGE_CREATE , ,GUILD_CREATE,MESSAGE_CREATE "),
        Ok(vec!["MESSAGE_CREATE".to_owned(), "GUILD_CREATE".to_owned()])
    );
}

#[test]
fn parse_whitelist_errors_name_value() {
    let cases = [
        (
            "MESSAGE_CREATE, message_update",
            ["\"message_update\"", "write \"MESSAGE_UPDATE\""],
        ),
        (
            "MESSAGE CREATE",
            ["\"MESSAGE CREATE\"", "such as MESSAGE_CREATE"],
        ),
        (
            "GUILD_CREATE;READY",
            ["\"GUILD_CREATE;READY\"", "upper case"],
        ),
    ];
    for (csv, expected) in cases {
        let error = parse_whitelist(csv).expect_err(csv);
        for part in expected {
            assert!(
                error.contains(part),
                "error for {csv:?} lacks {part:?}: {error}"
            );
        }
    }
}

#[test]
fn parse_multi_redis_reads_targets_in_order() {
    let json = r#"{"redis://127.0.0.1:6381": [], "redis://127.0.0.1:6380": ["MESSAGE_CREATE", "GUILD_CREATE"]}"#;
    let targets = parse_multi_redis(json).expect("valid MULTI_REDIS");

    assert_eq!(
        targets,
        [
            TargetOptions::new("redis://127.0.0.1:6381"),
            TargetOptions {
                whitelist: Some(vec!["MESSAGE_CREATE".to_owned(), "GUILD_CREATE".to_owned()]),
                ..TargetOptions::new("redis://127.0.0.1:6380")
            },
        ]
    );
    assert_eq!(parse_multi_redis("  "), Ok(Vec::new()));
}

#[test]
fn parse_multi_redis_errors_name_value() {
    let cases: [(&str, &[&str]); 8] = [
        (
            r#"{"redis://127.0.0.1:6380": [}"#,
            &["line 1 column", "{\"redis://127.0.0.1:6380\": [}"],
        ),
        (
            r#"["redis://127.0.0.1:6380"]"#,
            &["[\"redis://127.0.0.1:6380\"]", "JSON object"],
        ),
        (r#"{}"#, &["lists no Redis address", "unset"]),
        (
            r#"{"http://127.0.0.1:6380": []}"#,
            &["\"http://127.0.0.1:6380\"", "redis://host:port"],
        ),
        (
            r#"{"redis://127.0.0.1:6380": "MESSAGE_CREATE"}"#,
            &["redis://127.0.0.1:6380", "\"MESSAGE_CREATE\", not a list"],
        ),
        (
            r#"{"redis://127.0.0.1:6380": [7]}"#,
            &["redis://127.0.0.1:6380", "contains 7"],
        ),
        (
            r#"{"redis://127.0.0.1:6380": ["ready"]}"#,
            &["\"ready\"", "\"READY\""],
        ),
        (
            r#"{"redis://127.0.0.1:6380": [], "redis://127.0.0.1:6380": ["READY"]}"#,
            &["redis://127.0.0.1:6380 is listed twice"],
        ),
    ];
    for (json, expected) in cases {
        let error = parse_multi_redis(json).expect_err(json);
        for part in expected {
            assert!(
                error.contains(part),
                "error for {json} lacks {part:?}: {error}"
            );
        }
    }
}

#[test]
fn parse_multi_redis_errors_hide_passwords() {
    let cases = [
        r#"{"redis://:hunter2@127.0.0.1:6380": [5]}"#,
        r#"{"redis://user:hunter2@127.0.0.1:6380": [}"#,
        r#"{"redis://:hunter2@127.0.0.1:6380": "READY"}"#,
    ];
    for json in cases {
        let error = parse_multi_redis(json).expect_err(json);
        assert!(
            !error.contains("hunter2"),
            "error shows the password: {error}"
        );
    }
}

/// Prints the sink's throughput with 1 KB events, for one event name (runs share RPUSH
/// commands) and for names that change with every event (one RPUSH per event). Run it with
/// `cargo test --release --test redis_sink -- --ignored --nocapture measure_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement that prints numbers and checks nothing"]
async fn measure_throughput() {
    const EVENTS: u64 = 200_000;
    let server = RedisServer::start().await;
    let mut options = options(&[&server]);
    options.buffer_events = 50_000;
    options.batch_events = 1_000;
    let sink = connect(options).await;
    let data = payload(0, 1_000);

    for (case, names) in [
        ("one name", &["MESSAGE_CREATE"][..]),
        ("alternating names", &["MESSAGE_CREATE", "TYPING_START"][..]),
    ] {
        let started = Instant::now();
        for id in 0..EVENTS {
            let name = names[id as usize % names.len()];
            sink.push(name, &data).await.expect("push failed");
        }
        within("flush", sink.flush()).await.expect("flush failed");
        let elapsed = started.elapsed();
        eprintln!(
            "{case}: {EVENTS} events of {} bytes in {elapsed:?}: {:.0} events/s",
            data.get().len(),
            EVENTS as f64 / elapsed.as_secs_f64()
        );
        let mut connection = server.connection().await;
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut connection)
            .await
            .expect("FLUSHALL failed");
    }
}
