//! Failed authentications in the audit log: aggregated *failure entries* kept beside the
//! chain, committed to by one chain entry per batch, and pruned after a retention without
//! breaking the chain or what it proves.
//!
//! ## Why beside the chain, and not in it
//! Failures come from whoever can reach a port, admin actions from whoever holds a credential;
//! the first need a retention, the second must stay. Inside the chain a failure entry could be
//! neither deleted (every later entry links through it) nor usefully redacted (an entry's MAC
//! covers its detail, so a redacted entry needs a new encoding, and what remains, seq, hashes
//! and names, is most of a failure entry's size anyway). Kept in a table of their own with no
//! link to the chain, they could be deleted or forged by whoever writes the database. So they
//! are kept beside the chain and the chain commits to them:
//!
//! - **A batch** is what the server flushes at once (a minute's aggregated failures). It is
//!   appended in one write ([`Write::AppendFailures`](crate::Write::AppendFailures)): a chain
//!   entry with action [`BATCH_ACTION`] (actor `system`) whose detail is
//!   `{"entries": N, "attempts": A, "digest": D}`, and the N failure entries, each recording
//!   that entry's seq as its `batch`. `A` is the sum of the entries' `count` detail (1 for an
//!   entry without one). `D` = hex(SHA-256(`"stratus-audit-failures-v1"` || for each entry in
//!   order: f(ts_ms) || f(actor) || f(action) || f(target) || f(detail))), with `f` and the
//!   canonical detail of the chain ([`super`]). The batch entry is MACed like every entry, so
//!   `D` cannot be changed without the key, and neither can the failure entries while they
//!   exist: an edited, added, removed or reordered failure entry is reported at its batch.
//! - **Pruning** ([`Write::PruneFailures`](crate::Write::PruneFailures)) deletes the failure
//!   entries of the batches appended before a time, oldest first, and records it in the chain
//!   in the same transaction: an entry with action [`PRUNE_ACTION`] and detail
//!   `{"through": S, "entries": n, "before_ms": T}` (every batch up to seq `S` was pruned).
//! - **Verification** takes the horizon `H`, the largest `through` of the prune entries: each
//!   batch above `H` must have exactly the entries its digest names, no failure entry may
//!   belong to a batch at or below `H`, and every failure entry must belong to a batch
//!   ([`FailureCheck`]). The chain is checked first; a broken chain is reported before any
//!   failure entry, since the batches after its break cannot be trusted.
//!
//! The chain grows by at most one entry per batch and one per prune, whatever the number of
//! attempts; the failure entries are bounded by the retention.
//!
//! ## What this shows and what it does not
//! Whoever writes the database but does not hold the key cannot change, add or remove a
//! failure entry of a batch above the horizon, nor move the horizon. Pruning is the key
//! holder's (the server's) act, recorded in the chain; a prune makes the entries it covers
//! unrecoverable, and so it hides a deletion an adversary made among them after the last
//! verification. Cutting the newest batches is shown as for any entry: by a head kept
//! elsewhere.

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use super::{
    canonical_json, BrokenLink, BrokenReason, NewAuditEntry, MAX_NAME_LEN, MAX_TARGET_LEN,
};
use crate::{check_text, StoreError};

/// The action of every failure entry.
pub const FAILURE_ACTION: &str = "auth.failure";
/// The action of the chain entry that commits to a batch of failure entries.
pub const BATCH_ACTION: &str = "auth.failures";
/// The action of the chain entry that records a prune.
pub const PRUNE_ACTION: &str = "audit.prune";
/// The actor of batch and prune entries.
pub const SYSTEM_ACTOR: &str = "system";

/// The most failure entries in one batch.
pub const MAX_BATCH: usize = 100_000;

const TAG_DIGEST: &[u8] = b"stratus-audit-failures-v1";

