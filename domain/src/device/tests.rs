//! Given/when/then tests of the Device aggregate: every command, accepted and refused.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::test::TestFramework;
use serde_json::{json, Map, Value};

use super::*;
use crate::firmware::FirmwareId;

type Given = TestFramework<Device>;

fn at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .into()
}

fn later(seconds: i64) -> DateTime<Utc> {
    at() + Duration::seconds(seconds)
}

fn object(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

fn command_id(id: &str) -> CommandId {
    CommandId::parse(id).unwrap()
}

fn rollout() -> Option<RolloutId> {
    Some(RolloutId::parse("r1").unwrap())
}

fn firmware(version: &str) -> FirmwareId {
    FirmwareId::new("thermo", version).unwrap()
}

fn registered() -> DeviceEvent {
    DeviceEvent::DeviceRegistered {
        device_id: DeviceId::parse("dev-1").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: "Boiler room".into(),
        model: "thermo".into(),
        tags: vec!["basement".into(), "heating".into()],
        at: at(),
    }
}

fn decommissioned() -> DeviceEvent {
    DeviceEvent::DeviceDecommissioned {
        reason: "replaced".into(),
        at: at(),
    }
}

fn online() -> DeviceEvent {
    DeviceEvent::DeviceCameOnline { at: at() }
}

fn offline() -> DeviceEvent {
    DeviceEvent::DeviceWentOffline {
        reason: "no heartbeat for 300s".into(),
        at: later(300),
    }
}

fn reading(sensor: &str, value: f64) -> Reading {
    Reading {
        sensor: sensor.into(),
        value,
        unit: Some("celsius".into()),
        timestamp: None,
    }
}

fn telemetry(digest: &str, readings: Vec<Reading>) -> DeviceCommand {
    DeviceCommand::RecordTelemetry {
        digest: digest.into(),
        redelivery: true,
        readings,
        device_time: None,
        received_at: later(10),
        location: None,
        status: Map::new(),
    }
}

fn recorded(digest: &str, readings: Vec<Reading>) -> DeviceEvent {
    DeviceEvent::TelemetryRecorded {
        digest: digest.into(),
        readings,
        device_time: None,
        received_at: later(10),
        location: None,
        status: Map::new(),
    }
}

fn issued(id: &str) -> DeviceEvent {
    DeviceEvent::CommandIssued {
        command_id: command_id(id),
        name: "reboot".into(),
        params: json!({"delay": 5}),
        issued_at: at(),
        expires_at: later(60),
    }
}

fn image() -> FirmwareImage {
    FirmwareImage {
        sha256: "ab".repeat(32),
        size_bytes: 1024,
        signature: None,
    }
}

fn update_requested() -> DeviceEvent {
    DeviceEvent::FirmwareUpdateRequested {
        rollout_id: rollout(),
        firmware_id: firmware("2.0.0"),
        version: "2.0.0".into(),
        image: Some(image()),
        at: at(),
    }
}

#[test]
fn register_creates_a_device_with_clean_tags() {
    Given::with(())
        .given_no_previous_events()
        .when(DeviceCommand::Register {
            device_id: DeviceId::parse("dev-1").unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            owner: UserId::parse("u-1").unwrap(),
            name: "  Boiler room ".into(),
            model: "thermo".into(),
            tags: vec!["heating".into(), "basement".into(), "heating".into()],
            at: at(),
            credentials: None,
        })
        .then_expect_events(vec![registered()]);
}

#[test]
fn register_refuses_twice_and_bad_fields() {
    let register = |name: &str, model: &str, tags: Vec<String>| DeviceCommand::Register {
        device_id: DeviceId::parse("dev-1").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u-1").unwrap(),
        name: name.into(),
        model: model.into(),
        tags,
        at: at(),
        credentials: None,
    };
    Given::with(())
        .given(vec![registered()])
        .when(register("x", "thermo", vec![]))
        .then_expect_error(DeviceError::AlreadyRegistered);
    Given::with(())
        .given_no_previous_events()
        .when(register(" ", "thermo", vec![]))
        .then_expect_error(DeviceError::InvalidName);
    Given::with(())
        .given_no_previous_events()
        .when(register("x", "thermo 2", vec![]))
        .then_expect_error(DeviceError::InvalidId(crate::IdError::InvalidCharacter {
            kind: "model",
            found: ' ',
        }));
    Given::with(())
        .given_no_previous_events()
        .when(register("x", "thermo", vec!["".into()]))
        .then_expect_error(DeviceError::InvalidTag("".into()));
    Given::with(())
        .given_no_previous_events()
        .when(register(
            "x",
            "thermo",
            (0..=MAX_TAGS).map(|i| format!("t{i}")).collect(),
        ))
        .then_expect_error(DeviceError::TooManyTags);
}

#[test]
fn commands_need_a_registered_active_device() {
    Given::with(())
        .given_no_previous_events()
        .when(telemetry("m1", vec![reading("temperature", 21.0)]))
        .then_expect_error(DeviceError::NotRegistered);
    let every_change = vec![
        telemetry("m1", vec![reading("temperature", 21.0)]),
        DeviceCommand::Heartbeat {
            firmware_version: None,
            delivery: None,
            device_time: None,
            received_at: at(),
        },
        DeviceCommand::UpdateMetadata {
            name: Some("x".into()),
            model: None,
            tags: None,
            at: at(),
        },
        DeviceCommand::Decommission {
            reason: "again".into(),
            at: at(),
        },
        DeviceCommand::SetDesired {
            properties: object(json!({"interval": 5})),
            at: at(),
        },
        DeviceCommand::RotateCredentials {
            secret_hash: "a".repeat(64),
            salt: None,
            reason: "again".into(),
            at: at(),
        },
        DeviceCommand::RevokeCredentials {
            reason: "lost".into(),
            at: at(),
        },
    ];
    for command in every_change {
        Given::with(())
            .given(vec![registered(), decommissioned()])
            .when(command)
            .then_expect_error(DeviceError::Decommissioned);
    }
}

#[test]
fn update_metadata_records_only_what_changes() {
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::UpdateMetadata {
            name: Some("Boiler room".into()),
            model: Some("thermo-v2".into()),
            tags: None,
            at: at(),
        })
        .then_expect_events(vec![DeviceEvent::DeviceMetadataUpdated {
            name: None,
            model: Some("thermo-v2".into()),
            tags: None,
            at: at(),
        }]);
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::UpdateMetadata {
            name: Some("Boiler room".into()),
            model: None,
            tags: None,
            at: at(),
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::UpdateMetadata {
            name: None,
            model: None,
            tags: None,
            at: at(),
        })
        .then_expect_error(DeviceError::NothingToUpdate);
}

