//! MQTT 5.0 properties (§2.2.2): one typed struct per packet kind, and the one decoder and
//! encoder they share.
//!
//! On the wire a property set is a Variable Byte Integer length followed by properties, each an
//! identifier (a Variable Byte Integer) and a value of the type the identifier fixes. Every
//! struct here is `Default` = no properties; absent properties are `None` (their meaning when
//! absent is the specification's default, which the state machine applies). User Properties keep
//! their order. Values that cannot be valid are unrepresentable where a type can say so
//! (`NonZeroU16` for Receive Maximum, `bool` for the 0/1 bytes).
//!
//! Decoding refuses, by named rule: an unknown identifier, an identifier not allowed on the
//! packet, a property given twice (other than User Property, and Subscription Identifier in
//! PUBLISH), a value out of range, a property length beyond the packet, and a value that runs
//! past the property length.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{DecodeError, EncodeError, MAX_REMAINING_LENGTH};
use crate::topic;
use crate::types::{MqttStr, QoS};

/// The largest value a Variable Byte Integer can hold (§1.5.5), which bounds Subscription
/// Identifiers.
pub const MAX_VARIABLE_BYTE_INTEGER: u32 = 268_435_455;

/// A property identifier (Table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum PropertyId {
    /// 0x01 Payload Format Indicator (Byte).
    PayloadFormatIndicator = 0x01,
    /// 0x02 Message Expiry Interval (Four Byte Integer).
    MessageExpiryInterval = 0x02,
    /// 0x03 Content Type (UTF-8 string).
    ContentType = 0x03,
    /// 0x08 Response Topic (UTF-8 string).
    ResponseTopic = 0x08,
    /// 0x09 Correlation Data (Binary Data).
    CorrelationData = 0x09,
    /// 0x0B Subscription Identifier (Variable Byte Integer).
    SubscriptionIdentifier = 0x0B,
    /// 0x11 Session Expiry Interval (Four Byte Integer).
    SessionExpiryInterval = 0x11,
    /// 0x12 Assigned Client Identifier (UTF-8 string).
    AssignedClientIdentifier = 0x12,
    /// 0x13 Server Keep Alive (Two Byte Integer).
    ServerKeepAlive = 0x13,
    /// 0x15 Authentication Method (UTF-8 string).
    AuthenticationMethod = 0x15,
    /// 0x16 Authentication Data (Binary Data).
    AuthenticationData = 0x16,
    /// 0x17 Request Problem Information (Byte).
    RequestProblemInformation = 0x17,
    /// 0x18 Will Delay Interval (Four Byte Integer).
    WillDelayInterval = 0x18,
    /// 0x19 Request Response Information (Byte).
    RequestResponseInformation = 0x19,
    /// 0x1A Response Information (UTF-8 string).
    ResponseInformation = 0x1A,
    /// 0x1C Server Reference (UTF-8 string).
    ServerReference = 0x1C,
    /// 0x1F Reason String (UTF-8 string).
    ReasonString = 0x1F,
    /// 0x21 Receive Maximum (Two Byte Integer).
    ReceiveMaximum = 0x21,
    /// 0x22 Topic Alias Maximum (Two Byte Integer).
    TopicAliasMaximum = 0x22,
    /// 0x23 Topic Alias (Two Byte Integer).
    TopicAlias = 0x23,
    /// 0x24 Maximum QoS (Byte).
    MaximumQoS = 0x24,
    /// 0x25 Retain Available (Byte).
    RetainAvailable = 0x25,
    /// 0x26 User Property (UTF-8 string pair).
    UserProperty = 0x26,
    /// 0x27 Maximum Packet Size (Four Byte Integer).
    MaximumPacketSize = 0x27,
    /// 0x28 Wildcard Subscription Available (Byte).
    WildcardSubscriptionAvailable = 0x28,
    /// 0x29 Subscription Identifier Available (Byte).
    SubscriptionIdentifierAvailable = 0x29,
    /// 0x2A Shared Subscription Available (Byte).
    SharedSubscriptionAvailable = 0x2A,
}

