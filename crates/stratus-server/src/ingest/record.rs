//! Parsing and validation of telemetry messages (see the [parent module](super) for the
//! format and the choices).
//!
//! Both encodings feed one `Builder`, which owns every rule: the JSON path drives it from
//! serde visitors as the bytes are read (no intermediate tree), the CBOR path from a decoded
//! `ciborium::Value`. A rule broken inside a serde visitor is parked in `Builder::error` and
//! surfaces as that structured error, not as a serde message.

use std::borrow::Cow;
use std::collections::hash_map::{Entry, HashMap};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use super::{IngestError, Limits, Message, Record, TimeSource, Value};

/// 0000-01-01T00:00:00Z in epoch milliseconds: the earliest accepted time.
pub const MIN_TS_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z in epoch milliseconds: the latest accepted time.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Most levels of names in a series flattened from nested objects: `a.b.c.d` is 4, so a
/// record's field may hold objects three deep (see the [parent module](super)).
pub const MAX_NESTING: usize = 4;

/// How deep CBOR may nest (a message needs 3 levels and nested objects [`MAX_NESTING`] more;
/// deeper junk is refused while decoding).
const CBOR_RECURSION_LIMIT: usize = 16;
/// Field names in errors are cut to this many bytes.
const ERROR_FIELD_MAX: usize = 64;

/// Why a well-formed payload is not a valid telemetry message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// The payload is not an object or an array.
    #[error("a message is a record object, an array of records or an envelope")]
    NotObjectOrArray,
    /// An element of the records array is not an object.
    #[error("a record must be an object")]
    NotAnObject,
    /// `records` is not an array.
    #[error("must be an array of records")]
    RecordsNotArray,
    /// The message has no records.
    #[error("no records")]
    NoRecords,
    /// Over [`Limits::max_records`].
    #[error("more than {max} records in one message")]
    TooManyRecords {
        /// The limit.
        max: usize,
    },
    /// A record without a single series.
    #[error("no series: a record needs at least one number, boolean or string field")]
    NoSeries,
    /// Over [`Limits::max_series`].
    #[error("more than {max} series in one record")]
    TooManySeries {
        /// The limit.
        max: usize,
    },
    /// `ts` is neither an integer nor an RFC 3339 string.
    #[error("not epoch milliseconds or RFC 3339")]
    BadTimestamp,
    /// A time outside the years 0000 to 9999.
    #[error("outside the years 0000 to 9999")]
    TimestampOutOfRange,
    /// `date` is not a valid `YYYY-MM-DD`.
    #[error("not a calendar date YYYY-MM-DD")]
    BadDate,
    /// `time` is not a valid `HH:MM:SS`.
    #[error("not a UTC time of day HH:MM:SS")]
    BadTime,
    /// `date` without `time`.
    #[error("`date` needs `time` (HH:MM:SS, UTC) beside it")]
    DateWithoutTime,
    /// `time` without `date`.
    #[error("`time` needs `date` (YYYY-MM-DD) beside it")]
    TimeWithoutDate,
    /// Both `ts` and `date`/`time`.
    #[error("give either `ts` or `date` and `time`, not both")]
    TsAndDateTime,
    /// A null value.
    #[error("null is not a series value (numbers, booleans and strings are)")]
    NullValue,
    /// Objects nested deeper than [`MAX_NESTING`] levels of names.
    #[error("objects nest too deep: a series name has at most {max} levels (a.b.c.d)")]
    TooDeep {
        /// The most levels.
        max: usize,
    },
    /// An array value.
    #[error(
        "an array is not a series value (numbers, booleans and strings are; objects are \
         flattened): give each element its own field or send one record per element"
    )]
    ArrayValue,
    /// A CBOR byte string value.
    #[error("a byte string is not a series value (numbers, booleans and strings are)")]
    BytesValue,
    /// A CBOR tagged value.
    #[error("tagged CBOR values are not supported")]
    TaggedValue,
    /// NaN or an infinity (CBOR can carry them).
    #[error("not a finite number")]
    NonFinite,
    /// A string over [`Limits::max_text_len`].
    #[error("string value longer than {max} bytes")]
    TextTooLong {
        /// The limit.
        max: usize,
    },
    /// An empty field name.
    #[error("empty field name")]
    EmptyKey,
    /// A field name over [`Limits::max_key_len`].
    #[error("field name longer than {max} bytes")]
    KeyTooLong {
        /// The limit.
        max: usize,
    },
    /// A field name with control characters.
    #[error("field name contains control characters")]
    KeyControlChars,
    /// A CBOR map key that is not a text string.
    #[error("field names must be text strings")]
    KeyNotText,
    /// The same field twice in one object (or one name twice after flattening).
    #[error("field appears more than once")]
    Duplicate,
    /// Two records of one message give one series a value at the same millisecond.
    #[error(
        "record {record} already gives this series a value at {ts_ms} (epoch ms): a series \
         holds one value per millisecond"
    )]
    SameTime {
        /// The earlier record.
        record: usize,
        /// The time they share.
        ts_ms: i64,
    },
    /// A time further ahead of the server clock than `[telemetry] max_future_skew_secs`.
    #[error(
        "{} ahead of the server clock; at most {} s ahead is accepted",
        span(*ahead_ms),
        max_ms / 1000
    )]
    InFuture {
        /// How far ahead the time is.
        ahead_ms: i64,
        /// The most allowed.
        max_ms: i64,
    },
    /// `sent` is not integer epoch milliseconds in range.
    #[error("not epoch milliseconds (an integer)")]
    BadSent,
    /// `nonce` is not a non-empty string.
    #[error("not a non-empty string")]
    BadNonce,
    /// A nonce over [`Limits::max_nonce_len`].
    #[error("longer than {max} bytes")]
    NonceTooLong {
        /// The limit.
        max: usize,
    },
    /// Only one of `sent` and `nonce`.
    #[error("`sent` and `nonce` go together: give both or neither")]
    FreshnessPair,
    /// `sent`/`nonce` inside a record of an array or an envelope.
    #[error("`sent` and `nonce` describe the whole message: put them in an envelope")]
    MessageFieldInRecord,
    /// `records` below the top level.
    #[error("`records` is only allowed at the top level (envelopes do not nest)")]
    NestedEnvelope,
    /// A series or time field beside `records`.
    #[error("an envelope holds only `sent`, `nonce` and `records`; put series in its records")]
    EnvelopeField,
}

