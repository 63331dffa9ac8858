//! Accepting sockets under pressure: the file-descriptor limit raised at start and shared out
//! between the listeners ([`FdBudget`]), and the back-off after a failed `accept`
//! ([`AcceptBackoff`]).
//!
//! Every connection is a file descriptor. Under the common default soft limit of 1024, a
//! flood of unfinished HTTP requests from one address used to take every fd, after which
//! `accept` failed on every listener (MQTT and `/healthz` included) and the accept loops
//! logged `Too many open files` every 50 ms. So `serve` raises the soft limit to the hard one,
//! and each connection cap is lowered, when needed, to a share of what remains once a reserve
//! is kept for the process's own files:
//!
//! ```text
//! L        = RLIMIT_NOFILE soft limit after raising it to the hard limit
//! reserve  = 128 + L/16       store files, firmware images being served, webhook sockets,
//!                             CoAP sockets, listeners, the runtime's own descriptors
//! usable   = L - reserve
//! MQTT     = 3/4 of usable    sockets of MQTT, MQTTS and WebSocket clients together; the
//!                             [mqtt] max_connections cap is at most 8/9 of it (less 16),
//!                             the rest are sockets over that cap waiting for their
//!                             CONNACK 0x03; beyond, a new socket is closed at accept
//! HTTP     = 1/4 of usable    split evenly between HTTP and HTTPS ([http] max_connections
//!                             per listener); one address gets at most a quarter of that
//! ```
//!
//! With L = 1024: 832 usable, MQTT 624 sockets (cap 536), HTTP 208 (104 each with TLS, 26
//! per address). With the usual systemd/container hard limit (524288 or more) the configured
//! caps apply unchanged.

use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit in force
/// afterwards (what it was when raising fails).
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // Linux refuses a soft limit above fs.nr_open (1048576 by default) even when the hard
    // limit is "unlimited".
    const UNLIMITED_TARGET: u64 = 1 << 20;
    let before = getrlimit(Resource::Nofile);
    let soft = before.current.unwrap_or(u64::MAX);
    let target = before.maximum.unwrap_or(UNLIMITED_TARGET);
    if soft >= target {
        tracing::info!(limit = soft, "file descriptor limit");
        return soft;
    }
    let raised = Rlimit {
        current: Some(target),
        maximum: before.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(from = soft, to = target, "raised the file descriptor limit");
            target
        }
        Err(e) => {
            tracing::warn!(limit = soft, hard = target, error = %e, "could not raise the file descriptor limit");
            soft
        }
    }
}

/// How the file descriptors under a limit are shared out (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft `RLIMIT_NOFILE` in force.
    pub limit: u64,
}

impl FdBudget {
    /// Descriptors kept for everything that is not a client connection.
    pub fn reserve(self) -> u64 {
        128 + self.limit / 16
    }

    fn usable(self) -> u64 {
        self.limit.saturating_sub(self.reserve())
    }

    fn clamp(configured: usize, share: u64) -> usize {
        let share = usize::try_from(share).unwrap_or(usize::MAX).max(1);
        configured.min(share)
    }

    /// Sockets all MQTT listeners may hold at once; beyond it a new one is closed at accept.
    pub fn mqtt_sockets(self) -> usize {
        Self::clamp(usize::MAX, self.usable() / 4 * 3)
    }

    /// The effective `[mqtt] max_connections` (CONNACK 0x03 beyond): `configured`, or less
    /// when [`mqtt_socket_cap`] of it would not fit [`mqtt_sockets`](Self::mqtt_sockets).
    pub fn mqtt_max_connections(self, configured: usize) -> usize {
        let sockets = self.mqtt_sockets();
        configured.min((sockets.saturating_sub(16) / 9 * 8).max(1))
    }

    /// The effective `[http] max_connections` of each of `listeners` HTTP listeners.
    pub fn http_max_connections(self, configured: usize, listeners: usize) -> usize {
        let listeners = u64::try_from(listeners.max(1)).unwrap_or(1);
        Self::clamp(configured, self.usable() / 4 / listeners)
    }

    /// The effective `[http] max_connections_per_address`: at most a quarter of the
    /// listener's cap, so one address never fills a listener.
    pub fn http_max_per_address(configured: usize, listener_cap: usize) -> usize {
        configured.min((listener_cap / 4).max(1))
    }
}

/// The MQTT sockets open at once beyond which a new one is closed at accept, for a
/// `max_connections` cap: an eighth more, and 16, wait for their CONNACK 0x03 (or their
/// connect timeout); a flood beyond that costs no descriptor.
pub fn mqtt_socket_cap(max_connections: usize) -> usize {
    max_connections
        .saturating_add(max_connections / 8)
        .saturating_add(16)
}

