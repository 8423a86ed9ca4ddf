//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`, JSON or form-encoded
//! (`payload=<json>`) bodies, `ping` and `push` events.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{header, Intake, RefUpdate, WebhookError, ZERO_SHA};
use crate::config::{HmacAlgorithm, Secret};

/// Checks `X-Hub-Signature-256` over the raw body, in constant time against every secret. The
/// legacy SHA-1 `X-Hub-Signature` counts only when `legacy_sha1` is configured and no SHA-256
/// signature was sent.
pub fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
    legacy_sha1: bool,
) -> Result<(), WebhookError> {
    if legacy_sha1 && header(headers, "x-hub-signature-256").is_none() {
        let given = header(headers, "x-hub-signature").ok_or_else(|| {
            WebhookError::MissingSignature("X-Hub-Signature-256 header is missing".into())
        })?;
        let sig = given
            .strip_prefix("sha1=")
            .and_then(|h| hex::decode(h).ok())
            .ok_or(WebhookError::BadSignature)?;
        let ok = secrets.iter().any(|s| {
            Hmac::<sha1::Sha1>::new_from_slice(s.expose())
                .map(|mut mac| {
                    mac.update(body);
                    mac.verify_slice(&sig).is_ok()
                })
                .unwrap_or(false)
        });
        return if ok {
            Ok(())
        } else {
            Err(WebhookError::BadSignature)
        };
    }
    super::verify_hex_header(
        headers,
        "x-hub-signature-256",
        "sha256=",
        HmacAlgorithm::Sha256,
        secrets,
        body,
    )
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    before: Option<String>,
    #[serde(default)]
    repository: Option<Repository>,
}

#[derive(Deserialize)]
pub(crate) struct Repository {
    #[serde(default)]
    pub(crate) full_name: Option<String>,
}

/// The JSON document of a verified body: as is, or the `payload` field of a form body.
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Vec<u8>, WebhookError> {
    let content_type = header(headers, "content-type").unwrap_or("application/json");
    if content_type.starts_with("application/x-www-form-urlencoded") {
        form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned().into_bytes())
            .ok_or_else(|| WebhookError::Malformed("form body has no `payload` field".into()))
    } else {
        Ok(body.to_vec())
    }
}

/// Parses a verified GitHub delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Intake, WebhookError> {
    let event = header(headers, "x-github-event").unwrap_or_default();
    match event {
        "ping" => Ok(Intake::Ping),
        "push" => {
            let json = json_body(headers, body)?;
            let push: PushPayload = serde_json::from_slice(&json)
                .map_err(|e| WebhookError::Malformed(format!("GitHub push payload: {e}")))?;
            Ok(Intake::Push(Some(vec![RefUpdate {
                deleted: push.deleted || push.after.as_deref() == Some(ZERO_SHA),
                git_ref: push.git_ref,
                before: push.before,
                after: push.after,
                repository: push.repository.and_then(|r| r.full_name),
            }])))
        }
        other => Ok(Intake::Ignored(format!(
            "GitHub event `{other}` is not handled"
        ))),
    }
}

/// Signs `body` as GitHub would: the value of `X-Hub-Signature-256`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::test_headers as headers;

    #[test]
    fn githubs_documented_test_vector_verifies() {
        let secret = Secret::new("It's a Secret to Everybody");
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret.expose(), b"Hello, World!"), sig);
        let h = headers(&[("x-hub-signature-256", sig)]);
        assert_eq!(
            verify(&h, b"Hello, World!", std::slice::from_ref(&secret), false),
            Ok(())
        );
        assert_eq!(
            verify(&h, b"Hello, World?", std::slice::from_ref(&secret), false),
            Err(WebhookError::BadSignature)
        );
        let wrong = Secret::new("another");
        assert_eq!(
            verify(&h, b"Hello, World!", std::slice::from_ref(&wrong), false),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn legacy_sha1_only_when_enabled() {
        let body = b"payload";
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"s").expect("key");
        mac.update(body);
        let sig = format!("sha1={}", hex::encode(mac.finalize().into_bytes()));
        let h = headers(&[("x-hub-signature", sig.as_str())]);
        let secrets = [Secret::new("s")];
        assert!(matches!(
            verify(&h, body, &secrets, false),
            Err(WebhookError::MissingSignature(_))
        ));
        assert_eq!(verify(&h, body, &secrets, true), Ok(()));
        assert_eq!(
            verify(&h, b"other", &secrets, true),
            Err(WebhookError::BadSignature)
        );
        // a SHA-256 signature present always decides, even with legacy enabled
        let h = headers(&[
            ("x-hub-signature", sig.as_str()),
            ("x-hub-signature-256", "sha256=00"),
        ]);
        assert_eq!(
            verify(&h, body, &secrets, true),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn malformed_signatures_are_refused_not_panicking() {
        let secret = Secret::new("s");
        for sig in ["", "sha256=", "sha256=zz", "sha1=abcd", "757107ea"] {
            let h = headers(&[("x-hub-signature-256", sig)]);
            assert_eq!(
                verify(&h, b"x", std::slice::from_ref(&secret), false),
                Err(WebhookError::BadSignature),
                "{sig}"
            );
        }
        assert!(matches!(
            verify(
                &HeaderMap::new(),
                b"x",
                std::slice::from_ref(&secret),
                false
            ),
            Err(WebhookError::MissingSignature(_))
        ));
    }

    #[test]
    fn real_push_payloads_parse_in_both_content_types() {
        let body = include_bytes!("../../fixtures/webhooks/github-push-branch-created.json");
        let h = headers(&[
            ("x-github-event", "push"),
            ("content-type", "application/json"),
        ]);
        let expected = Intake::Push(Some(vec![RefUpdate {
            git_ref: "refs/heads/master".into(),
            before: Some("0000000000000000000000000000000000000000".into()),
            after: Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246".into()),
            deleted: false,
            repository: Some("Codertocat/Hello-World".into()),
        }]));
        assert_eq!(parse(&h, body).expect("json push parses"), expected);

        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair(
                "payload",
                std::str::from_utf8(body).expect("fixture is utf-8"),
            )
            .finish();
        let h = headers(&[
            ("x-github-event", "push"),
            ("content-type", "application/x-www-form-urlencoded"),
        ]);
        assert_eq!(
            parse(&h, form.as_bytes()).expect("form push parses"),
            expected
        );
    }

    #[test]
    fn tag_ping_and_other_events() {
        let tag = include_bytes!("../../fixtures/webhooks/github-push-tag-created.json");
        let h = headers(&[("x-github-event", "push")]);
        match parse(&h, tag).expect("tag push parses") {
            Intake::Push(Some(refs)) => {
                let r = &refs[0];
                assert_eq!(r.git_ref, "refs/tags/simple-tag");
                assert_eq!(
                    r.before.as_deref(),
                    Some("0000000000000000000000000000000000000000")
                );
                assert_eq!(
                    r.after.as_deref(),
                    Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
                );
                assert_eq!(r.repository.as_deref(), Some("Codertocat/Hello-World"));
            }
            other => panic!("expected a push, got {other:?}"),
        }
        let ping = include_bytes!("../../fixtures/webhooks/github-ping.json");
        assert_eq!(
            parse(&headers(&[("x-github-event", "ping")]), ping),
            Ok(Intake::Ping)
        );
        assert!(matches!(
            parse(&headers(&[("x-github-event", "issues")]), b"{}"),
            Ok(Intake::Ignored(_))
        ));
        assert!(matches!(
            parse(&h, b"{not json"),
            Err(WebhookError::Malformed(_))
        ));
    }
}
