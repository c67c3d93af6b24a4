//! The `telemetry` read model: every reading as a row of a time series.

use fleetlog_domain::device::DeviceEvent;
use fleetlog_nats::EventEnvelope;
use serde::Deserialize;
use sqlx::PgConnection;

use crate::worker::{Projection, ProjectionError};

/// Keeps `telemetry`. Reads only `TelemetryRecorded`; other device events just move its
/// position.
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryProjection;

impl Projection for TelemetryProjection {
    const NAME: &'static str = "telemetry";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["telemetry"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        self.apply_batch(connection, &[envelope]).await
    }

    /// Every reading of every event in one INSERT.
    async fn apply_batch(
        &self,
        connection: &mut PgConnection,
        envelopes: &[&EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let mut devices = Vec::new();
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
            "INSERT INTO telemetry (device_id, sensor, time, value, unit)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::float8[], $5::text[])",
        )
        .bind(devices)
        .bind(sensors)
        .bind(times)
        .bind(values)
        .bind(units)
        .execute(connection)
        .await?;
        Ok(())
    }
}
