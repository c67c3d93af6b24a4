//! Feeds arbitrary topics and payloads to the device message parser: it must never panic, and
//! whatever it accepts must turn into a command.
#![no_main]

use fleetlog_ingest::message::{parse_payload, parse_topic, Identity};
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
            let identity = Identity::of_mqtt(&device, payload, 1, false);
            let _ = message.into_command(identity, chrono::DateTime::UNIX_EPOCH);
        }
    }
});
