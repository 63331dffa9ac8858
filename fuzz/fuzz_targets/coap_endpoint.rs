//! Arbitrary datagrams from a few peers into one CoAP endpoint, with virtual time, responses,
//! notifications and client requests mixed in: the state machine must never panic, must only
//! send datagrams that decode, and must keep its tables within the configured bounds.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use stratus_coap::*;

fuzz_target!(|data: &[u8]| {
    let config = Config {
        max_dedup_entries: 32,
        max_peers: 4,
        max_pending_requests: 8,
        max_queued_per_peer: 4,
        max_observers: 4,
        observe_con_every: 3,
        max_body_size: 2048,
        max_block1_transfers: 2,
        max_block2_entries: 4,
        max_block2_bytes: 8192,
        max_client_requests: 4,
        unverified_response_limit: Some(256),
        ..Config::default()
    };
    let Ok(mut ep) = Endpoint::new(config.clone(), 1) else {
        return;
    };
    let mut now = Instant::now();
    let mut pending = Vec::new();
    // Each record: [control, length, bytes...]. The control byte picks a peer and an action.
    let mut rest = data;
    while let [control, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(n);
        rest = next;
        let peer = SocketAddr::from(([198, 51, 100, 1], 5683 + u16::from(control & 3)));
        match control >> 2 {
            0..=39 => ep.handle_datagram(now, peer, datagram),
            40..=47 => {
                now += Duration::from_millis(u64::from(*len) * 250);
                ep.handle_timeout(now);
            }
            48..=53 => {
                if let Some(ex) = pending.pop() {
                    let mut r =
                        Response::new(Code::CONTENT).with_payload(datagram.to_vec().repeat(8));
                    if control & 4 != 0 {
                        r = r.observing();
                    }
                    let _ = ep.respond(now, ex, r);
                }
            }
            54..=55 => {
                if let Some(ex) = pending.last() {
                    let _ = ep.defer(now, *ex);
                }
            }
            56..=59 => {
                let code = if control & 4 != 0 {
                    Code::CONTENT
                } else {
                    Code::BAD_REQUEST
                };
                let _ = ep.notify(
                    now,
                    "/config",
                    Response::new(code).with_payload(datagram.to_vec().repeat(4)),
                );
            }
            60..=61 => {
                let mut r = Request::get("/config");
                r.confirmable = control & 4 != 0;
                let _ = ep.send_request(now, peer, r);
            }
            _ => ep.set_verified(now, peer, control & 4 != 0),
        }
        while let Some(t) = ep.poll_transmit() {
            decode(&t.data).expect("the endpoint sends valid datagrams");
        }
        while let Some(ev) = ep.poll_event() {
            if let Event::Request { exchange, .. } = ev {
                pending.push(exchange);
            }
        }
        assert!(ep.pending_requests() <= config.max_pending_requests);
        assert!(ep.observer_count() <= config.max_observers);
    }
});
