//! The operator dashboard, end to end: its shell and security headers, the API it reads (the
//! live event stream, instances by page, a version's diff) with real API tokens, and the page
//! itself in a real headless Chromium driven through chromedriver (WebDriver), against a real
//! server, a real repo, signed webhooks and real instances that ack.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver`: without them it is skipped
//! with a printed reason, unless `CI=true`, where it fails. Its screenshots are written to
//! `target/test-artifacts/dashboard/`.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use confcast::client::{Identity, Session};
use confcast::protocol::{AckStatus, ServerMessage};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use util::*;

const READ_TOKEN: &str = "dashboard-read-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "dashboard-admin-token-0123456789abcdef";
/// What a hostile commit message or label tries: markup that would run script if inserted as HTML.
const HOSTILE: &str = "<img src=x onerror=\"window.__pwned=1\">";
/// The browser is slow on a loaded 2-core machine: generous, and only ever waited on a condition.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// A server on `repo` with a `read` and an `admin` API token, and the TOML tables `extra`.
async fn start(dir: &Path, repo: &ConfigRepo, extra: &str) -> TestServer {
    start_in(dir.join("data"), repo, extra).await
}

async fn start_in(data_dir: PathBuf, repo: &ConfigRepo, extra: &str) -> TestServer {
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:0"
data_dir = "{}"
heartbeat_secs = 1

[[repos]]
name = "cfg"
url = "{}"
secret = "{SECRET}"

[[auth.api_tokens]]
name = "dashboard"
token_sha256 = "{}"
scope = "read"

[[auth.api_tokens]]
name = "operator"
token_sha256 = "{}"
scope = "admin"

{extra}
"#,
        data_dir.display(),
        repo.url(),
        sha256_hex(READ_TOKEN),
        sha256_hex(ADMIN_TOKEN),
    );
    TestServer::start_toml(data_dir, toml).await
}

async fn get(server: &TestServer, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = server.http.get(server.url(path));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let reply = req.send().await.expect("GET");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// Polls `path` (with the read token) until `f` accepts the answer.
async fn wait_for(server: &TestServer, path: &str, f: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let (status, v) = get(server, path, Some(READ_TOKEN)).await;
            if status == 200 && f(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{path} did not reach the expected state"))
}

/// An instance with `labels`, subscribed to `payments`, having acked what its snapshot held.
async fn subscriber(server: &TestServer, id: &str, labels: &[(&str, &str)]) -> Session {
    let identity = Identity {
        instance: id.into(),
        app: Some("payments-api".into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    };
    let mut session = Session::connect(&server.ws_url(), &identity)
        .await
        .expect("instance connects");
    session
        .subscribe(&["payments".to_string()], None)
        .await
        .expect("subscribe");
    loop {
        match next(&mut session).await {
            ServerMessage::Snapshot(s) => ack(&mut session, &s.topic, s.version).await,
            ServerMessage::Subscribed { .. } => return session,
            _ => {}
        }
    }
}

async fn next(session: &mut Session) -> ServerMessage {
    tokio::time::timeout(WAIT, session.next())
        .await
        .expect("a frame in time")
        .expect("connection up")
}

async fn ack(session: &mut Session, topic: &str, version: u64) {
    session
        .ack(topic, version, AckStatus::Applied, None)
        .await
        .expect("send ack");
}

/// Reads frames until a change of `topic` arrives; returns its version.
async fn next_change(session: &mut Session) -> u64 {
    loop {
        if let ServerMessage::Change(c) = next(session).await {
            return c.version;
        }
    }
}

/// Commits `content` as payments/app.toml with `message` and sends the signed webhook.
async fn push(server: &TestServer, repo: &ConfigRepo, content: &str, message: &str) {
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(content.as_bytes()))],
            message,
        )
        .expect("commit");
    let (status, _) = server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(status, 202);
}

