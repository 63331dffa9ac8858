//! The conformance suite every backend must pass, written once against the traits.
//!
//! A backend's test calls [`run_all`] (or the per-kind functions) with a function that opens
//! its storage afresh: the same storage each time, so that what one handle committed the next
//! one must find, and empty at the start. Each check cleans up what it created, except the
//! audit log, which is append-only: [`run_audit`] wants an empty log, [`run_audit_tamper`],
//! [`run_audit_failures`] and [`run_audit_upgrade`] a storage of their own; the audit checks
//! expect the store to append with [`audit_key`]. [`check_aggregation`] compares one
//! aggregation against a naive computation, for property tests.
//!
//! The checks panic with a message naming what broke, like assertions in a test.

mod audit;
mod firmware;
mod jobs;
mod mqtt;
mod registry;
mod rules;
mod telemetry;

pub use audit::{audit_key, run_audit, run_audit_failures, run_audit_tamper, run_audit_upgrade};
pub use firmware::run_firmware;
pub use jobs::{run_group_commit, run_jobs};
pub use mqtt::run_mqtt;
pub use registry::{run_clients, run_devices};
pub use rules::run_rules;
pub use telemetry::{check_aggregation, run_series_quota, run_telemetry, AggregationCase};

use crate::devices::NewDevice;
use crate::{Store, StoreError};

/// Runs every check except the audit tamper and upgrade tests. `open` must return a new
/// handle on the same, initially empty, storage each time it is called, appending to the
/// audit log with [`audit_key`].
pub fn run_all<S: Store>(open: impl Fn() -> S) {
    run_mqtt(&open);
    run_devices(&open);
    run_clients(&open);
    run_telemetry(&open);
    run_jobs(&open);
    run_firmware(&open);
    run_audit(&open);
    run_rules(&open);
}

/// A device to register in checks.
pub(crate) fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: id.into(),
        secret_hash: format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$hash-of-{id}"),
        attributes: serde_json::json!({ "model": "t-1000" }),
        created_at_ms: 1_700_000_000_000,
    }
}

/// Panics unless `result` failed with an error `matches` accepts.
#[track_caller]
pub(crate) fn expect_err<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    what: &str,
    matches: impl Fn(&StoreError) -> bool,
) {
    match result {
        Err(e) if matches(&e) => {}
        other => panic!("{what}: got {other:?}"),
    }
}
