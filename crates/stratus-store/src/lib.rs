//! # stratus-store
//!
//! Everything Stratus keeps, behind one trait per kind of state, so that the embedded backend
//! (one SQLite file under the data dir) and the PostgreSQL backend of cluster mode are
//! interchangeable and pass one shared conformance suite ([`conformance`]).
//!
//! | state | trait | records |
//! | --- | --- | --- |
//! | broker | [`MqttStore`] | retained messages, persistent sessions (subscriptions, queued and in-flight messages, inbound QoS 2 ids) |
//! | registry | [`DeviceStore`] | devices: secret hash, attributes, desired (versioned) and reported config, firmware state, last seen |
//! | OAuth | [`ClientStore`] | applications and the admin (client id, secret hash, scopes); revoked token ids |
//! | telemetry | [`TelemetryStore`] | points `(device, key, ts, number/bool/text)`, per-minute rollups, retention rules |
//! | audit | [`AuditStore`] | an append-only log chained by HMAC-SHA-256 under a key kept outside the store; failed authentications beside it, committed to by the chain, pruned after a retention |
//! | rules | [`RuleStore`] | rule definitions (JSON, as the API accepted them) and alarms with their history |
//! | firmware | [`FirmwareStore`] | firmware metadata (images are files under `DATA_DIR/firmware/`), campaigns, each device's assignment, status history |
//!
//! [`Store`] is all of them together; [`SqliteStore`] implements it.
//!
//! ## The promise: acknowledged means durable
//! Every change is a [`Write`]. A *job* is a list of writes that applies atomically (all of it
//! or none of it): a telemetry batch with an unknown device or an over-long key stores nothing.
//! A backend applies many jobs in one transaction ([`WriteBackend::commit_jobs`]), each job
//! inside its own savepoint so that one job's failure (a conflict, say) does not fail the
//! others, and reports success only after the commit is durable (`fsync`ed; SQLite runs in WAL
//! mode with `synchronous=FULL`). What was reported as written survives `kill -9` and power
//! loss; what was not is either wholly there or wholly absent. Both properties are tested by
//! killing a child process mid-ingest (`tests/sqlite.rs`).
//!
//! ## Write path: group commit
//! [`GroupCommitter`] runs one writer thread. Everything submitted while the previous commit was
//! syncing becomes the next transaction, so N concurrent writers share one `fsync` instead of
//! paying N. Callers await a `tokio::sync::oneshot` completion. The broker submits
//! [`MqttOp`] batches (`submit`, `submit_detached`); everything else submits [`Write`] jobs
//! (`submit_writes`).
//!
//! ## Three ways to call the store
//! - **Async, for the server**: [`StoreHandle`]. Writes go through the group committer and are
//!   awaited; reads run on tokio's blocking pool (`spawn_blocking`) against the reader
//!   connections. A handle is cheap to clone; [`StoreHandle::committer`] is the committer the
//!   broker should submit its MQTT batches to, so the broker and the HTTP API share commits.
//! - **Sync, through the traits**: every trait method works directly on a backend (each write
//!   method is one transaction, one `fsync`). Right for tests, CLI tools (`stratus audit
//!   verify`) and start-up; from async code wrap it in `spawn_blocking`.
//! - **Raw jobs**: [`StoreHandle::write`] / [`GroupCommitter::submit_writes`] take a
//!   `Vec<Write>` that commits atomically, e.g. a telemetry batch together with the device's
//!   `last_seen`, or an admin change together with its audit entry.
//!
//! ## Reads do not wait for the writer
//! [`SqliteStore`] has one writer connection (behind a mutex; only the group committer and
//! direct sync writes use it) and a small pool of reader connections. WAL lets readers run
//! while the writer commits, so a read never waits for an `fsync`. A multi-statement read (an
//! aggregation, the latest values) runs in one read transaction: it sees one snapshot.
//!
//! ## Telemetry layout
//! - `series(id INTEGER PRIMARY KEY, device_id, key)`: each `(device, key)` interned once.
//! - `points(series_id, ts, num REAL, other) WITHOUT ROWID`, primary key `(series_id, ts)`:
//!   a range scan by (device, key, time) is one B-tree range; numbers go in `num`, booleans
//!   (as 0/1 integers) and strings in the untyped `other`, so `num` is never ambiguous.
//!   `(device, key, ts)` is a point's identity: storing a point whose identity is already
//!   stored is a no-op (first write wins), so a redelivered message is not counted twice.
//! - `rollup_1m(series_id, minute, n, total, lo, hi) WITHOUT ROWID` (count, sum, min, max of
//!   the numeric points of each minute), maintained in the same transaction as the points it
//!   summarises (only for points actually inserted).
//!
//! Aggregations ([`Agg`]: avg, min, max, sum, count; numeric points only) bucket time aligned to
//! the Unix epoch ([`telemetry::bucket_start`]). When the interval is a whole number of minutes,
//! the whole minutes of the range come from the rollups and only the partial minutes at its
//! edges from raw points, so the answer is exact for any range. Other intervals fold raw points
//! in Rust (one ordered range scan, no sort).
//!
//! Measured with `cargo run --release -p stratus-store --example ingest_bench` on the 2-core
//! development machine (shared with other builds, so figures vary between runs):
//! - durable ingest, batches of 1,000 points from 8 concurrent submitters: 0.51 to 0.97 million
//!   points/s, about 5.7 batches sharing each commit (one `fsync`);
//! - 10 million points of one series (one per second), average per one-minute bucket
//!   (166,667 buckets): 29 to 50 ms from the rollups, against 2.3 to 2.5 s for plain SQL
//!   `GROUP BY ts / 60000` (SQLite sorts through a temporary B-tree); intervals that are not
//!   whole minutes fold the 10 million raw points in 0.80 to 0.89 s.
//!
//! Retention ([`Retention`]) is a rule per series with fallbacks: `(device, key)`, then
//! `(device, any key)`, then `(any device, key)`, then the global default `(any, any)`; no rule
//! means keep forever. [`TelemetryStore::purge_telemetry`] deletes, per series, every whole
//! minute that ended before `now - retention` (minute granularity keeps the rollups exact).
//!
//! Purges and device deletions are single writes: they hold the writer while they delete
//! (about a second per few million points), so the server should purge often (every minute,
//! say) to keep each run small.
//!
//! ## Audit log
//! Each entry's hash is an HMAC-SHA-256, under a key the backend is given
//! ([`SqliteOptions::audit_key`]) and that is not stored with the data, over a length-prefixed
//! encoding of (seq, ts, actor, action, target, canonical JSON detail, previous hash)
//! ([`audit::entry_mac`]); entries written before a log was keyed keep their SHA-256 chain
//! ([`audit::entry_hash`]). The chain is extended inside the write transaction, which the
//! single writer serialises. [`AuditStore::check_audit`] recomputes it, optionally against
//! heads kept elsewhere that show a cut tail, and names the first entry that does not verify.
//! The [`audit`] module says what this protects against and what it does not. Failed
//! authentications are *failure entries* in a table beside the chain (`audit_failures`), each
//! batch committed to by one chain entry, pruned oldest first with the prune recorded in the
//! chain ([`audit::failures`]).
//!
//! ## Not kept here: freshness nonces
//! Replay protection remembers a device's nonces only for the freshness window (seconds), so
//! the server keeps them in memory. Storing them would cost a write per message for a window
//! shorter than a restart; after a restart, messages older than the window are rejected by
//! their `sent` time anyway.
//!
//! ## Dependencies
//! - `rusqlite` (with bundled SQLite): a proven embedded engine with WAL and
//!   `synchronous=FULL`; no server to install, one file to back up.
//! - `tokio` (`sync`, `rt`): the oneshot completions that async callers await, and
//!   `spawn_blocking` for the async read facade; no runtime is started here.
//! - `serde_json`: attributes, configurations, firmware state and audit details are JSON
//!   values end to end.
//! - `sha2`: SHA-256 for the unkeyed audit chain of older logs (RustCrypto, pure Rust, constant
//!   API since 0.10).
//! - `ring`: HMAC-SHA-256 for the keyed audit chain, with a constant-time tag comparison; the
//!   server already builds it for rustls, where RustCrypto's `hmac` would be a new dependency.
//! - `hex`: the lowercase hex the hashes are stored and shown in.
//! - `bytes`: payloads are shared with the broker without copying until they are written.
//! - `thiserror`, `tracing`: errors and logs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

