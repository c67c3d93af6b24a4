//! The `telemetry` read model: every reading as a row of a time series.
//!
//! The projection keeps no positions ([`Positions::Keyed`]): each row carries the sequence of
//! the event it came from, and the unique index on `(device_id, sensor, time, sequence)` makes
//! applying an event again a no-op. Readings commute, so order does not matter either. This
//! spares the busiest projection a position write per event.

use fleetlog_domain::device::DeviceEvent;
use fleetlog_eventlog::EventEnvelope;
use sqlx::PgConnection;

use std::collections::HashSet;

use crate::devices::Recorded;
use crate::worker::{Positions, Projection, ProjectionError};

/// Keeps `telemetry`. Reads only `TelemetryRecorded`; other device events change nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryProjection;

impl Projection for TelemetryProjection {
    const NAME: &'static str = "telemetry";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["telemetry"];
    const POSITIONS: Positions = Positions::Keyed;
    const KEPT_INLINE: bool = true;
    const RETAINED: &'static [(&'static str, &'static str)] =
        &[("telemetry", crate::retention::WITHIN_RETENTION)];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(connection, &[envelope]).await
    }

    /// Every reading of every event in one INSERT; readings already there are skipped.
    async fn apply_batch(
        &self,
        connection: &mut PgConnection,
        envelopes: &[&EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let telemetry: Vec<&EventEnvelope> = envelopes
            .iter()
            .copied()
            .filter(|envelope| envelope.event_type == "TelemetryRecorded")
            .collect();
        let events = crate::devices::decode(&telemetry)?;
        insert_readings(
            connection,
            &crate::devices::recorded(&telemetry, &events),
            Repeats::Skipped,
        )
        .await
    }

    /// An event's readings are in when its first one is: they are written together. Events
    /// without readings leave nothing to wait for, and neither do readings behind the
    /// retention's horizon ([`crate::retention`]): the model no longer holds them, sweep or no
    /// sweep, so a reader waiting for them would wait in vain.
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
        } = envelope.payload.decode()?
        else {
            return Ok(true);
        };
        let Some(first) = readings.into_iter().next() else {
            return Ok(true);
        };
        let found = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM telemetry
                             WHERE device_id = $1 AND sensor = $2 AND time = $3 AND sequence = $4)
                 OR $3 < coalesce((SELECT kept_from FROM telemetry_retention), '-infinity')",
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

/// What [`insert_readings`] does with a reading the table holds already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeats {
    /// Skips it: for those who may apply an event again (replay's catch-up, past views, the
    /// careful way of the write side).
    Skipped,
    /// Cannot happen: each event is applied once, in the transaction that appends it (the
    /// write side's fast way). A plain insert, cheaper than `ON CONFLICT` by a third; a
    /// repeat fails the insert with a unique violation instead of passing unnoticed.
    Impossible,
}

/// Inserts the readings of the `TelemetryRecorded` events among `events` (others are left
/// alone), one row each. Two readings of one sensor at one instant in one event are one
/// reading: the first is kept.
pub(crate) async fn insert_readings(
    connection: &mut PgConnection,
    events: &[Recorded<'_>],
    repeats: Repeats,
) -> Result<(), ProjectionError> {
    let mut devices = Vec::new();
    let mut sequences = Vec::new();
    let mut sensors = Vec::new();
    let mut times = Vec::new();
    let mut values = Vec::new();
    let mut units = Vec::new();
    for recorded in events {
        let DeviceEvent::TelemetryRecorded {
            readings,
            device_time,
            received_at,
            ..
        } = recorded.event
        else {
            continue;
        };
        let mut in_this_event = HashSet::with_capacity(readings.len());
        for reading in readings {
            // The most precise time known: the reading's, the message's, or its arrival.
            let time = reading.timestamp.or(*device_time).unwrap_or(*received_at);
            // Postgres keeps microseconds: two instants apart by less are one there.
            let key = (reading.sensor.as_str(), time.timestamp_micros());
            if !in_this_event.insert(key) {
                continue;
            }
            devices.push(recorded.id);
            sequences.push(recorded.sequence);
            times.push(time);
            sensors.push(reading.sensor.as_str());
            values.push(reading.value);
            units.push(reading.unit.as_deref());
        }
    }
    if devices.is_empty() {
        return Ok(());
    }
    let statement = match repeats {
        Repeats::Skipped => {
            "INSERT INTO telemetry (device_id, sensor, time, value, unit, sequence)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[],
                                  $5::text[], $6::bigint[])
             ON CONFLICT DO NOTHING"
        }
        Repeats::Impossible => {
            "INSERT INTO telemetry (device_id, sensor, time, value, unit, sequence)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[],
                                  $5::text[], $6::bigint[])"
        }
    };
    sqlx::query(statement)
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
