//! The embeddable client: what an application links to receive its configuration.
//!
//! Built with `--no-default-features --features client`, it compiles no git2, sqlx or axum.
//! [`Session`] is one WebSocket connection speaking the protocol in [`crate::protocol`]; it keeps
//! the resume position (`cursor`) and drops versions it has already seen, so a caller sees each
//! version of each topic once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

mod reconnect;
pub mod state;

pub use reconnect::{Client, ClientOptions, Delivery, Update, UpdateKind};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{AckStatus, ClientMessage, CommandStatus, ServerMessage};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("connection lost: {0}")]
    Lost(Box<tokio_tungstenite::tungstenite::Error>),
    #[error("server closed the connection ({code}: {reason})")]
    Closed { code: u16, reason: String },
    #[error("server sent something that is not a protocol frame: {0}")]
    Protocol(String),
    #[error("server refused: {code}: {message}")]
    Refused { code: String, message: String },
}

impl From<tokio_tungstenite::tungstenite::Error> for ClientError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        ClientError::Lost(Box::new(e))
    }
}

/// The largest message (and WebSocket frame) a client accepts unless told otherwise: 64 MiB,
/// above the server's largest frame with the default `[limits]` (`LimitsConfig::max_frame_bytes`,
/// about 63 MiB). tungstenite's own default frame limit, 16 MiB, would refuse a topic of 12 MiB in
/// base64, and a client that refuses a frame reconnects and fetches it again forever.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Who this instance is.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub instance: String,
    pub app: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// One connection to a confcast server.
pub struct Session {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The log position this instance has seen everything up to (for `since` on reconnect).
    cursor: Option<u64>,
    /// Highest version seen per topic, to drop replays of versions already delivered.
    versions: HashMap<String, u64>,
    /// The server's ping interval, from its welcome.
    heartbeat: Duration,
    /// The log epoch `cursor` and `versions` belong to.
    epoch: Option<String>,
    /// The log epoch the server named in its welcome.
    server_epoch: String,
}

impl Session {
    /// Connects to `url` (`ws://host:port/ws`) and says hello; returns after the server's welcome.
    pub async fn connect(url: &str, identity: &Identity) -> Result<Session, ClientError> {
        Session::connect_with(url, identity, None).await
    }

    /// Like [`Session::connect`], presenting `token` as `Authorization: Bearer <token>`.
    pub async fn connect_with(
        url: &str,
        identity: &Identity,
        token: Option<&str>,
    ) -> Result<Session, ClientError> {
        Session::connect_with_limit(url, identity, token, DEFAULT_MAX_FRAME_BYTES).await
    }

