//! A sink wrapper that applies the global whitelist and counts what it passes on, for sinks that
//! have no whitelist of their own and for the summary line.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actors::store::{EventSink, PortError};
use async_trait::async_trait;
use serde_json::value::RawValue;

/// Passes events on to `inner`, skipping names outside the whitelist, and counts them.
pub struct CountedSink {
    inner: Arc<dyn EventSink>,
    /// `None` passes every event.
    whitelist: Option<HashSet<String>>,
    pushed: AtomicU64,
}

impl CountedSink {
    /// Wraps `inner`; an empty whitelist passes every event.
    pub fn new(inner: Arc<dyn EventSink>, whitelist: &[String]) -> Self {
        Self {
            inner,
            whitelist: (!whitelist.is_empty()).then(|| whitelist.iter().cloned().collect()),
            pushed: AtomicU64::new(0),
        }
    }

    /// Returns the events passed on so far.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EventSink for CountedSink {
    async fn push(&self, event: &str, data: &RawValue) -> Result<(), PortError> {
        if self
            .whitelist
            .as_ref()
            .is_some_and(|names| !names.contains(event))
        {
            return Ok(());
        }
        self.inner.push(event, data).await?;
        self.pushed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&self) -> Result<(), PortError> {
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::MemorySink;

    #[tokio::test]
    async fn whitelist_filters_and_counts() {
        let memory = Arc::new(MemorySink::new());
        let sink = CountedSink::new(memory.clone(), &["MESSAGE_CREATE".to_owned()]);
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        sink.push("MESSAGE_CREATE", &data).await.unwrap();
        sink.push("PRESENCE_UPDATE", &data).await.unwrap();
        assert_eq!(sink.pushed(), 1);
        assert_eq!(memory.len("MESSAGE_CREATE"), 1);
        assert_eq!(memory.len("PRESENCE_UPDATE"), 0);
    }

    #[tokio::test]
    async fn empty_whitelist_passes_everything() {
        let memory = Arc::new(MemorySink::new());
        let sink = CountedSink::new(memory.clone(), &[]);
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        sink.push("A", &data).await.unwrap();
        sink.push("B", &data).await.unwrap();
        assert_eq!(sink.pushed(), 2);
        assert_eq!(memory.total(), 2);
    }
}
