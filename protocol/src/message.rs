//! Device messages: topic and payload in, a validated message or a reason out.
//!
//! Pure functions, no IO: the MQTT bridge and the HTTP ingest routes of the API both call them,
//! so a payload is judged the same way whichever door it came through.

use chrono::{DateTime, TimeZone, Utc};
use fleetlog_domain::device::{
    validate_location, validate_reading, CommandOutcome, Delivery, DeviceCommand, Location,
    Reading, MAX_READINGS,
};
use fleetlog_domain::{CommandId, DeviceId, RolloutId};
use serde_json::{Map, Value};

/// The largest payload accepted on any device topic.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// What a device topic says about its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `{root}/{id}/data`: telemetry.
    Data,
    /// `{root}/{id}/status`: reported status fields.
    Status,
    /// `{root}/{id}/heartbeat`: a sign of life.
    Heartbeat,
    /// `{root}/{id}/commands/{command_id}/reply`: the result of a command.
    CommandReply(CommandId),
    /// `{root}/{id}/ota/progress`: progress of a firmware update.
    OtaProgress,
}

/// Why a message was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The topic is not one of the device topics.
    #[error("topic {0:?} is not a device topic")]
    UnknownTopic(String),
    /// The device id in the topic breaks the id rules.
    #[error("device id in topic {topic:?}: {reason}")]
    InvalidDeviceId {
        /// The topic.
        topic: String,
        /// What is wrong with the id.
        reason: String,
    },
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes is larger than the {MAX_PAYLOAD_BYTES} accepted")]
    TooLarge(usize),
    /// Not UTF-8 JSON at all.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON of the wrong shape.
    #[error("{0}")]
    Invalid(String),
    /// Nothing usable was left once the invalid parts were dropped.
    #[error("no valid reading, status or location in the message{}", describe_dropped(.0))]
    NothingValid(Vec<Dropped>),
}

impl Rejection {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::UnknownTopic(_) => "unknown_topic",
            Rejection::InvalidDeviceId { .. } => "invalid_device_id",
            Rejection::TooLarge(_) => "too_large",
            Rejection::NotJson(_) => "not_json",
            Rejection::Invalid(_) => "invalid",
            Rejection::NothingValid(_) => "nothing_valid",
        }
    }
}

fn describe_dropped(dropped: &[Dropped]) -> String {
    if dropped.is_empty() {
        String::new()
    } else {
        let reasons: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        format!(": {}", reasons.join("; "))
    }
}

/// A part of a message that was left out, and why; the rest of the message is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Which part: a sensor name, `sensors[3]`, `location`, `timestamp`.
    pub field: String,
    /// Why it was left out.
    pub reason: String,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// A telemetry message after validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Telemetry {
    /// The valid readings.
    pub readings: Vec<Reading>,
    /// A valid position, if one was sent.
    pub location: Option<Location>,
    /// Status fields sent along.
    pub status: Map<String, Value>,
    /// The message's own timestamp.
    pub device_time: Option<DateTime<Utc>>,
    /// What was left out.
    pub dropped: Vec<Dropped>,
}

/// The progress report of a firmware update.
#[derive(Debug, Clone, PartialEq)]
pub struct OtaProgress {
    /// The rollout the device names.
    pub rollout_id: Option<RolloutId>,
    /// `downloading`, `installing`, `rebooting`, `succeeded` or `failed`, ...
    pub state: String,
    /// Percent done.
    pub progress: u8,
    /// The version the device is installing or runs.
    pub version: Option<String>,
    /// What went wrong, when it failed.
    pub error: Option<String>,
}

/// A validated device message.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceMessage {
    /// Telemetry, possibly with parts dropped.
    Telemetry(Telemetry),
    /// Status fields to merge into the reported properties.
    Status(Map<String, Value>),
    /// A heartbeat.
    Heartbeat {
        /// The device's own timestamp.
        device_time: Option<DateTime<Utc>>,
        /// The firmware version it says it runs (`firmware_version`).
        firmware_version: Option<String>,
    },
    /// The result of a command.
    CommandReply {
        /// The command.
        command_id: CommandId,
        /// How it ended.
        outcome: CommandOutcome,
        /// What the device returned.
        result: Value,
    },
    /// Firmware update progress.
    OtaProgress(OtaProgress),
}

