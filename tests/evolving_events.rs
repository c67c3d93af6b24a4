//! Evolving events: the worked example of `docs/operations.md` ("Evolving events"), run for
//! real against Postgres.
//!
//! In the example, an earlier release stored `DeviceRegistered` as version 0.9: the model under
//! `hardware_model`, the tags as one comma-separated string. Today's version, 1.0, has `model`
//! and a sorted list of tags. The upcaster below is all it takes: the stored rows stay as they
//! are, and every reader sees today's shape: the write side deciding a command, a replay of
//! the read model, a history, and a consumer of the event stream.

use chrono::Utc;
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata, StoreSettings};
use fleetlog_domain::device::DeviceCommand;
use fleetlog_domain::upcast::Upcaster;
use fleetlog_eventlog::{Cursor, EventEnvelope, HistoryQuery};
use fleetlog_projections::{DeviceModels, DevicesProjection};
use fleetlog_testkit::TestDatabase;
use serde_json::{json, Value};
use sqlx::PgPool;

/// `DeviceRegistered` 0.9 → 1.0: `hardware_model` becomes `model`; `tags`, one
/// comma-separated string, becomes a sorted list without blanks or repeats.
fn device_registered_0_9_to_1_0(mut fields: Value) -> Result<Value, String> {
    let object = fields.as_object_mut().ok_or("not an object")?;
    let model = object.remove("hardware_model").ok_or("no hardware_model")?;
    object.insert("model".into(), model);
    let tags = match object.remove("tags") {
        None => Vec::new(),
        Some(Value::String(joined)) => {
            let mut tags: Vec<String> = joined
                .split(',')
                .map(str::trim)
                .filter(|tag| !tag.is_empty())
                .map(str::to_string)
                .collect();
            tags.sort();
            tags.dedup();
            tags
        }
        Some(other) => return Err(format!("tags: expected a string, found {other}")),
    };
    object.insert("tags".into(), json!(tags));
    Ok(fields)
}

inventory::submit! {
    Upcaster {
        aggregate_type: "device",
        event_type: "DeviceRegistered",
        from_version: "0.9",
        to_version: "1.0",
        upcast: device_registered_0_9_to_1_0,
    }
}

/// Stores `DeviceRegistered` for `device` as the earlier release did, tags as given.
async fn store_as_0_9(pool: &PgPool, device: &str, tags: Value) {
    let payload = json!({"DeviceRegistered": {
        "device_id": device,
        "tenant": "acme",
        "owner": "u-ada",
        "name": "boiler room",
        "hardware_model": "th-100",
        "tags": tags,
        "at": "2026-03-01T08:00:00Z",
    }});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('device', $1, 1, 'DeviceRegistered', '0.9', $2,
                 '{\"actor\": \"user:u-ada\", \"tenant\": \"acme\", \"correlation_id\": \"c-1\"}')",
    )
    .bind(device)
    .bind(payload)
    .execute(pool)
    .await
    .unwrap();
}

/// An error with its causes, as the CLI prints one: "what: why: root cause".
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn metadata() -> CommandMetadata {
    CommandMetadata::new("user:u-ada").with_tenant("acme".parse().unwrap())
}

#[tokio::test]
async fn events_stored_in_an_older_shape_are_read_in_todays_everywhere() {
    let db = TestDatabase::create().await;
    store_as_0_9(&db.pool, "legacy-1", json!("roof, heating,, roof")).await;

    // The write side: the aggregate loads the old event as today's and decides on it.
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let (model, tags) = bus
        .devices()
        .inspect("legacy-1", |device, _| {
            (device.model.clone(), device.tags.clone())
        })
        .await
        .unwrap();
    assert_eq!(model, "th-100");
    assert_eq!(tags, ["heating", "roof"]);
    bus.devices()
        .execute(
            "legacy-1",
            DeviceCommand::UpdateMetadata {
                name: Some("boiler room 2".into()),
                model: None,
                tags: None,
                at: Utc::now(),
            },
            &metadata(),
        )
        .await
        .unwrap();

    // The stored row is untouched: events are never rewritten.
    let (version, stored): (String, Value) = sqlx::query_as(
        "SELECT event_version, payload FROM events
          WHERE aggregate_id = 'legacy-1' AND sequence = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(version, "0.9");
    assert_eq!(stored["DeviceRegistered"]["tags"], "roof, heating,, roof");

    // A replay rebuilds the read model from the old event and today's, and equals it.
    fleetlog_projections::replay::replay(&DevicesProjection, &db.pool, |_| {})
        .await
        .unwrap();
    let (name, model, tags): (String, String, Vec<String>) =
        sqlx::query_as("SELECT name, model, tags FROM devices WHERE device_id = 'legacy-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (name.as_str(), model.as_str(), tags),
        (
            "boiler room 2",
            "th-100",
            vec!["heating".into(), "roof".into()]
        )
    );
    let verified = fleetlog_projections::replay::verify(
        &DevicesProjection,
        &db.pool,
        std::time::Duration::from_secs(5),
        |_| {},
    )
    .await
    .unwrap();
    assert!(
        verified.differences.is_empty(),
        "{:?}",
        verified.differences
    );

    // A history (the API's, a past view's) shows today's shape and says so.
    let history = fleetlog_eventlog::history(
        &db.pool,
        HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "legacy-1",
            after_sequence: 0,
            event_type: None,
            limit: 10,
        },
    )
    .await
    .unwrap();
    assert_eq!(history[0].event_version, "1.0");
    assert_eq!(
        history[0].payload.to_value().unwrap()["DeviceRegistered"]["tags"],
        json!(["heating", "roof"])
    );
    assert_eq!(
        history[0].payload.to_value().unwrap()["DeviceRegistered"]["model"],
        "th-100"
    );

    // The stream carries the event as stored; every consumer reads it as today's.
    let outgoing = fleetlog_eventlog::outgoing_page(&db.pool, Cursor::default(), 10)
        .await
        .unwrap();
    let body = outgoing[0].body().unwrap();
    let published: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(published["event_version"], "0.9");
    let consumed: EventEnvelope = serde_json::from_slice(&body).unwrap();
    assert_eq!(consumed.event_version, "1.0");
    assert_eq!(consumed.payload, history[0].payload);
}

#[tokio::test]
async fn a_stored_payload_its_upcaster_cannot_read_is_a_clear_error_and_changes_nothing() {
    let db = TestDatabase::create().await;
    store_as_0_9(&db.pool, "legacy-2", json!(42)).await;
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let refused = bus
        .devices()
        .execute(
            "legacy-2",
            DeviceCommand::UpdateMetadata {
                name: Some("renamed".into()),
                model: None,
                tags: None,
                at: Utc::now(),
            },
            &metadata(),
        )
        .await
        .unwrap_err();
    let message = match refused {
        CommandError::Store(error) => chain(&error),
        other => panic!("expected a store error, got {other:?}"),
    };
    assert!(
        message.contains("legacy-2")
            && message.contains("cannot upcast device DeviceRegistered from version 0.9")
            && message.contains("tags: expected a string, found 42"),
        "{message}"
    );
    let history = fleetlog_eventlog::history(
        &db.pool,
        HistoryQuery {
            aggregate_type: "device",
            aggregate_id: "legacy-2",
            after_sequence: 0,
            event_type: None,
            limit: 10,
        },
    )
    .await
    .unwrap_err();
    let history = chain(&history);
    assert!(history.contains("tags: expected a string"), "{history}");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = 'legacy-2'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(events, 1, "nothing appended after the refusal");
}
