//! `EtcdBackend` and `EtcdCursorStore` against a private etcd per test: mutual exclusion and
//! queue order across backends (each backend stands for one process), lease expiry after a
//! crash, lost locks, an etcd outage, the shared session-start budget and the sweep cursor.
//!
//! Needs `/usr/bin/etcd` (or `ETCD_BIN`); each test starts its own server on free loopback ports.

#[path = "support/etcd.rs"]
mod etcd;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actors::coordinator::{IdentifyBackend, IdentifyRefusal, SessionBudget};
use actors::store::{CursorStore, PortError};
use etcd::EtcdServer;
use etcd_client::{Client, GetOptions};
use serde_json::Value;
use shardvisor::adapters::etcd::{
    EtcdBackend, EtcdCursorOptions, EtcdCursorStore, EtcdError, EtcdOptions,
};
use tokio::time::{timeout, Instant};

/// Hold passed to `acquire`: with the 1 s margin the lease TTL is the 3 s minimum.
const HOLD: Duration = Duration::from_secs(1);

/// A hold whose lease (11 s) outlasts every test that uses it, so a key that disappears within
/// a few seconds was deleted or revoked, not expired.
const LONG_HOLD: Duration = Duration::from_secs(10);

/// Maximum wait for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);

/// How long a waiter must stay blocked to count as blocked.
const BLOCKED: Duration = Duration::from_millis(500);

fn budget(remaining: u32, reserve: u32) -> SessionBudget {
    SessionBudget {
        total: 1000,
        remaining,
        reset_after: Duration::from_secs(60),
        reserve,
    }
}

fn options(server: &EtcdServer, budget: SessionBudget) -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..EtcdOptions::new(vec![server.endpoint()], budget)
    }
}

async fn backend(server: &EtcdServer, budget: SessionBudget) -> Arc<EtcdBackend> {
    let backend = EtcdBackend::connect(options(server, budget))
        .await
        .unwrap_or_else(|error| panic!("backend failed to connect: {error}"));
    Arc::new(backend)
}

/// Connects a plain etcd client that inspects and changes keys, as an operator would.
async fn admin(server: &EtcdServer) -> Client {
    Client::connect([server.endpoint()], None)
        .await
        .expect("admin client connects")
}

async fn queue_len(admin: &mut Client, prefix: &str) -> usize {
    admin
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("queue read")
        .count() as usize
}

