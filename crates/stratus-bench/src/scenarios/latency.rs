//! Latency: one QoS 0 publisher at 2,000 msg/s → one subscriber, send time in the payload.
//!
//! Both clients run on OS threads of their own with blocking sockets: the publisher writes
//! each message at its due time (one every 500 µs) and stamps it just before the write; the
//! subscriber reads the clock as soon as its read returns. No runtime sits between a socket
//! and the clock, so what the samples hold is the broker's delay plus the kernel's, not the
//! generator's task scheduling.
//!
//! Before the clients start, a probe measures the machine without a broker ([`direct_hop`]):
//! the same stamped write every 500 µs for as long as the run, from one blocking thread
//! straight to another over loopback TCP. A message through a broker makes two such hops;
//! on a shared virtual machine the hops' wake-ups move a broker's p99 more than its code
//! does, and the report carries them so that a reader can tell a quiet run from a contended
//! one.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use stratus_mqtt::QoS;

use super::{Ctx, Extra};
use crate::client::{Client, SMALL_RX};
use crate::progress::{percentile, Progress, Tally};
use crate::report::{Better, Figure};
use crate::roles::{paced_blocking, receive_blocking, sleep_until};
use crate::wire::{Stamp, Template};

/// Messages per second.
pub const RATE: f64 = 2_000.0;

/// Messages at scale 1 (10 s at [`RATE`]).
pub const MESSAGES: u64 = 20_000;

/// Messages of the direct-hop probe at scale 1: as long as the run (10 s). The host's stalls
/// come in clusters about 1.5 s apart here, so a half-second probe (its first length) missed
/// them as often as not and read a quiet p99 before a run whose p99 they set.
pub const PROBE_MESSAGES: u64 = MESSAGES;

/// The probe's interval: the publisher's (one message per 1 / [`RATE`] s).
const PROBE_INTERVAL: Duration = Duration::from_nanos((1e9 / RATE) as u64);

/// Runs the latency scenario.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let messages = ctx.scaled(MESSAGES);
    let probes = ctx.scaled(PROBE_MESSAGES);
    let direct = tokio::task::spawn_blocking(move || direct_hop(probes))
        .await
        .context("the probe thread panicked")?
        .context("the direct-hop probe")?;
    let probe_us = |p: f64| percentile(&direct, p).map(|ns| ns as f64 / 1000.0);
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
    if let Some(path) = &ctx.latency_samples {
        write_samples(path, &progress.latencies())
            .with_context(|| format!("writing the latency samples to {}", path.display()))?;
    }
    Ok(Extra {
        figures: vec![
            Figure::new("machine_hop_p50", probe_us(50.0), "us", Better::Lower),
            Figure::new("machine_hop_p99", probe_us(99.0), "us", Better::Lower),
        ],
        notes: vec![
            format!("{messages} messages at {RATE} msg/s, one per write; clients on blocking threads"),
            format!(
                "machine_hop: {probes} stamped writes, one per {} µs, thread to thread over loopback TCP without a broker, just before the run",
                PROBE_INTERVAL.as_micros()
            ),
        ],
    })
}

/// Writes `samples_ns` to `path` in µs, one per line, in the order given.
fn write_samples(path: &std::path::Path, samples_ns: &[u64]) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(samples_ns.len() * 8);
    for ns in samples_ns {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{:.1}", *ns as f64 / 1000.0);
    }
    std::fs::write(path, text)
}

/// Latencies in ns, sorted, of `count` 8-byte stamped writes, one per [`PROBE_INTERVAL`], from
/// this thread to another over a loopback TCP connection (`TCP_NODELAY`), the receiver
/// reading the clock as soon as its read returns: the scenario's measurement with no broker.
///
/// Every message through a broker makes this hop twice (publisher → broker → subscriber),
/// each with a wake-up of the receiving thread that the broker does not control.
pub fn direct_hop(count: u32) -> std::io::Result<Vec<u64>> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut tx = TcpStream::connect(listener.local_addr()?)?;
    let (mut rx, _) = listener.accept()?;
    tx.set_nodelay(true)?;
    let clock = Instant::now();
    let receiver = std::thread::spawn(move || -> std::io::Result<Vec<u64>> {
        let mut late = Vec::with_capacity(count as usize);
        let mut stamp = [0u8; 8];
        for _ in 0..count {
            rx.read_exact(&mut stamp)?;
            let now = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
            late.push(now.saturating_sub(u64::from_le_bytes(stamp)));
        }
        Ok(late)
    });
    for seq in 0..count {
        sleep_until(clock + PROBE_INTERVAL * seq);
        let sent = u64::try_from(clock.elapsed().as_nanos()).unwrap_or(u64::MAX);
        tx.write_all(&sent.to_le_bytes())?;
    }
    let mut late = receiver
        .join()
        .map_err(|_| std::io::Error::other("the probe's receiver panicked"))??;
    late.sort_unstable();
    Ok(late)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_direct_hop_probe_paces_its_writes_and_times_each_one() {
        let t = Instant::now();
        let late = direct_hop(20).unwrap();
        // Paced: the 20th write is due 19 intervals after the first.
        assert!(t.elapsed() >= PROBE_INTERVAL * 19);
        assert_eq!(late.len(), 20);
        assert!(late.windows(2).all(|w| w[0] <= w[1]));
        // A hop takes time, and far less than the run: every stamp was read back intact.
        assert!(late[0] > 0 && late[19] < 5_000_000_000, "{late:?}");
    }
}
