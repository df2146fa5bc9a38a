//! The `shardvisor run` binary's standard output: a reader that goes away must not stop the
//! service.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A bot on the built-in simulator with scaled-down windows: 16 shards in one bucket take about
/// 5 s to come up, with a progress line every second.
const CONFIG: &str = r#"
[process]
shards = 16
[identify]
pacing = "300ms"
grace = "50ms"
[stabilize]
hold = "100ms"
max_hold = "1s"
[sweep]
enabled = false
[simulator]
max_concurrency = 1
guilds = 32
largest_guild = 100
identify_window = "300ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stdout_keeps_service_running() {
    let dir = tempfile::tempdir().expect("failed to create a temporary directory");
    let config = dir.path().join("service.toml");
    std::fs::write(&config, CONFIG).expect("failed to write the configuration");
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardvisor"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--exit-when-stable")
        .env_clear()
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("failed to start shardvisor");

    // Read the first line, then close the pipe, as `| head -1` does. The progress lines and the
    // summary line that follow meet a closed pipe.
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("no line on standard output within 30 s")
        .expect("failed to read standard output");
    assert!(first.is_some(), "standard output closed before any line");
    drop(lines);

    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("shardvisor did not exit within 60 s")
        .expect("failed to wait for shardvisor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("panicked"),
        "shardvisor panicked after its standard output closed:\n{stderr}"
    );
    assert!(
        output.status.success(),
        "shardvisor exited with {} after its standard output closed:\n{stderr}",
        output.status
    );
}
