//! The relay against a real Postgres and a real nats-server: every committed event reaches
//! the stream exactly once, late commits are not skipped, NATS outages lose and duplicate
//! nothing, and only one relay publishes at a time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use chrono::Utc;
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{DeviceCommand, DeviceEvent};
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::subject_for;
use fleetlog_nats::{StreamSettings, STREAM_NAME};
use fleetlog_projections::DeviceModels;
use fleetlog_relay::{Relay, RelaySettings};
use fleetlog_relay::{RelayStatus, EVENTS_CHANNEL};
use fleetlog_testkit::{NatsServer, TestDatabase};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn settings() -> RelaySettings {
    RelaySettings {
        batch_size: 7,
        poll_interval: Duration::from_millis(200),
        linger: Duration::from_millis(5),
        standby_interval: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ack_timeout: Duration::from_secs(2),
        stream: StreamSettings::default(),
    }
}

struct RunningRelay {
    shutdown: CancellationToken,
    status: watch::Receiver<RelayStatus>,
    task: JoinHandle<()>,
}

impl RunningRelay {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("relay stops on shutdown")
            .unwrap();
    }

    async fn wait_for(&mut self, wanted: RelayStatus) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.status.wait_for(|status| *status == wanted),
        )
        .await
        .unwrap_or_else(|_| panic!("relay never became {wanted:?}"))
        .unwrap();
    }
}

async fn start_relay(pool: &PgPool, nats: &NatsServer) -> RunningRelay {
    let client = fleetlog_nats::connect(&nats.url()).await.unwrap();
    let relay = Relay::new(pool.clone(), client, settings());
    let status = relay.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    RunningRelay {
        shutdown,
        status,
        task,
    }
}

async fn jetstream_of(nats: &NatsServer) -> Context {
    jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap())
}

fn metadata() -> CommandMetadata {
    CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap())
}

async fn register(bus: &CommandBus, id: &str) {
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
    bus.devices()
        .execute(id, command, &metadata())
        .await
        .unwrap();
}

async fn heartbeat(bus: &CommandBus, id: &str) {
    let command = DeviceCommand::Heartbeat {
        firmware_version: None,
        delivery: None,
        device_time: None,
        received_at: Utc::now(),
    };
    bus.devices()
        .execute(id, command, &metadata())
        .await
        .unwrap();
}

async fn stored_event_count(pool: &PgPool) -> u64 {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    count as u64
}

/// Every message of the stream, in stream order.
async fn stream_messages(jetstream: &Context) -> Vec<(String, String, EventEnvelope)> {
    let mut stream = jetstream.get_stream(STREAM_NAME).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let message_id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|value| value.to_string())
            .unwrap_or_default();
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload).unwrap();
        messages.push((message.subject.to_string(), message_id, envelope));
    }
    messages
}

