//! `aggregate`: 10,000,000 points of one series (one point per 100 ms, 11.6 days) loaded
//! through the batch endpoint (batches of 10,000 over 16 connections — timed, but not the
//! figure), then `GET /api/v1/devices/{id}/telemetry?key=K&agg=avg&interval=1m&from=..&to=..`
//! over the whole range, 5 times on one keep-alive connection: min and median time from
//! sending the request to the last byte of the answer. Every answer is checked against
//! what was sent: the bucket count, the total count, and the first, middle and last buckets'
//! start, count and average.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyper::{Method, StatusCode};

use super::body::{floor_minute, value, BatchTemplate};
use super::client::{exchange, Link, Proto};
use super::ingest::{connect_all, post, Sent, PATH};
use super::{now_ms, Ctx, Extra, Latencies, Meter};
use crate::group::{Group, TASKS};
use crate::progress::Progress;
use crate::report::{human_count, Better, Figure};

/// Points of the series at scale 1.
pub const POINTS: u64 = 10_000_000;
/// Records per loading batch.
pub const BATCH: usize = 10_000;
/// Loading connections.
pub const CONNECTIONS: usize = 16;
/// Milliseconds between points (600 per 1-minute bucket).
pub const STEP_MS: i64 = 100;
/// Times the query runs.
pub const QUERIES: usize = 5;
/// Issue #5: under this many milliseconds.
pub const TARGET_MS: f64 = 1000.0;

const KEY: &str = "agg";
const BUCKET_MS: i64 = 60_000;

/// The buckets the query must answer for `n` points from `base` (minute-aligned).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expected {
    /// First point's time.
    pub base: i64,
    /// Points.
    pub n: u64,
}

/// One bucket as the server should answer it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Bucket start, epoch ms.
    pub ts: i64,
    /// Points in it.
    pub count: u64,
    /// Their average.
    pub avg: f64,
}

impl Expected {
    /// Points per full bucket.
    pub const PER_BUCKET: u64 = (BUCKET_MS / STEP_MS) as u64;

    /// Buckets in the answer (empty buckets are never listed; none is empty here).
    pub fn buckets(&self) -> u64 {
        self.n.div_ceil(Self::PER_BUCKET)
    }

    /// Bucket `b`: points `b × 600 ..` with values `value(i mod BATCH)`.
    pub fn bucket(&self, b: u64) -> Bucket {
        let first = b * Self::PER_BUCKET;
        let last = (first + Self::PER_BUCKET).min(self.n);
        let sum: f64 = (first..last)
            .map(|i| value((i % BATCH as u64) as usize))
            .sum();
        let count = last - first;
        Bucket {
            ts: self.base + b as i64 * BUCKET_MS,
            count,
            avg: sum / count as f64,
        }
    }

    /// The query's `from` and `to` (exclusive): exactly the points sent.
    pub fn range(&self) -> (i64, i64) {
        (self.base, self.base + self.n as i64 * STEP_MS)
    }

    /// Checks an answer `{"buckets": [{"ts", "value", "count"}], "truncated": false, …}`.
    pub fn check(&self, body: &[u8]) -> Result<(), String> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
        if v["truncated"].as_bool() == Some(true) {
            return Err("the answer is truncated".into());
        }
        let buckets = v["buckets"]
            .as_array()
            .ok_or("the answer has no buckets array")?;
        if buckets.len() as u64 != self.buckets() {
            return Err(format!(
                "{} buckets, expected {}",
                buckets.len(),
                self.buckets()
            ));
        }
        let total: u64 = buckets.iter().filter_map(|b| b["count"].as_u64()).sum();
        if total != self.n {
            return Err(format!(
                "the buckets count {total} points, {} were sent",
                self.n
            ));
        }
        let last = self.buckets() - 1;
        for b in [0, last / 2, last] {
            let want = self.bucket(b);
            let got = &buckets[b as usize];
            let (ts, count, avg) = (
                got["ts"].as_i64(),
                got["count"].as_u64(),
                got["value"].as_f64(),
            );
            let close = avg.is_some_and(|a| (a - want.avg).abs() <= 1e-9 * want.avg.abs().max(1.0));
            if ts != Some(want.ts) || count != Some(want.count) || !close {
                return Err(format!(
                    "bucket {b} is {got}, expected ts {} count {} value {}",
                    want.ts, want.count, want.avg
                ));
            }
        }
        Ok(())
    }
}

