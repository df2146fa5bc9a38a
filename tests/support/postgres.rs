//! PostgreSQL for tests, in two forms:
//!
//! - [`TestDatabase`]: a fresh database `test_<pid>_<n>` on the shared server (127.0.0.1:5432,
//!   or the key-value connection string in `SHARDVISOR_TEST_POSTGRES`, which must not name a
//!   database), dropped with `WITH (FORCE)` when the value is dropped.
//! - [`PrivateCluster`]: a cluster of its own, made with `initdb` in a temporary directory and
//!   served on a free loopback port, with `start`, `stop`, `restart` and `kill` for outage
//!   tests. Only this cluster is ever stopped; the shared server is never touched.
//!
//! Include it with `#[path = "support/postgres.rs"] mod postgres_server;`. The binaries come from
//! `/usr/lib/postgresql/15/bin`, or the directory in `POSTGRES_BIN_DIR`. `initdb` and `postgres`
//! refuse to run as root, so when the tests run as root both run as the `postgres` user, which
//! owns the temporary directory.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// The shared server, used when `SHARDVISOR_TEST_POSTGRES` is not set.
const SHARED_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// The shared server's port, which a private cluster must never use.
const SHARED_PORT: u16 = 5432;

/// Maximum wait for a private cluster to accept connections after a start, or to exit after
/// a stop.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Numbers the databases of one test process.
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// Connects or panics with the connection string and the error.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to PostgreSQL at {url:?}: {error}"));
    tokio::spawn(connection);
    client
}

/// A fresh database on the shared server, dropped on drop.
pub struct TestDatabase {
    name: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url =
            std::env::var("SHARDVISOR_TEST_POSTGRES").unwrap_or_else(|_| SHARED_URL.to_owned());
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );

        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap_or_else(|error| panic!("failed to drop a leftover {name}: {error}"));
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"
            ))
            .await
            .unwrap_or_else(|error| panic!("failed to create database {name}: {error}"));
        Self { name, admin_url }
    }

    /// Returns the connection string of the database.
    pub fn url(&self) -> String {
        format!("{} dbname={}", self.admin_url, self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens a connection for checking what a store wrote.
    pub async fn client(&self) -> Client {
        connect(&self.url()).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside a runtime, which cannot block on another future, so the drop
        // runs on a thread of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime.block_on(async {
                let (admin, connection) = tokio_postgres::connect(&admin_url, NoTls)
                    .await
                    .map_err(|error| error.to_string())?;
                tokio::spawn(connection);
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|error| error.to_string())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("failed to drop test database {}: {error}", self.name);
        }
    }
}

/// A private PostgreSQL cluster on a free loopback port. Dropping it kills the server and
/// removes its directory.
pub struct PrivateCluster {
    /// Holds `data/` and `postgres.log`, owned by the user the server runs as.
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// User and group ids to run `initdb` and `postgres` as, when the tests run as root.
    run_as: Option<(u32, u32)>,
}

impl PrivateCluster {
    /// Creates a cluster with `initdb` and starts it. Panics with the output when it fails.
    pub async fn create() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shardvisor-postgres-")
            .tempdir()
            .expect("failed to create a temporary directory for PostgreSQL");
        let run_as = postgres_user_if_root();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("failed to give the temporary directory to the postgres user");
        }

        let mut cluster = Self {
            dir,
            port: free_port(),
            child: None,
            run_as,
        };
        cluster.initdb().await;
        cluster.start().await;
        cluster
    }

    /// Returns the connection string of database `postgres` on the cluster.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the server and waits until it accepts connections. After [`Self::kill`] the
    /// killed server's backends may hold its shared memory for a moment, so a failed start is
    /// tried again until the start-up timeout.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "the cluster is already running");
        assert_ne!(
            self.port, SHARED_PORT,
            "the harness must not use the shared server's port"
        );

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let error = match self.spawn_and_wait(deadline).await {
                Ok(()) => return,
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                panic!("PostgreSQL did not start on port {}: {error}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server with a fast shutdown (SIGINT): open transactions are rolled back,
    /// committed data is kept. Waits until the server exits.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let status = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .await
                .expect("failed to run kill");
            assert!(status.success(), "kill -INT {pid} failed with {status}");
        }
        match tokio::time::timeout(STARTUP_TIMEOUT, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("failed to wait for PostgreSQL to stop: {error}"),
            Err(_) => panic!(
                "PostgreSQL did not stop within {STARTUP_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Stops the server, then starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it exits. The next
    /// start runs crash recovery, which keeps every committed transaction.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .expect("failed to kill the PostgreSQL server");
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Returns the last 4 KiB of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4096);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn command(&self, binary: &str) -> Command {
        let mut command = std::process::Command::new(bin_dir().join(binary));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command.stdin(Stdio::null());
        Command::from(command)
    }

    async fn initdb(&self) {
        let output = self
            .command("initdb")
            .arg("--pgdata")
            .arg(self.data_dir())
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            // The cluster lives only as long as the test, so its files need no fsync.
            .arg("--no-sync")
            .output()
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "failed to run initdb from {}: {error}; install postgresql-15 or set POSTGRES_BIN_DIR",
                    bin_dir().display()
                )
            });
        assert!(
            output.status.success(),
            "initdb failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Spawns the server and waits until it accepts connections, up to `deadline`.
    async fn spawn_and_wait(&mut self, deadline: Instant) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|error| format!("failed to open the log: {error}"))?;
        if let Some((uid, gid)) = self.run_as {
            // Ignored when it fails: the log is written through this handle either way.
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            // A crash test needs durability against a killed server, not a crashed machine.
            .args(["-c", "fsync=off", "-c", "max_connections=20"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("failed to run postgres: {error}"))?;
        self.child = Some(child);

        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "postgres exited with {status}; log:\n{}",
                        self.log_tail()
                    ));
                }
            }
            if tokio_postgres::connect(&self.url(), NoTls).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no connection within {STARTUP_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Returns the directory of the PostgreSQL binaries.
fn bin_dir() -> PathBuf {
    std::env::var_os("POSTGRES_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("/usr/lib/postgresql/15/bin").to_owned())
}

/// Returns the ids of the `postgres` user when the tests run as root, `None` otherwise.
fn postgres_user_if_root() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> u32 {
        let output = std::process::Command::new("id")
            .args(args)
            .output()
            .expect("failed to run id");
        let text = String::from_utf8_lossy(&output.stdout);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("id {args:?} printed {text:?}; is there a postgres user?"))
    };
    if id(&["-u"]) != 0 {
        return None;
    }
    Some((id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind a loopback port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}
