//! The `telemetry` read model: every reading as a row of a time series.
//!
//! The projection keeps no positions ([`Positions::Keyed`]): each row carries the sequence of
//! the event it came from, and the unique index on `(device_id, sensor, time, sequence)` makes
//! applying an event again a no-op. Readings commute, so order does not matter either. This
//! spares the busiest projection a position write per event.

use fleetlog_domain::device::DeviceEvent;
use fleetlog_eventlog::EventEnvelope;
use serde::Deserialize;
use sqlx::PgConnection;

use crate::worker::{Positions, Projection, ProjectionError};

/// Keeps `telemetry`. Reads only `TelemetryRecorded`; other device events change nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryProjection;

impl Projection for TelemetryProjection {
    const NAME: &'static str = "telemetry";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["telemetry"];
    const POSITIONS: Positions = Positions::Keyed;

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(connection, &[envelope]).await
    }

    /// Every reading of every event in one INSERT; readings already there are skipped. Two
    /// readings of one sensor at one instant in one event are one reading: the first is kept.
    async fn apply_batch(
        &self,
        connection: &mut PgConnection,
        envelopes: &[&EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut devices = Vec::new();
        let mut sequences = Vec::new();
        let mut sensors = Vec::new();
        let mut times = Vec::new();
        let mut values = Vec::new();
        let mut units = Vec::new();
        for envelope in envelopes {
            if envelope.event_type != "TelemetryRecorded" {
                continue;
            }
            let DeviceEvent::TelemetryRecorded {
                readings,
                device_time,
                received_at,
                ..
            } = Deserialize::deserialize(&envelope.payload)?
            else {
                continue;
            };
            for reading in readings {
                devices.push(envelope.aggregate_id.as_str());
                sequences.push(envelope.sequence);
                // The most precise time known: the reading's, the message's, or its arrival.
                times.push(reading.timestamp.or(device_time).unwrap_or(received_at));
                sensors.push(reading.sensor);
                values.push(reading.value);
                units.push(reading.unit);
            }
        }
        if devices.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO telemetry (device_id, sensor, time, value, unit, sequence)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[],
                                  $5::text[], $6::bigint[])
             ON CONFLICT DO NOTHING",
        )
        .bind(devices)
        .bind(sensors)
        .bind(times)
        .bind(values)
        .bind(units)
        .bind(sequences)
        .execute(connection)
        .await?;
        Ok(())
    }

    /// An event's readings are in when its first one is: they are written together. Events
    /// without readings leave nothing to wait for.
    async fn contains(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<bool, ProjectionError> {
        if envelope.event_type != "TelemetryRecorded" {
            return Ok(true);
        }
        let DeviceEvent::TelemetryRecorded {
            readings,
            device_time,
            received_at,
            ..
        } = Deserialize::deserialize(&envelope.payload)?
        else {
            return Ok(true);
        };
        let Some(first) = readings.into_iter().next() else {
            return Ok(true);
        };
        let found = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM telemetry
                             WHERE device_id = $1 AND sensor = $2 AND time = $3 AND sequence = $4)",
        )
        .bind(&envelope.aggregate_id)
        .bind(first.sensor)
        .bind(first.timestamp.or(device_time).unwrap_or(received_at))
        .bind(envelope.sequence)
        .fetch_one(connection)
        .await?;
        Ok(found)
    }
}
