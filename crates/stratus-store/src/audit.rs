//! The audit log: append-only entries chained by a keyed MAC, the canonical encoding the chain
//! is computed over, the chain check shared by every backend, and the [`AuditStore`] trait.
//!
//! ## The hash of an entry
//! Each entry stores a `hash` computed over
//! `E(tag) = tag || f(seq) || f(ts_ms) || f(actor) || f(action) || f(target) || f(detail) ||
//! f(prev_hash)`, where `f(x) = len(x) as u64 big-endian || x`, numbers are written in decimal
//! ASCII, `detail` is its canonical JSON ([`canonical_json`]) and `prev_hash` is the previous
//! entry's hash in lowercase hex ([`GENESIS_HASH`] for the first entry, seq 1). The length
//! prefixes make the encoding unambiguous; the stored detail text is the canonical form itself,
//! so verification hashes exactly what is stored. Two rules use it:
//!
//! - **Keyed** (every entry appended with a key): `hash = hex(HMAC-SHA-256(key,
//!   E("stratus-audit-v2")))` ([`entry_mac`]). The key ([`AuditKey`]) is kept outside the
//!   database (the server keeps it in `DATA_DIR/audit.key`), so whoever can write the database
//!   but not read the key cannot recompute the chain: an edited entry, a dropped one, or a log
//!   re-chained after either is reported at the first entry touched.
//! - **Unkeyed** (logs written before the chain was keyed): `hash = hex(SHA-256(
//!   E("stratus-audit-v1")))` ([`entry_hash`]). Anyone can recompute it, so it is accepted only
//!   below the key's *keyed-from* seq ([`AuditKey::keyed_from`], the first seq appended after
//!   the key was made, recorded with the key, outside the database) and never after a keyed
//!   entry. The first keyed entry chains over the last unkeyed one, so the unkeyed entries
//!   before it cannot be changed without breaking a keyed link either.
//!
//! ## What a chain cannot show: its own end
//! Deleting the newest entries leaves a shorter chain that verifies. A *head* ([`AuditHead`],
//! written `SEQ:HASH`: the last entry's seq and hash) kept where the database's writer cannot
//! reach shows it: verification against heads ([`AuditCheck::heads`]) fails when the log ends
//! before a head ([`BrokenReason::Truncated`]) or disagrees with one
//! ([`BrokenReason::HeadMismatch`]). Heads can be MACed ([`AuditHead::mac`]) so that a stored
//! head cannot be replaced by an older one without the key.
//!
//! ## What the key does not protect against
//! Whoever holds the key (or every file of the server) can rewrite the log and recompute every
//! MAC; only a head kept elsewhere (an off-host log, an operator's note) then shows the change.
//!
//! ## Failed authentications
//! Failures are kept beside the chain as *failure entries*, committed to by one chain entry
//! per batch and pruned after a retention with the prune recorded in the chain: [`failures`]
//! says why and how.

pub mod failures;

use std::fmt;
use std::str::FromStr;

use ring::hmac;
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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

/// The secret of the keyed chain, and the seq from which every entry must be keyed.
///
/// `Debug` does not show the secret.
#[derive(Clone)]
pub struct AuditKey {
    key: hmac::Key,
    keyed_from: u64,
}

impl AuditKey {
    /// Shortest accepted secret, in bytes.
    pub const MIN_LEN: usize = 32;

