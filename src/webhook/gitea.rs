//! Gitea, Forgejo and Gogs: a hex HMAC-SHA256 of the raw body, without prefix, in
//! `X-Gitea-Signature`, `X-Forgejo-Signature` or `X-Gogs-Signature`; GitHub-like push payloads.

use axum::http::HeaderMap;
use serde::Deserialize;

use super::{header, Intake, RefUpdate, WebhookError, ZERO_SHA};
use crate::config::{HmacAlgorithm, Provider, Secret};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Gitea,
    Forgejo,
    Gogs,
}

impl Flavor {
    pub fn of(provider: Provider) -> Flavor {
        match provider {
            Provider::Forgejo => Flavor::Forgejo,
            Provider::Gogs => Flavor::Gogs,
            _ => Flavor::Gitea,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Gitea => "gitea",
            Flavor::Forgejo => "forgejo",
            Flavor::Gogs => "gogs",
        }
    }

    fn signature_header(self) -> &'static str {
        match self {
            Flavor::Gitea => "x-gitea-signature",
            Flavor::Forgejo => "x-forgejo-signature",
            Flavor::Gogs => "x-gogs-signature",
        }
    }

    fn event_header(self) -> &'static str {
        match self {
            Flavor::Gitea => "x-gitea-event",
            Flavor::Forgejo => "x-forgejo-event",
            Flavor::Gogs => "x-gogs-event",
        }
    }

    pub fn delivery_header(self) -> &'static str {
        match self {
            Flavor::Gitea => "x-gitea-delivery",
            Flavor::Forgejo => "x-forgejo-delivery",
            Flavor::Gogs => "x-gogs-delivery",
        }
    }
}

pub fn verify(
    flavor: Flavor,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
) -> Result<(), WebhookError> {
    super::verify_hex_header(
        headers,
        flavor.signature_header(),
        "",
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
    before: Option<String>,
    #[serde(default)]
    repository: Option<super::github::Repository>,
}

pub fn parse(flavor: Flavor, headers: &HeaderMap, body: &[u8]) -> Result<Intake, WebhookError> {
    let event = header(headers, flavor.event_header()).unwrap_or_default();
    match event {
        "push" => {
            let push: PushPayload = serde_json::from_slice(body).map_err(|e| {
                WebhookError::Malformed(format!("{} push payload: {e}", flavor.name()))
            })?;
            Ok(Intake::Push(Some(vec![RefUpdate {
                deleted: push.after.as_deref() == Some(ZERO_SHA),
                git_ref: push.git_ref,
                before: push.before,
                after: push.after,
                repository: push.repository.and_then(|r| r.full_name),
            }])))
        }
        // Branch deletion arrives as its own event.
        "delete" => Ok(Intake::Ignored(format!(
            "{} delete event: the next sync sees what git says",
            flavor.name()
        ))),
        other => Ok(Intake::Ignored(format!(
            "{} event `{other}` is not handled",
            flavor.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    fn hex_hmac(key: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn each_flavor_checks_its_own_header() {
        let body = br#"{"ref":"refs/heads/main","before":"a","after":"b"}"#;
        let secrets = [Secret::new("k")];
        for (flavor, sig_header, event_header) in [
            (Flavor::Gitea, "x-gitea-signature", "x-gitea-event"),
            (Flavor::Forgejo, "x-forgejo-signature", "x-forgejo-event"),
            (Flavor::Gogs, "x-gogs-signature", "x-gogs-event"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(sig_header, hex_hmac(b"k", body).parse().expect("header"));
            h.insert(event_header, "push".parse().expect("header"));
            assert_eq!(verify(flavor, &h, body, &secrets), Ok(()), "{flavor:?}");
            assert_eq!(
                verify(flavor, &h, b"tampered", &secrets),
                Err(WebhookError::BadSignature)
            );
            match parse(flavor, &h, body).expect("parses") {
                Intake::Push(Some(refs)) => assert_eq!(refs[0].git_ref, "refs/heads/main"),
                other => panic!("{other:?}"),
            }
        }
    }
}
