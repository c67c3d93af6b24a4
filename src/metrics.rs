//! The process's metrics: the Prometheus recorder, the description of every metric fleetlog
//! records (the `# HELP` line Prometheus tooling expects), and the endpoint a role run alone
//! serves them on (`FLEETLOG_METRICS_ADDR`).

use std::net::SocketAddr;
use std::time::Duration;

use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use anyhow::Context as _;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use axum::{Json, Router};
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

/// Samples the Postgres pool into `fleetlog_db_pool_connections{state}` until `shutdown`.
pub fn sample_pool(pool: PgPool, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let size = pool.size();
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
            ::metrics::gauge!("fleetlog_db_pool_connections", "state" => "idle").set(idle);
            ::metrics::gauge!("fleetlog_db_pool_connections", "state" => "in_use").set(size - idle);
            ::metrics::gauge!("fleetlog_db_pool_max_connections")
                .set(pool.options().get_max_connections());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(UPKEEP) => {}
            }
        }
    });
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
    let routes = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        );
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the metrics endpoint failed")
}

/// Every metric fleetlog records, with its help text and unit. A metric recorded without a
/// description here is exported without `# HELP`; the test suite scrapes each role and
/// refuses that.
fn describe() {
    describe_counter!(
        "fleetlog_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "fleetlog_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method, route template and status."
    );
    describe_counter!(
        "fleetlog_http_panics_total",
        "HTTP handlers that panicked (answered 500)."
    );
    describe_counter!(
        "fleetlog_provisioning_total",
        "Device provisioning requests answered, by outcome (and transport, for MQTT)."
    );
    describe_counter!(
        "fleetlog_ingest_messages_total",
        "Device messages ingested, by transport (mqtt, http) and outcome."
    );
    describe_counter!(
        "fleetlog_ingest_redelivered_total",
        "MQTT messages the broker delivered again (after a restart or reconnect of ingest)."
    );
    describe_counter!(
        "fleetlog_ingest_rejections_total",
        "MQTT messages refused for good and dead-lettered."
    );
    describe_gauge!(
        "fleetlog_ingest_connected",
        "1 while ingest holds its MQTT session, 0 otherwise."
    );
    describe_gauge!(
        "fleetlog_ingest_broker_keeps_shared_subscriptions",
        "0 if the broker announced a version that forgets shared subscriptions when it restarts (Mosquitto before 2.0.19), 1 otherwise."
    );
    describe_gauge!(
        "fleetlog_ingest_uptime_seconds",
        Unit::Seconds,
        "Seconds since ingest started."
    );
    describe_gauge!(
        "fleetlog_ingest_success_ratio",
        "Share of device messages recorded since ingest started (0 to 1)."
    );
    describe_counter!(
        "fleetlog_projection_events_total",
        "Events a projection went through, by projection and outcome (applied, skipped, gap, retried, dead_lettered)."
    );
    describe_gauge!(
        "fleetlog_projection_lag_seconds",
        Unit::Seconds,
        "Seconds between an event being recorded and a projection worker applying it, for the latest one, by projection."
    );
    describe_gauge!(
        "fleetlog_projection_pending_events",
        "Messages of the stream still pending for a projection worker's consumer, by projection."
    );
    describe_gauge!(
        "fleetlog_dispatch_connected",
        "1 while the dispatcher holds its MQTT connection, 0 otherwise."
    );
    describe_counter!(
        "fleetlog_dispatch_published_total",
        "Messages the dispatcher published to devices and the broker confirmed."
    );
    describe_counter!(
        "fleetlog_dispatch_undeliverable_total",
        "Device messages passed over because they exceed what the broker accepts."
    );
    describe_counter!(
        "fleetlog_commands_expired_total",
        "Device commands recorded as expired, unanswered within their time to live."
    );
    describe_counter!(
        "fleetlog_liveness_marked_offline_total",
        "Devices marked offline for silence longer than their liveness timeout."
    );
    describe_counter!(
        "fleetlog_liveness_refused_total",
        "Devices not marked offline after all, by reason (already_offline, heard_from_since)."
    );
    describe_counter!(
        "fleetlog_broker_sync_changes_total",
        "Device credentials the broker sync went through, by change (created, rotated, unchanged, ...)."
    );
    describe_gauge!(
        "fleetlog_relay_active",
        "1 while this relay holds the lock and publishes, 0 while it stands by."
    );
    describe_counter!(
        "fleetlog_relay_published_events_total",
        "Events the relay published and JetStream acknowledged."
    );
    describe_gauge!(
        "fleetlog_relay_unpublished_events",
        "Events committed to the events table and not yet published by the active relay (counted up to 100000), sampled once per poll interval."
    );
    describe_counter!(
        "fleetlog_role_restarts_total",
        "Restarts of a unit of a role after it failed or panicked, by unit."
    );
    describe_gauge!(
        "fleetlog_db_pool_connections",
        "Postgres connections of this process's pool, by state (idle, in_use)."
    );
    describe_gauge!(
        "fleetlog_db_pool_max_connections",
        "The largest number of Postgres connections this process's pool opens."
    );
}
