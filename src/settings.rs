//! Typed settings, parsed once at start-up: environment variables first (`FLEETLOG_*`), then
//! command-line flags, then local defaults. Every setting is documented in `.env.example`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::HeaderValue;
use clap::{Args, ValueEnum};
use fleetlog_api::HttpSettings;
use fleetlog_broker::BrokerUrl;
use fleetlog_commands::StoreSettings;
use fleetlog_dispatch::DispatchSettings;
use fleetlog_domain::TenantId;
use fleetlog_firmware::{FirmwareStore, ImageSigner};
use fleetlog_ingest::bridge::IngestSettings;
use fleetlog_nats::StreamSettings;
use fleetlog_process::liveness::LivenessSettings;
use fleetlog_relay::RelaySettings;
use secrecy::SecretString;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Settings shared by every role.
#[derive(Debug, Args)]
pub struct Settings {
    /// Postgres connection URL (holds a password: never logged).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_DATABASE_URL",
        default_value = "postgres://fleetlog:fleetlog@127.0.0.1:5432/fleetlog",
        hide_env_values = true,
        hide_default_value = true,
        value_parser = parse_secret
    )]
    pub database_url: SecretString,

    /// Largest number of Postgres connections this process opens.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_DATABASE_MAX_CONNECTIONS",
        default_value_t = 20
    )]
    pub database_max_connections: u32,

    /// Where fleetlog keeps files of its own (firmware images, the generated signing key) when
    /// not configured otherwise.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_DATA_DIR",
        default_value = ".fleetlog/data"
    )]
    pub data_dir: PathBuf,

    /// Object storage for firmware images: `file:///dir` or `s3://bucket/prefix` (credentials,
    /// region and endpoint from the `AWS_*` variables). Default: `{data dir}/firmware`.
    #[arg(long, global = true, env = "FLEETLOG_FIRMWARE_STORE")]
    pub firmware_store: Option<String>,

    /// The API's address as devices reach it, e.g. `https://fleet.example.com`: OTA messages
    /// then carry a full download URL beside the path.
    #[arg(long, global = true, env = "FLEETLOG_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// The largest firmware image accepted, in bytes.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_FIRMWARE_MAX_BYTES",
        default_value_t = 512 * 1024 * 1024
    )]
    pub firmware_max_bytes: u64,

    /// The ed25519 key (PKCS#8 PEM) that signs released images. Default:
    /// `{data dir}/keys/firmware-signing.pem`, generated on first start.
    #[arg(long, global = true, env = "FLEETLOG_FIRMWARE_SIGNING_KEY_FILE")]
    pub firmware_signing_key_file: Option<PathBuf>,

    /// Address the HTTP API listens on.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,

    /// Secret that signs access tokens (at least 32 characters; never logged). The API
    /// refuses to start without it.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_JWT_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub jwt_secret: Option<SecretString>,

    /// Lifetime of an access token in seconds: also the longest a disabled user or a revoked
    /// session keeps access.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_ACCESS_TOKEN_TTL_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub access_token_ttl_secs: u64,

    /// Lifetime of a refresh token in seconds (each refresh starts a new one).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_REFRESH_TOKEN_TTL_SECS",
        default_value_t = 30 * 24 * 3600,
        value_parser = clap::value_parser!(u64).range(60..=31_536_000)
    )]
    pub refresh_token_ttl_secs: u64,

    /// Seconds a request may take before it is answered with 408.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_HTTP_REQUEST_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub http_request_timeout_secs: u64,

    /// Browser origins allowed to call the API (comma-separated, e.g.
    /// `https://console.example.com`); empty: no CORS.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub cors_origins: Vec<String>,

    /// NATS server URL.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// MQTT broker: `mqtt://[user[:password]@]host[:port]`, or `mqtts://` for TLS (holds a
    /// password: printed masked).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883",
        hide_env_values = true
    )]
    pub mqtt_url: BrokerUrl,

    /// The first level of every device topic (`{root}/{device_id}/data`, ...).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_MQTT_TOPIC_ROOT",
        default_value = "devices"
    )]
    pub mqtt_topic_root: String,

    /// MQTT client id of this ingest instance. The broker keeps the session (and the messages
    /// not yet acknowledged) under it: keep it stable across restarts, distinct per instance.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_CLIENT_ID",
        default_value = "fleetlog-ingest"
    )]
    pub ingest_client_id: String,

    /// Shared-subscription group the ingest instances split the device topics in; empty to
    /// subscribe plainly.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_SHARE_GROUP",
        default_value = "fleetlog-ingest"
    )]
    pub ingest_share_group: String,

    /// Register devices nobody registered into this tenant when they first send; empty (the
    /// default) dead-letters their messages instead.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_AUTO_REGISTER_TENANT",
        default_value = ""
    )]
    pub ingest_auto_register_tenant: String,

    /// Shards of the ingest bridge: each commits the devices of its round in one transaction,
    /// so this many transactions run at once. Few shards make large, cheap transactions.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_SHARDS",
        default_value_t = 2
    )]
    pub ingest_shards: usize,

    /// The most messages of one shard handled per round (one transaction).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_MAX_BATCH",
        default_value_t = 500
    )]
    pub ingest_max_batch: usize,

    /// QoS 1 messages the broker may have in flight to the bridge.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_INFLIGHT",
        default_value_t = 1000
    )]
    pub ingest_inflight: u16,

    /// Seconds between the bridge's summary log lines.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_REPORT_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub ingest_report_secs: u64,

    /// How long events stay in the JetStream stream, in seconds (0: for ever).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_STREAM_MAX_AGE_SECS",
        default_value_t = 7 * 24 * 3600,
        value_parser = clap::value_parser!(u64).range(0..=315_360_000)
    )]
    pub stream_max_age_secs: u64,

    /// How long the stream drops a republished event (same Nats-Msg-Id), in seconds.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_STREAM_DUPLICATE_WINDOW_SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub stream_duplicate_window_secs: u64,

    /// Events the relay reads and publishes per round.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_RELAY_BATCH_SIZE",
        default_value_t = 1000
    )]
    pub relay_batch_size: i64,

    /// How often the relay looks for events when no notification arrives, in milliseconds.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_RELAY_POLL_INTERVAL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(10..=60_000)
    )]
    pub relay_poll_interval_ms: u64,

    /// How long an ingest round that is not full waits for more messages, in milliseconds:
    /// fewer, larger transactions under load.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_INGEST_LINGER_MS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=1_000)
    )]
    pub ingest_linger_ms: u64,

    /// How long the relay lets events gather after a commit notification before it reads
    /// them, in milliseconds: fewer, larger rounds under load.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_RELAY_LINGER_MS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=1_000)
    )]
    pub relay_linger_ms: u64,

    /// Seconds without telemetry or heartbeat after which a device is marked offline.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_LIVENESS_TIMEOUT_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=2_592_000)
    )]
    pub liveness_timeout_secs: u64,

    /// How often the liveness check looks for silent devices, in seconds.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_LIVENESS_INTERVAL_SECS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub liveness_interval_secs: u64,

    /// Aggregates of each type kept in memory by the write side.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_AGGREGATE_CACHE_CAPACITY",
        default_value_t = 10_000
    )]
    pub aggregate_cache_capacity: u64,

    /// A snapshot of an aggregate is stored every this many events (0: never).
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_SNAPSHOT_EVERY",
        default_value_t = 100
    )]
    pub snapshot_every: u64,

    /// Attempts at a command whose aggregate other writers keep changing.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_COMMAND_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub command_max_attempts: u32,

    /// Seconds in-flight work may take to finish after SIGINT/SIGTERM.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_SHUTDOWN_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub shutdown_timeout_secs: u64,

    /// Log filter, e.g. `info` or `fleetlog=debug,sqlx=warn`.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_LOG",
        default_value = "info,sqlx=warn,async_nats=warn"
    )]
    pub log: String,

    /// Log format.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

