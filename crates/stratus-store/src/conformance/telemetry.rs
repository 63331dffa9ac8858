//! The telemetry checks: value types, range queries and paging, batch atomicity, duplicates,
//! aggregation against a naive computation, latest values and retention.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::{expect_err, new_device};
use crate::telemetry::{
    bucket_start, Accumulator, Agg, AggregateQuery, LatestValue, Point, PointQuery, Retention,
    RetentionRule, TimedValue, Value, MAX_TS_MS, MINUTE_MS, MIN_TS_MS,
};
use crate::{DeviceStore, Store, StoreError, TelemetryStore};

const BASE: i64 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000; // a whole hour

/// Runs every telemetry check.
pub fn run_telemetry<S: Store>(open: impl Fn() -> S) {
    values_of_every_type_round_trip(&open);
    ranges_limits_and_paging(&open);
    a_batch_with_a_bad_point_stores_nothing(&open);
    duplicates_are_stored_once(&open);
    aggregation_matches_a_naive_computation(&open);
    latest_values_and_keys(&open);
    retention_purges_per_series(&open);
}

fn values_of_every_type_round_trip<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tel-types")).expect("create");
    let values = vec![
        (MIN_TS_MS, Value::Number(-1.5)),
        (-86_400_000, Value::Bool(false)),
        (0, Value::Number(0.0)),
        (1, Value::Text("température 🌡 \"quoted\"".into())),
        (2, Value::Text(String::new())),
        (3, Value::Bool(true)),
        (4, Value::Number(f64::MAX)),
        (5, Value::Number(-0.25)),
        (6, Value::Number(42.0)),
        (MAX_TS_MS, Value::Number(f64::MIN_POSITIVE)),
    ];
    let n = s
        .append_telemetry(
            values
                .iter()
                .map(|(ts, v)| Point::new("tel-types", "mixed", *ts, v.clone()))
                .collect(),
        )
        .expect("append");
    assert_eq!(n, values.len() as u64);
    drop(s);
    let s = open();
    let page = s
        .points(&PointQuery::new("tel-types", "mixed", i64::MIN, i64::MAX).limit(100))
        .expect("points");
    let expected: Vec<TimedValue> = values
        .into_iter()
        .map(|(ts_ms, value)| TimedValue { ts_ms, value })
        .collect();
    assert_eq!(
        page.points, expected,
        "numbers, booleans and strings keep their type"
    );
    assert_eq!(page.next_after_ts, None);
    s.delete_device("tel-types").expect("delete");
}

