//! Ed25519 key files (PKCS#8 / SubjectPublicKeyInfo PEM, or base64 of the raw 32 bytes) and
//! key ids.

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use sha2::{Digest, Sha256};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Neither PEM of the right kind nor base64 of 32 bytes.
    #[error("not an Ed25519 {0} key (expected PEM or base64 of 32 bytes)")]
    Unreadable(&'static str),
    /// The bytes are not a valid Ed25519 public key (not a curve point, or a weak key).
    #[error("not a valid Ed25519 public key")]
    InvalidPublicKey,
    /// The operating system's random generator failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
    /// Encoding a key as PEM failed.
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

/// A new key from the operating system's random generator.
pub fn generate_key() -> Result<SigningKey, KeyError> {
    use rand::TryRngCore as _;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The key id of `key`: the first 16 lowercase hex digits of SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

fn raw_32(text: &str) -> Option<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// Reads a private key: PKCS#8 PEM or base64 of the 32-byte seed.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, KeyError> {
    if text.contains("-----BEGIN") {
        return SigningKey::from_pkcs8_pem(text).map_err(|_| KeyError::Unreadable("private"));
    }
    raw_32(text)
        .map(|seed| SigningKey::from_bytes(&seed))
        .ok_or(KeyError::Unreadable("private"))
}

/// Reads a public key: SubjectPublicKeyInfo PEM or base64 of the 32 bytes. Weak (small-order)
/// keys are refused.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let key = if text.contains("-----BEGIN") {
        VerifyingKey::from_public_key_pem(text).map_err(|_| KeyError::Unreadable("public"))?
    } else {
        let raw = raw_32(text).ok_or(KeyError::Unreadable("public"))?;
        VerifyingKey::from_bytes(&raw).map_err(|_| KeyError::InvalidPublicKey)?
    };
    if key.is_weak() {
        return Err(KeyError::InvalidPublicKey);
    }
    Ok(key)
}

/// `key` as PKCS#8 PEM (what `firmware.key` holds).
pub fn signing_key_pem(key: &SigningKey) -> Result<String, KeyError> {
    key.to_pkcs8_pem(Default::default())
        .map(|pem| pem.to_string())
        .map_err(|e| KeyError::Encode(e.to_string()))
}

/// `key` as SubjectPublicKeyInfo PEM (what `firmware.pub` holds).
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(Default::default())
        .map_err(|e| KeyError::Encode(e.to_string()))
}
