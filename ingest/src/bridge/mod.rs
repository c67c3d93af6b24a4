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
//!
//! By concern: `connection.rs` (the MQTT event loop), `shard.rs` (a round of a shard),
//! `dedup.rs` (redelivered copies), `dead_letter.rs` and `stats.rs`; this file holds the
//! settings and the bridge that starts them.

mod connection;
mod dead_letter;
mod dedup;
mod provisioning;
mod shard;
mod stats;
mod turn;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use fleetlog_commands::credentials::DeviceCredentialKey;
use fleetlog_commands::{CommandBus, CommandError, CommandMetadata};
use fleetlog_domain::device::{Device, DeviceCommand, DeviceError, DeviceEvent, Lifecycle};
use fleetlog_domain::DeviceId;
use fleetlog_nats::topology::ensure_dead_letter_stream;
use fleetlog_nats::{sleep_unless_shut_down, Backoff};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use fleetlog_broker::BrokerUrl;
use fleetlog_protocol::message::{
    parse_payload, parse_topic, DeviceMessage, Dropped, Identity, Rejection,
};

use connection::{ack, flush_and_disconnect, poll_events, run_acker, Ack};
use dead_letter::{publish_dead_letter, reject};
use dedup::recorded_redeliveries;
use shard::{run_shard, shard_of, Item};
pub use stats::IngestStats;
use stats::Outcome;

/// Dead letters of the bridge go to `fleetlog.deadletter.ingest` (under
/// [`fleetlog_nats::topology::DEAD_LETTER_PREFIX`]).
pub const DEAD_LETTER_SUBJECT: &str = "fleetlog.deadletter.ingest";

/// The most requests (acks, subscriptions) the bridge's MQTT client queues for its event loop.
pub const CLIENT_REQUESTS: usize = 10_000;

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
    /// `None` subscribes plainly, and instances of one client id take turns: one serves, the
    /// others stand by (see [`Ingest::run`]).
    pub share_group: Option<String>,
    /// How often a standby asks for the turn, and the holder checks it still has it.
    pub standby_interval: Duration,
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
    /// The key device secrets derive from: with it, the bridge answers provisioning requests
    /// (`fleetlog/provisioning/{key_id}/{request_id}/request`); without, it does not subscribe
    /// to them.
    pub device_key: Option<DeviceCredentialKey>,
}

impl IngestSettings {
    /// Defaults for `broker`.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            client_id: "fleetlog.ingest".into(),
            topic_root: "devices".into(),
            share_group: Some("fleetlog-ingest".into()),
            standby_interval: Duration::from_millis(500),
            shards: 2,
            max_batch: 500,
            linger: Duration::from_millis(5),
            inflight: 1000,
            report_every: Duration::from_secs(300),
            // Short at first: after a broker restart the shared subscription must be back
            // before devices publish again (see `connection::check_broker_version`).
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(300),
            device_key: None,
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
        .chain(
            self.device_key
                .is_some()
                .then(|| fleetlog_protocol::provisioning::REQUEST_FILTER.to_string()),
        )
        .map(share)
        .collect()
    }
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
    ///
    /// With a shared subscription every instance serves at once. With a plain one, instances
    /// of one client id take turns ([`turn`]): the one holding the turn is connected, the
    /// others stand by and take the session over, with what the broker queued in it, when the
    /// holder goes away.
    pub async fn run(self, shutdown: CancellationToken) {
        let _ = self.stats.started.set(Instant::now());
        if self.settings.share_group.is_some() {
            self.serve(&shutdown).await;
            return;
        }
        let pool = self.bus.pool().clone();
        while let Some(held) = turn::wait_for_turn(&pool, &self.settings, &shutdown).await {
            tracing::info!(client_id = %self.settings.client_id, "ingest has its turn: connecting");
            let serving = shutdown.child_token();
            // In this task, not spawned: if serving panics or the task is aborted, the lock's
            // connection goes with it and the turn passes on.
            let serve = async {
                self.serve(&serving).await;
                serving.cancel();
            };
            tokio::join!(
                serve,
                turn::watch_turn(held, self.settings.standby_interval, &serving)
            );
            if shutdown.is_cancelled() {
                break;
            }
            tracing::warn!(
                client_id = %self.settings.client_id,
                "ingest lost its turn (its Postgres connection went away); standing by"
            );
        }
        tracing::info!("ingest stopped");
    }

    /// Connects and handles messages until `shutdown`.
    async fn serve(&self, shutdown: &CancellationToken) {
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
        let (client, mut events) = AsyncClient::new(options, CLIENT_REQUESTS);
        events.set_network_options(fleetlog_broker::network_options());
        let (acks, queued_acks) = mpsc::unbounded_channel();
        let acker = tokio::spawn(run_acker(client.clone(), queued_acks));
        let shared = Arc::new(Shared {
            bus: self.bus.clone(),
            jetstream: self.jetstream.clone(),
            acks,
            topic_root: settings.topic_root.clone(),
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

        let answers = tokio_util::task::TaskTracker::new();
        let events = poll_events(self, &client, events, &senders, &answers, shutdown).await;
        // Let the shards finish what they hold, and the provisioning answers go out, then send
        // their acks before leaving.
        drop(senders);
        answers.close();
        answers.wait().await;
        let mut panicked = None;
        while let Some(finished) = shards.join_next().await {
            if let Err(error) = finished {
                if error.is_panic() && panicked.is_none() {
                    panicked = Some(error.into_panic());
                }
            }
        }
        reporter.abort();
        // The last sender of acks: the acker ends once it has handed them all over.
        drop(shared);
        flush_and_disconnect(&client, events, acker).await;
        self.stats.set_connected(false);
        self.stats.report(true);
        // A shard that panicked ended the bridge: pass the panic on, so the supervisor
        // restarts the role (what that shard held is redelivered by the broker), instead of
        // this looking like a clean stop.
        if let Some(panic) = panicked {
            std::panic::resume_unwind(panic);
        }
        if self.settings.share_group.is_some() {
            tracing::info!("ingest stopped");
        }
    }
}

/// What the shards share.
struct Shared {
    bus: CommandBus,
    jetstream: Context,
    /// Where acks go (see [`connection::ack`]).
    acks: mpsc::UnboundedSender<Ack>,
    topic_root: String,
    stats: Arc<IngestStats>,
    stop: CancellationToken,
}

/// The first wait before a Postgres or NATS operation of the bridge is tried again; the waits
/// double up to [`RETRY_CEILING`]. Every retry holds its shard back, and with it the broker.
const RETRY_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two tries.
const RETRY_CEILING: Duration = Duration::from_secs(10);