fn ranges_limits_and_paging<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tel-range")).expect("create");
    // Appended newest first, to show that order of arrival does not matter.
    let points: Vec<Point> = (0..25i64)
        .rev()
        .map(|i| Point::new("tel-range", "n", BASE + i * 1000, Value::Number(i as f64)))
        .collect();
    s.append_telemetry(points).expect("append");
    let ts = |page: &[TimedValue]| {
        page.iter()
            .map(|p| (p.ts_ms - BASE) / 1000)
            .collect::<Vec<_>>()
    };
    let q = PointQuery::new("tel-range", "n", BASE + 2_000, BASE + 20_000).limit(5);
    let mut pages = Vec::new();
    let mut query = q.clone();
    loop {
        let page = s.points(&query).expect("points");
        pages.push(ts(&page.points));
        match page.next_after_ts {
            Some(cursor) => query = q.clone().after(cursor),
            None => break,
        }
        assert!(pages.len() < 10, "paging terminates");
    }
    assert_eq!(
        pages,
        vec![
            vec![2, 3, 4, 5, 6],
            vec![7, 8, 9, 10, 11],
            vec![12, 13, 14, 15, 16],
            vec![17, 18, 19]
        ],
        "from inclusive, to exclusive, pages of 5 in time order"
    );
    let q = PointQuery::new("tel-range", "n", BASE, BASE + 25_000)
        .descending()
        .limit(10);
    let first = s.points(&q).expect("points");
    assert_eq!(
        ts(&first.points),
        (15..25).rev().collect::<Vec<_>>(),
        "newest first"
    );
    let second = s
        .points(&q.clone().after(first.next_after_ts.expect("more")))
        .expect("points");
    assert_eq!(ts(&second.points), (5..15).rev().collect::<Vec<_>>());
    let third = s
        .points(&q.clone().after(second.next_after_ts.expect("more")))
        .expect("points");
    assert_eq!(ts(&third.points), (0..5).rev().collect::<Vec<_>>());
    assert_eq!(third.next_after_ts, None);
    let exact = s
        .points(&PointQuery::new("tel-range", "n", BASE, BASE + 25_000).limit(25))
        .expect("points");
    assert_eq!(
        (exact.points.len(), exact.next_after_ts),
        (25, None),
        "a page that holds the rest has no cursor"
    );
    assert!(
        exact.points.windows(2).all(|w| w[0].ts_ms < w[1].ts_ms),
        "ascending by default"
    );
    for empty in [
        PointQuery::new("tel-range", "n", BASE, BASE + 25_000).limit(0),
        PointQuery::new("tel-range", "n", BASE + 5_000, BASE + 5_000),
        PointQuery::new("tel-range", "n", BASE + 9_000, BASE + 1_000),
        PointQuery::new("tel-range", "other-key", i64::MIN, i64::MAX),
        PointQuery::new("tel-unknown", "n", i64::MIN, i64::MAX),
    ] {
        assert!(
            s.points(&empty).expect("points").points.is_empty(),
            "nothing for {empty:?}"
        );
    }
    s.delete_device("tel-range").expect("delete");
}

fn a_batch_with_a_bad_point_stores_nothing<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tel-atomic")).expect("create");
    let good = |i: i64| Point::new("tel-atomic", "temp", BASE + i, Value::Number(i as f64));
    let bad_points = [
        (
            Point::new("tel-atomic", "k".repeat(256), BASE, Value::Number(1.0)),
            "a key over 255 bytes",
        ),
        (
            Point::new("tel-atomic", "", BASE, Value::Number(1.0)),
            "an empty key",
        ),
        (
            Point::new("tel-atomic", "bad\nkey", BASE, Value::Number(1.0)),
            "a control character in a key",
        ),
        (
            Point::new("tel-atomic", "nan", BASE, Value::Number(f64::NAN)),
            "NaN",
        ),
        (
            Point::new("tel-atomic", "inf", BASE, Value::Number(f64::INFINITY)),
            "infinity",
        ),
        (
            Point::new("tel-atomic", "late", MAX_TS_MS + 1, Value::Number(1.0)),
            "a time after 9999",
        ),
        (
            Point::new(
                "tel-atomic",
                "long",
                BASE,
                Value::Text("x".repeat(crate::telemetry::MAX_TEXT_LEN + 1)),
            ),
            "a text over the limit",
        ),
        (
            Point::new("bad id", "temp", BASE, Value::Number(1.0)),
            "an invalid device id",
        ),
    ];
    for (bad, what) in bad_points {
        expect_err(
            s.append_telemetry(vec![good(1), good(2), bad, good(3)]),
            what,
            |e| matches!(e, StoreError::Invalid(_)),
        );
    }
    expect_err(
        s.append_telemetry(vec![
            good(1),
            good(2),
            Point::new("tel-ghost", "temp", BASE, Value::Number(1.0)),
        ]),
        "an unknown device",
        |e| matches!(e, StoreError::NotFound { kind: "device", id } if id == "tel-ghost"),
    );
    drop(s);
    let s = open();
    assert!(
        s.keys("tel-atomic").expect("keys").is_empty(),
        "a failed batch leaves nothing, not even a series"
    );
    assert!(s.keys("tel-ghost").expect("keys").is_empty());
    assert_eq!(s.append_telemetry(Vec::new()).expect("empty batch"), 0);
    assert_eq!(
        s.append_telemetry(vec![good(1), good(2), good(3)])
            .expect("the same points, valid alone"),
        3
    );
    s.delete_device("tel-atomic").expect("delete");
}