async fn wait_for_stream_count(jetstream: &Context, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = match jetstream.get_stream(STREAM_NAME).await {
            Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        if count == expected {
            return;
        }
        assert!(
            count < expected,
            "stream holds {count} messages, more than {expected}"
        );
        assert!(
            Instant::now() < deadline,
            "stream holds {count} of {expected} events"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream holds each stored event exactly once, each under its subject and message id,
/// and every aggregate's events in sequence order.
async fn assert_stream_matches_events(pool: &PgPool, jetstream: &Context) {
    let messages = stream_messages(jetstream).await;
    assert_eq!(messages.len() as u64, stored_event_count(pool).await);
    let mut seen = HashSet::new();
    let mut last_sequence: HashMap<(String, String), i64> = HashMap::new();
    for (subject, message_id, envelope) in &messages {
        assert!(
            seen.insert(message_id.clone()),
            "{message_id} published twice"
        );
        assert_eq!(message_id, &envelope.message_id());
        assert_eq!(
            subject,
            &subject_for(
                &envelope.aggregate_type,
                &envelope.aggregate_id,
                &envelope.event_type
            )
        );
        let key = (
            envelope.aggregate_type.clone(),
            envelope.aggregate_id.clone(),
        );
        let previous = last_sequence.insert(key, envelope.sequence).unwrap_or(0);
        assert_eq!(
            envelope.sequence,
            previous + 1,
            "{message_id} out of order or after a gap"
        );
    }
    // Each message's body is the stored event, field for field.
    let stored: Vec<EventEnvelope> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
                metadata, global_position, recorded_at FROM events",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let by_id: HashMap<String, &EventEnvelope> = messages
        .iter()
        .map(|(_, id, envelope)| (id.clone(), envelope))
        .collect();
    for event in stored {
        let id = event.message_id();
        let envelope = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("{id} never published"));
        assert_eq!(**envelope, event);
    }
}

#[tokio::test]
async fn relays_every_event_once_with_its_envelope() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    for device in ["a", "b", "c"] {
        register(&bus, device).await;
    }
    let mut relay = start_relay(&db.pool, &nats).await;
    relay.wait_for(RelayStatus::Active).await;
    for _ in 0..10 {
        for device in ["a", "b", "c"] {
            heartbeat(&bus, device).await;
        }
    }
    let jetstream = jetstream_of(&nats).await;
    wait_for_stream_count(&jetstream, stored_event_count(&db.pool).await).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;

    let (_, _, first) = &stream_messages(&jetstream).await[0];
    assert_eq!(first.aggregate_type, "device");
    assert_eq!(first.event_type, "DeviceRegistered");
    assert_eq!(first.event_version, "1.0");
    assert_eq!(first.metadata["actor"], "test");
    assert_eq!(
        first.payload.to_value().unwrap()["DeviceRegistered"]["name"],
        "a"
    );

    // A restarted relay continues from its stored cursor instead of starting over.
    relay.stop().await;
    let mut relay = start_relay(&db.pool, &nats).await;
    relay.wait_for(RelayStatus::Active).await;
    heartbeat(&bus, "a").await;
    wait_for_stream_count(&jetstream, stored_event_count(&db.pool).await).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn an_event_whose_transaction_commits_late_is_not_skipped() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let mut relay = start_relay(&db.pool, &nats).await;
    relay.wait_for(RelayStatus::Active).await;

    // A transaction takes an early global position and stays open...
    let late_event = DeviceEvent::DeviceDecommissioned {
        reason: "written by a slow transaction".into(),
        at: Utc::now(),
    };
    let mut slow = db.pool.begin().await.unwrap();
    let late_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('device', 'slow', 1, 'DeviceDecommissioned', '1.0', $1, '{}') RETURNING global_position",
    )
    .bind(serde_json::to_value(&late_event).unwrap())
    .fetch_one(&mut *slow)
    .await
    .unwrap();

    // ...while later transactions commit events at higher positions.
    register(&bus, "fast").await;
    heartbeat(&bus, "fast").await;
    let later_positions: Vec<i64> = sqlx::query_scalar(
        "SELECT global_position FROM events WHERE aggregate_id = 'fast' ORDER BY global_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(later_positions.iter().all(|p| *p > late_position));

    // The relay must not move past the open transaction: nothing is published yet.
    let jetstream = jetstream_of(&nats).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let published = match jetstream.get_stream(STREAM_NAME).await {
        Ok(mut stream) => stream.info().await.unwrap().state.messages,
        Err(_) => 0,
    };
    assert_eq!(
        published, 0,
        "the relay read past a transaction still in flight"
    );

    slow.commit().await.unwrap();
    wait_for_stream_count(&jetstream, 4).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;
    let messages = stream_messages(&jetstream).await;
    assert!(messages.iter().any(|(_, id, _)| id == "device:slow:1"));
    relay.stop().await;
}

#[tokio::test]
async fn a_nats_outage_loses_and_duplicates_nothing() {
    let db = TestDatabase::create().await;
    let mut nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    for n in 0..20 {
        register(&bus, &format!("d{n}")).await;
    }
    let mut relay = start_relay(&db.pool, &nats).await;
    relay.wait_for(RelayStatus::Active).await;
    for round in 0..15 {
        for n in 0..20 {
            heartbeat(&bus, &format!("d{n}")).await;
        }
        if round == 2 {
            // Mid-stream: the relay is publishing batch after batch.
            nats.kill();
        }
    }
    // Commands kept succeeding while NATS was down.
    assert_eq!(stored_event_count(&db.pool).await, 20 + 20 + 15 * 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.resume();

    let jetstream = jetstream_of(&nats).await;
    wait_for_stream_count(&jetstream, stored_event_count(&db.pool).await).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;
    relay.stop().await;
}

#[tokio::test]
async fn one_relay_publishes_and_a_standby_takes_over() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    register(&bus, "a").await;

    let mut first = start_relay(&db.pool, &nats).await;
    first.wait_for(RelayStatus::Active).await;
    let mut second = start_relay(&db.pool, &nats).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*second.status.borrow(), RelayStatus::Standby);

    let jetstream = jetstream_of(&nats).await;
    wait_for_stream_count(&jetstream, 1).await;

    first.stop().await;
    second.wait_for(RelayStatus::Active).await;
    heartbeat(&bus, "a").await;
    wait_for_stream_count(&jetstream, stored_event_count(&db.pool).await).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;
    second.stop().await;
}

#[tokio::test]
async fn appending_events_notifies_the_relay_channel() {
    let db = TestDatabase::create().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen(EVENTS_CHANNEL).await.unwrap();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    register(&bus, "a").await;
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification at commit")
        .unwrap();
    assert_eq!(notification.channel(), EVENTS_CHANNEL);
}

#[tokio::test]
async fn a_backlog_across_a_power_of_ten_of_transaction_ids_is_relayed_whole_and_in_order() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    register(&bus, "edge").await;
    heartbeat(&bus, "edge").await;
    // Written while no relay runs: the relay meets them as one backlog, several batches long,
    // whose transaction ids print with one digit more past the boundary.
    fleetlog_testkit::append_copies_across_a_power_of_ten(&db.pool, "device", "edge", 40).await;
    let mut relay = start_relay(&db.pool, &nats).await;
    relay.wait_for(RelayStatus::Active).await;
    let jetstream = jetstream_of(&nats).await;
    wait_for_stream_count(&jetstream, stored_event_count(&db.pool).await).await;
    assert_stream_matches_events(&db.pool, &jetstream).await;
    relay.stop().await;
}
