//! The `rollouts` read model with `rollout_devices`: each rollout's progress and how the update
//! went on each of its target devices.

use fleetlog_domain::rollout::{DeviceOutcome, ErrorAction, Rollout, RolloutEvent};
use fleetlog_eventlog::EventEnvelope;
use serde_json::json;
use sqlx::PgConnection;

use crate::worker::{Projection, ProjectionError};

/// Keeps `rollouts` and `rollout_devices`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolloutsProjection;

impl Projection for RolloutsProjection {
    const NAME: &'static str = "rollouts";
    const AGGREGATE_TYPE: &'static str = "rollout";
    const TABLES: &'static [&'static str] = &["rollouts", "rollout_devices"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        let id = envelope.aggregate_id.as_str();
        let sequence = envelope.sequence;
        let event: RolloutEvent = envelope.payload.decode()?;
        match event {
            RolloutEvent::RolloutCreated {
                ref tenant,
                ref firmware_id,
                ref targets,
                ref waves,
                success_threshold,
                error_threshold,
                on_error,
                device_timeout_secs,
                window_secs,
                at,
                ..
            } => {
                // The wave split is the domain's rule; ask the aggregate rather than repeat it.
                let mut rollout = Rollout::default();
                rollout.evolve(event.clone());
                let wave_sizes: Vec<i32> = (0..rollout.wave_count())
                    .map(|wave| rollout.wave_devices(wave).len() as i32)
                    .collect();
                sqlx::query(
                    "INSERT INTO rollouts (rollout_id, tenant, firmware_id, status, waves,
                       success_threshold, error_threshold, device_timeout_secs, target_count,
                       created_at, updated_at, last_sequence, on_error, window_secs, wave_sizes)
                     VALUES ($1, $3, $4, 'created', $5, $6, $7, $8, $9, $10, $10, $2, $11, $12, $13)",
                )
                .bind(id)
                .bind(sequence)
                .bind(tenant.as_str())
                .bind(firmware_id.to_string())
                .bind(waves.iter().map(|w| i16::from(*w)).collect::<Vec<_>>())
                .bind(i16::from(success_threshold))
                .bind(i16::from(error_threshold))
                .bind(i64::try_from(device_timeout_secs).unwrap_or(i64::MAX))
                .bind(targets.len() as i32)
                .bind(at)
                .bind(on_error_name(on_error))
                .bind(i64::try_from(window_secs).unwrap_or(i64::MAX))
                .bind(wave_sizes)
                .execute(&mut *connection)
                .await?;
                let (mut devices, mut wave_of) = (Vec::new(), Vec::new());
                for wave in 0..rollout.wave_count() {
                    for device in rollout.wave_devices(wave) {
                        devices.push(device.to_string());
                        wave_of.push(wave as i32);
                    }
                }
                sqlx::query(
                    "INSERT INTO rollout_devices (rollout_id, device_id, wave, status, updated_at)
                     SELECT $1, d, w, 'queued', $4 FROM UNNEST($2::text[], $3::int[]) AS t(d, w)",
                )
                .bind(id)
                .bind(devices)
                .bind(wave_of)
                .bind(at)
                .execute(connection)
                .await?;
            }
            RolloutEvent::RolloutStarted { at } => {
                update(
                    connection,
                    envelope,
                    "status = 'running', started_at = $3,",
                    at,
                )
                .await?;
            }
            RolloutEvent::WaveStarted {
                wave, counts, at, ..
            } => {
                let decision = counts.map(|counts| {
                    json!({"decision": "advance", "automatic": true, "wave": wave,
                           "counts": counts, "at": at})
                });
                sqlx::query(
                    "UPDATE rollouts SET current_wave = $3, updated_at = $4, last_sequence = $2,
                            wave_started_at = wave_started_at[1:$3] || $4::timestamptz,
                            last_decision = COALESCE($5, last_decision)
                      WHERE rollout_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(wave as i32)
                .bind(at)
                .bind(decision)
                .execute(connection)
                .await?;
            }
            RolloutEvent::DevicesSent { devices, at } => {
                let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
                sqlx::query(
                    "UPDATE rollout_devices SET status = 'sent', sent_at = $3, updated_at = $3
                      WHERE rollout_id = $1 AND device_id = ANY($2)",
                )
                .bind(id)
                .bind(&devices)
                .bind(at)
                .execute(&mut *connection)
                .await?;
                sqlx::query(
                    "UPDATE rollouts SET sent = sent + $3, updated_at = $4, last_sequence = $2
                      WHERE rollout_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(devices.len() as i32)
                .bind(at)
                .execute(connection)
                .await?;
            }
            RolloutEvent::DeviceReturnedToQueue { device_id, at, .. } => {
                sqlx::query(
                    "UPDATE rollout_devices SET status = 'queued', sent_at = NULL, updated_at = $3
                      WHERE rollout_id = $1 AND device_id = $2",
                )
                .bind(id)
                .bind(device_id.as_str())
                .bind(at)
                .execute(&mut *connection)
                .await?;
                update(connection, envelope, "sent = sent - 1,", at).await?;
            }
            RolloutEvent::DeviceOutcomeRecorded {
                device_id,
                outcome,
                at,
            } => {
                let (status, error, counter) = match outcome {
                    DeviceOutcome::Succeeded => ("succeeded", None, "succeeded = succeeded + 1,"),
                    DeviceOutcome::Failed { error } => {
                        ("failed", Some(error), "failed = failed + 1,")
                    }
                    DeviceOutcome::TimedOut => ("timed_out", None, "timed_out = timed_out + 1,"),
                    DeviceOutcome::Canceled { reason } => {
                        ("canceled", Some(reason), "canceled = canceled + 1,")
                    }
                };
                // An outcome a device reported before an abort that was recorded after it
                // turns one of the abort's canceled devices into that outcome.
                let was_canceled: Option<bool> = sqlx::query_scalar(
                    "UPDATE rollout_devices new SET status = $3, error = $4, updated_at = $5
                       FROM rollout_devices old
                      WHERE new.rollout_id = $1 AND new.device_id = $2
                        AND old.rollout_id = new.rollout_id AND old.device_id = new.device_id
                  RETURNING old.status = 'canceled'",
                )
                .bind(id)
                .bind(device_id.as_str())
                .bind(status)
                .bind(error)
                .bind(at)
                .fetch_optional(&mut *connection)
                .await?;
                let counter = if was_canceled == Some(true) {
                    format!("{counter} canceled = canceled - 1,")
                } else {
                    counter.to_string()
                };
                update(connection, envelope, &counter, at).await?;
            }
            RolloutEvent::RolloutPaused {
                reason,
                automatic,
                counts,
                at,
            } => {
                let decision = json!({"decision": "pause", "automatic": automatic,
                    "reason": reason, "counts": counts, "at": at});
                sqlx::query(
                    "UPDATE rollouts SET status = 'paused', pause_reason = $3, updated_at = $4,
                            last_decision = $5, last_sequence = $2 WHERE rollout_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(reason)
                .bind(at)
                .bind(decision)
                .execute(connection)
                .await?;
            }
            RolloutEvent::RolloutResumed { at } => {
                update(
                    connection,
                    envelope,
                    "status = 'running', pause_reason = NULL,",
                    at,
                )
                .await?;
            }
            RolloutEvent::RolloutAborted {
                reason,
                automatic,
                canceled,
                counts,
                at,
            } => {
                // Every device without an outcome is canceled: those sent are told to give the
                // update up. The rows are counted, as aborts recorded before sent devices were
                // canceled too counted only those not sent (`canceled` in the decision).
                let rows = sqlx::query(
                    "UPDATE rollout_devices SET status = 'canceled', updated_at = $2
                      WHERE rollout_id = $1 AND status IN ('queued', 'sent')",
                )
                .bind(id)
                .bind(at)
                .execute(&mut *connection)
                .await?
                .rows_affected();
                let decision = json!({"decision": "abort", "automatic": automatic,
                    "reason": reason, "canceled": canceled, "counts": counts, "at": at});
                sqlx::query(
                    "UPDATE rollouts SET status = 'aborted', pause_reason = $3, finished_at = $4,
                            updated_at = $4, canceled = canceled + $5, last_decision = $6, last_sequence = $2
                      WHERE rollout_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(reason)
                .bind(at)
                .bind(rows as i32)
                .bind(decision)
                .execute(connection)
                .await?;
            }
            RolloutEvent::RolloutCompleted { counts, at, .. } => {
                let decision = json!({"decision": "complete", "automatic": true,
                    "counts": counts, "at": at});
                sqlx::query(
                    "UPDATE rollouts SET status = 'completed', finished_at = $3, updated_at = $3,
                            last_decision = $4, last_sequence = $2 WHERE rollout_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(at)
                .bind(decision)
                .execute(connection)
                .await?;
            }
        }
        Ok(())
    }
}

/// `UPDATE rollouts SET {assignments} updated_at = $3, last_sequence = $2 WHERE rollout_id = $1`.
async fn update(
    connection: &mut PgConnection,
    envelope: &EventEnvelope,
    assignments: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE rollouts SET {assignments} updated_at = $3, last_sequence = $2 WHERE rollout_id = $1"
    ))
    .bind(&envelope.aggregate_id)
    .bind(envelope.sequence)
    .bind(at)
    .execute(connection)
    .await?;
    Ok(())
}

fn on_error_name(action: ErrorAction) -> &'static str {
    match action {
        ErrorAction::Pause => "pause",
        ErrorAction::Abort => "abort",
    }
}
