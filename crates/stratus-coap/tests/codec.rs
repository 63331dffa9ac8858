//! Codec tests: RFC 7252 examples, every option delta/length encoding boundary, every
//! malformed case the decoder must refuse, typed options, and properties over random input.

use bytes::Bytes;
use proptest::prelude::*;
use stratus_coap::option::{decode_uint, encode_uint};
use stratus_coap::*;

fn roundtrip(m: &Message) -> Vec<u8> {
    let wire = encode(m).unwrap();
    assert_eq!(wire.len(), codec::encoded_len(m));
    let back = decode(&wire).unwrap();
    assert_eq!(&back, m, "wire {:02x?}", &wire[..]);
    // Canonical: re-encoding gives the same bytes.
    assert_eq!(encode(&back).unwrap(), wire);
    wire.to_vec()
}

#[test]
fn rfc7252_appendix_a_get_with_piggybacked_response() {
    // Figure 16: CON [0x7d34] GET /temperature, and ACK [0x7d34] 2.05 "22.3 C".
    let get = Message::request(
        MessageType::Confirmable,
        Code::GET,
        0x7d34,
        Token::EMPTY,
        "/temperature",
    );
    let mut expected = vec![0x40, 0x01, 0x7d, 0x34, 0xbb];
    expected.extend_from_slice(b"temperature");
    assert_eq!(roundtrip(&get), expected);

    let content = Message::new(MessageType::Acknowledgement, Code::CONTENT, 0x7d34)
        .with_payload(&b"22.3 C"[..]);
    let mut expected = vec![0x60, 0x45, 0x7d, 0x34, 0xff];
    expected.extend_from_slice(b"22.3 C");
    assert_eq!(roundtrip(&content), expected);
}

#[test]
fn rfc7252_appendix_a_token_and_empty_ack() {
    // Figure 17-style: a one-byte token 0x20.
    let get = Message::request(
        MessageType::Confirmable,
        Code::GET,
        0x7d35,
        Token::new(&[0x20]).unwrap(),
        "/temperature",
    );
    let wire = roundtrip(&get);
    assert_eq!(&wire[..6], &[0x41, 0x01, 0x7d, 0x35, 0x20, 0xbb]);
    // Empty ACK and RST are exactly the 4-byte header.
    assert_eq!(
        roundtrip(&Message::empty(MessageType::Acknowledgement, 0x7d38)),
        vec![0x60, 0x00, 0x7d, 0x38]
    );
    assert_eq!(
        roundtrip(&Message::empty(MessageType::Reset, 0x1234)),
        vec![0x70, 0x00, 0x12, 0x34]
    );
}

#[test]
fn every_header_field_round_trips() {
    for t in [
        MessageType::Confirmable,
        MessageType::NonConfirmable,
        MessageType::Acknowledgement,
        MessageType::Reset,
    ] {
        for code in [
            Code::GET,
            Code::IPATCH,
            Code::CONTENT,
            Code::CONTINUE,
            Code::PROXYING_NOT_SUPPORTED,
            Code(0xff),
        ] {
            for tkl in 0..=8usize {
                let token = Token::new(&[0xa5; 8][..tkl]).unwrap();
                for mid in [0u16, 1, 0x7fff, 0xffff] {
                    let m = Message::new(t, code, mid).with_token(token);
                    let wire = roundtrip(&m);
                    assert_eq!(wire[0], 0x40 | (t.bits() << 4) | tkl as u8);
                    assert_eq!(wire[1], code.0);
                    assert_eq!(u16::from_be_bytes([wire[2], wire[3]]), mid);
                    assert_eq!(wire.len(), 4 + tkl);
                }
            }
        }
    }
}

/// The option header bytes (after the 4-byte header) of a message with one option.
fn option_header(number: u16, len: usize) -> Vec<u8> {
    let mut m = Message::new(MessageType::Confirmable, Code::GET, 1);
    m.options.push(number, Bytes::from(vec![0x61; len]));
    let wire = roundtrip(&m);
    wire[4..wire.len() - len].to_vec()
}

