//! Telemetry: points of `(device, key)` series, range queries with a cursor, time-bucket
//! aggregation, latest values and per-series retention, behind the [`TelemetryStore`] trait.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value as Json;

use crate::write::{Write, WriteBackend};
use crate::{check_id, check_text, StoreError};

/// Longest accepted series key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Longest accepted text value, in bytes.
pub const MAX_TEXT_LEN: usize = 65_536;

/// Earliest accepted point time: 0000-01-01T00:00:00Z (the RFC 3339 range).
pub const MIN_TS_MS: i64 = -62_167_219_200_000;

/// Latest accepted point time: 9999-12-31T23:59:59.999Z.
pub const MAX_TS_MS: i64 = 253_402_300_799_999;

/// One minute in milliseconds, the granularity of rollups and retention.
pub const MINUTE_MS: i64 = 60_000;

/// A measured value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A number (finite). Only numbers are aggregated.
    Number(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Text(String),
}

impl Value {
    /// The value as JSON.
    pub fn to_json(&self) -> Json {
        match self {
            Value::Number(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
            Value::Bool(b) => Json::Bool(*b),
            Value::Text(s) => Json::String(s.clone()),
        }
    }

    /// A JSON number, boolean or string as a value; other JSON has none.
    pub fn from_json(json: &Json) -> Option<Value> {
        match json {
            Json::Number(n) => n.as_f64().map(Value::Number),
            Json::Bool(b) => Some(Value::Bool(*b)),
            Json::String(s) => Some(Value::Text(s.clone())),
            _ => None,
        }
    }
}

/// One measurement of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The device it belongs to (must be registered).
    pub device_id: String,
    /// The series key (the record's field name), 1 to 255 bytes, no control characters.
    pub key: String,
    /// Measurement time, Unix epoch milliseconds, within years 0000–9999.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
}

impl Point {
    /// A point.
    pub fn new(
        device_id: impl Into<String>,
        key: impl Into<String>,
        ts_ms: i64,
        value: Value,
    ) -> Point {
        Point {
            device_id: device_id.into(),
            key: key.into(),
            ts_ms,
            value,
        }
    }

    /// Checks the rules on ids, keys, times and values.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("device", &self.device_id)?;
        check_key(&self.key)?;
        if !(MIN_TS_MS..=MAX_TS_MS).contains(&self.ts_ms) {
            return Err(StoreError::Invalid(format!(
                "time {} ms is outside years 0000-9999",
                self.ts_ms
            )));
        }
        match &self.value {
            Value::Number(n) if !n.is_finite() => Err(StoreError::Invalid(format!(
                "{}: numbers must be finite (got {n})",
                self.key
            ))),
            Value::Text(s) if s.len() > MAX_TEXT_LEN => Err(StoreError::Invalid(format!(
                "{}: text values are at most {MAX_TEXT_LEN} bytes (got {})",
                self.key,
                s.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// Checks a series key.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    check_text("telemetry key", key, MAX_KEY_LEN)
}

/// A value at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct TimedValue {
    /// Measurement time, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// The value.
    pub value: Value,
}

/// The latest value of one key.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestValue {
    /// Series key.
    pub key: String,
    /// Measurement time of the latest point, Unix epoch milliseconds.
    pub ts_ms: i64,
    /// Its value.
    pub value: Value,
}

/// Direction of a range query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    #[default]
    Ascending,
    /// Newest first.
    Descending,
}

/// Raw points of one series in `[from_ms, to_ms)`.
///
/// Paging: a page holds at most `limit` points; when more follow, [`PointPage::next_after_ts`]
/// is the time of the page's last point, and the next page is the same query with
/// `after_ts` set to it (points strictly after it in the query's order). Times are unique within
/// a series, so the cursor is exact and stable under concurrent appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointQuery {
    /// Device id.
    pub device_id: String,
    /// Series key.
    pub key: String,
    /// Start, inclusive, Unix epoch milliseconds.
    pub from_ms: i64,
    /// End, exclusive, Unix epoch milliseconds.
    pub to_ms: i64,
    /// Oldest or newest first.
    pub order: Order,
    /// At most this many points.
    pub limit: usize,
    /// Continue after this time (in the query's order); from a previous page's
    /// [`PointPage::next_after_ts`].
    pub after_ts: Option<i64>,
}

impl PointQuery {
    /// Oldest first, at most 1,000 points, from the start of the range.
    pub fn new(
        device_id: impl Into<String>,
        key: impl Into<String>,
        from_ms: i64,
        to_ms: i64,
    ) -> Self {
        PointQuery {
            device_id: device_id.into(),
            key: key.into(),
            from_ms,
            to_ms,
            order: Order::Ascending,
            limit: 1000,
            after_ts: None,
        }
    }

    /// The same query with another limit.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The same query, newest first.
    pub fn descending(mut self) -> Self {
        self.order = Order::Descending;
        self
    }

    /// The same query, continuing after `ts`.
    pub fn after(mut self, ts: i64) -> Self {
        self.after_ts = Some(ts);
        self
    }

