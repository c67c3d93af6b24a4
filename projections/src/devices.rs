//! The `devices` read model (registry and live state of each device) and `device_commands`
//! (every command sent to a device and how it ended), fed by the Device events.

use fleetlog_domain::device::{CommandOutcome, DeviceEvent};
use fleetlog_nats::EventEnvelope;
use serde_json::{json, Map, Value};
use sqlx::PgConnection;

use crate::worker::{Projection, ProjectionError};

/// Keeps `devices` and `device_commands`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevicesProjection;

impl Projection for DevicesProjection {
    const NAME: &'static str = "devices";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["devices", "device_commands"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        let event: DeviceEvent = serde_json::from_value(envelope.payload.clone())?;
        apply(connection, envelope, event).await?;
        Ok(())
    }
}

/// `UPDATE devices SET {assignments}, last_sequence = $2 WHERE device_id = $1`; the caller binds
/// its own values from `$3` on.
fn update(assignments: &str) -> String {
    format!("UPDATE devices SET {assignments}, last_sequence = $2 WHERE device_id = $1")
}

async fn apply(
    connection: &mut PgConnection,
    envelope: &EventEnvelope,
    event: DeviceEvent,
) -> Result<(), sqlx::Error> {
    let id = envelope.aggregate_id.as_str();
    let sequence = envelope.sequence;
    match event {
        DeviceEvent::DeviceRegistered {
            tenant,
            owner,
            name,
            model,
            tags,
            at,
            ..
        } => {
            sqlx::query(
                "INSERT INTO devices (device_id, tenant, owner, name, model, tags, lifecycle,
                                      registered_at, updated_at, last_sequence)
                 VALUES ($1, $3, $4, $5, $6, $7, 'active', $8, $8, $2)",
            )
            .bind(id)
            .bind(sequence)
            .bind(tenant.as_str())
            .bind(owner.as_str())
            .bind(name)
            .bind(model)
            .bind(tags)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::DeviceMetadataUpdated {
            name,
            model,
            tags,
            at,
        } => {
            sqlx::query(&update(
                "name = COALESCE($3, name), model = COALESCE($4, model),
                 tags = COALESCE($5, tags), updated_at = $6",
            ))
            .bind(id)
            .bind(sequence)
            .bind(name)
            .bind(model)
            .bind(tags)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::DeviceDecommissioned { at, .. } => {
            sqlx::query(&update(
                "lifecycle = 'decommissioned', online = false, updated_at = $3",
            ))
            .bind(id)
            .bind(sequence)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::TelemetryRecorded {
            readings,
            device_time,
            received_at,
            location,
            status,
            ..
        } => {
            let sensors: Map<String, Value> = readings
                .iter()
                .map(|r| {
                    let timestamp = r.timestamp.or(device_time).unwrap_or(received_at);
                    (
                        r.sensor.clone(),
                        json!({"value": r.value, "unit": r.unit, "timestamp": timestamp}),
                    )
                })
                .collect();
            let location =
                location.map(|l| json!({"latitude": l.latitude, "longitude": l.longitude}));
            sqlx::query(&update(
                "last_seen = $3, last_telemetry_at = $3, updated_at = $3,
                 sensors = sensors || $4, location = COALESCE($5, location),
                 reported = fleetlog_merge(reported, $6),
                 delta = fleetlog_delta(desired, fleetlog_merge(reported, $6))",
            ))
            .bind(id)
            .bind(sequence)
            .bind(received_at)
            .bind(Value::Object(sensors))
            .bind(location)
            .bind(Value::Object(status))
            .execute(connection)
            .await?;
        }
        DeviceEvent::StatusReported {
            status,
            received_at,
            ..
        } => {
            sqlx::query(&update(
                "last_seen = $3, updated_at = $3,
                 reported = fleetlog_merge(reported, $4),
                 delta = fleetlog_delta(desired, fleetlog_merge(reported, $4))",
            ))
            .bind(id)
            .bind(sequence)
            .bind(received_at)
            .bind(Value::Object(status))
            .execute(connection)
            .await?;
        }
        DeviceEvent::HeartbeatReceived { received_at, .. } => {
            sqlx::query(&update(
                "last_seen = $3, last_heartbeat = $3, updated_at = $3",
            ))
            .bind(id)
            .bind(sequence)
            .bind(received_at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::DeviceCameOnline { at } => {
            sqlx::query(&update(
                "online = true, offline_reason = NULL, updated_at = $3",
            ))
            .bind(id)
            .bind(sequence)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::DeviceWentOffline { reason, at } => {
            sqlx::query(&update(
                "online = false, offline_reason = $3, updated_at = $4",
            ))
            .bind(id)
            .bind(sequence)
            .bind(reason)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::DesiredPropertiesSet {
            properties,
            version,
            at,
        } => {
            sqlx::query(&update(
                "desired = fleetlog_merge(desired, $3), desired_version = $4, updated_at = $5,
                 delta = fleetlog_delta(fleetlog_merge(desired, $3), reported)",
            ))
            .bind(id)
            .bind(sequence)
            .bind(Value::Object(properties))
            .bind(version as i64)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::CommandIssued {
            command_id,
            name,
            params,
            issued_at,
            expires_at,
        } => {
            sqlx::query(
                "INSERT INTO device_commands
                   (device_id, command_id, name, params, status, issued_at, expires_at)
                 VALUES ($1, $2, $3, $4, 'pending', $5, $6)",
            )
            .bind(id)
            .bind(command_id.as_str())
            .bind(name)
            .bind(params)
            .bind(issued_at)
            .bind(expires_at)
            .execute(&mut *connection)
            .await?;
            sqlx::query(&update(
                "open_commands = open_commands + 1, updated_at = $3",
            ))
            .bind(id)
            .bind(sequence)
            .bind(issued_at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::CommandReplied {
            command_id,
            outcome,
            result,
            received_at,
        } => {
            let status = match outcome {
                CommandOutcome::Succeeded => "succeeded",
                CommandOutcome::Failed => "failed",
            };
            finish_command(
                connection,
                envelope,
                command_id.as_str(),
                status,
                Some(result),
                received_at,
            )
            .await?;
        }
        DeviceEvent::CommandExpired { command_id, at } => {
            finish_command(
                connection,
                envelope,
                command_id.as_str(),
                "expired",
                None,
                at,
            )
            .await?;
        }
        DeviceEvent::FirmwareUpdateRequested {
            rollout_id,
            firmware_id,
            version,
            at,
        } => {
            let update_state = json!({
                "rollout_id": rollout_id,
                "firmware_id": firmware_id,
                "version": version,
                "state": "requested",
                "progress": 0,
            });
            sqlx::query(&update("firmware_update = $3, updated_at = $4"))
                .bind(id)
                .bind(sequence)
                .bind(update_state)
                .bind(at)
                .execute(connection)
                .await?;
        }
        DeviceEvent::FirmwareUpdateProgressed {
            state,
            progress,
            at,
            ..
        } => {
            sqlx::query(&update(
                "firmware_update = firmware_update || jsonb_build_object('state', $3::text, 'progress', $4::int),
                 updated_at = $5",
            ))
            .bind(id)
            .bind(sequence)
            .bind(state)
            .bind(i32::from(progress))
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::FirmwareUpdateSucceeded { version, at, .. } => {
            sqlx::query(&update(
                "firmware_version = $3, firmware_update = NULL, updated_at = $4",
            ))
            .bind(id)
            .bind(sequence)
            .bind(version)
            .bind(at)
            .execute(connection)
            .await?;
        }
        DeviceEvent::FirmwareUpdateFailed { at, .. } => {
            sqlx::query(&update("firmware_update = NULL, updated_at = $3"))
                .bind(id)
                .bind(sequence)
                .bind(at)
                .execute(connection)
                .await?;
        }
        DeviceEvent::DeviceCredentialsRotated {
            credential_version,
            at,
            ..
        } => {
            sqlx::query(&update("credential_version = $3, updated_at = $4"))
                .bind(id)
                .bind(sequence)
                .bind(credential_version as i32)
                .bind(at)
                .execute(connection)
                .await?;
        }
    }
    Ok(())
}

async fn finish_command(
    connection: &mut PgConnection,
    envelope: &EventEnvelope,
    command_id: &str,
    status: &str,
    result: Option<Value>,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE device_commands SET status = $3, result = $4, finished_at = $5
          WHERE device_id = $1 AND command_id = $2",
    )
    .bind(&envelope.aggregate_id)
    .bind(command_id)
    .bind(status)
    .bind(result)
    .bind(at)
    .execute(&mut *connection)
    .await?;
    sqlx::query(&update(
        "open_commands = GREATEST(open_commands - 1, 0), updated_at = $3",
    ))
    .bind(&envelope.aggregate_id)
    .bind(envelope.sequence)
    .bind(at)
    .execute(connection)
    .await?;
    Ok(())
}
