//! The wire codec: bytes to [`Packet`]s and back, for MQTT 3.1, 3.1.1 and 5.0, with every
//! malformed case named by the rule it breaks.
//!
//! Decoding is incremental and zero-copy: [`decode`] takes a `BytesMut` that holds whatever
//! has arrived so far, returns `Ok(None)` until a whole packet is there, and then splits the
//! packet off the front, so topics, payloads and property values of the result share the
//! receive buffer. The exceptions are CONNECT and SUBSCRIBE, whose contents live as long as the
//! session (client id, will, filters): they are copied into a buffer of their own so they do
//! not pin the receive buffer of an idle connection. An oversized packet is refused as soon as
//! its fixed header announces its length, before its body is buffered.
//!
//! ## Versions
//! A CONNECT states its own protocol level, so it decodes whatever version the connection is
//! in and encodes for its [`Connect::protocol`]. Every other packet is decoded and encoded for
//! the version the connection negotiated, passed as an argument. MQTT 3.1 and 3.1.1 share one
//! wire format; in them packet type 15 (AUTH) stays reserved.
//!
//! Encoding for MQTT 3.1/3.1.1 sends the 3.1.1 form of a packet and silently leaves out what
//! 3.1.1 cannot carry: properties, the reason code of PUBACK/PUBREC/PUBREL/PUBCOMP/DISCONNECT,
//! the reason codes of UNSUBACK, and subscription options other than QoS. A CONNACK reason code
//! becomes its [`ConnectReturnCode::from_reason`]; a SUBACK refusal becomes 0x80. What has no
//! 3.1.1 form at all is an [`EncodeError`]: AUTH, and a password without a user name. A reason
//! code that the packet cannot carry in any version (Table 2-6) is an [`EncodeError`] too.
//!
//! MQTT 5.0 acknowledgements are encoded in their shortest form: PUBACK/PUBREC/PUBREL/PUBCOMP
//! without reason and property length when Success without properties, and without the
//! property length when there are no properties; DISCONNECT and AUTH with Remaining Length 0
//! when Success (Normal disconnection) without properties.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::packet::*;
use crate::properties::{
    self, set_len, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    Encode, PropertyId, PubAckProperties, PublishProperties, Scope, SubAckProperties,
    SubscribeProperties, UnsubAckProperties, UnsubscribeProperties, WillProperties,
};
use crate::reason::ReasonCode;
use crate::topic;
use crate::types::{MqttStr, PacketId, ProtocolVersion, QoS, Utf8Error};