/// Polls the number of keys under `prefix` until it is `expected`, failing after [`WAIT`].
async fn wait_for_queue(admin: &mut Client, prefix: &str, expected: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let len = queue_len(admin, prefix).await;
        if len == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} holds {len} keys after {WAIT:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn stored_budget(admin: &mut Client, key: &str) -> Option<Value> {
    let response = admin.get(key, None).await.expect("budget read");
    response
        .kvs()
        .first()
        .map(|entry| serde_json::from_slice(entry.value()).expect("budget JSON"))
}

async fn stored_remaining(admin: &mut Client, key: &str) -> u64 {
    let budget = stored_budget(admin, key)
        .await
        .unwrap_or_else(|| panic!("no budget at {key}"));
    budget["remaining"].as_u64().expect("remaining is a number")
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Acquires, spends one start and releases, as one IDENTIFY does.
async fn identify_once(backend: &EtcdBackend, bucket: u32) -> Result<(), IdentifyRefusal> {
    let lock = backend.acquire(bucket, HOLD).await?;
    let outcome = backend.begin_identify(lock).await;
    backend.release(lock).await?;
    outcome
}

#[tokio::test]
async fn second_backend_waits_for_release() {
    let server = EtcdServer::start().await;
    let first = backend(&server, budget(100, 0)).await;
    let second = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = first.bucket_prefix(0);

    let held = first.acquire(0, HOLD).await.expect("first acquire");
    let waiting = {
        let second = second.clone();
        tokio::spawn(async move { second.acquire(0, HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;
    let mut waiting = waiting;
    assert!(
        timeout(BLOCKED, &mut waiting).await.is_err(),
        "second backend acquired bucket 0 while the first held it"
    );

    let released_at = Instant::now();
    first.release(held).await.expect("release");
    let granted = timeout(WAIT, waiting)
        .await
        .expect("second backend acquires after the release")
        .expect("acquire task")
        .expect("second acquire");
    let handoff = released_at.elapsed();
    assert!(handoff < Duration::from_secs(1), "handoff took {handoff:?}");

    second
        .begin_identify(granted)
        .await
        .expect("the new holder identifies");
    let stale = first.begin_identify(held).await;
    assert!(
        matches!(stale, Err(IdentifyRefusal::LockLost)),
        "a released lock still identifies: {stale:?}"
    );
}

#[tokio::test]
async fn waiters_served_in_queue_order() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);
    let held = holder.acquire(0, HOLD).await.expect("holder acquire");

    let served = Arc::new(Mutex::new(Vec::new()));
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for waiter in 1..=3usize {
        let backend = backend(&server, budget(100, 0)).await;
        let served = served.clone();
        let inside = inside.clone();
        tasks.push(tokio::spawn(async move {
            let lock = backend.acquire(0, HOLD).await.expect("waiter acquire");
            let others = inside.fetch_add(1, Ordering::SeqCst);
            served.lock().unwrap().push((waiter, others));
            tokio::task::yield_now().await;
            inside.fetch_sub(1, Ordering::SeqCst);
            backend.release(lock).await.expect("waiter release");
        }));
        // The next waiter starts only once this one's key is queued.
        wait_for_queue(&mut admin, &prefix, waiter + 1).await;
    }

    holder.release(held).await.expect("holder release");
    for task in tasks {
        timeout(WAIT, task)
            .await
            .expect("every waiter is served")
            .expect("waiter task");
    }

    let served = served.lock().unwrap().clone();
    let order: Vec<usize> = served.iter().map(|(waiter, _)| *waiter).collect();
    assert_eq!(order, [1, 2, 3], "waiters served out of queue order");
    for (waiter, others) in served {
        assert_eq!(
            others, 0,
            "waiter {waiter} held the lock together with another"
        );
    }
    wait_for_queue(&mut admin, &prefix, 0).await;
}

#[tokio::test]
async fn withdrawn_waiter_ahead_keeps_order() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let withdrawn = backend(&server, budget(100, 0)).await;
    let last = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, LONG_HOLD).await.expect("holder acquire");
    let withdrawing = {
        let withdrawn = withdrawn.clone();
        tokio::spawn(async move { withdrawn.acquire(0, LONG_HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;
    let mut waiting = {
        let last = last.clone();
        tokio::spawn(async move { last.acquire(0, LONG_HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 3).await;

    // The key right ahead of the last waiter goes away while the holder still holds.
    withdrawing.abort();
    wait_for_queue(&mut admin, &prefix, 2).await;
    assert!(
        timeout(BLOCKED, &mut waiting).await.is_err(),
        "the last waiter acquired bucket 0 while the holder held it"
    );

    holder.release(held).await.expect("release");
    let lock = timeout(WAIT, waiting)
        .await
        .expect("the last waiter acquires after the release")
        .expect("acquire task")
        .expect("acquire");
    last.begin_identify(lock).await.expect("identify");
    let stale = holder.begin_identify(held).await;
    assert!(
        matches!(stale, Err(IdentifyRefusal::LockLost)),
        "a released lock still identifies: {stale:?}"
    );
}

#[tokio::test]
async fn release_revokes_lease() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, LONG_HOLD).await.expect("acquire");
    let keys = admin
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("queue read");
    let lease = keys.kvs()[0].lease();
    assert_ne!(lease, 0, "the lock key has no lease");

    holder.release(held).await.expect("release");
    assert_eq!(
        queue_len(&mut admin, &prefix).await,
        0,
        "lock key left behind"
    );
    let leases = admin.leases().await.expect("lease list");
    let left: Vec<i64> = leases.leases().iter().map(|status| status.id()).collect();
    assert!(
        !left.contains(&lease),
        "lease {lease:016x} outlived its release: {left:x?}"
    );
}

#[tokio::test]
async fn buckets_lock_independently() {
    let server = EtcdServer::start().await;
    let first = backend(&server, budget(100, 0)).await;
    let second = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;

    let held = first.acquire(1, HOLD).await.expect("bucket 1");
    // Bucket 10 shares the digit prefix of bucket 1, so its keys must not queue behind them.
    for bucket in [10, 2] {
        let lock = timeout(WAIT, second.acquire(bucket, HOLD))
            .await
            .unwrap_or_else(|_| panic!("bucket {bucket} blocked by bucket 1"))
            .expect("acquire");
        assert_eq!(lock.bucket, bucket);
    }
    assert_eq!(queue_len(&mut admin, &first.bucket_prefix(1)).await, 1);

    let blocked = timeout(BLOCKED, second.acquire(1, HOLD)).await;
    assert!(blocked.is_err(), "bucket 1 acquired twice: {blocked:?}");
    first.release(held).await.expect("release");
}

#[tokio::test]
async fn crashed_holder_frees_bucket_after_ttl() {
    let server = EtcdServer::start().await;
    let crashed = backend(&server, budget(100, 0)).await;
    let survivor = backend(&server, budget(100, 0)).await;
    let ttl = crashed.lease_ttl(HOLD);
    assert_eq!(
        ttl,
        Duration::from_secs(3),
        "hold 1 s + margin 1 s, raised to the 3 s minimum"
    );

    crashed.acquire(0, HOLD).await.expect("acquire");
    let acquired_at = Instant::now();
    // Dropping the backend stops its keep-alives and revokes nothing, as a crash would.
    drop(crashed);

    let lock = timeout(ttl + WAIT, survivor.acquire(0, HOLD))
        .await
        .expect("the bucket frees once the lease expires")
        .expect("acquire");
    let freed_after = acquired_at.elapsed();
    assert!(
        freed_after >= HOLD,
        "bucket freed after {freed_after:?}, before the {HOLD:?} hold ended"
    );
    assert!(
        freed_after >= ttl - Duration::from_millis(250),
        "bucket freed after {freed_after:?}, before the {ttl:?} lease could expire"
    );
    assert!(
        freed_after <= ttl + Duration::from_millis(1500),
        "bucket freed only after {freed_after:?}, TTL {ttl:?}"
    );
    survivor.begin_identify(lock).await.expect("identify");
}

#[tokio::test]
async fn crash_after_identify_keeps_full_ttl() {
    let server = EtcdServer::start().await;
    let crashed = backend(&server, budget(100, 0)).await;
    let survivor = backend(&server, budget(100, 0)).await;
    let ttl = crashed.lease_ttl(HOLD);

    let lock = crashed.acquire(0, HOLD).await.expect("acquire");
    // Keep-alives go out every TTL/3 (1 s). Identifying just before the next one is due means
    // the last renewal, if begin_identify sent none, would be almost a second old.
    tokio::time::sleep(Duration::from_millis(900)).await;
    crashed.begin_identify(lock).await.expect("identify");
    let identified_at = Instant::now();
    drop(crashed);

    timeout(ttl + WAIT, survivor.acquire(0, HOLD))
        .await
        .expect("the bucket frees once the lease expires")
        .expect("acquire");
    let freed_after = identified_at.elapsed();
    assert!(
        freed_after >= ttl - Duration::from_millis(250),
        "bucket freed {freed_after:?} after IDENTIFY, before the {ttl:?} lease could expire"
    );
}

#[tokio::test]
async fn keep_alive_outlasts_ttl() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let waiter = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);
    let ttl = holder.lease_ttl(HOLD);

    let held = holder.acquire(0, HOLD).await.expect("acquire");
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire(0, HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;

    // Both leases would have expired by now without their keep-alives.
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert_eq!(
        queue_len(&mut admin, &prefix).await,
        2,
        "a queued key expired"
    );
    holder
        .begin_identify(held)
        .await
        .expect("the holder keeps its lock past the TTL");

    holder.release(held).await.expect("release");
    let lock = timeout(WAIT, waiting)
        .await
        .expect("the waiter keeps its place past the TTL")
        .expect("acquire task")
        .expect("acquire");
    waiter.begin_identify(lock).await.expect("identify");
}

#[tokio::test]
async fn revoked_lease_is_lock_lost() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let other = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, HOLD).await.expect("acquire");
    let keys = admin
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .expect("queue read");
    let lease = keys.kvs()[0].lease();
    assert_ne!(lease, 0, "the lock key has no lease");
    admin.lease_revoke(lease).await.expect("revoke");

    let refusal = holder.begin_identify(held).await;
    assert!(
        matches!(refusal, Err(IdentifyRefusal::LockLost)),
        "identify under a revoked lease: {refusal:?}"
    );
    assert_eq!(
        stored_budget(&mut admin, holder.budget_key()).await,
        None,
        "a lost lock spent a session start"
    );

    holder.release(held).await.expect("release of a lost lock");
    let lock = timeout(WAIT, other.acquire(0, HOLD))
        .await
        .expect("the bucket is free again")
        .expect("acquire");
    other.begin_identify(lock).await.expect("identify");
    other.release(lock).await.expect("release");
    let again = timeout(WAIT, holder.acquire(0, HOLD))
        .await
        .expect("the first backend can lock the bucket again")
        .expect("acquire");
    holder.release(again).await.expect("release");
}

#[tokio::test]
async fn revoked_waiter_stops_waiting() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let waiter = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, LONG_HOLD).await.expect("holder acquire");
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire(0, LONG_HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;
    let keys = admin
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_sort(
                etcd_client::SortTarget::Create,
                etcd_client::SortOrder::Ascend,
            )),
        )
        .await
        .expect("queue read");
    let waiter_lease = keys.kvs()[1].lease();
    admin.lease_revoke(waiter_lease).await.expect("revoke");

    // The first keep-alive of the 11 s lease is due after about 3.7 s and would end the wait
    // with `LeaseExpired`. The watch of the bucket reports the key's delete well before that.
    let stopped = timeout(WAIT, waiting)
        .await
        .expect("the waiter still waits after its key was deleted")
        .expect("acquire task");
    let Err(PortError::Unavailable { source, .. }) = stopped else {
        panic!("a waiter with a revoked lease acquired the bucket: {stopped:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<EtcdError>(),
            Some(EtcdError::QueuedKeyDeleted { bucket: 0, .. })
        ),
        "{source}"
    );

    holder.release(held).await.expect("release");
    let lock = timeout(WAIT, waiter.acquire(0, LONG_HOLD))
        .await
        .expect("the waiter can queue again")
        .expect("acquire");
    waiter.begin_identify(lock).await.expect("identify");
}

#[tokio::test]
async fn recreated_lock_key_is_lock_lost() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;

    let held = holder.acquire(0, HOLD).await.expect("acquire");
    let keys = admin
        .get(
            holder.bucket_prefix(0),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("queue read");
    let key = keys.kvs()[0].key().to_vec();
    // Same key, same lease, new create revision: only the revision compare can tell.
    admin.delete(key.clone(), None).await.expect("delete");
    let lease = keys.kvs()[0].lease();
    admin
        .put(
            key,
            "",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put");

    let refusal = holder.begin_identify(held).await;
    assert!(
        matches!(refusal, Err(IdentifyRefusal::LockLost)),
        "identify under a recreated key: {refusal:?}"
    );
    assert_eq!(stored_budget(&mut admin, holder.budget_key()).await, None);
}

#[tokio::test]
async fn dropped_acquire_revokes_its_lease() {
    let server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let waiter = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, LONG_HOLD).await.expect("acquire");
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire(0, LONG_HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;

    // The coordinator aborts its acquire tasks when it stops. The lease (11 s) would keep the
    // key far longer than WAIT, so only the revoke can remove it in time.
    waiting.abort();
    wait_for_queue(&mut admin, &prefix, 1).await;
    holder.release(held).await.expect("release");
    wait_for_queue(&mut admin, &prefix, 0).await;
}

#[tokio::test]
async fn outage_blocks_acquire_until_restart() {
    let (events, _guard) = capture_logs();
    let mut server = EtcdServer::start().await;
    let holder = backend(&server, budget(100, 0)).await;
    let waiter = backend(&server, budget(100, 0)).await;
    let mut admin = admin(&server).await;
    let prefix = holder.bucket_prefix(0);

    let held = holder.acquire(0, LONG_HOLD).await.expect("acquire");
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire(0, LONG_HOLD).await })
    };
    wait_for_queue(&mut admin, &prefix, 2).await;

    server.stop().await;
    let interrupted = timeout(WAIT, waiting)
        .await
        .expect("the waiter returns when etcd goes away")
        .expect("acquire task");
    assert!(
        matches!(
            interrupted,
            Err(PortError::Unavailable {
                backend: "etcd",
                ..
            })
        ),
        "waiter during the outage: {interrupted:?}"
    );
    let fresh = timeout(WAIT, waiter.acquire(1, LONG_HOLD))
        .await
        .expect("acquire fails fast while etcd is down");
    assert!(
        matches!(fresh, Err(PortError::Unavailable { .. })),
        "acquire during the outage: {fresh:?}"
    );
    let identify = holder.begin_identify(held).await;
    assert!(
        matches!(identify, Err(IdentifyRefusal::Unavailable(_))),
        "begin_identify during the outage: {identify:?}"
    );

    server.restart().await;
    // etcd keeps leases across a restart, so the holder still holds bucket 0.
    holder
        .begin_identify(held)
        .await
        .expect("the holder identifies after the restart");
    holder.release(held).await.expect("release");
    // The interrupted waiter's key was revoked once etcd came back; its 11 s lease would
    // otherwise block bucket 0 well past WAIT.
    let lock = timeout(WAIT, waiter.acquire(0, LONG_HOLD))
        .await
        .expect("bucket 0 is free after the restart")
        .expect("acquire after the restart");
    waiter.release(lock).await.expect("release");

    let events = events.lock().unwrap().clone();
    let count = |level: tracing::Level, message: &str| {
        events
            .iter()
            .filter(|(event_level, text)| *event_level == level && text == message)
            .count()
    };
    let unreachable = "etcd unreachable; no shard identifies until it answers again";
    // One line per backend, each with its own connection, however many calls failed.
    assert_eq!(count(tracing::Level::WARN, unreachable), 2, "{events:#?}");
    assert_eq!(
        count(tracing::Level::INFO, "etcd reachable again"),
        2,
        "{events:#?}"
    );
}

