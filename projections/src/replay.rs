//! Replay: rebuilds a projection's read model from the events table, the source of truth.
//!
//! The model is rebuilt into shadow tables in the schema `fleetlog_replay`, copies of the live
//! tables (`LIKE ... INCLUDING ALL`) with a positions table of their own (for projections that
//! keep positions in `projection_positions`; the others keep them in their tables, or none). Events are applied in
//! global order, `(transaction_id, global_position)`; the rebuild reads only transactions older
//! than the oldest one running, like the relay, and the final catch-up under the swap's lock
//! every committed event. The projection's own SQL runs unchanged: the replay's
//! transactions put `fleetlog_replay` first on their `search_path`.
//!
//! Swap, in one transaction: lock the positions table against writers and the live tables
//! entirely (so live workers, or for a model kept inline the appending transactions, pause, and
//! no reader sees a half-swapped model), apply the events committed since the rebuild read its
//! last page, move the live tables out and the shadow tables in, and replace the projection's
//! positions. Writers then resume on the new tables (Postgres looks a table's name up again
//! once the lock it waited for is granted): an appending transaction that waited commits its
//! events with the model change on top of the swapped-in rows, and a worker skips what it
//! delivers at or below the new positions. Verify catches up the same way but compares instead
//! of swapping (see [`verify`]), then drops the shadow.

use std::sync::Arc;
use std::time::Instant;

use fleetlog_eventlog::{Cursor, EventEnvelope, Horizon, StoredEvent};
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::worker::{
    apply_event, apply_judged, pass_over, Position, Positions, Projection, ProjectionError,
};

/// The schema the shadow tables are built in.
pub const REPLAY_SCHEMA: &str = "fleetlog_replay";
const RETIRED_SCHEMA: &str = "fleetlog_retired";
/// Events per page of the rebuild, each applied set-wise in one transaction: a large page
/// writes a row that many of its events change once, in fewer round trips.
const REBUILD_PAGE_SIZE: i64 = 5_000;
/// Events per page of a catch-up, applied event by event under the swap's lock.
const CATCH_UP_PAGE_SIZE: i64 = 1_000;

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Postgres failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the pages shared with other rebuilds failed ([`Pages::shared`]).
    #[error("database: {0}")]
    SharedRead(#[source] Arc<sqlx::Error>),
    /// A shared reading was asked for what it cannot do: the same projection twice, or
    /// handed to a projection it was not read for.
    #[error("shared reading of events: {0}")]
    SharedMisuse(String),
    /// Applying an event failed for a reason that may pass (the database went away, a
    /// timeout, a deadlock): the replay stops, nothing is swapped in, and it can be run again. An event that can never be applied is passed over
    /// instead ([`PassedOver`]).
    #[error("event {message_id} cannot be applied: {source}")]
    Apply {
        /// The event.
        message_id: String,
        /// Why.
        #[source]
        source: ProjectionError,
    },
    /// The events table misses a sequence of an aggregate.
    #[error("event {message_id} follows a gap: sequence {expected} is missing")]
    Gap {
        /// The event after the gap.
        message_id: String,
        /// The missing sequence.
        expected: i64,
    },
    /// The live model did not catch up with the events table in time to be compared.
    #[error("the live {projection} model is {behind} aggregates behind the events table; is `fleetlog project` running?")]
    LiveBehind {
        /// The projection.
        projection: &'static str,
        /// How many aggregates lag.
        behind: i64,
    },
}

/// How far a rebuild has come.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Events applied so far.
    pub applied: u64,
    /// Events of the aggregate type in the table when the rebuild started.
    pub total: u64,
    /// Events per second so far.
    pub rate: f64,
}

/// An event the projection could not apply, passed over by the same rule as the live
/// worker's dead letters (its position moves past it, so the aggregate's later events still
/// apply), so an old poison event never blocks a rebuild. Recorded in
/// `projection_dead_letters` (once per event) and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedOver {
    /// The event's `Nats-Msg-Id`.
    pub message_id: String,
    /// Its aggregate: the aggregate's later events that the model can then not apply (a row
    /// its first event would have created is missing) are passed over too.
    pub aggregate: (String, String),
    /// Why it could not be applied.
    pub reason: String,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Events applied (passed-over ones included).
    pub applied: u64,
    /// Events that could not be applied.
    pub passed_over: Vec<PassedOver>,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verified {
    /// Rows present on one side only.
    pub differences: Vec<Difference>,
    /// Events the rebuild could not apply (the live worker dead-letters the same ones).
    pub passed_over: Vec<PassedOver>,
}

