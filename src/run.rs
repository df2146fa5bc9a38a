//! `shardvisor run`: the main job. Loads the configuration, starts the gateway (the built-in
//! simulator or Discord), the stores and the actor tree, shows progress while the shards come up,
//! prints the summary line, and serves until a stop signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::backoff::Backoff;
use actors::coordinator::{CoordinatorArgs, IdentifyBackend, InProcessBackend, SessionBudget};
use actors::gate::GateArgs;
use actors::gateway::payload::GatewayBot;
use actors::gateway::Token;
use actors::names;
use actors::shard::{ShardArgs, ShardStage, StabilizeMode};
use actors::store::{CursorStore, EventSink, ShardRecord, StateStore};
use actors::supervisor::{RestartPolicy, Supervisor, SupervisorArgs, SupervisorMsg};
use actors::sweeper::SweeperArgs;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use crate::adapters::counted::CountedSink;
use crate::adapters::etcd::{EtcdBackend, EtcdCursorOptions, EtcdCursorStore, EtcdOptions};
use crate::adapters::memory::{MemorySink, MemoryStore};
use crate::adapters::postgres::{PostgresOptions, PostgresStore};
use crate::adapters::redis::{RedisSink, RedisSinkOptions};
use crate::config::Config;
use crate::sim::world::WorldConfig;
use crate::sim::{SimConfig, Simulator, ViolationKind};

/// Events the in-memory output keeps per event name; older ones are dropped so that a service
/// left running on the embedded defaults does not grow without limit.
const MEMORY_SINK_KEEP: usize = 10_000;

/// How often the progress line is printed while shards come up.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A failure that stops the main job before its actors run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("missing bot token: set SHARDVISOR_TOKEN or DISCORD_TOKEN, or process.token_file")]
    MissingToken,
    #[error("failed to read the token file {path}: {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the gateway simulator: {0}")]
    Simulator(#[from] crate::sim::StartError),
    #[error("GET {url} failed: {reason}")]
    GatewayBot { url: String, reason: String },
    #[error("the actor tree failed to start: {0}")]
    Spawn(String),
    #[error("failed to claim this process's shards in PostgreSQL: {0}")]
    Claim(#[from] crate::adapters::postgres::ClaimError),
    #[error("failed to connect to {what}: {source}")]
    Backend {
        what: &'static str,
        #[source]
        source: actors::store::PortError,
    },
}

impl RunError {
    /// Returns whether the configuration is at fault (exit status 64), rather than a service
    /// that could not be reached or started (exit status 69).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::MissingToken | Self::TokenFile { .. })
    }
}

/// The outcome of a run, as the summary line prints it.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub shards: u32,
    /// Shards that reached steady.
    pub ready: u32,
    /// Shards parked by a fatal close code or given up after too many restarts.
    pub failed: u32,
    pub buckets: u32,
    pub floor_s: f64,
    pub elapsed_s: f64,
    pub identify_violations: u64,
    pub events: u64,
    pub guilds_cached: u64,
    pub members_cached: u64,
}

impl Summary {
    /// Returns the summary line in its fixed form.
    pub fn line(&self) -> String {
        let ratio = if self.floor_s > 0.0 {
            self.elapsed_s / self.floor_s
        } else {
            0.0
        };
        format!(
            "summary shards={} ready={} buckets={} floor_s={:.1} elapsed_s={:.1} ratio={:.2} identify_violations={} events={} guilds_cached={} members_cached={}",
            self.shards,
            self.ready,
            self.buckets,
            self.floor_s,
            self.elapsed_s,
            ratio,
            self.identify_violations,
            self.events,
            self.guilds_cached,
            self.members_cached
        )
    }

    /// Returns `true` if every shard is steady and no identify limit was broken.
    pub fn is_clean(&self) -> bool {
        self.failed == 0 && self.ready == self.shards && self.identify_violations == 0
    }
}

