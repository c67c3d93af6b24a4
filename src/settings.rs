//! Typed settings, parsed once at start-up: environment variables (`FLEETLOG_*`), or flags of
//! the same name in kebab-case, then local defaults. Every setting is documented in
//! `.env.example`.
//!
//! They come in groups, one per concern ([`StoreArgs`], [`IngestArgs`], ...), and each
//! subcommand takes only the groups of the roles it runs (see [`ApiRole`] and its siblings):
//! `fleetlog relay --help` lists what the relay reads. Only [`CommonArgs`] (database, logs,
//! shutdown) is global. Numbers are range-checked where they are parsed, so a value outside
//! its range is a one-line error at start, never a silent clamp.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::http::HeaderValue;
use clap::builder::RangedU64ValueParser;
use clap::{Args, ValueEnum};
use fleetlog_api::auth::Auth;
use fleetlog_api::HttpSettings;
use fleetlog_broker::access::{DISPATCH_USERNAME, INGEST_USERNAME, SYNC_USERNAME};
use fleetlog_broker::BrokerUrl;
use fleetlog_commands::credentials::DeviceCredentialKey;
use fleetlog_commands::StoreSettings;
use fleetlog_dispatch::DispatchSettings;
use fleetlog_firmware::{FirmwareStore, ImageSigner};
use fleetlog_ingest::bridge::IngestSettings;
use fleetlog_nats::accounts::{self, NatsUsers};
use fleetlog_nats::StreamSettings;
use fleetlog_process::broker_sync::BrokerSyncSettings;
use fleetlog_process::liveness::LivenessSettings;
use fleetlog_projections::retention::RetentionSettings;
use fleetlog_relay::RelaySettings;
use secrecy::{ExposeSecret, SecretString};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Settings every subcommand reads.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
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
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub database_max_connections: u32,

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

    /// Where this process serves `GET /metrics` (Prometheus) and `GET /health`, e.g.
    /// `0.0.0.0:9464`: how a role without an API of its own is watched. Unset: nowhere (the
    /// API roles serve both on their HTTP address anyway).
    #[arg(long, global = true, env = "FLEETLOG_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

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

impl CommonArgs {
    /// How long roles may take to stop.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

/// The write side: aggregate cache, snapshots, conflict retries.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Write side")]
pub struct StoreArgs {
    /// Aggregates of each type kept in memory by the write side.
    #[arg(
        long,
        env = "FLEETLOG_AGGREGATE_CACHE_CAPACITY",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(0..=100_000_000)
    )]
    pub aggregate_cache_capacity: u64,

    /// A snapshot of an aggregate is stored every this many events (0: never).
    #[arg(
        long,
        env = "FLEETLOG_SNAPSHOT_EVERY",
        default_value_t = 100,
        value_parser = clap::value_parser!(u64).range(0..=1_000_000)
    )]
    pub snapshot_every: u64,

    /// Attempts at a command whose aggregate other writers keep changing.
    #[arg(
        long,
        env = "FLEETLOG_COMMAND_MAX_ATTEMPTS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=100)
    )]
    pub command_max_attempts: u32,
}

impl StoreArgs {
    /// The write side's tuning.
    pub fn store(&self) -> StoreSettings {
        StoreSettings {
            cache_capacity: self.aggregate_cache_capacity,
            snapshot_every: self.snapshot_every,
            max_attempts: self.command_max_attempts,
        }
    }
}

