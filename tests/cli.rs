//! The `fleetlog` binary as users run it: subcommands, exit codes, one-line errors, and `up`
//! serving until SIGTERM. Every test runs against a fresh database on a real Postgres.

mod common;

use fleetlog_projections::DeviceModels;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    fleetlog, fleetlog_on, fleetlog_up, free_port, run_with_stdin, stop_cleanly, user_create,
};
use fleetlog_testkit::{NatsServer, TestDatabase};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_one_line_error(output: &Output, expected: &str) {
    assert!(!output.status.success(), "expected failure: {output:?}");
    let stderr = stderr(output);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("fleetlog: "), "{stderr:?}");
    assert!(
        stderr.contains(expected),
        "{stderr:?} should mention {expected:?}"
    );
}

#[test]
fn help_lists_the_subcommands() {
    let output = fleetlog("postgres://unused")
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for subcommand in [
        "up", "api", "relay", "project", "migrate", "replay", "events", "user",
    ] {
        assert!(
            help.lines()
                .any(|line| line.trim_start().starts_with(subcommand)),
            "--help lists {subcommand}: {help}"
        );
    }
    let output = fleetlog("postgres://unused")
        .args(["user", "create", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("--password-stdin"), "{help}");
}

/// Every `FLEETLOG_` variable a subcommand reads (as its `--help` names it) is documented in
/// `.env.example`, so the example never falls behind the code.
#[test]
fn every_variable_the_binary_reads_is_in_the_env_example() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example"))
        .expect(".env.example at the repository root");
    let documented: std::collections::BTreeSet<&str> = example
        .lines()
        .filter_map(|line| {
            let line = line.trim_start_matches('#').trim_start();
            line.split_once('=').map(|(name, _)| name.trim())
        })
        .filter(|name| name.starts_with("FLEETLOG_"))
        .collect();
    let mut read = std::collections::BTreeSet::new();
    let subcommands = [
        vec![],
        vec!["up"],
        vec!["api"],
        vec!["ingest"],
        vec!["dispatch"],
        vec!["broker-sync"],
        vec!["relay"],
        vec!["project"],
        vec!["migrate"],
        vec!["replay"],
        vec!["events"],
        vec!["user"],
    ];
    for subcommand in subcommands {
        let output = fleetlog("postgres://unused")
            .args(&subcommand)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success(), "{subcommand:?} --help");
        let help = String::from_utf8(output.stdout).unwrap();
        for (_, rest) in help
            .match_indices("[env: ")
            .map(|(i, _)| help.split_at(i + 6))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            read.insert(name);
        }
    }
    assert!(read.len() > 20, "the help names the variables: {read:?}");
    let missing: Vec<&String> = read
        .iter()
        .filter(|name| !documented.contains(name.as_str()))
        .collect();
    assert!(missing.is_empty(), "not in .env.example: {missing:?}");
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_the_second_time() {
    let db = TestDatabase::create_empty().await;
    for _ in 0..2 {
        let output = fleetlog(&db.url).arg("migrate").output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, fleetlog_commands::MIGRATOR.iter().count());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn user_create_stores_only_a_password_hash() {
    let db = TestDatabase::create().await;
    let create = |username: &str| user_create(&db.url, username, &["admin", "viewer"]);
    let output = run_with_stdin(create("alice"), "s3cret-passw0rd\n");
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("created user alice"), "{stdout}");

    let (payload, metadata): (String, String) = sqlx::query_as(
        "SELECT payload::text, metadata::text FROM events
          WHERE aggregate_type = 'user' AND event_type = 'UserRegistered'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        !payload.contains("s3cret-passw0rd"),
        "no plaintext: {payload}"
    );
    let payload: serde_json::Value = serde_json::from_str(&payload).unwrap();
    let registered = &payload["UserRegistered"];
    assert_eq!(registered["username"], "alice");
    assert_eq!(registered["tenant"], "acme");
    assert_eq!(registered["roles"], serde_json::json!(["admin", "viewer"]));
    assert!(registered["password_hash"]
        .as_str()
        .unwrap()
        .starts_with("$argon2id$"));
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["actor"], "cli");

    let again = run_with_stdin(create("ALICE"), "another-passw0rd\n");
    assert_one_line_error(&again, "already taken");

    let short = run_with_stdin(create("bob"), "short\n");
    assert_one_line_error(&short, "at least 8 characters");

    let mut without_flag = fleetlog(&db.url);
    without_flag.args([
        "user",
        "create",
        "--tenant",
        "acme",
        "--username",
        "carol",
        "--role",
        "admin",
    ]);
    assert_one_line_error(
        &run_with_stdin(without_flag, "s3cret-passw0rd\n"),
        "--password-stdin",
    );

    let mut bad_role = create("dave");
    bad_role.args(["--role", "root"]);
    let output = run_with_stdin(bad_role, "s3cret-passw0rd\n");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("root"), "{}", stderr(&output));
}

