//! The aggregate store: loads aggregates (cache, snapshot plus tail, or full replay), runs
//! commands on them and appends the resulting events with optimistic concurrency.
//!
//! Why not the cqrs-es snapshot store: in cqrs-es 0.5 `PersistedEventStore` applies new events to
//! the aggregate a second time before saving the snapshot, so snapshots are wrong. Here the
//! aggregate is changed once, by the `EventSink` while it decides, and the snapshot is that very
//! state serialized.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, DomainEvent, EventEnvelope};
use rand::Rng;
use serde_json::Value;
use sqlx::{PgPool, Row};
use tokio::sync::Mutex;
use tracing::Instrument;

use crate::error::{CommandError, StoreError};
use crate::inline::{Appended, Care, InlineError, InlineProjection};
use crate::metadata::CommandMetadata;

const INSERT_EVENTS: &str = "
INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
SELECT $1, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload::json, e.metadata::json
  FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
       AS e(aggregate_id, sequence, event_type, event_version, payload, metadata)
 ORDER BY e.aggregate_id, e.sequence
RETURNING aggregate_id, sequence, global_position";

const UPSERT_SNAPSHOT: &str = "
INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
VALUES ($1, $2, $3, 1, $4::json)
ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE
   SET last_sequence = EXCLUDED.last_sequence,
       current_snapshot = snapshots.current_snapshot + 1,
       payload = EXCLUDED.payload
 WHERE snapshots.last_sequence < EXCLUDED.last_sequence";

const SELECT_SNAPSHOT: &str = "
SELECT last_sequence, payload
  FROM snapshots
 WHERE aggregate_type = $1 AND aggregate_id = $2";

const SELECT_EVENTS_AFTER: &str = "
SELECT sequence, event_type, event_version, payload, metadata
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
 ORDER BY sequence";

const SELECT_HAS_EVENTS_AFTER: &str = "
SELECT EXISTS (SELECT 1 FROM events
                WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3)";

/// Tuning of an aggregate store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// How many aggregates of one type stay in memory.
    pub cache_capacity: u64,
    /// A snapshot is written each time an aggregate's version crosses a multiple of this.
    /// 0 turns snapshots off.
    pub snapshot_every: u64,
    /// How many times a command is tried when other writers keep taking the next sequence.
    pub max_attempts: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            cache_capacity: 10_000,
            snapshot_every: 100,
            max_attempts: 5,
        }
    }
}

/// An aggregate at a known version (the sequence of its last event; 0 for a new one).
#[derive(Debug, Clone)]
pub struct LoadedAggregate<A> {
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its state.
    pub aggregate: A,
    /// The sequence of the last event applied.
    pub version: u64,
}

impl<A: Aggregate> AggregateContext<A> for LoadedAggregate<A> {
    fn aggregate(&mut self) -> &mut A {
        &mut self.aggregate
    }
}

/// What a successful command left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The aggregate's version after the command.
    pub version: u64,
    /// The global position of the last event appended; `None` when the command was accepted
    /// but changed nothing (an idempotent repeat).
    pub global_position: Option<i64>,
    /// How many events were appended.
    pub events: usize,
}

/// What a batch of commands on one aggregate left behind.
#[derive(Debug)]
pub struct BatchCommitted<E> {
    /// The aggregate after the batch, as for a single command.
    pub committed: Committed,
    /// For each command, in order: the number of events it produced, or its refusal.
    pub outcomes: Vec<Result<usize, E>>,
}

type Slot<A> = Arc<Mutex<Option<LoadedAggregate<A>>>>;

/// Every event carries its aggregate's tenant, whoever issued the command (a process acting for
/// no tenant in particular, such as ingest or liveness, included).
fn with_tenant<'a, A: fleetlog_domain::TenantScoped>(
    metadata: &'a HashMap<String, String>,
    aggregate: &A,
) -> std::borrow::Cow<'a, HashMap<String, String>> {
    match aggregate.tenant() {
        Some(tenant) if metadata.get("tenant").map(String::as_str) != Some(tenant.as_str()) => {
            let mut stamped = metadata.clone();
            stamped.insert("tenant".to_string(), tenant.to_string());
            std::borrow::Cow::Owned(stamped)
        }
        _ => std::borrow::Cow::Borrowed(metadata),
    }
}

