//! The message layer on virtual time: piggybacked and separate responses, deduplication,
//! retransmission with back-off, NSTART, rejection of malformed input, option checks, bounds,
//! and the client role.

use std::time::Duration;

use bytes::Bytes;
use stratus_coap::*;

mod common;
use common::*;

#[test]
fn con_request_gets_piggybacked_response() {
    let mut h = Harness::manual();
    h.recv(peer(1), &con_get(0x1001, tok(1), "/temperature"));
    let (ex, req) = h.request();
    assert_eq!(req.code, Code::GET);
    assert_eq!(req.options.uri_path_string().unwrap(), "/temperature");
    assert_eq!(h.ep.pending_requests(), 1);
    assert!(
        h.sent().is_empty(),
        "nothing is sent before the application answers"
    );
    h.respond(ex, b"22.3 C");
    let (to, resp) = h.sent_one();
    assert_eq!(to, peer(1));
    assert_eq!(resp.message_type, MessageType::Acknowledgement);
    assert_eq!(resp.message_id, 0x1001);
    assert_eq!(resp.token, tok(1));
    assert_eq!(resp.code, Code::CONTENT);
    assert_eq!(&resp.payload[..], b"22.3 C");
    assert_eq!(h.ep.pending_requests(), 0);
    // Answering twice is refused.
    assert_eq!(
        h.ep.respond(h.now, ex, Response::new(Code::CONTENT)),
        Err(RespondError::UnknownExchange)
    );
}

#[test]
fn retransmitted_con_gets_identical_response_and_one_event() {
    let mut h = Harness::manual();
    let get = con_get(0x2002, tok(2), "/x");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.respond(ex, b"v1");
    let first = h.sent_raw();
    assert_eq!(first.len(), 1);
    for _ in 0..3 {
        h.advance(2.5);
        h.recv(peer(1), &get);
        let again = h.sent_raw();
        assert_eq!(again, first, "the cached reply is re-sent byte for byte");
        assert!(h.events().is_empty(), "the request is delivered once");
    }
    assert_eq!(h.ep.stats().duplicates, 3);
    assert_eq!(h.ep.stats().requests, 1);
    // The same message ID from another peer is a different message.
    h.recv(peer(2), &get);
    let _ = h.request();
}

#[test]
fn dedup_entry_expires_after_exchange_lifetime() {
    let mut h = Harness::manual();
    let get = con_get(7, tok(3), "/x");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.respond(ex, b"a");
    h.sent();
    h.advance(246.0);
    h.recv(peer(1), &get);
    assert_eq!(h.sent().len(), 1);
    assert!(h.events().is_empty());
    h.advance(1.5);
    h.recv(peer(1), &get);
    let _ = h.request(); // remembered no longer: a new request
}

#[test]
fn non_request_gets_non_response_and_duplicates_are_ignored() {
    let mut h = Harness::manual();
    let get = req(MessageType::NonConfirmable, Code::GET, 0x3003, tok(4), "/x");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.recv(peer(1), &get);
    assert!(h.events().is_empty());
    assert!(h.sent().is_empty());
    h.respond(ex, b"n");
    let (_, resp) = h.sent_one();
    assert_eq!(resp.message_type, MessageType::NonConfirmable);
    assert_ne!(resp.message_id, 0x3003);
    assert_eq!(resp.token, tok(4));
    // NON dedup lasts NON_LIFETIME (145 s).
    h.advance(144.0);
    h.recv(peer(1), &get);
    assert!(h.events().is_empty());
    h.advance(2.0);
    h.recv(peer(1), &get);
    let _ = h.request();
}

#[test]
fn separate_response_after_defer() {
    let mut h = Harness::manual();
    let get = con_get(0x4004, tok(5), "/slow");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.ep.defer(h.now, ex).unwrap();
    let (_, empty) = h.sent_one();
    assert_eq!(empty, ack(0x4004));
    // A retransmission of the request now gets the empty ACK again, not a new event.
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1, ack(0x4004));
    assert!(h.events().is_empty());
    h.advance(10.0);
    h.respond(ex, b"done");
    let (_, resp) = h.sent_one();
    assert_eq!(resp.message_type, MessageType::Confirmable);
    assert_eq!(resp.token, tok(5));
    assert_ne!(resp.message_id, 0x4004);
    assert_eq!(&resp.payload[..], b"done");
    // Retransmitted until acknowledged.
    h.advance(3.01);
    assert_eq!(h.sent_one().1, resp);
    h.recv(peer(1), &ack(resp.message_id));
    h.advance(100.0);
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    assert_eq!(h.ep.poll_timeout(), None, "nothing left to do");
}

