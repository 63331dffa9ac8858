//! Options (RFC 7252 §5.4, §5.10, RFC 7641 §2, RFC 7959 §2): numbers, formats, the ordered
//! option list of a message, and typed accessors for the options Stratus knows.

use std::fmt;

use bytes::Bytes;

use crate::content_format::ContentFormat;

/// An option number. Odd numbers are critical, bit 1 marks unsafe-to-forward (§5.4.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OptionNumber(pub u16);

impl OptionNumber {
    /// If-Match (1), opaque 0–8, repeatable.
    pub const IF_MATCH: OptionNumber = OptionNumber(1);
    /// Uri-Host (3), string 1–255.
    pub const URI_HOST: OptionNumber = OptionNumber(3);
    /// ETag (4), opaque 1–8 (repeatable in requests).
    pub const ETAG: OptionNumber = OptionNumber(4);
    /// If-None-Match (5), empty.
    pub const IF_NONE_MATCH: OptionNumber = OptionNumber(5);
    /// Observe (6, RFC 7641), uint 0–3.
    pub const OBSERVE: OptionNumber = OptionNumber(6);
    /// Uri-Port (7), uint 0–2.
    pub const URI_PORT: OptionNumber = OptionNumber(7);
    /// Location-Path (8), string 0–255, repeatable.
    pub const LOCATION_PATH: OptionNumber = OptionNumber(8);
    /// Uri-Path (11), string 0–255, repeatable.
    pub const URI_PATH: OptionNumber = OptionNumber(11);
    /// Content-Format (12), uint 0–2.
    pub const CONTENT_FORMAT: OptionNumber = OptionNumber(12);
    /// Max-Age (14), uint 0–4, default 60 s.
    pub const MAX_AGE: OptionNumber = OptionNumber(14);
    /// Uri-Query (15), string 0–255, repeatable.
    pub const URI_QUERY: OptionNumber = OptionNumber(15);
    /// Accept (17), uint 0–2.
    pub const ACCEPT: OptionNumber = OptionNumber(17);
    /// Location-Query (20), string 0–255, repeatable.
    pub const LOCATION_QUERY: OptionNumber = OptionNumber(20);
    /// Block2 (23, RFC 7959), uint 0–3.
    pub const BLOCK2: OptionNumber = OptionNumber(23);
    /// Block1 (27, RFC 7959), uint 0–3.
    pub const BLOCK1: OptionNumber = OptionNumber(27);
    /// Size2 (28, RFC 7959), uint 0–4.
    pub const SIZE2: OptionNumber = OptionNumber(28);
    /// Proxy-Uri (35), string 1–1034.
    pub const PROXY_URI: OptionNumber = OptionNumber(35);
    /// Proxy-Scheme (39), string 1–255.
    pub const PROXY_SCHEME: OptionNumber = OptionNumber(39);
    /// Size1 (60), uint 0–4.
    pub const SIZE1: OptionNumber = OptionNumber(60);

    /// Critical options must be understood by the recipient (odd numbers, §5.4.1).
    pub fn is_critical(self) -> bool {
        self.0 & 1 == 1
    }

    /// Unsafe-to-forward options (§5.4.2).
    pub fn is_unsafe(self) -> bool {
        self.0 & 2 == 2
    }

    /// Options that are not part of the cache key (§5.4.6).
    pub fn is_no_cache_key(self) -> bool {
        self.0 & 0x1e == 0x1c
    }

    /// What this endpoint knows of the option: its format, length bounds and repeatability.
    pub fn definition(self) -> Option<OptionDef> {
        use OptionFormat::*;
        let (name, format, min, max, repeatable) = match self.0 {
            1 => ("If-Match", Opaque, 0, 8, true),
            3 => ("Uri-Host", String, 1, 255, false),
            4 => ("ETag", Opaque, 1, 8, true),
            5 => ("If-None-Match", Empty, 0, 0, false),
            6 => ("Observe", Uint, 0, 3, false),
            7 => ("Uri-Port", Uint, 0, 2, false),
            8 => ("Location-Path", String, 0, 255, true),
            11 => ("Uri-Path", String, 0, 255, true),
            12 => ("Content-Format", Uint, 0, 2, false),
            14 => ("Max-Age", Uint, 0, 4, false),
            15 => ("Uri-Query", String, 0, 255, true),
            17 => ("Accept", Uint, 0, 2, false),
            20 => ("Location-Query", String, 0, 255, true),
            23 => ("Block2", Uint, 0, 3, false),
            27 => ("Block1", Uint, 0, 3, false),
            28 => ("Size2", Uint, 0, 4, false),
            35 => ("Proxy-Uri", String, 1, 1034, false),
            39 => ("Proxy-Scheme", String, 1, 255, false),
            60 => ("Size1", Uint, 0, 4, false),
            _ => return None,
        };
        Some(OptionDef {
            name,
            format,
            min_len: min,
            max_len: max,
            repeatable,
        })
    }

