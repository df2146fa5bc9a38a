//! The StabilizeGate: at most `K` freshly identified shards of this process flood the database at
//! once.
//!
//! A shard that will request guild members takes a permit before it asks for the identify lease
//! and returns it when its post-READY flood is absorbed: after a fixed hold, or once its backlog
//! is drained. Permits are spread over the identify buckets: no bucket gets more than
//! `ceil(K / buckets)` of them, since two holders in one bucket identify one window apart and
//! the second would only wait with a permit a shard of an idle bucket could use. The gate takes a permit back by itself `max_hold` after READY, and at once when
//! its holder stops, so a stuck or crashed shard cannot keep the gate shut.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

/// The right to stabilize; returned with [`GateMsg::Release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permit {
    pub id: u64,
}

/// Settings of the gate.
#[derive(Clone, Debug)]
pub struct GateArgs {
    /// Permits `K`; changeable at run time.
    pub permits: u32,
    /// Identify buckets (`max_concurrency`): a shard's bucket is `shard % buckets`.
    pub buckets: u32,
    /// Longest a permit is held after READY before the gate takes it back.
    pub max_hold: Duration,
}

/// The gate in the status output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateStatus {
    pub permits: u32,
    /// Shards holding a permit, ascending.
    pub holders: Vec<u32>,
    /// Shards waiting, in the order they will be served.
    pub waiting: Vec<u32>,
    pub granted: u64,
    /// Permits the gate took back because their hold exceeded `max_hold`.
    pub expired: u64,
}

/// Messages of the gate.
pub enum GateMsg {
    /// Ask for a permit; the reply comes when one is free. A requester whose reply port is
    /// closed by then is skipped.
    Acquire {
        shard: u32,
        holder: ActorId,
        reply: RpcReplyPort<Permit>,
    },
    /// The holder received READY: the `max_hold` clock starts.
    Holding {
        permit: Permit,
    },
    /// The holder returns its permit.
    Release {
        permit: Permit,
    },
    /// An actor stopped: its wait is dropped and its permit returned.
    HolderStopped {
        holder: ActorId,
    },
    /// Change `K` and report the gate. Lowering it takes no permit back; it only delays grants.
    SetPermits {
        permits: u32,
        reply: RpcReplyPort<GateStatus>,
    },
    Status(RpcReplyPort<GateStatus>),
    /// Internal: a permit reached `max_hold`.
    MaxHoldElapsed {
        permit: Permit,
    },
}

struct Waiter {
    holder: ActorId,
    reply: RpcReplyPort<Permit>,
}

struct Held {
    shard: u32,
    bucket: u32,
    holder: ActorId,
    timer: Option<JoinHandle<()>>,
    since: Instant,
}

/// State of the gate.
pub struct GateState {
    args: GateArgs,
    waiters: BTreeMap<(u32, u64), Waiter>,
    held: HashMap<Permit, Held>,
    next_permit: u64,
    next_arrival: u64,
    granted: u64,
    expired: u64,
}

/// The StabilizeGate actor.
pub struct StabilizeGate;

