//! The service on the PostgreSQL store, judged by a gateway simulator inside the test process.
//! One test compares the cache that `Service::start` writes with the simulator's guilds, row for
//! row. The other kills a `shardvisor run` process with SIGKILL and checks that its successor
//! resumes every session from the `shards` table.
//!
//! Needs the shared PostgreSQL server on 127.0.0.1:5432 (or the connection string in
//! `SHARDVISOR_TEST_POSTGRES`). Each test creates a database of its own and drops it at the end.

#[path = "support/postgres.rs"]
mod postgres_server;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use actors::gateway::{Snowflake, Token};
use actors::names;
use actors::shard::{ShardMsg, ShardStatus};
use postgres_server::TestDatabase;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use serde_json::Value;
use shardvisor::config::{Config, Overrides};
use shardvisor::run::Service;
use shardvisor::sim::report::MemberRequestRecord;
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{Fault, Report, SimConfig, Simulator, Target, ViolationKind};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_postgres::Client;

/// Bot token of the simulator, given to the service through a token file or `SHARDVISOR_TOKEN`.
const TOKEN: &str = "postgres-service-test-token";

/// Shards of the bot. With as many identify buckets, every shard identifies in the first window.
const SHARDS: u32 = 4;

/// Maximum wait for the shards to become steady.
const STEADY_LIMIT: Duration = Duration::from_secs(60);

/// Maximum wait for the member requests to complete and for their rows to be committed.
const MEMBERS_LIMIT: Duration = Duration::from_secs(30);

/// Maximum wait for the simulator's steady traffic to reach a sequence number.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(20);

/// Maximum wait for a child process to exit after SIGKILL or SIGTERM. A shard has 10 s to
/// confirm its shutdown, so this leaves room for a slow one.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// How often the simulator's report, the shards and the database are polled.
const POLL: Duration = Duration::from_millis(20);

/// Lists of a GUILD_CREATE that the store keeps in tables of their own, not in `guilds.data`.
const LISTS: [&str; 7] = [
    "roles",
    "channels",
    "emojis",
    "threads",
    "voice_states",
    "members",
    "presences",
];

/// Returns the token that `Service::start` in this process will use: `SHARDVISOR_TOKEN` or
/// `DISCORD_TOKEN` win over the configured token file, as in `shardvisor run`.
fn in_process_token() -> String {
    ["SHARDVISOR_TOKEN", "DISCORD_TOKEN"]
        .into_iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|token| !token.trim().is_empty())
        .unwrap_or_else(|| TOKEN.to_owned())
}

fn sim_config(
    token: &str,
    seed: u64,
    guilds: u32,
    largest_guild: u32,
    dispatch_rate: f64,
) -> SimConfig {
    SimConfig {
        token: Token::new(token),
        shards: SHARDS,
        max_concurrency: SHARDS,
        dispatch_rate,
        world: WorldConfig {
            seed,
            guilds,
            shard_count: SHARDS,
            largest_guild,
        },
        ..SimConfig::default()
    }
}

async fn start_sim(config: SimConfig) -> Simulator {
    Simulator::start(config)
        .await
        .unwrap_or_else(|error| panic!("failed to start the simulator: {error}"))
}

/// Returns the service configuration: the simulator's API, the test database as the store, a
/// short stabilize hold and no sweep, so that every member request is a backfill request.
/// `token_file` is empty when the token comes from the environment.
fn service_toml(sim: &Simulator, db: &TestDatabase, token_file: &str) -> String {
    format!(
        r#"
[process]
shards = {SHARDS}
token_file = "{token_file}"

[gateway]
api = "{api}"
reconnect_backoff_base = "50ms"
reconnect_backoff_max = "500ms"
member_request_window = "{window}ms"

[stabilize]
hold = "100ms"
max_hold = "1s"

[backfill]
request_members = true

[sweep]
enabled = false

[store]
backend = "postgres"
postgres_url = "{url}"
"#,
        api = sim.api_url(),
        url = db.url(),
        window = sim.config().member_request_window.as_millis(),
    )
}

