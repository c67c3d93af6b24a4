//! The `telemetry` read model: every reading as a row of a time series.

use fleetlog_domain::device::DeviceEvent;
use fleetlog_nats::EventEnvelope;
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
        if envelope.event_type != "TelemetryRecorded" {
            return Ok(());
        }
        let DeviceEvent::TelemetryRecorded {
            readings,
            device_time,
            received_at,
            ..
        } = serde_json::from_value(envelope.payload.clone())?
        else {
            return Ok(());
        };
        if readings.is_empty() {
            return Ok(());
        }
        let mut sensors = Vec::with_capacity(readings.len());
        let mut times = Vec::with_capacity(readings.len());
        let mut values = Vec::with_capacity(readings.len());
        let mut units = Vec::with_capacity(readings.len());
        for reading in readings {
            // The most precise time known: the reading's, the message's, or its arrival.
            times.push(reading.timestamp.or(device_time).unwrap_or(received_at));
            sensors.push(reading.sensor);
            values.push(reading.value);
            units.push(reading.unit);
        }
        sqlx::query(
            "INSERT INTO telemetry (device_id, sensor, time, value, unit)
             SELECT $1, * FROM UNNEST($2::text[], $3::timestamptz[], $4::float8[], $5::text[])",
        )
        .bind(&envelope.aggregate_id)
        .bind(sensors)
        .bind(times)
        .bind(values)
        .bind(units)
        .execute(connection)
        .await?;
        Ok(())
    }
}
