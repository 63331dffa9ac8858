//! MQTT 5.0 behaviour of the broker-side connection state machine, on virtual time: session
//! expiry, will delay, Server Keep Alive, Receive Maximum both ways, topic aliases, Maximum
//! Packet Size, message expiry, properties, reason codes and server DISCONNECTs.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stratus_mqtt::*;

mod common;

use common::{s, Harness};

type V5 = Harness;

impl Harness {
    fn v5(limits: Limits) -> Self {
        Harness::with_version(limits, ProtocolVersion::V5)
    }

    /// CONNECT and accept; returns the CONNACK.
    fn connect(limits: Limits, connect: Connect) -> (Self, ConnAck) {
        let mut h = V5::v5(limits);
        h.send(Packet::Connect(connect));
        assert!(matches!(h.events().as_slice(), [Event::Connect(_)]));
        h.conn.accept(Session::new(), false);
        let Some(Packet::ConnAck(ack)) = h.received().into_iter().next() else {
            panic!("no CONNACK");
        };
        (h, ack)
    }

    fn closed(&mut self) -> Option<(CloseReason, Option<Message>)> {
        self.events().into_iter().find_map(|e| match e {
            Event::Closed { reason, will } => Some((reason, will)),
            _ => None,
        })
    }
}

fn connect5(id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_session: true,
        keep_alive: 0,
        client_id: s(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn publish(topic: &str, id: Option<u16>, qos: QoS, props: PublishProperties) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id: id,
        payload: Bytes::from_static(b"p"),
        properties: props,
    })
}

fn disconnect_code(packets: &[Packet]) -> Option<ReasonCode> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason),
        _ => None,
    })
}

#[test]
fn connack_advertises_the_server_capabilities() {
    let (_, ack) = V5::connect(Limits::default(), connect5("c"));
    let p = ack.properties;
    assert_eq!(p.receive_maximum, NonZeroU16::new(1024));
    assert_eq!(p.topic_alias_maximum, Some(64));
    assert_eq!(p.maximum_packet_size, NonZeroU32::new(1024 * 1024));
    assert_eq!(p.retain_available, Some(true));
    assert_eq!(p.wildcard_subscription_available, Some(true));
    assert_eq!(p.subscription_identifiers_available, Some(true));
    assert_eq!(p.shared_subscription_available, Some(true));
    assert_eq!(p.maximum_qos, None, "QoS 2 is supported: omitted");
    assert_eq!(p.server_keep_alive, None);
}

#[test]
fn assigned_client_identifier_is_announced() {
    let mut h = V5::v5(Limits::default());
    h.send(Packet::Connect(connect5("")));
    assert!(matches!(h.events().as_slice(), [Event::Connect(_)]));
    h.conn.assign_client_id(s("stratus-1"));
    h.conn.accept(Session::new(), false);
    let Some(Packet::ConnAck(ack)) = h.received().into_iter().next() else {
        panic!()
    };
    assert_eq!(
        ack.properties.assigned_client_identifier,
        Some(s("stratus-1"))
    );
}

#[test]
fn session_expiry_comes_from_connect_and_disconnect_may_change_it() {
    let mut c = connect5("c");
    c.properties.session_expiry_interval = Some(30);
    let (mut h, _) = V5::connect(Limits::default(), c);
    assert_eq!(h.conn.session_expiry(), 30);
    let mut d = Disconnect::new(ReasonCode::NORMAL_DISCONNECTION);
    d.properties.session_expiry_interval = Some(u32::MAX);
    h.send(Packet::Disconnect(d));
    assert_eq!(h.conn.session_expiry(), u32::MAX);
    assert_eq!(h.closed().unwrap().0, CloseReason::ClientDisconnect);

    // Absent: 0, and DISCONNECT may not raise it from 0 (protocol error 0x82).
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    assert_eq!(h.conn.session_expiry(), 0);
    let mut d = Disconnect::new(ReasonCode::NORMAL_DISCONNECTION);
    d.properties.session_expiry_interval = Some(10);
    h.send(Packet::Disconnect(d));
    assert!(matches!(
        h.closed().unwrap().0,
        CloseReason::ProtocolViolation(_)
    ));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::ProtocolError)
    );
    assert_eq!(h.conn.session_expiry(), 0);
}