pub mod audit;
pub mod clients;
pub mod conformance;
pub mod devices;
pub mod firmware;
pub mod group_commit;
pub mod handle;
pub mod mqtt;
pub mod rules;
pub mod sqlite;
pub mod telemetry;
pub mod write;

pub use audit::failures::{FailureEntry, NewFailureEntry};
pub use audit::{
    AuditCheck, AuditEntry, AuditHead, AuditKey, AuditStore, AuditVerdict, BrokenLink,
    BrokenReason, NewAuditEntry,
};
pub use clients::{ClientStore, OAuthClient};
pub use devices::{AttributeUpdate, DesiredConfig, Device, DeviceStore, NewDevice, ReportedConfig};
pub use firmware::{
    Assignment, Campaign, CampaignDevice, FirmwareEvent, FirmwareRecord, FirmwareStore,
    NewCampaign, FIRMWARE_STATES,
};
pub use group_commit::{CommitStats, Completion, GroupCommitter, WriteCompletion};
pub use handle::StoreHandle;
pub use mqtt::{
    MqttOp, MqttSnapshot, MqttStore, StoredMessage, StoredRetained, StoredSession,
    StoredSubscription,
};
pub use rules::{Alarm, AlarmFilter, AlarmQuery, AlarmState, RuleStore, StoredRule};
pub use sqlite::{SqliteOptions, SqliteStore};
pub use telemetry::{
    Agg, AggregateQuery, Bucket, LatestValue, Order, Point, PointPage, PointQuery, Retention,
    RetentionRule, TelemetryStore, TimedValue, Value,
};
pub use write::{JobResults, Output, Write, WriteBackend};

