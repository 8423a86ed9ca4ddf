//! Commands end to end: a real server, real instances with real credentials, real API tokens.
//! Each kind of target reaches its instances only; a late instance gets a command before its
//! deadline and not after; acks show per instance with their timing; hostile callers and
//! oversized commands are refused with nothing stored; two replicas on PostgreSQL; the agent
//! runs the mapped shell command; the CLI waits for every instance.

mod util;

use std::collections::BTreeMap;
use std::time::Duration;

use confcast::client::{Identity, Session};
use confcast::protocol::{ClientMessage, CommandStatus, ServerMessage};
use serde_json::{json, Value};
use util::*;

/// A command as an instance saw it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    name: String,
    args: Value,
}

/// A WebSocket instance that keeps the commands it sees while reading other frames.
struct Member {
    name: String,
    session: Session,
    commands: std::collections::VecDeque<Seen>,
}

impl Member {
    /// Connects with `token`, says hello with `app` and `labels`, subscribes to `topics`.
    async fn join(
        ws_url: &str,
        token: Option<&str>,
        name: &str,
        app: &str,
        labels: &[(&str, &str)],
        topics: &[&str],
    ) -> Member {
        let identity = Identity {
            instance: name.into(),
            app: Some(app.into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        };
        let session = Session::connect_with(ws_url, &identity, token)
            .await
            .expect("instance connects");
        let mut m = Member {
            name: name.into(),
            session,
            commands: Default::default(),
        };
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        m.session.subscribe(&topics, None).await.expect("subscribe");
        loop {
            match m.frame().await {
                ServerMessage::Subscribed { .. } => return m,
                ServerMessage::Snapshot(_) => {}
                other => panic!("{name}: unexpected frame while subscribing: {other:?}"),
            }
        }
    }

    /// The next frame as it comes.
    async fn raw(&mut self) -> ServerMessage {
        tokio::time::timeout(WAIT, self.session.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.name))
            .unwrap_or_else(|e| panic!("{}: connection failed: {e}", self.name))
    }

    /// The next frame that is not a command; commands are kept aside for [`Member::command`].
    async fn frame(&mut self) -> ServerMessage {
        loop {
            match self.raw().await {
                ServerMessage::Command { id, name, args, .. } => {
                    self.commands.push_back(Seen { id, name, args })
                }
                other => return other,
            }
        }
    }

    /// The next command this instance receives.
    async fn command(&mut self) -> Seen {
        loop {
            if let Some(c) = self.commands.pop_front() {
                return c;
            }
            match self.raw().await {
                ServerMessage::Command { id, name, args, .. } => return Seen { id, name, args },
                ServerMessage::AckRecorded { .. } => {}
                other => panic!("{}: expected a command, got {other:?}", self.name),
            }
        }
    }

    /// Sends a `command_ack` and returns the answer (`command_recorded` or `error`).
    async fn ack(
        &mut self,
        id: &str,
        status: CommandStatus,
        message: Option<&str>,
    ) -> ServerMessage {
        self.session
            .ack_command(id, status, message.map(str::to_owned))
            .await
            .expect("send command_ack");
        self.frame().await
    }
}