#[test]
fn v311_session_expiry_follows_clean_session() {
    let mut h = V5::v5(Limits::default());
    let mut c = connect5("c");
    c.protocol = ProtocolVersion::V311;
    c.clean_session = false;
    let mut b = BytesMut::new();
    encode(&Packet::Connect(c), ProtocolVersion::V311, &mut b).unwrap();
    h.conn.handle_bytes(&mut b, h.now);
    assert_eq!(h.conn.session_expiry(), u32::MAX);
}

#[test]
fn will_delay_is_reported_and_disconnect_with_will_publishes_it() {
    let mut c = connect5("c");
    c.will = Some(LastWill {
        topic: s("w"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(5),
            content_type: Some(s("text/plain")),
            ..WillProperties::default()
        },
    });
    let (mut h, _) = V5::connect(Limits::default(), c.clone());
    assert_eq!(h.conn.will_delay(), 5);
    h.send(Packet::Disconnect(Disconnect::new(
        ReasonCode::DisconnectWithWillMessage,
    )));
    let (reason, will) = h.closed().unwrap();
    assert_eq!(reason, CloseReason::ClientDisconnectWithWill);
    let will = will.expect("0x04 publishes the will");
    assert_eq!(
        will.properties.unwrap().content_type,
        Some(s("text/plain")),
        "will properties travel with it"
    );
    // A normal DISCONNECT discards it.
    let (mut h, _) = V5::connect(Limits::default(), c);
    h.send(Packet::Disconnect(Disconnect::new(
        ReasonCode::NORMAL_DISCONNECTION,
    )));
    assert_eq!(h.closed().unwrap().1, None);
}

#[test]
fn server_keep_alive_overrides_a_longer_or_zero_keep_alive() {
    let limits = Limits {
        max_keepalive: 10,
        ..Limits::default()
    };
    let mut c = connect5("c");
    c.keep_alive = 100;
    let (mut h, ack) = V5::connect(limits.clone(), c);
    assert_eq!(ack.properties.server_keep_alive, Some(10));
    assert_eq!(h.conn.keep_alive_secs(), Some(10));
    h.advance(14.9);
    assert!(h.conn.is_connected());
    h.advance(0.2);
    assert_eq!(h.closed().unwrap().0, CloseReason::KeepAliveTimeout);
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::KeepAliveTimeout)
    );

    let (h, ack) = V5::connect(limits.clone(), connect5("z"));
    assert_eq!(
        ack.properties.server_keep_alive,
        Some(10),
        "0 is replaced too"
    );
    assert_eq!(h.conn.keep_alive_secs(), Some(10));

    let mut c = connect5("short");
    c.keep_alive = 5;
    let (h, ack) = V5::connect(limits, c);
    assert_eq!(ack.properties.server_keep_alive, None);
    assert_eq!(h.conn.keep_alive_secs(), Some(5));
}

#[test]
fn inbound_receive_maximum_is_enforced_with_0x93() {
    let limits = Limits {
        receive_maximum: 2,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits, connect5("c"));
    let none = PublishProperties::default();
    h.send(publish("t", Some(1), QoS::AtLeastOnce, none.clone()));
    h.send(publish("t", Some(2), QoS::ExactlyOnce, none.clone()));
    assert!(h.conn.is_connected());
    // Acknowledging one makes room again.
    h.events();
    h.conn.acknowledge(1);
    h.send(publish("t", Some(3), QoS::AtLeastOnce, none.clone()));
    assert!(h.conn.is_connected());
    h.send(publish("t", Some(4), QoS::AtLeastOnce, none));
    assert_eq!(
        h.closed().unwrap().0,
        CloseReason::Violation(
            ReasonCode::ReceiveMaximumExceeded,
            "more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum"
        )
    );
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::ReceiveMaximumExceeded)
    );
}