    /// A key with `secret` (at least [`MIN_LEN`](AuditKey::MIN_LEN) bytes) that applies from
    /// seq `keyed_from` on: entries below it may follow the unkeyed rule (1: none may).
    pub fn new(secret: &[u8], keyed_from: u64) -> Result<AuditKey, StoreError> {
        if secret.len() < AuditKey::MIN_LEN {
            return Err(StoreError::Invalid(format!(
                "an audit key must be at least {} bytes long (got {})",
                AuditKey::MIN_LEN,
                secret.len()
            )));
        }
        Ok(AuditKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            keyed_from: keyed_from.max(1),
        })
    }

    /// The first seq that must be keyed.
    pub fn keyed_from(&self) -> u64 {
        self.keyed_from
    }

    fn mac(&self, message: &[u8]) -> String {
        hex::encode(hmac::sign(&self.key, message).as_ref())
    }

    /// Whether `tag_hex` is the MAC of `message` (compared in constant time).
    fn verifies(&self, message: &[u8], tag_hex: &str) -> bool {
        match hex::decode(tag_hex) {
            Ok(tag) => hmac::verify(&self.key, message, &tag).is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("keyed_from", &self.keyed_from)
            .finish_non_exhaustive()
    }
}

/// The fields an entry's hash covers, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFields<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Time, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Actor.
    pub actor: &'a str,
    /// Action.
    pub action: &'a str,
    /// Target.
    pub target: &'a str,
    /// Detail in canonical JSON.
    pub detail: &'a str,
    /// The previous entry's hash.
    pub prev_hash: &'a str,
}

impl EntryFields<'_> {
    /// `E(tag)` of the module docs.
    fn encode(&self, tag: &[u8]) -> Vec<u8> {
        let seq = self.seq.to_string();
        let ts = self.ts_ms.to_string();
        let fields = [
            seq.as_str(),
            ts.as_str(),
            self.actor,
            self.action,
            self.target,
            self.detail,
            self.prev_hash,
        ];
        let mut out =
            Vec::with_capacity(tag.len() + fields.iter().map(|f| 8 + f.len()).sum::<usize>());
        out.extend_from_slice(tag);
        for field in fields {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }
}

const TAG_UNKEYED: &[u8] = b"stratus-audit-v1";
const TAG_KEYED: &[u8] = b"stratus-audit-v2";
const TAG_HEAD: &[u8] = b"stratus-audit-head-v1";

/// The unkeyed (legacy) hash of an entry: SHA-256 (see the module docs for the encoding).
pub fn entry_hash(
    seq: u64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    canonical_detail: &str,
    prev_hash: &str,
) -> String {
    unkeyed_hash(&EntryFields {
        seq,
        ts_ms,
        actor,
        action,
        target,
        detail: canonical_detail,
        prev_hash,
    })
}

fn unkeyed_hash(fields: &EntryFields<'_>) -> String {
    format!("{:x}", Sha256::digest(fields.encode(TAG_UNKEYED)))
}

/// The keyed hash of an entry: HMAC-SHA-256 under `key` (see the module docs).
pub fn entry_mac(key: &AuditKey, fields: &EntryFields<'_>) -> String {
    key.mac(&fields.encode(TAG_KEYED))
}

/// The seq and hash of an entry, kept to show later that the log still reaches it unchanged.
/// Written `SEQ:HASH`; the head of an empty log is `0:` followed by [`GENESIS_HASH`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditHead {
    /// The entry's seq (0 for an empty log).
    pub seq: u64,
    /// Its hash, lowercase hex.
    pub hash: String,
}

