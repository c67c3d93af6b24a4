//! Benchmarks against a running platform. `deploy/bench/ingest.sh` starts the roles and runs
//! `fleetlog-bench ingest`, which measures, in one run:
//!
//! 1. the raw Mosquitto QoS 1 publish → subscribe rate (the broker's ceiling);
//! 2. a raw multi-row Postgres INSERT of telemetry-shaped rows (the database's ceiling);
//! 3. fleetlog end to end: devices publish telemetry over MQTT at QoS 1 at a fixed rate; a
//!    message counts as done when the devices read model shows it (published → ingested →
//!    event committed → relayed → projected). Once at the target rate (sustained throughput)
//!    and once at half of it (latency distribution).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::{Parser, Subcommand};
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::DeviceCommand;
use fleetlog_domain::{DeviceId, TenantId, UserId};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::PgPool;
use tokio::sync::Mutex;

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
    Ingest(IngestArgs),
}

#[derive(clap::Args)]
struct IngestArgs {
    /// The platform's database (the roles under test use it too).
    #[arg(long, env = "FLEETLOG_DATABASE_URL")]
    database_url: String,
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    mqtt_host: String,
    /// MQTT broker port.
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Target rate in messages per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds each end-to-end phase publishes for.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// MQTT connections the devices publish through.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Messages for the raw broker and database measurements.
    #[arg(long, default_value_t = 100_000)]
    raw_messages: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Ingest(args) => ingest(args).await,
    }
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&args.database_url)
        .await
        .context("cannot connect to the database")?;

    let broker_rate = raw_broker(&args).await?;
    println!(
        "raw mosquitto QoS1 pub->sub: {broker_rate:>9.0} msg/s ({} messages)",
        args.raw_messages
    );
    let insert_rate = raw_insert(&pool, args.raw_messages).await?;
    println!(
        "raw postgres multi-row INSERT: {insert_rate:>8.0} rows/s ({} rows, 1,000 per statement)",
        args.raw_messages
    );

    register_devices(&pool, args.devices).await?;
    let sequence = Arc::new(AtomicU64::new(0));
    let full = end_to_end(&args, &pool, args.rate, &sequence).await?;
    full.print("target rate");
    let half = end_to_end(&args, &pool, args.rate / 2, &sequence).await?;
    half.print("half rate");
    Ok(())
}

/// QoS 1 publishes on one connection, received on another, as fast as the broker goes.
async fn raw_broker(args: &IngestArgs) -> anyhow::Result<f64> {
    let (subscriber, mut sub_events) = AsyncClient::new(
        MqttOptions::new("bench-raw-sub", &args.mqtt_host, args.mqtt_port),
        10_000,
    );
    subscriber.subscribe("bench/raw", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_events.poll().await? {
            break;
        }
    }
    let total = args.raw_messages;
    let receiver = tokio::spawn(async move {
        let mut received = 0;
        while received < total {
            if let Ok(Event::Incoming(Packet::Publish(_))) = sub_events.poll().await {
                received += 1;
            }
        }
        Instant::now()
    });
    let mut options = MqttOptions::new("bench-raw-pub", &args.mqtt_host, args.mqtt_port);
    options.set_inflight(1000);
    let (publisher, mut pub_events) = AsyncClient::new(options, 10_000);
    tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    let started = Instant::now();
    for n in 0..total {
        publisher
            .publish(
                "bench/raw",
                QoS::AtLeastOnce,
                false,
                format!("{{\"seq\": {n}}}"),
            )
            .await?;
    }
    let finished = receiver.await?;
    Ok(total as f64 / (finished - started).as_secs_f64())
}

/// Telemetry-shaped rows into a scratch table, 1,000 per statement.
async fn raw_insert(pool: &PgPool, rows: u64) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_rows
         (device_id text, sensor text, time timestamptz, value float8, unit text)",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    let mut done = 0;
    while done < rows {
        let batch = 1000.min(rows - done);
        let devices: Vec<String> = (0..batch).map(|i| format!("dev-{}", i % 1000)).collect();
        let values: Vec<f64> = (0..batch).map(|i| i as f64).collect();
        sqlx::query(
            "INSERT INTO bench_rows
             SELECT d, 'temperature', now(), v, 'celsius' FROM UNNEST($1::text[], $2::float8[]) AS t(d, v)",
        )
        .bind(&devices)
        .bind(&values)
        .execute(pool)
        .await?;
        done += batch;
    }
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_rows").execute(pool).await?;
    Ok(rate)
}

fn device_name(n: usize) -> String {
    format!("bench-{n}")
}

