//! Webhook intake: `POST /webhooks/{repo}`. Verifies the forge's signature over the raw body, in
//! constant time, before anything is parsed; remembers delivery ids so a redelivery triggers
//! nothing; then only wakes the repo's syncer. The reply never waits for git.
//!
//! Must never: parse an unverified body, let a request choose the algorithm, trust the payload's
//! file lists or `before`, or log a secret.

pub mod bitbucket;
pub mod generic;
pub mod gitea;
pub mod github;
pub mod gitlab;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hmac::{Hmac, Mac};
use serde_json::json;

use crate::app::{AppError, AppState, Peer};
use crate::config::{HmacAlgorithm, Provider, Secret, WebhookConfig};
use crate::telemetry::WebhookOutcome;

/// One ref a push moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefUpdate {
    /// Full ref name, `refs/heads/main`.
    pub git_ref: String,
    /// Previous and new commit, when the payload says (hints only: git decides).
    pub before: Option<String>,
    pub after: Option<String>,
    pub deleted: bool,
    /// The repository the forge says this is (`owner/name`), for logs.
    pub repository: Option<String>,
}

/// What a verified webhook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// The forge's test event (GitHub `ping`, Bitbucket `diagnostics:ping`).
    Ping,
    /// A push of one or more refs; `None` when the payload does not say which (generic receiver).
    Push(Option<Vec<RefUpdate>>),
    /// A verified event we do not act on, with the reason.
    Ignored(String),
}

/// A verified webhook, ready to act on.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub provider: &'static str,
    pub id: Option<String>,
    pub intake: Intake,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("signature missing: {0}")]
    MissingSignature(String),
    #[error("signature does not match")]
    BadSignature,
    #[error("signature timestamp is outside the allowed window (replay?)")]
    Stale,
    #[error("no webhook secret is configured for this repo")]
    NoSecret,
    #[error("X-Gitlab-Token is a plain-text secret token and repos[..].webhook.provider is \"auto\": set it to \"gitlab\" to accept GitLab secret tokens (or use a GitLab signing token)")]
    PlaintextToken,
    #[error("malformed payload: {0}")]
    Malformed(String),
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Which forge sent the request, judged by its event header. Gitea, Forgejo and Gogs also send
/// GitHub-style headers, so they are recognized first.
pub fn detect(headers: &HeaderMap) -> Option<Provider> {
    let has = |h: &str| headers.contains_key(h);
    if has("x-forgejo-event") {
        Some(Provider::Forgejo)
    } else if has("x-gitea-event") {
        Some(Provider::Gitea)
    } else if has("x-gogs-event") {
        Some(Provider::Gogs)
    } else if has("x-github-event") {
        Some(Provider::Github)
    } else if has("x-gitlab-event") {
        Some(Provider::Gitlab)
    } else {
        header(headers, "x-event-key").map(|key| {
            if key == "repo:push" {
                Provider::BitbucketCloud
            } else {
                Provider::BitbucketServer
            }
        })
    }
}

/// Whether `expected` is the HMAC of `parts` (concatenated) under any of `secrets`; each check
/// is constant-time.
pub(crate) fn hmac_matches(
    algorithm: HmacAlgorithm,
    secrets: &[Secret],
    parts: &[&[u8]],
    expected: &[u8],
) -> bool {
    secrets
        .iter()
        .any(|secret| hmac_key_matches(algorithm, secret.expose(), parts, expected))
}

pub(crate) fn hmac_key_matches(
    algorithm: HmacAlgorithm,
    key: &[u8],
    parts: &[&[u8]],
    expected: &[u8],
) -> bool {
    fn check<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
        match <M as hmac::digest::KeyInit>::new_from_slice(key) {
            Ok(mut mac) => {
                for p in parts {
                    mac.update(p);
                }
                mac.verify_slice(expected).is_ok()
            }
            Err(_) => false,
        }
    }
    match algorithm {
        HmacAlgorithm::Sha256 => check::<Hmac<sha2::Sha256>>(key, parts, expected),
        HmacAlgorithm::Sha512 => check::<Hmac<sha2::Sha512>>(key, parts, expected),
    }
}

