//! [`Client`]: the resilient consumer an application embeds. It keeps one connection to one of
//! several servers, reconnects with capped exponential backoff and jitter, resumes from the last
//! acknowledged log position, drops versions already handled, and never loses an ack (acks made
//! while disconnected are sent after the next hello).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;

use super::state::{Files, LocalState, StateError, Taken};
use super::{Identity, Session};
use crate::protocol::{AckStatus, Change, CommandStatus, ServerMessage, Snapshot};

/// How to reach confcast and what to receive.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Server URLs (`ws://host:port/ws`), tried in turn when one is down.
    pub urls: Vec<String>,
    pub identity: Identity,
    /// Topic patterns: `payments`, `billing/*`, `*`.
    pub topics: Vec<String>,
    /// Sent as `Authorization: Bearer <token>` when the server requires one.
    pub token: Option<String>,
    /// First reconnect delay; doubles per failed round, up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Keeps the resume position and the last applied files across restarts.
    pub state_dir: Option<PathBuf>,
    /// Largest server message accepted; default [`super::DEFAULT_MAX_FRAME_BYTES`] (64 MiB). Must be
    /// at least the server's largest frame (`max_frame_bytes` in CONFIGURATION.md section 12), or
    /// the client drops the connection on the largest changes and snapshots and never gets them.
    pub max_frame_bytes: usize,
}

