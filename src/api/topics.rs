//! The topic writes: rollback to an earlier version, pin and unpin (API token `admin`), and the
//! pin as the topic views show it.
//!
//! Each write is recorded in the audit log before it is done, and runs under its repo's lock
//! (`Store::lock_repo`), the one a sync takes: a rollback's change is computed from the stored
//! files and published with no sync in between, on every replica.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use crate::app::{App, AppError, AppState, Caller};
use crate::store::rewind::{self, RewindError};
use crate::store::{Pin, RepoLock, Rollback, SyncOutcome, TopicChange, TopicSummary};

/// How long a write waits for its repo's lock (a sync holding it: a slow fetch) before 503.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest request body of a topic write.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinBody {
    reason: String,
    version: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    reason: String,
}

/// `POST /api/v1/topics/{topic}/rollback` and `POST /api/v1/topics/{topic}/rollout/{action}`.
pub async fn post(
    state: State<AppState>,
    caller: Extension<Caller>,
    Path(path): Path<String>,
    body: Bytes,
) -> Result<Response, AppError> {
    for action in ["promote", "halt", "abort"] {
        if let Ok(name) = suffixed(&path, &format!("/rollout/{action}")) {
            let name = name.to_string();
            return rollout(state, caller, name, action, body).await;
        }
    }
    rollback(state, caller, Path(path), body).await
}

/// An operator's override of a progressive rollout: `promote` widens it to its next stage now
/// (also resuming a halted one), `halt` stops it widening, `abort` gives the stages reached the
/// previous content back as a new version.
async fn rollout(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    name: String,
    action: &str,
    body: Bytes,
) -> Result<Response, AppError> {
    use crate::hub::stages::{self, StageError};
    let body: RolloutBody = parse(&body)?;
    let reason = reason(&app, &body.reason)?;
    let topic = existing(&app, &name).await?;
    let refused = |e: StageError| match e {
        StageError::NoRollout(_) | StageError::Moved(_) | StageError::LastStage { .. } => {
            AppError::Conflict(e.to_string())
        }
        StageError::Store(e) => AppError::Store(e),
    };
    let staging = stages::active(app.store.as_ref(), &topic.topic)
        .await
        .map_err(refused)?;
    if action != "halt" {
        // A pin freezes the topic: nothing is widened or published until it is unpinned. A halt
        // changes nothing that instances see, so it stays allowed.
        refuse_pinned(&app, &topic.topic).await?;
    }
    app.audit(
        &caller,
        &format!("rollout_{action}"),
        &topic.topic,
        json!({"reason": reason, "version": staging.version, "stage": staging.stage + 1}),
    )
    .await?;
    let why = format!("{action} by {caller}: {reason}");
    match action {
        "promote" => {
            let instances = app.store.instances().await?;
            stages::promote(app.store.as_ref(), &app.hub, &staging, &instances, why)
                .await
                .map_err(refused)?;
        }
        "halt" => {
            let step = crate::store::StageStep::Halt { reason: why };
            if !(app.store)
                .stage_step(&staging.topic, staging.version, staging.stage, &step)
                .await?
            {
                return Err(refused(StageError::Moved(staging.topic)));
            }
        }
        _ => {
            let _lock = lock(&app, &topic.repo).await?;
            stages::abort(app.store.as_ref(), &app.hub, &topic.topic, &caller, &why)
                .await
                .map_err(refused)?;
        }
    }
    app.metrics.rollout_decision(match action {
        "promote" => "promote",
        "halt" => "halt",
        _ => "abort",
    });
    tracing::info!(topic = %topic.topic, action, by = %caller, "rollout override");
    app.hub
        .refresh_rollouts(app.store.as_ref(), &app.metrics)
        .await;
    app.hub.rollouts.stir();
    let view = staging_view(&app, &topic.topic).await?;
    Ok(Json(json!({"topic": topic.topic, "stages": view})).into_response())
}

/// The topic's progressive rollout (active, or its last) as the API shows it, with the counts of
/// its current stage; `null` when it never had one.
pub async fn staging_view(app: &App, topic: &str) -> Result<serde_json::Value, AppError> {
    let Some(staging) = app
        .store
        .stagings()
        .await?
        .into_iter()
        .find(|s| s.topic == topic)
    else {
        return Ok(serde_json::Value::Null);
    };
    let instances = app.store.instances().await?;
    let acks = app.store.acks().await?;
    let tally = crate::hub::stages::tally_acks(&staging, &instances, &acks);
    let failed: Vec<serde_json::Value> = tally
        .failed
        .iter()
        .map(|(instance, error)| json!({"instance": instance, "error": error}))
        .collect();
    Ok(json!({
        "policy": staging.policy.name,
        "state": staging.state,
        "version": staging.version,
        "base_version": staging.base_version,
        "stage": staging.stage + 1,
        "stages": staging.policy.stages.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "members": tally.members,
        "applied": tally.applied,
        "failed": failed,
        "reason": staging.reason,
        "started_at_ms": staging.started_at_ms,
        "stage_started_at_ms": staging.stage_started_at_ms,
        "updated_at_ms": staging.updated_at_ms,
        "bake_secs": staging.policy.bake_secs,
    }))
}