impl PropertyId {
    /// The identifier for a decoded value; `None` for one Table 2-4 does not define.
    pub fn from_u32(id: u32) -> Option<PropertyId> {
        use PropertyId::*;
        Some(match id {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQoS,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    /// The name the specification gives the property.
    pub fn name(self) -> &'static str {
        use PropertyId::*;
        match self {
            PayloadFormatIndicator => "Payload Format Indicator",
            MessageExpiryInterval => "Message Expiry Interval",
            ContentType => "Content Type",
            ResponseTopic => "Response Topic",
            CorrelationData => "Correlation Data",
            SubscriptionIdentifier => "Subscription Identifier",
            SessionExpiryInterval => "Session Expiry Interval",
            AssignedClientIdentifier => "Assigned Client Identifier",
            ServerKeepAlive => "Server Keep Alive",
            AuthenticationMethod => "Authentication Method",
            AuthenticationData => "Authentication Data",
            RequestProblemInformation => "Request Problem Information",
            WillDelayInterval => "Will Delay Interval",
            RequestResponseInformation => "Request Response Information",
            ResponseInformation => "Response Information",
            ServerReference => "Server Reference",
            ReasonString => "Reason String",
            ReceiveMaximum => "Receive Maximum",
            TopicAliasMaximum => "Topic Alias Maximum",
            TopicAlias => "Topic Alias",
            MaximumQoS => "Maximum QoS",
            RetainAvailable => "Retain Available",
            UserProperty => "User Property",
            MaximumPacketSize => "Maximum Packet Size",
            WildcardSubscriptionAvailable => "Wildcard Subscription Available",
            SubscriptionIdentifierAvailable => "Subscription Identifier Available",
            SharedSubscriptionAvailable => "Shared Subscription Available",
        }
    }

    fn bit(self) -> u64 {
        1 << (self as u8)
    }
}

impl fmt::Display for PropertyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The Payload Format Indicator: what the payload of a PUBLISH or a Will is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PayloadFormat {
    /// 0: unspecified bytes (the same as no indicator).
    #[default]
    Unspecified = 0,
    /// 1: UTF-8 encoded character data.
    Utf8 = 1,
}

/// A user property: name and value, both UTF-8 strings.
pub type UserProperty = (MqttStr, MqttStr);

/// CONNECT properties (§3.1.2.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectProperties {
    /// Session Expiry Interval in seconds (absent: 0, the session ends with the connection).
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum (absent: 65,535).
    pub receive_maximum: Option<NonZeroU16>,
    /// Maximum Packet Size the client accepts (absent: no limit).
    pub maximum_packet_size: Option<NonZeroU32>,
    /// Topic Alias Maximum the client accepts (absent: 0).
    pub topic_alias_maximum: Option<u16>,
    /// Request Response Information (absent: false).
    pub request_response_information: Option<bool>,
    /// Request Problem Information (absent: true).
    pub request_problem_information: Option<bool>,
    /// Authentication Method for extended authentication.
    pub authentication_method: Option<MqttStr>,
    /// Authentication Data (only with an Authentication Method).
    pub authentication_data: Option<Bytes>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// Will Properties of a CONNECT payload (§3.1.3.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WillProperties {
    /// Will Delay Interval in seconds (absent: 0).
    pub will_delay_interval: Option<u32>,
    /// Payload Format Indicator of the will payload.
    pub payload_format: Option<PayloadFormat>,
    /// Message Expiry Interval of the will message in seconds.
    pub message_expiry_interval: Option<u32>,
    /// Content Type.
    pub content_type: Option<MqttStr>,
    /// Response Topic (a valid topic name).
    pub response_topic: Option<MqttStr>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// CONNACK properties (§3.2.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAckProperties {
    /// Session Expiry Interval the server uses instead of the client's.
    pub session_expiry_interval: Option<u32>,
    /// Receive Maximum of the server (absent: 65,535).
    pub receive_maximum: Option<NonZeroU16>,
    /// Maximum QoS the server supports: 0 or 1 (absent: 2). Encoding QoS 2 is an error.
    pub maximum_qos: Option<QoS>,
    /// Retain Available (absent: true).
    pub retain_available: Option<bool>,
    /// Maximum Packet Size the server accepts (absent: no limit).
    pub maximum_packet_size: Option<NonZeroU32>,
    /// Assigned Client Identifier, for a CONNECT with an empty one.
    pub assigned_client_identifier: Option<MqttStr>,
    /// Topic Alias Maximum the server accepts (absent: 0).
    pub topic_alias_maximum: Option<u16>,
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
    /// Wildcard Subscription Available (absent: true).
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription Identifier Available (absent: true).
    pub subscription_identifiers_available: Option<bool>,
    /// Shared Subscription Available (absent: true).
    pub shared_subscription_available: Option<bool>,
    /// Server Keep Alive, which replaces the client's Keep Alive.
    pub server_keep_alive: Option<u16>,
    /// Response Information.
    pub response_information: Option<MqttStr>,
    /// Server Reference (another server to use).
    pub server_reference: Option<MqttStr>,
    /// Authentication Method.
    pub authentication_method: Option<MqttStr>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH properties (§3.3.2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishProperties {
    /// Payload Format Indicator.
    pub payload_format: Option<PayloadFormat>,
    /// Message Expiry Interval in seconds (absent: the message does not expire).
    pub message_expiry_interval: Option<u32>,
    /// Topic Alias (never 0).
    pub topic_alias: Option<NonZeroU16>,
    /// Response Topic (a valid topic name).
    pub response_topic: Option<MqttStr>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
    /// Subscription Identifiers of the subscriptions that matched (server to client; at most
    /// [`MAX_VARIABLE_BYTE_INTEGER`] each).
    pub subscription_identifiers: Vec<NonZeroU32>,
    /// Content Type.
    pub content_type: Option<MqttStr>,
}

/// Properties of PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4.2.2 and the sections after it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubAckProperties {
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// SUBSCRIBE properties (§3.8.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscribeProperties {
    /// Subscription Identifier for every subscription of the packet (at most
    /// [`MAX_VARIABLE_BYTE_INTEGER`]).
    pub subscription_identifier: Option<NonZeroU32>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// SUBACK properties (§3.9.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAckProperties {
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBSCRIBE properties (§3.10.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubscribeProperties {
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBACK properties (§3.11.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAckProperties {
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

/// DISCONNECT properties (§3.14.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DisconnectProperties {
    /// Session Expiry Interval (client to server only).
    pub session_expiry_interval: Option<u32>,
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
    /// Server Reference (another server to use).
    pub server_reference: Option<MqttStr>,
}

/// AUTH properties (§3.15.2.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthProperties {
    /// Authentication Method.
    pub authentication_method: Option<MqttStr>,
    /// Authentication Data.
    pub authentication_data: Option<Bytes>,
    /// Reason String.
    pub reason_string: Option<MqttStr>,
    /// User Properties, in order.
    pub user_properties: Vec<UserProperty>,
}

// ---------------------------------------------------------------------------------------------
// Which properties each packet allows (Table 2-4).

/// Where a property set appears: its name for errors, which identifiers it allows, and which of
/// those may repeat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope {
    pub(crate) name: &'static str,
    allowed: u64,
    repeatable: u64,
}

const fn mask(ids: &[PropertyId]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1 << (ids[i] as u8);
        i += 1;
    }
    m
}

const USER: u64 = mask(&[PropertyId::UserProperty]);
const ACK: u64 = mask(&[PropertyId::ReasonString, PropertyId::UserProperty]);

use PropertyId as P;

pub(crate) const CONNECT: Scope = Scope {
    name: "CONNECT",
    allowed: mask(&[
        P::SessionExpiryInterval,
        P::ReceiveMaximum,
        P::MaximumPacketSize,
        P::TopicAliasMaximum,
        P::RequestResponseInformation,
        P::RequestProblemInformation,
        P::UserProperty,
        P::AuthenticationMethod,
        P::AuthenticationData,
    ]),
    repeatable: USER,
};

pub(crate) const WILL: Scope = Scope {
    name: "CONNECT Will Properties",
    allowed: mask(&[
        P::WillDelayInterval,
        P::PayloadFormatIndicator,
        P::MessageExpiryInterval,
        P::ContentType,
        P::ResponseTopic,
        P::CorrelationData,
        P::UserProperty,
    ]),
    repeatable: USER,
};

pub(crate) const CONNACK: Scope = Scope {
    name: "CONNACK",
    allowed: mask(&[
        P::SessionExpiryInterval,
        P::ReceiveMaximum,
        P::MaximumQoS,
        P::RetainAvailable,
        P::MaximumPacketSize,
        P::AssignedClientIdentifier,
        P::TopicAliasMaximum,
        P::ReasonString,
        P::UserProperty,
        P::WildcardSubscriptionAvailable,
        P::SubscriptionIdentifierAvailable,
        P::SharedSubscriptionAvailable,
        P::ServerKeepAlive,
        P::ResponseInformation,
        P::ServerReference,
        P::AuthenticationMethod,
        P::AuthenticationData,
    ]),
    repeatable: USER,
};

pub(crate) const PUBLISH: Scope = Scope {
    name: "PUBLISH",
    allowed: mask(&[
        P::PayloadFormatIndicator,
        P::MessageExpiryInterval,
        P::TopicAlias,
        P::ResponseTopic,
        P::CorrelationData,
        P::UserProperty,
        P::SubscriptionIdentifier,
        P::ContentType,
    ]),
    repeatable: mask(&[P::UserProperty, P::SubscriptionIdentifier]),
};

pub(crate) const PUBACK: Scope = Scope {
    name: "PUBACK",
    allowed: ACK,
    repeatable: USER,
};
pub(crate) const PUBREC: Scope = Scope {
    name: "PUBREC",
    ..PUBACK
};
pub(crate) const PUBREL: Scope = Scope {
    name: "PUBREL",
    ..PUBACK
};
pub(crate) const PUBCOMP: Scope = Scope {
    name: "PUBCOMP",
    ..PUBACK
};

pub(crate) const SUBSCRIBE: Scope = Scope {
    name: "SUBSCRIBE",
    allowed: mask(&[P::SubscriptionIdentifier, P::UserProperty]),
    repeatable: USER,
};

pub(crate) const SUBACK: Scope = Scope {
    name: "SUBACK",
    allowed: ACK,
    repeatable: USER,
};

pub(crate) const UNSUBSCRIBE: Scope = Scope {
    name: "UNSUBSCRIBE",
    allowed: USER,
    repeatable: USER,
};

pub(crate) const UNSUBACK: Scope = Scope {
    name: "UNSUBACK",
    allowed: ACK,
    repeatable: USER,
};

pub(crate) const DISCONNECT: Scope = Scope {
    name: "DISCONNECT",
    allowed: mask(&[
        P::SessionExpiryInterval,
        P::ReasonString,
        P::UserProperty,
        P::ServerReference,
    ]),
    repeatable: USER,
};

pub(crate) const AUTH: Scope = Scope {
    name: "AUTH",
    allowed: mask(&[
        P::AuthenticationMethod,
        P::AuthenticationData,
        P::ReasonString,
        P::UserProperty,
    ]),
    repeatable: USER,
};

// ---------------------------------------------------------------------------------------------
// Decoding.

/// Every property any packet can carry; the generic decoder fills it, and each packet's struct
/// takes the fields its [`Scope`] allows (the others are then always empty).
#[derive(Default)]
struct Decoded {
    payload_format: Option<PayloadFormat>,
    message_expiry_interval: Option<u32>,
    content_type: Option<MqttStr>,
    response_topic: Option<MqttStr>,
    correlation_data: Option<Bytes>,
    subscription_identifiers: Vec<NonZeroU32>,
    session_expiry_interval: Option<u32>,
    assigned_client_identifier: Option<MqttStr>,
    server_keep_alive: Option<u16>,
    authentication_method: Option<MqttStr>,
    authentication_data: Option<Bytes>,
    request_problem_information: Option<bool>,
    will_delay_interval: Option<u32>,
    request_response_information: Option<bool>,
    response_information: Option<MqttStr>,
    server_reference: Option<MqttStr>,
    reason_string: Option<MqttStr>,
    receive_maximum: Option<NonZeroU16>,
    topic_alias_maximum: Option<u16>,
    topic_alias: Option<NonZeroU16>,
    maximum_qos: Option<QoS>,
    retain_available: Option<bool>,
    user_properties: Vec<UserProperty>,
    maximum_packet_size: Option<NonZeroU32>,
    wildcard_subscription_available: Option<bool>,
    subscription_identifiers_available: Option<bool>,
    shared_subscription_available: Option<bool>,
}

/// Reads a Variable Byte Integer (§1.5.5): `Truncated(name)` when `buf` ends inside it,
/// `MalformedVariableByteInteger(name)` when it would need a fifth byte.
pub(crate) fn take_vbi(buf: &mut Bytes, name: &'static str) -> Result<u32, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        if !buf.has_remaining() {
            return Err(DecodeError::Truncated(name));
        }
        let byte = buf.get_u8();
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::MalformedVariableByteInteger(name))
}

/// Reads the value of one property from the property block.
struct ValueReader<'a> {
    block: &'a mut Bytes,
    scope: &'static str,
    id: PropertyId,
}

