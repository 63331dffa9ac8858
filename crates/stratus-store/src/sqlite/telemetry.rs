//! Telemetry in SQLite: interned series, points keyed `(series_id, ts)`, per-minute rollups
//! maintained in the inserting transaction, and retention.

use std::collections::{HashMap, HashSet};

use rusqlite::types::{Null, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};

use super::sql_int;
use crate::telemetry::{
    bucket_start, check_scope, purge_cutoff, resolve_retention, Accumulator, AggregateQuery,
    Bucket, LatestValue, Order, Point, PointPage, PointQuery, Retention, RetentionRule, TimedValue,
    Value, MAX_TS_MS, MINUTE_MS, MIN_TS_MS,
};
use crate::write::{duration_ms, Write};
use crate::StoreError;

fn series_id(conn: &Connection, device_id: &str, key: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM series WHERE device_id = ?1 AND key = ?2")?
        .query_row(params![device_id, key], |r| r.get(0))
        .optional()?)
}

/// The id of `(device_id, key)`, created on first use (the device must exist and have fewer
/// than `max_series` series).
fn intern(
    conn: &Connection,
    device_id: &str,
    key: &str,
    max_series: usize,
) -> Result<i64, StoreError> {
    if let Some(id) = series_id(conn, device_id, key)? {
        return Ok(id);
    }
    if max_series != usize::MAX {
        let held: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM series WHERE device_id = ?1")?
            .query_row(params![device_id], |r| r.get(0))?;
        if usize::try_from(held).unwrap_or(usize::MAX) >= max_series {
            return Err(StoreError::QuotaExceeded(format!(
                "device {device_id:?} has {held} series, the most it may have; {key:?} would be a new one"
            )));
        }
    }
    let known = conn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
        .exists(params![device_id])?;
    if !known {
        return Err(StoreError::NotFound {
            kind: "device",
            id: device_id.into(),
        });
    }
    conn.prepare_cached("INSERT INTO series (device_id, key) VALUES (?1, ?2)")?
        .execute(params![device_id, key])?;
    Ok(conn.last_insert_rowid())
}

/// What one group-commit transaction remembers between its telemetry jobs, so that N jobs
/// of one device cost N point inserts, not also N series look-ups, N rollup upserts and N
/// device updates.
///
/// Only valid while nothing but telemetry appends and device touches runs in the
/// transaction: the caller [`flush`](Batch::flush)es and [`forget`](Batch::forget)s before any
/// other write, and forgets after a job was rolled back to its savepoint.
#[derive(Debug)]
pub(super) struct Batch {
    /// The most series a device may have (creating one more fails the job).
    max_series: usize,
    /// Series ids seen or created in this transaction: device → key → id.
    series: HashMap<String, HashMap<String, i64>>,
    /// Devices touched in this transaction, with the `last_seen_ms` they now have at least.
    touched: HashMap<String, i64>,
    /// Rollup contributions of the jobs that succeeded, written by [`Batch::flush`].
    rollups: HashMap<(i64, i64), Accumulator>,
    /// Devices known to exist in this transaction.
    known: HashSet<String>,
}

impl Batch {
    /// An empty batch whose devices may have at most `max_series` series each.
    pub(super) fn new(max_series: usize) -> Batch {
        Batch {
            max_series,
            series: HashMap::new(),
            touched: HashMap::new(),
            rollups: HashMap::new(),
            known: HashSet::new(),
        }
    }

