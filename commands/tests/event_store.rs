//! The write side against a real Postgres: appends, metadata, optimistic concurrency between
//! independent writers, snapshots, and agreement between the three ways to load an aggregate.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateContext, CqrsFramework, EventStore};
use fleetlog_commands::{AggregateStore, CommandError, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{
    CommandOutcome, Device, DeviceCommand, DeviceError, Lifecycle, Reading,
};
use fleetlog_domain::{CommandId, DeviceId, TenantId, UserId};
use fleetlog_testkit::TestDatabase;
use postgres_es::PostgresEventRepository;
use serde_json::{json, Map, Value};
use sqlx::{PgPool, Row};

const DEVICE: &str = "dev-1";

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + Duration::seconds(seconds)
}

fn metadata() -> CommandMetadata {
    CommandMetadata::new("user:u-1")
        .with_tenant(TenantId::parse("acme").unwrap())
        .with_request_id("req-1")
        .with_causation_id("msg-1")
}

fn store(pool: &PgPool, settings: StoreSettings) -> AggregateStore<Device> {
    AggregateStore::new(pool.clone(), (), settings)
}

fn register() -> DeviceCommand {
    DeviceCommand::Register {
        device_id: DeviceId::parse(DEVICE).unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "Boiler".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
        credentials: None,
    }
}

fn heartbeat(second: i64) -> DeviceCommand {
    DeviceCommand::Heartbeat {
        firmware_version: None,
        delivery: None,
        device_time: None,
        received_at: at(second),
    }
}

fn telemetry(n: i64) -> DeviceCommand {
    let mut status = Map::new();
    status.insert("battery".into(), json!(100 - n));
    DeviceCommand::RecordTelemetry {
        digest: format!("msg-{n}"),
        redelivery: true,
        readings: vec![Reading {
            sensor: "temperature".into(),
            value: 20.0 + n as f64 / 10.0,
            unit: Some("celsius".into()),
            timestamp: Some(at(n)),
        }],
        device_time: Some(at(n)),
        received_at: at(n),
        location: None,
        status,
    }
}