/// Polls `check` every [`POLL`] until it returns `true` or `limit` passes. Returns whether it
/// held, so the caller's assert can show what was seen.
async fn poll_until<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn shard_status(name: &str, shard: u32) -> ShardStatus {
    let actor: ActorRef<ShardMsg> = names::lookup(&names::shard(name, shard))
        .unwrap_or_else(|| panic!("shard {shard} of {name} is not registered"));
    match actor
        .call(ShardMsg::Status, Some(Duration::from_secs(5)))
        .await
    {
        Ok(CallResult::Success(status)) => status,
        _ => panic!("shard {shard} of {name} did not return its status"),
    }
}

/// Returns the `(key, data)` rows of one table of a guild, keyed by the table's key column.
async fn stored_rows(client: &Client, table: &str, key: &str, guild: u64) -> BTreeMap<u64, Value> {
    let sql = format!("SELECT {key}, data FROM {table} WHERE guild_id = $1");
    client
        .query(&sql, &[&db_id(guild)])
        .await
        .unwrap_or_else(|error| panic!("failed to read {table} of guild {guild}: {error}"))
        .iter()
        .map(|row| (row.get::<_, i64>(0) as u64, row.get::<_, Value>(1)))
        .collect()
}

fn db_id(id: u64) -> i64 {
    i64::try_from(id).expect("Discord ids fit in int8")
}

/// Parses a Discord id, which JSON carries as a string.
fn snowflake(value: &Value, field: &str) -> u64 {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("{field} is not a snowflake string: {value}"))
}

/// Returns the objects of a GUILD_CREATE list by their `id`.
fn listed_by_id(guild: &Value, list: &str) -> BTreeMap<u64, Value> {
    guild[list]
        .as_array()
        .unwrap_or_else(|| panic!("the simulator's GUILD_CREATE has no {list} list"))
        .iter()
        .map(|item| {
            (
                snowflake(&item["id"], &format!("{list}[].id")),
                item.clone(),
            )
        })
        .collect()
}

fn ids(rows: &BTreeMap<u64, Value>) -> Vec<u64> {
    rows.keys().copied().collect()
}

/// Starts the service in this process on [`service_toml`] and waits until every shard is steady.
async fn start_steady(
    name: &str,
    sim: &Simulator,
    db: &TestDatabase,
    token_file: &Path,
) -> Service {
    let text = service_toml(sim, db, &token_file.display().to_string());
    let overrides = Overrides {
        name: Some(name.to_owned()),
        ..Overrides::default()
    };
    // An empty environment map keeps the caller's SHARDVISOR_* configuration variables out.
    let config = Config::from_sources(Some(("test", &text)), &BTreeMap::new(), &overrides)
        .unwrap_or_else(|errors| panic!("the test configuration is invalid:\n{errors}"));

    let service = Service::start(config)
        .await
        .unwrap_or_else(|error| panic!("the service failed to start: {error}"));
    let summary = timeout(STEADY_LIMIT, service.wait_until_stable())
        .await
        .unwrap_or_else(|_| panic!("the shards were not steady within {STEADY_LIMIT:?}"));
    assert_eq!(
        summary.ready, SHARDS,
        "not every shard became steady: {summary:?}"
    );
    service
}

