//! A fleet of `shardvisor run` processes that share Discord's identify buckets through etcd,
//! judged by one gateway simulator inside the test process. The cases: three processes that
//! split 48 shards, a bucket holder killed with SIGKILL, an etcd restart during a mass connect,
//! and lock leases revoked under the fleet.
//!
//! Needs `/usr/bin/etcd` (or `ETCD_BIN`). Each test starts its own etcd and simulator on free
//! loopback ports and runs the `shardvisor` binary as child processes.

#[path = "support/etcd.rs"]
mod etcd;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use actors::gateway::Token;
use etcd::EtcdServer;
use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use shardvisor::sim::report::IdentifyRecord;
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{Report, SimConfig, Simulator};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

/// Identify buckets of the simulated bot (its `max_concurrency`).
const BUCKETS: u32 = 16;

/// The simulator's identify window, which is also the processes' pacing. It is Discord's 5 s,
/// because `shardvisor run` rejects a pacing below 5 s for any gateway but its embedded
/// simulator, and a fleet has to share one external simulator.
const WINDOW: Duration = actors::gateway::IDENTIFY_WINDOW;

/// Bot token of the simulator, passed to the processes through `SHARDVISOR_TOKEN`.
const TOKEN: &str = "fleet-etcd-test-token";

/// Key prefix of the bucket locks and the session-start budget.
const PREFIX: &str = "/gateway/identify";

/// The processes' `identify.unsent_timeout`, short so that the lock leases are short.
const UNSENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Lease margin of `EtcdOptions::new`, which `shardvisor run` keeps.
const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Shortest lease TTL the etcd backend requests.
const MIN_LEASE_TTL: Duration = Duration::from_secs(3);

/// Session starts of the simulated bot, far more than any test spends.
const SESSION_STARTS: u32 = 5000;

/// Maximum wait for a process's summary line.
const SUMMARY_LIMIT: Duration = Duration::from_secs(60);

/// Maximum wait for a process to exit after its summary. A shard has 10 s to confirm its
/// shutdown, so this leaves room for a slow one.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// Maximum wait for identifies to show up in the simulator's report.
const REPORT_LIMIT: Duration = Duration::from_secs(30);

/// How often the live report and etcd are polled.
const POLL: Duration = Duration::from_millis(20);

/// Time an IDENTIFY that etcd approved just before an outage may take to reach the simulator.
const IN_FLIGHT: Duration = Duration::from_millis(250);

// Each test runs up to three service processes, etcd and a simulator. On two cores two tests at
// once would blur the identify windows they measure, so the tests of this file take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test's etcd, gateway simulator and service configuration file.
struct Fleet {
    etcd: EtcdServer,
    sim: Simulator,
    clock: SimClock,
    /// Contains the configuration file and the processes' standard error.
    dir: TempDir,
    config: PathBuf,
}

impl Fleet {
    async fn start(shards: u32) -> Self {
        let etcd = EtcdServer::start().await;
        let before = Instant::now();
        let sim = Simulator::start(sim_config(shards))
            .await
            .expect("the simulator failed to start");
        let clock = SimClock {
            before,
            after: Instant::now(),
        };

        let dir = tempfile::Builder::new()
            .prefix("shardvisor-fleet-")
            .tempdir()
            .expect("failed to create a temporary directory");
        let config = dir.path().join("fleet.toml");
        let text = service_config(&etcd, &sim, shards);
        std::fs::write(&config, text).expect("failed to write the service configuration");
        Self {
            etcd,
            sim,
            clock,
            dir,
            config,
        }
    }

    /// Returns the TTL of a bucket lock's lease as the etcd backend computes it: the
    /// coordinator's hold (2 × pacing + grace + unsent timeout) plus the lease margin, rounded up
    /// to whole seconds, at least 3 s.
    fn lease_ttl(&self) -> Duration {
        let hold = WINDOW * 2 + grace() + UNSENT_TIMEOUT;
        let total = hold + LEASE_MARGIN;
        let seconds = total.as_secs() + u64::from(total.subsec_nanos() > 0);
        Duration::from_secs(seconds).max(MIN_LEASE_TTL)
    }