/// `POST /api/v1/topics/{topic}/rollback`.
pub async fn rollback(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(path): Path<String>,
    body: Bytes,
) -> Result<Response, AppError> {
    let name = suffixed(&path, "/rollback")?;
    let body: RollbackBody = parse(&body)?;
    let reason = reason(&app, &body.reason)?;
    let topic = existing(&app, name).await?;
    refuse_pinned(&app, &topic.topic).await?;
    check_version(&topic, body.version)?;
    app.audit(
        &caller,
        "rollback",
        &topic.topic,
        json!({"to": body.version, "reason": reason}),
    )
    .await?;
    let _lock = lock(&app, &topic.repo).await?;
    // A pin may have come in while this request waited for the lock.
    refuse_pinned(&app, &topic.topic).await?;
    let result = roll_back(&app, &topic, body.version, &caller, reason).await?;
    Ok(Json(result).into_response())
}

/// `PUT /api/v1/topics/{topic}/pin`.
pub async fn pin(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(path): Path<String>,
    body: Bytes,
) -> Result<Response, AppError> {
    let name = suffixed(&path, "/pin")?;
    let body: PinBody = parse(&body)?;
    let reason = reason(&app, &body.reason)?;
    let topic = existing(&app, name).await?;
    refuse_pinned(&app, &topic.topic).await?;
    if let Some(v) = body.version {
        check_version(&topic, v)?;
    }
    app.audit(
        &caller,
        "pin",
        &topic.topic,
        json!({"reason": reason, "version": body.version}),
    )
    .await?;
    let _lock = lock(&app, &topic.repo).await?;
    refuse_pinned(&app, &topic.topic).await?;
    let rollback = match body.version {
        Some(v) => Some(roll_back(&app, &topic, v, &caller, reason).await?),
        None => None,
    };
    // The version as it is now, under the lock: no sync can move it before the pin is in.
    let version = existing(&app, &topic.topic).await?.version;
    let pin = Pin {
        topic: topic.topic.clone(),
        repo: topic.repo.clone(),
        version,
        by: caller.clone(),
        reason: reason.to_string(),
        at_ms: crate::store::now_ms(),
        held: Vec::new(),
        held_total: 0,
    };
    if !app.store.pin(&pin).await? {
        return Err(AppError::Conflict(format!(
            "topic `{}` is already pinned",
            topic.topic
        )));
    }
    tracing::info!(topic = %pin.topic, version, by = %caller, "topic pinned");
    app.hub.rollouts.stir();
    Ok(Json(json!({
        "status": "pinned",
        "topic": pin.topic,
        "version": version,
        "pinned": pin_view(&pin),
        "rollback": rollback,
    }))
    .into_response())
}

/// `DELETE /api/v1/topics/{topic}/pin`.
pub async fn unpin(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(path): Path<String>,
) -> Result<Response, AppError> {
    let name = suffixed(&path, "/pin")?;
    let topic = existing(&app, name).await?;
    let not_pinned = || AppError::NotFound(format!("topic `{}` is not pinned", topic.topic));
    if !app
        .store
        .pins()
        .await?
        .iter()
        .any(|p| p.topic == topic.topic)
    {
        return Err(not_pinned());
    }
    app.audit(&caller, "unpin", &topic.topic, json!({})).await?;
    let pin = {
        let _lock = lock(&app, &topic.repo).await?;
        app.store
            .unpin(&topic.topic)
            .await?
            .ok_or_else(not_pinned)?
    };
    // The repo's next sync publishes the topic's git state if it differs from what is stored.
    let queued = app.syncers.trigger(&topic.repo);
    tracing::info!(topic = %topic.topic, by = %caller, held = pin.held_total, "topic unpinned");
    app.hub.rollouts.stir();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "status": "unpinned",
            "topic": topic.topic,
            "version": topic.version,
            "held_total": pin.held_total,
            "sync": if queued { "queued" } else { "repo not configured here" },
        })),
    )
        .into_response())
}

