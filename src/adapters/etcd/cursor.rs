//! The Sweeper's cursor in etcd: one key per process name, holding the cursor in decimal.

use std::time::Duration;

use actors::store::{CursorStore, PortError};
use async_trait::async_trait;

use super::connection::Connection;
use super::EtcdError;

/// Default key prefix of the sweep cursors.
pub const DEFAULT_SWEEP_PREFIX: &str = "/gateway/sweep";

/// Settings of [`EtcdCursorStore`].
#[derive(Clone, Debug)]
pub struct EtcdCursorOptions {
    /// etcd client URLs, such as `http://10.0.0.5:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix: the cursor of process `name` is `<prefix>/<name>`. A trailing `/` is ignored.
    pub prefix: String,
    /// Maximum time to open a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// Maximum time of one request.
    pub request_timeout: Duration,
}

impl EtcdCursorOptions {
    /// Creates options with the default prefix and 5 s timeouts.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_SWEEP_PREFIX.to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// The sweep cursor of each process, in etcd.
pub struct EtcdCursorStore {
    connection: Connection,
    prefix: String,
}

impl EtcdCursorStore {
    /// Connects to etcd and checks that it responds within the timeouts.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] with an [`EtcdError`] when no endpoint is given, an endpoint
    /// is invalid, or etcd does not respond.
    pub async fn connect(options: EtcdCursorOptions) -> Result<Self, PortError> {
        let prefix = options.prefix.trim_end_matches('/').to_owned();
        let connection = Connection::open(
            &options.endpoints,
            options.connect_timeout,
            options.request_timeout,
            &prefix,
        )
        .await?;
        tracing::info!(
            endpoints = %options.endpoints.join(","),
            prefix = %prefix,
            "etcd cursor store connected"
        );
        Ok(Self { connection, prefix })
    }

    /// Returns the key of a process's cursor.
    pub fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }
}

#[async_trait]
impl CursorStore for EtcdCursorStore {
    /// Returns the stored cursor. A value that is not a decimal `u64` is reported as
    /// [`EtcdError::InvalidCursor`] inside [`PortError::Unavailable`], the only failure the
    /// port has.
    async fn load_cursor(&self, name: &str) -> Result<Option<u64>, PortError> {
        let key = self.key(name);
        let read_key = key.clone();
        let response = self
            .connection
            .call("cursor read", move |mut client| async move {
                client.get(read_key, None).await
            })
            .await?;
        let Some(entry) = response.kvs().first() else {
            return Ok(None);
        };

        let value = String::from_utf8_lossy(entry.value());
        let cursor = value.parse::<u64>().map_err(|_| EtcdError::InvalidCursor {
            key,
            value: value.clone().into_owned(),
        })?;
        Ok(Some(cursor))
    }

    async fn save_cursor(&self, name: &str, cursor: u64) -> Result<(), PortError> {
        let key = self.key(name);
        self.connection
            .call("cursor write", move |mut client| async move {
                client.put(key, cursor.to_string(), None).await
            })
            .await?;
        Ok(())
    }
}
