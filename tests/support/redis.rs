//! A private `redis-server` for tests: a free loopback port picked at start, its own directory
//! in a temporary directory, no persistence, and `stop`, `kill`, `restart`, `pause` and `resume`
//! for outage tests.
//!
//! Include it with `#[path = "support/redis.rs"] mod redis_server;`. It runs `redis-server` from
//! `PATH` (or the binary named by `REDIS_SERVER_BIN`) with `--save "" --appendonly no`, so a
//! restarted server starts empty. It never touches the shared server on port 6379. The server's
//! log goes to `redis.log` in its directory, and [`RedisServer::log_tail`] returns its end for
//! failure messages.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Maximum wait for the server to reply to PING after a start, or to exit after a signal.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts to find a free port: another process may take the port between the probe and the
/// server's bind, so a start that fails with "Address already in use" is tried on a new port.
const PORT_ATTEMPTS: u32 = 5;

/// The shared server's port, which this harness must never use.
const SHARED_PORT: u16 = 6379;

/// A running (or stopped) private Redis. Dropping it kills the server.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// Holds `redis.log`; removed on drop.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it replies to PING. Panics with
    /// the server's log when it does not start.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shardvisor-redis-")
            .tempdir()
            .expect("failed to create a temporary directory for redis-server");

        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(error)
                    if attempt < PORT_ATTEMPTS && error.contains("Address already in use") =>
                {
                    server.port = free_port();
                }
                Err(error) => panic!("redis-server did not start: {error}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Returns the address for the sink, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns `true` while the server process runs (paused counts as running).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Opens a new connection for reading what the sink wrote. Its response timeout is longer
    /// than the client's default of 500 ms, which reading a large list on a loaded machine can
    /// exceed.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("a loopback URL is valid");
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(STARTUP_TIMEOUT))
            .set_response_timeout(Some(STARTUP_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|error| panic!("failed to connect to {}: {error}", self.url()))
    }

    /// Stops the server with SIGTERM and waits until it exits. Without persistence it saves
    /// nothing, so its data is gone.
    pub async fn stop(&mut self) {
        self.signal("TERM").await;
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it exits.
    pub async fn kill(&mut self) {
        self.signal("KILL").await;
    }

    /// Stops the server if it runs, then starts an empty one on the same port and waits until
    /// it replies to PING.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        if let Err(error) = self.spawn_and_wait().await {
            panic!(
                "redis-server did not restart on port {}: {error}",
                self.port
            );
        }
    }

    /// Suspends the server with SIGSTOP: connections still open (the kernel accepts them), but
    /// nothing is read or replied to until [`Self::resume`].
    pub async fn pause(&self) {
        self.send_signal("STOP").await;
    }

    /// Resumes a paused server with SIGCONT.
    pub async fn resume(&self) {
        self.send_signal("CONT").await;
    }

    /// Returns the last 4 KiB of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the server and waits for PING. Returns the reason and the log tail on failure.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert_ne!(
            self.port, SHARED_PORT,
            "the harness must not use the shared server's port"
        );
        let binary =
            std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());

        let child = Command::new(&binary)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--daemonize")
            .arg("no")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                format!(
                    "failed to run {binary}: {error}; install it with apt-get install redis-server"
                )
            })?;
        self.child = Some(child);

        self.wait_ready().await
    }

    /// Polls PING until the server replies PONG.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "redis-server exited with {status} during start-up; log:\n{}",
                        self.log_tail()
                    ));
                }
            }
            if ping(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server did not reply to PING on port {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a signal with `kill(1)` and waits until the process exits.
    async fn signal(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = child.id() else {
            return;
        };
        kill(signal, pid).await;

        match tokio::time::timeout(STARTUP_TIMEOUT, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("failed to wait for redis-server (pid {pid}): {error}"),
            Err(_) => {
                let _ = child.start_kill();
                panic!(
                    "redis-server (pid {pid}) did not exit within {STARTUP_TIMEOUT:?} after SIG{signal}"
                );
            }
        }
    }

    /// Sends a signal that does not end the process.
    async fn send_signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        kill(signal, pid).await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL also ends a paused process.
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

async fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("failed to run kill");
    assert!(
        status.success(),
        "kill -{signal} {pid} failed with {status}"
    );
}

/// Returns a loopback port that was free a moment ago, never the shared server's.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("a bound listener has an address")
            .port();
        if port != SHARED_PORT {
            return port;
        }
    }
}

/// Returns `true` when the server on the port replies to PING with PONG.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await.ok()?;
        Some(&reply == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