impl AuditHead {
    /// The head of an empty log.
    pub fn empty() -> AuditHead {
        AuditHead {
            seq: 0,
            hash: GENESIS_HASH.into(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let seq = self.seq.to_string();
        let mut out = TAG_HEAD.to_vec();
        for field in [seq.as_str(), self.hash.as_str()] {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }

    /// HMAC-SHA-256 under `key` of `"stratus-audit-head-v1" || f(seq) || f(hash)`, hex: lets
    /// a stored head be trusted by whoever holds the key.
    pub fn mac(&self, key: &AuditKey) -> String {
        key.mac(&self.encode())
    }

    /// Whether `mac` is [`mac`](AuditHead::mac) under `key` (compared in constant time).
    pub fn mac_verifies(&self, key: &AuditKey, mac: &str) -> bool {
        key.verifies(&self.encode(), mac)
    }
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// A head that is not `SEQ:HASH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an audit head is SEQ:HASH (a number, a colon, 64 hex digits): {0}")]
pub struct ParseHeadError(String);

impl FromStr for AuditHead {
    type Err = ParseHeadError;

    fn from_str(s: &str) -> Result<AuditHead, ParseHeadError> {
        let s = s.trim();
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| ParseHeadError("no colon".into()))?;
        let seq = seq
            .parse::<u64>()
            .map_err(|_| ParseHeadError(format!("{:?} is not a seq", crate::truncate(seq, 40))))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseHeadError(format!(
                "{:?} is not 64 hex digits",
                crate::truncate(hash, 80)
            )));
        }
        Ok(AuditHead {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// The entry that follows `last` (the newest stored row, `None` for an empty log), with its
/// canonical detail text: what a backend stores when appending. With a key the entry is keyed,
/// and only `last`'s seq and hash are read (a backend may leave the other fields empty);
/// without one it follows the unkeyed rule, which is refused after a keyed entry (verification
/// would reject it).
pub fn next_entry(
    key: Option<&AuditKey>,
    last: Option<&StoredAuditRow>,
    entry: &NewAuditEntry,
) -> Result<(AuditEntry, String), StoreError> {
    entry.validate()?;
    let (seq, prev_hash) = match last {
        None => (1u64, GENESIS_HASH.to_owned()),
        Some(row) => {
            let seq = u64::try_from(row.seq)
                .ok()
                .and_then(|s| s.checked_add(1))
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("audit seq {} out of range", row.seq))
                })?;
            (seq, row.hash.clone())
        }
    };
    let detail = canonical_json(&entry.detail);
    let fields = EntryFields {
        seq,
        ts_ms: entry.ts_ms,
        actor: &entry.actor,
        action: &entry.action,
        target: &entry.target,
        detail: &detail,
        prev_hash: &prev_hash,
    };
    let hash = match key {
        Some(key) => entry_mac(key, &fields),
        None => {
            if let Some(row) = last {
                if row.fields().map(|f| unkeyed_hash(&f)).as_ref() != Some(&row.hash) {
                    return Err(StoreError::Unsupported(
                        "the newest audit entry does not follow the unkeyed rule (the log is \
                         keyed): appending needs the audit key",
                    ));
                }
            }
            unkeyed_hash(&fields)
        }
    };
    Ok((
        AuditEntry {
            seq,
            ts_ms: entry.ts_ms,
            actor: entry.actor.clone(),
            action: entry.action.clone(),
            target: entry.target.clone(),
            detail: entry.detail.clone(),
            prev_hash,
            hash,
        },
        detail,
    ))
}

impl StoredAuditRow {
    /// The fields its hash covers (`None` when its seq is negative).
    pub fn fields(&self) -> Option<EntryFields<'_>> {
        Some(EntryFields {
            seq: u64::try_from(self.seq).ok()?,
            ts_ms: self.ts_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            detail: &self.detail,
            prev_hash: &self.prev_hash,
        })
    }
}

/// The first entry that does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {reason}")]
pub struct BrokenLink {
    /// The first sequence number whose entry cannot be trusted (for a cut log: the first
    /// missing one).
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
    /// Its hash follows the unkeyed rule, which anyone can recompute, where the keyed one is
    /// required: the chain was recomputed without the key.
    #[error(
        "its hash follows the unkeyed SHA-256 rule where the keyed one is required: the chain \
         was recomputed without the key"
    )]
    Unkeyed,
    /// A stored field has the wrong type (it was rewritten by hand).
    #[error("a stored field has the wrong type")]
    Unreadable,
    /// The log ends before a head it was checked against: its newest entries were deleted.
    #[error("the log ends at seq {last} but the head says {head}: entries were cut")]
    Truncated {
        /// The last seq stored.
        last: u64,
        /// The head's seq.
        head: u64,
    },
    /// Its hash is not the one a head recorded for its seq: the log was rewritten (by someone
    /// with the key), or the head belongs to another log.
    #[error("its hash differs from the head's for this seq: the log was rewritten")]
    HeadMismatch,
    /// A batch entry ([`failures`]) whose failure entries are not the ones its digest names:
    /// one was changed, added, removed or reordered.
    #[error(
        "its failure entries do not match the digest it records: one was changed, added, \
         removed or reordered"
    )]
    FailuresMismatch,
    /// A batch entry whose failure entries are all gone, though no prune entry covers it.
    #[error("its failure entries are gone, and no audit.prune entry covers it")]
    FailuresMissing,
    /// Failure entries name this seq as their batch, but the chain has no batch there, or one
    /// already pruned: they were forged or put back.
    #[error(
        "failure entries name it as their batch, but the chain has no batch there or pruned \
         it: they were forged or put back"
    )]
    FailuresUnlisted,
}