impl ValueReader<'_> {
    fn truncated(&self) -> DecodeError {
        DecodeError::PropertyTruncated {
            packet: self.scope,
            property: self.id,
        }
    }

    fn out_of_range(&self, value: u32) -> DecodeError {
        DecodeError::PropertyOutOfRange {
            packet: self.scope,
            property: self.id,
            value,
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        if self.block.remaining() < N {
            return Err(self.truncated());
        }
        let mut out = [0u8; N];
        self.block.copy_to_slice(&mut out);
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    /// A Byte that must be 0 or 1.
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.out_of_range(u32::from(v))),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array::<2>().map(u16::from_be_bytes)
    }

    fn nonzero_u16(&mut self) -> Result<NonZeroU16, DecodeError> {
        let v = self.u16()?;
        NonZeroU16::new(v).ok_or_else(|| self.out_of_range(0))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array::<4>().map(u32::from_be_bytes)
    }

    fn nonzero_u32(&mut self) -> Result<NonZeroU32, DecodeError> {
        let v = self.u32()?;
        NonZeroU32::new(v).ok_or_else(|| self.out_of_range(0))
    }

    fn vbi(&mut self) -> Result<u32, DecodeError> {
        take_vbi(self.block, self.scope).map_err(|e| match e {
            DecodeError::Truncated(_) => self.truncated(),
            e => e,
        })
    }

    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        if self.block.remaining() < len {
            return Err(self.truncated());
        }
        Ok(self.block.split_to(len))
    }

    fn string(&mut self) -> Result<MqttStr, DecodeError> {
        Ok(MqttStr::from_bytes(self.binary()?)?)
    }
}

