//! Device endpoints through the real router, with the real read path behind them (Postgres,
//! relay, JetStream, projection workers): roles, tenant isolation, time travel, stable
//! pagination, commands.

mod common;

use std::time::{Duration, Instant};

use axum::http::{header, Method, StatusCode};
use chrono::Utc;
use common::Platform;
use fleetlog_domain::user::Role;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_tenants_decide_who_sees_and_changes_a_device() {
    let platform = Platform::start().await;
    let admin = platform.token("acme", "ann", Role::Admin);
    let operator = platform.token("acme", "otto", Role::Operator);
    let viewer = platform.token("acme", "vic", Role::Viewer);
    let stranger = platform.token("globex", "gus", Role::Admin);

    let (status, created) = platform.create(&operator, "d1").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["device_id"], "d1");
    assert_eq!(created["device_token"].as_str().unwrap().len(), 64);
    assert!(created["global_position"].is_i64());
    let (status, _) = platform.create(&viewer, "d2").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, taken) = platform.create(&stranger, "d1").await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    platform
        .wait_for("d1", created["version"].as_u64().unwrap())
        .await;

    for token in [&admin, &operator, &viewer] {
        let (status, device) = platform
            .call(Method::GET, "/api/v1/devices/d1", token, None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(device["name"], "Device d1");
        assert_eq!(device["tenant"], "acme");
        assert!(device.get("credential_hash").is_none());
    }
    let (status, problem) = platform
        .call(Method::GET, "/api/v1/devices/d1", &stranger, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["status"], 404);
    let (status, page) = platform
        .call(Method::GET, "/api/v1/devices", &stranger, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"], json!([]));
    for (method, path, body) in [
        (
            Method::PATCH,
            "/api/v1/devices/d1",
            Some(json!({"name": "mine now"})),
        ),
        (
            Method::PUT,
            "/api/v1/devices/d1/desired",
            Some(json!({"interval": 5})),
        ),
        (
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "reboot"})),
        ),
        (Method::DELETE, "/api/v1/devices/d1", None),
    ] {
        let (status, _) = platform
            .call(method.clone(), path, &stranger, body.clone())
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {path} from another tenant"
        );
        let (status, _) = platform.call(method.clone(), path, &viewer, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path} as viewer");
    }

    let (status, written) = platform
        .call(
            Method::PUT,
            "/api/v1/devices/d1/desired",
            &operator,
            Some(json!({"interval": 30})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{written}");
    platform
        .wait_for("d1", written["version"].as_u64().unwrap())
        .await;
    let (_, device) = platform
        .call(Method::GET, "/api/v1/devices/d1", &viewer, None)
        .await;
    assert_eq!(device["desired"], json!({"interval": 30}));
    assert_eq!(device["delta"], json!({"interval": 30}));

    let (status, accepted) = platform
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            &operator,
            Some(json!({"name": "reboot", "params": {"delay": 1}})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let command_id = accepted["command_id"].as_str().unwrap();
    platform
        .wait_for("d1", accepted["version"].as_u64().unwrap())
        .await;
    let path = format!("/api/v1/devices/d1/commands/{command_id}");
    let (status, command) = platform.call(Method::GET, &path, &viewer, None).await;
    assert_eq!(status, StatusCode::OK, "{command}");
    assert_eq!(command["status"], "pending");
    assert_eq!(command["params"], json!({"delay": 1}));
    let (status, _) = platform.call(Method::GET, &path, &stranger, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, refused) = platform
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            &operator,
            Some(json!({"name": "Reboot!"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused["detail"].as_str().unwrap().contains("command name"));

    let (status, gone) = platform
        .call(Method::DELETE, "/api/v1/devices/d1", &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // Deleting again is not an error: the same version, nothing written.
    let (status, again) = platform
        .call(Method::DELETE, "/api/v1/devices/d1", &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["version"], gone["version"]);
    assert!(again["global_position"].is_null());
    // The list shows active devices unless asked otherwise; the id stays taken.
    let list = |query: &str| {
        format!(
            "/api/v1/devices?min_position={}&{query}",
            gone["global_position"]
        )
    };
    let (_, active) = platform
        .call(Method::GET, &list("lifecycle=active"), &admin, None)
        .await;
    assert!(active["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["device_id"] != "d1"));
    let (_, default) = platform.call(Method::GET, &list(""), &admin, None).await;
    assert_eq!(default["items"], active["items"]);
    let (_, retired) = platform
        .call(Method::GET, &list("lifecycle=decommissioned"), &admin, None)
        .await;
    assert_eq!(retired["items"][0]["device_id"], "d1", "{retired}");
    let (status, _) = platform
        .call(Method::GET, &list("lifecycle=gone"), &admin, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = platform.create(&admin, "d1").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = platform
        .call(
            Method::PATCH,
            "/api/v1/devices/d1",
            &admin,
            Some(json!({"name": "after"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_can_be_read_as_it_was() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let before_registration = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    platform.create(&operator, "d1").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = platform
        .call(
            Method::PATCH,
            "/api/v1/devices/d1",
            &operator,
            Some(json!({"name": "Renamed"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let at = |instant: chrono::DateTime<Utc>| {
        format!(
            "/api/v1/devices/d1?at={}",
            instant
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .replace('+', "%2B")
        )
    };
    let (status, past) = platform
        .call(Method::GET, &at(between), &operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{past}");
    assert_eq!(past["name"], "Device d1");
    assert!(past.get("credential_hash").is_none());
    let (status, written) = platform
        .call(
            Method::PUT,
            "/api/v1/devices/d1/desired",
            &operator,
            Some(json!({"cfg": {"interval": 30, "mode": "eco"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{written}");
    platform
        .wait_for("d1", written["version"].as_u64().unwrap())
        .await;
    // The past view is the live view's shape, as of that instant: the same fields, the same
    // values once nothing happened since.
    let (_, live) = platform
        .call(Method::GET, "/api/v1/devices/d1", &operator, None)
        .await;
    let (status, now) = platform
        .call(Method::GET, &at(Utc::now()), &operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert_eq!(now["name"], "Renamed");
    assert_eq!(now, live);
    assert_eq!(now["lifecycle"], "active");
    assert_eq!(
        now["delta"],
        json!({"cfg": {"interval": 30, "mode": "eco"}})
    );
    let keys = |view: &Value| {
        let mut keys: Vec<String> = view.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&past), keys(&live));
    for field in ["sensors", "registered_at", "updated_at", "open_commands"] {
        assert!(!past[field].is_null(), "{field}: {past}");
    }
    assert_eq!(past["desired"], json!({}));
    let (status, _) = platform
        .call(Method::GET, &at(before_registration), &operator, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem) = platform
        .call(
            Method::GET,
            "/api/v1/devices/d1?at=yesterday",
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["status"], 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_stay_stable_while_devices_are_added() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let mut last_version = 0;
    for n in 10..35 {
        let (_, created) = platform.create(&operator, &format!("d{n}")).await;
        last_version = created["version"].as_u64().unwrap();
    }
    platform.wait_for("d34", last_version).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut inserted = 0;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/devices?limit=10&cursor={cursor}"),
            None => "/api/v1/devices?limit=10".to_string(),
        };
        let (status, page) = platform.call(Method::GET, &path, &operator, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for item in page["items"].as_array().unwrap() {
            seen.push(item["device_id"].as_str().unwrap().to_string());
        }
        // Devices added between pages, before and after the current position.
        for id in [format!("a{inserted}"), format!("z{inserted}")] {
            let (_, created) = platform.create(&operator, &id).await;
            platform
                .wait_for(&id, created["version"].as_u64().unwrap())
                .await;
        }
        inserted += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no device twice: {seen:?}");
    for n in 10..35 {
        assert!(
            seen.contains(&format!("d{n}")),
            "d{n} missing from {seen:?}"
        );
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");

    let (status, filtered) = platform
        .call(
            Method::GET,
            "/api/v1/devices?tag=lab&q=DEVICE%20d2&limit=200",
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = filtered["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        (20..30)
            .map(|n| format!("d{n}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    for bad in [
        "limit=0",
        "limit=abc",
        "sort=color",
        "cursor=zz",
        "color=red",
    ] {
        let (status, problem) = platform
            .call(
                Method::GET,
                &format!("/api/v1/devices?{bad}"),
                &operator,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {problem}");
        assert_eq!(problem["status"], 400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_for_their_writes_and_writes_can_be_conditional() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (_, created) = platform.create(&operator, "d1").await;
    let position = created["global_position"].as_i64().unwrap();

    // No polling: the query itself waits for the projection to reach the write.
    let path = format!("/api/v1/devices/d1?min_position={position}");
    let (status, headers, device) = platform
        .call_with(Method::GET, &path, &operator, None, &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["name"], "Device d1");
    let etag = headers[header::ETAG].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", created["version"]));

    let rename = |name: &str| Some(json!({"name": name}));
    let (status, _, renamed) = platform
        .call_with(
            Method::PATCH,
            "/api/v1/devices/d1",
            &operator,
            rename("First"),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    // The same tag again is stale now: 412, nothing written.
    let (status, _, stale) = platform
        .call_with(
            Method::PATCH,
            "/api/v1/devices/d1",
            &operator,
            rename("Second"),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{stale}");
    let list = format!(
        "/api/v1/devices?min_position={}",
        renamed["global_position"]
    );
    let (_, page) = platform.call(Method::GET, &list, &operator, None).await;
    assert_eq!(page["items"][0]["name"], "First");
    let (status, _, _) = platform
        .call_with(
            Method::PATCH,
            "/api/v1/devices/d1",
            &operator,
            rename("x"),
            &[("if-match", "soon")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = platform
        .call(
            Method::GET,
            "/api/v1/devices/d1?min_position=999999",
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A user event for a user of `tenant`, recorded straight through the bus (as
/// `fleetlog user create` does): its global position.
async fn register_user(platform: &Platform, tenant: &str, username: &str) -> i64 {
    let tenant = fleetlog_domain::TenantId::parse(tenant).unwrap();
    let user = fleetlog_domain::user::UserCommand::Register {
        tenant: tenant.clone(),
        username: username.into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
        roles: vec![Role::Viewer],
        at: chrono::Utc::now(),
    };
    let user_id = fleetlog_domain::UserId::for_username(&tenant, username);
    platform
        .bus
        .users()
        .execute(
            user_id.as_str(),
            user,
            &fleetlog_commands::CommandMetadata::new("test"),
        )
        .await
        .unwrap()
        .global_position
        .unwrap()
}

/// With no worker running, the users model lags: a query waiting for one of its events answers
/// 503 with `Retry-After` after the bounded wait. Positions that model will never apply for the
/// caller answer at once, and so does every device query: the device models are written with
/// the events, so they never lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_lags_answers_503_with_retry_after() {
    let platform = Platform::start_with(false).await;
    let admin = platform.token("acme", "ada", Role::Admin);
    let user_event = register_user(&platform, "acme", "vera").await;
    let started = Instant::now();
    let (status, headers, problem) = platform
        .call_with(
            Method::GET,
            &format!("/api/v1/users?min_position={user_event}"),
            &admin,
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(started.elapsed() >= fleetlog_api::consistency::MAX_WAIT);

    // Positions the users model will never apply for this caller answer at once, while it
    // still lags: another tenant's user event (nothing about it shows) and an event of
    // another aggregate type (a device's).
    let theirs = register_user(&platform, "globex", "gina").await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, created) = platform.create(&operator, "d1").await;
    assert_eq!(status, StatusCode::CREATED);
    let device_event = created["global_position"].as_i64().unwrap();
    for position in [theirs, device_event] {
        let path = format!("/api/v1/users?min_position={position}");
        let started = Instant::now();
        let (status, body) = platform.call(Method::GET, &path, &admin, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path} waited");
    }
    for path in [
        format!("/api/v1/devices/d1?min_position={device_event}"),
        format!("/api/v1/devices?min_position={device_event}"),
        format!("/api/v1/devices/d1/telemetry?min_position={device_event}"),
        format!("/api/v1/devices?min_position={user_event}"),
    ] {
        let started = Instant::now();
        let (status, body) = platform.call(Method::GET, &path, &operator, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert!(started.elapsed() < Duration::from_secs(2), "{path} waited");
    }
}

/// The values of a raw telemetry answer, in its order.
fn reading_values(raw: &Value) -> Vec<f64> {
    raw.as_array()
        .unwrap()
        .iter()
        .map(|s| s["value"].as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_telemetry_of_a_device() {
    use fleetlog_commands::CommandMetadata;
    use fleetlog_domain::device::{DeviceCommand, Reading};

    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let stranger = platform.token("globex", "gus", Role::Admin);
    platform.create(&operator, "d1").await;
    let start = chrono::DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let mut position = 0;
    for n in 0..6_i64 {
        let at = start + chrono::Duration::seconds(10 * n);
        let telemetry = DeviceCommand::RecordTelemetry {
            digest: format!("m{n}"),
            redelivery: true,
            readings: vec![Reading {
                sensor: "temperature".into(),
                value: (n + 1) as f64,
                unit: Some("celsius".into()),
                timestamp: Some(at),
            }],
            device_time: Some(at),
            received_at: at,
            location: None,
            status: Default::default(),
        };
        let committed = platform
            .bus
            .devices()
            .execute("d1", telemetry, &CommandMetadata::new("device:d1"))
            .await
            .unwrap();
        position = committed.global_position.unwrap();
    }

    let range = "from=2026-03-01T12:00:00Z&to=2026-03-01T13:00:00Z";
    let path =
        format!("/api/v1/devices/d1/telemetry?{range}&sensor=temperature&min_position={position}");
    let (status, raw) = platform.call(Method::GET, &path, &operator, None).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let values = reading_values(&raw);
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let path = format!("/api/v1/devices/d1/telemetry?{range}&bucket_secs=30");
    let (status, buckets) = platform.call(Method::GET, &path, &operator, None).await;
    assert_eq!(status, StatusCode::OK, "{buckets}");
    assert_eq!(
        buckets,
        json!([
            {"sensor": "temperature", "bucket": "2026-03-01T12:00:00Z", "min": 1.0, "max": 3.0, "avg": 2.0, "count": 3},
            {"sensor": "temperature", "bucket": "2026-03-01T12:00:30Z", "min": 4.0, "max": 6.0, "avg": 5.0, "count": 3}
        ])
    );
    let (status, _) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1/telemetry?{range}&bucket_secs=0"),
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1/telemetry?{range}"),
            &stranger,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Behind the telemetry retention's horizon, readings are no longer part of the model,
    // whether the sweep has deleted them yet or not.
    sqlx::query("INSERT INTO telemetry_retention (kept_from) VALUES ('2026-03-01T12:00:25Z')")
        .execute(&platform.pool)
        .await
        .unwrap();
    let path = format!("/api/v1/devices/d1/telemetry?{range}&sensor=temperature");
    let (status, raw) = platform.call(Method::GET, &path, &operator, None).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    let values = reading_values(&raw);
    assert_eq!(values, [4.0, 5.0, 6.0]);
    let path = format!("/api/v1/devices/d1/telemetry?{range}&bucket_secs=30");
    let (_, buckets) = platform.call(Method::GET, &path, &operator, None).await;
    assert_eq!(
        buckets,
        json!([
            {"sensor": "temperature", "bucket": "2026-03-01T12:00:30Z", "min": 4.0, "max": 6.0, "avg": 5.0, "count": 3}
        ])
    );

    // History, paged, with who did what; the credential hash is never shown.
    let (status, first) = platform
        .call(
            Method::GET,
            "/api/v1/devices/d1/events?limit=3",
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let types: Vec<&str> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "DeviceRegistered",
            "DeviceCredentialsRotated",
            "DeviceCameOnline"
        ]
    );
    assert!(first["items"][1]["payload"]["DeviceCredentialsRotated"]
        .get("secret_hash")
        .is_none());
    assert!(first["items"][0]["actor"]
        .as_str()
        .unwrap()
        .starts_with("user:"));
    assert!(first["items"][0]["correlation_id"].is_string());
    let next = first["next_after"].as_i64().unwrap();
    let (_, rest) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1/events?after={next}&type=TelemetryRecorded"),
            &operator,
            None,
        )
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 6);
    assert!(rest["next_after"].is_null());
    let (status, _) = platform
        .call(Method::GET, "/api/v1/devices/d1/events", &stranger, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// An event stored by an older version with a NUL in a string (the events table is `json`,
/// which takes it; `jsonb` does not) still reads back in the history and as of an instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_as_of_read_old_events_holding_a_nul() {
    let platform = Platform::start_with(false).await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, created) = platform.create(&operator, "d1").await;
    assert_eq!(status, StatusCode::CREATED);
    let next = created["version"].as_i64().unwrap() + 1;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('device', 'd1', $1, 'StatusReported', '1.0',
                 '{\"StatusReported\":{\"status\":{\"note\":\"a\\u0000b\"},\"received_at\":\"2026-01-01T00:00:00Z\",\"digest\":null}}',
                 '{\"tenant\":\"acme\"}')",
    )
    .bind(next)
    .execute(&platform.pool)
    .await
    .unwrap();
    let (status, history) = platform
        .call(Method::GET, "/api/v1/devices/d1/events", &operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let items = history["items"].as_array().unwrap();
    assert_eq!(
        items.last().unwrap()["payload"]["StatusReported"]["status"]["note"],
        "a\u{0}b"
    );
    // An event after it: the past view passes the unstorable one over, as the live model does,
    // and goes on with the rest.
    let (status, renamed) = platform
        .call(
            Method::PATCH,
            "/api/v1/devices/d1",
            &operator,
            Some(json!({"name": "after the NUL"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    let at = encode_instant(Utc::now() + chrono::Duration::seconds(5));
    let (status, device) = platform
        .call(
            Method::GET,
            &format!("/api/v1/devices/d1?at={at}"),
            &operator,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{device}");
    assert_eq!(device["name"], "after the NUL", "{device}");
    assert!(device["reported"].get("note").is_none(), "{device}");
}

fn encode_instant(instant: chrono::DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Decommissioning a device closes its open commands: they answer "canceled" with the reason,
/// and the device counts none open, instead of staying pending for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommissioning_cancels_open_commands() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    platform.create(&operator, "d1").await;
    let (status, issued) = platform
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            &operator,
            Some(json!({"name": "reboot", "ttl_secs": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{issued}");
    let command_id = issued["command_id"].as_str().unwrap();
    let (status, gone) = platform
        .call(Method::DELETE, "/api/v1/devices/d1", &operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    let path = format!(
        "/api/v1/devices/d1/commands/{command_id}?min_position={}",
        gone["global_position"]
    );
    let (status, command) = platform.call(Method::GET, &path, &operator, None).await;
    assert_eq!(status, StatusCode::OK, "{command}");
    assert_eq!(command["status"], "canceled");
    assert!(command["result"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("device decommissioned"));
    let (_, device) = platform
        .call(
            Method::GET,
            &format!(
                "/api/v1/devices/d1?min_position={}",
                gone["global_position"]
            ),
            &operator,
            None,
        )
        .await;
    assert_eq!(device["open_commands"], 0, "{device}");
}
