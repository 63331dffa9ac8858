//! The audit log in SQLite: appending inside the write transaction, listing, verifying.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{parse_json, sql_int};
use crate::audit::{
    canonical_json, entry_hash, AuditEntry, AuditVerdict, BrokenLink, BrokenReason, ChainVerifier,
    NewAuditEntry, StoredAuditRow, GENESIS_HASH,
};
use crate::StoreError;

const COLUMNS: &str = "seq, ts_ms, actor, action, target, detail, prev_hash, hash";

pub(super) fn append(conn: &Connection, entry: &NewAuditEntry) -> Result<AuditEntry, StoreError> {
    entry.validate()?;
    let last: Option<(i64, String)> = conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, prev_hash) = match last {
        None => (1u64, GENESIS_HASH.to_owned()),
        Some((seq, hash)) => {
            let seq = u64::try_from(seq)
                .ok()
                .and_then(|s| s.checked_add(1))
                .ok_or_else(|| StoreError::Corrupt(format!("audit seq {seq} out of range")))?;
            (seq, hash)
        }
    };
    let detail = canonical_json(&entry.detail);
    let hash = entry_hash(
        seq,
        entry.ts_ms,
        &entry.actor,
        &entry.action,
        &entry.target,
        &detail,
        &prev_hash,
    );
    conn.prepare_cached(&format!(
        "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?
    .execute(params![
        seq,
        entry.ts_ms,
        entry.actor,
        entry.action,
        entry.target,
        detail,
        prev_hash,
        hash
    ])?;
    Ok(AuditEntry {
        seq,
        ts_ms: entry.ts_ms,
        actor: entry.actor.clone(),
        action: entry.action.clone(),
        target: entry.target.clone(),
        detail: entry.detail.clone(),
        prev_hash,
        hash,
    })
}

fn read_row(r: &Row<'_>) -> rusqlite::Result<StoredAuditRow> {
    Ok(StoredAuditRow {
        seq: r.get(0)?,
        ts_ms: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        detail: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

pub(super) fn list(
    conn: &Connection,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let from = i64::try_from(from_seq).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let mut rows = stmt.query(params![from, sql_int(limit)])?;
    let mut entries = Vec::new();
    while let Some(r) = rows.next()? {
        let row = read_row(r)?;
        entries.push(AuditEntry {
            seq: u64::try_from(row.seq)
                .map_err(|_| StoreError::Corrupt(format!("audit seq {} out of range", row.seq)))?,
            ts_ms: row.ts_ms,
            detail: parse_json(&row.detail, "audit detail")?,
            actor: row.actor,
            action: row.action,
            target: row.target,
            prev_hash: row.prev_hash,
            hash: row.hash,
        });
    }
    Ok(entries)
}

pub(super) fn verify(conn: &Connection) -> Result<AuditVerdict, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut verifier = ChainVerifier::new();
    while let Some(r) = rows.next()? {
        let checked = match read_row(r) {
            Ok(row) => verifier.check(&row),
            // A column of the wrong type (rewritten by hand): this entry cannot verify.
            Err(_) => Err(BrokenLink {
                seq: verifier.next_seq(),
                reason: BrokenReason::Unreadable,
            }),
        };
        if let Err(broken) = checked {
            return Ok(AuditVerdict::Broken(broken));
        }
    }
    Ok(verifier.finish())
}