fn duplicates_are_stored_once<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tel-dup")).expect("create");
    let p = |ts: i64, x: f64| Point::new("tel-dup", "v", BASE + ts, Value::Number(x));
    assert_eq!(
        s.append_telemetry(vec![p(0, 1.0), p(1_000, 2.0), p(1_000, 99.0)])
            .expect("append"),
        2,
        "a repeated time within a batch counts once"
    );
    assert_eq!(
        s.append_telemetry(vec![p(0, 50.0), p(2_000, 3.0)])
            .expect("append"),
        1,
        "a redelivered point is skipped"
    );
    let values: Vec<Value> = s
        .points(&PointQuery::new("tel-dup", "v", BASE, BASE + MINUTE_MS))
        .expect("points")
        .points
        .into_iter()
        .map(|p| p.value)
        .collect();
    assert_eq!(
        values,
        vec![Value::Number(1.0), Value::Number(2.0), Value::Number(3.0)],
        "the first write wins"
    );
    let sum = s
        .aggregate(&AggregateQuery {
            device_id: "tel-dup".into(),
            key: "v".into(),
            from_ms: BASE,
            to_ms: BASE + MINUTE_MS,
            interval_ms: MINUTE_MS,
            agg: Agg::Sum,
        })
        .expect("aggregate");
    assert_eq!(
        (sum[0].value, sum[0].count),
        (6.0, 3),
        "skipped duplicates are not aggregated either"
    );
    s.delete_device("tel-dup").expect("delete");
}

/// One aggregation to compare with a naive computation.
#[derive(Debug, Clone)]
pub struct AggregationCase {
    /// Points of the series `(device, "v")`, in the order they are appended (in two batches).
    pub points: Vec<(i64, Value)>,
    /// Range start, inclusive.
    pub from_ms: i64,
    /// Range end, exclusive.
    pub to_ms: i64,
    /// Bucket width (> 0).
    pub interval_ms: i64,
}

fn naive(case: &AggregationCase) -> BTreeMap<i64, Accumulator> {
    let mut seen = HashSet::new();
    let mut buckets = BTreeMap::new();
    for (ts, value) in &case.points {
        if !seen.insert(*ts) {
            continue; // first write wins
        }
        let Value::Number(x) = value else { continue };
        if *ts < case.from_ms || *ts >= case.to_ms {
            continue;
        }
        buckets
            .entry(bucket_start(*ts, case.interval_ms))
            .and_modify(|a: &mut Accumulator| a.add(*x))
            .or_insert_with(|| Accumulator::of(*x));
    }
    buckets
}

/// Registers `device_id` (which must be new), appends the case's points in two batches and
/// checks every aggregation function against a naive computation (sums within a relative
/// 1e-9, everything else exactly).
pub fn check_aggregation<S: DeviceStore + TelemetryStore>(
    store: &S,
    device_id: &str,
    case: &AggregationCase,
) {
    store
        .create_device(new_device(device_id))
        .expect("create device");
    let points: Vec<Point> = case
        .points
        .iter()
        .map(|(ts, v)| Point::new(device_id, "v", *ts, v.clone()))
        .collect();
    let (first, second) = points.split_at(points.len() / 2);
    store.append_telemetry(first.to_vec()).expect("append");
    store.append_telemetry(second.to_vec()).expect("append");
    let expected = naive(case);
    let magnitude: f64 = case
        .points
        .iter()
        .map(|(_, v)| match v {
            Value::Number(x) => x.abs(),
            _ => 0.0,
        })
        .sum::<f64>()
        .max(1.0);
    for agg in Agg::ALL {
        let got = store
            .aggregate(&AggregateQuery {
                device_id: device_id.into(),
                key: "v".into(),
                from_ms: case.from_ms,
                to_ms: case.to_ms,
                interval_ms: case.interval_ms,
                agg,
            })
            .expect("aggregate");
        let starts: Vec<i64> = got.iter().map(|b| b.start_ms).collect();
        let want: Vec<i64> = expected.keys().copied().collect();
        assert_eq!(starts, want, "{agg} bucket starts for {case:?}");
        for (bucket, (start, acc)) in got.iter().zip(&expected) {
            assert_eq!(
                bucket.count, acc.count,
                "{agg} count of bucket {start} for {case:?}"
            );
            let want = acc.value(agg);
            let ok = match agg {
                Agg::Avg | Agg::Sum => (bucket.value - want).abs() <= 1e-9 * magnitude,
                Agg::Min | Agg::Max | Agg::Count => bucket.value == want,
            };
            assert!(
                ok,
                "{agg} of bucket {start}: got {}, want {want}, for {case:?}",
                bucket.value
            );
        }
    }
}