impl Actor for StabilizeGate {
    type Msg = GateMsg;
    type State = GateState;
    type Arguments = GateArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: GateArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        tracing::info!(
            permits = args.permits,
            max_hold_ms = args.max_hold.as_millis() as u64,
            "stabilize gate started"
        );
        Ok(GateState {
            args,
            waiters: BTreeMap::new(),
            held: HashMap::new(),
            next_permit: 1,
            next_arrival: 0,
            granted: 0,
            expired: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for (_, held) in state.held.drain() {
            if let Some(timer) = held.timer {
                timer.abort();
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GateMsg::Acquire {
                shard,
                holder,
                reply,
            } => {
                let arrival = state.next_arrival;
                state.next_arrival += 1;
                state
                    .waiters
                    .insert((shard, arrival), Waiter { holder, reply });
                state.grant();
            }
            GateMsg::Holding { permit } => state.start_hold(&myself, permit),
            GateMsg::Release { permit } => state.release(permit),
            GateMsg::HolderStopped { holder } => state.holder_stopped(holder),
            GateMsg::SetPermits { permits, reply } => {
                tracing::info!(
                    from = state.args.permits,
                    to = permits,
                    "stabilize permits changed"
                );
                state.args.permits = permits;
                state.grant();
                let _ = reply.send(state.status());
            }
            GateMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            GateMsg::MaxHoldElapsed { permit } => {
                if let Some(held) = state.held.get(&permit) {
                    // The maximum hold runs from READY; `held_ms` from the grant, which also
                    // covers the wait for the identify lease.
                    tracing::info!(
                        shard = held.shard,
                        held_ms = held.since.elapsed().as_millis() as u64,
                        max_hold_ms = state.args.max_hold.as_millis() as u64,
                        "stabilize permit taken back: the maximum hold after READY passed"
                    );
                    state.expired += 1;
                    state.release(permit);
                }
            }
        }
        Ok(())
    }
}

impl GateState {
    /// Grants free permits to waiters in shard order, skipping requesters that left and waiters
    /// whose bucket already has its share of permits.
    fn grant(&mut self) {
        let buckets = self.args.buckets.max(1);
        let per_bucket = self.args.permits.div_ceil(buckets).max(1) as usize;
        while self.held.len() < self.args.permits as usize {
            let Some(key) = self.next_waiter(buckets, per_bucket) else {
                return;
            };
            let Some(waiter) = self.waiters.remove(&key) else {
                return;
            };
            let shard = key.0;
            let permit = Permit {
                id: self.next_permit,
            };
            self.next_permit += 1;
            if waiter.reply.send(permit).is_err() {
                continue;
            }
            tracing::debug!(shard, permit = permit.id, "stabilize permit granted");
            self.granted += 1;
            self.held.insert(
                permit,
                Held {
                    shard,
                    bucket: shard % buckets,
                    holder: waiter.holder,
                    timer: None,
                    since: Instant::now(),
                },
            );
        }
    }

    /// Returns the first waiter, in shard order, whose bucket holds fewer than `per_bucket`
    /// permits. Waiters whose requester left are dropped on the way.
    fn next_waiter(&mut self, buckets: u32, per_bucket: usize) -> Option<(u32, u64)> {
        self.waiters.retain(|_, waiter| !waiter.reply.is_closed());
        let mut holders = vec![0usize; buckets as usize];
        for held in self.held.values() {
            holders[held.bucket as usize] += 1;
        }
        self.waiters
            .keys()
            .find(|(shard, _)| holders[(shard % buckets) as usize] < per_bucket)
            .copied()
    }

    fn start_hold(&mut self, myself: &ActorRef<GateMsg>, permit: Permit) {
        let max_hold = self.args.max_hold;
        if let Some(held) = self.held.get_mut(&permit) {
            if held.timer.is_none() {
                let gate = myself.clone();
                held.timer = Some(tokio::spawn(async move {
                    tokio::time::sleep(max_hold).await;
                    let _ = gate.cast(GateMsg::MaxHoldElapsed { permit });
                }));
            }
        }
    }

    fn release(&mut self, permit: Permit) {
        if let Some(held) = self.held.remove(&permit) {
            if let Some(timer) = held.timer {
                timer.abort();
            }
            tracing::debug!(
                shard = held.shard,
                permit = permit.id,
                "stabilize permit returned"
            );
        }
        self.grant();
    }

    fn holder_stopped(&mut self, holder: ActorId) {
        self.waiters.retain(|_, waiter| waiter.holder != holder);
        let permits: Vec<Permit> = self
            .held
            .iter()
            .filter(|(_, held)| held.holder == holder)
            .map(|(permit, _)| *permit)
            .collect();
        for permit in permits {
            self.release(permit);
        }
        self.grant();
    }

    fn status(&self) -> GateStatus {
        let mut holders: Vec<u32> = self.held.values().map(|held| held.shard).collect();
        holders.sort_unstable();
        GateStatus {
            permits: self.args.permits,
            holders,
            waiting: self.waiters.keys().map(|(shard, _)| *shard).collect(),
            granted: self.granted,
            expired: self.expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use ractor::rpc::CallResult;
    use tokio::sync::oneshot;

    use super::*;

    async fn gate(permits: u32) -> ActorRef<GateMsg> {
        let args = GateArgs {
            permits,
            buckets: 4,
            max_hold: Duration::from_secs(10),
        };
        Actor::spawn(None, StabilizeGate, args).await.unwrap().0
    }

    fn request(gate: &ActorRef<GateMsg>, shard: u32) -> oneshot::Receiver<Permit> {
        let (sender, receiver) = oneshot::channel();
        let gate = gate.clone();
        tokio::spawn(async move {
            let holder = ActorId::Local(u64::from(shard));
            let result = gate
                .call(
                    |reply| GateMsg::Acquire {
                        shard,
                        holder,
                        reply,
                    },
                    None,
                )
                .await;
            if let Ok(CallResult::Success(permit)) = result {
                let _ = sender.send(permit);
            }
        });
        receiver
    }

    async fn status(gate: &ActorRef<GateMsg>) -> GateStatus {
        match gate.call(GateMsg::Status, None).await.unwrap() {
            CallResult::Success(status) => status,
            _ => panic!("status call failed"),
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gate_bounds_concurrent_holders() {
        let gate = gate(2).await;
        let first = request(&gate, 0).await.unwrap();
        let _second = request(&gate, 1).await.unwrap();
        let mut third = request(&gate, 2);
        settle().await;
        assert!(
            third.try_recv().is_err(),
            "a third permit was granted with K = 2"
        );
        assert_eq!(status(&gate).await.waiting, vec![2]);

        gate.cast(GateMsg::Release { permit: first }).unwrap();
        settle().await;
        assert!(
            third.try_recv().is_ok(),
            "the waiter was not served after a release"
        );
        assert_eq!(status(&gate).await.holders, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn max_hold_takes_permit_back() {
        let gate = gate(1).await;
        let permit = request(&gate, 0).await.unwrap();
        gate.cast(GateMsg::Holding { permit }).unwrap();
        let next = request(&gate, 1);
        let started = tokio::time::Instant::now();
        next.await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(10) - Duration::from_millis(5));
        assert_eq!(status(&gate).await.expired, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stopped_holder_returns_permit() {
        let gate = gate(1).await;
        request(&gate, 5).await.unwrap();
        let mut next = request(&gate, 6);
        settle().await;
        assert!(next.try_recv().is_err());
        gate.cast(GateMsg::HolderStopped {
            holder: ActorId::Local(5),
        })
        .unwrap();
        settle().await;
        assert!(
            next.try_recv().is_ok(),
            "permit of a stopped holder was not returned"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn raising_permits_serves_waiters() {
        let gate = gate(1).await;
        request(&gate, 0).await.unwrap();
        let mut waiting = request(&gate, 1);
        settle().await;
        let status = match gate
            .call(|reply| GateMsg::SetPermits { permits: 2, reply }, None)
            .await
            .unwrap()
        {
            CallResult::Success(status) => status,
            _ => panic!("set permits failed"),
        };
        assert_eq!(status.permits, 2);
        settle().await;
        assert!(
            waiting.try_recv().is_ok(),
            "raising K did not serve the waiter"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permits_spread_over_buckets() {
        // Four permits, four buckets: shards 0 and 4 share bucket 0, so shard 4 waits while
        // shards of the idle buckets 1 and 2 get the remaining permits.
        let gate = gate(4).await;
        request(&gate, 0).await.unwrap();
        let mut same_bucket = request(&gate, 4);
        settle().await;
        let first = request(&gate, 1).await.unwrap();
        request(&gate, 2).await.unwrap();
        settle().await;
        assert!(
            same_bucket.try_recv().is_err(),
            "two permits went to bucket 0"
        );
        assert_eq!(status(&gate).await.holders, vec![0, 1, 2]);

        // A permit returned by another bucket does not go to bucket 0 while bucket 0 holds one.
        gate.cast(GateMsg::Release { permit: first }).unwrap();
        settle().await;
        assert!(
            same_bucket.try_recv().is_err(),
            "bucket 0 got a second permit"
        );
        assert_eq!(status(&gate).await.waiting, vec![4]);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_release_is_ignored() {
        let gate = gate(1).await;
        let old = request(&gate, 0).await.unwrap();
        gate.cast(GateMsg::Release { permit: old }).unwrap();
        let new = request(&gate, 1).await.unwrap();
        gate.cast(GateMsg::Release { permit: old }).unwrap();
        gate.cast(GateMsg::MaxHoldElapsed { permit: old }).unwrap();
        settle().await;
        assert_eq!(
            status(&gate).await.holders,
            vec![1],
            "a stale release freed permit {new:?}"
        );
    }
}