/// Waits until no member request is outstanding and the store counts `member_total` members.
async fn wait_for_members(name: &str, service: &Service, member_total: u64) {
    let answered = poll_until(MEMBERS_LIMIT, || async move {
        let mut outstanding = 0;
        for shard in 0..SHARDS {
            outstanding += shard_status(name, shard).await.outstanding_member_requests;
        }
        outstanding == 0
    })
    .await;
    assert!(
        answered,
        "member requests were still outstanding after {MEMBERS_LIMIT:?}"
    );
    // The store's member counts follow the committed flushes, so once they add up to
    // `member_total` every member row is committed.
    let store = &service.store;
    let committed = poll_until(MEMBERS_LIMIT, || async move {
        let totals = store.totals().await.unwrap_or_default();
        totals.members == member_total
    })
    .await;
    let totals = store
        .totals()
        .await
        .expect("the store failed to return its totals");
    assert!(
        committed,
        "the store counts {} members after {MEMBERS_LIMIT:?}, expected {member_total}",
        totals.members
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_matches_simulator_guilds() {
    let db = TestDatabase::create().await;
    let token = in_process_token();
    let sim = start_sim(sim_config(&token, 11, 40, 600, 0.0)).await;
    let dir = tempfile::tempdir().expect("failed to create a temporary directory");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).expect("failed to write the token file");
    let name = "pg-cache";
    let service = start_steady(name, &sim, &db, &token_file).await;

    // The simulator's world as the shards saw it: traffic is off, so nothing changes it.
    let mut guilds: BTreeMap<u64, (Value, Vec<Value>)> = BTreeMap::new();
    for shard in 0..SHARDS {
        let ids = sim.guild_ids(shard);
        assert!(
            !ids.is_empty(),
            "shard {shard} has no guild in the simulator, so its cache is not tested"
        );
        for id in ids {
            let guild = sim.guild(id).unwrap_or_else(|| {
                panic!("the simulator lists guild {id} but has no GUILD_CREATE for it")
            });
            guilds.insert(id.get(), (guild, sim.members(id)));
        }
    }
    let member_total: u64 = guilds
        .values()
        .map(|(_, members)| members.len() as u64)
        .sum();
    let partial = guilds
        .values()
        .filter(|(guild, members)| guild["members"].as_array().map_or(0, Vec::len) < members.len())
        .count();
    assert!(
        partial > 0,
        "no GUILD_CREATE lists fewer members than the guild has, so the member requests are not tested"
    );

    // Every guild is cold, so its shard requested its members when its GUILD_CREATE arrived.
    wait_for_members(name, &service, member_total).await;
    let totals = service
        .store
        .totals()
        .await
        .expect("the store failed to return its totals");
    assert_eq!(
        totals.guilds,
        guilds.len() as u64,
        "the store counts another number of guilds than the simulator has"
    );

    let client = db.client().await;
    let stored_guilds: BTreeSet<u64> = client
        .query("SELECT id FROM guilds", &[])
        .await
        .expect("failed to read the guild ids")
        .iter()
        .map(|row| row.get::<_, i64>(0) as u64)
        .collect();
    let expected_guilds: BTreeSet<u64> = guilds.keys().copied().collect();
    assert_eq!(
        stored_guilds, expected_guilds,
        "the guilds table holds other guild ids than the simulator"
    );

    // Each guild is compared in four parts. The guild object must equal the GUILD_CREATE without
    // its lists. The roles and channels must equal the GUILD_CREATE's, as whole objects. The
    // members must equal what an all-members request returns, as whole objects. The member count
    // that the store maintains must equal the member rows.
    for (&id, (guild, members)) in &guilds {
        let row = client
            .query_opt("SELECT data FROM guilds WHERE id = $1", &[&db_id(id)])
            .await
            .unwrap_or_else(|error| panic!("failed to read guild {id}: {error}"));
        let stored_guild: Value = row
            .map(|row| row.get(0))
            .unwrap_or_else(|| panic!("guild {id} has no row in guilds"));
        let mut expected_guild = guild.clone();
        let fields = expected_guild
            .as_object_mut()
            .expect("a GUILD_CREATE is a JSON object");
        for list in LISTS {
            fields.remove(list);
        }
        assert_eq!(
            stored_guild, expected_guild,
            "guild {id}: the stored guild object differs from the GUILD_CREATE without its lists"
        );

        for list in ["roles", "channels"] {
            let expected = listed_by_id(guild, list);
            let stored = stored_rows(&client, list, "id", id).await;
            assert_eq!(
                ids(&stored),
                ids(&expected),
                "guild {id}: the ids in {list} differ from the GUILD_CREATE's"
            );
            for (object_id, object) in &expected {
                assert_eq!(
                    stored.get(object_id),
                    Some(object),
                    "guild {id}: {list} row {object_id} differs from the GUILD_CREATE's object"
                );
            }
        }

        let expected_members: BTreeMap<u64, Value> = members
            .iter()
            .map(|member| {
                (
                    snowflake(&member["user"]["id"], "member user.id"),
                    member.clone(),
                )
            })
            .collect();
        assert_eq!(
            expected_members.len(),
            members.len(),
            "guild {id}: the simulator returned a user twice in its member chunks"
        );
        let stored_members = stored_rows(&client, "members", "user_id", id).await;
        assert_eq!(
            ids(&stored_members),
            ids(&expected_members),
            "guild {id}: the user ids in members differ from the simulator's member list"
        );
        for (user_id, member) in &expected_members {
            assert_eq!(
                stored_members.get(user_id),
                Some(member),
                "guild {id}: member {user_id} differs from the object of the member chunks"
            );
        }

        let maintained = service
            .store
            .member_count(id)
            .await
            .unwrap_or_else(|error| panic!("member_count of guild {id} failed: {error}"));
        assert_eq!(
            maintained,
            Some(stored_members.len() as u64),
            "guild {id}: the store's member_count differs from its member rows"
        );
        let counted: Option<i64> = client
            .query_opt(
                "SELECT count FROM guild_member_counts WHERE guild_id = $1",
                &[&db_id(id)],
            )
            .await
            .unwrap_or_else(|error| {
                panic!("failed to read the member count of guild {id}: {error}")
            })
            .map(|row| row.get(0));
        assert_eq!(
            counted,
            Some(stored_members.len() as i64),
            "guild {id}: guild_member_counts differs from the member rows"
        );
    }

    service.shutdown().await;
    sim.shutdown().await;
}

/// Events the first process must have left unsaved before it is killed, so that the successor
/// has something to replay. `gateway.save_every` is 1000, so after the save at `steady` the
/// stored sequence stays put while the traffic goes on.
const UNSAVED_EVENTS: u64 = 20;

/// Events the simulator must send while no process runs the shards.
const DOWN_EVENTS: u64 = 10;

/// Events the simulator sends between the reference sequence of the stop check and SIGTERM.
/// The process's read position cannot be seen from outside, so these events give the ones
/// already sent time to arrive and be stored.
const IN_TRANSIT_EVENTS: u64 = 5;

/// Steady events per second per session: 20 makes the waits above about 1 s, 0.5 s and 0.25 s.
const DISPATCH_RATE: f64 = 20.0;

/// One `shardvisor run` child process.
struct Process {
    /// Names the process in failure messages ("first", "second").
    label: String,
    child: Child,
    /// Lines of its standard output.
    lines: mpsc::UnboundedReceiver<String>,
    stderr: PathBuf,
}

impl Process {
    /// Starts `shardvisor run` with the configuration file, serving until it is stopped.
    fn spawn(config: &Path, dir: &Path, name: &str, label: &str) -> Self {
        let stderr = dir.join(format!("{label}.stderr"));
        let stderr_file = std::fs::File::create(&stderr).expect("failed to create a stderr file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_shardvisor"));
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .arg("--name")
            .arg(name)
            // A clean environment keeps the caller's SHARDVISOR_* variables and those of the
            // replaced service from overriding the configuration file.
            .env_clear()
            .env("SHARDVISOR_TOKEN", TOKEN)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("failed to run shardvisor ({label}): {error}"));

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
        Self {
            label: label.to_owned(),
            child,
            lines,
            stderr,
        }
    }

    /// Reads standard output until the summary line and returns its `key=value` fields.
    async fn summary(&mut self) -> BTreeMap<String, String> {
        let deadline = Instant::now() + STEADY_LIMIT;
        loop {
            match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix("summary ") {
                        return rest
                            .split_whitespace()
                            .filter_map(|field| field.split_once('='))
                            .map(|(key, value)| (key.to_owned(), value.to_owned()))
                            .collect();
                    }
                }
                Ok(None) => panic!(
                    "the {} process closed its standard output without a summary line\n{}",
                    self.label,
                    self.stderr_tail()
                ),
                Err(_) => panic!(
                    "the {} process printed no summary line within {STEADY_LIMIT:?}\n{}",
                    self.label,
                    self.stderr_tail()
                ),
            }
        }
    }

    /// Waits for the summary line and checks that every shard of the bot became steady.
    async fn wait_all_ready(&mut self) {
        let summary = self.summary().await;
        assert_eq!(
            summary.get("ready").map(String::as_str),
            Some(SHARDS.to_string().as_str()),
            "the {} process did not bring every shard up: {summary:?}\n{}",
            self.label,
            self.stderr_tail()
        );
    }

    /// Sends SIGKILL, as a crash would, and waits until the process is gone.
    async fn kill(&mut self) {
        self.child
            .start_kill()
            .unwrap_or_else(|error| panic!("failed to kill the {} process: {error}", self.label));
        self.wait("SIGKILL").await;
    }

    /// Sends SIGTERM, which saves every session and closes every connection, and waits for the
    /// exit.
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("the {} process exited before SIGTERM", self.label));
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("failed to run kill");
        assert!(status.success(), "kill -TERM {pid} failed with {status}");
        self.wait("SIGTERM").await
    }

    async fn wait(&mut self, signal: &str) -> ExitStatus {
        match timeout(EXIT_LIMIT, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => panic!("failed to wait for the {} process: {error}", self.label),
            Err(_) => panic!(
                "the {} process did not exit within {EXIT_LIMIT:?} after {signal}\n{}",
                self.label,
                self.stderr_tail()
            ),
        }
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Returns the end of the process's standard error, for failure messages.
    fn stderr_tail(&self) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "last lines of the {} process's standard error:\n{}",
            self.label,
            lines[start..].join("\n")
        )
    }
}

