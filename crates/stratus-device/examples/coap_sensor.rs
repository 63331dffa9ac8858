//! A CoAP sensor (RFC 7252 over UDP): a door contact and a light level, sent every
//! `interval_s` seconds (desired configuration, default 10), polled and reported over CoAP too.
//!
//! ```text
//! cargo run -p stratus-device --example coap_sensor -- \
//!     --server http://127.0.0.1:8080 --coap 127.0.0.1:5683 --id door-1 --secret SECRET
//! ```
//! The HTTP server is needed for the access token only; `--server`, `--id` and `--secret` may
//! also come from `STRATUS_SERVER`, `STRATUS_DEVICE_ID` and `STRATUS_DEVICE_SECRET`. With
//! `--coap coaps://127.0.0.1:5684` (a server with `[coap] dtls = true`) it runs over DTLS 1.2
//! PSK instead: the key is derived from the secret and no token is needed.

use std::time::Duration;

use clap::Parser;
use serde_json::json;
use stratus_device::{Device, Record, Transport};

#[derive(Parser)]
struct Args {
    /// The server's HTTP base URL (the token endpoint lives there).
    #[arg(long, env = "STRATUS_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The CoAP server: HOST:PORT, coap://HOST:PORT or coaps://HOST:PORT [default: the server's
    /// host, port 5683].
    #[arg(long, env = "STRATUS_COAP")]
    coap: Option<String>,
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
        .transport(Transport::Coap)
        .config_poll_interval(Duration::from_secs(10));
    if let Some(c) = &args.coap {
        builder = builder.coap(c.clone());
    }
    let device = builder.build().await?;
    let mut config = device.config_watch();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut sent = 0u64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let open = rand_bit(sent);
                let lux = 300.0 + 50.0 * ((sent as f64) / 6.0).sin();
                device.send(Record::new().with("door_open", open).with("lux", lux.round()))?;
                sent += 1;
                println!("{} reading {sent} ({:?})", args.id, device.status());
                if args.count > 0 && sent >= args.count {
                    break;
                }
            }
            Ok(()) = config.changed() => {
                let Some(desired) = config.borrow_and_update().clone() else { continue };
                let secs = desired
                    .get("interval_s")
                    .and_then(|v| v.as_f64())
                    .filter(|s| *s >= 0.1)
                    .unwrap_or(10.0);
                tick = tokio::time::interval(Duration::from_secs_f64(secs));
                println!("desired config v{}: every {secs} s", desired.version);
                device.report_config(json!({"interval_s": secs}))?;
            }
        }
    }
    device.flush(Duration::from_secs(20)).await?;
    println!("{:?}", device.stats());
    device.close().await;
    Ok(())
}

/// The door opens now and then.
fn rand_bit(n: u64) -> bool {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61 == 0
}
