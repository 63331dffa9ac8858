//! The CoAP message model (RFC 7252 §3): type, code, message ID, token, options, payload.

use std::fmt;

use bytes::Bytes;

use crate::code::Code;
use crate::option::Options;

/// The message type (T, 2 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Confirmable (0): retransmitted until acknowledged.
    Confirmable,
    /// Non-confirmable (1).
    NonConfirmable,
    /// Acknowledgement (2).
    Acknowledgement,
    /// Reset (3).
    Reset,
}

impl MessageType {
    /// From the two header bits.
    pub fn from_bits(bits: u8) -> MessageType {
        match bits & 3 {
            0 => MessageType::Confirmable,
            1 => MessageType::NonConfirmable,
            2 => MessageType::Acknowledgement,
            _ => MessageType::Reset,
        }
    }

    /// The two header bits.
    pub fn bits(self) -> u8 {
        match self {
            MessageType::Confirmable => 0,
            MessageType::NonConfirmable => 1,
            MessageType::Acknowledgement => 2,
            MessageType::Reset => 3,
        }
    }

    /// Short name: CON, NON, ACK, RST.
    pub fn short_name(self) -> &'static str {
        match self {
            MessageType::Confirmable => "CON",
            MessageType::NonConfirmable => "NON",
            MessageType::Acknowledgement => "ACK",
            MessageType::Reset => "RST",
        }
    }
}

/// A message ID (16 bits), used for deduplication and to match ACK/RST to CON/NON (§4.4).
pub type MessageId = u16;

/// A token: 0–8 opaque bytes that match a response to its request (§5.3.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Token {
    len: u8,
    bytes: [u8; 8],
}

impl Token {
    /// The zero-length token.
    pub const EMPTY: Token = Token {
        len: 0,
        bytes: [0; 8],
    };

    /// A token from up to 8 bytes; `None` when longer.
    pub fn new(bytes: &[u8]) -> Option<Token> {
        if bytes.len() > 8 {
            return None;
        }
        let mut t = Token {
            len: bytes.len() as u8,
            bytes: [0; 8],
        };
        t.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(t)
    }

    /// A token holding the `len` (at most 8) low-order bytes of `v`, big-endian.
    pub fn from_u64(v: u64, len: usize) -> Token {
        let len = len.min(8);
        let all = v.to_be_bytes();
        let mut t = Token {
            len: len as u8,
            bytes: [0; 8],
        };
        t.bytes[..len].copy_from_slice(&all[8 - len..]);
        t
    }

    /// The token bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Length in bytes (0–8).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the token is zero-length.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(")?;
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A whole CoAP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// CON, NON, ACK or RST.
    pub message_type: MessageType,
    /// Method, response code, or 0.00 Empty.
    pub code: Code,
    /// Message ID.
    pub message_id: MessageId,
    /// Token.
    pub token: Token,
    /// Options in wire order.
    pub options: Options,
    /// Payload (empty when there is none; the payload marker is written only before a
    /// non-empty payload).
    pub payload: Bytes,
}

impl Message {
    /// A message with no token, options or payload.
    pub fn new(message_type: MessageType, code: Code, message_id: MessageId) -> Message {
        Message {
            message_type,
            code,
            message_id,
            token: Token::EMPTY,
            options: Options::new(),
            payload: Bytes::new(),
        }
    }

    /// An Empty message (0.00) of the given type: an empty ACK, a RST or a CoAP ping.
    pub fn empty(message_type: MessageType, message_id: MessageId) -> Message {
        Message::new(message_type, Code::EMPTY, message_id)
    }

    /// A request `code` for `path` (`/a/b`), with the given type, ID and token.
    pub fn request(
        message_type: MessageType,
        code: Code,
        message_id: MessageId,
        token: Token,
        path: &str,
    ) -> Message {
        let mut m = Message::new(message_type, code, message_id);
        m.token = token;
        m.options.set_uri_path(path);
        m
    }

    /// Sets the payload (builder style).
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Message {
        self.payload = payload.into();
        self
    }

    /// Sets the token (builder style).
    pub fn with_token(mut self, token: Token) -> Message {
        self.token = token;
        self
    }

    /// Whether this is an Empty message (code 0.00).
    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// Whether this carries a request.
    pub fn is_request(&self) -> bool {
        self.code.is_request()
    }

    /// Whether this carries a response.
    pub fn is_response(&self) -> bool {
        self.code.is_response()
    }
}

/// A response the application hands to the endpoint: code, options and the *whole* body.
/// The endpoint chooses type, message ID and token, and splits a large body into Block2 blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Response code (2.xx, 4.xx, 5.xx).
    pub code: Code,
    /// Options.
    pub options: Options,
    /// The whole representation.
    pub payload: Bytes,
}

impl Response {
    /// A response with no options and no payload.
    pub fn new(code: Code) -> Response {
        Response {
            code,
            options: Options::new(),
            payload: Bytes::new(),
        }
    }

    /// Sets the payload (builder style).
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Response {
        self.payload = payload.into();
        self
    }

    /// Sets the Content-Format (builder style).
    pub fn with_content_format(mut self, cf: crate::ContentFormat) -> Response {
        self.options.set_content_format(cf);
        self
    }

    /// Accepts an Observe registration (builder style): include this in the response to a
    /// GET with Observe=0 to add the client to the observers (the endpoint writes the
    /// sequence number).
    pub fn observing(mut self) -> Response {
        self.options.set_observe(0);
        self
    }
}

/// A request the application sends as a client (see [`crate::Endpoint::send_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub code: Code,
    /// Confirmable (retransmitted until acknowledged) or not.
    pub confirmable: bool,
    /// Options (Uri-Path, Uri-Query, …).
    pub options: Options,
    /// Payload.
    pub payload: Bytes,
}

impl Request {
    /// A confirmable request for `path` (`/a/b`).
    pub fn new(code: Code, path: &str) -> Request {
        let mut options = Options::new();
        options.set_uri_path(path);
        Request {
            code,
            confirmable: true,
            options,
            payload: Bytes::new(),
        }
    }

    /// A confirmable GET for `path`.
    pub fn get(path: &str) -> Request {
        Request::new(Code::GET, path)
    }

    /// Sets the payload (builder style).
    pub fn with_payload(mut self, payload: impl Into<Bytes>) -> Request {
        self.payload = payload.into();
        self
    }

    /// Makes the request non-confirmable (builder style).
    pub fn non_confirmable(mut self) -> Request {
        self.confirmable = false;
        self
    }
}
