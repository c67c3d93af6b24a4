//! The device models kept inline, against a real Postgres: written in the transaction that
//! appends the events (no worker, no stream), caught up from the events table when they lag
//! it, passing over what they cannot apply without refusing the events, and one model however
//! many processes append at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::{CommandOutcome, DeviceCommand, Reading};
use fleetlog_domain::{CommandId, DeviceId, TenantId, UserId};
use fleetlog_eventlog::HistoryQuery;
use fleetlog_projections::replay::verify;
use fleetlog_projections::worker::{apply_event, Position};
use fleetlog_projections::{DeviceModels, DevicesProjection, TelemetryProjection};
use fleetlog_testkit::TestDatabase;
use serde_json::{json, Map, Value};
use sqlx::PgPool;

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::seconds(seconds)
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

/// Two readings: a temperature stamped by the device and a humidity stamped by the message.
fn telemetry(n: i64, status: Value) -> DeviceCommand {
    DeviceCommand::RecordTelemetry {
        digest: format!("m{n}"),
        redelivery: true,
        readings: vec![
            Reading {
                sensor: "temperature".into(),
                value: 20.0 + n as f64 / 3.0,
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

async fn telemetry_rows(pool: &PgPool, device: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry WHERE device_id = $1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn last_sequence(pool: &PgPool, device: &str) -> i64 {
    sqlx::query_scalar("SELECT last_sequence FROM devices WHERE device_id = $1")
        .bind(device)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Both device models equal what a replay from the events table builds.
async fn assert_models_equal_a_replay(pool: &PgPool) {
    let patience = Duration::from_secs(5);
    let devices = verify(&DevicesProjection, pool, patience, |_| {})
        .await
        .unwrap();
    assert!(devices.differences.is_empty(), "{devices:#?}");
    let telemetry = verify(&TelemetryProjection, pool, patience, |_| {})
        .await
        .unwrap();
    assert!(telemetry.differences.is_empty(), "{telemetry:#?}");
}

#[tokio::test]
async fn the_device_models_are_written_with_the_events() {
    let db = TestDatabase::create().await;
    let bus = bus(&db.pool);
    let devices = bus.devices();
    let registered = devices
        .execute("d1", register("d1"), &metadata())
        .await
        .unwrap();
    // Nothing to wait for: the write answers once its read model shows it.
    assert_eq!(
        last_sequence(&db.pool, "d1").await,
        registered.version as i64
    );
    devices
        .execute(
            "d1",
            telemetry(1, json!({"mode": "eco", "battery": 90})),
            &metadata(),
        )
        .await
        .unwrap();
    assert_eq!(telemetry_rows(&db.pool, "d1").await, 2);
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
    let last = devices.execute("d1", offline, &metadata()).await.unwrap();

    let row: (bool, Value, Value, Value, Value, i32, i64, String, Vec<String>) = sqlx::query_as(
        "SELECT online, sensors, reported, desired, delta, open_commands, last_sequence, offline_reason, tags
           FROM devices WHERE device_id = 'd1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (online, sensors, reported, desired, delta, open_commands, sequence, reason, tags) = row;
    assert!(!online);
    assert_eq!(reason, "silent");
    assert_eq!(sensors["temperature"]["value"], json!(20.0 + 1.0 / 3.0));
    assert_eq!(sensors["temperature"]["unit"], json!("celsius"));
    assert_eq!(reported, json!({"mode": "eco", "battery": 90}));
    assert_eq!(desired, json!({"mode": "turbo", "interval": 30}));
    assert_eq!(delta, json!({"mode": "turbo", "interval": 30}));
    assert_eq!(open_commands, 1);
    assert_eq!(tags, ["lab"]);
    assert_eq!(sequence as u64, last.version);
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
    assert_models_equal_a_replay(&db.pool).await;
}

/// A model that lags the log (an upgrade from a version whose worker had not caught up, rows
/// lost) is brought up to date from the events table by the device's next event, in both
/// models, and equals a replay afterwards.
#[tokio::test]
async fn a_model_behind_the_log_is_caught_up_by_the_next_event() {
    let db = TestDatabase::create().await;
    let bus = bus(&db.pool);
    for id in ["behind", "missing"] {
        bus.devices()
            .execute(id, register(id), &metadata())
            .await
            .unwrap();
        for n in 1..=4 {
            bus.devices()
                .execute(id, telemetry(n, json!({"battery": 100 - n})), &metadata())
                .await
                .unwrap();
        }
    }
    // `missing` never made it into the models; `behind` stands at its second event.
    sqlx::query("DELETE FROM devices")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM telemetry")
        .execute(&db.pool)
        .await
        .unwrap();
    let history = fleetlog_eventlog::history(
        &db.pool,
        HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "behind",
            after_sequence: 0,
            event_type: None,
            limit: 2,
        },
    )
    .await
    .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for event in &history {
        assert_eq!(
            apply_event(&DevicesProjection, &mut tx, event)
                .await
                .unwrap(),
            Position::Applied
        );
    }
    tx.commit().await.unwrap();
    assert_eq!(last_sequence(&db.pool, "behind").await, 2);

    for id in ["behind", "missing"] {
        let done = bus
            .devices()
            .execute(id, telemetry(5, json!({"battery": 1})), &metadata())
            .await
            .unwrap();
        assert_eq!(last_sequence(&db.pool, id).await, done.version as i64);
    }
    // Every reading: the two events `behind` held carry none (the registration, coming online).
    assert_eq!(telemetry_rows(&db.pool, "missing").await, 10);
    assert_eq!(telemetry_rows(&db.pool, "behind").await, 10);
    let battery: Value =
        sqlx::query_scalar("SELECT reported -> 'battery' FROM devices WHERE device_id = 'behind'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(battery, json!(1));
    assert_models_equal_a_replay(&db.pool).await;
}

/// An event the model cannot apply (here the table refuses its row) is stored all the same:
/// the model passes over it with the reason, as the workers and replay do, and applies the
/// device's later events.
#[tokio::test]
async fn an_event_the_model_cannot_apply_is_passed_over_and_the_log_keeps_it() {
    let db = TestDatabase::create().await;
    let bus = bus(&db.pool);
    bus.devices()
        .execute("d1", register("d1"), &metadata())
        .await
        .unwrap();
    sqlx::query("ALTER TABLE devices ADD CONSTRAINT no_boom CHECK (name <> 'boom')")
        .execute(&db.pool)
        .await
        .unwrap();
    let rename = DeviceCommand::UpdateMetadata {
        name: Some("boom".into()),
        model: None,
        tags: None,
        at: at(1),
    };
    let renamed = bus
        .devices()
        .execute("d1", rename, &metadata())
        .await
        .expect("the event log takes the event");
    let (sequence, reason): (i64, String) = sqlx::query_as(
        "SELECT sequence, reason FROM projection_dead_letters WHERE projection = 'devices'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(sequence as u64, renamed.version);
    assert!(reason.contains("no_boom"), "{reason}");
    let name: String = sqlx::query_scalar("SELECT name FROM devices WHERE device_id = 'd1'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(name, "Device d1");
    assert_eq!(
        last_sequence(&db.pool, "d1").await,
        sequence,
        "moved past it"
    );

    let later = bus
        .devices()
        .execute("d1", telemetry(2, json!({"battery": 80})), &metadata())
        .await
        .unwrap();
    assert_eq!(last_sequence(&db.pool, "d1").await, later.version as i64);
    assert_eq!(telemetry_rows(&db.pool, "d1").await, 2);
    // A replay passes over the same event (the shadow has the same constraint) and builds
    // the same model.
    let rebuilt = verify(&DevicesProjection, &db.pool, Duration::from_secs(5), |_| {})
        .await
        .unwrap();
    assert!(rebuilt.differences.is_empty(), "{rebuilt:#?}");
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_dead_letters")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(dead_letters, 1, "recorded once");
}

/// Processes appending to the same devices at once, each with its own cache (the API, two
/// ingest instances): every event lands in the models once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_in_several_processes_keep_one_model() {
    let db = TestDatabase::create().await;
    let ids: Vec<String> = (0..4).map(|n| format!("d{n}")).collect();
    for id in &ids {
        bus(&db.pool)
            .devices()
            .execute(id, register(id), &metadata())
            .await
            .unwrap();
    }
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..3_i64 {
        let (bus, ids) = (bus(&db.pool), ids.clone());
        writers.spawn(async move {
            for round in 0..15 {
                let n = writer * 1_000 + round;
                for id in &ids {
                    let command = if round % 5 == 4 {
                        let mut desired = Map::new();
                        desired.insert("interval".into(), json!(n));
                        DeviceCommand::SetDesired {
                            properties: desired,
                            at: at(n),
                        }
                    } else {
                        telemetry(n, json!({"writer": writer}))
                    };
                    bus.devices()
                        .execute(id, command, &metadata())
                        .await
                        .unwrap();
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let reader = bus(&db.pool);
    for id in &ids {
        let device = reader.devices().current(id).await.unwrap();
        assert_eq!(last_sequence(&db.pool, id).await as u64, device.version);
        let reported: Value =
            sqlx::query_scalar("SELECT reported FROM devices WHERE device_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(reported, Value::Object(device.aggregate.reported.clone()));
        assert_eq!(telemetry_rows(&db.pool, id).await, 3 * 12 * 2);
    }
    assert_models_equal_a_replay(&db.pool).await;
}

/// Latest readings are compared at the precision Postgres reads the documents' timestamps
/// with: the Rust fold of a batch and the merge of batches in SQL (the fast `||` or
/// `fleetlog_newer_readings`) must pick the same reading, however events are batched,
/// sub-microsecond differences and ties included.
#[tokio::test]
async fn the_latest_reading_is_the_same_however_events_are_batched() {
    let db = TestDatabase::create().await;

    // The fold's notion of a microsecond is the one Postgres reads from the document's text.
    let base = at(0);
    for nanos in [
        0_i64,
        400,
        500,
        600,
        1_500,
        2_500,
        999_999_500,
        123_456_500,
        919_495_893,
    ] {
        let timestamp = base + chrono::Duration::nanoseconds(nanos);
        let text = serde_json::to_value(timestamp).unwrap();
        let read: i64 = sqlx::query_scalar(
            "SELECT (extract(epoch FROM ($1::jsonb #>> '{}')::timestamptz) * 1000000)::bigint",
        )
        .bind(&text)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            fleetlog_projections::devices::postgres_micros(timestamp),
            read,
            "{text}"
        );
    }

    // The same readings, message by message (a transaction each) and all in one attempt.
    let offsets_ns: [(&str, i64); 11] = [
        ("a", 1_000),
        ("a", 400),
        ("b", 5_000),
        ("a", 1_400),
        ("a", 600),
        ("b", 4_600),
        ("a", -1_000_000_000),
        ("b", 4_400),
        ("a", 1_600),
        ("b", 5_200),
        ("b", 4_700),
    ];
    let reading = |n: usize, sensor: &str, offset: i64| DeviceCommand::RecordTelemetry {
        digest: format!("s{n}"),
        redelivery: true,
        readings: vec![Reading {
            sensor: sensor.into(),
            value: n as f64,
            unit: None,
            timestamp: Some(base + chrono::Duration::nanoseconds(offset)),
        }],
        device_time: None,
        received_at: base + chrono::Duration::seconds(1),
        location: None,
        status: Map::new(),
    };
    let bus = bus(&db.pool);
    for id in ["one-by-one", "batched"] {
        bus.devices()
            .execute(id, register(id), &metadata())
            .await
            .unwrap();
    }
    let commands: Vec<DeviceCommand> = offsets_ns
        .iter()
        .enumerate()
        .map(|(n, (sensor, offset))| reading(n, sensor, *offset))
        .collect();
    for command in &commands {
        bus.devices()
            .execute("one-by-one", command.clone(), &metadata())
            .await
            .unwrap();
    }
    bus.devices()
        .execute_batch("batched", commands, &metadata())
        .await
        .unwrap();
    let latest = |id: &'static str| {
        let pool = db.pool.clone();
        async move {
            let sensors: Value =
                sqlx::query_scalar("SELECT sensors FROM devices WHERE device_id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (sensors["a"]["value"].clone(), sensors["b"]["value"].clone())
        }
    };
    // a: 400 ns reads as 0 µs (older than the first, 1 µs), 1,400 and 600 as 1 µs (ties: the
    // later wins), 1,600 as 2 µs: the newest. b: 4,600 ns reads as 5 µs, a tie with the
    // first; 4,400 as 4 µs, older; 5,200 and then 4,700 as 5 µs again: the last tie wins,
    // although it is 500 ns older than the one before.
    assert_eq!(latest("one-by-one").await, (json!(8.0), json!(10.0)));
    assert_eq!(latest("batched").await, (json!(8.0), json!(10.0)));
    assert_models_equal_a_replay(&db.pool).await;
}
