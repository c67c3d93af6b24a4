//! A recorded event: the row of the events table, and the body of every message on
//! `FLEETLOG_EVENTS`.
//!
//! ```json
//! {
//!   "aggregate_type": "device",
//!   "aggregate_id": "dev-1",
//!   "sequence": 7,
//!   "global_position": 1042,
//!   "event_type": "TelemetryRecorded",
//!   "event_version": "1.0",
//!   "payload": {"TelemetryRecorded": {"digest": "…", "readings": [], "received_at": "…"}},
//!   "metadata": {"actor": "device:dev-1", "correlation_id": "…", "tenant": "acme"},
//!   "recorded_at": "2026-11-23T10:00:00.123456Z"
//! }
//! ```
//!
//! `sequence` counts the events of one aggregate from 1 without gaps: a consumer that applied
//! sequence n of an aggregate expects n + 1 next. `global_position` orders all events by
//! insertion (not commit) and is unique. Headers: `Nats-Msg-Id` =
//! `{aggregate_type}:{aggregate_id}:{sequence}`, `Fleetlog-Event-Type` = `event_type`, and,
//! for an event stored in a sampled trace, `traceparent` (and `tracestate`): the W3C trace
//! context the metadata carries, as the relay's publish passes it on (see `fleetlog-trace`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use sqlx::types::Json;

use crate::{Cursor, Payload};

/// One recorded event, as read from the table and as published to JetStream.
///
/// Read from either (as a row or as JSON), the payload comes in today's shape and
/// `event_version` says so: a payload stored in an older shape goes through its upcasters on
/// the way in ([`fleetlog_domain::upcast`]). Written out, it is what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AsStored")]
pub struct EventEnvelope {
    /// `device`, `firmware`, `rollout` or `user`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The event's number within its aggregate, from 1, without gaps.
    pub sequence: i64,
    /// The event's insertion position over all aggregates.
    pub global_position: i64,
    /// The event's type, e.g. `DeviceRegistered`.
    pub event_type: String,
    /// The version of the event's shape.
    pub event_version: String,
    /// The event itself, as the aggregate serialized it.
    pub payload: Payload,
    /// Who caused it: actor, tenant, correlation, causation and request ids.
    pub metadata: Value,
    /// When it was stored.
    pub recorded_at: DateTime<Utc>,
}

/// An [`EventEnvelope`] as stored (or published): the payload in the shape of its day.
#[derive(Deserialize, sqlx::FromRow)]
struct AsStored {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    global_position: i64,
    event_type: String,
    event_version: String,
    payload: Payload,
    metadata: Value,
    recorded_at: DateTime<Utc>,
}

impl TryFrom<AsStored> for EventEnvelope {
    type Error = fleetlog_domain::upcast::UpcastError;

    fn try_from(stored: AsStored) -> Result<Self, Self::Error> {
        let AsStored {
            aggregate_type,
            aggregate_id,
            sequence,
            global_position,
            event_type,
            mut event_version,
            mut payload,
            metadata,
            recorded_at,
        } = stored;
        if fleetlog_domain::upcast::applies(&aggregate_type, &event_type, &event_version) {
            let unreadable =
                |version: &str, error: serde_json::Error| fleetlog_domain::upcast::UpcastError {
                    aggregate_type: aggregate_type.clone(),
                    event_type: event_type.clone(),
                    version: version.to_string(),
                    reason: error.to_string(),
                };
            let mut value = payload
                .to_value()
                .map_err(|error| unreadable(&event_version, error))?;
            fleetlog_domain::upcast::upcast(
                &aggregate_type,
                &event_type,
                &mut event_version,
                &mut value,
            )?;
            payload = Payload::of(&value).map_err(|error| unreadable(&event_version, error))?;
        }
        Ok(Self {
            aggregate_type,
            aggregate_id,
            sequence,
            global_position,
            event_type,
            event_version,
            payload,
            metadata,
            recorded_at,
        })
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for EventEnvelope {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        AsStored::from_row(row)?
            .try_into()
            .map_err(|error| sqlx::Error::Decode(Box::new(error)))
    }
}

/// An event with its place in commit-safe order, for those who tail the table (a replay).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredEvent {
    /// The inserting transaction, as Postgres prints an `xid8`. Selected as
    /// `transaction_id::text AS transaction_text`: an output column named `transaction_id`
    /// would capture a bare `ORDER BY transaction_id`, which would then sort as text.
    #[sqlx(rename = "transaction_text")]
    pub transaction_id: String,
    /// The event.
    #[sqlx(flatten)]
    pub envelope: EventEnvelope,
}

impl StoredEvent {
    /// The event's place in commit-safe order.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            // Postgres prints xid8 as a plain unsigned integer.
            transaction_id: self.transaction_id.parse().unwrap_or_default(),
            global_position: self.envelope.global_position,
        }
    }
}

/// The events whose payload holds secret material, and the fields that hold it: the hash of a
/// device's or a provisioning key's secret and the salt it derives from with the platform's
/// credential key, a user's password hash, a session's refresh-token hash. The aggregates need
/// them; no reader of a history or of the event stream does.
const SECRET_FIELDS: &[(&str, &str)] = &[
    ("DeviceCredentialsRotated", "secret_hash"),
    ("DeviceCredentialsRotated", "salt"),
    ("ProvisioningKeyCreated", "secret_hash"),
    ("ProvisioningKeyCreated", "salt"),
    ("UserRegistered", "password_hash"),
    ("PasswordChanged", "password_hash"),
    ("SessionOpened", "refresh_token_hash"),
    ("SessionRotated", "refresh_token_hash"),
];

