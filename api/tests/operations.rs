//! The operations endpoints against a real Postgres (and a closed port for the failing case).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetlog_api::auth::Auth;
use fleetlog_api::{router, AppState};
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_testkit::TestDatabase;
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;

fn test_auth() -> Arc<Auth> {
    Auth::new(
        &SecretString::from("a test secret that is long enough to sign"),
        Duration::from_secs(300),
        Duration::from_secs(3600),
    )
}
use metrics_exporter_prometheus::PrometheusBuilder;
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
        auth: test_auth(),
        bus: CommandBus::new(db.pool.clone(), StoreSettings::default()),
        metrics: None,
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
        auth: test_auth(),
        bus: CommandBus::new(pool, StoreSettings::default()),
        metrics: None,
    };
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "not_ready");
    // Liveness does not depend on the database.
    let (status, _) = get(state, "/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://fleetlog:x@127.0.0.1:1/fleetlog")
        .unwrap();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        metrics::counter!("fleetlog_projection_events_total", "projection" => "devices", "outcome" => "applied")
            .increment(3);
    });
    let state = AppState {
        auth: test_auth(),
        bus: CommandBus::new(pool, StoreSettings::default()),
        metrics: Some(handle),
    };
    let response = router(state)
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(
            r#"fleetlog_projection_events_total{projection="devices",outcome="applied"} 3"#
        ),
        "{text}"
    );
}
