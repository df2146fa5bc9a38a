//! A client that stops reading: the simulator keeps reading its heartbeats while the writes to it
//! are blocked, delivers the held-back frames in order once it reads again, and still ends the
//! connection on a drop or a close.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actors::gateway::{ClientPayload, Intents, Ready, ServerPayload};
use common::{
    all_members, identify_payload, start, test_config, wait_for_report, within, GatewayClient,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use shardvisor::sim::report::ConnectionEnd;
use shardvisor::sim::world::WorldConfig;
use shardvisor::sim::{Fault, SimConfig, Simulator, Target, ViolationKind};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Receive buffer requested for the client's socket, so that a client that stops reading blocks
/// the simulator's writes after little data.
const CLIENT_RECEIVE_BUFFER: u32 = 4096;

/// `write_buffer_size` of the simulator's WebSocket library (the default of tungstenite 0.29, which
/// axum keeps). It buffers up to this many bytes, plus the frame being written, before a write
/// waits for the socket.
const WEBSOCKET_WRITE_BUFFER: usize = 128 * 1024;

/// High steady traffic, short heartbeat times, and guilds large enough that their member chunks
/// come to megabytes.
fn stall_config() -> SimConfig {
    SimConfig {
        heartbeat_interval: HEARTBEAT_INTERVAL,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
        dispatch_rate: 2000.0,
        world: WorldConfig {
            guilds: 20,
            largest_guild: 20_000,
            ..test_config().world
        },
        ..test_config()
    }
}

/// A client that identified, requested every guild's members and then stopped reading, while a
/// task keeps heartbeating for it.
struct StalledClient {
    stream: SplitStream<Socket>,
    heartbeats: JoinHandle<String>,
    heartbeats_sent: Arc<AtomicU64>,
    /// IDENTIFY and the member requests, sent before the heartbeat task started.
    payloads_before_stall: u64,
    session_id: String,
    ready_seq: u64,
    /// The client's socket receive buffer, in bytes, as the kernel set it.
    receive_buffer: usize,
}

impl StalledClient {
    /// Returns the payloads the client has sent so far.
    fn payloads_sent(&self) -> u64 {
        self.payloads_before_stall + self.heartbeats_sent.load(Ordering::SeqCst)
    }

    /// Returns the max bytes that the simulator can write to this client before a write blocks,
    /// while the client reads nothing. They fit in the client's receive buffer, the simulator's
    /// send buffer (at most the kernel's `tcp_wmem` maximum) and the WebSocket library's write
    /// buffer with one frame of `largest_frame` bytes.
    fn unblocked_write_capacity(&self, largest_frame: usize) -> usize {
        let tcp_wmem = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
            .unwrap_or_else(|error| panic!("failed to read /proc/sys/net/ipv4/tcp_wmem: {error}"));
        let send_buffer_max: usize = tcp_wmem
            .split_whitespace()
            .last()
            .and_then(|max| max.parse().ok())
            .unwrap_or_else(|| panic!("invalid /proc/sys/net/ipv4/tcp_wmem: {tcp_wmem:?}"));
        self.receive_buffer + send_buffer_max + WEBSOCKET_WRITE_BUFFER + largest_frame
    }
}

/// Connects through a socket with a small receive buffer, identifies shard 0, requests the
/// members of every guild and stops reading. A task sends a heartbeat every interval from then
/// on.
async fn stalled_client(sim: &Simulator) -> StalledClient {
    let (socket, receive_buffer) = connect_small_buffer(sim).await;
    let (mut sink, mut stream) = socket.split();

    let (hello, _) = next_payload(&mut stream).await;
    assert!(
        matches!(hello, ServerPayload::Hello(_)),
        "expected HELLO first, got {hello:?}"
    );
    let token = sim.config().token.clone();
    send(
        &mut sink,
        &identify_payload(&token, Some([0, 1]), Intents::ALL.0),
    )
    .await;
    let (ready, _) = next_payload(&mut stream).await;
    let ServerPayload::Dispatch(ready) = ready else {
        panic!("expected READY after IDENTIFY, got {ready:?}")
    };
    assert_eq!(ready.event, "READY", "the first dispatch after IDENTIFY");
    let session_id = serde_json::from_str::<Ready>(ready.data.get())
        .unwrap_or_else(|error| panic!("READY does not decode: {error}"))
        .session_id;

    // The member chunks of every guild, with the steady traffic, are far more than the socket
    // buffers take, so the simulator's writes block soon after the client stops reading.
    let guild_ids = sim.guild_ids(0);
    for guild_id in &guild_ids {
        send(&mut sink, &all_members(guild_id.get(), "stall")).await;
    }

    let heartbeats_sent = Arc::new(AtomicU64::new(0));
    StalledClient {
        stream,
        heartbeats: keep_heartbeating(sink, ready.seq, heartbeats_sent.clone()),
        heartbeats_sent,
        payloads_before_stall: 1 + guild_ids.len() as u64,
        session_id,
        ready_seq: ready.seq,
        receive_buffer,
    }
}

/// Connects to the simulator's gateway through a socket with a small receive buffer. Returns the
/// WebSocket and the receive buffer size the kernel set.
async fn connect_small_buffer(sim: &Simulator) -> (Socket, usize) {
    let socket = TcpSocket::new_v4().expect("a TCP socket opens");
    // Set before connecting, so that the window the client advertises stays small.
    socket
        .set_recv_buffer_size(CLIENT_RECEIVE_BUFFER)
        .expect("the receive buffer size can be set");
    let tcp = within("a TCP connect", socket.connect(sim.address()))
        .await
        .unwrap_or_else(|error| panic!("failed to connect to {}: {error}", sim.address()));
    let receive_buffer = socket2::SockRef::from(&tcp)
        .recv_buffer_size()
        .unwrap_or_else(|error| panic!("failed to read the receive buffer size: {error}"));
    let url = format!("{}/?v=10&encoding=json", sim.gateway_url());
    let (socket, _) = within(
        "the WebSocket upgrade",
        tokio_tungstenite::client_async(url, tcp),
    )
    .await
    .unwrap_or_else(|error| panic!("failed to upgrade the connection: {error}"));
    (socket, receive_buffer)
}

/// Reads the next text message and decodes it, or returns `None` at the end of the connection.
/// Returns the payload and the size of the message.
async fn try_next_payload(stream: &mut SplitStream<Socket>) -> Option<(ServerPayload, usize)> {
    loop {
        let message = within("a message from the simulator", stream.next()).await;
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
        };
        let payload = ServerPayload::decode(text.as_bytes()).unwrap_or_else(|error| {
            let head: String = text.chars().take(300).collect();
            panic!("the simulator sent an undecodable payload ({error}): {head}")
        });
        return Some((payload, text.len()));
    }
}

