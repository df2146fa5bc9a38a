//! The Redis event output end to end: the simulator's dispatches go through the shards and the
//! memory store to private `redis-server` processes, and the lists are compared with the events
//! the simulator sent.
//!
//! The simulator's world is seeded, and its traffic depends only on the seed and on how many
//! events it has produced for a shard. A fresh world built from the same `WorldConfig` therefore
//! rebuilds, byte for byte, the GUILD_CREATEs after READY and the traffic that a shard's session
//! received. The number of traffic events comes from the shard's saved sequence, because each
//! dispatch of a session takes the next sequence number. READY is 1, the GUILD_CREATEs of READY's
//! guilds follow, and the simulator's report counts the other dispatches that are not traffic
//! (RESUMED, member chunks and RATE_LIMITED).
//!
//! Each test starts its own `redis-server` processes on free loopback ports and never uses the
//! shared server on port 6379.

#[path = "support/redis.rs"]
mod redis_server;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actors::gateway::{shard_for_guild, Intents};
use actors::names;
use actors::shard::{ShardMsg, ShardStatus};
use actors::store::StateStore;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use redis::AsyncCommands;
use redis_server::RedisServer;
use shardvisor::config::{Config, Overrides};
use shardvisor::run::Service;
use shardvisor::sim::world::{self, WorldConfig};
use shardvisor::sim::{Fault, Report, Simulator, Target, ViolationKind};
use tokio::time::Instant;

/// Shards of every test, all in one identify round.
const SHARDS: u32 = 4;

/// Maximum wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(30);

/// Frames a shard reads ahead of the one it processes (`READ_AHEAD_FRAMES` in
/// `actors/src/shard/connection.rs`).
const READ_AHEAD_FRAMES: u64 = 256;

/// Prefix of every list key.
const KEY_PREFIX: &str = "gateway:events:";

/// The test's settings on top of a configuration scaled down from Discord's.
struct Settings<'a> {
    name: &'a str,
    /// Steady traffic events per second per shard.
    dispatch_rate: f64,
    /// Whether shards request the members of every guild after its GUILD_CREATE.
    request_members: bool,
    /// Extra lines of the `[events]` section, which already sets `sink = "redis"`.
    events: &'a str,
    /// Extra lines of the `[simulator]` section.
    simulator: &'a str,
    /// Environment variables, such as the replaced service's `MULTI_REDIS`.
    env: &'a [(&'a str, &'a str)],
}

/// Builds the configuration: one identify round of 300 ms, short holds, 24 guilds of at most 300
/// members and no sweep, so that a member request can only come from a GUILD_CREATE.
fn config(settings: &Settings) -> Config {
    let file = format!(
        r#"
        [process]
        shards = {SHARDS}
        [identify]
        pacing = "300ms"
        grace = "50ms"
        [stabilize]
        hold = "100ms"
        max_hold = "1s"
        [gateway]
        guild_timeout = "5s"
        reconnect_backoff_base = "50ms"
        reconnect_backoff_max = "500ms"
        [backfill]
        request_members = {request_members}
        [sweep]
        enabled = false
        [events]
        sink = "redis"
        {events}
        [simulator]
        max_concurrency = {SHARDS}
        guilds = {guilds}
        largest_guild = 300
        identify_window = "300ms"
        dispatch_rate = {dispatch_rate:?}
        {simulator}
        "#,
        request_members = settings.request_members,
        events = settings.events,
        simulator = settings.simulator,
        dispatch_rate = settings.dispatch_rate,
        guilds = SHARDS * 6,
    );
    let env: BTreeMap<String, String> = settings
        .env
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    let overrides = Overrides {
        name: Some(settings.name.to_owned()),
        ..Overrides::default()
    };
    Config::from_sources(Some(("test", &file)), &env, &overrides)
        .unwrap_or_else(|errors| panic!("test configuration invalid:\n{errors}"))
}

