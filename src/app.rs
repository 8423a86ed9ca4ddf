//! The application state every handler shares and the one error type they answer with.
//!
//! It sits below the handlers: [`crate::api`], [`crate::webhook`] and [`crate::hub`] depend on it,
//! never on each other, and the errors map to status codes in exactly one `impl IntoResponse`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Authenticator};
use crate::config::Config;
use crate::hub::Hub;
use crate::store::{Store, StoreError};
use crate::sync::Syncers;
use crate::telemetry::Metrics;

pub type AppState = Arc<App>;

/// Everything a request handler may need.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
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
    /// What `/metrics` shows; this server's own registry.
    pub metrics: Arc<Metrics>,
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
    Busy(String),
    #[error("{0}")]
    Timeout(String),
    #[error("request body is larger than the limit of {0} bytes (server.max_body_bytes)")]
    TooLarge(usize),
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
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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