/// Stores a value (duplicates were refused before the value was read).
fn set<T>(slot: &mut Option<T>, value: T) {
    *slot = Some(value);
}

/// Reads a property set (length and properties) from the front of `body`.
fn decode_set(body: &mut Bytes, scope: &Scope) -> Result<Decoded, DecodeError> {
    let len = take_vbi(body, scope.name)? as usize;
    if len > body.remaining() {
        return Err(DecodeError::PropertiesExceedPacket(scope.name));
    }
    let mut block = body.split_to(len);
    let mut seen = 0u64;
    let mut d = Decoded::default();
    while block.has_remaining() {
        let raw = take_vbi(&mut block, scope.name)?;
        let id = PropertyId::from_u32(raw).ok_or(DecodeError::UnknownProperty {
            packet: scope.name,
            id: raw,
        })?;
        if scope.allowed & id.bit() == 0 {
            return Err(DecodeError::PropertyNotAllowed {
                packet: scope.name,
                property: id,
            });
        }
        if seen & id.bit() != 0 && scope.repeatable & id.bit() == 0 {
            return Err(DecodeError::DuplicateProperty {
                packet: scope.name,
                property: id,
            });
        }
        seen |= id.bit();
        let mut r = ValueReader {
            block: &mut block,
            scope: scope.name,
            id,
        };
        match id {
            P::PayloadFormatIndicator => {
                let format = match r.byte()? {
                    0 => PayloadFormat::Unspecified,
                    1 => PayloadFormat::Utf8,
                    v => return Err(r.out_of_range(u32::from(v))),
                };
                set(&mut d.payload_format, format)
            }
            P::MessageExpiryInterval => set(&mut d.message_expiry_interval, r.u32()?),
            P::ContentType => set(&mut d.content_type, r.string()?),
            P::ResponseTopic => {
                let t = r.string()?;
                if !topic::is_valid_topic_name(&t) {
                    return Err(DecodeError::InvalidResponseTopic);
                }
                set(&mut d.response_topic, t)
            }
            P::CorrelationData => set(&mut d.correlation_data, r.binary()?),
            P::SubscriptionIdentifier => {
                let v = r.vbi()?;
                let v = NonZeroU32::new(v).ok_or_else(|| r.out_of_range(0))?;
                d.subscription_identifiers.push(v)
            }
            P::SessionExpiryInterval => set(&mut d.session_expiry_interval, r.u32()?),
            P::AssignedClientIdentifier => set(&mut d.assigned_client_identifier, r.string()?),
            P::ServerKeepAlive => set(&mut d.server_keep_alive, r.u16()?),
            P::AuthenticationMethod => set(&mut d.authentication_method, r.string()?),
            P::AuthenticationData => set(&mut d.authentication_data, r.binary()?),
            P::RequestProblemInformation => set(&mut d.request_problem_information, r.flag()?),
            P::WillDelayInterval => set(&mut d.will_delay_interval, r.u32()?),
            P::RequestResponseInformation => set(&mut d.request_response_information, r.flag()?),
            P::ResponseInformation => set(&mut d.response_information, r.string()?),
            P::ServerReference => set(&mut d.server_reference, r.string()?),
            P::ReasonString => set(&mut d.reason_string, r.string()?),
            P::ReceiveMaximum => set(&mut d.receive_maximum, r.nonzero_u16()?),
            P::TopicAliasMaximum => set(&mut d.topic_alias_maximum, r.u16()?),
            P::TopicAlias => set(&mut d.topic_alias, r.nonzero_u16()?),
            P::MaximumQoS => {
                let q = if r.flag()? {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                set(&mut d.maximum_qos, q)
            }
            P::RetainAvailable => set(&mut d.retain_available, r.flag()?),
            P::UserProperty => {
                let name = r.string()?;
                let value = r.string()?;
                d.user_properties.push((name, value))
            }
            P::MaximumPacketSize => set(&mut d.maximum_packet_size, r.nonzero_u32()?),
            P::WildcardSubscriptionAvailable => {
                set(&mut d.wildcard_subscription_available, r.flag()?)
            }
            P::SubscriptionIdentifierAvailable => {
                set(&mut d.subscription_identifiers_available, r.flag()?)
            }
            P::SharedSubscriptionAvailable => set(&mut d.shared_subscription_available, r.flag()?),
        }
    }
    Ok(d)
}

impl ConnectProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &CONNECT)?;
        if d.authentication_data.is_some() && d.authentication_method.is_none() {
            // §3.1.2.11.10: a Protocol Error.
            return Err(DecodeError::AuthenticationDataWithoutMethod);
        }
        Ok(ConnectProperties {
            session_expiry_interval: d.session_expiry_interval,
            receive_maximum: d.receive_maximum,
            maximum_packet_size: d.maximum_packet_size,
            topic_alias_maximum: d.topic_alias_maximum,
            request_response_information: d.request_response_information,
            request_problem_information: d.request_problem_information,
            authentication_method: d.authentication_method,
            authentication_data: d.authentication_data,
            user_properties: d.user_properties,
        })
    }
}

