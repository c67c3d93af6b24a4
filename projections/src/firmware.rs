//! The `firmware` read model: the catalog of firmware images.

use fleetlog_domain::firmware::FirmwareEvent;
use fleetlog_eventlog::EventEnvelope;
use sqlx::PgConnection;

use crate::worker::{Projection, ProjectionError};

/// Keeps `firmware`.
#[derive(Debug, Clone, Copy, Default)]
pub struct FirmwareProjection;

impl Projection for FirmwareProjection {
    const NAME: &'static str = "firmware";
    const AGGREGATE_TYPE: &'static str = "firmware";
    const TABLES: &'static [&'static str] = &["firmware"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        let id = envelope.aggregate_id.as_str();
        match envelope.payload.decode()? {
            FirmwareEvent::FirmwareRegistered {
                firmware_id,
                tenant,
                sha256,
                size_bytes,
                storage_key,
                compatible_models,
                notes,
                at,
            } => {
                sqlx::query(
                    "INSERT INTO firmware (firmware_id, tenant, model, version, sha256, size_bytes,
                       storage_key, compatible_models, notes, status, registered_at, last_sequence)
                     VALUES ($1, $3, $4, $5, $6, $7, $8, $9, $10, 'draft', $11, $2)",
                )
                .bind(id)
                .bind(envelope.sequence)
                .bind(tenant.as_str())
                .bind(firmware_id.model())
                .bind(firmware_id.version().to_string())
                .bind(sha256)
                .bind(size_bytes as i64)
                .bind(storage_key)
                .bind(compatible_models)
                .bind(notes)
                .bind(at)
                .execute(connection)
                .await?;
            }
            FirmwareEvent::FirmwareReleased { signature, at } => {
                let (key_id, signature) = signature
                    .map(|s| (Some(s.key_id), Some(s.signature)))
                    .unwrap_or_default();
                sqlx::query(
                    "UPDATE firmware SET status = 'released', released_at = $3, last_sequence = $2,
                            signature = $4, signing_key_id = $5
                      WHERE firmware_id = $1",
                )
                .bind(id)
                .bind(envelope.sequence)
                .bind(at)
                .bind(signature)
                .bind(key_id)
                .execute(connection)
                .await?;
            }
            FirmwareEvent::FirmwareDeprecated { reason, at, .. } => {
                sqlx::query(
                    "UPDATE firmware SET status = 'deprecated', deprecated_at = $3,
                            deprecation_reason = $4, last_sequence = $2
                      WHERE firmware_id = $1",
                )
                .bind(id)
                .bind(envelope.sequence)
                .bind(at)
                .bind(reason)
                .execute(connection)
                .await?;
            }
        }
        Ok(())
    }
}
