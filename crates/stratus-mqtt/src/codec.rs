//! The wire codec: bytes to [`Packet`]s and back, with every malformed case named by the rule it breaks.
//!
//! Decoding is incremental and zero-copy: [`decode`] takes a `BytesMut` that holds whatever
//! has arrived so far, returns `Ok(None)` until a whole packet is there, and then splits the
//! packet off the front, so topics and payloads of the result share the receive buffer.
//! An oversized packet is refused as soon as its fixed header announces its length, before
//! its body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::packet::*;
use crate::topic;
use crate::types::{MqttStr, PacketId, ProtocolVersion, QoS, Utf8Error};

/// The largest Remaining Length the four-byte variable integer can hold (§2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Why a byte sequence is not a valid MQTT packet. Every variant means the connection must be
/// closed (MQTT 3.1.1 §4.8), except [`DecodeError::UnsupportedProtocolLevel`], which is first
/// answered with CONNACK 0x01.
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
    /// Packet type 0 or 15 (reserved in 3.1.1).
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
    /// Password flag set without the User Name flag (MQTT-3.1.2-22).
    #[error("password flag set without user name flag")]
    PasswordWithoutUsername,
    /// A packet identifier of zero (MQTT-2.3.1-1).
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    #[error("{0} without topic filters")]
    NoTopicFilters(&'static str),
    /// Reserved bits set in a SUBSCRIBE requested-QoS byte (MQTT-3.8.3-4).
    #[error("reserved bits set in subscription options")]
    ReservedSubscriptionBits,
    /// A CONNACK with a reserved return code or flag (client side).
    #[error("malformed CONNACK")]
    MalformedConnAck,
    /// A SUBACK with a reserved return code (client side).
    #[error("malformed SUBACK")]
    MalformedSubAck,
}

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is consumed), and
/// `Ok(Some(packet))` after splitting the packet's bytes off `buf`. `max_packet_size` bounds the
/// whole packet including its fixed header.
pub fn decode(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, DecodeError> {
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
    decode_body(first, packet.freeze()).map(Some)
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

fn decode_body(first: u8, mut body: Bytes) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0F;
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
            let b = take_array::<2>(&mut body, "CONNACK")?;
            if b[0] & 0xFE != 0 {
                return Err(DecodeError::MalformedConnAck);
            }
            let code = ConnectReturnCode::from_u8(b[1]).ok_or(DecodeError::MalformedConnAck)?;
            Packet::ConnAck(ConnAck {
                session_present: b[0] & 1 == 1,
                code,
            })
        }
        3 => Packet::Publish(decode_publish(flags, &mut body)?),
        4 => {
            expect_flags(0, "PUBACK")?;
            Packet::PubAck(take_packet_id(&mut body, "PUBACK")?)
        }
        5 => {
            expect_flags(0, "PUBREC")?;
            Packet::PubRec(take_packet_id(&mut body, "PUBREC")?)
        }
        6 => {
            expect_flags(2, "PUBREL")?;
            Packet::PubRel(take_packet_id(&mut body, "PUBREL")?)
        }
        7 => {
            expect_flags(0, "PUBCOMP")?;
            Packet::PubComp(take_packet_id(&mut body, "PUBCOMP")?)
        }
        8 => {
            expect_flags(2, "SUBSCRIBE")?;
            let packet_id = take_packet_id(&mut body, "SUBSCRIBE")?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                let filter = take_str(&mut body, "SUBSCRIBE")?;
                let [opts] = take_array::<1>(&mut body, "SUBSCRIBE")?;
                if opts & 0xFC != 0 {
                    return Err(DecodeError::ReservedSubscriptionBits);
                }
                let qos = QoS::from_u8(opts).ok_or(DecodeError::InvalidQoS)?;
                filters.push((filter, qos));
            }
            if filters.is_empty() {
                return Err(DecodeError::NoTopicFilters("SUBSCRIBE"));
            }
            return Ok(Packet::Subscribe(Subscribe { packet_id, filters }));
        }
        9 => {
            expect_flags(0, "SUBACK")?;
            let packet_id = take_packet_id(&mut body, "SUBACK")?;
            let return_codes = body
                .iter()
                .map(|&b| match b {
                    0x80 => Ok(SubscribeReturnCode::Failure),
                    b => QoS::from_u8(b)
                        .map(SubscribeReturnCode::Success)
                        .ok_or(DecodeError::MalformedSubAck),
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Packet::SubAck(SubAck {
                packet_id,
                return_codes,
            }));
        }
        10 => {
            expect_flags(2, "UNSUBSCRIBE")?;
            let packet_id = take_packet_id(&mut body, "UNSUBSCRIBE")?;
            let mut filters = Vec::new();
            while body.has_remaining() {
                filters.push(take_str(&mut body, "UNSUBSCRIBE")?);
            }
            if filters.is_empty() {
                return Err(DecodeError::NoTopicFilters("UNSUBSCRIBE"));
            }
            return Ok(Packet::Unsubscribe(Unsubscribe { packet_id, filters }));
        }
        11 => {
            expect_flags(0, "UNSUBACK")?;
            Packet::UnsubAck(take_packet_id(&mut body, "UNSUBACK")?)
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
            Packet::Disconnect
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
        ("MQIsdp", 3) => ProtocolVersion::V31,
        ("MQTT", _) | ("MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
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
    if password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = take_u16(body, NAME)?;
    let client_id = take_str(body, NAME)?;
    let will = if will_flag {
        let qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidQoS)?;
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
    })
}

