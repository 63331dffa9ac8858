//! Shared counters of a running scenario, readable at any moment (so a timed-out scenario
//! still reports what it got), and the per-subscriber [`Tally`] that feeds them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::procfs;
use crate::wire::Stamp;

const UNSET: u64 = u64::MAX;

/// Counters of one scenario. Hot loops update them once per read or write batch.
#[derive(Debug)]
pub struct Progress {
    origin: Instant,
    broker_pid: Option<u32>,
    /// Messages (or connections) the scenario expects to see arrive.
    pub expected: AtomicU64,
    /// Messages written by publishers.
    pub sent: AtomicU64,
    /// Distinct expected messages received (or connections acknowledged).
    pub received: AtomicU64,
    /// Messages received again.
    pub duplicates: AtomicU64,
    /// Messages that are not this run's (other runs, other programs).
    pub strays: AtomicU64,
    /// Losses found after the fact (idle connections closed by the broker).
    pub lost_extra: AtomicU64,
    start_ns: AtomicU64,
    last_rx_ns: AtomicU64,
    end_ns: AtomicU64,
    cpu: Mutex<CpuWindow>,
    latencies_ns: Mutex<Vec<u64>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct CpuWindow {
    generator_start: Option<f64>,
    generator_end: Option<f64>,
    broker_start: Option<f64>,
    broker_end: Option<f64>,
}

/// Times and CPU seconds of the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// First message sent → last message received (or now, when nothing was received yet).
    pub throughput_secs: f64,
    /// `begin()` → `end()`: the window over which CPU time was read.
    pub cpu_window_secs: f64,
    /// The generator's CPU seconds in the CPU window.
    pub generator_cpu_secs: Option<f64>,
    /// The broker's CPU seconds in the CPU window.
    pub broker_cpu_secs: Option<f64>,
}

impl Progress {
    /// New counters; `broker_pid` is read for CPU time.
    pub fn new(expected: u64, broker_pid: Option<u32>) -> Arc<Progress> {
        Arc::new(Progress {
            origin: Instant::now(),
            broker_pid,
            expected: AtomicU64::new(expected),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            strays: AtomicU64::new(0),
            lost_extra: AtomicU64::new(0),
            start_ns: AtomicU64::new(UNSET),
            last_rx_ns: AtomicU64::new(UNSET),
            end_ns: AtomicU64::new(UNSET),
            cpu: Mutex::new(CpuWindow::default()),
            latencies_ns: Mutex::new(Vec::new()),
        })
    }

    /// Nanoseconds on the run's clock (one process, so publishers and subscribers share it).
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Starts the measured window: records the time and both processes' CPU time.
    pub fn begin(&self) {
        let generator = procfs::cpu_secs_self();
        let broker = self.broker_pid.and_then(procfs::cpu_secs);
        if let Ok(mut cpu) = self.cpu.lock() {
            cpu.generator_start = generator;
            cpu.broker_start = broker;
        }
        let _ = self
            .start_ns
            .compare_exchange(UNSET, self.now_ns(), Relaxed, Relaxed);
    }

    /// Ends the measured window (idempotent: the first call counts).
    pub fn end(&self) {
        if self
            .end_ns
            .compare_exchange(UNSET, self.now_ns(), Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        let generator = procfs::cpu_secs_self();
        let broker = self.broker_pid.and_then(procfs::cpu_secs);
        if let Ok(mut cpu) = self.cpu.lock() {
            cpu.generator_end = generator;
            cpu.broker_end = broker;
        }
    }

    /// Records that new messages arrived at `now_ns`.
    pub fn mark_received(&self, now_ns: u64) {
        let _ = self.last_rx_ns.fetch_update(Relaxed, Relaxed, |v| {
            (v == UNSET || v < now_ns).then_some(now_ns)
        });
    }

    /// Adds latency samples (ns).
    pub fn add_latencies(&self, samples: &[u64]) {
        if let Ok(mut all) = self.latencies_ns.lock() {
            all.extend_from_slice(samples);
        }
    }

    /// Every latency sample so far, in the order the subscribers handed them over.
    pub fn latencies(&self) -> Vec<u64> {
        self.latencies_ns
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Every latency sample so far, sorted.
    pub fn sorted_latencies(&self) -> Vec<u64> {
        let mut v = self.latencies();
        v.sort_unstable();
        v
    }

    /// Distinct messages received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Relaxed)
    }

    /// Whether every expected message has arrived.
    pub fn complete(&self) -> bool {
        self.received() >= self.expected.load(Relaxed)
    }

    /// Expected minus received, plus losses found after the fact.
    pub fn lost(&self) -> u64 {
        self.expected
            .load(Relaxed)
            .saturating_sub(self.received())
            .saturating_add(self.lost_extra.load(Relaxed))
    }

    /// The measured window as it stands.
    pub fn window(&self) -> Window {
        let now = self.now_ns();
        let start = match self.start_ns.load(Relaxed) {
            UNSET => now,
            s => s,
        };
        let end = match self.end_ns.load(Relaxed) {
            UNSET => now,
            e => e,
        };
        let last = match self.last_rx_ns.load(Relaxed) {
            UNSET => end,
            l => l,
        };
        let cpu = self.cpu.lock().map(|c| *c).unwrap_or_default();
        let diff = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0));
        Window {
            throughput_secs: last.saturating_sub(start) as f64 / 1e9,
            cpu_window_secs: end.saturating_sub(start) as f64 / 1e9,
            generator_cpu_secs: diff(cpu.generator_start, cpu.generator_end),
            broker_cpu_secs: diff(cpu.broker_start, cpu.broker_end),
        }
    }

    /// Waits until every expected message arrived, nothing new arrived for `settle`, or
    /// `give_up` says so (e.g. every receiver has ended).
    pub async fn drain(&self, settle: Duration, mut give_up: impl FnMut() -> bool) {
        let mut last = self.received();
        let mut since = Instant::now();
        loop {
            if self.complete() || give_up() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.received();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= settle {
                return;
            }
        }
    }
}

