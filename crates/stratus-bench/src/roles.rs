//! The parts clients play: a counting subscriber, and publishers that burst (QoS 0), keep a
//! window of un-acknowledged messages (QoS 1/2), or pace themselves; the latency scenario's
//! two clients run on blocking threads of their own.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stratus_mqtt::{Packet, PacketId, QoS};

use crate::client::{check_suback, decode_frame, subscribe_packet, BlockingClient, Client};
use crate::progress::{Progress, Tally};
use crate::wire::{append_ack, kind, Ack, Batch, Template};

/// Bytes of pre-encoded QoS 0 PUBLISH packets written per syscall.
pub const BURST_BYTES: usize = 64 * 1024;

/// A subscriber that counts what it receives and acknowledges QoS 1/2 deliveries.
#[derive(Debug)]
pub struct Subscriber {
    client: Client,
    tally: Tally,
    progress: Arc<Progress>,
    subscribed: bool,
    filter: String,
}

impl Subscriber {
    /// Wraps a connected client.
    pub fn new(client: Client, tally: Tally, progress: Arc<Progress>) -> Subscriber {
        Subscriber {
            client,
            tally,
            progress,
            subscribed: false,
            filter: String::new(),
        }
    }

    /// Sends SUBSCRIBE; messages that arrive with or after the SUBACK are counted.
    pub async fn send_subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        self.filter = filter.to_owned();
        self.client
            .tx
            .extend_from_slice(&subscribe_packet(filter, qos)?);
        self.client.flush().await
    }

    /// Sends SUBSCRIBE and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        self.send_subscribe(filter, qos).await?;
        while !self.subscribed {
            self.pump().await?;
        }
        Ok(())
    }

    /// Receives until every expected message arrived (the caller bounds it in time).
    pub async fn run(mut self) -> anyhow::Result<Subscriber> {
        while !(self.subscribed && self.tally.complete()) {
            self.pump().await?;
        }
        Ok(self)
    }

    /// Closes the connection politely.
    pub async fn disconnect(self) {
        self.client.disconnect().await;
    }

    /// One read: count PUBLISHes, answer QoS 1/2, note the SUBACK, send the answers.
    async fn pump(&mut self) -> anyhow::Result<()> {
        if self.client.read().await? == 0 {
            bail!(
                "the broker closed a subscriber's connection after {} messages",
                self.tally.distinct()
            );
        }
        let now = self.progress.now_ns();
        let Client { rx, tx, .. } = &mut self.client;
        let tally = &mut self.tally;
        let subscribed = &mut self.subscribed;
        let filter = &self.filter;
        rx.frames(|frame| -> anyhow::Result<()> {
            match frame.kind() {
                kind::PUBLISH => {
                    let p = frame.publish()?;
                    tally.record(p.payload, now);
                    match p.qos {
                        0 => {}
                        1 => append_ack(tx, Ack::PubAck, p.packet_id),
                        2 => append_ack(tx, Ack::PubRec, p.packet_id),
                        q => bail!("PUBLISH with QoS {q}"),
                    }
                }
                kind::PUBREL => append_ack(tx, Ack::PubComp, frame.ack_id()?),
                kind::SUBACK => match decode_frame(&frame)? {
                    Packet::SubAck(ack) => {
                        check_suback(&ack, filter)?;
                        *subscribed = true;
                    }
                    other => bail!("expected SUBACK, got {}", other.name()),
                },
                kind::PINGRESP => {}
                k => bail!("unexpected packet type {k} sent to a subscriber"),
            }
            Ok(())
        })?;
        self.tally.flush(now);
        self.client.flush().await
    }
}

/// Writes `count` QoS 0 messages as fast as the socket takes them, [`BURST_BYTES`] per
/// write, then disconnects.
pub async fn burst(
    mut client: Client,
    template: Template,
    count: u32,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let mut batch = Batch::new(template, BURST_BYTES);
    let mut seq = 0u32;
    while seq < count {
        let n = batch.per_batch().min((count - seq) as usize);
        client.write_all(batch.fill(seq, n)).await?;
        progress.sent.fetch_add(n as u64, Relaxed);
        seq += n as u32;
    }
    client.disconnect().await;
    Ok(())
}

/// What a windowed publisher sends: the packet for sequence number `seq` with id `id`.
pub trait Source: Send {
    /// Appends the PUBLISH for `seq` to `out`.
    fn append(&mut self, out: &mut Vec<u8>, id: PacketId, seq: u32);
}

impl Source for Template {
    fn append(&mut self, out: &mut Vec<u8>, id: PacketId, seq: u32) {
        Template::append(self, out, id, seq, 0);
    }
}