/// A running service: the tree, its stores and, on the embedded defaults, the simulator.
pub struct Service {
    pub config: Config,
    pub supervisor: ActorRef<SupervisorMsg>,
    supervisor_task: tokio::task::JoinHandle<()>,
    health_task: tokio::task::JoinHandle<()>,
    pub simulator: Option<Simulator>,
    pub store: Arc<dyn StateStore>,
    /// The in-memory store, when it is the configured one (tests read the cache through it).
    pub memory_store: Option<Arc<MemoryStore>>,
    /// The PostgreSQL store, when it is the configured one; shutdown commits its queue.
    postgres: Option<Arc<PostgresStore>>,
    /// This process's claim on its shards in PostgreSQL, released when the service is dropped.
    _claim: Option<crate::adapters::postgres::ShardClaim>,
    /// The sink the shards push to: the configured output behind the global whitelist.
    pub sink: Arc<CountedSink>,
    /// The in-memory output, when it is the configured one.
    pub memory_sink: Option<Arc<MemorySink>>,
    redis: Option<Arc<RedisSink>>,
    pub started: Instant,
    pub max_concurrency: u32,
}

impl Service {
    /// Starts the gateway, the stores and the actor tree.
    ///
    /// # Errors
    ///
    /// Returns an error when the token is missing, the simulator cannot start, `GET /gateway/bot`
    /// fails or the tree cannot be spawned.
    pub async fn start(config: Config) -> Result<Self, RunError> {
        let started = Instant::now();
        warn_unknown_events(&config);
        let (token, simulator) = match &config.gateway.api {
            None => {
                let token = read_token(&config)?.unwrap_or_else(|| {
                    Token::new(format!("local-{:032x}", rand::random::<u128>()))
                });
                let simulator = Simulator::start(simulator_config(&config, token.clone())).await?;
                (token, Some(simulator))
            }
            Some(_) => (read_token(&config)?.ok_or(RunError::MissingToken)?, None),
        };
        let api = match &simulator {
            Some(simulator) => simulator.api_url(),
            None => config.gateway.api.clone().unwrap_or_default(),
        };
        let gateway = fetch_gateway_bot(&api, &token).await?;
        tracing::info!(
            url = %gateway.url,
            recommended_shards = gateway.shards,
            max_concurrency = gateway.session_start_limit.max_concurrency,
            remaining = gateway.session_start_limit.remaining,
            "gateway found"
        );

        let (store, memory_store, postgres) = connect_store(&config).await?;
        // Two processes of one name and range would resume each other's sessions in a loop.
        let claim = match &postgres {
            Some(postgres) => {
                let process = &config.process;
                Some(
                    postgres
                        .claim_shards(&process.name, process.start..process.stop)
                        .await?,
                )
            }
            None => None,
        };
        // Sweep cursors live in etcd with the etcd backend, else in PostgreSQL when it is the
        // store, else in memory.
        let local_cursors: Arc<dyn CursorStore> = match &postgres {
            Some(postgres) => postgres.clone(),
            None => Arc::new(MemoryStore::new()),
        };
        let (sink, memory_sink, redis) = connect_sink(&config).await?;
        let max_concurrency = gateway.session_start_limit.max_concurrency.max(1);
        // Only the in-process backend needs to know: etcd keeps an earlier process's locks.
        let ran_before = mark_shards(&config, store.as_ref()).await;
        let restarted = config.identify.etcd_endpoints.is_none() && ran_before;
        let backends = Backends::connect(&config, &gateway, local_cursors, restarted).await?;
        let mut args = supervisor_args(
            &config,
            token,
            &gateway,
            store.clone(),
            sink.clone(),
            backends,
        );
        // Discord's member request windows of an earlier process's requests are unknown here.
        if ran_before {
            args.shard.member_requests_after =
                Some(std::time::Instant::now() + config.gateway.member_request_window);
        }
        let name = names::supervisor(&config.process.name);
        let (supervisor, supervisor_task) = Actor::spawn(Some(name), Supervisor, args)
            .await
            .map_err(|error| RunError::Spawn(error.to_string()))?;

        let stages = match supervisor.call(SupervisorMsg::Watch, None).await {
            Ok(CallResult::Success(stages)) => stages,
            _ => {
                return Err(RunError::Spawn(
                    "the supervisor stopped right after starting".to_owned(),
                ))
            }
        };
        let health_task = tokio::spawn(log_health(stages, config.health_interval));

        Ok(Self {
            config,
            supervisor,
            supervisor_task,
            health_task,
            simulator,
            store,
            memory_store,
            postgres,
            _claim: claim,
            sink,
            memory_sink,
            redis,
            started,
            max_concurrency,
        })
    }

