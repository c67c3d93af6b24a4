//! The MQTT bridge against real servers: Mosquitto, nats-server, Postgres, with the relay and
//! the projection workers behind it, and a real MQTT client publishing as the devices.

use std::time::{Duration, Instant};

use chrono::Utc;
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::DeviceCommand;
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_ingest::bridge::{Ingest, IngestSettings, DEAD_LETTER_SUBJECT};
use fleetlog_projections::DeviceModels;
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

struct Platform {
    /// First, so its roles stop before the servers go.
    _roles: fleetlog::Platform,
    db: TestDatabase,
    _nats: NatsServer,
    broker: MosquittoServer,
    client: async_nats::Client,
    bus: CommandBus,
    shutdown: CancellationToken,
}

impl Platform {
    async fn start() -> Self {
        let db = TestDatabase::create().await;
        let nats = NatsServer::start();
        let broker = MosquittoServer::start();
        let client = fleetlog_nats::connect(&nats.url()).await.unwrap();
        let shutdown = CancellationToken::new();
        // The roles around the bridge; the bridges under test are started (and killed) by
        // the tests themselves.
        let mut roles = fleetlog::Platform::new(
            db.pool.clone(),
            client.clone(),
            StoreSettings::default(),
            shutdown.clone(),
        );
        roles
            .relay(RelaySettings {
                poll_interval: Duration::from_millis(50),
                ..RelaySettings::default()
            })
            .projections(WorkerSettings::default());
        let bus = CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        );
        Self {
            db,
            _nats: nats,
            broker,
            client,
            bus,
            shutdown,
            _roles: roles,
        }
    }

    fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    fn settings(&self) -> IngestSettings {
        let mut settings = IngestSettings::new(self.broker.ingest_url().parse().unwrap());
        settings.client_id = "ingest-under-test".into();
        settings.shards = 4;
        settings
    }

    /// Starts a bridge; the token stops it gracefully, aborting the task kills it.
    fn ingest(&self, settings: IngestSettings) -> (tokio::task::JoinHandle<()>, CancellationToken) {
        let stop = CancellationToken::new();
        let bridge = Ingest::new(
            CommandBus::new(
                self.db.pool.clone(),
                StoreSettings::default(),
                DeviceModels::inline(),
            ),
            async_nats::jetstream::new(self.client.clone()),
            settings,
        );
        (tokio::spawn(bridge.run(stop.clone())), stop)
    }

    async fn register(&self, id: &str) {
        let command = DeviceCommand::Register {
            device_id: DeviceId::parse(id).unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            owner: UserId::parse("u-1").unwrap(),
            name: id.into(),
            model: "thermo".into(),
            tags: vec![],
            at: Utc::now(),
            credentials: None,
        };
        self.bus
            .devices()
            .execute(id, command, &CommandMetadata::new("test"))
            .await
            .unwrap();
    }

    /// Waits until the bridge has subscribed, so nothing published later is missed: a probe
    /// device sends heartbeats until one is in the event store.
    async fn wait_subscribed(&self) {
        self.register("probe").await;
        let device = Device::connect(&self.broker, "probe-client").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            device.publish("devices/probe/heartbeat", b"").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let seen: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM events
                  WHERE aggregate_id = 'probe' AND event_type = 'HeartbeatReceived'",
            )
            .fetch_one(self.pool())
            .await
            .unwrap();
            if seen > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "the bridge never subscribed");
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A device speaking MQTT.
struct Device {
    client: AsyncClient,
    _events: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn connect(broker: &MosquittoServer, id: &str) -> Self {
        let mut options = broker.simulator_options(id);
        options.set_inflight(200);
        // Room for the oversized messages the hostile-input test sends.
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 1000);
        let (connected, ready) = tokio::sync::oneshot::channel();
        let mut connected = Some(connected);
        let events = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(connected) = connected.take() {
                            let _ = connected.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("device connected")
            .unwrap();
        Self {
            client,
            _events: events,
        }
    }

    async fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
}

