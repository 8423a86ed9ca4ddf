//! The HTTP surface, assembled in one `router()`: webhooks, the WebSocket, the JSON query API and
//! the health probes, plus the query API's handlers. It sits on top: it imports the webhook and
//! WebSocket handlers, and nothing below imports it (they share [`crate::app`]).

mod commands;
mod topics;

use std::collections::BTreeMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::app::{bearer, App, AppError, AppState, Caller, Peer};
use crate::config::ApiScope;
use crate::protocol::{topic_matches, AckStatus};
use crate::store::{
    converged, in_rollout, AckRecord, AuditQuery, InstanceRecord, Standing, TopicSummary,
};
use crate::sync::STUCK_AFTER;

mod dashboard;
mod events;
mod metrics;
pub mod routes;

use routes::{Credential, Routes};

/// The whole HTTP surface. Every route names its credential here; the API ones are checked by
/// [`require_read`] / [`require_admin`] before the handler runs. Webhooks carry their own
/// signatures, `/ws` its instance credential, and the probes stay open for load balancers and
/// orchestrators.
fn routes(app: Option<AppState>) -> Routes {
    use axum::http::Method;
    use Credential::{Admin, Instance, Open, Read, WebhookSignature};
    Routes::new(app)
        .add_layered(
            Method::POST,
            "/webhooks/{repo}",
            WebhookSignature,
            crate::webhook::handle,
            // Counted by provider and outcome, whatever answered: the handler or an extractor.
            |endpoint, app| {
                endpoint.route_layer(axum::middleware::from_fn_with_state(
                    app,
                    metrics::count_webhook,
                ))
            },
        )
        .add(
            Method::GET,
            "/ws",
            Instance,
            crate::hub::connection::upgrade,
        )
        .add(Method::GET, "/api/v1/topics", Read, topics)
        .add(Method::GET, "/api/v1/topics/{*topic}", Read, topic)
        .add(Method::GET, "/api/v1/instances", Read, dashboard::instances)
        .add(Method::GET, "/api/v1/instances/{id}", Read, instance)
        .add(Method::GET, "/api/v1/repos", Read, repos)
        .add(Method::GET, "/api/v1/events", Read, events::events)
        .add(Method::GET, "/metrics", Read, metrics::scrape)
        // `{topic}/rollback` and `{topic}/rollout/{promote|halt|abort}` (POST) and `{topic}/pin`
        // (PUT, DELETE): topics may contain `/`.
        .add_layered(
            Method::POST,
            "/api/v1/topics/{*topic}",
            Admin,
            topics::post,
            topic_body_limit,
        )
        .add_layered(
            Method::PUT,
            "/api/v1/topics/{*topic}",
            Admin,
            topics::pin,
            topic_body_limit,
        )
        .add(
            Method::DELETE,
            "/api/v1/topics/{*topic}",
            Admin,
            topics::unpin,
        )
        .add(Method::GET, "/api/v1/commands", Read, commands::list)
        .add(Method::POST, "/api/v1/commands", Admin, commands::create)
        .add(Method::GET, "/api/v1/commands/{id}", Read, commands::show)
        .add(Method::POST, "/api/v1/repos/{name}/sync", Admin, force_sync)
        .add(Method::GET, "/api/v1/audit", Admin, audit)
        .add(Method::GET, "/api/v1/openapi.json", Open, openapi)
        .add(Method::GET, "/", Open, dashboard::index)
        .add(Method::GET, "/assets/{file}", Open, dashboard::asset)
        .add(Method::GET, "/healthz", Open, healthz)
        .add(Method::GET, "/readyz", Open, readyz)
}

/// Rollback and pin bodies are small: refused beyond [`topics::MAX_BODY_BYTES`].
fn topic_body_limit(
    endpoint: axum::routing::MethodRouter<AppState>,
    _app: AppState,
) -> axum::routing::MethodRouter<AppState> {
    endpoint.layer(axum::extract::DefaultBodyLimit::max(topics::MAX_BODY_BYTES))
}

pub fn router(app: AppState) -> Router {
    routes(Some(app.clone()))
        .into_router()
        .fallback(|| async { AppError::NotFound("no such endpoint; see docs/API.md".into()) })
        .with_state(app)
}

/// Every route with its method and credential, as the router serves them (for the OpenAPI check).
pub fn route_table() -> Vec<routes::RouteInfo> {
    routes(None).table()
}

/// The OpenAPI description, as written in `src/api/openapi.json` (checked against the routes).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

async fn require_read(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    require(&app, ApiScope::Read, request, next).await
}

async fn require_admin(
    State(app): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    require(&app, ApiScope::Admin, request, next).await
}

