//! A fleet of simulated instances for the benchmarks: each one a WebSocket of its own that speaks
//! just enough of the protocol (hello, subscribe with `since` and epoch, ack, reconnect), and
//! records when each version reached it. Light on purpose: the load generator shares the machine
//! with the server, so every byte and cycle it spends is one the server does not get.
//!
//! Client sockets are spread over source addresses 127.0.1.1 to 127.0.254.254 (instance i gets
//! one of its own up to 64,516 instances): one source address has about 28,000 ephemeral ports,
//! so 50,000 connections to one server port need two or more, and with many connections (or the
//! TIME_WAIT sockets of a previous run) on one address, finding a free port at each bind costs the
//! kernel more CPU than the server spends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::BenchError;

/// What the instances speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// The confcast protocol: hello, subscribe (resuming with `since`), and an ack of each
    /// version while [`FleetState::acking`] is set.
    Confcast,
    /// Nothing: the raw broadcaster just sends.
    Nothing,
}

/// When each version reached the instances.
#[derive(Default)]
pub struct Arrivals {
    /// Instances that have the version.
    pub count: AtomicUsize,
    /// Latest arrival, in ns since the fleet's start.
    pub last_ns: AtomicU64,
}

/// Shared by the fleet's instances and whoever measures them.
pub struct FleetState {
    pub started: Instant,
    /// Instances in the fleet.
    pub size: usize,
    /// Whether instances ack what they receive.
    pub acking: AtomicBool,
    /// Index: version.
    pub versions: Vec<Arrivals>,
    /// Sessions that got `subscribed` (or, for a raw broadcast, that connected).
    pub subscribed: AtomicUsize,
    /// Of those, answered with a replay rather than a snapshot.
    pub resumed: AtomicUsize,
    pub connected: AtomicUsize,
    /// A version that was not the one after the instance's last (a skipped version).
    pub gaps: AtomicUsize,
    /// Connections that ended, for any reason.
    pub dropped: AtomicUsize,
    /// Acks answered `ack_recorded`.
    pub acks_recorded: AtomicUsize,
    /// Ns since start of the last ack sent.
    pub last_ack_ns: AtomicU64,
    /// Ns since start of the last `ack_recorded` received (the server stored that ack).
    pub last_recorded_ns: AtomicU64,
    /// Error frames received.
    pub errors: AtomicUsize,
    /// Stirred on every event counted above.
    pub stirred: Notify,
}

impl FleetState {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn arrived(&self, version: u64) {
        if let Some(a) = usize::try_from(version)
            .ok()
            .and_then(|v| self.versions.get(v))
        {
            a.last_ns.fetch_max(self.now_ns(), Ordering::Relaxed);
            a.count.fetch_add(1, Ordering::AcqRel);
            self.stirred.notify_waiters();
        }
    }

    /// Instances holding `version`.
    pub fn holding(&self, version: u64) -> usize {
        usize::try_from(version)
            .ok()
            .and_then(|v| self.versions.get(v))
            .map_or(0, |a| a.count.load(Ordering::Acquire))
    }

    /// When the last instance got `version`.
    pub fn last_arrival(&self, version: u64) -> Option<Instant> {
        let a = self.versions.get(usize::try_from(version).ok()?)?;
        Some(self.started + Duration::from_nanos(a.last_ns.load(Ordering::Acquire)))
    }

    /// Waits until every instance holds `version`; `label` names the step in the error.
    pub async fn all_hold(
        &self,
        version: u64,
        limit: Duration,
        label: &str,
    ) -> Result<(), BenchError> {
        let n = self.size;
        self.wait(
            limit,
            || {
                format!(
                    "{label}: version {version} at {} of {n}",
                    self.holding(version)
                )
            },
            || self.holding(version) >= n,
        )
        .await
    }

    /// Waits until `done()` holds, or fails after `limit` naming `what`.
    pub async fn wait(
        &self,
        limit: Duration,
        what: impl Fn() -> String,
        done: impl Fn() -> bool,
    ) -> Result<(), BenchError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let stirred = self.stirred.notified();
            if done() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BenchError::Stalled(what()));
            }
            // Polled as well: a notification between the check and the wait is not lost for long.
            let _ = tokio::time::timeout(Duration::from_millis(5), stirred).await;
        }
    }
}

/// The simulated instances.
pub struct Fleet {
    pub state: Arc<FleetState>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

/// How to reach the server.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Path of the WebSocket endpoint (`/ws`).
    pub path: String,
    pub speaks: Speaks,
}