/// Whether events of `event_type` hold secret material.
fn holds_secrets(event_type: &str) -> bool {
    SECRET_FIELDS.iter().any(|(kind, _)| *kind == event_type)
}

/// Removes the secret fields from the payload of an event of `event_type`.
fn redact(event_type: &str, payload: &mut Value) {
    for (kind, field) in SECRET_FIELDS {
        if *kind == event_type {
            if let Some(fields) = payload.get_mut(*kind).and_then(Value::as_object_mut) {
                fields.remove(*field);
            }
        }
    }
}

impl EventEnvelope {
    /// Removes what no history or stream shows anyone: the hash of a device's secret, which its
    /// logins are checked against. The aggregate needs it; no reader does.
    pub fn redact_secrets(&mut self) {
        if !holds_secrets(&self.event_type) {
            return;
        }
        // A payload that cannot be read as a value shows nothing, rather than its secrets.
        self.payload = self
            .payload
            .to_value()
            .ok()
            .and_then(|mut payload| {
                redact(&self.event_type, &mut payload);
                Payload::of(&payload).ok()
            })
            .unwrap_or_else(Payload::null);
    }

    /// The `Nats-Msg-Id` of the event: unique per event, stable across republishing.
    pub fn message_id(&self) -> String {
        format!(
            "{}:{}:{}",
            self.aggregate_type, self.aggregate_id, self.sequence
        )
    }
}

/// An event as the relay reads and forwards it. Payload and metadata stay the JSON text the
/// events table holds and go into the message body as they are, instead of being parsed into
/// values and printed again for every event. The body reads as an [`EventEnvelope`].
#[derive(Debug, sqlx::FromRow)]
pub struct OutgoingEvent {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    /// The event's insertion position over all aggregates.
    pub global_position: i64,
    /// The event's type, e.g. `DeviceRegistered`.
    pub event_type: String,
    event_version: String,
    payload: Json<Box<RawValue>>,
    metadata: Json<Box<RawValue>>,
    recorded_at: DateTime<Utc>,
    /// See [`StoredEvent::transaction_id`].
    #[sqlx(rename = "transaction_text")]
    transaction_id: String,
}

/// The body of an [`OutgoingEvent`]: the fields of [`EventEnvelope`], in its order.
#[derive(Serialize)]
struct OutgoingBody<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    sequence: i64,
    global_position: i64,
    event_type: &'a str,
    event_version: &'a str,
    payload: &'a RawValue,
    metadata: &'a RawValue,
    recorded_at: DateTime<Utc>,
}

impl OutgoingEvent {
    /// The event's place in commit-safe order.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            // Postgres prints xid8 as a plain unsigned integer.
            transaction_id: self.transaction_id.parse().unwrap_or_default(),
            global_position: self.global_position,
        }
    }

    /// The metadata as the table holds it (JSON text): who caused the event, and the trace
    /// context when the command was traced.
    pub fn metadata_json(&self) -> &str {
        self.metadata.get()
    }

    /// The JetStream subject's parts: aggregate type and id.
    pub fn aggregate(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }

    /// The `Nats-Msg-Id` of the event, as [`EventEnvelope::message_id`].
    pub fn message_id(&self) -> String {
        format!(
            "{}:{}:{}",
            self.aggregate_type, self.aggregate_id, self.sequence
        )
    }

    /// The message body: the event envelope as JSON, without its secrets (see
    /// [`EventEnvelope::redact_secrets`]): every user of the stream, third-party readers
    /// included, sees events as a history shows them.
    pub fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        let redacted;
        let payload: &RawValue = if holds_secrets(&self.event_type) {
            let mut payload: Value = serde_json::from_str(self.payload.get())?;
            redact(&self.event_type, &mut payload);
            redacted = serde_json::value::to_raw_value(&payload)?;
            &redacted
        } else {
            &self.payload
        };
        serde_json::to_vec(&OutgoingBody {
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence,
            global_position: self.global_position,
            event_type: &self.event_type,
            event_version: &self.event_version,
            payload,
            metadata: &self.metadata,
            recorded_at: self.recorded_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use fleetlog_domain::device::DeviceEvent;
    use serde_json::json;

    use super::*;

    fn envelope_of(event: &DeviceEvent) -> EventEnvelope {
        EventEnvelope {
            aggregate_type: "device".into(),
            aggregate_id: "dev-1".into(),
            sequence: 1,
            global_position: 1,
            event_type: cqrs_es::DomainEvent::event_type(event),
            event_version: "1.0".into(),
            payload: Payload::of(event).unwrap(),
            metadata: json!({}),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn the_hash_of_a_device_secret_never_leaves_in_a_history() {
        let rotated = DeviceEvent::DeviceCredentialsRotated {
            secret_hash: "ab".repeat(32),
            credential_version: 2,
            salt: Some("cd".repeat(16)),
            reason: Some("rotated by an operator".into()),
            at: Utc::now(),
        };
        let mut envelope = envelope_of(&rotated);
        envelope.redact_secrets();
        let payload = envelope.payload.to_value().unwrap();
        let fields = &payload["DeviceCredentialsRotated"];
        assert!(fields.get("secret_hash").is_none());
        assert!(fields.get("salt").is_none());
        assert_eq!(fields["credential_version"], 2);
        assert_eq!(fields["reason"], "rotated by an operator");

        // Other events are left as they are.
        let other = DeviceEvent::FirmwareVersionReported {
            version: "1.2.3".into(),
            at: Utc::now(),
        };
        let mut envelope = envelope_of(&other);
        let before = envelope.payload.clone();
        envelope.redact_secrets();
        assert_eq!(envelope.payload, before);
    }
}
