use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorId, ActorRef};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;

const PACING: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_millis(250);
const UNSENT: Duration = Duration::from_secs(10);

async fn coordinator(max_concurrency: u32) -> ActorRef<CoordinatorMsg> {
    let args = CoordinatorArgs {
        max_concurrency,
        pacing: PACING,
        grace: GRACE,
        unsent_timeout: UNSENT,
        backend_retry: Duration::from_millis(100),
        backend: Arc::new(InProcessBackend::unlimited()),
    };
    let (actor, _) = Actor::spawn(None, IdentifyCoordinator, args).await.unwrap();
    actor
}

/// Asks for a lease in the background; the receiver yields it once granted.
fn request(
    coordinator: &ActorRef<CoordinatorMsg>,
    shard: u32,
    holder: u64,
) -> oneshot::Receiver<Lease> {
    let (sender, receiver) = oneshot::channel();
    let coordinator = coordinator.clone();
    tokio::spawn(async move {
        let result = coordinator
            .call(
                |reply| CoordinatorMsg::Acquire {
                    shard,
                    holder: ActorId::Local(holder),
                    reply,
                },
                None,
            )
            .await;
        if let Ok(CallResult::Success(lease)) = result {
            let _ = sender.send(lease);
        }
    });
    receiver
}

async fn begin(coordinator: &ActorRef<CoordinatorMsg>, lease: Lease) -> bool {
    let begun = begin_only(coordinator, lease).await;
    if begun {
        coordinator
            .cast(CoordinatorMsg::IdentifyWritten { lease })
            .unwrap();
    }
    begun
}

/// Begins IDENTIFY without reporting the write, as a holder whose connection died would.
async fn begin_only(coordinator: &ActorRef<CoordinatorMsg>, lease: Lease) -> bool {
    let result = coordinator
        .call(|reply| CoordinatorMsg::BeginIdentify { lease, reply }, None)
        .await
        .unwrap();
    matches!(result, CallResult::Success(true))
}

async fn status(coordinator: &ActorRef<CoordinatorMsg>) -> Vec<BucketStatus> {
    match coordinator
        .call(CoordinatorMsg::Status, None)
        .await
        .unwrap()
    {
        CallResult::Success(status) => status,
        _ => panic!("status call failed"),
    }
}

/// Lets every ready task and actor run at the current paused instant.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn bucket_serves_shards_in_order() {
    let coordinator = coordinator(2).await;
    let mut third = request(&coordinator, 4, 4);
    let mut second = request(&coordinator, 2, 2);
    let first = request(&coordinator, 0, 0);
    settle().await;

    // Shard 4 asked first but shard 0 is served first: the queue is in shard order, and the
    // grant waits for the backend, which answers after all three requests are queued.
    let lease = tokio::time::timeout(Duration::from_secs(1), first).await;
    let lease = match lease {
        Ok(Ok(lease)) => lease,
        _ => {
            // Shard 4 may have been granted before the others arrived; that is FIFO, not shard
            // order, and a failure.
            panic!("shard 0 was not granted first");
        }
    };
    assert_eq!(lease.bucket, 0);
    assert!(
        second.try_recv().is_err(),
        "shard 2 granted while shard 0 holds the bucket"
    );
    assert!(
        third.try_recv().is_err(),
        "shard 4 granted while shard 0 holds the bucket"
    );

    let started = Instant::now();
    assert!(begin(&coordinator, lease).await);
    let second = second.await.unwrap();
    assert!(
        started.elapsed() >= PACING + GRACE,
        "bucket freed {:?} after IDENTIFY, before pacing + grace",
        started.elapsed()
    );
    assert_eq!(second.bucket, 0);
}

#[tokio::test(start_paused = true)]
async fn buckets_grant_independently() {
    let coordinator = coordinator(4).await;
    let leases: Vec<_> = (0..4)
        .map(|shard| request(&coordinator, shard, shard as u64))
        .collect();
    settle().await;
    for (shard, receiver) in leases.into_iter().enumerate() {
        let lease = tokio::time::timeout(Duration::from_millis(10), receiver)
            .await
            .unwrap_or_else(|_| panic!("shard {shard} not granted at once"))
            .unwrap();
        assert_eq!(lease.bucket, shard as u32);
    }
}

