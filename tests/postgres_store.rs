//! The PostgreSQL state store against real servers. The tests cover every cached event written
//! and read back, guild creation and removal, member counts against `COUNT(*)` after every
//! flush, and deduplication within a batch. They also cover bad payloads and bad rows, shard
//! records and their order with the writes before them, backpressure, and PostgreSQL restarts
//! and crashes mid-stream.
//!
//! Most tests use a fresh database on the shared server at 127.0.0.1:5432, dropped at the end.
//! The restart test runs a private cluster on a free loopback port; the shared server is never
//! stopped.

#[path = "support/postgres.rs"]
mod postgres_server;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actors::store::{Applied, CacheTotals, CursorStore, PortError, ShardRecord, StateStore};
use postgres_server::{PrivateCluster, TestDatabase};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use shardvisor::adapters::postgres::{PostgresOptions, PostgresStore, Table};
use tokio_postgres::Client;

const GUILD: u64 = 81_384_788_765_712_384;
const OTHER_GUILD: u64 = 81_384_788_765_712_385;
const TEXT_CHANNEL: u64 = 41_771_983_423_143_937;
const VOICE_CHANNEL: u64 = 41_771_983_423_143_938;

/// Maximum wait for anything that should happen.
const WAIT: Duration = Duration::from_secs(20);

/// How long something that should not happen is watched for.
const PENDING: Duration = Duration::from_millis(500);

// Fixtures, in Discord's payload shapes (the in-memory store's tests check the same shapes
// against twilight-model).

fn raw(value: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("fixtures serialize")
}

fn user(id: u64) -> Value {
    json!({"id": id.to_string(), "username": format!("user{id}"), "discriminator": "0",
           "global_name": null, "avatar": null})
}

fn member(user_id: u64) -> Value {
    json!({"user": user(user_id), "roles": [], "nick": null,
           "joined_at": "2021-06-01T12:00:00.000000+00:00",
           "deaf": false, "mute": false, "flags": 0, "pending": false})
}

fn member_in(guild: u64, user_id: u64) -> Value {
    let mut member = member(user_id);
    member["guild_id"] = json!(guild.to_string());
    member
}

fn role(id: u64, name: &str) -> Value {
    json!({"id": id.to_string(), "name": name, "color": 0, "hoist": false, "position": 1,
           "permissions": "0", "managed": false, "mentionable": false, "flags": 0})
}

fn channel(id: u64, name: &str) -> Value {
    json!({"id": id.to_string(), "type": 0, "name": name, "position": 0})
}

fn thread(id: u64, parent: u64) -> Value {
    json!({"id": id.to_string(), "type": 11, "parent_id": parent.to_string(),
           "name": format!("thread {id}"),
           "thread_metadata": {"archived": false, "auto_archive_duration": 1440,
                               "archive_timestamp": "2024-01-01T00:00:00.000000+00:00",
                               "locked": false}})
}

fn thread_in(guild: u64, id: u64, parent: u64) -> Value {
    let mut thread = thread(id, parent);
    thread["guild_id"] = json!(guild.to_string());
    thread
}

fn emoji(id: u64, name: &str) -> Value {
    json!({"id": id.to_string(), "name": name, "roles": [], "require_colons": true,
           "managed": false, "animated": false, "available": true})
}

fn presence(user_id: u64, status: &str) -> Value {
    json!({"user": {"id": user_id.to_string()}, "status": status, "activities": [],
           "client_status": {"desktop": status}})
}

fn presence_in(guild: u64, user_id: u64, status: &str) -> Value {
    let mut presence = presence(user_id, status);
    presence["guild_id"] = json!(guild.to_string());
    presence
}

fn voice_state(user_id: u64, channel: Option<u64>) -> Value {
    json!({"user_id": user_id.to_string(), "channel_id": channel.map(|id| id.to_string()),
           "session_id": format!("session{user_id}"), "deaf": false, "mute": false,
           "self_deaf": false, "self_mute": false, "self_video": false, "suppress": false,
           "request_to_speak_timestamp": null})
}

fn voice_state_in(guild: u64, user_id: u64, channel: Option<u64>) -> Value {
    let mut state = voice_state(user_id, channel);
    state["guild_id"] = json!(guild.to_string());
    state
}

/// Returns a GUILD_CREATE with two roles, two channels, a thread, an emoji, two members, an
/// online and an offline presence and a voice state.
fn guild_create(guild: u64) -> Value {
    json!({
        "id": guild.to_string(),
        "name": "Test guild",
        "owner_id": "1",
        "member_count": 2,
        "large": false,
        "unavailable": false,
        "roles": [role(guild, "@everyone"), role(500, "moderator")],
        "channels": [channel(TEXT_CHANNEL, "general"), channel(VOICE_CHANNEL, "voice")],
        "threads": [thread(700, TEXT_CHANNEL)],
        "emojis": [emoji(900, "wave")],
        "members": [member(1), member(2)],
        "presences": [presence(1, "online"), presence(2, "offline")],
        "voice_states": [voice_state(1, Some(VOICE_CHANNEL))],
    })
}

fn chunk(guild: u64, users: impl IntoIterator<Item = u64>) -> Value {
    let members: Vec<Value> = users.into_iter().map(member).collect();
    json!({"guild_id": guild.to_string(), "members": members,
           "chunk_index": 0, "chunk_count": 1, "not_found": []})
}

// Helpers.

/// Options for a test store: short batch age and short retry waits.
fn options(url: String) -> PostgresOptions {
    let mut options = PostgresOptions::new(url);
    options.max_age = Duration::from_millis(5);
    options.retry_backoff = Duration::from_millis(20);
    options.retry_backoff_max = Duration::from_millis(250);
    options.connect_timeout = Duration::from_secs(2);
    options
}

/// Sends the store's logs to the test output, filtered by `RUST_LOG` (default `warn`).
fn init_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .init();
    });
}

async fn connect(options: PostgresOptions) -> PostgresStore {
    init_logs();
    PostgresStore::connect(options)
        .await
        .unwrap_or_else(|error| panic!("store failed to connect: {error}"))
}

async fn within<T>(operation: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{operation} did not finish within {WAIT:?}"))
}

async fn apply(store: &PostgresStore, event: &str, data: Value) -> Result<Applied, PortError> {
    store.apply(0, event, &raw(&data)).await
}

