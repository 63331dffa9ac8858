//! The wire codec (RFC 7252 §3): datagram bytes to [`Message`]s and back, every malformed case
//! named by the rule it breaks.
//!
//! Decoding is zero-copy: option values and the payload of a decoded message are slices of
//! the datagram's [`Bytes`]. The option encoding is canonical (a delta or length has exactly
//! one valid encoding), so `encode(decode(b)) == b` for every datagram `b` that decodes.
//!
//! The codec checks syntax only. Whether an option is known, has a valid length or may repeat
//! is the endpoint's business (§5.4: such options are "unrecognized", not malformed).

use bytes::{BufMut, Bytes, BytesMut};

use crate::code::Code;
use crate::message::{Message, MessageType, Token};
use crate::option::{OptionNumber, Options};

/// The only protocol version (§3).
pub const VERSION: u8 = 1;

/// The payload marker (§3).
pub const PAYLOAD_MARKER: u8 = 0xff;

/// Longest option value the extended length can express (14 nibble: 269 + 65535).
pub const MAX_OPTION_LEN: usize = 269 + 0xffff;

/// Why bytes are not a CoAP message (a "message format error", §4.2/§4.3, unless noted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer than the 4 header bytes: there is no message ID to reject, so it is ignored.
    #[error("datagram of {0} bytes is shorter than the 4-byte header")]
    TooShort(usize),
    /// Version other than 1: silently ignored (§3).
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// Token Length 9–15 (§3).
    #[error("reserved token length {0}")]
    InvalidTokenLength(u8),
    /// The datagram ends inside the token.
    #[error("datagram ends inside the token")]
    TruncatedToken,
    /// An Empty message (0.00) with a token or any byte after the message ID (§4.1).
    #[error("empty message with token, options or payload")]
    NonEmptyEmptyMessage,
    /// Option delta or length nibble 15 outside the payload marker (§3.1).
    #[error("reserved option nibble 15")]
    ReservedOptionNibble,
    /// The datagram ends inside an option header, extension or value.
    #[error("datagram ends inside an option")]
    TruncatedOption,
    /// The option deltas add up past 65535.
    #[error("option number exceeds 65535")]
    OptionNumberOverflow,
    /// A payload marker followed by a zero-length payload (§3).
    #[error("payload marker followed by an empty payload")]
    EmptyPayload,
}

impl DecodeError {
    /// Whether the header was readable, so a Confirmable message can be rejected with a RST
    /// carrying its message ID (§4.2). Too-short datagrams and other versions are ignored.
    pub fn header_readable(&self) -> bool {
        !matches!(
            self,
            DecodeError::TooShort(_) | DecodeError::UnsupportedVersion(_)
        )
    }
}

/// Why a [`Message`] cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// An Empty message (0.00) must have no token, options or payload (§4.1).
    #[error("empty message with token, options or payload")]
    NonEmptyEmptyMessage,
    /// An option value longer than [`MAX_OPTION_LEN`].
    #[error("{number} value of {len} bytes is too long to encode")]
    OptionTooLong {
        /// The option.
        number: OptionNumber,
        /// Its length.
        len: usize,
    },
}

/// The fixed header, readable from any datagram of 4 bytes or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Version (only 1 is valid).
    pub version: u8,
    /// Message type.
    pub message_type: MessageType,
    /// Token length field (0–15; 9–15 are reserved).
    pub token_length: u8,
    /// Code.
    pub code: Code,
    /// Message ID.
    pub message_id: u16,
}

impl Header {
    /// Reads the first 4 bytes; `None` when there are fewer.
    pub fn parse(datagram: &[u8]) -> Option<Header> {
        let [b0, code, m0, m1, ..] = *datagram else {
            return None;
        };
        Some(Header {
            version: b0 >> 6,
            message_type: MessageType::from_bits(b0 >> 4),
            token_length: b0 & 0x0f,
            code: Code(code),
            message_id: u16::from_be_bytes([m0, m1]),
        })
    }
}

/// Decodes one datagram (copying it once into a [`Bytes`]).
pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
    decode_bytes(Bytes::copy_from_slice(datagram))
}

