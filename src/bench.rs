//! `confcast bench`: measured figures, printed, never asserted. Each scenario runs the real server
//! on SQLite in a temporary directory and real WebSocket clients over loopback: `replay` here, the
//! fan-out, memory and storm figures in [`fanout`] (the server in a child process, a fleet of
//! [`fleet`] instances here, the raw [`baseline`] broadcaster beside it).

pub mod baseline;
pub mod fanout;
pub mod fleet;
mod os;

use std::time::{Duration, Instant};

use crate::client::{Identity, Session};
use crate::config::Config;
use crate::protocol::{FileStatus, ServerMessage};
use crate::store::{ChangedFile, SyncOutcome, TopicChange};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("client: {0}")]
    Client(#[from] crate::client::ClientError),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Stalled(String),
}

fn outcome(n: u64, bytes: usize) -> SyncOutcome {
    let content = format!("# change {n}\n{}", "x".repeat(bytes)).into_bytes();
    SyncOutcome {
        repo: "bench".into(),
        commit: format!("{n:040x}"),
        author: "Bench <bench@example.com>".into(),
        message: format!("change {n}"),
        topics: vec![TopicChange {
            topic: "payments".into(),
            files: vec![ChangedFile {
                path: "payments/app.toml".into(),
                status: FileStatus::Modified,
                old_path: None,
                sha: format!("{n:040x}"),
                content: Some(content),
            }],
        }],
        ..SyncOutcome::default()
    }
}

/// Replays `events` logged changes of `bytes` each to one reconnecting instance (`since` = 0) and
/// reports changes per second, from the subscribe to the `subscribed` marker.
pub async fn replay(events: u64, bytes: usize) -> Result<(), BenchError> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = Config::parse(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[retention]\nmax_events = 0\n",
            data.display()
        ),
        std::iter::empty(),
        dir.path(),
        &|_| None,
    )?;
    std::fs::create_dir_all(&data)?;
    let store = crate::store::open(&config.store_url()).await?;
    let fill = Instant::now();
    for n in 1..=events {
        store.publish(&outcome(n, bytes)).await?;
    }
    let fill = fill.elapsed();
    drop(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}/ws", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, config, async move {
        let _ = stopped.await;
    }));
    let identity = Identity {
        instance: "bench".into(),
        ..Identity::default()
    };
    // Ack once so the topic is not "never seen" (which would get a snapshot instead).
    let mut warm = Session::connect(&url, &identity).await?;
    warm.ack("payments", 1, crate::protocol::AckStatus::Applied, None)
        .await?;
    warm.next().await?;
    warm.close().await;

    let mut session = Session::connect(&url, &identity).await?;
    let started = Instant::now();
    session
        .subscribe(&["payments".to_string()], Some(0))
        .await?;
    let mut received = 0u64;
    let mut bytes_in = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), session.next_raw()).await {
            Err(_) => {
                return Err(BenchError::Stalled(format!(
                    "replay stalled after {received} changes"
                )))
            }
            Ok(message) => match message? {
                ServerMessage::Change(c) => {
                    received += 1;
                    bytes_in += c
                        .files
                        .iter()
                        .map(|f| f.content.as_ref().map_or(0, String::len))
                        .sum::<usize>();
                }
                ServerMessage::Subscribed { .. } => break,
                _ => {}
            },
        }
    }
    let took = started.elapsed();
    let _ = stop.send(());
    let _ = server.await;
    println!(
        "replay: {received} changes of {bytes} B content replayed to one reconnecting instance"
    );
    println!(
        "  log filled in {:.2} s ({:.0} publishes/s, one transaction each)",
        fill.as_secs_f64(),
        events as f64 / fill.as_secs_f64()
    );
    println!(
        "  replayed in {:.3} s: {:.0} changes/s, {:.1} MB/s of file content",
        took.as_secs_f64(),
        received as f64 / took.as_secs_f64(),
        bytes_in as f64 / took.as_secs_f64() / 1e6
    );
    Ok(())
}

