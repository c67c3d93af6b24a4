//! The projection worker: feeds one projection from its durable JetStream pull consumer.
//!
//! For each message, in one Postgres transaction: read the projection's position for the
//! event's aggregate, compare the event's sequence with the last one applied, apply the event
//! and move the position. The message is acked only after the commit. So:
//!
//! - sequence at or below the position: already applied (a redelivery): ack, skip;
//! - sequence beyond position + 1: earlier events have not been applied yet (another worker
//!   holds them, or they come later): they are read from the events table and applied first,
//!   in the same transaction. Only when that cannot be done (more than a thousand missing, or
//!   one of them cannot be applied) the message is naked with a delay, and comes back once the
//!   earlier ones are in;
//! - the next sequence: apply.
//!
//! Several workers of one projection (in one or many processes) share the durable consumer; the
//! position's lock keeps them from applying one aggregate's events twice or out of order.
//!
//! The positions are rows of `projection_positions` ([`Positions::Shared`]). The projections
//! that keep theirs elsewhere (`devices` in its own rows, `telemetry` nowhere) are the device
//! models, which the write side keeps inline (see [`crate::inline`]): they have no worker.
//! A message that keeps failing is dead-lettered after `max_deliveries`: recorded with its
//! reason in `projection_dead_letters` and published on `fleetlog.deadletter.{projection}`, its
//! position moved past it, and acked, so it blocks nothing. Database outages are retried without
//! limit instead.
//!
//! The module is split by concern: `projection.rs` (what a read model implements),
//! `positions.rs` (which events a model has applied, and judging an event against them),
//! `dead_letter.rs` (passing over what cannot be applied); this file holds the consume loop.

mod dead_letter;
mod positions;
mod projection;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{Context, Message};
use bytes::Bytes;
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::subject_filter_for_type;
use fleetlog_nats::STREAM_NAME;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use fleetlog_nats::topology::{DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM};

pub(crate) use dead_letter::pass_over;
use positions::KnownPositions;
pub use positions::{apply_event, has_applied, OwnPositions, Position, Positions};
pub(crate) use positions::{apply_judged, move_position_past, own_position};
pub use projection::{Projection, ProjectionError};

/// Tuning of a projection worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSettings {
    /// Deliveries of a failing message before it is dead-lettered.
    pub max_deliveries: i64,
    /// How long a gap or a failure waits before the message comes back.
    pub retry_delay: Duration,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Messages delivered but not yet acked, per consumer.
    pub max_ack_pending: i64,
    /// The most messages applied in one transaction. Whatever has arrived when the worker is
    /// free is taken at once, up to this many: one commit for many events when busy, no
    /// waiting when idle.
    pub max_batch: usize,
    /// Aggregates whose last applied sequence the worker remembers, so a batch need not read
    /// their position rows; beyond this many it starts remembering afresh.
    pub known_positions: usize,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            max_deliveries: 5,
            retry_delay: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1_000,
            max_batch: 500,
            known_positions: 100_000,
        }
    }
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and acked.
    Applied,
    /// Applied before; acked.
    Skipped,
    /// An earlier event is missing; naked with a delay.
    Gap,
    /// Failed; naked with a delay.
    Retried,
    /// Gave up; recorded, published on the dead-letter subject and acked.
    DeadLettered,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Skipped => "skipped",
            Self::Gap => "gap",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Runs one projection.
pub struct Worker<P: Projection> {
    projection: P,
    pool: PgPool,
    jetstream: Context,
    settings: WorkerSettings,
    known: KnownPositions,
}

impl<P: Projection> Worker<P> {
    /// A worker for `projection`, which keeps its positions in `projection_positions`.
    pub fn new(projection: P, pool: PgPool, jetstream: Context, settings: WorkerSettings) -> Self {
        const {
            assert!(
                matches!(P::POSITIONS, Positions::Shared),
                "a projection with a worker keeps its positions in projection_positions; \
                 the others are kept inline by the write side"
            );
        };
        Self {
            projection,
            pool,
            jetstream,
            known: KnownPositions::new(settings.known_positions),
            settings,
        }
    }

    /// Consumes until `shutdown`; the message in hand is finished first. Lost connections to
    /// NATS or Postgres are retried, never returned.
    pub async fn run(self, shutdown: CancellationToken) {
        fleetlog_nats::consume_until_shutdown(P::NAME, &shutdown, || self.consume(&shutdown)).await;
        tracing::info!(projection = P::NAME, "projection stopped");
    }

