//! Every forge over real HTTP with real signatures; redeliveries; polling when webhooks are lost.

mod util;

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use util::{config_repo, delivery_id, Instance, TestServer, SECRET};

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forge_push_is_verified_and_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    // Two secrets at once: the inline test secret and a GitLab signing token from a file (rotation).
    std::fs::write(dir.path().join("whsec"), format!("{WHSEC}\n")).expect("secret file");
    let extra = format!("secret_file = \"{}\"", dir.path().join("whsec").display());
    let server = TestServer::start(dir.path(), &repo, &extra).await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "watch", &["payments"]).await;
    let mut version = 1;

    let mut push = async |name: &str, headers: Vec<(String, String)>, body: String| {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (status, reply) = server.webhook(&headers, body.into_bytes(), None).await;
        assert_eq!(status, 202, "{name}: {reply}");
        assert_eq!(reply["status"], "queued", "{name}: {reply}");
        let c = i.next_change().await;
        version += 1;
        assert_eq!(c.version, version, "{name}");
    };

    let commit = |n: u32| {
        let body = format!("port = {n}\n");
        repo.commit(
            "main",
            &[("payments/app.toml", Some(body.as_bytes()))],
            "forge",
        )
        .expect("commit")
        .to_string()
    };

    // Gitea, Forgejo, Gogs: bare hex HMAC-SHA256 in their own header.
    for (n, (event, sig, delivery)) in [
        ("x-gitea-event", "x-gitea-signature", "x-gitea-delivery"),
        (
            "x-forgejo-event",
            "x-forgejo-signature",
            "x-forgejo-delivery",
        ),
        ("x-gogs-event", "x-gogs-signature", "x-gogs-delivery"),
    ]
    .into_iter()
    .enumerate()
    {
        let after = commit(n as u32);
        let body =
            serde_json::json!({"ref": "refs/heads/main", "before": "0".repeat(40), "after": after})
                .to_string();
        let headers = vec![
            (event.to_string(), "push".to_string()),
            (
                sig.to_string(),
                hmac_hex(SECRET.as_bytes(), body.as_bytes()),
            ),
            (delivery.to_string(), delivery_id()),
            // Gitea also sends GitHub-style headers; they must not change how it is verified.
            ("x-github-event".to_string(), "push".to_string()),
        ];
        push(event, headers, body).await;
    }

    // Bitbucket Cloud and Data Center: X-Hub-Signature sha256=<hex>, no file lists at all.
    let after = commit(10);
    let body = serde_json::json!({"push": {"changes": [{"new": {"type": "branch", "name": "main", "target": {"hash": after}}, "old": null}]}}).to_string();
    let headers = vec![
        ("x-event-key".to_string(), "repo:push".to_string()),
        (
            "x-hub-signature".to_string(),
            format!("sha256={}", hmac_hex(SECRET.as_bytes(), body.as_bytes())),
        ),
        ("x-request-uuid".to_string(), delivery_id()),
    ];
    push("bitbucket cloud", headers, body).await;
    let after = commit(11);
    let body = serde_json::json!({"eventKey": "repo:refs_changed", "changes": [{"ref": {"id": "refs/heads/main"}, "toHash": after, "type": "UPDATE"}]}).to_string();
    let headers = vec![
        ("x-event-key".to_string(), "repo:refs_changed".to_string()),
        (
            "x-hub-signature".to_string(),
            format!("sha256={}", hmac_hex(SECRET.as_bytes(), body.as_bytes())),
        ),
        ("x-request-id".to_string(), delivery_id()),
    ];
    push("bitbucket data center", headers, body).await;

    // GitLab signing token (Standard Webhooks), keyed by the secret from the file.
    let after = commit(12);
    let body = serde_json::json!({"object_kind": "push", "ref": "refs/heads/main", "after": after})
        .to_string();
    let id = delivery_id();
    let ts = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs())
    .to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(&WHSEC["whsec_".len()..])
        .expect("key");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let sig = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let headers = vec![
        ("x-gitlab-event".to_string(), "Push Hook".to_string()),
        ("webhook-id".to_string(), id),
        ("webhook-timestamp".to_string(), ts),
        ("webhook-signature".to_string(), sig.clone()),
    ];
    push("gitlab signing token", headers, body.clone()).await;

    // The same signed GitLab request an hour later is a replay.
    let old_ts = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 3600)
        .to_string();
    let stale = [
        ("x-gitlab-event", "Push Hook"),
        ("webhook-id", "msg_x"),
        ("webhook-timestamp", old_ts.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    let (status, reply) = server.webhook(&stale, body.into_bytes(), None).await;
    assert_eq!(status, 401);
    assert!(
        reply["error"]
            .as_str()
            .expect("error")
            .contains("timestamp"),
        "{reply}"
    );

    // Bitbucket Data Center's test button.
    let body = br#"{"test": true}"#.to_vec();
    let sig = format!("sha256={}", hmac_hex(SECRET.as_bytes(), &body));
    let (status, reply) = server
        .webhook(
            &[
                ("x-event-key", "diagnostics:ping"),
                ("x-hub-signature", &sig),
            ],
            body,
            None,
        )
        .await;
    assert_eq!((status, reply["status"].as_str()), (200, Some("pong")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_answered_duplicate_and_triggers_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let syncs = server.wait_syncs(1).await["syncs"].as_u64().expect("syncs");
    let after = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 1\n".as_slice()))],
            "once",
        )
        .expect("commit")
        .to_string();
    let body = serde_json::json!({"ref": "refs/heads/main", "after": after})
        .to_string()
        .into_bytes();
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    ];
    let (status, first) = server.webhook(&headers, body.clone(), Some(SECRET)).await;
    assert_eq!((status, first["status"].as_str()), (202, Some("queued")));
    server.wait_syncs(syncs + 1).await;
    let (status, again) = server.webhook(&headers, body.clone(), Some(SECRET)).await;
    assert_eq!((status, again["status"].as_str()), (200, Some("duplicate")));
    // A forged "redelivery" with a bad signature is still a 401, not a duplicate.
    assert_eq!(server.webhook(&headers, body, Some("wrong")).await.0, 401);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(
        repos["repos"][0]["syncs"].as_u64(),
        Some(syncs + 1),
        "the redelivery synced nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_converges_when_every_webhook_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "poll_interval_secs = 1").await;
    server.wait_syncs(1).await;
    let (mut i, _) = Instance::subscribed(&server, "poller", &["payments"]).await;
    let after = repo
        .commit(
            "main",
            &[("payments/app.toml", Some(b"port = 7\n".as_slice()))],
            "no webhook",
        )
        .expect("commit")
        .to_string();
    let c = i.next_change().await;
    assert_eq!((c.version, c.commit), (2, after));
    let (_, repos) = server.get("/api/v1/repos").await;
    let r = &repos["repos"][0];
    assert_eq!(r["poll_interval_secs"], 1);
    assert!(r["next_poll_ms"].as_i64().is_some(), "{r}");
    assert!(r["last_error"].is_null(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_refuses_a_gitlab_secret_token_even_when_it_is_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let syncs = server.wait_syncs(1).await["syncs"].as_u64().expect("syncs");
    // Under `auto` the secret is an HMAC key: seen once in clear, it must not open the door.
    let body = serde_json::json!({"object_kind": "push", "ref": "refs/heads/main"}).to_string();
    let headers = [
        ("x-gitlab-event", "Push Hook"),
        ("x-gitlab-token", SECRET),
        (
            "x-gitlab-event-uuid",
            "6a0a4a8c-0000-4000-8000-000000000001",
        ),
    ];
    let (status, reply) = server.webhook(&headers, body.into_bytes(), None).await;
    assert_eq!(status, 401, "{reply}");
    let error = reply["error"].as_str().expect("error");
    assert!(error.contains("repos[..].webhook.provider"), "{error}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(repos["repos"][0]["syncs"].as_u64(), Some(syncs), "no sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_delivery_with_an_oversized_id_is_refused_before_it_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = TestServer::start(dir.path(), &repo, "").await;
    let syncs = server.wait_syncs(1).await["syncs"].as_u64().expect("syncs");
    let body = serde_json::json!({"ref": "refs/heads/main", "after": "a".repeat(40)})
        .to_string()
        .into_bytes();
    // The id header is not covered by the signature: a captured delivery can be replayed with
    // any id. 257 bytes is one over the default limit of 256.
    let long = "x".repeat(257);
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", long.as_str()),
    ];
    let (status, reply) = server.webhook(&headers, body.clone(), Some(SECRET)).await;
    assert_eq!(status, 400, "{reply}");
    let error = reply["error"].as_str().expect("error");
    assert!(
        error.contains("257 bytes") && error.contains("limits.max_delivery_id_bytes"),
        "{error}"
    );
    // Nothing was stored, and nothing synced.
    let db = format!("sqlite://{}", server.data_dir.join("confcast.db").display());
    let stored_ids = async || -> Vec<String> {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&db)
            .await
            .expect("open the server's database");
        sqlx::query_scalar("SELECT id FROM deliveries")
            .fetch_all(&mut conn)
            .await
            .expect("read deliveries")
    };
    assert!(stored_ids().await.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, repos) = server.get("/api/v1/repos").await;
    assert_eq!(repos["repos"][0]["syncs"].as_u64(), Some(syncs), "no sync");

    // At the limit it is an ordinary delivery, remembered as such.
    let at_limit = "y".repeat(256);
    let headers = [
        ("x-github-event", "push"),
        ("x-github-delivery", at_limit.as_str()),
    ];
    let (status, reply) = server.webhook(&headers, body.clone(), Some(SECRET)).await;
    assert_eq!((status, reply["status"].as_str()), (202, Some("queued")));
    let (status, reply) = server.webhook(&headers, body, Some(SECRET)).await;
    assert_eq!((status, reply["status"].as_str()), (200, Some("duplicate")));
    assert_eq!(stored_ids().await, [at_limit]);
}