async fn event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(DEVICE)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn appends_events_with_positions_and_metadata() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());

    let registered = devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    assert_eq!(registered.version, 1);
    assert_eq!(registered.events, 1);
    let online = devices
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    assert_eq!(online.version, 3, "came online + heartbeat");
    assert_eq!(online.events, 2);
    assert!(online.global_position > registered.global_position);

    let rows = sqlx::query(
        "SELECT sequence, event_type, event_version, metadata::text AS metadata, global_position,
                transaction_id::text AS transaction_id
           FROM events ORDER BY global_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let types: Vec<String> = rows.iter().map(|r| r.get("event_type")).collect();
    assert_eq!(
        types,
        ["DeviceRegistered", "DeviceCameOnline", "HeartbeatReceived"]
    );
    let sequences: Vec<i64> = rows.iter().map(|r| r.get("sequence")).collect();
    assert_eq!(sequences, [1, 2, 3]);
    let last: i64 = rows[2].get("global_position");
    assert_eq!(Some(last), online.global_position);
    // Both events of one command share one transaction.
    let tx_of = |i: usize| rows[i].get::<String, _>("transaction_id");
    assert_eq!(tx_of(1), tx_of(2));
    assert_ne!(tx_of(0), tx_of(1));
    let stored: Value = serde_json::from_str(rows[0].get("metadata")).unwrap();
    assert_eq!(stored["actor"], "user:u-1");
    assert_eq!(stored["tenant"], "acme");
    assert_eq!(stored["request_id"], "req-1");
    assert_eq!(stored["causation_id"], "msg-1");
    assert!(stored["correlation_id"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(rows[0].get::<String, _>("event_version"), "1.0");
}

#[tokio::test]
async fn every_event_carries_its_aggregates_tenant() {
    // A process acting without a tenant in mind (liveness, ingest) still produces events that
    // live streams and audits can scope by tenant.
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    let system = CommandMetadata::new("system:liveness");
    devices.execute(DEVICE, register(), &system).await.unwrap();
    devices
        .execute(DEVICE, heartbeat(5), &system)
        .await
        .unwrap();
    let tenants: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT metadata::jsonb ->> 'tenant' FROM events ORDER BY global_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(tenants.len(), 3);
    assert!(
        tenants.iter().all(|t| t.as_deref() == Some("acme")),
        "{tenants:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_appends_what_its_accepted_commands_decide_in_one_go() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    // Another writer, as a second ingest instance would be, moves the aggregate between the
    // batch's load and its append on the first attempt at most.
    let other = store(&db.pool, StoreSettings::default());
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    other
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    let refused = DeviceCommand::RecordTelemetry {
        digest: String::new(),
        redelivery: false,
        readings: vec![],
        device_time: None,
        received_at: at(3),
        location: None,
        status: Map::new(),
    };
    let batch = vec![
        telemetry(2),
        refused,
        heartbeat(4),
        telemetry(2),
        telemetry(5),
    ];
    let done = devices
        .execute_batch(DEVICE, batch, &metadata())
        .await
        .unwrap();
    let outcomes: Vec<Result<usize, String>> = done
        .outcomes
        .iter()
        .map(|o| o.as_ref().map(|n| *n).map_err(|e| e.to_string()))
        .collect();
    // The repeated telemetry(2) is a redelivery by digest: accepted, nothing new.
    assert_eq!(outcomes[0], Ok(1));
    assert!(outcomes[1].is_err());
    assert_eq!(outcomes[2], Ok(1));
    assert_eq!(outcomes[3], Ok(0));
    assert_eq!(outcomes[4], Ok(1));
    assert_eq!(done.committed.events, 3);
    // Registration, online + heartbeat from the other writer, then the batch's three.
    assert_eq!(done.committed.version, 6);
    let positions: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT sequence, global_position FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(DEVICE)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        positions.iter().map(|p| p.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(Some(positions[5].1), done.committed.global_position);
    // The other writer sees the batch, and a cold load agrees with the cached state.
    other.evict(DEVICE);
    assert_eq!(other.current(DEVICE).await.unwrap().version, 6);
    assert_eq!(
        devices.current(DEVICE).await.unwrap().aggregate,
        other.current(DEVICE).await.unwrap().aggregate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_aggregates_commit_together_and_a_conflict_retries_each_alone() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    let other = store(&db.pool, StoreSettings::default());
    let register_as = |id: &str| match register() {
        DeviceCommand::Register {
            tenant,
            owner,
            name,
            model,
            tags,
            at,
            ..
        } => DeviceCommand::Register {
            device_id: DeviceId::parse(id).unwrap(),
            tenant,
            owner,
            name,
            model,
            tags,
            at,
            credentials: None,
        },
        _ => unreachable!(),
    };
    for id in ["m1", "m2", "m3"] {
        devices
            .execute(id, register_as(id), &metadata())
            .await
            .unwrap();
    }
    let work = |n: i64| {
        ["m1", "m2", "m3"]
            .iter()
            .map(|id| (id.to_string(), vec![telemetry(n), heartbeat(n)], metadata()))
            .collect::<Vec<_>>()
    };
    let results = devices.execute_many(work(1)).await;
    let positions: Vec<i64> = results
        .iter()
        .map(|r| r.as_ref().unwrap().committed.global_position.unwrap())
        .collect();
    // One transaction: the three devices' events share a transaction id.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id::text) FROM events WHERE global_position = ANY($1)",
    )
    .bind(&positions)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(transactions, 1);
    for result in &results {
        let done = result.as_ref().unwrap();
        // Online, telemetry, heartbeat after the registration.
        assert_eq!(done.committed.version, 4);
        assert!(done.outcomes.iter().all(|o| o.is_ok()));
    }
    // Another writer moves m2: the shared append conflicts, each device is retried alone,
    // and nothing is lost or doubled.
    other
        .execute("m2", heartbeat(7), &metadata())
        .await
        .unwrap();
    let results = devices.execute_many(work(2)).await;
    let versions: Vec<u64> = results
        .iter()
        .map(|r| r.as_ref().unwrap().committed.version)
        .collect();
    assert_eq!(versions, [6, 7, 6]);
    for id in ["m1", "m2", "m3"] {
        let sequences: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(sequences, (1..=sequences.len() as i64).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn idempotent_repeats_append_nothing() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    let first = devices
        .execute(DEVICE, telemetry(1), &metadata())
        .await
        .unwrap();
    let again = devices
        .execute(DEVICE, telemetry(1), &metadata())
        .await
        .unwrap();
    assert_eq!(first.events, 2);
    assert_eq!(again.events, 0);
    assert_eq!(again.global_position, None);
    assert_eq!(again.version, first.version);
    assert_eq!(event_count(&db.pool).await, 3);
}

#[tokio::test]
async fn refused_commands_leave_no_trace() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    let refused = devices.execute(DEVICE, heartbeat(1), &metadata()).await;
    assert!(matches!(
        refused,
        Err(CommandError::Refused(DeviceError::NotRegistered))
    ));
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    let again = devices.execute(DEVICE, register(), &metadata()).await;
    assert!(matches!(
        again,
        Err(CommandError::Refused(DeviceError::AlreadyRegistered))
    ));
    let bad_reply = DeviceCommand::RecordCommandReply {
        command_id: CommandId::parse("nope").unwrap(),
        outcome: CommandOutcome::Succeeded,
        result: json!({}),
        received_at: at(2),
    };
    assert!(matches!(
        devices.execute(DEVICE, bad_reply, &metadata()).await,
        Err(CommandError::Refused(DeviceError::UnknownCommand(_)))
    ));
    assert_eq!(event_count(&db.pool).await, 1);
    // The cached aggregate is intact: the next command continues at the right sequence.
    let next = devices
        .execute(DEVICE, heartbeat(3), &metadata())
        .await
        .unwrap();
    assert_eq!(next.version, 3);
}

/// The API and an ingest bridge are separate processes with separate caches. A command refused
/// by a cached copy that missed the other process's events is decided again on what is stored.
#[tokio::test]
async fn a_refusal_by_a_stale_cached_copy_is_checked_against_the_store() {
    let db = TestDatabase::create().await;
    let ingest = store(&db.pool, StoreSettings::default());
    let api = store(&db.pool, StoreSettings::default());

    // The bridge sees an unknown device and caches it so; the API registers it meanwhile.
    let lifecycle = ingest.inspect(DEVICE, |device, _| device.lifecycle).await;
    assert_eq!(lifecycle.unwrap(), Lifecycle::Unregistered);
    api.execute(DEVICE, register(), &metadata()).await.unwrap();
    let lifecycle = ingest.inspect_cached(DEVICE, |device, _| device.lifecycle);
    assert_eq!(lifecycle.await.unwrap(), Lifecycle::Unregistered);
    let lifecycle = ingest.inspect(DEVICE, |device, _| device.lifecycle);
    assert_eq!(lifecycle.await.unwrap(), Lifecycle::Active);

    // One command at a time, a batch, and a round of many devices all see the API's command.
    ingest
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    let reply = |id: &str| DeviceCommand::RecordCommandReply {
        command_id: CommandId::parse(id).unwrap(),
        outcome: CommandOutcome::Succeeded,
        result: json!({}),
        received_at: at(5),
    };
    let issue = |id: &str| DeviceCommand::IssueCommand {
        command_id: CommandId::parse(id).unwrap(),
        name: "reboot".into(),
        params: json!({}),
        issued_at: at(2),
        expires_at: at(600),
    };
    api.execute(DEVICE, issue("c1"), &metadata()).await.unwrap();
    ingest
        .execute(DEVICE, reply("c1"), &metadata())
        .await
        .expect("the reply to a command issued by the other process");

    api.execute(DEVICE, issue("c2"), &metadata()).await.unwrap();
    let batch = ingest
        .execute_batch(DEVICE, vec![heartbeat(6), reply("c2")], &metadata())
        .await
        .unwrap();
    assert!(
        batch.outcomes.iter().all(Result::is_ok),
        "{:?}",
        batch.outcomes
    );

    api.execute(DEVICE, issue("c3"), &metadata()).await.unwrap();
    let round = ingest
        .execute_many(vec![(DEVICE.to_string(), vec![reply("c3")], metadata())])
        .await;
    let round = round.into_iter().next().unwrap().unwrap();
    assert!(
        round.outcomes.iter().all(Result::is_ok),
        "{:?}",
        round.outcomes
    );

    // A refusal that the store confirms stays a refusal.
    assert!(matches!(
        ingest.execute(DEVICE, reply("c9"), &metadata()).await,
        Err(CommandError::Refused(DeviceError::UnknownCommand(_)))
    ));
}

/// Two stores stand for two processes: each has its own cache, so each keeps appending on a
/// stale version until the primary key refuses it and it reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_one_aggregate_never_lose_an_event() {
    let db = TestDatabase::create().await;
    let settings = StoreSettings {
        max_attempts: 1_000,
        ..StoreSettings::default()
    };
    let process_a = store(&db.pool, settings);
    let process_b = store(&db.pool, settings);
    process_a
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    process_a
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();

    const WRITERS: i64 = 8;
    const COMMANDS_EACH: i64 = 25;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let devices = if writer % 2 == 0 {
            process_a.clone()
        } else {
            process_b.clone()
        };
        tasks.spawn(async move {
            let mut versions = Vec::new();
            for n in 0..COMMANDS_EACH {
                let second = 10 + writer * 1_000 + n;
                let committed = devices
                    .execute(DEVICE, heartbeat(second), &metadata())
                    .await
                    .expect("every heartbeat is stored");
                assert_eq!(committed.events, 1);
                versions.push(committed.version);
            }
            versions
        });
    }
    let mut versions = HashSet::new();
    while let Some(result) = tasks.join_next().await {
        for version in result.unwrap() {
            assert!(
                versions.insert(version),
                "version {version} handed out twice"
            );
        }
    }

    let expected = 3 + WRITERS * COMMANDS_EACH;
    assert_eq!(event_count(&db.pool).await, expected);
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(DEVICE)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(sequences, (1..=expected).collect::<Vec<_>>());
    let heartbeats: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'HeartbeatReceived'",
    )
    .bind(DEVICE)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(heartbeats, 1 + WRITERS * COMMANDS_EACH);
}

#[tokio::test]
async fn a_writer_that_keeps_conflicting_gives_up_with_a_conflict() {
    let db = TestDatabase::create().await;
    let settings = StoreSettings {
        max_attempts: 1,
        ..StoreSettings::default()
    };
    let process_a = store(&db.pool, settings);
    let process_b = store(&db.pool, settings);
    process_a
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    process_b
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    // A still holds version 1 in its cache; B has moved the device to version 3.
    let conflict = process_a.execute(DEVICE, heartbeat(2), &metadata()).await;
    assert!(
        matches!(conflict, Err(CommandError::Conflict { attempts: 1, .. })),
        "{conflict:?}"
    );
    // The conflict evicted the stale copy: the next try succeeds on fresh state.
    let retried = process_a
        .execute(DEVICE, heartbeat(2), &metadata())
        .await
        .unwrap();
    assert_eq!(retried.version, 4);
}

/// The cqrs-es snapshot store applies new events twice before saving; this one must not.
#[tokio::test]
async fn snapshots_hold_the_state_at_their_sequence() {
    let db = TestDatabase::create().await;
    let devices = store(
        &db.pool,
        StoreSettings {
            snapshot_every: 5,
            ..StoreSettings::default()
        },
    );
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    // Sequence 1 registers; telemetry 1 adds 2 (came online) and 3; telemetry n adds n + 2.
    for n in 1..=10 {
        devices
            .execute(DEVICE, telemetry(n), &metadata())
            .await
            .unwrap();
    }
    // Versions 1..=12: snapshots were taken at 5 and 10, the latest one replaced the first.
    let row = sqlx::query(
        "SELECT last_sequence, current_snapshot, payload::text AS payload FROM snapshots
          WHERE aggregate_type = 'device' AND aggregate_id = $1",
    )
    .bind(DEVICE)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("last_sequence"), 10);
    assert_eq!(row.get::<i64, _>("current_snapshot"), 2);
    let snapshot: Device = serde_json::from_str(row.get("payload")).unwrap();
    // Each telemetry event remembers its digest once. A store that applied new events twice
    // before snapshotting (the cqrs-es 0.5 snapshot store) would list every digest twice.
    let expected: Vec<String> = (1..=8).map(|n| format!("msg-{n}")).collect();
    assert_eq!(Vec::from(snapshot.recent_digests.clone()), expected);
    assert_eq!(snapshot.reported["battery"], json!(92));
}

/// A cached aggregate, a snapshot plus its tail, and a cold replay of every event by the stock
/// cqrs-es event store over postgres-es all give the same state.
#[tokio::test]
async fn cache_snapshot_and_cold_replay_agree() {
    let db = TestDatabase::create().await;
    let settings = StoreSettings {
        snapshot_every: 10,
        ..StoreSettings::default()
    };
    let devices = store(&db.pool, settings);
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    for n in 1..=40 {
        let command = match n % 4 {
            0 => heartbeat(n),
            1 => telemetry(n),
            2 => DeviceCommand::IssueCommand {
                command_id: CommandId::parse(format!("c{n}")).unwrap(),
                name: "reboot".into(),
                params: json!({"n": n}),
                issued_at: at(n),
                expires_at: at(n + 60),
            },
            _ => DeviceCommand::RecordCommandReply {
                command_id: CommandId::parse(format!("c{}", n - 1)).unwrap(),
                outcome: CommandOutcome::Succeeded,
                result: json!({"ok": true}),
                received_at: at(n),
            },
        };
        devices.execute(DEVICE, command, &metadata()).await.unwrap();
    }
    let offline = DeviceCommand::MarkOffline {
        reason: "silent".into(),
        silent_since: None,
        at: at(100),
    };
    devices.execute(DEVICE, offline, &metadata()).await.unwrap();
    devices
        .execute(DEVICE, telemetry(101), &metadata())
        .await
        .unwrap();

    let cached = devices.current(DEVICE).await.unwrap();

    let snapshot_sequence: i64 =
        sqlx::query_scalar("SELECT last_sequence FROM snapshots WHERE aggregate_id = $1")
            .bind(DEVICE)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(snapshot_sequence > 0 && (snapshot_sequence as u64) < cached.version);
    let from_snapshot = store(&db.pool, settings).load(DEVICE).await.unwrap();

    let stock = PersistedEventStore::<PostgresEventRepository, Device>::new_event_store(
        PostgresEventRepository::new(db.pool.clone()),
    );
    let mut replayed = stock.load_aggregate(DEVICE).await.unwrap();

    assert_eq!(cached.version, from_snapshot.version);
    assert_eq!(cached.aggregate, from_snapshot.aggregate);
    assert_eq!(&cached.aggregate, replayed.aggregate());
    assert_eq!(cached.aggregate.reported["battery"], json!(-1));
    assert!(cached.aggregate.open_commands.is_empty());
}

#[tokio::test]
async fn a_snapshot_that_no_longer_fits_falls_back_to_replay() {
    let db = TestDatabase::create().await;
    let settings = StoreSettings {
        snapshot_every: 2,
        ..StoreSettings::default()
    };
    let devices = store(&db.pool, settings);
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    devices
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    let before = devices.current(DEVICE).await.unwrap();
    sqlx::query("UPDATE snapshots SET payload = '{\"shape\": \"of an older release\"}'")
        .execute(&db.pool)
        .await
        .unwrap();
    let reloaded = store(&db.pool, settings).load(DEVICE).await.unwrap();
    assert_eq!(reloaded.version, before.version);
    assert_eq!(reloaded.aggregate, before.aggregate);
}

#[tokio::test]
async fn the_cqrs_es_framework_runs_on_the_store() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    let cqrs = CqrsFramework::new(devices.clone(), vec![], ());
    cqrs.execute(DEVICE, register()).await.unwrap();
    cqrs.execute(DEVICE, heartbeat(1)).await.unwrap();
    let events = devices.load_events(DEVICE).await.unwrap();
    let sequences: Vec<usize> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    // The store's own path continues after what the framework wrote.
    let next = devices
        .execute(DEVICE, heartbeat(2), &metadata())
        .await
        .unwrap();
    assert_eq!(next.version, 4);
}

