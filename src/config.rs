//! Configuration: `config.toml` (embedded as the defaults), an optional file over it, and
//! environment variables over both.
//!
//! Every key is read through one table of key specifications, so every bad key is reported at
//! once with its value, where it came from and the fix, and a key nobody reads is an error rather
//! than a silent no-op.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use actors::gateway::Intents;
use toml::{Table, Value};

/// The repository's `config.toml`: the defaults, and the documentation of every key.
pub const DEFAULTS: &str = include_str!("../config.toml");

/// The origin of a value, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Defaults,
    File(String),
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Defaults => f.write_str("the built-in defaults"),
            Self::File(path) => write!(f, "{path}"),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Flag(name) => write!(f, "command-line flag --{name}"),
        }
    }
}

/// One invalid setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub source: Source,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} = {} (from {}): {}",
            self.key, self.value, self.source, self.fix
        )
    }
}

/// Every invalid setting found while loading.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The spelling of a value in an environment variable of the replaced service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LegacyForm {
    /// The same form as the key.
    Same,
    /// A number of seconds, for a duration key.
    Seconds,
    /// A comma-separated list, for a list key.
    CommaList,
    /// Verbatim text, for a string key whose value is itself structured (JSON).
    Text,
    /// `true`, `false`, `1`, `0`, `yes`, `no`, `on` or `off`, in any case, for a boolean key.
    Boolean,
}

/// One known key: its path and the variable of the replaced service that also sets it.
struct KeySpec {
    path: &'static str,
    legacy: Option<(&'static str, LegacyForm)>,
}

const fn key(path: &'static str) -> KeySpec {
    KeySpec { path, legacy: None }
}

const fn legacy(path: &'static str, name: &'static str, form: LegacyForm) -> KeySpec {
    KeySpec {
        path,
        legacy: Some((name, form)),
    }
}

const KEYS: &[KeySpec] = &[
    key("process.name"),
    key("process.shards"),
    key("process.start"),
    key("process.stop"),
    key("process.token_file"),
    key("gateway.api"),
    key("gateway.intents"),
    key("gateway.large_threshold"),
    key("gateway.compress"),
    key("gateway.connect_timeout"),
    key("gateway.guild_timeout"),
    key("gateway.invalid_session_wait"),
    key("gateway.member_request_window"),
    key("gateway.reconnect_backoff_base"),
    key("gateway.reconnect_backoff_max"),
    key("gateway.save_every"),
    key("identify.backend"),
    key("identify.etcd_endpoints"),
    key("identify.etcd_prefix"),
    key("sweep.etcd_prefix"),
    legacy(
        "identify.pacing",
        "IDENTIFY_PACING_SECONDS",
        LegacyForm::Seconds,
    ),
    key("identify.grace"),
    key("identify.unsent_timeout"),
    key("identify.session_start_reserve"),
    legacy(
        "stabilize.permits",
        "IDENTIFY_STABILIZE_CONCURRENCY",
        LegacyForm::Same,
    ),
    key("stabilize.mode"),
    legacy(
        "stabilize.hold",
        "IDENTIFY_STABILIZE_SECONDS",
        LegacyForm::Seconds,
    ),
    legacy(
        "stabilize.max_hold",
        "IDENTIFY_STABILIZE_SECONDS_MAX",
        LegacyForm::Seconds,
    ),
    key("backfill.request_members"),
    legacy(
        "backfill.divergence_ratio",
        "BACKFILL_DIVERGENCE_RATIO",
        LegacyForm::Same,
    ),
    legacy(
        "sweep.enabled",
        "BACKFILL_SWEEP_ENABLED",
        LegacyForm::Boolean,
    ),
    legacy("sweep.batch", "BACKFILL_SWEEP_BATCH", LegacyForm::Same),
    legacy(
        "sweep.requests_per_second",
        "BACKFILL_SWEEP_REQUESTS_PER_SECOND",
        LegacyForm::Same,
    ),
    key("store.backend"),
    key("store.postgres_url"),
    key("store.batch_rows"),
    key("store.max_age"),
    key("store.queue_rows"),
    key("events.sink"),
    key("events.redis_url"),
    legacy("events.multi_redis", "MULTI_REDIS", LegacyForm::Text),
    key("events.buffer_events"),
    key("events.key_prefix"),
    key("events.overflow"),
    legacy(
        "events.whitelist",
        "WHITELIST_EVENTS",
        LegacyForm::CommaList,
    ),
    key("supervision.backoff_base"),
    key("supervision.backoff_max"),
    key("supervision.shard_max_restarts"),
    key("supervision.shard_window"),
    key("supervision.tree_max_restarts"),
    key("supervision.tree_window"),
    key("supervision.restart_log"),
    key("simulator.max_concurrency"),
    key("simulator.guilds"),
    key("simulator.largest_guild"),
    key("simulator.seed"),
    key("simulator.session_start_total"),
    key("simulator.identify_window"),
    key("simulator.heartbeat_interval"),
    key("simulator.member_request_window"),
    key("simulator.dispatch_rate"),
    key("simulator.ready_delay"),
    key("log.format"),
    key("log.health_interval"),
];

/// Process identity and range.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessConfig {
    pub name: String,
    pub shards: u32,
    pub start: u32,
    /// One past the last shard of the range.
    pub stop: u32,
    pub token_file: Option<String>,
}

