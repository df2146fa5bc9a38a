//! The simulator's HTTP API, HELLO, heartbeats, IDENTIFY validation, READY and the GUILD_CREATE
//! stream.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actors::gateway::{ClientPayload, Intents, ServerPayload, Token, MAX_CLIENT_PAYLOAD_BYTES};
use common::{
    get_gateway_bot, identify_payload, shard_of, start, test_config, wait_for_report,
    GatewayClient, Received,
};
use shardvisor::sim::{SimConfig, Simulator, ViolationKind};

#[tokio::test]
async fn gateway_bot_reports_url_and_limits() {
    let config = SimConfig {
        shards: 4,
        max_concurrency: 2,
        session_start_total: 1000,
        session_start_remaining: 900,
        ..test_config()
    };
    let sim = start(config).await;

    let (status, body) = get_gateway_bot(&sim, Some(&common::bot_authorization(&sim))).await;

    assert_eq!(status, 200, "GET /gateway/bot with the bot token: {body}");
    assert_eq!(
        body["url"],
        sim.gateway_url(),
        "url must be the gateway URL"
    );
    assert_eq!(
        body["shards"], 4,
        "shards must be the configured shard count"
    );
    let limit = &body["session_start_limit"];
    assert_eq!(limit["total"], 1000, "session_start_limit.total");
    assert_eq!(limit["remaining"], 900, "session_start_limit.remaining");
    assert_eq!(
        limit["max_concurrency"], 2,
        "session_start_limit.max_concurrency"
    );
    let reset_after = limit["reset_after"]
        .as_u64()
        .expect("session_start_limit.reset_after is an integer of milliseconds");
    assert!(
        reset_after > 0 && reset_after <= 24 * 60 * 60 * 1000,
        "reset_after {reset_after} ms must be within the 24 h reset period"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn gateway_bot_rejects_missing_token() {
    let sim = start(test_config()).await;

    let (status, body) = get_gateway_bot(&sim, None).await;

    assert_eq!(
        status, 401,
        "GET /gateway/bot without Authorization: {body}"
    );
    assert!(
        body.get("url").is_none(),
        "a 401 must not leak the gateway URL: {body}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn gateway_bot_rejects_wrong_token() {
    let sim = start(test_config()).await;
    let token = sim.config().token.expose().to_owned();

    let cases = [
        "Bot wrong-token".to_owned(),
        format!("Bearer {token}"),
        token.clone(),
    ];
    for authorization in cases {
        let (status, _) = get_gateway_bot(&sim, Some(&authorization)).await;
        assert_eq!(
            status, 401,
            "Authorization {authorization:?} must be rejected"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn hello_carries_configured_interval() {
    let config = SimConfig {
        heartbeat_interval: Duration::from_millis(1234),
        heartbeat_timeout: Duration::from_secs(5),
        ..test_config()
    };
    let sim = start(config).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;

    let hello = client.hello().await;

    assert_eq!(
        hello.heartbeat_interval, 1234,
        "HELLO heartbeat_interval in ms"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn heartbeat_is_acknowledged() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    client.heartbeat().await;
    let before_identify = client.next_payload().await;
    assert!(
        matches!(before_identify, ServerPayload::HeartbeatAck),
        "a heartbeat before IDENTIFY must get op 11, got {before_identify:?}"
    );

    client.identify(&token, 0, 1, Intents::GUILDS).await;
    client.wait_ready().await;
    client.heartbeat().await;
    client
        .wait_payload("op 11 after a heartbeat in a session", |payload| {
            matches!(payload, ServerPayload::HeartbeatAck)
        })
        .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn heartbeat_timeout_closes_4009() {
    let timeout = Duration::from_millis(400);
    let config = SimConfig {
        heartbeat_interval: Duration::from_millis(100),
        heartbeat_timeout: timeout,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let started = Instant::now();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    let (_, ready) = client.wait_ready().await;

    let code = client.wait_close_code().await;
    let elapsed = started.elapsed();

    assert_eq!(code, Some(4009), "a silent client must be closed with 4009");
    assert!(
        elapsed >= timeout,
        "closed after {elapsed:?}, before the {timeout:?} heartbeat timeout"
    );
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::HeartbeatTimeout),
        1,
        "the timeout must be recorded as a violation: {:?}",
        report.violations
    );
    assert!(
        !report.sessions[&ready.session_id].resumable,
        "a session closed with 4009 must not be resumable"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn heartbeats_keep_connection_open() {
    let interval = Duration::from_millis(100);
    let config = SimConfig {
        heartbeat_interval: interval,
        heartbeat_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let sim = start(config).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    // Nine beats span three timeouts, so a deadline that heartbeats do not extend closes it.
    for beat in 0..9 {
        client.heartbeat().await;
        match client.recv().await {
            Received::Payload {
                payload: ServerPayload::HeartbeatAck,
                ..
            } => {}
            other => panic!("heartbeat {beat} got {other:?} instead of op 11"),
        }
        tokio::time::sleep(interval).await;
    }

    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::HeartbeatTimeout),
        0,
        "a client that heartbeats on time must not time out"
    );
    sim.shutdown().await;
}

/// Sends `payload` after HELLO on a fresh connection and returns the close code.
async fn close_code_after(sim: &Simulator, payload: String) -> Option<u16> {
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.send_text(payload).await;
    client.wait_close_code().await
}

/// Asserts that exactly one violation of `kind` was recorded.
async fn assert_one_violation(sim: &Simulator, kind: ViolationKind) {
    let report = wait_for_report(sim, "a violation", |report| {
        report.violation_count(kind) > 0
    })
    .await;
    assert_eq!(
        report.violation_count(kind),
        1,
        "expected one {kind:?} violation: {:?}",
        report.violations
    );
}

#[tokio::test]
async fn identify_wrong_token_closes_4004() {
    let sim = start(test_config()).await;
    let payload = identify_payload(&Token::new("wrong-token"), Some([0, 1]), Intents::GUILDS.0);

    let code = close_code_after(&sim, payload.encode()).await;

    assert_eq!(code, Some(4004), "IDENTIFY with a wrong token");
    assert_one_violation(&sim, ViolationKind::AuthenticationFailed).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_invalid_shard_closes_4010() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();

    // Shard id equal to the count, and a count that is not the bot's.
    for shard in [[2, 2], [5, 2], [0, 3], [0, 1]] {
        let payload = identify_payload(&token, Some(shard), Intents::GUILDS.0);
        let code = close_code_after(&sim, payload.encode()).await;
        assert_eq!(
            code,
            Some(4010),
            "IDENTIFY with shard {shard:?} for a bot of 2 shards"
        );
    }
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::InvalidShard),
        4,
        "every invalid shard must be a violation: {:?}",
        report.violations
    );
    assert_eq!(
        report.accepted_identifies(),
        0,
        "no invalid IDENTIFY may start a session"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_without_shard_closes_4011() {
    let config = SimConfig {
        shards: 2,
        max_concurrency: 2,
        ..test_config()
    };
    let sim = start(config).await;
    let payload = identify_payload(&sim.config().token, None, Intents::GUILDS.0);

    let code = close_code_after(&sim, payload.encode()).await;

    assert_eq!(
        code,
        Some(4011),
        "IDENTIFY without shard while the bot needs 2 shards"
    );
    assert_one_violation(&sim, ViolationKind::InvalidShard).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_without_shard_single_ok() {
    let sim = start(test_config()).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    client
        .send(&identify_payload(
            &sim.config().token,
            None,
            Intents::GUILDS.0,
        ))
        .await;
    let (_, ready) = client.wait_ready().await;

    assert_eq!(
        ready.shard,
        Some([0, 1]),
        "an unsharded bot is shard [0, 1]"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_unknown_intent_closes_4013() {
    let sim = start(test_config()).await;
    let intents = Intents::GUILDS.0 | (1 << 30);
    let payload = identify_payload(&sim.config().token, Some([0, 1]), intents);

    let code = close_code_after(&sim, payload.encode()).await;

    assert_eq!(
        code,
        Some(4013),
        "IDENTIFY with the undefined intent bit 1 << 30"
    );
    assert_one_violation(&sim, ViolationKind::InvalidIntents).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_disallowed_intent_closes_4014() {
    let config = SimConfig {
        privileged_intents: Intents(0),
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();

    for privileged in [
        Intents::GUILD_MEMBERS,
        Intents::GUILD_PRESENCES,
        Intents::MESSAGE_CONTENT,
    ] {
        let intents = Intents::GUILDS | privileged;
        let code = close_code_after(
            &sim,
            identify_payload(&token, Some([0, 1]), intents.0).encode(),
        )
        .await;
        assert_eq!(
            code,
            Some(4014),
            "privileged intent {privileged:?} not enabled"
        );
    }
    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::DisallowedIntents),
        3,
        "every disallowed intent must be a violation"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn identify_enabled_privileged_intent_ok() {
    let config = SimConfig {
        privileged_intents: Intents::GUILD_MEMBERS,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    client
        .identify(&token, 0, 1, Intents::GUILDS | Intents::GUILD_MEMBERS)
        .await;
    client.wait_ready().await;

    let presences = Intents::GUILDS | Intents::GUILD_PRESENCES;
    let code = close_code_after(
        &sim,
        identify_payload(&token, Some([0, 1]), presences.0).encode(),
    )
    .await;
    assert_eq!(
        code,
        Some(4014),
        "GUILD_PRESENCES is not among the enabled intents"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn second_identify_closes_4005() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::GUILDS).await;
    client.wait_ready().await;

    client.identify(&token, 0, 1, Intents::GUILDS).await;
    let code = client.wait_close_code().await;

    assert_eq!(
        code,
        Some(4005),
        "a second IDENTIFY on an identified connection"
    );
    assert_one_violation(&sim, ViolationKind::AlreadyAuthenticated).await;
    sim.shutdown().await;
}

/// Returns a heartbeat padded with JSON whitespace to exactly `bytes` bytes: valid in every way
/// but its size.
fn padded_heartbeat(bytes: usize) -> String {
    let heartbeat = r#"{"op":1,"d":null}"#;
    format!("{heartbeat}{}", " ".repeat(bytes - heartbeat.len()))
}

#[tokio::test]
async fn oversized_payload_closes_4002() {
    let sim = start(test_config()).await;

    let code = close_code_after(&sim, padded_heartbeat(MAX_CLIENT_PAYLOAD_BYTES + 1)).await;

    assert_eq!(code, Some(4002), "a payload of 4097 bytes");
    assert_one_violation(&sim, ViolationKind::PayloadTooLarge).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn payload_at_limit_is_accepted() {
    let sim = start(test_config()).await;
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    client
        .send_text(padded_heartbeat(MAX_CLIENT_PAYLOAD_BYTES))
        .await;
    let answer = client.next_payload().await;

    assert!(
        matches!(answer, ServerPayload::HeartbeatAck),
        "a heartbeat of exactly 4096 bytes must be acknowledged, got {answer:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn invalid_json_closes_4002() {
    let sim = start(test_config()).await;

    let code = close_code_after(&sim, r#"{"op":2,"d":{"token":"#.to_owned()).await;

    assert_eq!(code, Some(4002), "a payload that is not JSON");
    assert_one_violation(&sim, ViolationKind::DecodeError).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn large_threshold_out_of_range_closes_4002() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();

    for large_threshold in [49, 251] {
        let mut payload = identify_payload(&token, Some([0, 1]), Intents::GUILDS.0);
        if let ClientPayload::Identify(identify) = &mut payload {
            identify.large_threshold = Some(large_threshold);
        }
        let code = close_code_after(&sim, payload.encode()).await;
        assert_eq!(
            code,
            Some(4002),
            "large_threshold {large_threshold} is outside 50 to 250"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_opcode_closes_4001() {
    let sim = start(test_config()).await;

    // Discord: 4001 for an invalid opcode, 4002 for a payload it cannot decode. Op 11 is valid
    // only from the gateway.
    for op in [5, 11, 99] {
        let code = close_code_after(&sim, format!(r#"{{"op":{op},"d":null}}"#)).await;
        assert_eq!(code, Some(4001), "a client payload with opcode {op}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn command_before_identify_closes_4003() {
    let sim = start(test_config()).await;

    let cases = [
        r#"{"op":8,"d":{"guild_id":"1","query":"","limit":0}}"#,
        r#"{"op":3,"d":{"since":null,"activities":[],"status":"online","afk":false}}"#,
    ];
    for payload in cases {
        let code = close_code_after(&sim, payload.to_owned()).await;
        assert_eq!(code, Some(4003), "{payload} before IDENTIFY");
    }
    assert_eq!(
        sim.report()
            .violation_count(ViolationKind::NotAuthenticated),
        2,
        "every command before IDENTIFY must be a violation"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn api_version_9_closes_4012() {
    let sim = start(test_config()).await;
    let mut client = GatewayClient::connect_query(sim.gateway_url(), "v=9&encoding=json").await;

    let code = client.wait_close_code().await;

    assert_eq!(code, Some(4012), "connecting with v=9");
    assert_one_violation(&sim, ViolationKind::InvalidConnectParameters).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn ready_lists_shard_guilds() {
    let config = SimConfig {
        shards: 3,
        max_concurrency: 3,
        world: shardvisor::sim::world::WorldConfig {
            guilds: 60,
            ..test_config().world
        },
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;

    client.identify(&token, 1, 3, Intents::GUILDS).await;
    let (dispatch, ready) = client.wait_ready().await;

    assert_eq!(
        dispatch.seq, 1,
        "READY must be the first dispatch of a session"
    );
    assert!(!ready.session_id.is_empty(), "READY session_id must be set");
    assert_eq!(
        ready.resume_gateway_url,
        sim.resume_url(),
        "resume_gateway_url must be the resume address"
    );
    assert_eq!(ready.version, 10, "READY v");
    assert_eq!(ready.shard, Some([1, 3]), "READY shard");
    for guild in &ready.guilds {
        assert!(
            guild.unavailable,
            "guild {} must start unavailable",
            guild.id
        );
    }
    let mut listed: Vec<u64> = ready.guilds.iter().map(|guild| guild.id.get()).collect();
    listed.sort_unstable();
    let expected: Vec<u64> = sim.guild_ids(1).iter().map(|id| id.get()).collect();
    assert!(
        !expected.is_empty(),
        "shard 1 of 60 guilds over 3 shards has guilds"
    );
    assert_eq!(listed, expected, "READY guilds must be the shard's guilds");
    sim.shutdown().await;
}

#[tokio::test]
async fn guild_create_once_per_guild() {
    let shards = 3;
    let config = SimConfig {
        shards,
        max_concurrency: shards,
        world: shardvisor::sim::world::WorldConfig {
            guilds: 60,
            ..test_config().world
        },
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();

    for shard in 0..shards {
        let mut client = GatewayClient::connect(sim.gateway_url()).await;
        let (ready, guild_creates) = client
            .start_session(&token, shard, shards, Intents::GUILDS)
            .await;
        let extra = client.collect_until_quiet(Duration::from_millis(300)).await;

        let expected: HashSet<u64> = sim.guild_ids(shard).iter().map(|id| id.get()).collect();
        let mut seen = HashSet::new();
        for dispatch in &guild_creates {
            let id = common::data_field_u64(dispatch, "id").expect("GUILD_CREATE has an id");
            assert!(seen.insert(id), "shard {shard}: guild {id} sent twice");
            assert_eq!(
                shard_of(id, shards),
                shard,
                "guild {id} routes to another shard"
            );
        }
        assert_eq!(
            seen, expected,
            "shard {shard}: one GUILD_CREATE per READY guild"
        );
        assert_eq!(
            ready.guilds.len(),
            expected.len(),
            "shard {shard}: READY guild count"
        );
        for id in &expected {
            assert_eq!(
                shard_of(*id, shards),
                shard,
                "sim.guild_ids({shard}) lists guild {id}"
            );
        }
        let late: Vec<&str> = extra
            .iter()
            .map(|dispatch| dispatch.event.as_str())
            .collect();
        assert!(
            late.is_empty(),
            "shard {shard}: dispatches after the last GUILD_CREATE: {late:?}"
        );
    }
    sim.shutdown().await;
}
