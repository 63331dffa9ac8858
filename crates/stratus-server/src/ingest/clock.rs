//! Receive times that never repeat: the server's clock for the records a device sends without
//! a time of their own.
//!
//! Points are keyed by `(series, millisecond)`, and a repeated key keeps the first value (so a
//! redelivered message is not counted twice). A record without `ts` or `date`/`time` gets the
//! receive time, so two such records of one device in one millisecond — the three records of
//! `[{"x":1},{"x":2},{"x":3}]`, or two MQTT publishes that arrive together — would share a key
//! and all but one would vanish. [`ReceiveClock`] gives each of them its own millisecond: per
//! device it remembers the last time it handed out, and a message's `k` records without a time
//! get `first, first + 1, …` with `first = max(now, last + 1)`, skipping any millisecond
//! that a record of the same message claims with its own time. It never gives one device the
//! same millisecond twice, so a server-assigned point can only meet a point that a device
//! dated itself in another message (first write wins; the 202 counts it as a duplicate).
//!
//! A device that sends more than 1000 records without a time per second pushes its clock
//! ahead of real time. The clock refuses a message ([`Ahead`]) that would take it more than
//! `max_lead_ms` ahead (the pipeline passes `[telemetry] max_future_skew_secs`, the bound on
//! how far ahead any time may be), so such a device is slowed down (HTTP 429 with
//! `Retry-After`) rather than given times in the future without limit; at the usual pace the
//! clock is simply `now`.
//!
//! Memory: one entry per device that was given a time, in 16 shards behind short locks; an
//! entry whose last time has passed says nothing any more (`now` is ahead of it), and such
//! entries are dropped by [`ReceiveClock::prune`] and whenever a shard grows past
//! [`SWEEP_AT`] entries. Time is an argument: the clock never reads one.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::Mutex;

use super::Message;

const SHARDS: usize = 16;

/// A shard drops its entries from the past when it would grow beyond this.
pub const SWEEP_AT: usize = 4096;

/// The clock would run more than the allowed lead ahead of real time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the device sent more records without a time than the server can give distinct \
     milliseconds (its receive clock would run {lead_ms} ms ahead, at most {max_lead_ms} ms \
     is allowed): give records a `ts`, or retry in {retry_after_ms} ms"
)]
pub struct Ahead {
    /// How far ahead the message would take the clock.
    pub lead_ms: i64,
    /// The most allowed.
    pub max_lead_ms: i64,
    /// When the message would fit.
    pub retry_after_ms: u64,
}

/// One shard: device id → the last receive time given to it.
type Shard = Mutex<HashMap<Box<str>, i64>>;