async fn apply_ok(store: &PostgresStore, event: &str, data: Value) -> Applied {
    match within(event, apply(store, event, data)).await {
        Ok(applied) => applied,
        Err(error) => panic!("{event} rejected: {error}"),
    }
}

async fn flush(store: &PostgresStore) {
    within("flush", store.flush())
        .await
        .unwrap_or_else(|error| panic!("flush failed: {error}"));
}

async fn rows(store: &PostgresStore, guild: u64, table: Table) -> BTreeMap<u64, Value> {
    store
        .table(guild, table)
        .await
        .unwrap_or_else(|error| panic!("reading {table:?} failed: {error}"))
}

async fn ids(store: &PostgresStore, guild: u64, table: Table) -> Vec<u64> {
    rows(store, guild, table).await.into_keys().collect()
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("{sql} failed: {error}"))
        .get(0)
}

/// Member counts of every guild: (rows in `members`, row in `guild_member_counts`).
async fn member_counts(client: &Client) -> BTreeMap<i64, (i64, Option<i64>)> {
    let sql = "SELECT coalesce(m.guild_id, c.guild_id), coalesce(m.rows, 0), c.count
               FROM (SELECT guild_id, count(*) AS rows FROM members GROUP BY guild_id) AS m
               FULL JOIN guild_member_counts AS c ON c.guild_id = m.guild_id";
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|error| panic!("reading member counts failed: {error}"))
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// Checks that `guild_member_counts` equals `COUNT(*)` of `members` for every guild, and that
/// the store's total matches.
async fn assert_counts_exact(store: &PostgresStore, client: &Client, context: &str) {
    let mut total = 0;
    for (guild, (rows, stored)) in member_counts(client).await {
        assert_eq!(
            stored.unwrap_or(0),
            rows,
            "{context}: guild {guild}: guild_member_counts differs from COUNT(*)"
        );
        total += rows;
    }
    let totals = store.totals().await.expect("totals");
    assert_eq!(
        totals.members, total as u64,
        "{context}: store total differs from COUNT(*)"
    );
}

fn record(shard: u32, seq: u64) -> ShardRecord {
    ShardRecord {
        shard,
        name: "bot-a".to_owned(),
        seq,
        session_id: Some(format!("session-{seq}")),
        resume_url: Some("wss://resume.example".to_owned()),
        status: "steady".to_owned(),
    }
}

// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_create_fills_every_table() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;

    let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    flush(&store).await;

    assert!(applied.new_guild);
    let guild = store.guild(GUILD).await.unwrap().expect("guild stored");
    assert_eq!(guild["name"], "Test guild");
    assert_eq!(guild["member_count"], 2);
    for list in [
        "roles",
        "channels",
        "threads",
        "emojis",
        "members",
        "presences",
    ] {
        assert!(guild.get(list).is_none(), "guild object keeps {list}");
    }
    assert_eq!(ids(&store, GUILD, Table::Roles).await, [500, GUILD]);
    assert_eq!(
        ids(&store, GUILD, Table::Channels).await,
        [TEXT_CHANNEL, VOICE_CHANNEL]
    );
    assert_eq!(ids(&store, GUILD, Table::Threads).await, [700]);
    assert_eq!(ids(&store, GUILD, Table::Emojis).await, [900]);
    assert_eq!(ids(&store, GUILD, Table::Members).await, [1, 2]);
    assert_eq!(ids(&store, GUILD, Table::Presences).await, [1]);
    assert_eq!(ids(&store, GUILD, Table::VoiceStates).await, [1]);
    assert_eq!(store.members(GUILD).await.unwrap()[1]["user"]["id"], "2");
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
    assert_eq!(store.stored_member_count(GUILD).await.unwrap(), Some(2));
    assert_eq!(
        store.totals().await.unwrap(),
        CacheTotals {
            guilds: 1,
            members: 2
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_create_new_then_known() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;

    assert!(
        apply_ok(&store, "GUILD_CREATE", guild_create(GUILD))
            .await
            .new_guild
    );

    // A reconnect's GUILD_CREATE of a large guild: one role left, one member listed, queued in
    // the same batch as the first.
    let mut again = guild_create(GUILD);
    again["name"] = json!("Renamed");
    again["roles"] = json!([role(GUILD, "@everyone")]);
    again["members"] = json!([member(3)]);
    again["presences"] = json!([]);
    again["voice_states"] = json!([]);
    let applied = apply_ok(&store, "GUILD_CREATE", again).await;
    flush(&store).await;

    assert!(!applied.new_guild);
    assert_eq!(
        store.guild(GUILD).await.unwrap().unwrap()["name"],
        "Renamed"
    );
    assert_eq!(ids(&store, GUILD, Table::Roles).await, [GUILD]);
    assert_eq!(ids(&store, GUILD, Table::Members).await, [1, 2, 3]);
    assert_eq!(ids(&store, GUILD, Table::Presences).await, [1]);
    assert!(ids(&store, GUILD, Table::VoiceStates).await.is_empty());
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(3));

    // An unavailable GUILD_CREATE changes nothing and is never new.
    let unavailable = json!({"id": OTHER_GUILD.to_string(), "unavailable": true});
    assert!(
        !apply_ok(&store, "GUILD_CREATE", unavailable)
            .await
            .new_guild
    );
    assert_eq!(store.member_count(OTHER_GUILD).await.unwrap(), None);

    // A new store on the same database loads the cached guilds and their counts.
    store.close().await;
    let reopened = connect(options(db.url())).await;
    assert_eq!(reopened.member_count(GUILD).await.unwrap(), Some(3));
    assert_eq!(reopened.guild_ids_after(0, 10).await.unwrap(), [GUILD]);
    let applied = apply_ok(&reopened, "GUILD_CREATE", guild_create(GUILD)).await;
    assert!(
        !applied.new_guild,
        "a guild stored before the restart counted as new"
    );
    assert!(
        apply_ok(&reopened, "GUILD_CREATE", guild_create(OTHER_GUILD))
            .await
            .new_guild
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_update_merges_fields() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    flush(&store).await;

    let update = json!({"id": GUILD.to_string(), "name": "New name", "owner_id": "2",
                        "roles": [role(GUILD, "@everyone"), role(501, "admin")], "emojis": []});
    let applied = apply_ok(&store, "GUILD_UPDATE", update).await;
    let late = json!({"id": OTHER_GUILD.to_string(), "name": "Late"});
    apply_ok(&store, "GUILD_UPDATE", late).await;
    flush(&store).await;

    assert!(!applied.new_guild);
    let guild = store.guild(GUILD).await.unwrap().unwrap();
    assert_eq!(guild["name"], "New name");
    assert_eq!(guild["owner_id"], "2");
    assert_eq!(
        guild["member_count"], 2,
        "fields not in the update are kept"
    );
    assert!(guild.get("roles").is_none());
    assert_eq!(ids(&store, GUILD, Table::Roles).await, [501, GUILD]);
    assert!(ids(&store, GUILD, Table::Emojis).await.is_empty());
    assert_eq!(ids(&store, GUILD, Table::Channels).await.len(), 2);

    // A GUILD_UPDATE of a guild not cached caches it.
    assert_eq!(
        store.guild(OTHER_GUILD).await.unwrap().unwrap()["name"],
        "Late"
    );
    assert_eq!(
        store.guild_ids_after(0, 10).await.unwrap(),
        [GUILD, OTHER_GUILD]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_delete_cascades() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(OTHER_GUILD)).await;
    flush(&store).await;

    apply_ok(&store, "GUILD_DELETE", json!({"id": GUILD.to_string()})).await;
    // Members of the deleted guild queued right after the delete start a new count.
    assert_eq!(store.member_count(GUILD).await.unwrap(), None);
    flush(&store).await;

    assert_eq!(store.guild(GUILD).await.unwrap(), None);
    for table in Table::ALL {
        assert!(
            ids(&store, GUILD, table).await.is_empty(),
            "{table:?} rows of the deleted guild kept"
        );
        if table != Table::Threads {
            assert!(
                !ids(&store, OTHER_GUILD, table).await.is_empty(),
                "{table:?} rows of the other guild removed"
            );
        }
    }
    assert_eq!(store.stored_member_count(GUILD).await.unwrap(), None);
    assert_eq!(store.guild_ids_after(0, 10).await.unwrap(), [OTHER_GUILD]);
    assert_eq!(
        store.totals().await.unwrap(),
        CacheTotals {
            guilds: 1,
            members: 2
        }
    );
    assert_counts_exact(&store, &client, "after the delete").await;

    // The guild comes back: it is new again, with fresh rows.
    let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    flush(&store).await;
    assert!(applied.new_guild);
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_guild_delete_keeps_cache() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;

    let outage = json!({"id": GUILD.to_string(), "unavailable": true});
    apply_ok(&store, "GUILD_DELETE", outage).await;
    flush(&store).await;

    assert!(store.guild(GUILD).await.unwrap().is_some());
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
    assert_eq!(ids(&store, GUILD, Table::Roles).await.len(), 2);
    let applied = apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    assert!(
        !applied.new_guild,
        "the guild was never dropped, so it is not new"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_channel_thread_emoji_events() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    apply_ok(
        &store,
        "THREAD_CREATE",
        thread_in(GUILD, 710, VOICE_CHANNEL),
    )
    .await;
    flush(&store).await;
    let guild_id = GUILD.to_string();

    // Roles.
    apply_ok(
        &store,
        "GUILD_ROLE_CREATE",
        json!({"guild_id": guild_id, "role": role(502, "new")}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_ROLE_UPDATE",
        json!({"guild_id": guild_id, "role": role(502, "renamed")}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_ROLE_DELETE",
        json!({"guild_id": guild_id, "role_id": "500"}),
    )
    .await;

    // Channels: created, renamed, and the text channel deleted with its thread 700.
    let mut created = channel(42, "new");
    created["guild_id"] = json!(guild_id);
    apply_ok(&store, "CHANNEL_CREATE", created.clone()).await;
    created["name"] = json!("renamed");
    apply_ok(&store, "CHANNEL_UPDATE", created).await;
    let mut deleted = channel(TEXT_CHANNEL, "general");
    deleted["guild_id"] = json!(guild_id);
    apply_ok(&store, "CHANNEL_DELETE", deleted).await;
    let dm = json!({"id": "77", "type": 1, "recipients": [user(1)]});
    assert_eq!(
        apply_ok(&store, "CHANNEL_CREATE", dm).await,
        Applied::default()
    );

    // Threads.
    apply_ok(
        &store,
        "THREAD_CREATE",
        thread_in(GUILD, 701, VOICE_CHANNEL),
    )
    .await;
    let mut updated = thread_in(GUILD, 701, VOICE_CHANNEL);
    updated["name"] = json!("renamed");
    apply_ok(&store, "THREAD_UPDATE", updated).await;

    // Emojis are replaced as a whole.
    let emojis =
        json!({"guild_id": guild_id, "emojis": [emoji(901, "smile"), emoji(902, "frown")]});
    apply_ok(&store, "GUILD_EMOJIS_UPDATE", emojis).await;
    flush(&store).await;

    let roles = rows(&store, GUILD, Table::Roles).await;
    assert_eq!(roles.keys().copied().collect::<Vec<_>>(), [502, GUILD]);
    assert_eq!(roles[&502]["name"], "renamed");
    let channels = rows(&store, GUILD, Table::Channels).await;
    assert_eq!(
        channels.keys().copied().collect::<Vec<_>>(),
        [42, VOICE_CHANNEL]
    );
    assert_eq!(channels[&42]["name"], "renamed");
    let threads = rows(&store, GUILD, Table::Threads).await;
    assert_eq!(threads.keys().copied().collect::<Vec<_>>(), [701, 710]);
    assert_eq!(threads[&701]["name"], "renamed");
    assert_eq!(ids(&store, GUILD, Table::Emojis).await, [901, 902]);

    let deleted = json!({"id": "710", "guild_id": guild_id, "parent_id": VOICE_CHANNEL.to_string(), "type": 11});
    apply_ok(&store, "THREAD_DELETE", deleted).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Threads).await, [701]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_list_sync_replaces_listed_parents() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    apply_ok(
        &store,
        "THREAD_CREATE",
        thread_in(GUILD, 710, VOICE_CHANNEL),
    )
    .await;
    flush(&store).await;
    let guild_id = GUILD.to_string();

    // A sync of the text channel replaces its thread 700 and keeps 710 of the voice channel.
    let partial = json!({"guild_id": guild_id, "channel_ids": [TEXT_CHANNEL.to_string()],
                         "threads": [thread(720, TEXT_CHANNEL)], "members": []});
    apply_ok(&store, "THREAD_LIST_SYNC", partial).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Threads).await, [710, 720]);

    // In one batch: 740 moves to the text channel, then the text channel is synced without
    // it, so it is gone; 750 is created after the sync and stays.
    apply_ok(
        &store,
        "THREAD_CREATE",
        thread_in(GUILD, 740, VOICE_CHANNEL),
    )
    .await;
    flush(&store).await;
    apply_ok(&store, "THREAD_UPDATE", thread_in(GUILD, 740, TEXT_CHANNEL)).await;
    let resync = json!({"guild_id": guild_id, "channel_ids": [TEXT_CHANNEL.to_string()],
                        "threads": [], "members": []});
    apply_ok(&store, "THREAD_LIST_SYNC", resync).await;
    apply_ok(&store, "THREAD_CREATE", thread_in(GUILD, 750, TEXT_CHANNEL)).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Threads).await, [710, 750]);

    // A sync without channel_ids covers the whole guild.
    let full =
        json!({"guild_id": guild_id, "threads": [thread(730, VOICE_CHANNEL)], "members": []});
    apply_ok(&store, "THREAD_LIST_SYNC", full).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Threads).await, [730]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_presence_voice_events() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let store = connect(options(db.url())).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    flush(&store).await;
    let guild_id = GUILD.to_string();

    apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 3)).await;
    let update = json!({"guild_id": guild_id, "user": user(3), "roles": ["500"], "nick": "three",
                        "joined_at": "2021-06-01T12:00:00.000000+00:00"});
    apply_ok(&store, "GUILD_MEMBER_UPDATE", update).await;
    let unknown = json!({"guild_id": guild_id, "user": user(9), "roles": [], "joined_at": null});
    apply_ok(&store, "GUILD_MEMBER_UPDATE", unknown).await;
    flush(&store).await;

    let members = rows(&store, GUILD, Table::Members).await;
    assert_eq!(members[&3]["nick"], "three");
    assert_eq!(members[&3]["roles"], json!(["500"]));
    assert_eq!(
        members[&3]["deaf"], false,
        "fields not in the update are kept"
    );
    assert_eq!(
        members[&9]["user"]["id"], "9",
        "an update of an unknown member stores it"
    );
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(4));

    // A merge of a member already stored, in a batch of its own.
    let nick = json!({"guild_id": guild_id, "user": user(1), "nick": "one"});
    apply_ok(&store, "GUILD_MEMBER_UPDATE", nick).await;
    flush(&store).await;
    let members = rows(&store, GUILD, Table::Members).await;
    assert_eq!(members[&1]["nick"], "one");
    assert_eq!(members[&1]["joined_at"], "2021-06-01T12:00:00.000000+00:00");

    // Removal and ban drop the member and its presence.
    let remove = json!({"guild_id": guild_id, "user": user(1)});
    apply_ok(&store, "GUILD_MEMBER_REMOVE", remove).await;
    let ban = json!({"guild_id": guild_id, "user": user(2)});
    apply_ok(&store, "GUILD_BAN_ADD", ban).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Members).await, [3, 9]);
    assert!(
        ids(&store, GUILD, Table::Presences).await.is_empty(),
        "presence of a removed member kept"
    );
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));

    // A chunk stores members and presences; an offline presence removes one.
    let mut members_chunk = chunk(GUILD, [3, 4, 5]);
    members_chunk["presences"] = json!([presence(4, "idle"), presence(5, "online")]);
    apply_ok(&store, "GUILD_MEMBERS_CHUNK", members_chunk).await;
    apply_ok(&store, "PRESENCE_UPDATE", presence_in(GUILD, 5, "offline")).await;
    apply_ok(&store, "PRESENCE_UPDATE", presence_in(GUILD, 3, "dnd")).await;
    flush(&store).await;
    assert_eq!(ids(&store, GUILD, Table::Members).await, [3, 4, 5, 9]);
    let presences = rows(&store, GUILD, Table::Presences).await;
    assert_eq!(presences.keys().copied().collect::<Vec<_>>(), [3, 4]);
    assert_eq!(presences[&3]["status"], "dnd");
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(4));

    // Voice: join, move, leave; a DM call is not cached.
    apply_ok(
        &store,
        "VOICE_STATE_UPDATE",
        voice_state_in(GUILD, 2, Some(VOICE_CHANNEL)),
    )
    .await;
    apply_ok(
        &store,
        "VOICE_STATE_UPDATE",
        voice_state_in(GUILD, 2, Some(TEXT_CHANNEL)),
    )
    .await;
    apply_ok(&store, "VOICE_STATE_UPDATE", voice_state_in(GUILD, 1, None)).await;
    apply_ok(&store, "VOICE_STATE_UPDATE", voice_state(5, Some(77))).await;
    flush(&store).await;
    let states = rows(&store, GUILD, Table::VoiceStates).await;
    assert_eq!(states.keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(states[&2]["channel_id"], TEXT_CHANNEL.to_string());

    // Events the cache does not keep are accepted and write nothing.
    let message = json!({"id": "1", "channel_id": "2", "content": "hello"});
    assert_eq!(
        apply_ok(&store, "MESSAGE_CREATE", message).await,
        Applied::default()
    );
    assert_counts_exact(&store, &client, "after the member events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_ids_after_pages_in_order() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    for k in (1..=25u64).rev() {
        let create = json!({"id": (k * 1_000).to_string(), "name": "g"});
        apply_ok(&store, "GUILD_CREATE", create).await;
    }

    let mut seen = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store.guild_ids_after(cursor, 10).await.unwrap();
        assert!(page.len() <= 10);
        let Some(&last) = page.last() else { break };
        seen.extend(page);
        cursor = last;
    }

    let expected: Vec<u64> = (1..=25).map(|k| k * 1_000).collect();
    assert_eq!(seen, expected);
    assert_eq!(
        store.guild_ids_after(12_500, 2).await.unwrap(),
        [13_000, 14_000]
    );
    assert!(store.guild_ids_after(0, 0).await.unwrap().is_empty());
}

