//! Settings of the Redis event sink, and parsers for the two variables of the replaced service
//! that configure it: `MULTI_REDIS` (targets) and `WHITELIST_EVENTS` (event names).

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;

/// Address of the single target used when no target map is configured.
pub const DEFAULT_ADDRESS: &str = "redis://127.0.0.1:6379";

/// Prefix of every list key. The replaced service pushed `MESSAGE_CREATE` to
/// `gateway:events:MESSAGE_CREATE`, and the downstream workers read those keys.
pub const DEFAULT_KEY_PREFIX: &str = "gateway:events:";

/// Policy of a target whose buffer is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Overflow {
    /// `push` waits for room, so the shard stops reading its socket and no event is lost. The
    /// shard resumes later from its stored sequence.
    #[default]
    Wait,
    /// The target drops the event and counts it, so a dead target stalls the shards no longer
    /// than its buffer takes to fill. While the target is down, `flush` does not wait for the
    /// events in its buffer: they are delivered if it recovers, and nothing else depends on them.
    Drop,
}

/// One Redis server that receives events. Its `Debug` output hides the address's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetOptions {
    /// Redis URL: `redis://[user:password@]host:port[/db]` or `redis+unix:///path`.
    pub address: String,
    /// Event names this target receives. `None` or an empty list means the global whitelist. A
    /// list of its own replaces the global whitelist for this target rather than narrowing it.
    pub whitelist: Option<Vec<String>>,
    /// Overrides [`RedisSinkOptions::overflow`] for this target.
    pub overflow: Option<Overflow>,
}

impl fmt::Debug for TargetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetOptions")
            .field("address", &redact(&self.address))
            .field("whitelist", &self.whitelist)
            .field("overflow", &self.overflow)
            .finish()
    }
}

impl TargetOptions {
    /// Creates a target that follows the global whitelist and overflow policy.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            whitelist: None,
            overflow: None,
        }
    }
}

/// Settings of [`super::RedisSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSinkOptions {
    /// Servers that receive events; at least one.
    pub targets: Vec<TargetOptions>,
    /// Event names to push; empty pushes every event. Targets with a list of their own ignore it.
    pub whitelist: Vec<String>,
    /// Prefix of the list keys, followed by the event name.
    pub key_prefix: String,
    /// Maximum events per target that Redis has not accepted yet, including the batch being
    /// sent.
    pub buffer_events: usize,
    /// Maximum events sent in one pipeline.
    pub batch_events: usize,
    /// Policy for a full buffer, for the targets that set none.
    pub overflow: Overflow,
    /// Maximum time for one connection attempt, including the attempts of `connect`.
    pub connect_timeout: Duration,
    /// Maximum wait for the replies to one pipeline. A timeout does not cancel the commands
    /// already sent, so the retry can push the batch twice.
    pub response_timeout: Duration,
    /// Maximum time `flush` waits before it returns an error for the caller to retry.
    pub flush_timeout: Duration,
    /// Maximum time `close` spends delivering the buffered events.
    pub close_timeout: Duration,
    /// First wait before resending a failed batch; doubles on each failure up to `retry_max`.
    pub retry_min: Duration,
    /// Maximum wait between two attempts to send a batch.
    pub retry_max: Duration,
    /// Interval of the statistics line logged for each target; `None` logs none.
    pub stats_interval: Option<Duration>,
}

impl Default for RedisSinkOptions {
    /// Returns one target on [`DEFAULT_ADDRESS`] that receives every event. The buffer of 50,000
    /// events is an estimate: at 10,000 events per second it bridges a Redis restart of 5 s, and
    /// at 1 KB per event it takes about 50 MB.
    fn default() -> Self {
        Self {
            targets: vec![TargetOptions::new(DEFAULT_ADDRESS)],
            whitelist: Vec::new(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            buffer_events: 50_000,
            batch_events: 1_000,
            overflow: Overflow::Wait,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(3),
            flush_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            retry_min: Duration::from_millis(50),
            retry_max: Duration::from_secs(2),
            stats_interval: Some(Duration::from_secs(60)),
        }
    }
}

impl RedisSinkOptions {
    /// Checks every setting and returns the first invalid one with the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.targets.is_empty() {
            return Err(format!(
                "no Redis target: add at least one address, such as {DEFAULT_ADDRESS}"
            ));
        }

