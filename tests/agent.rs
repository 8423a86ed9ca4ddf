//! `confcast agent` as a user runs it: a real process writing real files and running a real reload
//! command against a real server.

mod util;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use util::{config_repo, TestServer, SECRET, WAIT};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(server: &TestServer, name: &str, dir: &Path, exec: &str, extra: &[&str]) -> Agent {
    let log = std::fs::File::create(dir.with_extension("log")).expect("agent log");
    let child = Command::new(env!("CARGO_BIN_EXE_confcast"))
        .args([
            "agent",
            "--server",
            &server.ws_url(),
            "--instance",
            name,
            "--topic",
            "payments",
            "--exec",
            exec,
        ])
        .arg("--dir")
        .arg(dir)
        .args(["--exec-timeout", "5"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("start agent");
    Agent(child)
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let ok = tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting for {what}");
}

const RELOAD: &str = r#"if grep -q bad "$CONFCAST_DIR/payments/app.toml"; then echo "config rejected: bad value on line 1" >&2; exit 3; fi; echo "$CONFCAST_TOPIC v$CONFCAST_VERSION" >> "$CONFCAST_DIR/../reloads.log""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_writes_files_reloads_acks_and_rolls_back_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let target = dir.path().join("etc-app");
    let _agent = start_agent(
        &server,
        "agent-1",
        &target,
        RELOAD,
        &["--rollback-on-failure"],
    );

    let app_toml = target.join("payments/app.toml");
    wait_for("v1 on disk", || {
        std::fs::read_to_string(&app_toml).is_ok_and(|s| s == "port = 8443\n")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(target.join("payments/limits.json")).expect("limits"),
        r#"{"daily": 100}"#
    );
    assert!(
        !target.join("billing").exists(),
        "only the subscribed topic is written"
    );
    server
        .wait_topic("payments", |v| {
            v["rollout"]["applied"][0]["instance"] == "agent-1"
        })
        .await;

    // A good change: new files, a reload, an applied ack.
    let c = repo
        .commit(
            "main",
            &[
                ("payments/app.toml", Some(b"port = 9000\n".as_slice())),
                ("payments/limits.json", None),
            ],
            "v2",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    wait_for("v2 on disk", || {
        std::fs::read_to_string(&app_toml).is_ok_and(|s| s == "port = 9000\n")
    })
    .await;
    server
        .wait_topic("payments", |v| {
            v["rollout"]["converged"] == true && v["version"] == 2
        })
        .await;
    assert!(
        !target.join("payments/limits.json").exists(),
        "deleted file is gone"
    );
    let reloads = std::fs::read_to_string(dir.path().join("reloads.log")).expect("reload log");
    assert!(reloads.contains("payments v2"), "{reloads}");

    // A change the application rejects: failed ack with the stderr tail, old files back.
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = \"bad\"\n".as_slice()))],
            "v3",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    let topic = server
        .wait_topic("payments", |v| {
            v["version"] == 3 && !v["rollout"]["failed"].as_array().is_none_or(Vec::is_empty)
        })
        .await;
    let failed = &topic["rollout"]["failed"][0];
    assert_eq!(failed["instance"], "agent-1");
    assert_eq!(failed["version"], 3);
    let error = failed["error"].as_str().expect("error text");
    assert!(
        error.contains("exit status: 3") && error.contains("config rejected: bad value on line 1"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(&app_toml).expect("read"),
        "port = 9000\n",
        "rolled back"
    );

    // The next good version applies normally, on top of the rejected one.
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9001\n".as_slice()))],
            "v4",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    server
        .wait_topic("payments", |v| {
            v["rollout"]["converged"] == true && v["version"] == 4
        })
        .await;
    assert_eq!(
        std::fs::read_to_string(&app_toml).expect("read"),
        "port = 9001\n"
    );
    assert!(!target.join("payments/limits.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_to_write_through_a_planted_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let target = dir.path().join("etc-app");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&target).expect("target");
    std::fs::create_dir_all(&outside).expect("outside");
    std::os::unix::fs::symlink(&outside, target.join("payments")).expect("plant symlink");
    let _agent = start_agent(&server, "agent-2", &target, "true", &[]);
    let topic = server
        .wait_topic("payments", |v| {
            !v["rollout"]["failed"].as_array().is_none_or(Vec::is_empty)
        })
        .await;
    let error = topic["rollout"]["failed"][0]["error"]
        .as_str()
        .expect("error");
    assert!(error.contains("not created by confcast"), "{error}");
    assert_eq!(
        std::fs::read_dir(&outside).expect("outside").count(),
        0,
        "nothing written outside the directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarts_on_its_last_good_config_while_the_server_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let mut server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let target = dir.path().join("etc-app");
    let agent = start_agent(&server, "agent-3", &target, "true", &[]);
    server
        .wait_topic("payments", |v| v["rollout"]["converged"] == true)
        .await;
    drop(agent);
    let ws = server.ws_url();
    server.stop().await;
    // The whole directory is wiped except the agent's state; the server is gone.
    for entry in std::fs::read_dir(&target).expect("dir").flatten() {
        if entry.file_name() != ".confcast" {
            std::fs::remove_file(entry.path()).expect("remove link");
        }
    }
    std::fs::remove_dir_all(target.join(".confcast/current")).ok();
    std::fs::remove_file(target.join(".confcast/current")).ok();
    let log = std::fs::File::create(dir.path().join("agent3b.log")).expect("log");
    let _again = Agent(
        Command::new(env!("CARGO_BIN_EXE_confcast"))
            .args([
                "agent",
                "--server",
                &ws,
                "--instance",
                "agent-3",
                "--topic",
                "payments",
                "--exec",
                "true",
                "--dir",
            ])
            .arg(&target)
            .stdout(log.try_clone().expect("fd"))
            .stderr(log)
            .spawn()
            .expect("agent"),
    );
    let app_toml = target.join("payments/app.toml");
    wait_for("last good config restored offline", || {
        std::fs::read_to_string(&app_toml).is_ok_and(|s| s == "port = 8443\n")
    })
    .await;
}
