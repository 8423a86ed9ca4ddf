//! Embedding confcast in an application: receive your configuration and report what you applied.
//!
//! Build it the way an application would, without the server stack:
//!   cargo run --no-default-features --features client --example embed -- ws://127.0.0.1:8080/ws payments
use confcast::client::{Identity, Session};
use confcast::protocol::{AckStatus, ServerMessage};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws".into());
    let topics: Vec<String> = args.collect();
    let topics = if topics.is_empty() {
        vec!["*".to_string()]
    } else {
        topics
    };

    let me = Identity {
        instance: format!("example-{}", std::process::id()),
        app: Some("example".into()),
        ..Default::default()
    };
    let mut session = Session::connect(&url, &me).await?;
    session.subscribe(&topics, None).await?;
    loop {
        match session.next().await? {
            ServerMessage::Snapshot(s) => {
                println!("{} v{}: {} files", s.topic, s.version, s.files.len());
                session
                    .ack(&s.topic, s.version, AckStatus::Applied, None)
                    .await?;
            }
            ServerMessage::Change(c) => {
                println!("{} v{} (seq {}): {}", c.topic, c.version, c.seq, c.message);
                session
                    .ack(&c.topic, c.version, AckStatus::Applied, None)
                    .await?;
            }
            other => println!("{other:?}"),
        }
    }
}
