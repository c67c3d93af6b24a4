//! The MQTT bridge (`fleetlog ingest`): device messages in, Device commands out, acknowledged
//! only once they are safe.
//!
//! One rumqttc client with a persistent session (`clean_session = false`) and manual acks
//! subscribes at QoS 1 to the device topics, through a shared subscription so several ingest
//! instances split the load. Messages are spread over shards by device id: one device's
//! messages stay in order, different devices run concurrently. A shard takes everything queued
//! for it, groups it by device and runs each device's messages as one batch on the Device
//! aggregate (one transaction). A message is acked after its batch committed, or after it was
//! published to the dead-letter stream with its reason; a failure of Postgres or NATS leaves it
//! unacked, so the broker redelivers it after a reconnect (invariant 4). Redelivered copies carry
//! their digest and change nothing twice.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::device::{Device, DeviceCommand, DeviceError, DeviceEvent, Lifecycle};
use fleetlog_domain::{DeviceId, TenantId, UserId};
use fleetlog_nats::topology::ensure_dead_letter_stream;
use fleetlog_nats::{sleep_unless_shut_down, Backoff};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use fleetlog_broker::BrokerUrl;
use fleetlog_protocol::message::{
    parse_payload, parse_topic, DeviceMessage, Dropped, Identity, Rejection,
};

/// Dead letters of the bridge go to `fleetlog.deadletter.ingest` (under
/// [`fleetlog_nats::topology::DEAD_LETTER_PREFIX`]).
pub const DEAD_LETTER_SUBJECT: &str = "fleetlog.deadletter.ingest";

/// How the bridge connects and works.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// The broker.
    pub broker: BrokerUrl,
    /// The MQTT client id. Keep it stable across restarts: the broker keeps the session, and
    /// the messages not yet acked, under it. Each instance needs its own.
    pub client_id: String,
    /// The first topic level, `devices` by default.
    pub topic_root: String,
    /// The shared-subscription group (`$share/{group}/...`) instances split the load in;
    /// `None` subscribes plainly (every instance then gets every message).
    pub share_group: Option<String>,
    /// Register unknown devices into this tenant instead of dead-lettering their messages.
    pub auto_register_tenant: Option<TenantId>,
    /// Shards: each commits the devices of its round in one transaction, so this many
    /// transactions run at once. Few shards make large, cheap transactions.
    pub shards: usize,
    /// The most messages of one shard handled in one round.
    pub max_batch: usize,
    /// How long a round that is not full waits for more messages before it runs: fewer,
    /// larger transactions under load, for at most this much latency.
    pub linger: Duration,
    /// QoS 1 messages the broker may have in flight to this client.
    pub inflight: u16,
    /// How often the summary line is logged.
    pub report_every: Duration,
    /// The first wait after a lost connection; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// The longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl IngestSettings {
    /// Defaults for `broker`.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            client_id: "fleetlog-ingest".into(),
            topic_root: "devices".into(),
            share_group: Some("fleetlog-ingest".into()),
            auto_register_tenant: None,
            shards: 2,
            max_batch: 500,
            linger: Duration::from_millis(5),
            inflight: 1000,
            report_every: Duration::from_secs(300),
            min_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
        }
    }

    /// The topic filters subscribed to.
    pub fn filters(&self) -> Vec<String> {
        let root = &self.topic_root;
        let share = |filter: String| match &self.share_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter,
        };
        [
            format!("{root}/+/data"),
            format!("{root}/+/status"),
            format!("{root}/+/heartbeat"),
            format!("{root}/+/commands/+/reply"),
            format!("{root}/+/ota/progress"),
        ]
        .into_iter()
        .map(share)
        .collect()
    }
}

/// Running totals, for the summary line and for tests.
#[derive(Debug, Default)]
pub struct IngestStats {
    started: std::sync::OnceLock<Instant>,
    connected: AtomicBool,
    received: AtomicU64,
    accepted: AtomicU64,
    partially_accepted: AtomicU64,
    rejected: AtomicU64,
    redelivered: AtomicU64,
    last_message_ms: AtomicI64,
}

