//! The audit log: append-only entries chained by SHA-256, the canonical encoding they are
//! hashed over, the chain check shared by every backend, and the [`AuditStore`] trait.
//!
//! ## The hash of an entry
//! `hash = hex(SHA-256("stratus-audit-v1" || f(seq) || f(ts_ms) || f(actor) || f(action) ||
//! f(target) || f(detail) || f(prev_hash)))` where `f(x) = len(x) as u64 big-endian || x`,
//! numbers are written in decimal ASCII, `detail` is its canonical JSON ([`canonical_json`])
//! and `prev_hash` is the previous entry's hash in lowercase hex ([`GENESIS_HASH`] for the
//! first entry, seq 1). The length prefixes make the encoding unambiguous; the stored detail
//! text is the canonical form itself, so verification hashes exactly what is stored.

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::write::{Write, WriteBackend};
use crate::{check_text, StoreError};

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest accepted actor or action, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// Longest accepted target, in bytes.
pub const MAX_TARGET_LEN: usize = 1024;

/// What to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    /// When it happened, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Who did it (a client id, a device id, `system`).
    pub actor: String,
    /// What was done (`device.create`, `config.put`, `token.revoke`, …).
    pub action: String,
    /// What it was done to (may be empty).
    pub target: String,
    /// Anything else, as JSON (`Null` when nothing).
    pub detail: Json,
}

impl NewAuditEntry {
    /// Checks lengths and characters.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_text("audit actor", &self.actor, MAX_NAME_LEN)?;
        check_text("audit action", &self.action, MAX_NAME_LEN)?;
        if !self.target.is_empty() {
            check_text("audit target", &self.target, MAX_TARGET_LEN)?;
        }
        Ok(())
    }
}

/// An entry of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Position in the log: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// When it happened, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Who did it.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// Anything else.
    pub detail: Json,
    /// The previous entry's hash ([`GENESIS_HASH`] for seq 1).
    pub prev_hash: String,
    /// This entry's hash ([`entry_hash`]).
    pub hash: String,
}

/// An entry exactly as stored, for verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAuditRow {
    /// Sequence number as stored.
    pub seq: i64,
    /// Time as stored.
    pub ts_ms: i64,
    /// Actor as stored.
    pub actor: String,
    /// Action as stored.
    pub action: String,
    /// Target as stored.
    pub target: String,
    /// Detail text as stored (canonical JSON when untouched).
    pub detail: String,
    /// Previous hash as stored.
    pub prev_hash: String,
    /// Hash as stored.
    pub hash: String,
}

/// The canonical JSON text of `value`: no whitespace, object members sorted by key (bytewise),
/// strings and numbers as `serde_json` writes them. Independent of `serde_json`'s
/// `preserve_order` feature.
pub fn canonical_json(value: &Json) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Json, out: &mut String) {
    match value {
        Json::Object(map) => {
            let mut members: Vec<(&String, &Json)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, value)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The hash of an entry (see the module docs for the encoding).
pub fn entry_hash(
    seq: u64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    canonical_detail: &str,
    prev_hash: &str,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"stratus-audit-v1");
    let seq = seq.to_string();
    let ts = ts_ms.to_string();
    for field in [
        seq.as_str(),
        ts.as_str(),
        actor,
        action,
        target,
        canonical_detail,
        prev_hash,
    ] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

/// The first entry that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {reason}")]
pub struct BrokenLink {
    /// The first sequence number whose entry cannot be trusted.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: BrokenReason,
}

/// Why an entry does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokenReason {
    /// The entry with this seq is missing: the next stored entry has another seq.
    #[error("entry missing (the next stored entry has seq {found})")]
    Missing {
        /// The seq found in its place.
        found: i64,
    },
    /// Its `prev_hash` is not the previous entry's hash (an entry before it was removed or
    /// rewritten with a recomputed hash).
    #[error("prev_hash does not match the previous entry's hash")]
    PrevHashMismatch,
    /// Its content does not hash to its stored hash (it was modified).
    #[error("content does not match its hash")]
    HashMismatch,
    /// A stored field has the wrong type (it was rewritten by hand).
    #[error("a stored field has the wrong type")]
    Unreadable,
}

/// The outcome of [`AuditStore::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditVerdict {
    /// Every entry verifies.
    Intact {
        /// How many entries there are.
        entries: u64,
        /// The last entry's hash (`None` for an empty log); keep it elsewhere to detect
        /// truncation, which a chain cannot show by itself.
        head_hash: Option<String>,
    },
    /// The first entry that does not verify.
    Broken(BrokenLink),
}

/// Checks stored rows in seq order, one at a time (constant memory). Shared by backends.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev_hash: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            next_seq: 1,
            prev_hash: GENESIS_HASH.into(),
        }
    }
}

