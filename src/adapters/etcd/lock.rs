//! Bucket locks: the etcd lock recipe on KV, leases and watches.
//!
//! A waiter grants itself a lease, puts `<prefix>/<bucket>/<lease id in hex>` under it and owns
//! the lock once its key has the lowest create revision under `<prefix>/<bucket>/`. Until then it
//! reads the keys created before its own and watches the bucket until all of them are deleted, so
//! waiters of every process are served in the order etcd created their keys. Each lock has a
//! lease of its own, so a crashed holder frees only its own key, when its lease expires. A
//! release revokes the lease, which deletes the key in the same write.
//!
//! The Lock RPC is not used. Called without a lease, it makes etcd create a session lease with a
//! 60 s TTL (etcd 3.4.23) that no client renews.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use actors::coordinator::BackendLock;
use etcd_client::{
    EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchFilterType,
    WatchOptions,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::connection::Connection;
use super::EtcdError;

/// Shortest lease TTL the backend requests. etcd raises shorter TTLs to its own minimum (a
/// request for 1 s got 2 s from etcd 3.4.23 with its default 1 s election timeout). Keep-alives go
/// out every TTL/3, so with 3 s a waiter can miss one and still renew before its lease expires.
const MIN_LEASE_TTL_SECS: i64 = 3;

/// Longest TTL etcd accepts: etcd 3.4.23 granted 9 × 10⁹ s and rejected one second more.
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// First and longest delay between attempts to reopen a keep-alive stream or to revoke a lease.
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A lease id, shown in hex as in lock keys and `etcdctl lease list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LeaseId(i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A held lock's identity, as [`Locks::get`] returns it for the budget transaction.
pub(super) struct HeldLockInfo {
    pub(super) bucket: u32,
    pub(super) lease: LeaseId,
    pub(super) key: String,
    /// Create revision of the lock key when the lock was granted. The budget transaction
    /// compares it, so a key deleted and created again never passes as the same lock.
    pub(super) create_revision: i64,
    /// The keep-alive task saw the lease expire or get revoked.
    pub(super) lost: bool,
}

struct HeldLock {
    bucket: u32,
    lease: LeaseId,
    key: String,
    create_revision: i64,
    ttl: Duration,
    since: Instant,
    lost: watch::Receiver<bool>,
    keeper: JoinHandle<()>,
}

/// The bucket locks of one backend: how to take them and the ones held.
pub(super) struct Locks {
    connection: Connection,
    prefix: String,
    lease_margin: Duration,
    /// Held locks by handle, which is the lease id.
    held: Mutex<HashMap<u64, HeldLock>>,
}

impl Locks {
    pub(super) fn new(connection: Connection, prefix: String, lease_margin: Duration) -> Self {
        Self {
            connection,
            prefix,
            lease_margin,
            held: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn bucket_prefix(&self, bucket: u32) -> String {
        // The trailing slash keeps bucket 1 from matching the keys of bucket 10.
        format!("{}/{bucket}/", self.prefix)
    }

    /// Returns the lease TTL for a hold: `hold + lease_margin` rounded up to whole seconds,
    /// between [`MIN_LEASE_TTL_SECS`] and [`MAX_LEASE_TTL_SECS`].
    ///
    /// The keep-alive task renews the lease every TTL/3 while the lock is queued and held, and
    /// `begin_identify` renews it once more before it spends the session start. Even if no
    /// keep-alive reaches etcd after that renewal, the lease outlives the coordinator's hold
    /// after IDENTIFY (pacing and grace, at most twice the pacing while the write is
    /// unreported). A holder that crashes after IDENTIFY thus keeps its bucket closed for at
    /// least the TTL after it began the IDENTIFY. The margin covers the time between etcd
    /// receiving the renewal and the coordinator starting its timer (round trips plus
    /// scheduling), and the rounding to whole seconds only adds to it.
    ///
    /// A lease that lapses before `begin_identify` (keep-alives lost to a partition) only makes
    /// `begin_identify` fail: its renewal finds no lease, and the budget transaction no key.
    pub(super) fn lease_ttl_secs(&self, hold: Duration) -> i64 {
        let total = hold.saturating_add(self.lease_margin);
        let whole = total.as_secs() + u64::from(total.subsec_nanos() > 0);
        i64::try_from(whole)
            .unwrap_or(i64::MAX)
            .clamp(MIN_LEASE_TTL_SECS, MAX_LEASE_TTL_SECS)
    }

    /// Takes the lock of a bucket, waiting behind the waiters queued before this one.
    pub(super) async fn acquire(
        &self,
        bucket: u32,
        hold: Duration,
    ) -> Result<BackendLock, EtcdError> {
        let started = Instant::now();
        let pending = self.grant_lease(bucket, hold).await?;
        let lease = pending.lease;

        let key = format!("{}{lease}", self.bucket_prefix(bucket));
        let create_revision = self.enqueue(&key, lease).await?;
        tracing::debug!(bucket, lease = %lease, revision = create_revision, "queued for bucket lock");

        let mut lost = pending.lost.clone();
        tokio::select! {
            waited = self.wait_for_turn(bucket, &key, create_revision) => waited?,
            _ = lost.wait_for(|lost| *lost) => {
                return Err(EtcdError::LeaseExpired { lease: lease.0, bucket });
            }
        }

        // No renewal here: `begin_identify` renews the lease before the lock covers an
        // IDENTIFY, and until then the keep-alive task keeps it.
        self.record_held(pending, key, create_revision);
        tracing::debug!(
            bucket,
            lease = %lease,
            revision = create_revision,
            waited_ms = started.elapsed().as_millis() as u64,
            "bucket lock acquired"
        );
        Ok(BackendLock {
            bucket,
            handle: handle(lease),
        })
    }

    /// Moves a granted lock's lease and keep-alive task into the table of held locks.
    fn record_held(&self, pending: PendingLease, key: String, create_revision: i64) {
        let (bucket, lease, ttl) = (pending.bucket, pending.lease, pending.ttl);
        let (keeper, lost) = pending.disarm();
        let lock = HeldLock {
            bucket,
            lease,
            key,
            create_revision,
            ttl,
            since: Instant::now(),
            lost,
            keeper,
        };
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(handle(lease), lock);
    }

    /// Grants a lease for one lock and starts keeping it alive.
    async fn grant_lease(&self, bucket: u32, hold: Duration) -> Result<PendingLease, EtcdError> {
        let requested = self.lease_ttl_secs(hold);
        let grant = self
            .connection
            .call("lease grant", move |mut client| async move {
                client.lease_grant(requested, None).await
            })
            .await?;

        // etcd may raise the TTL to its minimum; the keep-alive cadence follows the granted one.
        let lease = LeaseId(grant.id());
        let ttl = Duration::from_secs(grant.ttl().max(requested).unsigned_abs());
        let (lost_sender, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(
            self.connection.clone(),
            lease,
            bucket,
            ttl,
            lost_sender,
        ));
        tracing::debug!(bucket, lease = %lease, ttl_s = ttl.as_secs(), "lease granted");
        Ok(PendingLease {
            connection: self.connection.clone(),
            lease,
            bucket,
            ttl,
            lost,
            keeper: Some(keeper),
        })
    }

    /// Puts the lock key under the lease and returns its create revision.
    async fn enqueue(&self, key: &str, lease: LeaseId) -> Result<i64, EtcdError> {
        let key = key.to_owned();
        let put = self
            .connection
            .call("lock key put", move |mut client| async move {
                client
                    .put(key, "", Some(PutOptions::new().with_lease(lease.0)))
                    .await
            })
            .await?;
        // The key is new (its name contains a fresh lease id), so the revision of the put is its
        // create revision.
        Ok(put.header().map_or(0, |header| header.revision()))
    }

    /// Returns once no key of the bucket has a create revision below `own_revision`, the create
    /// revision of `own_key`.
    ///
    /// Keys created later never rank before this one, so the keys ahead are read once and the
    /// wait ends when the watch has seen each of them deleted. A second read of the queue is
    /// needed only when etcd cancels the watch.
    async fn wait_for_turn(
        &self,
        bucket: u32,
        own_key: &str,
        own_revision: i64,
    ) -> Result<(), EtcdError> {
        let prefix = self.bucket_prefix(bucket);
        loop {
            let options = GetOptions::new()
                .with_prefix()
                .with_max_create_revision(own_revision - 1)
                .with_keys_only();
            let range_key = prefix.clone();
            let queue = self
                .connection
                .call("lock queue read", move |mut client| async move {
                    client.get(range_key, Some(options)).await
                })
                .await?;
            let ahead: HashSet<Vec<u8>> = queue.kvs().iter().map(|kv| kv.key().to_vec()).collect();
            if ahead.is_empty() {
                return Ok(());
            }

            let revision = queue.header().map_or(0, |header| header.revision());
            tracing::debug!(
                bucket,
                ahead = ahead.len(),
                revision,
                "waiting for the keys ahead to be deleted"
            );
            if self
                .wait_for_deletes(bucket, own_key, ahead, revision + 1)
                .await?
            {
                return Ok(());
            }
        }
    }

    /// Watches the bucket from `start_revision` and returns `true` once every key of `ahead` is
    /// deleted, or `false` when etcd cancels the watch (its start revision was compacted), after
    /// which the caller reads the queue again. Fails with [`EtcdError::QueuedKeyDeleted`] when
    /// `own_key` is deleted first, by a revoke of its lease for example.
    ///
    /// The watch starts at the read's header revision + 1, so a delete between the read and the
    /// watch is replayed. It also makes the watch fast when no other write comes in between (etcd
    /// 3.4.23 over loopback on a 2-core machine, 5 runs each). A watch started at the header
    /// revision itself saw a later delete after 25 to 90 ms, since it waits for etcd's catch-up
    /// loop for watchers that start in the past. One started at revision + 1 saw it after about
    /// 1 ms. The coordinator acquires while the bucket is still held, so the watch is normally
    /// in place long before the delete it waits for.
    async fn wait_for_deletes(
        &self,
        bucket: u32,
        own_key: &str,
        mut ahead: HashSet<Vec<u8>>,
        start_revision: i64,
    ) -> Result<bool, EtcdError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_filters([WatchFilterType::NoPut]);
        let key = self.bucket_prefix(bucket);
        let mut stream = self
            .connection
            .call("lock watch", move |mut client| async move {
                client.watch(key, Some(options)).await
            })
            .await?;

        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return Err(self.stream_failed(EtcdError::StreamClosed {
                        operation: "lock watch",
                    }))
                }
                Err(source) => {
                    return Err(self.stream_failed(EtcdError::request("lock watch", source)))
                }
            };
            if message.canceled() {
                tracing::debug!(
                    compact_revision = message.compact_revision(),
                    reason = message.cancel_reason(),
                    "lock watch canceled by etcd; reading the queue again"
                );
                return Ok(false);
            }
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                if event.event_type() != EventType::Delete {
                    continue;
                }
                if kv.key() == own_key.as_bytes() {
                    return Err(EtcdError::QueuedKeyDeleted {
                        bucket,
                        key: own_key.to_owned(),
                    });
                }
                ahead.remove(kv.key());
            }
            if ahead.is_empty() {
                return Ok(true);
            }
        }
    }

    fn stream_failed(&self, error: EtcdError) -> EtcdError {
        self.connection.record_failure(&error);
        error
    }

    /// Restarts the full TTL of a held lock's lease right before IDENTIFY. Returns
    /// [`EtcdError::LeaseExpired`] when the lease is gone.
    pub(super) async fn renew_held(&self, lock: &HeldLockInfo) -> Result<(), EtcdError> {
        renew(&self.connection, lock.lease, lock.bucket).await
    }

    /// Returns what the budget transaction needs to know about a held lock.
    pub(super) fn get(&self, lock: BackendLock) -> Option<HeldLockInfo> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = held
            .get(&lock.handle)
            .filter(|entry| entry.bucket == lock.bucket)?;
        let lost = *entry.lost.borrow();
        Some(HeldLockInfo {
            bucket: entry.bucket,
            lease: entry.lease,
            key: entry.key.clone(),
            create_revision: entry.create_revision,
            lost,
        })
    }

    /// Revokes the lock's lease. etcd deletes the lock key in the same write, which wakes the
    /// next waiter, so a release costs one write instead of a delete and a revoke. A lock that
    /// is not held (released before, or never granted here) is released already.
    ///
    /// When etcd cannot be reached the lease is revoked in the background as soon as it can,
    /// and expires on its own after its TTL otherwise.
    pub(super) async fn release(&self, lock: BackendLock) -> Result<(), EtcdError> {
        let Some(held) = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&lock.handle)
        else {
            return Ok(());
        };
        held.keeper.abort();

        if let Err(error) = revoke(&self.connection, held.lease).await {
            spawn_revoke(self.connection.clone(), held.lease, held.bucket, held.ttl);
            return Err(error);
        }

        tracing::debug!(
            bucket = held.bucket,
            lease = %held.lease,
            held_ms = held.since.elapsed().as_millis() as u64,
            "bucket lock released"
        );
        Ok(())
    }
}

impl Drop for Locks {
    /// Stops keeping the held leases alive without revoking them: a holder may have sent
    /// IDENTIFY, so its bucket must stay closed until the lease expires.
    fn drop(&mut self) {
        let held = self.held.get_mut().unwrap_or_else(PoisonError::into_inner);
        for lock in held.values() {
            lock.keeper.abort();
        }
    }
}

fn handle(lease: LeaseId) -> u64 {
    // etcd grants positive lease ids.
    lease.0.unsigned_abs()
}

/// A lease granted for a lock not granted yet. Dropping it (an error, or a dropped `acquire`
/// future) stops its keep-alive and revokes it in the background, so the queued key goes away at
/// once instead of after the TTL. No IDENTIFY can have been sent under it.
struct PendingLease {
    connection: Connection,
    lease: LeaseId,
    bucket: u32,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    keeper: Option<JoinHandle<()>>,
}

impl PendingLease {
    /// Hands the keep-alive task and the lost flag to the held lock.
    fn disarm(mut self) -> (JoinHandle<()>, watch::Receiver<bool>) {
        let keeper = self
            .keeper
            .take()
            .expect("a pending lease is disarmed once");
        (keeper, self.lost.clone())
    }
}

impl Drop for PendingLease {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
            spawn_revoke(self.connection.clone(), self.lease, self.bucket, self.ttl);
        }
    }
}

/// Sends one keep-alive and waits for its reply, which restarts the lease's full TTL.
async fn renew(connection: &Connection, lease: LeaseId, bucket: u32) -> Result<(), EtcdError> {
    let renewed = connection
        .call("lease renewal", move |mut client| async move {
            client.lease_keep_alive(lease.0).await
        })
        .await;
    match renewed {
        Ok(_) => Ok(()),
        Err(error) if error.is_lease_not_found() => Err(EtcdError::LeaseExpired {
            lease: lease.0,
            bucket,
        }),
        Err(error) => Err(error),
    }
}

/// Revokes a lease; a lease that is gone already counts as revoked.
async fn revoke(connection: &Connection, lease: LeaseId) -> Result<(), EtcdError> {
    let revoked = connection
        .call("lease revoke", move |mut client| async move {
            client.lease_revoke(lease.0).await
        })
        .await;
    match revoked {
        Err(error) if !error.is_lease_not_found() => Err(error),
        _ => Ok(()),
    }
}

/// Revokes a lease in the background, retrying with backoff until it succeeds or the lease has
/// surely expired on its own. Without a Tokio runtime (a drop during shutdown) the lease simply
/// expires.
fn spawn_revoke(connection: Connection, lease: LeaseId, bucket: u32, ttl: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let give_up_at = Instant::now() + ttl;
        let mut failures = 0;
        loop {
            match revoke(&connection, lease).await {
                Ok(()) => {
                    tracing::debug!(bucket, lease = %lease, "unused lease revoked");
                    return;
                }
                Err(error) => {
                    failures += 1;
                    let delay = retry_delay(failures);
                    if Instant::now() + delay >= give_up_at {
                        tracing::debug!(bucket, lease = %lease, %error, "lease not revoked; it expires on its own");
                        return;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    });
}

/// The reason a keep-alive stream ended.
enum StreamEnd {
    /// etcd replied TTL 0: the lease expired or was revoked.
    LeaseGone,
    /// The stream failed; a new one may work. `etcd-client` does not reopen it, even after etcd
    /// comes back.
    Broken(EtcdError),
}

/// Keeps a lease alive until the task is aborted or the lease is gone, then sets `lost`.
async fn keep_alive(
    connection: Connection,
    lease: LeaseId,
    bucket: u32,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let mut failures = 0;
    loop {
        match keep_alive_stream(&connection, lease, ttl, &mut failures).await {
            StreamEnd::LeaseGone => {
                tracing::debug!(bucket, lease = %lease, "lease expired or revoked; bucket lock lost");
                let _ = lost.send(true);
                return;
            }
            StreamEnd::Broken(error) => {
                connection.record_failure(&error);
                failures += 1;
                let delay = retry_delay(failures);
                tracing::debug!(
                    bucket,
                    lease = %lease,
                    %error,
                    retry_ms = delay.as_millis() as u64,
                    "lease keep-alive stream failed; opening a new one"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Opens a keep-alive stream and renews the lease every TTL/3 on it, the cadence of etcd's Go
/// client, until the stream fails or the lease is gone. `failures` is reset once the stream
/// opens.
async fn keep_alive_stream(
    connection: &Connection,
    lease: LeaseId,
    ttl: Duration,
    failures: &mut u32,
) -> StreamEnd {
    let opened = connection
        .call("lease keep-alive", move |mut client| async move {
            client.lease_keep_alive(lease.0).await
        })
        .await;
    let (mut keeper, mut stream): (LeaseKeeper, LeaseKeepAliveStream) = match opened {
        Ok(pair) => pair,
        Err(error) if error.is_lease_not_found() => return StreamEnd::LeaseGone,
        Err(error) => return StreamEnd::Broken(error),
    };
    *failures = 0;

    // Opening the stream renewed the lease, so the first tick (which fires at once) is skipped.
    let mut ticker = tokio::time::interval(ttl / 3);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(source) = keeper.keep_alive().await {
                    return StreamEnd::Broken(EtcdError::request("lease keep-alive", source));
                }
            }
            reply = stream.message() => match reply {
                Ok(Some(reply)) if reply.ttl() <= 0 => return StreamEnd::LeaseGone,
                Ok(Some(_)) => {}
                Ok(None) => {
                    return StreamEnd::Broken(EtcdError::StreamClosed {
                        operation: "lease keep-alive",
                    })
                }
                Err(source) => {
                    return StreamEnd::Broken(EtcdError::request("lease keep-alive", source))
                }
            }
        }
    }
}

/// Returns `RETRY_BASE × 2^(failures-1)`, capped at `RETRY_MAX`.
fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(factor).min(RETRY_MAX)
}
