//! What the event store, the stream and the devices hold after the run, read from the source:
//! the events table itself, the JetStream stream message by message.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use sqlx::PgPool;

/// How many events hold each telemetry `seq`.
pub async fn telemetry_events(pool: &PgPool) -> anyhow::Result<HashMap<u64, u32>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (r ->> 'value')::float8::int8 AS seq, count(*)
           FROM events,
                json_array_elements(payload -> 'TelemetryRecorded' -> 'readings') AS r
          WHERE aggregate_type = 'device' AND event_type = 'TelemetryRecorded'
            AND r ->> 'sensor' = 'seq'
          GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, count)| (seq as u64, count as u32))
        .collect())
}

/// What the REST writes left in the store, keyed as [`crate::faults::operator::WriteKind`]
/// names them: `desired:{device}:{value}`, `command:{id}`, `register:{device}`, each with its
/// count of events.
pub async fn write_events(pool: &PgPool) -> anyhow::Result<HashMap<String, u32>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT key, count(*) FROM (
             SELECT 'desired:' || aggregate_id || ':'
                        || (payload -> 'DesiredPropertiesSet' -> 'properties' ->> 'setpoint') AS key
               FROM events WHERE aggregate_type = 'device' AND event_type = 'DesiredPropertiesSet'
             UNION ALL
             SELECT 'command:' || (payload -> 'CommandIssued' ->> 'command_id')
               FROM events WHERE aggregate_type = 'device' AND event_type = 'CommandIssued'
             UNION ALL
             SELECT 'register:' || aggregate_id
               FROM events WHERE aggregate_type = 'device' AND event_type = 'DeviceRegistered'
         ) AS written WHERE key IS NOT NULL GROUP BY key",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(k, c)| (k, c as u32)).collect())
}

/// Every command issued to a device, by device.
pub async fn commands_issued(pool: &PgPool) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, payload -> 'CommandIssued' ->> 'command_id'
           FROM events WHERE aggregate_type = 'device' AND event_type = 'CommandIssued'",
    )
    .fetch_all(pool)
    .await?;
    let mut by_device: HashMap<String, Vec<String>> = HashMap::new();
    for (device, command) in rows {
        by_device.entry(device).or_default().push(command);
    }
    Ok(by_device)
}

/// Each device's last desired version.
pub async fn last_desired_versions(pool: &PgPool) -> anyhow::Result<HashMap<String, u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, max((payload -> 'DesiredPropertiesSet' ->> 'version')::int8)
           FROM events WHERE aggregate_type = 'device' AND event_type = 'DesiredPropertiesSet'
          GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(d, v)| (d, v as u64)).collect())
}

/// How the stream compares with the events table.
#[derive(Debug, Default)]
pub struct StreamCheck {
    pub events: usize,
    pub messages: usize,
    /// Events of the table not on the stream.
    pub missing: usize,
    /// Events on the stream more than once.
    pub duplicated: usize,
}

impl StreamCheck {
    pub fn clean(&self) -> bool {
        self.missing == 0 && self.duplicated == 0
    }
}

/// Reads the whole stream `FLEETLOG_EVENTS` and the whole events table, by message id
/// (`{aggregate_type}:{aggregate_id}:{sequence}`).
pub async fn stream_against_table(
    pool: &PgPool,
    nats_url: &str,
    admin: &fleetlog_nats::accounts::NatsUser,
) -> anyhow::Result<StreamCheck> {
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT aggregate_type || ':' || aggregate_id || ':' || sequence FROM events",
    )
    .fetch_all(pool)
    .await?;
    let table: HashSet<String> = ids.into_iter().map(|(id,)| id).collect();

    let client = fleetlog_nats::accounts::connect_as(nats_url, Some(admin)).await?;
    let jetstream = async_nats::jetstream::new(client);
    let mut stream = jetstream
        .get_stream(fleetlog_nats::STREAM_NAME)
        .await
        .context("cannot open the event stream")?;
    let last = stream.info().await?.state.last_sequence;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..OrderedConfig::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut count = 0;
    // An empty stream has nothing to read (and its last sequence is 0).
    let mut done = last == 0;
    while !done {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .context("the stream stopped delivering")?
            .context("the stream ended")??;
        count += 1;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        *seen.entry(id).or_default() += 1;
        done = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence
            >= last;
    }
    Ok(StreamCheck {
        events: table.len(),
        messages: count,
        missing: table.iter().filter(|id| !seen.contains_key(*id)).count(),
        duplicated: seen.values().filter(|n| **n > 1).count(),
    })
}