#[test]
fn separate_response_when_application_is_slow() {
    let mut h = Harness::new(Config::default()); // separate_response_after = 1 s
    h.recv(peer(1), &con_get(0x5005, tok(6), "/slow"));
    let (ex, _) = h.request();
    h.advance(0.9);
    assert!(h.sent().is_empty());
    h.advance(0.2);
    assert_eq!(h.sent_one().1, ack(0x5005));
    h.respond(ex, b"late");
    let (_, resp) = h.sent_one();
    assert_eq!(resp.message_type, MessageType::Confirmable);
    assert_eq!(resp.code, Code::CONTENT);
}

#[test]
fn duplicate_while_pending_switches_to_separate_response() {
    let mut h = Harness::manual();
    let get = con_get(0x6006, tok(7), "/x");
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.advance(2.5);
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1, ack(0x6006));
    assert!(h.events().is_empty());
    h.respond(ex, b"r");
    assert_eq!(h.sent_one().1.message_type, MessageType::Confirmable);
}

#[test]
fn retransmission_backs_off_exponentially_then_fails() {
    let mut h = Harness::manual();
    h.recv(peer(1), &con_get(1, tok(8), "/x"));
    let (ex, _) = h.request();
    h.ep.defer(h.now, ex).unwrap();
    h.sent();
    h.respond(ex, b"r");
    let (_, first) = h.sent_one();
    let t0 = h.elapsed();
    let mut times = vec![];
    while h.advance_to_timeout() {
        let sent = h.sent();
        if sent.is_empty() {
            break;
        }
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, first, "retransmissions are identical");
        times.push(h.elapsed() - t0);
    }
    assert_eq!(times.len(), 4, "MAX_RETRANSMIT = 4: {times:?}");
    let initial = times[0];
    assert!(
        (2.0..=3.0).contains(&initial),
        "initial timeout in [2, 3] s: {initial}"
    );
    for (i, t) in times.iter().enumerate() {
        let expected = initial * ((1 << (i + 1)) - 1) as f64;
        assert!(
            (t - expected).abs() < 1e-6,
            "send {i} at {t}, expected {expected}"
        );
    }
    assert_eq!(h.ep.stats().retransmissions, 4);
    // The failure comes after the last timeout (16 × initial after the last send).
    let fail_at = h.elapsed() - t0;
    assert!((fail_at - initial * 31.0).abs() < 1e-6);
    assert_eq!(
        h.events(),
        vec![Event::DeliveryFailed {
            peer: peer(1),
            token: tok(8),
            reason: FailureReason::Timeout
        }]
    );
    assert_eq!(h.ep.stats().timeouts, 1);
}

#[test]
fn jitter_differs_between_seeds_and_respects_the_factor() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..20 {
        let mut h = Harness::manual();
        h.ep = Endpoint::new(
            Config {
                separate_response_after: None,
                ..Config::default()
            },
            seed,
        )
        .unwrap();
        h.recv(peer(1), &con_get(1, tok(8), "/x"));
        let (ex, _) = h.request();
        h.ep.defer(h.now, ex).unwrap();
        h.respond(ex, b"r");
        h.sent();
        let first = h.ep.poll_timeout().unwrap() - h.now;
        assert!(first >= Duration::from_secs(2) && first <= Duration::from_secs(3));
        seen.insert(first);
    }
    assert!(seen.len() > 10, "timeouts are randomised");
}

#[test]
fn rst_to_separate_response_fails_delivery() {
    let mut h = Harness::manual();
    h.recv(peer(1), &con_get(1, tok(9), "/x"));
    let (ex, _) = h.request();
    h.ep.defer(h.now, ex).unwrap();
    h.sent();
    h.respond(ex, b"r");
    let (_, resp) = h.sent_one();
    h.recv(peer(1), &rst(resp.message_id));
    assert_eq!(
        h.events(),
        vec![Event::DeliveryFailed {
            peer: peer(1),
            token: tok(9),
            reason: FailureReason::Reset
        }]
    );
    h.advance(100.0);
    assert!(h.sent().is_empty(), "no retransmission after RST");
}

