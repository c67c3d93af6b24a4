//! A shard: the messages of its devices, grouped per device, checked (is the device known,
//! does its document have room), turned into commands and committed, one transaction a round.

use super::*;

/// The shard of a message: by device id, so one device's messages stay in order.
pub(super) fn shard_of(topic: &str, root: &str, shards: usize) -> usize {
    let device = topic
        .strip_prefix(root)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(topic);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

pub(super) async fn run_shard(
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
        // MQTT 3.1.1 carries no trace context: a batch starts its own trace (when the sampler
        // keeps it), which its commands, events and their consumers continue.
        let span = tracing::info_span!(
            "ingest",
            otel.kind = "consumer",
            messaging.system = "mqtt",
            messages = batch.len()
        );
        handle_batch(&shared, std::mem::take(&mut batch))
            .instrument(span)
            .await;
    }
}

/// One message on its way: parsed, or refused with a reason.
pub(super) struct Item {
    pub(super) publish: Publish,
    pub(super) received_at: DateTime<Utc>,
    pub(super) parsed: Result<DeviceMessage, Rejection>,
}

async fn handle_batch(shared: &Shared, batch: Vec<Publish>) {
    let received_at = Utc::now();
    // Group by device, keeping each device's order; topics that name no device go straight to
    // the dead letters.
    let mut devices: Vec<(DeviceId, Vec<Item>)> = Vec::new();
    let mut index: HashMap<DeviceId, usize> = HashMap::new();
    for publish in batch {
        // A retained message comes with a new subscription (a plain one, at every reconnect):
        // the broker stored it when the device sent it, and ingest recorded it then.
        if publish.retain {
            reject(
                shared,
                &publish,
                received_at,
                "a retained message, delivered again with a new subscription: recorded when \
                 it was first sent; devices publish without the retain flag",
                &[],
            )
            .await;
            continue;
        }
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
            // A status the aggregate will refuse changes nothing: the messages after it are
            // judged on the document without it, as the aggregate judges them.
            Ok(DeviceMessage::Status(status)) => match Device::reported_room_for(&reported, status)
            {
                Ok(()) => &*status,
                Err(_) => continue,
            },
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
            ack(shared, &item.publish);
            continue;
        }
        match (run, &item.parsed) {
            (Some(at), Ok(message)) => match &outcomes[at] {
                Ok(()) => {
                    let dropped = message.dropped();
                    if dropped.is_empty() {
                        shared.stats.record(Outcome::Accepted);
                        ack(shared, &item.publish);
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
                            ack(shared, &item.publish);
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

/// `Ok` when the device is registered, else why not. Postgres
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
    match lifecycle {
        Lifecycle::Active => Ok(()),
        Lifecycle::Decommissioned => Err(NotAdmitted::Refused(
            DeviceError::Decommissioned.to_string(),
        )),
        // The broker admits no device the log does not know; a message for one came from a
        // service account (a device simulator) or from before its registration was undone.
        Lifecycle::Unregistered => Err(NotAdmitted::Refused(format!(
            "unknown device {device}; register or provision it first"
        ))),
    }
}