async fn require(
    app: &App,
    need: ApiScope,
    mut request: Request,
    next: Next,
) -> Result<Response, AppError> {
    // API tokens travel in the header only: a query string ends up in proxy logs.
    let name = match app.auth.api(bearer(request.headers(), None), need) {
        Ok(name) => name,
        Err(e) => {
            tracing::info!(path = %request.uri().path(), error = %e, "API request refused");
            let peer = Peer(
                request
                    .extensions()
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0),
            );
            let what = format!("{} {}", request.method(), request.uri().path());
            app.audit_refusal(&peer.actor(), &what, &e.to_string())
                .await;
            return Err(e.into());
        }
    };
    if need == ApiScope::Admin {
        tracing::info!(credential = %name, method = %request.method(), path = %request.uri().path(), "admin request");
    }
    request.extensions_mut().insert(Caller(name.to_string()));
    Ok(next.run(request).await)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    if app.shutdown.is_cancelled() {
        return Err(AppError::Unavailable("shutting down".into()));
    }
    // A store that answers but would lose or refuse writes (its file deleted, the disk full) is
    // as unready as one that is down. Not logged here: probes come often, and the health watch
    // (store::upkeep) logs the change once.
    app.store
        .check()
        .await
        .map_err(|e| AppError::Unavailable(format!("store: {e}")))?;
    let seq = app.store.head_seq().await?;
    // A repo stuck on one error does not stop this replica serving what it has, and every
    // replica would fail alike: it stays in the load balancer (200) and says what is stuck.
    let degraded: Vec<serde_json::Value> = app
        .syncers
        .status()
        .into_iter()
        .filter(|s| s.consecutive_failures >= STUCK_AFTER)
        .map(|s| {
            json!({"repo": s.name, "consecutive_failures": s.consecutive_failures, "error": s.last_error})
        })
        .collect();
    let status = if degraded.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    Ok(Json(
        json!({"status": status, "seq": seq, "node": app.node, "degraded": degraded}),
    ))
}

async fn topics(State(app): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let mut pins = topics::pin_views(&app).await?;
    let list: Vec<serde_json::Value> = app
        .store
        .topics()
        .await?
        .into_iter()
        .map(|t| {
            let mut v = serde_json::to_value(&t).unwrap_or_default();
            v["pinned"] = pins.remove(&t.topic).unwrap_or_default();
            v
        })
        .collect();
    Ok(Json(json!({ "topics": list })))
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<u32>,
}

/// `GET /api/v1/topics/{topic}` and `GET /api/v1/topics/{topic}/history` (topics may contain `/`).
async fn topic(
    State(app): State<AppState>,
    Path(path): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, AppError> {
    let path = path.trim_matches('/');
    if let Some((name, version)) = path.rsplit_once("/versions/") {
        if let Ok(version) = version.parse::<u64>() {
            if app.store.topics().await?.iter().any(|t| t.topic == name) {
                return dashboard::version(&app, name, version).await.map(Json);
            }
        }
    }
    if let Some(name) = path.strip_suffix("/history") {
        if app.store.topics().await?.iter().any(|t| t.topic == name) {
            let history = app
                .store
                .topic_history(name, q.limit.unwrap_or(100).min(1000))
                .await?;
            return Ok(Json(json!({ "topic": name, "history": history })));
        }
    }
    let summary = app
        .store
        .topics()
        .await?
        .into_iter()
        .find(|t| t.topic == path)
        .ok_or_else(|| AppError::NotFound(format!("no topic `{path}`")))?;
    let (_, mut snapshots) = app.store.snapshots(&|t| t == path).await?;
    let files: Vec<serde_json::Value> = snapshots
        .pop()
        .map(|s| s.files)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let bytes =
                crate::protocol::decode_content(&f.content, f.encoding).map_or(0, |b| b.len());
            json!({"path": f.path, "sha": f.sha, "bytes": bytes})
        })
        .collect();
    let rollout = rollout(&app, &summary.topic, summary.version).await?;
    let stages = topics::staging_view(&app, &summary.topic).await?;
    let rejected = app
        .store
        .rejections(&summary.repo)
        .await?
        .into_iter()
        .find(|r| r.topic == summary.topic);
    let pinned = topics::pin_views(&app)
        .await?
        .remove(&summary.topic)
        .unwrap_or_default();
    Ok(Json(json!({
        "topic": summary.topic,
        "repo": summary.repo,
        "version": summary.version,
        "seq": summary.seq,
        "commit": summary.commit,
        "updated_at_ms": summary.updated_at_ms,
        "files": files,
        "rollout": rollout,
        "stages": stages,
        "rejected": rejected,
        "pinned": pinned,
    })))
}

#[derive(Serialize)]
struct Rollout {
    version: u64,
    converged: bool,
    applied: Vec<RolloutEntry>,
    behind: Vec<RolloutEntry>,
    failed: Vec<RolloutEntry>,
}

