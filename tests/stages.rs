//! Issue 14, progressive rollouts, end to end: 20 real instances with labels on a real server,
//! real pushes and signed webhooks. A 10% / 50% / all policy reaches 2, then 10, then 20
//! instances, promoting only on acks; a canary's `failed` halts it at the first stage and
//! `auto_revert` gives the canaries the old content back; an instance reconnecting during a rollout
//! gets its stage's version; an operator promotes, halts and aborts through the API.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confcast::client::{Client, ClientOptions, Delivery, Identity, Session, Update, UpdateKind};
use confcast::protocol::{decode_content, AckStatus, Change, ServerMessage, Snapshot};
use serde_json::{json, Value};
use tokio::sync::watch;
use util::{
    config_repo, start_replicas_with, start_secured, ConfigRepo, PgDatabase, TestServer,
    ADMIN_TOKEN, READ_TOKEN, SECRET, WAIT,
};

const INSTANCES: usize = 20;

/// What every instance received, by instance: the `change` frames of `payments`.
type Seen = Arc<Mutex<BTreeMap<String, Vec<Change>>>>;

fn name(i: usize) -> String {
    format!("inst-{i:02}")
}

fn labels(i: usize) -> BTreeMap<String, String> {
    let zone = if i.is_multiple_of(4) { "eu-1" } else { "us-1" };
    BTreeMap::from([("zone".to_string(), zone.to_string())])
}

async fn connect(url: &str, i: usize) -> (Session, Vec<Snapshot>) {
    let identity = Identity {
        instance: name(i),
        app: Some("web".into()),
        labels: labels(i),
    };
    let mut session = Session::connect(url, &identity)
        .await
        .expect("instance connects");
    session
        .subscribe(&["payments".to_string()], None)
        .await
        .expect("subscribe");
    let mut snapshots = Vec::new();
    loop {
        let frame = tokio::time::timeout(WAIT, session.next())
            .await
            .expect("subscribe answered in time")
            .expect("connection up");
        match frame {
            ServerMessage::Snapshot(s) => snapshots.push(s),
            ServerMessage::Subscribed { .. } => return (session, snapshots),
            other => panic!("unexpected while subscribing: {other:?}"),
        }
    }
}

/// Runs instance `i`, which holds version `held`: records every `payments` change and, once
/// `gate` is open, acks each new version with `verdict(version)` (and first `held` itself, when
/// `ack_held`: a snapshot it got on reconnecting).
fn run(
    mut session: Session,
    i: usize,
    (mut held, ack_held): (u64, bool),
    seen: Seen,
    mut gate: watch::Receiver<bool>,
    verdict: fn(u64) -> AckStatus,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if ack_held {
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            let _ = session.ack("payments", held, verdict(held), None).await;
        }
        loop {
            let frame = match session.next().await {
                Ok(frame) => frame,
                Err(_) => return,
            };
            let ServerMessage::Change(change) = frame else {
                continue;
            };
            seen.lock()
                .expect("seen")
                .entry(name(i))
                .or_default()
                .push(change.clone());
            if change.version <= held {
                continue; // a duplicate: the stages reached get each promotion's change again
            }
            if change.previous_version != held {
                continue; // a gap: `gapless` fails the test
            }
            held = change.version;
            if gate.wait_for(|open| *open).await.is_err() {
                return;
            }
            let status = verdict(change.version);
            let error = (status == AckStatus::Failed).then(|| "check failed: bad port".to_string());
            if session
                .ack("payments", change.version, status, error)
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

fn applied(_: u64) -> AckStatus {
    AckStatus::Applied
}

fn canary_fails(version: u64) -> AckStatus {
    if version == 2 {
        AckStatus::Failed
    } else {
        AckStatus::Applied
    }
}

async fn start(dir: &std::path::Path, repo: &ConfigRepo, policy: &str) -> TestServer {
    let server = TestServer::start_with(dir, repo, "", &format!("\n{policy}")).await;
    server.wait_syncs(1).await;
    server
}

/// Connects the 20 instances, each applying and acking the snapshot of v1; instance `i` to
/// `urls[i % urls.len()]`.
async fn fleet(urls: &[String]) -> Vec<Session> {
    let mut sessions = Vec::new();
    for i in 0..INSTANCES {
        let (mut session, snapshots) = connect(&urls[i % urls.len()], i).await;
        assert_eq!(snapshots.len(), 1);
        assert_eq!(snapshots[0].version, 1);
        session
            .ack("payments", 1, AckStatus::Applied, None)
            .await
            .expect("ack v1");
        sessions.push(session);
    }
    sessions
}

/// Connects the fleet ([`fleet`]) and runs every instance ([`run`]) from v1, acking each new
/// version with `verdict` once `gate` is open.
async fn run_fleet(
    urls: &[String],
    seen: &Seen,
    gate: &watch::Receiver<bool>,
    verdict: fn(u64) -> AckStatus,
) -> Vec<tokio::task::JoinHandle<()>> {
    fleet(urls)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, s)| run(s, i, (1, false), seen.clone(), gate.clone(), verdict))
        .collect()
}