#[tokio::test]
async fn budget_shared_until_reserve() {
    let server = EtcdServer::start().await;
    let first = backend(&server, budget(5, 2)).await;
    let second = backend(&server, budget(5, 2)).await;
    let mut admin = admin(&server).await;
    let key = first.budget_key().to_owned();

    identify_once(&first, 0).await.expect("first start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 4);
    identify_once(&second, 1).await.expect("second start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 3);
    identify_once(&first, 2).await.expect("third start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 2);

    let refusal = identify_once(&second, 0).await;
    let Err(IdentifyRefusal::BudgetExhausted {
        remaining,
        reserve,
        reset_in,
    }) = refusal
    else {
        panic!("expected a refusal at the reserve, got {refusal:?}");
    };
    assert_eq!((remaining, reserve), (2, 2));
    assert!(
        reset_in > Duration::from_secs(50) && reset_in <= Duration::from_secs(60),
        "reset_in {reset_in:?}, expected just under the reported 60 s"
    );
    assert_eq!(
        stored_remaining(&mut admin, &key).await,
        2,
        "a refused IDENTIFY spent a start"
    );

    let stored = stored_budget(&mut admin, &key).await.expect("budget");
    assert_eq!(stored["total"], 1000);
    let resets_at = stored["resets_at_unix_ms"].as_u64().expect("reset time");
    let now = unix_ms_now();
    assert!(
        resets_at > now + 50_000 && resets_at <= now + 60_000,
        "stored reset time {resets_at} is not about 60 s after {now}"
    );
}

#[tokio::test]
async fn reserve_refusal_reads_budget_again() {
    let server = EtcdServer::start().await;
    let backend = backend(&server, budget(3, 2)).await;
    let mut admin = admin(&server).await;
    let key = backend.budget_key().to_owned();

    identify_once(&backend, 0).await.expect("first start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 2);
    let refusal = identify_once(&backend, 1).await;
    assert!(
        matches!(refusal, Err(IdentifyRefusal::BudgetExhausted { .. })),
        "IDENTIFY allowed at the reserve: {refusal:?}"
    );

    // An operator deletes the budget key, which sets it again from the report (3 left).
    admin.delete(key.as_str(), None).await.expect("delete");
    identify_once(&backend, 2)
        .await
        .expect("the backend spends from the budget set again, not from its old copy");
    assert_eq!(stored_remaining(&mut admin, &key).await, 2);
}

#[tokio::test]
async fn restarted_backend_never_raises_budget() {
    let server = EtcdServer::start().await;
    let first = backend(&server, budget(10, 0)).await;
    let mut admin = admin(&server).await;
    let key = first.budget_key().to_owned();
    for bucket in 0..3 {
        identify_once(&first, bucket).await.expect("start");
    }
    assert_eq!(stored_remaining(&mut admin, &key).await, 7);
    drop(first);

    // A process restarted later reads a higher `remaining` from Discord.
    let restarted = backend(&server, budget(50, 0)).await;
    identify_once(&restarted, 0).await.expect("start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 6);

    // A lower report lowers it.
    let lower = backend(&server, budget(4, 0)).await;
    identify_once(&lower, 1).await.expect("start");
    assert_eq!(stored_remaining(&mut admin, &key).await, 3);
}

#[tokio::test]
async fn expired_budget_takes_new_report() {
    let server = EtcdServer::start().await;
    let mut admin = admin(&server).await;
    let backend = backend(&server, budget(500, 20)).await;
    let key = backend.budget_key().to_owned();
    let expired = serde_json::json!({
        "remaining": 3,
        "total": 1000,
        "resets_at_unix_ms": unix_ms_now() - 1_000,
    });
    admin
        .put(key.as_str(), expired.to_string(), None)
        .await
        .expect("put");

    identify_once(&backend, 0)
        .await
        .expect("a passed reset time no longer refuses");
    assert_eq!(stored_remaining(&mut admin, &key).await, 499);
}

#[tokio::test]
async fn concurrent_spends_all_counted() {
    let server = EtcdServer::start().await;
    let mut admin = admin(&server).await;
    let mut tasks = Vec::new();
    let mut key = String::new();
    for bucket in 0..4 {
        let backend = backend(&server, budget(100, 0)).await;
        key = backend.budget_key().to_owned();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                identify_once(&backend, bucket).await.expect("start");
            }
        }));
    }
    for task in tasks {
        timeout(WAIT * 2, task)
            .await
            .expect("spends finish")
            .expect("spend task");
    }
    assert_eq!(stored_remaining(&mut admin, &key).await, 80);
}

#[tokio::test]
async fn connect_fails_without_etcd() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let options = EtcdOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..EtcdOptions::new(vec![format!("http://127.0.0.1:{port}")], budget(10, 0))
    };
    let started = Instant::now();
    let result = EtcdBackend::connect(options.clone()).await;
    assert!(
        matches!(
            result,
            Err(PortError::Unavailable {
                backend: "etcd",
                ..
            })
        ),
        "connect to a closed port: {:?}",
        result.err()
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    let empty = EtcdBackend::connect(EtcdOptions {
        endpoints: Vec::new(),
        ..options
    })
    .await;
    let message = empty
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(message.contains("no etcd endpoint"), "{message}");
}