impl ClientOptions {
    pub fn new(
        url: impl Into<String>,
        instance: impl Into<String>,
        topics: &[&str],
    ) -> ClientOptions {
        ClientOptions {
            urls: vec![url.into()],
            identity: Identity {
                instance: instance.into(),
                ..Identity::default()
            },
            topics: topics.iter().map(|t| t.to_string()).collect(),
            token: None,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            state_dir: None,
            max_frame_bytes: super::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Whether an update is a full state or a step.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateKind {
    Snapshot(Snapshot),
    Change(Change),
}

/// A new version of a topic for the application to apply and then acknowledge.
#[derive(Debug, Clone)]
pub struct Update {
    pub topic: String,
    pub version: u64,
    pub commit: String,
    /// The topic's complete files at this version (decoded), whatever the kind.
    pub files: Files,
    pub kind: UpdateKind,
}

/// What [`Client::next`] yields.
#[derive(Debug, Clone)]
pub enum Delivery {
    Update(Update),
    /// Something to do now (protocol revision 3). Ack it with [`Client::ack_command`]; each `id`
    /// is delivered once per `Client`, however often the server sends it.
    Command {
        id: String,
        name: String,
        args: serde_json::Value,
        /// When the server stops delivering it (ms since the Unix epoch), if it said.
        deadline_ms: Option<i64>,
    },
    /// Connected (or reconnected) to `url`.
    Connected {
        url: String,
    },
    /// The connection was lost; the client is reconnecting.
    Disconnected {
        reason: String,
    },
}

struct Ack {
    topic: String,
    version: u64,
    status: AckStatus,
    error: Option<String>,
}

#[derive(Clone)]
struct CommandAck {
    id: String,
    status: CommandStatus,
    message: Option<String>,
}

/// Commands this client has seen, newest [`COMMANDS_REMEMBERED`]: a command the server sends
/// again (after a reconnect, until it has the ack) is not handed to the application twice, and
/// one already acked gets its ack again instead.
#[derive(Default)]
struct CommandMemory {
    /// id -> the application's ack, once it gave one
    seen: HashMap<String, Option<CommandAck>>,
    order: VecDeque<String>,
}

const COMMANDS_REMEMBERED: usize = 1024;

impl CommandMemory {
    fn remember(&mut self, id: &str, ack: Option<CommandAck>) {
        if self.seen.insert(id.to_string(), ack).is_none() {
            self.order.push_back(id.to_string());
            while self.order.len() > COMMANDS_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }
}

/// The embeddable, reconnecting client. Dropping it stops its background task.
pub struct Client {
    deliveries: mpsc::Receiver<Delivery>,
    acks: mpsc::UnboundedSender<Ack>,
    command_acks: mpsc::UnboundedSender<CommandAck>,
    state: Arc<Mutex<LocalState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Loads the state directory (if any) and starts connecting in the background.
    pub fn start(options: ClientOptions) -> Result<Client, StateError> {
        let state = Arc::new(Mutex::new(LocalState::open(options.state_dir.as_deref())?));
        let (tx, deliveries) = mpsc::channel(64);
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (command_acks, command_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(options, state.clone(), tx, ack_rx, command_rx));
        Ok(Client {
            deliveries,
            acks,
            command_acks,
            state,
            task,
        })
    }

    /// The next delivery; `None` only if the background task ended.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }

    /// Reports what this instance did with `version` of `topic`. Recorded locally at once (the
    /// resume position moves past it) and sent to the server as soon as it is connected.
    pub fn ack(
        &self,
        topic: &str,
        version: u64,
        status: AckStatus,
        error: Option<String>,
    ) -> Result<(), StateError> {
        // The server keeps 4 KiB of it and refuses messages over 64 KiB: a longer text would be
        // refused again after every reconnect, with the verdict re-sent each time.
        let error =
            error.map(|e| crate::protocol::truncate_utf8(&e, MAX_ACK_ERROR_BYTES).to_string());
        if let Ok(mut state) = self.state.lock() {
            state.acknowledge(
                topic,
                version,
                status == AckStatus::Applied,
                error.as_deref(),
            )?;
        }
        let _ = self.acks.send(Ack {
            topic: topic.to_string(),
            version,
            status,
            error,
        });
        Ok(())
    }

    /// Reports what this instance did with the command `id` ([`Delivery::Command`]): `Done`, or
    /// `Failed` with a message (cut to 4 KiB). Sent as soon as the client is connected, again
    /// after a reconnect if the server sends the command again. Kept in memory only: after a
    /// restart of the process, a command still within its deadline comes again.
    pub fn ack_command(&self, id: &str, status: CommandStatus, message: Option<String>) {
        let message =
            message.map(|m| crate::protocol::truncate_utf8(&m, MAX_ACK_ERROR_BYTES).to_string());
        let _ = self.command_acks.send(CommandAck {
            id: id.to_string(),
            status,
            message,
        });
    }

    /// The last applied files per topic (from the state directory after a restart), to start on
    /// while the server is unreachable.
    pub fn last_good(&self) -> std::collections::BTreeMap<String, (u64, Files)> {
        self.state.lock().map(|s| s.last_good()).unwrap_or_default()
    }

    /// The log position everything up to which was acknowledged.
    pub fn cursor(&self) -> Option<u64> {
        self.state.lock().ok().and_then(|s| s.cursor())
    }
}

/// Jittered exponential backoff: the n-th wait is uniform in [d/2, d] with d = initial * 2^n, capped.
fn backoff(options: &ClientOptions, round: u32) -> Duration {
    let base = options.backoff_initial.max(Duration::from_millis(1));
    let d = base
        .saturating_mul(2u32.saturating_pow(round.min(20)))
        .min(options.backoff_max.max(base));
    let half = d / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

async fn run(
    options: ClientOptions,
    state: Arc<Mutex<LocalState>>,
    tx: mpsc::Sender<Delivery>,
    mut acks: mpsc::UnboundedReceiver<Ack>,
    mut command_acks: mpsc::UnboundedReceiver<CommandAck>,
) {
    let mut unsent: VecDeque<Ack> = VecDeque::new();
    let mut commands = Commands {
        acks: &mut command_acks,
        memory: CommandMemory::default(),
        unsent: VecDeque::new(),
    };
    let mut round = 0u32;
    let mut next_url = 0usize;
    let mut fresh = false;
    let mut last_failure: Option<String> = None;
    loop {
        let mut session = None;
        for _ in 0..options.urls.len().max(1) {
            let Some(url) = options.urls.get(next_url % options.urls.len().max(1)) else {
                return;
            };
            next_url += 1;
            let connecting = Session::connect_with_limit(
                url,
                &options.identity,
                options.token.as_deref(),
                options.max_frame_bytes,
            );
            match connecting.await {
                Ok(s) => {
                    session = Some((url.clone(), s));
                    break;
                }
                // A refused credential or hello repeats until someone fixes it: say so once,
                // loudly, and then only when the reason changes.
                Err(e) => {
                    let error = e.to_string();
                    if last_failure.as_deref() == Some(error.as_str()) {
                        tracing::debug!(%url, %error, "connect failed");
                    } else {
                        tracing::warn!(%url, %error, "connect failed; retrying with backoff");
                        last_failure = Some(error);
                    }
                }
            }
        }
        let Some((url, mut session)) = session else {
            tokio::time::sleep(backoff(&options, round)).await;
            round = round.saturating_add(1);
            continue;
        };
        round = 0;
        last_failure = None;
        if tx
            .send(Delivery::Connected { url: url.clone() })
            .await
            .is_err()
        {
            return;
        }
        // A state from another log epoch starts over: no position, no versions, no old verdicts.
        let restarted = match state.lock() {
            Ok(mut st) => st.adopt_epoch(session.server_epoch()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not persist the new log epoch");
                true
            }),
            Err(_) => return,
        };
        if restarted {
            unsent.clear();
            fresh = true;
        }
        let since = if fresh {
            None
        } else {
            state.lock().ok().and_then(|s| s.cursor())
        };
        fresh = false;
        let reason = serve(
            &mut session,
            &options,
            since,
            &state,
            &tx,
            &mut TopicAcks {
                acks: &mut acks,
                unsent: &mut unsent,
            },
            &mut commands,
        )
        .await;
        match reason {
            Ended::ClientDropped => return,
            Ended::Gap(why) => {
                tracing::warn!(%why, "version gap; resubscribing for a snapshot");
                fresh = true;
                let _ = tx.send(Delivery::Disconnected { reason: why }).await;
            }
            Ended::Replaced(why) => {
                // Two processes share an instance id: don't fight over it at full speed.
                tracing::warn!(%url, reason = %why, instance = %options.identity.instance,
                    "replaced by another connection with the same instance id; backing off");
                if tx
                    .send(Delivery::Disconnected { reason: why })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(options.backoff_max).await;
            }
            Ended::Lost(why) => {
                tracing::info!(%url, reason = %why, "disconnected; reconnecting");
                if tx
                    .send(Delivery::Disconnected { reason: why })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff(&options, 0)).await;
            }
        }
        session.close().await;
    }
}

/// Topic acks from the application, and those not sent yet (the connection was down).
struct TopicAcks<'a> {
    acks: &'a mut mpsc::UnboundedReceiver<Ack>,
    unsent: &'a mut VecDeque<Ack>,
}

/// The command side of the background task: acks from the application, what was seen, and acks
/// not sent yet (the connection was down).
struct Commands<'a> {
    acks: &'a mut mpsc::UnboundedReceiver<CommandAck>,
    memory: CommandMemory,
    unsent: VecDeque<CommandAck>,
}

enum Ended {
    ClientDropped,
    /// Another connection with the same instance id took over.
    Replaced(String),
    Lost(String),
    Gap(String),
}

async fn serve(
    session: &mut Session,
    options: &ClientOptions,
    since: Option<u64>,
    state: &Arc<Mutex<LocalState>>,
    tx: &mpsc::Sender<Delivery>,
    topic_acks: &mut TopicAcks<'_>,
    commands: &mut Commands<'_>,
) -> Ended {
    let TopicAcks { acks, unsent } = topic_acks;
    // The latest verdict per topic from the local state first (an ack made just before the
    // process stopped may never have left it), then acks made while disconnected.
    let recorded = state.lock().map(|s| s.latest_acks()).unwrap_or_default();
    for (topic, version, applied, error) in recorded {
        let status = if applied {
            AckStatus::Applied
        } else {
            AckStatus::Failed
        };
        if let Err(e) = session.ack(&topic, version, status, error).await {
            return Ended::Lost(e.to_string());
        }
    }
    while let Some(ack) = unsent.pop_front() {
        if let Err(e) = session
            .ack(&ack.topic, ack.version, ack.status, ack.error.clone())
            .await
        {
            unsent.push_front(ack);
            return Ended::Lost(e.to_string());
        }
    }
    while let Some(ack) = commands.unsent.pop_front() {
        if let Err(e) = session
            .ack_command(&ack.id, ack.status, ack.message.clone())
            .await
        {
            commands.unsent.push_front(ack);
            return Ended::Lost(e.to_string());
        }
    }
    let epoch = state
        .lock()
        .ok()
        .and_then(|s| s.epoch().map(str::to_string));
    if let Err(e) = session.subscribe_from(&options.topics, since, epoch).await {
        return Ended::Lost(e.to_string());
    }
    // Three missed pings and the server is presumed gone.
    let silence = session.heartbeat() * 3;
    loop {
        tokio::select! {
            ack = acks.recv() => {
                let Some(ack) = ack else { return Ended::ClientDropped };
                if let Err(e) = session.ack(&ack.topic, ack.version, ack.status, ack.error.clone()).await {
                    unsent.push_back(ack);
                    return Ended::Lost(e.to_string());
                }
            }
            ack = commands.acks.recv() => {
                let Some(ack) = ack else { return Ended::ClientDropped };
                commands.memory.remember(&ack.id, Some(ack.clone()));
                if let Err(e) = session.ack_command(&ack.id, ack.status, ack.message.clone()).await {
                    commands.unsent.push_back(ack);
                    return Ended::Lost(e.to_string());
                }
            }
            frame = tokio::time::timeout(silence, session.next_frame()) => {
                let frame = match frame {
                    Err(_) => return Ended::Lost(format!("no frame from the server for {silence:?}")),
                    Ok(Err(super::ClientError::Closed { code: crate::protocol::close::REPLACED, reason })) => {
                        return Ended::Replaced(reason);
                    }
                    Ok(Err(e)) => return Ended::Lost(e.to_string()),
                    Ok(Ok(None)) => continue,
                    Ok(Ok(Some(frame))) => frame,
                };
                let delivery = {
                    let Ok(mut st) = state.lock() else { return Ended::ClientDropped };
                    match frame {
                        ServerMessage::Snapshot(s) => match st.take_snapshot(&s) {
                            Taken::Deliver(files) => Some(Delivery::Update(Update {
                                topic: s.topic.clone(), version: s.version, commit: s.commit.clone(), files, kind: UpdateKind::Snapshot(s),
                            })),
                            _ => None,
                        },
                        ServerMessage::Change(c) => match st.take_change(&c) {
                            Taken::Deliver(files) => Some(Delivery::Update(Update {
                                topic: c.topic.clone(), version: c.version, commit: c.commit.clone(), files, kind: UpdateKind::Change(c),
                            })),
                            Taken::Duplicate => None,
                            Taken::Gap { have, previous } => {
                                return Ended::Gap(format!("topic {} holds v{have} but the change follows v{previous}", c.topic));
                            }
                        },
                        ServerMessage::Subscribed { seq, .. } => {
                            if let Err(e) = st.subscribed(seq) {
                                tracing::warn!(error = %e, "could not persist the resume position");
                            }
                            None
                        }
                        // Not a log position (revision 3): `seq` is always 0 and ignored.
                        ServerMessage::Command { id, name, args, deadline_ms, .. } => {
                            match commands.memory.seen.get(&id) {
                                // The server did not get our ack (sent on a connection that
                                // was lost): send it again, the server keeps the first verdict.
                                Some(Some(ack)) => {
                                    commands.unsent.push_back(ack.clone());
                                    None
                                }
                                // The application has it and has not acked yet.
                                Some(None) => None,
                                None => {
                                    commands.memory.remember(&id, None);
                                    Some(Delivery::Command { id, name, args, deadline_ms })
                                }
                            }
                        }
                        ServerMessage::Error { code, message } => {
                            tracing::warn!(%code, %message, "server error frame");
                            None
                        }
                        _ => None,
                    }
                };
                if let Some(d) = delivery {
                    if tx.send(d).await.is_err() {
                        return Ended::ClientDropped;
                    }
                }
                while let Some(ack) = commands.unsent.pop_front() {
                    if let Err(e) = session.ack_command(&ack.id, ack.status, ack.message.clone()).await {
                        commands.unsent.push_front(ack);
                        return Ended::Lost(e.to_string());
                    }
                }
            }
        }
    }
}

/// The longest ack error text sent (the server's default `limits.max_ack_error_bytes`).
const MAX_ACK_ERROR_BYTES: usize = 4096;
