//! The broker-side connection state machine, packet by packet on virtual time: nothing here
//! sleeps, so a 90-second keep-alive test runs in microseconds.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use stratus_mqtt::*;

mod common;

use common::{s, Harness};

impl Harness {
    /// CONNECT and accept with a fresh session.
    fn connected(limits: Limits, connect: Connect) -> Self {
        let mut h = Harness::new(limits);
        h.send(Packet::Connect(connect));
        assert!(matches!(h.events().as_slice(), [Event::Connect(_)]));
        h.conn.accept(Session::new(), false);
        assert_eq!(
            h.received(),
            vec![Packet::ConnAck(ConnAck::new(
                false,
                ConnectReturnCode::Accepted.into()
            ))]
        );
        h
    }
}

fn connect_packet(id: &str) -> Connect {
    Connect {
        protocol: ProtocolVersion::V311,
        clean_session: false,
        keep_alive: 0,
        client_id: s(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn with_will(mut c: Connect) -> Connect {
    c.will = Some(LastWill {
        topic: s("status/c1"),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    c
}

fn msg(topic: &str, payload: &'static str, qos: QoS) -> Message {
    Message::new(s(topic), Bytes::from_static(payload.as_bytes()), qos, false)
}

fn publish(id: Option<u16>, qos: QoS, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic: s("t"),
        packet_id: id,
        payload: Bytes::from_static(b"x"),
        properties: PublishProperties::default(),
    })
}

/// An MQTT 3.1.1 UNSUBACK (no reason codes on the wire).
fn unsuback(packet_id: u16) -> UnsubAck {
    UnsubAck {
        packet_id,
        reason_codes: vec![],
        properties: UnsubAckProperties::default(),
    }
}

fn closed_will(events: &[Event]) -> Option<Option<Message>> {
    events.iter().find_map(|e| match e {
        Event::Closed { will, .. } => Some(will.clone()),
        _ => None,
    })
}

#[test]
fn connect_then_accept_sends_connack() {
    let mut h = Harness::new(Limits::default());
    h.send(Packet::Connect(connect_packet("c1")));
    let ev = h.events();
    assert!(matches!(&ev[..], [Event::Connect(c)] if c.client_id.as_str() == "c1"));
    assert!(
        h.received().is_empty(),
        "no CONNACK before the host decides"
    );
    h.conn.accept(Session::new(), true);
    assert_eq!(
        h.received(),
        vec![Packet::ConnAck(ConnAck::new(
            true,
            ConnectReturnCode::Accepted.into()
        ))]
    );
    assert!(h.conn.is_connected());
}

#[test]
fn refused_connect_sends_the_code_and_closes_without_will() {
    let mut h = Harness::new(Limits::default());
    h.send(Packet::Connect(with_will(connect_packet("c1"))));
    h.events();
    h.conn.refuse(ConnectReturnCode::NotAuthorized);
    assert_eq!(
        h.received(),
        vec![Packet::ConnAck(ConnAck::new(
            false,
            ConnectReturnCode::NotAuthorized.into()
        ))]
    );
    assert!(h.conn.is_closed());
    assert_eq!(closed_will(&h.events()), Some(None));
}

#[test]
fn empty_client_id_needs_clean_session() {
    let mut h = Harness::new(Limits::default());
    h.send(Packet::Connect(connect_packet("")));
    assert_eq!(
        h.received(),
        vec![Packet::ConnAck(ConnAck::new(
            false,
            ConnectReturnCode::IdentifierRejected.into()
        ))]
    );
    assert!(h.conn.is_closed());
    assert!(!h.events().iter().any(|e| matches!(e, Event::Connect(_))));

    let mut h = Harness::new(Limits::default());
    let mut c = connect_packet("");
    c.clean_session = true;
    h.send(Packet::Connect(c));
    assert!(
        matches!(&h.events()[..], [Event::Connect(_)]),
        "the host assigns an id"
    );
}

#[test]
fn unsupported_protocol_level_gets_connack_1() {
    let mut h = Harness::new(Limits::default());
    h.send_raw(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 60, 0, 1, b'c',
    ]);
    assert_eq!(
        h.received(),
        vec![Packet::ConnAck(ConnAck::new(
            false,
            ConnectReturnCode::UnacceptableProtocolVersion.into()
        ))]
    );
    assert!(h.conn.is_closed());
}

#[test]
fn first_packet_must_be_connect() {
    let mut h = Harness::new(Limits::default());
    h.send(Packet::PingReq);
    assert!(h.conn.is_closed());
    assert!(h.received().is_empty());
    assert!(matches!(
        &h.events()[..],
        [Event::Closed {
            reason: CloseReason::ProtocolViolation(_),
            will: None
        }]
    ));
}

#[test]
fn a_first_byte_that_is_not_connect_closes_at_once() {
    let mut h = Harness::new(Limits::default());
    // PUBLISH header with an unfinished remaining length: no need to wait for more.
    h.send_raw(&[0x30, 0xFF]);
    assert!(h.conn.is_closed());
}

#[test]
fn second_connect_is_a_protocol_violation_and_publishes_the_will() {
    let mut h = Harness::connected(Limits::default(), with_will(connect_packet("c1")));
    h.send(Packet::Connect(connect_packet("c1")));
    assert!(h.conn.is_closed());
    let will = closed_will(&h.events()).unwrap().unwrap();
    assert_eq!(will.topic.as_str(), "status/c1");
    assert!(will.retain);
}

#[test]
fn client_only_packets_from_a_client_close_the_connection() {
    for p in [
        Packet::ConnAck(ConnAck::new(false, ConnectReturnCode::Accepted.into())),
        Packet::SubAck(SubAck {
            packet_id: 1,
            reason_codes: vec![],
            properties: SubAckProperties::default(),
        }),
        Packet::UnsubAck(unsuback(1)),
        Packet::PingResp,
    ] {
        let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
        h.send(p);
        assert!(h.conn.is_closed());
    }
}

#[test]
fn connect_timeout_on_virtual_time() {
    let limits = Limits {
        connect_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    assert_eq!(h.conn.poll_timeout(), Some(h.now + Duration::from_secs(10)));
    h.advance(9.9);
    assert!(!h.conn.is_closed());
    h.advance(0.1);
    assert!(h.conn.is_closed());
    assert!(matches!(
        &h.events()[..],
        [Event::Closed {
            reason: CloseReason::ConnectTimeout,
            will: None
        }]
    ));
}

#[test]
fn keep_alive_expires_at_one_and_a_half_times_and_publishes_the_will() {
    let mut c = with_will(connect_packet("c1"));
    c.keep_alive = 10;
    let mut h = Harness::connected(Limits::default(), c);
    h.advance(14.0);
    h.send(Packet::PingReq);
    assert_eq!(h.received(), vec![Packet::PingResp]);
    h.advance(14.9);
    assert!(!h.conn.is_closed(), "the PINGREQ reset the timer");
    h.advance(0.1);
    assert!(h.conn.is_closed());
    let ev = h.events();
    assert!(matches!(
        &ev[..],
        [Event::Closed {
            reason: CloseReason::KeepAliveTimeout,
            ..
        }]
    ));
    assert_eq!(
        closed_will(&ev).unwrap().unwrap().payload,
        Bytes::from_static(b"offline")
    );
}

#[test]
fn keep_alive_zero_never_expires() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    assert_eq!(h.conn.poll_timeout(), None);
    h.advance(1e6);
    assert!(h.conn.is_connected());
}

#[test]
fn disconnect_discards_the_will() {
    let mut h = Harness::connected(Limits::default(), with_will(connect_packet("c1")));
    h.send(Packet::Disconnect(Disconnect::default()));
    assert!(h.conn.is_closed());
    assert!(matches!(
        &h.events()[..],
        [Event::Closed {
            reason: CloseReason::ClientDisconnect,
            will: None
        }]
    ));
}

#[test]
fn transport_loss_and_malformed_input_publish_the_will() {
    let mut h = Harness::connected(Limits::default(), with_will(connect_packet("c1")));
    h.conn.close(CloseReason::TransportClosed);
    assert!(closed_will(&h.events()).unwrap().is_some());

    let mut h = Harness::connected(Limits::default(), with_will(connect_packet("c1")));
    h.send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF]);
    let ev = h.events();
    assert!(matches!(
        &ev[..],
        [Event::Closed {
            reason: CloseReason::Malformed(DecodeError::MalformedRemainingLength),
            ..
        }]
    ));
    assert!(closed_will(&ev).unwrap().is_some());
}