/// The largest Remaining Length the four-byte variable integer can hold (§2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Why a byte sequence is not a valid MQTT packet. Every variant means the connection must be
/// closed (MQTT 3.1.1 §4.8, MQTT 5.0 §4.13), except [`DecodeError::UnsupportedProtocolLevel`],
/// which is first answered with CONNACK 0x01 (0x84 in MQTT 5.0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The Remaining Length uses more than four bytes (§2.2.3).
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// The packet is larger than the configured maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge {
        /// Announced size of the whole packet.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Packet type 0, or 15 outside MQTT 5.0.
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// Fixed-header flag bits differ from those Table 2.2 requires (MQTT-2.2.2-1/2).
    #[error("reserved flag bits set in {0} fixed header")]
    ReservedFlagsSet(&'static str),
    /// A QoS value of 3 (MQTT-3.3.1-4) or a will QoS of 3.
    #[error("invalid QoS 3")]
    InvalidQoS,
    /// DUP set on a QoS 0 PUBLISH (MQTT-3.3.1-2).
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    /// The packet ends before a field it announces.
    #[error("{0} packet truncated")]
    Truncated(&'static str),
    /// The packet has bytes after its last field.
    #[error("{0} packet has trailing bytes")]
    TrailingBytes(&'static str),
    /// A string is not well-formed UTF-8 or contains U+0000.
    #[error("invalid string: {0}")]
    InvalidString(#[from] Utf8Error),
    /// A topic name that is empty or contains `+`/`#` (MQTT-3.3.2-1/2, MQTT-4.7.3-1).
    #[error("invalid topic name")]
    InvalidTopicName,
    /// The CONNECT protocol name is neither `MQTT` nor `MQIsdp` (MQTT-3.1.2-1).
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A known protocol name with a level this server does not speak (MQTT-3.1.2-2).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// The reserved CONNECT flag is set (MQTT-3.1.2-3).
    #[error("reserved CONNECT flag set")]
    ReservedConnectFlag,
    /// Will QoS or Will Retain set without the Will flag (MQTT-3.1.2-11/13/15).
    #[error("will QoS or retain set without will flag")]
    WillFlagsWithoutWill,
    /// Password flag set without the User Name flag (MQTT 3.1.1 only, MQTT-3.1.2-22).
    #[error("password flag set without user name flag")]
    PasswordWithoutUsername,
    /// A packet identifier of zero (MQTT-2.3.1-1).
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    #[error("{0} without topic filters")]
    NoTopicFilters(&'static str),
    /// Reserved bits set in a SUBSCRIBE subscription options byte (3.1.1: MQTT-3.8.3-4;
    /// 5.0: bits 6-7, MQTT-3.8.3-5).
    #[error("reserved bits set in subscription options")]
    ReservedSubscriptionBits,
    /// A CONNACK with a reserved return code or flag (client side).
    #[error("malformed CONNACK")]
    MalformedConnAck,
    /// A SUBACK with a reserved return code (client side, MQTT 3.1.1).
    #[error("malformed SUBACK")]
    MalformedSubAck,
    /// A Variable Byte Integer other than the Remaining Length (a property length, property
    /// identifier or Subscription Identifier) that needs more than four bytes (§1.5.5).
    #[error("malformed variable byte integer in {0}")]
    MalformedVariableByteInteger(&'static str),
    /// The property length runs past the end of the packet (§2.2.2.1).
    #[error("{0} property length exceeds the packet")]
    PropertiesExceedPacket(&'static str),
    /// A property value runs past the end of the property length.
    #[error("{property} in {packet} runs past the property length")]
    PropertyTruncated {
        /// Packet (or "CONNECT Will Properties") the property set belongs to.
        packet: &'static str,
        /// The property.
        property: PropertyId,
    },
    /// A property identifier that MQTT 5.0 does not define (§2.2.2.2).
    #[error("unknown property identifier 0x{id:02X} in {packet}")]
    UnknownProperty {
        /// Packet the property set belongs to.
        packet: &'static str,
        /// The identifier.
        id: u32,
    },
    /// A property that this packet may not carry (§2.2.2.2, Table 2-4).
    #[error("{property} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// Packet the property set belongs to.
        packet: &'static str,
        /// The property.
        property: PropertyId,
    },
    /// A property other than User Property (and Subscription Identifier in PUBLISH) given more
    /// than once: a Protocol Error.
    #[error("{property} given twice in {packet}")]
    DuplicateProperty {
        /// Packet the property set belongs to.
        packet: &'static str,
        /// The property.
        property: PropertyId,
    },
    /// A property value out of its range: 0 for Receive Maximum, Maximum Packet Size, Topic
    /// Alias or Subscription Identifier; more than 1 for a Byte that is 0 or 1.
    #[error("{property} value {value} is out of range in {packet}")]
    PropertyOutOfRange {
        /// Packet the property set belongs to.
        packet: &'static str,
        /// The property.
        property: PropertyId,
        /// The value received.
        value: u32,
    },
    /// A Response Topic that is not a valid topic name (MQTT-3.3.2-13/14).
    #[error("invalid response topic")]
    InvalidResponseTopic,
    /// Authentication Data without an Authentication Method in CONNECT (§3.1.2.11.10).
    #[error("authentication data without authentication method")]
    AuthenticationDataWithoutMethod,
    /// A reason code that §2.4 does not define, or that this packet may not carry.
    #[error("reason code 0x{code:02X} is not valid in {packet}")]
    InvalidReasonCode {
        /// The packet.
        packet: &'static str,
        /// The byte received.
        code: u8,
    },
    /// Retain Handling 3 in subscription options (§3.8.3.1).
    #[error("retain handling 3 in subscription options")]
    InvalidRetainHandling,
    /// An MQTT 5.0 PUBLISH with an empty topic name and no Topic Alias (§3.3.2.1).
    #[error("empty topic name without a topic alias")]
    EmptyTopicWithoutAlias,
}

/// Decodes one packet of protocol `version` from the front of `buf` (a CONNECT is decoded
/// whatever `version` says: it carries its own).
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is consumed), and
/// `Ok(Some(packet))` after splitting the packet's bytes off `buf`. `max_packet_size` bounds the
/// whole packet including its fixed header.
pub fn decode(
    buf: &mut BytesMut,
    max_packet_size: usize,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    let Some((header_len, remaining)) = read_fixed_header(buf)? else {
        return Ok(None);
    };
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let first = buf[0];
    let mut packet = buf.split_to(total);
    packet.advance(header_len);
    let body = match first >> 4 {
        // What CONNECT and SUBSCRIBE carry (client id, will, filters) lives as long as the
        // session: give it a buffer of its own instead of pinning the whole receive buffer.
        1 | 8 => Bytes::copy_from_slice(&packet),
        _ => packet.freeze(),
    };
    decode_body(first, body, version).map(Some)
}

/// Reads the fixed header: `(header length, remaining length)` or `None` when incomplete.
fn read_fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining: usize = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7F) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

fn decode_body(
    first: u8,
    mut body: Bytes,
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0F;
    let v5 = version.is_v5();
    let expect_flags = |want: u8, name: &'static str| {
        if flags == want {
            Ok(())
        } else {
            Err(DecodeError::ReservedFlagsSet(name))
        }
    };
    let packet = match kind {
        1 => {
            expect_flags(0, "CONNECT")?;
            Packet::Connect(decode_connect(&mut body)?)
        }
        2 => {
            expect_flags(0, "CONNACK")?;
            Packet::ConnAck(decode_connack(&mut body, v5)?)
        }
        3 => Packet::Publish(decode_publish(flags, &mut body, v5)?),
        4 => {
            expect_flags(0, "PUBACK")?;
            Packet::PubAck(decode_ack(&mut body, v5, kind, &properties::PUBACK)?)
        }
        5 => {
            expect_flags(0, "PUBREC")?;
            Packet::PubRec(decode_ack(&mut body, v5, kind, &properties::PUBREC)?)
        }
        6 => {
            expect_flags(2, "PUBREL")?;
            Packet::PubRel(decode_ack(&mut body, v5, kind, &properties::PUBREL)?)
        }
        7 => {
            expect_flags(0, "PUBCOMP")?;
            Packet::PubComp(decode_ack(&mut body, v5, kind, &properties::PUBCOMP)?)
        }
        8 => {
            expect_flags(2, "SUBSCRIBE")?;
            return decode_subscribe(&mut body, v5).map(Packet::Subscribe);
        }
        9 => {
            expect_flags(0, "SUBACK")?;
            return decode_suback(&mut body, v5).map(Packet::SubAck);
        }
        10 => {
            expect_flags(2, "UNSUBSCRIBE")?;
            const NAME: &str = "UNSUBSCRIBE";
            let packet_id = take_packet_id(&mut body, NAME)?;
            let properties = if v5 {
                UnsubscribeProperties::decode(&mut body)?
            } else {
                UnsubscribeProperties::default()
            };
            let mut filters = Vec::new();
            while body.has_remaining() {
                filters.push(take_str(&mut body, NAME)?);
            }
            if filters.is_empty() {
                return Err(DecodeError::NoTopicFilters(NAME));
            }
            return Ok(Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            }));
        }
        11 => {
            expect_flags(0, "UNSUBACK")?;
            let packet_id = take_packet_id(&mut body, "UNSUBACK")?;
            if v5 {
                let properties = UnsubAckProperties::decode(&mut body)?;
                let reason_codes = take_reason_codes(&mut body, kind, "UNSUBACK")?;
                return Ok(Packet::UnsubAck(UnsubAck {
                    packet_id,
                    reason_codes,
                    properties,
                }));
            }
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes: Vec::new(),
                properties: UnsubAckProperties::default(),
            })
        }
        12 => {
            expect_flags(0, "PINGREQ")?;
            Packet::PingReq
        }
        13 => {
            expect_flags(0, "PINGRESP")?;
            Packet::PingResp
        }
        14 => {
            expect_flags(0, "DISCONNECT")?;
            let mut d = Disconnect::default();
            if v5 && body.has_remaining() {
                d.reason = take_reason(&mut body, kind, "DISCONNECT")?;
                if body.has_remaining() {
                    d.properties = DisconnectProperties::decode(&mut body)?;
                }
            }
            Packet::Disconnect(d)
        }
        15 if v5 => {
            expect_flags(0, "AUTH")?;
            let mut a = Auth::default();
            if body.has_remaining() {
                a.reason = take_reason(&mut body, kind, "AUTH")?;
                // Unlike PUBACK and DISCONNECT, AUTH has no form with a reason code alone.
                a.properties = AuthProperties::decode(&mut body)?;
            }
            Packet::Auth(a)
        }
        other => return Err(DecodeError::ReservedPacketType(other)),
    };
    if body.has_remaining() {
        return Err(DecodeError::TrailingBytes(packet.name()));
    }
    Ok(packet)
}

