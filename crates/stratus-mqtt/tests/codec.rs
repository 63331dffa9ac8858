//! Codec tests: round trips for every packet type, and every malformed case the decoder must
//! refuse, each named by the rule it breaks.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use stratus_mqtt::*;

const MAX: usize = 1024 * 1024;

fn s(v: &str) -> MqttStr {
    MqttStr::try_from(v).unwrap()
}

fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, MAX)
}

fn roundtrip(p: Packet) {
    let mut buf = BytesMut::new();
    encode(&p, &mut buf).unwrap();
    let wire = buf.clone();
    let got = decode(&mut buf, MAX).unwrap().unwrap();
    assert_eq!(got, p, "wire {:02x?}", &wire[..]);
    assert!(buf.is_empty());
    // Every strict prefix is incomplete, never an error.
    for cut in 0..wire.len() {
        let mut partial = BytesMut::from(&wire[..cut]);
        assert_eq!(decode(&mut partial, MAX), Ok(None), "prefix {cut}");
        assert_eq!(partial.len(), cut, "nothing consumed");
    }
}

fn connect() -> Connect {
    Connect {
        protocol: ProtocolVersion::V311,
        clean_session: true,
        keep_alive: 60,
        client_id: s("client-1"),
        will: None,
        username: None,
        password: None,
    }
}

#[test]
fn every_packet_type_round_trips() {
    roundtrip(Packet::Connect(connect()));
    roundtrip(Packet::Connect(Connect {
        protocol: ProtocolVersion::V31,
        clean_session: false,
        keep_alive: 0,
        client_id: s("c"),
        will: Some(LastWill {
            topic: s("will/t"),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::ExactlyOnce,
            retain: true,
        }),
        username: Some(s("user")),
        password: Some(Bytes::from_static(&[0, 1, 255])),
    }));
    roundtrip(Packet::ConnAck(ConnAck {
        session_present: true,
        code: ConnectReturnCode::Accepted,
    }));
    roundtrip(Packet::ConnAck(ConnAck {
        session_present: false,
        code: ConnectReturnCode::NotAuthorized,
    }));
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        roundtrip(Packet::Publish(Publish {
            dup: qos != QoS::AtMostOnce,
            qos,
            retain: true,
            topic: s("a/b/c"),
            packet_id: (qos != QoS::AtMostOnce).then_some(42),
            payload: Bytes::from(vec![7u8; 300]),
        }));
    }
    roundtrip(Packet::PubAck(1));
    roundtrip(Packet::PubRec(2));
    roundtrip(Packet::PubRel(3));
    roundtrip(Packet::PubComp(65535));
    roundtrip(Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: vec![(s("a/+"), QoS::AtLeastOnce), (s("#"), QoS::ExactlyOnce)],
    }));
    roundtrip(Packet::SubAck(SubAck {
        packet_id: 9,
        return_codes: vec![
            SubscribeReturnCode::Success(QoS::AtLeastOnce),
            SubscribeReturnCode::Failure,
        ],
    }));
    roundtrip(Packet::Unsubscribe(Unsubscribe {
        packet_id: 10,
        filters: vec![s("a/+"), s("b")],
    }));
    roundtrip(Packet::UnsubAck(10));
    roundtrip(Packet::PingReq);
    roundtrip(Packet::PingResp);
    roundtrip(Packet::Disconnect);
}

#[test]
fn remaining_length_boundaries() {
    for len in [0usize, 127, 128, 16_383, 16_384, 100_000] {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: s("t"),
            packet_id: None,
            payload: Bytes::from(vec![1u8; len]),
        });
        let mut buf = BytesMut::new();
        encode(&p, &mut buf).unwrap();
        assert_eq!(decode(&mut buf, MAX).unwrap().unwrap(), p);
    }
}

#[test]
fn decoding_is_zero_copy() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("t/x"),
        packet_id: None,
        payload: Bytes::from(vec![5u8; 1000]),
    });
    let mut buf = BytesMut::new();
    encode(&p, &mut buf).unwrap();
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Packet::Publish(got)) = decode(&mut buf, MAX).unwrap() else {
        panic!()
    };
    let at = got.payload.as_ptr() as usize;
    assert!(
        at >= start && at < end,
        "payload points into the receive buffer"
    );
}

#[test]
fn two_packets_in_one_buffer_decode_in_order() {
    let mut buf = BytesMut::new();
    encode(&Packet::PingReq, &mut buf).unwrap();
    encode(&Packet::PubAck(5), &mut buf).unwrap();
    assert_eq!(decode(&mut buf, MAX), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, MAX), Ok(Some(Packet::PubAck(5))));
    assert_eq!(decode(&mut buf, MAX), Ok(None));
}