#[tokio::test]
async fn conditional_commands_need_the_expected_version() {
    let db = TestDatabase::create().await;
    let devices = store(&db.pool, StoreSettings::default());
    devices
        .execute(DEVICE, register(), &metadata())
        .await
        .unwrap();
    let stale = devices
        .execute_if(DEVICE, heartbeat(1), &metadata(), Some(7))
        .await;
    assert!(
        matches!(
            stale,
            Err(CommandError::VersionMismatch {
                expected: 7,
                actual: 1
            })
        ),
        "{stale:?}"
    );
    assert_eq!(event_count(&db.pool).await, 1);
    let current = devices
        .execute_if(DEVICE, heartbeat(1), &metadata(), Some(1))
        .await
        .unwrap();
    assert_eq!(current.version, 3);
}

/// An `If-Match` naming the version another process just wrote is judged on what is stored,
/// not on this process's older copy; a version older than the stored one is still refused.
#[tokio::test]
async fn a_conditional_command_is_judged_on_the_stored_version() {
    let db = TestDatabase::create().await;
    // One attempt only: judging the stored version must not cost a retry.
    let here = store(
        &db.pool,
        StoreSettings {
            max_attempts: 1,
            ..StoreSettings::default()
        },
    );
    let elsewhere = store(&db.pool, StoreSettings::default());
    here.execute(DEVICE, register(), &metadata()).await.unwrap();
    // Another process moves the device on; this one's cached copy stays at version 1.
    let moved = elsewhere
        .execute(DEVICE, heartbeat(1), &metadata())
        .await
        .unwrap();
    let committed = here
        .execute_if(DEVICE, heartbeat(2), &metadata(), Some(moved.version))
        .await
        .unwrap();
    assert!(committed.version > moved.version);
    let outdated = here
        .execute_if(DEVICE, heartbeat(3), &metadata(), Some(moved.version))
        .await;
    assert!(
        matches!(outdated, Err(CommandError::VersionMismatch { expected, actual })
            if expected == moved.version && actual == committed.version),
        "{outdated:?}"
    );
}