#[test]
fn oversized_packet_closes_the_connection() {
    let limits = Limits {
        max_packet_size: 100,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits, connect_packet("c1"));
    // Only the fixed header of a 200-byte PUBLISH has arrived.
    h.send_raw(&[0x30, 0xC5, 0x01]);
    assert!(h.conn.is_closed());
    assert!(matches!(
        &h.events()[..],
        [Event::Closed {
            reason: CloseReason::Malformed(DecodeError::PacketTooLarge { .. }),
            ..
        }]
    ));
}

#[test]
fn packets_pipelined_after_connect_are_handled_after_accept() {
    let mut h = Harness::new(Limits::default());
    let mut b = BytesMut::new();
    encode(
        &Packet::Connect(connect_packet("c1")),
        ProtocolVersion::V311,
        &mut b,
    )
    .unwrap();
    encode(&Packet::PingReq, ProtocolVersion::V311, &mut b).unwrap();
    h.send_raw(&b);
    assert_eq!(h.events().len(), 1);
    assert!(h.received().is_empty());
    h.conn.accept(Session::new(), false);
    h.conn.handle_bytes(&mut h.inbox, h.now);
    assert_eq!(
        h.received(),
        vec![
            Packet::ConnAck(ConnAck::new(false, ConnectReturnCode::Accepted.into())),
            Packet::PingResp
        ]
    );
}