impl DeviceMessage {
    /// The parts that were dropped from an otherwise accepted message.
    pub fn dropped(&self) -> &[Dropped] {
        match self {
            DeviceMessage::Telemetry(telemetry) => &telemetry.dropped,
            _ => &[],
        }
    }
}

/// Splits `{root}/{id}/{kind...}` into the device and what the topic carries.
pub fn parse_topic(root: &str, topic: &str) -> Result<(DeviceId, TopicKind), Rejection> {
    let unknown = || Rejection::UnknownTopic(topic.to_string());
    let rest = topic
        .strip_prefix(root)
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(unknown)?;
    let mut parts = rest.split('/');
    let device = parts.next().ok_or_else(unknown)?;
    let kind = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("data"), None, None, None) => TopicKind::Data,
        (Some("status"), None, None, None) => TopicKind::Status,
        (Some("heartbeat"), None, None, None) => TopicKind::Heartbeat,
        (Some("ota"), Some("progress"), None, None) => TopicKind::OtaProgress,
        (Some("commands"), Some(command), Some("reply"), None) => {
            TopicKind::CommandReply(CommandId::parse(command).map_err(|error| {
                Rejection::Invalid(format!("command id in topic {topic:?}: {error}"))
            })?)
        }
        _ => return Err(unknown()),
    };
    let device_id = DeviceId::parse(device).map_err(|error| Rejection::InvalidDeviceId {
        topic: topic.to_string(),
        reason: error.to_string(),
    })?;
    Ok((device_id, kind))
}

/// Parses and validates the payload of a message of the given kind.
pub fn parse_payload(kind: &TopicKind, payload: &[u8]) -> Result<DeviceMessage, Rejection> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Rejection::TooLarge(payload.len()));
    }
    match kind {
        TopicKind::Data => parse_telemetry(payload).map(DeviceMessage::Telemetry),
        TopicKind::Status => {
            let status = parse_object(payload)?;
            if status.is_empty() {
                return Err(Rejection::Invalid("status carries no field".into()));
            }
            Ok(DeviceMessage::Status(status))
        }
        TopicKind::Heartbeat => parse_heartbeat(payload),
        TopicKind::CommandReply(command_id) => parse_reply(command_id.clone(), payload),
        TopicKind::OtaProgress => parse_ota_progress(payload).map(DeviceMessage::OtaProgress),
    }
}

/// Parses a telemetry payload in either format.
///
/// Full: `{"sensors":[{"sensor_name","value","unit","timestamp"}], "status":{..},
/// "location":{"latitude","longitude"}, "timestamp"}`. Simple: `{"temperature":25.5, ...}`,
/// where every member is a reading except `timestamp`, `status` (an object) and `location` (an
/// object), which mean the same as in the full format. Invalid readings, an invalid location or
/// timestamp are dropped with a reason; the message is refused only if nothing valid is left.
pub fn parse_telemetry(payload: &[u8]) -> Result<Telemetry, Rejection> {
    let object = parse_object(payload)?;
    let mut telemetry = Telemetry::default();
    let full = object.contains_key("sensors");
    for (key, value) in object {
        match key.as_str() {
            "sensors" => parse_sensor_list(value, &mut telemetry)?,
            "timestamp" => match parse_time(&value) {
                Ok(time) => telemetry.device_time = Some(time),
                Err(reason) => telemetry.dropped.push(Dropped { field: key, reason }),
            },
            "location" if full || value.is_object() => match parse_location(&value) {
                Ok(location) => telemetry.location = Some(location),
                Err(reason) => telemetry.dropped.push(Dropped { field: key, reason }),
            },
            "status" if full || value.is_object() => match value {
                Value::Object(status) => telemetry.status = status,
                _ => telemetry.dropped.push(Dropped {
                    field: key,
                    reason: "must be an object".into(),
                }),
            },
            _ if full => telemetry.dropped.push(Dropped {
                field: key,
                reason: "unknown member of the full format".into(),
            }),
            _ => {
                let reading = match value.as_f64() {
                    Some(number) => Reading {
                        sensor: key.clone(),
                        value: number,
                        unit: None,
                        timestamp: None,
                    },
                    None => {
                        telemetry.dropped.push(Dropped {
                            field: key,
                            reason: format!("value must be a number, got {}", json_type(&value)),
                        });
                        continue;
                    }
                };
                keep_if_valid(reading, key, &mut telemetry);
            }
        }
    }
    if telemetry.readings.len() > MAX_READINGS {
        return Err(Rejection::Invalid(format!(
            "{} readings in one message, at most {MAX_READINGS} are accepted",
            telemetry.readings.len()
        )));
    }
    drop_readings_of_one_instant(&mut telemetry);
    if telemetry.readings.is_empty() && telemetry.location.is_none() && telemetry.status.is_empty()
    {
        return Err(Rejection::NothingValid(telemetry.dropped));
    }
    Ok(telemetry)
}

