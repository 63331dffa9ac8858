//! The async facade for the server: writes through the group committer, reads on tokio's
//! blocking pool.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::audit::failures::{FailureEntry, NewFailureEntry};
use crate::audit::{AuditCheck, AuditEntry, AuditVerdict, NewAuditEntry};
use crate::clients::OAuthClient;
use crate::devices::{AttributeUpdate, DesiredConfig, Device, NewDevice, ReportedConfig};
use crate::firmware::{Assignment, Campaign, FirmwareEvent, FirmwareRecord};
use crate::group_commit::GroupCommitter;
use crate::mqtt::MqttSnapshot;
use crate::rules::{Alarm, AlarmQuery, StoredRule};
use crate::sqlite::{SqliteOptions, SqliteStore};
use crate::telemetry::{
    AggregateQuery, Bucket, LatestValue, Point, PointPage, PointQuery, Retention, RetentionRule,
};
use crate::write::{Output, Write};
use crate::{Store, StoreError};

/// Default size limit of one group-committed transaction, in operations (points, MQTT ops).
pub const DEFAULT_MAX_OPS: usize = 20_000;

struct Inner {
    store: Arc<dyn Store>,
    committer: GroupCommitter,
}

/// A cheap-to-clone async handle on a [`Store`].
///
/// - Writes are submitted to the group committer and awaited: when a write method returns
///   `Ok`, the change is durable. If the calling future is dropped after submitting, the write
///   still happens.
/// - Reads run the backend's sync read methods on tokio's blocking pool (`spawn_blocking`), so
///   they never stall the async workers and never wait for a commit's `fsync`.
///
/// The methods must be called inside a tokio runtime. Dropping the last clone writes what is
/// queued and stops the writer thread (blocking until it has).
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Inner>,
}

impl StoreHandle {
    /// A handle on `store` with its own group committer (at most `max_ops` per transaction).
    pub fn new<S: Store>(store: Arc<S>, max_ops: usize) -> Result<StoreHandle, StoreError> {
        let committer = GroupCommitter::start_backend(store.clone(), max_ops)?;
        Ok(StoreHandle {
            inner: Arc::new(Inner { store, committer }),
        })
    }

    /// Opens (creating if needed) the SQLite database at `path` with default options.
    pub fn open_sqlite(path: &Path) -> Result<StoreHandle, StoreError> {
        StoreHandle::open_sqlite_with(path, &SqliteOptions::default())
    }

    /// Opens (creating if needed) the SQLite database at `path`.
    pub fn open_sqlite_with(
        path: &Path,
        options: &SqliteOptions,
    ) -> Result<StoreHandle, StoreError> {
        let store = Arc::new(SqliteStore::open_with(path, options)?);
        StoreHandle::new(store, DEFAULT_MAX_OPS)
    }

    /// The backend, for sync calls (from `spawn_blocking`, CLI tools or start-up).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The group committer: the broker submits its [`MqttOp`](crate::MqttOp) batches here, so
    /// they share transactions with everything else.
    pub fn committer(&self) -> &GroupCommitter {
        &self.inner.committer
    }

