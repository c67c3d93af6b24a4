//! Who may do what at the broker, and the admin client that tells Mosquitto's
//! dynamic-security plugin so over its control topic (`$CONTROL/dynamic-security/v1`), with no
//! broker restart.
//!
//! The rights (see the README's device contract):
//! - a device connects with its id as user name and client id, and may publish only to its own
//!   `{root}/{id}/data`, `status`, `heartbeat`, `commands/+/reply` and `ota/progress`, and
//!   subscribe to and receive only its own `{root}/{id}/commands`, `desired` and `ota`. Each
//!   device has a role of its own ([`device_role`]): the plugin (2.0) substitutes no client id
//!   or user name into a topic, so one shared role cannot confine each device to its own topics.
//! - the ingest account ([`INGEST_USERNAME`]) alone subscribes to the devices' topics, shared
//!   groups (`$share/…`) included, and receives what they publish;
//! - the dispatch account ([`DISPATCH_USERNAME`]) alone publishes to devices' `commands`,
//!   `desired` and `ota`;
//! - the sync account ([`SYNC_USERNAME`]) is the plugin's admin (made by
//!   `mosquitto_ctrl dynsec init`); nothing else may touch the control topic.
//!
//! Everything else is denied, receiving included: a client that took over another's session
//! still receives nothing its own roles do not allow. Service accounts' names hold a `.`, which
//! no device id can, so no device can be registered under a service account's name; the
//! ingest's and dispatcher's client ids hold one too, so no device can take over their sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::BrokerUrl;

/// Where commands to the plugin go.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers, to every admin (the correlation data says to whom).
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

/// The ingest bridge's account.
pub const INGEST_USERNAME: &str = "fleetlog.ingest";
/// The dispatcher's account.
pub const DISPATCH_USERNAME: &str = "fleetlog.dispatch";
/// The broker sync's account: the plugin's admin.
pub const SYNC_USERNAME: &str = "fleetlog.sync";
/// The role of the ingest account.
pub const INGEST_ROLE: &str = "fleetlog.ingest";
/// The role of the dispatch account.
pub const DISPATCH_ROLE: &str = "fleetlog.dispatch";
/// The text name every client the sync manages for a device carries: clients without it are
/// never changed or deleted by the sync.
pub const DEVICE_CLIENT_MARK: &str = "fleetlog device";
/// The text name of the service accounts the sync keeps.
pub const SERVICE_CLIENT_MARK: &str = "fleetlog service account";
/// The text name of the clients the sync makes for provisioning keys.
pub const PROVISIONING_CLIENT_MARK: &str = "fleetlog provisioning key";

/// The role that holds one provisioning key's rights.
pub fn provisioning_role(key_id: &str) -> String {
    format!("fleetlog.provisioning.{key_id}")
}

/// A provisioning key's rights: requests under its own key id, and the answers to them, one
/// request id at a time. Subscribing to the wildcard over request ids is denied (the literal
/// filter, checked before patterns), so no holder of the key reads another's answer.
pub fn provisioning_acls(key_id: &str) -> Vec<Acl> {
    use fleetlog_protocol::provisioning::ROOT;
    let answers = format!("{ROOT}/{key_id}/+/response");
    vec![
        allow("publishClientSend", format!("{ROOT}/{key_id}/+/request")),
        Acl {
            acltype: "subscribeLiteral".into(),
            topic: answers.clone(),
            allow: false,
        },
        allow("subscribePattern", answers.clone()),
        allow("publishClientReceive", answers),
    ]
}

/// The role that holds one device's rights.
pub fn device_role(device_id: &str) -> String {
    format!("fleetlog.device.{device_id}")
}

/// One access rule of a role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Acl {
    /// `publishClientSend`, `publishClientReceive`, `subscribeLiteral`, `subscribePattern`, ...
    pub acltype: String,
    /// The topic or topic filter.
    pub topic: String,
    /// Whether it allows (or denies).
    pub allow: bool,
}

fn allow(acltype: &str, topic: String) -> Acl {
    Acl {
        acltype: acltype.to_string(),
        topic,
        allow: true,
    }
}

