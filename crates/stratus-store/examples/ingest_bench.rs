//! Measures what the telemetry benchmarks need from the store, on the SQLite backend:
//! durable batched ingest (batches of 1,000 points from concurrent submitters through the
//! group committer) and aggregation over 10 million points of one series.
//!
//! ```text
//! cargo run --release -p stratus-store --example ingest_bench -- \
//!     [--seconds 10] [--submitters 8] [--batch 1000] [--agg-points 10000000] [--dir DIR]
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_store::{
    Agg, AggregateQuery, NewDevice, Point, PointQuery, SqliteStore, StoreHandle, Value,
};

struct Args {
    seconds: u64,
    submitters: usize,
    batch: usize,
    agg_points: i64,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        seconds: 10,
        submitters: 8,
        batch: 1000,
        agg_points: 10_000_000,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse()?,
            "--submitters" => args.submitters = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--agg-points" => args.agg_points = value()?.parse()?,
            "--dir" => args.dir = Some(value()?.into()),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn device(id: &str) -> NewDevice {
    NewDevice {
        id: id.into(),
        secret_hash: "$argon2id$bench".into(),
        attributes: serde_json::json!({}),
        created_at_ms: 0,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

const T0: i64 = 1_700_000_000_000;

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let path = dir.join("bench.db");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let store = Arc::new(SqliteStore::open(&path)?);
    let handle = StoreHandle::new(store.clone(), 20_000)?;
    runtime.block_on(run(args, handle, path))?;
    let size: u64 = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("database size: {:.0} MiB", size as f64 / (1 << 20) as f64);
    Ok(())
}

async fn run(args: Args, handle: StoreHandle, path: PathBuf) -> Result<(), Box<dyn Error>> {
    // ---- durable batched ingest --------------------------------------------------------
    for s in 0..args.submitters {
        handle.create_device(device(&format!("bench-{s}"))).await?;
    }
    let before = handle.committer().stats();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.submitters)
        .map(|s| {
            let handle = handle.clone();
            let batch = args.batch as i64;
            tokio::spawn(async move {
                let id = format!("bench-{s}");
                let mut latencies = Vec::new();
                let mut next_ts = T0;
                while Instant::now() < deadline {
                    let points: Vec<Point> = (0..batch)
                        .map(|i| {
                            Point::new(
                                id.as_str(),
                                "temperature",
                                next_ts + i * 10,
                                Value::Number(20.0 + (i % 100) as f64 / 10.0),
                            )
                        })
                        .collect();
                    next_ts += batch * 10;
                    let sent = Instant::now();
                    let stored = handle.append_telemetry(points).await?;
                    latencies.push(sent.elapsed());
                    assert_eq!(stored, batch as u64);
                }
                Ok::<_, stratus_store::StoreError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let after = handle.committer().stats();
    latencies.sort();
    let points = latencies.len() as f64 * args.batch as f64;
    let transactions = after.transactions - before.transactions;
    println!(
        "ingest: {} submitters x batches of {} for {:.1} s: {:.0} points/s durable \
         ({} batches in {} transactions, {:.1} batches per fsync; batch latency p50 {:.1} ms, p99 {:.1} ms)",
        args.submitters,
        args.batch,
        elapsed.as_secs_f64(),
        points / elapsed.as_secs_f64(),
        latencies.len(),
        transactions,
        latencies.len() as f64 / transactions.max(1) as f64,
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );

    // ---- 10 M points of one series, one per second -------------------------------------
    handle.create_device(device("agg")).await?;
    let n = args.agg_points;
    let loaders = 4i64;
    let chunk = 10_000i64;
    let started = Instant::now();
    let tasks: Vec<_> = (0..loaders)
        .map(|l| {
            let handle = handle.clone();
            tokio::spawn(async move {
                let mut i = l * chunk;
                while i < n {
                    let end = (i + chunk).min(n);
                    let points = (i..end)
                        .map(|k| {
                            Point::new(
                                "agg",
                                "temperature",
                                T0 + k * 1000,
                                Value::Number((k % 1000) as f64 * 0.5),
                            )
                        })
                        .collect();
                    handle.append_telemetry(points).await?;
                    i += loaders * chunk;
                }
                Ok::<_, stratus_store::StoreError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let load = started.elapsed();
    println!(
        "load: {n} points of one series in {:.1} s ({:.0} points/s, batches of {chunk})",
        load.as_secs_f64(),
        n as f64 / load.as_secs_f64()
    );

    // ---- aggregation -------------------------------------------------------------------
    let query = |from_ms: i64, to_ms: i64, interval_ms: i64, agg: Agg| AggregateQuery {
        device_id: "agg".into(),
        key: "temperature".into(),
        from_ms,
        to_ms,
        interval_ms,
        agg,
    };
    let end = T0 + n * 1000;
    let runs = [
        (
            "avg per 1 min, whole series",
            query(T0, end, 60_000, Agg::Avg),
        ),
        (
            "avg per 1 min, whole series",
            query(T0, end, 60_000, Agg::Avg),
        ),
        (
            "avg per 1 min, unaligned edges",
            query(T0 + 12_345, end - 6_789, 60_000, Agg::Avg),
        ),
        (
            "max per 1 h, whole series",
            query(T0, end, 3_600_000, Agg::Max),
        ),
        (
            "avg per 10 s (raw points), whole series",
            query(T0, end, 10_000, Agg::Avg),
        ),
        (
            "avg per 10 s (raw points), whole series",
            query(T0, end, 10_000, Agg::Avg),
        ),
    ];
    for (what, q) in runs {
        let started = Instant::now();
        let buckets = handle.aggregate(q).await?;
        let took = started.elapsed();
        let counted: u64 = buckets.iter().map(|b| b.count).sum();
        println!(
            "aggregate {what}: {:.1} ms, {} buckets over {counted} points",
            took.as_secs_f64() * 1e3,
            buckets.len()
        );
    }
    // The baseline the rollups replace: plain SQL grouping over the same points.
    let started = Instant::now();
    let grouped = tokio::task::spawn_blocking(move || -> rusqlite::Result<usize> {
        let conn = rusqlite::Connection::open(path)?;
        let mut stmt = conn.prepare(
            "SELECT ts / 60000, avg(num), count(num) FROM points
             WHERE series_id = (SELECT id FROM series WHERE device_id = 'agg' AND key = 'temperature')
               AND ts >= ?1 AND ts < ?2
             GROUP BY 1",
        )?;
        let rows = stmt.query_map([T0, end], |r| r.get::<_, i64>(0))?;
        Ok(rows.count())
    })
    .await??;
    println!(
        "baseline: plain SQL GROUP BY ts / 60000 (avg) over the same points: {:.1} ms, {grouped} buckets",
        started.elapsed().as_secs_f64() * 1e3
    );
    let started = Instant::now();
    let page = handle
        .points(
            PointQuery::new("agg", "temperature", T0, end)
                .descending()
                .limit(1000),
        )
        .await?;
    println!(
        "points: latest 1000 raw points in {:.2} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(page.points.len(), 1000.min(n as usize));
    Ok(())
}