/// A row present on one side only.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The table.
    pub table: &'static str,
    /// `live` when only the live model has the row, `replay` when only the rebuilt one has it.
    pub only_in: &'static str,
    /// The row as JSON.
    pub row: serde_json::Value,
}

/// Rebuilds `projection` and swaps the result in. Returns the number of events applied.
pub async fn replay<P: Projection>(
    projection: &P,
    pool: &PgPool,
    progress: impl FnMut(Progress),
) -> Result<Replayed, ReplayError> {
    replay_from(projection, pool, Pages::own(), progress).await
}

/// [`replay`], reading the events from `pages`.
pub async fn replay_from<P: Projection>(
    projection: &P,
    pool: &PgPool,
    mut pages: Pages,
    progress: impl FnMut(Progress),
) -> Result<Replayed, ReplayError> {
    let guard = pages.lock_for::<P>(pool).await?;
    let (cursor, mut replayed) =
        rebuild(projection, pool, pages, Applying::Batched, progress).await?;
    build_deferred_indexes::<P>(pool).await?;
    let mut tx = pool.begin().await?;
    lock_live(&mut tx, P::TABLES, "ACCESS EXCLUSIVE").await?;
    let tail = catch_up(projection, &mut tx, cursor, &replayed.passed_over).await?;
    replayed.applied += tail.applied;
    replayed.passed_over.extend(tail.passed_over);
    // What the live model has let go of does not come back with a replay.
    for (table, condition) in P::RETAINED {
        sqlx::query(&format!(
            "DELETE FROM {REPLAY_SCHEMA}.{table} WHERE NOT ({condition})"
        ))
        .execute(&mut *tx)
        .await?;
    }
    ddl(
        &mut tx,
        format!("CREATE SCHEMA IF NOT EXISTS {RETIRED_SCHEMA}"),
    )
    .await?;
    for table in P::TABLES {
        ddl(
            &mut tx,
            format!("DROP TABLE IF EXISTS {RETIRED_SCHEMA}.{table}"),
        )
        .await?;
        ddl(
            &mut tx,
            format!("ALTER TABLE public.{table} SET SCHEMA {RETIRED_SCHEMA}"),
        )
        .await?;
        ddl(
            &mut tx,
            format!("ALTER TABLE {REPLAY_SCHEMA}.{table} SET SCHEMA public"),
        )
        .await?;
        ddl(&mut tx, format!("DROP TABLE {RETIRED_SCHEMA}.{table}")).await?;
    }
    sqlx::query("DELETE FROM public.projection_positions WHERE projection = $1")
        .bind(P::NAME)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO public.projection_positions
         SELECT * FROM {REPLAY_SCHEMA}.projection_positions WHERE projection = $1"
    ))
    .bind(P::NAME)
    .execute(&mut *tx)
    .await?;
    clear_shadow_positions::<P>(&mut tx).await?;
    tx.commit().await?;
    guard.release().await;
    Ok(replayed)
}

/// Rebuilds `projection` into shadow tables and compares them with the live ones, waiting up to
/// `patience` for the live model to catch up with the events table first. Drops the shadow.
///
/// A model the write side keeps inline is never behind the events it commits with: it is
/// compared in one repeatable-read snapshot, in which the shadow catches up with exactly the
/// events the live model shows, without holding back anyone's writes. A model fed by a worker
/// is compared under a lock that pauses its workers, once they have caught up.
pub async fn verify<P: Projection>(
    projection: &P,
    pool: &PgPool,
    patience: std::time::Duration,
    progress: impl FnMut(Progress),
) -> Result<Verified, ReplayError> {
    verify_from(projection, pool, Pages::own(), patience, progress).await
}