#[test]
fn qos1_inbound_is_acknowledged_when_the_host_is_done_in_receive_order() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.send(publish(Some(1), QoS::AtLeastOnce, false));
    h.send(publish(Some(2), QoS::AtLeastOnce, false));
    let ev = h.events();
    assert_eq!(ev.len(), 2);
    assert!(h.received().is_empty());
    h.conn.acknowledge(2);
    assert!(h.received().is_empty(), "PUBACK 2 waits for PUBACK 1");
    h.conn.acknowledge(1);
    assert_eq!(
        h.received(),
        vec![
            Packet::PubAck(PubAck::new(1)),
            Packet::PubAck(PubAck::new(2))
        ]
    );
}

#[test]
fn qos2_inbound_is_handed_over_exactly_once() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.send(publish(Some(7), QoS::ExactlyOnce, false));
    assert!(matches!(
        &h.events()[..],
        [Event::Publish {
            packet_id: Some(7),
            ..
        }]
    ));
    h.conn.acknowledge(7);
    assert_eq!(h.received(), vec![Packet::PubRec(PubAck::new(7))]);
    // The client did not see the PUBREC and sends the PUBLISH again.
    h.send(publish(Some(7), QoS::ExactlyOnce, true));
    assert!(h.events().is_empty(), "a duplicate is not routed again");
    assert_eq!(h.received(), vec![Packet::PubRec(PubAck::new(7))]);
    h.send(Packet::PubRel(PubAck::new(7)));
    assert_eq!(h.received(), vec![Packet::PubComp(PubAck::new(7))]);
    // After the release the id is free again: a new message with id 7 is a new message.
    h.send(publish(Some(7), QoS::ExactlyOnce, false));
    assert_eq!(h.events().len(), 1);
}

#[test]
fn qos2_inbound_state_survives_reconnection() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.send(publish(Some(9), QoS::ExactlyOnce, false));
    h.events();
    h.conn.acknowledge(9);
    h.received();
    h.conn.close(CloseReason::TransportClosed);
    let session = h.conn.take_session().unwrap();

    let mut h2 = Harness::new(Limits::default());
    h2.send(Packet::Connect(connect_packet("c1")));
    h2.events();
    h2.conn.accept(session, true);
    h2.received();
    h2.send(publish(Some(9), QoS::ExactlyOnce, true));
    assert!(
        h2.events().is_empty(),
        "the retransmission after reconnect is not routed again"
    );
    assert_eq!(h2.received(), vec![Packet::PubRec(PubAck::new(9))]);
}

