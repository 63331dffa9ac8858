//! Message codes (RFC 7252 §3, §5.8, §5.9, §12.1): `class.detail`, with names.

use std::fmt;

/// What a [`Code`] is, by its class (RFC 7252 §12.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodeKind {
    /// 0.00: an Empty message (ping, empty ACK, RST).
    Empty,
    /// 0.01–0.31: a request method.
    Request,
    /// 2.xx, 4.xx, 5.xx: a response.
    Response,
    /// 1.xx, 3.xx, 6.xx, 7.xx: reserved (3.xx are signalling codes of CoAP over TCP, RFC 8323,
    /// which have no meaning over UDP).
    Reserved,
}

/// A CoAP code: a 3-bit class and a 5-bit detail, written `c.dd` (`2.05`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Code(pub u8);

impl Code {
    /// 0.00 Empty.
    pub const EMPTY: Code = Code(0x00);
    /// 0.01 GET.
    pub const GET: Code = Code(0x01);
    /// 0.02 POST.
    pub const POST: Code = Code(0x02);
    /// 0.03 PUT.
    pub const PUT: Code = Code(0x03);
    /// 0.04 DELETE.
    pub const DELETE: Code = Code(0x04);
    /// 0.05 FETCH (RFC 8132).
    pub const FETCH: Code = Code(0x05);
    /// 0.06 PATCH (RFC 8132).
    pub const PATCH: Code = Code(0x06);
    /// 0.07 iPATCH (RFC 8132).
    pub const IPATCH: Code = Code(0x07);
    /// 2.01 Created.
    pub const CREATED: Code = Code::new_const(2, 1);
    /// 2.02 Deleted.
    pub const DELETED: Code = Code::new_const(2, 2);
    /// 2.03 Valid.
    pub const VALID: Code = Code::new_const(2, 3);
    /// 2.04 Changed.
    pub const CHANGED: Code = Code::new_const(2, 4);
    /// 2.05 Content.
    pub const CONTENT: Code = Code::new_const(2, 5);
    /// 2.31 Continue (RFC 7959).
    pub const CONTINUE: Code = Code::new_const(2, 31);
    /// 4.00 Bad Request.
    pub const BAD_REQUEST: Code = Code::new_const(4, 0);
    /// 4.01 Unauthorized.
    pub const UNAUTHORIZED: Code = Code::new_const(4, 1);
    /// 4.02 Bad Option.
    pub const BAD_OPTION: Code = Code::new_const(4, 2);
    /// 4.03 Forbidden.
    pub const FORBIDDEN: Code = Code::new_const(4, 3);
    /// 4.04 Not Found.
    pub const NOT_FOUND: Code = Code::new_const(4, 4);
    /// 4.05 Method Not Allowed.
    pub const METHOD_NOT_ALLOWED: Code = Code::new_const(4, 5);
    /// 4.06 Not Acceptable.
    pub const NOT_ACCEPTABLE: Code = Code::new_const(4, 6);
    /// 4.08 Request Entity Incomplete (RFC 7959).
    pub const REQUEST_ENTITY_INCOMPLETE: Code = Code::new_const(4, 8);
    /// 4.09 Conflict (RFC 8132).
    pub const CONFLICT: Code = Code::new_const(4, 9);
    /// 4.12 Precondition Failed.
    pub const PRECONDITION_FAILED: Code = Code::new_const(4, 12);
    /// 4.13 Request Entity Too Large.
    pub const REQUEST_ENTITY_TOO_LARGE: Code = Code::new_const(4, 13);
    /// 4.15 Unsupported Content-Format.
    pub const UNSUPPORTED_CONTENT_FORMAT: Code = Code::new_const(4, 15);
    /// 4.22 Unprocessable Entity (RFC 8132).
    pub const UNPROCESSABLE_ENTITY: Code = Code::new_const(4, 22);
    /// 4.29 Too Many Requests (RFC 8516).
    pub const TOO_MANY_REQUESTS: Code = Code::new_const(4, 29);
    /// 5.00 Internal Server Error.
    pub const INTERNAL_SERVER_ERROR: Code = Code::new_const(5, 0);
    /// 5.01 Not Implemented.
    pub const NOT_IMPLEMENTED: Code = Code::new_const(5, 1);
    /// 5.02 Bad Gateway.
    pub const BAD_GATEWAY: Code = Code::new_const(5, 2);
    /// 5.03 Service Unavailable.
    pub const SERVICE_UNAVAILABLE: Code = Code::new_const(5, 3);
    /// 5.04 Gateway Timeout.
    pub const GATEWAY_TIMEOUT: Code = Code::new_const(5, 4);
    /// 5.05 Proxying Not Supported.
    pub const PROXYING_NOT_SUPPORTED: Code = Code::new_const(5, 5);

