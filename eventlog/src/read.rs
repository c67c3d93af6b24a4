//! Every read of the `events` table.
//!
//! The functions take any Postgres executor (a pool, a connection, a transaction), so a reader
//! that needs the events within its own transaction (a replay's catch-up under its lock, a past
//! view over temporary tables) reads them there.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::envelope::{EventEnvelope, OutgoingEvent, StoredEvent};

/// The columns of an [`EventEnvelope`].
macro_rules! envelope_columns {
    () => {
        "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
         global_position, recorded_at"
    };
}

/// The columns of a [`StoredEvent`] or an [`OutgoingEvent`]. The transaction id is selected as
/// text under another name: see [`StoredEvent::transaction_id`].
macro_rules! stored_columns {
    () => {
        concat!(
            envelope_columns!(),
            ", transaction_id::text AS transaction_text"
        )
    };
}

/// A page after a `(transaction_id, global_position)` cursor, in that order, of one aggregate
/// type (`$1`), with the extra filter given.
macro_rules! commit_order_page {
    ($filter:literal) => {
        concat!(
            "SELECT ",
            stored_columns!(),
            " FROM events
             WHERE aggregate_type = $1
               AND (transaction_id, global_position) > ($2::text::xid8, $3)",
            $filter,
            " ORDER BY events.transaction_id, events.global_position
             LIMIT $4"
        )
    };
}

/// Only transactions older than the oldest one running: no event can appear later behind the
/// cursor. Transaction ids are the cluster's, so any long transaction holds this back.
const SELECT_SETTLED_PAGE: &str =
    commit_order_page!(" AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())");
const SELECT_COMMITTED_PAGE: &str = commit_order_page!("");

const SELECT_OUTGOING_PAGE: &str = concat!(
    "SELECT ",
    stored_columns!(),
    " FROM events
     WHERE (transaction_id, global_position) > ($1::text::xid8, $2)
       AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
     ORDER BY events.transaction_id, events.global_position
     LIMIT $3"
);

/// A point in commit-safe order: `(transaction_id, global_position)`. Positions are handed out
/// at insert, not at commit, so a reader that moved past position 11 could later miss 10; in
/// this order, read only up to the settled horizon, no event ever appears behind the cursor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// The inserting transaction.
    pub transaction_id: u64,
    /// The event's global position.
    pub global_position: i64,
}

/// Which committed events a page in commit order may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Horizon {
    /// Only events of transactions older than the oldest one running: nothing can commit
    /// later behind the cursor. For tails: the relay, a replay's rebuild.
    Settled,
    /// Every committed event. For a last catch-up under a lock that keeps out new writes to
    /// what the reader builds; an event that commits later behind the cursor reaches the
    /// reader another way (the replay's live workers).
    Committed,
}

/// Up to `limit` events of `aggregate_type` after `after` in commit order.
pub async fn page_in_commit_order(
    executor: impl PgExecutor<'_>,
    aggregate_type: &str,
    after: Cursor,
    horizon: Horizon,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let select = match horizon {
        Horizon::Settled => SELECT_SETTLED_PAGE,
        Horizon::Committed => SELECT_COMMITTED_PAGE,
    };
    sqlx::query_as(select)
        .bind(aggregate_type)
        .bind(after.transaction_id.to_string())
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(executor)
        .await
}

/// Up to `limit` settled events of every type after `after` in commit order, with payload and
/// metadata as the stored JSON text: what the relay publishes as it is.
pub async fn outgoing_page(
    executor: impl PgExecutor<'_>,
    after: Cursor,
    limit: i64,
) -> Result<Vec<OutgoingEvent>, sqlx::Error> {
    sqlx::query_as(SELECT_OUTGOING_PAGE)
        .bind(after.transaction_id.to_string())
        .bind(after.global_position)
        .bind(limit)
        .fetch_all(executor)
        .await
}

/// The event at `global_position`, if any.
pub async fn at_position(
    executor: impl PgExecutor<'_>,
    global_position: i64,
) -> Result<Option<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        envelope_columns!(),
        " FROM events WHERE global_position = $1"
    ))
    .bind(global_position)
    .fetch_optional(executor)
    .await
}

/// Which page of an aggregate's history to read.
#[derive(Debug, Clone, Copy)]
pub struct HistoryQuery<'a> {
    /// The aggregate's type.
    pub aggregate_type: &'a str,
    /// The aggregate's id.
    pub aggregate_id: &'a str,
    /// Only events after this sequence (0: from the first).
    pub after_sequence: i64,
    /// Only events of this type.
    pub event_type: Option<&'a str>,
    /// At most this many.
    pub limit: i64,
}