/// The store of one aggregate type. Cheap to clone; clones share the cache.
pub struct AggregateStore<A: Aggregate> {
    pool: PgPool,
    services: Arc<A::Services>,
    settings: StoreSettings,
    /// Each cached aggregate sits behind its own lock, so commands on one aggregate in this
    /// process run one after the other instead of conflicting; commands on different aggregates
    /// run in parallel. An empty slot means "load from the database".
    cache: moka::sync::Cache<String, Slot<A>>,
    /// The read models written in the appending transaction, if the type has any.
    inline: Option<Arc<dyn InlineProjection<A>>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Clone for AggregateStore<A> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            services: self.services.clone(),
            settings: self.settings,
            cache: self.cache.clone(),
            inline: self.inline.clone(),
            _aggregate: PhantomData,
        }
    }
}

enum AppendError {
    Conflict,
    /// The inline read model wants the attempt written again the careful way.
    NeedsCare(String),
    /// The events hold text no read model could store (see [`CommandError::Unstorable`]).
    Unstorable(String),
    Store(StoreError),
}

/// One aggregate's part of an attempt.
struct Work<'a, A: Aggregate> {
    aggregate_id: &'a str,
    commands: &'a [A::Command],
    metadata: HashMap<String, String>,
    /// Only if the aggregate is at this version (`execute_if`).
    expected_version: Option<u64>,
}

/// An aggregate in a write: its state with the new events applied, its version before them,
/// and the events.
type Written<'a, A> = (&'a LoadedAggregate<A>, u64, &'a [<A as Aggregate>::Event]);

/// What one aggregate's commands did, or why they could not.
type BatchResult<E> = Result<BatchCommitted<E>, CommandError<E>>;

/// How an attempt ended.
enum Attempt<A: Aggregate>
where
    A::Error: 'static,
{
    /// Decided and, where there were events, written: per aggregate, what its commands did or
    /// why they could not.
    Done(Vec<BatchResult<A::Error>>),
    /// Another writer got in the way; nothing was written.
    Again,
}

/// An aggregate decided in an attempt, its events not yet written.
struct Decided<A: Aggregate> {
    /// Its place in the attempt's work.
    index: usize,
    /// The aggregate, with its new events applied.
    loaded: LoadedAggregate<A>,
    version_before: u64,
    events: Vec<A::Event>,
    outcomes: Vec<Result<usize, A::Error>>,
}

/// The events of an attempt as the columns of one insert.
#[derive(Default)]
struct EventRows {
    ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    event_versions: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl EventRows {
    /// Adds the events `loaded` decided after `version_before`, stamped with `metadata`, or
    /// none of them if one cannot be stored.
    fn add<A: Aggregate>(
        &mut self,
        loaded: &LoadedAggregate<A>,
        version_before: u64,
        events: &[A::Event],
        metadata: &HashMap<String, String>,
    ) -> Result<(), AppendError> {
        if events.is_empty() {
            return Ok(());
        }
        let serialize_error = |source| {
            AppendError::Store(StoreError::Serialize {
                what: "event",
                source,
            })
        };
        let metadata = serde_json::to_string(metadata).map_err(serialize_error)?;
        if let Some(reason) = unstorable(&metadata) {
            return Err(AppendError::Unstorable(reason));
        }
        let payloads = events
            .iter()
            .map(|event| serde_json::to_string(event).map_err(serialize_error))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(reason) = payloads.iter().find_map(|payload| unstorable(payload)) {
            return Err(AppendError::Unstorable(reason));
        }
        for (offset, (event, payload)) in events.iter().zip(payloads).enumerate() {
            self.ids.push(loaded.aggregate_id.clone());
            self.sequences
                .push((version_before + 1 + offset as u64) as i64);
            self.event_types.push(event.event_type());
            self.event_versions.push(event.event_version());
            self.payloads.push(payload);
            self.metadata.push(metadata.clone());
        }
        Ok(())
    }
}

/// Why serialized event JSON could not be applied by the read models (their `jsonb` columns),
/// if so: such an event is never stored, so it can never poison a consumer or a replay.
fn unstorable(json: &str) -> Option<String> {
    fleetlog_domain::limits::json_has_nul(json.as_bytes())
        .then(|| fleetlog_domain::limits::LimitError::Nul.to_string())
}

impl From<sqlx::Error> for AppendError {
    fn from(error: sqlx::Error) -> Self {
        let is_unique_violation = error
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation());
        if is_unique_violation {
            Self::Conflict
        } else {
            Self::Store(StoreError::Database(error))
        }
    }
}

/// The metadata of a command as its events store it: who, why, and the trace context of the
/// span the command runs in (when sampled), so the relay and the consumers continue the trace.
fn stamped(metadata: &CommandMetadata) -> HashMap<String, String> {
    let mut map = metadata.to_map();
    fleetlog_trace::inject_current(&mut map);
    map
}

