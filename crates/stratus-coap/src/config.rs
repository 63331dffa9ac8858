//! Endpoint configuration: the RFC 7252 §4.8 transmission parameters and the memory bounds.

use std::time::Duration;

/// RFC 7252 §4.8 `ACK_TIMEOUT`.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 7252 §4.8 `ACK_RANDOM_FACTOR`.
pub const ACK_RANDOM_FACTOR: f64 = 1.5;
/// RFC 7252 §4.8 `MAX_RETRANSMIT`.
pub const MAX_RETRANSMIT: u32 = 4;
/// RFC 7252 §4.8 `NSTART`.
pub const NSTART: usize = 1;
/// RFC 7252 §4.8.2 `EXCHANGE_LIFETIME` for the default parameters.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);
/// RFC 7252 §4.8.2 `NON_LIFETIME` for the default parameters.
pub const NON_LIFETIME: Duration = Duration::from_secs(145);

/// Everything an [`Endpoint`](crate::Endpoint) can be tuned with. `Config::default()` has the
/// RFC defaults and bounds that suit a small fleet; every cap evicts (oldest first) or refuses
/// rather than grows. Lifetimes and intervals may be at most a year.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Initial retransmission timeout of a CON (`ACK_TIMEOUT`, 2 s; at most 60 s).
    pub ack_timeout: Duration,
    /// The initial timeout is drawn from `[ack_timeout, ack_timeout × factor]` (1.5; 1–10).
    pub ack_random_factor: f64,
    /// Retransmissions of a CON before it fails (`MAX_RETRANSMIT`, 4; at most 20).
    pub max_retransmit: u32,
    /// Outstanding outgoing CONs per peer; more are queued (`NSTART`, 1, ≥ 1).
    pub nstart: usize,
    /// How long a CON's message ID is remembered for deduplication, and how long a request may
    /// wait for the application's response (`EXCHANGE_LIFETIME`, 247 s).
    pub exchange_lifetime: Duration,
    /// How long a NON's message ID is remembered (`NON_LIFETIME`, 145 s).
    pub non_lifetime: Duration,
    /// When the application has not answered a CON request within this time, an empty ACK is
    /// sent and the response later goes out as a separate CON (§5.2.2). `None`: only when the
    /// application calls [`Endpoint::defer`](crate::Endpoint::defer) (or a retransmission of
    /// the request arrives). Default 1 s, below the peer's first retransmission at ≥ 2 s.
    pub separate_response_after: Option<Duration>,
    /// Deduplication entries (received CON/NON message IDs with their cached replies).
    pub max_dedup_entries: usize,
    /// Peers with state (outgoing CONs in flight or queued, verified address).
    pub max_peers: usize,
    /// Requests delivered to the application and not yet answered; beyond this, requests are
    /// answered 5.03 Service Unavailable by the endpoint.
    pub max_pending_requests: usize,
    /// Outgoing CONs queued behind `nstart` per peer; beyond this the oldest queued one fails.
    pub max_queued_per_peer: usize,
    /// Observers in total; registrations beyond this are answered without Observe (not added).
    pub max_observers: usize,
    /// Every `observe_con_every`-th notification to an observer is confirmable (≥ 1; 1 makes
    /// all notifications CON), so dead observers are detected and removed (RFC 7641 §4.5).
    pub observe_con_every: u32,
    /// A notification is confirmable when the last CON one to that observer is this old
    /// (RFC 7641 §4.5: at least every 24 hours).
    pub observe_con_interval: Duration,
    /// Preferred Block1/Block2 size exponent: blocks of `2^(szx+4)` bytes (0–6; 6 = 1024).
    /// A client asking for smaller blocks gets them.
    pub block_szx: u8,
    /// Largest request body accepted, whole or reassembled from Block1 (4.13 with Size1 beyond).
    pub max_body_size: usize,
    /// Concurrent Block1 reassemblies; a new one evicts the one that would expire first.
    pub max_block1_transfers: usize,
    /// An unfinished Block1 transfer is dropped after this long without a block.
    pub block1_lifetime: Duration,
    /// Cached response bodies served to follow-up Block2 requests without asking the
    /// application again.
    pub max_block2_entries: usize,
    /// Total bytes of cached Block2 bodies.
    pub max_block2_bytes: usize,
    /// A cached Block2 body is dropped after this long without a block request (sliding).
    pub block2_lifetime: Duration,
    /// Amplification guard (RFC 7252 §11.3): the largest datagram sent in response to a peer
    /// that has not proven it owns its address; larger bodies are split into smaller Block2
    /// blocks so each response stays under the limit. A peer is verified by
    /// [`Endpoint::set_verified`](crate::Endpoint::set_verified) (the server does this after
    /// authentication) or by acknowledging a CON the endpoint sent. `None` (default): no limit.
    pub unverified_response_limit: Option<usize>,
    /// Token length for requests this endpoint sends (0–8, default 8).
    pub token_length: usize,
    /// Outgoing requests (client role) awaiting a response, observations included.
    pub max_client_requests: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ack_timeout: ACK_TIMEOUT,
            ack_random_factor: ACK_RANDOM_FACTOR,
            max_retransmit: MAX_RETRANSMIT,
            nstart: NSTART,
            exchange_lifetime: EXCHANGE_LIFETIME,
            non_lifetime: NON_LIFETIME,
            separate_response_after: Some(Duration::from_secs(1)),
            max_dedup_entries: 8192,
            max_peers: 4096,
            max_pending_requests: 1024,
            max_queued_per_peer: 32,
            max_observers: 4096,
            observe_con_every: 20,
            observe_con_interval: Duration::from_secs(24 * 60 * 60),
            block_szx: 6,
            max_body_size: 1024 * 1024,
            max_block1_transfers: 64,
            block1_lifetime: EXCHANGE_LIFETIME,
            max_block2_entries: 256,
            max_block2_bytes: 16 * 1024 * 1024,
            block2_lifetime: EXCHANGE_LIFETIME,
            unverified_response_limit: None,
            token_length: 8,
            max_client_requests: 1024,
        }
    }
}

