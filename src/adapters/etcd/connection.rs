//! The etcd client shared by the adapters: a time limit on every request and an outage log that
//! writes one line when etcd becomes unreachable and one when it responds again.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::time::Instant;

use super::EtcdError;

/// Interval of HTTP/2 pings on a connection with open streams. A ping that gets no reply within
/// the request timeout closes the connection, which ends a watch or keep-alive stream that a
/// silent network failure would otherwise leave open. etcd's default
/// `--grpc-keepalive-min-time` is 5 s and it closes connections that ping more often, so the
/// interval stays above that.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);

/// An etcd client with a request time limit and an outage log. Clones share the channel and the
/// log.
#[derive(Clone)]
pub(super) struct Connection {
    client: Client,
    request_timeout: Duration,
    health: Arc<Health>,
}

impl Connection {
    /// Builds the client and reads `probe_key` to check that etcd responds.
    ///
    /// The gRPC channel connects lazily and reconnects on the next request after a failure, so
    /// the probe is what proves the endpoints reachable.
    pub(super) async fn open(
        endpoints: &[String],
        connect_timeout: Duration,
        request_timeout: Duration,
        probe_key: &str,
    ) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }

        let listed = endpoints.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_keep_alive(HTTP2_PING_INTERVAL, request_timeout);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| EtcdError::Connect {
                endpoints: listed.clone(),
                source,
            })?;
        let connection = Self {
            client,
            request_timeout,
            health: Arc::new(Health::new(listed)),
        };

        let probe = probe_key.to_owned();
        connection
            .call("probe read", move |mut client| async move {
                client
                    .get(probe, Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await?;
        Ok(connection)
    }

    /// Runs one request on a clone of the client, bounded by the request timeout, and records
    /// the outcome in the outage log.
    pub(super) async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        request: F,
    ) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let outcome = tokio::time::timeout(self.request_timeout, request(self.client.clone()))
            .await
            .map_err(|_| EtcdError::Timeout {
                operation,
                timeout: self.request_timeout,
            })
            .and_then(|result| result.map_err(|source| EtcdError::request(operation, source)));
        match &outcome {
            Ok(_) => self.health.succeeded(),
            Err(error) => self.health.failed(error),
        }
        outcome
    }

    /// Records a failure seen outside [`Connection::call`], on a stream.
    pub(super) fn record_failure(&self, error: &EtcdError) {
        self.health.failed(error);
    }
}

/// The outage log: whether etcd is unreachable, and since when.
struct Health {
    endpoints: String,
    down_since: Mutex<Option<Instant>>,
}

impl Health {
    fn new(endpoints: String) -> Self {
        Self {
            endpoints,
            down_since: Mutex::new(None),
        }
    }

    /// Logs the start of an outage, unless one is already under way. Error responses of etcd (a
    /// missing lease, for example) are not outages.
    fn failed(&self, error: &EtcdError) {
        if !error.is_outage() {
            return;
        }
        let mut down_since = self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down_since.is_none() {
            *down_since = Some(Instant::now());
            tracing::warn!(
                endpoints = %self.endpoints,
                %error,
                "etcd unreachable; no shard identifies until it answers again"
            );
        }
    }

    /// Logs the end of an outage, if one was under way.
    fn succeeded(&self) {
        let mut down_since = self
            .down_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = down_since.take() {
            tracing::info!(
                endpoints = %self.endpoints,
                outage_ms = since.elapsed().as_millis() as u64,
                "etcd reachable again"
            );
        }
    }
}
