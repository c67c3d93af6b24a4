//! `fleetlog-bench ingest`: MQTT telemetry end to end beside the raw broker and database rates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
use fleetlog_domain::device::DeviceCommand;
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_projections::DeviceModels;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::PgPool;
use tokio::sync::Mutex;

#[derive(clap::Args)]
pub struct IngestArgs {
    /// The platform's database (the roles under test use it too).
    #[arg(long, env = "FLEETLOG_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub mqtt_host: String,
    /// MQTT broker port.
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub devices: usize,
    /// The first rate of the capacity search, in messages per second.
    #[arg(long, default_value_t = 6_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub start_rate: u64,
    /// How much each step of the search adds.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub step: u64,
    /// Where the search stops even if every step held.
    #[arg(long, default_value_t = 30_000)]
    pub max_rate: u64,
    /// Seconds each end-to-end phase publishes for.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// MQTT connections the devices publish through.
    #[arg(long, default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
    pub connections: usize,
    /// Messages for the raw broker, database and minimal bridge measurements.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub raw_messages: u64,
    /// Processes to measure, `name=pid` (`name+=pid` with its children, for Postgres).
    #[arg(long = "watch")]
    pub watch: Vec<String>,
    /// The `fleetlog` binary, for the replay measurement.
    #[arg(long)]
    pub fleetlog: Option<std::path::PathBuf>,
    /// The API under test, `http://host:port`, for the query measurement.
    #[arg(long)]
    pub api_url: Option<String>,
    /// A viewer of tenant `bench` as `user:password`, to log in to the API.
    #[arg(long)]
    pub api_login: Option<String>,
    /// The API's database pool size (the plain SQL read gets a pool as large).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub api_pool: u32,
    /// Devices connected at once for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    pub connected_devices: usize,
    /// The report as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// The parts to measure (all by default), to re-measure one figure after a change.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Part::ALL)]
    pub parts: Vec<Part>,
}

/// The parts of the report, each measured on its own.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// Raw Mosquitto pub->sub and a raw multi-row INSERT.
    Raw,
    /// The minimal durable bridge.
    Bridge,
    /// The capacity search and the latency at half of it.
    Capacity,
    /// `fleetlog replay --all` beside a COPY scan.
    Replay,
    /// `GET /api/v1/devices/{id}` beside a plain SQL read.
    Reads,
    /// Memory with many devices connected.
    Memory,
}

impl Part {
    const ALL: [Part; 6] = [
        Part::Raw,
        Part::Bridge,
        Part::Capacity,
        Part::Replay,
        Part::Reads,
        Part::Memory,
    ];
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        let value = self.to_possible_value().expect("no part is skipped");
        f.write_str(value.get_name())
    }
}

