//! The broker sync: keeps the broker's accounts (Mosquitto's dynamic-security plugin) in step
//! with the event log, so that only devices the log says hold a credential can connect, each
//! with the secret it was issued, confined to its own topics.
//!
//! - A device's standing credential is the latest of its `DeviceCredentialsRotated`,
//!   `DeviceCredentialsRevoked` and `DeviceDecommissioned` events, read from the events table
//!   (never from a cache or a read model). A rotation with a salt means "the broker accepts
//!   this device with the secret derived from that salt" ([`DeviceCredentialKey::derive`]);
//!   anything else means "the broker has no client for it".
//! - At start, and every time it connects to the broker again, it reconciles: every device the
//!   log says holds a credential gets its client (created, or given the new password); every
//!   device client the log does not back is deleted. A broker that lost its state, or was
//!   changed by hand, is put right; clients it did not make (service accounts, the admin) are
//!   left alone.
//! - Then it follows the devices' control events on JetStream (a durable consumer) and, for
//!   each credential event, makes that device's client match its standing credential, read
//!   again from the log: applying the same event twice, or an old one late, changes nothing.
//!   The plugin disconnects a client's sessions when its password changes or it is deleted.
//! - Each client's text description names the credential it holds: its version, a digest of
//!   its salt, and a digest of what else its password and rights depend on (the credential
//!   key's fingerprint, the topic root, the version of the rights). An unchanged credential is
//!   never set again, so nobody is disconnected by a restart of the sync; a changed key or
//!   topic root changes every tag, and every device client is set again.
//! - It reconciles again every `reconcile_every` (default 10 minutes), so whatever the broker
//!   refused, or someone changed by hand, is put right without waiting for a reconnect.
//! - One sync is active at a time: it holds a Postgres advisory lock; others wait on standby.
//!   It makes the ingest and dispatch service accounts, when given their passwords, and their
//!   roles, and denies by default what no role allows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::{Context, Message};
use fleetlog_broker::access::{
    self, AccessError, DeviceClientChange, DynsecAdmin, DISPATCH_ROLE, DISPATCH_USERNAME,
    INGEST_ROLE, INGEST_USERNAME,
};
use fleetlog_broker::BrokerUrl;
use fleetlog_commands::credentials::{sha256_hex, DeviceCredentialKey};
use fleetlog_eventlog::{EventEnvelope, DEVICE_CREDENTIAL_EVENTS, PROVISIONING_KEY_EVENTS};
use fleetlog_nats::topology::{control_subject_filter_for_type, EVENT_TYPE_HEADER};
use fleetlog_nats::STREAM_NAME;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The durable consumer the sync reads device control events with.
pub const CONSUMER: &str = "broker-sync";
/// The durable consumer the sync reads provisioning key events with.
pub const KEYS_CONSUMER: &str = "broker-sync-keys";
/// The advisory-lock key that elects the active sync ("fleetbrk" in ASCII).
const SYNC_LOCK_KEY: i64 = 0x666c_6565_7462_726b;

/// What the sync needs to know.
#[derive(Debug, Clone)]
pub struct BrokerSyncSettings {
    /// The broker, with the admin's user name and password.
    pub broker: BrokerUrl,
    /// The sync's MQTT client id.
    pub client_id: String,
    /// The first level of every device topic.
    pub topic_root: String,
    /// The ingest account's password; `None` leaves that account to the operator.
    pub ingest_password: Option<SecretString>,
    /// The dispatch account's password; `None` leaves that account to the operator.
    pub dispatch_password: Option<SecretString>,
    /// How long the broker may take to answer a command.
    pub patience: Duration,
    /// How often a standby sync tries for the lock.
    pub standby_interval: Duration,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// How often the broker is reconciled with the log while the sync runs.
    pub reconcile_every: Duration,
}

impl BrokerSyncSettings {
    /// Defaults for `broker`.
    pub fn new(broker: BrokerUrl) -> Self {
        Self {
            broker,
            client_id: "fleetlog.sync".into(),
            topic_root: "devices".into(),
            ingest_password: None,
            dispatch_password: None,
            patience: Duration::from_secs(10),
            standby_interval: Duration::from_secs(5),
            ack_wait: Duration::from_secs(30),
            reconcile_every: Duration::from_secs(600),
        }
    }
}