/// Starts the service and waits until every shard is steady.
async fn start(config: Config) -> Service {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("shardvisor=info,actors=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();

    let service = Service::start(config).await.expect("service starts");
    let summary = within("every shard steady", service.wait_until_stable()).await;
    assert_eq!(
        summary.ready, summary.shards,
        "not every shard is steady: {summary:?}"
    );
    service
}

/// Runs a future that should finish, failing the test after [`WAIT`].
async fn within<T>(operation: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{operation} did not finish within {WAIT:?}"))
}

/// Polls `check` every 20 ms until it holds, failing the test after [`WAIT`].
async fn eventually<F, Fut>(condition: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {condition}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn simulator(service: &Service) -> &Simulator {
    service.simulator.as_ref().expect("embedded simulator")
}

async fn status(service: &Service, shard: u32) -> ShardStatus {
    let name = names::shard(&service.config.process.name, shard);
    let actor: ActorRef<ShardMsg> = names::lookup(&name).expect("shard actor registered");
    match actor
        .call(ShardMsg::Status, Some(Duration::from_secs(5)))
        .await
    {
        Ok(CallResult::Success(status)) => status,
        _ => panic!("shard {shard} did not answer its status within 5 s"),
    }
}

/// Waits until the sink has taken `events` more events than now, so the traffic ran a while.
async fn wait_for_traffic(service: &Service, events: u64) {
    let target = service.sink.pushed() + events;
    eventually(&format!("the sink took {events} more events"), || async {
        service.sink.pushed() >= target
    })
    .await;
}

/// Returns the only session of a shard: these tests never identify a shard twice.
fn only_session(report: &Report, shard: u32) -> &shardvisor::sim::report::SessionRecord {
    let sessions: Vec<_> = report
        .sessions
        .values()
        .filter(|session| session.shard == shard)
        .collect();
    assert_eq!(
        sessions.len(),
        1,
        "shard {shard} has {} sessions; the rebuilt events assume one: {sessions:?}",
        sessions.len()
    );
    sessions[0]
}

/// Waits until every shard has processed what its current session had sent when the wait began.
async fn wait_until_caught_up(service: &Service) {
    for shard in 0..SHARDS {
        let session = status(service, shard)
            .await
            .session_id
            .unwrap_or_else(|| panic!("shard {shard} has no session"));
        let sent = simulator(service).report().sessions[&session].last_seq;
        eventually(
            &format!("shard {shard} processed the dispatches up to {sent}"),
            || async {
                let status = status(service, shard).await;
                status.session_id.as_ref() == Some(&session) && status.seq >= sent
            },
        )
        .await;
    }
}

/// Waits until every shard is steady on a session that the gateway can still resume.
async fn wait_until_live(service: &Service) {
    eventually("every shard steady on a live session", || async {
        let report = simulator(service).report();
        for shard in 0..SHARDS {
            let status = status(service, shard).await;
            let live = status
                .session_id
                .as_ref()
                .and_then(|id| report.sessions.get(id))
                .is_some_and(|session| session.resumable);
            if !live || !status.stage.is_steady() {
                return false;
            }
        }
        true
    })
    .await;
}

/// What the checks need after the service is gone.
struct Finished {
    world: WorldConfig,
    intents: Intents,
    large_threshold: u32,
    /// The simulator's report just before the shutdown.
    report: Report,
    /// Each shard's saved sequence after the shutdown.
    saved: BTreeMap<u32, u64>,
}

/// Shuts the service down gracefully (every shard saves its session once the sink has delivered
/// its events) and returns the saved sequences.
async fn shut_down(service: Service) -> Finished {
    let store: Arc<dyn StateStore> = service.store.clone();
    let name = service.config.process.name.clone();
    let world = simulator(&service).config().world.clone();
    let intents = service.config.gateway.intents;
    let large_threshold = service.config.gateway.large_threshold;
    let report = simulator(&service).report();
    within("the shutdown", service.shutdown()).await;

    let mut saved = BTreeMap::new();
    for shard in 0..SHARDS {
        let record = store
            .load_shard(shard, &name)
            .await
            .expect("the memory store reads")
            .unwrap_or_else(|| panic!("shard {shard} saved no session at shutdown"));
        saved.insert(shard, record.seq);
    }
    Finished {
        world,
        intents,
        large_threshold,
        report,
        saved,
    }
}

/// Events as JSON texts in dispatch order, by event name and shard.
type Events = BTreeMap<(String, u32), Vec<String>>;

/// The part of a shard's first session whose events are rebuilt.
#[derive(Clone, Copy, Debug)]
struct Reach {
    /// The events up to this sequence number count.
    seq: u64,
    /// RESUMED dispatches among them.
    resumes: u64,
}

impl Finished {
    /// Returns how far each shard's only session went: up to the sequence the shard saved.
    fn saved_reach(&self) -> BTreeMap<u32, Reach> {
        (0..SHARDS)
            .map(|shard| {
                let reach = Reach {
                    seq: self.saved[&shard],
                    resumes: only_session(&self.report, shard).resumes,
                };
                (shard, reach)
            })
            .collect()
    }

    /// Returns the number of traffic events up to `reach`. It is exact only when every member
    /// chunk and RATE_LIMITED that the report counts for the shard came before `reach.seq`, so
    /// the callers either request no members or stop the traffic before the shutdown.
    fn traffic_events(&self, shard: u32, guilds: u64, reach: Reach) -> u64 {
        let member_dispatches: u64 = self
            .report
            .member_requests
            .values()
            .filter(|record| record.shard == shard)
            .map(|record| record.chunks_sent + record.rate_limited)
            .sum();
        let other = 1 + guilds + reach.resumes + member_dispatches;
        assert!(
            reach.seq >= other,
            "shard {shard} reached sequence {}, but READY, {guilds} GUILD_CREATEs, {} RESUMED \
             and {member_dispatches} member dispatches alone take {other}",
            reach.seq,
            reach.resumes
        );
        reach.seq - other
    }

    /// Rebuilds what each shard's first session sent up to `reach`: the GUILD_CREATE of every
    /// guild of READY, in READY's order, then the traffic. READY and RESUMED are left out
    /// because their data names the session, which a fresh world cannot know.
    fn sent_events(&self, reach: &BTreeMap<u32, Reach>) -> Events {
        let mut worlds = world::generate(&self.world);
        let mut sent = Events::new();
        for shard in 0..SHARDS {
            let world = &mut worlds[shard as usize];
            let guild_ids = world.guild_ids();
            for guild_id in &guild_ids {
                let data = world
                    .guild_create(*guild_id, self.large_threshold, self.intents)
                    .expect("a guild of the shard's own list");
                sent.entry(("GUILD_CREATE".to_owned(), shard))
                    .or_default()
                    .push(data.get().to_owned());
            }
            let traffic = self.traffic_events(shard, guild_ids.len() as u64, reach[&shard]);
            for index in 0..traffic {
                let (event, data) = world
                    .next_event_with_large_threshold(self.intents, self.large_threshold)
                    .unwrap_or_else(|| panic!("shard {shard} has no traffic event {index}"));
                sent.entry((event.to_owned(), shard))
                    .or_default()
                    .push(data.get().to_owned());
            }
        }
        sent
    }
}

/// Returns every list the sink wrote on a server, by event name, in list order.
async fn read_lists(server: &RedisServer) -> BTreeMap<String, Vec<String>> {
    let mut connection = server.connection().await;
    let keys: Vec<String> = connection
        .keys(format!("{KEY_PREFIX}*"))
        .await
        .unwrap_or_else(|error| panic!("KEYS on {} failed: {error}", server.url()));
    let mut lists = BTreeMap::new();
    for key in keys {
        let items: Vec<String> = connection
            .lrange(&key, 0, -1)
            .await
            .unwrap_or_else(|error| panic!("LRANGE {key} failed: {error}"));
        lists.insert(key.trim_start_matches(KEY_PREFIX).to_owned(), items);
    }
    lists
}

/// Returns the shard an event belongs to: READY names it, the other events name their guild.
/// RESUMED names neither and returns `None`.
fn shard_of(event: &str, text: &str) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|error| panic!("a pushed {event} is not JSON ({error}): {text}"));
    let guild = match event {
        "READY" => return value["shard"][0].as_u64().map(|shard| shard as u32),
        "RESUMED" => return None,
        "GUILD_CREATE" | "GUILD_UPDATE" | "GUILD_DELETE" => &value["id"],
        "RATE_LIMITED" => &value["meta"]["guild_id"],
        _ => &value["guild_id"],
    };
    let guild: u64 = guild
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a pushed {event} names no guild: {text}"));
    Some(shard_for_guild(guild, SHARDS))
}