    const fn new_const(class: u8, detail: u8) -> Code {
        Code((class << 5) | detail)
    }

    /// The code `class.detail`; `None` when `class > 7` or `detail > 31`.
    pub fn new(class: u8, detail: u8) -> Option<Code> {
        (class <= 7 && detail <= 31).then(|| Code::new_const(class, detail))
    }

    /// The class (the digit before the dot).
    pub fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail (the two digits after the dot).
    pub fn detail(self) -> u8 {
        self.0 & 0x1f
    }

    /// What this code is.
    pub fn kind(self) -> CodeKind {
        match self.class() {
            0 if self.0 == 0 => CodeKind::Empty,
            0 => CodeKind::Request,
            2 | 4 | 5 => CodeKind::Response,
            _ => CodeKind::Reserved,
        }
    }

    /// 0.00.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// 0.01–0.31.
    pub fn is_request(self) -> bool {
        self.kind() == CodeKind::Request
    }

    /// 2.xx, 4.xx or 5.xx.
    pub fn is_response(self) -> bool {
        self.kind() == CodeKind::Response
    }

    /// 2.xx.
    pub fn is_success(self) -> bool {
        self.class() == 2
    }

    /// 4.xx or 5.xx.
    pub fn is_error(self) -> bool {
        matches!(self.class(), 4 | 5)
    }

    /// The registered name ("Content", "GET", "Bad Option"), or `None` for an unassigned code.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Code::EMPTY => "Empty",
            Code::GET => "GET",
            Code::POST => "POST",
            Code::PUT => "PUT",
            Code::DELETE => "DELETE",
            Code::FETCH => "FETCH",
            Code::PATCH => "PATCH",
            Code::IPATCH => "iPATCH",
            Code::CREATED => "Created",
            Code::DELETED => "Deleted",
            Code::VALID => "Valid",
            Code::CHANGED => "Changed",
            Code::CONTENT => "Content",
            Code::CONTINUE => "Continue",
            Code::BAD_REQUEST => "Bad Request",
            Code::UNAUTHORIZED => "Unauthorized",
            Code::BAD_OPTION => "Bad Option",
            Code::FORBIDDEN => "Forbidden",
            Code::NOT_FOUND => "Not Found",
            Code::METHOD_NOT_ALLOWED => "Method Not Allowed",
            Code::NOT_ACCEPTABLE => "Not Acceptable",
            Code::REQUEST_ENTITY_INCOMPLETE => "Request Entity Incomplete",
            Code::CONFLICT => "Conflict",
            Code::PRECONDITION_FAILED => "Precondition Failed",
            Code::REQUEST_ENTITY_TOO_LARGE => "Request Entity Too Large",
            Code::UNSUPPORTED_CONTENT_FORMAT => "Unsupported Content-Format",
            Code::UNPROCESSABLE_ENTITY => "Unprocessable Entity",
            Code::TOO_MANY_REQUESTS => "Too Many Requests",
            Code::INTERNAL_SERVER_ERROR => "Internal Server Error",
            Code::NOT_IMPLEMENTED => "Not Implemented",
            Code::BAD_GATEWAY => "Bad Gateway",
            Code::SERVICE_UNAVAILABLE => "Service Unavailable",
            Code::GATEWAY_TIMEOUT => "Gateway Timeout",
            Code::PROXYING_NOT_SUPPORTED => "Proxying Not Supported",
            _ => return None,
        })
    }
}

impl fmt::Display for Code {
    /// `2.05`; with `{:#}`, `2.05 Content`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())?;
        if f.alternate() {
            if let Some(name) = self.name() {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({self:#})")
    }
}

impl From<u8> for Code {
    fn from(v: u8) -> Self {
        Code(v)
    }
}

impl From<Code> for u8 {
    fn from(c: Code) -> Self {
        c.0
    }
}