fn decode_publish(flags: u8, body: &mut Bytes) -> Result<Publish, DecodeError> {
    const NAME: &str = "PUBLISH";
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupOnQoS0);
    }
    let topic = take_str(body, NAME)?;
    if !topic::is_valid_topic_name(&topic) {
        return Err(DecodeError::InvalidTopicName);
    }
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(take_packet_id(body, NAME)?)
    };
    let payload = std::mem::take(body);
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
    })
}

fn take_array<const N: usize>(
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

fn take_str(body: &mut Bytes, name: &'static str) -> Result<MqttStr, DecodeError> {
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
}

/// Appends the encoding of `packet` to `out`.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) => {
            out.put_slice(&[0x20, 2, a.session_present as u8, a.code as u8]);
            Ok(())
        }
        Packet::Publish(p) => encode_publish(p, out),
        Packet::PubAck(id) => encode_id(0x40, *id, out),
        Packet::PubRec(id) => encode_id(0x50, *id, out),
        Packet::PubRel(id) => encode_id(0x62, *id, out),
        Packet::PubComp(id) => encode_id(0x70, *id, out),
        Packet::Subscribe(s) => {
            let len = 2 + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
            put_header(0x82, len, out)?;
            out.put_u16(s.packet_id);
            for (f, q) in &s.filters {
                put_binary(f.as_bytes(), out)?;
                out.put_u8(*q as u8);
            }
            Ok(())
        }
        Packet::SubAck(s) => {
            put_header(0x90, 2 + s.return_codes.len(), out)?;
            out.put_u16(s.packet_id);
            for c in &s.return_codes {
                out.put_u8(c.to_u8());
            }
            Ok(())
        }
        Packet::Unsubscribe(u) => {
            let len = 2 + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
            put_header(0xA2, len, out)?;
            out.put_u16(u.packet_id);
            for f in &u.filters {
                put_binary(f.as_bytes(), out)?;
            }
            Ok(())
        }
        Packet::UnsubAck(id) => encode_id(0xB0, *id, out),
        Packet::PingReq => {
            out.put_slice(&[0xC0, 0]);
            Ok(())
        }
        Packet::PingResp => {
            out.put_slice(&[0xD0, 0]);
            Ok(())
        }
        Packet::Disconnect => {
            out.put_slice(&[0xE0, 0]);
            Ok(())
        }
    }
}

/// Appends a PUBLISH built from parts, without constructing a [`Publish`] (the broker's hot path).
pub fn encode_publish_parts(
    topic: &MqttStr,
    payload: &[u8],
    qos: QoS,
    packet_id: Option<PacketId>,
    retain: bool,
    dup: bool,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    if packet_id.is_some() != (qos != QoS::AtMostOnce) {
        return Err(EncodeError::PacketIdMismatch);
    }
    let len = 2 + topic.len() + if packet_id.is_some() { 2 } else { 0 } + payload.len();
    let first = 0x30 | ((dup as u8) << 3) | ((qos as u8) << 1) | retain as u8;
    out.reserve(len + 5);
    put_header(first, len, out)?;
    put_binary(topic.as_bytes(), out)?;
    if let Some(id) = packet_id {
        out.put_u16(id);
    }
    out.put_slice(payload);
    Ok(())
}

fn encode_publish(p: &Publish, out: &mut BytesMut) -> Result<(), EncodeError> {
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

fn encode_connect(c: &Connect, out: &mut BytesMut) -> Result<(), EncodeError> {
    let (name, level) = c.protocol.name_and_level();
    let mut len = 2 + name.len() + 1 + 1 + 2 + 2 + c.client_id.len();
    let mut flags = (c.clean_session as u8) << 1;
    if let Some(w) = &c.will {
        len += 2 + w.topic.len() + 2 + w.payload.len();
        flags |= 0x04 | ((w.qos as u8) << 3) | ((w.retain as u8) << 5);
    }
    if let Some(u) = &c.username {
        len += 2 + u.len();
        flags |= 0x80;
    }
    if let Some(p) = &c.password {
        len += 2 + p.len();
        flags |= 0x40;
    }
    put_header(0x10, len, out)?;
    put_binary(name.as_bytes(), out)?;
    out.put_u8(level);
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_binary(c.client_id.as_bytes(), out)?;
    if let Some(w) = &c.will {
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

fn encode_id(first: u8, id: PacketId, out: &mut BytesMut) -> Result<(), EncodeError> {
    out.put_u8(first);
    out.put_u8(2);
    out.put_u16(id);
    Ok(())
}

fn put_header(first: u8, mut len: usize, out: &mut BytesMut) -> Result<(), EncodeError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::TooLarge);
    }
    out.put_u8(first);
    loop {
        let mut byte = (len & 0x7F) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return Ok(());
        }
    }
}

fn put_binary(data: &[u8], out: &mut BytesMut) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong)?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}
