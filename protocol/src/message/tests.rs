use super::*;
use serde_json::json;

fn reading(sensor: &str, value: f64) -> Reading {
    Reading {
        sensor: sensor.into(),
        value,
        unit: None,
        timestamp: None,
    }
}

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn telemetry(payload: Value) -> Result<Telemetry, Rejection> {
    parse_telemetry(payload.to_string().as_bytes())
}

/// A parse that should succeed with these parts, or fail with this label or message.
type Expected<'a, T> = Result<T, &'a str>;

#[test]
fn topics_name_the_device_and_the_kind() {
    let cases: Vec<(&str, Expected<(&str, TopicKind)>)> = vec![
        ("devices/d-1/data", Ok(("d-1", TopicKind::Data))),
        ("devices/d-1/status", Ok(("d-1", TopicKind::Status))),
        ("devices/d-1/heartbeat", Ok(("d-1", TopicKind::Heartbeat))),
        (
            "devices/d-1/ota/progress",
            Ok(("d-1", TopicKind::OtaProgress)),
        ),
        (
            "devices/d-1/commands/c-9/reply",
            Ok((
                "d-1",
                TopicKind::CommandReply(CommandId::parse("c-9").unwrap()),
            )),
        ),
        ("devices/d-1/other", Err("unknown_topic")),
        ("devices/d-1/data/extra", Err("unknown_topic")),
        ("devices/d-1", Err("unknown_topic")),
        ("devicesX/d-1/data", Err("unknown_topic")),
        ("other/d-1/data", Err("unknown_topic")),
        ("devices/d.1/data", Err("invalid_device_id")),
        ("devices//data", Err("invalid_device_id")),
        ("devices/d-1/commands/c.9/reply", Err("invalid")),
    ];
    for (topic, expected) in cases {
        let parsed = parse_topic("devices", topic);
        match expected {
            Ok((device, kind)) => {
                assert_eq!(
                    parsed,
                    Ok((DeviceId::parse(device).unwrap(), kind)),
                    "{topic}"
                )
            }
            Err(label) => assert_eq!(parsed.map_err(|e| e.kind()), Err(label), "{topic}"),
        }
    }
    assert_eq!(
        parse_topic("fleet/eu", "fleet/eu/d-1/data"),
        Ok((DeviceId::parse("d-1").unwrap(), TopicKind::Data))
    );
}

#[test]
fn the_full_format_keeps_every_part() {
    let parsed = telemetry(json!({
        "sensors": [
            {"sensor_name": "temperature", "value": 21.5, "unit": "celsius",
             "timestamp": "2026-11-23T10:00:00Z"},
            {"sensor_name": "humidity", "value": 60}
        ],
        "status": {"battery": 95},
        "location": {"latitude": 48.1, "longitude": 11.6},
        "timestamp": "2026-11-23T10:00:01Z"
    }))
    .unwrap();
    assert_eq!(
        parsed,
        Telemetry {
            readings: vec![
                Reading {
                    sensor: "temperature".into(),
                    value: 21.5,
                    unit: Some("celsius".into()),
                    timestamp: Some(time("2026-11-23T10:00:00Z")),
                },
                reading("humidity", 60.0),
            ],
            location: Some(Location {
                latitude: 48.1,
                longitude: 11.6
            }),
            status: json!({"battery": 95}).as_object().unwrap().clone(),
            device_time: Some(time("2026-11-23T10:00:01Z")),
            dropped: vec![],
        }
    );
}

#[test]
fn the_simple_format_makes_every_number_a_reading() {
    let parsed =
        telemetry(json!({"temperature": 25.5, "humidity": 60, "timestamp": 1_790_000_000}))
            .unwrap();
    // serde_json keeps object members sorted by key.
    assert_eq!(
        parsed.readings,
        vec![reading("humidity", 60.0), reading("temperature", 25.5)]
    );
    assert_eq!(
        parsed.device_time,
        Some(Utc.timestamp_opt(1_790_000_000, 0).unwrap())
    );
    assert!(parsed.dropped.is_empty());
    // Milliseconds are recognised by their size.
    let millis = telemetry(json!({"t": 1, "timestamp": 1_790_000_000_123_i64})).unwrap();
    assert_eq!(
        millis.device_time,
        Some(Utc.timestamp_millis_opt(1_790_000_000_123).unwrap())
    );
}

