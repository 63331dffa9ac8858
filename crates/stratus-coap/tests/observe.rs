//! Observe (RFC 7641) on virtual time: registration, notifications with increasing sequence
//! numbers, CON every N and every 24 h, removal on RST, timeout and deregistration, in-flight
//! replacement, and the client-side freshness rule.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stratus_coap::observe::{is_newer, next_sequence};
use stratus_coap::*;

mod common;
use common::*;

fn observe_get(mid: u16, token: Token, path: &str, value: u32) -> Message {
    let mut m = con_get(mid, token, path);
    m.options.set_observe(value);
    m
}

fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config {
        separate_response_after: None,
        ..Config::default()
    };
    f(&mut c);
    c
}

/// Registers `token` from `p` on `/config`; returns the Observe value of the first response.
fn register(h: &mut Harness, p: SocketAddr, mid: u16, token: Token) -> u32 {
    h.recv(p, &observe_get(mid, token, "/config", 0));
    let (ex, req) = h.request();
    assert_eq!(req.options.observe().unwrap(), Some(0));
    h.ep.respond(
        h.now,
        ex,
        Response::new(Code::CONTENT)
            .with_payload(&b"v0"[..])
            .observing(),
    )
    .unwrap();
    let (_, resp) = h.sent_one();
    assert_eq!(resp.message_type, MessageType::Acknowledgement);
    resp.options
        .observe()
        .unwrap()
        .expect("registration acknowledged with Observe")
}

fn notify(h: &mut Harness, body: &'static [u8]) -> usize {
    h.ep.notify(
        h.now,
        "/config",
        Response::new(Code::CONTENT).with_payload(Bytes::from_static(body)),
    )
}

#[test]
fn register_and_notify_with_increasing_sequence_numbers() {
    let mut h = Harness::new(config(|_| {}));
    let first = register(&mut h, peer(1), 1, tok(1));
    assert_eq!(h.ep.observer_count(), 1);
    let mut last = first;
    for i in 0..5 {
        h.advance(1.0);
        assert_eq!(notify(&mut h, b"v"), 1);
        let (to, n) = h.sent_one();
        assert_eq!(to, peer(1));
        assert_eq!(
            n.message_type,
            MessageType::NonConfirmable,
            "notification {i}"
        );
        assert_eq!(n.token, tok(1));
        assert_eq!(n.code, Code::CONTENT);
        let seq = n.options.observe().unwrap().unwrap();
        assert_eq!(seq, next_sequence(last));
        last = seq;
    }
    // Other resources have no observers.
    assert_eq!(
        h.ep.notify(h.now, "/other", Response::new(Code::CONTENT)),
        0
    );
    assert!(h.sent().is_empty());
}

#[test]
fn response_without_observe_does_not_register() {
    let mut h = Harness::new(config(|_| {}));
    h.recv(peer(1), &observe_get(1, tok(1), "/config", 0));
    let (ex, _) = h.request();
    h.respond(ex, b"no observe");
    let (_, resp) = h.sent_one();
    assert_eq!(resp.options.observe().unwrap(), None);
    assert_eq!(h.ep.observer_count(), 0);
    // An error response does not register even when it carries Observe.
    h.recv(peer(1), &observe_get(2, tok(2), "/config", 0));
    let (ex, _) = h.request();
    h.ep.respond(h.now, ex, Response::new(Code::NOT_FOUND).observing())
        .unwrap();
    let (_, resp) = h.sent_one();
    assert_eq!(resp.options.observe().unwrap(), None);
    assert_eq!(h.ep.observer_count(), 0);
    // Observe in a response to a plain GET is stripped.
    h.recv(peer(1), &con_get(3, tok(3), "/config"));
    let (ex, _) = h.request();
    h.ep.respond(h.now, ex, Response::new(Code::CONTENT).observing())
        .unwrap();
    assert_eq!(h.sent_one().1.options.observe().unwrap(), None);
    assert_eq!(h.ep.observer_count(), 0);
}

#[test]
fn deregister_with_observe_1() {
    let mut h = Harness::new(config(|_| {}));
    register(&mut h, peer(1), 1, tok(1));
    h.recv(peer(1), &observe_get(2, tok(1), "/config", 1));
    let events = h.events();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0],
        Event::ObserveCancelled {
            peer: peer(1),
            token: tok(1),
            resource: "/config".into(),
            reason: CancelReason::Deregistered
        }
    );
    assert!(
        matches!(&events[1], Event::Request { .. }),
        "the GET is still served"
    );
    assert_eq!(h.ep.observer_count(), 0);
    assert_eq!(notify(&mut h, b"x"), 0);
}

