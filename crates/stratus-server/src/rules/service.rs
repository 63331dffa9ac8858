//! The rules runtime: the [`Engine`] behind a lock, fed by the ingestion pipeline (after the
//! durable store) and a 1 s timer; actions go to a bounded queue served by one background
//! worker, so evaluation is all the ingestion path pays. Also device connectivity (online,
//! last seen) from every transport, published as `device_status` events.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value as Json;
use stratus_mqtt::{Message as MqttMessage, MqttStr, QoS};
use stratus_store::{Alarm, AlarmFilter, AlarmQuery, StoreError, StoreHandle, StoredRule};
use tokio::sync::{mpsc, watch, Semaphore};

use super::engine::{alarm_json, Effect, Engine};
use super::{Action, Batch, CompiledRule, ConditionError, RuleDef};
use crate::broker::Broker;
use crate::events::Event;
use crate::persist::now_ms;

/// `[rules]` in the config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// An HTTP or CoAP device not heard from for this long is offline (MQTT devices are
    /// online while connected).
    pub offline_after_secs: u64,
    /// Actions waiting for the worker; more are dropped (and counted).
    pub queue: usize,
    /// Webhook requests in flight at once.
    pub webhook_concurrency: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            offline_after_secs: 300,
            queue: 10_000,
            webhook_concurrency: 16,
        }
    }
}