/// [`verify`], reading the events from `pages`.
pub async fn verify_from<P: Projection>(
    projection: &P,
    pool: &PgPool,
    mut pages: Pages,
    patience: std::time::Duration,
    progress: impl FnMut(Progress),
) -> Result<Verified, ReplayError> {
    let guard = pages.lock_for::<P>(pool).await?;
    let (cursor, rebuilt) = rebuild(projection, pool, pages, Applying::OneByOne, progress).await?;
    let compared = if P::KEPT_INLINE {
        compare_in_one_snapshot(projection, pool, cursor, &rebuilt.passed_over).await
    } else {
        compare_once_caught_up(projection, pool, cursor, &rebuilt.passed_over, patience).await
    };
    drop_shadow::<P>(pool).await?;
    guard.release().await;
    let (differences, tail) = compared?;
    let mut passed_over = rebuilt.passed_over;
    passed_over.extend(tail);
    Ok(Verified {
        differences,
        passed_over,
    })
}

/// What a comparison found, and the events its catch-up passed over.
type Compared = (Vec<Difference>, Vec<PassedOver>);

/// Catches the shadow up and compares, within one repeatable-read transaction.
async fn compare_in_one_snapshot<P: Projection>(
    projection: &P,
    pool: &PgPool,
    cursor: Cursor,
    passed_over: &[PassedOver],
) -> Result<Compared, ReplayError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    let tail = catch_up(projection, &mut tx, cursor, passed_over).await?;
    let differences = compare::<P>(&mut tx).await?;
    tx.rollback().await?;
    Ok((differences, tail.passed_over))
}