    /// Shows progress until every shard is steady or failed, then returns the summary.
    pub async fn wait_until_stable(&self) -> Summary {
        let stages = match self.supervisor.call(SupervisorMsg::Watch, None).await {
            Ok(CallResult::Success(stages)) => stages,
            _ => Vec::new(),
        };
        let mut last_print = Instant::now();
        loop {
            let counts = StageCounts::of(&stages);
            if counts.settled() {
                break;
            }
            if last_print.elapsed() >= PROGRESS_EVERY {
                print_line(&counts.progress_line(self.started.elapsed()));
                last_print = Instant::now();
            }
            wait_for_any_change(&stages, PROGRESS_EVERY).await;
        }
        self.summary(&stages).await
    }

    async fn summary(&self, stages: &[(u32, watch::Receiver<ShardStage>)]) -> Summary {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let counts = StageCounts::of(stages);
        let shards = self.config.process.stop - self.config.process.start;
        let window = match &self.simulator {
            Some(simulator) => simulator.config().identify_window,
            None => actors::gateway::IDENTIFY_WINDOW,
        };
        let rounds = shards.div_ceil(self.max_concurrency);
        let identify_violations = self.simulator.as_ref().map_or(0, |simulator| {
            let report = simulator.report();
            report.violation_count(ViolationKind::IdentifyTooFast)
                + report.violation_count(ViolationKind::SessionStartLimitExceeded)
        });
        let totals = self.store.totals().await.unwrap_or_default();
        Summary {
            shards,
            ready: counts.steady,
            failed: counts.failed,
            buckets: self.max_concurrency,
            floor_s: f64::from(rounds) * window.as_secs_f64(),
            elapsed_s,
            identify_violations,
            events: self.sink.pushed(),
            guilds_cached: totals.guilds,
            members_cached: totals.members,
        }
    }

    /// Saves every session, closes every connection with a resumable code and stops the tree.
    pub async fn shutdown(self) {
        self.health_task.abort();
        let _ = self
            .supervisor
            .call(SupervisorMsg::Shutdown, Some(Duration::from_secs(30)))
            .await;
        let _ = self.supervisor_task.await;
        // The shards saved their sessions through the writer's queue. Whatever else is queued
        // is committed before the process goes.
        if let Some(postgres) = self.postgres {
            if let Err(error) = postgres.flush().await {
                tracing::warn!(%error, "PostgreSQL writes left uncommitted at shutdown; the next process resumes and replays them");
            }
        }
        if let Some(redis) = self.redis {
            if let Err(error) = redis.close().await {
                tracing::warn!(%error, "events left undelivered at shutdown; the next process resumes and replays them");
            }
        }
        if let Some(simulator) = self.simulator {
            simulator.shutdown().await;
        }
    }
}

/// Writes one line to standard output. A closed or failing standard output (a log pipe that
/// died) must not stop the service, so the error is dropped, unlike `println!`, which panics.
pub fn print_line(line: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Stage counts across the range.
#[derive(Default)]
struct StageCounts {
    total: u32,
    steady: u32,
    failed: u32,
    connecting: u32,
    waiting_permit: u32,
    waiting_lease: u32,
    identifying: u32,
    resuming: u32,
    streaming: u32,
}

impl StageCounts {
    fn of(stages: &[(u32, watch::Receiver<ShardStage>)]) -> Self {
        let mut counts = Self::default();
        for (_, stage) in stages {
            counts.total += 1;
            match &*stage.borrow() {
                ShardStage::Steady => counts.steady += 1,
                ShardStage::Fatal { .. } | ShardStage::GaveUp { .. } => counts.failed += 1,
                ShardStage::Connecting | ShardStage::Reconnecting { .. } => counts.connecting += 1,
                ShardStage::WaitingForPermit => counts.waiting_permit += 1,
                ShardStage::WaitingForLease { .. } => counts.waiting_lease += 1,
                ShardStage::Identifying => counts.identifying += 1,
                ShardStage::Resuming => counts.resuming += 1,
                ShardStage::StreamingGuilds { .. } | ShardStage::Stabilizing => {
                    counts.streaming += 1
                }
            }
        }
        counts
    }

    fn settled(&self) -> bool {
        self.total > 0 && self.steady + self.failed == self.total
    }

    fn progress_line(&self, elapsed: Duration) -> String {
        format!(
            "progress elapsed_s={:.0} steady={}/{} streaming={} identifying={} resuming={} waiting_lease={} waiting_permit={} connecting={} failed={}",
            elapsed.as_secs_f64(),
            self.steady,
            self.total,
            self.streaming,
            self.identifying,
            self.resuming,
            self.waiting_lease,
            self.waiting_permit,
            self.connecting,
            self.failed
        )
    }
}

/// Logs how many shards of the range are not steady, every `interval`; after a mass reconnect
/// the number should fall to 0 quickly.
async fn log_health(stages: Vec<(u32, watch::Receiver<ShardStage>)>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let total = stages.len();
        let unstable = stages
            .iter()
            .filter(|(_, stage)| !stage.borrow().is_steady())
            .count();
        tracing::info!("unstable={unstable} total={total}");
    }
}

