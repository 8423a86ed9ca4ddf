//! The OpenAPI description (`GET /api/v1/openapi.json`) against the router's actual routes: the
//! same paths and methods, the same credential for each, and every operation, called on a real
//! server without, with too little and with the right credential, answers one of the statuses
//! the description lists for it.

mod util;

use std::collections::BTreeSet;

use confcast::api::routes::Credential;
use serde_json::Value;
use util::*;

/// Whether the router pattern `route` (`{x}` one segment, `{*x}` the rest) serves the
/// description's `path` (`{x}` a parameter; `{topic}` may span segments in the router).
fn serves(route: &str, path: &str) -> bool {
    let route: Vec<&str> = route.trim_matches('/').split('/').collect();
    let path: Vec<&str> = path.trim_matches('/').split('/').collect();
    for (i, part) in route.iter().enumerate() {
        if part.starts_with("{*") {
            return path.len() > i;
        }
        let Some(other) = path.get(i) else {
            return false;
        };
        let is_param = |s: &str| s.starts_with('{') && s.ends_with('}');
        if !(is_param(part) && is_param(other) || part == other) {
            return false;
        }
    }
    route.len() == path.len()
}

/// The route serving `path`: a literal route before a parameter, a parameter before a wildcard.
fn route_for<'a>(
    table: &'a [confcast::api::routes::RouteInfo],
    method: &str,
    path: &str,
) -> Option<&'a confcast::api::routes::RouteInfo> {
    let rank = |route: &str| route.matches("{*").count() * 100 + route.matches('{').count();
    table
        .iter()
        .filter(|r| r.method == method && serves(r.path, path))
        .min_by_key(|r| rank(r.path))
}

fn credential_of(operation: &Value) -> Credential {
    let schemes: Vec<&str> = operation["security"]
        .as_array()
        .expect("every operation states its security")
        .iter()
        .filter_map(|s| s.as_object())
        .flat_map(|s| s.keys().map(String::as_str))
        .collect();
    match schemes.as_slice() {
        [] => Credential::Open,
        ["apiRead"] => Credential::Read,
        ["apiAdmin"] => Credential::Admin,
        ["instance"] => Credential::Instance,
        ["webhookSignature"] => Credential::WebhookSignature,
        other => panic!("unexpected security {other:?}"),
    }
}

fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            out.push((method.to_uppercase(), path.clone(), operation.clone()));
        }
    }
    out
}

/// Every `$ref` in `v` names something in the description.
fn check_refs(spec: &Value, v: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                let pointer = target.strip_prefix('#').expect("local $ref");
                assert!(spec.pointer(pointer).is_some(), "dangling $ref {target}");
            }
            map.values().for_each(|x| check_refs(spec, x));
        }
        Value::Array(items) => items.iter().for_each(|x| check_refs(spec, x)),
        _ => {}
    }
}

#[test]
fn the_description_lists_exactly_the_routes_with_their_credentials() {
    let spec: Value = serde_json::from_str(confcast::api::OPENAPI).expect("valid JSON");
    assert_eq!(spec["openapi"], "3.1.0");
    check_refs(&spec, &spec);
    let table = confcast::api::route_table();
    let mut served = BTreeSet::new();
    for (method, path, operation) in operations(&spec) {
        let route = route_for(&table, &method, &path)
            .unwrap_or_else(|| panic!("{method} {path} is described but not routed"));
        assert_eq!(
            credential_of(&operation),
            route.credential,
            "{method} {path}: the description and the router disagree on the credential"
        );
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path} lists no responses"
        );
        served.insert((route.method.clone(), route.path));
    }
    for route in &table {
        assert!(
            served.contains(&(route.method.clone(), route.path)),
            "{} {} is routed but not described",
            route.method,
            route.path
        );
    }
}

/// A concrete path for a described one: parameters filled with values that exist.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|part| match part {
            "{repo}" | "{name}" => "cfg".to_string(),
            "{topic}" => "payments".to_string(),
            "{version}" => "1".to_string(),
            "{file}" => "app.js".to_string(),
            "{action}" => "promote".to_string(),
            p if p.starts_with('{') => "missing".to_string(),
            p => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_described() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = config_repo(dir.path());
    let server = start_secured(dir.path(), &repo, "", &auth_toml()).await;
    let (status, served) = server.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    let spec: Value = serde_json::from_str(confcast::api::OPENAPI).expect("valid JSON");
    assert_eq!(served, spec, "the server serves the description as written");

    for (method, path, operation) in operations(&spec) {
        let documented: BTreeSet<u16> = operation["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect();
        let url = server.url(&concrete(&path));
        let call = |token: Option<&'static str>| {
            let mut request = server
                .http
                .request(method.parse().expect("method"), url.as_str());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if operation.get("requestBody").is_some() {
                request = request
                    .header("content-type", "application/json")
                    .body("{}");
            }
            request.send()
        };
        let credential = credential_of(&operation);
        let token = match credential {
            Credential::Admin => Some(ADMIN_TOKEN),
            Credential::Read => Some(READ_TOKEN),
            _ => None,
        };
        let reply = call(token).await.expect("request");
        let status = reply.status().as_u16();
        let body = reply.text().await.unwrap_or_default();
        assert!(
            documented.contains(&status),
            "{method} {path}: {status} is not among the described {documented:?}: {body}"
        );
        assert!(
            !body.contains("no such endpoint"),
            "{method} {path} fell through to the fallback"
        );
        if matches!(credential, Credential::Read | Credential::Admin) {
            let status = call(None).await.expect("request").status().as_u16();
            assert_eq!(status, 401, "{method} {path} without a credential");
            assert!(documented.contains(&401), "{method} {path} documents 401");
        }
        if credential == Credential::Admin {
            let status = call(Some(READ_TOKEN))
                .await
                .expect("request")
                .status()
                .as_u16();
            assert_eq!(status, 403, "{method} {path} with a read token");
            assert!(documented.contains(&403), "{method} {path} documents 403");
        }
    }
}

#[test]
fn route_matching_follows_the_router() {
    assert!(serves(
        "/api/v1/topics/{*topic}",
        "/api/v1/topics/{topic}/history"
    ));
    assert!(serves("/api/v1/instances/{id}", "/api/v1/instances/{id}"));
    assert!(!serves("/api/v1/instances/{id}", "/api/v1/instances"));
    assert!(!serves("/api/v1/instances", "/api/v1/instances/{id}"));
    assert!(!serves("/healthz", "/readyz"));
}
