//! Device identity for a clustered broker (EMQX's HTTP authentication and authorization),
//! against a real Postgres: a device gets in with its id and current token and reaches only its
//! own topics; a wrong token, another client id, a rotated-out token or a decommissioned device
//! do not; service accounts are left to the broker; only the broker may ask.

mod common;

use axum::http::{Method, StatusCode};
use common::{Platform, BROKER_TOKEN};
use fleetlog_domain::user::Role;
use serde_json::{json, Value};

async fn ask(platform: &Platform, question: &str, body: Value) -> (StatusCode, Value) {
    platform
        .call(
            Method::POST,
            &format!("/api/v1/broker/{question}"),
            BROKER_TOKEN,
            Some(body),
        )
        .await
}

async fn connects(platform: &Platform, clientid: &str, username: &str, password: &str) -> Value {
    let (status, verdict) = ask(
        platform,
        "authenticate",
        json!({"clientid": clientid, "username": username, "password": password}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    verdict
}

async fn may(platform: &Platform, username: &str, action: &str, topic: &str) -> String {
    let (status, verdict) = ask(
        platform,
        "authorize",
        json!({"clientid": username, "username": username, "topic": topic, "action": action}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    verdict["result"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_in_with_its_token_and_reaches_only_its_own_topics() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, created) = platform.create(&operator, "d-1").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["device_token"].as_str().unwrap().to_string();
    let (_, second) = platform.create(&operator, "d-2").await;
    let second_token = second["device_token"].as_str().unwrap().to_string();

    assert_eq!(
        connects(&platform, "d-1", "d-1", &token).await,
        json!({"result": "allow", "is_superuser": false})
    );
    for (clientid, username, password) in [
        ("d-1", "d-1", "not the token"),
        ("d-1", "d-1", ""),
        ("someone-else", "d-1", token.as_str()),
        ("d-2", "d-2", token.as_str()),
        ("ghost", "ghost", token.as_str()),
    ] {
        assert_eq!(
            connects(&platform, clientid, username, password).await["result"],
            "deny",
            "{clientid} as {username}"
        );
    }
    // Not device ids: the broker's own accounts decide (service accounts, anything odd).
    for username in [
        "fleetlog.ingest",
        "fleetlog.dispatch",
        "",
        "a/b",
        "x\u{0}y",
        &"d".repeat(65),
    ] {
        assert_eq!(
            connects(&platform, username, username, "whatever").await["result"],
            "ignore",
            "{username:?}"
        );
        assert_eq!(
            may(&platform, username, "publish", "devices/d-1/data").await,
            "ignore"
        );
    }

    for (action, topic) in [
        ("publish", "devices/d-1/data"),
        ("publish", "devices/d-1/commands/c-7/reply"),
        ("publish", "devices/d-1/ota/progress"),
        ("subscribe", "devices/d-1/commands"),
        ("subscribe", "devices/d-1/desired"),
    ] {
        assert_eq!(
            may(&platform, "d-1", action, topic).await,
            "allow",
            "{action} {topic}"
        );
    }
    for (action, topic) in [
        ("publish", "devices/d-2/data"),
        ("publish", "devices/d-1/commands"),
        ("subscribe", "devices/d-1/#"),
        ("subscribe", "devices/+/commands"),
        ("subscribe", "devices/d-2/commands"),
        ("subscribe", "$SYS/#"),
    ] {
        assert_eq!(
            may(&platform, "d-1", action, topic).await,
            "deny",
            "{action} {topic}"
        );
    }
    let (status, _) = ask(
        &platform,
        "authorize",
        json!({"clientid": "d-1", "username": "d-1", "topic": "devices/d-1/data", "action": "all"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A new token shuts the old one out; decommissioning shuts the device out altogether.
    let (status, rotated) = platform
        .call(
            Method::POST,
            "/api/v1/devices/d-1/credentials/rotate",
            &operator,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_token = rotated["device_token"].as_str().unwrap();
    assert_eq!(
        connects(&platform, "d-1", "d-1", &token).await["result"],
        "deny"
    );
    assert_eq!(
        connects(&platform, "d-1", "d-1", new_token).await["result"],
        "allow"
    );
    let admin = platform.token("acme", "ada", Role::Admin);
    let (status, _) = platform
        .call(Method::DELETE, "/api/v1/devices/d-1", &admin, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        connects(&platform, "d-1", "d-1", new_token).await["result"],
        "deny"
    );
    assert_eq!(
        may(&platform, "d-1", "publish", "devices/d-1/data").await,
        "deny"
    );

    // A revoked credential: no login, and an open session loses its topics.
    assert_eq!(
        may(&platform, "d-2", "publish", "devices/d-2/data").await,
        "allow"
    );
    let (status, revoked) = platform
        .call(
            Method::POST,
            "/api/v1/devices/d-2/credentials/revoke",
            &operator,
            Some(json!({"reason": "lost in the field"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(
        connects(&platform, "d-2", "d-2", &second_token).await["result"],
        "deny"
    );
    assert_eq!(
        may(&platform, "d-2", "publish", "devices/d-2/data").await,
        "deny"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_broker_may_ask() {
    let platform = Platform::start().await;
    let operator = platform.token("acme", "otto", Role::Operator);
    let body = json!({"clientid": "d-1", "username": "d-1", "password": "x"});
    for token in ["", "not the broker's secret", operator.as_str()] {
        let (status, problem) = platform
            .call(
                Method::POST,
                "/api/v1/broker/authenticate",
                token,
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
        assert!(problem["detail"]
            .as_str()
            .unwrap()
            .contains("FLEETLOG_BROKER_AUTH_TOKEN"));
    }
}
