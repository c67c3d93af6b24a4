//! Hashing of secrets before they reach a command: passwords with argon2id, high-entropy
//! tokens (refresh tokens, device secrets) with SHA-256. Events only ever hold these hashes.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
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

/// A fresh random token of 256 bits, hex-encoded.
pub fn random_token() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    SecretString::from(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

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
