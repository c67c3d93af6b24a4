//! Firmware catalogue and rollout routes: roles, tenants, and the checks a rollout plan gets
//! before the Rollout aggregate sees it.

mod common;

use axum::http::{Method, StatusCode};
use chrono::Utc;
use common::Platform;
use fleetlog_commands::CommandMetadata;
use fleetlog_domain::firmware::{FirmwareCommand, FirmwareId};
use fleetlog_domain::user::Role;
use fleetlog_domain::TenantId;
use serde_json::{json, Value};

/// Registers an image the way the upload route will, through the write side.
async fn register_firmware(platform: &Platform, tenant: &str, id: &str) -> i64 {
    let firmware_id = FirmwareId::parse(id).unwrap();
    let command = FirmwareCommand::Register {
        firmware_id: firmware_id.clone(),
        tenant: TenantId::parse(tenant).unwrap(),
        sha256: "ab".repeat(32),
        size_bytes: 1024,
        storage_key: format!("sha256/{}", "ab".repeat(32)),
        compatible_models: vec![],
        notes: "test image".into(),
        at: Utc::now(),
    };
    let committed = platform
        .bus
        .firmware()
        .execute(id, command, &CommandMetadata::new("test"))
        .await
        .unwrap();
    committed.global_position.unwrap()
}

