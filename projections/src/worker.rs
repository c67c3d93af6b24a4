//! The projection worker: feeds one projection from its durable JetStream pull consumer.
//!
//! For each message, in one Postgres transaction: read the projection's position for the
//! event's aggregate, compare the event's sequence with the last one applied, apply the event
//! and move the position. The message is acked only after the commit. So:
//!
//! - sequence at or below the position: already applied (a redelivery): ack, skip;
//! - sequence beyond position + 1: an earlier event has not been applied yet: nak with a delay,
//!   it comes back once the earlier one is in;
//! - the next sequence: apply.
//!
//! Several workers of one projection (in one or many processes) share the durable consumer; the
//! position's lock keeps them from applying one aggregate's events twice or out of order.
//!
//! Where the positions live is the projection's choice ([`Positions`]): rows of
//! `projection_positions`, a column of the projection's own table that its writes set anyway,
//! or nowhere, for a projection whose rows are keyed by the event so that applying one twice
//! changes nothing. The last two spare the busiest projections a second row write per event.
//! A message that keeps failing is dead-lettered after `max_deliveries`: recorded with its
//! reason in `projection_dead_letters` and published on `fleetlog.deadletter.{projection}`, its
//! position moved past it, and acked, so it blocks nothing. Database outages are retried without
//! limit instead.

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
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

pub use fleetlog_nats::topology::{DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM};

/// A read model fed by the events of one aggregate type.
pub trait Projection: Send + Sync + 'static {
    /// The projection's name: its durable consumer and its key in `projection_positions`.
    const NAME: &'static str;
    /// The aggregate type whose events it reads.
    const AGGREGATE_TYPE: &'static str;
    /// The read-model tables it writes, and nothing else writes. Replay rebuilds exactly these.
    const TABLES: &'static [&'static str];
    /// Where it keeps which events it has applied.
    const POSITIONS: Positions = Positions::Shared;

    /// Applies one event, inside the transaction that also moves the projection's position.
    fn apply(
        &self,
        connection: &mut PgConnection,
        event: &EventEnvelope,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies several events, in the order given (each one the next of its aggregate), inside
    /// one transaction. The default applies them one by one; a projection may do it set-wise.
    /// The result must equal applying them one by one: replay does that.
    fn apply_batch(
        &self,
        connection: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        async move {
            for event in events {
                self.apply(connection, event).await?;
            }
            Ok(())
        }
    }

    /// Whether `event` is in the model already: how read-your-writes asks a
    /// [`Positions::Keyed`] projection, which keeps no positions. Projections with positions
    /// are asked through them and need not implement it.
    fn contains(
        &self,
        connection: &mut PgConnection,
        event: &EventEnvelope,
    ) -> impl Future<Output = Result<bool, ProjectionError>> + Send {
        let _ = (connection, event);
        async { Ok(false) }
    }
}

/// What a worker applies besides its own projection: nothing ([`Alone`]), or a keyed
/// projection riding along ([`Alongside`]).
pub trait Companion: Send + Sync + 'static {
    /// The name of the riding projection, if there is one.
    const NAME: Option<&'static str>;

    /// Applies `events` (every event delivered, whatever the worker's projection judged of
    /// them) inside the worker's transaction.
    fn apply_batch(
        &self,
        connection: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// No companion: the worker applies its own projection only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alone;

impl Companion for Alone {
    const NAME: Option<&'static str> = None;

    async fn apply_batch(
        &self,
        _: &mut PgConnection,
        _: &[&EventEnvelope],
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
}

/// A [`Positions::Keyed`] projection fed by another projection's worker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Alongside<K: Projection>(pub K);

impl<K: Projection> Companion for Alongside<K> {
    const NAME: Option<&'static str> = Some(K::NAME);

    fn apply_batch(
        &self,
        connection: &mut PgConnection,
        events: &[&EventEnvelope],
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        self.0.apply_batch(connection, events)
    }
}

/// Where a projection keeps which events it has applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// One row per aggregate in `projection_positions`, locked, judged and moved by the worker
    /// in the transaction that applies the events.
    Shared,
    /// A column of the projection's own table, one row per aggregate, that every applied event
    /// sets to its sequence (as `devices.last_sequence`): no second row to write per event. An
    /// aggregate without a row is at 0.
    ///
    /// The projection's writes must be compare-and-set: a write for event `n` changes the row
    /// only where the column holds `n - 1`, and fails with [`ProjectionError::PositionMoved`]
    /// otherwise. That lets the worker judge a batch against the positions it committed last
    /// without reading the rows: a stale guess fails the batch instead of applying twice.
    Own(OwnPositions),
    /// Nowhere: the projection's rows are keyed by the event they come from and rows it has
    /// already are skipped (`ON CONFLICT DO NOTHING`), so applying an event again changes
    /// nothing and events apply in any order. No gaps are waited for.
    Keyed,
}

/// The table and columns of [`Positions::Own`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnPositions {
    /// The table with one row per aggregate.
    pub table: &'static str,
    /// Its column holding the aggregate id.
    pub id_column: &'static str,
    /// Its column holding the sequence of the last event applied.
    pub sequence_column: &'static str,
}