    /// Starts `shardvisor run` for the shards in `range`. With `exit_when_stable` it exits right
    /// after its summary line, else it serves until killed.
    fn spawn(&self, name: &str, range: Range<u32>, exit_when_stable: bool) -> Member {
        let shards = self.sim.config().shards;
        let stderr_path = self.dir.path().join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).expect("failed to create a stderr file");

        let mut command = Command::new(env!("CARGO_BIN_EXE_shardvisor"));
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .arg("--name")
            .arg(name)
            .arg("--shards")
            .arg(shards.to_string())
            .arg("--start")
            .arg(range.start.to_string())
            .arg("--stop")
            .arg(range.end.to_string());
        if exit_when_stable {
            command.arg("--exit-when-stable");
        }
        // A clean environment keeps SHARDVISOR_* and the replaced service's variables of the
        // caller from overriding the configuration file.
        command
            .env_clear()
            .env("SHARDVISOR_TOKEN", TOKEN)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("failed to run shardvisor for {name}: {error}"));

        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });

        Member {
            name: name.to_owned(),
            child,
            lines,
            stderr: stderr_path,
        }
    }

    /// Polls the live report until it contains at least `count` accepted identifies.
    async fn wait_for_accepted(&self, count: usize, member: &Member) {
        let deadline = Instant::now() + REPORT_LIMIT;
        loop {
            let report = self.sim.report();
            if report.accepted_identifies() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the simulator accepted {} identifies within {REPORT_LIMIT:?}, expected {count}\n{}",
                report.accepted_identifies(),
                member.stderr_tail()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Connects a plain etcd client that reads and changes keys, as an operator would.
    async fn admin(&self) -> Client {
        Client::connect([self.etcd.endpoint()], None)
            .await
            .expect("the test's etcd client failed to connect")
    }
}

/// Returns the processes' `identify.grace`: 5 % of the window, the default 250 ms.
fn grace() -> Duration {
    WINDOW / 20
}

fn service_config(etcd: &EtcdServer, sim: &Simulator, shards: u32) -> String {
    format!(
        r#"
[process]
shards = {shards}

[gateway]
api = "{api}"

[identify]
backend = "etcd"
etcd_endpoints = ["{endpoint}"]
etcd_prefix = "{PREFIX}"
pacing = "{pacing}ms"
grace = "{grace}ms"
unsent_timeout = "{unsent}ms"

[stabilize]
hold = "100ms"
max_hold = "1s"

[sweep]
enabled = false
"#,
        api = sim.api_url(),
        endpoint = etcd.endpoint(),
        pacing = WINDOW.as_millis(),
        grace = grace().as_millis(),
        unsent = UNSENT_TIMEOUT.as_millis(),
    )
}

fn sim_config(shards: u32) -> SimConfig {
    SimConfig {
        token: Token::new(TOKEN),
        shards,
        max_concurrency: BUCKETS,
        identify_window: WINDOW,
        session_start_total: SESSION_STARTS,
        session_start_remaining: SESSION_STARTS,
        dispatch_rate: 0.5,
        world: WorldConfig {
            seed: 3,
            guilds: shards * 2,
            shard_count: shards,
            largest_guild: 200,
        },
        ..SimConfig::default()
    }
}

/// Maps instants of the test process to the simulator's clock, the `at_ms` of its report. That
/// clock starts inside `Simulator::start`, somewhere between `before` and `after`.
struct SimClock {
    before: Instant,
    after: Instant,
}

impl SimClock {
    /// Returns the earliest simulator time that `instant` can be.
    fn earliest_ms(&self, instant: Instant) -> u64 {
        millis(instant.saturating_duration_since(self.after))
    }

    /// Returns the latest simulator time that `instant` can be.
    fn latest_ms(&self, instant: Instant) -> u64 {
        millis(instant.saturating_duration_since(self.before))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).expect("durations of a test fit in u64 milliseconds")
}

/// One `shardvisor run` child process.
struct Member {
    name: String,
    child: Child,
    /// Lines of its standard output.
    lines: mpsc::UnboundedReceiver<String>,
    stderr: PathBuf,
}

impl Member {
    /// Reads standard output until the summary line.
    async fn summary(&mut self) -> SummaryLine {
        let deadline = Instant::now() + SUMMARY_LIMIT;
        loop {
            match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(summary) = SummaryLine::parse(&line) {
                        return summary;
                    }
                }
                Ok(None) => panic!(
                    "{} closed its standard output without a summary line\n{}",
                    self.name,
                    self.stderr_tail()
                ),
                Err(_) => panic!(
                    "{} printed no summary line within {SUMMARY_LIMIT:?}\n{}",
                    self.name,
                    self.stderr_tail()
                ),
            }
        }
    }

    async fn exit_status(&mut self) -> ExitStatus {
        match timeout(EXIT_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => panic!("failed to wait for {}: {error}", self.name),
            Err(_) => panic!(
                "{} did not exit within {EXIT_LIMIT:?} after its summary\n{}",
                self.name,
                self.stderr_tail()
            ),
        }
    }

    /// Sends SIGKILL, as a crash would, and waits until the process is gone.
    async fn kill(&mut self) {
        self.child
            .start_kill()
            .unwrap_or_else(|error| panic!("failed to kill {}: {error}", self.name));
        timeout(EXIT_LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} survived SIGKILL for {EXIT_LIMIT:?}", self.name))
            .unwrap_or_else(|error| panic!("failed to wait for {}: {error}", self.name));
    }

    /// Returns the end of the process's standard error, for failure messages.
    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "last lines of {}'s standard error:\n{}",
            self.name,
            lines[start..].join("\n")
        )
    }
}