/// Locks the live model (pausing its workers), waits for it to have applied every event the
/// shadow has, and compares.
async fn compare_once_caught_up<P: Projection>(
    projection: &P,
    pool: &PgPool,
    cursor: Cursor,
    passed_over: &[PassedOver],
    patience: std::time::Duration,
) -> Result<Compared, ReplayError> {
    let deadline = Instant::now() + patience;
    loop {
        let mut tx = pool.begin().await?;
        lock_live(&mut tx, P::TABLES, "SHARE").await?;
        let tail = catch_up(projection, &mut tx, cursor, passed_over).await?;
        let behind = live_behind::<P>(&mut tx).await?;
        if behind > 0 {
            tx.rollback().await?;
            if Instant::now() >= deadline {
                return Err(ReplayError::LiveBehind {
                    projection: P::NAME,
                    behind,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        let differences = compare::<P>(&mut tx).await?;
        tx.rollback().await?;
        return Ok((differences, tail.passed_over));
    }
}

/// One replay per projection at a time: a session advisory lock on a connection of its own.
struct ReplayLock {
    connection: PgConnection,
}

impl ReplayLock {
    async fn take(pool: &PgPool, projection: &str) -> Result<Self, sqlx::Error> {
        let mut connection = pool.acquire().await?.detach();
        sqlx::query("SELECT pg_advisory_lock(hashtext('fleetlog replay ' || $1))")
            .bind(projection)
            .execute(&mut connection)
            .await?;
        Ok(Self { connection })
    }

    async fn release(self) {
        use sqlx::Connection;
        let _ = self.connection.close().await;
    }
}

/// Creates empty shadow tables and replays every event into them. Returns where it stopped.
/// How a rebuild applies a page of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applying {
    /// Set-wise, as the live worker applies a batch (one event by one only for a page with a
    /// gap or an event that fails): what a replay does.
    Batched,
    /// Event by event: what a verification does, so that the model it compares with the live
    /// one, built in batches, comes from the other way of applying.
    OneByOne,
}

async fn rebuild<P: Projection>(
    projection: &P,
    pool: &PgPool,
    mut pages: Pages,
    applying: Applying,
    mut progress: impl FnMut(Progress),
) -> Result<(Cursor, Replayed), ReplayError> {
    prepare_shadow::<P>(pool).await?;
    let total = fleetlog_eventlog::count_of_type(pool, P::AGGREGATE_TYPE).await?;
    let started = Instant::now();
    let mut cursor = Cursor::default();
    let mut replayed = Replayed::default();
    loop {
        let page = pages.next(pool, P::AGGREGATE_TYPE, cursor).await?;
        let Some(last) = page.last else {
            break;
        };
        cursor = last;
        let mut tx = pool.begin().await?;
        // A page of the rebuild need not wait for its WAL to reach the disk: after a crash the
        // replay is run again, and its shadow tables are built anew.
        ddl(&mut tx, "SET LOCAL synchronous_commit TO off".into()).await?;
        let (count, passed_over) = apply_page(
            projection,
            &mut tx,
            &page.events,
            &replayed.passed_over,
            applying,
        )
        .await?;
        tx.commit().await?;
        replayed.applied += count;
        replayed.passed_over.extend(passed_over);
        let applied = replayed.applied;
        let seconds = started.elapsed().as_secs_f64().max(1e-6);
        progress(Progress {
            applied,
            total: (total as u64).max(applied),
            rate: applied as f64 / seconds,
        });
    }
    Ok((cursor, replayed))
}

/// A page of events in commit order, and the place of its last event.
#[derive(Debug)]
struct Page {
    events: Vec<EventEnvelope>,
    /// `None` for an empty page: nothing after the cursor.
    last: Option<Cursor>,
}

impl From<Vec<StoredEvent>> for Page {
    fn from(rows: Vec<StoredEvent>) -> Self {
        Self {
            last: rows.last().map(StoredEvent::cursor),
            events: rows.into_iter().map(|row| row.envelope).collect(),
        }
    }
}

/// A page as a shared reader hands it on: the same page, or the same failure, to every reader.
type SharedPage = Result<Arc<Page>, Arc<sqlx::Error>>;

/// Where a rebuild reads its pages of settled events: on its own, or from one reading shared
/// by every rebuild of one aggregate type at once. `replay --all` rebuilds the devices and the
/// telemetry models from the same device events; read once, those events cost Postgres one
/// scan and fleetlog one decoding of the rows instead of two (each model still decodes the
/// payloads into its events itself).
pub struct Pages {
    source: Source,
    /// The replay lock, taken ahead for a shared reading (see [`Pages::shared`]).
    lock: Option<(&'static str, ReplayLock)>,
}

enum Source {
    /// Reads its own pages, the next one while this one is applied, on another connection.
    Own {
        ahead: Option<JoinHandle<Result<Page, sqlx::Error>>>,
    },
    /// Receives the pages of a reader shared with other rebuilds.
    Shared {
        /// Whose events it reads.
        aggregate_type: &'static str,
        pages: mpsc::Receiver<SharedPage>,
    },
}

impl Pages {
    /// Pages read by the rebuild itself.
    pub fn own() -> Self {
        Self {
            source: Source::Own { ahead: None },
            lock: None,
        }
    }

    /// One reading of the settled events of `aggregate_type`, handed to the rebuilds of each
    /// of `projections` (distinct, each reading that aggregate type), one [`Pages`] each, in
    /// order.
    ///
    /// The projections' replay locks are taken here, one after another in name order, before
    /// anything is read: the rebuilds of a shared reading wait on each other (a page goes on
    /// when each has taken it), so two such readings at once (two `replay --all`), each
    /// holding one lock and waiting for the other's, would never end. Taken in one order, the
    /// second waits for the first to finish. The reader stays at most a page ahead of the
    /// slowest rebuild, and stops when every rebuild has gone.
    pub async fn shared(
        pool: &PgPool,
        aggregate_type: &'static str,
        projections: &[&'static str],
    ) -> Result<Vec<Pages>, ReplayError> {
        let mut in_order = projections.to_vec();
        in_order.sort_unstable();
        if in_order.windows(2).any(|pair| pair[0] == pair[1]) {
            // Its second rebuild would wait for the lock its first holds, and the first for
            // the second to take its pages: neither would end.
            return Err(ReplayError::SharedMisuse(format!(
                "a projection named twice in {projections:?}"
            )));
        }
        let mut locks = Vec::with_capacity(in_order.len());
        for name in in_order {
            locks.push((name, ReplayLock::take(pool, name).await?));
        }
        let mut senders = Vec::with_capacity(projections.len());
        let mut pages = Vec::with_capacity(projections.len());
        for name in projections {
            let (sender, receiver) = mpsc::channel(1);
            senders.push(sender);
            let lock = locks
                .iter()
                .position(|(locked, _)| locked == name)
                .map(|at| locks.swap_remove(at));
            pages.push(Pages {
                source: Source::Shared {
                    aggregate_type,
                    pages: receiver,
                },
                lock,
            });
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut cursor = Cursor::default();
            while !senders.is_empty() {
                let page = read_page(&pool, aggregate_type, cursor)
                    .await
                    .map(Arc::new)
                    .map_err(Arc::new);
                let last = page.as_ref().ok().and_then(|page| page.last);
                let mut listening = Vec::with_capacity(senders.len());
                for sender in senders {
                    // A rebuild that ended (it failed) has dropped its receiver: it is gone.
                    if sender.send(page.clone()).await.is_ok() {
                        listening.push(sender);
                    }
                }
                senders = listening;
                match last {
                    Some(last) => cursor = last,
                    // The end, or a failure every rebuild now has.
                    None => break,
                }
            }
        });
        Ok(pages)
    }

    /// The replay lock of `P`: the one taken ahead for a shared reading, or taken now.
    async fn lock_for<P: Projection>(&mut self, pool: &PgPool) -> Result<ReplayLock, ReplayError> {
        match (&self.source, self.lock.take()) {
            (Source::Own { .. }, None) => Ok(ReplayLock::take(pool, P::NAME).await?),
            (Source::Shared { aggregate_type, .. }, Some((name, lock)))
                if name == P::NAME && *aggregate_type == P::AGGREGATE_TYPE =>
            {
                Ok(lock)
            }
            // Taking `P`'s lock now, beside the locks the reading's other rebuilds hold,
            // would undo their order (see `shared`); and the pages may be another type's.
            (_, taken) => {
                if let Some((_, lock)) = taken {
                    lock.release().await;
                }
                Err(ReplayError::SharedMisuse(format!(
                    "pages read for another projection handed to {}",
                    P::NAME
                )))
            }
        }
    }

    /// The page after `cursor` (which a shared reading knows already: it hands every rebuild
    /// the same pages).
    async fn next(
        &mut self,
        pool: &PgPool,
        aggregate_type: &'static str,
        cursor: Cursor,
    ) -> Result<Arc<Page>, ReplayError> {
        match &mut self.source {
            Source::Own { ahead } => {
                let page = match ahead.take() {
                    Some(reading) => match reading.await {
                        Ok(page) => page?,
                        // The task is never aborted: only a panic of its own ends it otherwise.
                        Err(failed) => std::panic::resume_unwind(failed.into_panic()),
                    },
                    None => read_page(pool, aggregate_type, cursor).await?,
                };
                if let Some(last) = page.last {
                    let pool = pool.clone();
                    *ahead = Some(tokio::spawn(async move {
                        read_page(&pool, aggregate_type, last).await
                    }));
                }
                Ok(Arc::new(page))
            }
            Source::Shared { pages, .. } => match pages.recv().await {
                Some(page) => page.map_err(ReplayError::SharedRead),
                // Only a panic of the reader ends it before the last page.
                None => Err(ReplayError::SharedRead(Arc::new(
                    sqlx::Error::WorkerCrashed,
                ))),
            },
        }
    }
}

/// The page of settled events of `aggregate_type` after `cursor`.
async fn read_page(
    pool: &PgPool,
    aggregate_type: &str,
    cursor: Cursor,
) -> Result<Page, sqlx::Error> {
    fleetlog_eventlog::page_in_commit_order(
        pool,
        aggregate_type,
        cursor,
        Horizon::Settled,
        REBUILD_PAGE_SIZE,
    )
    .await
    .map(Page::from)
}

/// Applies every page after `cursor` within `tx`. Returns how many events it applied.
///
/// Under the swap's lock it reads every committed event, not only the settled ones: holding
/// back those of transactions newer than the oldest one running (any transaction of the
/// cluster, however unrelated) would swap in a model without events the live workers had
/// already applied and acked. An event whose transaction commits later, behind the cursor or
/// not, reaches the live workers after the swap and is applied then: positions say the shadow
/// has not seen it.
async fn catch_up<P: Projection>(
    projection: &P,
    tx: &mut PgConnection,
    mut cursor: Cursor,
    earlier: &[PassedOver],
) -> Result<Replayed, ReplayError> {
    let mut replayed = Replayed::default();
    loop {
        let known: Vec<PassedOver> = earlier
            .iter()
            .chain(&replayed.passed_over)
            .cloned()
            .collect();
        let rows = fleetlog_eventlog::page_in_commit_order(
            &mut *tx,
            P::AGGREGATE_TYPE,
            cursor,
            Horizon::Committed,
            CATCH_UP_PAGE_SIZE,
        )
        .await?;
        let page = Page::from(rows);
        let Some(last) = page.last else {
            break;
        };
        cursor = last;
        let (count, passed_over) =
            apply_page(projection, tx, &page.events, &known, Applying::OneByOne).await?;
        replayed.applied += count;
        replayed.passed_over.extend(passed_over);
    }
    Ok(replayed)
}

/// Applies a page of events to the shadow tables, within `connection`'s transaction: how many
/// events it went through, and those it passed over.
///
/// The page runs under a savepoint. An event that fails for good rolls the page back to it;
/// the events before it are applied again, the failing one is passed over (as the live worker
/// dead-letters it), and the page goes on after it: one savepoint per page, not per event.
async fn apply_page<P: Projection>(
    projection: &P,
    connection: &mut PgConnection,
    events: &[EventEnvelope],
    earlier: &[PassedOver],
    applying: Applying,
) -> Result<(u64, Vec<PassedOver>), ReplayError> {
    ddl(
        connection,
        format!("SET LOCAL search_path TO {REPLAY_SCHEMA}, public"),
    )
    .await?;
    let count = events.len() as u64;
    if applying == Applying::Batched {
        ddl(connection, "SAVEPOINT replay_batch".into()).await?;
        match apply_judged(projection, connection, events).await {
            Ok(true) => {
                ddl(connection, "RELEASE SAVEPOINT replay_batch".into()).await?;
                sqlx::query("SET LOCAL search_path TO public")
                    .execute(&mut *connection)
                    .await?;
                return Ok((count, Vec::new()));
            }
            // A gap or an event that cannot be applied: the page again one by one, which
            // passes over what it must.
            Ok(false) => ddl(connection, "ROLLBACK TO SAVEPOINT replay_batch".into()).await?,
            Err(source) if source.is_about_the_event() => {
                ddl(connection, "ROLLBACK TO SAVEPOINT replay_batch".into()).await?
            }
            Err(source) => {
                return Err(ReplayError::Apply {
                    message_id: events[0].message_id(),
                    source,
                })
            }
        }
    }
    let mut passed_over = Vec::new();
    let mut start = 0;
    'page: loop {
        ddl(connection, "SAVEPOINT replay_page".into()).await?;
        for (index, event) in events.iter().enumerate().skip(start) {
            let failure = match apply_event(projection, connection, event).await {
                Ok(Position::Applied | Position::AlreadyApplied) => continue,
                Ok(Position::Gap { expected }) => {
                    let aggregate = (event.aggregate_type.clone(), event.aggregate_id.clone());
                    let after = earlier
                        .iter()
                        .chain(&passed_over)
                        .find(|passed| passed.aggregate == aggregate);
                    let Some(after) = after else {
                        return Err(ReplayError::Gap {
                            message_id: event.message_id(),
                            expected,
                        });
                    };
                    // Nothing was written for a gap: no rollback needed.
                    let reason = format!(
                        "replay: follows {}, which was passed over",
                        after.message_id
                    );
                    pass_over::<P>(connection, event, &reason).await?;
                    passed_over.push(PassedOver {
                        message_id: event.message_id(),
                        aggregate,
                        reason,
                    });
                    continue;
                }
                // Only a failure that would come again is passed over; any other stops the
                // replay before anything is swapped in, and running it again goes on.
                Err(source) if !source.is_about_the_event() => {
                    return Err(ReplayError::Apply {
                        message_id: event.message_id(),
                        source,
                    })
                }
                Err(source) => source,
            };
            ddl(connection, "ROLLBACK TO SAVEPOINT replay_page".into()).await?;
            for earlier in &events[start..index] {
                // Those passed over after a gap are passed over again: the rollback undid it.
                let message_id = earlier.message_id();
                if let Some(passed) = passed_over.iter().find(|p| p.message_id == message_id) {
                    pass_over::<P>(connection, earlier, &passed.reason).await?;
                    continue;
                }
                apply_event(projection, connection, earlier)
                    .await
                    .map_err(|source| ReplayError::Apply { message_id, source })?;
            }
            let reason = format!("replay: {failure}");
            pass_over::<P>(connection, event, &reason).await?;
            tracing::error!(
                projection = P::NAME,
                message_id = event.message_id(),
                reason,
                "passing over an event the projection cannot apply"
            );
            passed_over.push(PassedOver {
                message_id: event.message_id(),
                aggregate: (event.aggregate_type.clone(), event.aggregate_id.clone()),
                reason,
            });
            start = index + 1;
            continue 'page;
        }
        ddl(connection, "RELEASE SAVEPOINT replay_page".into()).await?;
        break;
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *connection)
        .await?;
    Ok((count, passed_over))
}

/// Runs one statement without parameters (DDL and locks, whose names cannot be bound).
async fn ddl(connection: &mut PgConnection, statement: String) -> Result<(), sqlx::Error> {
    sqlx::query(&statement).execute(connection).await?;
    Ok(())
}

/// Forgets the rebuilt positions of `P`.
async fn clear_shadow_positions<P: Projection>(
    connection: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM {REPLAY_SCHEMA}.projection_positions WHERE projection = $1"
    ))
    .bind(P::NAME)
    .execute(connection)
    .await?;
    Ok(())
}

async fn prepare_shadow<P: Projection>(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Replays of different projections may run at once: `CREATE ... IF NOT EXISTS` of the
    // schema and the positions table is not safe against a concurrent one.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('fleetlog replay schema'))")
        .execute(&mut *tx)
        .await?;
    ddl(
        &mut tx,
        format!("CREATE SCHEMA IF NOT EXISTS {REPLAY_SCHEMA}"),
    )
    .await?;
    ddl(
        &mut tx,
        format!(
            "CREATE TABLE IF NOT EXISTS {REPLAY_SCHEMA}.projection_positions
           (LIKE public.projection_positions INCLUDING ALL)"
        ),
    )
    .await?;
    clear_shadow_positions::<P>(&mut tx).await?;
    for table in P::TABLES {
        ddl(
            &mut tx,
            format!("DROP TABLE IF EXISTS {REPLAY_SCHEMA}.{table}"),
        )
        .await?;
        ddl(
            &mut tx,
            format!(
                "CREATE TABLE {REPLAY_SCHEMA}.{table}
                   (LIKE public.{table} INCLUDING ALL EXCLUDING INDEXES)"
            ),
        )
        .await?;
        copy_storage_parameters(&mut tx, table).await?;
        for index in shadow_indexes::<P>(&mut tx, table).await? {
            if index.from_the_start {
                ddl(&mut tx, index.statement).await?;
            }
        }
    }
    tx.commit().await
}

/// An index of a live table, as its shadow gets it.
struct ShadowIndex {
    /// The statement that creates it on the shadow table, under the live one's name.
    statement: String,
    /// Whether the rebuild needs it. The primary key, unique constraints and unique indexes
    /// are there from the start: the projection's writes find rows by them or rely on them to
    /// refuse a row. Every other index only serves readers, and is built after the rebuild,
    /// once, by a sort, instead of being updated for every row written (which, for a large
    /// table, costs more than writing the rows). So is the unique key of a projection that
    /// keeps no positions ([`Positions::Keyed`]): it only makes an event applied twice a
    /// no-op, and a rebuild applies each event once.
    from_the_start: bool,
}

/// The indexes of the live `table`, in the order they were created.
async fn shadow_indexes<P: Projection>(
    connection: &mut PgConnection,
    table: &str,
) -> Result<Vec<ShadowIndex>, sqlx::Error> {
    let rows: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid)
                     ELSE format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s',
                                 $2::text, $3::text, c.conname, pg_get_constraintdef(c.oid))
                 END,
                c.oid IS NOT NULL,
                i.indisunique
           FROM pg_index i
           LEFT JOIN pg_constraint c
             ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
            AND c.contype IN ('p', 'u', 'x')
          WHERE i.indrelid = $1::regclass
          ORDER BY i.indexrelid",
    )
    .bind(format!("public.{table}"))
    .bind(REPLAY_SCHEMA)
    .bind(table)
    .fetch_all(connection)
    .await?;
    let keyed = P::POSITIONS == Positions::Keyed;
    Ok(rows
        .into_iter()
        .map(|(statement, constraint, unique)| ShadowIndex {
            // `pg_get_indexdef` names the table with its schema.
            statement: if constraint {
                statement
            } else {
                statement.replacen(
                    &format!(" ON public.{table} "),
                    &format!(" ON {REPLAY_SCHEMA}.{table} "),
                    1,
                )
            },
            from_the_start: constraint || (unique && !keyed),
        })
        .collect())
}