#[tokio::test(start_paused = true)]
async fn slow_ready_does_not_wedge_bucket() {
    let coordinator = coordinator(1).await;
    let first = request(&coordinator, 0, 1);
    let lease = first.await.unwrap();
    assert!(begin(&coordinator, lease).await);

    // Nothing more from the holder (READY never comes): the bucket still frees on time.
    let next = request(&coordinator, 1, 2);
    let started = Instant::now();
    next.await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited <= PACING + GRACE + Duration::from_millis(10),
        "waited {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn holder_stopped_before_identify_frees_bucket() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 7).await.unwrap();
    let next = request(&coordinator, 1, 8);
    settle().await;

    let started = Instant::now();
    coordinator
        .cast(CoordinatorMsg::HolderStopped {
            holder: ActorId::Local(7),
        })
        .unwrap();
    next.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(10),
        "freed after {:?}",
        started.elapsed()
    );
    assert!(
        !begin(&coordinator, lease).await,
        "a freed lease still began IDENTIFY"
    );
}

#[tokio::test(start_paused = true)]
async fn holder_stopped_after_identify_keeps_pacing() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 7).await.unwrap();
    assert!(begin(&coordinator, lease).await);
    let next = request(&coordinator, 1, 8);
    settle().await;

    let started = Instant::now();
    coordinator
        .cast(CoordinatorMsg::HolderStopped {
            holder: ActorId::Local(7),
        })
        .unwrap();
    next.await.unwrap();
    assert!(
        started.elapsed() >= PACING + GRACE - Duration::from_millis(10),
        "bucket freed {:?} after a holder that had sent IDENTIFY stopped",
        started.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn release_after_identify_is_ignored() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, lease).await);
    coordinator.cast(CoordinatorMsg::Release { lease }).unwrap();
    settle().await;

    let buckets = status(&coordinator).await;
    assert_eq!(
        buckets[0].holder,
        Some(0),
        "bucket freed by a release after IDENTIFY"
    );
    assert!(buckets[0].sent);
}

#[tokio::test(start_paused = true)]
async fn unused_lease_times_out() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();
    let next = request(&coordinator, 1, 2);
    let started = Instant::now();
    next.await.unwrap();
    assert!(started.elapsed() >= UNSENT - Duration::from_millis(10));
    assert!(!begin(&coordinator, lease).await);
}

#[tokio::test(start_paused = true)]
async fn stale_timer_cannot_release_new_lease() {
    let coordinator = coordinator(1).await;
    let old = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, old).await);

    // The old holder is restarted while its pacing timer is pending; its new incarnation asks
    // again and is granted only when the coordinator's own timer frees the bucket.
    coordinator
        .cast(CoordinatorMsg::HolderStopped {
            holder: ActorId::Local(1),
        })
        .unwrap();
    let new = request(&coordinator, 0, 2).await.unwrap();
    assert_ne!(new.id, old.id);

    // A late or repeated timer of the old lease, and a release by the old incarnation, must not
    // touch the new lease.
    coordinator
        .cast(CoordinatorMsg::PacingElapsed { lease: old })
        .unwrap();
    coordinator
        .cast(CoordinatorMsg::UnsentElapsed { lease: old })
        .unwrap();
    coordinator
        .cast(CoordinatorMsg::Release { lease: old })
        .unwrap();
    settle().await;
    let buckets = status(&coordinator).await;
    assert_eq!(
        buckets[0].holder,
        Some(0),
        "new lease released by a stale message"
    );
    assert!(!buckets[0].sent);
    assert!(
        !begin(&coordinator, old).await,
        "the old lease began a second IDENTIFY"
    );
    assert!(begin(&coordinator, new).await);
}