/// The gateway address and the connection settings of the shards.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayConfig {
    /// `None` for the built-in simulator, else Discord's HTTP API base.
    pub api: Option<String>,
    pub intents: Intents,
    pub large_threshold: u32,
    pub compress: bool,
    pub connect_timeout: Duration,
    pub guild_timeout: Duration,
    pub invalid_session_wait: Duration,
    pub member_request_window: Duration,
    pub reconnect_backoff_base: Duration,
    pub reconnect_backoff_max: Duration,
    pub save_every: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IdentifyConfig {
    /// etcd client URLs when the etcd backend is selected; `None` for the in-process backend.
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: String,
    /// Key prefix of the sweep cursors in etcd.
    pub sweep_etcd_prefix: String,
    pub pacing: Duration,
    pub grace: Duration,
    pub unsent_timeout: Duration,
    /// IDENTIFY is refused while the fleet's remaining session starts are at or below this.
    pub session_start_reserve: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StabilizeConfig {
    pub permits: u32,
    pub hold: Duration,
    pub max_hold: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackfillConfig {
    pub request_members: bool,
    pub divergence_ratio: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SweepConfig {
    pub enabled: bool,
    pub batch: u32,
    pub requests_per_second: f64,
}

/// The guild-state cache.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreConfig {
    /// `None` for the in-memory store.
    pub postgres: Option<PostgresStoreConfig>,
}

/// The PostgreSQL cache and its batched writer.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresStoreConfig {
    pub url: String,
    pub batch_rows: usize,
    pub max_age: Duration,
    pub queue_rows: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventsConfig {
    /// Event names to push; empty pushes every event.
    pub whitelist: Vec<String>,
    /// `None` for the in-memory sink.
    pub redis: Option<RedisOutput>,
}

/// The Redis output: one target, or several with their own whitelists.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisOutput {
    /// Addresses and whitelists of every target.
    pub targets: Vec<crate::adapters::redis::TargetOptions>,
    pub buffer_events: usize,
    pub overflow: crate::adapters::redis::Overflow,
    /// Prepended to the event name to make the list key.
    pub key_prefix: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SupervisionConfig {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub shard_max_restarts: u32,
    pub shard_window: Duration,
    pub tree_max_restarts: u32,
    pub tree_window: Duration,
    pub restart_log: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorConfig {
    pub max_concurrency: u32,
    pub guilds: u32,
    pub largest_guild: u32,
    pub seed: u64,
    /// Daily session starts of the simulated bot.
    pub session_start_total: u32,
    pub identify_window: Duration,
    pub heartbeat_interval: Duration,
    pub member_request_window: Duration,
    pub dispatch_rate: f64,
    pub ready_delay: Duration,
}

/// The whole configuration, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub process: ProcessConfig,
    pub gateway: GatewayConfig,
    pub identify: IdentifyConfig,
    pub stabilize: StabilizeConfig,
    pub backfill: BackfillConfig,
    pub sweep: SweepConfig,
    pub store: StoreConfig,
    pub events: EventsConfig,
    pub supervision: SupervisionConfig,
    pub simulator: SimulatorConfig,
    pub json_logs: bool,
    /// Time between two `unstable=N total=M` lines.
    pub health_interval: Duration,
}

/// Command-line values that override the configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub shards: Option<u32>,
    pub start: Option<u32>,
    pub stop: Option<u32>,
}

impl Config {
    /// Loads the defaults, then `path` if given, then the process environment, then `overrides`.
    ///
    /// # Errors
    ///
    /// Returns every invalid or unknown key.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigErrors> {
        let file = match path {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    ConfigErrors(vec![ConfigError {
                        key: "--config".to_owned(),
                        value: path.display().to_string(),
                        source: Source::File(path.display().to_string()),
                        fix: format!(
                            "the file cannot be read ({error}); pass a readable TOML file"
                        ),
                    }])
                })?;
                Some((path.display().to_string(), text))
            }
        };
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(
            file.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
            &env,
            overrides,
        )
    }

    /// Loads from explicit sources; `env` stands for the process environment.
    ///
    /// # Errors
    ///
    /// Returns every invalid or unknown key.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: &BTreeMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigErrors> {
        let mut values = Values::default();
        let mut errors = Vec::new();

        let defaults: Table = DEFAULTS
            .parse()
            .expect("the embedded config.toml is valid TOML");
        values.merge(&defaults, &Source::Defaults, &mut errors);
        if let Some((path, text)) = file {
            match text.parse::<Table>() {
                Ok(table) => values.merge(&table, &Source::File(path.to_owned()), &mut errors),
                Err(error) => errors.push(ConfigError {
                    key: "--config".to_owned(),
                    value: path.to_owned(),
                    source: Source::File(path.to_owned()),
                    fix: format!(
                        "the file is not valid TOML{}: {}",
                        error
                            .span()
                            .map(|span| position(text, span.start))
                            .unwrap_or_default(),
                        error.message()
                    ),
                }),
            }
        }
        values.apply_env(env, &mut errors);
        values.apply_overrides(overrides);

        let config = Reader {
            values: &values,
            errors: &mut errors,
        }
        .read();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// The merged values, each with its source.
