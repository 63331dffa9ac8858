//! Codec tests: round trips for every packet type, and every malformed case the decoder must
//! refuse, each named by the rule it breaks.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use stratus_mqtt::*;

const MAX: usize = 1024 * 1024;

fn s(v: &str) -> MqttStr {
    MqttStr::try_from(v).unwrap()
}

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Decodes `bytes` as MQTT 3.1.1.
fn decode_all(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    decode_v(bytes, V3)
}

/// An MQTT 3.1.1 UNSUBACK (no reason codes on the wire).
fn unsuback(packet_id: u16) -> UnsubAck {
    UnsubAck {
        packet_id,
        reason_codes: vec![],
        properties: UnsubAckProperties::default(),
    }
}

fn decode_v(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    decode(&mut buf, MAX, version)
}

fn encode_v(p: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, version, &mut buf).unwrap();
    buf.to_vec()
}

/// Round trip as MQTT 3.1.1.
fn roundtrip(p: Packet) {
    roundtrip_v(p, V3);
}

/// Encodes `p` for `version`, decodes it back to the same value, and checks that every strict
/// prefix of the encoding is incomplete (never an error) and consumes nothing. Returns the wire.
fn roundtrip_v(p: Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(&p, version, &mut buf).unwrap();
    let wire = buf.clone();
    let got = decode(&mut buf, MAX, version).unwrap().unwrap();
    assert_eq!(got, p, "wire {:02x?}", &wire[..]);
    assert!(buf.is_empty());
    // Every strict prefix is incomplete, never an error.
    for cut in 0..wire.len() {
        let mut partial = BytesMut::from(&wire[..cut]);
        assert_eq!(decode(&mut partial, MAX, version), Ok(None), "prefix {cut}");
        assert_eq!(partial.len(), cut, "nothing consumed");
    }
    wire.to_vec()
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
        properties: ConnectProperties::default(),
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
            properties: WillProperties::default(),
        }),
        username: Some(s("user")),
        password: Some(Bytes::from_static(&[0, 1, 255])),
        properties: ConnectProperties::default(),
    }));
    roundtrip(Packet::ConnAck(ConnAck::new(
        true,
        ConnectReturnCode::Accepted.into(),
    )));
    roundtrip(Packet::ConnAck(ConnAck::new(
        false,
        ConnectReturnCode::NotAuthorized.into(),
    )));
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        roundtrip(Packet::Publish(Publish {
            dup: qos != QoS::AtMostOnce,
            qos,
            retain: true,
            topic: s("a/b/c"),
            packet_id: (qos != QoS::AtMostOnce).then_some(42),
            payload: Bytes::from(vec![7u8; 300]),
            properties: PublishProperties::default(),
        }));
    }
    roundtrip(Packet::PubAck(PubAck::new(1)));
    roundtrip(Packet::PubRec(PubAck::new(2)));
    roundtrip(Packet::PubRel(PubAck::new(3)));
    roundtrip(Packet::PubComp(PubAck::new(65535)));
    roundtrip(Packet::Subscribe(Subscribe {
        packet_id: 9,
        filters: vec![
            (s("a/+"), QoS::AtLeastOnce.into()),
            (s("#"), QoS::ExactlyOnce.into()),
        ],
        properties: SubscribeProperties::default(),
    }));
    roundtrip(Packet::SubAck(SubAck {
        packet_id: 9,
        reason_codes: vec![
            ReasonCode::granted(QoS::AtLeastOnce),
            ReasonCode::UnspecifiedError,
        ],
        properties: SubAckProperties::default(),
    }));
    roundtrip(Packet::Unsubscribe(Unsubscribe {
        packet_id: 10,
        filters: vec![s("a/+"), s("b")],
        properties: UnsubscribeProperties::default(),
    }));
    roundtrip(Packet::UnsubAck(unsuback(10)));
    roundtrip(Packet::PingReq);
    roundtrip(Packet::PingResp);
    roundtrip(Packet::Disconnect(Disconnect::default()));
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
            properties: PublishProperties::default(),
        });
        let mut buf = BytesMut::new();
        encode(&p, V3, &mut buf).unwrap();
        assert_eq!(decode(&mut buf, MAX, V3).unwrap().unwrap(), p);
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
        properties: PublishProperties::default(),
    });
    let mut buf = BytesMut::new();
    encode(&p, V3, &mut buf).unwrap();
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Packet::Publish(got)) = decode(&mut buf, MAX, V3).unwrap() else {
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
    encode(&Packet::PingReq, V3, &mut buf).unwrap();
    encode(&Packet::PubAck(PubAck::new(5)), V3, &mut buf).unwrap();
    assert_eq!(decode(&mut buf, MAX, V3), Ok(Some(Packet::PingReq)));
    assert_eq!(
        decode(&mut buf, MAX, V3),
        Ok(Some(Packet::PubAck(PubAck::new(5))))
    );
    assert_eq!(decode(&mut buf, MAX, V3), Ok(None));
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
        decode(&mut buf, 1000, V3),
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
    /// Arbitrary bytes never panic the decoder of any version, and what it accepts re-encodes
    /// to a packet that decodes to the same value.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for version in [ProtocolVersion::V31, V3, V5] {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(p)) = decode(&mut buf, 4096, version) {
                let mut out = BytesMut::new();
                // A CONNECT is re-encoded for its own version, other packets for this one.
                let again = match &p { Packet::Connect(c) => c.protocol, _ => version };
                if encode(&p, version, &mut out).is_ok() {
                    prop_assert_eq!(decode(&mut out, 1 << 20, again).unwrap().unwrap(), p);
                }
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
            properties: PublishProperties::default(),
        });
        let mut buf = BytesMut::new();
        encode(&p, V3, &mut buf).unwrap();
        prop_assert_eq!(decode(&mut buf, MAX, V3).unwrap().unwrap(), p);
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT 5.0

