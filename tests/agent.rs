//! `confcast agent` as a user runs it: a real process writing real files and running a real reload
//! command against a real server.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use util::{config_repo, ConfigRepo, TestServer, SECRET, WAIT};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(server: &TestServer, name: &str, dir: &Path, exec: &str, extra: &[&str]) -> Agent {
    start_agent_at(&server.ws_url(), name, dir, exec, extra)
}

fn start_agent_at(url: &str, name: &str, dir: &Path, exec: &str, extra: &[&str]) -> Agent {
    let log = std::fs::File::create(dir.with_extension("log")).expect("agent log");
    let child = Command::new(env!("CARGO_BIN_EXE_confcast"))
        .args([
            "agent",
            "--server",
            url,
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

/// A server that is not confcast (or one that went wrong): it answers `hello`, sends one snapshot
/// of `payments` holding `files` ((path, content) pairs) and returns the first ack it gets.
async fn serve_one_snapshot(
    files: &[(&str, &str)],
) -> (String, tokio::task::JoinHandle<serde_json::Value>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let files: Vec<serde_json::Value> = files
        .iter()
        .map(|(path, content)| serde_json::json!({"path": path, "sha": "0".repeat(40), "content": content}))
        .collect();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("agent connects");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let send = |v: serde_json::Value| Message::Text(v.to_string().into());
        loop {
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                panic!("the agent hung up before acking");
            };
            let frame: serde_json::Value = serde_json::from_str(&text).expect("JSON frame");
            match frame["type"].as_str() {
                Some("hello") => {
                    let welcome = serde_json::json!({"type": "welcome", "protocol": 1, "server": "fake",
                        "instance": frame["instance"], "heartbeat_secs": 60});
                    ws.send(send(welcome)).await.expect("welcome");
                }
                Some("subscribe") => {
                    let snapshot = serde_json::json!({"type": "snapshot", "topic": "payments", "version": 1,
                        "seq": 1, "commit": "c".repeat(40), "files": files});
                    let subscribed = serde_json::json!({"type": "subscribed", "topics": frame["topics"],
                        "seq": 1, "mode": "snapshot"});
                    ws.send(send(snapshot)).await.expect("snapshot");
                    ws.send(send(subscribed)).await.expect("subscribed");
                }
                Some("ack") => return frame,
                _ => {}
            }
        }
    });
    (url, task)
}

/// Every entry under `dir`, recursively (symlinks not followed).
fn entries_under(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path.clone());
            }
            all.push(path);
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_git_metadata_and_backslashes_whatever_the_server_sends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("payments/.git/config", "`.git` component"),
        ("payments/.GIT/hooks/post-checkout", "`.git` component"),
        ("payments/a\\b.toml", "backslash"),
        ("payments/\u{202e}lmx.toml", "bidirectional"),
    ];
    for (n, (bad, why)) in cases.into_iter().enumerate() {
        let (url, server) = serve_one_snapshot(&[
            ("payments/app.toml", "port = 1\n"),
            (bad, "[core]\n\tfsmonitor = touch pwned\n"),
        ])
        .await;
        let target = dir.path().join(format!("etc-app-{n}"));
        let _agent = start_agent_at(
            &url,
            &format!("agent-h{n}"),
            &target,
            r#"touch "$CONFCAST_DIR/../reloaded""#,
            &[],
        );
        let ack = tokio::time::timeout(WAIT, server)
            .await
            .expect("an ack in time")
            .expect("fake server");
        assert_eq!(
            (ack["status"].as_str(), ack["version"].as_u64()),
            (Some("failed"), Some(1))
        );
        let error = ack["error"].as_str().expect("error text");
        assert!(
            error.contains(&format!("{bad:?}")) && error.contains(why),
            "{error}"
        );
        // Nothing of the version is written, not even its good file, and no reload ran.
        let all = entries_under(&target);
        assert!(
            !all.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.eq_ignore_ascii_case(".git"))),
            "{all:?}"
        );
        let written: Vec<PathBuf> = all
            .into_iter()
            .filter(|p| !p.starts_with(target.join(".confcast")))
            .collect();
        assert!(written.is_empty(), "{bad:?}: wrote {written:?}");
        assert!(!dir.path().join("reloaded").exists());
    }
}

/// Path and content of file `n` of a large topic: nested directories, small TOML documents.
fn many(n: usize, version: &str) -> (String, String) {
    (
        format!("payments/d{}/s{}/f{n:04}.toml", n % 10, n % 3),
        format!("id = {n}\nversion = \"{version}\"\n"),
    )
}