#[test]
fn option_delta_encoding_boundaries() {
    assert_eq!(option_header(0, 0), vec![0x00]);
    assert_eq!(option_header(12, 0), vec![0xc0]);
    assert_eq!(option_header(13, 0), vec![0xd0, 0x00]);
    assert_eq!(option_header(14, 0), vec![0xd0, 0x01]);
    assert_eq!(option_header(268, 0), vec![0xd0, 0xff]);
    assert_eq!(option_header(269, 0), vec![0xe0, 0x00, 0x00]);
    assert_eq!(option_header(270, 0), vec![0xe0, 0x00, 0x01]);
    assert_eq!(option_header(65535, 0), vec![0xe0, 0xfe, 0xf2]);
}

#[test]
fn option_length_encoding_boundaries() {
    assert_eq!(option_header(1, 12), vec![0x1c]);
    assert_eq!(option_header(1, 13), vec![0x1d, 0x00]);
    assert_eq!(option_header(1, 268), vec![0x1d, 0xff]);
    assert_eq!(option_header(1, 269), vec![0x1e, 0x00, 0x00]);
    assert_eq!(option_header(1, 1000), vec![0x1e, 0x02, 0xdb]);
    assert_eq!(
        option_header(1, codec::MAX_OPTION_LEN),
        vec![0x1e, 0xff, 0xff]
    );
    // Both extended at once: delta first, then length.
    assert_eq!(option_header(300, 300), vec![0xee, 0x00, 0x1f, 0x00, 0x1f]);
    assert_eq!(option_header(20, 20), vec![0xdd, 0x07, 0x07]);
}

#[test]
fn deltas_between_consecutive_options() {
    let mut m = Message::new(MessageType::Confirmable, Code::GET, 1);
    m.options.push(11u16, Bytes::from_static(b"a"));
    m.options.push(11u16, Bytes::from_static(b"b"));
    m.options.push(300u16, Bytes::new());
    m.options.push(3u16, Bytes::from_static(b"h"));
    let wire = roundtrip(&m);
    // Uri-Host(3) first, then Uri-Path a (delta 8), b (delta 0), then 300 (delta 289).
    assert_eq!(
        &wire[4..],
        &[0x31, b'h', 0x81, b'a', 0x01, b'b', 0xe0, 0x00, 0x14]
    );
}

#[test]
fn too_long_option_and_non_empty_empty_message_do_not_encode() {
    let mut m = Message::new(MessageType::Confirmable, Code::GET, 1);
    m.options
        .push(1u16, Bytes::from(vec![0; codec::MAX_OPTION_LEN + 1]));
    assert!(matches!(encode(&m), Err(EncodeError::OptionTooLong { .. })));
    let e = Message::empty(MessageType::Acknowledgement, 1).with_token(Token::new(&[1]).unwrap());
    assert_eq!(encode(&e), Err(EncodeError::NonEmptyEmptyMessage));
    let e = Message::empty(MessageType::Acknowledgement, 1).with_payload(&b"x"[..]);
    assert_eq!(encode(&e), Err(EncodeError::NonEmptyEmptyMessage));
}

#[test]
fn payload_marker_rules() {
    // No payload: no marker.
    let m = Message::new(MessageType::NonConfirmable, Code::CONTENT, 9);
    assert_eq!(roundtrip(&m), vec![0x50, 0x45, 0x00, 0x09]);
    // Marker followed by nothing is a format error.
    assert_eq!(
        decode(&[0x50, 0x45, 0x00, 0x09, 0xff]),
        Err(DecodeError::EmptyPayload)
    );
    // A payload may contain 0xff bytes.
    let m = m.with_payload(&[0xff, 0xff][..]);
    assert_eq!(
        roundtrip(&m),
        vec![0x50, 0x45, 0x00, 0x09, 0xff, 0xff, 0xff]
    );
}

