//! Firmware rollouts end to end with every server real: an image uploaded and released over
//! REST, a 3-wave rollout over simulated devices speaking MQTT (some succeed, some fail, one
//! never answers, one is offline when its wave starts), waves advancing on the success
//! threshold, the error threshold pausing one rollout and aborting another, devices downloading
//! the image with a resumed ranged download, and `replay --verify` of the rollout model; and a
//! rollout manager killed again and again mid-rollout that neither sends twice nor skips a
//! device, with an offline device timing out when its window closes; and outcomes whose events
//! were acked but never handled, recovered by the manager's sweep from the devices.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use chrono::Utc;
use fleetlog::{ApiParts, Platform};
use fleetlog_api::auth::{Auth, Caller};
use fleetlog_api::HttpSettings;
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_dispatch::DispatchSettings;
use fleetlog_domain::user::Role;
use fleetlog_domain::{SessionId, TenantId, UserId};
use fleetlog_firmware::{FirmwareStore, ImageSigner};
use fleetlog_ingest::bridge::IngestSettings;
use fleetlog_process::rollout_manager::{RolloutManager, RolloutManagerSettings};
use fleetlog_projections::DeviceModels;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use secrecy::SecretString;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

struct Stack {
    /// First, so its roles stop before the servers go.
    _platform: Platform,
    router: axum::Router,
    token: String,
    db: TestDatabase,
    broker: MosquittoServer,
    shutdown: CancellationToken,
    _nats_server: NatsServer,
    nats: async_nats::Client,
    firmware_dir: std::path::PathBuf,
}

/// Whether the stack runs a rollout manager of its own until the end of the test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Manager {
    Running,
    LeftToTheTest,
}

impl Stack {
    async fn start(manager: Manager) -> Self {
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
        let mut dispatch = DispatchSettings::new(broker.dispatch_url().parse().unwrap());
        dispatch.public_url = Some("https://fleet.example.com/".into());
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
        if manager == Manager::Running {
            platform.rollout_manager(ROLLOUT_MANAGER);
        }

        let firmware_dir = std::env::temp_dir().join(format!("fleetlog-rollout-{}", uuid()));
        let store = FirmwareStore::local(
            &firmware_dir.join("images"),
            1 << 20,
            ImageSigner::from_file(&firmware_dir.join("signing.pem"), true).unwrap(),
        )
        .unwrap();
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
                firmware: Some(Arc::new(store)),
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
            shutdown,
            _nats_server: nats_server,
            nats,
            firmware_dir,
        }
    }

    /// A rollout manager of this stack, to run (and kill) as the test likes.
    fn rollout_manager(&self) -> RolloutManager {
        rollout_manager(&self.db, &self.nats)
    }

    async fn request(&self, request: Request<Body>) -> (StatusCode, axum::body::Bytes) {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 4 << 20)
            .await
            .unwrap();
        (status, bytes)
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
        let (status, bytes) = self.request(request.body(body).unwrap()).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Polls `path` until `done` holds for its body.
    async fn wait_for(&self, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
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

    /// Waits until the devices read model shows `count` devices online.
    async fn wait_until_online(&self, count: usize) {
        self.wait_for("/api/v1/devices?online=true", "devices online", |page| {
            page["items"]
                .as_array()
                .is_some_and(|items| items.len() == count)
        })
        .await;
    }

    /// Registers a device of model `thermo`; answers its token.
    async fn register(&self, id: &str) -> String {
        let (status, created) = self
            .call(
                Method::POST,
                "/api/v1/devices",
                Some(json!({"device_id": id, "name": id, "model": "thermo"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["device_token"].as_str().unwrap().to_string()
    }

    /// Uploads and releases an image, and waits for the catalogue to show it released;
    /// answers its id and its catalogue entry.
    async fn release_firmware(&self, version: &str, image: &[u8]) -> (String, Value) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!(
                "/api/v1/firmware?model=thermo&version={version}&compatible_models=thermo"
            ))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Body::from(image.to_vec()))
            .unwrap();
        let (status, body) = self.request(request).await;
        assert_eq!(status, StatusCode::CREATED, "{body:?}");
        let id = format!("thermo@{version}");
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/api/v1/firmware/{id}/release"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let firmware = self
            .wait_for(&format!("/api/v1/firmware/{id}"), "the release", |f| {
                f["status"] == "released"
            })
            .await;
        (id, firmware)
    }

    /// The image as a device downloads it: the first 1,000 bytes, then (as after a cut
    /// connection) the rest with `Range` and `If-Range`.
    async fn download_resumed(&self, ota: &Value, device: &str, token: &str) -> Vec<u8> {
        let path = ota["download_path"].as_str().unwrap();
        let get = |range: String, if_range: Option<&str>| {
            let mut request = Request::builder()
                .uri(path)
                .header("x-device-id", device)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .header(header::RANGE, range);
            if let Some(etag) = if_range {
                request = request.header(header::IF_RANGE, etag);
            }
            request.body(Body::empty()).unwrap()
        };
        let first = self.router.clone().oneshot(get("bytes=0-999".into(), None));
        let first = first.await.unwrap();
        assert_eq!(first.status(), StatusCode::PARTIAL_CONTENT);
        let etag = first.headers()[header::ETAG].to_str().unwrap().to_string();
        let mut image = axum::body::to_bytes(first.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec();
        let (status, rest) = self
            .request(get(format!("bytes={}-", image.len()), Some(&etag)))
            .await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        image.extend_from_slice(&rest);
        image
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.firmware_dir);
    }
}

/// A manager that sweeps often and gets unacknowledged events back soon after a crash.
const ROLLOUT_MANAGER: RolloutManagerSettings = RolloutManagerSettings {
    sweep_interval: Duration::from_millis(300),
    ack_wait: Duration::from_secs(1),
};

fn rollout_manager(db: &TestDatabase, nats: &async_nats::Client) -> RolloutManager {
    RolloutManager::new(
        CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        async_nats::jetstream::new(nats.clone()),
        ROLLOUT_MANAGER,
    )
}

fn uuid() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or(0)
    )
}

