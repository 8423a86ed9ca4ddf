//! Real remotes on loopback: `git daemon` (git://), git's smart-http backend behind basic auth
//! (a token), and OpenSSH's sshd with a deploy key and known_hosts checking.

mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use util::{config_repo, free_port, Instance, TestServer, SECRET, WAIT};

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) {
    let ok = tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "port {port} never opened");
}

/// Starts a server on `url`, waits for its first sync and returns the repo status.
async fn serve(dir: &Path, url: &str, auth: &str) -> (TestServer, serde_json::Value) {
    let data_dir = dir.join("data");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[repos]]\nname = \"cfg\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n[repos.auth]\nfetch_timeout_secs = 20\n{auth}\n",
        data_dir.display()
    );
    let server = TestServer::start_toml(data_dir, toml).await;
    let status = server.wait_syncs(1).await;
    (server, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_daemon_remote_syncs_and_pushes_flow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let port = free_port();
    let _daemon = Reaped(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon"),
    );
    wait_port(port).await;
    let (server, status) = serve(
        dir.path(),
        &format!("git://127.0.0.1:{port}/origin.git"),
        "",
    )
    .await;
    assert!(status["last_error"].is_null(), "{status}");
    let (mut i, snaps) = Instance::subscribed(&server, "d", &["payments"]).await;
    assert_eq!(snaps[0].version, 1);
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 1\n".as_slice()))],
            "over git://",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.commit, c.to_string());
}

#[derive(Clone)]
struct HttpGit {
    root: PathBuf,
    token: String,
    refused: Arc<AtomicUsize>,
}

/// git http-backend as CGI behind basic auth.
async fn http_backend(
    State(git): State<HttpGit>,
    UrlPath(path): UrlPath<String>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", git.token))
    );
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(given) if given == expected => {}
        Some(_) => {
            git.refused.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Basic realm=\"git\"")],
            )
                .into_response();
        }
        None => {
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Basic realm=\"git\"")],
            )
                .into_response()
        }
    }
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &git.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{path}"))
        .env("QUERY_STRING", query.unwrap_or_default())
        .env("REQUEST_METHOD", method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", "x-access-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("git http-backend");
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&body).await;
    }
    let out = child
        .wait_with_output()
        .await
        .expect("backend output")
        .stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((at, gap)) = split else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut response = Response::new(Body::from(out[at + gap..].to_vec()));
    for line in String::from_utf8_lossy(&out[..at]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            if let Some(code) = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                *response.status_mut() = code;
            }
        } else if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::try_from(k.trim()),
            axum::http::HeaderValue::try_from(v),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_http_with_a_token_and_one_try_only_with_a_wrong_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let git = HttpGit {
        root: dir.path().to_path_buf(),
        token: "good-token".into(),
        refused: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .route("/git/{*path}", axum::routing::any(http_backend))
        .with_state(git.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://127.0.0.1:{port}/git/origin.git");

    std::fs::write(dir.path().join("token"), "good-token\n").expect("token");
    let good = dir.path().join("good");
    std::fs::create_dir_all(&good).expect("dir");
    let (server, status) = serve(
        &good,
        &url,
        &format!("token_file = \"{}\"", dir.path().join("token").display()),
    )
    .await;
    assert!(status["last_error"].is_null(), "{status}");
    let (mut i, snaps) = Instance::subscribed(&server, "h", &["payments"]).await;
    assert_eq!(snaps[0].files.len(), 2);
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 2\n".as_slice()))],
            "over http",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.commit, c.to_string());

    // A wrong token: one attempt, a message that says what to fix, no loop.
    std::fs::write(dir.path().join("bad-token"), "bad-token\n").expect("token");
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("dir");
    let (_server, status) = serve(
        &bad,
        &url,
        &format!(
            "token_file = \"{}\"",
            dir.path().join("bad-token").display()
        ),
    )
    .await;
    let error = status["last_error"].as_str().expect("an error");
    assert!(
        error.contains("authentication failed") && error.contains("token"),
        "{error}"
    );
    assert!(
        !error.contains("bad-token"),
        "the token never appears in messages: {error}"
    );
    assert_eq!(
        git.refused.load(Ordering::SeqCst),
        1,
        "the rejected credential was not tried again"
    );
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_with_a_deploy_key_and_known_hosts_checking() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but /usr/sbin/sshd is missing: .ci/run must install openssh-server");
        }
        eprintln!("skipping the ssh remote test: /usr/sbin/sshd is not installed (apt-get install openssh-server)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let d = dir.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    keygen(&d.join("other_host_key"));
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
    std::fs::create_dir_all("/run/sshd").ok();
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\nPermitRootLogin prohibit-password\n",
        d.join("host_key").display(),
        d.join("authorized_keys").display(),
        d.join("sshd.pid").display()
    );
    std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let _sshd = Reaped(
        Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).expect("log"))
            .spawn()
            .expect("sshd"),
    );
    wait_port(port).await;
    let pubkey = |name: &str| {
        let text = std::fs::read_to_string(d.join(name)).expect("pub key");
        text.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    std::fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{port} {}\n", pubkey("host_key.pub")),
    )
    .expect("known_hosts");
    std::fs::write(
        d.join("wrong_hosts"),
        format!("[127.0.0.1]:{port} {}\n", pubkey("other_host_key.pub")),
    )
    .expect("wrong");
    std::fs::write(d.join("empty_hosts"), "# nobody\n").expect("empty");
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", repo.path().display());
    let auth = |hosts: &str| {
        format!(
            "ssh_key_file = \"{}\"\nknown_hosts_file = \"{}\"",
            d.join("client_key").display(),
            d.join(hosts).display()
        )
    };

    let good = d.join("good");
    std::fs::create_dir_all(&good).expect("dir");
    let (server, status) = serve(&good, &url, &auth("known_hosts")).await;
    assert!(
        status["last_error"].is_null(),
        "{status}\nsshd log:\n{}",
        std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
    );
    let (mut i, snaps) = Instance::subscribed(&server, "s", &["payments"]).await;
    assert_eq!(snaps[0].version, 1);
    let c = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 3\n".as_slice()))],
            "over ssh",
        )
        .expect("commit");
    server.github_push("main", &c.to_string(), SECRET).await;
    assert_eq!(i.next_change().await.commit, c.to_string());

    for (hosts, expect) in [
        ("wrong_hosts", "does not match"),
        ("empty_hosts", "is not in"),
    ] {
        let sub = d.join(hosts.replace("_hosts", ""));
        std::fs::create_dir_all(&sub).expect("dir");
        let (_s, status) = serve(&sub, &url, &auth(hosts)).await;
        let error = status["last_error"].as_str().expect("an error");
        assert!(
            error.contains("ssh host key") && error.contains(expect),
            "{hosts}: {error}"
        );
    }
}
