//! Property tests over the documented ranges of the API's routes, against the real router,
//! Postgres and NATS: values generated inside, at the edges of and far outside every range
//! (numbers past i64, instants past the calendar, any text, NULs) never get a 5xx; whatever is
//! refused is a 4xx problem+json; and values inside the documented ranges are answered 2xx.
//! Cases are drawn from a fixed seed, so a failure repeats.

mod common;

use axum::http::{Method, StatusCode};
use common::Platform;
use fleetlog_domain::user::Role;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};

/// Cases per route.
const CASES: usize = 48;

fn sample<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>) -> Vec<T> {
    let mut runner = TestRunner::deterministic();
    (0..CASES)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// `%XX` for everything but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Instants in the documented range, at its edges, past it, and text that is no instant.
fn instant() -> impl Strategy<Value = String> {
    prop_oneof![
        (0i64..253_402_300_799).prop_map(|seconds| {
            chrono::DateTime::from_timestamp(seconds, 0)
                .unwrap()
                .to_rfc3339()
        }),
        Just("1970-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59.999999Z".to_string()),
        Just("1969-12-31T23:59:59Z".to_string()),
        Just("0000-01-01T00:00:00Z".to_string()),
        Just("-262143-01-01T00:00:00Z".to_string()),
        Just("+262142-12-31T23:59:59.999999999Z".to_string()),
        "\\PC{0,24}",
    ]
}

/// Numbers of every size, and text that is no number.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (-3i64..3).prop_map(|n| n.to_string()),
        "-?[0-9]{19,30}",
        "\\PC{0,8}",
    ]
}

/// Any text, NUL and other control characters included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,16}",
        "\\PC{0,4}[\\x00-\\x1f]\\PC{0,4}",
        "[a-z_]{1,12}"
    ]
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        (1i64..=86_400).prop_map(|n| json!(n)),
        Just(Value::Null),
    ]
}

async fn assert_answers_4xx_at_worst(
    platform: &Platform,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> StatusCode {
    let (status, answer) = platform
        .call(method.clone(), path, token, body.clone())
        .await;
    assert!(
        !status.is_server_error(),
        "{method} {path} {body:?} answered {status}: {answer}"
    );
    if status.is_client_error() {
        assert_eq!(
            answer["status"],
            status.as_u16(),
            "{method} {path}: not problem+json: {answer}"
        );
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_value_of_any_query_or_body_parameter_gets_a_5xx() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, created) = platform.create(&operator, "d1").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    platform
        .wait_for("d1", created["version"].as_u64().unwrap())
        .await;

    for (limit, q, sort, cursor) in sample((number(), text(), text(), text())) {
        let path = format!(
            "/api/v1/devices?limit={}&q={}&sort={}&cursor={}",
            encode(&limit),
            encode(&q),
            encode(&sort),
            encode(&cursor)
        );
        assert_answers_4xx_at_worst(&platform, &operator, Method::GET, &path, None).await;
    }
    for (from, to, bucket, limit, sensor) in
        sample((instant(), instant(), number(), number(), text()))
    {
        let path = format!(
            "/api/v1/devices/d1/telemetry?from={}&to={}&bucket_secs={}&limit={}&sensor={}",
            encode(&from),
            encode(&to),
            encode(&bucket),
            encode(&limit),
            encode(&sensor)
        );
        assert_answers_4xx_at_worst(&platform, &operator, Method::GET, &path, None).await;
    }
    for (after, limit, kind) in sample((number(), number(), text())) {
        let path = format!(
            "/api/v1/devices/d1/events?after={}&limit={}&type={}",
            encode(&after),
            encode(&limit),
            encode(&kind)
        );
        assert_answers_4xx_at_worst(&platform, &operator, Method::GET, &path, None).await;
    }
    for (at, position) in sample((instant(), number())) {
        for path in [
            format!("/api/v1/devices/d1?at={}", encode(&at)),
            format!("/api/v1/devices/d1?min_position={}", encode(&position)),
            format!(
                "/api/v1/rollouts?limit={}&status={}",
                encode(&position),
                encode(&at)
            ),
            format!(
                "/api/v1/firmware?model={}&status={}",
                encode(&at),
                encode(&position)
            ),
        ] {
            assert_answers_4xx_at_worst(&platform, &operator, Method::GET, &path, None).await;
        }
    }
    for (name, key, value, ttl) in sample((text(), text(), text(), json_number())) {
        let command =
            json!({"name": name, "params": {key.clone(): value.clone()}, "ttl_secs": ttl});
        assert_answers_4xx_at_worst(
            &platform,
            &operator,
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(command),
        )
        .await;
        let desired = json!({ key: value });
        assert_answers_4xx_at_worst(
            &platform,
            &operator,
            Method::PUT,
            "/api/v1/devices/d1/desired",
            Some(desired),
        )
        .await;
    }
}

/// Inside the documented ranges, the answer is a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_inside_the_documented_ranges_are_answered() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (_, created) = platform.create(&operator, "d1").await;
    platform
        .wait_for("d1", created["version"].as_u64().unwrap())
        .await;
    let earliest = 0i64;
    let latest = 253_402_300_799i64;
    let ranges = (
        earliest..latest,
        earliest..latest,
        1i64..=2_678_400,
        1i64..=10_000,
        1i64..=200,
        1i64..=86_400,
    );
    for (a, b, bucket, limit, page, ttl) in sample(ranges) {
        let (from, to) = (a.min(b), a.max(b) + 1);
        let instant = |s: i64| chrono::DateTime::from_timestamp(s, 0).unwrap().to_rfc3339();
        for path in [
            format!(
                "/api/v1/devices/d1/telemetry?from={}&to={}&limit={limit}",
                encode(&instant(from)),
                encode(&instant(to))
            ),
            format!(
                "/api/v1/devices/d1/telemetry?from={}&to={}&bucket_secs={bucket}&limit={limit}",
                encode(&instant(from)),
                encode(&instant(to))
            ),
            format!("/api/v1/devices?limit={page}"),
            format!("/api/v1/devices/d1/events?limit={}", page * 5),
        ] {
            let status =
                assert_answers_4xx_at_worst(&platform, &operator, Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK, "GET {path}");
        }
        let command = json!({"name": "reboot", "ttl_secs": ttl});
        let status = assert_answers_4xx_at_worst(
            &platform,
            &operator,
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(command),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
}