/// A failure entry to append (its action is [`FAILURE_ACTION`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewFailureEntry {
    /// When it happened (the first attempt it counts), Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Who was claimed (an id, or `anonymous`).
    pub actor: String,
    /// Where (an endpoint: `oauth/token`, `mqtt`, …).
    pub target: String,
    /// The rest (the server's: `count`, `first`, `last`, `source`, `reason`, …).
    pub detail: Json,
}

impl NewFailureEntry {
    /// Checks lengths and characters (as for chain entries).
    pub fn validate(&self) -> Result<(), StoreError> {
        check_text("failure actor", &self.actor, MAX_NAME_LEN)?;
        if !self.target.is_empty() {
            check_text("failure target", &self.target, MAX_TARGET_LEN)?;
        }
        Ok(())
    }

    /// How many attempts it stands for: its detail's `count`, else 1.
    fn attempts(&self) -> u64 {
        self.detail.get("count").and_then(Json::as_u64).unwrap_or(1)
    }
}

/// A stored failure entry.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureEntry {
    /// Its position among failure entries: increasing, never reused (gaps where entries were
    /// pruned).
    pub id: u64,
    /// The seq of the chain entry ([`BATCH_ACTION`]) that commits to it.
    pub batch: u64,
    /// When it happened, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Who was claimed.
    pub actor: String,
    /// [`FAILURE_ACTION`].
    pub action: String,
    /// Where.
    pub target: String,
    /// The rest.
    pub detail: Json,
}

/// A failure entry exactly as stored, for verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredFailureRow {
    /// Id as stored.
    pub id: i64,
    /// Batch as stored.
    pub batch: i64,
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
}

/// The digest of a batch's failure entries, fed one entry at a time (see the module docs).
#[derive(Debug, Clone)]
pub struct FailureDigest(Sha256);

impl Default for FailureDigest {
    fn default() -> Self {
        FailureDigest::new()
    }
}

impl FailureDigest {
    /// An empty digest.
    pub fn new() -> FailureDigest {
        let mut h = Sha256::new();
        h.update(TAG_DIGEST);
        FailureDigest(h)
    }

    /// Adds the next entry (`detail` in canonical JSON).
    pub fn push(&mut self, ts_ms: i64, actor: &str, action: &str, target: &str, detail: &str) {
        let ts = ts_ms.to_string();
        for field in [ts.as_str(), actor, action, target, detail] {
            self.0.update((field.len() as u64).to_be_bytes());
            self.0.update(field.as_bytes());
        }
    }

    /// The digest, lowercase hex.
    pub fn finish(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// The chain entry that commits to `entries`, appended at `ts_ms`, with each entry's canonical
/// detail text (what a backend stores). Refuses an empty or oversized batch and invalid entries.
pub fn batch_entry(
    ts_ms: i64,
    entries: &[NewFailureEntry],
) -> Result<(NewAuditEntry, Vec<String>), StoreError> {
    if entries.is_empty() || entries.len() > MAX_BATCH {
        return Err(StoreError::Invalid(format!(
            "a batch of failure entries has 1 to {MAX_BATCH} entries (got {})",
            entries.len()
        )));
    }
    let mut digest = FailureDigest::new();
    let mut details = Vec::with_capacity(entries.len());
    let mut attempts = 0u64;
    for e in entries {
        e.validate()?;
        let detail = canonical_json(&e.detail);
        digest.push(e.ts_ms, &e.actor, FAILURE_ACTION, &e.target, &detail);
        details.push(detail);
        attempts = attempts.saturating_add(e.attempts());
    }
    Ok((
        NewAuditEntry {
            ts_ms,
            actor: SYSTEM_ACTOR.into(),
            action: BATCH_ACTION.into(),
            target: String::new(),
            detail: json!({
                "entries": entries.len(),
                "attempts": attempts,
                "digest": digest.finish(),
            }),
        },
        details,
    ))
}

/// The chain entry that records a prune: every batch up to seq `through` lost its failure
/// entries (`deleted` of them), those appended before `before_ms`.
pub fn prune_entry(ts_ms: i64, through: u64, deleted: u64, before_ms: i64) -> NewAuditEntry {
    NewAuditEntry {
        ts_ms,
        actor: SYSTEM_ACTOR.into(),
        action: PRUNE_ACTION.into(),
        target: String::new(),
        detail: json!({ "through": through, "entries": deleted, "before_ms": before_ms }),
    }
}

/// What a batch entry claims.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    entries: u64,
    digest: String,
}

/// The batch whose rows are being read.
#[derive(Debug, Clone)]
struct Reading {
    batch: u64,
    claim: Claim,
    digest: FailureDigest,
    seen: u64,
}

/// Checks the failure entries against the chain (see the module docs): the backend notes each
/// chain entry the chain check accepted ([`note`](FailureCheck::note)), then, when the chain
/// is intact, feeds the failure entries whose batch is at least
/// [`rows_from`](FailureCheck::rows_from) in `(batch, id)` order ([`check`](FailureCheck::check))
/// and asks for the verdict ([`finish`](FailureCheck::finish)).
///
/// Memory: one digest per batch noted and not pruned (a retention's worth of batches).
#[derive(Debug, Clone)]
pub struct FailureCheck {
    from: u64,
    claims: BTreeMap<u64, Claim>,
    horizon: u64,
    reading: Option<Reading>,
    broken: Option<BrokenLink>,
}

impl FailureCheck {
    /// A check of the batches from seq `from_seq` on (the chain check's first seq).
    pub fn new(from_seq: u64) -> FailureCheck {
        FailureCheck {
            from: from_seq,
            claims: BTreeMap::new(),
            horizon: 0,
            reading: None,
            broken: None,
        }
    }

