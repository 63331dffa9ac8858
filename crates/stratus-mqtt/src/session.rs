//! A client's session state (MQTT 3.1.1 §4.1): what outlives a network connection when Clean
//! Session is 0 — subscriptions, in-flight and queued outbound QoS 1/2 messages, and the ids of
//! inbound QoS 2 messages awaiting PUBREL.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::message::Message;
use crate::types::{MqttStr, PacketId, QoS};

/// Where an outbound QoS 1/2 message stands in its acknowledgement flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundState {
    /// QoS 1 PUBLISH sent, PUBACK awaited.
    AwaitingPubAck,
    /// QoS 2 PUBLISH sent, PUBREC awaited.
    AwaitingPubRec,
    /// QoS 2 PUBREL sent, PUBCOMP awaited.
    AwaitingPubComp,
}

/// An outbound message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Packet identifier it was sent with.
    pub packet_id: PacketId,
    /// The message; `qos` and `retain` are those of this delivery.
    pub message: Message,
    /// Acknowledgement state.
    pub state: OutboundState,
}

/// A client's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Granted subscriptions by filter.
    pub subscriptions: BTreeMap<MqttStr, QoS>,
    /// Outbound QoS 1/2 messages in flight, oldest first.
    pub inflight: VecDeque<Outbound>,
    /// Outbound messages waiting for room in the in-flight window, oldest first. Each message's
    /// `qos` and `retain` are those of its delivery.
    pub queued: VecDeque<Message>,
    /// Inbound QoS 2 packet ids that were received and not yet released (PUBREL).
    pub inbound_qos2: BTreeSet<PacketId>,
    next_packet_id: PacketId,
    /// Messages dropped because the queue was full, over the session's life.
    pub dropped: u64,
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

impl Session {
    /// A new, empty session (the client id it belongs to is its holder's business).
    pub fn new() -> Self {
        Session {
            subscriptions: BTreeMap::new(),
            inflight: VecDeque::new(),
            queued: VecDeque::new(),
            inbound_qos2: BTreeSet::new(),
            next_packet_id: 1,
            dropped: 0,
        }
    }

    /// Queues a QoS 1/2 message for later delivery, or drops it (counted) when `max_queued`
    /// messages already wait. Returns whether it was queued.
    pub fn enqueue(&mut self, message: Message, max_queued: usize) -> bool {
        if self.queued.len() >= max_queued {
            self.dropped += 1;
            return false;
        }
        self.queued.push_back(message);
        true
    }

    /// The next free packet identifier (never 0, never one in flight).
    pub(crate) fn allocate_packet_id(&mut self) -> PacketId {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|o| o.packet_id == id) {
                return id;
            }
        }
    }

    pub(crate) fn inflight_position(&self, id: PacketId, state: OutboundState) -> Option<usize> {
        self.inflight
            .iter()
            .position(|o| o.packet_id == id && o.state == state)
    }
}