/// Registers the simulated devices once (a rerun finds them registered).
async fn register_devices(pool: &PgPool, devices: usize) -> anyhow::Result<()> {
    let bus = CommandBus::new(pool.clone(), StoreSettings::default());
    let tenant = TenantId::parse("bench")?;
    let owner = UserId::parse("bench")?;
    let metadata = CommandMetadata::new("bench").with_tenant(tenant.clone());
    let started = Instant::now();
    futures::future::try_join_all((0..devices).map(|n| {
        let bus = bus.clone();
        let tenant = tenant.clone();
        let owner = owner.clone();
        let metadata = metadata.clone();
        async move {
            let id = device_name(n);
            let register = DeviceCommand::Register {
                device_id: DeviceId::parse(id.as_str())?,
                tenant,
                owner,
                name: id.clone(),
                model: "bench".into(),
                tags: vec![],
                at: Utc::now(),
                credentials: None,
            };
            match bus.devices().execute(&id, register, &metadata).await {
                Ok(_) | Err(fleetlog_commands::CommandError::Refused(_)) => Ok(()),
                Err(error) => Err(anyhow::Error::from(error)),
            }
        }
    }))
    .await?;
    eprintln!(
        "registered {devices} devices in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Phase {
    rate: u64,
    published: u64,
    publish_seconds: f64,
    done_seconds: f64,
    latencies: Vec<Duration>,
}

impl Phase {
    fn print(&self, name: &str) {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let at = |q: f64| {
            sorted
                .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "fleetlog end to end, {name} ({} msg/s offered): {} messages published in {:.1}s, \
             all projected after {:.1}s => {:.0} msg/s sustained; publish->projection latency \
             p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.rate,
            self.published,
            self.publish_seconds,
            self.done_seconds,
            self.published as f64 / self.done_seconds,
            at(0.50),
            at(0.95),
            at(0.99),
            at(1.0),
        );
    }
}

/// Publishes `{"seq": n, "temperature": x}` round-robin over the devices at `rate` for the
/// configured time, while watching the devices read model for each device's latest `seq`.
async fn end_to_end(
    args: &IngestArgs,
    pool: &PgPool,
    rate: u64,
    sequence: &Arc<AtomicU64>,
) -> anyhow::Result<Phase> {
    let total = rate * args.seconds;
    // When each (device, seq) was published.
    let sent: Arc<Mutex<HashMap<(usize, u64), Instant>>> =
        Arc::new(Mutex::new(HashMap::with_capacity(total as usize)));
    let mut clients = Vec::new();
    for c in 0..args.connections {
        let mut options = MqttOptions::new(
            format!("bench-devices-{c}"),
            &args.mqtt_host,
            args.mqtt_port,
        );
        options.set_inflight(1000);
        let (client, mut events) = AsyncClient::new(options, 10_000);
        tokio::spawn(async move { while events.poll().await.is_ok() {} });
        clients.push(client);
    }
    let first_seq = sequence.load(Ordering::Relaxed);
    let started = Instant::now();
    let publisher = {
        let sent = sent.clone();
        let sequence = sequence.clone();
        let devices = args.devices;
        tokio::spawn(async move {
            let tick = Duration::from_millis(10);
            let per_tick = (rate / 100).max(1);
            let mut next = Instant::now();
            let mut published = 0;
            while published < total {
                for _ in 0..per_tick.min(total - published) {
                    let seq = sequence.fetch_add(1, Ordering::Relaxed);
                    let device = (seq as usize) % devices;
                    let payload = format!(
                        "{{\"seq\": {seq}, \"temperature\": {}}}",
                        20.0 + (seq % 100) as f64 / 10.0
                    );
                    sent.lock().await.insert((device, seq), Instant::now());
                    let client = &clients[device % clients.len()];
                    client
                        .publish(
                            format!("devices/{}/data", device_name(device)),
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )
                        .await?;
                    published += 1;
                }
                next += tick;
                tokio::time::sleep_until(next.into()).await;
            }
            anyhow::Ok(Instant::now())
        })
    };

    // Watch the read model: a device's latest seq covers every earlier seq of that device.
    let mut latencies = Vec::with_capacity(total as usize);
    let mut seen: HashMap<usize, u64> = HashMap::new();
    let last_seq = first_seq + total - 1;
    let deadline = started + Duration::from_secs(args.seconds * 10 + 60);
    loop {
        let rows: Vec<(String, Option<f64>)> = sqlx::query_as(
            "SELECT device_id, (sensors -> 'seq' ->> 'value')::float8
               FROM devices WHERE device_id LIKE 'bench-%'",
        )
        .fetch_all(pool)
        .await?;
        let now = Instant::now();
        {
            let mut sent = sent.lock().await;
            for (device_id, seq) in rows {
                let (Some(seq), Some(device)) = (
                    seq,
                    device_id
                        .strip_prefix("bench-")
                        .and_then(|n| n.parse::<usize>().ok()),
                ) else {
                    continue;
                };
                let seq = seq as u64;
                let from = seen.get(&device).map_or(first_seq, |s| s + 1);
                if seq < from {
                    continue;
                }
                // Every seq of this device up to `seq` is now visible: the device's seqs are
                // those congruent to its number modulo the device count.
                let count = args.devices as u64;
                let mut s = from + (device as u64 + count - from % count) % count;
                while s <= seq {
                    if let Some(at) = sent.remove(&(device, s)) {
                        latencies.push(now - at);
                    }
                    s += count;
                }
                seen.insert(device, seq);
            }
        }
        if latencies.len() as u64 >= total {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "gave up: {} of {total} messages projected (up to seq {last_seq})",
                latencies.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_seconds = started.elapsed().as_secs_f64();
    let publish_end = publisher.await??;
    Ok(Phase {
        rate,
        published: total,
        publish_seconds: (publish_end - started).as_secs_f64(),
        done_seconds,
        latencies,
    })
}