        let mut addresses = HashSet::new();
        for target in &self.targets {
            check_address(&target.address)?;
            if !addresses.insert(target.address.as_str()) {
                return Err(format!(
                    "Redis address {} is listed twice: list each address once",
                    redact(&target.address)
                ));
            }
            for name in target.whitelist.iter().flatten() {
                check_event_name(name)?;
            }
        }
        for name in &self.whitelist {
            check_event_name(name)?;
        }

        if self.buffer_events == 0 || self.buffer_events > Semaphore::MAX_PERMITS {
            return Err(format!(
                "buffer_events = {} is out of range: set 1 to {}",
                self.buffer_events,
                Semaphore::MAX_PERMITS
            ));
        }
        if self.batch_events == 0 {
            return Err("batch_events = 0 is invalid: set 1 or more, such as 1000".to_owned());
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("response_timeout", self.response_timeout),
            ("flush_timeout", self.flush_timeout),
            ("retry_min", self.retry_min),
        ] {
            if value.is_zero() {
                return Err(format!("{name} = 0 is invalid: set a positive duration"));
            }
        }
        if self.retry_max < self.retry_min {
            return Err(format!(
                "retry_max = {:?} is less than retry_min = {:?}: raise retry_max",
                self.retry_max, self.retry_min
            ));
        }
        if self
            .stats_interval
            .is_some_and(|interval| interval.is_zero())
        {
            return Err(
                "stats_interval = 0 is invalid: set a positive duration, or none to log no statistics"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Parses `WHITELIST_EVENTS`: event names separated by commas, with optional spaces. A blank
/// value returns an empty list, which pushes every event. Repeated names are kept once.
///
/// # Errors
///
/// A message that quotes the invalid name and says how to write it.
pub fn parse_whitelist(csv: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for name in csv
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        check_event_name(name)?;
        if !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Parses `MULTI_REDIS`: a JSON object that maps each Redis address to the event names it
/// receives, an empty list meaning the global whitelist, such as
/// `{"redis://127.0.0.1:6380": ["MESSAGE_CREATE"], "redis://127.0.0.1:6381": []}`. Targets keep
/// the order of the object. A blank value returns no target, so the caller uses the single
/// default target.
///
/// # Errors
///
/// A message that names the invalid part (the JSON position, the address or the event name) and
/// the fix. Addresses are shown with their credentials replaced by `***`.
pub fn parse_multi_redis(json: &str) -> Result<Vec<TargetOptions>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }

    let entries: Entries = serde_json::from_str(json).map_err(|error| {
        format!(
            "{} is not a JSON object of Redis addresses: {error}; write it as \
             {{\"redis://127.0.0.1:6380\": [\"MESSAGE_CREATE\"], \"redis://127.0.0.1:6381\": []}}",
            shown_value(json)
        )
    })?;
    if entries.0.is_empty() {
        return Err(
            "`{}` lists no Redis address: add one, such as {\"redis://127.0.0.1:6380\": []}, \
             or leave MULTI_REDIS unset to use the single default target"
                .to_owned(),
        );
    }

    let mut targets: Vec<TargetOptions> = Vec::with_capacity(entries.0.len());
    for (address, names) in entries.0 {
        check_address(&address)?;
        if targets.iter().any(|target| target.address == address) {
            return Err(format!(
                "Redis address {} is listed twice: list each address once",
                redact(&address)
            ));
        }
        let whitelist = parse_target_names(&address, names)?;
        targets.push(TargetOptions {
            whitelist: (!whitelist.is_empty()).then_some(whitelist),
            address,
            overflow: None,
        });
    }
    Ok(targets)
}

/// Reads the event names of one `MULTI_REDIS` entry.
fn parse_target_names(address: &str, names: Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = names else {
        return Err(format!(
            "the value of {} is {names}, not a list: write a list of event names, such as \
             [\"MESSAGE_CREATE\"], or [] for the global whitelist",
            redact(address)
        ));
    };

    let mut whitelist: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let Value::String(name) = item else {
            return Err(format!(
                "the list of {} contains {item}, not an event name: write names as strings, \
                 such as \"MESSAGE_CREATE\"",
                redact(address)
            ));
        };
        check_event_name(&name)?;
        if !whitelist.contains(&name) {
            whitelist.push(name);
        }
    }
    Ok(whitelist)
}

/// Checks that a Redis address parses as a URL the client can connect to.
fn check_address(address: &str) -> Result<(), String> {
    match redis::Client::open(address) {
        Ok(_) => Ok(()),
        Err(error) => Err(format!(
            "invalid Redis address \"{}\": {error}; write it as redis://host:port, such as {DEFAULT_ADDRESS}",
            redact(address)
        )),
    }
}

/// Checks that a name is written as Discord writes dispatch names: `A-Z`, `0-9` and `_`.
fn check_event_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit() || byte == b'_');
    if valid {
        return Ok(());
    }

    let upper = name.trim().to_ascii_uppercase();
    let fixable = !upper.is_empty()
        && upper
            .bytes()
            .all(|byte| byte.is_ascii_uppercase() || byte.is_ascii_digit() || byte == b'_');
    if fixable {
        Err(format!(
            "invalid event name \"{name}\": event names are upper case, write \"{upper}\""
        ))
    } else {
        Err(format!(
            "invalid event name \"{name}\": write a Discord dispatch name in upper case, such as MESSAGE_CREATE"
        ))
    }
}