#[test]
fn outbound_qos1_and_qos2_flows() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    assert_eq!(
        h.conn
            .deliver(&msg("a", "1", QoS::ExactlyOnce), QoS::AtLeastOnce, false),
        Delivered::Sent
    );
    assert_eq!(
        h.conn
            .deliver(&msg("b", "2", QoS::ExactlyOnce), QoS::ExactlyOnce, true),
        Delivered::Sent
    );
    let sent = h.received();
    let [Packet::Publish(p1), Packet::Publish(p2)] = &sent[..] else {
        panic!("{sent:?}")
    };
    assert_eq!(
        (p1.qos, p1.retain, p1.dup),
        (QoS::AtLeastOnce, false, false)
    );
    assert_eq!((p2.qos, p2.retain), (QoS::ExactlyOnce, true));
    assert_ne!(p1.packet_id, p2.packet_id);
    let (id1, id2) = (p1.packet_id.unwrap(), p2.packet_id.unwrap());
    h.send(Packet::PubAck(PubAck::new(id1)));
    h.send(Packet::PubRec(PubAck::new(id2)));
    assert_eq!(h.received(), vec![Packet::PubRel(PubAck::new(id2))]);
    assert_eq!(h.conn.session().unwrap().inflight.len(), 1);
    h.send(Packet::PubComp(PubAck::new(id2)));
    assert!(h.conn.session().unwrap().inflight.is_empty());
}

#[test]
fn inflight_window_queues_and_releases_in_order() {
    let limits = Limits {
        max_inflight: 2,
        max_queued: 2,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits, connect_packet("c1"));
    let results: Vec<Delivered> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|p| {
            h.conn
                .deliver(&msg("t", p, QoS::AtLeastOnce), QoS::AtLeastOnce, false)
        })
        .collect();
    assert_eq!(
        results,
        vec![
            Delivered::Sent,
            Delivered::Sent,
            Delivered::Queued,
            Delivered::Queued,
            Delivered::Dropped
        ]
    );
    assert_eq!(h.conn.take_stats().dropped, 1);
    let sent = h.received();
    assert_eq!(sent.len(), 2);
    let Packet::Publish(first) = &sent[0] else {
        panic!()
    };
    h.send(Packet::PubAck(PubAck::new(first.packet_id.unwrap())));
    let next = h.received();
    let [Packet::Publish(p3)] = &next[..] else {
        panic!("{next:?}")
    };
    assert_eq!(p3.payload, Bytes::from_static(b"3"));
}

#[test]
fn reconnect_redelivers_inflight_with_dup_and_resends_pubrel() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.conn
        .deliver(&msg("q1", "a", QoS::AtLeastOnce), QoS::AtLeastOnce, false);
    h.conn
        .deliver(&msg("q2", "b", QoS::ExactlyOnce), QoS::ExactlyOnce, false);
    h.conn
        .deliver(&msg("q2", "c", QoS::ExactlyOnce), QoS::ExactlyOnce, false);
    let sent = h.received();
    let ids: Vec<u16> = sent
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.packet_id.unwrap(),
            _ => panic!(),
        })
        .collect();
    h.send(Packet::PubRec(PubAck::new(ids[2])));
    assert_eq!(h.received(), vec![Packet::PubRel(PubAck::new(ids[2]))]);
    h.conn.close(CloseReason::TransportClosed);
    let session = h.conn.take_session().unwrap();

    let mut h2 = Harness::new(Limits::default());
    h2.send(Packet::Connect(connect_packet("c1")));
    h2.events();
    h2.conn.accept(session, true);
    let again = h2.received();
    assert_eq!(
        again[0],
        Packet::ConnAck(ConnAck::new(true, ConnectReturnCode::Accepted.into()))
    );
    let Packet::Publish(r1) = &again[1] else {
        panic!()
    };
    let Packet::Publish(r2) = &again[2] else {
        panic!()
    };
    assert!(r1.dup && r2.dup);
    assert_eq!(
        (r1.packet_id, r1.payload.clone()),
        (Some(ids[0]), Bytes::from_static(b"a"))
    );
    assert_eq!(
        (r2.packet_id, r2.payload.clone()),
        (Some(ids[1]), Bytes::from_static(b"b"))
    );
    assert_eq!(again[3], Packet::PubRel(PubAck::new(ids[2])));
    assert_eq!(again.len(), 4);
}

