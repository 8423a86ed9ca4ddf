//! `POST /api/v1/commands` (admin) and `GET /api/v1/commands[/{id}]` (read): commands for the
//! instances to run now, such as dropping a cache, and what each targeted instance made of them.
//!
//! A creation is recorded in the audit log before it is stored, and every input is checked
//! against its `[limits]` cap before anything is written.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use crate::app::{AppError, AppState, Caller};
use crate::hub::commands::{check_name, Candidate, CommandTarget};
use crate::store::{now_ms, CommandRefusal, NewCommand};

/// The body of `POST /api/v1/commands`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    target: CommandTarget,
    name: String,
    #[serde(default)]
    args: serde_json::Value,
    deadline_secs: Option<u64>,
}

/// Most commands one `GET /api/v1/commands` lists.
const LIST_MAX: u32 = 500;

pub async fn create(
    State(app): State<AppState>,
    Extension(Caller(caller)): Extension<Caller>,
    body: Bytes,
) -> Result<Response, AppError> {
    let request: CommandRequest = serde_json::from_slice(&body).map_err(|e| {
        AppError::BadRequest(format!(
            "invalid command: {e} (expected {{\"target\": {{\"all\": true}} | {{\"instances\": [..]}} | {{\"app\": \"..\"}} | {{\"labels\": {{..}}}} | {{\"topics\": \"pattern\"}}, \"name\": \"..\", \"args\": {{..}}, \"deadline_secs\": N}})"
        ))
    })?;
    let limits = &app.config.limits;
    check_name(&request.name, limits.max_command_name_bytes).map_err(AppError::BadRequest)?;
    request.target.check(limits).map_err(AppError::BadRequest)?;
    let args_bytes = request.args.to_string().len();
    if args_bytes > limits.max_command_args_bytes {
        return Err(AppError::PayloadTooLarge(format!(
            "command args are {args_bytes} bytes of JSON; at most {} (limits.max_command_args_bytes)",
            limits.max_command_args_bytes
        )));
    }
    let deadline_secs = request
        .deadline_secs
        .unwrap_or(limits.default_command_deadline_secs);
    if deadline_secs == 0 || deadline_secs > limits.max_command_deadline_secs {
        return Err(AppError::BadRequest(format!(
            "deadline_secs must be 1 to {} (limits.max_command_deadline_secs)",
            limits.max_command_deadline_secs
        )));
    }
    let now = now_ms();
    let active = app.store.active_command_count(now).await?;
    if active >= limits.max_active_commands {
        return Err(too_many(active, limits.max_active_commands));
    }
    // Pending from the start: the instances named, or the known ones the target matches.
    let targeted: Vec<String> = match &request.target {
        CommandTarget::Instances(ids) => {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            ids
        }
        target => app
            .store
            .instances()
            .await?
            .into_iter()
            .filter(|i| {
                target.matches(&Candidate {
                    instance: &i.id,
                    app: i.app.as_deref(),
                    labels: &i.labels,
                    subscriptions: &i.subscriptions,
                })
            })
            .map(|i| i.id)
            .collect(),
    };
    let target = serde_json::to_value(&request.target)
        .map_err(|e| AppError::BadRequest(format!("invalid target: {e}")))?;
    let command = NewCommand {
        id: crate::store::new_epoch_id(),
        name: request.name,
        args: request.args,
        target,
        created_by: caller.clone(),
        created_at_ms: now,
        deadline_ms: now
            .saturating_add(i64::try_from(deadline_secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
    };
    app.audit(
        &caller,
        "command",
        &command.id,
        json!({
            "name": command.name,
            "target": command.target,
            "deadline_ms": command.deadline_ms,
            "targeted": targeted.len(),
        }),
    )
    .await?;
    match app
        .store
        .create_command(
            &command,
            &targeted,
            limits.max_active_commands,
            limits.max_commands_kept,
        )
        .await?
    {
        Ok(()) => {}
        Err(CommandRefusal::TooManyActive { active }) => {
            return Err(too_many(active, limits.max_active_commands))
        }
    }
    tracing::info!(command = %command.id, name = %command.name, credential = %caller, targeted = targeted.len(), "command created");
    app.hub.wake_commands();
    let (record, _) = app
        .store
        .command(&command.id, now_ms())
        .await?
        .ok_or_else(|| AppError::NotFound(format!("command `{}` vanished", command.id)))?;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

fn too_many(active: u64, max: u64) -> AppError {
    AppError::TooManyRequests(format!(
        "{active} commands have their deadline ahead; at most {max} (limits.max_active_commands): wait for one to pass"
    ))
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<u32>,
}

/// `GET /api/v1/commands?limit=N`: newest first, with counts.
pub async fn list(
    State(app): State<AppState>,
    Query(q): Query<ListParams>,
) -> Result<Json<serde_json::Value>, AppError> {
    let limit = q.limit.unwrap_or(50).clamp(1, LIST_MAX);
    let commands = app.store.commands(limit, now_ms()).await?;
    Ok(Json(json!({ "commands": commands })))
}

/// `GET /api/v1/commands/{id}`: the command, its counts, and each targeted instance.
pub async fn show(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    let (record, instances) = app
        .store
        .command(&id, now_ms())
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no command `{id}`")))?;
    let mut body = serde_json::to_value(record).unwrap_or_default();
    body["instances"] = serde_json::to_value(instances).unwrap_or_default();
    Ok(Json(body))
}