    /// The projection's durable consumer, created if missing. The event stream itself belongs
    /// to the relay (which sets its retention); until the relay has created it, this fails and
    /// the worker retries.
    pub async fn consumer(&self) -> Result<PullConsumer, async_nats::Error> {
        fleetlog_nats::topology::ensure_dead_letter_stream(&self.jetstream).await?;
        let stream = self.jetstream.get_stream(STREAM_NAME).await?;
        for name in crate::PROJECTIONS {
            if crate::kept_inline(name) {
                retire_consumer_of_inline(&stream, name).await?;
            }
        }
        fleetlog_nats::durable_consumer(
            &stream,
            PullConfig {
                durable_name: Some(P::NAME.to_string()),
                filter_subject: subject_filter_for_type(P::AGGREGATE_TYPE),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.settings.ack_wait,
                max_ack_pending: self.settings.max_ack_pending,
                ..Default::default()
            },
        )
        .await
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), async_nats::Error> {
        let consumer = self.consumer().await?;
        let mut pull = fleetlog_nats::Pull::start(&consumer, self.settings.max_batch).await?;
        tracing::info!(projection = P::NAME, "projection consuming");
        while let Some(batch) = pull.next(shutdown).await? {
            self.handle_batch(batch).await;
        }
        Ok(())
    }

    /// Handles the messages that arrived together: applied in one transaction when all goes
    /// well, else one by one (so a failing message is retried or dead-lettered on its own).
    pub async fn handle_batch(&self, messages: Vec<Message>) {
        let span = fleetlog_trace::span_for_messages(messages.iter().map(|m| &m.message), || {
            tracing::info_span!(
                "project",
                otel.kind = "consumer",
                projection = P::NAME,
                events = messages.len()
            )
        });
        self.handle_batch_traced(messages).instrument(span).await;
    }

    async fn handle_batch_traced(&self, messages: Vec<Message>) {
        if messages.len() == 1 {
            for message in messages {
                self.handle(message).await;
            }
            return;
        }
        let events: Vec<Option<EventEnvelope>> = messages
            .iter()
            .map(|message| serde_json::from_slice(&message.payload).ok())
            .collect();
        if events.iter().any(Option::is_none) {
            for message in messages {
                self.handle(message).await;
            }
            return;
        }
        let events: Vec<EventEnvelope> = events.into_iter().flatten().collect();
        match self.apply_all(&events).await {
            Ok(positions) => {
                for ((message, event), position) in messages.iter().zip(&events).zip(positions) {
                    let outcome = match position {
                        Position::Applied => Outcome::Applied,
                        Position::AlreadyApplied => Outcome::Skipped,
                        Position::Gap { .. } => Outcome::Gap,
                    };
                    self.settle(message, outcome, event).await;
                }
            }
            Err(error) => {
                tracing::debug!(projection = P::NAME, %error, "batch failed; applying one by one");
                // The one-by-one path reads every position afresh and moves them itself.
                {
                    let mut known = self.known.lock();
                    for event in &events {
                        known.forget(&event.aggregate_type, &event.aggregate_id);
                    }
                }
                for message in messages {
                    self.handle(message).await;
                }
            }
        }
    }

    /// Acks or naks a message after its event was handled, and counts it.
    async fn settle(&self, message: &Message, outcome: Outcome, event: &EventEnvelope) {
        record_lag::<P>(event);
        self.acknowledge(message, outcome).await;
    }

    /// Acks a message whose fate is sealed (applied, skipped, dead-lettered) or naks it to come
    /// back after the retry delay (a gap, a failure that may pass), and counts the outcome.
    async fn acknowledge(&self, message: &Message, outcome: Outcome) {
        let ack = match outcome {
            Outcome::Applied | Outcome::Skipped | Outcome::DeadLettered => {
                message.ack_with(AckKind::Ack).await
            }
            Outcome::Gap | Outcome::Retried => {
                message
                    .ack_with(AckKind::Nak(Some(self.settings.retry_delay)))
                    .await
            }
        };
        if let Err(error) = ack {
            // The message comes back after ack_wait; the position check makes that harmless.
            tracing::warn!(projection = P::NAME, %error, "cannot acknowledge message");
        }
        metrics::counter!("fleetlog_projection_events_total",
            "projection" => P::NAME, "outcome" => outcome.label())
        .increment(1);
    }

