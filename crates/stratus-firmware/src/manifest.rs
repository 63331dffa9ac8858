//! The manifest: its JSON form, the rules on each field, its canonical (signed) bytes, and
//! firmware versions that compare numerically.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most components a version may have.
const MAX_VERSION_COMPONENTS: usize = 8;
/// Longest hardware id.
const MAX_HARDWARE_LEN: usize = 64;
/// Largest manifest document accepted by [`Manifest::parse`].
pub const MAX_MANIFEST_BYTES: usize = 4096;

/// A manifest that breaks a rule; the text names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed manifest: {0}")]
pub struct ManifestError(pub String);

/// A firmware version: `N(.N){0,7}`, compared numerically component by component (missing
/// components count as 0, so `1.2` equals `1.2.0`).
#[derive(Debug, Clone)]
pub struct Version {
    text: String,
    parts: Vec<u64>,
}

impl Version {
    /// Parses a version, naming what is wrong.
    pub fn parse(text: &str) -> Result<Version, ManifestError> {
        let bad = |why: &str| ManifestError(format!("version {:?}: {why}", clip(text)));
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        let mut parts = Vec::new();
        for part in text.split('.') {
            if parts.len() == MAX_VERSION_COMPONENTS {
                return Err(bad("has more than 8 components"));
            }
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("expected numbers separated by dots, like 1.2.3"));
            }
            if part.len() > 1 && part.starts_with('0') {
                return Err(bad("a component has a leading zero"));
            }
            parts.push(
                part.parse::<u64>()
                    .map_err(|_| bad("a component is too large"))?,
            );
        }
        Ok(Version {
            text: text.to_string(),
            parts,
        })
    }

    /// The version as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        for i in 0..n {
            let a = self.parts.get(i).copied().unwrap_or(0);
            let b = other.parts.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Equal => {}
                unequal => return unequal,
            }
        }
        Ordering::Equal
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

/// Checks a hardware id: printable ASCII without `"` and `\`, 1 to 64 bytes.
pub fn check_hardware(hardware: &str) -> Result<(), ManifestError> {
    let ok = !hardware.is_empty()
        && hardware.len() <= MAX_HARDWARE_LEN
        && hardware
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(ManifestError(format!(
            "hardware {:?}: expected 1 to 64 printable ASCII characters without '\"' and '\\'",
            clip(hardware)
        )))
    }
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A firmware manifest (see the crate docs for each field's rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The firmware version, e.g. `1.2.3`.
    pub version: String,
    /// The image length in bytes.
    pub size: u64,
    /// SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// Standard base64 of the Ed25519 signature over [`Manifest::canonical_bytes`].
    pub signature: String,
    /// Which key signed: the first 16 hex digits of SHA-256 of the public key.
    pub key_id: String,
    /// The hardware id the image is for; `None`: any.
    #[serde(default)]
    pub hardware: Option<String>,
}

/// The signed part of a manifest, fields in byte order of their names: serialising it gives
/// the canonical bytes.
#[derive(Serialize)]
struct Canonical<'a> {
    hardware: Option<&'a str>,
    key_id: &'a str,
    sha256: &'a str,
    size: u64,
    version: &'a str,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Manifest {
    /// Parses and checks a manifest document (at most 4 KiB of JSON).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError(format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} allowed",
                bytes.len()
            )));
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError(e.to_string()))?;
        manifest.check()?;
        Ok(manifest)
    }

    /// Checks every field's rules (the signature's base64 and length included).
    pub fn check(&self) -> Result<(), ManifestError> {
        Version::parse(&self.version)?;
        if !is_lower_hex(&self.sha256, 64) {
            return Err(ManifestError(
                "sha256: expected 64 lowercase hex digits".into(),
            ));
        }
        if !is_lower_hex(&self.key_id, 16) {
            return Err(ManifestError(
                "key_id: expected 16 lowercase hex digits".into(),
            ));
        }
        if let Some(hardware) = &self.hardware {
            check_hardware(hardware)?;
        }
        self.signature_bytes()?;
        Ok(())
    }

    /// The parsed version.
    pub fn parsed_version(&self) -> Result<Version, ManifestError> {
        Version::parse(&self.version)
    }

    /// The 64 signature bytes.
    pub fn signature_bytes(&self) -> Result<[u8; 64], ManifestError> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| ManifestError("signature: not standard base64".into()))?;
        bytes
            .try_into()
            .map_err(|_| ManifestError("signature: expected 64 bytes".into()))
    }

    /// The bytes the signature covers: `{"hardware":…,"key_id":…,"sha256":…,"size":…,"version":…}`,
    /// compact, keys in byte order (see the crate docs).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let canonical = Canonical {
            hardware: self.hardware.as_deref(),
            key_id: &self.key_id,
            sha256: &self.sha256,
            size: self.size,
            version: &self.version,
        };
        // Serialising a struct of strings and a number cannot fail.
        serde_json::to_vec(&canonical).unwrap_or_default()
    }

    /// The manifest as pretty JSON with a final newline (what `stratus firmware sign` writes).
    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }
}