/// The topics a device publishes under `{root}/{id}/`.
pub const DEVICE_PUBLISHES: [&str; 5] = [
    "data",
    "status",
    "heartbeat",
    "commands/+/reply",
    "ota/progress",
];
/// The topics a device receives under `{root}/{id}/`.
pub const DEVICE_RECEIVES: [&str; 3] = ["commands", "desired", "ota"];

/// A device's rights: its own topics, nothing else.
pub fn device_acls(root: &str, device_id: &str) -> Vec<Acl> {
    let own = |leaf: &str| format!("{root}/{device_id}/{leaf}");
    let mut acls: Vec<Acl> = DEVICE_PUBLISHES
        .iter()
        .map(|leaf| allow("publishClientSend", own(leaf)))
        .collect();
    for leaf in DEVICE_RECEIVES {
        acls.push(allow("subscribeLiteral", own(leaf)));
        acls.push(allow("publishClientReceive", own(leaf)));
    }
    acls
}

/// What a client asks to do with a topic, as a broker that asks per topic puts it (EMQX's HTTP
/// authorization: `publish` or `subscribe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopicAction {
    /// Publish to a topic.
    Publish,
    /// Subscribe to a topic filter.
    Subscribe,
}

/// Whether the device `device_id` may `action` `topic`: the rights [`device_acls`] gives it,
/// for a broker that asks topic by topic instead of holding roles. Publishing: to its own
/// outbound topics, one level of `commands/+/reply` filled by a command id; subscribing: to
/// exactly its own inbound topics, no wildcard. Everything else is denied.
pub fn device_may(root: &str, device_id: &str, action: TopicAction, topic: &str) -> bool {
    if topic.contains(['+', '#', '\0']) {
        return false;
    }
    let Some(own) = topic
        .strip_prefix(root)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_prefix(device_id))
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    match action {
        TopicAction::Subscribe => DEVICE_RECEIVES.contains(&own),
        TopicAction::Publish => DEVICE_PUBLISHES.iter().any(|leaf| {
            let (mut pattern, mut levels) = (leaf.split('/'), own.split('/'));
            loop {
                match (pattern.next(), levels.next()) {
                    (None, None) => return true,
                    (Some("+"), Some(level)) if !level.is_empty() => {}
                    (Some(expected), Some(level)) if expected == level => {}
                    _ => return false,
                }
            }
        }),
    }
}

/// The ingest's rights: every device's outbound topics, plainly or in any shared group, and
/// provisioning requests, which it answers.
pub fn ingest_acls(root: &str) -> Vec<Acl> {
    use fleetlog_protocol::provisioning::{REQUEST_FILTER, ROOT};
    let mut acls = vec![
        allow("subscribeLiteral", REQUEST_FILTER.to_string()),
        allow("subscribePattern", format!("$share/+/{REQUEST_FILTER}")),
        allow("publishClientReceive", REQUEST_FILTER.to_string()),
        allow("publishClientSend", format!("{ROOT}/+/+/response")),
        // The broker's version: whether it keeps shared subscriptions over a restart.
        allow("subscribeLiteral", "$SYS/broker/version".to_string()),
        allow("publishClientReceive", "$SYS/broker/version".to_string()),
    ];
    for leaf in DEVICE_PUBLISHES {
        let filter = format!("{root}/+/{leaf}");
        acls.push(allow("subscribeLiteral", filter.clone()));
        acls.push(allow("subscribePattern", format!("$share/+/{filter}")));
        acls.push(allow("publishClientReceive", filter));
    }
    acls
}

/// The dispatcher's rights: publishing to every device's inbound topics.
pub fn dispatch_acls(root: &str) -> Vec<Acl> {
    DEVICE_RECEIVES
        .iter()
        .map(|leaf| allow("publishClientSend", format!("{root}/+/{leaf}")))
        .collect()
}

/// A client as the plugin lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct BrokerClient {
    /// Its user name.
    pub username: String,
    /// The client id it must use, if bound to one.
    #[serde(default)]
    pub clientid: Option<String>,
    /// Its text name: [`DEVICE_CLIENT_MARK`] for the sync's device clients.
    #[serde(default)]
    pub textname: Option<String>,
    /// Its text description: the sync's tag of the credential it holds.
    #[serde(default)]
    pub textdescription: Option<String>,
    /// Its roles.
    #[serde(default)]
    pub roles: Vec<RoleRef>,
}