/// Reads the next payload, failing the test at the end of the connection.
async fn next_payload(stream: &mut SplitStream<Socket>) -> (ServerPayload, usize) {
    match try_next_payload(stream).await {
        Some(next) => next,
        None => panic!("the connection ended instead of sending a payload"),
    }
}

/// Sends a payload, failing the test if it cannot.
async fn send(sink: &mut SplitSink<Socket, Message>, payload: &ClientPayload) {
    within("a send", sink.send(Message::text(payload.encode())))
        .await
        .unwrap_or_else(|error| panic!("failed to send a payload: {error}"));
}

/// Sends a heartbeat every heartbeat interval until the task is aborted, counting the heartbeats
/// sent in `sent`. Returns the error of a failed send.
fn keep_heartbeating(
    mut sink: SplitSink<Socket, Message>,
    seq: u64,
    sent: Arc<AtomicU64>,
) -> JoinHandle<String> {
    tokio::spawn(async move {
        let heartbeat = ClientPayload::Heartbeat { seq: Some(seq) }.encode();
        let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            ticker.tick().await;
            if let Err(error) = sink.send(Message::text(heartbeat.clone())).await {
                return error.to_string();
            }
            sent.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// Waits until the simulator has read every payload the client sent so far.
async fn wait_payloads_read(sim: &Simulator, client: &StalledClient) {
    let sent = client.payloads_sent();
    wait_for_report(
        sim,
        "every payload of the stalled client read by the simulator",
        |report| report.connections[0].sends >= sent,
    )
    .await;
}

/// Lets the writes block for one heartbeat timeout, stops the heartbeats, injects `fault` and
/// waits for the end of the connection. Stopping the heartbeats first leaves no unread payload at
/// the simulator, whose close would otherwise reset the connection. Then reads what the client
/// still gets: the frames must stop well short of the session's sequence at the fault, because
/// the rest were queued behind the blocked write.
async fn end_blocked_connection(sim: &Simulator, mut client: StalledClient, fault: Fault) {
    tokio::time::sleep(HEARTBEAT_TIMEOUT).await;
    client.heartbeats.abort();
    let _ = (&mut client.heartbeats).await;
    wait_payloads_read(sim, &client).await;

    let created = sim.report().sessions[&client.session_id].last_seq;
    assert_eq!(
        sim.inject(Target::All, fault.clone()),
        1,
        "{fault:?} hits the one connection"
    );
    wait_for_report(sim, "the end of the blocked connection", |report| {
        report.connections[0].end.is_some()
    })
    .await;

    let mut last_read = client.ready_seq;
    while let Some((payload, _)) = try_next_payload(&mut client.stream).await {
        if let ServerPayload::Dispatch(dispatch) = payload {
            last_read = dispatch.seq;
        }
    }
    // A writer that kept up would have written every frame but the few created just before the
    // fault.
    assert!(
        last_read + 100 < created,
        "the client read up to seq {last_read} of {created}, so the simulator's writes never \
         blocked before {fault:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_read_while_writes_blocked() {
    let sim = start(stall_config()).await;
    let token = sim.config().token.clone();
    let mut client = stalled_client(&sim).await;

    tokio::time::sleep(HEARTBEAT_TIMEOUT * 4).await;
    wait_payloads_read(&sim, &client).await;
    let report = sim.report();
    assert_eq!(
        report.violation_count(ViolationKind::HeartbeatTimeout),
        0,
        "a client that heartbeats while not reading must not time out: {:?}",
        report.violations
    );
    assert!(
        report.sessions[&client.session_id].resumable,
        "the session of a client that heartbeats while not reading must stay resumable"
    );
    assert!(
        report.connections[0].end.is_none(),
        "the connection must stay open: {:?}",
        report.connections[0]
    );
    let stalled_until = report.sessions[&client.session_id].last_seq;

    // Everything created during the stall arrives in order once the client reads again.
    let mut expected_seq = client.ready_seq + 1;
    let mut held_back_bytes = 0;
    let mut largest_frame = 0;
    let mut acks = 0;
    while expected_seq <= stalled_until {
        let (payload, bytes) = next_payload(&mut client.stream).await;
        held_back_bytes += bytes;
        largest_frame = largest_frame.max(bytes);
        match payload {
            ServerPayload::Dispatch(dispatch) => {
                assert_eq!(
                    dispatch.seq, expected_seq,
                    "{} out of sequence after the stall",
                    dispatch.event
                );
                expected_seq += 1;
            }
            ServerPayload::HeartbeatAck => acks += 1,
            other => panic!("unexpected payload after the stall: {other:?}"),
        }
    }
    let last_read = expected_seq - 1;

    let capacity = client.unblocked_write_capacity(largest_frame);
    assert!(
        held_back_bytes > capacity,
        "the stall held back {held_back_bytes} bytes, no more than the {capacity} bytes the \
         buffers take, so the simulator's writes never blocked; request more members"
    );
    assert!(
        acks > 0,
        "heartbeats sent during the stall must be acknowledged after the held-back frames"
    );
    assert!(
        !client.heartbeats.is_finished(),
        "the heartbeat task failed to send: {:?}",
        client.heartbeats.await
    );

    // The session resumes after the client drops the connection.
    client.heartbeats.abort();
    drop(client.stream);
    let mut resumed = GatewayClient::connect(sim.resume_url()).await;
    resumed.hello().await;
    resumed.resume(&token, &client.session_id, last_read).await;
    let replay = resumed
        .collect_until("RESUMED", |dispatch| dispatch.event == "RESUMED")
        .await;
    assert_eq!(
        replay[0].seq,
        last_read + 1,
        "the replay starts after the last dispatch read"
    );

    let report = sim.shutdown().await;
    assert_eq!(
        report.violation_count(ViolationKind::HeartbeatTimeout),
        0,
        "no heartbeat timeout while the held-back frames were read: {:?}",
        report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_ends_blocked_connection() {
    let sim = start(stall_config()).await;
    let client = stalled_client(&sim).await;
    let session_id = client.session_id.clone();

    end_blocked_connection(&sim, client, Fault::Drop).await;

    let report = sim.shutdown().await;
    assert!(
        matches!(report.connections[0].end, Some(ConnectionEnd::Dropped)),
        "a dropped connection ends without a close frame: {:?}",
        report.connections[0].end
    );
    assert!(
        report.sessions[&session_id].resumable,
        "a dropped connection leaves its session resumable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_blocked_connection() {
    let sim = start(stall_config()).await;
    let client = stalled_client(&sim).await;
    let session_id = client.session_id.clone();

    end_blocked_connection(&sim, client, Fault::Close { code: 4000 }).await;

    let report = sim.shutdown().await;
    assert!(
        matches!(
            report.connections[0].end,
            Some(ConnectionEnd::Server { code: 4000, .. })
        ),
        "a close that could not be written is still recorded with its code: {:?}",
        report.connections[0].end
    );
    assert!(
        report.sessions[&session_id].resumable,
        "4000 leaves the session resumable"
    );
}
