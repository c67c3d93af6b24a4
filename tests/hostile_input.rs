//! The hostile-input suite: `fleetlog up` (the real binary, every role in one process) against
//! real Postgres, nats-server and Mosquitto, fed what a hostile or broken client sends: numbers
//! and instants at the edges of their types, NUL characters, oversized documents and MQTT
//! messages, other tenants' positions. Every HTTP answer is a 4xx or a success, never a 5xx;
//! desired properties set three times reach the device as the third; ingest goes on after the
//! bad messages; afterwards every role still runs and `fleetlog replay --all --verify` is clean.
//!
//! Run it alone with `cargo test --test hostile_input` (the stack from `deploy/local/test.sh`).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{fleetlog, fleetlog_up, free_port};
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::{json, Value};

/// One HTTP/1.1 exchange: the status and the body (read until the connection closes, or only
/// the head for `text/event-stream`, which never closes by itself).
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&response);
        if text.contains("\r\n\r\n") && text.contains("text/event-stream") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status for {method} {path}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Whether `/ready` answers 200 (false while nothing listens yet).
fn is_ready(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
        && http(port, "GET", "/ready", None, None).0 == 200
}

/// The JSON of a body sent with `Transfer-Encoding: chunked` or plainly.
fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| {
        // Chunked: the JSON sits between the first chunk size line and the terminator.
        let start = body.find(['{', '[']).unwrap_or(0);
        let end = body.rfind(['}', ']']).map_or(body.len(), |end| end + 1);
        serde_json::from_str(&body[start..end]).unwrap_or(Value::Null)
    })
}

struct Platform {
    child: Child,
    port: u16,
    db: TestDatabase,
    broker: MosquittoServer,
    _nats: NatsServer,
}

