//! An application message as the broker routes it, independent of any one connection's packet ids.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::packet::{LastWill, Publish};
use crate::properties::{PublishProperties, WillProperties};
use crate::types::{MqttStr, QoS};

/// An application message. Cloning is cheap: topic and payload are reference-counted [`Bytes`],
/// and MQTT 5.0 properties sit behind an [`Arc`] (`None` for a message without any, so an
/// MQTT 3.1.1 message costs nothing extra).
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
    /// The MQTT 5.0 properties forwarded to subscribers: payload format, content type, response
    /// topic, correlation data and user properties (never a topic alias, a subscription
    /// identifier or the expiry interval, which [`expires_at`](Self::expires_at) replaces).
    pub properties: Option<Arc<PublishProperties>>,
    /// When the message expires (from its Message Expiry Interval); expired messages are
    /// dropped instead of sent, and the remaining interval is forwarded.
    pub expires_at: Option<Instant>,
    /// Per delivery (in a session's queue and in-flight window): the Subscription Identifiers
    /// of the subscriptions it matched.
    pub subscription_ids: Vec<NonZeroU32>,
    /// Per delivery: the shared subscription (`$share/{group}/{filter}`) it was delivered
    /// through, so that it can be redelivered to another member.
    pub share: Option<MqttStr>,
    /// Per delivery: the message's number in a durable session's store, when the session is
    /// persisted; [`Connection`](crate::Connection) reports what happens to it as
    /// [`SessionChange`](crate::connection::SessionChange)s.
    pub store_seq: Option<u64>,
}

impl Message {
    /// A message without properties or expiry.
    pub fn new(topic: MqttStr, payload: Bytes, qos: QoS, retain: bool) -> Self {
        Message {
            topic,
            payload,
            qos,
            retain,
            properties: None,
            expires_at: None,
            subscription_ids: Vec::new(),
            share: None,
            store_seq: None,
        }
    }

    /// The message a PUBLISH received at `now` carries (its topic already resolved from a
    /// topic alias): forwarded properties kept, the expiry interval turned into a deadline.
    pub fn from_publish(p: Publish, now: Instant) -> Self {
        let mut props = p.properties;
        let expires_at = props
            .message_expiry_interval
            .take()
            .map(|s| now + Duration::from_secs(u64::from(s)));
        props.topic_alias = None;
        props.subscription_identifiers.clear();
        Message {
            properties: (!props.is_empty()).then(|| Arc::new(props)),
            expires_at,
            ..Message::new(p.topic, p.payload, p.qos, p.retain)
        }
    }

    /// The will message of a connection, published at `now`.
    pub fn from_will(w: LastWill, now: Instant) -> Self {
        let WillProperties {
            payload_format,
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
            ..
        } = w.properties;
        let props = PublishProperties {
            payload_format,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
            ..PublishProperties::default()
        };
        Message {
            properties: (!props.is_empty()).then(|| Arc::new(props)),
            expires_at: message_expiry_interval.map(|s| now + Duration::from_secs(u64::from(s))),
            ..Message::new(w.topic, w.payload, w.qos, w.retain)
        }
    }

    /// True when the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The Message Expiry Interval to forward at `now`: the whole seconds left, rounded up.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }

    /// A copy whose topic and payload own exact-size buffers. A decoded message shares the
    /// connection's whole read buffer; one that is kept long (retained, queued for an offline
    /// client) is compacted so it does not pin that buffer.
    pub fn compact(&self) -> Message {
        Message {
            topic: self.topic.compact(),
            payload: Bytes::copy_from_slice(&self.payload),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.as_ref().map(|p| Arc::new(compact_props(p))),
            expires_at: self.expires_at,
            subscription_ids: self.subscription_ids.clone(),
            share: self.share.clone(),
            store_seq: self.store_seq,
        }
    }
}

fn compact_props(p: &PublishProperties) -> PublishProperties {
    let b = |v: &Bytes| Bytes::copy_from_slice(v);
    PublishProperties {
        payload_format: p.payload_format,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.as_ref().map(MqttStr::compact),
        correlation_data: p.correlation_data.as_ref().map(b),
        user_properties: p
            .user_properties
            .iter()
            .map(|(k, v)| (k.compact(), v.compact()))
            .collect(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.as_ref().map(MqttStr::compact),
    }
}

impl From<Publish> for Message {
    /// Without a clock: a Message Expiry Interval is dropped (use [`Message::from_publish`]).
    fn from(p: Publish) -> Self {
        Message::new(p.topic, p.payload, p.qos, p.retain)
    }
}

impl From<LastWill> for Message {
    fn from(w: LastWill) -> Self {
        Message::new(w.topic, w.payload, w.qos, w.retain)
    }
}
