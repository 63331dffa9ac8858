//! Byte forms of the MQTT state a durable store keeps: forwarded PUBLISH properties, wills and
//! subscription options, so a store can hold them as opaque blobs and the broker can read
//! back exactly what it wrote.
//!
//! Properties use the MQTT 5.0 property-set encoding (length prefix, then properties), so the
//! decoder that guards the network guards the disk too: a corrupted blob is a
//! [`DecodeError`], never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::{put_binary, take_array, take_str, DecodeError, EncodeError};
use crate::packet::{LastWill, RetainHandling, SubscriptionOptions};
use crate::properties::{Encode, PublishProperties, WillProperties};
use crate::types::QoS;

const WILL: &str = "stored will";

/// The property set of `properties` (empty input: an empty blob).
pub fn encode_publish_properties(properties: &PublishProperties) -> Result<Bytes, EncodeError> {
    if properties.is_empty() {
        return Ok(Bytes::new());
    }
    let len = properties.contents_len()?;
    let mut out = BytesMut::with_capacity(len + 4);
    properties.write(len, &mut out)?;
    Ok(out.freeze())
}

/// Reads back what [`encode_publish_properties`] wrote.
pub fn decode_publish_properties(mut blob: Bytes) -> Result<PublishProperties, DecodeError> {
    if blob.is_empty() {
        return Ok(PublishProperties::default());
    }
    let p = PublishProperties::decode(&mut blob)?;
    if blob.has_remaining() {
        return Err(DecodeError::Truncated("stored properties"));
    }
    Ok(p)
}

/// A will as one blob: flags (QoS, retain), topic, payload, will properties.
pub fn encode_will(will: &LastWill) -> Result<Bytes, EncodeError> {
    let len = will.properties.contents_len()?;
    let mut out = BytesMut::with_capacity(will.topic.len() + will.payload.len() + len + 16);
    out.put_u8(will.qos as u8 | (u8::from(will.retain) << 2));
    put_binary(will.topic.as_bytes(), &mut out)?;
    out.put_u32(u32::try_from(will.payload.len()).map_err(|_| EncodeError::TooLarge)?);
    out.put_slice(&will.payload);
    will.properties.write(len, &mut out)?;
    Ok(out.freeze())
}

/// Reads back what [`encode_will`] wrote.
pub fn decode_will(mut blob: Bytes) -> Result<LastWill, DecodeError> {
    let [flags] = take_array::<1>(&mut blob, WILL)?;
    let qos = QoS::from_u8(flags & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let topic = take_str(&mut blob, WILL)?;
    let [a, b, c, d] = take_array::<4>(&mut blob, WILL)?;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if blob.remaining() < len {
        return Err(DecodeError::Truncated(WILL));
    }
    let payload = blob.split_to(len);
    let properties = WillProperties::decode(&mut blob)?;
    if blob.has_remaining() {
        return Err(DecodeError::Truncated(WILL));
    }
    Ok(LastWill {
        topic,
        payload,
        qos,
        retain: flags & 0x04 != 0,
        properties,
    })
}

/// The subscription options byte as MQTT 5.0 puts it on the wire.
pub fn encode_subscription_options(o: SubscriptionOptions) -> u8 {
    o.qos as u8
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | (o.retain_handling as u8) << 4
}

/// Reads back an options byte; `None` when it is not one [`encode_subscription_options`] makes.
pub fn decode_subscription_options(b: u8) -> Option<SubscriptionOptions> {
    if b & 0xC0 != 0 {
        return None;
    }
    Some(SubscriptionOptions {
        qos: QoS::from_u8(b & 0x03)?,
        no_local: b & 0x04 != 0,
        retain_as_published: b & 0x08 != 0,
        retain_handling: match (b >> 4) & 0x03 {
            0 => RetainHandling::SendOnSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::PayloadFormat;
    use crate::types::MqttStr;
    use std::num::NonZeroU32;

    fn s(v: &str) -> MqttStr {
        MqttStr::try_from(v).unwrap()
    }

    #[test]
    fn publish_properties_round_trip() {
        let p = PublishProperties {
            payload_format: Some(PayloadFormat::Utf8),
            content_type: Some(s("application/json")),
            response_topic: Some(s("r/1")),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![(s("a"), s("1")), (s("a"), s("2"))],
            subscription_identifiers: vec![NonZeroU32::new(7).unwrap()],
            ..PublishProperties::default()
        };
        let blob = encode_publish_properties(&p).unwrap();
        assert_eq!(decode_publish_properties(blob).unwrap(), p);
        assert!(encode_publish_properties(&PublishProperties::default())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn wills_round_trip_and_corruption_is_an_error() {
        let w = LastWill {
            topic: s("will/t"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: WillProperties {
                will_delay_interval: Some(30),
                message_expiry_interval: Some(60),
                user_properties: vec![(s("k"), s("v"))],
                ..WillProperties::default()
            },
        };
        let blob = encode_will(&w).unwrap();
        assert_eq!(decode_will(blob.clone()).unwrap(), w);
        for cut in 0..blob.len() {
            assert!(
                decode_will(blob.slice(..cut)).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let mut bad = blob.to_vec();
        bad[0] = 0x03; // QoS 3
        assert!(decode_will(Bytes::from(bad)).is_err());
    }

    #[test]
    fn every_valid_options_byte_round_trips_and_others_are_refused() {
        let mut valid = 0;
        for b in 0..=255u8 {
            match decode_subscription_options(b) {
                Some(o) => {
                    valid += 1;
                    assert_eq!(encode_subscription_options(o), b);
                }
                None => assert!(b & 0xC0 != 0 || b & 0x03 == 3 || (b >> 4) & 0x03 == 3),
            }
        }
        assert_eq!(valid, 3 * 2 * 2 * 3);
    }
}
