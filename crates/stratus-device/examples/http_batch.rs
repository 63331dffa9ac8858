//! An HTTP batch uploader: reads a CSV of past readings (`ts_ms,key,value` lines, e.g. a
//! data logger's dump; or generates an hour of one-minute readings when no file is given) and
//! uploads them through the SDK's HTTP transport in batches, then waits until all are stored.
//!
//! ```text
//! cargo run -p stratus-device --example http_batch -- \
//!     --server http://127.0.0.1:8080 --id logger-1 --secret SECRET [--file dump.csv]
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use stratus_device::{Device, Record, Transport};

#[derive(Parser)]
struct Args {
    /// The server's HTTP base URL.
    #[arg(long, env = "STRATUS_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Device id.
    #[arg(long, env = "STRATUS_DEVICE_ID")]
    id: String,
    /// Device secret.
    #[arg(long, env = "STRATUS_DEVICE_SECRET", hide_env_values = true)]
    secret: String,
    /// CSV with `ts_ms,key,value` lines.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
    /// Records per HTTP request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
}

fn readings(args: &Args) -> anyhow::Result<Vec<Record>> {
    let Some(path) = &args.file else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        return Ok((0..60)
            .map(|i| {
                Record::at(now - (60 - i) * 60_000)
                    .with("temperature", 20.0 + (i as f64 / 10.0).sin())
                    .with("humidity", 50.0 + (i % 7) as f64)
            })
            .collect());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(3, ',');
        let (Some(ts), Some(key), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("line {}: expected ts_ms,key,value", n + 1);
        };
        let ts: i64 = ts
            .trim()
            .parse()
            .with_context(|| format!("line {}: ts", n + 1))?;
        let value: serde_json::Value = match value.trim().parse::<f64>() {
            Ok(f) => f.into(),
            Err(_) => value.trim().into(),
        };
        out.push(Record::at(ts).with(key.trim(), value));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATUS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let records = readings(&args)?;
    let total = records.len();
    let device = Device::builder(&args.server, &args.id, &args.secret)
        .transport(Transport::Http)
        .max_batch(args.batch)
        .buffer_capacity(total.max(1))
        .build()
        .await?;
    for r in records {
        device.send(r)?;
    }
    device.flush(Duration::from_secs(120)).await?;
    let s = device.stats();
    println!(
        "{}: {} of {total} records stored in {} requests ({} refused)",
        args.id, s.records_acked, s.messages_sent, s.records_failed
    );
    device.close().await;
    Ok(())
}
