//! Failed authentications, aggregated before they reach the audit log.
//!
//! ## One entry per key and window, not one per attempt
//! Every transport reports a failed attempt to [`FailureLog::record`] (a bad bearer token, a
//! failed OAuth client authentication or dashboard sign-in, a refused MQTT CONNECT, a bad CoAP
//! token). The attempt is added to an in-memory table under the key (source address, claimed
//! identity or `-`, transport, endpoint, window); the endpoint is one of a fixed set
//! (`api`, `oauth/token`, `mqtt`, …), never a string the peer chose. A window is
//! `[audit] failure_window_secs` long (default a minute). Recording takes a short lock and
//! allocates only for a new key: no task, no channel, no store write per attempt.
//!
//! When a window ends, the flusher ([`FailureLog::run`]) takes its keys out of the table and
//! appends them as one batch ([`StoreHandle::append_failures`]): one failure entry per key,
//! action `auth.failure`, actor the claimed identity or `anonymous`, target the endpoint, and
//! detail `{"count", "throttled", "first", "last", "source", "remote", "transport", "reason"}`:
//! the attempts, how many of them the back-off answered (HTTP 429, MQTT 0x9F, CoAP 4.29;
//! counted, since a throttled attempt is still a failed login), the first and last attempt
//! (RFC 3339), the source address, the first attempt's address and port, and the first
//! attempt's reason. The store keeps the entries beside the hash chain, with one chain entry
//! per batch that commits to them and a retention (`stratus_store::audit::failures` argues the
//! design). At shutdown everything still in the table is written ([`FailureLog::flush_all`]),
//! after the connections closed.
//!
//! ## Bounded
//! The table holds at most `[audit] failure_max_keys` keys (default 10,000) across the windows
//! not yet written. An attempt that would need one more is counted in its window's *overflow
//! entry* instead (actor `*`, target `overflow`, `"overflow": true` in its detail, no source),
//! so the count of attempts stays exact and memory stays flat whatever the number of sources.
//! A batch the store refuses is logged with its size and dropped (retrying would let the table
//! grow while the store is failing).
//!
//! ## Retention
//! Every `min(retention / 2, 1 h)` (at least every second, and once at start) the flusher
//! prunes the failure entries of the batches older than `[audit] failure_retention_days`
//! ([`StoreHandle::prune_failures`]); 0 keeps them forever. The prune is itself a chain entry
//! (`audit.prune`), so `stratus audit verify` still verifies a pruned log and still reports a
//! failure entry deleted, changed or forged outside a prune.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use stratus_store::{NewFailureEntry, StoreError, StoreHandle};
use tokio::sync::watch;

use crate::api::devices::rfc3339_ms;

/// Default of `[audit] failure_window_secs`.
pub const DEFAULT_WINDOW_SECS: u64 = 60;
/// Default of `[audit] failure_max_keys`.
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// Default of `[audit] failure_retention_days`.
pub const DEFAULT_RETENTION_DAYS: f64 = 30.0;

/// Longest claimed identity kept, in bytes.
const MAX_IDENTITY: usize = 128;
/// Longest reason kept, in bytes.
const MAX_REASON: usize = 200;
/// The longest pause between prunes.
const MAX_PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long after a window's end its batch is written: a timer may fire a little early by the
/// wall clock, and the window must have ended by then.
const FLUSH_DELAY: Duration = Duration::from_millis(100);

/// One failed authentication, as a transport reports it.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// `http` (bearer tokens), `oauth` (client authentication), `mqtt` or `coap`.
    pub transport: &'static str,
    /// The endpoint: `api`, `oauth/token`, `dashboard/login`, `mqtt`, `coap`, `coaps`, ….
    pub target: &'static str,
    /// The peer's address and port, when known.
    pub remote: Option<SocketAddr>,
    /// The claimed identity (client id, user name, DTLS identity), if any.
    pub identity: Option<&'a str>,
    /// Why it failed.
    pub reason: &'a str,
    /// Whether the back-off answered it (429, 0x9F, 4.29) instead of an authentication error.
    pub throttled: bool,
}

