//! The MQTT control packets as Rust values (what the codec decodes to and encodes from).

use bytes::Bytes;

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
    PubAck(PacketId),
    /// QoS 2 delivery, part 1.
    PubRec(PacketId),
    /// QoS 2 delivery, part 2.
    PubRel(PacketId),
    /// QoS 2 delivery, part 3.
    PubComp(PacketId),
    /// Subscribe request.
    Subscribe(Subscribe),
    /// Subscribe acknowledgement.
    SubAck(SubAck),
    /// Unsubscribe request.
    Unsubscribe(Unsubscribe),
    /// Unsubscribe acknowledgement.
    UnsubAck(PacketId),
    /// Ping request.
    PingReq,
    /// Ping response.
    PingResp,
    /// Client is disconnecting cleanly.
    Disconnect,
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
            Packet::Disconnect => "DISCONNECT",
        }
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol revision from the protocol name and level.
    pub protocol: ProtocolVersion,
    /// Clean Session flag.
    pub clean_session: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty.
    pub client_id: MqttStr,
    /// Will message, when the Will flag is set.
    pub will: Option<LastWill>,
    /// User name, when its flag is set.
    pub username: Option<MqttStr>,
    /// Password, when its flag is set (binary data).
    pub password: Option<Bytes>,
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
}

/// CONNACK return codes of MQTT 3.1.1 (§3.2.2.3).
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
}

/// CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Session Present flag.
    pub session_present: bool,
    /// Return code.
    pub code: ConnectReturnCode,
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
    /// Topic name (never contains wildcards).
    pub topic: MqttStr,
    /// Packet identifier, present exactly when `qos > 0`.
    pub packet_id: Option<PacketId>,
    /// Application payload.
    pub payload: Bytes,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Requested topic filters (at least one) with their maximum QoS.
    pub filters: Vec<(MqttStr, QoS)>,
}

/// One entry of a SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeReturnCode {
    /// Subscription accepted with this maximum QoS.
    Success(QoS),
    /// 0x80 Failure.
    Failure,
}

impl SubscribeReturnCode {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            SubscribeReturnCode::Success(q) => q as u8,
            SubscribeReturnCode::Failure => 0x80,
        }
    }
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// One code per requested filter, in order.
    pub return_codes: Vec<SubscribeReturnCode>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub packet_id: PacketId,
    /// Topic filters to remove (at least one).
    pub filters: Vec<MqttStr>,
}
