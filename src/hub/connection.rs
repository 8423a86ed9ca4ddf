//! One instance's WebSocket: hello, subscribe (snapshot or replay, then live), acks, keepalive.
//!
//! Must never: panic on a client frame, send a change twice across the replay/live seam, or drop an
//! ack it has read (each ack is written to the store before the next frame is read, and frames
//! already sent by the client are drained on shutdown).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::SinkExt;
use tokio::sync::{mpsc, Notify};

use super::commands::{self, Candidate, Outcome};
use super::subscriptions::Inbox;
use super::Frame;
use crate::app::{bearer, AppError, AppState, Peer};
use crate::auth::InstanceGrant;
use crate::protocol::{self, close, error_code, ClientMessage, ServerMessage, Snapshot};
use crate::store::{AckRejection, CommandAckOutcome, LogBounds};
use crate::telemetry::{Closed, Delivery, StoreCall, SubscribeMode};

/// `GET /ws`. When instance credentials are configured, the upgrade needs one, as
/// `Authorization: Bearer <token>` or `?token=<token>` (for clients that cannot set headers); it
/// decides which instance ids the connection may claim and which topics it may read.
pub async fn upgrade(
    State(app): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let grant = match app
        .auth
        .instance(bearer(&headers, query.get("token").map(String::as_str)))
    {
        Ok(grant) => grant,
        Err(e) => {
            tracing::info!(error = %e, "websocket credential refused");
            app.audit_refusal(&peer.actor(), "GET /ws", &e.to_string())
                .await;
            return Err(e.into());
        }
    };
    let limits = &app.config.limits;
    let max_frame = usize::try_from(limits.max_frame_bytes()).unwrap_or(usize::MAX);
    Ok(ws
        // tungstenite reserves (and zeroes on every read) 128 KiB per socket by default, which
        // was most of an idle connection's memory. Clients send small messages (hello,
        // subscribe, acks); the buffer grows for a larger one, up to the message cap below.
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(limits.max_client_message_bytes)
        .max_frame_size(limits.max_client_message_bytes)
        // A peer that does not read fills this and is dropped: one frame being written plus
        // `ws_write_buffer_bytes` queued, never more. Pongs are flushed as they are queued (see
        // `on_message`), so a ping flood cannot fill it.
        .max_write_buffer_size(max_frame.saturating_add(limits.ws_write_buffer_bytes))
        .on_upgrade(move |socket| async move {
            let tracker = app.tracker.clone();
            // Tracked so shutdown waits for sockets to close cleanly and acks to be flushed.
            let _ = tracker
                .spawn(Connection::new(app, socket, grant).run())
                .await;
        }))
}

/// What each WebSocket's read buffer starts at (see `upgrade`).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Why the server ends a connection.
enum End {
    ClientGone,
    /// The peer stopped reading: dropped without a close frame it would not read either.
    Stalled,
    Close(u16, &'static str),
}

/// How long one write may wait for a peer that does not read before the connection is dropped.
fn write_timeout(app: &AppState) -> Duration {
    app.config.server.keepalive_timeout()
}

struct Identity {
    instance: String,
    connection: u64,
    replaced: Arc<Notify>,
    /// From the `hello`, for command targets.
    app: Option<String>,
    labels: BTreeMap<String, String>,
}

struct Connection {
    app: AppState,
    socket: WebSocket,
    grant: InstanceGrant,
    identity: Option<Identity>,
    /// (pattern, deliver live events with seq above this); the patterns are the index's own.
    filters: Vec<(Arc<str>, u64)>,
    /// Where the feeder queues this connection's live changes, from its first `subscribe`.
    inbox: Option<Arc<Inbox>>,
    live: Option<mpsc::Receiver<Arc<Frame>>>,
    last_heard: Instant,
    /// The client asked for `heartbeat` messages in its `hello`.
    heartbeat_wanted: bool,
    /// The replica's active commands, from the accepted `hello` on.
    commands: Option<tokio::sync::watch::Receiver<Arc<Vec<commands::Dispatched>>>>,
    /// Commands sent (or found acked) on this connection: each at most once per connection.
    commands_seen: HashSet<String>,
}

impl Connection {
    fn new(app: AppState, socket: WebSocket, grant: InstanceGrant) -> Connection {
        Connection {
            app,
            socket,
            grant,
            identity: None,
            filters: Vec::new(),
            inbox: None,
            live: None,
            last_heard: Instant::now(),
            heartbeat_wanted: false,
            commands: None,
            commands_seen: HashSet::new(),
        }
    }

