//! The device read models kept inline: `devices`, `device_commands` and `telemetry` are
//! written by the write side, in the transaction that appends the Device events, in whatever
//! process appends them (see [`fleetlog_commands::inline`] for why and for the contract).
//!
//! The fast way applies an attempt's events set-wise, exactly as a replay applies a page:
//! every write to `devices` is compare-and-set on `last_sequence`, so events that do not
//! follow on from the row (a model that lags the log) fail it rather than apply out of
//! order, and telemetry rows are plain inserts, since each event is applied once, by the
//! transaction that appends it. When it fails, the careful way takes each device's model from
//! where it stands up to the attempt's last event, reading the events from the table (the
//! attempt's own included, visible to its transaction), one event at a time under a
//! savepoint; an event a model cannot apply is passed over with its reason, as the projection
//! workers and replay pass it over, so a replay still equals the live model.

use std::sync::Arc;

use fleetlog_commands::{Appended, Care, InlineError, InlineFuture, InlineProjection};
use fleetlog_domain::device::{Device, DeviceEvent};
use fleetlog_eventlog::{EventEnvelope, HistoryQuery};
use sqlx::{Connection, PgConnection};

use crate::devices::{apply_recorded, Recorded};
use crate::telemetry::{insert_readings, Repeats};
use crate::worker::{apply_event, own_position, pass_over, Position, Projection};
use crate::{DevicesProjection, ProjectionError, TelemetryProjection};

/// Events read from the table per round of the careful way.
const CATCH_UP_PAGE: i64 = 1_000;

/// The device read models, for the write side to keep inline:
/// `CommandBus::new(pool, settings, DeviceModels::inline())`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeviceModels;

impl DeviceModels {
    /// The models as the command bus takes them.
    pub fn inline() -> Arc<dyn InlineProjection<Device>> {
        Arc::new(Self)
    }
}

impl InlineProjection<Device> for DeviceModels {
    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        appended: &'a [Appended<'a, DeviceEvent>],
        care: Care,
    ) -> InlineFuture<'a> {
        Box::pin(async move {
            match care {
                Care::Fast => fast(connection, appended).await,
                Care::Careful => {
                    for one in appended {
                        careful(connection, one).await?;
                    }
                    Ok(())
                }
            }
        })
    }
}

async fn fast(
    connection: &mut PgConnection,
    appended: &[Appended<'_, DeviceEvent>],
) -> Result<(), InlineError> {
    let recorded: Vec<Recorded<'_>> = appended
        .iter()
        .flat_map(|one| {
            one.events
                .iter()
                .zip(0..)
                .map(move |(event, offset)| Recorded {
                    id: one.aggregate_id,
                    sequence: one.first_sequence + offset,
                    event,
                })
        })
        .collect();
    apply_recorded(connection, &recorded)
        .await
        .map_err(needs_care)?;
    insert_readings(connection, &recorded, Repeats::Impossible)
        .await
        .map_err(needs_care)?;
    // Counted when applied, not when committed: an attempt that then fails to commit is
    // counted again when it is retried.
    for projection in [DevicesProjection::NAME, TelemetryProjection::NAME] {
        metrics::counter!("fleetlog_projection_events_total",
            "projection" => projection, "outcome" => "applied")
        .increment(recorded.len() as u64);
    }
    Ok(())
}

/// What the fast way makes of a failure: the careful way for anything the events or the
/// model's position explain, a failed append for Postgres failing.
fn needs_care(error: ProjectionError) -> InlineError {
    match error {
        error if error.is_about_the_event() => InlineError::NeedsCare(error.to_string()),
        ProjectionError::Database(error) => InlineError::Database(error),
        other => InlineError::NeedsCare(other.to_string()),
    }
}

/// Brings one device's models from where they stand up to the last event of `appended`.
async fn careful(
    connection: &mut PgConnection,
    appended: &Appended<'_, DeviceEvent>,
) -> Result<(), InlineError> {
    let last = appended.first_sequence + appended.events.len() as i64 - 1;
    let held = own_position::<DevicesProjection>(connection, appended.aggregate_id).await?;
    if held < appended.first_sequence - 1 {
        tracing::warn!(
            device = appended.aggregate_id,
            model_at = held,
            log_at = appended.first_sequence - 1,
            "the devices model lags the event log; catching it up from the table"
        );
    }
    // At least the attempt's own events, whatever the row says: the telemetry model keeps
    // no positions, and judges nothing (it skips readings it holds already).
    let mut position = held.min(appended.first_sequence - 1);
    while position < last {
        let page = fleetlog_eventlog::history(
            &mut *connection,
            HistoryQuery {
                aggregate_type: DevicesProjection::AGGREGATE_TYPE,
                aggregate_id: appended.aggregate_id,
                after_sequence: position,
                event_type: None,
                limit: CATCH_UP_PAGE.min(last - position),
            },
        )
        .await?;
        let Some(newest) = page.last() else {
            return Err(InlineError::NeedsCare(format!(
                "device {} has no events after {position} in the table, but its attempt \
                 appended up to {last}",
                appended.aggregate_id
            )));
        };
        let newest = newest.sequence;
        for event in &page {
            apply_one(connection, &DevicesProjection, event).await?;
            apply_one(connection, &TelemetryProjection, event).await?;
        }
        position = newest;
    }
    Ok(())
}

/// Applies `event` to `projection` under a savepoint, passing it over if it cannot be
/// applied.
async fn apply_one<P: Projection>(
    connection: &mut PgConnection,
    projection: &P,
    event: &EventEnvelope,
) -> Result<(), InlineError> {
    let mut savepoint = connection.begin().await?;
    match apply_event(projection, &mut savepoint, event).await {
        Ok(position @ (Position::Applied | Position::AlreadyApplied)) => {
            savepoint.commit().await?;
            let outcome = if position == Position::Applied {
                "applied"
            } else {
                "skipped"
            };
            metrics::counter!("fleetlog_projection_events_total",
                "projection" => P::NAME, "outcome" => outcome)
            .increment(1);
            Ok(())
        }
        Ok(Position::Gap { expected }) => Err(InlineError::NeedsCare(format!(
            "{} follows a gap: sequence {expected} is missing",
            event.message_id()
        ))),
        Err(error) if error.is_about_the_event() => {
            savepoint.rollback().await?;
            let reason = format!("the write side cannot apply it: {error}");
            tracing::error!(
                projection = P::NAME,
                message_id = event.message_id(),
                reason,
                "passing over an event the read model cannot apply"
            );
            pass_over::<P>(connection, event, &reason).await?;
            metrics::counter!("fleetlog_projection_events_total",
                "projection" => P::NAME, "outcome" => "dead_lettered")
            .increment(1);
            Ok(())
        }
        Err(ProjectionError::Database(error)) => Err(InlineError::Database(error)),
        Err(other) => Err(InlineError::NeedsCare(other.to_string())),
    }
}
