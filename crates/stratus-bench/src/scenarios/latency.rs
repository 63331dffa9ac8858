//! Latency: one QoS 0 publisher at 2,000 msg/s → one subscriber, send time in the payload.

use std::sync::Arc;
use std::time::Duration;

use stratus_mqtt::QoS;

use super::{Ctx, Extra};
use crate::client::{Client, SMALL_RX};
use crate::group::Group;
use crate::progress::{Progress, Tally};
use crate::roles::{paced, Subscriber};
use crate::wire::{Stamp, Template};

/// Messages per second.
pub const RATE: f64 = 2_000.0;

/// Messages at scale 1 (10 s at [`RATE`]).
pub const MESSAGES: u64 = 20_000;

/// Runs the latency scenario.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let messages = ctx.scaled(MESSAGES);
    let topic = format!("bench/{:08x}/latency", ctx.run);
    let client = Client::connect(ctx.addr, &ctx.client_id('s', 0), 64 * 1024).await?;
    let tally = Tally::new(ctx.run, 1, messages, true, progress.clone());
    let mut sub = Subscriber::new(client, tally, progress.clone());
    sub.subscribe(&topic, QoS::AtMostOnce).await?;
    let publisher = Client::connect(ctx.addr, &ctx.client_id('p', 0), SMALL_RX).await?;
    let stamp = Stamp {
        run: ctx.run,
        stream: 0,
        seq: 0,
        sent_ns: 0,
    };
    let template = Template::publish(&topic, QoS::AtMostOnce, false, stamp)?;

    progress.begin();
    let subscribers = Group::spawn(vec![sub.run()], 1);
    paced(publisher, template, messages, RATE, progress.clone()).await?;
    progress
        .drain(Duration::from_secs(1), || subscribers.is_finished())
        .await;
    progress.end();
    for sub in subscribers.finish_or_abort().await? {
        sub.disconnect().await;
    }
    Ok(Extra {
        notes: vec![format!("{messages} messages at {RATE} msg/s")],
        ..Extra::default()
    })
}
