//! Which events a projection has applied, wherever it keeps that (its [`Positions`]), and
//! how an event is judged against them: already applied, next, or after a gap.

use super::*;
use fleetlog_eventlog::{HistoryQuery, SequenceRange};

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

/// Locks the row of `aggregate_id` in the table of a projection that keeps its positions there
/// ([`Positions::Own`]) and returns the sequence it holds: 0 without a row (or for a projection
/// that keeps them elsewhere).
pub(crate) async fn own_position<P: Projection>(
    connection: &mut PgConnection,
    aggregate_id: &str,
) -> Result<i64, sqlx::Error> {
    match P::POSITIONS {
        Positions::Own(own) => own.lock(connection, aggregate_id).await,
        Positions::Shared | Positions::Keyed => Ok(0),
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

/// The positions this worker committed last, per aggregate: a hint that saves reading position
/// rows, never trusted on its own (the batch's closing UPDATE checks each one for
/// [`Positions::Shared`], the projection's compare-and-set writes for [`Positions::Own`]).
pub(super) struct KnownPositions {
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
pub(super) struct KnownPositionsGuard<'a> {
    known: MutexGuard<'a, Known>,
    capacity: usize,
}

impl KnownPositions {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(Known::default()),
            capacity,
        }
    }

    pub(super) fn lock(&self) -> KnownPositionsGuard<'_> {
        KnownPositionsGuard {
            // A panic elsewhere cannot leave a wrong value behind: every value is checked.
            known: self.state.lock().unwrap_or_else(PoisonError::into_inner),
            capacity: self.capacity,
        }
    }
}