#[test]
fn outbound_in_flight_is_bounded_by_the_client_receive_maximum() {
    let mut c = connect5("c");
    c.properties.receive_maximum = NonZeroU16::new(2);
    let (mut h, _) = V5::connect(Limits::default(), c);
    let m = Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    assert_eq!(h.conn.deliver(&m, QoS::AtLeastOnce, false), Delivered::Sent);
    assert_eq!(h.conn.deliver(&m, QoS::AtLeastOnce, false), Delivered::Sent);
    assert!(!h.conn.has_window_room());
    assert_eq!(
        h.conn.deliver(&m, QoS::AtLeastOnce, false),
        Delivered::Queued
    );
    let sent = h.received();
    assert_eq!(sent.len(), 2);
    h.send(Packet::PubAck(PubAck::new(1)));
    assert_eq!(
        h.received().len(),
        1,
        "the queued one goes out once a slot frees"
    );
}

#[test]
fn topic_aliases_are_resolved_per_connection_and_checked() {
    let limits = Limits {
        topic_alias_maximum: 2,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits.clone(), connect5("c"));
    let alias = |a: u16| PublishProperties {
        topic_alias: NonZeroU16::new(a),
        ..PublishProperties::default()
    };
    h.send(publish("a/b", None, QoS::AtMostOnce, alias(1)));
    h.send(publish("", None, QoS::AtMostOnce, alias(1)));
    let topics: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Publish { message, .. } => {
                assert!(message.properties.is_none(), "the alias is not forwarded");
                Some(message.topic.to_string())
            }
            _ => None,
        })
        .collect();
    assert_eq!(topics, vec!["a/b", "a/b"]);
    // Above the maximum: 0x94.
    h.send(publish("x", None, QoS::AtMostOnce, alias(3)));
    assert!(matches!(
        h.closed().unwrap().0,
        CloseReason::Violation(ReasonCode::TopicAliasInvalid, _)
    ));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::TopicAliasInvalid)
    );
    // Unknown alias with an empty topic: protocol error.
    let (mut h, _) = V5::connect(limits.clone(), connect5("d"));
    h.send(publish("", None, QoS::AtMostOnce, alias(2)));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::ProtocolError)
    );
    // Alias 0 (raw bytes: the encoder will not write it): 0x94.
    let (mut h, _) = V5::connect(limits, connect5("e"));
    h.inbox
        .extend_from_slice(&[0x30, 0x07, 0x00, 0x01, b'x', 0x03, 0x23, 0x00, 0x00]);
    h.conn.handle_bytes(&mut h.inbox, h.now);
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::TopicAliasInvalid)
    );
}

#[test]
fn messages_larger_than_the_client_maximum_packet_size_are_dropped() {
    let mut c = connect5("c");
    c.properties.maximum_packet_size = NonZeroU32::new(64);
    let (mut h, _) = V5::connect(Limits::default(), c);
    let small = Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    let big = Message::new(s("t"), Bytes::from(vec![0u8; 100]), QoS::AtLeastOnce, false);
    assert_eq!(
        h.conn.deliver(&big, QoS::AtLeastOnce, false),
        Delivered::Dropped
    );
    assert_eq!(
        h.conn.deliver(&big, QoS::AtMostOnce, false),
        Delivered::Dropped
    );
    assert_eq!(
        h.conn.deliver(&small, QoS::AtLeastOnce, false),
        Delivered::Sent
    );
    assert_eq!(h.received().len(), 1);
    assert_eq!(h.conn.take_stats().dropped, 2);
    assert_eq!(h.conn.session().unwrap().inflight.len(), 1);
}

