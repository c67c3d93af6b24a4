//! The NATS users and their rights (`deploy/nats/accounts.conf`) against a real nats-server:
//! nobody gets in anonymously, the relay alone publishes events, consumers consume but touch
//! nothing else, and the read-only user reads without being able to steal or ack another
//! consumer's messages.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{self, Context};
use fleetlog_nats::accounts::{self, NatsUser};
use fleetlog_nats::{ensure_stream, StreamSettings, STREAM_NAME};
use fleetlog_testkit::NatsServer;
use futures::StreamExt;

/// A JetStream context as `user`, quick to give up on a request the server never answers (a
/// refused one).
async fn as_user(nats: &NatsServer, user: &str) -> Context {
    let user = NatsUser {
        name: user.to_string(),
        password: nats.password(user).to_string().into(),
    };
    let client = accounts::connect_as(&nats.anonymous_url(), Some(&user))
        .await
        .unwrap();
    let mut context = jetstream::new(client);
    context.set_timeout(Duration::from_secs(1));
    context
}

async fn events_in_stream(admin: &Context) -> u64 {
    admin
        .get_stream(STREAM_NAME)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

fn durable(name: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(name.into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ..Default::default()
    }
}

#[tokio::test]
async fn anonymous_clients_and_wrong_passwords_are_refused() {
    let nats = NatsServer::start();
    let anonymous = async_nats::connect(nats.anonymous_url()).await;
    assert!(anonymous.is_err(), "an anonymous client got in");
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        accounts::RELAY.into(),
        "not-the-password".into(),
    )
    .connect(nats.anonymous_url())
    .await;
    assert!(wrong.is_err(), "a wrong password got in");
}