/// The pause after a failed `accept` (out of file descriptors, mostly): 10 ms, doubling up to
/// 1 s while failures go on, back to 10 ms after a success. One log line per 10 s at most,
/// with the number of failures in between; each failure is counted in
/// `stratus_accept_errors_total{listener}`.
pub struct AcceptBackoff {
    listener: &'static str,
    errors: Counter,
    delay: Duration,
    failures_since_log: u64,
    last_log: Option<Instant>,
}

const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    /// A back-off for `listener` (`http`, `mqtt`, …) counting failures in `metrics`.
    pub fn new(listener: &'static str, metrics: &crate::metrics::Metrics) -> AcceptBackoff {
        let errors = metrics
            .accept_errors
            .get_or_create(&crate::metrics::ListenerLabel { listener })
            .clone();
        AcceptBackoff {
            listener,
            errors,
            delay: FIRST_DELAY,
            failures_since_log: 0,
            last_log: None,
        }
    }

    /// Notes a successful accept.
    pub fn accepted(&mut self) {
        if self.delay != FIRST_DELAY {
            self.delay = FIRST_DELAY;
            if self.failures_since_log > 0 {
                tracing::info!(
                    listener = self.listener,
                    failures = self.failures_since_log,
                    "accepting again"
                );
                self.failures_since_log = 0;
            }
        }
    }

    /// Notes a failed accept and waits before the next one; false if `shutdown` turned true
    /// meanwhile.
    pub async fn failed(
        &mut self,
        error: &std::io::Error,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        self.errors.inc();
        self.failures_since_log += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                listener = self.listener,
                error = %error,
                failures = self.failures_since_log,
                retry_in_ms = self.delay.as_millis() as u64,
                "accept failed; backing off"
            );
            self.last_log = Some(now);
            self.failures_since_log = 0;
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(MAX_DELAY);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = crate::stopped(shutdown) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_headroom_under_small_limits() {
        let b = FdBudget { limit: 1024 };
        assert_eq!(b.reserve(), 192);
        assert_eq!(b.mqtt_sockets(), 624);
        assert_eq!(b.mqtt_max_connections(100_000), 536);
        assert!(mqtt_socket_cap(536) <= b.mqtt_sockets());
        assert_eq!(b.mqtt_max_connections(10), 10);
        assert_eq!(b.http_max_connections(10_000, 1), 208);
        assert_eq!(b.http_max_connections(10_000, 2), 104);
        assert_eq!(b.http_max_connections(50, 2), 50);
        assert_eq!(FdBudget::http_max_per_address(128, 104), 26);
        assert_eq!(FdBudget::http_max_per_address(4, 104), 4);
        // Everything fits: both HTTP listeners full and MQTT at its socket cap.
        let used = b.mqtt_sockets() as u64 + 2 * b.http_max_connections(10_000, 2) as u64;
        assert!(used + b.reserve() <= b.limit);
    }

    #[test]
    fn large_limits_keep_the_configured_caps() {
        let b = FdBudget { limit: 1 << 20 };
        assert_eq!(b.mqtt_max_connections(100_000), 100_000);
        assert_eq!(b.http_max_connections(10_000, 2), 10_000);
        assert_eq!(FdBudget::http_max_per_address(128, 10_000), 128);
    }

    #[test]
    fn tiny_limits_still_allow_a_connection() {
        let b = FdBudget { limit: 64 };
        assert_eq!(b.mqtt_max_connections(100_000), 1);
        assert_eq!(b.http_max_connections(10_000, 2), 1);
        assert_eq!(FdBudget::http_max_per_address(128, 1), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_doubles_to_a_second_and_resets() {
        let metrics = crate::metrics::Metrics::new();
        let mut b = AcceptBackoff::new("test", &metrics);
        let (_tx, mut rx) = watch::channel(false);
        let err = std::io::Error::from_raw_os_error(24);
        let mut waits = Vec::new();
        for _ in 0..9 {
            let t = tokio::time::Instant::now();
            assert!(b.failed(&err, &mut rx).await);
            waits.push(t.elapsed().as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.accepted();
        let t = tokio::time::Instant::now();
        b.failed(&err, &mut rx).await;
        assert_eq!(t.elapsed().as_millis(), 10);
        assert!(metrics
            .render()
            .contains("stratus_accept_errors_total{listener=\"test\"} 10"));
    }
}
