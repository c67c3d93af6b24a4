//! Projection workers against a real Postgres and nats-server: read models follow the events,
//! redeliveries apply once, gaps are filled from the events table (or wait), poison is dead-lettered, and crashed or parallel workers
//! end with the same model.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{CommandOutcome, DeviceCommand, DeviceEvent, Reading};
use fleetlog_domain::{CommandId, DeviceId, TenantId, UserId};
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::subject_for;
use fleetlog_nats::{ensure_stream, StreamSettings};
use fleetlog_projections::replay::verify;
use fleetlog_projections::worker::{apply_event, Position, DEAD_LETTER_STREAM};
use fleetlog_projections::{
    DevicesProjection, Projection, ProjectionError, TelemetryProjection, Worker, WorkerSettings,
};
use fleetlog_relay::{Relay, RelaySettings};
use fleetlog_testkit::{wait_until_projected, NatsServer, TestDatabase};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn settings() -> WorkerSettings {
    WorkerSettings {
        max_deliveries: 3,
        retry_delay: Duration::from_millis(100),
        ack_wait: Duration::from_secs(2),
        max_ack_pending: 100,
        max_batch: 50,
        known_positions: 1_000,
    }
}

async fn jetstream_of(nats: &NatsServer) -> Context {
    jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap())
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("stops on shutdown")
            .unwrap();
    }
}

