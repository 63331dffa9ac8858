//! Arbitrary bytes into a broker-side connection after a valid CONNECT, in arbitrary chunks,
//! with deliveries and timeouts mixed in: the state machine must never panic and must never
//! write a packet that does not decode.
#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use stratus_mqtt::*;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let limits = Limits { max_inflight: 4, max_queued: 8, max_packet_size: 4096, ..Limits::default() };
    let mut conn = Connection::new(limits, start);
    let mut inbox = BytesMut::from(&b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x05\x00\x02c1"[..]);
    conn.handle_bytes(&mut inbox, start);
    while let Some(ev) = conn.poll_event() {
        if let Event::Connect(c) = ev {
            conn.accept(Session::new(c.client_id), false);
        }
    }
    let msg = Message {
        topic: MqttStr::try_from("t/x").unwrap(),
        payload: Bytes::from_static(b"payload"),
        qos: QoS::ExactlyOnce,
        retain: false,
    };
    let mut now = start;
    for chunk in data.chunks(7) {
        now += Duration::from_millis(u64::from(chunk[0]) * 10);
        inbox.extend_from_slice(chunk);
        conn.handle_bytes(&mut inbox, now);
        if chunk[0] % 3 == 0 {
            conn.deliver(&msg, QoS::from_u8(chunk[0] % 3).unwrap_or(QoS::AtMostOnce), chunk[0] & 1 == 1);
        }
        conn.handle_timeout(now);
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Publish { packet_id: Some(id), .. } => conn.acknowledge(id),
                Event::Subscribe(s) => {
                    let codes = s.filters.iter().map(|(_, o)| ReasonCode::granted(o.qos)).collect();
                    conn.subscribed(&s, codes);
                }
                _ => {}
            }
        }
        let version = conn.protocol();
        let out = conn.transmit();
        while let Some(p) = decode(out, usize::MAX, version).expect("the broker writes valid packets") {
            let _ = p;
        }
        assert!(out.is_empty());
    }
});