#[test]
fn malformed_datagrams_are_named() {
    use DecodeError::*;
    let cases: &[(&[u8], DecodeError)] = &[
        (&[], TooShort(0)),
        (&[0x40, 0x01, 0x00], TooShort(3)),
        (&[0x00, 0x01, 0x00, 0x01], UnsupportedVersion(0)),
        (&[0x80, 0x01, 0x00, 0x01], UnsupportedVersion(2)),
        (&[0xc0, 0x01, 0x00, 0x01], UnsupportedVersion(3)),
        (
            &[0x49, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9],
            InvalidTokenLength(9),
        ),
        (&[0x4f, 0x01, 0x00, 0x01], InvalidTokenLength(15)),
        (&[0x44, 0x01, 0x00, 0x01, 1, 2], TruncatedToken),
        (&[0x40, 0x00, 0x00, 0x01, 0x00], NonEmptyEmptyMessage),
        (&[0x41, 0x00, 0x00, 0x01, 0x07], NonEmptyEmptyMessage),
        (&[0x60, 0x00, 0x00, 0x01, 0xff, 0x01], NonEmptyEmptyMessage),
        (&[0x40, 0x01, 0x00, 0x01, 0xf0], ReservedOptionNibble),
        (&[0x40, 0x01, 0x00, 0x01, 0x1f], ReservedOptionNibble),
        (&[0x40, 0x01, 0x00, 0x01, 0xd0], TruncatedOption),
        (&[0x40, 0x01, 0x00, 0x01, 0xe0, 0x00], TruncatedOption),
        (&[0x40, 0x01, 0x00, 0x01, 0x1d], TruncatedOption),
        (&[0x40, 0x01, 0x00, 0x01, 0x1e, 0x01], TruncatedOption),
        (&[0x40, 0x01, 0x00, 0x01, 0xb3, b'a', b'b'], TruncatedOption),
        (
            &[0x40, 0x01, 0x00, 0x01, 0xe0, 0xfe, 0xf2, 0x10],
            OptionNumberOverflow,
        ),
        (&[0x40, 0x01, 0x00, 0x01, 0xff], EmptyPayload),
    ];
    for (bytes, err) in cases {
        assert_eq!(decode(bytes).as_ref(), Err(err), "{bytes:02x?}");
    }
    assert!(!TooShort(3).header_readable());
    assert!(!UnsupportedVersion(2).header_readable());
    assert!(InvalidTokenLength(9).header_readable());
    assert!(EmptyPayload.header_readable());
}

#[test]
fn header_parses_from_any_four_bytes() {
    let h = Header::parse(&[0x9f, 0x45, 0xab, 0xcd, 0x00]).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.message_type, MessageType::NonConfirmable);
    assert_eq!(h.token_length, 15);
    assert_eq!(h.code, Code::CONTENT);
    assert_eq!(h.message_id, 0xabcd);
    assert_eq!(Header::parse(&[0x40, 1, 2]), None);
}

#[test]
fn decode_bytes_is_zero_copy() {
    let mut m = Message::request(MessageType::Confirmable, Code::PUT, 5, Token::EMPTY, "/a");
    m.payload = Bytes::from_static(b"hello world");
    let wire = encode(&m).unwrap();
    let back = decode_bytes(wire.clone()).unwrap();
    let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
    assert!(range.contains(&(back.payload.as_ptr() as usize)));
}