/// The line `summary shards=.. ready=.. buckets=.. floor_s=.. elapsed_s=.. ...` of `shardvisor
/// run`.
struct SummaryLine {
    line: String,
    fields: BTreeMap<String, String>,
}

impl SummaryLine {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("summary ")?;
        let fields = rest
            .split_whitespace()
            .filter_map(|field| field.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Some(Self {
            line: line.to_owned(),
            fields,
        })
    }

    fn number(&self, key: &str) -> f64 {
        self.fields
            .get(key)
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("summary line without a numeric {key}: {}", self.line))
    }

    fn ready(&self) -> u32 {
        self.number("ready") as u32
    }

    fn elapsed_s(&self) -> f64 {
        self.number("elapsed_s")
    }
}

/// Waits for a process run with `--exit-when-stable` and checks that every shard of its range
/// came up and that it exited with status 0.
async fn finish(member: &mut Member, shards: u32) -> SummaryLine {
    let summary = member.summary().await;
    let status = member.exit_status().await;
    assert_eq!(
        summary.ready(),
        shards,
        "{} brought {} of its {shards} shards up: {}\n{}",
        member.name,
        summary.ready(),
        summary.line,
        member.stderr_tail()
    );
    assert!(
        status.success(),
        "{} exited with {status} after `{}`\n{}",
        member.name,
        summary.line,
        member.stderr_tail()
    );
    summary
}

/// Returns the accepted identifies of each bucket, oldest first.
fn accepted_by_bucket(report: &Report) -> BTreeMap<u32, Vec<IdentifyRecord>> {
    report
        .identifies
        .iter()
        .map(|(bucket, records)| {
            let mut accepted: Vec<IdentifyRecord> =
                records.iter().filter(|r| r.accepted).cloned().collect();
            accepted.sort_by_key(|record| record.at_ms);
            (*bucket, accepted)
        })
        .collect()
}

/// Returns the accepted identifies of every bucket as `shard@ms`, one bucket a line.
fn timeline(report: &Report) -> String {
    accepted_by_bucket(report)
        .iter()
        .map(|(bucket, identifies)| {
            let entries: Vec<String> = identifies
                .iter()
                .map(|r| format!("{}@{}", r.shard, r.at_ms))
                .collect();
            format!("bucket {bucket}: {}", entries.join(" "))
        })
        .collect::<Vec<String>>()
        .join("\n")
}

fn assert_no_violations(report: &Report) {
    assert!(
        report.violations.is_empty(),
        "the simulator recorded broken gateway rules: {:?}",
        report.violations
    );
}

