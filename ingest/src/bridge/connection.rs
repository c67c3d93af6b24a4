//! The MQTT connection: the event loop that reconnects with backoff, subscribes again, hands
//! each message to its shard, and acknowledges what is safe.

use super::*;

pub(super) async fn poll_events(
    ingest: &Ingest,
    client: &AsyncClient,
    mut events: EventLoop,
    shards: &[mpsc::Sender<Publish>],
    answers: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> EventLoop {
    let settings = &ingest.settings;
    let stats = &ingest.stats;
    let mut backoff = Backoff::new(settings.min_backoff, settings.max_backoff);
    let mut outage_since: Option<std::time::Instant> = None;
    let provisioning_slots = Arc::new(tokio::sync::Semaphore::new(
        provisioning::CONCURRENT_REQUESTS,
    ));
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
                outage_since = None;
                // A session that subscribed to provisioning requests when this instance had
                // the credential key keeps them: without the key it takes them no more.
                if settings.device_key.is_none() {
                    for filter in provisioning::filters(settings) {
                        let _ = client.unsubscribe(filter).await;
                    }
                }
                // Subscribing again is harmless when the session kept the subscriptions, and
                // needed when the broker lost them (see `check_broker_version`).
                if settings.share_group.is_some() {
                    let _ = client
                        .subscribe(BROKER_VERSION_TOPIC, QoS::AtMostOnce)
                        .await;
                }
                for filter in settings.filters() {
                    if let Err(error) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await {
                        tracing::warn!(%error, filter, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish)))
                if publish.topic == BROKER_VERSION_TOPIC =>
            {
                check_broker_version(&String::from_utf8_lossy(&publish.payload));
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
                if provisioning::is_provisioning(&publish.topic) {
                    let (bus, key, client) = (
                        ingest.bus.clone(),
                        settings.device_key.clone(),
                        client.clone(),
                    );
                    // Never a dead letter: a request holds a key's secret. Without a free slot
                    // the request is answered "busy" at once: a flood of requests from one key
                    // never holds the devices' messages back.
                    let slot = provisioning_slots.clone().try_acquire_owned().ok();
                    answers.spawn(async move {
                        let _slot = &slot;
                        provisioning::answer(bus, key, slot.is_some(), client, publish).await;
                    });
                    continue;
                }
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
                let outage = *outage_since.get_or_insert_with(std::time::Instant::now);
                // A broker restart takes a second or two, and on a broker that forgets shared
                // subscriptions (see `check_broker_version`) every moment before this instance
                // subscribes again loses messages: retry at least four times a second for the
                // first ten seconds of an outage, then back off.
                let delay = if outage.elapsed() < FAST_RETRIES_FOR {
                    backoff.next_delay().min(FAST_RETRY)
                } else {
                    backoff.next_delay()
                };
                if let Some(hint) = fleetlog_broker::credential_hint(&error, &settings.broker) {
                    tracing::warn!(%error, retry_in = ?delay, hint, "the broker refused the ingest");
                } else if stats.is_connected() {
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

/// How long into an outage the bridge retries at least every [`FAST_RETRY`].
const FAST_RETRIES_FOR: Duration = Duration::from_secs(10);
const FAST_RETRY: Duration = Duration::from_millis(250);

/// Where Mosquitto says which version it is (`mosquitto version 2.0.11`).
pub(super) const BROKER_VERSION_TOPIC: &str = "$SYS/broker/version";

/// Mosquitto before 2.0.19 does not save shared subscriptions with the sessions it keeps over
/// a restart: after a broker restart the ingest session comes back without its subscription,
/// and whatever devices publish before this instance subscribes again has no subscriber and is
/// dropped by the broker, although it acknowledged the message to the device. The bridge
/// reconnects within a fraction of a second to keep that window short, but only a broker that
/// keeps the subscriptions (or a single ingest without a share group, whose plain subscriptions
/// every version keeps) closes it. Says so, once per connection, and exports it as
/// `fleetlog_ingest_broker_keeps_shared_subscriptions`.
pub(super) fn check_broker_version(announced: &str) {
    let keeps = keeps_shared_subscriptions(announced);
    metrics::gauge!("fleetlog_ingest_broker_keeps_shared_subscriptions")
        .set(if keeps == Some(false) { 0.0 } else { 1.0 });
    if keeps == Some(false) {
        tracing::warn!(
            broker_version = announced,
            "this Mosquitto loses shared subscriptions when it restarts (fixed in 2.0.19): \
             messages devices publish after a broker restart, before ingest subscribes again, \
             are dropped by the broker; upgrade it, or run one ingest with \
             FLEETLOG_INGEST_SHARE_GROUP empty"
        );
    }
}

/// Whether a broker announcing itself as `announced` keeps shared subscriptions over a
/// restart; `None` when it is not a Mosquitto version this knows.
pub(super) fn keeps_shared_subscriptions(announced: &str) -> Option<bool> {
    let version = announced.trim().strip_prefix("mosquitto version ")?;
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    let (major, minor, patch) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    Some((major, minor, patch) >= (2, 0, 19))
}

/// Sends the acks still queued and says goodbye, within a short grace period: the acker
/// hands its last acks to the event loop, which is polled meanwhile so they go out.
pub(super) async fn flush_and_disconnect(
    client: &AsyncClient,
    mut events: EventLoop,
    acker: tokio::task::JoinHandle<()>,
) {
    let goodbye = tokio::spawn({
        let client = client.clone();
        async move {
            let _ = acker.await;
            let _ = client.disconnect().await;
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    goodbye.abort();
}

/// A message's ack, to be sent by the acker: what `AsyncClient::ack` reads of it.
pub(super) struct Ack {
    pkid: u16,
    qos: QoS,
}

/// Acks `publish`: queues its ack for the acker, never waiting. Shards must not wait on the
/// client's request channel: only the event loop drains it, and the event loop itself waits
/// for room in a full shard (backpressure), so a shard waiting there would stop both for good.
/// rumqttc drains one request per read of the socket, so under a steady stream of messages
/// the acks queue up; the acker feeds them in as the event loop takes them.
pub(super) fn ack(shared: &Shared, publish: &Publish) {
    let ack = Ack {
        pkid: publish.pkid,
        qos: publish.qos,
    };
    if shared.acks.send(ack).is_err() {
        // The acker is gone (the bridge is stopping): the broker redelivers the message
        // after a reconnect, and its digest makes that harmless.
        tracing::warn!(
            topic = publish.topic,
            "cannot ack message: the bridge is stopping"
        );
    }
}

/// Feeds the queued acks to the event loop, in the order they were queued, until every sender
/// is gone.
pub(super) async fn run_acker(client: AsyncClient, mut acks: mpsc::UnboundedReceiver<Ack>) {
    while let Some(Ack { pkid, qos }) = acks.recv().await {
        let mut publish = Publish::new("", qos, Vec::new());
        publish.pkid = pkid;
        if let Err(error) = client.ack(&publish).await {
            // The event loop is gone: the broker redelivers what was not acked.
            tracing::warn!(%error, "cannot ack messages: the connection is gone");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keeps_shared_subscriptions;

    #[test]
    fn mosquitto_keeps_shared_subscriptions_from_2_0_19() {
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 2.0.11"),
            Some(false)
        );
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 2.0.18"),
            Some(false)
        );
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 2.0.19"),
            Some(true)
        );
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 2.1.2"),
            Some(true)
        );
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 10.0.0\n"),
            Some(true)
        );
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 1.6.9"),
            Some(false)
        );
        assert_eq!(keeps_shared_subscriptions("EMQX 5.0"), None);
        assert_eq!(keeps_shared_subscriptions("mosquitto version "), None);
        assert_eq!(
            keeps_shared_subscriptions("mosquitto version 99999999999.0.0"),
            None
        );
    }
}