#[test]
fn oversized_inbound_packet_gets_disconnect_0x95() {
    let limits = Limits {
        max_packet_size: 64,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits, connect5("c"));
    let mut p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: s("t"),
        packet_id: None,
        payload: Bytes::from(vec![0u8; 100]),
        properties: PublishProperties::default(),
    };
    p.payload = Bytes::from(vec![0u8; 100]);
    h.send(Packet::Publish(p));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::PacketTooLarge)
    );
}

#[test]
fn message_expiry_is_decremented_and_expired_messages_are_dropped() {
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    let props = PublishProperties {
        message_expiry_interval: Some(10),
        user_properties: vec![(s("k"), s("v"))],
        content_type: Some(s("text/plain")),
        ..PublishProperties::default()
    };
    h.send(publish("t", None, QoS::AtMostOnce, props));
    let Some(Event::Publish { message, .. }) = h.events().into_iter().next() else {
        panic!()
    };
    assert_eq!(message.expires_at, Some(h.now + Duration::from_secs(10)));
    h.advance(4.0);
    assert_eq!(
        h.conn.deliver(&message, QoS::AtMostOnce, false),
        Delivered::Sent
    );
    let Some(Packet::Publish(p)) = h.received().into_iter().next() else {
        panic!()
    };
    assert_eq!(p.properties.message_expiry_interval, Some(6));
    assert_eq!(p.properties.user_properties, vec![(s("k"), s("v"))]);
    assert_eq!(p.properties.content_type, Some(s("text/plain")));
    h.advance(6.0);
    assert_eq!(
        h.conn.deliver(&message, QoS::AtMostOnce, false),
        Delivered::Dropped
    );
    assert!(h.received().is_empty());

    // Expired while waiting in the session queue.
    let mut c = connect5("q");
    c.properties.receive_maximum = NonZeroU16::new(1);
    let (mut h, _) = V5::connect(Limits::default(), c);
    let mut m = Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtLeastOnce, false);
    h.conn.deliver(&m, QoS::AtLeastOnce, false);
    m.expires_at = Some(h.now + Duration::from_secs(5));
    assert_eq!(
        h.conn.deliver(&m, QoS::AtLeastOnce, false),
        Delivered::Queued
    );
    h.received();
    h.advance(6.0);
    h.send(Packet::PubAck(PubAck::new(1)));
    assert!(
        h.received().is_empty(),
        "the expired queued message is not sent"
    );
    assert!(h.conn.session().unwrap().queued.is_empty());
}

#[test]
fn subscription_ids_are_sent_with_the_publish() {
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    let m = Message {
        properties: Some(Arc::new(PublishProperties {
            correlation_data: Some(Bytes::from_static(b"cd")),
            response_topic: Some(s("reply")),
            ..PublishProperties::default()
        })),
        ..Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtLeastOnce, false)
    };
    let ids = [NonZeroU32::new(3).unwrap(), NonZeroU32::new(8).unwrap()];
    let d = Delivery {
        qos: QoS::AtLeastOnce,
        retain: false,
        subscription_ids: &ids,
        share: None,
        store_seq: None,
    };
    h.conn.deliver_with(&m, d, h.now);
    let Some(Packet::Publish(p)) = h.received().into_iter().next() else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, ids.to_vec());
    assert_eq!(p.properties.response_topic, Some(s("reply")));
    assert_eq!(
        p.properties.correlation_data,
        Some(Bytes::from_static(b"cd"))
    );
}