/// One subscriber's view of the messages it receives: a bit per expected message, so
/// duplicates and strays are told apart from new arrivals.
#[derive(Debug)]
pub struct Tally {
    run: u32,
    per_stream: u32,
    seen: Vec<Vec<u64>>,
    expected: u64,
    distinct: u64,
    batch_new: u64,
    batch_dup: u64,
    batch_stray: u64,
    latencies: Option<Vec<u64>>,
    progress: Arc<Progress>,
}

impl Tally {
    /// Expects `streams × per_stream` messages of run `run`; keeps latency samples when
    /// `latency` is set.
    pub fn new(
        run: u32,
        streams: u32,
        per_stream: u32,
        latency: bool,
        progress: Arc<Progress>,
    ) -> Tally {
        let words = (per_stream as usize).div_ceil(64);
        Tally {
            run,
            per_stream,
            seen: vec![vec![0u64; words]; streams as usize],
            expected: streams as u64 * per_stream as u64,
            distinct: 0,
            batch_new: 0,
            batch_dup: 0,
            batch_stray: 0,
            latencies: latency.then(Vec::new),
            progress,
        }
    }

    /// Counts one received payload; `now_ns` is the read's time on the run's clock.
    #[inline]
    pub fn record(&mut self, payload: &[u8], now_ns: u64) {
        let Some(stamp) = Stamp::read(payload) else {
            self.batch_stray += 1;
            return;
        };
        if stamp.run != self.run || stamp.seq >= self.per_stream {
            self.batch_stray += 1;
            return;
        }
        let Some(bits) = self.seen.get_mut(stamp.stream as usize) else {
            self.batch_stray += 1;
            return;
        };
        let (word, bit) = ((stamp.seq / 64) as usize, stamp.seq % 64);
        if bits[word] & (1 << bit) != 0 {
            self.batch_dup += 1;
            return;
        }
        bits[word] |= 1 << bit;
        self.batch_new += 1;
        if let Some(lat) = &mut self.latencies {
            lat.push(now_ns.saturating_sub(stamp.sent_ns));
        }
    }

    /// Publishes this batch's counts to the shared [`Progress`].
    pub fn flush(&mut self, now_ns: u64) {
        if self.batch_new > 0 {
            self.distinct += self.batch_new;
            self.progress.received.fetch_add(self.batch_new, Relaxed);
            self.progress.mark_received(now_ns);
            self.batch_new = 0;
        }
        if self.batch_dup > 0 {
            self.progress.duplicates.fetch_add(self.batch_dup, Relaxed);
            self.batch_dup = 0;
        }
        if self.batch_stray > 0 {
            self.progress.strays.fetch_add(self.batch_stray, Relaxed);
            self.batch_stray = 0;
        }
        if let Some(lat) = &mut self.latencies {
            if !lat.is_empty() {
                self.progress.add_latencies(lat);
                lat.clear();
            }
        }
    }

    /// The run's clock (see [`Progress::now_ns`]).
    pub fn now_ns(&self) -> u64 {
        self.progress.now_ns()
    }

    /// Whether this subscriber has every message it expects.
    pub fn complete(&self) -> bool {
        self.distinct >= self.expected
    }

    /// Distinct messages so far (flushed batches only).
    pub fn distinct(&self) -> u64 {
        self.distinct
    }
}

/// The `p`-th percentile (0–100) of sorted samples, nearest-rank.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(run: u32, stream: u32, seq: u32, sent_ns: u64) -> [u8; 64] {
        Stamp {
            run,
            stream,
            seq,
            sent_ns,
        }
        .payload()
    }

    #[test]
    fn tally_tells_new_duplicate_and_stray_apart() {
        let p = Progress::new(6, None);
        let mut t = Tally::new(9, 2, 3, true, p.clone());
        t.record(&payload(9, 0, 0, 100), 150);
        t.record(&payload(9, 0, 0, 100), 150); // duplicate
        t.record(&payload(9, 1, 2, 100), 300);
        t.record(&payload(8, 1, 1, 100), 150); // other run
        t.record(&payload(9, 2, 0, 100), 150); // no such stream
        t.record(&payload(9, 0, 3, 100), 150); // beyond the stream
        t.record(b"short", 150);
        t.flush(300);
        assert_eq!(p.received(), 2);
        assert_eq!(p.duplicates.load(Relaxed), 1);
        assert_eq!(p.strays.load(Relaxed), 4);
        assert_eq!(p.lost(), 4);
        assert_eq!(p.sorted_latencies(), [50, 200]);
        assert!(!t.complete());
        for (s, q) in [(0, 1), (0, 2), (1, 0), (1, 1)] {
            t.record(&payload(9, s, q, 0), 0);
        }
        t.flush(400);
        assert!(t.complete());
        assert!(p.complete());
        assert_eq!(p.lost(), 0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
    }

    #[test]
    fn window_runs_from_begin_to_last_arrival() {
        let p = Progress::new(1, None);
        p.begin();
        std::thread::sleep(Duration::from_millis(20));
        p.mark_received(p.now_ns());
        std::thread::sleep(Duration::from_millis(20));
        p.end();
        let w = p.window();
        assert!(w.throughput_secs >= 0.02 && w.throughput_secs < w.cpu_window_secs);
        assert!(w.generator_cpu_secs.is_some());
        assert!(w.broker_cpu_secs.is_none());
    }
}
