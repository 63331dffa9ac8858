//! # stratus-firmware
//!
//! Signed firmware for Stratus: the [`Manifest`] that describes an image, the exact bytes
//! that are signed, Ed25519 key files, [`sign`] and [`verify`], and a streaming
//! [`ImageHasher`]. No I/O beyond `std::io::Read` over what the caller hands in; the CLI
//! (`stratus firmware …`), the server (upload checks) and the device SDK (before install) all
//! call the same code, so "verified" means the same thing at both ends.
//!
//! ## The manifest
//! A JSON object with exactly these fields (unknown fields are refused):
//!
//! | field | type | meaning |
//! | --- | --- | --- |
//! | `version` | string | `N(.N){0,7}`, each `N` a decimal `u64` without leading zeros; compared numerically component by component, missing components count as 0 (`1.2` = `1.2.0` < `1.10`) |
//! | `size` | number | the image length in bytes |
//! | `sha256` | string | SHA-256 of the image, 64 lowercase hex digits |
//! | `signature` | string | standard base64 (with padding) of the 64-byte Ed25519 signature |
//! | `key_id` | string | the first 16 lowercase hex digits of SHA-256 of the 32-byte public key |
//! | `hardware` | string or null | the hardware id the image is for (printable ASCII without `"` and `\`, 1 to 64 bytes); null: any |
//!
//! ## What is signed
//! The signature is Ed25519 (RFC 8032, pure, no pre-hash) over the **canonical bytes**: the
//! manifest without `signature`, as compact JSON with the keys in byte order and no
//! whitespace, i.e. exactly
//!
//! ```text
//! {"hardware":<null or "H">,"key_id":"<16 hex>","sha256":"<64 hex>","size":<decimal>,"version":"<V>"}
//! ```
//!
//! Every string the grammar allows is plain printable ASCII without characters JSON escapes,
//! so these bytes are the same whatever JSON library produces them (Python's
//! `json.dumps(m, sort_keys=True, separators=(",", ":"))` gives them too). The image itself
//! is covered through `size` and `sha256`; `key_id` is signed so a signature cannot be
//! re-labelled to another key.
//!
//! ## Key files
//! - private key (`firmware.key`): PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, RFC 8410), the
//!   format `openssl genpkey -algorithm ed25519` writes and reads;
//! - public key (`firmware.pub`): SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), as
//!   `openssl pkey -pubout` writes.
//!
//! Either may also be given as the standard base64 of the raw 32 bytes on one line.
//!
//! ## Verification order
//! [`verify`] checks the manifest's own rules, finds the trusted key by `key_id` (else
//! [`VerifyError::UnknownKey`]), checks the signature ([`VerifyError::BadSignature`]), then the
//! image's size and hash, then the optional [`Policy`]: hardware id and no downgrade.
//!
//! ## Dependencies, and why
//! - `ed25519-dalek` (v2, with `pkcs8` + `pem`): the maintained pure-Rust Ed25519 of the
//!   dalek-cryptography project, constant-time, strict verification (`verify_strict` refuses
//!   small-order keys and malleable signatures); its `pkcs8`/`pem` features read and write the
//!   same PEM files as OpenSSL.
//! - `sha2`: SHA-256 from RustCrypto, already used by the store and the server.
//! - `base64`, `hex`: the encodings of the signature and the digests.
//! - `serde`, `serde_json`: the manifest is JSON; `thiserror`: [`VerifyError`], [`KeyError`],
//!   [`ManifestError`]; `rand`: the operating system's random generator for key generation.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod hash;
mod keys;
mod manifest;
mod verify;

pub use hash::{ImageDigest, ImageHasher};
pub use keys::{
    generate_key, key_id, parse_public_key, parse_signing_key, public_key_pem, signing_key_pem,
    KeyError, SigningKey, VerifyingKey,
};
pub use manifest::{check_hardware, Manifest, ManifestError, Version, MAX_MANIFEST_BYTES};
pub use verify::{sign, verify, verify_signature, Policy, TrustedKeys, VerifyError};
