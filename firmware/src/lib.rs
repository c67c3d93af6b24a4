//! Firmware images: their bytes in object storage, and their signatures.
//!
//! Images live in object storage (the local filesystem by default, any S3-compatible store by
//! configuration), content-addressed: the key is `sha256/{hex digest}`, so the same image
//! uploaded twice under two versions is stored once. An upload streams into a temporary
//! object while its SHA-256 is computed and its size counted; only a complete, verified image
//! is moved to its address. Nothing holds a whole image in memory.
//!
//! At release the platform signs the image's digest with an ed25519 key: the signature covers
//! the 32 raw bytes of the SHA-256 of the image. Devices check it with the public key served at
//! `GET /api/v1/firmware/signing-key`, named by its key id.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey};
use futures::{Stream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};
use sha2::{Digest, Sha256};

/// The signature algorithm named in OTA messages and the public key document.
pub const SIGNATURE_ALGORITHM: &str = "ed25519";

/// Where images go and how large they may be.
pub struct FirmwareStore {
    objects: Arc<dyn ObjectStore>,
    max_image_bytes: u64,
    signer: ImageSigner,
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// More bytes than the limit.
    #[error("the image is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// No bytes at all.
    #[error("the image is empty")]
    Empty,
    /// The client named a digest the bytes do not have.
    #[error("the image's sha256 is {actual}, not {expected} as the request said")]
    DigestMismatch {
        /// What the client said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The request body broke off.
    #[error("the upload broke off: {0}")]
    Body(String),
    /// Object storage failed.
    #[error("object storage: {0}")]
    Storage(#[from] object_store::Error),
}

/// An image stored at its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Its key in object storage.
    pub storage_key: String,
}

impl FirmwareStore {
    /// A store over `objects`, refusing images over `max_image_bytes`, signing with `signer`.
    pub fn new(objects: Arc<dyn ObjectStore>, max_image_bytes: u64, signer: ImageSigner) -> Self {
        Self {
            objects,
            max_image_bytes,
            signer,
        }
    }

    /// A store in a local directory (created if missing).
    pub fn local(
        directory: &Path,
        max_image_bytes: u64,
        signer: ImageSigner,
    ) -> Result<Self, object_store::Error> {
        std::fs::create_dir_all(directory).map_err(|source| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(source),
        })?;
        let objects = LocalFileSystem::new_with_prefix(directory)?;
        Ok(Self::new(Arc::new(objects), max_image_bytes, signer))
    }

    /// A store at `url`: `file:///dir`, `s3://bucket/prefix`, or any other scheme
    /// `object_store` knows, configured by `options` (`object_store`'s keys, such as
    /// `aws_endpoint`, `aws_region`, `aws_access_key_id`; see [`options_from_env`]).
    pub fn at_url(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
        max_image_bytes: u64,
        signer: ImageSigner,
    ) -> Result<Self, object_store::Error> {
        let parsed = url::Url::parse(url).map_err(|source| object_store::Error::Generic {
            store: "url",
            source: Box::new(source),
        })?;
        if parsed.scheme() == "file" {
            let directory = parsed
                .to_file_path()
                .map_err(|()| object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: format!("{url} is not a local directory").into(),
                })?;
            return Self::local(&directory, max_image_bytes, signer);
        }
        let (objects, prefix) = object_store::parse_url_opts(&parsed, options)?;
        let objects: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(objects)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(objects, prefix))
        };
        Ok(Self::new(objects, max_image_bytes, signer))
    }

    /// The largest image accepted.
    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    /// The signing key.
    pub fn signer(&self) -> &ImageSigner {
        &self.signer
    }

    /// Streams `body` into storage, hashing as it goes; checks size and, when given, the
    /// digest; then moves it to its content address. A failed upload leaves nothing behind.
    pub async fn store<S, E>(
        &self,
        body: S,
        expected_sha256: Option<&str>,
    ) -> Result<StoredImage, UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let staging = ObjectPath::from(format!("uploads/{}", uuid::Uuid::new_v4()));
        let upload = self.objects.put_multipart(&staging).await?;
        let mut writer = WriteMultipart::new(upload);
        let written = self.stream_into(body, &mut writer).await;
        let (sha256, size_bytes) = match written {
            Ok(done) => done,
            Err(error) => {
                let _ = writer.abort().await;
                return Err(error);
            }
        };
        writer.finish().await?;
        let verified = if size_bytes == 0 {
            Err(UploadError::Empty)
        } else {
            match expected_sha256 {
                Some(expected) if !expected.eq_ignore_ascii_case(&sha256) => {
                    Err(UploadError::DigestMismatch {
                        expected: expected.to_ascii_lowercase(),
                        actual: sha256.clone(),
                    })
                }
                _ => Ok(()),
            }
        };
        if let Err(error) = verified {
            let _ = self.objects.delete(&staging).await;
            return Err(error);
        }
        let storage_key = format!("sha256/{sha256}");
        let address = ObjectPath::from(storage_key.as_str());
        match self.objects.head(&address).await {
            // Stored before: keep the first copy.
            Ok(_) => {
                let _ = self.objects.delete(&staging).await;
            }
            Err(object_store::Error::NotFound { .. }) => {
                // Same bytes, same address: a concurrent upload of the same image may win the
                // race, and overwriting it changes nothing.
                self.objects.rename(&staging, &address).await?;
            }
            Err(error) => {
                let _ = self.objects.delete(&staging).await;
                return Err(error.into());
            }
        }
        Ok(StoredImage {
            sha256,
            size_bytes,
            storage_key,
        })
    }

    async fn stream_into<S, E>(
        &self,
        mut body: S,
        writer: &mut WriteMultipart,
    ) -> Result<(String, u64), UploadError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > self.max_image_bytes {
                return Err(UploadError::TooLarge(self.max_image_bytes));
            }
            hasher.update(&chunk);
            // At most a few parts buffered: memory stays flat whatever the image's size.
            writer.wait_for_capacity(2).await?;
            writer.put(chunk);
        }
        Ok((hex::encode(hasher.finalize()), size))
    }

    /// Bytes `range` (all when `None`) of the image at `storage_key`, as a stream.
    pub async fn read(
        &self,
        storage_key: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>> + use<>, object_store::Error>
    {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self
            .objects
            .get_opts(&ObjectPath::from(storage_key), options)
            .await?;
        Ok(result.into_stream())
    }
}

