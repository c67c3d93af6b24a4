//! Dead letters: a message that cannot go in is published with its reason on
//! `fleetlog.deadletter.ingest`, then acknowledged; never before it is stored.

use super::*;

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

/// Dead-letters a message and acks it once the dead letter is stored; if it cannot be stored,
/// the message stays unacked and comes back.
pub(super) async fn reject(
    shared: &Shared,
    publish: &Publish,
    received_at: DateTime<Utc>,
    reason: &str,
    dropped: &[Dropped],
) {
    metrics::counter!("fleetlog_ingest_rejections_total").increment(1);
    if publish_dead_letter(shared, publish, received_at, reason, dropped).await {
        shared.stats.record(Outcome::Rejected);
        ack(shared, publish);
    }
}

pub(super) async fn publish_dead_letter(
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