async fn wait_for_any_change(stages: &[(u32, watch::Receiver<ShardStage>)], limit: Duration) {
    let mut receivers: Vec<watch::Receiver<ShardStage>> =
        stages.iter().map(|(_, r)| r.clone()).collect();
    let changes = receivers
        .iter_mut()
        .map(|receiver| Box::pin(receiver.changed()));
    let any = futures_util::future::select_all(changes);
    let _ = tokio::time::timeout(limit, any).await;
}

fn read_token(config: &Config) -> Result<Option<Token>, RunError> {
    for name in ["SHARDVISOR_TOKEN", "DISCORD_TOKEN"] {
        if let Ok(token) = std::env::var(name) {
            if !token.trim().is_empty() {
                return Ok(Some(Token::new(token)));
            }
        }
    }
    match &config.process.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| Some(Token::new(text)))
            .map_err(|source| RunError::TokenFile {
                path: path.clone(),
                source,
            }),
        None => Ok(None),
    }
}

fn simulator_config(config: &Config, token: Token) -> SimConfig {
    let sim = &config.simulator;
    SimConfig {
        token,
        shards: config.process.shards,
        max_concurrency: sim.max_concurrency,
        heartbeat_interval: sim.heartbeat_interval,
        heartbeat_timeout: sim.heartbeat_interval + Duration::from_secs(10),
        identify_window: sim.identify_window,
        member_request_window: sim.member_request_window,
        session_start_total: sim.session_start_total,
        session_start_remaining: sim.session_start_total,
        dispatch_rate: sim.dispatch_rate,
        ready_delay: sim.ready_delay,
        world: WorldConfig {
            seed: sim.seed,
            guilds: sim.guilds,
            shard_count: config.process.shards,
            largest_guild: sim.largest_guild,
        },
        ..SimConfig::default()
    }
}

/// Fetches `GET /gateway/bot`: the gateway URL and the session-start budget.
async fn fetch_gateway_bot(api: &str, token: &Token) -> Result<GatewayBot, RunError> {
    let url = format!("{api}/gateway/bot");
    let error = |reason: String| RunError::GatewayBot {
        url: url.clone(),
        reason,
    };
    let response = reqwest::Client::new()
        .get(&url)
        .header("Authorization", format!("Bot {}", token.expose()))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| error(crate::adapters::error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 => "; the token was rejected: check SHARDVISOR_TOKEN",
            404 => "; gateway.api must be the API base (ending in /api/v10), without /gateway/bot",
            _ => "",
        };
        return Err(error(format!("HTTP {status}{hint}")));
    }
    response
        .json::<GatewayBot>()
        .await
        .map_err(|e| error(format!("invalid response: {e}")))
}

/// The configured guild-state cache, as the shards use it and as the concrete store.
type Stores = (
    Arc<dyn StateStore>,
    Option<Arc<MemoryStore>>,
    Option<Arc<PostgresStore>>,
);

/// Connects the configured guild-state cache.
async fn connect_store(config: &Config) -> Result<Stores, RunError> {
    let Some(postgres) = &config.store.postgres else {
        let memory = Arc::new(MemoryStore::new());
        return Ok((memory.clone(), Some(memory), None));
    };
    let mut options = PostgresOptions::new(postgres.url.clone());
    options.batch_rows = postgres.batch_rows;
    options.max_age = postgres.max_age;
    options.queue_rows = postgres.queue_rows;
    let store = PostgresStore::connect(options)
        .await
        .map_err(|source| RunError::Backend {
            what: "PostgreSQL (state store)",
            source,
        })?;
    tracing::info!("state store: PostgreSQL");
    let store = Arc::new(store);
    Ok((store.clone(), None, Some(store)))
}

