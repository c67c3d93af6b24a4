//! The `devices` read model (registry and live state of each device) and `device_commands`
//! (every command sent to a device and how it ended), fed by the Device events.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use fleetlog_domain::device::{compose_patches, CommandOutcome, DeviceEvent, PROGRESS_STATES};
use fleetlog_eventlog::EventEnvelope;
use serde_json::{json, Map, Value};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use crate::worker::{OwnPositions, Positions, Projection, ProjectionError};

/// Keeps `devices` and `device_commands`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevicesProjection;

impl Projection for DevicesProjection {
    const NAME: &'static str = "devices";
    const AGGREGATE_TYPE: &'static str = "device";
    const TABLES: &'static [&'static str] = &["devices", "device_commands"];
    /// Every event of a device sets `devices.last_sequence` (registration creates the row), so
    /// it is the projection's position.
    const POSITIONS: Positions = Positions::Own(OwnPositions {
        table: "devices",
        id_column: "device_id",
        sequence_column: "last_sequence",
    });
    const KEPT_INLINE: bool = true;

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        // One way to apply telemetry, status and heartbeats, live or in replay.
        self.apply_batch(connection, &[envelope]).await
    }

    async fn apply_batch(
        &self,
        connection: &mut PgConnection,
        envelopes: &[&EventEnvelope],
    ) -> Result<(), ProjectionError> {
        let events = decode(envelopes)?;
        apply_recorded(connection, &recorded(envelopes, &events)).await
    }
}

/// A Device event with its place: as the write side appended it, or as read back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recorded<'a> {
    /// The device.
    pub id: &'a str,
    /// The event's sequence.
    pub sequence: i64,
    /// The event.
    pub event: &'a DeviceEvent,
}

/// The Device events of `envelopes`, in order.
pub(crate) fn decode(envelopes: &[&EventEnvelope]) -> Result<Vec<DeviceEvent>, ProjectionError> {
    envelopes
        .iter()
        .map(|envelope| Ok(envelope.payload.decode::<DeviceEvent>()?))
        .collect()
}

/// `envelopes` with their decoded `events`, side by side.
pub(crate) fn recorded<'a>(
    envelopes: &[&'a EventEnvelope],
    events: &'a [DeviceEvent],
) -> Vec<Recorded<'a>> {
    envelopes
        .iter()
        .zip(events)
        .map(|(envelope, event)| Recorded {
            id: &envelope.aggregate_id,
            sequence: envelope.sequence,
            event,
        })
        .collect()
}