    /// Whether `job` can fail only by a failure of the database itself: its writes are
    /// telemetry appends and touches of one device, which exists, and its points are valid.
    /// Such a job needs no savepoint of its own (what a transport submits per message is one).
    pub(super) fn cannot_fail(
        &mut self,
        conn: &Connection,
        job: &[Write],
    ) -> Result<bool, StoreError> {
        fn same<'a>(device: &mut Option<&'a str>, id: &'a str) -> bool {
            *device.get_or_insert(id) == id
        }
        let mut device: Option<&str> = None;
        for w in job {
            match w {
                Write::AppendTelemetry(points) => {
                    for p in points {
                        if p.validate().is_err() || !same(&mut device, &p.device_id) {
                            return Ok(false);
                        }
                    }
                }
                Write::TouchDevice { id, .. } => {
                    if !same(&mut device, id) {
                        return Ok(false);
                    }
                }
                _ => return Ok(false),
            }
        }
        let Some(id) = device else {
            return Ok(true);
        };
        if self.max_series != usize::MAX && !self.series_all_exist(conn, id, job)? {
            // A new series may take the device over its quota.
            return Ok(false);
        }
        if self.known.contains(id) {
            return Ok(true);
        }
        let exists = conn
            .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
            .exists(params![id])?;
        if exists {
            self.known.insert(id.to_owned());
        }
        Ok(exists)
    }

    /// Whether every series `job` writes to exists already (in this batch or the database).
    fn series_all_exist(
        &self,
        conn: &Connection,
        device: &str,
        job: &[Write],
    ) -> Result<bool, StoreError> {
        let cached = self.series.get(device);
        let mut last: Option<&str> = None;
        for w in job {
            let Write::AppendTelemetry(points) = w else {
                continue;
            };
            for p in points {
                if last == Some(p.key.as_str()) || cached.is_some_and(|c| c.contains_key(&p.key)) {
                    continue;
                }
                if series_id(conn, device, &p.key)?.is_none() {
                    return Ok(false);
                }
                last = Some(&p.key);
            }
        }
        Ok(true)
    }

    /// Appends `points` (one job's write); their rollup contributions go to `rollups`, which
    /// the caller hands to [`Batch::keep`] once the job as a whole succeeded.
    pub(super) fn append(
        &mut self,
        conn: &Connection,
        points: &[Point],
        rollups: &mut HashMap<(i64, i64), Accumulator>,
    ) -> Result<u64, StoreError> {
        // Validate everything before touching the database.
        for point in points {
            point.validate()?;
        }
        let mut last: Option<(&str, &str, i64)> = None;
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO points (series_id, ts, num, other) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut inserted = 0u64;
        for p in points {
            let sid = match last {
                Some((device, key, id)) if device == p.device_id && key == p.key => id,
                _ => {
                    let known = self
                        .series
                        .get(p.device_id.as_str())
                        .and_then(|keys| keys.get(p.key.as_str()));
                    let id = match known {
                        Some(id) => *id,
                        None => {
                            let id = intern(conn, &p.device_id, &p.key, self.max_series)?;
                            self.series
                                .entry(p.device_id.clone())
                                .or_default()
                                .insert(p.key.clone(), id);
                            id
                        }
                    };
                    last = Some((&p.device_id, &p.key, id));
                    id
                }
            };
            let changed = match &p.value {
                Value::Number(x) => insert.execute(params![sid, p.ts_ms, x, Null])?,
                Value::Bool(b) => insert.execute(params![sid, p.ts_ms, Null, i64::from(*b)])?,
                Value::Text(s) => insert.execute(params![sid, p.ts_ms, Null, s])?,
            };
            if changed > 0 {
                inserted += 1;
                if let Value::Number(x) = p.value {
                    add_rollup(rollups, (sid, bucket_start(p.ts_ms, MINUTE_MS)), x);
                }
            }
        }
        Ok(inserted)
    }

    /// Sets `last_seen_ms` of device `id` to at least `seen_at_ms` ([`StoreError::NotFound`]
    /// for an unknown device); free when this transaction already set it that far.
    pub(super) fn touch(
        &mut self,
        conn: &Connection,
        id: &str,
        seen_at_ms: i64,
    ) -> Result<(), StoreError> {
        if self.touched.get(id).is_some_and(|t| *t >= seen_at_ms) {
            // The row exists (updated in this transaction) and already holds as much.
            return Ok(());
        }
        super::registry::touch_device(conn, id, seen_at_ms)?;
        let t = self.touched.entry(id.to_owned()).or_insert(seen_at_ms);
        *t = (*t).max(seen_at_ms);
        Ok(())
    }

    /// Keeps the rollup contributions of a job that succeeded.
    pub(super) fn keep(&mut self, rollups: HashMap<(i64, i64), Accumulator>) {
        for (bucket, a) in rollups {
            self.rollups
                .entry(bucket)
                .and_modify(|r| r.merge(&a))
                .or_insert(a);
        }
    }

    /// Forgets the series and devices seen (a job was rolled back, or another kind of write
    /// may have changed them); the rollups kept stay.
    pub(super) fn forget(&mut self) {
        self.series.clear();
        self.touched.clear();
        self.known.clear();
    }

    /// Writes the rollups kept so far.
    pub(super) fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.rollups.is_empty() {
            return Ok(());
        }
        let mut upsert = conn.prepare_cached(
            "INSERT INTO rollup_1m (series_id, minute, n, total, lo, hi) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (series_id, minute) DO UPDATE SET
                 n = n + excluded.n, total = total + excluded.total,
                 lo = min(lo, excluded.lo), hi = max(hi, excluded.hi)",
        )?;
        for ((sid, minute), a) in self.rollups.drain() {
            upsert.execute(params![sid, minute, a.count, a.sum, a.min, a.max])?;
        }
        Ok(())
    }
}

