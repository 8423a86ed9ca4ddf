//! Storms against the real `confcast serve` binary, measured and printed (issue 13): many real
//! WebSocket instances acking one version at once, and resuming with `since` after a restart.
//!
//! Ignored by default: they hold tens of thousands of sockets (the test and the server each need
//! an open-file limit above the instance count) and take minutes of CPU. Run them one at a time,
//! in a release build, with the number of instances in `CONFCAST_STORM_INSTANCES` (default 10,000):
//!
//! ```sh
//! ulimit -n 200000
//! CONFCAST_STORM_INSTANCES=50000 cargo test --release --test storm -- --ignored --nocapture --test-threads=1
//! ```
//!
//! The server runs with the default heartbeat (15 s) and keepalive (45 s) over SQLite, logging at
//! `info` as in production. The instances are raw WebSocket clients written from PROTOCOL.md (4 KiB
//! read buffers, so 50,000 of them fit in memory), spread over four loopback source addresses
//! (one address has fewer ephemeral ports than 50,000 connections need). This side holds at most
//! `HANDSHAKES` TCP connects and WebSocket handshakes in flight, and reconnects with the
//! `Client`'s backoff (200 ms doubling, each wait uniform in its upper half).
//!
//! What is asserted is what must hold whatever the machine: every ack recorded and shown in the
//! rollout; every instance resumed by replay with exactly the change it missed. The times are
//! printed, not asserted: the machine is shared.