/// Applies `events` (each the next of its device) to `devices` and `device_commands`. The
/// frequent events (telemetry, status, heartbeat) of each device are folded into one change,
/// and the changes of all devices written by one UPDATE; any other event is applied on its
/// own, after its device's folded change. Every write is compare-and-set on
/// `last_sequence`: anything but the next event of its device fails with
/// [`ProjectionError::PositionMoved`].
pub(crate) async fn apply_recorded(
    connection: &mut PgConnection,
    events: &[Recorded<'_>],
) -> Result<(), ProjectionError> {
    let mut live: HashMap<&str, LiveChange> = HashMap::new();
    for recorded in events {
        match recorded.event {
            DeviceEvent::TelemetryRecorded { .. }
            | DeviceEvent::StatusReported { .. }
            | DeviceEvent::HeartbeatReceived { .. } => {
                live.entry(recorded.id)
                    .or_default()
                    .absorb(recorded.sequence, recorded.event);
            }
            other => {
                if let Some(change) = live.remove(recorded.id) {
                    write_live_changes(connection, vec![(recorded.id, change)]).await?;
                }
                apply(connection, recorded.id, recorded.sequence, other).await?;
            }
        }
    }
    write_live_changes(connection, live.into_iter().collect()).await?;
    Ok(())
}

/// How far ahead of its arrival a reading's own timestamp may be and still become the
/// sensor's latest value: 5 minutes of clock drift.
pub const MAX_READING_LEAD: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Telemetry, status and heartbeats of one device, folded in order. Merge patches of the
/// reported document compose into one where a single patch can say both, else follow each
/// other in a list applied in order, so the fold equals applying them one by one.
#[derive(Default)]
struct LiveChange {
    /// The sequence of the first event folded in: the row must stand just before it.
    first_sequence: Option<i64>,
    sequence: i64,
    last_seen: Option<DateTime<Utc>>,
    last_telemetry_at: Option<DateTime<Utc>>,
    last_heartbeat: Option<DateTime<Utc>>,
    sensors: HashMap<String, LatestReading>,
    location: Option<Value>,
    reported: Vec<Map<String, Value>>,
}

/// A sensor's latest reading, as `devices.sensors` holds it.
#[derive(Debug, Clone, serde::Serialize)]
struct LatestReading {
    value: f64,
    unit: Option<String>,
    timestamp: DateTime<Utc>,
}

impl LiveChange {
    fn absorb(&mut self, sequence: i64, event: &DeviceEvent) {
        self.first_sequence.get_or_insert(sequence);
        self.sequence = sequence;
        match event {
            DeviceEvent::TelemetryRecorded {
                readings,
                device_time,
                received_at,
                location,
                status,
                ..
            } => {
                // Of two readings of one sensor at one instant in one event (stored before
                // ingest dropped the second), the first counts, as in the `telemetry` history.
                let mut in_this_event = std::collections::HashSet::new();
                for reading in readings {
                    let timestamp = reading.timestamp.or(*device_time).unwrap_or(*received_at);
                    if !in_this_event.insert((reading.sensor.as_str(), timestamp)) {
                        continue;
                    }
                    // The latest reading is the newest by reading time; one stamped further
                    // ahead of its arrival than a clock may drift is kept in the history only.
                    if timestamp > *received_at + MAX_READING_LEAD {
                        continue;
                    }
                    let newer = self.sensors.get(&reading.sensor).is_none_or(|held| {
                        postgres_micros(timestamp) >= postgres_micros(held.timestamp)
                    });
                    if newer {
                        self.sensors.insert(
                            reading.sensor.clone(),
                            LatestReading {
                                value: reading.value,
                                unit: reading.unit.clone(),
                                timestamp,
                            },
                        );
                    }
                }
                if let Some(l) = location {
                    self.location = Some(json!({"latitude": l.latitude, "longitude": l.longitude}));
                }
                self.report(status);
                self.last_seen = Some(*received_at);
                self.last_telemetry_at = Some(*received_at);
            }
            DeviceEvent::StatusReported {
                status,
                received_at,
                ..
            } => {
                self.report(status);
                self.last_seen = Some(*received_at);
            }
            DeviceEvent::HeartbeatReceived { received_at, .. } => {
                self.last_seen = Some(*received_at);
                self.last_heartbeat = Some(*received_at);
            }
            _ => {}
        }
    }

    fn report(&mut self, status: &Map<String, Value>) {
        if status.is_empty() {
            return;
        }
        let composed = self
            .reported
            .last_mut()
            .is_some_and(|last| compose_patches(last, status));
        if !composed {
            self.reported.push(status.clone());
        }
    }

    /// The latest readings as `devices.sensors` holds them, and the oldest and newest of their
    /// timestamps, written as in the document: Postgres reads both the same way (to the
    /// microsecond), so the fast merge and `fleetlog_newer_readings` decide alike.
    fn sensors(&self) -> (Value, Option<String>, Option<String>) {
        let stamp = |timestamp: DateTime<Utc>| match serde_json::to_value(timestamp) {
            Ok(Value::String(text)) => Some(text),
            _ => None,
        };
        let oldest = self
            .sensors
            .values()
            .map(|r| r.timestamp)
            .min_by_key(|t| postgres_micros(*t));
        let newest = self
            .sensors
            .values()
            .map(|r| r.timestamp)
            .max_by_key(|t| postgres_micros(*t));
        let document = serde_json::to_value(&self.sensors).unwrap_or_else(|_| json!({}));
        (document, oldest.and_then(stamp), newest.and_then(stamp))
    }
}

/// `timestamp` in microseconds since the epoch, as Postgres reads it from the text a document
/// holds (`(value ->> 'timestamp')::timestamptz`): the fraction of a second parsed as a double
/// and rounded to the microsecond, half to even. Readings are compared at this precision in
/// the fold and in SQL alike, so however events are batched (an ingest round, a replay page,
/// one by one) the same reading is the latest. The double of `nanos / 1e9` is the one `strtod`
/// makes of the same digits: both round the same number correctly.
pub fn postgres_micros(timestamp: DateTime<Utc>) -> i64 {
    let fraction = f64::from(timestamp.timestamp_subsec_nanos()) / 1e9;
    timestamp.timestamp() * 1_000_000 + (fraction * 1e6).round_ties_even() as i64
}

/// Writes the folded changes of many devices in one UPDATE, compare-and-set: each row only if
/// it stands just before its change's first event.
async fn write_live_changes(
    connection: &mut PgConnection,
    changes: Vec<(&str, LiveChange)>,
) -> Result<(), ProjectionError> {
    if changes.is_empty() {
        return Ok(());
    }
    let expected_rows = changes.len() as u64;
    let mut ids = Vec::with_capacity(changes.len());
    let mut previous = Vec::with_capacity(changes.len());
    let mut sequences = Vec::with_capacity(changes.len());
    let mut last_seen = Vec::with_capacity(changes.len());
    let mut last_telemetry = Vec::with_capacity(changes.len());
    let mut last_heartbeat = Vec::with_capacity(changes.len());
    let mut sensors = Vec::with_capacity(changes.len());
    let mut oldest_readings = Vec::with_capacity(changes.len());
    let mut newest_readings = Vec::with_capacity(changes.len());
    let mut locations = Vec::with_capacity(changes.len());
    let mut reported = Vec::with_capacity(changes.len());
    for (id, change) in changes {
        ids.push(id);
        previous.push(change.first_sequence.unwrap_or(change.sequence) - 1);
        sequences.push(change.sequence);
        last_seen.push(change.last_seen);
        last_telemetry.push(change.last_telemetry_at);
        last_heartbeat.push(change.last_heartbeat);
        let (readings, oldest, newest) = change.sensors();
        sensors.push(readings);
        oldest_readings.push(oldest);
        newest_readings.push(newest);
        locations.push(change.location);
        reported.push(Value::Array(
            change.reported.into_iter().map(Value::Object).collect(),
        ));
    }
    let done = sqlx::query(
        "UPDATE devices d
            SET last_seen = u.last_seen, updated_at = u.last_seen,
                last_telemetry_at = COALESCE(u.last_telemetry_at, d.last_telemetry_at),
                last_heartbeat = COALESCE(u.last_heartbeat, d.last_heartbeat),
                sensors = CASE
                    WHEN u.oldest_reading IS NULL THEN d.sensors
                    WHEN d.sensors_newest_at IS NULL
                      OR u.oldest_reading::timestamptz >= d.sensors_newest_at
                    THEN d.sensors || u.sensors
                    ELSE fleetlog_newer_readings(d.sensors, u.sensors) END,
                sensors_newest_at = GREATEST(d.sensors_newest_at, u.newest_reading::timestamptz),
                location = COALESCE(u.location, d.location),
                reported = CASE WHEN u.reported = '[]' THEN d.reported
                                ELSE fleetlog_merge_each(d.reported, u.reported) END,
                delta = CASE WHEN u.reported = '[]' THEN d.delta
                             ELSE fleetlog_delta(d.desired, fleetlog_merge_each(d.reported, u.reported)) END,
                last_sequence = u.sequence
           FROM UNNEST($1::text[], $2::bigint[], $3::timestamptz[], $4::timestamptz[],
                       $5::timestamptz[], $6::jsonb[], $7::jsonb[], $8::jsonb[], $9::bigint[],
                       $10::text[], $11::text[])
                AS u(id, sequence, last_seen, last_telemetry_at, last_heartbeat, sensors,
                     location, reported, previous, oldest_reading, newest_reading)
          WHERE d.device_id = u.id AND d.last_sequence = u.previous",
    )
    .bind(ids)
    .bind(sequences)
    .bind(last_seen)
    .bind(last_telemetry)
    .bind(last_heartbeat)
    .bind(sensors)
    .bind(locations)
    .bind(reported)
    .bind(previous)
    .bind(oldest_readings)
    .bind(newest_readings)
    .execute(connection)
    .await?;
    if done.rows_affected() == expected_rows {
        Ok(())
    } else {
        Err(ProjectionError::PositionMoved)
    }
}

/// `UPDATE devices SET {assignments}, last_sequence = $2 WHERE device_id = $1`; the caller binds
/// its own values from `$3` on.
///
/// Compare-and-set, as [`Positions::Own`] requires: the row changes only if it stood at the
/// event's sequence - 1; run it with [`update_row`].
fn update(assignments: &str) -> String {
    format!(
        "UPDATE devices SET {assignments}, last_sequence = $2
          WHERE device_id = $1 AND last_sequence = $2 - 1"
    )
}

/// Runs an [`update`]: anything but one row changed means the position was not where the
/// batch was judged against (another worker or a replay moved it).
async fn update_row(
    query: Query<'_, Postgres, PgArguments>,
    connection: &mut PgConnection,
) -> Result<(), ProjectionError> {
    if query.execute(connection).await?.rows_affected() == 1 {
        Ok(())
    } else {
        Err(ProjectionError::PositionMoved)
    }
}

async fn apply(
    connection: &mut PgConnection,
    id: &str,
    sequence: i64,
    event: &DeviceEvent,
) -> Result<(), ProjectionError> {
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
            update_row(
                sqlx::query(&update(
                    "name = COALESCE($3, name), model = COALESCE($4, model),
                 tags = COALESCE($5, tags), updated_at = $6",
                ))
                .bind(id)
                .bind(sequence)
                .bind(name)
                .bind(model)
                .bind(tags)
                .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::DeviceDecommissioned { at, .. } => {
            update_row(
                sqlx::query(&update(
                    "lifecycle = 'decommissioned', online = false, updated_at = $3",
                ))
                .bind(id)
                .bind(sequence)
                .bind(at),
                connection,
            )
            .await?;
        }
        // Folded by `apply_batch` (`LiveChange`), never applied one by one.
        DeviceEvent::TelemetryRecorded { .. }
        | DeviceEvent::StatusReported { .. }
        | DeviceEvent::HeartbeatReceived { .. } => {}
        DeviceEvent::DeviceCameOnline { at } => {
            update_row(
                sqlx::query(&update(
                    "online = true, offline_reason = NULL, updated_at = $3",
                ))
                .bind(id)
                .bind(sequence)
                .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::DeviceWentOffline { reason, at } => {
            update_row(
                sqlx::query(&update(
                    "online = false, offline_reason = $3, updated_at = $4",
                ))
                .bind(id)
                .bind(sequence)
                .bind(reason)
                .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::DesiredPropertiesSet {
            properties,
            version,
            at,
        } => {
            update_row(
                sqlx::query(&update(
                    "desired = fleetlog_merge(desired, $3), desired_version = $4, updated_at = $5,
                 delta = fleetlog_delta(fleetlog_merge(desired, $3), reported)",
                ))
                .bind(id)
                .bind(sequence)
                .bind(Value::Object(properties.clone()))
                .bind(*version as i64)
                .bind(at),
                connection,
            )
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
            update_row(
                sqlx::query(&update(
                    "open_commands = open_commands + 1, updated_at = $3",
                ))
                .bind(id)
                .bind(sequence)
                .bind(issued_at),
                connection,
            )
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
                id,
                sequence,
                command_id.as_str(),
                status,
                Some(result.clone()),
                *received_at,
            )
            .await?;
        }
        DeviceEvent::CommandExpired { command_id, at } => {
            finish_command(
                connection,
                id,
                sequence,
                command_id.as_str(),
                "expired",
                None,
                *at,
            )
            .await?;
        }
        DeviceEvent::CommandCanceled {
            command_id,
            reason,
            at,
        } => {
            finish_command(
                connection,
                id,
                sequence,
                command_id.as_str(),
                "canceled",
                Some(json!({ "reason": reason })),
                *at,
            )
            .await?;
        }
        DeviceEvent::FirmwareUpdateRequested {
            rollout_id,
            firmware_id,
            version,
            at,
            ..
        } => {
            let update_state = json!({
                "rollout_id": rollout_id,
                "firmware_id": firmware_id,
                "version": version,
                "state": "requested",
                "progress": 0,
                "stage": "requested",
            });
            update_row(
                sqlx::query(&update("firmware_update = $3, updated_at = $4"))
                    .bind(id)
                    .bind(sequence)
                    .bind(update_state)
                    .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::FirmwareUpdateProgressed {
            state,
            progress,
            at,
            ..
        } => {
            // `stage`: the furthest known state reached, as the aggregate keeps it; a device's
            // own state (not in the list) leaves it as it is.
            let assignments = "firmware_update = firmware_update || jsonb_build_object(
                    'state', $3::text, 'progress', $4::int,
                    'stage', CASE WHEN array_position($6::text[], $3::text)
                                       >= COALESCE(array_position($6::text[],
                                                   firmware_update ->> 'stage'), 0)
                                  THEN $3::text ELSE firmware_update ->> 'stage' END),
                 updated_at = $5";
            update_row(
                sqlx::query(&update(assignments))
                    .bind(id)
                    .bind(sequence)
                    .bind(state)
                    .bind(i32::from(*progress))
                    .bind(at)
                    .bind(PROGRESS_STATES),
                connection,
            )
            .await?;
        }
        DeviceEvent::FirmwareUpdateSucceeded { version, at, .. } => {
            update_row(
                sqlx::query(&update(
                    "firmware_version = $3, firmware_update = NULL, updated_at = $4",
                ))
                .bind(id)
                .bind(sequence)
                .bind(version)
                .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::FirmwareUpdateFailed { at, .. }
        | DeviceEvent::FirmwareUpdateAbandoned { at, .. } => {
            update_row(
                sqlx::query(&update("firmware_update = NULL, updated_at = $3"))
                    .bind(id)
                    .bind(sequence)
                    .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::FirmwareVersionReported { version, at } => {
            update_row(
                sqlx::query(&update("firmware_version = $3, updated_at = $4"))
                    .bind(id)
                    .bind(sequence)
                    .bind(version)
                    .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::DeviceCredentialsRotated {
            credential_version,
            at,
            ..
        } => {
            update_row(
                sqlx::query(&update("credential_version = $3, updated_at = $4"))
                    .bind(id)
                    .bind(sequence)
                    .bind(*credential_version as i32)
                    .bind(at),
                connection,
            )
            .await?;
        }
        DeviceEvent::DeviceCredentialsRevoked { at, .. } => {
            update_row(
                sqlx::query(&update("updated_at = $3"))
                    .bind(id)
                    .bind(sequence)
                    .bind(at),
                connection,
            )
            .await?;
        }
    }
    Ok(())
}

async fn finish_command(
    connection: &mut PgConnection,
    id: &str,
    sequence: i64,
    command_id: &str,
    status: &str,
    result: Option<Value>,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE device_commands SET status = $3, result = $4, finished_at = $5
          WHERE device_id = $1 AND command_id = $2",
    )
    .bind(id)
    .bind(command_id)
    .bind(status)
    .bind(result)
    .bind(at)
    .execute(&mut *connection)
    .await?;
    update_row(
        sqlx::query(&update(
            "open_commands = GREATEST(open_commands - 1, 0), updated_at = $3",
        ))
        .bind(id)
        .bind(sequence)
        .bind(at),
        connection,
    )
    .await?;
    Ok(())
}