/// Appends `points` on their own (outside a [`Batch`]), rollups included.
pub(super) fn append(conn: &Connection, points: &[Point]) -> Result<u64, StoreError> {
    let mut batch = Batch::new(usize::MAX);
    let mut rollups = HashMap::new();
    let inserted = batch.append(conn, points, &mut rollups)?;
    batch.keep(rollups);
    batch.flush(conn)?;
    Ok(inserted)
}

fn add_rollup(rollups: &mut HashMap<(i64, i64), Accumulator>, bucket: (i64, i64), x: f64) {
    rollups
        .entry(bucket)
        .and_modify(|a| a.add(x))
        .or_insert_with(|| Accumulator::of(x));
}

fn read_value(num: ValueRef<'_>, other: ValueRef<'_>) -> Result<Value, StoreError> {
    match (num, other) {
        (ValueRef::Real(x), _) => Ok(Value::Number(x)),
        (ValueRef::Integer(i), _) => Ok(Value::Number(i as f64)),
        (ValueRef::Null, ValueRef::Integer(i)) => Ok(Value::Bool(i != 0)),
        (ValueRef::Null, ValueRef::Text(t)) => std::str::from_utf8(t)
            .map(|s| Value::Text(s.to_owned()))
            .map_err(|_| StoreError::Corrupt("a stored text value is not UTF-8".into())),
        (num, other) => Err(StoreError::Corrupt(format!(
            "a stored point has no value ({:?}, {:?})",
            num.data_type(),
            other.data_type()
        ))),
    }
}

pub(super) fn points(conn: &Connection, q: &PointQuery) -> Result<PointPage, StoreError> {
    if q.limit == 0 {
        return Ok(PointPage::default());
    }
    let Some(sid) = series_id(conn, &q.device_id, &q.key)? else {
        return Ok(PointPage::default());
    };
    let (lo, hi) = q.effective_range();
    if lo >= hi {
        return Ok(PointPage::default());
    }
    let sql = match q.order {
        Order::Ascending => {
            "SELECT ts, num, other FROM points WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3
             ORDER BY ts LIMIT ?4"
        }
        Order::Descending => {
            "SELECT ts, num, other FROM points WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3
             ORDER BY ts DESC LIMIT ?4"
        }
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params![sid, lo, hi, sql_int(q.limit.saturating_add(1))])?;
    let mut page = PointPage::default();
    while let Some(r) = rows.next()? {
        if page.points.len() == q.limit {
            page.next_after_ts = page.points.last().map(|p| p.ts_ms);
            break;
        }
        page.points.push(TimedValue {
            ts_ms: r.get(0)?,
            value: read_value(r.get_ref(1)?, r.get_ref(2)?)?,
        });
    }
    Ok(page)
}

