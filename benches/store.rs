//! Member upserts per second into PostgreSQL, through the store's writer and through the best
//! raw SQL path, with the same members, against the local server in a fresh database.
//!
//! Run with `cargo bench --bench store`. The last two lines are
//! `result bench-store path=writer rows_per_s=<n>` and `result bench-store path=raw rows_per_s=<n>`.
//!
//! - writer: `PostgresStore::apply` of GUILD_MEMBERS_CHUNK payloads (1,000 members each) from
//!   concurrent tasks, one per simulated shard, until `flush` returns. It includes parsing,
//!   the queue, coalescing, the member count maintenance and one transaction per batch.
//! - raw: the statement the writer's member upsert is built on
//!   (`INSERT … SELECT FROM unnest($1::int8[], $2::int8[], $3::jsonb[]) ON CONFLICT DO UPDATE`)
//!   on one connection, in batches of the writer's batch size. As in the writer, a batch is
//!   split into statements of at most 1,000 rows, and each batch is one transaction sent in
//!   one round trip (`BEGIN`, the upserts and `COMMIT` pipelined). The columns are built before
//!   the clock starts, and no counts are kept.
//!
//! Both write fresh rows: each round starts from empty tables. The result of each path is the
//! median of its rounds.
//!
//! `cargo bench --bench store -- --candidates` measures the candidate write paths instead, at
//! several batch sizes, on fresh rows and on rows already stored. The candidates are multi-row
//! `VALUES`, `unnest` with `jsonb` bound as text or as `serde_json::Value`, binary COPY into a
//! temporary table then merge, the writer's statement with counts, and plain COPY. Each line is
//! the median of `BENCH_STORE_ROUNDS` interleaved repetitions, with the CPU time the server
//! backend spent per row.
//!
//! Environment:
//! - `BENCH_STORE_POSTGRES`: the server as a key-value connection string, default
//!   `host=127.0.0.1 port=5432 user=postgres dbname=test`. The run appends its own `dbname`.
//! - `BENCH_STORE_ROWS`: members per round, default 200000.
//! - `BENCH_STORE_ROUNDS`: rounds per path, default 3.
//! - `BENCH_STORE_BATCH_ROWS`: rows per batch of both paths, default the store's.
//! - `BENCH_STORE_LOG`: a `tracing` filter such as `shardvisor=debug`. No logs when unset.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::store::StateStore;
use futures_util::future::try_join_all;
use futures_util::FutureExt;
use serde_json::value::RawValue;
use shardvisor::adapters::postgres::{Jsonb, PostgresOptions, PostgresStore};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

const DEFAULT_SERVER: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// Members per GUILD_MEMBERS_CHUNK, Discord's maximum.
const CHUNK_MEMBERS: usize = 1_000;

/// Concurrent tasks applying chunks, as shards do.
const SHARDS: usize = 4;

/// Rows per upsert statement of the pipelined path, as in the writer.
const STATEMENT_ROWS: usize = 1_000;

/// Members per guild: a reconnect's member requests go to large guilds.
const GUILD_MEMBERS: usize = 25_000;

/// One member row, as the raw paths bind it.
struct MemberRow {
    guild: i64,
    user: i64,
    json: String,
}

/// The data of one run: the member rows and the same members as chunk payloads.
struct Data {
    rows: Vec<MemberRow>,
    chunks: Vec<Box<RawValue>>,
}

