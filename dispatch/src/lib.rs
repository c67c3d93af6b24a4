//! The dispatcher (`fleetlog dispatch`): device events from JetStream out to the devices over
//! MQTT, and commands nobody answered in time recorded as expired.
//!
//! - `CommandIssued` → `{root}/{id}/commands`: `{"command_id", "name", "params", "issued_at",
//!   "expires_at"}` (not sent once expired);
//! - `DesiredPropertiesSet` → `{root}/{id}/desired`, retained: `{"version", "desired"}`, the
//!   device's whole desired document, so a device that connects later gets the latest;
//! - `FirmwareUpdateRequested` → `{root}/{id}/ota`: `{"action": "install", "rollout_id",
//!   "firmware_id", "version", "sha256", "size_bytes", "signature", "signature_algorithm",
//!   "key_id", "download_path", "download_url"}`: the device downloads the image (device token,
//!   HTTP Range to resume), checks its SHA-256 and the platform's ed25519 signature of that
//!   digest (public key at `/api/v1/firmware/signing-key`, by key id) before installing;
//! - `FirmwareUpdateAbandoned` (rollout aborted, update timed out, device decommissioned) →
//!   `{root}/{id}/ota`: `{"action": "cancel", "rollout_id", "firmware_id", "reason"}`: the
//!   device stops that update if it still can. An install goes out only while the device
//!   still has that update under way, so a redelivered install never follows its cancel;
//! - `DeviceDecommissioned` clears the retained desired document.
//!
//! Delivery is at least once, made effectively once by ids: the durable JetStream consumer's
//! message is acked only after the broker confirmed the MQTT publish (PUBACK), so a restarted
//! dispatcher resumes after the last confirmed message and resends at most the few that were
//! confirmed but whose ack did not reach JetStream. Exactly once cannot be had between two
//! independent brokers without a shared transaction, so every message carries an id the device
//! deduplicates by: `command_id` for commands, `version` for desired documents (apply only a
//! newer one), `rollout_id` + `firmware_id` for updates.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::Context;
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::device::{DeviceCommand, DeviceError, DeviceEvent, FirmwareImage};
use fleetlog_domain::CommandId;
use fleetlog_eventlog::EventEnvelope;
use fleetlog_nats::topology::{control_subject_filter_for_type, EVENT_TYPE_HEADER};
use fleetlog_nats::{Backoff, STREAM_NAME};
use fleetlog_protocol::outbound::{CommandMessage, DesiredMessage, OtaMessage};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use serde_json::Value;
use tokio::sync::{oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use fleetlog_broker::BrokerUrl;

/// Why an event was not sent to its device this time. Every case passes (the broker comes
/// back, Postgres answers again): the event is naked and handled again, never dropped.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The client could not queue the publish (its connection is being re-established).
    #[error("cannot queue the publish to {topic}: {source}")]
    Queue {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: rumqttc::ClientError,
    },
    /// The connection dropped with the publish in flight.
    #[error("publish to {topic} was dropped")]
    Dropped {
        /// The topic.
        topic: String,
    },
    /// The broker did not confirm the publish in time.
    #[error("no PUBACK for {topic} within {timeout:?}")]
    Unconfirmed {
        /// The topic.
        topic: String,
        /// How long the dispatcher waited.
        timeout: Duration,
    },
    /// The device's or the firmware's current state could not be read.
    #[error("cannot read the current state: {0}")]
    Store(#[from] fleetlog_commands::StoreError),
    /// The message could not be encoded.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A message of the device contract as the JSON body to publish.
fn to_body(message: &impl serde::Serialize) -> Result<Value, SendError> {
    Ok(serde_json::to_value(message)?)
}

/// The durable consumer of the dispatcher.
pub const CONSUMER: &str = "dispatch";

/// The device events that send something to the device.
const DISPATCHED: &[&str] = &[
    "CommandIssued",
    "DesiredPropertiesSet",
    "FirmwareUpdateRequested",
    "FirmwareUpdateAbandoned",
    "DeviceDecommissioned",
];

/// How the dispatcher works.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// The broker.
    pub broker: BrokerUrl,
    /// The MQTT client id.
    pub client_id: String,
    /// The first topic level, `devices` by default.
    pub topic_root: String,
    /// How long a publish may wait for the broker's PUBACK before it is retried.
    pub publish_timeout: Duration,
    /// How often commands past their expiry are looked for.
    pub expiry_interval: Duration,
    /// The API's address as devices reach it (e.g. `https://fleet.example.com`); OTA messages
    /// then carry a full `download_url` beside the path.
    pub public_url: Option<String>,
}

impl DispatchSettings {
    /// Defaults for `broker`.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            client_id: format!("fleetlog.dispatch.{}", std::process::id()),
            topic_root: "devices".into(),
            publish_timeout: Duration::from_secs(20),
            expiry_interval: Duration::from_secs(5),
            public_url: None,
        }
    }
}

