//! Retained messages: store 10,000 on distinct topics (QoS 1), then time a fresh `r/#`
//! subscriber until all of them arrived; clear them afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_mqtt::{PacketId, QoS};

use super::{Ctx, Extra, WINDOW};
use crate::client::{Client, BIG_RX, SMALL_RX};
use crate::group::Group;
use crate::progress::{Progress, Tally};
use crate::report::{Better, Figure};
use crate::roles::{windowed, Source, Subscriber};
use crate::wire::{Stamp, Template};

/// Retained messages at scale 1.
pub const MESSAGES: u64 = 10_000;

/// One pre-encoded PUBLISH per sequence number (distinct topics), ids patched when sent.
struct PerTopic(Vec<Template>);

impl Source for PerTopic {
    fn append(&mut self, out: &mut Vec<u8>, id: PacketId, seq: u32) {
        self.0[seq as usize].append_with_id(out, id);
    }
}

/// Runs the retained scenario.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let n = ctx.scaled(MESSAGES);
    let topic = |i: u32| format!("r/{i}");
    let mut stored = Vec::with_capacity(n as usize);
    let mut cleared = Vec::with_capacity(n as usize);
    for i in 0..n {
        let stamp = Stamp {
            run: ctx.run,
            stream: 0,
            seq: i,
            sent_ns: 0,
        };
        stored.push(Template::publish(&topic(i), QoS::AtLeastOnce, true, stamp)?);
        cleared.push(Template::publish_payload(
            &topic(i),
            QoS::AtLeastOnce,
            true,
            &[],
        )?);
    }

    let publisher = Client::connect(ctx.addr, &ctx.client_id('r', 0), SMALL_RX).await?;
    let t0 = Instant::now();
    let publisher = windowed(
        publisher,
        PerTopic(stored),
        n,
        QoS::AtLeastOnce,
        WINDOW,
        progress.clone(),
    )
    .await?;
    let store_rate = n as f64 / t0.elapsed().as_secs_f64();

    let client = Client::connect(ctx.addr, &ctx.client_id('c', 0), BIG_RX).await?;
    let tally = Tally::new(ctx.run, 1, n, false, progress.clone());
    let mut sub = Subscriber::new(client, tally, progress.clone());
    progress.begin();
    sub.send_subscribe("r/#", QoS::AtLeastOnce).await?;
    let subscribers = Group::spawn(vec![sub.run()], 1);
    progress
        .drain(Duration::from_secs(3), || subscribers.is_finished())
        .await;
    progress.end();
    // Close the subscriber before clearing: it has stopped reading, and the clearing
    // messages would pile up for it (a broker may rightly disconnect it as too slow).
    let subscribed = match subscribers.finish_or_abort().await {
        Ok(subs) => {
            for sub in subs {
                sub.disconnect().await;
            }
            Ok(())
        }
        Err(e) => Err(e),
    };

    // Clear the retained messages so later runs start from an empty store.
    let publisher = windowed(
        publisher,
        PerTopic(cleared),
        n,
        QoS::AtLeastOnce,
        WINDOW,
        Progress::new(0, None),
    )
    .await?;
    publisher.disconnect().await;
    subscribed?;
    Ok(Extra {
        figures: vec![Figure::new(
            "store_rate",
            Some(store_rate),
            "msg/s",
            Better::Higher,
        )],
        notes: Vec::new(),
    })
}
