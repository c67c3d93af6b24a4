//! Authentication through the real router against a real Postgres: login, access tokens,
//! refresh rotation with reuse detection, logout, and problem+json for every refusal.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use fleetlog_api::auth::Auth;
use fleetlog_api::{router, AppState};
use fleetlog_commands::credentials::hash_password;
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::user::{Role, UserCommand};
use fleetlog_domain::{TenantId, UserId};
use fleetlog_projections::DeviceModels;
use fleetlog_testkit::TestDatabase;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::{json, Value};
use tower::ServiceExt;

const SECRET: &str = "a test secret that is long enough to sign";

struct Api {
    router: Router,
    _db: TestDatabase,
}

struct Reply {
    status: StatusCode,
    content_type: String,
    www_authenticate: Option<String>,
    body: Value,
}

impl Api {
    async fn start() -> Self {
        Self::start_with(fleetlog_api::throttle::LoginThrottle::new(5, 100)).await
    }

    async fn start_with(throttle: fleetlog_api::throttle::LoginThrottle) -> Self {
        let db = TestDatabase::create().await;
        let bus = CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        );
        let tenant = TenantId::parse("acme").unwrap();
        let register = UserCommand::Register {
            tenant: tenant.clone(),
            username: "alice".into(),
            password_hash: hash_password(&SecretString::from("correct horse battery")).unwrap(),
            roles: vec![Role::Operator],
            at: Utc::now(),
        };
        let id = UserId::for_username(&tenant, "alice");
        bus.users()
            .execute(id.as_str(), register, &CommandMetadata::new("test"))
            .await
            .unwrap();
        let state = AppState {
            login_throttle: std::sync::Arc::new(throttle),
            nats: None,
            mqtt: None,
            auth: Auth::new(
                &SecretString::from(SECRET),
                fleetlog_testkit::device_key(),
                Duration::from_secs(300),
                Duration::from_secs(3600),
            ),
            bus,
            metrics: None,
            firmware: None,
            broker_auth: None,
        };
        Self {
            router: router(state),
            _db: db,
        }
    }

    async fn call(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let header_of = |name| {
            response
                .headers()
                .get(name)
                .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
        };
        let content_type = header_of(header::CONTENT_TYPE).unwrap_or_default();
        let www_authenticate = header_of(header::WWW_AUTHENTICATE);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            content_type,
            www_authenticate,
            body,
        }
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(
            Request::post(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    async fn get_with(&self, path: &str, token: &str) -> Reply {
        self.call(
            Request::get(path)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    async fn login(&self, password: &str) -> Reply {
        self.post(
            "/api/v1/auth/login",
            json!({"tenant": "acme", "username": "alice", "password": password}),
        )
        .await
    }
}

fn assert_problem(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.content_type, "application/problem+json");
    assert_eq!(reply.body["status"], status.as_u16());
    assert!(reply.body["title"].is_string() && reply.body["detail"].is_string());
}

#[tokio::test]
async fn login_gives_tokens_that_open_users_me() {
    let api = Api::start().await;
    let reply = api.login("correct horse battery").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["token_type"], "Bearer");
    assert_eq!(reply.body["expires_in"], 300);
    let access = reply.body["access_token"].as_str().unwrap();
    let me = api.get_with("/api/v1/users/me", access).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["username"], "alice");
    assert_eq!(me.body["tenant"], "acme");
    assert_eq!(me.body["roles"], json!(["operator"]));
    assert!(!me.body.to_string().contains("argon2"));
}

#[tokio::test]
async fn bad_credentials_are_refused_alike() {
    let api = Api::start().await;
    let wrong = api.login("wrong horse battery").await;
    assert_problem(&wrong, StatusCode::UNAUTHORIZED);
    let unknown = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": "acme", "username": "mallory", "password": "whatever123"}),
        )
        .await;
    assert_problem(&unknown, StatusCode::UNAUTHORIZED);
    let other_tenant = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": "globex", "username": "alice", "password": "correct horse battery"}),
        )
        .await;
    assert_problem(&other_tenant, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body["detail"], unknown.body["detail"]);
}