#[test]
fn decommission_needs_a_reason() {
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::Decommission {
            reason: "replaced".into(),
            at: at(),
        })
        .then_expect_events(vec![decommissioned()]);
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::Decommission {
            reason: "".into(),
            at: at(),
        })
        .then_expect_error(DeviceError::InvalidText("reason"));
}

/// A decommissioned device can never answer, and its commands can no longer expire: they
/// close with the reason when it is decommissioned.
#[test]
fn decommissioning_cancels_the_open_commands() {
    let canceled = |id: &str| DeviceEvent::CommandCanceled {
        command_id: command_id(id),
        reason: "device decommissioned: replaced".into(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), issued("c1"), issued("c2")])
        .when(DeviceCommand::Decommission {
            reason: "replaced".into(),
            at: at(),
        })
        .then_expect_events(vec![canceled("c1"), canceled("c2"), decommissioned()]);
}

#[test]
fn first_telemetry_brings_the_device_online() {
    Given::with(())
        .given(vec![registered()])
        .when(telemetry("m1", vec![reading("temperature", 21.5)]))
        .then_expect_events(vec![
            DeviceEvent::DeviceCameOnline { at: later(10) },
            recorded("m1", vec![reading("temperature", 21.5)]),
        ]);
}

#[test]
fn telemetry_while_online_is_just_recorded() {
    Given::with(())
        .given(vec![registered(), online()])
        .when(telemetry("m1", vec![reading("temperature", 21.5)]))
        .then_expect_events(vec![recorded("m1", vec![reading("temperature", 21.5)])]);
}

#[test]
fn telemetry_after_an_offline_period_comes_back_online() {
    Given::with(())
        .given(vec![registered(), online(), offline()])
        .when(telemetry("m2", vec![reading("humidity", 60.0)]))
        .then_expect_events(vec![
            DeviceEvent::DeviceCameOnline { at: later(10) },
            recorded("m2", vec![reading("humidity", 60.0)]),
        ]);
}

#[test]
fn redelivered_telemetry_is_ignored() {
    Given::with(())
        .given(vec![
            registered(),
            online(),
            recorded("m1", vec![reading("temperature", 21.5)]),
        ])
        .when(telemetry("m1", vec![reading("temperature", 21.5)]))
        .then_expect_events(vec![]);
}

#[test]
fn a_first_delivery_with_a_known_digest_is_recorded_again() {
    // A device without timestamps may send the same reading twice on purpose; only a message
    // the transport marks as possibly redelivered is checked against the recent digests.
    let first_delivery = match telemetry("m1", vec![reading("temperature", 21.5)]) {
        DeviceCommand::RecordTelemetry {
            digest,
            readings,
            device_time,
            received_at,
            location,
            status,
            ..
        } => DeviceCommand::RecordTelemetry {
            digest,
            redelivery: false,
            readings,
            device_time,
            received_at,
            location,
            status,
        },
        _ => unreachable!(),
    };
    Given::with(())
        .given(vec![
            registered(),
            online(),
            recorded("m1", vec![reading("temperature", 21.5)]),
        ])
        .when(first_delivery)
        .then_expect_events(vec![recorded("m1", vec![reading("temperature", 21.5)])]);
}

