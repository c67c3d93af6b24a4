//! Device identity at the broker, end to end with every server real: Mosquitto with the
//! dynamic-security plugin and no anonymous listener, the broker sync keeping its accounts in
//! step with the log, ingest and dispatch on their own service accounts.
//!
//! A device connects with its id and the token it was issued, and only then; it reaches only
//! its own topics; rotation, revocation and decommissioning shut it out within seconds; the
//! sync, restarted or facing a broker that restarted or drifted, loses no credential.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use chrono::Utc;
use fleetlog::{ApiParts, Platform};
use fleetlog_api::auth::{Auth, Caller};
use fleetlog_api::HttpSettings;
use fleetlog_broker::access::{DynsecAdmin, DISPATCH_USERNAME, INGEST_USERNAME};
use fleetlog_commands::StoreSettings;
use fleetlog_dispatch::DispatchSettings;
use fleetlog_domain::user::Role;
use fleetlog_domain::{SessionId, TenantId, UserId};
use fleetlog_ingest::bridge::IngestSettings;
use fleetlog_process::broker_sync::BrokerSyncSettings;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a change at the API may take to reach the broker.
const WITHIN: Duration = Duration::from_secs(15);

struct Stack {
    /// First, so its roles stop before the servers go.
    _platform: Platform,
    sync: Option<Platform>,
    router: axum::Router,
    token: String,
    auth: std::sync::Arc<Auth>,
    db: TestDatabase,
    broker: MosquittoServer,
    nats: async_nats::Client,
    shutdown: CancellationToken,
    _nats_server: NatsServer,
}

impl Stack {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    /// With `tls`, ingest and dispatch reach the broker over TLS, trusting its private CA.
    async fn start_with(tls: bool) -> Self {
        let db = TestDatabase::create().await;
        let nats_server = NatsServer::start();
        let broker = if tls {
            MosquittoServer::start_with_tls()
        } else {
            MosquittoServer::start()
        };
        let nats = fleetlog_nats::connect(&nats_server.url()).await.unwrap();
        let shutdown = CancellationToken::new();
        let relay = RelaySettings {
            poll_interval: Duration::from_millis(50),
            ..RelaySettings::default()
        };
        let over = |username: &str| -> fleetlog_broker::BrokerUrl {
            if tls {
                let mut url: fleetlog_broker::BrokerUrl =
                    broker.tls_url_as(username).parse().unwrap();
                url.ca_pem = Some(broker.ca_pem());
                url
            } else {
                broker.url_as(username).parse().unwrap()
            }
        };
        let mut ingest = IngestSettings::new(over(INGEST_USERNAME));
        ingest.device_key = Some(fleetlog_testkit::device_key());
        let mut dispatch = DispatchSettings::new(over(DISPATCH_USERNAME));
        dispatch.expiry_interval = Duration::from_millis(200);
        let mut platform = Platform::new(
            db.pool.clone(),
            nats.clone(),
            StoreSettings::default(),
            shutdown.clone(),
        );
        platform
            .relay(relay)
            .projections(WorkerSettings::default())
            .ingest(ingest)
            .dispatch(dispatch);
        let auth = Auth::new(
            &SecretString::from("a test secret that is long enough to sign"),
            fleetlog_testkit::device_key(),
            Duration::from_secs(300),
            Duration::from_secs(3600),
        );
        let caller = Caller {
            user_id: UserId::parse("u-otto").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            session_id: SessionId::parse("s1").unwrap(),
            roles: vec![Role::Operator],
            expires_at: None,
        };
        let token = auth.access_token(&caller, Utc::now()).unwrap();
        let state = platform
            .api_state(&ApiParts {
                auth: auth.clone(),
                firmware: None,
                mqtt: None,
                metrics: None,
                http: HttpSettings::default(),
                broker_auth: None,
            })
            .await
            .unwrap();
        let mut stack = Self {
            router: fleetlog_api::router(state),
            _platform: platform,
            sync: None,
            token,
            auth,
            db,
            broker,
            nats,
            shutdown,
            _nats_server: nats_server,
        };
        stack.sync = Some(stack.sync_platform());
        stack
    }

