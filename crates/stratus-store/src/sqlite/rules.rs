//! Rules and alarms in SQLite.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{parse_json, sql_int};
use crate::rules::{Alarm, AlarmFilter, AlarmQuery, AlarmState, StoredRule};
use crate::StoreError;

const ALARM_COLUMNS: &str = "id, rule_id, device_id, severity, state, message, value, \
     raised_at_ms, acked_at_ms, cleared_at_ms, version";

pub(super) fn put_rule(conn: &Connection, rule: &StoredRule) -> Result<(), StoreError> {
    rule.validate()?;
    conn.prepare_cached(
        "INSERT INTO rules (id, definition, created_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET definition = excluded.definition",
    )?
    .execute(params![
        rule.id,
        rule.definition.to_string(),
        rule.created_at_ms
    ])?;
    Ok(())
}

pub(super) fn delete_rule(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached("DELETE FROM rules WHERE id = ?1")?
        .execute(params![id])?;
    if changed == 0 {
        return Err(StoreError::NotFound {
            kind: "rule",
            id: id.into(),
        });
    }
    Ok(())
}

fn read_rule(r: &Row<'_>) -> Result<StoredRule, StoreError> {
    let definition: String = r.get(1)?;
    Ok(StoredRule {
        id: r.get(0)?,
        definition: parse_json(&definition, "rule")?,
        created_at_ms: r.get(2)?,
    })
}

pub(super) fn rules(conn: &Connection) -> Result<Vec<StoredRule>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, definition, created_at_ms FROM rules ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_rule(r)?);
    }
    Ok(out)
}

pub(super) fn rule(conn: &Connection, id: &str) -> Result<Option<StoredRule>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, definition, created_at_ms FROM rules WHERE id = ?1")?;
    let mut rows = stmt.query(params![id])?;
    match rows.next()? {
        Some(r) => read_rule(r).map(Some),
        None => Ok(None),
    }
}

/// Stores `alarm` unless a version at least as new is stored: 1 if stored, 0 if not.
pub(super) fn put_alarm(conn: &Connection, alarm: &Alarm) -> Result<u64, StoreError> {
    alarm.validate()?;
    let version = i64::try_from(alarm.version)
        .map_err(|_| StoreError::Invalid(format!("alarm version {} too large", alarm.version)))?;
    let changed = conn
        .prepare_cached(&format!(
            "INSERT INTO alarms ({ALARM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (id) DO UPDATE SET severity = excluded.severity,
                 state = excluded.state, message = excluded.message, value = excluded.value,
                 acked_at_ms = excluded.acked_at_ms, cleared_at_ms = excluded.cleared_at_ms,
                 version = excluded.version
             WHERE excluded.version > alarms.version"
        ))?
        .execute(params![
            alarm.id,
            alarm.rule,
            alarm.device,
            alarm.severity,
            alarm.state.as_str(),
            alarm.message,
            alarm.value.to_string(),
            alarm.raised_at_ms,
            alarm.acked_at_ms,
            alarm.cleared_at_ms,
            version
        ])?;
    Ok(changed as u64)
}

fn read_alarm(r: &Row<'_>) -> Result<Alarm, StoreError> {
    let state: String = r.get(4)?;
    let value: String = r.get(6)?;
    let version: i64 = r.get(10)?;
    Ok(Alarm {
        id: r.get(0)?,
        rule: r.get(1)?,
        device: r.get(2)?,
        severity: r.get(3)?,
        state: AlarmState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("alarm state {state:?}")))?,
        message: r.get(5)?,
        value: parse_json(&value, "alarm value")?,
        raised_at_ms: r.get(7)?,
        acked_at_ms: r.get(8)?,
        cleared_at_ms: r.get(9)?,
        version: u64::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("alarm version {version}")))?,
    })
}

pub(super) fn alarms(conn: &Connection, query: &AlarmQuery) -> Result<Vec<Alarm>, StoreError> {
    let (state, open_only) = match query.filter {
        AlarmFilter::Any => (None, false),
        AlarmFilter::Open => (None, true),
        AlarmFilter::State(s) => (Some(s.as_str()), false),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ALARM_COLUMNS} FROM alarms
         WHERE (?1 IS NULL OR device_id = ?1) AND (?2 IS NULL OR rule_id = ?2)
           AND (?3 IS NULL OR state = ?3) AND (?4 = 0 OR state <> 'cleared')
         ORDER BY raised_at_ms DESC, id DESC LIMIT ?5"
    ))?;
    let mut rows = stmt.query(params![
        query.device,
        query.rule,
        state,
        open_only,
        sql_int(query.limit)
    ])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read_alarm(r)?);
    }
    Ok(out)
}

pub(super) fn alarm(conn: &Connection, id: &str) -> Result<Option<Alarm>, StoreError> {
    conn.prepare_cached(&format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?1"))?
        .query_row(params![id], |r| Ok(read_alarm(r)))
        .optional()?
        .transpose()
}