/// The outcome of [`AuditStore::check_audit`].
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

impl AuditVerdict {
    /// The head of an intact log ([`AuditHead::empty`] when it has no entry).
    pub fn head(&self) -> Option<AuditHead> {
        match self {
            AuditVerdict::Intact { entries, head_hash } => Some(AuditHead {
                seq: *entries,
                hash: head_hash.clone().unwrap_or_else(|| GENESIS_HASH.into()),
            }),
            AuditVerdict::Broken(_) => None,
        }
    }
}

/// What [`AuditStore::check_audit`] checks besides the chain itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditCheck {
    /// A head an earlier check of this log verified: the entries before it are not read
    /// again, its own entry must still have its hash, and the chain is checked from there on.
    /// `None`: from seq 1.
    pub resume: Option<AuditHead>,
    /// Heads the log must reach, each with the same hash at its seq. Heads below `resume`
    /// are not checked.
    pub heads: Vec<AuditHead>,
}

/// Checks stored rows in seq order, one at a time (constant memory). Shared by backends.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev_hash: String,
    key: Option<AuditKey>,
    /// A keyed entry was seen: no unkeyed one may follow.
    keyed_seen: bool,
    /// The trusted head the check resumes at (its row is compared, not recomputed).
    resume: Option<AuditHead>,
    heads: Vec<AuditHead>,
    /// Set when the check is broken before any row (resuming beyond the log's end).
    broken: Option<BrokenLink>,
}

impl ChainVerifier {
    /// A verifier of the whole chain with `key` (without one, every entry must follow the
    /// unkeyed rule).
    pub fn new(key: Option<&AuditKey>) -> ChainVerifier {
        ChainVerifier {
            next_seq: 1,
            prev_hash: GENESIS_HASH.into(),
            key: key.cloned(),
            keyed_seen: false,
            resume: None,
            heads: Vec::new(),
            broken: None,
        }
    }

    /// A verifier of what `check` asks, for a log whose highest seq is `log_len`: the backend
    /// then feeds the rows from [`next_seq`](ChainVerifier::next_seq) on.
    pub fn with_check(key: Option<&AuditKey>, check: &AuditCheck, log_len: u64) -> ChainVerifier {
        let mut v = ChainVerifier::new(key);
        v.heads = check.heads.clone();
        if let Some(resume) = check.resume.as_ref().filter(|r| r.seq > 0) {
            v.heads.retain(|h| h.seq >= resume.seq);
            v.next_seq = resume.seq;
            if log_len < resume.seq {
                v.broken = Some(BrokenLink {
                    seq: log_len + 1,
                    reason: BrokenReason::Truncated {
                        last: log_len,
                        head: resume.seq,
                    },
                });
            }
            v.resume = Some(resume.clone());
        }
        v
    }