#[test]
fn rst_to_non_notification_removes_observer() {
    let mut h = Harness::new(config(|_| {}));
    register(&mut h, peer(1), 1, tok(1));
    register(&mut h, peer(2), 1, tok(2));
    assert_eq!(notify(&mut h, b"x"), 2);
    let sent = h.sent();
    let to_peer1 = sent.iter().find(|(p, _)| *p == peer(1)).unwrap();
    h.recv(peer(1), &rst(to_peer1.1.message_id));
    assert_eq!(
        h.events(),
        vec![Event::ObserveCancelled {
            peer: peer(1),
            token: tok(1),
            resource: "/config".into(),
            reason: CancelReason::Reset
        }]
    );
    assert_eq!(notify(&mut h, b"y"), 1);
    assert_eq!(h.sent_one().0, peer(2));
}

#[test]
fn every_nth_notification_is_confirmable() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 3));
    register(&mut h, peer(1), 1, tok(1));
    let mut kinds = vec![];
    for _ in 0..7 {
        notify(&mut h, b"x");
        let (_, n) = h.sent_one();
        if n.message_type == MessageType::Confirmable {
            h.recv(peer(1), &ack(n.message_id));
        }
        kinds.push(n.message_type);
    }
    use MessageType::{Confirmable as C, NonConfirmable as N};
    assert_eq!(kinds, vec![N, N, C, N, N, C, N]);
}

#[test]
fn notification_is_confirmable_after_24_hours() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 1000));
    register(&mut h, peer(1), 1, tok(1));
    h.advance(3600.0);
    notify(&mut h, b"x");
    assert_eq!(h.sent_one().1.message_type, MessageType::NonConfirmable);
    h.advance(23.0 * 3600.0);
    notify(&mut h, b"x");
    let (_, n) = h.sent_one();
    assert_eq!(n.message_type, MessageType::Confirmable);
    h.recv(peer(1), &ack(n.message_id));
    notify(&mut h, b"x");
    assert_eq!(h.sent_one().1.message_type, MessageType::NonConfirmable);
}

#[test]
fn unacknowledged_con_notification_removes_observer() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 1));
    register(&mut h, peer(1), 1, tok(1));
    notify(&mut h, b"x");
    let (_, n) = h.sent_one();
    assert_eq!(n.message_type, MessageType::Confirmable);
    while h.advance_to_timeout() {}
    assert_eq!(h.sent().len(), 4, "four retransmissions");
    assert_eq!(
        h.events(),
        vec![Event::ObserveCancelled {
            peer: peer(1),
            token: tok(1),
            resource: "/config".into(),
            reason: CancelReason::Timeout
        }]
    );
    assert_eq!(h.ep.observer_count(), 0);
}

#[test]
fn rst_to_con_notification_removes_observer() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 1));
    register(&mut h, peer(1), 1, tok(1));
    notify(&mut h, b"x");
    let (_, n) = h.sent_one();
    h.recv(peer(1), &rst(n.message_id));
    assert!(matches!(
        h.events().as_slice(),
        [Event::ObserveCancelled {
            reason: CancelReason::Reset,
            ..
        }]
    ));
    h.advance(100.0);
    assert!(h.sent().is_empty());
}

#[test]
fn newer_notification_replaces_one_in_flight() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 1));
    register(&mut h, peer(1), 1, tok(1));
    notify(&mut h, b"old");
    let (_, old) = h.sent_one();
    h.advance(2.5); // past the first timeout at most: maybe one retransmission
    let _ = h.sent();
    notify(&mut h, b"new");
    let (_, new) = h.sent_one();
    assert_eq!(&new.payload[..], b"new");
    assert_ne!(new.message_id, old.message_id);
    assert!(new.options.observe().unwrap() > old.options.observe().unwrap());
    // Retransmissions carry the new state.
    h.advance(10.0);
    for (_, m) in h.sent() {
        assert_eq!(&m.payload[..], b"new");
    }
    // An ACK of the replaced message still counts.
    h.recv(peer(1), &ack(old.message_id));
    h.advance(100.0);
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    assert_eq!(h.ep.observer_count(), 1);
}

#[test]
fn non_notification_behind_a_con_one_replaces_it() {
    let mut h = Harness::new(config(|c| c.observe_con_every = 2));
    register(&mut h, peer(1), 1, tok(1));
    notify(&mut h, b"1");
    assert_eq!(h.sent_one().1.message_type, MessageType::NonConfirmable);
    notify(&mut h, b"2");
    let (_, con) = h.sent_one();
    assert_eq!(con.message_type, MessageType::Confirmable);
    // The third would be NON, but a CON one is in flight: it takes its place, reliably.
    notify(&mut h, b"3");
    let (_, third) = h.sent_one();
    assert_eq!(third.message_type, MessageType::Confirmable);
    assert_eq!(&third.payload[..], b"3");
}

#[test]
fn error_notification_ends_the_observation() {
    let mut h = Harness::new(config(|_| {}));
    register(&mut h, peer(1), 1, tok(1));
    assert_eq!(
        h.ep.notify(h.now, "/config", Response::new(Code::NOT_FOUND)),
        1
    );
    let (_, n) = h.sent_one();
    assert_eq!(n.code, Code::NOT_FOUND);
    assert_eq!(n.options.observe().unwrap(), None);
    assert_eq!(h.ep.observer_count(), 0);
}

