//! Traces end to end, every role in its own process (api, relay, project, dispatch, ingest,
//! broker-sync), exporting over OTLP/HTTP to a collector the test runs itself: a request that
//! carries a W3C `traceparent`, and an MQTT message that carries none, each give one trace
//! through the command, the append, the stored event's metadata, the relay's publish and
//! JetStream to the projection or the dispatcher that handled it.

mod common;

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use common::{fleetlog, fleetlog_on, free_port, run_with_stdin, stop_cleanly, user_create};
use fleetlog_testkit::{MosquittoServer, NatsServer, TestDatabase};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use rumqttc::{AsyncClient, QoS};
use serde_json::{json, Value};

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    /// The spans it links to (trace id, span id): a batch's span links the traces it joined
    /// besides its parent's.
    links: Vec<(String, String)>,
}

impl Span {
    /// Whether it continues `parent` (as its child, or by a link).
    fn follows(&self, parent: &Span) -> bool {
        (self.trace_id == parent.trace_id && self.parent_span_id == parent.span_id)
            || self
                .links
                .contains(&(parent.trace_id.clone(), parent.span_id.clone()))
    }
}

/// A minimal OTLP/HTTP collector: `POST /v1/traces` with a protobuf body, kept in memory.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    /// Serves on a free loopback port; answers its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of `trace_id`, waiting until `done` holds for them.
    async fn trace(&self, trace_id: &str, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|span| span.trace_id == trace_id)
                .collect();
            if done(&spans) {
                return spans;
            }
            if Instant::now() >= deadline {
                let everything: Vec<String> = self
                    .spans()
                    .iter()
                    .map(|s| {
                        format!(
                            "{} {} trace={} span={} parent={}",
                            s.service, s.name, s.trace_id, s.span_id, s.parent_span_id
                        )
                    })
                    .collect();
                panic!("{what}: the trace is incomplete: {spans:#?}\nall spans: {everything:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn receive(
    State(collector): State<Collector>,
    body: Bytes,
) -> impl axum::response::IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut spans = collector.spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|resource| text_of(&resource.attributes, "service.name"))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                spans.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), text(kv)?)))
                        .collect(),
                    links: span
                        .links
                        .iter()
                        .map(|link| (hex::encode(&link.trace_id), hex::encode(&link.span_id)))
                        .collect(),
                });
            }
        }
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

fn text(kv: &KeyValue) -> Option<String> {
    match kv.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        AnyValue::BoolValue(flag) => Some(flag.to_string()),
        AnyValue::DoubleValue(number) => Some(number.to_string()),
        _ => None,
    }
}

fn text_of(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(text)
}

/// The one span of `spans` named `name` from `service`.
fn one<'a>(spans: &'a [Span], service: &str, name: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|span| span.service == service && span.name == name)
        .collect();
    assert_eq!(found.len(), 1, "one {name} span of {service}: {spans:#?}");
    found[0]
}

/// The relay's publish of the event of type `event_type` in `spans`.
fn publish_of<'a>(spans: &'a [Span], event_type: &str) -> &'a Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|span| {
            span.service == "fleetlog-relay"
                && span.attributes.get("event_type").map(String::as_str) == Some(event_type)
        })
        .collect();
    assert_eq!(found.len(), 1, "one publish of {event_type}: {spans:#?}");
    found[0]
}

fn has(spans: &[Span], service: &str, name: &str) -> bool {
    spans
        .iter()
        .any(|span| span.service == service && span.name == name)
}

/// Asserts that `child` is `parent`'s child.
fn child_of(child: &Span, parent: &Span) {
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{} ({}) is a child of {} ({})",
        child.name, child.service, parent.name, parent.service
    );
}

