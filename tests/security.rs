//! Access control and bounded resources, end to end against the real server: scoped instance
//! tokens, JWTs, API scopes, TLS, secure-by-default start, the hello deadline, caps, the webhook
//! budget and slow request heads. Every token and certificate is made here.

mod util;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use util::*;

const JWT_SECRET: &str = "jwt-hs256-secret-0123456789abcdef";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws` with `token` as a bearer credential; `Err(status)` when the upgrade is refused.
async fn ws(server: &TestServer, token: Option<&str>) -> Result<Ws, u16> {
    let mut request = server.ws_url().into_client_request().expect("request");
    if let Some(token) = token {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into()))
        .await
        .expect("send");
}

/// The next JSON message (pings are skipped).
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("stream open")
            .expect("frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code.
async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    tokio::time::timeout(within, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Close(Some(frame))) => return Some(u16::from(frame.code)),
                Ok(Message::Close(None)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
        None
    })
    .await
    .expect("closed in time")
}

async fn hello(ws: &mut Ws, instance: &str) -> Value {
    send(ws, json!({"type": "hello", "instance": instance})).await;
    recv(ws).await
}

/// Subscribes and returns the snapshot topics up to `subscribed`, or the error frame.
async fn subscribe(ws: &mut Ws, topics: &[&str]) -> Result<Vec<String>, Value> {
    send(ws, json!({"type": "subscribe", "topics": topics})).await;
    let mut got = Vec::new();
    loop {
        let m = recv(ws).await;
        match m["type"].as_str() {
            Some("snapshot") => got.push(m["topic"].as_str().unwrap_or_default().to_string()),
            Some("subscribed") => return Ok(got),
            _ => return Err(m),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_tokens_bind_ids_and_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;

    assert_eq!(ws(&server, None).await.err(), Some(401), "no credential");
    assert_eq!(ws(&server, Some("guess")).await.err(), Some(401));

    let mut w = ws(&server, Some(PAYMENTS_TOKEN))
        .await
        .expect("payments token");
    let refused = hello(&mut w, "billing-1").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");
    let welcome = hello(&mut w, "payments-1").await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert!(welcome["max_frame_bytes"].as_u64().unwrap_or(0) > 16 * 1024 * 1024);

    for outside in [
        &["billing"][..],
        &["*"],
        &["payments", "billing"],
        &["payments/*"],
    ] {
        let e = subscribe(&mut w, outside)
            .await
            .expect_err("outside the grant");
        assert_eq!(e["code"], "forbidden", "{outside:?}: {e}");
    }
    assert_eq!(
        subscribe(&mut w, &["payments"]).await.expect("inside"),
        ["payments"]
    );

    send(
        &mut w,
        json!({"type": "ack", "topic": "billing", "version": 1, "status": "applied"}),
    )
    .await;
    assert_eq!(recv(&mut w).await["code"], "forbidden");
    send(
        &mut w,
        json!({"type": "ack", "topic": "payments", "version": 1, "status": "applied"}),
    )
    .await;
    assert_eq!(recv(&mut w).await["type"], "ack_recorded");

    // The billing rollout never saw an ack from the payments credential.
    let billing: Value = server
        .http
        .get(server.url("/api/v1/topics/billing"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(billing["rollout"]["applied"], json!([]), "{billing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_credential_cannot_take_over_a_connected_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;

    let mut owner = ws(&server, Some(PAYMENTS_TOKEN)).await.expect("owner");
    assert_eq!(hello(&mut owner, "payments-1").await["type"], "welcome");

    // The ops token may claim any id, but not one held by another credential's connection.
    let mut thief = ws(&server, Some(OPS_TOKEN)).await.expect("ops");
    assert_eq!(hello(&mut thief, "payments-1").await["code"], "forbidden");
    // The owner is still connected and served.
    assert_eq!(
        subscribe(&mut owner, &["payments"]).await.expect("served"),
        ["payments"]
    );

    // The same credential reconnecting (a restart) replaces the old connection.
    let mut again = ws(&server, Some(PAYMENTS_TOKEN)).await.expect("again");
    assert_eq!(hello(&mut again, "payments-1").await["type"], "welcome");
    assert_eq!(close_code(&mut owner, WAIT).await, Some(4010));
}

fn jwt(claims: Value, key: &jsonwebtoken::EncodingKey, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).expect("encode jwt")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_checked_for_key_expiry_and_scope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, JWT_SECRET).expect("write secret");
    let top = format!(
        "[auth.jwt]\nhs256_secret_file = \"{}\"\nissuer = \"orchestrator\"\n",
        secret_file.display()
    );
    let server = start_secured(dir.path(), &repo, "", &top).await;
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).expect("key");
    let hs = jsonwebtoken::Algorithm::HS256;
    let claims = |exp: u64| json!({"sub": "web-*", "topics": ["payments"], "exp": exp, "iss": "orchestrator"});

    let good = jwt(claims(now() + 600), &key, hs);
    let mut w = ws(&server, Some(&good)).await.expect("valid jwt");
    assert_eq!(
        hello(&mut w, "api-1").await["code"],
        "forbidden",
        "sub is web-*"
    );
    assert_eq!(hello(&mut w, "web-1").await["type"], "welcome");
    assert_eq!(
        subscribe(&mut w, &["billing"]).await.expect_err("scope")["code"],
        "forbidden"
    );
    assert_eq!(
        subscribe(&mut w, &["payments"]).await.expect("scope"),
        ["payments"]
    );

    let expired = jwt(claims(now() - 3600), &key, hs);
    assert_eq!(
        ws(&server, Some(&expired)).await.err(),
        Some(401),
        "expired"
    );
    let other_key =
        jsonwebtoken::EncodingKey::from_secret(b"another-secret-0123456789abcdef").expect("key");
    let forged = jwt(claims(now() + 600), &other_key, hs);
    assert_eq!(
        ws(&server, Some(&forged)).await.err(),
        Some(401),
        "wrong key"
    );
    let wrong_issuer = jwt(
        json!({"sub": "web-1", "topics": ["payments"], "exp": now() + 600, "iss": "someone"}),
        &key,
        hs,
    );
    assert_eq!(ws(&server, Some(&wrong_issuer)).await.err(), Some(401));
    let no_issuer = jwt(
        json!({"sub": "web-1", "topics": ["payments"], "exp": now() + 600}),
        &key,
        hs,
    );
    assert_eq!(
        ws(&server, Some(&no_issuer)).await.err(),
        Some(401),
        "iss is required when configured"
    );
    let no_topics = jwt(
        json!({"sub": "web-1", "exp": now() + 600, "iss": "orchestrator"}),
        &key,
        hs,
    );
    assert_eq!(ws(&server, Some(&no_topics)).await.err(), Some(401));
    // `alg: none` and another algorithm than the configured one are refused.
    let unsigned = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(claims(now() + 600).to_string().as_bytes())
    );
    assert_eq!(ws(&server, Some(&unsigned)).await.err(), Some(401));
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_jwts_verify_with_a_public_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    let public = dir.path().join("jwt.pub.pem");
    std::fs::write(&public, pair.public_key_pem()).expect("write public key");
    let top = format!(
        "[auth.jwt]\neddsa_public_key_file = \"{}\"\n",
        public.display()
    );
    let server = start_secured(dir.path(), &repo, "", &top).await;

    let key = jsonwebtoken::EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())
        .expect("private key");
    let token = jwt(
        json!({"sub": "web-7", "topics": ["*"], "exp": now() + 600}),
        &key,
        jsonwebtoken::Algorithm::EdDSA,
    );
    let mut w = ws(&server, Some(&token)).await.expect("eddsa jwt");
    assert_eq!(hello(&mut w, "web-7").await["type"], "welcome");
    assert_eq!(hello(&mut w, "web-7").await["code"], "out_of_order");

    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let other = jsonwebtoken::EncodingKey::from_ed_pem(other.serialize_pem().as_bytes())
        .expect("private key");
    let forged = jwt(
        json!({"sub": "web-7", "topics": ["*"], "exp": now() + 600}),
        &other,
        jsonwebtoken::Algorithm::EdDSA,
    );
    assert_eq!(ws(&server, Some(&forged)).await.err(), Some(401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_read_and_writes_need_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let get = |token: Option<&'static str>| {
        let mut req = server.http.get(server.url("/api/v1/topics"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move { req.send().await.expect("GET").status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(
        get(Some(PAYMENTS_TOKEN)).await,
        401,
        "an instance token is no API token"
    );
    assert_eq!(get(Some(READ_TOKEN)).await, 200);
    assert_eq!(get(Some(ADMIN_TOKEN)).await, 200);
    let sync = |token: &'static str| {
        let req = server
            .http
            .post(server.url("/api/v1/repos/cfg/sync"))
            .bearer_auth(token);
        async move { req.send().await.expect("POST").status().as_u16() }
    };
    assert_eq!(sync(READ_TOKEN).await, 403);
    assert_eq!(sync(ADMIN_TOKEN).await, 202);
    // ?token= is for /ws only: API tokens must not land in proxy logs.
    let status = server
        .http
        .get(server.url(&format!("/api/v1/topics?token={READ_TOKEN}")))
        .send()
        .await
        .expect("GET")
        .status();
    assert_eq!(status.as_u16(), 401);
    assert_eq!(server.get("/healthz").await.0, 200, "probes stay open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_others_can_reach_needs_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let parse = |top: &str| {
        let toml = format!("{top}\n[server]\ndata_dir = \"{}\"\n", dir.path().display());
        confcast::config::Config::parse(&toml, std::iter::empty(), dir.path(), &|_| None)
            .expect("config")
    };
    let wildcard = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let err = confcast::serve(wildcard, parse(""), async {})
        .await
        .expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("auth.instance_tokens"), "{message}");
    assert!(message.contains("auth.api_tokens"), "{message}");
    assert!(message.contains("allow_anonymous"), "{message}");

    // With credentials it starts; with allow_anonymous too (the operator's explicit choice).
    for top in [auth_toml(), "[auth]\nallow_anonymous = true\n".to_string()] {
        let wildcard = tokio::net::TcpListener::bind("0.0.0.0:0")
            .await
            .expect("bind");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(confcast::serve(wildcard, parse(&top), async move {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "serves with {top}");
        let _ = tx.send(());
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stops")
            .expect("task")
            .expect("clean");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_deadline_and_per_connection_caps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = "[limits]\nhello_timeout_secs = 1\nmax_subscriptions = 2\nmax_labels = 2\n";
    let server = start_secured(dir.path(), &repo, "", top).await;

    let mut silent = ws(&server, None).await.expect("connect");
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut silent, WAIT).await, Some(4011));
    assert!(started.elapsed() < Duration::from_secs(4));

    let mut w = ws(&server, None).await.expect("connect");
    send(
        &mut w,
        json!({"type": "hello", "instance": "a", "labels": {"a": "1", "b": "2", "c": "3"}}),
    )
    .await;
    assert_eq!(recv(&mut w).await["code"], "invalid", "too many labels");
    send(
        &mut w,
        json!({"type": "hello", "instance": "evil\u{202e}1"}),
    )
    .await;
    assert_eq!(recv(&mut w).await["code"], "invalid", "bidi override");
    assert_eq!(hello(&mut w, "ok-1").await["type"], "welcome");
    assert!(subscribe(&mut w, &["payments", "billing"]).await.is_ok());
    // The same patterns again cost nothing; a third distinct one is over the cap.
    assert!(subscribe(&mut w, &["payments"]).await.is_ok());
    assert_eq!(
        subscribe(&mut w, &["web"]).await.expect_err("cap")["code"],
        "invalid"
    );
    let long = "x".repeat(300);
    assert_eq!(
        subscribe(&mut w, &[long.as_str()]).await.expect_err("long")["code"],
        "invalid"
    );

    // A message over limits.max_client_message_bytes ends the connection (1009).
    let huge =
        json!({"type": "ack", "topic": "x".repeat(70_000), "version": 1, "status": "applied"});
    let _ = w.send(Message::Text(huge.to_string().into())).await;
    assert_eq!(close_code(&mut w, WAIT).await, Some(1009));
}

/// Sends raw bytes over TCP and returns what the server answered before closing (or timing out).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_have_a_budget_and_a_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = "[limits]\nwebhook_bytes_in_flight = 3000\nbody_read_timeout_secs = 2\n";
    let server = start_secured(dir.path(), &repo, "max_body_bytes = 2000", top).await;

    // A sender that announces 2000 bytes and stalls holds 2000 of the 3000.
    let mut staller = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    staller
        .write_all(
            b"POST /webhooks/cfg HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-github-event: push\r\ncontent-length: 2000\r\n\r\n{",
        )
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = br#"{"ref":"refs/heads/main"}"#.to_vec();
    let headers = [
        ("x-github-event", "push"),
        ("content-type", "application/json"),
    ];
    // A legitimate push of 25 bytes still fits beside it.
    let (status, _) = server.webhook(&headers, body.clone(), Some(SECRET)).await;
    assert_eq!(status, 202);
    // A second staller takes what is left; now even a small push is told to come back later.
    let mut staller2 = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    staller2
        .write_all(b"POST /webhooks/cfg HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = server
        .http
        .post(server.url("/webhooks/cfg"))
        .header("x-github-event", "push")
        .header("x-hub-signature-256", sign_github(SECRET, &body))
        .body(body.clone())
        .send()
        .await
        .expect("POST");
    assert_eq!(reply.status().as_u16(), 503);
    assert_eq!(
        reply
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    // The stallers get 408 at the deadline, and the budget is back.
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, staller.read(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"));
    let _ = tokio::time::timeout(WAIT, staller2.read(&mut answer)).await;
    let (status, _) = server.webhook(&headers, body, Some(SECRET)).await;
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_off_and_connections_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = "[limits]\nheader_read_timeout_secs = 1\nmax_connections = 3\n";
    let server = start_secured(dir.path(), &repo, "", top).await;

    // One header byte at a time never completes a head: closed at the deadline.
    let mut slow = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    let mut closed = false;
    for b in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 64];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(150), slow.read(&mut probe)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickled head is cut off");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Three idle WebSockets fill the connection slots: a fourth request waits ...
    let mut held = Vec::new();
    for i in 0..3 {
        let mut w = ws(&server, None).await.expect("connect");
        assert_eq!(hello(&mut w, &format!("idle-{i}")).await["type"], "welcome");
        held.push(w);
    }
    let waiting = tokio::spawn({
        let addr = server.addr;
        async move {
            raw_exchange(
                addr,
                b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
                WAIT,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "no slot free: the request waits");
    // ... and is served as soon as one closes.
    held.pop();
    let answer = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("served")
        .expect("task");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("write key");
    (cert_file, key_file, cert.cert.der().to_vec())
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_https_and_wss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let (cert, key, ca) = self_signed(dir.path());
    let server_toml = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    // `[server.tls]` is a table: it goes after the [server] keys, so pass it as top-level text.
    let data_dir = dir.path().join("data");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{server_toml}\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        data_dir.display(),
        repo.url()
    );
    let server = TestServer::start_toml(data_dir, toml).await;

    // https: a real request over TLS, certificate checked against the test's own CA.
    let mut https = tls_connect(server.addr, &ca).await;
    https
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    https.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // wss: the protocol over the same TLS listener.
    let stream = tls_connect(server.addr, &ca).await;
    let (mut w, _) = tokio_tungstenite::client_async("wss://localhost/ws", stream)
        .await
        .expect("wss upgrade");
    w.send(Message::Text(
        json!({"type": "hello", "instance": "tls-1"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let welcome = loop {
        match w.next().await.expect("open").expect("frame") {
            Message::Text(t) => break serde_json::from_str::<Value>(&t).expect("json"),
            _ => continue,
        }
    };
    assert_eq!(welcome["type"], "welcome");

    // Plain HTTP to the TLS port gets no answer a client could mistake for one.
    let plain = raw_exchange(
        server.addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(!plain.contains("200 OK"), "{plain}");
}

/// The bundled agent, as an operator runs it: `wss://` to a server with a private CA (given as
/// `SSL_CERT_FILE`), a per-instance JWT from an environment variable, files written and acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_connects_over_wss_with_a_jwt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let (cert, key, _) = self_signed(dir.path());
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, JWT_SECRET).expect("write secret");
    let data_dir = dir.path().join("data");
    let toml = format!(
        "[auth.jwt]\nhs256_secret_file = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[[repos]]\nname = \"cfg\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\n",
        secret_file.display(),
        data_dir.display(),
        cert.display(),
        key.display(),
        repo.url()
    );
    let server = TestServer::start_toml(data_dir, toml).await;
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).expect("key");
    let token = jwt(
        json!({"sub": "agent-tls", "topics": ["payments"], "exp": now() + 600}),
        &key,
        jsonwebtoken::Algorithm::HS256,
    );
    let target = dir.path().join("etc-app");
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_confcast"))
        .args(["agent", "--server"])
        .arg(format!("wss://localhost:{}/ws", server.addr.port()))
        .args([
            "--instance",
            "agent-tls",
            "--topic",
            "payments",
            "--token-env",
            "AGENT_JWT",
            "--exec",
            "true",
        ])
        .arg("--dir")
        .arg(&target)
        .env("AGENT_JWT", &token)
        .env("SSL_CERT_FILE", &cert)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("start agent");
    let app_toml = target.join("payments/app.toml");
    let written = tokio::time::timeout(WAIT, async {
        while std::fs::read_to_string(&app_toml).ok().as_deref() != Some("port = 8443\n") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        written.is_ok(),
        "agent never wrote its files; log:\n{}",
        std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
    );
}

/// A connection lives as long as its JWT: at `exp` (plus the configured leeway) it is closed with
/// 4013, and the same token can no longer open one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_connection_ends_when_the_token_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, JWT_SECRET).expect("write secret");
    let top = format!(
        "[auth.jwt]\nhs256_secret_file = \"{}\"\nleeway_secs = 0\n",
        secret_file.display()
    );
    let server = start_secured(dir.path(), &repo, "", &top).await;
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).expect("key");
    let token = jwt(
        json!({"sub": "web-1", "topics": ["*"], "exp": now() + 3}),
        &key,
        jsonwebtoken::Algorithm::HS256,
    );
    let mut w = ws(&server, Some(&token)).await.expect("valid for now");
    assert_eq!(hello(&mut w, "web-1").await["type"], "welcome");
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match w.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!(
                    "ended without a close frame after {:?}: {other:?}",
                    started.elapsed()
                ),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(end, Some(4013));
    assert_eq!(ws(&server, Some(&token)).await.err(), Some(401));
}
