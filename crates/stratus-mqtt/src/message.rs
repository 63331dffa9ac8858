//! An application message as the broker routes it, independent of any one connection's packet ids.

use bytes::Bytes;

use crate::packet::{LastWill, Publish};
use crate::types::{MqttStr, QoS};

/// An application message. Cloning is cheap: topic and payload are reference-counted [`Bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: MqttStr,
    /// Payload.
    pub payload: Bytes,
    /// QoS the publisher sent it with.
    pub qos: QoS,
    /// Whether the publisher asked for it to be retained.
    pub retain: bool,
}

impl Message {
    /// A copy whose topic and payload own exact-size buffers. A decoded message shares the
    /// connection's whole read buffer; one that is kept long (retained, queued for an offline
    /// client) is compacted so it does not pin that buffer.
    pub fn compact(&self) -> Message {
        Message {
            topic: self.topic.compact(),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
        }
    }
}

impl From<Publish> for Message {
    fn from(p: Publish) -> Self {
        Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
        }
    }
}

impl From<LastWill> for Message {
    fn from(w: LastWill) -> Self {
        Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
        }
    }
}
