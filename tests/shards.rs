//! The actor tree against the simulator: a mass connect within the identify limits, resume after
//! a dropped connection, a new session after op 9, a fatal close, zombie detection, and a restart
//! while the bucket's pacing timer is pending, and a member request deferred past the member
//! request window.

use std::collections::BTreeMap;
use std::time::Duration;

use actors::names;
use actors::shard::{MemberRequestReason, ShardMsg, ShardStage, ShardStatus};
use actors::supervisor::SupervisorMsg;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use shardvisor::config::{Config, Overrides};
use shardvisor::run::Service;
use shardvisor::sim::report::ConnectionEnd;
use shardvisor::sim::{Fault, Report, Target, ViolationKind};

/// Discord's all-members request window, scaled down for the simulator and the shards alike.
const MEMBER_WINDOW_MS: u64 = 1500;

/// Settings scaled down from Discord's: a 300 ms identify window, short holds, small guilds.
fn config(name: &str, shards: u32, buckets: u32, extra: &str) -> Config {
    let file = format!(
        r#"
        [process]
        shards = {shards}
        [identify]
        pacing = "300ms"
        grace = "50ms"
        [stabilize]
        hold = "100ms"
        max_hold = "1s"
        [gateway]
        guild_timeout = "5s"
        invalid_session_wait = "200ms"
        reconnect_backoff_base = "50ms"
        reconnect_backoff_max = "500ms"
        member_request_window = "{MEMBER_WINDOW_MS}ms"
        [sweep]
        enabled = false
        [simulator]
        max_concurrency = {buckets}
        guilds = {guilds}
        largest_guild = 400
        identify_window = "300ms"
        dispatch_rate = 20.0
        member_request_window = "{MEMBER_WINDOW_MS}ms"
        {extra}
        "#,
        guilds = shards * 6,
    );
    let overrides = Overrides {
        name: Some(name.to_owned()),
        ..Overrides::default()
    };
    Config::from_sources(Some(("test", &file)), &BTreeMap::new(), &overrides)
        .unwrap_or_else(|errors| panic!("test configuration invalid:\n{errors}"))
}

async fn start(config: Config) -> Service {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let service = Service::start(config).await.expect("service starts");
    let summary = tokio::time::timeout(Duration::from_secs(60), service.wait_until_stable())
        .await
        .expect("shards became steady within 60 s");
    assert_eq!(
        summary.ready, summary.shards,
        "not every shard is steady: {summary:?}"
    );
    service
}

fn report(service: &Service) -> Report {
    service
        .simulator
        .as_ref()
        .expect("embedded simulator")
        .report()
}

fn inject(service: &Service, shard: u32, fault: Fault) {
    let hit = service
        .simulator
        .as_ref()
        .expect("embedded simulator")
        .inject(Target::Shard(shard), fault);
    assert!(hit > 0, "the fault hit no connection of shard {shard}");
}