async fn push(server: &TestServer, repo: &ConfigRepo, content: &str, message: &str) {
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(content.as_bytes()))],
            message,
        )
        .expect("commit");
    let (status, body) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202, "{body}");
}

/// Instances that received `version`, grouped by the seq of the first change that gave it.
fn reached(seen: &Seen, version: u64) -> BTreeMap<u64, BTreeSet<String>> {
    let mut groups: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (instance, changes) in seen.lock().expect("seen").iter() {
        if let Some(first) = changes.iter().find(|c| c.version == version) {
            groups
                .entry(first.seq)
                .or_default()
                .insert(instance.clone());
        }
    }
    groups
}

/// Asserts that every instance could apply what it received: each change above the version it
/// held starts from that version (PROTOCOL.md 8.6).
fn gapless(seen: &Seen) {
    for (instance, changes) in seen.lock().expect("seen").iter() {
        let mut held = 1;
        for c in changes {
            if c.version > held {
                assert_eq!(
                    c.previous_version, held,
                    "{instance}: a change it cannot apply: {c:?}"
                );
                held = c.version;
            }
        }
    }
}

fn holders(seen: &Seen, version: u64) -> usize {
    reached(seen, version).values().map(BTreeSet::len).sum()
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn stages(server: &TestServer) -> Value {
    server.get("/api/v1/topics/payments").await.1["stages"].clone()
}

async fn post(server: &TestServer, action: &str, reason: &str) -> (u16, Value) {
    let reply = server
        .http
        .post(server.url(&format!("/api/v1/topics/payments/rollout/{action}")))
        .json(&json!({ "reason": reason }))
        .send()
        .await
        .expect("POST");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

const TEN_FIFTY_ALL: &str = r#"
[[rollouts]]
name = "canary"
topics = ["payments"]
stages = ["10%", "50%"]
bake_secs = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_then_fifty_then_all_percent_promoting_only_on_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, TEN_FIFTY_ALL).await;
    let seen: Seen = Arc::default();
    let (gate, gated) = watch::channel(false);
    let tasks = run_fleet(&[server.ws_url()], &seen, &gated, applied).await;

    push(&server, &repo, "port = 9443\n", "payments: new port").await;
    wait_for("the first stage", || holders(&seen, 2) == 2).await;
    // Well past the bake time, with no ack: the rollout stays at its first stage.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(holders(&seen, 2), 2, "no promotion without acks");
    let st = stages(&server).await;
    assert_eq!(st["state"], "rolling", "{st}");
    assert_eq!(st["stage"], 1, "{st}");
    assert_eq!(st["members"], 2, "{st}");
    assert_eq!(st["applied"], 0, "{st}");

    // An instance outside the stage that reconnects gets v1; one inside gets v2. The new
    // connection takes the instance over (the old one is closed), and runs on.
    let canary: usize = reached(&seen, 2)
        .values()
        .flatten()
        .next()
        .and_then(|n| n.strip_prefix("inst-"))
        .and_then(|n| n.parse().ok())
        .expect("a canary");
    let outside = (0..INSTANCES)
        .find(|i| !reached(&seen, 2).values().flatten().any(|n| *n == name(*i)))
        .expect("an instance outside");
    let mut tasks = tasks;
    for (i, expected) in [(canary, 2), (outside, 1)] {
        let (session, snapshots) = connect(&server.ws_url(), i).await;
        assert_eq!(snapshots.len(), 1);
        assert_eq!(
            snapshots[0].version,
            expected,
            "{} reconnecting gets its stage's version",
            name(i)
        );
        tasks.push(run(
            session,
            i,
            (expected, true),
            seen.clone(),
            gated.clone(),
            applied,
        ));
    }

    gate.send_replace(true);
    wait_for("every instance on v2", || holders(&seen, 2) == INSTANCES).await;
    let st = server
        .wait_topic("payments", |t| t["stages"]["state"] == "completed")
        .await;
    let groups: Vec<usize> = reached(&seen, 2).values().map(BTreeSet::len).collect();
    assert_eq!(groups, [2, 8, 10], "2, then 10, then 20: {st}");
    for changes in seen.lock().expect("seen").values() {
        let v2 = changes.iter().find(|c| c.version == 2).expect("v2");
        assert_eq!(v2.previous_version, 1);
        let content = &v2
            .files
            .iter()
            .find(|f| f.path == "payments/app.toml")
            .expect("file");
        let bytes = decode_content(
            content.content.as_deref().expect("content"),
            content.encoding,
        )
        .expect("decodes");
        assert_eq!(bytes, b"port = 9443\n");
    }
    gapless(&seen);
    for t in tasks {
        t.abort();
    }
}

