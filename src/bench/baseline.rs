//! The floor confcast's fan-out is measured against: a raw WebSocket broadcaster on the same
//! runtime and the same WebSocket library (axum's, over tokio-tungstenite), with the same read
//! buffer size, that sends one pre-encoded frame to every socket and does nothing else: no hello,
//! no store, no git, no filter. `POST /broadcast` with a body sends that body to every socket.

use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::broadcast;

type Ring = Arc<broadcast::Sender<Utf8Bytes>>;

/// Serves the broadcaster on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (ring, _) = broadcast::channel(1024);
    let app = Router::new()
        .route("/ws", get(upgrade))
        .route("/broadcast", post(broadcast_body))
        .with_state(Arc::new(ring));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn upgrade(State(ring): State<Ring>, ws: WebSocketUpgrade) -> Response {
    let rx = ring.subscribe();
    ws.read_buffer_size(4 * 1024)
        .on_upgrade(move |socket| send_all(socket, rx))
}

async fn send_all(mut socket: WebSocket, mut rx: broadcast::Receiver<Utf8Bytes>) {
    loop {
        tokio::select! {
            frame = rx.recv() => match frame {
                Ok(text) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(_)) => {}
                _ => return,
            },
        }
    }
}

async fn broadcast_body(State(ring): State<Ring>, body: String) -> StatusCode {
    let _ = ring.send(Utf8Bytes::from(body));
    StatusCode::ACCEPTED
}
