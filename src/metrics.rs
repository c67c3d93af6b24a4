//! The process's metrics: the Prometheus recorder, the description of every metric fleetlog
//! records (the `# HELP` line Prometheus tooling expects), and the endpoint a role run alone
//! serves them on (`FLEETLOG_METRICS_ADDR`).

use std::net::SocketAddr;
use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use anyhow::Context as _;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How often the pool gauges are sampled and histogram buckets drained.
const UPKEEP: Duration = Duration::from_secs(5);

/// Records this process's metrics, every one described. `None` if a recorder is installed
/// already (then `/metrics` stays empty).
pub fn install_recorder() -> Option<PrometheusHandle> {
    // Durations as real histograms (buckets), which Prometheus can aggregate across processes.
    let builder = PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Suffix("_duration_seconds".to_string()),
        &[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    );
    match builder.and_then(|builder| builder.install_recorder()) {
        Ok(handle) => {
            describe();
            // Without the exporter's own HTTP listener, nobody else drains histogram buckets.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(UPKEEP).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(error) => {
            tracing::warn!(%error, "metrics recorder not installed; /metrics stays empty");
            None
        }
    }
}

/// Runs `sample` now and then every `period` until `shutdown`, in a task of its own.
fn sample_every<F, Fut>(period: Duration, shutdown: CancellationToken, mut sample: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            sample().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
        }
    });
}

/// Samples the Postgres pool into `fleetlog_db_pool_connections{state}` until `shutdown`.
pub fn sample_pool(pool: PgPool, shutdown: CancellationToken) {
    sample_every(UPKEEP, shutdown, move || {
        let size = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
        ::metrics::gauge!("fleetlog_db_pool_connections", "state" => "idle").set(idle);
        ::metrics::gauge!("fleetlog_db_pool_connections", "state" => "in_use").set(size - idle);
        ::metrics::gauge!("fleetlog_db_pool_max_connections")
            .set(pool.options().get_max_connections());
        std::future::ready(())
    });
}

/// How often the read-model gauges are sampled.
const READ_MODEL_SAMPLE: Duration = Duration::from_secs(15);

/// The statuses of a rollout in the `rollouts` read model: each gets its gauge, 0 when no
/// rollout has it, so a resumed rollout does not leave `paused` at its last count.
const ROLLOUT_STATUSES: &[&str] = &["created", "running", "paused", "completed", "aborted"];

/// Where a device of a rollout stands in the `rollout_devices` read model.
const ROLLOUT_DEVICE_STATUSES: &[&str] = &[
    "queued",
    "sent",
    "succeeded",
    "failed",
    "timed_out",
    "canceled",
];

/// Samples the read models into `fleetlog_rollouts{status}`,
/// `fleetlog_rollout_devices{status}` and `fleetlog_projection_dead_letters{projection}` until
/// `shutdown`: what the role that keeps them (`fleetlog project`) reports for rollout and
/// dead-letter alerts.
pub fn sample_read_models(pool: PgPool, shutdown: CancellationToken) {
    sample_every(READ_MODEL_SAMPLE, shutdown, move || {
        let pool = pool.clone();
        async move {
            if let Err(error) = sample_read_models_once(&pool).await {
                tracing::debug!(%error, "cannot sample the read models for metrics");
            }
        }
    });
}

async fn sample_read_models_once(pool: &PgPool) -> Result<(), sqlx::Error> {
    let rollouts: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM rollouts GROUP BY status")
            .fetch_all(pool)
            .await?;
    set_counts("fleetlog_rollouts", "status", ROLLOUT_STATUSES, &rollouts);
    // The progress of the rollouts under way: their devices by where each stands.
    let devices: Vec<(String, i64)> = sqlx::query_as(
        "SELECT d.status, count(*) FROM rollout_devices d
           JOIN rollouts r ON r.rollout_id = d.rollout_id
          WHERE r.status IN ('running', 'paused')
          GROUP BY d.status",
    )
    .fetch_all(pool)
    .await?;
    set_counts(
        "fleetlog_rollout_devices",
        "status",
        ROLLOUT_DEVICE_STATUSES,
        &devices,
    );
    let dead_letters: Vec<(String, i64)> = sqlx::query_as(
        "SELECT projection, count(*) FROM projection_dead_letters GROUP BY projection",
    )
    .fetch_all(pool)
    .await?;
    set_counts(
        "fleetlog_projection_dead_letters",
        "projection",
        fleetlog_projections::PROJECTIONS,
        &dead_letters,
    );
    Ok(())
}

