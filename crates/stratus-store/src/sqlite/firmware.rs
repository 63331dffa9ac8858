//! Firmware metadata, campaigns, assignments and status history in SQLite.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{parse_json, sql_int};
use crate::firmware::{
    check_firmware_id, check_reason, check_state, Assignment, Campaign, CampaignDevice,
    FirmwareEvent, FirmwareRecord, NewCampaign,
};
use crate::{check_id, StoreError};

fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.into(),
    }
}

fn size_of(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative firmware size {n}")))
}

fn read_record(r: &Row<'_>) -> Result<FirmwareRecord, StoreError> {
    let manifest: String = r.get(5)?;
    Ok(FirmwareRecord {
        id: r.get(0)?,
        version: r.get(1)?,
        size: size_of(r.get(2)?)?,
        hardware: r.get(3)?,
        key_id: r.get(4)?,
        manifest: parse_json(&manifest, "firmware manifest")?,
        created_at_ms: r.get(6)?,
    })
}

const RECORD_COLUMNS: &str = "id, version, size, hardware, key_id, manifest, created_at_ms";

pub(super) fn put(conn: &Connection, record: &FirmwareRecord) -> Result<(), StoreError> {
    record.validate()?;
    let size = i64::try_from(record.size)
        .map_err(|_| StoreError::Invalid("firmware size is too large".into()))?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO firmware (id, version, size, hardware, key_id, manifest, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            record.id,
            record.version,
            size,
            record.hardware,
            record.key_id,
            record.manifest.to_string(),
            record.created_at_ms
        ])?;
    if inserted == 0 {
        return Err(StoreError::Conflict {
            kind: "firmware",
            id: record.id.clone(),
        });
    }
    Ok(())
}

pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<FirmwareRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM firmware WHERE id = ?1"
    ))?;
    let mut rows = stmt.query(params![id])?;
    match rows.next()? {
        Some(row) => read_record(row).map(Some),
        None => Ok(None),
    }
}

pub(super) fn list(conn: &Connection) -> Result<Vec<FirmwareRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM firmware ORDER BY created_at_ms, id"
    ))?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(read_record(row)?);
    }
    Ok(out)
}

fn append_history(
    conn: &Connection,
    device_id: &str,
    campaign_id: Option<&str>,
    firmware_id: &str,
    state: &str,
    reason: Option<&str>,
    at_ms: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO firmware_history (device_id, campaign_id, firmware_id, state, reason, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        device_id,
        campaign_id,
        firmware_id,
        state,
        reason,
        at_ms
    ])?;
    Ok(())
}

pub(super) fn create_campaign(conn: &Connection, c: &NewCampaign) -> Result<(), StoreError> {
    c.validate()?;
    if get(conn, &c.firmware_id)?.is_none() {
        return Err(not_found("firmware", &c.firmware_id));
    }
    let seq: i64 = conn
        .prepare_cached("SELECT coalesce(max(seq), 0) + 1 FROM firmware_campaigns")?
        .query_row([], |r| r.get(0))?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO firmware_campaigns (id, firmware_id, selector, created_at_ms, seq) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            c.id,
            c.firmware_id,
            c.selector.as_ref().map(|s| s.to_string()),
            c.created_at_ms,
            seq
        ])?;
    if inserted == 0 {
        return Err(StoreError::Conflict {
            kind: "campaign",
            id: c.id.clone(),
        });
    }
    for device in &c.devices {
        let exists = conn
            .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
            .query_row(params![device], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Err(not_found("device", device));
        }
        let added = conn
            .prepare_cached(
                "INSERT INTO firmware_campaign_devices \
                 (campaign_id, device_id, state, reason, updated_at_ms) \
                 VALUES (?1, ?2, 'assigned', NULL, ?3) ON CONFLICT DO NOTHING",
            )?
            .execute(params![c.id, device, c.created_at_ms])?;
        if added == 0 {
            continue; // listed twice
        }
        conn.prepare_cached(
            "INSERT INTO firmware_assignments (device_id, campaign_id) VALUES (?1, ?2) \
             ON CONFLICT (device_id) DO UPDATE SET campaign_id = excluded.campaign_id",
        )?
        .execute(params![device, c.id])?;
        append_history(
            conn,
            device,
            Some(&c.id),
            &c.firmware_id,
            "assigned",
            None,
            c.created_at_ms,
        )?;
    }
    Ok(())
}

