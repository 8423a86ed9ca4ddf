//! End to end on the embedded default: webhook -> git sync -> SQLite log -> WebSocket -> ack -> API.

mod util;

use std::time::Duration;

use confcast::protocol::{AckStatus, ClientMessage, FileStatus, ServerMessage};
use serde_json::Value;
use util::{config_repo, Instance, ServerProcess, TestServer, SECRET};

fn content(change: &confcast::protocol::Change, path: &str) -> Option<String> {
    change
        .files
        .iter()
        .find(|f| f.path == path)
        .and_then(|f| f.content.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_push_reaches_three_instances_and_acks_show_in_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;

    let mut instances = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let (mut i, snapshots) = Instance::subscribed(&server, name, &["payments"]).await;
        assert_eq!(
            snapshots.len(),
            1,
            "one snapshot for the one matching topic"
        );
        let s = &snapshots[0];
        assert_eq!((s.topic.as_str(), s.version), ("payments", 1));
        let paths: Vec<&str> = s.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["payments/app.toml", "payments/limits.json"]);
        i.ack("payments", 1, AckStatus::Applied, None).await;
        instances.push(i);
    }

    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9443\n".as_slice()))],
            "payments: new port",
        )
        .expect("commit");
    let (status, body) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "queued");
    assert!(
        body["delivery"]
            .as_str()
            .is_some_and(|d| d.starts_with("d-")),
        "{body}"
    );

    let mut seqs = Vec::new();
    for i in &mut instances {
        let change = i.next_change().await;
        assert_eq!(change.topic, "payments");
        assert_eq!((change.version, change.previous_version), (2, 1));
        assert_eq!(change.commit, commit.to_string());
        assert_eq!(change.message, "payments: new port");
        assert!(
            change.author.contains("ada@example.com"),
            "{}",
            change.author
        );
        assert_eq!(change.files.len(), 1, "only the modified file is sent");
        assert_eq!(change.files[0].status, FileStatus::Modified);
        assert_eq!(
            content(&change, "payments/app.toml").as_deref(),
            Some("port = 9443\n")
        );
        seqs.push(change.seq);
        i.ack("payments", 2, AckStatus::Applied, None).await;
    }
    assert!(
        seqs.iter().all(|s| *s == seqs[0]),
        "every instance sees the same seq: {seqs:?}"
    );
    // initial sync logged payments (and billing); this is the next change after them
    assert_eq!(seqs[0], 3);

    let topic = server
        .wait_topic("payments", |v| v["rollout"]["converged"] == true)
        .await;
    assert_eq!(topic["version"], 2);
    let applied: Vec<&str> = topic["rollout"]["applied"]
        .as_array()
        .expect("applied")
        .iter()
        .filter_map(|e| e["instance"].as_str())
        .collect();
    assert_eq!(applied, ["web-1", "web-2", "web-3"]);
    let (_, inst) = server.get("/api/v1/instances/web-2").await;
    assert_eq!(inst["connected"], true);
    assert_eq!(inst["topics"][0]["topic"], "payments");
    assert_eq!(inst["topics"][0]["applied_version"], 2);
    assert_eq!(inst["topics"][0]["status"], "applied");
    let (_, history) = server.get("/api/v1/topics/payments/history").await;
    let versions: Vec<u64> = history["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["version"].as_u64())
        .collect();
    assert_eq!(versions, [2, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_secret_token_push_is_delivered_when_the_provider_is_gitlab() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // The plain-text secret token counts only when the repo names GitLab (auto refuses it:
    // forges.rs).
    let server =
        TestServer::start(dir.path(), &repo, "[repos.webhook]\nprovider = \"gitlab\"").await;
    server.wait_syncs(1).await;
    let mut instances = Vec::new();
    for name in ["a", "b", "c"] {
        instances.push(Instance::subscribed(&server, name, &["billing"]).await.0);
    }

    let commit = repo
        .commit(
            "main",
            &[("billing/plans.yaml", Some(b"plans: [team]\n".as_slice()))],
            "gitlab push",
        )
        .expect("commit");
    let body = serde_json::json!({"object_kind": "push", "ref": "refs/heads/main", "before": "0".repeat(40), "after": commit.to_string()});
    let headers = [
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", SECRET),
        ("content-type", "application/json"),
    ];
    let (status, _) = server
        .webhook(&headers, body.to_string().into_bytes(), None)
        .await;
    assert_eq!(status, 202);
    for i in &mut instances {
        let c = i.next_change().await;
        assert_eq!((c.topic.as_str(), c.version), ("billing", 2));
        assert_eq!(
            content(&c, "billing/plans.yaml").as_deref(),
            Some("plans: [team]\n")
        );
    }

    // A wrong GitLab token is refused.
    let bad = [("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "nope")];
    assert_eq!(server.webhook(&bad, b"{}".to_vec(), None).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_encoded_github_push_is_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "a", &["billing"]).await;

    // GitHub's default content type: payload=<url-encoded JSON>, signature over the form body.
    let commit = repo
        .commit(
            "main",
            &[(
                "billing/plans.yaml",
                Some(b"plans: [team, pro]\n".as_slice()),
            )],
            "form push",
        )
        .expect("commit");
    let json =
        serde_json::json!({"ref": "refs/heads/main", "after": commit.to_string()}).to_string();
    let form = format!("payload={}", url_encode(&json));
    let headers = [
        ("x-github-event", "push"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    assert_eq!(
        server
            .webhook(&headers, form.into_bytes(), Some(SECRET))
            .await
            .0,
        202
    );
    let c = i.next_change().await;
    assert_eq!(c.version, 2);
    assert_eq!(
        content(&c, "billing/plans.yaml").as_deref(),
        Some("plans: [team, pro]\n")
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_deletes_and_moves_between_topics_show_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "r", &["payments", "billing"]).await;

    let commit = repo
        .rename(
            "main",
            "payments/app.toml",
            "payments/service.toml",
            "rename",
        )
        .expect("rename");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let c = i.next_change().await;
    assert_eq!(c.topic, "payments");
    assert_eq!(c.files.len(), 1);
    assert_eq!(c.files[0].status, FileStatus::Renamed);
    assert_eq!(c.files[0].path, "payments/service.toml");
    assert_eq!(c.files[0].old_path.as_deref(), Some("payments/app.toml"));
    assert_eq!(c.files[0].content.as_deref(), Some("port = 8443\n"));

    let commit = repo
        .commit("main", &[("payments/limits.json", None)], "delete limits")
        .expect("delete");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let c = i.next_change().await;
    assert_eq!((c.files.len(), c.files[0].status), (1, FileStatus::Deleted));
    assert_eq!(c.files[0].path, "payments/limits.json");
    assert!(c.files[0].content.is_none());

    // A file moved from one topic to another: deleted in one, added in the other.
    let commit = repo
        .rename(
            "main",
            "payments/service.toml",
            "billing/service.toml",
            "move",
        )
        .expect("move");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let (a, b) = (i.next_change().await, i.next_change().await);
    assert_eq!(
        (a.topic.as_str(), a.files[0].status),
        ("billing", FileStatus::Added)
    );
    assert_eq!(
        (b.topic.as_str(), b.files[0].status),
        ("payments", FileStatus::Deleted)
    );
    assert_eq!(b.seq, a.seq + 1, "one sync's changes take consecutive seqs");

    // The API shows the resulting state.
    let topic = server.wait_topic("payments", |v| v["version"] == 4).await;
    assert_eq!(topic["files"], Value::Array(vec![]));

    // Binary content travels base64-encoded and flagged.
    let commit = repo
        .commit(
            "main",
            &[("billing/logo.bin", Some([0u8, 255, 1, 2].as_slice()))],
            "binary",
        )
        .expect("binary");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let c = i.next_change().await;
    assert_eq!(c.files[0].encoding, confcast::protocol::Encoding::Base64);
    assert_eq!(c.files[0].content.as_deref(), Some("AP8BAg=="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhooks_get_clear_errors_and_trigger_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start_with(dir.path(), &repo, "max_body_bytes = 65536", "").await;
    let before = server.wait_syncs(1).await["syncs"].as_u64().expect("syncs");
    let (mut i, _) = Instance::subscribed(&server, "watcher", &["*"]).await;
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 1\n".as_slice()))],
            "pending",
        )
        .expect("commit");
    let after = commit.to_string();

    let (status, body) = server.github_push("main", &after, "wrong secret").await;
    assert_eq!(status, 401);
    assert!(
        body["error"]
            .as_str()
            .expect("error message")
            .contains("signature"),
        "{body}"
    );
    let unsigned = serde_json::json!({"ref": "refs/heads/main", "after": after})
        .to_string()
        .into_bytes();
    assert_eq!(
        server
            .webhook(&[("x-github-event", "push")], unsigned.clone(), None)
            .await
            .0,
        401
    );
    assert_eq!(
        server.webhook(&[], unsigned.clone(), None).await.0,
        401,
        "no forge headers at all"
    );

    let reply = server
        .http
        .post(server.url("/webhooks/nope"))
        .header("x-github-event", "push")
        .body("{}")
        .send()
        .await
        .expect("POST");
    assert_eq!(reply.status().as_u16(), 404);

    let huge = vec![b' '; 100 * 1024];
    assert_eq!(
        server
            .webhook(&[("x-github-event", "push")], huge, Some(SECRET))
            .await
            .0,
        413
    );

    let (status, body) = server
        .webhook(
            &[("x-github-event", "push")],
            b"{\"ref\": ".to_vec(),
            Some(SECRET),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .expect("message")
            .contains("malformed"),
        "{body}"
    );

    // Invalid UTF-8 and a form body without `payload`, both properly signed: 400, not a panic.
    let garbage = vec![0xff, 0xfe, 0x00, 0x80];
    assert_eq!(
        server
            .webhook(&[("x-github-event", "push")], garbage, Some(SECRET))
            .await
            .0,
        400
    );
    let form = [
        ("x-github-event", "push"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    assert_eq!(
        server
            .webhook(&form, b"other=1".to_vec(), Some(SECRET))
            .await
            .0,
        400
    );
    // A huge header still gets a clear 4xx (here 401: it carries no signature).
    // (Past hyper's ~400 KiB header buffer it answers 431 and closes; a client still writing may
    // then see a reset instead, so the test stays below that.)
    let huge_header = "x".repeat(256 * 1024);
    let status = server
        .http
        .post(server.url("/webhooks/cfg"))
        .header("x-github-event", "push")
        .header("x-padding", huge_header)
        .body("{}")
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(400..=499)), "a clear 4xx: {status:?}");
    // The server is still fine afterwards.
    assert_eq!(server.get("/healthz").await.0, 200);

    // Ping answers 200; other events and refs are ignored with a reason.
    assert_eq!(
        server
            .webhook(
                &[("x-github-event", "ping")],
                b"{\"zen\":\"x\"}".to_vec(),
                Some(SECRET)
            )
            .await
            .0,
        200
    );
    let (status, body) = server.github_push("feature/x", &after, SECRET).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    assert!(body["reason"]
        .as_str()
        .expect("reason")
        .contains("refs/heads/feature/x"));
    let tag = serde_json::json!({"ref": "refs/tags/v1", "after": after})
        .to_string()
        .into_bytes();
    let (status, body) = server
        .webhook(&[("x-github-event", "push")], tag, Some(SECRET))
        .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    let deleted =
        serde_json::json!({"ref": "refs/heads/main", "after": "0".repeat(40), "deleted": true})
            .to_string()
            .into_bytes();
    let (status, body) = server
        .webhook(&[("x-github-event", "push")], deleted, Some(SECRET))
        .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    let (status, body) = server
        .webhook(
            &[("x-github-event", "issues")],
            b"{}".to_vec(),
            Some(SECRET),
        )
        .await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));

    // None of that synced or published anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(repos["repos"][0]["syncs"].as_u64(), Some(before));
    assert!(
        i.maybe_next(Duration::from_millis(200)).await.is_none(),
        "no change was sent"
    );

    // The same push, properly signed, does go through.
    assert_eq!(server.github_push("main", &after, SECRET).await.0, 202);
    let c = i.next_change().await;
    assert_eq!((c.topic.as_str(), c.version), ("payments", 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_log_topics_and_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "keeper", &["payments"]).await;
    i.ack("payments", 1, AckStatus::Applied, None).await;
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 2\n".as_slice()))],
            "v2",
        )
        .expect("commit");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let c = i.next_change().await;
    i.ack(
        "payments",
        2,
        AckStatus::Failed,
        Some("port 2 is privileged"),
    )
    .await;

    server.stop().await;
    match i.session.next().await {
        Err(confcast::client::ClientError::Closed { code, .. }) => {
            assert_eq!(code, 1001, "going away on shutdown")
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    server.restart().await;
    server.wait_syncs(1).await;

    let topic = server.wait_topic("payments", |_| true).await;
    assert_eq!(topic["version"], 2);
    assert_eq!(topic["seq"], c.seq);
    assert_eq!(topic["rollout"]["failed"][0]["instance"], "keeper");
    assert_eq!(
        topic["rollout"]["failed"][0]["error"],
        "port 2 is privileged"
    );
    let (_, inst) = server.get("/api/v1/instances/keeper").await;
    assert_eq!(
        inst["connected"], false,
        "nobody is connected after the restart"
    );
    assert_eq!(inst["topics"][0]["applied_version"], 2);
    let (_, history) = server.get("/api/v1/topics/payments/history").await;
    assert_eq!(history["history"].as_array().map(Vec::len), Some(2));

    // A reconnecting instance resumes from its seq: the log replays what it missed, nothing more.
    let mut back = Instance::connect(&server, "keeper").await;
    back.session
        .subscribe(&["payments".into()], Some(c.seq - 1))
        .await
        .expect("subscribe");
    let replayed = back.next_change().await;
    assert_eq!((replayed.seq, replayed.version), (c.seq, 2));
    match back.next().await {
        ServerMessage::Subscribed { seq, mode, .. } => {
            assert_eq!((seq, mode.as_str()), (c.seq, "replay"))
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    // The reconnected instance shows as connected again.
    assert_eq!(
        server.get("/api/v1/instances/keeper").await.1["connected"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_client_gets_error_frames_and_harms_no_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut good, _) = Instance::subscribed(&server, "good", &["payments"]).await;

    // Raw socket: frames before hello, broken JSON, unknown types, bad acks.
    let (mut raw, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("raw connect");
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut expect_error = async |frame: Message, code: &str| {
        raw.send(frame).await.expect("send");
        loop {
            let msg = tokio::time::timeout(util::WAIT, raw.next())
                .await
                .expect("reply")
                .expect("open")
                .expect("frame");
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).expect("json");
                assert_eq!(v["type"], "error", "{v}");
                assert_eq!(v["code"], code, "{v}");
                return;
            }
        }
    };
    expect_error(
        Message::text(r#"{"type":"subscribe","topics":["payments"]}"#),
        "out_of_order",
    )
    .await;
    expect_error(Message::text("not json at all"), "malformed").await;
    expect_error(Message::text(r#"{"type":"launch_missiles"}"#), "malformed").await;
    expect_error(Message::binary(vec![0u8, 1, 2]), "malformed").await;
    expect_error(
        Message::text(r#"{"type":"hello","instance":""}"#),
        "invalid",
    )
    .await;
    expect_error(Message::text("\u{0}\u{ffff}"), "malformed").await;

    // The same connection still works once it speaks properly.
    raw.send(Message::text(r#"{"type":"hello","instance":"raw"}"#))
        .await
        .expect("hello");
    let welcome = raw.next().await.expect("open").expect("frame");
    assert!(welcome.to_text().expect("text").contains("welcome"));
    raw.send(Message::text(
        r#"{"type":"ack","topic":"payments","version":99,"status":"applied"}"#,
    ))
    .await
    .expect("ack");
    let err = raw.next().await.expect("open").expect("frame");
    assert!(
        err.to_text().expect("text").contains("unknown_version"),
        "{err:?}"
    );
    raw.send(Message::text(r#"{"type":"hello","instance":"raw"}"#))
        .await
        .expect("second hello");
    let err = raw.next().await.expect("open").expect("frame");
    assert!(
        err.to_text().expect("text").contains("out_of_order"),
        "{err:?}"
    );

    // Meanwhile the well-behaved instance gets its change as usual.
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 3\n".as_slice()))],
            "v2",
        )
        .expect("commit");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(good.next_change().await.version, 2);
    good.ack("payments", 2, AckStatus::Applied, None).await;

    // An instance sending a bogus ack through the client API gets an error, not a disconnect.
    good.session
        .send(&ClientMessage::Ack {
            topic: "nope".into(),
            version: 1,
            status: AckStatus::Applied,
            error: None,
        })
        .await
        .expect("send");
    match good.next().await {
        ServerMessage::Error { code, .. } => assert_eq!(code, "unknown_version"),
        other => panic!("expected error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_during_a_sync_coalesce_and_versions_only_go_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "c", &["payments"]).await;
    let mut last = String::new();
    for n in 0..10 {
        let body = format!("port = {n}\n");
        last = repo
            .commit(
                "main",
                &[("payments/app.toml", Some(body.as_bytes()))],
                "burst",
            )
            .expect("commit")
            .to_string();
        assert_eq!(server.github_push("main", &last, SECRET).await.0, 202);
    }
    let mut previous = 1;
    loop {
        let c = i.next_change().await;
        assert_eq!(c.previous_version, previous, "no version is skipped");
        previous = c.version;
        if c.commit == last {
            assert_eq!(
                content(&c, "payments/app.toml").as_deref(),
                Some("port = 9\n")
            );
            break;
        }
    }
    let repo_state = server.wait_syncs(2).await;
    assert_eq!(repo_state["head"], last);
    assert!(previous <= 11, "at most one version per push");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_json_errors_and_probes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    assert_eq!(server.get("/healthz").await.0, 200);
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    let (status, body) = server.get("/api/v1/topics/nope").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().expect("message").contains("nope"));
    assert_eq!(server.get("/api/v1/instances/ghost").await.0, 404);
    let (_, topics) = server.get("/api/v1/topics").await;
    let names: Vec<&str> = topics["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["topic"].as_str())
        .collect();
    assert_eq!(names, ["billing", "payments"]);
    let reply = server
        .http
        .post(server.url("/api/v1/repos/cfg/sync"))
        .send()
        .await
        .expect("POST");
    assert_eq!(reply.status().as_u16(), 202);
    server.wait_syncs(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_receives_the_same_bytes_for_a_change() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let mut raws = Vec::new();
    for n in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url())
            .await
            .expect("connect");
        ws.send(Message::text(format!(
            r#"{{"type":"hello","instance":"raw-{n}"}}"#
        )))
        .await
        .expect("hello");
        ws.send(Message::text(
            r#"{"type":"subscribe","topics":["payments"]}"#,
        ))
        .await
        .expect("subscribe");
        // welcome, snapshot, subscribed
        let mut seen = 0;
        while seen < 3 {
            if let Some(Ok(Message::Text(_))) = ws.next().await {
                seen += 1;
            }
        }
        raws.push(ws);
    }
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 77\n".as_slice()))],
            "same bytes",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    let mut frames = Vec::new();
    for ws in &mut raws {
        loop {
            let m = tokio::time::timeout(util::WAIT, ws.next())
                .await
                .expect("frame")
                .expect("open")
                .expect("ok");
            if let Message::Text(t) = m {
                frames.push(t.to_string());
                break;
            }
        }
    }
    assert!(frames[0].contains("\"type\":\"change\""), "{}", frames[0]);
    assert!(frames.iter().all(|f| *f == frames[0]), "identical frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_gets_a_clear_400() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = "POST /webhooks/cfg HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.expect("headers");
    tcp.write_all(br#"{"ref": "refs/he"#)
        .await
        .expect("part of the body");
    tcp.shutdown().await.expect("half close");
    let mut reply = String::new();
    let _ = tokio::time::timeout(util::WAIT, tcp.read_to_string(&mut reply))
        .await
        .expect("a reply");
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("could not read the request body"), "{reply}");
    assert_eq!(server.get("/healthz").await.0, 200);
}

// ---- safe to expose: a failing store, stuck syncs, expiry, credentials -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_moved_away_fails_readiness_and_is_logged_once_until_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = ServerProcess::start(dir.path(), &repo, "", "").await;
    let readyz = async || {
        let reply = server
            .http
            .get(server.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        let status = reply.status().as_u16();
        (status, reply.json::<Value>().await.expect("JSON"))
    };
    let db = dir.path().join("data").join("confcast.db");
    let aside = dir.path().join("aside.db");
    std::fs::rename(&db, &aside).expect("move the database away");
    let (status, body) = readyz().await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().expect("a reason");
    assert!(
        error.starts_with("store: ") && error.contains("moved away"),
        "{error}"
    );
    // Nobody has to poll for it: the health watch logs it, as an error.
    let line = server.wait_log(&["ERROR", "store unhealthy"]).await;
    assert!(line.contains("moved away"), "{line}");

    std::fs::rename(&aside, &db).expect("put it back");
    server.wait_log(&["INFO", "store healthy again"]).await;
    assert_eq!(readyz().await.0, 200);
    assert_eq!(
        server.log().matches("store unhealthy").count(),
        1,
        "one line when it went bad, not one per check"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_sqlite_file_fails_readiness_and_nothing_is_published_into_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "web-1", &["payments"]).await;

    // A restore from backup over the live file: the server still has the old one open.
    let db = server.data_dir.join("confcast.db");
    let restored = server.data_dir.join("restored.db");
    std::fs::copy(&db, &restored).expect("copy");
    std::fs::rename(&restored, &db).expect("replace");
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("replaced")),
        "{body}"
    );

    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 1\n".as_slice()))],
            "into the void?",
        )
        .expect("commit");
    assert_eq!(
        server
            .github_push("main", &commit.to_string(), SECRET)
            .await
            .0,
        202
    );
    let state = server.wait_syncs(2).await;
    assert!(
        state["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("replaced")),
        "{state}"
    );
    assert!(
        i.maybe_next(Duration::from_millis(500)).await.is_none(),
        "a change that would vanish at the next restart is not sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_a_repo_stuck_on_one_error_and_stays_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let origin = dir.path().join("origin.git");
    let aside = dir.path().join("origin-aside.git");
    std::fs::rename(&origin, &aside).expect("take the remote away");
    let sync = async || {
        let reply = server
            .http
            .post(server.url("/api/v1/repos/cfg/sync"))
            .send()
            .await
            .expect("POST sync");
        assert_eq!(reply.status().as_u16(), 202);
    };

    sync().await;
    let state = server.wait_syncs(2).await;
    assert!(state["last_error"].is_string(), "{state}");
    // One failure is a blip: still plainly ready.
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    assert_eq!(ready["degraded"], serde_json::json!([]));

    // Retries (backoff or forced) keep failing the same way: stuck.
    for n in 3..=4 {
        sync().await;
        server.wait_syncs(n).await;
    }
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("degraded")));
    let stuck = &ready["degraded"][0];
    assert_eq!(stuck["repo"], "cfg", "{ready}");
    assert!(stuck["consecutive_failures"].as_u64() >= Some(3), "{ready}");
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(stuck["error"], repos["repos"][0]["last_error"], "{ready}");

    std::fs::rename(&aside, &origin).expect("bring the remote back");
    sync().await;
    let recovered = tokio::time::timeout(util::WAIT, async {
        loop {
            let (_, ready) = server.get("/readyz").await;
            if ready["status"] == "ready" {
                return ready;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ready again after a successful sync");
    assert_eq!(recovered["degraded"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_gone_longer_than_the_expiry_no_longer_holds_back_a_rollout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start_with(
        dir.path(),
        &repo,
        "\n[limits]\ninstance_expiry_secs = 1",
        "",
    )
    .await;
    server.wait_syncs(1).await;
    let (mut gone, _) = Instance::subscribed(&server, "scaled-away", &["payments"]).await;
    gone.ack("payments", 1, AckStatus::Applied, None).await;
    let (mut stays, _) = Instance::subscribed(&server, "stays", &["payments"]).await;
    stays.ack("payments", 1, AckStatus::Applied, None).await;

    // Version 2 while `scaled-away` is still there, but never applies it.
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 2\n".as_slice()))],
            "v2",
        )
        .expect("commit");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(stays.next_change().await.version, 2);
    stays.ack("payments", 2, AckStatus::Applied, None).await;
    let names = |entries: &Value| -> Vec<String> {
        entries
            .as_array()
            .expect("rollout entries")
            .iter()
            .filter_map(|e| e["instance"].as_str().map(str::to_owned))
            .collect()
    };
    let topic = server
        .wait_topic("payments", |t| {
            t["version"] == 2
                && t["rollout"]["applied"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        })
        .await;
    assert_eq!(topic["rollout"]["converged"], false);
    assert_eq!(names(&topic["rollout"]["behind"]), ["scaled-away"]);

    // It is scaled away: disconnected, then forgotten once the expiry has passed.
    drop(gone);
    tokio::time::timeout(util::WAIT, async {
        loop {
            let (_, all) = server.get("/api/v1/instances").await;
            let ids: Vec<&str> = all["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .filter_map(|i| i["id"].as_str())
                .collect();
            if ids == ["stays"] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the disconnected instance is forgotten after the expiry");
    assert_eq!(server.get("/api/v1/instances/scaled-away").await.0, 404);
    let topic = server.get("/api/v1/topics/payments").await.1;
    assert_eq!(topic["rollout"]["converged"], true, "{topic}");
    assert_eq!(names(&topic["rollout"]["applied"]), ["stays"]);
    assert_eq!(names(&topic["rollout"]["behind"]), Vec::<String>::new());
    // Connected all along, longer than the expiry: never forgotten.
    let (_, stays_view) = server.get("/api/v1/instances/stays").await;
    assert_eq!(stays_view["connected"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_reach_neither_the_api_nor_the_log_nor_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens there: every fetch fails, and its error is shown and logged.
    let port = util::free_port();
    let repo_url =
        format!("http://bot:hunter2-secret@127.0.0.1:{port}/r.git?access_token=t0ken-in-query");
    let shown = format!("http://***@127.0.0.1:{port}/r.git?access_token=***");
    let secrets = [
        "hunter2-secret",
        "t0ken-in-query",
        "pg-pass-word",
        "pg-query-pass",
    ];
    let server = ServerProcess::start_url(dir.path(), &repo_url, "", "").await;
    let repos = tokio::time::timeout(util::WAIT, async {
        loop {
            let repos = server.get("/api/v1/repos").await;
            if repos["repos"][0]["last_error"].is_string() {
                return repos;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the fetch fails");
    assert_eq!(repos["repos"][0]["url"], shown.as_str(), "{repos}");
    let line = server.wait_log(&["sync failed"]).await;
    for secret in secrets {
        assert!(!repos.to_string().contains(secret), "{secret} in {repos}");
        assert!(
            !server.log().contains(secret),
            "{secret} in the log: {line}"
        );
    }

    let config = dir.path().join("check.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"postgres://confcast:pg-pass-word@127.0.0.1:1/confcast?password=pg-query-pass\"\n\n[[repos]]\nname = \"cfg\"\nurl = \"{repo_url}\"\nsecret = \"{SECRET}\"\n"
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run check-config");
    assert!(out.status.success(), "{out:?}");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("postgres://***@127.0.0.1:1/confcast?password=***"),
        "{printed}"
    );
    assert!(printed.contains(&shown), "{printed}");
    for secret in secrets {
        assert!(!printed.contains(secret), "{secret} in {printed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_websocket_default_limit_reach_instances() {
    // Two binary files of 7 MiB, each under the default max_file_bytes (8 MiB): one change and one
    // snapshot of about 19 MB in base64, over tungstenite's default 16 MiB frame limit and within
    // the client's (DEFAULT_MAX_FRAME_BYTES). A client that refused it would reconnect forever.
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "big", &["blobs"]).await;
    let blob = |seed: usize| -> Vec<u8> {
        (0..7 * 1024 * 1024)
            .map(|n: usize| (n.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    };
    let (a, b) = (blob(1), blob(2));
    let c = repo
        .commit(
            "main",
            &[
                ("blobs/a.bin", Some(a.as_slice())),
                ("blobs/b.bin", Some(b.as_slice())),
            ],
            "big",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    let change = i.next_change().await;
    assert_eq!(change.files.len(), 2);
    let decoded = |f: &confcast::protocol::FileChange| {
        confcast::protocol::decode_content(f.content.as_deref().expect("content"), f.encoding)
            .expect("base64")
    };
    assert!(decoded(&change.files[0]) == a && decoded(&change.files[1]) == b);
    let (_, snapshots) = Instance::subscribed(&server, "late", &["blobs"]).await;
    let files = &snapshots[0].files;
    let frame: usize = files.iter().map(|f| f.content.len()).sum();
    assert!(frame > 16 * 1024 * 1024, "{frame}");
}

/// A NUL in an ack's error is stored as U+FFFD, and an ack for a topic name with a NUL is refused
/// with an error frame: PostgreSQL refuses a NUL in text, and before this an ack carrying one
/// failed the batch of other instances' writes it shared a transaction with. Both stores, and an
/// honest instance acking at the same time gets its ack recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_with_a_nul_is_stored_or_refused_alone_on_both_stores() {
    let db = util::PgDatabase::create().await;
    let mut stores = vec![None];
    if let Some(db) = &db {
        stores.push(Some(db.url.clone()));
    }
    for store in stores {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = config_repo(dir.path());
        let server_extra = match &store {
            Some(url) => format!("\n[store]\nurl = \"{url}\""),
            None => String::new(),
        };
        let mut server = TestServer::start_with(dir.path(), &repo, "", &server_extra).await;
        server.wait_syncs(1).await;
        let (mut hostile, _) = Instance::subscribed(&server, "hostile", &["payments"]).await;
        let (mut honest, _) = Instance::subscribed(&server, "honest", &["payments"]).await;

        let nul_topic = ClientMessage::Ack {
            topic: "pay\0ments".into(),
            version: 1,
            status: AckStatus::Applied,
            error: None,
        };
        hostile.session.send(&nul_topic).await.expect("send");
        match hostile.next().await {
            ServerMessage::Error { code, message } => {
                assert_eq!(code, "unknown_version", "{message}");
                assert!(message.contains("control"), "{message}");
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
        let (send_bad, _) = tokio::join!(
            hostile.ack(
                "payments",
                1,
                AckStatus::Failed,
                Some("bad\0byte in \0 the error")
            ),
            honest.ack("payments", 1, AckStatus::Applied, None),
        );
        let () = send_bad;
        let (_, acks) = server.get("/api/v1/topics/payments").await;
        let text = acks.to_string();
        assert!(
            text.contains("bad\u{fffd}byte in \u{fffd} the error"),
            "{store:?}: {text}"
        );
        assert!(text.contains("honest"), "{store:?}: {text}");
        server.stop().await;
    }
}
