//! Freshness (replay protection) of telemetry messages: a message carrying `sent` and
//! `nonce`, or any message of a device whose policy requires freshness, is refused when its
//! `sent` is more than the window T (default 10 s) from the server clock, or when the device
//! already used its `nonce` within T.
//!
//! # Reserve, then commit
//! [`FreshnessGuard::check`] does not remember a nonce outright: it *reserves* it and returns a
//! [`Reservation`]. While the reservation lives, the nonce counts as used, so two concurrent
//! messages with the same nonce cannot both pass (the check and the reservation happen under
//! one lock). [`Reservation::commit`] once the store has accepted the message keeps it for
//! the rest of its time; dropping the reservation instead (the store failed, a later check
//! refused the message) releases it, so a message rejected for another reason does not burn
//! its nonce and the device's retry is not mistaken for a replay.
//!
//! # How long, and how much
//! A nonce accepted at `now` with `sent` is remembered until `max(now, sent) + T` inclusive:
//! until then a replay still passes the `sent` window, afterwards the window refuses it. The
//! memory keeps a 64-bit keyed hash of each nonce (SipHash with a per-process random key), not
//! the nonce: about 50 bytes an entry whatever the nonce's length. A hash collision can only
//! refuse a genuine message as a replay (odds about n/2^64), never let a replay through.
//!
//! The memory is bounded by [`FreshnessConfig::max_per_device`] (default 1024 live nonces per
//! device, i.e. about 100 messages/s sustained with T = 10 s) and
//! [`FreshnessConfig::max_total`] (default 1 000 000, about 50 MB). When a bound is hit the
//! guard **refuses** the message ([`Replay::DeviceFull`], [`Replay::Full`]: a "retry later",
//! not a replay) rather than forget a live nonce, so a replay never slips through. Expired
//! entries are pruned when their device is checked and, per shard, swept at least once per
//! window while the shard is in use; [`FreshnessGuard::prune`] sweeps everything (for a timer).
//!
//! The memory is split into 16 shards by device id, each behind its own short
//! `parking_lot::Mutex`, so ingestion tasks on many threads rarely meet. Time is an argument
//! (`now_ms`, epoch milliseconds): the guard never reads a clock.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Message;

const SHARDS: usize = 16;

/// Freshness settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreshnessConfig {
    /// T: how far `sent` may be from the server clock, either way, and how long a nonce is
    /// remembered (default 10 000 ms).
    pub window_ms: u64,
    /// Most nonces remembered per device (default 1024).
    pub max_per_device: usize,
    /// Most nonces remembered in all (default 1 000 000).
    pub max_total: usize,
}

impl Default for FreshnessConfig {
    fn default() -> Self {
        FreshnessConfig {
            window_ms: 10_000,
            max_per_device: 1024,
            max_total: 1_000_000,
        }
    }
}

/// Why a message failed the freshness check. [`Replay::Missing`], [`Replay::Stale`] and
/// [`Replay::Reused`] are the contract's replay rejection (HTTP 409, CoAP 4.09, MQTT v5
/// 0x99); the capacity cases ([`Replay::is_capacity`]) mean "retry later" (HTTP 503,
/// CoAP 5.03, MQTT v5 0x97 quota exceeded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Replay {
    /// Freshness is required (or half given) and this field is missing.
    #[error("freshness required: the message has no `{field}`")]
    Missing {
        /// `"sent"` or `"nonce"`.
        field: &'static str,
    },
    /// `sent` is too far from the server clock.
    #[error("`sent` is {skew_ms} ms from the server clock, more than the {window_ms} ms allowed")]
    Stale {
        /// `now − sent`: positive when `sent` is in the past.
        skew_ms: i64,
        /// The window T.
        window_ms: u64,
    },
    /// The device used this nonce within the window.
    #[error("nonce already used by this device within the freshness window")]
    Reused,
    /// The device has [`FreshnessConfig::max_per_device`] live nonces.
    #[error("this device already has {max} nonces within the freshness window; retry later")]
    DeviceFull {
        /// The limit.
        max: usize,
    },
    /// The guard holds [`FreshnessConfig::max_total`] live nonces.
    #[error("the server's nonce memory is full; retry later")]
    Full,
}

impl Replay {
    /// True for the capacity refusals (not a replay; the message may be retried).
    pub fn is_capacity(&self) -> bool {
        matches!(self, Replay::DeviceFull { .. } | Replay::Full)
    }
}