/// `ms` in a unit that keeps two significant digits or more: `3 days`, `5 h`, `3599 s`,
/// `250 ms`.
fn span(ms: i64) -> String {
    match ms {
        ms if ms >= 2 * 86_400_000 => format!("{} days", ms / 86_400_000),
        ms if ms >= 2 * 3_600_000 => format!("{} h", ms / 3_600_000),
        ms if ms >= 1000 => format!("{} s", ms / 1000),
        ms => format!("{ms} ms"),
    }
}

/// Parses a query-style time: epoch milliseconds (an optionally signed integer) or RFC 3339,
/// within the years 0000 to 9999, as `from=`/`to=` of the telemetry query take it.
pub fn parse_time_param(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let ms = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<i64>().ok()?
    } else {
        parse_rfc3339_ms(s)?
    };
    (MIN_TS_MS..=MAX_TS_MS).contains(&ms).then_some(ms)
}

fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// A field value as read, before it is judged.
#[derive(Debug)]
enum Raw<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Cow<'a, str>),
    /// A nested object's fields (within [`MAX_NESTING`]), flattened by the builder.
    Object(Vec<(Cow<'a, str>, Raw<'a>)>),
    /// An object nested deeper than [`MAX_NESTING`] (its contents skipped).
    TooDeep,
    /// A nested CBOR map with a key that is not a text string.
    KeyNotText,
    Array,
    Bytes,
    Tagged,
}

/// A record being read.
#[derive(Default)]
struct Draft {
    ts: Option<i64>,
    date: Option<Date>,
    time: Option<Time>,
    values: Vec<(String, Value)>,
}

impl Draft {
    /// Some field this draft holds, to name when it must not be there.
    fn any_field(&self) -> Option<&str> {
        if self.ts.is_some() {
            Some("ts")
        } else if self.date.is_some() {
            Some("date")
        } else if self.time.is_some() {
            Some("time")
        } else {
            self.values.first().map(|(k, _)| k.as_str())
        }
    }
}