/// A page of one aggregate's history, oldest first. Secrets are as stored: callers that show
/// the events to anyone call [`EventEnvelope::redact_secrets`].
pub async fn history(
    executor: impl PgExecutor<'_>,
    query: HistoryQuery<'_>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        envelope_columns!(),
        " FROM events
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3
           AND ($4::text IS NULL OR event_type = $4)
         ORDER BY sequence LIMIT $5"
    ))
    .bind(query.aggregate_type)
    .bind(query.aggregate_id)
    .bind(query.after_sequence)
    .bind(query.event_type)
    .bind(query.limit)
    .fetch_all(executor)
    .await
}

/// One aggregate's sequences `(after, up_to]`, for [`ranges`].
#[derive(Debug, Clone, Copy)]
pub struct SequenceRange<'a> {
    /// The aggregate's id.
    pub aggregate_id: &'a str,
    /// Only events after this sequence.
    pub after: i64,
    /// Only events up to this sequence (inclusive).
    pub up_to: i64,
}

/// The events of several aggregates of one type, each within its range, ordered by aggregate
/// and sequence: how a projection fills a gap from the source of truth instead of waiting for
/// the stream to deliver the missing events again. Secrets are as stored.
pub async fn ranges(
    executor: impl PgExecutor<'_>,
    aggregate_type: &str,
    ranges: &[SequenceRange<'_>],
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    let ids: Vec<&str> = ranges.iter().map(|r| r.aggregate_id).collect();
    let afters: Vec<i64> = ranges.iter().map(|r| r.after).collect();
    let up_tos: Vec<i64> = ranges.iter().map(|r| r.up_to).collect();
    sqlx::query_as(concat!(
        "SELECT ",
        envelope_columns!(),
        " FROM events
           JOIN UNNEST($2::text[], $3::int8[], $4::int8[]) AS wanted(range_id, range_after, range_up_to)
             ON aggregate_id = range_id AND sequence > range_after AND sequence <= range_up_to
          WHERE aggregate_type = $1
          ORDER BY aggregate_id, sequence"
    ))
    .bind(aggregate_type)
    .bind(&ids)
    .bind(&afters)
    .bind(&up_tos)
    .fetch_all(executor)
    .await
}

/// Up to `limit` events of one aggregate recorded until `at` (inclusive) after
/// `after_sequence`, in order: a page of the aggregate as it stood at that instant. `at` must
/// lie within what Postgres holds (4713 BC to 294276 AD); the API accepts 1970 to 9999.
pub async fn until(
    executor: impl PgExecutor<'_>,
    aggregate_type: &str,
    aggregate_id: &str,
    at: DateTime<Utc>,
    after_sequence: i64,
    limit: i64,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        envelope_columns!(),
        " FROM events
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND recorded_at <= $3 AND sequence > $4
         ORDER BY sequence LIMIT $5"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(at)
    .bind(after_sequence)
    .bind(limit)
    .fetch_all(executor)
    .await
}

/// How many events of one aggregate were recorded until `at` (inclusive), counting at most to
/// `cap` (so asking about a huge history costs no more than `cap` rows).
pub async fn count_until(
    executor: impl PgExecutor<'_>,
    aggregate_type: &str,
    aggregate_id: &str,
    at: DateTime<Utc>,
    cap: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events
                                WHERE aggregate_type = $1 AND aggregate_id = $2 AND recorded_at <= $3
                                LIMIT $4) AS until_then",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(at)
    .bind(cap)
    .fetch_one(executor)
    .await
}

/// Which of `digests` a device's recent reports recorded: those among its last `lookback`
/// events of the `event_types` given (each of which records a `digest`).
///
/// The one read that looks inside stored payloads in SQL, past the upcasters: every version of
/// those event types keeps `digest` where it is (a version that moved it would need this query
/// to read both places).
pub async fn recent_digests(
    executor: impl PgExecutor<'_>,
    device_id: &str,
    event_types: &[&str],
    digests: &[String],
    lookback: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payload -> event_type ->> 'digest'
           FROM events
          WHERE aggregate_type = 'device' AND aggregate_id = $1
            AND sequence > (SELECT coalesce(max(sequence), 0) - $4 FROM events
                             WHERE aggregate_type = 'device' AND aggregate_id = $1)
            AND event_type = ANY($2)
            AND payload -> event_type ->> 'digest' = ANY($3)",
    )
    .bind(device_id)
    .bind(event_types)
    .bind(digests)
    .bind(lookback)
    .fetch_all(executor)
    .await
}