impl WillProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &WILL)?;
        Ok(WillProperties {
            will_delay_interval: d.will_delay_interval,
            payload_format: d.payload_format,
            message_expiry_interval: d.message_expiry_interval,
            content_type: d.content_type,
            response_topic: d.response_topic,
            correlation_data: d.correlation_data,
            user_properties: d.user_properties,
        })
    }
}

impl ConnAckProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &CONNACK)?;
        Ok(ConnAckProperties {
            session_expiry_interval: d.session_expiry_interval,
            receive_maximum: d.receive_maximum,
            maximum_qos: d.maximum_qos,
            retain_available: d.retain_available,
            maximum_packet_size: d.maximum_packet_size,
            assigned_client_identifier: d.assigned_client_identifier,
            topic_alias_maximum: d.topic_alias_maximum,
            reason_string: d.reason_string,
            user_properties: d.user_properties,
            wildcard_subscription_available: d.wildcard_subscription_available,
            subscription_identifiers_available: d.subscription_identifiers_available,
            shared_subscription_available: d.shared_subscription_available,
            server_keep_alive: d.server_keep_alive,
            response_information: d.response_information,
            server_reference: d.server_reference,
            authentication_method: d.authentication_method,
            authentication_data: d.authentication_data,
        })
    }
}