impl Settings {
    /// The write side's tuning.
    pub fn store(&self) -> StoreSettings {
        StoreSettings {
            cache_capacity: self.aggregate_cache_capacity,
            snapshot_every: self.snapshot_every,
            max_attempts: self.command_max_attempts.max(1),
        }
    }
}

impl Settings {
    /// The MQTT bridge's settings.
    pub fn ingest(&self) -> anyhow::Result<IngestSettings> {
        let mut settings = IngestSettings::new(self.mqtt_url.clone());
        settings.client_id = self.ingest_client_id.clone();
        settings.topic_root = self.mqtt_topic_root.trim_matches('/').to_string();
        settings.share_group =
            (!self.ingest_share_group.is_empty()).then(|| self.ingest_share_group.clone());
        settings.auto_register_tenant = if self.ingest_auto_register_tenant.is_empty() {
            None
        } else {
            Some(
                TenantId::parse(self.ingest_auto_register_tenant.as_str())
                    .map_err(|e| anyhow::anyhow!("FLEETLOG_INGEST_AUTO_REGISTER_TENANT: {e}"))?,
            )
        };
        settings.shards = self.ingest_shards.max(1);
        settings.max_batch = self.ingest_max_batch.max(1);
        settings.linger = Duration::from_millis(self.ingest_linger_ms);
        settings.inflight = self.ingest_inflight.max(1);
        settings.report_every = Duration::from_secs(self.ingest_report_secs.max(1));
        Ok(settings)
    }

