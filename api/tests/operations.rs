//! The operations endpoints against a real Postgres (and a closed port for the failing case).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetlog_api::{router, AppState};
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_testkit::TestDatabase;
use sqlx::postgres::PgPoolOptions;
use tower::ServiceExt;

async fn get(state: AppState, path: &str) -> (StatusCode, serde_json::Value) {
    let response = router(state)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn health_and_readiness_with_a_live_database() {
    let db = TestDatabase::create().await;
    let state = AppState {
        bus: CommandBus::new(db.pool.clone(), StoreSettings::default()),
    };
    let (status, body) = get(state.clone(), "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = get(state, "/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["checks"]["database"], "ok");
}

#[tokio::test]
async fn not_ready_when_the_database_is_unreachable() {
    // Port 1 on loopback: nothing listens there, connections are refused at once.
    let pool = PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy("postgres://fleetlog:x@127.0.0.1:1/fleetlog")
        .unwrap();
    let state = AppState {
        bus: CommandBus::new(pool, StoreSettings::default()),
    };
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    // Liveness does not depend on the database.
    let (status, _) = get(state, "/health").await;
    assert_eq!(status, StatusCode::OK);
}