#[tokio::test]
async fn an_unreachable_database_is_a_one_line_error() {
    let output = fleetlog("postgres://fleetlog:x@127.0.0.1:1/fleetlog")
        .arg("migrate")
        .output()
        .unwrap();
    assert_one_line_error(&output, "cannot connect to Postgres");
}

/// Settings outside their documented ranges are refused at start, in one line, before
/// anything runs, by the subcommand that reads them: a token lifetime past what chrono can
/// add, a liveness timeout of zero, zero shards or connections (never silently made one).
#[test]
fn settings_outside_their_ranges_are_one_line_errors() {
    for (subcommand, variable, value, expected) in [
        (
            "project",
            "FLEETLOG_TELEMETRY_RETENTION_DAYS",
            "36501",
            "telemetry-retention-days",
        ),
        (
            "api",
            "FLEETLOG_BROKER_AUTH_TOKEN",
            "too short",
            "broker-auth-token",
        ),
        (
            "up",
            "FLEETLOG_TELEMETRY_RETENTION_DAYS",
            "-1",
            "telemetry-retention-days",
        ),
        (
            "api",
            "FLEETLOG_ACCESS_TOKEN_TTL_SECS",
            "18446744073709551615",
            "access-token-ttl-secs",
        ),
        (
            "up",
            "FLEETLOG_ACCESS_TOKEN_TTL_SECS",
            "0",
            "access-token-ttl-secs",
        ),
        (
            "api",
            "FLEETLOG_REFRESH_TOKEN_TTL_SECS",
            "-1",
            "refresh-token-ttl-secs",
        ),
        (
            "project",
            "FLEETLOG_LIVENESS_TIMEOUT_SECS",
            "0",
            "liveness-timeout-secs",
        ),
        (
            "relay",
            "FLEETLOG_RELAY_POLL_INTERVAL_MS",
            "9",
            "relay-poll-interval-ms",
        ),
        (
            "relay",
            "FLEETLOG_RELAY_BATCH_SIZE",
            "0",
            "relay-batch-size",
        ),
        (
            "migrate",
            "FLEETLOG_SHUTDOWN_TIMEOUT_SECS",
            "ten",
            "shutdown-timeout-secs",
        ),
        (
            "migrate",
            "FLEETLOG_DATABASE_MAX_CONNECTIONS",
            "0",
            "database-max-connections",
        ),
        ("ingest", "FLEETLOG_INGEST_SHARDS", "0", "ingest-shards"),
        ("up", "FLEETLOG_INGEST_MAX_BATCH", "0", "ingest-max-batch"),
        (
            "ingest",
            "FLEETLOG_INGEST_INFLIGHT",
            "65536",
            "ingest-inflight",
        ),
        (
            "dispatch",
            "FLEETLOG_COMMAND_MAX_ATTEMPTS",
            "0",
            "command-max-attempts",
        ),
        (
            "api",
            "FLEETLOG_FIRMWARE_MAX_BYTES",
            "0",
            "firmware-max-bytes",
        ),
    ] {
        let output = fleetlog("postgres://unused")
            .env(variable, value)
            .arg(subcommand)
            .output()
            .unwrap();
        assert_one_line_error(&output, expected);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{subcommand} with {variable}={value}"
        );
    }
}