impl OwnPositions {
    /// Locks the aggregate's row, if it has one, and returns its sequence (0 without a row).
    async fn lock(&self, connection: &mut PgConnection, id: &str) -> Result<i64, sqlx::Error> {
        let Self {
            table,
            id_column,
            sequence_column,
        } = self;
        let sequence: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT {sequence_column} FROM {table} WHERE {id_column} = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(connection)
        .await?;
        Ok(sequence.unwrap_or(0))
    }

    /// The sequences of those of `ids` that have a row.
    async fn read_many(
        &self,
        connection: &mut PgConnection,
        ids: &[&str],
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let Self {
            table,
            id_column,
            sequence_column,
        } = self;
        sqlx::query_as(&format!(
            "SELECT {id_column}, {sequence_column} FROM {table} WHERE {id_column} = ANY($1)"
        ))
        .bind(ids)
        .fetch_all(connection)
        .await
    }

    /// Moves the aggregate's row past `sequence` (a dead letter), if it has a row.
    async fn move_past(
        &self,
        connection: &mut PgConnection,
        id: &str,
        sequence: i64,
    ) -> Result<(), sqlx::Error> {
        let Self {
            table,
            id_column,
            sequence_column,
        } = self;
        sqlx::query(&format!(
            "UPDATE {table} SET {sequence_column} = $2
              WHERE {id_column} = $1 AND {sequence_column} < $2"
        ))
        .bind(id)
        .bind(sequence)
        .execute(connection)
        .await?;
        Ok(())
    }
}