impl<A> AggregateStore<A>
where
    A: Aggregate + fleetlog_domain::TenantScoped + 'static,
    A::Command: Clone,
    A::Error: 'static,
{
    /// A store over `pool` that hands `services` to the aggregate.
    pub fn new(pool: PgPool, services: A::Services, settings: StoreSettings) -> Self {
        Self {
            pool,
            services: Arc::new(services),
            settings,
            cache: moka::sync::Cache::new(settings.cache_capacity),
            inline: None,
            _aggregate: PhantomData,
        }
    }

    /// This store, writing `projection` in every transaction that appends events (see
    /// [`crate::inline`]).
    pub fn with_inline(mut self, projection: Arc<dyn InlineProjection<A>>) -> Self {
        self.inline = Some(projection);
        self
    }

    /// Runs `command` on the aggregate `aggregate_id` and appends the events it produces, stamped
    /// with `metadata`. Retries on conflicts with other writers, up to `max_attempts` times.
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &CommandMetadata,
    ) -> Result<Committed, CommandError<A::Error>> {
        self.execute_if(aggregate_id, command, metadata, None).await
    }

    /// Like [`execute`](Self::execute), but only if the aggregate is at `expected_version`
    /// when the command is decided (a conditional write, HTTP `If-Match`). Sound without locks:
    /// the append itself fails if another writer moved the aggregate meanwhile, and the retry
    /// then sees the new version.
    pub async fn execute_if(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &CommandMetadata,
        expected_version: Option<u64>,
    ) -> Result<Committed, CommandError<A::Error>> {
        let commands = [command];
        let span = tracing::info_span!("command", aggregate_type = A::TYPE, aggregate_id);
        let BatchCommitted {
            committed,
            mut outcomes,
        } = async {
            self.run(Work {
                aggregate_id,
                commands: &commands,
                metadata: stamped(metadata),
                expected_version,
            })
            .await
        }
        .instrument(span)
        .await?;
        match outcomes.pop() {
            Some(Err(refusal)) => Err(CommandError::Refused(refusal)),
            _ => Ok(committed),
        }
    }

    /// Runs `commands` in order on one aggregate and appends every event they produce in one
    /// transaction: how ingest coalesces the messages queued for one device. Each command is
    /// decided against the state the earlier ones left; a refused command changes nothing and
    /// does not stop the others. Conflicts with other writers retry the whole batch.
    pub async fn execute_batch(
        &self,
        aggregate_id: &str,
        commands: Vec<A::Command>,
        metadata: &CommandMetadata,
    ) -> Result<BatchCommitted<A::Error>, CommandError<A::Error>> {
        let span = tracing::info_span!(
            "command",
            aggregate_type = A::TYPE,
            aggregate_id,
            commands = commands.len()
        );
        async {
            self.run(Work {
                aggregate_id,
                commands: &commands,
                metadata: stamped(metadata),
                expected_version: None,
            })
            .await
        }
        .instrument(span)
        .await
    }

    /// Runs the command batches of several aggregates and appends every event in one
    /// transaction: one commit for all the devices an ingest shard has messages for. Each
    /// aggregate's batch is decided as by [`execute_batch`](Self::execute_batch). The
    /// aggregates are locked in id order, so callers running this concurrently cannot
    /// deadlock. If another writer got in the way of any of them, each aggregate is retried on
    /// its own. Results come back in the order of `work`.
    pub async fn execute_many(
        &self,
        work: Vec<(String, Vec<A::Command>, CommandMetadata)>,
    ) -> Vec<Result<BatchCommitted<A::Error>, CommandError<A::Error>>> {
        let span = tracing::info_span!(
            "commands",
            aggregate_type = A::TYPE,
            aggregates = work.len()
        );
        self.execute_many_now(&work).instrument(span).await
    }

    async fn execute_many_now(
        &self,
        work: &[(String, Vec<A::Command>, CommandMetadata)],
    ) -> Vec<Result<BatchCommitted<A::Error>, CommandError<A::Error>>> {
        let work: Vec<Work<'_, A>> = work
            .iter()
            .map(|(aggregate_id, commands, metadata)| Work {
                aggregate_id,
                commands,
                metadata: stamped(metadata),
                expected_version: None,
            })
            .collect();
        match self.attempt(&work).await {
            Ok(Attempt::Done(results)) => results,
            Ok(Attempt::Again) => {
                let mut results = Vec::with_capacity(work.len());
                for one in work {
                    results.push(self.run(one).await);
                }
                results
            }
            Err(error) => {
                let message = error.to_string();
                let mut results = Vec::with_capacity(work.len());
                results.push(Err(error));
                for _ in 1..work.len() {
                    results.push(Err(CommandError::Store(StoreError::Database(
                        sqlx::Error::Protocol(message.clone()),
                    ))));
                }
                results
            }
        }
    }

    /// Attempts `work` on its aggregate until no other writer gets in the way, at most
    /// `max_attempts` times, the attempts spread apart by a little random delay.
    async fn run(
        &self,
        work: Work<'_, A>,
    ) -> Result<BatchCommitted<A::Error>, CommandError<A::Error>> {
        let mut attempt = 1;
        loop {
            if let Attempt::Done(results) = self.attempt(std::slice::from_ref(&work)).await? {
                if let Some(result) = results.into_iter().next() {
                    return result;
                }
            }
            if attempt >= self.settings.max_attempts {
                return Err(CommandError::Conflict {
                    aggregate_type: A::TYPE,
                    aggregate_id: work.aggregate_id.to_string(),
                    attempts: attempt,
                });
            }
            tracing::debug!(
                aggregate_type = A::TYPE,
                aggregate_id = work.aggregate_id,
                attempt,
                "conflict, retrying"
            );
            // Spread the retries of competing writers apart.
            let jitter = rand::thread_rng().gen_range(0..10 * u64::from(attempt));
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            attempt += 1;
        }
    }

    fn unstorable_error(&self, aggregate_id: &str, reason: String) -> CommandError<A::Error> {
        CommandError::Unstorable {
            aggregate_type: A::TYPE,
            aggregate_id: aggregate_id.to_string(),
            reason,
        }
    }

    /// Decides `commands` in order on `loaded`, which takes each accepted command's events:
    /// the events to append, and per command the number of events or the refusal.
    #[allow(clippy::type_complexity)]
    async fn decide_batch(
        &self,
        loaded: &mut LoadedAggregate<A>,
        commands: &[A::Command],
    ) -> Result<(Vec<A::Event>, Vec<Result<usize, A::Error>>), CommandError<A::Error>> {
        let mut events = Vec::new();
        let mut outcomes = Vec::with_capacity(commands.len());
        for command in commands {
            let sink = EventSink::default();
            let decision = loaded
                .aggregate
                .handle(command.clone(), &self.services, &sink)
                .await;
            let produced = sink.collect().await;
            match decision {
                Ok(()) => {
                    outcomes.push(Ok(produced.len()));
                    events.extend(produced);
                }
                // An aggregate that wrote events before refusing may be half-changed: the
                // batch cannot go on from that state, and its slot stays empty.
                Err(refusal) if !produced.is_empty() => return Err(CommandError::Refused(refusal)),
                Err(refusal) => outcomes.push(Err(refusal)),
            }
        }
        Ok((events, outcomes))
    }

    /// [`decide_batch`](Self::decide_batch), with any refusal confirmed against the store when
    /// `loaded` came from the cache: `Ok(None)` when the store has events the copy lacks, so the
    /// caller decides again on fresh state.
    #[allow(clippy::type_complexity)]
    async fn decide_confirmed(
        &self,
        loaded: &mut LoadedAggregate<A>,
        from_cache: bool,
        commands: &[A::Command],
    ) -> Result<Option<(Vec<A::Event>, Vec<Result<usize, A::Error>>)>, CommandError<A::Error>> {
        let version_before = loaded.version;
        let decided = self.decide_batch(loaded, commands).await;
        let refused = match &decided {
            Ok((_, outcomes)) => outcomes.iter().any(Result::is_err),
            Err(_) => true,
        };
        if refused
            && from_cache
            && self
                .has_events_after(&loaded.aggregate_id, version_before)
                .await?
        {
            return Ok(None);
        }
        decided.map(Some)
    }

    /// The one way commands are run: one attempt at `work`. The aggregates are locked in id
    /// order (so concurrent attempts cannot deadlock), each is decided (a refusal by a cached
    /// copy is confirmed against the store first), and the events of all of them are appended
    /// in one transaction with the snapshots due. Results come in the order of `work`.
    ///
    /// [`Attempt::Again`] when another writer got in the way (the append conflicted, or the
    /// store contradicts what a cached copy decided): nothing was written, and the slots taken
    /// stay empty, so the next attempt loads what is stored.
    async fn attempt(&self, work: &[Work<'_, A>]) -> Result<Attempt<A>, CommandError<A::Error>> {
        let mut order: Vec<usize> = (0..work.len()).collect();
        order.sort_by(|a, b| work[*a].aggregate_id.cmp(work[*b].aggregate_id));
        let mut locked = Vec::with_capacity(work.len());
        for &index in &order {
            let guard = self.slot(work[index].aggregate_id).lock_owned().await;
            locked.push((index, guard));
        }
        locked.sort_by_key(|(index, _)| *index);
        let mut guards: Vec<_> = locked.into_iter().map(|(_, guard)| guard).collect();

        let mut results: Vec<Option<BatchResult<A::Error>>> = work.iter().map(|_| None).collect();
        let mut decided = Vec::new();
        for (index, (work, guard)) in work.iter().zip(guards.iter_mut()).enumerate() {
            let (mut loaded, from_cache) = match guard.take() {
                Some(loaded) => (loaded, true),
                None => (self.load(work.aggregate_id).await?, false),
            };
            if work.expected_version.is_some() && from_cache {
                // A conditional write is judged on the stored version, not on an older copy.
                self.catch_up(&mut loaded).await?;
            }
            if let Some(expected) = work.expected_version.filter(|v| *v != loaded.version) {
                let actual = loaded.version;
                **guard = Some(loaded);
                results[index] = Some(Err(CommandError::VersionMismatch { expected, actual }));
                continue;
            }
            let version_before = loaded.version;
            match self
                .decide_confirmed(&mut loaded, from_cache, work.commands)
                .await
            {
                Ok(Some((events, outcomes))) => decided.push(Decided {
                    index,
                    loaded,
                    version_before,
                    events,
                    outcomes,
                }),
                Ok(None) => return Ok(Attempt::Again),
                Err(CommandError::Store(error)) => return Err(error.into()),
                // Refused half-way: the copy may be half-changed, so its slot stays empty.
                Err(refusal) => results[index] = Some(Err(refusal)),
            }
        }

        let mut rows = EventRows::default();
        let mut written = Vec::with_capacity(decided.len());
        for one in decided {
            let metadata = with_tenant(&work[one.index].metadata, &one.loaded.aggregate);
            match rows.add(&one.loaded, one.version_before, &one.events, &metadata) {
                Ok(()) => written.push(one),
                // Never stored; the copy holds its events, so its slot stays empty.
                Err(AppendError::Unstorable(reason)) => {
                    results[one.index] = Some(Err(
                        self.unstorable_error(work[one.index].aggregate_id, reason)
                    ));
                }
                Err(AppendError::Conflict | AppendError::NeedsCare(_)) => {
                    return Ok(Attempt::Again)
                }
                Err(AppendError::Store(error)) => return Err(error.into()),
            }
        }
        let appended: Vec<_> = written
            .iter()
            .map(|one| (&one.loaded, one.version_before, one.events.as_slice()))
            .collect();
        let positions = match self.write(&rows, &appended).await {
            Ok(positions) => positions,
            Err(AppendError::Conflict | AppendError::Unstorable(_) | AppendError::NeedsCare(_)) => {
                return Ok(Attempt::Again)
            }
            Err(AppendError::Store(error)) => return Err(error.into()),
        };
        for one in written {
            let Decided {
                index,
                mut loaded,
                version_before,
                events,
                outcomes,
            } = one;
            loaded.version = version_before + events.len() as u64;
            let committed = Committed {
                version: loaded.version,
                global_position: positions.get(&loaded.aggregate_id).copied(),
                events: events.len(),
            };
            *guards[index] = Some(loaded);
            results[index] = Some(Ok(BatchCommitted {
                committed,
                outcomes,
            }));
        }
        Ok(Attempt::Done(
            results
                .into_iter()
                .map(|result| result.expect("every aggregate of the attempt has its result"))
                .collect(),
        ))
    }

    /// Appends `rows` in one transaction, with a snapshot of each aggregate whose version
    /// crosses a multiple of `snapshot_every`, and the inline read models brought in step:
    /// `aggregates` holds each aggregate (its new events applied), its version before them and
    /// the events. Returns each aggregate's last position.
    async fn write(
        &self,
        rows: &EventRows,
        aggregates: &[Written<'_, A>],
    ) -> Result<HashMap<String, i64>, AppendError> {
        let span = tracing::info_span!("append", aggregate_type = A::TYPE, events = rows.ids.len());
        self.write_carefully_if_needed(rows, aggregates)
            .instrument(span)
            .await
    }

    async fn write_carefully_if_needed(
        &self,
        rows: &EventRows,
        aggregates: &[Written<'_, A>],
    ) -> Result<HashMap<String, i64>, AppendError> {
        match self.write_with(rows, aggregates, Care::Fast).await {
            Err(AppendError::NeedsCare(reason)) => {
                tracing::debug!(
                    aggregate_type = A::TYPE,
                    reason,
                    "inline read model needs care; writing the attempt again"
                );
                self.write_with(rows, aggregates, Care::Careful).await
            }
            written => written,
        }
    }

    async fn write_with(
        &self,
        rows: &EventRows,
        aggregates: &[Written<'_, A>],
        care: Care,
    ) -> Result<HashMap<String, i64>, AppendError> {
        let mut positions = HashMap::new();
        if rows.ids.is_empty() {
            return Ok(positions);
        }
        let mut tx = self.pool.begin().await?;
        let mut inserted: Vec<(String, i64, i64)> = sqlx::query_as(INSERT_EVENTS)
            .bind(A::TYPE)
            .bind(&rows.ids)
            .bind(&rows.sequences)
            .bind(&rows.event_types)
            .bind(&rows.event_versions)
            .bind(&rows.payloads)
            .bind(&rows.metadata)
            .fetch_all(&mut *tx)
            .await?;
        inserted.sort_unstable();
        for (id, _, position) in &inserted {
            let last = positions.entry(id.clone()).or_insert(*position);
            *last = (*last).max(*position);
        }
        for &(loaded, version_before, events) in aggregates {
            let new_version = version_before + events.len() as u64;
            if events.is_empty() || !self.crosses_snapshot_boundary(version_before, new_version) {
                continue;
            }
            let snapshot = serde_json::to_string(&loaded.aggregate).map_err(|source| {
                AppendError::Store(StoreError::Serialize {
                    what: "snapshot",
                    source,
                })
            })?;
            sqlx::query(UPSERT_SNAPSHOT)
                .bind(A::TYPE)
                .bind(&loaded.aggregate_id)
                .bind(new_version as i64)
                .bind(snapshot)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(inline) = &self.inline {
            let mut global_positions: HashMap<&str, Vec<i64>> = HashMap::new();
            for (id, _, position) in &inserted {
                global_positions.entry(id).or_default().push(*position);
            }
            let appended: Vec<Appended<'_, A::Event>> = aggregates
                .iter()
                .filter(|(_, _, events)| !events.is_empty())
                .map(|&(loaded, version_before, events)| {
                    let id = loaded.aggregate_id.as_str();
                    let first = rows.ids.iter().position(|row| row == id).unwrap_or(0);
                    Appended {
                        aggregate_id: id,
                        first_sequence: version_before as i64 + 1,
                        events,
                        global_positions: global_positions.get(id).map_or(&[], Vec::as_slice),
                        metadata: &rows.metadata[first],
                    }
                })
                .collect();
            match inline.apply(&mut tx, &appended, care).await {
                Ok(()) => {}
                // Dropping the transaction rolls the attempt back.
                Err(InlineError::NeedsCare(reason)) if care == Care::Fast => {
                    return Err(AppendError::NeedsCare(reason))
                }
                Err(InlineError::NeedsCare(reason)) => {
                    return Err(AppendError::Store(StoreError::ReadModel {
                        aggregate_type: A::TYPE,
                        reason,
                    }))
                }
                // Not a conflict of the append, whatever its SQLSTATE: a failure to retry.
                Err(InlineError::Database(error)) => {
                    return Err(AppendError::Store(StoreError::Database(error)))
                }
            }
        }
        tx.commit().await?;
        Ok(positions)
    }

    fn slot(&self, aggregate_id: &str) -> Slot<A> {
        self.cache
            .get_with_by_ref(aggregate_id, || Arc::new(Mutex::new(None)))
    }

    fn crosses_snapshot_boundary(&self, old_version: u64, new_version: u64) -> bool {
        let every = self.settings.snapshot_every;
        every > 0 && new_version / every > old_version / every
    }

    /// Loads an aggregate from its snapshot plus later events, or from all its events when
    /// there is no usable snapshot. Bypasses the cache.
    pub async fn load(&self, aggregate_id: &str) -> Result<LoadedAggregate<A>, StoreError> {
        let (aggregate, version) = self.load_snapshot(aggregate_id).await?;
        let mut loaded = LoadedAggregate {
            aggregate_id: aggregate_id.to_string(),
            aggregate,
            version,
        };
        self.catch_up(&mut loaded).await?;
        Ok(loaded)
    }

    async fn load_snapshot(&self, aggregate_id: &str) -> Result<(A, u64), StoreError> {
        let row = sqlx::query(SELECT_SNAPSHOT)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok((A::default(), 0));
        };
        let last_sequence: i64 = row.get("last_sequence");
        // Decoded from the stored text, without building a `Value` of the whole aggregate.
        let payload: sqlx::types::Json<&serde_json::value::RawValue> = row.get("payload");
        match serde_json::from_str::<A>(payload.get()) {
            Ok(aggregate) => Ok((aggregate, last_sequence as u64)),
            Err(error) => {
                // The aggregate's shape changed since the snapshot was taken: the events are
                // the truth, so replay them all. The next snapshot replaces the stale one.
                tracing::warn!(
                    aggregate_type = A::TYPE,
                    aggregate_id,
                    %error,
                    "snapshot no longer fits the aggregate; replaying all events"
                );
                Ok((A::default(), 0))
            }
        }
    }

    /// The aggregate as it is stored now: the cached copy brought up to date with the events
    /// other processes (or other stores in this one) appended since it was cached, or else
    /// loaded (and then cached). One indexed query when the copy is current. Everything that
    /// reads an aggregate to decide or to send something reads it through here (or
    /// [`inspect`](Self::inspect)), so no role acts on state older than what it is handling.
    pub async fn current(&self, aggregate_id: &str) -> Result<LoadedAggregate<A>, StoreError>
    where
        A: Clone,
    {
        self.inspect(aggregate_id, |aggregate, version| LoadedAggregate {
            aggregate_id: aggregate_id.to_string(),
            aggregate: aggregate.clone(),
            version,
        })
        .await
    }

    /// Like [`current`](Self::current), but `look` gets the up-to-date state and version
    /// without copying it.
    pub async fn inspect<R>(
        &self,
        aggregate_id: &str,
        look: impl FnOnce(&A, u64) -> R,
    ) -> Result<R, StoreError> {
        let slot = self.slot(aggregate_id);
        let mut cached = slot.lock().await;
        let loaded = match cached.take() {
            Some(mut loaded) => {
                self.catch_up(&mut loaded).await?;
                loaded
            }
            None => self.load(aggregate_id).await?,
        };
        let answer = look(&loaded.aggregate, loaded.version);
        *cached = Some(loaded);
        Ok(answer)
    }

    /// Looks at the cached copy as it is, possibly older than the store: only for a hint
    /// that whatever acts on it checks again, such as ingest's "is this device registered"
    /// before it runs commands (which are decided on fresh state or fail to append).
    pub async fn inspect_cached<R>(
        &self,
        aggregate_id: &str,
        look: impl FnOnce(&A, u64) -> R,
    ) -> Result<R, StoreError> {
        let slot = self.slot(aggregate_id);
        let mut cached = slot.lock().await;
        let loaded = match cached.take() {
            Some(loaded) => loaded,
            None => self.load(aggregate_id).await?,
        };
        let answer = look(&loaded.aggregate, loaded.version);
        *cached = Some(loaded);
        Ok(answer)
    }

    /// Applies to `loaded` the events stored after its version.
    async fn catch_up(&self, loaded: &mut LoadedAggregate<A>) -> Result<(), StoreError> {
        let rows = sqlx::query(SELECT_EVENTS_AFTER)
            .bind(A::TYPE)
            .bind(&loaded.aggregate_id)
            .bind(loaded.version as i64)
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            let sequence: i64 = row.get("sequence");
            let event = stored_event::<A::Event>(A::TYPE, &row).map_err(|source| {
                StoreError::CorruptEvent {
                    aggregate_type: A::TYPE.to_string(),
                    aggregate_id: loaded.aggregate_id.clone(),
                    sequence,
                    source,
                }
            })?;
            loaded.aggregate.apply(event);
            loaded.version = sequence as u64;
        }
        Ok(())
    }

    /// Whether the aggregate has events after `version`: a cached copy at `version` is stale.
    /// Asked before a refusal decided on a cached copy is believed, because other processes
    /// (the API beside an ingest bridge) append to the same aggregates.
    async fn has_events_after(&self, aggregate_id: &str, version: u64) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(SELECT_HAS_EVENTS_AFTER)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(version as i64)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Drops an aggregate from the cache, e.g. after its events were changed behind the store.
    pub fn evict(&self, aggregate_id: &str) {
        self.cache.invalidate(aggregate_id);
    }

    /// Every event of an aggregate, in order.
    pub async fn events(&self, aggregate_id: &str) -> Result<Vec<EventEnvelope<A>>, StoreError> {
        let rows = sqlx::query(SELECT_EVENTS_AFTER)
            .bind(A::TYPE)
            .bind(aggregate_id)
            .bind(0_i64)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                let sequence: i64 = row.get("sequence");
                let corrupt = |source| StoreError::CorruptEvent {
                    aggregate_type: A::TYPE.to_string(),
                    aggregate_id: aggregate_id.to_string(),
                    sequence,
                    source,
                };
                Ok(EventEnvelope {
                    aggregate_id: aggregate_id.to_string(),
                    sequence: sequence as usize,
                    payload: stored_event::<A::Event>(A::TYPE, &row).map_err(corrupt)?,
                    metadata: serde_json::from_value(row.get("metadata")).map_err(corrupt)?,
                })
            })
            .collect()
    }
}

