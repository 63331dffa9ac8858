//! The broker's state in SQLite: applying [`MqttOp`]s and loading the snapshot.

use std::collections::HashMap;

use bytes::Bytes;
use rusqlite::{params, Connection};

use crate::mqtt::*;
use crate::StoreError;

fn blob(b: &Bytes) -> &[u8] {
    b
}

fn to_u64(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn from_u64(v: Option<u64>) -> Option<i64> {
    v.and_then(|v| i64::try_from(v).ok())
}

pub(super) fn apply(tx: &Connection, op: &MqttOp) -> Result<(), StoreError> {
    match op {
        MqttOp::RetainSet(r) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO mqtt_retained (topic, payload, qos, properties, expires_at_ms, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                r.topic,
                blob(&r.payload),
                r.qos,
                blob(&r.properties),
                from_u64(r.expires_at_ms),
                r.origin
            ])?;
        }
        MqttOp::RetainDelete { topic } => {
            tx.prepare_cached("DELETE FROM mqtt_retained WHERE topic = ?1")?
                .execute(params![topic])?;
        }
        MqttOp::SessionPut {
            client_id,
            expiry_secs,
            last_seen_ms,
            will,
            owner,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO mqtt_sessions (client_id, expiry_secs, last_seen_ms, will, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                client_id,
                expiry_secs,
                from_u64(Some(*last_seen_ms)),
                blob(will),
                owner
            ])?;
        }
        MqttOp::SessionDelete { client_id } => {
            for table in [
                "mqtt_sessions",
                "mqtt_subscriptions",
                "mqtt_messages",
                "mqtt_inbound_qos2",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))?
                    .execute(params![client_id])?;
            }
        }
        MqttOp::SubscriptionPut {
            client_id,
            subscription: s,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO mqtt_subscriptions (client_id, filter, options, subscription_id)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![client_id, s.filter, s.options, s.subscription_id])?;
        }
        MqttOp::SubscriptionDelete { client_id, filter } => {
            tx.prepare_cached(
                "DELETE FROM mqtt_subscriptions WHERE client_id = ?1 AND filter = ?2",
            )?
            .execute(params![client_id, filter])?;
        }
        MqttOp::MessagePut {
            client_id,
            message: m,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO mqtt_messages
                 (client_id, seq, topic, payload, qos, retain, properties, packet_id, state, expires_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                client_id,
                from_u64(Some(m.seq)),
                m.topic,
                blob(&m.payload),
                m.qos,
                m.retain,
                blob(&m.properties),
                m.packet_id,
                m.state,
                from_u64(m.expires_at_ms)
            ])?;
        }
        MqttOp::MessageState {
            client_id,
            seq,
            packet_id,
            state,
        } => {
            tx.prepare_cached(
                "UPDATE mqtt_messages SET packet_id = ?3, state = ?4 WHERE client_id = ?1 AND seq = ?2",
            )?
            .execute(params![client_id, from_u64(Some(*seq)), packet_id, state])?;
        }
        MqttOp::MessageDelete { client_id, seq } => {
            tx.prepare_cached("DELETE FROM mqtt_messages WHERE client_id = ?1 AND seq = ?2")?
                .execute(params![client_id, from_u64(Some(*seq))])?;
        }
        MqttOp::InboundQos2Put {
            client_id,
            packet_id,
        } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO mqtt_inbound_qos2 (client_id, packet_id) VALUES (?1, ?2)",
            )?
            .execute(params![client_id, packet_id])?;
        }
        MqttOp::InboundQos2Delete {
            client_id,
            packet_id,
        } => {
            tx.prepare_cached(
                "DELETE FROM mqtt_inbound_qos2 WHERE client_id = ?1 AND packet_id = ?2",
            )?
            .execute(params![client_id, packet_id])?;
        }
    }
    Ok(())
}

fn small(v: i64, what: &str) -> Result<u8, StoreError> {
    u8::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} out of range: {v}")))
}