/// Why a rule change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The definition is wrong (400 `invalid_rule`).
    #[error(transparent)]
    Invalid(#[from] ConditionError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// No such alarm.
    #[error("alarm {0:?} not found")]
    NotFound(String),
    /// It cleared already.
    #[error("alarm {0:?} is cleared")]
    Cleared(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job for the action worker.
enum Job {
    /// Store the alarm, then announce it.
    Alarm(Alarm),
    Republish {
        topic: String,
        qos: u8,
        payload: Bytes,
    },
    Webhook {
        url: String,
        timeout_ms: u64,
        retries: u32,
        body: Json,
    },
    SetConfig {
        rule: String,
        device: String,
        key: String,
        value: Json,
    },
}

#[derive(Debug, Clone, Default)]
struct Presence {
    mqtt_connections: u32,
    online: bool,
    transport: Option<&'static str>,
    last_seen: i64,
    announced: i64,
}

/// How often a device that stays online has its `last_seen` announced.
const ANNOUNCE_EVERY_MS: i64 = 10_000;

/// The rules runtime, shared by the pipeline, the API and the timer.
pub struct Rules {
    engine: Mutex<Engine>,
    presence: Mutex<HashMap<String, Presence>>,
    wanted_attributes: Mutex<HashSet<String>>,
    needs_attributes: std::sync::atomic::AtomicBool,
    expression_rules: std::sync::atomic::AtomicBool,
    store: StoreHandle,
    broker: Arc<Broker>,
    config: RulesConfig,
    jobs: mpsc::Sender<Job>,
    jobs_rx: Mutex<Option<mpsc::Receiver<Job>>>,
    http: reqwest::Client,
}

impl Rules {
    /// A runtime without rules (call [`Rules::load`], then run [`Rules::run`]).
    pub fn new(store: StoreHandle, broker: Arc<Broker>, config: RulesConfig) -> Rules {
        let (jobs, rx) = mpsc::channel(config.queue.max(1));
        let http = reqwest::Client::builder()
            .user_agent(concat!("stratus/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Rules {
            engine: Mutex::new(Engine::new(&format!("al-{:x}-", now_ms()))),
            presence: Mutex::new(HashMap::new()),
            wanted_attributes: Mutex::new(HashSet::new()),
            needs_attributes: std::sync::atomic::AtomicBool::new(false),
            expression_rules: std::sync::atomic::AtomicBool::new(false),
            store,
            broker,
            config,
            jobs,
            jobs_rx: Mutex::new(Some(rx)),
            http,
        }
    }

    /// Loads rules, open alarms and what the store knows of devices.
    pub async fn load(&self) -> Result<(), StoreError> {
        let stored = self.store.rules().await?;
        let open = self
            .store
            .alarms(AlarmQuery {
                filter: AlarmFilter::Open,
                device: None,
                rule: None,
                limit: 1_000_000,
            })
            .await?;
        let mut devices = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.list_devices(after.as_deref(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let full = page.len() < 1000;
            devices.extend(page);
            if full {
                break;
            }
        }
        let mut engine = self.engine.lock();
        for r in stored {
            let def: RuleDef = match serde_json::from_value(r.definition) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(rule = %r.id, error = %e, "stored rule does not parse; skipped");
                    continue;
                }
            };
            match CompiledRule::compile(def) {
                Ok(c) => engine.put_rule(c),
                Err(e) => {
                    tracing::error!(rule = %r.id, error = %e, "stored rule does not compile; skipped")
                }
            }
        }
        for a in open {
            engine.restore_alarm(a);
        }
        for d in devices {
            engine.set_attributes(&d.id, d.attributes);
            if let Some(seen) = d.last_seen_ms {
                engine.set_last_seen(&d.id, seen);
                let mut presence = self.presence.lock();
                presence.entry(d.id).or_default().last_seen = seen;
            }
        }
        self.refresh_flags(&engine);
        self.broker
            .metrics
            .alarms_open
            .set(engine.open_alarms().count() as i64);
        Ok(())
    }

    // ---- rules ----------------------------------------------------------------------------

    /// Updates what the ingestion path checks without the engine lock.
    fn refresh_flags(&self, engine: &Engine) {
        let rules = engine.rules();
        self.needs_attributes.store(
            rules.iter().any(|r| r.def.selector.needs_attributes()),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.expression_rules.store(
            rules.iter().any(|r| r.condition.is_some() && r.def.enabled),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Whether any enabled rule has a condition: when none has, the pipeline need not pass
    /// the records to [`Rules::on_records`] (an empty [`Batch`] will do).
    pub fn wants_records(&self) -> bool {
        self.expression_rules
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every rule, by id, as the API shows it.
    pub fn rules(&self) -> Vec<RuleDef> {
        self.engine
            .lock()
            .rules()
            .iter()
            .map(|r| r.def.clone())
            .collect()
    }

    /// One rule.
    pub fn rule(&self, id: &str) -> Option<RuleDef> {
        self.engine
            .lock()
            .rules()
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.def.clone())
    }

    /// Creates or replaces a rule (generating its id when absent): the stored rule and
    /// whether it is new.
    pub async fn put(&self, mut def: RuleDef) -> Result<(RuleDef, bool), RuleError> {
        if def.id.is_none() {
            def.id = Some(format!("r-{:x}{:04x}", now_ms(), rand::random::<u16>()));
        }
        let existing = def.id.as_deref().and_then(|id| self.rule(id));
        def.created_at = Some(
            existing
                .as_ref()
                .and_then(|e| e.created_at)
                .unwrap_or_else(|| now_ms() as i64),
        );
        let compiled = CompiledRule::compile(def)?;
        let definition = serde_json::to_value(&compiled.def)
            .map_err(|e| StoreError::Internal(format!("rule to JSON: {e}")))?;
        self.store
            .put_rule(StoredRule {
                id: compiled.id.clone(),
                definition,
                created_at_ms: compiled.def.created_at.unwrap_or_default(),
            })
            .await?;
        let def = compiled.def.clone();
        let mut engine = self.engine.lock();
        engine.put_rule(compiled);
        self.refresh_flags(&engine);
        Ok((def, existing.is_none()))
    }

    /// Deletes a rule; its open alarms clear.
    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.store.delete_rule(id).await?;
        let effects = {
            let mut engine = self.engine.lock();
            let effects = engine.remove_rule(id, now_ms() as i64).1;
            self.refresh_flags(&engine);
            effects
        };
        self.dispatch(effects);
        Ok(())
    }

    // ---- alarms ---------------------------------------------------------------------------

    /// Open alarms of a device now.
    pub fn open_alarm_count(&self, device: &str) -> usize {
        self.engine
            .lock()
            .open_alarms()
            .filter(|a| a.device == device)
            .count()
    }

    /// Acknowledges an alarm: the alarm as it is now.
    pub async fn ack(&self, id: &str) -> Result<Alarm, AckError> {
        let acked = self.engine.lock().ack(id, now_ms() as i64);
        match acked {
            Some((alarm, changed)) => {
                if changed {
                    self.store.put_alarm(alarm.clone()).await?;
                    self.broker.events.publish(Event::Alarm {
                        alarm: alarm_json(&alarm),
                    });
                }
                Ok(alarm)
            }
            None => match self.store.alarm(id).await? {
                Some(a) if a.state.is_open() => {
                    // Open in the store but not here: its rule is gone. Acknowledge it anyway.
                    let mut a = a;
                    if a.state == stratus_store::AlarmState::Active {
                        a.state = stratus_store::AlarmState::Acknowledged;
                        a.acked_at_ms = Some(now_ms() as i64);
                        a.version += 1;
                        self.store.put_alarm(a.clone()).await?;
                    }
                    Ok(a)
                }
                Some(_) => Err(AckError::Cleared(id.to_owned())),
                None => Err(AckError::NotFound(id.to_owned())),
            },
        }
    }

    // ---- the ingestion path ---------------------------------------------------------------

    /// Stored records of `device` (each `(ts, values)`), from `transport`. Cheap: evaluation
    /// only; whatever follows is queued.
    pub fn on_records(&self, device: &str, transport: &'static str, records: &Batch) {
        let now = now_ms() as i64;
        self.announce_heard(device, transport, now);
        let (missing_attributes, (effects, evaluations)) = {
            let mut engine = self.engine.lock();
            let missing = self
                .needs_attributes
                .load(std::sync::atomic::Ordering::Relaxed)
                && !engine.knows_attributes(device);
            (missing, engine.on_records(device, records, now))
        };
        if missing_attributes {
            self.wanted_attributes.lock().insert(device.to_owned());
        }
        if evaluations > 0 {
            self.broker.metrics.rules_evaluations.inc_by(evaluations);
        }
        if !effects.is_empty() {
            self.dispatch(effects);
        }
    }

    // ---- connectivity ---------------------------------------------------------------------

    /// A device was heard from over `transport` (telemetry, a connection).
    pub fn heard(&self, device: &str, transport: &'static str, now: i64) {
        self.announce_heard(device, transport, now);
        let effects = self.engine.lock().seen(device, now);
        self.dispatch(effects);
    }

    fn announce_heard(&self, device: &str, transport: &'static str, now: i64) {
        let event = {
            let mut all = self.presence.lock();
            if !all.contains_key(device) {
                all.insert(device.to_owned(), Presence::default());
            }
            let Some(p) = all.get_mut(device) else {
                return;
            };
            p.last_seen = p.last_seen.max(now);
            let changed = !p.online;
            if changed {
                p.online = true;
                p.transport = Some(transport);
            }
            if changed || now - p.announced >= ANNOUNCE_EVERY_MS {
                p.announced = now;
                Some(status_event(device, p))
            } else {
                None
            }
        };
        if let Some(e) = event {
            self.broker.events.publish(e);
        }
    }

    /// A device's MQTT connection was accepted.
    pub fn mqtt_connected(&self, device: &str) {
        let now = now_ms() as i64;
        {
            let mut all = self.presence.lock();
            let p = all.entry(device.to_owned()).or_default();
            p.mqtt_connections += 1;
            p.online = false; // announce the MQTT transport below
        }
        self.heard(device, "mqtt", now);
        self.touch(device, now);
    }

    /// A device's MQTT connection closed.
    pub fn mqtt_disconnected(&self, device: &str) {
        let now = now_ms() as i64;
        let event = {
            let mut all = self.presence.lock();
            let Some(p) = all.get_mut(device) else { return };
            p.mqtt_connections = p.mqtt_connections.saturating_sub(1);
            p.last_seen = p.last_seen.max(now);
            if p.mqtt_connections == 0 && p.online {
                p.online = false;
                p.transport = None;
                p.announced = now;
                Some(status_event(device, p))
            } else {
                None
            }
        };
        if let Some(e) = event {
            self.broker.events.publish(e);
        }
        self.touch(device, now);
    }

    /// Keeps `last_seen` in the store for a connection event (telemetry does it itself).
    fn touch(&self, device: &str, now: i64) {
        let store = self.store.clone();
        let device = device.to_owned();
        tokio::spawn(async move {
            if let Err(e) = store.touch_device(&device, now).await {
                tracing::debug!(device = %device, error = %e, "last_seen not stored");
            }
        });
    }

    /// Whether a device is online now, and when it was last heard from (this process's
    /// view; `None` when not heard from since start and not in the store).
    pub fn presence(&self, device: &str) -> (bool, Option<i64>) {
        match self.presence.lock().get(device) {
            Some(p) => (p.online, (p.last_seen > 0).then_some(p.last_seen)),
            None => (false, None),
        }
    }

    /// Forgets a deleted device.
    pub fn forget_device(&self, device: &str) {
        self.presence.lock().remove(device);
        self.engine.lock().forget_device(device);
    }

    /// The attributes of a device changed (or it was registered) in this process.
    pub fn device_attributes(&self, device: &str, attributes: Json) {
        self.engine.lock().set_attributes(device, attributes);
    }

    /// Refreshes the cached attributes of a device from the store at the next tick.
    pub fn device_changed(&self, device: &str) {
        self.wanted_attributes.lock().insert(device.to_owned());
    }

    // ---- actions --------------------------------------------------------------------------

    fn enqueue(&self, job: Job) {
        if self.jobs.try_send(job).is_err() {
            self.broker.metrics.rules_actions_dropped.inc();
        }
    }

    fn dispatch(&self, effects: Vec<Effect>) {
        for effect in effects {
            let rule = effect.rule().clone();
            let alarm = effect.alarm();
            let fired = matches!(effect, Effect::Fired { .. });
            let json = alarm_json(alarm);
            if fired && rule.raises_alarms() {
                self.broker.metrics.alarms_raised.inc();
                self.broker.metrics.alarms_open.inc();
            } else if rule.raises_alarms() {
                self.broker.metrics.alarms_open.dec();
            }
            for action in &rule.actions {
                match action {
                    Action::Alarm => self.enqueue(Job::Alarm(alarm.clone())),
                    Action::Republish { topic, qos } => self.enqueue(Job::Republish {
                        topic: topic
                            .replace("{device}", &alarm.device)
                            .replace("{rule}", &alarm.rule),
                        qos: *qos,
                        payload: Bytes::from(json.to_string()),
                    }),
                    Action::Webhook {
                        url,
                        timeout_ms,
                        retries,
                    } => self.enqueue(Job::Webhook {
                        url: url.clone(),
                        timeout_ms: *timeout_ms,
                        retries: *retries,
                        body: json.clone(),
                    }),
                    Action::SetConfig { key, value } if fired => self.enqueue(Job::SetConfig {
                        rule: rule.id.clone(),
                        device: alarm.device.clone(),
                        key: key.clone(),
                        value: value.clone(),
                    }),
                    Action::SetConfig { .. } => {}
                }
            }
        }
    }

    /// The timer (every second) and the action worker, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.jobs_rx.lock().take() else {
            tracing::error!("the rules runtime is already running");
            return;
        };
        let webhooks = Arc::new(Semaphore::new(self.config.webhook_concurrency.max(1)));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = crate::stopped(&mut shutdown) => break,
                _ = tick.tick() => {
                    ticks += 1;
                    self.on_tick(ticks).await;
                }
                job = rx.recv() => match job {
                    Some(job) => self.run_job(job, &webhooks).await,
                    None => break,
                },
            }
        }
        // Alarm changes already decided reach the store.
        while let Ok(job) = rx.try_recv() {
            if let Job::Alarm(a) = job {
                let _ = self.store.put_alarm(a).await;
            }
        }
    }

    async fn on_tick(&self, ticks: u64) {
        let now = now_ms() as i64;
        let effects = self.engine.lock().tick(now);
        self.dispatch(effects);
        // HTTP and CoAP devices go offline after the configured silence.
        let limit = self.config.offline_after_secs.saturating_mul(1000) as i64;
        let events: Vec<Event> = {
            let mut all = self.presence.lock();
            all.iter_mut()
                .filter(|(_, p)| p.online && p.mqtt_connections == 0 && now - p.last_seen >= limit)
                .map(|(id, p)| {
                    p.online = false;
                    p.transport = None;
                    p.announced = now;
                    status_event(id, p)
                })
                .collect()
        };
        for e in events {
            self.broker.events.publish(e);
        }
        // Attributes for selectors: the devices asked for, and every minute all of them.
        if self
            .needs_attributes
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let mut wanted: Vec<String> = self.wanted_attributes.lock().drain().collect();
            if ticks.is_multiple_of(60) {
                wanted.extend(self.presence.lock().keys().cloned());
            }
            for id in wanted.into_iter().take(10_000) {
                match self.store.device(&id).await {
                    Ok(Some(d)) => self.engine.lock().set_attributes(&id, d.attributes),
                    Ok(None) => self.engine.lock().forget_device(&id),
                    Err(e) => tracing::warn!(device = %id, error = %e, "cannot read attributes"),
                }
            }
        }
    }

    async fn run_job(&self, job: Job, webhooks: &Arc<Semaphore>) {
        let metrics = &self.broker.metrics;
        match job {
            Job::Alarm(alarm) => {
                match self.store.put_alarm(alarm.clone()).await {
                    Ok(_) => {
                        metrics.rules_actions_done.inc();
                    }
                    Err(e) => tracing::error!(alarm = %alarm.id, error = %e, "alarm not stored"),
                }
                self.broker.events.publish(Event::Alarm {
                    alarm: alarm_json(&alarm),
                });
            }
            Job::Republish {
                topic,
                qos,
                payload,
            } => match MqttStr::try_from(topic) {
                Ok(topic) => {
                    let qos = if qos == 0 {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    self.broker
                        .publish(MqttMessage::new(topic, payload, qos, false), None);
                    metrics.rules_actions_done.inc();
                }
                Err(e) => tracing::warn!(error = %e, "republish topic refused"),
            },
            Job::Webhook {
                url,
                timeout_ms,
                retries,
                body,
            } => {
                let Ok(permit) = webhooks.clone().acquire_owned().await else {
                    return;
                };
                let http = self.http.clone();
                let metrics = self.broker.metrics.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    deliver_webhook(&http, &metrics, &url, timeout_ms, retries, &body).await;
                });
            }
            Job::SetConfig {
                rule,
                device,
                key,
                value,
            } => {
                if let Err(e) = self.set_config(&rule, &device, key, value).await {
                    tracing::warn!(rule = %rule, device = %device, error = %e, "set_config action failed");
                } else {
                    metrics.rules_actions_done.inc();
                }
            }
        }
    }

    async fn set_config(
        &self,
        rule: &str,
        device: &str,
        key: String,
        value: Json,
    ) -> Result<(), StoreError> {
        let Some(d) = self.store.device(device).await? else {
            return Err(StoreError::NotFound {
                kind: "device",
                id: device.to_owned(),
            });
        };
        let mut desired = d.desired.value.as_object().cloned().unwrap_or_default();
        if desired.get(&key) == Some(&value) {
            return Ok(());
        }
        desired.insert(key, value);
        crate::api::devices::config::put_desired(
            &self.store,
            &format!("rule:{rule}"),
            device,
            Json::Object(desired),
            None,
        )
        .await?;
        crate::api::devices::config::republish(&self.broker, &self.store, device).await;
        Ok(())
    }
}

