//! The one telemetry ingestion pipeline of every transport (HTTP `POST /api/v1/telemetry`,
//! MQTT `devices/{id}/telemetry`, CoAP `/telemetry`): parse and validate ([`crate::ingest`]),
//! check freshness, store durably in one atomic write, then fan out.
//!
//! A message is all or nothing: any bad record refuses it whole and nothing of it is stored;
//! a replayed one (its nonce seen within the window, or `sent` too far from the clock) is
//! refused with nothing stored and its nonce not burned. [`Pipeline::ingest`] returns only
//! once the points are durable, so the transport may then acknowledge (HTTP 202, MQTT
//! PUBACK, CoAP 2.04).
//!
//! No acknowledged value is lost (see "No silent loss" in [`crate::ingest`]): records without a
//! time get receive times that never repeat for their device ([`ingest::ReceiveClock`]), two
//! values of one series at one own time in one message are refused, times more than
//! `max_future_skew_secs` ahead are refused, and [`Accepted`] counts the points the store
//! newly holds apart from those it already held (a redelivery), as the store reports them.
//!
//! Freshness is required of a message when `[telemetry] require_freshness` is on, or when its
//! device's own policy is ([`stratus_store::Device::require_freshness`]). The pipeline keeps
//! the ids of the devices with the policy in memory ([`Pipeline::load_device_policies`] at
//! start, [`Pipeline::set_device_requires_freshness`] on every change), so deciding costs a
//! set lookup, never a store read, and nothing at all while no device has the policy.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use bytes::Bytes;
use stratus_mqtt::{Message as MqttMessage, MqttStr, QoS};
use stratus_store::{Output, Point, StoreError, StoreHandle, Value as StoredValue, Write};

use crate::broker::Broker;
use crate::ingest::{self, ContentFormat, FreshnessConfig, FreshnessGuard, IngestError, Replay};

/// How a message came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// MQTT `devices/{id}/telemetry` (the broker routes the original message itself).
    Mqtt,
    /// HTTP `POST /api/v1/telemetry`.
    Http,
    /// CoAP `POST /telemetry`.
    Coap,
}

impl Source {
    /// `mqtt`, `http` or `coap`.
    pub fn label(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Http => "http",
            Source::Coap => "coap",
        }
    }
}

/// What was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepted {
    /// Records acknowledged.
    pub records: usize,
    /// Points (series values) newly stored: what a query now returns and did not before.
    pub points: usize,
    /// Points whose series already held a value at their time, which was kept (the message,
    /// or the part of it, was a redelivery). `points + duplicates` is the message's points.
    pub duplicates: usize,
}

/// Why a message was refused; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// Malformed or invalid (names the record and field).
    #[error(transparent)]
    Invalid(#[from] IngestError),
    /// A replay, or freshness required and missing; or the nonce memory is full.
    #[error(transparent)]
    Replay(#[from] Replay),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Over a quota (series per device) or a rate (requests per second per device): HTTP 429,
    /// CoAP 4.29, MQTT 5 0x97.
    #[error("{why}")]
    Quota {
        /// The limit's metric name.
        limit: &'static str,
        /// What was over which limit.
        why: String,
        /// For a rate: when to try again, in milliseconds.
        retry_after_ms: Option<u64>,
    },
}

impl Rejected {
    /// The metric label of the refusal.
    pub fn label(&self) -> &'static str {
        match self {
            Rejected::Invalid(IngestError::TooLarge { .. }) => "too_large",
            Rejected::Invalid(_) => "invalid",
            Rejected::Replay(r) if r.is_capacity() => "nonce_memory_full",
            Rejected::Replay(_) => "replay",
            Rejected::Store(StoreError::NotFound { .. }) => "unknown_device",
            Rejected::Quota { .. } => "quota",
            Rejected::Store(_) => "store",
        }
    }
}

