//! `GET /metrics` (Prometheus text, or OpenMetrics when asked for; needs a `read` API token when
//! API tokens are configured, like the rest of the query API) and the layer that counts every
//! webhook request by provider and outcome. The metrics themselves live in [`crate::telemetry`].

use axum::extract::{Path, Request, State};
use axum::http::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::app::{AppError, AppState};
use crate::config::Provider;
use crate::telemetry::{provider_label, WebhookOutcome, OPENMETRICS_TEXT, PROMETHEUS_TEXT};

/// `GET /metrics`: this replica's metrics. OpenMetrics when the `Accept` header names
/// `application/openmetrics-text` (Prometheus does), else the Prometheus text format 0.0.4.
pub(super) async fn scrape(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = app
        .metrics
        .render(openmetrics)
        .map_err(|_| AppError::Unavailable("metrics could not be encoded".into()))?;
    let content_type = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    Ok(([(CONTENT_TYPE, content_type)], body).into_response())
}

/// Counts each `POST /webhooks/{repo}` in `confcast_webhooks_total`: the outcome the handler
/// attached to its answer, or the one its error status stands for.
pub(super) async fn count_webhook(
    State(app): State<AppState>,
    Path(repo): Path<String>,
    request: Request,
    next: Next,
) -> Response {
    let provider = match app.config.repo(&repo).map(|r| r.webhook.provider) {
        Some(Provider::Auto) | None => crate::webhook::detect(request.headers()),
        fixed => fixed,
    };
    let response = next.run(request).await;
    let outcome = response
        .extensions()
        .get::<WebhookOutcome>()
        .copied()
        .unwrap_or_else(|| refused(&response));
    app.metrics.webhook(provider_label(provider), outcome);
    response
}

/// The outcome an error answer of `webhook::handle` stands for (`AppError`'s one mapping to
/// status codes).
fn refused(response: &Response) -> WebhookOutcome {
    match response.status() {
        StatusCode::UNAUTHORIZED => WebhookOutcome::RefusedSignature,
        StatusCode::PAYLOAD_TOO_LARGE => WebhookOutcome::TooLarge,
        StatusCode::REQUEST_TIMEOUT => WebhookOutcome::Timeout,
        StatusCode::NOT_FOUND => WebhookOutcome::UnknownRepo,
        StatusCode::SERVICE_UNAVAILABLE if response.headers().contains_key(RETRY_AFTER) => {
            WebhookOutcome::Busy
        }
        StatusCode::SERVICE_UNAVAILABLE => WebhookOutcome::Unavailable,
        _ => WebhookOutcome::Malformed,
    }
}
