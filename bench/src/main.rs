//! Benchmarks and the fault matrix, against a running platform (`deploy/bench/*.sh` start it):
//!
//! - `fleetlog-bench ingest` (`deploy/bench/ingest.sh`): fleetlog's capacity for MQTT telemetry
//!   (the highest offered rate whose p99 publish-to-projection latency stays under 500 ms),
//!   beside the raw broker, a raw INSERT and a minimal durable bridge, with the cost per
//!   process; replay beside a COPY scan, device queries beside plain SQL, memory with many
//!   devices connected (`ingest.rs`, `capacity.rs`, `resources.rs`).
//! - `fleetlog-bench faults` (`deploy/bench/faults.sh`): every role in its own process under
//!   steady load, one fault after another, counting what was sent, acknowledged and persisted
//!   (`faults/`).
//! - `fleetlog-bench partitions` (`deploy/bench/partitions.sh`): the event log's reads over
//!   tens of millions of events, as fleetlog lays out `events` and partitioned by month
//!   (`partitions.rs`).

mod capacity;
mod faults;
mod ingest;
mod partitions;
mod resources;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetlog-bench",
    about = "Benchmarks against a running fleetlog"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// MQTT ingest end to end, with the raw broker and database rates for comparison.
    Ingest(ingest::IngestArgs),
    /// Every role in its own process under steady load, one fault after another; counts what
    /// was sent, acknowledged and persisted, and verifies the stream and the read models.
    Faults(faults::FaultsArgs),
    /// The event log's reads over tens of millions of events, unpartitioned and partitioned
    /// by month, side by side, in scratch databases.
    Partitions(partitions::PartitionArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ingest(args) => ingest::ingest(args).await,
        Command::Faults(args) => faults::run(args).await,
        Command::Partitions(args) => partitions::run(args).await,
    }
}

/// The machine a report was measured on: CPUs and their model.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: f64 = line[9..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!(", {:.1} GB RAM", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}{memory}")
}