fn decode_connect(body: &mut Bytes) -> Result<Connect, DecodeError> {
    const NAME: &str = "CONNECT";
    let protocol_name = take_str(body, NAME)?;
    let [level] = take_array::<1>(body, NAME)?;
    let protocol = match (protocol_name.as_str(), level) {
        ("MQTT", 4) => ProtocolVersion::V311,
        ("MQTT", 5) => ProtocolVersion::V5,
        ("MQIsdp", 3) => ProtocolVersion::V31,
        ("MQTT", _) | ("MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let v5 = protocol.is_v5();
    let [flags] = take_array::<1>(body, NAME)?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let clean_session = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    if password_flag && !username_flag && !v5 {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = take_u16(body, NAME)?;
    let properties = if v5 {
        ConnectProperties::decode(body)?
    } else {
        ConnectProperties::default()
    };
    let client_id = take_str(body, NAME)?;
    let will = if will_flag {
        let qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidQoS)?;
        let properties = if v5 {
            WillProperties::decode(body)?
        } else {
            WillProperties::default()
        };
        let topic = take_str(body, NAME)?;
        if !topic::is_valid_topic_name(&topic) {
            return Err(DecodeError::InvalidTopicName);
        }
        let payload = take_binary(body, NAME)?;
        Some(LastWill {
            topic,
            payload,
            qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(take_str(body, NAME)?)
    } else {
        None
    };
    let password = if password_flag {
        Some(take_binary(body, NAME)?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(body: &mut Bytes, v5: bool) -> Result<ConnAck, DecodeError> {
    const NAME: &str = "CONNACK";
    let [ack_flags, code] = take_array::<2>(body, NAME)?;
    if ack_flags & 0xFE != 0 {
        return Err(DecodeError::MalformedConnAck);
    }
    let session_present = ack_flags & 1 == 1;
    if !v5 {
        let code = ConnectReturnCode::from_u8(code).ok_or(DecodeError::MalformedConnAck)?;
        return Ok(ConnAck::new(session_present, code.into()));
    }
    let reason = reason_in(code, 2, NAME)?;
    let properties = ConnAckProperties::decode(body)?;
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn decode_publish(flags: u8, body: &mut Bytes, v5: bool) -> Result<Publish, DecodeError> {
    const NAME: &str = "PUBLISH";
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupOnQoS0);
    }
    let topic = take_str(body, NAME)?;
    // In MQTT 5.0 an empty topic name stands for the Topic Alias (checked below).
    let names_topic = !(v5 && topic.is_empty());
    if names_topic && !topic::is_valid_topic_name(&topic) {
        return Err(DecodeError::InvalidTopicName);
    }
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(take_packet_id(body, NAME)?)
    };
    let properties = if v5 {
        let p = PublishProperties::decode(body)?;
        if topic.is_empty() && p.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicWithoutAlias);
        }
        p
    } else {
        PublishProperties::default()
    };
    let payload = std::mem::take(body);
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
        properties,
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then in MQTT 5.0 an optional reason code and
/// optional properties (§3.4.2: Remaining Length 2 means Success, less than 4 no properties).
fn decode_ack(body: &mut Bytes, v5: bool, kind: u8, scope: &Scope) -> Result<PubAck, DecodeError> {
    let mut ack = PubAck::new(take_packet_id(body, scope.name)?);
    if v5 && body.has_remaining() {
        ack.reason = take_reason(body, kind, scope.name)?;
        if body.has_remaining() {
            ack.properties = PubAckProperties::decode(body, scope)?;
        }
    }
    Ok(ack)
}

fn decode_subscribe(body: &mut Bytes, v5: bool) -> Result<Subscribe, DecodeError> {
    const NAME: &str = "SUBSCRIBE";
    let packet_id = take_packet_id(body, NAME)?;
    let properties = if v5 {
        SubscribeProperties::decode(body)?
    } else {
        SubscribeProperties::default()
    };
    let mut filters = Vec::new();
    while body.has_remaining() {
        let filter = take_str(body, NAME)?;
        let [opts] = take_array::<1>(body, NAME)?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if opts & reserved != 0 {
            return Err(DecodeError::ReservedSubscriptionBits);
        }
        let qos = QoS::from_u8(opts & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let retain_handling = match (opts >> 4) & 0x03 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::InvalidRetainHandling),
        };
        filters.push((
            filter,
            SubscriptionOptions {
                qos,
                no_local: opts & 0x04 != 0,
                retain_as_published: opts & 0x08 != 0,
                retain_handling,
            },
        ));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(NAME));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_suback(body: &mut Bytes, v5: bool) -> Result<SubAck, DecodeError> {
    const NAME: &str = "SUBACK";
    let packet_id = take_packet_id(body, NAME)?;
    if v5 {
        let properties = SubAckProperties::decode(body)?;
        let reason_codes = take_reason_codes(body, 9, NAME)?;
        return Ok(SubAck {
            packet_id,
            reason_codes,
            properties,
        });
    }
    let reason_codes = body
        .iter()
        .map(|&b| match b {
            0x80 => Ok(ReasonCode::UnspecifiedError),
            b => QoS::from_u8(b)
                .map(ReasonCode::granted)
                .ok_or(DecodeError::MalformedSubAck),
        })
        .collect::<Result<Vec<_>, _>>()?;
    body.advance(body.remaining());
    Ok(SubAck {
        packet_id,
        reason_codes,
        properties: SubAckProperties::default(),
    })
}

/// A reason code byte that must be defined and allowed in packet type `kind`.
fn reason_in(code: u8, kind: u8, name: &'static str) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(code)
        .filter(|r| r.allowed_in(kind))
        .ok_or(DecodeError::InvalidReasonCode { packet: name, code })
}

fn take_reason(body: &mut Bytes, kind: u8, name: &'static str) -> Result<ReasonCode, DecodeError> {
    let [code] = take_array::<1>(body, name)?;
    reason_in(code, kind, name)
}

/// The rest of the packet as reason codes (the SUBACK and UNSUBACK payload).
fn take_reason_codes(
    body: &mut Bytes,
    kind: u8,
    name: &'static str,
) -> Result<Vec<ReasonCode>, DecodeError> {
    let codes = body
        .iter()
        .map(|&b| reason_in(b, kind, name))
        .collect::<Result<Vec<_>, _>>()?;
    body.advance(body.remaining());
    Ok(codes)
}

pub(crate) fn take_array<const N: usize>(
    body: &mut Bytes,
    name: &'static str,
) -> Result<[u8; N], DecodeError> {
    if body.remaining() < N {
        return Err(DecodeError::Truncated(name));
    }
    let mut out = [0u8; N];
    body.copy_to_slice(&mut out);
    Ok(out)
}

fn take_u16(body: &mut Bytes, name: &'static str) -> Result<u16, DecodeError> {
    take_array::<2>(body, name).map(u16::from_be_bytes)
}

fn take_packet_id(body: &mut Bytes, name: &'static str) -> Result<PacketId, DecodeError> {
    match take_u16(body, name)? {
        0 => Err(DecodeError::ZeroPacketId),
        id => Ok(id),
    }
}

fn take_binary(body: &mut Bytes, name: &'static str) -> Result<Bytes, DecodeError> {
    let len = take_u16(body, name)? as usize;
    if body.remaining() < len {
        return Err(DecodeError::Truncated(name));
    }
    Ok(body.split_to(len))
}

pub(crate) fn take_str(body: &mut Bytes, name: &'static str) -> Result<MqttStr, DecodeError> {
    Ok(MqttStr::from_bytes(take_binary(body, name)?)?)
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The packet would exceed the largest Remaining Length MQTT can express.
    #[error("packet too large to encode")]
    TooLarge,
    /// A string or binary field is longer than 65,535 bytes.
    #[error("field longer than 65535 bytes")]
    FieldTooLong,
    /// A QoS > 0 PUBLISH without a packet identifier, or the reverse.
    #[error("packet identifier does not match QoS")]
    PacketIdMismatch,
    /// The packet does not exist in the protocol version it is encoded for (AUTH before 5.0).
    #[error("{0} does not exist before MQTT 5.0")]
    UnsupportedInVersion(&'static str),
    /// A CONNECT for MQTT 3.1/3.1.1 with a password but no user name (MQTT-3.1.2-22).
    #[error("password without user name before MQTT 5.0")]
    PasswordWithoutUsername,
    /// A reason code this packet cannot carry (Table 2-6).
    #[error("reason code {code} is not valid in {packet}")]
    InvalidReasonCode {
        /// The packet.
        packet: &'static str,
        /// The code.
        code: ReasonCode,
    },
    /// A property value out of range: Maximum QoS 2, or a Subscription Identifier above
    /// [`MAX_VARIABLE_BYTE_INTEGER`](crate::properties::MAX_VARIABLE_BYTE_INTEGER).
    #[error("{0} value out of range")]
    PropertyOutOfRange(PropertyId),
}

/// Appends the encoding of `packet` for protocol `version` to `out` (a CONNECT is encoded for
/// its own [`Connect::protocol`]). On error nothing useful was appended: the caller drops `out`
/// or truncates it to its previous length.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) => {
            check_reason(a.reason, 2, "CONNACK")?;
            if !v5 {
                let code = ConnectReturnCode::from_reason(a.reason)
                    .unwrap_or(ConnectReturnCode::ServerUnavailable);
                out.put_slice(&[0x20, 2, a.session_present as u8, code as u8]);
                return Ok(());
            }
            let plen = a.properties.contents_len()?;
            put_header(0x20, 2 + set_len(plen), out)?;
            out.put_u8(a.session_present as u8);
            out.put_u8(a.reason.to_u8());
            a.properties.write(plen, out)
        }
        Packet::Publish(p) => encode_publish(p, v5, out),
        Packet::PubAck(a) => encode_ack(0x40, "PUBACK", a, v5, out),
        Packet::PubRec(a) => encode_ack(0x50, "PUBREC", a, v5, out),
        Packet::PubRel(a) => encode_ack(0x62, "PUBREL", a, v5, out),
        Packet::PubComp(a) => encode_ack(0x70, "PUBCOMP", a, v5, out),
        Packet::Subscribe(s) => {
            let filters = s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
            if !v5 {
                put_header(0x82, 2 + filters, out)?;
                out.put_u16(s.packet_id);
                for (f, o) in &s.filters {
                    put_binary(f.as_bytes(), out)?;
                    out.put_u8(o.qos as u8);
                }
                return Ok(());
            }
            let plen = s.properties.contents_len()?;
            put_header(0x82, 2 + set_len(plen) + filters, out)?;
            out.put_u16(s.packet_id);
            s.properties.write(plen, out)?;
            for (f, o) in &s.filters {
                put_binary(f.as_bytes(), out)?;
                out.put_u8(
                    o.qos as u8
                        | (o.no_local as u8) << 2
                        | (o.retain_as_published as u8) << 3
                        | (o.retain_handling as u8) << 4,
                );
            }
            Ok(())
        }
        Packet::SubAck(s) => {
            for &code in &s.reason_codes {
                check_reason(code, 9, "SUBACK")?;
            }
            if !v5 {
                put_header(0x90, 2 + s.reason_codes.len(), out)?;
                out.put_u16(s.packet_id);
                for c in &s.reason_codes {
                    out.put_u8(c.granted_qos().map_or(0x80, |q| q as u8));
                }
                return Ok(());
            }
            encode_codes_v5(0x90, s.packet_id, &s.properties, &s.reason_codes, out)
        }
        Packet::Unsubscribe(u) => {
            let filters = u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
            let plen = if v5 { u.properties.contents_len()? } else { 0 };
            let props = if v5 { set_len(plen) } else { 0 };
            put_header(0xA2, 2 + props + filters, out)?;
            out.put_u16(u.packet_id);
            if v5 {
                u.properties.write(plen, out)?;
            }
            for f in &u.filters {
                put_binary(f.as_bytes(), out)?;
            }
            Ok(())
        }
        Packet::UnsubAck(u) => {
            for &code in &u.reason_codes {
                check_reason(code, 11, "UNSUBACK")?;
            }
            if !v5 {
                return encode_id(0xB0, u.packet_id, out);
            }
            encode_codes_v5(0xB0, u.packet_id, &u.properties, &u.reason_codes, out)
        }
        Packet::PingReq => {
            out.put_slice(&[0xC0, 0]);
            Ok(())
        }
        Packet::PingResp => {
            out.put_slice(&[0xD0, 0]);
            Ok(())
        }
        Packet::Disconnect(d) => {
            check_reason(d.reason, 14, "DISCONNECT")?;
            if !v5 || (d.reason == ReasonCode::NORMAL_DISCONNECTION && d.properties.is_empty()) {
                out.put_slice(&[0xE0, 0]);
                return Ok(());
            }
            if d.properties.is_empty() {
                out.put_slice(&[0xE0, 1, d.reason.to_u8()]);
                return Ok(());
            }
            let plen = d.properties.contents_len()?;
            put_header(0xE0, 1 + set_len(plen), out)?;
            out.put_u8(d.reason.to_u8());
            d.properties.write(plen, out)
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::UnsupportedInVersion("AUTH"));
            }
            check_reason(a.reason, 15, "AUTH")?;
            if a.reason == ReasonCode::Success && a.properties.is_empty() {
                out.put_slice(&[0xF0, 0]);
                return Ok(());
            }
            let plen = a.properties.contents_len()?;
            put_header(0xF0, 1 + set_len(plen), out)?;
            out.put_u8(a.reason.to_u8());
            a.properties.write(plen, out)
        }
    }
}