#[tokio::test]
async fn cursor_store_round_trip() {
    let server = EtcdServer::start().await;
    let store = EtcdCursorStore::connect(EtcdCursorOptions::new(vec![server.endpoint()]))
        .await
        .expect("connect");
    let mut admin = admin(&server).await;

    assert_eq!(store.load_cursor("alpha").await.expect("load"), None);
    store.save_cursor("alpha", 42).await.expect("save");
    store.save_cursor("beta", 7).await.expect("save");
    assert_eq!(store.load_cursor("alpha").await.expect("load"), Some(42));
    assert_eq!(store.load_cursor("beta").await.expect("load"), Some(7));

    store
        .save_cursor("alpha", u64::MAX)
        .await
        .expect("overwrite");
    assert_eq!(
        store.load_cursor("alpha").await.expect("load"),
        Some(u64::MAX)
    );
    assert_eq!(store.load_cursor("beta").await.expect("load"), Some(7));
    assert_eq!(store.load_cursor("alph").await.expect("load"), None);

    let raw = admin.get("/gateway/sweep/beta", None).await.expect("get");
    assert_eq!(raw.kvs()[0].value(), b"7", "cursor not at the default key");

    admin
        .put(store.key("broken"), "not a number", None)
        .await
        .expect("put");
    let broken = store.load_cursor("broken").await;
    let Err(PortError::Unavailable { source, .. }) = broken else {
        panic!("a corrupt cursor loaded: {broken:?}");
    };
    assert!(
        matches!(
            source.downcast_ref::<EtcdError>(),
            Some(EtcdError::InvalidCursor { .. })
        ),
        "{source}"
    );
}

/// Events of the etcd adapter as (level, message), recorded on this thread while the guard
/// lives. The tests run on Tokio's current-thread runtime, so spawned tasks log here too.
type Events = Arc<Mutex<Vec<(tracing::Level, String)>>>;

fn capture_logs() -> (Events, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;

    let events = Events::default();
    let subscriber = tracing_subscriber::registry().with(Recorder(events.clone()));
    (events, tracing::subscriber::set_default(subscriber))
}

struct Recorder(Events);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !event
            .metadata()
            .target()
            .starts_with("shardvisor::adapters::etcd")
        {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), message.0));
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