#[test]
fn malformed_remaining_length_is_refused() {
    assert_eq!(
        decode_all(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]),
        Err(DecodeError::MalformedRemainingLength)
    );
    assert_eq!(
        decode_all(&[0x30, 0xFF, 0xFF, 0xFF, 0x80, 0x01]),
        Err(DecodeError::MalformedRemainingLength)
    );
    // Three continuation bytes so far: still incomplete, not an error.
    assert_eq!(decode_all(&[0x30, 0xFF, 0xFF, 0xFF]), Ok(None));
}

#[test]
fn oversized_packets_are_refused_from_the_header_alone() {
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]); // announces 1 MiB
    assert_eq!(
        decode(&mut buf, 1000),
        Err(DecodeError::PacketTooLarge {
            size: 4 + 1_048_576,
            max: 1000
        })
    );
}

#[test]
fn reserved_packet_types_are_refused() {
    assert_eq!(
        decode_all(&[0x00, 0x00]),
        Err(DecodeError::ReservedPacketType(0))
    );
    assert_eq!(
        decode_all(&[0xF0, 0x00]),
        Err(DecodeError::ReservedPacketType(15))
    );
}

#[test]
fn reserved_fixed_header_flags_are_refused() {
    assert_eq!(
        decode_all(&[0x60, 2, 0, 1]),
        Err(DecodeError::ReservedFlagsSet("PUBREL"))
    );
    assert_eq!(
        decode_all(&[0x80, 6, 0, 1, 0, 1, b'a', 0]),
        Err(DecodeError::ReservedFlagsSet("SUBSCRIBE"))
    );
    assert_eq!(
        decode_all(&[0xA0, 5, 0, 1, 0, 1, b'a']),
        Err(DecodeError::ReservedFlagsSet("UNSUBSCRIBE"))
    );
    assert_eq!(
        decode_all(&[0xC1, 0]),
        Err(DecodeError::ReservedFlagsSet("PINGREQ"))
    );
    assert_eq!(
        decode_all(&[0xE2, 0]),
        Err(DecodeError::ReservedFlagsSet("DISCONNECT"))
    );
    assert_eq!(
        decode_all(&[0x41, 2, 0, 1]),
        Err(DecodeError::ReservedFlagsSet("PUBACK"))
    );
}

#[test]
fn publish_rules() {
    // QoS 3.
    assert_eq!(
        decode_all(&[0x36, 5, 0, 1, b't', 0, 1]),
        Err(DecodeError::InvalidQoS)
    );
    // DUP on QoS 0.
    assert_eq!(
        decode_all(&[0x38, 3, 0, 1, b't']),
        Err(DecodeError::DupOnQoS0)
    );
    // Wildcards and empty topics.
    assert_eq!(
        decode_all(&[0x30, 3, 0, 1, b'#']),
        Err(DecodeError::InvalidTopicName)
    );
    assert_eq!(
        decode_all(&[0x30, 5, 0, 3, b'a', b'/', b'+']),
        Err(DecodeError::InvalidTopicName)
    );
    assert_eq!(
        decode_all(&[0x30, 2, 0, 0]),
        Err(DecodeError::InvalidTopicName)
    );
    // Packet id 0 on QoS 1.
    assert_eq!(
        decode_all(&[0x32, 5, 0, 1, b't', 0, 0]),
        Err(DecodeError::ZeroPacketId)
    );
    // Topic length beyond the packet.
    assert_eq!(
        decode_all(&[0x30, 3, 0, 9, b't']),
        Err(DecodeError::Truncated("PUBLISH"))
    );
    // QoS 1 without room for the packet id.
    assert_eq!(
        decode_all(&[0x32, 3, 0, 1, b't']),
        Err(DecodeError::Truncated("PUBLISH"))
    );
}

#[test]
fn strings_must_be_utf8_without_nul() {
    assert_eq!(
        decode_all(&[0x30, 4, 0, 2, 0xC3, 0x28]),
        Err(DecodeError::InvalidString(Utf8Error::InvalidUtf8))
    );
    assert_eq!(
        decode_all(&[0x30, 4, 0, 2, b'a', 0]),
        Err(DecodeError::InvalidString(Utf8Error::NullCharacter))
    );
    // A UTF-16 surrogate encoded in UTF-8 (U+D800) is not valid UTF-8 (MQTT-1.5.3-1).
    assert_eq!(
        decode_all(&[0x30, 5, 0, 3, 0xED, 0xA0, 0x80]),
        Err(DecodeError::InvalidString(Utf8Error::InvalidUtf8))
    );
}

fn connect_bytes(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&[0, 60]);
    body.extend_from_slice(rest);
    let mut v = vec![0x10, body.len() as u8];
    v.extend(body);
    v
}