/// Why a sync session ended; the next one starts after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The broker failed or refused the admin.
    #[error(transparent)]
    Broker(#[from] AccessError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// NATS failed: the stream, the consumer, a pull or an ack.
    #[error("nats: {0}")]
    Nats(async_nats::Error),
    /// The pull was lost.
    #[error(transparent)]
    Pull(#[from] fleetlog_nats::PullLost),
    /// The broker connection dropped: connect again and reconcile.
    #[error("the broker connection dropped")]
    BrokerLost,
}

impl<K> From<async_nats::error::Error<K>> for SyncError
where
    async_nats::error::Error<K>: Into<async_nats::Error>,
    K: Clone + PartialEq + std::fmt::Debug + std::fmt::Display,
{
    fn from(error: async_nats::error::Error<K>) -> Self {
        Self::Nats(error.into())
    }
}

impl From<async_nats::Error> for SyncError {
    fn from(error: async_nats::Error) -> Self {
        Self::Nats(error)
    }
}

/// What the broker should hold for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    /// A client with the secret derived from this salt; `tag` names the credential.
    Client { salt: String, tag: String },
    /// No client.
    Nothing,
}

#[derive(Deserialize)]
struct Rotated {
    credential_version: u32,
    #[serde(default)]
    salt: Option<String>,
}

/// The version of the device rights (`fleetlog_broker::access::device_acls`): raised when they
/// change, so every device client is set again.
const DEVICE_RIGHTS_VERSION: u32 = 1;

/// The version of a provisioning key's rights (`fleetlog_broker::access::provisioning_acls`).
const PROVISIONING_RIGHTS_VERSION: u32 = 1;

/// What a provisioning key's account depends on besides its secret: the credential key's
/// fingerprint and the version of its rights. 8 hex digits.
fn key_scope_of(key: &DeviceCredentialKey) -> String {
    let digest = sha256_hex(
        format!(
            "{}\0provisioning\0{PROVISIONING_RIGHTS_VERSION}",
            key.fingerprint()
        )
        .as_bytes(),
    );
    digest[..8].to_string()
}

/// What a device client's password and rights depend on besides its credential: the key's
/// fingerprint, the topic root, the version of the rights. 8 hex digits.
fn scope_of(key: &DeviceCredentialKey, topic_root: &str) -> String {
    let digest = sha256_hex(
        format!(
            "{}\0{topic_root}\0{DEVICE_RIGHTS_VERSION}",
            key.fingerprint()
        )
        .as_bytes(),
    );
    digest[..8].to_string()
}

/// What a device's standing credential event asks of the broker, within `scope`.
fn wanted_of(event: Option<&EventEnvelope>, scope: &str) -> Wanted {
    let Some(event) = event else {
        return Wanted::Nothing;
    };
    if event.event_type != "DeviceCredentialsRotated" {
        return Wanted::Nothing;
    }
    let rotated = event.payload.to_value().and_then(|payload| {
        serde_json::from_value::<Rotated>(payload["DeviceCredentialsRotated"].clone())
    });
    match rotated {
        Ok(Rotated {
            credential_version,
            salt: Some(salt),
        }) => {
            let digest = sha256_hex(salt.as_bytes());
            Wanted::Client {
                tag: format!("credential v{credential_version} {} {scope}", &digest[..16]),
                salt,
            }
        }
        // A secret issued before the broker kept device credentials cannot be derived again:
        // that device has HTTP only until it is rotated.
        Ok(_) => Wanted::Nothing,
        Err(error) => {
            tracing::error!(%error, device = event.aggregate_id, "unreadable credential event");
            Wanted::Nothing
        }
    }
}

/// What a provisioning key's standing event asks of the broker: an account while it is made
/// and not revoked (an expired or used-up key keeps it, and its requests are answered with the
/// reason).
fn wanted_key_of(event: Option<&EventEnvelope>, scope: &str) -> Wanted {
    let Some(event) = event else {
        return Wanted::Nothing;
    };
    if event.event_type != "ProvisioningKeyCreated" {
        return Wanted::Nothing;
    }
    let payload = event.payload.to_value().unwrap_or_default();
    match payload["ProvisioningKeyCreated"]["salt"].as_str() {
        Some(salt) => {
            let digest = sha256_hex(salt.as_bytes());
            Wanted::Client {
                tag: format!("provisioning key {} {scope}", &digest[..16]),
                salt: salt.to_string(),
            }
        }
        None => Wanted::Nothing,
    }
}