pub(super) fn record_status(
    conn: &Connection,
    device_id: &str,
    firmware_id: &str,
    state: &str,
    reason: Option<&str>,
    at_ms: i64,
) -> Result<(), StoreError> {
    check_id("device", device_id)?;
    check_firmware_id(firmware_id)?;
    check_state(state)?;
    check_reason(reason)?;
    let exists = conn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
        .query_row(params![device_id], |_| Ok(()))
        .optional()?
        .is_some();
    if !exists {
        return Err(not_found("device", device_id));
    }
    let current = assignment(conn, device_id)?.filter(|a| a.firmware_id == firmware_id);
    let campaign_id = current.as_ref().map(|a| a.campaign_id.clone());
    if let Some(campaign) = &campaign_id {
        conn.prepare_cached(
            "UPDATE firmware_campaign_devices SET state = ?3, reason = ?4, updated_at_ms = ?5 \
             WHERE campaign_id = ?1 AND device_id = ?2",
        )?
        .execute(params![campaign, device_id, state, reason, at_ms])?;
    }
    append_history(
        conn,
        device_id,
        campaign_id.as_deref(),
        firmware_id,
        state,
        reason,
        at_ms,
    )
}

fn campaign_devices(conn: &Connection, id: &str) -> Result<Vec<CampaignDevice>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, state, reason, updated_at_ms FROM firmware_campaign_devices \
         WHERE campaign_id = ?1 ORDER BY device_id",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok(CampaignDevice {
            device_id: r.get(0)?,
            state: r.get(1)?,
            reason: r.get(2)?,
            updated_at_ms: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn read_campaign(conn: &Connection, r: &Row<'_>) -> Result<Campaign, StoreError> {
    let id: String = r.get(0)?;
    let selector: Option<String> = r.get(2)?;
    Ok(Campaign {
        devices: campaign_devices(conn, &id)?,
        firmware_id: r.get(1)?,
        selector: selector
            .map(|s| parse_json(&s, "campaign selector"))
            .transpose()?,
        created_at_ms: r.get(3)?,
        id,
    })
}

pub(super) fn get_campaign(conn: &Connection, id: &str) -> Result<Option<Campaign>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, firmware_id, selector, created_at_ms FROM firmware_campaigns WHERE id = ?1",
    )?;
    let mut rows = stmt.query(params![id])?;
    match rows.next()? {
        Some(row) => read_campaign(conn, row).map(Some),
        None => Ok(None),
    }
}

pub(super) fn list_campaigns(conn: &Connection) -> Result<Vec<Campaign>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, firmware_id, selector, created_at_ms FROM firmware_campaigns ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(read_campaign(conn, row)?);
    }
    Ok(out)
}

pub(super) fn assignment(
    conn: &Connection,
    device_id: &str,
) -> Result<Option<Assignment>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT a.device_id, a.campaign_id, c.firmware_id, d.state, d.reason, d.updated_at_ms \
             FROM firmware_assignments a \
             JOIN firmware_campaigns c ON c.id = a.campaign_id \
             JOIN firmware_campaign_devices d \
               ON d.campaign_id = a.campaign_id AND d.device_id = a.device_id \
             WHERE a.device_id = ?1",
        )?
        .query_row(params![device_id], |r| {
            Ok(Assignment {
                device_id: r.get(0)?,
                campaign_id: r.get(1)?,
                firmware_id: r.get(2)?,
                state: r.get(3)?,
                reason: r.get(4)?,
                updated_at_ms: r.get(5)?,
            })
        })
        .optional()?)
}

pub(super) fn history(
    conn: &Connection,
    device_id: &str,
    limit: usize,
) -> Result<Vec<FirmwareEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, device_id, campaign_id, firmware_id, state, reason, at_ms \
         FROM firmware_history WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![device_id, sql_int(limit)], |r| {
        let seq: i64 = r.get(0)?;
        Ok(FirmwareEvent {
            seq: u64::try_from(seq).unwrap_or(0),
            device_id: r.get(1)?,
            campaign_id: r.get(2)?,
            firmware_id: r.get(3)?,
            state: r.get(4)?,
            reason: r.get(5)?,
            at_ms: r.get(6)?,
        })
    })?;
    let mut out: Vec<FirmwareEvent> = rows.collect::<Result<_, _>>()?;
    out.reverse();
    Ok(out)
}

/// Forgets a deleted device's assignment (its history stays with the campaigns).
pub(super) fn delete_device(conn: &Connection, device_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM firmware_assignments WHERE device_id = ?1")?
        .execute(params![device_id])?;
    Ok(())
}
