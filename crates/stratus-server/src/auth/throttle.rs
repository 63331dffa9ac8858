//! Failed authentications back off, per source address and per claimed identity, in the
//! spirit of EMQX's flapping detection: a key's first `free_failures` failures within
//! `window_secs` cost nothing; each further one bans the key for `base_ban_ms` doubled per
//! failure, up to `max_ban_secs`. While a key is banned its attempts are refused before any
//! argon2 work (HTTP 429 + `Retry-After`, MQTT CONNACK 0x9F, CoAP 4.29 + Max-Age).
//!
//! A device whose secret already verified in this process is recognised by its cached digest
//! without argon2 and is not held back by a ban on its id, so guessing another client's
//! secret cannot lock the real one out of a running server; a valid access token is never
//! held back either (it costs a MAC): only invalid ones count, and are answered 429 instead
//! of 401 while their source is banned. The table is bounded
//! (`max_entries`): expired entries go first, then the oldest.
//!
//! Time is an argument (milliseconds), so the rules are tested without a clock.

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// `[auth.throttle]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Failures a key may have within the window before it is banned.
    pub free_failures: u32,
    /// How long failures are remembered, in seconds.
    pub window_secs: u64,
    /// The first ban, in milliseconds; each further failure doubles it.
    pub base_ban_ms: u64,
    /// The longest ban, in seconds.
    pub max_ban_secs: u64,
    /// Keys (addresses and identities) remembered at once.
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            free_failures: 10,
            window_secs: 60,
            base_ban_ms: 1000,
            max_ban_secs: 60,
            max_entries: 100_000,
        }
    }
}

/// What a failure or a ban is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    Identity(Box<str>),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// When the first failure of the window happened.
    since_ms: u64,
    /// Banned until then (0: not banned).
    until_ms: u64,
}

/// The longest identity kept as a key (longer claims are cut: they are not ids anyway).
const MAX_IDENTITY: usize = 128;

/// The failure table.
#[derive(Debug, Default)]
pub struct Throttle {
    config: ThrottleConfig,
    table: Mutex<HashMap<Key, Entry>>,
}

fn keys(source: Option<IpAddr>, identity: Option<&str>) -> impl Iterator<Item = Key> {
    let identity = identity.filter(|i| !i.is_empty()).map(|i| {
        let cut = i
            .char_indices()
            .nth(MAX_IDENTITY)
            .map_or(i, |(at, _)| &i[..at]);
        Key::Identity(cut.into())
    });
    source.map(Key::Address).into_iter().chain(identity)
}