/// The top-level object: a single record or an envelope, which only `records` tells.
#[derive(Default)]
struct Top {
    draft: Draft,
    envelope: bool,
}

fn invalid(index: Option<usize>, field: Option<&str>, reason: Reason) -> IngestError {
    let field = field.map(|f| {
        if f.len() <= ERROR_FIELD_MAX {
            f.to_owned()
        } else {
            let mut end = ERROR_FIELD_MAX;
            while !f.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &f[..end])
        }
    });
    IngestError::Invalid {
        index,
        field,
        reason,
    }
}

/// Holds every rule; both encodings drive it.
struct Builder<'l> {
    limits: &'l Limits,
    now_ms: i64,
    message: Message,
    /// The rule broken inside a serde visitor, reported instead of serde's error.
    error: Option<IngestError>,
}

impl<'l> Builder<'l> {
    fn new(limits: &'l Limits, now_ms: i64) -> Self {
        Builder {
            limits,
            now_ms,
            message: Message::default(),
            error: None,
        }
    }

    /// Parks `e` and returns the serde error that unwinds the parse.
    fn fail<E: de::Error>(&mut self, e: IngestError) -> E {
        self.error = Some(e);
        E::custom("invalid telemetry message")
    }

    fn lift<T, E: de::Error>(&mut self, r: Result<T, IngestError>) -> Result<T, E> {
        r.map_err(|e| self.fail(e))
    }

    fn top_field(
        &mut self,
        top: &mut Top,
        key: Cow<'_, str>,
        raw: Raw<'_>,
    ) -> Result<(), IngestError> {
        match &*key {
            "sent" => {
                if self.message.sent.is_some() {
                    return Err(invalid(None, Some("sent"), Reason::Duplicate));
                }
                let sent = match raw {
                    Raw::Int(n) => i64::try_from(n)
                        .ok()
                        .filter(|ms| (MIN_TS_MS..=MAX_TS_MS).contains(ms)),
                    _ => None,
                };
                let sent = sent.ok_or_else(|| invalid(None, Some("sent"), Reason::BadSent))?;
                self.message.sent = Some(sent);
                Ok(())
            }
            "nonce" => {
                if self.message.nonce.is_some() {
                    return Err(invalid(None, Some("nonce"), Reason::Duplicate));
                }
                let nonce = match raw {
                    Raw::Str(s) if !s.is_empty() => s,
                    _ => return Err(invalid(None, Some("nonce"), Reason::BadNonce)),
                };
                if nonce.len() > self.limits.max_nonce_len {
                    let max = self.limits.max_nonce_len;
                    return Err(invalid(None, Some("nonce"), Reason::NonceTooLong { max }));
                }
                self.message.nonce = Some(nonce.into_owned());
                Ok(())
            }
            _ if top.envelope => Err(invalid(None, Some(&key), Reason::EnvelopeField)),
            _ => self.record_field(&mut top.draft, 0, key, raw),
        }
    }

    /// `records` seen at the top level.
    fn begin_envelope(&mut self, top: &mut Top) -> Result<(), IngestError> {
        if top.envelope {
            return Err(invalid(None, Some("records"), Reason::Duplicate));
        }
        if let Some(field) = top.draft.any_field() {
            return Err(invalid(None, Some(field), Reason::EnvelopeField));
        }
        top.envelope = true;
        Ok(())
    }

    fn finish_top(&mut self, top: Top) -> Result<(), IngestError> {
        match (&self.message.sent, &self.message.nonce) {
            (Some(_), None) => return Err(invalid(None, Some("nonce"), Reason::FreshnessPair)),
            (None, Some(_)) => return Err(invalid(None, Some("sent"), Reason::FreshnessPair)),
            _ => {}
        }
        if top.envelope {
            self.finish_list()
        } else {
            let record = self.finish_draft(top.draft, 0)?;
            self.message.records.push(record);
            Ok(())
        }
    }

    fn finish_list(&self) -> Result<(), IngestError> {
        if self.message.records.is_empty() {
            return Err(invalid(None, None, Reason::NoRecords));
        }
        check_same_times(&self.message.records)
    }