/// A step holds when its p99 publish-to-projection latency stays under this.
const HELD_P99: Duration = Duration::from_millis(500);

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&args.database_url)
        .await
        .context("cannot connect to the database")?;
    let watched = crate::resources::Watched::parse(&args.watch)?;
    let mut report = crate::capacity::Report::new(&args);

    let measure = |part: Part| args.parts.contains(&part);
    if measure(Part::Raw) {
        let broker_rate = raw_broker(&args).await?;
        println!(
            "raw mosquitto QoS1 pub->sub: {broker_rate:>9.0} msg/s ({} messages)",
            args.raw_messages
        );
        report.raw_broker_msg_s = broker_rate;
        let insert_rate = raw_insert(&pool, args.raw_messages).await?;
        println!(
            "raw postgres multi-row INSERT: {insert_rate:>8.0} rows/s ({} rows, 1,000 per statement)",
            args.raw_messages
        );
        report.raw_insert_rows_s = insert_rate;
    }
    if measure(Part::Bridge) {
        // The bridge runs in this process, beside its publisher: "bench" is both.
        let mut with_bench = args.watch.clone();
        with_bench.push(format!("bench={}", std::process::id()));
        let bridge_watch = crate::resources::Watched::parse(&with_bench)?;
        let before = bridge_watch.cpu();
        let bridge_rate = crate::capacity::durable_bridge(&args, &pool).await?;
        let costs = bridge_watch.cost(
            &before,
            &bridge_watch.cpu(),
            &HashMap::new(),
            args.raw_messages,
        );
        println!(
            "minimal durable bridge (MQTT QoS1 in, one INSERT of event rows per batch, ack after commit): {bridge_rate:>8.0} msg/s; CPU us/msg: {}",
            costs
                .iter()
                .map(|c| format!("{} {:.0}", c.process, c.cpu_us_per_message))
                .collect::<Vec<_>>()
                .join(", ")
        );
        report.bridge_msg_s = bridge_rate;
        report.bridge_processes = costs;
    }
    register_devices(&pool, args.devices).await?;
    if measure(Part::Capacity) {
        let sequence = Arc::new(AtomicU64::new(0));
        // Step the rate up until a step no longer holds, then narrow down between the highest
        // rate held and the lowest that was not (halving first if even the first did not hold).
        let mut rate = args.start_rate;
        let mut failed: Option<u64> = None;
        let resolution = (args.step / 4).max(100);
        for _ in 0..10 {
            let before = watched.cpu();
            let mut peak = HashMap::new();
            let phase = end_to_end(&args, &pool, rate, &sequence, &watched, &mut peak).await?;
            let costs = watched.cost(&before, &watched.cpu(), &peak, phase.published);
            phase.print(&format!("step {rate}"));
            let held = phase.p99() < HELD_P99;
            report.steps.push(phase.summary(held, costs));
            if held {
                report.capacity_msg_s = report.capacity_msg_s.max(rate);
            } else {
                failed = Some(failed.map_or(rate, |f| f.min(rate)));
            }
            let next = match failed {
                None => rate + args.step,
                Some(_) if report.capacity_msg_s == 0 => rate / 2,
                Some(failed) => (report.capacity_msg_s + failed) / 2,
            };
            let narrow = failed
                .is_some_and(|f| f.saturating_sub(report.capacity_msg_s) <= resolution)
                && report.capacity_msg_s > 0;
            if narrow || next > args.max_rate || next < 100 {
                break;
            }
            rate = next;
        }
        let half_rate = (report.capacity_msg_s / 2).max(1);
        let mut peak = HashMap::new();
        let half = end_to_end(&args, &pool, half_rate, &sequence, &watched, &mut peak).await?;
        half.print("half of capacity");
        report.half = Some(half.summary(half.p99() < HELD_P99, Vec::new()));
    }
    if let (true, Some(fleetlog)) = (measure(Part::Replay), &args.fleetlog) {
        let (replay, copy) = crate::capacity::replay_against_copy(fleetlog, &pool).await?;
        println!(
            "replay --all: {replay:>9.0} events/s; COPY scan of the same rows: {copy:>9.0} rows/s"
        );
        report.replay_events_s = replay;
        report.copy_rows_s = copy;
    }
    if let (true, Some(url), Some(login)) = (measure(Part::Reads), &args.api_url, &args.api_login) {
        // The load generator runs in this process: "bench" is the HTTP client or the SQL pool.
        let mut with_bench = args.watch.clone();
        with_bench.push(format!("bench={}", std::process::id()));
        let reads_watch = crate::resources::Watched::parse(&with_bench)?;
        let reads = crate::capacity::device_reads(url, login, &args, &reads_watch).await?;
        reads.print();
        report.reads = Some(reads);
    }
    if measure(Part::Memory) && args.connected_devices > 0 {
        let memory = crate::capacity::connected_memory(&args, &pool, &watched).await?;
        println!(
            "memory with {} devices connected: {}",
            args.connected_devices,
            memory
                .iter()
                .map(|m| format!(
                    "{} {:.1} MB ({:.2} MB per 1,000)",
                    m.process, m.rss_mb, m.mb_per_1000_devices
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        report.memory = memory;
    }
    report.finish();
    report.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report: {}", path.display());
    }
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

pub fn device_name(n: usize) -> String {
    format!("bench-{n}")
}

/// Registers the simulated devices once (a rerun finds them registered).
pub async fn register_devices(pool: &PgPool, devices: usize) -> anyhow::Result<()> {
    let bus = CommandBus::new(
        pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
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
    /// Where the time went, stage by stage, for the messages whose events were found.
    stages: Option<Stages>,
}

/// Publish-to-projection latency split at the two instants the event records: when ingest
/// took the message up (`received_at` in the payload) and when its transaction began
/// (`recorded_at`). Quantiles per stage, in ms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stages {
    /// Publish -> ingest's round: the device's client, Mosquitto, the ingest's queue.
    pub to_ingest_ms: [f64; 3],
    /// Ingest's round -> the transaction that stored the event.
    pub ingest_round_ms: [f64; 3],
    /// Stored -> seen in the devices read model: commit, relay, JetStream, projection, and
    /// this benchmark's polling of the read model (every 50 ms).
    pub to_read_model_ms: [f64; 3],
}

/// p50, p99 and max of `values`, in ms.
fn quantiles(mut values: Vec<f64>) -> [f64; 3] {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        values
            .get(((values.len() as f64 * q) as usize).min(values.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    [at(0.5), at(0.99), at(1.0)]
}

/// Splits the phase's latencies at the instants its events recorded. `seen` holds, per
/// message, its seq and when it was published and seen, as offsets from `started` (which was
/// `started_wall` on the wall clock).
async fn stages(
    pool: &PgPool,
    started_wall: chrono::DateTime<chrono::Utc>,
    first_seq: u64,
    last_seq: u64,
    seen: &[(u64, Duration, Duration)],
) -> anyhow::Result<Stages> {
    let rows: Vec<(f64, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(
            "SELECT seq, received, recorded_at FROM (
                 SELECT jsonb_path_query_first(payload::jsonb,
                            '$.TelemetryRecorded.readings[*] ? (@.sensor == \"seq\").value')::text::float8 AS seq,
                        (payload::jsonb -> 'TelemetryRecorded' ->> 'received_at')::timestamptz AS received,
                        recorded_at
                   FROM events
                  WHERE aggregate_id LIKE 'bench-%' AND event_type = 'TelemetryRecorded'
                    AND recorded_at >= $1) AS e
              WHERE seq BETWEEN $2 AND $3",
        )
        .bind(started_wall - chrono::TimeDelta::seconds(5))
        .bind(first_seq as f64)
        .bind(last_seq as f64)
        .fetch_all(pool)
        .await?;
    let offset = |t: chrono::DateTime<chrono::Utc>| {
        (t - started_wall).num_microseconds().unwrap_or(0) as f64 / 1000.0
    };
    let stored: HashMap<u64, (f64, f64)> = rows
        .into_iter()
        .map(|(seq, received, recorded)| (seq as u64, (offset(received), offset(recorded))))
        .collect();
    let (mut to_ingest, mut round, mut to_model) = (Vec::new(), Vec::new(), Vec::new());
    for (seq, sent, seen) in seen {
        let Some(&(received, recorded)) = stored.get(seq) else {
            continue;
        };
        let (sent, seen) = (sent.as_secs_f64() * 1000.0, seen.as_secs_f64() * 1000.0);
        to_ingest.push(received - sent);
        round.push(recorded - received);
        to_model.push(seen - recorded);
    }
    Ok(Stages {
        to_ingest_ms: quantiles(to_ingest),
        ingest_round_ms: quantiles(round),
        to_read_model_ms: quantiles(to_model),
    })
}

impl Phase {
    /// The latency at quantile `q`, in ms.
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }

    fn p99(&self) -> Duration {
        Duration::from_secs_f64(self.quantile(0.99) / 1000.0)
    }

    fn summary(
        &self,
        held: bool,
        costs: Vec<crate::resources::ProcessCost>,
    ) -> crate::capacity::Step {
        crate::capacity::Step {
            offered_msg_s: self.rate,
            messages: self.published,
            sustained_msg_s: self.published as f64 / self.done_seconds,
            p50_ms: self.quantile(0.50),
            p95_ms: self.quantile(0.95),
            p99_ms: self.quantile(0.99),
            max_ms: self.quantile(1.0),
            held,
            processes: costs,
            stages: self.stages.clone(),
        }
    }

    fn print(&self, name: &str) {
        let at = |q: f64| self.quantile(q);
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
        if let Some(stages) = &self.stages {
            let show = |q: &[f64; 3]| format!("{:.0}/{:.0}/{:.0}", q[0], q[1], q[2]);
            println!(
                "  stages p50/p99/max ms: publish->ingest {}, ingest round {}, stored->read model {}",
                show(&stages.to_ingest_ms),
                show(&stages.ingest_round_ms),
                show(&stages.to_read_model_ms),
            );
        }
    }
}

/// Publishes `{"seq": n, "temperature": x}` round-robin over the devices at `rate` for the
/// configured time, while watching the devices read model for each device's latest `seq`.
async fn end_to_end(
    args: &IngestArgs,
    pool: &PgPool,
    rate: u64,
    sequence: &Arc<AtomicU64>,
    watched: &crate::resources::Watched,
    peak: &mut HashMap<String, f64>,
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
    let started_wall = chrono::Utc::now();
    let mut seen_at: Vec<(u64, Duration, Duration)> = Vec::with_capacity(total as usize);
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
    let mut sampled = Instant::now();
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
                        seen_at.push((s, at - started, now - started));
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
        if sampled.elapsed() >= Duration::from_secs(1) {
            crate::resources::keep_peak(peak, watched.memory());
            sampled = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_seconds = started.elapsed().as_secs_f64();
    let publish_end = publisher.await??;
    let stages = match stages(pool, started_wall, first_seq, last_seq, &seen_at).await {
        Ok(stages) => Some(stages),
        Err(error) => {
            eprintln!("cannot split the latency by stage: {error:#}");
            None
        }
    };
    Ok(Phase {
        stages,
        rate,
        published: total,
        publish_seconds: (publish_end - started).as_secs_f64(),
        done_seconds,
        latencies,
    })
}
