//! Telemetry ingestion front end: parses, validates and freshness-checks device messages,
//! the same for every transport (HTTP `POST /api/v1/telemetry`, MQTT
//! `devices/{id}/telemetry`, CoAP `/telemetry`), with no I/O, no clock and no async.
//!
//! The pipeline calls [`parse`] with the payload, its content format, the [`Limits`] and the
//! receive time, [`Message::check_not_ahead`], [`FreshnessGuard::check`], gives the records
//! without a time their receive times ([`ReceiveClock::assign`]), then hands the [`Message`]
//! to the store, and [`Reservation::commit`]s the nonce only once the store has accepted the
//! message:
//!
//! ```
//! use stratus_server::ingest::{parse, ContentFormat, FreshnessGuard, Limits, ReceiveClock};
//!
//! let (guard, clock) = (FreshnessGuard::default(), ReceiveClock::new());
//! let now = 1_522_834_210_000;
//! let body = br#"[{"date": "2018-04-04", "time": "09:30:00", "temperature": 20.1},
//!                 {"temperature": 20.4}, {"temperature": 20.5, "loc": {"lat": 55.9}}]"#;
//! let mut message = parse(body, ContentFormat::Json, &Limits::default(), now)?;
//! message.check_not_ahead(now, 600_000)?;
//! let reservation = guard.check_message("sensor-1", &message, false, now)?;
//! clock.assign("sensor-1", now, &mut message, Some(600_000))?;
//! let times: Vec<i64> = message.records.iter().map(|r| r.ts_ms).collect();
//! assert_eq!(times, [1_522_834_200_000, now, now + 1]);
//! assert_eq!(message.records[2].values[1].0, "loc.lat");
//! // ... store `message`; only when that succeeded:
//! reservation.commit();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The format (SPEC "Telemetry record")
//! A *record* is an object. Its measurement time is
//! - `ts`: epoch milliseconds as an integer, or an RFC 3339 string (any offset, any number of
//!   fractional digits, sub-millisecond digits truncated toward the past; a space for the `T`
//!   and lower-case `t`/`z` as RFC 3339 §5.6 allows), or
//! - `date` (`YYYY-MM-DD`) and `time` (`HH:MM:SS`, UTC) together, or
//! - the receive time when neither is given (see "No silent loss" below).
//!
//! Any past time back to the year 0000 is accepted (devices buffer while offline); a future
//! one only up to `[telemetry] max_future_skew_secs` ahead of the server clock (below). Every
//! other top-level field whose value is a number, a boolean or a string is a *series* named
//! by the field ([`Value`]); a field whose value is an object stands for the series of its
//! fields, named with dots (`{"loc": {"lat": 55.9}}` is the series `loc.lat`), down to
//! [`MAX_NESTING`] levels of names. A *message* is one record, an array of records, or an
//! envelope `{"sent": MS, "nonce": "…", "records": [...]}`; a single (non-array) record may
//! carry `sent` and `nonce` itself, and they are then message fields, not series.
//!
//! # Choices where the contract is silent
//! - **All or nothing.** One bad record rejects the whole message, with an
//!   [`IngestError::Invalid`] naming the record index and the field, e.g.
//!   `record 3, field "ts": not epoch milliseconds or RFC 3339`. Nothing is dropped silently:
//!   a device that gets a 2xx/PUBACK/2.04 knows every value was taken.
//! - **Nested objects are flattened** into dotted names (ThingsBoard-style records such as
//!   `{"temperature": 20.5, "loc": {"lat": 55.9, "lon": -3.2}}` give `temperature`, `loc.lat`
//!   and `loc.lon`), depth first in input order, to at most [`MAX_NESTING`] levels (`a.b.c.d`;
//!   deeper is refused naming the field, [`Reason::TooDeep`]). Each flattened name obeys the
//!   limits of a field name (its whole length, no control characters, no empty part) and
//!   counts as one series against [`Limits::max_series`]. A dotted field name sent flat is the
//!   same series: `{"loc.lat": 1}` and `{"loc": {"lat": 1}}` both store `loc.lat`, and a record
//!   holding both is refused as a duplicate. An empty object adds no series. CBOR maps nest the
//!   same way (their keys must be text).
//! - **Null and array values are rejected** (naming the field, dotted when nested) rather
//!   than skipped: skipping would lose data without telling anyone, and an array has no name
//!   per element to store it under. CBOR byte strings and tagged values likewise.
//! - **Reserved names:** `ts`, `date`, `time`, `sent`, `nonce` and `records` are never series.
//!   `sent` and `nonce` come together or not at all (a lone `sent` is most likely a counter that
//!   would otherwise vanish into the message header); inside the records of an array or an
//!   envelope they are refused, as is `records` anywhere but the top level. An envelope holds
//!   only `sent`, `nonce` and `records`.
//! - **Strictness:** `ts` as a JSON float (`1.5e12`) or a digit string is refused (not integer
//!   milliseconds, not RFC 3339); `time` has no fractional part; duplicate field names in one
//!   object are refused (RFC 8259 leaves their meaning open); field names must be 1 to
//!   [`Limits::max_key_len`] bytes without control characters; numbers must be finite. Integer
//!   values are stored as `f64`, exact up to 2^53.
//! - **Limits** ([`Limits`], configurable, safe defaults): payload 1 MiB, 10 000 records per
//!   message, 256 series per record, field names 128 bytes, string values 4096 bytes, nonces
//!   128 bytes. Exceeding one rejects the message naming the limit.
//!
//! # No silent loss: one value per series and millisecond
//! The store keys a point by `(series, millisecond)` and keeps the first value written for a
//! key, which is what makes a redelivered message harmless. So that this never drops a value
//! a device meant to keep, while acknowledging it:
//! - **Records without a time never share a millisecond.** The server gives each its own
//!   receive time: per device, consecutive milliseconds from `max(now, last given + 1)`, in
//!   the order of the message, skipping times that the message's other records claim
//!   ([`ReceiveClock`]). `[{"x":1},{"x":2},{"x":3}]` received at `T` stores `x` at `T`, `T+1`
//!   and `T+2`; two MQTT publishes without `ts` that arrive in one millisecond get `T` and
//!   `T+1`. A device that sends more than 1000 such records per second runs its clock
//!   ahead; beyond `max_future_skew_secs` ahead its messages are refused as over a rate
//!   (HTTP 429 + `Retry-After`, CoAP 4.29, MQTT 5 0x97).
//! - **Two records of one message with the same own time for one series are refused**
//!   (HTTP 400, CoAP 4.00, MQTT 5 0x99) naming the later record, the series and the earlier
//!   record ([`Reason::SameTime`]): the device asked for two values at one instant, and no
//!   rule for picking one would be what it meant. RFC 3339 times that differ only below the
//!   millisecond count as the same time.
//! - **Across messages, an own time that meets a stored point is a duplicate**: the first
//!   value stays (a redelivery — MQTT QoS 1 `DUP`, an HTTP retry after a lost answer — must
//!   not be stored twice), and the acknowledgement says so: the 202 body is
//!   `{"accepted": RECORDS, "points": STORED, "duplicates": ALREADY_STORED}`, so `points` is
//!   exactly what a query returns that it did not return before. A message without times that
//!   is redelivered is stored again under new receive times; give records a `ts` to make
//!   retries idempotent.
//! - **Times too far ahead are refused**: a record whose own time is more than
//!   `[telemetry] max_future_skew_secs` (default 600) after the server clock refuses the
//!   message naming the record and `ts` (or `date`) ([`Reason::InFuture`],
//!   [`Message::check_not_ahead`]), so a device clock set to 9999 cannot pin the latest
//!   value of a series for years. Ten minutes is far more than a real-time clock drifts
//!   between synchronisations (20 ppm is under a minute a month) and than any delivery delay,
//!   and far less than the whole hours of a time zone sent as UTC, which is better refused
//!   loudly; AWS IoT SiteWise draws the same line. `0` turns the check off.
//!
//! # Freshness
//! [`FreshnessGuard`] implements the contract's replay protection: see [`freshness`] for the
//! window, the bounded nonce memory (it refuses rather than forgets when full, so a replay never
//! slips through) and the reserve-then-commit protocol that keeps a message rejected for
//! another reason from burning its nonce.
//!
//! # Performance
//! JSON is deserialized straight into [`Record`]s through serde seeds: no intermediate tree,
//! field names and strings without escapes are borrowed from the input, reserved names cost no
//! allocation, and parsing stops at the first error. CBOR goes through `ciborium::Value` first
//! (ciborium has no seeded deserialization), which is fine for CoAP-sized payloads.
//!
//! # Dependencies
//! - `serde` + `serde_json` (already used by the crate): the JSON reader, driven by our own
//!   visitors so one pass validates and builds records, with serde's error positions.
//! - `ciborium`: CBOR (RFC 8949, CoAP content-format 60), the maintained serde-compatible CBOR
//!   crate (serde_cbor is archived), with a recursion limit against hostile nesting.
//! - `time`: RFC 3339 parsing and calendar validation. Chosen over `chrono` because it is
//!   already in the dependency tree (rcgen, x509-parser), so it adds no crate, and its
//!   `Rfc3339` well-known format is exactly the grammar the contract names.
//! - `parking_lot`: the short, sharded locks of the nonce memory and the receive clock.
//! - `thiserror`: the error types.