/// The NATS server.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(
        long,
        env = "FLEETLOG_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// Password of the relay's NATS user (`fleetlog.relay`, the only one that may publish
    /// events). Each role connects as its own user (see `deploy/nats/accounts.conf`); a role
    /// without a password uses the URL's credentials, if any.
    #[arg(long, env = "FLEETLOG_RELAY_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub relay_nats_password: Option<SecretString>,

    /// Password of the projections' and rollout manager's NATS user (`fleetlog.project`).
    #[arg(long, env = "FLEETLOG_PROJECT_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub project_nats_password: Option<SecretString>,

    /// Password of the ingest's NATS user (`fleetlog.ingest`).
    #[arg(long, env = "FLEETLOG_INGEST_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub ingest_nats_password: Option<SecretString>,

    /// Password of the dispatcher's NATS user (`fleetlog.dispatch`).
    #[arg(long, env = "FLEETLOG_DISPATCH_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub dispatch_nats_password: Option<SecretString>,

    /// Password of the broker sync's NATS user (`fleetlog.sync`).
    #[arg(long, env = "FLEETLOG_BROKER_SYNC_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub broker_sync_nats_password: Option<SecretString>,

    /// Password of the API's NATS user (`fleetlog.api`; `fleetlog events tail` uses it too).
    #[arg(long, env = "FLEETLOG_API_NATS_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub api_nats_password: Option<SecretString>,
}

impl NatsArgs {
    /// The users the roles connect as.
    pub fn users(&self) -> NatsUsers {
        NatsUsers::default()
            .with(accounts::RELAY, self.relay_nats_password.as_ref())
            .with(accounts::PROJECT, self.project_nats_password.as_ref())
            .with(accounts::INGEST, self.ingest_nats_password.as_ref())
            .with(accounts::DISPATCH, self.dispatch_nats_password.as_ref())
            .with(accounts::SYNC, self.broker_sync_nats_password.as_ref())
            .with(accounts::API, self.api_nats_password.as_ref())
    }
}

/// The MQTT broker the devices talk to.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "MQTT")]
pub struct MqttArgs {
    /// MQTT broker: `mqtt://[user[:password]@]host[:port]`, or `mqtts://` for TLS (holds a
    /// password: printed masked).
    #[arg(
        long,
        env = "FLEETLOG_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883",
        hide_env_values = true
    )]
    pub mqtt_url: BrokerUrl,

    /// The first level of every device topic (`{root}/{device_id}/data`, ...).
    #[arg(long, env = "FLEETLOG_MQTT_TOPIC_ROOT", default_value = "devices", value_parser = parse_topic_root)]
    pub mqtt_topic_root: String,

    /// The certificate authority (a PEM file) that signed the broker's certificate, for an
    /// `mqtts://` URL when it is not one of the system's roots.
    #[arg(long, env = "FLEETLOG_MQTT_CA_FILE")]
    pub mqtt_ca_file: Option<PathBuf>,

    /// Password of the ingest account (`fleetlog.ingest`) at the broker. The ingest connects
    /// with it; the broker sync, given it, creates that account.
    #[arg(long, env = "FLEETLOG_INGEST_MQTT_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub ingest_mqtt_password: Option<SecretString>,

    /// Password of the dispatch account (`fleetlog.dispatch`) at the broker. The dispatcher
    /// connects with it; the broker sync, given it, creates that account.
    #[arg(long, env = "FLEETLOG_DISPATCH_MQTT_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub dispatch_mqtt_password: Option<SecretString>,

    /// Password of the broker sync's account (`fleetlog.sync`), the admin of the broker's
    /// dynamic-security plugin.
    #[arg(long, env = "FLEETLOG_BROKER_SYNC_MQTT_PASSWORD", hide_env_values = true, value_parser = parse_secret)]
    pub broker_sync_mqtt_password: Option<SecretString>,
}

impl MqttArgs {
    fn topic_root(&self) -> String {
        self.mqtt_topic_root.trim_matches('/').to_string()
    }

    /// The broker as `username`: with `password` when given, else with the URL's own
    /// credentials (if any); with the CA file read.
    fn broker_as(
        &self,
        username: &str,
        password: Option<&SecretString>,
    ) -> anyhow::Result<BrokerUrl> {
        let mut broker = match password {
            Some(password) => self.mqtt_url.as_user(username, password.expose_secret()),
            None => self.mqtt_url.clone(),
        };
        if let Some(path) = &self.mqtt_ca_file {
            let pem = std::fs::read(path).with_context(|| {
                format!("FLEETLOG_MQTT_CA_FILE: cannot read {}", path.display())
            })?;
            broker.ca_pem = Some(pem);
        }
        Ok(broker)
    }