/// How failures are aggregated and kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailureConfig {
    /// The aggregation window, in milliseconds (at least 1).
    pub window_ms: u64,
    /// Keys held at once across the windows not yet written (at least 1).
    pub max_keys: usize,
    /// How long failure entries are kept (`None`: forever).
    pub retention: Option<Duration>,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            window_ms: DEFAULT_WINDOW_SECS * 1000,
            max_keys: DEFAULT_MAX_KEYS,
            retention: retention_from_days(DEFAULT_RETENTION_DAYS),
        }
    }
}

/// `[audit] failure_retention_days` as a duration (`None` for 0: forever).
pub fn retention_from_days(days: f64) -> Option<Duration> {
    (days > 0.0).then(|| Duration::from_secs_f64(days * 86_400.0))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Option<IpAddr>,
    /// The sanitised identity (`None`: none claimed).
    identity: Option<Box<str>>,
    transport: &'static str,
    target: &'static str,
}

#[derive(Debug, Clone)]
struct Aggregate {
    count: u64,
    throttled: u64,
    first_ms: u64,
    last_ms: u64,
    reason: Box<str>,
    remote: Option<SocketAddr>,
}

impl Aggregate {
    fn new(now_ms: u64, f: &Failure<'_>) -> Aggregate {
        Aggregate {
            count: 0,
            throttled: 0,
            first_ms: now_ms,
            last_ms: now_ms,
            reason: sanitise(f.reason, MAX_REASON).into(),
            remote: f.remote,
        }
    }

    fn add(&mut self, now_ms: u64, throttled: bool) {
        self.count = self.count.saturating_add(1);
        self.throttled = self.throttled.saturating_add(u64::from(throttled));
        self.first_ms = self.first_ms.min(now_ms);
        self.last_ms = self.last_ms.max(now_ms);
    }
}

#[derive(Debug, Default)]
struct Window {
    keys: HashMap<Key, Aggregate>,
    overflow: Option<Aggregate>,
}

/// The aggregation table: pure, time as an argument (see the module docs).
#[derive(Debug)]
pub struct FailureTable {
    window_ms: u64,
    max_keys: usize,
    windows: BTreeMap<u64, Window>,
    keys: usize,
}

impl FailureTable {
    /// An empty table with `config`'s window and bound.
    pub fn new(config: &FailureConfig) -> FailureTable {
        FailureTable {
            window_ms: config.window_ms.max(1),
            max_keys: config.max_keys.max(1),
            windows: BTreeMap::new(),
            keys: 0,
        }
    }