#[test]
fn a_client_publish_with_a_subscription_identifier_is_a_protocol_error() {
    // MQTT-3.3.4-6: the identifier is only for PUBLISHes from the server.
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
        let props = PublishProperties {
            subscription_identifiers: vec![NonZeroU32::new(1).unwrap()],
            ..PublishProperties::default()
        };
        h.send(publish(
            "t",
            (qos != QoS::AtMostOnce).then_some(1),
            qos,
            props,
        ));
        let events = h.events();
        assert!(
            !events.iter().any(|e| matches!(e, Event::Publish { .. })),
            "the message must not be routed"
        );
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Closed {
                reason: CloseReason::ProtocolViolation(_),
                ..
            }
        )));
        let packets = h.received();
        assert!(
            !packets.iter().any(|p| matches!(p, Packet::PubAck(_))),
            "no PUBACK"
        );
        assert_eq!(disconnect_code(&packets), Some(ReasonCode::ProtocolError));
        assert!(h.conn.is_closed());
    }
    // The same bytes from the server (a delivery) still decode with the identifier: the codec
    // is direction-neutral, the rule is the connection's.
    let mut b = BytesMut::new();
    let p = publish(
        "t",
        None,
        QoS::AtMostOnce,
        PublishProperties {
            subscription_identifiers: vec![NonZeroU32::new(7).unwrap()],
            ..PublishProperties::default()
        },
    );
    encode(&p, ProtocolVersion::V5, &mut b).unwrap();
    let Ok(Some(Packet::Publish(back))) = decode(&mut b, 1 << 20, ProtocolVersion::V5) else {
        panic!("does not decode")
    };
    assert_eq!(
        back.properties.subscription_identifiers,
        vec![NonZeroU32::new(7).unwrap()]
    );
}

#[test]
fn v311_subscribers_get_no_properties() {
    let mut h = V5::v5(Limits::default());
    let mut c = connect5("old");
    c.protocol = ProtocolVersion::V311;
    let mut b = BytesMut::new();
    encode(&Packet::Connect(c), ProtocolVersion::V311, &mut b).unwrap();
    h.conn.handle_bytes(&mut b, h.now);
    h.events();
    h.conn.accept(Session::new(), false);
    h.conn.transmit().clear();
    let m = Message {
        properties: Some(Arc::new(PublishProperties {
            content_type: Some(s("x")),
            ..PublishProperties::default()
        })),
        expires_at: Some(h.now + Duration::from_secs(9)),
        ..Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtMostOnce, false)
    };
    h.conn.deliver(&m, QoS::AtMostOnce, false);
    assert_eq!(h.conn.pending_transmit(), b"\x30\x04\x00\x01tx");
}

#[test]
fn acknowledgements_carry_reason_codes_for_v5() {
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    h.send(publish(
        "t",
        Some(1),
        QoS::AtLeastOnce,
        PublishProperties::default(),
    ));
    h.send(publish(
        "t",
        Some(2),
        QoS::ExactlyOnce,
        PublishProperties::default(),
    ));
    h.events();
    h.conn
        .acknowledge_with(1, ReasonCode::NoMatchingSubscribers);
    h.conn.acknowledge_with(2, ReasonCode::NotAuthorized);
    let acks = h.received();
    assert!(matches!(&acks[0], Packet::PubAck(a) if a.reason == ReasonCode::NoMatchingSubscribers));
    assert!(matches!(&acks[1], Packet::PubRec(a) if a.reason == ReasonCode::NotAuthorized));
    assert!(
        h.conn.session().unwrap().inbound_qos2.is_empty(),
        "an error PUBREC ends the exchange"
    );
}

#[test]
fn server_disconnects_carry_reason_codes() {
    for (reason, code) in [
        (CloseReason::TakenOver, ReasonCode::SessionTakenOver),
        (CloseReason::ServerShutdown, ReasonCode::ServerShuttingDown),
        (CloseReason::SlowConsumer, ReasonCode::QuotaExceeded),
    ] {
        let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
        h.conn.close(reason);
        let packets = h.received();
        let Some(Packet::Disconnect(d)) = packets.first() else {
            panic!("no DISCONNECT")
        };
        assert_eq!(d.reason, code);
        assert!(d.properties.reason_string.is_some());
    }
    // Malformed input: 0x81.
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    h.inbox.extend_from_slice(&[0x30, 0x02, 0xff, 0xff]);
    h.conn.handle_bytes(&mut h.inbox, h.now);
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::MalformedPacket)
    );
}