#[test]
fn packet_ids_skip_ids_in_flight_and_wrap_without_zero() {
    let limits = Limits {
        max_inflight: 3,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits, connect_packet("c1"));
    let mut seen = std::collections::HashSet::new();
    h.conn
        .deliver(&msg("t", "held", QoS::AtLeastOnce), QoS::AtLeastOnce, false);
    let held = match &h.received()[..] {
        [Packet::Publish(p)] => p.packet_id.unwrap(),
        other => panic!("{other:?}"),
    };
    for _ in 0..70_000 {
        h.conn
            .deliver(&msg("t", "x", QoS::AtLeastOnce), QoS::AtLeastOnce, false);
        for p in h.received() {
            let Packet::Publish(p) = p else { panic!() };
            let id = p.packet_id.unwrap();
            assert_ne!(id, 0);
            assert_ne!(id, held, "an id in flight is never reused");
            seen.insert(id);
            h.send(Packet::PubAck(PubAck::new(id)));
        }
    }
    assert_eq!(
        seen.len(),
        65534,
        "every id but 0 and the held one was used"
    );
}

#[test]
fn qos0_deliveries_are_dropped_when_the_transmit_buffer_is_full() {
    let limits = Limits {
        max_transmit_buffer: 100,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits, connect_packet("c1"));
    let big = Message {
        payload: Bytes::from(vec![0u8; 80]),
        ..msg("t", "", QoS::AtMostOnce)
    };
    assert_eq!(
        h.conn.deliver(&big, QoS::AtMostOnce, false),
        Delivered::Sent
    );
    assert_eq!(
        h.conn.deliver(&big, QoS::AtMostOnce, false),
        Delivered::Sent
    );
    assert_eq!(
        h.conn.deliver(&big, QoS::AtMostOnce, false),
        Delivered::Dropped
    );
    h.received();
    assert_eq!(
        h.conn.deliver(&big, QoS::AtMostOnce, false),
        Delivered::Sent
    );
}

#[test]
fn subscribe_and_unsubscribe() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    let sub = Subscribe {
        packet_id: 3,
        filters: vec![
            (s("a/+"), QoS::ExactlyOnce.into()),
            (s("a/#/b"), QoS::AtMostOnce.into()),
        ],
        properties: SubscribeProperties::default(),
    };
    h.send(Packet::Subscribe(sub.clone()));
    let ev = h.events();
    assert_eq!(ev, vec![Event::Subscribe(sub.clone())]);
    assert!(h.received().is_empty());
    h.conn.subscribed(
        &sub,
        vec![
            ReasonCode::granted(QoS::ExactlyOnce),
            ReasonCode::UnspecifiedError,
        ],
    );
    assert_eq!(
        h.received(),
        vec![Packet::SubAck(SubAck {
            packet_id: 3,
            reason_codes: vec![
                ReasonCode::granted(QoS::ExactlyOnce),
                ReasonCode::UnspecifiedError
            ],
            properties: SubAckProperties::default(),
        })]
    );
    assert_eq!(
        h.conn.session().unwrap().subscriptions.get(&s("a/+")),
        Some(&QoS::ExactlyOnce)
    );
    assert_eq!(h.conn.session().unwrap().subscriptions.len(), 1);
    h.send(Packet::Unsubscribe(Unsubscribe {
        packet_id: 4,
        filters: vec![s("a/+")],
        properties: UnsubscribeProperties::default(),
    }));
    assert_eq!(h.received(), vec![Packet::UnsubAck(unsuback(4))]);
    assert_eq!(h.events(), vec![Event::Unsubscribe(vec![s("a/+")])]);
    assert!(h.conn.session().unwrap().subscriptions.is_empty());
}

