//! Feeds arbitrary topics and payloads to the device message parser: it must never panic,
//! whatever it accepts must fit the size limit and turn into a command, and that command must
//! hold no NUL (which the read models' jsonb could not store, so it would poison them).
#![no_main]

use fleetlog_domain::limits::json_has_nul;
use fleetlog_protocol::message::{parse_payload, parse_topic, Identity, MAX_PAYLOAD_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first line is the topic, the rest the payload.
    let split = input.iter().position(|&b| b == b'\n').unwrap_or(input.len());
    let (topic, payload) = input.split_at(split);
    let payload = payload.get(1..).unwrap_or_default();
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    if let Ok((device, kind)) = parse_topic("devices", topic) {
        if let Ok(message) = parse_payload(&kind, payload) {
            assert!(payload.len() <= MAX_PAYLOAD_BYTES, "accepted past the size limit");
            let identity = Identity::of_mqtt(&device, payload, 1, false);
            let command = message.into_command(identity, chrono::DateTime::UNIX_EPOCH);
            let stored = serde_json::to_vec(&command).expect("commands serialize");
            assert!(!json_has_nul(&stored), "accepted a NUL: {command:?}");
        }
    }
});
