//! The broker side of one MQTT network connection as a sans-IO state machine.
//!
//! The host (the server crate) feeds it received bytes with [`Connection::handle_bytes`], the
//! current time with [`Connection::handle_timeout`], and messages to deliver with
//! [`Connection::deliver`]; it takes back the bytes to send from [`Connection::transmit`],
//! application-level [`Event`]s from [`Connection::poll_event`], and the next deadline from
//! [`Connection::poll_timeout`]. Decisions that need the rest of the broker (authentication,
//! session lookup, subscription policy) are events that the host answers with
//! [`Connection::accept`]/[`Connection::refuse`] and [`Connection::subscribed`].
//!
//! Time is always an argument, so keepalive and connect timeouts are tested on virtual time.

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::codec::{self, DecodeError};
use crate::message::Message;
use crate::packet::*;
use crate::properties::{
    DisconnectProperties, PropertyId, PublishProperties, SubAckProperties, UnsubAckProperties,
};
use crate::reason::ReasonCode;
use crate::session::{Outbound, OutboundState, Session};
use crate::types::{MqttStr, PacketId, ProtocolVersion, QoS};

/// Limits that bound what one connection may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet accepted, fixed header included.
    pub max_packet_size: usize,
    /// Time from accepting the socket within which CONNECT must arrive.
    pub connect_timeout: Duration,
    /// Outbound QoS 1/2 messages in flight at once (1..=65534).
    pub max_inflight: u16,
    /// Outbound messages queued beyond the in-flight window (also while offline).
    pub max_queued: usize,
    /// Bytes that may wait in the transmit buffer before QoS 0 deliveries are dropped.
    pub max_transmit_buffer: usize,
    /// Most levels a topic name or filter may have; deeper ones are refused (bounds the
    /// depth of the subscription tree and retained store).
    pub max_topic_levels: usize,
    /// Longest keep alive (seconds) an MQTT 5.0 client may use; a longer one, or 0, is replaced
    /// by this and announced as Server Keep Alive. 0: no limit.
    pub max_keepalive: u16,
    /// Receive Maximum announced to MQTT 5.0 clients (inbound QoS 1/2 unacknowledged at once).
    pub receive_maximum: u16,
    /// Topic Alias Maximum announced to MQTT 5.0 clients.
    pub topic_alias_maximum: u16,
    /// PUBLISH packets a client may send per second (0: no limit); see [`RateLimit`].
    pub max_publish_rate: u32,
    /// Payload bytes a client may publish per second (0: no limit).
    pub max_publish_bytes_rate: u32,
    /// Consecutive seconds over a publish rate after which the connection is closed
    /// (MQTT 5.0: DISCONNECT 0x96 Message rate too high).
    pub rate_sustain_secs: u8,
}

/// The publish rates of one client, counted in one-second windows: a PUBLISH over
/// [`Limits::max_publish_rate`] or [`Limits::max_publish_bytes_rate`] in its second is not
/// routed — an MQTT 5.0 client gets PUBACK/PUBREC 0x97 Quota exceeded, an MQTT 3.1.1 client a
/// plain acknowledgement (it cannot be refused) and the message is dropped and counted in
/// [`Stats::throttled`]; a client over a rate in [`Limits::rate_sustain_secs`] consecutive
/// seconds is disconnected (0x96 Message rate too high). Fixed windows let a client send up to
/// twice its rate across a window boundary; they cost three integers and no clock of their
/// own (time is the connection's `now`).
#[derive(Debug, Default, Clone, Copy)]
struct RateWindow {
    /// The window: whole seconds since [`RATE_EPOCH`].
    second: u32,
    messages: u32,
    bytes: u32,
    /// Consecutive windows (ending with this one) in which the client went over a rate.
    streak: u8,
    /// Whether it went over in this window.
    over: bool,
}

/// What the rate window says of one PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateVerdict {
    Pass,
    Throttle,
    Disconnect,
}

impl RateWindow {
    fn check(&mut self, second: u32, bytes: usize, limits: &Limits) -> RateVerdict {
        if limits.max_publish_rate == 0 && limits.max_publish_bytes_rate == 0 {
            return RateVerdict::Pass;
        }
        if second != self.second {
            let consecutive = second == self.second.wrapping_add(1);
            if !(self.over && consecutive) {
                self.streak = 0;
            }
            *self = RateWindow {
                second,
                streak: self.streak,
                ..RateWindow::default()
            };
        }
        self.messages = self.messages.saturating_add(1);
        self.bytes = self
            .bytes
            .saturating_add(u32::try_from(bytes).unwrap_or(u32::MAX));
        let over = (limits.max_publish_rate != 0 && self.messages > limits.max_publish_rate)
            || (limits.max_publish_bytes_rate != 0 && self.bytes > limits.max_publish_bytes_rate);
        if !over {
            return RateVerdict::Pass;
        }
        if !self.over {
            self.over = true;
            self.streak = self.streak.saturating_add(1);
        }
        if limits.rate_sustain_secs != 0 && self.streak >= limits.rate_sustain_secs {
            RateVerdict::Disconnect
        } else {
            RateVerdict::Throttle
        }
    }
}

/// The instant publish-rate windows count seconds from (the first one any connection asked).
static RATE_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn rate_second(now: Instant) -> u32 {
    let epoch = *RATE_EPOCH.get_or_init(|| now);
    u32::try_from(now.saturating_duration_since(epoch).as_secs()).unwrap_or(u32::MAX)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_inflight: 256,
            max_queued: 1000,
            max_transmit_buffer: 1024 * 1024,
            max_topic_levels: 128,
            max_keepalive: 0,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_publish_rate: 0,
            max_publish_bytes_rate: 0,
            rate_sustain_secs: 10,
        }
    }
}

/// Something the host must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A valid CONNECT arrived; answer with [`Connection::accept`] or [`Connection::refuse`].
    /// A zero-length client id with Clean Session 0 has already been refused. Boxed: with its
    /// MQTT 5.0 properties a CONNECT is several times larger than any other event.
    Connect(Box<Connect>),
    /// An application message to route. For QoS 1/2 (`packet_id` set), call
    /// [`Connection::acknowledge`] once it is handled; acknowledgements go out in receive order.
    Publish {
        /// The message as published.
        message: Message,
        /// Packet id to acknowledge, for QoS 1/2.
        packet_id: Option<PacketId>,
    },
    /// A SUBSCRIBE; answer with [`Connection::subscribed`].
    Subscribe(Subscribe),
    /// Filters the client unsubscribed from (UNSUBACK already sent). Filters it did not hold are included.
    Unsubscribe(Vec<MqttStr>),
    /// The connection is closed; the host flushes [`Connection::transmit`], closes the socket
    /// and publishes `will` if present. Emitted exactly once.
    Closed {
        /// Why.
        reason: CloseReason,
        /// The will message to publish now.
        will: Option<Message>,
    },
    /// The durable session changed (only while [`Connection::track_session_changes`] is on):
    /// the host records it in its store.
    Session(SessionChange),
}