#[test]
fn nothing_is_delivered_before_connect_or_after_close() {
    let mut h = Harness::new(Limits::default());
    assert_eq!(
        h.conn
            .deliver(&msg("t", "x", QoS::AtMostOnce), QoS::AtMostOnce, false),
        Delivered::Dropped
    );
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.send(Packet::Disconnect(Disconnect::default()));
    assert_eq!(
        h.conn
            .deliver(&msg("t", "x", QoS::AtLeastOnce), QoS::AtLeastOnce, false),
        Delivered::Dropped
    );
    h.send(Packet::PingReq);
    assert!(h.received().is_empty(), "input after close is ignored");
}

#[test]
fn byte_at_a_time_input_is_reassembled() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    let mut b = BytesMut::new();
    encode(
        &publish(Some(5), QoS::AtLeastOnce, false),
        ProtocolVersion::V311,
        &mut b,
    )
    .unwrap();
    for byte in b.iter() {
        h.send_raw(&[*byte]);
    }
    assert_eq!(h.events().len(), 1);
}

#[test]
fn topics_deeper_than_the_limit_are_refused() {
    let limits = Limits {
        max_topic_levels: 4,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits.clone(), connect_packet("c1"));
    assert!(h.conn.filter_acceptable("a/b/c/#"));
    assert!(!h.conn.filter_acceptable("a/b/c/d/#"));
    assert!(!h.conn.filter_acceptable("a/#/b"));
    let deep = |levels: usize| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: s(&vec!["x"; levels].join("/")),
            packet_id: None,
            payload: Bytes::new(),
            properties: PublishProperties::default(),
        })
    };
    h.send(deep(4));
    assert!(matches!(&h.events()[..], [Event::Publish { .. }]));
    h.send(deep(5));
    assert!(h.conn.is_closed());

    let mut h = Harness::new(limits);
    let mut c = with_will(connect_packet("c1"));
    c.will.as_mut().unwrap().topic = s("a/b/c/d/e");
    h.send(Packet::Connect(c));
    assert!(h.conn.is_closed());
    assert!(!h.events().iter().any(|e| matches!(e, Event::Connect(_))));
}

#[test]
fn v5_topic_aliases_are_refused_until_supported() {
    let mut c = connect_packet("c1");
    c.protocol = ProtocolVersion::V5;
    let mut h = Harness::new(Limits::default());
    h.send(Packet::Connect(c));
    assert!(matches!(h.events().as_slice(), [Event::Connect(_)]));
    h.conn.accept(Session::new(), false);
    let mut b = BytesMut::new();
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: s(""),
            packet_id: None,
            payload: Bytes::from_static(b"x"),
            properties: PublishProperties {
                topic_alias: std::num::NonZeroU16::new(1),
                ..PublishProperties::default()
            },
        }),
        ProtocolVersion::V5,
        &mut b,
    )
    .unwrap();
    h.send_raw(&b);
    assert!(h.conn.is_closed());
    assert!(!h
        .events()
        .iter()
        .any(|e| matches!(e, Event::Publish { .. })));
}

/// The session changes a connection reports for a persisted session.
fn session_changes(events: &[Event]) -> Vec<SessionChange> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Session(c) => Some(*c),
            _ => None,
        })
        .collect()
}

fn stored(seq: u64, qos: QoS) -> Delivery<'static> {
    Delivery {
        store_seq: Some(seq),
        ..Delivery::new(qos, false)
    }
}

#[test]
fn stored_messages_report_send_receipt_and_completion_for_the_store() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.conn.track_session_changes(true);
    let now = h.now;
    h.conn.deliver_with(
        &msg("t", "one", QoS::AtLeastOnce),
        stored(10, QoS::AtLeastOnce),
        now,
    );
    h.conn.deliver_with(
        &msg("t", "two", QoS::ExactlyOnce),
        stored(11, QoS::ExactlyOnce),
        now,
    );
    // Not stored: nothing to report.
    h.conn.deliver(
        &msg("t", "three", QoS::AtLeastOnce),
        QoS::AtLeastOnce,
        false,
    );
    let ids: Vec<u16> = h
        .received()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        session_changes(&h.events()),
        vec![
            SessionChange::Sent {
                seq: 10,
                packet_id: ids[0]
            },
            SessionChange::Sent {
                seq: 11,
                packet_id: ids[1]
            },
        ]
    );
    h.send(Packet::PubAck(PubAck::new(ids[0])));
    h.send(Packet::PubRec(PubAck::new(ids[1])));
    h.send(Packet::PubAck(PubAck::new(ids[2])));
    assert_eq!(
        session_changes(&h.events()),
        vec![
            SessionChange::Finished { seq: 10 },
            SessionChange::Received {
                seq: 11,
                packet_id: ids[1]
            },
        ]
    );
    h.send(Packet::PubComp(PubAck::new(ids[1])));
    assert_eq!(
        session_changes(&h.events()),
        vec![SessionChange::Finished { seq: 11 }]
    );
}

