//! Request rates per key (a device id), counted in one-second windows with time as an
//! argument: `[telemetry] max_requests_per_sec` over HTTP and CoAP. A window costs a map
//! entry per active key; [`Rates::prune`] drops the keys that went quiet.

use std::collections::HashMap;

use parking_lot::Mutex;

/// Requests per second per key.
#[derive(Debug, Default)]
pub struct Rates {
    /// Requests allowed per second (0: no limit).
    max_per_sec: u32,
    windows: Mutex<HashMap<Box<str>, (u64, u32)>>,
}

impl Rates {
    /// At most `max_per_sec` requests per key per second (0: no limit).
    pub fn new(max_per_sec: u32) -> Rates {
        Rates {
            max_per_sec,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `key` at `now_ms`; `Err(ms)` when it is over the rate, with the
    /// time until the next window.
    pub fn admit(&self, key: &str, now_ms: u64) -> Result<(), u64> {
        if self.max_per_sec == 0 {
            return Ok(());
        }
        let second = now_ms / 1000;
        let mut windows = self.windows.lock();
        let w = match windows.get_mut(key) {
            Some(w) => w,
            None => windows.entry(key.into()).or_insert((second, 0)),
        };
        if w.0 != second {
            *w = (second, 0);
        }
        if w.1 >= self.max_per_sec {
            return Err(1000 - now_ms % 1000);
        }
        w.1 += 1;
        Ok(())
    }

    /// Forgets the keys not seen in the last second.
    pub fn prune(&self, now_ms: u64) {
        let second = now_ms / 1000;
        self.windows
            .lock()
            .retain(|_, (s, _)| second.saturating_sub(*s) <= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_rate_per_second() {
        let r = Rates::new(2);
        assert!(r.admit("a", 10_000).is_ok());
        assert!(r.admit("a", 10_100).is_ok());
        assert_eq!(r.admit("a", 10_250), Err(750));
        assert!(r.admit("b", 10_300).is_ok(), "another key has its own");
        assert!(r.admit("a", 11_000).is_ok(), "the next second");
        r.prune(13_000);
        assert!(r.windows.lock().is_empty());
        assert!(Rates::new(0).admit("a", 0).is_ok(), "0: no limit");
    }
}
