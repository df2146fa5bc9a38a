//! Steady dispatch traffic (sequence numbers, routing, intents) and the report read back by
//! tests.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use actors::gateway::{Dispatch, Intents, ServerPayload};
use common::{shard_of, start, test_config, wait_for_report, GatewayClient};
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{SimConfig, ViolationKind};

/// Returns the guild a dispatch belongs to: its `guild_id`, or `id` for the events whose data is
/// the guild itself.
fn event_guild(dispatch: &Dispatch) -> Option<u64> {
    common::data_field_u64(dispatch, "guild_id").or_else(|| {
        matches!(
            dispatch.event.as_str(),
            "GUILD_CREATE" | "GUILD_UPDATE" | "GUILD_DELETE"
        )
        .then(|| common::data_field_u64(dispatch, "id"))
        .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_sequence_and_routing() {
    let shards = 2;
    let config = SimConfig {
        shards,
        max_concurrency: shards,
        dispatch_rate: 200.0,
        world: WorldConfig {
            guilds: 60,
            ..test_config().world
        },
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut clients = Vec::new();
    for shard in 0..shards {
        let mut client = GatewayClient::connect(sim.gateway_url()).await;
        client.hello().await;
        client.identify(&token, shard, shards, Intents::ALL).await;
        clients.push(client);
    }

    for (shard, client) in (0..shards).zip(&mut clients) {
        let (ready_dispatch, ready) = client.wait_ready().await;
        let first_traffic = ready.guilds.len() as u64 + 2;
        let dispatches = client
            .collect_until("150 traffic events", |dispatch| {
                dispatch.seq >= first_traffic + 149
            })
            .await;

        let mut guilds: HashSet<u64> = ready.guilds.iter().map(|guild| guild.id.get()).collect();
        for (expected_seq, dispatch) in (ready_dispatch.seq + 1..).zip(&dispatches) {
            assert_eq!(
                dispatch.seq, expected_seq,
                "shard {shard}: {} out of sequence",
                dispatch.event
            );
            let Some(guild) = event_guild(dispatch) else {
                panic!(
                    "shard {shard}: {} carries no guild: {}",
                    dispatch.event, dispatch.data
                );
            };
            assert_eq!(
                shard_of(guild, shards),
                shard,
                "shard {shard}: {} for guild {guild} of another shard",
                dispatch.event
            );
            let joined = dispatch.event == "GUILD_CREATE" && dispatch.seq >= first_traffic;
            if joined {
                assert!(
                    guilds.insert(guild),
                    "shard {shard}: joined guild {guild} twice"
                );
                continue;
            }
            assert!(
                guilds.contains(&guild),
                "shard {shard}: {} for guild {guild} that the shard does not have",
                dispatch.event
            );
            if dispatch.event == "GUILD_DELETE" {
                guilds.remove(&guild);
            }
        }
        let traffic = dispatches
            .iter()
            .filter(|dispatch| dispatch.seq >= first_traffic)
            .count();
        assert_eq!(traffic, 150, "shard {shard}: traffic events received");
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_respects_intents() {
    let config = SimConfig {
        dispatch_rate: 500.0,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    let intents = Intents::GUILDS | Intents::GUILD_MESSAGES;
    let (ready, _) = client.start_session(&token, 0, 1, intents).await;
    let first_traffic = ready.guilds.len() as u64 + 2;

    let dispatches = client
        .collect_until("200 traffic events", |dispatch| {
            dispatch.seq >= first_traffic + 199
        })
        .await;

    let mut messages = 0;
    for dispatch in &dispatches {
        assert!(
            !matches!(
                dispatch.event.as_str(),
                "PRESENCE_UPDATE"
                    | "GUILD_MEMBER_ADD"
                    | "GUILD_MEMBER_UPDATE"
                    | "GUILD_MEMBER_REMOVE"
            ),
            "{} needs an intent the session did not request",
            dispatch.event
        );
        if dispatch.event == "MESSAGE_CREATE" {
            messages += 1;
            let data = common::data_json(dispatch);
            assert_eq!(
                data["content"], "",
                "MESSAGE_CREATE content without MESSAGE_CONTENT must be empty"
            );
        }
    }
    assert!(messages > 0, "GUILD_MESSAGES brings MESSAGE_CREATE events");
    sim.shutdown().await;
}

#[tokio::test]
async fn report_matches_client_view() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    let (ready, guild_creates) = client.start_session(&token, 0, 1, Intents::ALL).await;
    for _ in 0..2 {
        client.heartbeat().await;
        client
            .wait_payload("op 11", |payload| {
                matches!(payload, ServerPayload::HeartbeatAck)
            })
            .await;
    }
    let guild = common::data_field_u64(&guild_creates[0], "id").expect("GUILD_CREATE has an id");
    client.send(&common::all_members(guild, "report")).await;
    client
        .collect_until("the last chunk", |dispatch| {
            dispatch.event == "GUILD_MEMBERS_CHUNK" && {
                let header = common::chunk_header(dispatch);
                header.chunk_index + 1 == header.chunk_count
            }
        })
        .await;
    let last_seq = client.last_seq.expect("dispatches were received");

    let mut bad = GatewayClient::connect(sim.gateway_url()).await;
    bad.hello().await;
    bad.send_text("not json".to_owned()).await;
    assert_eq!(
        bad.wait_close_code().await,
        Some(4002),
        "invalid JSON closes with 4002"
    );

    let report = wait_for_report(
        &sim,
        "the session at the client's last sequence",
        |report| {
            report.sessions[&ready.session_id].last_seq == last_seq
                && report.connections.len() == 2
                && report.connections[1].end.is_some()
        },
    )
    .await;
    let session = &report.sessions[&ready.session_id];
    assert_eq!(session.shard, 0, "session shard");
    assert_eq!(
        session.dispatches, last_seq,
        "every dispatch of the session is counted"
    );
    assert!(session.resumable, "the live session is resumable");
    assert_eq!(
        report.dispatches_sent, last_seq,
        "dispatches_sent across the one session"
    );
    assert_eq!(
        report.connections[0].sends, 4,
        "IDENTIFY, two heartbeats and a member request"
    );
    assert_eq!(
        report.connections[0].shard,
        Some(0),
        "the identified connection's shard"
    );
    assert!(
        !report.connections[0].compressed,
        "the connection is not compressed"
    );
    assert_eq!(report.connections[1].sends, 1, "the invalid payload");
    assert_eq!(
        report.connections[1].shard, None,
        "the unidentified connection has no shard"
    );
    assert_eq!(
        report.violations.len(),
        1,
        "one violation: {:?}",
        report.violations
    );
    assert_eq!(
        report.violations[0].connection, 2,
        "the violation is on connection 2"
    );
    assert_eq!(
        report.violation_count(ViolationKind::DecodeError),
        1,
        "one decode error"
    );
    assert_eq!(
        report.violations_by_kind.len(),
        1,
        "no other kind of violation"
    );
    assert_eq!(report.accepted_identifies(), 1, "one accepted IDENTIFY");

    let json = serde_json::to_string(&report).expect("the report serializes to JSON");
    let value: serde_json::Value = serde_json::from_str(&json).expect("the report is valid JSON");
    assert_eq!(
        value["violations_by_kind"]["decode_error"], 1,
        "violation kinds in snake_case"
    );
    assert_eq!(
        value["dispatches_sent"], last_seq,
        "dispatches_sent in the JSON report"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_drops_connections() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.start_session(&token, 0, 1, Intents::GUILDS).await;

    let report = sim.shutdown().await;

    assert_eq!(
        report.accepted_identifies(),
        1,
        "the final report has the session"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), client.wait_end()).await;
    assert_eq!(
        end.ok(),
        Some(common::End::Dropped),
        "shutdown ends connections without a close frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_guild_honours_large_threshold() {
    let threshold = 250;
    let config = SimConfig {
        dispatch_rate: 1000.0,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    let mut identify = common::identify_payload(&token, Some([0, 1]), Intents::GUILDS.0);
    if let actors::gateway::ClientPayload::Identify(data) = &mut identify {
        data.large_threshold = Some(threshold);
    }
    client.send(&identify).await;
    let (_, ready) = client.wait_ready().await;
    let first_traffic = ready.guilds.len() as u64 + 2;

    // GUILDS alone makes guild joins frequent. The test stops at the first joined guild that is
    // large by Discord's default threshold of 50 but not by the session's threshold of 250.
    let dispatches = client
        .collect_until("a joined guild of 51 to 250 members", |dispatch| {
            dispatch.event == "GUILD_CREATE"
                && dispatch.seq >= first_traffic
                && common::data_field_u64(dispatch, "member_count")
                    .is_some_and(|count| (51..=u64::from(threshold)).contains(&count))
        })
        .await;

    for dispatch in dispatches.iter().filter(|d| d.event == "GUILD_CREATE") {
        let data = common::data_json(dispatch);
        let member_count = data["member_count"]
            .as_u64()
            .expect("GUILD_CREATE member_count");
        let joined = if dispatch.seq >= first_traffic {
            "joined"
        } else {
            "initial"
        };
        assert_eq!(
            data["large"].as_bool(),
            Some(member_count > u64::from(threshold)),
            "{joined} guild {} of {member_count} members with large_threshold {threshold}",
            data["id"]
        );
    }
    sim.shutdown().await;
}