#[test]
fn reregistration_keeps_one_observer_with_increasing_numbers() {
    let mut h = Harness::new(config(|_| {}));
    let a = register(&mut h, peer(1), 1, tok(1));
    let b = register(&mut h, peer(1), 2, tok(1));
    assert_eq!(b, next_sequence(a));
    assert_eq!(h.ep.observer_count(), 1);
    // Same token from another peer is another observer.
    register(&mut h, peer(2), 3, tok(1));
    assert_eq!(h.ep.observer_count(), 2);
}

#[test]
fn observer_cap_refuses_registration() {
    let mut h = Harness::new(config(|c| c.max_observers = 1));
    register(&mut h, peer(1), 1, tok(1));
    h.recv(peer(2), &observe_get(2, tok(2), "/config", 0));
    let (ex, _) = h.request();
    h.ep.respond(h.now, ex, Response::new(Code::CONTENT).observing())
        .unwrap();
    assert_eq!(h.sent_one().1.options.observe().unwrap(), None);
    assert_eq!(h.ep.observer_count(), 1);
}

#[test]
fn per_observer_notifications_and_listing() {
    let mut h = Harness::new(config(|_| {}));
    let mut get = observe_get(1, tok(1), "/config", 0);
    get.options.add_uri_query("token=abc");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.ep.respond(h.now, ex, Response::new(Code::CONTENT).observing())
        .unwrap();
    h.sent();
    register(&mut h, peer(2), 2, tok(2));
    let mut obs = h.ep.observers("/config");
    obs.sort_by_key(|o| o.peer);
    assert_eq!(obs.len(), 2);
    assert_eq!(obs[0].queries, vec!["token=abc".to_string()]);
    assert_eq!(obs[0].resource, "/config");
    h.ep.notify_observer(
        h.now,
        peer(2),
        tok(2),
        Response::new(Code::CONTENT).with_payload(&b"only you"[..]),
    )
    .unwrap();
    let (to, n) = h.sent_one();
    assert_eq!((to, &n.payload[..]), (peer(2), &b"only you"[..]));
    assert_eq!(
        h.ep.notify_observer(h.now, peer(3), tok(2), Response::new(Code::CONTENT)),
        Err(NotifyError::NotObserving)
    );
    assert!(h.ep.cancel_observer(peer(2), tok(2)));
    assert_eq!(h.ep.observer_count(), 1);
}

#[test]
fn client_observation_delivers_every_notification() {
    let mut h = Harness::new(config(|_| {}));
    let mut r = Request::get("/config");
    r.options.set_observe(0);
    let id = h.ep.send_request(h.now, peer(9), r).unwrap();
    let (_, sent) = h.sent_one();
    let mut first = Message::new(MessageType::Acknowledgement, Code::CONTENT, sent.message_id)
        .with_token(sent.token);
    first.options.set_observe(5);
    h.recv(peer(9), &first);
    let mut notif =
        Message::new(MessageType::NonConfirmable, Code::CONTENT, 900).with_token(sent.token);
    notif.options.set_observe(6);
    h.recv(peer(9), &notif);
    let events = h.events();
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| matches!(e, Event::Response { request, .. } if *request == id)));
    // After cancelling, the next notification is rejected with RST.
    assert!(h.ep.cancel_request(id));
    notif.message_id = 901;
    notif.options.set_observe(7);
    h.recv(peer(9), &notif);
    assert_eq!(h.sent_one().1, rst(901));
    assert!(h.events().is_empty());
}

#[test]
fn freshness_rule_of_rfc7641_section_3_4() {
    let t = Instant::now();
    let later = t + Duration::from_secs(1);
    // Plain increase and decrease.
    assert!(is_newer(1, t, 2, later));
    assert!(!is_newer(2, t, 1, later));
    assert!(!is_newer(5, t, 5, later));
    // Wrap-around: a small number after a large one is newer within half the space.
    assert!(is_newer(0xff_fff0, t, 3, later));
    assert!(!is_newer(3, t, 0xff_fff0, later));
    // Exactly half the space apart: neither rule holds.
    assert!(!is_newer(0, t, 1 << 23, later));
    assert!(!is_newer(1 << 23, t, 0, later));
    assert!(is_newer(0, t, (1 << 23) - 1, later));
    assert!(is_newer((1 << 23) + 1, t, 0, later));
    // After 128 s anything is newer.
    assert!(!is_newer(10, t, 9, t + Duration::from_secs(128)));
    assert!(is_newer(10, t, 9, t + Duration::from_millis(128_001)));
    // Times going backwards never make something newer.
    assert!(!is_newer(10, later, 9, t));
    assert_eq!(next_sequence((1 << 24) - 1), 0);
}