    /// Handles one message to the end: applied and acked, or naked, or dead-lettered.
    pub async fn handle(&self, message: Message) -> Outcome {
        let (delivered, pending) = message
            .info()
            .map(|info| (info.delivered, info.pending))
            .unwrap_or((1, 0));
        metrics::gauge!("fleetlog_projection_pending_events", "projection" => P::NAME)
            .set(pending as f64);
        let outcome = match serde_json::from_slice::<EventEnvelope>(&message.payload) {
            Err(error) => {
                // Without an envelope there is no aggregate to move past: record and drop.
                self.dead_letter(&message, None, &format!("not an event envelope: {error}"))
                    .await
            }
            Ok(event) => {
                record_lag::<P>(&event);
                self.handle_event(&message, &event, delivered).await
            }
        };
        self.acknowledge(&message, outcome).await;
        outcome
    }

    async fn handle_event(
        &self,
        message: &Message,
        event: &EventEnvelope,
        delivered: i64,
    ) -> Outcome {
        let result = self.apply_once(event).await;
        {
            let mut known = self.known.lock();
            match result {
                Ok(Position::Applied) => {
                    known.remember(&event.aggregate_type, &event.aggregate_id, event.sequence);
                }
                _ => known.forget(&event.aggregate_type, &event.aggregate_id),
            }
        }
        match result {
            Ok(Position::Applied) => Outcome::Applied,
            Ok(Position::AlreadyApplied) => Outcome::Skipped,
            Ok(Position::Gap { expected }) => {
                tracing::debug!(
                    projection = P::NAME,
                    aggregate_id = event.aggregate_id,
                    sequence = event.sequence,
                    expected,
                    "gap: waiting for an earlier event"
                );
                Outcome::Gap
            }
            Err(error) if error.is_transient() => {
                tracing::warn!(projection = P::NAME, %error, "cannot apply event; will retry");
                Outcome::Retried
            }
            Err(error) if delivered < self.settings.max_deliveries => {
                tracing::warn!(
                    projection = P::NAME,
                    message_id = event.message_id(),
                    delivered,
                    %error,
                    "cannot apply event; will retry"
                );
                Outcome::Retried
            }
            Err(error) => {
                let reason = format!("failed {delivered} times: {error}");
                self.dead_letter(message, Some(event), &reason).await
            }
        }
    }

    async fn apply_once(&self, event: &EventEnvelope) -> Result<Position, ProjectionError> {
        let mut tx = self.pool.begin().await?;
        let mut position = apply_event(&self.projection, &mut tx, event).await?;
        if let Position::Gap { expected } = position {
            let filled = positions::fill_gap(&self.projection, &mut tx, event, expected).await?;
            if !filled.is_empty() {
                position = apply_event(&self.projection, &mut tx, event).await?;
            }
        }
        tx.commit().await?;
        Ok(position)
    }
}

/// How long ago `event` was recorded, as the projection's lag.
fn record_lag<P: Projection>(event: &EventEnvelope) {
    let lag = chrono::Utc::now() - event.recorded_at;
    metrics::gauge!("fleetlog_projection_lag_seconds", "projection" => P::NAME)
        .set(lag.num_milliseconds() as f64 / 1000.0);
}

/// Deletes the durable consumer of `projection`, left from when a worker fed it, now that the
/// write side keeps it inline. Events that consumer had not acked were applied inline only if
/// they were appended after the upgrade (and older ones a device's next event catches up): if
/// there were any, a warning says to replay the model.
async fn retire_consumer_of_inline(
    stream: &async_nats::jetstream::stream::Stream,
    projection: &str,
) -> Result<(), async_nats::Error> {
    let info = match stream.consumer_info(projection).await {
        Ok(info) => info,
        Err(error)
            if error.kind() == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
        {
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    };
    let left = info.num_pending + info.num_ack_pending as u64;
    if left > 0 {
        tracing::warn!(
            projection,
            events_left = left,
            "the {projection} read model is now kept by the write side, but its old consumer \
             had events left; run `fleetlog replay {projection}` to be sure it has them all"
        );
    }
    stream.delete_consumer(projection).await?;
    tracing::info!(
        projection,
        "removed the {projection} consumer: the write side keeps its read model"
    );
    Ok(())
}
