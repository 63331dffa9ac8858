//! Observe (RFC 7641) helpers: sequence numbers and the client-side freshness rule (§3.4).
//!
//! The server side of Observe (observer registry, notifications, CON every N) lives in the
//! [`Endpoint`](crate::Endpoint); this module holds what both sides share.

use std::time::{Duration, Instant};

/// Observe values are 24-bit.
pub const SEQUENCE_MODULUS: u32 = 1 << 24;

/// Half the sequence space: a difference at or beyond this is taken as a wrap-around.
const HALF: u32 = 1 << 23;

/// How long a sequence number stays comparable (§3.4: 128 seconds).
pub const FRESHNESS_WINDOW: Duration = Duration::from_secs(128);

/// Whether a notification `(v2, t2)` is newer than an earlier-received `(v1, t1)` (RFC 7641
/// §3.4), where `v` are Observe values (24 bits; higher bits are ignored) and `t` the local
/// receive times:
///
/// `(V1 < V2 and V2 - V1 < 2^23) or (V1 > V2 and V1 - V2 > 2^23) or (T2 > T1 + 128 s)`.
///
/// A client keeps the freshest notification and discards older ones.
pub fn is_newer(v1: u32, t1: Instant, v2: u32, t2: Instant) -> bool {
    let (v1, v2) = (v1 % SEQUENCE_MODULUS, v2 % SEQUENCE_MODULUS);
    (v1 < v2 && v2 - v1 < HALF)
        || (v1 > v2 && v1 - v2 > HALF)
        || t2
            .checked_duration_since(t1)
            .is_some_and(|d| d > FRESHNESS_WINDOW)
}

/// The sequence number after `v`, wrapping at 2^24.
pub fn next_sequence(v: u32) -> u32 {
    (v + 1) % SEQUENCE_MODULUS
}
