//! Fan-in: 16 (QoS 0/1) or 4 (QoS 2) publishers on `t/{i}` → one subscriber on `t/#`.

use std::sync::Arc;
use std::time::Duration;

use stratus_mqtt::QoS;

use super::{BoxFuture, Ctx, Extra, WINDOW};
use crate::client::{Client, BIG_RX, SMALL_RX};
use crate::group::{bounded, Group, TASKS};
use crate::progress::{Progress, Tally};
use crate::roles::{burst, windowed, Subscriber};
use crate::wire::{Stamp, Template};

/// Messages per publisher at scale 1.
pub const PER_PUBLISHER: u64 = 62_500;

/// Runs fan-in at `qos` with `publishers` publishers.
pub async fn run(
    ctx: Ctx,
    progress: Arc<Progress>,
    qos: QoS,
    publishers: u32,
) -> anyhow::Result<Extra> {
    let per = ctx.scaled(PER_PUBLISHER);
    let sub_client = Client::connect(ctx.addr, &ctx.client_id('s', 0), BIG_RX).await?;
    let tally = Tally::new(ctx.run, publishers, per, false, progress.clone());
    let mut sub = Subscriber::new(sub_client, tally, progress.clone());
    sub.subscribe("t/#", qos).await?;

    let addr = ctx.addr;
    let ids: Arc<Vec<String>> = Arc::new(
        (0..publishers as usize)
            .map(|i| ctx.client_id('p', i))
            .collect(),
    );
    let mut clients = bounded(publishers as usize, 16, move |i| {
        let ids = ids.clone();
        async move { Ok((i, Client::connect(addr, &ids[i], SMALL_RX).await?)) }
    })
    .await?;
    clients.sort_by_key(|(i, _)| *i);

    let mut publishers_futs: Vec<BoxFuture<()>> = Vec::new();
    for (i, client) in clients {
        let stamp = Stamp {
            run: ctx.run,
            stream: i as u32,
            seq: 0,
            sent_ns: 0,
        };
        let template = Template::publish(&format!("t/{i}"), qos, false, stamp)?;
        let progress = progress.clone();
        publishers_futs.push(match qos {
            QoS::AtMostOnce => Box::pin(burst(client, template, per, progress)),
            _ => Box::pin(async move {
                let client = windowed(client, template, per, qos, WINDOW, progress).await?;
                client.disconnect().await;
                Ok(())
            }),
        });
    }

    progress.begin();
    let subscribers = Group::spawn(vec![sub.run()], 1);
    Group::spawn(publishers_futs, TASKS).join().await?;
    let settle = if qos == QoS::AtMostOnce { 1 } else { 3 };
    progress
        .drain(Duration::from_secs(settle), || subscribers.is_finished())
        .await;
    progress.end();
    for sub in subscribers.finish_or_abort().await? {
        sub.disconnect().await;
    }
    Ok(Extra::default())
}
