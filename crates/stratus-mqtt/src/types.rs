//! Small value types shared by the codec and the broker core: QoS, protocol versions, UTF-8 strings.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// Quality of service level of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// At most once.
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit wire value; `None` for the reserved value 3.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The MQTT protocol revision a client speaks, from the CONNECT protocol name and level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V311,
    /// MQTT 5.0 (`MQTT`, level 5).
    V5,
}

impl ProtocolVersion {
    /// The protocol name and level that a CONNECT of this revision carries.
    pub fn name_and_level(self) -> (&'static str, u8) {
        match self {
            ProtocolVersion::V31 => ("MQIsdp", 3),
            ProtocolVersion::V311 => ("MQTT", 4),
            ProtocolVersion::V5 => ("MQTT", 5),
        }
    }

    /// True for MQTT 5.0, whose packets carry reason codes and properties.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
}

/// A packet identifier (never zero on the wire for packets that carry one).
pub type PacketId = u16;

/// An immutable UTF-8 string backed by [`Bytes`], so topics and client ids can be sliced
/// out of a received packet without copying.
///
/// Invariant: the bytes are valid UTF-8 and contain no U+0000 (MQTT-1.5.3-1, MQTT-1.5.3-2).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// Validates `bytes` as an MQTT UTF-8 string.
    pub fn from_bytes(bytes: Bytes) -> Result<MqttStr, Utf8Error> {
        let s = std::str::from_utf8(&bytes).map_err(|_| Utf8Error::InvalidUtf8)?;
        if s.as_bytes().contains(&0) {
            return Err(Utf8Error::NullCharacter);
        }
        Ok(MqttStr(bytes))
    }

    /// A string from static text (test and constant use); panics never, rejects like [`from_bytes`](Self::from_bytes).
    pub fn from_static(s: &'static str) -> Result<MqttStr, Utf8Error> {
        MqttStr::from_bytes(Bytes::from_static(s.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor (`from_bytes`, `From<&str>`, `From<String>`) either
        // validated the bytes with `std::str::from_utf8` or took them from a `str`, and
        // `Bytes` is immutable, so the bytes are valid UTF-8 for the value's whole life.
        #[allow(unsafe_code)]
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    /// A copy in a buffer of its own (see [`Message::compact`](crate::Message::compact)).
    pub fn compact(&self) -> MqttStr {
        MqttStr(Bytes::copy_from_slice(&self.0))
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<&str> for MqttStr {
    type Error = Utf8Error;
    fn try_from(s: &str) -> Result<Self, Utf8Error> {
        MqttStr::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for MqttStr {
    type Error = Utf8Error;
    fn try_from(s: String) -> Result<Self, Utf8Error> {
        MqttStr::from_bytes(Bytes::from(s.into_bytes()))
    }
}

impl Deref for MqttStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes are not an MQTT UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Utf8Error {
    /// Not well-formed UTF-8 (MQTT-1.5.3-1).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// Contains U+0000 (MQTT-1.5.3-2).
    #[error("string contains U+0000")]
    NullCharacter,
}
