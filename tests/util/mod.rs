//! Helpers so each end-to-end test reads as a short story: a real bare repo, the real server on
//! port 0 over SQLite, real WebSocket instances, real signed HTTP webhooks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use confcast::client::{Identity, Session};
pub use confcast::demo::ConfigRepo;
use confcast::protocol::{AckStatus, Change, ServerMessage, Snapshot};
use serde_json::Value;

pub mod prom;

pub const SECRET: &str = "test-webhook-secret";
pub const WAIT: Duration = Duration::from_secs(15);

/// A config repo with a few files on `main`.
pub fn config_repo(dir: &Path) -> ConfigRepo {
    let repo = ConfigRepo::init(&dir.join("origin.git")).expect("init bare repo");
    repo.commit(
        "main",
        &[
            ("payments/app.toml", Some(b"port = 8443\n".as_slice())),
            (
                "payments/limits.json",
                Some(br#"{"daily": 100}"#.as_slice()),
            ),
            ("billing/plans.yaml", Some(b"plans: []\n".as_slice())),
        ],
        "initial",
    )
    .expect("initial commit");
    repo
}

/// Commits `files` on `branch` at raw byte paths, the way any git client can push them: trees are
/// written as raw objects, so names libgit2 refuses to build (`..`, `.git`) and names that are not
/// UTF-8 go in as they are. `None` deletes a file; other files stay.
pub fn commit_raw(
    repo: &ConfigRepo,
    branch: &str,
    files: &[(&[u8], Option<&[u8]>)],
    message: &str,
) -> git2::Oid {
    let git = git2::Repository::open_bare(repo.path()).expect("open repo");
    let refname = format!("refs/heads/{branch}");
    let parent = git
        .find_reference(&refname)
        .and_then(|r| r.peel_to_commit())
        .expect("branch has a commit");
    let mut entries = BTreeMap::new();
    flatten(
        &git,
        &parent.tree().expect("tree"),
        Vec::new(),
        &mut entries,
    );
    for (path, content) in files {
        match content {
            Some(bytes) => {
                let blob = git.blob(bytes).expect("blob");
                entries.insert(path.to_vec(), blob);
            }
            None => {
                entries.remove(*path);
            }
        }
    }
    let entries: Vec<(Vec<u8>, git2::Oid)> = entries.into_iter().collect();
    let tree = git
        .find_tree(write_tree(&git, &entries))
        .expect("tree written");
    let sig = git2::Signature::now("Ada Config", "ada@example.com").expect("signature");
    let oid = git
        .commit(None, &sig, &sig, message, &tree, &[&parent])
        .expect("commit");
    git.reference(&refname, oid, true, message)
        .expect("move branch");
    oid
}

fn flatten(
    git: &git2::Repository,
    tree: &git2::Tree<'_>,
    prefix: Vec<u8>,
    out: &mut BTreeMap<Vec<u8>, git2::Oid>,
) {
    for entry in tree.iter() {
        let mut path = prefix.clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(entry.name_bytes());
        match entry.kind() {
            Some(git2::ObjectType::Tree) => {
                let sub = git.find_tree(entry.id()).expect("subtree");
                flatten(git, &sub, path, out);
            }
            _ => {
                out.insert(path, entry.id());
            }
        }
    }
}

/// Writes the tree of `files` (paths relative to it) as a raw object; returns its id.
fn write_tree(git: &git2::Repository, files: &[(Vec<u8>, git2::Oid)]) -> git2::Oid {
    let mut blobs: Vec<(Vec<u8>, git2::Oid)> = Vec::new();
    let mut dirs: BTreeMap<Vec<u8>, Vec<(Vec<u8>, git2::Oid)>> = BTreeMap::new();
    for (path, id) in files {
        match path.iter().position(|b| *b == b'/') {
            Some(i) => dirs
                .entry(path[..i].to_vec())
                .or_default()
                .push((path[i + 1..].to_vec(), *id)),
            None => blobs.push((path.clone(), *id)),
        }
    }
    // Git orders entries by name, a tree's name compared as if it ended in `/`.
    let mut entries: Vec<(Vec<u8>, &str, Vec<u8>, git2::Oid)> = blobs
        .into_iter()
        .map(|(name, id)| (name.clone(), "100644", name, id))
        .collect();
    for (name, children) in dirs {
        let id = write_tree(git, &children);
        let mut key = name.clone();
        key.push(b'/');
        entries.push((key, "40000", name, id));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut raw = Vec::new();
    for (_, mode, name, id) in entries {
        raw.extend_from_slice(mode.as_bytes());
        raw.push(b' ');
        raw.extend_from_slice(&name);
        raw.push(0);
        raw.extend_from_slice(id.as_bytes());
    }
    git.odb()
        .and_then(|odb| odb.write(git2::ObjectType::Tree, &raw))
        .expect("tree object")
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    toml: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), confcast::ServeError>>>,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Starts confcast on 127.0.0.1:0 serving `repo` as repo `cfg`, with `extra` TOML appended to the repo entry.
    pub async fn start(dir: &Path, repo: &ConfigRepo, extra: &str) -> TestServer {
        Self::start_with(dir, repo, "", extra).await
    }

    /// Like `start`, with `server_extra` TOML lines added to `[server]`.
    pub async fn start_with(
        dir: &Path,
        repo: &ConfigRepo,
        server_extra: &str,
        extra: &str,
    ) -> TestServer {
        let data_dir = dir.join("data");
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nkeepalive_timeout_secs = 5\n{server_extra}\n\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n{extra}\n",
            data_dir.display(),
            repo.url()
        );
        Self::start_toml(data_dir, toml).await
    }

    pub async fn start_toml(data_dir: PathBuf, toml: String) -> TestServer {
        let config =
            confcast::config::Config::parse(&toml, std::iter::empty(), &data_dir, &|_| None)
                .expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(confcast::serve(listener, config, async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            data_dir,
            toml,
            stop: Some(tx),
            task: Some(task),
            http: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("http client"),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful shutdown; waits until the server returned.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(WAIT, task)
                .await
                .expect("server stops in time")
                .expect("server task");
            result.expect("server returned cleanly");
        }
    }

    /// Stops and starts again on the same data directory (new port).
    pub async fn restart(&mut self) {
        self.stop().await;
        let fresh = TestServer::start_toml(self.data_dir.clone(), self.toml.clone()).await;
        *self = fresh;
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let reply = self.http.get(self.url(path)).send().await.expect("GET");
        let status = reply.status().as_u16();
        (status, reply.json().await.expect("JSON body"))
    }

    /// Waits until the repo `cfg` has synced at least `n` times with no error.
    pub async fn wait_syncs(&self, n: u64) -> Value {
        let result = tokio::time::timeout(WAIT, async {
            loop {
                let (_, v) = self.get("/api/v1/repos").await;
                let repo = v["repos"][0].clone();
                if repo["syncs"].as_u64().unwrap_or(0) >= n && repo["syncing"] == false {
                    return repo;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        result.expect("repo synced in time")
    }

    /// Polls the topic until `f` accepts it.
    pub async fn wait_topic(&self, topic: &str, f: impl Fn(&Value) -> bool) -> Value {
        let result = tokio::time::timeout(WAIT, async {
            loop {
                let (status, v) = self.get(&format!("/api/v1/topics/{topic}")).await;
                if status == 200 && f(&v) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        result.expect("topic reached the expected state in time")
    }

    /// Sends a GitHub push webhook for `branch`, signed with `secret`, with a fresh delivery id.
    pub async fn github_push(&self, branch: &str, after: &str, secret: &str) -> (u16, Value) {
        let body = serde_json::json!({"ref": format!("refs/heads/{branch}"), "before": "0".repeat(40), "after": after}).to_string();
        let delivery = delivery_id();
        self.webhook(
            &[
                ("x-github-event", "push"),
                ("x-github-delivery", &delivery),
                ("content-type", "application/json"),
            ],
            body.into_bytes(),
            Some(secret),
        )
        .await
    }

    /// Posts `body` to `/webhooks/cfg` with `headers`, adding a GitHub signature when `sign_with` is set.
    pub async fn webhook(
        &self,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        sign_with: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.post(self.url("/webhooks/cfg"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(secret) = sign_with {
            req = req.header("x-hub-signature-256", sign_github(secret, &body));
        }
        let reply = req.body(body).send().await.expect("POST webhook");
        let status = reply.status().as_u16();
        (status, reply.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A delivery id never used before in this test process.
pub fn delivery_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "d-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub fn sign_github(secret: &str, body: &[u8]) -> String {
    confcast::webhook::github::sign(secret.as_bytes(), body)
}

/// A real WebSocket instance.
pub struct Instance {
    pub name: String,
    pub session: Session,
}

impl Instance {
    pub async fn connect(server: &TestServer, name: &str) -> Instance {
        let identity = Identity {
            instance: name.into(),
            app: Some("test".into()),
            ..Default::default()
        };
        let session = Session::connect(&server.ws_url(), &identity)
            .await
            .expect("instance connects");
        Instance {
            name: name.into(),
            session,
        }
    }

    /// Connects, subscribes to `topics` and reads up to `subscribed`; returns the snapshots.
    pub async fn subscribed(
        server: &TestServer,
        name: &str,
        topics: &[&str],
    ) -> (Instance, Vec<Snapshot>) {
        let mut i = Instance::connect(server, name).await;
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        i.session.subscribe(&topics, None).await.expect("subscribe");
        let mut snapshots = Vec::new();
        loop {
            match i.next().await {
                ServerMessage::Snapshot(s) => snapshots.push(s),
                ServerMessage::Subscribed { .. } => return (i, snapshots),
                other => panic!("{name}: unexpected frame while subscribing: {other:?}"),
            }
        }
    }

    pub async fn next(&mut self) -> ServerMessage {
        tokio::time::timeout(WAIT, self.session.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.name))
            .unwrap_or_else(|e| panic!("{}: connection failed: {e}", self.name))
    }

    /// The next frame, or `None` if nothing arrives within `within`.
    pub async fn maybe_next(&mut self, within: Duration) -> Option<ServerMessage> {
        tokio::time::timeout(within, self.session.next())
            .await
            .ok()
            .map(|r| r.expect("connection stays up"))
    }

    /// Reads frames until a change arrives (skipping ack receipts).
    pub async fn next_change(&mut self) -> Change {
        loop {
            match self.next().await {
                ServerMessage::Change(c) => return c,
                ServerMessage::AckRecorded { .. } => continue,
                other => panic!("{}: expected a change, got {other:?}", self.name),
            }
        }
    }

    /// Acks and waits for the server's receipt.
    pub async fn ack(&mut self, topic: &str, version: u64, status: AckStatus, error: Option<&str>) {
        self.session
            .ack(topic, version, status, error.map(str::to_owned))
            .await
            .expect("send ack");
        loop {
            match self.next().await {
                ServerMessage::AckRecorded {
                    topic: t,
                    version: v,
                } if t == topic && v == version => return,
                ServerMessage::Error { code, message } => {
                    panic!("{}: ack refused: {code}: {message}", self.name)
                }
                _ => continue,
            }
        }
    }
}

/// A free loopback port (bound then released), for servers that must come back on the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The real `confcast serve` binary as a child process, so it can be killed with SIGKILL.
pub struct ServerProcess {
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<std::process::Child>,
    pub http: reqwest::Client,
}

impl ServerProcess {
    /// Writes a config serving `repo` as `cfg` on a fixed port and starts the binary.
    pub async fn start(
        dir: &Path,
        repo: &ConfigRepo,
        server_extra: &str,
        top_extra: &str,
    ) -> ServerProcess {
        Self::start_url(dir, &repo.url(), server_extra, top_extra).await
    }

    /// Like `start`, serving whatever `repo_url` names (which need not be reachable).
    pub async fn start_url(
        dir: &Path,
        repo_url: &str,
        server_extra: &str,
        top_extra: &str,
    ) -> ServerProcess {
        Self::start_config(dir, |port, data_dir| {
            format!(
                "{top_extra}\n[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nkeepalive_timeout_secs = 5\n{server_extra}\n\n[[repos]]\nname = \"cfg\"\nurl = \"{repo_url}\"\nsecret = \"{SECRET}\"\n",
                data_dir.display(),
            )
        })
        .await
    }

    /// Starts the binary with the whole config written by `toml(port, data_dir)`, for a test
    /// that needs keys `start` fixes (its 1 s heartbeat, say).
    pub async fn start_config(
        dir: &Path,
        toml: impl FnOnce(u16, &Path) -> String,
    ) -> ServerProcess {
        let port = free_port();
        let config = dir.join("confcast.toml");
        std::fs::write(&config, toml(port, &dir.join("data"))).expect("write config");
        let mut p = ServerProcess {
            port,
            config,
            log: dir.join("server.log"),
            child: None,
            http: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("http client"),
        };
        p.spawn().await;
        p
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start confcast serve");
        self.child = Some(child);
        // A fresh connection pool: idle connections kept from a process killed on this port
        // would fail the next requests ("connection closed before message completed").
        self.http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("http client");
        let ready = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(r) = self.http.get(self.url("/readyz")).send().await {
                    if r.status().is_success() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!(
                "server did not become ready; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a line of the log contains every one of `words`; returns that line.
    pub async fn wait_log(&self, words: &[&str]) -> String {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(line) = self
                    .log()
                    .lines()
                    .find(|l| words.iter().all(|w| l.contains(w)))
                {
                    return line.to_string();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {words:?}; log:\n{}", self.log()))
    }

    /// SIGKILL: no graceful shutdown, no close frames.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Resident memory now (`VmRSS` in `/proc/<pid>/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory the process ever had (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"))
    }

    pub async fn github_push(&self, after: &str) -> u16 {
        let body = serde_json::json!({"ref": "refs/heads/main", "after": after}).to_string();
        self.http
            .post(self.url("/webhooks/cfg"))
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery_id())
            .header("x-hub-signature-256", sign_github(SECRET, body.as_bytes()))
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh PostgreSQL database for one test, dropped afterwards. `None` (with the reason printed)
/// when PostgreSQL is unreachable outside CI; under `CI=true` an unreachable server fails the test.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";

impl PgDatabase {
    pub async fn create() -> Option<PgDatabase> {
        use sqlx::Connection;
        let admin = std::env::var("CONFCAST_TEST_PG").unwrap_or_else(|_| PG_ADMIN.to_string());
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true but PostgreSQL at {admin} is unreachable: {e}");
                }
                eprintln!("skipping PostgreSQL test: cannot connect to {admin}: {e}");
                return None;
            }
        };
        let name = format!(
            "confcast_e2e_{}_{}",
            std::process::id(),
            delivery_id().replace('-', "_")
        );
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        Some(PgDatabase {
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "test",
                "-q",
                "-c",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

// ---- a server with credentials: scoped instance tokens and API tokens ----------------------

/// May claim `payments-*` and read the topic `payments` only.
pub const PAYMENTS_TOKEN: &str = "payments-instance-token-0123456789";
pub const OPS_TOKEN: &str = "ops-instance-token-0123456789abcdef";
pub const READ_TOKEN: &str = "api-read-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "api-admin-token-0123456789abcdef";

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// `[auth]` with a payments-only instance token, an ops token for everything, and API tokens.
pub fn auth_toml() -> String {
    format!(
        r#"
[[auth.instance_tokens]]
name = "payments"
token_sha256 = "{}"
instances = "payments-*"
topics = ["payments"]

[[auth.instance_tokens]]
name = "ops"
token_sha256 = "{}"

[[auth.api_tokens]]
name = "dashboard"
token_sha256 = "{}"
scope = "read"

[[auth.api_tokens]]
name = "operator"
token_sha256 = "{}"
scope = "admin"
"#,
        sha256_hex(PAYMENTS_TOKEN),
        sha256_hex(OPS_TOKEN),
        sha256_hex(READ_TOKEN),
        sha256_hex(ADMIN_TOKEN)
    )
}

/// Starts a server on `repo` with `[server]` lines and top-level TOML (`[auth]`, `[limits]`).
pub async fn start_secured(
    dir: &std::path::Path,
    repo: &ConfigRepo,
    server: &str,
    top: &str,
) -> TestServer {
    let data_dir = dir.join("data");
    let toml = format!(
        "{top}\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nheartbeat_secs = 1\nkeepalive_timeout_secs = 5\n{server}\n\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        data_dir.display(),
        repo.url()
    );
    let server = TestServer::start_toml(data_dir, toml).await;
    wait_synced(&server).await;
    server
}

/// Waits for the first sync, asking with a read credential (ignored where the API is open).
pub async fn wait_synced(server: &TestServer) {
    tokio::time::timeout(WAIT, async {
        loop {
            let reply = server
                .http
                .get(server.url("/api/v1/repos"))
                .bearer_auth(READ_TOKEN)
                .send()
                .await
                .expect("GET");
            let v: Value = reply.json().await.unwrap_or(Value::Null);
            if v["repos"][0]["syncs"].as_u64().unwrap_or(0) >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("synced in time");
}

/// `n` `confcast serve` processes (`a`, `b`, ...) on one PostgreSQL database, all serving `repo`.
pub async fn start_replicas(
    dir: &Path,
    repo: &ConfigRepo,
    db: &PgDatabase,
    n: usize,
) -> Vec<ServerProcess> {
    start_replicas_with(dir, repo, db, n, "").await
}

/// Like [`start_replicas`], with `top` TOML (tables such as `[[rollouts]]`) in every config.
pub async fn start_replicas_with(
    dir: &Path,
    repo: &ConfigRepo,
    db: &PgDatabase,
    n: usize,
    top: &str,
) -> Vec<ServerProcess> {
    let store = format!("{top}\n[store]\nurl = \"{}\"\n", db.url);
    let mut replicas = Vec::new();
    for name in ["a", "b", "c", "d", "e"].into_iter().take(n) {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).expect("replica dir");
        replicas.push(ServerProcess::start(&sub, repo, "", &store).await);
    }
    replicas
}