#[test]
fn expired_and_dropped_stored_messages_are_reported_finished() {
    let limits = Limits {
        max_inflight: 1,
        max_queued: 1,
        ..Limits::default()
    };
    let mut h = Harness::connected(limits, connect_packet("c1"));
    h.conn.track_session_changes(true);
    let now = h.now;
    let mut expired = msg("t", "old", QoS::AtLeastOnce);
    expired.expires_at = Some(now);
    h.conn
        .deliver_with(&expired, stored(1, QoS::AtLeastOnce), now);
    h.conn.deliver_with(
        &msg("t", "a", QoS::AtLeastOnce),
        stored(2, QoS::AtLeastOnce),
        now,
    );
    h.conn.deliver_with(
        &msg("t", "b", QoS::AtLeastOnce),
        stored(3, QoS::AtLeastOnce),
        now,
    );
    // Window of 1 and queue of 1 are full: this one is dropped.
    h.conn.deliver_with(
        &msg("t", "c", QoS::AtLeastOnce),
        stored(4, QoS::AtLeastOnce),
        now,
    );
    let changes = session_changes(&h.events());
    assert!(
        changes.contains(&SessionChange::Finished { seq: 1 }),
        "{changes:?}"
    );
    assert!(
        changes.contains(&SessionChange::Finished { seq: 4 }),
        "{changes:?}"
    );
    assert!(
        matches!(
            changes[..],
            [
                SessionChange::Finished { seq: 1 },
                SessionChange::Sent { seq: 2, .. },
                SessionChange::Finished { seq: 4 }
            ]
        ),
        "{changes:?}"
    );
}

#[test]
fn released_inbound_qos2_ids_are_reported_and_nothing_without_tracking() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    h.conn.track_session_changes(true);
    h.send(publish(Some(5), QoS::ExactlyOnce, false));
    h.conn.acknowledge(5);
    h.send(Packet::PubRel(PubAck::new(5)));
    assert_eq!(
        session_changes(&h.events()),
        vec![SessionChange::InboundReleased { packet_id: 5 }]
    );

    let mut quiet = Harness::connected(Limits::default(), connect_packet("c2"));
    let now = quiet.now;
    quiet.conn.deliver_with(
        &msg("t", "x", QoS::AtLeastOnce),
        stored(1, QoS::AtLeastOnce),
        now,
    );
    quiet.send(publish(Some(6), QoS::ExactlyOnce, false));
    quiet.conn.acknowledge(6);
    quiet.send(Packet::PubRel(PubAck::new(6)));
    assert!(session_changes(&quiet.events()).is_empty());
}

#[test]
fn an_idle_connection_gives_back_its_queues_and_keeps_working() {
    let mut h = Harness::connected(Limits::default(), connect_packet("c1"));
    assert!(h.conn.transmit().capacity() > 0, "CONNACK was written");
    h.conn.release_idle_memory();
    assert_eq!(h.conn.transmit().capacity(), 0);
    // Traffic after the release allocates again and is answered as before.
    h.send(publish(Some(7), QoS::AtLeastOnce, false));
    assert!(matches!(h.events().as_slice(), [Event::Publish { .. }]));
    h.conn.acknowledge(7);
    assert_eq!(h.received(), vec![Packet::PubAck(PubAck::new(7))]);
    h.conn.release_idle_memory();
    assert_eq!(h.conn.transmit().capacity(), 0);
}
