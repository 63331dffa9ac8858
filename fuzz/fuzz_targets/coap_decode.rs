//! Arbitrary bytes into the CoAP decoder: it must never panic, whatever it accepts must
//! re-encode to exactly the same bytes (the encoding is canonical), and the typed option
//! accessors must never panic on what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_coap::{decode, encode, Header};

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data);
    if let Ok(msg) = decode(data) {
        let again = encode(&msg).expect("a decoded message encodes");
        assert_eq!(&again[..], data, "decode/encode is the identity");
        let o = &msg.options;
        let _ = o.uri_path_string();
        let _ = o.uri_query();
        let _ = o.uri_host();
        let _ = o.uri_port();
        let _ = o.observe();
        let _ = o.block1();
        let _ = o.block2();
        let _ = o.size1();
        let _ = o.size2();
        let _ = o.content_format();
        let _ = o.accept();
        let _ = o.max_age();
        let _ = o.etags();
        let _ = o.proxy_uri();
    }
});
