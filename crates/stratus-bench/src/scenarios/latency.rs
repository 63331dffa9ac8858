//! Latency: one QoS 0 publisher at 2,000 msg/s → one subscriber, send time in the payload.
//!
//! Both clients run on OS threads of their own with blocking sockets: the publisher writes
//! each message at its due time (one every 500 µs) and stamps it just before the write; the
//! subscriber reads the clock as soon as its read returns. No runtime sits between a socket
//! and the clock, so what the samples hold is the broker's delay plus the kernel's, not the
//! generator's task scheduling.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stratus_mqtt::QoS;

use super::{Ctx, Extra};
use crate::client::{Client, SMALL_RX};
use crate::progress::{Progress, Tally};
use crate::roles::{paced_blocking, receive_blocking};
use crate::wire::{Stamp, Template};

/// Messages per second.
pub const RATE: f64 = 2_000.0;

/// Messages at scale 1 (10 s at [`RATE`]).
pub const MESSAGES: u64 = 20_000;

/// Runs the latency scenario.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let messages = ctx.scaled(MESSAGES);
    let topic = format!("bench/{:08x}/latency", ctx.run);
    let mut subscriber = Client::connect(ctx.addr, &ctx.client_id('s', 0), 64 * 1024).await?;
    subscriber.subscribe(&topic, QoS::AtMostOnce).await?;
    let subscriber = subscriber.into_blocking()?;
    let tally = Tally::new(ctx.run, 1, messages, true, progress.clone());
    let publisher = Client::connect(ctx.addr, &ctx.client_id('p', 0), SMALL_RX)
        .await?
        .into_blocking()?;
    let stamp = Stamp {
        run: ctx.run,
        stream: 0,
        seq: 0,
        sent_ns: 0,
    };
    let template = Template::publish(&topic, QoS::AtMostOnce, false, stamp)?;

    progress.begin();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || receive_blocking(subscriber, tally, stop))
    };
    let sender = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || {
            paced_blocking(publisher, template, messages, RATE, progress)
        })
    };
    let sent = sender.await.context("the publisher thread panicked");
    progress
        .drain(Duration::from_secs(1), || receiver.is_finished())
        .await;
    progress.end();
    stop.store(true, Relaxed);
    let received = receiver.await.context("the subscriber thread panicked")?;
    sent??;
    received?.disconnect();
    Ok(Extra {
        notes: vec![format!(
            "{messages} messages at {RATE} msg/s, one per write; clients on blocking threads"
        )],
        ..Extra::default()
    })
}