/// A small deterministic generator, so the suite needs no dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> i64 {
        (self.next() % n.max(1)) as i64
    }
}

fn aggregation_matches_a_naive_computation<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    let mut rng = Lcg(7);
    let intervals = [
        1,
        1_000,
        59_999,
        MINUTE_MS,
        90_000,
        2 * MINUTE_MS,
        15 * MINUTE_MS,
        3_600_000,
        86_400_000,
    ];
    for (i, interval_ms) in intervals.into_iter().cycle().take(27).enumerate() {
        let origin = [-1_800_000, BASE, BASE][i % 3];
        let span = 1 + rng.below(4 * 3_600_000) as u64;
        let points: Vec<(i64, Value)> = (0..rng.below(400))
            .map(|_| {
                let ts = origin + rng.below(span);
                let value = match rng.below(10) {
                    0 => Value::Bool(rng.below(2) == 1),
                    1 => Value::Text("x".into()),
                    _ => Value::Number((rng.below(2_000_001) - 1_000_000) as f64 / 8.0),
                };
                (ts, value)
            })
            .collect();
        let from_ms = origin + rng.below(span / 3 + 1) - 1;
        let to_ms = if i % 4 == 1 {
            i64::MAX
        } else {
            from_ms + rng.below(span) + 1
        };
        let case = AggregationCase {
            points,
            from_ms,
            to_ms,
            interval_ms,
        };
        check_aggregation(&s, &format!("tel-agg-{i}"), &case);
    }
    expect_err(
        s.aggregate(&AggregateQuery {
            device_id: "tel-agg-0".into(),
            key: "v".into(),
            from_ms: 0,
            to_ms: 1,
            interval_ms: 0,
            agg: Agg::Avg,
        }),
        "a zero interval",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    assert!(s
        .aggregate(&AggregateQuery {
            device_id: "tel-agg-0".into(),
            key: "none".into(),
            from_ms: i64::MIN,
            to_ms: i64::MAX,
            interval_ms: MINUTE_MS,
            agg: Agg::Count,
        })
        .expect("aggregate")
        .is_empty());
    for i in 0..27 {
        s.delete_device(&format!("tel-agg-{i}")).expect("delete");
    }
}

fn latest_values_and_keys<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    s.create_device(new_device("tel-latest")).expect("create");
    s.create_device(new_device("tel-quiet")).expect("create");
    let p = |key: &str, ts: i64, v: Value| Point::new("tel-latest", key, BASE + ts, v);
    s.append_telemetry(vec![
        p("temp", 3_000, Value::Number(21.5)),
        p("temp", 1_000, Value::Number(20.0)),
        p("status", 2_000, Value::Text("ok".into())),
        p("on", 500, Value::Bool(true)),
    ])
    .expect("append");
    // An older point arriving later (a device catching up) does not become the latest.
    s.append_telemetry(vec![
        p("temp", 2_000, Value::Number(99.0)),
        p("on", 600, Value::Bool(false)),
    ])
    .expect("append");
    drop(s);
    let s = open();
    assert_eq!(
        s.latest("tel-latest").expect("latest"),
        vec![
            LatestValue {
                key: "on".into(),
                ts_ms: BASE + 600,
                value: Value::Bool(false)
            },
            LatestValue {
                key: "status".into(),
                ts_ms: BASE + 2_000,
                value: Value::Text("ok".into())
            },
            LatestValue {
                key: "temp".into(),
                ts_ms: BASE + 3_000,
                value: Value::Number(21.5)
            },
        ],
        "the latest measurement of each key, by key"
    );
    assert_eq!(
        s.keys("tel-latest").expect("keys"),
        ["on", "status", "temp"]
    );
    assert!(s.latest("tel-quiet").expect("latest").is_empty());
    assert!(s.keys("tel-quiet").expect("keys").is_empty());
    assert!(s.latest("tel-unknown").expect("latest").is_empty());
    s.delete_device("tel-latest").expect("delete");
    s.delete_device("tel-quiet").expect("delete");
}

