//! The audit-log checks: the keyed chain as appended, listing, verification against heads,
//! logs keyed after the fact, and tamper detection by an adversary who can rewrite the stored
//! rows (through a backend-specific way to replace them) but does not hold the key.

use serde_json::json;

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