/// Splits the pushed lists by shard, keeping list order, which is push order. RESUMED is left
/// out.
fn split_by_shard(lists: &BTreeMap<String, Vec<String>>) -> Events {
    let mut events = Events::new();
    for (event, items) in lists {
        for item in items {
            if let Some(shard) = shard_of(event, item) {
                events
                    .entry((event.clone(), shard))
                    .or_default()
                    .push(item.clone());
            }
        }
    }
    events
}

/// Shortens a JSON text for a failure message.
fn head(text: &str) -> &str {
    let end = text
        .char_indices()
        .nth(300)
        .map_or(text.len(), |(index, _)| index);
    &text[..end]
}

/// Checks that a list contains exactly the sent events, each once, in dispatch order.
fn assert_pushed_once(label: &str, pushed: &[String], sent: &[String]) {
    let mismatch = pushed.iter().zip(sent).position(|(a, b)| a != b);
    if let Some(index) = mismatch {
        panic!(
            "{label}: item {index} of the list is not the event sent at that position\n  pushed: {}\n  sent:   {}",
            head(&pushed[index]),
            head(&sent[index])
        );
    }
    assert_eq!(
        pushed.len(),
        sent.len(),
        "{label}: {} events pushed, {} sent up to the saved sequence",
        pushed.len(),
        sent.len()
    );
}