    async fn run(mut self) {
        let end = self.serve().await;
        if let Some(inbox) = &self.inbox {
            (self.app.hub.subscriptions).leave(inbox, self.filters.iter().map(|(p, _)| &**p));
        }
        self.app.metrics.connection_closed(match end {
            End::ClientGone => Closed::ClientGone,
            End::Stalled => Closed::Stalled,
            End::Close(code, _) => Closed::Code(code),
        });
        if let End::Close(code, reason) = end {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.socket.send(Message::Close(Some(frame))),
            )
            .await;
            if code == close::GOING_AWAY {
                self.drain_after_close().await;
            }
        }
        if let Some(id) = &self.identity {
            self.app.metrics.instance_disconnected();
            self.app.hub.release(&id.instance, id.connection);
            let conn = format!("{}/{}", self.app.node, id.connection);
            if let Err(e) = self
                .app
                .writes
                .instance_disconnected(&id.instance, &conn)
                .await
            {
                tracing::warn!(instance = %id.instance, error = %e, "could not mark instance disconnected");
            }
            tracing::info!(instance = %id.instance, "instance disconnected");
            self.app.hub.rollouts.stir();
        }
    }

    async fn serve(&mut self) -> End {
        let heartbeat = self.app.config.server.heartbeat();
        let timeout = self.app.config.server.keepalive_timeout();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let shutdown = self.app.shutdown.clone();
        let hello_by = tokio::time::Instant::now()
            + Duration::from_secs(self.app.config.limits.hello_timeout_secs.max(1));
        let expires_at = self.grant.expires_at.map(refused_from);
        loop {
            let replaced = self.identity.as_ref().map(|i| i.replaced.clone());
            let waiting_for_hello = self.identity.is_none();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Close(close::GOING_AWAY, "server shutting down"),
                _ = tokio::time::sleep_until(hello_by), if waiting_for_hello => {
                    return End::Close(close::HELLO_TIMEOUT, "hello timeout");
                }
                _ = tokio::time::sleep_until(expires_at.unwrap_or(hello_by)), if expires_at.is_some() => {
                    return End::Close(close::CREDENTIAL_EXPIRED, "credential expired: reconnect with a fresh one");
                }
                _ = async { match &replaced { Some(n) => n.notified().await, None => std::future::pending().await } } => {
                    return End::Close(close::REPLACED, "instance connected again elsewhere");
                }
                incoming = self.socket.recv() => {
                    let message = match incoming {
                        Some(Ok(message)) => message,
                        // Say why before going, when the socket can still take a frame.
                        Some(Err(e)) if e.to_string().contains("Message too long") => {
                            return End::Close(close::MESSAGE_TOO_BIG, "message too big (limits.max_client_message_bytes)");
                        }
                        _ => return End::ClientGone,
                    };
                    self.last_heard = Instant::now();
                    if let Some(end) = self.on_message(message).await {
                        return end;
                    }
                }
                frame = recv_live(&mut self.live) => match frame {
                    Some(frame) => {
                        if let Err(end) = self.write_live(frame).await {
                            return end;
                        }
                    }
                    None => return End::Close(close::GOING_AWAY, "server shutting down"),
                },
                changed = next_commands(&mut self.commands) => {
                    if changed.is_err() {
                        return End::Close(close::GOING_AWAY, "server shutting down");
                    }
                    if let Some(end) = self.deliver_commands().await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if self.last_heard.elapsed() > timeout {
                        return End::Close(close::KEEPALIVE_TIMEOUT, "keepalive timeout");
                    }
                    if let Err(end) = self.write(Message::Ping(bytes::Bytes::from_static(b"confcast"))).await {
                        return end;
                    }
                    if self.heartbeat_wanted && self.identity.is_some() {
                        if let Err(end) = self.send(&ServerMessage::Heartbeat).await {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// After our close frame: keep reading what the client already sent (acks) for a short while.
    async fn drain_after_close(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout_at(deadline, self.socket.recv()).await
        {
            match message {
                Message::Close(_) => break,
                Message::Text(text) => {
                    if let Ok(ClientMessage::Ack {
                        topic,
                        version,
                        status,
                        error,
                    }) = serde_json::from_str(&text)
                    {
                        self.on_ack(topic, version, status, error).await;
                    } else if let Ok(ClientMessage::CommandAck {
                        id,
                        status,
                        message,
                    }) = serde_json::from_str(&text)
                    {
                        self.on_command_ack(id, status, message).await;
                    }
                }
                _ => {}
            }
        }
    }

    /// Writes `first` and whatever else is already queued in the inbox (up to a batch), flushing
    /// once: a burst of changes costs one socket write, not one per change. Ends the connection
    /// (4008) when the feeder found the inbox full.
    async fn write_live(&mut self, first: Arc<Frame>) -> Result<(), End> {
        const BATCH: usize = 64;
        if self.inbox.as_ref().is_some_and(|i| i.lagged()) {
            tracing::warn!(instance = ?self.identity.as_ref().map(|i| &i.instance), "slow consumer cut off");
            return Err(End::Close(
                close::SLOW_CONSUMER,
                "slow consumer: reconnect and resume",
            ));
        }
        let mut written = 0;
        let timeout = write_timeout(&self.app);
        let (socket, filters, live) = (&mut self.socket, &self.filters, &mut self.live);
        let wanted = |frame: &Frame| {
            filters.iter().any(|(pattern, above)| {
                frame.seq > *above && protocol::topic_matches(pattern, &frame.topic)
            })
        };
        let write = async {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(frame) = next.take() {
                if wanted(&frame) {
                    socket.feed(Message::Text(frame.text.clone())).await?;
                    written += 1;
                }
                taken += 1;
                if taken < BATCH {
                    next = live.as_mut().and_then(|rx| rx.try_recv().ok());
                }
            }
            socket.flush().await
        };
        let result = tokio::time::timeout(timeout, write).await;
        self.app.metrics.delivered(Delivery::Live, written);
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => {
                tracing::warn!(instance = ?self.identity.as_ref().map(|i| &i.instance), "peer stopped reading; dropped");
                Err(End::Stalled)
            }
        }
    }

    async fn send(&mut self, message: &ServerMessage) -> Result<(), End> {
        let text = serde_json::to_string(message).map_err(|_| End::ClientGone)?;
        self.write(Message::Text(text.into())).await
    }

    /// Writes one frame; a peer that does not take it within the write timeout is dropped, so a
    /// stalled reader can never hold a connection task forever.
    async fn write(&mut self, message: Message) -> Result<(), End> {
        match tokio::time::timeout(write_timeout(&self.app), self.socket.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => {
                tracing::warn!(instance = ?self.identity.as_ref().map(|i| &i.instance), "peer stopped reading; dropped");
                Err(End::Stalled)
            }
        }
    }

    /// Sends what is queued (pongs), with the same deadline as `write`.
    async fn flush(&mut self) -> Result<(), End> {
        use futures_util::SinkExt;
        match tokio::time::timeout(write_timeout(&self.app), self.socket.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => {
                tracing::warn!(instance = ?self.identity.as_ref().map(|i| &i.instance), "peer sends pings but does not read; dropped");
                Err(End::Stalled)
            }
        }
    }

    async fn error(&mut self, code: &str, message: impl Into<String>) -> Option<End> {
        let message = message.into();
        tracing::debug!(code, %message, "error frame");
        self.send(&ServerMessage::Error {
            code: code.to_string(),
            message,
        })
        .await
        .err()
    }

    async fn on_message(&mut self, message: Message) -> Option<End> {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self
                    .error(
                        error_code::MALFORMED,
                        "binary frames are not part of the protocol; send JSON text",
                    )
                    .await
            }
            Message::Close(_) => return Some(End::ClientGone),
            // tungstenite queues the pong without waiting for the peer to take it, and a full
            // write buffer only holds the next one back: without this flush, a peer that sends
            // pings and never reads grows the queue to the bound of the largest frame (64 MiB
            // by default) while every other write of ours waits.
            Message::Ping(_) => return self.flush().await.err(),
            Message::Pong(_) => return None,
        };
        let parsed: ClientMessage = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .error(error_code::MALFORMED, format!("not a client message: {e}"))
                    .await
            }
        };
        let answer = match parsed {
            ClientMessage::Hello {
                instance,
                app,
                labels,
                heartbeat,
            } => {
                let first = self.identity.is_none();
                let answer = self.on_hello(instance, app, labels).await;
                if first && self.identity.is_some() {
                    // Only the hello that was accepted decides.
                    self.heartbeat_wanted = heartbeat;
                }
                answer
            }
            _ if self.identity.is_none() => {
                self.error(error_code::OUT_OF_ORDER, "send hello first")
                    .await
            }
            ClientMessage::Subscribe {
                topics,
                since,
                epoch,
            } => self.on_subscribe(topics, since, epoch).await,
            ClientMessage::Ack {
                topic,
                version,
                status,
                error,
            } => self.on_ack(topic, version, status, error).await,
            ClientMessage::CommandAck {
                id,
                status,
                message,
            } => self.on_command_ack(id, status, message).await,
        };
        // Answering (a long replay, say) kept the loop from reading pongs: that time is not silence.
        self.last_heard = Instant::now();
        answer
    }