impl ChainVerifier {
    /// A verifier expecting seq 1.
    pub fn new() -> ChainVerifier {
        ChainVerifier::default()
    }

    /// The seq the next row must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checks the next stored row.
    pub fn check(&mut self, row: &StoredAuditRow) -> Result<(), BrokenLink> {
        let seq = self.next_seq;
        if u64::try_from(row.seq).ok() != Some(seq) {
            return Err(BrokenLink {
                seq,
                reason: BrokenReason::Missing { found: row.seq },
            });
        }
        if row.prev_hash != self.prev_hash {
            return Err(BrokenLink {
                seq,
                reason: BrokenReason::PrevHashMismatch,
            });
        }
        let expected = entry_hash(
            seq,
            row.ts_ms,
            &row.actor,
            &row.action,
            &row.target,
            &row.detail,
            &row.prev_hash,
        );
        if row.hash != expected {
            return Err(BrokenLink {
                seq,
                reason: BrokenReason::HashMismatch,
            });
        }
        self.prev_hash.clone_from(&row.hash);
        self.next_seq += 1;
        Ok(())
    }

    /// The verdict after the last row.
    pub fn finish(self) -> AuditVerdict {
        let entries = self.next_seq - 1;
        AuditVerdict::Intact {
            entries,
            head_hash: (entries > 0).then_some(self.prev_hash),
        }
    }
}

/// The audit log.
///
/// Reads are required methods; appends are provided on top of [`WriteBackend::commit_jobs`],
/// which computes the chain inside the write transaction.
pub trait AuditStore: WriteBackend {
    /// Up to `limit` entries from `from_seq` on, in seq order.
    fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Recomputes the whole chain.
    fn verify_audit(&self) -> Result<AuditVerdict, StoreError>;

    /// Appends an entry; returns it with its seq and hashes.
    fn append_audit(&self, entry: NewAuditEntry) -> Result<AuditEntry, StoreError> {
        self.write_one(Write::AppendAudit(entry))?.into_audit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_members_and_drops_whitespace() {
        let value: Json =
            serde_json::from_str(r#"{ "b": 1, "a": [1, { "z": null, "y": "é" }] }"#).unwrap();
        assert_eq!(
            canonical_json(&value),
            r#"{"a":[1,{"y":"é","z":null}],"b":1}"#
        );
        assert_eq!(canonical_json(&json!("a\"b\n")), r#""a\"b\n""#);
        assert_eq!(canonical_json(&json!(1.5)), "1.5");
        assert_eq!(canonical_json(&Json::Null), "null");
    }

    /// Fixed vectors, computed independently (Python `hashlib`), so the encoding cannot drift:
    /// another backend or an offline verifier must produce the same hashes.
    #[test]
    fn entry_hash_matches_the_documented_encoding() {
        let first = entry_hash(
            1,
            1_700_000_000_000,
            "admin",
            "device.create",
            "dev-1",
            r#"{"a":[1,{"y":"é","z":null}],"b":1}"#,
            GENESIS_HASH,
        );
        assert_eq!(
            first,
            "ab91911684ddea51f95cca6f35812a5faf0815f5a1c73ee4ddc4202cd5aaae6e"
        );
        assert_eq!(
            entry_hash(2, -5, "app-1", "config.put", "", "null", &first),
            "87a39b2b401f6248ca32120ff774a05b1d5920cee3d0b530762646ab90e1318b"
        );
    }

    #[test]
    fn the_verifier_names_the_first_bad_entry() {
        let row = |seq: i64, prev: &str| {
            let hash = entry_hash(seq as u64, seq, "a", "b", "c", "{}", prev);
            StoredAuditRow {
                seq,
                ts_ms: seq,
                actor: "a".into(),
                action: "b".into(),
                target: "c".into(),
                detail: "{}".into(),
                prev_hash: prev.into(),
                hash,
            }
        };
        let r1 = row(1, GENESIS_HASH);
        let r2 = row(2, &r1.hash);
        let mut v = ChainVerifier::new();
        v.check(&r1).unwrap();
        v.check(&r2).unwrap();
        assert_eq!(
            v.finish(),
            AuditVerdict::Intact {
                entries: 2,
                head_hash: Some(r2.hash.clone())
            }
        );
        let mut v = ChainVerifier::new();
        assert_eq!(
            v.check(&r2).unwrap_err(),
            BrokenLink {
                seq: 1,
                reason: BrokenReason::Missing { found: 2 }
            }
        );
        let mut v = ChainVerifier::new();
        v.check(&r1).unwrap();
        let mut forged = r2.clone();
        forged.target = "d".into();
        assert_eq!(
            v.check(&forged).unwrap_err().reason,
            BrokenReason::HashMismatch
        );
    }
}
