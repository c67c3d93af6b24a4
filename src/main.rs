//! `fleetlog`: one binary for every role of the platform.
//!
//! `main` parses the settings once, sets up logging and wires the roles; each role lives in its
//! crate and exposes a `run(.., shutdown)` that returns when the shutdown signal fires and its
//! in-flight work is done.

mod events;
mod replay;
mod settings;

/// mimalloc instead of the system allocator: the roles allocate many small, short-lived
/// values (messages, events, JSON) from many threads, where glibc's malloc spends much of the
/// CPU time of a busy node.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleetlog_api::auth::Auth;
use fleetlog_api::HttpSettings;
use fleetlog_broker::BrokerUrl;
use fleetlog_commands::credentials::hash_password;
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata, StoreSettings};
use fleetlog_dispatch::{DispatchSettings, Dispatcher};
use fleetlog_domain::user::{validate_username, Role, UserCommand};
use fleetlog_domain::{TenantId, UserId};
use fleetlog_ingest::bridge::{Ingest, IngestSettings};
use fleetlog_nats::{ensure_stream, supervise};
use fleetlog_process::liveness::{Liveness, LivenessSettings};
use fleetlog_process::rollout_manager::{RolloutManager, RolloutManagerSettings};
use fleetlog_projections::WorkerSettings;
use fleetlog_relay::{Relay, RelaySettings};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use secrecy::{ExposeSecret, SecretString};
use settings::{LogFormat, Settings};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// fleetlog: an event-sourced platform for fleets of IoT devices.
#[derive(Debug, Parser)]
#[command(name = "fleetlog", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every role in one process (the single-node default) until SIGINT or SIGTERM.
    Up,
    /// Serve the HTTP API.
    Api,
    /// Bridge the device topics of the MQTT broker into Device commands.
    Ingest,
    /// Send commands, desired properties and firmware updates to the devices over MQTT, and
    /// record unanswered commands as expired.
    Dispatch,
    /// Publish committed events from Postgres to NATS JetStream (one active relay at a time).
    Relay,
    /// Keep the read models up to date from the event stream (run as many as you like).
    Project,
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
    },
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
    init_logging(&cli.settings);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fleetlog: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, the whole cause chain: "what failed: why: root cause".
            eprintln!("fleetlog: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match settings.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.settings;
    match cli.command {
        Command::Migrate => {
            let pool = connect(&settings).await?;
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
        } => {
            if !password_stdin {
                bail!("pass the password on standard input with --password-stdin");
            }
            validate_username(&username).context("invalid --username")?;
            let password = read_password_from_stdin()?;
            let password_hash = hash_password(&password).context("password refused")?;
            let pool = connect(&settings).await?;
            let bus = CommandBus::new(pool, settings.store());
            let user_id = UserId::for_username(&tenant, &username);
            let command = UserCommand::Register {
                tenant: tenant.clone(),
                username: username.clone(),
                password_hash,
                roles,
                at: chrono::Utc::now(),
            };
            let metadata = CommandMetadata::new("cli").with_tenant(tenant.clone());
            match bus
                .users()
                .execute(user_id.as_str(), command, &metadata)
                .await
            {
                Ok(_) => {
                    println!("created user {username} ({user_id}) in tenant {tenant}");
                    Ok(())
                }
                Err(CommandError::Refused(refusal)) => {
                    bail!("cannot create user {username}: {refusal}")
                }
                Err(error) => Err(error).context("cannot create user"),
            }
        }
        Command::Api => {
            let auth = api_auth(&settings)?;
            let firmware = settings.firmware()?;
            let pool = connect(&settings).await?;
            serve_api(
                settings.http_addr,
                settings.http()?,
                settings.nats_url.clone(),
                settings.mqtt_url.clone(),
                auth,
                firmware,
                settings.store(),
                pool,
                install_metrics_recorder(),
                shutdown_on_signal(),
            )
            .await
        }
        Command::Ingest => {
            let pool = connect(&settings).await?;
            run_ingest(
                settings.nats_url.clone(),
                settings.ingest()?,
                settings.store(),
                pool,
                shutdown_on_signal(),
            )
            .await
        }
        Command::Dispatch => {
            let pool = connect(&settings).await?;
            run_dispatch(
                settings.nats_url.clone(),
                settings.dispatch(),
                settings.store(),
                pool,
                shutdown_on_signal(),
            )
            .await
        }
        Command::Relay => {
            let pool = connect(&settings).await?;
            run_relay(
                settings.nats_url.clone(),
                settings.relay(),
                pool,
                shutdown_on_signal(),
            )
            .await
        }
        Command::Project => {
            let pool = connect(&settings).await?;
            run_projections(
                settings.nats_url.clone(),
                settings.liveness(),
                settings.store(),
                pool,
                shutdown_on_signal(),
            )
            .await
        }
        Command::Replay {
            projection,
            all,
            verify,
            patience_secs,
        } => {
            let pool = connect(&settings).await?;
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
                events::list(&connect(&settings).await?, &aggregate, limit).await
            }
            EventsAction::Tail {
                event_type,
                aggregate_type,
            } => {
                events::tail(
                    &settings.nats_url,
                    event_type,
                    aggregate_type,
                    shutdown_on_signal(),
                )
                .await
            }
            EventsAction::Stats => events::stats(&connect(&settings).await?).await,
        },
        Command::Up => up(settings).await,
    }
}

