//! Ingestion over `POST /api/v1/telemetry`: batches of 1,000 records from 8 connections
//! (`ingest-batch`, points/s), and one record per request from 64 connections in a closed
//! loop (`ingest-single`, requests/s). Each connection posts as its own device, one series,
//! ascending timestamps; a 202 counts only with the right point count in its body.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::try_join_all;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, StatusCode};

use super::body::{floor_minute, BatchTemplate, RecordTemplate};
use super::client::{exchange, Body, Link, Proto};
use super::{now_ms, Ctx, Extra, Latencies, Meter};
use crate::group::{Group, TASKS};
use crate::report::human_count;

/// Connections of `ingest-batch`.
pub const BATCH_CONNECTIONS: usize = 8;
/// Records per batch.
pub const BATCH_RECORDS: usize = 1_000;
/// Batches per connection at scale 1 (8 × 625 × 1,000 = 5,000,000 points).
pub const BATCHES_PER_CONNECTION: u64 = 625;
/// Milliseconds between a series' points in `ingest-batch` (a 100 Hz sensor).
pub const BATCH_STEP_MS: i64 = 10;
/// Issue #5: at least this many points/s, durable.
pub const BATCH_TARGET: f64 = 250_000.0;

/// Connections of `ingest-single`.
pub const SINGLE_CONNECTIONS: usize = 64;
/// Seconds `ingest-single` runs at scale 1 (never less than 1 s).
pub const SINGLE_SECS: f64 = 10.0;
/// Issue #5: at least this many requests/s.
pub const SINGLE_TARGET: f64 = 20_000.0;

const BATCH_KEY: &str = "batch";
const SINGLE_KEY: &str = "single";

/// The path every ingestion request goes to.
pub const PATH: &str = "/api/v1/telemetry";

/// Opens `n` connections at once.
pub async fn connect_all(ctx: &Ctx, n: usize) -> anyhow::Result<Vec<Link>> {
    try_join_all((0..n).map(|_| Link::connect(ctx.addr))).await
}

/// The `points` of a 202 body `{"accepted": R, "points": P}`.
pub fn acknowledged_points(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Accepted {
        points: u64,
    }
    serde_json::from_slice::<Accepted>(body)
        .ok()
        .map(|a| a.points)
}

/// What happened to one ingestion request.
pub enum Sent {
    /// Acknowledged with the expected points.
    Acked,
    /// Answered otherwise (counted as an error); the connection is still usable.
    Refused,
    /// The connection broke (counted as an error); stop using it.
    Broken,
}

/// Posts one body and counts the outcome: a 202 whose body says `points` points.
pub async fn post(
    sender: &mut SendRequest<Body>,
    proto: &Proto,
    body: Bytes,
    points: u64,
    meter: &Meter,
    latencies: &mut Latencies,
    what: impl Fn() -> String,
) -> Sent {
    meter.sent.fetch_add(1, Relaxed);
    let t0 = Instant::now();
    match exchange(sender, proto.request(body)).await {
        Ok(a) if a.status == StatusCode::ACCEPTED => {
            latencies.add(t0.elapsed());
            match acknowledged_points(&a.body) {
                Some(p) if p == points => {
                    meter.ack(points);
                    Sent::Acked
                }
                _ => {
                    meter.error(|| {
                        format!(
                            "{}: 202 for {points} points, but the answer says {}",
                            what(),
                            a.describe()
                        )
                    });
                    Sent::Refused
                }
            }
        }
        Ok(a) => {
            meter.error(|| format!("{}: {}", what(), a.describe()));
            Sent::Refused
        }
        Err(e) => {
            meter.error(|| format!("{}: {e}", what()));
            Sent::Broken
        }
    }
}