/// A change to a persisted session that its store must follow. Messages are named by their
/// [`Message::store_seq`]; messages without one are not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionChange {
    /// A stored QoS 1/2 message went out with `packet_id` (PUBACK or PUBREC awaited).
    Sent {
        /// The message's store number.
        seq: u64,
        /// The packet id it carries.
        packet_id: PacketId,
    },
    /// The client received a stored QoS 2 message (PUBREC); PUBREL went out, PUBCOMP awaited.
    Received {
        /// The message's store number.
        seq: u64,
        /// The packet id of the exchange.
        packet_id: PacketId,
    },
    /// A stored message is done with: acknowledged, expired or dropped.
    Finished {
        /// The message's store number.
        seq: u64,
    },
    /// An inbound QoS 2 packet id was released (PUBREL, or a refused PUBREC): forget it.
    InboundReleased {
        /// The packet id.
        packet_id: PacketId,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The client sent DISCONNECT with reason 0x04 Disconnect with Will Message (MQTT 5.0).
    ClientDisconnectWithWill,
    /// The client exceeded a limit the server announced, or otherwise broke a rule that has
    /// its own reason code (MQTT 5.0: Receive Maximum 0x93, Topic Alias 0x94).
    Violation(ReasonCode, &'static str),
    /// The client sent bytes that are not a valid packet.
    Malformed(DecodeError),
    /// The client broke a rule of the protocol with a valid packet.
    ProtocolViolation(&'static str),
    /// No packet within 1.5 × keep alive.
    KeepAliveTimeout,
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
    /// The CONNECT was refused with this return code.
    Refused(ConnectReturnCode),
    /// Another connection took over the client id.
    TakenOver,
    /// The server is shutting down.
    ServerShutdown,
    /// The client did not take its messages for too long while publishers waited (slow consumer).
    SlowConsumer,
    /// The network connection closed or failed.
    TransportClosed,
}

impl CloseReason {
    /// The reason code of the DISCONNECT an MQTT 5.0 client is sent when the server ends the
    /// connection for this reason; `None` when it sends none (the client ended it, or the
    /// socket is gone). A slow consumer gets 0x97 Quota exceeded.
    pub fn disconnect_code(&self) -> Option<ReasonCode> {
        Some(match self {
            CloseReason::Malformed(DecodeError::PacketTooLarge { .. }) => {
                ReasonCode::PacketTooLarge
            }
            CloseReason::Malformed(DecodeError::PropertyOutOfRange {
                property: PropertyId::TopicAlias,
                ..
            }) => ReasonCode::TopicAliasInvalid,
            CloseReason::Malformed(_) => ReasonCode::MalformedPacket,
            CloseReason::ProtocolViolation(_) => ReasonCode::ProtocolError,
            CloseReason::Violation(code, _) => *code,
            CloseReason::KeepAliveTimeout => ReasonCode::KeepAliveTimeout,
            CloseReason::TakenOver => ReasonCode::SessionTakenOver,
            CloseReason::ServerShutdown => ReasonCode::ServerShuttingDown,
            CloseReason::SlowConsumer => ReasonCode::QuotaExceeded,
            CloseReason::ClientDisconnect
            | CloseReason::ClientDisconnectWithWill
            | CloseReason::ConnectTimeout
            | CloseReason::Refused(_)
            | CloseReason::TransportClosed => return None,
        })
    }

    fn reason_string(&self) -> &'static str {
        match self {
            CloseReason::Malformed(_) => "malformed packet",
            CloseReason::ProtocolViolation(what) | CloseReason::Violation(_, what) => what,
            CloseReason::KeepAliveTimeout => "keep alive timeout",
            CloseReason::TakenOver => "session taken over by another connection",
            CloseReason::ServerShutdown => "server shutting down",
            CloseReason::SlowConsumer => "slow consumer: messages not taken in time",
            _ => "",
        }
    }

    /// Whether this ending publishes the will: every ending but a DISCONNECT or a refused CONNECT.
    fn publishes_will(&self) -> bool {
        !matches!(
            self,
            CloseReason::ClientDisconnect | CloseReason::Refused(_)
        )
    }
}

/// How one message is delivered to this connection's client (see [`Connection::deliver_with`]).
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// QoS of this delivery (the minimum of the message's and the subscription's).
    pub qos: QoS,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription Identifiers of the matching subscriptions (MQTT 5.0).
    pub subscription_ids: &'a [NonZeroU32],
    /// The shared subscription it came through, if any.
    pub share: Option<&'a MqttStr>,
    /// The message's number in the session's store, when the session is persisted.
    pub store_seq: Option<u64>,
}

impl Delivery<'_> {
    /// A delivery at `qos` with `retain`, nothing else.
    pub fn new(qos: QoS, retain: bool) -> Self {
        Delivery {
            qos,
            retain,
            subscription_ids: &[],
            share: None,
            store_seq: None,
        }
    }
}

/// What [`Connection::deliver`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Written to the transmit buffer.
    Sent,
    /// Queued in the session until the in-flight window has room.
    Queued,
    /// Dropped: the queue (QoS 1/2) or the transmit buffer (QoS 0) was full, or the connection is not open.
    Dropped,
}

/// Counters the host adds to its statistics and resets with [`Connection::take_stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// PUBLISH packets received.
    pub publish_received: u32,
    /// PUBLISH packets sent (including redeliveries).
    pub publish_sent: u32,
    /// Messages dropped by this connection.
    pub dropped: u32,
    /// Control packets of any type received.
    pub packets_received: u32,
    /// Control packets of any type sent.
    pub packets_sent: u32,
    /// PUBLISH packets over the client's publish rate, not routed (see [`Limits::max_publish_rate`]).
    pub throttled: u32,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for CONNECT until the deadline.
    AwaitingConnect,
    /// CONNECT received, waiting for the host's answer.
    Authenticating,
    /// Session established.
    Connected,
    /// Finished; only the transmit buffer remains to be flushed.
    Closed,
}

