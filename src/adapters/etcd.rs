//! etcd adapters: [`EtcdBackend`], the fleet-wide identify backend, and [`EtcdCursorStore`], the
//! sweep cursor.
//!
//! Every process of one bot shares Discord's identify buckets (`shard_id % max_concurrency`, one
//! IDENTIFY per bucket per 5 s) and its daily session-start limit. [`EtcdBackend`] keeps both in
//! etcd:
//!
//! - one lock per bucket, taken with the etcd lock recipe on KV, leases and watches, so the
//!   waiters of all processes are served in the order etcd created their keys (`etcd/lock.rs`);
//! - the session-start budget as JSON under `<prefix>/budget`, spent by one transaction that also
//!   proves the lock is still held (`etcd/budget.rs`).
//!
//! While etcd is unreachable every call fails with [`PortError::Unavailable`], so no shard
//! identifies. The gRPC channel reconnects on the next call. The outage is logged once at warn
//! when it starts and once at info when it ends.

mod budget;
mod connection;
mod cursor;
mod lock;

use std::time::Duration;

use actors::coordinator::{BackendLock, IdentifyBackend, IdentifyRefusal, SessionBudget};
use actors::store::PortError;
use async_trait::async_trait;

use budget::{unix_ms_now, Budget, DiscordReport};
use connection::Connection;
use lock::Locks;

pub use cursor::{EtcdCursorOptions, EtcdCursorStore, DEFAULT_SWEEP_PREFIX};

/// Default key prefix of the bucket locks and the budget.
pub const DEFAULT_IDENTIFY_PREFIX: &str = "/gateway/identify";

/// Settings of [`EtcdBackend`].
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// etcd client URLs, such as `http://10.0.0.5:2379`. Requests are balanced over all of them.
    pub endpoints: Vec<String>,
    /// Key prefix: bucket `n` is locked under `<prefix>/<n>/`, the budget is `<prefix>/budget`.
    /// Every process of one bot must use the same prefix. A trailing `/` is ignored.
    pub prefix: String,
    /// The session-start limit that `GET /gateway/bot` reported at start, and this process's
    /// reserve. The budget in etcd is initialized from it and never raised by it.
    pub budget: SessionBudget,
    /// Added to the `hold` of an acquire to size the lock's lease (see
    /// [`EtcdBackend::lease_ttl`]). It covers the delay between etcd renewing the lease when the
    /// lock is granted and the coordinator starting its timers: a round trip plus scheduling.
    pub lease_margin: Duration,
    /// Maximum time to open a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// Maximum time of one request. A request that takes longer counts as an outage. It also
    /// bounds the reply to an HTTP/2 ping, which detects a connection that died silently.
    pub request_timeout: Duration,
}

impl EtcdOptions {
    /// Creates options with the default prefix, a 1 s lease margin and 5 s timeouts.
    pub fn new(endpoints: Vec<String>, budget: SessionBudget) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_IDENTIFY_PREFIX.to_owned(),
            budget,
            lease_margin: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A failure of an etcd adapter. It reaches callers as the source of
/// [`PortError::Unavailable`].
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The options list no endpoint.
    #[error("no etcd endpoint configured; give at least one URL such as http://127.0.0.1:2379")]
    NoEndpoints,
    /// The client could not be built from the endpoints (an invalid URL, for example).
    #[error("failed to connect to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A request failed.
    #[error("etcd {operation} failed: {source}")]
    Request {
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// A request got no response in time.
    #[error("etcd {operation} timed out after {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    /// etcd ended a stream the backend was reading.
    #[error("etcd closed the {operation} stream")]
    StreamClosed { operation: &'static str },
    /// The lease of a queued lock expired before the lock was granted.
    #[error("lease {lease:016x} of bucket {bucket} expired before the bucket lock was granted")]
    LeaseExpired { lease: i64, bucket: u32 },
    /// The key of a queued lock was deleted (its lease revoked, or the key removed by hand)
    /// before the lock was granted.
    #[error("lock key {key} of bucket {bucket} was deleted before the bucket lock was granted")]
    QueuedKeyDeleted { bucket: u32, key: String },
    /// The budget key contains something other than the budget JSON.
    #[error("invalid session-start budget at {key}: {source}; delete the key and it is set again from GET /gateway/bot")]
    InvalidBudget {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// Other processes changed the budget on every attempt to spend from it.
    #[error(
        "the session-start budget at {key} changed on each of {attempts} attempts to spend from it"
    )]
    BudgetContention { key: String, attempts: u32 },
    /// A cursor key contains something other than a decimal `u64`.
    #[error("invalid sweep cursor at {key}: {value:?} is not a decimal integer; delete the key to restart the sweep")]
    InvalidCursor { key: String, value: String },
}

impl EtcdError {
    fn request(operation: &'static str, source: etcd_client::Error) -> Self {
        Self::Request { operation, source }
    }

    /// Returns `true` for failures that mean etcd cannot be reached, as opposed to a response
    /// that rejects the request.
    fn is_outage(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::StreamClosed { .. } | Self::Connect { .. } => true,
            Self::Request { source, .. } => is_transport_failure(source),
            _ => false,
        }
    }

    /// Returns `true` when etcd reported that the lease does not exist (expired or revoked).
    fn is_lease_not_found(&self) -> bool {
        let Self::Request { source, .. } = self else {
            return false;
        };
        match source {
            etcd_client::Error::GRpcStatus(status) => {
                i32::from(status.code()) == grpc_code::NOT_FOUND
            }
            etcd_client::Error::LeaseKeepAliveError(message) => message == LEASE_NOT_FOUND,
            _ => false,
        }
    }
}

