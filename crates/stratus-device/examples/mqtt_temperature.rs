//! An MQTT temperature sensor: samples every `interval_s` seconds (desired configuration,
//! default 5), reports the configuration it runs, and keeps unsent readings in a buffer file
//! across restarts.
//!
//! ```text
//! stratus serve &                                   # prints the admin secret
//! stratus device add sensor-1                       # prints the device secret
//! cargo run -p stratus-device --example mqtt_temperature -- \
//!     --server http://127.0.0.1:8080 --mqtt mqtt://127.0.0.1:1883 --id sensor-1 --secret SECRET
//! ```
//! `--server`, `--id` and `--secret` may also come from `STRATUS_SERVER`, `STRATUS_DEVICE_ID`
//! and `STRATUS_DEVICE_SECRET`.

use std::time::Duration;

use clap::Parser;
use serde_json::json;
use stratus_device::{Device, Record, Transport};

#[derive(Parser)]
struct Args {
    /// The server's HTTP base URL (the token endpoint lives there).
    #[arg(long, env = "STRATUS_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The MQTT broker [default: the server's host, port 1883].
    #[arg(long, env = "STRATUS_MQTT")]
    mqtt: Option<String>,
    /// Device id.
    #[arg(long, env = "STRATUS_DEVICE_ID")]
    id: String,
    /// Device secret.
    #[arg(long, env = "STRATUS_DEVICE_SECRET", hide_env_values = true)]
    secret: String,
    /// Stop after this many readings (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
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
    let mut builder = Device::builder(&args.server, &args.id, &args.secret)
        .transport(Transport::Mqtt)
        .buffer_file(format!("{}.buffer", args.id));
    if let Some(m) = &args.mqtt {
        builder = builder.mqtt(m.clone());
    }
    let device = builder.build().await?;
    let mut config = device.config_watch();
    let mut interval = Duration::from_secs(5);
    let mut tick = tokio::time::interval(interval);
    let mut sent = 0u64;
    let start = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                // A plausible room: 21 °C ± 1.5 over ten minutes.
                let phase = start.elapsed().as_secs_f64() / 600.0 * std::f64::consts::TAU;
                let celsius = 21.0 + 1.5 * phase.sin();
                device.send(Record::new().with("temperature", (celsius * 10.0).round() / 10.0))?;
                sent += 1;
                println!("{} reading {sent}: {celsius:.1} °C ({:?})", args.id, device.status());
                if args.count > 0 && sent >= args.count {
                    break;
                }
            }
            Ok(()) = config.changed() => {
                let Some(desired) = config.borrow_and_update().clone() else { continue };
                if let Some(s) = desired.get("interval_s").and_then(|v| v.as_f64()).filter(|s| *s >= 0.1) {
                    interval = Duration::from_secs_f64(s);
                    tick = tokio::time::interval(interval);
                }
                println!("desired config v{}: sampling every {interval:?}", desired.version);
                device.report_config(json!({"interval_s": interval.as_secs_f64()}))?;
            }
        }
    }
    if let Err(e) = device.flush(Duration::from_secs(10)).await {
        eprintln!("{e}; the rest stays in {}.buffer for the next run", args.id);
    }
    println!("{:?}", device.stats());
    device.close().await;
    Ok(())
}