#[derive(Serialize)]
struct RolloutEntry {
    instance: String,
    connected: bool,
    /// The version the instance last reported, if any.
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Which subscribed instances run `version` of `topic`, which are behind and which failed.
async fn rollout(app: &App, topic: &str, version: u64) -> Result<Rollout, AppError> {
    let instances = app.store.instances().await?;
    let acks: BTreeMap<String, AckRecord> = app
        .store
        .acks()
        .await?
        .into_iter()
        .filter(|a| a.topic == topic)
        .map(|a| (a.instance.clone(), a))
        .collect();
    let mut r = Rollout {
        version,
        converged: false,
        applied: vec![],
        behind: vec![],
        failed: vec![],
    };
    for i in instances
        .iter()
        .filter(|i| in_rollout(&i.subscriptions, topic, acks.contains_key(&i.id)))
    {
        let ack = acks.get(&i.id);
        let entry = RolloutEntry {
            instance: i.id.clone(),
            connected: i.connected,
            version: ack.map(|a| a.version),
            error: ack.and_then(|a| a.error.clone()),
        };
        match Standing::of(ack.map(|a| (a.status, a.version)), version) {
            Standing::Failed => r.failed.push(entry),
            Standing::Applied => r.applied.push(entry),
            Standing::Behind => r.behind.push(entry),
        }
    }
    let n = |list: &Vec<RolloutEntry>| u64::try_from(list.len()).unwrap_or(u64::MAX);
    r.converged = converged(n(&r.applied), n(&r.behind), n(&r.failed));
    Ok(r)
}

#[derive(Serialize)]
struct InstanceView {
    #[serde(flatten)]
    record: InstanceRecord,
    topics: Vec<InstanceTopic>,
}

#[derive(Serialize)]
struct InstanceTopic {
    topic: String,
    current_version: u64,
    applied_version: Option<u64>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    acked_at_ms: Option<i64>,
}

async fn instance_views(app: &App) -> Result<Vec<InstanceView>, AppError> {
    let topics = app.store.topics().await?;
    let acks = app.store.acks().await?;
    Ok(views(app.store.instances().await?, &topics, acks))
}

/// Each instance with its status per subscribed topic.
fn views(
    records: Vec<InstanceRecord>,
    topics: &[TopicSummary],
    acks: Vec<AckRecord>,
) -> Vec<InstanceView> {
    // Indexed once: every instance looks up its ack per topic.
    let acks: std::collections::HashMap<(String, String), AckRecord> = acks
        .into_iter()
        .map(|a| ((a.instance.clone(), a.topic.clone()), a))
        .collect();
    records
        .into_iter()
        .map(|record| {
            let topics = topics
                .iter()
                .filter(|t| {
                    record
                        .subscriptions
                        .iter()
                        .any(|p| topic_matches(p, &t.topic))
                })
                .map(|t| {
                    let ack = acks.get(&(record.id.clone(), t.topic.clone()));
                    let status = match ack {
                        None => "pending",
                        Some(a) if a.status == AckStatus::Failed => "failed",
                        Some(a) if a.version == t.version => "applied",
                        Some(_) => "behind",
                    };
                    InstanceTopic {
                        topic: t.topic.clone(),
                        current_version: t.version,
                        applied_version: ack.map(|a| a.version),
                        status,
                        error: ack.and_then(|a| a.error.clone()),
                        acked_at_ms: ack.map(|a| a.acked_at_ms),
                    }
                })
                .collect();
            InstanceView { record, topics }
        })
        .collect()
}

async fn instance(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<InstanceView>, AppError> {
    instance_views(&app)
        .await?
        .into_iter()
        .find(|v| v.record.id == id)
        .map(Json)
        .ok_or_else(|| AppError::NotFound(format!("no instance `{id}` has ever connected")))
}

async fn repos(State(app): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let mut repos = Vec::new();
    for status in app.syncers.status() {
        let rejections = app.store.rejections(&status.name).await?;
        let mut v = serde_json::to_value(&status).unwrap_or_default();
        v["rejections"] = serde_json::to_value(rejections).unwrap_or_default();
        repos.push(v);
    }
    Ok(Json(json!({ "repos": repos })))
}

async fn force_sync(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    if app.config.repo(&name).is_none() {
        return Err(AppError::NotFound(format!(
            "no repo named `{name}` is configured"
        )));
    }
    app.audit(&caller, "sync", &name, json!({})).await?;
    if app.syncers.trigger(&name) {
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "queued", "repo": name})),
        )
            .into_response())
    } else {
        Err(AppError::NotFound(format!(
            "no repo named `{name}` is configured"
        )))
    }
}

/// Most audit entries one request returns.
const AUDIT_PAGE_MAX: u32 = 1000;

#[derive(Deserialize)]
struct AuditParams {
    limit: Option<u32>,
    before: Option<u64>,
    action: Option<String>,
}

/// `GET /api/v1/audit`: newest first; `before` pages back (the last entry's `id`).
async fn audit(
    State(app): State<AppState>,
    Query(q): Query<AuditParams>,
) -> Result<Json<serde_json::Value>, AppError> {
    let query = AuditQuery {
        before: q.before,
        action: q.action.filter(|a| !a.is_empty()),
        limit: q.limit.unwrap_or(100).clamp(1, AUDIT_PAGE_MAX),
    };
    let entries = app.store.audit(&query).await?;
    Ok(Json(json!({ "entries": entries })))
}
