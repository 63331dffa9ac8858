//! The embedded backend: one SQLite database file under the data dir, in WAL mode with
//! `synchronous=FULL`, one writer connection and a pool of reader connections.

mod audit;
mod firmware;
mod mqtt;
mod registry;
mod rules;
mod telemetry;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use serde_json::Value as Json;

use crate::audit::failures::FailureEntry;
use crate::audit::{AuditCheck, AuditEntry, AuditKey, AuditStore, AuditVerdict};
use crate::clients::{ClientStore, OAuthClient};
use crate::devices::{Device, DeviceStore};
use crate::firmware::{Assignment, Campaign, FirmwareEvent, FirmwareRecord, FirmwareStore};
use crate::mqtt::{MqttOp, MqttSnapshot, MqttStore};
use crate::rules::{Alarm, AlarmQuery, RuleStore, StoredRule};
use crate::telemetry::{
    AggregateQuery, Bucket, LatestValue, PointPage, PointQuery, RetentionRule, TelemetryStore,
};
use crate::write::{JobResults, Output, Write, WriteBackend};
use crate::StoreError;

/// The schema version this code writes (`PRAGMA user_version`). Version 1 held the MQTT
/// tables only; version 2 adds the rest; version 3 adds rules and alarms; version 4 the
/// failure entries beside the audit chain (all tables are created if missing).
const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mqtt_retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    properties BLOB NOT NULL,
    expires_at_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    client_id TEXT PRIMARY KEY,
    expiry_secs INTEGER,
    last_seen_ms INTEGER NOT NULL,
    will BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_subscriptions (
    client_id TEXT NOT NULL,
    filter TEXT NOT NULL,
    options INTEGER NOT NULL,
    subscription_id INTEGER,
    PRIMARY KEY (client_id, filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_messages (
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    properties BLOB NOT NULL,
    packet_id INTEGER,
    state INTEGER NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_inbound_qos2 (
    client_id TEXT NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    attributes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    desired_version INTEGER NOT NULL,
    desired TEXT NOT NULL,
    desired_updated_ms INTEGER NOT NULL,
    reported TEXT,
    reported_updated_ms INTEGER,
    firmware TEXT,
    last_seen_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oauth_clients (
    client_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    UNIQUE (device_id, key)
);
-- num: numbers (REAL); other: booleans as INTEGER 0/1 and strings as TEXT (no affinity).
CREATE TABLE IF NOT EXISTS points (
    series_id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    num REAL,
    other,
    PRIMARY KEY (series_id, ts)
) WITHOUT ROWID;
-- per series and minute: count, sum, min and max of the numeric points.
CREATE TABLE IF NOT EXISTS rollup_1m (
    series_id INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    n INTEGER NOT NULL,
    total REAL NOT NULL,
    lo REAL NOT NULL,
    hi REAL NOT NULL,
    PRIMARY KEY (series_id, minute)
) WITHOUT ROWID;
-- '' stands for any device / any key; keep_ms NULL for forever.
CREATE TABLE IF NOT EXISTS retention (
    device_id TEXT NOT NULL,
    key TEXT NOT NULL,
    keep_ms INTEGER,
    PRIMARY KEY (device_id, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS firmware (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    size INTEGER NOT NULL,
    hardware TEXT,
    key_id TEXT NOT NULL,
    manifest TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firmware_campaigns (
    id TEXT PRIMARY KEY,
    firmware_id TEXT NOT NULL,
    selector TEXT,
    created_at_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firmware_campaign_devices (
    campaign_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (campaign_id, device_id)
) WITHOUT ROWID;
-- the current assignment of each device: its last campaign.
CREATE TABLE IF NOT EXISTS firmware_assignments (
    device_id TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS firmware_history (
    seq INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    campaign_id TEXT,
    firmware_id TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS firmware_history_device ON firmware_history (device_id, seq);

CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- failed authentications beside the chain: batch is the seq of the chain entry that commits to
-- them (see stratus_store::audit::failures); ids are never reused after a prune.
CREATE TABLE IF NOT EXISTS audit_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch INTEGER NOT NULL,
    ts_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_failures_batch ON audit_failures (batch, id);

CREATE TABLE IF NOT EXISTS rules (
    id TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alarms (
    id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    value TEXT NOT NULL,
    raised_at_ms INTEGER NOT NULL,
    acked_at_ms INTEGER,
    cleared_at_ms INTEGER,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alarms_by_time ON alarms (raised_at_ms DESC, id DESC);
CREATE INDEX IF NOT EXISTS alarms_by_device ON alarms (device_id, raised_at_ms DESC);
CREATE INDEX IF NOT EXISTS alarms_open ON alarms (state) WHERE state <> 'cleared';
";

/// Tuning of [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Reader connections (at least 1).
    pub readers: usize,
    /// Bytes of the file each reader maps into memory (`PRAGMA mmap_size`); 0 disables.
    pub mmap_size: u64,
    /// Page cache of the writer connection, in KiB.
    pub writer_cache_kib: u64,
    /// Page cache of each reader connection, in KiB.
    pub reader_cache_kib: u64,
    /// How long a connection waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
    /// The key of the audit chain (see [`crate::audit`]); without one, audit entries follow
    /// the unkeyed rule and a keyed log can be neither appended to nor verified.
    pub audit_key: Option<AuditKey>,
    /// Series one device may have; a write that would create one more fails with
    /// [`StoreError::QuotaExceeded`] and stores nothing of its job.
    pub max_series_per_device: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            readers: 4,
            mmap_size: 1 << 30,
            writer_cache_kib: 64 * 1024,
            reader_cache_kib: 16 * 1024,
            busy_timeout: Duration::from_secs(5),
            audit_key: None,
            max_series_per_device: usize::MAX,
        }
    }
}

/// The SQLite backend.
///
/// Writes (direct trait calls and the group committer's transactions) share the one writer
/// connection, serialised by a mutex. Reads take a free connection from the reader pool and
/// never wait for a commit.
pub struct SqliteStore {
    max_series_per_device: usize,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    path: PathBuf,
    audit_key: Option<AuditKey>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default options.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(path, &SqliteOptions::default())
    }

    /// Opens (creating if needed) the database at `path`. A new database file (and any
    /// directory created for it) is private to the owner, whatever the process umask: mode
    /// 0600 (0700), which SQLite gives its `-wal` and `-shm` files too.
    pub fn open_with(path: &Path, options: &SqliteOptions) -> Result<SqliteStore, StoreError> {
        create_private(path)?;
        let writer = Connection::open(path)?;
        writer.busy_timeout(options.busy_timeout)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!(
                "{} cannot use write-ahead logging (journal mode {mode})",
                path.display()
            )));
        }
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.pragma_update(None, "foreign_keys", "OFF")?;
        writer.pragma_update(None, "temp_store", "MEMORY")?;
        writer.pragma_update(None, "cache_size", -cache_pages(options.writer_cache_kib))?;
        let version: i64 = writer.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has schema version {version}, newer than this Stratus ({SCHEMA_VERSION})",
                path.display()
            )));
        }
        writer.execute_batch(SCHEMA)?;
        registry::add_coap_psk_column(&writer)?;
        mqtt::add_owner_columns(&writer)?;
        registry::add_require_freshness_column(&writer)?;
        writer.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let mut readers = Vec::new();
        for _ in 0..options.readers.max(1) {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(options.busy_timeout)?;
            reader.pragma_update(None, "query_only", "ON")?;
            reader.pragma_update(None, "temp_store", "MEMORY")?;
            reader.pragma_update(None, "cache_size", -cache_pages(options.reader_cache_kib))?;
            reader.pragma_update(
                None,
                "mmap_size",
                i64::try_from(options.mmap_size).unwrap_or(i64::MAX),
            )?;
            readers.push(Mutex::new(reader));
        }
        Ok(SqliteStore {
            max_series_per_device: options.max_series_per_device,
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
            path: path.to_owned(),
            audit_key: options.audit_key.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer connection. A panic while it was held left no transaction open (dropping a
    /// rusqlite transaction rolls it back), so a poisoned lock is safe to take over.
    fn writer(&self) -> MutexGuard<'_, Connection> {
        match self.writer.lock() {
            Ok(conn) => conn,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `read` on a free reader connection (waiting for one only when all are busy).
    fn read<R>(
        &self,
        read: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let n = self.readers.len();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match self.readers[(start + i) % n].try_lock() {
                Ok(conn) => return read(&conn),
                Err(TryLockError::Poisoned(poisoned)) => return read(&poisoned.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let conn = match self.readers[start % n].lock() {
            Ok(conn) => conn,
            Err(poisoned) => poisoned.into_inner(),
        };
        read(&conn)
    }
}

/// Creates the database file (mode 0600) and its directory (0700) when missing, so that
/// SQLite, which gives its `-wal` and `-shm` files the database file's mode, never creates
/// anything others can read.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn cache_pages(kib: u64) -> i64 {
    i64::try_from(kib).unwrap_or(i64::MAX)
}

/// Applies one write to the open transaction.
fn apply_write(
    conn: &Connection,
    audit_key: Option<&AuditKey>,
    write: &Write,
) -> Result<Output, StoreError> {
    match write {
        Write::Mqtt(ops) => {
            for op in ops {
                mqtt::apply(conn, op)?;
            }
            Ok(Output::Done)
        }
        Write::CreateDevice(new) => registry::create_device(conn, new).map(Output::Device),
        Write::UpdateAttributes { id, update } => {
            registry::update_attributes(conn, id, update).map(Output::Device)
        }
        Write::SetRequireFreshness { id, on } => {
            registry::set_require_freshness(conn, id, *on).map(Output::Device)
        }
        Write::SetDeviceSecret { id, secret_hash } => {
            registry::set_device_secret(conn, id, secret_hash).map(|()| Output::Done)
        }
        Write::SetCoapPsk { id, sealed } => {
            registry::set_coap_psk(conn, id, sealed.as_deref()).map(|()| Output::Done)
        }
        Write::DeleteDevice { id } => registry::delete_device(conn, id).map(|()| Output::Done),
        Write::PutDesiredConfig {
            id,
            value,
            expected_version,
            now_ms,
        } => {
            registry::put_desired(conn, id, value, *expected_version, *now_ms).map(Output::Desired)
        }
        Write::PutReportedConfig { id, value, now_ms } => {
            registry::put_reported(conn, id, value, *now_ms).map(Output::Reported)
        }
        Write::SetFirmwareState { id, state } => {
            registry::set_firmware(conn, id, state.as_ref()).map(|()| Output::Done)
        }
        Write::TouchDevice { id, seen_at_ms } => {
            registry::touch_device(conn, id, *seen_at_ms).map(|()| Output::Done)
        }
        Write::CreateClient(client) => registry::create_client(conn, client).map(Output::Client),
        Write::SetClientSecret {
            client_id,
            secret_hash,
        } => registry::set_client_secret(conn, client_id, secret_hash).map(|()| Output::Done),
        Write::DeleteClient { client_id } => {
            registry::delete_client(conn, client_id).map(|()| Output::Done)
        }
        Write::RevokeToken { jti, expires_at_ms } => {
            registry::revoke_token(conn, jti, *expires_at_ms).map(|()| Output::Done)
        }
        Write::PurgeRevokedTokens { now_ms } => {
            registry::purge_revoked(conn, *now_ms).map(Output::Count)
        }
        Write::AppendTelemetry(points) => telemetry::append(conn, points).map(Output::Count),
        Write::SetRetention {
            device_id,
            key,
            retention,
        } => telemetry::set_retention(
            conn,
            device_id.as_deref(),
            key.as_deref(),
            retention.as_ref(),
        )
        .map(|()| Output::Done),
        Write::PurgeTelemetry { now_ms } => telemetry::purge(conn, *now_ms).map(Output::Count),
        Write::AppendAudit(entry) => audit::append(conn, audit_key, entry).map(Output::Audit),
        Write::AppendFailures { ts_ms, entries } => {
            audit::append_failures(conn, audit_key, *ts_ms, entries).map(Output::Audit)
        }
        Write::PruneFailures { before_ms, now_ms } => {
            audit::prune_failures(conn, audit_key, *before_ms, *now_ms).map(Output::Count)
        }
        Write::PutRule(rule) => rules::put_rule(conn, rule).map(|()| Output::Done),
        Write::DeleteRule { id } => rules::delete_rule(conn, id).map(|()| Output::Done),
        Write::PutAlarm(alarm) => rules::put_alarm(conn, alarm).map(Output::Count),
        Write::PutFirmware(record) => firmware::put(conn, record).map(|()| Output::Done),
        Write::CreateCampaign(campaign) => {
            firmware::create_campaign(conn, campaign).map(|()| Output::Done)
        }
        Write::FirmwareStatus {
            device_id,
            firmware_id,
            state,
            reason,
            at_ms,
        } => firmware::record_status(
            conn,
            device_id,
            firmware_id,
            state,
            reason.as_deref(),
            *at_ms,
        )
        .map(|()| Output::Done),
    }
}

/// Applies one job's writes: telemetry appends and device touches through `batch` (their
/// rollup contributions go to `rollups`, for [`telemetry::Batch::keep`] once the job as a
/// whole succeeded), any other write on its own.
fn apply_job(
    conn: &Connection,
    audit_key: Option<&AuditKey>,
    batch: &mut telemetry::Batch,
    job: &[Write],
    rollups: &mut HashMap<(i64, i64), crate::telemetry::Accumulator>,
) -> Result<Vec<Output>, StoreError> {
    job.iter()
        .map(|w| match w {
            Write::AppendTelemetry(points) => {
                batch.append(conn, points, rollups).map(Output::Count)
            }
            Write::TouchDevice { id, seen_at_ms } => {
                batch.touch(conn, id, *seen_at_ms).map(|()| Output::Done)
            }
            w => apply_write(conn, audit_key, w),
        })
        .collect()
}

impl WriteBackend for SqliteStore {
    fn commit_jobs(&self, jobs: &[Vec<Write>]) -> JobResults {
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(jobs.len());
        // Telemetry jobs share series look-ups, device touches and rollup upserts.
        let mut batch = telemetry::Batch::new(self.max_series_per_device);
        for job in jobs {
            let telemetry_only = job
                .iter()
                .all(|w| matches!(w, Write::AppendTelemetry(_) | Write::TouchDevice { .. }));
            if !telemetry_only {
                // Another kind of write may read or delete what the batch holds.
                batch.flush(&tx)?;
                batch.forget();
            }
            if telemetry_only && batch.cannot_fail(&tx, job)? {
                // Nothing to undo on its own: an error now is the database's, and fails the
                // whole commit.
                let mut rollups = HashMap::new();
                let outputs =
                    apply_job(&tx, self.audit_key.as_ref(), &mut batch, job, &mut rollups)?;
                batch.keep(rollups);
                results.push(Ok(outputs));
                continue;
            }
            // A savepoint per job (prepared once, not parsed per job): a failing job is
            // undone alone.
            tx.prepare_cached("SAVEPOINT job")?.execute([])?;
            let mut rollups = HashMap::new();
            match apply_job(&tx, self.audit_key.as_ref(), &mut batch, job, &mut rollups) {
                Ok(outputs) => {
                    tx.prepare_cached("RELEASE job")?.execute([])?;
                    batch.keep(rollups);
                    results.push(Ok(outputs));
                }
                Err(e) => {
                    if tx.is_autocommit() {
                        // SQLite rolled the whole transaction back (I/O error, disk full):
                        // nothing of this group can be committed.
                        return Err(e);
                    }
                    tx.prepare_cached("ROLLBACK TO job")?.execute([])?;
                    tx.prepare_cached("RELEASE job")?.execute([])?;
                    // What the job interned or touched is undone.
                    batch.forget();
                    results.push(Err(e));
                }
            }
            if !telemetry_only {
                batch.forget();
            }
        }
        batch.flush(&tx)?;
        tx.commit()?;
        Ok(results)
    }
}

impl MqttStore for SqliteStore {
    fn load_mqtt(&self) -> Result<MqttSnapshot, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            mqtt::load(&tx)
        })
    }

    fn commit_mqtt(&self, ops: &[MqttOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for op in ops {
            mqtt::apply(&tx, op)?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl DeviceStore for SqliteStore {
    fn device(&self, id: &str) -> Result<Option<Device>, StoreError> {
        self.read(|conn| registry::get_device(conn, id))
    }

    fn list_devices(&self, after: Option<&str>, limit: usize) -> Result<Vec<Device>, StoreError> {
        self.read(|conn| registry::list_devices(conn, after, limit))
    }

    fn device_count(&self) -> Result<u64, StoreError> {
        self.read(registry::device_count)
    }

    fn coap_psks(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(registry::coap_psks)
    }

    fn devices_requiring_freshness(&self) -> Result<Vec<String>, StoreError> {
        self.read(registry::devices_requiring_freshness)
    }
}

impl ClientStore for SqliteStore {
    fn client(&self, client_id: &str) -> Result<Option<OAuthClient>, StoreError> {
        self.read(|conn| registry::get_client(conn, client_id))
    }

    fn list_clients(&self) -> Result<Vec<OAuthClient>, StoreError> {
        self.read(registry::list_clients)
    }

    fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        self.read(|conn| registry::is_revoked(conn, jti))
    }

    fn revoked_tokens(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(registry::revoked_tokens)
    }
}

impl TelemetryStore for SqliteStore {
    fn points(&self, query: &PointQuery) -> Result<PointPage, StoreError> {
        self.read(|conn| telemetry::points(conn, query))
    }

    fn aggregate(&self, query: &AggregateQuery) -> Result<Vec<Bucket>, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            telemetry::aggregate(&tx, query)
        })
    }

    fn latest(&self, device_id: &str) -> Result<Vec<LatestValue>, StoreError> {
        self.read(|conn| telemetry::latest(conn, device_id))
    }

    fn keys(&self, device_id: &str) -> Result<Vec<String>, StoreError> {
        self.read(|conn| telemetry::keys(conn, device_id))
    }

    fn retention_rules(&self) -> Result<Vec<RetentionRule>, StoreError> {
        self.read(telemetry::retention_rules)
    }
}

impl FirmwareStore for SqliteStore {
    fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError> {
        self.read(|conn| firmware::get(conn, id))
    }

    fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError> {
        self.read(firmware::list)
    }

    fn campaign(&self, id: &str) -> Result<Option<Campaign>, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            firmware::get_campaign(&tx, id)
        })
    }

    fn list_campaigns(&self) -> Result<Vec<Campaign>, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            firmware::list_campaigns(&tx)
        })
    }

    fn assignment(&self, device_id: &str) -> Result<Option<Assignment>, StoreError> {
        self.read(|conn| firmware::assignment(conn, device_id))
    }

    fn firmware_history(
        &self,
        device_id: &str,
        limit: usize,
    ) -> Result<Vec<FirmwareEvent>, StoreError> {
        self.read(|conn| firmware::history(conn, device_id, limit))
    }
}