    /// The registered name, for options this endpoint knows.
    pub fn name(self) -> Option<&'static str> {
        self.definition().map(|d| d.name)
    }
}

impl fmt::Debug for OptionNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "Option({})", self.0),
        }
    }
}

impl fmt::Display for OptionNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl From<u16> for OptionNumber {
    fn from(v: u16) -> Self {
        OptionNumber(v)
    }
}

/// The value format of an option (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionFormat {
    /// Zero-length.
    Empty,
    /// Opaque bytes.
    Opaque,
    /// Unsigned integer, big-endian, shortest form (leading zeros tolerated when decoding).
    Uint,
    /// UTF-8 (Net-Unicode) text.
    String,
}

/// The registered properties of a known option (§5.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDef {
    /// Registered name.
    pub name: &'static str,
    /// Value format.
    pub format: OptionFormat,
    /// Shortest valid value length.
    pub min_len: usize,
    /// Longest valid value length.
    pub max_len: usize,
    /// Whether the option may occur more than once.
    pub repeatable: bool,
}

impl OptionDef {
    /// Whether `value` has a valid length and, for strings, is UTF-8.
    pub fn is_valid(&self, value: &[u8]) -> bool {
        (self.min_len..=self.max_len).contains(&value.len())
            && (self.format != OptionFormat::String || std::str::from_utf8(value).is_ok())
    }
}

/// Why a typed accessor could not read an option value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// The value length is outside the option's bounds (§5.4.3 would treat it as unrecognized).
    #[error("{number} value of {len} bytes is outside the valid length")]
    InvalidLength {
        /// The option.
        number: OptionNumber,
        /// The value length found.
        len: usize,
    },
    /// A string option that is not UTF-8.
    #[error("{0} value is not UTF-8")]
    InvalidUtf8(OptionNumber),
    /// A Block1/Block2 value with the reserved SZX 7 (RFC 7959 §2.2).
    #[error("{0} uses the reserved SZX 7")]
    ReservedSzx(OptionNumber),
}

/// Encodes `v` as a CoAP uint: big-endian, without leading zero bytes (0 is empty).
pub fn encode_uint(v: u32) -> Bytes {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    Bytes::copy_from_slice(&bytes[skip..])
}

/// Decodes a CoAP uint of at most 4 bytes; `None` when longer.
pub fn decode_uint(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
}

/// Largest block number a Block option can carry (20 bits).
pub const MAX_BLOCK_NUM: u32 = (1 << 20) - 1;

/// A Block1 or Block2 option value (RFC 7959 §2.2): block number, more flag and size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockOption {
    /// Block number (0 ..= 2^20-1).
    pub num: u32,
    /// More blocks follow (M).
    pub more: bool,
    /// Size exponent: the block holds `2^(szx + 4)` bytes (0 ..= 6).
    pub szx: u8,
}

impl BlockOption {
    /// A block option; `None` when `num` exceeds 20 bits or `szx > 6`.
    pub fn new(num: u32, more: bool, szx: u8) -> Option<BlockOption> {
        (num <= MAX_BLOCK_NUM && szx <= 6).then_some(BlockOption { num, more, szx })
    }

    /// The block size in bytes, 16 ..= 1024.
    pub fn size(&self) -> usize {
        szx_to_size(self.szx)
    }

    /// Byte offset of this block in the body.
    pub fn offset(&self) -> usize {
        self.num as usize * self.size()
    }

    /// The option value (shortest uint form).
    pub fn encode(&self) -> Bytes {
        encode_uint((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx & 7))
    }

    /// Parses a value of 0–3 bytes; `Err` for a longer value or SZX 7.
    pub fn decode(number: OptionNumber, value: &[u8]) -> Result<BlockOption, OptionError> {
        let v = match decode_uint(value) {
            Some(v) if value.len() <= 3 => v,
            _ => {
                return Err(OptionError::InvalidLength {
                    number,
                    len: value.len(),
                })
            }
        };
        let szx = (v & 7) as u8;
        if szx == 7 {
            return Err(OptionError::ReservedSzx(number));
        }
        Ok(BlockOption {
            num: v >> 4,
            more: v & 8 != 0,
            szx,
        })
    }
}