/// Trace export, when a collector is named, is checked before anything starts: a protocol
/// fleetlog does not speak or an endpoint that is not an HTTP URL is a one-line error, exit 2.
#[test]
fn trace_export_settings_are_checked_at_start() {
    let collector = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (subcommand, settings, expected) in [
        (
            "relay",
            [collector, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            "exports OTLP over HTTP",
        ),
        (
            "ingest",
            [collector, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift")],
            "expected http/protobuf or http/json",
        ),
        (
            "api",
            [collector, ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
            "expected an http:// or https:// URL",
        ),
        (
            "project",
            [
                collector,
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://exa mple/"),
            ],
            "is not a URL",
        ),
    ] {
        let output = fleetlog("postgres://unused")
            .envs(settings)
            .arg(subcommand)
            .output()
            .unwrap();
        assert_one_line_error(&output, expected);
        assert_eq!(output.status.code(), Some(2), "{subcommand}: {settings:?}");
    }
    // Switched off, the same settings are not even read.
    let output = fleetlog("postgres://unused")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_SDK_DISABLED", "true")
        .envs([collector])
        .arg("migrate")
        .output()
        .unwrap();
    assert_one_line_error(&output, "cannot connect to Postgres");
}

/// Creates the viewer `username` in the tenant `acme` with `fleetlog user create`: one event.
fn create_viewer(database_url: &str, username: &str) {
    let create = user_create(database_url, username, &["viewer"]);
    assert!(run_with_stdin(create, "s3cret-passw0rd\n").status.success());
}

/// A minimal HTTP/1.1 GET, enough to probe `/health` without an HTTP client dependency.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[tokio::test]
async fn up_migrates_serves_relays_and_stops_cleanly_on_sigterm() {
    let db = TestDatabase::create_empty().await;
    let nats = NatsServer::start();
    let broker = fleetlog_testkit::MosquittoServer::start();
    let port = free_port();
    let mut child = fleetlog_up(&db.url, &nats, &broker, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        // Ready once Postgres and NATS are both connected; 503 until then.
        if let Some(response) = http_get(port, "/ready").filter(|r| r.starts_with("HTTP/1.1 200")) {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "fleetlog up did not serve in time"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "fleetlog up exited early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .expect("up applied the migrations");
    assert_eq!(events, 0);

    // An event written while `up` runs reaches the JetStream stream through its relay.
    create_viewer(&db.url, "erin");
    let jetstream = async_nats::jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let relayed = match jetstream.get_stream(fleetlog_nats::STREAM_NAME).await {
            Ok(mut stream) => stream.info().await.unwrap().state.messages,
            Err(_) => 0,
        };
        if relayed == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the event never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The projection role runs too: its durable consumers exist on the stream (the device
    // models have none: the write side keeps them inline).
    let stream = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .unwrap();
    for projection in ["firmware", "rollouts", "users"] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(projection)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "no {projection} consumer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The users projection applied the event, and /metrics says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(port, "/metrics").unwrap_or_default();
        // Request durations are histograms (buckets), not summaries.
        if metrics
            .contains(r#"fleetlog_projection_events_total{projection="users",outcome="applied"} 1"#)
            && metrics.contains("fleetlog_http_request_duration_seconds_bucket")
        {
            let undescribed = metrics_without_help(&metrics);
            assert!(undescribed.is_empty(), "no help text: {undescribed:?}");
            assert_eq!(promtool_findings(&metrics), "");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no projection metrics: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop_cleanly(&mut child, "fleetlog up").await;
    assert!(
        http_get(port, "/health").is_none(),
        "the port is closed after shutdown"
    );
}

/// `replay --verify`, `replay`, and `events` against a model kept by live workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_verify_and_events_commands() {
    use fleetlog_commands::{CommandBus, CommandMetadata, StoreSettings};
    use fleetlog_domain::device::DeviceCommand;
    use fleetlog_domain::firmware::{FirmwareCommand, FirmwareId};
    use fleetlog_domain::{DeviceId, TenantId, UserId};
    use fleetlog_projections::WorkerSettings;

    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let bus = CommandBus::new(
        db.pool.clone(),
        StoreSettings::default(),
        DeviceModels::inline(),
    );
    let metadata = CommandMetadata::new("test");
    for id in ["d1", "d2"] {
        let register = DeviceCommand::Register {
            device_id: DeviceId::parse(id).unwrap(),
            tenant: TenantId::parse("acme").unwrap(),
            owner: UserId::parse("u-1").unwrap(),
            name: format!("Device {id}"),
            model: "thermo".into(),
            tags: vec![],
            at: chrono::Utc::now(),
            credentials: None,
        };
        bus.devices()
            .execute(id, register, &metadata)
            .await
            .unwrap();
        let heartbeat = DeviceCommand::Heartbeat {
            firmware_version: None,
            delivery: None,
            device_time: None,
            received_at: chrono::Utc::now(),
        };
        bus.devices()
            .execute(id, heartbeat, &metadata)
            .await
            .unwrap();
    }
    let firmware = FirmwareCommand::Register {
        firmware_id: FirmwareId::parse("thermo@1.0.0").unwrap(),
        tenant: TenantId::parse("acme").unwrap(),
        sha256: "ab".repeat(32),
        size_bytes: 10,
        storage_key: "firmware/thermo@1.0.0".into(),
        compatible_models: vec![],
        notes: String::new(),
        at: chrono::Utc::now(),
    };
    bus.firmware()
        .execute("thermo@1.0.0", firmware, &metadata)
        .await
        .unwrap();
    let mut create = fleetlog(&db.url);
    create.args([
        "user",
        "create",
        "--tenant",
        "acme",
        "--username",
        "frank",
        "--role",
        "admin",
        "--password-stdin",
    ]);
    assert!(run_with_stdin(create, "s3cret-passw0rd\n").status.success());

    let shutdown = tokio_util::sync::CancellationToken::new();
    let js = async_nats::jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap());
    let relay_settings = fleetlog_relay::RelaySettings {
        poll_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        fleetlog_relay::Relay::new(db.pool.clone(), js.client(), relay_settings)
            .run(shutdown.clone()),
    );
    tasks.spawn(fleetlog_projections::run_all(
        db.pool.clone(),
        js.clone(),
        WorkerSettings::default(),
        shutdown.clone(),
    ));

    let verify = || {
        fleetlog(&db.url)
            .args(["replay", "--all", "--verify", "--patience-secs", "30"])
            .output()
            .unwrap()
    };
    let output = verify();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        stdout.contains("devices: the live model equals the replay"),
        "{stdout}"
    );
    assert!(
        stdout.contains("telemetry: the live model equals the replay"),
        "{stdout}"
    );

    sqlx::query("UPDATE devices SET name = 'tampered' WHERE device_id = 'd2'")
        .execute(&db.pool)
        .await
        .unwrap();
    let output = verify();
    assert_one_line_error(&output, "differs from the live one: devices (2 rows)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        stdout.contains("devices: only in live:") && stdout.contains("tampered"),
        "{stdout}"
    );

    let output = fleetlog(&db.url)
        .args(["replay", "devices"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains("devices: replayed 6 events"), "{stdout}");
    assert!(verify().status.success());

    let output = fleetlog(&db.url)
        .args(["replay", "gadgets"])
        .output()
        .unwrap();
    assert_one_line_error(&output, "unknown projection \"gadgets\"");

    let output = fleetlog(&db.url)
        .args(["events", "list", "--aggregate", "device:d1"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    let types: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        types,
        ["DeviceRegistered", "DeviceCameOnline", "HeartbeatReceived"],
        "{listing}"
    );
    let output = fleetlog(&db.url)
        .args(["events", "list", "--aggregate", "device"])
        .output()
        .unwrap();
    assert_one_line_error(&output, "TYPE:ID");

    let output = fleetlog(&db.url)
        .args(["events", "stats"])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stats.contains("device     HeartbeatReceived"), "{stats}");
    assert!(stats.contains("user       UserRegistered"), "{stats}");

    shutdown.cancel();
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}

#[test]
fn the_api_needs_a_signing_secret() {
    let output = fleetlog("postgres://unused")
        .env_remove("FLEETLOG_JWT_SECRET")
        .arg("api")
        .output()
        .unwrap();
    assert_one_line_error(&output, "FLEETLOG_JWT_SECRET is not set");
    let output = fleetlog("postgres://unused")
        .env("FLEETLOG_JWT_SECRET", "short")
        .arg("up")
        .output()
        .unwrap();
    assert_one_line_error(&output, "at least 32 characters");
}

/// The `# TYPE` lines of a Prometheus text page whose metric has no `# HELP` line.
fn metrics_without_help(page: &str) -> Vec<String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| !page.contains(&format!("# HELP {name} ")))
        .map(str::to_string)
        .collect()
}

/// What `promtool check metrics` (Prometheus's own linter: help text, naming conventions)
/// says of the body of a `/metrics` response; empty when it finds nothing. `deploy/local/test.sh`
/// installs promtool (the distribution's `prometheus` package).
fn promtool_findings(response: &str) -> String {
    let body = response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (the `prometheus` package; deploy/local/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        findings.trim().to_string()
    } else {
        format!("exit {:?}: {findings}", output.status.code())
    }
}

/// Each role run alone serves `/metrics` (every metric with help text) and `/health` on
/// `FLEETLOG_METRICS_ADDR`, and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_alone_serves_metrics_with_help_and_health() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let broker = fleetlog_testkit::MosquittoServer::start();
    let roles = ["relay", "project", "ingest", "dispatch", "broker-sync"];
    let mut running = Vec::new();
    for role in roles {
        let port = free_port();
        let mut command = fleetlog_on(&db.url, &nats, &broker);
        command
            .env("FLEETLOG_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .arg(role)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        running.push((role, port, command.spawn().unwrap()));
    }

    // An event for the projection role to apply (through the relay), so a role-specific
    // metric shows up beside the pool's.
    create_viewer(&db.url, "fay");

    for (role, port, child) in &mut running {
        let expected: &[&str] = match *role {
            "project" => &[
                r#"fleetlog_projection_events_total{projection="users",outcome="applied"} 1"#,
                r#"fleetlog_rollouts{status="paused"} 0"#,
                r#"fleetlog_rollout_devices{status="sent"} 0"#,
                r#"fleetlog_projection_dead_letters{projection="users"} 0"#,
            ],
            "ingest" => &["fleetlog_ingest_connected 1"],
            "dispatch" => &["fleetlog_dispatch_connected 1"],
            // The user's event published, and nothing left behind.
            "relay" => &[
                "fleetlog_relay_active 1",
                "fleetlog_relay_published_events_total 1",
                "fleetlog_relay_unpublished_events 0",
            ],
            _ => &[r#"fleetlog_db_pool_connections{state="idle"}"#],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let page = loop {
            let page = http_get(*port, "/metrics").unwrap_or_default();
            if expected.iter().all(|metric| page.contains(metric))
                && page.contains("fleetlog_db_pool_max_connections")
            {
                break page;
            }
            assert!(child.try_wait().unwrap().is_none(), "{role} exited early");
            assert!(
                Instant::now() < deadline,
                "{role}: not all of {expected:?} in /metrics: {page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(page.starts_with("HTTP/1.1 200"), "{role}: {page}");
        assert_eq!(metrics_without_help(&page), Vec::<String>::new(), "{role}");
        assert_eq!(promtool_findings(&page), "", "{role}");
        let health = http_get(*port, "/health").unwrap_or_default();
        assert!(health.starts_with("HTTP/1.1 200"), "{role}: {health}");
        assert!(health.contains(r#"{"status":"ok"}"#), "{role}: {health}");
    }

    for (role, port, mut child) in running {
        stop_cleanly(&mut child, role).await;
        assert!(http_get(port, "/health").is_none(), "{role}: port closed");
    }
}

/// The operations guide names only commands the binary has: every `fleetlog <subcommand>`
/// (and `fleetlog events|user <action>`) in it is in the `--help` of the binary, and every
/// `deploy/` file it points to exists.
#[test]
fn the_operations_guide_names_only_real_commands_and_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let help = |args: &[&str]| {
        let output = fleetlog("postgres://unused")
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let commands = help(&[]);
    let mut checked = 0;
    for (start, _) in guide.match_indices("`fleetlog ") {
        let quoted = &guide[start + 1..];
        let quoted = &quoted[..quoted.find('`').unwrap()];
        let words: Vec<&str> = quoted.split_whitespace().collect();
        let subcommand = words[1];
        assert!(
            commands.contains(&format!("\n  {subcommand} ")),
            "the guide names `{quoted}`; fleetlog has no {subcommand}"
        );
        if let ("events" | "user", Some(action)) = (subcommand, words.get(2)) {
            assert!(
                help(&[subcommand]).contains(&format!("\n  {action} ")),
                "the guide names `{quoted}`; fleetlog {subcommand} has no {action}"
            );
        }
        // The subcommand path: the words before the first option or placeholder.
        let path: Vec<&str> = words[1..]
            .iter()
            .take_while(|word| !word.starts_with('-') && !word.starts_with('<'))
            .copied()
            .collect();
        for flag in words.iter().filter(|word| word.starts_with("--")) {
            assert!(
                help(&path).contains(flag),
                "the guide names `{quoted}`; {flag} is not an option of fleetlog {}",
                path.join(" ")
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "{checked}");
    for (start, _) in guide.match_indices("`deploy/") {
        let path = &guide[start + 1..];
        let path = &path[..path.find('`').unwrap()];
        assert!(root.join(path).exists(), "the guide points to {path}");
    }
}
