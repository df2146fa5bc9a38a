//! Brings 1024 shards in 16 buckets up against the simulator at a scaled identify window, once
//! per identify backend, and compares each run with Discord's floor,
//! `ceil(shards / buckets) × window`.
//!
//! The etcd run uses a private etcd on loopback, started and stopped by the benchmark. Run with
//! `make bench-identify`. The last lines are one per backend:
//! `result bench-identify backend=<name> shards=1024 buckets=16 floor_s=<s> elapsed_s=<s> ratio=<r> violations=<n>`.

use std::collections::BTreeMap;
use std::time::Duration;

use shardvisor::config::{Config, Overrides};
use shardvisor::run::{Service, Summary};
use shardvisor::sim::Report;

#[path = "../tests/support/etcd.rs"]
mod etcd;

const SHARDS: u32 = 1024;
const BUCKETS: u32 = 16;

/// The simulator's identify window, scaled down from Discord's 5 s so that 64 rounds take about a
/// minute. Pacing equals the window and the grace is 5 % of it, as in production (5 s and 250 ms).
/// At 250 ms with a 25 ms grace, the simulator and 1024 shards on two cores delayed single
/// IDENTIFYs by more than the grace during the initial flood.
const WINDOW: Duration = Duration::from_millis(1000);

fn config(name: &str, backend_section: &str) -> Config {
    let window_ms = WINDOW.as_millis();
    let file = format!(
        r#"
        [process]
        shards = {SHARDS}
        [identify]
        pacing = "{window_ms}ms"
        grace = "50ms"
        {backend_section}
        [stabilize]
        permits = {BUCKETS}
        hold = "50ms"
        max_hold = "1s"
        [gateway]
        guild_timeout = "10s"
        [sweep]
        enabled = false
        [simulator]
        session_start_total = 5000
        max_concurrency = {BUCKETS}
        guilds = {guilds}
        largest_guild = 200
        identify_window = "{window_ms}ms"
        dispatch_rate = 0.2
        [log]
        format = "human"
        "#,
        guilds = SHARDS * 4,
    );
    let overrides = Overrides {
        name: Some(name.to_owned()),
        ..Overrides::default()
    };
    Config::from_sources(Some(("bench", &file)), &BTreeMap::new(), &overrides)
        .unwrap_or_else(|errors| panic!("bench configuration invalid:\n{errors}"))
}

async fn run(backend: &str, config: Config) -> Summary {
    let service = Service::start(config).await.expect("service starts");
    let summary = service.wait_until_stable().await;
    if let Some(simulator) = &service.simulator {
        let report = simulator.report();
        print_handover(backend, &report);
        for violation in report.violations {
            eprintln!(
                "{backend}: violation {:?} shard {:?} at {} ms: {}",
                violation.kind, violation.shard, violation.at_ms, violation.detail
            );
        }
    }
    service.shutdown().await;
    eprintln!("{backend}: {}", summary.line());
    summary
}

/// Prints to standard error how far the gaps between consecutive accepted IDENTIFYs of a bucket
/// went beyond the window. Pacing makes that at least the grace. The rest is the hand-over (the
/// release, the next grant and `begin_identify`) and jitter in when the simulator read the frames.
fn print_handover(backend: &str, report: &Report) {
    let window_ms = WINDOW.as_millis() as u64;
    let mut overhead_ms: Vec<u64> = Vec::new();
    for records in report.identifies.values() {
        let mut accepted: Vec<u64> = records
            .iter()
            .filter(|record| record.accepted)
            .map(|record| record.at_ms)
            .collect();
        accepted.sort_unstable();
        overhead_ms.extend(
            accepted
                .windows(2)
                .map(|pair| (pair[1] - pair[0]).saturating_sub(window_ms)),
        );
    }
    overhead_ms.sort_unstable();
    if overhead_ms.is_empty() {
        return;
    }
    let quantile_ms =
        |quantile: f64| overhead_ms[((overhead_ms.len() - 1) as f64 * quantile) as usize];
    let mean = overhead_ms.iter().sum::<u64>() as f64 / overhead_ms.len() as f64;
    eprintln!(
        "{backend}: gap beyond the window in ms over {} hand-overs: mean={mean:.1} p50={} p90={} p99={} max={}",
        overhead_ms.len(),
        quantile_ms(0.5),
        quantile_ms(0.9),
        quantile_ms(0.99),
        quantile_ms(1.0)
    );
}

fn result_line(backend: &str, summary: &Summary) -> String {
    format!(
        "result bench-identify backend={backend} shards={} buckets={} floor_s={:.2} elapsed_s={:.2} ratio={:.3} violations={}",
        summary.shards,
        summary.buckets,
        summary.floor_s,
        summary.elapsed_s,
        summary.elapsed_s / summary.floor_s,
        summary.identify_violations
    )
}

#[tokio::main]
async fn main() {
    let in_process = run(
        "in-process",
        config("bench-in-process", "backend = \"in-process\""),
    )
    .await;

    // A private etcd on loopback, as the fleet would share one.
    let etcd = etcd::EtcdServer::start().await;
    let section = format!(
        "backend = \"etcd\"\netcd_endpoints = [\"{}\"]\netcd_prefix = \"/bench/identify\"",
        etcd.endpoint()
    );
    let with_etcd = run("etcd", config("bench-etcd", &section)).await;
    drop(etcd);

    println!("{}", result_line("in-process", &in_process));
    println!("{}", result_line("etcd", &with_etcd));
}