#[test]
fn codes_have_classes_details_and_names() {
    assert_eq!(Code::CONTENT.to_string(), "2.05");
    assert_eq!(format!("{:#}", Code::CONTENT), "2.05 Content");
    assert_eq!(
        format!("{:#}", Code::REQUEST_ENTITY_TOO_LARGE),
        "4.13 Request Entity Too Large"
    );
    assert_eq!(Code::CONTINUE.to_string(), "2.31");
    assert_eq!(Code::new(4, 2), Some(Code::BAD_OPTION));
    assert_eq!(Code::new(8, 0), None);
    assert_eq!(Code::new(2, 32), None);
    assert_eq!(Code::BAD_OPTION.0, 0x82);
    assert_eq!(Code::SERVICE_UNAVAILABLE.class(), 5);
    assert_eq!(Code::SERVICE_UNAVAILABLE.detail(), 3);
    assert_eq!(Code::GET.kind(), CodeKind::Request);
    assert_eq!(Code(0x1f).kind(), CodeKind::Request);
    assert_eq!(Code::EMPTY.kind(), CodeKind::Empty);
    assert_eq!(Code::new(1, 0).unwrap().kind(), CodeKind::Reserved);
    assert_eq!(Code::new(3, 1).unwrap().kind(), CodeKind::Reserved);
    assert_eq!(Code::new(7, 31).unwrap().kind(), CodeKind::Reserved);
    assert!(Code::NOT_FOUND.is_error() && !Code::NOT_FOUND.is_success());
    assert_eq!(Code::new(2, 6).unwrap().name(), None);
    assert_eq!(Code::IPATCH.name(), Some("iPATCH"));
}

#[test]
fn option_number_properties() {
    assert!(OptionNumber::URI_PATH.is_critical());
    assert!(!OptionNumber::ETAG.is_critical());
    assert!(OptionNumber::URI_HOST.is_unsafe());
    assert!(!OptionNumber::ETAG.is_unsafe());
    assert!(OptionNumber::SIZE1.is_no_cache_key());
    assert!(OptionNumber::SIZE2.is_no_cache_key());
    assert!(!OptionNumber::BLOCK2.is_no_cache_key());
    assert_eq!(OptionNumber::BLOCK1.name(), Some("Block1"));
    assert_eq!(OptionNumber(9).name(), None);
    let def = OptionNumber::ETAG.definition().unwrap();
    assert!(!def.is_valid(b""));
    assert!(def.is_valid(b"12345678"));
    assert!(!def.is_valid(b"123456789"));
    assert!(!OptionNumber::URI_PATH
        .definition()
        .unwrap()
        .is_valid(&[0xff]));
}

#[test]
fn uint_encoding_is_shortest() {
    assert_eq!(encode_uint(0), Bytes::new());
    assert_eq!(encode_uint(1), Bytes::from_static(&[1]));
    assert_eq!(encode_uint(255), Bytes::from_static(&[255]));
    assert_eq!(encode_uint(256), Bytes::from_static(&[1, 0]));
    assert_eq!(encode_uint(0x0100_0000), Bytes::from_static(&[1, 0, 0, 0]));
    assert_eq!(decode_uint(&[0, 0, 5]), Some(5));
    assert_eq!(decode_uint(&[]), Some(0));
    assert_eq!(decode_uint(&[1, 2, 3, 4, 5]), None);
}

#[test]
fn block_option_boundaries() {
    for (num, more, szx, wire) in [
        (0u32, false, 0u8, vec![]),
        (0, true, 6, vec![0x0e]),
        (15, false, 2, vec![0xf2]),
        (16, true, 6, vec![0x01, 0x0e]),
        (4095, false, 0, vec![0xff, 0xf0]),
        (4096, false, 1, vec![0x01, 0x00, 0x01]),
        ((1 << 20) - 1, true, 6, vec![0xff, 0xff, 0xfe]),
    ] {
        let b = BlockOption::new(num, more, szx).unwrap();
        assert_eq!(b.encode().to_vec(), wire, "{b:?}");
        assert_eq!(BlockOption::decode(OptionNumber::BLOCK2, &wire), Ok(b));
    }
    assert_eq!(BlockOption::new(1 << 20, false, 0), None);
    assert_eq!(BlockOption::new(0, false, 7), None);
    assert_eq!(
        BlockOption::decode(OptionNumber::BLOCK1, &[0x07]),
        Err(OptionError::ReservedSzx(OptionNumber::BLOCK1))
    );
    assert!(BlockOption::decode(OptionNumber::BLOCK1, &[1, 2, 3, 4]).is_err());
    let b = BlockOption::new(3, false, 2).unwrap();
    assert_eq!((b.size(), b.offset()), (64, 192));
}