    /// The first batch whose failure entries to feed.
    pub fn rows_from(&self) -> u64 {
        self.from
    }

    /// Notes the chain entry at `seq` (after the chain check accepted it): batches and
    /// prunes count, other entries are ignored. A batch or prune entry whose detail is not
    /// what [`batch_entry`] or [`prune_entry`] writes is reported as unreadable.
    pub fn note(&mut self, seq: u64, action: &str, detail: &str) -> Result<(), BrokenLink> {
        let unreadable = || BrokenLink {
            seq,
            reason: BrokenReason::Unreadable,
        };
        match action {
            BATCH_ACTION => {
                let detail: Json = serde_json::from_str(detail).map_err(|_| unreadable())?;
                let entries = detail.get("entries").and_then(Json::as_u64);
                let digest = detail.get("digest").and_then(Json::as_str);
                match (entries, digest) {
                    (Some(entries), Some(digest)) => {
                        self.claims.insert(
                            seq,
                            Claim {
                                entries,
                                digest: digest.to_owned(),
                            },
                        );
                    }
                    _ => return Err(unreadable()),
                }
            }
            PRUNE_ACTION => {
                let detail: Json = serde_json::from_str(detail).map_err(|_| unreadable())?;
                let through = detail
                    .get("through")
                    .and_then(Json::as_u64)
                    .filter(|&t| t < seq)
                    .ok_or_else(unreadable)?;
                if through > self.horizon {
                    self.horizon = through;
                    // Kept memory: the batches not pruned yet.
                    self.claims = self.claims.split_off(&through.saturating_add(1));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn fail(&mut self, seq: u64, reason: BrokenReason) -> Result<(), BrokenLink> {
        let link = BrokenLink { seq, reason };
        self.broken = Some(link.clone());
        Err(link)
    }

    /// Compares the batch being read with its claim.
    fn close(&mut self) -> Result<(), BrokenLink> {
        if let Some(r) = self.reading.take() {
            if r.seen != r.claim.entries || r.digest.finish() != r.claim.digest {
                return self.fail(r.batch, BrokenReason::FailuresMismatch);
            }
        }
        Ok(())
    }

    /// Reports the first batch below `before` that was claimed but whose rows never came.
    fn none_missing_below(&mut self, before: u64) -> Result<(), BrokenLink> {
        // Claims at or below the horizon are pruned ones: none is missing.
        let first = self
            .claims
            .range(..before)
            .map(|(&seq, _)| seq)
            .find(|&seq| seq > self.horizon);
        match first {
            Some(seq) => self.fail(seq, BrokenReason::FailuresMissing),
            None => Ok(()),
        }
    }

    /// Checks the next stored failure entry.
    pub fn check(&mut self, row: &StoredFailureRow) -> Result<(), BrokenLink> {
        if let Some(broken) = &self.broken {
            return Err(broken.clone());
        }
        let Ok(batch) = u64::try_from(row.batch) else {
            return self.fail(0, BrokenReason::FailuresUnlisted);
        };
        if self.reading.as_ref().map(|r| r.batch) != Some(batch) {
            self.close()?;
            self.none_missing_below(batch)?;
            let claim = match self.claims.remove(&batch) {
                Some(claim) if batch > self.horizon => claim,
                _ => return self.fail(batch, BrokenReason::FailuresUnlisted),
            };
            self.reading = Some(Reading {
                batch,
                claim,
                digest: FailureDigest::new(),
                seen: 0,
            });
        }
        if let Some(r) = self.reading.as_mut() {
            r.digest
                .push(row.ts_ms, &row.actor, &row.action, &row.target, &row.detail);
            r.seen += 1;
        }
        Ok(())
    }

    /// The verdict after the last failure entry.
    pub fn finish(mut self) -> Result<(), BrokenLink> {
        if let Some(broken) = self.broken.take() {
            return Err(broken);
        }
        self.close()?;
        self.none_missing_below(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(i: i64) -> NewFailureEntry {
        NewFailureEntry {
            ts_ms: 1_700_000_000_000 + i,
            actor: format!("user-{i}"),
            target: "mqtt".into(),
            detail: json!({ "count": i, "reason": "bad credentials" }),
        }
    }

    /// The batch's rows as a backend stores them.
    fn rows(batch: i64, entries: &[NewFailureEntry], details: &[String]) -> Vec<StoredFailureRow> {
        entries
            .iter()
            .zip(details)
            .enumerate()
            .map(|(i, (e, d))| StoredFailureRow {
                id: batch * 100 + i as i64,
                batch,
                ts_ms: e.ts_ms,
                actor: e.actor.clone(),
                action: FAILURE_ACTION.into(),
                target: e.target.clone(),
                detail: d.clone(),
            })
            .collect()
    }

    /// Fixed vector, computed independently (Python `hashlib`), so the encoding cannot drift.
    #[test]
    fn the_digest_matches_the_documented_encoding() {
        let (entry, details) = batch_entry(5, &[new(1), new(2)]).unwrap();
        assert_eq!(details[0], r#"{"count":1,"reason":"bad credentials"}"#);
        assert_eq!(
            (&entry.actor[..], &entry.action[..], &entry.target[..]),
            ("system", "auth.failures", "")
        );
        assert_eq!(entry.detail["entries"], 2);
        assert_eq!(entry.detail["attempts"], 3);
        assert_eq!(
            entry.detail["digest"],
            "71cdae3d300b0dbcf0924a9fc24a3bee431e196d8e44ee5d5fc07852a3d1c1b4"
        );
    }

    #[test]
    fn empty_and_invalid_batches_are_refused() {
        assert!(matches!(batch_entry(0, &[]), Err(StoreError::Invalid(_))));
        let bad = NewFailureEntry {
            actor: "a\nb".into(),
            ..new(1)
        };
        assert!(matches!(
            batch_entry(0, &[new(1), bad]),
            Err(StoreError::Invalid(_))
        ));
    }

    fn checked(
        chain: &[(u64, NewAuditEntry)],
        rows: &[StoredFailureRow],
        from: u64,
    ) -> Result<(), BrokenLink> {
        let mut c = FailureCheck::new(from);
        for (seq, e) in chain.iter().filter(|(s, _)| *s >= from) {
            c.note(*seq, &e.action, &canonical_json(&e.detail))?;
        }
        let rows_from = c.rows_from();
        for row in rows.iter().filter(|r| r.batch as u64 >= rows_from) {
            c.check(row)?;
        }
        c.finish()
    }

    fn broken(seq: u64, reason: BrokenReason) -> Result<(), BrokenLink> {
        Err(BrokenLink { seq, reason })
    }

    #[test]
    fn batches_must_have_exactly_their_entries_above_the_horizon() {
        let (b2, d2) = batch_entry(10, &[new(1), new(2)]).unwrap();
        let (b4, d4) = batch_entry(20, &[new(3)]).unwrap();
        let (b5, d5) = batch_entry(30, &[new(4), new(5), new(6)]).unwrap();
        let other = NewAuditEntry {
            ts_ms: 0,
            actor: "admin".into(),
            action: "device.create".into(),
            target: "d".into(),
            detail: Json::Null,
        };
        let chain = vec![(1, other.clone()), (2, b2), (3, other), (4, b4), (5, b5)];
        let mut all = rows(2, &[new(1), new(2)], &d2);
        all.extend(rows(4, &[new(3)], &d4));
        all.extend(rows(5, &[new(4), new(5), new(6)], &d5));
        assert_eq!(checked(&chain, &all, 1), Ok(()));
        assert_eq!(checked(&chain, &all, 4), Ok(()), "a resumed check");

        let mut edited = all.clone();
        edited[3].detail = r#"{"count":1}"#.into();
        assert_eq!(
            checked(&chain, &edited, 1),
            broken(5, BrokenReason::FailuresMismatch)
        );
        let mut swapped = all.clone();
        swapped.swap(0, 1);
        assert_eq!(
            checked(&chain, &swapped, 1),
            broken(2, BrokenReason::FailuresMismatch)
        );
        let mut one_gone = all.clone();
        one_gone.remove(4);
        assert_eq!(
            checked(&chain, &one_gone, 1),
            broken(5, BrokenReason::FailuresMismatch)
        );
        let batch_gone: Vec<_> = all.iter().filter(|r| r.batch != 4).cloned().collect();
        assert_eq!(
            checked(&chain, &batch_gone, 1),
            broken(4, BrokenReason::FailuresMissing)
        );
        let last_gone: Vec<_> = all.iter().filter(|r| r.batch != 5).cloned().collect();
        assert_eq!(
            checked(&chain, &last_gone, 1),
            broken(5, BrokenReason::FailuresMissing)
        );
        let mut forged = all.clone();
        forged.push(StoredFailureRow {
            batch: 6,
            ..all[0].clone()
        });
        assert_eq!(
            checked(&chain, &forged, 1),
            broken(6, BrokenReason::FailuresUnlisted)
        );
        let mut moved = all.clone();
        moved[1].batch = 4;
        moved.sort_by_key(|r| (r.batch, r.id));
        assert_eq!(
            checked(&chain, &moved, 1),
            broken(2, BrokenReason::FailuresMismatch)
        );

        // Batches 2 and 4 pruned: their rows gone, the prune recorded.
        let mut pruned_chain = chain.clone();
        pruned_chain.push((6, prune_entry(40, 4, 3, 25)));
        let kept: Vec<_> = all.iter().filter(|r| r.batch > 4).cloned().collect();
        assert_eq!(checked(&pruned_chain, &kept, 1), Ok(()));
        assert_eq!(
            checked(&pruned_chain, &all, 1),
            broken(2, BrokenReason::FailuresUnlisted),
            "rows of a pruned batch put back"
        );
        assert_eq!(
            checked(&pruned_chain, &[], 1),
            broken(5, BrokenReason::FailuresMissing),
            "the horizon covers only what it names"
        );
        let bad_prune = NewAuditEntry {
            detail: json!({ "through": 9 }),
            ..prune_entry(40, 0, 0, 0)
        };
        assert_eq!(
            checked(&[(7, bad_prune)], &[], 1),
            broken(7, BrokenReason::Unreadable)
        );
    }
}
