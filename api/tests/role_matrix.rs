//! Every protected operation against every role: allowed roles get past authorization, the
//! others get 403. The list is checked against the OpenAPI document, so a new route without a
//! row here fails the test.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use chrono::Utc;
use common::Platform;
use fleetlog_commands::CommandMetadata;
use fleetlog_domain::firmware::{FirmwareCommand, FirmwareId};
use fleetlog_domain::user::Role;
use fleetlog_domain::TenantId;
use serde_json::{json, Value};
use tower::ServiceExt;

const ALL: &[Role] = &[Role::Admin, Role::Operator, Role::Viewer];
const WRITERS: &[Role] = &[Role::Admin, Role::Operator];
const ADMIN: &[Role] = &[Role::Admin];

/// (method, documented path, concrete path, body, roles allowed).
type Row = (
    &'static str,
    &'static str,
    String,
    Option<Value>,
    &'static [Role],
);

fn matrix(user_id: &str) -> Vec<Row> {
    let row = |method, documented, concrete: &str, body, roles| {
        (method, documented, concrete.to_string(), body, roles)
    };
    vec![
        row(
            "post",
            "/api/v1/auth/logout",
            "/api/v1/auth/logout",
            None,
            ALL,
        ),
        row("get", "/api/v1/users/me", "/api/v1/users/me", None, ALL),
        row("get", "/api/v1/users", "/api/v1/users", None, ADMIN),
        row(
            "post",
            "/api/v1/users",
            "/api/v1/users",
            Some(
                json!({"username": "new-user", "password": "long enough pw", "roles": ["viewer"]}),
            ),
            ADMIN,
        ),
        (
            "post",
            "/api/v1/users/{id}/roles",
            format!("/api/v1/users/{user_id}/roles"),
            Some(json!({"role": "operator"})),
            ADMIN,
        ),
        (
            "delete",
            "/api/v1/users/{id}/roles/{role}",
            format!("/api/v1/users/{user_id}/roles/operator"),
            None,
            ADMIN,
        ),
        (
            "post",
            "/api/v1/users/{id}/disable",
            format!("/api/v1/users/{user_id}/disable"),
            Some(json!({"reason": "left"})),
            ADMIN,
        ),
        (
            "post",
            "/api/v1/users/{id}/enable",
            format!("/api/v1/users/{user_id}/enable"),
            None,
            ADMIN,
        ),
        row(
            "post",
            "/api/v1/devices",
            "/api/v1/devices",
            Some(json!({"device_id": "new-dev", "name": "n", "model": "thermo"})),
            WRITERS,
        ),
        row("get", "/api/v1/devices", "/api/v1/devices", None, ALL),
        row(
            "get",
            "/api/v1/devices/{id}",
            "/api/v1/devices/d1",
            None,
            ALL,
        ),
        row(
            "patch",
            "/api/v1/devices/{id}",
            "/api/v1/devices/d1",
            Some(json!({"name": "renamed"})),
            WRITERS,
        ),
        row(
            "put",
            "/api/v1/devices/{id}/desired",
            "/api/v1/devices/d1/desired",
            Some(json!({"mode": "eco"})),
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/devices/{id}/credentials/rotate",
            "/api/v1/devices/d1/credentials/rotate",
            Some(json!({"reason": "scheduled"})),
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/devices/{id}/credentials/revoke",
            "/api/v1/devices/d1/credentials/revoke",
            None,
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/devices/{id}/commands",
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "reboot"})),
            WRITERS,
        ),
        row(
            "get",
            "/api/v1/devices/{id}/commands/{command_id}",
            "/api/v1/devices/d1/commands/c1",
            None,
            ALL,
        ),
        row(
            "get",
            "/api/v1/devices/{id}/events",
            "/api/v1/devices/d1/events",
            None,
            ALL,
        ),
        row(
            "get",
            "/api/v1/devices/{id}/telemetry",
            "/api/v1/devices/d1/telemetry",
            None,
            ALL,
        ),
        row(
            "get",
            "/api/v1/devices/{id}/stream",
            "/api/v1/devices/d1/stream",
            None,
            ALL,
        ),
        row("get", "/api/v1/firmware", "/api/v1/firmware", None, ALL),
        row(
            "post",
            "/api/v1/firmware",
            "/api/v1/firmware?model=thermo&version=3.0.0",
            Some(json!({"image": "bytes"})),
            WRITERS,
        ),
        row(
            "get",
            "/api/v1/firmware/{id}/download",
            "/api/v1/firmware/thermo@1.0.0/download",
            None,
            ALL,
        ),
        row(
            "get",
            "/api/v1/firmware/{id}",
            "/api/v1/firmware/thermo@1.0.0",
            None,
            ALL,
        ),
        row(
            "post",
            "/api/v1/firmware/{id}/release",
            "/api/v1/firmware/thermo@1.0.0/release",
            None,
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/firmware/{id}/deprecate",
            "/api/v1/firmware/thermo@0.9.0/deprecate",
            Some(json!({"reason": "old"})),
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/rollouts",
            "/api/v1/rollouts",
            Some(json!({"firmware_id": "thermo@1.0.0", "device_ids": ["d1"]})),
            WRITERS,
        ),
        row("get", "/api/v1/rollouts", "/api/v1/rollouts", None, ALL),
        row(
            "get",
            "/api/v1/rollouts/{id}",
            "/api/v1/rollouts/r1",
            None,
            ALL,
        ),
        row(
            "get",
            "/api/v1/rollouts/{id}/devices",
            "/api/v1/rollouts/r1/devices",
            None,
            ALL,
        ),
        row(
            "post",
            "/api/v1/rollouts/{id}/start",
            "/api/v1/rollouts/r1/start",
            None,
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/rollouts/{id}/pause",
            "/api/v1/rollouts/r1/pause",
            None,
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/rollouts/{id}/resume",
            "/api/v1/rollouts/r1/resume",
            None,
            WRITERS,
        ),
        row(
            "post",
            "/api/v1/rollouts/{id}/abort",
            "/api/v1/rollouts/r1/abort",
            None,
            WRITERS,
        ),
        row("get", "/api/v1/stream", "/api/v1/stream", None, ALL),
        row(
            "post",
            "/api/v1/provisioning-keys",
            "/api/v1/provisioning-keys",
            Some(json!({"name": "line 3", "max_uses": 5})),
            WRITERS,
        ),
        row(
            "get",
            "/api/v1/provisioning-keys/{id}",
            "/api/v1/provisioning-keys/k1",
            None,
            ALL,
        ),
        row(
            "post",
            "/api/v1/provisioning-keys/{id}/revoke",
            "/api/v1/provisioning-keys/k1/revoke",
            None,
            WRITERS,
        ),
        // Decommissioning last: the other rows need the device.
        row(
            "delete",
            "/api/v1/devices/{id}",
            "/api/v1/devices/d1",
            None,
            WRITERS,
        ),
    ]
}