/// What a consumer of the sync follows.
#[derive(Debug, Clone, Copy)]
enum Followed {
    /// Device control events.
    Devices,
    /// Provisioning key events.
    Keys,
}

/// The broker sync. See the module documentation.
pub struct BrokerSync {
    pool: PgPool,
    jetstream: Context,
    key: DeviceCredentialKey,
    /// See [`scope_of`].
    scope: String,
    /// See [`key_scope_of`].
    key_scope: String,
    settings: BrokerSyncSettings,
}

impl BrokerSync {
    /// A sync reading the log from `pool` and events from `jetstream`.
    pub fn new(
        pool: PgPool,
        jetstream: Context,
        key: DeviceCredentialKey,
        settings: BrokerSyncSettings,
    ) -> Self {
        Self {
            pool,
            jetstream,
            scope: scope_of(&key, &settings.topic_root),
            key_scope: key_scope_of(&key),
            key,
            settings,
        }
    }

    /// Runs until `shutdown`; every failure starts a new session after a backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        fleetlog_nats::consume_until_shutdown(CONSUMER, &shutdown, || self.session(&shutdown))
            .await;
        tracing::info!("broker sync stopped");
    }

    /// One session: the lock, the broker, a reconciliation, then the events.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), SyncError> {
        let Some(mut lock) = self.wait_for_lock(shutdown).await? else {
            return Ok(());
        };
        let admin = DynsecAdmin::connect(
            &self.settings.broker,
            &self.settings.client_id,
            self.settings.patience,
        )
        .await?;
        let outcome = self.follow(&admin, &mut lock, shutdown).await;
        admin.close().await;
        let _ = sqlx::Connection::close(lock).await;
        outcome
    }

    async fn follow(
        &self,
        admin: &DynsecAdmin,
        lock: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), SyncError> {
        self.prepare_broker(admin).await?;
        // The consumer first, then the reconciliation: whatever is committed after the
        // reconciliation read the log comes on the consumer, nothing falls between the two.
        let stream = self.jetstream.get_stream(STREAM_NAME).await?;
        let consumer =
            fleetlog_nats::durable_consumer(&stream, self.consumer(Followed::Devices)).await?;
        let mut pull = fleetlog_nats::Pull::start(&consumer, 500).await?;
        let keys_consumer =
            fleetlog_nats::durable_consumer(&stream, self.consumer(Followed::Keys)).await?;
        let mut keys_pull = fleetlog_nats::Pull::start(&keys_consumer, 100).await?;
        self.reconcile(admin).await?;
        tracing::info!("broker sync following device events");
        let mut checks = tokio::time::interval(Duration::from_secs(5));
        let mut reconciliations = tokio::time::interval(self.settings.reconcile_every);
        // The first tick is at once: the reconciliation above was it.
        reconciliations.tick().await;
        loop {
            tokio::select! {
                batch = pull.next(shutdown) => match batch? {
                    Some(batch) => {
                        self.handle_batch(admin, Followed::Devices, &batch)
                            .instrument(batch_span(&batch))
                            .await?;
                    }
                    None => return Ok(()),
                },
                batch = keys_pull.next(shutdown) => match batch? {
                    Some(batch) => {
                        self.handle_batch(admin, Followed::Keys, &batch)
                            .instrument(batch_span(&batch))
                            .await?;
                    }
                    None => return Ok(()),
                },
                _ = reconciliations.tick() => self.reconcile(admin).await?,
                _ = checks.tick() => {
                    if !admin.is_connected() {
                        return Err(SyncError::BrokerLost);
                    }
                    // The lock lives as long as its connection: a lost one may already be
                    // another sync's.
                    sqlx::query("SELECT 1").execute(&mut *lock).await?;
                }
            }
        }
    }

    /// Default deny, the service roles, and the service accounts given.
    async fn prepare_broker(&self, admin: &DynsecAdmin) -> Result<(), SyncError> {
        let root = &self.settings.topic_root;
        admin.deny_by_default().await?;
        admin
            .ensure_role(INGEST_ROLE, &access::ingest_acls(root))
            .await?;
        admin
            .ensure_role(DISPATCH_ROLE, &access::dispatch_acls(root))
            .await?;
        for (username, password, role) in [
            (INGEST_USERNAME, &self.settings.ingest_password, INGEST_ROLE),
            (
                DISPATCH_USERNAME,
                &self.settings.dispatch_password,
                DISPATCH_ROLE,
            ),
        ] {
            if let Some(password) = password {
                admin
                    .ensure_service_account(username, password.expose_secret(), role)
                    .await?;
            }
        }
        Ok(())
    }

    /// Makes the broker's device clients match the log: see the module documentation.
    async fn reconcile(&self, admin: &DynsecAdmin) -> Result<(), SyncError> {
        let standing = fleetlog_eventlog::device_credential_events(&self.pool).await?;
        let wanted: HashMap<String, Wanted> = standing
            .iter()
            .map(|event| {
                (
                    event.aggregate_id.clone(),
                    wanted_of(Some(event), &self.scope),
                )
            })
            .filter(|(_, wanted)| *wanted != Wanted::Nothing)
            .collect();
        let present = admin.list_clients().await?;
        let mut counts: HashMap<&str, u64> = HashMap::new();
        let mut managed = HashSet::new();
        for client in present.iter().filter(|client| client.is_device_client()) {
            managed.insert(client.username.as_str());
            match wanted.get(&client.username) {
                Some(Wanted::Client { tag, .. })
                    if client.textdescription.as_deref() == Some(tag.as_str()) =>
                {
                    *counts.entry("unchanged").or_default() += 1;
                }
                Some(wanted) => {
                    let change = self.apply(admin, &client.username, wanted).await?;
                    *counts.entry(change).or_default() += 1;
                }
                None => {
                    let change = self
                        .apply(admin, &client.username, &Wanted::Nothing)
                        .await?;
                    *counts.entry(change).or_default() += 1;
                }
            }
        }
        for (device, wanted) in &wanted {
            if !managed.contains(device.as_str()) {
                let change = self.apply(admin, device, wanted).await?;
                *counts.entry(change).or_default() += 1;
            }
        }
        // The provisioning keys' accounts, the same way.
        let keys: HashMap<String, Wanted> = fleetlog_eventlog::provisioning_key_events(&self.pool)
            .await?
            .iter()
            .map(|event| {
                (
                    event.aggregate_id.clone(),
                    wanted_key_of(Some(event), &self.key_scope),
                )
            })
            .filter(|(_, wanted)| *wanted != Wanted::Nothing)
            .collect();
        let mut present_keys = HashSet::new();
        for client in present
            .iter()
            .filter(|client| client.textname.as_deref() == Some(access::PROVISIONING_CLIENT_MARK))
        {
            let Some(key_id) = client.username.strip_prefix("provision.") else {
                continue;
            };
            present_keys.insert(key_id.to_string());
            let wanted = keys.get(key_id).unwrap_or(&Wanted::Nothing);
            let unchanged = matches!(wanted, Wanted::Client { tag, .. }
                if client.textdescription.as_deref() == Some(tag.as_str()));
            if !unchanged {
                self.apply_key(admin, key_id, wanted).await?;
            }
        }
        for (key_id, wanted) in &keys {
            if !present_keys.contains(key_id) {
                self.apply_key(admin, key_id, wanted).await?;
            }
        }
        tracing::info!(
            devices = wanted.len(),
            created = counts.get("created").copied().unwrap_or_default(),
            rotated = counts.get("rotated").copied().unwrap_or_default(),
            removed = counts.get("removed").copied().unwrap_or_default(),
            unchanged = counts.get("unchanged").copied().unwrap_or_default(),
            failed = counts.get("failed").copied().unwrap_or_default(),
            "broker reconciled with the event log"
        );
        Ok(())
    }

    /// The durable consumer of what `followed` names: control events only, from now on
    /// (everything before is covered by the reconciliation).
    fn consumer(&self, followed: Followed) -> PullConfig {
        let (name, aggregate_type) = match followed {
            Followed::Devices => (CONSUMER, "device"),
            Followed::Keys => (KEYS_CONSUMER, "provisioning_key"),
        };
        PullConfig {
            durable_name: Some(name.to_string()),
            filter_subject: control_subject_filter_for_type(aggregate_type),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::All,
            ack_wait: self.settings.ack_wait,
            max_ack_pending: 10_000,
            ..Default::default()
        }
    }

    /// Acts on a batch in order, then acks it with its last message (acks are cumulative). A
    /// failure stops before the ack, so the batch comes back.
    async fn handle_batch(
        &self,
        admin: &DynsecAdmin,
        followed: Followed,
        batch: &[Message],
    ) -> Result<(), SyncError> {
        for message in batch {
            self.handle(admin, followed, message).await?;
        }
        if let Some(message) = batch.last() {
            message.ack().await?;
        }
        Ok(())
    }

    /// Acts on one message: an event that changes a device's credential, or a key's standing,
    /// makes its client match what stands now, read again from the log (the event itself may be
    /// old: a redelivery). Other events are skipped by their type header, before their body is
    /// read.
    async fn handle(
        &self,
        admin: &DynsecAdmin,
        followed: Followed,
        message: &Message,
    ) -> Result<(), SyncError> {
        let relevant: &[&str] = match followed {
            Followed::Devices => &DEVICE_CREDENTIAL_EVENTS,
            Followed::Keys => &PROVISIONING_KEY_EVENTS,
        };
        let kind = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(EVENT_TYPE_HEADER))
            .map(|kind| kind.as_str().to_string());
        if kind.is_some_and(|kind| !relevant.contains(&kind.as_str())) {
            return Ok(());
        }
        let envelope: EventEnvelope = match serde_json::from_slice(&message.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(%error, "skipping a message that is not an event envelope");
                return Ok(());
            }
        };
        if !relevant.contains(&envelope.event_type.as_str()) {
            return Ok(());
        }
        let id = &envelope.aggregate_id;
        match followed {
            Followed::Devices => {
                let standing = fleetlog_eventlog::device_credential_event(&self.pool, id).await?;
                self.apply(admin, id, &wanted_of(standing.as_ref(), &self.scope))
                    .await
                    .map(drop)
            }
            Followed::Keys => {
                let standing = fleetlog_eventlog::provisioning_key_event(&self.pool, id).await?;
                self.apply_key(
                    admin,
                    id,
                    &wanted_key_of(standing.as_ref(), &self.key_scope),
                )
                .await
            }
        }
    }

    /// Makes provisioning key `key_id`'s account match `wanted`; refusals as in [`Self::apply`].
    async fn apply_key(
        &self,
        admin: &DynsecAdmin,
        key_id: &str,
        wanted: &Wanted,
    ) -> Result<(), SyncError> {
        let outcome = match wanted {
            Wanted::Client { salt, tag } => {
                let secret = self.key.derive_provisioning_secret(key_id, salt);
                admin
                    .ensure_provisioning_key(key_id, secret.expose_secret(), tag)
                    .await
                    .map(|change| change != DeviceClientChange::Unchanged)
            }
            Wanted::Nothing => admin.remove_provisioning_key(key_id).await,
        };
        match outcome {
            Ok(true) => tracing::info!(key = key_id, "provisioning key account applied"),
            Ok(false) => {}
            Err(error @ (AccessError::NotOurs(_) | AccessError::Refused { .. })) => {
                tracing::error!(key = key_id, %error, "broker sync could not apply a provisioning key");
            }
            Err(error) => return Err(error.into()),
        }
        Ok(())
    }

    /// Makes device `device_id`'s client match `wanted`; answers what it did. A refusal that a
    /// retry cannot mend (a client of that name the sync did not make, a command the broker
    /// refuses) is logged and counted, and the sync goes on with the others.
    async fn apply(
        &self,
        admin: &DynsecAdmin,
        device_id: &str,
        wanted: &Wanted,
    ) -> Result<&'static str, SyncError> {
        let outcome = match wanted {
            Wanted::Client { salt, tag } => {
                let secret = self.key.derive(device_id, salt);
                admin
                    .ensure_device(
                        &self.settings.topic_root,
                        device_id,
                        secret.expose_secret(),
                        tag,
                    )
                    .await
                    .map(|change| match change {
                        DeviceClientChange::Created => "created",
                        DeviceClientChange::Rotated => "rotated",
                        DeviceClientChange::Unchanged => "unchanged",
                    })
            }
            Wanted::Nothing => admin.remove_device(device_id).await.map(|removed| {
                if removed {
                    "removed"
                } else {
                    "unchanged"
                }
            }),
        };
        let change = match outcome {
            Ok(change) => change,
            Err(error @ (AccessError::NotOurs(_) | AccessError::Refused { .. })) => {
                tracing::error!(device = device_id, %error, "broker sync could not apply a credential");
                "failed"
            }
            Err(error) => return Err(error.into()),
        };
        if change != "unchanged" {
            tracing::info!(device = device_id, change, "broker credential applied");
        }
        metrics::counter!("fleetlog_broker_sync_changes_total", "change" => change).increment(1);
        Ok(change)
    }

    /// Takes the advisory lock on a connection of its own; `None` when shut down first.
    async fn wait_for_lock(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<PgConnection>, SyncError> {
        let mut waiting_said = false;
        loop {
            let mut connection = PoolConnection::<Postgres>::detach(self.pool.acquire().await?);
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SYNC_LOCK_KEY)
                .fetch_one(&mut connection)
                .await?;
            if locked {
                return Ok(Some(connection));
            }
            let _ = sqlx::Connection::close(connection).await;
            if !waiting_said {
                tracing::info!("another broker sync is active; standing by");
                waiting_said = true;
            }
            if !fleetlog_nats::sleep_unless_shut_down(self.settings.standby_interval, shutdown)
                .await
            {
                return Ok(None);
            }
        }
    }
}

