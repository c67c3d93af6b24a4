//! Taking turns: instances with a plain subscription and one client id share one broker
//! session, and only one of them may be connected to it.
//!
//! A plain subscription is what every broker keeps over its own restart (Mosquitto before
//! 2.0.19 forgets shared ones), but each session with it gets every message: two instances
//! with two sessions would record everything twice. So plain-subscription instances use the
//! same client id, and a Postgres advisory lock on that id (held on a connection of its own,
//! as the relay does) says which one connects. The others stand by; when the holder dies its
//! connection, and with it the lock, goes away, and the next one takes the session over with
//! the messages the broker queued in it meanwhile, and those it had in flight, which come
//! again flagged DUP and are recognised by their digests.

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

use super::*;

/// The advisory-lock key of a client id: one lock per broker session.
const TURN_KEY: &str = "SELECT pg_try_advisory_lock(hashtextextended('fleetlog.ingest:' || $1, 0))";

/// Waits until this instance holds the turn of its client id; the connection holding the
/// lock is returned (dropping it gives the turn away). `None` once shut down.
pub(super) async fn wait_for_turn(
    pool: &PgPool,
    settings: &IngestSettings,
    shutdown: &CancellationToken,
) -> Option<PgConnection> {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let mut told = false;
    loop {
        let attempt = async {
            // Detached from the pool: the lock lives exactly as long as this connection.
            let mut connection = PoolConnection::<Postgres>::detach(pool.acquire().await?);
            let locked: bool = sqlx::query_scalar(TURN_KEY)
                .bind(&settings.client_id)
                .fetch_one(&mut connection)
                .await?;
            Ok::<_, sqlx::Error>(locked.then_some(connection))
        };
        let wait = match attempt.await {
            Ok(Some(connection)) => return Some(connection),
            Ok(None) => {
                if !told {
                    told = true;
                    tracing::info!(
                        client_id = %settings.client_id,
                        "another ingest instance serves this client id; standing by"
                    );
                }
                backoff.reset();
                settings.standby_interval
            }
            Err(error) => {
                tracing::warn!(%error, "ingest cannot reach Postgres for its turn");
                backoff.next_delay()
            }
        };
        if !sleep_unless_shut_down(wait, shutdown).await {
            return None;
        }
    }
}

/// Checks the lock's connection every `interval` and cancels `serving` when it is gone: the
/// lock went with it, and another instance may hold the turn by now.
pub(super) async fn watch_turn(
    mut held: PgConnection,
    interval: Duration,
    serving: &CancellationToken,
) {
    loop {
        tokio::select! {
            () = serving.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let alive = tokio::time::timeout(
            interval.max(Duration::from_secs(1)) * 4,
            sqlx::query("SELECT 1").execute(&mut held),
        )
        .await;
        if !matches!(alive, Ok(Ok(_))) {
            serving.cancel();
            return;
        }
    }
}