/// Checks a hex signature (after an optional prefix) in `name` against the body.
pub(crate) fn verify_hex_header(
    headers: &HeaderMap,
    name: &str,
    prefix: &str,
    algorithm: HmacAlgorithm,
    secrets: &[Secret],
    body: &[u8],
) -> Result<(), WebhookError> {
    let given = header(headers, name)
        .ok_or_else(|| WebhookError::MissingSignature(format!("{name} header is missing")))?;
    let hex_sig = given
        .trim()
        .strip_prefix(prefix)
        .ok_or(WebhookError::BadSignature)?;
    let sig = hex::decode(hex_sig).map_err(|_| WebhookError::BadSignature)?;
    if hmac_matches(algorithm, secrets, &[body], &sig) {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// Verifies and parses one webhook. `now` (unix seconds) bounds signed timestamps.
pub fn receive(
    headers: &HeaderMap,
    body: &[u8],
    config: &WebhookConfig,
    secrets: &[Secret],
    now: i64,
) -> Result<Delivery, WebhookError> {
    let provider = match config.provider {
        Provider::Auto => detect(headers).ok_or_else(|| {
            WebhookError::MissingSignature("no forge event header (X-GitHub-Event, X-Gitlab-Event, X-Gitea-Event, X-Event-Key, ...): not a webhook from a known forge".into())
        })?,
        fixed => fixed,
    };
    if secrets.is_empty() {
        return Err(WebhookError::NoSecret);
    }
    let (name, id, intake) = match provider {
        Provider::Github | Provider::Auto => {
            github::verify(headers, body, secrets, config.github_legacy_sha1)?;
            (
                "github",
                header(headers, "x-github-delivery"),
                github::parse(headers, body)?,
            )
        }
        Provider::Gitlab => {
            gitlab::verify(
                headers,
                body,
                secrets,
                now,
                config.timestamp_tolerance_secs.unwrap_or(300),
                config.provider == Provider::Gitlab,
            )?;
            let id = header(headers, "idempotency-key")
                .or_else(|| header(headers, "x-gitlab-event-uuid"))
                .or_else(|| header(headers, "webhook-id"));
            ("gitlab", id, gitlab::parse(headers, body)?)
        }
        Provider::Gitea | Provider::Forgejo | Provider::Gogs => {
            let flavor = gitea::Flavor::of(provider);
            gitea::verify(flavor, headers, body, secrets)?;
            (
                flavor.name(),
                header(headers, flavor.delivery_header()),
                gitea::parse(flavor, headers, body)?,
            )
        }
        Provider::BitbucketCloud | Provider::BitbucketServer => {
            bitbucket::verify(headers, body, secrets)?;
            let id = header(headers, "x-request-uuid").or_else(|| header(headers, "x-request-id"));
            ("bitbucket", id, bitbucket::parse(headers, body)?)
        }
        Provider::Generic => {
            let g = config.generic.as_ref().ok_or_else(|| {
                WebhookError::Malformed("generic receiver is not configured".into())
            })?;
            generic::verify(g, headers, body, secrets)?;
            let id = header(headers, "x-request-id").or_else(|| header(headers, "idempotency-key"));
            ("generic", id, generic::parse(g, body)?)
        }
    };
    Ok(Delivery {
        provider: name,
        id: id.map(str::to_owned),
        intake,
    })
}

/// Past the limit the rest of an oversized body is still read (and dropped), up to this much, so
/// the client gets its 413 instead of a reset connection.
const DRAIN_AFTER_LIMIT: usize = 8 * 1024 * 1024;

/// Reads at most `limit` bytes of body; more is a 413.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, AppError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| AppError::BadRequest(format!("could not read the request body: {e}")))?;
        seen = seen.saturating_add(chunk.len());
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen > limit.saturating_add(DRAIN_AFTER_LIMIT) {
            break;
        }
    }
    if seen > limit {
        return Err(AppError::TooLarge(limit));
    }
    Ok(bytes::Bytes::from(buf))
}