impl KnownPositionsGuard<'_> {
    pub(super) fn get(&self, aggregate_type: &str, aggregate_id: &str) -> Option<i64> {
        self.known
            .sequences
            .get(aggregate_type)
            .and_then(|ids| ids.get(aggregate_id))
            .copied()
    }

    pub(super) fn remember(&mut self, aggregate_type: &str, aggregate_id: &str, sequence: i64) {
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

    pub(super) fn forget(&mut self, aggregate_type: &str, aggregate_id: &str) {
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

/// Applies `events` (in order) set-wise on `connection`: judges them all against positions
/// read once, applies those that are next with one `apply_batch`, and moves the positions in
/// one statement. Answers `false` if an event follows a gap: then what it wrote must be rolled
/// back by the caller, who goes one by one instead. Only for a writer alone on its tables
/// (replay's shadow), where nobody moves a position meanwhile.
pub(crate) async fn apply_judged<P: Projection>(
    projection: &P,
    connection: &mut PgConnection,
    events: &[EventEnvelope],
) -> Result<bool, ProjectionError> {
    let all: Vec<&EventEnvelope> = events.iter().collect();
    let mut keys: Vec<AggregateKey> = Vec::new();
    let mut seen: HashSet<AggregateKey> = HashSet::new();
    for event in events {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        if seen.insert(key) {
            keys.push(key);
        }
    }
    let mut last: HashMap<AggregateKey, i64> = HashMap::new();
    match P::POSITIONS {
        Positions::Keyed => {
            projection.apply_batch(connection, &all).await?;
            return Ok(true);
        }
        Positions::Own(own) => {
            let ids: Vec<&str> = keys.iter().map(|key| key.1).collect();
            let stored: HashMap<String, i64> =
                own.read_many(connection, &ids).await?.into_iter().collect();
            for key in &keys {
                if let Some(sequence) = stored.get(key.1) {
                    last.insert(*key, *sequence);
                }
            }
        }
        Positions::Shared => {
            read_shared_positions(connection, P::NAME, &keys, Locking::No, &mut last).await?;
        }
    }
    let (positions, applied) = judge(&all, &mut last);
    if positions.iter().any(|p| matches!(p, Position::Gap { .. })) {
        return Ok(false);
    }
    if applied.is_empty() {
        return Ok(true);
    }
    projection.apply_batch(connection, &applied).await?;
    if P::POSITIONS == Positions::Shared {
        let moved: Vec<(&str, &str, i64)> = keys
            .iter()
            .filter_map(|key| last.get(key).map(|sequence| (key.0, key.1, *sequence)))
            .collect();
        let types: Vec<&str> = moved.iter().map(|m| m.0).collect();
        let ids: Vec<&str> = moved.iter().map(|m| m.1).collect();
        let sequences: Vec<i64> = moved.iter().map(|m| m.2).collect();
        sqlx::query(
            "INSERT INTO projection_positions (projection, aggregate_type, aggregate_id, last_sequence)
             SELECT $1, t, i, s FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS a(t, i, s)
             ON CONFLICT (projection, aggregate_type, aggregate_id)
             DO UPDATE SET last_sequence = EXCLUDED.last_sequence",
        )
        .bind(P::NAME)
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .execute(&mut *connection)
        .await?;
    }
    Ok(true)
}

/// Whether [`read_shared_positions`] locks the rows it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locking {
    /// A writer alone on its tables (replay's shadow).
    No,
    /// Locked in a fixed order, so concurrent workers cannot deadlock.
    ForUpdate,
}

/// Reads the `projection_positions` rows of `keys` into `last` (a key without a row stays out).
async fn read_shared_positions<'a>(
    connection: &mut PgConnection,
    projection: &str,
    keys: &[AggregateKey<'a>],
    locking: Locking,
    last: &mut HashMap<AggregateKey<'a>, i64>,
) -> Result<(), sqlx::Error> {
    const READ: &str = "SELECT p.aggregate_type, p.aggregate_id, p.last_sequence
           FROM projection_positions p
           JOIN UNNEST($2::text[], $3::text[]) AS a(t, i)
             ON p.aggregate_type = a.t AND p.aggregate_id = a.i
          WHERE p.projection = $1";
    let select = match locking {
        Locking::No => READ.to_string(),
        Locking::ForUpdate => {
            format!("{READ} ORDER BY p.aggregate_type, p.aggregate_id FOR UPDATE OF p")
        }
    };
    let (types, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    let rows: Vec<(String, String, i64)> = sqlx::query_as(&select)
        .bind(projection)
        .bind(&types)
        .bind(&ids)
        .fetch_all(connection)
        .await?;
    let stored: HashMap<(String, String), i64> = rows
        .into_iter()
        .map(|(kind, id, sequence)| ((kind, id), sequence))
        .collect();
    for key in keys {
        if let Some(sequence) = stored.get(&(key.0.to_owned(), key.1.to_owned())) {
            last.insert(*key, *sequence);
        }
    }
    Ok(())
}

/// Judges `events`, in order, against `last` (the last applied sequence per aggregate, 0 when
/// missing) as [`apply_event`] would one by one, moving `last` along. Returns each event's
/// position and the events to apply.
fn judge<'a>(
    events: &[&'a EventEnvelope],
    last: &mut HashMap<(&'a str, &'a str), i64>,
) -> (Vec<Position>, Vec<&'a EventEnvelope>) {
    let mut positions = Vec::with_capacity(events.len());
    let mut applied = Vec::with_capacity(events.len());
    for &event in events {
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

/// The most events one batch (or one message) reads from the events table to fill its gaps;
/// past that its messages wait for the stream (nak with a delay), as a gap did always before.
pub(super) const MAX_FILLED: i64 = 1_000;

/// The events that `events` skip over, read from the events table (the source of truth): for
/// each aggregate whose events in the batch do not follow on from `last` without a hole, those
/// between `last` and the batch's latest that the batch lacks. Several workers share a
/// consumer, so one aggregate's events are spread over their batches in any order; waiting for
/// the stream to bring the missing ones again (a nak per gap, each coming back after a delay)
/// cannot keep up with a device that reports several times a second. Every event on the
/// stream was committed before it was published, and so were the earlier events of its
/// aggregate: what a gap lacks is always in the table. Empty when more than
/// [`MAX_FILLED`] would be read.
async fn missing_events(
    connection: &mut PgConnection,
    events: &[EventEnvelope],
    last: &HashMap<AggregateKey<'_>, i64>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    // Per aggregate: the latest sequence past its position, and how many the batch has past
    // it. A redelivery twice in one batch hides a gap from this count: that gap waits for the
    // stream, as every gap did before.
    let mut spans: HashMap<AggregateKey, (i64, i64)> = HashMap::new();
    for event in events {
        let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
        if event.sequence > last.get(&key).copied().unwrap_or(0) {
            let span = spans.entry(key).or_default();
            span.0 = span.0.max(event.sequence);
            span.1 += 1;
        }
    }
    let mut wanted: HashMap<&str, Vec<SequenceRange>> = HashMap::new();
    let mut total = 0;
    for (key, (latest, present)) in &spans {
        let after = last.get(key).copied().unwrap_or(0);
        let lacking = latest - after - present;
        if lacking > 0 {
            total += lacking;
            wanted.entry(key.0).or_default().push(SequenceRange {
                aggregate_id: key.1,
                after,
                up_to: *latest,
            });
        }
    }
    if wanted.is_empty() || total > MAX_FILLED {
        return Ok(Vec::new());
    }
    let in_batch: HashSet<(&str, &str, i64)> = events
        .iter()
        .map(|e| {
            (
                e.aggregate_type.as_str(),
                e.aggregate_id.as_str(),
                e.sequence,
            )
        })
        .collect();
    let mut missing = Vec::new();
    for (aggregate_type, ranges) in wanted {
        for event in fleetlog_eventlog::ranges(&mut *connection, aggregate_type, &ranges).await? {
            let id = (
                event.aggregate_type.as_str(),
                event.aggregate_id.as_str(),
                event.sequence,
            );
            if !in_batch.contains(&id) {
                missing.push(event);
            }
        }
    }
    Ok(missing)
}

/// The batch with the events that fill its gaps, each aggregate's in sequence order.
fn with_filled<'a>(
    events: &'a [EventEnvelope],
    filled: &'a [EventEnvelope],
) -> Vec<&'a EventEnvelope> {
    let mut all: Vec<&EventEnvelope> = events.iter().chain(filled).collect();
    if !filled.is_empty() {
        all.sort_by(|a, b| {
            (&a.aggregate_type, &a.aggregate_id, a.sequence).cmp(&(
                &b.aggregate_type,
                &b.aggregate_id,
                b.sequence,
            ))
        });
    }
    all
}

/// The position of each of the batch's own events, from the judgement of the batch with its
/// gaps filled (`judged`, whose positions are `positions`).
fn positions_of(
    events: &[EventEnvelope],
    judged: &[&EventEnvelope],
    positions: &[Position],
) -> Vec<Position> {
    if judged.len() == events.len() && positions.len() == events.len() {
        let same_order = judged.iter().zip(events).all(|(a, b)| std::ptr::eq(*a, b));
        if same_order {
            return positions.to_vec();
        }
    }
    let mut by_event: HashMap<(&str, &str, i64), Position> = HashMap::new();
    for (event, position) in judged.iter().zip(positions) {
        by_event
            .entry((&event.aggregate_type, &event.aggregate_id, event.sequence))
            .or_insert(*position);
    }
    events
        .iter()
        .map(|e| {
            by_event[&(
                e.aggregate_type.as_str(),
                e.aggregate_id.as_str(),
                e.sequence,
            )]
        })
        .collect()
}

/// Applies the events between the projection's position for `event`'s aggregate and `event`
/// (its gap, `expected` being the first one missing), read from the events table, inside a
/// savepoint: an event among them that cannot be applied leaves everything as it was, and the
/// message waits for the stream instead. Answers the events applied; empty if none were.
pub(super) async fn fill_gap<P: Projection>(
    projection: &P,
    connection: &mut PgConnection,
    event: &EventEnvelope,
    expected: i64,
) -> Result<Vec<EventEnvelope>, ProjectionError> {
    let lacking = event.sequence - expected;
    if lacking <= 0 || lacking > MAX_FILLED {
        return Ok(Vec::new());
    }
    let missing = fleetlog_eventlog::history(
        &mut *connection,
        HistoryQuery {
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            after_sequence: expected - 1,
            event_type: None,
            limit: lacking,
        },
    )
    .await?;
    if missing.len() as i64 != lacking {
        return Ok(Vec::new());
    }
    let mut savepoint = sqlx::Connection::begin(&mut *connection).await?;
    for earlier in &missing {
        match apply_event(projection, &mut savepoint, earlier).await {
            Ok(Position::Applied) => {}
            Ok(_) => {
                savepoint.rollback().await?;
                return Ok(Vec::new());
            }
            Err(error) if error.is_transient() => return Err(error),
            Err(error) => {
                tracing::debug!(projection = P::NAME, %error, "cannot fill a gap; waiting for the stream");
                savepoint.rollback().await?;
                return Ok(Vec::new());
            }
        }
    }
    savepoint.commit().await?;
    Ok(missing)
}

impl<P: Projection> Worker<P> {
    /// Applies `events` in order in one transaction, judged against the projection's
    /// positions.
    pub(super) async fn apply_all(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<Position>, ProjectionError> {
        self.apply_all_shared(events).await
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
            read_shared_positions(&mut tx, P::NAME, &unknown, Locking::ForUpdate, &mut last)
                .await?;
        }
        let filled = missing_events(&mut tx, events, &last).await?;
        let all = with_filled(events, &filled);
        let judged_against = last.clone();
        let (judged, applied) = judge(&all, &mut last);
        let positions = positions_of(events, &all, &judged);
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
