//! Bitbucket Cloud (`X-Event-Key: repo:push`) and Bitbucket Data Center (`repo:refs_changed`,
//! `diagnostics:ping`): `X-Hub-Signature: sha256=<hex HMAC-SHA256 of the raw body>`. Cloud push
//! payloads list no files at all; only the refs they name matter here.

use axum::http::HeaderMap;
use serde::Deserialize;

use super::{header, Intake, RefUpdate, WebhookError};
use crate::config::{HmacAlgorithm, Secret};

pub fn verify(headers: &HeaderMap, body: &[u8], secrets: &[Secret]) -> Result<(), WebhookError> {
    super::verify_hex_header(
        headers,
        "x-hub-signature",
        "sha256=",
        HmacAlgorithm::Sha256,
        secrets,
        body,
    )
}

#[derive(Deserialize)]
struct CloudPush {
    push: CloudChanges,
    #[serde(default)]
    repository: Option<super::github::Repository>,
}

#[derive(Deserialize)]
struct CloudChanges {
    #[serde(default)]
    changes: Vec<CloudChange>,
}

#[derive(Deserialize)]
struct CloudChange {
    #[serde(default)]
    new: Option<CloudRef>,
    #[serde(default)]
    old: Option<CloudRef>,
}

#[derive(Deserialize)]
struct CloudRef {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    #[serde(default)]
    target: Option<CloudTarget>,
}

#[derive(Deserialize)]
struct CloudTarget {
    hash: Option<String>,
}

fn cloud_ref(r: &CloudRef) -> String {
    match r.kind.as_str() {
        "tag" | "annotated_tag" => format!("refs/tags/{}", r.name),
        _ => format!("refs/heads/{}", r.name),
    }
}

#[derive(Deserialize)]
struct ServerPush {
    #[serde(default)]
    changes: Vec<ServerChange>,
    #[serde(default)]
    repository: Option<ServerRepository>,
}

#[derive(Deserialize)]
struct ServerRepository {
    slug: String,
    #[serde(default)]
    project: Option<ServerProject>,
}

