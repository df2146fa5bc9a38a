//! A raw gateway client for the simulator tests: real WebSockets on loopback, real zlib, and a
//! timeout on every wait so that a broken rule fails a test instead of hanging it.

// Each test binary uses a different part of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use actors::gateway::{
    ClientPayload, Dispatch, GuildMembersChunkHeader, Hello, Identify, IdentifyProperties,
    Inflater, Intents, Ready, RequestGuildMembers, Resume, ServerPayload, Snowflake, Token,
};
use futures_util::{SinkExt, StreamExt};
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{Report, SimConfig, Simulator};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Maximum wait for anything the simulator should send or record.
pub const WAIT: Duration = Duration::from_secs(5);

/// Largest inflated payload the client accepts.
const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// Settings for a fast test: a small world, no steady traffic, Discord's other defaults.
pub fn test_config() -> SimConfig {
    SimConfig {
        dispatch_rate: 0.0,
        world: WorldConfig {
            seed: 7,
            guilds: 40,
            shard_count: 1,
            largest_guild: 3_000,
        },
        ..SimConfig::default()
    }
}

/// Starts a simulator, failing the test with the error if it cannot.
pub async fn start(config: SimConfig) -> Simulator {
    Simulator::start(config)
        .await
        .unwrap_or_else(|error| panic!("failed to start the simulator: {error}"))
}

/// Returns the shard a guild's events go to, `(guild_id >> 22) % shard_count`.
pub fn shard_of(guild_id: u64, shard_count: u32) -> u32 {
    ((guild_id >> 22) % u64::from(shard_count)) as u32
}