/// Decodes one datagram without copying: option values and payload share `datagram`.
pub fn decode_bytes(datagram: Bytes) -> Result<Message, DecodeError> {
    let header = Header::parse(&datagram).ok_or(DecodeError::TooShort(datagram.len()))?;
    if header.version != VERSION {
        return Err(DecodeError::UnsupportedVersion(header.version));
    }
    if header.token_length > 8 {
        return Err(DecodeError::InvalidTokenLength(header.token_length));
    }
    if header.code.is_empty() && (header.token_length != 0 || datagram.len() > 4) {
        return Err(DecodeError::NonEmptyEmptyMessage);
    }
    let tkl = usize::from(header.token_length);
    let token = datagram
        .get(4..4 + tkl)
        .and_then(Token::new)
        .ok_or(DecodeError::TruncatedToken)?;
    let mut pos = 4 + tkl;
    let mut options = Options::new();
    let mut number: u32 = 0;
    let mut payload = Bytes::new();
    while let Some(&byte) = datagram.get(pos) {
        pos += 1;
        if byte == PAYLOAD_MARKER {
            if pos == datagram.len() {
                return Err(DecodeError::EmptyPayload);
            }
            payload = datagram.slice(pos..);
            break;
        }
        let delta = read_extended(&datagram, &mut pos, byte >> 4)?;
        let len = read_extended(&datagram, &mut pos, byte & 0x0f)? as usize;
        number += delta;
        if number > u32::from(u16::MAX) {
            return Err(DecodeError::OptionNumberOverflow);
        }
        let end = pos
            .checked_add(len)
            .filter(|end| *end <= datagram.len())
            .ok_or(DecodeError::TruncatedOption)?;
        options.push(OptionNumber(number as u16), datagram.slice(pos..end));
        pos = end;
    }
    Ok(Message {
        message_type: header.message_type,
        code: header.code,
        message_id: header.message_id,
        token,
        options,
        payload,
    })
}

/// Reads the value of a delta or length nibble and its extension bytes (§3.1).
fn read_extended(data: &[u8], pos: &mut usize, nibble: u8) -> Result<u32, DecodeError> {
    match nibble {
        0..=12 => Ok(u32::from(nibble)),
        13 => {
            let b = *data.get(*pos).ok_or(DecodeError::TruncatedOption)?;
            *pos += 1;
            Ok(u32::from(b) + 13)
        }
        14 => {
            let b = data
                .get(*pos..*pos + 2)
                .ok_or(DecodeError::TruncatedOption)?;
            *pos += 2;
            Ok(u32::from(u16::from_be_bytes([b[0], b[1]])) + 269)
        }
        _ => Err(DecodeError::ReservedOptionNibble),
    }
}

/// The nibble and extension bytes for a delta or length value.
fn extended(v: usize) -> (u8, Option<u8>, Option<u16>) {
    if v < 13 {
        (v as u8, None, None)
    } else if v < 269 {
        (13, Some((v - 13) as u8), None)
    } else {
        (14, None, Some((v - 269) as u16))
    }
}

/// The encoded size of `msg` in bytes.
pub fn encoded_len(msg: &Message) -> usize {
    let mut n = 4 + msg.token.len();
    let mut prev = 0u16;
    for o in &msg.options {
        let delta = usize::from(o.number.0.saturating_sub(prev));
        prev = o.number.0;
        n += 1 + ext_len(delta) + ext_len(o.value.len()) + o.value.len();
    }
    if !msg.payload.is_empty() {
        n += 1 + msg.payload.len();
    }
    n
}

fn ext_len(v: usize) -> usize {
    match v {
        0..=12 => 0,
        13..=268 => 1,
        _ => 2,
    }
}

/// Appends the encoding of `msg` to `out`.
pub fn encode_into(msg: &Message, out: &mut BytesMut) -> Result<(), EncodeError> {
    if msg.code.is_empty()
        && (!msg.token.is_empty() || !msg.options.is_empty() || !msg.payload.is_empty())
    {
        return Err(EncodeError::NonEmptyEmptyMessage);
    }
    if let Some(o) = msg.options.iter().find(|o| o.value.len() > MAX_OPTION_LEN) {
        return Err(EncodeError::OptionTooLong {
            number: o.number,
            len: o.value.len(),
        });
    }
    out.reserve(encoded_len(msg));
    out.put_u8((VERSION << 6) | (msg.message_type.bits() << 4) | msg.token.len() as u8);
    out.put_u8(msg.code.0);
    out.put_u16(msg.message_id);
    out.put_slice(msg.token.as_bytes());
    let mut prev = 0u16;
    for o in &msg.options {
        // `Options` keeps numbers sorted, so the delta never underflows.
        let (dn, d1, d2) = extended(usize::from(o.number.0.saturating_sub(prev)));
        let (ln, l1, l2) = extended(o.value.len());
        prev = o.number.0;
        out.put_u8((dn << 4) | ln);
        if let Some(b) = d1 {
            out.put_u8(b);
        }
        if let Some(b) = d2 {
            out.put_u16(b);
        }
        if let Some(b) = l1 {
            out.put_u8(b);
        }
        if let Some(b) = l2 {
            out.put_u16(b);
        }
        out.put_slice(&o.value);
    }
    if !msg.payload.is_empty() {
        out.put_u8(PAYLOAD_MARKER);
        out.put_slice(&msg.payload);
    }
    Ok(())
}

/// Encodes `msg` into a new buffer.
pub fn encode(msg: &Message) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::with_capacity(encoded_len(msg));
    encode_into(msg, &mut out)?;
    Ok(out.freeze())
}
