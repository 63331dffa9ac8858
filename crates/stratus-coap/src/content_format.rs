//! Content-Format identifiers (RFC 7252 §12.3) for the Content-Format and Accept options.

use std::fmt;

/// A Content-Format identifier from the IANA registry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentFormat(pub u16);

impl ContentFormat {
    /// `text/plain; charset=utf-8` (0).
    pub const TEXT_PLAIN: ContentFormat = ContentFormat(0);
    /// `application/link-format` (40, RFC 6690).
    pub const LINK_FORMAT: ContentFormat = ContentFormat(40);
    /// `application/xml` (41).
    pub const XML: ContentFormat = ContentFormat(41);
    /// `application/octet-stream` (42).
    pub const OCTET_STREAM: ContentFormat = ContentFormat(42);
    /// `application/exi` (47).
    pub const EXI: ContentFormat = ContentFormat(47);
    /// `application/json` (50).
    pub const JSON: ContentFormat = ContentFormat(50);
    /// `application/cbor` (60).
    pub const CBOR: ContentFormat = ContentFormat(60);

    /// The media type, for the formats named above.
    pub fn media_type(self) -> Option<&'static str> {
        Some(match self {
            ContentFormat::TEXT_PLAIN => "text/plain; charset=utf-8",
            ContentFormat::LINK_FORMAT => "application/link-format",
            ContentFormat::XML => "application/xml",
            ContentFormat::OCTET_STREAM => "application/octet-stream",
            ContentFormat::EXI => "application/exi",
            ContentFormat::JSON => "application/json",
            ContentFormat::CBOR => "application/cbor",
            _ => return None,
        })
    }
}

impl fmt::Debug for ContentFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.media_type() {
            Some(m) => write!(f, "ContentFormat({} {m})", self.0),
            None => write!(f, "ContentFormat({})", self.0),
        }
    }
}

impl fmt::Display for ContentFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u16> for ContentFormat {
    fn from(v: u16) -> Self {
        ContentFormat(v)
    }
}
