//! The transport of one gateway connection: dial and HELLO, then a reader task that decodes
//! frames for the actor, a writer task that sends the actor's payloads within Discord's send
//! limit, and the heartbeat task.
//!
//! The tasks belong to the ShardActor's current connection and are aborted when it ends. Every
//! message they send the actor carries the connection number, so a late message of an old
//! connection is recognised and dropped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use leaky_bucket::RateLimiter;
use ractor::ActorRef;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::heartbeat::{self, Pulse};
use super::{Event, ShardMsg};
use crate::gateway::close::CloseInitiator;
use crate::gateway::{CloseCode, Hello, Inflater, ServerPayload, SEND_LIMIT, SEND_LIMIT_WINDOW};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest inflated payload accepted; a GUILD_CREATE of a very large guild stays well below it.
const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// Frames the reader may have handed to the actor and not yet processed. When the actor falls
/// behind (a slow store or sink), the reader stops reading and TCP pushes back on the gateway.
const READ_AHEAD_FRAMES: usize = 256;

/// Sends reserved for heartbeats, IDENTIFY, RESUME and answers to a server heartbeat in every
/// 60 s window; everything else shares the rest of Discord's 120.
const RESERVED_SENDS: u32 = 10;

/// A frame from the reader; the permit is returned when the actor drops it, after processing.
pub(crate) struct Incoming {
    pub(crate) payload: ServerPayload,
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// An established connection: HELLO arrived.
pub(crate) struct Dialed {
    pub(crate) hello: Hello,
    sink: SplitSink<Socket, Message>,
    stream: SplitStream<Socket>,
    inflater: Option<Inflater>,
}

/// Failure to dial or to receive HELLO.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("failed to connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("no HELLO within {0:?}")]
    HelloTimeout(Duration),
    #[error("connection ended before HELLO")]
    ClosedBeforeHello(Option<u16>),
    #[error("first payload was not HELLO: {0}")]
    UnexpectedFirstPayload(String),
}

/// Builds the connect URL from a gateway or resume URL (which carry no query string).
pub(crate) fn connect_url(base: &str, compress: bool) -> String {
    let base = base.trim_end_matches('/');
    let mut url = format!("{base}/?v={}&encoding=json", crate::gateway::API_VERSION);
    if compress {
        url.push_str("&compress=zlib-stream");
    }
    url
}

/// Dials the gateway and waits for HELLO.
pub(crate) async fn dial(
    url: &str,
    compress: bool,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let connect = tokio_tungstenite::connect_async(url);
    let (socket, _) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| DialError::HelloTimeout(timeout))?
        .map_err(|source| DialError::Connect {
            url: url.to_owned(),
            source,
        })?;
    let (sink, mut stream) = socket.split();
    let mut inflater = compress.then(|| Inflater::new(MAX_PAYLOAD_BYTES));

    let hello = tokio::time::timeout(timeout, async {
        loop {
            let message = match stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(_)) | None => return Err(DialError::ClosedBeforeHello(None)),
            };
            let bytes = match message {
                Message::Text(text) => text.as_bytes().to_vec(),
                Message::Binary(bytes) => match &mut inflater {
                    Some(inflater) => match inflater.push(&bytes) {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => continue,
                        Err(error) => {
                            return Err(DialError::UnexpectedFirstPayload(error.to_string()))
                        }
                    },
                    None => bytes.to_vec(),
                },
                Message::Close(frame) => {
                    return Err(DialError::ClosedBeforeHello(
                        frame.map(|f| u16::from(f.code)),
                    ))
                }
                _ => continue,
            };
            return match ServerPayload::decode(&bytes) {
                Ok(ServerPayload::Hello(hello)) => Ok(hello),
                Ok(other) => Err(DialError::UnexpectedFirstPayload(format!("{other:?}"))),
                Err(error) => Err(DialError::UnexpectedFirstPayload(error.to_string())),
            };
        }
    })
    .await
    .map_err(|_| DialError::HelloTimeout(timeout))??;

    Ok(Dialed {
        hello,
        sink,
        stream,
        inflater,
    })
}

/// A request from the actor to its writer task.
pub(crate) enum Outgoing {
    /// Send now, ahead of queued commands (heartbeats, RESUME).
    Urgent(String),
    /// Send now and report when the frame left the socket (IDENTIFY, whose pacing window is
    /// timed from the write).
    UrgentReported(String, tokio::sync::oneshot::Sender<()>),
    /// Send a close frame and stop.
    Close(CloseCode),
}

/// A payload paced by the send limiter.
pub(crate) struct Command {
    pub(crate) text: String,
    /// The guild of a member request; the actor hears when the request left the socket,
    /// because Discord times its member request window from then.
    pub(crate) members_of: Option<u64>,
}

