//! REQUEST_GUILD_MEMBERS: chunks, nonces, requests by user id, presences, the all-members rate
//! limit per guild and the RATE_LIMITED fault.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use actors::gateway::{ClientPayload, Dispatch, Intents, RequestGuildMembers, Snowflake};
use common::{all_members, chunk_header, data_json, start, test_config, GatewayClient};
use shardvisor::sim::{Fault, SimConfig, Simulator, Target, ViolationKind};

/// A guild of the session and its `member_count` from GUILD_CREATE.
struct GuildSize {
    id: u64,
    member_count: u64,
}

/// Starts a session of shard 0 of `count` and returns the client and the guilds by size, smallest
/// first.
async fn session(sim: &Simulator, count: u32, intents: Intents) -> (GatewayClient, Vec<GuildSize>) {
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    let (_, guild_creates) = client.start_session(&token, 0, count, intents).await;
    let mut guilds: Vec<GuildSize> = guild_creates
        .iter()
        .map(|dispatch| GuildSize {
            id: common::data_field_u64(dispatch, "id").expect("GUILD_CREATE has an id"),
            member_count: common::data_field_u64(dispatch, "member_count")
                .expect("GUILD_CREATE has a member_count"),
        })
        .collect();
    guilds.sort_by_key(|guild| guild.member_count);
    (client, guilds)
}

/// Collects the GUILD_MEMBERS_CHUNKs of one request (by nonce) until the last one arrived.
async fn collect_chunks(client: &mut GatewayClient, nonce: &str) -> Vec<Dispatch> {
    let mut expected = None;
    let mut received = 0;
    let dispatches = client
        .collect_until("every chunk of the request", |dispatch| {
            if dispatch.event != "GUILD_MEMBERS_CHUNK" {
                return false;
            }
            let header = chunk_header(dispatch);
            if header.nonce.as_deref() != Some(nonce) {
                return false;
            }
            received += 1;
            expected = Some(header.chunk_count);
            expected == Some(received)
        })
        .await;
    dispatches
        .into_iter()
        .filter(|dispatch| {
            dispatch.event == "GUILD_MEMBERS_CHUNK"
                && chunk_header(dispatch).nonce.as_deref() == Some(nonce)
        })
        .collect()
}

