//! Signing and verification: a good manifest verifies; each way of breaking it is refused
//! with its own reason; the canonical bytes are pinned; key files round-trip.

use stratus_firmware::{
    generate_key, key_id, parse_public_key, parse_signing_key, public_key_pem, sign,
    signing_key_pem, verify, verify_signature, ImageDigest, ImageHasher, Manifest, Policy,
    SigningKey, TrustedKeys, VerifyError, Version,
};

fn image() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 251) as u8).collect()
}

fn fixed_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn trusted(key: &SigningKey) -> TrustedKeys {
    [key.verifying_key()].into_iter().collect()
}

#[test]
fn a_signed_manifest_verifies() {
    let key = generate_key().unwrap();
    let img = image();
    let digest = ImageDigest::of_bytes(&img);
    let m = sign(&key, &digest, "1.2.3", Some("board-a")).unwrap();
    assert_eq!(m.size, img.len() as u64);
    assert_eq!(m.key_id, key_id(&key.verifying_key()));
    assert_eq!(m.key_id.len(), 16);
    verify(&m, &digest, &trusted(&key), &Policy::default()).unwrap();
    // through JSON and back
    let again = Manifest::parse(m.to_json_pretty().as_bytes()).unwrap();
    assert_eq!(again, m);
    verify(&again, &digest, &trusted(&key), &Policy::default()).unwrap();
}