fn parse_sensor_list(value: Value, telemetry: &mut Telemetry) -> Result<(), Rejection> {
    let Value::Array(sensors) = value else {
        return Err(Rejection::Invalid(format!(
            "sensors must be an array, got {}",
            json_type(&value)
        )));
    };
    if sensors.len() > MAX_READINGS {
        return Err(Rejection::Invalid(format!(
            "{} readings in one message, at most {MAX_READINGS} are accepted",
            sensors.len()
        )));
    }
    for (index, sensor) in sensors.into_iter().enumerate() {
        let field = format!("sensors[{index}]");
        match parse_sensor(sensor) {
            Ok(reading) => {
                let field = format!("{field} ({})", reading.sensor);
                keep_if_valid(reading, field, telemetry);
            }
            Err(reason) => telemetry.dropped.push(Dropped { field, reason }),
        }
    }
    Ok(())
}

fn parse_sensor(value: Value) -> Result<Reading, String> {
    let Value::Object(mut sensor) = value else {
        return Err(format!("must be an object, got {}", json_type(&value)));
    };
    let name = match sensor.remove("sensor_name") {
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(format!(
                "sensor_name must be a string, got {}",
                json_type(&other)
            ))
        }
        None => return Err("sensor_name is missing".into()),
    };
    let value = match sensor.remove("value") {
        Some(Value::Number(number)) => number.as_f64().unwrap_or(f64::NAN),
        Some(other) => return Err(format!("value must be a number, got {}", json_type(&other))),
        None => return Err("value is missing".into()),
    };
    let unit = match sensor.remove("unit") {
        None | Some(Value::Null) => None,
        Some(Value::String(unit)) => Some(unit),
        Some(other) => return Err(format!("unit must be a string, got {}", json_type(&other))),
    };
    let timestamp = match sensor.remove("timestamp") {
        None | Some(Value::Null) => None,
        Some(time) => Some(parse_time(&time).map_err(|reason| format!("timestamp {reason}"))?),
    };
    if let Some(unknown) = sensor.keys().next() {
        return Err(format!("unknown member {unknown:?}"));
    }
    Ok(Reading {
        sensor: name,
        value,
        unit,
        timestamp,
    })
}

