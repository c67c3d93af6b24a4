//! `fleetlog-bench faults`: the fault matrix. Every role runs in a process of its own, two of
//! each (one dispatcher, one broker sync), against the stack's Postgres, nats-server and
//! Mosquitto with their authentication. Under steady load (devices publishing telemetry at
//! QoS 1, an operator writing and reading over REST, a rollout per phase that the devices
//! answer) one fault follows another; for each, a row counts what was sent, acknowledged and
//! persisted, and how long the read models took to catch up. After the last, the run checks
//! the stream against the events table, that every command and every last desired document
//! reached its device, that every rollout completed, and `fleetlog replay --all --verify`.
//! Deployed by `deploy/bench/faults.sh`.

mod devices;
mod operator;
mod topology;
mod verify;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use secrecy::SecretString;
use serde::Serialize;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;

use devices::{Device, Ledger};
use operator::{Operator, WriteKind, Writes};
use topology::{IngestMode, Server, Topology};

#[derive(clap::Args)]
pub struct FaultsArgs {
    /// The `fleetlog` binary whose roles run.
    #[arg(long)]
    fleetlog: PathBuf,
    /// The stack script (`deploy/local/stack.sh`), which restarts the servers.
    #[arg(long)]
    stack: PathBuf,
    /// Where the roles' logs and data go.
    #[arg(long)]
    work_dir: PathBuf,
    /// The report as JSON.
    #[arg(long, env = "FAULTS_JSON")]
    json: PathBuf,
    /// Seconds of each phase (one fault each).
    #[arg(long, env = "FAULTS_SECONDS", default_value_t = 40,
          value_parser = clap::value_parser!(u64).range(6..=3600))]
    seconds: u64,
    /// Simulated devices, each its own MQTT connection.
    #[arg(long, env = "FAULTS_DEVICES", default_value_t = 50,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    devices: usize,
    /// Telemetry messages per second, over all devices.
    #[arg(long, env = "FAULTS_RATE", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate: u64,
    /// REST writes per second.
    #[arg(long, env = "FAULTS_WRITES", default_value_t = 6,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    writes: u64,
    /// How the two ingest instances subscribe: `shared` (one shared subscription, both
    /// serving) or `turns` (one plain subscription on one session, which they take turns on:
    /// the only way a broker that forgets shared subscriptions over a restart loses nothing).
    #[arg(long, env = "FAULTS_INGEST", value_enum, default_value_t = IngestMode::Shared)]
    ingest: IngestMode,
    /// The first of the two APIs' ports.
    #[arg(long, default_value_t = 18180)]
    http_port: u16,
    #[arg(long, env = "FLEETLOG_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[arg(long, env = "FLEETLOG_NATS_URL")]
    nats_url: String,
    #[arg(long, env = "FLEETLOG_ADMIN_NATS_PASSWORD", hide_env_values = true)]
    nats_admin_password: String,
    #[arg(long, env = "FLEETLOG_MQTT_URL")]
    mqtt_url: String,
}

/// A fault, injected a third into its phase.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The steady state, for comparison.
    None,
    /// `kill -9` of a role process, started again 2 s later as a supervisor would.
    Kill(&'static str),
    /// A server stopped and started again (Postgres: as a power cut, immediate shutdown).
    Restart(Server),
    /// The broker frozen (SIGSTOP) longer than every keep-alive, then thawed (SIGCONT).
    StallBroker,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::None => "none (steady state)".into(),
            Fault::Kill(role) => format!("kill -9 {role}"),
            Fault::Restart(Server::Postgres) => "crash-restart postgres".into(),
            Fault::Restart(server) => format!("restart {server:?}").to_lowercase(),
            Fault::StallBroker => format!("stall mosquitto {}s", STALL.as_secs()),
        }
    }
}

/// Longer than the 30 s keep-alive of the roles and the 10 s of the devices.
const STALL: Duration = Duration::from_secs(45);

const FAULTS: &[Fault] = &[
    Fault::None,
    Fault::Kill("ingest-1"),
    Fault::Kill("project-1"),
    Fault::Kill("api-1"),
    // relay-1 started first: it holds the relay lock, relay-2 waits.
    Fault::Kill("relay-1"),
    Fault::Kill("dispatch"),
    Fault::Kill("broker-sync"),
    Fault::Restart(Server::Nats),
    Fault::Restart(Server::Mosquitto),
    Fault::Restart(Server::Postgres),
    Fault::StallBroker,
];