/// Connects the configured event output and wraps it with the global whitelist and the count.
async fn connect_sink(
    config: &Config,
) -> Result<
    (
        Arc<CountedSink>,
        Option<Arc<MemorySink>>,
        Option<Arc<RedisSink>>,
    ),
    RunError,
> {
    let Some(redis) = &config.events.redis else {
        let memory = Arc::new(MemorySink::bounded(MEMORY_SINK_KEEP));
        let sink = CountedSink::new(memory.clone(), &config.events.whitelist);
        return Ok((Arc::new(sink), Some(memory), None));
    };

    let options = RedisSinkOptions {
        targets: redis.targets.clone(),
        whitelist: config.events.whitelist.clone(),
        buffer_events: redis.buffer_events,
        overflow: redis.overflow,
        key_prefix: redis.key_prefix.clone(),
        ..RedisSinkOptions::default()
    };
    let sink = RedisSink::connect(options)
        .await
        .map_err(|source| RunError::Backend {
            what: "Redis (event output)",
            source,
        })?;
    let sink = Arc::new(sink);
    // The Redis sink applies the whitelists itself, per target.
    Ok((
        Arc::new(CountedSink::new(sink.clone(), &[])),
        None,
        Some(sink),
    ))
}

/// Logs a warning for each whitelisted event name missing from the gateway event list. Such a
/// name is most likely a typo, which would keep that event from ever being pushed.
fn warn_unknown_events(config: &Config) {
    let global = config
        .events
        .whitelist
        .iter()
        .map(|name| ("events.whitelist", name));
    let targets = config
        .events
        .redis
        .iter()
        .flat_map(|redis| &redis.targets)
        .flat_map(|target| target.whitelist.iter().flatten())
        .map(|name| ("events.multi_redis", name));
    for (key, name) in global.chain(targets) {
        if !actors::gateway::events::is_known_event(name) {
            tracing::warn!(
                key,
                event = %name,
                "unknown gateway event name; check the spelling, or ignore this for an event Discord added recently"
            );
        }
    }
}

/// Returns whether the store contains a record of a shard of this process, and saves a first
/// record for each shard that has none. Those records, saved before any IDENTIFY, show a
/// successor that this process ran the shards even if it dies before READY; the successor then
/// waits out the identify window this process may have opened. A store that cannot be read
/// counts as holding a record, so the start errs on the side of waiting.
async fn mark_shards(config: &Config, store: &dyn StateStore) -> bool {
    let process = &config.process;
    let mut ran_before = false;
    let mut missing = Vec::new();
    for shard in process.start..process.stop {
        match store.load_shard(shard, &process.name).await {
            Ok(Some(_)) => ran_before = true,
            Ok(None) => missing.push(shard),
            Err(error) => {
                tracing::warn!(shard, %error, "failed to read the stored session");
                ran_before = true;
            }
        }
    }
    // Saved together, so that a batching store commits them in one flush.
    let saves = missing.into_iter().map(|shard| async move {
        let record = ShardRecord {
            shard,
            name: process.name.clone(),
            seq: 0,
            session_id: None,
            resume_url: None,
            status: ShardStage::Connecting.name().to_owned(),
        };
        if let Err(error) = store.save_shard(&record).await {
            tracing::warn!(shard, %error, "failed to save the first shard record");
        }
    });
    futures_util::future::join_all(saves).await;
    ran_before
}

/// The identify backend and the sweep cursor store selected by the configuration.
struct Backends {
    identify: Arc<dyn IdentifyBackend>,
    cursors: Arc<dyn CursorStore>,
}