fn b(v: &'static [u8]) -> Bytes {
    Bytes::from_static(v)
}

fn nz16(v: u16) -> std::num::NonZeroU16 {
    std::num::NonZeroU16::new(v).unwrap()
}

fn nz32(v: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(v).unwrap()
}

fn users() -> Vec<(MqttStr, MqttStr)> {
    // Same name twice, in a deliberate order that must survive.
    vec![(s("k"), s("2")), (s("a"), s("1")), (s("k"), s("1"))]
}

fn full_publish_properties() -> PublishProperties {
    PublishProperties {
        payload_format: Some(PayloadFormat::Utf8),
        message_expiry_interval: Some(3600),
        topic_alias: Some(nz16(7)),
        response_topic: Some(s("reply/here")),
        correlation_data: Some(b(&[1, 2, 3, 0])),
        user_properties: users(),
        subscription_identifiers: vec![nz32(1), nz32(268_435_455), nz32(1)],
        content_type: Some(s("application/json")),
    }
}

fn ack_properties() -> PubAckProperties {
    PubAckProperties {
        reason_string: Some(s("because")),
        user_properties: users(),
    }
}

#[test]
fn v5_every_packet_type_round_trips_with_every_property() {
    roundtrip_v(
        Packet::Connect(Connect {
            protocol: V5,
            clean_session: false,
            keep_alive: 30,
            client_id: s("dev-1"),
            will: Some(LastWill {
                topic: s("status/dev-1"),
                payload: b(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties {
                    will_delay_interval: Some(10),
                    payload_format: Some(PayloadFormat::Unspecified),
                    message_expiry_interval: Some(60),
                    content_type: Some(s("text/plain")),
                    response_topic: Some(s("r/t")),
                    correlation_data: Some(b(b"corr")),
                    user_properties: users(),
                },
            }),
            username: Some(s("dev-1")),
            password: Some(b(b"secret")),
            properties: ConnectProperties {
                session_expiry_interval: Some(u32::MAX),
                receive_maximum: Some(nz16(20)),
                maximum_packet_size: Some(nz32(65_536)),
                topic_alias_maximum: Some(10),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(b(b"client-first")),
                user_properties: users(),
            },
        }),
        V5,
    );
    // A password without a user name is valid in MQTT 5.0.
    roundtrip_v(
        Packet::Connect(Connect {
            protocol: V5,
            password: Some(b(b"token")),
            ..connect()
        }),
        V5,
    );
    roundtrip_v(
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason: ReasonCode::Success,
            properties: ConnAckProperties {
                session_expiry_interval: Some(120),
                receive_maximum: Some(nz16(100)),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(false),
                maximum_packet_size: Some(nz32(1 << 20)),
                assigned_client_identifier: Some(s("stratus-1234")),
                topic_alias_maximum: Some(16),
                reason_string: Some(s("welcome")),
                user_properties: users(),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(false),
                shared_subscription_available: Some(false),
                server_keep_alive: Some(45),
                response_information: Some(s("resp/")),
                server_reference: Some(s("other.example:1883")),
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(b(b"server-final")),
            },
        }),
        V5,
    );
    roundtrip_v(Packet::ConnAck(ConnAck::new(false, ReasonCode::Banned)), V5);
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        roundtrip_v(
            Packet::Publish(Publish {
                dup: qos != QoS::AtMostOnce,
                qos,
                retain: true,
                topic: s("a/b/c"),
                packet_id: (qos != QoS::AtMostOnce).then_some(42),
                payload: Bytes::from(vec![7u8; 300]),
                properties: full_publish_properties(),
            }),
            V5,
        );
    }
    for (make, reason) in [
        (
            Packet::PubAck as fn(PubAck) -> Packet,
            ReasonCode::NoMatchingSubscribers,
        ),
        (Packet::PubRec, ReasonCode::QuotaExceeded),
        (Packet::PubRel, ReasonCode::PacketIdentifierNotFound),
        (Packet::PubComp, ReasonCode::PacketIdentifierNotFound),
    ] {
        roundtrip_v(
            make(PubAck {
                packet_id: 77,
                reason,
                properties: ack_properties(),
            }),
            V5,
        );
        // Success with properties keeps the reason byte and the properties.
        roundtrip_v(
            make(PubAck {
                packet_id: 78,
                reason: ReasonCode::Success,
                properties: ack_properties(),
            }),
            V5,
        );
    }
    roundtrip_v(
        Packet::Subscribe(Subscribe {
            packet_id: 9,
            filters: vec![
                (s("a/+"), QoS::AtLeastOnce.into()),
                (
                    s("b/#"),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                ),
                (
                    s("c"),
                    SubscriptionOptions {
                        qos: QoS::AtMostOnce,
                        no_local: false,
                        retain_as_published: true,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                ),
            ],
            properties: SubscribeProperties {
                subscription_identifier: Some(nz32(268_435_455)),
                user_properties: users(),
            },
        }),
        V5,
    );
    roundtrip_v(
        Packet::SubAck(SubAck {
            packet_id: 9,
            reason_codes: vec![
                ReasonCode::GRANTED_QOS_0,
                ReasonCode::GrantedQoS1,
                ReasonCode::GrantedQoS2,
                ReasonCode::NotAuthorized,
                ReasonCode::TopicFilterInvalid,
                ReasonCode::SharedSubscriptionsNotSupported,
                ReasonCode::WildcardSubscriptionsNotSupported,
            ],
            properties: SubAckProperties {
                reason_string: Some(s("partly")),
                user_properties: users(),
            },
        }),
        V5,
    );
    roundtrip_v(
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            filters: vec![s("a/+"), s("b")],
            properties: UnsubscribeProperties {
                user_properties: users(),
            },
        }),
        V5,
    );
    roundtrip_v(
        Packet::UnsubAck(UnsubAck {
            packet_id: 10,
            reason_codes: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
            properties: UnsubAckProperties {
                reason_string: Some(s("one was not there")),
                user_properties: users(),
            },
        }),
        V5,
    );
    roundtrip_v(Packet::PingReq, V5);
    roundtrip_v(Packet::PingResp, V5);
    roundtrip_v(
        Packet::Disconnect(Disconnect {
            reason: ReasonCode::ServerMoved,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some(s("moved")),
                user_properties: users(),
                server_reference: Some(s("new.example")),
            },
        }),
        V5,
    );
    roundtrip_v(
        Packet::Auth(Auth {
            reason: ReasonCode::ContinueAuthentication,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM-SHA-1")),
                authentication_data: Some(b(b"challenge")),
                reason_string: Some(s("step 2")),
                user_properties: users(),
            },
        }),
        V5,
    );
    roundtrip_v(
        Packet::Auth(Auth {
            reason: ReasonCode::ReAuthenticate,
            properties: AuthProperties::default(),
        }),
        V5,
    );
}