/// An inbound QoS 1/2 acknowledgement waiting for its turn.
#[derive(Debug)]
struct PendingAck {
    packet_id: PacketId,
    qos: QoS,
    done: bool,
    reason: ReasonCode,
}

/// One MQTT connection, broker side.
#[derive(Debug)]
pub struct Connection {
    /// Shared by every connection of a listener.
    limits: Arc<Limits>,
    phase: Phase,
    protocol: ProtocolVersion,
    /// Keep Alive in seconds (0: none): the connection closes after 1.5 times it in silence.
    keep_alive: u16,
    last_received: Instant,
    will: Option<Box<LastWill>>,
    session: Option<Session>,
    acks: VecDeque<PendingAck>,
    transmit: BytesMut,
    events: VecDeque<Event>,
    stats: Stats,
    /// The latest time the host told.
    now: Instant,
    /// Outbound in-flight window: min(client's Receive Maximum, `max_inflight`).
    max_inflight: u16,
    /// The client's Maximum Packet Size (MQTT 5.0).
    client_max_packet: Option<NonZeroU32>,
    /// Inbound QoS 1 messages not yet acknowledged (QoS 2 ones are in the session).
    inbound_qos1: u32,
    /// Topic aliases of either side (MQTT 5.0), from the first one used: most connections
    /// never use any, and an idle one should not carry two empty maps.
    aliases: Option<Box<TopicAliases>>,
    /// The client's Topic Alias Maximum (0: it accepts none).
    client_alias_max: u16,
    /// Session Expiry Interval in seconds (0: ends with the connection; u32::MAX: never).
    session_expiry: u32,
    /// The session expiry the CONNECT asked for.
    connect_session_expiry: u32,
    /// Will Delay Interval of the will, in seconds.
    will_delay: u32,
    /// Server Keep Alive to announce.
    server_keep_alive: Option<u16>,
    /// Assigned Client Identifier to announce.
    assigned_client_id: Option<Box<MqttStr>>,
    /// Whether reason strings may be sent (Request Problem Information).
    problem_information: bool,
    /// Whether [`Event::Session`] changes are reported.
    track_session: bool,
    rate: RateWindow,
}

/// The topic aliases of a connection (MQTT 5.0 §3.3.2.3.4).
#[derive(Debug, Default)]
struct TopicAliases {
    /// Set by the client.
    inbound: HashMap<u16, MqttStr>,
    /// Assigned by this side for topics it sends, at most the client's Topic Alias Maximum;
    /// the first topics sent get them, for the connection's life.
    outbound: HashMap<MqttStr, u16>,
}

impl Connection {
    /// A connection whose socket was accepted at `now`. A listener shares one `Arc<Limits>`
    /// among its connections.
    pub fn new(limits: impl Into<Arc<Limits>>, now: Instant) -> Self {
        let limits = limits.into();
        Connection {
            limits,
            phase: Phase::AwaitingConnect,
            protocol: ProtocolVersion::V311,
            keep_alive: 0,
            last_received: now,
            will: None,
            session: None,
            acks: VecDeque::new(),
            transmit: BytesMut::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            rate: RateWindow::default(),
            now,
            max_inflight: 1,
            client_max_packet: None,
            inbound_qos1: 0,
            aliases: None,
            client_alias_max: 0,
            session_expiry: 0,
            connect_session_expiry: 0,
            will_delay: 0,
            server_keep_alive: None,
            assigned_client_id: None,
            problem_information: true,
            track_session: false,
        }
    }

    /// Turns on (or off) reporting [`Event::Session`] changes, for a session the host persists.
    pub fn track_session_changes(&mut self, on: bool) {
        self.track_session = on;
    }

    fn session_changed(&mut self, change: SessionChange) {
        if self.track_session {
            self.events.push_back(Event::Session(change));
        }
    }

    fn finished(&mut self, message: &Message) {
        if let Some(seq) = message.store_seq {
            self.session_changed(SessionChange::Finished { seq });
        }
    }

    /// The Session Expiry Interval in force (seconds; 0 ends the session with the connection,
    /// `u32::MAX` never expires). MQTT 3.1.1: 0 for Clean Session 1, `u32::MAX` otherwise.
    /// A DISCONNECT may have changed it.
    pub fn session_expiry(&self) -> u32 {
        self.session_expiry
    }

    /// The Will Delay Interval (seconds) of the will the connection had (MQTT 5.0; 0 otherwise).
    pub fn will_delay(&self) -> u32 {
        self.will_delay
    }

    /// The keep alive in force, in seconds (after any Server Keep Alive override).
    pub fn keep_alive_secs(&self) -> Option<u64> {
        (self.keep_alive != 0).then_some(u64::from(self.keep_alive))
    }

    /// Sets the Assigned Client Identifier the CONNACK announces (for a CONNECT with an empty
    /// client id; MQTT 5.0). Call before [`accept`](Self::accept).
    pub fn assign_client_id(&mut self, id: MqttStr) {
        self.assigned_client_id = Some(Box::new(id));
    }

    /// The limits this connection enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether `filter` may be subscribed to: valid (§4.7) and no deeper than `max_topic_levels`.
    pub fn filter_acceptable(&self, filter: &str) -> bool {
        crate::topic::is_valid_topic_filter(filter)
            && crate::topic::level_count(filter) <= self.limits.max_topic_levels
    }

    /// The protocol revision of the CONNECT (3.1.1 until one arrives).
    pub fn protocol(&self) -> ProtocolVersion {
        self.protocol
    }

