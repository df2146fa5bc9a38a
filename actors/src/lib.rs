//! The actor system of shardvisor and the Discord gateway protocol it speaks.
//!
//! - [`coordinator`]: the IdentifyCoordinator, which paces IDENTIFY per bucket.
//! - [`gate`]: the StabilizeGate, which bounds how many shards stabilize at once.
//! - [`gateway`]: payloads, close codes, compression and the token.
//! - [`names`]: registry names, prefixed by the process name.
//! - [`shard`]: the ShardActor, one per gateway connection.
//! - [`store`]: the ports to the state cache, the event output and the sweep cursor.
//! - [`supervisor`]: the Supervisor, which spawns and restarts every other actor.
//! - [`sweeper`]: the Sweeper, which refreshes the member caches of every guild in turn.

pub mod backoff;
pub mod coordinator;
pub mod gate;
pub mod gateway;
pub mod names;
pub mod shard;
pub mod store;
pub mod supervisor;
pub mod sweeper;