#[test]
fn v5_acks_use_and_accept_the_short_forms() {
    // Success without properties: Remaining Length 2, exactly the 3.1.1 bytes.
    for (make, first) in [
        (Packet::PubAck as fn(PubAck) -> Packet, 0x40u8),
        (Packet::PubRec, 0x50),
        (Packet::PubRel, 0x62),
        (Packet::PubComp, 0x70),
    ] {
        let p = make(PubAck::new(0x0102));
        assert_eq!(roundtrip_v(p.clone(), V5), [first, 2, 1, 2]);
        // The long forms of the same packet decode to the same value.
        assert_eq!(decode_v(&[first, 3, 1, 2, 0], V5), Ok(Some(p.clone())));
        assert_eq!(decode_v(&[first, 4, 1, 2, 0, 0], V5), Ok(Some(p)));
    }
    // A reason without properties: Remaining Length 3, no property length.
    let p = Packet::PubAck(PubAck {
        packet_id: 5,
        reason: ReasonCode::NoMatchingSubscribers,
        properties: PubAckProperties::default(),
    });
    assert_eq!(roundtrip_v(p.clone(), V5), [0x40, 3, 0, 5, 0x10]);
    assert_eq!(decode_v(&[0x40, 4, 0, 5, 0x10, 0], V5), Ok(Some(p)));
    // Bytes after the properties are refused.
    assert_eq!(
        decode_v(&[0x40, 5, 0, 5, 0x10, 0, 9], V5),
        Err(DecodeError::TrailingBytes("PUBACK"))
    );
}

#[test]
fn v5_disconnect_and_auth_short_forms() {
    let normal = Packet::Disconnect(Disconnect::default());
    assert_eq!(roundtrip_v(normal.clone(), V5), [0xE0, 0]);
    assert_eq!(decode_v(&[0xE0, 1, 0], V5), Ok(Some(normal.clone())));
    assert_eq!(decode_v(&[0xE0, 2, 0, 0], V5), Ok(Some(normal)));
    let with_will = Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage));
    assert_eq!(roundtrip_v(with_will.clone(), V5), [0xE0, 1, 0x04]);
    assert_eq!(decode_v(&[0xE0, 2, 0x04, 0], V5), Ok(Some(with_will)));

    let success = Packet::Auth(Auth::default());
    assert_eq!(roundtrip_v(success.clone(), V5), [0xF0, 0]);
    assert_eq!(decode_v(&[0xF0, 2, 0, 0], V5), Ok(Some(success)));
    let cont = Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: AuthProperties::default(),
    });
    assert_eq!(roundtrip_v(cont, V5), [0xF0, 2, 0x18, 0]);
    // AUTH has no form with a reason code alone.
    assert_eq!(
        decode_v(&[0xF0, 1, 0x18], V5),
        Err(DecodeError::Truncated("AUTH"))
    );
    assert_eq!(
        decode_v(&[0xF1, 0], V5),
        Err(DecodeError::ReservedFlagsSet("AUTH"))
    );
}

/// A v5 PUBLISH, QoS 0, topic `t`, payload `x`, with `props` as its property bytes.
fn publish_v5(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 1, b't', props.len() as u8];
    body.extend_from_slice(props);
    body.push(b'x');
    let mut v = vec![0x30, body.len() as u8];
    v.extend(body);
    v
}

/// A v5 CONNECT, client id `c`, with `props` as its property bytes.
fn connect_v5(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, props.len() as u8];
    body.extend_from_slice(props);
    body.extend_from_slice(&[0, 1, b'c']);
    let mut v = vec![0x10, body.len() as u8];
    v.extend(body);
    v
}

/// A v5 CONNACK (accepted) with `props` as its property bytes.
fn connack_v5(props: &[u8]) -> Vec<u8> {
    let mut v = vec![0x20, 3 + props.len() as u8, 0, 0, props.len() as u8];
    v.extend_from_slice(props);
    v
}