/// Returns a member object of about 600 bytes, shaped like Discord's.
fn member_json(user: i64, index: usize) -> String {
    let avatar = format!(
        "{:032x}",
        (user as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    let role = |k: i64| (user % 50 + k) * 4_194_304 + 81_384_788_765_712_384;
    serde_json::json!({
        "user": {
            "id": user.to_string(),
            "username": format!("member_{index:08}"),
            "global_name": format!("Display Name {index}"),
            "avatar": avatar,
            "discriminator": "0",
            "public_flags": 64,
            "flags": 64,
            "banner": null,
            "accent_color": null,
            "avatar_decoration_data": null,
            "clan": null,
            "primary_guild": null,
            "bot": false
        },
        "roles": [role(1).to_string(), role(2).to_string(), role(3).to_string()],
        "nick": if index % 3 == 0 { serde_json::Value::from(format!("nick {index}")) } else { serde_json::Value::Null },
        "avatar": null,
        "banner": null,
        "joined_at": "2021-06-01T12:00:00.000000+00:00",
        "premium_since": null,
        "deaf": false,
        "mute": false,
        "flags": 0,
        "pending": false,
        "communication_disabled_until": null,
        "unusual_dm_activity_until": null
    })
    .to_string()
}

fn make_data(rows: usize) -> Data {
    let members: Vec<MemberRow> = (0..rows)
        .map(|index| {
            let guild = 1_000_000 + (index / GUILD_MEMBERS) as i64;
            // Scattered user ids, as in a real guild: consecutive rows do not land next to
            // each other in the primary key, for either path.
            let scattered = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8;
            let user = (1 << 58) + scattered as i64;
            MemberRow {
                guild,
                user,
                json: member_json(user, index),
            }
        })
        .collect();

    let chunks = members
        .chunks(CHUNK_MEMBERS)
        .map(|chunk| {
            // A chunk never spans two guilds: GUILD_MEMBERS is a multiple of CHUNK_MEMBERS.
            let guild = chunk[0].guild;
            let list: Vec<&str> = chunk.iter().map(|row| row.json.as_str()).collect();
            let text = format!(
                r#"{{"guild_id":"{guild}","members":[{}],"chunk_index":0,"chunk_count":1,"not_found":[]}}"#,
                list.join(",")
            );
            RawValue::from_string(text).expect("generated chunks are valid JSON")
        })
        .collect();
    Data {
        rows: members,
        chunks,
    }
}

/// A fresh database for the run, dropped by [`BenchDatabase::drop_database`].
struct BenchDatabase {
    admin: Client,
    name: String,
    url: String,
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("failed to connect to {url:?}: {error}"));
    tokio::spawn(connection);
    client
}

impl BenchDatabase {
    async fn create(server: &str) -> Self {
        let admin = connect(server).await;
        let name = format!("bench_store_{}", std::process::id());
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .expect("drop a leftover bench database");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0"
            ))
            .await
            .expect("create the bench database");
        let url = format!("{server} dbname={name}");
        Self { admin, name, url }
    }

    async fn drop_database(self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(error) = self.admin.batch_execute(&sql).await {
            eprintln!("failed to drop {}: {error}", self.name);
        }
    }
}

/// Empties the cache tables and writes dirty pages out, so that each run starts alike.
async fn reset(client: &Client) {
    client
        .batch_execute("TRUNCATE members, guild_member_counts, guilds; CHECKPOINT")
        .await
        .expect("reset the tables");
}

