//! The MQTT control packets as Rust values (what the codec decodes to and encodes from).
//!
//! One set of types serves MQTT 3.1, 3.1.1 and 5.0. Fields that only 5.0 has (reason codes of
//! acknowledgements, properties, subscription options beyond QoS) are defaults when a 3.1.1
//! packet is decoded, and are left out when one is encoded: see [`codec`](crate::codec) for
//! exactly what an MQTT 3.1.1 peer sees.

use bytes::Bytes;

use crate::properties::*;
use crate::reason::ReasonCode;
use crate::types::{MqttStr, PacketId, ProtocolVersion, QoS};

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client request to connect.
    Connect(Connect),
    /// Connect acknowledgement.
    ConnAck(ConnAck),
    /// Application message.
    Publish(Publish),
    /// QoS 1 acknowledgement.
    PubAck(PubAck),
    /// QoS 2 delivery, part 1.
    PubRec(PubAck),
    /// QoS 2 delivery, part 2.
    PubRel(PubAck),
    /// QoS 2 delivery, part 3.
    PubComp(PubAck),
    /// Subscribe request.
    Subscribe(Subscribe),
    /// Subscribe acknowledgement.
    SubAck(SubAck),
    /// Unsubscribe request.
    Unsubscribe(Unsubscribe),
    /// Unsubscribe acknowledgement.
    UnsubAck(UnsubAck),
    /// Ping request.
    PingReq,
    /// Ping response.
    PingResp,
    /// Disconnect notification (from the client; in MQTT 5.0 also from the server).
    Disconnect(Disconnect),
    /// Authentication exchange (MQTT 5.0 only).
    Auth(Auth),
}

impl Packet {
    /// The packet's name as the specification writes it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol revision from the protocol name and level; the CONNECT is encoded for it.
    pub protocol: ProtocolVersion,
    /// Clean Session flag (Clean Start in MQTT 5.0).
    pub clean_session: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty.
    pub client_id: MqttStr,
    /// Will message, when the Will flag is set.
    pub will: Option<LastWill>,
    /// User name, when its flag is set.
    pub username: Option<MqttStr>,
    /// Password, when its flag is set (binary data). MQTT 5.0 allows it without a user name.
    pub password: Option<Bytes>,
    /// CONNECT properties (MQTT 5.0).
    pub properties: ConnectProperties,
}

/// The Will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Topic the will is published to.
    pub topic: MqttStr,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain flag.
    pub retain: bool,
    /// Will Properties (MQTT 5.0).
    pub properties: WillProperties,
}

/// CONNACK return codes of MQTT 3.1.1 (§3.2.2.3): the 3.1.1 view of a CONNACK's
/// [`ReasonCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    /// 0x00 Connection accepted.
    Accepted = 0,
    /// 0x01 The Server does not support the level of the MQTT protocol requested.
    UnacceptableProtocolVersion = 1,
    /// 0x02 The Client identifier is correct UTF-8 but not allowed.
    IdentifierRejected = 2,
    /// 0x03 The MQTT service is unavailable.
    ServerUnavailable = 3,
    /// 0x04 The data in the user name or password is malformed (or wrong).
    BadUsernameOrPassword = 4,
    /// 0x05 The Client is not authorized to connect.
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    /// The code for a wire byte, `None` for reserved values.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Accepted,
            1 => Self::UnacceptableProtocolVersion,
            2 => Self::IdentifierRejected,
            3 => Self::ServerUnavailable,
            4 => Self::BadUsernameOrPassword,
            5 => Self::NotAuthorized,
            _ => return None,
        })
    }

    /// The 3.1.1 code a CONNACK reason code is sent as to an MQTT 3.1.1 client: the six codes
    /// with a 3.1.1 twin map to it; Banned to Not authorized, Bad authentication method to Bad
    /// user name or password; every other refusal to Server unavailable. `None` for a code that
    /// is not a CONNACK code at all.
    pub fn from_reason(code: ReasonCode) -> Option<Self> {
        use ReasonCode as R;
        if !code.allowed_in(2) {
            return None;
        }
        Some(match code {
            R::Success => Self::Accepted,
            R::UnsupportedProtocolVersion => Self::UnacceptableProtocolVersion,
            R::ClientIdentifierNotValid => Self::IdentifierRejected,
            R::BadUserNameOrPassword | R::BadAuthenticationMethod => Self::BadUsernameOrPassword,
            R::NotAuthorized | R::Banned => Self::NotAuthorized,
            _ => Self::ServerUnavailable,
        })
    }
}