/// A v5 SUBSCRIBE of filter `a` with options byte `opts` and `props` as its property bytes.
fn subscribe_v5(props: &[u8], opts: u8) -> Vec<u8> {
    let mut body = vec![0, 1, props.len() as u8];
    body.extend_from_slice(props);
    body.extend_from_slice(&[0, 1, b'a', opts]);
    let mut v = vec![0x82, body.len() as u8];
    v.extend(body);
    v
}

fn out_of_range(packet: &'static str, property: PropertyId, value: u32) -> DecodeError {
    DecodeError::PropertyOutOfRange {
        packet,
        property,
        value,
    }
}

#[test]
fn v5_property_rules() {
    use PropertyId as P;
    // The builders produce valid packets.
    assert!(matches!(
        decode_v(&publish_v5(&[]), V5),
        Ok(Some(Packet::Publish(_)))
    ));
    assert!(matches!(
        decode_v(&connect_v5(&[]), V5),
        Ok(Some(Packet::Connect(_)))
    ));
    assert!(matches!(
        decode_v(&connack_v5(&[]), V5),
        Ok(Some(Packet::ConnAck(_)))
    ));
    assert!(matches!(
        decode_v(&subscribe_v5(&[], 0), V5),
        Ok(Some(Packet::Subscribe(_)))
    ));

    // Unknown identifier.
    assert_eq!(
        decode_v(&publish_v5(&[0x05, 0]), V5),
        Err(DecodeError::UnknownProperty {
            packet: "PUBLISH",
            id: 5
        })
    );
    // An identifier that needs two bytes is a Variable Byte Integer, and unknown.
    assert_eq!(
        decode_v(&publish_v5(&[0x81, 0x01]), V5),
        Err(DecodeError::UnknownProperty {
            packet: "PUBLISH",
            id: 0x81
        })
    );
    // Not allowed on this packet.
    assert_eq!(
        decode_v(&publish_v5(&[0x11, 0, 0, 0, 1]), V5),
        Err(DecodeError::PropertyNotAllowed {
            packet: "PUBLISH",
            property: P::SessionExpiryInterval
        })
    );
    assert_eq!(
        decode_v(&connect_v5(&[0x23, 0, 1]), V5),
        Err(DecodeError::PropertyNotAllowed {
            packet: "CONNECT",
            property: P::TopicAlias
        })
    );
    // Given twice.
    assert_eq!(
        decode_v(&publish_v5(&[0x03, 0, 1, b'a', 0x03, 0, 1, b'b']), V5),
        Err(DecodeError::DuplicateProperty {
            packet: "PUBLISH",
            property: P::ContentType
        })
    );
    assert_eq!(
        decode_v(&subscribe_v5(&[0x0B, 1, 0x0B, 2], 0), V5),
        Err(DecodeError::DuplicateProperty {
            packet: "SUBSCRIBE",
            property: P::SubscriptionIdentifier
        })
    );
    // User Property, and Subscription Identifier in PUBLISH, may repeat.
    let Ok(Some(Packet::Publish(p))) = decode_v(
        &publish_v5(&[
            0x0B, 1, 0x0B, 2, 0x26, 0, 1, b'k', 0, 0, 0x26, 0, 1, b'k', 0, 0,
        ]),
        V5,
    ) else {
        panic!("repeatable properties refused")
    };
    assert_eq!(
        p.properties.subscription_identifiers,
        vec![nz32(1), nz32(2)]
    );
    assert_eq!(p.properties.user_properties.len(), 2);
    // Malformed Variable Byte Integers: property length, Subscription Identifier.
    assert_eq!(
        decode_v(&[0x30, 8, 0, 1, b't', 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V5),
        Err(DecodeError::MalformedVariableByteInteger("PUBLISH"))
    );
    assert_eq!(
        decode_v(&publish_v5(&[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01]), V5),
        Err(DecodeError::MalformedVariableByteInteger("PUBLISH"))
    );
    // Values out of range.
    assert_eq!(
        decode_v(&connect_v5(&[0x21, 0, 0]), V5),
        Err(out_of_range("CONNECT", P::ReceiveMaximum, 0))
    );
    assert_eq!(
        decode_v(&connect_v5(&[0x27, 0, 0, 0, 0]), V5),
        Err(out_of_range("CONNECT", P::MaximumPacketSize, 0))
    );
    assert_eq!(
        decode_v(&publish_v5(&[0x23, 0, 0]), V5),
        Err(out_of_range("PUBLISH", P::TopicAlias, 0))
    );
    assert_eq!(
        decode_v(&publish_v5(&[0x01, 2]), V5),
        Err(out_of_range("PUBLISH", P::PayloadFormatIndicator, 2))
    );
    assert_eq!(
        decode_v(&connect_v5(&[0x17, 2]), V5),
        Err(out_of_range("CONNECT", P::RequestProblemInformation, 2))
    );
    assert_eq!(
        decode_v(&connect_v5(&[0x19, 2]), V5),
        Err(out_of_range("CONNECT", P::RequestResponseInformation, 2))
    );
    assert_eq!(
        decode_v(&connack_v5(&[0x24, 2]), V5),
        Err(out_of_range("CONNACK", P::MaximumQoS, 2))
    );
    assert_eq!(
        decode_v(&connack_v5(&[0x27, 0, 0, 0, 0]), V5),
        Err(out_of_range("CONNACK", P::MaximumPacketSize, 0))
    );
    assert_eq!(
        decode_v(&connack_v5(&[0x21, 0, 0]), V5),
        Err(out_of_range("CONNACK", P::ReceiveMaximum, 0))
    );
    for id in [
        P::RetainAvailable,
        P::WildcardSubscriptionAvailable,
        P::SubscriptionIdentifierAvailable,
        P::SharedSubscriptionAvailable,
    ] {
        assert_eq!(
            decode_v(&connack_v5(&[id as u8, 2]), V5),
            Err(out_of_range("CONNACK", id, 2))
        );
    }
    assert_eq!(
        decode_v(&subscribe_v5(&[0x0B, 0], 0), V5),
        Err(out_of_range("SUBSCRIBE", P::SubscriptionIdentifier, 0))
    );
    assert_eq!(
        decode_v(&publish_v5(&[0x0B, 0]), V5),
        Err(out_of_range("PUBLISH", P::SubscriptionIdentifier, 0))
    );
    // Property length beyond the packet.
    assert_eq!(
        decode_v(&[0x30, 5, 0, 1, b't', 9, 0x01], V5),
        Err(DecodeError::PropertiesExceedPacket("PUBLISH"))
    );
    // A value beyond the property length (here: the payload follows it).
    assert_eq!(
        decode_v(&[0x30, 8, 0, 1, b't', 2, 0x02, 0, 0, 0], V5),
        Err(DecodeError::PropertyTruncated {
            packet: "PUBLISH",
            property: P::MessageExpiryInterval
        })
    );
    // Strings in properties are MQTT UTF-8 strings (§1.5.4, §1.5.7).
    assert_eq!(
        decode_v(&publish_v5(&[0x26, 0, 1, b'k', 0, 1, 0]), V5),
        Err(DecodeError::InvalidString(Utf8Error::NullCharacter))
    );
    assert_eq!(
        decode_v(&publish_v5(&[0x03, 0, 1, 0xFF]), V5),
        Err(DecodeError::InvalidString(Utf8Error::InvalidUtf8))
    );
    // A Response Topic is a topic name: no wildcards (MQTT-3.3.2-14).
    assert_eq!(
        decode_v(&publish_v5(&[0x08, 0, 3, b'a', b'/', b'#']), V5),
        Err(DecodeError::InvalidResponseTopic)
    );
    // Authentication Data needs an Authentication Method (§3.1.2.11.10).
    assert_eq!(
        decode_v(&connect_v5(&[0x16, 0, 1, 9]), V5),
        Err(DecodeError::AuthenticationDataWithoutMethod)
    );
    // Will Properties have their own set. After the client id: will properties, will topic
    // `w`, empty will payload; connect flags Clean Start + Will.
    let mut good = connect_v5(&[]);
    good[9] = 0x06;
    good.extend_from_slice(&[5, 0x18, 0, 0, 0, 9, 0, 1, b'w', 0, 0]);
    good[1] = (good.len() - 2) as u8;
    let Ok(Some(Packet::Connect(c))) = decode_v(&good, V5) else {
        panic!("valid will refused")
    };
    assert_eq!(c.will.unwrap().properties.will_delay_interval, Some(9));
    let mut bad = connect_v5(&[]);
    bad[9] = 0x06;
    bad.extend_from_slice(&[3, 0x21, 0, 5, 0, 1, b'w', 0, 0]);
    bad[1] = (bad.len() - 2) as u8;
    assert_eq!(
        decode_v(&bad, V5),
        Err(DecodeError::PropertyNotAllowed {
            packet: "CONNECT Will Properties",
            property: P::ReceiveMaximum
        })
    );
}

#[test]
fn v5_reason_codes_must_fit_the_packet() {
    let invalid = |packet, code| Err(DecodeError::InvalidReasonCode { packet, code });
    // Undefined.
    assert_eq!(
        decode_v(&[0x40, 3, 0, 1, 0x03], V5),
        invalid("PUBACK", 0x03)
    );
    // Defined, but not for this packet.
    assert_eq!(
        decode_v(&[0x40, 3, 0, 1, 0x01], V5),
        invalid("PUBACK", 0x01)
    );
    assert_eq!(
        decode_v(&[0x62, 3, 0, 1, 0x10], V5),
        invalid("PUBREL", 0x10)
    );
    assert_eq!(decode_v(&[0xE0, 1, 0x11], V5), invalid("DISCONNECT", 0x11));
    assert_eq!(decode_v(&[0xF0, 2, 0x80, 0], V5), invalid("AUTH", 0x80));
    assert_eq!(
        decode_v(&[0x20, 3, 0, 0x8B, 0], V5),
        invalid("CONNACK", 0x8B)
    );
    assert_eq!(
        decode_v(&[0x90, 4, 0, 1, 0, 0x11], V5),
        invalid("SUBACK", 0x11)
    );
    assert_eq!(
        decode_v(&[0xB0, 4, 0, 1, 0, 0x02], V5),
        invalid("UNSUBACK", 0x02)
    );
    // Reserved CONNACK flags stay malformed.
    assert_eq!(
        decode_v(&[0x20, 3, 2, 0, 0], V5),
        Err(DecodeError::MalformedConnAck)
    );
    // Encoding refuses the same.
    let mut out = BytesMut::new();
    assert_eq!(
        encode(
            &Packet::PubAck(PubAck {
                packet_id: 1,
                reason: ReasonCode::GrantedQoS1,
                properties: PubAckProperties::default()
            }),
            V5,
            &mut out
        ),
        Err(EncodeError::InvalidReasonCode {
            packet: "PUBACK",
            code: ReasonCode::GrantedQoS1
        })
    );
    assert_eq!(
        encode(
            &Packet::SubAck(SubAck {
                packet_id: 1,
                reason_codes: vec![ReasonCode::NoSubscriptionExisted],
                properties: SubAckProperties::default()
            }),
            V3,
            &mut out
        ),
        Err(EncodeError::InvalidReasonCode {
            packet: "SUBACK",
            code: ReasonCode::NoSubscriptionExisted
        })
    );
    assert!(out.is_empty(), "nothing written on error");
}

#[test]
fn v5_subscription_options_rules() {
    // Reserved bits 6 and 7.
    assert_eq!(
        decode_v(&subscribe_v5(&[], 0x40), V5),
        Err(DecodeError::ReservedSubscriptionBits)
    );
    assert_eq!(
        decode_v(&subscribe_v5(&[], 0x80), V5),
        Err(DecodeError::ReservedSubscriptionBits)
    );
    // Retain Handling 3.
    assert_eq!(
        decode_v(&subscribe_v5(&[], 0x30), V5),
        Err(DecodeError::InvalidRetainHandling)
    );
    // QoS 3.
    assert_eq!(
        decode_v(&subscribe_v5(&[], 0x03), V5),
        Err(DecodeError::InvalidQoS)
    );
    // Every option set.
    let Ok(Some(Packet::Subscribe(sub))) = decode_v(&subscribe_v5(&[], 0x2E), V5) else {
        panic!()
    };
    assert_eq!(
        sub.filters[0].1,
        SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::DoNotSend,
        }
    );
    // No filters after the properties.
    assert_eq!(
        decode_v(&[0x82, 3, 0, 1, 0], V5),
        Err(DecodeError::NoTopicFilters("SUBSCRIBE"))
    );
    assert_eq!(
        decode_v(&[0xA2, 3, 0, 1, 0], V5),
        Err(DecodeError::NoTopicFilters("UNSUBSCRIBE"))
    );
}