#[test]
fn unsupported_authentication_method_gets_0x8c_and_auth_is_a_protocol_error() {
    let mut h = V5::v5(Limits::default());
    let mut c = connect5("c");
    c.properties.authentication_method = Some(s("SCRAM-SHA-1"));
    h.send(Packet::Connect(c));
    let Some(Packet::ConnAck(ack)) = h.received().into_iter().next() else {
        panic!()
    };
    assert_eq!(ack.reason, ReasonCode::BadAuthenticationMethod);
    assert!(h.conn.is_closed());

    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    h.send(Packet::Auth(Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: AuthProperties::default(),
    }));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::ProtocolError)
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let (mut h, _) = V5::connect(Limits::default(), connect5("c"));
    let opts = SubscriptionOptions {
        no_local: true,
        ..SubscriptionOptions::new(QoS::AtMostOnce)
    };
    h.send(Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(s("$share/g/t"), opts)],
        properties: SubscribeProperties::default(),
    }));
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::ProtocolError)
    );
}

#[test]
fn outbound_topic_aliases_up_to_the_client_maximum() {
    let mut c = connect5("alias-out");
    c.properties.topic_alias_maximum = Some(2);
    let (mut h, _) = V5::connect(Limits::default(), c);
    let m = |t: &str| Message::new(s(t), Bytes::from_static(b"x"), QoS::AtMostOnce, false);
    for t in ["a/1", "a/1", "a/2", "a/3", "a/2", "a/3"] {
        h.conn.deliver(&m(t), QoS::AtMostOnce, false);
    }
    let seen: Vec<(String, Option<u16>)> = h
        .received()
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => (
                p.topic.to_string(),
                p.properties.topic_alias.map(|a| a.get()),
            ),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a/1".into(), Some(1)), // alias set with the topic
            ("".into(), Some(1)),    // then the alias alone
            ("a/2".into(), Some(2)),
            ("a/3".into(), None), // maximum reached: plain topic
            ("".into(), Some(2)),
            ("a/3".into(), None),
        ]
    );
}

#[test]
fn no_outbound_aliases_for_a_client_without_a_maximum_or_for_a_packet_too_large() {
    let (mut h, _) = V5::connect(Limits::default(), connect5("plain"));
    let m = Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtMostOnce, false);
    h.conn.deliver(&m, QoS::AtMostOnce, false);
    h.conn.deliver(&m, QoS::AtMostOnce, false);
    for p in h.received() {
        let Packet::Publish(p) = p else { panic!() };
        assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("t", None));
    }

    let mut c = connect5("small");
    c.properties.topic_alias_maximum = Some(5);
    c.properties.maximum_packet_size = std::num::NonZeroU32::new(64);
    let (mut h, _) = V5::connect(Limits::default(), c);
    let big = Message::new(
        s("big"),
        Bytes::from(vec![0u8; 100]),
        QoS::AtMostOnce,
        false,
    );
    h.conn.deliver(&big, QoS::AtMostOnce, false); // dropped: too large for the client
    let small = Message::new(s("big"), Bytes::from_static(b"ok"), QoS::AtMostOnce, false);
    h.conn.deliver(&small, QoS::AtMostOnce, false);
    let got = h.received();
    assert_eq!(got.len(), 1);
    let Packet::Publish(p) = &got[0] else {
        panic!()
    };
    // The alias the dropped packet would have set was never announced: set it now.
    assert_eq!(
        (p.topic.as_str(), p.properties.topic_alias.map(|a| a.get())),
        ("big", Some(1))
    );
}

