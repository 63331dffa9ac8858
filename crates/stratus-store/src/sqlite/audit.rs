//! The audit log in SQLite: appending inside the write transaction, listing, verifying.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{parse_json, sql_int};
use crate::audit::{
    next_entry, AuditCheck, AuditEntry, AuditKey, AuditVerdict, BrokenLink, BrokenReason,
    ChainVerifier, NewAuditEntry, StoredAuditRow,
};
use crate::StoreError;

const COLUMNS: &str = "seq, ts_ms, actor, action, target, detail, prev_hash, hash";

pub(super) fn append(
    conn: &Connection,
    key: Option<&AuditKey>,
    entry: &NewAuditEntry,
) -> Result<AuditEntry, StoreError> {
    // With a key only the newest seq and hash matter (a damaged newest row must not stop
    // appends); without one, next_entry checks that the newest row is unkeyed.
    let last = if key.is_some() {
        conn.prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| {
                Ok(StoredAuditRow {
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                    ..StoredAuditRow::default()
                })
            })
            .optional()?
    } else {
        conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"
        ))?
        .query_row([], read_row)
        .optional()?
    };
    let (appended, detail) = next_entry(key, last.as_ref(), entry)?;
    conn.prepare_cached(&format!(
        "INSERT INTO audit ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?
    .execute(params![
        appended.seq,
        appended.ts_ms,
        appended.actor,
        appended.action,
        appended.target,
        detail,
        appended.prev_hash,
        appended.hash
    ])?;
    Ok(appended)
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

pub(super) fn len(conn: &Connection) -> Result<u64, StoreError> {
    let max: Option<i64> = conn
        .prepare_cached("SELECT max(seq) FROM audit")?
        .query_row([], |r| r.get(0))?;
    Ok(max.map_or(0, |m| u64::try_from(m).unwrap_or(0)))
}

/// Runs `check` in the snapshot of `conn`'s open read transaction.
pub(super) fn check(
    conn: &Connection,
    key: Option<&AuditKey>,
    check: &AuditCheck,
) -> Result<AuditVerdict, StoreError> {
    let mut verifier = ChainVerifier::with_check(key, check, len(conn)?);
    let from = i64::try_from(verifier.next_seq()).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit WHERE seq >= ?1 ORDER BY seq"
    ))?;
    let mut rows = stmt.query([from])?;
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
