//! The broker's durable state: the records kept, the changes ([`MqttOp`]) that update them
//! in atomic batches, and the [`MqttStore`] trait every backend implements.

use bytes::Bytes;

use crate::StoreError;

/// A retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRetained {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with (0–2).
    pub qos: u8,
    /// MQTT 5 properties, encoded by the broker (opaque here); empty when none.
    pub properties: Bytes,
    /// When it expires (Unix epoch milliseconds), if it does.
    pub expires_at_ms: Option<u64>,
    /// The client id that set it (for per-client retained quotas); empty for the server's own
    /// and for messages stored before setters were recorded.
    pub origin: String,
}

/// A subscription of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// Topic filter (including a `$share/group/` prefix when shared).
    pub filter: String,
    /// Subscription options byte as on the wire (QoS in bits 0–1, v5 flags above).
    pub options: u8,
    /// MQTT 5 subscription identifier, if any.
    pub subscription_id: Option<u32>,
}

/// A message waiting for, or in flight to, a persistent session's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Order within the session (strictly increasing per client).
    pub seq: u64,
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Delivery QoS (1 or 2).
    pub qos: u8,
    /// RETAIN flag of the delivery.
    pub retain: bool,
    /// MQTT 5 properties, encoded by the broker (opaque here).
    pub properties: Bytes,
    /// Packet id once sent; `None` while queued.
    pub packet_id: Option<u16>,
    /// 0 queued or sent awaiting PUBACK/PUBREC, 1 PUBREC received (PUBREL sent, PUBCOMP awaited).
    pub state: u8,
    /// When it expires (Unix epoch milliseconds), if it does.
    pub expires_at_ms: Option<u64>,
}

/// A persistent session with everything that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredSession {
    /// Client identifier.
    pub client_id: String,
    /// Session expiry interval in seconds; `None` means it never expires.
    pub expiry_secs: Option<u32>,
    /// When the client was last seen (Unix epoch milliseconds).
    pub last_seen_ms: u64,
    /// The will, encoded by the broker (opaque here); empty when none.
    pub will: Bytes,
    /// The principal the session belongs to, encoded by the broker (opaque here); empty for
    /// a session stored before owners were recorded.
    pub owner: String,
    /// Subscriptions, by filter.
    pub subscriptions: Vec<StoredSubscription>,
    /// Queued and in-flight messages, by `seq`.
    pub messages: Vec<StoredMessage>,
    /// Inbound QoS 2 packet ids received and not yet released.
    pub inbound_qos2: Vec<u16>,
}

/// Everything the broker reloads at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MqttSnapshot {
    /// Retained messages, by topic.
    pub retained: Vec<StoredRetained>,
    /// Persistent sessions, by client id.
    pub sessions: Vec<StoredSession>,
}

/// One change to the broker's durable state. A batch of them commits atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MqttOp {
    /// Store (or replace) the retained message of a topic.
    RetainSet(StoredRetained),
    /// Remove the retained message of a topic.
    RetainDelete {
        /// Topic name.
        topic: String,
    },
    /// Create or update a session's own fields (not its subscriptions or messages).
    SessionPut {
        /// Client identifier.
        client_id: String,
        /// Session expiry interval in seconds; `None` for never.
        expiry_secs: Option<u32>,
        /// Last seen, Unix epoch milliseconds.
        last_seen_ms: u64,
        /// Encoded will; empty for none.
        will: Bytes,
        /// The principal the session belongs to, encoded by the broker (opaque here).
        owner: String,
    },
    /// Remove a session and everything that belongs to it.
    SessionDelete {
        /// Client identifier.
        client_id: String,
    },
    /// Add or replace a subscription.
    SubscriptionPut {
        /// Client identifier.
        client_id: String,
        /// The subscription.
        subscription: StoredSubscription,
    },
    /// Remove a subscription.
    SubscriptionDelete {
        /// Client identifier.
        client_id: String,
        /// Topic filter.
        filter: String,
    },
    /// Add or replace a message of a session (by `seq`).
    MessagePut {
        /// Client identifier.
        client_id: String,
        /// The message.
        message: StoredMessage,
    },
    /// Record that a message was sent with a packet id, or moved to PUBCOMP-awaited.
    MessageState {
        /// Client identifier.
        client_id: String,
        /// Which message.
        seq: u64,
        /// Packet id it went out with.
        packet_id: u16,
        /// New state (see [`StoredMessage::state`]).
        state: u8,
    },
    /// Remove a message (acknowledged, expired or dropped).
    MessageDelete {
        /// Client identifier.
        client_id: String,
        /// Which message.
        seq: u64,
    },
    /// Remember an inbound QoS 2 packet id until PUBREL.
    InboundQos2Put {
        /// Client identifier.
        client_id: String,
        /// Packet id.
        packet_id: u16,
    },
    /// Forget an inbound QoS 2 packet id (PUBREL received).
    InboundQos2Delete {
        /// Client identifier.
        client_id: String,
        /// Packet id.
        packet_id: u16,
    },
}

/// A backend for the broker's durable state.
pub trait MqttStore: Send + Sync + 'static {
    /// Everything stored, for the broker to rebuild its state at start.
    fn load_mqtt(&self) -> Result<MqttSnapshot, StoreError>;

    /// Applies `ops` in order as one atomic, durable transaction: when this returns `Ok`, all
    /// of them survive a crash; when it fails, none of them took effect.
    fn commit_mqtt(&self, ops: &[MqttOp]) -> Result<(), StoreError>;
}