impl From<ConnectReturnCode> for ReasonCode {
    /// The MQTT 5.0 reason code with the same meaning.
    fn from(code: ConnectReturnCode) -> ReasonCode {
        match code {
            ConnectReturnCode::Accepted => ReasonCode::Success,
            ConnectReturnCode::UnacceptableProtocolVersion => {
                ReasonCode::UnsupportedProtocolVersion
            }
            ConnectReturnCode::IdentifierRejected => ReasonCode::ClientIdentifierNotValid,
            ConnectReturnCode::ServerUnavailable => ReasonCode::ServerUnavailable,
            ConnectReturnCode::BadUsernameOrPassword => ReasonCode::BadUserNameOrPassword,
            ConnectReturnCode::NotAuthorized => ReasonCode::NotAuthorized,
        }
    }
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// Connect Reason Code; an MQTT 3.1.1 client gets its
    /// [`ConnectReturnCode::from_reason`], and a 3.1.1 CONNACK decodes to the twin of its return code.
    pub reason: ReasonCode,
    /// CONNACK properties (MQTT 5.0).
    pub properties: ConnAckProperties,
}

impl ConnAck {
    /// A CONNACK with `reason` and no properties.
    pub fn new(session_present: bool, reason: ReasonCode) -> Self {
        ConnAck {
            session_present,
            reason,
            properties: ConnAckProperties::default(),
        }
    }
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// DUP flag: this may be a redelivery.
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (never contains wildcards). Empty only in MQTT 5.0 with a Topic Alias, which
    /// the receiver resolves.
    pub topic: MqttStr,
    /// Packet identifier, present exactly when `qos > 0`.
    pub packet_id: Option<PacketId>,
    /// Application payload.
    pub payload: Bytes,
    /// PUBLISH properties (MQTT 5.0).
    pub properties: PublishProperties,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: the packet id acknowledged, with a reason code and
/// properties in MQTT 5.0 (an MQTT 3.1.1 peer sees only the packet id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Packet identifier of the PUBLISH (or PUBREC/PUBREL) being answered.
    pub packet_id: PacketId,
    /// Reason code (Success when the packet omits it).
    pub reason: ReasonCode,
    /// Properties.
    pub properties: PubAckProperties,
}

impl PubAck {
    /// A successful acknowledgement of `packet_id` without properties (the only kind MQTT 3.1.1 has).
    pub fn new(packet_id: PacketId) -> Self {
        PubAck {
            packet_id,
            reason: ReasonCode::Success,
            properties: PubAckProperties::default(),
        }
    }
}

/// Retain Handling subscription option (MQTT 5.0, §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages when the subscription is made.
    #[default]
    SendOnSubscribe = 0,
    /// 1: send them only if the subscription did not exist yet.
    SendIfNew = 1,
    /// 2: do not send retained messages on subscribe.
    DoNotSend = 2,
}

/// Subscription options of one SUBSCRIBE filter. MQTT 3.1.1 has only the QoS; the other options
/// decode to their defaults there and are not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local: do not receive one's own publications.
    pub no_local: bool,
    /// Retain As Published: keep the RETAIN flag on forwarded messages.
    pub retain_as_published: bool,
    /// Retain Handling.
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with maximum QoS `qos` and every other option at its default (what 3.1.1 means).
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendOnSubscribe,
        }
    }
}

impl From<QoS> for SubscriptionOptions {
    fn from(qos: QoS) -> Self {
        SubscriptionOptions::new(qos)
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Requested topic filters (at least one) with their options.
    pub filters: Vec<(MqttStr, SubscriptionOptions)>,
    /// SUBSCRIBE properties (MQTT 5.0).
    pub properties: SubscribeProperties,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// One code per requested filter, in order: [`ReasonCode::granted`] or a refusal. An
    /// MQTT 3.1.1 client sees every refusal as 0x80, and a 3.1.1 0x80 decodes to
    /// [`ReasonCode::UnspecifiedError`].
    pub reason_codes: Vec<ReasonCode>,
    /// SUBACK properties (MQTT 5.0).
    pub properties: SubAckProperties,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Topic filters to remove (at least one).
    pub filters: Vec<MqttStr>,
    /// UNSUBSCRIBE properties (MQTT 5.0).
    pub properties: UnsubscribeProperties,
}

/// UNSUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// One code per filter, in order (MQTT 5.0; an MQTT 3.1.1 UNSUBACK has none, and decodes
    /// to an empty list).
    pub reason_codes: Vec<ReasonCode>,
    /// UNSUBACK properties (MQTT 5.0).
    pub properties: UnsubAckProperties,
}

/// DISCONNECT. MQTT 3.1.1 has neither reason nor properties: it decodes to Normal
/// disconnection and is sent as the two bytes `E0 00` whatever the fields hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Disconnect Reason Code (Normal disconnection when the packet omits it).
    pub reason: ReasonCode,
    /// DISCONNECT properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with `reason` and no properties.
    pub fn new(reason: ReasonCode) -> Self {
        Disconnect {
            reason,
            properties: DisconnectProperties::default(),
        }
    }
}

/// AUTH (MQTT 5.0 only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Authenticate Reason Code: Success, Continue authentication or Re-authenticate.
    pub reason: ReasonCode,
    /// AUTH properties.
    pub properties: AuthProperties,
}