#[test]
fn invalid_readings_are_dropped_and_valid_ones_kept() {
    let cases: Vec<(Value, Vec<&str>, Vec<&str>)> = vec![
        (
            json!({"temperature": 21.0, "Bad-Name": 1, "note": "hot", "flag": true, "n": null}),
            vec!["temperature"],
            vec!["Bad-Name", "flag", "n", "note"],
        ),
        (
            json!({"sensors": [
                {"sensor_name": "ok", "value": 1},
                {"sensor_name": "1bad", "value": 2},
                {"sensor_name": "text", "value": "2"},
                {"value": 3},
                {"sensor_name": "no_value"},
                {"sensor_name": "unit", "value": 4, "unit": ""},
                {"sensor_name": "when", "value": 5, "timestamp": "yesterday"},
                {"sensor_name": "extra", "value": 6, "colour": "red"},
                "not an object"
            ]}),
            vec!["ok"],
            vec![
                "sensors[1] (1bad)",
                "sensors[2]",
                "sensors[3]",
                "sensors[4]",
                "sensors[5] (unit)",
                "sensors[6]",
                "sensors[7]",
                "sensors[8]",
            ],
        ),
        (
            json!({"t": 1, "location": {"latitude": 91, "longitude": 0}}),
            vec!["t"],
            vec!["location"],
        ),
        (
            json!({"t": 1, "timestamp": "not a time"}),
            vec!["t"],
            vec!["timestamp"],
        ),
        (
            json!({"t": 1, "timestamp": -5}),
            vec!["t"],
            vec!["timestamp"],
        ),
        (
            json!({"sensors": [{"sensor_name": "t", "value": 1}], "extra": 1, "status": 3}),
            vec!["t"],
            vec!["extra", "status"],
        ),
    ];
    for (payload, kept, dropped) in cases {
        let parsed = telemetry(payload.clone()).unwrap_or_else(|e| panic!("{payload}: {e}"));
        let kept_names: Vec<&str> = parsed.readings.iter().map(|r| r.sensor.as_str()).collect();
        let dropped_fields: Vec<&str> = parsed.dropped.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(kept_names, kept, "{payload}");
        assert_eq!(dropped_fields, dropped, "{payload}");
        assert!(
            parsed.dropped.iter().all(|d| !d.reason.is_empty()),
            "{payload}"
        );
    }
}

#[test]
fn every_rejection_says_why() {
    let big = format!(
        "{{\"t\": 1, \"pad\": \"{}\"}}",
        "x".repeat(MAX_PAYLOAD_BYTES)
    );
    let too_many: Map<String, Value> = (0..=MAX_READINGS)
        .map(|i| (format!("s{i}"), json!(i)))
        .collect();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"".to_vec(), "not_json", "not valid JSON"),
        (b"{\"t\": 1".to_vec(), "not_json", "not valid JSON"),
        (vec![0xff, 0xfe], "not_json", "not valid JSON"),
        (
            b"[1, 2]".to_vec(),
            "invalid",
            "must be a JSON object, got an array",
        ),
        (b"42".to_vec(), "invalid", "got a number"),
        (b"{}".to_vec(), "nothing_valid", "no valid reading"),
        (
            b"{\"Temp\": 1}".to_vec(),
            "nothing_valid",
            "Temp: sensor name \"Temp\" must match",
        ),
        (
            b"{\"sensors\": {}}".to_vec(),
            "invalid",
            "sensors must be an array",
        ),
        (
            b"{\"sensors\": []}".to_vec(),
            "nothing_valid",
            "no valid reading",
        ),
        (big.into_bytes(), "too_large", "larger than"),
        (
            Value::Object(too_many).to_string().into_bytes(),
            "invalid",
            "at most 256",
        ),
    ];
    for (payload, kind, message) in cases {
        let error = parse_payload(&TopicKind::Data, &payload).unwrap_err();
        assert_eq!(error.kind(), kind, "{}", String::from_utf8_lossy(&payload));
        assert!(
            error.to_string().contains(message),
            "{error} should contain {message}"
        );
    }
}