async fn device(platform: &Platform, token: &str, id: &str, model: &str) -> i64 {
    let (status, created) = platform
        .call(
            Method::POST,
            "/api/v1/devices",
            token,
            Some(json!({"device_id": id, "name": id, "model": model})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["global_position"].as_i64().unwrap()
}

fn position(body: &Value) -> i64 {
    body["global_position"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_is_per_tenant_and_only_writers_release() {
    let platform = Platform::start().await;
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let operator = platform.token("acme", "otto", Role::Operator);
    let stranger = platform.token("globex", "gus", Role::Admin);
    // Read-your-writes waits for the caller's own tenant's event only.
    let ours = register_firmware(&platform, "acme", "thermo@1.2.0").await;
    register_firmware(&platform, "globex", "thermo@9.0.0").await;

    let (status, list) = platform
        .call(
            Method::GET,
            &format!("/api/v1/firmware?min_position={ours}"),
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["firmware_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["thermo@1.2.0"]);
    assert_eq!(list[0]["status"], "draft");
    assert_eq!(list[0]["version"], "1.2.0");
    let (status, _) = platform
        .call(Method::GET, "/api/v1/firmware/thermo@9.0.0", &viewer, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = platform
        .call(Method::GET, "/api/v1/firmware/not-an-id", &viewer, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let release = "/api/v1/firmware/thermo@1.2.0/release";
    let (status, _) = platform.call(Method::POST, release, &viewer, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = platform.call(Method::POST, release, &stranger, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, released) = platform.call(Method::POST, release, &operator, None).await;
    assert_eq!(status, StatusCode::OK, "{released}");
    let (status, again) = platform.call(Method::POST, release, &operator, None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{again}");
    let (status, shown) = platform
        .call(
            Method::GET,
            &format!(
                "/api/v1/firmware/thermo@1.2.0?min_position={}",
                position(&released)
            ),
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["status"], "released");

    let deprecate = "/api/v1/firmware/thermo@1.2.0/deprecate";
    let (status, _) = platform
        .call(
            Method::POST,
            deprecate,
            &operator,
            Some(json!({"reason": " "})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = platform
        .call(Method::POST, deprecate, &operator, Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = platform
        .call(
            Method::POST,
            deprecate,
            &operator,
            Some(json!({"reason": "bricks sensors"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_are_planned_followed_and_steered() {
    let platform = Platform::start().await;
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let operator = platform.token("acme", "otto", Role::Operator);
    let stranger = platform.token("globex", "gus", Role::Admin);
    register_firmware(&platform, "acme", "thermo@2.0.0").await;
    register_firmware(&platform, "acme", "thermo@2.1.0").await;
    device(&platform, &stranger, "theirs", "thermo").await;
    for id in ["d1", "d2", "d3", "d4"] {
        device(&platform, &operator, id, "thermo").await;
    }
    let last = device(&platform, &operator, "gw1", "gateway").await;
    platform
        .call(
            Method::POST,
            "/api/v1/firmware/thermo@2.0.0/release",
            &operator,
            None,
        )
        .await;
    // Wait until the devices model has the tenant's last device (one worker applies the
    // stream in order, so the others are there too): plans resolve targets from it.
    platform
        .call(
            Method::GET,
            &format!("/api/v1/devices?min_position={last}"),
            &viewer,
            None,
        )
        .await;

    let plan = |firmware: &str, targets: Value| {
        let mut body = json!({"firmware_id": firmware, "waves": [25, 100],
            "success_threshold": 50, "error_threshold": 50, "device_timeout_secs": 600});
        body.as_object_mut()
            .unwrap()
            .extend(targets.as_object().unwrap().clone());
        body
    };
    let refused: Vec<(&str, Value, Value, StatusCode, &str)> = vec![
        (
            "viewer",
            json!(viewer),
            plan("thermo@2.0.0", json!({"device_ids": ["d1"]})),
            StatusCode::FORBIDDEN,
            "role",
        ),
        (
            "draft image",
            json!(operator),
            plan("thermo@2.1.0", json!({"device_ids": ["d1"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not released",
        ),
        (
            "another model",
            json!(operator),
            plan("thermo@2.0.0", json!({"device_ids": ["d1", "gw1"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "gw1",
        ),
        (
            "another tenant's device",
            json!(operator),
            plan("thermo@2.0.0", json!({"device_ids": ["d1", "theirs"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no active device of this tenant: theirs",
        ),
        (
            "both target kinds",
            json!(operator),
            plan(
                "thermo@2.0.0",
                json!({"device_ids": ["d1"], "filter": {"model": "thermo"}}),
            ),
            StatusCode::BAD_REQUEST,
            "exactly one",
        ),
        (
            "another tenant's image",
            json!(stranger),
            plan("thermo@2.0.0", json!({"device_ids": ["theirs"]})),
            StatusCode::NOT_FOUND,
            "firmware",
        ),
        (
            "waves not reaching 100",
            json!(operator),
            json!({"firmware_id": "thermo@2.0.0", "device_ids": ["d1"], "waves": [50]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "",
        ),
        (
            "waves as percentages and as sizes",
            json!(operator),
            json!({"firmware_id": "thermo@2.0.0", "device_ids": ["d1"], "waves": [100],
                   "wave_sizes": [1]}),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            "an empty wave size",
            json!(operator),
            json!({"firmware_id": "thermo@2.0.0", "device_ids": ["d1", "d2"],
                   "wave_sizes": [1, 0]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "device counts of at least 1",
        ),
    ];
    for (case, token, body, expected, detail) in refused {
        let (status, problem) = platform
            .call(
                Method::POST,
                "/api/v1/rollouts",
                token.as_str().unwrap(),
                Some(body),
            )
            .await;
        assert_eq!(status, expected, "{case}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(detail),
            "{case}: {problem}"
        );
    }

    let (status, created) = platform
        .call(
            Method::POST,
            "/api/v1/rollouts",
            &operator,
            Some(plan(
                "thermo@2.0.0",
                json!({"rollout_id": "r-1", "filter": {"model": "thermo"}}),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, taken) = platform
        .call(
            Method::POST,
            "/api/v1/rollouts",
            &operator,
            Some(plan(
                "thermo@2.0.0",
                json!({"rollout_id": "r-1", "device_ids": ["d1"]}),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");

    let (status, rollout) = platform
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/r-1?min_position={}", position(&created)),
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rollout}");
    assert_eq!(rollout["target_count"], 4);
    assert_eq!(rollout["status"], "created");
    assert_eq!(rollout["device_counts"], json!({"queued": 4}));
    assert_eq!(rollout["waves"], json!([25, 100]));
    assert_eq!(rollout["wave_sizes"], json!([1, 3]));

    let (status, page) = platform
        .call(
            Method::GET,
            "/api/v1/rollouts/r-1/devices?limit=3",
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    assert_eq!(page["next_after"], "d3");
    for (method, path) in [
        (Method::GET, "/api/v1/rollouts/r-1"),
        (Method::GET, "/api/v1/rollouts/r-1/devices"),
        (Method::POST, "/api/v1/rollouts/r-1/abort"),
    ] {
        let (status, _) = platform.call(method, path, &stranger, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, list) = platform
        .call(Method::GET, "/api/v1/rollouts", &stranger, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!([]));

    let (status, _) = platform
        .call(Method::POST, "/api/v1/rollouts/r-1/start", &viewer, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for step in ["start", "pause", "resume"] {
        let (status, body) = platform
            .call(
                Method::POST,
                &format!("/api/v1/rollouts/r-1/{step}"),
                &operator,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{step}: {body}");
    }
    let (status, _) = platform
        .call(Method::POST, "/api/v1/rollouts/r-1/resume", &operator, None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, aborted) = platform
        .call(
            Method::POST,
            "/api/v1/rollouts/r-1/abort",
            &operator,
            Some(json!({"reason": "field reports"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{aborted}");
    let (_, rollout) = platform
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/r-1?min_position={}", position(&aborted)),
            &viewer,
            None,
        )
        .await;
    assert_eq!(rollout["status"], "aborted");
    // No device was sent the update (no rollout manager runs here): all four are canceled.
    assert_eq!(rollout["canceled"], 4, "{rollout}");
    assert_eq!(rollout["device_counts"], json!({"canceled": 4}));
    assert_eq!(rollout["last_decision"]["decision"], "abort");
    assert_eq!(rollout["last_decision"]["reason"], "field reports");

    // Once r-1 ended, its devices may be targeted again: a canary of one device, then the
    // rest, waves by size.
    let (status, canary) = platform
        .call(
            Method::POST,
            "/api/v1/rollouts",
            &operator,
            Some(
                json!({"rollout_id": "r-canary", "firmware_id": "thermo@2.0.0",
                        "filter": {"model": "thermo"}, "wave_sizes": [1]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{canary}");
    let (status, canary) = platform
        .call(
            Method::GET,
            &format!(
                "/api/v1/rollouts/r-canary?min_position={}",
                position(&canary)
            ),
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{canary}");
    assert_eq!(canary["waves"], json!([]));
    assert_eq!(canary["wave_sizes"], json!([1, 3]));
    let (status, page) = platform
        .call(
            Method::GET,
            "/api/v1/rollouts/r-canary/devices",
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let waves: Vec<i64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["wave"].as_i64().unwrap())
        .collect();
    assert_eq!(waves, [0, 1, 1, 1]);
    // A deprecated image starts nothing new.
    platform
        .call(
            Method::POST,
            "/api/v1/firmware/thermo@2.0.0/deprecate",
            &operator,
            Some(json!({"reason": "recalled"})),
        )
        .await;
    let (status, problem) = platform
        .call(
            Method::POST,
            "/api/v1/rollouts",
            &operator,
            Some(plan("thermo@2.0.0", json!({"device_ids": ["d1"]}))),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem["detail"].as_str().unwrap().contains("deprecated"));
}