/// One sensor has one value at one instant: a second reading of a sensor at the instant of an
/// earlier one in the message (its own timestamp, else the message's, else the arrival shared
/// by both) is dropped with the reason, so the history and the latest value cannot disagree
/// about which one counts. The first is kept.
fn drop_readings_of_one_instant(telemetry: &mut Telemetry) {
    let device_time = telemetry.device_time;
    let mut seen = std::collections::HashSet::with_capacity(telemetry.readings.len());
    let mut dropped = Vec::new();
    telemetry.readings.retain(|reading| {
        let instant = reading.timestamp.or(device_time);
        if seen.insert((reading.sensor.clone(), instant)) {
            return true;
        }
        let when = instant.map_or("the same arrival".to_string(), |t| t.to_rfc3339());
        dropped.push(Dropped {
            field: reading.sensor.clone(),
            reason: format!(
                "a reading of this sensor at {when} came earlier in the message; the first is kept"
            ),
        });
        false
    });
    telemetry.dropped.extend(dropped);
}

fn keep_if_valid(reading: Reading, field: String, telemetry: &mut Telemetry) {
    match validate_reading(&reading) {
        Ok(()) => telemetry.readings.push(reading),
        Err(error) => telemetry.dropped.push(Dropped {
            field,
            reason: error.to_string(),
        }),
    }
}

fn parse_location(value: &Value) -> Result<Location, String> {
    let Value::Object(location) = value else {
        return Err(format!("must be an object, got {}", json_type(value)));
    };
    let coordinate = |name: &str| match location.get(name) {
        Some(Value::Number(number)) => number
            .as_f64()
            .ok_or_else(|| format!("{name} is not a number")),
        Some(other) => Err(format!("{name} must be a number, got {}", json_type(other))),
        None => Err(format!("{name} is missing")),
    };
    let location = Location {
        latitude: coordinate("latitude")?,
        longitude: coordinate("longitude")?,
    };
    validate_location(&location).map_err(|error| error.to_string())?;
    Ok(location)
}

/// RFC 3339 text, or a Unix time in seconds (milliseconds when above 10^11).
/// A device's time, cut to the microsecond that Postgres keeps: two readings a fraction of a
/// microsecond apart are one instant in every view, so they are one here too.
fn parse_time(value: &Value) -> Result<DateTime<Utc>, String> {
    parse_exact_time(value).map(fleetlog_domain::limits::to_microseconds)
}

fn parse_exact_time(value: &Value) -> Result<DateTime<Utc>, String> {
    match value {
        Value::String(text) => DateTime::parse_from_rfc3339(text)
            .map_err(|_| format!("{text:?} is not an RFC 3339 time"))
            .and_then(|time| {
                fleetlog_domain::limits::check_instant(time.with_timezone(&Utc))
                    .map_err(|error| error.to_string())
            }),
        Value::Number(number) => {
            let seconds = number.as_f64().unwrap_or(f64::NAN);
            let millis = if seconds.abs() > 1e11 {
                seconds
            } else {
                seconds * 1000.0
            };
            // Years 1970 to 9999 only: anything else is a device clock gone wrong.
            if !(0.0..=253_402_300_799_000.0).contains(&millis) {
                return Err(format!("{number} is not a plausible Unix time"));
            }
            Utc.timestamp_millis_opt(millis as i64)
                .single()
                .ok_or_else(|| format!("{number} is not a plausible Unix time"))
        }
        other => Err(format!(
            "must be an RFC 3339 string or a Unix time, got {}",
            json_type(other)
        )),
    }
}

fn parse_heartbeat(payload: &[u8]) -> Result<DeviceMessage, Rejection> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(DeviceMessage::Heartbeat {
            device_time: None,
            firmware_version: None,
        });
    }
    let object = parse_object(payload)?;
    let device_time = match object.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(time) => Some(
            parse_time(time).map_err(|reason| Rejection::Invalid(format!("timestamp {reason}")))?,
        ),
    };
    let firmware_version = match object.get("firmware_version") {
        None | Some(Value::Null) => None,
        Some(Value::String(version)) if !version.trim().is_empty() && version.len() <= 64 => {
            Some(version.clone())
        }
        Some(_) => {
            return Err(Rejection::Invalid(
                "firmware_version must be a non-empty string of at most 64 bytes".into(),
            ))
        }
    };
    Ok(DeviceMessage::Heartbeat {
        device_time,
        firmware_version,
    })
}