/// How many events of `aggregate_type` the table holds.
pub async fn count_of_type(
    executor: impl PgExecutor<'_>,
    aggregate_type: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = $1")
        .bind(aggregate_type)
        .fetch_one(executor)
        .await
}

/// The event types that decide a device's standing credential.
pub const DEVICE_CREDENTIAL_EVENTS: [&str; 3] = [
    "DeviceCredentialsRotated",
    "DeviceCredentialsRevoked",
    "DeviceDecommissioned",
];

/// The latest of [`DEVICE_CREDENTIAL_EVENTS`] per device, with an extra filter. The partial
/// index `events_device_credentials_idx` holds exactly these events (its predicate is spelled
/// out so the planner can use it).
macro_rules! latest_device_credentials {
    ($filter:literal) => {
        concat!(
            "SELECT DISTINCT ON (aggregate_id) ",
            envelope_columns!(),
            " FROM events
             WHERE aggregate_type = 'device'
               AND event_type IN ('DeviceCredentialsRotated', 'DeviceCredentialsRevoked',
                                  'DeviceDecommissioned')",
            $filter,
            " ORDER BY aggregate_id, sequence DESC"
        )
    };
}

/// For every device with one of [`DEVICE_CREDENTIAL_EVENTS`], the latest of them (by
/// sequence), in device id order: what the broker sync makes the broker match at its start.
pub async fn device_credential_events(
    executor: impl PgExecutor<'_>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(latest_device_credentials!(""))
        .fetch_all(executor)
        .await
}

/// The latest of [`DEVICE_CREDENTIAL_EVENTS`] of one device, if it has any: its standing
/// credential, as committed now.
pub async fn device_credential_event(
    executor: impl PgExecutor<'_>,
    device_id: &str,
) -> Result<Option<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(latest_device_credentials!(" AND aggregate_id = $1"))
        .bind(device_id)
        .fetch_optional(executor)
        .await
}

/// The event types that decide whether a provisioning key has a broker account.
pub const PROVISIONING_KEY_EVENTS: [&str; 2] = ["ProvisioningKeyCreated", "ProvisioningKeyRevoked"];

/// The latest of [`PROVISIONING_KEY_EVENTS`] per provisioning key, with an extra filter.
macro_rules! latest_key_standing {
    ($filter:literal) => {
        concat!(
            "SELECT DISTINCT ON (aggregate_id) ",
            envelope_columns!(),
            " FROM events
             WHERE aggregate_type = 'provisioning_key'
               AND event_type IN ('ProvisioningKeyCreated', 'ProvisioningKeyRevoked')",
            $filter,
            " ORDER BY aggregate_id, sequence DESC"
        )
    };
}

/// For every provisioning key, whichever of its creation and its revocation came last: what
/// the broker sync gives (or takes) a broker account for.
pub async fn provisioning_key_events(
    executor: impl PgExecutor<'_>,
) -> Result<Vec<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(latest_key_standing!(""))
        .fetch_all(executor)
        .await
}

/// The same for one key.
pub async fn provisioning_key_event(
    executor: impl PgExecutor<'_>,
    key_id: &str,
) -> Result<Option<EventEnvelope>, sqlx::Error> {
    sqlx::query_as(latest_key_standing!(" AND aggregate_id = $1"))
        .bind(key_id)
        .fetch_optional(executor)
        .await
}

/// How many events lie after `cursor` in commit order (committed or settled alike): for a
/// tail, how far behind it is.
pub async fn count_after(
    executor: impl PgExecutor<'_>,
    cursor: Cursor,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE (transaction_id, global_position) > ($1::text::xid8, $2)",
    )
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.global_position)
    .fetch_one(executor)
    .await
}

/// What the table holds, in a few numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Events in all.
    pub events: i64,
    /// Distinct aggregates.
    pub aggregates: i64,
    /// The highest global position, 0 for an empty table.
    pub last_position: i64,
    /// `(aggregate_type, event_type, count)`, ordered by the first two.
    pub by_type: Vec<(String, String, i64)>,
}

/// Counts of the whole table. Reads every row: for an operator, not for a request path.
pub async fn summary(pool: &PgPool) -> Result<Summary, sqlx::Error> {
    let by_type = sqlx::query_as(
        "SELECT aggregate_type, event_type, count(*) FROM events GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let (events, aggregates, last_position): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (aggregate_type, aggregate_id)), max(global_position)
           FROM events",
    )
    .fetch_one(pool)
    .await?;
    Ok(Summary {
        events,
        aggregates,
        last_position: last_position.unwrap_or(0),
        by_type,
    })
}