#[test]
fn nstart_queues_cons_per_peer() {
    let mut h = Harness::manual();
    let mut exchanges = vec![];
    for (i, p) in [(1u16, 1u16), (2, 1), (3, 2)] {
        h.recv(peer(p), &con_get(i, tok(u64::from(i)), "/x"));
        let (ex, _) = h.request();
        h.ep.defer(h.now, ex).unwrap();
        exchanges.push(ex);
    }
    h.sent();
    for ex in &exchanges {
        h.respond(*ex, b"r");
    }
    let sent = h.sent();
    // Peer 1's second CON waits; peer 2 is not blocked by peer 1.
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].0, sent[0].1.token), (peer(1), tok(1)));
    assert_eq!((sent[1].0, sent[1].1.token), (peer(2), tok(3)));
    // A retransmission of the first does not release the second.
    h.advance(3.1);
    let again = h.sent();
    assert!(again.iter().all(|(_, m)| m.token != tok(2)));
    // The ACK does.
    h.recv(peer(1), &ack(sent[0].1.message_id));
    let (to, next) = h.sent_one();
    assert_eq!(
        (to, next.token, next.message_type),
        (peer(1), tok(2), MessageType::Confirmable)
    );
}

#[test]
fn nstart_queue_is_bounded() {
    let mut h = Harness::new(Config {
        separate_response_after: None,
        max_queued_per_peer: 2,
        ..Config::default()
    });
    let mut exchanges = vec![];
    for i in 1..=4u16 {
        h.recv(peer(1), &con_get(i, tok(u64::from(i)), "/x"));
        let (ex, _) = h.request();
        h.ep.defer(h.now, ex).unwrap();
        exchanges.push(ex);
    }
    h.sent();
    for ex in exchanges {
        h.respond(ex, b"r");
    }
    // One in flight, two queued, the oldest queued (token 2) dropped.
    assert_eq!(
        h.events(),
        vec![Event::DeliveryFailed {
            peer: peer(1),
            token: tok(2),
            reason: FailureReason::Evicted
        }]
    );
}

