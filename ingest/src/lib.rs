//! The MQTT bridge: subscribes to the device topics (`devices/{id}/data`, `status`, `heartbeat`,
//! command replies, OTA progress), parses each message into a validated command, executes it on
//! the command bus and acknowledges the QoS 1 message only after the command committed or was
//! dead-lettered with its reason.
//!
//! Empty so far: the bridge arrives with the ingest stage of the build.