/// Whether `projection` has applied `event`: read-your-writes asks this.
pub async fn has_applied<P: Projection>(
    projection: &P,
    pool: &PgPool,
    event: &EventEnvelope,
) -> Result<bool, ProjectionError> {
    let applied = match P::POSITIONS {
        Positions::Shared => {
            let sequence: Option<i64> = sqlx::query_scalar(
                "SELECT last_sequence FROM projection_positions
                  WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
            )
            .bind(P::NAME)
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .fetch_optional(pool)
            .await?;
            sequence.is_some_and(|sequence| sequence >= event.sequence)
        }
        Positions::Own(own) => {
            let mut connection = pool.acquire().await?;
            let stored = own
                .read_many(&mut connection, &[event.aggregate_id.as_str()])
                .await?;
            stored
                .first()
                .is_some_and(|(_, sequence)| *sequence >= event.sequence)
        }
        Positions::Keyed => {
            let mut connection = pool.acquire().await?;
            projection.contains(&mut connection, event).await?
        }
    };
    Ok(applied)
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The event does not read as an event of the aggregate type.
    #[error("cannot read the event: {0}")]
    Undecodable(#[from] serde_json::Error),
    /// Postgres refused or failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A position moved under a batch (another worker, a replay); the batch was not committed.
    #[error("a projection position moved while the batch was applied")]
    PositionMoved,
}

impl ProjectionError {
    /// Failures that come from the event itself and would come again however often it is
    /// applied: it does not decode, or Postgres refuses its data (SQLSTATE class 22, data
    /// exception, such as a NUL that jsonb cannot hold; class 23, integrity constraint).
    /// Anything else (a timeout, a deadlock, a full disk) says nothing about the event.
    pub(crate) fn is_about_the_event(&self) -> bool {
        match self {
            Self::Undecodable(_) => true,
            Self::Database(error) => error
                .as_database_error()
                .and_then(|error| error.code())
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            Self::PositionMoved => false,
        }
    }

    /// Failures that say nothing about the event (Postgres unreachable, pool exhausted):
    /// retried for as long as they last, never dead-lettered.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

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

/// Runs one projection (and its companion, if it has one).
pub struct Worker<P: Projection, C: Companion = Alone> {
    projection: P,
    companion: C,
    pool: PgPool,
    jetstream: Context,
    settings: WorkerSettings,
    known: KnownPositions,
}

/// The positions this worker committed last, per aggregate: a hint that saves reading position
/// rows, never trusted on its own (the batch's closing UPDATE checks each one for
/// [`Positions::Shared`], the projection's compare-and-set writes for [`Positions::Own`]).
struct KnownPositions {
    state: Mutex<Known>,
    capacity: usize,
}

/// Last sequence by aggregate type, then id (nested so a look-up by `&str` allocates nothing).
#[derive(Default)]
struct Known {
    sequences: HashMap<String, HashMap<String, i64>>,
    len: usize,
}

/// The remembered positions, locked for a moment (never across an await).
struct KnownPositionsGuard<'a> {
    known: MutexGuard<'a, Known>,
    capacity: usize,
}

impl KnownPositions {
    fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(Known::default()),
            capacity,
        }
    }

    fn lock(&self) -> KnownPositionsGuard<'_> {
        KnownPositionsGuard {
            // A panic elsewhere cannot leave a wrong value behind: every value is checked.
            known: self.state.lock().unwrap_or_else(PoisonError::into_inner),
            capacity: self.capacity,
        }
    }
}

impl KnownPositionsGuard<'_> {
    fn get(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        self.known
            .sequences
            .get(aggregate_type)
            .and_then(|ids| ids.get(aggregate_id))
            .copied()
    }

    fn remember(&mut self, aggregate_type: &str, aggregate_id: &str, sequence: i64) {
        if self.capacity == 0 {
            return;
        }
        if self.known.len >= self.capacity {
            *self.known = Known::default();
        }
        let ids = self
            .known
            .sequences
            .entry(aggregate_type.to_owned())
            .or_default();
        match ids.get_mut(aggregate_id) {
            Some(known) => *known = sequence,
            None => {
                ids.insert(aggregate_id.to_owned(), sequence);
                self.known.len += 1;
            }
        }
    }

    fn forget(&mut self, aggregate_type: &str, aggregate_id: &str) {
        let removed = self
            .known
            .sequences
            .get_mut(aggregate_type)
            .and_then(|ids| ids.remove(aggregate_id));
        if removed.is_some() {
            self.known.len -= 1;
        }
    }
}

/// An aggregate as the worker keys positions: type, then id.
type AggregateKey<'a> = (&'a str, &'a str);

/// Where an event stood against the projection's position for its aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// It was the next one: applied.
    Applied,
    /// Applied before: nothing done.
    AlreadyApplied,
    /// An earlier event is missing: nothing done.
    Gap {
        /// The sequence the projection waits for.
        expected: i64,
    },
}

/// Applies `event` to `projection` on `connection` (inside the caller's transaction) unless the
/// projection's position for its aggregate says it is not the next one. Shared by the live
/// worker and replay, so both judge sequences alike.
pub async fn apply_event<P: Projection>(
    projection: &P,
    connection: &mut PgConnection,
    event: &EventEnvelope,
) -> Result<Position, ProjectionError> {
    let last = match P::POSITIONS {
        Positions::Shared => lock_position(connection, P::NAME, event).await?,
        Positions::Own(own) => own.lock(connection, &event.aggregate_id).await?,
        Positions::Keyed => {
            projection.apply(connection, event).await?;
            return Ok(Position::Applied);
        }
    };
    if event.sequence <= last {
        return Ok(Position::AlreadyApplied);
    }
    if event.sequence > last + 1 {
        return Ok(Position::Gap { expected: last + 1 });
    }
    projection.apply(connection, event).await?;
    if P::POSITIONS == Positions::Shared {
        store_position(connection, P::NAME, event).await?;
    }
    Ok(Position::Applied)
}