    /// An element of a records array begins: its index, if one more record is allowed.
    fn begin_item(&self) -> Result<usize, IngestError> {
        let index = self.message.records.len();
        if index >= self.limits.max_records {
            let max = self.limits.max_records;
            return Err(invalid(None, None, Reason::TooManyRecords { max }));
        }
        Ok(index)
    }

    fn item_field(
        &mut self,
        draft: &mut Draft,
        index: usize,
        key: Cow<'_, str>,
        raw: Raw<'_>,
    ) -> Result<(), IngestError> {
        match &*key {
            "sent" | "nonce" => Err(invalid(
                Some(index),
                Some(&key),
                Reason::MessageFieldInRecord,
            )),
            "records" => Err(invalid(Some(index), Some(&key), Reason::NestedEnvelope)),
            _ => self.record_field(draft, index, key, raw),
        }
    }

    fn end_item(&mut self, draft: Draft, index: usize) -> Result<(), IngestError> {
        let record = self.finish_draft(draft, index)?;
        self.message.records.push(record);
        Ok(())
    }

    /// A field of a record other than `sent`, `nonce` and `records`.
    fn record_field(
        &mut self,
        draft: &mut Draft,
        index: usize,
        key: Cow<'_, str>,
        raw: Raw<'_>,
    ) -> Result<(), IngestError> {
        let at = |field: &str, reason| invalid(Some(index), Some(field), reason);
        match &*key {
            "ts" => {
                if draft.ts.is_some() {
                    return Err(at("ts", Reason::Duplicate));
                }
                draft.ts = Some(parse_ts(raw).map_err(|r| at("ts", r))?);
            }
            "date" => {
                if draft.date.is_some() {
                    return Err(at("date", Reason::Duplicate));
                }
                let date = match raw {
                    Raw::Str(s) => parse_date(&s),
                    _ => None,
                };
                draft.date = Some(date.ok_or_else(|| at("date", Reason::BadDate))?);
            }
            "time" => {
                if draft.time.is_some() {
                    return Err(at("time", Reason::Duplicate));
                }
                let time = match raw {
                    Raw::Str(s) => parse_time_of_day(&s),
                    _ => None,
                };
                draft.time = Some(time.ok_or_else(|| at("time", Reason::BadTime))?);
            }
            name => {
                self.check_key(name).map_err(|r| at(name, r))?;
                self.series_field(draft, index, key, raw)?;
            }
        }
        Ok(())
    }

    /// A series field named `name` (checked), or a nested object whose fields become series
    /// named `name.field`, depth first in input order.
    fn series_field(
        &self,
        draft: &mut Draft,
        index: usize,
        name: Cow<'_, str>,
        raw: Raw<'_>,
    ) -> Result<(), IngestError> {
        let at = |reason| invalid(Some(index), Some(&name), reason);
        match raw {
            Raw::Object(fields) => {
                for (field, raw) in fields {
                    let nested = format!("{name}.{field}");
                    if field.is_empty() {
                        return Err(invalid(Some(index), Some(&nested), Reason::EmptyKey));
                    }
                    self.check_key(&nested)
                        .map_err(|r| invalid(Some(index), Some(&nested), r))?;
                    self.series_field(draft, index, Cow::Owned(nested), raw)?;
                }
                Ok(())
            }
            Raw::TooDeep => Err(at(Reason::TooDeep { max: MAX_NESTING })),
            Raw::KeyNotText => Err(at(Reason::KeyNotText)),
            raw => {
                if draft.values.len() >= self.limits.max_series {
                    let max = self.limits.max_series;
                    return Err(at(Reason::TooManySeries { max }));
                }
                let value = self.series_value(raw).map_err(at)?;
                draft.values.push((name.into_owned(), value));
                Ok(())
            }
        }
    }

    fn check_key(&self, key: &str) -> Result<(), Reason> {
        if key.is_empty() {
            Err(Reason::EmptyKey)
        } else if key.len() > self.limits.max_key_len {
            Err(Reason::KeyTooLong {
                max: self.limits.max_key_len,
            })
        } else if key.chars().any(char::is_control) {
            Err(Reason::KeyControlChars)
        } else {
            Ok(())
        }
    }