impl PublishProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &PUBLISH)?;
        Ok(PublishProperties {
            payload_format: d.payload_format,
            message_expiry_interval: d.message_expiry_interval,
            topic_alias: d.topic_alias,
            response_topic: d.response_topic,
            correlation_data: d.correlation_data,
            user_properties: d.user_properties,
            subscription_identifiers: d.subscription_identifiers,
            content_type: d.content_type,
        })
    }

    /// True when no property is set (the PUBLISH carries a property length of 0).
    pub fn is_empty(&self) -> bool {
        *self == PublishProperties::default()
    }
}

impl PubAckProperties {
    pub(crate) fn decode(body: &mut Bytes, scope: &Scope) -> Result<Self, DecodeError> {
        let d = decode_set(body, scope)?;
        Ok(PubAckProperties {
            reason_string: d.reason_string,
            user_properties: d.user_properties,
        })
    }

    /// True when no property is set (an acknowledgement may then use its short form).
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

impl SubscribeProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &SUBSCRIBE)?;
        Ok(SubscribeProperties {
            subscription_identifier: d.subscription_identifiers.first().copied(),
            user_properties: d.user_properties,
        })
    }
}

impl SubAckProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &SUBACK)?;
        Ok(SubAckProperties {
            reason_string: d.reason_string,
            user_properties: d.user_properties,
        })
    }
}

impl UnsubscribeProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &UNSUBSCRIBE)?;
        Ok(UnsubscribeProperties {
            user_properties: d.user_properties,
        })
    }
}

impl UnsubAckProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &UNSUBACK)?;
        Ok(UnsubAckProperties {
            reason_string: d.reason_string,
            user_properties: d.user_properties,
        })
    }
}

impl DisconnectProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &DISCONNECT)?;
        Ok(DisconnectProperties {
            session_expiry_interval: d.session_expiry_interval,
            reason_string: d.reason_string,
            user_properties: d.user_properties,
            server_reference: d.server_reference,
        })
    }

    /// True when no property is set (DISCONNECT may then use its short form).
    pub fn is_empty(&self) -> bool {
        *self == DisconnectProperties::default()
    }
}

impl AuthProperties {
    pub(crate) fn decode(body: &mut Bytes) -> Result<Self, DecodeError> {
        let d = decode_set(body, &AUTH)?;
        Ok(AuthProperties {
            authentication_method: d.authentication_method,
            authentication_data: d.authentication_data,
            reason_string: d.reason_string,
            user_properties: d.user_properties,
        })
    }

