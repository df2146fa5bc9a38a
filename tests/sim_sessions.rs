//! Sessions: RESUME at the resume address, replay of missed events, the ways a session stops
//! being resumable, session expiry and a refusing resume address.

mod common;

use std::time::{Duration, Instant};

use actors::gateway::{Intents, ServerPayload, Token};
use common::{start, test_config, wait_for_report, End, GatewayClient, Received};
use shardvisor::sim::{Fault, SimConfig, Simulator, Target, ViolationKind};

/// Identifies shard 0 of 1 on a new connection and returns the client and the session id.
async fn identified(sim: &Simulator) -> (GatewayClient, String) {
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    client.hello().await;
    client.identify(&token, 0, 1, Intents::ALL).await;
    let (_, ready) = client.wait_ready().await;
    (client, ready.session_id)
}

/// Sends RESUME on a new connection to the resume address and returns the first reply.
async fn resume_answer(sim: &Simulator, session_id: &str, seq: u64) -> (GatewayClient, Received) {
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.resume_url()).await;
    client.hello().await;
    client.resume(&token, session_id, seq).await;
    let answer = client.recv().await;
    (client, answer)
}

/// Asserts that the simulator rejects a RESUME of the session with op 9 `false`.
async fn assert_resume_invalid(sim: &Simulator, session_id: &str, seq: u64, context: &str) {
    let (_, answer) = resume_answer(sim, session_id, seq).await;
    assert!(
        matches!(
            answer,
            Received::Payload {
                payload: ServerPayload::InvalidSession { resumable: false },
                ..
            }
        ),
        "RESUME {context} must get op 9 false, got {answer:?}"
    );
}

/// Asserts that the simulator accepts a RESUME of the session and sends RESUMED.
async fn assert_resume_accepted(sim: &Simulator, session_id: &str, seq: u64, context: &str) {
    let (mut client, answer) = resume_answer(sim, session_id, seq).await;
    match answer {
        Received::Payload {
            payload: ServerPayload::Dispatch(dispatch),
            ..
        } => {
            // Missed events come first; RESUMED ends the replay.
            if dispatch.event != "RESUMED" {
                client.wait_dispatch("RESUMED").await;
            }
        }
        other => panic!("RESUME {context} must be accepted, got {other:?}"),
    }
}