/// The role processes; a test that fails midway kills them rather than leave them running.
struct Roles(Vec<(&'static str, Child)>);

impl Drop for Roles {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_an_mqtt_message_are_each_one_trace_across_the_roles() {
    let db = TestDatabase::create().await;
    let nats = NatsServer::start();
    let broker = MosquittoServer::start();
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let data_dir =
        std::env::temp_dir().join(format!("fleetlog-traces-{}", uuid::Uuid::new_v4().simple()));
    let api_port = free_port();

    let mut roles = Roles(Vec::new());
    for role in [
        "api",
        "relay",
        "project",
        "dispatch",
        "ingest",
        "broker-sync",
    ] {
        let mut command = fleetlog_on(&db.url, &nats, &broker);
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("FLEETLOG_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env("FLEETLOG_DATA_DIR", &data_dir)
            .arg(role)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        roles.0.push((role, command.spawn().unwrap()));
    }
    let create = user_create(&db.url, "ada", &["admin"]);
    assert!(run_with_stdin(create, "s3cret-passw0rd\n").status.success());

    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{api_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let token = loop {
        let login = http
            .post(format!("{api}/api/v1/auth/login"))
            .json(&json!({"tenant": "acme", "username": "ada", "password": "s3cret-passw0rd"}))
            .send()
            .await;
        if let Ok(response) = login {
            if response.status() == StatusCode::OK {
                let body: Value = response.json().await.unwrap();
                break body["access_token"].as_str().unwrap().to_string();
            }
        }
        for (role, child) in &mut roles.0 {
            assert!(child.try_wait().unwrap().is_none(), "{role} exited early");
        }
        assert!(Instant::now() < deadline, "the API never logged ada in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let post = |path: &str, body: Value, traceparent: Option<&str>| {
        let mut request = http
            .post(format!("{api}{path}"))
            .bearer_auth(&token)
            .json(&body);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };

    // A user created by a client that traces: the API continues the client's trace, and the
    // users projection, in another process, applies the event within it.
    let client_span = "00f067aa0ba902b7";
    let user_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let created = post(
        "/api/v1/users",
        json!({"username": "grace", "password": "an0ther-passw0rd", "roles": ["viewer"]}),
        Some(&format!("00-{user_trace}-{client_span}-01")),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let user_id = created.json::<Value>().await.unwrap()["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    let spans = collector
        .trace(user_trace, "user created", |spans| {
            has(spans, "fleetlog-api", "POST /api/v1/users")
                && has(spans, "fleetlog-api", "append")
                && has(spans, "fleetlog-relay", "publish")
        })
        .await;
    let request = one(&spans, "fleetlog-api", "POST /api/v1/users");
    assert_eq!(request.parent_span_id, client_span);
    assert_eq!(request.attributes["http.route"], "/api/v1/users");
    let command = one(&spans, "fleetlog-api", "command");
    child_of(command, request);
    assert_eq!(command.attributes["aggregate_type"], "user");
    child_of(one(&spans, "fleetlog-api", "append"), command);
    let publish = publish_of(&spans, "UserRegistered");
    child_of(publish, command);
    // The users projection applied it: in this trace, or, when it took the event in one batch
    // with events of other traces (the admin's login), linked to it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let project = loop {
        let applied = collector.spans().into_iter().find(|span| {
            span.service == "fleetlog-project" && span.name == "project" && span.follows(publish)
        });
        if let Some(project) = applied {
            break project;
        }
        assert!(
            Instant::now() < deadline,
            "no project span follows the publish: {:#?}",
            collector.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(project.attributes["projection"], "users");
    // The stored event names the command's span as its trace parent.
    let stored: String = sqlx::query_scalar(
        "SELECT metadata->>'traceparent' FROM events
          WHERE event_type = 'UserRegistered' AND payload::text LIKE '%grace%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, format!("00-{user_trace}-{}-01", command.span_id));
    // And the history shows which trace to look for.
    let history = fleetlog(&db.url)
        .args(["events", "list", "--aggregate", &format!("user:{user_id}")])
        .output()
        .unwrap();
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history.contains("UserRegistered") && history.contains(&format!("trace={user_trace}")),
        "{history}"
    );

    // A command for a device: through the relay to the dispatcher, which sends it.
    let registered = post(
        "/api/v1/devices",
        json!({"device_id": "sensor-1", "name": "sensor 1", "model": "m1"}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    let device_token = registered.json::<Value>().await.unwrap()["device_token"]
        .as_str()
        .unwrap()
        .to_string();
    let command_trace = "0af7651916cd43dd8448eb211c80319c";
    let issued = post(
        "/api/v1/devices/sensor-1/commands",
        json!({"name": "reboot"}),
        Some(&format!("00-{command_trace}-b7ad6b7169203331-01")),
    )
    .await
    .unwrap();
    assert_eq!(issued.status(), StatusCode::ACCEPTED);
    let spans = collector
        .trace(command_trace, "device command", |spans| {
            has(spans, "fleetlog-api", "POST /api/v1/devices/{id}/commands")
                && has(spans, "fleetlog-relay", "publish")
                && has(spans, "fleetlog-dispatch", "dispatch")
        })
        .await;
    let request = one(&spans, "fleetlog-api", "POST /api/v1/devices/{id}/commands");
    let command = one(&spans, "fleetlog-api", "command");
    child_of(command, request);
    let publish = publish_of(&spans, "CommandIssued");
    child_of(publish, command);
    child_of(one(&spans, "fleetlog-dispatch", "dispatch"), publish);

    // A reading over MQTT, which carries no context: the ingest batch starts the trace, and the
    // relay's publish of the reading continues it.
    let (device, mut events) =
        AsyncClient::new(broker.device_options("sensor-1", &device_token), 10);
    tokio::spawn(async move {
        loop {
            // The broker sync admits the device within seconds; until then the broker refuses
            // it, and the next poll connects again.
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let reading_trace = loop {
        let _ = device.try_publish(
            "devices/sensor-1/data",
            QoS::AtLeastOnce,
            false,
            r#"{"temperature":21.5}"#,
        );
        let traced = collector.spans().into_iter().find(|span| {
            span.service == "fleetlog-relay"
                && span.attributes.get("event_type").map(String::as_str)
                    == Some("TelemetryRecorded")
        });
        if let Some(publish) = traced {
            break publish.trace_id;
        }
        assert!(
            Instant::now() < deadline,
            "no reading was traced: {:#?}",
            collector.spans()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let spans = collector
        .trace(&reading_trace, "reading", |spans| {
            has(spans, "fleetlog-ingest", "ingest")
                && has(spans, "fleetlog-ingest", "commands")
                && has(spans, "fleetlog-ingest", "append")
        })
        .await;
    let ingest = one(&spans, "fleetlog-ingest", "ingest");
    assert_eq!(
        ingest.parent_span_id, "",
        "an ingest batch starts its trace"
    );
    assert_eq!(ingest.attributes["messaging.system"], "mqtt");
    let commands = one(&spans, "fleetlog-ingest", "commands");
    child_of(commands, ingest);
    child_of(one(&spans, "fleetlog-ingest", "append"), commands);
    let publishes: Vec<&Span> = spans
        .iter()
        .filter(|span| span.service == "fleetlog-relay")
        .collect();
    assert!(!publishes.is_empty());
    for publish in publishes {
        child_of(publish, commands);
    }

    for (role, mut child) in std::mem::take(&mut roles.0) {
        stop_cleanly(&mut child, role).await;
    }
    let _ = std::fs::remove_dir_all(data_dir);
}
