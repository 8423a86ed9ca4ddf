//! The log epoch, end to end: three kinds of instance (the Rust client with a state directory, the
//! agent, and a raw WebSocket client written from PROTOCOL.md's rules) stay connected to a real
//! `confcast serve` while its data directory is replaced by an older backup, and while its
//! database is wiped. Every instance must end on the server's current content without applying
//! any older content on the way, and the API must show the rollout converged.

mod util;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confcast::client::{Client, ClientOptions, Delivery};
use confcast::protocol::{AckStatus, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use util::*;

const FILE: &str = "payments/app.toml";

/// What one instance applied, in order: (version, content of payments/app.toml).
type Applied = Arc<Mutex<Vec<(u64, String)>>>;

fn port(n: u32) -> String {
    format!("port = {n}\n")
}

async fn push(server: &ServerProcess, repo: &ConfigRepo, n: u32) {
    let c = repo
        .commit(
            "main",
            &[(FILE, Some(port(n).as_bytes()))],
            &format!("port {n}"),
        )
        .expect("commit");
    assert_eq!(server.github_push(&c.to_string()).await, 202);
}

/// Waits until the topic is at `version` and all three instances applied it.
async fn converged(server: &ServerProcess, version: u64) {
    let result = tokio::time::timeout(WAIT, async {
        loop {
            let v: Value = match server
                .http
                .get(server.url("/api/v1/topics/payments"))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
                _ => Value::Null,
            };
            let applied = v["rollout"]["applied"].as_array().map_or(0, Vec::len);
            if v["version"] == version && applied == 3 && v["rollout"]["converged"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if result.is_err() {
        let v = server.get("/api/v1/topics/payments").await;
        panic!("payments v{version} not converged on 3 instances in time: {v}");
    }
}

/// Waits until `applied`'s last entry holds `content`.
async fn ends_on(name: &str, applied: &Applied, content: &str) {
    ends_on_or_log(name, applied, content, None).await
}

async fn ends_on_or_log(
    name: &str,
    applied: &Applied,
    content: &str,
    server: Option<&ServerProcess>,
) {
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            if applied
                .lock()
                .expect("lock")
                .last()
                .is_some_and(|(_, c)| c == content)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "{name} never applied {content:?}: {:?}\n{}",
        applied.lock().expect("lock"),
        server.map(|s| s.log()).unwrap_or_default()
    );
}

/// The bundled client, with a state directory, applying and acking every update.
fn rust_client(url: &str, state: &Path) -> (Applied, tokio::task::JoinHandle<()>) {
    let applied: Applied = Arc::default();
    let mut opts = ClientOptions::new(url, "client-1", &["payments"]);
    opts.state_dir = Some(state.to_path_buf());
    opts.backoff_initial = Duration::from_millis(50);
    opts.backoff_max = Duration::from_millis(500);
    let mut client = Client::start(opts).expect("client");
    let log = applied.clone();
    let task = tokio::spawn(async move {
        while let Some(d) = client.next().await {
            if let Delivery::Update(u) = d {
                let content = u
                    .files
                    .get(FILE)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                log.lock().expect("lock").push((u.version, content));
                let _ = client.ack(&u.topic, u.version, AckStatus::Applied, None);
            }
        }
    });
    (applied, task)
}

struct Agent {
    child: std::process::Child,
    reloads: PathBuf,
    file: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(url: &str, dir: &Path) -> Agent {
        let reloads = dir.join("agent-reloads.log");
        let exec = format!(
            "printf '%s %s\\n' \"$CONFCAST_VERSION\" \"$(cat \"$CONFCAST_DIR/{FILE}\")\" >> {}",
            reloads.display()
        );
        let log = std::fs::File::create(dir.join("agent.log")).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
            .args([
                "agent",
                "--server",
                url,
                "--instance",
                "agent-1",
                "--topic",
                "payments",
            ])
            .args(["--exec", &exec, "--exec-timeout", "5"])
            .arg("--dir")
            .arg(dir.join("agent-dir"))
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("fd"))
            .stderr(log)
            .spawn()
            .expect("start agent");
        Agent {
            child,
            reloads,
            file: dir.join("agent-dir").join(FILE),
        }
    }

    /// What the agent's directory holds now.
    fn file(&self) -> String {
        std::fs::read_to_string(&self.file).unwrap_or_default()
    }

    /// The agent holds `content`, and reloaded nothing older after `mark` (its reload count then).
    /// It may have reloaded nothing at all: a version whose files are those in place is acked
    /// without a reload, as after a restore or a wipe that republishes today's content.
    fn holds_only(&self, mark: usize, content: &str) {
        assert_eq!(self.file(), content, "the agent's file");
        let reloaded = self.applied();
        assert!(
            reloaded[mark.min(reloaded.len())..]
                .iter()
                .all(|(_, c)| c == content),
            "the agent reloaded older content after the server's data changed: {reloaded:?}"
        );
    }

    /// (version, content) of every reload, in order.
    fn applied(&self) -> Vec<(u64, String)> {
        std::fs::read_to_string(&self.reloads)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (v, c) = l.split_once(' ')?;
                Some((v.parse().ok()?, format!("{c}\n")))
            })
            .collect()
    }
}