#[test]
fn v5_publish_topic_alias_and_empty_topic() {
    // An empty topic name with a Topic Alias is valid (the state machine resolves it).
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: s(""),
        packet_id: Some(3),
        payload: b(b"x"),
        properties: PublishProperties {
            topic_alias: Some(nz16(1)),
            ..PublishProperties::default()
        },
    });
    roundtrip_v(p, V5);
    // Without one it is not.
    assert_eq!(
        decode_v(&[0x30, 4, 0, 0, 0, b'x'], V5),
        Err(DecodeError::EmptyTopicWithoutAlias)
    );
    // Wildcards stay invalid in MQTT 5.0.
    assert_eq!(
        decode_v(&[0x30, 5, 0, 1, b'#', 0, b'x'], V5),
        Err(DecodeError::InvalidTopicName)
    );
}

#[test]
fn v5_connect_reads_its_own_level() {
    let c = Connect {
        protocol: V5,
        properties: ConnectProperties {
            session_expiry_interval: Some(60),
            ..ConnectProperties::default()
        },
        ..connect()
    };
    // Whatever version the connection is in: a CONNECT states its own.
    let wire = encode_v(&Packet::Connect(c.clone()), V3);
    assert_eq!(wire[8], 5, "protocol level");
    for version in [ProtocolVersion::V31, V3, V5] {
        assert_eq!(
            decode_v(&wire, version),
            Ok(Some(Packet::Connect(c.clone())))
        );
    }
    assert_eq!(ProtocolVersion::V5.name_and_level(), ("MQTT", 5));
    assert_eq!(
        decode_all(&connect_bytes(b"MQTT", 6, 2, &[0, 1, b'c'])),
        Err(DecodeError::UnsupportedProtocolLevel(6))
    );
    assert_eq!(
        decode_all(&connect_bytes(b"MQIsdp", 5, 2, &[0, 1, b'c'])),
        Err(DecodeError::UnsupportedProtocolLevel(5))
    );
}