#[test]
fn telemetry_is_validated() {
    let cases = vec![
        (
            telemetry("m1", vec![reading("Temp", 1.0)]),
            DeviceError::InvalidTelemetry(TelemetryError::InvalidSensorName("Temp".into())),
        ),
        (
            telemetry("m1", vec![reading("t", f64::NAN)]),
            DeviceError::InvalidTelemetry(TelemetryError::NonFiniteValue("t".into())),
        ),
        (
            telemetry("m1", vec![]),
            DeviceError::InvalidTelemetry(TelemetryError::Empty),
        ),
        (
            telemetry("", vec![reading("t", 1.0)]),
            DeviceError::InvalidTelemetry(TelemetryError::InvalidDigest),
        ),
        (
            DeviceCommand::RecordTelemetry {
                digest: "m1".into(),
                redelivery: true,
                readings: vec![],
                device_time: None,
                received_at: at(),
                location: Some(Location {
                    latitude: 91.0,
                    longitude: 0.0,
                }),
                status: Map::new(),
            },
            DeviceError::InvalidTelemetry(TelemetryError::InvalidLocation {
                latitude: 91.0,
                longitude: 0.0,
            }),
        ),
    ];
    for (command, error) in cases {
        Given::with(())
            .given(vec![registered(), online()])
            .when(command)
            .then_expect_error(error);
    }
}

#[test]
fn telemetry_status_merges_into_reported_properties() {
    let mut device = Device::default();
    device.evolve(registered());
    device.evolve(DeviceEvent::TelemetryRecorded {
        digest: "m1".into(),
        readings: vec![],
        device_time: None,
        received_at: at(),
        location: None,
        status: object(json!({"battery": 90, "mode": "eco"})),
    });
    device.evolve(DeviceEvent::StatusReported {
        digest: None,
        status: object(json!({"battery": 80, "mode": null})),
        received_at: later(1),
    });
    assert_eq!(Value::Object(device.reported), json!({"battery": 80}));
    assert_eq!(device.last_seen, Some(later(1)));
}

#[test]
fn status_reports_are_recorded_and_validated() {
    Given::with(())
        .given(vec![registered(), online()])
        .when(DeviceCommand::ReportStatus {
            delivery: None,
            status: object(json!({"status": "online", "battery": 95})),
            received_at: at(),
        })
        .then_expect_events(vec![DeviceEvent::StatusReported {
            digest: None,
            status: object(json!({"status": "online", "battery": 95})),
            received_at: at(),
        }]);
    Given::with(())
        .given(vec![registered(), online()])
        .when(DeviceCommand::ReportStatus {
            delivery: None,
            status: Map::new(),
            received_at: at(),
        })
        .then_expect_error(DeviceError::InvalidPropertyCount);
    Given::with(())
        .given(vec![registered(), online()])
        .when(DeviceCommand::ReportStatus {
            delivery: None,
            status: object(json!({"bad key": 1})),
            received_at: at(),
        })
        .then_expect_error(DeviceError::InvalidPropertyName("bad key".into()));
}

/// Reported and desired documents are capped as a whole, not only per change: four status
/// messages of 128 keys each, or a few large values, cannot grow a device without bound.
#[test]
fn whole_documents_are_capped() {
    let keys = |from: usize| -> Map<String, Value> {
        (from..from + MAX_PROPERTY_KEYS)
            .map(|n| (format!("k{n}"), json!(n)))
            .collect()
    };
    let reported = |status: Map<String, Value>| DeviceEvent::StatusReported {
        digest: None,
        status,
        received_at: at(),
    };
    // Two full changes reach the key cap exactly; a third key more is refused.
    let report = DeviceCommand::ReportStatus {
        delivery: None,
        status: object(json!({"one_more": 1})),
        received_at: at(),
    };
    Given::with(())
        .given(vec![
            registered(),
            online(),
            reported(keys(0)),
            reported(keys(MAX_PROPERTY_KEYS)),
        ])
        .when(report.clone())
        .then_expect_error(DeviceError::DocumentTooLarge {
            what: "the reported properties",
            bytes: 2_610,
            keys: MAX_DOCUMENT_KEYS + 1,
        });
    // Replacing a key keeps the count.
    Given::with(())
        .given(vec![
            registered(),
            online(),
            reported(keys(0)),
            reported(keys(MAX_PROPERTY_KEYS)),
        ])
        .when(DeviceCommand::ReportStatus {
            delivery: None,
            status: object(json!({"k0": "again"})),
            received_at: at(),
        })
        .then_expect_events(vec![reported(object(json!({"k0": "again"})))]);
    // Bytes: one 40 KiB value is fine, a second one passes the cap; telemetry's status too.
    let big = || json!("x".repeat(40 * 1024));
    let refused = Given::with(())
        .given(vec![
            registered(),
            online(),
            reported(object(json!({"a": big()}))),
        ])
        .when(DeviceCommand::RecordTelemetry {
            digest: "m1".into(),
            redelivery: false,
            readings: vec![],
            device_time: None,
            received_at: at(),
            location: None,
            status: object(json!({"b": big()})),
        });
    refused.then_expect_error_message(
        "the reported properties would be 81935 bytes with 2 keys; at most 65536 bytes and 256 keys are kept",
    );
    Given::with(())
        .given(vec![
            registered(),
            DeviceEvent::DesiredPropertiesSet {
                properties: object(json!({"a": big()})),
                version: 1,
                at: at(),
            },
        ])
        .when(DeviceCommand::SetDesired {
            properties: object(json!({"b": big()})),
            at: at(),
        })
        .then_expect_error_message(
            "the desired properties would be 81935 bytes with 2 keys; at most 65536 bytes and 256 keys are kept",
        );
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::IssueCommand {
            command_id: command_id("c1"),
            name: "configure".into(),
            params: json!({"blob": "x".repeat(MAX_DOCUMENT_BYTES)}),
            issued_at: at(),
            expires_at: later(60),
        })
        .then_expect_error_message(&format!(
            "the command parameters would be {} bytes with 1 keys; at most 65536 bytes and 256 keys are kept",
            MAX_DOCUMENT_BYTES + 11
        ));
}