/// Block size for a size exponent: `2^(szx + 4)`, with `szx` capped at 6.
pub fn szx_to_size(szx: u8) -> usize {
    1 << (usize::from(szx.min(6)) + 4)
}

/// One option instance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoapOption {
    /// Option number.
    pub number: OptionNumber,
    /// Raw value.
    pub value: Bytes,
}

/// The options of a message, kept in wire order: sorted by number, and in insertion order
/// among equal numbers (the order of repeated options is significant, e.g. Uri-Path segments).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Options {
    list: Vec<CoapOption>,
}

impl Options {
    /// No options.
    pub fn new() -> Self {
        Options::default()
    }

    /// All options in wire order.
    pub fn iter(&self) -> impl Iterator<Item = &CoapOption> {
        self.list.iter()
    }

    /// Number of option instances.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Appends an instance after every existing instance with a number `<= number`.
    pub fn push(&mut self, number: impl Into<OptionNumber>, value: impl Into<Bytes>) {
        let number = number.into();
        let at = self.list.partition_point(|o| o.number <= number);
        self.list.insert(
            at,
            CoapOption {
                number,
                value: value.into(),
            },
        );
    }

    /// Replaces every instance of `number` with one holding `value`.
    pub fn set(&mut self, number: impl Into<OptionNumber>, value: impl Into<Bytes>) {
        let number = number.into();
        self.remove(number);
        self.push(number, value);
    }

    /// Removes every instance of `number`; returns how many there were.
    pub fn remove(&mut self, number: impl Into<OptionNumber>) -> usize {
        let number = number.into();
        let before = self.list.len();
        self.list.retain(|o| o.number != number);
        before - self.list.len()
    }

    /// Keeps the instances for which `keep` returns true.
    pub fn retain(&mut self, keep: impl FnMut(&CoapOption) -> bool) {
        self.list.retain(keep);
    }

    /// Whether `number` is present.
    pub fn contains(&self, number: impl Into<OptionNumber>) -> bool {
        let number = number.into();
        self.list.iter().any(|o| o.number == number)
    }

    /// The first instance of `number`.
    pub fn get(&self, number: impl Into<OptionNumber>) -> Option<&Bytes> {
        let number = number.into();
        self.list
            .iter()
            .find(|o| o.number == number)
            .map(|o| &o.value)
    }

    /// Every instance of `number`, in order.
    pub fn get_all(&self, number: impl Into<OptionNumber>) -> impl Iterator<Item = &Bytes> {
        let number = number.into();
        self.list
            .iter()
            .filter(move |o| o.number == number)
            .map(|o| &o.value)
    }

    /// The first instance of a uint option.
    pub fn get_uint(
        &self,
        number: OptionNumber,
        max_len: usize,
    ) -> Result<Option<u32>, OptionError> {
        match self.get(number) {
            None => Ok(None),
            Some(v) if v.len() <= max_len.min(4) => Ok(decode_uint(v)),
            Some(v) => Err(OptionError::InvalidLength {
                number,
                len: v.len(),
            }),
        }
    }

    /// Sets a uint option (shortest encoding).
    pub fn set_uint(&mut self, number: impl Into<OptionNumber>, v: u32) {
        self.set(number, encode_uint(v));
    }

    /// The first instance of a string option.
    pub fn get_str(&self, number: OptionNumber) -> Result<Option<&str>, OptionError> {
        self.get(number)
            .map(|v| std::str::from_utf8(v).map_err(|_| OptionError::InvalidUtf8(number)))
            .transpose()
    }

    /// Every instance of a string option, in order.
    pub fn get_all_str(&self, number: OptionNumber) -> Result<Vec<&str>, OptionError> {
        self.get_all(number)
            .map(|v| std::str::from_utf8(v).map_err(|_| OptionError::InvalidUtf8(number)))
            .collect()
    }

    // ---- typed accessors ----

    /// If-Match values (§5.10.8.1).
    pub fn if_match(&self) -> Vec<&[u8]> {
        self.get_all(OptionNumber::IF_MATCH)
            .map(|v| &v[..])
            .collect()
    }

    /// Adds an If-Match value.
    pub fn add_if_match(&mut self, etag: &[u8]) {
        self.push(OptionNumber::IF_MATCH, Bytes::copy_from_slice(etag));
    }

    /// Uri-Host.
    pub fn uri_host(&self) -> Result<Option<&str>, OptionError> {
        self.get_str(OptionNumber::URI_HOST)
    }

    /// Sets Uri-Host.
    pub fn set_uri_host(&mut self, host: &str) {
        self.set(
            OptionNumber::URI_HOST,
            Bytes::copy_from_slice(host.as_bytes()),
        );
    }