    async fn on_hello(
        &mut self,
        instance: String,
        app: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Option<End> {
        if self.identity.is_some() {
            return self
                .error(
                    error_code::OUT_OF_ORDER,
                    "hello was already sent on this connection",
                )
                .await;
        }
        if let Err(message) =
            check_hello(&self.app.config.limits, &instance, app.as_deref(), &labels)
        {
            return self.error(error_code::INVALID, message).await;
        }
        if !self.grant.may_claim(&instance) {
            tracing::info!(credential = %self.grant.credential, "instance id outside the credential's pattern refused");
            let message = format!(
                "this credential may not claim instance `{instance}` (allowed: `{}`)",
                self.grant.instances.as_str()
            );
            // The credential's name (`token:<name>`, `jwt:<sub>`): it was valid, its use was not.
            self.app
                .audit_refusal(
                    &self.grant.credential,
                    &format!("hello {instance}"),
                    &message,
                )
                .await;
            return self.error(error_code::FORBIDDEN, message).await;
        }
        // Read before anything is registered: a failure leaves the connection as it was.
        let epoch = match self.app.store.epoch().await {
            Ok(epoch) => epoch,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the log epoch");
                return self
                    .error(
                        error_code::INTERNAL,
                        "could not read the log; send hello again",
                    )
                    .await;
            }
        };
        let Some((connection, replaced)) = self.app.hub.claim(&instance, &self.grant.credential)
        else {
            tracing::warn!(%instance, credential = %self.grant.credential, "takeover by another credential refused");
            return self
                .error(
                    error_code::FORBIDDEN,
                    format!("instance `{instance}` is connected with another credential"),
                )
                .await;
        };
        let conn = format!("{}/{connection}", self.app.node);
        if let Err(e) = self
            .app
            .writes
            .instance_connected(&instance, app.as_deref(), &labels, &conn, &self.app.node)
            .await
        {
            self.app.hub.release(&instance, connection);
            tracing::error!(%instance, error = %e, "could not register instance");
            return self
                .error(
                    error_code::INTERNAL,
                    "could not register the instance; retry",
                )
                .await;
        }
        tracing::info!(%instance, app = app.as_deref().unwrap_or("-"), "instance connected");
        self.app.metrics.instance_connected();
        self.app.hub.rollouts.stir();
        self.identity = Some(Identity {
            instance: instance.clone(),
            connection,
            replaced,
            app,
            labels,
        });
        let welcome = ServerMessage::Welcome {
            protocol: protocol::PROTOCOL_VERSION,
            server: format!("confcast/{}", env!("CARGO_PKG_VERSION")),
            instance,
            heartbeat_secs: self.app.config.server.heartbeat().as_secs(),
            max_frame_bytes: self.app.config.limits.max_frame_bytes(),
            epoch,
        };
        if let Some(end) = self.send(&welcome).await.err() {
            return Some(end);
        }
        // Commands waiting for this instance come right after its welcome.
        self.commands = Some(self.app.hub.active_commands());
        self.deliver_commands().await
    }