/// One step of the member-count test.
#[derive(Clone, Debug)]
enum MemberOp {
    Create { guild: u64, users: Vec<u64> },
    Add { guild: u64, user: u64 },
    Update { guild: u64, user: u64 },
    Remove { guild: u64, user: u64 },
    Ban { guild: u64, user: u64 },
    Chunk { guild: u64, users: Vec<u64> },
    Delete { guild: u64, unavailable: bool },
}

fn random_op(rng: &mut StdRng) -> MemberOp {
    // Few guilds and users, so that operations collide on the same rows.
    let guild = rng.random_range(1..4u64);
    let user = rng.random_range(1..12u64);
    let count = rng.random_range(0..6usize);
    let users: Vec<u64> = (0..count).map(|_| rng.random_range(1..12u64)).collect();
    match rng.random_range(0..10u32) {
        0 => MemberOp::Create { guild, users },
        1 | 2 => MemberOp::Add { guild, user },
        3 => MemberOp::Update { guild, user },
        4 | 5 => MemberOp::Remove { guild, user },
        6 => MemberOp::Ban { guild, user },
        7 | 8 => MemberOp::Chunk { guild, users },
        _ => MemberOp::Delete {
            guild,
            unavailable: rng.random_bool(0.3),
        },
    }
}

/// Applies one operation to the store and to a model of the member rows and cached guilds.
async fn apply_member_op(
    store: &PostgresStore,
    model: &mut HashMap<u64, HashSet<u64>>,
    cached: &mut HashSet<u64>,
    op: MemberOp,
) {
    match op {
        MemberOp::Create { guild, users } => {
            let mut create = json!({"id": guild.to_string(), "name": "g"});
            create["members"] = users.iter().map(|&user| member(user)).collect();
            apply_ok(store, "GUILD_CREATE", create).await;
            model.entry(guild).or_default().extend(users);
            cached.insert(guild);
        }
        MemberOp::Add { guild, user } => {
            apply_ok(store, "GUILD_MEMBER_ADD", member_in(guild, user)).await;
            model.entry(guild).or_default().insert(user);
        }
        MemberOp::Update {
            guild,
            user: user_id,
        } => {
            let update = json!({"guild_id": guild.to_string(), "user": user(user_id), "nick": "n"});
            apply_ok(store, "GUILD_MEMBER_UPDATE", update).await;
            model.entry(guild).or_default().insert(user_id);
        }
        MemberOp::Remove {
            guild,
            user: user_id,
        }
        | MemberOp::Ban {
            guild,
            user: user_id,
        } => {
            let event = if matches!(op, MemberOp::Ban { .. }) {
                "GUILD_BAN_ADD"
            } else {
                "GUILD_MEMBER_REMOVE"
            };
            let data = json!({"guild_id": guild.to_string(), "user": user(user_id)});
            apply_ok(store, event, data).await;
            if let Some(members) = model.get_mut(&guild) {
                members.remove(&user_id);
            }
        }
        MemberOp::Chunk { guild, users } => {
            apply_ok(
                store,
                "GUILD_MEMBERS_CHUNK",
                chunk(guild, users.iter().copied()),
            )
            .await;
            model.entry(guild).or_default().extend(users);
        }
        MemberOp::Delete { guild, unavailable } => {
            let delete = json!({"id": guild.to_string(), "unavailable": unavailable});
            apply_ok(store, "GUILD_DELETE", delete).await;
            if !unavailable {
                model.remove(&guild);
                cached.remove(&guild);
            }
        }
    }
}