impl IngestStats {
    /// Messages received.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Messages fully accepted.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Messages accepted with parts dropped.
    pub fn partially_accepted(&self) -> u64 {
        self.partially_accepted.load(Ordering::Relaxed)
    }
    /// Messages dead-lettered.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }
    /// Messages the broker marked as possibly delivered before (DUP).
    pub fn redelivered(&self) -> u64 {
        self.redelivered.load(Ordering::Relaxed)
    }
    /// Whether the client is connected to the broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Accepted => &self.accepted,
            Outcome::PartiallyAccepted => &self.partially_accepted,
            Outcome::Rejected => &self.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fleetlog_ingest_messages_total",
            "transport" => "mqtt", "outcome" => outcome.label())
        .increment(1);
    }

    fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        metrics::gauge!("fleetlog_ingest_connected").set(if connected { 1.0 } else { 0.0 });
    }

    /// Refreshes the gauges and, if `log`, writes the summary line.
    fn report(&self, log: bool) {
        let received = self.received();
        let handled = self.accepted() + self.partially_accepted() + self.rejected();
        let success_rate = if handled == 0 {
            100.0
        } else {
            100.0 * (self.accepted() + self.partially_accepted()) as f64 / handled as f64
        };
        let last = self.last_message_ms.load(Ordering::Relaxed);
        let last_message = (last > 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(last))
            .flatten()
            .map_or_else(|| "never".to_string(), |time| time.to_rfc3339());
        let uptime = self.started.get().map_or(0, |s| s.elapsed().as_secs());
        metrics::gauge!("fleetlog_ingest_uptime_seconds").set(uptime as f64);
        metrics::gauge!("fleetlog_ingest_success_ratio").set(success_rate / 100.0);
        if !log {
            return;
        }
        tracing::info!(
            uptime_secs = uptime,
            connected = self.is_connected(),
            total = received,
            accepted = self.accepted(),
            partially_accepted = self.partially_accepted(),
            rejected = self.rejected(),
            success_rate = format!("{success_rate:.2}%"),
            last_message,
            "ingest summary"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    PartiallyAccepted,
    Rejected,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::PartiallyAccepted => "partially_accepted",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A dead letter as published on `fleetlog.deadletter.ingest`.
#[derive(Debug, Serialize)]
struct DeadLetter<'a> {
    topic: &'a str,
    /// The payload as text when it is UTF-8, else hex.
    payload: String,
    payload_encoding: &'static str,
    reason: String,
    /// What was dropped from a partially accepted message.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    dropped: &'a [Dropped],
    received_at: DateTime<Utc>,
}

/// The bridge.
pub struct Ingest {
    bus: CommandBus,
    jetstream: Context,
    settings: IngestSettings,
    stats: Arc<IngestStats>,
}

impl Ingest {
    /// A bridge that executes on `bus` and dead-letters through `jetstream`.
    pub fn new(bus: CommandBus, jetstream: Context, settings: IngestSettings) -> Self {
        Self {
            bus,
            jetstream,
            settings,
            stats: Arc::new(IngestStats::default()),
        }
    }

    /// Its running totals.
    pub fn stats(&self) -> Arc<IngestStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown`: messages in hand are finished (committed or dead-lettered and
    /// acked) before it returns; the rest stays with the broker.
    pub async fn run(self, shutdown: CancellationToken) {
        let _ = self.stats.started.set(Instant::now());
        let settings = &self.settings;
        let mut options = settings.broker.options(&settings.client_id);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(settings.inflight)
            .set_max_packet_size(
                fleetlog_broker::BROKER_MESSAGE_LIMIT + fleetlog_broker::PACKET_OVERHEAD,
                fleetlog_broker::BROKER_MESSAGE_LIMIT + fleetlog_broker::PACKET_OVERHEAD,
            );
        let (client, events) = AsyncClient::new(options, 10_000);
        let shared = Arc::new(Shared {
            bus: self.bus.clone(),
            jetstream: self.jetstream.clone(),
            client: client.clone(),
            topic_root: settings.topic_root.clone(),
            auto_register_tenant: settings.auto_register_tenant.clone(),
            stats: self.stats.clone(),
            stop: shutdown.clone(),
        });
        if let Err(error) = ensure_dead_letter_stream(&self.jetstream).await {
            // Not fatal: the first dead letter tries again.
            tracing::warn!(%error, "cannot create the dead-letter stream yet");
        }
        let mut shards = JoinSet::new();
        let mut senders = Vec::with_capacity(settings.shards);
        for _ in 0..settings.shards.max(1) {
            let (sender, receiver) = mpsc::channel(settings.max_batch.max(1) * 2);
            senders.push(sender);
            shards.spawn(run_shard(
                shared.clone(),
                receiver,
                settings.max_batch.max(1),
                settings.linger,
            ));
        }
        let reporter = tokio::spawn({
            let stats = self.stats.clone();
            let every = settings.report_every;
            let shutdown = shutdown.clone();
            async move {
                // Gauges are refreshed often; the log line comes every `every`.
                let mut ticks = tokio::time::interval(Duration::from_secs(15).min(every));
                ticks.tick().await;
                let mut last_line = Instant::now();
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        _ = ticks.tick() => {
                            let log = last_line.elapsed() >= every;
                            if log {
                                last_line = Instant::now();
                            }
                            stats.report(log);
                        }
                    }
                }
            }
        });

        let events = poll_events(&self, &client, events, &senders, &shutdown).await;
        // Let the shards finish what they hold, then send their acks before leaving.
        drop(senders);
        let mut panicked = None;
        while let Some(finished) = shards.join_next().await {
            if let Err(error) = finished {
                if error.is_panic() && panicked.is_none() {
                    panicked = Some(error.into_panic());
                }
            }
        }
        reporter.abort();
        flush_and_disconnect(&client, events).await;
        self.stats.set_connected(false);
        self.stats.report(true);
        // A shard that panicked ended the bridge: pass the panic on, so the supervisor
        // restarts the role (what that shard held is redelivered by the broker), instead of
        // this looking like a clean stop.
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        tracing::info!("ingest stopped");
    }
}

/// What the shards share.
struct Shared {
    bus: CommandBus,
    jetstream: Context,
    client: AsyncClient,
    topic_root: String,
    auto_register_tenant: Option<TenantId>,
    stats: Arc<IngestStats>,
    stop: CancellationToken,
}

async fn poll_events(
    ingest: &Ingest,
    client: &AsyncClient,
    mut events: EventLoop,
    shards: &[mpsc::Sender<Publish>],
    shutdown: &CancellationToken,
) -> EventLoop {
    let settings = &ingest.settings;
    let stats = &ingest.stats;
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return events,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(broker = %settings.broker, session_present = ack.session_present, "connected to the MQTT broker");
                stats.set_connected(true);
                backoff.reset();
                // Subscribing again is harmless when the session kept the subscriptions.
                for filter in settings.filters() {
                    if let Err(error) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(%error, filter, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                if publish.dup {
                    stats.redelivered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetlog_ingest_redelivered_total").increment(1);
                }
                stats
                    .last_message_ms
                    .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
                let shard = shard_of(&publish.topic, &settings.topic_root, shards.len());
                // A full shard holds the event loop back, and with it the broker: backpressure.
                let sent = tokio::select! {
                    () = shutdown.cancelled() => return events,
                    sent = shards[shard].send(publish) => sent,
                };
                if sent.is_err() {
                    return events;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                tracing::debug!(?ack.return_codes, "subscribed");
            }
            Ok(_) => {}
            Err(error) => {
                let delay = backoff.next_delay();
                if stats.is_connected() {
                    tracing::warn!(%error, "lost the MQTT broker");
                } else {
                    tracing::warn!(%error, retry_in = ?delay, "cannot reach the MQTT broker");
                }
                stats.set_connected(false);
                if !sleep_unless_shut_down(delay, shutdown).await {
                    return events;
                }
            }
        }
    }
}

/// Sends the acks still queued and says goodbye, within a short grace period.
async fn flush_and_disconnect(client: &AsyncClient, mut events: EventLoop) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// The shard of a message: by device id, so one device's messages stay in order.
fn shard_of(topic: &str, root: &str, shards: usize) -> usize {
    let device = topic
        .strip_prefix(root)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(topic);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

async fn run_shard(
    shared: Arc<Shared>,
    mut inbox: mpsc::Receiver<Publish>,
    max_batch: usize,
    linger: Duration,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while inbox.recv_many(&mut batch, max_batch).await > 0 {
        if !linger.is_zero() {
            let deadline = tokio::time::Instant::now() + linger;
            while batch.len() < max_batch {
                let room = max_batch - batch.len();
                match tokio::time::timeout_at(deadline, inbox.recv_many(&mut batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        handle_batch(&shared, std::mem::take(&mut batch)).await;
    }
}

/// One message on its way: parsed, or refused with a reason.
struct Item {
    publish: Publish,
    received_at: DateTime<Utc>,
    parsed: Result<DeviceMessage, Rejection>,
}

async fn handle_batch(shared: &Shared, batch: Vec<Publish>) {
    let received_at = Utc::now();
    // Group by device, keeping each device's order; topics that name no device go straight to
    // the dead letters.
    let mut devices: Vec<(DeviceId, Vec<Item>)> = Vec::new();
    let mut index: HashMap<DeviceId, usize> = HashMap::new();
    for publish in batch {
        match parse_topic(&shared.topic_root, &publish.topic) {
            Ok((device, kind)) => {
                let parsed = parse_payload(&kind, &publish.payload);
                let item = Item {
                    publish,
                    received_at,
                    parsed,
                };
                match index.get(&device) {
                    Some(&at) => devices[at].1.push(item),
                    None => {
                        index.insert(device.clone(), devices.len());
                        devices.push((device, vec![item]));
                    }
                }
            }
            Err(rejection) => {
                reject(shared, &publish, received_at, &rejection.to_string(), &[]).await;
            }
        }
    }
    let mut prepared = Vec::with_capacity(devices.len());
    for (device, items) in devices {
        if let Some(ready) = prepare_device(shared, device, items).await {
            prepared.push(ready);
        }
    }
    // Every device's messages in one transaction.
    let work: Vec<(String, Vec<DeviceCommand>, CommandMetadata)> = prepared
        .iter_mut()
        .filter(|p| !p.commands.is_empty())
        .map(|p| {
            (
                p.device.to_string(),
                std::mem::take(&mut p.commands),
                CommandMetadata::new(format!("device:{}", p.device)),
            )
        })
        .collect();
    let Some(mut results) = execute_until_done(shared, work).await else {
        // Shutting down with the batch not committed: it stays unacked for redelivery.
        return;
    };
    results.reverse();
    for ready in prepared {
        let outcomes = if ready.has_commands {
            results.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        settle_device(shared, ready, outcomes).await;
    }
}

/// One device's messages, ready to run: the commands, and what each message became.
struct Prepared {
    device: DeviceId,
    items: Vec<Item>,
    /// Index into the device's commands, for the messages that produced one.
    runs: Vec<Option<usize>>,
    /// Messages recognised as redelivered copies of recorded ones.
    already: Vec<bool>,
    commands: Vec<DeviceCommand>,
    has_commands: bool,
}

/// Builds a device's commands; `None` when its messages were dead-lettered (unknown device)
/// or left unacked for the broker to deliver again (the bridge is stopping).
async fn prepare_device(shared: &Shared, device: DeviceId, items: Vec<Item>) -> Option<Prepared> {
    match ensure_known(shared, &device).await {
        Ok(()) => {}
        Err(NotAdmitted::Refused(reason)) => {
            for item in &items {
                let reason = match &item.parsed {
                    Err(rejection) => rejection.to_string(),
                    Ok(_) => reason.clone(),
                };
                reject(shared, &item.publish, item.received_at, &reason, &[]).await;
            }
            return None;
        }
        // Unacked, the messages come back from the broker to the next bridge.
        Err(NotAdmitted::Stopping) => return None,
    }
    let device = &device;
    let mut items = items;
    keep_readings_past_a_full_document(shared, device, &mut items).await;
    let commands: Vec<Option<DeviceCommand>> = items
        .iter()
        .map(|item| {
            item.parsed
                .as_ref()
                .ok()
                .map(|message| to_command(device, &item.publish, message.clone(), item.received_at))
        })
        .collect();
    let already = recorded_redeliveries(shared, device, &items, &commands).await;
    let mut batch: Vec<DeviceCommand> = Vec::new();
    let mut runs: Vec<Option<usize>> = Vec::with_capacity(items.len());
    for (command, seen) in commands.into_iter().zip(&already) {
        match command {
            // A redelivered copy of a message recorded long ago: nothing to do but ack.
            Some(_) if *seen => runs.push(None),
            Some(command) => {
                runs.push(Some(batch.len()));
                batch.push(command);
            }
            None => runs.push(None),
        }
    }
    Some(Prepared {
        device: device.clone(),
        items,
        runs,
        already,
        has_commands: !batch.is_empty(),
        commands: batch,
    })
}

/// A telemetry message whose status part the device's reported document has no room for
/// (past its caps) would be refused whole, readings included. Its status is dropped instead,
/// with the reason, and the readings and location go in; the status part goes to the dead
/// letter of a partially accepted message. Judged on this process's copy of the device (the
/// aggregate checks again: if that copy was stale, the message is refused whole and
/// dead-lettered, never lost silently).
async fn keep_readings_past_a_full_document(
    shared: &Shared,
    device: &DeviceId,
    items: &mut [Item],
) {
    let has_status = |item: &Item| matches!(&item.parsed, Ok(DeviceMessage::Telemetry(t)) if !t.status.is_empty());
    if !items.iter().any(has_status) {
        return;
    }
    let Ok(mut reported) = shared
        .bus
        .devices()
        .inspect_cached(device.as_str(), |device, _| device.reported.clone())
        .await
    else {
        return;
    };
    for item in items.iter_mut() {
        let status = match &mut item.parsed {
            Ok(DeviceMessage::Telemetry(telemetry)) if !telemetry.status.is_empty() => {
                if telemetry.readings.is_empty() && telemetry.location.is_none() {
                    // Nothing else to keep: the aggregate refuses it whole, with the reason.
                    continue;
                }
                match Device::reported_room_for(&reported, &telemetry.status) {
                    Ok(()) => &telemetry.status,
                    Err(refusal) => {
                        telemetry.status.clear();
                        telemetry.dropped.push(Dropped {
                            field: "status".into(),
                            reason: refusal.to_string(),
                        });
                        continue;
                    }
                }
            }
            Ok(DeviceMessage::Status(status)) => &*status,
            _ => continue,
        };
        fleetlog_domain::device::merge_properties(&mut reported, status);
    }
}

/// Acks each message of a device once its fate is sealed: committed, a recognised copy, or
/// dead-lettered with its reason.
async fn settle_device(shared: &Shared, ready: Prepared, outcomes: Vec<Result<(), String>>) {
    let Prepared {
        items,
        runs,
        already,
        ..
    } = ready;
    for ((item, run), seen) in items.iter().zip(runs).zip(already) {
        if seen {
            shared.stats.record(Outcome::Accepted);
            ack(shared, &item.publish).await;
            continue;
        }
        match (run, &item.parsed) {
            (Some(at), Ok(message)) => match &outcomes[at] {
                Ok(()) => {
                    let dropped = message.dropped();
                    if dropped.is_empty() {
                        shared.stats.record(Outcome::Accepted);
                        ack(shared, &item.publish).await;
                    } else {
                        // The valid part is in; what was dropped is kept with its reasons.
                        let reason =
                            format!("partially accepted: {} part(s) dropped", dropped.len());
                        if publish_dead_letter(
                            shared,
                            &item.publish,
                            item.received_at,
                            &reason,
                            dropped,
                        )
                        .await
                        {
                            shared.stats.record(Outcome::PartiallyAccepted);
                            ack(shared, &item.publish).await;
                        }
                    }
                }
                Err(refusal) => {
                    reject(shared, &item.publish, item.received_at, refusal, &[]).await;
                }
            },
            (_, Err(rejection)) => {
                reject(
                    shared,
                    &item.publish,
                    item.received_at,
                    &rejection.to_string(),
                    &[],
                )
                .await;
            }
            (None, Ok(_)) => unreachable!("every parsed message has a command"),
        }
    }
}

/// How far back a redelivered copy is looked for in the event store.
const REDELIVERY_LOOKBACK: i64 = 5_000;

/// The first wait before a Postgres or NATS operation of the bridge is tried again; the waits
/// double up to [`RETRY_CEILING`]. Every retry holds its shard back, and with it the broker.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
const RETRY_CEILING: Duration = Duration::from_secs(10);

/// Marks the messages the broker redelivered (DUP) whose digest is already recorded
/// further back than the aggregate's own window of recent digests: a long in-flight window
/// for one device cannot turn a redelivery into a duplicate event. Only DUP copies pay for
/// this look-up, and only after a crash or a lost connection.
async fn recorded_redeliveries(
    shared: &Shared,
    device: &DeviceId,
    items: &[Item],
    commands: &[Option<DeviceCommand>],
) -> Vec<bool> {
    let wanted: Vec<String> = items
        .iter()
        .zip(commands)
        .filter(|(item, _)| item.publish.dup)
        .filter_map(|(_, command)| command.as_ref().and_then(digest_of))
        .collect();
    if wanted.is_empty() {
        return vec![false; items.len()];
    }
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let found: Vec<String> = loop {
        // The data-plane reports are those that record a digest.
        let lookup = fleetlog_eventlog::recent_digests(
            shared.bus.pool(),
            device.as_str(),
            DeviceEvent::DATA_PLANE,
            &wanted,
            REDELIVERY_LOOKBACK,
        )
        .await;
        match lookup {
            Ok(found) => break found,
            Err(error) => {
                tracing::warn!(%error, "cannot look up redelivered messages; retrying");
                if !backoff.wait(&shared.stop).await {
                    break Vec::new();
                }
            }
        }
    };
    items
        .iter()
        .zip(commands)
        .map(|(item, command)| {
            item.publish.dup
                && command
                    .as_ref()
                    .and_then(digest_of)
                    .is_some_and(|digest| found.contains(&digest))
        })
        .collect()
}

/// The digest a command records, for the kinds that record one.
fn digest_of(command: &DeviceCommand) -> Option<String> {
    match command {
        DeviceCommand::RecordTelemetry { digest, .. } => Some(digest.clone()),
        DeviceCommand::ReportStatus {
            delivery: Some(delivery),
            ..
        }
        | DeviceCommand::Heartbeat {
            delivery: Some(delivery),
            ..
        } => Some(delivery.digest.clone()),
        _ => None,
    }
}

fn to_command(
    device: &DeviceId,
    publish: &Publish,
    message: DeviceMessage,
    received_at: DateTime<Utc>,
) -> DeviceCommand {
    let identity = match &message {
        DeviceMessage::Telemetry(telemetry) if telemetry.is_timestamped() => {
            Identity::of_timestamped(device, &publish.payload)
        }
        _ => Identity::of_mqtt(device, &publish.payload, publish.pkid, publish.dup),
    };
    message.into_command(identity, received_at)
}

/// Executes every device's batch in one go, retrying for as long as Postgres is unreachable.
/// For each device in order, the outcome of each of its commands; `None` only when shutting
/// down before it committed.
async fn execute_until_done(
    shared: &Shared,
    work: Vec<(String, Vec<DeviceCommand>, CommandMetadata)>,
) -> Option<Vec<Vec<Result<(), String>>>> {
    if work.is_empty() {
        return Some(Vec::new());
    }
    let mut outcomes: Vec<Option<Vec<Result<(), String>>>> = vec![None; work.len()];
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    loop {
        // Only the devices not yet committed: one that committed must not run twice.
        let pending: Vec<usize> = (0..work.len()).filter(|i| outcomes[*i].is_none()).collect();
        if pending.is_empty() {
            return Some(outcomes.into_iter().flatten().collect());
        }
        let batch = pending.iter().map(|i| work[*i].clone()).collect();
        let results = shared.bus.devices().execute_many(batch).await;
        let mut failure = None;
        for (index, result) in pending.into_iter().zip(results) {
            match result {
                Ok(done) => {
                    outcomes[index] = Some(
                        done.outcomes
                            .into_iter()
                            .map(|outcome| outcome.map(|_| ()).map_err(|e| e.to_string()))
                            .collect(),
                    );
                }
                // Only an aggregate that refused after writing events ends a batch; no Device
                // command does that, but if one did, each message gets the refusal.
                Err(CommandError::Refused(refusal)) => {
                    outcomes[index] = Some(
                        work[index]
                            .1
                            .iter()
                            .map(|_| Err(refusal.to_string()))
                            .collect(),
                    );
                }
                // Final like a refusal: retrying would stall the shard behind it forever.
                Err(unstorable @ CommandError::Unstorable { .. }) => {
                    let reason = unstorable.to_string();
                    outcomes[index] =
                        Some(work[index].1.iter().map(|_| Err(reason.clone())).collect());
                }
                Err(error) => failure = Some(error.to_string()),
            }
        }
        if let Some(error) = failure {
            let delay = backoff.next_delay();
            tracing::warn!(%error, retry_in = ?delay, "cannot record device messages; retrying");
            if !sleep_unless_shut_down(delay, &shared.stop).await {
                return None;
            }
        }
    }
}

/// Why a device's messages are not taken in. Only a refusal is for good; the decision is the
/// variant, never the text.
#[derive(Debug, thiserror::Error)]
enum NotAdmitted {
    /// The device may not send (unknown, decommissioned): its messages are dead-lettered
    /// with this reason.
    #[error("{0}")]
    Refused(String),
    /// The bridge is stopping while Postgres fails: the messages stay unacked, and the broker
    /// delivers them again.
    #[error("ingest is stopping")]
    Stopping,
}

/// `Ok` when the device is registered (or was just auto-registered), else why not. Postgres
/// failing is retried, never a refusal.
async fn ensure_known(shared: &Shared, device: &DeviceId) -> Result<(), NotAdmitted> {
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    let mut latest = false;
    let lifecycle = loop {
        let devices = shared.bus.devices();
        let lookup = if latest {
            devices
                .inspect(device.as_str(), |device, _| device.lifecycle)
                .await
        } else {
            devices
                .inspect_cached(device.as_str(), |device, _| device.lifecycle)
                .await
        };
        match lookup {
            // The cached copy may predate a registration made a moment ago through the API,
            // in another process: an unknown device is looked up once more in the store.
            Ok(Lifecycle::Unregistered) if !latest => latest = true,
            Ok(lifecycle) => break lifecycle,
            Err(error) => {
                tracing::warn!(device = %device, %error, "cannot load device; retrying");
                if !backoff.wait(&shared.stop).await {
                    return Err(NotAdmitted::Stopping);
                }
            }
        }
    };
    match (lifecycle, &shared.auto_register_tenant) {
        (Lifecycle::Active, _) => Ok(()),
        (Lifecycle::Decommissioned, _) => Err(NotAdmitted::Refused(
            DeviceError::Decommissioned.to_string(),
        )),
        (Lifecycle::Unregistered, None) => Err(NotAdmitted::Refused(format!(
            "unknown device {device}; register it first (or enable auto-registration)"
        ))),
        (Lifecycle::Unregistered, Some(tenant)) => auto_register(shared, device, tenant).await,
    }
}

/// Registers `device` into `tenant`, retrying while Postgres fails or writers race.
async fn auto_register(
    shared: &Shared,
    device: &DeviceId,
    tenant: &TenantId,
) -> Result<(), NotAdmitted> {
    let owner = UserId::parse("system-ingest").map_err(|e| NotAdmitted::Refused(e.to_string()))?;
    let metadata = CommandMetadata::new("system:ingest").with_tenant(tenant.clone());
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    loop {
        let register = DeviceCommand::Register {
            device_id: device.clone(),
            tenant: tenant.clone(),
            owner: owner.clone(),
            name: device.to_string(),
            model: "unknown".into(),
            tags: vec!["auto-registered".into()],
            at: Utc::now(),
        };
        let registered = shared
            .bus
            .devices()
            .execute(device.as_str(), register, &metadata)
            .await;
        match registered {
            Ok(_) | Err(CommandError::Refused(DeviceError::AlreadyRegistered)) => {
                tracing::info!(device = %device, tenant = %tenant, "auto-registered device");
                return Ok(());
            }
            Err(
                error @ (CommandError::Refused(_)
                | CommandError::Unstorable { .. }
                | CommandError::VersionMismatch { .. }),
            ) => {
                return Err(NotAdmitted::Refused(format!(
                    "auto-registration failed: {error}"
                )))
            }
            Err(error @ (CommandError::Conflict { .. } | CommandError::Store(_))) => {
                let delay = backoff.next_delay();
                tracing::warn!(device = %device, %error, retry_in = ?delay, "cannot auto-register; retrying");
                if !sleep_unless_shut_down(delay, &shared.stop).await {
                    return Err(NotAdmitted::Stopping);
                }
            }
        }
    }
}

/// Dead-letters a message and acks it once the dead letter is stored; if it cannot be stored,
/// the message stays unacked and comes back.
async fn reject(
    shared: &Shared,
    publish: &Publish,
    received_at: DateTime<Utc>,
    reason: &str,
    dropped: &[Dropped],
) {
    metrics::counter!("fleetlog_ingest_rejections_total").increment(1);
    if publish_dead_letter(shared, publish, received_at, reason, dropped).await {
        shared.stats.record(Outcome::Rejected);
        ack(shared, publish).await;
    }
}

async fn publish_dead_letter(
    shared: &Shared,
    publish: &Publish,
    received_at: DateTime<Utc>,
    reason: &str,
    dropped: &[Dropped],
) -> bool {
    tracing::debug!(
        topic = publish.topic,
        reason,
        "dead-lettering device message"
    );
    let (payload, payload_encoding) = match std::str::from_utf8(&publish.payload) {
        Ok(text) => (text.to_string(), "utf-8"),
        Err(_) => (hex::encode(&publish.payload), "hex"),
    };
    let letter = DeadLetter {
        topic: &publish.topic,
        payload,
        payload_encoding,
        reason: reason.to_string(),
        dropped,
        received_at,
    };
    let body = match serde_json::to_vec(&letter) {
        Ok(body) => Bytes::from(body),
        Err(error) => {
            tracing::error!(%error, "cannot encode a dead letter");
            return false;
        }
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Fleetlog-Reason",
        reason.replace(['\r', '\n'], " ").as_str(),
    );
    headers.insert("Fleetlog-Topic", publish.topic.as_str());
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_CEILING);
    loop {
        let stored = async {
            shared
                .jetstream
                .publish_with_headers(DEAD_LETTER_SUBJECT, headers.clone(), body.clone())
                .await?
                .await?;
            Ok::<(), async_nats::Error>(())
        }
        .await;
        match stored {
            Ok(()) => return true,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?delay, "cannot store a dead letter; retrying");
                // The stream may be missing (a fresh NATS): create it before the next try.
                if let Err(error) = ensure_dead_letter_stream(&shared.jetstream).await {
                    tracing::debug!(%error, "cannot create the dead-letter stream yet");
                }
                if !sleep_unless_shut_down(delay, &shared.stop).await {
                    return false;
                }
            }
        }
    }
}

async fn ack(shared: &Shared, publish: &Publish) {
    if let Err(error) = shared.client.ack(publish).await {
        // The broker redelivers it after a reconnect; its digest makes that harmless.
        tracing::warn!(%error, topic = publish.topic, "cannot ack message");
    }
}
