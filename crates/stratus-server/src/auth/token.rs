//! Compact access tokens: what a device gets from `/oauth/token`, 59 characters, so that one
//! `?token=` carries it with every CoAP client (libcoap's `coap-client` keeps only about the
//! first 100 bytes of a query).
//!
//! A token is `st1_` followed by 41 bytes in base64url without padding:
//!
//! ```text
//! version (1) ‖ iat (4) ‖ exp (4) ‖ jti (8) ‖ credential (8) ‖ mac (16)
//! ```
//!
//! - `iat`, `exp`: issue and expiry times, Unix seconds, big-endian;
//! - `jti`: a random token id (RFC 7009 revocation is by this id);
//! - `credential`: the fingerprint of the credential the token was issued under (see
//!   [`fingerprint`]): it names the principal *and* the secret it proved, so rotating the
//!   secret, deleting the principal or re-creating it under the same id voids the token, with
//!   no clock involved and nothing to remember across restarts;
//! - `mac`: HMAC-SHA-256 under the server's token key over the label `stratus-token/v1` and
//!   the 25 bytes before it, truncated to 128 bits (RFC 2104 §5 allows truncation to half the
//!   output and no less than 80 bits).
//!
//! Verifying one is a MAC and a map lookup, like the JWTs applications get.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What every compact token starts with.
pub const PREFIX: &str = "st1_";
/// The length of a compact token, in characters.
pub const TOKEN_LEN: usize = PREFIX.len() + 55;

const VERSION: u8 = 1;
const BODY_LEN: usize = 1 + 4 + 4 + 8 + 8;
const MAC_LEN: usize = 16;
const RAW_LEN: usize = BODY_LEN + MAC_LEN;
const MAC_LABEL: &[u8] = b"stratus-token/v1";
const CREDENTIAL_LABEL: &[u8] = b"stratus-credential/v1";

/// The fingerprint of a principal's credential: 8 bytes of HMAC-SHA-256 (token key) over its
/// kind, id and secret hash. A new secret (rotation, or a principal re-created with the same
/// id) has a new random salt in its argon2 hash, so a new fingerprint.
pub fn fingerprint(key: &[u8], kind: &str, id: &str, secret_hash: &str) -> [u8; 8] {
    let mut mac = new_mac(key);
    mac.update(CREDENTIAL_LABEL);
    for part in [kind, id, secret_hash] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    let out = mac.finalize().into_bytes();
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&out[..8]);
    fp
}

/// What a compact token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compact {
    /// Issued at, Unix seconds.
    pub iat: u32,
    /// Expires at, Unix seconds.
    pub exp: u32,
    /// Token id.
    pub jti: [u8; 8],
    /// Fingerprint of the credential it was issued under.
    pub credential: [u8; 8],
}

/// Why a string is not a valid compact token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Shorter than a token: the client (or a URI length limit on its way) cut it.
    #[error("the access token is cut short ({0} of {TOKEN_LEN} characters)")]
    Truncated(usize),
    /// Not the shape of a token.
    #[error("the access token is malformed")]
    Malformed,
    /// Well formed, but not issued by this server (wrong MAC).
    #[error("the access token is not ours")]
    Forged,
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length (RFC 2104 §2): the `hmac` crate's error exists only for
    // the generic `KeyInit` signature.
    #[allow(clippy::expect_used)]
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn mac_of(key: &[u8], body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = new_mac(key);
    mac.update(MAC_LABEL);
    mac.update(body);
    let out = mac.finalize().into_bytes();
    let mut m = [0u8; MAC_LEN];
    m.copy_from_slice(&out[..MAC_LEN]);
    m
}