#[tokio::test(start_paused = true)]
async fn gone_waiter_is_skipped() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();

    // Shard 1's requester stops waiting: aborting its call drops the reply port.
    let gone = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            let _ = coordinator
                .call(
                    |reply| CoordinatorMsg::Acquire {
                        shard: 1,
                        holder: ActorId::Local(2),
                        reply,
                    },
                    None,
                )
                .await;
        })
    };
    let waiting = request(&coordinator, 2, 3);
    settle().await;
    gone.abort();
    settle().await;

    coordinator.cast(CoordinatorMsg::Release { lease }).unwrap();
    let lease = tokio::time::timeout(Duration::from_millis(50), waiting)
        .await
        .expect("shard 2 was not served after shard 1 left")
        .unwrap();
    assert_eq!(lease.bucket, 0);
    let buckets = status(&coordinator).await;
    assert_eq!(
        buckets[0].holder,
        Some(2),
        "the lease went to the requester that left"
    );
}

/// A backend that fails a number of times before it grants.
struct FlakyBackend {
    failures_left: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl IdentifyBackend for FlakyBackend {
    fn name(&self) -> &'static str {
        "flaky"
    }

    async fn acquire(&self, bucket: u32, _hold: Duration) -> Result<BackendLock, PortError> {
        use std::sync::atomic::Ordering;
        if self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PortError::Unavailable {
                backend: "flaky",
                source: "connection refused".into(),
            });
        }
        Ok(BackendLock { bucket, handle: 1 })
    }

    async fn begin_identify(&self, _lock: BackendLock) -> Result<(), IdentifyRefusal> {
        Ok(())
    }

    async fn release(&self, _lock: BackendLock) -> Result<(), PortError> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn backend_outage_delays_grant() {
    let args = CoordinatorArgs {
        max_concurrency: 1,
        pacing: PACING,
        grace: GRACE,
        unsent_timeout: UNSENT,
        backend_retry: Duration::from_millis(100),
        backend: Arc::new(FlakyBackend {
            failures_left: 3.into(),
        }),
    };
    let (coordinator, _) = Actor::spawn(None, IdentifyCoordinator, args).await.unwrap();
    let started = Instant::now();
    let lease = request(&coordinator, 0, 1).await.unwrap();
    // Retries after 100, 200 and 400 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "granted after {:?}",
        started.elapsed()
    );
    assert_eq!(lease.bucket, 0);
}

#[tokio::test(start_paused = true)]
async fn exhausted_budget_stops_grants_until_reset() {
    let reset_after = Duration::from_secs(600);
    let args = CoordinatorArgs {
        max_concurrency: 4,
        pacing: PACING,
        grace: GRACE,
        unsent_timeout: UNSENT,
        backend_retry: Duration::from_millis(100),
        backend: Arc::new(InProcessBackend::new(SessionBudget {
            total: 1000,
            remaining: 3,
            reset_after,
            reserve: 1,
        })),
    };
    let (coordinator, _) = Actor::spawn(None, IdentifyCoordinator, args).await.unwrap();

    let first = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, first).await);
    let second = request(&coordinator, 1, 2).await.unwrap();
    assert!(begin(&coordinator, second).await);
    let third = request(&coordinator, 2, 3).await.unwrap();
    assert!(
        !begin(&coordinator, third).await,
        "IDENTIFY allowed at the reserve"
    );

    // Nothing is granted while the budget is at the reserve, in any bucket.
    let mut waiting = request(&coordinator, 3, 4);
    tokio::time::sleep(reset_after / 2).await;
    assert!(
        waiting.try_recv().is_err(),
        "a lease was granted below the reserve"
    );

    let lease = tokio::time::timeout(reset_after, waiting)
        .await
        .expect("no grant after the budget reset")
        .unwrap();
    assert_eq!(lease.bucket, 3);
    assert!(begin(&coordinator, lease).await);
}

