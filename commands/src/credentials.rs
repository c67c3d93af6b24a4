//! Hashing of secrets before they reach a command: passwords with argon2id, high-entropy
//! tokens (refresh tokens, device secrets) with SHA-256. Events only ever hold these hashes.
//!
//! Device secrets are derived, not drawn: `HMAC-SHA256(credential key, device id, salt)`, with a
//! fresh random salt per issue ([`DeviceCredentialKey`]). The log keeps the salt and the hash;
//! the broker sync, which holds the key, sets the very secret the device was shown as its
//! broker password, after its own restart or a broker that lost its state, without any secret
//! ever being stored. (The symmetric-key group enrollments of cloud device provisioning derive
//! device keys the same way.)

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The shortest password accepted.
pub const MIN_PASSWORD_LENGTH: usize = 8;

/// Why a password was not accepted or could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Shorter than [`MIN_PASSWORD_LENGTH`] characters.
    #[error("password must be at least {MIN_PASSWORD_LENGTH} characters")]
    TooShort,
    /// Longer than 1024 bytes: refused so hashing stays cheap to reject.
    #[error("password must be at most 1024 bytes")]
    TooLong,
    /// The hasher failed.
    #[error("password hashing failed: {0}")]
    Hashing(argon2::password_hash::Error),
}

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &SecretString) -> Result<String, PasswordError> {
    let password = password.expose_secret();
    if password.chars().count() < MIN_PASSWORD_LENGTH {
        return Err(PasswordError::TooShort);
    }
    if password.len() > 1024 {
        return Err(PasswordError::TooLong);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(PasswordError::Hashing)
}

/// Whether `password` matches a PHC hash made by [`hash_password`].
pub fn verify_password(hash: &str, password: &SecretString) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok()
    })
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Compares in time independent of where the inputs differ: for hashes of presented secrets.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random token of 256 bits, hex-encoded.
pub fn random_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    SecretString::from(hex::encode(bytes))
}

/// The shortest credential key accepted, in characters.
pub const MIN_CREDENTIAL_KEY_LENGTH: usize = 32;

/// The platform's key for device secrets (`FLEETLOG_DEVICE_CREDENTIAL_KEY`). Whoever holds it
/// can compute every device's secret from the log: the API (which issues them) and the broker
/// sync (which sets them at the broker) need it, no other role does.
#[derive(Clone)]
pub struct DeviceCredentialKey(SecretString);

impl std::fmt::Debug for DeviceCredentialKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCredentialKey(***)")
    }
}

/// A credential key too short to be a key.
#[derive(Debug, thiserror::Error)]
#[error("the device credential key must be at least {MIN_CREDENTIAL_KEY_LENGTH} characters")]
pub struct WeakCredentialKey;

/// A secret just issued (a device's, or a provisioning key's): shown once, then only the salt
/// and the hash are kept.
pub struct IssuedSecret {
    /// The secret itself: the device's token and broker password.
    pub secret: SecretString,
    /// The public salt it derives from (32 hex digits).
    pub salt: String,
    /// SHA-256 hex of the secret, what HTTP ingest checks a presented token against.
    pub hash: String,
}

impl DeviceCredentialKey {
    /// A key from its text, refused when shorter than [`MIN_CREDENTIAL_KEY_LENGTH`].
    pub fn new(key: SecretString) -> Result<Self, WeakCredentialKey> {
        if key.expose_secret().chars().count() < MIN_CREDENTIAL_KEY_LENGTH {
            return Err(WeakCredentialKey);
        }
        Ok(Self(key))
    }

    /// A fresh secret for `device_id`, from a fresh random salt.
    pub fn issue(&self, device_id: &str) -> IssuedSecret {
        self.issue_with(|salt| self.derive(device_id, salt))
    }

    /// The secret issued to `device_id` with `salt`: 64 hex digits.
    pub fn derive(&self, device_id: &str, salt: &str) -> SecretString {
        self.derive_for(b"fleetlog device secret v1", device_id, salt)
    }

    /// A fresh secret for provisioning key `key_id`, from a fresh random salt.
    pub fn issue_provisioning_secret(&self, key_id: &str) -> IssuedSecret {
        self.issue_with(|salt| self.derive_provisioning_secret(key_id, salt))
    }