pub mod clock;
pub mod freshness;
pub mod record;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

pub use clock::{Ahead, ReceiveClock};
pub use freshness::{FreshnessConfig, FreshnessGuard, Replay, Reservation};
pub use record::{parse_time_param, Reason, MAX_NESTING};

/// One measurement's value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A finite number (JSON integers and floats alike).
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A string, at most [`Limits::max_text_len`] bytes.
    Text(String),
}

/// Where a record's time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// Its `ts` field.
    Ts,
    /// Its `date` and `time` fields.
    DateTime,
    /// Neither: the server gives it a receive time ([`Message::assign_receive_times`]).
    Received,
}

impl TimeSource {
    /// The field to name in an error about the time.
    fn field(self) -> Option<&'static str> {
        match self {
            TimeSource::Ts => Some("ts"),
            TimeSource::DateTime => Some("date"),
            TimeSource::Received => None,
        }
    }
}

/// One record: a measurement time and the values of its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Measurement time, epoch milliseconds (UTC).
    pub ts_ms: i64,
    /// Where `ts_ms` came from.
    pub time_from: TimeSource,
    /// `(series name, value)` in the order of the input (nested objects flattened to dotted
    /// names, depth first); names are unique within a record.
    pub values: Vec<(String, Value)>,
}

/// A parsed, validated message: its freshness fields and its records (at least one).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// `sent`: when the device sent the message, epoch milliseconds. Present iff `nonce` is.
    pub sent: Option<i64>,
    /// `nonce`: the device's unique value for this message.
    pub nonce: Option<String>,
    /// The records, in input order.
    pub records: Vec<Record>,
}

