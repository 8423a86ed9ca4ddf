//! GitLab: the secret token comes back in `X-Gitlab-Token` and is compared in constant time;
//! `Push Hook` and `Tag Push Hook` events.

use axum::http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{header, Intake, WebhookError};
use crate::config::Secret;

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

pub fn verify(headers: &HeaderMap, secret: &Secret) -> Result<(), WebhookError> {
    let given = headers
        .get("x-gitlab-token")
        .ok_or_else(|| WebhookError::MissingSignature("X-Gitlab-Token header is missing".into()))?;
    if bool::from(given.as_bytes().ct_eq(secret.expose())) {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    after: Option<String>,
}

pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Intake, WebhookError> {
    let event = header(headers, "x-gitlab-event").unwrap_or_default();
    match event {
        "Push Hook" | "Tag Push Hook" => {
            let push: PushPayload = serde_json::from_slice(body)
                .map_err(|e| WebhookError::Malformed(format!("GitLab push payload: {e}")))?;
            let after = push.after.unwrap_or_default();
            Ok(Intake::Push {
                deleted: after == ZERO_SHA,
                git_ref: push.git_ref,
                after,
            })
        }
        other => Ok(Intake::Ignored(format!(
            "GitLab event `{other}` is not handled"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match_exactly() {
        let secret = Secret::new("s3cret");
        let mut h = HeaderMap::new();
        h.insert("x-gitlab-token", "s3cret".parse().expect("header"));
        assert_eq!(verify(&h, &secret), Ok(()));
        h.insert("x-gitlab-token", "s3cre".parse().expect("header"));
        assert_eq!(verify(&h, &secret), Err(WebhookError::BadSignature));
        h.insert("x-gitlab-token", "s3cretx".parse().expect("header"));
        assert_eq!(verify(&h, &secret), Err(WebhookError::BadSignature));
    }

    #[test]
    fn real_first_push_payload_parses() {
        let body =
            include_bytes!("../../fixtures/webhooks/gitlab-push-first-to-empty-project.json");
        let mut h = HeaderMap::new();
        h.insert("x-gitlab-event", "Push Hook".parse().expect("header"));
        assert_eq!(
            parse(&h, body),
            Ok(Intake::Push {
                git_ref: "refs/heads/master".into(),
                after: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
                deleted: false
            })
        );
    }
}