/// `a == b`, in a const context.
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Judges `events`, in order, against `last` (the last applied sequence per aggregate, 0 when
/// missing) as [`apply_event`] would one by one, moving `last` along. Returns each event's
/// position and the events to apply.
fn judge<'a>(
    events: &'a [EventEnvelope],
    last: &mut HashMap<(&'a str, &'a str), i64>,
) -> (Vec<Position>, Vec<&'a EventEnvelope>) {
    let mut positions = Vec::with_capacity(events.len());
    let mut applied = Vec::with_capacity(events.len());
    for event in events {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        let current = last.get(&key).copied().unwrap_or(0);
        let position = if event.sequence <= current {
            Position::AlreadyApplied
        } else if event.sequence > current + 1 {
            Position::Gap {
                expected: current + 1,
            }
        } else {
            last.insert(key, event.sequence);
            applied.push(event);
            Position::Applied
        };
        positions.push(position);
    }
    (positions, applied)
}

impl<P: Projection> Worker<P> {
    /// A worker for `projection`.
    pub fn new(projection: P, pool: PgPool, jetstream: Context, settings: WorkerSettings) -> Self {
        Self {
            projection,
            companion: Alone,
            pool,
            jetstream,
            known: KnownPositions::new(settings.known_positions),
            settings,
        }
    }

    /// This worker, applying the keyed projection `rider` as well to every event it is
    /// delivered, in the same transactions. The rider's read model is then fed by this
    /// worker's consumer: run no worker of its own beside it.
    pub fn alongside<K: Projection>(self, rider: K) -> Worker<P, Alongside<K>> {
        const {
            assert!(
                matches!(K::POSITIONS, Positions::Keyed),
                "only a keyed projection can ride along"
            );
            assert!(
                same_str(K::AGGREGATE_TYPE, P::AGGREGATE_TYPE),
                "a rider reads the events of the same aggregate type"
            );
        };
        Worker {
            projection: self.projection,
            companion: Alongside(rider),
            pool: self.pool,
            jetstream: self.jetstream,
            settings: self.settings,
            known: self.known,
        }
    }
}