impl Backends {
    /// `restarted` is `true` when the state store contains records of this process's shards,
    /// so an earlier process ran them.
    /// `local_cursors` keeps the sweep cursors unless etcd does.
    async fn connect(
        config: &Config,
        gateway: &GatewayBot,
        local_cursors: Arc<dyn CursorStore>,
        restarted: bool,
    ) -> Result<Self, RunError> {
        let budget = session_budget(config, gateway);
        let Some(endpoints) = &config.identify.etcd_endpoints else {
            let mut identify = InProcessBackend::new(budget);
            // The earlier process may have died right after an IDENTIFY, with its window still
            // open at Discord. With etcd its bucket lock outlives it instead.
            if restarted {
                let quiet = config.identify.pacing + config.identify.grace;
                tracing::info!(
                    quiet_ms = quiet.as_millis() as u64,
                    "an earlier process ran these shards: no IDENTIFY until its last window has passed"
                );
                identify = identify.quiet_for(quiet);
            }
            return Ok(Self {
                identify: Arc::new(identify),
                cursors: local_cursors,
            });
        };

        let mut options = EtcdOptions::new(endpoints.clone(), budget);
        options.prefix = config.identify.etcd_prefix.clone();
        let identify = EtcdBackend::connect(options)
            .await
            .map_err(|source| RunError::Backend {
                what: "etcd (identify backend)",
                source,
            })?;
        let mut cursor_options = EtcdCursorOptions::new(endpoints.clone());
        cursor_options.prefix = config.identify.sweep_etcd_prefix.clone();
        let cursors = EtcdCursorStore::connect(cursor_options)
            .await
            .map_err(|source| RunError::Backend {
                what: "etcd (sweep cursors)",
                source,
            })?;
        tracing::info!(endpoints = ?endpoints, prefix = %config.identify.etcd_prefix, "identify backend: etcd");
        Ok(Self {
            identify: Arc::new(identify),
            cursors: Arc::new(cursors),
        })
    }
}

/// Returns the session-start budget `GET /gateway/bot` reported, with the configured reserve.
fn session_budget(config: &Config, gateway: &GatewayBot) -> SessionBudget {
    let limit = &gateway.session_start_limit;
    SessionBudget {
        total: limit.total,
        remaining: limit.remaining,
        reset_after: Duration::from_millis(limit.reset_after),
        reserve: config.identify.session_start_reserve,
    }
}

fn supervisor_args(
    config: &Config,
    token: Token,
    gateway: &GatewayBot,
    store: Arc<dyn StateStore>,
    sink: Arc<CountedSink>,
    backends: Backends,
) -> SupervisorArgs {
    let max_concurrency = gateway.session_start_limit.max_concurrency.max(1);
    let gw = &config.gateway;
    let sweeper = config.sweep.enabled.then(|| SweeperArgs {
        store: store.clone(),
        cursors: backends.cursors,
        name: config.process.name.clone(),
        shard_count: config.process.shards,
        shards: config.process.start..config.process.stop,
        batch: config.sweep.batch,
        requests_per_second: config.sweep.requests_per_second,
        start_paused: false,
        cursor_save_interval: Duration::from_secs(10),
        retry: Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        },
    });
    let store: Arc<dyn StateStore> = store;
    let sink: Arc<dyn EventSink> = sink;
    let shard = ShardArgs {
        shard: 0,
        shard_count: config.process.shards,
        max_concurrency,
        name: config.process.name.clone(),
        token,
        gateway_url: gateway.url.clone(),
        compress: gw.compress,
        intents: gw.intents,
        large_threshold: gw.large_threshold,
        request_members: config.backfill.request_members,
        divergence_ratio: config.backfill.divergence_ratio,
        stabilize: StabilizeMode::Fixed(config.stabilize.hold),
        stabilize_max: config.stabilize.max_hold,
        guild_timeout: gw.guild_timeout,
        connect_timeout: gw.connect_timeout,
        reconnect_backoff: Backoff {
            base: gw.reconnect_backoff_base,
            max: gw.reconnect_backoff_max,
        },
        invalid_session_wait: gw.invalid_session_wait,
        member_request_window: gw.member_request_window,
        member_requests_after: None,
        save_every: gw.save_every,
        store,
        sink,
        stage: watch::channel(ShardStage::Connecting).0,
    };
    let supervision = &config.supervision;
    SupervisorArgs {
        range: config.process.start..config.process.stop,
        shard,
        coordinator: CoordinatorArgs {
            max_concurrency,
            pacing: config.identify.pacing,
            grace: config.identify.grace,
            unsent_timeout: config.identify.unsent_timeout,
            backend_retry: Duration::from_millis(500),
            backend: backends.identify,
        },
        gate: GateArgs {
            permits: config.stabilize.permits,
            buckets: max_concurrency,
            max_hold: config.stabilize.max_hold,
        },
        sweeper,
        restart: RestartPolicy {
            backoff: Backoff {
                base: supervision.backoff_base,
                max: supervision.backoff_max,
            },
            shard_max_restarts: supervision.shard_max_restarts,
            shard_window: supervision.shard_window,
            tree_max_restarts: supervision.tree_max_restarts,
            tree_window: supervision.tree_window,
            log_capacity: supervision.restart_log,
        },
    }
}