/// The middle element of `v` once sorted (the upper one of an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

/// Runs the scenario.
pub async fn run(ctx: Ctx, meter: Arc<Meter>) -> anyhow::Result<Extra> {
    let n = ctx.scaled(POINTS);
    let device = ctx
        .aggregate_device
        .clone()
        .context("no device was registered for aggregate")?;
    let batches = n.div_ceil(BATCH as u64);
    meter.planned.store(batches + QUERIES as u64, Relaxed);
    let token = ctx.token_of(&device).await?;
    let full = Arc::new(BatchTemplate::new(KEY, BATCH));
    let tail = match (n % BATCH as u64) as usize {
        0 => None,
        len => Some(Arc::new(BatchTemplate::new(KEY, len))),
    };
    let expected = Expected {
        base: floor_minute(now_ms() - n as i64 * STEP_MS - BUCKET_MS),
        n,
    };
    let connections = CONNECTIONS.min(batches as usize);
    let links = connect_all(&ctx, connections).await?;

    // Load: each connection takes the next batch until none is left.
    let next = Arc::new(AtomicU64::new(0));
    let discard = Progress::new(0, None);
    let mut loops = Vec::new();
    for link in links {
        let proto = Proto::new(Method::POST, PATH, &ctx.host, Some(&token), true)?;
        let (full, tail, next, meter) = (full.clone(), tail.clone(), next.clone(), meter.clone());
        let discard = discard.clone();
        let id = device.id.clone();
        loops.push(link.run(move |mut sender| async move {
            let mut latencies = Latencies::new(discard);
            loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= batches {
                    break;
                }
                let template = match &tail {
                    Some(t) if k == batches - 1 => t,
                    _ => &full,
                };
                let first = expected.base + (k * BATCH as u64) as i64 * STEP_MS;
                let body = template.render(first, STEP_MS);
                let what = || format!("loading batch {k} of {id}");
                let points = template.records() as u64;
                let sent = post(
                    &mut sender,
                    &proto,
                    body,
                    points,
                    &meter,
                    &mut latencies,
                    what,
                );
                if let Sent::Broken = sent.await {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    let server_cpu = || ctx.server_pid.and_then(crate::procfs::cpu_secs);
    let cpu_before = server_cpu();
    let load_start = Instant::now();
    Group::spawn(loops, TASKS).join().await?;
    let load_secs = load_start.elapsed().as_secs_f64();
    let load_cpu = cpu_before.zip(server_cpu()).map(|(a, b)| b - a);
    let loaded = meter.points.load(Relaxed);
    let mut notes = vec![format!(
        "loaded {} points of one series in {load_secs:.1} s ({connections} connections × \
         {}-record batches{})",
        human_count(loaded),
        human_count(BATCH as u64),
        load_cpu
            .map(|c| format!(", server CPU {c:.1} s"))
            .unwrap_or_default()
    )];
    let load_rate = Figure::new(
        "load_rate",
        (load_secs > 0.0).then(|| loaded as f64 / load_secs),
        "points/s",
        Better::Higher,
    );
    if loaded != n {
        anyhow::bail!("loading stored {loaded} of {n} points");
    }

    // Query: the whole range, several times over one connection.
    let admin = ctx.admin_token().await?;
    let (from, to) = expected.range();
    let path = format!(
        "/api/v1/devices/{}/telemetry?key={KEY}&agg=avg&interval=1m&from={from}&to={to}",
        device.id
    );
    let proto = Proto::new(Method::GET, &path, &ctx.host, Some(&admin), false)?;
    let link = Link::connect(ctx.addr).await?;
    meter.progress.begin();
    let times = link
        .run(|mut sender| {
            let meter = meter.clone();
            async move {
                let mut times = Vec::with_capacity(QUERIES);
                for q in 0..QUERIES {
                    meter.sent.fetch_add(1, Relaxed);
                    let t0 = Instant::now();
                    let answer = exchange(&mut sender, proto.request(Default::default()))
                        .await
                        .with_context(|| format!("query {q}"))?;
                    let took = t0.elapsed();
                    if answer.status != StatusCode::OK {
                        meter.error(|| format!("query {q}: {}", answer.describe()));
                        continue;
                    }
                    if let Err(why) = expected.check(&answer.body) {
                        meter.error(|| format!("query {q}: {why}"));
                        continue;
                    }
                    meter.ack(0);
                    meter.progress.add_latencies(&[took.as_nanos() as u64]);
                    times.push(took);
                }
                anyhow::Ok(times)
            }
        })
        .await?;
    meter.progress.end();
    let ms: Vec<f64> = times
        .iter()
        .map(|d: &Duration| d.as_secs_f64() * 1e3)
        .collect();
    notes.push(format!(
        "{} buckets of up to {} points; answers checked against what was sent",
        human_count(expected.buckets()),
        Expected::PER_BUCKET
    ));
    Ok(Extra {
        figures: vec![
            Figure::new("median", median(&ms), "ms", Better::Lower),
            Figure::new(
                "min",
                ms.iter().copied().reduce(f64::min),
                "ms",
                Better::Lower,
            ),
            load_rate,
        ],
        notes,
        connections: connections as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(e: &Expected) -> serde_json::Value {
        let buckets: Vec<_> = (0..e.buckets())
            .map(|b| {
                let x = e.bucket(b);
                serde_json::json!({"ts": x.ts, "value": x.avg, "count": x.count})
            })
            .collect();
        serde_json::json!({"device": "d", "key": KEY, "agg": "avg", "interval_ms": 60000,
                           "truncated": false, "buckets": buckets})
    }

    #[test]
    fn expected_buckets_follow_the_points_sent() {
        let e = Expected {
            base: 1_700_000_040_000,
            n: 10_000,
        };
        assert_eq!(Expected::PER_BUCKET, 600);
        assert_eq!(e.buckets(), 17);
        let b0 = e.bucket(0);
        assert_eq!(b0.ts, e.base);
        assert_eq!(b0.count, 600);
        let direct: f64 = (0..600).map(value).sum::<f64>() / 600.0;
        assert_eq!(b0.avg, direct);
        let last = e.bucket(16);
        assert_eq!(last.count, 400);
        assert_eq!(last.ts, e.base + 16 * 60_000);
        assert_eq!(e.range(), (e.base, e.base + 1_000_000));
        // Scale 1: 16,667 buckets, well under the server's 100,000 per answer.
        let full = Expected { base: 0, n: POINTS };
        assert_eq!(full.buckets(), 16_667);
        // Values follow the batch position: point 10,000 starts a new batch at value(0).
        let e = Expected { base: 0, n: 20_000 };
        let b = e.bucket(16); // points 9,600 .. 10,200
        let direct: f64 = (9_600..10_200u64)
            .map(|i| value((i % 10_000) as usize))
            .sum::<f64>()
            / 600.0;
        assert_eq!(b.avg, direct);
    }

    #[test]
    fn answers_are_checked() {
        let e = Expected {
            base: 1_700_000_040_000,
            n: 10_000,
        };
        let good = answer(&e);
        assert_eq!(e.check(good.to_string().as_bytes()), Ok(()));

        let mut v = good.clone();
        v["buckets"].as_array_mut().unwrap().pop();
        assert!(e
            .check(v.to_string().as_bytes())
            .unwrap_err()
            .contains("16 buckets"));
        let mut v = good.clone();
        v["buckets"][8]["value"] = serde_json::json!(1.0);
        assert!(e
            .check(v.to_string().as_bytes())
            .unwrap_err()
            .contains("bucket 8"));
        let mut v = good.clone();
        v["buckets"][3]["count"] = serde_json::json!(599);
        assert!(e
            .check(v.to_string().as_bytes())
            .unwrap_err()
            .contains("9999 points"));
        let mut v = good.clone();
        v["truncated"] = serde_json::json!(true);
        assert!(e.check(v.to_string().as_bytes()).is_err());
        assert!(e.check(b"{}").is_err());
        assert!(e.check(b"<html>").is_err());
    }

    #[test]
    fn the_median_is_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median(&[]), None);
    }
}