mod util;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confcast::protocol::{AckStatus, ClientMessage, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use util::{config_repo, ServerProcess, SECRET};

/// TCP connects and WebSocket handshakes this side has in flight at most.
const HANDSHAKES: usize = 512;
/// How long a phase of a storm may take before the test gives up.
const PHASE: Duration = Duration::from_secs(120);

fn instances() -> usize {
    std::env::var("CONFCAST_STORM_INSTANCES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// The default `[server]` timings, unlike `ServerProcess::start`'s 1 s heartbeat: 50,000 pings a
/// second would be a storm of its own.
async fn start_server(dir: &std::path::Path, repo_url: &str) -> ServerProcess {
    ServerProcess::start_config(dir, |port, data_dir| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\n[[repos]]\nname = \"cfg\"\nurl = \"{repo_url}\"\nsecret = \"{SECRET}\"\n",
            data_dir.display()
        )
    })
    .await
}

/// What the instances saw, counted across all of them.
struct Fleet {
    started: Instant,
    subscribed: AtomicUsize,
    replayed: AtomicUsize,
    changes: AtomicUsize,
    snapshots: AtomicUsize,
    acks_recorded: AtomicUsize,
    /// Nanoseconds after `started`.
    first_ack_sent: AtomicU64,
    last_ack_sent: AtomicU64,
    last_ack_recorded: AtomicU64,
    last_replayed: AtomicU64,
    connects: AtomicUsize,
    connect_failures: AtomicUsize,
    errors: Mutex<Vec<String>>,
    handshakes: Semaphore,
}

impl Fleet {
    fn new() -> Arc<Fleet> {
        Arc::new(Fleet {
            started: Instant::now(),
            subscribed: AtomicUsize::new(0),
            replayed: AtomicUsize::new(0),
            changes: AtomicUsize::new(0),
            snapshots: AtomicUsize::new(0),
            acks_recorded: AtomicUsize::new(0),
            first_ack_sent: AtomicU64::new(u64::MAX),
            last_ack_sent: AtomicU64::new(0),
            last_ack_recorded: AtomicU64::new(0),
            last_replayed: AtomicU64::new(0),
            connects: AtomicUsize::new(0),
            connect_failures: AtomicUsize::new(0),
            errors: Mutex::new(Vec::new()),
            handshakes: Semaphore::new(HANDSHAKES),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn at(&self, nanos: &AtomicU64) -> Instant {
        self.started + Duration::from_nanos(nanos.load(Ordering::SeqCst))
    }

    fn error(&self, what: String) {
        let mut errors = self.errors.lock().expect("errors");
        if errors.len() < 20 {
            errors.push(what);
        }
    }

    async fn until(&self, what: &str, counter: &AtomicUsize, n: usize) {
        let reached = tokio::time::timeout(PHASE, async {
            while counter.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if reached.is_err() {
            panic!(
                "{what}: {} of {n} after {PHASE:?}; errors: {:?}",
                counter.load(Ordering::SeqCst),
                self.errors.lock().expect("errors")
            );
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(port: u16, n: usize) -> Result<Ws, String> {
    // Four source addresses, each with its own ephemeral ports.
    let source = Ipv4Addr::new(127, 0, 0, 1 + u8::try_from(n % 4).unwrap_or(0));
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| e.to_string())?;
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let url = format!("ws://127.0.0.1:{port}/ws");
    tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

fn text(message: &ClientMessage) -> Message {
    Message::Text(serde_json::to_string(message).expect("encode").into())
}

/// One instance: connects, says hello, subscribes to `payments` (from its last position once it
/// has one), acks when told (or, with `applies`, every version it receives, as an agent does),
/// and reconnects with backoff whenever the connection is lost, until its order channel closes.
async fn instance(
    n: usize,
    port: u16,
    fleet: Arc<Fleet>,
    applies: bool,
    mut acks: mpsc::UnboundedReceiver<u64>,
) {
    let name = format!("i-{n}");
    let mut position: Option<(u64, String)> = None;
    let mut round = 0u32;
    loop {
        let connected = {
            let _permit = fleet.handshakes.acquire().await.expect("semaphore");
            connect(port, n).await
        };
        let mut ws = match connected {
            Ok(ws) => ws,
            Err(_) => {
                fleet.connect_failures.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(backoff(round)).await;
                round = round.saturating_add(1);
                continue;
            }
        };
        round = 0;
        fleet.connects.fetch_add(1, Ordering::SeqCst);
        let hello = ClientMessage::Hello {
            instance: name.clone(),
            app: Some("storm".into()),
            labels: Default::default(),
            heartbeat: false,
        };
        let subscribe = ClientMessage::Subscribe {
            topics: vec!["payments".into()],
            since: position.as_ref().map(|(seq, _)| *seq),
            epoch: position.as_ref().map(|(_, epoch)| epoch.clone()),
        };
        if ws.send(text(&hello)).await.is_err() || ws.send(text(&subscribe)).await.is_err() {
            tokio::time::sleep(backoff(0)).await;
            continue;
        }
        let mut received = None;
        loop {
            if let Some(version) = received.take() {
                let ack = ClientMessage::Ack {
                    topic: "payments".into(),
                    version,
                    status: AckStatus::Applied,
                    error: None,
                };
                if ws.send(text(&ack)).await.is_err() {
                    break;
                }
            }
            tokio::select! {
                order = acks.recv() => {
                    let Some(version) = order else { return };
                    let ack = ClientMessage::Ack {
                        topic: "payments".into(),
                        version,
                        status: AckStatus::Applied,
                        error: None,
                    };
                    if ws.send(text(&ack)).await.is_err() {
                        fleet.error(format!("{name}: ack not sent"));
                        break;
                    }
                    let now = fleet.now();
                    fleet.first_ack_sent.fetch_min(now, Ordering::SeqCst);
                    fleet.last_ack_sent.fetch_max(now, Ordering::SeqCst);
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(frame))) => {
                        match serde_json::from_str::<ServerMessage>(&frame) {
                            Ok(ServerMessage::Subscribed { seq, mode, epoch, .. }) => {
                                position = Some((seq, epoch));
                                fleet.subscribed.fetch_add(1, Ordering::SeqCst);
                                if mode == "replay" {
                                    fleet.replayed.fetch_add(1, Ordering::SeqCst);
                                    fleet.last_replayed.fetch_max(fleet.now(), Ordering::SeqCst);
                                }
                            }
                            Ok(ServerMessage::Change(change)) => {
                                fleet.changes.fetch_add(1, Ordering::SeqCst);
                                if let Some((seq, _)) = &mut position {
                                    *seq = change.seq;
                                }
                                received = applies.then_some(change.version);
                            }
                            Ok(ServerMessage::Snapshot(snapshot)) => {
                                fleet.snapshots.fetch_add(1, Ordering::SeqCst);
                                received = applies.then_some(snapshot.version);
                            }
                            Ok(ServerMessage::AckRecorded { .. }) => {
                                fleet.acks_recorded.fetch_add(1, Ordering::SeqCst);
                                fleet.last_ack_recorded.fetch_max(fleet.now(), Ordering::SeqCst);
                            }
                            Ok(ServerMessage::Error { code, message }) => {
                                fleet.error(format!("{name}: {code}: {message}"));
                            }
                            Ok(_) => {}
                            Err(e) => fleet.error(format!("{name}: undecodable frame: {e}")),
                        }
                    }
                    Some(Ok(Message::Close(close))) => {
                        fleet.error(format!("{name}: closed: {close:?}"));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
        tokio::time::sleep(backoff(0)).await;
    }
}

/// `Client`'s backoff: the n-th wait is uniform in [d/2, d], d = 200 ms * 2^n, at most 30 s.
fn backoff(round: u32) -> Duration {
    let d = Duration::from_millis(200)
        .saturating_mul(2u32.saturating_pow(round.min(20)))
        .min(Duration::from_secs(30));
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// Starts `n` instances; returns the channels that tell each to ack a version.
fn start_fleet(
    n: usize,
    port: u16,
    fleet: &Arc<Fleet>,
    applies: bool,
) -> Vec<mpsc::UnboundedSender<u64>> {
    (0..n)
        .map(|i| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(instance(i, port, fleet.clone(), applies, rx));
            tx
        })
        .collect()
}

/// CPU time (user and system) process `pid` used so far, from `/proc/<pid>/stat`.
fn cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: tens of thousands of sockets, see the module docs"]
async fn ack_storm() {
    let n = instances();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_server(dir.path(), &repo.url()).await;
    let fleet = Fleet::new();
    let connecting = Instant::now();
    let orders = start_fleet(n, server.port, &fleet, false);
    fleet.until("subscribed", &fleet.subscribed, n).await;
    println!(
        "ack storm: {n} instances connected and subscribed in {}",
        secs(connecting.elapsed())
    );

    let pid = server.pid().to_string();
    let (server_cpu, own_cpu) = (cpu(&pid), cpu("self"));
    for order in &orders {
        order.send(1).expect("instance running");
    }
    fleet.until("ack_recorded", &fleet.acks_recorded, n).await;
    let (server_cpu, own_cpu) = (cpu(&pid) - server_cpu, cpu("self") - own_cpu);
    let first_sent = fleet.at(&fleet.first_ack_sent);
    let last_sent = fleet.at(&fleet.last_ack_sent);
    let last_recorded = fleet.at(&fleet.last_ack_recorded);
    // The rollout as the API shows it, asked again as soon as each answer arrives.
    let mut polls = 0;
    let mut slowest = Duration::ZERO;
    let shown = loop {
        let asked = Instant::now();
        let topic = server.get("/api/v1/topics/payments").await;
        slowest = slowest.max(asked.elapsed());
        polls += 1;
        let applied = topic["rollout"]["applied"].as_array().map_or(0, Vec::len);
        if applied == n {
            break Instant::now();
        }
        assert!(
            asked.duration_since(last_sent) < PHASE,
            "the rollout shows {applied} of {n} applied"
        );
    };
    println!(
        "ack storm: {n} acks sent over {}; first ack sent -> last ack_recorded received: {} \
         ({:.0} acks/s); last ack sent -> last ack_recorded received: {}; last ack sent -> \
         rollout API lists all {n} applied: {} ({polls} GET /api/v1/topics/payments, the slowest \
         took {}); CPU until the last ack_recorded: server {}, instances {}",
        secs(last_sent.duration_since(first_sent)),
        secs(last_recorded.duration_since(first_sent)),
        n as f64 / last_recorded.duration_since(first_sent).as_secs_f64(),
        secs(last_recorded.saturating_duration_since(last_sent)),
        secs(shown.saturating_duration_since(last_sent)),
        secs(slowest),
        secs(server_cpu),
        secs(own_cpu),
    );
    let errors = fleet.errors.lock().expect("errors").clone();
    assert!(errors.is_empty(), "{errors:?}");
    drop(orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: tens of thousands of sockets, see the module docs"]
async fn reconnect_storm() {
    let n = instances();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = start_server(dir.path(), &repo.url()).await;
    let fleet = Fleet::new();
    let connecting = Instant::now();
    // Each instance applies and acks what it receives: a `since` says nothing about a topic an
    // instance never acked, which would be sent as a snapshot instead of a replay.
    let orders = start_fleet(n, server.port, &fleet, true);
    fleet.until("subscribed", &fleet.subscribed, n).await;
    fleet.until("acked", &fleet.acks_recorded, n).await;
    println!(
        "reconnect storm: {n} instances connected, subscribed and acked in {}",
        secs(connecting.elapsed())
    );

    // A crash, and a change committed while the server is down: each instance must get exactly it.
    server.kill();
    repo.commit(
        "main",
        &[("payments/app.toml", Some(b"port = 9443\n".as_slice()))],
        "while down",
    )
    .expect("commit");
    let restarting = Instant::now();
    let own_cpu = cpu("self");
    server.spawn().await;
    let ready = Instant::now();
    fleet.until("replayed", &fleet.replayed, n).await;
    fleet.until("changes", &fleet.changes, n).await;
    fleet
        .until("acks of the change", &fleet.acks_recorded, 2 * n)
        .await;
    let (server_cpu, own_cpu) = (cpu(&server.pid().to_string()), cpu("self") - own_cpu);
    let acked = fleet.at(&fleet.last_ack_recorded);
    let last = fleet.at(&fleet.last_replayed);
    println!(
        "reconnect storm: {n} instances resumed by replay; restart began -> ready: {}; \
         ready -> last `subscribed` (replay): {}; restart began -> last: {}; restart began -> \
         the missed change acked by all: {} ({} connects, {} refused or failed while down); \
         CPU from the restart until then: server {}, instances {}",
        secs(ready.duration_since(restarting)),
        secs(last.saturating_duration_since(ready)),
        secs(last.saturating_duration_since(restarting)),
        secs(acked.saturating_duration_since(restarting)),
        fleet.connects.load(Ordering::SeqCst),
        fleet.connect_failures.load(Ordering::SeqCst),
        secs(server_cpu),
        secs(own_cpu),
    );
    // Exactly the missed change, once each, and nothing resumed by snapshot.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fleet.changes.load(Ordering::SeqCst), n);
    assert_eq!(
        fleet.snapshots.load(Ordering::SeqCst),
        n,
        "the first subscribe's only"
    );
    assert_eq!(fleet.replayed.load(Ordering::SeqCst), n);
    assert_eq!(fleet.subscribed.load(Ordering::SeqCst), 2 * n);
    let errors = fleet.errors.lock().expect("errors").clone();
    assert!(errors.is_empty(), "{errors:?}");
    drop(orders);
}