#[derive(Default)]
struct Values {
    entries: BTreeMap<&'static str, (Value, Source)>,
}

impl Values {
    fn merge(&mut self, table: &Table, source: &Source, errors: &mut Vec<ConfigError>) {
        for (section, content) in table {
            let Some(keys) = content.as_table() else {
                errors.push(ConfigError {
                    key: section.clone(),
                    value: content.to_string(),
                    source: source.clone(),
                    fix: "top-level entries are sections such as [process]; put the key inside one"
                        .to_owned(),
                });
                continue;
            };
            for (name, value) in keys {
                let path = format!("{section}.{name}");
                match KEYS.iter().find(|spec| spec.path == path) {
                    Some(spec) => {
                        self.entries
                            .insert(spec.path, (value.clone(), source.clone()));
                    }
                    None => errors.push(ConfigError {
                        key: path,
                        value: value.to_string(),
                        source: source.clone(),
                        fix: "unknown key; config.toml lists every key".to_owned(),
                    }),
                }
            }
        }
    }

    fn apply_env(&mut self, env: &BTreeMap<String, String>, errors: &mut Vec<ConfigError>) {
        for spec in KEYS {
            if let Some((name, form)) = spec.legacy {
                if let Some(text) = env.get(name) {
                    match legacy_value(text, form) {
                        Some(value) => {
                            self.entries
                                .insert(spec.path, (value, Source::Env(name.to_owned())));
                        }
                        None => errors.push(ConfigError {
                            key: spec.path.to_owned(),
                            value: text.clone(),
                            source: Source::Env(name.to_owned()),
                            fix: match form {
                                LegacyForm::Boolean => {
                                    "write true or false (1, 0, yes and no work too)"
                                }
                                _ => "write a number of seconds, such as 10 or 0.5",
                            }
                            .to_owned(),
                        }),
                    }
                }
            }

            // The SHARDVISOR_ variable wins over the replaced service's name. A list key also
            // takes a comma-separated list, as the replaced service's variables do.
            let name = env_name(spec.path);
            if let Some(text) = env.get(&name) {
                let is_list = matches!(self.entries.get(spec.path), Some((Value::Array(_), _)));
                let mut value = env_value(text);
                if is_list && !value.is_array() {
                    value = legacy_value(text, LegacyForm::CommaList).unwrap_or(value);
                }
                self.entries.insert(spec.path, (value, Source::Env(name)));
            }
        }

        // A misspelt variable would otherwise be ignored without a word.
        for (name, value) in env {
            let known = KEYS.iter().any(|spec| env_name(spec.path) == *name);
            let reserved = NON_KEY_VARIABLES.contains(&name.as_str());
            if name.starts_with("SHARDVISOR_") && !known && !reserved {
                errors.push(ConfigError {
                    key: name.clone(),
                    value: value.clone(),
                    source: Source::Env(name.clone()),
                    fix: "unknown variable; variables are SHARDVISOR_<SECTION>_<KEY> for the keys config.toml lists".to_owned(),
                });
            }
        }
    }

    fn apply_overrides(&mut self, overrides: &Overrides) {
        let flag = |name: &str| Source::Flag(name.to_owned());
        if let Some(name) = &overrides.name {
            self.entries
                .insert("process.name", (Value::String(name.clone()), flag("name")));
        }
        for (path, value, name) in [
            ("process.shards", overrides.shards, "shards"),
            ("process.start", overrides.start, "start"),
            ("process.stop", overrides.stop, "stop"),
        ] {
            if let Some(value) = value {
                self.entries
                    .insert(path, (Value::Integer(i64::from(value)), flag(name)));
            }
        }
    }
}

/// Variables with the SHARDVISOR_ prefix that are not configuration keys.
const NON_KEY_VARIABLES: &[&str] = &["SHARDVISOR_TOKEN", "SHARDVISOR_SIM_TOKEN"];

/// Returns the environment variable of a key: `SHARDVISOR_<SECTION>_<KEY>` in upper case.
fn env_name(path: &str) -> String {
    format!("SHARDVISOR_{}", path.replace('.', "_").to_uppercase())
}

/// Turns an environment string into a TOML value: a TOML literal if it parses as one (numbers,
/// booleans, arrays), else a string.
fn env_value(text: &str) -> Value {
    let wrapped = format!("v = {text}");
    match wrapped.parse::<Table>() {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| Value::String(text.to_owned())),
        Err(_) => Value::String(text.to_owned()),
    }
}

/// Returns " at line L, column C" for a byte offset into `text`.
fn position(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|c| *c != '\n').count() + 1;
    format!(" at line {line}, column {column}")
}

