//! The JetStream stream and its subjects.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use async_nats::jetstream::Context;
use fleetlog_domain::Plane;

/// The stream every event is published to.
pub const STREAM_NAME: &str = "FLEETLOG_EVENTS";
/// Every subject of the stream starts with this.
pub const SUBJECT_PREFIX: &str = "fleetlog.events";
/// The header that carries the event type, so consumers can route without parsing the body.
pub const EVENT_TYPE_HEADER: &str = "Fleetlog-Event-Type";

/// Retention and deduplication of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    /// How long events stay in the stream (zero: for ever). The events table keeps them all
    /// regardless; replay reads from there.
    pub max_age: Duration,
    /// How long the stream remembers a `Nats-Msg-Id` to drop a republished event.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

/// The subject token for an id. Device, tenant and rollout ids are already restricted to
/// `[A-Za-z0-9_-]`; firmware ids (`model@1.2.0`) hold `.`, the subject separator, which becomes
/// `_` (a semver version never holds `_`, so nothing collides). The envelope carries the id as
/// it is.
pub fn subject_token(id: &str) -> String {
    id.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' | '@' => c,
            _ => '_',
        })
        .collect()
}

/// `fleetlog.events.{aggregate_type}.{aggregate_id}.{plane}`, the plane (`data` or `control`,
/// see [`Plane`]) told by the event type: a consumer that needs only control events filters
/// the data plane out on the server instead of receiving every reading to skip it.
pub fn subject_for(aggregate_type: &str, aggregate_id: &str, event_type: &str) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.{}.{}",
        subject_token(aggregate_type),
        subject_token(aggregate_id),
        Plane::of(aggregate_type, event_type).as_str()
    )
}

/// `fleetlog.events.{aggregate_type}.>`: every event of one aggregate type, on both planes.
pub fn subject_filter_for_type(aggregate_type: &str) -> String {
    format!("{SUBJECT_PREFIX}.{}.>", subject_token(aggregate_type))
}

/// `fleetlog.events.{aggregate_type}.*.control`: the control events of one aggregate type.
pub fn control_subject_filter_for_type(aggregate_type: &str) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.*.{}",
        subject_token(aggregate_type),
        Plane::Control.as_str()
    )
}

/// `fleetlog.events.{aggregate_type}.{aggregate_id}.*`: every event of one aggregate.
pub fn subject_filter_for_aggregate(aggregate_type: &str, aggregate_id: &str) -> String {
    format!(
        "{SUBJECT_PREFIX}.{}.{}.*",
        subject_token(aggregate_type),
        subject_token(aggregate_id)
    )
}

fn stream_config(settings: &StreamSettings) -> Config {
    Config {
        name: STREAM_NAME.to_string(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        storage: StorageType::File,
        max_age: settings.max_age,
        duplicate_window: settings.duplicate_window,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates the stream, or brings an existing one to `settings`. Safe to call at every start.
pub async fn ensure_stream(
    jetstream: &Context,
    settings: &StreamSettings,
) -> Result<(), async_nats::Error> {
    let config = stream_config(settings);
    match jetstream.get_stream(STREAM_NAME).await {
        Ok(mut stream) => {
            let current = &stream.info().await?.config;
            let outdated = current.subjects != config.subjects
                || current.max_age != config.max_age
                || current.duplicate_window != config.duplicate_window;
            if outdated {
                jetstream.update_stream(config).await?;
            }
        }
        Err(_) => {
            jetstream.create_stream(config).await?;
        }
    }
    Ok(())
}

/// The stream that keeps dead letters: messages a projection or the ingest bridge gave up on,
/// with the reason, so nothing bad input brought is silently lost.
pub const DEAD_LETTER_STREAM: &str = "FLEETLOG_DEADLETTER";
/// Dead letters of `source` (a projection, or `ingest`) are published on
/// `fleetlog.deadletter.{source}`.
pub const DEAD_LETTER_PREFIX: &str = "fleetlog.deadletter";

/// How long a dead letter is kept: 30 days.
pub const DEAD_LETTER_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// The most the dead-letter stream holds: 1 GiB; the oldest letters go first past that, so
/// garbage sent for unknown devices can never fill the disk.
pub const DEAD_LETTER_MAX_BYTES: i64 = 1 << 30;

fn dead_letter_config() -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: DEAD_LETTER_STREAM.to_string(),
        subjects: vec![format!("{DEAD_LETTER_PREFIX}.>")],
        storage: async_nats::jetstream::stream::StorageType::File,
        max_age: DEAD_LETTER_MAX_AGE,
        max_bytes: DEAD_LETTER_MAX_BYTES,
        discard: async_nats::jetstream::stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates the dead-letter stream if it is missing, and gives one created by an earlier
/// version (with no limits at all) the limits above.
pub async fn ensure_dead_letter_stream(jetstream: &Context) -> Result<(), async_nats::Error> {
    let config = dead_letter_config();
    let mut stream = jetstream.get_or_create_stream(config.clone()).await?;
    let current = &stream.info().await?.config;
    // Only a stream without any limit (as earlier versions created it) is changed: limits an
    // operator set on purpose stay as they are.
    let unbounded = current.max_age.is_zero() && current.max_bytes < 0;
    if unbounded {
        let mut updated = current.clone();
        updated.max_age = config.max_age;
        updated.max_bytes = config.max_bytes;
        updated.discard = config.discard;
        jetstream.update_stream(updated).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_type_id_and_plane() {
        assert_eq!(
            subject_for("device", "dev-1", "TelemetryRecorded"),
            "fleetlog.events.device.dev-1.data"
        );
        assert_eq!(
            subject_for("device", "dev-1", "CommandIssued"),
            "fleetlog.events.device.dev-1.control"
        );
        assert_eq!(
            subject_for("firmware", "thermo@1.2.0-rc.1", "FirmwareUploaded"),
            "fleetlog.events.firmware.thermo@1_2_0-rc_1.control"
        );
        assert_eq!(
            subject_filter_for_type("device"),
            "fleetlog.events.device.>"
        );
        assert_eq!(
            control_subject_filter_for_type("device"),
            "fleetlog.events.device.*.control"
        );
        assert_eq!(
            subject_filter_for_aggregate("device", "dev-1"),
            "fleetlog.events.device.dev-1.*"
        );
    }
}
