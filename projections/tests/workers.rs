//! Projection workers against a real Postgres and nats-server: redeliveries apply once, gaps are
//! filled from the events table (or wait), poison is dead-lettered, and crashed or parallel
//! workers end with the same model. The subject is a projection of this test's own over device
//! events (`EventLog`), which keeps its positions as `firmware`, `rollouts` and `users` do; the
//! device models themselves are kept inline by the write side (`tests/inline.rs`).

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
use fleetlog_projections::DeviceModels;
use fleetlog_projections::{Projection, ProjectionError, Worker, WorkerSettings};
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
        payload: fleetlog_eventlog::Payload::of(event).unwrap(),
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
/// users do, over device events: one row per applied event, with no key, so an event applied
/// twice shows. An event that does not read as a Device event cannot be applied.
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
        let _: DeviceEvent = event.payload.decode()?;
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

/// The last sequence `projection` applied for `device`.
async fn position(pool: &PgPool, projection: &str, device: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(last_sequence), 0) FROM projection_positions
          WHERE projection = $1 AND aggregate_id = $2",
    )
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

/// How many events after the registration the event log has applied for `device`, counting
/// repeats.
async fn applied_after_registration(pool: &PgPool, device: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM event_log WHERE device_id = $1 AND sequence > 1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How many times the event log has applied `device`'s events, counting repeats, and how
/// many different events that was.
async fn applied(pool: &PgPool, device: &str) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT sequence) FROM event_log WHERE device_id = $1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn redeliveries_apply_once_and_gaps_wait() {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = start_worker(EventLog, &db.pool, &nats).await;

    // Sequence 3 arrives before 2: it must wait, not be applied early or dropped.
    publish(&jetstream, &envelope("d1", 1, &registered("d1"))).await;
    publish(&jetstream, &envelope("d1", 3, &issued(3))).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(position(&db.pool, EventLog::NAME, "d1").await, 1);
    publish(&jetstream, &envelope("d1", 2, &issued(2))).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", 3).await;
    assert_eq!(applied_after_registration(&db.pool, "d1").await, 2);

    // The same events again (a redelivery, a relay republishing): no effect.
    publish(&jetstream, &envelope("d1", 2, &issued(2))).await;
    publish(&jetstream, &envelope("d1", 3, &issued(3))).await;
    publish(&jetstream, &envelope("d1", 4, &issued(4))).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", 4).await;
    assert_eq!(applied_after_registration(&db.pool, "d1").await, 3);
    worker.stop().await;
}