const CANARY_REVERT: &str = r#"
[[rollouts]]
name = "canary"
topics = ["payments"]
stages = ["10%", "50%"]
bake_secs = 1
auto_revert = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_halts_the_first_stage_and_auto_revert_restores_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, CANARY_REVERT).await;
    let seen: Seen = Arc::default();
    let (_gate, gated) = watch::channel(true);
    let tasks = run_fleet(&[server.ws_url()], &seen, &gated, canary_fails).await;

    // Valid TOML (the server would hold back a file that does not parse), a port the
    // instances refuse.
    push(&server, &repo, "port = 1\n", "payments: a bad port").await;
    let st = server
        .wait_topic("payments", |t| {
            t["stages"]["state"] == "aborted" && t["version"] == 3
        })
        .await;
    assert!(
        st["stages"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("failed")),
        "{st}"
    );
    assert_eq!(
        st["stages"]["version"], 3,
        "the old content as a new version: {st}"
    );
    wait_for("every instance on v3", || holders(&seen, 3) == INSTANCES).await;
    assert_eq!(
        holders(&seen, 2),
        2,
        "18 instances never got the bad version"
    );
    let canaries: BTreeSet<String> = reached(&seen, 2).into_values().flatten().collect();
    for (instance, changes) in seen.lock().expect("seen").iter() {
        let v3 = changes.iter().find(|c| c.version == 3).expect("v3");
        if canaries.contains(instance) {
            assert_eq!(v3.previous_version, 2, "{instance}");
            let f = v3
                .files
                .iter()
                .find(|f| f.path == "payments/app.toml")
                .expect("file");
            let bytes = decode_content(f.content.as_deref().expect("content"), f.encoding)
                .expect("decodes");
            assert_eq!(
                bytes, b"port = 8443\n",
                "{instance} has the old content back"
            );
        } else {
            assert_eq!(v3.previous_version, 1, "{instance}");
            assert!(v3.files.is_empty(), "{instance}: nothing to change: {v3:?}");
        }
    }
    gapless(&seen);
    for t in tasks {
        t.abort();
    }
}

const MANUAL: &str = r#"
[[rollouts]]
name = "slow"
topics = ["payments"]
stages = ["zone=eu-1", "50%"]
bake_secs = 3600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_promotes_halts_and_aborts_a_labelled_rollout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, MANUAL).await;
    let seen: Seen = Arc::default();
    let (_gate, gated) = watch::channel(true);
    let tasks = run_fleet(&[server.ws_url()], &seen, &gated, applied).await;

    push(&server, &repo, "port = 7443\n", "payments: port 7443").await;
    let eu: BTreeSet<String> = (0..INSTANCES)
        .filter(|i| labels(*i)["zone"] == "eu-1")
        .map(name)
        .collect();
    wait_for("the eu-1 stage", || holders(&seen, 2) == eu.len()).await;
    let first: BTreeSet<String> = reached(&seen, 2).into_values().flatten().collect();
    assert_eq!(first, eu, "the label stage is exactly the eu-1 instances");

    let (status, body) = post(&server, "promote", "eu-1 looks fine").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stages"]["stage"], 2, "{body}");
    wait_for("half the fleet", || holders(&seen, 2) == INSTANCES / 2).await;

    let (status, body) = post(&server, "halt", "wait for the dashboards").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stages"]["state"], "halted", "{body}");

    let (status, body) = post(&server, "abort", "latency went up").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stages"]["state"], "aborted", "{body}");
    wait_for("every instance on v3", || holders(&seen, 3) == INSTANCES).await;
    assert_eq!(
        holders(&seen, 2),
        INSTANCES / 2,
        "the other half never got v2"
    );

    let (status, body) = post(&server, "promote", "too late").await;
    assert_eq!(status, 409, "no active rollout left: {body}");
    gapless(&seen);
    for t in tasks {
        t.abort();
    }
}