impl Compact {
    /// The token, MACed under `key`.
    pub fn encode(&self, key: &[u8]) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..5].copy_from_slice(&self.iat.to_be_bytes());
        raw[5..9].copy_from_slice(&self.exp.to_be_bytes());
        raw[9..17].copy_from_slice(&self.jti);
        raw[17..25].copy_from_slice(&self.credential);
        let mac = mac_of(key, &raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&mac);
        let mut out = String::with_capacity(TOKEN_LEN);
        out.push_str(PREFIX);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(raw, &mut out);
        out
    }

    /// Reads and authenticates a token (expiry and revocation are the caller's to check).
    pub fn decode(token: &str, key: &[u8]) -> Result<Compact, TokenError> {
        let Some(b64) = token.strip_prefix(PREFIX) else {
            return Err(TokenError::Malformed);
        };
        if token.len() < TOKEN_LEN {
            return Err(TokenError::Truncated(token.len()));
        }
        if token.len() > TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut raw = [0u8; RAW_LEN + 2];
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(b64, &mut raw)
            .map_err(|_| TokenError::Malformed)?;
        if n != RAW_LEN || raw[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let expected = mac_of(key, &raw[..BODY_LEN]);
        // Constant time in the contents.
        let diff = expected
            .iter()
            .zip(&raw[BODY_LEN..RAW_LEN])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(TokenError::Forged);
        }
        let u32_at = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let mut jti = [0u8; 8];
        jti.copy_from_slice(&raw[9..17]);
        let mut credential = [0u8; 8];
        credential.copy_from_slice(&raw[17..25]);
        Ok(Compact {
            iat: u32_at(1),
            exp: u32_at(5),
            jti,
            credential,
        })
    }
}

/// Whether `s` claims to be a compact token (it may still be cut, malformed or forged).
pub fn looks_compact(s: &str) -> bool {
    s.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn sample() -> Compact {
        Compact {
            iat: 1_700_000_000,
            exp: 1_700_003_600,
            jti: *b"jti-0001",
            credential: fingerprint(KEY, "device", "dev-1", "$argon2id$v=19$..."),
        }
    }

    #[test]
    fn round_trips_within_64_url_safe_characters() {
        let t = sample().encode(KEY);
        assert_eq!(t.len(), TOKEN_LEN);
        assert!(t.len() <= 64, "{t}");
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Compact::decode(&t, KEY), Ok(sample()));
    }

    #[test]
    fn cut_malformed_and_forged_tokens_are_told_apart() {
        let t = sample().encode(KEY);
        assert_eq!(
            Compact::decode(&t[..40], KEY),
            Err(TokenError::Truncated(40))
        );
        assert_eq!(
            Compact::decode(&format!("{t}x"), KEY),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            Compact::decode("eyJhbGciOi.x.y", KEY),
            Err(TokenError::Malformed)
        );
        let bad_b64 = format!("{PREFIX}{}", "!".repeat(TOKEN_LEN - PREFIX.len()));
        assert_eq!(Compact::decode(&bad_b64, KEY), Err(TokenError::Malformed));
        assert_eq!(
            Compact::decode(&t, b"another key of the same length!!"),
            Err(TokenError::Forged)
        );
        // Every single-character change of the body or MAC is refused.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in PREFIX.len()..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == alphabet[0] {
                alphabet[1]
            } else {
                alphabet[0]
            };
            let s = String::from_utf8(b).unwrap_or_default();
            assert!(Compact::decode(&s, KEY).is_err(), "changed at {i}: {s}");
        }
    }

    #[test]
    fn fingerprints_differ_by_kind_id_and_hash() {
        let a = fingerprint(KEY, "device", "d", "h1");
        assert_ne!(a, fingerprint(KEY, "device", "d", "h2"));
        assert_ne!(a, fingerprint(KEY, "client", "d", "h1"));
        assert_ne!(a, fingerprint(KEY, "device", "e", "h1"));
        // Length-prefixed parts: moving a character from one part to the next changes it.
        assert_ne!(
            fingerprint(KEY, "device", "ab", "c"),
            fingerprint(KEY, "device", "a", "bc")
        );
        assert_ne!(a, fingerprint(b"other key", "device", "d", "h1"));
    }
}