/// Checks that consecutive accepted identifies of every bucket are at least one window apart.
fn assert_buckets_paced(report: &Report) {
    let window_ms = millis(WINDOW);
    for (bucket, identifies) in accepted_by_bucket(report) {
        for pair in identifies.windows(2) {
            let gap = pair[1].at_ms - pair[0].at_ms;
            assert!(
                gap >= window_ms,
                "bucket {bucket}: shards {} and {} identified {gap} ms apart, inside the {window_ms} ms window",
                pair[0].shard,
                pair[1].shard
            );
        }
    }
}

/// Returns the bucket and the lease of a lock key `<prefix>/<bucket>/<lease id in hex>`, or
/// `None` for any other key (the budget key, for one).
fn parse_lock_key(key: &[u8]) -> Option<(u32, i64)> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let (bucket, lease) = rest.split_once('/')?;
    Some((bucket.parse().ok()?, i64::from_str_radix(lease, 16).ok()?))
}

fn lock_key(bucket: u32, lease: i64) -> String {
    format!("{PREFIX}/{bucket}/{lease:016x}")
}

/// Returns every lock key in etcd as (bucket, lease).
async fn lock_keys(admin: &mut Client) -> Vec<(u32, i64)> {
    let response = admin
        .get(
            format!("{PREFIX}/"),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("failed to read the lock keys");
    response
        .kvs()
        .iter()
        .filter_map(|entry| parse_lock_key(entry.key()))
        .collect()
}

/// Grants a lease that outlives the test, for lock keys the test holds itself.
async fn grant_lease(admin: &mut Client) -> i64 {
    admin
        .lease_grant(60, None)
        .await
        .expect("failed to grant a lease to the test")
        .id()
}

/// Puts a lock key under the test's own lease, as another process of the fleet would queue.
async fn queue_test_key(admin: &mut Client, bucket: u32, lease: i64) {
    admin
        .put(
            lock_key(bucket, lease),
            "",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("failed to put a lock key of the test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_buckets() {
    let _turn = SERIAL.lock().await;
    let fleet = Fleet::start(48).await;

    let ranges = [("fleet-a", 0..16), ("fleet-b", 16..32), ("fleet-c", 32..48)];
    let mut members: Vec<Member> = ranges
        .iter()
        .map(|(name, range)| fleet.spawn(name, range.clone(), true))
        .collect();
    let mut slowest_s: f64 = 0.0;
    for member in &mut members {
        let summary = finish(member, 16).await;
        slowest_s = slowest_s.max(summary.elapsed_s());
    }

    let report = fleet.sim.report();
    assert_no_violations(&report);
    assert_eq!(
        report.accepted_identifies(),
        48,
        "expected one accepted IDENTIFY per shard"
    );
    assert_buckets_paced(&report);

    // Each process measures elapsed_s from its own start, and all three started together.
    let rounds = 48_u32.div_ceil(BUCKETS);
    let floor_s = f64::from(rounds) * WINDOW.as_secs_f64();
    assert!(
        slowest_s <= 1.15 * floor_s,
        "the slowest process needed {slowest_s:.2} s, more than 1.15 × the floor of {floor_s:.1} s ({rounds} windows); accepted identifies as shard@ms:\n{}",
        timeline(&report)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_frees_bucket_within_ttl() {
    let _turn = SERIAL.lock().await;
    let fleet = Fleet::start(32).await;
    let mut admin = fleet.admin().await;

    let mut holder = fleet.spawn("fleet-a", 0..16, false);
    fleet.wait_for_accepted(16, &holder).await;
    let lock_count = lock_keys(&mut admin).await.len();
    assert_eq!(
        lock_count, 16,
        "process A should hold the lock of every bucket for pacing + grace after its IDENTIFY"
    );
    holder.kill().await;
    let killed_ms = fleet.clock.latest_ms(Instant::now());

    let mut successor = fleet.spawn("fleet-b", 16..32, true);
    finish(&mut successor, 16).await;

    let report = fleet.sim.report();
    assert_no_violations(&report);
    assert_eq!(
        report.accepted_identifies(),
        32,
        "expected one accepted IDENTIFY per shard"
    );

    let window_ms = millis(WINDOW);
    let ttl_ms = millis(fleet.lease_ttl());
    // etcd deletes the keys of an expired lease from a periodic check, not at the instant of
    // expiry. The slack covers that check and B's watch, lock and IDENTIFY.
    let slack_ms = 1500;
    // A renewed its lease right before its IDENTIFY, so etcd keeps the bucket closed for the
    // full TTL from then. This tolerance covers the time from that renewal until the IDENTIFY
    // reaches the simulator.
    let renewal_ms = 250;
    for (bucket, identifies) in accepted_by_bucket(&report) {
        let a: Vec<&IdentifyRecord> = identifies.iter().filter(|r| r.shard < 16).collect();
        let b: Vec<&IdentifyRecord> = identifies.iter().filter(|r| r.shard >= 16).collect();
        assert_eq!(
            (a.len(), b.len()),
            (1, 1),
            "bucket {bucket}: expected one accepted IDENTIFY of A and one of B, got {identifies:?}"
        );
        let (a, b) = (a[0], b[0]);
        assert!(
            b.at_ms >= a.at_ms + window_ms,
            "bucket {bucket}: B's shard {} identified {} ms after A's shard {}, inside the window",
            b.shard,
            b.at_ms - a.at_ms,
            a.shard
        );
        assert!(
            b.at_ms + renewal_ms >= a.at_ms + ttl_ms,
            "bucket {bucket}: B identified {} ms after A, before A's lease TTL of {ttl_ms} ms ran out",
            b.at_ms - a.at_ms
        );
        assert!(
            b.at_ms <= killed_ms + ttl_ms + slack_ms,
            "bucket {bucket}: B identified {} ms after A was killed, later than the lease TTL of {ttl_ms} ms + {slack_ms} ms",
            b.at_ms.saturating_sub(killed_ms)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_pauses_identify() {
    let _turn = SERIAL.lock().await;
    let mut fleet = Fleet::start(48).await;

    let mut member = fleet.spawn("fleet-a", 0..48, true);
    fleet.wait_for_accepted(16, &member).await;
    fleet.etcd.stop().await;
    let stopped = Instant::now();
    // The length of the outage: two windows, in which the second round is due.
    tokio::time::sleep(WINDOW * 2).await;
    let restarting = Instant::now();
    let before_restart = fleet.sim.report().accepted_identifies();
    fleet.etcd.restart().await;

    finish(&mut member, 48).await;

    let report = fleet.sim.report();
    assert!(
        before_restart < 48,
        "every shard identified before etcd came back, so the outage delayed nothing"
    );
    let quiet =
        fleet.clock.latest_ms(stopped) + millis(IN_FLIGHT)..fleet.clock.earliest_ms(restarting);
    let during_outage: Vec<&IdentifyRecord> = report
        .identifies
        .values()
        .flatten()
        .filter(|r| r.accepted && quiet.contains(&r.at_ms))
        .collect();
    assert!(
        during_outage.is_empty(),
        "identifies accepted while etcd was down ({} ms to {} ms): {during_outage:?}\netcd log:\n{}",
        quiet.start,
        quiet.end,
        fleet.etcd.log_tail()
    );
    assert_no_violations(&report);
    assert_eq!(
        report.accepted_identifies(),
        48,
        "expected one accepted IDENTIFY per shard"
    );
    assert_buckets_paced(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_not_used() {
    let _turn = SERIAL.lock().await;
    let fleet = Fleet::start(32).await;
    let mut admin = fleet.admin().await;

    // In the blocked buckets the test acts as two more processes of the fleet. Its first key
    // exists before the service starts, so the service's first key there is a waiter, which
    // cannot have sent IDENTIFY when the test revokes its lease. Its second key is queued right
    // behind that waiter, so the bucket belongs to the test again once the first key is gone.
    let blocked: BTreeSet<u32> = [0, 1, 2].into();
    let first_lease = grant_lease(&mut admin).await;
    let second_lease = grant_lease(&mut admin).await;
    for &bucket in &blocked {
        queue_test_key(&mut admin, bucket, first_lease).await;
    }
    let mut events = admin
        .watch(
            format!("{PREFIX}/"),
            Some(WatchOptions::new().with_prefix()),
        )
        .await
        .expect("failed to watch the lock keys");

    let mut member = fleet.spawn("fleet-a", 0..32, true);

    // In the other buckets the service's first keys are holders. Their leases are revoked as
    // soon as the keys show up, which is usually before the holder's IDENTIFY.
    let holder_revokes = 3;
    let mut revoked_waiters: BTreeMap<u32, i64> = BTreeMap::new();
    let mut revoked_holders: BTreeMap<u32, i64> = BTreeMap::new();
    let mut requeued: BTreeSet<u32> = BTreeSet::new();
    let mut first_released = false;
    let deadline = Instant::now() + REPORT_LIMIT;
    while requeued.len() < blocked.len() {
        let message = timeout_at(deadline, events.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out after {REPORT_LIMIT:?}: the service queued no waiter to revoke in some of buckets {:?}, or did not queue again after the revoke (revoked: {revoked_waiters:x?}, queued again: {requeued:?})\n{}",
                    blocked, member.stderr_tail()
                )
            })
            .expect("the watch of the lock keys failed")
            .expect("etcd ended the watch of the lock keys");
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() != EventType::Put {
                continue;
            }
            let Some((bucket, lease)) = parse_lock_key(kv.key()) else {
                continue;
            };
            if lease == first_lease || lease == second_lease {
                continue;
            }

            if blocked.contains(&bucket) {
                if revoked_waiters.contains_key(&bucket) {
                    // A new key of the service after its waiter's lease was revoked.
                    requeued.insert(bucket);
                    continue;
                }
                queue_test_key(&mut admin, bucket, second_lease).await;
                admin.lease_revoke(lease).await.unwrap_or_else(|error| {
                    panic!("failed to revoke waiter lease {lease:016x} of bucket {bucket}: {error}")
                });
                revoked_waiters.insert(bucket, lease);
            } else if revoked_holders.len() < holder_revokes
                && !revoked_holders.contains_key(&bucket)
                && admin.lease_revoke(lease).await.is_ok()
            {
                revoked_holders.insert(bucket, lease);
            }
        }

        if !first_released && revoked_waiters.len() == blocked.len() {
            // The keys behind the revoked waiters are now first in their buckets.
            admin
                .lease_revoke(first_lease)
                .await
                .expect("failed to release the test's first locks");
            first_released = true;
        }
    }
    let releasing = Instant::now();
    admin
        .lease_revoke(second_lease)
        .await
        .expect("failed to release the test's second locks");

    finish(&mut member, 32).await;

    let report = fleet.sim.report();
    assert!(
        !revoked_holders.is_empty(),
        "the test revoked no lease of a bucket holder"
    );
    assert_no_violations(&report);
    assert_eq!(
        report.accepted_identifies(),
        32,
        "expected one accepted IDENTIFY per shard"
    );
    assert_buckets_paced(&report);
    let released_ms = fleet.clock.earliest_ms(releasing);
    for (bucket, identifies) in accepted_by_bucket(&report) {
        if !blocked.contains(&bucket) {
            continue;
        }
        let early: Vec<&IdentifyRecord> = identifies
            .iter()
            .filter(|r| r.at_ms < released_ms)
            .collect();
        assert!(
            early.is_empty(),
            "bucket {bucket}: identified while the test's second lock blocked it (released at {released_ms} ms), so a revoked lease was used: {early:?}"
        );
    }

    let budget = admin
        .get(format!("{PREFIX}/budget"), None)
        .await
        .expect("failed to read the session-start budget");
    let entry = budget
        .kvs()
        .first()
        .expect("no session-start budget in etcd");
    let stored: serde_json::Value =
        serde_json::from_slice(entry.value()).expect("the budget is not JSON");
    assert_eq!(
        stored["remaining"].as_u64(),
        Some(u64::from(report.session_start_remaining)),
        "etcd's session-start budget differs from the starts the simulator counted, so a start was spent without an IDENTIFY"
    );
}
