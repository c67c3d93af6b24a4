//! A read model as it stood at an instant: one aggregate's events recorded until then, applied
//! by the projection's own code to private copies of its tables.
//!
//! The copies are temporary tables (`LIKE ... INCLUDING ALL`, shadowing the live ones on the
//! transaction's `search_path`) that the transaction drops when it ends; nothing is ever
//! committed. So a past view has exactly the shape and the rules of the live one (latest
//! readings, merged documents, delta, counters): there is one way to apply an event.
//!
//! Writing to the copies gives the transaction an id, and while it is open the relay holds
//! back events of younger transactions (it publishes only those older than the oldest one
//! running). So a fold is bounded: at most [`MAX_EVENTS`] events, or it is refused before any
//! copy is made; callers should also bound how many run at once.

use chrono::{DateTime, Utc};
use fleetlog_eventlog::EventEnvelope;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::worker::{move_position_past, Positions, Projection, ProjectionError};

/// Events applied per batch.
const PAGE_SIZE: i64 = 1_000;

/// The most events one fold applies: a few seconds of work at most.
pub const MAX_EVENTS: i64 = 100_000;

/// Why a past view could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AsOfError {
    /// The aggregate has more events until the instant than one fold applies.
    #[error("{count} events until that instant, more than the {MAX_EVENTS} one view folds; read the history (`/events`) instead")]
    TooLong {
        /// How many.
        count: i64,
    },
    /// Applying failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

impl From<sqlx::Error> for AsOfError {
    fn from(error: sqlx::Error) -> Self {
        Self::Projection(ProjectionError::Database(error))
    }
}

/// A projection's tables as they stood at an instant, for one aggregate; query them through
/// [`PastModel::connection`] by their usual names. Dropping it throws them away.
pub struct PastModel {
    transaction: Transaction<'static, Postgres>,
}

impl PastModel {
    /// The connection on which the projection's table names mean the past copies.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.transaction
    }
}

/// Applies the events of `aggregate_id` recorded until `at` (inclusive) with `projection` to
/// empty copies of its tables. An event the projection cannot apply is passed over, as the
/// live worker passes it over.
pub async fn as_of<P: Projection>(
    pool: &PgPool,
    projection: &P,
    aggregate_id: &str,
    at: DateTime<Utc>,
) -> Result<PastModel, AsOfError> {
    let count =
        fleetlog_eventlog::count_until(pool, P::AGGREGATE_TYPE, aggregate_id, at, MAX_EVENTS + 1)
            .await?;
    if count > MAX_EVENTS {
        return Err(AsOfError::TooLong { count });
    }
    let mut transaction = pool.begin().await?;
    // Only reads of the events table leave the transaction; the copies are its own.
    sqlx::query("SET LOCAL search_path TO pg_temp, public")
        .execute(&mut *transaction)
        .await?;
    let positions: &[&str] = match P::POSITIONS {
        Positions::Shared => &["projection_positions"],
        _ => &[],
    };
    for table in P::TABLES.iter().chain(positions) {
        sqlx::query(&format!(
            "CREATE TEMPORARY TABLE {table} (LIKE public.{table} INCLUDING ALL) ON COMMIT DROP"
        ))
        .execute(&mut *transaction)
        .await?;
    }
    let mut last_sequence = 0;
    loop {
        let events = fleetlog_eventlog::until(
            &mut *transaction,
            P::AGGREGATE_TYPE,
            aggregate_id,
            at,
            last_sequence,
            PAGE_SIZE,
        )
        .await?;
        let Some(last) = events.last() else { break };
        last_sequence = last.sequence;
        let events: Vec<&EventEnvelope> = events.iter().collect();
        apply_passing_over(projection, &mut transaction, &events).await?;
        if (events.len() as i64) < PAGE_SIZE {
            break;
        }
    }
    Ok(PastModel { transaction })
}

/// Applies `events` as one batch; if one of them cannot be applied (as the live worker would
/// find, and pass it over with a dead letter), applies them one by one and passes over those,
/// so the past view leaves out what the live one left out.
async fn apply_passing_over<P: Projection>(
    projection: &P,
    connection: &mut PgConnection,
    events: &[&EventEnvelope],
) -> Result<(), ProjectionError> {
    sqlx::query("SAVEPOINT as_of_batch")
        .execute(&mut *connection)
        .await?;
    match projection.apply_batch(connection, events).await {
        Ok(()) => {}
        Err(error) if error.is_about_the_event() => {
            sqlx::query("ROLLBACK TO SAVEPOINT as_of_batch")
                .execute(&mut *connection)
                .await?;
            for event in events {
                sqlx::query("SAVEPOINT as_of_event")
                    .execute(&mut *connection)
                    .await?;
                match projection.apply(connection, event).await {
                    Ok(()) => {}
                    Err(error) if error.is_about_the_event() => {
                        sqlx::query("ROLLBACK TO SAVEPOINT as_of_event")
                            .execute(&mut *connection)
                            .await?;
                        // As the worker's dead letter does: the aggregate's later events
                        // follow on.
                        move_position_past::<P>(connection, event).await?;
                    }
                    Err(error) => return Err(error),
                }
                sqlx::query("RELEASE SAVEPOINT as_of_event")
                    .execute(&mut *connection)
                    .await?;
            }
        }
        Err(error) => return Err(error),
    }
    sqlx::query("RELEASE SAVEPOINT as_of_batch")
        .execute(&mut *connection)
        .await?;
    Ok(())
}