    async fn on_subscribe(
        &mut self,
        topics: Vec<String>,
        since: Option<u64>,
        epoch: Option<String>,
    ) -> Option<End> {
        if topics.is_empty() {
            return self
                .error(
                    error_code::INVALID,
                    "subscribe needs at least one topic pattern",
                )
                .await;
        }
        let limits = &self.app.config.limits;
        if let Some(long) = topics.iter().find(|t| t.len() > limits.max_pattern_bytes) {
            let message = format!(
                "topic pattern of {} bytes is over the limit of {} (limits.max_pattern_bytes)",
                long.len(),
                limits.max_pattern_bytes
            );
            return self.error(error_code::INVALID, message).await;
        }
        if let Some(bad) = topics
            .iter()
            .find_map(|t| protocol::validate_pattern(t).err())
        {
            return self.error(error_code::INVALID, bad).await;
        }
        if let Some(outside) = topics.iter().find(|t| !self.grant.may_subscribe(t)) {
            let message = format!(
                "this credential may not read `{outside}` (allowed: {})",
                self.grant.topics.join(", ")
            );
            return self.error(error_code::FORBIDDEN, message).await;
        }
        let held: HashSet<&str> = self.filters.iter().map(|(p, _)| &**p).collect();
        let new_patterns: HashSet<&str> = topics
            .iter()
            .map(String::as_str)
            .filter(|t| !held.contains(t))
            .collect();
        if held.len() + new_patterns.len() > limits.max_subscriptions {
            let message = format!(
                "a connection may hold at most {} topic patterns (limits.max_subscriptions); it has {}",
                limits.max_subscriptions,
                held.len()
            );
            return self.error(error_code::INVALID, message).await;
        }
        // Listen before reading the store: anything committed after our read is then queued in
        // the inbox (and anything before it, too, is dropped by the positions set below).
        let new_patterns: Vec<String> = new_patterns.into_iter().map(String::from).collect();
        let inbox = match &self.inbox {
            Some(inbox) => inbox.clone(),
            None => {
                let member = self.identity.as_ref().map(|id| {
                    Arc::new(crate::hub::subscriptions::Member {
                        instance: id.instance.clone(),
                        labels: id.labels.clone(),
                    })
                });
                let (inbox, rx) = self.app.hub.subscriptions.inbox_for(member);
                self.inbox = Some(inbox.clone());
                self.live = Some(rx);
                inbox
            }
        };
        let interned = self.app.hub.subscriptions.listen(&inbox, &new_patterns);
        let matches = |topic: &str| topics.iter().any(|p| protocol::topic_matches(p, topic));
        let result = match self.app.store.log_bounds().await {
            Err(e) => {
                tracing::error!(error = %e, "cannot read the log epoch");
                Err(None)
            }
            Ok(bounds) => match since {
                Some(since) => {
                    self.replay(&topics, since, epoch.as_deref(), bounds, &matches)
                        .await
                }
                None => self.snapshot(&topics, &matches, None, &bounds.epoch).await,
            },
        };
        let upto = match result {
            Ok(upto) => upto,
            Err(failed) => {
                // Nothing of this subscribe holds: the new patterns leave the index again.
                (self.app.hub.subscriptions).leave(&inbox, interned.iter().map(|p| &**p));
                return match failed {
                    Some(end) => Some(end),
                    None => {
                        self.error(
                            error_code::INTERNAL,
                            "could not read the log; retry the subscribe",
                        )
                        .await
                    }
                };
            }
        };
        for t in &topics {
            // A pattern subscribed again moves its position; it is never held twice.
            match self.filters.iter_mut().find(|(p, _)| **p == **t) {
                Some(held) => held.1 = upto,
                None => {
                    let pattern = interned
                        .iter()
                        .find(|p| ***p == **t)
                        .cloned()
                        .unwrap_or_else(|| Arc::from(t.as_str()));
                    self.filters.push((pattern, upto));
                }
            }
        }
        let all: Vec<String> = self.filters.iter().map(|(p, _)| p.to_string()).collect();
        if let Some(id) = &self.identity {
            if let Err(e) = self
                .app
                .writes
                .instance_subscriptions(&id.instance, &all)
                .await
            {
                tracing::warn!(instance = %id.instance, error = %e, "could not record subscriptions");
            }
            self.app.hub.rollouts.stir();
        }
        // A `topics` target may match now.
        self.deliver_commands().await
    }