impl Fleet {
    /// Starts `n` instances against `target`, at most `parallel` handshakes at a time, and waits
    /// until every one is subscribed (or `limit` passed). `versions` is the highest version any
    /// change will carry.
    pub async fn connect(
        target: Target,
        n: usize,
        versions: u64,
        parallel: usize,
        limit: Duration,
    ) -> Result<Fleet, BenchError> {
        let state = Arc::new(FleetState {
            started: Instant::now(),
            size: n,
            acking: AtomicBool::new(false),
            versions: (0..=versions).map(|_| Arrivals::default()).collect(),
            subscribed: AtomicUsize::new(0),
            resumed: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            gaps: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            acks_recorded: AtomicUsize::new(0),
            last_ack_ns: AtomicU64::new(0),
            last_recorded_ns: AtomicU64::new(0),
            errors: AtomicUsize::new(0),
            stirred: Notify::new(),
        });
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let source = Ipv4Addr::new(
                127,
                0,
                u8::try_from(1 + (i / 254) % 254).unwrap_or(1),
                u8::try_from(1 + i % 254).unwrap_or(1),
            );
            let instance = Instance {
                id: format!("bench-{i:06}"),
                source: IpAddr::V4(source),
                target: target.clone(),
                state: state.clone(),
                stop: stop.clone(),
                gate: gate.clone(),
                last_seq: None,
                epoch: None,
                version: 0,
            };
            tasks.spawn(instance.run());
        }
        let fleet = Fleet { state, stop, tasks };
        let s = &fleet.state;
        s.wait(
            limit,
            || {
                format!(
                    "{} of {n} instances subscribed after {} s",
                    s.subscribed.load(Ordering::Acquire),
                    limit.as_secs()
                )
            },
            || s.subscribed.load(Ordering::Acquire) >= n,
        )
        .await?;
        Ok(fleet)
    }

    /// Closes every instance.
    pub async fn close(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Instance {
    id: String,
    source: IpAddr,
    target: Target,
    state: Arc<FleetState>,
    stop: CancellationToken,
    /// Bounds handshakes in flight, as a real fleet's spread-out starts would.
    gate: Arc<Semaphore>,
    last_seq: Option<u64>,
    epoch: Option<String>,
    version: u64,
}

/// The fields of a server message the fleet looks at.
#[derive(serde::Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    seq: Option<u64>,
    version: Option<u64>,
    mode: Option<&'a str>,
    epoch: Option<String>,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

impl Instance {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(50);
        while !self.stop.is_cancelled() {
            let socket = {
                let gate = self.gate.clone();
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                self.open().await
            };
            match socket {
                Ok(socket) => {
                    backoff = Duration::from_millis(50);
                    self.state.connected.fetch_add(1, Ordering::AcqRel);
                    self.session(socket).await;
                    self.state.dropped.fetch_add(1, Ordering::AcqRel);
                }
                Err(_) => {
                    // Jittered, growing: a restarted server is not hit by all of them at once.
                    let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 + 1);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn open(&mut self) -> Result<Socket, BenchError> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.source, 0))?;
        let stream = socket.connect(self.target.addr).await?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{}{}", self.target.addr, self.target.path);
        // Small buffers: the default 128 KiB read buffer per socket would be 6 GiB for 50,000.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut socket, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|e| BenchError::Stalled(format!("handshake: {e}")))?;
        if self.target.speaks == Speaks::Confcast {
            let hello = format!(r#"{{"type":"hello","instance":"{}"}}"#, self.id);
            socket
                .send(Message::text(hello))
                .await
                .map_err(|e| BenchError::Stalled(format!("hello: {e}")))?;
            // The welcome carries the epoch to resume in.
            loop {
                let Some(Ok(message)) = socket.next().await else {
                    return Err(BenchError::Stalled("closed before welcome".into()));
                };
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(peek) = serde_json::from_str::<Peek>(&text) else {
                    continue;
                };
                if peek.kind == "welcome" {
                    if self.epoch != peek.epoch {
                        self.last_seq = None;
                        self.epoch = peek.epoch;
                    }
                    break;
                }
            }
            let subscribe = match (self.last_seq, &self.epoch) {
                (Some(since), Some(epoch)) => format!(
                    r#"{{"type":"subscribe","topics":["payments"],"since":{since},"epoch":"{epoch}"}}"#
                ),
                _ => r#"{"type":"subscribe","topics":["payments"]}"#.to_string(),
            };
            socket
                .send(Message::text(subscribe))
                .await
                .map_err(|e| BenchError::Stalled(format!("subscribe: {e}")))?;
        } else {
            self.state.subscribed.fetch_add(1, Ordering::AcqRel);
            self.state.stirred.notify_waiters();
        }
        Ok(socket)
    }

    async fn session(&mut self, mut socket: Socket) {
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => {
                    let _ = socket.close(None).await;
                    return;
                }
                m = socket.next() => m,
            };
            let text = match message {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            };
            let Ok(peek) = serde_json::from_str::<Peek>(&text) else {
                continue;
            };
            match peek.kind {
                "change" | "snapshot" => {
                    let version = peek.version.unwrap_or(0);
                    if peek.kind == "change" && self.version != 0 && version != self.version + 1 {
                        self.state.gaps.fetch_add(1, Ordering::AcqRel);
                    }
                    self.version = version;
                    if let Some(seq) = peek.seq.filter(|_| peek.kind == "change") {
                        self.last_seq = Some(seq);
                    }
                    self.state.arrived(version);
                    if self.state.acking.load(Ordering::Acquire) {
                        let frame = format!(
                            r#"{{"type":"ack","topic":"payments","version":{version},"status":"applied"}}"#
                        );
                        if socket.send(Message::text(frame)).await.is_err() {
                            return;
                        }
                        self.state
                            .last_ack_ns
                            .fetch_max(self.state.now_ns(), Ordering::Relaxed);
                    }
                }
                "subscribed" => {
                    if let Some(seq) = peek.seq {
                        self.last_seq = Some(seq);
                    }
                    if peek.mode == Some("replay") {
                        self.state.resumed.fetch_add(1, Ordering::AcqRel);
                    }
                    self.state.subscribed.fetch_add(1, Ordering::AcqRel);
                    self.state.stirred.notify_waiters();
                }
                "ack_recorded" => {
                    self.state
                        .last_recorded_ns
                        .fetch_max(self.state.now_ns(), Ordering::Relaxed);
                    self.state.acks_recorded.fetch_add(1, Ordering::AcqRel);
                    self.state.stirred.notify_waiters();
                }
                "error" => {
                    self.state.errors.fetch_add(1, Ordering::AcqRel);
                }
                _ => {}
            }
        }
    }
}