    /// The first ETag (a response's entity tag).
    pub fn etag(&self) -> Option<&[u8]> {
        self.get(OptionNumber::ETAG).map(|v| &v[..])
    }

    /// Every ETag (a request may list several, §5.10.6.2).
    pub fn etags(&self) -> Vec<&[u8]> {
        self.get_all(OptionNumber::ETAG).map(|v| &v[..]).collect()
    }

    /// Sets the ETag (1–8 bytes; longer values are truncated to 8).
    pub fn set_etag(&mut self, etag: &[u8]) {
        let etag = &etag[..etag.len().min(8)];
        self.set(OptionNumber::ETAG, Bytes::copy_from_slice(etag));
    }

    /// If-None-Match is present.
    pub fn if_none_match(&self) -> bool {
        self.contains(OptionNumber::IF_NONE_MATCH)
    }

    /// Sets If-None-Match.
    pub fn set_if_none_match(&mut self) {
        self.set(OptionNumber::IF_NONE_MATCH, Bytes::new());
    }

    /// Observe (RFC 7641): 0 register / 1 deregister in requests, a 24-bit sequence number in
    /// notifications.
    pub fn observe(&self) -> Result<Option<u32>, OptionError> {
        self.get_uint(OptionNumber::OBSERVE, 3)
    }

    /// Sets Observe (the value is reduced to 24 bits).
    pub fn set_observe(&mut self, v: u32) {
        self.set_uint(OptionNumber::OBSERVE, v & 0x00ff_ffff);
    }

    /// Uri-Port.
    pub fn uri_port(&self) -> Result<Option<u16>, OptionError> {
        Ok(self.get_uint(OptionNumber::URI_PORT, 2)?.map(|v| v as u16))
    }

    /// Sets Uri-Port.
    pub fn set_uri_port(&mut self, port: u16) {
        self.set_uint(OptionNumber::URI_PORT, u32::from(port));
    }

    /// Location-Path segments.
    pub fn location_path(&self) -> Result<Vec<&str>, OptionError> {
        self.get_all_str(OptionNumber::LOCATION_PATH)
    }

