//! The OpenAPI document: served, complete (every route of the REST contract is in it), and
//! honest (every operation in it is routed), plus the docs page built into the binary.

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::Platform;
use serde_json::Value;

/// The REST contract, route by route.
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs/"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/auth/refresh"),
    ("post", "/api/v1/auth/logout"),
    ("get", "/api/v1/users/me"),
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("post", "/api/v1/users/{id}/roles"),
    ("delete", "/api/v1/users/{id}/roles/{role}"),
    ("post", "/api/v1/users/{id}/disable"),
    ("post", "/api/v1/users/{id}/enable"),
    ("post", "/api/v1/devices"),
    ("get", "/api/v1/devices"),
    ("get", "/api/v1/devices/{id}"),
    ("patch", "/api/v1/devices/{id}"),
    ("delete", "/api/v1/devices/{id}"),
    ("put", "/api/v1/devices/{id}/desired"),
    ("post", "/api/v1/devices/{id}/credentials/rotate"),
    ("post", "/api/v1/devices/{id}/credentials/revoke"),
    ("post", "/api/v1/provisioning-keys"),
    ("get", "/api/v1/provisioning-keys/{id}"),
    ("post", "/api/v1/provisioning-keys/{id}/revoke"),
    ("post", "/api/v1/provision"),
    ("post", "/api/v1/devices/{id}/commands"),
    ("get", "/api/v1/devices/{id}/commands/{command_id}"),
    ("get", "/api/v1/devices/{id}/events"),
    ("get", "/api/v1/devices/{id}/telemetry"),
    ("post", "/api/v1/devices/{id}/telemetry"),
    ("get", "/api/v1/devices/{id}/stream"),
    ("post", "/api/devices/data/upload"),
    ("get", "/api/v1/firmware"),
    ("post", "/api/v1/firmware"),
    ("get", "/api/v1/firmware/signing-key"),
    ("get", "/api/v1/firmware/{id}"),
    ("get", "/api/v1/firmware/{id}/download"),
    ("post", "/api/v1/firmware/{id}/release"),
    ("post", "/api/v1/firmware/{id}/deprecate"),
    ("post", "/api/v1/rollouts"),
    ("get", "/api/v1/rollouts"),
    ("get", "/api/v1/rollouts/{id}"),
    ("get", "/api/v1/rollouts/{id}/devices"),
    ("post", "/api/v1/rollouts/{id}/start"),
    ("post", "/api/v1/rollouts/{id}/pause"),
    ("post", "/api/v1/rollouts/{id}/resume"),
    ("post", "/api/v1/rollouts/{id}/abort"),
    ("get", "/api/v1/stream"),
    ("post", "/api/v1/broker/authenticate"),
    ("post", "/api/v1/broker/authorize"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_every_listed_route_exists() {
    let platform = Platform::start_with(false).await;
    let (status, headers, document) = platform
        .send(Method::GET, "/openapi.json", &[], Body::empty())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();

    let mut documented = Vec::new();
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            documented.push((method.clone(), path.clone()));
            assert!(
                operation["summary"].is_string(),
                "{method} {path} has no summary"
            );
            assert_eq!(
                operation["responses"]["4XX"]["content"]["application/problem+json"]["schema"]
                    ["$ref"],
                "#/components/schemas/Problem",
                "{method} {path} does not document its problem responses"
            );
        }
    }
    for (method, path) in CONTRACT {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is missing from the OpenAPI document"
        );
    }
    assert_eq!(
        documented.len(),
        CONTRACT.len(),
        "the document has operations the contract list lacks: {documented:?}"
    );

    // Every documented operation is routed: no request to it ends in the router's 404 or 405.
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "x1")
            .replace("{role}", "viewer")
            .replace("{command_id}", "c1");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, _, body) = platform
            .send(method.clone(), &concrete, &[], Body::empty())
            .await;
        let unrouted = status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND && body["detail"] == "no such route");
        assert!(!unrouted, "{method} {concrete}: {status} {body}");
    }

    // Operations that need a token say so; the ones that do not, say that.
    let security = |method: &str, path: &str| paths[path][method].get("security").cloned();
    assert_eq!(document["security"], serde_json::json!([{"bearer": []}]));
    assert_eq!(
        security("post", "/api/v1/auth/login"),
        Some(serde_json::json!([{}]))
    );
    assert_eq!(
        security("post", "/api/v1/devices/{id}/telemetry"),
        Some(serde_json::json!([{"device_token": []}]))
    );
    assert!(document["components"]["schemas"]["Problem"].is_object());

    // The rules the API enforces are in the document, so a generated client builds requests
    // the API takes: every path parameter has its pattern, every limit and min_position its
    // range, and the bodies their bounds.
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().unwrap();
                let schema = &parameter["schema"];
                match parameter["in"].as_str().unwrap() {
                    "path" => assert!(
                        schema["pattern"].is_string(),
                        "{method} {path}: path parameter {name} has no pattern"
                    ),
                    "query" if name == "limit" || name == "bucket_secs" => assert!(
                        schema["minimum"].is_number() && schema["maximum"].is_number(),
                        "{method} {path}: {name} has no range"
                    ),
                    "query" if name == "min_position" => assert_eq!(
                        schema["minimum"], 1,
                        "{method} {path}: min_position has no minimum"
                    ),
                    _ => {}
                }
            }
        }
    }
    let schemas = &document["components"]["schemas"];
    let property = |schema: &str, field: &str| schemas[schema]["properties"][field].clone();
    assert_eq!(
        property("CreateDevice", "device_id")["pattern"],
        "^[A-Za-z0-9_-]{1,64}$"
    );
    assert_eq!(property("CreateDevice", "name")["maxLength"], 128);
    assert_eq!(property("CreateDevice", "tags")["maxItems"], 32);
    assert_eq!(property("IssueCommand", "ttl_secs")["maximum"], 86_400);
    assert_eq!(
        property("CreateRollout", "window_secs")["maximum"],
        31_536_000
    );
    assert_eq!(
        property("CreateRollout", "device_timeout_secs")["maximum"],
        2_592_000
    );
    assert_eq!(property("CreateRollout", "success_threshold")["minimum"], 1);
    assert_eq!(property("CreateUser", "password")["minLength"], 8);
    // Each write answers the id of what it wrote: one schema per kind, no name shared.
    for (schema, id) in [
        ("WriteResult", "device_id"),
        ("UserWritten", "user_id"),
        ("FirmwareWritten", "firmware_id"),
        ("RolloutWritten", "rollout_id"),
    ] {
        assert!(property(schema, id).is_object(), "{schema} lacks {id}");
    }
    // What telemetry answers is what its schema says: an array of readings or of buckets.
    let answer = &paths["/api/v1/devices/{id}/telemetry"]["get"]["responses"]["200"]["content"]
        ["application/json"]["schema"]["$ref"];
    assert_eq!(answer, "#/components/schemas/TelemetryAnswer");
    let shapes = schemas["TelemetryAnswer"]["oneOf"].as_array().unwrap();
    assert!(
        shapes.iter().all(|shape| shape["type"] == "array"),
        "{shapes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_is_served_from_the_binary() {
    let platform = Platform::start_with(false).await;
    let response = tower::ServiceExt::oneshot(
        platform.router.clone(),
        axum::http::Request::get("/docs/")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let html = String::from_utf8_lossy(&html);
    assert!(html.contains("swagger-ui"), "{html}");
    for asset in [
        "/docs/swagger-ui.css",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-initializer.js",
    ] {
        let response = tower::ServiceExt::oneshot(
            platform.router.clone(),
            axum::http::Request::get(asset).body(Body::empty()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        let body = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        assert!(!body.is_empty(), "{asset}");
        if asset.ends_with("initializer.js") {
            assert!(String::from_utf8_lossy(&body).contains("/openapi.json"));
        }
    }
}

/// Checks `value` against `schema` of the document, as far as the document uses JSON Schema:
/// `$ref`, `type` (a name or a list of names, `null` included), `properties` and `required`,
/// `items`, `oneOf`/`anyOf`, `enum`. Returns where it does not match.
fn mismatch(
    document: &serde_json::Value,
    schema: &serde_json::Value,
    value: &serde_json::Value,
    at: &str,
) -> Option<String> {
    use serde_json::Value;
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        return mismatch(
            document,
            &document["components"]["schemas"][name],
            value,
            at,
        );
    }
    for combinator in ["oneOf", "anyOf"] {
        if let Some(options) = schema[combinator].as_array() {
            let matching = options
                .iter()
                .filter(|option| mismatch(document, option, value, at).is_none())
                .count();
            return (matching == 0).then(|| format!("{at}: {value} matches none of {combinator}"));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Some(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(name) => vec![name.as_str()],
        Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    let fits = |name: &str| match (name, value) {
        ("null", Value::Null) => true,
        ("boolean", Value::Bool(_)) => true,
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64(),
        ("number", Value::Number(_)) => true,
        ("string", Value::String(_)) => true,
        ("array", Value::Array(_)) => true,
        ("object", Value::Object(_)) => true,
        _ => false,
    };
    if !types.iter().any(|name| fits(name)) {
        return Some(format!("{at}: {value} is not {types:?}"));
    }
    match value {
        Value::Object(fields) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap();
                if !fields.contains_key(required) {
                    return Some(format!("{at}: lacks required {required}"));
                }
            }
            if let Some(properties) = schema["properties"].as_object() {
                for (name, field) in fields {
                    match properties.get(name) {
                        Some(field_schema) => {
                            if let Some(error) =
                                mismatch(document, field_schema, field, &format!("{at}.{name}"))
                            {
                                return Some(error);
                            }
                        }
                        None if schema["additionalProperties"] == Value::Bool(false) => {
                            return Some(format!("{at}: {name} is not in the schema"));
                        }
                        None => {}
                    }
                }
            }
            None
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(index, item)| {
            mismatch(document, &schema["items"], item, &format!("{at}[{index}]"))
        }),
        _ => None,
    }
}

/// Every answer of the main routes matches the schema its operation declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_match_their_schemas() {
    use fleetlog_domain::user::Role;
    let platform = Platform::start().await;
    let (_, _, document) = platform
        .send(Method::GET, "/openapi.json", &[], Body::empty())
        .await;
    let admin = platform.token("acme", "ada", Role::Admin);
    let (_, created) = platform.create(&admin, "d1").await;
    platform
        .wait_for("d1", created["version"].as_u64().unwrap())
        .await;
    let issued = platform
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            &admin,
            Some(serde_json::json!({"name": "reboot"})),
        )
        .await
        .1;
    let command_id = issued["command_id"].as_str().unwrap().to_string();
    let user = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &admin,
            Some(serde_json::json!({"username": "vera", "password": "a long password", "roles": ["viewer"]})),
        )
        .await
        .1;
    let position = user["global_position"].as_i64().unwrap();
    let checks: Vec<(&str, String, &str, Value)> = vec![
        ("post", "/api/v1/devices".into(), "201", created.clone()),
        (
            "post",
            "/api/v1/devices/{id}/commands".into(),
            "202",
            issued.clone(),
        ),
        ("post", "/api/v1/users".into(), "201", user.clone()),
    ];
    let reads = [
        (
            "/api/v1/devices",
            format!(
                "/api/v1/devices?min_position={}",
                created["global_position"]
            ),
        ),
        ("/api/v1/devices/{id}", "/api/v1/devices/d1".to_string()),
        (
            "/api/v1/devices/{id}/events",
            "/api/v1/devices/d1/events".to_string(),
        ),
        (
            "/api/v1/devices/{id}/telemetry",
            "/api/v1/devices/d1/telemetry".to_string(),
        ),
        (
            "/api/v1/devices/{id}/telemetry",
            "/api/v1/devices/d1/telemetry?bucket_secs=60".to_string(),
        ),
        (
            "/api/v1/devices/{id}/commands/{command_id}",
            format!(
                "/api/v1/devices/d1/commands/{command_id}?min_position={}",
                issued["global_position"]
            ),
        ),
        (
            "/api/v1/users",
            format!("/api/v1/users?min_position={position}"),
        ),
        ("/api/v1/firmware", "/api/v1/firmware".to_string()),
        ("/api/v1/rollouts", "/api/v1/rollouts".to_string()),
    ];
    let mut checks = checks;
    for (template, path) in reads {
        let (status, answer) = platform.call(Method::GET, &path, &admin, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {answer}");
        checks.push(("get", template.to_string(), "200", answer));
    }
    for (method, template, status, answer) in checks {
        let schema = &document["paths"][template.as_str()][method]["responses"][status]["content"]
            ["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {template} {status} declares no schema"
        );
        if let Some(error) = mismatch(&document, schema, &answer, &format!("{method} {template}")) {
            panic!("{error}\nanswer: {answer}");
        }
    }
}