    /// The seq the next row must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn broken(&self, reason: BrokenReason) -> Result<(), BrokenLink> {
        Err(BrokenLink {
            seq: self.next_seq,
            reason,
        })
    }

    /// Checks the next stored row.
    pub fn check(&mut self, row: &StoredAuditRow) -> Result<(), BrokenLink> {
        if let Some(broken) = &self.broken {
            return Err(broken.clone());
        }
        let seq = self.next_seq;
        let fields = match row.fields() {
            Some(fields) if fields.seq == seq => fields,
            _ => return self.broken(BrokenReason::Missing { found: row.seq }),
        };
        let keyed = |key: &AuditKey| key.verifies(&fields.encode(TAG_KEYED), &row.hash);
        if let Some(resume) = self.resume.take() {
            // The trusted head's own entry: compared, and the chain goes on from it.
            if row.hash != resume.hash {
                return self.broken(BrokenReason::HeadMismatch);
            }
            self.keyed_seen = self.key.as_ref().is_some_and(keyed);
        } else {
            if row.prev_hash != self.prev_hash {
                return self.broken(BrokenReason::PrevHashMismatch);
            }
            let keyed_from = self.key.as_ref().map_or(u64::MAX, AuditKey::keyed_from);
            let unkeyed_allowed = !self.keyed_seen && seq < keyed_from;
            if unkeyed_allowed && row.hash == unkeyed_hash(&fields) {
                // An entry from before the key.
            } else if self.key.as_ref().is_some_and(keyed) {
                self.keyed_seen = true;
            } else if !unkeyed_allowed && row.hash == unkeyed_hash(&fields) {
                return self.broken(BrokenReason::Unkeyed);
            } else {
                return self.broken(BrokenReason::HashMismatch);
            }
        }
        if self
            .heads
            .iter()
            .any(|h| h.seq == seq && h.hash != row.hash)
        {
            return self.broken(BrokenReason::HeadMismatch);
        }
        self.prev_hash.clone_from(&row.hash);
        self.next_seq += 1;
        Ok(())
    }

    /// The verdict after the last row.
    pub fn finish(self) -> AuditVerdict {
        if let Some(broken) = self.broken {
            return AuditVerdict::Broken(broken);
        }
        let last = self.next_seq - 1;
        if let Some(head) = self.heads.iter().map(|h| h.seq).filter(|&s| s > last).max() {
            return AuditVerdict::Broken(BrokenLink {
                seq: last + 1,
                reason: BrokenReason::Truncated { last, head },
            });
        }
        if self.resume.is_some() {
            // The trusted head's entry was never fed: the log ends before it.
            return AuditVerdict::Broken(BrokenLink {
                seq: self.next_seq,
                reason: BrokenReason::Truncated {
                    last,
                    head: self.next_seq,
                },
            });
        }
        AuditVerdict::Intact {
            entries: last,
            head_hash: (last > 0).then_some(self.prev_hash),
        }
    }
}

/// The audit log.
///
/// Reads are required methods; appends are provided on top of [`WriteBackend::commit_jobs`],
/// which extends the chain inside the write transaction ([`next_entry`]) with the backend's
/// audit key, if it was given one.
pub trait AuditStore: WriteBackend {
    /// Up to `limit` entries from `from_seq` on, in seq order.
    fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;

    /// Up to `limit` failure entries ([`failures`]) from id `from_id` on, in id order.
    fn list_audit_failures(
        &self,
        from_id: u64,
        limit: usize,
    ) -> Result<Vec<failures::FailureEntry>, StoreError>;

    /// The highest seq stored (0 for an empty log).
    fn audit_len(&self) -> Result<u64, StoreError>;

    /// Verifies the chain (with the backend's audit key, if any), what `check` adds, and then
    /// the failure entries of the batches checked, in one read snapshot
    /// ([`ChainVerifier::with_check`] over the rows, then [`failures::FailureCheck`]).
    fn check_audit(&self, check: &AuditCheck) -> Result<AuditVerdict, StoreError>;

    /// Recomputes the whole chain.
    fn verify_audit(&self) -> Result<AuditVerdict, StoreError> {
        self.check_audit(&AuditCheck::default())
    }

    /// Appends an entry; returns it with its seq and hashes.
    fn append_audit(&self, entry: NewAuditEntry) -> Result<AuditEntry, StoreError> {
        self.write_one(Write::AppendAudit(entry))?.into_audit()
    }