fn legacy_value(text: &str, form: LegacyForm) -> Option<Value> {
    match form {
        LegacyForm::Boolean => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Some(Value::Boolean(false)),
            _ => None,
        },
        LegacyForm::Same => Some(env_value(text)),
        LegacyForm::Seconds => {
            let seconds: f64 = text.trim().parse().ok()?;
            (seconds.is_finite() && seconds >= 0.0)
                .then(|| Value::String(format!("{}ms", (seconds * 1000.0).round() as u64)))
        }
        LegacyForm::Text => Some(Value::String(text.to_owned())),
        LegacyForm::CommaList => Some(Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(|name| Value::String(name.to_owned()))
                .collect(),
        )),
    }
}

/// Reads typed values, recording an error for each bad one and going on.
struct Reader<'a> {
    values: &'a Values,
    errors: &'a mut Vec<ConfigError>,
}

impl Reader<'_> {
    fn fail(&mut self, path: &str, fix: impl Into<String>) {
        let (value, source) = self
            .values
            .entries
            .get(path)
            .map(|(value, source)| (value.to_string(), source.clone()))
            .unwrap_or_else(|| ("(missing)".to_owned(), Source::Defaults));
        self.errors.push(ConfigError {
            key: path.to_owned(),
            value,
            source,
            fix: fix.into(),
        });
    }

    fn source(&self, path: &str) -> Source {
        self.values
            .entries
            .get(path)
            .map_or(Source::Defaults, |(_, source)| source.clone())
    }

    fn value(&self, path: &str) -> Option<&Value> {
        self.values.entries.get(path).map(|(value, _)| value)
    }

    fn string(&mut self, path: &str) -> String {
        match self.value(path) {
            Some(Value::String(text)) => text.clone(),
            _ => {
                self.fail(path, "write a quoted string");
                String::new()
            }
        }
    }

    fn boolean(&mut self, path: &str) -> bool {
        match self.value(path) {
            Some(Value::Boolean(flag)) => *flag,
            Some(Value::String(text)) if text == "true" || text == "false" => text == "true",
            _ => {
                self.fail(path, "write true or false");
                false
            }
        }
    }

    fn integer(&mut self, path: &str, min: i64, max: i64) -> i64 {
        match self.value(path) {
            Some(Value::Integer(number)) if (min..=max).contains(number) => *number,
            _ => {
                self.fail(path, format!("write a whole number from {min} to {max}"));
                min
            }
        }
    }

    fn u32(&mut self, path: &str, min: u32) -> u32 {
        self.integer(path, i64::from(min), i64::from(u32::MAX)) as u32
    }

    fn float(&mut self, path: &str, min: f64, max: f64) -> f64 {
        let number = match self.value(path) {
            Some(Value::Float(number)) => Some(*number),
            Some(Value::Integer(number)) => Some(*number as f64),
            _ => None,
        };
        match number.filter(|n| n.is_finite() && *n >= min && *n <= max) {
            Some(number) => number,
            None => {
                self.fail(path, format!("write a number from {min} to {max}"));
                min
            }
        }
    }

    fn duration(&mut self, path: &str, min: Duration) -> Duration {
        let parsed = match self.value(path) {
            Some(Value::String(text)) => humantime::parse_duration(text).ok(),
            _ => None,
        };
        match parsed.filter(|d| *d >= min) {
            Some(duration) => duration,
            None => {
                self.fail(
                    path,
                    format!(
                        "write a duration of at least {} with a unit, such as \"5s\" or \"250ms\"",
                        humantime::format_duration(min)
                    ),
                );
                min
            }
        }
    }

    fn choice(&mut self, path: &str, allowed: &[&str]) -> String {
        let text = self.string(path);
        if !allowed.contains(&text.as_str()) {
            self.fail(path, format!("use one of: {}", allowed.join(", ")));
        }
        text
    }

    fn strings(&mut self, path: &str) -> Vec<String> {
        match self.value(path) {
            Some(Value::Array(items)) if items.iter().all(Value::is_str) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            _ => {
                self.fail(
                    path,
                    "write a list of quoted strings, such as [\"a\", \"b\"]",
                );
                Vec::new()
            }
        }
    }

    fn intents(&mut self, path: &str) -> Intents {
        let mut intents = Intents::default();
        for name in self.strings(path) {
            match intent_by_name(&name) {
                Some(intent) => intents = intents | intent,
                None => self.fail(path, format!("unknown intent {name:?}; use Discord's intent names in lower case, such as \"guilds\" or \"guild_members\"")),
            }
        }
        intents
    }

    fn read(mut self) -> Config {
        let process = self.read_process();
        let gateway = self.read_gateway();
        let backend = self.choice("identify.backend", &["in-process", "etcd"]);
        let endpoints = self.strings("identify.etcd_endpoints");
        if backend == "etcd" && endpoints.is_empty() {
            self.fail(
                "identify.etcd_endpoints",
                "list at least one etcd client URL, such as [\"http://127.0.0.1:2379\"]",
            );
        }
        let identify = IdentifyConfig {
            etcd_endpoints: (backend == "etcd").then_some(endpoints),
            etcd_prefix: self.string("identify.etcd_prefix"),
            sweep_etcd_prefix: self.string("sweep.etcd_prefix"),
            pacing: self.duration("identify.pacing", Duration::ZERO),
            grace: self.duration("identify.grace", Duration::ZERO),
            unsent_timeout: self.duration("identify.unsent_timeout", Duration::from_secs(1)),
            session_start_reserve: self.u32("identify.session_start_reserve", 0),
        };
        let stabilize = StabilizeConfig {
            permits: self.u32("stabilize.permits", 1),
            hold: self.duration("stabilize.hold", Duration::ZERO),
            max_hold: self.duration("stabilize.max_hold", Duration::ZERO),
        };
        self.choice("stabilize.mode", &["fixed"]);
        if stabilize.max_hold < stabilize.hold {
            let source = self.source("stabilize.hold");
            self.fail(
                "stabilize.max_hold",
                format!(
                    "use at least stabilize.hold, which is {} from {source}; raise both together (IDENTIFY_STABILIZE_SECONDS_MAX with IDENTIFY_STABILIZE_SECONDS)",
                    humantime::format_duration(stabilize.hold)
                ),
            );
        }
        let backfill = BackfillConfig {
            request_members: self.boolean("backfill.request_members"),
            divergence_ratio: self.float("backfill.divergence_ratio", 0.0, 1.0),
        };
        if backfill.request_members && !gateway.intents.contains(Intents::GUILD_MEMBERS) {
            self.fail("backfill.request_members", "requesting members needs the guild_members intent in gateway.intents; add it or set this to false");
        }
        let sweep = SweepConfig {
            enabled: self.boolean("sweep.enabled"),
            batch: self.u32("sweep.batch", 1),
            requests_per_second: self.float("sweep.requests_per_second", 0.001, 1000.0),
        };
        let store = self.read_store();
        let events = self.read_events();
        let supervision = self.read_supervision();
        let simulator = self.read_simulator();
        self.check_pacing(&gateway, &identify, &simulator);
        let json_logs = self.choice("log.format", &["human", "json"]) == "json";
        let health_interval = self.duration("log.health_interval", Duration::from_secs(1));
        Config {
            process,
            gateway,
            identify,
            stabilize,
            backfill,
            sweep,
            store,
            events,
            supervision,
            simulator,
            json_logs,
            health_interval,
        }
    }

    /// Pacing below the gateway's identify window would break Discord's limit.
    fn check_pacing(
        &mut self,
        gateway: &GatewayConfig,
        identify: &IdentifyConfig,
        simulator: &SimulatorConfig,
    ) {
        let window = match gateway.api {
            Some(_) => actors::gateway::IDENTIFY_WINDOW,
            None => simulator.identify_window,
        };
        let pacing_invalid = self
            .errors
            .iter()
            .any(|error| error.key == "identify.pacing");
        if !pacing_invalid && identify.pacing < window {
            self.fail(
                "identify.pacing",
                format!(
                    "use at least the gateway's identify window, {}",
                    humantime::format_duration(window)
                ),
            );
        }
    }

    fn read_process(&mut self) -> ProcessConfig {
        let errors_before = self.errors.len();
        let name = self.string("process.name");
        if self.errors.len() == errors_before && (name.is_empty() || name.contains('/')) {
            self.fail("process.name", "use a non-empty name without '/'");
        }
        let errors_before = self.errors.len();
        let shards = self.u32("process.shards", 1);
        let start = self.u32("process.start", 0);
        let stop = match self.u32("process.stop", 0) {
            0 => shards,
            stop => stop,
        };
        // The range is checked only against valid numbers, each bound on its own.
        if self.errors.len() == errors_before {
            if start >= shards {
                self.fail(
                    "process.start",
                    format!("use a shard below process.shards ({shards})"),
                );
            }
            if stop > shards || (start < shards && stop <= start) {
                self.fail(
                    "process.stop",
                    format!("the range {start}..{stop} must satisfy start < stop <= shards ({shards}); 0 means up to shards"),
                );
            }
        }
        let token_file = self.string("process.token_file");
        if !token_file.is_empty() {
            match std::fs::read_to_string(&token_file) {
                Ok(text) if text.trim().is_empty() => {
                    self.fail(
                        "process.token_file",
                        "the file is empty; put the bot token in it",
                    );
                }
                Ok(_) => {}
                Err(error) => self.fail(
                    "process.token_file",
                    format!("the file cannot be read ({error}); fix the path or its permissions"),
                ),
            }
        }
        ProcessConfig {
            name,
            shards,
            start,
            stop,
            token_file: (!token_file.is_empty()).then_some(token_file),
        }
    }

    fn read_gateway(&mut self) -> GatewayConfig {
        let api = self.string("gateway.api");
        let api = match api.as_str() {
            "simulator" => None,
            // NOTE: the HTTP and WebSocket clients are built without TLS, so Discord itself
            // (https:// and wss://) cannot be reached yet; only plain-HTTP gateways can.
            url if url.starts_with("https://") => {
                self.fail("gateway.api", "TLS is not compiled into this build yet; use \"simulator\" or a plain http:// gateway such as an external `shardvisor sim`");
                None
            }
            url if url.starts_with("http://") => Some(url.trim_end_matches('/').to_owned()),
            _ => {
                self.fail(
                    "gateway.api",
                    "use \"simulator\" or the API base of a plain-HTTP gateway, such as \"http://127.0.0.1:7878/api/v10\" for `shardvisor sim` (https is not supported yet)",
                );
                None
            }
        };
        let config = GatewayConfig {
            api,
            intents: self.intents("gateway.intents"),
            large_threshold: self.integer("gateway.large_threshold", 50, 250) as u32,
            compress: self.boolean("gateway.compress"),
            connect_timeout: self.duration("gateway.connect_timeout", Duration::from_millis(100)),
            guild_timeout: self.duration("gateway.guild_timeout", Duration::from_millis(100)),
            invalid_session_wait: self.duration("gateway.invalid_session_wait", Duration::ZERO),
            member_request_window: self
                .duration("gateway.member_request_window", Duration::from_millis(1)),
            reconnect_backoff_base: self
                .duration("gateway.reconnect_backoff_base", Duration::from_millis(1)),
            reconnect_backoff_max: self
                .duration("gateway.reconnect_backoff_max", Duration::from_millis(1)),
            save_every: self.integer("gateway.save_every", 1, i64::MAX) as u64,
        };
        if config.reconnect_backoff_max < config.reconnect_backoff_base {
            self.fail(
                "gateway.reconnect_backoff_max",
                "use at least gateway.reconnect_backoff_base",
            );
        }
        config
    }

    fn read_store(&mut self) -> StoreConfig {
        let backend = self.choice("store.backend", &["memory", "postgres"]);
        let postgres = PostgresStoreConfig {
            url: self.string("store.postgres_url"),
            batch_rows: self.integer("store.batch_rows", 1, 1_000_000) as usize,
            max_age: self.duration("store.max_age", Duration::from_millis(1)),
            queue_rows: self.integer("store.queue_rows", 1, 100_000_000) as usize,
        };
        if backend == "postgres" && postgres.queue_rows < postgres.batch_rows {
            self.fail(
                "store.queue_rows",
                "use at least store.batch_rows, or no batch can fill up",
            );
        }
        StoreConfig {
            postgres: (backend == "postgres").then_some(postgres),
        }
    }

    fn read_events(&mut self) -> EventsConfig {
        use crate::adapters::redis::{parse_multi_redis, parse_whitelist, Overflow, TargetOptions};

        let mut whitelist = Vec::new();
        for name in self.strings("events.whitelist") {
            match parse_whitelist(&name) {
                Ok(names) => whitelist.extend(names),
                Err(message) => self.fail("events.whitelist", message),
            }
        }

        let sink = self.choice("events.sink", &["memory", "redis"]);
        let redis_url = self.string("events.redis_url");
        let multi_redis = self.string("events.multi_redis");
        let buffer_events = self.integer("events.buffer_events", 1, i64::from(u32::MAX)) as usize;
        let key_prefix = self.string("events.key_prefix");
        let overflow = match self.choice("events.overflow", &["wait", "drop"]).as_str() {
            "drop" => Overflow::Drop,
            _ => Overflow::Wait,
        };
        // An invalid value is an error even while the in-memory sink makes it unused, so that
        // switching the sink later does not reveal it.
        let targets = match parse_multi_redis(&multi_redis) {
            Ok(targets) if targets.is_empty() => vec![TargetOptions::new(&redis_url)],
            Ok(targets) => targets,
            Err(message) => {
                self.fail("events.multi_redis", message);
                Vec::new()
            }
        };
        if sink != "redis" {
            return EventsConfig {
                whitelist,
                redis: None,
            };
        }
        EventsConfig {
            whitelist,
            redis: Some(RedisOutput {
                targets,
                buffer_events,
                overflow,
                key_prefix,
            }),
        }
    }

    fn read_supervision(&mut self) -> SupervisionConfig {
        let config = SupervisionConfig {
            backoff_base: self.duration("supervision.backoff_base", Duration::from_millis(1)),
            backoff_max: self.duration("supervision.backoff_max", Duration::from_millis(1)),
            shard_max_restarts: self.u32("supervision.shard_max_restarts", 0),
            shard_window: self.duration("supervision.shard_window", Duration::from_secs(1)),
            tree_max_restarts: self.u32("supervision.tree_max_restarts", 0),
            tree_window: self.duration("supervision.tree_window", Duration::from_secs(1)),
            restart_log: self.u32("supervision.restart_log", 1) as usize,
        };
        if config.backoff_max < config.backoff_base {
            self.fail(
                "supervision.backoff_max",
                "use at least supervision.backoff_base",
            );
        }
        config
    }

    fn read_simulator(&mut self) -> SimulatorConfig {
        SimulatorConfig {
            max_concurrency: self.u32("simulator.max_concurrency", 1),
            guilds: self.u32("simulator.guilds", 0),
            largest_guild: self.u32("simulator.largest_guild", 2),
            seed: self.integer("simulator.seed", 0, i64::MAX) as u64,
            session_start_total: self.u32("simulator.session_start_total", 1),
            identify_window: self.duration("simulator.identify_window", Duration::ZERO),
            heartbeat_interval: self
                .duration("simulator.heartbeat_interval", Duration::from_millis(10)),
            member_request_window: self.duration("simulator.member_request_window", Duration::ZERO),
            dispatch_rate: self.float("simulator.dispatch_rate", 0.0, 100_000.0),
            ready_delay: self.duration("simulator.ready_delay", Duration::ZERO),
        }
    }
}