    /// A broker sync in a platform of its own, as another process would run it.
    fn sync_platform(&self) -> Platform {
        let mut settings = BrokerSyncSettings::new(self.broker.sync_url().parse().unwrap());
        settings.ingest_password = Some(self.broker.password(INGEST_USERNAME).into());
        settings.dispatch_password = Some(self.broker.password(DISPATCH_USERNAME).into());
        let mut sync = Platform::new(
            self.db.pool.clone(),
            self.nats.clone(),
            StoreSettings::default(),
            CancellationToken::new(),
        );
        sync.broker_sync(settings, fleetlog_testkit::device_key());
        sync
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some(&self.token), method, path, body).await
    }

    /// An operator's access token in another tenant.
    fn token_of_another_tenant(&self) -> String {
        let caller = Caller {
            user_id: UserId::parse("u-mallory").unwrap(),
            tenant: TenantId::parse("globex").unwrap(),
            session_id: SessionId::parse("s2").unwrap(),
            roles: vec![Role::Operator],
            expires_at: None,
        };
        self.auth.access_token(&caller, Utc::now()).unwrap()
    }

    async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
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
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Registers a device and answers its token.
    async fn register(&self, id: &str) -> String {
        let (status, created) = self
            .call(
                Method::POST,
                "/api/v1/devices",
                Some(json!({"device_id": id, "name": id, "model": "m1"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["device_token"].as_str().unwrap().to_string()
    }

    /// How many readings of `device` the log holds.
    async fn readings_of(&self, device: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'device' AND aggregate_id = $1
               AND event_type = 'TelemetryRecorded'",
        )
        .bind(device)
        .fetch_one(&self.db.pool)
        .await
        .unwrap()
    }

    async fn wait_for_readings(&self, device: &str, count: i64) {
        let deadline = Instant::now() + WITHIN;
        while self.readings_of(device).await < count {
            assert!(
                Instant::now() < deadline,
                "{device} has no {count} readings"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn admin(&self) -> DynsecAdmin {
        DynsecAdmin::connect(
            &self.broker.sync_url().parse().unwrap(),
            "test-admin",
            Duration::from_secs(10),
        )
        .await
        .unwrap()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An MQTT client under test: its CONNACK, what arrives on its subscriptions, and whether the
/// broker closed it.
struct Client {
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(String, Value)>,
    subacks: mpsc::UnboundedReceiver<Vec<rumqttc::SubscribeReasonCode>>,
    closed: tokio::sync::watch::Receiver<bool>,
}

/// Connects once, without retrying; `Err` with the broker's answer when it refuses.
async fn connect(options: MqttOptions) -> Result<Client, String> {
    let mut options = options;
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 100);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
    let (subacks_tx, subacks) = mpsc::unbounded_channel();
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(Ok(ack.code));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let body = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                    let _ = inbox_tx.send((publish.topic.clone(), body));
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let _ = subacks_tx.send(ack.return_codes);
                }
                Ok(_) => {}
                Err(error) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(Err(error.to_string()));
                    }
                    let _ = closed_tx.send(true);
                    return;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), connected).await {
        Ok(Ok(Ok(ConnectReturnCode::Success))) => Ok(Client {
            client,
            inbox,
            subacks,
            closed,
        }),
        Ok(Ok(Ok(code))) => Err(format!("{code:?}")),
        Ok(Ok(Err(error))) => Err(error),
        other => Err(format!("no answer: {other:?}")),
    }
}

/// Connects as `device` with `token`, retrying until the broker takes it (the sync needs a
/// moment after registration).
async fn connect_when_admitted(broker: &MosquittoServer, device: &str, token: &str) -> Client {
    let deadline = Instant::now() + WITHIN;
    loop {
        match connect(broker.device_options(device, token)).await {
            Ok(client) => return client,
            Err(refusal) => assert!(
                Instant::now() < deadline,
                "{device} was not admitted: {refusal}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the broker refuses `device` with `token`.
async fn wait_until_refused(broker: &MosquittoServer, device: &str, token: &str) -> String {
    let deadline = Instant::now() + WITHIN;
    loop {
        match connect(broker.device_options(device, token)).await {
            Err(refusal) => return refusal,
            Ok(client) => {
                let _ = client.client.disconnect().await;
                assert!(
                    Instant::now() < deadline,
                    "{device} is still admitted with that token"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until_closed(client: &mut Client, what: &str) {
    let closed = tokio::time::timeout(WITHIN, client.closed.wait_for(|closed| *closed)).await;
    assert!(closed.is_ok(), "{what}: the broker kept the session");
}

impl Client {
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let codes = tokio::time::timeout(Duration::from_secs(5), self.subacks.recv())
            .await
            .expect("a SUBACK")
            .expect("the connection stands");
        codes
            .iter()
            .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)))
    }

    async fn publish(&self, topic: &str, body: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_is_known_to_the_broker_by_its_token_and_confined_to_its_own_topics() {
    let stack = Stack::start().await;

    // Nobody gets in without credentials, or with made-up ones.
    let anonymous = connect(MqttOptions::new(
        "stranger",
        "127.0.0.1",
        stack.broker.port(),
    ))
    .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    let guessing = stack.broker.device_options("sensor-a", "not-the-token");
    assert!(connect(guessing).await.is_err());

    let token_a = stack.register("sensor-a").await;
    let token_b = stack.register("sensor-b").await;
    let mut device_a = connect_when_admitted(&stack.broker, "sensor-a", &token_a).await;

    // Its own id is its only client id: another would take over someone's session.
    let mut as_bridge = stack.broker.device_options("sensor-a", &token_a);
    as_bridge.set_client_id("fleetlog.ingest".into());
    assert!(
        connect(as_bridge).await.is_err(),
        "a device used another client id"
    );
    // B's token is no key for A.
    assert!(connect(stack.broker.device_options("sensor-a", &token_b))
        .await
        .is_err());

    // Its own topics only: nothing of B's, no wildcards over others, no shared group.
    assert!(device_a.subscribe("devices/sensor-a/commands").await);
    assert!(device_a.subscribe("devices/sensor-a/desired").await);
    for filter in [
        "devices/sensor-b/commands",
        "devices/sensor-b/desired",
        "devices/sensor-b/ota",
        "devices/+/commands",
        "devices/#",
        "#",
        "$share/fleetlog-ingest/devices/+/data",
        "$CONTROL/dynamic-security/v1/response",
    ] {
        assert!(
            !device_a.subscribe(filter).await,
            "sensor-a may subscribe to {filter}"
        );
    }

    // What it publishes as itself is recorded; what it publishes as B is not.
    device_a
        .publish("devices/sensor-b/data", json!({"temperature": 99.0}))
        .await;
    device_a
        .publish("devices/sensor-a/data", json!({"temperature": 21.0}))
        .await;
    stack.wait_for_readings("sensor-a", 1).await;
    // A forged reply to a command of B's is not taken either.
    let (status, issued) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-b/commands",
            Some(json!({"name": "set_wifi", "params": {"psk": "hunter2"}})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{issued}");
    let command_id = issued["command_id"].as_str().unwrap();
    device_a
        .publish(
            &format!("devices/sensor-b/commands/{command_id}/reply"),
            json!({"status": "succeeded", "result": {"forged": true}}),
        )
        .await;
    device_a
        .publish("devices/sensor-a/data", json!({"temperature": 22.0}))
        .await;
    stack.wait_for_readings("sensor-a", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stack.readings_of("sensor-b").await, 0);
    let replies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = 'sensor-b'
           AND event_type IN ('CommandSucceeded', 'CommandFailed')",
    )
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(replies, 0, "a forged reply closed sensor-b's command");

    // A command to A reaches A, and no one else's to A.
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-a/commands",
            Some(json!({"name": "reboot"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (topic, body) = tokio::time::timeout(WITHIN, device_a.inbox.recv())
        .await
        .expect("the command reaches the device")
        .unwrap();
    assert_eq!(topic, "devices/sensor-a/commands");
    assert_eq!(body["name"], "reboot");
    // B's command (with its secret parameter) never came to A.
    assert!(device_a.inbox.try_recv().is_err());

    // The ingest account may not talk to devices; only dispatch may.
    let ingest = connect(
        stack
            .broker
            .options_as(INGEST_USERNAME, "fleetlog.ingest.test"),
    )
    .await
    .unwrap();
    ingest
        .publish(
            "devices/sensor-a/commands",
            json!({"command_id": "forged", "name": "wipe"}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        device_a.inbox.try_recv().is_err(),
        "the ingest account reached a device"
    );
    drop(ingest);

    // Rotation: the old token is refused and the old session ends; the new one works.
    let (status, rotated) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-a/credentials/rotate",
            Some(json!({"reason": "suspected leak"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_token = rotated["device_token"].as_str().unwrap().to_string();
    assert_ne!(new_token, token_a);
    wait_until_closed(&mut device_a, "rotation").await;
    wait_until_refused(&stack.broker, "sensor-a", &token_a).await;
    let device_a = connect_when_admitted(&stack.broker, "sensor-a", &new_token).await;
    drop(device_a);

    // Revocation and decommissioning shut the device out.
    let mut device_b = connect_when_admitted(&stack.broker, "sensor-b", &token_b).await;
    let (status, _) = stack
        .call(Method::DELETE, "/api/v1/devices/sensor-b", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_until_closed(&mut device_b, "decommissioning").await;
    wait_until_refused(&stack.broker, "sensor-b", &token_b).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-a/credentials/revoke",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_until_refused(&stack.broker, "sensor-a", &new_token).await;
    let (status, problem) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-a/credentials/revoke",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");

    // Each step is in the device's history with its reason and actor, and no secret.
    let (status, history) = stack
        .call(
            Method::GET,
            "/api/v1/devices/sensor-a/events?limit=50",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = history.to_string();
    assert!(!text.contains(&token_a) && !text.contains(&new_token));
    assert!(!text.contains("secret_hash") && !text.contains("\"salt\""));
    let credential_events: Vec<&Value> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| {
            item["event_type"]
                .as_str()
                .unwrap()
                .starts_with("DeviceCredentials")
        })
        .collect();
    assert_eq!(credential_events.len(), 3, "{history}");
    assert_eq!(
        credential_events[1]["payload"]["DeviceCredentialsRotated"]["reason"],
        "suspected leak"
    );
    assert_eq!(credential_events[2]["actor"], "user:u-otto");

    // Nor does the event stream carry them, to any of its readers.
    let jetstream = async_nats::jetstream::new(stack.nats.clone());
    let stream = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap();
    let mut rotations = 0;
    let deadline = Instant::now() + WITHIN;
    while rotations < 2 {
        assert!(
            Instant::now() < deadline,
            "the rotations did not reach the stream"
        );
        rotations = 0;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: "fleetlog.events.device.sensor-a.control".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.unwrap();
        for _ in 0..pending {
            let message = futures::StreamExt::next(&mut messages)
                .await
                .unwrap()
                .unwrap();
            let body = String::from_utf8(message.payload.to_vec()).unwrap();
            assert!(
                !body.contains("secret_hash") && !body.contains("\"salt\""),
                "{body}"
            );
            if body.contains("DeviceCredentialsRotated") {
                rotations += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_credential_is_lost_to_a_restart_of_the_sync_or_the_broker_or_to_drift() {
    let mut stack = Stack::start().await;
    let token = stack.register("sensor-c").await;
    drop(connect_when_admitted(&stack.broker, "sensor-c", &token).await);

    // The sync stops; a device registered meanwhile is admitted once it is back.
    drop(stack.sync.take());
    let late_token = stack.register("sensor-d").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        connect(stack.broker.device_options("sensor-d", &late_token))
            .await
            .is_err()
    );
    stack.sync = Some(stack.sync_platform());
    drop(connect_when_admitted(&stack.broker, "sensor-d", &late_token).await);

    // The broker restarts: its state was saved, everyone still gets in.
    stack.broker.kill();
    stack.broker.resume();
    drop(connect_when_admitted(&stack.broker, "sensor-c", &token).await);

    // Drift: a device's client deleted by hand, a stray device client added. A restarted
    // sync puts both right, and a second sync at the same time changes nothing.
    let admin = stack.admin().await;
    assert!(admin.remove_device("sensor-c").await.unwrap());
    admin
        .ensure_device(
            "devices",
            "sensor-ghost",
            "ghost-password",
            "credential v1 0",
        )
        .await
        .unwrap();
    admin.close().await;
    assert!(connect(stack.broker.device_options("sensor-c", &token))
        .await
        .is_err());
    drop(stack.sync.take());
    stack.sync = Some(stack.sync_platform());
    let _standby = stack.sync_platform();
    drop(connect_when_admitted(&stack.broker, "sensor-c", &token).await);
    wait_until_refused(&stack.broker, "sensor-ghost", "ghost-password").await;
    drop(connect_when_admitted(&stack.broker, "sensor-d", &late_token).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_and_roles_speak_tls_with_a_private_ca() {
    // The test's own clients speak TLS too; the roles install the provider themselves.
    fleetlog_broker::install_crypto_provider();
    let stack = Stack::start_with(true).await;
    let token = stack.register("sensor-t").await;
    let on_tls_port = || {
        let mut options = MqttOptions::new("sensor-t", "127.0.0.1", stack.broker.tls_port());
        options.set_credentials("sensor-t", &token);
        options
    };
    let over_tls = || {
        let mut options = on_tls_port();
        options.set_transport(rumqttc::Transport::tls(stack.broker.ca_pem(), None, None));
        options
    };
    let deadline = Instant::now() + WITHIN;
    let mut device = loop {
        match connect(over_tls()).await {
            Ok(device) => break device,
            Err(refusal) => assert!(Instant::now() < deadline, "not admitted: {refusal}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Telemetry over TLS reaches the log through the ingest's TLS connection; a command comes
    // back through the dispatcher's.
    assert!(device.subscribe("devices/sensor-t/commands").await);
    device
        .publish("devices/sensor-t/data", json!({"temperature": 20.5}))
        .await;
    stack.wait_for_readings("sensor-t", 1).await;
    let (status, _) = stack
        .call(
            Method::POST,
            "/api/v1/devices/sensor-t/commands",
            Some(json!({"name": "reboot"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (topic, _) = tokio::time::timeout(WITHIN, device.inbox.recv())
        .await
        .expect("the command arrives over TLS")
        .unwrap();
    assert_eq!(topic, "devices/sensor-t/commands");

    // A client that does not trust the CA, or does not speak TLS, gets nowhere.
    let mut untrusting = on_tls_port();
    untrusting.set_transport(rumqttc::Transport::tls_with_default_config());
    assert!(connect(untrusting).await.is_err());
    assert!(connect(on_tls_port()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_device_provisions_itself_with_a_key_and_connects_with_what_it_received() {
    let stack = Stack::start().await;
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/provisioning-keys",
            Some(json!({"name": "line 3", "max_uses": 2, "model": "thermo", "tags": ["line-3"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["provisioning_key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    let provision = |device: &str, key: &str, model: Option<&str>| {
        let mut body = json!({"provisioning_key": key, "device_id": device});
        if let Some(model) = model {
            body["model"] = json!(model);
        }
        body
    };
    let post = |body: Value| stack.call_as(None, Method::POST, "/api/v1/provision", Some(body));

    // Wrong keys get nowhere, and use nothing.
    for bad in [
        format!("{key_id}.{}", "0".repeat(64)),
        "no-dot-at-all".to_string(),
        format!("unknown.{}", "0".repeat(64)),
        String::new(),
    ] {
        let (status, problem) = post(provision("p-1", &bad, None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}: {problem}");
    }
    let (status, problem) = post(provision("p-1", &key, Some("hygro"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("thermo"),
        "{problem}"
    );

    // A right key registers the device in the key's tenant, with its model and tags, and the
    // credentials it answers get the device into the broker.
    let (status, provisioned) = post(provision("p-1", &key, None)).await;
    assert_eq!(status, StatusCode::CREATED, "{provisioned}");
    assert_eq!(provisioned["mqtt_username"], "p-1");
    let token = provisioned["device_token"].as_str().unwrap().to_string();
    let device = connect_when_admitted(&stack.broker, "p-1", &token).await;
    device
        .publish("devices/p-1/data", json!({"temperature": 19.0}))
        .await;
    stack.wait_for_readings("p-1", 1).await;
    let (tenant, model, tags): (String, String, Vec<String>) = stack
        ._platform
        .bus()
        .devices()
        .inspect("p-1", |device, _| {
            (
                device.tenant.as_ref().unwrap().to_string(),
                device.model.clone(),
                device.tags.clone(),
            )
        })
        .await
        .unwrap();
    assert_eq!((tenant.as_str(), model.as_str()), ("acme", "thermo"));
    assert_eq!(tags, ["line-3"]);

    // The same id again is taken, and gives its use back.
    let (status, _) = post(provision("p-1", &key, None)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, shown) = stack
        .call(
            Method::GET,
            &format!("/api/v1/provisioning-keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["uses"], 1, "{shown}");
    assert!(!shown.to_string().contains(&key[key_id.len() + 1..]));
    // Another tenant does not see the key.
    let other = stack.token_of_another_tenant();
    let (status, _) = stack
        .call_as(
            Some(&other),
            Method::GET,
            &format!("/api/v1/provisioning-keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Two more at once for the last use: exactly one gets it; the key is then used up.
    let (first, second) = tokio::join!(
        post(provision("p-2", &key, None)),
        post(provision("p-3", &key, None))
    );
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::FORBIDDEN],
        "{first:?} {second:?}"
    );
    let (status, problem) = post(provision("p-4", &key, None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("registered its 2"),
        "{problem}"
    );

    // One id asked for twice at once: one device, one use.
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/provisioning-keys",
            Some(json!({"name": "open", "model": "thermo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let open = created["provisioning_key"].as_str().unwrap().to_string();
    let open_id = created["key_id"].as_str().unwrap().to_string();
    let (first, second) = tokio::join!(
        post(provision("p-twice", &open, None)),
        post(provision("p-twice", &open, None))
    );
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::CONFLICT],
        "{first:?} {second:?}"
    );
    let (_, shown) = stack
        .call(
            Method::GET,
            &format!("/api/v1/provisioning-keys/{open_id}"),
            None,
        )
        .await;
    assert_eq!(shown["uses"], 1, "{shown}");

    // A revoked key is refused with that reason.
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/provisioning-keys",
            Some(json!({"name": "spare"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let spare = created["provisioning_key"].as_str().unwrap().to_string();
    let spare_id = created["key_id"].as_str().unwrap().to_string();
    let (status, _) = stack
        .call(
            Method::POST,
            &format!("/api/v1/provisioning-keys/{spare_id}/revoke"),
            Some(json!({"reason": "line closed"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, problem) = post(provision("p-5", &spare, Some("thermo"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        problem["detail"].as_str().unwrap().contains("revoked"),
        "{problem}"
    );

    // Each step is in the log, with the key as actor.
    let steps: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, metadata ->> 'actor' FROM events
          WHERE (aggregate_type = 'provisioning_key' AND aggregate_id = $1)
             OR (aggregate_type = 'device' AND aggregate_id = 'p-1')
          ORDER BY global_position",
    )
    .bind(&key_id)
    .fetch_all(&stack.db.pool)
    .await
    .unwrap();
    let actor = format!("provisioning-key:{key_id}");
    for step in [
        "ProvisioningKeyClaimed",
        "DeviceRegistered",
        "DeviceCredentialsRotated",
    ] {
        assert!(
            steps.iter().any(|(kind, by)| kind == step && *by == actor),
            "{step} by {actor} missing: {steps:?}"
        );
    }
    assert!(steps
        .iter()
        .any(|(kind, by)| kind == "ProvisioningKeyCreated" && by == "user:u-otto"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_device_provisions_itself_over_mqtt() {
    let stack = Stack::start().await;
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/provisioning-keys",
            Some(json!({"name": "line 4", "max_uses": 5, "model": "thermo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["provisioning_key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    let secret = key[key_id.len() + 1..].to_string();
    let account = fleetlog_protocol::provisioning::username_of(&key_id);
    let options = || {
        let mut options = MqttOptions::new(account.clone(), "127.0.0.1", stack.broker.port());
        options.set_credentials(account.clone(), secret.clone());
        options
    };
    // The key's account reaches the broker within seconds of its creation.
    let deadline = Instant::now() + WITHIN;
    let mut claimant = loop {
        match connect(options()).await {
            Ok(client) => break client,
            Err(refusal) => assert!(Instant::now() < deadline, "no key account: {refusal}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Its holders read only the answer to their own request.
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let root = fleetlog_protocol::provisioning::ROOT;
    assert!(
        !claimant
            .subscribe(&format!("{root}/{key_id}/+/response"))
            .await,
        "a key holder may read every answer"
    );
    assert!(!claimant.subscribe(&format!("{root}/#")).await);
    assert!(
        claimant
            .subscribe(&fleetlog_protocol::provisioning::response_topic(
                &key_id,
                &request_id
            ))
            .await
    );
    let request = |device: &str, key: &str| json!({"provisioning_key": key, "device_id": device});
    claimant
        .publish(
            &fleetlog_protocol::provisioning::request_topic(&key_id, &request_id),
            request("m-1", &key),
        )
        .await;
    let (_, answer) = tokio::time::timeout(WITHIN, claimant.inbox.recv())
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(answer["status"], "provisioned", "{answer}");
    assert_eq!(answer["mqtt_client_id"], "m-1");
    let token = answer["device_token"].as_str().unwrap().to_string();
    drop(connect_when_admitted(&stack.broker, "m-1", &token).await);

    // The same id again is taken; a key that is not this account's is unknown.
    claimant
        .publish(
            &fleetlog_protocol::provisioning::request_topic(&key_id, &request_id),
            request("m-1", &key),
        )
        .await;
    let (_, answer) = tokio::time::timeout(WITHIN, claimant.inbox.recv())
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(
        (answer["status"].as_str(), answer["code"].as_str()),
        (Some("refused"), Some("taken")),
        "{answer}"
    );
    claimant
        .publish(
            &fleetlog_protocol::provisioning::request_topic(&key_id, &request_id),
            request("m-2", &format!("other.{secret}")),
        )
        .await;
    let (_, answer) = tokio::time::timeout(WITHIN, claimant.inbox.recv())
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(answer["code"], "unknown_key", "{answer}");

    // A revoked key's account is gone within seconds.
    let (status, _) = stack
        .call(
            Method::POST,
            &format!("/api/v1/provisioning-keys/{key_id}/revoke"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_until_closed(&mut claimant, "revocation of the key").await;
    let deadline = Instant::now() + WITHIN;
    while connect(options()).await.is_ok() {
        assert!(Instant::now() < deadline, "the revoked key still connects");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