/// The per-device nonce memory; cheap to clone (shared).
#[derive(Clone)]
pub struct FreshnessGuard {
    inner: Arc<Inner>,
}

struct Inner {
    config: FreshnessConfig,
    /// T as a non-negative i64.
    window: i64,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    /// Live entries over all shards (each an `Entry` and its `Slot`).
    total: AtomicUsize,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Shard {
    devices: HashMap<Box<str>, Memory>,
    next_sweep: i64,
}

/// One device's live nonces: `slots` to look up, `order` (oldest first) to expire. Every
/// entry of `order` has its slot (same hash and id) and vice versa.
#[derive(Default)]
struct Memory {
    order: VecDeque<Entry>,
    slots: HashMap<u64, Slot>,
}

struct Entry {
    expiry: i64,
    hash: u64,
    id: u64,
}

struct Slot {
    /// Live while `now <= expiry`.
    expiry: i64,
    /// Tells this reservation from a later one of the same nonce.
    id: u64,
}

impl Memory {
    /// Drops expired entries from the front, cheaply, on every check of the device.
    /// Expiries are nearly, not strictly, in order: an entry behind a longer-lived one waits
    /// for it or for the next sweep ([`Memory::prune_all`]), which only delays forgetting.
    fn prune(&mut self, now: i64, total: &AtomicUsize) {
        while let Some(front) = self.order.front() {
            if front.expiry >= now {
                break;
            }
            if self
                .slots
                .get(&front.hash)
                .is_some_and(|s| s.id == front.id)
            {
                self.slots.remove(&front.hash);
            }
            self.order.pop_front();
            total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops every expired entry, wherever it is queued.
    fn prune_all(&mut self, now: i64, total: &AtomicUsize) {
        let Memory { order, slots } = self;
        order.retain(|e| {
            if e.expiry >= now {
                return true;
            }
            if slots.get(&e.hash).is_some_and(|s| s.id == e.id) {
                slots.remove(&e.hash);
            }
            total.fetch_sub(1, Ordering::Relaxed);
            false
        });
    }

    /// Removes the entry of reservation `id` for `hash`, if it is still there.
    fn remove(&mut self, hash: u64, id: u64, total: &AtomicUsize) {
        match self.slots.get(&hash) {
            Some(slot) if slot.id == id => {}
            _ => return,
        }
        self.slots.remove(&hash);
        if let Some(pos) = self.order.iter().rposition(|e| e.id == id) {
            self.order.remove(pos);
        }
        total.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shard {
    /// Forgets every expired entry and every device left without one.
    fn sweep(&mut self, now: i64, window: i64, total: &AtomicUsize) {
        self.devices.retain(|_, memory| {
            memory.prune_all(now, total);
            !memory.order.is_empty()
        });
        self.next_sweep = now.saturating_add(window.max(1000));
    }
}

impl Default for FreshnessGuard {
    fn default() -> Self {
        FreshnessGuard::new(FreshnessConfig::default())
    }
}

impl fmt::Debug for FreshnessGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreshnessGuard")
            .field("config", &self.inner.config)
            .field("remembered", &self.len())
            .finish()
    }
}

impl FreshnessGuard {
    /// An empty memory with these settings.
    pub fn new(config: FreshnessConfig) -> Self {
        let window = i64::try_from(config.window_ms).unwrap_or(i64::MAX);
        FreshnessGuard {
            inner: Arc::new(Inner {
                config,
                window,
                hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                total: AtomicUsize::new(0),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The settings.
    pub fn config(&self) -> &FreshnessConfig {
        &self.inner.config
    }

    /// [`check`](Self::check) with the message's `sent` and `nonce`.
    pub fn check_message(
        &self,
        device_id: &str,
        message: &Message,
        require: bool,
        now_ms: i64,
    ) -> Result<Reservation, Replay> {
        self.check(
            device_id,
            message.sent,
            message.nonce.as_deref(),
            require,
            now_ms,
        )
    }

    /// Checks a message of `device_id` received at `now_ms`. A message with neither `sent`
    /// nor `nonce` passes unless `require` (the device's `require_freshness`) is set; one with
    /// only one of them is refused as [`Replay::Missing`]. Otherwise the message is refused
    /// when `|now − sent| > T`, when the device's nonce is live (used within T, or reserved by
    /// a message still in flight), or when the memory is full; if not, the nonce is reserved
    /// and the returned [`Reservation`] must be committed once the message is stored.
    pub fn check(
        &self,
        device_id: &str,
        sent: Option<i64>,
        nonce: Option<&str>,
        require: bool,
        now_ms: i64,
    ) -> Result<Reservation, Replay> {
        let (sent, nonce) = match (sent, nonce) {
            (Some(sent), Some(nonce)) => (sent, nonce),
            (None, None) if !require => return Ok(Reservation { pending: None }),
            (None, _) => return Err(Replay::Missing { field: "sent" }),
            (Some(_), None) => return Err(Replay::Missing { field: "nonce" }),
        };
        let inner = &*self.inner;
        if now_ms.abs_diff(sent) > inner.config.window_ms {
            return Err(Replay::Stale {
                skew_ms: now_ms.saturating_sub(sent),
                window_ms: inner.config.window_ms,
            });
        }
        let expiry = now_ms.max(sent).saturating_add(inner.window);
        let hash = inner.hasher.hash_one(nonce);
        let shard_index = inner.shard_of(device_id);
        let mut shard = inner.shards[shard_index].lock();
        if now_ms >= shard.next_sweep {
            shard.sweep(now_ms, inner.window, &inner.total);
        }
        if let Some(memory) = shard.devices.get_mut(device_id) {
            memory.prune(now_ms, &inner.total);
            if let Some(slot) = memory.slots.get(&hash) {
                if slot.expiry >= now_ms {
                    return Err(Replay::Reused);
                }
                // Expired, but still queued behind a longer-lived entry: forget it now.
                let id = slot.id;
                memory.remove(hash, id, &inner.total);
            }
            if memory.order.len() >= inner.config.max_per_device {
                return Err(Replay::DeviceFull {
                    max: inner.config.max_per_device,
                });
            }
        } else if inner.config.max_per_device == 0 {
            return Err(Replay::DeviceFull { max: 0 });
        }
        if !inner.take_slot() {
            // Full: sweep this shard early and try once more, then refuse, never forget.
            shard.sweep(now_ms, inner.window, &inner.total);
            if !inner.take_slot() {
                return Err(Replay::Full);
            }
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let memory = match shard.devices.get_mut(device_id) {
            Some(memory) => memory,
            None => shard.devices.entry(device_id.into()).or_default(),
        };
        memory.slots.insert(hash, Slot { expiry, id });
        memory.order.push_back(Entry { expiry, hash, id });
        drop(shard);
        Ok(Reservation {
            pending: Some(Pending {
                inner: self.inner.clone(),
                shard: shard_index,
                device: device_id.into(),
                hash,
                id,
            }),
        })
    }

    /// Forgets every expired nonce and every device left without one. Checks do this as
    /// they go; a periodic call also frees the memory of shards no message touches.
    pub fn prune(&self, now_ms: i64) {
        let inner = &*self.inner;
        for shard in &inner.shards {
            shard.lock().sweep(now_ms, inner.window, &inner.total);
        }
    }

    /// How many nonces are remembered or reserved (for metrics).
    pub fn len(&self) -> usize {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// True when no nonce is remembered or reserved.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn shard_of(&self, device_id: &str) -> usize {
        // The low bits of a SipHash are as good as any.
        (self.hasher.hash_one(device_id) % SHARDS as u64) as usize
    }

    /// Counts one more live entry if the global bound allows it.
    fn take_slot(&self) -> bool {
        self.total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.config.max_total).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, p: &Pending) {
        let mut shard = self.shards[p.shard].lock();
        if let Some(memory) = shard.devices.get_mut(&p.device) {
            memory.remove(p.hash, p.id, &self.total);
            if memory.order.is_empty() {
                shard.devices.remove(&p.device);
            }
        }
    }
}

/// A nonce reserved by [`FreshnessGuard::check`]: [`commit`](Self::commit) it once the
/// message is stored; dropping it uncommitted releases the nonce. Messages without freshness
/// fields get an empty reservation, so callers treat every message alike.
#[must_use = "commit the reservation once the message is stored; dropping it releases the nonce"]
pub struct Reservation {
    pending: Option<Pending>,
}

struct Pending {
    inner: Arc<Inner>,
    shard: usize,
    device: Box<str>,
    hash: u64,
    id: u64,
}

impl Reservation {
    /// Keeps the nonce for the rest of its window.
    pub fn commit(mut self) {
        self.pending = None;
    }

    /// Whether a nonce is held (false for messages without freshness fields).
    pub fn holds_nonce(&self) -> bool {
        self.pending.is_some()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.inner.release(&p);
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("holds_nonce", &self.holds_nonce())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: i64 = 10_000;

    /// Every entry has its slot and vice versa, and `total` counts them.
    fn assert_consistent(g: &FreshnessGuard) {
        let mut count = 0;
        for shard in &g.inner.shards {
            let shard = shard.lock();
            for memory in shard.devices.values() {
                assert_eq!(memory.order.len(), memory.slots.len());
                for e in &memory.order {
                    let slot = &memory.slots[&e.hash];
                    assert_eq!((slot.id, slot.expiry), (e.id, e.expiry));
                }
                count += memory.order.len();
            }
        }
        assert_eq!(count, g.len());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Check { device: u8, nonce: u8, skew: i64 },
        Commit(usize),
        Drop(usize),
        Advance(i64),
        Prune,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 0u8..4, -12_000i64..12_000)
                .prop_map(|(device, nonce, skew)| Op::Check { device, nonce, skew }),
            2 => any::<prop::sample::Index>().prop_map(|i| Op::Commit(i.index(usize::MAX))),
            1 => any::<prop::sample::Index>().prop_map(|i| Op::Drop(i.index(usize::MAX))),
            2 => (0i64..8_000).prop_map(Op::Advance),
            1 => Just(Op::Prune),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// The guard decides exactly as an unbounded model of the contract does.
        #[test]
        fn agrees_with_an_unbounded_model(ops in prop::collection::vec(op(), 1..80)) {
            let g = FreshnessGuard::default();
            let mut now = 1_000_000i64;
            // (device, nonce) -> (live until, reservation number)
            let mut model: HashMap<(u8, u8), (i64, usize)> = HashMap::new();
            let mut open: Vec<(usize, Reservation)> = Vec::new();
            let mut next = 0usize;
            for op in ops {
                match op {
                    Op::Check { device, nonce, skew } => {
                        let sent = now - skew;
                        let got = g.check(
                            &format!("d{device}"), Some(sent), Some(&format!("n{nonce}")), true, now,
                        );
                        let want = if skew.abs() > T {
                            Err("stale")
                        } else if model.get(&(device, nonce)).is_some_and(|&(until, _)| until >= now) {
                            Err("reused")
                        } else {
                            Ok(())
                        };
                        match (got, want) {
                            (Ok(r), Ok(())) => {
                                model.insert((device, nonce), (now.max(sent) + T, next));
                                open.push((next, r));
                                next += 1;
                            }
                            (Err(Replay::Stale { .. }), Err("stale")) => {}
                            (Err(Replay::Reused), Err("reused")) => {}
                            (got, want) => prop_assert!(false, "got {:?}, model says {:?}", got, want),
                        }
                    }
                    Op::Commit(i) if !open.is_empty() => {
                        let (_, r) = open.remove(i % open.len());
                        r.commit();
                    }
                    Op::Drop(i) if !open.is_empty() => {
                        let (n, r) = open.remove(i % open.len());
                        drop(r);
                        model.retain(|_, &mut (_, m)| m != n);
                    }
                    Op::Advance(ms) => now += ms,
                    Op::Prune => {
                        g.prune(now);
                        let live = model.values().filter(|&&(until, _)| until >= now).count();
                        prop_assert_eq!(g.len(), live);
                    }
                    _ => {}
                }
                assert_consistent(&g);
            }
            drop(open);
            assert_consistent(&g);
        }
    }

    #[test]
    fn empty_devices_are_forgotten() {
        let g = FreshnessGuard::default();
        let r = g.check("d", Some(0), Some("n"), false, 0).unwrap();
        drop(r);
        let shard = g.inner.shard_of("d");
        assert!(g.inner.shards[shard].lock().devices.is_empty());
        g.check("d", Some(0), Some("n"), false, 0).unwrap().commit();
        g.prune(T + 1);
        assert!(g.inner.shards[shard].lock().devices.is_empty());
        assert_consistent(&g);
    }

    #[test]
    fn zero_capacity_refuses_everything_with_freshness() {
        let g = FreshnessGuard::new(FreshnessConfig {
            max_per_device: 0,
            ..FreshnessConfig::default()
        });
        assert_eq!(
            g.check("d", Some(0), Some("n"), false, 0).unwrap_err(),
            Replay::DeviceFull { max: 0 }
        );
        assert!(g.check("d", None, None, false, 0).is_ok());
    }
}