/// Operations that take no user token: public, or authenticated by a device token.
const NOT_ROLE_BASED: &[&str] = &[
    "get /health",
    "get /ready",
    "get /metrics",
    "get /openapi.json",
    "get /docs/",
    "post /api/v1/auth/login",
    "post /api/v1/auth/refresh",
    "post /api/v1/devices/{id}/telemetry",
    "post /api/devices/data/upload",
    "get /api/v1/firmware/signing-key",
    // The provisioning key in the body is the credential.
    "post /api/v1/provision",
    // The broker's shared secret is the credential; a user's token is refused (broker_auth.rs).
    "post /api/v1/broker/authenticate",
    "post /api/v1/broker/authorize",
];

/// The status only: streams answer 200 at once and never end, so the body is not read.
async fn status_of(
    platform: &Platform,
    method: &str,
    path: &str,
    token: &str,
    body: &Option<Value>,
) -> StatusCode {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let body = match body {
        Some(body) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    platform
        .router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_is_allowed_or_denied_per_operation() {
    let platform = Platform::start().await;
    let admin = platform.token("acme", "ann", Role::Admin);
    // Resources for the rows to act on.
    let (status, _) = platform.create(&admin, "d1").await;
    assert_eq!(status, StatusCode::CREATED);
    for id in ["thermo@1.0.0", "thermo@0.9.0"] {
        platform
            .bus
            .firmware()
            .execute(
                id,
                FirmwareCommand::Register {
                    firmware_id: FirmwareId::parse(id).unwrap(),
                    tenant: TenantId::parse("acme").unwrap(),
                    sha256: "cd".repeat(32),
                    size_bytes: 10,
                    storage_key: format!("sha256/{}", "cd".repeat(32)),
                    compatible_models: vec![],
                    notes: String::new(),
                    at: Utc::now(),
                },
                &CommandMetadata::new("test"),
            )
            .await
            .unwrap();
    }
    let (status, user) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &admin,
            Some(json!({"username": "target", "password": "long enough pw", "roles": ["viewer"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let user_id = user["user_id"].as_str().unwrap().to_string();
    let rows = matrix(&user_id);

    // The rows cover every documented operation that a user token guards.
    let document = fleetlog_api::openapi_document();
    for (path, item) in &document.paths.paths {
        let item = serde_json::to_value(item).unwrap();
        for method in item.as_object().unwrap().keys() {
            let key = format!("{method} {path}");
            let covered = rows
                .iter()
                .any(|(m, p, ..)| *m == method && *p == path.as_str());
            assert!(
                covered || NOT_ROLE_BASED.contains(&key.as_str()),
                "{key} has no row in the role matrix"
            );
        }
    }

    for (method, _, path, body, allowed) in &rows {
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let token = platform.token("acme", &format!("{role:?}").to_lowercase(), role);
            let status = status_of(&platform, method, path, &token, body).await;
            if allowed.contains(&role) {
                assert!(
                    status != StatusCode::FORBIDDEN && status != StatusCode::UNAUTHORIZED,
                    "{role:?} should be allowed {method} {path}, got {status}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{role:?} should be denied {method} {path}"
                );
            }
        }
        // Without a token nothing is allowed.
        let status = status_of(&platform, method, path, "not-a-token", body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
}