/// Waits until the simulator recorded the end of the connection with this id.
async fn wait_connection_end(sim: &Simulator, connection: u64) {
    wait_for_report(sim, "the end of the connection", |report| {
        report
            .connection(connection)
            .is_some_and(|record| record.end.is_some())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_missed_events() {
    let config = SimConfig {
        dispatch_rate: 50.0,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    let (ready, guild_creates) = client.start_session(&token, 0, 1, Intents::ALL).await;
    let session_id = ready.session_id.clone();
    let first_traffic = guild_creates.len() as u64 + 2;
    client
        .collect_until("three traffic events", |dispatch| {
            dispatch.seq >= first_traffic + 2
        })
        .await;

    assert_eq!(
        sim.inject(Target::All, Fault::Drop),
        1,
        "Drop hits the one connection"
    );
    assert_eq!(
        client.wait_end().await,
        End::Dropped,
        "Drop sends no close frame"
    );
    let last_seen = client.last_seq.expect("dispatches were received");
    wait_for_report(&sim, "five events missed by the client", |report| {
        report.sessions[&session_id].last_seq >= last_seen + 5
    })
    .await;

    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    resumed.hello().await;
    resumed.resume(&token, &session_id, last_seen).await;
    let replay = resumed
        .collect_until("RESUMED", |dispatch| dispatch.event == "RESUMED")
        .await;
    let after = resumed
        .collect_until("five events after RESUMED", |dispatch| {
            dispatch.seq >= replay.last().map_or(0, |last| last.seq) + 5
        })
        .await;

    let replayed = &replay[..replay.len() - 1];
    assert!(
        replayed.len() >= 5,
        "at least the five missed events are replayed"
    );
    for (offset, dispatch) in replayed.iter().enumerate() {
        assert_eq!(
            dispatch.seq,
            last_seen + 1 + offset as u64,
            "replayed event {offset} ({}) out of order or with a gap",
            dispatch.event
        );
    }
    let resumed_seq = replay.last().map(|dispatch| dispatch.seq);
    assert_eq!(
        resumed_seq,
        Some(last_seen + 1 + replayed.len() as u64),
        "RESUMED follows the replay with the next sequence"
    );
    for (offset, dispatch) in after.iter().enumerate() {
        assert_eq!(
            Some(dispatch.seq),
            resumed_seq.map(|seq| seq + 1 + offset as u64),
            "live event {offset} after RESUMED ({}) out of sequence",
            dispatch.event
        );
    }
    let record = sim.report().sessions[&session_id].clone();
    assert_eq!(record.resumes, 1, "one RESUME recorded");
    assert_eq!(
        record.replayed,
        replayed.len() as u64,
        "only the missed events come before RESUMED, and all of them are replayed"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_unknown_session_invalid() {
    let sim = start(test_config()).await;

    assert_resume_invalid(
        &sim,
        "0123456789abcdef0123456789abcdef",
        0,
        "of an unknown session",
    )
    .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_wrong_token_closes_4004() {
    let sim = start(test_config()).await;
    let (client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);

    let mut resume = GatewayClient::connect(sim.resume_url()).await;
    resume.hello().await;
    resume
        .resume(&Token::new("wrong-token"), &session_id, seq)
        .await;

    assert_eq!(
        resume.wait_close_code().await,
        Some(4004),
        "RESUME with a wrong token"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn expire_sessions_fault_invalidates() {
    let sim = start(test_config()).await;
    let (mut client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);

    assert_eq!(
        sim.inject(Target::All, Fault::ExpireSessions),
        1,
        "one session expired"
    );
    assert_resume_invalid(&sim, &session_id, seq, "of an expired session").await;

    client.heartbeat().await;
    client
        .wait_payload(
            "op 11 on the connection of the expired session",
            |payload| matches!(payload, ServerPayload::HeartbeatAck),
        )
        .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_seq_ahead_closes_4007() {
    let sim = start(test_config()).await;
    let (client, session_id) = identified(&sim).await;
    let ahead = client.last_seq.unwrap_or(0) + 1000;

    let (mut resume, answer) = resume_answer(&sim, &session_id, ahead).await;
    let code = match answer {
        Received::Close(code) => code,
        Received::Payload { .. } => resume.wait_close_code().await,
        Received::Dropped => panic!("connection dropped without a close frame"),
    };

    assert_eq!(
        code,
        Some(4007),
        "RESUME with a sequence the session never reached"
    );
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::InvalidResumeSequence),
        1,
        "the sequence ahead must be a violation: {:?}",
        report.violations
    );
    assert!(
        !report.sessions[&session_id].resumable,
        "a session closed with 4007 must not be resumable"
    );
    assert_resume_invalid(&sim, &session_id, 1, "after 4007").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_beyond_buffer_invalid() {
    let config = SimConfig {
        resume_buffer: 5,
        ..test_config()
    };
    let sim = start(config).await;
    let token = sim.config().token.clone();
    let mut client = GatewayClient::connect(sim.gateway_url()).await;
    let (ready, guild_creates) = client.start_session(&token, 0, 1, Intents::GUILDS).await;
    assert!(
        guild_creates.len() > 5,
        "the test needs more dispatches than the buffer holds"
    );
    client.close(4900).await;

    assert_resume_invalid(&sim, &ready.session_id, 0, "from before the replay buffer").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn client_close_1000_ends_session() {
    let config = SimConfig {
        identify_window: Duration::from_millis(100),
        ..test_config()
    };
    let sim = start(config).await;

    for code in [1000, 1001] {
        let (mut client, session_id) = identified(&sim).await;
        let seq = client.last_seq.unwrap_or(0);
        let connection = sim.report().connections.len() as u64;

        client.close(code).await;
        wait_connection_end(&sim, connection).await;

        assert!(
            !sim.report().sessions[&session_id].resumable,
            "a client close with {code} must end the session"
        );
        assert_resume_invalid(
            &sim,
            &session_id,
            seq,
            &format!("after a client close {code}"),
        )
        .await;
        // The next IDENTIFY must wait out the bucket's window.
        tokio::time::sleep(sim.config().identify_window).await;
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn client_close_4900_keeps_session() {
    let sim = start(test_config()).await;
    let (mut client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);
    let connection = sim.report().connections.len() as u64;

    client.close(4900).await;
    wait_connection_end(&sim, connection).await;

    assert!(
        sim.report().sessions[&session_id].resumable,
        "a client close with 4900 must keep the session resumable"
    );
    assert_resume_accepted(&sim, &session_id, seq, "after a client close 4900").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn server_close_4009_4007_invalidates() {
    let config = SimConfig {
        identify_window: Duration::from_millis(100),
        ..test_config()
    };
    let sim = start(config).await;

    for code in [4009, 4007] {
        let (mut client, session_id) = identified(&sim).await;
        let seq = client.last_seq.unwrap_or(0);

        assert_eq!(
            sim.inject(Target::All, Fault::Close { code }),
            1,
            "Close hits one connection"
        );
        assert_eq!(
            client.wait_close_code().await,
            Some(code),
            "the injected close code"
        );

        assert_resume_invalid(
            &sim,
            &session_id,
            seq,
            &format!("after a server close {code}"),
        )
        .await;
        tokio::time::sleep(sim.config().identify_window).await;
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn refuse_resume_address_blocks_connects() {
    let sim = start(test_config()).await;
    let (client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);

    assert_eq!(
        sim.inject(Target::All, Fault::RefuseResumeAddress { refuse: true }),
        1,
        "the refusing fault applies"
    );
    let connect_result =
        GatewayClient::try_connect_query(sim.resume_url(), "v=10&encoding=json").await;
    assert!(
        connect_result.is_err(),
        "a connect to the refusing resume address must fail"
    );
    let mut main = GatewayClient::connect(sim.gateway_url()).await;
    main.hello().await;

    assert_eq!(
        sim.inject(Target::All, Fault::RefuseResumeAddress { refuse: false }),
        1,
        "the resume address listens again"
    );
    assert_resume_accepted(&sim, &session_id, seq, "at the reopened resume address").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn refuse_then_accept_at_once() {
    let sim = start(test_config()).await;

    // Back to back, as a scenario that closes the address for an instant issues them. On a
    // current-thread runtime the listener task cannot run between the two calls.
    sim.inject(Target::All, Fault::RefuseResumeAddress { refuse: true });
    let reopened = sim.inject(Target::All, Fault::RefuseResumeAddress { refuse: false });

    assert_eq!(
        reopened, 1,
        "the resume address must listen again right after refusing"
    );
    let mut client = GatewayClient::connect(sim.resume_url()).await;
    client.hello().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn session_expires_after_expiry() {
    let expiry = Duration::from_millis(300);
    let config = SimConfig {
        session_expiry: expiry,
        ..test_config()
    };
    let sim = start(config).await;
    let (mut client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);

    let closed = Instant::now();
    client.close(4900).await;
    wait_for_report(&sim, "the session expired", |report| {
        !report.sessions[&session_id].resumable
    })
    .await;
    let elapsed = closed.elapsed();

    assert!(
        elapsed >= expiry,
        "the session expired {elapsed:?} after its connection ended, before {expiry:?}"
    );
    assert_resume_invalid(&sim, &session_id, seq, "of an expired session").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn live_session_never_expires() {
    let expiry = Duration::from_millis(150);
    let config = SimConfig {
        session_expiry: expiry,
        ..test_config()
    };
    let sim = start(config).await;
    let (mut client, session_id) = identified(&sim).await;

    tokio::time::sleep(expiry * 4).await;
    client.heartbeat().await;
    client
        .wait_payload("op 11", |payload| {
            matches!(payload, ServerPayload::HeartbeatAck)
        })
        .await;

    assert!(
        sim.report().sessions[&session_id].resumable,
        "a session with a live connection must not expire"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn resumed_data_is_object() {
    let sim = start(test_config()).await;
    let token = sim.config().token.clone();
    let (mut client, session_id) = identified(&sim).await;
    let seq = client.last_seq.unwrap_or(0);
    client.close(4900).await;

    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    resumed.hello().await;
    resumed.resume(&token, &session_id, seq).await;
    let dispatch = resumed.wait_dispatch("RESUMED").await;

    // Discord's gateway sends RESUMED with an object as `d`, such as `{"_trace": [...]}`. The
    // payload captured in twilight-model 0.18's `deserialize_dispatch_resumed` test has one.
    assert!(
        common::data_json(&dispatch).is_object(),
        "RESUMED d must be an object, got {}",
        dispatch.data
    );
    sim.shutdown().await;
}
