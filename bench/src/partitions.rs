//! `fleetlog-bench partitions`: the event log's reads over tens of millions of events, in the
//! table as fleetlog lays it out and in the same table partitioned by month, side by side.
//!
//! Each layout gets a scratch database with fleetlog's schema (its migrations), the same
//! synthetic device events (readings, spread over the last `months` months, many devices each
//! with events in every month), and the same measurements, each through fleetlog's own reads
//! (`fleetlog_eventlog`): the relay's page at the tail, a replay's pages from the start, one
//! device's history, small appends as the write side makes them, and letting the oldest month
//! go (a `DELETE`, or a `DETACH` and `DROP` of its partition). It also shows what partitioning
//! costs the write side: Postgres enforces a partitioned table's unique keys only with the
//! partition key in them, so `(aggregate_type, aggregate_id, sequence)`, the append's
//! optimistic lock, is no longer unique by itself.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use fleetlog_eventlog::{Cursor, HistoryQuery, Horizon};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// What `fleetlog-bench partitions` takes.
#[derive(clap::Args)]
pub struct PartitionArgs {
    /// A Postgres URL allowed to create databases (the local stack's admin).
    #[arg(long, env = "FLEETLOG_TEST_DATABASE_URL", hide_env_values = true)]
    admin_url: String,
    /// Events to load into each layout.
    #[arg(long, default_value_t = 20_000_000)]
    events: i64,
    /// Devices the events belong to (each has events in every month).
    #[arg(long, default_value_t = 50_000)]
    devices: i64,
    /// Months the events span, ending with the current one: one partition each.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(2..=120))]
    months: u32,
    /// Where to write the report as JSON.
    #[arg(long, env = "PARTITIONS_JSON")]
    json: Option<std::path::PathBuf>,
    /// Keep the scratch databases afterwards (to look at them).
    #[arg(long)]
    keep: bool,
}

/// The two layouts compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `events` as fleetlog's migrations make it.
    Plain,
    /// `events` partitioned by month of `recorded_at`.
    Monthly,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Monthly => "monthly",
        }
    }
}

/// One layout's figures.
#[derive(Serialize)]
struct Figures {
    layout: &'static str,
    events: i64,
    load_events_per_s: f64,
    size_gb: f64,
    relay_tail_page_ms_p50: f64,
    relay_tail_page_ms_p99: f64,
    replay_read_events_per_s: f64,
    history_ms_p50: f64,
    history_ms_p99: f64,
    append_rows_per_s: f64,
    drop_oldest_month_s: f64,
    oldest_month_events: i64,
    duplicate_sequence_refused: bool,
}

/// Relay pages timed at the tail.
const TAIL_PAGES: usize = 100;
/// The relay's page size (its default batch).
const RELAY_PAGE: i64 = 1_000;
/// A replay's page size, and how many pages are timed.
const REPLAY_PAGE: i64 = 5_000;
const REPLAY_PAGES: usize = 200;
/// Histories timed, and their length (the API's default page).
const HISTORIES: usize = 200;
const HISTORY_LIMIT: i64 = 100;
/// Appends timed: statements of rows, as ingest's batches make them.
const APPENDS: usize = 1_000;
const APPEND_ROWS: usize = 50;
/// Rows per loading statement.
const LOAD_CHUNK: i64 = 1_000_000;