/// Per device, the last receive time handed out (see the [module docs](self)).
pub struct ReceiveClock {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

impl Default for ReceiveClock {
    fn default() -> Self {
        ReceiveClock {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl ReceiveClock {
    /// A clock that has handed out nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, device: &str) -> &Shard {
        let i = self.hasher.hash_one(device) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Gives every record of `message` that has no time of its own a receive time of
    /// `device` no earlier than `now_ms` and never given to `device` before, at most
    /// `max_lead_ms` ahead of `now_ms` (`None`: no bound). A refused message changes nothing.
    pub fn assign(
        &self,
        device: &str,
        now_ms: i64,
        message: &mut Message,
        max_lead_ms: Option<i64>,
    ) -> Result<(), Ahead> {
        if message.received_count() == 0 {
            return Ok(());
        }
        let mut shard = self.shard(device).lock();
        let first = match shard.get(device) {
            Some(&last) if last >= now_ms => last.saturating_add(1),
            _ => now_ms,
        };
        let Some(last) = message.assign_receive_times(first) else {
            return Ok(());
        };
        let lead_ms = last.saturating_sub(now_ms);
        if let Some(max_lead_ms) = max_lead_ms.filter(|max| lead_ms > *max) {
            return Err(Ahead {
                lead_ms,
                max_lead_ms,
                retry_after_ms: u64::try_from(lead_ms - max_lead_ms).unwrap_or(u64::MAX),
            });
        }
        if let Some(entry) = shard.get_mut(device) {
            *entry = last;
        } else {
            if shard.len() >= SWEEP_AT {
                shard.retain(|_, l| *l >= now_ms);
            }
            shard.insert(device.into(), last);
        }
        Ok(())
    }

    /// Drops the entries whose last time is before `now_ms` (they no longer matter).
    pub fn prune(&self, now_ms: i64) {
        for shard in self.shards.iter() {
            shard.lock().retain(|_, last| *last >= now_ms);
        }
    }

    /// How many devices have an entry (for tests and metrics).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no device has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{parse_json, Limits};

    const NOW: i64 = 1_700_000_000_000;

    fn message(body: &str) -> Message {
        parse_json(body.as_bytes(), &Limits::default(), NOW).unwrap()
    }

    fn times(m: &Message) -> Vec<i64> {
        m.records.iter().map(|r| r.ts_ms).collect()
    }

    #[test]
    fn records_without_a_time_get_consecutive_milliseconds() {
        let clock = ReceiveClock::new();
        let mut m = message(r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#);
        clock.assign("d", NOW, &mut m, None).unwrap();
        assert_eq!(times(&m), [NOW, NOW + 1, NOW + 2]);
    }

    #[test]
    fn two_messages_in_one_millisecond_never_share_a_time() {
        let clock = ReceiveClock::new();
        let mut a = message(r#"{"x": 1}"#);
        let mut b = message(r#"{"x": 2}"#);
        clock.assign("d", NOW, &mut a, None).unwrap();
        clock.assign("d", NOW, &mut b, None).unwrap();
        assert_eq!((times(&a), times(&b)), (vec![NOW], vec![NOW + 1]));
        // Another device has its own clock.
        let mut c = message(r#"{"x": 3}"#);
        clock.assign("e", NOW, &mut c, None).unwrap();
        assert_eq!(times(&c), [NOW]);
        // Once real time has passed the last one handed out, it is the receive time again.
        let mut d = message(r#"{"x": 4}"#);
        clock.assign("d", NOW + 50, &mut d, None).unwrap();
        assert_eq!(times(&d), [NOW + 50]);
    }

    #[test]
    fn receive_times_skip_times_the_message_claims_itself() {
        let clock = ReceiveClock::new();
        let body = format!(
            r#"[{{"x": 1}}, {{"ts": {}, "x": 2}}, {{"x": 3}}, {{"ts": {}, "y": 1}}]"#,
            NOW + 1,
            NOW - 5
        );
        let mut m = message(&body);
        clock.assign("d", NOW, &mut m, None).unwrap();
        assert_eq!(times(&m), [NOW, NOW + 1, NOW + 2, NOW - 5]);
    }

    #[test]
    fn messages_with_their_own_times_leave_the_clock_alone() {
        let clock = ReceiveClock::new();
        let mut m = message(&format!(r#"{{"ts": {NOW}, "x": 1}}"#));
        clock.assign("d", NOW, &mut m, Some(0)).unwrap();
        assert!(clock.is_empty());
    }

    #[test]
    fn the_lead_is_bounded_and_a_refusal_changes_nothing() {
        let clock = ReceiveClock::new();
        let three = || message(r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#);
        let mut m = three();
        clock.assign("d", NOW, &mut m, Some(4)).unwrap(); // NOW .. NOW+2
        let mut m = three();
        let e = clock.assign("d", NOW, &mut m, Some(4)).unwrap_err(); // would be NOW+3 .. NOW+5
        assert_eq!(
            e,
            Ahead {
                lead_ms: 5,
                max_lead_ms: 4,
                retry_after_ms: 1
            }
        );
        let mut m = message(r#"{"x": 9}"#);
        clock.assign("d", NOW, &mut m, Some(4)).unwrap();
        assert_eq!(times(&m), [NOW + 3], "the refused message took no times");
    }

    #[test]
    fn past_entries_are_pruned_and_swept() {
        let clock = ReceiveClock::new();
        for i in 0..100 {
            let mut m = message(r#"{"x": 1}"#);
            clock.assign(&format!("d{i}"), NOW, &mut m, None).unwrap();
        }
        assert_eq!(clock.len(), 100);
        clock.prune(NOW);
        assert_eq!(clock.len(), 100, "NOW is still theirs");
        clock.prune(NOW + 1);
        assert!(clock.is_empty());
        // A shard never holds more than SWEEP_AT entries for long.
        for i in 0..SWEEP_AT * SHARDS * 2 {
            let mut m = message(r#"{"x": 1}"#);
            clock
                .assign(&format!("d{i}"), NOW + i as i64, &mut m, None)
                .unwrap();
        }
        assert!(clock.len() <= SWEEP_AT * SHARDS);
    }
}