/// A row's event in today's shape: its payload through the upcasters its stored version needs
/// ([`fleetlog_domain::upcast`]), then decoded.
fn stored_event<E: serde::de::DeserializeOwned>(
    aggregate_type: &str,
    row: &sqlx::postgres::PgRow,
) -> Result<E, serde_json::Error> {
    // The stored text, decoded straight into the event unless an upcaster needs its fields.
    let payload: sqlx::types::Json<&serde_json::value::RawValue> = row.get("payload");
    let mut version: String = row.get("event_version");
    let event_type: String = row.get("event_type");
    if !fleetlog_domain::upcast::applies(aggregate_type, &event_type, &version) {
        return serde_json::from_str(payload.get());
    }
    let mut payload: Value = serde_json::from_str(payload.get())?;
    fleetlog_domain::upcast::upcast(aggregate_type, &event_type, &mut version, &mut payload)
        .map_err(<serde_json::Error as serde::de::Error>::custom)?;
    serde_json::from_value(payload)
}

fn to_aggregate_error<E: std::error::Error>(error: StoreError) -> AggregateError<E> {
    match error {
        StoreError::Database(error) => AggregateError::DatabaseConnectionError(Box::new(error)),
        StoreError::Serialize { source, .. } => AggregateError::UnexpectedError(Box::new(source)),
        error @ StoreError::ReadModel { .. } => AggregateError::UnexpectedError(Box::new(error)),
        error @ StoreError::CorruptEvent { .. } => {
            AggregateError::DeserializationError(Box::new(error))
        }
    }
}

