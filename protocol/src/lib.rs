//! fleetlog's device wire contract, the one place that says what a device may send and how it
//! is judged: topics (`{root}/{device_id}/{kind}`), payload formats and their limits, and the
//! identity that tells a redelivery from a repeat. Pure functions, no IO: the MQTT ingest
//! bridge and the API's HTTP ingest both call them, so a payload is judged the same way
//! whichever door it came through. The fuzz target (`fuzz/`) feeds it arbitrary input.

pub mod message;