#[test]
fn v3_and_v5_differ_where_the_specifications_do() {
    let props = Packet::PubAck(PubAck {
        packet_id: 7,
        reason: ReasonCode::NotAuthorized,
        properties: ack_properties(),
    });
    // No reason code and no property bytes in a 3.1.1 PUBACK, whatever the value holds.
    assert_eq!(encode_v(&props, V3), [0x40, 2, 0, 7]);
    // 2 id + 1 reason + 1 property length + 10 Reason String + 3 × 7 User Property.
    assert_eq!(encode_v(&props, V5)[..6], [0x40, 35, 0, 7, 0x87, 31]);
    // ... and a 3.1.1 decoder refuses them.
    assert_eq!(
        decode_v(&[0x40, 3, 0, 7, 0x87], V3),
        Err(DecodeError::TrailingBytes("PUBACK"))
    );
    assert_eq!(
        decode_v(&[0xE0, 1, 0x04], V3),
        Err(DecodeError::TrailingBytes("DISCONNECT"))
    );
    assert_eq!(
        decode_v(&[0xB0, 3, 0, 1, 0], V3),
        Err(DecodeError::TrailingBytes("UNSUBACK"))
    );
    // Packet type 15 is reserved before 5.0 and AUTH in 5.0.
    assert_eq!(
        decode_v(&[0xF0, 0], V3),
        Err(DecodeError::ReservedPacketType(15))
    );
    assert_eq!(
        decode_v(&[0xF0, 0], ProtocolVersion::V31),
        Err(DecodeError::ReservedPacketType(15))
    );
    assert_eq!(
        decode_v(&[0xF0, 0], V5),
        Ok(Some(Packet::Auth(Auth::default())))
    );
    assert_eq!(
        decode_v(&[0x00, 0], V5),
        Err(DecodeError::ReservedPacketType(0))
    );
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&Packet::Auth(Auth::default()), V3, &mut out),
        Err(EncodeError::UnsupportedInVersion("AUTH"))
    );
    // A PUBLISH carries a property length only in 5.0.
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("t"),
        packet_id: None,
        payload: b(b"x"),
        properties: PublishProperties::default(),
    });
    assert_eq!(encode_v(&publish, V3), [0x30, 4, 0, 1, b't', b'x']);
    assert_eq!(encode_v(&publish, V5), [0x30, 5, 0, 1, b't', 0, b'x']);
    // Properties are dropped for 3.1.1.
    let Packet::Publish(mut with_props) = publish.clone() else {
        unreachable!()
    };
    with_props.properties = full_publish_properties();
    assert_eq!(
        encode_v(&Packet::Publish(with_props), V3),
        [0x30, 4, 0, 1, b't', b'x']
    );
    // SUBACK refusals become 0x80 for 3.1.1; 0x80 decodes to Unspecified error.
    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized],
        properties: SubAckProperties::default(),
    });
    assert_eq!(encode_v(&suback, V3), [0x90, 4, 0, 1, 1, 0x80]);
    assert_eq!(encode_v(&suback, V5), [0x90, 5, 0, 1, 0, 1, 0x87]);
    // UNSUBACK reason codes exist in 5.0 only.
    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::NoSubscriptionExisted],
        properties: UnsubAckProperties::default(),
    });
    assert_eq!(encode_v(&unsuback, V3), [0xB0, 2, 0, 1]);
    assert_eq!(encode_v(&unsuback, V5), [0xB0, 4, 0, 1, 0, 0x11]);
    // CONNACK: the 3.1.1 return code for a 5.0 reason code.
    for (reason, code) in [
        (ReasonCode::Success, 0u8),
        (ReasonCode::UnsupportedProtocolVersion, 1),
        (ReasonCode::ClientIdentifierNotValid, 2),
        (ReasonCode::ServerUnavailable, 3),
        (ReasonCode::ServerBusy, 3),
        (ReasonCode::BadUserNameOrPassword, 4),
        (ReasonCode::NotAuthorized, 5),
        (ReasonCode::Banned, 5),
    ] {
        let ack = Packet::ConnAck(ConnAck::new(false, reason));
        assert_eq!(encode_v(&ack, V3), [0x20, 2, 0, code], "{reason}");
        assert_eq!(encode_v(&ack, V5), [0x20, 3, 0, reason.to_u8(), 0]);
    }
    assert_eq!(
        decode_v(&[0x20, 2, 0, 5], V3),
        Ok(Some(Packet::ConnAck(ConnAck::new(
            false,
            ReasonCode::NotAuthorized
        ))))
    );
    assert_eq!(
        decode_v(&[0x20, 2, 0, 5], V5),
        Err(DecodeError::InvalidReasonCode {
            packet: "CONNACK",
            code: 5
        })
    );
    // Subscription options beyond QoS exist in 5.0 only.
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            s("a"),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::SendIfNew,
            },
        )],
        properties: SubscribeProperties::default(),
    });
    assert_eq!(encode_v(&sub, V3), [0x82, 6, 0, 1, 0, 1, b'a', 0x01]);
    assert_eq!(encode_v(&sub, V5), [0x82, 7, 0, 1, 0, 0, 1, b'a', 0x1D]);
    assert_eq!(
        decode_v(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04], V3),
        Err(DecodeError::ReservedSubscriptionBits)
    );
    // A DISCONNECT reason exists in 5.0 only.
    let d = Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWillMessage));
    assert_eq!(encode_v(&d, V3), [0xE0, 0]);
    // A password without a user name has no 3.1.1 form.
    let pw = Packet::Connect(Connect {
        password: Some(b(b"p")),
        ..connect()
    });
    assert_eq!(
        encode(&pw, V3, &mut out),
        Err(EncodeError::PasswordWithoutUsername)
    );
    let pw_bytes = encode_v(
        &Packet::Connect(Connect {
            protocol: V5,
            password: Some(b(b"p")),
            ..connect()
        }),
        V5,
    );
    assert_eq!(pw_bytes[9], 0x42, "password flag without user name flag");
}

