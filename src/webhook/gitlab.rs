//! GitLab: either the secret token in `X-Gitlab-Token` (compared in constant time), or the signing
//! token of newer GitLab versions, which follows Standard Webhooks: `webhook-signature: v1,<base64>`
//! is HMAC-SHA256, keyed with the base64-decoded part of the `whsec_` secret, over
//! `{webhook-id}.{webhook-timestamp}.{body}`, and the timestamp must be recent (replays).
//!
//! The secret token is the secret itself, sent in clear: it is accepted only when the repo names
//! GitLab as its forge. Under `auto` the same secrets are HMAC keys for the other forges, and a
//! key must never also work as a password anyone who sees one request can replay.

use axum::http::HeaderMap;
use base64::Engine as _;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{header, Intake, RefUpdate, WebhookError, ZERO_SHA};
use crate::config::{HmacAlgorithm, Secret};

/// Verifies a GitLab request; the plain-text `X-Gitlab-Token` counts only with `accept_token`
/// (`provider = "gitlab"`).
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
    now: i64,
    tolerance_secs: u64,
    accept_token: bool,
) -> Result<(), WebhookError> {
    if let Some(signatures) = header(headers, "webhook-signature") {
        return verify_standard(headers, signatures, body, secrets, now, tolerance_secs);
    }
    if !accept_token {
        return Err(if headers.contains_key("x-gitlab-token") {
            WebhookError::PlaintextToken
        } else {
            WebhookError::MissingSignature(
                "webhook-signature header is missing (a GitLab secret token needs repos[..].webhook.provider = \"gitlab\")".into(),
            )
        });
    }
    let given = headers.get("x-gitlab-token").ok_or_else(|| {
        WebhookError::MissingSignature(
            "X-Gitlab-Token (or webhook-signature) header is missing".into(),
        )
    })?;
    if secrets
        .iter()
        .any(|s| bool::from(given.as_bytes().ct_eq(s.expose())))
    {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`.
fn signing_key(secret: &Secret) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(secret.expose()).ok()?;
    base64::engine::general_purpose::STANDARD
        .decode(text.strip_prefix("whsec_").unwrap_or(text))
        .ok()
}

fn verify_standard(
    headers: &HeaderMap,
    signatures: &str,
    body: &[u8],
    secrets: &[Secret],
    now: i64,
    tolerance_secs: u64,
) -> Result<(), WebhookError> {
    let id = header(headers, "webhook-id")
        .ok_or_else(|| WebhookError::MissingSignature("webhook-id header is missing".into()))?;
    let timestamp = header(headers, "webhook-timestamp").ok_or_else(|| {
        WebhookError::MissingSignature("webhook-timestamp header is missing".into())
    })?;
    let ts: i64 = timestamp.parse().map_err(|_| WebhookError::BadSignature)?;
    if now.abs_diff(ts) > tolerance_secs {
        return Err(WebhookError::Stale);
    }
    let keys: Vec<Vec<u8>> = secrets.iter().filter_map(signing_key).collect();
    // The header may carry several space-separated signatures (key rotation on the sender side).
    for candidate in signatures.split_whitespace() {
        let Some(b64) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            continue;
        };
        let parts: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        if keys
            .iter()
            .any(|k| super::hmac_key_matches(HmacAlgorithm::Sha256, k, &parts, &sig))
        {
            return Ok(());
        }
    }
    Err(WebhookError::BadSignature)
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    before: Option<String>,
    #[serde(default)]
    project: Option<Project>,
    #[serde(default)]
    repository: Option<NamedRepository>,
}

#[derive(Deserialize)]
struct Project {
    #[serde(default)]
    path_with_namespace: Option<String>,
}

#[derive(Deserialize)]
struct NamedRepository {
    #[serde(default)]
    name: Option<String>,
}

pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Intake, WebhookError> {
    let event = header(headers, "x-gitlab-event").unwrap_or_default();
    match event {
        "Push Hook" | "Tag Push Hook" => {
            let push: PushPayload = serde_json::from_slice(body)
                .map_err(|e| WebhookError::Malformed(format!("GitLab push payload: {e}")))?;
            Ok(Intake::Push(Some(vec![RefUpdate {
                deleted: push.after.as_deref() == Some(ZERO_SHA),
                git_ref: push.git_ref,
                before: push.before,
                after: push.after,
                repository: push
                    .project
                    .and_then(|p| p.path_with_namespace)
                    .or(push.repository.and_then(|r| r.name)),
            }])))
        }
        other => Ok(Intake::Ignored(format!(
            "GitLab event `{other}` is not handled"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::test_headers as headers;

    #[test]
    fn token_must_match_exactly_and_rotation_accepts_both() {
        let secrets = [Secret::new("s3cret"), Secret::new("previous")];
        for (token, ok) in [
            ("s3cret", true),
            ("previous", true),
            ("s3cre", false),
            ("s3cretx", false),
        ] {
            let h = headers(&[("x-gitlab-token", token)]);
            assert_eq!(
                verify(&h, b"{}", &secrets, 0, 300, true).is_ok(),
                ok,
                "{token}"
            );
        }
    }

    #[test]
    fn without_accept_token_the_plain_token_is_refused_even_when_right() {
        let secrets = [Secret::new("s3cret")];
        let h = headers(&[("x-gitlab-token", "s3cret")]);
        assert_eq!(
            verify(&h, b"{}", &secrets, 0, 300, false),
            Err(WebhookError::PlaintextToken)
        );
        assert!(matches!(
            verify(&headers(&[]), b"{}", &secrets, 0, 300, false),
            Err(WebhookError::MissingSignature(_))
        ));
    }

    #[test]
    fn standard_webhooks_published_vector_verifies() {
        let secrets = [Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
        let body = br#"{"test": 2432232314}"#;
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ]);
        assert_eq!(verify(&h, body, &secrets, 1614265330, 300, false), Ok(()));
        assert_eq!(
            verify(
                &h,
                br#"{"test": 2432232315}"#,
                &secrets,
                1614265330,
                300,
                false
            ),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify(&h, body, &secrets, 1614265330 + 301, 300, false),
            Err(WebhookError::Stale),
            "replayed too late"
        );
        assert_eq!(
            verify(&h, body, &secrets, 1614265330 - 301, 300, false),
            Err(WebhookError::Stale)
        );
        let other = [Secret::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")];
        assert_eq!(
            verify(&h, body, &other, 1614265330, 300, false),
            Err(WebhookError::BadSignature)
        );
        // several signatures in one header: any valid one counts
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            (
                "webhook-signature",
                "v1,AAAA v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ]);
        assert_eq!(verify(&h, body, &secrets, 1614265330, 300, false), Ok(()));
    }

    #[test]
    fn real_first_push_payload_parses() {
        let body =
            include_bytes!("../../fixtures/webhooks/gitlab-push-first-to-empty-project.json");
        let h = headers(&[("x-gitlab-event", "Push Hook")]);
        assert_eq!(
            parse(&h, body),
            Ok(Intake::Push(Some(vec![RefUpdate {
                git_ref: "refs/heads/master".into(),
                before: Some("0000000000000000000000000000000000000000".into()),
                after: Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into()),
                deleted: false,
                repository: Some("Diaspora".into()),
            }])))
        );
    }
}