#[tokio::test(start_paused = true)]
async fn unreported_write_holds_longer() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin_only(&coordinator, lease).await);

    let next = request(&coordinator, 1, 2);
    let started = Instant::now();
    next.await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= PACING * 2 + GRACE - Duration::from_millis(10),
        "freed after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn pacing_runs_from_the_write() {
    let coordinator = coordinator(1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin_only(&coordinator, lease).await);

    // The writer reports the frame sent 300 ms after BeginIdentify: the window starts then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written_at = Instant::now();
    coordinator
        .cast(CoordinatorMsg::IdentifyWritten { lease })
        .unwrap();
    let next = request(&coordinator, 1, 2);
    next.await.unwrap();
    let waited = written_at.elapsed();
    assert!(
        waited >= PACING + GRACE - Duration::from_millis(10),
        "freed {waited:?} after the write"
    );
    assert!(
        waited <= PACING + GRACE + Duration::from_millis(10),
        "freed {waited:?} after the write"
    );
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_open_windows() {
    let coordinator = coordinator(2).await;
    let sent = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, sent).await);
    let unsent = request(&coordinator, 1, 2).await.unwrap();
    let mut waiting = request(&coordinator, 2, 3);
    settle().await;

    let started = Instant::now();
    let drained = coordinator.call(CoordinatorMsg::Drain, None).await.unwrap();
    assert!(matches!(drained, CallResult::Success(())));
    assert!(
        started.elapsed() >= PACING + GRACE - Duration::from_millis(10),
        "drained {:?} after IDENTIFY, inside the pacing window",
        started.elapsed()
    );
    assert!(
        !begin(&coordinator, unsent).await,
        "an unused lease survived the drain"
    );
    assert!(
        waiting.try_recv().is_err(),
        "a lease was granted while draining"
    );
    let buckets = status(&coordinator).await;
    assert!(buckets.iter().all(|b| b.holder.is_none()), "{buckets:?}");
}

/// A backend that records the locks it hands out and takes back, and holds `begin_identify` in
/// bucket 0 until the test adds a permit to `begin_gate`.
struct RecordingBackend {
    next_handle: std::sync::atomic::AtomicU64,
    acquired: std::sync::Mutex<Vec<BackendLock>>,
    released: std::sync::Mutex<Vec<BackendLock>>,
    gate_bucket_0: bool,
    begin_gate: tokio::sync::Semaphore,
}

impl RecordingBackend {
    fn new(gate_bucket_0: bool) -> Arc<Self> {
        Arc::new(Self {
            next_handle: 1.into(),
            acquired: Default::default(),
            released: Default::default(),
            gate_bucket_0,
            begin_gate: tokio::sync::Semaphore::new(0),
        })
    }

    fn acquired(&self) -> Vec<BackendLock> {
        self.acquired.lock().unwrap().clone()
    }

    fn released(&self) -> Vec<BackendLock> {
        self.released.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl IdentifyBackend for RecordingBackend {
    fn name(&self) -> &'static str {
        "recording"
    }

    async fn acquire(&self, bucket: u32, _hold: Duration) -> Result<BackendLock, PortError> {
        let handle = self
            .next_handle
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let lock = BackendLock { bucket, handle };
        self.acquired.lock().unwrap().push(lock);
        Ok(lock)
    }

    async fn begin_identify(&self, lock: BackendLock) -> Result<(), IdentifyRefusal> {
        if self.gate_bucket_0 && lock.bucket == 0 {
            self.begin_gate
                .acquire()
                .await
                .expect("the gate stays open")
                .forget();
        }
        Ok(())
    }

    async fn release(&self, lock: BackendLock) -> Result<(), PortError> {
        self.released.lock().unwrap().push(lock);
        Ok(())
    }
}

async fn coordinator_on(
    backend: Arc<RecordingBackend>,
    max_concurrency: u32,
) -> ActorRef<CoordinatorMsg> {
    let args = CoordinatorArgs {
        max_concurrency,
        pacing: PACING,
        grace: GRACE,
        unsent_timeout: UNSENT,
        backend_retry: Duration::from_millis(100),
        backend,
    };
    let (actor, _) = Actor::spawn(None, IdentifyCoordinator, args).await.unwrap();
    actor
}

#[tokio::test(start_paused = true)]
async fn next_lock_acquired_during_window() {
    let backend = RecordingBackend::new(false);
    let coordinator = coordinator_on(backend.clone(), 1).await;
    let first = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, first).await);
    let mut next = request(&coordinator, 1, 2);
    settle().await;

    let acquired = backend.acquired();
    assert_eq!(
        acquired.len(),
        2,
        "the waiter's lock was not acquired while the bucket was held: {acquired:?}"
    );
    assert!(
        next.try_recv().is_err(),
        "the waiter was granted inside the holder's window"
    );
    assert!(backend.released().is_empty(), "{:?}", backend.released());

    let started = Instant::now();
    let next = next.await.unwrap();
    assert!(
        started.elapsed() >= PACING + GRACE - Duration::from_millis(10),
        "bucket freed {:?} after IDENTIFY, before pacing + grace",
        started.elapsed()
    );
    settle().await;
    assert_eq!(
        backend.released(),
        [acquired[0]],
        "only the first holder's lock is released"
    );
    assert!(begin(&coordinator, next).await);
}

