//! `fleetlog`: one binary for every role of the platform.
//!
//! `main` parses the settings once, sets up logging and wires the roles; each role lives in its
//! crate and exposes a `run(.., shutdown)` that returns when the shutdown signal fires and its
//! in-flight work is done.

mod settings;

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fleetlog_commands::credentials::hash_password;
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata, StoreSettings};
use fleetlog_domain::user::{validate_username, Role, UserCommand};
use fleetlog_domain::{TenantId, UserId};
use fleetlog_nats::{Relay, RelaySettings};
use fleetlog_projections::{DevicesProjection, TelemetryProjection, Worker, WorkerSettings};
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
    /// Publish committed events from Postgres to NATS JetStream (one active relay at a time).
    Relay,
    /// Keep the read models up to date from the event stream (run as many as you like).
    Project,
    /// Apply the database migrations; a second run changes nothing.
    Migrate,
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserAction,
    },
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
    let cli = Cli::parse();
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
            let pool = connect(&settings).await?;
            serve_api(
                settings.http_addr,
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
            run_projections(settings.nats_url.clone(), pool, shutdown_on_signal()).await
        }
        Command::Up => up(settings).await,
    }
}

/// Every role in one process. Migrations run first, so a fresh database just works.
async fn up(settings: Settings) -> anyhow::Result<()> {
    let pool = connect(&settings).await?;
    fleetlog_commands::migrate(&pool)
        .await
        .context("cannot apply migrations")?;
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
        pool.clone(),
        shutdown.clone(),
    ));
    roles.spawn(serve_api(
        settings.http_addr,
        settings.store(),
        pool.clone(),
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
    for result in first.into_iter().chain(rest) {
        result.context("a role panicked")??;
    }
    pool.close().await;
    tracing::info!("fleetlog stopped");
    Ok(())
}

/// The API role.
async fn serve_api(
    address: SocketAddr,
    store: StoreSettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let state = fleetlog_api::AppState {
        bus: CommandBus::new(pool, store),
    };
    fleetlog_api::run(listener, state, shutdown.cancelled_owned())
        .await
        .context("api failed")
}

/// The relay role. NATS being down is not an error: the relay retries until it is back.
async fn run_relay(
    nats_url: String,
    settings: RelaySettings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = fleetlog_nats::connect(&nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url} (FLEETLOG_NATS_URL)"))?;
    let relay = Relay::new(pool, async_nats::jetstream::new(client), settings);
    relay.run(shutdown).await;
    Ok(())
}

/// The projection role: one worker per read model.
async fn run_projections(
    nats_url: String,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = fleetlog_nats::connect(&nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url} (FLEETLOG_NATS_URL)"))?;
    let jetstream = async_nats::jetstream::new(client);
    let settings = WorkerSettings::default();
    tokio::join!(
        Worker::new(DevicesProjection, pool.clone(), jetstream.clone(), settings)
            .run(shutdown.clone()),
        Worker::new(TelemetryProjection, pool, jetstream, settings).run(shutdown),
    );
    Ok(())
}

async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    fleetlog_commands::connect(
        settings.database_url.expose_secret(),
        settings.database_max_connections,
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