async fn start_worker<P: Projection>(projection: P, pool: &PgPool, nats: &NatsServer) -> Running {
    let worker = Worker::new(
        projection,
        pool.clone(),
        jetstream_of(nats).await,
        settings(),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running { shutdown, task }
}

/// The devices worker with telemetry riding along, as `fleetlog project` runs it.
fn start_devices_with_telemetry(pool: &PgPool, jetstream: &Context) -> Running {
    let worker = Worker::new(
        DevicesProjection,
        pool.clone(),
        jetstream.clone(),
        settings(),
    )
    .alongside(TelemetryProjection);
    let shutdown = CancellationToken::new();
    Running {
        shutdown: shutdown.clone(),
        task: tokio::spawn(worker.run(shutdown)),
    }
}

async fn start_relay(pool: &PgPool, nats: &NatsServer) -> Running {
    let relay_settings = RelaySettings {
        poll_interval: Duration::from_millis(100),
        ..RelaySettings::default()
    };
    let relay = Relay::new(
        pool.clone(),
        jetstream_of(nats).await.client(),
        relay_settings,
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    Running { shutdown, task }
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::seconds(seconds)
}

fn metadata() -> CommandMetadata {
    CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap())
}

fn register(id: &str) -> DeviceCommand {
    DeviceCommand::Register {
        device_id: DeviceId::parse(id).unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: format!("Device {id}"),
        model: "thermo".into(),
        tags: vec!["lab".into()],
        at: at(0),
        credentials: None,
    }
}

fn telemetry(n: i64, status: Value) -> DeviceCommand {
    DeviceCommand::RecordTelemetry {
        digest: format!("m{n}"),
        redelivery: true,
        readings: vec![
            Reading {
                sensor: "temperature".into(),
                value: 20.0 + n as f64,
                unit: Some("celsius".into()),
                timestamp: Some(at(n)),
            },
            Reading {
                sensor: "humidity".into(),
                value: 50.0,
                unit: None,
                timestamp: None,
            },
        ],
        device_time: Some(at(n)),
        received_at: at(n),
        location: None,
        status: status.as_object().cloned().unwrap_or_default(),
    }
}

#[tokio::test]
async fn the_devices_model_follows_the_events() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(db.pool.clone(), StoreSettings::default());
    let devices = bus.devices();
    devices
        .execute("d1", register("d1"), &metadata())
        .await
        .unwrap();
    devices
        .execute(
            "d1",
            telemetry(1, json!({"mode": "eco", "battery": 90})),
            &metadata(),
        )
        .await
        .unwrap();
    let mut desired = Map::new();
    desired.insert("mode".into(), json!("turbo"));
    desired.insert("interval".into(), json!(30));
    devices
        .execute(
            "d1",
            DeviceCommand::SetDesired {
                properties: desired,
                at: at(2),
            },
            &metadata(),
        )
        .await
        .unwrap();
    for id in ["c1", "c2"] {
        let issue = DeviceCommand::IssueCommand {
            command_id: CommandId::parse(id).unwrap(),
            name: "reboot".into(),
            params: json!({}),
            issued_at: at(3),
            expires_at: at(60),
        };
        devices.execute("d1", issue, &metadata()).await.unwrap();
    }
    let reply = DeviceCommand::RecordCommandReply {
        command_id: CommandId::parse("c1").unwrap(),
        outcome: CommandOutcome::Succeeded,
        result: json!({"uptime": 1}),
        received_at: at(4),
    };
    devices.execute("d1", reply, &metadata()).await.unwrap();
    let offline = DeviceCommand::MarkOffline {
        reason: "silent".into(),
        silent_since: None,
        at: at(500),
    };
    devices.execute("d1", offline, &metadata()).await.unwrap();

    let relay = start_relay(&db.pool, &nats).await;
    let worker = start_worker(DevicesProjection, &db.pool, &nats).await;
    wait_until_projected(&db.pool, DevicesProjection::NAME, "device").await;

    let row: (bool, Value, Value, Value, Value, i32, i64, String, Vec<String>) = sqlx::query_as(
        "SELECT online, sensors, reported, desired, delta, open_commands, last_sequence, offline_reason, tags
           FROM devices WHERE device_id = 'd1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (online, sensors, reported, desired, delta, open_commands, last_sequence, reason, tags) =
        row;
    assert!(!online);
    assert_eq!(reason, "silent");
    assert_eq!(sensors["temperature"]["value"], json!(21.0));
    assert_eq!(sensors["temperature"]["unit"], json!("celsius"));
    assert_eq!(reported, json!({"mode": "eco", "battery": 90}));
    assert_eq!(desired, json!({"mode": "turbo", "interval": 30}));
    assert_eq!(delta, json!({"mode": "turbo", "interval": 30}));
    assert_eq!(open_commands, 1);
    assert_eq!(tags, ["lab"]);
    let version = devices.current("d1").await.unwrap().version;
    assert_eq!(last_sequence as u64, version);
    let commands: Vec<(String, String)> = sqlx::query_as(
        "SELECT command_id, status FROM device_commands WHERE device_id = 'd1' ORDER BY command_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        commands,
        [
            ("c1".into(), "succeeded".into()),
            ("c2".into(), "pending".into())
        ]
    );
    worker.stop().await;
    relay.stop().await;
}

/// Publishes an envelope straight to the stream, as a redelivery or a disordered stream would
/// present it.
async fn publish(jetstream: &Context, envelope: &EventEnvelope) {
    jetstream
        .publish(
            subject_for(
                &envelope.aggregate_type,
                &envelope.aggregate_id,
                &envelope.event_type,
            ),
            serde_json::to_vec(envelope).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

fn envelope(device: &str, sequence: i64, event: &DeviceEvent) -> EventEnvelope {
    use cqrs_es::DomainEvent;
    EventEnvelope {
        aggregate_type: "device".into(),
        aggregate_id: device.into(),
        sequence,
        global_position: sequence,
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_value(event).unwrap(),
        metadata: json!({}),
        recorded_at: Utc::now(),
    }
}

fn registered(device: &str) -> DeviceEvent {
    DeviceEvent::DeviceRegistered {
        device_id: DeviceId::parse(device).unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: device.into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
    }
}

fn recorded(n: i64) -> DeviceEvent {
    DeviceEvent::TelemetryRecorded {
        digest: format!("m{n}"),
        readings: vec![Reading {
            sensor: "temperature".into(),
            value: n as f64,
            unit: None,
            timestamp: Some(at(n)),
        }],
        device_time: None,
        received_at: at(n),
        location: None,
        status: Map::new(),
    }
}

fn issued(n: i64) -> DeviceEvent {
    DeviceEvent::CommandIssued {
        command_id: CommandId::parse(format!("c{n}")).unwrap(),
        name: "reboot".into(),
        params: json!({}),
        issued_at: at(n),
        expires_at: at(n + 60),
    }
}

/// A projection that keeps its positions in `projection_positions`, as firmware, rollouts and
/// users do, over device events so it is driven like the others: one row per applied event,
/// with no key, so an event applied twice shows.
#[derive(Clone, Copy)]
struct EventLog;

impl Projection for EventLog {
    const NAME: &'static str = "event_log";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["event_log"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        event: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        sqlx::query("INSERT INTO event_log (device_id, sequence) VALUES ($1, $2)")
            .bind(&event.aggregate_id)
            .bind(event.sequence)
            .execute(connection)
            .await?;
        Ok(())
    }
}

async fn create_event_log(pool: &PgPool) {
    sqlx::query("CREATE TABLE event_log (device_id text NOT NULL, sequence bigint NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// The last sequence `projection` applied for `device`, wherever it keeps it.
async fn position(pool: &PgPool, projection: &str, device: &str) -> i64 {
    let query = if projection == DevicesProjection::NAME {
        "SELECT COALESCE(max(last_sequence), 0) FROM devices WHERE device_id = $2 AND $1 = 'devices'"
    } else {
        "SELECT COALESCE(max(last_sequence), 0) FROM projection_positions
          WHERE projection = $1 AND aggregate_id = $2"
    };
    sqlx::query_scalar(query)
        .bind(projection)
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_for_position(pool: &PgPool, projection: &str, device: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while position(pool, projection, device).await != expected {
        assert!(
            Instant::now() < deadline,
            "{projection} never reached {device}#{expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many `issued` events `projection` has applied for `device`, counting repeats.
async fn commands_applied(pool: &PgPool, projection: &str, device: &str) -> i64 {
    let query = if projection == DevicesProjection::NAME {
        "SELECT COALESCE(max(open_commands), 0)::bigint FROM devices WHERE device_id = $1"
    } else {
        "SELECT count(*) FROM event_log WHERE device_id = $1 AND sequence > 1"
    };
    sqlx::query_scalar(query)
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn telemetry_rows(pool: &PgPool, device: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry WHERE device_id = $1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn gaps_wait_and_redeliveries_apply_once<P: Projection>(projection: P) {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = start_worker(projection, &db.pool, &nats).await;

    // Sequence 3 arrives before 2: it must wait, not be applied early or dropped.
    publish(&jetstream, &envelope("d1", 1, &registered("d1"))).await;
    publish(&jetstream, &envelope("d1", 3, &issued(3))).await;
    wait_for_position(&db.pool, P::NAME, "d1", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(position(&db.pool, P::NAME, "d1").await, 1);
    publish(&jetstream, &envelope("d1", 2, &issued(2))).await;
    wait_for_position(&db.pool, P::NAME, "d1", 3).await;
    assert_eq!(commands_applied(&db.pool, P::NAME, "d1").await, 2);

    // The same events again (a redelivery, a relay republishing): no effect.
    publish(&jetstream, &envelope("d1", 2, &issued(2))).await;
    publish(&jetstream, &envelope("d1", 3, &issued(3))).await;
    publish(&jetstream, &envelope("d1", 4, &issued(4))).await;
    wait_for_position(&db.pool, P::NAME, "d1", 4).await;
    assert_eq!(commands_applied(&db.pool, P::NAME, "d1").await, 3);
    worker.stop().await;
}

#[tokio::test]
async fn with_shared_positions_redeliveries_apply_once_and_gaps_wait() {
    gaps_wait_and_redeliveries_apply_once(EventLog).await;
}

#[tokio::test]
async fn with_positions_in_the_read_model_redeliveries_apply_once_and_gaps_wait() {
    gaps_wait_and_redeliveries_apply_once(DevicesProjection).await;
}

/// Workers sharing a consumer split one device's events between them, in any order. A worker
/// handed a later event than the next one takes the events it lacks from the events table
/// (the source of truth) and applies them first, in the devices model and in telemetry alike,
/// instead of waiting for the stream to bring them again: that wait could not keep up with a
/// device reporting several times a second. Later, the missing event's own delivery is a
/// redelivery and changes nothing.
#[tokio::test]
async fn a_gap_is_filled_from_the_events_table() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let bus = CommandBus::new(db.pool.clone(), StoreSettings::default());
    let devices = bus.devices();
    devices
        .execute("d1", register("d1"), &metadata())
        .await
        .unwrap();
    devices
        .execute("d2", register("d2"), &metadata())
        .await
        .unwrap();
    for n in 1..=4 {
        devices
            .execute("d1", telemetry(n, json!({})), &metadata())
            .await
            .unwrap();
    }
    let stored = fleetlog_eventlog::history(
        &db.pool,
        fleetlog_eventlog::HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "d1",
            after_sequence: 0,
            event_type: None,
            limit: 10,
        },
    )
    .await
    .unwrap();
    let last = stored.len() as i64;
    // Two telemetry rows for each reading event up to `sequence`.
    let rows_until = |sequence: i64| {
        2 * stored
            .iter()
            .filter(|e| e.sequence <= sequence && e.event_type == "TelemetryRecorded")
            .count() as i64
    };
    let d2 = fleetlog_eventlog::history(
        &db.pool,
        fleetlog_eventlog::HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "d2",
            after_sequence: 0,
            event_type: None,
            limit: 10,
        },
    )
    .await
    .unwrap();
    let start = || start_devices_with_telemetry(&db.pool, &jetstream);
    let worker = start();

    // One by one: the registration, then sequence 3 alone (2 went to another worker).
    publish(&jetstream, &stored[0]).await;
    wait_for_position(&db.pool, DevicesProjection::NAME, "d1", 1).await;
    publish(&jetstream, &stored[2]).await;
    wait_for_position(&db.pool, DevicesProjection::NAME, "d1", 3).await;
    assert_eq!(telemetry_rows(&db.pool, "d1").await, rows_until(3));
    worker.stop().await;

    // In a batch (queued while no worker ran): the last without the ones before it, beside
    // another device's event.
    publish(&jetstream, &stored[stored.len() - 1]).await;
    publish(&jetstream, &d2[0]).await;
    let worker = start();
    wait_for_position(&db.pool, DevicesProjection::NAME, "d1", last).await;
    wait_for_position(&db.pool, DevicesProjection::NAME, "d2", 1).await;
    assert_eq!(telemetry_rows(&db.pool, "d1").await, rows_until(last));
    // The late deliveries of the others change nothing.
    for event in &stored[1..stored.len() - 1] {
        publish(&jetstream, event).await;
    }
    let consumer: jetstream::consumer::PullConsumer = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap()
        .get_consumer(DevicesProjection::NAME)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut consumer = consumer.clone();
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "messages left unacked: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        position(&db.pool, DevicesProjection::NAME, "d1").await,
        last
    );
    assert_eq!(
        telemetry_rows(&db.pool, "d1").await,
        8,
        "four readings events"
    );
    let latest: f64 = sqlx::query_scalar(
        "SELECT (sensors -> 'temperature' ->> 'value')::float8 FROM devices WHERE device_id = 'd1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(latest, 24.0, "the newest reading is the latest");
    worker.stop().await;
}

/// The telemetry projection keeps no positions: readings apply in any order, and an event
/// delivered again adds nothing.
#[tokio::test]
async fn keyed_telemetry_applies_in_any_order_and_redeliveries_add_nothing() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = start_worker(TelemetryProjection, &db.pool, &nats).await;
    let wait_for_rows = |expected: i64| {
        let pool = db.pool.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while telemetry_rows(&pool, "d1").await != expected {
                assert!(Instant::now() < deadline, "never {expected} rows");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    publish(&jetstream, &envelope("d1", 1, &registered("d1"))).await;
    publish(&jetstream, &envelope("d1", 3, &recorded(3))).await;
    wait_for_rows(1).await;
    publish(&jetstream, &envelope("d1", 2, &recorded(2))).await;
    wait_for_rows(2).await;

    publish(&jetstream, &envelope("d1", 2, &recorded(2))).await;
    publish(&jetstream, &envelope("d1", 3, &recorded(3))).await;
    publish(&jetstream, &envelope("d1", 4, &recorded(4))).await;
    wait_for_rows(3).await;
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM telemetry WHERE device_id = 'd1' ORDER BY time")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(sequences, [2, 3, 4]);
    worker.stop().await;
}

/// Telemetry rides with the devices worker: one consumer feeds both models, telemetry takes
/// the events the devices model waits on, a redelivery changes neither, and the consumer
/// telemetry had of its own (from when it ran alone) is removed.
#[tokio::test]
async fn telemetry_rides_with_the_devices_worker_on_one_consumer() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let stream = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap();
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(TelemetryProjection::NAME.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let worker = start_devices_with_telemetry(&db.pool, &jetstream);
    let wait_for_rows = |expected: i64| {
        let pool = db.pool.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while telemetry_rows(&pool, "d1").await != expected {
                assert!(Instant::now() < deadline, "never {expected} rows");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // 3 before 2: the devices model waits for 2, telemetry takes 3 at once.
    publish(&jetstream, &envelope("d1", 1, &registered("d1"))).await;
    publish(&jetstream, &envelope("d1", 3, &recorded(3))).await;
    wait_for_rows(1).await;
    assert_eq!(position(&db.pool, DevicesProjection::NAME, "d1").await, 1);
    publish(&jetstream, &envelope("d1", 2, &recorded(2))).await;
    wait_for_position(&db.pool, DevicesProjection::NAME, "d1", 3).await;
    wait_for_rows(2).await;

    // Delivered again, with one new event: each model takes the new one only.
    publish(&jetstream, &envelope("d1", 2, &recorded(2))).await;
    publish(&jetstream, &envelope("d1", 3, &recorded(3))).await;
    publish(&jetstream, &envelope("d1", 4, &recorded(4))).await;
    wait_for_position(&db.pool, DevicesProjection::NAME, "d1", 4).await;
    wait_for_rows(3).await;
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM telemetry WHERE device_id = 'd1' ORDER BY time")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(sequences, [2, 3, 4]);

    let consumers: Vec<String> = stream
        .consumer_names()
        .map(Result::unwrap)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(consumers, [DevicesProjection::NAME]);
    worker.stop().await;
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_the_projection_moves_on() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = start_worker(DevicesProjection, &db.pool, &nats).await;

    publish(&jetstream, &envelope("bad", 1, &registered("bad"))).await;
    let mut poison = envelope("bad", 2, &recorded(2));
    poison.payload = json!({"DeviceExploded": {"how": "loudly"}});
    publish(&jetstream, &poison).await;
    publish(&jetstream, &envelope("bad", 3, &recorded(3))).await;
    publish(&jetstream, &envelope("good", 1, &registered("good"))).await;

    wait_for_position(&db.pool, "devices", "good", 1).await;
    wait_for_position(&db.pool, "devices", "bad", 3).await;
    let (reason, sequence): (String, i64) = sqlx::query_as(
        "SELECT reason, sequence FROM projection_dead_letters WHERE projection = 'devices'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(sequence, 2);
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("DeviceExploded"), "{reason}");

    let mut dead_letters = jetstream.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    let info = dead_letters.info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    let message = dead_letters.get_raw_message(1).await.unwrap();
    assert_eq!(message.subject.as_str(), "fleetlog.deadletter.devices");
    assert!(message
        .headers
        .get("Fleetlog-Reason")
        .is_some_and(|r| r.as_str().contains("failed 3 times")));
    let dead: EventEnvelope = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(dead.aggregate_id, "bad");
    worker.stop().await;
}

/// Workers that crash mid-stream, and workers that share the consumer, end with exactly the
/// rows the events call for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_and_parallel_workers_end_with_the_same_model() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(db.pool.clone(), StoreSettings::default());
    let ids: Vec<String> = (0..6).map(|n| format!("d{n}")).collect();
    for id in &ids {
        bus.devices()
            .execute(id, register(id), &metadata())
            .await
            .unwrap();
    }
    for n in 1..=40 {
        for id in &ids {
            bus.devices()
                .execute(id, telemetry(n, json!({"battery": 100 - n})), &metadata())
                .await
                .unwrap();
        }
    }
    let relay = start_relay(&db.pool, &nats).await;

    // One worker is killed without warning part-way through; two more then share the consumer.
    let first = start_worker(TelemetryProjection, &db.pool, &nats).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while telemetry_rows(&db.pool, "d0").await < 10 {
        assert!(
            Instant::now() < deadline,
            "the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.task.abort();
    let _ = first.task.await;
    let second = start_worker(TelemetryProjection, &db.pool, &nats).await;
    let third = start_worker(TelemetryProjection, &db.pool, &nats).await;
    let devices_worker = start_worker(DevicesProjection, &db.pool, &nats).await;

    wait_until_projected(&db.pool, "telemetry", "device").await;
    wait_until_projected(&db.pool, "devices", "device").await;
    for id in &ids {
        assert_eq!(
            telemetry_rows(&db.pool, id).await,
            80,
            "two readings per message for {id}"
        );
        let distinct: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT (sensor, time, value)) FROM telemetry WHERE device_id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(distinct, 80, "no reading stored twice for {id}");
        let device = bus.devices().current(id).await.unwrap();
        let (reported, last_sequence, online): (Value, i64, bool) = sqlx::query_as(
            "SELECT reported, last_sequence, online FROM devices WHERE device_id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(reported, Value::Object(device.aggregate.reported.clone()));
        assert_eq!(last_sequence as u64, device.version);
        assert!(online);
    }
    // The same models as a replay from the events table builds.
    let patience = Duration::from_secs(20);
    let differences = verify(&TelemetryProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    let differences = verify(&DevicesProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    for running in [second, third, devices_worker, relay] {
        running.stop().await;
    }
}

/// Takes exactly `count` messages from the worker's consumer, to hand them over as one batch.
async fn next_messages<P: Projection>(worker: &Worker<P>, count: usize) -> Vec<jetstream::Message> {
    let consumer = worker.consumer().await.unwrap();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while messages.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} messages arrived",
            messages.len()
        );
        let mut batch = consumer
            .batch()
            .max_messages(count - messages.len())
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            messages.push(message.unwrap());
        }
    }
    messages
}

async fn a_batch_notices_a_position_moved_by_someone_else<P: Projection + Copy>(projection: P) {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = Worker::new(projection, db.pool.clone(), jetstream.clone(), settings());
    for sequence in 1..=3 {
        let event = if sequence == 1 {
            registered("d1")
        } else {
            issued(sequence)
        };
        publish(&jetstream, &envelope("d1", sequence, &event)).await;
    }
    worker.handle_batch(next_messages(&worker, 3).await).await;
    assert_eq!(position(&db.pool, P::NAME, "d1").await, 3);

    // Another worker applies event 4, the answer to command c2; this one still remembers
    // position 3. Applied twice, the answer would close a second command.
    let answer = DeviceEvent::CommandReplied {
        command_id: CommandId::parse("c2").unwrap(),
        outcome: CommandOutcome::Succeeded,
        result: json!({}),
        received_at: at(4),
    };
    let mut tx = db.pool.begin().await.unwrap();
    let moved = apply_event(&projection, &mut tx, &envelope("d1", 4, &answer))
        .await
        .unwrap();
    assert_eq!(moved, Position::Applied);
    tx.commit().await.unwrap();

    // Event 4 comes to this worker too, with 5: 4 must not be applied a second time.
    publish(&jetstream, &envelope("d1", 4, &answer)).await;
    publish(&jetstream, &envelope("d1", 5, &issued(5))).await;
    worker.handle_batch(next_messages(&worker, 2).await).await;
    assert_eq!(position(&db.pool, P::NAME, "d1").await, 5);
    // The devices model counts open commands (c3 and c5), the event log every event applied
    // (2 to 5, once each).
    let expected = if P::NAME == DevicesProjection::NAME {
        2
    } else {
        4
    };
    assert_eq!(commands_applied(&db.pool, P::NAME, "d1").await, expected);
}

#[tokio::test]
async fn a_batch_notices_a_shared_position_moved_by_someone_else() {
    a_batch_notices_a_position_moved_by_someone_else(EventLog).await;
}

#[tokio::test]
async fn a_batch_notices_a_read_model_position_moved_by_someone_else() {
    a_batch_notices_a_position_moved_by_someone_else(DevicesProjection).await;
}