/// Returns the user ids of a chunk's members.
fn member_ids(chunk: &Dispatch) -> Vec<u64> {
    data_json(chunk)["members"]
        .as_array()
        .expect("GUILD_MEMBERS_CHUNK has a members array")
        .iter()
        .map(|member| {
            member["user"]["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("a member has a user id string")
        })
        .collect()
}

#[tokio::test]
async fn all_members_request_chunks() {
    let sim = start(test_config()).await;
    let (mut client, guilds) = session(&sim, 1, Intents::ALL).await;
    let largest = guilds.last().expect("shard 0 has guilds");
    assert!(
        largest.member_count > 1000,
        "the largest guild needs several chunks"
    );

    client.send(&all_members(largest.id, "all-1")).await;
    let chunks = collect_chunks(&mut client, "all-1").await;

    let chunk_count = chunk_header(&chunks[0]).chunk_count;
    assert_eq!(
        u64::from(chunk_count),
        largest.member_count.div_ceil(1000),
        "chunk_count for {} members",
        largest.member_count
    );
    let mut indexes = BTreeSet::new();
    let mut users = HashSet::new();
    let mut total = 0;
    for chunk in &chunks {
        let header = chunk_header(chunk);
        assert_eq!(header.guild_id.get(), largest.id, "chunk guild_id");
        assert_eq!(
            header.chunk_count, chunk_count,
            "every chunk has the same chunk_count"
        );
        assert!(
            indexes.insert(header.chunk_index),
            "chunk_index {} twice",
            header.chunk_index
        );
        assert_eq!(
            header.nonce.as_deref(),
            Some("all-1"),
            "the nonce is echoed"
        );
        let ids = member_ids(chunk);
        assert!(
            ids.len() <= 1000,
            "chunk {} has {} members",
            header.chunk_index,
            ids.len()
        );
        total += ids.len() as u64;
        for id in ids {
            assert!(users.insert(id), "member {id} sent twice");
        }
    }
    assert_eq!(
        indexes,
        (0..chunk_count).collect(),
        "chunk_index covers 0..chunk_count"
    );
    assert_eq!(
        total, largest.member_count,
        "all members add up to GUILD_CREATE member_count"
    );

    let report = common::wait_for_report(&sim, "every chunk counted", |report| {
        report
            .member_requests
            .get(&largest.id)
            .is_some_and(|record| record.chunks_sent == u64::from(chunk_count))
    })
    .await;
    let record = &report.member_requests[&largest.id];
    assert_eq!(record.shard, 0, "member request shard");
    assert_eq!(record.requests, 1, "member requests of the guild");
    assert_eq!(
        record.all_members_requests, 1,
        "all-members requests of the guild"
    );
    assert_eq!(record.rate_limited, 0, "rate-limited requests of the guild");
    sim.shutdown().await;
}

#[tokio::test]
async fn second_request_rate_limited() {
    let window = Duration::from_millis(400);
    let config = SimConfig {
        member_request_window: window,
        ..test_config()
    };
    let sim = start(config).await;
    let (mut client, guilds) = session(&sim, 1, Intents::ALL).await;
    let guild = guilds.first().expect("shard 0 has guilds").id;

    client.send(&all_members(guild, "first")).await;
    collect_chunks(&mut client, "first").await;
    client.send(&all_members(guild, "second")).await;
    let limited = client.wait_dispatch("RATE_LIMITED").await;

    let data = data_json(&limited);
    assert_eq!(data["opcode"], 8, "RATE_LIMITED opcode");
    let retry_after = data["retry_after"]
        .as_f64()
        .expect("retry_after is a number of seconds");
    assert!(
        retry_after > 0.0 && retry_after <= window.as_secs_f64(),
        "retry_after {retry_after} s must be within the {window:?} window"
    );
    assert_eq!(data["meta"]["guild_id"], guild.to_string(), "meta.guild_id");
    assert_eq!(
        data["meta"]["nonce"], "second",
        "meta.nonce of the limited request"
    );
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::MemberRequestRateLimited),
        1,
        "the request inside the window must be a violation: {:?}",
        report.violations
    );
    let record = &report.member_requests[&guild];
    assert_eq!(record.requests, 2, "member requests of the guild");
    assert_eq!(
        record.all_members_requests, 2,
        "all-members requests of the guild"
    );
    assert_eq!(record.rate_limited, 1, "rate-limited requests of the guild");

    tokio::time::sleep(Duration::from_secs_f64(retry_after) + Duration::from_millis(20)).await;
    client.send(&all_members(guild, "third")).await;
    let chunks = collect_chunks(&mut client, "third").await;
    assert!(
        !chunks.is_empty(),
        "the request after the window is answered"
    );
    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::MemberRequestRateLimited),
        1,
        "the request after retry_after is no violation"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_fault_forces_one() {
    let sim = start(test_config()).await;
    let (mut client, guilds) = session(&sim, 1, Intents::ALL).await;
    let guild = guilds.first().expect("shard 0 has guilds").id;
    let retry_after = Duration::from_secs(2);

    assert_eq!(
        sim.inject(Target::Shard(0), Fault::RateLimitMembers { retry_after }),
        1,
        "applies to shard 0"
    );
    client.send(&all_members(guild, "forced")).await;
    let limited = client.wait_dispatch("RATE_LIMITED").await;

    let data = data_json(&limited);
    assert_eq!(
        data["retry_after"].as_f64(),
        Some(2.0),
        "the fault's retry_after in seconds"
    );
    assert_eq!(data["meta"]["nonce"], "forced", "meta.nonce");
    client.send(&all_members(guild, "next")).await;
    let chunks = collect_chunks(&mut client, "next").await;
    assert!(!chunks.is_empty(), "the fault limits one request only");
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::MemberRequestRateLimited),
        0,
        "a forced RATE_LIMITED is not the client's violation: {:?}",
        report.violations
    );
    assert_eq!(
        report.member_requests[&guild].rate_limited, 1,
        "one rate-limited request"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn user_ids_request_reports_not_found() {
    let sim = start(test_config()).await;
    let (mut client, guilds) = session(&sim, 1, Intents::ALL).await;
    let guild = guilds
        .iter()
        .find(|guild| guild.member_count >= 2)
        .expect("a guild with two members");
    client.send(&all_members(guild.id, "all")).await;
    let chunks = collect_chunks(&mut client, "all").await;
    let known = member_ids(&chunks[0]);
    let unknown = 175_928_847_299_117_063;

    let request = RequestGuildMembers {
        guild_id: Snowflake(guild.id),
        query: None,
        limit: 0,
        presences: None,
        user_ids: Some(vec![
            Snowflake(known[0]),
            Snowflake(unknown),
            Snowflake(known[1]),
        ]),
        nonce: Some("ids".to_owned()),
    };
    client
        .send(&ClientPayload::RequestGuildMembers(request))
        .await;
    let chunks = collect_chunks(&mut client, "ids").await;

    assert_eq!(
        chunks.len(),
        1,
        "a request by user ids is answered in one chunk"
    );
    let mut found = member_ids(&chunks[0]);
    found.sort_unstable();
    let mut expected = vec![known[0], known[1]];
    expected.sort_unstable();
    assert_eq!(found, expected, "the known users are returned");
    let not_found: Vec<u64> = chunk_header(&chunks[0])
        .not_found
        .iter()
        .map(|id| id.get())
        .collect();
    assert_eq!(not_found, vec![unknown], "not_found lists the unknown user");
    let report = sim.report();
    assert_eq!(
        report.member_requests[&guild.id].requests, 2,
        "member requests"
    );
    assert_eq!(
        report.member_requests[&guild.id].all_members_requests, 1,
        "a request by user ids is not an all-members request"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn presences_request_includes_presences() {
    let sim = start(test_config()).await;
    let (mut client, guilds) = session(&sim, 1, Intents::ALL).await;
    let largest = guilds.last().expect("shard 0 has guilds");

    let mut request = RequestGuildMembers::all_members(Snowflake(largest.id), Some("p".into()));
    request.presences = Some(true);
    client
        .send(&ClientPayload::RequestGuildMembers(request))
        .await;
    let chunks = collect_chunks(&mut client, "p").await;

    let mut presences = 0;
    for chunk in &chunks {
        let members: HashSet<u64> = member_ids(chunk).into_iter().collect();
        let data = data_json(chunk);
        let list = data["presences"]
            .as_array()
            .expect("a chunk requested with presences has a presences array");
        for presence in list {
            let user: u64 = presence["user"]["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("a presence has a user id string");
            assert!(
                members.contains(&user),
                "presence of {user} who is not in the chunk"
            );
            presences += 1;
        }
    }
    assert!(
        presences > 0,
        "a guild of {} members has someone online",
        largest.member_count
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn other_shard_guild_is_violation() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        ..test_config()
    };
    let sim = start(config).await;
    let (mut client, _) = session(&sim, 2, Intents::ALL).await;
    let foreign = sim.guild_ids(1)[0].get();

    client.send(&all_members(foreign, "foreign")).await;
    let answer = client.collect_until_quiet(Duration::from_millis(200)).await;

    assert!(
        answer.is_empty(),
        "no chunk for a guild of another shard: {answer:?}"
    );
    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::InvalidMemberRequest),
        1,
        "a request for a guild of another shard must be a violation"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn all_members_without_intent_is_violation() {
    let sim = start(test_config()).await;
    let (mut client, guilds) = session(&sim, 1, Intents::GUILDS).await;

    client.send(&all_members(guilds[0].id, "no-intent")).await;
    let answer = client.collect_until_quiet(Duration::from_millis(200)).await;

    assert!(
        answer.is_empty(),
        "no chunk without GUILD_MEMBERS: {answer:?}"
    );
    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::InvalidMemberRequest),
        1,
        "an all-members request without GUILD_MEMBERS must be a violation"
    );
    sim.shutdown().await;
}