    /// `snapshots`, read at log position `head`, as this instance is to run them: a topic in a
    /// progressive rollout whose stages reached do not admit it is its base version (and is
    /// left out when the topic had none).
    async fn staged(
        &mut self,
        head: u64,
        snapshots: Vec<Snapshot>,
    ) -> Result<Vec<Snapshot>, crate::store::StoreError> {
        let Some(id) = &self.identity else {
            return Ok(snapshots);
        };
        if snapshots.is_empty() {
            // The usual resume: nothing to hold back, and no read of the rollouts.
            return Ok(snapshots);
        }
        let (fed, view) = self.app.hub.stagings();
        // The hub's copy is good when it was read after the log reached `head`; otherwise the
        // store's, read now, which is newer than `head` too.
        let view = if fed >= head {
            view
        } else {
            Arc::new(self.app.store.stagings().await?)
        };
        if view.iter().all(|st| !st.state.active()) {
            return Ok(snapshots);
        }
        Ok(snapshots
            .into_iter()
            .filter_map(|s| {
                match view
                    .iter()
                    .find(|st| st.topic == s.topic && st.state.active())
                {
                    Some(st)
                        if s.version > st.base_version && !st.admits(&id.instance, &id.labels) =>
                    {
                        (st.base_version > 0).then(|| st.base_snapshot())
                    }
                    _ => Some(s),
                }
            })
            .collect())
    }

    /// Sends every matching topic's full state, then `subscribed`. Returns the seq it is valid at.
    async fn snapshot(
        &mut self,
        topics: &[String],
        matches: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
        reason: Option<String>,
        epoch: &str,
    ) -> Result<u64, Option<End>> {
        let read = self.app.store.snapshots(matches);
        let metrics = self.app.metrics.clone();
        let (head, snapshots) =
            (metrics.time_store(StoreCall::Snapshots, read).await).map_err(|e| {
                tracing::error!(error = %e, "snapshot read failed");
                None
            })?;
        let snapshots = self.staged(head, snapshots).await.map_err(|e| {
            tracing::error!(error = %e, "rollout read failed");
            None
        })?;
        let sent = snapshots.len() as u64;
        for s in snapshots {
            self.send(&ServerMessage::Snapshot(s)).await.map_err(Some)?;
        }
        metrics.delivered(Delivery::Snapshot, sent);
        metrics.subscribed(match reason {
            Some(_) => SubscribeMode::Resync,
            None => SubscribeMode::Snapshot,
        });
        let done = ServerMessage::Subscribed {
            topics: topics.to_vec(),
            seq: head,
            mode: "snapshot".into(),
            reason,
            epoch: epoch.to_string(),
        };
        self.send(&done).await.map_err(Some)?;
        Ok(head)
    }

