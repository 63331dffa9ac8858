//! The audit-log checks: the keyed chain as appended, listing, verification against heads,
//! logs keyed after the fact, failure entries beside the chain and their pruning, and tamper
//! detection by an adversary who can rewrite the stored rows (through a backend-specific way
//! to replace them) but does not hold the key.

use serde_json::json;

use crate::audit::failures::{batch_entry, NewFailureEntry, StoredFailureRow};
use crate::audit::{
    canonical_json, entry_mac, AuditCheck, AuditEntry, AuditHead, AuditKey, AuditStore,
    AuditVerdict, BrokenLink, BrokenReason, EntryFields, NewAuditEntry, StoredAuditRow,
    GENESIS_HASH,
};
use crate::StoreError;

/// The key the audit checks expect a store to append with (keyed from seq 1).
pub fn audit_key() -> AuditKey {
    keyed_from(1)
}

fn keyed_from(seq: u64) -> AuditKey {
    match AuditKey::new(&[0x5a; 32], seq) {
        Ok(key) => key,
        Err(e) => panic!("a 32-byte key is valid: {e}"),
    }
}

fn entry(i: u64, detail: serde_json::Value) -> NewAuditEntry {
    NewAuditEntry {
        ts_ms: 1_700_000_000_000 + i as i64,
        actor: ["admin", "app-1"][(i % 2) as usize].into(),
        action: "device.create".into(),
        target: if i == 3 {
            String::new()
        } else {
            format!("dev-{i}")
        },
        detail,
    }
}

fn details() -> Vec<serde_json::Value> {
    vec![
        json!({ "b": 1, "a": [1, { "z": null, "y": "é\"\n" }] }),
        serde_json::Value::Null,
        json!("text"),
        json!(1.5),
        json!({ "nested": { "k": 2, "j": true }, "big": 12345678901234567u64 }),
    ]
}

fn head_of(e: &AuditEntry) -> AuditHead {
    AuditHead {
        seq: e.seq,
        hash: e.hash.clone(),
    }
}

fn broken(seq: u64, reason: BrokenReason) -> AuditVerdict {
    AuditVerdict::Broken(BrokenLink { seq, reason })
}

fn check<S: AuditStore>(s: &S, resume: Option<AuditHead>, heads: Vec<AuditHead>) -> AuditVerdict {
    s.check_audit(&AuditCheck { resume, heads })
        .expect("check the audit log")
}