#[test]
fn malformed_con_gets_rst_and_other_malformed_input_is_ignored() {
    let mut h = Harness::manual();
    // CON with token length 9: RST with its message ID.
    h.recv_raw(
        peer(1),
        &[0x49, 0x01, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    assert_eq!(h.sent_one().1, rst(0xbeef));
    // CON with a payload marker and no payload.
    h.recv_raw(peer(1), &[0x40, 0x01, 0x00, 0x02, 0xff]);
    assert_eq!(h.sent_one().1, rst(2));
    // CON with reserved option nibble.
    h.recv_raw(peer(1), &[0x40, 0x01, 0x00, 0x03, 0xf1, 0x00]);
    assert_eq!(h.sent_one().1, rst(3));
    // The same errors in NON, ACK and RST: ignored.
    h.recv_raw(
        peer(1),
        &[0x59, 0x01, 0x00, 0x04, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    h.recv_raw(peer(1), &[0x60, 0x45, 0x00, 0x05, 0xff]);
    h.recv_raw(peer(1), &[0x70, 0x00, 0x00, 0x06, 0x01]);
    // Other versions and runts: ignored.
    h.recv_raw(peer(1), &[0x80, 0x01, 0x00, 0x07]);
    h.recv_raw(peer(1), &[0x00, 0x01, 0x00, 0x08, 0xff]);
    h.recv_raw(peer(1), &[0x40, 0x01]);
    h.recv_raw(peer(1), &[]);
    // An empty NON and a request in an ACK: format errors, ignored.
    h.recv_raw(peer(1), &[0x50, 0x00, 0x00, 0x09]);
    h.recv(
        peer(1),
        &req(MessageType::Acknowledgement, Code::GET, 10, tok(1), "/x"),
    );
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    assert_eq!(h.ep.stats().malformed, 12);
    assert_eq!(h.ep.stats().resets_sent, 3);
}

#[test]
fn ping_gets_rst() {
    let mut h = Harness::manual();
    h.recv(peer(1), &Message::empty(MessageType::Confirmable, 0x0bad));
    assert_eq!(h.sent_one().1, rst(0x0bad));
    assert!(h.events().is_empty());
}

#[test]
fn reserved_code_class_con_is_rejected() {
    let mut h = Harness::manual();
    h.recv(
        peer(1),
        &Message::new(MessageType::Confirmable, Code::new(7, 1).unwrap(), 77),
    );
    assert_eq!(h.sent_one().1, rst(77));
    h.recv(
        peer(1),
        &Message::new(MessageType::NonConfirmable, Code::new(1, 1).unwrap(), 78),
    );
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
}

#[test]
fn unrecognized_critical_option_gets_bad_option() {
    let mut h = Harness::manual();
    let mut get = con_get(0x11, tok(1), "/x");
    get.options.push(9u16, Bytes::from_static(b"?")); // unknown, odd: critical
    h.recv(peer(1), &get);
    let (_, resp) = h.sent_one();
    assert_eq!(resp.message_type, MessageType::Acknowledgement);
    assert_eq!(resp.code, Code::BAD_OPTION);
    assert_eq!(resp.message_id, 0x11);
    assert_eq!(resp.token, tok(1));
    assert!(h.events().is_empty());
    // The duplicate gets the same 4.02.
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1, resp);
    // In a NON request it is rejected silently.
    let mut non = req(MessageType::NonConfirmable, Code::GET, 0x12, tok(2), "/x");
    non.options.push(2049u16, Bytes::new());
    h.recv(peer(1), &non);
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    assert_eq!(h.ep.stats().bad_options, 2);
}

#[test]
fn invalid_or_repeated_known_options_count_as_unrecognized() {
    let mut h = Harness::manual();
    // Uri-Host (3, critical) twice: the second is unrecognized → 4.02.
    let mut get = con_get(1, tok(1), "/x");
    get.options
        .push(OptionNumber::URI_HOST, Bytes::from_static(b"a"));
    get.options
        .push(OptionNumber::URI_HOST, Bytes::from_static(b"b"));
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1.code, Code::BAD_OPTION);
    // Uri-Path (11, critical) that is not UTF-8 → 4.02.
    let mut get = con_get(2, tok(2), "/");
    get.options
        .push(OptionNumber::URI_PATH, Bytes::from_static(&[0xff]));
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1.code, Code::BAD_OPTION);
    // Elective problems are dropped silently: an unknown elective option, an ETag that is
    // too long, a repeated Content-Format. The request arrives without them.
    let mut put = req(MessageType::Confirmable, Code::PUT, 3, tok(3), "/x");
    put.options.push(1000u16, Bytes::from_static(b"e"));
    put.options
        .push(OptionNumber::ETAG, Bytes::from_static(b"123456789"));
    put.options
        .push(OptionNumber::CONTENT_FORMAT, Bytes::from_static(&[50]));
    put.options
        .push(OptionNumber::CONTENT_FORMAT, Bytes::from_static(&[60]));
    h.recv(peer(1), &put);
    let (_, got) = h.request();
    assert!(!got.options.contains(1000u16));
    assert!(got.options.etag().is_none());
    assert_eq!(
        got.options.content_format().unwrap(),
        Some(ContentFormat::JSON)
    );
    assert_eq!(got.options.get_all(OptionNumber::CONTENT_FORMAT).count(), 1);
}

#[test]
fn proxy_requests_and_unknown_methods_are_answered_by_the_endpoint() {
    let mut h = Harness::manual();
    let mut get = con_get(1, tok(1), "/");
    get.options.set_proxy_uri("coap://elsewhere/x");
    h.recv(peer(1), &get);
    assert_eq!(h.sent_one().1.code, Code::PROXYING_NOT_SUPPORTED);
    h.recv(
        peer(1),
        &req(MessageType::Confirmable, Code(0x09), 2, tok(2), "/x"),
    );
    assert_eq!(h.sent_one().1.code, Code::METHOD_NOT_ALLOWED);
    assert!(h.events().is_empty());
}

#[test]
fn oversized_body_gets_4_13_with_size1() {
    let mut h = Harness::new(Config {
        max_body_size: 100,
        separate_response_after: None,
        ..Config::default()
    });
    let post = req(
        MessageType::Confirmable,
        Code::POST,
        1,
        tok(1),
        "/telemetry",
    )
    .with_payload(vec![b'x'; 101]);
    h.recv(peer(1), &post);
    let (_, resp) = h.sent_one();
    assert_eq!(resp.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(resp.options.size1().unwrap(), Some(100));
    let ok = req(
        MessageType::Confirmable,
        Code::POST,
        2,
        tok(2),
        "/telemetry",
    )
    .with_payload(vec![b'x'; 100]);
    h.recv(peer(1), &ok);
    assert_eq!(h.request().1.payload.len(), 100);
}

#[test]
fn too_many_pending_requests_get_5_03() {
    let mut h = Harness::new(Config {
        max_pending_requests: 2,
        separate_response_after: None,
        ..Config::default()
    });
    for i in 1..=2 {
        h.recv(peer(1), &con_get(i, tok(u64::from(i)), "/x"));
    }
    assert_eq!(h.events().len(), 2);
    h.recv(peer(1), &con_get(3, tok(3), "/x"));
    assert_eq!(h.sent_one().1.code, Code::SERVICE_UNAVAILABLE);
    assert!(h.events().is_empty());
    assert_eq!(h.ep.stats().overload, 1);
}

#[test]
fn unanswered_exchange_expires() {
    let mut h = Harness::manual();
    h.recv(peer(1), &con_get(1, tok(1), "/x"));
    let (ex, _) = h.request();
    assert_eq!(h.ep.poll_timeout(), Some(h.now + Duration::from_secs(247)));
    h.advance(247.0);
    assert_eq!(h.ep.pending_requests(), 0);
    assert_eq!(h.ep.stats().exchanges_expired, 1);
    assert_eq!(
        h.ep.respond(h.now, ex, Response::new(Code::CONTENT)),
        Err(RespondError::UnknownExchange)
    );
    assert_eq!(h.ep.defer(h.now, ex), Err(RespondError::UnknownExchange));
    assert_eq!(h.ep.poll_timeout(), None);
}

#[test]
fn dedup_cache_is_bounded() {
    let mut h = Harness::new(Config {
        max_dedup_entries: 4,
        separate_response_after: None,
        ..Config::default()
    });
    for i in 0..6u16 {
        let get = req(MessageType::NonConfirmable, Code::GET, i, tok(1), "/x");
        h.recv(peer(1), &get);
    }
    assert_eq!(h.events().len(), 6);
    assert_eq!(h.ep.stats().evictions, 2);
    // The two oldest were forgotten: their duplicates are new requests again.
    h.recv(
        peer(1),
        &req(MessageType::NonConfirmable, Code::GET, 0, tok(1), "/x"),
    );
    assert_eq!(h.events().len(), 1);
    h.recv(
        peer(1),
        &req(MessageType::NonConfirmable, Code::GET, 5, tok(1), "/x"),
    );
    assert!(h.events().is_empty());
}

#[test]
fn peer_table_is_bounded() {
    let mut h = Harness::new(Config {
        max_peers: 2,
        separate_response_after: None,
        ..Config::default()
    });
    for p in 1..=3u16 {
        h.recv(peer(p), &con_get(p, tok(u64::from(p)), "/x"));
        let (ex, _) = h.request();
        h.ep.defer(h.now, ex).unwrap();
        h.advance(1.0);
        h.respond(ex, b"r");
    }
    // Three peers with CONs in flight, room for two: the least recently used one is evicted.
    assert_eq!(
        h.events(),
        vec![Event::DeliveryFailed {
            peer: peer(1),
            token: tok(1),
            reason: FailureReason::Evicted
        }]
    );
}

#[test]
fn unmatched_ack_and_rst_are_counted_and_ignored() {
    let mut h = Harness::manual();
    h.recv(peer(1), &ack(42));
    h.recv(peer(1), &rst(43));
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    assert_eq!(h.ep.stats().unmatched, 2);
}

#[test]
fn config_is_validated() {
    for bad in [
        Config {
            ack_random_factor: 0.5,
            ..Config::default()
        },
        Config {
            ack_random_factor: f64::NAN,
            ..Config::default()
        },
        Config {
            nstart: 0,
            ..Config::default()
        },
        Config {
            block_szx: 7,
            ..Config::default()
        },
        Config {
            token_length: 9,
            ..Config::default()
        },
        Config {
            observe_con_every: 0,
            ..Config::default()
        },
    ] {
        assert!(matches!(
            Endpoint::new(bad, 1),
            Err(ConfigError::Invalid(_))
        ));
    }
    assert_eq!(
        Config::default().exchange_lifetime,
        Duration::from_secs(247)
    );
    assert_eq!(Config::default().non_lifetime, Duration::from_secs(145));
    assert_eq!(Config::default().max_retransmit, 4);
    assert_eq!(Config::default().nstart, 1);
}

// ---------------------------------------------------------------- client role

#[test]
fn client_request_with_piggybacked_response() {
    let mut h = Harness::manual();
    let id =
        h.ep.send_request(h.now, peer(9), Request::get("/sensors/t"))
            .unwrap();
    let (to, sent) = h.sent_one();
    assert_eq!(to, peer(9));
    assert_eq!(sent.message_type, MessageType::Confirmable);
    assert_eq!(sent.token.len(), 8);
    assert_eq!(sent.options.uri_path_string().unwrap(), "/sensors/t");
    let mut resp = Message::new(MessageType::Acknowledgement, Code::CONTENT, sent.message_id)
        .with_token(sent.token)
        .with_payload(&b"21"[..]);
    resp.options.set_content_format(ContentFormat::TEXT_PLAIN);
    h.recv(peer(9), &resp);
    assert_eq!(
        h.events(),
        vec![Event::Response {
            peer: peer(9),
            request: id,
            response: resp
        }]
    );
    h.advance(100.0);
    assert!(h.sent().is_empty(), "acknowledged: no retransmission");
}

#[test]
fn client_request_with_separate_response() {
    let mut h = Harness::manual();
    let id =
        h.ep.send_request(h.now, peer(9), Request::get("/slow"))
            .unwrap();
    let (_, sent) = h.sent_one();
    h.recv(peer(9), &ack(sent.message_id));
    h.advance(5.0);
    assert!(h.sent().is_empty());
    let resp = Message::new(MessageType::Confirmable, Code::CONTENT, 0x7777).with_token(sent.token);
    h.recv(peer(9), &resp);
    assert_eq!(h.sent_one().1, ack(0x7777));
    assert!(matches!(h.events().as_slice(), [Event::Response { request, .. }] if *request == id));
    // A duplicate of the separate response is acknowledged again, not delivered again.
    h.recv(peer(9), &resp);
    assert_eq!(h.sent_one().1, ack(0x7777));
    assert!(h.events().is_empty());
}

#[test]
fn client_request_times_out_and_unmatched_responses_get_rst() {
    let mut h = Harness::manual();
    let id =
        h.ep.send_request(h.now, peer(9), Request::get("/x"))
            .unwrap();
    while h.advance_to_timeout() {}
    assert_eq!(h.sent().len(), 5, "one send and four retransmissions");
    assert_eq!(
        h.events(),
        vec![Event::RequestFailed {
            peer: peer(9),
            request: id,
            reason: FailureReason::Timeout
        }]
    );
    // A response nobody asked for is rejected.
    h.recv(
        peer(9),
        &Message::new(MessageType::Confirmable, Code::CONTENT, 5).with_token(tok(99)),
    );
    assert_eq!(h.sent_one().1, rst(5));
    h.recv(
        peer(9),
        &Message::new(MessageType::NonConfirmable, Code::CONTENT, 6).with_token(tok(99)),
    );
    assert_eq!(h.sent_one().1, rst(6));
}

#[test]
fn client_rejects_response_with_unrecognized_critical_option() {
    let mut h = Harness::manual();
    let id =
        h.ep.send_request(h.now, peer(9), Request::get("/x"))
            .unwrap();
    let (_, sent) = h.sent_one();
    let mut resp = Message::new(MessageType::Acknowledgement, Code::CONTENT, sent.message_id)
        .with_token(sent.token);
    resp.options.push(65001u16, Bytes::new());
    h.recv(peer(9), &resp);
    assert_eq!(
        h.events(),
        vec![Event::RequestFailed {
            peer: peer(9),
            request: id,
            reason: FailureReason::Rejected
        }]
    );
}

#[test]
fn client_non_request_and_send_errors() {
    let mut h = Harness::manual();
    let id =
        h.ep.send_request(h.now, peer(9), Request::get("/x").non_confirmable())
            .unwrap();
    let (_, sent) = h.sent_one();
    assert_eq!(sent.message_type, MessageType::NonConfirmable);
    h.recv(peer(9), &rst(sent.message_id));
    assert_eq!(
        h.events(),
        vec![Event::RequestFailed {
            peer: peer(9),
            request: id,
            reason: FailureReason::Reset
        }]
    );
    assert_eq!(
        h.ep.send_request(h.now, peer(9), Request::new(Code::CONTENT, "/x")),
        Err(SendError::NotARequest(Code::CONTENT))
    );
}

#[test]
fn endpoint_can_move_between_threads() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Endpoint>();
    assert_send::<Event>();
}
