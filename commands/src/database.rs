//! Connecting to Postgres and applying the schema.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The schema migrations, embedded at build time from the workspace's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a connection pool.
///
/// Connections are not pinged before each use (sqlx's default): that is a round trip per
/// transaction on the hot paths. A connection that died is found by the statement that uses
/// it, and every caller already retries database errors.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect(url)
        .await
}

/// Applies every migration not applied yet; a second run does nothing.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
