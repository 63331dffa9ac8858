//! The CoAPS pre-shared keys at rest: each device's PSK (derived from its secret by
//! [`stratus_coap::psk::device_psk`]) is stored in its device record sealed with AES-256-GCM
//! under `DATA_DIR/coap-psk.key`, so a stolen database alone yields no key.
//!
//! A sealed key is `version (1) ‖ nonce (12) ‖ ciphertext (43) ‖ tag (16)`, authenticated
//! together with the device id (the associated data), so a sealed key copied onto another
//! device's record does not open.

use std::path::Path;

use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use rand::RngCore;

pub use stratus_coap::psk::{device_psk, PSK_LABEL};

/// The sealing key file under the data directory (32 random bytes, mode 0600).
pub const PSK_KEY_FILE: &str = "coap-psk.key";

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const AAD_LABEL: &[u8] = b"stratus-coap-psk-seal/v1:";

/// Seals and opens device PSKs with the data directory's key.
pub struct PskSealer {
    key: [u8; 32],
}

impl std::fmt::Debug for PskSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PskSealer(<key>)")
    }
}

impl PskSealer {
    /// A sealer with this key.
    pub fn new(key: [u8; 32]) -> PskSealer {
        PskSealer { key }
    }

    /// Reads `DATA_DIR/coap-psk.key`, creating it (32 random bytes, mode 0600) when missing.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<PskSealer> {
        let path = data_dir.join(PSK_KEY_FILE);
        let stored = crate::data_dir::load_or_create_key(&path)?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&stored[..32]);
        Ok(PskSealer { key })
    }

    /// The sealed PSK of device `id` whose secret is `secret` (`None` only if OpenSSL fails).
    pub fn seal_for_secret(&self, id: &str, secret: &str) -> Option<Vec<u8>> {
        self.seal(id, &stratus_coap::psk::device_psk(secret, id))
    }

    /// Seals `psk` for device `id`.
    pub fn seal(&self, id: &str, psk: &str) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut tag = [0u8; TAG_LEN];
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(&nonce),
            &aad(id),
            psk.as_bytes(),
            &mut tag,
        )
        .map_err(|e| tracing::error!(error = %e, "sealing a CoAPS key failed"))
        .ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        Some(out)
    }

    /// The PSK sealed in `sealed` for device `id`; `None` when it does not open (another key
    /// file, another device's record, a damaged value).
    pub fn open(&self, id: &str, sealed: &[u8]) -> Option<String> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != VERSION {
            return None;
        }
        let nonce = &sealed[1..1 + NONCE_LEN];
        let (ct, tag) = sealed[1 + NONCE_LEN..].split_at(sealed.len() - 1 - NONCE_LEN - TAG_LEN);
        let plain = decrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(nonce),
            &aad(id),
            ct,
            tag,
        )
        .ok()?;
        String::from_utf8(plain).ok()
    }
}

fn aad(id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_LABEL.len() + id.len());
    a.extend_from_slice(AAD_LABEL);
    a.extend_from_slice(id.as_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_for_its_device_and_key() {
        let s = PskSealer::new([7; 32]);
        let sealed = s.seal_for_secret("dev-1", "s3cret").unwrap();
        let psk = stratus_coap::psk::device_psk("s3cret", "dev-1");
        assert_eq!(s.open("dev-1", &sealed).as_deref(), Some(psk.as_str()));
        assert_eq!(sealed.len(), 1 + 12 + 43 + 16);
        // The key does not appear in clear.
        assert!(!sealed.windows(psk.len()).any(|w| w == psk.as_bytes()));
        // Another device's record, another key file, a flipped bit: nothing.
        assert_eq!(s.open("dev-2", &sealed), None);
        assert_eq!(PskSealer::new([8; 32]).open("dev-1", &sealed), None);
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert_eq!(s.open("dev-1", &bad), None);
        assert_eq!(s.open("dev-1", &sealed[..10]), None);
        assert_eq!(s.open("dev-1", &[]), None);
        // Fresh nonces: sealing twice differs.
        assert_ne!(s.seal_for_secret("dev-1", "s3cret").unwrap(), sealed);
    }

    #[test]
    fn the_key_file_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = PskSealer::load_or_create(dir.path()).unwrap();
        let sealed = a.seal("d", "k").unwrap();
        let b = PskSealer::load_or_create(dir.path()).unwrap();
        assert_eq!(b.open("d", &sealed).as_deref(), Some("k"));
        std::fs::write(dir.path().join(PSK_KEY_FILE), b"short").unwrap();
        assert!(PskSealer::load_or_create(dir.path()).is_err());
    }
}