/// A client written from PROTOCOL.md alone: it keeps (epoch, position, version), resumes with
/// `since` + `epoch`, sets its position from `subscribed`, starts over when `welcome` names another
/// epoch, drops changes at or below the version it holds, and reconnects after any close.
#[derive(Debug, Default, Clone)]
struct RawState {
    epoch: Option<String>,
    position: Option<u64>,
    version: u64,
}

fn raw_client(url: String, state: Arc<Mutex<RawState>>) -> (Applied, tokio::task::JoinHandle<()>) {
    let applied: Applied = Arc::default();
    let log = applied.clone();
    let task = tokio::spawn(async move {
        loop {
            let _ = raw_session(&url, &state, &log).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (applied, task)
}

async fn raw_session(url: &str, state: &Mutex<RawState>, log: &Applied) -> Option<()> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(
        json!({"type": "hello", "instance": "raw-1", "heartbeat": true}),
    ))
    .await
    .ok()?;
    loop {
        let Message::Text(text) = ws.next().await?.ok()? else {
            continue;
        };
        let m: Value = serde_json::from_str(&text).ok()?;
        if std::env::var("EPOCH_DEBUG").is_ok() {
            eprintln!("raw <- {}", text.chars().take(200).collect::<String>());
        }
        match m["type"].as_str()? {
            "welcome" => {
                let epoch = m["epoch"].as_str()?.to_string();
                let subscribe = {
                    let mut st = state.lock().ok()?;
                    if st.epoch.as_deref().is_some_and(|e| e != epoch) {
                        *st = RawState::default();
                    }
                    match (st.position, &st.epoch) {
                        (Some(since), Some(e)) => {
                            json!({"type": "subscribe", "topics": ["payments"], "since": since, "epoch": e})
                        }
                        _ => json!({"type": "subscribe", "topics": ["payments"]}),
                    }
                };
                ws.send(send(subscribe)).await.ok()?;
            }
            "snapshot" | "change" => {
                let version = m["version"].as_u64()?;
                let content = m["files"]
                    .as_array()?
                    .iter()
                    .find(|f| f["path"] == FILE)
                    .and_then(|f| f["content"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let apply = {
                    let mut st = state.lock().ok()?;
                    let newer = if m["type"] == "snapshot" {
                        version != st.version
                    } else {
                        version > st.version
                    };
                    if newer {
                        st.version = version;
                    }
                    // PROTOCOL.md 8.4: a change applied in order moves the position to its seq.
                    if m["type"] == "change" {
                        st.position = m["seq"].as_u64().or(st.position);
                    }
                    newer
                };
                if apply {
                    log.lock().ok()?.push((version, content));
                    let ack = json!({"type": "ack", "topic": "payments", "version": version, "status": "applied"});
                    ws.send(send(ack)).await.ok()?;
                }
            }
            "subscribed" => {
                let mut st = state.lock().ok()?;
                st.position = m["seq"].as_u64();
                st.epoch = m["epoch"].as_str().map(str::to_string);
            }
            _ => {}
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

/// Everything applied after `mark` holds `content`: no older configuration on the way.
fn only_current_after(name: &str, applied: &[(u64, String)], mark: usize, content: &str) {
    let after = &applied[mark.min(applied.len())..];
    assert!(!after.is_empty(), "{name} applied nothing after the mark");
    assert!(
        after.iter().all(|(_, c)| c == content),
        "{name} applied older content after the server's data changed: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_end_on_current_content_after_a_restore_and_a_wipe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = ServerProcess::start(dir.path(), &repo, "", "").await;
    // The first sync publishes the initial commit as v1; each push then adds one version.
    tokio::time::timeout(WAIT, async {
        while server.get("/api/v1/topics/payments").await["version"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("first sync");
    push(&server, &repo, 1).await;
    let url = server.ws_url();

    let (client, _client_task) = rust_client(&url, &dir.path().join("client-state"));
    let agent = Agent::start(&url, dir.path());
    let raw_state = Arc::new(Mutex::new(RawState::default()));
    let (raw, raw_task) = raw_client(url.clone(), raw_state.clone());
    // v1 is the initial commit, each push one version more.
    converged(&server, 2).await;
    push(&server, &repo, 2).await;
    converged(&server, 3).await;

    // A backup of the whole data directory (with its witness), taken while stopped.
    server.kill();
    let backup = dir.path().join("backup");
    copy_dir(&dir.path().join("data"), &backup);
    server.spawn().await;
    for n in 3..=5 {
        push(&server, &repo, n).await;
        converged(&server, u64::from(n) + 1).await;
    }
    let epoch_a = raw_state
        .lock()
        .expect("lock")
        .epoch
        .clone()
        .expect("epoch");

    // A since=0 replay for an instance that acked everything applies nothing.
    raw_task.abort();
    let held = raw_state.lock().expect("lock").clone();
    let mut session = confcast::client::Session::connect(
        &url,
        &confcast::client::Identity {
            instance: "raw-1".into(),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    session.seed(
        held.epoch.clone(),
        Some(0),
        [("payments".to_string(), held.version)].into(),
    );
    session
        .subscribe(&["payments".into()], Some(0))
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(WAIT, session.next())
            .await
            .expect("frame")
            .expect("open")
        {
            ServerMessage::Subscribed { mode, epoch, .. } => {
                assert_eq!(
                    (mode.as_str(), epoch.as_str()),
                    ("replay", epoch_a.as_str())
                );
                break;
            }
            ServerMessage::Change(c) => panic!("re-applied v{} on a since=0 replay", c.version),
            ServerMessage::Snapshot(s) => panic!("snapshot of {} for an acked instance", s.topic),
            _ => {}
        }
    }
    session.close().await;
    let (raw, _raw_task) = {
        drop(raw);
        raw_client(url.clone(), raw_state.clone())
    };

    // Restore the older backup: its log ends at port 2 and has no trace of ports 3-5.
    let marks = (
        client.lock().expect("lock").len(),
        agent.applied().len(),
        raw.lock().expect("lock").len(),
    );
    server.kill();
    std::fs::remove_dir_all(dir.path().join("data")).expect("remove data");
    copy_dir(&backup, &dir.path().join("data"));
    server.spawn().await;
    let current = port(5);
    ends_on("client", &client, &current).await;
    ends_on_or_log("raw", &raw, &current, Some(&server)).await;
    // The restored log had v3; its first sync published today's content as v4.
    converged(&server, 4).await;
    only_current_after("client", &client.lock().expect("lock"), marks.0, &current);
    agent.holds_only(marks.1, &current);
    only_current_after("raw", &raw.lock().expect("lock"), marks.2, &current);
    let epoch_b = raw_state
        .lock()
        .expect("lock")
        .epoch
        .clone()
        .expect("epoch");
    assert_ne!(epoch_a, epoch_b, "the restore started a new epoch");
    assert!(
        server.log().contains("new log epoch"),
        "the server says why instances start over"
    );
    // Versions 5 and 6 of the restored log were numbers these instances once held with other
    // content: they must still get them.
    for n in 6..=7 {
        push(&server, &repo, n).await;
        converged(&server, u64::from(n) - 1).await;
    }
    let current = port(7);
    ends_on("client", &client, &current).await;
    ends_on("raw", &raw, &current).await;
    assert_eq!(
        agent.applied().last().map(|(_, c)| c.clone()),
        Some(current.clone())
    );

    // Wipe the database: a new one, a new epoch, versions from 1 again with today's content.
    let marks = (
        client.lock().expect("lock").len(),
        agent.applied().len(),
        raw.lock().expect("lock").len(),
    );
    server.kill();
    std::fs::remove_dir_all(dir.path().join("data")).expect("wipe");
    server.spawn().await;
    // A wiped store numbers from 1 again, with today's content.
    converged(&server, 1).await;
    ends_on("client", &client, &current).await;
    ends_on("raw", &raw, &current).await;
    only_current_after("client", &client.lock().expect("lock"), marks.0, &current);
    agent.holds_only(marks.1, &current);
    only_current_after("raw", &raw.lock().expect("lock"), marks.2, &current);
    let epoch_c = raw_state
        .lock()
        .expect("lock")
        .epoch
        .clone()
        .expect("epoch");

    assert!(epoch_c != epoch_b && epoch_c != epoch_a);
}

/// The documented restore (only `confcast.db` put back, the replica's witness kept): the server
/// itself notices the log lost its head and starts a new epoch before anyone reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_only_the_database_is_caught_by_the_witness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = ServerProcess::start(dir.path(), &repo, "", "").await;
    let db = dir.path().join("data").join("confcast.db");
    let welcome_epoch = |server: &ServerProcess| {
        let url = server.ws_url();
        async move {
            let s = confcast::client::Session::connect(
                &url,
                &confcast::client::Identity {
                    instance: "probe".into(),
                    ..Default::default()
                },
            )
            .await
            .expect("connect");
            let e = s.server_epoch().to_string();
            s.close().await;
            e
        }
    };
    let before = welcome_epoch(&server).await;
    // The documented online backup: a consistent copy taken while the server runs.
    let backup = dir.path().join("confcast.db.bak");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        db.display()
    ))
    .await
    .expect("open the live database");
    sqlx::Executor::execute(
        &mut conn,
        format!("VACUUM INTO '{}'", backup.display()).as_str(),
    )
    .await
    .expect("backup");
    drop(conn);
    for n in 1..=3 {
        push(&server, &repo, n).await;
    }
    // Let the witness record the head (it is written within a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    std::fs::copy(&backup, &db).expect("restore");
    let _ = std::fs::remove_file(db.with_extension("db-wal"));
    let _ = std::fs::remove_file(db.with_extension("db-shm"));
    server.spawn().await;
    let after = welcome_epoch(&server).await;
    assert_ne!(before, after, "a new epoch before any instance reconnected");
    assert!(server.log().contains("restored from a backup?"));
}

/// Liveness a browser or Python client can see: `hello.heartbeat` brings `heartbeat` messages
/// every `heartbeat_secs`, and the server answers the client's own pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_on_request_and_pongs_for_client_pings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Ok(Message::Pong(p))) = ws.next().await {
                return p;
            }
        }
    })
    .await
    .expect("pong in time");
    assert_eq!(&pong[..], b"are you there");

    let hello = json!({"type": "hello", "instance": "browser-1", "heartbeat": true});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    let mut heartbeats = 0;
    let started = std::time::Instant::now();
    while heartbeats < 2 {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = frame {
            let m: Value = serde_json::from_str(&t).expect("json");
            if m["type"] == "heartbeat" {
                heartbeats += 1;
            }
        }
    }
    // heartbeat_secs is 1 in the test config: two arrive within about two seconds.
    assert!(started.elapsed() < Duration::from_secs(5));

    // Without asking, none comes.
    let (mut quiet, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    let hello = json!({"type": "hello", "instance": "plain-1"});
    quiet
        .send(Message::Text(hello.to_string().into()))
        .await
        .expect("hello");
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, quiet.next()).await {
        if let Message::Text(t) = frame {
            assert!(
                !t.contains(r#""type":"heartbeat""#),
                "unasked heartbeat: {t}"
            );
        }
    }
}

/// `confcast epoch --new`: the operator's explicit reset, seen by the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_start_a_new_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = ServerProcess::start(dir.path(), &repo, "", "").await;
    server.kill();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
            .args(["epoch", "--config"])
            .arg(dir.path().join("confcast.toml"))
            .args(extra)
            .output()
            .expect("run confcast epoch");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let before = run(&[]);
    assert_eq!(before.len(), 32, "{before}");
    let said = run(&["--new"]);
    let after = run(&[]);
    assert_ne!(after, before);
    assert!(said.starts_with(&after) && said.contains(&before), "{said}");
    server.spawn().await;
    let session = confcast::client::Session::connect(
        &server.ws_url(),
        &confcast::client::Identity {
            instance: "probe".into(),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    assert_eq!(session.server_epoch(), after);
}

/// A revision-1 client (no `epoch` with `since`) ahead of the head gets snapshots, as before, and
/// starts no new epoch: it could not learn one and would start another on every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_1_resume_ahead_of_the_head_gets_snapshots_and_keeps_the_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    for _ in 0..2 {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
            .await
            .expect("connect");
        let send = |v: Value| Message::Text(v.to_string().into());
        ws.send(send(json!({"type": "hello", "instance": "old-1"})))
            .await
            .expect("hello");
        ws.send(send(
            json!({"type": "subscribe", "topics": ["payments"], "since": 999}),
        ))
        .await
        .expect("subscribe");
        let mut welcome_epoch = None;
        loop {
            let frame = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("frame");
            let Message::Text(t) = frame else { continue };
            let m: Value = serde_json::from_str(&t).expect("json");
            match m["type"].as_str() {
                Some("welcome") => welcome_epoch = Some(m["epoch"].clone()),
                Some("subscribed") => {
                    assert_eq!(m["mode"], "snapshot", "{m}");
                    assert_eq!(Some(m["epoch"].clone()), welcome_epoch, "no new epoch");
                    break;
                }
                _ => {}
            }
        }
    }
}
