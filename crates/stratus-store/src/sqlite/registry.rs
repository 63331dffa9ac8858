//! Devices, OAuth clients and revoked tokens in SQLite.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde_json::{Map, Value as Json};

use super::{parse_json, sql_int};
use crate::clients::{check_jti, OAuthClient};
use crate::devices::{
    check_secret_hash, AttributeUpdate, DesiredConfig, Device, NewDevice, ReportedConfig,
};
use crate::StoreError;

const DEVICE_COLUMNS: &str = "id, secret_hash, attributes, created_at_ms, desired_version, \
     desired, desired_updated_ms, reported, reported_updated_ms, firmware, last_seen_ms, \
     require_freshness";

fn read_device(r: &Row<'_>) -> Result<Device, StoreError> {
    let attributes: String = r.get(2)?;
    let desired_version: i64 = r.get(4)?;
    let desired: String = r.get(5)?;
    let reported: Option<String> = r.get(7)?;
    let reported_updated: Option<i64> = r.get(8)?;
    let firmware: Option<String> = r.get(9)?;
    Ok(Device {
        id: r.get(0)?,
        secret_hash: r.get(1)?,
        attributes: parse_json(&attributes, "device attributes")?,
        created_at_ms: r.get(3)?,
        desired: DesiredConfig {
            version: u64::try_from(desired_version).map_err(|_| {
                StoreError::Corrupt(format!("negative config version {desired_version}"))
            })?,
            value: parse_json(&desired, "desired config")?,
            updated_at_ms: r.get(6)?,
        },
        reported: match reported {
            Some(text) => Some(ReportedConfig {
                value: parse_json(&text, "reported config")?,
                updated_at_ms: reported_updated.unwrap_or(0),
            }),
            None => None,
        },
        firmware: firmware
            .map(|text| parse_json(&text, "firmware state"))
            .transpose()?,
        last_seen_ms: r.get(10)?,
        require_freshness: r.get::<_, i64>(11)? != 0,
    })
}

pub(super) fn get_device(conn: &Connection, id: &str) -> Result<Option<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))?;
    let mut rows = stmt.query(params![id])?;
    match rows.next()? {
        Some(row) => read_device(row).map(Some),
        None => Ok(None),
    }
}

fn existing_device(conn: &Connection, id: &str) -> Result<Device, StoreError> {
    get_device(conn, id)?.ok_or_else(|| not_found("device", id))
}

fn not_found(kind: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        id: id.into(),
    }
}

/// Fails with `NotFound` when the statement changed no row.
fn changed_one(changed: usize, kind: &'static str, id: &str) -> Result<(), StoreError> {
    if changed == 0 {
        Err(not_found(kind, id))
    } else {
        Ok(())
    }
}

pub(super) fn list_devices(
    conn: &Connection,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<Device>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let mut rows = stmt.query(params![after.unwrap_or(""), sql_int(limit)])?;
    let mut devices = Vec::new();
    while let Some(row) = rows.next()? {
        devices.push(read_device(row)?);
    }
    Ok(devices)
}

pub(super) fn device_count(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Whether a device or a client has this id (they share one id space).
fn id_taken(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM devices WHERE id = ?1 UNION ALL SELECT 1 FROM oauth_clients WHERE client_id = ?1",
        )?
        .exists(params![id])?)
}

pub(super) fn create_device(conn: &Connection, new: &NewDevice) -> Result<Device, StoreError> {
    new.validate()?;
    if id_taken(conn, &new.id)? {
        return Err(StoreError::Conflict {
            kind: "device",
            id: new.id.clone(),
        });
    }
    let attributes = new.attributes_or_empty();
    let desired = Json::Object(Map::new());
    conn.prepare_cached(
        "INSERT INTO devices (id, secret_hash, attributes, created_at_ms, desired_version, desired, desired_updated_ms)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?4)",
    )?
    .execute(params![
        new.id,
        new.secret_hash,
        attributes.to_string(),
        new.created_at_ms,
        desired.to_string()
    ])?;
    Ok(Device {
        id: new.id.clone(),
        secret_hash: new.secret_hash.clone(),
        attributes,
        created_at_ms: new.created_at_ms,
        desired: DesiredConfig {
            version: 0,
            value: desired,
            updated_at_ms: new.created_at_ms,
        },
        reported: None,
        firmware: None,
        last_seen_ms: None,
        require_freshness: false,
    })
}