/// A shard's row in the `shards` table.
#[derive(Clone, Debug)]
struct StoredShard {
    seq: u64,
    session_id: String,
    /// The stage name at the save, such as `steady`.
    status: String,
}

async fn stored_shards(client: &Client, name: &str) -> BTreeMap<u32, StoredShard> {
    client
        .query(
            "SELECT id, seq, sess, status FROM shards WHERE name = $1",
            &[&name],
        )
        .await
        .expect("failed to read the shards table")
        .iter()
        .map(|row| {
            let shard = row.get::<_, i32>(0) as u32;
            let stored = StoredShard {
                seq: row.get::<_, i64>(1) as u64,
                session_id: row.get(2),
                status: row.get(3),
            };
            (shard, stored)
        })
        .collect()
}

/// Returns the newest sequence number of each session, by session id.
fn last_seqs(report: &Report) -> BTreeMap<String, u64> {
    report
        .sessions
        .iter()
        .map(|(id, session)| (id.clone(), session.last_seq))
        .collect()
}

/// Returns the session ids of each shard, in the simulator's report.
fn sessions_by_shard(report: &Report) -> BTreeMap<u32, Vec<String>> {
    let mut sessions: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (id, session) in &report.sessions {
        sessions.entry(session.shard).or_default().push(id.clone());
    }
    sessions
}

