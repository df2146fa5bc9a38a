//! Adapters that implement the ports of the `actors` crate (`StateStore`, `EventSink`,
//! `CursorStore`) on concrete backends.
//!
//! - [`memory`]: in-process maps, for the simulator and the tests.

pub mod memory;