    /// The broker as the ingest account.
    pub fn ingest_broker(&self) -> anyhow::Result<BrokerUrl> {
        self.broker_as(INGEST_USERNAME, self.ingest_mqtt_password.as_ref())
    }

    /// The broker as the dispatch account.
    pub fn dispatch_broker(&self) -> anyhow::Result<BrokerUrl> {
        self.broker_as(DISPATCH_USERNAME, self.dispatch_mqtt_password.as_ref())
    }

    /// The broker as the sync's admin account.
    pub fn sync_broker(&self) -> anyhow::Result<BrokerUrl> {
        self.broker_as(SYNC_USERNAME, self.broker_sync_mqtt_password.as_ref())
    }

    /// The broker sync's settings.
    pub fn broker_sync(&self) -> anyhow::Result<BrokerSyncSettings> {
        if self.broker_sync_mqtt_password.is_none() && self.mqtt_url.credentials.is_none() {
            bail!(
                "FLEETLOG_BROKER_SYNC_MQTT_PASSWORD is not set: the broker sync connects as the \
                 broker's dynamic-security admin ({SYNC_USERNAME})"
            );
        }
        let mut settings = BrokerSyncSettings::new(self.sync_broker()?);
        settings.topic_root = self.topic_root();
        settings.ingest_password = self.ingest_mqtt_password.clone();
        settings.dispatch_password = self.dispatch_mqtt_password.clone();
        Ok(settings)
    }

    /// The broker as the API's readiness probe reaches it (no account of its own).
    pub fn probe_broker(&self) -> anyhow::Result<BrokerUrl> {
        self.broker_as("", None)
    }
}

/// A service's MQTT client id: never one a device could connect with.
fn parse_service_client_id(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 128 || value.contains('\0') {
        return Err("must be 1 to 128 bytes without NUL".into());
    }
    if fleetlog_domain::DeviceId::parse(value).is_ok() {
        return Err(format!(
            "{value:?} is a valid device id, so a device could take over this session: \
             put a '.' in it (e.g. fleetlog.ingest)"
        ));
    }
    Ok(value.to_string())
}

/// A topic root: MQTT topic levels without wildcards, `$` or NUL.
fn parse_topic_root(value: &str) -> Result<String, String> {
    let root = value.trim_matches('/');
    if root.is_empty() {
        return Err("must name at least one topic level".into());
    }
    // The provisioning topics live under `fleetlog/provisioning`: no device topic may.
    if root == "fleetlog" || root.starts_with("fleetlog/") {
        return Err("must not be fleetlog or under it: fleetlog/provisioning is taken".into());
    }
    if root.starts_with('$') || root.contains(['+', '#', '\0']) || root.contains("//") {
        return Err("must be plain topic levels: no +, #, NUL, empty level or leading $".into());
    }
    if root.len() > 256 {
        return Err("must be at most 256 bytes".into());
    }
    Ok(value.to_string())
}

/// The HTTP listener.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpArgs {
    /// Address the HTTP API listens on.
    #[arg(long, env = "FLEETLOG_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Seconds a request may take before it is answered with 408.
    #[arg(
        long,
        env = "FLEETLOG_HTTP_REQUEST_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub http_request_timeout_secs: u64,

    /// Browser origins allowed to call the API (comma-separated, e.g.
    /// `https://console.example.com`); empty: no CORS.
    #[arg(
        long,
        env = "FLEETLOG_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub cors_origins: Vec<String>,
}

impl HttpArgs {
    /// The HTTP layer's limits and CORS origins.
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
            request_timeout: Duration::from_secs(self.http_request_timeout_secs),
            cors_origins,
        })
    }
}

/// API tokens.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Tokens")]
pub struct AuthArgs {
    /// Secret that signs access tokens (at least 32 characters; never logged). The API
    /// refuses to start without it.
    #[arg(
        long,
        env = "FLEETLOG_JWT_SECRET",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub jwt_secret: Option<SecretString>,