    /// Adds an attempt made at `now_ms` (Unix epoch milliseconds).
    pub fn add(&mut self, now_ms: u64, f: &Failure<'_>) {
        let window = now_ms / self.window_ms;
        let key = Key {
            source: f.remote.map(|a| a.ip()),
            identity: f
                .identity
                .map(|i| sanitise(i, MAX_IDENTITY))
                .filter(|i| !i.trim().is_empty())
                .map(Into::into),
            transport: f.transport,
            target: f.target,
        };
        let full = self.keys >= self.max_keys;
        let w = self.windows.entry(window).or_default();
        let aggregate = match w.keys.get_mut(&key) {
            Some(a) => a,
            None if full => w.overflow.get_or_insert_with(|| Aggregate {
                reason: "more failing keys than [audit] failure_max_keys in this window: the \
                         rest are counted here"
                    .into(),
                remote: None,
                ..Aggregate::new(now_ms, f)
            }),
            None => {
                self.keys += 1;
                w.keys
                    .entry(key)
                    .or_insert_with(|| Aggregate::new(now_ms, f))
            }
        };
        aggregate.add(now_ms, f.throttled);
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.keys
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Takes out every window but the one `now_ms` is in (with `all`, that one too), as
    /// failure entries: by window, then by first attempt, each window's overflow entry last.
    pub fn take(&mut self, now_ms: u64, all: bool) -> Vec<NewFailureEntry> {
        let current = now_ms / self.window_ms;
        let mut taken = std::mem::take(&mut self.windows);
        if !all {
            if let Some(w) = taken.remove(&current) {
                self.windows.insert(current, w);
            }
        }
        self.keys = self.windows.values().map(|w| w.keys.len()).sum();
        let mut out = Vec::new();
        for (_, w) in taken {
            let mut keys: Vec<(Key, Aggregate)> = w.keys.into_iter().collect();
            keys.sort_by(|a, b| {
                (a.1.first_ms, &a.0.identity, a.0.target).cmp(&(
                    b.1.first_ms,
                    &b.0.identity,
                    b.0.target,
                ))
            });
            out.extend(keys.into_iter().map(|(k, a)| entry(&k, &a)));
            if let Some(a) = w.overflow {
                out.push(overflow_entry(&a));
            }
        }
        out
    }
}

fn ms(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

fn entry(k: &Key, a: &Aggregate) -> NewFailureEntry {
    NewFailureEntry {
        ts_ms: ms(a.first_ms),
        actor: k.identity.as_deref().unwrap_or("anonymous").to_string(),
        target: k.target.to_string(),
        detail: json!({
            "count": a.count,
            "throttled": a.throttled,
            "first": rfc3339_ms(ms(a.first_ms)),
            "last": rfc3339_ms(ms(a.last_ms)),
            "source": k.source.map(|s| s.to_string()),
            "remote": a.remote.map(|r| r.to_string()),
            "transport": k.transport,
            "reason": &*a.reason,
        }),
    }
}

fn overflow_entry(a: &Aggregate) -> NewFailureEntry {
    NewFailureEntry {
        ts_ms: ms(a.first_ms),
        actor: "*".into(),
        target: "overflow".into(),
        detail: json!({
            "count": a.count,
            "throttled": a.throttled,
            "first": rfc3339_ms(ms(a.first_ms)),
            "last": rfc3339_ms(ms(a.last_ms)),
            "source": null,
            "remote": null,
            "transport": "*",
            "reason": &*a.reason,
            "overflow": true,
        }),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, control characters replaced.
fn sanitise(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    out
}

/// The failure log: the table, and the store its batches go to.
pub struct FailureLog {
    config: FailureConfig,
    table: Mutex<FailureTable>,
    store: StoreHandle,
    /// One batch written at a time, in window order.
    writing: tokio::sync::Mutex<()>,
}

impl FailureLog {
    /// A log writing to `store`.
    pub fn new(store: StoreHandle, config: FailureConfig) -> FailureLog {
        FailureLog {
            table: Mutex::new(FailureTable::new(&config)),
            config,
            store,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Records a failed attempt made now. Never waits for the store.
    pub fn record(&self, failure: Failure<'_>) {
        let now = crate::persist::now_ms();
        self.table.lock().add(now, &failure);
    }

    /// Keys held now (for tests and metrics).
    pub fn pending_keys(&self) -> usize {
        self.table.lock().len()
    }

    /// Writes the windows that ended; returns the entries written.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        self.write(false).await
    }

    /// Writes everything held, the current window too (at shutdown, once the connections are
    /// closed); returns the entries written.
    pub async fn flush_all(&self) -> Result<usize, StoreError> {
        self.write(true).await
    }

    async fn write(&self, all: bool) -> Result<usize, StoreError> {
        let _one = self.writing.lock().await;
        let now = crate::persist::now_ms();
        let entries = self.table.lock().take(now, all);
        if entries.is_empty() {
            return Ok(0);
        }
        let n = entries.len();
        if let Some(o) = entries.iter().rev().find(|e| e.actor == "*") {
            tracing::warn!(
                attempts = %o.detail["count"],
                max_keys = self.config.max_keys,
                "more failing (source, identity) keys than [audit] failure_max_keys: the rest \
                 are counted in one overflow entry"
            );
        }
        match self.store.append_failures(ms(now), entries).await {
            Ok(batch) => {
                tracing::debug!(entries = n, seq = batch.seq, "failed logins written");
                Ok(n)
            }
            Err(e) => {
                tracing::error!(error = %e, entries = n, "could not write failed logins to the audit log; they are dropped");
                Err(e)
            }
        }
    }

    /// Deletes the failure entries older than the retention; returns how many.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let Some(retention) = self.config.retention else {
            return Ok(0);
        };
        let now = crate::persist::now_ms();
        let before = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let n = self.store.prune_failures(ms(before), ms(now)).await?;
        if n > 0 {
            tracing::info!(
                entries = n,
                before = %rfc3339_ms(ms(before)),
                "failure entries past [audit] failure_retention_days pruned"
            );
        }
        Ok(n)
    }

    /// How long until the window after the current one has begun, plus a margin.
    fn until_window_end(&self) -> Duration {
        let now = crate::persist::now_ms();
        let w = self.config.window_ms.max(1);
        Duration::from_millis(w - now % w) + FLUSH_DELAY
    }

    /// Writes each window's batch when it ends and prunes now and then, until `shutdown`; the
    /// final [`flush_all`](FailureLog::flush_all) is the caller's, after the last connection
    /// closed.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let prune_every = self
            .config
            .retention
            .map_or(MAX_PRUNE_EVERY, |r| r / 2)
            .clamp(Duration::from_secs(1), MAX_PRUNE_EVERY);
        let mut prune = tokio::time::interval(prune_every);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.until_window_end()) => {
                    // Errors are logged by write.
                    let _ = self.flush().await;
                }
                _ = prune.tick(), if self.config.retention.is_some() => {
                    if let Err(e) = self.prune().await {
                        tracing::error!(error = %e, "could not prune failure entries");
                    }
                }
                () = crate::stopped(&mut shutdown) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_store::{AuditStore, AuditVerdict, SqliteOptions};

    fn failure(port: u16, identity: Option<&str>) -> Failure<'_> {
        Failure {
            transport: "mqtt",
            target: "mqtt",
            remote: Some(SocketAddr::from(([192, 0, 2, 7], port))),
            identity,
            reason: "bad credentials",
            throttled: false,
        }
    }

    fn config(max_keys: usize) -> FailureConfig {
        FailureConfig {
            window_ms: 60_000,
            max_keys,
            retention: None,
        }
    }

    #[test]
    fn attempts_are_one_entry_per_key_and_window() {
        let mut t = FailureTable::new(&config(100));
        let base = 1_700_000_080_000; // 40 s into a minute
        for i in 0..1000u64 {
            // Every connection has its own port; the key is the address.
            let mut f = failure(40_000 + (i % 500) as u16, Some("mallory"));
            f.throttled = i >= 10;
            t.add(base + i, &f);
        }
        t.add(base, &failure(1, None));
        t.add(base + 1, &failure(1, Some("eve\n")));
        assert_eq!(t.len(), 3);
        assert!(t.take(base + 5_000, false).is_empty(), "the window is open");
        let next = base + 20_000; // the next minute
        t.add(next, &failure(2, Some("mallory")));
        let entries = t.take(next, false);
        assert_eq!(entries.len(), 3);
        assert_eq!(t.len(), 1, "the new window stays");
        let m = entries.iter().find(|e| e.actor == "mallory").unwrap();
        assert_eq!(m.target, "mqtt");
        assert_eq!(m.ts_ms, base as i64);
        assert_eq!(m.detail["count"], 1000);
        assert_eq!(m.detail["throttled"], 990);
        assert_eq!(m.detail["source"], "192.0.2.7");
        assert_eq!(m.detail["remote"], "192.0.2.7:40000");
        assert_eq!(m.detail["transport"], "mqtt");
        assert_eq!(m.detail["reason"], "bad credentials");
        assert_eq!(m.detail["first"], "2023-11-14T22:14:40.000Z");
        assert_eq!(m.detail["last"], "2023-11-14T22:14:40.999Z");
        assert!(entries.iter().any(|e| e.actor == "anonymous"));
        assert!(entries.iter().any(|e| e.actor == "eve?"));
        let rest = t.take(next, true);
        assert_eq!(rest.len(), 1, "at shutdown the open window goes too");
        assert!(t.is_empty());
    }

    #[test]
    fn beyond_max_keys_attempts_are_counted_in_one_overflow_entry() {
        let mut t = FailureTable::new(&config(10));
        let ids: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            t.add(1_000 + i as u64, &failure(1, Some(id)));
        }
        assert_eq!(t.len(), 10);
        let entries = t.take(1_000_000, false);
        assert_eq!(entries.len(), 11);
        let overflow = entries.last().unwrap();
        assert_eq!(
            (&overflow.actor[..], &overflow.target[..]),
            ("*", "overflow")
        );
        assert_eq!(overflow.detail["count"], 990);
        assert_eq!(overflow.detail["overflow"], true);
        let total: u64 = entries
            .iter()
            .map(|e| e.detail["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 1000, "every attempt is counted once");
        // Taken out, the keys free room for the next window.
        t.add(2_000_000, &failure(1, Some("late")));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn identities_and_reasons_are_cut_and_cleaned() {
        let mut t = FailureTable::new(&config(10));
        let long = "x".repeat(1000);
        let mut f = failure(1, Some(&long));
        f.reason = &long;
        t.add(0, &f);
        t.add(1, &failure(1, Some("  ")));
        t.add(2, &failure(1, Some(&"é".repeat(100))));
        let entries = t.take(0, true);
        assert_eq!(entries[0].actor.len(), MAX_IDENTITY);
        assert_eq!(entries[2].actor.len(), 128, "cut at a character boundary");
        assert_eq!(
            entries[0].detail["reason"].as_str().unwrap().len(),
            MAX_REASON
        );
        assert_eq!(entries[1].actor, "anonymous");
    }

    #[tokio::test]
    async fn batches_are_written_verified_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::audit::open_audit_key(dir.path()).unwrap();
        let db = dir.path().join(crate::persist::DATABASE_FILE);
        let options = SqliteOptions {
            audit_key: Some(key),
            ..SqliteOptions::default()
        };
        let store = StoreHandle::open_sqlite_with(&db, &options).unwrap();
        let log = FailureLog::new(
            store.clone(),
            FailureConfig {
                retention: Some(Duration::from_millis(1)),
                ..config(100)
            },
        );
        for i in 0..1000u16 {
            log.record(failure(i, if i % 2 == 0 { Some("a") } else { None }));
        }
        assert_eq!(log.flush_all().await.unwrap(), 2);
        assert_eq!(log.flush_all().await.unwrap(), 0);
        let listed = store.list_audit_failures(0, 100).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            listed
                .iter()
                .map(|e| e.detail["count"].as_u64().unwrap())
                .sum::<u64>(),
            1000
        );
        let chain = store.list_audit(1, 100).await.unwrap();
        assert_eq!(chain.len(), 1, "one chain entry for the batch");
        assert_eq!(chain[0].action, "auth.failures");
        assert_eq!(chain[0].detail["attempts"], 1000);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(log.prune().await.unwrap(), 2);
        assert!(store.list_audit_failures(0, 100).await.unwrap().is_empty());
        assert!(matches!(
            store.verify_audit().await.unwrap(),
            AuditVerdict::Intact { entries: 2, .. }
        ));
        drop(store);
        let direct = stratus_store::SqliteStore::open_with(&db, &options).unwrap();
        assert_eq!(direct.list_audit(2, 1).unwrap()[0].action, "audit.prune");
    }
}
