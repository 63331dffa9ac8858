//! The CoAPS pre-shared key of a device, derived from its secret: one function that the
//! server (which stores the key, sealed, when it knows the secret) and the device SDK (which
//! knows the secret) both call, so both sides compute the same key.
//!
//! `PSK = base64url_nopad(HMAC-SHA256(key = device secret (UTF-8), "stratus-coap-psk/v1:" ‖ device id))`
//!
//! used as the 43 ASCII bytes of the base64url text: text, because tools take PSKs as text
//! (`coap-client -u ID -k PSK`, aiocoap's `{"ascii": …}`). The PSK identity is the device id.
//! In a shell: `printf 'stratus-coap-psk/v1:%s' ID | openssl mac -digest SHA256 -macopt
//! key:SECRET -binary HMAC | basenc --base64url | tr -d '='`, or `stratus device psk ID
//! --secret SECRET`.

use base64::Engine;
use sha2::{Digest, Sha256};

/// The label of the PSK derivation (the HMAC message is the label followed by the device id).
pub const PSK_LABEL: &str = "stratus-coap-psk/v1:";

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = k;
    let mut opad = k;
    ipad.iter_mut().for_each(|b| *b ^= 0x36);
    opad.iter_mut().for_each(|b| *b ^= 0x5c);
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// The CoAPS PSK of device `device_id` whose secret is `secret`: 43 ASCII bytes.
pub fn device_psk(secret: &str, device_id: &str) -> String {
    let mut msg = Vec::with_capacity(PSK_LABEL.len() + device_id.len());
    msg.extend_from_slice(PSK_LABEL.as_bytes());
    msg.extend_from_slice(device_id.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hmac_sha256(secret.as_bytes(), &msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn psk_is_bound_to_the_secret_and_the_id() {
        let a = device_psk("s3cret", "dev-1");
        assert_eq!(a, device_psk("s3cret", "dev-1"));
        assert_ne!(a, device_psk("s3cret", "dev-2"));
        assert_ne!(a, device_psk("other", "dev-1"));
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&a)
            .unwrap();
        assert_eq!(raw, hmac_sha256(b"s3cret", b"stratus-coap-psk/v1:dev-1"));
    }

    #[test]
    fn psk_matches_a_value_computed_elsewhere() {
        // python3: base64.urlsafe_b64encode(hmac.new(b"s3cret",
        //   b"stratus-coap-psk/v1:dev-1", hashlib.sha256).digest()).rstrip(b"=")
        assert_eq!(
            device_psk("s3cret", "dev-1"),
            "vkepCQBKxy49l_SmhAtBnnGAx4PGBhnLOs1yrYE9s78"
        );
    }
}