/// Settings of the pipeline (`[telemetry]` in the config).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Refuse messages without `sent` and `nonce` from every device.
    pub require_freshness: bool,
    /// Replay window and nonce memory bounds.
    pub freshness: FreshnessConfig,
    /// Parsing limits.
    pub limits: ingest::Limits,
    /// Default retention of every series, in days (0: keep forever). Points older than this
    /// are purged every few minutes; per-device or per-key rules can be set in the store.
    pub retention_days: u64,
    /// Series one device may have; a message that would create one more is refused whole
    /// (HTTP 429 `quota_exceeded`, CoAP 4.29, MQTT 5 PUBACK 0x97).
    pub max_series_per_device: usize,
    /// Telemetry requests per second of one device over HTTP and CoAP (0: no limit); more
    /// get HTTP 429 + `Retry-After` and CoAP 4.29 + Max-Age (MQTT has `[mqtt]
    /// max_publish_rate`).
    pub max_requests_per_sec: u32,
    /// How far ahead of the server clock a record's own time may be, in seconds (default 600;
    /// 0: any time up to the year 9999). A record dated further ahead refuses its message
    /// (HTTP 400, CoAP 4.00, MQTT 5 0x99) naming it; the same bound caps how far the receive
    /// times of records without a time may run ahead ([`ingest::ReceiveClock`]). The choice
    /// is argued in [`crate::ingest`].
    pub max_future_skew_secs: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            require_freshness: false,
            freshness: FreshnessConfig::default(),
            limits: ingest::Limits::default(),
            retention_days: 0,
            max_series_per_device: 1000,
            max_requests_per_sec: 1000,
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
        }
    }
}

/// The default of [`TelemetryConfig::max_future_skew_secs`]: ten minutes.
pub const DEFAULT_MAX_FUTURE_SKEW_SECS: u64 = 600;

/// The pipeline, shared by every transport.
pub struct Pipeline {
    store: StoreHandle,
    broker: Arc<Broker>,
    guard: FreshnessGuard,
    config: TelemetryConfig,
    rules: Option<Arc<crate::rules::Rules>>,
    strict: StrictDevices,
    /// Requests per second per device over HTTP and CoAP.
    rates: crate::rate::Rates,
    /// Receive times of records without a time of their own.
    clock: ingest::ReceiveClock,
}

/// The devices whose own policy requires freshness.
#[derive(Default)]
struct StrictDevices {
    ids: RwLock<HashSet<Box<str>>>,
    /// `!ids.is_empty()`, read without the lock.
    any: AtomicBool,
}

impl StrictDevices {
    fn contains(&self, device: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.ids.read().contains(device)
    }

    fn set(&self, device: &str, on: bool) {
        let mut ids = self.ids.write();
        if on {
            ids.insert(device.into());
        } else {
            ids.remove(device);
        }
        self.any.store(!ids.is_empty(), Ordering::Release);
    }

    fn replace(&self, all: impl IntoIterator<Item = String>) {
        let mut ids = self.ids.write();
        *ids = all.into_iter().map(String::into_boxed_str).collect();
        self.any.store(!ids.is_empty(), Ordering::Release);
    }
}

impl Pipeline {
    /// A pipeline writing to `store` and fanning out through `broker`.
    pub fn new(store: StoreHandle, broker: Arc<Broker>, config: TelemetryConfig) -> Self {
        Pipeline {
            rates: crate::rate::Rates::new(config.max_requests_per_sec),
            guard: FreshnessGuard::new(config.freshness.clone()),
            store,
            broker,
            config,
            rules: None,
            strict: StrictDevices::default(),
            clock: ingest::ReceiveClock::new(),
        }
    }

