//! The application state every handler shares and the one error type they answer with.
//!
//! It sits below the handlers: [`crate::api`], [`crate::webhook`] and [`crate::hub`] depend on it,
//! never on each other, and the errors map to status codes in exactly one `impl IntoResponse`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::Config;
use crate::hub::writes::Writes;
use crate::hub::Hub;
use crate::store::{AuditEntry, Store, StoreError};
use crate::sync::Syncers;
use crate::telemetry::Metrics;

pub type AppState = Arc<App>;

/// Everything a request handler may need.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    /// The connections' instance and ack writes, batched into one transaction each by one task.
    pub writes: Writes,
    pub hub: Arc<Hub>,
    pub syncers: Syncers,
    /// This replica's name, shown next to the instances connected to it.
    pub node: String,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Checks instance and API credentials.
    pub auth: Authenticator,
    /// Webhook body bytes that may be in flight at once (`limits.webhook_bytes_in_flight`).
    pub webhook_bytes: Arc<Semaphore>,
    /// How many refused credentials this minute were recorded in the audit log.
    pub refusals: RefusalBudget,
    /// What `/metrics` shows; this server's own registry.
    pub metrics: Arc<Metrics>,
}

/// Who made an API request: the API token's name, or `anonymous` when the API is open. The
/// credential check puts it in the request's extensions for the handlers that audit.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl App {
    /// Records a write in the audit log before it is done: a write that cannot be recorded is
    /// not done (the caller answers 503), so the log never misses one.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: serde_json::Value,
    ) -> Result<(), AppError> {
        let entry = AuditEntry {
            at_ms: crate::store::now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: "ok".into(),
            detail,
        };
        self.store
            .record_audit(&entry, self.config.limits.max_audit_entries)
            .await?;
        Ok(())
    }

    /// Records a refused credential (`actor` is where it came from: [`Peer::actor`] or the
    /// credential's name, `what` the endpoint or message, `reason` the refusal),
    /// within `limits.audit_refusals_per_minute`; beyond it refusals are counted and the count
    /// is recorded with the next one recorded. Never fails the request: a refusal is answered
    /// whatever the audit log does.
    pub async fn audit_refusal(&self, actor: &str, what: &str, reason: &str) {
        let now = crate::store::now_ms();
        let (record, summary) = self
            .refusals
            .take(now, self.config.limits.audit_refusals_per_minute);
        let mut entries = Vec::new();
        if let Some((minute_ms, count)) = summary {
            entries.push(AuditEntry {
                at_ms: now,
                actor: "various".into(),
                action: "credential_refused".into(),
                target: "*".into(),
                outcome: "refused".into(),
                detail: json!({
                    "not_recorded_one_by_one": count,
                    "minute_from_ms": minute_ms,
                    "reason": "over limits.audit_refusals_per_minute",
                }),
            });
        }
        if record {
            entries.push(AuditEntry {
                at_ms: now,
                actor: actor.to_string(),
                action: "credential_refused".into(),
                target: what.to_string(),
                outcome: "refused".into(),
                detail: json!({ "reason": reason }),
            });
        }
        for entry in entries {
            if let Err(e) = self
                .store
                .record_audit(&entry, self.config.limits.max_audit_entries)
                .await
            {
                tracing::warn!(error = %e, "could not record a refused credential in the audit log");
            }
        }
    }
}

/// The address a request came from (the proxy's, behind one), when the listener put it there.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

impl Peer {
    /// The peer's IP address, as the audit log's actor of a refused credential.
    pub fn actor(&self) -> String {
        self.0
            .map_or_else(|| "unknown".to_string(), |p| p.ip().to_string())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Peer, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// Counts refused credentials per minute, so recording them costs the database a bounded number
/// of rows however many arrive.
#[derive(Debug, Default)]
pub struct RefusalBudget {
    window: Mutex<RefusalWindow>,
}

#[derive(Debug, Default)]
struct RefusalWindow {
    start_ms: i64,
    recorded: u32,
    suppressed: u64,
}

impl RefusalBudget {
    /// Whether the refusal at `now_ms` is recorded, and the count of the refusals a past minute
    /// did not record, to record now (once).
    pub fn take(&self, now_ms: i64, per_minute: u32) -> (bool, Option<(i64, u64)>) {
        let Ok(mut w) = self.window.lock() else {
            return (false, None);
        };
        let mut summary = None;
        if now_ms - w.start_ms >= 60_000 {
            if w.suppressed > 0 {
                summary = Some((w.start_ms, w.suppressed));
            }
            *w = RefusalWindow {
                start_ms: now_ms,
                recorded: 0,
                suppressed: 0,
            };
        }
        if w.recorded < per_minute {
            w.recorded += 1;
            (true, summary)
        } else {
            w.suppressed += 1;
            (false, summary)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Timeout(String),
    #[error("request body is larger than the limit of {0} bytes (server.max_body_bytes)")]
    TooLarge(usize),
    /// A part of a request over its `[limits]` cap (413); the message names the cap.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A cap on things held at once is reached (429); the message says what to wait for.
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::Busy(_) => {
                let body = Json(json!({ "error": self.to_string() }));
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "5")],
                    body,
                )
                    .into_response();
            }
            AppError::TooLarge(_) | AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Store(e) => {
                tracing::error!(error = %e, "store error while answering a request");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

impl From<AuthError> for AppError {
    fn from(e: AuthError) -> AppError {
        if e.is_forbidden() {
            AppError::Forbidden(e.to_string())
        } else {
            AppError::Unauthorized(e.to_string())
        }
    }
}

/// The bearer token of a request: `Authorization: Bearer <token>` (scheme case-insensitive), or
/// `?token=` in `query` for clients that cannot set headers.
pub fn bearer<'a>(headers: &'a axum::http::HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .or(query)
}

#[cfg(test)]
mod tests {
    use super::RefusalBudget;

    #[test]
    fn refusals_beyond_the_budget_are_counted_and_summarised_once() {
        let budget = RefusalBudget::default();
        let start = 1_000_000;
        assert_eq!(budget.take(start, 2), (true, None));
        assert_eq!(budget.take(start + 1, 2), (true, None));
        assert_eq!(budget.take(start + 2, 2), (false, None));
        assert_eq!(budget.take(start + 3, 2), (false, None));
        // The next minute records again and carries the count of the last one, once.
        assert_eq!(budget.take(start + 60_000, 2), (true, Some((start, 2))));
        assert_eq!(budget.take(start + 60_001, 2), (true, None));
    }
}
