//! The telemetry ingestion front end through its public API: the record format of the
//! contract, every rejection with its record index and field, the limits, CBOR, and the
//! freshness guard (window, nonce memory, reserve/commit, bounds, concurrency).

use std::sync::{Arc, Barrier};

use ciborium::Value as Cbor;
use proptest::prelude::*;
use stratus_server::ingest::{
    parse, parse_cbor, parse_json, parse_time_param, ContentFormat, FreshnessConfig,
    FreshnessGuard, IngestError, Limits, Message, Reason, ReceiveClock, Replay, TimeSource, Value,
    MAX_NESTING,
};

const NOW: i64 = 1_700_000_000_000;

fn json(s: &str) -> Result<Message, IngestError> {
    parse_json(s.as_bytes(), &Limits::default(), NOW)
}

fn ok(s: &str) -> Message {
    match json(s) {
        Ok(m) => m,
        Err(e) => panic!("{s} refused: {e}"),
    }
}

/// The (index, field, reason) of an `Invalid` refusal.
fn refused(s: &str) -> (Option<usize>, Option<String>, Reason) {
    refused_with(s, &Limits::default())
}

fn refused_with(s: &str, limits: &Limits) -> (Option<usize>, Option<String>, Reason) {
    match parse_json(s.as_bytes(), limits, NOW) {
        Err(IngestError::Invalid {
            index,
            field,
            reason,
        }) => (index, field, reason),
        other => panic!("{s}: expected Invalid, got {other:?}"),
    }
}

fn at(
    index: Option<usize>,
    field: Option<&str>,
    reason: Reason,
) -> (Option<usize>, Option<String>, Reason) {
    (index, field.map(str::to_owned), reason)
}

fn cbor(value: &Cbor) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).expect("encodes");
    out
}

fn cmap(entries: Vec<(&str, Cbor)>) -> Cbor {
    Cbor::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Cbor::Text(k.to_owned()), v))
            .collect(),
    )
}

// ---- accepted forms ----------------------------------------------------------------------