/// Reads the body within the server's budget of webhook bytes in flight and its read deadline, so
/// stalled or huge uploads cannot pile up before any signature can be checked.
async fn read_bounded_body(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, AppError> {
    let limits = &app.config.limits;
    let max = app.config.server.max_body_bytes;
    let announced = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let need = announced
        .unwrap_or(max)
        .clamp(1, max)
        .min(limits.webhook_bytes_in_flight.max(1));
    let Ok(_budget) = app
        .webhook_bytes
        .clone()
        .try_acquire_many_owned(u32::try_from(need).unwrap_or(u32::MAX))
    else {
        tracing::warn!(
            need,
            "webhook refused: limits.webhook_bytes_in_flight is in use"
        );
        return Err(AppError::Busy(
            "too many webhook bytes in flight (limits.webhook_bytes_in_flight); retry later".into(),
        ));
    };
    let deadline = std::time::Duration::from_secs(limits.body_read_timeout_secs.max(1));
    match tokio::time::timeout(deadline, read_body(body, max)).await {
        Ok(result) => result,
        Err(_) => Err(AppError::Timeout(format!(
            "the request body did not arrive within {} s (limits.body_read_timeout_secs)",
            deadline.as_secs()
        ))),
    }
}

/// `POST /webhooks/{repo}`.
pub async fn handle(
    State(app): State<AppState>,
    Path(repo): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let Some(repo_config) = app.config.repo(&repo) else {
        return Err(AppError::NotFound(format!(
            "no repo named `{repo}` is configured"
        )));
    };
    let body = read_bounded_body(&app, &headers, body).await?;
    let now = crate::store::now_ms() / 1000;
    let delivery = receive(
        &headers,
        &body,
        &repo_config.webhook,
        &repo_config.webhook_secrets,
        now,
    );
    let delivery = match delivery {
        Ok(delivery) => delivery,
        Err(WebhookError::Malformed(m)) => {
            return Err(AppError::BadRequest(format!(
                "malformed payload (signature was valid): {m}"
            )))
        }
        Err(other) => {
            tracing::warn!(repo = %repo, error = %other, "webhook refused");
            app.audit_refusal(
                &peer.actor(),
                &format!("POST /webhooks/{repo}"),
                &other.to_string(),
            )
            .await;
            return Err(AppError::Unauthorized(other.to_string()));
        }
    };
    // The id header is outside most forges' signatures: a captured delivery replayed with huge
    // ids would otherwise grow the store by every byte of them. Refused before it is stored or
    // logged.
    let max_id = app.config.limits.max_delivery_id_bytes;
    if let Some(id) = delivery.id.as_deref().filter(|id| id.len() > max_id) {
        tracing::warn!(repo = %repo, provider = delivery.provider, bytes = id.len(), "webhook refused: delivery id too long");
        return Err(AppError::BadRequest(format!(
            "delivery id is {} bytes, longer than the limit of {max_id} (limits.max_delivery_id_bytes)",
            id.len()
        )));
    }
    let span = tracing::info_span!("webhook", repo = %repo, provider = delivery.provider, delivery = delivery.id.as_deref().unwrap_or("-"));
    if let Intake::Push(Some(refs)) = &delivery.intake {
        let forge_repo = refs
            .iter()
            .find_map(|r| r.repository.as_deref())
            .unwrap_or("-");
        tracing::debug!(parent: &span, forge_repo, refs = refs.len(), "push received");
    }
    let _enter = span.enter();
    // The outcome rides along for the metrics layer (`api::metrics::count_webhook`).
    let reply = |status: StatusCode, outcome: WebhookOutcome, body: serde_json::Value| {
        Ok((status, axum::Extension(outcome), Json(body)).into_response())
    };
    if let Some(id) = &delivery.id {
        if !app
            .store
            .remember_delivery(&repo, delivery.provider, id)
            .await?
        {
            tracing::info!("redelivery of a webhook already received; nothing to do");
            return reply(
                StatusCode::OK,
                WebhookOutcome::Duplicate,
                json!({"status": "duplicate", "delivery": id}),
            );
        }
    }
    let branch = &repo_config.branch;
    let expected = format!("refs/heads/{branch}");
    let ignored = |reason: String| {
        tracing::info!(%reason, "webhook ignored");
        reply(
            StatusCode::ACCEPTED,
            WebhookOutcome::Ignored,
            json!({"status": "ignored", "reason": reason, "delivery": delivery.id}),
        )
    };
    match delivery.intake {
        Intake::Ping => {
            tracing::info!("ping received");
            reply(
                StatusCode::OK,
                WebhookOutcome::Ping,
                json!({"status": "pong", "delivery": delivery.id}),
            )
        }
        Intake::Ignored(reason) => ignored(reason),
        Intake::Push(refs) => {
            let ours = refs
                .as_ref()
                .map(|r| r.iter().find(|u| u.git_ref == expected));
            match ours {
                Some(None) => {
                    let refs: Vec<&str> =
                        refs.iter().flatten().map(|u| u.git_ref.as_str()).collect();
                    let what = if refs.iter().all(|r| r.starts_with("refs/tags/")) {
                        "tag push"
                    } else {
                        "push to"
                    };
                    ignored(format!(
                        "{what} `{}`: only branch `{branch}` is synced",
                        refs.join("`, `")
                    ))
                }
                Some(Some(u)) if u.deleted => ignored(format!(
                    "branch `{branch}` was deleted; topics keep their last version"
                )),
                _ => {
                    app.syncers.trigger(&repo);
                    tracing::info!("push accepted, sync queued");
                    reply(
                        StatusCode::ACCEPTED,
                        WebhookOutcome::Queued,
                        json!({"status": "queued", "delivery": delivery.id}),
                    )
                }
            }
        }
    }
}

/// Builds a header map from pairs (tests of every forge module use it).
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().expect("valid header value"));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::test_headers as headers;

    #[test]
    fn a_request_without_forge_headers_is_unauthorized() {
        let err = receive(
            &HeaderMap::new(),
            b"{}",
            &WebhookConfig::default(),
            &[Secret::new("s")],
            0,
        )
        .expect_err("no headers");
        assert!(matches!(err, WebhookError::MissingSignature(_)));
    }

    #[test]
    fn a_repo_without_secret_refuses_everything() {
        let h = headers(&[("x-github-event", "push")]);
        assert_eq!(
            receive(&h, b"{}", &WebhookConfig::default(), &[], 0).expect_err("no secret"),
            WebhookError::NoSecret
        );
    }

    #[test]
    fn gitea_family_is_detected_before_github() {
        assert_eq!(
            detect(&headers(&[
                ("x-gitea-event", "push"),
                ("x-github-event", "push")
            ])),
            Some(Provider::Gitea)
        );
        assert_eq!(
            detect(&headers(&[
                ("x-forgejo-event", "push"),
                ("x-gitea-event", "push")
            ])),
            Some(Provider::Forgejo)
        );
        assert_eq!(
            detect(&headers(&[("x-event-key", "repo:push")])),
            Some(Provider::BitbucketCloud)
        );
        assert_eq!(
            detect(&headers(&[("x-event-key", "repo:refs_changed")])),
            Some(Provider::BitbucketServer)
        );
    }

    #[test]
    fn rotation_accepts_every_configured_secret() {
        let body = br#"{"ref":"refs/heads/main","after":"abc"}"#;
        let secrets = [Secret::new("new"), Secret::new("old")];
        for key in ["new", "old"] {
            let h = headers(&[
                ("x-github-event", "push"),
                ("x-hub-signature-256", &github::sign(key.as_bytes(), body)),
            ]);
            assert!(
                receive(&h, body, &WebhookConfig::default(), &secrets, 0).is_ok(),
                "{key}"
            );
        }
        let h = headers(&[
            ("x-github-event", "push"),
            ("x-hub-signature-256", &github::sign(b"retired", body)),
        ]);
        assert_eq!(
            receive(&h, body, &WebhookConfig::default(), &secrets, 0).expect_err("retired"),
            WebhookError::BadSignature
        );
    }

    #[test]
    fn auto_refuses_a_plain_gitlab_token_that_a_named_gitlab_accepts() {
        let body = br#"{"ref":"refs/heads/main","after":"abc"}"#;
        let h = headers(&[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "s")]);
        let secrets = [Secret::new("s")];
        let refused = receive(&h, body, &WebhookConfig::default(), &secrets, 0)
            .expect_err("auto never compares a secret in plain text");
        assert_eq!(refused, WebhookError::PlaintextToken);
        assert!(refused.to_string().contains("repos[..].webhook.provider"));
        let gitlab = WebhookConfig {
            provider: Provider::Gitlab,
            ..Default::default()
        };
        assert!(receive(&h, body, &gitlab, &secrets, 0).is_ok());
    }

    #[test]
    fn a_fixed_provider_ignores_what_the_request_claims() {
        // Configured for GitLab: a GitHub-signed request is not accepted.
        let body = b"{}";
        let cfg = WebhookConfig {
            provider: Provider::Gitlab,
            ..Default::default()
        };
        let h = headers(&[
            ("x-github-event", "push"),
            ("x-hub-signature-256", &github::sign(b"s", body)),
        ]);
        assert!(receive(&h, body, &cfg, &[Secret::new("s")], 0).is_err());
    }
}