/// Path and content of file `n` of the `agent` scenario's topic: 1,000 files per directory, small
/// TOML documents (validated by the server like any config file).
fn agent_file(n: usize) -> (String, String) {
    (
        format!("bench/d{:03}/f{n:06}.toml", n / 1000),
        format!("id = {n}\nname = \"file {n}\"\n"),
    )
}

/// The webhook secret of the `agent` scenario.
const AGENT_SECRET: &str = "bench-agent-webhook-secret";

/// Waits until `done` holds, checking every 5 ms; `Stalled` with `what` after `limit`.
async fn until(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Instant, BenchError> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            return Err(BenchError::Stalled(format!("{what}: not within {limit:?}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Instant::now())
}

/// Commits `files` files in one topic to a real repo, lets the real server sync and publish them,
/// then starts the real agent (`agent::run`) on an empty directory and reports how long it takes
/// until the files are in place (the `current` swap) and acknowledged, then the same for a
/// one-file change on top. Every file written is checked against what was committed.
pub async fn agent(files: usize) -> Result<(), BenchError> {
    if files == 0 {
        return Err(BenchError::Stalled("give at least one file".into()));
    }
    let dir = tempfile::tempdir()?;
    let built = Instant::now();
    let repo = crate::demo::ConfigRepo::init(&dir.path().join("origin.git"))?;
    let all: Vec<(String, String)> = (0..files).map(agent_file).collect();
    let changes: Vec<(&str, Option<&[u8]>)> = all
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_bytes())))
        .collect();
    repo.commit("main", &changes, "bench: many files")?;
    let built = built.elapsed();
    // The default caps hold back a topic of more than 10,000 files: raise only what must be.
    let limits = crate::config::LimitsConfig::default();
    let max_topic_files = limits.max_topic_files.max(files);
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[limits]\nmax_topic_files = {max_topic_files}\n[[repos]]\nname = \"bench\"\nurl = \"{}\"\nsecret_env = \"BENCH_SECRET\"\npoll_interval_secs = 0\n",
        dir.path().join("data").display(),
        repo.url()
    );
    let config = Config::parse(&toml, std::iter::empty(), dir.path(), &|_| {
        Some(AGENT_SECRET.into())
    })?;
    let server_max_frame = config.limits.max_frame_bytes();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started_server = Instant::now();
    let server = tokio::spawn(crate::serve(listener, config, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let topic = |http: reqwest::Client| async move {
        let reply = http
            .get(format!("http://{addr}/api/v1/topics/bench"))
            .send()
            .await;
        match reply {
            Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    };
    loop {
        if topic(http.clone()).await["version"] == 1 {
            break;
        }
        if started_server.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::Stalled("the first sync did not publish".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let published = started_server.elapsed();

    let target = dir.path().join("agent");
    let mut client =
        crate::client::ClientOptions::new(format!("ws://{addr}/ws"), "bench-agent", &["bench"]);
    client.backoff_max = Duration::from_secs(1);
    // With max_topic_files raised, the server's largest frame can pass the client's default
    // (CONFIGURATION.md section 12): the agent must accept it.
    client.max_frame_bytes = client
        .max_frame_bytes
        .max(usize::try_from(server_max_frame).unwrap_or(usize::MAX));
    let opts = crate::agent::AgentOptions {
        client,
        dir: target.clone(),
        exec: None,
        check: None,
        exec_timeout: Duration::from_secs(30),
        rollback_on_failure: false,
        commands: Default::default(),
    };
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let meta = target.join(crate::agent::META);
    let limit = Duration::from_secs(600);
    let started = Instant::now();
    let agent = tokio::spawn(crate::agent::run(opts, async move {
        let _ = agent_stopped.await;
    }));
    // The generation directory is created once the snapshot is received, decoded and its paths
    // checked; `current` appears with the swap, once every file is written and synced.
    let generation = until("generation directory", limit, || {
        meta.join("gen-1").exists()
    })
    .await?;
    let swapped = until("current swap", limit, || {
        std::fs::read_link(meta.join("current")).is_ok()
    })
    .await?;
    loop {
        let t = topic(http.clone()).await;
        if t["rollout"]["converged"] == true {
            break;
        }
        if started.elapsed() > limit {
            return Err(BenchError::Stalled("the agent did not ack".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = started.elapsed();
    let swap = swapped.duration_since(started);
    let checked = check_agent_files(&target, &all)?;

    // A one-file change on top: a new generation written in full, the old one pruned.
    let (path, _) = &all[0];
    let commit = repo.commit(
        "main",
        &[(
            path.as_str(),
            Some(b"id = 0\nname = \"changed\"\n".as_slice()),
        )],
        "bench: one file",
    )?;
    let payload =
        serde_json::json!({"ref": "refs/heads/main", "after": commit.to_string()}).to_string();
    let pushed = Instant::now();
    http.post(format!("http://{addr}/webhooks/bench"))
        .header("x-github-event", "push")
        .header(
            "x-hub-signature-256",
            crate::webhook::github::sign(AGENT_SECRET.as_bytes(), payload.as_bytes()),
        )
        .body(payload)
        .send()
        .await?;
    let second = until("second generation", limit, || {
        std::fs::read_link(meta.join("current")).is_ok_and(|g| g == std::path::Path::new("gen-2"))
    })
    .await?;
    loop {
        let t = topic(http.clone()).await;
        if t["version"] == 2 && t["rollout"]["converged"] == true {
            break;
        }
        if pushed.elapsed() > limit {
            return Err(BenchError::Stalled("the agent did not ack v2".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked2 = pushed.elapsed();
    let changed = std::fs::read_to_string(target.join(path))?;
    if changed != "id = 0\nname = \"changed\"\n" {
        return Err(BenchError::Stalled(format!(
            "{path} after the change: {changed:?}"
        )));
    }

    let _ = stop_agent.send(());
    let _ = agent.await;
    let _ = stop.send(());
    let _ = server.await;
    let secs = |d: Duration| d.as_secs_f64();
    println!("agent: one topic of {files} files ({checked} bytes of content), real server on SQLite, real agent, loopback");
    println!(
        "  setup: repo committed in {:.2} s; server synced and published it in {:.2} s (limits.max_topic_files = {max_topic_files}, max_frame_bytes = {server_max_frame}, the agent's at least that)",
        secs(built),
        secs(published)
    );
    println!(
        "  agent start -> files in place (current swap): {:.2} s, {:.0} files/s",
        secs(swap),
        files as f64 / secs(swap)
    );
    println!(
        "    connect + snapshot received, decoded, state kept, paths checked: {:.2} s",
        secs(generation.duration_since(started))
    );
    println!(
        "    files written + synced + swapped: {:.2} s",
        secs(swapped.duration_since(generation))
    );
    println!(
        "  agent start -> applied ack recorded by the server: {:.2} s",
        secs(acked)
    );
    println!(
        "  one-file change: webhook -> files in place {:.2} s, -> ack recorded {:.2} s (server sync and delivery, the new generation written in full)",
        secs(second.duration_since(pushed)),
        secs(acked2)
    );
    Ok(())
}

/// Reads back every file of the `agent` scenario through the agent's directory; the total content
/// bytes if all match.
fn check_agent_files(dir: &std::path::Path, all: &[(String, String)]) -> Result<usize, BenchError> {
    let mut bytes = 0;
    for (path, content) in all {
        let found = std::fs::read_to_string(dir.join(path))?;
        if &found != content {
            return Err(BenchError::Stalled(format!(
                "{path}: {found:?}, expected {content:?}"
            )));
        }
        bytes += found.len();
    }
    Ok(bytes)
}