    /// Lifetime of an access token in seconds: also the longest a disabled user or a revoked
    /// session keeps access.
    #[arg(
        long,
        env = "FLEETLOG_ACCESS_TOKEN_TTL_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub access_token_ttl_secs: u64,

    /// Lifetime of a refresh token in seconds (each refresh starts a new one).
    #[arg(
        long,
        env = "FLEETLOG_REFRESH_TOKEN_TTL_SECS",
        default_value_t = 30 * 24 * 3600,
        value_parser = clap::value_parser!(u64).range(60..=31_536_000)
    )]
    pub refresh_token_ttl_secs: u64,

    /// The device credential key.
    #[command(flatten)]
    pub device_key: DeviceKeyArgs,
}

/// The key device secrets derive from.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Device credentials")]
pub struct DeviceKeyArgs {
    /// Key that device secrets derive from (at least 32 characters; never logged). The API
    /// issues secrets with it and the broker sync sets them at the broker; both refuse to
    /// start without it. Changing it invalidates every device's broker password at the next
    /// sync: keep it as safe as the database.
    #[arg(
        long,
        env = "FLEETLOG_DEVICE_CREDENTIAL_KEY",
        hide_env_values = true,
        value_parser = parse_secret
    )]
    pub device_credential_key: Option<SecretString>,
}

impl DeviceKeyArgs {
    /// The key if one is set (checked like [`Self::key`]).
    pub fn optional_key(&self) -> anyhow::Result<Option<DeviceCredentialKey>> {
        match self.device_credential_key {
            Some(_) => self.key().map(Some),
            None => Ok(None),
        }
    }

    /// The key, or why there is none.
    pub fn key(&self) -> anyhow::Result<DeviceCredentialKey> {
        let Some(key) = &self.device_credential_key else {
            bail!(
                "FLEETLOG_DEVICE_CREDENTIAL_KEY is not set: device secrets derive from it \
                 (generate one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)"
            );
        };
        DeviceCredentialKey::new(key.clone())
            .map_err(|error| anyhow::anyhow!("FLEETLOG_DEVICE_CREDENTIAL_KEY: {error}"))
    }
}

impl AuthArgs {
    /// Token keys for the API.
    pub fn auth(&self) -> anyhow::Result<Arc<Auth>> {
        let Some(secret) = &self.jwt_secret else {
            bail!("FLEETLOG_JWT_SECRET is not set: the API needs it to sign access tokens");
        };
        if secret.expose_secret().len() < 32 {
            bail!("FLEETLOG_JWT_SECRET must be at least 32 characters");
        }
        Ok(Auth::new(
            secret,
            self.device_key.key()?,
            Duration::from_secs(self.access_token_ttl_secs),
            Duration::from_secs(self.refresh_token_ttl_secs),
        ))
    }
}

/// Firmware images and their signing key.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Firmware")]
pub struct FirmwareArgs {
    /// Where fleetlog keeps files of its own (firmware images, the generated signing key) when
    /// not configured otherwise.
    #[arg(long, env = "FLEETLOG_DATA_DIR", default_value = ".fleetlog/data")]
    pub data_dir: PathBuf,

    /// Object storage for firmware images: `file:///dir` or `s3://bucket/prefix` (credentials,
    /// region and endpoint from the `AWS_*` variables). Default: `{data dir}/firmware`.
    #[arg(long, env = "FLEETLOG_FIRMWARE_STORE")]
    pub firmware_store: Option<String>,

    /// The largest firmware image accepted, in bytes.
    #[arg(
        long,
        env = "FLEETLOG_FIRMWARE_MAX_BYTES",
        default_value_t = 512 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1..=1 << 40)
    )]
    pub firmware_max_bytes: u64,

    /// The ed25519 key (PKCS#8 PEM) that signs released images. Default:
    /// `{data dir}/keys/firmware-signing.pem`, generated on first start.
    #[arg(long, env = "FLEETLOG_FIRMWARE_SIGNING_KEY_FILE")]
    pub firmware_signing_key_file: Option<PathBuf>,
}

