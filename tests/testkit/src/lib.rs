//! Real servers for fleetlog's integration tests.
//!
//! [`TestDatabase`] gives each test a fresh, migrated Postgres database on the server named by
//! `FLEETLOG_TEST_DATABASE_URL` (the test command starts that server), and drops it afterwards.
//! [`NatsServer`] runs a real nats-server with JetStream on a free port, with a throwaway store
//! directory, killed when dropped. [`MosquittoServer`] does the same for a Mosquitto broker.

pub mod mosquitto;
pub mod nats;

pub use mosquitto::MosquittoServer;
pub use nats::NatsServer;

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// The device credential key every test platform shares, so that what one role issues another
/// derives again (the API issues device secrets, the broker sync sets them at the broker).
pub fn device_key() -> fleetlog_commands::credentials::DeviceCredentialKey {
    fleetlog_commands::credentials::DeviceCredentialKey::new(secrecy::SecretString::from(
        "a test device credential key, long enough",
    ))
    .expect("a long enough key")
}

/// The variable that names the Postgres server tests may create databases on.
pub const DATABASE_URL_VAR: &str = "FLEETLOG_TEST_DATABASE_URL";

/// A fresh database with fleetlog's schema, dropped when the value is dropped.
pub struct TestDatabase {
    /// A pool on the fresh database.
    pub pool: PgPool,
    /// The URL of the fresh database.
    pub url: String,
    admin_url: String,
    name: String,
}

fn admin_url() -> String {
    std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{DATABASE_URL_VAR} is not set. The integration tests need a Postgres server: run \
             `./deploy/local/test.sh`, which starts one and sets it"
        )
    })
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].rfind('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

impl TestDatabase {
    /// Creates and migrates a fresh database.
    pub async fn create() -> Self {
        let database = Self::create_empty().await;
        fleetlog_commands::migrate(&database.pool)
            .await
            .expect("migrate the test database");
        database
    }

    /// Creates a fresh database without fleetlog's schema.
    pub async fn create_empty() -> Self {
        let admin_url = admin_url();
        let name = format!("fleetlog_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test Postgres server");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&url)
            .await
            .expect("connect to the test database");
        Self {
            pool,
            url,
            admin_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside the test's runtime, which is blocked here: the cleanup gets a
        // runtime of its own on another thread, and leaves the pool alone (its connections
        // belong to the blocked runtime). FORCE ends them on the server side.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Appends `copies` copies of an aggregate's last event after it, stamped with transaction ids
/// that straddle a power of ten (half just below it, half from it on), all older than every
/// running transaction, and moves the aggregate's earlier events just before them; returns
/// that power of ten. For tests of everything that orders or
/// compares transaction ids: sorted as text, "10001" comes before "9991", and fresh test
/// clusters never get that far by themselves (they start near 750). The column is an ordinary
/// `xid8` with a default, so the copies can carry the ids such transactions would have had;
/// a few hundred transaction ids are burned first where the cluster is younger than 1,000.
pub async fn append_copies_across_a_power_of_ten(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    copies: u32,
) -> u64 {
    let half = u64::from(copies / 2);
    let current = || async {
        let current: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
            .fetch_one(pool)
            .await
            .expect("read the transaction id");
        current.parse::<u64>().expect("an xid8 prints as digits")
    };
    let mut now = current().await;
    while now < 1_000 + u64::from(copies) + 10 {
        sqlx::raw_sql("DO $$ BEGIN FOR i IN 1..100 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
            .execute(pool)
            .await
            .expect("burn transaction ids");
        now = current().await;
    }
    let mut boundary = 1_000_u64;
    while (boundary * 10) + u64::from(copies) + 10 < now {
        boundary *= 10;
    }
    // The aggregate's own events move just before the copies, so its sequence still rises with
    // the transaction ids, as it does for real transactions.
    sqlx::query(
        "UPDATE events e SET transaction_id = ($3::bigint - $4::bigint - o.back)::text::xid8
           FROM (SELECT sequence, count(*) OVER (ORDER BY sequence DESC) AS back FROM events
                  WHERE aggregate_type = $1 AND aggregate_id = $2) o
          WHERE e.aggregate_type = $1 AND e.aggregate_id = $2 AND e.sequence = o.sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(boundary as i64)
    .bind(half as i64)
    .execute(pool)
    .await
    .expect("move the aggregate's events before the copies");
    let inserted = sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, transaction_id)
         SELECT t.aggregate_type, t.aggregate_id, t.sequence + n, t.event_type, t.event_version,
                t.payload, t.metadata, ($3::bigint - $4::bigint + n - 1)::text::xid8
           FROM (SELECT * FROM events WHERE aggregate_type = $1 AND aggregate_id = $2
                  ORDER BY sequence DESC LIMIT 1) t,
                generate_series(1, $5::bigint) n
          ORDER BY n",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(boundary as i64)
    .bind(half as i64)
    .bind(i64::from(copies))
    .execute(pool)
    .await
    .expect("append copies across a power of ten");
    assert_eq!(inserted.rows_affected(), u64::from(copies));
    boundary
}

/// Waits (up to 30 s) until `projection` has applied every stored event of `aggregate_type`,
/// judged by its positions: `devices.last_sequence` for the devices projection, the readings'
/// rows for the telemetry projection (it keeps no positions), `projection_positions` for the
/// others. Panics on timeout.
pub async fn wait_until_projected(pool: &PgPool, projection: &str, aggregate_type: &str) {
    let behind_query = match projection {
        "devices" => {
            "SELECT count(*) FROM (
                 SELECT aggregate_id, max(sequence) AS last FROM events
                  WHERE aggregate_type = $2 GROUP BY aggregate_id) latest
             LEFT JOIN devices d ON d.device_id = latest.aggregate_id
             WHERE d.last_sequence IS DISTINCT FROM latest.last AND $1 = 'devices'"
        }
        "telemetry" => {
            "SELECT count(*) FROM events e
              WHERE e.aggregate_type = $2 AND e.event_type = 'TelemetryRecorded' AND $1 = 'telemetry'
                AND json_array_length(e.payload -> 'TelemetryRecorded' -> 'readings') > 0
                AND NOT EXISTS (SELECT 1 FROM telemetry t
                                 WHERE t.device_id = e.aggregate_id AND t.sequence = e.sequence)"
        }
        _ => {
            "SELECT count(*) FROM (
                 SELECT aggregate_id, max(sequence) AS last FROM events
                  WHERE aggregate_type = $2 GROUP BY aggregate_id) latest
             LEFT JOIN projection_positions p
                    ON p.projection = $1 AND p.aggregate_type = $2
                   AND p.aggregate_id = latest.aggregate_id
             WHERE p.last_sequence IS DISTINCT FROM latest.last"
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let behind: i64 = sqlx::query_scalar(behind_query)
            .bind(projection)
            .bind(aggregate_type)
            .fetch_one(pool)
            .await
            .expect("read projection positions");
        if behind == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{projection} is still {behind} aggregates behind"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_name() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/postgres", "t1"),
            "postgres://u:p@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u@h:1/db?sslmode=disable", "t1"),
            "postgres://u@h:1/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t1"), "postgres://h:1/t1");
    }
}