/// Sets the gauge `name` for each of `known` (0 if `counts` lacks it) and each of `counts`.
fn set_counts(name: &'static str, label: &'static str, known: &[&str], counts: &[(String, i64)]) {
    for value in known {
        if !counts.iter().any(|(counted, _)| counted == value) {
            ::metrics::gauge!(name, label => value.to_string()).set(0.0);
        }
    }
    for (value, count) in counts {
        ::metrics::gauge!(name, label => value.clone()).set(*count as f64);
    }
}

/// Serves `GET /metrics` and `GET /health` on `address` until `shutdown`: how a role that has
/// no API of its own is watched.
pub async fn serve(
    address: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} (FLEETLOG_METRICS_ADDR)"))?;
    tracing::info!(%address, "serving /metrics and /health");
    // The same answers as the API's operations endpoints.
    let routes = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { fleetlog_api::metrics_page(Some(&handle)) }
            }),
        )
        .route("/health", get(fleetlog_api::health));
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the metrics endpoint failed")
}

/// What a metric is, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// A metric fleetlog records: its name, kind and help text.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// The name, as exported.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
}

/// Every metric fleetlog records. A metric recorded without an entry here is exported without
/// `# HELP`; the test suite scrapes each role and refuses that, and checks that the alert
/// rules (`deploy/prometheus/alerts.yml`) name only metrics listed here.
pub const CATALOGUE: &[Metric] = &[
    Metric {
        name: "fleetlog_http_requests_total",
        kind: Kind::Counter,
        help: "HTTP requests answered, by method, route template and status.",
    },
    Metric {
        name: "fleetlog_http_request_duration_seconds",
        kind: Kind::Histogram,
        help: "Time to answer an HTTP request, by method, route template and status.",
    },
    Metric {
        name: "fleetlog_http_panics_total",
        kind: Kind::Counter,
        help: "HTTP handlers that panicked (answered 500).",
    },
    Metric {
        name: "fleetlog_provisioning_total",
        kind: Kind::Counter,
        help: "Device provisioning requests answered, by outcome (and transport, for MQTT).",
    },
    Metric {
        name: "fleetlog_ingest_messages_total",
        kind: Kind::Counter,
        help: "Device messages ingested, by transport (mqtt, http) and outcome.",
    },
    Metric {
        name: "fleetlog_ingest_redelivered_total",
        kind: Kind::Counter,
        help: "MQTT messages the broker delivered again (after a restart or reconnect of ingest).",
    },
    Metric {
        name: "fleetlog_ingest_rejections_total",
        kind: Kind::Counter,
        help: "MQTT messages refused for good and dead-lettered.",
    },
    Metric {
        name: "fleetlog_ingest_connected",
        kind: Kind::Gauge,
        help: "1 while ingest holds its MQTT session, 0 otherwise.",
    },
    Metric {
        name: "fleetlog_ingest_broker_keeps_shared_subscriptions",
        kind: Kind::Gauge,
        help: "0 if the broker announced a version that forgets shared subscriptions when it restarts (Mosquitto before 2.0.19), 1 otherwise.",
    },
    Metric {
        name: "fleetlog_ingest_uptime_seconds",
        kind: Kind::Gauge,
        help: "Seconds since ingest started.",
    },
    Metric {
        name: "fleetlog_ingest_success_ratio",
        kind: Kind::Gauge,
        help: "Share of device messages recorded since ingest started (0 to 1).",
    },
    Metric {
        name: "fleetlog_projection_events_total",
        kind: Kind::Counter,
        help: "Events a projection went through, by projection and outcome (applied, skipped, gap, retried, dead_lettered).",
    },
    Metric {
        name: "fleetlog_projection_lag_seconds",
        kind: Kind::Gauge,
        help: "Seconds between an event being recorded and a projection worker applying it, for the latest one, by projection.",
    },
    Metric {
        name: "fleetlog_projection_pending_events",
        kind: Kind::Gauge,
        help: "Messages of the stream still pending for a projection worker's consumer, by projection.",
    },
    Metric {
        name: "fleetlog_dispatch_connected",
        kind: Kind::Gauge,
        help: "1 while the dispatcher holds its MQTT connection, 0 otherwise.",
    },
    Metric {
        name: "fleetlog_dispatch_published_total",
        kind: Kind::Counter,
        help: "Messages the dispatcher published to devices and the broker confirmed.",
    },
    Metric {
        name: "fleetlog_dispatch_undeliverable_total",
        kind: Kind::Counter,
        help: "Device messages passed over because they exceed what the broker accepts.",
    },
    Metric {
        name: "fleetlog_commands_expired_total",
        kind: Kind::Counter,
        help: "Device commands recorded as expired, unanswered within their time to live.",
    },
    Metric {
        name: "fleetlog_liveness_marked_offline_total",
        kind: Kind::Counter,
        help: "Devices marked offline for silence longer than their liveness timeout.",
    },
    Metric {
        name: "fleetlog_broker_auth_total",
        kind: Kind::Counter,
        help: "Answers to a clustered broker's HTTP authentication (question=authenticate) and authorization (question=authorize), by result (allow, deny, ignore).",
    },
    Metric {
        name: "fleetlog_telemetry_readings_expired_total",
        kind: Kind::Counter,
        help: "Readings deleted from the telemetry read model for being older than its retention (FLEETLOG_TELEMETRY_RETENTION_DAYS); the events keep them.",
    },
    Metric {
        name: "fleetlog_liveness_refused_total",
        kind: Kind::Counter,
        help: "Devices not marked offline after all, by reason (already_offline, heard_from_since).",
    },
    Metric {
        name: "fleetlog_broker_sync_changes_total",
        kind: Kind::Counter,
        help: "Device credentials the broker sync went through, by change (created, rotated, unchanged, ...).",
    },
    Metric {
        name: "fleetlog_relay_active",
        kind: Kind::Gauge,
        help: "1 while this relay holds the lock and publishes, 0 while it stands by.",
    },
    Metric {
        name: "fleetlog_relay_published_events_total",
        kind: Kind::Counter,
        help: "Events the relay published and JetStream acknowledged.",
    },
    Metric {
        name: "fleetlog_relay_unpublished_events",
        kind: Kind::Gauge,
        help: "Events committed to the events table and not yet published, counted up to 100000 once per poll interval by the active relay; 0 on a standby.",
    },
    Metric {
        name: "fleetlog_rollouts",
        kind: Kind::Gauge,
        help: "Rollouts in the read model, by status (created, running, paused, completed, aborted), sampled every 15 s by the projection role.",
    },
    Metric {
        name: "fleetlog_rollout_devices",
        kind: Kind::Gauge,
        help: "Devices of the running and paused rollouts, by where each stands (queued, sent, succeeded, failed, timed_out, canceled), sampled every 15 s by the projection role.",
    },
    Metric {
        name: "fleetlog_projection_dead_letters",
        kind: Kind::Gauge,
        help: "Events recorded in projection_dead_letters (passed over for good), by projection, sampled every 15 s by the projection role.",
    },
    Metric {
        name: "fleetlog_role_restarts_total",
        kind: Kind::Counter,
        help: "Restarts of a unit of a role after it failed or panicked, by unit.",
    },
    Metric {
        name: "fleetlog_db_pool_connections",
        kind: Kind::Gauge,
        help: "Postgres connections of this process's pool, by state (idle, in_use).",
    },
    Metric {
        name: "fleetlog_db_pool_max_connections",
        kind: Kind::Gauge,
        help: "The largest number of Postgres connections this process's pool opens.",
    },
];

/// Describes every metric of [`CATALOGUE`] to the installed recorder (names ending in
/// `_seconds` in seconds).
fn describe() {
    for metric in CATALOGUE {
        let unit = metric.name.ends_with("_seconds").then_some(Unit::Seconds);
        match (metric.kind, unit) {
            (Kind::Counter, _) => describe_counter!(metric.name, metric.help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(metric.name, unit, metric.help),
            (Kind::Gauge, None) => describe_gauge!(metric.name, metric.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(metric.name, unit, metric.help),
            (Kind::Histogram, None) => describe_histogram!(metric.name, metric.help),
        }
    }
}
