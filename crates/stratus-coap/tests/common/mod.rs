//! What the endpoint tests share: one [`Endpoint`] on virtual time, driven by scripted peers
//! that send encoded messages and read back decoded ones.
#![allow(dead_code)] // each test file uses its own subset

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stratus_coap::*;

/// The address of scripted peer `n`.
pub fn peer(n: u16) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1], 5000 + n))
}

/// A token from a small number.
pub fn tok(n: u64) -> Token {
    Token::from_u64(n, 4)
}

/// A request of `kind` for `path`.
pub fn req(kind: MessageType, code: Code, mid: u16, token: Token, path: &str) -> Message {
    Message::request(kind, code, mid, token, path)
}

/// A CON GET for `path`.
pub fn con_get(mid: u16, token: Token, path: &str) -> Message {
    req(MessageType::Confirmable, Code::GET, mid, token, path)
}

/// One endpoint and the virtual clock.
pub struct Harness {
    pub ep: Endpoint,
    pub now: Instant,
    pub start: Instant,
}

impl Harness {
    pub fn new(config: Config) -> Self {
        let now = Instant::now();
        Harness {
            ep: Endpoint::new(config, 7).unwrap(),
            now,
            start: now,
        }
    }

    /// Default config, but no automatic separate response (so tests choose when to answer).
    pub fn manual() -> Self {
        Harness::new(Config {
            separate_response_after: None,
            ..Config::default()
        })
    }

    /// Seconds of virtual time since the start.
    pub fn elapsed(&self) -> f64 {
        (self.now - self.start).as_secs_f64()
    }

    /// Moves the clock and lets the endpoint handle its deadlines.
    pub fn advance(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
        self.ep.handle_timeout(self.now);
    }

    /// Jumps to the next deadline (if any) and handles it; returns whether there was one.
    pub fn advance_to_timeout(&mut self) -> bool {
        match self.ep.poll_timeout() {
            Some(at) => {
                self.now = self.now.max(at);
                self.ep.handle_timeout(self.now);
                true
            }
            None => false,
        }
    }

    /// `from` sends `msg`.
    pub fn recv(&mut self, from: SocketAddr, msg: &Message) {
        let bytes = encode(msg).unwrap();
        self.ep.handle_datagram(self.now, from, &bytes);
    }

    /// `from` sends raw bytes.
    pub fn recv_raw(&mut self, from: SocketAddr, bytes: &[u8]) {
        self.ep.handle_datagram(self.now, from, bytes);
    }

    /// Every datagram sent since the last call, raw.
    pub fn sent_raw(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.ep.poll_transmit()).collect()
    }

    /// Every datagram sent since the last call, decoded.
    pub fn sent(&mut self) -> Vec<(SocketAddr, Message)> {
        self.sent_raw()
            .into_iter()
            .map(|t| {
                (
                    t.peer,
                    decode(&t.data).expect("the endpoint sends valid messages"),
                )
            })
            .collect()
    }

    /// Exactly one datagram must have been sent; returns it.
    pub fn sent_one(&mut self) -> (SocketAddr, Message) {
        let mut v = self.sent();
        assert_eq!(v.len(), 1, "expected one datagram, got {v:#?}");
        v.remove(0)
    }

    /// Every event since the last call.
    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.ep.poll_event()).collect()
    }

    /// Exactly one event, a request; returns its exchange and message.
    pub fn request(&mut self) -> (ExchangeId, Message) {
        let mut ev = self.events();
        assert_eq!(ev.len(), 1, "expected one request event, got {ev:#?}");
        match ev.remove(0) {
            Event::Request {
                exchange, request, ..
            } => (exchange, request),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    /// Responds 2.05 with `body` to `exchange`.
    pub fn respond(&mut self, exchange: ExchangeId, body: &'static [u8]) {
        self.ep
            .respond(
                self.now,
                exchange,
                Response::new(Code::CONTENT).with_payload(Bytes::from_static(body)),
            )
            .unwrap();
    }
}

/// An empty ACK for `mid`.
pub fn ack(mid: u16) -> Message {
    Message::empty(MessageType::Acknowledgement, mid)
}

/// A RST for `mid`.
pub fn rst(mid: u16) -> Message {
    Message::empty(MessageType::Reset, mid)
}
