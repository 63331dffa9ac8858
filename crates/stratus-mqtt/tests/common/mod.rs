//! What the connection tests share: a broker-side [`Connection`] driven on virtual time by a
//! scripted client, for any protocol version.
#![allow(dead_code)] // each test file uses its own subset

use std::time::{Duration, Instant};

use bytes::BytesMut;
use stratus_mqtt::*;

/// An MQTT string from a literal.
pub fn s(v: &str) -> MqttStr {
    MqttStr::try_from(v).unwrap()
}

/// One connection, the virtual clock, and the bytes the client has sent but the connection
/// has not consumed.
pub struct Harness {
    pub conn: Connection,
    pub now: Instant,
    pub inbox: BytesMut,
    pub version: ProtocolVersion,
}

impl Harness {
    /// A 3.1.1 connection accepted at "now".
    pub fn new(limits: Limits) -> Self {
        Self::with_version(limits, ProtocolVersion::V311)
    }

    /// A connection whose client speaks `version`.
    pub fn with_version(limits: Limits, version: ProtocolVersion) -> Self {
        let now = Instant::now();
        Harness {
            conn: Connection::new(limits, now),
            now,
            inbox: BytesMut::new(),
            version,
        }
    }

    /// Moves the virtual clock and lets the connection check its deadlines.
    pub fn advance(&mut self, secs: f64) {
        self.now += Duration::from_secs_f64(secs);
        self.conn.handle_timeout(self.now);
    }

    /// The client sends `p`.
    pub fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        encode(&p, self.version, &mut b).unwrap();
        self.send_raw(&b);
    }

    /// The client sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        self.conn.handle_bytes(&mut self.inbox, self.now);
    }

    /// Every packet the connection has written since the last call.
    pub fn received(&mut self) -> Vec<Packet> {
        let mut out = Vec::new();
        let buf = self.conn.transmit();
        while let Some(p) = decode(buf, usize::MAX, self.version).unwrap() {
            out.push(p);
        }
        assert!(buf.is_empty(), "transmit buffer holds a partial packet");
        out
    }

    /// Every event the connection has for the host.
    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }
}