/// `{"status": "succeeded"|"failed", "result": any}`, and nothing else; an `error` text of a
/// failed command is kept in the result.
fn parse_reply(command_id: CommandId, payload: &[u8]) -> Result<DeviceMessage, Rejection> {
    let mut object = parse_object(payload)?;
    let outcome = match object.get("status") {
        // Exactly the two statuses of the contract: a guess at what "done" or "ok" meant
        // could record a failed command as succeeded.
        Some(Value::String(status)) => match status.as_str() {
            "succeeded" => CommandOutcome::Succeeded,
            "failed" => CommandOutcome::Failed,
            other => {
                return Err(Rejection::Invalid(format!(
                    "reply status {other:?} is neither \"succeeded\" nor \"failed\""
                )))
            }
        },
        _ => {
            return Err(Rejection::Invalid(
                "reply needs \"status\": \"succeeded\" or \"failed\"".into(),
            ))
        }
    };
    let mut result = object.remove("result").unwrap_or(Value::Null);
    if let Some(error) = object.remove("error") {
        result = match result {
            Value::Object(mut fields) => {
                fields.entry("error").or_insert(error);
                Value::Object(fields)
            }
            Value::Null => serde_json::json!({ "error": error }),
            other => serde_json::json!({ "value": other, "error": error }),
        };
    }
    Ok(DeviceMessage::CommandReply {
        command_id,
        outcome,
        result,
    })
}

fn parse_ota_progress(payload: &[u8]) -> Result<OtaProgress, Rejection> {
    let object = parse_object(payload)?;
    let text = |name: &str| -> Result<Option<String>, Rejection> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) if !text.trim().is_empty() && text.len() <= 512 => {
                Ok(Some(text.clone()))
            }
            Some(_) => Err(Rejection::Invalid(format!(
                "{name} must be a non-empty string of at most 512 bytes"
            ))),
        }
    };
    let rollout_id = text("rollout_id")?
        .map(RolloutId::parse)
        .transpose()
        .map_err(|error| Rejection::Invalid(format!("rollout_id: {error}")))?;
    let state = text("state")?.ok_or_else(|| Rejection::Invalid("state is missing".into()))?;
    let progress = match object.get("progress") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(number)) => match number.as_f64() {
            Some(percent) if (0.0..=100.0).contains(&percent) => percent.round() as u8,
            _ => {
                return Err(Rejection::Invalid(format!(
                    "progress {number} is outside 0..100"
                )))
            }
        },
        Some(other) => {
            return Err(Rejection::Invalid(format!(
                "progress must be a number, got {}",
                json_type(other)
            )))
        }
    };
    Ok(OtaProgress {
        rollout_id,
        state,
        progress,
        version: text("version")?,
        error: text("error")?,
    })
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    // Postgres's jsonb cannot hold a NUL: a message with one is refused whole, before any of
    // it could reach the event log (where it would poison every read model that applies it).
    if fleetlog_domain::limits::json_has_nul(payload) {
        return Err(Rejection::Invalid(
            fleetlog_domain::limits::LimitError::Nul.to_string(),
        ));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(Rejection::Invalid(format!(
            "payload must be a JSON object, got {}",
            json_type(&other)
        ))),
        Err(error) => Err(Rejection::NotJson(error.to_string())),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How a message can be recognised if it arrives again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Digest recorded with the telemetry.
    pub digest: String,
    /// Whether an earlier message with the same digest makes this one a duplicate.
    pub redelivery: bool,
}

impl Identity {
    /// For a message whose payload carries its own timestamp: every copy of the payload is the
    /// same fact, however it arrived.
    pub fn of_timestamped(device: &DeviceId, payload: &[u8]) -> Self {
        Identity {
            digest: digest(&[device.as_str().as_bytes(), payload]),
            redelivery: true,
        }
    }