    fn series_value(&self, raw: Raw<'_>) -> Result<Value, Reason> {
        match raw {
            Raw::Bool(b) => Ok(Value::Bool(b)),
            // Exact up to 2^53, rounded beyond: the store keeps f64.
            Raw::Int(n) => Ok(Value::Number(n as f64)),
            Raw::Float(f) if f.is_finite() => Ok(Value::Number(f)),
            Raw::Float(_) => Err(Reason::NonFinite),
            Raw::Str(s) if s.len() > self.limits.max_text_len => Err(Reason::TextTooLong {
                max: self.limits.max_text_len,
            }),
            Raw::Str(s) => Ok(Value::Text(s.into_owned())),
            Raw::Null => Err(Reason::NullValue),
            Raw::Object(_) | Raw::TooDeep => Err(Reason::TooDeep { max: MAX_NESTING }),
            Raw::KeyNotText => Err(Reason::KeyNotText),
            Raw::Array => Err(Reason::ArrayValue),
            Raw::Bytes => Err(Reason::BytesValue),
            Raw::Tagged => Err(Reason::TaggedValue),
        }
    }

    fn finish_draft(&self, draft: Draft, index: usize) -> Result<Record, IngestError> {
        let at = |field: &str, reason| invalid(Some(index), Some(field), reason);
        let (ts_ms, time_from) = match (draft.ts, draft.date, draft.time) {
            (Some(_), Some(_), _) => return Err(at("date", Reason::TsAndDateTime)),
            (Some(_), None, Some(_)) => return Err(at("time", Reason::TsAndDateTime)),
            (Some(ts), None, None) => (ts, TimeSource::Ts),
            (None, Some(date), Some(time)) => (
                PrimitiveDateTime::new(date, time)
                    .assume_utc()
                    .unix_timestamp()
                    * 1000,
                TimeSource::DateTime,
            ),
            (None, Some(_), None) => return Err(at("date", Reason::DateWithoutTime)),
            (None, None, Some(_)) => return Err(at("time", Reason::TimeWithoutDate)),
            (None, None, None) => (self.now_ms, TimeSource::Received),
        };
        if draft.values.is_empty() {
            return Err(invalid(Some(index), None, Reason::NoSeries));
        }
        if let Some(dup) = find_duplicate(&draft.values) {
            return Err(at(dup, Reason::Duplicate));
        }
        Ok(Record {
            ts_ms,
            time_from,
            values: draft.values,
        })
    }
}

/// Refuses two records of one message that give one series a value at the same millisecond
/// by their own times (`ts`, `date`/`time`); records without a time get distinct receive
/// times later ([`Message::assign_receive_times`]).
fn check_same_times(records: &[Record]) -> Result<(), IngestError> {
    // The usual batch has strictly rising times: then no two records can meet.
    let mut last: Option<i64> = None;
    let rising = records
        .iter()
        .filter(|r| r.time_from != TimeSource::Received)
        .all(|r| {
            let ok = last.is_none_or(|l| l < r.ts_ms);
            last = Some(r.ts_ms);
            ok
        });
    if rising {
        return Ok(());
    }
    let mut seen: HashMap<(i64, &str), usize> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if r.time_from == TimeSource::Received {
            continue;
        }
        for (key, _) in &r.values {
            match seen.entry((r.ts_ms, key.as_str())) {
                Entry::Occupied(first) => {
                    let reason = Reason::SameTime {
                        record: *first.get(),
                        ts_ms: r.ts_ms,
                    };
                    return Err(invalid(Some(i), Some(key), reason));
                }
                Entry::Vacant(v) => {
                    v.insert(i);
                }
            }
        }
    }
    Ok(())
}

/// A series name used twice, if any: pairwise for the usual handful, sorted beyond.
fn find_duplicate(values: &[(String, Value)]) -> Option<&str> {
    if values.len() <= 16 {
        for (i, (a, _)) in values.iter().enumerate() {
            if values[..i].iter().any(|(b, _)| a == b) {
                return Some(a);
            }
        }
        None
    } else {
        let mut keys: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }
}

