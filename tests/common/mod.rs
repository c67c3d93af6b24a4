//! Helpers shared by the tests that run the built `fleetlog` binary.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The secret the tests sign access tokens with.
pub const SECRET: &str = "a test secret that is long enough to sign";

/// The built binary with a clean environment: only `PATH`, the database, the signing secret
/// and quiet logs.
pub fn fleetlog(database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleetlog"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FLEETLOG_DATABASE_URL", database_url)
        .env("FLEETLOG_JWT_SECRET", SECRET)
        .env("FLEETLOG_LOG", "warn");
    command
}

/// `fleetlog user create` of `username` in the tenant `acme` with `roles`, the password to come
/// on standard input (see [`run_with_stdin`]).
pub fn user_create(database_url: &str, username: &str, roles: &[&str]) -> Command {
    let mut command = fleetlog(database_url);
    command.args(["user", "create", "--tenant", "acme", "--username", username]);
    for role in roles {
        command.args(["--role", role]);
    }
    command.arg("--password-stdin");
    command
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The device credential key of the tests that run the binary.
pub const DEVICE_KEY: &str = "a test device credential key, long enough";

/// `fleetlog` on the given servers, each role as its own NATS user and broker account (so
/// their rights are the deployed ones), relaying every 100 ms; the subcommand is the caller's.
pub fn fleetlog_on(
    database_url: &str,
    nats: &fleetlog_testkit::NatsServer,
    broker: &fleetlog_testkit::MosquittoServer,
) -> Command {
    use fleetlog_broker::access::{DISPATCH_USERNAME, INGEST_USERNAME, SYNC_USERNAME};
    let mut command = fleetlog(database_url);
    command
        .env("FLEETLOG_NATS_URL", nats.anonymous_url())
        .envs(nats.password_variables())
        .env("FLEETLOG_MQTT_URL", broker.url())
        .env(
            "FLEETLOG_INGEST_MQTT_PASSWORD",
            broker.password(INGEST_USERNAME),
        )
        .env(
            "FLEETLOG_DISPATCH_MQTT_PASSWORD",
            broker.password(DISPATCH_USERNAME),
        )
        .env(
            "FLEETLOG_BROKER_SYNC_MQTT_PASSWORD",
            broker.password(SYNC_USERNAME),
        )
        .env("FLEETLOG_DEVICE_CREDENTIAL_KEY", DEVICE_KEY)
        .env("FLEETLOG_RELAY_POLL_INTERVAL_MS", "100");
    command
}

/// `fleetlog up` on the given servers (as [`fleetlog_on`]), serving HTTP on `port`; the broker
/// sync runs.
pub fn fleetlog_up(
    database_url: &str,
    nats: &fleetlog_testkit::NatsServer,
    broker: &fleetlog_testkit::MosquittoServer,
    port: u16,
) -> Command {
    let mut command = fleetlog_on(database_url, nats, broker);
    command
        .env("FLEETLOG_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .arg("up");
    command
}

/// Runs `command` with `stdin` as its standard input, capturing its output.
pub fn run_with_stdin(mut command: Command, stdin: &str) -> Output {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Sends SIGTERM to `child` and expects it to exit successfully within 30 s (its standard
/// error in the failure message otherwise).
pub async fn stop_cleanly(child: &mut std::process::Child, name: &str) {
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut log = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_string(&mut log).unwrap();
    }
    assert!(status.success(), "{name}: exit {status:?}: {log}");
}