/// Two replicas on one PostgreSQL database, ten instances on each: both serve the same stage,
/// the rollout promotes exactly twice (one decider), and the stages are 2, 8 and 10 instances
/// whichever replica they are connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_agree_on_the_stage_and_decide_once() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let replicas = start_replicas_with(dir.path(), &repo, &db, 2, TEN_FIFTY_ALL).await;
    let urls: Vec<String> = replicas.iter().map(|r| r.ws_url()).collect();
    let seen: Seen = Arc::default();
    let (gate, gated) = watch::channel(false);
    let tasks = run_fleet(&urls, &seen, &gated, applied).await;

    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 6443\n".as_slice()))],
            "payments: port 6443",
        )
        .expect("commit");
    assert_eq!(replicas[0].github_push(&commit.to_string()).await, 202);
    wait_for("the first stage", || holders(&seen, 2) == 2).await;
    for r in &replicas {
        let st = r.get("/api/v1/topics/payments").await["stages"].clone();
        assert_eq!(
            (st["state"].as_str(), st["stage"].as_u64()),
            (Some("rolling"), Some(1)),
            "{st}"
        );
        assert_eq!(st["members"], 2, "the same stage on every replica: {st}");
    }
    gate.send_replace(true);
    wait_for("every instance on v2", || holders(&seen, 2) == INSTANCES).await;
    let groups: Vec<usize> = reached(&seen, 2).values().map(BTreeSet::len).collect();
    assert_eq!(groups, [2, 8, 10]);
    for r in &replicas {
        let st = r.get("/api/v1/topics/payments").await["stages"].clone();
        assert_eq!(st["state"], "completed", "{st}");
    }
    let promotions: usize = replicas
        .iter()
        .map(|r| r.log().matches("rollout promoted").count())
        .sum();
    assert_eq!(promotions, 2, "each promotion decided once");
    let deciders = replicas
        .iter()
        .filter(|r| r.log().contains("rollout promoted"))
        .count();
    assert_eq!(deciders, 1, "one replica decides");
    gapless(&seen);
    for t in tasks {
        t.abort();
    }
}

const BY_TRAILER: &str = r#"
[[rollouts]]
name = "canary"
stages = ["10%", "50%"]
bake_secs = 3600
"#;

/// A policy without `topics` applies only to pushes that name it in a `Confcast-Rollout:`
/// trailer; a newer push joins the rollout at its stage, and one marked `immediate` ends it:
/// every instance gets the newest version, each by a change it can apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailer_starts_a_rollout_a_newer_push_joins_it_and_immediate_ends_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, BY_TRAILER).await;
    let seen: Seen = Arc::default();
    let (_gate, gated) = watch::channel(true);
    let tasks = run_fleet(&[server.ws_url()], &seen, &gated, applied).await;

    // No trailer: the policy names no topic, so v2 goes to everyone at once.
    push(&server, &repo, "port = 2\n", "payments: port 2").await;
    wait_for("v2 everywhere", || holders(&seen, 2) == INSTANCES).await;
    assert_eq!(stages(&server).await, Value::Null);

    push(
        &server,
        &repo,
        "port = 3\n",
        "payments: port 3\n\nConfcast-Rollout: canary",
    )
    .await;
    wait_for("v3's first stage", || holders(&seen, 3) == 2).await;
    let canaries: BTreeSet<String> = reached(&seen, 3).into_values().flatten().collect();
    // A newer push joins the rollout at its stage: the same two instances, nobody else.
    push(
        &server,
        &repo,
        "port = 4\n",
        "payments: port 4\n\nConfcast-Rollout: canary",
    )
    .await;
    wait_for("v4 on the canaries", || holders(&seen, 4) == 2).await;
    let again: BTreeSet<String> = reached(&seen, 4).into_values().flatten().collect();
    assert_eq!(again, canaries);
    let st = stages(&server).await;
    assert_eq!(
        (
            st["state"].as_str(),
            st["version"].as_u64(),
            st["base_version"].as_u64()
        ),
        (Some("rolling"), Some(4), Some(2)),
        "{st}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(holders(&seen, 3), 2, "nobody else got v3");

    push(
        &server,
        &repo,
        "port = 5\n",
        "payments: port 5\n\nConfcast-Rollout: immediate",
    )
    .await;
    wait_for("v5 everywhere", || holders(&seen, 5) == INSTANCES).await;
    let st = server
        .wait_topic("payments", |t| t["stages"]["state"] == "superseded")
        .await;
    assert_eq!(st["version"], 5, "{st}");
    for (instance, changes) in seen.lock().expect("seen").iter() {
        let v5 = changes.iter().find(|c| c.version == 5).expect("v5");
        let f = v5
            .files
            .iter()
            .find(|f| f.path == "payments/app.toml")
            .expect("file");
        let bytes =
            decode_content(f.content.as_deref().expect("content"), f.encoding).expect("decodes");
        assert_eq!(bytes, b"port = 5\n", "{instance}");
    }
    gapless(&seen);
    for t in tasks {
        t.abort();
    }
}

