//! The relay: publishes every committed event from Postgres to JetStream, in commit-safe order,
//! without losing one.
//!
//! Why not simply `WHERE global_position > cursor`: positions are handed out at insert, not at
//! commit. A transaction holding position 10 may commit after one holding 11; a reader that saw
//! 11 and moved its cursor past it would never see 10. So the relay reads in
//! `(transaction_id, global_position)` order and only rows of transactions older than the oldest
//! transaction still running (`pg_snapshot_xmin`): no row can appear later below its cursor.
//!
//! Each batch is published with many acks in flight; the cursor moves to the last event whose
//! ack (and every earlier one's) came back, and is stored in Postgres. A crash between publish
//! and cursor store republishes a few events, which the stream drops by `Nats-Msg-Id`.
//!
//! One relay is active at a time: it holds a Postgres advisory lock on a connection of its own.
//! Others wait for the lock and take over when the holder's connection goes away.

use std::time::Duration;

use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use bytes::Bytes;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fleetlog_eventlog::{Cursor, OutgoingEvent};
use fleetlog_nats::topology::{ensure_stream, subject_for, StreamSettings, EVENT_TYPE_HEADER};
use fleetlog_nats::Backoff;

/// The Postgres channel the events table notifies on.
pub const EVENTS_CHANNEL: &str = "fleetlog_events";
/// The advisory-lock key that elects the active relay ("fleetlog" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x666c_6565_746c_6f67;
/// The first wait after a failure; it doubles up to `RelaySettings::max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The most unpublished events the relay counts for its lag gauge.
pub const LAG_COUNT_CAP: i64 = 100_000;

/// The cursor's name in `relay_cursors`.
const CURSOR_NAME: &str = "FLEETLOG_EVENTS";

const SELECT_CURSOR: &str = "
SELECT transaction_id::text AS transaction_text, global_position
  FROM relay_cursors WHERE relay = $1";

const UPSERT_CURSOR: &str = "
INSERT INTO relay_cursors (relay, transaction_id, global_position, updated_at)
VALUES ($1, $2::text::xid8, $3, now())
ON CONFLICT (relay) DO UPDATE
   SET transaction_id = EXCLUDED.transaction_id,
       global_position = EXCLUDED.global_position,
       updated_at = now()";

/// Tuning of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySettings {
    /// Events read and published per round.
    pub batch_size: i64,
    /// How often the relay looks for events when no notification arrives.
    pub poll_interval: Duration,
    /// How long the relay lets events gather after a notification before it reads them: under
    /// load, commits arrive hundreds of times a second, and a round per commit would spend
    /// more on round trips (read, cursor, lock check) than on the events.
    pub linger: Duration,
    /// How often a standby relay tries to take the lock.
    pub standby_interval: Duration,
    /// The longest wait between retries while NATS or Postgres fail.
    pub max_backoff: Duration,
    /// How long a publish waits for its ack before the batch is retried. Short, so an outage
    /// that swallowed the acks of a batch in flight delays the relay by this much, not more.
    pub ack_timeout: Duration,
    /// The stream's retention and deduplication.
    pub stream: StreamSettings,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            poll_interval: Duration::from_secs(1),
            linger: Duration::from_millis(5),
            standby_interval: Duration::from_secs(2),
            max_backoff: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
            stream: StreamSettings::default(),
        }
    }
}

/// What the relay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayStatus {
    /// Waiting for another relay to let go of the lock.
    Standby,
    /// Holding the lock and publishing.
    Active,
    /// Shut down.
    Stopped,
}

/// Why the relay stopped relaying for a while.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("nats: {0}")]
    Nats(#[from] async_nats::Error),
    #[error("lost the relay lock")]
    LostLock,
}

/// Where the relay has published up to, `None` before its first event.
pub async fn stored_cursor(pool: &PgPool) -> Result<Option<Cursor>, sqlx::Error> {
    let row = sqlx::query(SELECT_CURSOR)
        .bind(CURSOR_NAME)
        .fetch_optional(pool)
        .await?;
    row.map(|row| {
        Ok(Cursor {
            transaction_id: row
                .get::<String, _>("transaction_text")
                .parse()
                .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
            global_position: row.get("global_position"),
        })
    })
    .transpose()
}

/// The relay role. See the module documentation.
pub struct Relay {
    pool: PgPool,
    jetstream: Context,
    settings: RelaySettings,
    status: watch::Sender<RelayStatus>,
}