/// How a simulated device answers an update.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    /// Downloads (resuming a cut download), checks the digest, installs, reboots and reports
    /// the new version in its status.
    Succeeds,
    /// Downloads, then reports a failure.
    Fails,
    /// Takes the update and never says anything again.
    Silent,
    /// Takes an update to this version and never finishes it; succeeds with any other.
    HangsOn(&'static str),
}

/// A device on MQTT that handles OTA messages by its behaviour. Each install it is asked for
/// is recorded in `received` so the test can check nothing was sent twice; each cancel in
/// `cancels`.
struct SimulatedDevice {
    received: Arc<std::sync::Mutex<Vec<Value>>>,
    cancels: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl SimulatedDevice {
    async fn connect(stack: &Arc<Stack>, id: &str, token: String, behaviour: Behaviour) -> Self {
        let options = stack.broker.simulator_options(&format!("{id}-sim"));
        let (client, mut events) = AsyncClient::new(options, 100);
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let cancels = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (subscribed, ready) = tokio::sync::oneshot::channel();
        let mut subscribed = Some(subscribed);
        let (id, seen, stack) = (id.to_string(), received.clone(), stack.clone());
        let canceled = cancels.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(format!("devices/{id}/ota"), QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        // Online once it says something.
                        let heartbeat = json!({"firmware_version": "1.0.0"}).to_string();
                        client
                            .publish(
                                format!("devices/{id}/heartbeat"),
                                QoS::AtLeastOnce,
                                false,
                                heartbeat,
                            )
                            .await
                            .unwrap();
                        if let Some(subscribed) = subscribed.take() {
                            let _ = subscribed.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let ota: Value = serde_json::from_slice(&publish.payload).unwrap();
                        if ota["action"] == "cancel" {
                            canceled.lock().unwrap().push(ota);
                            continue;
                        }
                        assert_eq!(ota["action"], "install", "{ota}");
                        seen.lock().unwrap().push(ota.clone());
                        let (client, id, token, stack) =
                            (client.clone(), id.clone(), token.clone(), stack.clone());
                        tokio::spawn(async move {
                            answer(&stack, &client, &id, &token, &ota, behaviour).await;
                        });
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
        Self { received, cancels }
    }

    fn updates_received(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn cancels_received(&self) -> Vec<Value> {
        self.cancels.lock().unwrap().clone()
    }
}

async fn answer(
    stack: &Stack,
    client: &AsyncClient,
    id: &str,
    token: &str,
    ota: &Value,
    behaviour: Behaviour,
) {
    let hangs = matches!(behaviour, Behaviour::HangsOn(version) if ota["version"] == version);
    if behaviour == Behaviour::Silent || hangs {
        return;
    }
    let progress = |state: &str, percent: u8| {
        json!({"rollout_id": ota["rollout_id"], "state": state, "progress": percent}).to_string()
    };
    let publish = |topic: String, body: String| async move {
        client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    };
    publish(
        format!("devices/{id}/ota/progress"),
        progress("downloading", 0),
    )
    .await;
    let image = stack.download_resumed(ota, id, token).await;
    assert_eq!(
        hex::encode(Sha256::digest(&image)),
        ota["sha256"].as_str().unwrap(),
        "the resumed download of {id} has the announced digest"
    );
    if behaviour == Behaviour::Fails {
        let failed = json!({"rollout_id": ota["rollout_id"], "state": "failed",
                            "error": "flash write failed"});
        publish(format!("devices/{id}/ota/progress"), failed.to_string()).await;
        return;
    }
    publish(
        format!("devices/{id}/ota/progress"),
        progress("installing", 60),
    )
    .await;
    publish(
        format!("devices/{id}/ota/progress"),
        progress("rebooting", 90),
    )
    .await;
    // Saying "done" proves nothing; reporting the new version does.
    publish(
        format!("devices/{id}/ota/progress"),
        progress("succeeded", 100),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = json!({"status": "online", "firmware_version": ota["version"]});
    publish(format!("devices/{id}/status"), status.to_string()).await;
}

fn image(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_wave_rollout_advances_pauses_and_completes_on_real_devices() {
    let stack = Arc::new(Stack::start(Manager::Running).await);
    let (firmware_id, firmware) = stack.release_firmware("2.0.0", &image(150_000)).await;

    // Ten devices in waves of 2, 3 and 5.
    let behaviours = [
        ("d0", Behaviour::Succeeds),
        ("d1", Behaviour::Fails),
        ("d2", Behaviour::Succeeds),
        ("d3", Behaviour::Silent),
        ("d4", Behaviour::Succeeds),
        ("d5", Behaviour::Succeeds), // offline when its wave starts
        ("d6", Behaviour::Fails),
        ("d7", Behaviour::Fails),
        ("d8", Behaviour::Fails),
        ("d9", Behaviour::Succeeds),
    ];
    let mut tokens = HashMap::new();
    for (id, _) in behaviours {
        tokens.insert(id, stack.register(id).await);
    }
    let mut devices = HashMap::new();
    for (id, behaviour) in behaviours {
        if id != "d5" {
            let device = SimulatedDevice::connect(&stack, id, tokens[id].clone(), behaviour).await;
            devices.insert(id, device);
        }
    }
    stack.wait_until_online(9).await;

    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "rollout_id": "r-three-waves",
                "firmware_id": firmware_id,
                "device_ids": behaviours.iter().map(|(id, _)| id).collect::<Vec<_>>(),
                "waves": [20, 50, 100],
                "success_threshold": 50,
                "error_threshold": 50,
                "on_error": "pause",
                "device_timeout_secs": 3,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, started) = stack
        .call(Method::POST, "/api/v1/rollouts/r-three-waves/start", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");

    // Wave 2 has three failures out of five: past the 50% error threshold, the rollout pauses.
    let paused = stack
        .wait_for(
            "/api/v1/rollouts/r-three-waves",
            "the automatic pause",
            |r| r["status"] == "paused",
        )
        .await;
    let decision = &paused["last_decision"];
    assert_eq!(decision["decision"], "pause", "{paused}");
    assert_eq!(decision["automatic"], true);
    assert_eq!(decision["counts"]["wave"], 2);
    assert_eq!(decision["counts"]["wave_failed"], 3, "{paused}");
    assert_eq!(paused["current_wave"], 2);
    assert_eq!(paused["wave_started_at"].as_array().unwrap().len(), 3);

    // The OTA message carries what a device needs to fetch and check the image.
    let ota = devices["d0"].received.lock().unwrap()[0].clone();
    assert_eq!(ota["rollout_id"], "r-three-waves");
    assert_eq!(ota["version"], "2.0.0");
    assert_eq!(ota["sha256"], firmware["sha256"]);
    assert_eq!(ota["size_bytes"], 150_000);
    assert_eq!(ota["signature"], firmware["signature"]);
    assert_eq!(ota["key_id"], firmware["signing_key_id"]);
    assert_eq!(ota["signature_algorithm"], "ed25519");
    assert_eq!(
        ota["download_url"],
        format!("https://fleet.example.com/api/v1/firmware/{firmware_id}/download")
    );

    // d5, offline when wave 2 started, comes back within the window; resuming sends it the
    // update and the rollout completes once every device has its outcome (d3 times out).
    let d5 =
        SimulatedDevice::connect(&stack, "d5", tokens["d5"].clone(), Behaviour::Succeeds).await;
    devices.insert("d5", d5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        devices["d5"].updates_received(),
        0,
        "nothing is sent while paused"
    );
    let (status, resumed) = stack
        .call(Method::POST, "/api/v1/rollouts/r-three-waves/resume", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    let done = stack
        .wait_for("/api/v1/rollouts/r-three-waves", "completion", |r| {
            r["status"] == "completed"
        })
        .await;
    assert_eq!(
        (
            &done["succeeded"],
            &done["failed"],
            &done["timed_out"],
            &done["sent"]
        ),
        (&json!(5), &json!(4), &json!(1), &json!(10)),
        "{done}"
    );
    assert_eq!(done["last_decision"]["decision"], "complete");
    assert_eq!(done["last_decision"]["counts"]["pending"], 0);
    assert_eq!(done["device_counts"]["succeeded"], 5, "{done}");

    let (_, page) = stack
        .call(Method::GET, "/api/v1/rollouts/r-three-waves/devices", None)
        .await;
    let states: HashMap<String, String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                d["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (id, behaviour) in behaviours {
        let expected = match behaviour {
            Behaviour::Succeeds => "succeeded",
            Behaviour::Fails => "failed",
            Behaviour::Silent => "timed_out",
            Behaviour::HangsOn(_) => unreachable!(),
        };
        assert_eq!(states[id], expected, "{id}");
        // Each device got the update exactly once.
        assert_eq!(devices[id].updates_received(), 1, "{id}");
    }
    // The devices read model shows the new version where it was reported.
    let (_, d0) = stack.call(Method::GET, "/api/v1/devices/d0", None).await;
    assert_eq!(d0["firmware_version"], "2.0.0");
    let (_, d3) = stack.call(Method::GET, "/api/v1/devices/d3", None).await;
    assert_eq!(d3["firmware_version"], "1.0.0");
    assert!(
        d3["firmware_update"].is_null(),
        "the stuck update was given up: {d3}"
    );
    let cancels = devices["d3"].cancels_received();
    assert_eq!(cancels.len(), 1, "d3 was told: {cancels:?}");
    assert_eq!(cancels[0]["rollout_id"], "r-three-waves");
    assert_eq!(cancels[0]["firmware_id"], firmware_id);

    // The error threshold aborts a rollout so configured: its unsent devices are canceled.
    let (firmware_id, _) = stack.release_firmware("2.1.0", &image(20_000)).await;
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "rollout_id": "r-abort",
                "firmware_id": firmware_id,
                "device_ids": ["d1", "d6", "d7", "d8"],
                "waves": [50, 100],
                "success_threshold": 100,
                "error_threshold": 0,
                "on_error": "abort",
                "device_timeout_secs": 30,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-abort/start", None)
        .await;
    let aborted = stack
        .wait_for("/api/v1/rollouts/r-abort", "the automatic abort", |r| {
            r["status"] == "aborted" && r["failed"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(aborted["last_decision"]["decision"], "abort");
    assert_eq!(aborted["last_decision"]["automatic"], true);
    // With a 0% threshold the first failure aborts: the other device of the first wave fails
    // too, or its update is canceled if the abort came first; the second wave's are canceled.
    let failed = aborted["failed"].as_u64().unwrap();
    assert!((1..=2).contains(&failed), "{aborted}");
    assert_eq!(aborted["canceled"].as_u64(), Some(4 - failed), "{aborted}");
    assert_eq!(
        aborted["device_counts"]["canceled"].as_u64(),
        Some(4 - failed),
        "{aborted}"
    );
    for id in ["d7", "d8"] {
        assert_eq!(
            devices[id].updates_received(),
            1,
            "{id} got only the first rollout"
        );
    }

    // The rollout read model equals one rebuilt from the events, as the command line says.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetlog"))
        .args(["replay", "rollouts", "--verify", "--patience-secs", "20"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEETLOG_DATABASE_URL", &stack.db.url)
        .env("FLEETLOG_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("rollouts: the live model equals the replay"),
        "{stdout}"
    );
}

/// The rollout manager is killed without warning, over and over, at whatever it is doing
/// (sending a wave, recording outcomes, sweeping); each time a new one takes over. Every device
/// still gets the update exactly once, none is skipped, and the device that stays offline times
/// out when the rollout's window closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_manager_killed_mid_rollout_neither_sends_twice_nor_skips_a_device() {
    let stack = Arc::new(Stack::start(Manager::LeftToTheTest).await);
    let (firmware_id, _) = stack.release_firmware("3.0.0", &image(20_000)).await;
    let online: Vec<String> = (0..8).map(|n| format!("k{n}")).collect();
    let mut devices = HashMap::new();
    for id in &online {
        let token = stack.register(id).await;
        let device = SimulatedDevice::connect(&stack, id, token, Behaviour::Succeeds).await;
        devices.insert(id.clone(), device);
    }
    // Registered, never connects: in the last wave, so its window starts with that wave.
    stack.register("k-offline").await;
    stack.wait_until_online(online.len()).await;
    let mut targets = online.clone();
    targets.push("k-offline".into());
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "rollout_id": "r-restarts",
                "firmware_id": firmware_id,
                "device_ids": targets,
                // Three waves by size: 3 devices, 2, then the 4 left over.
                "wave_sizes": [3, 2],
                "success_threshold": 50,
                "error_threshold": 50,
                "window_secs": 3,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, started) = stack
        .call(Method::POST, "/api/v1/rollouts/r-restarts/start", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");

    // Kill a manager after 100 to 400 ms, start the next, until the rollout is done or the
    // managers have had 40 lives; then one runs to the end.
    let mut lives = 0;
    loop {
        let manager = tokio::spawn(stack.rollout_manager().run(CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(100 + 100 * (lives % 4))).await;
        manager.abort();
        let _ = manager.await;
        lives += 1;
        let (_, rollout) = stack
            .call(Method::GET, "/api/v1/rollouts/r-restarts", None)
            .await;
        if rollout["status"] == "completed" || lives == 40 {
            break;
        }
    }
    tokio::spawn(stack.rollout_manager().run(stack.shutdown.clone()));
    let done = stack
        .wait_for("/api/v1/rollouts/r-restarts", "completion", |r| {
            r["status"] == "completed"
        })
        .await;
    assert!(lives > 3, "the managers were killed only {lives} times");
    assert_eq!(
        (
            &done["succeeded"],
            &done["failed"],
            &done["timed_out"],
            &done["sent"]
        ),
        (&json!(8), &json!(0), &json!(1), &json!(8)),
        "{done}"
    );
    assert_eq!(done["wave_sizes"], json!([3, 2, 4]), "{done}");
    assert_eq!(done["current_wave"], 2, "every wave ran: {done}");
    for id in &online {
        assert_eq!(
            devices[id].updates_received(),
            1,
            "{id} got the update exactly once"
        );
    }
    let (_, offline) = stack
        .call(Method::GET, "/api/v1/rollouts/r-restarts/devices", None)
        .await;
    let offline = offline["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == "k-offline")
        .cloned()
        .unwrap();
    assert_eq!(offline["status"], "timed_out", "{offline}");
    assert!(offline["sent_at"].is_null(), "{offline}");
}

/// The manager's device consumer acks cumulatively: after a crash, outcomes whose events were
/// acked but never handled are learnt again by the sweep, from the devices it asks once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_acked_but_never_handled_are_recovered_from_the_devices() {
    let stack = Arc::new(Stack::start(Manager::LeftToTheTest).await);
    let (firmware_id, _) = stack.release_firmware("4.0.0", &image(5_000)).await;
    let targets = ["m0", "m1"];
    let mut devices = Vec::new();
    for id in targets {
        let token = stack.register(id).await;
        devices.push(SimulatedDevice::connect(&stack, id, token, Behaviour::Succeeds).await);
    }
    stack.wait_until_online(2).await;
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({
                "rollout_id": "r-missed",
                "firmware_id": firmware_id,
                "device_ids": targets,
                "wave_sizes": [2],
                "success_threshold": 100,
                // Far beyond the test: the outcomes must come from the devices, not a timeout.
                "device_timeout_secs": 3600,
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, started) = stack
        .call(Method::POST, "/api/v1/rollouts/r-missed/start", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");

    // A manager sends the update, then stops before the devices finish.
    let manager = CancellationToken::new();
    tokio::spawn(stack.rollout_manager().run(manager.clone()));
    stack
        .wait_for("/api/v1/rollouts/r-missed", "both devices sent", |r| {
            r["sent"] == 2
        })
        .await;
    manager.cancel();
    for id in targets {
        stack
            .wait_for(&format!("/api/v1/devices/{id}"), "the new version", |d| {
                d["firmware_version"] == "4.0.0"
            })
            .await;
    }
    // As a restarted manager's cumulative ack would, ack the outcomes without handling them.
    let stream = async_nats::jetstream::new(stack.nats.clone())
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(fleetlog_process::rollout_manager::DEVICE_CONSUMER)
        .await
        .unwrap();
    // The read model shows the outcomes at their commit; the relay puts them on the stream a
    // moment later: fetch until both have come.
    let (mut successes, mut last) = (0, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while successes < 2 && std::time::Instant::now() < deadline {
        let mut fetched = consumer
            .fetch()
            .max_messages(10_000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(message) = futures::StreamExt::next(&mut fetched).await {
            let message = message.unwrap();
            let kind = message.headers.as_ref().and_then(|h| {
                h.get(fleetlog_nats::topology::EVENT_TYPE_HEADER)
                    .map(|kind| kind.to_string())
            });
            successes += usize::from(kind.as_deref() == Some("FirmwareUpdateSucceeded"));
            last = Some(message);
        }
    }
    assert_eq!(successes, 2, "both outcomes were waiting for the manager");
    last.unwrap().double_ack().await.unwrap();

    // The next manager never sees those events; its sweep learns the outcomes from the devices.
    tokio::spawn(stack.rollout_manager().run(stack.shutdown.clone()));
    let done = stack
        .wait_for("/api/v1/rollouts/r-missed", "completion", |r| {
            r["status"] == "completed"
        })
        .await;
    assert_eq!(
        (&done["succeeded"], &done["failed"], &done["timed_out"]),
        (&json!(2), &json!(0), &json!(0)),
        "{done}"
    );
    for device in &devices {
        assert_eq!(device.updates_received(), 1, "no update was sent twice");
    }
}

/// Deprecates `firmware_id` over the API with `body` (`reason`, `rollouts`).
async fn deprecate(stack: &Stack, firmware_id: &str, body: Value) {
    let (status, answer) = stack
        .call(
            Method::POST,
            &format!("/api/v1/firmware/{firmware_id}/deprecate"),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// A rollout device's row from `/rollouts/{id}/devices`.
async fn rollout_device(stack: &Stack, rollout: &str, device: &str) -> Value {
    let (_, page) = stack
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{rollout}/devices"),
            None,
        )
        .await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device)
        .cloned()
        .unwrap_or_else(|| panic!("{device} in {page}"))
}

/// A device download of `firmware_id` with the device's token; answers the status.
async fn device_download(
    stack: &Stack,
    firmware_id: &str,
    device: &str,
    token: &str,
) -> StatusCode {
    let request = Request::builder()
        .uri(format!("/api/v1/firmware/{firmware_id}/download"))
        .header("x-device-id", device)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    stack.request(request).await.0
}

/// What operators do besides the happy path, on real devices: a second rollout of busy devices
/// is refused; an abort tells the devices to give the update up so a fix goes out at once; a
/// deprecated image pauses (or aborts) its rollouts and is no longer downloaded by devices not
/// updating to it; targets decommissioned or moved to another model are canceled, not failed;
/// one-device rollouts run on the default waves and oversize wave sizes clamp; progress
/// reports never move a device's state back; a device that waits says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_deprecations_overlaps_and_changed_targets_behave_as_operators_expect() {
    let stack = Arc::new(Stack::start(Manager::Running).await);
    let (bad, _) = stack.release_firmware("5.0.0", &image(8_000)).await;
    let (fix, _) = stack.release_firmware("5.0.1", &image(9_000)).await;
    let mut devices = HashMap::new();
    let mut tokens = HashMap::new();
    for id in ["a0", "a1"] {
        let token = stack.register(id).await;
        let device =
            SimulatedDevice::connect(&stack, id, token.clone(), Behaviour::HangsOn("5.0.0")).await;
        devices.insert(id, device);
        tokens.insert(id, token);
    }
    stack.wait_until_online(2).await;
    let create = |body: Value| {
        let stack = stack.clone();
        async move {
            stack
                .call(Method::POST, "/api/v1/rollouts", Some(body))
                .await
        }
    };
    let (status, body) = create(json!({"rollout_id": "r-bad", "firmware_id": bad,
        "device_ids": ["a0", "a1"], "waves": [100], "device_timeout_secs": 3600}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-bad/start", None)
        .await;
    stack
        .wait_for("/api/v1/rollouts/r-bad", "both sent", |r| r["sent"] == 2)
        .await;
    let sent = rollout_device(&stack, "r-bad", "a0").await;
    assert!(
        sent["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("reports the new version, or times out at")),
        "{sent}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while ["a0", "a1"]
        .iter()
        .any(|id| devices[id].updates_received() == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the devices never got the install"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 4. A second rollout of devices that the first still waits for is refused, with why.
    let (status, body) = create(json!({"rollout_id": "r-overlap", "firmware_id": fix,
        "device_ids": ["a1"]}))
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("a1 (rollout r-bad, running)"),
        "{body}"
    );

    // 2. Aborting cancels the outstanding updates: the devices are told and freed, so the fix
    // goes out at once (oversize wave sizes clamp to the two targets).
    let (status, body) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts/r-bad/abort",
            Some(json!({"reason": "bricks the radio"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let aborted = stack
        .wait_for("/api/v1/rollouts/r-bad", "the abort", |r| {
            r["status"] == "aborted"
        })
        .await;
    assert_eq!(aborted["canceled"], 2, "{aborted}");
    assert_eq!(aborted["device_counts"]["canceled"], 2, "{aborted}");
    for id in ["a0", "a1"] {
        stack
            .wait_for(&format!("/api/v1/devices/{id}"), "the freed device", |d| {
                d["firmware_update"].is_null()
            })
            .await;
    }
    let (status, body) = create(json!({"rollout_id": "r-fix", "firmware_id": fix,
        "device_ids": ["a0", "a1"], "wave_sizes": [5, 50], "success_threshold": 100,
        "error_threshold": 0}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-fix/start", None)
        .await;
    let fixed = stack
        .wait_for("/api/v1/rollouts/r-fix", "the fix", |r| {
            r["status"] == "completed"
        })
        .await;
    assert_eq!(fixed["wave_sizes"], json!([2]), "{fixed}");
    assert_eq!(
        (&fixed["succeeded"], &fixed["failed"]),
        (&json!(2), &json!(0)),
        "{fixed}"
    );
    for id in ["a0", "a1"] {
        let cancels = devices[id].cancels_received();
        assert_eq!(cancels.len(), 1, "{id}: {cancels:?}");
        assert_eq!(cancels[0]["rollout_id"], "r-bad");
        assert!(
            cancels[0]["reason"]
                .as_str()
                .unwrap()
                .contains("bricks the radio"),
            "{cancels:?}"
        );
        assert_eq!(
            devices[id].updates_received(),
            2,
            "{id}: the bad image, then the fix"
        );
    }

    // 3. Deprecating an image pauses its running rollout before the next wave; the image is
    // no longer downloaded by devices not updating to it, and the rollout cannot resume.
    let (brick, _) = stack.release_firmware("6.0.0", &image(7_000)).await;
    for id in ["b0", "b1", "b2"] {
        let token = stack.register(id).await;
        let device =
            SimulatedDevice::connect(&stack, id, token.clone(), Behaviour::HangsOn("6.0.0")).await;
        devices.insert(id, device);
        tokens.insert(id, token);
    }
    stack.wait_until_online(5).await;
    let (status, body) = create(json!({"rollout_id": "r-brick", "firmware_id": brick,
        "device_ids": ["b0", "b1", "b2"], "wave_sizes": [1], "device_timeout_secs": 3600}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-brick/start", None)
        .await;
    stack
        .wait_for("/api/v1/devices/b0", "b0 updating", |d| {
            d["firmware_update"]["rollout_id"] == "r-brick"
        })
        .await;
    let waiting = rollout_device(&stack, "r-brick", "b1").await;
    assert_eq!(waiting["waiting"], "wave 1 has not started", "{waiting}");
    deprecate(&stack, &brick, json!({"reason": "bricks devices"})).await;
    let paused = stack
        .wait_for("/api/v1/rollouts/r-brick", "the pause", |r| {
            r["status"] == "paused"
        })
        .await;
    assert!(
        paused["pause_reason"]
            .as_str()
            .unwrap()
            .contains("deprecated: bricks devices"),
        "{paused}"
    );
    assert_eq!(
        device_download(&stack, &brick, "b1", &tokens["b1"]).await,
        StatusCode::GONE
    );
    assert_eq!(
        device_download(&stack, &brick, "b0", &tokens["b0"]).await,
        StatusCode::OK,
        "a device updating to it may finish its download"
    );
    let (status, body) = stack
        .call(Method::POST, "/api/v1/rollouts/r-brick/resume", None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let waiting = rollout_device(&stack, "r-brick", "b1").await;
    assert!(
        waiting["waiting"]
            .as_str()
            .unwrap()
            .starts_with("the rollout is paused"),
        "{waiting}"
    );
    for id in ["b1", "b2"] {
        assert_eq!(devices[id].updates_received(), 0, "{id} was never sent it");
    }

    // 6 and 3, abort policy: a one-device rollout on the default waves runs; deprecating its
    // image with `rollouts: abort` aborts it and tells the device.
    let (brick2, _) = stack.release_firmware("6.1.0", &image(6_000)).await;
    let token = stack.register("c0").await;
    let c0 = SimulatedDevice::connect(&stack, "c0", token, Behaviour::HangsOn("6.1.0")).await;
    devices.insert("c0", c0);
    stack.wait_until_online(6).await;
    let (status, body) =
        create(json!({"rollout_id": "r-one", "firmware_id": brick2, "device_ids": ["c0"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-one/start", None)
        .await;
    let one = stack
        .wait_for("/api/v1/rollouts/r-one", "c0 sent", |r| r["sent"] == 1)
        .await;
    assert_eq!(one["waves"], json!([100]), "{one}");
    stack
        .wait_for("/api/v1/devices/c0", "c0 updating", |d| {
            d["firmware_update"]["rollout_id"] == "r-one"
        })
        .await;

    // 7. A late progress report of an earlier state does not move the device back.
    let options = stack.broker.simulator_options("progress-tester");
    let (tester, mut tester_events) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while tester_events.poll().await.is_ok() {} });
    for (state, percent) in [("installing", 50), ("downloading", 100)] {
        let body = json!({"rollout_id": "r-one", "state": state, "progress": percent});
        tester
            .publish(
                "devices/c0/ota/progress",
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .unwrap();
    }
    let installing = stack
        .wait_for("/api/v1/rollouts/r-one/devices", "installing", |page| {
            page["items"][0]["status"] == "installing"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = rollout_device(&stack, "r-one", "c0").await;
    assert_eq!(still["status"], "installing", "{installing} then {still}");
    assert_eq!(still["progress"], 50, "{still}");

    deprecate(
        &stack,
        &brick2,
        json!({"reason": "bricks devices too", "rollouts": "abort"}),
    )
    .await;
    let aborted = stack
        .wait_for("/api/v1/rollouts/r-one", "the abort", |r| {
            r["status"] == "aborted"
        })
        .await;
    assert!(
        aborted["pause_reason"]
            .as_str()
            .unwrap()
            .contains("deprecated"),
        "{aborted}"
    );
    stack
        .wait_for("/api/v1/devices/c0", "c0 freed", |d| {
            d["firmware_update"].is_null()
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while devices["c0"].cancels_received().is_empty() {
        assert!(Instant::now() < deadline, "c0 was never told to cancel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 5. Targets that change during a rollout: one moved to a model the image does not
    // support, one decommissioned; both are canceled with their reason and neither counts
    // against the (zero) error threshold. A device never seen online says so.
    let (change, _) = stack.release_firmware("7.0.0", &image(5_000)).await;
    for id in ["e0", "e1", "e2"] {
        let token = stack.register(id).await;
        let device = SimulatedDevice::connect(&stack, id, token, Behaviour::Succeeds).await;
        devices.insert(id, device);
    }
    stack.register("e3").await;
    stack.wait_until_online(9).await;
    let (status, body) = create(json!({"rollout_id": "r-change", "firmware_id": change,
        "device_ids": ["e0", "e1", "e2", "e3"], "wave_sizes": [1], "success_threshold": 100,
        "error_threshold": 0, "window_secs": 3600}))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = stack
        .call(
            Method::PATCH,
            "/api/v1/devices/e1",
            Some(json!({"model": "thermo-x"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = stack.call(Method::DELETE, "/api/v1/devices/e2", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    stack
        .wait_for("/api/v1/devices/e1", "the new model", |d| {
            d["model"] == "thermo-x"
        })
        .await;
    stack
        .call(Method::POST, "/api/v1/rollouts/r-change/start", None)
        .await;
    let changed = stack
        .wait_for(
            "/api/v1/rollouts/r-change",
            "e0 done, e1 and e2 canceled",
            |r| r["succeeded"] == 1 && r["canceled"] == 2,
        )
        .await;
    assert_eq!(changed["status"], "running", "{changed}");
    assert_eq!(
        (&changed["failed"], &changed["timed_out"]),
        (&json!(0), &json!(0))
    );
    let e1 = rollout_device(&stack, "r-change", "e1").await;
    assert_eq!(e1["status"], "canceled", "{e1}");
    assert!(e1["error"].as_str().unwrap().contains("thermo-x"), "{e1}");
    let e2 = rollout_device(&stack, "r-change", "e2").await;
    assert_eq!(e2["status"], "canceled", "{e2}");
    assert_eq!(e2["error"], "device decommissioned", "{e2}");
    assert_eq!(devices["e1"].updates_received(), 0);
    let e3 = rollout_device(&stack, "r-change", "e3").await;
    assert_eq!(e3["status"], "queued", "{e3}");
    assert!(
        e3["waiting"]
            .as_str()
            .unwrap()
            .starts_with("never seen online: sent when it comes online, or times out at "),
        "{e3}"
    );
}

/// An image deprecated after a manager recorded its devices as sent and before it asked them
/// (the manager stopped in between): the next manager sends nothing of it; the devices go back
/// to the queue of a paused rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_deprecated_between_recording_and_asking_is_never_sent() {
    let stack = Arc::new(Stack::start(Manager::LeftToTheTest).await);
    let (firmware_id, _) = stack.release_firmware("8.0.0", &image(4_000)).await;
    let mut devices = Vec::new();
    for id in ["g0", "g1"] {
        let token = stack.register(id).await;
        devices.push(SimulatedDevice::connect(&stack, id, token, Behaviour::Succeeds).await);
    }
    stack.wait_until_online(2).await;
    let (status, created) = stack
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(json!({"rollout_id": "r-late", "firmware_id": firmware_id,
                        "device_ids": ["g0", "g1"], "waves": [100]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    stack
        .call(Method::POST, "/api/v1/rollouts/r-late/start", None)
        .await;
    // What a manager does before it asks the devices.
    let bus = CommandBus::new(
        stack.db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let sent = fleetlog_domain::rollout::RolloutCommand::SendToDevices {
        devices: ["g0", "g1"]
            .iter()
            .map(|d| fleetlog_domain::DeviceId::parse(*d).unwrap())
            .collect(),
        at: Utc::now(),
    };
    bus.rollouts()
        .execute(
            "r-late",
            sent,
            &fleetlog_commands::CommandMetadata::new("test"),
        )
        .await
        .unwrap();
    deprecate(&stack, &firmware_id, json!({"reason": "found wanting"})).await;

    tokio::spawn(stack.rollout_manager().run(stack.shutdown.clone()));
    let paused = stack
        .wait_for("/api/v1/rollouts/r-late", "the pause", |r| {
            r["status"] == "paused" && r["sent"] == 0
        })
        .await;
    assert!(
        paused["pause_reason"]
            .as_str()
            .unwrap()
            .contains("deprecated"),
        "{paused}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (device, id) in devices.iter().zip(["g0", "g1"]) {
        assert_eq!(device.updates_received(), 0, "{id} was sent the image");
        let row = rollout_device(&stack, "r-late", id).await;
        assert_eq!(row["status"], "queued", "{row}");
    }
}