/// Returns an address with its credentials replaced by `***`, for logs and messages.
pub(super) fn redact(address: &str) -> String {
    let (without_query, query) = match address.split_once('?') {
        Some((head, _)) => (head, "?***"),
        None => (address, ""),
    };
    let Some((scheme, rest)) = without_query.split_once("://") else {
        return format!("{without_query}{query}");
    };

    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => format!("{scheme}://***@{}{path}{query}", &authority[at + 1..]),
        None => format!("{without_query}{query}"),
    }
}

/// Returns the value to quote in a parse error. A value that may contain a password is not
/// quoted, because the error ends up in logs.
fn shown_value(json: &str) -> String {
    if json.contains('@') || json.contains('?') {
        "the value (not shown because it may contain a password)".to_owned()
    } else {
        format!("`{json}`")
    }
}

/// The entries of a JSON object in document order, with repeated keys kept so that they can be
/// reported (a map type would keep only the last).
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EntriesVisitor)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("an object that maps each Redis address to a list of event names")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(entry) = map.next_entry::<String, Value>()? {
            entries.push(entry);
        }
        Ok(Entries(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_credentials() {
        let cases = [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://127.0.0.1:6379/2", "redis://127.0.0.1:6379/2"),
            ("redis://:secret@host:6379/0", "redis://***@host:6379/0"),
            ("redis://user:secret@host:6379", "redis://***@host:6379"),
            (
                "redis+unix:///run/redis.sock?pass=secret",
                "redis+unix:///run/redis.sock?***",
            ),
            ("not a url", "not a url"),
        ];
        for (address, expected) in cases {
            assert_eq!(redact(address), expected, "address {address}");
        }
    }

    #[test]
    fn debug_hides_credentials() {
        let target = TargetOptions::new("redis://:secret@127.0.0.1:6380");

        let output = format!("{target:?}");
        assert!(!output.contains("secret"), "{output}");
        assert!(output.contains("redis://***@127.0.0.1:6380"), "{output}");
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RedisSinkOptions::default().validate(), Ok(()));
    }

    /// A change that makes the options invalid.
    type Breakage = fn(&mut RedisSinkOptions);

    #[test]
    fn validate_rejects_bad_settings() {
        let cases: [(&str, Breakage); 6] = [
            ("no Redis target", |options| options.targets.clear()),
            ("buffer_events = 0", |options| options.buffer_events = 0),
            ("batch_events = 0", |options| options.batch_events = 0),
            ("flush_timeout = 0", |options| {
                options.flush_timeout = Duration::ZERO
            }),
            ("retry_max", |options| {
                options.retry_max = Duration::from_millis(1)
            }),
            ("listed twice", |options| {
                options.targets.push(TargetOptions::new(DEFAULT_ADDRESS))
            }),
        ];
        for (expected, change) in cases {
            let mut options = RedisSinkOptions::default();
            change(&mut options);
            let error = options.validate().expect_err(expected);
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