    /// Replays the log after `since` for matching topics, or falls back to a snapshot when the log
    /// no longer reaches back that far. `bounds` were read after the patterns joined the subscription index.
    async fn replay(
        &mut self,
        topics: &[String],
        since: u64,
        epoch: Option<&str>,
        bounds: LogBounds,
        matches: &(dyn for<'t> Fn(&'t str) -> bool + Sync),
    ) -> Result<u64, Option<End>> {
        let LogBounds {
            epoch: current,
            head,
            oldest,
        } = bounds;
        let store = self.app.store.clone();
        let fail = |e: crate::store::StoreError| {
            tracing::error!(error = %e, "replay read failed");
            None
        };
        if let Some(theirs) = epoch.filter(|e| *e != current) {
            // A position from another log (wiped, restored, reset): it means nothing here.
            let reason = format!("log epoch changed: since {since} is from epoch {theirs}, the log is now epoch {current}");
            return self.snapshot(topics, matches, Some(reason), &current).await;
        }
        if since > head && epoch.is_none() {
            // A revision-1 client cannot learn an epoch: snapshots, as before, and no new epoch
            // (it would come back with the same position and start one on every reconnect).
            let reason =
                format!("since {since} is ahead of the log head {head} (server data was reset?)");
            return self.snapshot(topics, matches, Some(reason), &current).await;
        }
        if since > head {
            // This instance saw positions the log no longer has: the log lost its head (restored
            // from an older backup). Numbers from here on would repeat ones it saw with other
            // content, so the log starts a new epoch, for every instance.
            let rotated = store.rotate_epoch(&current).await.map_err(fail)?;
            tracing::warn!(since, head, old = %current, new = %rotated, "an instance is ahead of the log (restored from an older backup?): new log epoch");
            // The welcome of this connection named the old epoch: the client learns the new one
            // from the welcome of its next connection, and starts over cleanly there.
            return Err(Some(End::Close(
                close::EPOCH_CHANGED,
                "the log starts a new epoch: reconnect",
            )));
        }
        if since < head && oldest.is_none_or(|o| o > since + 1) {
            let reason = format!(
                "since {since} is older than the log kept (oldest seq {})",
                oldest.unwrap_or(0)
            );
            return self.snapshot(topics, matches, Some(reason), &current).await;
        }
        // Topics this instance never acknowledged get their full state first: a `since` says
        // nothing about a topic the instance never had.
        let instance = self
            .identity
            .as_ref()
            .map(|i| i.instance.clone())
            .unwrap_or_default();
        let acked: HashSet<String> = store
            .acks_of(&instance)
            .await
            .map_err(fail)?
            .into_iter()
            .map(|a| a.topic)
            .collect();
        let unseen = |t: &str| matches(t) && !acked.contains(t);
        let metrics = self.app.metrics.clone();
        let (snapshot_at, snapshots) = (metrics
            .time_store(StoreCall::Snapshots, store.snapshots(&unseen))
            .await)
            .map_err(fail)?;
        let snapshots = self.staged(snapshot_at, snapshots).await.map_err(fail)?;
        let snapshotted: HashSet<String> = snapshots.iter().map(|s| s.topic.clone()).collect();
        let sent = snapshots.len() as u64;
        for s in snapshots {
            self.send(&ServerMessage::Snapshot(s)).await.map_err(Some)?;
        }
        metrics.delivered(Delivery::Snapshot, sent);
        let mut upto = since;
        // Every seq up to the later of the two heads read is committed (seqs commit in order):
        // the replay reads that far, and what comes after is queued in the inbox.
        let end = head.max(snapshot_at);
        while upto < end {
            let read = store.events_after(upto, 512);
            let events = (metrics.time_store(StoreCall::EventsAfter, read).await).map_err(fail)?;
            if events.first().is_none_or(|first| first.seq != upto + 1) {
                // Retention removed events while we were replaying.
                let reason = format!("log trimmed during replay after seq {upto}");
                return self.snapshot(topics, matches, Some(reason), &current).await;
            }
            for e in events {
                upto = e.seq;
                let covered = e.seq <= snapshot_at && snapshotted.contains(&e.topic);
                let admitted = e.audience.as_ref().is_none_or(|a| {
                    self.identity
                        .as_ref()
                        .is_some_and(|id| a.admits(&e.topic, &id.instance, &id.labels))
                });
                if matches(&e.topic) && !covered && admitted {
                    self.write(Message::Text(e.frame.into()))
                        .await
                        .map_err(Some)?;
                    metrics.delivered(Delivery::Replay, 1);
                }
            }
        }
        metrics.subscribed(SubscribeMode::Replay);
        let done = ServerMessage::Subscribed {
            topics: topics.to_vec(),
            seq: upto,
            mode: "replay".into(),
            reason: None,
            epoch: current,
        };
        self.send(&done).await.map_err(Some)?;
        Ok(upto)
    }

    async fn on_ack(
        &mut self,
        topic: String,
        version: u64,
        status: protocol::AckStatus,
        error: Option<String>,
    ) -> Option<End> {
        let Some(id) = &self.identity else {
            return self
                .error(error_code::OUT_OF_ORDER, "send hello first")
                .await;
        };
        let instance = id.instance.clone();
        if !self.grant.may_read(&topic) {
            let message = format!("this credential may not ack topic `{topic}`");
            return self.error(error_code::FORBIDDEN, message).await;
        }
        if topic.chars().any(unprintable) {
            // No topic has such a name, and PostgreSQL refuses a NUL in text outright.
            let message = "topic may not contain control or bidirectional formatting characters";
            return self.error(error_code::UNKNOWN_VERSION, message).await;
        }
        let max = self.app.config.limits.max_ack_error_bytes;
        // A NUL is kept as U+FFFD: PostgreSQL cannot store it in text.
        let error = error.map(|e| protocol::truncate_utf8(&e, max).replace('\0', "\u{fffd}"));
        let record =
            (self.app.writes).record_ack(&instance, &topic, version, status, error.as_deref());
        match self
            .app
            .metrics
            .time_store(StoreCall::RecordAck, record)
            .await
        {
            Ok(Ok(())) => {
                tracing::info!(%instance, %topic, version, status = status.as_str(), "ack recorded");
                self.app.metrics.ack(status, &topic);
                self.app.hub.rollouts.stir();
                self.send(&ServerMessage::AckRecorded { topic, version })
                    .await
                    .err()
            }
            Ok(Err(AckRejection::UnknownTopic)) => {
                self.error(error_code::UNKNOWN_VERSION, format!("no topic `{topic}`"))
                    .await
            }
            Ok(Err(AckRejection::UnknownVersion { current })) => {
                self.error(
                    error_code::UNKNOWN_VERSION,
                    format!("topic `{topic}` has no version {version} (current is {current})"),
                )
                .await
            }
            Err(e) => {
                tracing::error!(%instance, %topic, error = %e, "ack not recorded");
                self.error(error_code::INTERNAL, "ack not recorded; send it again")
                    .await
            }
        }
    }
}

