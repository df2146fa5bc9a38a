//! The HTTP side of the simulator: `GET /api/v10/gateway/bot` and the WebSocket upgrade, on the
//! main address and on the resume address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actors::gateway::payload::{GatewayBot, SessionStartLimit};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::connection::{self, ConnectParams};
use super::{lock, Shared};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    resume_address: bool,
}

/// Serves the API and the gateway on `listener` until shutdown.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, resume_address: bool) {
    let shutdown = shared.shutdown.clone();
    let app = Router::new()
        .route("/api/v10/gateway/bot", get(gateway_bot))
        .route("/", get(gateway))
        .with_state(AppState {
            shared,
            resume_address,
        });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "simulator listener failed");
    }
}

/// The resume address, which a fault can make refuse connections.
pub(crate) struct ResumeListener {
    /// A second handle on the listening socket, so that it can be shut down at once, from
    /// synchronous code, while the serving task still owns its own handle.
    socket: Option<std::net::TcpListener>,
    task: Option<JoinHandle<()>>,
}

impl ResumeListener {
    pub(crate) fn start(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<Self> {
        let listener = listener.into_std()?;
        let mut resume = Self {
            socket: None,
            task: None,
        };
        resume.serve(listener, shared)?;
        Ok(resume)
    }

    fn serve(
        &mut self,
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        self.socket = Some(listener.try_clone()?);
        let listener = TcpListener::from_std(listener)?;
        self.task = Some(tokio::spawn(serve(listener, shared, true)));
        Ok(())
    }

    /// Stops listening at once, so that connects are refused. Open connections stay.
    pub(crate) fn refuse(&mut self) {
        // Shutting a listening socket down takes it out of the LISTEN state immediately, before
        // the aborted task gets around to dropping its handle; the port can be bound again.
        if let Some(socket) = self.socket.take() {
            let _ = socket2::SockRef::from(&socket).shutdown(std::net::Shutdown::Both);
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same address.
    pub(crate) fn accept(
        &mut self,
        address: SocketAddr,
        shared: Arc<Shared>,
    ) -> std::io::Result<()> {
        if self.task.is_some() {
            return Ok(());
        }
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.listen(1024)?;
        self.serve(socket.into(), shared)
    }
}

impl Drop for ResumeListener {
    fn drop(&mut self) {
        self.refuse();
    }
}

/// `GET /api/v10/gateway/bot`, as Discord documents it: the gateway URL, the recommended shard
/// count and the session-start budget. Requires `Authorization: Bot <token>`.
async fn gateway_bot(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let shared = &app.shared;
    let authorized = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bot "))
        .is_some_and(|token| token == shared.config.token.expose());
    let token_valid = lock(&shared.identify).token_valid;
    if !authorized || !token_valid {
        let body = serde_json::json!({"message": "401: Unauthorized", "code": 0});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }

    let (remaining, reset_after) = lock(&shared.identify).budget(&shared.config, Instant::now());
    Json(GatewayBot {
        url: shared.gateway_url.clone(),
        shards: shared.config.shards,
        session_start_limit: SessionStartLimit {
            total: shared.config.session_start_total,
            remaining,
            reset_after: u64::try_from(reset_after.as_millis()).unwrap_or(u64::MAX),
            max_concurrency: shared.config.max_concurrency,
        },
    })
    .into_response()
}

/// The gateway: `/?v=10&encoding=json[&compress=zlib-stream]`. Unsupported parameters are
/// accepted at the HTTP level and answered with a close frame after the upgrade, as Discord does
/// for an invalid API version (4012).
async fn gateway(
    State(app): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let params = ConnectParams::parse(&query, app.resume_address);
    let shared = app.shared;
    upgrade.on_upgrade(move |socket| connection::run(socket, shared, params))
}
