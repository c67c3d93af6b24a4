//! Replay against a real Postgres: a rebuilt model equals the live one row for row, verify spots
//! a tampered row, and a replay swapped in while other processes keep appending events (and so
//! keep writing the device models inline) repairs it and loses none of their writes.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{CommandOutcome, DeviceCommand, FirmwareImage, Location, Reading};
use fleetlog_domain::firmware::FirmwareId;
use fleetlog_domain::{CommandId, DeviceId, RolloutId, TenantId, UserId};
use fleetlog_projections::replay::{replay, replay_from, verify, verify_from, Pages, ReplayError};
use fleetlog_projections::DeviceModels;
use fleetlog_projections::{DevicesProjection, TelemetryProjection};
use fleetlog_testkit::TestDatabase;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::seconds(seconds)
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

/// Registers `devices` in the tenant `acme`, tagged `tags`.
async fn register(bus: &CommandBus, devices: &[String], tags: &[&str]) {
    let metadata = CommandMetadata::new("test");
    for id in devices {
        let register = DeviceCommand::Register {
            device_id: DeviceId::parse(id).unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            owner: UserId::parse("u-1").unwrap(),
            name: format!("Device {id}"),
            model: "thermo".into(),
            tags: tags.iter().map(|tag| tag.to_string()).collect(),
            at: at(0),
            credentials: None,
        };
        bus.devices()
            .execute(id, register, &metadata)
            .await
            .unwrap();
    }
}

/// Every kind of device event, over several devices.
async fn mixed_workload(bus: &CommandBus, devices: &[String], round: i64) {
    let metadata = CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap());
    for (index, id) in devices.iter().enumerate() {
        let n = round * 100 + index as i64;
        let mut commands = vec![
            DeviceCommand::RecordTelemetry {
                digest: format!("m{n}"),
                redelivery: true,
                readings: vec![Reading {
                    sensor: "temperature".into(),
                    value: n as f64 / 3.0,
                    unit: Some("celsius".into()),
                    timestamp: Some(at(n)),
                }],
                device_time: Some(at(n)),
                received_at: at(n),
                location: Some(Location {
                    latitude: 48.1,
                    longitude: 11.5,
                }),
                status: object(json!({"battery": 100 - round})),
            },
            DeviceCommand::SetDesired {
                properties: object(json!({"interval": round})),
                at: at(n),
            },
            DeviceCommand::IssueCommand {
                command_id: CommandId::parse(format!("c{n}")).unwrap(),
                name: "reboot".into(),
                params: json!({"n": n}),
                issued_at: at(n),
                expires_at: at(n + 60),
            },
            DeviceCommand::RecordCommandReply {
                command_id: CommandId::parse(format!("c{n}")).unwrap(),
                outcome: CommandOutcome::Failed,
                result: json!({"error": "busy"}),
                received_at: at(n + 1),
            },
            DeviceCommand::Heartbeat {
                firmware_version: None,
                delivery: None,
                device_time: None,
                received_at: at(n + 2),
            },
        ];
        if index % 2 == 0 {
            commands.push(DeviceCommand::MarkOffline {
                reason: "silent".into(),
                silent_since: None,
                at: at(n + 300),
            });
        }
        if round == 0 && index == 0 {
            commands.push(DeviceCommand::RequestFirmwareUpdate {
                rollout_id: Some(RolloutId::parse("r1").unwrap()),
                firmware_id: FirmwareId::parse("thermo@2.0.0").unwrap(),
                image: FirmwareImage {
                    sha256: "ab".repeat(32),
                    size_bytes: 4096,
                    signature: None,
                },
                compatible_models: vec![],
                at: at(n),
            });
            commands.push(DeviceCommand::Heartbeat {
                device_time: None,
                firmware_version: Some("2.0.0".into()),
                received_at: at(n + 5),
                delivery: None,
            });
        }
        for command in commands {
            bus.devices().execute(id, command, &metadata).await.unwrap();
        }
    }
}