/// Reads every dead letter of the bridge once there are at least `expected`.
async fn dead_letters(client: &async_nats::Client, expected: usize) -> Vec<Value> {
    let jetstream = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = jetstream
            .get_stream(fleetlog_nats::topology::DEAD_LETTER_STREAM)
            .await
        {
            let count = stream.info().await.unwrap().state.messages as usize;
            if count >= expected {
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                        filter_subject: DEAD_LETTER_SUBJECT.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let mut messages = consumer.messages().await.unwrap();
                let mut letters = Vec::new();
                while letters.len() < count {
                    let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
                        .await
                        .expect("every dead letter counted in the stream is delivered")
                        .unwrap()
                        .unwrap();
                    letters.push(serde_json::from_slice(&message.payload).unwrap());
                }
                return letters;
            }
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_formats_land_in_the_read_models_and_bad_input_in_dead_letters() {
    let platform = Platform::start().await;
    platform.register("d1").await;
    platform.register("d2").await;
    let (bridge, stop) = platform.ingest(platform.settings());
    platform.wait_subscribed().await;
    let device = Device::connect(&platform.broker, "sim").await;

    let full = json!({
        "sensors": [
            {"sensor_name": "temperature", "value": 21.5, "unit": "celsius",
             "timestamp": "2026-11-23T10:00:00Z"},
            {"sensor_name": "humidity", "value": 40}
        ],
        "status": {"battery": 88},
        "location": {"latitude": 48.1, "longitude": 11.6},
        "timestamp": "2026-11-23T10:00:00Z"
    });
    device
        .publish("devices/d1/data", full.to_string().as_bytes())
        .await;
    device
        .publish(
            "devices/d2/data",
            br#"{"temperature": 19.25, "pressure": 1013}"#,
        )
        .await;
    device
        .publish(
            "devices/d1/status",
            br#"{"status": "online", "firmware": "1.0.0"}"#,
        )
        .await;
    device.publish("devices/d2/heartbeat", b"").await;
    // Bad input: not JSON, nothing valid, a partially valid message, an unknown device, a
    // reply to a command nobody sent.
    device
        .publish("devices/d1/data", b"{\"temperature\": ")
        .await;
    device
        .publish("devices/d2/data", br#"{"Bad-Name": 1}"#)
        .await;
    device
        .publish(
            "devices/d2/data",
            br#"{"voltage": 3.3, "note": "hi", "Bad": 2}"#,
        )
        .await;
    device
        .publish("devices/ghost/data", br#"{"temperature": 1}"#)
        .await;
    device
        .publish(
            "devices/d1/commands/c-404/reply",
            br#"{"status": "succeeded"}"#,
        )
        .await;
    // A status outside the contract is no guess at success.
    device
        .publish("devices/d1/commands/c-405/reply", br#"{"status": "done"}"#)
        .await;

    let letters = dead_letters(&platform.client, 6).await;
    let reason_for = |topic: &str, payload_contains: &str| -> String {
        letters
            .iter()
            .find(|l| {
                l["topic"] == topic && l["payload"].as_str().unwrap().contains(payload_contains)
            })
            .unwrap_or_else(|| panic!("no dead letter for {topic} {payload_contains}: {letters:?}"))
            ["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason_for("devices/d1/data", "temperature\": ").contains("not valid JSON"));
    assert!(reason_for("devices/d2/data", "Bad-Name").contains("no valid reading"));
    assert!(reason_for("devices/ghost/data", "temperature").contains("unknown device ghost"));
    assert!(reason_for("devices/d1/commands/c-404/reply", "succeeded").contains("c-404"));
    assert!(reason_for("devices/d1/commands/c-405/reply", "done").contains("neither"));
    let partial = letters
        .iter()
        .find(|l| l["payload"].as_str().unwrap().contains("voltage"))
        .unwrap();
    assert!(partial["reason"]
        .as_str()
        .unwrap()
        .contains("partially accepted"));
    let dropped: Vec<&str> = partial["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(dropped, ["Bad", "note"]);
    for letter in &letters {
        assert!(letter["received_at"].is_string());
    }

    // Everything valid is in the read models.
    let pool = platform.pool().clone();
    wait_until("the read models", || {
        let pool = pool.clone();
        async move {
            let rows: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM telemetry WHERE device_id IN ('d1', 'd2')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            let reported: Option<Value> =
                sqlx::query_scalar("SELECT reported FROM devices WHERE device_id = 'd1'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            // d1: temperature, humidity; d2: temperature, pressure, voltage.
            rows == 5 && reported.is_some_and(|s| s["firmware"] == "1.0.0")
        }
    })
    .await;
    let d1: (Value, Option<Value>, bool) =
        sqlx::query_as("SELECT sensors, location, online FROM devices WHERE device_id = 'd1'")
            .fetch_one(platform.pool())
            .await
            .unwrap();
    assert_eq!(d1.0["temperature"]["value"], 21.5);
    assert_eq!(d1.1.unwrap()["latitude"], 48.1);
    assert!(d1.2);
    let d2_heartbeat: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT last_heartbeat FROM devices WHERE device_id = 'd2'")
            .fetch_one(platform.pool())
            .await
            .unwrap();
    assert!(d2_heartbeat.is_some());

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), bridge)
        .await
        .expect("the bridge stops on request")
        .unwrap();
}

/// Input that once stalled or poisoned ingest for every tenant: a payload past the parser's
/// limit (rumqttc used to drop the connection, and the persistent session redelivered it at
/// every reconnect), one past the broker's limit, a NUL in a string, and status messages that
/// would grow the reported document past its cap. Each is dead-lettered with its reason (the
/// one past the broker's limit is refused by the broker), and ingest goes on for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_unstorable_messages_are_dead_lettered_and_ingest_goes_on() {
    let platform = Platform::start().await;
    platform.register("d1").await;
    platform.register("d2").await;
    let (bridge, stop) = platform.ingest(platform.settings());
    platform.wait_subscribed().await;
    let device = Device::connect(&platform.broker, "sim").await;

    let oversized = json!({"temperature": 1, "filler": "x".repeat(70 * 1024)}).to_string();
    device
        .publish("devices/d1/data", oversized.as_bytes())
        .await;
    let past_the_broker = json!({"filler": "x".repeat(300 * 1024)}).to_string();
    Device::connect(&platform.broker, "big-sender")
        .await
        .publish("devices/d1/status", past_the_broker.as_bytes())
        .await;
    device
        .publish("devices/d2/status", br#"{"note":"a\u0000b","battery":42}"#)
        .await;
    // 128 keys of about 300 bytes each, three times: the first takes about 40 KB of the
    // document's 64 KiB, and the second and the third, each of which would take it past that,
    // are refused.
    for round in 0..3 {
        let status: serde_json::Map<String, Value> = (0..128)
            .map(|n| (format!("r{round}_{n}"), json!("y".repeat(300))))
            .collect();
        device
            .publish(
                "devices/d2/status",
                Value::Object(status).to_string().as_bytes(),
            )
            .await;
    }
    // A reading sent with a status the document has no room for keeps the reading and
    // dead-letters only the status part, as a partially accepted message.
    let too_much = json!({"temperature": 5.5, "status": {"one_more": "z".repeat(30_000)}});
    device
        .publish("devices/d2/data", too_much.to_string().as_bytes())
        .await;
    // Oversized, NUL, the second and third status rounds, and the status part: five.
    let letters = dead_letters(&platform.client, 5).await;
    let partial = letters
        .iter()
        .find(|letter| letter["payload"].as_str().unwrap().contains("one_more"))
        .unwrap_or_else(|| panic!("no dead letter for the status part: {letters:?}"));
    assert!(partial["reason"]
        .as_str()
        .unwrap()
        .contains("partially accepted"));
    assert_eq!(partial["dropped"][0]["field"], "status");
    let pool = platform.pool().clone();
    wait_until("the reading sent with a status past the cap", || {
        let pool = pool.clone();
        async move {
            let rows: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM telemetry WHERE device_id = 'd2' AND value = 5.5",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            rows == 1
        }
    })
    .await;
    let reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("larger than the 65536")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("NUL")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("at most 65536 bytes")),
        "{reasons:?}"
    );

    // Ingest goes on: later messages of both devices are recorded.
    device.publish("devices/d1/heartbeat", b"").await;
    device
        .publish("devices/d2/status", br#"{"battery": 41}"#)
        .await;
    let pool = platform.pool().clone();
    wait_until("later messages", || {
        let pool = pool.clone();
        async move {
            let d2: Option<Value> =
                sqlx::query_scalar("SELECT reported FROM devices WHERE device_id = 'd2'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            let d1: Option<Option<chrono::DateTime<Utc>>> =
                sqlx::query_scalar("SELECT last_heartbeat FROM devices WHERE device_id = 'd1'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            d2.is_some_and(|r| r["battery"] == 41) && d1.flatten().is_some()
        }
    })
    .await;
    // Nothing past the broker's limit and nothing with a NUL reached the event store.
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE payload::text LIKE '%filler%' OR payload::text LIKE '%\\u0000%'",
    )
    .fetch_one(platform.pool())
    .await
    .unwrap();
    assert_eq!(stored, 0);
    // The dead-letter stream is bounded.
    let mut stream = async_nats::jetstream::new(platform.client.clone())
        .get_stream(fleetlog_nats::topology::DEAD_LETTER_STREAM)
        .await
        .unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(
        config.max_bytes,
        fleetlog_nats::topology::DEAD_LETTER_MAX_BYTES
    );
    assert_eq!(config.max_age, fleetlog_nats::topology::DEAD_LETTER_MAX_AGE);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), bridge)
        .await
        .expect("the bridge stops on request")
        .unwrap();
}

async fn recorded(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_id LIKE 'k%' AND event_type = 'TelemetryRecorded'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bridge_loses_nothing_and_duplicates_nothing() {
    let platform = Platform::start().await;
    const DEVICES: usize = 10;
    const PER_DEVICE: usize = 150;
    for n in 0..DEVICES {
        platform.register(&format!("k{n}")).await;
    }
    let (bridge, _stop) = platform.ingest(platform.settings());
    platform.wait_subscribed().await;

    // Readings without timestamps, so only the broker's redelivery marks tell copies apart.
    let device = Device::connect(&platform.broker, "fleet-sim").await;
    let publisher = tokio::spawn(async move {
        for i in 0..PER_DEVICE {
            for n in 0..DEVICES {
                let payload = format!("{{\"reading\": {}}}", i * 1000 + n);
                device
                    .publish(&format!("devices/k{n}/data"), payload.as_bytes())
                    .await;
            }
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        device
    });
    // Crash the bridge once part of the load is in.
    let pool = platform.pool().clone();
    wait_until("some messages recorded", || {
        let pool = pool.clone();
        async move { recorded(&pool).await > 200 }
    })
    .await;
    bridge.abort();
    let _ = bridge.await;
    let at_crash = recorded(&pool).await;
    let _device = publisher.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The same client id resumes the session: the broker sends what was never acked.
    let stop = CancellationToken::new();
    let resumed = Ingest::new(
        CommandBus::new(
            pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        async_nats::jetstream::new(platform.client.clone()),
        platform.settings(),
    );
    let stats = resumed.stats();
    let bridge = tokio::spawn(resumed.run(stop.clone()));
    let total = (DEVICES * PER_DEVICE) as i64;
    wait_until("every message recorded", || {
        let pool = pool.clone();
        async move { recorded(&pool).await >= total }
    })
    .await;
    // Nothing more trickles in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(recorded(&pool).await, total, "crashed at {at_crash}");
    eprintln!(
        "crashed with {at_crash} of {total} recorded; after restart: {} received, {} redelivered",
        stats.received(),
        stats.redelivered()
    );
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT aggregate_id, payload::jsonb -> 'TelemetryRecorded' -> 'readings' -> 0 -> 'value'
               FROM events WHERE aggregate_id LIKE 'k%' AND event_type = 'TelemetryRecorded'
              GROUP BY 1, 2 HAVING count(*) > 1) AS repeated",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(duplicates, 0);
    // Each device's readings were recorded in the order they were sent.
    for n in 0..DEVICES {
        let values: Vec<f64> = sqlx::query_scalar(
            "SELECT (payload::jsonb -> 'TelemetryRecorded' -> 'readings' -> 0 ->> 'value')::float8
               FROM events WHERE aggregate_id = $1 AND event_type = 'TelemetryRecorded'
              ORDER BY sequence",
        )
        .bind(format!("k{n}"))
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(values.len(), PER_DEVICE);
        assert!(values.windows(2).all(|w| w[0] < w[1]), "k{n} out of order");
    }
    stop.cancel();
    let _ = bridge.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_beyond_the_aggregates_digest_window_are_recognised() {
    use fleetlog_protocol::message::{parse_payload, parse_topic, Identity};

    let platform = Platform::start().await;
    platform.register("w1").await;
    let settings = platform.settings();
    // A stand-in for a bridge that recorded 100 messages of one device and crashed before
    // acking any: it takes the bridge's session, records each message exactly as the bridge
    // would, and vanishes without a PUBACK.
    let mut options = platform.broker.options_as(
        fleetlog_broker::access::INGEST_USERNAME,
        &settings.client_id,
    );
    options.set_clean_session(false).set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(options, 1000);
    let filters = settings.filters();
    let mut subscribed = 0;
    while subscribed < 1 {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await.unwrap() {
            for filter in &filters {
                client
                    .subscribe(filter.clone(), QoS::AtLeastOnce)
                    .await
                    .unwrap();
            }
            subscribed += 1;
        }
    }
    // Every filter must be in place before the device publishes, or its messages pass by.
    let mut acknowledged = 0;
    while acknowledged < filters.len() {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
            acknowledged += 1;
        }
    }
    let device = Device::connect(&platform.broker, "w1-sim").await;
    for i in 0..100 {
        device
            .publish("devices/w1/data", format!("{{\"level\": {i}}}").as_bytes())
            .await;
        if i % 10 == 0 {
            device.publish("devices/w1/heartbeat", b"").await;
            device
                .publish("devices/w1/status", format!("{{\"seen\": {i}}}").as_bytes())
                .await;
        }
    }
    let mut taken = 0;
    while taken < 120 {
        if let Event::Incoming(Packet::Publish(publish)) =
            tokio::time::timeout(Duration::from_secs(30), events.poll())
                .await
                .expect("the broker stopped sending before all 120 messages")
                .unwrap()
        {
            assert!(!publish.dup);
            let (device_id, kind) = parse_topic("devices", &publish.topic).unwrap();
            let message = parse_payload(&kind, &publish.payload).unwrap();
            let identity = Identity::of_mqtt(&device_id, &publish.payload, publish.pkid, false);
            platform
                .bus
                .devices()
                .execute(
                    device_id.as_str(),
                    message.into_command(identity, Utc::now()),
                    &CommandMetadata::new("device:w1"),
                )
                .await
                .unwrap();
            taken += 1;
        }
    }
    drop(events);
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The real bridge resumes the session and gets all 100 again, marked DUP.
    let stop = CancellationToken::new();
    let bridge = Ingest::new(
        CommandBus::new(
            platform.pool().clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        async_nats::jetstream::new(platform.client.clone()),
        settings,
    );
    let stats = bridge.stats();
    let running = tokio::spawn(bridge.run(stop.clone()));
    wait_until("the redeliveries", || {
        let stats = stats.clone();
        async move { stats.accepted() >= 120 }
    })
    .await;
    assert_eq!(stats.redelivered(), 120);
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = 'w1' AND event_type = 'TelemetryRecorded'",
    )
    .fetch_one(platform.pool())
    .await
    .unwrap();
    assert_eq!(
        recorded, 100,
        "redelivered copies must not be recorded again"
    );
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_id = 'w1' AND event_type IN ('HeartbeatReceived', 'StatusReported')",
    )
    .fetch_one(platform.pool())
    .await
    .unwrap();
    assert_eq!(others, 20);
    stop.cancel();
    let _ = running.await;
}

/// How many dead letters the bridge stored (none if it never made the stream).
async fn dead_letter_count(client: &async_nats::Client) -> u64 {
    let jetstream = async_nats::jetstream::new(client.clone());
    match jetstream
        .get_stream(fleetlog_nats::topology::DEAD_LETTER_STREAM)
        .await
    {
        Ok(mut stream) => stream.info().await.unwrap().state.messages,
        Err(_) => 0,
    }
}

/// A bridge that stops while Postgres fails refuses nothing: the messages it could not check
/// stay unacked, and the next bridge of the same session records them. (Refusing them as
/// "shutting down" would dead-letter a valid device's messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_stopped_while_postgres_fails_leaves_its_messages_to_the_next() {
    let platform = Platform::start().await;
    platform.register("steady").await;
    // The bridge's own pool, to break while the rest of the platform goes on.
    let bridge_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&platform.db.url)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let bridge = tokio::spawn(
        Ingest::new(
            CommandBus::new(
                bridge_pool.clone(),
                StoreSettings::default(),
                DeviceModels::inline(),
            ),
            async_nats::jetstream::new(platform.client.clone()),
            platform.settings(),
        )
        .run(stop.clone()),
    );
    platform.wait_subscribed().await;
    let before = dead_letter_count(&platform.client).await;

    // Postgres goes away for the bridge: it cannot tell whether "steady" (never seen by it) is
    // registered, and retries.
    bridge_pool.close().await;
    let device = Device::connect(&platform.broker, "steady-client").await;
    device.publish("devices/steady/heartbeat", b"").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    bridge.await.unwrap();
    assert_eq!(
        dead_letter_count(&platform.client).await,
        before,
        "nothing is refused for the bridge's own trouble"
    );

    // The next bridge of the session gets the message again and records it.
    let (next, _stop) = platform.ingest(platform.settings());
    let pool = platform.pool().clone();
    wait_until("the heartbeat recorded by the next bridge", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM events
                  WHERE aggregate_id = 'steady' AND event_type = 'HeartbeatReceived'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                > 0
        }
    })
    .await;
    assert_eq!(dead_letter_count(&platform.client).await, before);
    next.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retained_message_is_recorded_once_not_at_every_new_subscription() {
    let platform = Platform::start().await;
    platform.register("r1").await;
    // A plain subscription: the broker sends retained messages with every new one (shared
    // subscriptions never get them).
    let mut settings = platform.settings();
    settings.share_group = None;
    let (bridge, stop) = platform.ingest(settings.clone());
    platform.wait_subscribed().await;
    let device = Device::connect(&platform.broker, "r1-client").await;
    device
        .client
        .publish(
            "devices/r1/data",
            QoS::AtLeastOnce,
            true,
            br#"{"temperature": 7.5}"#.to_vec(),
        )
        .await
        .unwrap();
    let recorded = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events
              WHERE aggregate_id = 'r1' AND event_type = 'TelemetryRecorded'",
        )
        .fetch_one(platform.pool())
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while recorded().await < 1 {
        assert!(Instant::now() < deadline, "the reading was not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    bridge.await.unwrap();

    // Another instance subscribes anew: the broker hands it the retained copy, which is
    // dead-lettered with the reason, not recorded again.
    settings.client_id = "ingest-under-test-2".into();
    let (bridge, stop) = platform.ingest(settings);
    let letters = dead_letters(&platform.client, 1).await;
    assert!(
        letters.iter().any(|letter| letter["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("retained"))),
        "{letters:?}"
    );
    assert_eq!(recorded().await, 1);
    stop.cancel();
    bridge.await.unwrap();
}

/// Which backends hold the turn of client id `ingest-turns`: an advisory lock's bigint key
/// shows in `pg_locks` split into `classid` (high half) and `objid` (low half).
const TURN_HOLDERS: &str = "SELECT pid FROM pg_locks
  WHERE locktype = 'advisory' AND granted
    AND ((classid::bigint << 32) | objid::bigint)
        = hashtextextended('fleetlog.ingest:ingest-turns', 0)";

async fn turn_holders(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(TURN_HOLDERS)
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn readings_of(pool: &PgPool, device: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT payload::jsonb -> 'TelemetryRecorded' -> 'readings' -> 0 -> 'value')
           FROM events WHERE aggregate_id = $1 AND event_type = 'TelemetryRecorded'",
    )
    .bind(device)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_subscription_instances_take_turns_on_one_session() {
    let platform = Platform::start().await;
    platform.register("t1").await;
    let pool = platform.pool().clone();
    let mut settings = platform.settings();
    settings.share_group = None;
    settings.client_id = "ingest-turns".into();
    settings.standby_interval = Duration::from_millis(100);
    let first = Ingest::new(
        CommandBus::new(
            pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        async_nats::jetstream::new(platform.client.clone()),
        settings.clone(),
    );
    let first = tokio::spawn(first.run(CancellationToken::new()));
    platform.wait_subscribed().await;
    // The second instance, same client id: it stands by and receives nothing.
    let second = Ingest::new(
        CommandBus::new(
            pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        async_nats::jetstream::new(platform.client.clone()),
        settings,
    );
    let second_stats = second.stats();
    let stop_second = CancellationToken::new();
    let second = tokio::spawn(second.run(stop_second.clone()));

    let device = Device::connect(&platform.broker, "t1-client").await;
    let send = |from: usize| {
        let client = device.client.clone();
        async move {
            for i in from..from + 50 {
                client
                    .publish(
                        "devices/t1/data",
                        QoS::AtLeastOnce,
                        false,
                        format!("{{\"reading\": {i}}}").into_bytes(),
                    )
                    .await
                    .unwrap();
            }
        }
    };
    let recorded_at_least = |n: i64| {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move { readings_of(&pool, "t1").await.0 >= n }
        }
    };
    send(0).await;
    wait_until("the first 50 recorded", recorded_at_least(50)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second_stats.received(), 0, "the standby took messages");
    assert_eq!(turn_holders(&pool).await.len(), 1);

    // The holder dies (its task, its MQTT connection and its lock's connection with it);
    // what is sent before the standby has connected waits in the session.
    first.abort();
    let _ = first.await;
    send(50).await;
    wait_until(
        "the next 50 recorded by the standby",
        recorded_at_least(100),
    )
    .await;
    assert!(second_stats.received() >= 50);

    // The holder's Postgres connection is cut: it gives up its turn, stops, and takes the
    // turn again (nobody else wants it) without losing what came meanwhile.
    let holder = turn_holders(&pool).await;
    assert_eq!(holder.len(), 1);
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(holder[0])
        .execute(&pool)
        .await
        .unwrap();
    wait_until("the turn taken again", || {
        let pool = pool.clone();
        let before = holder[0];
        async move {
            turn_holders(&pool)
                .await
                .first()
                .is_some_and(|&pid| pid != before)
        }
    })
    .await;
    send(100).await;
    wait_until("the last 50 recorded", recorded_at_least(150)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        readings_of(&pool, "t1").await,
        (150, 150),
        "lost or doubled"
    );
    assert_eq!(turn_holders(&pool).await.len(), 1);
    stop_second.cancel();
    tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the bridge stops on request")
        .unwrap();
}

/// More messages at once than the bridge's MQTT client queues requests for its event loop:
/// acks wait in that queue until the event loop takes them, one per read of the socket, while
/// the event loop waits for room in a full shard. A shard waiting there for room for its acks
/// stopped the bridge for good (seen at 12,000 msg/s); every message must be recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_clients_request_queue_is_recorded_in_full() {
    let platform = Platform::start().await;
    let devices: Vec<String> = (0..20).map(|n| format!("k{n}")).collect();
    for id in &devices {
        platform.register(id).await;
    }
    let mut settings = platform.settings();
    settings.shards = 1;
    settings.max_batch = 10;
    let (bridge, stop) = platform.ingest(settings);
    platform.wait_subscribed().await;

    let total = fleetlog_ingest::bridge::CLIENT_REQUESTS as i64 + 2_000;
    let device = Device::connect(&platform.broker, "burst-client").await;
    for n in 0..total {
        let id = &devices[n as usize % devices.len()];
        device
            .publish(
                &format!("devices/{id}/data"),
                format!("{{\"n\": {n}}}").as_bytes(),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut last = (0, Instant::now());
    loop {
        let count = recorded(platform.pool()).await;
        if count == total {
            break;
        }
        if count != last.0 {
            last = (count, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(30),
            "the bridge stopped at {count} of {total} messages"
        );
        assert!(Instant::now() < deadline, "{count} of {total} recorded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    bridge.await.unwrap();
}