    /// The `[lo, hi)` time range left to scan once the cursor is applied.
    pub fn effective_range(&self) -> (i64, i64) {
        let (mut lo, mut hi) = (self.from_ms, self.to_ms);
        if let Some(after) = self.after_ts {
            match self.order {
                Order::Ascending => lo = lo.max(after.saturating_add(1)),
                Order::Descending => hi = hi.min(after),
            }
        }
        (lo, hi)
    }
}

/// A page of points.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PointPage {
    /// The points, in the query's order.
    pub points: Vec<TimedValue>,
    /// When more points follow: the cursor for the next page (see [`PointQuery`]).
    pub next_after_ts: Option<i64>,
}

/// An aggregation function over the numeric points of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agg {
    /// Mean.
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Sum.
    Sum,
    /// Number of numeric points.
    Count,
}

impl Agg {
    /// Every function.
    pub const ALL: [Agg; 5] = [Agg::Avg, Agg::Min, Agg::Max, Agg::Sum, Agg::Count];

    /// Its name in the HTTP API: `avg`, `min`, `max`, `sum`, `count`.
    pub fn as_str(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Sum => "sum",
            Agg::Count => "count",
        }
    }
}

impl fmt::Display for Agg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Agg {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Agg, StoreError> {
        Agg::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "aggregation {:?} is not one of avg, min, max, sum, count",
                    crate::truncate(s, 40)
                ))
            })
    }
}

/// Numeric points of one series in `[from_ms, to_ms)`, aggregated per `interval_ms` bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateQuery {
    /// Device id.
    pub device_id: String,
    /// Series key.
    pub key: String,
    /// Start, inclusive, Unix epoch milliseconds.
    pub from_ms: i64,
    /// End, exclusive, Unix epoch milliseconds.
    pub to_ms: i64,
    /// Bucket width in milliseconds (> 0); buckets are aligned to the Unix epoch.
    pub interval_ms: i64,
    /// The function.
    pub agg: Agg,
}

impl AggregateQuery {
    /// Checks the interval.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.interval_ms <= 0 {
            return Err(StoreError::Invalid(format!(
                "the aggregation interval must be positive (got {} ms)",
                self.interval_ms
            )));
        }
        Ok(())
    }
}

/// One aggregated bucket (buckets without numeric points are left out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Bucket start, Unix epoch milliseconds (a multiple of the interval).
    pub start_ms: i64,
    /// The aggregate (for `count`, the count).
    pub value: f64,
    /// How many numeric points the bucket holds.
    pub count: u64,
}

/// The start of the epoch-aligned bucket of width `interval_ms` that holds `ts_ms`.
/// `interval_ms` must be positive; `ts_ms` within the accepted point range.
pub fn bucket_start(ts_ms: i64, interval_ms: i64) -> i64 {
    ts_ms.div_euclid(interval_ms).saturating_mul(interval_ms)
}

/// A running aggregate of numbers, mergeable (used to fold raw points and rollups).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulator {
    /// How many numbers.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// Their minimum.
    pub min: f64,
    /// Their maximum.
    pub max: f64,
}

impl Accumulator {
    /// One number.
    pub fn of(x: f64) -> Accumulator {
        Accumulator {
            count: 1,
            sum: x,
            min: x,
            max: x,
        }
    }

    /// Adds one number.
    pub fn add(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Adds another accumulator's numbers.
    pub fn merge(&mut self, other: &Accumulator) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The aggregate.
    pub fn value(&self, agg: Agg) -> f64 {
        match agg {
            Agg::Avg => self.sum / self.count.max(1) as f64,
            Agg::Min => self.min,
            Agg::Max => self.max,
            Agg::Sum => self.sum,
            Agg::Count => self.count as f64,
        }
    }
}

/// How long a series' points are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Never purged.
    Forever,
    /// Purged once older than this.
    For(Duration),
}

/// A retention rule and its scope (`None` means any device or any key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    /// The device it applies to, or any.
    pub device_id: Option<String>,
    /// The key it applies to, or any.
    pub key: Option<String>,
    /// The retention.
    pub retention: Retention,
}

/// The rule that governs `(device_id, key)`: the most specific of `(device, key)`,
/// `(device, any)`, `(any, key)`, `(any, any)`. `None` (no rule) means keep forever.
pub fn resolve_retention<'a>(
    rules: &'a [RetentionRule],
    device_id: &str,
    key: &str,
) -> Option<&'a Retention> {
    let find = |d: Option<&str>, k: Option<&str>| {
        rules
            .iter()
            .find(|r| r.device_id.as_deref() == d && r.key.as_deref() == k)
            .map(|r| &r.retention)
    };
    find(Some(device_id), Some(key))
        .or_else(|| find(Some(device_id), None))
        .or_else(|| find(None, Some(key)))
        .or_else(|| find(None, None))
}

