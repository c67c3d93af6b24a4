//! Telemetry retention: the `telemetry` read model keeps the readings of the last so many days.
//!
//! The horizon lives in Postgres (`telemetry_retention.kept_from`), so every process and every
//! replay agrees on it: the readings before it are not part of the model. Queries read only the
//! rows from the horizon on ([`WITHIN_RETENTION`]); a replay drops the rows behind it before the
//! swap, and a verification compares only the rows from it on (see
//! [`crate::Projection::RETAINED`]). The sweep ([`TelemetryRetention`]) moves the horizon
//! forward, never back, and deletes the rows behind it a batch at a time, one sweeping process
//! at a time (an advisory lock; the others skip their turn).
//!
//! Only the read model lets readings go. The events table keeps every reading: the history,
//! past views and the audit trail are unchanged, and the readings behind the horizon stay in
//! the log.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The rows of `telemetry` that belong to the model: those from the horizon on (every row when
/// there is none). A condition on a row of `telemetry`, for queries and replays alike.
pub const WITHIN_RETENTION: &str =
    "time >= coalesce((SELECT kept_from FROM public.telemetry_retention), '-infinity')";

/// The longest retention accepted, in days: a century.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// Rows deleted per statement: a short transaction that holds back neither the writers nor
/// vacuum.
const DELETE_BATCH: i64 = 10_000;

/// The advisory lock of the sweep, so one process sweeps at a time.
const SWEEP_LOCK: i64 = 0x666c_6565_7472_6574; // "fleetret"

/// How long telemetry is kept, and how often the sweep runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Readings older than this (by their own time) leave the model.
    pub keep: Duration,
    /// How often the horizon moves and the rows behind it go.
    pub every: Duration,
}

/// The sweep of the telemetry read model. See the module documentation.
pub struct TelemetryRetention {
    pool: PgPool,
    settings: RetentionSettings,
}

impl TelemetryRetention {
    /// A sweep over `pool` with `settings`.
    pub fn new(pool: PgPool, settings: RetentionSettings) -> Self {
        Self { pool, settings }
    }

    /// Sweeps every `settings.every` until `shutdown`; a failed sweep (Postgres away) is
    /// logged and tried again at the next turn.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut turns = tokio::time::interval(self.settings.every);
        turns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = turns.tick() => {}
            }
            match self.sweep(&shutdown).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "telemetry beyond retention deleted"),
                Err(error) => tracing::warn!(%error, "telemetry retention sweep failed; next turn"),
            }
        }
    }

    /// One sweep: moves the horizon to `now - keep` (if that is later) and deletes the rows
    /// behind it. Returns how many rows it deleted; 0 when another process holds the sweep.
    pub async fn sweep(&self, shutdown: &CancellationToken) -> Result<u64, sqlx::Error> {
        let keep_secs = self.settings.keep.as_secs_f64();
        let mut deleted = 0;
        let mut first = true;
        loop {
            let mut tx = self.pool.begin().await?;
            let sweeping: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(SWEEP_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !sweeping {
                return Ok(deleted);
            }
            if std::mem::take(&mut first) {
                sqlx::query(
                    "INSERT INTO telemetry_retention (kept_from)
                     VALUES (now() - make_interval(secs => $1))
                     ON CONFLICT (only_row) DO UPDATE
                        SET kept_from = greatest(telemetry_retention.kept_from, excluded.kept_from)",
                )
                .bind(keep_secs)
                .execute(&mut *tx)
                .await?;
            }
            let batch = sqlx::query(
                "DELETE FROM telemetry WHERE ctid = ANY (ARRAY(
                     SELECT ctid FROM telemetry
                      WHERE time < (SELECT kept_from FROM telemetry_retention)
                      LIMIT $1))",
            )
            .bind(DELETE_BATCH)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            deleted += batch;
            metrics::counter!("fleetlog_telemetry_readings_expired_total").increment(batch);
            if batch < DELETE_BATCH as u64 || shutdown.is_cancelled() {
                return Ok(deleted);
            }
        }
    }
}
