//! `fleetlog`: one binary for every role of the platform.
//!
//! `main` parses the settings once, sets up logging and wires the roles; each role lives in its
//! crate and exposes a `run(.., shutdown)` that returns when the shutdown signal fires and its
//! in-flight work is done.

mod events;
mod replay;
mod traces;
mod user;

/// mimalloc instead of the system allocator: the roles allocate many small, short-lived
/// values (messages, events, JSON) from many threads, where glibc's malloc spends much of the
/// CPU time of a busy node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleetlog::settings::{
    ApiRole, BrokerSyncRole, CommonArgs, DispatchRole, IngestRole, LogFormat, NatsArgs,
    ProjectRole, RelayRole, StoreArgs, UpRole,
};
use fleetlog::{ApiParts, Platform};
use fleetlog_commands::{CommandBus, StoreSettings};
use fleetlog_domain::user::Role;
use fleetlog_domain::TenantId;
use fleetlog_process::rollout_manager::RolloutManagerSettings;
use fleetlog_projections::DeviceModels;
use fleetlog_projections::WorkerSettings;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// fleetlog: an event-sourced platform for fleets of IoT devices.
#[derive(Debug, Parser)]
#[command(name = "fleetlog", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process (the single-node default) until SIGINT or SIGTERM.
    Up(UpRole),
    /// Serve the HTTP API.
    Api(ApiRole),
    /// Bridge the device topics of the MQTT broker into Device commands.
    Ingest(IngestRole),
    /// Keep the broker's accounts (Mosquitto's dynamic-security plugin) in step with the
    /// device credentials in the event log (one active sync at a time).
    BrokerSync(BrokerSyncRole),
    /// Send commands, desired properties and firmware updates to the devices over MQTT, and
    /// record unanswered commands as expired.
    Dispatch(DispatchRole),
    /// Publish committed events from Postgres to NATS JetStream (one active relay at a time).
    Relay(RelayRole),
    /// Keep the read models up to date from the event stream (run as many as you like), and
    /// run the process managers (liveness, the rollout manager).
    Project(ProjectRole),
    /// Apply the database migrations; a second run changes nothing.
    Migrate,
    /// Rebuild read models from the events table and swap them in, or verify them.
    Replay {
        /// The projection to rebuild (devices, telemetry).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        projection: Option<String>,
        /// Every projection.
        #[arg(long)]
        all: bool,
        /// Rebuild into shadow tables, compare with the live model, print the rows that differ
        /// and fail if any do; the live model is left as it is.
        #[arg(long)]
        verify: bool,
        /// With --verify: seconds to wait for the live model to catch up before comparing.
        #[arg(long, default_value_t = 30)]
        patience_secs: u64,
    },
    /// Look at the event store and the event stream.
    Events {
        #[command(subcommand)]
        command: EventsAction,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserAction,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl Command {
    /// The role's name, as traces name the service (`fleetlog-{role}`).
    fn role(&self) -> &'static str {
        match self {
            Self::Up(_) => "up",
            Self::Api(_) => "api",
            Self::Ingest(_) => "ingest",
            Self::BrokerSync(_) => "broker-sync",
            Self::Dispatch(_) => "dispatch",
            Self::Relay(_) => "relay",
            Self::Project(_) => "project",
            Self::Migrate => "migrate",
            Self::Replay { .. } => "replay",
            Self::Events { .. } => "events",
            Self::User { .. } => "user",
        }
    }
}

