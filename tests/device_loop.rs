//! The loop through a device, end to end with every server real: a command issued over REST
//! reaches the device's MQTT topic and its reply marks the command done; desired properties
//! reach the device (retained) and the delta closes when it reports them; an unanswered
//! command expires; a restarted dispatcher sends nothing twice; a dispatcher whose broker
//! went away with publishes unconfirmed sends the next ones at once.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use chrono::Utc;
use fleetlog::{ApiParts, Platform};
use fleetlog_api::auth::{Auth, Caller};
use fleetlog_api::HttpSettings;
use fleetlog_commands::StoreSettings;
use fleetlog_dispatch::DispatchSettings;
use fleetlog_domain::user::Role;
use fleetlog_domain::{SessionId, TenantId, UserId};
use fleetlog_ingest::bridge::IngestSettings;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Stack {
    /// First, so its roles stop before the servers go.
    _platform: Platform,
    router: axum::Router,
    token: String,
    db: TestDatabase,
    broker: MosquittoServer,
    nats: async_nats::Client,
    shutdown: CancellationToken,
    _nats_server: NatsServer,
}

impl Stack {
    async fn start() -> Self {
        let db = TestDatabase::create().await;
        let nats_server = NatsServer::start();
        let broker = MosquittoServer::start();
        let nats = fleetlog_nats::connect(&nats_server.url()).await.unwrap();
        let shutdown = CancellationToken::new();
        let relay = RelaySettings {
            poll_interval: Duration::from_millis(50),
            ..RelaySettings::default()
        };
        let mut ingest = IngestSettings::new(broker.ingest_url().parse().unwrap());
        ingest.shards = 2;
        let mut platform = Platform::new(
            db.pool.clone(),
            nats.clone(),
            StoreSettings::default(),
            shutdown.clone(),
        );
        platform
            .relay(relay)
            .projections(WorkerSettings::default())
            .ingest(ingest);
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
                auth,
                firmware: None,
                mqtt: None,
                metrics: None,
                http: HttpSettings::default(),
                broker_auth: None,
            })
            .await
            .unwrap();
        Self {
            router: fleetlog_api::router(state),
            _platform: platform,
            token,
            db,
            broker,
            nats,
            shutdown,
            _nats_server: nats_server,
        }
    }

    /// A dispatcher in a platform of its own, as another process would run it.
    fn dispatcher(&self) -> Platform {
        let mut settings = DispatchSettings::new(self.broker.dispatch_url().parse().unwrap());
        settings.expiry_interval = Duration::from_millis(200);
        let mut dispatcher = Platform::new(
            self.db.pool.clone(),
            self.nats.clone(),
            StoreSettings::default(),
            CancellationToken::new(),
        );
        dispatcher.dispatch(settings);
        dispatcher
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
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

    /// Polls `path` until `done` holds for its body.
    async fn wait_for(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.call(Method::GET, path, None).await;
            if status == StatusCode::OK && done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A device on MQTT: what arrives on its topics comes out of `inbox` as (topic, JSON).
struct SimulatedDevice {
    client: AsyncClient,
    inbox: mpsc::UnboundedReceiver<(String, Value)>,
}

impl SimulatedDevice {
    async fn connect(broker: &MosquittoServer, id: &str, client_id: &str) -> Self {
        let options = broker.simulator_options(client_id);
        let (client, mut events) = AsyncClient::new(options, 100);
        let (sender, inbox) = mpsc::unbounded_channel();
        let (subscribed, ready) = tokio::sync::oneshot::channel();
        let mut subscribed = Some(subscribed);
        let subscriber = client.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for topic in ["commands", "desired", "ota"] {
                            subscriber
                                .subscribe(format!("devices/{id}/{topic}"), QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(subscribed) = subscribed.take() {
                            let _ = subscribed.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let body = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                        let _ = sender.send((publish.topic.clone(), body));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("device subscribed")
            .unwrap();
        Self { client, inbox }
    }

    async fn next(&mut self, patience: Duration) -> Option<(String, Value)> {
        tokio::time::timeout(patience, self.inbox.recv())
            .await
            .ok()
            .flatten()
    }

    async fn publish(&self, topic: String, body: Value) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_desired_properties_travel_to_the_device_and_back() {
    let stack = Stack::start().await;
    let dispatcher = stack.dispatcher();
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/devices",
            Some(json!({"device_id": "d1", "name": "Boiler", "model": "thermo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let mut device = SimulatedDevice::connect(&stack.broker, "d1", "d1-sim").await;

    // A command over REST reaches the device; its reply marks it done.
    let (status, accepted) = stack
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "reboot", "params": {"delay_secs": 5}})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let command_id = accepted["command_id"].as_str().unwrap().to_string();
    let (topic, command) = device
        .next(Duration::from_secs(30))
        .await
        .expect("a command");
    assert_eq!(topic, "devices/d1/commands");
    assert_eq!(command["command_id"], command_id.as_str());
    assert_eq!(command["name"], "reboot");
    assert_eq!(command["params"]["delay_secs"], 5);
    device
        .publish(
            format!("devices/d1/commands/{command_id}/reply"),
            json!({"status": "succeeded", "result": {"rebooted": true}}),
        )
        .await;
    let done = stack
        .wait_for(
            &format!("/api/v1/devices/d1/commands/{command_id}"),
            "the reply",
            |c| c["status"] == "succeeded",
        )
        .await;
    assert_eq!(done["result"]["rebooted"], true);

    // Desired properties arrive retained; reporting them closes the delta.
    let (status, _) = stack
        .call(
            Method::PUT,
            "/api/v1/devices/d1/desired",
            Some(json!({"mode": "eco", "interval_secs": 60})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (topic, desired) = device.next(Duration::from_secs(30)).await.expect("desired");
    assert_eq!(topic, "devices/d1/desired");
    assert_eq!(
        desired["desired"],
        json!({"mode": "eco", "interval_secs": 60})
    );
    assert_eq!(desired["version"], 1);
    stack
        .wait_for("/api/v1/devices/d1", "the open delta", |d| {
            d["delta"] == json!({"mode": "eco", "interval_secs": 60})
        })
        .await;
    device
        .publish(
            "devices/d1/status".into(),
            json!({"mode": "eco", "interval_secs": 60}),
        )
        .await;
    stack
        .wait_for("/api/v1/devices/d1", "the closed delta", |d| {
            d["delta"] == json!({})
        })
        .await;
    // A device that connects later gets the desired document from the retained message.
    let mut late = SimulatedDevice::connect(&stack.broker, "d1", "d1-late").await;
    let (topic, retained) = late.next(Duration::from_secs(10)).await.expect("retained");
    assert_eq!(topic, "devices/d1/desired");
    assert_eq!(retained["version"], 1);

    // The dispatcher has a cache of its own, as a dispatcher in another process would: each
    // later document reaches the device as it was set, not as the dispatcher first saw it.
    for (version, mode) in [(2, "away"), (3, "night")] {
        let (status, _) = stack
            .call(
                Method::PUT,
                "/api/v1/devices/d1/desired",
                Some(json!({ "mode": mode })),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let (topic, desired) = device.next(Duration::from_secs(30)).await.expect("desired");
        assert_eq!(topic, "devices/d1/desired");
        assert_eq!(desired["version"], version);
        assert_eq!(desired["desired"]["mode"], mode);
    }
    while late.next(Duration::from_millis(200)).await.is_some() {}

    // A restarted dispatcher resumes after what the broker confirmed: nothing is sent twice.
    dispatcher.shutdown().cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _again = stack.dispatcher();
    let resent = device.next(Duration::from_secs(2)).await;
    assert!(
        resent.is_none(),
        "a restarted dispatcher sent {resent:?} again"
    );

    // A command nobody answers expires.
    let (_, accepted) = stack
        .call(
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "calibrate", "ttl_secs": 1})),
        )
        .await;
    let command_id = accepted["command_id"].as_str().unwrap().to_string();
    let (_, sent) = device
        .next(Duration::from_secs(30))
        .await
        .expect("the command");
    assert_eq!(sent["command_id"], command_id.as_str());
    let expired = stack
        .wait_for(
            &format!("/api/v1/devices/d1/commands/{command_id}"),
            "the expiry",
            |c| c["status"] == "expired",
        )
        .await;
    assert!(expired["finished_at"].is_string());
}

/// The dispatcher pairs its waiters with packet ids in the order its publishes go out. A
/// broker that dies with a publish unconfirmed (here: frozen, then killed) left that waiter
/// behind: after the reconnect it took the next publish's PUBACK, and that publish, and every
/// one after it, waited out its 20 s timeout before its event came back. Each connection now
/// starts with a fresh client, so the command in flight goes out again and the next one at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_whose_broker_died_mid_publish_sends_the_next_ones_at_once() {
    let mut stack = Stack::start().await;
    let _dispatcher = stack.dispatcher();
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/devices",
            Some(json!({"device_id": "d1", "name": "Boiler", "model": "thermo"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let mut device = SimulatedDevice::connect(&stack.broker, "d1", "d1-sim").await;
    async fn issue(stack: &Stack, name: &str) {
        let (status, accepted) = stack
            .call(
                Method::POST,
                "/api/v1/devices/d1/commands",
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    }
    issue(&stack, "first").await;
    let (_, first) = device.next(Duration::from_secs(30)).await.expect("first");
    assert_eq!(first["name"], "first");

    // The broker stops answering while a command is on its way, then dies.
    stack.broker.freeze();
    issue(&stack, "in_flight").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.broker.kill();
    stack.broker.resume();
    issue(&stack, "after").await;

    let started = Instant::now();
    let mut names = Vec::new();
    while names.len() < 2 {
        let (_, command) = device
            .next(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("only {names:?} arrived after the broker came back"));
        let name = command["name"].as_str().unwrap_or_default().to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.sort();
    assert_eq!(names, ["after", "in_flight"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the commands took {:?}",
        started.elapsed()
    );
}