#[test]
fn heartbeats_keep_the_device_alive() {
    Given::with(())
        .given(vec![registered(), online(), offline()])
        .when(DeviceCommand::Heartbeat {
            firmware_version: None,
            delivery: None,
            device_time: None,
            received_at: later(400),
        })
        .then_expect_events(vec![
            DeviceEvent::DeviceCameOnline { at: later(400) },
            DeviceEvent::HeartbeatReceived {
                digest: None,
                device_time: None,
                received_at: later(400),
            },
        ]);
    Given::with(())
        .given_no_previous_events()
        .when(DeviceCommand::Heartbeat {
            firmware_version: None,
            delivery: None,
            device_time: None,
            received_at: at(),
        })
        .then_expect_error(DeviceError::NotRegistered);
}

#[test]
fn mark_offline_happens_once_per_silence() {
    Given::with(())
        .given(vec![registered(), online()])
        .when(DeviceCommand::MarkOffline {
            reason: "no heartbeat for 300s".into(),
            silent_since: None,
            at: later(300),
        })
        .then_expect_events(vec![offline()]);
    Given::with(())
        .given(vec![registered(), online(), offline()])
        .when(DeviceCommand::MarkOffline {
            reason: "no heartbeat for 300s".into(),
            silent_since: None,
            at: later(600),
        })
        .then_expect_error(DeviceError::AlreadyOffline);
}

#[test]
fn mark_offline_is_refused_when_the_silence_already_ended() {
    let heartbeat = |second| DeviceEvent::HeartbeatReceived {
        digest: None,
        device_time: None,
        received_at: later(second),
    };
    let mark = |silent_since| DeviceCommand::MarkOffline {
        reason: "no heartbeat for 300s".into(),
        silent_since: Some(silent_since),
        at: later(300),
    };
    Given::with(())
        .given(vec![registered(), online(), heartbeat(0), heartbeat(200)])
        .when(mark(at()))
        .then_expect_error(DeviceError::HeardFromSince(later(200)));
    Given::with(())
        .given(vec![registered(), online(), heartbeat(0)])
        .when(mark(at()))
        .then_expect_events(vec![offline()]);
}

#[test]
fn desired_properties_version_and_delta() {
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::SetDesired {
            properties: object(json!({"interval": 30})),
            at: at(),
        })
        .then_expect_events(vec![DeviceEvent::DesiredPropertiesSet {
            properties: object(json!({"interval": 30})),
            version: 1,
            at: at(),
        }]);
    let set = DeviceEvent::DesiredPropertiesSet {
        properties: object(json!({"interval": 30, "mode": "eco"})),
        version: 1,
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), set.clone()])
        .when(DeviceCommand::SetDesired {
            properties: object(json!({"interval": 30})),
            at: at(),
        })
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::SetDesired {
            properties: object(json!({"9lives": 1})),
            at: at(),
        })
        .then_expect_error(DeviceError::InvalidPropertyName("9lives".into()));

    let mut device = Device::default();
    device.evolve(registered());
    device.evolve(set);
    device.evolve(DeviceEvent::StatusReported {
        digest: None,
        status: object(json!({"interval": 30, "mode": "turbo", "battery": 50})),
        received_at: at(),
    });
    assert_eq!(Value::Object(device.delta()), json!({"mode": "eco"}));
}

#[test]
fn commands_are_issued_with_unique_ids_and_an_expiry() {
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::IssueCommand {
            command_id: command_id("c1"),
            name: "reboot".into(),
            params: json!({"delay": 5}),
            issued_at: at(),
            expires_at: later(60),
        })
        .then_expect_events(vec![issued("c1")]);
    let issue = |id: &str, name: &str, params: Value, expires_at| DeviceCommand::IssueCommand {
        command_id: command_id(id),
        name: name.into(),
        params,
        issued_at: at(),
        expires_at,
    };
    Given::with(())
        .given(vec![registered(), issued("c1")])
        .when(issue("c1", "reboot", json!({}), later(60)))
        .then_expect_error(DeviceError::DuplicateCommand(command_id("c1")));
    Given::with(())
        .given(vec![registered()])
        .when(issue("c1", "Reboot!", json!({}), later(60)))
        .then_expect_error(DeviceError::InvalidCommandName("Reboot!".into()));
    Given::with(())
        .given(vec![registered()])
        .when(issue("c1", "reboot", json!([1]), later(60)))
        .then_expect_error(DeviceError::InvalidCommandParams);
    Given::with(())
        .given(vec![registered()])
        .when(issue("c1", "reboot", json!({}), at()))
        .then_expect_error(DeviceError::ExpiryNotAfterIssue);
}

