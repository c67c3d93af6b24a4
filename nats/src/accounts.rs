//! Who connects to NATS as whom. Each role has a user of its own with only the rights it
//! needs; `deploy/nats/accounts.conf` grants them (the relay alone may publish events). The
//! names here and there must agree.

use std::collections::HashMap;

use secrecy::{ExposeSecret, SecretString};

/// The relay: publishes to the event stream, owns it.
pub const RELAY: &str = "fleetlog.relay";
/// The projections and the rollout manager (`fleetlog project`).
pub const PROJECT: &str = "fleetlog.project";
/// The ingest bridge: dead letters only.
pub const INGEST: &str = "fleetlog.ingest";
/// The dispatcher.
pub const DISPATCH: &str = "fleetlog.dispatch";
/// The broker sync.
pub const SYNC: &str = "fleetlog.sync";
/// The API (live streams), and `fleetlog events tail`.
pub const API: &str = "fleetlog.api";
/// Read-only, for third parties.
pub const READER: &str = "fleetlog.reader";
/// Operators: everything in the account.
pub const ADMIN: &str = "fleetlog.admin";

/// A NATS user and its password.
#[derive(Clone)]
pub struct NatsUser {
    /// The user name.
    pub name: String,
    /// The password.
    pub password: SecretString,
}

impl std::fmt::Debug for NatsUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NatsUser({}:***)", self.name)
    }
}

/// The users a process's roles connect as, by user name ([`RELAY`], [`PROJECT`], ...). A
/// role whose user has no password here connects with the URL's own credentials, if any.
#[derive(Debug, Clone, Default)]
pub struct NatsUsers(HashMap<&'static str, NatsUser>);

impl NatsUsers {
    /// Adds `user` with `password`, if there is one.
    pub fn with(mut self, user: &'static str, password: Option<&SecretString>) -> Self {
        if let Some(password) = password {
            self.0.insert(
                user,
                NatsUser {
                    name: user.to_string(),
                    password: password.clone(),
                },
            );
        }
        self
    }

    /// The user of that name, if it has a password.
    pub fn get(&self, user: &str) -> Option<&NatsUser> {
        self.0.get(user)
    }
}

/// Connects to NATS as `user`, or with the URL's own credentials
/// (`nats://user:password@host:port`) when `None`: the client leaves a URL's credentials unused
/// unless told. The client reconnects by itself after the connection drops.
pub async fn connect_as(
    url: &str,
    user: Option<&NatsUser>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let from_url = url
        .parse::<async_nats::ServerAddr>()
        .ok()
        .and_then(|address| {
            let name = address.username()?.to_string();
            let password = address.password().unwrap_or_default().to_string();
            Some(NatsUser {
                name,
                password: password.into(),
            })
        });
    let user = user.or(from_url.as_ref());
    let mut options = async_nats::ConnectOptions::new()
        .name(user.map_or("fleetlog", |user| user.name.as_str()))
        .retry_on_initial_connect();
    if let Some(user) = user {
        options = options
            .user_and_password(user.name.clone(), user.password.expose_secret().to_string())
            .custom_inbox_prefix(inbox_prefix(&user.name));
    }
    options.connect(url).await
}

/// The inbox prefix of `user`: replies and pulled messages come to subjects under it, and
/// `deploy/nats/accounts.conf` lets each user subscribe to its own only.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{}", user.replace('.', "_"))
}
