//! The route table the router is built from: each route's method, path and credential in one
//! place, so the router, the credential checks and the OpenAPI description cannot drift apart
//! (tests/openapi.rs compares the description with [`Routes::table`]).

use axum::handler::Handler;
use axum::http::Method;
use axum::middleware;
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use serde::Serialize;

use crate::app::AppState;

/// What a caller must present to use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Credential {
    /// Nothing: probes and the API description.
    Open,
    /// An API token of scope `read` (or `admin`).
    Read,
    /// An API token of scope `admin`.
    Admin,
    /// An instance credential (the WebSocket).
    Instance,
    /// The repo's webhook secret, as a signature over the body.
    WebhookSignature,
}

/// One route as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteInfo {
    pub method: String,
    /// In the router's syntax: `{name}` for a segment, `{*name}` for the rest of the path.
    pub path: &'static str,
    pub credential: Credential,
}

/// Routes being added: the router (when built for serving) and the table.
pub struct Routes {
    app: Option<AppState>,
    router: Router<AppState>,
    table: Vec<RouteInfo>,
}

impl Routes {
    /// `app` is `None` when only the table is wanted.
    pub fn new(app: Option<AppState>) -> Routes {
        Routes {
            app,
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// Adds `handler` for `method` on `path`, behind the check `credential` needs (the API
    /// tokens here; the WebSocket and webhooks check theirs in their handlers).
    pub fn add<H, T>(
        self,
        method: Method,
        path: &'static str,
        credential: Credential,
        handler: H,
    ) -> Routes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.add_layered(method, path, credential, handler, |endpoint, _| endpoint)
    }

    /// [`Routes::add`], with `layer` wrapped around the endpoint (outside the credential check).
    pub fn add_layered<H, T>(
        mut self,
        method: Method,
        path: &'static str,
        credential: Credential,
        handler: H,
        layer: impl FnOnce(MethodRouter<AppState>, AppState) -> MethodRouter<AppState>,
    ) -> Routes
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.table.push(RouteInfo {
            method: method.to_string(),
            path,
            credential,
        });
        let Some(app) = &self.app else {
            return self;
        };
        let Ok(filter) = MethodFilter::try_from(method) else {
            // Only the standard methods are used above; an unknown one would be a typo there.
            tracing::error!(path, "route with an unsupported method left out");
            return self;
        };
        let endpoint = on(filter, handler);
        let endpoint = match credential {
            Credential::Read => endpoint.route_layer(middleware::from_fn_with_state(
                app.clone(),
                super::require_read,
            )),
            Credential::Admin => endpoint.route_layer(middleware::from_fn_with_state(
                app.clone(),
                super::require_admin,
            )),
            Credential::Open | Credential::Instance | Credential::WebhookSignature => endpoint,
        };
        let endpoint = layer(endpoint, app.clone());
        // A second method on a path already routed joins the first (axum merges them).
        self.router = self.router.route(path, endpoint);
        self
    }

    pub fn into_router(self) -> Router<AppState> {
        self.router
    }

    pub fn table(self) -> Vec<RouteInfo> {
        self.table
    }
}