/// The span of a batch of followed events, continuing the traces its messages carry.
fn batch_span(batch: &[async_nats::jetstream::Message]) -> tracing::Span {
    fleetlog_trace::span_for_messages(batch.iter().map(|m| &m.message), || {
        tracing::info_span!("broker sync", otel.kind = "consumer")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use fleetlog_domain::device::DeviceEvent;

    fn envelope(event: &DeviceEvent) -> EventEnvelope {
        let payload = serde_json::to_value(event).unwrap();
        EventEnvelope {
            aggregate_type: "device".into(),
            aggregate_id: "sensor-1".into(),
            sequence: 2,
            global_position: 7,
            event_type: payload.as_object().unwrap().keys().next().unwrap().clone(),
            event_version: "1".into(),
            payload: fleetlog_eventlog::Payload::of(&payload).unwrap(),
            metadata: serde_json::json!({}),
            recorded_at: Utc::now(),
        }
    }

    #[test]
    fn another_key_or_topic_root_is_another_scope() {
        let key =
            |text: &str| DeviceCredentialKey::new(SecretString::from(text.repeat(32))).unwrap();
        assert_eq!(
            scope_of(&key("a"), "devices"),
            scope_of(&key("a"), "devices")
        );
        assert_ne!(
            scope_of(&key("a"), "devices"),
            scope_of(&key("b"), "devices")
        );
        assert_ne!(scope_of(&key("a"), "devices"), scope_of(&key("a"), "fleet"));
    }

    #[test]
    fn only_a_derived_rotation_asks_for_a_client() {
        let rotated = |salt: Option<&str>| DeviceEvent::DeviceCredentialsRotated {
            secret_hash: "ab".repeat(32),
            credential_version: 3,
            salt: salt.map(str::to_string),
            reason: None,
            at: Utc::now(),
        };
        let Wanted::Client { salt, tag } = wanted_of(
            Some(&envelope(&rotated(Some(&"cd".repeat(16))))),
            "0badcafe",
        ) else {
            panic!("a rotation with a salt wants a client");
        };
        assert_eq!(salt, "cd".repeat(16));
        assert!(tag.starts_with("credential v3 "), "{tag}");
        assert!(tag.ends_with(" 0badcafe"), "{tag}");
        assert!(!tag.contains(&salt), "the tag does not show the salt");
        assert_eq!(
            wanted_of(Some(&envelope(&rotated(None))), "s"),
            Wanted::Nothing
        );
        let revoked = DeviceEvent::DeviceCredentialsRevoked {
            reason: "lost".into(),
            at: Utc::now(),
        };
        assert_eq!(wanted_of(Some(&envelope(&revoked)), "s"), Wanted::Nothing);
        let decommissioned = DeviceEvent::DeviceDecommissioned {
            reason: "retired".into(),
            at: Utc::now(),
        };
        assert_eq!(
            wanted_of(Some(&envelope(&decommissioned)), "s"),
            Wanted::Nothing
        );
        assert_eq!(wanted_of(None, "s"), Wanted::Nothing);
    }
}