/// Builds the indexes the rebuild went without ([`ShadowIndex::from_the_start`]), before the
/// swap: the model swapped in has every index of the live one.
async fn build_deferred_indexes<P: Projection>(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for table in P::TABLES {
        for index in shadow_indexes::<P>(&mut tx, table).await? {
            if !index.from_the_start {
                ddl(&mut tx, index.statement).await?;
            }
        }
    }
    tx.commit().await
}

/// `LIKE ... INCLUDING ALL` leaves out storage parameters (such as the devices table's
/// fillfactor); the shadow gets the live table's, so the table swapped in behaves the same.
async fn copy_storage_parameters(
    connection: &mut PgConnection,
    table: &str,
) -> Result<(), sqlx::Error> {
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = $1::regclass")
            .bind(format!("public.{table}"))
            .fetch_one(&mut *connection)
            .await?;
    match options {
        Some(options) if !options.is_empty() => {
            ddl(
                connection,
                format!(
                    "ALTER TABLE {REPLAY_SCHEMA}.{table} SET ({})",
                    options.join(", ")
                ),
            )
            .await
        }
        _ => Ok(()),
    }
}

async fn drop_shadow<P: Projection>(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for table in P::TABLES {
        ddl(
            &mut tx,
            format!("DROP TABLE IF EXISTS {REPLAY_SCHEMA}.{table}"),
        )
        .await?;
    }
    clear_shadow_positions::<P>(&mut tx).await?;
    tx.commit().await
}

