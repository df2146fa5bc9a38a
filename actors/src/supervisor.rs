//! The Supervisor: spawns one ShardActor per shard of the range and the singletons, restarts what
//! fails, and keeps the restart log.
//!
//! ractor's default supervision stops a supervisor when any child exits; this one decides per
//! child. A failed child is restarted after an exponential backoff with jitter, unless it failed
//! more than the per-shard limit within the window (the shard is then given up) or the whole tree
//! did (the Supervisor stops, and the process with it). A shard parked by a fatal close code is
//! never restarted: it does not exit. A restarted actor is a new actor with a new mailbox;
//! nothing of the old incarnation can reach it, and the coordinator and the gate are told at once
//! that the old one is gone.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant, SystemTime};

use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::coordinator::{CoordinatorArgs, CoordinatorMsg, IdentifyCoordinator};
use crate::gate::{GateArgs, GateMsg, StabilizeGate};
use crate::names;
use crate::shard::{ShardActor, ShardArgs, ShardMsg, ShardStage};
use crate::sweeper::{Sweeper, SweeperArgs, SweeperMsg};

/// When the Supervisor stops restarting.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    pub backoff: Backoff,
    /// Restarts of one shard allowed within `shard_window`; one more and the shard is given up.
    pub shard_max_restarts: u32,
    pub shard_window: Duration,
    /// Restarts of all children allowed within `tree_window`; one more and the tree stops.
    pub tree_max_restarts: u32,
    pub tree_window: Duration,
    /// Entries kept in the restart log.
    pub log_capacity: usize,
}

/// One restart, as logged and kept in the restart log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartEvent {
    pub at: SystemTime,
    /// `shard`, `identify-coordinator`, `stabilize-gate` or `sweeper`.
    pub actor: &'static str,
    pub shard: Option<u32>,
    pub reason: String,
    /// Restarts of this child within its window, this one included.
    pub attempt: u32,
    pub backoff: Duration,
}

/// Everything the Supervisor needs. `shard` is the template of every ShardActor's arguments; its
/// `shard` and `stage` fields are set per shard.
#[derive(Clone)]
pub struct SupervisorArgs {
    pub range: Range<u32>,
    pub shard: ShardArgs,
    pub coordinator: CoordinatorArgs,
    pub gate: GateArgs,
    /// `None` when the sweep is disabled.
    pub sweeper: Option<SweeperArgs>,
    pub restart: RestartPolicy,
}

/// A child of the Supervisor, as named in the restart log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Child {
    /// The ShardActor of a shard.
    Shard(u32),
    Coordinator,
    Gate,
    Sweeper,
}

impl Child {
    fn kind(self) -> &'static str {
        match self {
            Self::Shard(_) => "shard",
            Self::Coordinator => "identify-coordinator",
            Self::Gate => "stabilize-gate",
            Self::Sweeper => "sweeper",
        }
    }

    fn shard(self) -> Option<u32> {
        match self {
            Self::Shard(shard) => Some(shard),
            _ => None,
        }
    }
}

/// A shard's slot in the tree, kept across incarnations.
struct Slot {
    actor: Option<ActorRef<ShardMsg>>,
    stage: watch::Sender<ShardStage>,
    restarts: u32,
}

/// Messages of the Supervisor.
pub enum SupervisorMsg {
    /// Stop a shard's actor and start a new one at once.
    RestartShard {
        shard: u32,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Report the stage and restart count of every shard.
    Stages(RpcReplyPort<Vec<(u32, ShardStage, u32)>>),
    /// Report the restart log, oldest first.
    RestartLog(RpcReplyPort<Vec<RestartEvent>>),
    /// Subscribe to the stage changes of every shard.
    Watch(RpcReplyPort<Vec<(u32, watch::Receiver<ShardStage>)>>),
    /// Save every session, close every connection with a resumable code, stop the tree, reply.
    Shutdown(RpcReplyPort<()>),
    /// Internal: a restart's backoff ended.
    Respawn { child: Child },
}

/// State of the Supervisor.
pub struct SupervisorState {
    args: SupervisorArgs,
    slots: BTreeMap<u32, Slot>,
    children: HashMap<ActorId, Child>,
    /// Restart times per child, within their window.
    history: HashMap<Child, VecDeque<Instant>>,
    tree_history: VecDeque<Instant>,
    log: VecDeque<RestartEvent>,
    timers: Vec<JoinHandle<()>>,
    shutting_down: bool,
}

/// The Supervisor actor.
pub struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if args.range.is_empty() || args.range.end > args.shard.shard_count {
            return Err(format!(
                "invalid shard range {}..{} for {} shards: use 0 <= start < stop <= shards",
                args.range.start, args.range.end, args.shard.shard_count
            )
            .into());
        }