fn parse_ts(raw: Raw<'_>) -> Result<i64, Reason> {
    let ms = match raw {
        Raw::Int(n) => i64::try_from(n).map_err(|_| Reason::TimestampOutOfRange)?,
        Raw::Str(s) => parse_rfc3339_ms(&s).ok_or(Reason::BadTimestamp)?,
        _ => return Err(Reason::BadTimestamp),
    };
    if (MIN_TS_MS..=MAX_TS_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(Reason::TimestampOutOfRange)
    }
}

/// The value of a run of ASCII digits, or `None`.
fn digits(b: &[u8]) -> Option<u16> {
    b.iter().try_fold(0u16, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u16::from(d - b'0'))
    })
}

/// Exactly `YYYY-MM-DD`, a real calendar date.
fn parse_date(s: &str) -> Option<Date> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = Month::try_from(u8::try_from(digits(&b[5..7])?).ok()?).ok()?;
    let day = u8::try_from(digits(&b[8..10])?).ok()?;
    Date::from_calendar_date(i32::from(year), month, day).ok()
}

/// Exactly `HH:MM:SS` (24-hour, no leap second, no fraction).
fn parse_time_of_day(s: &str) -> Option<Time> {
    let b = s.as_bytes();
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let part = |r: std::ops::Range<usize>| digits(&b[r]).and_then(|n| u8::try_from(n).ok());
    Time::from_hms(part(0..2)?, part(3..5)?, part(6..8)?).ok()
}

// ---------------------------------------------------------------------------------------
// JSON: serde visitors drive the builder while the bytes are read.

pub(super) fn parse_json(
    payload: &[u8],
    limits: &Limits,
    now_ms: i64,
) -> Result<Message, IngestError> {
    let mut builder = Builder::new(limits, now_ms);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let result = TopSeed { b: &mut builder }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    match result {
        Ok(()) => Ok(builder.message),
        Err(e) => Err(builder.error.take().unwrap_or(IngestError::Json(e))),
    }
}

/// Implements the visitor methods of every non-container value as `self.refuse()`.
macro_rules! refuse_scalars {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.refuse()
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            self.refuse()
        }
    };
}

/// The whole payload.
struct TopSeed<'b, 'l> {
    b: &'b mut Builder<'l>,
}

impl TopSeed<'_, '_> {
    fn refuse<E: de::Error>(self) -> Result<(), E> {
        Err(self.b.fail(invalid(None, None, Reason::NotObjectOrArray)))
    }
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object, an array of records or an envelope")
    }

    refuse_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let b = self.b;
        let mut top = Top::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if key == "records" {
                let r = b.begin_envelope(&mut top);
                b.lift(r)?;
                map.next_value_seed(RecordsSeed { b: &mut *b })?;
            } else {
                let raw = map.next_value_seed(RawSeed { level: 1 })?;
                let r = b.top_field(&mut top, key, raw);
                b.lift(r)?;
            }
        }
        let r = b.finish_top(top);
        b.lift(r)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        visit_records(self.b, seq)
    }
}

fn visit_records<'de, A: SeqAccess<'de>>(b: &mut Builder<'_>, mut seq: A) -> Result<(), A::Error> {
    while seq.next_element_seed(ItemSeed { b: &mut *b })?.is_some() {}
    let r = b.finish_list();
    b.lift(r)
}

/// The value of a top-level `records`.
struct RecordsSeed<'b, 'l> {
    b: &'b mut Builder<'l>,
}

impl RecordsSeed<'_, '_> {
    fn refuse<E: de::Error>(self) -> Result<(), E> {
        Err(self
            .b
            .fail(invalid(None, Some("records"), Reason::RecordsNotArray)))
    }
}

impl<'de> DeserializeSeed<'de> for RecordsSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of records")
    }

    refuse_scalars!();

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.refuse()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        visit_records(self.b, seq)
    }
}

/// One element of a records array; it knows its index once it exists.
struct ItemSeed<'b, 'l> {
    b: &'b mut Builder<'l>,
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let b = self.b;
        let r = b.begin_item();
        let index = b.lift(r)?;
        d.deserialize_any(ItemVisitor { b, index })
    }
}

struct ItemVisitor<'b, 'l> {
    b: &'b mut Builder<'l>,
    index: usize,
}