/// The purge cutoff for a series under `retention` at `now_ms`: points before it go. Aligned
/// down to a whole minute so whole rollup minutes go with their points; `None` keeps all.
pub fn purge_cutoff(retention: Option<&Retention>, now_ms: i64) -> Option<i64> {
    match retention {
        None | Some(Retention::Forever) => None,
        Some(Retention::For(keep)) => {
            let cutoff = now_ms.saturating_sub(crate::write::duration_ms(*keep));
            Some(bucket_start(
                cutoff.clamp(MIN_TS_MS, MAX_TS_MS + 1),
                MINUTE_MS,
            ))
        }
    }
}

pub(crate) fn check_scope(device_id: Option<&str>, key: Option<&str>) -> Result<(), StoreError> {
    if let Some(d) = device_id {
        check_id("device", d)?;
    }
    if let Some(k) = key {
        check_key(k)?;
    }
    Ok(())
}

/// Telemetry.
///
/// Reads are required methods; writes are provided on top of [`WriteBackend::commit_jobs`].
/// Reads of an unknown device or key return nothing rather than an error.
pub trait TelemetryStore: WriteBackend {
    /// Raw points, paged (see [`PointQuery`]).
    fn points(&self, query: &PointQuery) -> Result<PointPage, StoreError>;

    /// Aggregated buckets in time order.
    fn aggregate(&self, query: &AggregateQuery) -> Result<Vec<Bucket>, StoreError>;

    /// The latest point of every key of a device, by key.
    fn latest(&self, device_id: &str) -> Result<Vec<LatestValue>, StoreError>;

    /// The keys a device has points for, sorted.
    fn keys(&self, device_id: &str) -> Result<Vec<String>, StoreError>;

    /// Every retention rule.
    fn retention_rules(&self) -> Result<Vec<RetentionRule>, StoreError>;

    /// Stores a batch atomically: all of it, or (on any invalid point or unknown device)
    /// none of it. Returns how many points were new.
    fn append_telemetry(&self, points: Vec<Point>) -> Result<u64, StoreError> {
        self.write_one(Write::AppendTelemetry(points))?.into_count()
    }

    /// Sets the retention of a scope (`None` = any device / any key).
    fn set_retention(
        &self,
        device_id: Option<&str>,
        key: Option<&str>,
        retention: Retention,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetRetention {
            device_id: device_id.map(Into::into),
            key: key.map(Into::into),
            retention: Some(retention),
        })?
        .into_done()
    }

    /// Removes the rule of a scope, so the next broader one applies.
    fn clear_retention(
        &self,
        device_id: Option<&str>,
        key: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetRetention {
            device_id: device_id.map(Into::into),
            key: key.map(Into::into),
            retention: None,
        })?
        .into_done()
    }

    /// Deletes the points that expired by `now_ms` (see [`purge_cutoff`]); returns how many.
    fn purge_telemetry(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PurgeTelemetry { now_ms })?
            .into_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_aligned_to_the_epoch_also_before_it() {
        assert_eq!(bucket_start(0, 60_000), 0);
        assert_eq!(bucket_start(59_999, 60_000), 0);
        assert_eq!(bucket_start(60_000, 60_000), 60_000);
        assert_eq!(bucket_start(-1, 60_000), -60_000);
        assert_eq!(bucket_start(MIN_TS_MS, 7), MIN_TS_MS.div_euclid(7) * 7);
        assert_eq!(bucket_start(MAX_TS_MS, i64::MAX), 0);
    }

    #[test]
    fn the_most_specific_retention_rule_wins() {
        let rule = |d: Option<&str>, k: Option<&str>, secs| RetentionRule {
            device_id: d.map(Into::into),
            key: k.map(Into::into),
            retention: Retention::For(Duration::from_secs(secs)),
        };
        let rules = [
            rule(None, None, 1),
            rule(None, Some("k"), 2),
            rule(Some("d"), None, 3),
            rule(Some("d"), Some("k"), 4),
        ];
        let secs = |d, k| match resolve_retention(&rules, d, k) {
            Some(Retention::For(t)) => t.as_secs(),
            other => panic!("{other:?}"),
        };
        assert_eq!(secs("d", "k"), 4);
        assert_eq!(secs("d", "x"), 3);
        assert_eq!(secs("e", "k"), 2);
        assert_eq!(secs("e", "x"), 1);
        assert_eq!(resolve_retention(&rules[1..2], "e", "x"), None);
    }

    #[test]
    fn purge_cutoffs_fall_on_whole_minutes() {
        let keep = Retention::For(Duration::from_secs(90));
        assert_eq!(purge_cutoff(Some(&keep), 600_000), Some(480_000));
        assert_eq!(purge_cutoff(Some(&Retention::Forever), 600_000), None);
        assert_eq!(purge_cutoff(None, 600_000), None);
        let forever_ago = Retention::For(Duration::MAX);
        assert_eq!(purge_cutoff(Some(&forever_ago), 0), Some(MIN_TS_MS));
    }

    #[test]
    fn agg_names_round_trip() {
        for agg in Agg::ALL {
            assert_eq!(agg.as_str().parse::<Agg>().unwrap(), agg);
        }
        assert!("median".parse::<Agg>().is_err());
    }
}