/// Telemetry for `devices`, round after round, from a command bus of its own (another
/// process, as far as caches go), until `stop`: how many messages it recorded.
async fn keep_reporting(bus: CommandBus, devices: Vec<String>, stop: CancellationToken) -> u64 {
    let metadata = CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap());
    let mut recorded = 0;
    for n in 1_000.. {
        if stop.is_cancelled() {
            break;
        }
        for id in &devices {
            let report = DeviceCommand::RecordTelemetry {
                digest: format!("k{n}"),
                redelivery: true,
                readings: vec![Reading {
                    sensor: "humidity".into(),
                    value: n as f64,
                    unit: None,
                    timestamp: Some(at(n)),
                }],
                device_time: Some(at(n)),
                received_at: at(n),
                location: None,
                status: Map::new(),
            };
            bus.devices()
                .execute(id, report, &metadata)
                .await
                .expect("appending goes on during a replay");
            recorded += 1;
        }
    }
    recorded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_equals_live_and_repairs_a_tampered_model_under_running_writers() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let devices: Vec<String> = (0..5).map(|n| format!("d{n}")).collect();
    register(&bus, &devices, &["a", "b"]).await;
    for round in 0..3 {
        mixed_workload(&bus, &devices, round).await;
    }
    let decommission = DeviceCommand::Decommission {
        reason: "replaced".into(),
        at: at(9_999),
    };
    bus.devices()
        .execute("d4", decommission, &metadata)
        .await
        .unwrap();

    let patience = Duration::from_secs(20);
    let differences = verify(&DevicesProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    let differences = verify(&TelemetryProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    let telemetry_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(telemetry_rows, 15);

    // A damaged live model is caught by verify, row by row...
    sqlx::query("UPDATE devices SET name = 'tampered' WHERE device_id = 'd1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let differences = verify(&DevicesProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert_eq!(differences.len(), 2, "{differences:#?}");
    let live = differences.iter().find(|d| d.only_in == "live").unwrap();
    assert_eq!(live.table, "devices");
    assert_eq!(live.row["name"], "tampered");
    let rebuilt = differences.iter().find(|d| d.only_in == "replay").unwrap();
    assert_eq!(rebuilt.row["name"], "Device d1");

    // ...and repaired by a replay swapped in while another process keeps appending events,
    // and so writing the models inline, before, during and after the swap.
    let stop = CancellationToken::new();
    let writer = tokio::spawn(keep_reporting(
        CommandBus::new(
            db.pool.clone(),
            StoreSettings::default(),
            DeviceModels::inline(),
        ),
        devices[..4].to_vec(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reports = 0;
    let replayed = replay(&DevicesProjection, &db.pool, |progress| {
        reports += 1;
        assert!(progress.applied <= progress.total);
    })
    .await
    .unwrap();
    assert!(reports > 0);
    assert!(replayed.passed_over.is_empty(), "{replayed:?}");
    replay(&TelemetryProjection, &db.pool, |_| {})
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let recorded = writer.await.unwrap();
    assert!(recorded > 0, "the other process appended meanwhile");

    let name: String = sqlx::query_scalar("SELECT name FROM devices WHERE device_id = 'd1'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(name, "Device d1");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'devices' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(
        indexes.contains(&"devices_tenant_device_id_idx".to_string()),
        "{indexes:?}"
    );
    let telemetry_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        telemetry_rows,
        15 + recorded as i64,
        "no reading lost in the swap"
    );
    for id in &devices {
        let version = bus.devices().current(id).await.unwrap().version;
        let last_sequence: i64 =
            sqlx::query_scalar("SELECT last_sequence FROM devices WHERE device_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            last_sequence as u64, version,
            "{id} is as far as its events"
        );
    }
    let differences = verify(&DevicesProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");

    // The write side carries on on the swapped-in tables.
    mixed_workload(&bus, &devices[..4], 7).await;
    let differences = verify(&DevicesProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences;
    assert!(differences.is_empty(), "{differences:#?}");
    let interval: Value =
        sqlx::query_scalar("SELECT desired -> 'interval' FROM devices WHERE device_id = 'd0'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(interval, json!(7));
}

#[tokio::test]
async fn replay_reads_events_across_a_power_of_ten_of_transaction_ids_in_order() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let register = DeviceCommand::Register {
        device_id: DeviceId::parse("edge").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "edge".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
        credentials: None,
    };
    bus.devices()
        .execute("edge", register, &metadata)
        .await
        .unwrap();
    let heartbeat = DeviceCommand::Heartbeat {
        firmware_version: None,
        delivery: None,
        device_time: None,
        received_at: at(1),
    };
    bus.devices()
        .execute("edge", heartbeat, &metadata)
        .await
        .unwrap();
    fleetlog_testkit::append_copies_across_a_power_of_ten(&db.pool, "device", "edge", 40).await;

    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let applied = replay(&DevicesProjection, &db.pool, |_| {})
        .await
        .unwrap()
        .applied;
    assert_eq!(applied as i64, stored);
    let last_sequence: i64 =
        sqlx::query_scalar("SELECT last_sequence FROM devices WHERE device_id = 'edge'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(last_sequence, stored);
}

/// An event stored before NULs were refused (the events table is `json`, so it took it) can
/// never be applied to a `jsonb` read model. Replay passes it over by the live worker's
/// dead-letter rule, reports it, and rebuilds everything else.
#[tokio::test]
async fn replay_passes_over_an_event_it_cannot_apply_and_reports_it() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let register = DeviceCommand::Register {
        device_id: DeviceId::parse("poisoned").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "poisoned".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
        credentials: None,
    };
    bus.devices()
        .execute("poisoned", register, &metadata)
        .await
        .unwrap();
    let poison = fleetlog_domain::device::DeviceEvent::StatusReported {
        status: object(json!({"note": "a\u{0}b", "battery": 42})),
        received_at: at(1),
        digest: None,
    };
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('device', 'poisoned', 2, 'StatusReported', '1.0', $1::json, '{}')",
    )
    .bind(serde_json::to_string(&poison).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    bus.devices().evict("poisoned");
    let report = DeviceCommand::ReportStatus {
        status: object(json!({"battery": 41})),
        received_at: at(2),
        delivery: None,
    };
    bus.devices()
        .execute("poisoned", report, &metadata)
        .await
        .unwrap();

    // A device whose very first event cannot be applied: its row is never created, so its
    // later events are passed over after it instead of stopping the rebuild at a gap.
    let broken_registration = fleetlog_domain::device::DeviceEvent::DeviceRegistered {
        device_id: DeviceId::parse("broken").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "a\u{0}b".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
    };
    let broken_heartbeat = fleetlog_domain::device::DeviceEvent::HeartbeatReceived {
        device_time: None,
        received_at: at(3),
        digest: None,
    };
    for (sequence, event) in [(1, &broken_registration), (2, &broken_heartbeat)] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('device', 'broken', $1, $2, '1.0', $3::json, '{}')",
        )
        .bind(sequence)
        .bind(cqrs_es::DomainEvent::event_type(event))
        .bind(serde_json::to_string(event).unwrap())
        .execute(&db.pool)
        .await
        .unwrap();
    }

    let replayed = replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    let passed: Vec<&str> = replayed
        .passed_over
        .iter()
        .map(|p| p.message_id.as_str())
        .collect();
    assert_eq!(
        passed,
        ["device:poisoned:2", "device:broken:1", "device:broken:2"],
        "{replayed:?}"
    );
    let (battery, last_sequence): (Value, i64) = sqlx::query_as(
        "SELECT reported -> 'battery', last_sequence FROM devices WHERE device_id = 'poisoned'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(battery, json!(41));
    let last: i64 = sqlx::query_scalar("SELECT max(sequence) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(last_sequence, last);
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projection_dead_letters WHERE aggregate_id = 'poisoned' AND sequence = 2",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(dead, 1);
    // A second replay records each once only, and passes them over again.
    let again = replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    assert_eq!(again.passed_over.len(), 3);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead, 3);
}

/// A sensor's latest value is its newest reading by reading time: an old reading arriving
/// later does not replace it, nor does one stamped far in the future (a device clock gone
/// wrong), though both stay in the history. Within a batch and across batches alike.
#[tokio::test]
async fn the_latest_reading_is_the_newest_by_reading_time() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let register = DeviceCommand::Register {
        device_id: DeviceId::parse("t1").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "t1".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
        credentials: None,
    };
    bus.devices()
        .execute("t1", register, &metadata)
        .await
        .unwrap();
    let now = Utc::now();
    let reading = |n: i64, value: f64, timestamp: DateTime<Utc>| DeviceCommand::RecordTelemetry {
        digest: format!("r{n}"),
        redelivery: true,
        readings: vec![Reading {
            sensor: "temp".into(),
            value,
            unit: None,
            timestamp: Some(timestamp),
        }],
        device_time: None,
        received_at: now,
        location: None,
        status: Map::new(),
    };
    let today = now - chrono::Duration::seconds(10);
    for (n, value, timestamp) in [
        (1, 21.0, today),
        (2, 5.0, at(-60 * 86_400)),
        (3, 99.0, now + chrono::Duration::days(1)),
    ] {
        bus.devices()
            .execute("t1", reading(n, value, timestamp), &metadata)
            .await
            .unwrap();
    }
    replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    let latest: Value = sqlx::query_scalar("SELECT sensors -> 'temp' -> 'value' FROM devices")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(latest, json!(21.0));
    replay(&TelemetryProjection, &db.pool, |_| {})
        .await
        .unwrap();
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry WHERE device_id = 't1'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(history, 3);
    // Across batches the stored value is compared the same way.
    let merged: Value = sqlx::query_scalar(
        "SELECT fleetlog_newer_readings(
                  '{\"temp\": {\"value\": 21, \"timestamp\": \"2026-01-02T00:00:00Z\"}}',
                  '{\"temp\": {\"value\": 5, \"timestamp\": \"2024-01-01T00:00:00Z\"},
                    \"hum\": {\"value\": 40, \"timestamp\": \"2024-01-01T00:00:00Z\"}}')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(merged["temp"]["value"], 21);
    assert_eq!(merged["hum"]["value"], 40);
}

/// An unrelated transaction that began before the latest events and is still open (in this
/// database or any other of the cluster) keeps those events from the paged rebuild; the final
/// catch-up, under the lock, takes them anyway rather than swap in a model without them.
#[tokio::test]
async fn replay_keeps_committed_events_an_unrelated_open_transaction_holds_back() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let register = DeviceCommand::Register {
        device_id: DeviceId::parse("w1").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "before".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(0),
        credentials: None,
    };
    bus.devices()
        .execute("w1", register, &metadata)
        .await
        .unwrap();
    let mut older = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .unwrap();
    let rename = DeviceCommand::UpdateMetadata {
        name: Some("after".into()),
        model: None,
        tags: None,
        at: at(1),
    };
    bus.devices()
        .execute("w1", rename, &metadata)
        .await
        .unwrap();
    let replayed = replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    assert_eq!(replayed.applied, 2);
    older.rollback().await.unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM devices WHERE device_id = 'w1'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(name, "after");
}

/// The indexes and constraints of the device models' tables, as Postgres prints them.
async fn schema_of_device_models(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes
          WHERE schemaname = 'public' AND tablename IN ('devices', 'device_commands', 'telemetry')
         UNION ALL
         SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
           FROM pg_constraint
          WHERE conrelid::regclass::text IN ('devices', 'device_commands', 'telemetry')
          ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `rounds` × 100 readings of each of `devices`, one event each.
async fn record_readings(bus: &CommandBus, devices: &[String], rounds: i64) {
    let metadata = CommandMetadata::new("test").with_tenant(TenantId::parse("acme").unwrap());
    for round in 0..rounds {
        let work = devices
            .iter()
            .map(|id| {
                let commands = (0..100)
                    .map(|n| {
                        let n = round * 100 + n + 1;
                        DeviceCommand::RecordTelemetry {
                            digest: format!("r{n}"),
                            redelivery: true,
                            readings: vec![Reading {
                                sensor: "temperature".into(),
                                value: n as f64 / 3.0,
                                unit: Some("C".into()),
                                timestamp: Some(at(n)),
                            }],
                            device_time: None,
                            received_at: at(n),
                            location: None,
                            status: Map::new(),
                        }
                    })
                    .collect();
                (id.clone(), commands, metadata.clone())
            })
            .collect();
        for result in bus.devices().execute_many(work).await {
            result.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_of_several_pages_run_at_once_and_swap_in_every_index() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let devices: Vec<String> = (0..20).map(|n| format!("p{n}")).collect();
    register(&bus, &devices, &[]).await;
    // 12,000 readings: more than two pages of the rebuild, read ahead while applied.
    record_readings(&bus, &devices, 6).await;
    let schema = schema_of_device_models(&db.pool).await;
    assert!(
        schema
            .iter()
            .any(|line| line.contains("UNIQUE INDEX telemetry_")),
        "{schema:#?}"
    );

    sqlx::query("DELETE FROM telemetry WHERE device_id = 'p3'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (devices_replayed, telemetry_replayed) = tokio::join!(
        replay(&DevicesProjection, &db.pool, |_| {}),
        replay(&TelemetryProjection, &db.pool, |_| {}),
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(events > 12_000);
    assert_eq!(devices_replayed.unwrap().applied, events as u64);
    assert_eq!(telemetry_replayed.unwrap().applied, events as u64);

    assert_eq!(schema_of_device_models(&db.pool).await, schema);
    let readings: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(readings, 12_000, "the deleted readings are back");
    let (last_sequence, newest): (i64, i64) = sqlx::query_as(
        "SELECT last_sequence, (SELECT max(sequence) FROM events WHERE aggregate_id = 'p7')
           FROM devices WHERE device_id = 'p7'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, newest);
    // The unique key the rebuild went without is back, and does its work again.
    let repeated = sqlx::query(
        "INSERT INTO telemetry (device_id, sensor, time, value, unit, sequence)
         SELECT device_id, sensor, time, value, unit, sequence FROM telemetry LIMIT 1",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert!(repeated.to_string().contains("duplicate key"), "{repeated}");

    let patience = Duration::from_secs(20);
    let (devices_verified, telemetry_verified) = tokio::join!(
        verify(&DevicesProjection, &db.pool, patience, |_| {}),
        verify(&TelemetryProjection, &db.pool, patience, |_| {}),
    );
    let differences = devices_verified.unwrap().differences;
    assert!(differences.is_empty(), "{differences:#?}");
    let differences = telemetry_verified.unwrap().differences;
    assert!(differences.is_empty(), "{differences:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reading_feeds_both_device_models_and_two_readings_at_once_take_turns() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let devices: Vec<String> = (0..10).map(|n| format!("s{n}")).collect();
    register(&bus, &devices, &[]).await;
    // 6,010 events: two pages, the second handed on while the first is applied.
    record_readings(&bus, &devices, 6).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM telemetry WHERE device_id = 's3'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET sensors = '{}' WHERE device_id = 's4'")
        .execute(&db.pool)
        .await
        .unwrap();

    // Two shared readings at once (two `replay --all`): the second waits for the first's
    // locks, taken in one order, and both end.
    let both = || async {
        let pages = Pages::shared(&db.pool, "device", &["telemetry", "devices"])
            .await
            .unwrap();
        let [telemetry_pages, devices_pages] = <[Pages; 2]>::try_from(pages).ok().unwrap();
        let (telemetry, devices) = tokio::join!(
            replay_from(&TelemetryProjection, &db.pool, telemetry_pages, |_| {}),
            replay_from(&DevicesProjection, &db.pool, devices_pages, |_| {}),
        );
        (telemetry.unwrap().applied, devices.unwrap().applied)
    };
    let (first, second) = tokio::time::timeout(Duration::from_secs(120), async {
        tokio::join!(both(), both())
    })
    .await
    .expect("two shared readings at once ended");
    assert_eq!(first, (events as u64, events as u64));
    assert_eq!(second, (events as u64, events as u64));
    let readings: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(readings, 6_000, "the deleted readings are back");
    let sensors: Value = sqlx::query_scalar("SELECT sensors FROM devices WHERE device_id = 's4'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(sensors["temperature"]["value"], json!(200.0));

    // A rebuild that ends before it reads (here: never starts) does not hold the other back.
    let pages = Pages::shared(&db.pool, "device", &["devices", "telemetry"])
        .await
        .unwrap();
    let [devices_pages, telemetry_pages] = <[Pages; 2]>::try_from(pages).ok().unwrap();
    drop(telemetry_pages);
    let verified = tokio::time::timeout(
        Duration::from_secs(60),
        verify_from(
            &DevicesProjection,
            &db.pool,
            devices_pages,
            Duration::from_secs(20),
            |_| {},
        ),
    )
    .await
    .expect("the remaining rebuild went on alone")
    .unwrap();
    assert!(
        verified.differences.is_empty(),
        "{:?}",
        verified.differences
    );
    let pages = Pages::shared(&db.pool, "device", &["telemetry", "devices"])
        .await
        .unwrap();
    let [telemetry_pages, devices_pages] = <[Pages; 2]>::try_from(pages).ok().unwrap();
    let patience = Duration::from_secs(20);
    let (telemetry, devices) = tokio::join!(
        verify_from(
            &TelemetryProjection,
            &db.pool,
            telemetry_pages,
            patience,
            |_| {}
        ),
        verify_from(
            &DevicesProjection,
            &db.pool,
            devices_pages,
            patience,
            |_| {}
        ),
    );
    assert!(telemetry.unwrap().differences.is_empty());
    assert!(devices.unwrap().differences.is_empty());

    // Misuse is refused, never left waiting: a projection named twice (its second rebuild
    // would wait for the lock its first holds), pages handed to another projection.
    let twice = Pages::shared(&db.pool, "device", &["devices", "devices"]).await;
    assert!(matches!(twice, Err(ReplayError::SharedMisuse(_))));
    let pages = Pages::shared(&db.pool, "device", &["devices", "telemetry"])
        .await
        .unwrap();
    let [devices_pages, telemetry_pages] = <[Pages; 2]>::try_from(pages).ok().unwrap();
    let swapped = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            replay_from(&TelemetryProjection, &db.pool, devices_pages, |_| {}),
            replay_from(&DevicesProjection, &db.pool, telemetry_pages, |_| {}),
        )
    })
    .await
    .expect("refused at once");
    assert!(matches!(swapped.0, Err(ReplayError::SharedMisuse(_))));
    assert!(matches!(swapped.1, Err(ReplayError::SharedMisuse(_))));
    // Their locks went with them: a replay of its own runs.
    let alone = replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    assert_eq!(alone.applied, events as u64);
}
