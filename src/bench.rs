//! `confcast bench`: measured figures, printed, never asserted. Each scenario runs the real server
//! on SQLite in a temporary directory and real WebSocket clients over loopback.

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

/// Connects `instances` instances, then pushes `changes` commits one at a time (each waits until
/// every instance has it) and reports webhook-to-last-delivery latency.
pub async fn fanout(instances: usize, changes: usize) -> Result<(), BenchError> {
    if instances == 0 || changes == 0 {
        return Err(BenchError::Stalled(
            "give at least one instance and one change".into(),
        ));
    }
    let dir = tempfile::tempdir()?;
    let repo = crate::demo::ConfigRepo::init(&dir.path().join("origin.git"))?;
    repo.commit(
        "main",
        &[("payments/app.toml", Some(b"v = 0\n".as_slice()))],
        "initial",
    )?;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nconnection_queue = 4096\n[[repos]]\nname = \"bench\"\nurl = \"{}\"\nsecret_env = \"BENCH_SECRET\"\n",
        dir.path().join("data").display(),
        repo.url()
    );
    let config = Config::parse(&toml, std::iter::empty(), dir.path(), &|_| {
        Some("bench-secret".into())
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(listener, config, async move {
        let _ = stopped.await;
    }));
    let url = format!("ws://{addr}/ws");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut tasks = Vec::new();
    for i in 0..instances {
        let identity = Identity {
            instance: format!("bench-{i}"),
            ..Identity::default()
        };
        let mut session = Session::connect(&url, &identity).await?;
        session.subscribe(&["payments".to_string()], None).await?;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(m) = session.next().await {
                if let ServerMessage::Change(c) = m {
                    if tx.send((i, c.version, Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    let http = reqwest::Client::new();
    let mut latencies = Vec::with_capacity(changes);
    // The first sync may still be running: wait for version 1 everywhere via the API.
    let ready = Instant::now();
    loop {
        let v: serde_json::Value = http
            .get(format!("http://{addr}/api/v1/topics/payments"))
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        if v["version"] == 1 {
            break;
        }
        if ready.elapsed() > Duration::from_secs(30) {
            return Err(BenchError::Stalled("first sync did not finish".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for n in 1..=changes {
        let body = format!("v = {n}\n");
        let commit = repo.commit(
            "main",
            &[("payments/app.toml", Some(body.as_bytes()))],
            "bench",
        )?;
        let payload =
            serde_json::json!({"ref": "refs/heads/main", "after": commit.to_string()}).to_string();
        let sent = Instant::now();
        http.post(format!("http://{addr}/webhooks/bench"))
            .header("x-github-event", "push")
            .header(
                "x-hub-signature-256",
                crate::webhook::github::sign(b"bench-secret", payload.as_bytes()),
            )
            .body(payload)
            .send()
            .await?;
        let want = n as u64 + 1;
        let mut got = 0;
        let mut last = sent;
        while got < instances {
            let Ok(Some((_, version, at))) =
                tokio::time::timeout(Duration::from_secs(30), rx.recv()).await
            else {
                return Err(BenchError::Stalled(format!(
                    "change {n}: {got}/{instances} instances"
                )));
            };
            if version == want {
                got += 1;
                last = last.max(at);
            }
        }
        latencies.push(last.duration_since(sent));
    }
    let _ = stop.send(());
    let _ = server.await;
    for t in tasks {
        t.abort();
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!("fanout: {instances} instances, {changes} pushes (webhook -> git fetch + diff -> SQLite -> all instances)");
    println!(
        "  webhook to last instance: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.9).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    Ok(())
}