/// Runs the audit-log checks. The log must be empty at the start and `open` must append with
/// [`audit_key`].
pub fn run_audit<S: AuditStore>(open: impl Fn() -> S) {
    let key = audit_key();
    let s = open();
    assert_eq!(
        s.verify_audit().expect("verify"),
        AuditVerdict::Intact {
            entries: 0,
            head_hash: None
        },
        "an empty log verifies"
    );
    assert_eq!(s.audit_len().expect("len"), 0);
    assert!(s.list_audit(1, 10).expect("list").is_empty());
    let mut appended: Vec<AuditEntry> = Vec::new();
    for (i, detail) in details().into_iter().enumerate() {
        let new = entry(i as u64 + 1, detail);
        let got = s.append_audit(new.clone()).expect("append");
        let prev = appended
            .last()
            .map_or(GENESIS_HASH.to_owned(), |e| e.hash.clone());
        assert_eq!(got.seq, i as u64 + 1, "seqs are 1, 2, 3, ...");
        assert_eq!(got.prev_hash, prev, "each entry names the previous hash");
        assert_eq!(
            got.hash,
            entry_mac(
                &key,
                &EntryFields {
                    seq: got.seq,
                    ts_ms: new.ts_ms,
                    actor: &new.actor,
                    action: &new.action,
                    target: &new.target,
                    detail: &canonical_json(&new.detail),
                    prev_hash: &prev
                }
            ),
            "the hash is the keyed MAC of the canonical encoding"
        );
        assert_eq!(
            (&got.actor, &got.action, &got.target, &got.detail, got.ts_ms),
            (&new.actor, &new.action, &new.target, &new.detail, new.ts_ms)
        );
        appended.push(got);
    }
    for bad in [
        NewAuditEntry {
            actor: String::new(),
            ..entry(9, json!(null))
        },
        NewAuditEntry {
            action: "two\nlines".into(),
            ..entry(9, json!(null))
        },
    ] {
        assert!(
            matches!(s.append_audit(bad), Err(StoreError::Invalid(_))),
            "an invalid entry is refused"
        );
    }
    drop(s);
    let s = open();
    assert_eq!(s.list_audit(1, 100).expect("list"), appended);
    assert_eq!(s.list_audit(0, 2).expect("list"), appended[..2]);
    assert_eq!(s.list_audit(3, 2).expect("list"), appended[2..4]);
    assert!(s.list_audit(6, 10).expect("list").is_empty());
    assert_eq!(s.audit_len().expect("len"), 5);
    let verdict = s.verify_audit().expect("verify");
    assert_eq!(
        verdict,
        AuditVerdict::Intact {
            entries: 5,
            head_hash: Some(appended[4].hash.clone())
        }
    );
    assert_eq!(verdict.head(), Some(head_of(&appended[4])));
    // Heads the log reaches, with their hashes, and a resumed check.
    let (h2, h5) = (head_of(&appended[1]), head_of(&appended[4]));
    assert_eq!(
        check(&s, None, vec![h2.clone(), h5.clone(), AuditHead::empty()]).head(),
        Some(h5.clone())
    );
    assert_eq!(check(&s, Some(h2.clone()), vec![]).head(), Some(h5.clone()));
    assert_eq!(check(&s, Some(h5.clone()), vec![]).head(), Some(h5.clone()));
    let beyond = AuditHead {
        seq: 7,
        hash: h5.hash.clone(),
    };
    assert_eq!(
        check(&s, None, vec![beyond.clone()]),
        broken(6, BrokenReason::Truncated { last: 5, head: 7 })
    );
    assert_eq!(
        check(&s, Some(beyond), vec![]),
        broken(6, BrokenReason::Truncated { last: 5, head: 7 })
    );
    let elsewhere = AuditHead {
        seq: 2,
        hash: h5.hash.clone(),
    };
    assert_eq!(
        check(&s, None, vec![elsewhere.clone()]),
        broken(2, BrokenReason::HeadMismatch)
    );
    assert_eq!(
        check(&s, Some(elsewhere), vec![]),
        broken(2, BrokenReason::HeadMismatch)
    );
    let sixth = s.append_audit(entry(6, json!({}))).expect("append");
    assert_eq!(
        (sixth.seq, &sixth.prev_hash),
        (6, &appended[4].hash),
        "refused entries took no seq"
    );
}