    /// Appends a batch of failure entries with the chain entry that commits to them (appended
    /// at `ts_ms`); returns that entry.
    fn append_failures(
        &self,
        ts_ms: i64,
        entries: Vec<failures::NewFailureEntry>,
    ) -> Result<AuditEntry, StoreError> {
        self.write_one(Write::AppendFailures { ts_ms, entries })?
            .into_audit()
    }

    /// Deletes the failure entries of the batches appended before `before_ms`, recording it in
    /// the chain at `now_ms`; returns how many were deleted.
    fn prune_failures(&self, before_ms: i64, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PruneFailures { before_ms, now_ms })?
            .into_count()
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
    fn entry_mac_matches_the_documented_encoding() {
        // Computed independently with Python's `hmac` and `hashlib`.
        let key = AuditKey::new(&(0u8..32).collect::<Vec<u8>>(), 1).unwrap();
        let detail = r#"{"a":[1,{"y":"é","z":null}],"b":1}"#;
        let first = entry_mac(
            &key,
            &EntryFields {
                seq: 1,
                ts_ms: 1_700_000_000_000,
                actor: "admin",
                action: "device.create",
                target: "dev-1",
                detail,
                prev_hash: GENESIS_HASH,
            },
        );
        assert_eq!(
            first,
            "669abdaddb3d3841cab3349e26191728cdf5f8d1cd58c512c2e2f528027ab928"
        );
        let second = EntryFields {
            seq: 2,
            ts_ms: -5,
            actor: "app-1",
            action: "config.put",
            target: "",
            detail: "null",
            prev_hash: &first,
        };
        assert_eq!(
            entry_mac(&key, &second),
            "379775239b5d27c7e68208685aab0f3bc56429cf275596febeb0c20ad2d60f04"
        );
        let head = AuditHead {
            seq: 2,
            hash: first.clone(),
        };
        let mac = head.mac(&key);
        assert_eq!(
            mac,
            "b56f11636e03984f7d997e8efe606f9745cdecdf049702d10a73b84a9f0e88e6"
        );
        assert!(head.mac_verifies(&key, &mac));
        let older = AuditHead { seq: 1, ..head };
        assert!(!older.mac_verifies(&key, &mac));
        assert!(!older.mac_verifies(&key, "not hex"));
    }

    #[test]
    fn short_keys_are_refused_and_debug_hides_the_secret() {
        assert!(matches!(
            AuditKey::new(&[7; 31], 1),
            Err(StoreError::Invalid(_))
        ));
        let key = AuditKey::new(&[7; 32], 0).unwrap();
        assert_eq!(key.keyed_from(), 1, "keyed_from starts at seq 1");
        assert_eq!(format!("{key:?}"), "AuditKey { keyed_from: 1, .. }");
    }

    #[test]
    fn heads_read_and_write_as_seq_colon_hash() {
        let head: AuditHead = format!(" 12:{} \n", "AB".repeat(32)).parse().unwrap();
        assert_eq!(head.seq, 12);
        assert_eq!(head.hash, "ab".repeat(32));
        assert_eq!(head.to_string(), format!("12:{}", "ab".repeat(32)));
        assert_eq!(
            AuditHead::empty().to_string().parse::<AuditHead>().unwrap(),
            AuditHead::empty()
        );
        for bad in ["", "12", "x:ab", "-1:00", &format!("1:{}", "a".repeat(63))] {
            assert!(bad.parse::<AuditHead>().is_err(), "{bad:?}");
        }
    }

    fn key() -> AuditKey {
        AuditKey::new(&[9; 32], 1).unwrap()
    }

    /// Rows 1..=n appended with `key` (or unkeyed), as a backend would store them.
    fn chain(key: Option<&AuditKey>, n: u64) -> Vec<StoredAuditRow> {
        let mut rows: Vec<StoredAuditRow> = Vec::new();
        for i in 1..=n {
            rows.push(next_row(key, rows.last(), i));
        }
        rows
    }