#[test]
fn typed_accessors_read_and_write() {
    let mut o = Options::new();
    o.set_uri_path("/devices//d1/config/");
    o.add_uri_query("token=abc");
    o.add_uri_query("x=1");
    o.set_uri_host("example.net");
    o.set_uri_port(5683);
    o.set_content_format(ContentFormat::JSON);
    o.set_accept(ContentFormat::CBOR);
    o.set_etag(b"0123456789");
    o.set_observe(0x0123_4567);
    o.set_block2(BlockOption::new(2, true, 5).unwrap());
    o.set_block1(BlockOption::new(1, false, 4).unwrap());
    o.set_size1(70000);
    o.set_size2(5);
    o.set_max_age(120);
    o.add_if_match(b"e1");
    o.set_if_none_match();
    o.set_location_path("/a/b");
    o.add_location_query("q");
    o.set_proxy_uri("coap://x/y");
    o.set_proxy_scheme("coap");
    assert_eq!(o.uri_path().unwrap(), vec!["devices", "d1", "config"]);
    assert_eq!(o.uri_path_string().unwrap(), "/devices/d1/config");
    assert_eq!(o.uri_query().unwrap(), vec!["token=abc", "x=1"]);
    assert_eq!(o.uri_host().unwrap(), Some("example.net"));
    assert_eq!(o.uri_port().unwrap(), Some(5683));
    assert_eq!(o.content_format().unwrap(), Some(ContentFormat::JSON));
    assert_eq!(o.accept().unwrap(), Some(ContentFormat(60)));
    assert_eq!(o.etag(), Some(&b"01234567"[..]));
    assert_eq!(o.observe().unwrap(), Some(0x23_4567));
    assert_eq!(o.block2().unwrap(), BlockOption::new(2, true, 5));
    assert_eq!(o.block1().unwrap(), BlockOption::new(1, false, 4));
    assert_eq!(o.size1().unwrap(), Some(70000));
    assert_eq!(o.size2().unwrap(), Some(5));
    assert_eq!(o.max_age().unwrap(), Some(120));
    assert_eq!(o.if_match(), vec![&b"e1"[..]]);
    assert!(o.if_none_match());
    assert_eq!(o.location_path().unwrap(), vec!["a", "b"]);
    assert_eq!(o.location_query().unwrap(), vec!["q"]);
    assert_eq!(o.proxy_uri().unwrap(), Some("coap://x/y"));
    assert_eq!(o.proxy_scheme().unwrap(), Some("coap"));
    // Wire order is by number, and survives a round trip.
    let numbers: Vec<u16> = o.iter().map(|x| x.number.0).collect();
    let mut sorted = numbers.clone();
    sorted.sort();
    assert_eq!(numbers, sorted);
    let mut m = Message::new(MessageType::Confirmable, Code::GET, 1);
    m.options = o;
    roundtrip(&m);
    // Empty Uri-Path is "/".
    assert_eq!(Options::new().uri_path_string().unwrap(), "/");
}

#[test]
fn typed_accessors_report_bad_values() {
    let mut o = Options::new();
    o.push(OptionNumber::URI_PATH, Bytes::from_static(&[0xc3, 0x28]));
    o.push(OptionNumber::CONTENT_FORMAT, Bytes::from_static(&[1, 2, 3]));
    o.push(OptionNumber::OBSERVE, Bytes::from_static(&[1, 2, 3, 4]));
    o.push(OptionNumber::BLOCK2, Bytes::from_static(&[0x0f]));
    assert_eq!(
        o.uri_path(),
        Err(OptionError::InvalidUtf8(OptionNumber::URI_PATH))
    );
    assert!(matches!(
        o.content_format(),
        Err(OptionError::InvalidLength { len: 3, .. })
    ));
    assert!(o.observe().is_err());
    assert_eq!(
        o.block2(),
        Err(OptionError::ReservedSzx(OptionNumber::BLOCK2))
    );
}

