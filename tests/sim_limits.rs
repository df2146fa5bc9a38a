//! Identify pacing per bucket, the session-start limit and the per-connection send limit.

mod common;

use std::time::Duration;

use actors::gateway::{Intents, ServerPayload};
use common::{get_gateway_bot, start, test_config, wait_for_report, GatewayClient, Received};
use shardvisor::sim::{SimConfig, ViolationKind};

#[tokio::test]
async fn same_bucket_inside_window_rejected() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 1,
        identify_window: Duration::from_secs(2),
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut first = GatewayClient::connect(sim.gateway_url()).await;
    let mut second = GatewayClient::connect(sim.gateway_url()).await;
    first.hello().await;
    second.hello().await;

    first.identify(&token, 0, 2, Intents::GUILDS).await;
    first.wait_ready().await;
    second.identify(&token, 1, 2, Intents::GUILDS).await;
    let answer = second.next_payload().await;

    assert!(
        matches!(answer, ServerPayload::InvalidSession { resumable: false }),
        "the second IDENTIFY of bucket 0 inside the window must get op 9 false, got {answer:?}"
    );
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::IdentifyTooFast),
        1,
        "the early IDENTIFY must be a violation: {:?}",
        report.violations
    );
    let bucket = &report.identifies[&0];
    assert_eq!(
        bucket.len(),
        2,
        "both IDENTIFYs recorded in bucket 0: {bucket:?}"
    );
    assert!(bucket[0].accepted, "the first IDENTIFY is accepted");
    assert_eq!(bucket[0].shard, 0, "the first IDENTIFY came from shard 0");
    assert!(!bucket[1].accepted, "the second IDENTIFY is rejected");
    assert_eq!(bucket[1].shard, 1, "the second IDENTIFY came from shard 1");
    assert!(
        bucket[0].at_ms <= bucket[1].at_ms,
        "identifies are recorded in arrival order with timestamps: {bucket:?}"
    );
    assert_eq!(report.accepted_identifies(), 1, "only one session started");
    sim.shutdown().await;
}