#[tokio::test(start_paused = true)]
async fn queued_lock_released_without_waiters() {
    let backend = RecordingBackend::new(false);
    let coordinator = coordinator_on(backend.clone(), 1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();

    // Shard 1's requester stops waiting after its lock was queued.
    let gone = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            let _ = coordinator
                .call(
                    |reply| CoordinatorMsg::Acquire {
                        shard: 1,
                        holder: ActorId::Local(2),
                        reply,
                    },
                    None,
                )
                .await;
        })
    };
    settle().await;
    assert_eq!(backend.acquired().len(), 2);
    gone.abort();
    settle().await;

    coordinator.cast(CoordinatorMsg::Release { lease }).unwrap();
    settle().await;
    let mut released = backend.released();
    released.sort_by_key(|lock| lock.handle);
    assert_eq!(
        released,
        backend.acquired(),
        "the queued lock outlived its last waiter"
    );
    let buckets = status(&coordinator).await;
    assert_eq!(buckets[0].holder, None);
}

#[tokio::test(start_paused = true)]
async fn slow_begin_delays_no_other_bucket() {
    let backend = RecordingBackend::new(true);
    let coordinator = coordinator_on(backend.clone(), 2).await;
    let slow = request(&coordinator, 0, 1).await.unwrap();
    let fast = request(&coordinator, 1, 2).await.unwrap();

    let slow_begin = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move { begin(&coordinator, slow).await })
    };
    settle().await;
    // Paused time runs ahead whenever every task waits, so a begin stuck behind the gated one
    // would run into this timeout.
    let begun = tokio::time::timeout(Duration::from_secs(1), begin(&coordinator, fast)).await;
    assert_eq!(
        begun.ok(),
        Some(true),
        "bucket 1 waited for bucket 0's backend"
    );

    // While the backend decides, neither a release nor a stopped holder frees bucket 0, because
    // its result may still allow the IDENTIFY.
    coordinator
        .cast(CoordinatorMsg::Release { lease: slow })
        .unwrap();
    coordinator
        .cast(CoordinatorMsg::HolderStopped {
            holder: ActorId::Local(1),
        })
        .unwrap();
    settle().await;
    let buckets = status(&coordinator).await;
    assert_eq!(
        buckets[0].holder,
        Some(0),
        "bucket 0 freed during its begin"
    );
    assert!(!buckets[0].sent);
    assert!(backend.released().is_empty(), "{:?}", backend.released());

    backend.begin_gate.add_permits(1);
    assert!(slow_begin.await.unwrap(), "the gated begin was refused");
    let buckets = status(&coordinator).await;
    assert!(buckets[0].sent, "{buckets:?}");
}

#[tokio::test(start_paused = true)]
async fn drain_releases_queued_lock() {
    let backend = RecordingBackend::new(false);
    let coordinator = coordinator_on(backend.clone(), 1).await;
    let lease = request(&coordinator, 0, 1).await.unwrap();
    assert!(begin(&coordinator, lease).await);
    let _waiting = request(&coordinator, 1, 2);
    settle().await;
    let acquired = backend.acquired();
    assert_eq!(acquired.len(), 2);

    let drain = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move { coordinator.call(CoordinatorMsg::Drain, None).await })
    };
    settle().await;
    assert_eq!(
        backend.released(),
        [acquired[1]],
        "the drain kept the queued lock or released the holder's inside its window"
    );
    assert!(matches!(
        drain.await.unwrap().unwrap(),
        CallResult::Success(())
    ));
    let mut released = backend.released();
    released.sort_by_key(|lock| lock.handle);
    assert_eq!(released, acquired);
}