    /// Sets Location-Path from `/a/b` (empty segments from a leading or doubled `/` are dropped).
    pub fn set_location_path(&mut self, path: &str) {
        self.remove(OptionNumber::LOCATION_PATH);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            self.push(
                OptionNumber::LOCATION_PATH,
                Bytes::copy_from_slice(seg.as_bytes()),
            );
        }
    }

    /// Uri-Path segments.
    pub fn uri_path(&self) -> Result<Vec<&str>, OptionError> {
        self.get_all_str(OptionNumber::URI_PATH)
    }

    /// The Uri-Path as one string: `/` followed by the segments joined with `/` (`/` alone
    /// when there are none). Segments are not percent-encoded.
    pub fn uri_path_string(&self) -> Result<String, OptionError> {
        let segs = self.uri_path()?;
        Ok(format!("/{}", segs.join("/")))
    }

    /// Sets Uri-Path from `/a/b` (empty segments from a leading or doubled `/` are dropped).
    pub fn set_uri_path(&mut self, path: &str) {
        self.remove(OptionNumber::URI_PATH);
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            self.push(
                OptionNumber::URI_PATH,
                Bytes::copy_from_slice(seg.as_bytes()),
            );
        }
    }

    /// Uri-Query items (`key=value` strings).
    pub fn uri_query(&self) -> Result<Vec<&str>, OptionError> {
        self.get_all_str(OptionNumber::URI_QUERY)
    }

    /// Adds a Uri-Query item.
    pub fn add_uri_query(&mut self, item: &str) {
        self.push(
            OptionNumber::URI_QUERY,
            Bytes::copy_from_slice(item.as_bytes()),
        );
    }

    /// Content-Format.
    pub fn content_format(&self) -> Result<Option<ContentFormat>, OptionError> {
        Ok(self
            .get_uint(OptionNumber::CONTENT_FORMAT, 2)?
            .map(|v| ContentFormat(v as u16)))
    }

    /// Sets Content-Format.
    pub fn set_content_format(&mut self, cf: ContentFormat) {
        self.set_uint(OptionNumber::CONTENT_FORMAT, u32::from(cf.0));
    }

    /// Max-Age in seconds, when present (absent means 60, §5.10.5).
    pub fn max_age(&self) -> Result<Option<u32>, OptionError> {
        self.get_uint(OptionNumber::MAX_AGE, 4)
    }

    /// Sets Max-Age.
    pub fn set_max_age(&mut self, secs: u32) {
        self.set_uint(OptionNumber::MAX_AGE, secs);
    }

    /// Accept.
    pub fn accept(&self) -> Result<Option<ContentFormat>, OptionError> {
        Ok(self
            .get_uint(OptionNumber::ACCEPT, 2)?
            .map(|v| ContentFormat(v as u16)))
    }

    /// Sets Accept.
    pub fn set_accept(&mut self, cf: ContentFormat) {
        self.set_uint(OptionNumber::ACCEPT, u32::from(cf.0));
    }

    /// Location-Query items.
    pub fn location_query(&self) -> Result<Vec<&str>, OptionError> {
        self.get_all_str(OptionNumber::LOCATION_QUERY)
    }

    /// Adds a Location-Query item.
    pub fn add_location_query(&mut self, item: &str) {
        self.push(
            OptionNumber::LOCATION_QUERY,
            Bytes::copy_from_slice(item.as_bytes()),
        );
    }

    /// Block2.
    pub fn block2(&self) -> Result<Option<BlockOption>, OptionError> {
        self.get(OptionNumber::BLOCK2)
            .map(|v| BlockOption::decode(OptionNumber::BLOCK2, v))
            .transpose()
    }

    /// Sets Block2.
    pub fn set_block2(&mut self, b: BlockOption) {
        self.set(OptionNumber::BLOCK2, b.encode());
    }

    /// Block1.
    pub fn block1(&self) -> Result<Option<BlockOption>, OptionError> {
        self.get(OptionNumber::BLOCK1)
            .map(|v| BlockOption::decode(OptionNumber::BLOCK1, v))
            .transpose()
    }

    /// Sets Block1.
    pub fn set_block1(&mut self, b: BlockOption) {
        self.set(OptionNumber::BLOCK1, b.encode());
    }

    /// Size1 (request body size, or the limit in a 4.13 response).
    pub fn size1(&self) -> Result<Option<u32>, OptionError> {
        self.get_uint(OptionNumber::SIZE1, 4)
    }

    /// Sets Size1.
    pub fn set_size1(&mut self, v: u32) {
        self.set_uint(OptionNumber::SIZE1, v);
    }

    /// Size2 (response body size; 0 in a request asks for it).
    pub fn size2(&self) -> Result<Option<u32>, OptionError> {
        self.get_uint(OptionNumber::SIZE2, 4)
    }

    /// Sets Size2.
    pub fn set_size2(&mut self, v: u32) {
        self.set_uint(OptionNumber::SIZE2, v);
    }

    /// Proxy-Uri.
    pub fn proxy_uri(&self) -> Result<Option<&str>, OptionError> {
        self.get_str(OptionNumber::PROXY_URI)
    }

    /// Sets Proxy-Uri.
    pub fn set_proxy_uri(&mut self, uri: &str) {
        self.set(
            OptionNumber::PROXY_URI,
            Bytes::copy_from_slice(uri.as_bytes()),
        );
    }

    /// Proxy-Scheme.
    pub fn proxy_scheme(&self) -> Result<Option<&str>, OptionError> {
        self.get_str(OptionNumber::PROXY_SCHEME)
    }

    /// Sets Proxy-Scheme.
    pub fn set_proxy_scheme(&mut self, scheme: &str) {
        self.set(
            OptionNumber::PROXY_SCHEME,
            Bytes::copy_from_slice(scheme.as_bytes()),
        );
    }
}

impl<'a> IntoIterator for &'a Options {
    type Item = &'a CoapOption;
    type IntoIter = std::slice::Iter<'a, CoapOption>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

/// What [`check`] found wrong with a request's options (RFC 7252 §5.4.1, §5.4.3, §5.4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionCheck {
    /// The first critical option that is unknown, has an invalid value, or is a repeated
    /// non-repeatable option: the request must be answered with 4.02 (CON) or rejected (NON).
    pub bad_critical: Option<OptionNumber>,
}

/// Drops elective options that are unknown, invalid or repeated beyond the first instance
/// (they are "unrecognized" and silently ignored, §5.4.1, §5.4.3, §5.4.5) and reports the
/// first such critical option.
pub(crate) fn check(options: &mut Options) -> OptionCheck {
    let mut bad_critical = None;
    let mut last: Option<OptionNumber> = None;
    options.list.retain(|o| {
        let repeated = last == Some(o.number);
        last = Some(o.number);
        let ok = match o.number.definition() {
            Some(def) => def.is_valid(&o.value) && (def.repeatable || !repeated),
            None => false,
        };
        if !ok && o.number.is_critical() && bad_critical.is_none() {
            bad_critical = Some(o.number);
        }
        ok || o.number.is_critical()
    });
    OptionCheck { bad_critical }
}
