//! The figures beside fleetlog's capacity, each measured on the same machine in the same run:
//! the minimal durable bridge (the ceiling of this design), replay against a `COPY` scan,
//! device queries against a plain SQL read, and memory with many devices connected; and the
//! report that puts them side by side.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use sqlx::PgPool;

use crate::ingest::IngestArgs;
use crate::resources::{ProcessCost, Watched};

/// One step of the capacity search.
#[derive(Serialize, Debug)]
pub struct Step {
    pub offered_msg_s: u64,
    pub messages: u64,
    pub sustained_msg_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 under 500 ms.
    pub held: bool,
    pub processes: Vec<ProcessCost>,
    /// The latency split by stage (p50, p99, max each).
    pub stages: Option<crate::ingest::Stages>,
}

#[derive(Serialize, Debug)]
pub struct Reads {
    pub concurrency: usize,
    pub api_requests_s: f64,
    pub api_p99_ms: f64,
    pub sql_reads_s: f64,
    pub sql_p99_ms: f64,
    /// CPU per read, per process ("bench": the load generator, HTTP client or SQL pool).
    pub api_processes: Vec<ProcessCost>,
    pub sql_processes: Vec<ProcessCost>,
}

impl Reads {
    pub fn print(&self) {
        println!(
            "GET /api/v1/devices/{{id}}: {:.0} req/s, p99 {:.1} ms; plain SQL read of the row: {:.0} reads/s, p99 {:.1} ms ({} at once)",
            self.api_requests_s, self.api_p99_ms, self.sql_reads_s, self.sql_p99_ms, self.concurrency
        );
        let costs = |processes: &[ProcessCost]| {
            processes
                .iter()
                .map(|c| format!("{} {:.0}", c.process, c.cpu_us_per_message))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  CPU us per read: API {}; SQL {}",
            costs(&self.api_processes),
            costs(&self.sql_processes)
        );
    }
}

#[derive(Serialize, Debug)]
pub struct Memory {
    pub process: String,
    pub rss_mb: f64,
    pub mb_per_1000_devices: f64,
}

#[derive(Serialize, Debug, Default)]
pub struct Ratios {
    pub capacity_to_bridge: f64,
    pub capacity_to_raw_broker: f64,
    pub replay_to_copy: f64,
    pub get_device_to_sql: f64,
}

#[derive(Serialize, Debug, Default)]
pub struct Report {
    pub date: String,
    pub machine: String,
    pub devices: usize,
    pub raw_broker_msg_s: f64,
    pub raw_insert_rows_s: f64,
    pub bridge_msg_s: f64,
    /// CPU per message of the bridge run, per process ("bench": the bridge and its publisher).
    pub bridge_processes: Vec<ProcessCost>,
    /// The highest offered rate whose p99 publish-to-projection latency stayed under 500 ms.
    pub capacity_msg_s: u64,
    pub steps: Vec<Step>,
    pub half: Option<Step>,
    pub replay_events_s: f64,
    pub copy_rows_s: f64,
    pub reads: Option<Reads>,
    pub memory: Vec<Memory>,
    pub ratios: Ratios,
}

impl Report {
    pub fn new(args: &IngestArgs) -> Self {
        Self {
            date: chrono::Utc::now().to_rfc3339(),
            machine: crate::machine(),
            devices: args.devices,
            ..Self::default()
        }
    }