impl Connection {
    /// Sends the active commands that target this instance and were not sent on this connection,
    /// recording each delivery first; a command the instance already acked is not sent again.
    async fn deliver_commands(&mut self) -> Option<End> {
        let (Some(id), Some(rx)) = (&self.identity, &mut self.commands) else {
            return None;
        };
        let active = rx.borrow_and_update().clone();
        let instance = id.instance.clone();
        let subscriptions: Vec<String> = self.filters.iter().map(|(p, _)| p.to_string()).collect();
        let due: Vec<&commands::Dispatched> = {
            let candidate = Candidate {
                instance: &instance,
                app: id.app.as_deref(),
                labels: &id.labels,
                subscriptions: &subscriptions,
            };
            active
                .iter()
                .filter(|d| !self.commands_seen.contains(&d.command.id))
                .filter(|d| d.target.as_ref().is_some_and(|t| t.matches(&candidate)))
                .collect()
        };
        for d in due {
            let c = &d.command;
            let now = crate::store::now_ms();
            if c.deadline_ms <= now {
                continue;
            }
            match self
                .app
                .store
                .command_delivered(&c.id, &instance, now)
                .await
            {
                Ok(true) => {
                    self.commands_seen.insert(c.id.clone());
                    if let Err(end) = self.write(Message::Text(d.frame.clone())).await {
                        return Some(end);
                    }
                    tracing::info!(%instance, command = %c.id, name = %c.name, "command delivered");
                    commands::outcome(&self.app.metrics, &c.id, Outcome::Delivered, 1);
                }
                Ok(false) => {
                    // Acked before (on an earlier connection): nothing to send.
                    self.commands_seen.insert(c.id.clone());
                }
                // Tried again when the active commands change or the instance subscribes.
                Err(e) => {
                    tracing::warn!(%instance, command = %c.id, error = %e, "could not record a command delivery")
                }
            }
        }
        None
    }

