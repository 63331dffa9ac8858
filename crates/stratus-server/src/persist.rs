//! The broker's link to the durable store: which changes it writes and when, the byte forms of
//! messages, and the conversion of stored sessions back into live ones at start.
//!
//! Every change goes to one [`GroupCommitter`] in the order the broker made it; most are
//! written detached (the writer batches them with whatever else is waiting), and a client's
//! acknowledgement that promises durability waits on [`Persistence::durable`], a barrier that
//! resolves once everything submitted before it is committed and fsynced.
//!
//! `last_seen_ms = 0` in a stored session means "connected when last written": at start its
//! Session Expiry countdown begins at the restart, since the moment it disconnected (the
//! crash) is unknown.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use stratus_mqtt::{persist, Message, MqttStr, QoS};
use stratus_store::{
    AuditKey, Completion, MqttOp, MqttSnapshot, SqliteOptions, StoreError, StoreHandle,
    StoredMessage, StoredRetained,
};

/// The file under the data dir that holds the broker's state.
pub const DATABASE_FILE: &str = "stratus.db";

/// The durable store as the broker uses it: the server's one [`StoreHandle`], whose group
/// committer the broker's changes share with everything else Stratus writes.
pub struct Persistence {
    store: StoreHandle,
    audit_key: AuditKey,
    next_seq: AtomicU64,
}

impl Persistence {
    /// Opens (creating if needed) the store under `data_dir`, appending to the audit log with
    /// the data dir's audit key (created on first start, see [`crate::audit`]), and reads
    /// what it holds.
    pub fn open(data_dir: &Path) -> Result<(Persistence, MqttSnapshot), StoreError> {
        Persistence::open_with(data_dir, usize::MAX)
    }

    /// [`open`](Self::open) with at most `max_series_per_device` telemetry series per device.
    pub fn open_with(
        data_dir: &Path,
        max_series_per_device: usize,
    ) -> Result<(Persistence, MqttSnapshot), StoreError> {
        let audit_key = crate::audit::open_audit_key(data_dir).map_err(|e| match e {
            crate::audit::AuditFileError::Store(e) => e,
            other => StoreError::Io(std::io::Error::other(other.to_string())),
        })?;
        let options = SqliteOptions {
            audit_key: Some(audit_key.clone()),
            max_series_per_device,
            ..SqliteOptions::default()
        };
        let store = StoreHandle::open_sqlite_with(&data_dir.join(DATABASE_FILE), &options)?;
        let snapshot = store.store().load_mqtt()?;
        let last = snapshot
            .sessions
            .iter()
            .flat_map(|s| s.messages.iter().map(|m| m.seq))
            .max()
            .unwrap_or(0);
        Ok((
            Persistence {
                store,
                audit_key,
                next_seq: AtomicU64::new(last + 1),
            },
            snapshot,
        ))
    }

    /// The store, for everything else the server keeps.
    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// The key the store appends audit entries with.
    pub fn audit_key(&self) -> &AuditKey {
        &self.audit_key
    }

    /// A new message number (increasing across every session).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues one change (written in order, batched, not awaited).
    pub fn write(&self, op: MqttOp) {
        self.store.committer().submit_detached(vec![op]);
    }

    /// Queues several changes to be committed together.
    pub fn write_all(&self, ops: Vec<MqttOp>) {
        if !ops.is_empty() {
            self.store.committer().submit_detached(ops);
        }
    }

    /// Resolves once everything queued so far is durable.
    pub fn durable(&self) -> Completion {
        self.store.committer().submit(Vec::new())
    }

    /// Transactions and operations written so far.
    pub fn stats(&self) -> stratus_store::group_commit::CommitStats {
        self.store.committer().stats()
    }
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock time (epoch ms) of a monotonic deadline.
pub fn instant_to_ms(at: Instant) -> u64 {
    let now = Instant::now();
    if at >= now {
        now_ms().saturating_add(at.duration_since(now).as_millis() as u64)
    } else {
        now_ms().saturating_sub(now.duration_since(at).as_millis() as u64)
    }
}

/// The monotonic deadline of a wall-clock time (epoch ms).
pub fn ms_to_instant(ms: u64) -> Instant {
    let now = Instant::now();
    let wall = now_ms();
    if ms >= wall {
        now + Duration::from_millis(ms - wall)
    } else {
        now.checked_sub(Duration::from_millis(wall - ms))
            .unwrap_or(now)
    }
}

fn properties_blob(message: &Message, sub_ids: &[NonZeroU32]) -> Bytes {
    if message.properties.is_none() && sub_ids.is_empty() {
        return Bytes::new();
    }
    let mut props = message.properties.as_deref().cloned().unwrap_or_default();
    props.subscription_identifiers = sub_ids.to_vec();
    // The properties came from a decoded packet, so they encode; an error only drops them.
    persist::encode_publish_properties(&props).unwrap_or_default()
}

/// A delivery of `message` to a persisted session, as stored.
pub fn stored_message(
    seq: u64,
    message: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[NonZeroU32],
) -> StoredMessage {
    StoredMessage {
        seq,
        topic: message.topic.to_string(),
        payload: message.payload.clone(),
        qos: qos as u8,
        retain,
        properties: properties_blob(message, sub_ids),
        packet_id: None,
        state: 0,
        expires_at_ms: message.expires_at.map(instant_to_ms),
    }
}

/// A retained message as stored.
pub fn stored_retained(message: &Message, origin: Option<&str>) -> StoredRetained {
    StoredRetained {
        topic: message.topic.to_string(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        properties: properties_blob(message, &[]),
        expires_at_ms: message.expires_at.map(instant_to_ms),
        origin: origin.unwrap_or_default().to_string(),
    }
}

/// The message a stored row describes, with its Subscription Identifiers; `None` when the row
/// cannot be read back (logged by the caller, skipped).
pub fn load_message(
    topic: &str,
    payload: Bytes,
    qos: u8,
    retain: bool,
    properties: Bytes,
    expires_at_ms: Option<u64>,
) -> Option<(Message, Vec<NonZeroU32>)> {
    let topic = MqttStr::try_from(topic).ok()?;
    let qos = QoS::from_u8(qos)?;
    let mut props = persist::decode_publish_properties(properties).ok()?;
    let sub_ids = std::mem::take(&mut props.subscription_identifiers);
    let mut m = Message::new(topic, payload, qos, retain);
    m.properties = (!props.is_empty()).then(|| Arc::new(props));
    m.expires_at = expires_at_ms.map(ms_to_instant);
    Some((m, sub_ids))
}