impl FirmwareArgs {
    /// Firmware storage and the release signing key.
    pub fn firmware(&self) -> anyhow::Result<Arc<FirmwareStore>> {
        let signer = match &self.firmware_signing_key_file {
            Some(path) => ImageSigner::from_file(path, false),
            None => ImageSigner::from_file(&self.data_dir.join("keys/firmware-signing.pem"), true),
        }
        .context("FLEETLOG_FIRMWARE_SIGNING_KEY_FILE")?;
        let store = match self.firmware_store.as_deref().filter(|url| !url.is_empty()) {
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
}

/// The MQTT ingest bridge.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Ingest")]
pub struct IngestArgs {
    /// MQTT client id of this ingest instance. The broker keeps the session (and the messages
    /// not yet acknowledged) under it: keep it stable across restarts; distinct per instance
    /// with a shared subscription, the same for all with a plain one (they take turns on the
    /// one session). It must not be a valid device id (hold a `.`), or a device of that id
    /// could take the session over.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_CLIENT_ID",
        default_value = "fleetlog.ingest",
        value_parser = parse_service_client_id
    )]
    pub ingest_client_id: String,

    /// Shared-subscription group the ingest instances split the device topics in; empty to
    /// subscribe plainly: instances of one client id then take turns, one connected and the
    /// others standing by.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_SHARE_GROUP",
        default_value = "fleetlog-ingest"
    )]
    pub ingest_share_group: String,

    /// Shards of the ingest bridge: each commits the devices of its round in one transaction,
    /// so this many transactions run at once. Few shards make large, cheap transactions.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_SHARDS",
        default_value_t = 2,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=256)
    )]
    pub ingest_shards: usize,

    /// The most messages of one shard handled per round (one transaction).
    #[arg(
        long,
        env = "FLEETLOG_INGEST_MAX_BATCH",
        default_value_t = 500,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000)
    )]
    pub ingest_max_batch: usize,

    /// QoS 1 messages the broker may have in flight to the bridge.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_INFLIGHT",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub ingest_inflight: u16,

    /// Seconds between the bridge's summary log lines.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_REPORT_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub ingest_report_secs: u64,

    /// How long an ingest round that is not full waits for more messages, in milliseconds:
    /// fewer, larger transactions under load.
    #[arg(
        long,
        env = "FLEETLOG_INGEST_LINGER_MS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=1_000)
    )]
    pub ingest_linger_ms: u64,
}

impl IngestArgs {
    /// The MQTT bridge's settings, on the broker `mqtt` names.
    pub fn ingest(&self, mqtt: &MqttArgs) -> anyhow::Result<IngestSettings> {
        let mut settings = IngestSettings::new(mqtt.ingest_broker()?);
        settings.client_id = self.ingest_client_id.clone();
        settings.topic_root = mqtt.topic_root();
        settings.share_group =
            (!self.ingest_share_group.is_empty()).then(|| self.ingest_share_group.clone());
        settings.shards = self.ingest_shards;
        settings.max_batch = self.ingest_max_batch;
        settings.linger = Duration::from_millis(self.ingest_linger_ms);
        settings.inflight = self.ingest_inflight;
        settings.report_every = Duration::from_secs(self.ingest_report_secs);
        Ok(settings)
    }
}

/// The dispatcher.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Dispatch")]
pub struct DispatchArgs {
    /// The API's address as devices reach it, e.g. `https://fleet.example.com`: OTA messages
    /// then carry a full download URL beside the path.
    #[arg(long, env = "FLEETLOG_PUBLIC_URL")]
    pub public_url: Option<String>,
}

impl DispatchArgs {
    /// The dispatcher's settings, on the broker `mqtt` names.
    pub fn dispatch(&self, mqtt: &MqttArgs) -> anyhow::Result<DispatchSettings> {
        let mut settings = DispatchSettings::new(mqtt.dispatch_broker()?);
        settings.topic_root = mqtt.topic_root();
        settings.public_url = self.public_url.clone().filter(|url| !url.trim().is_empty());
        Ok(settings)
    }
}

