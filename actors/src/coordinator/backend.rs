//! Where bucket locks live: in this process, or fleet-wide in etcd.

use std::time::Duration;

use async_trait::async_trait;

use crate::store::PortError;

/// A bucket lock taken from a backend. `handle` identifies it to the backend that issued it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLock {
    pub bucket: u32,
    pub handle: u64,
}

/// The lock service behind the IdentifyCoordinator. Inside one process the coordinator already
/// serves one holder per bucket; the backend extends that to every process of the bot.
#[async_trait]
pub trait IdentifyBackend: Send + Sync + 'static {
    /// Returns the backend's name for logs and status.
    fn name(&self) -> &'static str;

    /// Takes the lock of a bucket, waiting while another process holds it. `hold` is the longest
    /// the caller will keep it; a backend with expiring locks lets it lapse after that.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the backend cannot be reached; the caller retries.
    async fn acquire(&self, bucket: u32, hold: Duration) -> Result<BackendLock, PortError>;

    /// Returns `true` while the lock is still held: checked right before IDENTIFY is sent, so a
    /// lock lost to a partition or an expired lease never covers an IDENTIFY.
    async fn still_held(&self, lock: BackendLock) -> bool;

    /// Releases a lock.
    ///
    /// # Errors
    ///
    /// [`PortError::Unavailable`] when the backend cannot be reached; an expiring lock then
    /// lapses on its own.
    async fn release(&self, lock: BackendLock) -> Result<(), PortError>;
}

/// The backend of a single process: every bucket is free as soon as the coordinator asks, since
/// the coordinator itself serializes the holders of a bucket.
#[derive(Debug, Default)]
pub struct InProcessBackend;

#[async_trait]
impl IdentifyBackend for InProcessBackend {
    fn name(&self) -> &'static str {
        "in-process"
    }

    async fn acquire(&self, bucket: u32, _hold: Duration) -> Result<BackendLock, PortError> {
        Ok(BackendLock { bucket, handle: 0 })
    }

    async fn still_held(&self, _lock: BackendLock) -> bool {
        true
    }

    async fn release(&self, _lock: BackendLock) -> Result<(), PortError> {
        Ok(())
    }
}
