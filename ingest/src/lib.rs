//! fleetlog's MQTT ingest: devices to commands. The bridge ([`bridge`]) subscribes to the
//! device topics (`devices/{id}/data`, `status`, `heartbeat`, command replies, OTA progress),
//! parses each message with `fleetlog-protocol` into a validated command, executes it on the
//! command bus and acknowledges the QoS 1 message only after the command committed or was
//! dead-lettered with its reason. The way back, events to devices, is `fleetlog-dispatch`.

pub mod bridge;