impl Platform {
    async fn start() -> Self {
        let db = TestDatabase::create_empty().await;
        let nats = NatsServer::start();
        let broker = MosquittoServer::start();
        let port = free_port();
        let child = fleetlog_up(&db.url, &nats, &broker, port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut platform = Self {
            child,
            port,
            db,
            broker,
            _nats: nats,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_ready(port) {
            assert!(Instant::now() < deadline, "fleetlog up did not get ready");
            platform.assert_running();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        platform
    }

    fn assert_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "fleetlog up exited"
        );
    }

    fn create_admin(&self, tenant: &str, username: &str) -> String {
        let mut create = fleetlog(&self.db.url);
        create
            .args(["user", "create", "--tenant", tenant, "--username", username])
            .args(["--role", "admin", "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = create.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"a long enough password\n")
            .unwrap();
        assert!(child.wait().unwrap().success());
        let login =
            json!({"tenant": tenant, "username": username, "password": "a long enough password"});
        let (status, body) = http(
            self.port,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(&login.to_string()),
        );
        assert_eq!(status, 200, "{body}");
        json_of(&body)["access_token"].as_str().unwrap().to_string()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device subscribed to its desired document: the latest retained or live copy.
async fn desired_of(broker: &MosquittoServer, device: &str) -> tokio::sync::watch::Receiver<Value> {
    let options = broker.simulator_options(&format!("{device}-desired"));
    let (client, mut events) = AsyncClient::new(options, 100);
    let (latest, receiver) = tokio::sync::watch::channel(Value::Null);
    let topic = format!("devices/{device}/desired");
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let body = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                    let _ = latest.send(body);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    receiver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_4xx_stops_nothing_and_leaves_replay_clean() {
    let mut platform = Platform::start().await;
    let port = platform.port;
    let admin = platform.create_admin("acme", "ada");
    let stranger = platform.create_admin("globex", "gus");
    let (status, body) = http(
        port,
        "POST",
        "/api/v1/devices",
        Some(&admin),
        Some(r#"{"device_id":"d1","name":"Boiler","model":"thermo","tags":[]}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (_, body) = http(
        port,
        "POST",
        "/api/v1/devices",
        Some(&stranger),
        Some(r#"{"device_id":"g1","name":"Theirs","model":"thermo","tags":[]}"#),
    );
    let theirs = json_of(&body)["global_position"].as_i64().unwrap();

    let huge = "x".repeat(70 * 1024);
    let big_params = json!({"name": "configure", "params": {"blob": huge}}).to_string();
    let big_desired = json!({"blob": huge}).to_string();
    let max = u64::MAX;
    let hostile: Vec<(&str, String, Option<String>)> = vec![
        (
            "GET",
            "/api/v1/devices/d1/telemetry?to=-262143-01-01T00:00:00Z".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/devices/d1/telemetry?from=%2B262142-12-31T23:59:59Z".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/devices/d1/telemetry?to=0000-01-01T00:00:00Z".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/devices/d1?at=-262143-01-01T00:00:00Z".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/devices/d1?at=%2B262142-12-31T23:59:59.999999999Z".into(),
            None,
        ),
        (
            "GET",
            format!("/api/v1/devices/d1/telemetry?limit={max}"),
            None,
        ),
        (
            "GET",
            "/api/v1/devices/d1/telemetry?bucket_secs=-1".into(),
            None,
        ),
        (
            "GET",
            format!("/api/v1/devices/d1/events?after={max}"),
            None,
        ),
        ("GET", "/api/v1/devices?q=a%00b".into(), None),
        ("GET", format!("/api/v1/devices?min_position={max}"), None),
        ("GET", "/api/v1/devices?min_position=-1".into(), None),
        (
            "PUT",
            "/api/v1/devices/d1/desired".into(),
            Some(r#"{"note":"a\u0000b"}"#.into()),
        ),
        (
            "PUT",
            "/api/v1/devices/d1/desired".into(),
            Some(big_desired),
        ),
        (
            "POST",
            "/api/v1/devices/d1/commands".into(),
            Some(big_params),
        ),
        (
            "POST",
            "/api/v1/devices/d1/commands".into(),
            Some(format!(r#"{{"name":"reboot","ttl_secs":{max}}}"#)),
        ),
        (
            "POST",
            "/api/v1/devices/d1/commands".into(),
            Some(r#"{"name":"reboot","params":{"why":"\u0000"}}"#.into()),
        ),
        (
            "PATCH",
            "/api/v1/devices/d1".into(),
            Some(r#"{"name":"a\u0000b"}"#.into()),
        ),
        (
            "POST",
            "/api/v1/devices".into(),
            Some(format!(
                r#"{{"device_id":"{}","name":"n","model":"m","tags":[]}}"#,
                "d".repeat(65)
            )),
        ),
        (
            "POST",
            "/api/v1/rollouts".into(),
            Some(format!(
                r#"{{"firmware_id":"thermo@1.0.0","device_ids":["d1"],"window_secs":{max},"device_timeout_secs":{max}}}"#
            )),
        ),
        (
            "POST",
            "/api/v1/auth/refresh".into(),
            Some(r#"{"refresh_token":"u.s.\u0000"}"#.into()),
        ),
        ("GET", "/api/v1/firmware/thermo@1.0.0/download".into(), None),
        // NULs in path parameters and inside a cursor.
        ("GET", "/api/v1/rollouts/a%00b".into(), None),
        ("GET", "/api/v1/rollouts/a%00b/devices".into(), None),
        ("GET", "/api/v1/devices/d1/commands/a%00b".into(), None),
        (
            "POST",
            "/api/v1/rollouts/a%00b/pause".into(),
            Some(r#"{"reason":"x"}"#.into()),
        ),
        ("GET", "/api/v1/devices?cursor=6100620063".into(), None),
        // Before the device existed: nothing to show.
        (
            "GET",
            "/api/v1/devices/d1?at=1970-01-01T00:00:00Z".into(),
            None,
        ),
    ];
    for (method, path, body) in &hostile {
        let (status, answer) = http(port, method, path, Some(&admin), body.as_deref());
        assert!(
            (400..500).contains(&status),
            "{method} {path} answered {status}: {answer}"
        );
        assert!(
            answer.contains("\"status\""),
            "{method} {path}: not problem+json: {answer}"
        );
    }
    // Inputs at the edges that are valid get a success, never a 5xx.
    for path in [
        format!("/api/v1/devices?min_position={theirs}"),
        format!("/api/v1/stream?last_event_id={max}"),
        "/api/v1/devices/d1/telemetry?from=1970-01-01T00:00:00Z&to=9999-12-31T23:59:59Z".into(),
        "/api/v1/devices/d1?at=9999-12-31T23:59:59Z".into(),
    ] {
        let started = Instant::now();
        let (status, answer) = http(port, "GET", &path, Some(&admin), None);
        assert_eq!(status, 200, "GET {path}: {answer}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "GET {path} waited"
        );
    }

    // Desired properties set three times reach the device as the third.
    let mut desired = desired_of(&platform.broker, "d1").await;
    for mode in ["a", "b", "c"] {
        let (status, answer) = http(
            port,
            "PUT",
            "/api/v1/devices/d1/desired",
            Some(&admin),
            Some(&json!({ "mode": mode }).to_string()),
        );
        assert_eq!(status, 200, "{answer}");
    }
    tokio::time::timeout(
        Duration::from_secs(30),
        desired.wait_for(|document| document["desired"]["mode"] == "c"),
    )
    .await
    .expect("the third desired document reaches the device")
    .unwrap();
    assert_eq!(desired.borrow()["version"], 3);

    // Hostile MQTT: past the parser's limit, a NUL, garbage for an unknown device; then a
    // valid heartbeat still gets through.
    let mut options = platform.broker.simulator_options("hostile-device");
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 100);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let oversized = json!({"temperature": 1, "filler": huge}).to_string();
    for (topic, payload) in [
        ("devices/d1/data", oversized.into_bytes()),
        (
            "devices/d1/status",
            br#"{"note":"a\u0000b","battery":42}"#.to_vec(),
        ),
        ("devices/ghost/data", br#"{"temperature":1}"#.to_vec()),
        (
            "devices/d1/data",
            br#"{"temperature":1,"timestamp":"-262143-01-01T00:00:00Z"}"#.to_vec(),
        ),
        ("devices/d1/heartbeat", b"".to_vec()),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, answer) = http(port, "GET", "/api/v1/devices/d1", Some(&admin), None);
        if !json_of(&answer)["last_heartbeat"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the heartbeat never arrived: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every role still runs, and the read models equal a replay of the events.
    platform.assert_running();
    assert_eq!(http(port, "GET", "/health", None, None).0, 200);
    let nul_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE '%\\u0000%'")
            .fetch_one(&platform.db.pool)
            .await
            .unwrap();
    assert_eq!(nul_events, 0);
    let verify = fleetlog(&platform.db.url)
        .args(["replay", "--all", "--verify"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    platform.assert_running();
}