/// gRPC status codes, as numbered by the gRPC specification. `tonic`, which defines the `Code`
/// enum, is not a direct dependency, so statuses are compared by number.
mod grpc_code {
    pub(super) const CANCELLED: i32 = 1;
    pub(super) const UNKNOWN: i32 = 2;
    pub(super) const DEADLINE_EXCEEDED: i32 = 4;
    pub(super) const NOT_FOUND: i32 = 5;
    pub(super) const INTERNAL: i32 = 13;
    pub(super) const UNAVAILABLE: i32 = 14;
}

/// Returns `true` for failures of the connection rather than error responses of etcd. A
/// connection that breaks mid-stream surfaces as `UNKNOWN` or `INTERNAL` (an HTTP/2 error), and a
/// refused connection as `UNAVAILABLE`.
fn is_transport_failure(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => true,
        etcd_client::Error::LeaseKeepAliveError(message) => message != LEASE_NOT_FOUND,
        etcd_client::Error::GRpcStatus(status) => matches!(
            i32::from(status.code()),
            grpc_code::CANCELLED
                | grpc_code::UNKNOWN
                | grpc_code::DEADLINE_EXCEEDED
                | grpc_code::INTERNAL
                | grpc_code::UNAVAILABLE
        ),
        _ => false,
    }
}

/// The message of `etcd_client::Error::LeaseKeepAliveError` when the first keep-alive reply
/// carries TTL 0, that is when the lease is gone.
const LEASE_NOT_FOUND: &str = "lease not found";

impl From<EtcdError> for PortError {
    fn from(error: EtcdError) -> Self {
        PortError::Unavailable {
            backend: "etcd",
            source: Box::new(error),
        }
    }
}

/// The identify backend for a fleet of processes: bucket locks and the session-start budget in
/// etcd.
pub struct EtcdBackend {
    locks: Locks,
    budget: Budget,
}

impl EtcdBackend {
    /// Connects to etcd and checks that it responds within the timeouts.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] with an [`EtcdError`] when no endpoint is given, an endpoint
    /// is invalid, or etcd does not respond.
    pub async fn connect(options: EtcdOptions) -> Result<Self, PortError> {
        let prefix = options.prefix.trim_end_matches('/').to_owned();
        let budget_key = format!("{prefix}/budget");
        let connection = Connection::open(
            &options.endpoints,
            options.connect_timeout,
            options.request_timeout,
            &budget_key,
        )
        .await?;

        let report = DiscordReport::new(options.budget, unix_ms_now());
        tracing::info!(
            endpoints = %options.endpoints.join(","),
            prefix = %prefix,
            remaining = options.budget.remaining,
            reserve = options.budget.reserve,
            lease_margin_ms = options.lease_margin.as_millis() as u64,
            "etcd identify backend connected"
        );
        Ok(Self {
            locks: Locks::new(connection.clone(), prefix, options.lease_margin),
            budget: Budget::new(connection, budget_key, report, options.budget.reserve),
        })
    }

    /// Returns the TTL of the lease behind a lock held for at most `hold`: `hold` plus the lease
    /// margin, rounded up to whole seconds, at least 3 s.
    pub fn lease_ttl(&self, hold: Duration) -> Duration {
        Duration::from_secs(self.locks.lease_ttl_secs(hold).unsigned_abs())
    }

    /// Returns the key prefix under which the waiters and the holder of a bucket have their keys.
    pub fn bucket_prefix(&self, bucket: u32) -> String {
        self.locks.bucket_prefix(bucket)
    }

    /// Returns the key of the fleet-wide session-start budget.
    pub fn budget_key(&self) -> &str {
        self.budget.key()
    }
}

#[async_trait]
impl IdentifyBackend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn acquire(&self, bucket: u32, hold: Duration) -> Result<BackendLock, PortError> {
        Ok(self.locks.acquire(bucket, hold).await?)
    }

    async fn begin_identify(&self, lock: BackendLock) -> Result<(), IdentifyRefusal> {
        let Some(held) = self.locks.get(lock) else {
            tracing::debug!(
                bucket = lock.bucket,
                handle = lock.handle,
                "begin_identify on a lock this backend does not hold"
            );
            return Err(IdentifyRefusal::LockLost);
        };
        if held.lost {
            tracing::debug!(
                bucket = lock.bucket,
                lease = %held.lease,
                "begin_identify on a lock whose lease is gone"
            );
            return Err(IdentifyRefusal::LockLost);
        }

        // A crashed holder's bucket then stays closed for the lease's full TTL after IDENTIFY,
        // not just for what was left of it since the last keep-alive.
        match self.locks.renew_held(&held).await {
            Ok(()) => {}
            Err(EtcdError::LeaseExpired { .. }) => {
                tracing::debug!(
                    bucket = lock.bucket,
                    lease = %held.lease,
                    "lease gone at begin_identify"
                );
                return Err(IdentifyRefusal::LockLost);
            }
            Err(error) => return Err(PortError::from(error).into()),
        }

        self.budget.spend(&held).await
    }

    async fn release(&self, lock: BackendLock) -> Result<(), PortError> {
        Ok(self.locks.release(lock).await?)
    }
}
