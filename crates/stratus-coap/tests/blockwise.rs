//! Block-wise transfers (RFC 7959): Block2 splitting with SZX negotiation, ETag and Size2, the
//! body cache for follow-ups; Block1 reassembly with 2.31, 4.08 and 4.13; the amplification
//! guard.

use std::net::SocketAddr;

use bytes::Bytes;
use stratus_coap::*;

mod common;
use common::*;

fn body(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn harness(f: impl FnOnce(&mut Config)) -> Harness {
    let mut c = Config {
        separate_response_after: None,
        ..Config::default()
    };
    f(&mut c);
    Harness::new(c)
}

fn get_block(mid: u16, path: &str, num: u32, szx: u8) -> Message {
    let mut m = con_get(mid, tok(u64::from(mid)), path);
    m.options
        .set_block2(BlockOption::new(num, false, szx).unwrap());
    m
}

/// Answers the next request event with `payload`.
fn answer(h: &mut Harness, payload: Bytes) -> Message {
    let (ex, _) = h.request();
    h.ep.respond(
        h.now,
        ex,
        Response::new(Code::CONTENT).with_payload(payload),
    )
    .unwrap();
    h.sent_one().1
}

#[test]
fn large_body_is_served_block_by_block_from_the_cache() {
    let mut h = harness(|_| {});
    let full = body(2500);
    h.recv(peer(1), &con_get(1, tok(1), "/firmware/fw1"));
    let first = answer(&mut h, full.clone());
    let b = first.options.block2().unwrap().unwrap();
    assert_eq!((b.num, b.more, b.szx), (0, true, 6));
    assert_eq!(first.payload.len(), 1024);
    assert_eq!(
        first.options.size2().unwrap(),
        Some(2500),
        "Size2 on the first block"
    );
    let etag = first.options.etag().unwrap().to_vec();
    assert_eq!(etag.len(), 8);
    let mut got = first.payload.to_vec();
    for num in 1..=2u32 {
        h.recv(
            peer(1),
            &get_block(10 + num as u16, "/firmware/fw1", num, 6),
        );
        assert!(
            h.events().is_empty(),
            "follow-ups are served from the cache"
        );
        let (_, m) = h.sent_one();
        assert_eq!(m.message_type, MessageType::Acknowledgement);
        assert_eq!(m.code, Code::CONTENT);
        let b = m.options.block2().unwrap().unwrap();
        assert_eq!((b.num, b.more), (num, num < 2));
        assert_eq!(m.options.etag().unwrap(), &etag[..], "ETag in every block");
        assert_eq!(m.options.size2().unwrap(), None);
        got.extend_from_slice(&m.payload);
    }
    assert_eq!(got, full.to_vec());
    assert_eq!(h.ep.stats().block2_cache_hits, 2);
    // Past the end: 4.02.
    h.recv(peer(1), &get_block(20, "/firmware/fw1", 3, 6));
    assert_eq!(h.sent_one().1.code, Code::BAD_OPTION);
    // Another peer has no cached body: its block request goes to the application.
    h.recv(peer(2), &get_block(21, "/firmware/fw1", 1, 6));
    let m = answer(&mut h, full.clone());
    assert_eq!(m.options.block2().unwrap().unwrap().num, 1);
    assert_eq!(&m.payload[..], &full[1024..2048]);
}

#[test]
fn client_requested_smaller_block_size_is_honoured() {
    let mut h = harness(|_| {});
    let full = body(300);
    h.recv(peer(1), &get_block(1, "/r", 0, 2)); // 64-byte blocks
    let first = answer(&mut h, full.clone());
    let b = first.options.block2().unwrap().unwrap();
    assert_eq!(
        (b.num, b.more, b.szx, first.payload.len()),
        (0, true, 2, 64)
    );
    let mut got = first.payload.to_vec();
    let mut num = 1;
    loop {
        h.recv(peer(1), &get_block(1 + num as u16, "/r", num, 2));
        let (_, m) = h.sent_one();
        let b = m.options.block2().unwrap().unwrap();
        assert_eq!(b.szx, 2);
        got.extend_from_slice(&m.payload);
        if !b.more {
            break;
        }
        num += 1;
    }
    assert_eq!(num, 4);
    assert_eq!(got, full.to_vec());
}

#[test]
fn server_uses_its_smaller_size_and_renumbers() {
    let mut h = harness(|c| c.block_szx = 4); // 256-byte blocks
    let full = body(3000);
    h.recv(peer(1), &con_get(1, tok(1), "/r"));
    let first = answer(&mut h, full.clone());
    assert_eq!(first.options.block2().unwrap().unwrap().szx, 4);
    // The client asks for block 1 of 1024 bytes: offset 1024 is block 4 of 256.
    h.recv(peer(1), &get_block(2, "/r", 1, 6));
    let (_, m) = h.sent_one();
    let b = m.options.block2().unwrap().unwrap();
    assert_eq!((b.num, b.szx, b.more), (4, 4, true));
    assert_eq!(&m.payload[..], &full[1024..1280]);
}

#[test]
fn size2_when_requested_and_small_bodies_untouched() {
    let mut h = harness(|_| {});
    let mut get = get_block(1, "/r", 1, 5);
    get.options.set_size2(0);
    h.recv(peer(1), &get);
    let m = answer(&mut h, body(1500));
    assert_eq!(m.options.size2().unwrap(), Some(1500));
    assert_eq!(m.options.block2().unwrap().unwrap().num, 1);
    // A small body needs no blocks, but Size2 is still answered when asked.
    let mut get = con_get(2, tok(2), "/small");
    get.options.set_size2(0);
    h.recv(peer(1), &get);
    let m = answer(&mut h, body(10));
    assert_eq!(m.options.block2().unwrap(), None);
    assert_eq!(m.options.etag(), None);
    assert_eq!(m.options.size2().unwrap(), Some(10));
}

#[test]
fn changed_representation_gets_a_new_etag_and_application_etag_is_kept() {
    let mut h = harness(|c| c.max_block2_entries = 0); // no cache: every block re-rendered
    h.recv(peer(1), &con_get(1, tok(1), "/r"));
    let a = answer(&mut h, body(2000));
    h.recv(peer(1), &get_block(2, "/r", 1, 6));
    let mut changed = body(2000).to_vec();
    changed[1500] ^= 1;
    let b = answer(&mut h, Bytes::from(changed));
    assert_ne!(a.options.etag(), b.options.etag());
    h.recv(peer(1), &con_get(3, tok(3), "/r"));
    let (ex, _) = h.request();
    let mut resp = Response::new(Code::CONTENT).with_payload(body(2000));
    resp.options.set_etag(b"v42");
    h.ep.respond(h.now, ex, resp).unwrap();
    assert_eq!(h.sent_one().1.options.etag(), Some(&b"v42"[..]));
}

#[test]
fn application_managed_block2_passes_unchanged() {
    let mut h = harness(|_| {});
    h.recv(peer(1), &get_block(1, "/fw", 7, 6));
    let (ex, _) = h.request();
    let mut resp = Response::new(Code::CONTENT).with_payload(body(1024));
    resp.options
        .set_block2(BlockOption::new(7, true, 6).unwrap());
    h.ep.respond(h.now, ex, resp).unwrap();
    let (_, m) = h.sent_one();
    assert_eq!(m.options.block2().unwrap(), BlockOption::new(7, true, 6));
    assert_eq!(m.payload.len(), 1024);
    assert_eq!(m.options.etag(), None);
}

#[test]
fn cached_body_expires() {
    let mut h = harness(|_| {});
    h.recv(peer(1), &con_get(1, tok(1), "/r"));
    answer(&mut h, body(2000));
    h.advance(200.0);
    h.recv(peer(1), &get_block(2, "/r", 1, 6));
    assert!(h.events().is_empty(), "still cached (sliding lifetime)");
    h.sent();
    h.advance(248.0);
    h.recv(peer(1), &get_block(3, "/r", 1, 6));
    answer(&mut h, body(2000)); // the application re-renders
}

#[test]
fn block2_cache_is_bounded_by_bytes() {
    let mut h = harness(|c| c.max_block2_bytes = 5000);
    for (i, p) in [(1u16, 1u16), (2, 2), (3, 3)] {
        h.recv(peer(p), &con_get(i, tok(1), "/r"));
        answer(&mut h, body(2000));
    }
    // Peer 1's body was evicted to make room for peer 3's.
    h.recv(peer(1), &get_block(10, "/r", 1, 6));
    assert_eq!(h.events().len(), 1);
    h.recv(peer(3), &get_block(11, "/r", 1, 6));
    assert!(h.events().is_empty());
}

fn put_block(mid: u16, num: u32, more: bool, szx: u8, payload: Bytes) -> Message {
    let mut m = req(
        MessageType::Confirmable,
        Code::PUT,
        mid,
        tok(u64::from(mid)),
        "/upload",
    )
    .with_payload(payload);
    m.options
        .set_block1(BlockOption::new(num, more, szx).unwrap());
    m
}

fn upload(h: &mut Harness, p: SocketAddr, full: &Bytes, szx: u8) -> Vec<Message> {
    let size = 1usize << (szx + 4);
    let chunks: Vec<&[u8]> = full.chunks(size).collect();
    let mut replies = vec![];
    for (i, c) in chunks.iter().enumerate() {
        let more = i + 1 < chunks.len();
        h.recv(
            p,
            &put_block(
                100 + i as u16,
                i as u32,
                more,
                szx,
                Bytes::copy_from_slice(c),
            ),
        );
        if more {
            replies.push(h.sent_one().1);
        }
    }
    replies
}

#[test]
fn block1_reassembly_with_continue() {
    let mut h = harness(|_| {});
    let full = body(150);
    let replies = upload(&mut h, peer(1), &full, 2); // 64 + 64 + 22
    assert_eq!(replies.len(), 2);
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.code, Code::CONTINUE);
        assert_eq!(r.message_type, MessageType::Acknowledgement);
        assert_eq!(
            r.options.block1().unwrap(),
            BlockOption::new(i as u32, true, 2)
        );
    }
    let (ex, req) = h.request();
    assert_eq!(req.payload, full, "one request with the whole body");
    assert_eq!(req.options.block1().unwrap(), None);
    h.ep.respond(h.now, ex, Response::new(Code::CHANGED))
        .unwrap();
    let (_, done) = h.sent_one();
    assert_eq!(done.code, Code::CHANGED);
    assert_eq!(
        done.options.block1().unwrap(),
        BlockOption::new(2, false, 2)
    );
}