fn claims(exp_offset: i64) -> Value {
    let now = Utc::now().timestamp();
    json!({
        "sub": UserId::for_username(&TenantId::parse("acme").unwrap(), "alice").to_string(),
        "tenant": "acme", "roles": ["admin"], "sid": "s1",
        "iat": now, "exp": now + exp_offset, "jti": "j1"
    })
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let api = Api::start().await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let valid = encode(&Header::new(Algorithm::HS256), &claims(60), &key).unwrap();
    assert_eq!(
        api.get_with("/api/v1/users/me", &valid).await.status,
        StatusCode::OK
    );

    let expired = encode(&Header::new(Algorithm::HS256), &claims(-3600), &key).unwrap();
    let wrong_algorithm = encode(&Header::new(Algorithm::HS384), &claims(60), &key).unwrap();
    let other_key = encode(
        &Header::new(Algorithm::HS256),
        &claims(60),
        &EncodingKey::from_secret(b"another secret that is also long enough"),
    )
    .unwrap();
    // Same header and payload, signature of a different payload.
    let mut tampered_parts: Vec<String> = valid.split('.').map(String::from).collect();
    let elevated = encode(&Header::new(Algorithm::HS256), &claims(7200), &key).unwrap();
    tampered_parts[1] = elevated.split('.').nth(1).unwrap().to_string();
    let tampered = tampered_parts.join(".");
    // `alg: none` with no signature.
    use base64_url_free as b64;
    let none = format!(
        "{}.{}.",
        b64::encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64::encode(claims(60).to_string().as_bytes())
    );
    for (name, token) in [
        ("expired", expired),
        ("HS384", wrong_algorithm),
        ("other key", other_key),
        ("tampered", tampered),
        ("alg none", none),
        ("garbage", "not.a.token".to_string()),
    ] {
        let reply = api.get_with("/api/v1/users/me", &token).await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED);
        assert!(reply.www_authenticate.is_some(), "{name}: WWW-Authenticate");
    }
    let missing = api
        .call(
            Request::get("/api/v1/users/me")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_problem(&missing, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.www_authenticate.as_deref(),
        Some("Bearer realm=\"fleetlog\"")
    );
}

/// Unpadded base64url, enough to forge an unsigned token in a test.
mod base64_url_free {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_token_revokes_the_session() {
    let api = Api::start().await;
    let first = api.login("correct horse battery").await.body;
    let refresh = |token: &Value| {
        api.post(
            "/api/v1/auth/refresh",
            json!({"refresh_token": token.as_str().unwrap()}),
        )
    };
    // A forged token: the real user and session ids (both derivable) and a made-up secret.
    // It is refused, and the victim's session goes on.
    let real = first["refresh_token"].as_str().unwrap();
    let (ids, _) = real.rsplit_once('.').unwrap();
    let forged = refresh(&json!(format!("{ids}.madeup"))).await;
    assert_problem(&forged, StatusCode::UNAUTHORIZED);
    assert!(!forged.body["detail"].as_str().unwrap().contains("revoked"));
    let second = refresh(&first["refresh_token"]).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    assert_ne!(second.body["refresh_token"], first["refresh_token"]);
    let access = second.body["access_token"].as_str().unwrap();
    assert_eq!(
        api.get_with("/api/v1/users/me", access).await.status,
        StatusCode::OK
    );

    // The first token again: somebody copied it. The session ends for both holders.
    let reused = refresh(&first["refresh_token"]).await;
    assert_problem(&reused, StatusCode::UNAUTHORIZED);
    assert!(reused.body["detail"].as_str().unwrap().contains("revoked"));
    let after = refresh(&second.body["refresh_token"]).await;
    assert_problem(&after, StatusCode::UNAUTHORIZED);

