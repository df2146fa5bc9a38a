//! shardvisor holds the Discord gateway shards of one large bot: it brings them back fast after a
//! mass disconnect, within Discord's identify limits.
//!
//! - [`adapters`]: the state store, event sink and cursor store behind the actors' ports.
//! - [`cli`]: the command line.
//! - [`config`]: `config.toml` and its environment overrides.
//! - [`logging`]: `tracing` output.
//! - [`run`]: `shardvisor run`, the main job.
//! - [`sim`]: the Discord gateway simulator used by `make run`, the tests and the benchmarks.
//!
//! The actor system and the gateway protocol live in the `actors` crate.

pub mod adapters;
pub mod cli;
pub mod config;
pub mod logging;
pub mod run;
pub mod sim;