#[test]
fn block1_server_asks_for_smaller_blocks() {
    let mut h = harness(|c| c.block_szx = 2);
    let full = body(1024 + 64);
    h.recv(peer(1), &put_block(1, 0, true, 6, full.slice(0..1024)));
    let (_, r) = h.sent_one();
    assert_eq!(r.options.block1().unwrap(), BlockOption::new(0, true, 2));
    // The client continues at offset 1024 with 64-byte blocks: block 16.
    h.recv(peer(1), &put_block(2, 16, false, 2, full.slice(1024..)));
    let (_, req) = h.request();
    assert_eq!(req.payload, full);
}

#[test]
fn block1_out_of_order_or_missing_gets_4_08() {
    let mut h = harness(|_| {});
    // No block 0 first.
    h.recv(peer(1), &put_block(1, 1, true, 2, body(64)));
    let (_, r) = h.sent_one();
    assert_eq!(r.code, Code::REQUEST_ENTITY_INCOMPLETE);
    // Block 0, then block 2 (block 1 missing).
    h.recv(peer(1), &put_block(2, 0, true, 2, body(64)));
    assert_eq!(h.sent_one().1.code, Code::CONTINUE);
    h.recv(peer(1), &put_block(3, 2, false, 2, body(10)));
    assert_eq!(h.sent_one().1.code, Code::REQUEST_ENTITY_INCOMPLETE);
    // The transfer is gone: block 1 now is incomplete too.
    h.recv(peer(1), &put_block(4, 1, false, 2, body(10)));
    assert_eq!(h.sent_one().1.code, Code::REQUEST_ENTITY_INCOMPLETE);
    assert!(h.events().is_empty());
}