#[test]
fn streaming_hash_equals_one_shot() {
    let img = image();
    let mut h = ImageHasher::new();
    for piece in img.chunks(777) {
        h.update(piece);
    }
    assert_eq!(h.size(), img.len() as u64);
    let streamed = h.finish();
    assert_eq!(streamed, ImageDigest::of_bytes(&img));
    assert_eq!(streamed, ImageDigest::of_reader(&img[..]).unwrap());
    // a known vector: sha256("abc")
    assert_eq!(
        ImageDigest::of_bytes(b"abc").sha256_hex(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_flipped_byte_is_a_hash_mismatch() {
    let key = fixed_key(1);
    let mut img = image();
    let m = sign(&key, &ImageDigest::of_bytes(&img), "1.0.0", None).unwrap();
    img[5000] ^= 0x01;
    let err = verify(
        &m,
        &ImageDigest::of_bytes(&img),
        &trusted(&key),
        &Policy::default(),
    )
    .unwrap_err();
    assert!(matches!(err, VerifyError::HashMismatch { .. }), "{err}");
    assert_eq!(err.code(), "hash_mismatch");
    assert!(err.to_string().starts_with("hash mismatch"));
}

#[test]
fn a_truncated_image_is_a_size_mismatch() {
    let key = fixed_key(1);
    let img = image();
    let m = sign(&key, &ImageDigest::of_bytes(&img), "1.0.0", None).unwrap();
    let err = verify(
        &m,
        &ImageDigest::of_bytes(&img[..img.len() - 1]),
        &trusted(&key),
        &Policy::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        VerifyError::SizeMismatch {
            expected: 100_000,
            actual: 99_999
        }
    );
}

#[test]
fn an_untrusted_key_is_unknown() {
    let img = image();
    let d = ImageDigest::of_bytes(&img);
    let m = sign(&fixed_key(2), &d, "1.0.0", None).unwrap();
    let err = verify(&m, &d, &trusted(&fixed_key(1)), &Policy::default()).unwrap_err();
    assert_eq!(err.code(), "unknown_key");
    assert!(err.to_string().contains(&m.key_id));
    let err = verify(&m, &d, &TrustedKeys::new(), &Policy::default()).unwrap_err();
    assert_eq!(err.code(), "unknown_key");
}

#[test]
fn a_changed_field_or_a_forged_key_id_is_a_bad_signature() {
    let key = fixed_key(1);
    let img = image();
    let d = ImageDigest::of_bytes(&img);
    let good = sign(&key, &d, "1.0.0", Some("board-a")).unwrap();
    let t = trusted(&key);

    let mut m = good.clone();
    m.version = "9.0.0".into();
    assert_eq!(
        verify_signature(&m, &t).unwrap_err().code(),
        "bad_signature"
    );

    let mut m = good.clone();
    m.hardware = None;
    assert_eq!(
        verify_signature(&m, &t).unwrap_err().code(),
        "bad_signature"
    );

    // another key signs, but claims the trusted key's id
    let evil = fixed_key(9);
    let mut m = sign(&evil, &d, "1.0.0", Some("board-a")).unwrap();
    m.key_id = good.key_id.clone();
    let err = verify(&m, &d, &t, &Policy::default()).unwrap_err();
    assert_eq!(err.code(), "bad_signature");

    // a signature of the right length but zeros
    let mut m = good.clone();
    m.signature = base64_of(&[0u8; 64]);
    assert_eq!(
        verify_signature(&m, &t).unwrap_err().code(),
        "bad_signature"
    );
}

fn base64_of(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // tiny standard base64 encoder so the test does not trust the crate's own encoding
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.write_char(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]))
                    .unwrap();
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn downgrade_and_same_version_are_refused() {
    let key = fixed_key(1);
    let img = image();
    let d = ImageDigest::of_bytes(&img);
    let t = trusted(&key);
    let m = sign(&key, &d, "1.9.0", None).unwrap();
    let policy = |v: &str| Policy {
        hardware: None,
        installed: Some(Version::parse(v).unwrap()),
    };
    verify(&m, &d, &t, &policy("1.8.99")).unwrap();
    let err = verify(&m, &d, &t, &policy("1.10.0")).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Downgrade {
            offered: "1.9.0".into(),
            installed: "1.10.0".into()
        }
    );
    assert_eq!(
        verify(&m, &d, &t, &policy("1.9")).unwrap_err().code(),
        "downgrade"
    );
}

#[test]
fn foreign_hardware_is_refused_and_any_hardware_accepted() {
    let key = fixed_key(1);
    let d = ImageDigest::of_bytes(&image());
    let t = trusted(&key);
    let for_a = sign(&key, &d, "2.0.0", Some("board-a")).unwrap();
    let for_any = sign(&key, &d, "2.0.0", None).unwrap();
    let on = |h: &str| Policy {
        hardware: Some(h.into()),
        installed: None,
    };
    verify(&for_a, &d, &t, &on("board-a")).unwrap();
    verify(&for_any, &d, &t, &on("board-b")).unwrap();
    let err = verify(&for_a, &d, &t, &on("board-b")).unwrap_err();
    assert_eq!(err.code(), "wrong_hardware");
    assert!(err.to_string().contains("board-b"));
}

#[test]
fn versions_compare_numerically() {
    let v = |s: &str| Version::parse(s).unwrap();
    assert!(v("1.10.0") > v("1.9.9"));
    assert!(v("2") > v("1.99.99"));
    assert_eq!(v("1.2"), v("1.2.0"));
    assert!(v("0.0.1") > v("0"));
    for bad in [
        "",
        "1..2",
        "1.2.",
        "v1",
        "1.02",
        "1.2.3-rc1",
        "1.2.3.4.5.6.7.8.9",
        "99999999999999999999",
    ] {
        assert!(Version::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn canonical_bytes_are_pinned() {
    let m = Manifest {
        version: "1.2.3".into(),
        size: 42,
        sha256: "ab".repeat(32),
        signature: "ignored".into(),
        key_id: "0123456789abcdef".into(),
        hardware: Some("board-a".into()),
    };
    let expected = format!(
        "{{\"hardware\":\"board-a\",\"key_id\":\"0123456789abcdef\",\"sha256\":\"{}\",\"size\":42,\"version\":\"1.2.3\"}}",
        "ab".repeat(32)
    );
    assert_eq!(String::from_utf8(m.canonical_bytes()).unwrap(), expected);
    let mut any = m.clone();
    any.hardware = None;
    any.signature = "different".into();
    assert!(String::from_utf8(any.canonical_bytes())
        .unwrap()
        .starts_with("{\"hardware\":null,\"key_id\""));

    // a fixed key signs deterministically (Ed25519): the signature of this manifest is pinned
    let key = fixed_key(7);
    let d = ImageDigest::of_bytes(b"stratus");
    let a = sign(&key, &d, "1.0.0", None).unwrap();
    let b = sign(&key, &d, "1.0.0", None).unwrap();
    assert_eq!(a.signature, b.signature);
    // field order in the document does not matter, only the canonical bytes do
    let reordered = format!(
        "{{\"signature\":\"{}\",\"hardware\":null,\"size\":{},\"version\":\"1.0.0\",\"key_id\":\"{}\",\"sha256\":\"{}\"}}",
        a.signature, a.size, a.key_id, a.sha256
    );
    let parsed = Manifest::parse(reordered.as_bytes()).unwrap();
    verify(&parsed, &d, &trusted(&key), &Policy::default()).unwrap();
}

#[test]
fn malformed_manifests_name_the_field() {
    let key = fixed_key(1);
    let good = sign(&key, &ImageDigest::of_bytes(b"x"), "1.0.0", None).unwrap();
    let json = serde_json::to_value(&good).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut j = json.clone();
        j[field] = value;
        Manifest::parse(j.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    };
    assert!(with("sha256", "AB".repeat(32).into()).contains("sha256"));
    assert!(with("key_id", "xyz".into()).contains("key_id"));
    assert!(with("signature", "!!".into()).contains("signature"));
    assert!(with("signature", "AAAA".into()).contains("64 bytes"));
    assert!(with("version", "1.x".into()).contains("version"));
    assert!(with("hardware", "a\"b".into()).contains("hardware"));
    assert!(
        !with("size", (-1).into()).is_empty(),
        "a negative size is refused"
    );
    let mut extra = json.clone();
    extra["extra"] = 1.into();
    assert!(Manifest::parse(extra.to_string().as_bytes())
        .unwrap_err()
        .to_string()
        .contains("extra"));
    assert!(Manifest::parse(b"not json").is_err());
    assert!(Manifest::parse(&vec![b' '; 5000]).is_err());
    // signing refuses what could not be verified later
    assert!(sign(&key, &ImageDigest::of_bytes(b"x"), "latest", None).is_err());
    assert!(sign(&key, &ImageDigest::of_bytes(b"x"), "1.0", Some("")).is_err());
}

#[test]
fn key_files_round_trip_as_pem_and_raw_base64() {
    let key = generate_key().unwrap();
    let pem = signing_key_pem(&key).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(parse_signing_key(&pem).unwrap().to_bytes(), key.to_bytes());
    let pub_pem = public_key_pem(&key.verifying_key()).unwrap();
    assert!(pub_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(parse_public_key(&pub_pem).unwrap(), key.verifying_key());
    let raw = base64_of(key.verifying_key().as_bytes());
    assert_eq!(parse_public_key(&raw).unwrap(), key.verifying_key());
    let raw_seed = base64_of(&key.to_bytes());
    assert_eq!(
        parse_signing_key(&raw_seed).unwrap().to_bytes(),
        key.to_bytes()
    );
    assert!(parse_public_key("garbage").is_err());
    assert!(
        parse_public_key(&pem).is_err(),
        "a private key is not a public key"
    );
    // the identity point is a weak key
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert!(parse_public_key(&base64_of(&identity)).is_err());
    // two fresh keys differ
    assert_ne!(generate_key().unwrap().to_bytes(), key.to_bytes());
}