fn check_reason(code: ReasonCode, kind: u8, packet: &'static str) -> Result<(), EncodeError> {
    if code.allowed_in(kind) {
        Ok(())
    } else {
        Err(EncodeError::InvalidReasonCode { packet, code })
    }
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP in the shortest form that carries `ack`.
fn encode_ack(
    first: u8,
    name: &'static str,
    ack: &PubAck,
    v5: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    check_reason(ack.reason, first >> 4, name)?;
    if !v5 || (ack.reason == ReasonCode::Success && ack.properties.is_empty()) {
        return encode_id(first, ack.packet_id, out);
    }
    if ack.properties.is_empty() {
        out.put_u8(first);
        out.put_u8(3);
        out.put_u16(ack.packet_id);
        out.put_u8(ack.reason.to_u8());
        return Ok(());
    }
    let plen = ack.properties.contents_len()?;
    put_header(first, 3 + set_len(plen), out)?;
    out.put_u16(ack.packet_id);
    out.put_u8(ack.reason.to_u8());
    ack.properties.write(plen, out)
}

/// Appends an MQTT 3.1/3.1.1 PUBLISH built from parts, without constructing a [`Publish`] (the
/// broker's hot path). For MQTT 5.0 use [`encode_publish_parts_v5`].
pub fn encode_publish_parts(
    topic: &MqttStr,
    payload: &[u8],
    qos: QoS,
    packet_id: Option<PacketId>,
    retain: bool,
    dup: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_publish_body(topic, payload, qos, packet_id, retain, dup, None, out)
}

/// Appends an MQTT 5.0 PUBLISH built from parts, with `properties` (the broker's hot path).
#[allow(clippy::too_many_arguments)]
pub fn encode_publish_parts_v5(
    topic: &MqttStr,
    payload: &[u8],
    qos: QoS,
    packet_id: Option<PacketId>,
    retain: bool,
    dup: bool,
    properties: &PublishProperties,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    encode_publish_body(
        topic,
        payload,
        qos,
        packet_id,
        retain,
        dup,
        Some(properties),
        out,
    )
}

/// The PUBLISH of either version: `properties` is `Some` exactly for MQTT 5.0.
#[allow(clippy::too_many_arguments)]
fn encode_publish_body(
    topic: &MqttStr,
    payload: &[u8],
    qos: QoS,
    packet_id: Option<PacketId>,
    retain: bool,
    dup: bool,
    properties: Option<&PublishProperties>,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if packet_id.is_some() != (qos != QoS::AtMostOnce) {
        return Err(EncodeError::PacketIdMismatch);
    }
    let plen = properties.map(Encode::contents_len).transpose()?;
    let len = 2
        + topic.len()
        + if packet_id.is_some() { 2 } else { 0 }
        + plen.map_or(0, set_len)
        + payload.len();
    let first = 0x30 | ((dup as u8) << 3) | ((qos as u8) << 1) | retain as u8;
    out.reserve(len + 5);
    put_header(first, len, out)?;
    put_binary(topic.as_bytes(), out)?;
    if let Some(id) = packet_id {
        out.put_u16(id);
    }
    if let (Some(properties), Some(plen)) = (properties, plen) {
        properties.write(plen, out)?;
    }
    out.put_slice(payload);
    Ok(())
}

fn encode_publish(p: &Publish, v5: bool, out: &mut BytesMut) -> Result<(), EncodeError> {
    if v5 {
        encode_publish_parts_v5(
            &p.topic,
            &p.payload,
            p.qos,
            p.packet_id,
            p.retain,
            p.dup,
            &p.properties,
            out,
        )
    } else {
        encode_publish_parts(
            &p.topic,
            &p.payload,
            p.qos,
            p.packet_id,
            p.retain,
            p.dup,
            out,
        )
    }
}

fn encode_connect(c: &Connect, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = c.protocol.is_v5();
    let (name, level) = c.protocol.name_and_level();
    let mut len = 2 + name.len() + 1 + 1 + 2 + 2 + c.client_id.len();
    let mut flags = (c.clean_session as u8) << 1;
    let plen = if v5 {
        let plen = c.properties.contents_len()?;
        len += set_len(plen);
        plen
    } else {
        0
    };
    let mut will_plen = 0;
    if let Some(w) = &c.will {
        len += 2 + w.topic.len() + 2 + w.payload.len();
        if v5 {
            will_plen = w.properties.contents_len()?;
            len += set_len(will_plen);
        }
        flags |= 0x04 | ((w.qos as u8) << 3) | ((w.retain as u8) << 5);
    }
    if let Some(u) = &c.username {
        len += 2 + u.len();
        flags |= 0x80;
    }
    if let Some(p) = &c.password {
        if c.username.is_none() && !v5 {
            return Err(EncodeError::PasswordWithoutUsername);
        }
        len += 2 + p.len();
        flags |= 0x40;
    }
    put_header(0x10, len, out)?;
    put_binary(name.as_bytes(), out)?;
    out.put_u8(level);
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if v5 {
        c.properties.write(plen, out)?;
    }
    put_binary(c.client_id.as_bytes(), out)?;
    if let Some(w) = &c.will {
        if v5 {
            w.properties.write(will_plen, out)?;
        }
        put_binary(w.topic.as_bytes(), out)?;
        put_binary(&w.payload, out)?;
    }
    if let Some(u) = &c.username {
        put_binary(u.as_bytes(), out)?;
    }
    if let Some(p) = &c.password {
        put_binary(p, out)?;
    }
    Ok(())
}

/// A v5 SUBACK or UNSUBACK: packet id, properties, one reason code per filter.
fn encode_codes_v5(
    first: u8,
    packet_id: PacketId,
    properties: &impl Encode,
    codes: &[ReasonCode],
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let plen = properties.contents_len()?;
    put_header(first, 2 + set_len(plen) + codes.len(), out)?;
    out.put_u16(packet_id);
    properties.write(plen, out)?;
    for c in codes {
        out.put_u8(c.to_u8());
    }
    Ok(())
}

fn encode_id(first: u8, id: PacketId, out: &mut BytesMut) -> Result<(), EncodeError> {
    out.put_u8(first);
    out.put_u8(2);
    out.put_u16(id);
    Ok(())
}

fn put_header(first: u8, len: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge);
    }
    out.put_u8(first);
    properties::put_vbi(len, out)
}

pub(crate) fn put_binary(data: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong)?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}
