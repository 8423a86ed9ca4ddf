//! `/metrics` end to end: a real server, real instances, signed webhooks; the exposition is parsed
//! strictly and its counters must equal what the test did. Also: the `read` API token guards it,
//! and the sample Grafana dashboard queries only metrics a live server exports (and all of them).

mod util;

use std::collections::BTreeSet;
use std::time::Duration;

use confcast::protocol::{AckStatus, ServerMessage};
use serde_json::Value;
use sha2::{Digest, Sha256};
use util::prom::{self, Exposition, Format};
use util::*;

const READ_TOKEN: &str = "metrics-read-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "metrics-admin-token-0123456789abcdef";

fn auth_toml() -> String {
    let digest = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
    format!(
        "[[auth.api_tokens]]\nname = \"prometheus\"\ntoken_sha256 = \"{}\"\nscope = \"read\"\n\n[[auth.api_tokens]]\nname = \"operator\"\ntoken_sha256 = \"{}\"\nscope = \"admin\"\n",
        digest(READ_TOKEN),
        digest(ADMIN_TOKEN)
    )
}

/// A server on `repo` with API tokens, no polling (every sync is one the test caused).
async fn start(dir: &std::path::Path, repo: &ConfigRepo, top: &str) -> TestServer {
    let data_dir = dir.join("data");
    let toml = format!(
        "{top}\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nkeepalive_timeout_secs = 5\n\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\npoll_interval_secs = 0\n",
        data_dir.display(),
        repo.url()
    );
    TestServer::start_toml(data_dir, toml).await
}

/// `GET path` with the read token; the JSON answer.
async fn api(server: &TestServer, path: &str) -> Value {
    let reply = server
        .http
        .get(server.url(path))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(reply.status().as_u16(), 200, "{path}");
    reply.json().await.expect("JSON")
}

/// `GET /metrics` with `token` and `accept`: status, content type, body.
async fn scrape(
    server: &TestServer,
    token: Option<&str>,
    accept: Option<&str>,
) -> (u16, String, String) {
    let mut req = server.http.get(server.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let reply = req.send().await.expect("GET /metrics");
    let status = reply.status().as_u16();
    let content_type = reply
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, reply.text().await.expect("body"))
}

