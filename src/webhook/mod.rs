//! Webhook intake: `POST /webhooks/{repo}`. Verifies the forge's signature over the raw body before
//! anything is parsed, then only wakes the repo's syncer. The reply never waits for git.
//!
//! Must never: parse an unverified body, trust the payload's file lists or `before`, or log a secret.

pub mod github;
pub mod gitlab;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::api::{AppError, AppState};

/// What a verified webhook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// The forge's test event (GitHub `ping`, ...).
    Ping,
    /// A push; `git_ref` is the full ref name. `deleted` is a branch deletion.
    Push {
        git_ref: String,
        after: String,
        deleted: bool,
    },
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
    #[error("no webhook secret is configured for this repo")]
    NoSecret,
    #[error("malformed payload: {0}")]
    Malformed(String),
}

/// Which forge sent the request, judged by its event header.
fn provider(headers: &HeaderMap) -> Option<&'static str> {
    if headers.contains_key("x-github-event") {
        Some("github")
    } else if headers.contains_key("x-gitlab-event") {
        Some("gitlab")
    } else {
        None
    }
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Verifies and parses one webhook for a repo whose secret is `secret`.
pub fn receive(
    headers: &HeaderMap,
    body: &[u8],
    secret: Option<&crate::config::Secret>,
) -> Result<Delivery, WebhookError> {
    let provider = provider(headers).ok_or_else(|| {
        WebhookError::MissingSignature(
            "no X-GitHub-Event or X-Gitlab-Event header: not a webhook from a known forge".into(),
        )
    })?;
    let secret = secret.ok_or(WebhookError::NoSecret)?;
    match provider {
        "github" => {
            github::verify(headers, body, secret)?;
            Ok(Delivery {
                provider,
                id: header(headers, "x-github-delivery").map(str::to_owned),
                intake: github::parse(headers, body)?,
            })
        }
        _ => {
            gitlab::verify(headers, secret)?;
            Ok(Delivery {
                provider,
                id: header(headers, "idempotency-key")
                    .or_else(|| header(headers, "x-gitlab-event-uuid"))
                    .map(str::to_owned),
                intake: gitlab::parse(headers, body)?,
            })
        }
    }
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

/// `POST /webhooks/{repo}`.
pub async fn handle(
    State(app): State<AppState>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let Some(repo_config) = app.config.repo(&repo) else {
        return Err(AppError::NotFound(format!(
            "no repo named `{repo}` is configured"
        )));
    };
    let limit = app.config.server.max_body_bytes;
    let body = read_body(body, limit).await?;
    let delivery =
        receive(&headers, &body, repo_config.webhook_secret.as_ref()).map_err(|e| match e {
            WebhookError::Malformed(m) => {
                AppError::BadRequest(format!("malformed payload (signature was valid): {m}"))
            }
            other => {
                tracing::warn!(repo = %repo, error = %other, "webhook refused");
                AppError::Unauthorized(other.to_string())
            }
        })?;
    let span = tracing::info_span!("webhook", repo = %repo, provider = delivery.provider, delivery = delivery.id.as_deref().unwrap_or("-"));
    let _enter = span.enter();
    let expected = format!("refs/heads/{}", repo_config.branch);
    let (status, body) = match delivery.intake {
        Intake::Ping => {
            tracing::info!("ping received");
            (
                StatusCode::OK,
                json!({"status": "pong", "delivery": delivery.id}),
            )
        }
        Intake::Ignored(reason) => {
            tracing::info!(%reason, "webhook ignored");
            (
                StatusCode::ACCEPTED,
                json!({"status": "ignored", "reason": reason, "delivery": delivery.id}),
            )
        }
        Intake::Push { git_ref, .. } if git_ref != expected => {
            let reason = if git_ref.starts_with("refs/tags/") {
                format!(
                    "tag push `{git_ref}`: only branch `{}` is synced",
                    repo_config.branch
                )
            } else {
                format!(
                    "push to `{git_ref}`: only branch `{}` is synced",
                    repo_config.branch
                )
            };
            tracing::info!(%reason, "webhook ignored");
            (
                StatusCode::ACCEPTED,
                json!({"status": "ignored", "reason": reason, "delivery": delivery.id}),
            )
        }
        Intake::Push { deleted: true, .. } => {
            let reason = format!(
                "branch `{}` was deleted; topics keep their last version",
                repo_config.branch
            );
            tracing::warn!(%reason, "webhook ignored");
            (
                StatusCode::ACCEPTED,
                json!({"status": "ignored", "reason": reason, "delivery": delivery.id}),
            )
        }
        Intake::Push { after, .. } => {
            app.syncers.trigger(&repo);
            tracing::info!(after = %after, "push accepted, sync queued");
            (
                StatusCode::ACCEPTED,
                json!({"status": "queued", "delivery": delivery.id}),
            )
        }
    };
    Ok((status, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn a_request_without_forge_headers_is_unauthorized() {
        let err =
            receive(&HeaderMap::new(), b"{}", Some(&Secret::new("s"))).expect_err("no headers");
        assert!(matches!(err, WebhookError::MissingSignature(_)));
    }

    #[test]
    fn a_repo_without_secret_refuses_everything() {
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "push".parse().expect("static header"));
        assert_eq!(
            receive(&headers, b"{}", None).expect_err("no secret"),
            WebhookError::NoSecret
        );
    }
}