    /// Like [`Session::connect_with`], accepting server messages of up to `max_frame_bytes`
    /// (a larger one ends the connection). It must be at least the server's `max_frame_bytes`.
    pub async fn connect_with_limit(
        url: &str,
        identity: &Identity,
        token: Option<&str>,
        max_frame_bytes: usize,
    ) -> Result<Session, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
        let connect_err = |e| ClientError::Connect {
            url: url.to_string(),
            source: Box::new(e),
        };
        let mut request = url.into_client_request().map_err(connect_err)?;
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                ClientError::Protocol("the token is not a valid header value".into())
            })?;
            request.headers_mut().insert("authorization", value);
        }
        // The server sends each message as one frame, so both limits are the same.
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_frame_bytes))
            .max_frame_size(Some(max_frame_bytes));
        let (socket, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), false)
                .await
                .map_err(connect_err)?;
        let mut session = Session {
            socket,
            cursor: None,
            versions: HashMap::new(),
            heartbeat: Duration::from_secs(15),
            epoch: None,
            server_epoch: String::new(),
        };
        session
            .send(&ClientMessage::Hello {
                instance: identity.instance.clone(),
                app: identity.app.clone(),
                labels: identity.labels.clone(),
                heartbeat: false,
            })
            .await?;
        match session.recv_raw().await? {
            ServerMessage::Welcome {
                heartbeat_secs,
                epoch,
                max_frame_bytes: server_max,
                ..
            } => {
                // Not raised to the server's figure by itself: the cap is the application's
                // bound on what one message may make it hold.
                if server_max > u64::try_from(max_frame_bytes).unwrap_or(u64::MAX) {
                    tracing::warn!(
                        server_max_frame_bytes = server_max,
                        client_max_frame_bytes = max_frame_bytes,
                        "the server may send frames larger than this client accepts (its [limits]); \
                         raise the client's max_frame_bytes (agent: --max-frame-bytes) to the server's, \
                         or its largest snapshots and changes will never arrive"
                    );
                }
                session.heartbeat = Duration::from_secs(heartbeat_secs.max(1));
                session.server_epoch = epoch;
                Ok(session)
            }
            ServerMessage::Error { code, message } => Err(ClientError::Refused { code, message }),
            other => Err(ClientError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// Subscribes to topic patterns; `since` resumes after a log position already applied, in
    /// the epoch this session's position belongs to (see [`Session::seed`]). The server answers
    /// with snapshots or a replay, then `subscribed`.
    pub async fn subscribe(
        &mut self,
        topics: &[String],
        since: Option<u64>,
    ) -> Result<(), ClientError> {
        let epoch = self.epoch.clone();
        self.subscribe_from(topics, since, epoch).await
    }

    /// Subscribes resuming after `since` of log epoch `epoch` (both as kept by the caller).
    pub async fn subscribe_from(
        &mut self,
        topics: &[String],
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Result<(), ClientError> {
        self.send(&ClientMessage::Subscribe {
            topics: topics.to_vec(),
            since,
            epoch: since.and(epoch),
        })
        .await
    }

    /// Seeds what was already applied (from a state directory) so replays of it are dropped.
    /// `epoch` is the log epoch they were read in: when the server's log is in another one, the
    /// seed is dropped (the server answers a resume from another epoch with snapshots anyway).
    pub fn seed(
        &mut self,
        epoch: Option<String>,
        cursor: Option<u64>,
        versions: HashMap<String, u64>,
    ) {
        if epoch.as_deref().is_some_and(|e| e != self.server_epoch) {
            self.cursor = None;
            self.versions.clear();
            self.epoch = None;
            return;
        }
        self.epoch = epoch;
        self.cursor = cursor;
        self.versions = versions;
    }

    /// The log epoch the server named in its welcome.
    pub fn server_epoch(&self) -> &str {
        &self.server_epoch
    }

    /// The log epoch this session's position belongs to (set by each `subscribed`).
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    /// The server's ping interval: a connection silent for a few of these is dead.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// The next frame exactly as the server sent it (no dedupe): for clients that keep their own state.
    pub async fn next_raw(&mut self) -> Result<ServerMessage, ClientError> {
        self.recv_raw().await
    }

    /// The next message for the application: snapshots, changes (each version once), commands,
    /// `subscribed` markers, ack receipts and error frames.
    pub async fn next(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            let message = self.recv_raw().await?;
            match &message {
                ServerMessage::Change(c) => {
                    self.cursor = Some(self.cursor.map_or(c.seq, |s| s.max(c.seq)));
                    let seen = self.versions.get(&c.topic).copied().unwrap_or(0);
                    if c.version <= seen {
                        continue;
                    }
                    self.versions.insert(c.topic.clone(), c.version);
                }
                ServerMessage::Snapshot(s) => {
                    self.versions.insert(s.topic.clone(), s.version);
                }
                ServerMessage::Subscribed { seq, epoch, .. } => {
                    // Set, not raised: after a restore the log's head can be below what we saw.
                    self.cursor = Some(*seq);
                    if self.epoch.as_deref() != Some(epoch.as_str()) {
                        self.epoch = Some(epoch.clone());
                    }
                }
                _ => {}
            }
            return Ok(message);
        }
    }

    /// Reports what this instance did with `version` of `topic`.
    pub async fn ack(
        &mut self,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<String>,
    ) -> Result<(), ClientError> {
        self.send(&ClientMessage::Ack {
            topic: topic.to_string(),
            version,
            status,
            error,
        })
        .await
    }

    /// Reports what this instance did with command `id` (from a `command` message). The server
    /// answers `command_recorded` (also for a repeated ack: the first verdict stands).
    pub async fn ack_command(
        &mut self,
        id: &str,
        status: CommandStatus,
        message: Option<String>,
    ) -> Result<(), ClientError> {
        self.send(&ClientMessage::CommandAck {
            id: id.to_string(),
            status,
            message,
        })
        .await
    }

    /// Sends any client message (tests use this to send frames a well-behaved client would not).
    pub async fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        let text =
            serde_json::to_string(message).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.socket.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    async fn recv_raw(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            if let Some(message) = self.next_frame().await? {
                return Ok(message);
            }
        }
    }

    /// The next frame: `Some` for a protocol message, `None` for a ping or pong (the server is
    /// alive). Pings are answered by tungstenite on the next read or write.
    pub async fn next_frame(&mut self) -> Result<Option<ServerMessage>, ClientError> {
        let Some(frame) = self.socket.next().await else {
            return Err(ClientError::Closed {
                code: 1006,
                reason: "connection dropped".into(),
            });
        };
        match frame? {
            Message::Text(text) => match serde_json::from_str(&text) {
                Ok(message) => Ok(Some(message)),
                // PROTOCOL.md: message types a client does not know are ignored (later revisions
                // may add some); anything else that does not parse is a protocol error.
                Err(e) if e.to_string().starts_with("unknown variant") => {
                    tracing::debug!(frame = %text.chars().take(200).collect::<String>(), "unknown server message ignored");
                    Ok(None)
                }
                Err(e) => Err(ClientError::Protocol(format!(
                    "{e}: {}",
                    text.chars().take(200).collect::<String>()
                ))),
            },
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                Err(ClientError::Closed { code, reason })
            }
            _ => Ok(None),
        }
    }
}