#[tokio::test]
async fn different_buckets_both_accepted() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        identify_window: Duration::from_secs(2),
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut first = GatewayClient::connect(sim.gateway_url()).await;
    let mut second = GatewayClient::connect(sim.gateway_url()).await;
    first.hello().await;
    second.hello().await;

    first.identify(&token, 0, 2, Intents::GUILDS).await;
    second.identify(&token, 1, 2, Intents::GUILDS).await;
    let (_, first_ready) = first.wait_ready().await;
    let (_, second_ready) = second.wait_ready().await;

    assert_eq!(first_ready.shard, Some([0, 2]), "shard 0 READY");
    assert_eq!(second_ready.shard, Some([1, 2]), "shard 1 READY");
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::IdentifyTooFast),
        0,
        "buckets 0 and 1 are independent: {:?}",
        report.violations
    );
    for bucket in [0, 1] {
        let records = &report.identifies[&bucket];
        assert_eq!(
            records.len(),
            1,
            "one IDENTIFY in bucket {bucket}: {records:?}"
        );
        assert!(records[0].accepted, "bucket {bucket} accepted its IDENTIFY");
        assert_eq!(
            records[0].shard, bucket,
            "bucket of shard {bucket} is {bucket}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn same_bucket_after_window_accepted() {
    let window = Duration::from_millis(200);
    let config = SimConfig {
        shards: 2,
        max_concurrency: 1,
        identify_window: window,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut first = GatewayClient::connect(sim.gateway_url()).await;
    let mut second = GatewayClient::connect(sim.gateway_url()).await;
    first.hello().await;
    second.hello().await;

    first.identify(&token, 0, 2, Intents::GUILDS).await;
    first.wait_ready().await;
    // READY follows the accepted IDENTIFY, so the window has passed one window after READY.
    tokio::time::sleep(window + Duration::from_millis(20)).await;
    second.identify(&token, 1, 2, Intents::GUILDS).await;
    let (_, ready) = second.wait_ready().await;

    assert_eq!(ready.shard, Some([1, 2]), "shard 1 READY after the window");
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::IdentifyTooFast),
        0,
        "an IDENTIFY after the window is not too fast: {:?}",
        report.violations
    );
    let bucket = &report.identifies[&0];
    assert_eq!(bucket.len(), 2, "both IDENTIFYs recorded in bucket 0");
    assert!(
        bucket.iter().all(|record| record.accepted),
        "both accepted: {bucket:?}"
    );
    let gap = bucket[1].at_ms - bucket[0].at_ms;
    assert!(
        gap >= 200,
        "the recorded timestamps must be at least one window apart, got {gap} ms"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn session_start_remaining_decreases() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        session_start_total: 5,
        session_start_remaining: 3,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let authorization = common::bot_authorization(&sim);

    for (shard, remaining) in [(0, 2), (1, 1)] {
        let mut client = GatewayClient::connect(sim.gateway_url()).await;
        client.hello().await;
        client.identify(&token, shard, 2, Intents::GUILDS).await;
        client.wait_ready().await;

        let (status, body) = get_gateway_bot(&sim, Some(&authorization)).await;
        assert_eq!(status, 200, "GET /gateway/bot: {body}");
        assert_eq!(
            body["session_start_limit"]["remaining"], remaining,
            "remaining after the IDENTIFY of shard {shard}"
        );
        assert_eq!(body["session_start_limit"]["total"], 5, "total stays 5");
        assert_eq!(
            sim.report().session_start_remaining,
            remaining,
            "the report's session_start_remaining after shard {shard}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_uses_no_session_start() {
    let config = SimConfig {
        session_start_total: 5,
        session_start_remaining: 5,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    let (_, ready) = client.wait_ready().await;
    client.close(4900).await;

    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    resumed.hello().await;
    resumed
        .resume(&token, &ready.session_id, client.last_seq.unwrap_or(0))
        .await;
    resumed.wait_dispatch("RESUMED").await;

    let (_, body) = get_gateway_bot(&sim, Some(&common::bot_authorization(&sim))).await;
    assert_eq!(
        body["session_start_limit"]["remaining"], 4,
        "a RESUME must not use a session start"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn exhausted_limit_resets_token() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        session_start_total: 1,
        session_start_remaining: 1,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut live = GatewayClient::connect(sim.gateway_url()).await;
    live.hello().await;
    live.identify(&token, 0, 2, Intents::GUILDS).await;
    let (_, ready) = live.wait_ready().await;

    let mut over = GatewayClient::connect(sim.gateway_url()).await;
    over.hello().await;
    over.identify(&token, 1, 2, Intents::GUILDS).await;

    assert_eq!(
        over.wait_close_code().await,
        Some(4004),
        "IDENTIFY with no session starts left"
    );
    assert_eq!(
        live.wait_close_code().await,
        Some(4004),
        "every open session must be closed when the token is reset"
    );
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::SessionStartLimitExceeded),
        1,
        "the exhausted limit must be a violation: {:?}",
        report.violations
    );
    assert!(
        !report.sessions[&ready.session_id].resumable,
        "the session of the reset token must not be resumable"
    );

    let mut later = GatewayClient::connect(sim.gateway_url()).await;
    later.hello().await;
    later.identify(&token, 0, 2, Intents::GUILDS).await;
    assert_eq!(
        later.wait_close_code().await,
        Some(4004),
        "the reset token must fail IDENTIFY"
    );

    let mut resume = GatewayClient::connect(sim.resume_url()).await;
    resume.hello().await;
    resume.resume(&token, &ready.session_id, 1).await;
    assert_eq!(
        resume.wait_close_code().await,
        Some(4004),
        "the reset token must fail RESUME"
    );

    let (status, _) = get_gateway_bot(&sim, Some(&common::bot_authorization(&sim))).await;
    assert_eq!(status, 401, "GET /gateway/bot with the reset token");
    sim.shutdown().await;
}

#[tokio::test]
async fn send_limit_exceeded_closes_4008() {
    let config = SimConfig {
        send_limit: 5,
        send_limit_window: Duration::from_secs(2),
        ..test_config()
    };
    let sim = start(config).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    for _ in 0..6 {
        client.heartbeat().await;
    }
    let mut acks = 0;
    let code = loop {
        match client.recv().await {
            Received::Payload {
                payload: ServerPayload::HeartbeatAck,
                ..
            } => acks += 1,
            Received::Payload { payload, .. } => panic!("unexpected payload {payload:?}"),
            Received::Close(code) => break code,
            Received::Dropped => panic!("connection dropped without a close frame"),
        }
    };

    assert_eq!(
        code,
        Some(4008),
        "the sixth send within the window of a limit of 5"
    );
    assert_eq!(acks, 5, "the five sends within the limit are answered");
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::SendRateExceeded),
        1,
        "the exceeded limit must be a violation: {:?}",
        report.violations
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn send_limit_window_slides() {
    let window = Duration::from_millis(300);
    let config = SimConfig {
        send_limit: 5,
        send_limit_window: window,
        ..test_config()
    };
    let sim = start(config).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    // Exactly the limit in each of two windows.
    for round in 0..2 {
        for beat in 0..5 {
            client.heartbeat().await;
            match client.recv().await {
                Received::Payload {
                    payload: ServerPayload::HeartbeatAck,
                    ..
                } => {}
                other => panic!("round {round}, send {beat}: got {other:?} instead of op 11"),
            }
        }
        tokio::time::sleep(window + Duration::from_millis(20)).await;
    }

    let report = wait_for_report(&sim, "10 sends on connection 1", |report| {
        report
            .connections
            .first()
            .is_some_and(|record| record.sends == 10)
    })
    .await;
    assert_eq!(
        report.violation_count(ViolationKind::SendRateExceeded),
        0,
        "sends within the limit per window are no violation: {:?}",
        report.violations
    );
    assert!(
        report.connections[0].end.is_none(),
        "the connection stays open: {:?}",
        report.connections[0]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn send_limit_close_keeps_session() {
    let config = SimConfig {
        send_limit: 3,
        send_limit_window: Duration::from_secs(2),
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    let (_, ready) = client.wait_ready().await;

    for _ in 0..3 {
        client.heartbeat().await;
    }
    assert_eq!(
        client.wait_close_code().await,
        Some(4008),
        "the fourth send of a limit of 3"
    );

    // 4008 is a reconnect code: the session stays resumable.
    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    resumed.hello().await;
    resumed
        .resume(&token, &ready.session_id, client.last_seq.unwrap_or(0))
        .await;
    resumed.wait_dispatch("RESUMED").await;
    sim.shutdown().await;
}