/// The store speaks the cqrs-es `EventStore` protocol too, so a `cqrs_es::CqrsFramework` can
/// run on it. fleetlog's own roles call [`AggregateStore::execute`], which also returns the
/// global position and retries conflicts.
impl<A> cqrs_es::EventStore<A> for AggregateStore<A>
where
    A: Aggregate + fleetlog_domain::TenantScoped + 'static,
    A::Command: Clone,
    A::Error: 'static,
{
    type AC = LoadedAggregate<A>;

    async fn load_events(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        self.events(aggregate_id).await.map_err(to_aggregate_error)
    }

    async fn load_aggregate(
        &self,
        aggregate_id: &str,
    ) -> Result<Self::AC, AggregateError<A::Error>> {
        self.load(aggregate_id).await.map_err(to_aggregate_error)
    }

    async fn commit(
        &self,
        events: Vec<A::Event>,
        context: Self::AC,
        metadata: HashMap<String, String>,
    ) -> Result<Vec<EventEnvelope<A>>, AggregateError<A::Error>> {
        // cqrs-es hands over the aggregate with the events applied already (the sink did it).
        self.evict(&context.aggregate_id);
        let version = context.version;
        let mut rows = EventRows::default();
        let appended = match rows.add(&context, version, &events, &metadata) {
            Ok(()) => {
                self.write(&rows, &[(&context, version, events.as_slice())])
                    .await
            }
            Err(error) => Err(error),
        };
        match appended {
            Ok(_) => {}
            Err(AppendError::Conflict | AppendError::NeedsCare(_)) => {
                return Err(AggregateError::AggregateConflict)
            }
            Err(AppendError::Unstorable(reason)) => {
                return Err(AggregateError::UnexpectedError(reason.into()))
            }
            Err(AppendError::Store(error)) => return Err(to_aggregate_error(error)),
        }
        Ok(events
            .into_iter()
            .enumerate()
            .map(|(offset, payload)| EventEnvelope {
                aggregate_id: context.aggregate_id.clone(),
                sequence: (version + 1) as usize + offset,
                payload,
                metadata: metadata.clone(),
            })
            .collect())
    }
}
