//! The liveness check against a real Postgres: a silent device goes offline once, a device heard
//! from after the read model's view stays online.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::DeviceCommand;
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_process::liveness::{Liveness, LivenessSettings};
use fleetlog_projections::replay::replay;
use fleetlog_projections::DeviceModels;
use fleetlog_projections::DevicesProjection;
use fleetlog_testkit::TestDatabase;

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::seconds(seconds)
}

async fn events_of(db: &TestDatabase, device: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(device)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn silent_devices_go_offline_once_and_live_ones_stay() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    for id in ["quiet", "chatty", "fresh"] {
        let register = DeviceCommand::Register {
            device_id: DeviceId::parse(id).unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            owner: UserId::parse("u-1").unwrap(),
            name: id.into(),
            model: "thermo".into(),
            tags: vec![],
            at: at(0),
            credentials: None,
        };
        bus.devices()
            .execute(id, register, &metadata)
            .await
            .unwrap();
        let heartbeat = DeviceCommand::Heartbeat {
            firmware_version: None,
            delivery: None,
            device_time: None,
            received_at: if id == "fresh" { at(350) } else { at(10) },
        };
        bus.devices()
            .execute(id, heartbeat, &metadata)
            .await
            .unwrap();
    }
    // The read model as of now; then "chatty" speaks again, which the model has not seen yet.
    replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    let late_heartbeat = DeviceCommand::Heartbeat {
        firmware_version: None,
        delivery: None,
        device_time: None,
        received_at: at(390),
    };
    bus.devices()
        .execute("chatty", late_heartbeat, &metadata)
        .await
        .unwrap();

    let liveness = Liveness::new(
        bus.clone(),
        LivenessSettings {
            timeout: Duration::from_secs(300),
            interval: Duration::from_secs(1),
        },
    );
    let marked = liveness.scan(at(400)).await.unwrap();
    assert_eq!(marked, ["quiet"]);
    assert_eq!(
        events_of(&db, "quiet").await,
        [
            "DeviceRegistered",
            "DeviceCameOnline",
            "HeartbeatReceived",
            "DeviceWentOffline"
        ]
    );
    let reason: String = sqlx::query_scalar(
        "SELECT payload -> 'DeviceWentOffline' ->> 'reason' FROM events
          WHERE aggregate_id = 'quiet' AND event_type = 'DeviceWentOffline'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reason, "no telemetry or heartbeat for 300s");
    assert!(!events_of(&db, "chatty")
        .await
        .contains(&"DeviceWentOffline".to_string()));
    assert!(!events_of(&db, "fresh")
        .await
        .contains(&"DeviceWentOffline".to_string()));

    // The read model still shows "quiet" online (its worker has not caught up): scanning again,
    // or from a restarted process, fires nothing new for the same silence.
    let restarted = Liveness::new(bus, LivenessSettings::default());
    assert!(restarted.scan(at(500)).await.unwrap().is_empty());
    assert_eq!(events_of(&db, "quiet").await.len(), 4);
}

/// With real clocks: the heartbeat's instant has nanoseconds, the read model keeps
/// microseconds. The device still goes offline once its silence is long enough.
#[tokio::test]
async fn a_device_heard_from_by_the_real_clock_goes_offline_after_its_silence() {
    let db = TestDatabase::create().await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let register = DeviceCommand::Register {
        device_id: DeviceId::parse("clocked").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "clocked".into(),
        model: "thermo".into(),
        tags: vec![],
        at: Utc::now(),
        credentials: None,
    };
    bus.devices()
        .execute("clocked", register, &metadata)
        .await
        .unwrap();
    // Find a clock reading with sub-microsecond digits, as almost every reading has.
    let mut heard = Utc::now();
    while heard.timestamp_subsec_nanos().is_multiple_of(1_000) {
        heard = Utc::now();
    }
    let heartbeat = DeviceCommand::Heartbeat {
        firmware_version: None,
        delivery: None,
        device_time: None,
        received_at: heard,
    };
    bus.devices()
        .execute("clocked", heartbeat, &metadata)
        .await
        .unwrap();
    replay(&DevicesProjection, &db.pool, |_| {}).await.unwrap();
    let liveness = Liveness::new(
        bus,
        LivenessSettings {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
        },
    );
    assert!(liveness.scan(Utc::now()).await.unwrap().is_empty());
    let marked = liveness
        .scan(Utc::now() + chrono::Duration::seconds(2))
        .await
        .unwrap();
    assert_eq!(marked, ["clocked"]);
    assert_eq!(
        events_of(&db, "clocked").await.last().map(String::as_str),
        Some("DeviceWentOffline")
    );
}
