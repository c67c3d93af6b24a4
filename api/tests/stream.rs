//! Live streams over SSE, fed by the real relay and JetStream: tenant scoping, no secrets, and
//! resuming with Last-Event-ID without losing or repeating an event.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::Platform;
use fleetlog_domain::user::Role;
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// One SSE frame.
#[derive(Debug)]
struct Frame {
    id: u64,
    event: String,
    data: Value,
}

/// An open SSE response, read frame by frame.
struct Subscription {
    body: axum::body::BodyDataStream,
    buffer: String,
}

impl Subscription {
    async fn open(platform: &Platform, path: &str, token: &str, last_id: Option<u64>) -> Self {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(id) = last_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = platform
            .router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        Self {
            body: response.into_body().into_data_stream(),
            buffer: String::new(),
        }
    }

    /// The next event frame (keep-alive comments skipped), or `None` after `patience`.
    async fn next(&mut self, patience: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                let mut frame = (None, String::new(), String::new());
                for line in raw.lines() {
                    if let Some(id) = line.strip_prefix("id: ") {
                        frame.0 = Some(id.parse().unwrap());
                    } else if let Some(event) = line.strip_prefix("event: ") {
                        frame.1 = event.to_string();
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        frame.2.push_str(data);
                    }
                }
                if let Some(id) = frame.0 {
                    return Some(Frame {
                        id,
                        event: frame.1,
                        data: serde_json::from_str(&frame.2).unwrap(),
                    });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next()).await;
            match chunk {
                Ok(Some(Ok(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                _ => return None,
            }
        }
    }

    async fn expect(&mut self) -> Frame {
        self.next(Duration::from_secs(20))
            .await
            .expect("an event within 20 s")
    }
}

async fn rename(platform: &Platform, token: &str, id: &str, name: &str) {
    let (status, body) = platform
        .call(
            Method::PATCH,
            &format!("/api/v1/devices/{id}"),
            token,
            Some(json!({"name": name})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stream_shows_the_devices_events_live_and_resumes() {
    let platform = Platform::start_with(false).await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let stranger = platform.token("globex", "gus", Role::Admin);
    platform.create(&operator, "d1").await;
    platform.create(&operator, "d2").await;
    platform.wait_relayed().await;

    let mut live = Subscription::open(&platform, "/api/v1/devices/d1/stream", &viewer, None).await;
    rename(&platform, &operator, "d2", "other device").await;
    rename(&platform, &operator, "d1", "first").await;
    let first = live.expect().await;
    assert_eq!(first.event, "DeviceMetadataUpdated");
    assert_eq!(first.data["aggregate_id"], "d1");
    assert_eq!(first.data["metadata"]["tenant"], "acme");
    rename(&platform, &operator, "d1", "second").await;
    rename(&platform, &operator, "d1", "third").await;
    let second = live.expect().await;
    let third = live.expect().await;
    assert!(first.id < second.id && second.id < third.id);
    assert_eq!(
        third.data["sequence"],
        second.data["sequence"].as_i64().unwrap() + 1
    );
    drop(live);

    // Reconnecting after `first` replays exactly what came after it, then continues live.
    let mut resumed = Subscription::open(
        &platform,
        "/api/v1/devices/d1/stream",
        &viewer,
        Some(first.id),
    )
    .await;
    assert_eq!(resumed.expect().await.id, second.id);
    assert_eq!(resumed.expect().await.id, third.id);
    rename(&platform, &operator, "d1", "fourth").await;
    let fourth = resumed.expect().await;
    assert_eq!(
        fourth.data["payload"]["DeviceMetadataUpdated"]["name"],
        "fourth"
    );
    assert!(resumed.next(Duration::from_millis(500)).await.is_none());

    // Another tenant cannot open it; nobody without a token can.
    let (status, _) = platform
        .call(Method::GET, "/api/v1/devices/d1/stream", &stranger, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = platform
        .send(Method::GET, "/api/v1/devices/d1/stream", &[], Body::empty())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = platform
        .send(
            Method::GET,
            "/api/v1/devices/d1/stream",
            &[
                ("authorization", format!("Bearer {viewer}").as_str()),
                ("last-event-id", "yesterday"),
            ],
            Body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_stream_carries_only_the_tenants_events_without_secrets() {
    let platform = Platform::start_with(false).await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let stranger = platform.token("globex", "gus", Role::Admin);
    platform.wait_relayed().await;
    let mut acme = Subscription::open(&platform, "/api/v1/stream", &operator, None).await;
    let mut globex = Subscription::open(&platform, "/api/v1/stream", &stranger, None).await;

    platform.create(&stranger, "theirs").await;
    platform.create(&operator, "ours").await;
    // Registration, then the credential rotation whose hash must not show.
    let registered = acme.expect().await;
    assert_eq!(registered.event, "DeviceRegistered");
    assert_eq!(registered.data["aggregate_id"], "ours");
    let rotated = acme.expect().await;
    assert_eq!(rotated.event, "DeviceCredentialsRotated");
    assert!(rotated.data["payload"]["DeviceCredentialsRotated"]
        .get("secret_hash")
        .is_none());
    assert_eq!(globex.expect().await.data["aggregate_id"], "theirs");
    assert_eq!(globex.expect().await.data["aggregate_id"], "theirs");
    assert!(globex.next(Duration::from_millis(500)).await.is_none());

    // A user created in the tenant is not streamed.
    let admin = platform.token("acme", "ann", Role::Admin);
    let (status, _) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &admin,
            Some(json!({"username": "new", "password": "long enough pw", "roles": ["viewer"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(acme.next(Duration::from_millis(800)).await.is_none());

    let (status, _) = platform
        .call(Method::GET, "/api/v1/stream?type=user", &admin, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A stream ends when the access token it was opened with expires: a viewer who logged out
/// or was disabled since receives nothing past that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    platform.create(&operator, "d1").await;
    let short = platform.token_expiring_in("acme", "vic", Role::Viewer, 3);
    let opened = std::time::Instant::now();
    let mut stream = Subscription::open(&platform, "/api/v1/stream", &short, None).await;
    rename(&platform, &operator, "d1", "Before expiry").await;
    while stream.expect().await.event != "DeviceMetadataUpdated" {}
    // Past the expiry the stream ends, whatever happens after.
    assert!(stream.next(Duration::from_secs(20)).await.is_none());
    let ended = opened.elapsed();
    assert!(ended < Duration::from_secs(15), "ended after {ended:?}");
    rename(&platform, &operator, "d1", "After expiry").await;
    assert!(stream.next(Duration::from_secs(1)).await.is_none());
}
