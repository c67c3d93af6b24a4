//! A message that keeps failing is passed over: recorded with its reason, its position moved
//! past it, published on the dead-letter subject, and acked, so it blocks nothing.

use super::*;

impl<P: Projection, C: Companion> Worker<P, C> {
    /// Records the message as dead, moves the position past it (so the aggregate's later
    /// events are not stuck behind it) and publishes it on the dead-letter subject. A
    /// companion does not get the event either; a replay of its model tries it again.
    pub(super) async fn dead_letter(
        &self,
        message: &Message,
        event: Option<&EventEnvelope>,
        reason: &str,
    ) -> Outcome {
        tracing::error!(projection = P::NAME, reason, "dead-lettering message");
        let body = String::from_utf8_lossy(&message.payload).into_owned();
        let recorded = async {
            let mut tx = self.pool.begin().await?;
            if let Some(event) = event {
                move_position_past::<P>(&mut tx, event).await?;
            }
            sqlx::query(
                "INSERT INTO projection_dead_letters
                   (projection, aggregate_type, aggregate_id, sequence, reason, message)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(P::NAME)
            .bind(event.map(|e| e.aggregate_type.as_str()))
            .bind(event.map(|e| e.aggregate_id.as_str()))
            .bind(event.map(|e| e.sequence))
            .bind(reason)
            .bind(&body)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        };
        if let Err(error) = recorded.await {
            tracing::warn!(projection = P::NAME, %error, "cannot record dead letter; will retry");
            return Outcome::Retried;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Fleetlog-Projection", P::NAME);
        headers.insert(
            "Fleetlog-Reason",
            reason.replace(['\r', '\n'], " ").as_str(),
        );
        if let Some(event) = event {
            headers.insert(
                "Nats-Msg-Id",
                format!("{}:{}", P::NAME, event.message_id()).as_str(),
            );
        }
        let subject = format!("{DEAD_LETTER_PREFIX}.{}", P::NAME);
        let published = self
            .jetstream
            .publish_with_headers(subject, headers, Bytes::from(body))
            .await;
        match published {
            Ok(ack) => {
                if let Err(error) = ack.await {
                    tracing::warn!(projection = P::NAME, %error, "dead letter not confirmed by JetStream; it is in projection_dead_letters");
                }
            }
            Err(error) => {
                tracing::warn!(projection = P::NAME, %error, "cannot publish dead letter; it is in projection_dead_letters");
            }
        }
        Outcome::DeadLettered
    }
}
