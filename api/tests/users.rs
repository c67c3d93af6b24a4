//! User administration through the real router: admins only, within their own tenant.

mod common;

use axum::http::{Method, StatusCode};
use common::Platform;
use fleetlog_domain::user::Role;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_the_users_of_their_tenant_only() {
    let platform = Platform::start().await;
    let admin = platform.token("acme", "ann", Role::Admin);
    let operator = platform.token("acme", "otto", Role::Operator);
    let stranger = platform.token("globex", "gus", Role::Admin);

    let create = |token: String, username: &str| {
        let body =
            json!({"username": username, "password": "long enough pass", "roles": ["viewer"]});
        let platform = &platform;
        async move {
            platform
                .call(Method::POST, "/api/v1/users", &token, Some(body))
                .await
        }
    };
    let (status, created) = create(admin.clone(), "bob").await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let bob = created["user_id"].as_str().unwrap().to_string();
    let (status, _) = create(admin.clone(), "BOB").await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = create(operator.clone(), "carl").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, weak) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &admin,
            Some(json!({"username": "dora", "password": "short", "roles": ["viewer"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{weak}");

    let (status, granted) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{bob}/roles"),
            &admin,
            Some(json!({"role": "operator"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    let (status, _) = platform
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{bob}/roles/viewer"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = platform
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{bob}/roles/root"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Another tenant's admin cannot see or touch bob.
    for (method, path, body) in [
        (
            Method::POST,
            format!("/api/v1/users/{bob}/roles"),
            Some(json!({"role": "admin"})),
        ),
        (
            Method::DELETE,
            format!("/api/v1/users/{bob}/roles/operator"),
            None,
        ),
        (
            Method::POST,
            format!("/api/v1/users/{bob}/disable"),
            Some(json!({"reason": "mine"})),
        ),
    ] {
        let (status, _) = platform.call(method, &path, &stranger, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }

    let (status, disabled) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{bob}/disable"),
            &admin,
            Some(json!({"reason": "left"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let path = format!("/api/v1/users?min_position={}", disabled["global_position"]);
    let (status, users) = platform.call(Method::GET, &path, &admin, None).await;
    assert_eq!(status, StatusCode::OK, "{users}");
    let users = users.as_array().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["username"], "bob");
    assert_eq!(users[0]["roles"], json!(["operator"]));
    assert_eq!(users[0]["disabled"], true);
    assert!(!Value::Array(users.clone()).to_string().contains("argon2"));
    let (_, theirs) = platform
        .call(Method::GET, "/api/v1/users", &stranger, None)
        .await;
    assert_eq!(theirs, json!([]));
    let (status, _) = platform
        .call(Method::GET, "/api/v1/users", &operator, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// Roles travel in the access token: a revoked role keeps working until the token expires
/// (the documented window), and `/users/me` says so, showing the token's roles beside the
/// account's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_me_shows_the_tokens_roles_beside_the_accounts() {
    let platform = Platform::start().await;
    let admin = platform.token("acme", "ann", Role::Admin);
    let (status, created) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &admin,
            Some(
                json!({"username": "otto", "password": "long enough pass", "roles": ["operator"]}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let otto = created["user_id"].as_str().unwrap().to_string();
    let operator = platform.token("acme", "otto", Role::Operator);
    let (status, _) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{otto}/roles"),
            &admin,
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, revoked) = platform
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{otto}/roles/operator"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    let (status, me) = platform
        .call(Method::GET, "/api/v1/users/me", &operator, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["roles"], json!(["operator"]));
    assert_eq!(me["account_roles"], json!(["viewer"]));
    assert!(me["token_expires_at"].is_string());
}

/// A tenant keeps an admin: the last active one can neither lose the role nor be disabled;
/// with a second admin both work, and a disabled user can be enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_stays_and_disabled_users_can_come_back() {
    let platform = Platform::start().await;
    let root = platform.token("acme", "root", Role::Admin);
    let create = |username: &str, role: &str| json!({"username": username, "password": "long enough pass", "roles": [role]});
    let (_, ann) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &root,
            Some(create("ann", "admin")),
        )
        .await;
    let ann_id = ann["user_id"].as_str().unwrap().to_string();
    let wait = format!("/api/v1/users?min_position={}", ann["global_position"]);
    platform.call(Method::GET, &wait, &root, None).await;
    let as_ann = platform.token("acme", "ann", Role::Admin);
    // Ann is the only admin the tenant's users know.
    let (status, refused) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{ann_id}/disable"),
            &as_ann,
            Some(json!({"reason": "leaving"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["detail"]
        .as_str()
        .unwrap()
        .contains("last active admin"));
    let (status, _) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{ann_id}/roles"),
            &as_ann,
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = platform
        .call(
            Method::DELETE,
            &format!("/api/v1/users/{ann_id}/roles/admin"),
            &as_ann,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // With a second admin, Ann can step down and be disabled, then enabled again.
    let (_, ben) = platform
        .call(
            Method::POST,
            "/api/v1/users",
            &as_ann,
            Some(create("ben", "admin")),
        )
        .await;
    let wait = format!("/api/v1/users?min_position={}", ben["global_position"]);
    platform.call(Method::GET, &wait, &as_ann, None).await;
    let (status, disabled) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{ann_id}/disable"),
            &as_ann,
            Some(json!({"reason": "leaving"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{disabled}");
    let login = |password: &str| {
        let body = json!({"tenant": "acme", "username": "ann", "password": password});
        platform.call(Method::POST, "/api/v1/auth/login", "", Some(body))
    };
    assert_eq!(login("long enough pass").await.0, StatusCode::UNAUTHORIZED);
    let as_ben = platform.token("acme", "ben", Role::Admin);
    let (status, enabled) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{ann_id}/enable"),
            &as_ben,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(login("long enough pass").await.0, StatusCode::OK);
    // Enabling an enabled user changes nothing.
    let (status, again) = platform
        .call(
            Method::POST,
            &format!("/api/v1/users/{ann_id}/enable"),
            &as_ben,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(again["global_position"].is_null());
}
