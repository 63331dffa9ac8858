//! Request bodies rendered once and then only patched: a batch is a JSON array of records
//! `{"ts":T,"KEY":V}` whose timestamps are fixed-width (13 digits, epoch milliseconds from
//! 2001 to 2286), so each request copies the template and rewrites the digits in place — no
//! JSON encoding while the clock runs.

use bytes::Bytes;

/// Digits of every timestamp in a template.
pub const TS_DIGITS: usize = 13;
/// Smallest timestamp with [`TS_DIGITS`] digits (2001-09-09).
pub const MIN_TS: i64 = 1_000_000_000_000;
/// Largest timestamp with [`TS_DIGITS`] digits (2286-11-20).
pub const MAX_TS: i64 = 9_999_999_999_999;

/// The value of the `j`-th record of a batch: multiples of 0.25 from 0 to 24, exact in
/// binary floating point, so sums and averages over them can be checked for equality.
pub fn value(j: usize) -> f64 {
    (j % 97) as f64 * 0.25
}

/// A JSON array of records `{"ts":T,"KEY":V}` with patchable timestamps.
#[derive(Debug, Clone)]
pub struct BatchTemplate {
    bytes: Vec<u8>,
    ts_at: Vec<usize>,
}

impl BatchTemplate {
    /// `records` records of series `key` (a plain JSON-safe name) with values [`value`]`(j)`.
    pub fn new(key: &str, records: usize) -> BatchTemplate {
        assert_plain_key(key);
        let mut bytes = Vec::with_capacity(records * (key.len() + 30) + 2);
        let mut ts_at = Vec::with_capacity(records);
        bytes.push(b'[');
        for j in 0..records {
            if j > 0 {
                bytes.push(b',');
            }
            bytes.extend_from_slice(b"{\"ts\":");
            ts_at.push(bytes.len());
            bytes.extend_from_slice(&[b'0'; TS_DIGITS]);
            bytes.extend_from_slice(format!(",\"{key}\":{}}}", value(j)).as_bytes());
        }
        bytes.push(b']');
        BatchTemplate { bytes, ts_at }
    }

    /// Records per body.
    pub fn records(&self) -> usize {
        self.ts_at.len()
    }

    /// Body length in bytes (the same for every body).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the template has no records.
    pub fn is_empty(&self) -> bool {
        self.ts_at.is_empty()
    }

    /// The body whose `j`-th record has `ts = first_ts + j × step_ms`. Panics when a
    /// timestamp falls outside [`MIN_TS`]..=[`MAX_TS`] (a bug of the caller).
    pub fn render(&self, first_ts: i64, step_ms: i64) -> Bytes {
        let mut out = self.bytes.clone();
        for (j, &at) in self.ts_at.iter().enumerate() {
            write_ts(&mut out[at..at + TS_DIGITS], first_ts + j as i64 * step_ms);
        }
        Bytes::from(out)
    }
}

/// One record `{"ts":T,"KEY":V}` with a patchable timestamp (single-record requests).
#[derive(Debug, Clone)]
pub struct RecordTemplate {
    bytes: Vec<u8>,
    ts_at: usize,
}

impl RecordTemplate {
    /// A record of series `key` with value `v`.
    pub fn new(key: &str, v: f64) -> RecordTemplate {
        assert_plain_key(key);
        let mut bytes = b"{\"ts\":".to_vec();
        let ts_at = bytes.len();
        bytes.extend_from_slice(&[b'0'; TS_DIGITS]);
        bytes.extend_from_slice(format!(",\"{key}\":{v}}}").as_bytes());
        RecordTemplate { bytes, ts_at }
    }

    /// The body with timestamp `ts`.
    pub fn render(&self, ts: i64) -> Bytes {
        let mut out = self.bytes.clone();
        write_ts(&mut out[self.ts_at..self.ts_at + TS_DIGITS], ts);
        Bytes::from(out)
    }
}

/// Keys are written into JSON unescaped: only plain names are allowed.
fn assert_plain_key(key: &str) {
    assert!(
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "series key {key:?} is not a plain name"
    );
}

/// Writes `ts` as exactly [`TS_DIGITS`] decimal digits.
fn write_ts(dst: &mut [u8], ts: i64) {
    assert!(
        (MIN_TS..=MAX_TS).contains(&ts),
        "timestamp {ts} does not have {TS_DIGITS} digits"
    );
    let mut n = ts as u64;
    for d in dst.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `ms` rounded down to a whole minute.
pub fn floor_minute(ms: i64) -> i64 {
    ms.div_euclid(60_000) * 60_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_json_with_ascending_timestamps() {
        let t = BatchTemplate::new("batch", 3);
        assert_eq!(t.records(), 3);
        let body = t.render(1_700_000_000_000, 10);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"[{"ts":1700000000000,"batch":0},{"ts":1700000000010,"batch":0.25},{"ts":1700000000020,"batch":0.5}]"#
        );
        assert_eq!(body.len(), t.len());
        // Rendering again with other times changes only the digits.
        let again = t.render(1_600_000_000_000, 1);
        assert_eq!(again.len(), body.len());
        let v: serde_json::Value = serde_json::from_slice(&again).unwrap();
        assert_eq!(v[2]["ts"], 1_600_000_000_002i64);
    }

    #[test]
    fn values_repeat_every_97_records_and_are_exact() {
        let t = BatchTemplate::new("k", 200);
        let v: serde_json::Value = serde_json::from_slice(&t.render(MIN_TS, 1)).unwrap();
        for (j, r) in v.as_array().unwrap().iter().enumerate() {
            assert_eq!(r["k"].as_f64().unwrap(), value(j), "record {j}");
        }
        assert_eq!(value(96), 24.0);
        assert_eq!(value(97), 0.0);
        // Sums of quarters stay exact.
        let sum: f64 = (0..10_000).map(value).sum();
        assert_eq!(sum * 4.0, (0..10_000).map(|j| (j % 97) as f64).sum::<f64>());
    }

    #[test]
    fn a_single_record_has_its_own_timestamp() {
        let t = RecordTemplate::new("single", 21.5);
        let body = t.render(1_700_000_000_123);
        assert_eq!(&body[..], br#"{"ts":1700000000123,"single":21.5}"#);
        let v: serde_json::Value = serde_json::from_slice(&t.render(MAX_TS)).unwrap();
        assert_eq!(v["ts"], MAX_TS);
    }

    #[test]
    #[should_panic(expected = "does not have 13 digits")]
    fn timestamps_outside_the_fixed_width_are_refused() {
        RecordTemplate::new("k", 1.0).render(MIN_TS - 1);
    }

    #[test]
    fn minutes_round_down() {
        assert_eq!(floor_minute(1_700_000_059_999), 1_700_000_040_000);
        assert_eq!(floor_minute(120_000), 120_000);
        assert_eq!(floor_minute(-1), -60_000);
    }
}