    /// A fresh random salt, the secret `derive` makes of it, and its hash.
    fn issue_with(&self, derive: impl FnOnce(&str) -> SecretString) -> IssuedSecret {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let salt = hex::encode(salt);
        let secret = derive(&salt);
        let hash = sha256_hex(secret.expose_secret().as_bytes());
        IssuedSecret { secret, salt, hash }
    }

    /// The secret of provisioning key `key_id` issued with `salt`: its broker password too.
    pub fn derive_provisioning_secret(&self, key_id: &str, salt: &str) -> SecretString {
        self.derive_for(b"fleetlog provisioning key v1", key_id, salt)
    }

    /// Names the key without telling anything of it: 16 hex digits, another for another key.
    /// The broker sync tags each device client with it, so a change of key is seen as a
    /// change of every device's credential.
    pub fn fingerprint(&self) -> String {
        let derived = self.derive_for(b"fleetlog key fingerprint v1", "", "");
        derived.expose_secret()[..16].to_string()
    }

    fn derive_for(&self, purpose: &[u8], id: &str, salt: &str) -> SecretString {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.expose_secret().as_bytes())
            .expect("HMAC takes keys of any length");
        // NUL separators: no purpose, id or salt holds one, so no two triples hash alike.
        mac.update(purpose);
        mac.update(b"\0");
        mac.update(id.as_bytes());
        mac.update(b"\0");
        mac.update(salt.as_bytes());
        SecretString::from(hex::encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DeviceCredentialKey {
        DeviceCredentialKey::new(SecretString::from("k".repeat(32))).unwrap()
    }

    #[test]
    fn device_secrets_derive_again_from_their_salt_and_match_their_hash() {
        let issued = key().issue("sensor-1");
        assert_eq!(issued.salt.len(), 32);
        assert_eq!(issued.secret.expose_secret().len(), 64);
        assert_eq!(
            key().derive("sensor-1", &issued.salt).expose_secret(),
            issued.secret.expose_secret()
        );
        assert_eq!(
            sha256_hex(issued.secret.expose_secret().as_bytes()),
            issued.hash
        );
        // Another device, salt or key gives another secret.
        assert_ne!(
            key().derive("sensor-2", &issued.salt).expose_secret(),
            issued.secret.expose_secret()
        );
        assert_ne!(
            key().issue("sensor-1").secret.expose_secret(),
            issued.secret.expose_secret()
        );
        // A provisioning key of the same id and salt has another secret.
        assert_ne!(
            key()
                .derive_provisioning_secret("sensor-1", &issued.salt)
                .expose_secret(),
            issued.secret.expose_secret()
        );
        let other_key = DeviceCredentialKey::new(SecretString::from("j".repeat(32))).unwrap();
        assert_ne!(
            other_key.derive("sensor-1", &issued.salt).expose_secret(),
            issued.secret.expose_secret()
        );
    }

    #[test]
    fn fingerprints_tell_keys_apart() {
        let other = DeviceCredentialKey::new(SecretString::from("j".repeat(32))).unwrap();
        assert_eq!(key().fingerprint(), key().fingerprint());
        assert_ne!(key().fingerprint(), other.fingerprint());
        assert_eq!(key().fingerprint().len(), 16);
    }

    #[test]
    fn short_credential_keys_are_refused_and_keys_never_print() {
        assert!(DeviceCredentialKey::new(SecretString::from("k".repeat(31))).is_err());
        assert_eq!(format!("{:?}", key()), "DeviceCredentialKey(***)");
    }

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let password = SecretString::from("correct horse");
        let hash = hash_password(&password).unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, &password));
        assert!(!verify_password(&hash, &SecretString::from("wrong horse")));
        assert!(!verify_password("not a hash", &password));
    }

    #[test]
    fn short_passwords_are_refused() {
        assert!(matches!(
            hash_password(&SecretString::from("short")),
            Err(PasswordError::TooShort)
        ));
    }

    #[test]
    fn tokens_are_random_and_hash_to_64_hex_digits() {
        let a = random_token();
        let b = random_token();
        assert_ne!(a.expose_secret(), b.expose_secret());
        let hash = sha256_hex(a.expose_secret().as_bytes());
        assert_eq!(hash.len(), 64);
    }
}