fn rows_per_s(rows: usize, elapsed: Duration) -> f64 {
    rows as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Applies every chunk through the store's writer and returns the rows per second.
async fn run_writer(url: &str, data: &Arc<Data>, batch_rows: usize) -> f64 {
    let mut options = PostgresOptions::new(url);
    options.batch_rows = batch_rows;
    // Room for a few batches, so that the shards fill the next batch while one is written.
    options.queue_rows = options.queue_rows.max(batch_rows * 4);
    let store = Arc::new(
        PostgresStore::connect(options)
            .await
            .unwrap_or_else(|error| panic!("store failed to connect: {error}")),
    );

    let started = Instant::now();
    let tasks: Vec<_> = (0..SHARDS)
        .map(|shard| {
            let (store, data) = (store.clone(), data.clone());
            tokio::spawn(async move {
                for chunk in data.chunks.iter().skip(shard).step_by(SHARDS) {
                    if let Err(error) = store
                        .apply(shard as u32, "GUILD_MEMBERS_CHUNK", chunk)
                        .await
                    {
                        panic!("apply failed: {error}");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("shard task");
    }
    store.flush().await.expect("flush");
    let elapsed = started.elapsed();

    let totals = store.totals().await.expect("totals");
    assert_eq!(
        totals.members,
        data.rows.len() as u64,
        "writer lost members"
    );
    if let Ok(store) = Arc::try_unwrap(store) {
        store.close().await;
    }
    rows_per_s(data.rows.len(), elapsed)
}

/// The candidate write paths of `--candidates`.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// `INSERT … VALUES ($1, $2, $3), …` with three parameters per row.
    Values,
    /// `unnest` of three arrays, `jsonb` bound as text with the version byte.
    UnnestText,
    /// As `UnnestText`, split into statements of at most 1,000 rows, with `BEGIN`, the
    /// upserts and `COMMIT` sent together: one round trip per batch, as the writer sends its
    /// flushes.
    UnnestPipelined,
    /// `unnest` of three arrays, `jsonb` bound as `serde_json::Value` (parsed from the text on
    /// the clock).
    UnnestValue,
    /// The writer's statement: `unnest` upsert plus the member count maintenance.
    UnnestCounts,
    /// Binary COPY into a temporary table, then `INSERT … SELECT … ON CONFLICT`.
    CopyMerge,
    /// Plain binary COPY into `members`: no upsert, fresh rows only.
    CopyFresh,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Values => "values",
            Path::UnnestText => "unnest",
            Path::UnnestPipelined => "unnest-pipelined",
            Path::UnnestValue => "unnest-serde-value",
            Path::UnnestCounts => "unnest-with-counts",
            Path::CopyMerge => "copy-merge",
            Path::CopyFresh => "copy-fresh",
        }
    }
}

const UPSERT: &str = "INSERT INTO members AS m (guild_id, user_id, data)
    SELECT * FROM unnest($1::int8[], $2::int8[], $3::jsonb[])
    ON CONFLICT (guild_id, user_id) DO UPDATE SET data = EXCLUDED.data
    WHERE m.data IS DISTINCT FROM EXCLUDED.data";

const UPSERT_WITH_COUNTS: &str = "WITH written AS (
        INSERT INTO members AS m (guild_id, user_id, data)
        SELECT * FROM unnest($1::int8[], $2::int8[], $3::jsonb[])
        ON CONFLICT (guild_id, user_id) DO UPDATE SET data = EXCLUDED.data
            WHERE m.data IS DISTINCT FROM EXCLUDED.data
        RETURNING m.guild_id, m.xmax = 0 AS inserted
    )
    INSERT INTO guild_member_counts AS c (guild_id, count)
    SELECT guild_id, count(*) FROM written WHERE inserted GROUP BY guild_id
    ON CONFLICT (guild_id) DO UPDATE SET count = c.count + EXCLUDED.count";

fn values_sql(rows: usize) -> String {
    let tuples: Vec<String> = (0..rows)
        .map(|row| format!("(${}, ${}, ${})", row * 3 + 1, row * 3 + 2, row * 3 + 3))
        .collect();
    format!(
        "INSERT INTO members AS m (guild_id, user_id, data) VALUES {}
         ON CONFLICT (guild_id, user_id) DO UPDATE SET data = EXCLUDED.data
         WHERE m.data IS DISTINCT FROM EXCLUDED.data",
        tuples.join(", ")
    )
}

/// Writes `rows` in batches of `batch` rows, one transaction each, and returns the rows per
/// second.
async fn run_raw(client: &mut Client, path: Path, rows: &[MemberRow], batch: usize) -> f64 {
    client
        .batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS members_in (guild_id int8, user_id int8, data jsonb)
             ON COMMIT DELETE ROWS",
        )
        .await
        .expect("temp table");
    let upsert = client.prepare(UPSERT).await.expect("prepare");
    let upsert_with_counts = client.prepare(UPSERT_WITH_COUNTS).await.expect("prepare");
    let values = match path {
        Path::Values => Some(client.prepare(&values_sql(batch)).await.expect("prepare")),
        _ => None,
    };

    // Columns are built before the clock starts, except where building them is the candidate.
    let batches: Vec<(Vec<i64>, Vec<i64>, Vec<Jsonb<'_>>)> = rows
        .chunks(batch)
        .map(|chunk| {
            (
                chunk.iter().map(|row| row.guild).collect(),
                chunk.iter().map(|row| row.user).collect(),
                chunk.iter().map(|row| Jsonb(&row.json)).collect(),
            )
        })
        .collect();

    let begin = client.prepare("BEGIN").await.expect("prepare");
    let commit = client.prepare("COMMIT").await.expect("prepare");

    let started = Instant::now();
    for (index, (guilds, users, data)) in batches.iter().enumerate() {
        if let Path::UnnestPipelined = path {
            upsert_pipelined(client, [&begin, &upsert, &commit], guilds, users, data).await;
            continue;
        }

        let transaction = client.transaction().await.expect("begin");
        match path {
            Path::UnnestText | Path::UnnestPipelined => {
                transaction
                    .execute(&upsert, &[guilds, users, data])
                    .await
                    .expect("upsert");
            }
            Path::UnnestCounts => {
                transaction
                    .execute(&upsert_with_counts, &[guilds, users, data])
                    .await
                    .expect("upsert with counts");
            }
            Path::UnnestValue => {
                let values: Vec<serde_json::Value> = rows[index * batch..]
                    .iter()
                    .take(data.len())
                    .map(|row| serde_json::from_str(&row.json).expect("valid JSON"))
                    .collect();
                transaction
                    .execute(&upsert, &[guilds, users, &values])
                    .await
                    .expect("upsert");
            }
            Path::Values => {
                let statement = match &values {
                    Some(statement) if data.len() == batch => statement.clone(),
                    _ => transaction
                        .prepare(&values_sql(data.len()))
                        .await
                        .expect("prepare"),
                };
                let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(data.len() * 3);
                for row in 0..data.len() {
                    params.push(&guilds[row]);
                    params.push(&users[row]);
                    params.push(&data[row]);
                }
                transaction
                    .execute(&statement, &params)
                    .await
                    .expect("values upsert");
            }
            Path::CopyMerge | Path::CopyFresh => {
                let target = match path {
                    Path::CopyMerge => "members_in",
                    _ => "members",
                };
                let sql = format!("COPY {target} (guild_id, user_id, data) FROM STDIN BINARY");
                let sink = transaction.copy_in(&sql).await.expect("copy in");
                let mut writer = pin!(BinaryCopyInWriter::new(
                    sink,
                    &[Type::INT8, Type::INT8, Type::JSONB]
                ));
                for row in 0..data.len() {
                    writer
                        .as_mut()
                        .write(&[&guilds[row], &users[row], &data[row]])
                        .await
                        .expect("copy row");
                }
                writer.finish().await.expect("copy finish");
                if let Path::CopyMerge = path {
                    transaction
                        .batch_execute(
                            "INSERT INTO members AS m SELECT * FROM members_in
                             ON CONFLICT (guild_id, user_id) DO UPDATE SET data = EXCLUDED.data
                             WHERE m.data IS DISTINCT FROM EXCLUDED.data",
                        )
                        .await
                        .expect("merge");
                }
            }
        }
        transaction.commit().await.expect("commit");
    }
    rows_per_s(rows.len(), started.elapsed())
}

/// Writes one batch in one transaction sent in one round trip: `BEGIN`, upserts of at most
/// 1,000 rows each (as the writer splits its statements), `COMMIT`.
async fn upsert_pipelined(
    client: &Client,
    [begin, upsert, commit]: [&Statement; 3],
    guilds: &[i64],
    users: &[i64],
    data: &[Jsonb<'_>],
) {
    let parts: Vec<(&[i64], &[i64], &[Jsonb<'_>])> = (0..data.len())
        .step_by(STATEMENT_ROWS)
        .map(|start| {
            let end = (start + STATEMENT_ROWS).min(data.len());
            (&guilds[start..end], &users[start..end], &data[start..end])
        })
        .collect();
    let params: Vec<[&(dyn ToSql + Sync); 3]> = parts
        .iter()
        .map(|(guilds, users, data)| [guilds as &(dyn ToSql + Sync), users, data])
        .collect();

    let mut requests = vec![client.execute(begin, &[]).boxed()];
    for params in &params {
        requests.push(client.execute(upsert, params).boxed());
    }
    requests.push(client.execute(commit, &[]).boxed());

    // `try_join_all` (futures-util 0.3) polls up to 30 futures in list order, so they are sent
    // in that order.
    assert!(
        requests.len() <= 30,
        "a batch of {} rows is too large to pipeline here",
        data.len()
    );
    try_join_all(requests).await.expect("pipelined upsert");
}

/// Measures every candidate path on fresh rows, and the upserts again on the rows just
/// stored. Each measurement is repeated `rounds` times, interleaved with the others so that a
/// burst of load elsewhere on the machine does not hit one path only, and the median is printed.
async fn run_candidates(url: &str, rows: &[MemberRow], rounds: usize) {
    let mut client = connect(url).await;
    let server_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0);
    let paths = [
        Path::Values,
        Path::UnnestText,
        Path::UnnestPipelined,
        Path::UnnestValue,
        Path::UnnestCounts,
        Path::CopyMerge,
        Path::CopyFresh,
    ];

    for batch in [1_000, 2_000, 5_000, 10_000] {
        // Per path: (rows per second, server CPU µs per row) of each round, fresh and stored.
        let mut fresh: Vec<Vec<(f64, Option<f64>)>> = vec![Vec::new(); paths.len()];
        let mut stored: Vec<Vec<(f64, Option<f64>)>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (index, path) in paths.iter().enumerate() {
                if matches!(path, Path::Values) && batch * 3 > usize::from(u16::MAX) {
                    continue;
                }
                reset(&client).await;
                let measure = measured(
                    server_pid,
                    rows.len(),
                    run_raw(&mut client, *path, rows, batch),
                );
                fresh[index].push(measure.await);
                if !matches!(path, Path::CopyFresh) {
                    // The same rows again: every row conflicts, and none changes.
                    let measure = measured(
                        server_pid,
                        rows.len(),
                        run_raw(&mut client, *path, rows, batch),
                    );
                    stored[index].push(measure.await);
                }
            }
        }

        for (index, path) in paths.iter().enumerate() {
            for (kind, results) in [("fresh", &fresh[index]), ("stored", &stored[index])] {
                if results.is_empty() {
                    continue;
                }
                let rate = median(results.iter().map(|(rate, _)| *rate).collect());
                let cpu: Option<Vec<f64>> = results.iter().map(|(_, cpu)| *cpu).collect();
                let cpu = cpu.map_or("n/a".to_owned(), |cpu| format!("{:.1}", median(cpu)));
                println!(
                    "candidate bench-store path={} batch_rows={batch} rows={kind} rows_per_s={rate:.0} server_cpu_us_per_row={cpu}",
                    path.name()
                );
            }
        }
    }
}

/// Runs a raw path and adds the CPU time its server backend used per row. The CPU time is read
/// from `/proc/<pid>/stat` (Linux, server on this machine, readable by this user); it is `None`
/// where that file cannot be read. Unlike rows per second, it hardly changes with the load of
/// other processes on the machine.
async fn measured(
    server_pid: i32,
    rows: usize,
    run: impl std::future::Future<Output = f64>,
) -> (f64, Option<f64>) {
    let before = backend_cpu_ticks(server_pid);
    let rate = run.await;
    let after = backend_cpu_ticks(server_pid);
    let cpu = before
        .zip(after)
        .map(|(before, after)| (after - before) as f64 * 1e6 / CLOCK_TICKS_PER_S / rows as f64);
    (rate, cpu)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`), 100 on Linux.
const CLOCK_TICKS_PER_S: f64 = 100.0;

/// Returns the user plus system CPU time of a process in clock ticks (fields 14 and 15 of
/// `/proc/<pid>/stat`).
fn backend_cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Logs only when asked for, so that the output stays the result lines.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BENCH_STORE_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let candidates = std::env::args().any(|arg| arg == "--candidates");
    let server =
        std::env::var("BENCH_STORE_POSTGRES").unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
    let rows = env_usize("BENCH_STORE_ROWS", 200_000);
    let rounds = env_usize("BENCH_STORE_ROUNDS", 3).max(1);
    let batch_rows = env_usize(
        "BENCH_STORE_BATCH_ROWS",
        PostgresOptions::new("").batch_rows,
    );

    let database = BenchDatabase::create(&server).await;
    let data = Arc::new(make_data(rows));
    let average = data.rows.iter().map(|row| row.json.len()).sum::<usize>() / rows.max(1);
    println!(
        "bench-store rows={rows} member_bytes={average} batch_rows={batch_rows} rounds={rounds}"
    );

    // The store creates the tables, so both paths write the same schema.
    let store = PostgresStore::connect(PostgresOptions::new(database.url.as_str()))
        .await
        .unwrap_or_else(|error| panic!("store failed to connect: {error}"));
    store.close().await;

    if candidates {
        run_candidates(&database.url, &data.rows, rounds).await;
        database.drop_database().await;
        return;
    }

    let mut client = connect(&database.url).await;
    let (mut writer, mut raw) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        reset(&client).await;
        raw.push(run_raw(&mut client, Path::UnnestPipelined, &data.rows, batch_rows).await);
        reset(&client).await;
        writer.push(run_writer(&database.url, &data, batch_rows).await);
        println!(
            "round {round}: writer {:.0} rows/s, raw {:.0} rows/s",
            writer[round - 1],
            raw[round - 1]
        );
    }
    drop(client);
    database.drop_database().await;

    println!(
        "result bench-store path=writer rows_per_s={:.0}",
        median(writer)
    );
    println!("result bench-store path=raw rows_per_s={:.0}", median(raw));
}
