//! `fleetlog events`: look at the event store and the event stream.

use anyhow::{bail, Context};
use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use fleetlog_eventlog::{EventEnvelope, HistoryQuery, Summary};
use fleetlog_nats::topology::{subject_filter_for_type, EVENT_TYPE_HEADER, SUBJECT_PREFIX};
use fleetlog_nats::STREAM_NAME;
use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// One line per event: position, aggregate, sequence, time, type, payload, and the trace id
/// when the event was stored in a sampled trace (what to search the tracing backend for).
fn print_event(envelope: &EventEnvelope) {
    let trace = fleetlog_trace::from_metadata(&envelope.metadata)
        .map(|context| {
            use opentelemetry::trace::TraceContextExt;
            format!("  trace={}", context.span().span_context().trace_id())
        })
        .unwrap_or_default();
    println!(
        "{:>10}  {}:{}#{}  {}  {}  {}{trace}",
        envelope.global_position,
        envelope.aggregate_type,
        envelope.aggregate_id,
        envelope.sequence,
        envelope.recorded_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        envelope.event_type,
        envelope.payload
    );
}

/// `events list --aggregate TYPE:ID`: the aggregate's history, oldest first.
pub async fn list(pool: &PgPool, aggregate: &str, limit: i64) -> anyhow::Result<()> {
    let Some((aggregate_type, aggregate_id)) = aggregate.split_once(':') else {
        bail!("--aggregate must look like TYPE:ID, e.g. device:sensor-1");
    };
    let events = fleetlog_eventlog::history(
        pool,
        HistoryQuery {
            aggregate_type,
            aggregate_id,
            after_sequence: 0,
            event_type: None,
            limit,
        },
    )
    .await
    .context("cannot read events")?;
    if events.is_empty() {
        bail!("no events for {aggregate}");
    }
    events.iter().for_each(print_event);
    Ok(())
}

/// `events tail`: follows the JetStream stream from now on until Ctrl-C, as the API's NATS user
/// when its password is set (it reads the way the API's live streams do).
pub async fn tail(
    nats_url: &str,
    user: Option<&fleetlog_nats::accounts::NatsUser>,
    event_type: Option<String>,
    aggregate_type: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = fleetlog_nats::accounts::connect_as(nats_url, user)
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url}"))?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .get_stream(STREAM_NAME)
        .await
        .context("cannot open the event stream (is the relay running?)")?;
    let filter_subject = match &aggregate_type {
        Some(aggregate_type) => subject_filter_for_type(aggregate_type),
        None => format!("{SUBJECT_PREFIX}.>"),
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("cannot follow the event stream")?;
    let mut messages = consumer
        .messages()
        .await
        .context("cannot follow the event stream")?;
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = messages.next() => message,
        };
        let Some(message) = message else {
            return Ok(());
        };
        let message = message.context("event stream interrupted")?;
        if let Some(wanted) = &event_type {
            let matches = message
                .headers
                .as_ref()
                .and_then(|h| h.get(EVENT_TYPE_HEADER))
                .is_some_and(|t| t.as_str() == wanted);
            if !matches {
                continue;
            }
        }
        match serde_json::from_slice::<EventEnvelope>(&message.payload) {
            Ok(envelope) => print_event(&envelope),
            Err(error) => eprintln!("fleetlog: skipping a message that is not an event: {error}"),
        }
    }
}

/// `events stats`: counts per type, and how far the relay is behind.
pub async fn stats(pool: &PgPool) -> anyhow::Result<()> {
    let Summary {
        events: total,
        aggregates,
        last_position,
        by_type,
    } = fleetlog_eventlog::summary(pool)
        .await
        .context("cannot read events")?;
    let relayed = fleetlog_relay::stored_cursor(pool)
        .await
        .context("cannot read the relay's cursor")?;
    let unrelayed = fleetlog_eventlog::count_after(pool, relayed.unwrap_or_default())
        .await
        .context("cannot read events")?;
    println!("events            {total}");
    println!("aggregates        {aggregates}");
    println!("last position     {last_position}");
    println!("not yet relayed   {unrelayed}");
    println!();
    for (aggregate_type, event_type, count) in by_type {
        println!("{aggregate_type:<10} {event_type:<28} {count:>10}");
    }
    Ok(())
}