#[test]
fn the_contract_example_is_accepted_verbatim() {
    let m = ok(r#"{"date": "2018-04-04", "time": "09:30:00", "temperature": 20.1}"#);
    assert_eq!(m.sent, None);
    assert_eq!(m.nonce, None);
    assert_eq!(m.records.len(), 1);
    assert_eq!(m.records[0].ts_ms, 1_522_834_200_000);
    assert_eq!(
        m.records[0].values,
        vec![("temperature".to_owned(), Value::Number(20.1))]
    );
}

#[test]
fn ts_in_epoch_milliseconds() {
    let m = ok(r#"{"ts": 1522834200123, "t": 1}"#);
    assert_eq!(m.records[0].ts_ms, 1_522_834_200_123);
    // Any past time, even before 1970.
    assert_eq!(ok(r#"{"ts": -1000, "t": 1}"#).records[0].ts_ms, -1000);
    assert_eq!(ok(r#"{"ts": 0, "t": 1}"#).records[0].ts_ms, 0);
}

#[test]
fn ts_in_rfc3339_with_offsets_and_fractions() {
    let cases = [
        ("2018-04-04T09:30:00Z", 1_522_834_200_000),
        ("2018-04-04T09:30:00.5Z", 1_522_834_200_500),
        ("2018-04-04T09:30:00.123456789Z", 1_522_834_200_123),
        ("2018-04-04T11:30:00+02:00", 1_522_834_200_000),
        ("2018-04-04T04:00:00.25-05:30", 1_522_834_200_250),
        ("1969-12-31T23:59:59.9995Z", -1),
        ("0000-01-01T00:00:00Z", -62_167_219_200_000),
        // RFC 3339 §5.6 lets applications use a space for the `T`.
        ("2018-04-04 09:30:00z", 1_522_834_200_000),
    ];
    for (ts, want) in cases {
        let m = ok(&format!(r#"{{"ts": "{ts}", "v": true}}"#));
        assert_eq!(m.records[0].ts_ms, want, "{ts}");
    }
}

#[test]
fn receive_time_when_no_time_is_given() {
    let m = ok(r#"{"humidity": 40}"#);
    assert_eq!(m.records[0].ts_ms, NOW);
}

#[test]
fn numbers_booleans_and_strings_are_series_in_input_order() {
    let m = ok(
        r#"{"n": 3, "f": -0.5, "big": 12345678901234567890, "on": false, "state": "idle", "e": 1e3}"#,
    );
    assert_eq!(
        m.records[0].values,
        vec![
            ("n".to_owned(), Value::Number(3.0)),
            ("f".to_owned(), Value::Number(-0.5)),
            (
                "big".to_owned(),
                Value::Number(12_345_678_901_234_567_890.0)
            ),
            ("on".to_owned(), Value::Bool(false)),
            ("state".to_owned(), Value::Text("idle".to_owned())),
            ("e".to_owned(), Value::Number(1000.0)),
        ]
    );
    assert_eq!(m.point_count(), 6);
}

#[test]
fn escaped_names_and_strings_are_decoded() {
    let m = ok(r#"{"t\u0065mp": "a\"b\u00e9", "ünïcode ✓": 1}"#);
    assert_eq!(
        m.records[0].values,
        vec![
            ("temp".to_owned(), Value::Text("a\"bé".to_owned())),
            ("ünïcode ✓".to_owned(), Value::Number(1.0)),
        ]
    );
}

#[test]
fn an_array_of_records() {
    let m = ok(r#"[
        {"ts": 1000, "a": 1},
        {"ts": "1970-01-01T00:00:02Z", "a": 2, "b": "x"},
        {"date": "1970-01-01", "time": "00:00:03", "a": 3},
        {"a": 4}
    ]"#);
    let got: Vec<_> = m
        .records
        .iter()
        .map(|r| (r.ts_ms, r.values.len()))
        .collect();
    assert_eq!(got, vec![(1000, 1), (2000, 2), (3000, 1), (NOW, 1)]);
    assert_eq!(m.sent, None);
    assert_eq!(m.point_count(), 5);
}

#[test]
fn an_envelope_with_sent_and_nonce() {
    let m = ok(
        r#"{"sent": 1700000000500, "nonce": "n-1", "records": [{"ts": 1, "a": 1}, {"b": true}]}"#,
    );
    assert_eq!(m.sent, Some(1_700_000_000_500));
    assert_eq!(m.nonce.as_deref(), Some("n-1"));
    assert_eq!(m.records.len(), 2);
    assert_eq!(m.records[1].ts_ms, NOW);
    // Field order does not matter, and an envelope without freshness fields is fine.
    let m = ok(r#"{"records": [{"a": 1}], "nonce": "x", "sent": 5}"#);
    assert_eq!((m.sent, m.nonce.as_deref()), (Some(5), Some("x")));
    assert_eq!(ok(r#"{"records": [{"a": 1}]}"#).records.len(), 1);
}

#[test]
fn a_single_record_carrying_sent_and_nonce() {
    let m = ok(r#"{"sent": 1700000000000, "nonce": "abc", "ts": 42, "temperature": 20.5}"#);
    assert_eq!(m.sent, Some(1_700_000_000_000));
    assert_eq!(m.nonce.as_deref(), Some("abc"));
    assert_eq!(m.records[0].ts_ms, 42);
    assert_eq!(
        m.records[0].values,
        vec![("temperature".to_owned(), Value::Number(20.5))]
    );
}

#[test]
fn whitespace_around_the_payload_is_fine() {
    assert_eq!(ok(" \n\t{\"a\": 1}\r\n ").records.len(), 1);
}

// ---- rejections: index and field -------------------------------------------------------

#[test]
fn a_bad_record_names_its_index_and_field_and_rejects_the_whole_message() {
    let s = r#"[{"a": 1}, {"a": 2}, {"a": 3}, {"ts": "yesterday", "a": 4}]"#;
    let e = json(s).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"record 3, field "ts": not epoch milliseconds or RFC 3339"#
    );
    assert_eq!(refused(s), at(Some(3), Some("ts"), Reason::BadTimestamp));
}

#[test]
fn bad_timestamps() {
    for ts in [
        r#""yesterday""#,
        r#""1522834200000""#,
        r#""2018-04-04T09:30:00""#,
        r#""2018-02-30T09:30:00Z""#,
        "1522834200000.5",
        "1.5e12",
        "true",
        "null",
        "{}",
        "[1]",
    ] {
        assert_eq!(
            refused(&format!(r#"{{"ts": {ts}, "a": 1}}"#)),
            at(Some(0), Some("ts"), Reason::BadTimestamp),
            "{ts}"
        );
    }
    for ts in ["253402300800000", "-62167219200001", "18446744073709551615"] {
        assert_eq!(
            refused(&format!(r#"{{"ts": {ts}, "a": 1}}"#)),
            at(Some(0), Some("ts"), Reason::TimestampOutOfRange),
            "{ts}"
        );
    }
}

#[test]
fn bad_date_and_time() {
    let cases = [
        (
            r#"{"date": "2018-04-04", "a": 1}"#,
            "date",
            Reason::DateWithoutTime,
        ),
        (
            r#"{"time": "09:30:00", "a": 1}"#,
            "time",
            Reason::TimeWithoutDate,
        ),
        (
            r#"{"date": "2018-02-29", "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::BadDate,
        ),
        (
            r#"{"date": "2018-13-01", "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::BadDate,
        ),
        (
            r#"{"date": "2018-4-4", "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::BadDate,
        ),
        (
            r#"{"date": "20180404", "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::BadDate,
        ),
        (
            r#"{"date": 20180404, "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::BadDate,
        ),
        (
            r#"{"date": "2018-04-04", "time": "24:00:00", "a": 1}"#,
            "time",
            Reason::BadTime,
        ),
        (
            r#"{"date": "2018-04-04", "time": "09:60:00", "a": 1}"#,
            "time",
            Reason::BadTime,
        ),
        (
            r#"{"date": "2018-04-04", "time": "09:30", "a": 1}"#,
            "time",
            Reason::BadTime,
        ),
        (
            r#"{"date": "2018-04-04", "time": "09:30:00.5", "a": 1}"#,
            "time",
            Reason::BadTime,
        ),
        (
            r#"{"date": "2018-04-04", "time": "+9:30:00", "a": 1}"#,
            "time",
            Reason::BadTime,
        ),
        (
            r#"{"ts": 1, "date": "2018-04-04", "time": "09:30:00", "a": 1}"#,
            "date",
            Reason::TsAndDateTime,
        ),
        (
            r#"{"ts": 1, "time": "09:30:00", "a": 1}"#,
            "time",
            Reason::TsAndDateTime,
        ),
    ];
    for (s, field, reason) in cases {
        assert_eq!(refused(s), at(Some(0), Some(field), reason), "{s}");
    }
    // A leap day that exists.
    assert_eq!(
        ok(r#"{"date": "2020-02-29", "time": "23:59:59", "a": 1}"#).records[0].ts_ms,
        1_583_020_799_000
    );
}

#[test]
fn null_and_array_values_are_refused_by_name() {
    let cases = [
        (r#"{"a": 1, "b": null}"#, Reason::NullValue),
        (r#"{"a": 1, "b": [1, 2]}"#, Reason::ArrayValue),
        (r#"{"a": 1, "b": []}"#, Reason::ArrayValue),
    ];
    for (s, reason) in cases {
        assert_eq!(refused(s), at(Some(0), Some("b"), reason), "{s}");
    }
    assert_eq!(
        refused(r#"[{"a": 1}, {"a": 1, "b": null}]"#),
        at(Some(1), Some("b"), Reason::NullValue)
    );
}

fn values(m: &Message, i: usize) -> Vec<(&str, &Value)> {
    m.records[i]
        .values
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

#[test]
fn nested_objects_become_dotted_series_in_input_order() {
    // A ThingsBoard-style record (issue #21 item 7).
    let m = ok(r#"{"temperature": 20.5, "loc": {"lat": 55.9, "lon": -3.2}, "ok": true}"#);
    assert_eq!(
        values(&m, 0),
        [
            ("temperature", &Value::Number(20.5)),
            ("loc.lat", &Value::Number(55.9)),
            ("loc.lon", &Value::Number(-3.2)),
            ("ok", &Value::Bool(true)),
        ]
    );
    // Down to MAX_NESTING levels of names; names that are reserved at the top are plain
    // series below it.
    assert_eq!(MAX_NESTING, 4);
    let m = ok(r#"{"a": {"b": {"c": {"d": 1}, "e": "x"}}, "s": {"ts": 5, "nonce": "n"}}"#);
    let names: Vec<&str> = values(&m, 0).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["a.b.c.d", "a.b.e", "s.ts", "s.nonce"]);
    assert_eq!(m.records[0].time_from, TimeSource::Received);
    assert_eq!(m.nonce, None);
    // In arrays and envelopes alike; an empty object adds no series.
    let m = ok(r#"{"records": [{"ts": 1, "gps": {"fix": 3}, "none": {}}]}"#);
    assert_eq!(values(&m, 0), [("gps.fix", &Value::Number(3.0))]);
    // A dotted name sent flat is the same series.
    assert_eq!(values(&ok(r#"{"loc.lat": 1}"#), 0)[0].0, "loc.lat");
}

#[test]
fn nested_objects_obey_the_limits_of_fields() {
    let cases = [
        (
            r#"{"a": {"b": {"c": {"d": {"e": 1}}}}}"#,
            "a.b.c.d",
            Reason::TooDeep { max: 4 },
        ),
        (r#"{"loc": {"pts": [1, 2]}}"#, "loc.pts", Reason::ArrayValue),
        (r#"{"loc": {"lat": null}}"#, "loc.lat", Reason::NullValue),
        (r#"{"loc": {"": 1}}"#, "loc.", Reason::EmptyKey),
        (
            r#"{"loc": {"a\u0001": 1}}"#,
            "loc.a\u{1}",
            Reason::KeyControlChars,
        ),
        (
            r#"{"loc": {"lat": 1, "lat": 2}}"#,
            "loc.lat",
            Reason::Duplicate,
        ),
        (
            r#"{"loc.lat": 1, "loc": {"lat": 2}}"#,
            "loc.lat",
            Reason::Duplicate,
        ),
    ];
    for (s, field, reason) in cases {
        assert_eq!(refused(s), at(Some(0), Some(field), reason), "{s}");
    }
    assert_eq!(
        refused(r#"{"loc": {}}"#),
        at(Some(0), None, Reason::NoSeries)
    );
    // The whole dotted name counts against max_key_len, each leaf against max_series.
    let limits = Limits {
        max_key_len: 8,
        max_series: 2,
        ..Limits::default()
    };
    assert_eq!(
        refused_with(r#"{"abcd": {"efgh": 1}}"#, &limits),
        at(Some(0), Some("abcd.efgh"), Reason::KeyTooLong { max: 8 })
    );
    assert_eq!(
        refused_with(r#"{"a": {"b": 1, "c": 2, "d": 3}}"#, &limits),
        at(Some(0), Some("a.d"), Reason::TooManySeries { max: 2 })
    );
    assert!(parse_json(br#"{"abc": {"efgh": 1}}"#, &limits, NOW).is_ok());
    // The error text names the dotted field.
    let e = json(r#"[{"a": 1}, {"loc": {"pts": [1]}}]"#).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(r#"record 1, field "loc.pts": an array"#),
        "{e}"
    );
}

#[test]
fn nested_cbor_maps_are_flattened_too() {
    let loc = cmap(vec![("lat", Cbor::Float(55.9)), ("lon", Cbor::Float(-3.2))]);
    let m = parse_cbor(
        &cbor(&cmap(vec![
            ("temperature", Cbor::Float(20.5)),
            ("loc", loc),
        ])),
        &Limits::default(),
        NOW,
    )
    .unwrap();
    let names: Vec<&str> = values(&m, 0).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ["temperature", "loc.lat", "loc.lon"]);
    let refused_cbor = |v: Cbor| match parse_cbor(&cbor(&v), &Limits::default(), NOW) {
        Err(IngestError::Invalid {
            index,
            field,
            reason,
        }) => (index, field, reason),
        other => panic!("{v:?}: {other:?}"),
    };
    let bad_key = Cbor::Map(vec![(Cbor::Integer(1.into()), Cbor::Bool(true))]);
    assert_eq!(
        refused_cbor(cmap(vec![("loc", bad_key)])),
        at(Some(0), Some("loc"), Reason::KeyNotText)
    );
    let mut deep = Cbor::Integer(1.into());
    for name in ["e", "d", "c", "b", "a"] {
        deep = cmap(vec![(name, deep)]);
    }
    assert_eq!(
        refused_cbor(Cbor::Array(vec![deep])),
        at(Some(0), Some("a.b.c.d"), Reason::TooDeep { max: 4 })
    );
}

#[test]
fn one_series_at_one_own_time_twice_in_a_message_is_refused_naming_both_records() {
    assert_eq!(
        refused(r#"[{"ts": 1000, "x": 1}, {"ts": 1000, "x": 2}]"#),
        at(
            Some(1),
            Some("x"),
            Reason::SameTime {
                record: 0,
                ts_ms: 1000
            }
        )
    );
    let e = json(r#"[{"ts": 1000, "x": 1}, {"ts": 1000, "x": 2}]"#).unwrap_err();
    assert_eq!(
        e.to_string(),
        "record 1, field \"x\": record 0 already gives this series a value at 1000 (epoch ms): \
         a series holds one value per millisecond"
    );
    // Out of order, through date/time, below the millisecond, in an envelope, nested.
    let cases = [
        (
            r#"[{"ts": 1, "x": 1}, {"ts": 2, "x": 1}, {"ts": 1, "y": 1}, {"ts": 1, "x": 3}]"#,
            3,
            "x",
            0,
            1,
        ),
        (
            r#"[{"date": "1970-01-01", "time": "00:00:01", "x": 1}, {"ts": 1000, "x": 2}]"#,
            1,
            "x",
            0,
            1000,
        ),
        (
            r#"[{"ts": "1970-01-01T00:00:01.0001Z", "x": 1}, {"ts": "1970-01-01T00:00:01.0009Z", "x": 2}]"#,
            1,
            "x",
            0,
            1000,
        ),
        (
            r#"{"records": [{"ts": 7, "g": {"x": 1}}, {"ts": 7, "g": {"x": 2}}]}"#,
            1,
            "g.x",
            0,
            7,
        ),
    ];
    for (s, index, field, record, ts_ms) in cases {
        assert_eq!(
            refused(s),
            at(Some(index), Some(field), Reason::SameTime { record, ts_ms }),
            "{s}"
        );
    }
    // Other series at that time, the same series at other times, and records without a
    // time (they get distinct receive times) are fine.
    ok(r#"[{"ts": 1000, "x": 1}, {"ts": 1000, "y": 2}, {"ts": 999, "x": 3}]"#);
    let m = ok(r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#);
    assert!(m
        .records
        .iter()
        .all(|r| r.time_from == TimeSource::Received));
}

#[test]
fn records_without_a_time_get_distinct_receive_times() {
    let mut m = ok(r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#);
    assert_eq!(m.received_count(), 3);
    ReceiveClock::new()
        .assign("d", NOW, &mut m, Some(600_000))
        .unwrap();
    let times: Vec<i64> = m.records.iter().map(|r| r.ts_ms).collect();
    assert_eq!(times, [NOW, NOW + 1, NOW + 2]);
    // Without the clock, from a given first millisecond, skipping claimed ones.
    let mut m = ok(&format!(
        r#"[{{"x": 1}}, {{"ts": {}, "x": 2}}, {{"x": 3}}]"#,
        NOW + 1
    ));
    assert_eq!(m.assign_receive_times(NOW), Some(NOW + 2));
    let times: Vec<i64> = m.records.iter().map(|r| r.ts_ms).collect();
    assert_eq!(times, [NOW, NOW + 1, NOW + 2]);
    assert_eq!(ok(r#"{"ts": 5, "x": 1}"#).assign_receive_times(NOW), None);
}

#[test]
fn times_too_far_ahead_are_refused_naming_the_record() {
    let max = 600_000;
    let body = format!(
        r#"[{{"ts": {NOW}, "x": 1}}, {{"x": 2}}, {{"ts": {}, "x": 3}}]"#,
        NOW + max
    );
    ok(&body).check_not_ahead(NOW, max).unwrap();
    let body = format!(
        r#"[{{"ts": {NOW}, "x": 1}}, {{"ts": {}, "x": 3}}]"#,
        NOW + max + 1
    );
    match ok(&body).check_not_ahead(NOW, max) {
        Err(IngestError::Invalid {
            index: Some(1),
            field: Some(f),
            reason:
                Reason::InFuture {
                    ahead_ms,
                    max_ms: 600_000,
                },
        }) if f == "ts" && ahead_ms == max + 1 => {}
        other => panic!("{other:?}"),
    }
    // The issue's example: a record dated 9999-01-01; by date and time the field is `date`.
    let e = ok(r#"{"date": "9999-01-01", "time": "00:00:00", "t": 1}"#)
        .check_not_ahead(NOW, max)
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(r#"record 0, field "date": "#)
            && text.ends_with("days ahead of the server clock; at most 600 s ahead is accepted"),
        "{text}"
    );
    let e = ok(&format!(r#"{{"ts": {}, "t": 1}}"#, NOW + 2 * 3_600_000))
        .check_not_ahead(NOW, max)
        .unwrap_err();
    assert!(e.to_string().contains(": 2 h ahead"), "{e}");
    // The past is never too far.
    ok(r#"{"ts": 0, "t": 1}"#)
        .check_not_ahead(NOW, max)
        .unwrap();
}

#[test]
fn records_without_series() {
    assert_eq!(refused("{}"), at(Some(0), None, Reason::NoSeries));
    assert_eq!(refused(r#"{"ts": 5}"#), at(Some(0), None, Reason::NoSeries));
    assert_eq!(
        refused(r#"{"sent": 5, "nonce": "n"}"#),
        at(Some(0), None, Reason::NoSeries)
    );
    assert_eq!(
        refused(r#"[{"a": 1}, {"date": "2018-04-04", "time": "09:30:00"}]"#),
        at(Some(1), None, Reason::NoSeries)
    );
}

#[test]
fn bad_field_names() {
    let long = "k".repeat(129);
    let (index, field, reason) = refused(&format!(r#"{{"{long}": 1}}"#));
    assert_eq!((index, reason), (Some(0), Reason::KeyTooLong { max: 128 }));
    // Long names are cut in the error.
    assert_eq!(field, Some(format!("{}…", "k".repeat(64))));
    assert!(json(&format!(r#"{{"{}": 1}}"#, "k".repeat(128))).is_ok());
    assert_eq!(
        refused(r#"{"": 1}"#),
        at(Some(0), Some(""), Reason::EmptyKey)
    );
    assert_eq!(
        refused(r#"{"a\nb": 1}"#),
        at(Some(0), Some("a\nb"), Reason::KeyControlChars)
    );
    let e = json(r#"{"a\nb": 1}"#).unwrap_err().to_string();
    assert_eq!(
        e,
        r#"record 0, field "a\nb": field name contains control characters"#
    );
}

#[test]
fn duplicate_fields() {
    assert_eq!(
        refused(r#"{"a": 1, "a": 2}"#),
        at(Some(0), Some("a"), Reason::Duplicate)
    );
    assert_eq!(
        refused(r#"{"ts": 1, "ts": 2, "a": 1}"#),
        at(Some(0), Some("ts"), Reason::Duplicate)
    );
    assert_eq!(
        refused(r#"{"sent": 1, "sent": 2, "nonce": "n", "a": 1}"#),
        at(None, Some("sent"), Reason::Duplicate)
    );
    // Past the pairwise check, the sorted one.
    let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}": {i}"#)).collect();
    let s = format!(r#"[{{"x": 0}}, {{{}, "k17": 0}}]"#, many.join(", "));
    assert_eq!(refused(&s), at(Some(1), Some("k17"), Reason::Duplicate));
}

#[test]
fn long_strings() {
    let s = format!(r#"{{"s": "{}"}}"#, "x".repeat(4097));
    assert_eq!(
        refused(&s),
        at(Some(0), Some("s"), Reason::TextTooLong { max: 4096 })
    );
    assert!(json(&format!(r#"{{"s": "{}"}}"#, "x".repeat(4096))).is_ok());
}

#[test]
fn message_shape_errors() {
    for s in ["5", "\"text\"", "null", "true"] {
        assert_eq!(refused(s), at(None, None, Reason::NotObjectOrArray), "{s}");
    }
    assert_eq!(refused("[]"), at(None, None, Reason::NoRecords));
    assert_eq!(
        refused(r#"{"records": []}"#),
        at(None, None, Reason::NoRecords)
    );
    assert_eq!(
        refused(r#"[{"a": 1}, 5]"#),
        at(Some(1), None, Reason::NotAnObject)
    );
    assert_eq!(
        refused(r#"[{"a": 1}, [{"a": 1}]]"#),
        at(Some(1), None, Reason::NotAnObject)
    );
    assert_eq!(
        refused(r#"{"records": {"a": 1}}"#),
        at(None, Some("records"), Reason::RecordsNotArray)
    );
    assert_eq!(
        refused(r#"{"records": 5}"#),
        at(None, Some("records"), Reason::RecordsNotArray)
    );
    assert_eq!(
        refused(r#"{"records": [{"a": 1}], "records": [{"a": 1}]}"#),
        at(None, Some("records"), Reason::Duplicate)
    );
}

#[test]
fn envelope_rules() {
    assert_eq!(
        refused(r#"{"records": [{"a": 1}], "b": 2}"#),
        at(None, Some("b"), Reason::EnvelopeField)
    );
    assert_eq!(
        refused(r#"{"b": 2, "records": [{"a": 1}]}"#),
        at(None, Some("b"), Reason::EnvelopeField)
    );
    assert_eq!(
        refused(r#"{"ts": 2, "records": [{"a": 1}]}"#),
        at(None, Some("ts"), Reason::EnvelopeField)
    );
    assert_eq!(
        refused(r#"{"records": [{"a": 1, "records": [{"b": 1}]}]}"#),
        at(Some(0), Some("records"), Reason::NestedEnvelope)
    );
    assert_eq!(
        refused(r#"{"records": [{"a": 1}, {"a": 1, "nonce": "n"}]}"#),
        at(Some(1), Some("nonce"), Reason::MessageFieldInRecord)
    );
    assert_eq!(
        refused(r#"[{"a": 1, "sent": 1700000000000, "nonce": "n"}]"#),
        at(Some(0), Some("sent"), Reason::MessageFieldInRecord)
    );
}

#[test]
fn sent_and_nonce_rules() {
    let cases = [
        (
            r#"{"sent": 1700000000000, "a": 1}"#,
            "nonce",
            Reason::FreshnessPair,
        ),
        (r#"{"nonce": "n", "a": 1}"#, "sent", Reason::FreshnessPair),
        (
            r#"{"sent": 1.5, "nonce": "n", "a": 1}"#,
            "sent",
            Reason::BadSent,
        ),
        (
            r#"{"sent": "2018-04-04T09:30:00Z", "nonce": "n", "a": 1}"#,
            "sent",
            Reason::BadSent,
        ),
        (
            r#"{"sent": 1, "nonce": "", "a": 1}"#,
            "nonce",
            Reason::BadNonce,
        ),
        (
            r#"{"sent": 1, "nonce": 7, "a": 1}"#,
            "nonce",
            Reason::BadNonce,
        ),
        (
            r#"{"sent": 1, "nonce": null, "a": 1}"#,
            "nonce",
            Reason::BadNonce,
        ),
        (
            r#"{"sent": 1, "nonce": "n", "nonce": "m", "a": 1}"#,
            "nonce",
            Reason::Duplicate,
        ),
    ];
    for (s, field, reason) in cases {
        assert_eq!(refused(s), at(None, Some(field), reason), "{s}");
    }
    let s = format!(r#"{{"sent": 1, "nonce": "{}", "a": 1}}"#, "n".repeat(129));
    assert_eq!(
        refused(&s),
        at(None, Some("nonce"), Reason::NonceTooLong { max: 128 })
    );
    let e = json(r#"{"sent": 1700000000000, "a": 1}"#)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        r#"field "nonce": `sent` and `nonce` go together: give both or neither"#
    );
}

#[test]
fn limits_are_enforced_and_inclusive() {
    let limits = Limits {
        max_records: 3,
        max_series: 2,
        ..Limits::default()
    };
    let three = r#"[{"a": 1}, {"a": 1}, {"a": 1, "b": 2}]"#;
    assert_eq!(
        parse_json(three.as_bytes(), &limits, NOW)
            .unwrap()
            .records
            .len(),
        3
    );
    assert_eq!(
        refused_with(r#"[{"a": 1}, {"a": 1}, {"a": 1}, {"a": 1}]"#, &limits),
        at(None, None, Reason::TooManyRecords { max: 3 })
    );
    assert_eq!(
        refused_with(r#"{"records": [{"a": 1}, {"a": 1}, {"a": 1}, 5]}"#, &limits),
        at(None, None, Reason::TooManyRecords { max: 3 })
    );
    assert_eq!(
        refused_with(r#"[{"a": 1}, {"a": 1, "b": 2, "c": 3}]"#, &limits),
        at(Some(1), Some("c"), Reason::TooManySeries { max: 2 })
    );
    let limits = Limits {
        max_payload_bytes: 10,
        ..Limits::default()
    };
    assert!(parse_json(br#"{"a": 1}"#, &limits, NOW).is_ok());
    match parse_json(br#"{"a": 1000000}"#, &limits, NOW) {
        Err(IngestError::TooLarge { len: 14, max: 10 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn default_limits() {
    let l = Limits::default();
    assert_eq!(
        (
            l.max_records,
            l.max_series,
            l.max_key_len,
            l.max_text_len,
            l.max_nonce_len
        ),
        (10_000, 256, 128, 4096, 128)
    );
    // 10 000 records pass, 10 001 do not.
    let body = format!("[{}]", vec![r#"{"a":1}"#; 10_000].join(","));
    assert_eq!(json(&body).unwrap().records.len(), 10_000);
    let body = format!("[{}]", vec![r#"{"a":1}"#; 10_001].join(","));
    assert_eq!(
        refused(&body),
        at(None, None, Reason::TooManyRecords { max: 10_000 })
    );
    // Limits deserialize from config with defaults for what is left out.
    let l: Limits = serde_json::from_str(r#"{"max_records": 5}"#).unwrap();
    assert_eq!((l.max_records, l.max_series), (5, 256));
}

#[test]
fn malformed_json_reports_its_position() {
    for (s, line, column) in [
        ("{\"a\": 1,", 1, 8),
        ("{\n  \"a\": 1,\n  \"b\": tru\n}", 4, 0),
        ("{\"a\": 1} x", 1, 10),
        ("", 1, 0),
        ("{\"a\": NaN}", 1, 7),
    ] {
        match json(s) {
            Err(IngestError::Json(e)) => {
                assert_eq!((e.line(), e.column()), (line, column), "{s:?}: {e}");
                let text = IngestError::Json(e).to_string();
                assert!(text.starts_with("malformed JSON: "), "{text}");
                assert!(text.contains(&format!("line {line}")), "{text}");
            }
            other => panic!("{s:?}: {other:?}"),
        }
    }
    // Invalid UTF-8 in a string.
    assert!(matches!(
        parse_json(b"{\"a\": \"\xff\"}", &Limits::default(), NOW),
        Err(IngestError::Json(_))
    ));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // Well-formed but deep inside a value: skipped without recursion, then refused.
    let deep = format!(
        r#"{{"a": {}1{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(refused(&deep), at(Some(0), Some("a"), Reason::ArrayValue));
    let deep = format!(r#"{{"a": {}"#, "{\"b\": ".repeat(100_000));
    assert!(json(&deep).is_err());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(refused(&deep), at(Some(0), None, Reason::NotAnObject));
}

// ---- CBOR ---------------------------------------------------------------------------------

#[test]
fn cbor_carries_the_same_messages() {
    let seed = cmap(vec![
        ("date", Cbor::Text("2018-04-04".into())),
        ("time", Cbor::Text("09:30:00".into())),
        ("temperature", Cbor::Float(20.1)),
    ]);
    let from_cbor = parse(&cbor(&seed), ContentFormat::Cbor, &Limits::default(), NOW).unwrap();
    let from_json = ok(r#"{"date": "2018-04-04", "time": "09:30:00", "temperature": 20.1}"#);
    assert_eq!(from_cbor, from_json);

    let envelope = cmap(vec![
        ("sent", Cbor::Integer(1_700_000_000_000i64.into())),
        ("nonce", Cbor::Text("n".into())),
        (
            "records",
            Cbor::Array(vec![
                cmap(vec![
                    ("ts", Cbor::Integer(5.into())),
                    ("on", Cbor::Bool(true)),
                ]),
                cmap(vec![
                    ("s", Cbor::Text("x".into())),
                    ("i", Cbor::Integer((-3).into())),
                ]),
            ]),
        ),
    ]);
    let m = parse_cbor(&cbor(&envelope), &Limits::default(), NOW).unwrap();
    assert_eq!(
        (m.sent, m.nonce.as_deref()),
        (Some(1_700_000_000_000), Some("n"))
    );
    assert_eq!(m.records[0].ts_ms, 5);
    assert_eq!(
        m.records[0].values,
        vec![("on".to_owned(), Value::Bool(true))]
    );
    assert_eq!(m.records[1].ts_ms, NOW);
    assert_eq!(
        m.records[1].values,
        vec![
            ("s".to_owned(), Value::Text("x".into())),
            ("i".to_owned(), Value::Number(-3.0)),
        ]
    );

    // An array, wrapped in the self-described CBOR tag.
    let array = Cbor::Tag(
        55799,
        Box::new(Cbor::Array(vec![cmap(vec![(
            "a",
            Cbor::Integer(1.into()),
        )])])),
    );
    assert_eq!(
        parse_cbor(&cbor(&array), &Limits::default(), NOW)
            .unwrap()
            .records
            .len(),
        1
    );
}

#[test]
fn cbor_refusals() {
    let limits = Limits::default();
    let invalid = |v: Cbor| match parse_cbor(&cbor(&v), &limits, NOW) {
        Err(IngestError::Invalid {
            index,
            field,
            reason,
        }) => (index, field, reason),
        other => panic!("{v:?}: {other:?}"),
    };
    assert_eq!(
        invalid(cmap(vec![("a", Cbor::Float(f64::NAN))])),
        at(Some(0), Some("a"), Reason::NonFinite)
    );
    assert_eq!(
        invalid(cmap(vec![("a", Cbor::Float(f64::INFINITY))])),
        at(Some(0), Some("a"), Reason::NonFinite)
    );
    assert_eq!(
        invalid(cmap(vec![("a", Cbor::Bytes(vec![1, 2]))])),
        at(Some(0), Some("a"), Reason::BytesValue)
    );
    assert_eq!(
        invalid(cmap(vec![
            ("ts", Cbor::Tag(1, Box::new(Cbor::Integer(5.into())))),
            ("a", Cbor::Bool(true))
        ])),
        at(Some(0), Some("ts"), Reason::BadTimestamp)
    );
    assert_eq!(
        invalid(cmap(vec![(
            "a",
            Cbor::Tag(1, Box::new(Cbor::Integer(5.into())))
        )])),
        at(Some(0), Some("a"), Reason::TaggedValue)
    );
    assert_eq!(
        invalid(Cbor::Map(vec![(Cbor::Integer(1.into()), Cbor::Bool(true))])),
        at(Some(0), None, Reason::KeyNotText)
    );
    assert_eq!(
        invalid(Cbor::Array(vec![cmap(vec![("a", Cbor::Null)])])),
        at(Some(0), Some("a"), Reason::NullValue)
    );
    assert_eq!(
        invalid(cmap(vec![("records", Cbor::Bool(true))])),
        at(None, Some("records"), Reason::RecordsNotArray)
    );
    assert_eq!(
        invalid(Cbor::Integer(5.into())),
        at(None, None, Reason::NotObjectOrArray)
    );
    assert_eq!(
        invalid(cmap(vec![
            ("a", Cbor::Integer(1.into())),
            ("a", Cbor::Integer(2.into()))
        ])),
        at(Some(0), Some("a"), Reason::Duplicate)
    );

    // Syntax: truncated, trailing bytes, too deep, unknown simple value.
    let good = cbor(&cmap(vec![("a", Cbor::Integer(1.into()))]));
    for bad in [
        &good[..good.len() - 1],
        &[good.as_slice(), &[0x00]].concat()[..],
        &[0xff][..],
        &[][..],
    ] {
        assert!(
            matches!(parse_cbor(bad, &limits, NOW), Err(IngestError::Cbor { .. })),
            "{bad:?}"
        );
    }
    let trailing = [good.as_slice(), &[0x00]].concat();
    match parse_cbor(&trailing, &limits, NOW) {
        Err(
            e @ IngestError::Cbor {
                offset: Some(_), ..
            },
        ) => {
            assert_eq!(
                e.to_string(),
                format!(
                    "malformed CBOR at byte {}: trailing bytes after the message",
                    good.len()
                )
            );
        }
        other => panic!("{other:?}"),
    }
    let mut deep = vec![0x81u8; 10_000]; // arrays of one element, nested
    deep.push(0x01);
    assert!(matches!(
        parse_cbor(&deep, &limits, NOW),
        Err(IngestError::Cbor { .. })
    ));
    // An array claiming 2^63 elements but holding none must not allocate them.
    let huge = [0x9b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    assert!(parse_cbor(&huge, &limits, NOW).is_err());
}

// ---- helpers ------------------------------------------------------------------------------

#[test]
fn content_formats() {
    assert_eq!(ContentFormat::from_coap(50), Some(ContentFormat::Json));
    assert_eq!(ContentFormat::from_coap(60), Some(ContentFormat::Cbor));
    assert_eq!(ContentFormat::from_coap(0), None);
    assert_eq!(
        ContentFormat::from_media_type("application/json; charset=utf-8"),
        Some(ContentFormat::Json)
    );
    assert_eq!(
        ContentFormat::from_media_type("Application/CBOR"),
        Some(ContentFormat::Cbor)
    );
    assert_eq!(
        ContentFormat::from_media_type("application/senml+json"),
        Some(ContentFormat::Json)
    );
    assert_eq!(ContentFormat::from_media_type("text/plain"), None);
}

#[test]
fn time_parameters() {
    assert_eq!(parse_time_param("1522834200000"), Some(1_522_834_200_000));
    assert_eq!(parse_time_param("-5"), Some(-5));
    assert_eq!(
        parse_time_param("2018-04-04T09:30:00Z"),
        Some(1_522_834_200_000)
    );
    assert_eq!(
        parse_time_param("2018-04-04T11:30:00.1+02:00"),
        Some(1_522_834_200_100)
    );
    for bad in [
        "",
        "-",
        "+5",
        "1e3",
        "yesterday",
        "2018-04-04",
        "999999999999999999999",
        "253402300800000",
    ] {
        assert_eq!(parse_time_param(bad), None, "{bad}");
    }
}

// ---- properties ---------------------------------------------------------------------------

fn series_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Number),
        (-1_000_000i64..1_000_000).prop_map(|n| Value::Number(n as f64)),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,40}".prop_map(Value::Text),
    ]
}

fn series_name() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,20}".prop_filter("not reserved", |k| {
        !["ts", "date", "time", "sent", "nonce", "records"].contains(&k.as_str())
    })
}

/// Records as (optional `ts`, series with unique names).
type Records = Vec<(Option<i64>, Vec<(String, Value)>)>;

fn records() -> impl Strategy<Value = Records> {
    let record = (
        prop::option::of(-62_167_219_200_000i64..=253_402_300_799_999),
        prop::collection::btree_map(series_name(), series_value(), 1..8)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>()),
    );
    prop::collection::vec(record, 1..6)
}

fn to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Number(n) => serde_json::json!(n),
        Value::Bool(b) => serde_json::json!(b),
        Value::Text(s) => serde_json::json!(s),
    }
}

fn to_cbor(value: &Value) -> Cbor {
    match value {
        Value::Number(n) => Cbor::Float(*n),
        Value::Bool(b) => Cbor::Bool(*b),
        Value::Text(s) => Cbor::Text(s.clone()),
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        // serde_json's default float reader may be an ulp off (more for subnormals).
        (Value::Number(x), Value::Number(y)) => {
            x == y || (x - y).abs() <= x.abs().max(1e-300) * 1e-12
        }
        _ => a == b,
    }
}

/// A JSON document of any shape, for the no-panic property.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop_oneof![
            Just("ts".to_owned()),
            Just("2018-04-04".to_owned()),
            Just("09:30:00".to_owned()),
            Just("2018-04-04T09:30:00Z".to_owned()),
            "\\PC{0,8}"
        ]
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("ts".to_owned()),
                        Just("date".to_owned()),
                        Just("time".to_owned()),
                        Just("sent".to_owned()),
                        Just("nonce".to_owned()),
                        Just("records".to_owned()),
                        "\\PC{0,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let limits = Limits::default();
        let _ = parse_json(&bytes, &limits, NOW);
        let _ = parse_cbor(&bytes, &limits, NOW);
    }

    #[test]
    fn arbitrary_json_never_panics_and_what_passes_is_valid(doc in any_json()) {
        let limits = Limits::default();
        let bytes = serde_json::to_vec(&doc).unwrap();
        if let Ok(m) = parse_json(&bytes, &limits, NOW) {
            prop_assert!(!m.records.is_empty());
            prop_assert_eq!(m.sent.is_some(), m.nonce.is_some());
            for r in &m.records {
                prop_assert!(!r.values.is_empty());
                for (k, v) in &r.values {
                    prop_assert!(!k.is_empty() && k.len() <= limits.max_key_len);
                    prop_assert!(!["ts", "date", "time", "sent", "nonce", "records"].contains(&k.as_str()));
                    if let Value::Number(n) = v { prop_assert!(n.is_finite()); }
                }
            }
        }
        // The same document as CBOR never panics either.
        let mut cbor_bytes = Vec::new();
        ciborium::ser::into_writer(&doc, &mut cbor_bytes).unwrap();
        let _ = parse_cbor(&cbor_bytes, &limits, NOW);
    }

    #[test]
    fn valid_records_round_trip_through_json(recs in records(), envelope in any::<bool>()) {
        let items: Vec<serde_json::Value> = recs.iter().map(|(ts, values)| {
            let mut obj = serde_json::Map::new();
            if let Some(ts) = ts { obj.insert("ts".into(), serde_json::json!(ts)); }
            for (k, v) in values { obj.insert(k.clone(), to_json(v)); }
            serde_json::Value::Object(obj)
        }).collect();
        let doc = if envelope {
            serde_json::json!({"sent": NOW, "nonce": "n", "records": items})
        } else {
            serde_json::Value::Array(items)
        };
        let m = parse_json(&serde_json::to_vec(&doc).unwrap(), &Limits::default(), NOW)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(m.records.len(), recs.len());
        for (got, (ts, values)) in m.records.iter().zip(&recs) {
            prop_assert_eq!(got.ts_ms, ts.unwrap_or(NOW));
            // serde_json's Map orders keys; so does the btree_map the values came from.
            let mut got_values = got.values.clone();
            got_values.sort_by(|a, b| a.0.cmp(&b.0));
            prop_assert_eq!(got_values.len(), values.len());
            for ((gk, gv), (k, v)) in got_values.iter().zip(values) {
                prop_assert_eq!(gk, k);
                prop_assert!(same_value(gv, v), "{:?} != {:?}", gv, v);
            }
        }
        prop_assert_eq!(m.sent.is_some(), envelope);
    }

    #[test]
    fn valid_records_round_trip_exactly_through_cbor(recs in records()) {
        let doc = Cbor::Array(recs.iter().map(|(ts, values)| {
            let mut entries = Vec::new();
            if let Some(ts) = ts { entries.push((Cbor::Text("ts".into()), Cbor::Integer((*ts).into()))); }
            for (k, v) in values { entries.push((Cbor::Text(k.clone()), to_cbor(v))); }
            Cbor::Map(entries)
        }).collect());
        let m = parse_cbor(&cbor(&doc), &Limits::default(), NOW)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want: Vec<_> = recs.iter().map(|(ts, values)| (ts.unwrap_or(NOW), values.clone())).collect();
        let got: Vec<_> = m.records.into_iter().map(|r| (r.ts_ms, r.values)).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn rfc3339_and_epoch_ms_agree(ms in -62_135_596_800_000i64..=253_402_300_799_999) {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second(), t.millisecond()
        );
        let m = ok(&format!(r#"{{"ts": "{text}", "v": 1}}"#));
        prop_assert_eq!(m.records[0].ts_ms, ms);
    }
}

// ---- freshness ----------------------------------------------------------------------------

fn guard() -> FreshnessGuard {
    FreshnessGuard::default()
}

#[test]
fn a_nonce_is_refused_the_second_time() {
    let g = guard();
    g.check("d1", Some(NOW), Some("n1"), false, NOW)
        .unwrap()
        .commit();
    assert_eq!(
        g.check("d1", Some(NOW + 1), Some("n1"), false, NOW + 1)
            .unwrap_err(),
        Replay::Reused
    );
    // Another nonce, or another device with the same nonce, is fine.
    g.check("d1", Some(NOW), Some("n2"), false, NOW)
        .unwrap()
        .commit();
    g.check("d2", Some(NOW), Some("n1"), false, NOW)
        .unwrap()
        .commit();
    assert_eq!(g.len(), 3);
}

#[test]
fn a_nonce_is_accepted_again_after_the_window() {
    let g = guard();
    g.check("d", Some(NOW), Some("n"), false, NOW)
        .unwrap()
        .commit();
    // Within T (inclusive) it is still remembered.
    let at_t = NOW + 10_000;
    assert_eq!(
        g.check("d", Some(at_t), Some("n"), false, at_t)
            .unwrap_err(),
        Replay::Reused
    );
    let later = NOW + 10_001;
    g.check("d", Some(later), Some("n"), false, later)
        .unwrap()
        .commit();
}

#[test]
fn old_and_future_sent_are_refused() {
    let g = guard();
    assert_eq!(
        g.check("d", Some(NOW - 60_000), Some("a"), false, NOW)
            .unwrap_err(),
        Replay::Stale {
            skew_ms: 60_000,
            window_ms: 10_000
        }
    );
    assert_eq!(
        g.check("d", Some(NOW + 10_001), Some("b"), false, NOW)
            .unwrap_err(),
        Replay::Stale {
            skew_ms: -10_001,
            window_ms: 10_000
        }
    );
    // The edges of the window are inside it.
    g.check("d", Some(NOW - 10_000), Some("c"), false, NOW)
        .unwrap()
        .commit();
    g.check("d", Some(NOW + 10_000), Some("d"), false, NOW)
        .unwrap()
        .commit();
    // Extreme values do not overflow.
    assert!(g
        .check("d", Some(i64::MIN), Some("e"), false, i64::MAX)
        .is_err());
    assert!(g
        .check("d", Some(i64::MAX), Some("e"), false, i64::MIN)
        .is_err());
    assert_eq!(
        Replay::Stale {
            skew_ms: 60_000,
            window_ms: 10_000
        }
        .to_string(),
        "`sent` is 60000 ms from the server clock, more than the 10000 ms allowed"
    );
}

#[test]
fn a_replay_of_a_future_dated_message_is_caught_until_the_window_refuses_it() {
    let g = guard();
    let sent = NOW + 10_000; // a device clock 10 s fast
    g.check("d", Some(sent), Some("n"), false, NOW)
        .unwrap()
        .commit();
    // 19.9 s later `sent` is still within T of the clock: the memory must still hold the nonce.
    let t = NOW + 19_999;
    assert_eq!(
        g.check("d", Some(sent), Some("n"), false, t).unwrap_err(),
        Replay::Reused
    );
    let t = NOW + 20_000;
    assert_eq!(
        g.check("d", Some(sent), Some("n"), false, t).unwrap_err(),
        Replay::Reused
    );
    // After that the window refuses it.
    let t = NOW + 20_001;
    assert!(matches!(
        g.check("d", Some(sent), Some("n"), false, t).unwrap_err(),
        Replay::Stale { .. }
    ));
}

#[test]
fn required_freshness() {
    let g = guard();
    assert_eq!(
        g.check("d", None, None, true, NOW).unwrap_err(),
        Replay::Missing { field: "sent" }
    );
    assert_eq!(
        g.check("d", Some(NOW), None, true, NOW).unwrap_err(),
        Replay::Missing { field: "nonce" }
    );
    assert_eq!(
        g.check("d", None, Some("n"), true, NOW).unwrap_err(),
        Replay::Missing { field: "sent" }
    );
    // Not required: a message without them passes and holds nothing.
    let r = g.check("d", None, None, false, NOW).unwrap();
    assert!(!r.holds_nonce());
    r.commit();
    // Half given is refused even when not required.
    assert_eq!(
        g.check("d", Some(NOW), None, false, NOW).unwrap_err(),
        Replay::Missing { field: "nonce" }
    );
    g.check("d", Some(NOW), Some("n"), true, NOW)
        .unwrap()
        .commit();
    assert_eq!(g.len(), 1);
}

#[test]
fn check_message_uses_the_parsed_fields() {
    let g = guard();
    let m = ok(&format!(r#"{{"sent": {NOW}, "nonce": "xyz", "a": 1}}"#));
    g.check_message("d", &m, true, NOW).unwrap().commit();
    assert_eq!(
        g.check_message("d", &m, true, NOW).unwrap_err(),
        Replay::Reused
    );
    let plain = ok(r#"{"a": 1}"#);
    assert!(g.check_message("d", &plain, false, NOW).is_ok());
    assert!(g.check_message("d", &plain, true, NOW).is_err());
}

#[test]
fn an_uncommitted_nonce_is_not_burned() {
    let g = guard();
    let r = g.check("d", Some(NOW), Some("n"), false, NOW).unwrap();
    assert!(r.holds_nonce());
    // While in flight, the same nonce is refused...
    assert_eq!(
        g.check("d", Some(NOW), Some("n"), false, NOW).unwrap_err(),
        Replay::Reused
    );
    // ...and once the first message fails (the reservation dropped), it is free again.
    drop(r);
    assert!(g.is_empty());
    let r = g.check("d", Some(NOW), Some("n"), false, NOW).unwrap();
    r.commit();
    assert_eq!(
        g.check("d", Some(NOW), Some("n"), false, NOW).unwrap_err(),
        Replay::Reused
    );
}

#[test]
fn a_reservation_outliving_its_window_does_not_release_a_newer_one() {
    let g = guard();
    let stale = g.check("d", Some(NOW), Some("n"), false, NOW).unwrap();
    // Long after, the same nonce is taken again by a new message...
    let later = NOW + 30_000;
    let fresh = g.check("d", Some(later), Some("n"), false, later).unwrap();
    fresh.commit();
    // ...and the old reservation's release must not free it.
    drop(stale);
    assert_eq!(
        g.check("d", Some(later), Some("n"), false, later)
            .unwrap_err(),
        Replay::Reused
    );
}

#[test]
fn concurrent_messages_with_one_nonce_pass_once() {
    let g = guard();
    let threads = 8;
    for round in 0..20 {
        let barrier = Arc::new(Barrier::new(threads));
        let nonce = format!("n{round}");
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (g, barrier, nonce) = (g.clone(), barrier.clone(), nonce.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match g.check("d", Some(NOW), Some(&nonce), true, NOW) {
                        Ok(r) => {
                            // Hold it as a store write would, then commit.
                            std::thread::yield_now();
                            r.commit();
                            true
                        }
                        Err(Replay::Reused) => false,
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        let passed = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&p| p)
            .count();
        assert_eq!(passed, 1, "round {round}");
    }
}

#[test]
fn reservations_are_send_and_static() {
    fn assert_send_static<T: Send + Sync + 'static>() {}
    assert_send_static::<stratus_server::ingest::Reservation>();
    assert_send_static::<FreshnessGuard>();
}

#[test]
fn per_device_bound_refuses_rather_than_forgets() {
    let g = FreshnessGuard::new(FreshnessConfig {
        max_per_device: 3,
        ..FreshnessConfig::default()
    });
    for n in ["a", "b", "c"] {
        g.check("d", Some(NOW), Some(n), false, NOW)
            .unwrap()
            .commit();
    }
    let e = g.check("d", Some(NOW), Some("e"), false, NOW).unwrap_err();
    assert_eq!(e, Replay::DeviceFull { max: 3 });
    assert!(e.is_capacity());
    // A replay of a remembered nonce is still a replay, full or not.
    assert_eq!(
        g.check("d", Some(NOW), Some("a"), false, NOW).unwrap_err(),
        Replay::Reused
    );
    // Other devices are unaffected.
    g.check("other", Some(NOW), Some("e"), false, NOW)
        .unwrap()
        .commit();
    // Once the window has passed, room again.
    let later = NOW + 10_001;
    g.check("d", Some(later), Some("e"), false, later)
        .unwrap()
        .commit();
    // Expired entries of other devices go when their shard is next touched (which may or may
    // not be d's shard: shards are picked by a random hasher); a sweep settles it.
    g.prune(later);
    assert_eq!(
        g.len(),
        1,
        "the expired ones are forgotten, d's new nonce is kept"
    );
}

#[test]
fn global_bound_refuses_rather_than_forgets() {
    let g = FreshnessGuard::new(FreshnessConfig {
        max_total: 4,
        ..FreshnessConfig::default()
    });
    for i in 0..4 {
        g.check(&format!("dev{i}"), Some(NOW), Some("n"), false, NOW)
            .unwrap()
            .commit();
    }
    let e = g
        .check("dev9", Some(NOW), Some("n"), false, NOW)
        .unwrap_err();
    assert_eq!(e, Replay::Full);
    assert!(e.is_capacity());
    assert!(!Replay::Reused.is_capacity());
    assert_eq!(g.len(), 4);
    // Messages without freshness fields are unaffected.
    assert!(g.check("dev9", None, None, false, NOW).is_ok());
    // Time passes: a prune (or the next checks) frees the room.
    let later = NOW + 10_001;
    g.prune(later);
    assert!(g.is_empty());
    g.check("dev9", Some(later), Some("n"), false, later)
        .unwrap()
        .commit();
}

#[test]
fn a_full_memory_frees_expired_entries_of_the_shard_before_refusing() {
    let g = FreshnessGuard::new(FreshnessConfig {
        max_total: 1,
        ..FreshnessConfig::default()
    });
    g.check("d", Some(NOW), Some("a"), false, NOW)
        .unwrap()
        .commit();
    // Same device, hence same shard: its expired entry is swept, the new one fits.
    let later = NOW + 10_001;
    g.check("d", Some(later), Some("b"), false, later)
        .unwrap()
        .commit();
    assert_eq!(g.len(), 1);
}

#[test]
fn memory_of_quiet_devices_is_swept() {
    let g = guard();
    for i in 0..200 {
        g.check(&format!("dev{i}"), Some(NOW), Some("n"), false, NOW)
            .unwrap()
            .commit();
    }
    assert_eq!(g.len(), 200);
    // One device keeps talking; every shard it touches sweeps the others on its way.
    let later = NOW + 10_001;
    for i in 0..200 {
        let n = format!("m{i}");
        g.check(&format!("dev{i}"), Some(later), Some(&n), false, later)
            .unwrap()
            .commit();
    }
    assert_eq!(g.len(), 200);
    g.prune(later + 10_001);
    assert!(g.is_empty());
}
