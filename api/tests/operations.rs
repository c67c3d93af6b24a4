//! The operations endpoints against a real Postgres (and a closed port for the failing case).

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetlog_api::auth::Auth;
use fleetlog_api::{router, AppState};
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_projections::DeviceModels;
use fleetlog_testkit::TestDatabase;
use secrecy::SecretString;
use std::sync::Arc;
use std::time::Duration;

fn test_auth() -> Arc<Auth> {
    Auth::new(
        &SecretString::from("a test secret that is long enough to sign"),
        fleetlog_testkit::device_key(),
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
        login_throttle: std::sync::Arc::new(fleetlog_api::throttle::LoginThrottle::default()),
        nats: None,
        mqtt: None,
        auth: test_auth(),
        bus: CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        metrics: None,
        firmware: None,
        broker_auth: None,
    };
    let (status, body) = get(state.clone(), "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["checks"]["database"], "ok");
    // Without FLEETLOG_BROKER_AUTH_TOKEN the broker's routes are not there to be guessed at.
    let response = router(state)
        .oneshot(
            Request::post("/api/v1/broker/authenticate")
                .header("content-type", "application/json")
                .header("authorization", "Bearer anything")
                .body(Body::from(
                    r#"{"clientid":"d","username":"d","password":"p"}"#,
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn not_ready_when_the_database_is_unreachable() {
    // Port 1 on loopback: nothing listens there, connections are refused at once.
    let pool = PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy("postgres://fleetlog:x@127.0.0.1:1/fleetlog")
        .unwrap();
    let state = AppState {
        login_throttle: std::sync::Arc::new(fleetlog_api::throttle::LoginThrottle::default()),
        nats: None,
        mqtt: None,
        auth: test_auth(),
        bus: CommandBus::new(pool, StoreSettings::default(), DeviceModels::inline()),
        metrics: None,
        firmware: None,
        broker_auth: None,
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
        login_throttle: std::sync::Arc::new(fleetlog_api::throttle::LoginThrottle::default()),
        nats: None,
        mqtt: None,
        auth: test_auth(),
        bus: CommandBus::new(pool, StoreSettings::default(), DeviceModels::inline()),
        metrics: Some(handle),
        firmware: None,
        broker_auth: None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_mqtt_broker() {
    use fleetlog_testkit::MosquittoServer;

    let db = TestDatabase::create().await;
    let mut broker = MosquittoServer::start();
    let state = AppState {
        login_throttle: std::sync::Arc::new(fleetlog_api::throttle::LoginThrottle::default()),
        nats: None,
        mqtt: Some(std::sync::Arc::new(broker.url().parse().unwrap())),
        auth: test_auth(),
        bus: CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        metrics: None,
        firmware: None,
        broker_auth: None,
    };
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["mqtt"], "ok");
    broker.kill();
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["checks"]["mqtt"], "unreachable");
    assert_eq!(body["checks"]["database"], "ok");
    broker.resume();
    let (status, _) = get(state, "/ready").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn readiness_follows_nats_and_requests_carry_ids() {
    use fleetlog_testkit::NatsServer;

    let db = TestDatabase::create().await;
    let mut nats = NatsServer::start();
    let client = fleetlog_nats::connect(&nats.url()).await.unwrap();
    let state = AppState {
        login_throttle: std::sync::Arc::new(fleetlog_api::throttle::LoginThrottle::default()),
        nats: Some(std::sync::Arc::new(client.clone())),
        mqtt: None,
        auth: test_auth(),
        bus: CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        metrics: None,
        firmware: None,
        broker_auth: None,
    };
    // The client connects in the background (it never fails start-up over NATS).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.connection_state() != async_nats::connection::State::Connected {
        assert!(
            std::time::Instant::now() < deadline,
            "client never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["nats"], "ok");
    nats.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.connection_state() == async_nats::connection::State::Connected {
        assert!(std::time::Instant::now() < deadline, "client never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = get(state.clone(), "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["checks"]["nats"], "unreachable");

    // A request id is made up when absent and echoed when given.
    let response = router(state.clone())
        .oneshot(Request::get("/health").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let generated = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(generated.len(), 36, "a uuid: {generated}");
    let response = router(state.clone())
        .oneshot(
            Request::get("/health")
                .header("x-request-id", "req-42")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42");

    // CORS only for the configured origins.
    let http = fleetlog_api::HttpSettings {
        cors_origins: vec!["https://console.example".parse().unwrap()],
        ..Default::default()
    };
    let preflight = |origin: &str| {
        Request::builder()
            .method("OPTIONS")
            .uri("/api/v1/devices")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .body(Body::empty())
            .unwrap()
    };
    let allowed = fleetlog_api::router_with(state.clone(), &http)
        .oneshot(preflight("https://console.example"))
        .await
        .unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://console.example"
    );
    let refused = fleetlog_api::router_with(state, &http)
        .oneshot(preflight("https://evil.example"))
        .await
        .unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}
