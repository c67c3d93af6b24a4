//! fleetlog's HTTP API (axum).
//!
//! So far it serves the operations endpoints that deployments probe: `GET /health` (the process
//! is up) and `GET /ready` (its database answers). The REST resources under `/api/v1`, JWT
//! authentication and the OpenAPI document build on this router.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use fleetlog_commands::CommandBus;
use serde_json::json;
use tokio::net::TcpListener;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The write side; its pool also answers readiness.
    pub bus: CommandBus,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
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