impl<P: Projection, C: Companion> Worker<P, C> {
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
        if let Some(rider) = C::NAME {
            retire_consumer_of(&stream, rider, P::NAME).await?;
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
        let mut messages = consumer
            .messages()
            .await?
            .ready_chunks(self.settings.max_batch.max(1));
        tracing::info!(projection = P::NAME, "projection consuming");
        let mut heartbeats = fleetlog_nats::HeartbeatWatch::default();
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let Some(received) = next else {
                return Err("the consumer's message stream ended".into());
            };
            let mut batch = Vec::with_capacity(received.len());
            let mut failure = None;
            for message in received {
                // A busy worker polls late: go on, unless nothing but missed heartbeats comes
                // any more (then the pull is lost and the consumer is set up again).
                match heartbeats.check(message) {
                    Ok(Some(message)) => batch.push(message),
                    Ok(None) => {}
                    Err(error) => failure = Some(error),
                }
            }
            self.handle_batch(batch).await;
            if let Some(error) = failure {
                return Err(error.into());
            }
        }
    }

    /// Handles the messages that arrived together: applied in one transaction when all goes
    /// well, else one by one (so a failing message is retried or dead-lettered on its own).
    pub async fn handle_batch(&self, messages: Vec<Message>) {
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

    /// Applies `events` in order in one transaction, judged against the projection's
    /// positions wherever it keeps them.
    async fn apply_all(&self, events: &[EventEnvelope]) -> Result<Vec<Position>, ProjectionError> {
        match P::POSITIONS {
            Positions::Shared => self.apply_all_shared(events).await,
            Positions::Own(own) => self.apply_all_own(own, events).await,
            Positions::Keyed => {
                let mut tx = self.pool.begin().await?;
                let all: Vec<&EventEnvelope> = events.iter().collect();
                self.projection.apply_batch(&mut tx, &all).await?;
                self.companion.apply_batch(&mut tx, &all).await?;
                tx.commit().await?;
                Ok(vec![Position::Applied; events.len()])
            }
        }
    }

    /// [`Positions::Own`]: judges the batch against the positions this worker committed last
    /// ([`KnownPositions`]) and reads the others, unlocked. Neither is trusted on its own: the
    /// projection's writes are compare-and-set (each fails with [`ProjectionError::PositionMoved`]
    /// unless its row stood at the event's sequence - 1), so a row that another worker or a
    /// replay moved meanwhile makes the batch fail and the caller go one by one, locking each row.
    async fn apply_all_own(
        &self,
        own: OwnPositions,
        events: &[EventEnvelope],
    ) -> Result<Vec<Position>, ProjectionError> {
        let (mut last, unknown) = self.remembered(events);
        let mut tx = self.pool.begin().await?;
        if !unknown.is_empty() {
            let ids: Vec<&str> = unknown.iter().map(|(_, id)| *id).collect();
            let stored = own.read_many(&mut tx, &ids).await?;
            let stored: HashMap<&str, i64> = stored
                .iter()
                .map(|(id, sequence)| (id.as_str(), *sequence))
                .collect();
            for key in &unknown {
                if let Some(sequence) = stored.get(key.1) {
                    last.insert(*key, *sequence);
                }
            }
        }
        let (positions, applied) = judge(events, &mut last);
        if !applied.is_empty() {
            self.projection.apply_batch(&mut tx, &applied).await?;
        }
        let all: Vec<&EventEnvelope> = events.iter().collect();
        self.companion.apply_batch(&mut tx, &all).await?;
        tx.commit().await?;
        let mut known = self.known.lock();
        for event in applied {
            known.remember(&event.aggregate_type, &event.aggregate_id, event.sequence);
        }
        Ok(positions)
    }

    /// Splits the batch's aggregates into those whose remembered position can stand in for
    /// their row (returned as the judge's starting point) and those whose row must be read.
    /// Only a remembered position followed by the very next event is used; anything else (a
    /// redelivery, a gap) is judged against the row itself.
    fn remembered<'a>(
        &self,
        events: &'a [EventEnvelope],
    ) -> (HashMap<AggregateKey<'a>, i64>, Vec<AggregateKey<'a>>) {
        let mut last: HashMap<AggregateKey, i64> = HashMap::new();
        let mut unknown: Vec<AggregateKey> = Vec::new();
        let mut seen: HashSet<AggregateKey> = HashSet::new();
        let known = self.known.lock();
        for event in events {
            let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
            if !seen.insert(key) {
                continue;
            }
            match known.get(key.0, key.1) {
                Some(sequence) if event.sequence == sequence + 1 => {
                    last.insert(key, sequence);
                }
                _ => unknown.push(key),
            }
        }
        (last, unknown)
    }

    /// [`Positions::Shared`]: applies `events` in order in one transaction.
    ///
    /// Aggregates this worker committed last (see [`KnownPositions`]) need no read of their
    /// position rows; the others are read and locked, in a fixed order. The closing UPDATE
    /// moves each position only if it still holds the value the batch was judged against
    /// (compare-and-set): if another worker or a replay moved one meanwhile, nothing commits
    /// and the caller goes one by one, which reads every position afresh.
    async fn apply_all_shared(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<Position>, ProjectionError> {
        let (mut last, mut unknown) = self.remembered(events);
        let mut tx = self.pool.begin().await?;
        if !unknown.is_empty() {
            unknown.sort_unstable();
            let (types, ids): (Vec<&str>, Vec<&str>) = unknown.iter().copied().unzip();
            sqlx::query(
                "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, last_sequence)
                 SELECT $1, t, i, 0 FROM UNNEST($2::text[], $3::text[]) AS a(t, i)
                 ON CONFLICT DO NOTHING",
            )
            .bind(P::NAME)
            .bind(&types)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            let locked: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT p.aggregate_type, p.aggregate_id, p.last_sequence FROM projection_positions p
                   JOIN UNNEST($2::text[], $3::text[]) AS a(t, i)
                     ON p.aggregate_type = a.t AND p.aggregate_id = a.i
                  WHERE p.projection = $1
                  ORDER BY p.aggregate_type, p.aggregate_id
                    FOR UPDATE OF p",
            )
            .bind(P::NAME)
            .bind(&types)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            let locked: HashMap<(String, String), i64> = locked
                .into_iter()
                .map(|(kind, id, sequence)| ((kind, id), sequence))
                .collect();
            for key in &unknown {
                if let Some(sequence) = locked.get(&(key.0.to_owned(), key.1.to_owned())) {
                    last.insert(*key, *sequence);
                }
            }
        }
        let judged_against = last.clone();
        let (positions, applied) = judge(events, &mut last);
        let all: Vec<&EventEnvelope> = events.iter().collect();
        self.companion.apply_batch(&mut tx, &all).await?;
        if applied.is_empty() {
            tx.commit().await?;
            return Ok(positions);
        }
        self.projection.apply_batch(&mut tx, &applied).await?;
        let mut moved: Vec<(&str, &str)> = applied
            .iter()
            .map(|e| (e.aggregate_type.as_str(), e.aggregate_id.as_str()))
            .collect();
        moved.sort_unstable();
        moved.dedup();
        let mut moved_types = Vec::with_capacity(moved.len());
        let mut moved_ids = Vec::with_capacity(moved.len());
        let mut expected = Vec::with_capacity(moved.len());
        let mut sequences = Vec::with_capacity(moved.len());
        for key in &moved {
            moved_types.push(key.0);
            moved_ids.push(key.1);
            expected.push(judged_against.get(key).copied().unwrap_or(0));
            sequences.push(last[key]);
        }
        let updated = sqlx::query(
            "UPDATE projection_positions p SET last_sequence = a.s
               FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS a(t, i, e, s)
              WHERE p.projection = $1 AND p.aggregate_type = a.t AND p.aggregate_id = a.i
                AND p.last_sequence = a.e",
        )
        .bind(P::NAME)
        .bind(&moved_types)
        .bind(&moved_ids)
        .bind(&expected)
        .bind(&sequences)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != moved.len() as u64 {
            return Err(ProjectionError::PositionMoved);
        }
        tx.commit().await?;
        let mut known = self.known.lock();
        for (key, sequence) in moved.iter().zip(sequences) {
            known.remember(key.0, key.1, sequence);
        }
        Ok(positions)
    }

    /// Acks or naks a message after its event was handled, and counts it.
    async fn settle(&self, message: &Message, outcome: Outcome, event: &EventEnvelope) {
        let lag = chrono::Utc::now() - event.recorded_at;
        metrics::gauge!("fleetlog_projection_lag_seconds", "projection" => P::NAME)
            .set(lag.num_milliseconds() as f64 / 1000.0);
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
                let lag = chrono::Utc::now() - event.recorded_at;
                metrics::gauge!("fleetlog_projection_lag_seconds", "projection" => P::NAME)
                    .set(lag.num_milliseconds() as f64 / 1000.0);
                self.handle_event(&message, &event, delivered).await
            }
        };
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
        outcome
    }

    async fn handle_event(
        &self,
        message: &Message,
        event: &EventEnvelope,
        delivered: i64,
    ) -> Outcome {
        let result = self.apply_once(event).await;
        if P::POSITIONS != Positions::Keyed {
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
        let position = apply_event(&self.projection, &mut tx, event).await?;
        self.companion.apply_batch(&mut tx, &[event]).await?;
        tx.commit().await?;
        Ok(position)
    }

    /// Records the message as dead, moves the position past it (so the aggregate's later
    /// events are not stuck behind it) and publishes it on the dead-letter subject. A
    /// companion does not get the event either; a replay of its model tries it again.
    async fn dead_letter(
        &self,
        message: &Message,
        event: Option<&EventEnvelope>,
        reason: &str,
    ) -> Outcome {
        tracing::error!(projection = P::NAME, reason, "dead-lettering message");
        let body = String::from_utf8_lossy(&message.payload).into_owned();
        let recorded = async {
            let mut tx = self.pool.begin().await?;
            if let Some(event) = event {
                move_position_past::<P>(&mut tx, event).await?;
            }
            sqlx::query(
                "INSERT INTO projection_dead_letters
                   (projection, aggregate_type, aggregate_id, sequence, reason, message)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(P::NAME)
            .bind(event.map(|e| e.aggregate_type.as_str()))
            .bind(event.map(|e| e.aggregate_id.as_str()))
            .bind(event.map(|e| e.sequence))
            .bind(reason)
            .bind(&body)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        };
        if let Err(error) = recorded.await {
            tracing::warn!(projection = P::NAME, %error, "cannot record dead letter; will retry");
            return Outcome::Retried;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Fleetlog-Projection", P::NAME);
        headers.insert(
            "Fleetlog-Reason",
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        if let Some(event) = event {
            headers.insert(
                "Nats-Msg-Id",
                format!("{}:{}", P::NAME, event.message_id()).as_str(),
            );
        }
        let subject = format!("{DEAD_LETTER_PREFIX}.{}", P::NAME);
        let published = self
            .jetstream
            .publish_with_headers(subject, headers, Bytes::from(body))
            .await;
        match published {
            Ok(ack) => {
                if let Err(error) = ack.await {
                    tracing::warn!(projection = P::NAME, %error, "dead letter not confirmed by JetStream; it is in projection_dead_letters");
                }
            }
            Err(error) => {
                tracing::warn!(projection = P::NAME, %error, "cannot publish dead letter; it is in projection_dead_letters");
            }
        }
        Outcome::DeadLettered
    }
}

/// Deletes the durable consumer of `rider`, left from when it ran on its own, now that the
/// worker of `carrier` feeds it. Events that consumer had not acked were applied by the
/// carrier only if it had not acked them itself: if there were any, a warning says to replay
/// the rider's model.
async fn retire_consumer_of(
    stream: &async_nats::jetstream::stream::Stream,
    rider: &str,
    carrier: &str,
) -> Result<(), async_nats::Error> {
    let info = match stream.consumer_info(rider).await {
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
            projection = rider,
            events_left = left,
            "the {rider} read model is now fed by the {carrier} worker, but its own consumer \
             had events left; run `fleetlog replay {rider}` to be sure it has them all"
        );
    }
    stream.delete_consumer(rider).await?;
    tracing::info!(
        projection = rider,
        "removed the {rider} consumer: the {carrier} worker feeds its read model"
    );
    Ok(())
}

/// Moves `P`'s position for the event's aggregate past the event without applying it: how a
/// dead letter is passed over, so the aggregate's later events are not stuck behind it.
pub(crate) async fn move_position_past<P: Projection>(
    connection: &mut PgConnection,
    event: &EventEnvelope,
) -> Result<(), sqlx::Error> {
    match P::POSITIONS {
        Positions::Shared => {
            let last = lock_position(connection, P::NAME, event).await?;
            if event.sequence > last {
                store_position(connection, P::NAME, event).await?;
            }
        }
        Positions::Own(own) => {
            own.move_past(connection, &event.aggregate_id, event.sequence)
                .await?;
        }
        Positions::Keyed => {}
    }
    Ok(())
}

/// Locks the projection's position row for the event's aggregate (creating it at 0) and
/// returns the last sequence applied.
async fn lock_position(
    connection: &mut PgConnection,
    projection: &str,
    event: &EventEnvelope,
) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, last_sequence)
         VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING",
    )
    .bind(projection)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .execute(&mut *connection)
    .await?;
    sqlx::query_scalar(
        "SELECT last_sequence FROM projection_positions
          WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3 FOR UPDATE",
    )
    .bind(projection)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .fetch_one(&mut *connection)
    .await
}

async fn store_position(
    connection: &mut PgConnection,
    projection: &str,
    event: &EventEnvelope,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_positions SET last_sequence = $4
          WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(projection)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .execute(&mut *connection)
    .await?;
    Ok(())
}
