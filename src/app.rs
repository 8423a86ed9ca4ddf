//! The application state every handler shares and the one error type they answer with.
//!
//! It sits below the handlers: [`crate::api`], [`crate::webhook`] and [`crate::hub`] depend on it,
//! never on each other, and the errors map to status codes in exactly one `impl IntoResponse`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::store::{Store, StoreError};
use crate::sync::Syncers;

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
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
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