#[test]
fn the_qos0_encoder_writes_what_the_connection_would_and_only_when_it_may() {
    // A client with a Maximum Packet Size: the encoder drops what the connection drops.
    let mut c = connect5("lane");
    c.properties.maximum_packet_size = NonZeroU32::new(200);
    let (mut h, _) = V5::connect(Limits::default(), c);
    h.received();
    let encoder = h
        .conn
        .qos0_encoder()
        .expect("connected, nothing to send, no aliases");
    let ids = [NonZeroU32::new(5).unwrap()];
    let mut m = Message {
        properties: Some(Arc::new(PublishProperties {
            content_type: Some(s("text/plain")),
            user_properties: vec![(s("k"), s("v"))],
            ..PublishProperties::default()
        })),
        ..Message::new(
            s("a/b"),
            Bytes::from_static(b"payload"),
            QoS::AtMostOnce,
            false,
        )
    };
    m.expires_at = Some(h.now + Duration::from_secs(30));
    h.advance(4.0);
    for retain in [false, true] {
        let mut lane = BytesMut::new();
        assert!(encoder.encode(&m, retain, &ids, h.now, &mut lane));
        let d = Delivery {
            qos: QoS::AtMostOnce,
            retain,
            subscription_ids: &ids,
            share: None,
            store_seq: None,
        };
        assert_eq!(h.conn.deliver_with(&m, d, h.now), Delivered::Sent);
        assert_eq!(
            h.conn.pending_transmit(),
            &lane[..],
            "retain {retain}: the lane's bytes differ from the connection's"
        );
        let Some(Packet::Publish(p)) = h.received().into_iter().next() else {
            panic!()
        };
        assert_eq!(p.properties.message_expiry_interval, Some(26));
        assert_eq!(p.properties.subscription_identifiers, ids.to_vec());
        assert_eq!(p.retain, retain);
    }
    // Too large for the client, or expired: dropped, nothing written.
    let big = Message::new(
        s("a/b"),
        Bytes::from(vec![0u8; 300]),
        QoS::AtMostOnce,
        false,
    );
    let mut lane = BytesMut::new();
    assert!(!encoder.encode(&big, false, &[], h.now, &mut lane));
    h.advance(30.0);
    assert!(!encoder.encode(&m, false, &[], h.now, &mut lane));
    assert!(lane.is_empty());
    // Deliveries sent elsewhere are counted as the connection's own.
    h.conn.take_stats();
    h.conn.count_sent_elsewhere(3);
    let stats = h.conn.take_stats();
    assert_eq!((stats.publish_sent, stats.packets_sent), (3, 3));

    // No encoder while something waits to be sent, or for a client that accepts topic
    // aliases (encoding then needs the connection's alias table).
    let (mut h, _) = V5::connect(Limits::default(), connect5("busy"));
    let waiting = Message::new(s("t"), Bytes::from_static(b"x"), QoS::AtMostOnce, false);
    assert_eq!(
        h.conn.deliver(&waiting, QoS::AtMostOnce, false),
        Delivered::Sent
    );
    assert!(
        h.conn.qos0_encoder().is_none(),
        "a delivery waits to be written"
    );
    h.received();
    assert!(h.conn.qos0_encoder().is_some());
    let mut c = connect5("aliases");
    c.properties.topic_alias_maximum = Some(4);
    let (mut h, _) = V5::connect(Limits::default(), c);
    h.received();
    assert!(h.conn.qos0_encoder().is_none());
}

fn puback_codes(packets: &[Packet]) -> Vec<(u16, ReasonCode)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) | Packet::PubRec(a) => Some((a.packet_id, a.reason)),
            _ => None,
        })
        .collect()
}

fn published(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Publish { .. }))
        .count()
}