pub(super) fn load(conn: &Connection) -> Result<MqttSnapshot, StoreError> {
    let mut snapshot = MqttSnapshot::default();
    let mut stmt = conn.prepare(
        "SELECT topic, payload, qos, properties, expires_at_ms, origin FROM mqtt_retained ORDER BY topic",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, Option<String>>(5)?,
        ))
    })?;
    for row in rows {
        let (topic, payload, qos, properties, expires, origin) = row?;
        snapshot.retained.push(StoredRetained {
            topic,
            payload: payload.into(),
            qos: small(qos, "retained qos")?,
            properties: properties.into(),
            expires_at_ms: to_u64(expires),
            origin: origin.unwrap_or_default(),
        });
    }
    let mut sessions: HashMap<String, StoredSession> = HashMap::new();
    let mut order = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT client_id, expiry_secs, last_seen_ms, will, owner FROM mqtt_sessions ORDER BY client_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<u32>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    for row in rows {
        let (client_id, expiry_secs, last_seen, will, owner) = row?;
        order.push(client_id.clone());
        sessions.insert(
            client_id.clone(),
            StoredSession {
                client_id,
                expiry_secs,
                last_seen_ms: to_u64(Some(last_seen)).unwrap_or(0),
                will: will.into(),
                owner: owner.unwrap_or_default(),
                ..StoredSession::default()
            },
        );
    }
    let mut stmt = conn.prepare(
            "SELECT client_id, filter, options, subscription_id FROM mqtt_subscriptions ORDER BY client_id, filter",
        )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<u32>>(3)?,
        ))
    })?;
    for row in rows {
        let (client_id, filter, options, subscription_id) = row?;
        if let Some(s) = sessions.get_mut(&client_id) {
            s.subscriptions.push(StoredSubscription {
                filter,
                options: small(options, "subscription options")?,
                subscription_id,
            });
        }
    }
    let mut stmt = conn.prepare(
            "SELECT client_id, seq, topic, payload, qos, retain, properties, packet_id, state, expires_at_ms
             FROM mqtt_messages ORDER BY client_id, seq",
        )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, bool>(5)?,
            r.get::<_, Vec<u8>>(6)?,
            r.get::<_, Option<u16>>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, Option<i64>>(9)?,
        ))
    })?;
    for row in rows {
        let (client_id, seq, topic, payload, qos, retain, properties, packet_id, state, expires) =
            row?;
        if let Some(s) = sessions.get_mut(&client_id) {
            s.messages.push(StoredMessage {
                seq: to_u64(Some(seq)).unwrap_or(0),
                topic,
                payload: payload.into(),
                qos: small(qos, "message qos")?,
                retain,
                properties: properties.into(),
                packet_id,
                state: small(state, "message state")?,
                expires_at_ms: to_u64(expires),
            });
        }
    }
    let mut stmt = conn.prepare(
        "SELECT client_id, packet_id FROM mqtt_inbound_qos2 ORDER BY client_id, packet_id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u16>(1)?)))?;
    for row in rows {
        let (client_id, packet_id) = row?;
        if let Some(s) = sessions.get_mut(&client_id) {
            s.inbound_qos2.push(packet_id);
        }
    }
    snapshot.sessions = order
        .into_iter()
        .filter_map(|id| sessions.remove(&id))
        .collect();
    Ok(snapshot)
}

/// Adds `mqtt_sessions.owner` (the principal a session belongs to) and `mqtt_retained.origin`
/// (the client that set a retained message) to a database created before they existed; rows
/// stored before have none (NULL, read as empty).
pub(super) fn add_owner_columns(conn: &Connection) -> Result<(), StoreError> {
    for (table, column) in [("mqtt_sessions", "owner"), ("mqtt_retained", "origin")] {
        let present: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )?;
        if present == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))?;
        }
    }
    Ok(())
}