/// Publishes `topic`'s files at `version` as its next version (the caller holds the repo lock).
async fn roll_back(
    app: &App,
    topic: &TopicSummary,
    version: u64,
    caller: &str,
    reason: &str,
) -> Result<serde_json::Value, AppError> {
    let rewound = rewind::files_at(app.store.as_ref(), &topic.topic, version)
        .await
        .map_err(|e| match e {
            RewindError::UnknownTopic(_) | RewindError::NoSuchVersion { .. } => {
                AppError::NotFound(e.to_string())
            }
            RewindError::Trimmed { .. } => AppError::Conflict(e.to_string()),
            RewindError::Store(e) => AppError::Store(e),
        })?;
    let files = rewind::change_to(&rewound.current, &rewound.target);
    if files.is_empty() {
        return Ok(json!({
            "status": "unchanged",
            "topic": topic.topic,
            "version": rewound.current_version,
            "rollback_of": version,
        }));
    }
    let outcome = SyncOutcome {
        repo: topic.repo.clone(),
        commit: rewound.commit,
        author: caller.to_string(),
        message: format!("rollback to v{version}: {reason}"),
        topics: vec![TopicChange {
            topic: topic.topic.clone(),
            files,
        }],
        rollback: Some(Rollback {
            rollback_of: version,
            requested_by: caller.to_string(),
            reason: reason.to_string(),
        }),
        ..SyncOutcome::default()
    };
    let changes = app.store.publish(&outcome).await?;
    app.hub.wake();
    let change = changes
        .first()
        .ok_or_else(|| AppError::Unavailable("the rollback published nothing".into()))?;
    tracing::info!(topic = %change.topic, version = change.version, seq = change.seq,
        rollback_of = version, by = %caller, "rollback published");
    Ok(json!({
        "status": "published",
        "topic": change.topic,
        "version": change.version,
        "seq": change.seq,
        "commit": change.commit,
        "rollback_of": version,
        "files": change.files.len(),
    }))
}

/// The pin as `GET /api/v1/topics` and `GET /api/v1/topics/{topic}` show it.
pub fn pin_view(pin: &Pin) -> serde_json::Value {
    json!({
        "by": pin.by,
        "reason": pin.reason,
        "at_ms": pin.at_ms,
        "version": pin.version,
        "held": pin.held,
        "held_total": pin.held_total,
    })
}

/// Every pinned topic's view, by topic.
pub async fn pin_views(
    app: &App,
) -> Result<std::collections::BTreeMap<String, serde_json::Value>, AppError> {
    Ok(app
        .store
        .pins()
        .await?
        .iter()
        .map(|p| (p.topic.clone(), pin_view(p)))
        .collect())
}

/// The topic named by `path` before `suffix`; topics may contain `/`, so the suffix decides.
fn suffixed<'p>(path: &'p str, suffix: &str) -> Result<&'p str, AppError> {
    path.trim_start_matches('/')
        .strip_suffix(suffix)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::NotFound("no such endpoint; see docs/API.md".into()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    serde_json::from_slice(body)
        .map_err(|e| AppError::BadRequest(format!("request body is not valid: {e}")))
}

/// The reason, trimmed: required, and at most `limits.max_reason_bytes`.
fn reason<'r>(app: &App, reason: &'r str) -> Result<&'r str, AppError> {
    let reason = reason.trim();
    let max = app.config.limits.max_reason_bytes;
    if reason.is_empty() {
        return Err(AppError::BadRequest("`reason` must say why".into()));
    }
    if reason.len() > max {
        return Err(AppError::BadRequest(format!(
            "`reason` is {} bytes, longer than the limit of {max} (limits.max_reason_bytes)",
            reason.len()
        )));
    }
    Ok(reason)
}

async fn existing(app: &App, name: &str) -> Result<TopicSummary, AppError> {
    app.store
        .topics()
        .await?
        .into_iter()
        .find(|t| t.topic == name)
        .ok_or_else(|| AppError::NotFound(format!("no topic `{name}`")))
}

fn check_version(topic: &TopicSummary, version: u64) -> Result<(), AppError> {
    if version == 0 || version > topic.version {
        return Err(AppError::NotFound(format!(
            "topic `{}` has no version {version} (versions run from 1 to {})",
            topic.topic, topic.version
        )));
    }
    Ok(())
}

async fn refuse_pinned(app: &App, topic: &str) -> Result<(), AppError> {
    match app
        .store
        .pins()
        .await?
        .into_iter()
        .find(|p| p.topic == topic)
    {
        Some(p) => Err(AppError::Conflict(format!(
            "topic `{topic}` is pinned at version {} by {} ({}): unpin it first",
            p.version, p.by, p.reason
        ))),
        None => Ok(()),
    }
}

async fn lock(app: &App, repo: &str) -> Result<RepoLock, AppError> {
    match tokio::time::timeout(LOCK_WAIT, app.store.lock_repo(repo)).await {
        Ok(lock) => Ok(lock?),
        Err(_) => Err(AppError::Busy(format!(
            "repo `{repo}` has been syncing for {} s; retry later",
            LOCK_WAIT.as_secs()
        ))),
    }
}
