//! A private single-member etcd for tests: loopback ports picked free at start, a data directory
//! in a temporary directory, and `stop`, `kill` and `restart` for outage tests.
//!
//! Include it with `#[path = "support/etcd.rs"] mod etcd;`. It runs `/usr/bin/etcd` (or the
//! binary named by `ETCD_BIN`) and never touches the default ports 2379 and 2380. The server's
//! log goes to `etcd.log` beside the data directory, and [`EtcdServer::log_tail`] returns its end
//! for failure messages.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Maximum wait for etcd to respond to `/health` after a start, or to exit after a signal.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Attempts to find free ports: another process may take a port between the probe and etcd's
/// bind, so a start that fails with "address already in use" is tried again on new ports.
const PORT_ATTEMPTS: u32 = 5;

/// A running (or stopped) private etcd. Dropping it kills the server.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Holds `data/` and `etcd.log`; removed on drop.
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it responds. Panics with the server's
    /// log when it does not start.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shardvisor-etcd-")
            .tempdir()
            .expect("failed to create a temporary directory for etcd");

        let mut server = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(error)
                    if attempt < PORT_ATTEMPTS && error.contains("address already in use") =>
                {
                    // The failed member may have written its peer URL into the data directory.
                    let _ = std::fs::remove_dir_all(server.dir.path().join("data"));
                    server.client_port = free_port();
                    server.peer_port = free_port();
                }
                Err(error) => panic!("etcd did not start: {error}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Returns the client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Returns the client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Returns `true` while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server with SIGTERM and waits until it exits.
    pub async fn stop(&mut self) {
        self.signal("TERM").await;
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it exits.
    pub async fn kill(&mut self) {
        self.signal("KILL").await;
    }

    /// Stops the server if it runs, then starts it again on the same ports and data directory
    /// and waits until it responds.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        if let Err(error) = self.spawn_and_wait().await {
            panic!("etcd did not restart on the same ports: {error}");
        }
    }

    /// Returns the last 4 KiB of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Spawns etcd and waits for `/health`. Returns the reason and the log tail on failure.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = self.open_log()?;
        let stderr = log
            .try_clone()
            .map_err(|error| format!("failed to open the etcd log: {error}"))?;
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let binary = std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".to_owned());

        // A 10 ms heartbeat and a 100 ms election timeout let the single member elect itself
        // within a fraction of a second instead of etcd's default one second. They also lower
        // etcd's minimum lease TTL to 1 s, below the backend's own 3 s floor.
        let child = Command::new(&binary)
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("test={peer_url}"))
            .arg("--initial-cluster-token")
            .arg("shardvisor-test")
            .arg("--heartbeat-interval")
            .arg("10")
            .arg("--election-timeout")
            .arg("100")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("failed to run {binary}: {error}"))?;
        self.child = Some(child);

        self.wait_healthy().await
    }

    fn open_log(&self) -> Result<File, String> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|error| format!("failed to open {}: {error}", self.log_path().display()))
    }

    /// Polls `/health` on the client port until it reports `"health":"true"`.
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "etcd exited with {status} during start-up; log:\n{}",
                        self.log_tail()
                    ));
                }
            }
            if health(self.client_port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not respond to /health on port {} within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.client_port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
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

        match tokio::time::timeout(STARTUP_TIMEOUT, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("failed to wait for etcd (pid {pid}): {error}"),
            Err(_) => {
                let _ = child.start_kill();
                panic!(
                    "etcd (pid {pid}) did not exit within {STARTUP_TIMEOUT:?} after SIG{signal}"
                );
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// Returns `true` when `GET /health` on the port reports a healthy member.
async fn health(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request =
            format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(String::from_utf8_lossy(&response).contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