/// `ingest-batch`.
pub async fn batch(ctx: Ctx, meter: Arc<Meter>) -> anyhow::Result<Extra> {
    let per_conn = ctx.scaled(BATCHES_PER_CONNECTION);
    meter
        .planned
        .store(BATCH_CONNECTIONS as u64 * per_conn, Relaxed);
    let tokens = ctx.device_tokens(BATCH_CONNECTIONS).await?;
    let template = Arc::new(BatchTemplate::new(BATCH_KEY, BATCH_RECORDS));
    let batch_span = BATCH_RECORDS as i64 * BATCH_STEP_MS;
    // In the past, minute-aligned: a device may send any past time.
    let base = floor_minute(now_ms() - per_conn as i64 * batch_span - 60_000);
    let links = connect_all(&ctx, BATCH_CONNECTIONS).await?;

    let mut loops = Vec::new();
    for (c, link) in links.into_iter().enumerate() {
        let proto = Proto::new(Method::POST, PATH, &ctx.host, Some(&tokens[c]), true)?;
        let (template, meter) = (template.clone(), meter.clone());
        let device = ctx.devices[c].id.clone();
        loops.push(link.run(move |mut sender| async move {
            let mut latencies = Latencies::new(meter.progress.clone());
            for b in 0..per_conn {
                let body = template.render(base + b as i64 * batch_span, BATCH_STEP_MS);
                let what = || format!("batch {b} of {device}");
                let sent = post(
                    &mut sender,
                    &proto,
                    body,
                    BATCH_RECORDS as u64,
                    &meter,
                    &mut latencies,
                    what,
                )
                .await;
                if let Sent::Broken = sent {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    meter.progress.begin();
    Group::spawn(loops, TASKS).join().await?;
    meter.progress.end();
    Ok(Extra {
        connections: BATCH_CONNECTIONS as u32,
        notes: vec![format!(
            "{BATCH_CONNECTIONS} connections × {per_conn} × {}-record batches ({} B per body)",
            human_count(BATCH_RECORDS as u64),
            human_count(template.len() as u64)
        )],
        ..Extra::default()
    })
}

/// How long `ingest-single` runs at `scale`.
pub fn single_duration(scale: f64) -> Duration {
    Duration::from_secs_f64((SINGLE_SECS * scale).max(1.0))
}

/// `ingest-single`.
pub async fn single(ctx: Ctx, meter: Arc<Meter>) -> anyhow::Result<Extra> {
    let duration = single_duration(ctx.scale);
    let tokens = ctx.device_tokens(SINGLE_CONNECTIONS).await?;
    let template = Arc::new(RecordTemplate::new(SINGLE_KEY, 21.5));
    // One millisecond apart per request, starting two days back: a connection would need
    // 86 million requests to reach yesterday.
    let base = floor_minute(now_ms() - 2 * 86_400_000);
    let links = connect_all(&ctx, SINGLE_CONNECTIONS).await?;

    let mut loops = Vec::new();
    let end = Instant::now() + duration;
    for (c, link) in links.into_iter().enumerate() {
        let proto = Proto::new(Method::POST, PATH, &ctx.host, Some(&tokens[c]), true)?;
        let (template, meter) = (template.clone(), meter.clone());
        let device = ctx.devices[c].id.clone();
        loops.push(link.run(move |mut sender| async move {
            let mut latencies = Latencies::new(meter.progress.clone());
            let mut seq = 0i64;
            while Instant::now() < end {
                let body = template.render(base + seq);
                let what = || format!("record {seq} of {device}");
                if let Sent::Broken =
                    post(&mut sender, &proto, body, 1, &meter, &mut latencies, what).await
                {
                    break;
                }
                seq += 1;
            }
            anyhow::Ok(())
        }));
    }
    meter.progress.begin();
    Group::spawn(loops, TASKS).join().await?;
    meter.progress.end();
    Ok(Extra {
        connections: SINGLE_CONNECTIONS as u32,
        notes: vec![format!(
            "{SINGLE_CONNECTIONS} connections, closed loop for {:.1} s",
            duration.as_secs_f64()
        )],
        ..Extra::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_points_of_an_answer_are_read() {
        assert_eq!(
            acknowledged_points(br#"{"accepted":1000,"points":1000}"#),
            Some(1000)
        );
        assert_eq!(acknowledged_points(br#"{"accepted":1}"#), None);
        assert_eq!(acknowledged_points(b"not json"), None);
    }

    #[test]
    fn single_runs_at_least_a_second() {
        assert_eq!(single_duration(1.0), Duration::from_secs(10));
        assert_eq!(single_duration(0.01), Duration::from_secs(1));
        assert_eq!(single_duration(3.0), Duration::from_secs(30));
    }
}
