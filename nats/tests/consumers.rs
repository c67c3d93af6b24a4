//! Durable consumers against a real nats-server with JetStream: planes in the subjects let a
//! consumer take control events only, and a consumer set up for the old subjects is moved to
//! the new ones without losing its place.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Context};
use fleetlog_nats::topology::{
    control_subject_filter_for_type, subject_filter_for_type, subject_for,
};
use fleetlog_nats::{ensure_stream, StreamSettings, STREAM_NAME};
use fleetlog_testkit::NatsServer;
use futures::StreamExt;

async fn jetstream(nats: &NatsServer) -> Context {
    let jetstream = jetstream::new(fleetlog_nats::connect(&nats.url()).await.unwrap());
    ensure_stream(&jetstream, &StreamSettings::default())
        .await
        .unwrap();
    jetstream
}

async fn publish(jetstream: &Context, subject: String, body: &str) {
    jetstream
        .publish(subject, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

fn config(name: &str, filter: String) -> pull::Config {
    pull::Config {
        durable_name: Some(name.into()),
        filter_subject: filter,
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    }
}

/// The bodies of the next `count` messages, each acked. Pulls no more than it takes, so what
/// it leaves is still there for the next consumer.
async fn take(consumer: &jetstream::consumer::PullConsumer, count: usize) -> Vec<String> {
    let mut bodies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bodies.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {bodies:?} in time"
        );
        let mut batch = consumer
            .fetch()
            .max_messages(count - bodies.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            message.ack().await.unwrap();
            bodies.push(String::from_utf8(message.payload.to_vec()).unwrap());
        }
    }
    bodies
}

#[tokio::test]
async fn control_consumers_never_receive_the_data_plane() {
    let nats = NatsServer::start();
    let jetstream = jetstream(&nats).await;
    let stream = jetstream.get_stream(STREAM_NAME).await.unwrap();
    for (kind, body) in [
        ("DeviceRegistered", "registered"),
        ("TelemetryRecorded", "telemetry"),
        ("StatusReported", "status"),
        ("HeartbeatReceived", "heartbeat"),
        ("CommandIssued", "command"),
    ] {
        publish(&jetstream, subject_for("device", "d1", kind), body).await;
    }
    publish(
        &jetstream,
        subject_for("rollout", "r1", "RolloutCreated"),
        "rollout",
    )
    .await;

    let control = fleetlog_nats::durable_consumer(
        &stream,
        config("control", control_subject_filter_for_type("device")),
    )
    .await
    .unwrap();
    assert_eq!(take(&control, 2).await, ["registered", "command"]);
    let mut control = control;
    assert_eq!(control.info().await.unwrap().num_pending, 0);

    let all =
        fleetlog_nats::durable_consumer(&stream, config("all", subject_filter_for_type("device")))
            .await
            .unwrap();
    assert_eq!(
        take(&all, 5).await,
        ["registered", "telemetry", "status", "heartbeat", "command"]
    );
}

#[tokio::test]
async fn a_consumer_of_the_old_subjects_moves_to_the_new_ones_where_it_stood() {
    let nats = NatsServer::start();
    let jetstream = jetstream(&nats).await;
    let stream = jetstream.get_stream(STREAM_NAME).await.unwrap();
    // Before planes, subjects ended with the aggregate id and consumers filtered on that.
    let old_filter = "fleetlog.events.device.*".to_string();
    publish(&jetstream, "fleetlog.events.device.d1".into(), "old-1").await;
    publish(&jetstream, "fleetlog.events.device.d1".into(), "old-2").await;
    let old = stream
        .get_or_create_consumer("projection", config("projection", old_filter))
        .await
        .unwrap();
    assert_eq!(take(&old, 1).await, ["old-1"]);

    publish(
        &jetstream,
        subject_for("device", "d1", "CommandIssued"),
        "new-1",
    )
    .await;
    let mut moved = fleetlog_nats::durable_consumer(
        &stream,
        config("projection", subject_filter_for_type("device")),
    )
    .await
    .unwrap();
    assert_eq!(
        moved.info().await.unwrap().config.filter_subject,
        "fleetlog.events.device.>"
    );
    // Neither the acked message again nor a skipped one: the rest, old subjects and new.
    assert_eq!(take(&moved, 2).await, ["old-2", "new-1"]);
}

/// The one pull loop hands out what arrived, in order and in batches no larger than asked,
/// and ends quietly at shutdown with nothing lost: what it was not handed stays for the next.
#[tokio::test]
async fn a_pull_hands_out_batches_in_order_and_ends_at_shutdown() {
    let nats = NatsServer::start();
    let jetstream = jetstream(&nats).await;
    for n in 0..7 {
        let subject = subject_for("device", &format!("d{n}"), "DeviceRegistered");
        publish(&jetstream, subject, &format!("event {n}")).await;
    }
    let stream = jetstream.get_stream(STREAM_NAME).await.unwrap();
    let consumer = fleetlog_nats::durable_consumer(
        &stream,
        config("pulled", subject_filter_for_type("device")),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut pull = fleetlog_nats::Pull::start(&consumer, 3).await.unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < 7 {
        let batch = tokio::time::timeout(Duration::from_secs(5), pull.next(&shutdown))
            .await
            .expect("a batch in time")
            .unwrap()
            .expect("not shut down");
        assert!(!batch.is_empty() && batch.len() <= 3, "{}", batch.len());
        for message in batch {
            message.ack().await.unwrap();
            bodies.push(String::from_utf8(message.payload.to_vec()).unwrap());
        }
    }
    let expected: Vec<String> = (0..7).map(|n| format!("event {n}")).collect();
    assert_eq!(bodies, expected);

    shutdown.cancel();
    assert!(pull.next(&shutdown).await.unwrap().is_none());
    // An event published after the shutdown is there for the consumer's next pull.
    drop(pull);
    publish(
        &jetstream,
        subject_for("device", "late", "DeviceRegistered"),
        "event 7",
    )
    .await;
    assert_eq!(take(&consumer, 1).await, vec!["event 7".to_string()]);
}
