//! A message that keeps failing is passed over: recorded with its reason, its position moved
//! past it, published on the dead-letter subject, and acked, so it blocks nothing.

use super::*;

impl<P: Projection> Worker<P> {
    /// Records the message as dead, moves the position past it (so the aggregate's later
    /// events are not stuck behind it) and publishes it on the dead-letter subject.
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

/// Passes over an event the projection cannot apply, where no message is to be acked (a
/// replay's shadow, the write side's inline models): moves the position past it and records it
/// in `projection_dead_letters`, unless it is recorded there already (by the live worker or an
/// earlier replay).
pub(crate) async fn pass_over<P: Projection>(
    connection: &mut PgConnection,
    event: &EventEnvelope,
    reason: &str,
) -> Result<(), sqlx::Error> {
    move_position_past::<P>(connection, event).await?;
    let message = serde_json::to_string(event).unwrap_or_default();
    sqlx::query(
        "INSERT INTO public.projection_dead_letters
           (projection, aggregate_type, aggregate_id, sequence, reason, message)
         SELECT $1, $2, $3, $4, $5, $6
          WHERE NOT EXISTS (SELECT 1 FROM public.projection_dead_letters
                             WHERE projection = $1 AND aggregate_type = $2
                               AND aggregate_id = $3 AND sequence = $4)",
    )
    .bind(P::NAME)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(reason)
    .bind(message)
    .execute(connection)
    .await?;
    Ok(())
}
