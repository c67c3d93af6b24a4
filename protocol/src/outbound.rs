//! What fleetlog sends devices, as typed messages: the dispatcher serialises these, and the
//! README's device contract describes them. One place for the shape of each topic's body.
//!
//! - `{root}/{id}/commands`: [`CommandMessage`];
//! - `{root}/{id}/desired` (retained): [`DesiredMessage`], the whole document;
//! - `{root}/{id}/ota`: [`OtaMessage`], `"action": "install"` or `"cancel"`.

use chrono::{DateTime, Utc};
use fleetlog_domain::firmware::{FirmwareId, ImageSignature};
use fleetlog_domain::{CommandId, RolloutId};
use serde::Serialize;
use serde_json::{Map, Value};

/// A command for the device to carry out and answer on `commands/{command_id}/reply`.
#[derive(Debug, Serialize)]
pub struct CommandMessage<'a> {
    /// The id the device answers with and deduplicates by.
    pub command_id: &'a CommandId,
    /// The command's name, e.g. `reboot`.
    pub name: &'a str,
    /// Its parameters, a JSON object.
    pub params: &'a Value,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// After this, an answer is no longer taken.
    pub expires_at: DateTime<Utc>,
}

/// The device's whole desired document; a device applies only a newer `version`.
#[derive(Debug, Serialize)]
pub struct DesiredMessage<'a> {
    /// Incremented at every change.
    pub version: u64,
    /// The properties the fleet wants the device to report.
    pub desired: &'a Map<String, Value>,
}

/// A firmware update to install, or one to give up; the device deduplicates by `rollout_id`
/// and `firmware_id`.
#[derive(Debug, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OtaMessage<'a> {
    /// Download (with the device token, HTTP Range to resume), check the SHA-256 and the
    /// platform's signature of it (public key by `key_id`), then install.
    Install {
        /// The rollout behind the update, if any.
        rollout_id: Option<&'a RolloutId>,
        /// The image.
        firmware_id: &'a FirmwareId,
        /// The version the device should end up reporting.
        version: &'a str,
        /// SHA-256 hex of the image.
        sha256: &'a str,
        /// Its size in bytes.
        size_bytes: u64,
        /// Base64 ed25519 signature of the digest's 32 raw bytes.
        signature: Option<&'a str>,
        /// `ed25519`.
        signature_algorithm: Option<&'a str>,
        /// Which platform key signed.
        key_id: Option<&'a str>,
        /// Where to download it, relative to the API.
        download_path: String,
        /// The same as a full URL, when the platform knows its public address.
        download_url: Option<String>,
        /// When the update was requested.
        requested_at: DateTime<Utc>,
    },
    /// Stop that update if it still can be stopped: its rollout was aborted, its time ran
    /// out, or the device was decommissioned.
    Cancel {
        /// The rollout behind the update, if any.
        rollout_id: Option<&'a RolloutId>,
        /// The image given up.
        firmware_id: Option<&'a FirmwareId>,
        /// Why.
        reason: &'a str,
        /// When.
        canceled_at: DateTime<Utc>,
    },
}

impl<'a> OtaMessage<'a> {
    /// The install message of `firmware_id`, signed by `signature` if it was released so.
    #[allow(clippy::too_many_arguments)]
    pub fn install(
        rollout_id: Option<&'a RolloutId>,
        firmware_id: &'a FirmwareId,
        version: &'a str,
        sha256: &'a str,
        size_bytes: u64,
        signature: Option<&'a ImageSignature>,
        public_url: Option<&str>,
        requested_at: DateTime<Utc>,
    ) -> Self {
        let download_path = format!("/api/v1/firmware/{firmware_id}/download");
        let download_url =
            public_url.map(|base| format!("{}{download_path}", base.trim_end_matches('/')));
        Self::Install {
            rollout_id,
            firmware_id,
            version,
            sha256,
            size_bytes,
            signature: signature.map(|s| s.signature.as_str()),
            signature_algorithm: signature.map(|s| s.algorithm.as_str()),
            key_id: signature.map(|s| s.key_id.as_str()),
            download_path,
            download_url,
            requested_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ota_messages_name_their_action_first_and_carry_what_a_device_needs() {
        let firmware = FirmwareId::parse("thermo@2.0.0").unwrap();
        let rollout = RolloutId::parse("r1").unwrap();
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let signature = ImageSignature {
            algorithm: "ed25519".into(),
            key_id: "k1".into(),
            signature: "c2ln".into(),
        };
        let install = OtaMessage::install(
            Some(&rollout),
            &firmware,
            "2.0.0",
            "ab",
            10,
            Some(&signature),
            Some("https://fleet.example.com/"),
            at,
        );
        assert_eq!(
            serde_json::to_value(&install).unwrap(),
            json!({"action": "install", "rollout_id": "r1", "firmware_id": "thermo@2.0.0",
                   "version": "2.0.0", "sha256": "ab", "size_bytes": 10, "signature": "c2ln",
                   "signature_algorithm": "ed25519", "key_id": "k1",
                   "download_path": "/api/v1/firmware/thermo@2.0.0/download",
                   "download_url": "https://fleet.example.com/api/v1/firmware/thermo@2.0.0/download",
                   "requested_at": "2026-01-01T00:00:00Z"})
        );
        assert!(serde_json::to_string(&install)
            .unwrap()
            .starts_with(r#"{"action":"install""#));
        let cancel = OtaMessage::Cancel {
            rollout_id: Some(&rollout),
            firmware_id: Some(&firmware),
            reason: "rollout r1 aborted",
            canceled_at: at,
        };
        assert_eq!(
            serde_json::to_value(&cancel).unwrap(),
            json!({"action": "cancel", "rollout_id": "r1", "firmware_id": "thermo@2.0.0",
                   "reason": "rollout r1 aborted", "canceled_at": "2026-01-01T00:00:00Z"})
        );
    }
}