/// Returns the intent with Discord's name in lower case.
fn intent_by_name(name: &str) -> Option<Intents> {
    Some(match name {
        "guilds" => Intents::GUILDS,
        "guild_members" => Intents::GUILD_MEMBERS,
        "guild_moderation" => Intents::GUILD_MODERATION,
        "guild_expressions" => Intents::GUILD_EXPRESSIONS,
        "guild_integrations" => Intents::GUILD_INTEGRATIONS,
        "guild_webhooks" => Intents::GUILD_WEBHOOKS,
        "guild_invites" => Intents::GUILD_INVITES,
        "guild_voice_states" => Intents::GUILD_VOICE_STATES,
        "guild_presences" => Intents::GUILD_PRESENCES,
        "guild_messages" => Intents::GUILD_MESSAGES,
        "guild_message_reactions" => Intents::GUILD_MESSAGE_REACTIONS,
        "guild_message_typing" => Intents::GUILD_MESSAGE_TYPING,
        "direct_messages" => Intents::DIRECT_MESSAGES,
        "direct_message_reactions" => Intents::DIRECT_MESSAGE_REACTIONS,
        "direct_message_typing" => Intents::DIRECT_MESSAGE_TYPING,
        "message_content" => Intents::MESSAGE_CONTENT,
        "guild_scheduled_events" => Intents::GUILD_SCHEDULED_EVENTS,
        "auto_moderation_configuration" => Intents::AUTO_MODERATION_CONFIGURATION,
        "auto_moderation_execution" => Intents::AUTO_MODERATION_EXECUTION,
        "guild_message_polls" => Intents::GUILD_MESSAGE_POLLS,
        "direct_message_polls" => Intents::DIRECT_MESSAGE_POLLS,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(
            file.map(|text| ("test.toml", text)),
            &env,
            &Overrides::default(),
        )
    }

    #[test]
    fn defaults_load() {
        let config = load(None, &[]).unwrap();
        assert_eq!(config.process.shards, 64);
        assert_eq!(config.process.stop, 64);
        assert_eq!(config.identify.pacing, Duration::from_secs(5));
        assert!(config.gateway.api.is_none());
        assert!(config.gateway.intents.contains(Intents::GUILD_MEMBERS));
    }

    #[test]
    fn every_key_is_documented_in_defaults() {
        let defaults: Table = DEFAULTS.parse().unwrap();
        for spec in KEYS {
            let (section, name) = spec.path.split_once('.').unwrap();
            let present = defaults
                .get(section)
                .and_then(Value::as_table)
                .is_some_and(|table| table.contains_key(name));
            assert!(present, "{} is missing from config.toml", spec.path);
        }
    }

    #[test]
    fn legacy_variables_override() {
        let config = load(
            None,
            &[
                ("IDENTIFY_PACING_SECONDS", "10"),
                ("IDENTIFY_STABILIZE_CONCURRENCY", "3"),
                ("IDENTIFY_STABILIZE_SECONDS", "60"),
                ("IDENTIFY_STABILIZE_SECONDS_MAX", "120"),
                ("BACKFILL_DIVERGENCE_RATIO", "0.1"),
                ("BACKFILL_SWEEP_ENABLED", "false"),
                ("BACKFILL_SWEEP_BATCH", "50"),
                ("BACKFILL_SWEEP_REQUESTS_PER_SECOND", "3"),
                ("WHITELIST_EVENTS", "MESSAGE_CREATE, GUILD_CREATE"),
            ],
        )
        .unwrap();
        assert_eq!(config.identify.pacing, Duration::from_secs(10));
        assert_eq!(config.stabilize.permits, 3);
        assert_eq!(config.stabilize.hold, Duration::from_secs(60));
        assert_eq!(config.stabilize.max_hold, Duration::from_secs(120));
        assert_eq!(config.backfill.divergence_ratio, 0.1);
        assert!(!config.sweep.enabled);
        assert_eq!(config.sweep.batch, 50);
        assert_eq!(config.sweep.requests_per_second, 3.0);
        assert_eq!(
            config.events.whitelist,
            vec!["MESSAGE_CREATE", "GUILD_CREATE"]
        );
    }

    #[test]
    fn prefixed_variable_wins() {
        let config = load(
            None,
            &[
                ("IDENTIFY_PACING_SECONDS", "10"),
                ("SHARDVISOR_IDENTIFY_PACING", "7s"),
            ],
        )
        .unwrap();
        assert_eq!(config.identify.pacing, Duration::from_secs(7));
    }

    #[test]
    fn every_bad_key_is_reported() {
        let file = r#"
            [identify]
            pacing = "2s"
            [stabilize]
            permits = 0
            [gateway]
            intents = ["guilds", "telepathy"]
            [process]
            shards = 8
            start = 8
            colour = "blue"
        "#;
        let errors = load(Some(file), &[("BACKFILL_SWEEP_BATCH", "many")])
            .unwrap_err()
            .0;
        let keys: Vec<&str> = errors.iter().map(|error| error.key.as_str()).collect();
        for expected in [
            "identify.pacing",
            "stabilize.permits",
            "gateway.intents",
            "process.start",
            "process.colour",
            "sweep.batch",
        ] {
            assert!(
                keys.contains(&expected),
                "{expected} not reported in {keys:?}"
            );
        }
        let pacing = errors
            .iter()
            .find(|error| error.key == "identify.pacing")
            .unwrap();
        assert_eq!(pacing.value, "\"2s\"");
        assert_eq!(pacing.source, Source::File("test.toml".to_owned()));
        assert!(
            pacing.to_string().contains("identify window, 5s"),
            "{pacing}"
        );
        let batch = errors
            .iter()
            .find(|error| error.key == "sweep.batch")
            .unwrap();
        assert_eq!(batch.source, Source::Env("BACKFILL_SWEEP_BATCH".to_owned()));
    }

    #[test]
    fn env_list_takes_commas() {
        let env = [(
            "SHARDVISOR_EVENTS_WHITELIST",
            "MESSAGE_CREATE, GUILD_CREATE",
        )];
        let config = load(None, &env).unwrap();
        assert_eq!(
            config.events.whitelist,
            vec!["MESSAGE_CREATE", "GUILD_CREATE"]
        );
    }

    #[test]
    fn unknown_variable_is_reported() {
        let errors = load(None, &[("SHARDVISOR_IDENTIFY_PACNG", "6s")])
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "SHARDVISOR_IDENTIFY_PACNG");
        let token = load(None, &[("SHARDVISOR_TOKEN", "x")]);
        assert!(token.is_ok(), "the token variable is not a key");
    }

    #[test]
    fn token_file_checked() {
        let file =
            "[process]\ntoken_file = \"/nonexistent/shardvisor-token\"\n[identify]\npacing = \"x\"";
        let errors = load(Some(file), &[]).unwrap_err().0;
        let keys: Vec<&str> = errors.iter().map(|error| error.key.as_str()).collect();
        assert!(keys.contains(&"process.token_file"), "{keys:?}");
        let pacing = keys.iter().filter(|key| **key == "identify.pacing").count();
        assert_eq!(pacing, 1, "{errors:?}");
    }

    #[test]
    fn range_errors_name_each_bound() {
        let keys = |file: &str| -> Vec<String> {
            load(Some(file), &[])
                .unwrap_err()
                .0
                .into_iter()
                .map(|error| error.key)
                .collect()
        };
        assert_eq!(
            keys("[process]\nshards = 0\nstart = 5\nstop = 3"),
            ["process.shards"]
        );
        assert_eq!(
            keys("[process]\nshards = 8\nstart = 5\nstop = 3"),
            ["process.stop"]
        );
        assert_eq!(keys("[process]\nshards = 8\nstop = 9"), ["process.stop"]);
        assert_eq!(keys("[process]\nname = 5"), ["process.name"]);
    }

    #[test]
    fn legacy_boolean_takes_numbers() {
        for (text, expected) in [("0", false), ("1", true), ("Yes", true), ("false", false)] {
            let config = load(None, &[("BACKFILL_SWEEP_ENABLED", text)]).unwrap();
            assert_eq!(
                config.sweep.enabled, expected,
                "BACKFILL_SWEEP_ENABLED={text}"
            );
        }
        let errors = load(None, &[("BACKFILL_SWEEP_ENABLED", "maybe")])
            .unwrap_err()
            .0;
        assert!(errors[0].fix.contains("true or false"), "{errors:?}");
    }

    #[test]
    fn toml_error_names_line() {
        let errors = load(Some("[process]\nshards = 4\nname = \"unclosed\n"), &[])
            .unwrap_err()
            .0;
        assert!(errors[0].fix.contains("at line 3"), "{errors:?}");
    }

    #[test]
    fn key_prefix_reaches_redis_output() {
        let config = load(
            Some("[events]\nsink = \"redis\""),
            &[("SHARDVISOR_EVENTS_KEY_PREFIX", "bot2:events:")],
        )
        .unwrap();
        let redis = config.events.redis.expect("the Redis output is configured");
        assert_eq!(redis.key_prefix, "bot2:events:");
    }

    #[test]
    fn bad_multi_redis_reported_with_memory_sink() {
        let errors = load(None, &[("MULTI_REDIS", "not json")]).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "events.multi_redis", "{errors:?}");
    }

    #[test]
    fn start_beyond_shards_names_start() {
        let errors = load(Some("[process]\nshards = 8\nstart = 9"), &[])
            .unwrap_err()
            .0;
        assert_eq!(errors[0].key, "process.start", "{errors:?}");
    }

    #[test]
    fn members_need_intent() {
        let file = r#"
            [gateway]
            intents = ["guilds"]
        "#;
        let errors = load(Some(file), &[]).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|error| error.key == "backfill.request_members"),
            "{errors:?}"
        );
    }
}