        let slots = args
            .range
            .clone()
            .map(|shard| {
                let slot = Slot {
                    actor: None,
                    stage: watch::channel(ShardStage::Connecting).0,
                    restarts: 0,
                };
                (shard, slot)
            })
            .collect();
        let mut state = SupervisorState {
            args,
            slots,
            children: HashMap::new(),
            history: HashMap::new(),
            tree_history: VecDeque::new(),
            log: VecDeque::new(),
            timers: Vec::new(),
            shutting_down: false,
        };

        state.spawn(&myself, Child::Coordinator).await?;
        state.spawn(&myself, Child::Gate).await?;
        let shards: Vec<u32> = state.slots.keys().copied().collect();
        for shard in shards {
            state.spawn(&myself, Child::Shard(shard)).await?;
        }
        state.spawn(&myself, Child::Sweeper).await?;
        tracing::info!(
            process = %state.args.shard.name,
            start = state.args.range.start,
            stop = state.args.range.end,
            shards = state.args.shard.shard_count,
            "supervisor started"
        );
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for timer in state.timers.drain(..) {
            timer.abort();
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
            SupervisorMsg::RestartShard { shard, reply } => {
                let _ = reply.send(state.restart_shard(shard));
            }
            SupervisorMsg::Stages(reply) => {
                let stages = state
                    .slots
                    .iter()
                    .map(|(shard, slot)| (*shard, slot.stage.borrow().clone(), slot.restarts))
                    .collect();
                let _ = reply.send(stages);
            }
            SupervisorMsg::RestartLog(reply) => {
                let _ = reply.send(state.log.iter().cloned().collect());
            }
            SupervisorMsg::Watch(reply) => {
                let receivers = state
                    .slots
                    .iter()
                    .map(|(shard, slot)| (*shard, slot.stage.subscribe()))
                    .collect();
                let _ = reply.send(receivers);
            }
            SupervisorMsg::Shutdown(reply) => {
                state.shutdown(&myself).await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".to_owned()));
            }
            SupervisorMsg::Respawn { child } => {
                if !state.shutting_down {
                    state.spawn(&myself, child).await?;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_owned()))
            }
            SupervisionEvent::ActorFailed(cell, error) => (cell, format!("failed: {error}")),
            _ => return Ok(()),
        };
        state.child_exited(&myself, &cell, reason)
    }
}

impl SupervisorState {
    /// Spawns a child linked to the Supervisor, under its registry name.
    async fn spawn(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let process = self.args.shard.name.clone();
        let supervisor = myself.get_cell();
        let id = match child {
            Child::Coordinator => {
                let name = names::coordinator(&process);
                let (actor, _) = Actor::spawn_linked(
                    Some(name),
                    IdentifyCoordinator,
                    self.args.coordinator.clone(),
                    supervisor,
                )
                .await?;
                actor.get_id()
            }
            Child::Gate => {
                let name = names::gate(&process);
                let (actor, _) = Actor::spawn_linked(
                    Some(name),
                    StabilizeGate,
                    self.args.gate.clone(),
                    supervisor,
                )
                .await?;
                actor.get_id()
            }
            Child::Sweeper => {
                let Some(args) = self.args.sweeper.clone() else {
                    return Ok(());
                };
                let name = names::sweeper(&process);
                let (actor, _) = Actor::spawn_linked(Some(name), Sweeper, args, supervisor).await?;
                actor.get_id()
            }
            Child::Shard(shard) => {
                let Some(slot) = self.slots.get_mut(&shard) else {
                    return Ok(());
                };
                let mut args = self.args.shard.clone();
                args.shard = shard;
                args.stage = slot.stage.clone();
                let name = names::shard(&process, shard);
                let (actor, _) =
                    Actor::spawn_linked(Some(name), ShardActor, args, supervisor).await?;
                let id = actor.get_id();
                slot.actor = Some(actor);
                id
            }
        };
        self.children.insert(id, child);
        Ok(())
    }

    fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        cell: &ActorCell,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let Some(child) = self.children.remove(&cell.get_id()) else {
            return Ok(());
        };
        if let Child::Shard(shard) = child {
            if let Some(slot) = self.slots.get_mut(&shard) {
                slot.actor = None;
            }
        }

        // The old incarnation may have held a lease or a permit, or waited for one.
        let holder = cell.get_id();
        let process = &self.args.shard.name;
        if let Some(coordinator) = names::lookup::<CoordinatorMsg>(&names::coordinator(process)) {
            let _ = coordinator.cast(CoordinatorMsg::HolderStopped { holder });
        }
        if let Some(gate) = names::lookup::<GateMsg>(&names::gate(process)) {
            let _ = gate.cast(GateMsg::HolderStopped { holder });
        }
        if self.shutting_down {
            return Ok(());
        }