    /// True once the session is established and until the connection closes.
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected)
    }

    /// True when a QoS 1/2 delivery would go out at once: connected, nothing queued, and room
    /// in the in-flight window. The host keeps messages in its own queue until then.
    pub fn has_window_room(&self) -> bool {
        self.is_connected()
            && self.session.as_ref().is_some_and(|s| {
                s.queued.is_empty() && s.inflight.len() < usize::from(self.max_inflight)
            })
    }

    /// True while the transmit buffer has room for more QoS 0 deliveries (below
    /// `max_transmit_buffer`). The host keeps messages in its own queue otherwise.
    pub fn has_transmit_room(&self) -> bool {
        self.transmit.len() < self.limits.max_transmit_buffer
    }

    /// True once the connection has ended (flush [`transmit`](Self::transmit), then close the socket).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The session, while one is attached.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Takes the session back after the connection closed (to keep it when Clean Session is 0).
    pub fn take_session(&mut self) -> Option<Session> {
        self.session.take()
    }

    /// Bytes waiting to be written to the socket; the host writes them and `advance`s the buffer.
    pub fn transmit(&mut self) -> &mut BytesMut {
        &mut self.transmit
    }

    /// The bytes waiting to be written, without taking them (the host `advance`s
    /// [`transmit`](Self::transmit) by what it wrote).
    pub fn pending_transmit(&self) -> &[u8] {
        &self.transmit
    }

    /// The next event for the host.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// An encoder for QoS 0 deliveries that produces exactly what [`deliver_with`]
    /// (Self::deliver_with) would, while the connection is connected, has nothing waiting to be
    /// sent, and needs no state to encode them (no outbound topic aliases: the client accepts
    /// none). `None` otherwise.
    pub fn qos0_encoder(&self) -> Option<Qos0Encoder> {
        (self.is_connected() && self.transmit.is_empty() && self.client_alias_max == 0).then_some(
            Qos0Encoder {
                target: Target {
                    protocol: self.protocol,
                    client_max_packet: self.client_max_packet,
                },
            },
        )
    }

    /// How many events wait for [`poll_event`](Self::poll_event).
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Counts `packets` QoS 0 PUBLISHes that the host sent for this connection through a
    /// [`Qos0Encoder`].
    pub fn count_sent_elsewhere(&mut self, packets: u32) {
        self.stats.publish_sent = self.stats.publish_sent.saturating_add(packets);
        self.stats.packets_sent = self.stats.packets_sent.saturating_add(packets);
    }

    /// Gives back the memory of queues that are empty now (events, outgoing bytes, pending
    /// acknowledgements), for a connection about to sit idle: they are allocated again when
    /// traffic returns.
    pub fn release_idle_memory(&mut self) {
        if self.events.is_empty() {
            self.events = VecDeque::new();
        }
        if self.transmit.is_empty() {
            self.transmit = BytesMut::new();
        }
        if self.acks.is_empty() {
            self.acks = VecDeque::new();
        }
    }

    /// Counters since the last call.
    pub fn take_stats(&mut self) -> Stats {
        std::mem::take(&mut self.stats)
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingConnect => Some(self.connect_deadline()),
            Phase::Connected => self.keep_alive_limit().map(|k| self.last_received + k),
            Phase::Authenticating | Phase::Closed => None,
        }
    }

    /// When a connection that sent no CONNECT is closed (it was accepted at `last_received`).
    fn connect_deadline(&self) -> Instant {
        self.last_received + self.limits.connect_timeout
    }

    /// How long the client may stay silent: 1.5 times its Keep Alive (MQTT-3.1.2-24).
    fn keep_alive_limit(&self) -> Option<Duration> {
        (self.keep_alive != 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// Checks the connect and keep-alive deadlines against `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        match self.phase {
            Phase::AwaitingConnect if now >= self.connect_deadline() => {
                self.close(CloseReason::ConnectTimeout)
            }
            Phase::Connected => {
                if let Some(k) = self.keep_alive_limit() {
                    if now >= self.last_received + k {
                        self.close(CloseReason::KeepAliveTimeout);
                    }
                }
            }
            _ => {}
        }
    }

    /// Decodes and handles every whole packet in `buf`, leaving a partial one in place.
    /// Stops after a CONNECT until the host answers it: call again then.
    pub fn handle_bytes(&mut self, buf: &mut BytesMut, now: Instant) {
        self.now = now;
        while !buf.is_empty() {
            if matches!(self.phase, Phase::Authenticating | Phase::Closed) {
                return;
            }
            if matches!(self.phase, Phase::AwaitingConnect) && buf[0] != 0x10 {
                // Not a CONNECT header: no need to wait for the rest of it (MQTT-3.1.0-1).
                self.close(CloseReason::ProtocolViolation(
                    "first packet is not CONNECT",
                ));
                return;
            }
            match codec::decode(buf, self.limits.max_packet_size, self.protocol) {
                Ok(Some(packet)) => {
                    self.last_received = now;
                    self.stats.packets_received += 1;
                    self.handle_packet(packet);
                }
                Ok(None) => return,
                Err(DecodeError::UnsupportedProtocolLevel(level))
                    if matches!(self.phase, Phase::AwaitingConnect) =>
                {
                    self.send(&Packet::ConnAck(ConnAck::new(
                        false,
                        ReasonCode::UnsupportedProtocolVersion,
                    )));
                    self.close(CloseReason::Malformed(
                        DecodeError::UnsupportedProtocolLevel(level),
                    ));
                }
                Err(e) => self.close(CloseReason::Malformed(e)),
            }
        }
    }

    fn handle_packet(&mut self, packet: Packet) {
        match (&self.phase, packet) {
            (Phase::AwaitingConnect, Packet::Connect(connect)) => self.handle_connect(connect),
            (Phase::AwaitingConnect, _) => self.close(CloseReason::ProtocolViolation(
                "first packet is not CONNECT",
            )),
            (Phase::Connected, Packet::Publish(publish)) => self.handle_publish(publish),
            (Phase::Connected, Packet::PubAck(ack)) => {
                self.complete_outbound(ack.packet_id, OutboundState::AwaitingPubAck)
            }
            (Phase::Connected, Packet::PubRec(ack)) => self.handle_pubrec(ack.packet_id),
            (Phase::Connected, Packet::PubRel(ack)) => {
                if let Some(s) = self.session.as_mut() {
                    if s.inbound_qos2.remove(&ack.packet_id) {
                        self.session_changed(SessionChange::InboundReleased {
                            packet_id: ack.packet_id,
                        });
                    }
                }
                self.send(&Packet::PubComp(PubAck::new(ack.packet_id)));
            }
            (Phase::Connected, Packet::PubComp(ack)) => {
                self.complete_outbound(ack.packet_id, OutboundState::AwaitingPubComp)
            }
            (Phase::Connected, Packet::Subscribe(sub)) => {
                if sub
                    .filters
                    .iter()
                    .any(|(f, o)| o.no_local && crate::topic::split_shared(f).is_some())
                {
                    // MQTT-3.8.3-4.
                    self.close(CloseReason::ProtocolViolation(
                        "No Local on a shared subscription",
                    ));
                    return;
                }
                self.events.push_back(Event::Subscribe(sub))
            }
            (Phase::Connected, Packet::Unsubscribe(unsub)) => {
                let mut reason_codes = Vec::with_capacity(unsub.filters.len());
                if let Some(s) = self.session.as_mut() {
                    for f in &unsub.filters {
                        reason_codes.push(match s.subscriptions.remove(f) {
                            Some(_) => ReasonCode::Success,
                            None => ReasonCode::NoSubscriptionExisted,
                        });
                    }
                }
                // The reason codes reach MQTT 5.0 clients only.
                self.send(&Packet::UnsubAck(UnsubAck {
                    packet_id: unsub.packet_id,
                    reason_codes,
                    properties: UnsubAckProperties::default(),
                }));
                self.events.push_back(Event::Unsubscribe(unsub.filters));
            }
            (Phase::Connected, Packet::PingReq) => self.send(&Packet::PingResp),
            (Phase::Connected, Packet::Disconnect(d)) => self.handle_disconnect(d),
            (Phase::Connected, Packet::Connect(_)) => {
                self.close(CloseReason::ProtocolViolation("second CONNECT"))
            }
            (Phase::Connected, _) => self.close(CloseReason::ProtocolViolation(
                "packet type not sent by clients",
            )),
            (Phase::Authenticating | Phase::Closed, _) => {}
        }
    }

    fn handle_disconnect(&mut self, d: Disconnect) {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.connect_session_expiry == 0 && expiry != 0 {
                // MQTT-3.14.2-2.
                self.close(CloseReason::ProtocolViolation(
                    "session expiry set by DISCONNECT after 0 in CONNECT",
                ));
                return;
            }
            self.session_expiry = expiry;
        }
        if d.reason == ReasonCode::DisconnectWithWillMessage {
            self.close(CloseReason::ClientDisconnectWithWill);
        } else {
            self.close(CloseReason::ClientDisconnect);
        }
    }

    fn handle_connect(&mut self, connect: Connect) {
        self.protocol = connect.protocol;
        let v5 = connect.protocol.is_v5();
        if v5 && connect.properties.authentication_method.is_some() {
            // No enhanced authentication method is supported (§4.12).
            self.phase = Phase::Authenticating;
            self.send(&Packet::ConnAck(ConnAck::new(
                false,
                ReasonCode::BadAuthenticationMethod,
            )));
            self.close(CloseReason::Refused(
                ConnectReturnCode::BadUsernameOrPassword,
            ));
            return;
        }
        if let Some(will) = &connect.will {
            if crate::topic::level_count(&will.topic) > self.limits.max_topic_levels {
                self.close(CloseReason::ProtocolViolation(
                    "will topic has too many levels",
                ));
                return;
            }
        }
        if connect.client_id.is_empty()
            && (!connect.clean_session || connect.protocol == ProtocolVersion::V31)
        {
            // MQTT-3.1.3-8: a zero-byte client id needs Clean Session 1; MQTT 3.1 needs an id.
            self.phase = Phase::Authenticating;
            self.refuse(ConnectReturnCode::IdentifierRejected);
            return;
        }
        let mut keep_alive = connect.keep_alive;
        let max = self.limits.max_keepalive;
        if v5 && max > 0 && (keep_alive == 0 || keep_alive > max) {
            keep_alive = max;
            self.server_keep_alive = Some(max);
        }
        self.keep_alive = keep_alive;
        self.max_inflight = self.limits.max_inflight.max(1);
        if v5 {
            let p = &connect.properties;
            self.session_expiry = p.session_expiry_interval.unwrap_or(0);
            if let Some(rm) = p.receive_maximum {
                self.max_inflight = self.max_inflight.min(rm.get());
            }
            self.client_max_packet = p.maximum_packet_size;
            self.client_alias_max = p.topic_alias_maximum.unwrap_or(0);
            self.problem_information = p.request_problem_information != Some(false);
            self.will_delay = connect
                .will
                .as_ref()
                .and_then(|w| w.properties.will_delay_interval)
                .unwrap_or(0);
        } else {
            self.session_expiry = if connect.clean_session { 0 } else { u32::MAX };
        }
        self.connect_session_expiry = self.session_expiry;
        self.will = connect.will.clone().map(Box::new);
        self.phase = Phase::Authenticating;
        self.events.push_back(Event::Connect(Box::new(connect)));
    }

    /// Accepts the CONNECT with `session` (new, or resumed when `session_present`): sends
    /// CONNACK, redelivers what was in flight with DUP set, and fills the in-flight window.
    pub fn accept(&mut self, session: Session, session_present: bool) {
        if !matches!(self.phase, Phase::Authenticating) {
            return;
        }
        self.phase = Phase::Connected;
        let mut ack = ConnAck::new(session_present, ReasonCode::Success);
        if self.protocol.is_v5() {
            let p = &mut ack.properties;
            p.receive_maximum = NonZeroU16::new(self.limits.receive_maximum);
            p.maximum_packet_size = u32::try_from(self.limits.max_packet_size)
                .ok()
                .and_then(NonZeroU32::new);
            p.topic_alias_maximum = Some(self.limits.topic_alias_maximum).filter(|&m| m > 0);
            p.retain_available = Some(true);
            p.wildcard_subscription_available = Some(true);
            p.subscription_identifiers_available = Some(true);
            p.shared_subscription_available = Some(true);
            p.server_keep_alive = self.server_keep_alive;
            p.assigned_client_identifier = self.assigned_client_id.take().map(|id| *id);
        }
        self.send(&Packet::ConnAck(ack));
        let mut session = session;
        let resend = std::mem::take(&mut session.inflight);
        for o in resend {
            match o.state {
                OutboundState::AwaitingPubComp => {
                    self.send(&Packet::PubRel(PubAck::new(o.packet_id)))
                }
                _ => {
                    if !self.encode_publish(&o.message, Some(o.packet_id), true) {
                        self.stats.dropped += 1;
                        self.finished(&o.message);
                        continue;
                    }
                }
            }
            session.inflight.push_back(o);
        }
        self.session = Some(session);
        self.fill_window();
    }

    /// Refuses the CONNECT with `code` (not `Accepted`) and closes.
    pub fn refuse(&mut self, code: ConnectReturnCode) {
        self.refuse_with(code.into(), "");
    }

    /// [`refuse`](Self::refuse) with an MQTT 5.0 reason code (an MQTT 3.1.1 client gets its
    /// [`ConnectReturnCode::from_reason`]) and, when the client accepts problem information,
    /// a reason string (empty: none). A code that is not a CONNACK refusal is ignored.
    pub fn refuse_with(&mut self, reason: ReasonCode, why: &str) {
        let Some(code) = ConnectReturnCode::from_reason(reason) else {
            return;
        };
        if !matches!(self.phase, Phase::Authenticating) || code == ConnectReturnCode::Accepted {
            return;
        }
        let mut ack = ConnAck::new(false, reason);
        if self.protocol.is_v5() && self.problem_information && !why.is_empty() {
            ack.properties.reason_string = MqttStr::try_from(why).ok();
        }
        self.send(&Packet::ConnAck(ack));
        self.close(CloseReason::Refused(code));
    }

    /// Answers a SUBSCRIBE: one code per requested filter, in order. Granted filters are recorded
    /// in the session. The host sends retained messages after this, with [`deliver`](Self::deliver).
    pub fn subscribed(&mut self, subscribe: &Subscribe, codes: Vec<ReasonCode>) {
        if let Some(s) = self.session.as_mut() {
            for ((filter, _), code) in subscribe.filters.iter().zip(&codes) {
                if let Some(q) = code.granted_qos() {
                    s.subscriptions.insert(filter.clone(), q);
                }
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            reason_codes: codes,
            properties: SubAckProperties::default(),
        }));
    }

    fn handle_publish(&mut self, mut publish: Publish) {
        self.stats.publish_received += 1;
        if !publish.properties.subscription_identifiers.is_empty() {
            // Subscription Identifiers are the server's to add on delivery; a PUBLISH from a
            // client with one is a Protocol Error (MQTT-3.3.4-6). The codec decodes them in
            // either direction, so the rule lives here, on the server side of the connection.
            self.close(CloseReason::ProtocolViolation(
                "PUBLISH from a client carries a Subscription Identifier (MQTT-3.3.4-6)",
            ));
            return;
        }
        if let Some(alias) = publish.properties.topic_alias.take() {
            // MQTT 5.0 only (§3.3.2.3.4): aliases are per connection, up to the announced maximum.
            if alias.get() > self.limits.topic_alias_maximum {
                self.close(CloseReason::Violation(
                    ReasonCode::TopicAliasInvalid,
                    "topic alias above Topic Alias Maximum",
                ));
                return;
            }
            if publish.topic.is_empty() {
                match self
                    .aliases
                    .as_ref()
                    .and_then(|a| a.inbound.get(&alias.get()))
                {
                    Some(t) => publish.topic = t.clone(),
                    None => {
                        self.close(CloseReason::ProtocolViolation("unknown topic alias"));
                        return;
                    }
                }
            } else {
                self.aliases
                    .get_or_insert_default()
                    .inbound
                    .insert(alias.get(), publish.topic.compact());
            }
        } else if publish.topic.is_empty() {
            self.close(CloseReason::ProtocolViolation("empty topic without alias"));
            return;
        }
        if self.protocol.is_v5() && publish.qos != QoS::AtMostOnce {
            let inflight = self.inbound_qos1 as usize
                + self.session.as_ref().map_or(0, |s| s.inbound_qos2.len());
            if inflight >= usize::from(self.limits.receive_maximum) {
                self.close(CloseReason::Violation(
                    ReasonCode::ReceiveMaximumExceeded,
                    "more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum",
                ));
                return;
            }
        }
        if crate::topic::level_count(&publish.topic) > self.limits.max_topic_levels {
            // MQTT 3.1.1 cannot refuse one PUBLISH; the connection is closed instead.
            self.close(CloseReason::ProtocolViolation(
                "topic name has too many levels",
            ));
            return;
        }
        let packet_id = publish.packet_id;
        let retransmitted = matches!((publish.qos, packet_id, &self.session),
            (QoS::ExactlyOnce, Some(id), Some(s)) if s.inbound_qos2.contains(&id));
        if !retransmitted {
            let second = rate_second(self.now);
            match self.rate.check(second, publish.payload.len(), &self.limits) {
                RateVerdict::Pass => {}
                RateVerdict::Throttle => {
                    self.throttle(publish.qos, packet_id);
                    return;
                }
                RateVerdict::Disconnect => {
                    self.stats.throttled += 1;
                    self.close(CloseReason::Violation(
                        ReasonCode::MessageRateTooHigh,
                        "publish rate over the limit for too long",
                    ));
                    return;
                }
            }
        }
        match (publish.qos, packet_id) {
            (QoS::ExactlyOnce, Some(id)) => {
                let Some(session) = self.session.as_mut() else {
                    return;
                };
                if !session.inbound_qos2.insert(id) {
                    // A retransmission of a message already handed over: acknowledge only.
                    self.acks.push_back(PendingAck {
                        packet_id: id,
                        qos: QoS::ExactlyOnce,
                        done: true,
                        reason: ReasonCode::Success,
                    });
                    self.flush_acks();
                    return;
                }
                self.acks.push_back(PendingAck {
                    packet_id: id,
                    qos: QoS::ExactlyOnce,
                    done: false,
                    reason: ReasonCode::Success,
                });
            }
            (QoS::AtLeastOnce, Some(id)) => {
                self.inbound_qos1 += 1;
                self.acks.push_back(PendingAck {
                    packet_id: id,
                    qos: QoS::AtLeastOnce,
                    done: false,
                    reason: ReasonCode::Success,
                })
            }
            _ => {}
        }
        let message = if self.protocol.is_v5() {
            Message::from_publish(publish, self.now)
        } else {
            Message::new(publish.topic, publish.payload, publish.qos, publish.retain)
        };
        self.events.push_back(Event::Publish { message, packet_id });
    }

    /// Drops a PUBLISH over the client's rate: MQTT 5.0 QoS 1/2 get 0x97 Quota exceeded (a
    /// QoS 2 exchange ends at its PUBREC); MQTT 3.1.1 cannot refuse, so QoS 1/2 get a plain
    /// acknowledgement (QoS 2: its PUBREL is answered as usual).
    fn throttle(&mut self, qos: QoS, packet_id: Option<PacketId>) {
        self.stats.throttled += 1;
        let Some(id) = packet_id else {
            return;
        };
        let reason = if self.protocol.is_v5() {
            ReasonCode::QuotaExceeded
        } else {
            if qos == QoS::ExactlyOnce {
                if let Some(s) = self.session.as_mut() {
                    s.inbound_qos2.insert(id);
                }
            }
            ReasonCode::Success
        };
        self.acks.push_back(PendingAck {
            packet_id: id,
            qos,
            done: true,
            reason,
        });
        self.flush_acks();
    }

    /// Marks the inbound QoS 1/2 message `packet_id` as handled; PUBACK/PUBREC go out in the
    /// order the PUBLISH packets arrived (MQTT-4.6.0-2/3).
    pub fn acknowledge(&mut self, packet_id: PacketId) {
        self.acknowledge_with(packet_id, ReasonCode::Success)
    }

    /// [`acknowledge`](Self::acknowledge) with a reason code for MQTT 5.0 clients (e.g. 0x10
    /// No matching subscribers, 0x87 Not authorized); MQTT 3.1.1 clients see a plain
    /// acknowledgement. An error code ends a QoS 2 exchange at the PUBREC.
    pub fn acknowledge_with(&mut self, packet_id: PacketId, reason: ReasonCode) {
        if let Some(a) = self
            .acks
            .iter_mut()
            .find(|a| a.packet_id == packet_id && !a.done)
        {
            a.done = true;
            a.reason = reason;
        }
        self.flush_acks();
    }

    fn flush_acks(&mut self) {
        while self.acks.front().is_some_and(|a| a.done) {
            let Some(a) = self.acks.pop_front() else {
                break;
            };
            let mut ack = PubAck::new(a.packet_id);
            ack.reason = a.reason;
            let packet = match a.qos {
                QoS::ExactlyOnce => {
                    if a.reason.is_error() {
                        if let Some(s) = self.session.as_mut() {
                            if s.inbound_qos2.remove(&a.packet_id) {
                                self.session_changed(SessionChange::InboundReleased {
                                    packet_id: a.packet_id,
                                });
                            }
                        }
                    }
                    Packet::PubRec(ack)
                }
                _ => {
                    self.inbound_qos1 = self.inbound_qos1.saturating_sub(1);
                    Packet::PubAck(ack)
                }
            };
            self.send(&packet);
        }
    }

    fn handle_pubrec(&mut self, id: PacketId) {
        if let Some(s) = self.session.as_mut() {
            if let Some(i) = s.inflight_position(id, OutboundState::AwaitingPubRec) {
                s.inflight[i].state = OutboundState::AwaitingPubComp;
                if let Some(seq) = s.inflight[i].message.store_seq {
                    self.session_changed(SessionChange::Received { seq, packet_id: id });
                }
            }
        }
        self.send(&Packet::PubRel(PubAck::new(id)));
    }

    fn complete_outbound(&mut self, id: PacketId, state: OutboundState) {
        if let Some(s) = self.session.as_mut() {
            if let Some(i) = s.inflight_position(id, state) {
                if let Some(done) = s.inflight.remove(i) {
                    self.finished(&done.message);
                }
            }
        }
        self.fill_window();
    }

    /// Delivers `message` with the delivery's `qos` (already the minimum of the publish and the
    /// subscription) and RETAIN flag, at the time last seen.
    pub fn deliver(&mut self, message: &Message, qos: QoS, retain: bool) -> Delivered {
        self.deliver_with(message, Delivery::new(qos, retain), self.now)
    }

    /// Delivers `message` as `delivery` says at `now`. An expired message is dropped; one
    /// larger than the client's Maximum Packet Size is dropped (counted).
    pub fn deliver_with(
        &mut self,
        message: &Message,
        delivery: Delivery<'_>,
        now: Instant,
    ) -> Delivered {
        self.now = now;
        if !self.is_connected() {
            return Delivered::Dropped;
        }
        let Delivery {
            qos,
            retain,
            subscription_ids,
            share,
            store_seq,
        } = delivery;
        if message.is_expired(now) {
            if let Some(seq) = store_seq {
                self.session_changed(SessionChange::Finished { seq });
            }
            return Delivered::Dropped;
        }
        if qos == QoS::AtMostOnce {
            if self.transmit.len() >= self.limits.max_transmit_buffer {
                self.stats.dropped += 1;
                return Delivered::Dropped;
            }
            if !self.encode_publish_with(
                message,
                QoS::AtMostOnce,
                retain,
                None,
                false,
                subscription_ids,
            ) {
                self.stats.dropped += 1;
                return Delivered::Dropped;
            }
            return Delivered::Sent;
        }
        let mut m = message.clone();
        m.qos = qos;
        m.retain = retain;
        if !subscription_ids.is_empty() {
            m.subscription_ids = subscription_ids.to_vec();
        }
        m.share = share.cloned();
        m.store_seq = store_seq;
        let max_queued = self.limits.max_queued;
        let Some(session) = self.session.as_mut() else {
            return Delivered::Dropped;
        };
        if session.queued.is_empty() && session.inflight.len() < usize::from(self.max_inflight) {
            if self.send_inflight(m) {
                Delivered::Sent
            } else {
                self.stats.dropped += 1;
                Delivered::Dropped
            }
        } else if session.queued.len() < max_queued {
            session.queued.push_back(m);
            Delivered::Queued
        } else {
            session.dropped += 1;
            self.stats.dropped += 1;
            self.finished(&m);
            Delivered::Dropped
        }
    }

    /// Moves queued messages into the in-flight window while it has room.
    fn fill_window(&mut self) {
        loop {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            if session.inflight.len() >= usize::from(self.max_inflight) {
                return;
            }
            let Some(m) = session.queued.pop_front() else {
                return;
            };
            let seq = m.store_seq;
            let sent = if m.is_expired(self.now) {
                false
            } else if m.qos == QoS::AtMostOnce {
                self.encode_publish(&m, None, false)
            } else {
                self.send_inflight(m)
            };
            if !sent {
                self.stats.dropped += 1;
                if let Some(seq) = seq {
                    self.session_changed(SessionChange::Finished { seq });
                }
            }
        }
    }

    /// Sends a QoS 1/2 message with a new packet id; false when it could not be sent (larger
    /// than the client's Maximum Packet Size).
    fn send_inflight(&mut self, message: Message) -> bool {
        let Some(session) = self.session.as_mut() else {
            return false;
        };
        let id = session.allocate_packet_id();
        let state = if message.qos == QoS::ExactlyOnce {
            OutboundState::AwaitingPubRec
        } else {
            OutboundState::AwaitingPubAck
        };
        if !self.encode_publish(&message, Some(id), false) {
            return false;
        }
        if let Some(seq) = message.store_seq {
            self.session_changed(SessionChange::Sent { seq, packet_id: id });
        }
        if let Some(session) = self.session.as_mut() {
            session.inflight.push_back(Outbound {
                packet_id: id,
                message,
                state,
            });
        }
        true
    }

    fn encode_publish(&mut self, m: &Message, packet_id: Option<PacketId>, dup: bool) -> bool {
        self.encode_publish_with(m, m.qos, m.retain, packet_id, dup, &m.subscription_ids)
    }

    /// Appends a PUBLISH for `m`; false (nothing appended) when it cannot be sent: larger
    /// than the client's Maximum Packet Size.
    fn encode_publish_with(
        &mut self,
        m: &Message,
        qos: QoS,
        retain: bool,
        packet_id: Option<PacketId>,
        dup: bool,
        subscription_ids: &[NonZeroU32],
    ) -> bool {
        // Outbound topic alias: an existing one replaces the topic; a free one is assigned
        // (and sent with the topic) once the packet is known to fit.
        let outbound = self.aliases.as_ref().map(|a| &a.outbound);
        let (alias, new_alias) = match outbound.and_then(|o| o.get(&m.topic)) {
            Some(&a) => (Some(a), false),
            None => {
                let used = outbound.map_or(0, HashMap::len);
                if used < usize::from(self.client_alias_max) {
                    (Some(used as u16 + 1), true)
                } else {
                    (None, false)
                }
            }
        };
        let target = Target {
            protocol: self.protocol,
            client_max_packet: self.client_max_packet,
        };
        let send_topic = alias.is_none() || new_alias;
        if !target.encode_publish(
            m,
            PublishShape {
                qos,
                retain,
                packet_id,
                dup,
                subscription_ids,
                alias,
                send_topic,
            },
            self.now,
            &mut self.transmit,
        ) {
            return false;
        }
        if let (true, Some(a)) = (new_alias, alias) {
            self.aliases
                .get_or_insert_default()
                .outbound
                .insert(m.topic.compact(), a);
        }
        self.stats.publish_sent += 1;
        self.stats.packets_sent += 1;
        true
    }

    fn send(&mut self, packet: &Packet) {
        // Cannot fail for the packets the broker sends (fixed size, or SUBACKs far below the limit).
        if codec::encode(packet, self.protocol, &mut self.transmit).is_ok() {
            self.stats.packets_sent += 1;
        }
    }

    /// Ends the connection for `reason` (host-initiated: transport closed, takeover, shutdown).
    /// Does nothing if already closed.
    pub fn close(&mut self, reason: CloseReason) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        let was_connected = matches!(self.phase, Phase::Connected);
        self.phase = Phase::Closed;
        if was_connected && self.protocol.is_v5() {
            if let Some(code) = reason.disconnect_code() {
                let mut properties = DisconnectProperties::default();
                let why = reason.reason_string();
                if self.problem_information && !why.is_empty() {
                    properties.reason_string = MqttStr::try_from(why).ok();
                }
                self.send(&Packet::Disconnect(Disconnect {
                    reason: code,
                    properties,
                }));
            }
        }
        let now = self.now;
        let will = self
            .will
            .take()
            .filter(|_| was_connected && reason.publishes_will());
        self.events.push_back(Event::Closed {
            reason,
            will: will.map(|w| Message::from_will(*w, now)),
        });
    }
}

