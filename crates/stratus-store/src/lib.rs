//! # stratus-store
//!
//! What Stratus keeps, behind one trait per kind of state, so that the embedded backend (one
//! SQLite file under the data dir) and the PostgreSQL backend of cluster mode are
//! interchangeable and pass one shared conformance suite ([`conformance`]).
//!
//! Today it holds the broker's durable state ([`MqttStore`]): retained messages and persistent
//! sessions with their subscriptions, queued and in-flight messages and inbound QoS 2 ids.
//!
//! ## The promise: acknowledged means durable
//! Changes are written in batches ([`MqttOp`]s) that commit atomically. [`GroupCommitter`] runs
//! one writer thread that gathers every batch submitted while the previous commit was syncing
//! into the next transaction, so many publishers share one `fsync`; each submitter gets a
//! completion it awaits before acknowledging its client. What completed survives `kill -9`.
//!
//! ## Dependencies
//! - `rusqlite` (with bundled SQLite): a proven embedded engine with WAL and
//!   `synchronous=FULL`; no server to install, one file to back up.
//! - `tokio` (`sync` only): the oneshot completions that async callers await; no runtime here.
//! - `bytes`: payloads are shared with the broker without copying until they are written.
//! - `thiserror`, `tracing`: errors and logs.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
pub mod group_commit;
pub mod mqtt;
pub mod sqlite;

pub use group_commit::{Completion, GroupCommitter};
pub use mqtt::{
    MqttOp, MqttSnapshot, MqttStore, StoredMessage, StoredRetained, StoredSession,
    StoredSubscription,
};
pub use sqlite::SqliteStore;

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
}