    /// True when no property is set (AUTH may then use its short form).
    pub fn is_empty(&self) -> bool {
        *self == AuthProperties::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding: each struct lists its properties to a sink, which either measures or writes them.

/// Where a property set's contents go: measured first (to write the lengths in front), then
/// written. Measuring also validates, so writing cannot fail.
pub(crate) trait Sink {
    fn byte(&mut self, id: PropertyId, v: u8);
    fn u16(&mut self, id: PropertyId, v: u16);
    fn u32(&mut self, id: PropertyId, v: u32);
    fn vbi(&mut self, id: PropertyId, v: u32) -> Result<(), EncodeError>;
    fn binary(&mut self, id: PropertyId, v: &[u8]) -> Result<(), EncodeError>;
    fn pair(&mut self, name: &[u8], value: &[u8]) -> Result<(), EncodeError>;
}

/// Counts the bytes a property set's contents take, and checks every value fits its field.
pub(crate) struct Measure(pub(crate) usize);

impl Sink for Measure {
    fn byte(&mut self, _: PropertyId, _: u8) {
        self.0 += 2;
    }
    fn u16(&mut self, _: PropertyId, _: u16) {
        self.0 += 3;
    }
    fn u32(&mut self, _: PropertyId, _: u32) {
        self.0 += 5;
    }
    fn vbi(&mut self, id: PropertyId, v: u32) -> Result<(), EncodeError> {
        if v > MAX_VARIABLE_BYTE_INTEGER {
            return Err(EncodeError::PropertyOutOfRange(id));
        }
        self.0 += 1 + vbi_len(v as usize);
        Ok(())
    }
    fn binary(&mut self, _: PropertyId, v: &[u8]) -> Result<(), EncodeError> {
        check_field(v)?;
        self.0 += 3 + v.len();
        Ok(())
    }
    fn pair(&mut self, name: &[u8], value: &[u8]) -> Result<(), EncodeError> {
        check_field(name)?;
        check_field(value)?;
        self.0 += 5 + name.len() + value.len();
        Ok(())
    }
}

/// Writes a property set's contents (after [`Measure`] accepted them).
pub(crate) struct Write<'a>(pub(crate) &'a mut BytesMut);

impl Sink for Write<'_> {
    fn byte(&mut self, id: PropertyId, v: u8) {
        self.0.put_u8(id as u8);
        self.0.put_u8(v);
    }
    fn u16(&mut self, id: PropertyId, v: u16) {
        self.0.put_u8(id as u8);
        self.0.put_u16(v);
    }
    fn u32(&mut self, id: PropertyId, v: u32) {
        self.0.put_u8(id as u8);
        self.0.put_u32(v);
    }
    fn vbi(&mut self, id: PropertyId, v: u32) -> Result<(), EncodeError> {
        self.0.put_u8(id as u8);
        put_vbi(v as usize, self.0)
    }
    fn binary(&mut self, id: PropertyId, v: &[u8]) -> Result<(), EncodeError> {
        self.0.put_u8(id as u8);
        put_field(v, self.0)
    }
    fn pair(&mut self, name: &[u8], value: &[u8]) -> Result<(), EncodeError> {
        self.0.put_u8(P::UserProperty as u8);
        put_field(name, self.0)?;
        put_field(value, self.0)
    }
}

fn check_field(v: &[u8]) -> Result<(), EncodeError> {
    if v.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong);
    }
    Ok(())
}

fn put_field(v: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    let len = u16::try_from(v.len()).map_err(|_| EncodeError::FieldTooLong)?;
    out.put_u16(len);
    out.put_slice(v);
    Ok(())
}

/// Bytes a Variable Byte Integer of `v` takes (values above the maximum are refused elsewhere).
pub(crate) fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `v` as a Variable Byte Integer.
pub(crate) fn put_vbi(mut v: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    if v > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge);
    }
    loop {
        let mut byte = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if v == 0 {
            return Ok(());
        }
    }
}

/// A property struct that can list its properties to a [`Sink`].
pub(crate) trait Encode {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError>;

    /// Length of the contents (without the length prefix), validating every value.
    fn contents_len(&self) -> Result<usize, EncodeError> {
        let mut m = Measure(0);
        self.emit(&mut m)?;
        Ok(m.0)
    }

    /// Writes length prefix and contents; `len` comes from [`contents_len`](Self::contents_len).
    fn write(&self, len: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_vbi(len, out)?;
        self.emit(&mut Write(out))
    }
}

/// Length of a whole property set (prefix included) whose contents take `len` bytes.
pub(crate) fn set_len(len: usize) -> usize {
    vbi_len(len) + len
}

fn opt_u32<S: Sink>(s: &mut S, id: PropertyId, v: Option<u32>) {
    if let Some(v) = v {
        s.u32(id, v);
    }
}

fn opt_u16<S: Sink>(s: &mut S, id: PropertyId, v: Option<u16>) {
    if let Some(v) = v {
        s.u16(id, v);
    }
}

fn opt_flag<S: Sink>(s: &mut S, id: PropertyId, v: Option<bool>) {
    if let Some(v) = v {
        s.byte(id, u8::from(v));
    }
}

fn opt_str<S: Sink>(s: &mut S, id: PropertyId, v: &Option<MqttStr>) -> Result<(), EncodeError> {
    match v {
        Some(v) => s.binary(id, v.as_bytes()),
        None => Ok(()),
    }
}

fn opt_bin<S: Sink>(s: &mut S, id: PropertyId, v: &Option<Bytes>) -> Result<(), EncodeError> {
    match v {
        Some(v) => s.binary(id, v),
        None => Ok(()),
    }
}

fn user<S: Sink>(s: &mut S, v: &[UserProperty]) -> Result<(), EncodeError> {
    for (name, value) in v {
        s.pair(name.as_bytes(), value.as_bytes())?;
    }
    Ok(())
}

fn format<S: Sink>(s: &mut S, v: Option<PayloadFormat>) {
    if let Some(v) = v {
        s.byte(P::PayloadFormatIndicator, v as u8);
    }
}