/// The overrides need an `admin` API token: none is 401, a `read` one 403, and neither changes
/// the rollout; an admin's reason is capped like a rollback's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_overrides_need_an_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(
        dir.path(),
        &repo,
        "",
        &format!("{}\n{MANUAL}", util::auth_toml()),
    )
    .await;
    let url = server.url("/api/v1/topics/payments/rollout/promote");
    let body = json!({"reason": "let me in"});
    let none = server
        .http
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(none.status().as_u16(), 401);
    let read = server
        .http
        .post(&url)
        .bearer_auth(READ_TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(read.status().as_u16(), 403);
    let admin = |b: Value| {
        server
            .http
            .post(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&b)
            .send()
    };
    let long = admin(json!({"reason": "x".repeat(5000)}))
        .await
        .expect("POST");
    assert_eq!(long.status().as_u16(), 400);
    let unknown = admin(json!({"reason": "ok", "stage": 3}))
        .await
        .expect("POST");
    assert_eq!(unknown.status().as_u16(), 400, "unknown fields are refused");
    let nothing = admin(json!({"reason": "no rollout yet"}))
        .await
        .expect("POST");
    assert_eq!(nothing.status().as_u16(), 409);
}

const EU_FIRST: &str = r#"
[[rollouts]]
name = "eu-first"
topics = ["payments"]
stages = ["zone=eu-1"]
bake_secs = 3600
"#;

/// A reconnecting client for `instance` in `zone`, keeping its position and files in `state`.
fn zoned(url: &str, instance: &str, zone: &str, state: &std::path::Path) -> Client {
    let mut options = ClientOptions::new(url, instance, &["payments"]);
    options.identity.app = Some("web".into());
    options.identity.labels = BTreeMap::from([("zone".to_string(), zone.to_string())]);
    options.state_dir = Some(state.to_path_buf());
    options.backoff_initial = Duration::from_millis(50);
    options.backoff_max = Duration::from_millis(500);
    Client::start(options).expect("client")
}

/// The next delivery other than a connection notice.
async fn delivery(client: &mut Client) -> Delivery {
    loop {
        match tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a delivery in time")
            .expect("client running")
        {
            Delivery::Connected { .. } => continue,
            other => return other,
        }
    }
}

/// The next delivery, which must be an update; acked as applied.
async fn update(client: &mut Client) -> Update {
    match delivery(client).await {
        Delivery::Update(u) => {
            client
                .ack(&u.topic, u.version, AckStatus::Applied, None)
                .expect("ack recorded locally");
            u
        }
        other => panic!("expected an update, got {other:?}"),
    }
}

/// What `client` delivered within `within`, connection notices left out.
async fn quiet(client: &mut Client, within: Duration) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(within, client.next()).await {
        if !matches!(d, Delivery::Connected { .. }) {
            out.push(d);
        }
    }
    out
}

/// `GET /api/v1/instances/{id}` once `f` holds for it.
async fn wait_for_instance(server: &TestServer, id: &str, f: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, i) = server.get(&format!("/api/v1/instances/{id}")).await;
            if f(&i) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {id}"))
}

fn applied_version(instance: &Value) -> Option<u64> {
    instance["topics"]
        .as_array()?
        .iter()
        .find(|t| t["topic"] == "payments")?["applied_version"]
        .as_u64()
}