/// The relay and the stream it publishes to.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Relay")]
pub struct RelayArgs {
    /// Events the relay reads and publishes per round.
    #[arg(
        long,
        env = "FLEETLOG_RELAY_BATCH_SIZE",
        default_value_t = 1000,
        value_parser = clap::value_parser!(i64).range(1..=100_000)
    )]
    pub relay_batch_size: i64,

    /// How often the relay looks for events when no notification arrives, in milliseconds.
    #[arg(
        long,
        env = "FLEETLOG_RELAY_POLL_INTERVAL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(10..=60_000)
    )]
    pub relay_poll_interval_ms: u64,

    /// How long the relay lets events gather after a commit notification before it reads
    /// them, in milliseconds: fewer, larger rounds under load.
    #[arg(
        long,
        env = "FLEETLOG_RELAY_LINGER_MS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=1_000)
    )]
    pub relay_linger_ms: u64,

    /// How long events stay in the JetStream stream, in seconds (0: for ever).
    #[arg(
        long,
        env = "FLEETLOG_STREAM_MAX_AGE_SECS",
        default_value_t = 7 * 24 * 3600,
        value_parser = clap::value_parser!(u64).range(0..=315_360_000)
    )]
    pub stream_max_age_secs: u64,

    /// How long the stream drops a republished event (same Nats-Msg-Id), in seconds.
    #[arg(
        long,
        env = "FLEETLOG_STREAM_DUPLICATE_WINDOW_SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub stream_duplicate_window_secs: u64,
}

impl RelayArgs {
    /// The relay's tuning.
    pub fn relay(&self) -> RelaySettings {
        RelaySettings {
            batch_size: self.relay_batch_size,
            poll_interval: Duration::from_millis(self.relay_poll_interval_ms),
            linger: Duration::from_millis(self.relay_linger_ms),
            stream: StreamSettings {
                max_age: Duration::from_secs(self.stream_max_age_secs),
                duplicate_window: Duration::from_secs(self.stream_duplicate_window_secs),
            },
            ..RelaySettings::default()
        }
    }
}

/// The liveness check.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Liveness")]
pub struct LivenessArgs {
    /// Seconds without telemetry or heartbeat after which a device is marked offline.
    #[arg(
        long,
        env = "FLEETLOG_LIVENESS_TIMEOUT_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..=2_592_000)
    )]
    pub liveness_timeout_secs: u64,

    /// How often the liveness check looks for silent devices, in seconds.
    #[arg(
        long,
        env = "FLEETLOG_LIVENESS_INTERVAL_SECS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub liveness_interval_secs: u64,
}

impl LivenessArgs {
    /// The liveness check's tuning.
    pub fn liveness(&self) -> LivenessSettings {
        LivenessSettings {
            timeout: Duration::from_secs(self.liveness_timeout_secs),
            interval: Duration::from_secs(self.liveness_interval_secs),
        }
    }
}

/// How long the telemetry read model keeps readings.
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// Days the telemetry read model keeps a reading (by the reading's own time); older ones
    /// leave it, swept every few minutes. 0: every reading is kept. The events table keeps
    /// every reading regardless.
    #[arg(
        long,
        env = "FLEETLOG_TELEMETRY_RETENTION_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(fleetlog_projections::retention::MAX_RETENTION_DAYS))
    )]
    pub telemetry_retention_days: u32,
}

impl RetentionArgs {
    /// The sweep's settings; `None` when every reading is kept.
    pub fn retention(&self) -> Option<RetentionSettings> {
        (self.telemetry_retention_days > 0).then(|| RetentionSettings {
            keep: Duration::from_secs(u64::from(self.telemetry_retention_days) * 86_400),
            every: RETENTION_SWEEP_EVERY,
        })
    }
}