/// Waits until every session in `targets` has reached its target sequence number. `goal` names
/// the targets in the failure message.
async fn wait_for_traffic(sim: &Simulator, targets: &BTreeMap<String, u64>, goal: &str) {
    let reached = poll_until(TRAFFIC_LIMIT, || async move {
        let seqs = last_seqs(&sim.report());
        targets
            .iter()
            .all(|(id, target)| seqs.get(id).is_some_and(|seq| seq >= target))
    })
    .await;
    assert!(
        reached,
        "the simulator's sessions did not reach {goal} within {TRAFFIC_LIMIT:?}: targets {targets:?}, reached {:?}",
        last_seqs(&sim.report())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_process_resumes_sessions() {
    let db = TestDatabase::create().await;
    let sim = start_sim(sim_config(TOKEN, 12, 16, 300, DISPATCH_RATE)).await;
    let dir: TempDir = tempfile::tempdir().expect("failed to create a temporary directory");
    let config = dir.path().join("service.toml");
    std::fs::write(&config, service_toml(&sim, &db, ""))
        .expect("failed to write the service configuration");
    let name = "pg-resume";
    let client = db.client().await;

    let mut first = Process::spawn(&config, dir.path(), name, "first");
    first.wait_all_ready().await;

    let report = sim.report();
    let sessions = sessions_by_shard(&report);
    for shard in 0..SHARDS {
        assert_eq!(
            sessions.get(&shard).map(Vec::len),
            Some(1),
            "shard {shard} should have one session after the first start: {sessions:?}"
        );
    }
    // Wait until each session is UNSAVED_EVENTS past its stored sequence. The row is read on each
    // poll and must show `steady`, because that last save may commit after the summary line.
    let (client_ref, sim_ref) = (&client, &sim);
    let unsaved = poll_until(TRAFFIC_LIMIT, || async move {
        let stored = stored_shards(client_ref, name).await;
        let report = sim_ref.report();
        report.sessions.iter().all(|(id, session)| {
            stored.get(&session.shard).is_some_and(|row| {
                row.session_id == *id
                    && row.status == "steady"
                    && session.last_seq >= row.seq + UNSAVED_EVENTS
            })
        })
    })
    .await;
    assert!(
        unsaved,
        "the sessions did not get {UNSAVED_EVENTS} events past their stored sequence within {TRAFFIC_LIMIT:?}: stored {:?}, simulator {:?}",
        stored_shards(&client, name).await,
        last_seqs(&sim.report())
    );

    first.kill().await;
    let at_kill = sim.report();
    let identifies_before = at_kill.accepted_identifies();
    assert_eq!(
        identifies_before, SHARDS as usize,
        "the first process should have identified each shard once"
    );
    let saved = stored_shards(&client, name).await;
    for (id, session) in &at_kill.sessions {
        let row = saved.get(&session.shard).unwrap_or_else(|| {
            panic!(
                "shard {} has no row in shards after the kill",
                session.shard
            )
        });
        assert_eq!(
            &row.session_id, id,
            "shard {}: the stored session is not the simulator's",
            session.shard
        );
        assert!(
            row.seq < session.last_seq,
            "shard {}: the stored sequence {} leaves nothing to replay (the session is at {})",
            session.shard,
            row.seq,
            session.last_seq
        );
    }

    // The simulator keeps a detached session's traffic going, so these events reach no process.
    let down_targets: BTreeMap<String, u64> = last_seqs(&at_kill)
        .into_iter()
        .map(|(id, seq)| (id, seq + DOWN_EVENTS))
        .collect();
    wait_for_traffic(&sim, &down_targets, "the events sent while no process ran").await;

    let mut second = Process::spawn(&config, dir.path(), name, "second");
    second.wait_all_ready().await;

    let resumed = sim.report();
    assert_eq!(
        resumed.accepted_identifies(),
        identifies_before,
        "the second process identified instead of resuming\n{}",
        second.stderr_tail()
    );
    assert_eq!(
        resumed.sessions.len(),
        SHARDS as usize,
        "the second process started new sessions: {:?}",
        resumed.sessions.keys().collect::<Vec<_>>()
    );
    // Connections the first process opened all have lower ids than any of the second's.
    let first_connections = at_kill.connections.iter().map(|c| c.id).max().unwrap_or(0);
    for (id, session) in &resumed.sessions {
        let shard = session.shard;
        let saved_seq = saved[&shard].seq;
        let connections: Vec<_> = resumed
            .connections
            .iter()
            .filter(|c| c.id > first_connections && c.shard == Some(shard))
            .collect();
        assert!(
            !connections.is_empty(),
            "shard {shard}: the simulator recorded no connection of the second process"
        );
        assert!(
            connections.iter().all(|c| c.resume_address),
            "shard {shard}: the second process did not resume at the stored resume_gateway_url: {connections:?}"
        );
        assert_eq!(
            session.resumes, 1,
            "shard {shard}: the simulator recorded another number of RESUMEs than one for session {id}"
        );
        // The replay runs from the stored sequence to the session's last event at the RESUME:
        // at least every event after the stored sequence until the end of the down time, at most
        // every event sent by now.
        let down_end = down_targets[id];
        assert!(
            saved_seq + session.replayed >= down_end,
            "shard {shard}: {} events replayed after the stored sequence {saved_seq}, which does not reach sequence {down_end} sent before the second start",
            session.replayed
        );
        assert!(
            saved_seq + session.replayed <= session.last_seq,
            "shard {shard}: {} events replayed after the stored sequence {saved_seq}, more than the session's {} events",
            session.replayed,
            session.last_seq
        );
    }

    // The stored sequence after the stop must lie between a reference taken IN_TRANSIT_EVENTS
    // events before SIGTERM and the sessions' last sequence after the exit. So it never passes
    // the gateway, and it trails it by at most the events sent in that short lead and during
    // the stop. The simulator keeps those for the next RESUME.
    let reference = last_seqs(&sim.report());
    let lead: BTreeMap<String, u64> = reference
        .iter()
        .map(|(id, seq)| (id.clone(), seq + IN_TRANSIT_EVENTS))
        .collect();
    wait_for_traffic(&sim, &lead, "the events sent ahead of SIGTERM").await;
    let status = second.terminate().await;
    let after = sim.report();
    let after_stop = last_seqs(&after);
    assert!(
        status.success(),
        "the second process exited with {status} after SIGTERM\n{}",
        second.stderr_tail()
    );
    let stopped = stored_shards(&client, name).await;
    for (id, session) in &resumed.sessions {
        let shard = session.shard;
        let row = stopped
            .get(&shard)
            .unwrap_or_else(|| panic!("shard {shard} has no row in shards after the stop"));
        assert_eq!(
            &row.session_id, id,
            "shard {shard}: the stop stored another session than the resumed one"
        );
        assert!(
            row.seq <= after_stop[id],
            "shard {shard}: stored sequence {} is ahead of the session's last sequence {}",
            row.seq,
            after_stop[id]
        );
        assert!(
            row.seq >= reference[id],
            "shard {shard}: stored sequence {} is behind {}, the session's last sequence {IN_TRANSIT_EVENTS} events before SIGTERM",
            row.seq,
            reference[id]
        );
        let session_after = &after.sessions[id];
        assert!(
            session_after.resumable,
            "shard {shard}: the session is no longer resumable after the stop, so the events after the stored sequence are lost"
        );
        assert!(
            after_stop[id] - row.seq <= sim.config().resume_buffer as u64,
            "shard {shard}: the replay buffer no longer reaches back to the stored sequence {}",
            row.seq
        );
    }
    let stderr = second.stderr_text();
    assert!(
        !stderr.contains("sequence gap"),
        "the second process saw a gap in the sequence numbers, so events were lost\n{}",
        second.stderr_tail()
    );

    sim.shutdown().await;
}

/// Members removed from the cache behind the gateway's back: one in ten of the first guild
/// (over the default 1 % ratio) and one member of the second (under it).
const DIVERGED_SHARE: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_count_requests_members() {
    let db = TestDatabase::create().await;
    let token = in_process_token();
    let mut sim_settings = sim_config(&token, 23, 40, 2000, 0.0);
    // The second all-members request of a guild must not wait for Discord's 30 s window.
    sim_settings.member_request_window = Duration::from_millis(200);
    let sim = start_sim(sim_settings).await;
    let dir = tempfile::tempdir().expect("failed to create a temporary directory");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).expect("failed to write the token file");
    let name = "pg-divergence";
    // The configuration leaves backfill.divergence_ratio at its default.
    let service = start_steady(name, &sim, &db, &token_file).await;

    let mut sizes: Vec<(usize, Snowflake, u32)> = Vec::new();
    for shard in 0..SHARDS {
        for id in sim.guild_ids(shard) {
            sizes.push((sim.members(id).len(), id, shard));
        }
    }
    let member_total: u64 = sizes.iter().map(|(size, ..)| *size as u64).sum();
    wait_for_members(name, &service, member_total).await;

    // The two largest guilds: a share of the first one's members leaves the cache, and one
    // member of the second.
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let [(diverged_size, diverged, diverged_shard), (close_size, close, close_shard), ..] =
        sizes[..]
    else {
        panic!("the simulator has fewer than two guilds");
    };
    assert!(
        close_size >= 200,
        "the second largest guild has {close_size} members, too few for one to stay under 1 %"
    );
    let removals = [
        (diverged, diverged_shard, diverged_size / DIVERGED_SHARE),
        (close, close_shard, 1),
    ];
    let mut removed = 0;
    for (guild, shard, count) in removals {
        let members = sim.members(guild);
        for member in members.iter().skip(1).take(count) {
            let remove = serde_json::json!({
                "guild_id": guild.to_string(),
                "user": member["user"],
            });
            let data = serde_json::value::to_raw_value(&remove).unwrap();
            service
                .store
                .apply(shard, "GUILD_MEMBER_REMOVE", &data)
                .await
                .unwrap_or_else(|error| panic!("failed to remove a member of {guild}: {error}"));
            removed += 1;
        }
    }
    let store = &service.store;
    let expected = member_total - removed;
    let committed = poll_until(MEMBERS_LIMIT, || async move {
        store.totals().await.unwrap_or_default().members == expected
    })
    .await;
    assert!(
        committed,
        "the removals were not committed within {MEMBERS_LIMIT:?}"
    );

    let before = sim.report().member_requests;
    let requests = |report: &BTreeMap<u64, MemberRequestRecord>, guild: Snowflake| {
        report
            .get(&guild.get())
            .map_or(0, |record| record.all_members_requests)
    };
    // New sessions: every guild arrives again in a GUILD_CREATE and is compared with the cache.
    sim.inject(Target::All, Fault::InvalidSession { resumable: false });
    let sessions_before = sim.report().sessions.len();
    let renewed = poll_until(STEADY_LIMIT, || {
        let sim = &sim;
        async move { sim.report().sessions.len() >= sessions_before + SHARDS as usize }
    })
    .await;
    assert!(
        renewed,
        "the shards did not identify again within {STEADY_LIMIT:?}"
    );
    let summary = timeout(STEADY_LIMIT, service.wait_until_stable())
        .await
        .unwrap_or_else(|_| panic!("the shards were not steady again within {STEADY_LIMIT:?}"));
    assert_eq!(
        summary.ready, SHARDS,
        "not every shard became steady again: {summary:?}"
    );
    wait_for_members(
        name,
        &service,
        member_total - removed + (diverged_size / DIVERGED_SHARE) as u64,
    )
    .await;

    let after = sim.report().member_requests;
    assert_eq!(
        requests(&after, diverged) - requests(&before, diverged),
        1,
        "guild {diverged} lost {} of {diverged_size} cached members and was not requested again",
        diverged_size / DIVERGED_SHARE
    );
    assert_eq!(
        requests(&after, close) - requests(&before, close),
        0,
        "guild {close} lost 1 of {close_size} cached members, under the ratio, and was requested"
    );
    for (_, guild, _) in &sizes[2..] {
        assert_eq!(
            requests(&after, *guild) - requests(&before, *guild),
            0,
            "guild {guild} matches Discord's count and was requested again"
        );
    }
    let violations = sim.report().violations;
    assert!(
        violations.is_empty(),
        "the simulator saw broken rules: {violations:?}"
    );
    service.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_identify_keeps_window() {
    let db = TestDatabase::create().await;
    let mut sim_settings = sim_config(TOKEN, 13, 16, 300, 0.0);
    // READY comes late, so the first process dies with IDENTIFYs sent and no session saved,
    // and its successor has to identify the same shards.
    sim_settings.ready_delay = Duration::from_secs(2);
    let sim = start_sim(sim_settings).await;
    let dir: TempDir = tempfile::tempdir().expect("failed to create a temporary directory");
    let config = dir.path().join("service.toml");
    std::fs::write(&config, service_toml(&sim, &db, ""))
        .expect("failed to write the service configuration");
    let name = "pg-crash-identify";

    let mut first = Process::spawn(&config, dir.path(), name, "first");
    let sim_ref = &sim;
    let identified = poll_until(STEADY_LIMIT, || async move {
        sim_ref.report().accepted_identifies() > 0
    })
    .await;
    assert!(
        identified,
        "the first process sent no IDENTIFY within {STEADY_LIMIT:?}\n{}",
        first.stderr_tail()
    );
    first.kill().await;

    let mut second = Process::spawn(&config, dir.path(), name, "second");
    second.wait_all_ready().await;
    let report = sim.report();
    assert!(
        report.accepted_identifies() > SHARDS as usize,
        "the second process identified no shard, so the window after the crash is not tested"
    );
    assert_eq!(
        report.violation_count(ViolationKind::IdentifyTooFast),
        0,
        "the second process identified inside a window the first one opened: {:?}",
        report.violations
    );
    second.terminate().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_member_windows() {
    let db = TestDatabase::create().await;
    let sim = start_sim(sim_config(TOKEN, 14, 16, 300, 0.0)).await;
    let dir: TempDir = tempfile::tempdir().expect("failed to create a temporary directory");
    let config = dir.path().join("service.toml");
    // A fast sweep, so that the first process requests every guild's members again right away.
    let text = service_toml(&sim, &db, "").replace(
        "[sweep]\nenabled = false",
        "[sweep]\nenabled = true\nrequests_per_second = 50.0",
    );
    assert!(
        text.contains("requests_per_second"),
        "the sweep settings were not replaced"
    );
    std::fs::write(&config, text).expect("failed to write the service configuration");
    let name = "pg-member-windows";

    let mut first = Process::spawn(&config, dir.path(), name, "first");
    first.wait_all_ready().await;
    let sim_ref = &sim;
    let swept = poll_until(MEMBERS_LIMIT, || async move {
        let report = sim_ref.report();
        report
            .member_requests
            .values()
            .map(|record| record.all_members_requests)
            .sum::<u64>()
            > report.member_requests.len() as u64
    })
    .await;
    assert!(
        swept,
        "the first process's sweep requested no guild a second time"
    );
    first.kill().await;

    let mut second = Process::spawn(&config, dir.path(), name, "second");
    second.wait_all_ready().await;
    // Long enough for the second process's sweep to cover every guild at 50 requests a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::MemberRequestRateLimited),
        0,
        "the second process requested members inside a window the first one opened: {:?}",
        report.violations
    );
    second.terminate().await;
    sim.shutdown().await;
}