#[test]
fn a_second_reading_of_a_sensor_at_one_instant_is_dropped_with_its_reason() {
    let parsed = telemetry(json!({
        "timestamp": "2026-01-01T00:00:00Z",
        "sensors": [
            {"sensor_name": "temp", "value": 1.0},
            {"sensor_name": "temp", "value": 2.0, "timestamp": "2026-01-01T00:00:00Z"},
            {"sensor_name": "temp", "value": 3.0, "timestamp": "2026-01-01T00:00:01Z"},
            {"sensor_name": "hum", "value": 4.0},
        ]
    }))
    .unwrap();
    let kept: Vec<(&str, f64)> = parsed
        .readings
        .iter()
        .map(|r| (r.sensor.as_str(), r.value))
        .collect();
    assert_eq!(kept, [("temp", 1.0), ("temp", 3.0), ("hum", 4.0)]);
    assert_eq!(parsed.dropped.len(), 1, "{:?}", parsed.dropped);
    assert_eq!(parsed.dropped[0].field, "temp");
    assert!(
        parsed.dropped[0]
            .reason
            .contains("came earlier in the message"),
        "{:?}",
        parsed.dropped
    );
    // Less than a microsecond apart is one instant, as Postgres keeps it.
    let parsed = telemetry(json!({"sensors": [
        {"sensor_name": "temp", "value": 1.0, "timestamp": "2026-01-01T00:00:00.0000001Z"},
        {"sensor_name": "temp", "value": 2.0, "timestamp": "2026-01-01T00:00:00.0000002Z"},
    ]}))
    .unwrap();
    assert_eq!(parsed.readings.len(), 1, "{:?}", parsed.readings);
    assert_eq!(
        parsed.readings[0].timestamp,
        Some(time("2026-01-01T00:00:00Z"))
    );
    // Without any timestamp, both share the arrival.
    let parsed = telemetry(json!({"sensors": [
        {"sensor_name": "temp", "value": 1.0},
        {"sensor_name": "temp", "value": 2.0},
    ]}))
    .unwrap();
    assert_eq!(parsed.readings.len(), 1);
    assert!(parsed.dropped[0].reason.contains("the same arrival"));
}

#[test]
fn status_only_or_location_only_telemetry_is_accepted() {
    let status = telemetry(json!({"status": {"mode": "eco"}})).unwrap();
    assert!(status.readings.is_empty());
    assert_eq!(status.status["mode"], "eco");
    let location = telemetry(json!({"location": {"latitude": 0, "longitude": 0}})).unwrap();
    assert!(location.location.is_some());
}