#[test]
fn connect_rules() {
    let id = [0u8, 1, b'c'];
    assert!(matches!(
        decode_all(&connect_bytes(b"MQTT", 4, 2, &id)),
        Ok(Some(Packet::Connect(_)))
    ));
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 3, 2, &id)),
        Err(DecodeError::UnsupportedProtocolLevel(3))
    );
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 9, 2, &id)),
        Err(DecodeError::UnsupportedProtocolLevel(9))
    );
    assert_eq!(
        decode_all(&connect_bytes(b"HTTP", 4, 2, &id)),
        Err(DecodeError::InvalidProtocolName)
    );
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 3, &id)),
        Err(DecodeError::ReservedConnectFlag)
    );
    // Will QoS without Will flag; Will Retain without Will flag.
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x0A, &id)),
        Err(DecodeError::WillFlagsWithoutWill)
    );
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x22, &id)),
        Err(DecodeError::WillFlagsWithoutWill)
    );
    // Will QoS 3.
    let will = [0u8, 1, b'c', 0, 1, b'w', 0, 0];
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x1E, &will)),
        Err(DecodeError::InvalidQoS)
    );
    // Will topic with a wildcard.
    let will = [0u8, 1, b'c', 0, 1, b'#', 0, 0];
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x06, &will)),
        Err(DecodeError::InvalidTopicName)
    );
    // Password without user name.
    let pw = [0u8, 1, b'c', 0, 1, b'p'];
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x42, &pw)),
        Err(DecodeError::PasswordWithoutUsername)
    );
    // User name flag but no user name.
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 0x82, &id)),
        Err(DecodeError::Truncated("CONNECT"))
    );
    // Trailing bytes after the payload.
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 4, 2, &[0, 1, b'c', 9])),
        Err(DecodeError::TrailingBytes("CONNECT"))
    );
    // Fixed-header flags on CONNECT.
    let mut bad = connect_bytes(b"MQTT", 4, 2, &id);
    bad[0] = 0x11;
    assert_eq!(
        decode_all(&bad),
        Err(DecodeError::ReservedFlagsSet("CONNECT"))
    );
}

#[test]
fn subscribe_rules() {
    assert_eq!(
        decode_all(&[0x82, 2, 0, 1]),
        Err(DecodeError::NoTopicFilters("SUBSCRIBE"))
    );
    assert_eq!(
        decode_all(&[0x82, 6, 0, 1, 0, 1, b'a', 3]),
        Err(DecodeError::InvalidQoS)
    );
    assert_eq!(
        decode_all(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04]),
        Err(DecodeError::ReservedSubscriptionBits)
    );
    assert_eq!(
        decode_all(&[0x82, 5, 0, 1, 0, 1, b'a']),
        Err(DecodeError::Truncated("SUBSCRIBE"))
    );
    assert_eq!(
        decode_all(&[0x82, 6, 0, 0, 0, 1, b'a', 0]),
        Err(DecodeError::ZeroPacketId)
    );
    assert_eq!(
        decode_all(&[0xA2, 2, 0, 1]),
        Err(DecodeError::NoTopicFilters("UNSUBSCRIBE"))
    );
    // An invalid filter is not a decode error: the broker answers 0x80 for it.
    assert!(matches!(
        decode_all(&[0x82, 8, 0, 1, 0, 3, b'a', b'#', b'b', 0]),
        Ok(Some(Packet::Subscribe(_)))
    ));
}

#[test]
fn fixed_size_packets_reject_wrong_lengths() {
    assert_eq!(
        decode_all(&[0x40, 3, 0, 1, 0]),
        Err(DecodeError::TrailingBytes("PUBACK"))
    );
    assert_eq!(
        decode_all(&[0x40, 1, 0]),
        Err(DecodeError::Truncated("PUBACK"))
    );
    assert_eq!(
        decode_all(&[0xC0, 1, 0]),
        Err(DecodeError::TrailingBytes("PINGREQ"))
    );
    assert_eq!(
        decode_all(&[0xE0, 1, 0]),
        Err(DecodeError::TrailingBytes("DISCONNECT"))
    );
    assert_eq!(decode_all(&[0x40, 2, 0, 0]), Err(DecodeError::ZeroPacketId));
}

proptest! {
    /// Arbitrary bytes never panic the decoder, and what it accepts re-encodes to a packet
    /// that decodes to the same value.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(p)) = decode(&mut buf, 4096) {
            let mut out = BytesMut::new();
            if encode(&p, &mut out).is_ok() {
                prop_assert_eq!(decode(&mut out, 1 << 20).unwrap().unwrap(), p);
            }
        }
    }

    /// Valid PUBLISH packets survive a round trip whatever their topic and payload.
    #[test]
    fn publish_round_trips(topic in "[a-z/]{1,40}", payload in proptest::collection::vec(any::<u8>(), 0..2000), qos in 0u8..3, retain: bool) {
        let qos = QoS::from_u8(qos).unwrap();
        let p = Packet::Publish(Publish {
            dup: false, qos, retain, topic: s(&topic),
            packet_id: (qos != QoS::AtMostOnce).then_some(7), payload: Bytes::from(payload),
        });
        let mut buf = BytesMut::new();
        encode(&p, &mut buf).unwrap();
        prop_assert_eq!(decode(&mut buf, MAX).unwrap().unwrap(), p);
    }
}
