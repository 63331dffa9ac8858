//! Arbitrary bytes into the firmware manifest parser: it must never panic; whatever it
//! accepts has canonical bytes that are compact JSON, re-parses to the same manifest, and
//! verifies (or is refused with a reason) without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stratus_firmware::{ImageDigest, Manifest, Policy, SigningKey, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let canonical = m.canonical_bytes();
        assert!(!canonical.contains(&b' '), "canonical bytes have no whitespace");
        let again = Manifest::parse(m.to_json_pretty().as_bytes()).expect("a parsed manifest re-parses");
        assert_eq!(again, m);
        let key = SigningKey::from_bytes(&[7; 32]);
        let trusted: TrustedKeys = [key.verifying_key()].into_iter().collect();
        let digest = ImageDigest::of_bytes(data);
        let _ = stratus_firmware::verify(&m, &digest, &trusted, &Policy::default());
        let _ = m.parsed_version();
    }
});