impl Message {
    /// The number of points (series values) over all records.
    pub fn point_count(&self) -> usize {
        self.records.iter().map(|r| r.values.len()).sum()
    }

    /// The number of records without a time of their own.
    pub fn received_count(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.time_from == TimeSource::Received)
            .count()
    }

    /// Gives the records without a time of their own the consecutive milliseconds from
    /// `first_ms` on, in order, skipping those that a record of this message claims with its
    /// own time. Returns the last one given (`None` when every record has its own time).
    /// [`ReceiveClock::assign`] calls it with a `first_ms` it never gave the device before.
    pub fn assign_receive_times(&mut self, first_ms: i64) -> Option<i64> {
        let received = self.received_count();
        if received == 0 {
            return None;
        }
        // Only the rare message that mixes both kinds pays for the set.
        let claimed: HashSet<i64> = if received < self.records.len() {
            self.records
                .iter()
                .filter(|r| r.time_from != TimeSource::Received && r.ts_ms >= first_ms)
                .map(|r| r.ts_ms)
                .collect()
        } else {
            HashSet::new()
        };
        let mut next = first_ms;
        let mut last = None;
        for r in &mut self.records {
            if r.time_from != TimeSource::Received {
                continue;
            }
            while claimed.contains(&next) {
                next = next.saturating_add(1);
            }
            r.ts_ms = next;
            last = Some(next);
            next = next.saturating_add(1);
        }
        last
    }

    /// Refuses the message when a record's own time is more than `max_ahead_ms` after
    /// `now_ms` (`[telemetry] max_future_skew_secs`), naming the first such record and its
    /// `ts` (or `date`). Receive times are bounded by [`ReceiveClock::assign`] instead.
    pub fn check_not_ahead(&self, now_ms: i64, max_ahead_ms: i64) -> Result<(), IngestError> {
        let limit = now_ms.saturating_add(max_ahead_ms);
        let ahead = self
            .records
            .iter()
            .enumerate()
            .find(|(_, r)| r.time_from != TimeSource::Received && r.ts_ms > limit);
        match ahead {
            None => Ok(()),
            Some((index, r)) => Err(IngestError::Invalid {
                index: Some(index),
                field: r.time_from.field().map(str::to_owned),
                reason: Reason::InFuture {
                    ahead_ms: r.ts_ms - now_ms,
                    max_ms: max_ahead_ms,
                },
            }),
        }
    }
}