async fn status(service: &Service, shard: u32) -> ShardStatus {
    let name = names::shard(&service.config.process.name, shard);
    let actor: ActorRef<ShardMsg> = names::lookup(&name).expect("shard actor registered");
    match actor
        .call(ShardMsg::Status, Some(Duration::from_secs(5)))
        .await
    {
        Ok(CallResult::Success(status)) => status,
        _ => panic!("shard {shard} did not answer its status"),
    }
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn identifies_of(report: &Report, shard: u32) -> usize {
    report
        .identifies
        .values()
        .flatten()
        .filter(|record| record.shard == shard && record.accepted)
        .count()
}

fn resumes_of(report: &Report, shard: u32) -> u64 {
    report
        .sessions
        .values()
        .filter(|session| session.shard == shard)
        .map(|session| session.resumes)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_connect_has_no_violations() {
    let service = start(config("mass-connect", 48, 16, "")).await;
    let report = report(&service);

    assert_eq!(report.violation_count(ViolationKind::IdentifyTooFast), 0);
    assert!(
        report.violations.is_empty(),
        "violations: {:?}",
        report.violations
    );
    assert_eq!(report.accepted_identifies(), 48, "one IDENTIFY per shard");
    for (bucket, identifies) in &report.identifies {
        assert_eq!(
            identifies.len(),
            3,
            "bucket {bucket} identified {} times",
            identifies.len()
        );
        for pair in identifies.windows(2) {
            let gap = pair[1].at_ms - pair[0].at_ms;
            assert!(gap >= 300, "bucket {bucket}: identifies {gap} ms apart");
        }
    }
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_resumes() {
    let service = start(config("dropped-connection", 4, 4, "")).await;
    let before = report(&service);
    inject(&service, 1, Fault::Drop);

    eventually(Duration::from_secs(10), "shard 1 resumed", || async {
        resumes_of(&report(&service), 1) == 1
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "shard 1 caught up with its session",
        || async {
            let report = report(&service);
            let session = report
                .sessions
                .values()
                .find(|s| s.shard == 1 && s.resumable)
                .cloned();
            let status = status(&service, 1).await;
            session.is_some_and(|session| status.seq == session.last_seq)
                && status.stage.is_steady()
        },
    )
    .await;

    let after = report(&service);
    let status = status(&service, 1).await;
    assert_eq!(status.missed_events, 0, "events lost across the resume");
    assert_eq!(
        identifies_of(&after, 1),
        identifies_of(&before, 1),
        "shard 1 identified again instead of resuming"
    );
    let replayed: u64 = after
        .sessions
        .values()
        .filter(|s| s.shard == 1)
        .map(|s| s.replayed)
        .sum();
    assert!(
        after
            .sessions
            .values()
            .any(|s| s.shard == 1 && s.resumes == 1),
        "no resume recorded"
    );
    assert!(replayed <= after.dispatches_sent);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_session_reidentifies() {
    let service = start(config("invalid-session", 2, 2, "")).await;
    let before = identifies_of(&report(&service), 0);
    inject(&service, 0, Fault::InvalidSession { resumable: false });

    eventually(
        Duration::from_secs(10),
        "shard 0 identified anew",
        || async { identifies_of(&report(&service), 0) == before + 1 },
    )
    .await;
    eventually(Duration::from_secs(10), "shard 0 steady again", || async {
        status(&service, 0).await.stage.is_steady()
    })
    .await;
    assert_eq!(
        resumes_of(&report(&service), 0),
        0,
        "a dropped session was resumed"
    );
    assert!(report(&service).violations.is_empty());
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_close_parks_shard() {
    let service = start(config("fatal-close", 3, 3, "")).await;
    let connections_before = report(&service).connections.len();
    inject(&service, 2, Fault::Close { code: 4004 });

    eventually(Duration::from_secs(5), "shard 2 fatal", || async {
        matches!(status(&service, 2).await.stage, ShardStage::Fatal { code } if code.0 == 4004)
    })
    .await;
    // Give a retry loop time to show itself: nothing may dial again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = report(&service);
    assert_eq!(
        report.connections.len(),
        connections_before,
        "the fatal shard dialed again"
    );
    assert!(
        status(&service, 0).await.stage.is_steady(),
        "shard 0 affected"
    );
    assert!(
        status(&service, 1).await.stage.is_steady(),
        "shard 1 affected"
    );
    let log = match service
        .supervisor
        .call(SupervisorMsg::RestartLog, None)
        .await
    {
        Ok(CallResult::Success(log)) => log,
        _ => panic!("restart log call failed"),
    };
    assert!(log.is_empty(), "a fatal shard was restarted: {log:?}");
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_detected_within_two_intervals() {
    let interval_ms = 400;
    let extra = format!("heartbeat_interval = \"{interval_ms}ms\"");
    let service = start(config("zombie", 1, 1, &extra)).await;
    let simulator = service.simulator.as_ref().unwrap();
    simulator.inject(Target::Shard(0), Fault::SilenceHeartbeats { silent: true });
    let silenced = std::time::Instant::now();

    eventually(
        Duration::from_secs(5),
        "the zombie connection was closed by the shard",
        || async {
            report(&service)
                .connections
                .iter()
                .any(|c| matches!(c.end, Some(ConnectionEnd::Client { code: Some(4900) })))
        },
    )
    .await;
    let detected = silenced.elapsed();
    simulator.inject(Target::Shard(0), Fault::SilenceHeartbeats { silent: false });

    // The first beat after the silence goes unanswered; the next one finds no ACK. With the
    // jittered first beat that is at most two intervals, plus scheduling slack.
    let limit = Duration::from_millis(2 * interval_ms + 300);
    assert!(
        detected <= limit,
        "zombie detected after {detected:?}, limit {limit:?}"
    );
    eventually(Duration::from_secs(5), "shard 0 resumed", || async {
        resumes_of(&report(&service), 0) >= 1
    })
    .await;
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_pacing_keeps_bucket() {
    // One bucket and a 1 s window: shard 0 identifies, is restarted at once with its session
    // expired, and its new incarnation must wait for the coordinator's own timer.
    let mut config = config("restart-pacing", 2, 1, "");
    config.identify.pacing = Duration::from_secs(1);
    config.simulator.identify_window = Duration::from_secs(1);
    let service = start(config).await;
    let simulator = service.simulator.as_ref().unwrap();

    simulator.inject(Target::Shard(0), Fault::ExpireSessions);
    simulator.inject(Target::Shard(1), Fault::ExpireSessions);
    simulator.inject(Target::Shard(1), Fault::InvalidSession { resumable: false });
    // Shard 1 identifies again and holds the bucket; restart shard 0 meanwhile.
    eventually(
        Duration::from_secs(5),
        "shard 1 identified again",
        || async { identifies_of(&report(&service), 1) == 2 },
    )
    .await;
    let restarted = service
        .supervisor
        .call(
            |reply| SupervisorMsg::RestartShard { shard: 0, reply },
            None,
        )
        .await;
    assert!(
        matches!(restarted, Ok(CallResult::Success(Ok(())))),
        "restart refused"
    );

    eventually(
        Duration::from_secs(10),
        "shard 0 identified after its restart",
        || async { identifies_of(&report(&service), 0) == 2 },
    )
    .await;
    let report = report(&service);
    assert_eq!(
        report.violation_count(ViolationKind::IdentifyTooFast),
        0,
        "{:?}",
        report.violations
    );
    let identifies = &report.identifies[&0];
    for pair in identifies.windows(2) {
        assert!(
            pair[1].at_ms - pair[0].at_ms >= 1000,
            "bucket reused after {} ms",
            pair[1].at_ms - pair[0].at_ms
        );
    }
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_given_up_after_restart_limit() {
    let extra = "";
    let mut config = config("restart-limit", 2, 2, extra);
    config.supervision.shard_max_restarts = 2;
    config.supervision.backoff_base = Duration::from_millis(20);
    config.supervision.backoff_max = Duration::from_millis(50);
    let service = start(config).await;

    for round in 1..=3 {
        eventually(Duration::from_secs(10), "shard 0 running again", || async {
            let stages = match service.supervisor.call(SupervisorMsg::Stages, None).await {
                Ok(CallResult::Success(stages)) => stages,
                _ => return false,
            };
            let name = names::shard(&service.config.process.name, 0);
            stages
                .iter()
                .any(|(shard, _, restarts)| *shard == 0 && *restarts == round - 1)
                && names::lookup::<ShardMsg>(&name).is_some()
        })
        .await;
        let restarted = service
            .supervisor
            .call(
                |reply| SupervisorMsg::RestartShard { shard: 0, reply },
                None,
            )
            .await;
        assert!(
            matches!(restarted, Ok(CallResult::Success(Ok(())))),
            "restart {round} refused"
        );
    }

    eventually(Duration::from_secs(10), "shard 0 given up", || async {
        match service.supervisor.call(SupervisorMsg::Stages, None).await {
            Ok(CallResult::Success(stages)) => stages.iter().any(|(shard, stage, _)| {
                *shard == 0 && matches!(stage, ShardStage::GaveUp { restarts: 2 })
            }),
            _ => false,
        }
    })
    .await;
    let log = match service
        .supervisor
        .call(SupervisorMsg::RestartLog, None)
        .await
    {
        Ok(CallResult::Success(log)) => log,
        _ => panic!("restart log call failed"),
    };
    assert_eq!(log.len(), 2, "restart log: {log:?}");
    for (index, event) in log.iter().enumerate() {
        assert_eq!(event.actor, "shard");
        assert_eq!(event.shard, Some(0));
        assert_eq!(event.attempt, index as u32 + 1);
        assert!(
            event.reason.contains("operator"),
            "reason {:?}",
            event.reason
        );
        assert!(event.backoff <= Duration::from_millis(50));
    }
    assert!(
        status(&service, 1).await.stage.is_steady(),
        "shard 1 affected"
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_request_inside_window_deferred() {
    let service = start(config("deferred-members", 1, 1, "")).await;
    let simulator = service.simulator.as_ref().expect("embedded simulator");
    let guild = simulator.guild_ids(0)[0].get();
    // Every guild was cold, so READY's GUILD_CREATEs requested all of them.
    eventually(
        Duration::from_secs(10),
        "the cold guild's members arrived",
        || async { status(&service, 0).await.outstanding_member_requests == 0 },
    )
    .await;
    let requests = |report: &Report| {
        report
            .member_requests
            .get(&guild)
            .map_or(0, |record| record.all_members_requests)
    };
    assert_eq!(
        requests(&report(&service)),
        1,
        "the cold guild was requested once"
    );

    // Two more requests inside the window: one is deferred until the window has passed, the
    // other joins it.
    let actor: ActorRef<ShardMsg> =
        names::lookup(&names::shard(&service.config.process.name, 0)).expect("shard registered");
    for _ in 0..2 {
        actor
            .cast(ShardMsg::RequestMembers {
                guild_id: guild,
                reason: MemberRequestReason::Admin,
            })
            .expect("the shard takes messages");
    }
    eventually(
        Duration::from_secs(10),
        "the deferred request reached the gateway",
        || async { requests(&report(&service)) == 2 },
    )
    .await;
    // One more window: nothing else was sent, and nothing was refused.
    tokio::time::sleep(Duration::from_millis(MEMBER_WINDOW_MS * 2)).await;
    let report = report(&service);
    assert_eq!(requests(&report), 2, "the two requests were not merged");
    assert_eq!(
        report.member_requests[&guild].rate_limited, 0,
        "a request inside the window reached the gateway"
    );
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_request_waits_for_new_session() {
    // Two shards in one bucket: after both lose their sessions, the second one waits for the
    // first one's pacing window with its connection open and no session on it.
    let service = start(config("members-before-session", 2, 1, "")).await;
    let simulator = service.simulator.as_ref().expect("embedded simulator");
    let guilds: Vec<u64> = (0..2)
        .map(|shard| simulator.guild_ids(shard)[0].get())
        .collect();
    eventually(
        Duration::from_secs(10),
        "the cold guilds' members arrived",
        || async {
            status(&service, 0).await.outstanding_member_requests == 0
                && status(&service, 1).await.outstanding_member_requests == 0
        },
    )
    .await;
    // Past the member request window, so that nothing defers the requests below.
    tokio::time::sleep(Duration::from_millis(MEMBER_WINDOW_MS + 100)).await;
    let requests = |report: &Report, guild: u64| {
        report
            .member_requests
            .get(&guild)
            .map_or(0, |record| record.all_members_requests)
    };
    let before = report(&service);

    for shard in 0..2 {
        inject(&service, shard, Fault::InvalidSession { resumable: false });
    }
    for (shard, guild) in guilds.iter().enumerate() {
        let name = names::shard(&service.config.process.name, shard as u32);
        let actor: ActorRef<ShardMsg> = names::lookup(&name).expect("shard registered");
        actor
            .cast(ShardMsg::RequestMembers {
                guild_id: *guild,
                reason: MemberRequestReason::Admin,
            })
            .expect("the shard takes messages");
    }

    for (shard, guild) in guilds.iter().enumerate() {
        eventually(
            Duration::from_secs(10),
            &format!("shard {shard}'s request for guild {guild} reached the new session"),
            || async { requests(&report(&service), *guild) > requests(&before, *guild) },
        )
        .await;
    }
    eventually(
        Duration::from_secs(10),
        "every member request answered",
        || async {
            status(&service, 0).await.outstanding_member_requests == 0
                && status(&service, 1).await.outstanding_member_requests == 0
        },
    )
    .await;
    let violations = report(&service).violations;
    assert!(
        violations.is_empty(),
        "the gateway saw broken rules: {violations:?}"
    );
    service.shutdown().await;
}
