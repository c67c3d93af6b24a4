//! fleetlog's device wire contract, the one place that says what a device may send and how it
//! is judged, and what fleetlog sends it:
//!
//! - [`message`]: topics (`{root}/{device_id}/{kind}`), payload formats and their limits, and
//!   the identity that tells a redelivery from a repeat. The MQTT ingest bridge and the API's
//!   HTTP ingest both call it, so a payload is judged the same way whichever door it came
//!   through; the fuzz target (`fuzz/`) feeds it arbitrary input.
//! - [`outbound`]: the commands, desired documents and OTA messages the dispatcher sends.
//! - [`provisioning`]: the topics and payloads of provisioning over MQTT.
//!
//! Pure, no IO.

pub mod message;
pub mod outbound;
pub mod provisioning;
