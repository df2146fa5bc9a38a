//! Registry names of the actors of one process.
//!
//! ractor's registry is global to the operating-system process, so every name starts with the
//! shardvisor process name (`--name`): two trees in one process (in tests, for example) never
//! collide. A restarted actor registers the same name again, so a lookup by name always finds the
//! current incarnation; actors look each other up by name instead of keeping references that a
//! restart would leave dangling.

use ractor::{ActorRef, Message};

/// Name of the ShardActor of a shard.
pub fn shard(process: &str, shard: u32) -> String {
    format!("{process}/shard-{shard}")
}

/// Name of the IdentifyCoordinator.
pub fn coordinator(process: &str) -> String {
    format!("{process}/identify-coordinator")
}

/// Name of the StabilizeGate.
pub fn gate(process: &str) -> String {
    format!("{process}/stabilize-gate")
}

/// Name of the Sweeper.
pub fn sweeper(process: &str) -> String {
    format!("{process}/sweeper")
}

/// Name of the Supervisor.
pub fn supervisor(process: &str) -> String {
    format!("{process}/supervisor")
}

/// Returns the actor registered under `name`, if it is running.
pub fn lookup<M: Message>(name: &str) -> Option<ActorRef<M>> {
    ActorRef::where_is(name)
}