impl ItemVisitor<'_, '_> {
    fn refuse<E: de::Error>(self) -> Result<(), E> {
        Err(self
            .b
            .fail(invalid(Some(self.index), None, Reason::NotAnObject)))
    }
}

impl<'de> Visitor<'de> for ItemVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a record object")
    }

    refuse_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.refuse()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (b, index) = (self.b, self.index);
        let mut draft = Draft::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let raw = map.next_value_seed(RawSeed { level: 1 })?;
            let r = b.item_field(&mut draft, index, key, raw);
            b.lift(r)?;
        }
        let r = b.end_item(draft, index);
        b.lift(r)
    }
}

/// A field name, borrowed from the input unless it had escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// A field value at `level` of names (a record's own fields are level 1). Arrays, and
/// objects beyond [`MAX_NESTING`], are skipped over (the builder refuses them); objects
/// within it are read for the builder to flatten.
struct RawSeed {
    level: usize,
}

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = Raw<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RawSeed {
    type Value = Raw<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Raw::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Raw::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Raw::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Ok(Raw::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Ok(i128::try_from(v).map_or(Raw::Float(v as f64), Raw::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Raw::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Owned(v)))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Raw::Bytes)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Raw::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Raw::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if self.level >= MAX_NESTING {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Raw::TooDeep);
        }
        let mut fields = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(RawSeed {
                level: self.level + 1,
            })?;
            fields.push((key, value));
        }
        Ok(Raw::Object(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Raw::Array)
    }
}

// ---------------------------------------------------------------------------------------
// CBOR: decoded to a ciborium::Value (ciborium takes no seed), then walked.

/// RFC 8949 §3.4.6: the self-described CBOR tag, allowed around the whole message.
const SELF_DESCRIBED_CBOR: u64 = 55799;

pub(super) fn parse_cbor(
    payload: &[u8],
    limits: &Limits,
    now_ms: i64,
) -> Result<Message, IngestError> {
    let mut rest = payload;
    let value: ciborium::Value =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, CBOR_RECURSION_LIMIT)
            .map_err(cbor_error)?;
    if !rest.is_empty() {
        return Err(IngestError::Cbor {
            offset: Some(payload.len() - rest.len()),
            detail: "trailing bytes after the message".to_owned(),
        });
    }
    let mut builder = Builder::new(limits, now_ms);
    let mut value = &value;
    while let ciborium::Value::Tag(SELF_DESCRIBED_CBOR, inner) = value {
        value = inner;
    }
    cbor_top(&mut builder, value)?;
    Ok(builder.message)
}

fn cbor_error<T>(e: ciborium::de::Error<T>) -> IngestError {
    use ciborium::de::Error;
    let (offset, detail) = match e {
        Error::Io(_) => (None, "unexpected end of input".to_owned()),
        Error::Syntax(offset) => (Some(offset), "syntax error".to_owned()),
        Error::Semantic(offset, detail) => (offset, detail),
        Error::RecursionLimitExceeded => (None, "nested too deeply".to_owned()),
    };
    IngestError::Cbor { offset, detail }
}

fn cbor_top(b: &mut Builder<'_>, value: &ciborium::Value) -> Result<(), IngestError> {
    use ciborium::Value as V;
    match value {
        V::Map(entries) => {
            let mut top = Top::default();
            for (k, v) in entries {
                let index = if top.envelope { None } else { Some(0) };
                let key = cbor_key(k).ok_or_else(|| invalid(index, None, Reason::KeyNotText))?;
                if key == "records" {
                    b.begin_envelope(&mut top)?;
                    let V::Array(items) = v else {
                        return Err(invalid(None, Some("records"), Reason::RecordsNotArray));
                    };
                    cbor_records(b, items)?;
                } else {
                    b.top_field(&mut top, Cow::Borrowed(key), cbor_raw(v, 1))?;
                }
            }
            b.finish_top(top)
        }
        V::Array(items) => {
            cbor_records(b, items)?;
            b.finish_list()
        }
        _ => Err(invalid(None, None, Reason::NotObjectOrArray)),
    }
}