/// The rows of the log as stored (the stored detail is its canonical JSON).
fn stored_rows<S: AuditStore>(s: &S) -> Vec<StoredAuditRow> {
    s.list_audit(1, usize::MAX)
        .expect("list")
        .into_iter()
        .map(|e| StoredAuditRow {
            seq: e.seq as i64,
            ts_ms: e.ts_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: canonical_json(&e.detail),
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect()
}

/// `rows` renumbered and re-chained from index `from` on with the documented unkeyed rule, as
/// an adversary without the key would.
fn rechain_unkeyed(rows: &mut [StoredAuditRow], from: usize) {
    let mut prev = match from.checked_sub(1) {
        Some(i) => rows[i].hash.clone(),
        None => GENESIS_HASH.to_owned(),
    };
    for (i, row) in rows.iter_mut().enumerate().skip(from) {
        row.seq = i as i64 + 1;
        row.prev_hash = prev;
        row.hash = crate::audit::entry_hash(
            row.seq as u64,
            row.ts_ms,
            &row.actor,
            &row.action,
            &row.target,
            &row.detail,
            &row.prev_hash,
        );
        prev = row.hash.clone();
    }
}

/// Checks that verification finds tampering by an adversary with write access to the stored
/// rows but not to the key. `replace_rows(rows)` must make `rows` the whole stored log behind
/// the store's back. Needs a storage of its own with an empty log; `open` must append with
/// [`audit_key`].
pub fn run_audit_tamper<S: AuditStore>(
    open: impl Fn() -> S,
    replace_rows: impl Fn(&[StoredAuditRow]),
) {
    let s = open();
    for i in 1..=6 {
        s.append_audit(entry(i, json!({ "i": i }))).expect("append");
    }
    let original = stored_rows(&s);
    let head = open()
        .verify_audit()
        .expect("verify")
        .head()
        .expect("intact");
    assert_eq!(head.seq, 6);
    drop(s);

    // Drop entry 3 and recompute the documented chain: caught at 3.
    let mut dropped: Vec<StoredAuditRow> = original.clone();
    dropped.remove(2);
    rechain_unkeyed(&mut dropped, 2);
    replace_rows(&dropped);
    assert_eq!(
        open().verify_audit().expect("verify"),
        broken(3, BrokenReason::Unkeyed),
        "a log re-chained without the key is named where the key was needed"
    );
    // The whole log recomputed: caught at 1.
    let mut all = original.clone();
    rechain_unkeyed(&mut all, 0);
    replace_rows(&all);
    assert_eq!(
        open().verify_audit().expect("verify"),
        broken(1, BrokenReason::Unkeyed)
    );

    // Edit entry 4, keeping its hash.
    let mut edited = original.clone();
    edited[3].detail = r#"{"i":999}"#.into();
    replace_rows(&edited);
    assert_eq!(
        open().verify_audit().expect("verify"),
        broken(4, BrokenReason::HashMismatch),
        "a modified entry is named"
    );

    // Delete entry 2 (no re-chaining).
    let mut gap = original.clone();
    gap.remove(1);
    replace_rows(&gap);
    assert_eq!(
        open().verify_audit().expect("verify"),
        broken(2, BrokenReason::Missing { found: 3 }),
        "the first broken link is reported"
    );

    // Cut the last two: the chain alone verifies, a head shows the cut.
    replace_rows(&original[..4]);
    let s = open();
    assert!(
        matches!(
            s.verify_audit().expect("verify"),
            AuditVerdict::Intact { entries: 4, .. }
        ),
        "a cut log verifies by itself"
    );
    assert_eq!(
        check(&s, None, vec![head.clone()]),
        broken(5, BrokenReason::Truncated { last: 4, head: 6 })
    );
    assert_eq!(
        check(&s, Some(head.clone()), vec![]),
        broken(5, BrokenReason::Truncated { last: 4, head: 6 })
    );
    drop(s);

    replace_rows(&original);
    assert_eq!(
        check(&open(), None, vec![head.clone()]).head(),
        Some(head),
        "the untouched log verifies again"
    );
}

/// Checks a log written without a key and keyed later: its unkeyed entries stay verifiable,
/// entries from the key's `keyed_from` on must be keyed. `open(key)` opens the same storage
/// (empty at the start) appending with `key`, or unkeyed with `None`.
pub fn run_audit_upgrade<S: AuditStore>(open: impl Fn(Option<AuditKey>) -> S) {
    let s = open(None);
    for i in 1..=3 {
        s.append_audit(entry(i, json!({ "i": i })))
            .expect("unkeyed append");
    }
    assert!(matches!(
        s.verify_audit().expect("verify"),
        AuditVerdict::Intact { entries: 3, .. }
    ));
    drop(s);
    let key = keyed_from(4);
    let s = open(Some(key.clone()));
    assert!(
        matches!(
            s.verify_audit().expect("verify"),
            AuditVerdict::Intact { entries: 3, .. }
        ),
        "unkeyed entries below keyed_from verify with the key"
    );
    let fourth = s.append_audit(entry(4, json!(null))).expect("keyed append");
    let fifth = s.append_audit(entry(5, json!(null))).expect("keyed append");
    assert_eq!(
        fifth.hash,
        entry_mac(
            &key,
            &EntryFields {
                seq: 5,
                ts_ms: fifth.ts_ms,
                actor: &fifth.actor,
                action: &fifth.action,
                target: &fifth.target,
                detail: "null",
                prev_hash: &fourth.hash,
            }
        )
    );
    assert_eq!(
        s.verify_audit().expect("verify").head(),
        Some(head_of(&fifth))
    );
    drop(s);
    let s = open(None);
    assert_eq!(
        s.verify_audit().expect("verify"),
        broken(4, BrokenReason::HashMismatch),
        "keyed entries do not verify without the key"
    );
    assert!(
        matches!(
            s.append_audit(entry(6, json!(null))),
            Err(StoreError::Unsupported(_))
        ),
        "no unkeyed entry is appended after a keyed one"
    );
    drop(s);
    assert_eq!(
        open(Some(audit_key())).verify_audit().expect("verify"),
        broken(1, BrokenReason::Unkeyed),
        "unkeyed entries at or after keyed_from are refused"
    );
}

fn failure(i: u64) -> NewFailureEntry {
    NewFailureEntry {
        ts_ms: 1_700_000_000_000 + i as i64,
        actor: ["anonymous", "mallory"][(i % 2) as usize].into(),
        target: ["mqtt", "oauth/token"][(i % 2) as usize].into(),
        detail: json!({ "count": i, "reason": "bad credentials", "source": "192.0.2.7" }),
    }
}

/// The failure entries as stored (the stored detail is its canonical JSON).
fn stored_failures<S: AuditStore>(s: &S) -> Vec<StoredFailureRow> {
    s.list_audit_failures(0, usize::MAX)
        .expect("list failures")
        .into_iter()
        .map(|e| StoredFailureRow {
            id: e.id as i64,
            batch: e.batch as i64,
            ts_ms: e.ts_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: canonical_json(&e.detail),
        })
        .collect()
}

/// Checks the failure entries beside the chain ([`crate::audit::failures`]): batches appended
/// with the chain entry that commits to them, listing, pruning recorded in the chain, and
/// tamper detection by an adversary who can rewrite the stored failure entries
/// (`replace_failures(rows)` must make `rows` the whole stored set behind the store's back)
/// but does not hold the key. Needs a storage of its own with an empty log; `open` must
/// append with [`audit_key`].
pub fn run_audit_failures<S: AuditStore>(
    open: impl Fn() -> S,
    replace_failures: impl Fn(&[StoredFailureRow]),
) {
    let s = open();
    let admin = |i: u64| s.append_audit(entry(i, json!({ "i": i }))).expect("append");
    let batch = |ts_ms: i64, range: std::ops::RangeInclusive<u64>| {
        let entries: Vec<NewFailureEntry> = range.map(failure).collect();
        let got = s
            .append_failures(ts_ms, entries.clone())
            .expect("append failures");
        let (want, _) = batch_entry(ts_ms, &entries).expect("a valid batch");
        assert_eq!(
            (&got.actor, &got.action, &got.target, &got.detail, got.ts_ms),
            (
                &want.actor,
                &want.action,
                &want.target,
                &want.detail,
                want.ts_ms
            ),
            "a batch's chain entry is the one batch_entry describes"
        );
        got
    };
    admin(1);
    assert_eq!(batch(1_000, 1..=2).seq, 2);
    admin(3);
    assert_eq!(batch(2_000, 3..=3).seq, 4);
    let fifth = batch(3_000, 4..=6);
    assert_eq!(fifth.seq, 5);
    assert_eq!(fifth.detail["attempts"], json!(4 + 5 + 6));
    assert!(
        matches!(
            s.append_failures(4_000, vec![]),
            Err(StoreError::Invalid(_))
        ),
        "an empty batch is refused"
    );
    assert!(
        matches!(
            s.append_failures(
                4_000,
                vec![NewFailureEntry {
                    actor: String::new(),
                    ..failure(9)
                }]
            ),
            Err(StoreError::Invalid(_))
        ),
        "an invalid failure entry is refused"
    );
    drop(s);

    let s = open();
    assert_eq!(
        s.audit_len().expect("len"),
        5,
        "refused batches took no seq"
    );
    let listed = s.list_audit_failures(0, 100).expect("list failures");
    assert_eq!(
        listed.iter().map(|e| e.batch).collect::<Vec<_>>(),
        [2, 2, 4, 5, 5, 5]
    );
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    for (i, e) in listed.iter().enumerate() {
        let want = failure(i as u64 + 1);
        assert_eq!(
            (&e.actor, e.action.as_str(), &e.target, &e.detail, e.ts_ms),
            (
                &want.actor,
                "auth.failure",
                &want.target,
                &want.detail,
                want.ts_ms
            )
        );
    }
    assert_eq!(
        s.list_audit_failures(listed[2].id, 2).expect("list"),
        listed[2..4]
    );
    assert!(s
        .list_audit_failures(listed[5].id + 1, 10)
        .expect("list")
        .is_empty());
    let head = s.verify_audit().expect("verify").head().expect("intact");
    assert_eq!(head.seq, 5);

    // Tampering with the failure entries, by someone without the key.
    let original = stored_failures(&s);
    drop(s);
    let verdict = |rows: &[StoredFailureRow]| {
        replace_failures(rows);
        open().verify_audit().expect("verify")
    };
    let mut edited = original.clone();
    edited[4].detail = r#"{"count":1,"reason":"bad credentials","source":"192.0.2.7"}"#.into();
    assert_eq!(
        verdict(&edited),
        broken(5, BrokenReason::FailuresMismatch),
        "an edited failure entry is reported at its batch"
    );
    let mut fewer = original.clone();
    fewer.remove(1);
    assert_eq!(
        verdict(&fewer),
        broken(2, BrokenReason::FailuresMismatch),
        "a removed failure entry is reported at its batch"
    );
    let without_4: Vec<_> = original.iter().filter(|r| r.batch != 4).cloned().collect();
    assert_eq!(
        verdict(&without_4),
        broken(4, BrokenReason::FailuresMissing),
        "a batch's entries cannot be deleted without a prune"
    );
    let mut forged = original.clone();
    forged.push(StoredFailureRow {
        id: original[5].id + 1,
        batch: 3,
        ..original[0].clone()
    });
    assert_eq!(
        verdict(&forged),
        broken(3, BrokenReason::FailuresUnlisted),
        "a failure entry of no batch is reported"
    );
    assert_eq!(
        verdict(&original).head(),
        Some(head.clone()),
        "the untouched entries verify again"
    );

    // Pruning: the oldest batches appended before the cut, recorded in the chain.
    let s = open();
    assert_eq!(s.prune_failures(1_500, 9_000).expect("prune"), 2);
    assert_eq!(
        s.list_audit_failures(0, 100)
            .expect("list")
            .iter()
            .map(|e| e.batch)
            .collect::<Vec<_>>(),
        [4, 5, 5, 5]
    );
    let pruned = s.list_audit(6, 10).expect("list");
    assert_eq!(pruned.len(), 1, "a prune appends one chain entry");
    assert_eq!(
        (
            pruned[0].actor.as_str(),
            pruned[0].action.as_str(),
            &pruned[0].detail
        ),
        (
            "system",
            "audit.prune",
            &json!({ "through": 2, "entries": 2, "before_ms": 1_500 })
        )
    );
    assert_eq!(s.prune_failures(1_500, 9_001).expect("prune"), 0);
    assert_eq!(
        s.audit_len().expect("len"),
        6,
        "an empty prune records nothing"
    );
    assert_eq!(
        s.verify_audit().expect("verify").head().map(|h| h.seq),
        Some(6),
        "a pruned log verifies"
    );
    assert_eq!(
        check(&s, Some(head), vec![]).head().map(|h| h.seq),
        Some(6),
        "and so does a check resumed before the prune"
    );
    drop(s);
    assert_eq!(
        verdict(&original),
        broken(2, BrokenReason::FailuresUnlisted),
        "pruned entries put back are reported"
    );
    let kept: Vec<_> = original.iter().filter(|r| r.batch > 2).cloned().collect();
    replace_failures(&kept);
    let s = open();
    assert_eq!(s.prune_failures(3_000, 9_002).expect("prune"), 1);
    assert_eq!(
        s.list_audit(7, 10).expect("list")[0].detail["through"],
        json!(4),
        "a prune stops at the first batch appended at or after the cut"
    );
    assert_eq!(
        s.verify_audit().expect("verify").head().map(|h| h.seq),
        Some(7)
    );
    let later = batch_after(&s);
    assert_eq!(
        s.verify_audit().expect("verify").head().map(|h| h.seq),
        Some(later)
    );
    drop(s);
    let left = stored_failures(&open());
    assert_eq!(
        left.iter().map(|r| r.batch).collect::<Vec<_>>(),
        [5, 5, 5, later as i64],
        "ids are not reused after a prune"
    );
    assert!(left[3].id > original[5].id);
}

/// Appends one more batch; returns its seq.
fn batch_after<S: AuditStore>(s: &S) -> u64 {
    s.append_failures(10_000, vec![failure(7)])
        .expect("append failures")
        .seq
}