#[derive(Debug, Subcommand)]
enum EventsAction {
    /// One aggregate's events, oldest first.
    List {
        /// The aggregate, as TYPE:ID (e.g. device:sensor-1).
        #[arg(long)]
        aggregate: String,
        /// At most this many events.
        #[arg(long, default_value_t = 1000)]
        limit: i64,
    },
    /// Follow new events on the JetStream stream until Ctrl-C.
    Tail {
        /// Only events of this type (e.g. TelemetryRecorded).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Only events of this aggregate type (e.g. device).
        #[arg(long)]
        aggregate_type: Option<String>,
        /// The server whose stream to follow.
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Counts per aggregate and event type, and how many events await the relay.
    Stats,
}

#[derive(Debug, Subcommand)]
enum UserAction {
    /// Create a user, reading its password from standard input.
    Create {
        /// The tenant the user belongs to.
        #[arg(long)]
        tenant: TenantId,
        /// The login name.
        #[arg(long)]
        username: String,
        /// A role to grant (admin, operator, viewer); repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<Role>,
        /// Read the password from standard input (the only way to pass it, so it stays out of
        /// the shell history and the process list).
        #[arg(long)]
        password_stdin: bool,
    },
}

fn main() -> ExitCode {
    fleetlog_broker::install_crypto_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them.
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        // A bad argument or setting: one line, like every other error.
        Err(error) => {
            let rendered = error.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            eprintln!(
                "fleetlog: {}",
                first.strip_prefix("error: ").unwrap_or(first)
            );
            return ExitCode::from(2);
        }
    };
    let traces = match init_logging(&cli.common, cli.command.role()) {
        Ok(traces) => traces,
        Err(error) => {
            eprintln!("fleetlog: {error:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fleetlog: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // The runtime first: the roles' last spans end as their tasks are dropped.
    drop(runtime);
    if let Some(traces) = traces {
        traces.shutdown();
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, the whole cause chain: "what failed: why: root cause".
            eprintln!("fleetlog: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `FLEETLOG_LOG` filters them, and traces to the OTLP collector when the
/// environment names one (see [`traces`]). One filter serves both: with traces on, fleetlog's
/// own spans are recorded at info whatever `FLEETLOG_LOG` says (and so are its info logs).
/// Per-layer filters would spare those logs, but lost spans at random in this stack.
fn init_logging(settings: &CommonArgs, role: &str) -> anyhow::Result<Option<traces::Traces>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let (traces, exporting) = match traces::from_env(role)? {
        Some((traces, layer)) => (Some(traces), Some(layer)),
        None => (None, None),
    };
    let mut directives = settings.log.clone();
    if exporting.is_some() {
        directives.push_str(",fleetlog=info");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let logs = match settings.log_format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(exporting)
        .init();
    Ok(traces)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = cli.common;
    match cli.command {
        Command::Migrate => {
            let pool = connect(&common).await?;
            fleetlog_commands::migrate(&pool)
                .await
                .context("cannot apply migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::User {
            command:
                UserAction::Create {
                    tenant,
                    username,
                    roles,
                    password_stdin,
                },
            store,
        } => {
            if !password_stdin {
                bail!("pass the password on standard input with --password-stdin");
            }
            let new_user = user::NewUser::from_stdin(tenant, username, roles)?;
            let bus = CommandBus::new(
                connect(&common).await?,
                store.store(),
                DeviceModels::inline(),
            );
            user::create(&bus, new_user).await
        }
        Command::Api(role) => {
            let parts = ApiParts {
                auth: role.auth.auth()?,
                firmware: Some(role.firmware.firmware()?),
                mqtt: Some(role.mqtt.probe_broker()?),
                metrics: fleetlog::metrics::install_recorder(),
                http: role.http.http()?,
                broker_auth: role.broker_auth.broker_auth(&role.mqtt),
            };
            let recorder = parts.metrics.clone();
            let mut platform =
                platform(&common, &role.nats, role.store.store(), recorder, false).await?;
            platform.api(role.http.http_addr, parts);
            platform.run(common.shutdown_timeout()).await
        }
        Command::Ingest(role) => {
            let mut settings = role.ingest.ingest(&role.mqtt)?;
            settings.device_key = role.device_key.optional_key()?;
            let mut platform =
                platform(&common, &role.nats, role.store.store(), None, false).await?;
            platform.ingest(settings);
            platform.run(common.shutdown_timeout()).await
        }
        Command::BrokerSync(role) => {
            let settings = role.mqtt.broker_sync()?;
            let key = role.device_key.key()?;
            let mut platform =
                platform(&common, &role.nats, role.store.store(), None, false).await?;
            platform.broker_sync(settings, key);
            platform.run(common.shutdown_timeout()).await
        }
        Command::Dispatch(role) => {
            let settings = role.dispatch.dispatch(&role.mqtt)?;
            let mut platform =
                platform(&common, &role.nats, role.store.store(), None, false).await?;
            platform.dispatch(settings);
            platform.run(common.shutdown_timeout()).await
        }
        Command::Relay(role) => {
            // The relay writes no events: the store's tuning is never used.
            let mut platform =
                platform(&common, &role.nats, StoreSettings::default(), None, false).await?;
            platform.relay(role.relay.relay());
            platform.run(common.shutdown_timeout()).await
        }
        Command::Project(role) => {
            let mut platform =
                platform(&common, &role.nats, role.store.store(), None, true).await?;
            platform
                .projections(WorkerSettings::default())
                .liveness(role.liveness.liveness())
                .rollout_manager(RolloutManagerSettings::default());
            if let Some(retention) = role.retention.retention() {
                platform.telemetry_retention(retention);
            }
            platform.run(common.shutdown_timeout()).await
        }
        Command::Replay {
            projection,
            all,
            verify,
            patience_secs,
        } => {
            let pool = connect(&common).await?;
            let projections = match projection {
                Some(name) if !all => vec![name],
                _ => fleetlog_projections::PROJECTIONS
                    .iter()
                    .map(|name| name.to_string())
                    .collect(),
            };
            replay::run(
                &pool,
                projections,
                verify,
                Duration::from_secs(patience_secs),
            )
            .await
        }
        Command::Events { command } => match command {
            EventsAction::List { aggregate, limit } => {
                events::list(&connect(&common).await?, &aggregate, limit).await
            }
            EventsAction::Tail {
                event_type,
                aggregate_type,
                nats,
            } => {
                let users = nats.users();
                events::tail(
                    &nats.nats_url,
                    users.get(fleetlog_nats::accounts::API),
                    event_type,
                    aggregate_type,
                    shutdown_on_signal(),
                )
                .await
            }
            EventsAction::Stats => events::stats(&connect(&common).await?).await,
        },
        Command::Up(role) => up(&common, role).await,
    }
}

/// Every role in one process. Migrations run first, so a fresh database just works.
async fn up(common: &CommonArgs, role: UpRole) -> anyhow::Result<()> {
    // Every setting is checked before anything starts.
    let parts = ApiParts {
        auth: role.auth.auth()?,
        firmware: Some(role.firmware.firmware()?),
        mqtt: Some(role.mqtt.probe_broker()?),
        metrics: fleetlog::metrics::install_recorder(),
        http: role.http.http()?,
        broker_auth: role.broker_auth.broker_auth(&role.mqtt),
    };
    let mut ingest = role.ingest.ingest(&role.mqtt)?;
    ingest.device_key = Some(role.auth.device_key.key()?);
    let dispatch = role.dispatch.dispatch(&role.mqtt)?;
    // The sync runs when it has the broker admin's password; without one the broker is taken
    // to be managed by hand (or open), and devices it does not know cannot connect.
    let broker_sync = match &role.mqtt.broker_sync_mqtt_password {
        Some(_) => Some((role.mqtt.broker_sync()?, role.auth.device_key.key()?)),
        None => {
            tracing::warn!(
                "FLEETLOG_BROKER_SYNC_MQTT_PASSWORD is not set: the broker sync does not run, \
                 so the broker learns of no device credential"
            );
            None
        }
    };
    let relay = role.relay.relay();
    let pool = connect(common).await?;
    fleetlog_commands::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
    // Signals stop the roles from here on; until now, they end the process as usual.
    let mut platform = platform_on(pool, &role.nats, role.store.store());
    watch(common, &mut platform, parts.metrics.clone(), true);
    // The relay owns the event stream, but the consumers of the other roles start with it.
    platform.prepare_stream(&relay.stream).await?;
    platform
        .relay(relay)
        .projections(WorkerSettings::default())
        .liveness(role.liveness.liveness())
        .rollout_manager(RolloutManagerSettings::default())
        .ingest(ingest)
        .dispatch(dispatch)
        .api(role.http.http_addr, parts);
    if let Some((settings, key)) = broker_sync {
        platform.broker_sync(settings, key);
    }
    if let Some(retention) = role.retention.retention() {
        platform.telemetry_retention(retention);
    }
    tracing::info!("fleetlog up: all roles started");
    platform.run(common.shutdown_timeout()).await?;
    tracing::info!("fleetlog stopped");
    Ok(())
}

/// A platform on this process's connections, stopped by SIGINT or SIGTERM, watched as
/// [`watch`] says. `recorder`: the metrics recorder the role installed already (the API's,
/// which its `/metrics` renders).
async fn platform(
    common: &CommonArgs,
    nats: &NatsArgs,
    store: StoreSettings,
    recorder: Option<PrometheusHandle>,
    read_models: bool,
) -> anyhow::Result<Platform> {
    let mut platform = platform_on(connect(common).await?, nats, store);
    watch(common, &mut platform, recorder, read_models);
    Ok(platform)
}

/// With `FLEETLOG_METRICS_ADDR` set, serves the process's `/metrics` and `/health` there
/// (installing the recorder if the role has none yet); with a recorder, samples the pool and,
/// if `read_models` (the role that keeps them), the rollouts and dead letters.
fn watch(
    common: &CommonArgs,
    platform: &mut Platform,
    recorder: Option<PrometheusHandle>,
    read_models: bool,
) {
    let recorder = match (recorder, common.metrics_addr) {
        (Some(recorder), _) => Some(recorder),
        (None, Some(_)) => fleetlog::metrics::install_recorder(),
        (None, None) => None,
    };
    let Some(recorder) = recorder else {
        return;
    };
    fleetlog::metrics::sample_pool(platform.pool().clone(), platform.shutdown().clone());
    if read_models {
        fleetlog::metrics::sample_read_models(platform.pool().clone(), platform.shutdown().clone());
    }
    if let Some(address) = common.metrics_addr {
        platform.metrics_endpoint(address, recorder);
    }
}

/// A platform on `pool`, each role with a NATS connection of its own (as it would have in a
/// process of its own), stopped by SIGINT or SIGTERM.
fn platform_on(pool: PgPool, nats: &NatsArgs, store: StoreSettings) -> Platform {
    Platform::with_connection_per_role(
        pool,
        nats.nats_url.clone(),
        nats.users(),
        store,
        shutdown_on_signal(),
    )
}

async fn connect(common: &CommonArgs) -> anyhow::Result<PgPool> {
    fleetlog_commands::connect(
        common.database_url.expose_secret(),
        common.database_max_connections,
    )
    .await
    .context("cannot connect to Postgres (FLEETLOG_DATABASE_URL)")
}

/// A token cancelled by the first SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let interrupt = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = interrupt => tracing::info!("SIGINT received, shutting down"),
            () = terminate => tracing::info!("SIGTERM received, shutting down"),
        }
        trigger.cancel();
    });
    token
}