#[test]
fn v5_encode_refuses_out_of_range_properties() {
    let mut out = BytesMut::new();
    let connack = Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::Success,
        properties: ConnAckProperties {
            maximum_qos: Some(QoS::ExactlyOnce),
            ..ConnAckProperties::default()
        },
    });
    assert_eq!(
        encode(&connack, V5, &mut out),
        Err(EncodeError::PropertyOutOfRange(PropertyId::MaximumQoS))
    );
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("t"),
        packet_id: None,
        payload: Bytes::new(),
        properties: PublishProperties {
            subscription_identifiers: vec![nz32(268_435_456)],
            ..PublishProperties::default()
        },
    });
    assert_eq!(
        encode(&publish, V5, &mut out),
        Err(EncodeError::PropertyOutOfRange(
            PropertyId::SubscriptionIdentifier
        ))
    );
    let long = Packet::PubAck(PubAck {
        packet_id: 1,
        reason: ReasonCode::Success,
        properties: PubAckProperties {
            reason_string: Some(MqttStr::try_from("x".repeat(70_000)).unwrap()),
            user_properties: vec![],
        },
    });
    assert_eq!(encode(&long, V5, &mut out), Err(EncodeError::FieldTooLong));
    assert!(out.is_empty(), "nothing written on error");
}

