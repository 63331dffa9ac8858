//! The audit-log checks: the hash chain as appended, listing, verification, and tamper
//! detection through a backend-specific way to change what is stored.

use serde_json::json;

use crate::audit::{
    canonical_json, entry_hash, AuditEntry, AuditStore, AuditVerdict, BrokenLink, BrokenReason,
    NewAuditEntry, GENESIS_HASH,
};
use crate::StoreError;

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

/// Runs the audit-log checks. The log must be empty at the start.
pub fn run_audit<S: AuditStore>(open: impl Fn() -> S) {
    let s = open();
    assert_eq!(
        s.verify_audit().expect("verify"),
        AuditVerdict::Intact {
            entries: 0,
            head_hash: None
        },
        "an empty log verifies"
    );
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
            entry_hash(
                got.seq,
                new.ts_ms,
                &new.actor,
                &new.action,
                &new.target,
                &canonical_json(&new.detail),
                &prev
            ),
            "the hash is over the canonical encoding"
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
    assert_eq!(
        s.verify_audit().expect("verify"),
        AuditVerdict::Intact {
            entries: 5,
            head_hash: Some(appended[4].hash.clone())
        }
    );
    let sixth = s.append_audit(entry(6, json!({}))).expect("append");
    assert_eq!(
        (sixth.seq, &sixth.prev_hash),
        (6, &appended[4].hash),
        "refused entries took no seq"
    );
}

/// Checks that verification finds tampering. `alter_detail(seq)` must change the stored
/// detail of entry `seq` behind the store's back (leaving its hash), `delete_entry(seq)` must
/// remove the entry. Needs a storage of its own with an empty log.
pub fn run_audit_tamper<S: AuditStore>(
    open: impl Fn() -> S,
    alter_detail: impl Fn(u64),
    delete_entry: impl Fn(u64),
) {
    let s = open();
    let mut hashes = Vec::new();
    for i in 1..=6 {
        hashes.push(
            s.append_audit(entry(i, json!({ "i": i })))
                .expect("append")
                .hash,
        );
    }
    assert!(matches!(
        s.verify_audit().expect("verify"),
        AuditVerdict::Intact { entries: 6, .. }
    ));
    drop(s);
    // Truncation cannot be seen from the chain alone: the head hash tells.
    delete_entry(6);
    assert_eq!(
        open().verify_audit().expect("verify"),
        AuditVerdict::Intact {
            entries: 5,
            head_hash: Some(hashes[4].clone())
        },
        "a truncated log verifies, with an older head hash"
    );
    alter_detail(4);
    assert_eq!(
        open().verify_audit().expect("verify"),
        AuditVerdict::Broken(BrokenLink {
            seq: 4,
            reason: BrokenReason::HashMismatch
        }),
        "a modified entry is named"
    );
    delete_entry(2);
    assert_eq!(
        open().verify_audit().expect("verify"),
        AuditVerdict::Broken(BrokenLink {
            seq: 2,
            reason: BrokenReason::Missing { found: 3 }
        }),
        "the first broken link is reported"
    );
}