/// The dispatcher.
pub struct Dispatcher {
    bus: CommandBus,
    jetstream: Context,
    settings: DispatchSettings,
}

impl Dispatcher {
    /// A dispatcher reading device events through `jetstream`.
    pub fn new(bus: CommandBus, jetstream: Context, settings: DispatchSettings) -> Self {
        Self {
            bus,
            jetstream,
            settings,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut options = self.settings.broker.options(&self.settings.client_id);
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(
                fleetlog_broker::BROKER_MESSAGE_LIMIT + fleetlog_broker::PACKET_OVERHEAD,
                fleetlog_broker::BROKER_MESSAGE_LIMIT + fleetlog_broker::PACKET_OVERHEAD,
            );
        let (client, mut events) = AsyncClient::new(options.clone(), CLIENT_CAPACITY);
        events.set_network_options(fleetlog_broker::network_options());
        let publisher = ConfirmedPublisher {
            tracker: Arc::new(Mutex::new(Tracker {
                client,
                unassigned: VecDeque::new(),
                by_packet: HashMap::new(),
            })),
        };
        // The connection's driver stops with this dispatcher, also when it unwinds from a
        // panic: a restarted dispatcher must not compete with the old connection for the
        // broker session under the same client id.
        let driver_stop = shutdown.child_token();
        let _stop_driver_on_drop = driver_stop.clone().drop_guard();
        let driver = tokio::spawn(drive(
            events,
            options,
            publisher.tracker.clone(),
            self.settings.broker.clone(),
            driver_stop,
        ));
        tokio::join!(
            self.forward_events(&publisher, &shutdown),
            self.expire_commands(&shutdown),
        );
        let client = publisher.tracker.lock().await.client.clone();
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
        tracing::info!("dispatcher stopped");
    }

    async fn forward_events(&self, publisher: &ConfirmedPublisher, shutdown: &CancellationToken) {
        fleetlog_nats::consume_until_shutdown(CONSUMER, shutdown, || {
            self.consume(publisher, shutdown)
        })
        .await;
    }

    async fn consume(
        &self,
        publisher: &ConfirmedPublisher,
        shutdown: &CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let stream = self.jetstream.get_stream(STREAM_NAME).await?;
        // Control events only: telemetry, status and heartbeats never ask for a message to a
        // device, and at fleet rate they would be nearly all the dispatcher reads.
        let consumer = fleetlog_nats::durable_consumer(
            &stream,
            PullConfig {
                durable_name: Some(CONSUMER.to_string()),
                filter_subject: control_subject_filter_for_type("device"),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: self.settings.publish_timeout * 3,
                max_ack_pending: 1_000,
                ..Default::default()
            },
        )
        .await?;
        let mut pull = fleetlog_nats::Pull::start(&consumer, 100).await?;
        tracing::info!("dispatcher consuming device events");
        while let Some(batch) = pull.next(shutdown).await? {
            for message in batch {
                // The connection stops with the shutdown: what is left of the batch could only
                // wait out its PUBACK timeout. Unacked, it comes back to the next dispatcher.
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let span = fleetlog_trace::span_for_message(&message, || {
                    tracing::info_span!("dispatch", otel.kind = "consumer")
                });
                self.dispatch(publisher, message).instrument(span).await;
            }
        }
        Ok(())
    }

    /// Sends what one device event asks for and acks it, or naks it to come back.
    async fn dispatch(
        &self,
        publisher: &ConfirmedPublisher,
        message: async_nats::jetstream::Message,
    ) {
        // Most control events ask for nothing either: the event type header says so
        // without reading the body.
        let wanted = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(EVENT_TYPE_HEADER))
            .is_none_or(|kind| DISPATCHED.contains(&kind.as_str()));
        if !wanted {
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "cannot ack a device event");
            }
            return;
        }
        let sent = match serde_json::from_slice::<EventEnvelope>(&message.payload) {
            Ok(envelope) => self.forward(publisher, &envelope).await,
            Err(error) => {
                tracing::error!(%error, "skipping a message that is not an event envelope");
                Ok(())
            }
        };
        match sent {
            // Processing is in order, so the messages still unacked after a crash are
            // this one (perhaps sent, not acked) and those not yet looked at.
            Ok(()) => {
                if let Err(error) = message.double_ack().await {
                    tracing::warn!(%error, "cannot ack a dispatched event; it may be sent again");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot send a device event; it comes back");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                    .await;
            }
        }
    }

    /// Publishes what `envelope` asks for, confirmed by the broker; `Ok` when nothing is to
    /// be sent.
    async fn forward(
        &self,
        publisher: &ConfirmedPublisher,
        envelope: &EventEnvelope,
    ) -> Result<(), SendError> {
        let device = &envelope.aggregate_id;
        let root = &self.settings.topic_root;
        let event: DeviceEvent = match envelope.payload.decode() {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, event = envelope.message_id(), "skipping an unreadable device event");
                return Ok(());
            }
        };
        let timeout = self.settings.publish_timeout;
        match event {
            DeviceEvent::CommandIssued {
                command_id,
                name,
                params,
                issued_at,
                expires_at,
            } => {
                if expires_at <= Utc::now() {
                    tracing::debug!(device, %command_id, "not sending an expired command");
                    return Ok(());
                }
                let body = to_body(&CommandMessage {
                    command_id: &command_id,
                    name: &name,
                    params: &params,
                    issued_at,
                    expires_at,
                })?;
                publisher
                    .publish(format!("{root}/{device}/commands"), &body, false, timeout)
                    .await
            }
            DeviceEvent::DesiredPropertiesSet { .. } => {
                // The latest document, not this event's change: a device that connects later
                // gets the whole of it from the retained message.
                let current = self.bus.devices().current(device).await?.aggregate;
                let body = to_body(&DesiredMessage {
                    version: current.desired_version,
                    desired: &current.desired,
                })?;
                publisher
                    .publish(format!("{root}/{device}/desired"), &body, true, timeout)
                    .await
            }
            DeviceEvent::FirmwareUpdateRequested {
                rollout_id,
                firmware_id,
                version,
                image,
                at,
            } => {
                // An install redelivered (or handled by another dispatcher) after the update
                // was given up must not follow its cancel to the device: it goes out only while
                // the device still has that update under way.
                let current = self.bus.devices().current(device).await?.aggregate;
                let still_wanted = current.firmware_update.as_ref().is_some_and(|pending| {
                    pending.rollout_id == rollout_id && pending.firmware_id == firmware_id
                });
                if !still_wanted {
                    tracing::debug!(device, "firmware update no longer under way; not sent");
                    return Ok(());
                }
                // Requests recorded before images carried their digest in the event: ask the
                // Firmware aggregate.
                let image = match image {
                    Some(image) => image,
                    None => {
                        let firmware = self
                            .bus
                            .firmware()
                            .current(&firmware_id.to_string())
                            .await?
                            .aggregate;
                        FirmwareImage {
                            sha256: firmware.sha256,
                            size_bytes: firmware.size_bytes,
                            signature: firmware.signature,
                        }
                    }
                };
                let body = to_body(&OtaMessage::install(
                    rollout_id.as_ref(),
                    &firmware_id,
                    &version,
                    &image.sha256,
                    image.size_bytes,
                    image.signature.as_ref(),
                    self.settings.public_url.as_deref(),
                    at,
                ))?;
                publisher
                    .publish(format!("{root}/{device}/ota"), &body, false, timeout)
                    .await
            }
            DeviceEvent::FirmwareUpdateAbandoned {
                rollout_id,
                firmware_id,
                reason,
                at,
            } => {
                let body = to_body(&OtaMessage::Cancel {
                    rollout_id: rollout_id.as_ref(),
                    firmware_id: firmware_id.as_ref(),
                    reason: &reason,
                    canceled_at: at,
                })?;
                publisher
                    .publish(format!("{root}/{device}/ota"), &body, false, timeout)
                    .await
            }
            DeviceEvent::DeviceDecommissioned { .. } => {
                // An empty retained message removes the retained desired document.
                publisher
                    .publish_raw(
                        format!("{root}/{device}/desired"),
                        Vec::new(),
                        true,
                        timeout,
                    )
                    .await
            }
            _ => Ok(()),
        }
    }

    /// Records commands past their expiry as expired, from the read model's pending ones.
    async fn expire_commands(&self, shutdown: &CancellationToken) {
        let mut ticks = tokio::time::interval(self.settings.expiry_interval);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            if let Err(error) = self.expire_due(Utc::now()).await {
                tracing::warn!(%error, "cannot look for expired commands");
            }
        }
    }

    /// Expires the commands due at `now`; returns how many were expired.
    pub async fn expire_due(&self, now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
        let due: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.device_id, c.command_id FROM device_commands c
               JOIN devices d ON d.device_id = c.device_id AND d.lifecycle = 'active'
              WHERE c.status = 'pending' AND c.expires_at <= $1
              ORDER BY c.expires_at LIMIT 1000",
        )
        .bind(now)
        .fetch_all(self.bus.pool())
        .await?;
        let mut expired = 0;
        for (device, command) in due {
            let Ok(command_id) = CommandId::parse(command) else {
                continue;
            };
            let expire = DeviceCommand::ExpireCommand {
                command_id: command_id.clone(),
                at: now,
            };
            match self
                .bus
                .devices()
                .execute(&device, expire, &CommandMetadata::new("system:dispatch"))
                .await
            {
                Ok(committed) if committed.events > 0 => {
                    expired += 1;
                    metrics::counter!("fleetlog_commands_expired_total").increment(1);
                    tracing::info!(device, %command_id, "command expired without a reply");
                }
                // Replied or expired meanwhile; the read model was behind.
                Ok(_)
                | Err(CommandError::Refused(
                    DeviceError::UnknownCommand(_) | DeviceError::CommandNotExpired(_),
                )) => {}
                Err(error) => tracing::warn!(device, %command_id, %error, "cannot expire command"),
            }
        }
        Ok(expired)
    }
}