#[test]
fn v5_decoding_is_zero_copy() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: s("t/x"),
        packet_id: Some(1),
        payload: Bytes::from(vec![5u8; 1000]),
        properties: full_publish_properties(),
    });
    let mut buf = BytesMut::new();
    encode(&p, V5, &mut buf).unwrap();
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(got)) = decode(&mut buf, MAX, V5).unwrap() else {
        panic!()
    };
    for (what, at) in [
        ("payload", got.payload.as_ptr()),
        ("topic", got.topic.as_bytes().as_ptr()),
        (
            "correlation data",
            got.properties.correlation_data.as_ref().unwrap().as_ptr(),
        ),
        (
            "user property",
            got.properties.user_properties[0].0.as_bytes().as_ptr(),
        ),
    ] {
        assert!(
            range.contains(&(at as usize)),
            "{what} points into the receive buffer"
        );
    }
}

#[test]
fn v5_oversized_packets_are_refused_from_the_header_alone() {
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        decode(&mut buf, 1000, V5),
        Err(DecodeError::PacketTooLarge {
            size: 4 + 1_048_576,
            max: 1000
        })
    );
}

#[test]
fn reason_codes() {
    let mut defined = 0;
    for v in 0..=255u8 {
        if let Some(code) = ReasonCode::from_u8(v) {
            defined += 1;
            assert_eq!(code.to_u8(), v);
            assert_eq!(code.is_error(), v >= 0x80);
            assert!(!code.description().is_empty());
            assert!(
                (1..=15).any(|t| code.allowed_in(t)),
                "{code} is used by some packet"
            );
        }
    }
    assert_eq!(defined, 43, "every code of Table 2-6");
    assert_eq!(ReasonCode::NORMAL_DISCONNECTION.to_u8(), 0);
    assert_eq!(ReasonCode::QuotaExceeded.to_string(), "0x97 Quota exceeded");
    assert_eq!(
        ReasonCode::granted(QoS::ExactlyOnce).granted_qos(),
        Some(QoS::ExactlyOnce)
    );
    assert_eq!(ReasonCode::UnspecifiedError.granted_qos(), None);
    assert!(!ReasonCode::NotAuthorized.allowed_in(16));
    assert_eq!(
        ConnectReturnCode::from_reason(ReasonCode::GrantedQoS1),
        None,
        "not a CONNACK code"
    );
    for code in [
        ConnectReturnCode::Accepted,
        ConnectReturnCode::UnacceptableProtocolVersion,
        ConnectReturnCode::IdentifierRejected,
        ConnectReturnCode::ServerUnavailable,
        ConnectReturnCode::BadUsernameOrPassword,
        ConnectReturnCode::NotAuthorized,
    ] {
        assert_eq!(ConnectReturnCode::from_reason(code.into()), Some(code));
    }
}

fn opt<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn mqtt_str() -> impl Strategy<Value = MqttStr> {
    "[a-zA-Z0-9 /é☃]{0,20}".prop_map(|v| MqttStr::try_from(v).unwrap())
}

fn topic_name() -> impl Strategy<Value = MqttStr> {
    "[a-z/]{1,20}".prop_map(|v| MqttStr::try_from(v).unwrap())
}

fn binary() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

prop_compose! {
    fn publish_properties()(
        payload_format in opt(prop_oneof![Just(PayloadFormat::Unspecified), Just(PayloadFormat::Utf8)]),
        message_expiry_interval in opt(any::<u32>()),
        topic_alias in opt(1u16..),
        response_topic in opt(topic_name()),
        correlation_data in opt(binary()),
        user_properties in proptest::collection::vec((mqtt_str(), mqtt_str()), 0..4),
        subscription_identifiers in proptest::collection::vec(1u32..=268_435_455, 0..4),
        content_type in opt(mqtt_str()),
    ) -> PublishProperties {
        PublishProperties {
            payload_format,
            message_expiry_interval,
            topic_alias: topic_alias.map(nz16),
            response_topic,
            correlation_data,
            user_properties,
            subscription_identifiers: subscription_identifiers.into_iter().map(nz32).collect(),
            content_type,
        }
    }
}

proptest! {
    /// Valid MQTT 5.0 PUBLISH packets with random properties survive a round trip, and every
    /// prefix of their encoding is incomplete.
    #[test]
    fn v5_publish_round_trips(
        topic in "[a-z/]{0,40}",
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
        qos in 0u8..3,
        retain: bool,
        dup: bool,
        id in 1u16..,
        mut properties in publish_properties(),
    ) {
        let qos = QoS::from_u8(qos).unwrap();
        if topic.is_empty() && properties.topic_alias.is_none() {
            properties.topic_alias = Some(nz16(1));
        }
        let p = Packet::Publish(Publish {
            dup: dup && qos != QoS::AtMostOnce, qos, retain, topic: s(&topic),
            packet_id: (qos != QoS::AtMostOnce).then_some(id), payload: Bytes::from(payload),
            properties,
        });
        roundtrip_v(p, V5);
    }

    /// The encoded length of random MQTT 5.0 acknowledgements matches what decodes.
    #[test]
    fn v5_ack_round_trips(
        id in 1u16..,
        kind in 0usize..4,
        reason in prop_oneof![Just(0x00u8), Just(0x10), Just(0x80), Just(0x87), Just(0x92)],
        reason_string in opt(mqtt_str()),
        user_properties in proptest::collection::vec((mqtt_str(), mqtt_str()), 0..3),
    ) {
        let reason = ReasonCode::from_u8(reason).unwrap();
        let first = [0x40u8, 0x50, 0x60, 0x70][kind];
        prop_assume!(reason.allowed_in(first >> 4));
        let ack = PubAck { packet_id: id, reason, properties: PubAckProperties { reason_string, user_properties } };
        let p = [Packet::PubAck, Packet::PubRec, Packet::PubRel, Packet::PubComp][kind](ack);
        roundtrip_v(p, V5);
    }
}
