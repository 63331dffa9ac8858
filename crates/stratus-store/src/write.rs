//! The write side every backend implements: [`Write`]s grouped into atomic jobs, many jobs per
//! durable commit ([`WriteBackend::commit_jobs`]).

use std::time::Duration;

use serde_json::Value as Json;

use crate::audit::failures::NewFailureEntry;
use crate::audit::{AuditEntry, NewAuditEntry};
use crate::clients::OAuthClient;
use crate::devices::{AttributeUpdate, DesiredConfig, Device, NewDevice, ReportedConfig};
use crate::firmware::{FirmwareRecord, NewCampaign};
use crate::mqtt::MqttOp;
use crate::rules::{Alarm, StoredRule};
use crate::telemetry::{Point, Retention};
use crate::StoreError;

/// One change to what Stratus keeps. A job (`Vec<Write>`) applies atomically.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Write {
    /// A batch of broker state changes.
    Mqtt(Vec<MqttOp>),
    /// Register a device ([`StoreError::Conflict`] when the id is taken by a device or client).
    /// Output: [`Output::Device`].
    CreateDevice(NewDevice),
    /// Replace or merge-patch a device's attributes. Output: [`Output::Device`].
    UpdateAttributes {
        /// Device id.
        id: String,
        /// How to change them.
        update: AttributeUpdate,
    },
    /// Turn a device's own freshness (replay) requirement on or off. Output:
    /// [`Output::Device`].
    SetRequireFreshness {
        /// Device id.
        id: String,
        /// Whether its messages must carry `sent` and `nonce`.
        on: bool,
    },
    /// Replace a device's secret hash (rotation). Output: [`Output::Done`].
    SetDeviceSecret {
        /// Device id.
        id: String,
        /// The new argon2 hash string (PHC format), computed by the caller.
        secret_hash: String,
    },
    /// Set (or, with `None`, clear) a device's sealed CoAPS pre-shared key: opaque bytes the
    /// server sealed (the store never sees the key in clear). Output: [`Output::Done`].
    SetCoapPsk {
        /// Device id.
        id: String,
        /// The sealed key, or `None` to remove it.
        sealed: Option<Vec<u8>>,
    },
    /// Delete a device with its telemetry and its retention rules (the writer is busy for as
    /// long as deleting its points takes). Output: [`Output::Done`].
    DeleteDevice {
        /// Device id.
        id: String,
    },
    /// Set the desired configuration; with `expected_version`, only if it is still the current
    /// one ([`StoreError::VersionMismatch`] otherwise). Output: [`Output::Desired`].
    PutDesiredConfig {
        /// Device id.
        id: String,
        /// The new configuration.
        value: Json,
        /// Compare-and-set: the version the caller last saw (`If-Match`).
        expected_version: Option<u64>,
        /// Now, Unix epoch milliseconds.
        now_ms: i64,
    },
    /// Record the configuration the device reports. Output: [`Output::Reported`].
    PutReportedConfig {
        /// Device id.
        id: String,
        /// The reported configuration.
        value: Json,
        /// Now, Unix epoch milliseconds.
        now_ms: i64,
    },
    /// Replace the device's firmware state (opaque JSON; `None` clears it). Output:
    /// [`Output::Done`].
    SetFirmwareState {
        /// Device id.
        id: String,
        /// The state.
        state: Option<Json>,
    },
    /// Record that the device was heard from (keeps the latest time). Output: [`Output::Done`].
    TouchDevice {
        /// Device id.
        id: String,
        /// When, Unix epoch milliseconds.
        seen_at_ms: i64,
    },
    /// Register an OAuth client ([`StoreError::Conflict`] when the id is taken by a device or
    /// client). Output: [`Output::Client`].
    CreateClient(OAuthClient),
    /// Replace a client's secret hash. Output: [`Output::Done`].
    SetClientSecret {
        /// Client id.
        client_id: String,
        /// The new argon2 hash string.
        secret_hash: String,
    },
    /// Delete an OAuth client. Output: [`Output::Done`].
    DeleteClient {
        /// Client id.
        client_id: String,
    },
    /// Put a token id on the revocation list until it expires. Output: [`Output::Done`].
    RevokeToken {
        /// The token's `jti`.
        jti: String,
        /// When the token expires anyway, Unix epoch milliseconds.
        expires_at_ms: i64,
    },
    /// Forget revoked tokens that have expired by `now_ms`. Output: [`Output::Count`] removed.
    PurgeRevokedTokens {
        /// Now, Unix epoch milliseconds.
        now_ms: i64,
    },
    /// Store telemetry points, all or none. Output: [`Output::Count`] of points newly stored
    /// (points whose `(device, key, ts)` was already stored are skipped).
    AppendTelemetry(Vec<Point>),
    /// Set (`Some`) or clear (`None`) the retention rule of a scope; `None` device or key means
    /// any. Output: [`Output::Done`].
    SetRetention {
        /// Device the rule is for, or any.
        device_id: Option<String>,
        /// Key the rule is for, or any.
        key: Option<String>,
        /// The rule; `None` removes it.
        retention: Option<Retention>,
    },
    /// Delete expired telemetry. Output: [`Output::Count`] of points deleted.
    PurgeTelemetry {
        /// Now, Unix epoch milliseconds.
        now_ms: i64,
    },
    /// Append to the audit log. Output: [`Output::Audit`].
    AppendAudit(NewAuditEntry),
    /// Append a batch of failure entries and the chain entry that commits to them
    /// ([`crate::audit::failures`]). Output: [`Output::Audit`], the chain entry.
    AppendFailures {
        /// When the batch is appended, Unix epoch milliseconds.
        ts_ms: i64,
        /// The entries, in order (at least one).
        entries: Vec<NewFailureEntry>,
    },
    /// Delete the failure entries of every batch appended before `before_ms` and, when any
    /// were, record the prune in the chain. Output: [`Output::Count`] of entries deleted.
    PruneFailures {
        /// The retention's cut, Unix epoch milliseconds.
        before_ms: i64,
        /// Now (the prune entry's time), Unix epoch milliseconds.
        now_ms: i64,
    },
    /// Create or replace a rule. Output: [`Output::Done`].
    PutRule(StoredRule),
    /// Delete a rule ([`StoreError::NotFound`] when there is none). Output: [`Output::Done`].
    DeleteRule {
        /// Rule id.
        id: String,
    },
    /// Store an alarm unless a version at least as new is stored. Output: [`Output::Count`],
    /// 1 if stored, 0 if a newer version was kept.
    PutAlarm(Alarm),
    /// Record an uploaded firmware's metadata ([`StoreError::Conflict`] when its id is
    /// stored). Output: [`Output::Done`].
    PutFirmware(FirmwareRecord),
    /// Start a campaign: the firmware and every device must exist; each device's assignment
    /// becomes this campaign in state `assigned`, and its history records it. Output:
    /// [`Output::Done`].
    CreateCampaign(NewCampaign),
    /// Record a device's status report about a firmware: appended to its history; when the
    /// device's current assignment is that firmware, the assignment and its campaign's entry
    /// take the state. Output: [`Output::Done`].
    FirmwareStatus {
        /// Device id.
        device_id: String,
        /// The firmware the report is about.
        firmware_id: String,
        /// One of [`FIRMWARE_STATES`](crate::firmware::FIRMWARE_STATES).
        state: String,
        /// Why, for `failed`.
        reason: Option<String>,
        /// When, Unix epoch milliseconds.
        at_ms: i64,
    },
}

