//! Hostile input against a whole endpoint: random datagrams (raw and structurally valid),
//! random timing and random application behaviour never panic it, every datagram it sends
//! decodes, every table stays within its bound, and a request is delivered at most once per
//! (peer, message ID).

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use stratus_coap::*;

mod common;
use common::*;

#[derive(Debug, Clone)]
enum Op {
    Raw(u8, Vec<u8>),
    Valid {
        peer: u8,
        kind: u8,
        code: u8,
        mid: u8,
        token: u8,
        path: u8,
        observe: Option<u8>,
        block1: Option<(u8, bool, u8)>,
        block2: Option<(u8, u8)>,
        payload: u16,
    },
    Advance(u32),
    Respond(u16, bool),
    Defer,
    Notify(u16, bool),
    Send(u8, bool),
    Verify(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(p, b)| Op::Raw(p, b)),
        (
            (
                0u8..4,
                0u8..4,
                prop_oneof![Just(1u8), Just(3), Just(0x45), Just(0), any::<u8>()]
            ),
            (0u8..8, 0u8..4, 0u8..3),
            proptest::option::of(0u8..3),
            proptest::option::of((0u8..4, any::<bool>(), 0u8..8)),
            proptest::option::of((0u8..4, 0u8..8)),
            0u16..300,
        )
            .prop_map(
                |((peer, kind, code), (mid, token, path), observe, block1, block2, payload)| {
                    Op::Valid {
                        peer,
                        kind,
                        code,
                        mid,
                        token,
                        path,
                        observe,
                        block1,
                        block2,
                        payload,
                    }
                }
            ),
        (0u32..100_000).prop_map(Op::Advance),
        (0u16..3000, any::<bool>()).prop_map(|(n, o)| Op::Respond(n, o)),
        Just(Op::Defer),
        (0u16..3000, any::<bool>()).prop_map(|(n, e)| Op::Notify(n, e)),
        (0u8..4, any::<bool>()).prop_map(|(p, c)| Op::Send(p, c)),
        (0u8..4).prop_map(Op::Verify),
    ]
}

fn valid_message(op: &Op) -> Option<Message> {
    let Op::Valid {
        kind,
        code,
        mid,
        token,
        path,
        observe,
        block1,
        block2,
        payload,
        ..
    } = op
    else {
        return None;
    };
    let path = ["/config", "/upload", "/a/b"][usize::from(*path)];
    let mut m = Message::request(
        MessageType::from_bits(*kind),
        Code(*code),
        u16::from(*mid),
        if *code == 0 {
            Token::EMPTY
        } else {
            tok(u64::from(*token))
        },
        if *code == 0 { "" } else { path },
    );
    if *code != 0 {
        if let Some(o) = observe {
            m.options.set_observe(u32::from(*o));
        }
        if let Some((num, more, szx)) = block1 {
            m.options.set(
                OptionNumber::BLOCK1,
                option::encode_uint(
                    (u32::from(*num) << 4) | (u32::from(*more) << 3) | u32::from(*szx),
                ),
            );
        }
        if let Some((num, szx)) = block2 {
            m.options.set(
                OptionNumber::BLOCK2,
                option::encode_uint((u32::from(*num) << 4) | u32::from(*szx)),
            );
        }
        m.payload = Bytes::from(vec![0x42; usize::from(*payload)]);
    }
    Some(m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn endpoint_survives_anything(ops in proptest::collection::vec(op(), 1..60)) {
        let config = Config {
            max_dedup_entries: 16,
            max_peers: 3,
            max_pending_requests: 4,
            max_queued_per_peer: 2,
            max_observers: 3,
            observe_con_every: 2,
            max_body_size: 500,
            max_block1_transfers: 2,
            max_block2_entries: 2,
            max_block2_bytes: 4000,
            max_client_requests: 3,
            unverified_response_limit: Some(300),
            ..Config::default()
        };
        let mut h = Harness::new(config.clone());
        let mut pending = Vec::new();
        // Dedup entries expire with time and can be evicted by the cap: a request may come
        // again only after one of those, so count per (peer, mid, epoch, evictions).
        let mut delivered: HashSet<(std::net::SocketAddr, u16, u64, u64)> = HashSet::new();
        let mut epoch = 0u64;
        for op in &ops {
            match op {
                Op::Raw(p, bytes) => h.recv_raw(peer(u16::from(*p)), bytes),
                Op::Valid { peer: p, .. } => {
                    let m = valid_message(op).unwrap();
                    if let Ok(bytes) = encode(&m) {
                        h.recv_raw(peer(u16::from(*p)), &bytes);
                    }
                }
                Op::Advance(ms) => {
                    epoch += 1;
                    h.advance(f64::from(*ms) / 1000.0);
                }
                Op::Respond(n, observe) => {
                    if let Some(ex) = pending.pop() {
                        let mut r = Response::new(Code::CONTENT).with_payload(vec![1u8; usize::from(*n)]);
                        if *observe {
                            r = r.observing();
                        }
                        let _ = h.ep.respond(h.now, ex, r);
                    }
                }
                Op::Defer => {
                    if let Some(ex) = pending.last() {
                        let _ = h.ep.defer(h.now, *ex);
                    }
                }
                Op::Notify(n, error) => {
                    let code = if *error { Code::NOT_FOUND } else { Code::CONTENT };
                    let _ = h.ep.notify(h.now, "/config", Response::new(code).with_payload(vec![2u8; usize::from(*n)]));
                }
                Op::Send(p, con) => {
                    let mut r = Request::get("/x");
                    r.confirmable = *con;
                    let _ = h.ep.send_request(h.now, peer(u16::from(*p)), r);
                }
                Op::Verify(p) => h.ep.set_verified(h.now, peer(u16::from(*p)), true),
            }
            for t in h.sent_raw() {
                let m = decode(&t.data);
                prop_assert!(m.is_ok(), "sent an undecodable datagram {:02x?}", &t.data[..]);
            }
            for ev in h.events() {
                if let Event::Request { peer, exchange, request } = ev {
                    prop_assert!(
                        delivered.insert((peer, request.message_id, epoch, h.ep.stats().evictions)),
                        "request {} from {} delivered twice", request.message_id, peer
                    );
                    pending.push(exchange);
                }
            }
            prop_assert!(h.ep.pending_requests() <= config.max_pending_requests);
            prop_assert!(h.ep.observer_count() <= config.max_observers);
            if let Some(at) = h.ep.poll_timeout() {
                // Deadlines are never absurdly far away.
                prop_assert!(at <= h.now + Duration::from_secs(48 * 3600));
            }
        }
        // Left alone, everything settles: retransmissions end, state expires, no timer is left.
        let mut steps = 0;
        while h.advance_to_timeout() {
            steps += 1;
            prop_assert!(steps < 1000, "timers keep re-arming");
        }
        for t in h.sent_raw() {
            prop_assert!(decode(&t.data).is_ok());
        }
    }
}