#[derive(Serialize, Debug)]
struct Row {
    fault: String,
    sent: u64,
    acked: u64,
    persisted: u64,
    duplicates: u64,
    lost: u64,
    writes_acked: u64,
    writes_persisted: u64,
    recovery_s: Option<f64>,
    /// Role processes that stopped by themselves during the phase (started again).
    roles_exited: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    seconds_per_phase: u64,
    devices: usize,
    rate: u64,
    /// How the two ingest instances subscribed.
    ingest: &'static str,
    faults: Vec<Row>,
    stream: StreamSummary,
    commands_undelivered: usize,
    desired_undelivered: usize,
    rollouts: Vec<(String, String)>,
    reads_ok: usize,
    reads_failed: usize,
    device_sessions_lost: u64,
    replay_verify: &'static str,
}

#[derive(Serialize)]
struct StreamSummary {
    events: usize,
    messages: usize,
    missing: usize,
    duplicated: usize,
}

/// What a phase left behind to count once the run is over.
struct PhaseMark {
    fault: Fault,
    first_seq: u64,
    recovery: Option<f64>,
    roles_exited: Vec<String>,
}

pub async fn run(args: FaultsArgs) -> anyhow::Result<()> {
    fleetlog_broker::install_crypto_provider();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&args.database_url)
        .await
        .context("cannot connect to the database")?;
    let (mqtt_host, mqtt_port) = host_and_port(&args.mqtt_url)?;

    say("creating the operator");
    let password = "faults-operator-password-0123456789";
    create_user(&args.fleetlog, "fleet", "operator", password).await?;

    let mut topology = Topology::new(
        &args.fleetlog,
        &args.stack,
        &args.work_dir,
        args.http_port,
        args.ingest,
    )?;
    say("starting every role in its own process");
    topology.start().await?;
    let operator = Operator::login(&topology.api_urls, "fleet", "operator", password).await?;

    say(&format!(
        "registering and connecting {} devices",
        args.devices
    ));
    let ledger = Arc::new(Ledger::default());
    let stop_devices = Arc::new(AtomicBool::new(false));
    let mut devices = Vec::new();
    for n in 0..args.devices {
        let id = format!("sim-{n:05}");
        let token = operator.register(&id).await?;
        devices.push(Device::connect(
            &id,
            &token,
            &mqtt_host,
            mqtt_port,
            ledger.clone(),
            stop_devices.clone(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !devices.iter().all(|d| d.subscribed.load(Ordering::Relaxed)) {
        if Instant::now() > deadline {
            bail!("the devices did not all subscribe within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let device_ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let mut firmware = Vec::new();
    for n in 1..=FAULTS.len() {
        firmware.push(operator.release_firmware(&format!("2.{n}.0")).await?);
    }

    // The load.
    let phase = Arc::new(AtomicUsize::new(0));
    let stop_load = Arc::new(AtomicBool::new(false));
    let telemetry = tokio::spawn(publish_steadily(
        devices.clone(),
        args.rate,
        ledger.clone(),
        stop_load.clone(),
    ));
    let writes = Arc::new(Writes::default());
    let writer = tokio::spawn(operator.clone().write_steadily(
        device_ids.clone(),
        args.writes,
        phase.clone(),
        writes.clone(),
        stop_load.clone(),
    ));

    let phase_length = Duration::from_secs(args.seconds);
    let mut marks = Vec::new();
    let mut rollouts: Vec<String> = Vec::new();
    for (index, fault) in FAULTS.iter().copied().enumerate() {
        let started = Instant::now();
        phase.store(index, Ordering::Relaxed);
        let first_seq = ledger.next_seq.load(Ordering::Relaxed);
        say(&format!("phase {}: {}", index + 1, fault.name()));
        // A rollout for the phase, once the one before it let its devices go.
        let previous_done = match rollouts.last() {
            Some(id) => operator.rollout_status(id).await.as_deref() == Some("completed"),
            None => true,
        };
        if previous_done {
            let id = format!("rollout-{}", index + 1);
            if operator
                .start_rollout(&id, &firmware[index], &device_ids)
                .await?
            {
                rollouts.push(id);
            }
        }
        tokio::time::sleep(phase_length / 3).await;

        let injected = Instant::now();
        match fault {
            Fault::None => {}
            Fault::Kill(role) => {
                topology.kill(role).await?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                topology.restart(role).await?;
            }
            Fault::Restart(server) => {
                topology
                    .restart_server(server, matches!(server, Server::Postgres))
                    .await?
            }
            Fault::StallBroker => {
                topology.signal_server(Server::Mosquitto, "STOP").await?;
                tokio::time::sleep(STALL).await;
                topology.signal_server(Server::Mosquitto, "CONT").await?;
            }
        }
        let recovery = caught_up(&pool, &devices, Duration::from_secs(180))
            .await
            .map(|at| (at - injected).as_secs_f64());
        if let Some(rest) = (started + phase_length).checked_duration_since(Instant::now()) {
            tokio::time::sleep(rest).await;
        }
        let roles_exited = topology.revive_exited()?;
        if !roles_exited.is_empty() {
            say(&format!("  stopped by themselves: {roles_exited:?}"));
        }
        say(&format!(
            "  recovered in {}",
            recovery.map_or("never (180 s)".into(), |s| format!("{s:.1} s"))
        ));
        marks.push(PhaseMark {
            fault,
            first_seq,
            recovery,
            roles_exited,
        });
    }

    say("stopping the load; waiting for everything to arrive");
    stop_load.store(true, Ordering::Relaxed);
    telemetry.await?;
    writer.await?;
    let end_seq = ledger.next_seq.load(Ordering::Relaxed);
    // Whatever the clients still hold goes out; then the read models catch up with it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drained(&pool, &devices, Duration::from_secs(120)).await;
    let rollout_states = rollouts_finished(&operator, &rollouts, Duration::from_secs(180)).await;
    let (commands_undelivered, desired_undelivered) =
        delivered(&pool, &devices, Duration::from_secs(60)).await?;

    say("replay --all --verify");
    let replay = tokio::process::Command::new(&args.fleetlog)
        .args(["replay", "--all", "--verify"])
        .env("FLEETLOG_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    let replay_verify = if replay.success() { "clean" } else { "differs" };

    say("reading the stream against the events table");
    let admin = fleetlog_nats::accounts::NatsUser {
        name: fleetlog_nats::accounts::ADMIN.into(),
        password: SecretString::from(args.nats_admin_password.clone()),
    };
    let stream = verify::stream_against_table(&pool, &args.nats_url, &admin).await?;

    stop_devices.store(true, Ordering::Relaxed);
    topology.stop().await;

    let telemetry_events = verify::telemetry_events(&pool).await?;
    let write_events = verify::write_events(&pool).await?;
    let acked = ledger.acked.lock().unwrap().clone();
    let write_log = writes.log.lock().unwrap().clone();
    let mut rows = Vec::new();
    for (index, mark) in marks.iter().enumerate() {
        let last_seq = marks.get(index + 1).map_or(end_seq, |next| next.first_seq);
        let mut row = Row {
            fault: mark.fault.name(),
            sent: last_seq - mark.first_seq,
            acked: 0,
            persisted: 0,
            duplicates: 0,
            lost: 0,
            writes_acked: 0,
            writes_persisted: 0,
            recovery_s: mark.recovery.map(|s| (s * 10.0).round() / 10.0),
            roles_exited: mark.roles_exited.clone(),
        };
        for seq in mark.first_seq..last_seq {
            let was_acked = acked.contains(&seq);
            let events = telemetry_events.get(&seq).copied().unwrap_or(0);
            row.acked += u64::from(was_acked);
            row.persisted += u64::from(events > 0);
            row.duplicates += u64::from(events.saturating_sub(1));
            row.lost += u64::from(was_acked && events == 0);
        }
        for write in write_log.iter().filter(|w| w.phase == index) {
            let key = match &write.kind {
                WriteKind::Desired { device, value } => Some(format!("desired:{device}:{value}")),
                WriteKind::Command { id, .. } => id.as_ref().map(|id| format!("command:{id}")),
                WriteKind::Register { device } => Some(format!("register:{device}")),
            };
            let events = key.and_then(|k| write_events.get(&k).copied()).unwrap_or(0);
            row.writes_acked += u64::from(write.acked);
            row.writes_persisted += u64::from(events > 0);
            row.duplicates += u64::from(events.saturating_sub(1));
            row.lost += u64::from(write.acked && events == 0);
        }
        rows.push(row);
    }

    let report = Report {
        date: chrono::Utc::now().to_rfc3339(),
        machine: crate::machine(),
        seconds_per_phase: args.seconds,
        ingest: args.ingest.describe(),
        devices: args.devices,
        rate: args.rate,
        faults: rows,
        stream: StreamSummary {
            events: stream.events,
            messages: stream.messages,
            missing: stream.missing,
            duplicated: stream.duplicated,
        },
        commands_undelivered,
        desired_undelivered,
        rollouts: rollout_states,
        reads_ok: writes.reads_ok.load(Ordering::Relaxed),
        reads_failed: writes.reads_failed.load(Ordering::Relaxed),
        device_sessions_lost: ledger.sessions_lost.load(Ordering::Relaxed),
        replay_verify,
    };
    print_table(&report);
    let json = serde_json::to_string_pretty(&report)?;
    let mut file = tokio::fs::File::create(&args.json)
        .await
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    file.write_all(json.as_bytes()).await?;
    println!("report: {}", args.json.display());

    let mut failures = Vec::new();
    let lost: u64 = report.faults.iter().map(|r| r.lost).sum();
    let duplicates: u64 = report.faults.iter().map(|r| r.duplicates).sum();
    if lost > 0 {
        failures.push(format!("{lost} lost"));
    }
    if duplicates > 0 {
        failures.push(format!("{duplicates} duplicated"));
    }
    if !stream.clean() {
        failures.push(format!(
            "stream: {} events missing, {} more than once",
            stream.missing, stream.duplicated
        ));
    }
    if commands_undelivered > 0 || desired_undelivered > 0 {
        failures.push(format!(
            "{commands_undelivered} commands and {desired_undelivered} desired documents never reached their device"
        ));
    }
    if report
        .rollouts
        .iter()
        .any(|(_, status)| status != "completed")
    {
        failures.push("a rollout did not complete".into());
    }
    if replay_verify != "clean" {
        failures.push("replay --verify found differences".into());
    }
    if failures.is_empty() {
        println!("fault matrix: nothing lost, nothing duplicated, replay clean");
        Ok(())
    } else {
        bail!("fault matrix failed: {}", failures.join("; "))
    }
}

fn say(message: &str) {
    eprintln!("faults: {message}");
}

fn host_and_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("no port in {url}"))?;
    Ok((host.to_string(), port.parse()?))
}

async fn create_user(
    fleetlog: &PathBuf,
    tenant: &str,
    user: &str,
    password: &str,
) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(fleetlog)
        .args([
            "user",
            "create",
            "--tenant",
            tenant,
            "--username",
            user,
            "--role",
            "admin",
            "--password-stdin",
        ])
        .env("FLEETLOG_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    stdin.write_all(format!("{password}\n").as_bytes()).await?;
    drop(stdin);
    if !child.wait().await?.success() {
        bail!("fleetlog user create failed");
    }
    Ok(())
}

/// Publishes `rate` messages a second round-robin over the devices, in 10 ms ticks.
async fn publish_steadily(
    devices: Vec<Arc<Device>>,
    rate: u64,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut owed = 0.0;
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        owed += rate as f64 / 100.0;
        while owed >= 1.0 {
            owed -= 1.0;
            let seq = ledger.next_seq.fetch_add(1, Ordering::Relaxed);
            devices[next % devices.len()].publish_telemetry(seq).await;
            next += 1;
        }
    }
}

/// Each device's latest `seq` the devices read model shows.
async fn projected(pool: &PgPool) -> Option<HashMap<String, u64>> {
    let rows: Vec<(String, Option<f64>)> = sqlx::query_as(
        "SELECT device_id, (sensors -> 'seq' ->> 'value')::float8 FROM devices WHERE device_id LIKE 'sim-%'",
    )
    .fetch_all(pool)
    .await
    .ok()?;
    Some(
        rows.into_iter()
            .map(|(id, seq)| (id, seq.map_or(0, |s| s as u64)))
            .collect(),
    )
}

fn latest_acked(devices: &[Arc<Device>]) -> Vec<u64> {
    devices
        .iter()
        .map(|d| d.received.lock().unwrap().latest_acked)
        .collect()
}

/// When the platform is back to normal after a fault: every device had a message
/// acknowledged since, and everything acknowledged half a second before shows in the devices
/// read model. `None` if not within `timeout`. The steady-state row shows what this takes
/// without a fault.
async fn caught_up(pool: &PgPool, devices: &[Arc<Device>], timeout: Duration) -> Option<Instant> {
    let lifted = latest_acked(devices);
    let deadline = Instant::now() + timeout;
    let mut history: VecDeque<(Instant, Vec<u64>)> = VecDeque::new();
    while Instant::now() < deadline {
        let now = Instant::now();
        history.push_back((now, latest_acked(devices)));
        while history.len() > 1 && history[1].0 <= now - SETTLE {
            history.pop_front();
        }
        let (at, wanted) = &history[0];
        if *at <= now - SETTLE {
            let fresh = wanted.iter().zip(&lifted).all(|(w, l)| w > l);
            if fresh {
                if let Some(shown) = projected(pool).await {
                    let all = devices.iter().zip(wanted).all(|(device, wanted)| {
                        shown.get(&device.id).copied().unwrap_or(0) >= *wanted
                    });
                    if all {
                        return Some(Instant::now());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// How old an acknowledgement may be before the read model must show it.
const SETTLE: Duration = Duration::from_millis(500);

/// Waits (bounded) until the read model shows every device's latest acknowledged message.
async fn drained(pool: &PgPool, devices: &[Arc<Device>], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let wanted = latest_acked(devices);
        if let Some(shown) = projected(pool).await {
            if devices
                .iter()
                .zip(&wanted)
                .all(|(d, w)| shown.get(&d.id).copied().unwrap_or(0) >= *w)
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    say("the devices read model did not catch up within the drain time");
}

async fn rollouts_finished(
    operator: &Operator,
    rollouts: &[String],
    timeout: Duration,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut states = Vec::new();
        for id in rollouts {
            let status = operator
                .rollout_status(id)
                .await
                .unwrap_or_else(|| "unknown".into());
            states.push((id.clone(), status));
        }
        if states.iter().all(|(_, s)| s == "completed") || Instant::now() > deadline {
            return states;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits (bounded) until every command issued to a simulated device reached it, and each
/// device holds its last desired version; answers how many of each did not.
async fn delivered(
    pool: &PgPool,
    devices: &[Arc<Device>],
    timeout: Duration,
) -> anyhow::Result<(usize, usize)> {
    let deadline = Instant::now() + timeout;
    loop {
        let commands = verify::commands_issued(pool).await?;
        let desired = verify::last_desired_versions(pool).await?;
        let mut missing_commands = 0;
        let mut missing_desired = 0;
        for device in devices {
            let received = device.received.lock().unwrap();
            missing_commands += commands.get(&device.id).map_or(0, |ids| {
                ids.iter()
                    .filter(|id| !received.commands.contains(*id))
                    .count()
            });
            if desired
                .get(&device.id)
                .is_some_and(|v| received.desired_version != *v)
            {
                missing_desired += 1;
            }
        }
        if (missing_commands == 0 && missing_desired == 0) || Instant::now() > deadline {
            if missing_commands > 0 {
                let examples: Vec<String> = devices
                    .iter()
                    .flat_map(|device| {
                        let received = device.received.lock().unwrap();
                        commands
                            .get(&device.id)
                            .into_iter()
                            .flatten()
                            .filter(|id| !received.commands.contains(*id))
                            .map(|id| format!("{}/{id}", device.id))
                            .collect::<Vec<_>>()
                    })
                    .take(5)
                    .collect();
                for example in &examples {
                    let command = example.split('/').nth(1).unwrap_or_default();
                    let at: Option<(chrono::DateTime<chrono::Utc>,)> = sqlx::query_as(
                        "SELECT recorded_at FROM events WHERE event_type = 'CommandIssued'
                            AND payload -> 'CommandIssued' ->> 'command_id' = $1",
                    )
                    .bind(command)
                    .fetch_optional(pool)
                    .await?;
                    say(&format!(
                        "command never delivered: {example}, issued at {:?}",
                        at.map(|(at,)| at)
                    ));
                }
            }
            return Ok((missing_commands, missing_desired));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_table(report: &Report) {
    println!(
        "\nfault matrix, {} s per phase, {} devices at {} msg/s, {} ({})\ningest: {}",
        report.seconds_per_phase,
        report.devices,
        report.rate,
        report.machine,
        report.date,
        report.ingest
    );
    println!(
        "{:<28} {:>7} {:>7} {:>9} {:>5} {:>5} {:>7} {:>9} {:>9}",
        "fault", "sent", "acked", "persisted", "dups", "lost", "w.acked", "w.persist", "recovery"
    );
    for row in &report.faults {
        println!(
            "{:<28} {:>7} {:>7} {:>9} {:>5} {:>5} {:>7} {:>9} {:>9}{}",
            row.fault,
            row.sent,
            row.acked,
            row.persisted,
            row.duplicates,
            row.lost,
            row.writes_acked,
            row.writes_persisted,
            row.recovery_s
                .map_or("never".into(), |s| format!("{s:.1} s")),
            if row.roles_exited.is_empty() {
                String::new()
            } else {
                format!("  (stopped by themselves: {})", row.roles_exited.join(", "))
            }
        );
    }
    println!(
        "stream: {} events in the table, {} messages, {} missing, {} more than once",
        report.stream.events,
        report.stream.messages,
        report.stream.missing,
        report.stream.duplicated
    );
    println!(
        "commands not delivered: {}; last desired versions not delivered: {}; rollouts: {:?}",
        report.commands_undelivered, report.desired_undelivered, report.rollouts
    );
    println!(
        "reads with min_position: {} answered, {} failed; device sessions lost by the broker: {}",
        report.reads_ok, report.reads_failed, report.device_sessions_lost
    );
    println!("replay --all --verify: {}", report.replay_verify);
}