impl Relay {
    /// A relay from `pool` to JetStream on `client`.
    pub fn new(pool: PgPool, client: async_nats::Client, settings: RelaySettings) -> Self {
        let jetstream = ContextBuilder::new()
            .timeout(settings.ack_timeout)
            .ack_timeout(settings.ack_timeout)
            .build(client);
        Self {
            pool,
            jetstream,
            settings,
            status: watch::Sender::new(RelayStatus::Standby),
        }
    }

    /// Follows what the relay is doing.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Relays until `shutdown` is cancelled. Failures of Postgres or NATS are retried with
    /// backoff, never returned: commands keep succeeding meanwhile, and the relay catches up.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(FIRST_BACKOFF, self.settings.max_backoff);
        while !shutdown.is_cancelled() {
            let Some(lock) = self.wait_for_lock(&shutdown).await else {
                break;
            };
            self.status.send_replace(RelayStatus::Active);
            metrics::gauge!("fleetlog_relay_active").set(1.0);
            tracing::info!("relay active");
            // Stopping mid-publish is safe: the cursor only moves after the acks, and the stream
            // drops what the next run republishes. The lock goes with its connection.
            let result = tokio::select! {
                () = shutdown.cancelled() => Ok(()),
                result = self.relay_while_holding(lock, &shutdown, &mut backoff) => result,
            };
            self.status.send_replace(RelayStatus::Standby);
            metrics::gauge!("fleetlog_relay_active").set(0.0);
            // Only the active relay has a backlog: a standby's last count would go stale (and
            // keep a lag alert firing after a failover).
            metrics::gauge!("fleetlog_relay_unpublished_events").set(0.0);
            match result {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "relay interrupted; retrying");
                    backoff.wait(&shutdown).await;
                }
            }
        }
        self.status.send_replace(RelayStatus::Stopped);
        tracing::info!("relay stopped");
    }

    /// Takes the advisory lock on a connection of its own (detached from the pool, so the lock
    /// lives exactly as long as that connection). `None` when shut down first.
    async fn wait_for_lock(&self, shutdown: &CancellationToken) -> Option<PgConnection> {
        let mut backoff = Backoff::new(FIRST_BACKOFF, self.settings.max_backoff);
        loop {
            let attempt = async {
                let mut connection = PoolConnection::<Postgres>::detach(self.pool.acquire().await?);
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(RELAY_LOCK_KEY)
                    .fetch_one(&mut connection)
                    .await?;
                Ok::<_, sqlx::Error>(locked.then_some(connection))
            };
            let wait = match attempt.await {
                Ok(Some(connection)) => return Some(connection),
                Ok(None) => {
                    backoff.reset();
                    self.settings.standby_interval
                }
                Err(error) => {
                    tracing::warn!(%error, "relay cannot reach Postgres for its lock");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn relay_while_holding(
        &self,
        mut lock: PgConnection,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), RelayError> {
        ensure_stream(&self.jetstream, &self.settings.stream).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        let mut cursor = stored_cursor(&self.pool).await?.unwrap_or_default();
        let mut lock_checked = Instant::now();
        let mut lag_measured: Option<Instant> = None;
        backoff.reset();
        loop {
            if shutdown.is_cancelled() {
                let _ = lock.close().await;
                return Ok(());
            }
            // Measured here, not beside the lock check, so that it goes on while the relay
            // catches up (full batches, one after another), when it matters most.
            if lag_measured.is_none_or(|at| at.elapsed() >= self.settings.poll_interval) {
                self.measure_lag(cursor).await?;
                lag_measured = Some(Instant::now());
            }
            let batch = self.read_batch(cursor).await?;
            let full = batch.len() as i64 == self.settings.batch_size;
            if !batch.is_empty() {
                let (published, failure) = self.publish(&batch).await;
                if let Some(last) = published {
                    cursor = last;
                    self.store_cursor(cursor).await?;
                    let count = batch.iter().take_while(|(at, _)| *at <= last).count();
                    metrics::counter!("fleetlog_relay_published_events_total")
                        .increment(count as u64);
                }
                if let Some(error) = failure {
                    tracing::warn!(%error, "publishing to JetStream failed; retrying");
                    backoff.wait(shutdown).await;
                    continue;
                }
                backoff.reset();
                if full {
                    continue;
                }
            }
            // Still the active relay? If the lock's connection died, another relay may have
            // taken over; step down rather than publish beside it. Once per poll interval is
            // enough: a round trip per round would be a third of the relay's queries.
            if lock_checked.elapsed() >= self.settings.poll_interval {
                sqlx::query("SELECT 1")
                    .execute(&mut lock)
                    .await
                    .map_err(|_| RelayError::LostLock)?;
                lock_checked = Instant::now();
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                notification = listener.recv() => {
                    if let Err(error) = notification {
                        tracing::debug!(%error, "event notifications interrupted; polling");
                    }
                    tokio::time::sleep(self.settings.linger).await;
                }
                () = tokio::time::sleep(self.settings.poll_interval) => {}
            }
        }
    }

    /// Counts the committed events after `cursor` (up to [`LAG_COUNT_CAP`], so a relay far
    /// behind does not scan the table every poll) into `fleetlog_relay_unpublished_events`.
    async fn measure_lag(&self, cursor: Cursor) -> Result<(), sqlx::Error> {
        let unpublished: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
                 SELECT 1 FROM events
                  WHERE (transaction_id, global_position) > ($1::text::xid8, $2)
                  LIMIT $3) unpublished",
        )
        .bind(cursor.transaction_id.to_string())
        .bind(cursor.global_position)
        .bind(LAG_COUNT_CAP)
        .fetch_one(&self.pool)
        .await?;
        metrics::gauge!("fleetlog_relay_unpublished_events").set(unpublished as f64);
        Ok(())
    }

    async fn store_cursor(&self, cursor: Cursor) -> Result<(), sqlx::Error> {
        sqlx::query(UPSERT_CURSOR)
            .bind(CURSOR_NAME)
            .bind(cursor.transaction_id.to_string())
            .bind(cursor.global_position)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn read_batch(&self, after: Cursor) -> Result<Vec<(Cursor, OutgoingEvent)>, sqlx::Error> {
        let rows =
            fleetlog_eventlog::outgoing_page(&self.pool, after, self.settings.batch_size).await?;
        Ok(rows.into_iter().map(|row| (row.cursor(), row)).collect())
    }

    /// Publishes a batch with every publish in flight at once, then collects the acks. Returns
    /// the cursor of the last event of the acknowledged prefix, and the first failure.
    async fn publish(
        &self,
        batch: &[(Cursor, OutgoingEvent)],
    ) -> (Option<Cursor>, Option<async_nats::Error>) {
        let mut acks = Vec::with_capacity(batch.len());
        let mut failure: Option<async_nats::Error> = None;
        for (cursor, envelope) in batch {
            let body = match envelope.body() {
                Ok(body) => Bytes::from(body),
                Err(error) => {
                    failure = Some(error.into());
                    break;
                }
            };
            let mut message = PublishMessage::build()
                .payload(body)
                .message_id(envelope.message_id())
                .header(EVENT_TYPE_HEADER, envelope.event_type.as_str());
            let (aggregate_type, aggregate_id) = envelope.aggregate();
            // A traced event: its publish joins the trace of the command that stored it, and
            // the message carries the trace on to the consumers.
            let span = fleetlog_trace::from_metadata_json(envelope.metadata_json()).map(|parent| {
                let span = tracing::info_span!(
                    "publish",
                    otel.kind = "producer",
                    messaging.system = "nats",
                    messaging.message.id = envelope.message_id(),
                    event_type = envelope.event_type.as_str(),
                );
                fleetlog_trace::follow(&span, parent.clone());
                let carried = fleetlog_trace::passed_on(&span, parent);
                fleetlog_trace::inject(&carried, |key, value| {
                    message = std::mem::take(&mut message).header(key, value.as_str());
                });
                span
            });
            let subject = subject_for(aggregate_type, aggregate_id, &envelope.event_type);
            match self.jetstream.send_publish(subject, message).await {
                Ok(ack) => acks.push((*cursor, ack, span)),
                Err(error) => {
                    failure = Some(error.into());
                    break;
                }
            }
        }
        // Every publish in `acks` was sent before any send failure, so the acknowledged prefix
        // ends only at the first ack that fails.
        let mut acknowledged = None;
        let mut prefix_intact = true;
        // A traced event's publish span ends when the stream has acknowledged it.
        for (cursor, ack, _span) in acks {
            match ack.await {
                Ok(_) if prefix_intact => acknowledged = Some(cursor),
                Ok(_) => {}
                Err(error) => {
                    prefix_intact = false;
                    failure.get_or_insert(error.into());
                }
            }
        }
        (acknowledged, failure)
    }
}