/// Workers sharing a consumer split one device's events between them, in any order. A worker
/// handed a later event than the next one takes the events it lacks from the events table
/// (the source of truth) and applies them first, instead of waiting for the stream to bring
/// them again: that wait could not keep up with an aggregate that changes several times a
/// second. Later, the missing event's own delivery is a redelivery and changes nothing.
#[tokio::test]
async fn a_gap_is_filled_from_the_events_table() {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
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
    let history = |id: &'static str| {
        fleetlog_eventlog::history(
            &db.pool,
            fleetlog_eventlog::HistoryQuery {
                aggregate_type: "device",
                aggregate_id: id,
                after_sequence: 0,
                event_type: None,
                limit: 10,
            },
        )
    };
    let stored = history("d1").await.unwrap();
    let last = stored.len() as i64;
    let d2 = history("d2").await.unwrap();
    let worker = start_worker(EventLog, &db.pool, &nats).await;

    // One by one: the registration, then sequence 3 alone (2 went to another worker).
    publish(&jetstream, &stored[0]).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", 1).await;
    publish(&jetstream, &stored[2]).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", 3).await;
    assert_eq!(applied(&db.pool, "d1").await, (3, 3));
    worker.stop().await;

    // In a batch (queued while no worker ran): the last without the ones before it, beside
    // another device's event.
    publish(&jetstream, &stored[stored.len() - 1]).await;
    publish(&jetstream, &d2[0]).await;
    let worker = start_worker(EventLog, &db.pool, &nats).await;
    wait_for_position(&db.pool, EventLog::NAME, "d1", last).await;
    wait_for_position(&db.pool, EventLog::NAME, "d2", 1).await;
    assert_eq!(applied(&db.pool, "d1").await, (last, last));
    // The late deliveries of the others change nothing.
    for event in &stored[1..stored.len() - 1] {
        publish(&jetstream, event).await;
    }
    let consumer: jetstream::consumer::PullConsumer = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap()
        .get_consumer(EventLog::NAME)
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
    assert_eq!(position(&db.pool, EventLog::NAME, "d1").await, last);
    assert_eq!(applied(&db.pool, "d1").await, (last, last));
    worker.stop().await;
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_and_the_projection_moves_on() {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = start_worker(EventLog, &db.pool, &nats).await;

    publish(&jetstream, &envelope("bad", 1, &registered("bad"))).await;
    let mut poison = envelope("bad", 2, &recorded(2));
    poison.payload =
        fleetlog_eventlog::Payload::of(&json!({"DeviceExploded": {"how": "loudly"}})).unwrap();
    publish(&jetstream, &poison).await;
    publish(&jetstream, &envelope("bad", 3, &recorded(3))).await;
    publish(&jetstream, &envelope("good", 1, &registered("good"))).await;

    wait_for_position(&db.pool, EventLog::NAME, "good", 1).await;
    wait_for_position(&db.pool, EventLog::NAME, "bad", 3).await;
    let (reason, sequence): (String, i64) = sqlx::query_as(
        "SELECT reason, sequence FROM projection_dead_letters WHERE projection = 'event_log'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(sequence, 2);
    assert!(reason.contains("failed 3 times"), "{reason}");
    assert!(reason.contains("DeviceExploded"), "{reason}");
    let applied: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM event_log WHERE device_id = 'bad' ORDER BY sequence",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(applied, [1, 3], "passed over, and the later event applied");

    let mut dead_letters = jetstream.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    let info = dead_letters.info().await.unwrap();
    assert_eq!(info.state.messages, 1);
    let message = dead_letters.get_raw_message(1).await.unwrap();
    assert_eq!(message.subject.as_str(), "fleetlog.deadletter.event_log");
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
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
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
    let first = start_worker(EventLog, &db.pool, &nats).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while applied(&db.pool, "d0").await.0 < 10 {
        assert!(
            Instant::now() < deadline,
            "the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.task.abort();
    let _ = first.task.await;
    let second = start_worker(EventLog, &db.pool, &nats).await;
    let third = start_worker(EventLog, &db.pool, &nats).await;

    wait_until_projected(&db.pool, EventLog::NAME, "device").await;
    for id in &ids {
        let version = bus.devices().current(id).await.unwrap().version as i64;
        assert_eq!(
            applied(&db.pool, id).await,
            (version, version),
            "every event of {id} applied once"
        );
    }
    // The same model as a replay from the events table builds.
    let differences = verify(&EventLog, &db.pool, Duration::from_secs(20), |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    for running in [second, third, relay] {
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

#[tokio::test]
async fn a_batch_notices_a_position_moved_by_someone_else() {
    let db = TestDatabase::create().await;
    create_event_log(&db.pool).await;
    let nats = NatsServer::start();
    let jetstream = jetstream_of(&nats).await;
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    let worker = Worker::new(EventLog, db.pool.clone(), jetstream.clone(), settings());
    for sequence in 1..=3 {
        let event = if sequence == 1 {
            registered("d1")
        } else {
            issued(sequence)
        };
        publish(&jetstream, &envelope("d1", sequence, &event)).await;
    }
    worker.handle_batch(next_messages(&worker, 3).await).await;
    assert_eq!(position(&db.pool, EventLog::NAME, "d1").await, 3);

    // Another worker applies event 4; this one still remembers position 3.
    let answer = DeviceEvent::CommandReplied {
        command_id: CommandId::parse("c2").unwrap(),
        outcome: CommandOutcome::Succeeded,
        result: json!({}),
        received_at: at(4),
    };
    let mut tx = db.pool.begin().await.unwrap();
    let moved = apply_event(&EventLog, &mut tx, &envelope("d1", 4, &answer))
        .await
        .unwrap();
    assert_eq!(moved, Position::Applied);
    tx.commit().await.unwrap();

    // Event 4 comes to this worker too, with 5: 4 must not be applied a second time.
    publish(&jetstream, &envelope("d1", 4, &answer)).await;
    publish(&jetstream, &envelope("d1", 5, &issued(5))).await;
    worker.handle_batch(next_messages(&worker, 2).await).await;
    assert_eq!(position(&db.pool, EventLog::NAME, "d1").await, 5);
    assert_eq!(applied(&db.pool, "d1").await, (5, 5));
}