impl Encode for ConnectProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, P::SessionExpiryInterval, self.session_expiry_interval);
        opt_u16(
            s,
            P::ReceiveMaximum,
            self.receive_maximum.map(NonZeroU16::get),
        );
        opt_u32(
            s,
            P::MaximumPacketSize,
            self.maximum_packet_size.map(NonZeroU32::get),
        );
        opt_u16(s, P::TopicAliasMaximum, self.topic_alias_maximum);
        opt_flag(
            s,
            P::RequestResponseInformation,
            self.request_response_information,
        );
        opt_flag(
            s,
            P::RequestProblemInformation,
            self.request_problem_information,
        );
        opt_str(s, P::AuthenticationMethod, &self.authentication_method)?;
        opt_bin(s, P::AuthenticationData, &self.authentication_data)?;
        user(s, &self.user_properties)
    }
}

impl Encode for WillProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, P::WillDelayInterval, self.will_delay_interval);
        format(s, self.payload_format);
        opt_u32(s, P::MessageExpiryInterval, self.message_expiry_interval);
        opt_str(s, P::ContentType, &self.content_type)?;
        opt_str(s, P::ResponseTopic, &self.response_topic)?;
        opt_bin(s, P::CorrelationData, &self.correlation_data)?;
        user(s, &self.user_properties)
    }
}

impl Encode for ConnAckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, P::SessionExpiryInterval, self.session_expiry_interval);
        opt_u16(
            s,
            P::ReceiveMaximum,
            self.receive_maximum.map(NonZeroU16::get),
        );
        match self.maximum_qos {
            None => {}
            Some(QoS::ExactlyOnce) => return Err(EncodeError::PropertyOutOfRange(P::MaximumQoS)),
            Some(q) => s.byte(P::MaximumQoS, q as u8),
        }
        opt_flag(s, P::RetainAvailable, self.retain_available);
        opt_u32(
            s,
            P::MaximumPacketSize,
            self.maximum_packet_size.map(NonZeroU32::get),
        );
        opt_str(
            s,
            P::AssignedClientIdentifier,
            &self.assigned_client_identifier,
        )?;
        opt_u16(s, P::TopicAliasMaximum, self.topic_alias_maximum);
        opt_str(s, P::ReasonString, &self.reason_string)?;
        opt_flag(
            s,
            P::WildcardSubscriptionAvailable,
            self.wildcard_subscription_available,
        );
        opt_flag(
            s,
            P::SubscriptionIdentifierAvailable,
            self.subscription_identifiers_available,
        );
        opt_flag(
            s,
            P::SharedSubscriptionAvailable,
            self.shared_subscription_available,
        );
        opt_u16(s, P::ServerKeepAlive, self.server_keep_alive);
        opt_str(s, P::ResponseInformation, &self.response_information)?;
        opt_str(s, P::ServerReference, &self.server_reference)?;
        opt_str(s, P::AuthenticationMethod, &self.authentication_method)?;
        opt_bin(s, P::AuthenticationData, &self.authentication_data)?;
        user(s, &self.user_properties)
    }
}

impl Encode for PublishProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        format(s, self.payload_format);
        opt_u32(s, P::MessageExpiryInterval, self.message_expiry_interval);
        opt_u16(s, P::TopicAlias, self.topic_alias.map(NonZeroU16::get));
        opt_str(s, P::ResponseTopic, &self.response_topic)?;
        opt_bin(s, P::CorrelationData, &self.correlation_data)?;
        for id in &self.subscription_identifiers {
            s.vbi(P::SubscriptionIdentifier, id.get())?;
        }
        opt_str(s, P::ContentType, &self.content_type)?;
        user(s, &self.user_properties)
    }
}

/// Reason String and User Properties: the acknowledgements' property set.
fn ack<S: Sink>(
    s: &mut S,
    reason_string: &Option<MqttStr>,
    user_properties: &[UserProperty],
) -> Result<(), EncodeError> {
    opt_str(s, P::ReasonString, reason_string)?;
    user(s, user_properties)
}

impl Encode for PubAckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        ack(s, &self.reason_string, &self.user_properties)
    }
}

impl Encode for SubscribeProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        if let Some(id) = self.subscription_identifier {
            s.vbi(P::SubscriptionIdentifier, id.get())?;
        }
        user(s, &self.user_properties)
    }
}

impl Encode for SubAckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        ack(s, &self.reason_string, &self.user_properties)
    }
}

impl Encode for UnsubscribeProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        user(s, &self.user_properties)
    }
}

impl Encode for UnsubAckProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        ack(s, &self.reason_string, &self.user_properties)
    }
}

impl Encode for DisconnectProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_u32(s, P::SessionExpiryInterval, self.session_expiry_interval);
        opt_str(s, P::ReasonString, &self.reason_string)?;
        opt_str(s, P::ServerReference, &self.server_reference)?;
        user(s, &self.user_properties)
    }
}

impl Encode for AuthProperties {
    fn emit<S: Sink>(&self, s: &mut S) -> Result<(), EncodeError> {
        opt_str(s, P::AuthenticationMethod, &self.authentication_method)?;
        opt_bin(s, P::AuthenticationData, &self.authentication_data)?;
        ack(s, &self.reason_string, &self.user_properties)
    }
}
