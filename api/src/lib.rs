//! fleetlog's HTTP API (axum).
//!
//! Operations endpoints: `GET /health` (the process is up), `GET /ready` (its database answers)
//! and `GET /metrics` (Prometheus). Under `/api/v1`: authentication (`auth/login`,
//! `auth/refresh`, `auth/logout`, see [`auth`]) and `users/me`. Every error, unknown routes and
//! methods and malformed bodies included, is RFC 7807 problem+json ([`error`]).
//!
//! Handlers are thin: extract (the [`auth::Caller`] carries tenant and roles from the access
//! token), build a command or query, one call, map the result.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use fleetlog_commands::CommandBus;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;

pub mod auth;
pub mod consistency;
pub mod error;
pub mod extract;
mod routes;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;

use crate::auth::Auth;
use crate::error::problem;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Token keys and lifetimes.
    pub auth: Arc<Auth>,
    /// The write side; its pool also answers readiness.
    pub bus: CommandBus,
    /// Renders the process's metrics for `GET /metrics`; `None` when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .nest("/api/v1/auth", routes::auth::router())
        .nest("/api/v1/users", routes::users::router())
        .nest("/api/v1/devices", routes::devices::router())
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then lets requests in flight finish.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "api listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Prometheus text format: every metric the roles of this process record (projection lag and
/// outcomes, liveness, ...).
async fn metrics(
    State(state): State<AppState>,
) -> (StatusCode, [(HeaderName, &'static str); 1], String) {
    let content_type = (CONTENT_TYPE, "text/plain; version=0.0.4");
    match &state.metrics {
        Some(handle) => (StatusCode::OK, [content_type], handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            [content_type],
            "metrics are not recorded in this process\n".into(),
        ),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(state.bus.pool());
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": {"database": "ok"}})),
        ),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: database unreachable");
            not_ready("unreachable")
        }
        Err(_) => not_ready("timeout"),
    }
}

fn not_ready(database: &str) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "checks": {"database": database}})),
    )
}
