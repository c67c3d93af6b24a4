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
                // A session that subscribed to provisioning requests when this instance had
                // the credential key keeps them: without the key it takes them no more.
                if settings.device_key.is_none() {
                    for filter in provisioning::filters(settings) {
                        let _ = client.unsubscribe(filter).await;
                    }
                }
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
                let delay = backoff.next_delay();
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

/// Sends the acks still queued and says goodbye, within a short grace period.
pub(super) async fn flush_and_disconnect(client: &AsyncClient, mut events: EventLoop) {
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

pub(super) async fn ack(shared: &Shared, publish: &Publish) {
    if let Err(error) = shared.client.ack(publish).await {
        // The broker redelivers it after a reconnect; its digest makes that harmless.
        tracing::warn!(%error, topic = publish.topic, "cannot ack message");
    }
}