async fn assert_matches_model(
    store: &PostgresStore,
    client: &Client,
    model: &HashMap<u64, HashSet<u64>>,
    cached: &HashSet<u64>,
    context: &str,
) {
    assert_counts_exact(store, client, context).await;
    for guild in 1..4u64 {
        let rows = model.get(&guild).map_or(0, |members| members.len() as u64);
        let expected = cached.contains(&guild).then_some(rows);
        assert_eq!(
            store.member_count(guild).await.unwrap(),
            expected,
            "{context}: member_count of guild {guild}"
        );
        let stored: HashSet<u64> = ids(store, guild, Table::Members)
            .await
            .into_iter()
            .collect();
        let modelled = model.get(&guild).cloned().unwrap_or_default();
        assert_eq!(stored, modelled, "{context}: members of guild {guild}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_count_matches_rows_after_every_flush() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    // Small batches, so that size-triggered flushes split the random runs below.
    opts.batch_rows = 7;
    let store = connect(opts).await;

    for seed in [1u64, 2, 3] {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut model: HashMap<u64, HashSet<u64>> = HashMap::new();
        let mut cached: HashSet<u64> = HashSet::new();
        for guild in 1..4u64 {
            let delete = json!({"id": guild.to_string()});
            apply_ok(&store, "GUILD_DELETE", delete).await;
        }

        // A flush after every operation: the counts are checked after each flush.
        for step in 0..120 {
            let op = random_op(&mut rng);
            let context = format!("seed {seed}, step {step}, {op:?}");
            apply_member_op(&store, &mut model, &mut cached, op).await;
            flush(&store).await;
            assert_matches_model(&store, &client, &model, &cached, &context).await;
        }

        // Runs of operations coalesced into shared batches, checked after each run.
        for run in 0..30 {
            let length = rng.random_range(1..25);
            let mut ops = Vec::new();
            for _ in 0..length {
                let op = random_op(&mut rng);
                ops.push(format!("{op:?}"));
                apply_member_op(&store, &mut model, &mut cached, op).await;
            }
            flush(&store).await;
            let context = format!("seed {seed}, run {run}: {}", ops.join(", "));
            assert_matches_model(&store, &client, &model, &cached, &context).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_one_batch() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    // One batch for everything below: it flushes only when asked.
    opts.max_age = Duration::from_secs(30);
    opts.batch_rows = 100_000;
    let store = connect(opts).await;

    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    for round in 0..5 {
        let mut data = chunk(GUILD, [1, 2, 3, 1, 2]);
        data["members"][3]["nick"] = json!(format!("last {round}"));
        apply_ok(&store, "GUILD_MEMBERS_CHUNK", data).await;
    }
    apply_ok(
        &store,
        "GUILD_MEMBER_REMOVE",
        json!({"guild_id": GUILD.to_string(), "user": user(2)}),
    )
    .await;
    apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 2)).await;
    apply_ok(
        &store,
        "GUILD_MEMBER_REMOVE",
        json!({"guild_id": GUILD.to_string(), "user": user(3)}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_ROLE_UPDATE",
        json!({"guild_id": GUILD.to_string(), "role": role(500, "a")}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_ROLE_UPDATE",
        json!({"guild_id": GUILD.to_string(), "role": role(500, "b")}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_UPDATE",
        json!({"id": GUILD.to_string(), "name": "first"}),
    )
    .await;
    apply_ok(
        &store,
        "GUILD_UPDATE",
        json!({"id": GUILD.to_string(), "icon": "x"}),
    )
    .await;

    assert_eq!(
        count(&client, "SELECT count(*) FROM members").await,
        0,
        "the batch was flushed before it was asked to be"
    );
    flush(&store).await;

    let members = rows(&store, GUILD, Table::Members).await;
    assert_eq!(members.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        members[&1]["nick"], "last 4",
        "the last write of a key wins"
    );
    assert_eq!(members[&2]["nick"], Value::Null);
    assert_eq!(rows(&store, GUILD, Table::Roles).await[&500]["name"], "b");
    let guild = store.guild(GUILD).await.unwrap().unwrap();
    assert_eq!(guild["name"], "first");
    assert_eq!(guild["icon"], "x");
    assert_eq!(guild["owner_id"], "1");
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(2));
    assert_counts_exact(&store, &client, "after the batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batch_split_into_statements() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    // One batch of 3,500 member writes, more than one statement takes.
    opts.max_age = Duration::from_secs(30);
    opts.batch_rows = 100_000;
    let store = connect(opts).await;

    apply_ok(&store, "GUILD_CREATE", json!({"id": "1", "name": "g"})).await;
    for first in [1u64, 1_001, 2_001] {
        apply_ok(
            &store,
            "GUILD_MEMBERS_CHUNK",
            chunk(1, first..first + 1_000),
        )
        .await;
    }
    for user_id in 1..=500u64 {
        let remove = json!({"guild_id": "1", "user": user(user_id)});
        apply_ok(&store, "GUILD_MEMBER_REMOVE", remove).await;
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM members").await,
        0,
        "the batch was flushed before it was asked to be"
    );
    flush(&store).await;

    let sql = "SELECT count(*), min(user_id), max(user_id) FROM members WHERE guild_id = 1";
    let row = client.query_one(sql, &[]).await.expect("member summary");
    let (rows, min, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((rows, min, max), (2_500, 501, 3_000));
    assert_eq!(store.member_count(1).await.unwrap(), Some(2_500));
    assert_counts_exact(&store, &client, "after the large batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_malformed_payloads() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    opts.max_age = Duration::from_secs(30);
    let store = connect(opts).await;
    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    let guild_id = GUILD.to_string();

    // Text that jsonb rejects as it is: the NUL escape is stripped, a lone surrogate replaced.
    let text = r#"{"guild_id":"GUILD","user":{"id":"5","username":"nul\u0000name"},"nick":"half \ud83d","roles":[]}"#
        .replace("GUILD", &guild_id);
    let data = RawValue::from_string(text).expect("valid JSON");
    store
        .apply(0, "GUILD_MEMBER_ADD", &data)
        .await
        .expect("NUL member accepted");

    let mut bad_member = member(6);
    bad_member["user"]["id"] = json!("not-an-id");
    let mut bad_chunk = chunk(GUILD, [8]);
    bad_chunk["members"]
        .as_array_mut()
        .expect("a members list")
        .push(bad_member);
    let mut bad_create = guild_create(OTHER_GUILD);
    bad_create["roles"][1] = json!({"name": "no id"});
    let too_big = RawValue::from_string(format!(
        r#"{{"guild_id":"{guild_id}","user":{{"id":"7"}},"roles":[],"x":1e999999}}"#
    ))
    .expect("valid JSON");
    let cases: Vec<(&str, Box<RawValue>, Option<u64>, &str)> = vec![
        (
            "GUILD_CREATE",
            raw(&json!({"name": "no id"})),
            None,
            "missing field `id`",
        ),
        (
            "GUILD_CREATE",
            raw(&bad_create),
            Some(OTHER_GUILD),
            "roles[1]: missing field `id`",
        ),
        (
            "GUILD_MEMBERS_CHUNK",
            raw(&bad_chunk),
            Some(GUILD),
            "members[1].user.id: ",
        ),
        (
            "GUILD_MEMBER_ADD",
            raw(&json!({"guild_id": guild_id, "roles": []})),
            Some(GUILD),
            "missing field `user`",
        ),
        (
            "GUILD_MEMBER_ADD",
            too_big,
            Some(GUILD),
            "number 1e999999 is out of the range",
        ),
        (
            "GUILD_ROLE_CREATE",
            raw(&json!({"guild_id": guild_id})),
            Some(GUILD),
            "missing field `role`",
        ),
        (
            "GUILD_EMOJIS_UPDATE",
            raw(&json!({"guild_id": guild_id, "emojis": {}})),
            Some(GUILD),
            "emojis: invalid type: map",
        ),
        (
            "GUILD_MEMBERS_CHUNK",
            raw(&json!("chunk")),
            None,
            "invalid type: string \"chunk\"",
        ),
        (
            "GUILD_DELETE",
            raw(&json!({"id": null})),
            None,
            "id: invalid type: null",
        ),
    ];
    for (event, data, expected_guild, expected_reason) in &cases {
        let error = store.apply(0, event, data).await.expect_err(event);
        let PortError::InvalidEvent {
            event: error_event,
            guild,
            reason,
        } = error
        else {
            panic!("{event}: expected InvalidEvent, got {error:?}");
        };
        assert_eq!(&error_event, event);
        assert_eq!(guild, *expected_guild, "{event}: {reason}");
        assert!(
            reason.starts_with(expected_reason),
            "{event}: {reason:?} does not start with {expected_reason:?}"
        );
    }

    // The writes queued around the rejected events are kept.
    apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 9)).await;
    flush(&store).await;
    let members = rows(&store, GUILD, Table::Members).await;
    assert_eq!(members.keys().copied().collect::<Vec<_>>(), [1, 2, 5, 9]);
    assert_eq!(members[&5]["user"]["username"], "nulname");
    assert_eq!(members[&5]["nick"], "half \u{fffd}");
    assert_eq!(store.guild(OTHER_GUILD).await.unwrap(), None);
    assert_counts_exact(&store, &client, "after the bad payloads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_row_leaves_rest_of_batch() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    opts.max_age = Duration::from_secs(30);
    let store = connect(opts).await;

    // A row that passes every check of the store but that PostgreSQL rejects. A constraint added
    // for this test plays the part of any value the server cannot store.
    client
        .batch_execute("ALTER TABLE members ADD CONSTRAINT test_no_reject CHECK (data->>'nick' IS DISTINCT FROM 'reject me')")
        .await
        .expect("constraint added");

    apply_ok(&store, "GUILD_CREATE", guild_create(GUILD)).await;
    let mut data = chunk(GUILD, [3, 4, 5]);
    data["members"][1]["nick"] = json!("reject me");
    apply_ok(&store, "GUILD_MEMBERS_CHUNK", data).await;
    apply_ok(
        &store,
        "GUILD_ROLE_CREATE",
        json!({"guild_id": GUILD.to_string(), "role": role(503, "kept")}),
    )
    .await;
    flush(&store).await;

    assert_eq!(ids(&store, GUILD, Table::Members).await, [1, 2, 3, 5]);
    assert!(ids(&store, GUILD, Table::Roles).await.contains(&503));
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(4));
    assert_counts_exact(&store, &client, "after the rejected row").await;

    // The store goes on with the next batch.
    apply_ok(&store, "GUILD_MEMBER_ADD", member_in(GUILD, 6)).await;
    flush(&store).await;
    assert_eq!(store.member_count(GUILD).await.unwrap(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_record_round_trip() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;

    assert_eq!(store.load_shard(3, "bot-a").await.unwrap(), None);
    let saved = record(3, 1_234);
    store.save_shard(&saved).await.unwrap();
    assert_eq!(
        store.load_shard(3, "bot-a").await.unwrap(),
        Some(saved.clone())
    );
    assert_eq!(store.load_shard(3, "bot-b").await.unwrap(), None);
    assert_eq!(store.load_shard(4, "bot-a").await.unwrap(), None);

    let fresh = ShardRecord {
        session_id: None,
        resume_url: None,
        status: "identifying".to_owned(),
        seq: 0,
        ..saved
    };
    store.save_shard(&fresh).await.unwrap();
    assert_eq!(store.load_shard(3, "bot-a").await.unwrap(), Some(fresh));

    let too_large = record(u32::MAX, 1);
    assert!(matches!(
        store.save_shard(&too_large).await,
        Err(PortError::InvalidEvent { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_record_commits_with_earlier_writes() {
    let db = TestDatabase::create().await;
    let observer = db.client().await;
    let mut opts = options(db.url());
    // Long batches, so the record and the members before it share flushes.
    opts.max_age = Duration::from_millis(200);
    let store = Arc::new(connect(opts).await);

    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let watch = {
        let (done, checks) = (done.clone(), checks.clone());
        tokio::spawn(async move {
            // One statement reads both in one snapshot.
            let sql = "SELECT (SELECT seq FROM shards WHERE id = 7 AND name = 'bot-a'),
                              (SELECT count(*) FROM members WHERE guild_id = 1)";
            while !done.load(Ordering::Relaxed) {
                let row = observer.query_one(sql, &[]).await.expect("observer query");
                let (seq, members): (Option<i64>, i64) = (row.get(0), row.get(1));
                if let Some(seq) = seq {
                    assert!(
                        members >= seq * 100,
                        "shard record seq {seq} visible with {members} members, before its writes"
                    );
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    for round in 1..=10u64 {
        let users = (round - 1) * 100 + 1..=round * 100;
        apply_ok(&store, "GUILD_MEMBERS_CHUNK", chunk(1, users)).await;
        within("save_shard", store.save_shard(&record(7, round)))
            .await
            .expect("save_shard");
        // A save returns after its commit, with every write before it.
        assert_eq!(
            store.load_shard(7, "bot-a").await.unwrap().map(|r| r.seq),
            Some(round)
        );
    }

    done.store(true, Ordering::Relaxed);
    watch
        .await
        .expect("observer found the record ahead of its writes");
    assert!(checks.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_makes_apply_wait() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    let mut opts = options(db.url());
    opts.queue_rows = 4;
    opts.batch_rows = 2;
    let store = Arc::new(connect(opts).await);
    apply_ok(&store, "GUILD_CREATE", json!({"id": "1", "name": "g"})).await;
    flush(&store).await;

    // Hold the members table so that no flush can commit.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE members IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock members");

    let applied = Arc::new(AtomicU64::new(0));
    let producer = {
        let (store, applied) = (store.clone(), applied.clone());
        tokio::spawn(async move {
            for user in 1..=200u64 {
                apply_ok(&store, "GUILD_MEMBER_ADD", member_in(1, user)).await;
                applied.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    tokio::time::sleep(PENDING).await;
    let while_locked = applied.load(Ordering::Relaxed);
    assert!(
        while_locked <= 4 + 2,
        "{while_locked} applies returned with a 4-row queue and a blocked writer"
    );
    assert!(
        !producer.is_finished(),
        "apply did not wait for queue space"
    );

    lock.rollback().await.expect("unlock members");
    within("producer", producer).await.expect("producer");
    flush(&store).await;

    assert_eq!(
        count(&client, "SELECT count(*) FROM members WHERE guild_id = 1").await,
        200
    );
    assert_eq!(store.member_count(1).await.unwrap(), Some(200));
    assert_counts_exact(&store, &client, "after the queue drained").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_reuses_existing_tables() {
    let db = TestDatabase::create().await;
    let client = db.client().await;
    // Tables as the replaced service left them: members without a count table, shards without
    // status and resume_url, and threads keyed by id alone.
    client
        .batch_execute(
            "CREATE TABLE members (guild_id int8 NOT NULL, user_id int8 NOT NULL, data jsonb NOT NULL,
                                   PRIMARY KEY (guild_id, user_id));
             CREATE TABLE shards (id int NOT NULL, name text NOT NULL, seq int8 NOT NULL,
                                  sess text NOT NULL, PRIMARY KEY (id, name));
             INSERT INTO members VALUES (1, 10, '{}'), (1, 11, '{}'), (2, 10, '{}');
             INSERT INTO shards VALUES (0, 'bot-a', 42, 'old-session');
             CREATE TABLE guilds (id int8 NOT NULL, data jsonb NOT NULL, PRIMARY KEY (id));
             INSERT INTO guilds VALUES (1, '{\"name\": \"old\"}');
             CREATE TABLE threads (id int8 NOT NULL, owner_id int8, parent_id int8,
                                   guild_id int8 NOT NULL, data jsonb NOT NULL, PRIMARY KEY (id));",
        )
        .await
        .expect("old tables created");

    let store = connect(options(db.url())).await;
    assert_eq!(store.member_count(1).await.unwrap(), Some(2));
    assert_eq!(
        store.member_count(2).await.unwrap(),
        None,
        "members of a guild not cached"
    );
    assert_eq!(
        store.totals().await.unwrap(),
        CacheTotals {
            guilds: 1,
            members: 3
        }
    );
    let loaded = store
        .load_shard(0, "bot-a")
        .await
        .unwrap()
        .expect("old record");
    assert_eq!(loaded.seq, 42);
    assert_eq!(loaded.session_id.as_deref(), Some("old-session"));
    assert_eq!(loaded.status, "");
    assert_eq!(loaded.resume_url, None);

    // The writer's thread upsert works on the old threads table.
    apply_ok(&store, "THREAD_CREATE", thread_in(1, 700, TEXT_CHANNEL)).await;
    flush(&store).await;
    assert_eq!(ids(&store, 1, Table::Threads).await, [700]);
    store.close().await;
    let index_sql = "SELECT count(*) FROM pg_indexes WHERE tablename = 'threads'";
    let indexes = count(&client, index_sql).await;

    // Connecting again changes nothing.
    let store = connect(options(db.url())).await;
    assert_eq!(store.member_count(1).await.unwrap(), Some(2));
    assert_counts_exact(&store, &client, "after two connects").await;
    assert_eq!(
        count(&client, index_sql).await,
        indexes,
        "an index was created twice"
    );
}

/// Applies chunks of ten new members to guild 1 until `stop` is set, and stores the highest
/// user id applied so far in `produced`.
async fn produce(store: Arc<PostgresStore>, stop: Arc<AtomicBool>, produced: Arc<AtomicU64>) {
    let mut next = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let users = next..next + 10;
        apply_ok(&store, "GUILD_MEMBERS_CHUNK", chunk(1, users)).await;
        next += 10;
        produced.store(next - 1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_and_crash_mid_stream() {
    let mut cluster = PrivateCluster::create().await;
    let mut opts = options(cluster.url());
    opts.queue_rows = 200;
    opts.batch_rows = 50;
    let store = Arc::new(connect(opts).await);
    apply_ok(&store, "GUILD_CREATE", json!({"id": "1", "name": "g"})).await;

    let stop = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(produce(store.clone(), stop.clone(), produced.clone()));

    for outage in ["restart", "crash"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Read before the flush: every write up to it was queued before the flush request.
        let acknowledged = produced.load(Ordering::Relaxed);
        flush(&store).await;
        assert!(
            acknowledged > 0,
            "{outage}: nothing was produced before the outage"
        );

        match outage {
            "restart" => cluster.stop().await,
            _ => cluster.kill().await,
        }
        // Writes go on while the server is down, until the queue is full.
        let before = produced.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let during = produced.load(Ordering::Relaxed);
        assert!(
            during - before <= 200 + 10,
            "{outage}: {} rows applied while down with a 200-row queue",
            during - before
        );
        assert!(
            !producer.is_finished(),
            "{outage}: the producer failed while the server was down"
        );

        cluster.start().await;
        let verify = postgres_server::connect(&cluster.url()).await;
        // Every write acknowledged before the outage survived it.
        let sql = format!(
            "SELECT count(*) FROM members WHERE guild_id = 1 AND user_id <= {acknowledged}"
        );
        let stored = count(&verify, &sql).await;
        assert_eq!(
            stored as u64, acknowledged,
            "{outage}: acknowledged members missing after the outage"
        );
    }

    // A restart without a pause in between, while the producer goes on.
    cluster.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    within("producer", producer).await.expect("producer");
    flush(&store).await;

    // Every write, before, during and after the outages, is stored exactly once.
    let last = produced.load(Ordering::Relaxed);
    let verify = postgres_server::connect(&cluster.url()).await;
    let sql = "SELECT count(*), count(DISTINCT user_id), min(user_id), max(user_id) FROM members WHERE guild_id = 1";
    let row = verify.query_one(sql, &[]).await.expect("member summary");
    let (rows, distinct, min, max): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (rows, distinct, min, max),
        (last as i64, last as i64, 1, last as i64),
        "cluster log:\n{}",
        cluster.log_tail()
    );
    assert_eq!(store.member_count(1).await.unwrap(), Some(last));
    assert_counts_exact(&store, &verify, "after the outages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_cursor_survives_restart() {
    let db = TestDatabase::create().await;
    let store = connect(options(db.url())).await;
    assert_eq!(store.load_cursor("bot-a").await.unwrap(), None);
    store.save_cursor("bot-a", 41).await.unwrap();
    store.save_cursor("bot-a", 1_234_567_890_123).await.unwrap();
    store.save_cursor("bot-b", 7).await.unwrap();
    store.close().await;

    let store = connect(options(db.url())).await;
    assert_eq!(
        store.load_cursor("bot-a").await.unwrap(),
        Some(1_234_567_890_123)
    );
    assert_eq!(store.load_cursor("bot-b").await.unwrap(), Some(7));
    let too_large = store.save_cursor("bot-a", u64::MAX).await;
    assert!(too_large.is_err(), "a cursor beyond int8 was accepted");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_claims_exclude_overlap() {
    let db = TestDatabase::create().await;
    let first = connect(options(db.url())).await;
    let second = connect(options(db.url())).await;

    let claim = first
        .claim_shards("bot", 0..4)
        .await
        .expect("the first claim failed");
    let overlap = second.claim_shards("bot", 2..6).await;
    assert!(
        matches!(
            overlap,
            Err(shardvisor::adapters::postgres::ClaimError::Taken { shard: 2, .. })
        ),
        "an overlapping range of the same name was claimed: {:?}",
        overlap.err()
    );
    let disjoint = second.claim_shards("bot", 4..8).await;
    assert!(disjoint.is_ok(), "a disjoint range was refused");
    let other_name = second.claim_shards("other-bot", 0..4).await;
    assert!(
        other_name.is_ok(),
        "the same range of another name was refused"
    );

    drop(claim);
    let after_release = second.claim_shards("bot", 0..2).await;
    assert!(
        after_release.is_ok(),
        "the range was refused after its claim was dropped"
    );
    first.close().await;
    second.close().await;
}