#[tokio::test]
async fn the_relay_alone_publishes_events() {
    let nats = NatsServer::start();
    let relay = as_user(&nats, accounts::RELAY).await;
    ensure_stream(&relay, &StreamSettings::default())
        .await
        .unwrap();
    relay
        .publish("fleetlog.events.device.d1.control", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let admin = as_user(&nats, accounts::ADMIN).await;
    assert_eq!(events_in_stream(&admin).await, 1);

    // Every other role's attempt at a forged event lands nowhere.
    for user in [
        accounts::PROJECT,
        accounts::INGEST,
        accounts::DISPATCH,
        accounts::SYNC,
        accounts::API,
        accounts::READER,
    ] {
        let forger = as_user(&nats, user).await;
        let acked = async {
            forger
                .publish("fleetlog.events.device.d1.control", "{}".into())
                .await?
                .await
        }
        .await;
        assert!(acked.is_err(), "{user} published an event");
        // A plain publish, too.
        forger
            .client()
            .publish("fleetlog.events.device.d1.control", "{}".into())
            .await
            .unwrap();
        forger.client().flush().await.ok();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(events_in_stream(&admin).await, 1);

    // Nor may anyone but the relay change the stream.
    let project = as_user(&nats, accounts::PROJECT).await;
    let purged = project.get_stream(STREAM_NAME).await.unwrap().purge().await;
    assert!(purged.is_err(), "the projections user purged the stream");
    assert_eq!(events_in_stream(&admin).await, 1);
}

#[tokio::test]
async fn consumers_consume_and_the_reader_reads_without_touching_theirs() {
    let nats = NatsServer::start();
    let relay = as_user(&nats, accounts::RELAY).await;
    ensure_stream(&relay, &StreamSettings::default())
        .await
        .unwrap();
    for n in 0..3 {
        relay
            .publish(format!("fleetlog.events.device.d{n}.control"), "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // A role's own durable consumer: created, pulled, acked.
    let project = as_user(&nats, accounts::PROJECT).await;
    let stream = project.get_stream(STREAM_NAME).await.unwrap();
    let consumer = stream
        .get_or_create_consumer("devices", durable("devices"))
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let first = messages.next().await.unwrap().unwrap();
    first.ack().await.unwrap();

    // The dispatcher may not delete another role's consumer.
    let dispatch = as_user(&nats, accounts::DISPATCH).await;
    let deleted = dispatch
        .get_stream(STREAM_NAME)
        .await
        .unwrap()
        .delete_consumer("devices")
        .await;
    assert!(deleted.is_err(), "the dispatcher deleted a consumer");

    // Nor pull from it: the API, whose ordered consumers have names of the server's, may pull
    // from none of the roles' durables.
    for user in [accounts::DISPATCH, accounts::API, accounts::SYNC] {
        let other = as_user(&nats, user).await;
        let pulled = tokio::time::timeout(
            Duration::from_secs(2),
            other.client().request(
                "$JS.API.CONSUMER.MSG.NEXT.FLEETLOG_EVENTS.devices",
                "1".into(),
            ),
        )
        .await;
        assert!(
            !matches!(pulled, Ok(Ok(_))),
            "{user} pulled from the devices consumer"
        );
    }
    // The API's ordered consumers come back under names of their own after a gap; never under
    // a role's.
    let api = as_user(&nats, accounts::API).await;
    let api_stream = api.get_stream(STREAM_NAME).await.unwrap();
    let ordered = pull::Config {
        name: Some("live_1".into()),
        filter_subject: "fleetlog.events.device.>".into(),
        ack_policy: AckPolicy::None,
        ..Default::default()
    };
    api_stream.create_consumer(ordered).await.unwrap();
    let squatted = api_stream
        .create_consumer(pull::Config {
            name: Some("devices".into()),
            filter_subject: "fleetlog.events.device.>".into(),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await;
    assert!(squatted.is_err(), "the API re-created the devices consumer");

    // And no user reads another's inbox, where pulled messages are delivered.
    let snoop = as_user(&nats, accounts::INGEST).await;
    let mut snooped = snoop
        .client()
        .subscribe(format!("{}.>", accounts::inbox_prefix(accounts::PROJECT)))
        .await
        .unwrap();
    snoop.client().flush().await.ok();

    // The reader: its own durable consumer works; another's does not, neither to pull from
    // (which would take its messages) nor to create under its name.
    let reader = as_user(&nats, accounts::READER).await;
    let reader_stream = reader.get_stream(STREAM_NAME).await.unwrap();
    let own = reader_stream
        .get_or_create_consumer("reader", durable("reader"))
        .await
        .unwrap();
    let mut own_messages = own.messages().await.unwrap();
    // (The project user's pulls meanwhile reach nobody else.)
    let second = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the devices consumer delivers")
        .unwrap()
        .unwrap();
    second.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), snooped.next())
            .await
            .is_err(),
        "the ingest user read the projections' inbox"
    );
    let read = tokio::time::timeout(Duration::from_secs(5), own_messages.next())
        .await
        .expect("the reader reads")
        .unwrap()
        .unwrap();
    read.ack().await.unwrap();
    let stolen = reader_stream.get_consumer::<pull::Config>("devices").await;
    assert!(stolen.is_err(), "the reader looked up the devices consumer");
    let created = reader_stream.create_consumer(durable("devices-copy")).await;
    assert!(
        created.is_err(),
        "the reader created a consumer of another name"
    );
    // And the reader follows events live over a plain subscription (on a connection of its
    // own: after a refused request, an async-nats client was seen to stop delivering to
    // subscriptions made later).
    let watcher = as_user(&nats, accounts::READER).await;
    let mut live = watcher
        .client()
        .subscribe("fleetlog.events.>")
        .await
        .unwrap();
    watcher.client().flush().await.unwrap();
    // A plain subscription is at most once: the event is published until one arrives.
    let mut seen = None;
    for _ in 0..5 {
        relay
            .publish("fleetlog.events.device.d9.control", "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
        if let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(1), live.next()).await {
            seen = Some(message);
            break;
        }
    }
    let seen = seen.unwrap_or_else(|| panic!("no live event: {}", nats.log()));
    assert_eq!(seen.subject.as_str(), "fleetlog.events.device.d9.control");

    // Nor may it pull from another's consumer, which would take its messages.
    let thief = as_user(&nats, accounts::READER).await;
    let pulled = tokio::time::timeout(
        Duration::from_secs(2),
        thief.client().request(
            "$JS.API.CONSUMER.MSG.NEXT.FLEETLOG_EVENTS.devices",
            "1".into(),
        ),
    )
    .await;
    assert!(
        !matches!(pulled, Ok(Ok(_))),
        "the reader pulled from the devices consumer"
    );
}
