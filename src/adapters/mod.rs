//! Adapters that implement the ports of the `actors` crate (`StateStore`, `EventSink`,
//! `CursorStore`, `IdentifyBackend`) on concrete backends.
//!
//! - [`memory`]: in-process maps, for the simulator and the tests.
//! - [`etcd`]: the fleet-wide identify backend and the sweep cursors.
//! - [`postgres`]: the guild-state cache and the shard sessions.
//! - [`redis`]: the event output.
//! - [`counted`]: the global whitelist and the event count, around any sink.

pub mod counted;
pub mod etcd;
pub mod memory;
pub mod postgres;
pub mod redis;

/// Formats an error with its sources, as in `db error: ERROR: relation "x" does not exist`.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        text.push_str(": ");
        text.push_str(&error.to_string());
        source = error.source();
    }
    text
}