impl Write {
    /// How much this write counts toward a transaction's size limit (points, ops or 1).
    pub fn weight(&self) -> usize {
        match self {
            Write::Mqtt(ops) => ops.len().max(1),
            Write::AppendTelemetry(points) => points.len().max(1),
            Write::AppendFailures { entries, .. } => entries.len().max(1),
            _ => 1,
        }
    }
}

/// What a [`Write`] produced.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Output {
    /// Done; nothing to report.
    Done,
    /// The device as stored after the write.
    Device(Device),
    /// The desired configuration as stored, with its new version.
    Desired(DesiredConfig),
    /// The reported configuration as stored.
    Reported(ReportedConfig),
    /// The client as stored.
    Client(OAuthClient),
    /// How many records were stored or deleted.
    Count(u64),
    /// The audit entry with its sequence number and hashes.
    Audit(AuditEntry),
}

fn unexpected(wanted: &str, got: &Output) -> StoreError {
    StoreError::Internal(format!(
        "the backend answered {got:?} where {wanted} was expected"
    ))
}

impl Output {
    pub(crate) fn into_done(self) -> Result<(), StoreError> {
        match self {
            Output::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }

    pub(crate) fn into_device(self) -> Result<Device, StoreError> {
        match self {
            Output::Device(d) => Ok(d),
            other => Err(unexpected("a device", &other)),
        }
    }

    pub(crate) fn into_desired(self) -> Result<DesiredConfig, StoreError> {
        match self {
            Output::Desired(d) => Ok(d),
            other => Err(unexpected("a desired config", &other)),
        }
    }

    pub(crate) fn into_reported(self) -> Result<ReportedConfig, StoreError> {
        match self {
            Output::Reported(r) => Ok(r),
            other => Err(unexpected("a reported config", &other)),
        }
    }

    pub(crate) fn into_client(self) -> Result<OAuthClient, StoreError> {
        match self {
            Output::Client(c) => Ok(c),
            other => Err(unexpected("a client", &other)),
        }
    }

    pub(crate) fn into_count(self) -> Result<u64, StoreError> {
        match self {
            Output::Count(n) => Ok(n),
            other => Err(unexpected("a count", &other)),
        }
    }

    pub(crate) fn into_audit(self) -> Result<AuditEntry, StoreError> {
        match self {
            Output::Audit(a) => Ok(a),
            other => Err(unexpected("an audit entry", &other)),
        }
    }
}

/// The write contract of a backend. Every typed write method of the per-kind traits is a
/// provided method on top of [`commit_jobs`](WriteBackend::commit_jobs), so the direct API,
/// the group committer and the conformance suite all exercise one write path.
pub trait WriteBackend: Send + Sync + 'static {
    /// Applies every job in one durable transaction. Each job is atomic on its own: its writes
    /// apply in order and either all take effect or none does, and its result (the outputs of
    /// its writes, in order, or the first error) does not affect the other jobs. `Err` means
    /// the transaction itself failed and no job took effect. `Ok` is returned only once the
    /// successful jobs are durable; it holds one result per job, in order.
    fn commit_jobs(&self, jobs: &[Vec<Write>]) -> JobResults;

    /// One job in its own transaction.
    fn write_job(&self, job: Vec<Write>) -> Result<Vec<Output>, StoreError> {
        let mut results = self.commit_jobs(std::slice::from_ref(&job))?;
        match (results.pop(), results.is_empty()) {
            (Some(result), true) => result,
            _ => Err(StoreError::Internal(
                "the backend did not return one result per job".into(),
            )),
        }
    }

    /// One write in its own transaction.
    fn write_one(&self, write: Write) -> Result<Output, StoreError> {
        let mut outputs = self.write_job(vec![write])?;
        match (outputs.pop(), outputs.is_empty()) {
            (Some(output), true) => Ok(output),
            _ => Err(StoreError::Internal(
                "the backend did not return one output per write".into(),
            )),
        }
    }
}

/// The result of [`WriteBackend::commit_jobs`]: the transaction's, then each job's.
pub type JobResults = Result<Vec<Result<Vec<Output>, StoreError>>, StoreError>;

/// A duration as whole milliseconds, saturating at `i64::MAX`.
pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
