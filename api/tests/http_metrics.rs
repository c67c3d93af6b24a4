//! Request metrics: counted and timed per method, route template and status.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetlog_api::auth::Auth;
use fleetlog_api::throttle::LoginThrottle;
use fleetlog_api::{router, AppState};
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_projections::DeviceModels;
use metrics_exporter_prometheus::PrometheusBuilder;
use secrecy::SecretString;
use sqlx::postgres::PgPoolOptions;
use tower::ServiceExt;

#[tokio::test]
async fn requests_are_counted_and_timed_by_route_template() {
    // This test binary's only test: it may own the global recorder.
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let pool = PgPoolOptions::new()
        .connect_lazy("postgres://fleetlog:x@127.0.0.1:1/fleetlog")
        .unwrap();
    let state = AppState {
        login_throttle: Arc::new(LoginThrottle::default()),
        nats: None,
        mqtt: None,
        auth: Auth::new(
            &SecretString::from("a test secret that is long enough to sign"),
            fleetlog_testkit::device_key(),
            Duration::from_secs(300),
            Duration::from_secs(3600),
        ),
        bus: CommandBus::new(pool, StoreSettings::default(), DeviceModels::inline()),
        metrics: Some(handle.clone()),
        firmware: None,
        broker_auth: None,
    };
    for path in [
        "/health",
        "/health",
        "/api/v1/devices/d1",
        "/api/v1/devices/d2",
        "/nowhere",
    ] {
        let response = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_ne!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let text = handle.render();
    assert!(
        text.contains(
            r#"fleetlog_http_requests_total{method="GET",route="/health",status="200"} 2"#
        ),
        "{text}"
    );
    // Two device ids, one route label; unauthenticated, so 401.
    assert!(
        text.contains(r#"fleetlog_http_requests_total{method="GET",route="/api/v1/devices/{id}",status="401"} 2"#),
        "{text}"
    );
    assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
    assert!(
        text.contains("fleetlog_http_request_duration_seconds"),
        "{text}"
    );
}