/// Publishes `count` QoS 1 or 2 messages keeping at most `window` un-acknowledged (QoS 2:
/// until PUBCOMP), answering PUBREC with PUBREL; returns the client once all are acknowledged.
pub async fn windowed<S: Source>(
    mut client: Client,
    mut source: S,
    count: u32,
    qos: QoS,
    window: u16,
    progress: Arc<Progress>,
) -> anyhow::Result<Client> {
    const FREE: u8 = 0;
    const AWAIT_ACK: u8 = 1; // PUBACK (QoS 1) or PUBREC (QoS 2)
    const AWAIT_COMP: u8 = 2;
    if qos == QoS::AtMostOnce {
        bail!("a windowed publisher needs QoS 1 or 2");
    }
    let window = window.max(1);
    let mut state = vec![FREE; window as usize + 1];
    let mut free: Vec<PacketId> = (1..=window).rev().collect();
    let (mut next, mut done) = (0u32, 0u32);
    // Refill in batches: one write for a quarter of the window rather than one per
    // acknowledgement, which keeps the generator's syscalls per message low.
    let refill_at = (window as usize / 4).max(1);
    loop {
        let mut added = 0u64;
        let refill = free.len() >= refill_at || free.len() as u32 >= count - next;
        while refill && next < count {
            let Some(id) = free.pop() else { break };
            source.append(&mut client.tx, id, next);
            state[id as usize] = AWAIT_ACK;
            next += 1;
            added += 1;
        }
        client.flush().await?;
        progress.sent.fetch_add(added, Relaxed);
        if done == count {
            return Ok(client);
        }
        if client.read().await? == 0 {
            bail!(
                "the broker closed a publisher's connection after {done} of {count} acknowledgements"
            );
        }
        let Client { rx, tx, .. } = &mut client;
        rx.frames(|frame| -> anyhow::Result<()> {
            let k = frame.kind();
            if !matches!(k, kind::PUBACK | kind::PUBREC | kind::PUBCOMP) {
                bail!("unexpected packet type {k} sent to a publisher");
            }
            let id = frame.ack_id()?;
            let slot = state
                .get_mut(id as usize)
                .filter(|s| **s != FREE)
                .with_context(|| format!("acknowledgement for packet id {id} not in flight"))?;
            match (qos, k, *slot) {
                (QoS::AtLeastOnce, kind::PUBACK, AWAIT_ACK)
                | (QoS::ExactlyOnce, kind::PUBCOMP, AWAIT_COMP) => {
                    *slot = FREE;
                    free.push(id);
                    done += 1;
                }
                (QoS::ExactlyOnce, kind::PUBREC, AWAIT_ACK) => {
                    *slot = AWAIT_COMP;
                    append_ack(tx, Ack::PubRel, id);
                }
                // A repeated PUBREC while waiting for PUBCOMP: repeat the PUBREL.
                (QoS::ExactlyOnce, kind::PUBREC, AWAIT_COMP) => append_ack(tx, Ack::PubRel, id),
                _ => bail!("packet type {k} out of order for packet id {id}"),
            }
            Ok(())
        })?;
    }
}

/// Publishes `count` QoS 0 messages at `rate` per second from a blocking thread, one message
/// per write at its own due time (`seq / rate` after the start), each stamped with the clock
/// read just before its write. A sleep that overshoots delays only that message: the next
/// ones are due on the original schedule, so the rate holds.
pub fn paced_blocking(
    mut client: BlockingClient,
    template: Template,
    count: u32,
    rate: f64,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let t0 = Instant::now();
    for seq in 0..count {
        sleep_until(t0 + Duration::from_secs_f64(seq as f64 / rate));
        client.tx.clear();
        template.append(&mut client.tx, 0, seq, progress.now_ns());
        client.stream.write_all(&client.tx)?;
        progress.sent.fetch_add(1, Relaxed);
    }
    client.disconnect();
    Ok(())
}

/// Blocks the thread until `due`; returns at once when `due` has passed (a late message is
/// sent at once, and the ones after it keep their own due times).
pub fn sleep_until(due: Instant) {
    let wait = due.saturating_duration_since(Instant::now());
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

/// Receives QoS 0 PUBLISHes on a blocking thread until `tally` is complete or `stop` is set,
/// reading the clock as soon as each read returns; hands the client back to disconnect.
pub fn receive_blocking(
    mut client: BlockingClient,
    mut tally: Tally,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<BlockingClient> {
    client
        .stream
        .set_read_timeout(Some(Duration::from_millis(50)))?;
    while !tally.complete() && !stop.load(Relaxed) {
        match client.rx.read_blocking(&mut client.stream) {
            Ok(0) => bail!(
                "the broker closed a subscriber's connection after {} messages",
                tally.distinct()
            ),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        }
        let now = tally.now_ns();
        client.rx.frames(|frame| -> anyhow::Result<()> {
            match frame.kind() {
                kind::PUBLISH => tally.record(frame.publish()?.payload, now),
                kind::PINGRESP => {}
                k => bail!("unexpected packet type {k} sent to a subscriber"),
            }
            Ok(())
        })?;
        tally.flush(now);
    }
    Ok(client)
}