    /// For an MQTT message without a timestamp: the broker redelivers an unacknowledged message
    /// with its packet id and the DUP flag set, so only a DUP copy is checked against earlier
    /// digests; identical readings sent twice on purpose both count.
    pub fn of_mqtt(device: &DeviceId, payload: &[u8], packet_id: u16, dup: bool) -> Self {
        Identity {
            digest: digest(&[
                device.as_str().as_bytes(),
                payload,
                &packet_id.to_be_bytes(),
            ]),
            redelivery: dup,
        }
    }

    /// For an HTTP request that names itself with an `Idempotency-Key`: a retry (the same key
    /// and the same body) is a duplicate. The digest is the key's part, then the body's, so a
    /// key used again with another body can be told from a retry
    /// ([`Identity::idempotency_key_prefix`]).
    pub fn of_idempotency_key(device: &DeviceId, key: &str, payload: &[u8]) -> Self {
        Identity {
            digest: format!(
                "{}{}",
                Self::idempotency_key_prefix(device, key),
                digest(&[payload])
            ),
            redelivery: true,
        }
    }

    /// What every digest of uploads under `key` starts with.
    pub fn idempotency_key_prefix(device: &DeviceId, key: &str) -> String {
        let key = digest(&[
            device.as_str().as_bytes(),
            b"idempotency-key",
            key.as_bytes(),
        ]);
        format!("{key}:")
    }

    /// For a message nothing identifies: recorded, never treated as a duplicate.
    pub fn unique(device: &DeviceId, payload: &[u8], received_at: DateTime<Utc>) -> Self {
        let nanos = received_at.timestamp_nanos_opt().unwrap_or_default();
        Identity {
            digest: digest(&[device.as_str().as_bytes(), payload, &nanos.to_be_bytes()]),
            redelivery: false,
        }
    }
}

impl From<Identity> for Delivery {
    fn from(identity: Identity) -> Self {
        Delivery {
            digest: identity.digest,
            redelivery: identity.redelivery,
        }
    }
}

/// A hex SHA-256 prefix of the parts (128 bits: collisions are out of reach, events stay small).
fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..16])
}

impl Telemetry {
    /// Whether the message says when it was measured, so every copy of it is the same fact.
    pub fn is_timestamped(&self) -> bool {
        self.device_time.is_some()
            || (!self.readings.is_empty() && self.readings.iter().all(|r| r.timestamp.is_some()))
    }
}

impl DeviceMessage {
    /// The command that records this message on the device.
    pub fn into_command(self, identity: Identity, received_at: DateTime<Utc>) -> DeviceCommand {
        match self {
            DeviceMessage::Telemetry(telemetry) => DeviceCommand::RecordTelemetry {
                digest: identity.digest,
                redelivery: identity.redelivery,
                readings: telemetry.readings,
                device_time: telemetry.device_time,
                received_at,
                location: telemetry.location,
                status: telemetry.status,
            },
            DeviceMessage::Status(status) => DeviceCommand::ReportStatus {
                status,
                received_at,
                delivery: Some(identity.into()),
            },
            DeviceMessage::Heartbeat {
                device_time,
                firmware_version,
            } => DeviceCommand::Heartbeat {
                device_time,
                firmware_version,
                received_at,
                delivery: Some(identity.into()),
            },
            DeviceMessage::CommandReply {
                command_id,
                outcome,
                result,
            } => DeviceCommand::RecordCommandReply {
                command_id,
                outcome,
                result,
                received_at,
            },
            DeviceMessage::OtaProgress(progress) if progress.state == "failed" => {
                DeviceCommand::RecordFirmwareFailed {
                    rollout_id: progress.rollout_id,
                    error: progress.error.unwrap_or_else(|| "failed".into()),
                    at: received_at,
                }
            }
            // A device saying "succeeded" is progress, not success: an update succeeds only when
            // the device reports running the new version.
            DeviceMessage::OtaProgress(progress) => DeviceCommand::RecordFirmwareProgress {
                rollout_id: progress.rollout_id,
                state: progress.state,
                progress: progress.progress,
                at: received_at,
            },
        }
    }
}

#[cfg(test)]
mod tests;