#[test]
fn block1_repeated_block_is_acknowledged_without_duplicating_data() {
    let mut h = harness(|_| {});
    let full = body(150);
    h.recv(peer(1), &put_block(1, 0, true, 2, full.slice(0..64)));
    h.recv(peer(1), &put_block(2, 1, true, 2, full.slice(64..128)));
    // Block 1 again under a new message ID (the client's retry at application level).
    h.recv(peer(1), &put_block(3, 1, true, 2, full.slice(64..128)));
    let replies = h.sent();
    assert!(replies.iter().all(|(_, m)| m.code == Code::CONTINUE));
    h.recv(peer(1), &put_block(4, 2, false, 2, full.slice(128..)));
    assert_eq!(h.request().1.payload, full);
}

#[test]
fn block1_too_large_gets_4_13_with_size1() {
    let mut h = harness(|c| c.max_body_size = 100);
    let replies = {
        h.recv(peer(1), &put_block(1, 0, true, 2, body(64)));
        h.recv(peer(1), &put_block(2, 1, true, 2, body(64)));
        h.sent()
    };
    assert_eq!(replies[0].1.code, Code::CONTINUE);
    assert_eq!(replies[1].1.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(replies[1].1.options.size1().unwrap(), Some(100));
    // Announced in Size1 up front: refused on block 0.
    let mut first = put_block(3, 0, true, 2, body(64));
    first.options.set_size1(5000);
    h.recv(peer(1), &first);
    let (_, r) = h.sent_one();
    assert_eq!(r.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(r.options.size1().unwrap(), Some(100));
    assert!(h.events().is_empty());
}

#[test]
fn block1_abandoned_transfer_expires() {
    let mut h = harness(|_| {});
    h.recv(peer(1), &put_block(1, 0, true, 2, body(64)));
    assert_eq!(h.sent_one().1.code, Code::CONTINUE);
    h.advance(248.0);
    h.recv(peer(1), &put_block(2, 1, false, 2, body(5)));
    assert_eq!(h.sent_one().1.code, Code::REQUEST_ENTITY_INCOMPLETE);
}

#[test]
fn block1_bad_block_sizes_and_szx_7_get_4_00() {
    let mut h = harness(|_| {});
    // A non-final block must be exactly the block size.
    h.recv(peer(1), &put_block(1, 0, true, 2, body(60)));
    assert_eq!(h.sent_one().1.code, Code::BAD_REQUEST);
    // No block may exceed it.
    h.recv(peer(1), &put_block(2, 0, false, 2, body(65)));
    assert_eq!(h.sent_one().1.code, Code::BAD_REQUEST);
    // SZX 7 is reserved.
    let mut m = req(MessageType::Confirmable, Code::PUT, 3, tok(3), "/upload");
    m.options
        .set(OptionNumber::BLOCK1, Bytes::from_static(&[0x0f]));
    h.recv(peer(1), &m);
    assert_eq!(h.sent_one().1.code, Code::BAD_REQUEST);
}

#[test]
fn single_block1_request_is_delivered_at_once() {
    let mut h = harness(|_| {});
    h.recv(peer(1), &put_block(1, 0, false, 6, body(100)));
    let (ex, req) = h.request();
    assert_eq!(req.payload.len(), 100);
    h.ep.respond(h.now, ex, Response::new(Code::CHANGED))
        .unwrap();
    assert_eq!(
        h.sent_one().1.options.block1().unwrap(),
        BlockOption::new(0, false, 6)
    );
}

#[test]
fn amplification_guard_keeps_responses_to_unverified_peers_small() {
    let mut h = harness(|c| c.unverified_response_limit = Some(200));
    let full = body(1000);
    h.recv(peer(1), &con_get(1, tok(1), "/.well-known/core"));
    let (ex, _) = h.request();
    h.ep.respond(
        h.now,
        ex,
        Response::new(Code::CONTENT).with_payload(full.clone()),
    )
    .unwrap();
    let sent = h.sent_raw();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].data.len() <= 200,
        "datagram of {} bytes",
        sent[0].data.len()
    );
    let m = decode(&sent[0].data).unwrap();
    let b = m.options.block2().unwrap().unwrap();
    assert!(b.more && b.szx <= 3);
    // Follow-ups stay small too.
    h.recv(peer(1), &get_block(2, "/.well-known/core", 1, 6));
    let sent = h.sent_raw();
    assert!(sent[0].data.len() <= 200);
    // Once verified, full-size blocks.
    h.ep.set_verified(h.now, peer(1), true);
    assert!(h.ep.is_verified(peer(1)));
    h.recv(peer(1), &con_get(3, tok(3), "/.well-known/core"));
    let m = answer(&mut h, full);
    assert_eq!(m.payload.len(), 1000);
    assert_eq!(m.options.block2().unwrap(), None);
    h.ep.set_verified(h.now, peer(1), false);
    assert!(!h.ep.is_verified(peer(1)));
}