/// Adds `acc` to the bucket at the end of `out` if it is `bucket`, or starts a new one
/// (sources are folded in time order, so buckets arrive in order).
fn push(out: &mut Vec<(i64, Accumulator)>, bucket: i64, acc: &Accumulator) {
    match out.last_mut() {
        Some((last, a)) if *last == bucket => a.merge(acc),
        _ => out.push((bucket, *acc)),
    }
}

fn fold_raw(
    conn: &Connection,
    sid: i64,
    lo: i64,
    hi: i64,
    interval: i64,
    out: &mut Vec<(i64, Accumulator)>,
) -> Result<(), StoreError> {
    if lo >= hi {
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT ts, num FROM points WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3
         AND num IS NOT NULL ORDER BY ts",
    )?;
    let mut rows = stmt.query(params![sid, lo, hi])?;
    while let Some(r) = rows.next()? {
        let ts: i64 = r.get(0)?;
        let x: f64 = r.get(1)?;
        let bucket = bucket_start(ts, interval);
        match out.last_mut() {
            Some((last, a)) if *last == bucket => a.add(x),
            _ => out.push((bucket, Accumulator::of(x))),
        }
    }
    Ok(())
}

fn fold_rollups(
    conn: &Connection,
    sid: i64,
    lo: i64,
    hi: i64,
    interval: i64,
    out: &mut Vec<(i64, Accumulator)>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT minute, n, total, lo, hi FROM rollup_1m
         WHERE series_id = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute",
    )?;
    let mut rows = stmt.query(params![sid, lo, hi])?;
    while let Some(r) = rows.next()? {
        let minute: i64 = r.get(0)?;
        let acc = Accumulator {
            count: r.get(1)?,
            sum: r.get(2)?,
            min: r.get(3)?,
            max: r.get(4)?,
        };
        push(out, bucket_start(minute, interval), &acc);
    }
    Ok(())
}

/// The first whole minute at or after `t`.
fn ceil_minute(t: i64) -> i64 {
    let floor = bucket_start(t, MINUTE_MS);
    if floor == t {
        t
    } else {
        floor + MINUTE_MS
    }
}

pub(super) fn aggregate(conn: &Connection, q: &AggregateQuery) -> Result<Vec<Bucket>, StoreError> {
    q.validate()?;
    let Some(sid) = series_id(conn, &q.device_id, &q.key)? else {
        return Ok(Vec::new());
    };
    let from = q.from_ms.max(MIN_TS_MS);
    let to = q.to_ms.min(MAX_TS_MS + 1);
    if from >= to {
        return Ok(Vec::new());
    }
    let interval = q.interval_ms;
    let mut out = Vec::new();
    let (whole_from, whole_to) = (ceil_minute(from), bucket_start(to, MINUTE_MS));
    if interval % MINUTE_MS == 0 && whole_from < whole_to {
        // Every minute lies within one bucket: whole minutes from the rollups, the partial
        // minutes at the edges from the points.
        fold_raw(conn, sid, from, whole_from, interval, &mut out)?;
        fold_rollups(conn, sid, whole_from, whole_to, interval, &mut out)?;
        fold_raw(conn, sid, whole_to, to, interval, &mut out)?;
    } else {
        fold_raw(conn, sid, from, to, interval, &mut out)?;
    }
    Ok(out
        .into_iter()
        .map(|(start_ms, a)| Bucket {
            start_ms,
            value: a.value(q.agg),
            count: a.count,
        })
        .collect())
}

pub(super) fn latest(conn: &Connection, device_id: &str) -> Result<Vec<LatestValue>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.key, p.ts, p.num, p.other FROM series s
         JOIN points p ON p.series_id = s.id
             AND p.ts = (SELECT max(ts) FROM points WHERE series_id = s.id)
         WHERE s.device_id = ?1 ORDER BY s.key",
    )?;
    let mut rows = stmt.query(params![device_id])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(LatestValue {
            key: r.get(0)?,
            ts_ms: r.get(1)?,
            value: read_value(r.get_ref(2)?, r.get_ref(3)?)?,
        });
    }
    Ok(out)
}

