//! Typed settings, parsed once at start-up: environment variables first (`FLEETLOG_*`), then
//! command-line flags, then local defaults. Every setting is documented in `.env.example`.

use std::net::SocketAddr;

use clap::{Args, ValueEnum};
use fleetlog_commands::StoreSettings;
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

    /// Address the HTTP API listens on.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,

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
        default_value_t = 30
    )]
    pub shutdown_timeout_secs: u64,

    /// Log filter, e.g. `info` or `fleetlog=debug,sqlx=warn`.
    #[arg(
        long,
        global = true,
        env = "FLEETLOG_LOG",
        default_value = "info,sqlx=warn"
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

fn parse_secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value))
}