pub async fn run(args: PartitionArgs) -> anyhow::Result<()> {
    let started = Utc::now();
    let mut report = Vec::new();
    for layout in [Layout::Plain, Layout::Monthly] {
        let database = format!("fleetlog_bench_events_{}", layout.name());
        let pool = scratch_database(&args.admin_url, &database).await?;
        let figures = measure(&pool, layout, &args).await;
        pool.close().await;
        if !args.keep {
            drop_database(&args.admin_url, &database).await?;
        }
        let figures = figures?;
        eprintln!("{}: done", layout.name());
        report.push(figures);
    }
    print_report(&report, &args);
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "measured_at": started,
            "machine": crate::machine(),
            "events": args.events,
            "devices": args.devices,
            "months": args.months,
            "layouts": report,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

async fn scratch_database(admin_url: &str, database: &str) -> anyhow::Result<PgPool> {
    drop_database(admin_url, database).await?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await?;
    admin.close().await;
    let url = match admin_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => anyhow::bail!("the admin URL names no database: {admin_url}"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&url)
        .await?;
    fleetlog_commands::migrate(&pool).await?;
    Ok(pool)
}

async fn drop_database(admin_url: &str, database: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(admin_url)
        .await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

/// The first instant of the month `back` months before the current one.
fn month_start(now: DateTime<Utc>, back: u32) -> DateTime<Utc> {
    let months = now.year() * 12 + now.month0() as i32 - back as i32;
    Utc.with_ymd_and_hms(
        months.div_euclid(12),
        months.rem_euclid(12) as u32 + 1,
        1,
        0,
        0,
        0,
    )
    .single()
    .expect("the first of a month exists")
}

/// Replaces the (empty) `events` table with one partitioned by month: the same columns and
/// defaults, its keys widened by the partition key as Postgres requires, a partition per month
/// from `first` to the month after this one.
async fn partition_by_month(
    pool: &PgPool,
    first: DateTime<Utc>,
    months: u32,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for statement in [
        // The columns, defaults and checks as the migrations made them; the identity becomes
        // a sequence (a partitioned table has none in Postgres 15) and the keys take
        // `recorded_at`, as a partitioned table's unique keys must.
        "ALTER TABLE events RENAME TO events_as_migrated".to_string(),
        "CREATE SEQUENCE events_by_month_position_seq".into(),
        "CREATE TABLE events (LIKE events_as_migrated INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
             PRIMARY KEY (aggregate_type, aggregate_id, sequence, recorded_at)
         ) PARTITION BY RANGE (recorded_at)".into(),
        "ALTER TABLE events ALTER COLUMN global_position
             SET DEFAULT nextval('events_by_month_position_seq')".into(),
        "DROP TABLE events_as_migrated".into(),
        "CREATE UNIQUE INDEX events_global_position_idx ON events (global_position, recorded_at)".into(),
        "CREATE INDEX events_tail_idx ON events (transaction_id, global_position)".into(),
        "CREATE INDEX events_device_credentials_idx ON events (aggregate_id, sequence)
             WHERE aggregate_type = 'device'
               AND event_type IN ('DeviceCredentialsRotated', 'DeviceCredentialsRevoked', 'DeviceDecommissioned')".into(),
        "CREATE TRIGGER events_appended AFTER INSERT ON events
             FOR EACH STATEMENT EXECUTE FUNCTION notify_events_appended()".into(),
    ] {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    for month in 0..=months {
        let from = month_start(first, 0) + chrono::Months::new(month);
        let to = from + chrono::Months::new(1);
        sqlx::query(&format!(
            "CREATE TABLE events_m{month:03} PARTITION OF events
                 FOR VALUES FROM ('{}') TO ('{}')",
            from.to_rfc3339(),
            to.to_rfc3339()
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn measure(pool: &PgPool, layout: Layout, args: &PartitionArgs) -> anyhow::Result<Figures> {
    let now = Utc::now();
    let first = month_start(now, args.months - 1);
    if layout == Layout::Monthly {
        partition_by_month(pool, first, args.months).await?;
    }

    // Load: event i belongs to device i mod D, as its (i / D + 1)th event, recorded at an
    // instant that grows with i from the first month's start to now.
    let span_us = (now - first).num_microseconds().unwrap_or(i64::MAX) as f64;
    let load_started = Instant::now();
    let mut loaded = 0;
    while loaded < args.events {
        let chunk = LOAD_CHUNK.min(args.events - loaded);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, recorded_at)
             SELECT 'device', 'dev-' || (i % $3), i / $3 + 1, 'TelemetryRecorded', '1.0',
                    format('{\"TelemetryRecorded\":{\"digest\":\"%s\",\"readings\":[{\"sensor\":\"temperature\",\"value\":%s,\"unit\":\"celsius\",\"timestamp\":\"%s\"},{\"sensor\":\"humidity\",\"value\":%s,\"timestamp\":\"%s\"}],\"received_at\":\"%s\"}}',
                           to_hex(i * 2654435761 % 4294967296), round((i % 400)::numeric / 10, 1), t, i % 100, t, t)::json,
                    format('{\"actor\":\"device:dev-%s\",\"correlation_id\":\"%s\",\"tenant\":\"acme\"}', i % $3, i)::json,
                    t
               FROM generate_series($1::bigint, $2::bigint) AS i,
                    LATERAL (SELECT $4::timestamptz + make_interval(secs => i * $5 / 1e6)) AS at(t)
              ORDER BY i",
        )
        .bind(loaded)
        .bind(loaded + chunk - 1)
        .bind(args.devices)
        .bind(first)
        .bind(span_us / args.events as f64)
        .execute(pool)
        .await
        .with_context(|| format!("cannot load events into the {} layout", layout.name()))?;
        loaded += chunk;
        eprintln!("{}: loaded {loaded} events", layout.name());
    }
    let load_events_per_s = args.events as f64 / load_started.elapsed().as_secs_f64();
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    let size_gb: f64 = sqlx::query_scalar(
        "SELECT (coalesce(sum(pg_total_relation_size(c.oid)), 0) / 1e9)::float8
           FROM pg_class c
          WHERE c.relname = 'events' OR c.oid IN (SELECT inhrelid FROM pg_inherits
                                                   WHERE inhparent = 'events'::regclass)",
    )
    .fetch_one(pool)
    .await?;

    // The relay at the tail: a page after a cursor among the last events.
    let tail: Vec<(String, i64)> = sqlx::query_as(
        "SELECT transaction_id::text, global_position FROM events
          ORDER BY global_position DESC LIMIT $1",
    )
    .bind(TAIL_PAGES as i64 * 10)
    .fetch_all(pool)
    .await?;
    let mut relay = Vec::with_capacity(TAIL_PAGES);
    for (transaction_id, global_position) in tail.iter().step_by(10).take(TAIL_PAGES) {
        let cursor = Cursor {
            transaction_id: transaction_id.parse()?,
            global_position: global_position - RELAY_PAGE,
        };
        let started = Instant::now();
        let page = fleetlog_eventlog::outgoing_page(pool, cursor, RELAY_PAGE).await?;
        relay.push(started.elapsed());
        anyhow::ensure!(!page.is_empty(), "the relay read an empty page at the tail");
    }

    // A replay from the start: pages of settled events in commit order, decoded.
    let mut cursor = Cursor::default();
    let mut read = 0_u64;
    let replay_started = Instant::now();
    for _ in 0..REPLAY_PAGES {
        let page = fleetlog_eventlog::page_in_commit_order(
            pool,
            "device",
            cursor,
            Horizon::Settled,
            REPLAY_PAGE,
        )
        .await?;
        let Some(last) = page.last() else { break };
        cursor = last.cursor();
        read += page.len() as u64;
    }
    let replay_read_events_per_s = read as f64 / replay_started.elapsed().as_secs_f64();

    // One device's history (its first page), as the API reads it.
    let mut histories = Vec::with_capacity(HISTORIES);
    for n in 0..HISTORIES as i64 {
        let device = format!("dev-{}", (n * 7919) % args.devices);
        let started = Instant::now();
        let events = fleetlog_eventlog::history(
            pool,
            HistoryQuery {
                aggregate_type: "device",
                aggregate_id: &device,
                after_sequence: 0,
                event_type: None,
                limit: HISTORY_LIMIT,
            },
        )
        .await?;
        histories.push(started.elapsed());
        anyhow::ensure!(!events.is_empty(), "{device} has no history");
    }

    // Appends as the write side makes them: a statement of rows for new sequences, now.
    let next_sequence = args.events / args.devices + 10;
    let append_started = Instant::now();
    for statement in 0..APPENDS {
        let ids: Vec<String> = (0..APPEND_ROWS)
            .map(|row| {
                format!(
                    "dev-{}",
                    (statement * APPEND_ROWS + row) as i64 % args.devices
                )
            })
            .collect();
        let sequences: Vec<i64> = (0..APPEND_ROWS)
            .map(|row| next_sequence + ((statement * APPEND_ROWS + row) as i64 / args.devices))
            .collect();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'device', e.aggregate_id, e.sequence, 'HeartbeatReceived', '1.0',
                    '{\"HeartbeatReceived\":{\"received_at\":\"2026-12-07T00:00:00Z\"}}'::json,
                    '{\"actor\":\"bench\",\"correlation_id\":\"c\"}'::json
               FROM UNNEST($1::text[], $2::bigint[]) AS e(aggregate_id, sequence)
              ORDER BY e.aggregate_id, e.sequence
             RETURNING aggregate_id, sequence, global_position",
        )
        .bind(&ids)
        .bind(&sequences)
        .fetch_all(pool)
        .await?;
    }
    let append_rows_per_s = (APPENDS * APPEND_ROWS) as f64 / append_started.elapsed().as_secs_f64();

    // The optimistic lock: a second event with a sequence the aggregate already has.
    let duplicate_sequence_refused = sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, recorded_at)
         VALUES ('device', 'dev-0', 1, 'HeartbeatReceived', '1.0', '{}', '{}', now())",
    )
    .execute(pool)
    .await
    .is_err();

    // Letting the oldest month go.
    let oldest_month_end = month_start(first, 0) + chrono::Months::new(1);
    let oldest_month_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE recorded_at < $1")
            .bind(oldest_month_end)
            .fetch_one(pool)
            .await?;
    let drop_started = Instant::now();
    match layout {
        Layout::Plain => {
            sqlx::query("DELETE FROM events WHERE recorded_at < $1")
                .bind(oldest_month_end)
                .execute(pool)
                .await?;
        }
        Layout::Monthly => {
            sqlx::query("ALTER TABLE events DETACH PARTITION events_m000")
                .execute(pool)
                .await?;
            sqlx::query("DROP TABLE events_m000").execute(pool).await?;
        }
    }
    let drop_oldest_month_s = drop_started.elapsed().as_secs_f64();

    Ok(Figures {
        layout: layout.name(),
        events: args.events,
        load_events_per_s,
        size_gb,
        relay_tail_page_ms_p50: percentile_ms(&mut relay, 0.50),
        relay_tail_page_ms_p99: percentile_ms(&mut relay, 0.99),
        replay_read_events_per_s,
        history_ms_p50: percentile_ms(&mut histories, 0.50),
        history_ms_p99: percentile_ms(&mut histories, 0.99),
        append_rows_per_s,
        drop_oldest_month_s,
        oldest_month_events,
        duplicate_sequence_refused,
    })
}

fn percentile_ms(samples: &mut [Duration], quantile: f64) -> f64 {
    samples.sort_unstable();
    if samples.is_empty() {
        return 0.0;
    }
    let index = ((samples.len() as f64 * quantile).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index].as_secs_f64() * 1e3
}

fn print_report(report: &[Figures], args: &PartitionArgs) {
    println!(
        "events log at scale: {} events of {} devices over {} months; {}",
        args.events,
        args.devices,
        args.months,
        crate::machine()
    );
    println!(
        "| layout | load ev/s | size GB | relay tail page p50 / p99 ms | replay read ev/s | history p50 / p99 ms | append rows/s | drop oldest month s (events) | duplicate sequence refused |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for f in report {
        println!(
            "| {} | {:.0} | {:.1} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} ({}) | {} |",
            f.layout,
            f.load_events_per_s,
            f.size_gb,
            f.relay_tail_page_ms_p50,
            f.relay_tail_page_ms_p99,
            f.replay_read_events_per_s,
            f.history_ms_p50,
            f.history_ms_p99,
            f.append_rows_per_s,
            f.drop_oldest_month_s,
            f.oldest_month_events,
            if f.duplicate_sequence_refused { "yes" } else { "**no**" },
        );
    }
}
