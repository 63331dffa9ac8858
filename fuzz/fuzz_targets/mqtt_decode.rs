//! Arbitrary bytes into the MQTT decoder of every protocol version (chosen by the first input
//! byte): it must never panic, and whatever it accepts must re-encode to bytes that decode to
//! the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stratus_mqtt::{decode, encode, Packet, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let version = match selector % 3 {
        0 => ProtocolVersion::V31,
        1 => ProtocolVersion::V311,
        _ => ProtocolVersion::V5,
    };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(&mut buf, 64 * 1024, version) {
        let mut out = BytesMut::new();
        if encode(&packet, version, &mut out).is_ok() {
            // A CONNECT is encoded for the version it states, every other packet for `version`.
            let again = match &packet {
                Packet::Connect(c) => c.protocol,
                _ => version,
            };
            let decoded = decode(&mut out, usize::MAX, again).expect("re-encoded packet decodes");
            assert_eq!(decoded, Some(packet));
            assert!(out.is_empty(), "re-encoded packet decodes whole");
        }
    }
});