/// The running tasks of a connection and the queues that feed its writer.
pub(crate) struct Link {
    pub(crate) urgent: mpsc::UnboundedSender<Outgoing>,
    /// Commands paced by the send limiter (member requests, presence updates).
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) pulse: Arc<Pulse>,
    reader: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts the reader, the writer and the heartbeats of a dialed connection. `seq` is the
    /// sequence of the session about to be resumed, 0 for a new one.
    pub(crate) fn start(
        dialed: Dialed,
        seq: u64,
        connection: u64,
        actor: ActorRef<ShardMsg>,
    ) -> Self {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let pulse = Pulse::new(seq);
        let interval = Duration::from_millis(dialed.hello.heartbeat_interval.max(1));
        let reader = tokio::spawn(read_loop(
            dialed.stream,
            dialed.inflater,
            pulse.clone(),
            connection,
            actor.clone(),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(
            pulse.clone(),
            interval,
            urgent.clone(),
            connection,
            actor.clone(),
        ));
        let writer = tokio::spawn(write_loop(
            dialed.sink,
            urgent_rx,
            commands_rx,
            connection,
            actor,
        ));
        Self {
            urgent,
            commands,
            pulse,
            reader,
            heartbeat,
            writer: Some(writer),
        }
    }

    /// Closes with `code` after the queued urgent payloads, then stops the tasks. The reader
    /// is stopped at once, so the actor sees no frame of this connection afterwards.
    pub(crate) fn close(mut self, code: CloseCode) {
        self.reader.abort();
        self.heartbeat.abort();
        let _ = self.urgent.send(Outgoing::Close(code));
        // The writer ends by itself after the close frame; abort it if it is stuck on a dead
        // socket.
        let Some(writer) = self.writer.take() else {
            return;
        };
        tokio::spawn(async move {
            let abort = writer.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        });
    }
}

impl Drop for Link {
    /// A link dropped without [`Link::close`] ends without a close frame.
    fn drop(&mut self) {
        self.reader.abort();
        self.heartbeat.abort();
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

async fn read_loop(
    mut stream: SplitStream<Socket>,
    mut inflater: Option<Inflater>,
    pulse: Arc<Pulse>,
    connection: u64,
    actor: ActorRef<ShardMsg>,
) {
    let credits = Arc::new(Semaphore::new(READ_AHEAD_FRAMES));
    let end = loop {
        let message = match stream.next().await {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::debug!(%error, "gateway read failed");
                break CloseInitiator::Transport;
            }
            None => break CloseInitiator::Transport,
        };
        let bytes = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => match &mut inflater {
                Some(inflater) => match inflater.push(&bytes) {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "zlib-stream inflate failed; reconnecting");
                        break CloseInitiator::Transport;
                    }
                },
                None => bytes.to_vec(),
            },
            Message::Close(frame) => {
                let code = frame.map(|frame| CloseCode(u16::from(frame.code)));
                break CloseInitiator::Server(code);
            }
            _ => continue,
        };

        let payload = match ServerPayload::decode(&bytes) {
            Ok(payload) => payload,
            Err(error) => {
                // One bad payload is logged and skipped; the connection and its sequence go on.
                let head = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                tracing::warn!(%error, payload = %head, "undecodable gateway payload skipped");
                continue;
            }
        };
        // Heartbeat traffic is handled here, ahead of the frames the actor has not taken yet.
        match &payload {
            ServerPayload::HeartbeatAck => {
                pulse.acknowledged();
                continue;
            }
            ServerPayload::Heartbeat => {
                pulse.beat_requested();
                continue;
            }
            ServerPayload::Dispatch(dispatch) => pulse.received(dispatch.seq),
            _ => {}
        }
        let permit = match credits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits) => {
                pulse.stall_began();
                let permit = credits.clone().acquire_owned().await;
                pulse.stall_ended();
                match permit {
                    Ok(permit) => permit,
                    Err(_) => break CloseInitiator::Transport,
                }
            }
            Err(TryAcquireError::Closed) => break CloseInitiator::Transport,
        };
        let incoming = Incoming {
            payload,
            _permit: permit,
        };
        if actor
            .cast(ShardMsg::from(Event::Frame {
                connection,
                incoming,
            }))
            .is_err()
        {
            return;
        }
    };
    let _ = actor.cast(ShardMsg::from(Event::ReaderEnded { connection, end }));
}

async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut urgent: mpsc::UnboundedReceiver<Outgoing>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    connection: u64,
    actor: ActorRef<ShardMsg>,
) {
    // A burst of half the budget, then one per second: at most `budget / 2 + 60` commands in any
    // 60 s window, which stays within `SEND_LIMIT - RESERVED_SENDS`.
    let budget = SEND_LIMIT - RESERVED_SENDS;
    let burst = (budget as usize).saturating_sub(SEND_LIMIT_WINDOW.as_secs() as usize);
    let limiter = RateLimiter::builder()
        .max(burst.max(1))
        .initial(burst.max(1))
        .refill(1)
        .interval(Duration::from_secs(1))
        .build();
    let mut pending: Option<Command> = None;

    loop {
        tokio::select! {
            biased;
            outgoing = urgent.recv() => match outgoing {
                Some(Outgoing::Urgent(text)) => {
                    if sink.send(Message::text(text)).await.is_err() {
                        return;
                    }
                }
                Some(Outgoing::UrgentReported(text, written)) => {
                    if sink.send(Message::text(text)).await.is_err() {
                        return;
                    }
                    let _ = written.send(());
                }
                Some(Outgoing::Close(code)) => {
                    let frame = CloseFrame {
                        code: WsCloseCode::from(code.0),
                        reason: "".into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                    return;
                }
                None => return,
            },
            command = commands.recv(), if pending.is_none() => match command {
                Some(command) => pending = Some(command),
                None => return,
            },
            () = limiter.acquire_one(), if pending.is_some() => {
                if let Some(command) = pending.take() {
                    if sink.send(Message::text(command.text)).await.is_err() {
                        return;
                    }
                    if let Some(guild_id) = command.members_of {
                        let written = Event::MemberRequestWritten { connection, guild_id };
                        let _ = actor.cast(ShardMsg::from(written));
                    }
                }
            }
        }
    }
}