/// Returns how many sent events a list lacks, counting copies: an event sent twice needs two
/// entries.
fn count_missing(pushed: &[String], sent: &[String]) -> usize {
    let mut available: HashMap<&String, usize> = HashMap::new();
    for item in pushed {
        *available.entry(item).or_default() += 1;
    }
    let mut missing = 0;
    for item in sent {
        match available.get_mut(item) {
            Some(count) if *count > 0 => *count -= 1,
            _ => missing += 1,
        }
    }
    missing
}

/// Checks that the sent events are in a list in dispatch order, with anything else between them.
fn assert_sent_in_order(label: &str, pushed: &[String], sent: &[String]) {
    let missing = count_missing(pushed, sent);
    assert!(
        missing == 0,
        "{label}: {missing} of {} sent events are not in the list of {}",
        sent.len(),
        pushed.len()
    );

    // Greedy matching finds `sent` as a subsequence of `pushed` whenever it is one.
    let mut matched = 0;
    for item in pushed {
        if matched < sent.len() && *item == sent[matched] {
            matched += 1;
        }
    }
    assert!(
        matched == sent.len(),
        "{label}: sent event {matched} of {} comes before an earlier one in the list: {}",
        sent.len(),
        sent.get(matched).map_or("", |text| head(text))
    );
}

/// Checks that the sent events are in a list in dispatch order, allowing extra copies of them,
/// and returns the number of extra copies.
fn assert_pushed_at_least_once(label: &str, pushed: &[String], sent: &[String]) -> usize {
    assert_sent_in_order(label, pushed, sent);
    let known: HashSet<&String> = sent.iter().collect();
    let unknown = pushed.iter().find(|item| !known.contains(item));
    assert!(
        unknown.is_none(),
        "{label}: the list contains an event that was never sent: {}",
        unknown.map_or("", |text| head(text))
    );
    pushed.len() - sent.len()
}

/// Returns the number of entries of each shard in a list split by shard.
fn count_by_shard(events: &Events, event: &str) -> BTreeMap<u32, usize> {
    events
        .iter()
        .filter(|((name, _), _)| name == event)
        .map(|((_, shard), items)| (*shard, items.len()))
        .collect()
}

/// Stops Redis after giving it a save point, then waits until the shards stall.
///
/// The harness runs Redis without persistence. The save point makes the stop write a snapshot
/// that the restart loads, so that only the sink can lose events, not the restart.
async fn stop_redis_until_stalled(server: &mut RedisServer, service: &Service) {
    let mut connection = server.connection().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("save")
        .arg("3600 1")
        .query_async(&mut connection)
        .await
        .expect("CONFIG SET save");
    drop(connection);
    server.stop().await;

    // The shards wait in `push` once the buffer is full. Only the sink's count standing still
    // shows that.
    let mut count = service.sink.pushed();
    let mut since = Instant::now();
    eventually("the sink stopped taking events", || {
        let now = service.sink.pushed();
        if now != count {
            count = now;
            since = Instant::now();
        }
        async move { since.elapsed() >= Duration::from_millis(500) }
    })
    .await;
}

