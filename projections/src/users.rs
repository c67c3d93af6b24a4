//! The `users` read model: users with their roles and state, and no secret of theirs.

use fleetlog_domain::user::{Role, UserEvent};
use fleetlog_eventlog::EventEnvelope;
use sqlx::PgConnection;

use crate::worker::{Projection, ProjectionError};

/// Keeps `users`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsersProjection;

fn role_names(roles: &[Role]) -> Vec<String> {
    roles.iter().map(|r| r.as_str().to_string()).collect()
}

impl Projection for UsersProjection {
    const NAME: &'static str = "users";
    const AGGREGATE_TYPE: &'static str = "user";
    const TABLES: &'static [&'static str] = &["users"];

    async fn apply(
        &self,
        connection: &mut PgConnection,
        envelope: &EventEnvelope,
    ) -> Result<(), ProjectionError> {
        let id = envelope.aggregate_id.as_str();
        let sequence = envelope.sequence;
        let (assignments, at) = match envelope.payload.decode()? {
            UserEvent::UserRegistered {
                tenant,
                username,
                roles,
                at,
                ..
            } => {
                sqlx::query(
                    "INSERT INTO users (user_id, tenant, username, roles, registered_at,
                                        updated_at, last_sequence)
                     VALUES ($1, $3, $4, $5, $6, $6, $2)",
                )
                .bind(id)
                .bind(sequence)
                .bind(tenant.as_str())
                .bind(username)
                .bind(role_names(&roles))
                .bind(at)
                .execute(connection)
                .await?;
                return Ok(());
            }
            UserEvent::RoleGranted { role, at } => {
                sqlx::query(
                    "UPDATE users SET roles = ARRAY(SELECT DISTINCT r FROM unnest(roles || $3::text) r ORDER BY r),
                            updated_at = $4, last_sequence = $2 WHERE user_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(role.as_str())
                .bind(at)
                .execute(connection)
                .await?;
                return Ok(());
            }
            UserEvent::RoleRevoked { role, at } => {
                sqlx::query(
                    "UPDATE users SET roles = array_remove(roles, $3::text), updated_at = $4,
                            last_sequence = $2 WHERE user_id = $1",
                )
                .bind(id)
                .bind(sequence)
                .bind(role.as_str())
                .bind(at)
                .execute(connection)
                .await?;
                return Ok(());
            }
            UserEvent::UserDisabled { at, .. } => ("disabled = true,", at),
            UserEvent::UserEnabled { at } => ("disabled = false,", at),
            UserEvent::SessionOpened { at, .. } => ("last_login_at = $3,", at),
            // Secrets and sessions change; nothing this model shows does.
            UserEvent::PasswordChanged { at, .. }
            | UserEvent::SessionRotated { at, .. }
            | UserEvent::SessionRevoked { at, .. } => ("", at),
        };
        sqlx::query(&format!(
            "UPDATE users SET {assignments} updated_at = $3, last_sequence = $2 WHERE user_id = $1"
        ))
        .bind(id)
        .bind(sequence)
        .bind(at)
        .execute(connection)
        .await?;
        Ok(())
    }
}
