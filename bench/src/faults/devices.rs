//! Simulated devices: each its own MQTT connection (its own account, persistent session),
//! publishing timestamped telemetry at QoS 1, answering commands and firmware updates, and
//! keeping what it received so the run can check that everything reached it.
//!
//! Every telemetry message carries a `seq` reading, unique over the run. rumqttc reports no
//! acknowledgement per message, only packet ids: a device keeps the order in which its
//! publishes went into the client, pairs each with the packet id the client gives it when it
//! goes out (a retransmission keeps its id), and so knows which `seq` each PUBACK confirms.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};

/// What the devices share with the rest of the run.
#[derive(Default)]
pub struct Ledger {
    /// The next telemetry `seq`.
    pub next_seq: AtomicU64,
    /// Every `seq` the broker acknowledged to its device.
    pub acked: Mutex<HashSet<u64>>,
    /// Connections that came back without their session (the broker forgot it): the
    /// pairing of packet ids and `seq`s is lost for what was in flight then.
    pub sessions_lost: AtomicU64,
}

/// What one device received, and its latest acknowledged `seq`.
#[derive(Default)]
pub struct Received {
    pub commands: HashSet<String>,
    pub desired_version: u64,
    /// `(rollout_id, firmware_id)` of every install.
    pub installs: HashSet<(String, String)>,
    pub latest_acked: u64,
    pub firmware_version: String,
}

pub struct Device {
    pub id: String,
    client: AsyncClient,
    /// Held across putting a publish into the client, so `outbox` keeps the client's order.
    send: tokio::sync::Mutex<()>,
    /// For each publish put in the client and not yet given a packet id: its `seq`, if it is
    /// telemetry.
    outbox: Mutex<VecDeque<Option<u64>>>,
    pub received: Mutex<Received>,
    /// Whether its subscriptions were confirmed once: what is sent to it before would find
    /// no subscription and be dropped by the broker.
    pub subscribed: AtomicBool,
}

impl Device {
    /// Connects a device (user name and client id its id, password its token) and starts its
    /// event loop.
    pub fn connect(
        id: &str,
        token: &str,
        host: &str,
        port: u16,
        ledger: Arc<Ledger>,
        stop: Arc<AtomicBool>,
    ) -> Arc<Device> {
        let mut options = MqttOptions::new(id, host, port);
        options
            .set_credentials(id, token)
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(10))
            .set_inflight(100);
        let (client, mut events) = AsyncClient::new(options, 100_000);
        let device = Arc::new(Device {
            id: id.to_string(),
            client,
            send: tokio::sync::Mutex::new(()),
            outbox: Mutex::new(VecDeque::new()),
            received: Mutex::new(Received {
                firmware_version: "1.0.0".into(),
                ..Received::default()
            }),
            subscribed: AtomicBool::new(false),
        });
        let this = device.clone();
        tokio::spawn(async move {
            // Packet id -> seq (None: not telemetry) of what went out and awaits its PUBACK.
            let mut in_flight: HashMap<u16, Option<u64>> = HashMap::new();
            let mut connected_before = false;
            loop {
                let event = events.poll().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                        if connected_before && !connack.session_present {
                            ledger.sessions_lost.fetch_add(1, Ordering::Relaxed);
                            in_flight.clear();
                            this.outbox.lock().unwrap().clear();
                        }
                        connected_before = true;
                        let this = this.clone();
                        tokio::spawn(async move { this.subscribe().await });
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let std::collections::hash_map::Entry::Vacant(entry) =
                            in_flight.entry(pkid)
                        {
                            let seq = this.outbox.lock().unwrap().pop_front().flatten();
                            entry.insert(seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        this.subscribed.store(true, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(Some(seq)) = in_flight.remove(&ack.pkid) {
                            ledger.acked.lock().unwrap().insert(seq);
                            let mut received = this.received.lock().unwrap();
                            received.latest_acked = received.latest_acked.max(seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let this = this.clone();
                        tokio::spawn(async move {
                            this.handle(&publish.topic, &publish.payload).await;
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        device
    }

    async fn subscribe(&self) {
        for topic in ["commands", "desired", "ota"] {
            let _ = self
                .client
                .subscribe(format!("devices/{}/{topic}", self.id), QoS::AtLeastOnce)
                .await;
        }
    }

    /// Puts a publish into the client, keeping `outbox` in the client's order.
    async fn publish(&self, suffix: &str, body: Value, seq: Option<u64>) {
        let _order = self.send.lock().await;
        self.outbox.lock().unwrap().push_back(seq);
        let topic = format!("devices/{}/{suffix}", self.id);
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
            .is_err()
        {
            self.outbox.lock().unwrap().pop_back();
        }
    }

    /// One telemetry message, stamped with the time: a copy of it is the same fact.
    pub async fn publish_telemetry(&self, seq: u64) {
        let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let body = json!({
            "timestamp": timestamp,
            "sensors": [
                {"sensor_name": "seq", "value": seq},
                {"sensor_name": "temperature", "value": 20.0 + (seq % 100) as f64 / 10.0, "unit": "celsius"},
            ],
        });
        self.publish("data", body, Some(seq)).await;
    }

    async fn handle(&self, topic: &str, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if topic.ends_with("/commands") {
            let Some(command_id) = message["command_id"].as_str() else {
                return;
            };
            self.received
                .lock()
                .unwrap()
                .commands
                .insert(command_id.to_string());
            self.publish(
                &format!("commands/{command_id}/reply"),
                json!({"status": "succeeded", "result": {"ok": true}}),
                None,
            )
            .await;
        } else if topic.ends_with("/desired") {
            if let Some(version) = message["version"].as_u64() {
                let mut received = self.received.lock().unwrap();
                received.desired_version = received.desired_version.max(version);
            }
        } else if topic.ends_with("/ota") && message["action"] == "install" {
            let (Some(rollout), Some(firmware), Some(version)) = (
                message["rollout_id"].as_str(),
                message["firmware_id"].as_str(),
                message["version"].as_str(),
            ) else {
                return;
            };
            let first = self
                .received
                .lock()
                .unwrap()
                .installs
                .insert((rollout.to_string(), firmware.to_string()));
            if !first {
                // Devices deduplicate by rollout and image: answer how it ended.
                let current = self.received.lock().unwrap().firmware_version.clone();
                self.publish("status", json!({"firmware_version": current}), None)
                    .await;
                return;
            }
            for state in ["downloading", "installing", "rebooting"] {
                self.publish(
                    "ota/progress",
                    json!({"rollout_id": rollout, "state": state}),
                    None,
                )
                .await;
            }
            self.received.lock().unwrap().firmware_version = version.to_string();
            self.publish("status", json!({"firmware_version": version}), None)
                .await;
        }
    }
}