/// Everything Stratus keeps: the union of the per-kind traits. Implemented automatically by
/// every type that implements all of them.
pub trait Store:
    MqttStore
    + WriteBackend
    + DeviceStore
    + ClientStore
    + TelemetryStore
    + AuditStore
    + RuleStore
    + FirmwareStore
{
}

impl<T> Store for T where
    T: MqttStore
        + WriteBackend
        + DeviceStore
        + ClientStore
        + TelemetryStore
        + AuditStore
        + RuleStore
        + FirmwareStore
        + ?Sized
{
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The embedded database reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data on disk is not what this version of Stratus wrote.
    #[error("corrupt or incompatible data: {0}")]
    Corrupt(String),
    /// The writer thread is gone (the store is shutting down or crashed).
    #[error("store writer stopped")]
    WriterStopped,
    /// Creating the data directory or file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The record a write refers to does not exist (HTTP 404).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What kind of record: `device`, `client`.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A record with this id already exists (HTTP 409). Devices and OAuth clients share one
    /// id space, since both authenticate at the token endpoint.
    #[error("{kind} {id:?} already exists")]
    Conflict {
        /// What kind of record was being created: `device`, `client`.
        kind: &'static str,
        /// The id that is taken.
        id: String,
    },
    /// A compare-and-set found another version (HTTP 412 for `If-Match`).
    #[error("version mismatch: the current version is {current}")]
    VersionMismatch {
        /// The version now stored.
        current: u64,
    },
    /// The input breaks a rule of the store (HTTP 400); the text names the rule.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The write would take a record over a configured quota (e.g. series per device); the
    /// text names the quota. Nothing of the job was written.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The transaction this job shared with others failed to commit; nothing of it was written.
    #[error("commit failed: {0}")]
    CommitFailed(Arc<StoreError>),
    /// This backend or committer cannot do that.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A bug or a panic inside the store; nothing of the affected operation was written.
    #[error("internal: {0}")]
    Internal(String),
}

/// Largest length of a device or client id.
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` is a valid device or OAuth client id: `[A-Za-z0-9._-]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(crate) fn check_id(kind: &str, id: &str) -> Result<(), StoreError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{kind} id {:?} must match [A-Za-z0-9._-]{{1,64}}",
            truncate(id, 80)
        )))
    }
}

pub(crate) fn check_text(what: &str, value: &str, max_len: usize) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > max_len {
        return Err(StoreError::Invalid(format!(
            "{what} must be 1 to {max_len} bytes long (got {})",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{what} {:?} must not contain control characters",
            truncate(value, 80)
        )));
    }
    Ok(())
}

/// At most `max` bytes of `s`, cut at a character boundary (for error messages).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