/// Restarts Redis and checks that it loaded the snapshot of the stop.
async fn restart_redis(server: &mut RedisServer) {
    server.restart().await;
    let mut connection = server.connection().await;
    let keys: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .expect("DBSIZE");
    assert!(
        keys > 0,
        "the restarted Redis is empty: the snapshot of the stop was not loaded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dispatch_reaches_redis() {
    let server = RedisServer::start().await;
    let events = format!("redis_url = \"{}\"", server.url());
    let service = start(config(&Settings {
        name: "events-every-dispatch",
        dispatch_rate: 100.0,
        request_members: false,
        events: &events,
        simulator: "",
        env: &[],
    }))
    .await;

    wait_for_traffic(&service, 1_000).await;
    // The traffic still runs: the shutdown must deliver what the shards took before it.
    let finished = shut_down(service).await;
    assert!(
        finished.report.member_requests.is_empty(),
        "members were requested, so member chunks took sequence numbers the count leaves out"
    );
    let sent = finished.sent_events(&finished.saved_reach());
    let lists = read_lists(&server).await;
    let pushed = split_by_shard(&lists);

    assert!(
        !lists.contains_key("GUILD_MEMBERS_CHUNK"),
        "GUILD_MEMBERS_CHUNK was pushed"
    );
    let extra: BTreeSet<&String> = lists
        .keys()
        .filter(|event| *event != "READY")
        .filter(|event| !sent.keys().any(|(name, _)| name == *event))
        .collect();
    assert!(
        extra.is_empty(),
        "lists of events that were never sent: {extra:?}"
    );
    let ready = count_by_shard(&pushed, "READY");
    for shard in 0..SHARDS {
        assert_eq!(
            ready.get(&shard).copied(),
            Some(1),
            "shard {shard} READY pushed a wrong number of times: {ready:?}"
        );
    }
    assert!(
        !lists.contains_key("RESUMED"),
        "RESUMED pushed, but no shard resumed"
    );

    let message_creates: usize = count_by_shard(&sent, "MESSAGE_CREATE").values().sum();
    assert!(
        message_creates >= 400,
        "only {message_creates} MESSAGE_CREATEs were sent, too little traffic to judge the output"
    );
    let no_events = Vec::new();
    for ((event, shard), sent_events) in &sent {
        let label = format!("shard {shard} {event}");
        let pushed_events = pushed.get(&(event.clone(), *shard)).unwrap_or(&no_events);
        assert_pushed_once(&label, pushed_events, sent_events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitelists_route_per_target() {
    let own_list = RedisServer::start().await;
    let global_list = RedisServer::start().await;
    // The replaced service's variables: the first target has its own list, the second takes
    // the global whitelist. GUILD_MEMBERS_CHUNK is whitelisted and must still never be pushed.
    let multi_redis = format!(
        r#"{{"{}": ["MESSAGE_CREATE", "GUILD_MEMBER_ADD", "GUILD_MEMBER_REMOVE"], "{}": []}}"#,
        own_list.url(),
        global_list.url()
    );
    let own_names = ["MESSAGE_CREATE", "GUILD_MEMBER_ADD", "GUILD_MEMBER_REMOVE"];
    let global_names = ["PRESENCE_UPDATE", "GUILD_CREATE", "READY"];
    let service = start(config(&Settings {
        name: "events-whitelists",
        dispatch_rate: 100.0,
        request_members: true,
        events: "",
        simulator: "",
        env: &[
            ("MULTI_REDIS", &multi_redis),
            (
                "WHITELIST_EVENTS",
                "PRESENCE_UPDATE, GUILD_CREATE, GUILD_MEMBERS_CHUNK, READY",
            ),
        ],
    }))
    .await;

    wait_for_traffic(&service, 1_000).await;
    // Stop the traffic, member chunks included, so that every dispatch the report counts comes
    // before the sequence each shard saves.
    let sessions = simulator(&service).inject(Target::All, Fault::ExpireSessions);
    assert_eq!(
        sessions, SHARDS as usize,
        "the simulator expired a number of sessions other than one per shard"
    );
    wait_until_caught_up(&service).await;
    let finished = shut_down(service).await;

    let chunks: u64 = finished
        .report
        .member_requests
        .values()
        .map(|record| record.chunks_sent)
        .sum();
    assert!(
        chunks > 0,
        "the simulator sent no GUILD_MEMBERS_CHUNK, so its absence proves nothing"
    );
    for shard in 0..SHARDS {
        let last_seq = only_session(&finished.report, shard).last_seq;
        assert_eq!(
            finished.saved[&shard], last_seq,
            "shard {shard} saved a sequence other than its session's last"
        );
    }
    let sent = finished.sent_events(&finished.saved_reach());

    for (server, allowed) in [(&own_list, &own_names[..]), (&global_list, &global_names)] {
        let lists = read_lists(server).await;
        let target = server.url();
        let names: BTreeSet<&str> = lists.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = allowed
            .iter()
            .copied()
            .filter(|name| *name == "READY" || sent.keys().any(|(event, _)| event == name))
            .collect();
        assert_eq!(
            names, expected,
            "{target}: lists differ from the allowed events that were sent"
        );

        let pushed = split_by_shard(&lists);
        let no_events = Vec::new();
        for ((event, shard), sent_events) in &sent {
            if !allowed.contains(&event.as_str()) {
                continue;
            }
            let label = format!("{target} shard {shard} {event}");
            let pushed_events = pushed.get(&(event.clone(), *shard)).unwrap_or(&no_events);
            assert_pushed_once(&label, pushed_events, sent_events);
        }
        if allowed.contains(&"READY") {
            let ready = count_by_shard(&pushed, "READY");
            let expected: BTreeMap<u32, usize> = (0..SHARDS).map(|shard| (shard, 1)).collect();
            assert_eq!(ready, expected, "{target}: READY count per shard");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() {
    const BUFFER_EVENTS: u64 = 50;
    let mut server = RedisServer::start().await;
    let events = format!(
        "redis_url = \"{}\"\nbuffer_events = {BUFFER_EVENTS}",
        server.url()
    );
    let service = start(config(&Settings {
        name: "events-outage",
        dispatch_rate: 200.0,
        request_members: false,
        events: &events,
        simulator: "",
        env: &[],
    }))
    .await;
    wait_for_traffic(&service, 500).await;

    stop_redis_until_stalled(&mut server, &service).await;

    // Outlast the buffer and the shards' read-ahead: every session sends more than both can
    // hold, so the rest waits in the gateway. Then the gateway drops every connection, and
    // only a resume can bring those events back.
    let stalled: BTreeMap<u32, u64> = (0..SHARDS)
        .map(|shard| {
            let report = simulator(&service).report();
            (shard, only_session(&report, shard).last_seq)
        })
        .collect();
    eventually("every session sent past the buffer and read-ahead", || {
        let report = simulator(&service).report();
        let past = (0..SHARDS).all(|shard| {
            only_session(&report, shard).last_seq
                > stalled[&shard] + READ_AHEAD_FRAMES + BUFFER_EVENTS
        });
        async move { past }
    })
    .await;
    let dropped = simulator(&service).inject(Target::All, Fault::Drop);
    assert_eq!(
        dropped, SHARDS as usize,
        "the simulator dropped a number of connections other than one per shard"
    );

    restart_redis(&mut server).await;

    eventually("every shard resumed", || {
        let report = simulator(&service).report();
        let resumed = (0..SHARDS).all(|shard| only_session(&report, shard).resumes >= 1);
        async move { resumed }
    })
    .await;
    wait_until_caught_up(&service).await;
    for shard in 0..SHARDS {
        let status = status(&service, shard).await;
        assert_eq!(
            status.missed_events, 0,
            "shard {shard} saw a sequence gap after the outage"
        );
        assert!(
            status.stage.is_steady(),
            "shard {shard} is not steady after the outage: {}",
            status.stage
        );
    }
    let finished = shut_down(service).await;
    let sent = finished.sent_events(&finished.saved_reach());
    let lists = read_lists(&server).await;
    let pushed = split_by_shard(&lists);

    let resumes: u64 = (0..SHARDS)
        .map(|shard| only_session(&finished.report, shard).resumes)
        .sum();
    let resumed_pushed = lists.get("RESUMED").map_or(0, Vec::len) as u64;
    assert!(
        resumed_pushed >= resumes,
        "{resumed_pushed} RESUMED pushed for {resumes} resumes"
    );
    let mut copies = 0;
    let no_events = Vec::new();
    for ((event, shard), sent_events) in &sent {
        let label = format!("shard {shard} {event}");
        let pushed_events = pushed.get(&(event.clone(), *shard)).unwrap_or(&no_events);
        copies += assert_pushed_at_least_once(&label, pushed_events, sent_events);
    }
    // A shard resumes from the last sequence it processed, so the replay repeats nothing that
    // was pushed. Copies come only from the sink resending the batch whose replies were lost
    // when Redis stopped, and the buffer bounds that batch.
    assert!(
        copies as u64 <= BUFFER_EVENTS,
        "{copies} events pushed twice, more than the one batch of at most {BUFFER_EVENTS} in flight at the stop"
    );
    eprintln!("outage: {resumes} resumes, {copies} events pushed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_past_heartbeat_timeout_loses_nothing() {
    const BUFFER_EVENTS: u64 = 50;
    let mut server = RedisServer::start().await;
    let events = format!(
        "redis_url = \"{}\"\nbuffer_events = {BUFFER_EVENTS}",
        server.url()
    );
    // The simulator closes a connection with 4009 and ends its session after one heartbeat
    // interval plus 10 s without a heartbeat, as `shardvisor run` configures it. At 1,000 events
    // per second the events of those 11 s no longer fit in the socket buffers, so some are still
    // queued in the simulator when the session ends. Shards keep beating while they wait for
    // Redis, so the sessions should outlive the outage.
    let service = start(config(&Settings {
        name: "events-long-outage",
        dispatch_rate: 1000.0,
        request_members: false,
        events: &events,
        simulator: "heartbeat_interval = \"1s\"",
        env: &[],
    }))
    .await;
    wait_for_traffic(&service, 500).await;
    let first_sessions: BTreeMap<String, u32> = simulator(&service)
        .report()
        .sessions
        .iter()
        .map(|(id, session)| (id.clone(), session.shard))
        .collect();

    stop_redis_until_stalled(&mut server, &service).await;
    // The outage lasts until the gateway has ended every session, or, if the shards keep their
    // sessions, until 2 s past the heartbeat timeout.
    let outage_end = Instant::now() + simulator(&service).config().heartbeat_timeout;
    let outage_end = outage_end + Duration::from_secs(2);
    eventually("the outage outlasted the heartbeat timeout", || {
        let report = simulator(&service).report();
        let ended = first_sessions
            .keys()
            .all(|id| !report.sessions[id].resumable);
        async move { ended || Instant::now() >= outage_end }
    })
    .await;
    restart_redis(&mut server).await;
    wait_until_live(&service).await;
    wait_until_caught_up(&service).await;
    let finished = shut_down(service).await;

    // Every event that a session the gateway ended had sent must be in Redis, because no later
    // session sends it again. A session that lives on counts up to the saved sequence.
    let reach: BTreeMap<u32, Reach> = first_sessions
        .iter()
        .map(|(id, shard)| {
            let session = &finished.report.sessions[id];
            let seq = if session.resumable {
                finished.saved[shard]
            } else {
                session.last_seq
            };
            let reach = Reach {
                seq,
                resumes: session.resumes,
            };
            (*shard, reach)
        })
        .collect();
    let sent = finished.sent_events(&reach);
    let pushed = split_by_shard(&read_lists(&server).await);
    let no_events = Vec::new();
    let mut missing: BTreeMap<u32, usize> = BTreeMap::new();
    for ((event, shard), sent_events) in &sent {
        let pushed_events = pushed.get(&(event.clone(), *shard)).unwrap_or(&no_events);
        *missing.entry(*shard).or_default() += count_missing(pushed_events, sent_events);
    }
    let lost: usize = missing.values().sum();
    let total: usize = sent.values().map(Vec::len).sum();
    let timeouts = finished
        .report
        .violation_count(ViolationKind::HeartbeatTimeout);
    assert!(
        lost == 0,
        "{lost} of the {total} events that the sessions open at the outage sent are not in Redis \
         (by shard: {missing:?}); the gateway ended {timeouts} sessions for missing heartbeats, \
         so their events could not be resumed"
    );
    assert_eq!(
        timeouts, 0,
        "the gateway ended sessions for missing heartbeats while the shards waited for Redis"
    );
}
