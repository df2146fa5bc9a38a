//! Injected faults: op 1, silenced heartbeats, op 7, op 9 either way, server closes, dropped
//! connections, a slow READY and withheld GUILD_CREATEs.

mod common;

use std::time::{Duration, Instant};

use actors::gateway::{Intents, ServerPayload};
use common::{start, test_config, End, GatewayClient, Received};
use shardvisor::sim::report::ConnectionEnd;
use shardvisor::sim::{Fault, SimConfig, Simulator, Target};

/// Identifies `shard` of `count` on a new connection and returns the client and the session id.
async fn identified(sim: &Simulator, shard: u32, count: u32) -> (GatewayClient, String) {
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, shard, count, Intents::ALL).await;
    let (_, ready) = client.wait_ready().await;
    (client, ready.session_id)
}

/// Sends RESUME on a new connection to the resume address and returns the first payload after
/// the replay, or the close.
async fn resume_answer(sim: &Simulator, session_id: &str, seq: u64) -> Received {
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.resume_url()).await;
    client.hello().await;
    client.resume(&token, session_id, seq).await;
    loop {
        match client.recv().await {
            // Replayed events come before RESUMED.
            Received::Payload {
                payload: ServerPayload::Dispatch(dispatch),
                ..
            } if dispatch.event != "RESUMED" => {}
            other => return other,
        }
    }
}

fn is_resumed(received: &Received) -> bool {
    matches!(
        received,
        Received::Payload { payload: ServerPayload::Dispatch(dispatch), .. } if dispatch.event == "RESUMED"
    )
}

fn is_invalid_session(received: &Received, resumable: bool) -> bool {
    matches!(
        received,
        Received::Payload { payload: ServerPayload::InvalidSession { resumable: r }, .. } if *r == resumable
    )
}