/// Waiters for broker confirmations: publishes are matched to packet ids in the order the
/// event loop sends them, and released by the PUBACK of their id.
struct Tracker {
    /// The client of the current connection. Each connection has a client of its own: the
    /// pairing of waiters with packet ids holds within one connection only.
    client: AsyncClient,
    unassigned: VecDeque<oneshot::Sender<()>>,
    by_packet: HashMap<u16, oneshot::Sender<()>>,
}

impl Tracker {
    /// Starts over with `client`: every waiter not confirmed yet fails (its event comes back
    /// and is sent again), none is left to be paired with a later publish's PUBACK.
    fn start_over(&mut self, client: AsyncClient) {
        self.unassigned.clear();
        self.by_packet.clear();
        self.client = client;
    }
}

/// QoS 1 publishes that complete when the broker has confirmed them.
struct ConfirmedPublisher {
    tracker: Arc<Mutex<Tracker>>,
}

impl ConfirmedPublisher {
    async fn publish(
        &self,
        topic: String,
        body: &Value,
        retain: bool,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let payload = serde_json::to_vec(body)?;
        if payload.len() > fleetlog_broker::BROKER_MESSAGE_LIMIT {
            // The API and the domain cap what goes out well below this, so only an event from
            // before those caps gets here. Publishing it would make the client drop its
            // connection (and with it every tenant's messages in flight), again and again:
            // it is passed over instead, and counted.
            metrics::counter!("fleetlog_dispatch_undeliverable_total").increment(1);
            tracing::warn!(
                topic,
                bytes = payload.len(),
                limit = fleetlog_broker::BROKER_MESSAGE_LIMIT,
                "not sending a message larger than the broker accepts"
            );
            return Ok(());
        }
        self.publish_raw(topic, payload, retain, timeout).await
    }