/// `POST /api/v1/commands` with `token` (none: no header), as (status, body).
async fn post(base: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut request = http.post(format!("{base}/api/v1/commands")).json(body);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let reply = request.send().await.expect("POST /api/v1/commands");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// Creates a command and returns its id.
async fn send(base: &str, token: Option<&str>, body: Value) -> String {
    let (status, reply) = post(base, token, &body).await;
    assert_eq!(status, 201, "command created: {reply}");
    reply["id"].as_str().expect("id").to_string()
}

async fn get(base: &str, token: Option<&str>, path: &str) -> (u16, Value) {
    let http = reqwest::Client::new();
    let mut request = http.get(format!("{base}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let reply = request.send().await.expect("GET");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

async fn show(base: &str, id: &str) -> Value {
    let (status, body) = get(base, Some(READ_TOKEN), &format!("/api/v1/commands/{id}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The per-instance row of `instance` in a command.
fn row<'a>(command: &'a Value, instance: &str) -> &'a Value {
    command["instances"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["instance"] == instance))
        .unwrap_or_else(|| panic!("no row for {instance} in {command}"))
}

/// Polls a command until `f` holds.
async fn wait_command(base: &str, id: &str, f: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let c = show(base, id).await;
            if f(&c) {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("command {id} did not reach the expected state"))
}

fn base(server: &TestServer) -> String {
    server.url("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_target_reaches_its_instances_only_and_acks_show_per_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let base = base(&server);
    let admin = Some(ADMIN_TOKEN);
    let mut pay = Member::join(
        &server.ws_url(),
        Some(PAYMENTS_TOKEN),
        "payments-1",
        "payments",
        &[("zone", "eu")],
        &["payments"],
    )
    .await;
    let mut web = Member::join(
        &server.ws_url(),
        Some(OPS_TOKEN),
        "web-1",
        "web",
        &[("zone", "us")],
        &["billing"],
    )
    .await;

    let by_id = send(&base, admin, json!({"target": {"instances": ["payments-1"]}, "name": "refresh-cache", "args": {"scope": "users"}})).await;
    let by_app = send(
        &base,
        admin,
        json!({"target": {"app": "web"}, "name": "refresh-cache"}),
    )
    .await;
    let by_label = send(
        &base,
        admin,
        json!({"target": {"labels": {"zone": "eu"}}, "name": "refresh-cache"}),
    )
    .await;
    let by_topic = send(
        &base,
        admin,
        json!({"target": {"topics": "billing"}, "name": "refresh-cache"}),
    )
    .await;
    let to_all = send(
        &base,
        admin,
        json!({"target": {"all": true}, "name": "flush", "args": [1, 2]}),
    )
    .await;

    // Each instance sees exactly its commands, in the order they were created.
    let got = pay.command().await;
    assert_eq!(
        (got.id.as_str(), got.name.as_str()),
        (by_id.as_str(), "refresh-cache")
    );
    assert_eq!(got.args, json!({"scope": "users"}));
    assert_eq!(pay.command().await.id, by_label);
    // payments-1 may only read `payments`: the `billing` command is not for it, nor can it
    // subscribe its way there.
    pay.session
        .subscribe(&["billing".to_string()], None)
        .await
        .expect("send subscribe");
    match pay.frame().await {
        ServerMessage::Error { code, .. } => assert_eq!(code, "forbidden"),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let last = pay.command().await;
    assert_eq!(
        (last.id.as_str(), &last.args),
        (to_all.as_str(), &json!([1, 2]))
    );
    assert_eq!(web.command().await.id, by_app);
    assert_eq!(web.command().await.id, by_topic);
    assert_eq!(web.command().await.id, to_all);

    // Acks: each answered once, in order; the first verdict stands.
    match pay.ack(&by_id, CommandStatus::Done, None).await {
        ServerMessage::CommandRecorded {
            id,
            status,
            duplicate,
        } => {
            assert_eq!(
                (id, status, duplicate),
                (by_id.clone(), CommandStatus::Done, false)
            )
        }
        other => panic!("expected command_recorded, got {other:?}"),
    }
    match pay.ack(&by_id, CommandStatus::Failed, Some("late")).await {
        ServerMessage::CommandRecorded {
            status, duplicate, ..
        } => {
            assert_eq!((status, duplicate), (CommandStatus::Done, true))
        }
        other => panic!("expected a duplicate receipt, got {other:?}"),
    }
    let long = "x".repeat(5000);
    assert!(matches!(
        web.ack(&by_app, CommandStatus::Failed, Some(&long)).await,
        ServerMessage::CommandRecorded { .. }
    ));
    // An instance cannot ack a command that was not delivered to it (web-1's, or an unknown id).
    for foreign in [by_app.as_str(), "0123456789abcdef0123456789abcdef"] {
        match pay.ack(foreign, CommandStatus::Done, None).await {
            ServerMessage::Error { code, message } => {
                assert_eq!(code, "forbidden", "{message}")
            }
            other => panic!("expected forbidden, got {other:?}"),
        }
    }
    assert!(matches!(
        pay.ack(&to_all, CommandStatus::Done, None).await,
        ServerMessage::CommandRecorded { .. }
    ));

    let c = show(&base, &by_id).await;
    assert_eq!(
        c["counts"],
        json!({"targeted": 1, "pending": 0, "delivered": 0, "done": 1, "failed": 0, "expired": 0})
    );
    assert_eq!(
        (c["created_by"].as_str(), c["name"].as_str()),
        (Some("operator"), Some("refresh-cache"))
    );
    let r = row(&c, "payments-1");
    assert_eq!(r["status"], "done");
    let (delivered, finished) = (r["delivered_at_ms"].as_i64(), r["finished_at_ms"].as_i64());
    assert!(delivered.is_some() && finished >= delivered, "timing: {r}");
    assert!(delivered >= c["created_at_ms"].as_i64());

    let c = show(&base, &by_app).await;
    let r = row(&c, "web-1");
    assert_eq!(r["status"], "failed");
    assert_eq!(
        r["message"].as_str().map(str::len),
        Some(4096),
        "cut to max_ack_error_bytes"
    );
    // Still a forbidden ack later: nothing recorded for payments-1 on web-1's command.
    assert_eq!(c["instances"].as_array().map(Vec::len), Some(1));

    // `all` targeted both known instances: one done, one delivered and not acked yet.
    let c = show(&base, &to_all).await;
    assert_eq!(
        (
            c["counts"]["targeted"].as_u64(),
            c["counts"]["done"].as_u64(),
            c["counts"]["delivered"].as_u64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(row(&c, "web-1")["status"], "delivered");

    // The list: newest first, with counts; the audit log names the token for each.
    let (status, list) = get(&base, Some(READ_TOKEN), "/api/v1/commands?limit=10").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        [to_all.as_str(), &by_topic, &by_label, &by_app, &by_id]
    );
    let (_, audit) = get(&base, admin, "/api/v1/audit?action=command").await;
    let audited: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["actor"] == "operator")
        .filter_map(|e| e["target"].as_str())
        .collect();
    assert_eq!(audited, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_instances_get_a_command_before_its_deadline_and_not_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let base = base(&server);
    let admin = Some(ADMIN_TOKEN);
    let ws = server.ws_url();

    let early = send(
        &base,
        admin,
        json!({"target": {"all": true}, "name": "warm-up", "deadline_secs": 3}),
    )
    .await;
    let ghost = send(
        &base,
        admin,
        json!({"target": {"instances": ["ghost-1"]}, "name": "warm-up", "deadline_secs": 3}),
    )
    .await;
    let c = show(&base, &early).await;
    assert_eq!(c["counts"]["targeted"], 0, "nobody known yet: {c}");
    assert_eq!(
        row(&show(&base, &ghost).await, "ghost-1")["status"],
        "pending"
    );

    // Connects after the command was created, before its deadline: receives it.
    let mut late = Member::join(&ws, Some(OPS_TOKEN), "late-1", "web", &[], &["payments"]).await;
    assert_eq!(late.command().await.id, early);
    // Reconnects without acking: receives it again (same id), and acks this time.
    late.session.close().await;
    let mut late = Member::join(&ws, Some(OPS_TOKEN), "late-1", "web", &[], &["payments"]).await;
    assert_eq!(late.command().await.id, early, "redelivered until acked");
    assert!(matches!(
        late.ack(&early, CommandStatus::Done, None).await,
        ServerMessage::CommandRecorded { .. }
    ));
    assert_eq!(row(&show(&base, &early).await, "late-1")["deliveries"], 2);
    // Acked: a third connection does not get it again.
    late.session.close().await;
    let mut late = Member::join(&ws, Some(OPS_TOKEN), "late-1", "web", &[], &["payments"]).await;

    // After the deadline nothing is delivered; the undelivered target shows as expired.
    let c = wait_command(&base, &ghost, |c| c["expired"] == true).await;
    assert_eq!(c["counts"]["expired"], 1);
    assert_eq!(row(&c, "ghost-1")["status"], "pending");
    let mut after = Member::join(&ws, Some(OPS_TOKEN), "after-1", "web", &[], &["payments"]).await;
    let fresh = send(
        &base,
        admin,
        json!({"target": {"all": true}, "name": "second"}),
    )
    .await;
    assert_eq!(
        after.command().await.id,
        fresh,
        "the expired command is not delivered"
    );
    assert_eq!(
        late.command().await.id,
        fresh,
        "the acked command is not delivered again"
    );
    let c = show(&base, &early).await;
    assert!(
        c["instances"].as_array().is_some_and(|r| r.len() == 1),
        "{c}"
    );

    // What happened, counted in /metrics: `early` delivered twice and done once, `fresh`
    // delivered to two, the ghost's target expired.
    let reply = server
        .http
        .get(server.url("/metrics"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .expect("GET /metrics");
    let text = reply.text().await.expect("metrics text");
    let metrics = util::prom::parse(&text, util::prom::Format::Prometheus).expect("parses");
    let count = |outcome| metrics.get("confcast_commands_total", &[("outcome", outcome)]);
    assert_eq!(count("delivered"), 4.0);
    assert_eq!(count("done"), 1.0);
    assert_eq!(count("failed"), 0.0);
    assert_eq!(count("expired"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_oversized_commands_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let limits = "\n[limits]\nmax_active_commands = 2\nmax_command_instances = 2\nmax_command_args_bytes = 100\nmax_command_deadline_secs = 600\nmax_command_name_bytes = 16\n";
    let server = start_secured(dir.path(), &repo, "", &format!("{}{limits}", auth_toml())).await;
    let base = base(&server);
    let ok = json!({"target": {"all": true}, "name": "refresh-cache"});

    // Credentials: none 401, an instance token 401, read 403; reading needs read.
    assert_eq!(post(&base, None, &ok).await.0, 401);
    assert_eq!(post(&base, Some(PAYMENTS_TOKEN), &ok).await.0, 401);
    assert_eq!(post(&base, Some(READ_TOKEN), &ok).await.0, 403);
    assert_eq!(get(&base, None, "/api/v1/commands").await.0, 401);

    let admin = Some(ADMIN_TOKEN);
    let refused = [
        (
            json!({"target": {"all": true}, "name": "rm -rf"}),
            400,
            "command name",
        ),
        (
            json!({"target": {"all": true}, "name": "a".repeat(17)}),
            400,
            "max_command_name_bytes",
        ),
        (
            json!({"target": {"all": true}, "name": "x", "args": {"blob": "y".repeat(200)}}),
            413,
            "max_command_args_bytes",
        ),
        (
            json!({"target": {"instances": ["a", "b", "c"]}, "name": "x"}),
            400,
            "max_command_instances",
        ),
        (
            json!({"target": {"instances": []}, "name": "x"}),
            400,
            "at least one",
        ),
        (
            json!({"target": {"all": true}, "name": "x", "deadline_secs": 601}),
            400,
            "max_command_deadline_secs",
        ),
        (
            json!({"target": {"all": true}, "name": "x", "deadline_secs": 0}),
            400,
            "deadline_secs",
        ),
        (
            json!({"target": {"all": false}, "name": "x"}),
            400,
            "must be true",
        ),
        (
            json!({"target": {"topics": "bil*ing"}, "name": "x"}),
            400,
            "topics",
        ),
        (
            json!({"target": {"all": true, "app": "x"}, "name": "x"}),
            400,
            "invalid command",
        ),
        (
            json!({"target": {"all": true}, "name": "x", "extra": 1}),
            400,
            "unknown field",
        ),
        (json!("not an object"), 400, "invalid command"),
    ];
    for (body, status, says) in &refused {
        let (got, reply) = post(&base, admin, body).await;
        assert_eq!(got, *status, "{body} -> {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{body}: error {error:?} should mention {says:?}"
        );
    }
    let (_, list) = get(&base, Some(READ_TOKEN), "/api/v1/commands").await;
    assert_eq!(
        list["commands"],
        json!([]),
        "nothing stored for refused commands"
    );

    // At most two active commands; the third is refused with a clear reason, nothing stored.
    send(&base, admin, ok.clone()).await;
    send(&base, admin, ok.clone()).await;
    let (status, reply) = post(&base, admin, &ok).await;
    assert_eq!(status, 429, "{reply}");
    assert!(reply["error"]
        .as_str()
        .is_some_and(|e| e.contains("max_active_commands")));
    let (_, list) = get(&base, Some(READ_TOKEN), "/api/v1/commands").await;
    assert_eq!(list["commands"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        get(&base, Some(READ_TOKEN), "/api/v1/commands/nope")
            .await
            .0,
        404
    );

    // A garbage command_ack is answered, and the connection keeps working.
    let mut m = Member::join(
        &server.ws_url(),
        Some(PAYMENTS_TOKEN),
        "payments-9",
        "p",
        &[],
        &["payments"],
    )
    .await;
    m.commands.clear();
    m.session
        .send(&ClientMessage::CommandAck {
            id: String::new(),
            status: CommandStatus::Done,
            message: None,
        })
        .await
        .expect("send");
    assert!(matches!(m.frame().await, ServerMessage::Error { code, .. } if code == "forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_on_one_replica_reaches_an_instance_on_another() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let replicas = start_replicas(dir.path(), &repo, &db, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let base_a = a.url("");
    let mut on_b = Member::join(&b.ws_url(), None, "web-b", "web", &[], &["payments"]).await;
    let id = send(
        &base_a,
        None,
        json!({"target": {"app": "web"}, "name": "refresh-cache", "args": {"why": "replicas"}}),
    )
    .await;
    let got = on_b.command().await;
    assert_eq!(
        (got.id.as_str(), &got.args),
        (id.as_str(), &json!({"why": "replicas"}))
    );
    assert!(matches!(
        on_b.ack(&id, CommandStatus::Done, None).await,
        ServerMessage::CommandRecorded { .. }
    ));
    // The ack recorded on B shows on A.
    let c = wait_command(&base_a, &id, |c| c["counts"]["done"] == 1).await;
    assert_eq!(row(&c, "web-b")["status"], "done");
    // An instance that connects to B later gets it too (the list of active commands there).
    let mut late = Member::join(&b.ws_url(), None, "web-c", "web", &[], &["payments"]).await;
    assert_eq!(late.command().await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_the_mapped_shell_command_and_acks_its_exit_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    wait_synced(&server).await;
    let base = base(&server);
    let out = dir.path().join("refreshed.log");
    let agent_dir = dir.path().join("agent");
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let refresh = format!(
        "refresh-cache=printf '%s|%s|%s' \"$CONFCAST_COMMAND_ID\" \"$CONFCAST_COMMAND_NAME\" \"$CONFCAST_COMMAND_ARGS\" > {}",
        out.display()
    );
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
        .args([
            "agent",
            "--server",
            &server.ws_url(),
            "--instance",
            "agent-1",
            "--topic",
            "payments",
        ])
        .arg("--dir")
        .arg(&agent_dir)
        .args(["--command", &refresh])
        .args(["--command", "broken=echo 'cache is locked' >&2; exit 3"])
        .args(["--exec-timeout", "5"])
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("start agent");
    tokio::time::timeout(WAIT, async {
        loop {
            let (_, v) = server.get("/api/v1/instances/agent-1").await;
            if v["connected"] == true && v["subscriptions"] == json!(["payments"]) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("agent connected");

    // Args reach the process as JSON in the environment, never as shell text.
    let args = json!({"scope": "$(touch pwned); `id`"});
    let ok = send(
        &base,
        None,
        json!({"target": {"instances": ["agent-1"]}, "name": "refresh-cache", "args": args}),
    )
    .await;
    let c = wait_command(&base, &ok, |c| c["counts"]["done"] == 1).await;
    assert_eq!(row(&c, "agent-1")["message"], Value::Null);
    let written = std::fs::read_to_string(&out).expect("the command ran");
    assert_eq!(written, format!("{ok}|refresh-cache|{args}"));
    assert!(!agent_dir.join("pwned").exists() && !dir.path().join("pwned").exists());

    let failing = send(
        &base,
        None,
        json!({"target": {"instances": ["agent-1"]}, "name": "broken"}),
    )
    .await;
    let c = wait_command(&base, &failing, |c| c["counts"]["failed"] == 1).await;
    let message = row(&c, "agent-1")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("exit status: 3") && message.contains("cache is locked"),
        "{message}"
    );

    let unknown = send(
        &base,
        None,
        json!({"target": {"instances": ["agent-1"]}, "name": "reboot"}),
    )
    .await;
    let c = wait_command(&base, &unknown, |c| c["counts"]["failed"] == 1).await;
    let message = row(&c, "agent-1")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("no command configured"), "{message}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Runs `confcast command ...` as a user would, with `token` in CONFCAST_API_TOKEN.
async fn cli(token: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
        .arg("command")
        .args(args)
        .env("CONFCAST_API_TOKEN", token)
        .output()
        .await
        .expect("run confcast command");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_and_waits_until_every_instance_is_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let base = base(&server);
    // Two instances that do what they are told.
    for name in ["payments-1", "payments-2"] {
        let mut m = Member::join(
            &server.ws_url(),
            Some(PAYMENTS_TOKEN),
            name,
            "payments",
            &[],
            &["payments"],
        )
        .await;
        tokio::spawn(async move {
            while let Ok(frame) = m.session.next().await {
                if let ServerMessage::Command { id, .. } = frame {
                    let _ = m.session.ack_command(&id, CommandStatus::Done, None).await;
                }
            }
        });
    }
    let (code, stdout, stderr) = cli(
        ADMIN_TOKEN,
        &[
            "send",
            "--server",
            &base,
            "--name",
            "refresh-cache",
            "--app",
            "payments",
            "--args",
            r#"{"scope":"all"}"#,
            "--deadline",
            "5m",
            "--wait",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let id = stdout.lines().next().unwrap_or_default().to_string();
    assert_eq!(id.len(), 32, "{stdout}");
    for name in ["payments-1", "payments-2"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(name) && l.contains(" done ")),
            "{name} done in:\n{stdout}"
        );
    }
    let (code, shown, _) = cli(READ_TOKEN, &["show", &id, "--server", &base]).await;
    assert_eq!(code, 0);
    assert!(
        shown.contains("targeted 2") && shown.contains("done 2"),
        "{shown}"
    );

    // An instance that never acks: exit status 4 after --timeout.
    let (code, stdout, stderr) = cli(
        ADMIN_TOKEN,
        &[
            "send",
            "--server",
            &base,
            "--name",
            "refresh-cache",
            "--instance",
            "payments-gone",
            "--wait",
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(code, 4, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("payments-gone") && stdout.contains("pending"),
        "{stdout}"
    );
    // A read token cannot send: exit 1 with the server's reason.
    let (code, _, stderr) = cli(
        READ_TOKEN,
        &["send", "--server", &base, "--name", "x", "--all"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("403"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_hands_a_command_over_once_and_acks_it() {
    use confcast::client::{Client, ClientOptions, Delivery};
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    wait_synced(&server).await;
    let base = base(&server);
    let mut client = Client::start(ClientOptions::new(
        server.ws_url(),
        "embedded-1",
        &["payments"],
    ))
    .expect("client");
    let id = send(
        &base,
        None,
        json!({"target": {"instances": ["embedded-1"]}, "name": "refresh-cache", "args": {"n": 1}, "deadline_secs": 60}),
    )
    .await;
    let command = tokio::time::timeout(WAIT, async {
        loop {
            match client.next().await.expect("client running") {
                Delivery::Command {
                    id,
                    name,
                    args,
                    deadline_ms,
                } => return (id, name, args, deadline_ms),
                Delivery::Update(u) => client
                    .ack(
                        &u.topic,
                        u.version,
                        confcast::protocol::AckStatus::Applied,
                        None,
                    )
                    .expect("ack"),
                _ => {}
            }
        }
    })
    .await
    .expect("the command arrives");
    assert_eq!(
        (command.0.as_str(), command.1.as_str()),
        (id.as_str(), "refresh-cache")
    );
    assert_eq!(command.2, json!({"n": 1}));
    let c = show(&base, &id).await;
    assert_eq!(command.3, c["deadline_ms"].as_i64());
    client.ack_command(&id, CommandStatus::Failed, Some("x".repeat(10_000)));
    let c = wait_command(&base, &id, |c| c["counts"]["failed"] == 1).await;
    assert_eq!(
        row(&c, "embedded-1")["message"].as_str().map(str::len),
        Some(4096)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_does_not_hand_over_a_redelivered_command_twice() {
    use confcast::client::{Client, ClientOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    wait_synced(&server).await;
    let base = base(&server);
    let mut options = ClientOptions::new(server.ws_url(), "embedded-2", &["payments"]);
    options.backoff_initial = Duration::from_millis(50);
    options.backoff_max = Duration::from_millis(200);
    let mut client = Client::start(options).expect("client");
    let first = send(
        &base,
        None,
        json!({"target": {"instances": ["embedded-2"]}, "name": "refresh-cache"}),
    )
    .await;
    assert_eq!(next_command(&mut client).await, first);

    // Another connection takes the id over (the client is closed with 4010 and comes back):
    // the command, not acked yet, is sent again on each connection.
    let identity = Identity {
        instance: "embedded-2".into(),
        ..Identity::default()
    };
    let intruder = Session::connect(&server.ws_url(), &identity)
        .await
        .expect("connects");
    let c = wait_command(&base, &first, |c| {
        row(c, "embedded-2")["deliveries"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(row(&c, "embedded-2")["status"], "delivered");
    drop(intruder);

    // The application was handed it once: the next command it sees is the second one.
    let second = send(
        &base,
        None,
        json!({"target": {"instances": ["embedded-2"]}, "name": "refresh-cache"}),
    )
    .await;
    assert_eq!(next_command(&mut client).await, second);
    client.ack_command(&first, CommandStatus::Done, None);
    client.ack_command(&second, CommandStatus::Done, None);
    wait_command(&base, &first, |c| c["counts"]["done"] == 1).await;
    wait_command(&base, &second, |c| c["counts"]["done"] == 1).await;
}

/// The id of the next command a `Client` hands over.
async fn next_command(client: &mut confcast::client::Client) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let delivery = client.next().await.expect("client running");
            if let confcast::client::Delivery::Command { id, .. } = delivery {
                return id;
            }
        }
    })
    .await
    .expect("a command within the wait")
}
