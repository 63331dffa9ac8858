//! Arbitrary bytes into the MQTT decoder: it must never panic, and whatever it accepts must
//! re-encode to bytes that decode to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use stratus_mqtt::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(&mut buf, 64 * 1024) {
        let mut out = BytesMut::new();
        if encode(&packet, &mut out).is_ok() {
            let again = decode(&mut out, usize::MAX).expect("re-encoded packet decodes");
            assert_eq!(again, Some(packet));
        }
    }
});