/// The encoding of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentFormat {
    /// `application/json` (CoAP content-format 50).
    Json,
    /// `application/cbor` (CoAP content-format 60).
    Cbor,
}

impl ContentFormat {
    /// The format of a CoAP Content-Format option value (RFC 7252 §12.3), if supported.
    pub fn from_coap(content_format: u16) -> Option<ContentFormat> {
        match content_format {
            50 => Some(ContentFormat::Json),
            60 => Some(ContentFormat::Cbor),
            _ => None,
        }
    }

    /// The format of an HTTP `Content-Type` (parameters ignored, case-insensitive), if
    /// supported; `+json` and `+cbor` structured suffixes count.
    pub fn from_media_type(content_type: &str) -> Option<ContentFormat> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let essence = essence.to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Some(ContentFormat::Json)
        } else if essence == "application/cbor" || essence.ends_with("+cbor") {
            Some(ContentFormat::Cbor)
        } else {
            None
        }
    }
}

/// Size limits applied while parsing, all inclusive. `[telemetry]`-style config can
/// deserialize it; missing keys take the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest payload in bytes (default 1 MiB). Transports usually cut earlier.
    pub max_payload_bytes: usize,
    /// Most records in one message (default 10 000).
    pub max_records: usize,
    /// Most series in one record (default 256).
    pub max_series: usize,
    /// Longest field name in bytes (default 128).
    pub max_key_len: usize,
    /// Longest string value in bytes (default 4096).
    pub max_text_len: usize,
    /// Longest nonce in bytes (default 128).
    pub max_nonce_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_records: 10_000,
            max_series: 256,
            max_key_len: 128,
            max_text_len: 4096,
            max_nonce_len: 128,
        }
    }
}

/// Why a payload was refused. Nothing of a refused message is stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The payload is larger than [`Limits::max_payload_bytes`] (HTTP 413, CoAP 4.13).
    #[error("payload of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The payload's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not well-formed JSON; serde_json's message carries the line and column.
    #[error("malformed JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Not well-formed CBOR.
    #[error("malformed CBOR{}: {detail}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Cbor {
        /// Byte offset of the problem, when known.
        offset: Option<usize>,
        /// What is wrong.
        detail: String,
    },
    /// Well-formed, but not a valid telemetry message.
    #[error("{}", invalid_display(*index, field.as_deref(), reason))]
    Invalid {
        /// The record's index in the message (its array or `records`; 0 for a single
        /// record); `None` for problems of the message as a whole.
        index: Option<usize>,
        /// The offending field, when one is to blame (cut to 64 bytes for long names).
        field: Option<String>,
        /// What is wrong.
        reason: Reason,
    },
}

fn invalid_display(index: Option<usize>, field: Option<&str>, reason: &Reason) -> String {
    match (index, field) {
        (Some(i), Some(f)) => format!("record {i}, field {f:?}: {reason}"),
        (Some(i), None) => format!("record {i}: {reason}"),
        (None, Some(f)) => format!("field {f:?}: {reason}"),
        (None, None) => reason.to_string(),
    }
}

/// Parses and validates a telemetry payload. Records without a time get `now_ms` and
/// [`TimeSource::Received`]; give them distinct times with [`ReceiveClock::assign`] (or
/// [`Message::assign_receive_times`]) before storing.
pub fn parse(
    payload: &[u8],
    format: ContentFormat,
    limits: &Limits,
    now_ms: i64,
) -> Result<Message, IngestError> {
    match format {
        ContentFormat::Json => parse_json(payload, limits, now_ms),
        ContentFormat::Cbor => parse_cbor(payload, limits, now_ms),
    }
}

/// [`parse`] for JSON.
pub fn parse_json(payload: &[u8], limits: &Limits, now_ms: i64) -> Result<Message, IngestError> {
    check_size(payload, limits)?;
    record::parse_json(payload, limits, now_ms)
}

/// [`parse`] for CBOR.
pub fn parse_cbor(payload: &[u8], limits: &Limits, now_ms: i64) -> Result<Message, IngestError> {
    check_size(payload, limits)?;
    record::parse_cbor(payload, limits, now_ms)
}

fn check_size(payload: &[u8], limits: &Limits) -> Result<(), IngestError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(IngestError::TooLarge {
            len: payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    Ok(())
}