/// How often the telemetry retention sweep runs.
const RETENTION_SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Device identity for a clustered broker that asks over HTTP (EMQX).
#[derive(Debug, Clone, Args)]
pub struct BrokerAuthArgs {
    /// The secret a clustered broker (EMQX's HTTP authentication and authorization) presents
    /// as a bearer token to `/api/v1/broker/authenticate` and `/authorize`; at least 32
    /// characters. Unset: those routes answer 404.
    #[arg(
        long,
        env = "FLEETLOG_BROKER_AUTH_TOKEN",
        hide_env_values = true,
        value_parser = parse_broker_auth_token
    )]
    pub broker_auth_token: Option<SecretString>,
}

impl BrokerAuthArgs {
    /// The broker routes' settings, `None` when they are off.
    pub fn broker_auth(&self, mqtt: &MqttArgs) -> Option<Arc<fleetlog_api::BrokerAuth>> {
        self.broker_auth_token.clone().map(|token| {
            Arc::new(fleetlog_api::BrokerAuth {
                token,
                topic_root: mqtt.topic_root(),
            })
        })
    }
}

fn parse_broker_auth_token(value: &str) -> Result<SecretString, String> {
    if value.chars().count() < 32 {
        return Err("must be at least 32 characters".into());
    }
    Ok(SecretString::from(value))
}

/// What `fleetlog api` reads.
#[derive(Debug, Clone, Args)]
pub struct ApiRole {
    /// The HTTP listener.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Token keys and lifetimes.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Firmware storage and signing.
    #[command(flatten)]
    pub firmware: FirmwareArgs,
    /// The write side.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server (readiness reports on it, and on the broker).
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The MQTT broker.
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// Device identity for a clustered broker.
    #[command(flatten)]
    pub broker_auth: BrokerAuthArgs,
}

/// What `fleetlog ingest` reads.
#[derive(Debug, Clone, Args)]
pub struct IngestRole {
    /// The ingest bridge.
    #[command(flatten)]
    pub ingest: IngestArgs,
    /// The key device secrets derive from: with it, the bridge answers provisioning requests
    /// over MQTT; without, it leaves them to HTTP.
    #[command(flatten)]
    pub device_key: DeviceKeyArgs,
    /// The MQTT broker.
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// The write side.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// What `fleetlog dispatch` reads.
#[derive(Debug, Clone, Args)]
pub struct DispatchRole {
    /// The dispatcher.
    #[command(flatten)]
    pub dispatch: DispatchArgs,
    /// The MQTT broker.
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// The write side.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// What `fleetlog broker-sync` reads.
#[derive(Debug, Clone, Args)]
pub struct BrokerSyncRole {
    /// The key device secrets derive from.
    #[command(flatten)]
    pub device_key: DeviceKeyArgs,
    /// The MQTT broker, and the accounts' passwords.
    #[command(flatten)]
    pub mqtt: MqttArgs,
    /// The event log (and the lock that elects the active sync).
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// What `fleetlog relay` reads.
#[derive(Debug, Clone, Args)]
pub struct RelayRole {
    /// The relay and its stream.
    #[command(flatten)]
    pub relay: RelayArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// What `fleetlog project` reads: the projections and the process managers.
#[derive(Debug, Clone, Args)]
pub struct ProjectRole {
    /// The liveness check.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Telemetry retention.
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// The write side.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// What `fleetlog up` reads: every role's settings.
#[derive(Debug, Clone, Args)]
pub struct UpRole {
    /// The HTTP listener.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Token keys and lifetimes.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Firmware storage and signing.
    #[command(flatten)]
    pub firmware: FirmwareArgs,
    /// Device identity for a clustered broker.
    #[command(flatten)]
    pub broker_auth: BrokerAuthArgs,
    /// The ingest bridge.
    #[command(flatten)]
    pub ingest: IngestArgs,
    /// The dispatcher.
    #[command(flatten)]
    pub dispatch: DispatchArgs,
    /// The relay and its stream.
    #[command(flatten)]
    pub relay: RelayArgs,
    /// The liveness check.
    #[command(flatten)]
    pub liveness: LivenessArgs,
    /// Telemetry retention.
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// The write side.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The NATS server.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The MQTT broker.
    #[command(flatten)]
    pub mqtt: MqttArgs,
}

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}
