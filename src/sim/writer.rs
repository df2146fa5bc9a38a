//! The write side of one gateway connection: a task that owns the WebSocket sink and the
//! `zlib-stream` context, and writes queued frames in order.
//!
//! The write side runs apart from the connection's read loop, so a client that stops reading
//! blocks only this task, and the read loop goes on taking heartbeats and commands.

use std::sync::Arc;

use actors::gateway::Deflater;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// An item of a connection's write queue.
#[derive(Debug)]
pub(crate) enum Write {
    /// A gateway payload, already encoded.
    Frame(Arc<str>),
    /// A close frame, written last.
    Close { code: u16, reason: String },
}

/// The handle on a connection's writer task. Dropping it stops the task, so the sink is dropped
/// at once even while a write is blocked.
pub(crate) struct Writer {
    queue: mpsc::UnboundedSender<Write>,
    task: JoinHandle<()>,
    /// Set once the task's end was read from `task`, which must not be polled again after that.
    ended: bool,
}

impl Writer {
    /// Starts the writer task in the current span. `deflater` is the connection's `zlib-stream`
    /// context, if the client asked for compression.
    pub(crate) fn spawn(sink: SplitSink<WebSocket, Message>, deflater: Option<Deflater>) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        Self {
            queue,
            task: tokio::spawn(write(sink, deflater, receiver).in_current_span()),
            ended: false,
        }
    }

    /// Queues a gateway payload after everything queued before it.
    pub(crate) fn frame(&self, frame: Arc<str>) {
        // A closed queue means the task ended, which `ended` reports to the read loop.
        let _ = self.queue.send(Write::Frame(frame));
    }

    /// Queues a close frame after everything queued before it.
    pub(crate) fn close(&self, code: u16, reason: String) {
        let _ = self.queue.send(Write::Close { code, reason });
    }

    /// Waits until the task ends: after a close frame, a failed write or a dropped queue. Once
    /// it has returned, it never returns again, so it is safe in a `select!` loop.
    pub(crate) async fn ended(&mut self) {
        if self.ended {
            return std::future::pending().await;
        }
        // A panic of the task ends the connection like a failed write.
        let _ = (&mut self.task).await;
        self.ended = true;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes queued frames until a close frame is written, a write fails or the queue is dropped.
/// Frames are compressed here, in the order they are written, because a `zlib-stream` client
/// inflates them with one context.
async fn write(
    mut sink: SplitSink<WebSocket, Message>,
    mut deflater: Option<Deflater>,
    mut queue: mpsc::UnboundedReceiver<Write>,
) {
    while let Some(write) = queue.recv().await {
        let message = match write {
            Write::Frame(frame) => match &mut deflater {
                Some(deflater) => Message::Binary(deflater.compress(frame.as_bytes()).into()),
                None => Message::Text(frame.as_ref().into()),
            },
            Write::Close { code, reason } => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                if let Err(error) = sink.send(Message::Close(Some(frame))).await {
                    tracing::debug!(%error, "failed to write the close frame");
                }
                return;
            }
        };
        if let Err(error) = sink.send(message).await {
            tracing::debug!(%error, "failed to write a frame");
            return;
        }
    }
}