    let garbage = api
        .post("/api/v1/auth/refresh", json!({"refresh_token": "nope"}))
        .await;
    assert_problem(&garbage, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let api = Api::start().await;
    let tokens = api.login("correct horse battery").await.body;
    let access = tokens["access_token"].as_str().unwrap();
    let logout = api
        .call(
            Request::post("/api/v1/auth/logout")
                .header(header::AUTHORIZATION, format!("Bearer {access}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT);
    let refresh = api
        .post(
            "/api/v1/auth/refresh",
            json!({"refresh_token": tokens["refresh_token"]}),
        )
        .await;
    assert_problem(&refresh, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn malformed_requests_get_problem_json() {
    let api = Api::start().await;
    let not_json = api
        .call(
            Request::post("/api/v1/auth/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_problem(&not_json, StatusCode::BAD_REQUEST);
    let unknown_field = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": "acme", "username": "alice", "password": "x", "admin": true}),
        )
        .await;
    assert_problem(&unknown_field, StatusCode::BAD_REQUEST);
    assert!(unknown_field.body["detail"]
        .as_str()
        .unwrap()
        .contains("admin"));
    let wrong_type = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": 1, "username": "alice", "password": "x"}),
        )
        .await;
    assert_problem(&wrong_type, StatusCode::BAD_REQUEST);
    let no_content_type = api
        .call(
            Request::post("/api/v1/auth/login")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_problem(&no_content_type, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let oversized = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": "acme", "username": "alice", "password": "x".repeat(2 << 20)}),
        )
        .await;
    assert_problem(&oversized, StatusCode::PAYLOAD_TOO_LARGE);
    let unknown_route = api
        .call(Request::get("/api/v1/nothing").body(Body::empty()).unwrap())
        .await;
    assert_problem(&unknown_route, StatusCode::NOT_FOUND);
    let wrong_method = api
        .call(
            Request::get("/api/v1/auth/login")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_problem(&wrong_method, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn login_attempts_are_throttled_per_user() {
    let api = Api::start().await;
    for _ in 0..5 {
        assert_eq!(
            api.login("wrong horse battery").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let throttled = api.login("correct horse battery").await;
    assert_problem(&throttled, StatusCode::TOO_MANY_REQUESTS);
    // Other users are not affected.
    let other = api
        .post(
            "/api/v1/auth/login",
            json!({"tenant": "acme", "username": "bob", "password": "whatever123"}),
        )
        .await;
    assert_eq!(other.status, StatusCode::UNAUTHORIZED);
}

/// A stranger who burns a username's attempts cannot lock its owner out: the owner logs in
/// from another address.
#[tokio::test]
async fn a_stranger_cannot_lock_an_owner_out() {
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;

    let api = Api::start().await;
    let attempt = |address: &str, password: &str| {
        let mut request = Request::post("/api/v1/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"tenant": "acme", "username": "alice", "password": password}).to_string(),
            ))
            .unwrap();
        let address: SocketAddr = address.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(address));
        request
    };
    for _ in 0..5 {
        let wrong = api
            .call(attempt("127.0.0.2:4000", "wrong horse battery"))
            .await;
        assert_problem(&wrong, StatusCode::UNAUTHORIZED);
    }
    let stranger = api
        .call(attempt("127.0.0.2:4001", "correct horse battery"))
        .await;
    assert_problem(&stranger, StatusCode::TOO_MANY_REQUESTS);
    let owner = api
        .call(attempt("127.0.0.3:5000", "correct horse battery"))
        .await;
    assert_eq!(owner.status, StatusCode::OK, "{}", owner.body);
}

#[tokio::test]
async fn login_attempts_are_throttled_per_client_address() {
    use axum::extract::ConnectInfo;
    use std::net::SocketAddr;

    let api = Api::start_with(fleetlog_api::throttle::LoginThrottle::new(100, 3)).await;
    let attempt = |address: &str, username: &str| {
        let mut request = Request::post("/api/v1/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"tenant": "acme", "username": username, "password": "guess guess"})
                    .to_string(),
            ))
            .unwrap();
        // What axum's connect-info service puts on each request of a real connection.
        let address: SocketAddr = address.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(address));
        request
    };
    // One address spraying guesses over many usernames is stopped...
    for username in ["u1", "u2", "u3"] {
        let reply = api.call(attempt("203.0.113.7:40000", username)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let throttled = api.call(attempt("203.0.113.7:40001", "u4")).await;
    assert_problem(&throttled, StatusCode::TOO_MANY_REQUESTS);
    // ...while other addresses carry on.
    let other = api.call(attempt("198.51.100.2:40000", "u5")).await;
    assert_eq!(other.status, StatusCode::UNAUTHORIZED);
}

/// `fleetlog user create` runs in a process of its own: a user it creates can log in at once,
/// also after a failed attempt made the API look that user up (and cache it) before it existed.
#[tokio::test]
async fn a_user_created_by_another_process_logs_in_after_a_failed_attempt() {
    let api = Api::start().await;
    let bob = json!({"tenant": "acme", "username": "bob", "password": "bob's long password"});
    assert_problem(
        &api.post("/api/v1/auth/login", bob.clone()).await,
        StatusCode::UNAUTHORIZED,
    );
    let cli = CommandBus::new(
        api._db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let tenant = TenantId::parse("acme").unwrap();
    let register = UserCommand::Register {
        tenant: tenant.clone(),
        username: "bob".into(),
        password_hash: hash_password(&SecretString::from("bob's long password")).unwrap(),
        roles: vec![Role::Viewer],
        at: Utc::now(),
    };
    cli.users()
        .execute(
            UserId::for_username(&tenant, "bob").as_str(),
            register,
            &CommandMetadata::new("cli"),
        )
        .await
        .unwrap();
    let reply = api.post("/api/v1/auth/login", bob).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
}