/// What encoding a PUBLISH for one client depends on, beyond the message: its protocol and
/// the largest packet it accepts.
#[derive(Debug, Clone, Copy)]
struct Target {
    protocol: ProtocolVersion,
    client_max_packet: Option<NonZeroU32>,
}

/// How one PUBLISH goes out.
struct PublishShape<'a> {
    qos: QoS,
    retain: bool,
    packet_id: Option<PacketId>,
    dup: bool,
    subscription_ids: &'a [NonZeroU32],
    /// The topic alias to send (MQTT 5.0).
    alias: Option<u16>,
    /// Whether the topic name goes too (always without an alias; with a new one).
    send_topic: bool,
}

impl Target {
    /// Appends the PUBLISH for `m` to `out`; false (and `out` unchanged) when it cannot be
    /// encoded or is larger than the client accepts (MQTT-3.1.2-24).
    #[inline]
    fn encode_publish(
        &self,
        m: &Message,
        shape: PublishShape<'_>,
        now: Instant,
        out: &mut BytesMut,
    ) -> bool {
        // Cannot fail otherwise: the topic came from a decoded packet (≤ 65535 bytes) and the
        // payload from a packet no larger than the maximum Remaining Length.
        let start = out.len();
        let PublishShape {
            qos,
            retain,
            packet_id,
            dup,
            subscription_ids,
            alias,
            send_topic,
        } = shape;
        let no_topic = MqttStr::default();
        let topic = if send_topic { &m.topic } else { &no_topic };
        let encoded = if self.protocol.is_v5() {
            let owned;
            let empty = PublishProperties::default();
            let base = m.properties.as_deref().unwrap_or(&empty);
            let props = if m.expires_at.is_some() || !subscription_ids.is_empty() || alias.is_some()
            {
                let mut p = base.clone();
                p.message_expiry_interval = m.remaining_expiry(now);
                p.subscription_identifiers = subscription_ids.to_vec();
                p.topic_alias = alias.and_then(NonZeroU16::new);
                owned = p;
                &owned
            } else {
                base
            };
            codec::encode_publish_parts_v5(
                topic, &m.payload, qos, packet_id, retain, dup, props, out,
            )
        } else {
            codec::encode_publish_parts(&m.topic, &m.payload, qos, packet_id, retain, dup, out)
        };
        if encoded.is_err() {
            out.truncate(start);
            return false;
        }
        if let Some(max) = self.client_max_packet.map(NonZeroU32::get) {
            if out.len() - start > max as usize {
                out.truncate(start);
                return false;
            }
        }
        true
    }
}

/// Encodes QoS 0 PUBLISH packets for one connected client without its [`Connection`]: the
/// host may write them to the client's socket while the connection has nothing else to send
/// (see [`Connection::qos0_encoder`]), then reports them with
/// [`Connection::count_sent_elsewhere`].
#[derive(Debug, Clone, Copy)]
pub struct Qos0Encoder {
    target: Target,
}

impl Qos0Encoder {
    /// Appends the QoS 0 PUBLISH of `message` (RETAIN as given, with the matching
    /// subscriptions' identifiers) to `out`; false when it must be dropped instead: expired
    /// (MQTT-3.3.2-5) or larger than the client accepts.
    pub fn encode(
        &self,
        message: &Message,
        retain: bool,
        subscription_ids: &[NonZeroU32],
        now: Instant,
        out: &mut BytesMut,
    ) -> bool {
        !message.is_expired(now)
            && self.target.encode_publish(
                message,
                PublishShape {
                    qos: QoS::AtMostOnce,
                    retain,
                    packet_id: None,
                    dup: false,
                    subscription_ids,
                    alias: None,
                    send_topic: true,
                },
                now,
                out,
            )
    }
}