/// Polls the report until `condition` holds, failing the test after [`WAIT`].
pub async fn wait_for_report(
    sim: &Simulator,
    expected: &str,
    condition: impl Fn(&Report) -> bool,
) -> Report {
    let deadline = Instant::now() + WAIT;
    loop {
        let report = sim.report();
        if condition(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for the report to show {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `future` with the [`WAIT`] timeout, failing the test with `expected` when it expires.
pub async fn within<T>(expected: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {expected}"),
    }
}

/// Calls `GET /api/v10/gateway/bot` with the given `Authorization` header, if any. Returns the
/// status code and the JSON body.
pub async fn get_gateway_bot(
    sim: &Simulator,
    authorization: Option<&str>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("an HTTP client without TLS builds");
    let mut request = client.get(format!("{}/gateway/bot", sim.api_url()));
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|error| panic!("GET /gateway/bot failed: {error}"));
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or_else(|error| {
        panic!("GET /gateway/bot returned a body that is not JSON: {error}")
    });
    (status, body)
}

/// Returns the `Authorization` header value of the simulator's bot.
pub fn bot_authorization(sim: &Simulator) -> String {
    format!("Bot {}", sim.config().token.expose())
}

/// Builds an IDENTIFY with the given token, shard and intents, and Discord's defaults otherwise.
pub fn identify_payload(token: &Token, shard: Option<[u32; 2]>, intents: u64) -> ClientPayload {
    ClientPayload::Identify(Identify {
        token: token.clone(),
        properties: IdentifyProperties::default(),
        compress: None,
        large_threshold: None,
        shard,
        presence: None,
        intents,
    })
}

/// Builds an all-members REQUEST_GUILD_MEMBERS.
pub fn all_members(guild_id: u64, nonce: &str) -> ClientPayload {
    ClientPayload::RequestGuildMembers(RequestGuildMembers::all_members(
        Snowflake(guild_id),
        Some(nonce.to_owned()),
    ))
}

/// Reads a field of a dispatch's data as an integer, from a JSON string (ids) or number.
pub fn data_field_u64(dispatch: &Dispatch, field: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(dispatch.data.get()).ok()?;
    match &value[field] {
        serde_json::Value::String(text) => text.parse().ok(),
        serde_json::Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

/// Parses the data of a dispatch as JSON.
pub fn data_json(dispatch: &Dispatch) -> serde_json::Value {
    serde_json::from_str(dispatch.data.get()).unwrap_or_else(|error| {
        panic!("{} data is not JSON: {error}", dispatch.event);
    })
}

/// Parses the header fields of a GUILD_MEMBERS_CHUNK.
pub fn chunk_header(dispatch: &Dispatch) -> GuildMembersChunkHeader {
    serde_json::from_str(dispatch.data.get())
        .unwrap_or_else(|error| panic!("invalid GUILD_MEMBERS_CHUNK header: {error}"))
}

/// What the client read from the connection.
#[derive(Debug)]
pub enum Received {
    /// A gateway payload with the (inflated) text it was decoded from.
    Payload {
        payload: ServerPayload,
        text: String,
    },
    /// A close frame, with its code if it had one.
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Dropped,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A close frame with this code.
    Close(Option<u16>),
    /// No close frame: the TCP connection ended.
    Dropped,
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One gateway connection, seen from the bot's side.
pub struct GatewayClient {
    socket: Socket,
    inflater: Option<Inflater>,
    /// Sequence of the newest dispatch received.
    pub last_seq: Option<u64>,
    /// Text WebSocket messages received.
    pub text_messages: usize,
    /// The first two bytes of every binary WebSocket message received, in order.
    pub binary_heads: Vec<Vec<u8>>,
    /// Set once a close frame or the end of the connection was read.
    pub end: Option<End>,
}

impl GatewayClient {
    /// Connects to `{base}/?v=10&encoding=json`.
    pub async fn connect(base: &str) -> Self {
        Self::connect_query(base, "v=10&encoding=json").await
    }

    /// Connects to `{base}/?v=10&encoding=json&compress=zlib-stream`.
    pub async fn connect_compressed(base: &str) -> Self {
        Self::connect_query(base, "v=10&encoding=json&compress=zlib-stream").await
    }

    /// Connects with the given query string, failing the test if the upgrade fails.
    pub async fn connect_query(base: &str, query: &str) -> Self {
        match Self::try_connect_query(base, query).await {
            Ok(client) => client,
            Err(error) => panic!("failed to connect to {base}/?{query}: {error}"),
        }
    }

    /// Connects with the given query string, returning the error of a failed connect.
    pub async fn try_connect_query(
        base: &str,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!("{base}/?{query}");
        let compressed = query.contains("compress=zlib-stream");
        let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| {
                tokio_tungstenite::tungstenite::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {base} timed out after {WAIT:?}"),
                ))
            })??;
        Ok(Self {
            socket,
            inflater: compressed.then(|| Inflater::new(MAX_PAYLOAD_BYTES)),
            last_seq: None,
            text_messages: 0,
            binary_heads: Vec::new(),
            end: None,
        })
    }

    /// Sends a payload as a text message.
    pub async fn send(&mut self, payload: &ClientPayload) {
        self.send_text(payload.encode()).await;
    }

    /// Sends raw text, for payloads the protocol layer would not build.
    pub async fn send_text(&mut self, text: String) {
        within("a send", self.socket.send(Message::text(text)))
            .await
            .unwrap_or_else(|error| panic!("failed to send a payload: {error}"));
    }

    /// Sends op 1 with the newest sequence received.
    pub async fn heartbeat(&mut self) {
        let seq = self.last_seq;
        self.send(&ClientPayload::Heartbeat { seq }).await;
    }

    /// Sends IDENTIFY for `[shard, count]`.
    pub async fn identify(&mut self, token: &Token, shard: u32, count: u32, intents: Intents) {
        self.send(&identify_payload(token, Some([shard, count]), intents.0))
            .await;
    }

    /// Sends RESUME.
    pub async fn resume(&mut self, token: &Token, session_id: &str, seq: u64) {
        let resume = Resume {
            token: token.clone(),
            session_id: session_id.to_owned(),
            seq,
        };
        self.send(&ClientPayload::Resume(resume)).await;
    }

    /// Sends a close frame with `code`. The connection is not read afterwards.
    pub async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: WsCloseCode::from(code),
            reason: "".into(),
        };
        within("a close frame to be sent", self.socket.close(Some(frame)))
            .await
            .unwrap_or_else(|error| panic!("failed to send close {code}: {error}"));
    }

    /// Reads the next payload, close frame or end of the connection, or returns `None` if
    /// nothing arrives within `timeout`.
    pub async fn recv_within(&mut self, timeout: Duration) -> Option<Received> {
        if let Some(end) = self.end {
            return Some(match end {
                End::Close(code) => Received::Close(code),
                End::Dropped => Received::Dropped,
            });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return None,
                Ok(None | Some(Err(_))) => {
                    self.end = Some(End::Dropped);
                    return Some(Received::Dropped);
                }
                Ok(Some(Ok(message))) => message,
            };
            let text = match message {
                Message::Text(text) => {
                    self.text_messages += 1;
                    text.as_str().to_owned()
                }
                Message::Binary(bytes) => {
                    self.binary_heads
                        .push(bytes.iter().take(2).copied().collect());
                    let Some(inflater) = &mut self.inflater else {
                        panic!("binary message on a connection without compress=zlib-stream");
                    };
                    let inflated = inflater
                        .push(&bytes)
                        .unwrap_or_else(|error| panic!("failed to inflate a message: {error}"));
                    let Some(inflated) = inflated else { continue };
                    String::from_utf8(inflated)
                        .unwrap_or_else(|error| panic!("inflated payload is not UTF-8: {error}"))
                }
                Message::Close(frame) => {
                    let code = frame.map(|frame| u16::from(frame.code));
                    self.end = Some(End::Close(code));
                    return Some(Received::Close(code));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let payload = ServerPayload::decode(text.as_bytes()).unwrap_or_else(|error| {
                let head: String = text.chars().take(300).collect();
                panic!("the simulator sent an undecodable payload ({error}): {head}")
            });
            if let ServerPayload::Dispatch(dispatch) = &payload {
                self.last_seq = Some(dispatch.seq);
            }
            return Some(Received::Payload { payload, text });
        }
    }

    /// Reads the next payload, close frame or end, failing the test after [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        match self.recv_within(WAIT).await {
            Some(received) => received,
            None => panic!("nothing received within {WAIT:?}"),
        }
    }

    /// Reads the next payload, failing the test on a close, a drop or a timeout.
    pub async fn next_payload(&mut self) -> ServerPayload {
        self.next_payload_text().await.0
    }

    /// Reads the next payload and its text, failing the test on a close, a drop or a timeout.
    pub async fn next_payload_text(&mut self) -> (ServerPayload, String) {
        match self.recv().await {
            Received::Payload { payload, text } => (payload, text),
            Received::Close(code) => panic!("connection closed with {code:?} instead of a payload"),
            Received::Dropped => panic!("connection dropped instead of sending a payload"),
        }
    }

    /// Reads HELLO, which must be the first payload.
    pub async fn hello(&mut self) -> Hello {
        match self.next_payload().await {
            ServerPayload::Hello(hello) => hello,
            other => panic!("expected HELLO first, got {other:?}"),
        }
    }

    /// Skips payloads until the connection ends, failing the test after [`WAIT`].
    pub async fn wait_end(&mut self) -> End {
        loop {
            match self.recv().await {
                Received::Payload { .. } => {}
                Received::Close(code) => return End::Close(code),
                Received::Dropped => return End::Dropped,
            }
        }
    }

    /// Skips payloads until the connection ends and returns the close code, failing the test if
    /// the connection ended without a close frame.
    pub async fn wait_close_code(&mut self) -> Option<u16> {
        match self.wait_end().await {
            End::Close(code) => code,
            End::Dropped => panic!("connection dropped without a close frame"),
        }
    }

    /// Skips payloads until one matches `matches`, failing the test on a close or a timeout.
    pub async fn wait_payload(
        &mut self,
        expected: &str,
        matches: impl Fn(&ServerPayload) -> bool,
    ) -> ServerPayload {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left).await {
                Some(Received::Payload { payload, .. }) if matches(&payload) => return payload,
                Some(Received::Payload { .. }) => {}
                Some(Received::Close(code)) => {
                    panic!("connection closed with {code:?} while waiting for {expected}")
                }
                Some(Received::Dropped) => {
                    panic!("connection dropped while waiting for {expected}")
                }
                None => panic!("timed out after {WAIT:?} waiting for {expected}"),
            }
        }
    }

    /// Skips payloads until the dispatch `event` arrives.
    pub async fn wait_dispatch(&mut self, event: &str) -> Dispatch {
        let payload = self
            .wait_payload(event, |payload| {
                matches!(payload, ServerPayload::Dispatch(dispatch) if dispatch.event == event)
            })
            .await;
        let ServerPayload::Dispatch(dispatch) = payload else {
            unreachable!("wait_payload returned a payload that does not match")
        };
        dispatch
    }

    /// Waits for READY and decodes it.
    pub async fn wait_ready(&mut self) -> (Dispatch, Ready) {
        let dispatch = self.wait_dispatch("READY").await;
        let ready = serde_json::from_str(dispatch.data.get())
            .unwrap_or_else(|error| panic!("READY does not decode: {error}"));
        (dispatch, ready)
    }

    /// Collects dispatches, skipping other payloads, up to and including the first one for which
    /// `done` returns `true`.
    pub async fn collect_until(
        &mut self,
        expected: &str,
        mut done: impl FnMut(&Dispatch) -> bool,
    ) -> Vec<Dispatch> {
        let deadline = Instant::now() + WAIT;
        let mut dispatches = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left).await {
                Some(Received::Payload {
                    payload: ServerPayload::Dispatch(dispatch),
                    ..
                }) => {
                    let finished = done(&dispatch);
                    dispatches.push(dispatch);
                    if finished {
                        return dispatches;
                    }
                }
                Some(Received::Payload { .. }) => {}
                Some(Received::Close(code)) => {
                    panic!("connection closed with {code:?} while waiting for {expected}")
                }
                Some(Received::Dropped) => {
                    panic!("connection dropped while waiting for {expected}")
                }
                None => panic!(
                    "timed out after {WAIT:?} waiting for {expected}; {} dispatches received",
                    dispatches.len()
                ),
            }
        }
    }

    /// Collects dispatches until none arrives for `quiet`, failing the test on a close.
    pub async fn collect_until_quiet(&mut self, quiet: Duration) -> Vec<Dispatch> {
        let mut dispatches = Vec::new();
        loop {
            match self.recv_within(quiet).await {
                None => return dispatches,
                Some(Received::Payload {
                    payload: ServerPayload::Dispatch(dispatch),
                    ..
                }) => dispatches.push(dispatch),
                Some(Received::Payload { .. }) => {}
                Some(Received::Close(code)) => panic!("connection closed with {code:?}"),
                Some(Received::Dropped) => panic!("connection dropped"),
            }
        }
    }

    /// Sends IDENTIFY after HELLO and waits for READY and every GUILD_CREATE it announces.
    /// Returns READY and the GUILD_CREATEs.
    pub async fn start_session(
        &mut self,
        token: &Token,
        shard: u32,
        count: u32,
        intents: Intents,
    ) -> (Ready, Vec<Dispatch>) {
        self.hello().await;
        self.identify(token, shard, count, intents).await;
        let (_, ready) = self.wait_ready().await;
        let expected = ready.guilds.len();
        let mut seen = 0;
        let mut guild_creates = Vec::new();
        if expected > 0 {
            guild_creates = self
                .collect_until("every GUILD_CREATE announced by READY", |dispatch| {
                    if dispatch.event == "GUILD_CREATE" {
                        seen += 1;
                    }
                    seen == expected
                })
                .await;
            guild_creates.retain(|dispatch| dispatch.event == "GUILD_CREATE");
        }
        (ready, guild_creates)
    }
}
