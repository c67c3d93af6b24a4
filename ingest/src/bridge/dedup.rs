//! Redelivered copies: a message the broker sends again after a crash or a lost connection
//! is recognised by its digest and changes nothing twice.

use super::*;

/// How far back a redelivered copy is looked for in the event store.
const REDELIVERY_LOOKBACK: i64 = 5_000;

/// Marks the messages the broker redelivered (DUP) whose digest is already recorded
/// further back than the aggregate's own window of recent digests: a long in-flight window
/// for one device cannot turn a redelivery into a duplicate event. Only DUP copies pay for
/// this look-up, and only after a crash or a lost connection.
pub(super) async fn recorded_redeliveries(
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