/// The store options in the environment: every `AWS_*` variable, as the `aws_*` key of the
/// same name (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_ALLOW_HTTP` ...).
pub fn options_from_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| name.starts_with("AWS_"))
        .map(|(name, value)| (name.to_ascii_lowercase(), value))
        .collect()
}

/// The ed25519 key that signs released images.
pub struct ImageSigner {
    key: SigningKey,
    key_id: String,
}

/// A signature of an image's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestSignature {
    /// Which key signed.
    pub key_id: String,
    /// Base64 of the 64-byte ed25519 signature over the 32 raw bytes of the SHA-256.
    pub signature: String,
}

/// Why the signing key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file.
    #[error("signing key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Not a PKCS#8 PEM ed25519 private key.
    #[error("signing key file {path} is not a PKCS#8 PEM ed25519 private key: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

impl ImageSigner {
    /// A signer with `key`.
    pub fn new(key: SigningKey) -> Self {
        // The key id names the public key: the first 16 hex digits of its SHA-256.
        let digest = Sha256::digest(key.verifying_key().as_bytes());
        let key_id = hex::encode(&digest[..8]);
        Self { key, key_id }
    }

    /// The key in `path` (PKCS#8 PEM); with `create`, a new key is written there (mode 0600)
    /// if the file does not exist.
    pub fn from_file(path: &Path, create: bool) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let io = |source| KeyError::Io {
            path: shown.clone(),
            source,
        };
        if create && !path.exists() {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let pem = key
                .to_pkcs8_pem(Default::default())
                .map_err(|e| KeyError::Invalid {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            write_private(path, pem.as_bytes()).map_err(io)?;
            tracing::info!(path = %shown, "generated a firmware signing key");
        }
        let pem = std::fs::read_to_string(path).map_err(io)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self::new(key))
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Base64 of the 32-byte public key.
    pub fn public_key_base64(&self) -> String {
        BASE64.encode(self.key.verifying_key().as_bytes())
    }

    /// The public key as SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap_or_default()
    }

    /// Signs the digest `sha256_hex` (64 hex digits).
    pub fn sign_digest(&self, sha256_hex: &str) -> Result<DigestSignature, hex::FromHexError> {
        let digest = hex::decode(sha256_hex)?;
        Ok(DigestSignature {
            key_id: self.key_id.clone(),
            signature: BASE64.encode(self.key.sign(&digest).to_bytes()),
        })
    }
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signature, Verifier};

    use super::*;

    #[test]
    fn a_signature_verifies_with_the_public_key_over_the_raw_digest() {
        let signer = ImageSigner::new(SigningKey::from_bytes(&[7; 32]));
        let digest = hex::encode(Sha256::digest(b"image"));
        let signed = signer.sign_digest(&digest).unwrap();
        assert_eq!(signed.key_id, signer.key_id());
        assert_eq!(signer.key_id().len(), 16);
        let public = ed25519_dalek::VerifyingKey::from_bytes(
            &BASE64
                .decode(signer.public_key_base64())
                .unwrap()
                .try_into()
                .unwrap(),
        )
        .unwrap();
        let signature = Signature::from_slice(&BASE64.decode(&signed.signature).unwrap()).unwrap();
        public
            .verify(&hex::decode(&digest).unwrap(), &signature)
            .unwrap();
        assert!(public.verify(b"other", &signature).is_err());
        assert!(signer
            .public_key_pem()
            .starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn a_generated_key_is_kept_and_read_back() {
        let directory = std::env::temp_dir().join(format!("fleetlog-key-{}", uuid::Uuid::new_v4()));
        let path = directory.join("keys/signing.pem");
        let first = ImageSigner::from_file(&path, true).unwrap();
        let again = ImageSigner::from_file(&path, false).unwrap();
        assert_eq!(first.key_id(), again.key_id());
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            ImageSigner::from_file(&path, true),
            Err(KeyError::Invalid { .. })
        ));
        std::fs::remove_dir_all(directory).unwrap();
    }
}