/// PROTOCOL.md 8.8: an instance whose labels change between connections may fall outside a
/// stage it was in. A (eu-1) gets v2, reconnects as eu-2 resuming from its position and keeps v2
/// (nothing to replay, no snapshot of the base); the 2→3 change of a newer push goes to the stage
/// (C, still eu-1) and neither to A nor to B (eu-2). The operator's promotion sends everyone the
/// 1→3 change: B applies it, C drops it as a duplicate, and A, holding v2, sees a gap (8.6) and
/// gets v3 by a snapshot. All three end on v3 and the rollout completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_relabelled_out_of_the_stage_keeps_its_version_and_gap_heals_on_promotion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, EU_FIRST).await;
    let url = server.ws_url();
    let mut a = zoned(&url, "inst-a", "eu-1", &dir.path().join("a"));
    let mut b = zoned(&url, "inst-b", "eu-2", &dir.path().join("b"));
    let mut c = zoned(&url, "inst-c", "eu-1", &dir.path().join("c"));
    for client in [&mut a, &mut b, &mut c] {
        let u = update(client).await;
        assert!(matches!(u.kind, UpdateKind::Snapshot(_)), "{u:?}");
        assert_eq!(u.version, 1);
    }

    push(&server, &repo, "port = 2\n", "payments: port 2").await;
    for client in [&mut a, &mut c] {
        let u = update(client).await;
        let UpdateKind::Change(change) = &u.kind else {
            panic!("a change: {u:?}");
        };
        assert_eq!((change.previous_version, change.version), (1, 2));
    }
    let st = server
        .wait_topic("payments", |t| t["stages"]["applied"] == 2)
        .await["stages"]
        .clone();
    assert_eq!(
        (
            st["state"].as_str(),
            st["stage"].as_u64(),
            st["members"].as_u64()
        ),
        (Some("rolling"), Some(1), Some(2)),
        "A and C are the eu-1 stage: {st}"
    );

    // A comes back as eu-2, resuming from its position (its state directory).
    drop(a);
    let mut a = zoned(&url, "inst-a", "eu-2", &dir.path().join("a"));
    assert_eq!(a.last_good()["payments"].0, 2);
    wait_for_instance(&server, "inst-a", |i| {
        i["connected"] == true && i["labels"]["zone"] == "eu-2"
    })
    .await;
    let st = server
        .wait_topic("payments", |t| t["stages"]["members"] == 1)
        .await["stages"]
        .clone();
    assert_eq!(st["state"], "rolling", "only C is left in the stage: {st}");
    let got = quiet(&mut a, Duration::from_millis(500)).await;
    assert!(
        got.is_empty(),
        "A keeps v2, neither replay nor base snapshot: {got:?}"
    );

    // A newer push joins the rollout at its stage: C gets 2→3, A (now outside) and B do not.
    push(&server, &repo, "port = 3\n", "payments: port 3").await;
    let u = update(&mut c).await;
    let UpdateKind::Change(change) = &u.kind else {
        panic!("a change: {u:?}");
    };
    assert_eq!((change.previous_version, change.version), (2, 3));
    let st = stages(&server).await;
    assert_eq!(
        (
            st["state"].as_str(),
            st["version"].as_u64(),
            st["base_version"].as_u64()
        ),
        (Some("rolling"), Some(3), Some(1)),
        "{st}"
    );
    let got = quiet(&mut a, Duration::from_millis(500)).await;
    assert!(got.is_empty(), "A, outside the stage, gets no 2→3: {got:?}");
    let got = quiet(&mut b, Duration::from_millis(100)).await;
    assert!(got.is_empty(), "B never got v2 nor v3: {got:?}");

    let (status, body) = post(&server, "promote", "eu-1 looks fine").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stages"]["state"], "completed", "{body}");

    // B holds the base: the 1→3 change applies.
    let u = update(&mut b).await;
    let UpdateKind::Change(change) = &u.kind else {
        panic!("a change: {u:?}");
    };
    assert_eq!((change.previous_version, change.version), (1, 3));
    assert_eq!(u.files["payments/app.toml"], b"port = 3\n");
    // A holds v2: the same 1→3 change is a gap, so it subscribes again without `since`.
    match delivery(&mut a).await {
        Delivery::Disconnected { reason } => assert!(
            reason.contains("holds v2 but the change follows v1"),
            "{reason}"
        ),
        other => panic!("expected A to resubscribe on the gap, got {other:?}"),
    }
    let u = update(&mut a).await;
    assert!(matches!(u.kind, UpdateKind::Snapshot(_)), "{u:?}");
    assert_eq!(u.version, 3);
    assert_eq!(u.files["payments/app.toml"], b"port = 3\n");
    assert_eq!(u.files["payments/limits.json"], br#"{"daily": 100}"#);

    for id in ["inst-a", "inst-b", "inst-c"] {
        wait_for_instance(&server, id, |i| applied_version(i) == Some(3)).await;
    }
    assert_eq!(stages(&server).await["state"], "completed");
    for (name, client) in [("A", &mut a), ("B", &mut b), ("C", &mut c)] {
        let got = quiet(client, Duration::from_millis(300)).await;
        assert!(got.is_empty(), "{name}: nothing more: {got:?}");
    }
}