#[tokio::test]
async fn request_heartbeat_fault_sends_op1() {
    let sim = start(test_config()).await;
    let (mut client, _) = identified(&sim, 0, 1).await;

    assert_eq!(
        sim.inject(Target::All, Fault::RequestHeartbeat),
        1,
        "one connection hit"
    );

    client
        .wait_payload("op 1 from the gateway", |payload| {
            matches!(payload, ServerPayload::Heartbeat)
        })
        .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn silence_heartbeats_withholds_ack() {
    let sim = start(test_config()).await;
    let (mut client, _) = identified(&sim, 0, 1).await;
    client.collect_until_quiet(Duration::from_millis(100)).await;

    sim.inject(Target::All, Fault::SilenceHeartbeats { silent: true });
    client.heartbeat().await;
    let silent = client.recv_within(Duration::from_millis(300)).await;
    assert!(
        silent.is_none(),
        "a silenced heartbeat must get no answer, got {silent:?}"
    );

    sim.inject(Target::All, Fault::SilenceHeartbeats { silent: false });
    client.heartbeat().await;
    let answer = client.next_payload().await;
    assert!(
        matches!(answer, ServerPayload::HeartbeatAck),
        "heartbeats are acknowledged again after the silence ends, got {answer:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn reconnect_fault_sends_op7() {
    let sim = start(test_config()).await;
    let (mut client, _) = identified(&sim, 0, 1).await;
    let mut unidentified = GatewayClient::connect(sim.gateway_url()).await;
    unidentified.hello().await;

    let hit = sim.inject(Target::All, Fault::Reconnect);

    assert_eq!(hit, 1, "only the identified connection is hit");
    client
        .wait_payload("op 7", |payload| {
            matches!(payload, ServerPayload::Reconnect)
        })
        .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn shard_target_hits_one_shard() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        ..test_config()
    };
    let sim = start(config).await;
    let (mut shard_0, _) = identified(&sim, 0, 2).await;
    let (mut shard_1, _) = identified(&sim, 1, 2).await;
    shard_0
        .collect_until_quiet(Duration::from_millis(100))
        .await;

    assert_eq!(
        sim.inject(Target::Shard(1), Fault::Reconnect),
        1,
        "one connection hit"
    );

    shard_1
        .wait_payload("op 7 on shard 1", |payload| {
            matches!(payload, ServerPayload::Reconnect)
        })
        .await;
    let other = shard_0.recv_within(Duration::from_millis(200)).await;
    assert!(other.is_none(), "shard 0 must not be hit, got {other:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_session_resumable_keeps_session() {
    let sim = start(test_config()).await;
    let (mut client, session_id) = identified(&sim, 0, 1).await;

    sim.inject(Target::All, Fault::InvalidSession { resumable: true });
    client
        .wait_payload("op 9 true", |payload| {
            matches!(payload, ServerPayload::InvalidSession { resumable: true })
        })
        .await;
    client.close(4900).await;

    let answer = resume_answer(&sim, &session_id, client.last_seq.unwrap_or(0)).await;
    assert!(
        is_resumed(&answer),
        "RESUME after op 9 true must succeed, got {answer:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_session_false_ends_session() {
    let sim = start(test_config()).await;
    let (mut client, session_id) = identified(&sim, 0, 1).await;

    sim.inject(Target::All, Fault::InvalidSession { resumable: false });
    client
        .wait_payload("op 9 false", |payload| {
            matches!(payload, ServerPayload::InvalidSession { resumable: false })
        })
        .await;

    let answer = resume_answer(&sim, &session_id, client.last_seq.unwrap_or(0)).await;
    assert!(
        is_invalid_session(&answer, false),
        "RESUME after op 9 false must get op 9 false, got {answer:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn close_fault_keeps_session_resumable() {
    let config = SimConfig {
        identify_window: Duration::from_millis(100),
        ..test_config()
    };
    let sim = start(config).await;

    for code in [1000, 4000] {
        let (mut client, session_id) = identified(&sim, 0, 1).await;

        assert_eq!(
            sim.inject(Target::All, Fault::Close { code }),
            1,
            "one connection hit"
        );
        assert_eq!(
            client.wait_close_code().await,
            Some(code),
            "the injected close code"
        );

        let answer = resume_answer(&sim, &session_id, client.last_seq.unwrap_or(0)).await;
        assert!(
            is_resumed(&answer),
            "RESUME after a server close {code} must succeed, got {answer:?}"
        );
        tokio::time::sleep(sim.config().identify_window).await;
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_fault_sends_no_close() {
    let sim = start(test_config()).await;
    let (mut client, session_id) = identified(&sim, 0, 1).await;
    let connection = sim.report().connections.len() as u64;

    assert_eq!(
        sim.inject(Target::All, Fault::Drop),
        1,
        "one connection hit"
    );

    assert_eq!(
        client.wait_end().await,
        End::Dropped,
        "Drop must send no close frame"
    );
    let report = common::wait_for_report(&sim, "the end of the dropped connection", |report| {
        report
            .connection(connection)
            .is_some_and(|record| record.end.is_some())
    })
    .await;
    let end = report
        .connection(connection)
        .and_then(|record| record.end.clone());
    assert!(
        matches!(end, Some(ConnectionEnd::Dropped)),
        "the report must record a drop, got {end:?}"
    );
    let answer = resume_answer(&sim, &session_id, client.last_seq.unwrap_or(0)).await;
    assert!(
        is_resumed(&answer),
        "RESUME after a drop must succeed, got {answer:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn delay_ready_holds_ready() {
    let delay = Duration::from_millis(400);
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    assert_eq!(
        sim.inject(Target::All, Fault::DelayReady { delay }),
        1,
        "applies to 1 shard"
    );
    let sent = Instant::now();
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    client.wait_ready().await;
    let elapsed = sent.elapsed();

    assert!(
        elapsed >= delay,
        "READY after {elapsed:?}, before the {delay:?} delay"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn withhold_guilds_skips_last() {
    let config = SimConfig {
        identify_window: Duration::from_millis(100),
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let guilds: Vec<u64> = sim.guild_ids(0).iter().map(|id| id.get()).collect();
    assert!(guilds.len() > 3, "the test needs more than three guilds");

    assert_eq!(
        sim.inject(Target::Shard(0), Fault::WithholdGuilds { count: 3 }),
        1,
        "applies to shard 0"
    );
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    let (_, ready) = client.wait_ready().await;
    let dispatches = client.collect_until_quiet(Duration::from_millis(300)).await;
    let received: Vec<u64> = dispatches
        .iter()
        .filter(|dispatch| dispatch.event == "GUILD_CREATE")
        .filter_map(|dispatch| common::data_field_u64(dispatch, "id"))
        .collect();

    assert_eq!(
        ready.guilds.len(),
        guilds.len(),
        "READY still lists every guild"
    );
    assert_eq!(
        received.len(),
        guilds.len() - 3,
        "three fewer GUILD_CREATEs than READY guilds"
    );
    let mut sorted = received.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        guilds[..guilds.len() - 3],
        "the last three guilds are withheld"
    );

    // A fault on one shard applies to its next READY only.
    client.close(1000).await;
    tokio::time::sleep(sim.config().identify_window).await;
    let mut again = GatewayClient::connect(sim.gateway_url()).await;
    let (_, guild_creates) = again.start_session(&token, 0, 1, Intents::GUILDS).await;
    assert_eq!(
        guild_creates.len(),
        guilds.len(),
        "the next session gets every guild"
    );
    sim.shutdown().await;
}
