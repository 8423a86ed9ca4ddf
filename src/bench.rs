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