    async fn on_command_ack(
        &mut self,
        id: String,
        status: protocol::CommandStatus,
        message: Option<String>,
    ) -> Option<End> {
        let Some(identity) = &self.identity else {
            return self
                .error(error_code::OUT_OF_ORDER, "send hello first")
                .await;
        };
        let instance = identity.instance.clone();
        let max = self.app.config.limits.max_ack_error_bytes;
        let message = message.map(|m| protocol::truncate_utf8(&m, max).to_string());
        let recorded = self
            .app
            .store
            .record_command_ack(
                &id,
                &instance,
                status,
                message.as_deref(),
                crate::store::now_ms(),
            )
            .await;
        match recorded {
            Ok(CommandAckOutcome::Recorded) => {
                tracing::info!(%instance, command = %id, status = status.as_str(), "command ack recorded");
                let what = match status {
                    protocol::CommandStatus::Done => Outcome::Done,
                    protocol::CommandStatus::Failed => Outcome::Failed,
                };
                commands::outcome(&self.app.metrics, &id, what, 1);
                self.send(&ServerMessage::CommandRecorded {
                    id,
                    status,
                    duplicate: false,
                })
                .await
                .err()
            }
            Ok(CommandAckOutcome::AlreadyFinished(first)) => self
                .send(&ServerMessage::CommandRecorded {
                    id,
                    status: first,
                    duplicate: true,
                })
                .await
                .err(),
            Ok(CommandAckOutcome::NotDelivered) => {
                let shown = protocol::truncate_utf8(&id, 100);
                self.error(
                    error_code::FORBIDDEN,
                    format!("no command `{shown}` was delivered to instance `{instance}`"),
                )
                .await
            }
            Err(e) => {
                tracing::error!(%instance, command = %id, error = %e, "command ack not recorded");
                self.error(
                    error_code::INTERNAL,
                    "command ack not recorded; send it again",
                )
                .await
            }
        }
    }
}

/// Waits for the active commands to change; pending forever before the `hello`.
async fn next_commands(
    rx: &mut Option<tokio::sync::watch::Receiver<Arc<Vec<commands::Dispatched>>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn recv_live(live: &mut Option<mpsc::Receiver<Arc<Frame>>>) -> Option<Arc<Frame>> {
    match live {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// When a token with `exp` (seconds since the epoch, leeway included) stops being accepted: from
/// the start of the second after it, as the check is `exp < now` in whole seconds.
fn refused_from(exp: u64) -> tokio::time::Instant {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(exp.saturating_add(1));
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    tokio::time::Instant::now() + left
}

/// Characters an id or label may not hold: control characters, and the bidirectional formatting
/// characters that make a name display as another (`U+202E` and friends).
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Checks a `hello` against `[limits]`: what the store keeps per instance stays bounded.
fn check_hello(
    limits: &crate::config::LimitsConfig,
    instance: &str,
    app: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    if instance.is_empty() || instance.len() > limits.max_instance_id_bytes {
        return Err(format!(
            "instance must be 1 to {} bytes (limits.max_instance_id_bytes)",
            limits.max_instance_id_bytes
        ));
    }
    if instance.chars().any(unprintable) {
        return Err(
            "instance may not contain control or bidirectional formatting characters".into(),
        );
    }
    if app.is_some_and(|a| a.len() > limits.max_label_bytes || a.chars().any(unprintable)) {
        return Err(format!(
            "app must be at most {} bytes of printable characters (limits.max_label_bytes)",
            limits.max_label_bytes
        ));
    }
    if labels.len() > limits.max_labels {
        return Err(format!(
            "at most {} labels (limits.max_labels)",
            limits.max_labels
        ));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > limits.max_label_bytes
            || v.len() > limits.max_label_bytes
            || k.chars().chain(v.chars()).any(unprintable)
        {
            return Err(format!(
                "label keys (non-empty) and values must be at most {} bytes of printable characters (limits.max_label_bytes)",
                limits.max_label_bytes
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_checks_bound_what_an_instance_stores() {
        let limits = crate::config::LimitsConfig::default();
        let ok = BTreeMap::from([("zone".to_string(), "eu-1".to_string())]);
        assert!(check_hello(&limits, "web-1", Some("web"), &ok).is_ok());
        assert!(check_hello(&limits, "", None, &ok).is_err());
        assert!(check_hello(&limits, &"x".repeat(201), None, &ok).is_err());
        assert!(check_hello(&limits, "web\u{202e}1", None, &ok).is_err());
        assert!(check_hello(&limits, "web\n1", None, &ok).is_err());
        assert!(check_hello(&limits, "web-1", Some(&"a".repeat(257)), &ok).is_err());
        let many: BTreeMap<String, String> = (0..33)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(check_hello(&limits, "web-1", None, &many).is_err());
        let long = BTreeMap::from([("k".to_string(), "v".repeat(257))]);
        assert!(check_hello(&limits, "web-1", None, &long).is_err());
        let empty_key = BTreeMap::from([(String::new(), "v".to_string())]);
        assert!(check_hello(&limits, "web-1", None, &empty_key).is_err());
    }
}
