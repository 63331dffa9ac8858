//! The audit log in SQLite: appending inside the write transaction, listing, verifying; the
//! failure entries beside the chain in `audit_failures` (see [`crate::audit::failures`]).

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{parse_json, sql_int};
use crate::audit::failures::{
    batch_entry, prune_entry, FailureCheck, FailureEntry, NewFailureEntry, StoredFailureRow,
    FAILURE_ACTION,
};
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

/// Runs `check` in the snapshot of `conn`'s open read transaction: the chain, then the failure
/// entries of the batches it checked.
pub(super) fn check(
    conn: &Connection,
    key: Option<&AuditKey>,
    check: &AuditCheck,
) -> Result<AuditVerdict, StoreError> {
    let mut verifier = ChainVerifier::with_check(key, check, len(conn)?);
    let mut failures = FailureCheck::new(verifier.next_seq());
    let from = i64::try_from(verifier.next_seq()).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit WHERE seq >= ?1 ORDER BY seq"
    ))?;
    let mut rows = stmt.query([from])?;
    while let Some(r) = rows.next()? {
        let checked = match read_row(r) {
            Ok(row) => verifier.check(&row).and_then(|()| {
                let seq = u64::try_from(row.seq).unwrap_or(0);
                failures.note(seq, &row.action, &row.detail)
            }),
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
    let verdict = verifier.finish();
    if let AuditVerdict::Broken(_) = verdict {
        return Ok(verdict);
    }
    let from = i64::try_from(failures.rows_from()).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!(
        "SELECT {FAILURE_COLUMNS} FROM audit_failures WHERE batch >= ?1 ORDER BY batch, id"
    ))?;
    let mut rows = stmt.query([from])?;
    while let Some(r) = rows.next()? {
        let checked = match read_failure_row(r) {
            Ok(row) => failures.check(&row),
            Err(_) => Err(BrokenLink {
                seq: r
                    .get::<_, i64>(1)
                    .ok()
                    .and_then(|b| u64::try_from(b).ok())
                    .unwrap_or(0),
                reason: BrokenReason::Unreadable,
            }),
        };
        if let Err(broken) = checked {
            return Ok(AuditVerdict::Broken(broken));
        }
    }
    Ok(match failures.finish() {
        Ok(()) => verdict,
        Err(broken) => AuditVerdict::Broken(broken),
    })
}

const FAILURE_COLUMNS: &str = "id, batch, ts_ms, actor, action, target, detail";

fn read_failure_row(r: &Row<'_>) -> rusqlite::Result<StoredFailureRow> {
    Ok(StoredFailureRow {
        id: r.get(0)?,
        batch: r.get(1)?,
        ts_ms: r.get(2)?,
        actor: r.get(3)?,
        action: r.get(4)?,
        target: r.get(5)?,
        detail: r.get(6)?,
    })
}

/// Appends a batch: its chain entry, then its failure entries.
pub(super) fn append_failures(
    conn: &Connection,
    key: Option<&AuditKey>,
    ts_ms: i64,
    entries: &[NewFailureEntry],
) -> Result<AuditEntry, StoreError> {
    let (entry, details) = batch_entry(ts_ms, entries)?;
    let appended = append(conn, key, &entry)?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO audit_failures (batch, ts_ms, actor, action, target, detail) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (e, detail) in entries.iter().zip(&details) {
        insert.execute(params![
            appended.seq,
            e.ts_ms,
            e.actor,
            FAILURE_ACTION,
            e.target,
            detail
        ])?;
    }
    Ok(appended)
}

/// Deletes the failure entries of the oldest batches appended before `before_ms` (in seq order,
/// up to the first one that was not) and records the prune in the chain.
pub(super) fn prune_failures(
    conn: &Connection,
    key: Option<&AuditKey>,
    before_ms: i64,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let mut through = None;
    {
        let mut batches =
            conn.prepare_cached("SELECT batch FROM audit_failures GROUP BY batch ORDER BY batch")?;
        let mut appended = conn.prepare_cached("SELECT ts_ms FROM audit WHERE seq = ?1")?;
        let mut rows = batches.query([])?;
        while let Some(r) = rows.next()? {
            let batch: i64 = r.get(0)?;
            let at: Option<i64> = appended.query_row([batch], |r| r.get(0)).optional()?;
            match at {
                // A batch without its chain entry is not this prune's to judge: verification
                // reports it.
                Some(at) if at < before_ms => through = Some(batch),
                _ => break,
            }
        }
    }
    let Some(through) = through else {
        return Ok(0);
    };
    let deleted = conn
        .prepare_cached("DELETE FROM audit_failures WHERE batch <= ?1")?
        .execute([through])?;
    let deleted = deleted as u64;
    let through = u64::try_from(through)
        .map_err(|_| StoreError::Corrupt(format!("failure batch {through} out of range")))?;
    append(conn, key, &prune_entry(now_ms, through, deleted, before_ms))?;
    Ok(deleted)
}

pub(super) fn list_failures(
    conn: &Connection,
    from_id: u64,
    limit: usize,
) -> Result<Vec<FailureEntry>, StoreError> {
    let from = i64::try_from(from_id).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {FAILURE_COLUMNS} FROM audit_failures WHERE id >= ?1 ORDER BY id LIMIT ?2"
    ))?;
    let mut rows = stmt.query(params![from, sql_int(limit)])?;
    let mut entries = Vec::new();
    while let Some(r) = rows.next()? {
        let row = read_failure_row(r)?;
        let number = |n: i64, what: &str| {
            u64::try_from(n)
                .map_err(|_| StoreError::Corrupt(format!("failure {what} {n} out of range")))
        };
        entries.push(FailureEntry {
            id: number(row.id, "id")?,
            batch: number(row.batch, "batch")?,
            ts_ms: row.ts_ms,
            detail: parse_json(&row.detail, "failure detail")?,
            actor: row.actor,
            action: row.action,
            target: row.target,
        });
    }
    Ok(entries)
}