const ONE_CANARY: &str = r#"
[[rollouts]]
name = "canary"
topics = ["payments"]
stages = ["1 instance"]
bake_secs = 1
"#;

/// The next `payments` change on `session` within `within`, if any.
async fn next_change(session: &mut Session, within: Duration) -> Option<Change> {
    tokio::time::timeout(within, async {
        loop {
            match session.next().await {
                Ok(ServerMessage::Change(c)) => return Some(c),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

async fn metric(server: &TestServer, line: &str) -> bool {
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    text.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_pushed_over_a_halt_is_judged_on_its_own_and_a_silent_canary_holds_its_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, ONE_CANARY).await;
    let url = server.ws_url();
    let mut sessions = Vec::new();
    for i in 0..4 {
        let (mut session, _) = connect(&url, i).await;
        session
            .ack("payments", 1, AckStatus::Applied, None)
            .await
            .expect("ack v1");
        sessions.push(session);
    }

    // v2 is bad: the canary alone gets it and acks failed; the rollout halts.
    push(&server, &repo, "port = \"bad\"\n", "v2").await;
    let mut canary = None;
    for (i, s) in sessions.iter_mut().enumerate() {
        if let Some(c) = next_change(s, Duration::from_millis(500)).await {
            assert_eq!(c.version, 2);
            assert!(canary.replace(i).is_none(), "one canary");
        }
    }
    let canary = canary.expect("a canary got v2");
    let mut canary_session = sessions.remove(canary);
    // The others run on their own (read, answer pings, apply and ack), recording what they get.
    let seen: Seen = Arc::default();
    let (_open, gate) = watch::channel(true);
    let others: Vec<usize> = (0..4).filter(|i| *i != canary).collect();
    let tasks: Vec<_> = sessions
        .into_iter()
        .zip(&others)
        .map(|(session, &i)| run(session, i, (1, false), seen.clone(), gate.clone(), applied))
        .collect();
    canary_session
        .ack("payments", 2, AckStatus::Failed, Some("bad port".into()))
        .await
        .expect("ack failed");
    wait_until(&server, "halted", |s| s["state"] == "halted").await;
    // The deciding replica's gauge shows the halt, though a halt logs no change.
    wait_for_async("the halted gauge", || {
        metric(&server, "confcast_rollouts{state=\"halted\"} 1")
    })
    .await;
    // And the stage with its counts, per topic.
    for line in [
        "confcast_rollout_stage{topic=\"payments\"} 1",
        "confcast_rollout_stage_instances{topic=\"payments\",status=\"members\"} 1",
        "confcast_rollout_stage_instances{topic=\"payments\",status=\"failed\"} 1",
    ] {
        wait_for_async(line, || metric(&server, line)).await;
    }

    // The fix: a newer push joins the halted rollout; the canary's failure of v2 says nothing
    // about v3, so while the canary takes its time the rollout waits instead of halting again.
    push(&server, &repo, "port = 9443\n", "v3: fix the port").await;
    let fix = next_change(&mut canary_session, WAIT).await.expect("v3");
    assert_eq!((fix.previous_version, fix.version), (2, 3));
    wait_until(&server, "rolling v3", |s| {
        s["state"] == "rolling" && s["version"] == 3
    })
    .await;
    // Reading (and so answering pings) while it waits, for more than two looks of the decider.
    assert!(
        next_change(&mut canary_session, Duration::from_millis(2500))
            .await
            .is_none()
    );
    let s = stages(&server).await;
    assert_eq!(s["state"], "rolling", "{s}");
    assert_eq!(s["failed"], json!([]), "{s}");
    assert_eq!(holders(&seen, 3), 0, "nobody else has v3 yet");
    canary_session
        .ack("payments", 3, AckStatus::Applied, None)
        .await
        .expect("ack v3");
    wait_until(&server, "completed", |s| s["state"] == "completed").await;
    wait_for("the others on v3", || holders(&seen, 3) == 3).await;
    // An ended rollout's stage series go away.
    wait_for_async("no stage series", || async {
        !metric(&server, "confcast_rollout_stage{topic=\"payments\"} 1").await
    })
    .await;
    gapless(&seen);
    assert_eq!(holders(&seen, 2), 0, "v2 never left the canary");

    // v4: the canary (the same: its rank is fixed) gets it and goes away without a word
    // (crashed on it). Its stage keeps it as a member that did not apply, so the rollout does
    // not widen after the bake.
    push(&server, &repo, "port = 9444\n", "v4").await;
    let c = next_change(&mut canary_session, WAIT).await.expect("v4");
    assert_eq!(c.version, 4);
    drop(canary_session);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = stages(&server).await;
    assert_eq!(
        (s["state"].clone(), s["stage"].clone()),
        (json!("rolling"), json!(1)),
        "{s}"
    );
    assert_eq!(
        (s["members"].clone(), s["applied"].clone()),
        (json!(1), json!(0)),
        "{s}"
    );
    assert_eq!(holders(&seen, 4), 0, "v4 stays with the canary");

    // A pinned topic is frozen: no promote, no abort (a halt is still allowed).
    let reply = server
        .http
        .put(server.url("/api/v1/topics/payments/pin"))
        .json(&json!({"reason": "freeze"}))
        .send()
        .await
        .expect("pin");
    assert_eq!(reply.status().as_u16(), 200);
    for action in ["promote", "abort"] {
        let (status, body) = post(&server, action, "try").await;
        assert_eq!(status, 409, "{action}: {body}");
    }
    let (status, _) = post(&server, "halt", "hold it").await;
    assert_eq!(status, 200);
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
}

/// A push whose trailer names no policy is held back, not sent at once or under another policy;
/// a trailer after a message longer than the 8 KiB kept is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_rollout_name_holds_the_change_back_and_long_messages_keep_their_trailer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, ONE_CANARY).await;
    let (mut session, _) = connect(&server.ws_url(), 0).await;

    push(
        &server,
        &repo,
        "port = 1\n",
        "v2\n\nConfcast-Rollout: canery",
    )
    .await;
    let topic = server
        .wait_topic("payments", |v| !v["rejected"].is_null())
        .await;
    let message = topic["rejected"]["message"].as_str().expect("message");
    assert!(
        message.contains("`canery` names no rollout policy (configured: `canary`"),
        "{message}"
    );
    assert_eq!(topic["version"], 1);
    assert!(next_change(&mut session, Duration::from_millis(300))
        .await
        .is_none());

    let long = format!(
        "v2 again\n\n{}\n\nConfcast-Rollout: immediate",
        "word ".repeat(2000)
    );
    push(&server, &repo, "port = 2\n", &long).await;
    let c = next_change(&mut session, WAIT).await.expect("v2 at once");
    assert_eq!(c.version, 2);
    let topic = server.get("/api/v1/topics/payments").await.1;
    assert!(topic["rejected"].is_null(), "{topic}");
    assert!(topic["stages"].is_null(), "no rollout started: {topic}");
}

async fn wait_until(server: &TestServer, what: &str, f: impl Fn(&Value) -> bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            if f(&stages(server).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn wait_for_async<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(WAIT, async {
        while !f().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A halt of the decider's with `auto_revert` whose revert never happened (here: the server
/// stopped between the two steps, made by hand in the database) is reverted at the next look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_left_unreverted_is_reverted_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = start(
        dir.path(),
        &repo,
        r#"
[[rollouts]]
name = "canary"
topics = ["payments"]
stages = ["1 instance"]
bake_secs = 3600
auto_revert = true
"#,
    )
    .await;
    push(&server, &repo, "port = \"bad\"\n", "v2").await;
    wait_until(&server, "rolling v2", |s| {
        s["state"] == "rolling" && s["version"] == 2
    })
    .await;
    server.stop().await;
    let db = dir.path().join("data/confcast.db");
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        db.display()
    ))
    .await
    .expect("open the database");
    let done = sqlx::Executor::execute(
        &mut conn,
        "UPDATE stagings SET state = 'halted', reason = 'halted at stage 1 of 2 (1 instance): 1 of 1 instance acked failed (inst-00: bad port)'",
    )
    .await
    .expect("halt by hand");
    assert_eq!(done.rows_affected(), 1);
    drop(conn);
    server.restart().await;
    wait_until(&server, "the revert", |s| s["state"] == "aborted").await;
    let topic = server.get("/api/v1/topics/payments").await.1;
    assert_eq!(topic["version"], 3, "{topic}");
    let reason = topic["stages"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains("auto_revert: halted at stage 1 of 2"),
        "{reason}"
    );
}
