//! The audit log, end to end: every write through the API is recorded with the token's name
//! before it is done, every refused credential (API, WebSocket, webhook) with where it came
//! from and never the credential itself, and a flood of refusals cannot grow the database.

mod util;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use util::*;

/// `GET /api/v1/audit` with `token`, as (status, body).
async fn audit(server: &TestServer, token: &str, query: &str) -> (u16, Value) {
    let reply = server
        .http
        .get(server.url(&format!("/api/v1/audit{query}")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET audit");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

fn entries(body: &Value) -> Vec<Value> {
    body["entries"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_recorded_with_the_token_name_and_only_admins_read_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;

    let reply = server
        .http
        .post(server.url("/api/v1/repos/cfg/sync"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("force sync");
    assert_eq!(reply.status().as_u16(), 202);
    // A sync of a repo that does not exist is not a write: 404, nothing recorded.
    let reply = server
        .http
        .post(server.url("/api/v1/repos/nope/sync"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("force sync");
    assert_eq!(reply.status().as_u16(), 404);

    // The audit log tells who did what to which repo; a read token may not look.
    assert_eq!(audit(&server, READ_TOKEN, "").await.0, 403);
    assert_eq!(
        server
            .http
            .get(server.url("/api/v1/audit"))
            .send()
            .await
            .expect("GET")
            .status()
            .as_u16(),
        401
    );
    let (status, body) = audit(&server, ADMIN_TOKEN, "?action=sync").await;
    assert_eq!(status, 200, "{body}");
    let syncs = entries(&body);
    assert_eq!(syncs.len(), 1, "{body}");
    assert_eq!(syncs[0]["actor"], "operator");
    assert_eq!(syncs[0]["action"], "sync");
    assert_eq!(syncs[0]["target"], "cfg");
    assert_eq!(syncs[0]["outcome"], "ok");
    assert!(syncs[0]["at_ms"].as_i64().unwrap_or(0) > 0);

    // The read token's refused attempt above is itself in the log.
    let (_, body) = audit(&server, ADMIN_TOKEN, "?action=credential_refused").await;
    let refused = entries(&body);
    assert!(
        refused
            .iter()
            .any(|e| e["target"] == "GET /api/v1/audit" && e["actor"] == "127.0.0.1"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_recorded_everywhere_without_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let guess = "guessed-token-which-must-never-be-stored";

    // The API, the WebSocket and a webhook, each with a wrong credential.
    let api = server
        .http
        .get(server.url("/api/v1/topics"))
        .bearer_auth(guess)
        .send()
        .await
        .expect("GET");
    assert_eq!(api.status().as_u16(), 401);
    match tokio_tungstenite::connect_async(format!("{}?token={guess}", server.ws_url())).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401)
        }
        other => panic!("the upgrade should be refused: {:?}", other.map(|_| ())),
    }
    let (status, _) = server.github_push("main", &"1".repeat(40), guess).await;
    assert_eq!(status, 401);
    // A valid credential claiming an instance id outside its pattern.
    let url = format!("{}?token={PAYMENTS_TOKEN}", server.ws_url());
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let hello = serde_json::json!({"type": "hello", "instance": "billing-1"});
    ws.send(Message::Text(hello.to_string().into()))
        .await
        .expect("send hello");
    loop {
        let frame = ws.next().await.expect("an answer").expect("frame");
        if let Message::Text(text) = frame {
            let v: Value = serde_json::from_str(&text).expect("json");
            if v["type"] == "error" {
                assert_eq!(v["code"], "forbidden", "{v}");
                break;
            }
        }
    }

    let (status, body) = audit(&server, ADMIN_TOKEN, "?action=credential_refused").await;
    assert_eq!(status, 200);
    let targets: Vec<String> = entries(&body)
        .iter()
        .map(|e| e["target"].as_str().unwrap_or_default().to_string())
        .collect();
    for want in [
        "GET /api/v1/topics",
        "GET /ws",
        "POST /webhooks/cfg",
        "hello billing-1",
    ] {
        assert!(targets.iter().any(|t| t == want), "{want} in {targets:?}");
    }
    for e in entries(&body) {
        assert_eq!(e["outcome"], "refused");
        let actor = if e["target"] == "hello billing-1" {
            "token:payments"
        } else {
            "127.0.0.1"
        };
        assert_eq!(e["actor"], actor, "{e}");
        assert!(e["detail"]["reason"].is_string(), "{e}");
    }
    assert!(
        !body.to_string().contains(guess),
        "the credential is stored: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_recorded_within_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = format!("{}\n[limits]\naudit_refusals_per_minute = 5\n", auth_toml());
    let server = start_secured(dir.path(), &repo, "", &top).await;

    for i in 0..200 {
        let reply = server
            .http
            .get(server.url("/api/v1/topics"))
            .bearer_auth(format!("flood-{i}"))
            .send()
            .await
            .expect("GET");
        // Every one is still refused: the budget bounds the log, not the check.
        assert_eq!(reply.status().as_u16(), 401);
    }
    let (_, body) = audit(
        &server,
        ADMIN_TOKEN,
        "?action=credential_refused&limit=1000",
    )
    .await;
    // One minute's budget, unless the test crossed a minute boundary: then a second window
    // records up to 5 more and one summary of what the first did not record.
    let refused = entries(&body);
    assert!(
        (5..=11).contains(&refused.len()),
        "{} entries: {body}",
        refused.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_pages_back_and_keeps_the_newest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let top = format!("{}\n[limits]\nmax_audit_entries = 10\n", auth_toml());
    let server = start_secured(dir.path(), &repo, "", &top).await;

    for _ in 0..25 {
        let reply = server
            .http
            .post(server.url("/api/v1/repos/cfg/sync"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("force sync");
        assert_eq!(reply.status().as_u16(), 202);
    }
    let (_, first) = audit(&server, ADMIN_TOKEN, "?limit=4").await;
    let first = entries(&first);
    assert_eq!(first.len(), 4);
    let ids: Vec<u64> = first.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let last = ids[3];
    let (_, rest) = audit(&server, ADMIN_TOKEN, &format!("?before={last}&limit=100")).await;
    let rest = entries(&rest);
    assert!(rest.iter().all(|e| e["id"].as_u64() < Some(last)));
    // At most the 10 newest are kept.
    assert_eq!(first.len() + rest.len(), 10);
    // Bad paging input is refused, not guessed at.
    assert_eq!(audit(&server, ADMIN_TOKEN, "?limit=abc").await.0, 400);
}