#[test]
fn options_keep_insertion_order_among_equal_numbers() {
    let mut o = Options::new();
    o.push(OptionNumber::URI_QUERY, Bytes::from_static(b"b"));
    o.push(OptionNumber::URI_PATH, Bytes::from_static(b"x"));
    o.push(OptionNumber::URI_QUERY, Bytes::from_static(b"a"));
    o.push(OptionNumber::URI_PATH, Bytes::from_static(b"y"));
    assert_eq!(o.uri_query().unwrap(), vec!["b", "a"]);
    assert_eq!(o.uri_path().unwrap(), vec!["x", "y"]);
    assert_eq!(o.remove(OptionNumber::URI_QUERY), 2);
    assert_eq!(o.len(), 2);
    o.set(OptionNumber::URI_PATH, Bytes::from_static(b"z"));
    assert_eq!(o.uri_path().unwrap(), vec!["z"]);
}

#[test]
fn content_formats() {
    assert_eq!(ContentFormat::TEXT_PLAIN.0, 0);
    assert_eq!(ContentFormat::LINK_FORMAT.0, 40);
    assert_eq!(ContentFormat::OCTET_STREAM.0, 42);
    assert_eq!(ContentFormat::JSON.0, 50);
    assert_eq!(ContentFormat::CBOR.0, 60);
    assert_eq!(ContentFormat::JSON.media_type(), Some("application/json"));
    assert_eq!(ContentFormat(9999).media_type(), None);
}

fn arb_message() -> impl Strategy<Value = Message> {
    let option = (
        prop_oneof![
            0u16..20,
            0u16..300,
            Just(12u16),
            Just(13),
            Just(268),
            Just(269),
            Just(65535),
            any::<u16>()
        ],
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..15),
            proptest::collection::vec(any::<u8>(), 260..275),
            Just(vec![7u8; 12]),
            Just(vec![7u8; 13]),
        ],
    );
    (
        0u8..4,
        1u8..=255,
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..=8),
        proptest::collection::vec(option, 0..6),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(t, code, mid, token, options, payload)| {
            let mut m = Message::new(MessageType::from_bits(t), Code(code), mid)
                .with_token(Token::new(&token).unwrap())
                .with_payload(payload);
            for (n, v) in options {
                m.options.push(n, v);
            }
            m
        })
}

proptest! {
    /// Any message round-trips, byte-exactly.
    #[test]
    fn messages_round_trip(m in arb_message()) {
        let wire = encode(&m).unwrap();
        prop_assert_eq!(wire.len(), codec::encoded_len(&m));
        let back = decode(&wire).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(encode(&back).unwrap(), wire);
    }

    /// Every strict prefix of a valid message with options or payload is an error or a
    /// shorter valid message, never a panic.
    #[test]
    fn truncations_never_panic(m in arb_message()) {
        let wire = encode(&m).unwrap();
        for cut in 0..wire.len() {
            let _ = decode(&wire[..cut]);
        }
    }

    /// Random bytes never panic the decoder, and what it accepts re-encodes to the same bytes.
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
        if let Ok(m) = decode(&data) {
            prop_assert_eq!(encode(&m).unwrap().to_vec(), data);
        }
    }

    /// Random bytes behind a valid CoAP header exercise the option parser.
    #[test]
    fn random_options_never_panic(tkl in 0u8..=8, rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut data = vec![0x40 | tkl, 0x01, 0x12, 0x34];
        data.extend_from_slice(&rest);
        if let Ok(m) = decode(&data) {
            prop_assert_eq!(encode(&m).unwrap().to_vec(), data);
            // Typed accessors never panic on whatever came in.
            let _ = m.options.uri_path();
            let _ = m.options.block1();
            let _ = m.options.block2();
            let _ = m.options.observe();
            let _ = m.options.content_format();
        }
    }
}