fn count_points<S: Store>(s: &S, device: &str, key: &str) -> usize {
    s.points(&PointQuery::new(device, key, i64::MIN, i64::MAX).limit(10_000))
        .expect("points")
        .points
        .len()
}

fn retention_purges_per_series<S: Store>(open: &impl Fn() -> S) {
    let s = open();
    for d in ["ret-a", "ret-b", "ret-c"] {
        s.create_device(new_device(d)).expect("create");
    }
    // Ten minutes of one point per minute (plus one mid-minute) for each series.
    let mut points = Vec::new();
    for d in ["ret-a", "ret-b", "ret-c"] {
        for key in ["k1", "k2"] {
            for m in 0..10 {
                points.push(Point::new(
                    d,
                    key,
                    BASE + m * MINUTE_MS,
                    Value::Number(m as f64),
                ));
            }
            points.push(Point::new(
                d,
                key,
                BASE + 4 * MINUTE_MS + 30_000,
                Value::Bool(true),
            ));
        }
    }
    s.append_telemetry(points).expect("append");
    let now = BASE + 10 * MINUTE_MS;
    assert_eq!(
        s.purge_telemetry(now).expect("purge"),
        0,
        "no rule: keep forever"
    );
    s.set_retention(None, None, Retention::For(Duration::from_secs(5 * 60)))
        .expect("default");
    s.set_retention(Some("ret-a"), Some("k2"), Retention::Forever)
        .expect("series rule");
    s.set_retention(
        Some("ret-b"),
        None,
        Retention::For(Duration::from_secs(2 * 60)),
    )
    .expect("device rule");
    s.set_retention(
        None,
        Some("k2"),
        Retention::For(Duration::from_secs(8 * 60)),
    )
    .expect("key rule");
    expect_err(
        s.set_retention(Some("bad id"), None, Retention::Forever),
        "a bad device id",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    let rules = s.retention_rules().expect("rules");
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert!(rules.contains(&RetentionRule {
        device_id: Some("ret-a".into()),
        key: Some("k2".into()),
        retention: Retention::Forever
    }));
    drop(s);
    let s = open();
    // ret-a/k1: default 5 min → minutes 5..9 stay (5 points, the mid-minute bool went);
    // ret-a/k2: forever → 11; ret-b/*: 2 min → minutes 8, 9 (2 each);
    // ret-c/k1: default → 5; ret-c/k2: key rule 8 min → minutes 2..9 and the bool (9).
    let purged = s.purge_telemetry(now).expect("purge");
    let remaining = [
        ("ret-a", "k1", 5),
        ("ret-a", "k2", 11),
        ("ret-b", "k1", 2),
        ("ret-b", "k2", 2),
        ("ret-c", "k1", 5),
        ("ret-c", "k2", 9),
    ];
    for (d, k, n) in remaining {
        assert_eq!(count_points(&s, d, k), n, "{d}/{k} after the purge");
    }
    assert_eq!(
        purged,
        6 * 11 - remaining.iter().map(|r| r.2 as u64).sum::<u64>()
    );
    // The rollups went with the points: whole-minute aggregation agrees with the raw points.
    let buckets = s
        .aggregate(&AggregateQuery {
            device_id: "ret-c".into(),
            key: "k2".into(),
            from_ms: BASE - 3_600_000,
            to_ms: BASE + 3_600_000,
            interval_ms: MINUTE_MS,
            agg: Agg::Count,
        })
        .expect("aggregate");
    assert_eq!(
        buckets
            .iter()
            .map(|b| (b.start_ms - BASE) / MINUTE_MS)
            .collect::<Vec<_>>(),
        (2..10).collect::<Vec<_>>()
    );
    // Back to the default for k2. A cutoff in mid-minute (5.5 minutes ago) keeps the whole
    // minute that holds it, so minute 5 stays.
    s.clear_retention(Some("ret-a"), Some("k2")).expect("clear");
    s.clear_retention(None, Some("k2")).expect("clear");
    assert_eq!(
        s.purge_telemetry(now + 30_000).expect("purge"),
        6 + 4,
        "ret-a/k2 loses minutes 0..4 and the bool, ret-c/k2 minutes 2..4 and the bool"
    );
    for (d, k, n) in [("ret-a", "k2", 5), ("ret-c", "k2", 5), ("ret-a", "k1", 5)] {
        assert_eq!(count_points(&s, d, k), n, "{d}/{k} after the second purge");
    }
    s.set_retention(None, None, Retention::For(Duration::ZERO))
        .expect("default");
    s.purge_telemetry(now + 60_000).expect("purge");
    assert!(
        s.keys("ret-a").expect("keys").is_empty(),
        "a series with no points left is gone"
    );
    for d in ["ret-a", "ret-b", "ret-c"] {
        s.delete_device(d).expect("delete");
    }
    s.clear_retention(None, None).expect("clear");
    let left: Vec<RetentionRule> = s.retention_rules().expect("rules");
    assert!(
        left.is_empty(),
        "the device rules went with the devices: {left:?}"
    );
}

/// The series quota: `open` returns a store whose devices may have at most 3 series. A job
/// that would create a fourth fails with [`StoreError::QuotaExceeded`] and stores nothing of
/// it (not even its points of existing series); points of existing series still go in, and
/// another device has its own quota. Through the group committer too (see `run_jobs`).
pub fn run_series_quota<S: Store>(open: impl Fn() -> S) {
    use crate::Write;
    let s = open();
    for d in ["quota-a", "quota-b"] {
        s.create_device(new_device(d)).expect("create");
    }
    let p = |d: &str, k: &str, ts: i64| Point::new(d, k, BASE + ts, Value::Number(1.0));
    s.append_telemetry(vec![
        p("quota-a", "k1", 0),
        p("quota-a", "k2", 0),
        p("quota-a", "k3", 0),
    ])
    .expect("three series fit");
    let e = s
        .append_telemetry(vec![p("quota-a", "k1", 1), p("quota-a", "k4", 1)])
        .expect_err("a fourth series");
    assert!(matches!(e, StoreError::QuotaExceeded(_)), "{e:?}");
    let points = |d: &str, k: &str| {
        s.points(&PointQuery::new(d, k, BASE, BASE + 10))
            .expect("query")
            .points
            .len()
    };
    assert_eq!(points("quota-a", "k1"), 1, "the refused job stored nothing");
    assert_eq!(points("quota-a", "k4"), 0);
    s.append_telemetry(vec![p("quota-a", "k2", 2)])
        .expect("existing series still take points");
    s.append_telemetry(vec![p("quota-b", "k1", 0), p("quota-b", "k9", 0)])
        .expect("another device has its own quota");
    // As a job among others in one group commit: only that job fails.
    let results = s.commit_jobs(&[
        vec![Write::AppendTelemetry(vec![p("quota-a", "k5", 3)])],
        vec![Write::AppendTelemetry(vec![p("quota-b", "k1", 3)])],
    ]);
    let results = results.expect("the commit");
    assert!(
        matches!(results[0], Err(StoreError::QuotaExceeded(_))),
        "{:?}",
        results[0]
    );
    assert!(results[1].is_ok(), "{:?}", results[1]);
}