pub(super) fn update_attributes(
    conn: &Connection,
    id: &str,
    update: &AttributeUpdate,
) -> Result<Device, StoreError> {
    let mut device = existing_device(conn, id)?;
    device.attributes = update.apply(device.attributes)?;
    conn.prepare_cached("UPDATE devices SET attributes = ?2 WHERE id = ?1")?
        .execute(params![id, device.attributes.to_string()])?;
    Ok(device)
}

pub(super) fn set_device_secret(conn: &Connection, id: &str, hash: &str) -> Result<(), StoreError> {
    check_secret_hash(hash)?;
    let changed = conn
        .prepare_cached("UPDATE devices SET secret_hash = ?2 WHERE id = ?1")?
        .execute(params![id, hash])?;
    changed_one(changed, "device", id)
}

/// Adds `devices.coap_psk` (a sealed CoAPS key, see [`Write::SetCoapPsk`]) to a database
/// created before it existed. Older Stratus versions ignore the column.
///
/// [`Write::SetCoapPsk`]: crate::Write::SetCoapPsk
pub(super) fn add_coap_psk_column(conn: &Connection) -> Result<(), StoreError> {
    let present: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name = 'coap_psk'",
        [],
        |r| r.get(0),
    )?;
    if present == 0 {
        conn.execute_batch("ALTER TABLE devices ADD COLUMN coap_psk BLOB")?;
    }
    Ok(())
}

/// Adds `devices.require_freshness` (a device's own replay policy, see
/// [`Write::SetRequireFreshness`]) to a database created before it existed: 0 for every
/// device already there. Older Stratus versions ignore the column.
///
/// [`Write::SetRequireFreshness`]: crate::Write::SetRequireFreshness
pub(super) fn add_require_freshness_column(conn: &Connection) -> Result<(), StoreError> {
    let present: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name = 'require_freshness'",
        [],
        |r| r.get(0),
    )?;
    if present == 0 {
        conn.execute_batch(
            "ALTER TABLE devices ADD COLUMN require_freshness INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

pub(super) fn set_require_freshness(
    conn: &Connection,
    id: &str,
    on: bool,
) -> Result<Device, StoreError> {
    let changed = conn
        .prepare_cached("UPDATE devices SET require_freshness = ?2 WHERE id = ?1")?
        .execute(params![id, i64::from(on)])?;
    changed_one(changed, "device", id)?;
    existing_device(conn, id)
}

pub(super) fn devices_requiring_freshness(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id FROM devices WHERE require_freshness != 0 ORDER BY id")?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Longest sealed key accepted (a sealed 43-byte key is 72 bytes).
const MAX_SEALED_PSK: usize = 1024;

pub(super) fn set_coap_psk(
    conn: &Connection,
    id: &str,
    sealed: Option<&[u8]>,
) -> Result<(), StoreError> {
    if sealed.is_some_and(|s| s.is_empty() || s.len() > MAX_SEALED_PSK) {
        return Err(StoreError::Invalid(format!(
            "a sealed CoAPS key must hold 1 to {MAX_SEALED_PSK} bytes"
        )));
    }
    let changed = conn
        .prepare_cached("UPDATE devices SET coap_psk = ?2 WHERE id = ?1")?
        .execute(params![id, sealed])?;
    changed_one(changed, "device", id)
}

pub(super) fn coap_psks(conn: &Connection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, coap_psk FROM devices WHERE coap_psk IS NOT NULL ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(super) fn delete_device(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached("DELETE FROM devices WHERE id = ?1")?
        .execute(params![id])?;
    changed_one(changed, "device", id)?;
    super::firmware::delete_device(conn, id)?;
    super::telemetry::delete_device_data(conn, id)
}

pub(super) fn put_desired(
    conn: &Connection,
    id: &str,
    value: &Json,
    expected_version: Option<u64>,
    now_ms: i64,
) -> Result<DesiredConfig, StoreError> {
    let current: i64 = conn
        .prepare_cached("SELECT desired_version FROM devices WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| not_found("device", id))?;
    let current = u64::try_from(current)
        .map_err(|_| StoreError::Corrupt(format!("negative config version {current}")))?;
    if let Some(expected) = expected_version {
        if expected != current {
            return Err(StoreError::VersionMismatch { current });
        }
    }
    let version = current + 1;
    conn.prepare_cached(
        "UPDATE devices SET desired_version = ?2, desired = ?3, desired_updated_ms = ?4 WHERE id = ?1",
    )?
    .execute(params![id, version, value.to_string(), now_ms])?;
    Ok(DesiredConfig {
        version,
        value: value.clone(),
        updated_at_ms: now_ms,
    })
}

pub(super) fn put_reported(
    conn: &Connection,
    id: &str,
    value: &Json,
    now_ms: i64,
) -> Result<ReportedConfig, StoreError> {
    let changed = conn
        .prepare_cached("UPDATE devices SET reported = ?2, reported_updated_ms = ?3 WHERE id = ?1")?
        .execute(params![id, value.to_string(), now_ms])?;
    changed_one(changed, "device", id)?;
    Ok(ReportedConfig {
        value: value.clone(),
        updated_at_ms: now_ms,
    })
}

pub(super) fn set_firmware(
    conn: &Connection,
    id: &str,
    state: Option<&Json>,
) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached("UPDATE devices SET firmware = ?2 WHERE id = ?1")?
        .execute(params![id, state.map(Json::to_string)])?;
    changed_one(changed, "device", id)
}

pub(super) fn touch_device(conn: &Connection, id: &str, seen_at_ms: i64) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE devices SET last_seen_ms = max(coalesce(last_seen_ms, ?2), ?2) WHERE id = ?1",
        )?
        .execute(params![id, seen_at_ms])?;
    changed_one(changed, "device", id)
}

fn read_client(r: &Row<'_>) -> Result<OAuthClient, StoreError> {
    let scopes: String = r.get(2)?;
    Ok(OAuthClient {
        client_id: r.get(0)?,
        secret_hash: r.get(1)?,
        scopes: scopes.split_whitespace().map(str::to_owned).collect(),
        created_at_ms: r.get(3)?,
    })
}

pub(super) fn get_client(conn: &Connection, id: &str) -> Result<Option<OAuthClient>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT client_id, secret_hash, scopes, created_at_ms FROM oauth_clients WHERE client_id = ?1",
    )?;
    let mut rows = stmt.query(params![id])?;
    match rows.next()? {
        Some(row) => read_client(row).map(Some),
        None => Ok(None),
    }
}