impl BrokerClient {
    /// Whether the sync made it for a device.
    pub fn is_device_client(&self) -> bool {
        self.textname.as_deref() == Some(DEVICE_CLIENT_MARK)
    }
}

/// A role a client holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RoleRef {
    /// The role's name.
    pub rolename: String,
}

/// What a device client was made or changed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClientChange {
    /// Created: the device can connect now.
    Created,
    /// Given the new password; its sessions were disconnected.
    Rotated,
    /// Already held this credential: nothing done, no session disturbed.
    Unchanged,
}

/// Why the admin client failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The broker could not be reached, or refused the admin.
    #[error("cannot connect to the broker as its admin: {0}")]
    Connect(String),
    /// The connection ended.
    #[error("the broker connection closed")]
    Closed,
    /// The plugin did not answer in time.
    #[error("the broker's dynamic-security plugin did not answer {0} in time")]
    Timeout(String),
    /// The plugin refused a command.
    #[error("the broker refused {command}: {reason}")]
    Refused {
        /// The command.
        command: String,
        /// The plugin's reason.
        reason: String,
    },
    /// A client of that name exists and is not the sync's.
    #[error("the broker has a client {0:?} that fleetlog does not manage; it is left alone")]
    NotOurs(String),
    /// An answer that could not be read.
    #[error("unreadable answer from the broker: {0}")]
    Malformed(String),
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// A connection to the broker as the dynamic-security admin. Commands are matched to their
/// answers by correlation data. The first connection error ends it (every waiting command
/// fails with [`AccessError::Closed`]): whoever holds it connects again and reconciles, since
/// the broker may have restarted without its state.
pub struct DynsecAdmin {
    client: AsyncClient,
    pending: Pending,
    patience: Duration,
    events: tokio::task::JoinHandle<()>,
}

/// Clients per page of `listClients`.
const LIST_PAGE: usize = 1_000;