pub(super) fn keys(conn: &Connection, device_id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT key FROM series WHERE device_id = ?1 ORDER BY key")?;
    let keys = stmt
        .query_map(params![device_id], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(keys)
}

pub(super) fn set_retention(
    conn: &Connection,
    device_id: Option<&str>,
    key: Option<&str>,
    retention: Option<&Retention>,
) -> Result<(), StoreError> {
    check_scope(device_id, key)?;
    let (device_id, key) = (device_id.unwrap_or(""), key.unwrap_or(""));
    match retention {
        None => {
            conn.prepare_cached("DELETE FROM retention WHERE device_id = ?1 AND key = ?2")?
                .execute(params![device_id, key])?;
        }
        Some(retention) => {
            let keep_ms = match retention {
                Retention::Forever => None,
                Retention::For(d) => Some(duration_ms(*d)),
            };
            conn.prepare_cached(
                "INSERT OR REPLACE INTO retention (device_id, key, keep_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![device_id, key, keep_ms])?;
        }
    }
    Ok(())
}

pub(super) fn retention_rules(conn: &Connection) -> Result<Vec<RetentionRule>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT device_id, key, keep_ms FROM retention ORDER BY device_id, key")?;
    let mut rows = stmt.query([])?;
    let mut rules = Vec::new();
    while let Some(r) = rows.next()? {
        let device_id: String = r.get(0)?;
        let key: String = r.get(1)?;
        let keep_ms: Option<i64> = r.get(2)?;
        let retention = match keep_ms {
            None => Retention::Forever,
            Some(ms) => Retention::For(std::time::Duration::from_millis(
                u64::try_from(ms)
                    .map_err(|_| StoreError::Corrupt(format!("negative retention {ms} ms")))?,
            )),
        };
        rules.push(RetentionRule {
            device_id: (!device_id.is_empty()).then_some(device_id),
            key: (!key.is_empty()).then_some(key),
            retention,
        });
    }
    Ok(rules)
}

pub(super) fn purge(conn: &Connection, now_ms: i64) -> Result<u64, StoreError> {
    let rules = retention_rules(conn)?;
    if rules.is_empty() {
        return Ok(0);
    }
    let series = conn
        .prepare_cached("SELECT id, device_id, key FROM series")?
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut deleted = 0u64;
    for (sid, device_id, key) in series {
        let Some(cutoff) = purge_cutoff(resolve_retention(&rules, &device_id, &key), now_ms) else {
            continue;
        };
        deleted += conn
            .prepare_cached("DELETE FROM points WHERE series_id = ?1 AND ts < ?2")?
            .execute(params![sid, cutoff])? as u64;
        conn.prepare_cached("DELETE FROM rollup_1m WHERE series_id = ?1 AND minute < ?2")?
            .execute(params![sid, cutoff])?;
        let empty = !conn
            .prepare_cached("SELECT 1 FROM points WHERE series_id = ?1 LIMIT 1")?
            .exists(params![sid])?;
        if empty {
            conn.prepare_cached("DELETE FROM rollup_1m WHERE series_id = ?1")?
                .execute(params![sid])?;
            conn.prepare_cached("DELETE FROM series WHERE id = ?1")?
                .execute(params![sid])?;
        }
    }
    Ok(deleted)
}

/// Removes everything a deleted device had in telemetry.
pub(super) fn delete_device_data(conn: &Connection, device_id: &str) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM points WHERE series_id IN (SELECT id FROM series WHERE device_id = ?1)",
        "DELETE FROM rollup_1m WHERE series_id IN (SELECT id FROM series WHERE device_id = ?1)",
        "DELETE FROM series WHERE device_id = ?1",
        "DELETE FROM retention WHERE device_id = ?1",
    ] {
        conn.prepare_cached(sql)?.execute(params![device_id])?;
    }
    Ok(())
}