    /// Submits a job (its writes apply atomically, in order) and waits until it is durable.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Vec<Output>, StoreError> {
        self.inner
            .committer
            .submit_writes(writes)
            .await
            .map_err(|_| StoreError::WriterStopped)?
    }

    async fn write_one(&self, write: Write) -> Result<Output, StoreError> {
        let mut outputs = self.write(vec![write]).await?;
        match (outputs.pop(), outputs.is_empty()) {
            (Some(output), true) => Ok(output),
            _ => Err(StoreError::Internal(
                "the backend did not return one output per write".into(),
            )),
        }
    }

    /// Runs a sync read on the blocking pool.
    pub async fn read<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || read(&*store))
            .await
            .map_err(|e| StoreError::Internal(format!("store read task failed: {e}")))?
    }

    // ---- broker -------------------------------------------------------------------------

    /// Everything the broker reloads at start.
    pub async fn load_mqtt(&self) -> Result<MqttSnapshot, StoreError> {
        self.read(|s| s.load_mqtt()).await
    }

    // ---- devices ------------------------------------------------------------------------

    /// See [`DeviceStore::device`](crate::DeviceStore::device).
    pub async fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        let id = id.to_owned();
        self.read(move |s| s.device(&id)).await
    }

    /// See [`DeviceStore::list_devices`](crate::DeviceStore::list_devices).
    pub async fn list_devices(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Device>, StoreError> {
        let after = after.map(str::to_owned);
        self.read(move |s| s.list_devices(after.as_deref(), limit))
            .await
    }

    /// See [`DeviceStore::device_count`](crate::DeviceStore::device_count).
    pub async fn device_count(&self) -> Result<u64, StoreError> {
        self.read(|s| s.device_count()).await
    }

    /// See [`DeviceStore::create_device`](crate::DeviceStore::create_device).
    pub async fn create_device(&self, new: NewDevice) -> Result<Device, StoreError> {
        self.write_one(Write::CreateDevice(new))
            .await?
            .into_device()
    }

    /// See [`DeviceStore::update_device_attributes`](crate::DeviceStore::update_device_attributes).
    pub async fn update_device_attributes(
        &self,
        id: &str,
        update: AttributeUpdate,
    ) -> Result<Device, StoreError> {
        self.write_one(Write::UpdateAttributes {
            id: id.into(),
            update,
        })
        .await?
        .into_device()
    }

    /// See [`DeviceStore::set_require_freshness`](crate::DeviceStore::set_require_freshness).
    pub async fn set_require_freshness(&self, id: &str, on: bool) -> Result<Device, StoreError> {
        self.write_one(Write::SetRequireFreshness { id: id.into(), on })
            .await?
            .into_device()
    }

    /// See
    /// [`DeviceStore::devices_requiring_freshness`](crate::DeviceStore::devices_requiring_freshness).
    pub async fn devices_requiring_freshness(&self) -> Result<Vec<String>, StoreError> {
        self.read(|s| s.devices_requiring_freshness()).await
    }

    /// See [`DeviceStore::set_device_secret`](crate::DeviceStore::set_device_secret).
    pub async fn set_device_secret(&self, id: &str, secret_hash: &str) -> Result<(), StoreError> {
        self.write_one(Write::SetDeviceSecret {
            id: id.into(),
            secret_hash: secret_hash.into(),
        })
        .await?
        .into_done()
    }

    /// See [`DeviceStore::delete_device`](crate::DeviceStore::delete_device).
    pub async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteDevice { id: id.into() })
            .await?
            .into_done()
    }

    /// See [`DeviceStore::put_desired_config`](crate::DeviceStore::put_desired_config).
    pub async fn put_desired_config(
        &self,
        id: &str,
        value: Json,
        expected_version: Option<u64>,
        now_ms: i64,
    ) -> Result<DesiredConfig, StoreError> {
        self.write_one(Write::PutDesiredConfig {
            id: id.into(),
            value,
            expected_version,
            now_ms,
        })
        .await?
        .into_desired()
    }

    /// See [`DeviceStore::put_reported_config`](crate::DeviceStore::put_reported_config).
    pub async fn put_reported_config(
        &self,
        id: &str,
        value: Json,
        now_ms: i64,
    ) -> Result<ReportedConfig, StoreError> {
        self.write_one(Write::PutReportedConfig {
            id: id.into(),
            value,
            now_ms,
        })
        .await?
        .into_reported()
    }

    /// See [`DeviceStore::set_firmware_state`](crate::DeviceStore::set_firmware_state).
    pub async fn set_firmware_state(
        &self,
        id: &str,
        state: Option<Json>,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetFirmwareState {
            id: id.into(),
            state,
        })
        .await?
        .into_done()
    }

    /// See [`DeviceStore::touch_device`](crate::DeviceStore::touch_device).
    pub async fn touch_device(&self, id: &str, seen_at_ms: i64) -> Result<(), StoreError> {
        self.write_one(Write::TouchDevice {
            id: id.into(),
            seen_at_ms,
        })
        .await?
        .into_done()
    }

    // ---- OAuth clients ------------------------------------------------------------------

    /// See [`ClientStore::client`](crate::ClientStore::client).
    pub async fn client(&self, client_id: &str) -> Result<Option<OAuthClient>, StoreError> {
        let id = client_id.to_owned();
        self.read(move |s| s.client(&id)).await
    }

    /// See [`ClientStore::list_clients`](crate::ClientStore::list_clients).
    pub async fn list_clients(&self) -> Result<Vec<OAuthClient>, StoreError> {
        self.read(|s| s.list_clients()).await
    }

    /// See [`ClientStore::is_token_revoked`](crate::ClientStore::is_token_revoked).
    pub async fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let jti = jti.to_owned();
        self.read(move |s| s.is_token_revoked(&jti)).await
    }

    /// See [`ClientStore::revoked_tokens`](crate::ClientStore::revoked_tokens).
    pub async fn revoked_tokens(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|s| s.revoked_tokens()).await
    }

    /// See [`ClientStore::create_client`](crate::ClientStore::create_client).
    pub async fn create_client(&self, client: OAuthClient) -> Result<OAuthClient, StoreError> {
        self.write_one(Write::CreateClient(client))
            .await?
            .into_client()
    }

    /// See [`ClientStore::set_client_secret`](crate::ClientStore::set_client_secret).
    pub async fn set_client_secret(
        &self,
        client_id: &str,
        secret_hash: &str,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetClientSecret {
            client_id: client_id.into(),
            secret_hash: secret_hash.into(),
        })
        .await?
        .into_done()
    }

    /// See [`ClientStore::delete_client`](crate::ClientStore::delete_client).
    pub async fn delete_client(&self, client_id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteClient {
            client_id: client_id.into(),
        })
        .await?
        .into_done()
    }

    /// See [`ClientStore::revoke_token`](crate::ClientStore::revoke_token).
    pub async fn revoke_token(&self, jti: &str, expires_at_ms: i64) -> Result<(), StoreError> {
        self.write_one(Write::RevokeToken {
            jti: jti.into(),
            expires_at_ms,
        })
        .await?
        .into_done()
    }

    /// See [`ClientStore::purge_revoked_tokens`](crate::ClientStore::purge_revoked_tokens).
    pub async fn purge_revoked_tokens(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PurgeRevokedTokens { now_ms })
            .await?
            .into_count()
    }

    // ---- telemetry ----------------------------------------------------------------------

    /// See [`TelemetryStore::append_telemetry`](crate::TelemetryStore::append_telemetry).
    pub async fn append_telemetry(&self, points: Vec<Point>) -> Result<u64, StoreError> {
        self.write_one(Write::AppendTelemetry(points))
            .await?
            .into_count()
    }

    /// See [`TelemetryStore::points`](crate::TelemetryStore::points).
    pub async fn points(&self, query: PointQuery) -> Result<PointPage, StoreError> {
        self.read(move |s| s.points(&query)).await
    }

    /// See [`TelemetryStore::aggregate`](crate::TelemetryStore::aggregate).
    pub async fn aggregate(&self, query: AggregateQuery) -> Result<Vec<Bucket>, StoreError> {
        self.read(move |s| s.aggregate(&query)).await
    }

    /// See [`TelemetryStore::latest`](crate::TelemetryStore::latest).
    pub async fn latest(&self, device_id: &str) -> Result<Vec<LatestValue>, StoreError> {
        let id = device_id.to_owned();
        self.read(move |s| s.latest(&id)).await
    }

    /// See [`TelemetryStore::keys`](crate::TelemetryStore::keys).
    pub async fn keys(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
        let id = device_id.to_owned();
        self.read(move |s| s.keys(&id)).await
    }

    /// See [`TelemetryStore::retention_rules`](crate::TelemetryStore::retention_rules).
    pub async fn retention_rules(&self) -> Result<Vec<RetentionRule>, StoreError> {
        self.read(|s| s.retention_rules()).await
    }

    /// See [`TelemetryStore::set_retention`](crate::TelemetryStore::set_retention).
    pub async fn set_retention(
        &self,
        device_id: Option<&str>,
        key: Option<&str>,
        retention: Retention,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetRetention {
            device_id: device_id.map(Into::into),
            key: key.map(Into::into),
            retention: Some(retention),
        })
        .await?
        .into_done()
    }

    /// See [`TelemetryStore::clear_retention`](crate::TelemetryStore::clear_retention).
    pub async fn clear_retention(
        &self,
        device_id: Option<&str>,
        key: Option<&str>,
    ) -> Result<(), StoreError> {
        self.write_one(Write::SetRetention {
            device_id: device_id.map(Into::into),
            key: key.map(Into::into),
            retention: None,
        })
        .await?
        .into_done()
    }

    /// See [`TelemetryStore::purge_telemetry`](crate::TelemetryStore::purge_telemetry).
    pub async fn purge_telemetry(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PurgeTelemetry { now_ms })
            .await?
            .into_count()
    }

    // ---- firmware -----------------------------------------------------------------------

    /// See [`FirmwareStore::firmware`](crate::FirmwareStore::firmware).
    pub async fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |s| s.firmware(&id)).await
    }

    /// See [`FirmwareStore::list_firmware`](crate::FirmwareStore::list_firmware).
    pub async fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError> {
        self.read(|s| s.list_firmware()).await
    }

    /// See [`FirmwareStore::campaign`](crate::FirmwareStore::campaign).
    pub async fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError> {
        let id = id.to_owned();
        self.read(move |s| s.campaign(&id)).await
    }

    /// See [`FirmwareStore::list_campaigns`](crate::FirmwareStore::list_campaigns).
    pub async fn list_campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        self.read(|s| s.list_campaigns()).await
    }

    /// See [`FirmwareStore::assignment`](crate::FirmwareStore::assignment).
    pub async fn assignment(&self, device_id: &str) -> Result<Option<Assignment>, StoreError> {
        let id = device_id.to_owned();
        self.read(move |s| s.assignment(&id)).await
    }

    /// See [`FirmwareStore::firmware_history`](crate::FirmwareStore::firmware_history).
    pub async fn firmware_history(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<FirmwareEvent>, StoreError> {
        let id = device_id.to_owned();
        self.read(move |s| s.firmware_history(&id, limit)).await
    }

    // ---- audit --------------------------------------------------------------------------

    /// See [`AuditStore::append_audit`](crate::AuditStore::append_audit).
    pub async fn append_audit(&self, entry: NewAuditEntry) -> Result<AuditEntry, StoreError> {
        self.write_one(Write::AppendAudit(entry))
            .await?
            .into_audit()
    }

    /// See [`AuditStore::list_audit`](crate::AuditStore::list_audit).
    pub async fn list_audit(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |s| s.list_audit(from_seq, limit)).await
    }

    /// See [`AuditStore::append_failures`](crate::AuditStore::append_failures).
    pub async fn append_failures(
        &self,
        ts_ms: i64,
        entries: Vec<NewFailureEntry>,
    ) -> Result<AuditEntry, StoreError> {
        self.write_one(Write::AppendFailures { ts_ms, entries })
            .await?
            .into_audit()
    }

    /// See [`AuditStore::prune_failures`](crate::AuditStore::prune_failures).
    pub async fn prune_failures(&self, before_ms: i64, now_ms: i64) -> Result<u64, StoreError> {
        self.write_one(Write::PruneFailures { before_ms, now_ms })
            .await?
            .into_count()
    }

    /// See [`AuditStore::list_audit_failures`](crate::AuditStore::list_audit_failures).
    pub async fn list_audit_failures(
        &self,
        from_id: u64,
        limit: usize,
    ) -> Result<Vec<FailureEntry>, StoreError> {
        self.read(move |s| s.list_audit_failures(from_id, limit))
            .await
    }

    /// See [`AuditStore::verify_audit`](crate::AuditStore::verify_audit).
    pub async fn verify_audit(&self) -> Result<AuditVerdict, StoreError> {
        self.read(|s| s.verify_audit()).await
    }

    /// See [`AuditStore::check_audit`](crate::AuditStore::check_audit).
    pub async fn check_audit(&self, check: AuditCheck) -> Result<AuditVerdict, StoreError> {
        self.read(move |s| s.check_audit(&check)).await
    }

    /// See [`AuditStore::audit_len`](crate::AuditStore::audit_len).
    pub async fn audit_len(&self) -> Result<u64, StoreError> {
        self.read(|s| s.audit_len()).await
    }

    // ---- rules and alarms ---------------------------------------------------------------

    /// See [`RuleStore::rules`](crate::RuleStore::rules).
    pub async fn rules(&self) -> Result<Vec<StoredRule>, StoreError> {
        self.read(|s| s.rules()).await
    }

    /// See [`RuleStore::rule`](crate::RuleStore::rule).
    pub async fn rule(&self, id: &str) -> Result<Option<StoredRule>, StoreError> {
        let id = id.to_owned();
        self.read(move |s| s.rule(&id)).await
    }

    /// See [`RuleStore::put_rule`](crate::RuleStore::put_rule).
    pub async fn put_rule(&self, rule: StoredRule) -> Result<(), StoreError> {
        self.write_one(Write::PutRule(rule)).await?.into_done()
    }

    /// See [`RuleStore::delete_rule`](crate::RuleStore::delete_rule).
    pub async fn delete_rule(&self, id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteRule { id: id.into() })
            .await?
            .into_done()
    }

    /// See [`RuleStore::alarms`](crate::RuleStore::alarms).
    pub async fn alarms(&self, query: AlarmQuery) -> Result<Vec<Alarm>, StoreError> {
        self.read(move |s| s.alarms(&query)).await
    }

    /// See [`RuleStore::alarm`](crate::RuleStore::alarm).
    pub async fn alarm(&self, id: &str) -> Result<Option<Alarm>, StoreError> {
        let id = id.to_owned();
        self.read(move |s| s.alarm(&id)).await
    }

    /// See [`RuleStore::put_alarm`](crate::RuleStore::put_alarm).
    pub async fn put_alarm(&self, alarm: Alarm) -> Result<bool, StoreError> {
        Ok(self.write_one(Write::PutAlarm(alarm)).await?.into_count()? == 1)
    }
}
