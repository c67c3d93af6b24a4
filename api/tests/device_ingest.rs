//! HTTP ingest with device tokens: both paths, the MQTT parser's rules and reasons, partial
//! acceptance, idempotent retries, and who may not post.

mod common;

use axum::http::{header, Method, StatusCode};
use common::Platform;
use fleetlog_domain::user::Role;
use serde_json::{json, Value};

const JSON: (&str, &str) = ("content-type", "application/json");

async fn device(platform: &Platform, id: &str) -> String {
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, created) = platform.create(&operator, id).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["device_token"].as_str().unwrap().to_string()
}

async fn upload(
    platform: &Platform,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    platform
        .send(Method::POST, path, headers, body.to_string())
        .await
}

async fn telemetry_events(platform: &Platform, id: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'TelemetryRecorded'",
    )
    .bind(id)
    .fetch_one(&platform.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_post_telemetry_with_their_token() {
    let platform = Platform::start().await;
    let token = device(&platform, "d1").await;
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());

    let (status, _, accepted) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[auth, JSON],
        json!({
            "sensors": [{"sensor_name": "temperature", "value": 21.5, "unit": "celsius"}],
            "location": {"latitude": 48.1, "longitude": 11.6},
            "status": {"battery": 90}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    assert_eq!(accepted["outcome"], "accepted");
    assert_eq!(accepted["readings"], 1);
    let position = accepted["global_position"].as_i64().unwrap();

    // Readable through the projections, by the tenant's users.
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let (status, device) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1?min_position={position}"),
            &viewer,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["sensors"]["temperature"]["value"], 21.5);
    assert_eq!(device["reported"]["battery"], 90);
    assert_eq!(device["online"], true);

    // Simple format, with a reading the rules drop: the rest is kept and the answer says why.
    let (status, _, partial) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[("x-device-token", token.as_str())],
        json!({"humidity": 60, "Bad-Name": 1, "note": "hot"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{partial}");
    assert_eq!(partial["outcome"], "partially_accepted");
    assert_eq!(partial["readings"], 1);
    let dropped: Vec<&str> = partial["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(dropped, ["Bad-Name", "note"]);
    assert!(partial["dropped"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("must match"));

    // Nothing valid, or not JSON: refused with the parser's reason, nothing recorded.
    let before = telemetry_events(&platform, "d1").await;
    let (status, headers, problem) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[auth, JSON],
        json!({"Temp": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("no valid reading"));
    let (status, _, problem) = platform
        .send(
            Method::POST,
            "/api/v1/devices/d1/telemetry",
            &[auth],
            "{\"t\": ",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let big = format!("{{\"t\": 1, \"pad\": \"{}\"}}", "x".repeat(70_000));
    let (status, _, _) = platform
        .send(Method::POST, "/api/v1/devices/d1/telemetry", &[auth], big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(telemetry_events(&platform, "d1").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_devices_own_token_is_accepted() {
    let platform = Platform::start_with(false).await;
    let token = device(&platform, "d1").await;
    let other_token = device(&platform, "d2").await;
    let admin = platform.token("acme", "ann", Role::Admin);
    let body = json!({"temperature": 20});
    let wrong = "0".repeat(64);
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        ("no credentials".into(), vec![]),
        (
            "a user's JWT".into(),
            vec![("authorization", format!("Bearer {admin}"))],
        ),
        (
            "another device's token".into(),
            vec![("authorization", format!("Bearer {other_token}"))],
        ),
        (
            "a wrong token".into(),
            vec![("x-device-token", wrong.clone())],
        ),
    ];
    for (case, headers) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, response_headers, problem) = upload(
            &platform,
            "/api/v1/devices/d1/telemetry",
            &headers,
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {problem}");
        assert!(
            response_headers.contains_key(header::WWW_AUTHENTICATE),
            "{case}"
        );
    }
    let bearer = format!("Bearer {token}");
    let (status, _, _) = upload(
        &platform,
        "/api/v1/devices/unknown/telemetry",
        &[("authorization", bearer.as_str())],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(telemetry_events(&platform, "d1").await, 0);

    // A decommissioned device's token stops working.
    let (status, _) = platform
        .call(Method::DELETE, "/api/v1/devices/d1", &admin, None)
        .await;
    assert!(status.is_success());
    let (status, _, _) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[("authorization", bearer.as_str())],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_an_idempotency_key_are_recorded_once() {
    let platform = Platform::start_with(false).await;
    let token = device(&platform, "d1").await;
    let headers = [
        ("x-device-token", token.as_str()),
        ("idempotency-key", "batch-17"),
    ];
    let body = json!({"temperature": 20});
    let (status, _, first) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, _, retry) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retry["version"], first["version"]);
    assert_eq!(telemetry_events(&platform, "d1").await, 1);
    // The same key with another body is no retry: refused, nothing recorded.
    let (status, _, reused) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &headers,
        json!({"temperature": 99}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{reused}");
    assert!(reused["detail"].as_str().unwrap().contains("another body"));
    assert_eq!(telemetry_events(&platform, "d1").await, 1);

    // Without a key or a timestamp, the same reading sent twice is two readings.
    let plain = [("x-device-token", token.as_str())];
    upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &plain,
        body.clone(),
    )
    .await;
    upload(&platform, "/api/v1/devices/d1/telemetry", &plain, body).await;
    assert_eq!(telemetry_events(&platform, "d1").await, 3);

    // A timestamped payload is the same fact however often it arrives.
    let stamped = json!({"temperature": 21, "timestamp": "2026-11-23T10:00:00Z"});
    upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &plain,
        stamped.clone(),
    )
    .await;
    upload(&platform, "/api/v1/devices/d1/telemetry", &plain, stamped).await;
    assert_eq!(telemetry_events(&platform, "d1").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compatibility_path_accepts_the_full_format() {
    let platform = Platform::start_with(false).await;
    let token = device(&platform, "d1").await;
    let full = json!({"sensors": [{"sensor_name": "temperature", "value": 19.0}]});
    let (status, _, by_header) = upload(
        &platform,
        "/api/devices/data/upload",
        &[
            ("x-device-token", token.as_str()),
            ("x-device-id", "d1"),
            JSON,
        ],
        full.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_header}");
    assert_eq!(by_header["device_id"], "d1");

    let mut with_id = full.clone();
    with_id["device_id"] = json!("d1");
    let (status, _, by_body) = upload(
        &platform,
        "/api/devices/data/upload",
        &[("x-device-token", token.as_str()), JSON],
        with_id,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{by_body}");
    assert_eq!(by_body["outcome"], "accepted");
    assert_eq!(telemetry_events(&platform, "d1").await, 2);

    let (status, _, problem) = upload(
        &platform,
        "/api/devices/data/upload",
        &[("x-device-token", token.as_str()), JSON],
        full,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["detail"].as_str().unwrap().contains("X-Device-Id"));
}

/// Desired and reported merge at any depth, `null` deletes a nested key, the delta holds only
/// the leaves that differ and compares numbers by value, in every view: live, as of now, and
/// the aggregate's own (in the desired document the device receives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_documents_merge_and_compare_by_value_in_every_view() {
    let platform = Platform::start().await;
    let token = device(&platform, "d1").await;
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());
    let operator = platform.token("acme", "otto", Role::Operator);
    for desired in [
        json!({"cfg": {"a": 1, "b": 2, "net": {"ssid": "x", "pw": "y"}}}),
        json!({"cfg": {"a": null, "net": {"pw": null}}}),
    ] {
        let (status, written) = platform
            .call(
                Method::PUT,
                "/api/v1/devices/d1/desired",
                &operator,
                Some(desired),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{written}");
    }
    for status in [
        json!({"cfg": {"b": 2.0, "net": {"ssid": "x", "rssi": -60}}}),
        json!({"cfg": {"net": {"rssi": null}}}),
    ] {
        let (code, _, accepted) = upload(
            &platform,
            "/api/v1/devices/d1/telemetry",
            &[auth, JSON],
            json!({"status": status}),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "{accepted}");
    }
    let last: i64 =
        sqlx::query_scalar("SELECT max(global_position) FROM events WHERE aggregate_id = 'd1'")
            .fetch_one(&platform.pool)
            .await
            .unwrap();
    let (_, live) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1?min_position={last}"),
            &operator,
            None,
        )
        .await;
    assert_eq!(
        live["desired"],
        json!({"cfg": {"b": 2, "net": {"ssid": "x"}}}),
        "{live}"
    );
    assert_eq!(
        live["reported"],
        json!({"cfg": {"b": 2.0, "net": {"ssid": "x"}}}),
        "{live}"
    );
    assert_eq!(live["delta"], json!({}), "{live}");
    let at = (chrono::Utc::now() + chrono::Duration::seconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, past) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1?at={at}"),
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{past}");
    assert_eq!(past, live);
}

/// Two readings of one sensor at one instant: in one message the second is dropped with its
/// reason; in two messages both are kept and the later one is the latest. An event stored
/// with both (before ingest dropped the second) shows its first in the history and as the
/// latest. The event, `/telemetry` and the latest value agree in every case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sensor_at_one_instant_reads_the_same_in_every_view() {
    use fleetlog_commands::CommandMetadata;
    use fleetlog_domain::device::{DeviceCommand, Reading};

    let platform = Platform::start().await;
    let token = device(&platform, "d1").await;
    let bearer = format!("Bearer {token}");
    let auth = ("authorization", bearer.as_str());
    let operator = platform.token("acme", "otto", Role::Operator);
    let instant = "2026-05-01T10:00:00Z";
    let (status, _, answer) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[auth, JSON],
        json!({"timestamp": instant, "sensors": [
            {"sensor_name": "temp", "value": 1.0},
            {"sensor_name": "temp", "value": 2.0},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "partially_accepted", "{answer}");
    assert!(
        answer.to_string().contains("came earlier in the message"),
        "{answer}"
    );
    let stored: Vec<Value> = sqlx::query_scalar(
        "SELECT payload -> 'TelemetryRecorded' -> 'readings' FROM events
          WHERE aggregate_id = 'd1' AND event_type = 'TelemetryRecorded'",
    )
    .fetch_all(&platform.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].as_array().unwrap().len(), 1, "{stored:?}");

    let views = |position: i64| {
        let platform = &platform;
        let operator = operator.clone();
        async move {
            let (_, device) = platform
                .call(
                    Method::GET,
                    &format!("/api/v1/devices/d1?min_position={position}"),
                    &operator,
                    None,
                )
                .await;
            let (_, history) = platform
                .call(
                    Method::GET,
                    "/api/v1/devices/d1/telemetry?sensor=temp&from=2026-05-01T00:00:00Z&to=2026-05-02T00:00:00Z",
                    &operator,
                    None,
                )
                .await;
            let values: Vec<f64> = history
                .as_array()
                .or_else(|| history["items"].as_array())
                .unwrap_or_else(|| panic!("{history}"))
                .iter()
                .map(|sample| sample["value"].as_f64().unwrap())
                .collect();
            (device["sensors"]["temp"]["value"].as_f64(), values)
        }
    };
    let position = answer["global_position"].as_i64().unwrap();
    assert_eq!(views(position).await, (Some(1.0), vec![1.0]));

    // A second message at the same instant: both kept, the later one latest and last.
    let (status, _, answer) = upload(
        &platform,
        "/api/v1/devices/d1/telemetry",
        &[auth, JSON],
        json!({"timestamp": instant, "sensors": [{"sensor_name": "temp", "value": 3.0}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let position = answer["global_position"].as_i64().unwrap();
    assert_eq!(views(position).await, (Some(3.0), vec![1.0, 3.0]));

    // An event holding both readings, as stored before ingest dropped the second.
    let later = chrono::DateTime::parse_from_rfc3339("2026-05-01T11:00:00Z")
        .unwrap()
        .to_utc();
    let both = |value| Reading {
        sensor: "temp".into(),
        value,
        unit: None,
        timestamp: Some(later),
    };
    let committed = platform
        .bus
        .devices()
        .execute(
            "d1",
            DeviceCommand::RecordTelemetry {
                digest: "legacy".into(),
                redelivery: false,
                readings: vec![both(4.0), both(5.0)],
                device_time: Some(later),
                received_at: later,
                location: None,
                status: Default::default(),
            },
            &CommandMetadata::new("device:d1"),
        )
        .await
        .unwrap();
    let position = committed.global_position.unwrap();
    assert_eq!(views(position).await, (Some(4.0), vec![1.0, 3.0, 4.0]));
}
