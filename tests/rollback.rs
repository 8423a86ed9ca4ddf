//! Rollback and pin, end to end: a real server with credentials, a real repo and real
//! instances. A rollback publishes an earlier version's files as a new version that instances
//! apply, and records who asked and why; the next push to the topic gives exactly the git tree;
//! a pin holds pushes back (listed, capped) until the unpin publishes the git state, and survives
//! a restart; only admin tokens write, and every bad request gets a clear answer.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use confcast::client::{Identity, Session};
use confcast::protocol::{decode_content, AckStatus, Change, FileStatus, ServerMessage};
use serde_json::{json, Value};
use util::*;

/// An instance with the ops credential (every topic), subscribed to `topics`.
async fn instance(server: &TestServer, name: &str, topics: &[&str]) -> Instance {
    let identity = Identity {
        instance: name.into(),
        app: Some("test".into()),
        ..Default::default()
    };
    let session = Session::connect_with(&server.ws_url(), &identity, Some(OPS_TOKEN))
        .await
        .expect("instance connects");
    let mut i = Instance {
        name: name.into(),
        session,
    };
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    i.session.subscribe(&topics, None).await.expect("subscribe");
    let mut versions = Vec::new();
    loop {
        match i.next().await {
            ServerMessage::Snapshot(s) => versions.push((s.topic, s.version)),
            ServerMessage::Subscribed { .. } => break,
            other => panic!("{name}: unexpected frame while subscribing: {other:?}"),
        }
    }
    for (topic, version) in versions {
        i.ack(&topic, version, AckStatus::Applied, None).await;
    }
    i
}