#[test]
fn command_replies_settle_a_command_once() {
    let reply = |id: &str| DeviceCommand::RecordCommandReply {
        command_id: command_id(id),
        outcome: CommandOutcome::Succeeded,
        result: json!({"uptime": 3}),
        received_at: later(5),
    };
    let replied = DeviceEvent::CommandReplied {
        command_id: command_id("c1"),
        outcome: CommandOutcome::Succeeded,
        result: json!({"uptime": 3}),
        received_at: later(5),
    };
    Given::with(())
        .given(vec![registered(), issued("c1")])
        .when(reply("c1"))
        .then_expect_events(vec![replied.clone()]);
    Given::with(())
        .given(vec![registered(), issued("c1"), replied])
        .when(reply("c1"))
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered()])
        .when(reply("c9"))
        .then_expect_error(DeviceError::UnknownCommand(command_id("c9")));
}

#[test]
fn commands_expire_only_after_their_deadline() {
    let expire = |at| DeviceCommand::ExpireCommand {
        command_id: command_id("c1"),
        at,
    };
    Given::with(())
        .given(vec![registered(), issued("c1")])
        .when(expire(later(60)))
        .then_expect_events(vec![DeviceEvent::CommandExpired {
            command_id: command_id("c1"),
            at: later(60),
        }]);
    Given::with(())
        .given(vec![registered(), issued("c1")])
        .when(expire(later(59)))
        .then_expect_error(DeviceError::CommandNotExpired(command_id("c1")));
    Given::with(())
        .given(vec![registered()])
        .when(expire(later(60)))
        .then_expect_error(DeviceError::UnknownCommand(command_id("c1")));
}

#[test]
fn firmware_update_is_requested_once() {
    let request = |version: &str| DeviceCommand::RequestFirmwareUpdate {
        rollout_id: rollout(),
        firmware_id: firmware(version),
        image: image(),
        compatible_models: vec![],
        at: at(),
    };
    Given::with(())
        .given(vec![registered()])
        .when(request("2.0.0"))
        .then_expect_events(vec![update_requested()]);
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(request("2.0.0"))
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(DeviceCommand::RequestFirmwareUpdate {
            rollout_id: Some(RolloutId::parse("r2").unwrap()),
            firmware_id: firmware("2.1.0"),
            image: image(),
            compatible_models: vec![],
            at: at(),
        })
        .then_expect_error(DeviceError::UpdateInProgress("thermo@2.0.0".into()));
    Given::with(())
        .given(vec![
            registered(),
            update_requested(),
            DeviceEvent::FirmwareUpdateSucceeded {
                rollout_id: rollout(),
                version: "2.0.0".into(),
                at: at(),
            },
        ])
        .when(DeviceCommand::RequestFirmwareUpdate {
            rollout_id: None,
            firmware_id: firmware("2.0.0"),
            image: image(),
            compatible_models: vec![],
            at: at(),
        })
        .then_expect_error(DeviceError::AlreadyRunsVersion("2.0.0".into()));
    // A rollout that sent its update once never sends it again; asking after the update ended
    // answers how it ended, so a rollout that missed the outcome learns it.
    let ended = |event: DeviceEvent| vec![registered(), update_requested(), event];
    let rollout_id = RolloutId::parse("r1").unwrap();
    let endings = [
        (
            DeviceEvent::FirmwareUpdateFailed {
                rollout_id: rollout(),
                error: "flash write".into(),
                at: at(),
            },
            UpdateEnding::Failed {
                error: "flash write".into(),
            },
        ),
        (
            DeviceEvent::FirmwareUpdateSucceeded {
                rollout_id: rollout(),
                version: "2.0.0".into(),
                at: at(),
            },
            UpdateEnding::Succeeded,
        ),
        (
            DeviceEvent::FirmwareUpdateAbandoned {
                rollout_id: rollout(),
                firmware_id: Some(firmware("2.0.0")),
                reason: "too slow".into(),
                at: at(),
            },
            UpdateEnding::Abandoned,
        ),
    ];
    for (event, ending) in endings {
        Given::with(())
            .given(ended(event))
            .when(request("2.0.0"))
            .then_expect_error(DeviceError::RolloutUpdateEnded {
                rollout_id: rollout_id.clone(),
                ending,
            });
    }
}

#[test]
fn reporting_the_new_version_is_what_makes_an_update_succeed() {
    let status = |version: &str| {
        let mut status = serde_json::Map::new();
        status.insert("firmware_version".into(), json!(version));
        status
    };
    let report = |version: &str| DeviceCommand::ReportStatus {
        status: status(version),
        received_at: at(),
        delivery: None,
    };
    let reported = |version: &str| DeviceEvent::StatusReported {
        status: status(version),
        received_at: at(),
        digest: None,
    };
    let online = DeviceEvent::DeviceCameOnline { at: at() };
    Given::with(())
        .given(vec![registered(), online.clone(), update_requested()])
        .when(report("2.0.0"))
        .then_expect_events(vec![
            reported("2.0.0"),
            DeviceEvent::FirmwareUpdateSucceeded {
                rollout_id: rollout(),
                version: "2.0.0".into(),
                at: at(),
            },
        ]);
    // Still the old version: the update goes on.
    Given::with(())
        .given(vec![
            registered(),
            online.clone(),
            DeviceEvent::FirmwareVersionReported {
                version: "1.0.0".into(),
                at: at(),
            },
            update_requested(),
        ])
        .when(report("1.0.0"))
        .then_expect_events(vec![reported("1.0.0")]);
    // Outside an update, a new version is recorded as such.
    Given::with(())
        .given(vec![registered(), online.clone()])
        .when(DeviceCommand::Heartbeat {
            device_time: None,
            firmware_version: Some("1.2.0".into()),
            received_at: at(),
            delivery: None,
        })
        .then_expect_events(vec![
            DeviceEvent::HeartbeatReceived {
                device_time: None,
                received_at: at(),
                digest: None,
            },
            DeviceEvent::FirmwareVersionReported {
                version: "1.2.0".into(),
                at: at(),
            },
        ]);
}