/// A [`Config`] value the endpoint cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field is out of its range; the message names it.
    #[error("invalid CoAP config: {0}")]
    Invalid(&'static str),
}

impl Config {
    /// Checks the ranges documented on each field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Bounds on durations keep `Instant + Duration` far from overflow.
        let year = Duration::from_secs(365 * 24 * 60 * 60);
        let durations = [
            self.exchange_lifetime,
            self.non_lifetime,
            self.separate_response_after.unwrap_or_default(),
            self.observe_con_interval,
            self.block1_lifetime,
            self.block2_lifetime,
        ];
        let checks: [(bool, &'static str); 9] = [
            (
                self.ack_random_factor.is_finite()
                    && (1.0..=10.0).contains(&self.ack_random_factor),
                "ack_random_factor must be within 1..=10",
            ),
            (
                !self.ack_timeout.is_zero() && self.ack_timeout <= Duration::from_secs(60),
                "ack_timeout must be within (0, 60 s]",
            ),
            (
                durations.iter().all(|d| *d <= year),
                "lifetimes and intervals must be at most a year",
            ),
            (self.max_retransmit <= 20, "max_retransmit must be <= 20"),
            (self.nstart >= 1, "nstart must be >= 1"),
            (self.block_szx <= 6, "block_szx must be 0..=6"),
            (
                self.observe_con_every >= 1,
                "observe_con_every must be >= 1",
            ),
            (self.token_length <= 8, "token_length must be 0..=8"),
            (
                self.max_dedup_entries >= 1 && self.max_peers >= 1 && self.max_queued_per_peer >= 1,
                "max_dedup_entries, max_peers and max_queued_per_peer must be >= 1",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(ConfigError::Invalid(what)),
            None => Ok(()),
        }
    }
}