/// Every regular file under `dir` (following the agent's top-level symlink), relative to `dir`.
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let mut pending = vec![dir.join("payments")];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path.strip_prefix(dir).expect("under dir");
                let content = std::fs::read_to_string(&path).expect("read file");
                found.insert(rel.to_string_lossy().into_owned(), content);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_applies_a_topic_of_thousands_of_files_completely() {
    const FILES: usize = 3_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = ConfigRepo::init(&dir.path().join("origin.git")).expect("repo");
    let v1: Vec<(String, String)> = (0..FILES).map(|n| many(n, "v1")).collect();
    let changes: Vec<(&str, Option<&[u8]>)> = v1
        .iter()
        .map(|(p, c)| (p.as_str(), Some(c.as_bytes())))
        .collect();
    repo.commit("main", &changes, "many files").expect("commit");
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let target = dir.path().join("etc-app");
    let _agent = start_agent(&server, "agent-many", &target, "true", &[]);
    server
        .wait_topic("payments", |v| {
            v["version"] == 1 && v["rollout"]["converged"] == true
        })
        .await;
    let expected: std::collections::BTreeMap<String, String> = v1.into_iter().collect();
    assert_eq!(files_under(&target), expected, "every file, exactly");

    // The next version, written in full as a new generation: one file changed, one deleted, one added.
    let (changed, _) = many(7, "");
    let (deleted, _) = many(8, "");
    let (added, added_content) = many(FILES, "v2");
    let c = repo
        .commit(
            "main",
            &[
                (
                    changed.as_str(),
                    Some(b"id = 7\nversion = \"v2\"\n".as_slice()),
                ),
                (deleted.as_str(), None),
                (added.as_str(), Some(added_content.as_bytes())),
            ],
            "v2",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    server
        .wait_topic("payments", |v| {
            v["version"] == 2 && v["rollout"]["converged"] == true
        })
        .await;
    let mut expected = expected;
    expected.insert(changed, "id = 7\nversion = \"v2\"\n".into());
    expected.remove(&deleted);
    expected.insert(added, added_content);
    assert_eq!(files_under(&target), expected, "every file of v2, exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_warns_when_the_server_may_send_frames_above_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let small = dir.path().join("small");
    let default = dir.path().join("default");
    let _small = start_agent(
        &server,
        "agent-small",
        &small,
        "true",
        &["--max-frame-bytes", "2000"],
    );
    let _default = start_agent(&server, "agent-default", &default, "true", &[]);
    // This topic's frames are small: both apply it.
    server
        .wait_topic("payments", |v| {
            v["rollout"]["converged"] == true
                && v["rollout"]["applied"]
                    .as_array()
                    .is_some_and(|a| a.len() == 2)
        })
        .await;
    let log = |d: &Path| std::fs::read_to_string(d.with_extension("log")).expect("agent log");
    let warned = log(&small);
    assert!(
        warned.contains("server_max_frame_bytes=65955160")
            && warned.contains("client_max_frame_bytes=2000")
            && warned.contains("--max-frame-bytes"),
        "{warned}"
    );
    let quiet = log(&default);
    assert!(!quiet.contains("max_frame_bytes"), "{quiet}");
}

/// Vets the new generation (`CONFCAST_DIR`) while the live files (`CONFCAST_LIVE_DIR`) are still
/// the old ones; a bad value floods stdout (as a noisy validator would) and explains itself last.
const CHECK: &str = r#"echo "check v$CONFCAST_VERSION saw live: $(cat "$CONFCAST_LIVE_DIR/payments/app.toml")" >> "$CONFCAST_LIVE_DIR/../checks.log"
test "$CONFCAST_DIR" != "$CONFCAST_LIVE_DIR" || exit 9
if grep -q bad "$CONFCAST_DIR/payments/app.toml"; then head -c 1000000 /dev/zero | tr '\0' x; echo; echo "app.toml:1: bad value" >&2; exit 1; fi"#;

const COUNT_RELOADS: &str =
    r#"echo "$CONFCAST_TOPIC v$CONFCAST_VERSION" >> "$CONFCAST_DIR/../reloads.log""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_command_refuses_a_bad_version_before_the_swap_and_reloads_run_only_on_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    server.wait_syncs(1).await;
    let target = dir.path().join("etc-app");
    let _agent = start_agent(
        &server,
        "agent-c",
        &target,
        COUNT_RELOADS,
        &["--check", CHECK],
    );
    let app_toml = target.join("payments/app.toml");
    let reloads = || std::fs::read_to_string(dir.path().join("reloads.log")).unwrap_or_default();
    let checks = || std::fs::read_to_string(dir.path().join("checks.log")).unwrap_or_default();
    server
        .wait_topic("payments", |v| v["rollout"]["converged"] == true)
        .await;
    assert_eq!(reloads(), "payments v1\n");

    // A bad version: the check fails, nothing is swapped in, nothing reloads, the ack says why.
    let bad = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = \"bad\"\n".as_slice()))],
            "v2 bad",
        )
        .expect("commit");
    server.github_push("main", &bad.to_string(), SECRET).await;
    let topic = server
        .wait_topic("payments", |v| {
            v["version"] == 2 && !v["rollout"]["failed"].as_array().is_none_or(Vec::is_empty)
        })
        .await;
    let error = topic["rollout"]["failed"][0]["error"]
        .as_str()
        .expect("error text");
    assert!(
        error.starts_with("check command failed (exit status: 1), the files were not swapped in:")
            && error.ends_with("app.toml:1: bad value"),
        "{}",
        &error[..error.len().min(300)]
    );
    assert!(
        error.len() < 2300,
        "a megabyte of output is cut to its tail: {} bytes",
        error.len()
    );
    assert_eq!(
        std::fs::read_to_string(&app_toml).expect("read"),
        "port = 8443\n"
    );
    assert_eq!(
        reloads(),
        "payments v1\n",
        "no reload for a refused version"
    );
    let generations: Vec<String> = std::fs::read_dir(target.join(".confcast"))
        .expect("meta")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    assert_eq!(
        generations.len(),
        1,
        "the refused generation is removed: {generations:?}"
    );

    // Reverting the bad commit gives the files in place a new version: applied, no reload.
    let revert = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 8443\n".as_slice()))],
            "v3 revert",
        )
        .expect("commit");
    server
        .github_push("main", &revert.to_string(), SECRET)
        .await;
    server
        .wait_topic("payments", |v| {
            v["version"] == 3 && v["rollout"]["converged"] == true
        })
        .await;
    assert_eq!(reloads(), "payments v1\n", "same files, no reload");

    // A good change: checked against the new files while the old ones are live, then reloaded.
    let good = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 9443\n".as_slice()))],
            "v4",
        )
        .expect("commit");
    server.github_push("main", &good.to_string(), SECRET).await;
    server
        .wait_topic("payments", |v| {
            v["version"] == 4 && v["rollout"]["converged"] == true
        })
        .await;
    assert_eq!(
        std::fs::read_to_string(&app_toml).expect("read"),
        "port = 9443\n"
    );
    assert_eq!(reloads(), "payments v1\npayments v4\n");
    assert_eq!(
        checks(),
        "check v1 saw live: \ncheck v2 saw live: port = 8443\ncheck v4 saw live: port = 8443\n",
        "v3 needed no check; each check ran before its swap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_agent_whose_check_fails_halts_the_rollout_before_anyone_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(
        dir.path(),
        &repo,
        r#"
[[rollouts]]
name = "canary"
topics = ["payments"]
stages = ["1 instance"]
bake_secs = 1
auto_revert = true
"#,
    )
    .await;
    server.wait_syncs(1).await;
    let names = ["web-1", "web-2", "web-3", "web-4"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
    let _agents: Vec<Agent> = names
        .iter()
        .zip(&dirs)
        .map(|(name, target)| {
            start_agent(&server, name, target, COUNT_RELOADS, &["--check", CHECK])
        })
        .collect();
    server
        .wait_topic("payments", |v| {
            v["rollout"]["applied"].as_array().map_or(0, Vec::len) == names.len()
        })
        .await;
    let reloads = || std::fs::read_to_string(dir.path().join("reloads.log")).unwrap_or_default();
    assert_eq!(reloads().lines().count(), 4, "{}", reloads());

    let bad = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = \"bad\"\n".as_slice()))],
            "v2 bad",
        )
        .expect("commit");
    server.github_push("main", &bad.to_string(), SECRET).await;
    let topic = server
        .wait_topic("payments", |v| {
            v["stages"]["state"] == "aborted" && v["rollout"]["converged"] == true
        })
        .await;
    assert_eq!(topic["version"], 3, "auto_revert published v3");
    let reason = topic["stages"]["reason"].as_str().expect("reason");
    assert!(
        reason.contains(
            "auto_revert: halted at stage 1 of 2 (1 instance): 1 of 1 instance acked failed"
        ) && reason
            .contains("check command failed (exit status: 1), the files were not swapped in"),
        "{reason}"
    );
    for target in &dirs {
        assert_eq!(
            std::fs::read_to_string(target.join("payments/app.toml")).expect("read"),
            "port = 8443\n",
            "{}",
            target.display()
        );
    }
    // The canary's check refused v2; v3's files are those in place everywhere: no reload at all.
    assert_eq!(reloads().lines().count(), 4, "{}", reloads());
    let checks = std::fs::read_to_string(dir.path().join("checks.log")).expect("checks");
    assert_eq!(
        checks.lines().filter(|l| l.starts_with("check v2")).count(),
        1,
        "only the canary saw v2: {checks}"
    );
}