pub(super) fn list_clients(conn: &Connection) -> Result<Vec<OAuthClient>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT client_id, secret_hash, scopes, created_at_ms FROM oauth_clients ORDER BY client_id",
    )?;
    let mut rows = stmt.query([])?;
    let mut clients = Vec::new();
    while let Some(row) = rows.next()? {
        clients.push(read_client(row)?);
    }
    Ok(clients)
}

pub(super) fn create_client(
    conn: &Connection,
    client: &OAuthClient,
) -> Result<OAuthClient, StoreError> {
    client.validate()?;
    if id_taken(conn, &client.client_id)? {
        return Err(StoreError::Conflict {
            kind: "client",
            id: client.client_id.clone(),
        });
    }
    conn.prepare_cached(
        "INSERT INTO oauth_clients (client_id, secret_hash, scopes, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        client.client_id,
        client.secret_hash,
        client.scopes.join(" "),
        client.created_at_ms
    ])?;
    Ok(client.clone())
}

pub(super) fn set_client_secret(conn: &Connection, id: &str, hash: &str) -> Result<(), StoreError> {
    check_secret_hash(hash)?;
    let changed = conn
        .prepare_cached("UPDATE oauth_clients SET secret_hash = ?2 WHERE client_id = ?1")?
        .execute(params![id, hash])?;
    changed_one(changed, "client", id)
}

pub(super) fn delete_client(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached("DELETE FROM oauth_clients WHERE client_id = ?1")?
        .execute(params![id])?;
    changed_one(changed, "client", id)
}

pub(super) fn revoke_token(
    conn: &Connection,
    jti: &str,
    expires_at_ms: i64,
) -> Result<(), StoreError> {
    check_jti(jti)?;
    conn.prepare_cached(
        "INSERT INTO revoked_tokens (jti, expires_at_ms) VALUES (?1, ?2)
         ON CONFLICT (jti) DO UPDATE SET expires_at_ms = max(expires_at_ms, excluded.expires_at_ms)",
    )?
    .execute(params![jti, expires_at_ms])?;
    Ok(())
}

pub(super) fn is_revoked(conn: &Connection, jti: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM revoked_tokens WHERE jti = ?1")?
        .exists(params![jti])?)
}

pub(super) fn revoked_tokens(conn: &Connection) -> Result<Vec<(String, i64)>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT jti, expires_at_ms FROM revoked_tokens ORDER BY jti")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn purge_revoked(conn: &Connection, now_ms: i64) -> Result<u64, StoreError> {
    let n = conn
        .prepare_cached("DELETE FROM revoked_tokens WHERE expires_at_ms <= ?1")?
        .execute(params![now_ms])?;
    Ok(n as u64)
}