    async fn publish_raw(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        timeout: Duration,
    ) -> Result<(), SendError> {
        let (confirmed, confirmation) = oneshot::channel();
        {
            // Held while queueing, so waiters line up in the order the publishes go out.
            let mut tracker = self.tracker.lock().await;
            tracker.unassigned.push_back(confirmed);
            if let Err(error) = tracker
                .client
                .publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
                .await
            {
                tracker.unassigned.pop_back();
                return Err(SendError::Queue {
                    topic,
                    source: error,
                });
            }
        }
        match tokio::time::timeout(timeout, confirmation).await {
            Ok(Ok(())) => {
                metrics::counter!("fleetlog_dispatch_published_total").increment(1);
                Ok(())
            }
            Ok(Err(_)) => Err(SendError::Dropped { topic }),
            Err(_) => Err(SendError::Unconfirmed { topic, timeout }),
        }
    }
}

/// Requests the dispatcher's client queues before publishing waits.
const CLIENT_CAPACITY: usize = 1000;

/// Drives the MQTT connection: reconnects with backoff and matches PUBACKs to waiters.
///
/// Waiters are paired with packet ids in the order the publishes go out. A lost connection
/// breaks that order: the dispatcher's session is clean, so the client drops what it had not
/// sent or not had confirmed, and numbers packets afresh, and a waiter left from before would
/// take a later publish's PUBACK (and every publish after it would wait its full timeout,
/// one event each time, as the fault matrix saw after a broker stall). So each connection gets
/// a new client, and the waiters of the old one fail: their events come back and go out again.
async fn drive(
    mut events: EventLoop,
    options: rumqttc::MqttOptions,
    tracker: Arc<Mutex<Tracker>>,
    broker: fleetlog_broker::BrokerUrl,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                tracing::info!("dispatcher connected to the MQTT broker");
                metrics::gauge!("fleetlog_dispatch_connected").set(1.0);
            }
            Ok(Event::Outgoing(Outgoing::Publish(packet))) => {
                // Each connection has its own client, so nothing is retransmitted: every
                // publish going out is the next waiter's.
                let mut tracker = tracker.lock().await;
                if let Some(waiter) = tracker.unassigned.pop_front() {
                    tracker.by_packet.insert(packet, waiter);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(waiter) = tracker.lock().await.by_packet.remove(&ack.pkid) {
                    let _ = waiter.send(());
                }
            }
            Ok(_) => {}
            Err(error) => {
                metrics::gauge!("fleetlog_dispatch_connected").set(0.0);
                let delay = backoff.next_delay();
                match fleetlog_broker::credential_hint(&error, &broker) {
                    Some(hint) => {
                        tracing::warn!(%error, retry_in = ?delay, hint, "the broker refused the dispatcher")
                    }
                    None => {
                        tracing::warn!(%error, retry_in = ?delay, "dispatcher lost the MQTT broker")
                    }
                }
                if !fleetlog_nats::sleep_unless_shut_down(delay, &shutdown).await {
                    return;
                }
                let (client, mut fresh) = AsyncClient::new(options.clone(), CLIENT_CAPACITY);
                fresh.set_network_options(fleetlog_broker::network_options());
                // Dropped first: a publish waiting for room in the old client's queue (and
                // holding the tracker meanwhile) fails at once instead of waiting forever.
                drop(std::mem::replace(&mut events, fresh));
                tracker.lock().await.start_over(client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fleetlog_domain::Plane;

    use super::DISPATCHED;

    #[test]
    fn every_dispatched_event_travels_on_the_control_plane() {
        // The dispatcher's consumer filters on the control plane: an event it sends to devices
        // that moved to the data plane would never reach it.
        for event_type in DISPATCHED {
            assert_eq!(
                Plane::of("device", event_type),
                Plane::Control,
                "{event_type}"
            );
        }
    }
}