#[test]
fn an_update_given_up_frees_the_device() {
    let abandon = |rollout_id| DeviceCommand::AbandonFirmwareUpdate {
        rollout_id,
        reason: "no answer within 600 s".into(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(abandon(rollout()))
        .then_expect_events(vec![DeviceEvent::FirmwareUpdateAbandoned {
            rollout_id: rollout(),
            firmware_id: Some(firmware("2.0.0")),
            reason: "no answer within 600 s".into(),
            at: at(),
        }]);
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(abandon(None))
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered()])
        .when(abandon(rollout()))
        .then_expect_events(vec![]);
}

#[test]
fn firmware_progress_needs_the_matching_update() {
    let progress = |rollout_id, progress| DeviceCommand::RecordFirmwareProgress {
        rollout_id,
        state: "downloading".into(),
        progress,
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(progress(rollout(), 40))
        .then_expect_events(vec![DeviceEvent::FirmwareUpdateProgressed {
            rollout_id: rollout(),
            state: "downloading".into(),
            progress: 40,
            at: at(),
        }]);
    Given::with(())
        .given(vec![registered()])
        .when(progress(rollout(), 40))
        .then_expect_error(DeviceError::NoUpdateInProgress);
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(progress(None, 40))
        .then_expect_error(DeviceError::RolloutMismatch {
            reported: None,
            pending: rollout(),
        });
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(progress(rollout(), 101))
        .then_expect_error(DeviceError::InvalidProgress(101));
}

#[test]
fn firmware_success_sets_the_running_version() {
    let succeed = |version: &str| DeviceCommand::RecordFirmwareSucceeded {
        rollout_id: rollout(),
        version: version.into(),
        at: at(),
    };
    let succeeded = DeviceEvent::FirmwareUpdateSucceeded {
        rollout_id: rollout(),
        version: "2.0.0".into(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(succeed("2.0.0"))
        .then_expect_events(vec![succeeded.clone()]);
    Given::with(())
        .given(vec![registered(), update_requested(), succeeded])
        .when(succeed("2.0.0"))
        .then_expect_events(vec![]);
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(succeed("1.9.0"))
        .then_expect_error(DeviceError::VersionMismatch {
            reported: "1.9.0".into(),
            expected: "2.0.0".into(),
        });
}

#[test]
fn firmware_failure_ends_the_update() {
    let fail = DeviceCommand::RecordFirmwareFailed {
        rollout_id: rollout(),
        error: "checksum mismatch".into(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(fail.clone())
        .then_expect_events(vec![DeviceEvent::FirmwareUpdateFailed {
            rollout_id: rollout(),
            error: "checksum mismatch".into(),
            at: at(),
        }]);
    Given::with(())
        .given(vec![registered()])
        .when(fail)
        .then_expect_error(DeviceError::NoUpdateInProgress);
}

#[test]
fn credentials_rotate_as_hashes_only() {
    Given::with(())
        .given(vec![registered()])
        .when(DeviceCommand::RotateCredentials {
            secret_hash: "AB".repeat(32),
            salt: Some("CD".repeat(16)),
            reason: "registered".into(),
            at: at(),
        })
        .then_expect_events(vec![DeviceEvent::DeviceCredentialsRotated {
            secret_hash: "ab".repeat(32),
            credential_version: 1,
            salt: Some("cd".repeat(16)),
            reason: Some("registered".into()),
            at: at(),
        }]);
    let rotate =
        |secret_hash: &str, salt: Option<&str>, reason: &str| DeviceCommand::RotateCredentials {
            secret_hash: secret_hash.into(),
            salt: salt.map(str::to_string),
            reason: reason.into(),
            at: at(),
        };
    let refused = [
        (
            rotate("plain-secret", None, "r"),
            DeviceError::InvalidCredentialHash,
        ),
        (
            rotate(&"a".repeat(63), None, "r"),
            DeviceError::InvalidCredentialHash,
        ),
        (
            rotate(&"a".repeat(64), Some("short"), "r"),
            DeviceError::InvalidCredentialSalt,
        ),
        (
            rotate(&"a".repeat(64), Some(&"g".repeat(32)), "r"),
            DeviceError::InvalidCredentialSalt,
        ),
        (
            rotate(&"a".repeat(64), None, ""),
            DeviceError::InvalidText("reason"),
        ),
    ];
    for (command, error) in refused {
        Given::with(())
            .given(vec![registered()])
            .when(command)
            .then_expect_error(error);
    }
}

#[test]
fn revoked_credentials_leave_no_secret_and_cannot_be_revoked_twice() {
    let rotated = DeviceEvent::DeviceCredentialsRotated {
        secret_hash: "ab".repeat(32),
        credential_version: 1,
        salt: Some("cd".repeat(16)),
        reason: Some("registered".into()),
        at: at(),
    };
    let revoked = DeviceEvent::DeviceCredentialsRevoked {
        reason: "stolen".into(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered(), rotated.clone()])
        .when(DeviceCommand::RevokeCredentials {
            reason: "stolen".into(),
            at: at(),
        })
        .then_expect_events(vec![revoked.clone()]);
    Given::with(())
        .given(vec![registered(), rotated.clone(), revoked.clone()])
        .when(DeviceCommand::RevokeCredentials {
            reason: "again".into(),
            at: at(),
        })
        .then_expect_error(DeviceError::NoCredentials);
    let mut device = Device::default();
    for event in [registered(), rotated, revoked] {
        device.evolve(event);
    }
    assert_eq!(device.credential_hash, None);
    assert_eq!(device.credential_salt, None);
    assert_eq!(device.credential_version, 1);
}

#[test]
fn events_keep_their_names_and_round_trip_through_json() {
    use cqrs_es::DomainEvent;
    let event = recorded("m1", vec![reading("temperature", 21.5)]);
    assert_eq!(event.event_type(), "TelemetryRecorded");
    assert_eq!(event.event_version(), "1.0");
    let json = serde_json::to_value(&event).unwrap();
    assert_eq!(
        json,
        json!({"TelemetryRecorded": {
            "digest": "m1",
            "readings": [{"sensor": "temperature", "value": 21.5, "unit": "celsius"}],
            "received_at": "2026-01-01T00:00:10Z"
        }})
    );
    assert_eq!(serde_json::from_value::<DeviceEvent>(json).unwrap(), event);
}

#[test]
fn redelivered_heartbeats_and_status_reports_are_recognised_by_digest() {
    use crate::device::Delivery;
    let delivery = |redelivery| {
        Some(Delivery {
            digest: "h1".into(),
            redelivery,
        })
    };
    let heartbeat = |redelivery| DeviceCommand::Heartbeat {
        firmware_version: None,
        device_time: None,
        received_at: later(10),
        delivery: delivery(redelivery),
    };
    let received = DeviceEvent::HeartbeatReceived {
        device_time: None,
        received_at: later(10),
        digest: Some("h1".into()),
    };
    Given::with(())
        .given(vec![registered(), online(), received.clone()])
        .when(heartbeat(true))
        .then_expect_events(vec![]);
    // A first delivery that happens to repeat a digest is recorded.
    Given::with(())
        .given(vec![registered(), online(), received.clone()])
        .when(heartbeat(false))
        .then_expect_events(vec![received]);
    let mut status = Map::new();
    status.insert("mode".into(), json!("eco"));
    Given::with(())
        .given(vec![
            registered(),
            online(),
            DeviceEvent::StatusReported {
                status: status.clone(),
                received_at: later(10),
                digest: Some("h1".into()),
            },
        ])
        .when(DeviceCommand::ReportStatus {
            status,
            received_at: later(11),
            delivery: delivery(true),
        })
        .then_expect_events(vec![]);
}

#[test]
fn only_what_devices_report_at_their_own_rate_is_data_plane() {
    use crate::Plane;
    use cqrs_es::DomainEvent;
    let plane = |event: &DeviceEvent| Plane::of("device", &event.event_type());
    let data = [
        recorded("d1", vec![]),
        DeviceEvent::StatusReported {
            status: Map::new(),
            received_at: at(),
            digest: None,
        },
        DeviceEvent::HeartbeatReceived {
            device_time: None,
            received_at: at(),
            digest: None,
        },
    ];
    for event in &data {
        assert_eq!(plane(event), Plane::Data, "{}", event.event_type());
    }
    for event in [registered(), online(), issued("c1")] {
        assert_eq!(plane(&event), Plane::Control, "{}", event.event_type());
    }
    // The names are a device's: another aggregate's event of the same name is control.
    assert_eq!(Plane::of("rollout", "TelemetryRecorded"), Plane::Control);
}

#[test]
fn an_update_is_refused_to_a_model_the_image_does_not_support() {
    let request = |models: Vec<&str>| DeviceCommand::RequestFirmwareUpdate {
        rollout_id: rollout(),
        firmware_id: firmware("2.0.0"),
        image: image(),
        compatible_models: models.into_iter().map(String::from).collect(),
        at: at(),
    };
    Given::with(())
        .given(vec![registered()])
        .when(request(vec!["thermo-v2"]))
        .then_expect_error(DeviceError::IncompatibleModel {
            model: "thermo".into(),
            firmware_id: "thermo@2.0.0".into(),
        });
    Given::with(())
        .given(vec![registered()])
        .when(request(vec!["thermo-v2", "thermo"]))
        .then_expect_events(vec![update_requested()]);
}

fn with_own_state(mut events: Vec<DeviceEvent>) -> Vec<DeviceEvent> {
    events.push(DeviceEvent::FirmwareUpdateProgressed {
        rollout_id: rollout(),
        state: "flashing-bank-b".into(),
        progress: 70,
        at: at(),
    });
    events
}

#[test]
fn firmware_progress_only_moves_forward() {
    let progress = |state: &str, progress| DeviceCommand::RecordFirmwareProgress {
        rollout_id: rollout(),
        state: state.into(),
        progress,
        at: at(),
    };
    let progressed = |state: &str, progress| DeviceEvent::FirmwareUpdateProgressed {
        rollout_id: rollout(),
        state: state.into(),
        progress,
        at: at(),
    };
    let installing = vec![
        registered(),
        update_requested(),
        progressed("downloading", 100),
        progressed("installing", 10),
    ];
    Given::with(())
        .given(installing.clone())
        .when(progress("downloading", 100))
        .then_expect_error(DeviceError::ProgressBackwards {
            from: "installing".into(),
            to: "downloading".into(),
        });
    // A device's own state in between does not reset the order.
    Given::with(())
        .given(with_own_state(installing.clone()))
        .when(progress("downloading", 100))
        .then_expect_error(DeviceError::ProgressBackwards {
            from: "installing".into(),
            to: "downloading".into(),
        });
    // The same state again (a restarted download's percent, too) and later states are taken;
    // so are a device's own states, which have no place in the order.
    for (state, percent) in [("installing", 5), ("rebooting", 0), ("flashing-bank-b", 50)] {
        Given::with(())
            .given(installing.clone())
            .when(progress(state, percent))
            .then_expect_events(vec![progressed(state, percent)]);
    }
}

#[test]
fn decommissioning_gives_up_an_update_under_way() {
    Given::with(())
        .given(vec![registered(), update_requested()])
        .when(DeviceCommand::Decommission {
            reason: "scrapped".into(),
            at: at(),
        })
        .then_expect_events(vec![
            DeviceEvent::FirmwareUpdateAbandoned {
                rollout_id: rollout(),
                firmware_id: Some(firmware("2.0.0")),
                reason: "device decommissioned: scrapped".into(),
                at: at(),
            },
            DeviceEvent::DeviceDecommissioned {
                reason: "scrapped".into(),
                at: at(),
            },
        ]);
}

#[test]
fn desired_and_reported_merge_at_any_depth() {
    let set = |properties: serde_json::Value| DeviceCommand::SetDesired {
        properties: properties.as_object().unwrap().clone(),
        at: at(),
    };
    let mut device = Device::default();
    device.evolve(registered());
    for properties in [
        json!({"cfg": {"a": 1, "b": 2}}),
        json!({"cfg": {"a": null}}),
    ] {
        for event in device.decide(set(properties)).unwrap() {
            device.evolve(event);
        }
    }
    assert_eq!(
        serde_json::Value::Object(device.desired.clone()),
        json!({"cfg": {"b": 2}})
    );
    // The delta asks for the leaves that differ, and 2.0 is 2.
    device.reported = json!({"cfg": {"b": 2.0, "c": 3}})
        .as_object()
        .unwrap()
        .clone();
    assert!(device.delta().is_empty(), "{:?}", device.delta());
    device.reported = json!({"cfg": {"b": 3}}).as_object().unwrap().clone();
    assert_eq!(
        serde_json::Value::Object(device.delta()),
        json!({"cfg": {"b": 2}})
    );
}

#[test]
fn documents_are_capped_in_keys_at_every_depth_and_in_nesting() {
    let set = |properties: serde_json::Value| DeviceCommand::SetDesired {
        properties: properties.as_object().unwrap().clone(),
        at: at(),
    };
    let nested = |levels: usize| {
        let mut value = json!(1);
        for _ in 0..levels {
            value = json!({ "n": value });
        }
        value
    };
    let mut device = Device::default();
    device.evolve(registered());
    assert!(device.decide(set(json!({ "cfg": nested(8) }))).is_ok());
    assert_eq!(
        device.decide(set(json!({ "cfg": nested(9) }))).unwrap_err(),
        DeviceError::DocumentTooDeep {
            what: "the desired properties",
            depth: 9,
        }
    );
    // Keys nested in one top-level key count too.
    let many: serde_json::Map<String, serde_json::Value> =
        (0..300).map(|n| (format!("k{n}"), json!(n))).collect();
    assert!(matches!(
        device.decide(set(json!({ "cfg": many }))),
        Err(DeviceError::DocumentTooLarge { keys: 301, .. })
    ));
}

#[test]
fn a_device_registered_with_credentials_gets_both_in_one_decision() {
    let register = |secret_hash: &str| DeviceCommand::Register {
        device_id: DeviceId::parse("d1").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        owner: UserId::parse("u1").unwrap(),
        name: "Boiler room".into(),
        model: "thermo".into(),
        tags: vec![],
        at: at(),
        credentials: Some(NewCredentials {
            secret_hash: secret_hash.into(),
            salt: Some("ef".repeat(16)),
            reason: "issued at registration".into(),
        }),
    };
    let events = Device::default()
        .decide(register(&"ab".repeat(32)))
        .unwrap();
    assert!(matches!(events[0], DeviceEvent::DeviceRegistered { .. }));
    assert_eq!(
        events[1],
        DeviceEvent::DeviceCredentialsRotated {
            secret_hash: "ab".repeat(32),
            credential_version: 1,
            salt: Some("ef".repeat(16)),
            reason: Some("issued at registration".into()),
            at: at(),
        }
    );
    // Bad credentials refuse the registration as a whole.
    assert_eq!(
        Device::default().decide(register("not-a-hash")),
        Err(DeviceError::InvalidCredentialHash)
    );
}