    /// [`TelemetryConfig::max_future_skew_secs`] in milliseconds; `None` when off.
    fn max_future_ms(&self) -> Option<i64> {
        match self.config.max_future_skew_secs {
            0 => None,
            s => Some(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)),
        }
    }

    /// Loads which devices require freshness from the store (once, before serving).
    pub async fn load_device_policies(&self) -> Result<(), StoreError> {
        let ids = self.store.devices_requiring_freshness().await?;
        if !ids.is_empty() {
            tracing::info!(devices = ids.len(), "devices requiring fresh messages");
        }
        self.strict.replace(ids);
        Ok(())
    }

    /// Records device `id`'s own freshness policy after the store changed it (`false` also
    /// when the device is deleted).
    pub fn set_device_requires_freshness(&self, id: &str, on: bool) {
        self.strict.set(id, on);
    }

    /// Whether every message of `device` must carry `sent` and `nonce`: the server-wide
    /// `[telemetry] require_freshness` or the device's own policy.
    pub fn requires_freshness(&self, device: &str) -> bool {
        self.config.require_freshness || self.strict.contains(device)
    }

    /// Feeds every stored record to `rules` (and their devices' connectivity).
    pub fn with_rules(mut self, rules: Arc<crate::rules::Rules>) -> Self {
        self.rules = Some(rules);
        self
    }

    /// The rules runtime, if any.
    pub fn rules(&self) -> Option<&Arc<crate::rules::Rules>> {
        self.rules.as_ref()
    }

    /// The parsing limits.
    pub fn limits(&self) -> &ingest::Limits {
        &self.config.limits
    }

    /// Ingests one message of `device`. Returns once it is durable; HTTP- and CoAP-sourced
    /// messages are then published on `devices/{id}/telemetry` for MQTT subscribers (an
    /// MQTT-sourced one is routed by its connection after this returns).
    pub async fn ingest(
        &self,
        device: &str,
        payload: Bytes,
        format: ContentFormat,
        source: Source,
    ) -> Result<Accepted, Rejected> {
        let result = match self.admit(device, source) {
            Ok(()) => self.ingest_inner(device, &payload, format, source).await,
            Err(e) => Err(e),
        };
        let result = result.map_err(|e| match e {
            Rejected::Store(StoreError::QuotaExceeded(why)) => Rejected::Quota {
                limit: "telemetry_series_per_device",
                why,
                retry_after_ms: None,
            },
            other => other,
        });
        let metrics = &self.broker.metrics;
        if let Err(Rejected::Quota { limit, .. }) = &result {
            metrics.limit_hit(limit, 1);
        }
        match &result {
            Ok(a) => {
                metrics.telemetry_records.inc_by(a.records as u64);
                metrics.telemetry_points.inc_by(a.points as u64);
                if source != Source::Mqtt {
                    self.fan_out(device, payload);
                }
            }
            Err(e) => {
                metrics.telemetry_rejected(e.label());
                tracing::debug!(device, error = %e, "telemetry refused");
            }
        }
        result
    }

    async fn ingest_inner(
        &self,
        device: &str,
        payload: &[u8],
        format: ContentFormat,
        source: Source,
    ) -> Result<Accepted, Rejected> {
        let now = crate::persist::now_ms() as i64;
        let mut message = ingest::parse(payload, format, &self.config.limits, now)?;
        let max_ahead = self.max_future_ms();
        if let Some(max) = max_ahead {
            message.check_not_ahead(now, max)?;
        }
        let reservation =
            self.guard
                .check_message(device, &message, self.requires_freshness(device), now)?;
        // After the freshness check, so that a replay takes no receive times.
        self.clock
            .assign(device, now, &mut message, max_ahead)
            .map_err(|e| Rejected::Quota {
                limit: "telemetry_receive_clock",
                why: format!("device {device:?}: {e}"),
                retry_after_ms: Some(e.retry_after_ms.max(1)),
            })?;
        let records = message.records.len();
        // The records for the rules and the live stream, only when someone reads them; built
        // while the points move to the store (no allocation per record).
        let events = self.broker.events.has_readers();
        let wanted = events || self.rules.as_ref().is_some_and(|r| r.wants_records());
        let mut batch = if wanted {
            crate::rules::Batch::with_capacity(records, message.point_count())
        } else {
            crate::rules::Batch::default()
        };
        let mut points = Vec::with_capacity(message.point_count());
        for r in message.records {
            if wanted {
                batch.begin(r.ts_ms);
            }
            for (key, value) in r.values {
                if wanted {
                    batch.push(&key, value.clone());
                }
                let value = match value {
                    ingest::Value::Number(n) => StoredValue::Number(n),
                    ingest::Value::Bool(b) => StoredValue::Bool(b),
                    ingest::Value::Text(t) => StoredValue::Text(t),
                };
                points.push(Point::new(device, key, r.ts_ms, value));
            }
        }
        let count = points.len();
        let started = Instant::now();
        // Dropping the reservation on an error frees the nonce: a refused message does not
        // burn it.
        let outputs = self
            .store
            .write(vec![
                Write::AppendTelemetry(points),
                Write::TouchDevice {
                    id: device.to_string(),
                    seen_at_ms: now,
                },
            ])
            .await?;
        self.broker
            .metrics
            .store_write_seconds
            .observe(started.elapsed().as_secs_f64());
        reservation.commit();
        // The store counts the points it newly holds; the others were there already.
        let stored = match outputs.first() {
            Some(Output::Count(n)) => usize::try_from(*n).unwrap_or(count).min(count),
            _ => count,
        };
        if let Some(rules) = &self.rules {
            rules.on_records(device, source.label(), &batch);
        }
        if events {
            for r in batch.records() {
                self.broker.events.publish(crate::events::Event::Telemetry {
                    device: device.to_owned(),
                    ts: r.ts,
                    values: r.to_map(),
                });
            }
        }
        Ok(Accepted {
            records,
            points: stored,
            duplicates: count - stored,
        })
    }

    /// Counts an HTTP or CoAP request of `device` against its rate (MQTT connections have their
    /// own, per client).
    fn admit(&self, device: &str, source: Source) -> Result<(), Rejected> {
        if source == Source::Mqtt {
            return Ok(());
        }
        let now = crate::persist::now_ms();
        self.rates
            .admit(device, now)
            .map_err(|retry_after_ms| Rejected::Quota {
                limit: "telemetry_requests_per_device",
                why: format!(
                    "device {device:?} sent more than {} telemetry requests this second",
                    self.config.max_requests_per_sec
                ),
                retry_after_ms: Some(retry_after_ms),
            })
    }

    /// Publishes a stored message to MQTT subscribers of `devices/{id}/telemetry`.
    fn fan_out(&self, device: &str, payload: Bytes) {
        let Ok(topic) = MqttStr::try_from(format!("devices/{device}/telemetry")) else {
            return;
        };
        self.broker.publish(
            MqttMessage::new(topic, payload, QoS::AtLeastOnce, false),
            None,
        );
    }

    /// Applies the default retention and purges expired points (and old nonces) every
    /// `every` until `shutdown`.
    pub async fn run_housekeeping(
        self: Arc<Self>,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let retention = match self.config.retention_days {
            0 => stratus_store::Retention::Forever,
            d => stratus_store::Retention::For(std::time::Duration::from_secs(d * 86_400)),
        };
        if let Err(e) = self.store.set_retention(None, None, retention).await {
            tracing::error!(error = %e, "could not set the default retention");
        }
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.prune();
            match self
                .store
                .purge_telemetry(crate::persist::now_ms() as i64)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(points = n, "expired telemetry purged"),
                Err(e) => tracing::error!(error = %e, "telemetry purge failed"),
            }
        }
    }

    /// Drops nonces older than the window, the rates of quiet devices and receive-clock
    /// entries that have passed (call now and then).
    pub fn prune(&self) {
        let now = crate::persist::now_ms();
        self.guard.prune(now as i64);
        self.rates.prune(now);
        self.clock.prune(now as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Server};

    /// A server with device `d` and a pipeline over its store.
    async fn with_device(config: TelemetryConfig) -> (tempfile::TempDir, Server, Pipeline) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.server.data_dir = dir.path().to_path_buf();
        c.mqtt.port = 0;
        c.http.port = 0;
        c.coap.port = 0;
        let server = Server::start(c).await.unwrap();
        let store = server.broker.persistence().unwrap().store().clone();
        crate::api::devices::register(
            &store,
            server.auth.psk_sealer(),
            "admin",
            "d",
            serde_json::Value::Null,
        )
        .await
        .unwrap();
        let p = Pipeline::new(store, server.broker.clone(), config);
        (dir, server, p)
    }

    async fn send(p: &Pipeline, body: String) -> Result<Accepted, Rejected> {
        p.ingest("d", Bytes::from(body), ContentFormat::Json, Source::Http)
            .await
    }

    async fn stored(p: &Pipeline, key: &str) -> Vec<(i64, StoredValue)> {
        let q = stratus_store::PointQuery::new("d", key, 0, 253_402_300_800_000).limit(10_000);
        let page = p.store.points(q).await.unwrap();
        page.points
            .into_iter()
            .map(|v| (v.ts_ms, v.value))
            .collect()
    }

    #[tokio::test]
    async fn what_is_acknowledged_is_what_a_query_returns() {
        let (_dir, server, p) = with_device(TelemetryConfig::default()).await;
        // Three records without a time: three points, at distinct receive times.
        let a = send(&p, r#"[{"x": 1}, {"x": 2}, {"x": 3}]"#.into())
            .await
            .unwrap();
        assert_eq!((a.records, a.points, a.duplicates), (3, 3, 0));
        let x = stored(&p, "x").await;
        let values: Vec<_> = x.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(values, [1.0, 2.0, 3.0].map(StoredValue::Number));
        assert!(x.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{x:?}");
        // Messages without a time, one right after another: never the same millisecond.
        for v in 0..20 {
            let a = send(&p, format!(r#"{{"y": {v}}}"#)).await.unwrap();
            assert_eq!((a.points, a.duplicates), (1, 0));
        }
        assert_eq!(stored(&p, "y").await.len(), 20);
        // A redelivery of a message with its own times keeps the first values and says so.
        let body = r#"[{"ts": 1000, "z": 1}, {"ts": 2000, "z": 2}]"#;
        let a = send(&p, body.into()).await.unwrap();
        assert_eq!((a.records, a.points, a.duplicates), (2, 2, 0));
        let again = r#"[{"ts": 1000, "z": 9}, {"ts": 3000, "z": 3}]"#;
        let a = send(&p, again.into()).await.unwrap();
        assert_eq!((a.records, a.points, a.duplicates), (2, 1, 1));
        let z: Vec<_> = stored(&p, "z").await;
        assert_eq!(
            z,
            [(1000, 1.0), (2000, 2.0), (3000, 3.0)].map(|(t, v)| (t, StoredValue::Number(v)))
        );
        // Two values of one series at one own time in one message: refused, nothing stored.
        let e = send(&p, r#"[{"ts": 5000, "z": 1}, {"ts": 5000, "z": 2}]"#.into())
            .await
            .unwrap_err();
        assert!(matches!(e, Rejected::Invalid(_)), "{e:?}");
        assert_eq!(stored(&p, "z").await.len(), 3);
        server.shutdown(std::time::Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn times_too_far_ahead_are_refused_and_the_receive_clock_is_bounded() {
        let config = TelemetryConfig {
            max_future_skew_secs: 1,
            ..TelemetryConfig::default()
        };
        let (_dir, server, p) = with_device(config).await;
        let now = crate::persist::now_ms() as i64;
        let e = send(
            &p,
            r#"{"date": "9999-01-01", "time": "00:00:00", "t": 1}"#.into(),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().starts_with(r#"record 0, field "date": "#),
            "{e}"
        );
        let e = send(
            &p,
            format!(r#"[{{"t": 1}}, {{"ts": {}, "t": 2}}]"#, now + 60_000),
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string().starts_with(r#"record 1, field "ts": "#),
            "{e}"
        );
        assert!(stored(&p, "t").await.is_empty());
        // 5000 records without a time need 5 s of distinct milliseconds: more than 1 s ahead.
        let many: Vec<String> = (0..5000).map(|i| format!(r#"{{"u": {i}}}"#)).collect();
        let e = send(&p, format!("[{}]", many.join(","))).await.unwrap_err();
        match e {
            Rejected::Quota {
                limit: "telemetry_receive_clock",
                retry_after_ms: Some(ms),
                ..
            } => assert!((3000..=4000).contains(&ms), "{ms}"),
            other => panic!("{other:?}"),
        }
        assert!(stored(&p, "u").await.is_empty());
        // Off: any time up to the year 9999.
        let (_dir2, server2, p) = with_device(TelemetryConfig {
            max_future_skew_secs: 0,
            ..TelemetryConfig::default()
        })
        .await;
        send(
            &p,
            r#"{"date": "9999-01-01", "time": "00:00:00", "t": 1}"#.into(),
        )
        .await
        .unwrap();
        server.shutdown(std::time::Duration::from_secs(5)).await;
        server2.shutdown(std::time::Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_device_policy_requires_freshness_of_that_device_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.server.data_dir = dir.path().to_path_buf();
        c.mqtt.port = 0;
        c.http.port = 0;
        c.coap.port = 0;
        let server = Server::start(c).await.unwrap();
        let store = server.broker.persistence().unwrap().store().clone();
        for id in ["lax", "strict"] {
            crate::api::devices::register(
                &store,
                server.auth.psk_sealer(),
                "admin",
                id,
                serde_json::Value::Null,
            )
            .await
            .unwrap();
        }
        let p = Pipeline::new(
            store.clone(),
            server.broker.clone(),
            TelemetryConfig::default(),
        );
        let send = |device: &'static str, body: String| {
            let p = &p;
            async move {
                p.ingest(device, Bytes::from(body), ContentFormat::Json, Source::Http)
                    .await
            }
        };
        let bare = || r#"{"v": 1}"#.to_string();
        let fresh = |nonce: &str| {
            format!(
                r#"{{"sent": {}, "nonce": "{nonce}", "v": 2}}"#,
                crate::persist::now_ms()
            )
        };
        assert!(send("strict", bare()).await.is_ok(), "no policy yet");

        let d = crate::api::devices::apply_patch(
            &store,
            "admin",
            "strict",
            serde_json::json!({"require_freshness": true}),
        )
        .await
        .unwrap();
        assert!(d.require_freshness);
        p.set_device_requires_freshness("strict", d.require_freshness);
        assert!(p.requires_freshness("strict") && !p.requires_freshness("lax"));
        assert!(matches!(
            send("strict", bare()).await,
            Err(Rejected::Replay(Replay::Missing { .. }))
        ));
        assert!(
            send("lax", bare()).await.is_ok(),
            "another device is not affected"
        );
        assert!(send("strict", fresh("n-1")).await.is_ok());
        assert!(matches!(
            send("strict", fresh("n-1")).await,
            Err(Rejected::Replay(Replay::Reused))
        ));

        // A new pipeline (a restart) learns the policy from the store.
        let again = Pipeline::new(
            store.clone(),
            server.broker.clone(),
            TelemetryConfig::default(),
        );
        assert!(!again.requires_freshness("strict"));
        again.load_device_policies().await.unwrap();
        assert!(again.requires_freshness("strict") && !again.requires_freshness("lax"));
        // Off again; the server-wide policy covers every device.
        p.set_device_requires_freshness("strict", false);
        assert!(send("strict", bare()).await.is_ok());
        let global = Pipeline::new(
            store,
            server.broker.clone(),
            TelemetryConfig {
                require_freshness: true,
                ..TelemetryConfig::default()
            },
        );
        assert!(global.requires_freshness("lax"));
        server.shutdown(std::time::Duration::from_secs(5)).await;
    }
}
