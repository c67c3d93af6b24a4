//! fleetlog's MQTT edge, both ways. The bridge ([`bridge`]) subscribes to the device topics
//! (`devices/{id}/data`, `status`, `heartbeat`, command replies, OTA progress), parses each
//! message into a validated command, executes it on the command bus and acknowledges the QoS 1
//! message only after the command committed or was dead-lettered with its reason. The dispatcher ([`dispatch`]) sends what device events ask
//! for (commands, desired properties, firmware updates) back to the devices.
//!
//! [`message`] is the pure part (topic and payload to a validated message, or a reason); the API's
//! HTTP ingest routes use it too, so a payload is judged the same whichever way it arrives.

pub mod bridge;
pub mod broker;
pub mod dispatch;
pub mod message;