        self.schedule_restart(myself, child, reason)
    }

    /// Counts the restart against both limits and schedules it, or gives up.
    fn schedule_restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        child: Child,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        let policy = self.args.restart.clone();

        prune(&mut self.tree_history, now, policy.tree_window);
        self.tree_history.push_back(now);
        if self.tree_history.len() > policy.tree_max_restarts as usize {
            tracing::error!(
                restarts = self.tree_history.len(),
                window_ms = policy.tree_window.as_millis() as u64,
                "restart intensity of the whole tree exceeded; stopping"
            );
            return Err(format!(
                "more than {} restarts within {:?}: the tree stops",
                policy.tree_max_restarts, policy.tree_window
            )
            .into());
        }

        let history = self.history.entry(child).or_default();
        prune(history, now, policy.shard_window);
        history.push_back(now);
        let attempt = history.len() as u32;
        if attempt > policy.shard_max_restarts {
            if let Child::Shard(shard) = child {
                tracing::error!(shard, restarts = attempt - 1, %reason, "shard failed too often; giving up on it");
                if let Some(slot) = self.slots.get_mut(&shard) {
                    slot.stage.send_replace(ShardStage::GaveUp {
                        restarts: attempt - 1,
                    });
                }
                return Ok(());
            }
            return Err(format!(
                "{} failed {attempt} times within {:?}: the tree stops",
                child.kind(),
                policy.shard_window
            )
            .into());
        }

        let backoff = policy.backoff.delay(attempt);
        let event = RestartEvent {
            at: SystemTime::now(),
            actor: child.kind(),
            shard: child.shard(),
            reason,
            attempt,
            backoff,
        };
        tracing::warn!(
            actor = event.actor,
            shard = event.shard,
            reason = %event.reason,
            attempt,
            backoff_ms = backoff.as_millis() as u64,
            "restarting actor"
        );
        if let Child::Shard(shard) = child {
            if let Some(slot) = self.slots.get_mut(&shard) {
                slot.restarts += 1;
            }
        }
        if self.log.len() == policy.log_capacity {
            self.log.pop_front();
        }
        self.log.push_back(event);

        let supervisor = myself.clone();
        self.timers.retain(|timer| !timer.is_finished());
        self.timers.push(tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let _ = supervisor.cast(SupervisorMsg::Respawn { child });
        }));
        Ok(())
    }

    /// Stops a shard's actor; the exit is restarted like a failure, with the operator's reason.
    fn restart_shard(&mut self, shard: u32) -> Result<(), String> {
        let slot = self.slots.get(&shard).ok_or_else(|| {
            format!(
                "shard {shard} is not in this process's range {}..{}",
                self.args.range.start, self.args.range.end
            )
        })?;
        let actor = slot
            .actor
            .as_ref()
            .ok_or_else(|| format!("shard {shard} is already restarting"))?;
        actor.stop(Some("restart requested by an operator".to_owned()));
        Ok(())
    }

    async fn shutdown(&mut self, _myself: &ActorRef<SupervisorMsg>) {
        self.shutting_down = true;
        for timer in self.timers.drain(..) {
            timer.abort();
        }
        // The Sweeper goes first and saves its cursor, so the next process does not request
        // again the guilds this one swept last.
        if let Some(sweeper) = names::lookup::<SweeperMsg>(&names::sweeper(&self.args.shard.name)) {
            let stopped = sweeper
                .stop_and_wait(Some("shutdown".to_owned()), Some(Duration::from_secs(5)))
                .await;
            if let Err(error) = stopped {
                tracing::warn!(%error, "sweeper did not stop in time; its cursor may lag");
            }
        }
        let actors: Vec<(u32, ActorRef<ShardMsg>)> = self
            .slots
            .iter()
            .filter_map(|(shard, slot)| slot.actor.clone().map(|actor| (*shard, actor)))
            .collect();
        let calls = actors.iter().map(|(shard, actor)| async move {
            let result = actor
                .call(ShardMsg::Shutdown, Some(Duration::from_secs(10)))
                .await;
            match result {
                Ok(CallResult::Success(saved)) => saved,
                _ => {
                    tracing::warn!(shard, "shard did not confirm its shutdown in time");
                    false
                }
            }
        });
        let saved = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .filter(|saved| *saved)
            .count();
        if saved == actors.len() {
            tracing::info!(
                shards = actors.len(),
                "every session saved and closed with a resumable code"
            );
        } else {
            tracing::warn!(
                shards = actors.len(),
                saved,
                "sessions closed with a resumable code, some not saved: the next process resumes them from their last saved sequence, and the gateway replays the rest"
            );
        }

        // The last IDENTIFYs may still hold their buckets for the pacing window; the
        // coordinator releases them when it ends, so no bucket stays locked after this process.
        let coordinator = names::coordinator(&self.args.shard.name);
        if let Some(coordinator) = names::lookup::<CoordinatorMsg>(&coordinator) {
            let args = &self.args.coordinator;
            let limit = args.pacing * 2 + args.grace + Duration::from_secs(1);
            let drained = coordinator.call(CoordinatorMsg::Drain, Some(limit)).await;
            if !matches!(drained, Ok(CallResult::Success(()))) {
                tracing::warn!("identify coordinator did not release every bucket in time; the locks lapse with their leases");
            }
        }
    }
}

fn prune(history: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while history
        .front()
        .is_some_and(|at| now.duration_since(*at) > window)
    {
        history.pop_front();
    }
}