impl Throttle {
    /// A throttle with `config`.
    pub fn new(config: ThrottleConfig) -> Throttle {
        Throttle {
            config,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(ms)` when the source or the identity is banned at `now_ms`, for how much longer.
    pub fn check(
        &self,
        source: Option<IpAddr>,
        identity: Option<&str>,
        now_ms: u64,
    ) -> Result<(), u64> {
        let table = self.table.lock();
        let wait = keys(source, identity)
            .filter_map(|k| table.get(&k))
            .map(|e| e.until_ms.saturating_sub(now_ms))
            .max()
            .unwrap_or(0);
        if wait > 0 {
            Err(wait)
        } else {
            Ok(())
        }
    }

    /// Records a failure of `identity` from `source` at `now_ms`; returns the ban it earned
    /// (milliseconds), if any.
    pub fn failed(
        &self,
        source: Option<IpAddr>,
        identity: Option<&str>,
        now_ms: u64,
    ) -> Option<u64> {
        let c = self.config;
        let window_ms = c.window_secs.saturating_mul(1000);
        let mut table = self.table.lock();
        let mut banned = None;
        for key in keys(source, identity) {
            if !table.contains_key(&key) && table.len() >= c.max_entries.max(1) {
                Self::make_room(&mut table, now_ms, window_ms, c.max_entries.max(1));
            }
            let e = table.entry(key).or_insert(Entry {
                failures: 0,
                since_ms: now_ms,
                until_ms: 0,
            });
            if now_ms.saturating_sub(e.since_ms) > window_ms && e.until_ms <= now_ms {
                // A quiet window since the last ban ended: start counting again.
                *e = Entry {
                    failures: 0,
                    since_ms: now_ms,
                    until_ms: 0,
                };
            }
            e.failures = e.failures.saturating_add(1);
            if e.failures > c.free_failures {
                let doublings = (e.failures - c.free_failures - 1).min(32);
                let ban = c
                    .base_ban_ms
                    .saturating_mul(1u64 << doublings)
                    .min(c.max_ban_secs.saturating_mul(1000));
                e.until_ms = now_ms.saturating_add(ban);
                // The window runs from the latest failure while banned.
                e.since_ms = now_ms;
                banned = Some(banned.map_or(ban, |b: u64| b.max(ban)));
            }
        }
        banned
    }

    /// Forgets the failures of `identity` (it just proved its credentials). The source's
    /// stay: one valid account must not launder an address's guesses.
    pub fn succeeded(&self, identity: &str) {
        if let Some(key) = keys(None, Some(identity)).next() {
            self.table.lock().remove(&key);
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.table.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the entries whose window and ban are over; when the table is still full of live
    /// ones, the oldest tenth (at least one) goes too.
    fn make_room(table: &mut HashMap<Key, Entry>, now_ms: u64, window_ms: u64, max: usize) {
        table.retain(|_, e| e.until_ms > now_ms || now_ms.saturating_sub(e.since_ms) <= window_ms);
        if table.len() >= max {
            let mut ages: Vec<u64> = table.values().map(|e| e.since_ms).collect();
            let cut = (ages.len() / 10).max(1).min(ages.len() - 1);
            let (_, &mut nth, _) = ages.select_nth_unstable(cut);
            table.retain(|_, e| e.since_ms > nth);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(ThrottleConfig {
            free_failures: 3,
            window_secs: 60,
            base_ban_ms: 1000,
            max_ban_secs: 8,
            max_entries: 100,
        })
    }

    const IP: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));

    #[test]
    fn free_failures_then_doubling_bans_up_to_the_maximum() {
        let t = throttle();
        let mut now = 1_000_000;
        for _ in 0..3 {
            assert_eq!(t.failed(IP, Some("dev"), now), None);
            assert!(t.check(IP, Some("dev"), now).is_ok());
        }
        let mut bans = Vec::new();
        for _ in 0..6 {
            bans.push(t.failed(IP, Some("dev"), now).unwrap_or(0));
            assert!(t.check(IP, Some("dev"), now).is_err());
            now += 100;
        }
        assert_eq!(bans, vec![1000, 2000, 4000, 8000, 8000, 8000]);
        // Banned keys are refused until the ban ends.
        assert_eq!(t.check(IP, None, now), Err(8000 - 100));
        assert!(t.check(IP, None, now + 8000).is_ok());
    }

    #[test]
    fn a_key_is_banned_alone_and_a_success_clears_only_the_identity() {
        let t = throttle();
        let other: Option<IpAddr> = Some([10, 0, 0, 2].into());
        for _ in 0..4 {
            t.failed(IP, Some("dev"), 0);
        }
        assert!(t.check(IP, Some("x"), 0).is_err(), "the address is banned");
        assert!(
            t.check(other, Some("dev"), 0).is_err(),
            "the identity is banned"
        );
        assert!(t.check(other, Some("y"), 0).is_ok(), "bystanders are not");
        t.succeeded("dev");
        assert!(t.check(other, Some("dev"), 0).is_ok());
        assert!(t.check(IP, None, 0).is_err(), "the address's guesses stay");
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_window() {
        let t = throttle();
        for _ in 0..3 {
            t.failed(IP, None, 0);
        }
        assert_eq!(t.failed(IP, None, 61_000), None, "a new window");
    }

    #[test]
    fn the_table_stays_bounded() {
        let t = throttle();
        for i in 0..10_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            t.failed(Some(ip), None, u64::from(i));
        }
        assert!(t.len() <= 100, "{} entries", t.len());
    }
}