/// `method path` with `token` and a JSON `body`, as (status, body).
async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let reply = request.send().await.expect("request");
    let status = reply.status().as_u16();
    let text = reply.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn get(server: &TestServer, path: &str) -> Value {
    let (status, body) = call(server, reqwest::Method::GET, path, Some(READ_TOKEN), None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn rollback(server: &TestServer, topic: &str, version: u64, reason: &str) -> (u16, Value) {
    call(
        server,
        reqwest::Method::POST,
        &format!("/api/v1/topics/{topic}/rollback"),
        Some(ADMIN_TOKEN),
        Some(json!({"version": version, "reason": reason})),
    )
    .await
}

/// Commits `files` on main and tells the server; waits until the sync published the commit.
async fn push(server: &TestServer, repo: &ConfigRepo, files: &[(&str, Option<&[u8]>)]) -> String {
    let commit = repo
        .commit("main", files, &format!("change {}", files[0].0))
        .expect("commit")
        .to_string();
    let (status, _) = server.github_push("main", &commit, SECRET).await;
    assert_eq!(status, 202);
    tokio::time::timeout(WAIT, async {
        loop {
            if get(server, "/api/v1/repos").await["repos"][0]["head"] == commit.as_str() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the push was synced in time");
    commit
}

/// A change's files as path -> (status, content).
fn files_of(change: &Change) -> BTreeMap<String, (FileStatus, Option<String>)> {
    change
        .files
        .iter()
        .map(|f| {
            let content = f.content.as_ref().map(|c| {
                String::from_utf8(decode_content(c, f.encoding).expect("content")).expect("utf-8")
            });
            (f.path.clone(), (f.status, content))
        })
        .collect()
}

/// The topic's stored files as path -> sha, from the API.
async fn stored(server: &TestServer, topic: &str) -> BTreeMap<String, String> {
    let v = get(server, &format!("/api/v1/topics/{topic}")).await;
    v["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap_or_default().to_string(),
                f["sha"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The files of `topic`'s directory in the git tree at the head of main, as path -> blob id.
fn git_tree(repo: &ConfigRepo, topic: &str) -> BTreeMap<String, String> {
    let git = git2::Repository::open_bare(repo.path()).expect("open");
    let tree = git
        .find_reference("refs/heads/main")
        .and_then(|r| r.peel_to_tree())
        .expect("tree");
    let mut files = BTreeMap::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(git2::ObjectType::Blob) {
            let path = format!("{dir}{}", entry.name().unwrap_or_default());
            if path.starts_with(&format!("{topic}/")) {
                files.insert(path, entry.id().to_string());
            }
        }
        git2::TreeWalkResult::Ok
    })
    .expect("walk");
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_a_new_version_instances_apply_and_the_next_push_gives_the_git_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let mut web = instance(&server, "web-1", &["payments"]).await;
    let v1 = stored(&server, "payments").await;

    push(
        &server,
        &repo,
        &[
            ("payments/app.toml", Some(b"port = 9000\n")),
            ("payments/new.toml", Some(b"x = 1\n")),
        ],
    )
    .await;
    let v2 = web.next_change().await;
    assert_eq!(v2.version, 2);
    web.ack("payments", 2, AckStatus::Applied, None).await;

    // Roll back to v1: a new version 3 with v1's files, as a change from v2.
    let (status, body) = rollback(&server, "payments", 1, "port 9000 broke checkout").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "published");
    assert_eq!(body["version"], 3);
    assert_eq!(body["rollback_of"], 1);
    let v3 = web.next_change().await;
    assert_eq!((v3.version, v3.previous_version), (3, 2));
    assert_eq!(v3.author, "operator");
    assert_eq!(v3.message, "rollback to v1: port 9000 broke checkout");
    assert_eq!(
        files_of(&v3),
        BTreeMap::from([
            (
                "payments/app.toml".to_string(),
                (FileStatus::Modified, Some("port = 8443\n".to_string()))
            ),
            ("payments/new.toml".to_string(), (FileStatus::Deleted, None)),
        ])
    );
    web.ack("payments", 3, AckStatus::Applied, None).await;
    assert_eq!(stored(&server, "payments").await, v1, "v3 holds v1's files");
    let topic = get(&server, "/api/v1/topics/payments").await;
    assert_eq!(topic["version"], 3);
    assert_eq!(topic["rollout"]["converged"], true, "{topic}");

    // The history says who asked and why; so does the audit log.
    let history = get(&server, "/api/v1/topics/payments/history").await;
    let newest = &history["history"][0];
    assert_eq!(newest["version"], 3);
    assert_eq!(newest["rollback_of"], 1);
    assert_eq!(newest["requested_by"], "operator");
    assert_eq!(newest["reason"], "port 9000 broke checkout");
    assert!(history["history"][1].get("rollback_of").is_none());
    let (_, audit) = call(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit?action=rollback",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    let entry = &audit["entries"][0];
    assert_eq!(entry["actor"], "operator");
    assert_eq!(entry["target"], "payments");
    assert_eq!(entry["detail"]["to"], 1);
    assert_eq!(entry["detail"]["reason"], "port 9000 broke checkout");

    // Rolling back to what is already there publishes nothing.
    let (status, body) = rollback(&server, "payments", 1, "again").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "unchanged");

    // A push to another topic leaves the rollback in place.
    push(
        &server,
        &repo,
        &[("billing/plans.yaml", Some(b"plans: [pro]\n"))],
    )
    .await;
    assert!(web.maybe_next(Duration::from_millis(500)).await.is_none());
    assert_eq!(stored(&server, "payments").await, v1);

    // A push touching one file of the topic publishes its whole git state: the result is
    // exactly the git tree, not the rolled-back files plus the one change.
    push(
        &server,
        &repo,
        &[("payments/limits.json", Some(br#"{"daily": 200}"#))],
    )
    .await;
    let v4 = web.next_change().await;
    assert_eq!(v4.version, 4);
    assert_eq!(
        files_of(&v4),
        BTreeMap::from([
            (
                "payments/app.toml".to_string(),
                (FileStatus::Modified, Some("port = 9000\n".to_string()))
            ),
            (
                "payments/limits.json".to_string(),
                (FileStatus::Modified, Some(r#"{"daily": 200}"#.to_string()))
            ),
            (
                "payments/new.toml".to_string(),
                (FileStatus::Added, Some("x = 1\n".to_string()))
            ),
        ])
    );
    assert_eq!(
        stored(&server, "payments").await,
        git_tree(&repo, "payments")
    );

    // From there on, pushes are diffs again.
    push(&server, &repo, &[("payments/new.toml", Some(b"x = 2\n"))]).await;
    let v5 = web.next_change().await;
    assert_eq!(
        files_of(&v5),
        BTreeMap::from([(
            "payments/new.toml".to_string(),
            (FileStatus::Modified, Some("x = 2\n".to_string()))
        )])
    );
    assert_eq!(
        stored(&server, "payments").await,
        git_tree(&repo, "payments")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_holds_pushes_back_survives_a_restart_and_the_unpin_publishes_git() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = format!("{}\n[limits]\nmax_held_changes = 2\n", auth_toml());
    let mut server = start_secured(dir.path(), &repo, "", &top).await;
    let mut web = instance(&server, "web-1", &["payments"]).await;

    let (status, body) = call(
        &server,
        reqwest::Method::PUT,
        "/api/v1/topics/payments/pin",
        Some(ADMIN_TOKEN),
        Some(json!({"reason": "freeze during the audit"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pinned"]["by"], "operator");
    assert_eq!(body["version"], 1);
    // Pinning twice is refused.
    let (status, body) = call(
        &server,
        reqwest::Method::PUT,
        "/api/v1/topics/payments/pin",
        Some(ADMIN_TOKEN),
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    // Three pushes: synced and listed, never published; the list keeps the newest two.
    let mut commits = Vec::new();
    for port in [9001, 9002, 9003] {
        let content = format!("port = {port}\n");
        commits.push(
            push(
                &server,
                &repo,
                &[("payments/app.toml", Some(content.as_bytes()))],
            )
            .await,
        );
    }
    assert!(web.maybe_next(Duration::from_millis(500)).await.is_none());
    let topic = get(&server, "/api/v1/topics/payments").await;
    assert_eq!(topic["version"], 1);
    let pinned = &topic["pinned"];
    assert_eq!(pinned["reason"], "freeze during the audit");
    assert_eq!(pinned["held_total"], 3);
    let held: Vec<&str> = pinned["held"]
        .as_array()
        .expect("held list")
        .iter()
        .map(|h| h["commit"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(held, [commits[1].as_str(), commits[2].as_str()]);
    assert_eq!(pinned["held"][1]["author"], "Ada Config <ada@example.com>");
    assert_eq!(pinned["held"][1]["files"], 1);
    let list = get(&server, "/api/v1/topics").await;
    let entries = list["topics"].as_array().expect("topics");
    let payments = entries
        .iter()
        .find(|t| t["topic"] == "payments")
        .expect("payments");
    assert_eq!(payments["pinned"]["by"], "operator");
    let billing = entries
        .iter()
        .find(|t| t["topic"] == "billing")
        .expect("billing");
    assert!(billing["pinned"].is_null());

    // A rollback of a pinned topic is refused: unpin first.
    let (status, body) = rollback(&server, "payments", 1, "no").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unpin it first"),
        "{body}"
    );

    // The pin is in the store: it survives a restart, and the first sync after it holds too.
    drop(web);
    server.restart().await;
    wait_synced(&server).await;
    let topic = get(&server, "/api/v1/topics/payments").await;
    assert_eq!(topic["version"], 1);
    assert_eq!(topic["pinned"]["held_total"], 3);
    let mut web = instance(&server, "web-1", &["payments"]).await;

    // Unpinned: one new version with the git state, whatever was held.
    let (status, body) = call(
        &server,
        reqwest::Method::DELETE,
        "/api/v1/topics/payments/pin",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["held_total"], 3);
    let v2 = web.next_change().await;
    assert_eq!((v2.version, v2.previous_version), (2, 1));
    assert_eq!(
        files_of(&v2),
        BTreeMap::from([(
            "payments/app.toml".to_string(),
            (FileStatus::Modified, Some("port = 9003\n".to_string()))
        )])
    );
    assert_eq!(
        stored(&server, "payments").await,
        git_tree(&repo, "payments")
    );
    assert!(get(&server, "/api/v1/topics/payments").await["pinned"].is_null());
    assert!(web.maybe_next(Duration::from_millis(300)).await.is_none());

    // Pin at an earlier version: a rollback, then the pin; the unpin brings git back.
    let (status, body) = call(
        &server,
        reqwest::Method::PUT,
        "/api/v1/topics/payments/pin",
        Some(ADMIN_TOKEN),
        Some(json!({"reason": "back to the known good", "version": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rollback"]["version"], 3);
    assert_eq!(body["version"], 3);
    let v3 = web.next_change().await;
    assert_eq!(
        files_of(&v3)["payments/app.toml"].1.as_deref(),
        Some("port = 8443\n")
    );
    let (status, _) = call(
        &server,
        reqwest::Method::DELETE,
        "/api/v1/topics/payments/pin",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let v4 = web.next_change().await;
    assert_eq!(v4.version, 4);
    assert_eq!(
        stored(&server, "payments").await,
        git_tree(&repo, "payments")
    );

    let (_, audit) = call(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit",
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["target"] == "payments")
        .map(|e| e["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        actions,
        ["unpin", "pin", "unpin", "pin"],
        "newest first: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_write_and_bad_requests_are_answered_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = format!("{}\n[limits]\nmax_reason_bytes = 16\n", auth_toml());
    let server = start_secured(dir.path(), &repo, "", &top).await;
    let body = json!({"version": 1, "reason": "why"});
    let rollback_path = "/api/v1/topics/payments/rollback";
    let pin_path = "/api/v1/topics/payments/pin";
    for (method, path, token, want) in [
        (reqwest::Method::POST, rollback_path, Some(READ_TOKEN), 403),
        (reqwest::Method::POST, rollback_path, None, 401),
        (reqwest::Method::PUT, pin_path, Some(READ_TOKEN), 403),
        (reqwest::Method::PUT, pin_path, None, 401),
        (reqwest::Method::DELETE, pin_path, Some(READ_TOKEN), 403),
        (reqwest::Method::DELETE, pin_path, None, 401),
    ] {
        let (status, reply) = call(&server, method.clone(), path, token, Some(body.clone())).await;
        assert_eq!(status, want, "{method} {path}: {reply}");
    }
    // The read token still reads.
    assert!(get(&server, "/api/v1/topics/payments").await["pinned"].is_null());

    let admin = |method: reqwest::Method, path: &'static str, body: Option<Value>| {
        let server = &server;
        async move { call(server, method, path, Some(ADMIN_TOKEN), body).await }
    };
    for (version, want) in [(99, "has no version 99"), (0, "has no version 0")] {
        let (status, reply) = admin(
            reqwest::Method::POST,
            rollback_path,
            Some(json!({"version": version, "reason": "x"})),
        )
        .await;
        assert_eq!(status, 404, "{reply}");
        assert!(
            reply["error"].as_str().unwrap_or_default().contains(want),
            "{reply}"
        );
    }
    let (status, reply) = admin(
        reqwest::Method::POST,
        "/api/v1/topics/nope/rollback",
        Some(json!({"version": 1, "reason": "x"})),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("no topic `nope`"))
    );
    for (body, want) in [
        (json!({"version": 1, "reason": " "}), "must say why"),
        (
            json!({"version": 1, "reason": "much longer than sixteen bytes"}),
            "limits.max_reason_bytes",
        ),
        (json!({"version": 1}), "missing field `reason`"),
        (
            json!({"version": 1, "reason": "x", "force": true}),
            "unknown field",
        ),
    ] {
        let (status, reply) = admin(reqwest::Method::POST, rollback_path, Some(body)).await;
        assert_eq!(status, 400, "{reply}");
        assert!(
            reply["error"].as_str().unwrap_or_default().contains(want),
            "{reply}"
        );
    }
    let (status, reply) = admin(reqwest::Method::DELETE, pin_path, None).await;
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("topic `payments` is not pinned"))
    );
    // A body over the cap is not read.
    let huge = json!({"version": 1, "reason": "x".repeat(100_000)});
    let (status, _) = admin(reqwest::Method::POST, rollback_path, Some(huge)).await;
    assert_eq!(status, 413);
    // A write without its suffix is no endpoint.
    let (status, _) = admin(
        reqwest::Method::POST,
        "/api/v1/topics/payments",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 404);
    // None of the refused writes changed anything.
    let topic = get(&server, "/api/v1/topics/payments").await;
    assert_eq!(topic["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_retention_removed_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = format!("{}\n[retention]\nmax_events = 2\n", auth_toml());
    let server = start_secured(dir.path(), &repo, "", &top).await;
    // payments v1 and billing v1 are seqs 1 and 2; payments v2..v4 are 3..5: v3 and v4 stay.
    for port in [1, 2, 3] {
        let content = format!("port = {port}\n");
        push(
            &server,
            &repo,
            &[("payments/app.toml", Some(content.as_bytes()))],
        )
        .await;
    }
    let (status, body) = rollback(&server, "payments", 2, "too old").await;
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("version 2 of topic `payments` can no longer be rebuilt exactly")
            && error.contains("versions 3 to 4"),
        "{error}"
    );
    // v3 is in the log, with the one file changed after it.
    let (status, body) = rollback(&server, "payments", 3, "kept").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 5);
    let topic = get(&server, "/api/v1/topics/payments").await;
    let app = topic["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "payments/app.toml")
        .expect("app.toml")
        .clone();
    let blob = git2::Repository::open_bare(repo.path())
        .and_then(|g| g.blob("port = 2\n".as_bytes()))
        .expect("blob id");
    assert_eq!(app["sha"], blob.to_string());
}

/// Two replicas on one PostgreSQL database: a pin made on one holds the syncs of the other, which
/// lists what it held; the unpin on the other publishes; a rollback on the first reaches an
/// instance connected to the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_and_rollbacks_hold_across_replicas() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let replicas = start_replicas(dir.path(), &repo, &db, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let identity = Identity {
        instance: "web-b".into(),
        ..Default::default()
    };
    let session = Session::connect(&b.ws_url(), &identity)
        .await
        .expect("connects to b");
    let mut web = Instance {
        name: "web-b".into(),
        session,
    };
    web.session
        .subscribe(&["payments".to_string()], None)
        .await
        .expect("subscribe");
    loop {
        if let ServerMessage::Subscribed { .. } = web.next().await {
            break;
        }
    }
    let send = |p: &ServerProcess, method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = p.http.request(method, p.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let reply = request.send().await.expect("request");
            let status = reply.status().as_u16();
            (status, reply.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let (status, body) = send(
        a,
        reqwest::Method::PUT,
        "/api/v1/topics/payments/pin",
        Some(json!({"reason": "freeze"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9100\n"))],
            "held on b",
        )
        .expect("commit")
        .to_string();
    assert_eq!(b.github_push(&commit).await, 202);
    tokio::time::timeout(WAIT, async {
        loop {
            let topic = a.get("/api/v1/topics/payments").await;
            if topic["pinned"]["held"][0]["commit"] == commit.as_str() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("replica b's sync held the change, seen from a");
    assert!(web.maybe_next(Duration::from_millis(500)).await.is_none());
    let (status, _) = send(
        b,
        reqwest::Method::POST,
        "/api/v1/topics/payments/rollback",
        Some(json!({"version": 1, "reason": "x"})),
    )
    .await;
    assert_eq!(status, 409, "replica b sees the pin made on a");

    let (status, body) = send(
        b,
        reqwest::Method::DELETE,
        "/api/v1/topics/payments/pin",
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let v2 = web.next_change().await;
    assert_eq!(v2.version, 2);
    assert_eq!(
        files_of(&v2)["payments/app.toml"].1.as_deref(),
        Some("port = 9100\n")
    );
    assert!(a.get("/api/v1/topics/payments").await["pinned"].is_null());

    let (status, body) = send(
        a,
        reqwest::Method::POST,
        "/api/v1/topics/payments/rollback",
        Some(json!({"version": 1, "reason": "from a"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v3 = web.next_change().await;
    assert_eq!(
        (v3.version, v3.message.as_str()),
        (3, "rollback to v1: from a")
    );
}
