//! A generic HMAC receiver for forges not listed: the header, algorithm (sha256 or sha512),
//! encoding (hex or base64) and prefix are all fixed by configuration.

use axum::http::HeaderMap;
use base64::Engine as _;

use super::{header, Intake, RefUpdate, WebhookError};
use crate::config::{GenericWebhook, Secret, SignatureEncoding};

pub fn verify(
    config: &GenericWebhook,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[Secret],
) -> Result<(), WebhookError> {
    let name = config.header.to_ascii_lowercase();
    let given = header(headers, &name).ok_or_else(|| {
        WebhookError::MissingSignature(format!("{} header is missing", config.header))
    })?;
    let encoded = given
        .trim()
        .strip_prefix(config.prefix.as_str())
        .ok_or(WebhookError::BadSignature)?;
    let sig = match config.encoding {
        SignatureEncoding::Hex => hex::decode(encoded).map_err(|_| WebhookError::BadSignature)?,
        SignatureEncoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| WebhookError::BadSignature)?,
    };
    if super::hmac_matches(config.algorithm, secrets, &[body], &sig) {
        Ok(())
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// The pushed ref, read at `ref_pointer` (default `/ref`); without one, every verified request syncs.
pub fn parse(config: &GenericWebhook, body: &[u8]) -> Result<Intake, WebhookError> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if body.iter().all(u8::is_ascii_whitespace) => return Ok(Intake::Push(None)),
        Err(e) => return Err(WebhookError::Malformed(format!("body is not JSON: {e}"))),
    };
    let pointer = config.ref_pointer.as_deref().unwrap_or("/ref");
    Ok(match value.pointer(pointer).and_then(|v| v.as_str()) {
        Some(git_ref) => Intake::Push(Some(vec![RefUpdate {
            git_ref: git_ref.to_string(),
            before: None,
            after: None,
            deleted: false,
            repository: None,
        }])),
        None => Intake::Push(None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HmacAlgorithm;
    use hmac::{Hmac, Mac};

    #[test]
    fn sha512_base64_with_prefix() {
        let cfg = GenericWebhook {
            header: "X-Signature".into(),
            algorithm: HmacAlgorithm::Sha512,
            encoding: SignatureEncoding::Base64,
            prefix: "sha512=".into(),
            ref_pointer: Some("/push/ref".into()),
        };
        let body = br#"{"push":{"ref":"refs/heads/main"}}"#;
        let mut mac = Hmac::<sha2::Sha512>::new_from_slice(b"g").expect("key");
        mac.update(body);
        let sig = format!(
            "sha512={}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        let mut h = HeaderMap::new();
        h.insert("x-signature", sig.parse().expect("header"));
        assert_eq!(verify(&cfg, &h, body, &[Secret::new("g")]), Ok(()));
        assert_eq!(
            verify(&cfg, &h, b"{}", &[Secret::new("g")]),
            Err(WebhookError::BadSignature)
        );
        // the same bytes as a sha256 signature are not accepted: the algorithm is configured
        let sha256_cfg = GenericWebhook {
            algorithm: HmacAlgorithm::Sha256,
            ..cfg.clone()
        };
        assert_eq!(
            verify(&sha256_cfg, &h, body, &[Secret::new("g")]),
            Err(WebhookError::BadSignature)
        );
        match parse(&cfg, body).expect("parses") {
            Intake::Push(Some(refs)) => assert_eq!(refs[0].git_ref, "refs/heads/main"),
            other => panic!("{other:?}"),
        }
    }
}