/// The exposition as Prometheus scrapes it without asking for OpenMetrics, strictly parsed.
async fn metrics(server: &TestServer) -> Exposition {
    let (status, content_type, body) = scrape(server, Some(READ_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    prom::parse(&body, Format::Prometheus).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

/// Scrapes until `f` holds (metrics another task updates: the convergence watcher, disconnects).
async fn metrics_until(server: &TestServer, f: impl Fn(&Exposition) -> bool) -> Exposition {
    tokio::time::timeout(WAIT, async {
        loop {
            let m = metrics(server).await;
            if f(&m) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("metrics reached the expected state in time")
}

async fn wait_synced(server: &TestServer, n: u64) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let repos = api(server, "/api/v1/repos").await;
            let repo = repos["repos"][0].clone();
            if repo["syncs"].as_u64().unwrap_or(0) >= n && repo["syncing"] == false {
                return repo;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("synced in time")
}

fn converged(m: &Exposition) -> f64 {
    m.get("confcast_rollout_convergence_seconds_count", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_server_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, &auth_toml()).await;
    wait_synced(&server, 1).await;
    let initial = api(&server, "/api/v1/topics").await["topics"]
        .as_array()
        .expect("topics")
        .len() as f64;
    assert!(initial >= 2.0, "payments and billing at least");
    let cfg = [("repo", "cfg")];
    let m = metrics(&server).await;
    assert_eq!(m.get("confcast_changes_published_total", &cfg), initial);
    assert_eq!(m.get("confcast_sync_errors_total", &cfg), 0.0);
    assert_eq!(m.get("confcast_connected_instances", &[]), 0.0);
    assert_eq!(
        converged(&m),
        0.0,
        "versions current at start are not observed"
    );
    assert_eq!(
        m.get("confcast_commands_total", &[("outcome", "done")]),
        0.0
    );

    // Three instances subscribe without a position: snapshots.
    let mut instances = Vec::new();
    for n in 0..3 {
        let (i, snapshots) = Instance::subscribed(&server, &format!("i-{n}"), &["payments"]).await;
        assert_eq!(snapshots.len(), 1);
        instances.push(i);
    }
    let m = metrics(&server).await;
    assert_eq!(m.get("confcast_connected_instances", &[]), 3.0);
    assert_eq!(
        m.get("confcast_subscribes_total", &[("mode", "snapshot")]),
        3.0
    );
    assert_eq!(
        m.get("confcast_deliveries_total", &[("kind", "snapshot")]),
        3.0
    );

    // A signed push: one change, delivered live to all three, applied by all: converged once.
    let commit = repo
        .commit("main", &[("payments/app.toml", Some(b"port = 1\n"))], "one")
        .expect("commit");
    let (status, _) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202);
    let mut seq_v2 = 0;
    for i in &mut instances {
        let change = i.next_change().await;
        assert_eq!(change.version, 2);
        seq_v2 = change.seq;
        i.ack("payments", 2, AckStatus::Applied, None).await;
    }
    let m = metrics_until(&server, |m| converged(m) == 1.0).await;
    assert_eq!(m.get("confcast_acks_total", &[("status", "applied")]), 3.0);
    assert_eq!(m.get("confcast_deliveries_total", &[("kind", "live")]), 3.0);
    assert_eq!(
        m.get("confcast_changes_published_total", &cfg),
        initial + 1.0
    );
    let waited = m.get("confcast_rollout_convergence_seconds_sum", &[]);
    assert!(
        (0.0..WAIT.as_secs_f64()).contains(&waited),
        "publish to last ack: {waited} s"
    );

    // A forged webhook is refused and counted as such.
    let body = br#"{"ref":"refs/heads/main","after":"0000"}"#.to_vec();
    let (status, _) = server
        .webhook(
            &[
                ("x-github-event", "push"),
                ("x-github-delivery", &delivery_id()),
            ],
            body,
            Some("not-the-secret"),
        )
        .await;
    assert_eq!(status, 401);

    // Two topics change; one instance fails to apply, then applies: converged once more.
    let commit = repo
        .commit(
            "main",
            &[
                ("payments/app.toml", Some(b"port = 2\n".as_slice())),
                ("billing/plans.yaml", Some(b"plans: [basic]\n".as_slice())),
            ],
            "two",
        )
        .expect("commit");
    let (status, _) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202);
    for i in &mut instances {
        assert_eq!(i.next_change().await.version, 3);
    }
    instances[0]
        .ack("payments", 3, AckStatus::Applied, None)
        .await;
    instances[1]
        .ack("payments", 3, AckStatus::Applied, None)
        .await;
    instances[2]
        .ack("payments", 3, AckStatus::Failed, Some("bad port"))
        .await;
    let m = metrics(&server).await;
    assert_eq!(m.get("confcast_acks_total", &[("status", "failed")]), 1.0);
    instances[2]
        .ack("payments", 3, AckStatus::Applied, None)
        .await;
    let m = metrics_until(&server, |m| converged(m) == 2.0).await;
    assert_eq!(m.get("confcast_acks_total", &[("status", "applied")]), 6.0);
    assert_eq!(
        m.get("confcast_changes_published_total", &cfg),
        initial + 3.0
    );
    assert_eq!(
        m.get("confcast_deliveries_total", &[("kind", "live")]),
        6.0,
        "billing went to nobody"
    );
    let github = |outcome| {
        m.get(
            "confcast_webhooks_total",
            &[("provider", "github"), ("outcome", outcome)],
        )
    };
    assert_eq!(github("queued"), 2.0);
    assert_eq!(github("refused_signature"), 1.0);
    let repo_status = wait_synced(&server, 3).await;
    let syncs = repo_status["syncs"].as_f64().expect("syncs");
    assert_eq!(m.get("confcast_sync_duration_seconds_count", &cfg), syncs);
    assert_eq!(m.get("confcast_sync_errors_total", &cfg), 0.0);
    let store = |op| m.get("confcast_store_call_duration_seconds_count", &[("op", op)]);
    assert_eq!(store("record_ack"), 7.0, "every ack is one store call");
    assert_eq!(store("publish"), 3.0, "the first sync and two pushes");
    assert!(store("events_after") >= 2.0, "the feeder read both changes");

    // One instance goes away and comes back with its position: a replay of what it missed.
    drop(instances.remove(0));
    metrics_until(&server, |m| {
        m.get("confcast_connected_instances", &[]) == 2.0
    })
    .await;
    let mut back = Instance::connect(&server, "i-0").await;
    back.session
        .subscribe(&["payments".to_string()], Some(seq_v2))
        .await
        .expect("subscribe");
    assert!(matches!(back.next().await, ServerMessage::Change(c) if c.version == 3));
    assert!(
        matches!(back.next().await, ServerMessage::Subscribed { mode, .. } if mode == "replay")
    );
    let m = metrics(&server).await;
    assert_eq!(
        m.get("confcast_subscribes_total", &[("mode", "replay")]),
        1.0
    );
    assert_eq!(
        m.get("confcast_deliveries_total", &[("kind", "replay")]),
        1.0
    );
    assert_eq!(m.get("confcast_connected_instances", &[]), 3.0);

    // Everyone leaves: the gauge goes back to 0, four connections closed by their clients.
    drop(back);
    drop(instances);
    let m = metrics_until(&server, |m| {
        m.get("confcast_connected_instances", &[]) == 0.0
    })
    .await;
    let closed = |reason| m.get("confcast_connections_closed_total", &[("reason", reason)]);
    assert_eq!(closed("client_gone"), 4.0);
    assert_eq!(closed("slow_consumer"), 0.0);
    assert_eq!(converged(&m), 2.0, "each converged version observed once");
    if cfg!(target_os = "linux") {
        assert!(m.get("process_resident_memory_bytes", &[]) > 0.0);
        assert!(m.get("process_open_fds", &[]) > 0.0);
    }
    assert_eq!(
        m.get(
            "confcast_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // The same numbers in OpenMetrics, as Prometheus asks for them.
    let (status, content_type, body) = scrape(
        &server,
        Some(READ_TOKEN),
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let om = prom::parse(&body, Format::OpenMetrics).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(om.get("confcast_acks_total", &[("status", "applied")]), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_read_token_when_api_tokens_are_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, &auth_toml()).await;
    assert_eq!(scrape(&server, None, None).await.0, 401, "no token");
    assert_eq!(
        scrape(&server, Some("guess"), None).await.0,
        401,
        "wrong token"
    );
    assert_eq!(scrape(&server, Some(READ_TOKEN), None).await.0, 200);
    assert_eq!(scrape(&server, Some(ADMIN_TOKEN), None).await.0, 200);
    let status = server
        .http
        .get(server.url(&format!("/metrics?token={READ_TOKEN}")))
        .send()
        .await
        .expect("GET")
        .status();
    assert_eq!(status.as_u16(), 401, "API tokens travel in the header only");
    let (status, _, body) = scrape(&server, None, None).await;
    assert_eq!(status, 401);
    assert!(!body.contains("confcast_"), "nothing leaks: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_clients_choose_never_becomes_a_label() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, &auth_toml()).await;
    wait_synced(&server, 1).await;
    let series = |m: &Exposition| m.samples().count();
    let before = metrics(&server).await;
    // Webhooks for repos that do not exist, with and without a forge's header, and instances
    // with ids, apps and patterns of their own choosing.
    for n in 0..20 {
        let url = server.url(&format!("/webhooks/repo-{n}"));
        let forged = server.http.post(&url).header("x-github-event", "push");
        assert_eq!(forged.body("{}").send().await.expect("POST").status(), 404);
        let bare = server.http.post(&url).header(format!("x-event-{n}"), "x");
        assert_eq!(bare.body("{}").send().await.expect("POST").status(), 404);
    }
    let mut instances = Vec::new();
    for n in 0..5 {
        let name = format!("label-{n}-\u{1f600}\"quoted\"");
        let (i, _) = Instance::subscribed(&server, &name, &[&format!("topic-{n}/*")]).await;
        instances.push(i);
    }
    let after = metrics(&server).await;
    let unknown_repo = |provider| {
        after.get(
            "confcast_webhooks_total",
            &[("provider", provider), ("outcome", "unknown_repo")],
        )
    };
    assert_eq!(unknown_repo("github"), 20.0);
    assert_eq!(unknown_repo("unknown"), 20.0);
    assert_eq!(after.get("confcast_connected_instances", &[]), 5.0);
    assert_eq!(
        series(&after),
        series(&before) + 2,
        "only the two webhook series are new"
    );
    let body = scrape(&server, Some(READ_TOKEN), None).await.2;
    assert!(!body.contains("label-") && !body.contains("topic-") && !body.contains("repo-"));
}

/// Every metric name in `expr` (PromQL): the words starting `confcast_` or `process_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("confcast_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// Every `expr` anywhere in the dashboard (panels, rows, nested panels).
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_every_metric_and_only_real_ones() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/confcast.json");
    let text = std::fs::read_to_string(path).expect("dashboard file");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard is valid JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus datasource variable");
    let var = format!("${{{}}}", datasource["name"].as_str().expect("name"));
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"].as_str(),
            Some(var.as_str()),
            "panel {} uses the datasource variable",
            p["title"]
        );
    }
    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let queried: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // A rollout policy, and a push it stages: the rollout stage families have series only
    // while a rollout is active.
    let policy = "[[rollouts]]\nname = \"canary\"\ntopics = [\"payments\"]\nstages = [\"1 instance\"]\nbake_secs = 3600\n";
    let server = start(dir.path(), &repo, policy).await;
    wait_synced(&server, 1).await;
    // A webhook, so the one family without series at start has some.
    let (status, _) = server.github_push("main", "0", "wrong").await;
    assert_eq!(status, 401);
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 2\n"))],
            "staged",
        )
        .expect("commit");
    let (status, _) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202);
    tokio::time::timeout(util::WAIT, async {
        loop {
            let (_, _, body) = scrape(&server, None, None).await;
            if body.contains("confcast_rollout_stage{topic=\"payments\"} 1") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the rollout's stage shows");
    for format in [Format::Prometheus, Format::OpenMetrics] {
        let accept = (format == Format::OpenMetrics).then_some("application/openmetrics-text");
        let (status, _, body) = scrape(&server, None, accept).await;
        assert_eq!(status, 200);
        let m = prom::parse(&body, format).unwrap_or_else(|e| panic!("{e}\n{body}"));
        let exported = m.queryable_names(format);
        let unknown: Vec<&String> = queried.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "the dashboard queries metrics /metrics does not export: {unknown:?}"
        );
        if format == Format::Prometheus {
            let unused: Vec<&String> = m
                .families
                .keys()
                .filter(|f| f.starts_with("confcast_") && f.as_str() != "confcast_build_info")
                .filter(|f| !m.names_of(f, format).iter().any(|n| queried.contains(n)))
                .collect();
            assert!(unused.is_empty(), "no panel shows {unused:?}");
        }
    }
}

#[test]
fn the_exposition_parser_is_strict() {
    prom::self_check();
}