fn cbor_records(b: &mut Builder<'_>, items: &[ciborium::Value]) -> Result<(), IngestError> {
    for item in items {
        let index = b.begin_item()?;
        let ciborium::Value::Map(entries) = item else {
            return Err(invalid(Some(index), None, Reason::NotAnObject));
        };
        let mut draft = Draft::default();
        for (k, v) in entries {
            let key = cbor_key(k).ok_or_else(|| invalid(Some(index), None, Reason::KeyNotText))?;
            b.item_field(&mut draft, index, Cow::Borrowed(key), cbor_raw(v, 1))?;
        }
        b.end_item(draft, index)?;
    }
    Ok(())
}

fn cbor_key(key: &ciborium::Value) -> Option<&str> {
    match key {
        ciborium::Value::Text(s) => Some(s),
        _ => None,
    }
}

/// A field value at `level` of names, as [`RawSeed`] reads JSON.
fn cbor_raw(value: &ciborium::Value, level: usize) -> Raw<'_> {
    use ciborium::Value as V;
    match value {
        V::Map(_) if level >= MAX_NESTING => Raw::TooDeep,
        V::Map(entries) => {
            let mut fields = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                let Some(key) = cbor_key(k) else {
                    return Raw::KeyNotText;
                };
                fields.push((Cow::Borrowed(key), cbor_raw(v, level + 1)));
            }
            Raw::Object(fields)
        }
        V::Integer(n) => Raw::Int(i128::from(*n)),
        V::Float(f) => Raw::Float(*f),
        V::Text(s) => Raw::Str(Cow::Borrowed(s)),
        V::Bool(b) => Raw::Bool(*b),
        V::Null => Raw::Null,
        V::Bytes(_) => Raw::Bytes,
        V::Array(_) => Raw::Array,
        _ => Raw::Tagged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_of_day() {
        assert!(parse_date("2018-04-04").is_some());
        assert!(parse_date("0000-01-01").is_some());
        assert!(parse_date("9999-12-31").is_some());
        for bad in [
            "2018-04-4",
            "2018-04-004",
            "2018/04/04",
            "2018-00-10",
            "2018-04-31",
            "２０18-04-04",
            "+018-04-04",
            "2018-04-0a",
            "",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert!(parse_time_of_day("00:00:00").is_some());
        assert!(parse_time_of_day("23:59:59").is_some());
        for bad in [
            "23:59:60",
            "24:00:00",
            "9:30:00",
            "09-30-00",
            "09:30:0",
            "09:30:000",
            "-1:30:00",
        ] {
            assert_eq!(parse_time_of_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn duplicates_found_both_ways() {
        let v = |keys: &[&str]| -> Vec<(String, Value)> {
            keys.iter()
                .map(|k| ((*k).to_owned(), Value::Bool(true)))
                .collect()
        };
        assert_eq!(find_duplicate(&v(&["a", "b", "c"])), None);
        assert_eq!(find_duplicate(&v(&["a", "b", "a"])), Some("a"));
        let many: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
        let mut keys: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(find_duplicate(&v(&keys)), None);
        keys.push("k29");
        assert_eq!(find_duplicate(&v(&keys)), Some("k29"));
    }

    #[test]
    fn long_field_names_are_cut_on_a_char_boundary() {
        let name = format!("a{}", "é".repeat(100));
        let IngestError::Invalid { field: Some(f), .. } =
            invalid(Some(0), Some(&name), Reason::EmptyKey)
        else {
            panic!("not Invalid");
        };
        assert!(f.len() <= ERROR_FIELD_MAX + '…'.len_utf8());
        assert!(f.ends_with('…'));
        assert!(name.starts_with(f.trim_end_matches('…')));
    }

    #[test]
    fn display_of_each_shape() {
        let show = |i, f: Option<&str>| invalid(i, f, Reason::NoSeries).to_string();
        let r = Reason::NoSeries.to_string();
        assert_eq!(
            show(Some(2), Some("x")),
            format!("record 2, field \"x\": {r}")
        );
        assert_eq!(show(Some(2), None), format!("record 2: {r}"));
        assert_eq!(show(None, Some("x")), format!("field \"x\": {r}"));
        assert_eq!(show(None, None), r);
    }
}
