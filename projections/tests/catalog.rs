//! The firmware, rollout and user read models through the real path (relay, JetStream, workers),
//! checked against a replay.

use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::firmware::{FirmwareCommand, FirmwareId, ImageSignature};
use fleetlog_domain::rollout::{DeviceOutcome, ErrorAction, RolloutCommand, Waves};
use fleetlog_domain::user::{Role, UserCommand};
use fleetlog_domain::{DeviceId, RolloutId, SessionId, TenantId, UserId};
use fleetlog_projections::replay::verify;
use fleetlog_projections::DeviceModels;
use fleetlog_projections::{
    FirmwareProjection, RolloutsProjection, UsersProjection, WorkerSettings,
};
use fleetlog_relay::RelaySettings;
use fleetlog_testkit::{wait_until_projected, NatsServer, TestDatabase};
use tokio_util::sync::CancellationToken;

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + chrono::Duration::seconds(seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_rollouts_and_users_follow_their_events() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    let tenant = TenantId::parse("acme").unwrap();

    let firmware_id = FirmwareId::parse("thermo@2.1.0").unwrap();
    let firmware_key = firmware_id.to_string();
    let register = FirmwareCommand::Register {
        firmware_id: firmware_id.clone(),
        tenant: tenant.clone(),
        sha256: "ab".repeat(32),
        size_bytes: 4096,
        storage_key: "firmware/thermo@2.1.0".into(),
        compatible_models: vec!["thermo-v2".into()],
        notes: "faster".into(),
        at: at(0),
    };
    bus.firmware()
        .execute(&firmware_key, register, &metadata)
        .await
        .unwrap();
    bus.firmware()
        .execute(
            &firmware_key,
            FirmwareCommand::Release {
                signature: ImageSignature {
                    algorithm: "ed25519".into(),
                    key_id: "0123456789abcdef".into(),
                    signature: "A".repeat(86) + "==",
                },
                at: at(1),
            },
            &metadata,
        )
        .await
        .unwrap();

    let devices: Vec<DeviceId> = (0..4)
        .map(|n| DeviceId::parse(format!("d{n}")).unwrap())
        .collect();
    let rollout = |command| bus.rollouts().execute("r1", command, &metadata);
    rollout(RolloutCommand::Create {
        rollout_id: RolloutId::parse("r1").unwrap(),
        tenant: tenant.clone(),
        firmware_id,
        targets: devices.clone(),
        waves: Waves::Percentages(vec![50, 100]),
        success_threshold: 50,
        error_threshold: 50,
        on_error: ErrorAction::Pause,
        device_timeout_secs: 600,
        window_secs: 3600,
        at: at(2),
    })
    .await
    .unwrap();
    rollout(RolloutCommand::Start { at: at(3) }).await.unwrap();
    let send = |devices: &[DeviceId]| RolloutCommand::SendToDevices {
        devices: devices.to_vec(),
        at: at(3),
    };
    rollout(send(&devices[..2])).await.unwrap();
    let outcome = |device: &DeviceId, outcome| RolloutCommand::RecordDeviceOutcome {
        device_id: device.clone(),
        outcome,
        reported_at: None,
        at: at(4),
    };
    rollout(outcome(&devices[0], DeviceOutcome::Succeeded))
        .await
        .unwrap();
    rollout(outcome(
        &devices[1],
        DeviceOutcome::Failed {
            error: "flash".into(),
        },
    ))
    .await
    .unwrap();
    // d0 alone reached the 50% success threshold of wave 0: wave 1 started by itself.
    rollout(send(&devices[2..3])).await.unwrap();
    rollout(RolloutCommand::Pause {
        reason: "weekend".into(),
        at: at(6),
    })
    .await
    .unwrap();

    // A second rollout through the less-trodden events: a busy device returned to the queue,
    // a decommissioned one canceled, an abort, and an outcome reported before the abort that
    // arrives after it.
    let others: Vec<DeviceId> = (0..5)
        .map(|n| DeviceId::parse(format!("e{n}")).unwrap())
        .collect();
    let second = |command| bus.rollouts().execute("r2", command, &metadata);
    second(RolloutCommand::Create {
        rollout_id: RolloutId::parse("r2").unwrap(),
        tenant: tenant.clone(),
        firmware_id: FirmwareId::parse("thermo@2.1.0").unwrap(),
        targets: others.clone(),
        waves: Waves::Percentages(vec![100]),
        success_threshold: 50,
        error_threshold: 50,
        on_error: ErrorAction::Pause,
        device_timeout_secs: 600,
        window_secs: 3600,
        at: at(2),
    })
    .await
    .unwrap();
    second(RolloutCommand::Start { at: at(3) }).await.unwrap();
    second(send(&others[..3])).await.unwrap();
    second(RolloutCommand::ReturnToQueue {
        device_id: others[2].clone(),
        reason: "another firmware update (thermo@2.0.0) is under way".into(),
        at: at(4),
    })
    .await
    .unwrap();
    second(RolloutCommand::RecordDeviceOutcome {
        device_id: others[3].clone(),
        outcome: DeviceOutcome::Canceled {
            reason: "device decommissioned".into(),
        },
        reported_at: None,
        at: at(5),
    })
    .await
    .unwrap();
    second(RolloutCommand::Abort {
        reason: "bad batch".into(),
        at: at(10),
    })
    .await
    .unwrap();
    second(RolloutCommand::RecordDeviceOutcome {
        device_id: others[0].clone(),
        outcome: DeviceOutcome::Succeeded,
        reported_at: Some(at(9)),
        at: at(11),
    })
    .await
    .unwrap();

    let user_id = UserId::for_username(&tenant, "alice");
    let user = |command| bus.users().execute(user_id.as_str(), command, &metadata);
    user(UserCommand::Register {
        tenant: tenant.clone(),
        username: "alice".into(),
        password_hash: "$argon2id$secret-hash".into(),
        roles: vec![Role::Viewer],
        at: at(0),
    })
    .await
    .unwrap();
    user(UserCommand::GrantRole {
        role: Role::Operator,
        at: at(1),
    })
    .await
    .unwrap();
    user(UserCommand::OpenSession {
        session_id: SessionId::parse("s1").unwrap(),
        refresh_token_hash: "cd".repeat(32),
        expires_at: at(86_400),
        at: at(2),
    })
    .await
    .unwrap();

    let shutdown = CancellationToken::new();
    let js = jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap());
    let relay_settings = RelaySettings {
        poll_interval: Duration::from_millis(100),
        ..RelaySettings::default()
    };
    let mut platform = fleetlog::Platform::new(
        db.pool.clone(),
        js.client(),
        StoreSettings::default(),
        shutdown.clone(),
    );
    platform
        .relay(relay_settings)
        .projections(WorkerSettings::default());
    wait_until_projected(&db.pool, "firmware", "firmware").await;
    wait_until_projected(&db.pool, "rollouts", "rollout").await;
    wait_until_projected(&db.pool, "users", "user").await;

    let (status, model, compatible): (String, String, Vec<String>) = sqlx::query_as(
        "SELECT status, model, compatible_models FROM firmware WHERE firmware_id = 'thermo@2.1.0'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), model.as_str()), ("released", "thermo"));
    assert_eq!(compatible, ["thermo", "thermo-v2"]);

    let (status, current_wave, sent, succeeded, failed, reason, decision): (
        String,
        i32,
        i32,
        i32,
        i32,
        String,
        serde_json::Value,
    ) = sqlx::query_as(
        "SELECT status, current_wave, sent, succeeded, failed, pause_reason, last_decision
           FROM rollouts WHERE rollout_id = 'r1'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), current_wave, sent, succeeded, failed),
        ("paused", 1, 3, 1, 1)
    );
    assert_eq!(reason, "weekend");
    assert_eq!(decision["decision"], "pause");
    assert_eq!(decision["automatic"], false);
    assert_eq!(decision["counts"]["wave"], 1);
    assert_eq!(decision["counts"]["sent"], 3);
    let per_device: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT device_id, wave, status FROM rollout_devices WHERE rollout_id = 'r1' ORDER BY device_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        per_device,
        [
            ("d0".into(), 0, "succeeded".into()),
            ("d1".into(), 0, "failed".into()),
            ("d2".into(), 1, "sent".into()),
            ("d3".into(), 1, "queued".into()),
        ]
    );

    let (status, sent, succeeded, canceled): (String, i32, i32, i32) = sqlx::query_as(
        "SELECT status, sent, succeeded, canceled FROM rollouts WHERE rollout_id = 'r2'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), sent, succeeded, canceled),
        ("aborted", 2, 1, 4)
    );
    let per_device: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT device_id, status, error FROM rollout_devices WHERE rollout_id = 'r2' ORDER BY device_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        per_device,
        [
            ("e0".into(), "succeeded".into(), None),
            ("e1".into(), "canceled".into(), None),
            ("e2".into(), "canceled".into(), None),
            (
                "e3".into(),
                "canceled".into(),
                Some("device decommissioned".into())
            ),
            ("e4".into(), "canceled".into(), None),
        ]
    );

    let (username, roles, last_login): (String, Vec<String>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT username, roles, last_login_at FROM users WHERE user_id = $1")
            .bind(user_id.as_str())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(username, "alice");
    assert_eq!(roles, ["operator", "viewer"]);
    assert_eq!(last_login, Some(at(2)));
    let row: serde_json::Value = sqlx::query_scalar("SELECT to_jsonb(u) FROM users u")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        !row.to_string().contains("argon2"),
        "no secret in the users model: {row}"
    );

    let patience = Duration::from_secs(20);
    assert!(verify(&FirmwareProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences
        .is_empty());
    assert!(verify(&RolloutsProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences
        .is_empty());
    assert!(verify(&UsersProjection, &db.pool, patience, |_| {})
        .await
        .unwrap()
        .differences
        .is_empty());

    shutdown.cancel();
    platform.run(Duration::from_secs(30)).await.unwrap();
}