/// Every role in one process. Migrations run first, so a fresh database just works.
async fn up(settings: Settings) -> anyhow::Result<()> {
    let auth = api_auth(&settings)?;
    let pool = connect(&settings).await?;
    fleetlog_commands::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
    // The relay owns the event stream, but the consumers of the other roles start with it:
    // set the stream up first, so that they find it rather than warn and retry. Best effort,
    // and brief: with NATS away, every role waits for it on its own.
    let client = connect_nats(&settings.nats_url).await?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = settings.relay().stream;
    match tokio::time::timeout(Duration::from_secs(5), ensure_stream(&jetstream, &stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot set up the event stream yet"),
        Err(_) => tracing::warn!("NATS does not answer yet; the roles wait for it"),
    }
    let shutdown = shutdown_on_signal();
    let mut roles = tokio::task::JoinSet::new();
    roles.spawn(run_relay(
        settings.nats_url.clone(),
        settings.relay(),
        pool.clone(),
        shutdown.clone(),
    ));
    roles.spawn(run_projections(
        settings.nats_url.clone(),
        settings.liveness(),
        settings.store(),
        pool.clone(),
        shutdown.clone(),
    ));
    roles.spawn(run_ingest(
        settings.nats_url.clone(),
        settings.ingest()?,
        settings.store(),
        pool.clone(),
        shutdown.clone(),
    ));
    roles.spawn(run_dispatch(
        settings.nats_url.clone(),
        settings.dispatch(),
        settings.store(),
        pool.clone(),
        shutdown.clone(),
    ));
    roles.spawn(serve_api(
        settings.http_addr,
        settings.http()?,
        settings.nats_url.clone(),
        settings.mqtt_url.clone(),
        auth,
        settings.firmware()?,
        settings.store(),
        pool.clone(),
        install_metrics_recorder(),
        shutdown.clone(),
    ));
    tracing::info!("fleetlog up: all roles started");

    // The first role to stop (by failure or after the signal) stops the others.
    let first = roles.join_next().await;
    shutdown.cancel();
    let grace = Duration::from_secs(settings.shutdown_timeout_secs);
    let rest = tokio::time::timeout(grace, async {
        let mut results = Vec::new();
        while let Some(result) = roles.join_next().await {
            results.push(result);
        }
        results
    })
    .await
    .context("roles did not stop within the shutdown timeout")?;
    // Roles run supervised (a panic restarts the role), so only an error ends one early.
    for result in first.into_iter().chain(rest) {
        result.context("a role was cancelled")??;
    }
    pool.close().await;
    tracing::info!("fleetlog stopped");
    Ok(())
}

/// The API role.
#[allow(clippy::too_many_arguments)]
async fn serve_api(
    address: SocketAddr,
    http: HttpSettings,
    nats_url: String,
    mqtt: BrokerUrl,
    auth: Arc<Auth>,
    firmware: Arc<fleetlog_firmware::FirmwareStore>,
    store: StoreSettings,
    pool: PgPool,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Readiness reports on NATS too; the connection comes up in the background.
    let nats = connect_nats(&nats_url).await?;
    let login_throttle = Arc::new(fleetlog_api::throttle::LoginThrottle::default());
    supervise("api", shutdown.clone(), move || {
        let state = fleetlog_api::AppState {
            auth: auth.clone(),
            nats: Some(nats.clone()),
            mqtt: Some(mqtt.clone()),
            login_throttle: login_throttle.clone(),
            bus: CommandBus::new(pool.clone(), store),
            metrics: metrics.clone(),
            firmware: Some(firmware.clone()),
        };
        let (http, shutdown) = (http.clone(), shutdown.clone());
        async move {
            // Bound again on a restart: the listener went with the unit that panicked.
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?;
            fleetlog_api::run(listener, state, &http, shutdown.cancelled_owned())
                .await
                .context("api failed")
        }
    })
    .await
}

/// Connects to NATS, saying which setting names the server if it fails. The connection
/// retries in the background, so a server that is down only delays the roles.
async fn connect_nats(nats_url: &str) -> anyhow::Result<async_nats::Client> {
    fleetlog_nats::connect(nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url} (FLEETLOG_NATS_URL)"))
}

/// The relay role. NATS being down is not an error: the relay retries until it is back.
async fn run_relay(
    nats_url: String,
    settings: RelaySettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = connect_nats(&nats_url).await?;
    supervise("relay", shutdown.clone(), move || {
        let relay = Relay::new(pool.clone(), client.clone(), settings);
        let shutdown = shutdown.clone();
        async move {
            relay.run(shutdown).await;
            Ok(())
        }
    })
    .await
}

/// The ingest role. An unreachable broker is not an error: the bridge retries with backoff.
async fn run_ingest(
    nats_url: String,
    settings: IngestSettings,
    store: StoreSettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = connect_nats(&nats_url).await?;
    supervise("ingest", shutdown.clone(), move || {
        let bridge = Ingest::new(
            CommandBus::new(pool.clone(), store),
            async_nats::jetstream::new(client.clone()),
            settings.clone(),
        );
        let shutdown = shutdown.clone();
        async move {
            bridge.run(shutdown).await;
            Ok(())
        }
    })
    .await
}

/// The dispatch role.
async fn run_dispatch(
    nats_url: String,
    settings: DispatchSettings,
    store: StoreSettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = connect_nats(&nats_url).await?;
    supervise("dispatch", shutdown.clone(), move || {
        let dispatcher = Dispatcher::new(
            CommandBus::new(pool.clone(), store),
            async_nats::jetstream::new(client.clone()),
            settings.clone(),
        );
        let shutdown = shutdown.clone();
        async move {
            dispatcher.run(shutdown).await;
            Ok(())
        }
    })
    .await
}

/// The projection role: a worker per read model, and the process managers.
async fn run_projections(
    nats_url: String,
    liveness: LivenessSettings,
    store: StoreSettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = connect_nats(&nats_url).await?;
    let jetstream = async_nats::jetstream::new(client);
    let live = {
        let (pool, shutdown) = (pool.clone(), shutdown.clone());
        supervise("liveness", shutdown.clone(), move || {
            let liveness = Liveness::new(CommandBus::new(pool.clone(), store), liveness);
            let shutdown = shutdown.clone();
            async move {
                liveness.run(shutdown).await;
                Ok::<(), anyhow::Error>(())
            }
        })
    };
    let rollouts = {
        let (pool, jetstream, shutdown) = (pool.clone(), jetstream.clone(), shutdown.clone());
        supervise("rollout-manager", shutdown.clone(), move || {
            let manager = RolloutManager::new(
                CommandBus::new(pool.clone(), store),
                jetstream.clone(),
                RolloutManagerSettings::default(),
            );
            let shutdown = shutdown.clone();
            async move {
                manager.run(shutdown).await;
                Ok::<(), anyhow::Error>(())
            }
        })
    };
    let (_, live, rollouts) = tokio::join!(
        fleetlog_projections::run_all(pool, jetstream, WorkerSettings::default(), shutdown),
        live,
        rollouts,
    );
    live.and(rollouts)
}

/// Token keys for the API, from `FLEETLOG_JWT_SECRET`.
fn api_auth(settings: &Settings) -> anyhow::Result<Arc<Auth>> {
    let Some(secret) = &settings.jwt_secret else {
        bail!("FLEETLOG_JWT_SECRET is not set: the API needs it to sign access tokens");
    };
    if secret.expose_secret().len() < 32 {
        bail!("FLEETLOG_JWT_SECRET must be at least 32 characters");
    }
    Ok(Auth::new(
        secret,
        Duration::from_secs(settings.access_token_ttl_secs.max(1)),
        Duration::from_secs(settings.refresh_token_ttl_secs.max(1)),
    ))
}

async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    fleetlog_commands::connect(
        settings.database_url.expose_secret(),
        settings.database_max_connections,
    )
    .await
    .context("cannot connect to Postgres (FLEETLOG_DATABASE_URL)")
}

/// Records this process's metrics for `GET /metrics`. `None` if a recorder is installed already.
fn install_metrics_recorder() -> Option<PrometheusHandle> {
    // Durations as real histograms (buckets), which Prometheus can aggregate across processes.
    let builder = PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Suffix("_duration_seconds".to_string()),
        &[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    );
    match builder.and_then(|builder| builder.install_recorder()) {
        Ok(handle) => {
            // Without the exporter's own HTTP listener, nobody else drains histogram buckets.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
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

fn read_password_from_stdin() -> anyhow::Result<SecretString> {
    let mut input = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut input)
        .context("cannot read the password from standard input")?;
    let password = input.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(SecretString::from(password))
}