/// Stops live workers of every projection (they lock positions first) and then takes `mode` on
/// this projection's live tables, in the same order as the workers, so the two never deadlock.
async fn lock_live(tx: &mut PgConnection, tables: &[&str], mode: &str) -> Result<(), sqlx::Error> {
    sqlx::query("LOCK TABLE public.projection_positions IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let tables = tables
        .iter()
        .map(|t| format!("public.{t}"))
        .collect::<Vec<_>>()
        .join(", ");
    ddl(tx, format!("LOCK TABLE {tables} IN {mode} MODE")).await?;
    Ok(())
}

/// How far a model fed by a worker is behind the rebuilt one: aggregates whose live position
/// differs from the rebuilt one.
async fn live_behind<P: Projection>(tx: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {REPLAY_SCHEMA}.projection_positions shadow
           LEFT JOIN public.projection_positions live
             ON live.projection = shadow.projection
            AND live.aggregate_type = shadow.aggregate_type
            AND live.aggregate_id = shadow.aggregate_id
          WHERE shadow.projection = $1
            AND live.last_sequence IS DISTINCT FROM shadow.last_sequence"
    ))
    .bind(P::NAME)
    .fetch_one(tx)
    .await
}

/// Which rows of `table` belong to the model: the projection's retention condition, or all.
fn retained<P: Projection>(table: &str) -> &'static str {
    P::RETAINED
        .iter()
        .find(|(name, _)| *name == table)
        .map_or("true", |(_, condition)| condition)
}

/// Rows in one model and not the other, at most 50 per table and side.
async fn compare<P: Projection>(tx: &mut PgConnection) -> Result<Vec<Difference>, sqlx::Error> {
    let mut differences = Vec::new();
    for table in P::TABLES {
        for (only_in, left, right) in [
            ("live", "public", REPLAY_SCHEMA),
            ("replay", REPLAY_SCHEMA, "public"),
        ] {
            let retained = retained::<P>(table);
            let rows: Vec<serde_json::Value> = sqlx::query_scalar(&format!(
                "SELECT to_jsonb(d) FROM (
                     SELECT * FROM {left}.{table} WHERE {retained}
                     EXCEPT ALL
                     SELECT * FROM {right}.{table} WHERE {retained}
                 ) d LIMIT 50"
            ))
            .fetch_all(&mut *tx)
            .await?;
            differences.extend(rows.into_iter().map(|row| Difference {
                table,
                only_in,
                row,
            }));
        }
    }
    Ok(differences)
}