/// Roles in other processes (here: other stores over the same database, each with a cache of
/// its own) append to the same aggregates. Whatever a store answers from `current` or
/// `inspect` is at least as new as every event committed before the call, however it was
/// cached: desired properties set three times elsewhere read as the third.
#[tokio::test]
async fn reads_see_what_other_processes_appended_since_the_copy_was_cached() {
    let db = TestDatabase::create().await;
    let dispatcher = store(&db.pool, StoreSettings::default());
    let api = store(&db.pool, StoreSettings::default());
    api.execute(DEVICE, register(), &metadata()).await.unwrap();
    // The dispatcher caches the device before any desired document exists.
    let cached = dispatcher.current(DEVICE).await.unwrap();
    assert!(cached.aggregate.desired.is_empty());
    for (n, mode) in ["a", "b", "c"].into_iter().enumerate() {
        let mut properties = Map::new();
        properties.insert("mode".into(), json!(mode));
        let set = DeviceCommand::SetDesired {
            properties,
            at: at(10 + n as i64),
        };
        let committed = api.execute(DEVICE, set, &metadata()).await.unwrap();
        let seen = dispatcher.current(DEVICE).await.unwrap();
        assert_eq!(seen.version, committed.version);
        assert_eq!(seen.aggregate.desired["mode"], json!(mode));
        let (version, desired_mode) = dispatcher
            .inspect(DEVICE, |device, version| {
                (version, device.desired.get("mode").cloned())
            })
            .await
            .unwrap();
        assert_eq!(version, committed.version);
        assert_eq!(desired_mode, Some(json!(mode)));
    }
    // A cold load agrees with the copy kept current.
    let cold = store(&db.pool, StoreSettings::default());
    assert_eq!(
        cold.current(DEVICE).await.unwrap().aggregate,
        dispatcher.current(DEVICE).await.unwrap().aggregate
    );
}
