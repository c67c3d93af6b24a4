//! Where the MQTT broker is and how to reach it: `FLEETLOG_MQTT_URL` parsing, client options,
//! and a readiness probe; and who may do what there ([`access`]: the accounts, their rights,
//! and the admin client of Mosquitto's dynamic-security plugin).

pub mod access;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Transport};

/// The largest message payload the broker accepts: Mosquitto's `message_size_limit` in the
/// configurations fleetlog ships (`deploy/`) is this, 256 KiB. Ingest reads packets up to this
/// plus [`PACKET_OVERHEAD`], so no message the broker let through can make it drop its
/// connection (the persistent session would redeliver it at every reconnect, stalling ingest
/// for everyone); it refuses larger-than-useful payloads itself, with a dead letter. Dispatch
/// never publishes more than this, so the broker takes everything it sends.
pub const BROKER_MESSAGE_LIMIT: usize = 256 * 1024;
/// Room for an MQTT PUBLISH's fixed header, topic and packet id beside the payload (a topic is
/// at most 65,535 bytes).
pub const PACKET_OVERHEAD: usize = 64 * 1024 + 16;

/// A broker address from `mqtt://[user[:password]@]host[:port]` (`mqtts://` for TLS with the
/// system's roots; default ports 1883 and 8883).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// The certificate authority (PEM) that signed the broker's TLS certificate, when it is not
    /// one of the system's roots (`FLEETLOG_MQTT_CA_FILE`).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        let user = match &self.credentials {
            Some((user, _)) => format!("{user}:***@"),
            None => String::new(),
        };
        write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A malformed broker URL.
#[derive(Debug, thiserror::Error)]
#[error("MQTT URL {url:?}: {reason}")]
pub struct BrokerUrlError {
    url: String,
    reason: &'static str,
}

impl std::str::FromStr for BrokerUrl {
    type Err = BrokerUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let error = |reason| BrokerUrlError {
            url: url.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("tcp://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(error("must start with mqtt://, tcp:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((userinfo, address)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((user.to_string(), password.to_string())), address)
            }
            None => (None, rest),
        };
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse().map_err(|_| error("port must be a number"))?,
            ),
            None => (address, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() || host.contains('/') {
            return Err(error("no host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
            credentials,
            ca_pem: None,
        })
    }
}

/// Makes aws-lc-rs the process's TLS crypto provider, once. Two providers are built into
/// fleetlog (sqlx brings ring, the MQTT client and the object store aws-lc-rs), and rustls then
/// refuses to guess: without a default, the first TLS connection of the MQTT client or of the
/// S3 store panics. Every process calls this at start; TLS broker options call it too.
pub fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Someone installed one already: theirs stands.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// What to tell an operator when the broker refused a connection for its credentials: which
/// account, and where its password comes from. `None` for any other failure.
pub fn credential_hint(error: &rumqttc::ConnectionError, url: &BrokerUrl) -> Option<String> {
    match error {
        rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::NotAuthorized
            | rumqttc::ConnectReturnCode::BadUserNamePassword,
        ) => Some(match &url.credentials {
            Some((user, _)) => format!(
                "the broker refused the account {user}: check its password, and that the \
                 broker sync (fleetlog broker-sync) has created the account"
            ),
            None => "the broker refused a connection without credentials: set this role's \
                     broker password"
                .to_string(),
        }),
        _ => None,
    }
}

/// Socket options for fleetlog's own MQTT connections: Nagle's algorithm off (rumqttc leaves
/// it on), so an acknowledgement or a small publish leaves at once instead of waiting for the
/// peer to acknowledge the segment before it. Set them on every event loop the platform runs.
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut options = rumqttc::NetworkOptions::new();
    options.set_tcp_nodelay(true);
    options
}

impl BrokerUrl {
    /// Client options for this broker under `client_id`.
    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, &self.host, self.port);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        if self.tls {
            install_crypto_provider();
            options.set_transport(match &self.ca_pem {
                Some(ca) => Transport::tls(ca.clone(), None, None),
                None => Transport::tls_with_default_config(),
            });
        }
        options
    }

    /// The same broker as `username` with `password`.
    pub fn as_user(&self, username: &str, password: &str) -> Self {
        Self {
            credentials: Some((username.to_string(), password.to_string())),
            ..self.clone()
        }
    }

    /// Connects, waits for the broker's CONNACK and disconnects: readiness for processes that
    /// need the broker. A broker that answers but refuses the probe's credentials (the API
    /// holds no broker account) is up.
    pub async fn probe(&self, patience: Duration) -> Result<(), String> {
        let client_id = format!("fleetlog.probe.{}", std::process::id());
        let mut options = self.options(&client_id);
        options.set_clean_session(true);
        let (client, mut events) = AsyncClient::new(options, 4);
        let handshake = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => continue,
                    Err(rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::NotAuthorized
                        | rumqttc::ConnectReturnCode::BadUserNamePassword,
                    )) => return Ok(()),
                    Err(error) => return Err(error.to_string()),
                }
            }
        };
        let outcome = match tokio::time::timeout(patience, handshake).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {patience:?}")),
        };
        let _ = client.try_disconnect();
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_tls_and_credentials() {
        let plain: BrokerUrl = "mqtt://127.0.0.1:51883".parse().unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.tls),
            ("127.0.0.1", 51883, false)
        );
        let secure: BrokerUrl = "mqtts://fleet:s3cret@broker.example".parse().unwrap();
        assert_eq!((secure.port, secure.tls), (8883, true));
        assert_eq!(
            secure.credentials,
            Some(("fleet".to_string(), "s3cret".to_string()))
        );
        assert_eq!(secure.to_string(), "mqtts://fleet:***@broker.example:8883");
        for bad in ["http://x", "mqtt://", "mqtt://host:port", "127.0.0.1:1883"] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }
}
