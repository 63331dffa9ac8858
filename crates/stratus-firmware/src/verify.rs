//! Signing a manifest and verifying one against trusted keys, an image digest and a policy
//! (hardware id, no downgrade), with one error variant per reason.

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};

use crate::hash::ImageDigest;
use crate::keys::{key_id, SigningKey, VerifyingKey};
use crate::manifest::{check_hardware, Manifest, ManifestError, Version};

/// Why a manifest or an image was refused. The `Display` text is one line naming the reason;
/// [`VerifyError::code`] is a stable short name for it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// The manifest breaks a rule of its format.
    #[error(transparent)]
    Malformed(#[from] ManifestError),
    /// No trusted key has the manifest's `key_id`.
    #[error("unknown key: no trusted public key has id {0}")]
    UnknownKey(String),
    /// The signature does not verify with the key it names.
    #[error("bad signature: the manifest's signature does not verify with key {0}")]
    BadSignature(String),
    /// The image is not as long as the manifest says.
    #[error("size mismatch: the manifest says {expected} bytes, the image has {actual}")]
    SizeMismatch {
        /// The manifest's `size`.
        expected: u64,
        /// The image's length.
        actual: u64,
    },
    /// The image's SHA-256 is not the manifest's.
    #[error("hash mismatch: the image's sha256 is {actual}, the manifest says {expected}")]
    HashMismatch {
        /// The manifest's `sha256`.
        expected: String,
        /// The image's.
        actual: String,
    },
    /// The version is not newer than the one installed (or already stored).
    #[error("downgrade: version {offered} is not newer than {installed}")]
    Downgrade {
        /// The manifest's version.
        offered: String,
        /// The version it must exceed.
        installed: String,
    },
    /// The image is for other hardware.
    #[error("wrong hardware: the image is for {image:?}, this is {expected:?}")]
    WrongHardware {
        /// The hardware id it must be for.
        expected: String,
        /// The manifest's hardware id.
        image: String,
    },
}

impl VerifyError {
    /// A stable short name of the reason: `malformed`, `unknown_key`, `bad_signature`,
    /// `size_mismatch`, `hash_mismatch`, `downgrade`, `wrong_hardware`.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnknownKey(_) => "unknown_key",
            VerifyError::BadSignature(_) => "bad_signature",
            VerifyError::SizeMismatch { .. } => "size_mismatch",
            VerifyError::HashMismatch { .. } => "hash_mismatch",
            VerifyError::Downgrade { .. } => "downgrade",
            VerifyError::WrongHardware { .. } => "wrong_hardware",
        }
    }
}

/// The public keys whose signatures are accepted, found by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    /// No key trusted.
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Trusts `key` too (a key given twice is kept once).
    pub fn add(&mut self, key: VerifyingKey) {
        let id = key_id(&key);
        if self.get(&id).is_none() {
            self.keys.push((id, key));
        }
    }

    /// The key with id `id`.
    pub fn get(&self, id: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    /// The ids of the trusted keys.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl FromIterator<VerifyingKey> for TrustedKeys {
    fn from_iter<I: IntoIterator<Item = VerifyingKey>>(iter: I) -> Self {
        let mut keys = TrustedKeys::new();
        for key in iter {
            keys.add(key);
        }
        keys
    }
}

/// What the receiving side requires beyond a valid signature.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The receiver's hardware id: a manifest for other hardware is refused (one for any
    /// hardware is accepted).
    pub hardware: Option<String>,
    /// The version installed (or the newest stored): the manifest's must be newer.
    pub installed: Option<Version>,
}

/// Makes the signed manifest of an image with `digest`.
pub fn sign(
    key: &SigningKey,
    digest: &ImageDigest,
    version: &str,
    hardware: Option<&str>,
) -> Result<Manifest, ManifestError> {
    Version::parse(version)?;
    if let Some(h) = hardware {
        check_hardware(h)?;
    }
    let mut manifest = Manifest {
        version: version.to_string(),
        size: digest.size,
        sha256: digest.sha256_hex(),
        signature: String::new(),
        key_id: key_id(&key.verifying_key()),
        hardware: hardware.map(str::to_string),
    };
    let signature = key.sign(&manifest.canonical_bytes());
    manifest.signature = base64::engine::general_purpose::STANDARD.encode(signature.to_bytes());
    Ok(manifest)
}

/// Checks the manifest's format and signature only (no image): the key that signed it.
pub fn verify_signature<'k>(
    manifest: &Manifest,
    trusted: &'k TrustedKeys,
) -> Result<&'k VerifyingKey, VerifyError> {
    manifest.check()?;
    let key = trusted
        .get(&manifest.key_id)
        .ok_or_else(|| VerifyError::UnknownKey(manifest.key_id.clone()))?;
    let signature = Signature::from_bytes(&manifest.signature_bytes()?);
    key.verify_strict(&manifest.canonical_bytes(), &signature)
        .map_err(|_| VerifyError::BadSignature(manifest.key_id.clone()))?;
    Ok(key)
}

/// Verifies `manifest` for an image with `digest`: format, trusted key, signature, size,
/// hash, then `policy` (hardware, no downgrade), in that order; the first failure is returned.
pub fn verify(
    manifest: &Manifest,
    digest: &ImageDigest,
    trusted: &TrustedKeys,
    policy: &Policy,
) -> Result<(), VerifyError> {
    verify_signature(manifest, trusted)?;
    if digest.size != manifest.size {
        return Err(VerifyError::SizeMismatch {
            expected: manifest.size,
            actual: digest.size,
        });
    }
    let actual = digest.sha256_hex();
    if actual != manifest.sha256 {
        return Err(VerifyError::HashMismatch {
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    check_policy(manifest, policy)
}

/// The policy checks alone (hardware, then no downgrade).
pub(crate) fn check_policy(manifest: &Manifest, policy: &Policy) -> Result<(), VerifyError> {
    if let (Some(expected), Some(image)) = (&policy.hardware, &manifest.hardware) {
        if expected != image {
            return Err(VerifyError::WrongHardware {
                expected: expected.clone(),
                image: image.clone(),
            });
        }
    }
    if let Some(installed) = &policy.installed {
        let offered = manifest.parsed_version()?;
        if offered <= *installed {
            return Err(VerifyError::Downgrade {
                offered: offered.to_string(),
                installed: installed.to_string(),
            });
        }
    }
    Ok(())
}

impl Policy {
    /// Checks only this policy against `manifest` (for a notice, before anything is
    /// downloaded).
    pub fn check(&self, manifest: &Manifest) -> Result<(), VerifyError> {
        check_policy(manifest, self)
    }
}