    fn next_row(key: Option<&AuditKey>, last: Option<&StoredAuditRow>, i: u64) -> StoredAuditRow {
        let new = NewAuditEntry {
            ts_ms: i as i64,
            actor: "a".into(),
            action: "b".into(),
            target: format!("t-{i}"),
            detail: serde_json::json!({ "i": i }),
        };
        let (e, detail) = next_entry(key, last, &new).unwrap();
        StoredAuditRow {
            seq: e.seq as i64,
            ts_ms: e.ts_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }

    fn verify(key: Option<&AuditKey>, check: &AuditCheck, rows: &[StoredAuditRow]) -> AuditVerdict {
        let len = rows.last().map_or(0, |r| r.seq as u64);
        let mut v = ChainVerifier::with_check(key, check, len);
        let from = v.next_seq();
        for row in rows.iter().filter(|r| r.seq as u64 >= from) {
            if let Err(broken) = v.check(row) {
                return AuditVerdict::Broken(broken);
            }
        }
        v.finish()
    }

    fn broken(seq: u64, reason: BrokenReason) -> AuditVerdict {
        AuditVerdict::Broken(BrokenLink { seq, reason })
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
        let mut v = ChainVerifier::new(None);
        v.check(&r1).unwrap();
        v.check(&r2).unwrap();
        assert_eq!(
            v.finish(),
            AuditVerdict::Intact {
                entries: 2,
                head_hash: Some(r2.hash.clone())
            }
        );
        let mut v = ChainVerifier::new(None);
        assert_eq!(
            v.check(&r2).unwrap_err(),
            BrokenLink {
                seq: 1,
                reason: BrokenReason::Missing { found: 2 }
            }
        );
        let mut v = ChainVerifier::new(None);
        v.check(&r1).unwrap();
        let mut forged = r2.clone();
        forged.target = "d".into();
        assert_eq!(
            v.check(&forged).unwrap_err().reason,
            BrokenReason::HashMismatch
        );
    }

    #[test]
    fn a_keyed_chain_cannot_be_recomputed_without_the_key() {
        let key = key();
        let rows = chain(Some(&key), 5);
        let none = AuditCheck::default();
        assert_eq!(verify(Some(&key), &none, &rows).head().unwrap().seq, 5);
        // Without the key (or with another one) nothing verifies.
        assert_eq!(
            verify(None, &none, &rows),
            broken(1, BrokenReason::HashMismatch)
        );
        let other = AuditKey::new(&[8; 32], 1).unwrap();
        assert_eq!(
            verify(Some(&other), &none, &rows),
            broken(1, BrokenReason::HashMismatch)
        );
        // Drop entry 3 and re-chain 3.. with the documented unkeyed rule.
        let mut forged: Vec<StoredAuditRow> = rows[..2].to_vec();
        for old in &rows[3..] {
            let mut row = old.clone();
            row.seq -= 1;
            row.prev_hash = forged.last().unwrap().hash.clone();
            row.hash = unkeyed_hash(&row.fields().unwrap());
            forged.push(row);
        }
        assert_eq!(
            verify(Some(&key), &none, &forged),
            broken(3, BrokenReason::Unkeyed)
        );
        // Edit entry 2 and keep its hash.
        let mut edited = rows.clone();
        edited[1].target = "elsewhere".into();
        assert_eq!(
            verify(Some(&key), &none, &edited),
            broken(2, BrokenReason::HashMismatch)
        );
    }

    #[test]
    fn unkeyed_entries_verify_only_before_the_key() {
        let unkeyed = chain(None, 3);
        let key = AuditKey::new(&[9; 32], 4).unwrap();
        let mut rows = unkeyed.clone();
        for i in 4..=6 {
            let next = next_row(Some(&key), rows.last(), i);
            rows.push(next);
        }
        let none = AuditCheck::default();
        assert_eq!(verify(Some(&key), &none, &rows).head().unwrap().seq, 6);
        // The whole log recomputed with the unkeyed rule: caught where the key begins.
        let mut downgraded: Vec<StoredAuditRow> = Vec::new();
        for old in &rows {
            let mut row = old.clone();
            row.prev_hash = downgraded
                .last()
                .map_or(GENESIS_HASH.into(), |r| r.hash.clone());
            row.hash = unkeyed_hash(&row.fields().unwrap());
            downgraded.push(row);
        }
        assert_eq!(
            verify(Some(&key), &none, &downgraded),
            broken(4, BrokenReason::Unkeyed)
        );
        // An unkeyed entry after a keyed one is refused, even below keyed_from.
        let late = AuditKey::new(&[9; 32], 10).unwrap();
        let mut mixed = chain(Some(&late), 2);
        let tail = next_row(None, Some(&unkeyed[0]), 2);
        mixed.push(StoredAuditRow {
            seq: 3,
            prev_hash: mixed[1].hash.clone(),
            ..tail
        });
        let last = mixed.last_mut().unwrap();
        last.hash = unkeyed_hash(&last.fields().unwrap());
        assert_eq!(
            verify(Some(&late), &none, &mixed),
            broken(3, BrokenReason::Unkeyed)
        );
        // Appending unkeyed after a keyed entry is refused.
        assert!(matches!(
            next_entry(
                None,
                rows.last(),
                &NewAuditEntry {
                    ts_ms: 0,
                    actor: "a".into(),
                    action: "b".into(),
                    target: String::new(),
                    detail: Json::Null,
                }
            ),
            Err(StoreError::Unsupported(_))
        ));
    }

    #[test]
    fn heads_show_a_cut_tail_and_a_rewritten_entry() {
        let key = key();
        let rows = chain(Some(&key), 6);
        let head = |i: usize| AuditHead {
            seq: rows[i - 1].seq as u64,
            hash: rows[i - 1].hash.clone(),
        };
        let with = |heads: Vec<AuditHead>| AuditCheck {
            resume: None,
            heads,
        };
        assert_eq!(
            verify(Some(&key), &with(vec![head(6), head(2)]), &rows).head(),
            Some(head(6))
        );
        assert_eq!(
            verify(Some(&key), &with(vec![AuditHead::empty()]), &rows).head(),
            Some(head(6))
        );
        assert_eq!(
            verify(Some(&key), &with(vec![head(4), head(6)]), &rows[..3]),
            broken(4, BrokenReason::Truncated { last: 3, head: 6 })
        );
        let other = AuditHead {
            seq: 5,
            hash: "ab".repeat(32),
        };
        assert_eq!(
            verify(Some(&key), &with(vec![other]), &rows),
            broken(5, BrokenReason::HeadMismatch)
        );
    }

    #[test]
    fn a_check_resumes_at_a_trusted_head() {
        let key = key();
        let rows = chain(Some(&key), 6);
        let at = |i: usize| AuditHead {
            seq: i as u64,
            hash: rows[i - 1].hash.clone(),
        };
        let resume = |i: usize| AuditCheck {
            resume: Some(at(i)),
            heads: Vec::new(),
        };
        assert_eq!(verify(Some(&key), &resume(4), &rows).head(), Some(at(6)));
        assert_eq!(verify(Some(&key), &resume(6), &rows).head(), Some(at(6)));
        assert_eq!(
            verify(Some(&key), &resume(6), &rows[..4]),
            broken(5, BrokenReason::Truncated { last: 4, head: 6 })
        );
        let mut edited = rows.clone();
        edited[4].detail = "{}".into();
        assert_eq!(
            verify(Some(&key), &resume(4), &edited),
            broken(5, BrokenReason::HashMismatch)
        );
        edited[3].hash = "cd".repeat(32);
        assert_eq!(
            verify(Some(&key), &resume(4), &edited),
            broken(4, BrokenReason::HeadMismatch)
        );
    }
}
