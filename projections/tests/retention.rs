//! Telemetry retention against a real Postgres: the sweep deletes the readings behind the
//! horizon and nothing else; the horizon never moves back; a replay does not bring them back
//! and a verification agrees with the live model, even while a late reading behind the horizon
//! waits for the next sweep; two processes sweeping at once delete each reading once; the
//! events keep every reading.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{DeviceCommand, Reading};
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_projections::replay::{replay, verify};
use fleetlog_projections::retention::{RetentionSettings, TelemetryRetention, WITHIN_RETENTION};
use fleetlog_projections::{DeviceModels, TelemetryProjection};
use fleetlog_testkit::TestDatabase;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

fn metadata() -> CommandMetadata {
    CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap())
}

fn bus(pool: &PgPool) -> CommandBus {
    CommandBus::new(
        pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    )
}

async fn register(bus: &CommandBus, id: &str) {
    bus.devices()
        .execute(
            id,
            DeviceCommand::Register {
                device_id: DeviceId::parse(id).unwrap(),
                tenant: TenantId::parse("acme").unwrap(),
                owner: UserId::parse("u-1").unwrap(),
                name: id.into(),
                model: "thermo".into(),
                tags: Vec::new(),
                at: days_ago(100),
                credentials: None,
            },
            &metadata(),
        )
        .await
        .unwrap();
}

/// A message of `sensors` readings stamped by the device `days` ago.
async fn report(bus: &CommandBus, id: &str, days: i64, sensors: usize) {
    let time = days_ago(days);
    bus.devices()
        .execute(
            id,
            DeviceCommand::RecordTelemetry {
                digest: format!("{id}-{days}-{sensors}-{}", time.timestamp_micros()),
                redelivery: false,
                readings: (0..sensors)
                    .map(|n| Reading {
                        sensor: format!("s{n}"),
                        value: n as f64,
                        unit: None,
                        timestamp: Some(time),
                    })
                    .collect(),
                device_time: Some(time),
                received_at: Utc::now(),
                location: None,
                status: Default::default(),
            },
            &metadata(),
        )
        .await
        .unwrap();
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn sweep_keeping(pool: &PgPool, days: u64) -> TelemetryRetention {
    TelemetryRetention::new(
        pool.clone(),
        RetentionSettings {
            keep: Duration::from_secs(days * 86_400),
            every: Duration::from_secs(1),
        },
    )
}

async fn assert_replay_agrees(pool: &PgPool) {
    let verified = verify(&TelemetryProjection, pool, Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    assert!(
        verified.differences.is_empty(),
        "{:?}",
        verified.differences
    );
}

#[tokio::test]
async fn readings_behind_the_horizon_leave_the_model_and_stay_gone() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let bus = bus(pool);
    let never = CancellationToken::new();
    register(&bus, "t-1").await;
    report(&bus, "t-1", 45, 3).await;
    report(&bus, "t-1", 31, 2).await;
    report(&bus, "t-1", 10, 2).await;
    report(&bus, "t-1", 0, 1).await;
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 8);

    // Keeping 30 days: the five readings of 45 and 31 days ago go, the rest stay.
    assert_eq!(sweep_keeping(pool, 30).sweep(&never).await.unwrap(), 5);
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 3);
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM telemetry WHERE time < now() - interval '30 days'"
        )
        .await,
        0
    );
    assert_replay_agrees(pool).await;

    // A replay rebuilds from every event, the old ones included, and keeps only what the
    // live model keeps.
    replay(&TelemetryProjection, pool, |_| {}).await.unwrap();
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 3);

    // A late reading from behind the horizon (a device's old buffer) is written by the write
    // side, but is not part of the model: queries and verification pass over it until the
    // next sweep deletes it.
    report(&bus, "t-1", 40, 4).await;
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 7);
    assert_eq!(
        count(
            pool,
            &format!("SELECT count(*) FROM telemetry WHERE {WITHIN_RETENTION}")
        )
        .await,
        3
    );
    assert_replay_agrees(pool).await;

    // A longer retention does not move the horizon back: what went stays gone.
    let horizon = "SELECT extract(epoch FROM kept_from)::bigint FROM telemetry_retention";
    let before = count(pool, horizon).await;
    assert_eq!(sweep_keeping(pool, 60).sweep(&never).await.unwrap(), 4);
    assert_eq!(count(pool, horizon).await, before);
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 3);
    assert_replay_agrees(pool).await;

    // A reader waiting for an event whose readings are behind the horizon (`min_position`)
    // is not kept waiting for rows the model no longer holds.
    let oldest = fleetlog_eventlog::history(
        pool,
        fleetlog_eventlog::HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "t-1",
            after_sequence: 1,
            event_type: Some("TelemetryRecorded"),
            limit: 1,
        },
    )
    .await
    .unwrap();
    assert!(
        fleetlog_projections::has_applied(&TelemetryProjection, pool, &oldest[0])
            .await
            .unwrap()
    );

    // The log keeps every reading.
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM events WHERE event_type = 'TelemetryRecorded'"
        )
        .await,
        5
    );
}

#[tokio::test]
async fn sweeps_in_two_processes_delete_each_reading_once_and_a_batch_at_a_time() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let bus = bus(pool);
    register(&bus, "t-2").await;
    // More than one delete batch of old readings: 48 messages of 250 readings.
    for day in 0..48 {
        report(&bus, "t-2", 40 + day, 250).await;
    }
    report(&bus, "t-2", 1, 5).await;
    let never = CancellationToken::new();
    let (one, other) = (sweep_keeping(pool, 30), sweep_keeping(pool, 30));
    let (first, second) = tokio::join!(one.sweep(&never), other.sweep(&never));
    let (first, second) = (first.unwrap(), second.unwrap());
    // Whichever holds the sweep lock deletes; the other skips or takes later batches.
    let mut deleted = first + second;
    // A sweep that found the lock taken may have left batches for the next turn.
    while count(pool, "SELECT count(*) FROM telemetry").await > 5 {
        deleted += sweep_keeping(pool, 30).sweep(&never).await.unwrap();
    }
    assert_eq!(deleted, 12_000);
    assert_eq!(count(pool, "SELECT count(*) FROM telemetry").await, 5);
    assert_replay_agrees(pool).await;
}

#[tokio::test]
async fn the_sweep_runs_on_its_interval_and_stops_on_shutdown() {
    let db = TestDatabase::create().await;
    let pool = &db.pool;
    let bus = bus(pool);
    register(&bus, "t-3").await;
    report(&bus, "t-3", 90, 2).await;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(sweep_keeping(pool, 30).run(shutdown.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(pool, "SELECT count(*) FROM telemetry").await > 0 {
        assert!(std::time::Instant::now() < deadline, "the sweep never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("the sweep stops on shutdown")
        .unwrap();
}
