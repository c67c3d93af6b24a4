//! The platform behind the router for API tests: real Postgres, nats-server, relay and
//! projection workers, and tokens minted for any tenant and role.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use chrono::Utc;
use fleetlog_api::auth::{Auth, Caller};
use fleetlog_api::router;
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_domain::user::Role;
use fleetlog_domain::{SessionId, TenantId, UserId};
use fleetlog_firmware::{FirmwareStore, ImageSigner};
use fleetlog_projections::DeviceModels;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{NatsServer, TestDatabase};
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub struct Platform {
    /// First, so its roles stop before the servers go.
    _platform: fleetlog::Platform,
    pub router: Router,
    /// A client of the platform's nats-server.
    pub nats: async_nats::Client,
    auth: std::sync::Arc<Auth>,
    pub pool: PgPool,
    /// A write side of its own, as another process of the platform would have.
    pub bus: CommandBus,
    shutdown: CancellationToken,
    /// Where the firmware images and the signing key live; removed with the platform.
    pub firmware_dir: TempDir,
    _nats: NatsServer,
    _db: TestDatabase,
}

/// The secret the test platform's broker presents to `/api/v1/broker/*`.
pub const BROKER_TOKEN: &str = "a broker secret, long enough to be one";

/// The largest firmware image the test platform accepts.
pub const FIRMWARE_MAX_BYTES: u64 = 1024 * 1024;

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("fleetlog-api-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Platform {
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// `projections: false` leaves the read models behind, as a lagging projection would.
    pub async fn start_with(projections: bool) -> Self {
        Self::start_full(projections, None).await
    }

    /// Firmware images kept in the object store at `url` (say `s3://bucket/prefix`), set up
    /// with `options`, instead of the local directory.
    pub async fn start_with_firmware_store(url: &str, options: Vec<(String, String)>) -> Self {
        Self::start_full(true, Some((url, options))).await
    }

    async fn start_full(projections: bool, store: Option<(&str, Vec<(String, String)>)>) -> Self {
        let db = TestDatabase::create().await;
        let nats = NatsServer::start();
        let client = fleetlog_nats::connect(&nats.url()).await.unwrap();
        let client_for_tests = client.clone();
        let shutdown = CancellationToken::new();
        let mut platform = fleetlog::Platform::new(
            db.pool.clone(),
            client.clone(),
            StoreSettings::default(),
            shutdown.clone(),
        );
        platform.relay(RelaySettings {
            poll_interval: Duration::from_millis(50),
            ..RelaySettings::default()
        });
        if projections {
            platform.projections(WorkerSettings::default());
        }
        let firmware_dir = TempDir::new();
        let auth = Auth::new(
            &SecretString::from("a test secret that is long enough to sign"),
            fleetlog_testkit::device_key(),
            Duration::from_secs(300),
            Duration::from_secs(3600),
        );
        let state = platform
            .api_state(&fleetlog::ApiParts {
                auth: auth.clone(),
                mqtt: None,
                metrics: None,
                http: fleetlog_api::HttpSettings::default(),
                broker_auth: Some(std::sync::Arc::new(fleetlog_api::BrokerAuth {
                    token: SecretString::from(BROKER_TOKEN),
                    topic_root: "devices".into(),
                })),
                firmware: Some(std::sync::Arc::new({
                    let signer =
                        ImageSigner::from_file(&firmware_dir.0.join("signing.pem"), true).unwrap();
                    match store {
                        Some((url, options)) => {
                            FirmwareStore::at_url(url, options, FIRMWARE_MAX_BYTES, signer)
                        }
                        None => FirmwareStore::local(
                            &firmware_dir.0.join("images"),
                            FIRMWARE_MAX_BYTES,
                            signer,
                        ),
                    }
                    .unwrap()
                })),
            })
            .await
            .unwrap();
        Self {
            nats: client_for_tests,
            router: router(state),
            auth,
            pool: db.pool.clone(),
            bus: CommandBus::new(
                db.pool.clone(),
                StoreSettings::default(),
                DeviceModels::inline(),
            ),
            shutdown,
            _platform: platform,
            firmware_dir,
            _nats: nats,
            _db: db,
        }
    }

    pub fn token(&self, tenant: &str, username: &str, role: Role) -> String {
        let ttl = self.auth.access_ttl.as_secs() as i64;
        self.token_expiring_in(tenant, username, role, ttl)
    }

    /// A token that expires `seconds` from now (issued as long ago as that makes it).
    pub fn token_expiring_in(
        &self,
        tenant: &str,
        username: &str,
        role: Role,
        seconds: i64,
    ) -> String {
        let tenant = TenantId::parse(tenant).unwrap();
        let caller = Caller {
            user_id: UserId::for_username(&tenant, username),
            tenant,
            session_id: SessionId::parse("s1").unwrap(),
            roles: vec![role],
            expires_at: None,
        };
        let ttl = self.auth.access_ttl.as_secs() as i64;
        let issued = Utc::now() - chrono::Duration::seconds(ttl - seconds);
        self.auth.access_token(&caller, issued).unwrap()
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.call_with(method, path, token, body, &[]).await;
        (status, body)
    }

    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    /// Waits until the relay has published every event stored so far.
    pub async fn wait_relayed(&self) {
        let jetstream = async_nats::jetstream::new(self.nats.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(&self.pool)
                .await
                .unwrap();
            if let Ok(mut stream) = jetstream.get_stream(fleetlog_nats::STREAM_NAME).await {
                if stream.info().await.unwrap().state.messages as i64 >= stored {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the relay never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends raw bytes with exactly the headers given (no token added).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    pub async fn create(&self, token: &str, id: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/api/v1/devices",
            token,
            Some(json!({"device_id": id, "name": format!("Device {id}"), "model": "thermo", "tags": ["lab"]})),
        )
        .await
    }

    /// Waits until the devices read model has applied the device's events up to `version`.
    pub async fn wait_for(&self, id: &str, version: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT last_sequence FROM devices WHERE device_id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .unwrap();
            if applied.is_some_and(|a| a as u64 >= version) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "read model never reached {id}@{version}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