fn status_event(device: &str, p: &Presence) -> Event {
    Event::DeviceStatus {
        device: device.to_owned(),
        online: p.online,
        transport: p.transport.map(str::to_owned),
        last_seen: (p.last_seen > 0).then_some(p.last_seen),
    }
}

/// POSTs `body` to `url`: each attempt bounded by `timeout_ms`, up to `retries` more after
/// the first with exponential back-off (200 ms, 400 ms, … capped at 10 s); a 2xx answer is
/// success.
async fn deliver_webhook(
    http: &reqwest::Client,
    metrics: &crate::metrics::Metrics,
    url: &str,
    timeout_ms: u64,
    retries: u32,
    body: &Json,
) {
    let mut backoff = Duration::from_millis(200);
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        let result = http
            .post(url)
            .timeout(Duration::from_millis(timeout_ms))
            .json(body)
            .send()
            .await;
        match result {
            Ok(r) if r.status().is_success() => {
                metrics.rules_actions_done.inc();
                return;
            }
            Ok(r) => {
                metrics.rules_webhook_attempt_failures.inc();
                tracing::debug!(url, status = %r.status(), attempt, "webhook refused");
            }
            Err(e) => {
                metrics.rules_webhook_attempt_failures.inc();
                tracing::debug!(url, error = %e, attempt, "webhook failed");
            }
        }
    }
    metrics.rules_webhook_failures.inc();
    tracing::warn!(url, retries, "webhook given up");
}