impl AuditStore for SqliteStore {
    fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|conn| audit::list(conn, from_seq, limit))
    }

    fn list_audit_failures(
        &self,
        from_id: u64,
        limit: usize,
    ) -> Result<Vec<FailureEntry>, StoreError> {
        self.read(|conn| audit::list_failures(conn, from_id, limit))
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        self.read(audit::len)
    }

    fn check_audit(&self, check: &AuditCheck) -> Result<AuditVerdict, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            audit::check(&tx, self.audit_key.as_ref(), check)
        })
    }
}

impl RuleStore for SqliteStore {
    fn rules(&self) -> Result<Vec<StoredRule>, StoreError> {
        self.read(rules::rules)
    }

    fn rule(&self, id: &str) -> Result<Option<StoredRule>, StoreError> {
        self.read(|conn| rules::rule(conn, id))
    }

    fn alarms(&self, query: &AlarmQuery) -> Result<Vec<Alarm>, StoreError> {
        self.read(|conn| rules::alarms(conn, query))
    }

    fn alarm(&self, id: &str) -> Result<Option<Alarm>, StoreError> {
        self.read(|conn| rules::alarm(conn, id))
    }
}

/// Parses JSON stored by this backend.
fn parse_json(text: &str, what: &str) -> Result<Json, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("stored {what} is not JSON: {e}")))
}

/// A count or limit as an SQLite integer.
fn sql_int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