    pub fn finish(&mut self) {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                (a / b * 100.0).round() / 100.0
            } else {
                0.0
            }
        };
        self.ratios = Ratios {
            capacity_to_bridge: ratio(self.capacity_msg_s as f64, self.bridge_msg_s),
            capacity_to_raw_broker: ratio(self.capacity_msg_s as f64, self.raw_broker_msg_s),
            replay_to_copy: ratio(self.replay_events_s, self.copy_rows_s),
            get_device_to_sql: self
                .reads
                .as_ref()
                .map_or(0.0, |r| ratio(r.api_requests_s, r.sql_reads_s)),
        };
    }

    pub fn print(&self) {
        println!("\ncapacity report, {} ({})", self.machine, self.date);
        println!(
            "{:>8} {:>9} {:>7} {:>7} {:>7} {:>5}  per process: CPU us/msg, peak RSS MB",
            "offered", "sustained", "p50 ms", "p99 ms", "max ms", "held"
        );
        for step in self.steps.iter().chain(self.half.iter()) {
            println!(
                "{:>8} {:>9.0} {:>7.0} {:>7.0} {:>7.0} {:>5}  {}",
                step.offered_msg_s,
                step.sustained_msg_s,
                step.p50_ms,
                step.p99_ms,
                step.max_ms,
                if step.held { "yes" } else { "no" },
                step.processes
                    .iter()
                    .map(|p| format!(
                        "{} {:.0}/{:.0}",
                        p.process, p.cpu_us_per_message, p.peak_rss_mb
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        println!(
            "capacity {} msg/s (p99 < 500 ms); minimal durable bridge {:.0} msg/s (ratio {:.2}); raw broker {:.0} msg/s (ratio {:.2})",
            self.capacity_msg_s,
            self.bridge_msg_s,
            self.ratios.capacity_to_bridge,
            self.raw_broker_msg_s,
            self.ratios.capacity_to_raw_broker
        );
        println!(
            "replay {:.0} events/s beside COPY {:.0} rows/s (ratio {:.2}); GET device / SQL ratio {:.2}",
            self.replay_events_s, self.copy_rows_s, self.ratios.replay_to_copy, self.ratios.get_device_to_sql
        );
    }
}

/// The least work fleetlog's guarantees need, as the ceiling of this design: QoS 1 messages
/// in over a persistent session with manual acks, one multi-row INSERT per batch of the same
/// event rows into a table shaped as `events` (same columns, keys and indexes), each message
/// acked after its batch committed. Messages published as fast as the broker takes them.
pub async fn durable_bridge(args: &IngestArgs, pool: &PgPool) -> anyhow::Result<f64> {
    sqlx::query("DROP TABLE IF EXISTS bench_events")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE bench_events (LIKE events INCLUDING ALL)")
        .execute(pool)
        .await?;
    let total = args.raw_messages;
    let mut options = MqttOptions::new("bench-bridge", &args.mqtt_host, args.mqtt_port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(1000);
    let (bridge, mut bridge_events) = AsyncClient::new(options, 10_000);
    bridge.subscribe("bridge/+/data", QoS::AtLeastOnce).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let notify = subscribed.clone();
    let poller = tokio::spawn(async move {
        loop {
            match bridge_events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => notify.notify_one(),
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if tx.send(publish).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    subscribed.notified().await;

    let writer = {
        let pool = pool.clone();
        let bridge = bridge.clone();
        tokio::spawn(async move {
            let mut sequences: HashMap<String, i64> = HashMap::new();
            let mut written = 0u64;
            while written < total {
                let Some(first) = rx.recv().await else {
                    bail!("the bridge's subscription ended");
                };
                let mut batch = vec![first];
                while batch.len() < 1000 {
                    match rx.try_recv() {
                        Ok(publish) => batch.push(publish),
                        Err(_) => break,
                    }
                }
                let mut ids = Vec::with_capacity(batch.len());
                let mut seqs = Vec::with_capacity(batch.len());
                let mut payloads = Vec::with_capacity(batch.len());
                for publish in &batch {
                    let device = publish
                        .topic
                        .split('/')
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    let sequence = sequences.entry(device.clone()).or_insert(0);
                    *sequence += 1;
                    seqs.push(*sequence);
                    ids.push(device);
                    payloads.push(String::from_utf8_lossy(&publish.payload).into_owned());
                }
                sqlx::query(
                    "INSERT INTO bench_events
                         (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                     SELECT 'device', i, s, 'TelemetryRecorded', '1.0',
                            jsonb_build_object('TelemetryRecorded', p::jsonb),
                            jsonb_build_object('actor', 'device:' || i, 'tenant', 'bench')
                       FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS t(i, s, p)",
                )
                .bind(&ids)
                .bind(&seqs)
                .bind(&payloads)
                .execute(&pool)
                .await?;
                for publish in &batch {
                    bridge.ack(publish).await?;
                }
                written += batch.len() as u64;
            }
            anyhow::Ok(Instant::now())
        })
    };

    let mut options = MqttOptions::new("bench-bridge-pub", &args.mqtt_host, args.mqtt_port);
    options.set_inflight(1000);
    let (publisher, mut pub_events) = AsyncClient::new(options, 10_000);
    let publishing = tokio::spawn(async move { while pub_events.poll().await.is_ok() {} });
    let started = Instant::now();
    for n in 0..total {
        let device = crate::ingest::device_name(n as usize % args.devices);
        let payload = format!(
            "{{\"seq\": {n}, \"temperature\": {}}}",
            20.0 + (n % 100) as f64 / 10.0
        );
        publisher
            .publish(
                format!("bridge/{device}/data"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await?;
    }
    let finished = tokio::time::timeout(Duration::from_secs(600), writer)
        .await
        .context("the bridge did not finish")???;
    publishing.abort();
    poller.abort();
    let _ = bridge.disconnect().await;
    sqlx::query("DROP TABLE bench_events").execute(pool).await?;
    Ok(total as f64 / (finished - started).as_secs_f64())
}

/// `fleetlog replay --all` over the events table, beside a `COPY` scan of the same rows in the
/// replay's order: events (rows) per second each.
pub async fn replay_against_copy(
    fleetlog: &std::path::Path,
    pool: &PgPool,
) -> anyhow::Result<(f64, f64)> {
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let started = Instant::now();
    let status = tokio::process::Command::new(fleetlog)
        .args(["replay", "--all"])
        .env("FLEETLOG_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("fleetlog replay --all failed");
    }
    let replay = events as f64 / started.elapsed().as_secs_f64();

    let mut connection = pool.acquire().await?;
    let started = Instant::now();
    let mut copy = connection
        .copy_out_raw(
            "COPY (SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                          payload, metadata, global_position, recorded_at
                     FROM events ORDER BY transaction_id, global_position) TO STDOUT",
        )
        .await?;
    while let Some(chunk) = copy.next().await {
        chunk?;
    }
    let copied = events as f64 / started.elapsed().as_secs_f64();
    Ok((replay, copied))
}

/// `concurrency` clients reading random devices for a few seconds, over the API and then as
/// plain SQL over a pool as large as the API's.
pub async fn device_reads(
    url: &str,
    login: &str,
    args: &IngestArgs,
    watched: &Watched,
) -> anyhow::Result<Reads> {
    let (user, password) = login
        .split_once(':')
        .context("--api-login takes user:password")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let body: serde_json::Value = http
        .post(format!("{url}/api/v1/auth/login"))
        .json(&serde_json::json!({"tenant": "bench", "username": user, "password": password}))
        .send()
        .await?
        .json()
        .await?;
    let token = body["access_token"]
        .as_str()
        .context("login refused")?
        .to_string();
    let concurrency = 16;
    let seconds = Duration::from_secs(10);

    let before = watched.cpu();
    let api = timed_reads(concurrency, seconds, args.devices, |device| {
        let (http, token, url) = (http.clone(), token.clone(), url.to_string());
        async move {
            let response = http
                .get(format!("{url}/api/v1/devices/{device}"))
                .bearer_auth(&token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("GET device answered {}", response.status());
            }
            response.bytes().await?;
            Ok(())
        }
    })
    .await?;

    let api_processes = watched.cost(&before, &watched.cpu(), &HashMap::new(), api.len() as u64);

    // The API's own pool settings (no ping before each use), as large as its pool.
    let sql_pool = fleetlog_commands::connect(&args.database_url, args.api_pool).await?;
    let before = watched.cpu();
    let sql = timed_reads(concurrency, seconds, args.devices, |device| {
        let pool = sql_pool.clone();
        async move {
            let row: Option<sqlx::postgres::PgRow> =
                sqlx::query("SELECT * FROM devices WHERE device_id = $1")
                    .bind(device)
                    .fetch_optional(&pool)
                    .await?;
            if row.is_none() {
                bail!("no device row");
            }
            Ok(())
        }
    })
    .await?;
    let sql_processes = watched.cost(&before, &watched.cpu(), &HashMap::new(), sql.len() as u64);
    let p99 = |latencies: &[Duration]| {
        let mut sorted = latencies.to_vec();
        sorted.sort();
        sorted
            .get((sorted.len() as f64 * 0.99) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(Reads {
        concurrency,
        api_requests_s: api.len() as f64 / seconds.as_secs_f64(),
        api_p99_ms: p99(&api),
        sql_reads_s: sql.len() as f64 / seconds.as_secs_f64(),
        sql_p99_ms: p99(&sql),
        api_processes,
        sql_processes,
    })
}

/// `concurrency` loops of `read` (of a device picked at random among `devices`) for
/// `seconds`: the latency of every read.
async fn timed_reads<F, Fut>(
    concurrency: usize,
    seconds: Duration,
    devices: usize,
    read: F,
) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let read = &read;
    let all = futures::future::try_join_all((0..concurrency).map(|n| async move {
        let mut latencies = Vec::new();
        let deadline = Instant::now() + seconds;
        let mut i = n;
        while Instant::now() < deadline {
            i = (i * 7919 + 13) % devices;
            let started = Instant::now();
            read(crate::ingest::device_name(i)).await?;
            latencies.push(started.elapsed());
        }
        anyhow::Ok(latencies)
    }))
    .await?;
    Ok(all.concat())
}

/// Registers and connects `connected_devices` devices, each its own MQTT connection that
/// reports once and then keeps its session alive, and reads what the watched processes hold.
pub async fn connected_memory(
    args: &IngestArgs,
    pool: &PgPool,
    watched: &Watched,
) -> anyhow::Result<Vec<Memory>> {
    let count = args.connected_devices;
    let before: HashMap<String, f64> = watched
        .processes
        .iter()
        .map(|(name, _, _)| (name.clone(), watched.resident(name)))
        .collect();
    crate::ingest::register_devices(pool, count).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(count);
    for n in 0..count {
        let id = crate::ingest::device_name(n);
        let mut options = MqttOptions::new(format!("{id}-mem"), &args.mqtt_host, args.mqtt_port);
        options.set_keep_alive(Duration::from_secs(60));
        let (client, mut events) = AsyncClient::new(options, 4);
        let (stop, connected) = (stop.clone(), connected.clone());
        let reporter = client.clone();
        tokio::spawn(async move {
            let mut reported = false;
            while !stop.load(Ordering::Relaxed) {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !reported => {
                        reported = true;
                        connected.fetch_add(1, Ordering::Relaxed);
                        let _ = reporter.try_publish(
                            format!("devices/{id}/heartbeat"),
                            QoS::AtLeastOnce,
                            false,
                            "{}",
                        );
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                }
            }
        });
        clients.push(client);
        if n % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (connected.load(Ordering::Relaxed) as usize) < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let reached = connected.load(Ordering::Relaxed) as usize;
    // Let the heartbeats go through ingest and the projections.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let memory = watched
        .processes
        .iter()
        .map(|(name, _, _)| {
            let rss = watched.resident(name);
            let grew = rss - before.get(name).copied().unwrap_or(0.0);
            Memory {
                process: name.clone(),
                rss_mb: rss,
                mb_per_1000_devices: (grew.max(0.0) / reached.max(1) as f64 * 1000.0 * 100.0)
                    .round()
                    / 100.0,
            }
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.try_disconnect();
    }
    if reached < count {
        bail!("only {reached} of {count} devices connected");
    }
    Ok(memory)
}
