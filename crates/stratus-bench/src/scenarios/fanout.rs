//! Fan-out: one QoS 0 publisher → 100 subscribers of one topic.

use std::sync::Arc;
use std::time::Duration;

use stratus_mqtt::QoS;

use super::{Ctx, Extra};
use crate::client::{Client, BIG_RX, SMALL_RX};
use crate::group::{bounded, Group, TASKS};
use crate::progress::{Progress, Tally};
use crate::roles::{burst, Subscriber};
use crate::wire::{Stamp, Template};

/// Subscribers of the one topic.
pub const SUBSCRIBERS: u32 = 100;

/// Messages published at scale 1.
pub const MESSAGES: u64 = 10_000;

/// Runs fan-out.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let messages = ctx.scaled(MESSAGES);
    let topic = format!("bench/{:08x}/fanout", ctx.run);
    let (addr, run) = (ctx.addr, ctx.run);
    let ids: Arc<Vec<String>> = Arc::new(
        (0..SUBSCRIBERS as usize)
            .map(|i| ctx.client_id('f', i))
            .collect(),
    );
    let (p, t) = (progress.clone(), topic.clone());
    let subscribers = bounded(SUBSCRIBERS as usize, 16, move |i| {
        let (ids, progress, topic) = (ids.clone(), p.clone(), t.clone());
        async move {
            let client = Client::connect(addr, &ids[i], BIG_RX).await?;
            let tally = Tally::new(run, 1, messages, false, progress.clone());
            let mut sub = Subscriber::new(client, tally, progress);
            sub.subscribe(&topic, QoS::AtMostOnce).await?;
            Ok(sub)
        }
    })
    .await?;
    let publisher = Client::connect(ctx.addr, &ctx.client_id('p', 0), SMALL_RX).await?;
    let stamp = Stamp {
        run: ctx.run,
        stream: 0,
        seq: 0,
        sent_ns: 0,
    };
    let template = Template::publish(&topic, QoS::AtMostOnce, false, stamp)?;

    progress.begin();
    let subscribers = Group::spawn(subscribers.into_iter().map(|s| s.run()).collect(), TASKS);
    burst(publisher, template, messages, progress.clone()).await?;
    progress
        .drain(Duration::from_secs(1), || subscribers.is_finished())
        .await;
    progress.end();
    for sub in subscribers.finish_or_abort().await? {
        sub.disconnect().await;
    }
    Ok(Extra::default())
}