    /// The dispatcher's settings.
    pub fn dispatch(&self) -> DispatchSettings {
        let mut settings = DispatchSettings::new(self.mqtt_url.clone());
        settings.topic_root = self.mqtt_topic_root.trim_matches('/').to_string();
        settings.public_url = self.public_url.clone().filter(|url| !url.trim().is_empty());
        settings
    }

    /// The relay's tuning.
    pub fn relay(&self) -> RelaySettings {
        RelaySettings {
            batch_size: self.relay_batch_size.max(1),
            poll_interval: Duration::from_millis(self.relay_poll_interval_ms.max(10)),
            linger: Duration::from_millis(self.relay_linger_ms),
            stream: StreamSettings {
                max_age: Duration::from_secs(self.stream_max_age_secs),
                duplicate_window: Duration::from_secs(self.stream_duplicate_window_secs.max(1)),
            },
            ..RelaySettings::default()
        }
    }
}

impl Settings {
    /// The HTTP layer's limits and CORS origins.
    /// Firmware storage and the release signing key.
    pub fn firmware(&self) -> anyhow::Result<Arc<FirmwareStore>> {
        let signer = match &self.firmware_signing_key_file {
            Some(path) => ImageSigner::from_file(path, false),
            None => ImageSigner::from_file(&self.data_dir.join("keys/firmware-signing.pem"), true),
        }
        .context("FLEETLOG_FIRMWARE_SIGNING_KEY_FILE")?;
        let store = match &self.firmware_store {
            Some(url) => FirmwareStore::at_url(
                url,
                fleetlog_firmware::options_from_env(),
                self.firmware_max_bytes,
                signer,
            ),
            None => FirmwareStore::local(
                &self.data_dir.join("firmware"),
                self.firmware_max_bytes,
                signer,
            ),
        }
        .context("FLEETLOG_FIRMWARE_STORE")?;
        Ok(Arc::new(store))
    }

    pub fn http(&self) -> anyhow::Result<HttpSettings> {
        let cors_origins = self
            .cors_origins
            .iter()
            .map(|origin| origin.trim())
            .filter(|origin| !origin.is_empty())
            .map(|origin| {
                HeaderValue::from_str(origin).map_err(|_| {
                    anyhow::anyhow!("FLEETLOG_CORS_ORIGINS: {origin:?} is not a valid origin")
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(HttpSettings {
            request_timeout: Duration::from_secs(self.http_request_timeout_secs.max(1)),
            cors_origins,
        })
    }

    /// The liveness check's tuning.
    pub fn liveness(&self) -> LivenessSettings {
        LivenessSettings {
            timeout: Duration::from_secs(self.liveness_timeout_secs.max(1)),
            interval: Duration::from_secs(self.liveness_interval_secs.max(1)),
        }
    }
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}
