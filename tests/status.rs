//! The operator CLI against a real server: `confcast status` (`--json`, `--wait TOPIC@VERSION`
//! with its exit statuses), and `rollback`, `pin` and `unpin`, run as the built binary with the
//! API token in the environment, as a CI pipeline or an operator would.

mod util;

use std::process::Output;

use confcast::client::{Identity, Session};
use confcast::protocol::{AckStatus, ServerMessage};
use serde_json::Value;
use util::*;

/// Runs `confcast args...` against `server` with `token` in `CONFCAST_API_TOKEN`.
async fn confcast(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_confcast"));
    cmd.args(args)
        .arg("--server")
        .arg(server)
        .env_remove("CONFCAST_API_TOKEN")
        .env_remove("CONFCAST_SERVER")
        .kill_on_drop(true);
    if let Some(token) = token {
        cmd.env("CONFCAST_API_TOKEN", token);
    }
    tokio::time::timeout(WAIT * 2, cmd.output())
        .await
        .expect("the CLI ends in time")
        .expect("the CLI runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An instance subscribed to `payments` that acked its snapshot.
async fn instance(server: &TestServer, name: &str) -> Instance {
    let identity = Identity {
        instance: name.into(),
        ..Default::default()
    };
    let session = Session::connect_with(&server.ws_url(), &identity, Some(OPS_TOKEN))
        .await
        .expect("connects");
    let mut i = Instance {
        name: name.into(),
        session,
    };
    i.session
        .subscribe(&["payments".to_string()], None)
        .await
        .expect("subscribe");
    let mut version = 0;
    loop {
        match i.next().await {
            ServerMessage::Snapshot(s) => version = s.version,
            ServerMessage::Subscribed { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    i.ack("payments", version, AckStatus::Applied, None).await;
    i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_json_and_waits_on_a_rollout_with_exit_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let base = format!("http://{}", server.addr);
    let mut web = instance(&server, "web-1").await;

    let out = confcast(&base, Some(READ_TOKEN), &["status", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let payments = v["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["topic"] == "payments")
        .expect("payments")
        .clone();
    assert_eq!(payments["version"], 1);
    assert_eq!(payments["applied"], 1);
    assert_eq!(payments["converged"], true);
    assert!(payments["pinned"].is_null());

    // The table, for people.
    let out = confcast(&base, Some(READ_TOKEN), &["status", "payments"]).await;
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(table.starts_with("TOPIC"), "{table}");
    assert!(table.contains("payments  v1"), "{table}");
    assert!(!table.contains("billing"), "{table}");

    // Converged: exit 0 at once.
    let wait = [
        "status",
        "--wait",
        "payments@1",
        "--timeout",
        "10s",
        "--interval",
        "100ms",
    ];
    let out = confcast(&base, Some(READ_TOKEN), &wait).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // A push the instance has not applied: not converged on v2 within the timeout, exit 1
    // naming who is behind.
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9000\n"))],
            "bump",
        )
        .expect("commit");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    let change = web.next_change().await;
    assert_eq!(change.version, 2);
    let wait2 = [
        "status",
        "--wait",
        "payments@2",
        "--timeout",
        "1s",
        "--interval",
        "100ms",
    ];
    let out = confcast(&base, Some(READ_TOKEN), &wait2).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let why = text(&out.stderr);
    assert!(
        why.contains("not converged on v2") && why.contains("web-1 (behind)"),
        "{why}"
    );

    // Applied while the CLI waits: exit 0.
    let waiting = tokio::spawn({
        let base = base.clone();
        async move {
            let wait = [
                "status",
                "--wait",
                "payments@2",
                "--timeout",
                "20s",
                "--interval",
                "100ms",
            ];
            confcast(&base, Some(READ_TOKEN), &wait).await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    web.ack("payments", 2, AckStatus::Applied, None).await;
    let out = waiting.await.expect("CLI task");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Errors exit 2: an unknown topic, no credential, a wrong one, a server that is not there.
    let out = confcast(&base, Some(READ_TOKEN), &["status", "--wait", "nope@1"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no topic `nope`"),
        "{}",
        text(&out.stderr)
    );
    let out = confcast(&base, None, &["status", "--wait", "payments@1"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    let out = confcast(&base, Some("not-a-token"), &["status"]).await;
    assert_eq!(out.status.code(), Some(2));
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = confcast(
        &nowhere,
        Some(READ_TOKEN),
        &["status", "--wait", "payments@1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );
    let out = confcast(&base, Some(READ_TOKEN), &["status", "--wait", "payments"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("TOPIC@VERSION"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_pin_and_unpin_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let base = format!("http://{}", server.addr);
    let mut web = instance(&server, "web-1").await;
    let commit = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9000\n"))],
            "bump",
        )
        .expect("commit");
    server
        .github_push("main", &commit.to_string(), SECRET)
        .await;
    assert_eq!(web.next_change().await.version, 2);

    // A read token may not roll back: exit 1 with the server's reason.
    let rollback = [
        "rollback",
        "payments",
        "--to",
        "1",
        "--reason",
        "9000 is wrong",
    ];
    let out = confcast(&base, Some(READ_TOKEN), &rollback).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    let out = confcast(&base, Some(ADMIN_TOKEN), &rollback).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("v3 published with the files of v1"),
        "{}",
        text(&out.stdout)
    );
    let change = web.next_change().await;
    assert_eq!(
        (change.version, change.message.as_str()),
        (3, "rollback to v1: 9000 is wrong")
    );

    // --token-env names another variable.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_confcast"));
    let out = cmd
        .args([
            "pin",
            "payments",
            "--reason",
            "hold it",
            "--token-env",
            "MY_ADMIN",
        ])
        .args(["--server", &base])
        .env_remove("CONFCAST_API_TOKEN")
        .env("MY_ADMIN", ADMIN_TOKEN)
        .output()
        .await
        .expect("pin runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("pinned at v3"),
        "{}",
        text(&out.stdout)
    );

    let out = confcast(&base, Some(READ_TOKEN), &["status", "--json", "payments"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["topics"][0]["pinned"], "operator: hold it");

    let out = confcast(&base, Some(ADMIN_TOKEN), &["unpin", "payments"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Git says port 9000: the unpin publishes it as v4.
    let change = web.next_change().await;
    assert_eq!(change.version, 4);
    let out = confcast(&base, Some(ADMIN_TOKEN), &["unpin", "payments"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is not pinned"),
        "{}",
        text(&out.stderr)
    );
}

/// `https://` to a server with `[server.tls]`, its certificate checked against a private CA
/// given as `SSL_CERT_FILE`; without it the certificate is refused (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_speaks_https_with_a_private_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write key");
    let data_dir = dir.path().join("data");
    let toml = format!(
        "{}\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        auth_toml(),
        data_dir.display(),
        cert_file.display(),
        key_file.display(),
        repo.url()
    );
    let server = TestServer::start_toml(data_dir, toml).await;
    let base = format!("https://localhost:{}", server.addr.port());
    let status = |ca: Option<&std::path::Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_confcast"));
        cmd.args(["status", "--json", "--server", &base])
            .env("CONFCAST_API_TOKEN", READ_TOKEN)
            .env_remove("SSL_CERT_DIR")
            .kill_on_drop(true);
        match ca {
            Some(ca) => cmd.env("SSL_CERT_FILE", ca),
            None => cmd.env_remove("SSL_CERT_FILE"),
        };
        async move {
            tokio::time::timeout(WAIT * 2, cmd.output())
                .await
                .expect("in time")
                .expect("runs")
        }
    };
    // The system's trust store does not know the test's certificate.
    let out = status(None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out.stderr)
    );
    let out = status(Some(&cert_file)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["topics"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["topic"] == "payments")),
        "{v}"
    );
}