#[derive(Deserialize)]
struct ServerProject {
    key: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerChange {
    #[serde(default)]
    ref_id: Option<String>,
    #[serde(default, rename = "ref")]
    reference: Option<ServerRef>,
    #[serde(default)]
    to_hash: Option<String>,
    #[serde(default)]
    from_hash: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct ServerRef {
    id: String,
}

pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Intake, WebhookError> {
    let malformed =
        |e: serde_json::Error| WebhookError::Malformed(format!("Bitbucket payload: {e}"));
    match header(headers, "x-event-key").unwrap_or_default() {
        "diagnostics:ping" => Ok(Intake::Ping),
        "repo:push" => {
            let push: CloudPush = serde_json::from_slice(body).map_err(malformed)?;
            let repository = push.repository.and_then(|r| r.full_name);
            let hash = |r: &Option<CloudRef>| {
                r.as_ref()
                    .and_then(|r| r.target.as_ref())
                    .and_then(|t| t.hash.clone())
            };
            let refs = push
                .push
                .changes
                .iter()
                .filter_map(|c| {
                    let (named, deleted) = match (&c.new, &c.old) {
                        (Some(n), _) => (n, false),
                        (None, Some(o)) => (o, true),
                        (None, None) => return None,
                    };
                    Some(RefUpdate {
                        git_ref: cloud_ref(named),
                        before: hash(&c.old),
                        after: hash(&c.new),
                        deleted,
                        repository: repository.clone(),
                    })
                })
                .collect();
            Ok(Intake::Push(Some(refs)))
        }
        "repo:refs_changed" => {
            let push: ServerPush = serde_json::from_slice(body).map_err(malformed)?;
            let repository = push.repository.map(|r| match r.project {
                Some(p) => format!("{}/{}", p.key, r.slug),
                None => r.slug,
            });
            let refs = push
                .changes
                .into_iter()
                .filter_map(|c| {
                    let git_ref = c.reference.map(|r| r.id).or(c.ref_id)?;
                    Some(RefUpdate {
                        git_ref,
                        before: c.from_hash,
                        after: c.to_hash,
                        deleted: c.kind == "DELETE",
                        repository: repository.clone(),
                    })
                })
                .collect();
            Ok(Intake::Push(Some(refs)))
        }
        other => Ok(Intake::Ignored(format!(
            "Bitbucket event `{other}` is not handled"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::test_headers as headers;

    // Shapes follow Atlassian's documented event payloads (trimmed); there is no file list.
    const CLOUD: &str = r#"{"push":{"changes":[
        {"new":{"type":"branch","name":"main","target":{"type":"commit","hash":"1e65c05c1d5171631d92438a13901ca7dae9618c"}},
         "old":{"type":"branch","name":"main","target":{"hash":"0f3a"}},"created":false,"closed":false,"forced":false,"truncated":false},
        {"new":null,"old":{"type":"branch","name":"old-feature","target":{"hash":"aa"}},"closed":true},
        {"new":{"type":"tag","name":"v1","target":{"hash":"bb"}},"old":null,"created":true}]},
        "repository":{"full_name":"team/config"},"actor":{"display_name":"Ada"}}"#;

    const SERVER: &str = r#"{"eventKey":"repo:refs_changed","date":"2024-01-01T00:00:00+0000",
        "repository":{"slug":"config","project":{"key":"OPS"}},
        "changes":[{"ref":{"id":"refs/heads/main","displayId":"main","type":"BRANCH"},"refId":"refs/heads/main",
          "fromHash":"ab","toHash":"cd","type":"UPDATE"},
          {"ref":{"id":"refs/heads/gone","displayId":"gone","type":"BRANCH"},"refId":"refs/heads/gone",
          "fromHash":"ef","toHash":"0000000000000000000000000000000000000000","type":"DELETE"}]}"#;

    #[test]
    fn cloud_push_lists_each_ref() {
        let h = headers(&[("x-event-key", "repo:push")]);
        let Ok(Intake::Push(Some(refs))) = parse(&h, CLOUD.as_bytes()) else {
            panic!("push expected")
        };
        assert_eq!(refs.len(), 3);
        assert_eq!(refs[0].git_ref, "refs/heads/main");
        assert_eq!(
            refs[0].after.as_deref(),
            Some("1e65c05c1d5171631d92438a13901ca7dae9618c")
        );
        assert!(refs[1].deleted && refs[1].git_ref == "refs/heads/old-feature");
        assert_eq!(refs[2].git_ref, "refs/tags/v1");
    }

    #[test]
    fn data_center_refs_changed_and_ping() {
        let h = headers(&[("x-event-key", "repo:refs_changed")]);
        let Ok(Intake::Push(Some(refs))) = parse(&h, SERVER.as_bytes()) else {
            panic!("push expected")
        };
        assert_eq!(
            (refs[0].git_ref.as_str(), refs[0].deleted),
            ("refs/heads/main", false)
        );
        assert_eq!(
            (refs[1].git_ref.as_str(), refs[1].deleted),
            ("refs/heads/gone", true)
        );
        assert_eq!(
            parse(&headers(&[("x-event-key", "diagnostics:ping")]), b"{}"),
            Ok(Intake::Ping)
        );
    }

    #[test]
    fn signature_is_sha256_hex_with_prefix() {
        let body = SERVER.as_bytes();
        let sig = crate::webhook::github::sign(b"bb-secret", body);
        assert_eq!(
            verify(
                &headers(&[("x-hub-signature", &sig)]),
                body,
                &[Secret::new("bb-secret")]
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                &headers(&[("x-hub-signature", &sig)]),
                b"x",
                &[Secret::new("bb-secret")]
            ),
            Err(WebhookError::BadSignature)
        );
    }
}