#[test]
fn a_nul_anywhere_refuses_the_message() {
    for payload in [
        r#"{"note":"a\u0000b","battery":42}"#,
        r#"{"\u0000":1}"#,
        r#"{"status":{"x":["ok","\u0000"]}}"#,
        r#"{"sensors":[{"sensor_name":"t","value":1,"unit":"\u0000C"}]}"#,
    ] {
        for kind in [TopicKind::Data, TopicKind::Status, TopicKind::OtaProgress] {
            let refused = parse_payload(&kind, payload.as_bytes()).unwrap_err();
            assert!(refused.to_string().contains("NUL"), "{payload}: {refused}");
        }
    }
    let reply = TopicKind::CommandReply(CommandId::parse("c1").unwrap());
    let refused = parse_payload(&reply, br#"{"status":"failed","result":"\u0000"}"#);
    assert!(refused.unwrap_err().to_string().contains("NUL"));
    // A backslash before the letters u0000 is text like any other.
    assert!(parse_payload(&TopicKind::Status, br#"{"path":"C:\\u0000"}"#).is_ok());
}

#[test]
fn device_times_outside_the_calendar_bounds_are_dropped() {
    for stamp in ["0000-01-01T00:00:00Z", "1969-12-31T23:59:59Z"] {
        let parsed = telemetry(json!({"temperature": 1.0, "timestamp": stamp})).unwrap();
        assert_eq!(parsed.device_time, None, "{stamp}");
        assert_eq!(parsed.dropped.len(), 1, "{stamp}");
    }
    let parsed = telemetry(json!({"temperature": 1.0, "timestamp": "9999-12-31T23:59:59Z"}));
    assert!(parsed.unwrap().device_time.is_some());
}

#[test]
fn status_messages_are_objects_with_fields() {
    assert_eq!(
        parse_payload(&TopicKind::Status, br#"{"status":"online","battery":95}"#).unwrap(),
        DeviceMessage::Status(
            json!({"status": "online", "battery": 95})
                .as_object()
                .unwrap()
                .clone()
        )
    );
    for bad in [&b"{}"[..], b"\"online\"", b"", b"{"] {
        assert!(parse_payload(&TopicKind::Status, bad).is_err());
    }
}

#[test]
fn heartbeats_may_be_empty() {
    for empty in [&b""[..], b"  \n"] {
        assert_eq!(
            parse_payload(&TopicKind::Heartbeat, empty).unwrap(),
            DeviceMessage::Heartbeat {
                device_time: None,
                firmware_version: None
            }
        );
    }
    assert_eq!(
        parse_payload(&TopicKind::Heartbeat, br#"{}"#).unwrap(),
        DeviceMessage::Heartbeat {
            device_time: None,
            firmware_version: None
        }
    );
    assert_eq!(
        parse_payload(
            &TopicKind::Heartbeat,
            br#"{"timestamp":"2026-11-23T10:00:00+01:00"}"#
        )
        .unwrap(),
        DeviceMessage::Heartbeat {
            device_time: Some(time("2026-11-23T09:00:00Z")),
            firmware_version: None
        }
    );
    assert_eq!(
        parse_payload(&TopicKind::Heartbeat, br#"{"firmware_version":"2.0.0"}"#).unwrap(),
        DeviceMessage::Heartbeat {
            device_time: None,
            firmware_version: Some("2.0.0".into())
        }
    );
    assert!(parse_payload(&TopicKind::Heartbeat, br#"{"firmware_version":2}"#).is_err());
    assert!(parse_payload(&TopicKind::Heartbeat, br#"{"timestamp":"soon"}"#).is_err());
    assert!(parse_payload(&TopicKind::Heartbeat, b"ping").is_err());
}

#[test]
fn command_replies_say_how_the_command_ended() {
    let kind = TopicKind::CommandReply(CommandId::parse("c-1").unwrap());
    let cases: Vec<(Value, Expected<(CommandOutcome, Value)>)> = vec![
        (
            json!({"status": "succeeded", "result": {"rebooted": true}}),
            Ok((CommandOutcome::Succeeded, json!({"rebooted": true}))),
        ),
        (
            json!({"status": "failed", "error": "busy"}),
            Ok((CommandOutcome::Failed, json!({"error": "busy"}))),
        ),
        (json!({"success": true}), Err("needs \"status\"")),
        (json!({"status": "maybe"}), Err("neither")),
        (json!({"status": "done"}), Err("neither")),
        (json!({"status": "ok"}), Err("neither")),
        (json!({"status": "Succeeded"}), Err("neither")),
        (json!({"status": "error"}), Err("neither")),
        (json!({"result": 1}), Err("needs \"status\"")),
    ];
    for (payload, expected) in cases {
        let parsed = parse_payload(&kind, payload.to_string().as_bytes());
        match expected {
            Ok((outcome, result)) => assert_eq!(
                parsed.unwrap(),
                DeviceMessage::CommandReply {
                    command_id: CommandId::parse("c-1").unwrap(),
                    outcome,
                    result
                }
            ),
            Err(message) => assert!(parsed.unwrap_err().to_string().contains(message)),
        }
    }
}

#[test]
fn ota_progress_is_checked() {
    let parsed = parse_payload(
        &TopicKind::OtaProgress,
        br#"{"rollout_id":"r-1","state":"downloading","progress":42.4,"version":"1.2.0"}"#,
    )
    .unwrap();
    assert_eq!(
        parsed,
        DeviceMessage::OtaProgress(OtaProgress {
            rollout_id: Some(RolloutId::parse("r-1").unwrap()),
            state: "downloading".into(),
            progress: 42,
            version: Some("1.2.0".into()),
            error: None,
        })
    );
    for bad in [
        json!({"progress": 10}),
        json!({"state": "installing", "progress": 101}),
        json!({"state": "installing", "progress": "half"}),
        json!({"state": "", "progress": 1}),
        json!({"state": "failed", "rollout_id": "r.1"}),
    ] {
        assert!(
            parse_payload(&TopicKind::OtaProgress, bad.to_string().as_bytes()).is_err(),
            "{bad}"
        );
    }
}

/// Arbitrary bytes and arbitrary JSON never panic the parser, and whatever it accepts is valid
/// by the domain's rules (the command built from it will not be refused for its readings).
mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<f64>().prop_map(|f| json!(f)),
            any::<i64>().prop_map(|i| json!(i)),
            "[a-zA-Z0-9_ .:-]{0,12}".prop_map(Value::String),
            // Any text at all, NUL and other control characters included.
            "\\PC{0,4}[\\x00-\\x1f]?\\PC{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("sensors".to_string()),
                        Just("sensor_name".to_string()),
                        Just("value".to_string()),
                        Just("timestamp".to_string()),
                        Just("location".to_string()),
                        Just("latitude".to_string()),
                        Just("status".to_string()),
                        "[a-z_A-Z0-9]{1,8}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..512)) {
            for kind in [TopicKind::Data, TopicKind::Status, TopicKind::Heartbeat, TopicKind::OtaProgress] {
                let _ = parse_payload(&kind, &payload);
            }
        }

        #[test]
        fn accepted_telemetry_is_valid(value in json_value()) {
            if let Ok(parsed) = parse_telemetry(value.to_string().as_bytes()) {
                prop_assert!(parsed.readings.iter().all(|r| validate_reading(r).is_ok()));
                prop_assert!(parsed.location.iter().all(|l| validate_location(l).is_ok()));
                prop_assert!(!parsed.readings.is_empty() || parsed.location.is_some() || !parsed.status.is_empty());
            }
        }

        /// Nothing accepted holds a NUL, which the read models' jsonb could not store.
        #[test]
        fn accepted_messages_hold_no_nul(value in json_value()) {
            let payload = value.to_string();
            for kind in [TopicKind::Data, TopicKind::Status, TopicKind::Heartbeat, TopicKind::OtaProgress] {
                if let Ok(message) = parse_payload(&kind, payload.as_bytes()) {
                    let command = serde_json::to_string(&message.into_command(
                        Identity { digest: "d".into(), redelivery: false },
                        Utc::now(),
                    ))
                    .unwrap();
                    prop_assert!(!fleetlog_domain::limits::json_has_nul(command.as_bytes()), "{command}");
                }
            }
        }

        /// Payloads of every size up to past the limit: refused by size or parsed, never a
        /// panic.
        #[test]
        fn large_payloads_are_refused_by_size(extra in 0usize..4096, note in "\\PC{0,64}") {
            let filler = "x".repeat(MAX_PAYLOAD_BYTES - 64 + extra);
            let payload = json!({"status": "online", "note": note, "filler": filler}).to_string();
            match parse_payload(&TopicKind::Status, payload.as_bytes()) {
                Err(Rejection::TooLarge(size)) => prop_assert!(size > MAX_PAYLOAD_BYTES),
                Ok(_) => prop_assert!(payload.len() <= MAX_PAYLOAD_BYTES),
                Err(other) => prop_assert!(false, "{other}"),
            }
        }

        #[test]
        fn topics_never_panic(topic in "[a-z/._0-9+#-]{0,40}") {
            let _ = parse_topic("devices", &topic);
        }
    }
}

#[test]
fn identities_tell_redeliveries_from_repeats() {
    let device = DeviceId::parse("d-1").unwrap();
    let payload = br#"{"temperature": 21}"#;
    let first = Identity::of_mqtt(&device, payload, 7, false);
    let again = Identity::of_mqtt(&device, payload, 7, true);
    assert_eq!(first.digest, again.digest);
    assert!(!first.redelivery && again.redelivery);
    assert_ne!(
        Identity::of_mqtt(&device, payload, 8, false).digest,
        first.digest
    );
    let other = DeviceId::parse("d-2").unwrap();
    assert_ne!(
        Identity::of_mqtt(&other, payload, 7, false).digest,
        first.digest
    );
    assert!(Identity::of_timestamped(&device, payload).redelivery);
    let now = Utc::now();
    assert!(!Identity::unique(&device, payload, now).redelivery);
    let keyed = Identity::of_idempotency_key(&device, "k", payload);
    assert_eq!(keyed.digest.len(), 65);
    assert_eq!(Identity::of_idempotency_key(&device, "k", payload), keyed);
    let prefix = Identity::idempotency_key_prefix(&device, "k");
    assert!(keyed.digest.starts_with(&prefix));
    let other_body = Identity::of_idempotency_key(&device, "k", b"{}");
    assert!(other_body.digest.starts_with(&prefix) && other_body != keyed);
}

#[test]
fn timestamped_telemetry_is_recognised() {
    assert!(!telemetry(json!({"t": 1})).unwrap().is_timestamped());
    assert!(telemetry(json!({"t": 1, "timestamp": 1_790_000_000}))
        .unwrap()
        .is_timestamped());
    let per_reading =
        json!({"sensors": [{"sensor_name": "t", "value": 1, "timestamp": "2026-11-23T10:00:00Z"}]});
    assert!(telemetry(per_reading).unwrap().is_timestamped());
}