#[test]
fn a_publish_over_the_rate_gets_0x97_and_is_not_routed() {
    let limits = Limits {
        max_publish_rate: 3,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits, connect5("c"));
    let none = PublishProperties::default();
    for id in 1..=3 {
        h.send(publish("t", Some(id), QoS::AtLeastOnce, none.clone()));
    }
    let routed = h.events();
    assert_eq!(published(&routed), 3);
    for id in 1..=3 {
        h.conn.acknowledge(id);
    }
    h.send(publish("t", Some(4), QoS::AtLeastOnce, none.clone()));
    h.send(publish("t", Some(5), QoS::ExactlyOnce, none.clone()));
    h.send(publish("t", None, QoS::AtMostOnce, none.clone()));
    assert_eq!(published(&h.events()), 0, "nothing over the rate is routed");
    let acks = puback_codes(&h.received());
    assert!(acks.contains(&(4, ReasonCode::QuotaExceeded)), "{acks:?}");
    assert!(acks.contains(&(5, ReasonCode::QuotaExceeded)), "{acks:?}");
    assert_eq!(h.conn.take_stats().throttled, 3);
    assert!(h.conn.is_connected());
    // The next second has room again.
    h.advance(1.0);
    h.send(publish("t", Some(6), QoS::AtLeastOnce, none));
    assert_eq!(published(&h.events()), 1);
}

#[test]
fn a_byte_rate_counts_payload_bytes() {
    let limits = Limits {
        max_publish_bytes_rate: 10,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits, connect5("c"));
    let big = |id| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: s("t"),
            packet_id: Some(id),
            payload: Bytes::from_static(b"0123456"),
            properties: PublishProperties::default(),
        })
    };
    h.send(big(1));
    h.send(big(2));
    assert_eq!(published(&h.events()), 1, "7 + 7 bytes > 10");
    h.conn.acknowledge(1);
    assert!(puback_codes(&h.received()).contains(&(2, ReasonCode::QuotaExceeded)));
}

#[test]
fn a_rate_exceeded_for_consecutive_seconds_disconnects_with_0x96() {
    let limits = Limits {
        max_publish_rate: 1,
        rate_sustain_secs: 3,
        ..Limits::default()
    };
    let (mut h, _) = V5::connect(limits, connect5("c"));
    let none = PublishProperties::default();
    // Over in one second, then a quiet second: the streak starts again.
    h.send(publish("t", None, QoS::AtMostOnce, none.clone()));
    h.send(publish("t", None, QoS::AtMostOnce, none.clone()));
    h.advance(2.0);
    for second in 0..3 {
        assert!(h.conn.is_connected(), "second {second}");
        h.send(publish("t", None, QoS::AtMostOnce, none.clone()));
        h.send(publish("t", None, QoS::AtMostOnce, none.clone()));
        h.advance(1.0);
    }
    assert!(!h.conn.is_connected());
    assert_eq!(
        disconnect_code(&h.received()),
        Some(ReasonCode::MessageRateTooHigh)
    );
}

#[test]
fn a_v311_client_over_the_rate_is_acknowledged_and_its_message_dropped() {
    let limits = Limits {
        max_publish_rate: 1,
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    h.send(Packet::Connect(Connect {
        protocol: ProtocolVersion::V311,
        ..connect5("c")
    }));
    h.events();
    h.conn.accept(Session::new(), false);
    h.received();
    let p = |id, qos| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: s("t"),
            packet_id: Some(id),
            payload: Bytes::from_static(b"x"),
            properties: PublishProperties::default(),
        })
    };
    h.send(p(1, QoS::AtLeastOnce));
    assert_eq!(published(&h.events()), 1);
    h.conn.acknowledge(1);
    h.send(p(2, QoS::AtLeastOnce));
    h.send(p(3, QoS::ExactlyOnce));
    assert_eq!(published(&h.events()), 0);
    let acks = puback_codes(&h.received());
    assert_eq!(
        acks,
        vec![
            (1, ReasonCode::Success),
            (2, ReasonCode::Success),
            (3, ReasonCode::Success)
        ]
    );
    // The dropped QoS 2 message's exchange completes as usual.
    h.send(Packet::PubRel(PubAck::new(3)));
    assert!(h
        .received()
        .iter()
        .any(|p| matches!(p, Packet::PubComp(a) if a.packet_id == 3)));
    assert!(h.conn.is_connected());
}