/// The server-sent events of one stream, as (event, data) pairs, read as they arrive.
struct EventStream {
    reply: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(server: &TestServer, token: &str) -> Result<EventStream, reqwest::Response> {
        let reply = reqwest::Client::new()
            .get(server.url("/api/v1/events"))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /api/v1/events");
        if reply.status() != 200 {
            return Err(reply);
        }
        Ok(EventStream {
            reply,
            buffer: String::new(),
        })
    }

    async fn next(&mut self) -> (String, String) {
        loop {
            if let Some(cut) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..cut + 2).collect();
                let (mut event, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !event.is_empty() {
                    return (event, data);
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.reply.chunk())
                .await
                .expect("an event in time")
                .expect("stream readable")
                .expect("stream still open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next rollout board whose `payments` line `f` accepts (with the whole board), and
    /// that line.
    async fn until(&mut self, f: impl Fn(&Value, &Value) -> bool) -> (Value, Value) {
        loop {
            let (event, data) = self.next().await;
            assert_eq!(event, "rollouts");
            let board: Value = serde_json::from_str(&data).expect("board is JSON");
            let payments = board["topics"]
                .as_array()
                .and_then(|t| t.iter().find(|t| t["topic"] == "payments"))
                .cloned()
                .unwrap_or(Value::Null);
            if f(&payments, &board) {
                return (board, payments);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_is_open_and_strict_and_the_data_needs_a_read_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, "[limits]\nmax_event_streams = 2").await;
    wait_for(&server, "/api/v1/topics", |v| v["topics"][0].is_object()).await;

    // The shell carries no data: served without a credential, with headers that forbid inline
    // script, framing and content sniffing.
    let page = server
        .http
        .get(server.url("/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.expect("html");
    assert!(html.contains(r#"<script src="/assets/app.js" defer></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "no inline script");
    let js = server
        .http
        .get(server.url("/assets/app.js"))
        .send()
        .await
        .expect("GET app.js");
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/javascript")));
    let js = js.text().await.expect("js");
    assert!(!js.contains("innerHTML"), "the script never writes HTML");
    assert_eq!(get(&server, "/assets/secrets", None).await.0, 404);

    // Every data endpoint of the dashboard needs the read token; an admin token reads too.
    for path in [
        "/api/v1/events",
        "/api/v1/instances?limit=10",
        "/api/v1/topics/payments/versions/1",
    ] {
        assert_eq!(get(&server, path, None).await.0, 401, "{path}");
        assert_eq!(
            get(&server, path, Some("not-a-token")).await.0,
            401,
            "{path}"
        );
    }
    let (status, v) = get(
        &server,
        "/api/v1/topics/payments/versions/1",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let files = v["files"].as_array().expect("files");
    let app = files
        .iter()
        .find(|f| f["path"] == "payments/app.toml")
        .expect("app.toml in version 1");
    assert_eq!(
        app["diff"],
        "--- a/payments/app.toml\n+++ b/payments/app.toml\n@@ -0,0 +1 @@\n+port = 8443\n"
    );
    let (status, v) = get(
        &server,
        "/api/v1/topics/payments/versions/9",
        Some(READ_TOKEN),
    )
    .await;
    assert_eq!(status, 404, "{v}");

    // Filters are checked and capped.
    for (query, want) in [
        ("status=applied", 400),
        ("status=weird&topic=payments", 400),
        ("label=no-equals-sign", 400),
        ("limit=abc", 400),
        ("colour=blue", 400),
    ] {
        let (status, v) = get(
            &server,
            &format!("/api/v1/instances?{query}"),
            Some(READ_TOKEN),
        )
        .await;
        assert_eq!(status, want, "{query}: {v}");
    }
    let long = "x".repeat(257);
    let (status, v) = get(
        &server,
        &format!("/api/v1/instances?q={long}"),
        Some(READ_TOKEN),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("256")),
        "{v}"
    );

    // At most `max_event_streams` streams at once: the next one is told to come back later.
    let first = EventStream::open(&server, READ_TOKEN)
        .await
        .expect("stream 1");
    let _second = EventStream::open(&server, READ_TOKEN)
        .await
        .expect("stream 2");
    let refused = EventStream::open(&server, READ_TOKEN)
        .await
        .err()
        .expect("a third stream is refused");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.expect("JSON error");
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("limits.max_event_streams")));
    drop(first);
}

/// The event stream moves as instances ack, one board shared by every stream; the instances
/// endpoint pages and filters what the stores hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_a_rollout_and_instances_page() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, "").await;
    wait_for(&server, "/api/v1/topics", |v| v["topics"][0].is_object()).await;
    let mut one = subscriber(&server, "pay-1", &[("zone", "a")]).await;
    let mut two = subscriber(&server, "pay-2", &[("zone", "b"), ("note", HOSTILE)]).await;

    let mut events = EventStream::open(&server, READ_TOKEN)
        .await
        .expect("stream");
    let mut other = EventStream::open(&server, READ_TOKEN)
        .await
        .expect("stream");
    let (board, _) = events
        .until(|p, _| p["counts"]["applied"] == 2 && p["version"] == 1)
        .await;
    assert_eq!(board["instances"], json!({"total": 2, "connected": 2}));

    push(&server, &repo, "port = 9443\n", HOSTILE).await;
    let (_, payments) = events
        .until(|p, _| p["version"] == 2 && p["counts"]["behind"] == 2)
        .await;
    assert_eq!(payments["message"], HOSTILE, "{payments}");
    assert_eq!(payments["author"], "Ada Config <ada@example.com>");
    assert_eq!(payments["counts"]["total"], 2);
    assert_eq!(next_change(&mut one).await, 2);
    ack(&mut one, "payments", 2).await;
    events
        .until(|p, _| p["counts"]["applied"] == 1 && p["counts"]["behind"] == 1)
        .await;
    assert_eq!(next_change(&mut two).await, 2);
    ack(&mut two, "payments", 2).await;
    let (_, done) = events
        .until(|p, _| p["version"] == 2 && p["counts"]["applied"] == 2)
        .await;
    // Every stream gets the same board.
    let (_, same) = other
        .until(|p, _| p["version"] == 2 && p["counts"]["applied"] == 2)
        .await;
    assert_eq!(done, same);
    // A disconnect is seen too; an instance that applied stays counted as applied.
    drop(one);
    let (_, payments) = events
        .until(|_, board| board["instances"]["connected"] == 1)
        .await;
    assert_eq!(payments["counts"]["applied"], 2, "{payments}");

    // Pages of instances, with their per-topic status and a total.
    let page = wait_for(&server, "/api/v1/instances?limit=1", |v| v["total"] == 2).await;
    assert_eq!(page["instances"][0]["id"], "pay-1");
    assert_eq!(page["next"], "pay-1");
    let page = wait_for(&server, "/api/v1/instances?limit=1&after=pay-1", |_| true).await;
    assert_eq!(page["instances"][0]["id"], "pay-2");
    assert_eq!(page["instances"][0]["labels"]["note"], HOSTILE);
    assert_eq!(page["instances"][0]["topics"][0]["applied_version"], 2);
    assert_eq!(page["next"], Value::Null);
    let page = wait_for(&server, "/api/v1/instances?label=zone%3Db", |_| true).await;
    assert_eq!(page["total"], 1);
    let page = wait_for(
        &server,
        "/api/v1/instances?topic=payments&status=applied",
        |_| true,
    )
    .await;
    assert_eq!(page["total"], 2);
    let page = wait_for(&server, "/api/v1/instances?topic=billing", |_| true).await;
    assert_eq!(page["total"], 0);
    // Without parameters: every instance, as before.
    let all = wait_for(&server, "/api/v1/instances", |_| true).await;
    assert_eq!(all["instances"].as_array().map(Vec::len), Some(2));
}

/// Two replicas on one PostgreSQL database: acks recorded through one move the board that the
/// other streams (by its periodic recomputation), and a publish reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_recorded_by_another_replica_move_the_board() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let store = format!("[store]\nurl = \"{}\"", db.url);
    let a = start_in(dir.path().join("a"), &repo, &store).await;
    let b = start_in(dir.path().join("b"), &repo, &store).await;
    wait_for(&a, "/api/v1/topics", |v| v["topics"][0].is_object()).await;
    wait_for(&b, "/api/v1/topics", |v| v["topics"][0].is_object()).await;
    let mut on_b = EventStream::open(&b, READ_TOKEN)
        .await
        .expect("stream on b");

    let mut one = subscriber(&a, "pay-1", &[]).await;
    let mut two = subscriber(&a, "pay-2", &[]).await;
    on_b.until(|p, board| p["counts"]["applied"] == 2 && board["instances"]["connected"] == 2)
        .await;

    push(&a, &repo, "port = 9443\n", "through replica a").await;
    let (_, line) = on_b.until(|p, _| p["version"] == 2).await;
    assert_eq!(line["message"], "through replica a");
    assert_eq!(next_change(&mut one).await, 2);
    ack(&mut one, "payments", 2).await;
    on_b.until(|p, _| p["version"] == 2 && p["counts"]["applied"] == 1)
        .await;
    assert_eq!(next_change(&mut two).await, 2);
    ack(&mut two, "payments", 2).await;
    on_b.until(|p, _| p["version"] == 2 && p["counts"]["applied"] == 2)
        .await;
}

// ---- the browser --------------------------------------------------------------------------

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver and the browser, or the reason the test cannot run.
/// The browser tools, or `None` (with the reason printed) when they are missing off CI; under
/// CI=true a missing browser fails the test.
fn browser_or_skip() -> Option<(PathBuf, PathBuf)> {
    match browser_tools() {
        Ok(tools) => Some(tools),
        Err(reason) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping the browser test: {reason}");
            None
        }
        Err(reason) => panic!("CI=true and {reason}: .ci/run installs it"),
    }
}

fn browser_tools() -> Result<(PathBuf, PathBuf), String> {
    let driver = on_path("chromedriver")
        .ok_or("chromedriver is not installed (apt-get install chromium-driver)")?;
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| on_path(b))
        .ok_or("chromium is not installed (apt-get install chromium)")?;
    Ok((driver, browser))
}

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_browser(driver: &Path, browser: &Path) -> (Driver, Client) {
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, port };
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": browser.display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--force-device-scale-factor=1"],
        }),
    );
    // chromedriver takes a moment to listen; the session is retried until it does.
    let client = tokio::time::timeout(BROWSER_WAIT, async {
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{}", driver.port))
                .await
            {
                Ok(client) => return client,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("a chromedriver session in time");
    (driver, client)
}

/// Waits until `script` (a JavaScript expression) is true in the page.
async fn until(client: &Client, what: &str, script: &str) {
    let body = format!("try {{ return !!({script}); }} catch (e) {{ return false; }}");
    let result = tokio::time::timeout(BROWSER_WAIT, async {
        loop {
            if client.execute(&body, vec![]).await.ok() == Some(Value::Bool(true)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if result.is_err() {
        let text = client
            .execute("return document.body.innerText", vec![])
            .await
            .unwrap_or(Value::Null);
        panic!(
            "the page did not show {what} in time; it shows:\n{}",
            text.as_str().unwrap_or("")
        );
    }
}

async fn text_of(client: &Client, script: &str) -> String {
    client
        .execute(&format!("return {script}"), vec![])
        .await
        .expect("script runs")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/dashboard");
    std::fs::create_dir_all(&dir).expect("artifact directory");
    dir
}

/// Types `token` into the page's token form and submits it.
async fn sign_in(client: &Client, token: &str) {
    client
        .find(Locator::Css("#token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type the token");
    client
        .find(Locator::Css("#login-submit"))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).expect("write screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_rollout_in_a_real_browser() {
    let Some((driver, browser)) = browser_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start(dir.path(), &repo, "").await;
    wait_for(&server, "/api/v1/topics", |v| v["topics"][0].is_object()).await;
    let mut one = subscriber(&server, "payments-api-1", &[("zone", "eu-west-1a")]).await;
    let mut two = subscriber(
        &server,
        "payments-api-2",
        &[("zone", "eu-west-1b"), ("note", HOSTILE)],
    )
    .await;
    let mut three = subscriber(&server, "payments-api-3", &[("zone", "eu-west-1c")]).await;

    let (_driver, client) = start_browser(&driver, &browser).await;
    client
        .goto(&server.url("/"))
        .await
        .expect("open the dashboard");

    // The API answers 401, so the page asks for a token.
    until(
        &client,
        "the token form",
        "!document.getElementById('login').hidden",
    )
    .await;
    screenshot(&client, "01-token").await;
    sign_in(&client, READ_TOKEN).await;
    let payments = "document.querySelector('#topics-body tr[data-topic=\"payments\"]')";
    until(
        &client,
        "payments at 100%",
        &format!("{payments}.dataset.percent === '100'"),
    )
    .await;
    until(
        &client,
        "the live feed",
        "document.getElementById('live').textContent === 'live'",
    )
    .await;

    // A push: the bar falls back while the instances get it, then reaches 100% as they ack.
    push(
        &server,
        &repo,
        "port = 9443\nmode = \"strict\"\n",
        &format!("Raise the port {HOSTILE}"),
    )
    .await;
    assert_eq!(next_change(&mut one).await, 2);
    ack(&mut one, "payments", 2).await;
    until(
        &client,
        "payments v2 at 33%",
        &format!("{payments}.dataset.percent === '33' && {payments}.textContent.includes('v2')"),
    )
    .await;
    screenshot(&client, "02-rollout-in-progress").await;
    assert_eq!(next_change(&mut two).await, 2);
    ack(&mut two, "payments", 2).await;
    assert_eq!(next_change(&mut three).await, 2);
    ack(&mut three, "payments", 2).await;
    until(
        &client,
        "payments v2 at 100%",
        &format!("{payments}.dataset.percent === '100'"),
    )
    .await;
    let row = text_of(&client, &format!("{payments}.innerText")).await;
    assert!(row.contains("3/3 applied"), "{row}");
    // The hostile commit message is shown as text, never as markup.
    assert!(row.contains(HOSTILE), "{row}");
    screenshot(&client, "03-rollout-done").await;

    // The topic page: history and the diff of version 2.
    client
        .find(Locator::Css("#topics-body tr[data-topic=\"payments\"] a"))
        .await
        .expect("topic link")
        .click()
        .await
        .expect("open the topic");
    let diff = "document.querySelector('.file[data-path=\"payments/app.toml\"] pre.diff')";
    until(
        &client,
        "the diff of version 2",
        &format!("{diff}.textContent.includes('+port = 9443')"),
    )
    .await;
    let text = text_of(&client, &format!("{diff}.innerText")).await;
    assert!(
        text.contains("-port = 8443") && text.contains("+mode = \"strict\""),
        "{text}"
    );
    let history = text_of(&client, "document.getElementById('history').innerText").await;
    assert!(
        history.contains("v2") && history.contains("v1") && history.contains(HOSTILE),
        "{history}"
    );
    screenshot(&client, "04-topic-diff").await;

    // The instances table, with the hostile label as text.
    client
        .goto(&server.url("/#/instances"))
        .await
        .expect("instances");
    until(
        &client,
        "three instances",
        "document.querySelectorAll('#instances-body tr').length === 3",
    )
    .await;
    let table = text_of(
        &client,
        "document.getElementById('instances-table').innerText",
    )
    .await;
    assert!(table.contains(&format!("note={HOSTILE}")), "{table}");
    assert!(table.contains("payments v2"), "{table}");
    screenshot(&client, "05-instances").await;
    // Filters are answered by the server: one zone, one row.
    client
        .find(Locator::Css("#filters input[name=label]"))
        .await
        .expect("label filter")
        .send_keys("zone=eu-west-1b")
        .await
        .expect("type a filter");
    client
        .find(Locator::Css("#filters button[type=submit]"))
        .await
        .expect("filter button")
        .click()
        .await
        .expect("filter");
    until(
        &client,
        "one filtered instance",
        "document.querySelectorAll('#instances-body tr').length === 1 \
         && document.querySelector('#instances-body tr').dataset.instance === 'payments-api-2' \
         && document.getElementById('instances-count').textContent.includes('of 1 ')",
    )
    .await;

    // Nothing from the repo or the instances became markup or ran.
    let images = client
        .execute("return document.querySelectorAll('img').length", vec![])
        .await
        .expect("count images");
    assert_eq!(images, json!(0));
    let pwned = client
        .execute("return window.__pwned === undefined", vec![])
        .await
        .expect("check");
    assert_eq!(pwned, json!(true));

    // A pin shows on the topic's row, with who and why, as soon as it is in (the feed).
    let reply = server
        .http
        .put(server.url("/api/v1/topics/payments/pin"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"reason": "freeze for the audit"}))
        .send()
        .await
        .expect("pin");
    assert_eq!(reply.status().as_u16(), 200);
    client.goto(&server.url("/#/")).await.expect("topics");
    until(
        &client,
        "the pin on payments",
        &format!("{payments} !== null && {payments}.querySelector('.pin') !== null"),
    )
    .await;
    let pin = text_of(&client, &format!("{payments}.querySelector('.pin').title")).await;
    assert!(
        pin.contains("operator") && pin.contains("freeze for the audit"),
        "{pin}"
    );
    screenshot(&client, "06-pinned").await;

    // Commands: a read token sees them; sending one takes an admin token. The operator
    // switches tokens, sends `refresh-cache` to all from the form, and watches it get done.
    client
        .find(Locator::Css("#signout"))
        .await
        .expect("forget token")
        .click()
        .await
        .expect("click");
    sign_in(&client, ADMIN_TOKEN).await;
    client
        .goto(&server.url("/#/commands"))
        .await
        .expect("commands");
    until(
        &client,
        "the commands panel",
        "!document.getElementById('commands-panel').hidden",
    )
    .await;
    client
        .find(Locator::Css("#command-form input[name=name]"))
        .await
        .expect("name field")
        .send_keys("refresh-cache")
        .await
        .expect("type a name");
    client
        .find(Locator::Css("#command-form button[type=submit]"))
        .await
        .expect("send button")
        .click()
        .await
        .expect("send");
    // Each instance receives it over its WebSocket and acks it done.
    let mut sent = None;
    for session in [&mut one, &mut two, &mut three] {
        let id = loop {
            if let ServerMessage::Command { id, name, .. } = next(session).await {
                assert_eq!(name, "refresh-cache");
                break id;
            }
        };
        session
            .ack_command(&id, confcast::protocol::CommandStatus::Done, None)
            .await
            .expect("ack the command");
        sent.get_or_insert(id);
    }
    let id = sent.expect("a command id");
    let command_row = format!("document.querySelector('#commands-body tr[data-command=\"{id}\"]')");
    until(
        &client,
        "the command done on all three",
        &format!(
            "{command_row} !== null && {command_row}.innerText.includes('3/3 done') \
             && document.querySelectorAll('#command-detail tr[data-instance] .st-applied').length === 3"
        ),
    )
    .await;
    screenshot(&client, "07-command-done").await;

    // The token stays for the tab (a reload does not ask again) and is never in a URL.
    client.refresh().await.expect("reload");
    until(
        &client,
        "the page after a reload",
        &format!("{payments} !== null"),
    )
    .await;
    let asked = client
        .execute("return !document.getElementById('login').hidden", vec![])
        .await
        .expect("check");
    assert_eq!(asked, json!(false));
    let url = client.current_url().await.expect("url");
    assert!(!url.as_str().contains(READ_TOKEN) && !url.as_str().contains(ADMIN_TOKEN));
    client.close().await.expect("close the browser");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_staged_rollout_and_its_halt_in_a_real_browser() {
    let Some((driver, browser)) = browser_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // A canary zone first, then everyone; the bake is long, so only people move it.
    let server = start(
        dir.path(),
        &repo,
        r#"
[[rollouts]]
name = "zone-canary"
topics = ["payments"]
stages = ["zone=eu-west-1a"]
bake_secs = 3600
"#,
    )
    .await;
    wait_for(&server, "/api/v1/topics", |v| v["topics"][0].is_object()).await;
    let mut canary = subscriber(&server, "payments-api-1", &[("zone", "eu-west-1a")]).await;
    let _other = subscriber(
        &server,
        "payments-api-2",
        &[("zone", "eu-west-1b"), ("note", HOSTILE)],
    )
    .await;

    let (_driver, client) = start_browser(&driver, &browser).await;
    client.goto(&server.url("/")).await.expect("open");
    until(
        &client,
        "the token form",
        "!document.getElementById('login').hidden",
    )
    .await;
    sign_in(&client, READ_TOKEN).await;
    let payments = "document.querySelector('#topics-body tr[data-topic=\"payments\"]')";
    until(&client, "payments", &format!("{payments} !== null")).await;

    push(&server, &repo, "port = 9443\n", "Raise the port").await;
    assert_eq!(next_change(&mut canary).await, 2);
    ack(&mut canary, "payments", 2).await;
    let badge = format!("{payments}.querySelector('.stage')");
    until(
        &client,
        "the stage badge",
        &format!("{badge} !== null && {badge}.textContent === 'stage 1/2' && {badge}.dataset.state === 'rolling'"),
    )
    .await;
    let title = text_of(&client, &format!("{badge}.title")).await;
    assert!(
        title.contains("v2 rolling at stage 1 of 2 (zone=eu-west-1a), policy zone-canary"),
        "{title}"
    );
    screenshot(&client, "08-staged-rollout").await;

    // The topic page: the stages, the one reached, and why it is there.
    client
        .goto(&server.url("/#/topic/payments"))
        .await
        .expect("topic");
    let note = "document.querySelector('#topic-summary .stage-note')";
    until(
        &client,
        "the stage note",
        &format!(
            "{note} !== null && {note}.querySelector('li.now').textContent === 'zone=eu-west-1a'"
        ),
    )
    .await;
    let text = text_of(&client, &format!("{note}.innerText")).await;
    assert!(
        text.contains("Progressive rollout (zone-canary): v2 rolling at stage 1 of 2 (zone=eu-west-1a), from v1")
            && text.contains("all")
            && text.contains("in the stages reached: 1 connected, 1 applied v2, 0 failed"),
        "{text}"
    );

    // An operator halts it; the page shows the halt and its reason, as text.
    let reply = server
        .http
        .post(server.url("/api/v1/topics/payments/rollout/halt"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"reason": format!("latency up in eu-west-1a {HOSTILE}")}))
        .send()
        .await
        .expect("halt");
    assert_eq!(reply.status().as_u16(), 200);
    until(
        &client,
        "the halt on the topic page",
        &format!(
            "{note}.dataset.state === 'halted' && {note}.querySelector('li.now.halted') !== null"
        ),
    )
    .await;
    let text = text_of(&client, &format!("{note}.innerText")).await;
    assert!(
        text.contains("v2 halted at stage 1 of 2")
            && text.contains("latency up in eu-west-1a")
            && text.contains(HOSTILE),
        "{text}"
    );
    screenshot(&client, "09-rollout-halted").await;
    client.goto(&server.url("/#/")).await.expect("topics");
    until(
        &client,
        "the halted badge",
        &format!("{payments} !== null && {badge} !== null && {badge}.textContent === 'halted 1/2'"),
    )
    .await;
    let pwned = client
        .execute(
            "return window.__pwned === undefined && document.querySelectorAll('img').length === 0",
            vec![],
        )
        .await
        .expect("check");
    assert_eq!(pwned, json!(true));
    client.close().await.expect("close the browser");
}