#[test]
fn acknowledging_a_con_verifies_the_peer() {
    let mut h = harness(|c| c.unverified_response_limit = Some(200));
    let _ =
        h.ep.send_request(h.now, peer(1), Request::get("/x"))
            .unwrap();
    let (_, sent) = h.sent_one();
    assert!(!h.ep.is_verified(peer(1)));
    h.recv(peer(1), &ack(sent.message_id));
    assert!(h.ep.is_verified(peer(1)));
}

#[test]
fn large_notification_sends_first_block_and_caches_the_rest() {
    let mut h = harness(|_| {});
    let mut get = con_get(1, tok(1), "/config");
    get.options.set_observe(0);
    h.recv(peer(1), &get);
    let (ex, _) = h.request();
    h.ep.respond(
        h.now,
        ex,
        Response::new(Code::CONTENT)
            .with_payload(&b"small"[..])
            .observing(),
    )
    .unwrap();
    h.sent();
    let full = body(1500);
    assert_eq!(
        h.ep.notify(
            h.now,
            "/config",
            Response::new(Code::CONTENT).with_payload(full.clone())
        ),
        1
    );
    let (_, n) = h.sent_one();
    assert!(n.options.observe().unwrap().is_some());
    let b = n.options.block2().unwrap().unwrap();
    assert_eq!((b.num, b.more), (0, true));
    // The client fetches the rest with a plain GET + Block2 (no Observe): from the cache.
    let mut next = get_block(2, "/config", 1, 6);
    next.token = tok(2);
    h.recv(peer(1), &next);
    assert!(h.events().is_empty());
    let (_, m) = h.sent_one();
    assert_eq!(m.options.etag(), n.options.etag());
    let mut got = n.payload.to_vec();
    got.extend_from_slice(&m.payload);
    assert_eq!(got, full.to_vec());
}

#[test]
fn block1_upload_with_large_response_uses_both_options() {
    let mut h = harness(|_| {});
    let full = body(100);
    h.recv(peer(1), &put_block(1, 0, true, 2, full.slice(0..64)));
    assert_eq!(h.sent_one().1.code, Code::CONTINUE);
    let mut last = put_block(2, 1, false, 2, full.slice(64..));
    last.options
        .set_block2(BlockOption::new(0, false, 3).unwrap());
    h.recv(peer(1), &last);
    let (ex, req) = h.request();
    assert_eq!(req.payload, full);
    h.ep.respond(
        h.now,
        ex,
        Response::new(Code::CHANGED).with_payload(body(300)),
    )
    .unwrap();
    let (_, m) = h.sent_one();
    assert_eq!(m.options.block1().unwrap(), BlockOption::new(1, false, 2));
    assert_eq!(m.options.block2().unwrap(), BlockOption::new(0, true, 3));
    assert_eq!(m.payload.len(), 128);
    assert_eq!(m.options.size2().unwrap(), Some(300));
}
