//! No lost version: resume after disconnects and restarts, snapshots when the log was trimmed,
//! slow consumers cut off without harming others, tokens.

mod util;

use std::time::Duration;

use confcast::client::{Client, ClientOptions, Delivery, Update, UpdateKind};
use confcast::protocol::AckStatus;
use util::{config_repo, ServerProcess, TestServer, SECRET, WAIT};

/// Next update from a client, acking it as applied; connection notices are skipped.
async fn next_update(client: &mut Client) -> Update {
    loop {
        let d = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("an update in time")
            .expect("client running");
        match d {
            Delivery::Update(u) => {
                client
                    .ack(&u.topic, u.version, AckStatus::Applied, None)
                    .expect("ack recorded locally");
                return u;
            }
            _ => continue,
        }
    }
}

/// Updates arriving within `within`, acked.
async fn drain(client: &mut Client, within: Duration) -> Vec<Update> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(within, client.next()).await {
        if let Delivery::Update(u) = d {
            client
                .ack(&u.topic, u.version, AckStatus::Applied, None)
                .expect("ack");
            out.push(u);
        }
    }
    out
}

fn options(url: &str, name: &str) -> ClientOptions {
    let mut o = ClientOptions::new(url, name, &["payments"]);
    o.backoff_initial = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(500);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_stream_every_instance_still_gets_every_version_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = ServerProcess::start(dir.path(), &repo, "", "").await;
    let mut clients: Vec<Client> = (1..=3)
        .map(|n| Client::start(options(&server.ws_url(), &format!("i-{n}"))).expect("client"))
        .collect();
    for c in &mut clients {
        let u = next_update(c).await;
        assert_eq!(u.version, 1);
    }
    let mut last_commit = String::new();
    for n in 0..12 {
        let body = format!("port = {n}\n");
        last_commit = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "burst",
            )
            .expect("commit")
            .to_string();
        if n == 5 {
            server.kill();
        }
        if n == 7 {
            // Back on the same port and data; commits 5..7 were made while it was down.
            server.spawn().await;
        }
        if server.github_push(&last_commit).await == 202 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    let head = server.get("/api/v1/topics/payments").await;
    let final_version = head["version"].as_u64().expect("version");
    for (i, c) in clients.iter_mut().enumerate() {
        let mut expected = 2;
        while expected <= final_version {
            let u = next_update(c).await;
            assert_eq!(
                u.version, expected,
                "instance {i} got versions in order without a gap"
            );
            assert!(
                matches!(u.kind, UpdateKind::Change(_)),
                "resumed, not re-snapshotted"
            );
            expected += 1;
            if u.version == final_version {
                assert_eq!(u.commit, last_commit);
                assert_eq!(u.files["payments/app.toml"], b"port = 11\n");
            }
        }
        assert!(
            drain(c, Duration::from_millis(300)).await.is_empty(),
            "nothing twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_instance_gets_exactly_the_three_versions_it_missed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start_with(dir.path(), &repo, "", "").await;
    server.wait_syncs(1).await;
    let state = dir.path().join("instance-state");
    let mut opts = options(&server.ws_url(), "away");
    opts.state_dir = Some(state.clone());
    let mut client = Client::start(opts.clone()).expect("client");
    assert!(matches!(
        next_update(&mut client).await.kind,
        UpdateKind::Snapshot(_)
    ));
    drop(client);

    let mut commits = Vec::new();
    for n in 0..3 {
        let body = format!("port = {}\n", 100 + n);
        let c = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "while away",
            )
            .expect("commit");
        assert_eq!(
            server.github_push("main", &c.to_string(), SECRET).await.0,
            202
        );
        server
            .wait_topic("payments", |v| v["version"] == 2 + n)
            .await;
        commits.push(c.to_string());
    }
    // Back, from its state directory: exactly the three changes, in order, then nothing.
    let mut client = Client::start(opts.clone()).expect("client again");
    assert_eq!(
        client.last_good()["payments"].0,
        1,
        "starts on its last good config"
    );
    let got = [
        next_update(&mut client).await,
        next_update(&mut client).await,
        next_update(&mut client).await,
    ];
    let versions: Vec<u64> = got.iter().map(|u| u.version).collect();
    assert_eq!(versions, [2, 3, 4]);
    assert!(got.iter().all(|u| matches!(u.kind, UpdateKind::Change(_))));
    assert_eq!(
        got.iter().map(|u| u.commit.clone()).collect::<Vec<_>>(),
        commits
    );
    assert!(drain(&mut client, Duration::from_millis(300))
        .await
        .is_empty());
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmed_log_sends_a_snapshot_instead() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // Keep only the last two events.
    let toml_extra = "";
    let server = TestServer::start_toml(
        dir.path().join("data"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[retention]\nmax_events = 2\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n{toml_extra}",
            dir.path().join("data").display(),
            repo.url()
        ),
    )
    .await;
    server.wait_syncs(1).await;
    let mut opts = options(&server.ws_url(), "trimmed");
    opts.state_dir = Some(dir.path().join("state"));
    let mut client = Client::start(opts.clone()).expect("client");
    next_update(&mut client).await;
    drop(client);
    for n in 0..4 {
        let body = format!("port = {}\n", 200 + n);
        let c = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "trim",
            )
            .expect("commit");
        server.github_push("main", &c.to_string(), SECRET).await;
        server
            .wait_topic("payments", |v| v["version"] == 2 + n)
            .await;
    }
    let mut client = Client::start(opts).expect("client again");
    let u = next_update(&mut client).await;
    assert!(
        matches!(u.kind, UpdateKind::Snapshot(_)),
        "log no longer reaches back: snapshot"
    );
    assert_eq!(u.version, 5);
    assert_eq!(u.files["payments/app.toml"], b"port = 203\n");
    assert!(drain(&mut client, Duration::from_millis(300))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_is_cut_off_and_the_others_keep_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start_with(dir.path(), &repo, "connection_queue = 4", "").await;
    server.wait_syncs(1).await;

    // A raw client that subscribes and then never reads a byte.
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut stuck, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    stuck
        .send(Message::text(r#"{"type":"hello","instance":"stuck"}"#))
        .await
        .expect("hello");
    stuck
        .send(Message::text(
            r#"{"type":"subscribe","topics":["payments"]}"#,
        ))
        .await
        .expect("subscribe");

    let mut good = Client::start(options(&server.ws_url(), "good")).expect("client");
    next_update(&mut good).await;

    // Large changes fill the stuck socket's buffers quickly.
    let big = "x".repeat(512 * 1024);
    for n in 0..16 {
        let body = format!("n = {n}\npad = \"{big}\"\n");
        let c = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "big",
            )
            .expect("commit");
        server.github_push("main", &c.to_string(), SECRET).await;
        let u = next_update(&mut good).await;
        assert_eq!(
            u.version,
            2 + n,
            "the healthy instance gets every version as it comes"
        );
    }
    let cut = tokio::time::timeout(WAIT, async {
        loop {
            let (_, v) = server.get("/api/v1/instances/stuck").await;
            if v["connected"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(cut.is_ok(), "the stuck consumer was disconnected");
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_the_slow_consumer_close_code_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start_with(dir.path(), &repo, "connection_queue = 2", "").await;
    server.wait_syncs(1).await;
    let identity = confcast::client::Identity {
        instance: "slow".into(),
        ..Default::default()
    };
    let mut session = confcast::client::Session::connect(&server.ws_url(), &identity)
        .await
        .expect("connect");
    session
        .subscribe(&["payments".into()], None)
        .await
        .expect("subscribe");
    let confcast::protocol::ServerMessage::Snapshot(first) =
        session.next().await.expect("snapshot")
    else {
        panic!("expected the snapshot first");
    };
    session
        .ack("payments", first.version, AckStatus::Applied, None)
        .await
        .expect("ack v1");
    // Changes far larger than the socket buffers land while this reader sits still: the server's
    // writes block, and the ring (two entries) moves on without it.
    let big = "y".repeat(1024 * 1024);
    let mut commits = Vec::new();
    for n in 0..24 {
        let body = format!("n = {n}\npad = \"{big}\"\n");
        let c = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "fast",
            )
            .expect("commit");
        server.github_push("main", &c.to_string(), SECRET).await;
        server
            .wait_topic("payments", |v| v["version"] == 2 + n)
            .await;
        commits.push(c);
    }
    let mut closed = None;
    for _ in 0..40 {
        match session.next().await {
            Ok(_) => continue,
            Err(confcast::client::ClientError::Closed { code, reason }) => {
                closed = Some((code, reason));
                break;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    let (code, reason) = closed.expect("closed by the server");
    assert_eq!(code, confcast::protocol::close::SLOW_CONSUMER, "{reason}");
    // Resuming from the last acknowledged position (the snapshot, seq 2) replays all of them.
    let mut again = confcast::client::Session::connect(&server.ws_url(), &identity)
        .await
        .expect("reconnect");
    again
        .subscribe(&["payments".into()], Some(2))
        .await
        .expect("resubscribe");
    let mut versions = Vec::new();
    while versions.len() < 24 {
        if let confcast::protocol::ServerMessage::Change(c) =
            tokio::time::timeout(WAIT, again.next())
                .await
                .expect("frame")
                .expect("open")
        {
            versions.push(c.version);
        }
    }
    assert_eq!(versions, (2..=25).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_is_required_when_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    std::fs::write(dir.path().join("token"), "t0ken\n").expect("token file");
    let server = TestServer::start_with(
        dir.path(),
        &repo,
        &format!(
            "client_token_file = \"{}\"",
            dir.path().join("token").display()
        ),
        "",
    )
    .await;
    let identity = confcast::client::Identity {
        instance: "t".into(),
        ..Default::default()
    };
    let refused = confcast::client::Session::connect(&server.ws_url(), &identity).await;
    assert!(
        matches!(refused, Err(confcast::client::ClientError::Connect { .. })),
        "no token: refused"
    );
    let wrong =
        confcast::client::Session::connect_with(&server.ws_url(), &identity, Some("nope")).await;
    assert!(wrong.is_err());
    let ok =
        confcast::client::Session::connect_with(&server.ws_url(), &identity, Some("t0ken")).await;
    assert!(ok.is_ok(), "right token: welcome");
    let query =
        confcast::client::Session::connect(&format!("{}?token=t0ken", server.ws_url()), &identity)
            .await;
    assert!(query.is_ok(), "token in the query string");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_several_urls_skips_the_dead_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let dead = format!("ws://127.0.0.1:{}/ws", util::free_port());
    let mut opts = options(&dead, "multi");
    opts.urls.push(server.ws_url());
    let mut client = Client::start(opts).expect("client");
    let u = next_update(&mut client).await;
    assert_eq!(u.topic, "payments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_instance_connecting_twice_replaces_the_older_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let identity = confcast::client::Identity {
        instance: "twin".into(),
        ..Default::default()
    };
    let mut first = confcast::client::Session::connect(&server.ws_url(), &identity)
        .await
        .expect("first");
    let _second = confcast::client::Session::connect(&server.ws_url(), &identity)
        .await
        .expect("second");
    match tokio::time::timeout(WAIT, first.next())
        .await
        .expect("close in time")
    {
        Err(confcast::client::ClientError::Closed { code, .. }) => {
            assert_eq!(code, confcast::protocol::close::REPLACED)
        }
        other => panic!("expected the replaced close code, got {other:?}"),
    }
    let (_, inst) = server.get("/api/v1/instances/twin").await;
    assert_eq!(inst["connected"], true, "the newer connection counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_closed_with_the_keepalive_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // heartbeat 1 s, keepalive 2 s; the raw client below never reads, so it never answers a ping.
    let server = TestServer::start_toml(
        dir.path().join("data"),
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nkeepalive_timeout_secs = 2\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
            dir.path().join("data").display(),
            repo.url()
        ),
    )
    .await;
    use futures_util::SinkExt;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut silent, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("connect");
    silent
        .send(Message::text(r#"{"type":"hello","instance":"silent"}"#))
        .await
        .expect("hello");
    // Read the raw TCP stream from here on: tungstenite would answer the pings, and a peer that
    // answers is not silent.
    let tcp = match silent.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s,
        _ => panic!("plain TCP expected"),
    };
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let mut code = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while code.is_none() {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("a close within the wait")
            .expect("read");
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
        // Walk the unmasked server frames received so far.
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let opcode = bytes[at] & 0x0f;
            let (len, header) = match bytes[at + 1] & 0x7f {
                126 if at + 4 <= bytes.len() => (
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                    4,
                ),
                126 => break,
                127 => panic!("no frame here is that large"),
                l => (usize::from(l), 2),
            };
            if at + header + len > bytes.len() {
                break;
            }
            if opcode == 0x8 && len >= 2 {
                code = Some(u16::from_be_bytes([
                    bytes[at + header],
                    bytes[at + header + 1],
                ]));
            }
            at += header + len;
        }
    }
    assert_eq!(code, Some(confcast::protocol::close::KEEPALIVE_TIMEOUT));
}