impl DynsecAdmin {
    /// Connects as the admin `url` names (its user and password), waits up to `patience` for the
    /// broker to accept and for the answer topic to be subscribed.
    pub async fn connect(
        url: &BrokerUrl,
        client_id: &str,
        patience: Duration,
    ) -> Result<Self, AccessError> {
        let mut options = url.options(client_id);
        options.set_clean_session(true);
        options.set_keep_alive(Duration::from_secs(30));
        // A page of `listClients` is far above rumqttc's 10 KiB default.
        options.set_max_packet_size(32 * 1024 * 1024, 1024 * 1024);
        let (client, mut events) = AsyncClient::new(options, 64);
        let handshake = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                    Ok(_) => continue,
                    Err(error) => return Err(AccessError::Connect(error.to_string())),
                }
            }
            client
                .subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
                .await
                .map_err(|error| AccessError::Connect(error.to_string()))?;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let granted = ack
                            .return_codes
                            .iter()
                            .all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_)));
                        return if granted {
                            Ok(())
                        } else {
                            Err(AccessError::Connect(format!(
                                "not allowed to subscribe to {RESPONSE_TOPIC}: is this the \
                                 dynamic-security admin?"
                            )))
                        };
                    }
                    Ok(_) => continue,
                    Err(error) => return Err(AccessError::Connect(error.to_string())),
                }
            }
        };
        match tokio::time::timeout(patience, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(AccessError::Connect(format!(
                    "no answer within {patience:?}"
                )))
            }
        }
        let pending: Pending = Arc::default();
        let answers = pending.clone();
        let events = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish)))
                        if publish.topic == RESPONSE_TOPIC =>
                    {
                        route_answers(&answers, &publish.payload);
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "broker admin connection lost");
                        // Dropping the senders fails every waiting command.
                        answers.lock().expect("answers lock").clear();
                        return;
                    }
                }
            }
        });
        Ok(Self {
            client,
            pending,
            patience,
            events,
        })
    }

    /// Whether the connection still stands.
    pub fn is_connected(&self) -> bool {
        !self.events.is_finished()
    }

    /// Sends `commands` in one message and answers each one's outcome, in order: its `data`
    /// (or `null`), or the plugin's error text.
    pub async fn run(
        &self,
        commands: Vec<Value>,
    ) -> Result<Vec<Result<Value, String>>, AccessError> {
        if !self.is_connected() {
            return Err(AccessError::Closed);
        }
        let mut waiting = Vec::with_capacity(commands.len());
        let mut tagged = Vec::with_capacity(commands.len());
        for mut command in commands {
            let correlation = uuid::Uuid::new_v4().simple().to_string();
            let name = command["command"].as_str().unwrap_or_default().to_string();
            command["correlationData"] = Value::String(correlation.clone());
            let (sender, receiver) = oneshot::channel();
            self.pending
                .lock()
                .expect("answers lock")
                .insert(correlation.clone(), sender);
            waiting.push((correlation, name, receiver));
            tagged.push(command);
        }
        let body = json!({ "commands": tagged }).to_string();
        let forget = |waiting: &[(String, String, oneshot::Receiver<Value>)]| {
            let mut pending = self.pending.lock().expect("answers lock");
            for (correlation, _, _) in waiting {
                pending.remove(correlation);
            }
        };
        if self
            .client
            .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, body)
            .await
            .is_err()
        {
            forget(&waiting);
            return Err(AccessError::Closed);
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        let deadline = tokio::time::Instant::now() + self.patience;
        for index in 0..waiting.len() {
            let (_, name, receiver) = &mut waiting[index];
            let answer = match tokio::time::timeout_at(deadline, receiver).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => {
                    forget(&waiting);
                    return Err(AccessError::Closed);
                }
                Err(_) => {
                    let name = name.clone();
                    forget(&waiting);
                    return Err(AccessError::Timeout(name));
                }
            };
            outcomes.push(match answer.get("error").and_then(Value::as_str) {
                Some(error) => Err(error.to_string()),
                None => Ok(answer.get("data").cloned().unwrap_or(Value::Null)),
            });
        }
        Ok(outcomes)
    }

    /// Runs one command; a refusal is an error.
    pub async fn run_one(&self, command: Value) -> Result<Value, AccessError> {
        let name = command["command"].as_str().unwrap_or_default().to_string();
        let outcome = self.run(vec![command]).await?.pop();
        match outcome {
            Some(Ok(data)) => Ok(data),
            Some(Err(reason)) => Err(AccessError::Refused {
                command: name,
                reason,
            }),
            None => Err(AccessError::Malformed("no answer".into())),
        }
    }

    /// Every client the broker knows, a page at a time.
    pub async fn list_clients(&self) -> Result<Vec<BrokerClient>, AccessError> {
        let mut clients = Vec::new();
        loop {
            let data = self
                .run_one(json!({
                    "command": "listClients",
                    "verbose": true,
                    "count": LIST_PAGE,
                    "offset": clients.len(),
                }))
                .await?;
            let page: Vec<BrokerClient> =
                serde_json::from_value(data.get("clients").cloned().unwrap_or_default())
                    .map_err(|error| AccessError::Malformed(error.to_string()))?;
            let total = data
                .get("totalCount")
                .and_then(Value::as_u64)
                .unwrap_or_default() as usize;
            let got = page.len();
            clients.extend(page);
            if got == 0 || clients.len() >= total {
                return Ok(clients);
            }
        }
    }

    /// The client of that user name, if the broker has one.
    pub async fn client(&self, username: &str) -> Result<Option<BrokerClient>, AccessError> {
        match self
            .run(vec![json!({"command": "getClient", "username": username})])
            .await?
            .pop()
        {
            Some(Ok(data)) => serde_json::from_value(data["client"].clone())
                .map(Some)
                .map_err(|error| AccessError::Malformed(error.to_string())),
            Some(Err(reason)) if reason == "Client not found" => Ok(None),
            Some(Err(reason)) => Err(AccessError::Refused {
                command: "getClient".into(),
                reason,
            }),
            None => Err(AccessError::Malformed("no answer".into())),
        }
    }

    /// Denies by default whatever no role allows: publishing, subscribing and receiving
    /// (unsubscribing stays allowed).
    pub async fn deny_by_default(&self) -> Result<(), AccessError> {
        self.run_one(json!({
            "command": "setDefaultACLAccess",
            "acls": [
                {"acltype": "publishClientSend", "allow": false},
                {"acltype": "publishClientReceive", "allow": false},
                {"acltype": "subscribe", "allow": false},
                {"acltype": "unsubscribe", "allow": true},
            ],
        }))
        .await
        .map(drop)
    }

    /// Makes role `name` hold exactly `acls`: created if missing, rules added and removed in
    /// place otherwise (clients keep the role throughout).
    pub async fn ensure_role(&self, name: &str, acls: &[Acl]) -> Result<(), AccessError> {
        let existing = match self
            .run(vec![json!({"command": "getRole", "rolename": name})])
            .await?
            .pop()
        {
            Some(Ok(data)) => data["role"]["acls"].clone(),
            Some(Err(reason)) if reason == "Role not found" => {
                return self
                    .run_one(json!({"command": "createRole", "rolename": name, "acls": acls}))
                    .await
                    .map(drop);
            }
            Some(Err(reason)) => {
                return Err(AccessError::Refused {
                    command: "getRole".into(),
                    reason,
                })
            }
            None => return Err(AccessError::Malformed("no answer".into())),
        };
        let existing: Vec<Acl> = serde_json::from_value::<Vec<Value>>(existing)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|acl| {
                Some(Acl {
                    acltype: acl["acltype"].as_str()?.to_string(),
                    topic: acl["topic"].as_str()?.to_string(),
                    allow: acl["allow"].as_bool()?,
                })
            })
            .collect();
        let mut changes = Vec::new();
        for acl in &existing {
            if !acls.contains(acl) {
                changes.push(json!({"command": "removeRoleACL", "rolename": name,
                                    "acltype": acl.acltype, "topic": acl.topic}));
            }
        }
        for acl in acls {
            if !existing.contains(acl) {
                changes.push(json!({"command": "addRoleACL", "rolename": name,
                                    "acltype": acl.acltype, "topic": acl.topic,
                                    "allow": acl.allow}));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        for outcome in self.run(changes).await? {
            if let Err(reason) = outcome {
                return Err(AccessError::Refused {
                    command: "a role change".into(),
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Makes `username` a service account with `password` and the one role `role`. Its text
    /// description holds a digest of the password: an account that already holds this one is
    /// left alone, so restarting the sync disconnects nobody.
    pub async fn ensure_service_account(
        &self,
        username: &str,
        password: &str,
        role: &str,
    ) -> Result<(), AccessError> {
        let tag = password_tag(username, password);
        let tag = tag.as_str();
        match self.client(username).await? {
            None => self
                .run_one(json!({
                    "command": "createClient", "username": username, "password": password,
                    "textname": SERVICE_CLIENT_MARK, "textdescription": tag,
                    "roles": [{"rolename": role}],
                }))
                .await
                .map(drop),
            Some(client) => {
                if client.textdescription.as_deref() != Some(tag) {
                    self.run_one(json!({
                        "command": "modifyClient", "username": username, "password": password,
                        "textname": SERVICE_CLIENT_MARK, "textdescription": tag,
                        "roles": [{"rolename": role}],
                    }))
                    .await?;
                }
                Ok(())
            }
        }
    }

    /// Makes the broker accept device `device_id` with `password`, confined to its own topics
    /// under `root`. `tag` names the credential: a client that already holds it is left alone
    /// (no session is disturbed); one holding another gets the new password, and the broker
    /// disconnects its sessions.
    pub async fn ensure_device(
        &self,
        root: &str,
        device_id: &str,
        password: &str,
        tag: &str,
    ) -> Result<DeviceClientChange, AccessError> {
        let acls = device_acls(root, device_id);
        self.ensure_marked_client(
            device_id,
            DEVICE_CLIENT_MARK,
            &device_role(device_id),
            &acls,
            password,
            tag,
        )
        .await
    }

    /// Makes the broker accept provisioning key `key_id` (user name and client id
    /// `provision.{key_id}`) with `password`, confined to its requests and their answers.
    /// `tag` names the key's secret, as for devices.
    pub async fn ensure_provisioning_key(
        &self,
        key_id: &str,
        password: &str,
        tag: &str,
    ) -> Result<DeviceClientChange, AccessError> {
        let username = fleetlog_protocol::provisioning::username_of(key_id);
        let acls = provisioning_acls(key_id);
        self.ensure_marked_client(
            &username,
            PROVISIONING_CLIENT_MARK,
            &provisioning_role(key_id),
            &acls,
            password,
            tag,
        )
        .await
    }

    /// The one way the sync makes a client of its own: `username`, bound to that client id,
    /// marked `mark`, holding `role` with exactly `acls`. A client that holds `tag` already is
    /// left alone; one holding another gets the new password (the broker disconnects it); one
    /// without the mark is not the sync's and is refused.
    async fn ensure_marked_client(
        &self,
        username: &str,
        mark: &str,
        role: &str,
        acls: &[Acl],
        password: &str,
        tag: &str,
    ) -> Result<DeviceClientChange, AccessError> {
        let existing = self.client(username).await?;
        let change = match &existing {
            Some(client) if client.textname.as_deref() != Some(mark) => {
                return Err(AccessError::NotOurs(username.to_string()))
            }
            Some(client) if client.textdescription.as_deref() == Some(tag) => {
                return Ok(DeviceClientChange::Unchanged)
            }
            Some(_) => DeviceClientChange::Rotated,
            None => DeviceClientChange::Created,
        };
        self.ensure_role(role, acls).await?;
        let command = match change {
            DeviceClientChange::Created => "createClient",
            _ => "modifyClient",
        };
        self.run_one(json!({
            "command": command, "username": username, "password": password,
            "clientid": username, "textname": mark, "textdescription": tag,
            "roles": [{"rolename": role}],
        }))
        .await?;
        Ok(change)
    }

    /// Removes provisioning key `key_id`'s client and role, if the sync made them.
    pub async fn remove_provisioning_key(&self, key_id: &str) -> Result<bool, AccessError> {
        let username = fleetlog_protocol::provisioning::username_of(key_id);
        self.remove_marked(
            &username,
            PROVISIONING_CLIENT_MARK,
            &provisioning_role(key_id),
        )
        .await
    }

    /// Removes device `device_id`'s client and role; the broker disconnects its sessions.
    /// Whether there was one to remove. Clients the sync did not make are left alone.
    pub async fn remove_device(&self, device_id: &str) -> Result<bool, AccessError> {
        self.remove_marked(device_id, DEVICE_CLIENT_MARK, &device_role(device_id))
            .await
    }

    /// Removes client `username` if it carries `mark`, and `role`.
    async fn remove_marked(
        &self,
        username: &str,
        mark: &str,
        role: &str,
    ) -> Result<bool, AccessError> {
        let existed = match self.client(username).await? {
            Some(client) if client.textname.as_deref() == Some(mark) => {
                self.run_one(json!({"command": "deleteClient", "username": username}))
                    .await?;
                true
            }
            Some(_) => return Err(AccessError::NotOurs(username.to_string())),
            None => false,
        };
        // A role left behind by an interrupted removal goes too.
        match self
            .run(vec![json!({"command": "deleteRole", "rolename": role})])
            .await?
            .pop()
        {
            Some(Ok(_)) => Ok(existed),
            Some(Err(reason)) if reason == "Role not found" => Ok(existed),
            Some(Err(reason)) => Err(AccessError::Refused {
                command: "deleteRole".into(),
                reason,
            }),
            None => Err(AccessError::Malformed("no answer".into())),
        }
    }

    /// Disconnects cleanly.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.events.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for DynsecAdmin {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// What a service account's text description says of its password: enough to tell a changed
/// password, nothing to guess it by (a truncated SHA-256 of a salted form).
pub fn password_tag(username: &str, password: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("fleetlog service account\0{username}\0{password}"));
    let hex: String = digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("password {hex}")
}

fn route_answers(pending: &Pending, payload: &[u8]) {
    let Ok(answer) = serde_json::from_slice::<Value>(payload) else {
        tracing::warn!("unreadable answer on the dynamic-security response topic");
        return;
    };
    let Some(responses) = answer.get("responses").and_then(Value::as_array) else {
        return;
    };
    let mut pending = pending.lock().expect("answers lock");
    for response in responses {
        // Answers to other admins carry correlation data that is not ours: ignored.
        if let Some(sender) = response
            .get("correlationData")
            .and_then(Value::as_str)
            .and_then(|correlation| pending.remove(correlation))
        {
            let _ = sender.send(response.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_device_may_use_its_own_topics_and_nothing_else() {
        use super::TopicAction::{Publish, Subscribe};
        let may = |action, topic: &str| super::device_may("devices", "dev-1", action, topic);
        for leaf in [
            "data",
            "status",
            "heartbeat",
            "commands/c-9/reply",
            "ota/progress",
        ] {
            assert!(may(Publish, &format!("devices/dev-1/{leaf}")), "{leaf}");
        }
        for leaf in ["commands", "desired", "ota"] {
            assert!(may(Subscribe, &format!("devices/dev-1/{leaf}")), "{leaf}");
            assert!(!may(Publish, &format!("devices/dev-1/{leaf}")), "{leaf}");
        }
        for (action, topic) in [
            (Publish, "devices/dev-2/data"),
            (Publish, "devices/dev-10/data"),
            (Publish, "devices/dev-1"),
            (Publish, "devices/dev-1/"),
            (Publish, "devices/dev-1/data/more"),
            (Publish, "devices/dev-1/commands//reply"),
            (Publish, "devices/dev-1/commands/+/reply"),
            (Publish, "devices/dev-1/commands/a/b/reply"),
            (Publish, "devices/+/data"),
            (Publish, "other/dev-1/data"),
            (Publish, "devices/dev-1/data\0"),
            (Publish, ""),
            (Subscribe, "devices/dev-1/#"),
            (Subscribe, "devices/dev-1/+"),
            (Subscribe, "devices/+/commands"),
            (Subscribe, "$share/g/devices/dev-1/commands"),
            (Subscribe, "devices/dev-1/data"),
            (Subscribe, "devices/dev-2/commands"),
            (Subscribe, "#"),
            (Subscribe, "$CONTROL/dynamic-security/v1"),
        ] {
            assert!(!may(action, topic), "{action:?} {topic}");
        }
        assert!(!may(
            Publish,
            &format!("devices/dev-1/{}", "x".repeat(70_000))
        ));
    }

    use super::*;

    #[test]
    fn a_device_may_use_only_its_own_topics() {
        let acls = device_acls("devices", "sensor-1");
        assert!(acls
            .iter()
            .all(|acl| acl.topic.starts_with("devices/sensor-1/") && acl.allow));
        assert!(acls.iter().all(|acl| !acl.topic.contains('#')));
        let sends: Vec<&str> = acls
            .iter()
            .filter(|acl| acl.acltype == "publishClientSend")
            .map(|acl| acl.topic.as_str())
            .collect();
        assert_eq!(
            sends,
            [
                "devices/sensor-1/data",
                "devices/sensor-1/status",
                "devices/sensor-1/heartbeat",
                "devices/sensor-1/commands/+/reply",
                "devices/sensor-1/ota/progress"
            ]
        );
        assert!(acls
            .iter()
            .all(|acl| acl.acltype != "subscribePattern" || !acl.topic.contains('+')));
    }

    #[test]
    fn service_accounts_and_roles_are_named_outside_the_device_alphabet() {
        for name in [
            INGEST_USERNAME,
            DISPATCH_USERNAME,
            SYNC_USERNAME,
            INGEST_ROLE,
            DISPATCH_ROLE,
        ] {
            assert!(name.contains('.'), "{name}");
        }
        assert_eq!(device_role("a"), "fleetlog.device.a");
    }

    #[test]
    fn answers_reach_only_the_command_that_asked() {
        let pending: Pending = Arc::default();
        let (sender, mut receiver) = oneshot::channel();
        pending.lock().unwrap().insert("ours".into(), sender);
        route_answers(
            &pending,
            br#"{"responses":[{"command":"getClient","correlationData":"theirs"},
                              {"command":"getClient","error":"Client not found","correlationData":"ours"}]}"#,
        );
        let answer = receiver.try_recv().unwrap();
        assert_eq!(answer["error"], "Client not found");
        assert!(pending.lock().unwrap().is_empty());
        // Junk is ignored.
        route_answers(&pending, b"not json");
    }
}
