//! `stratus sim`: a simulated fleet on the device SDK (`stratus-device`) — and the engine
//! behind `stratus serve --demo`.
//!
//! Each simulated device is a real SDK device (its own id, secret, access token, connection
//! and offline buffer) driven by one tokio task that samples plausible sensor series
//! (temperature with a daily cycle and noise, humidity that follows it, a draining battery,
//! rare anomalies) at the rate asked, honours the desired configuration's `interval_s`, and
//! reports the configuration it runs.
//!
//! ## Identities
//! Devices are named `PREFIX-0001`… and reused between runs. Their secrets (and still-valid
//! access tokens, so that a re-run costs the server no argon2 verification) are kept in
//! `--devices-file` (default `./stratus-data/sim-devices.json`, mode 0600). A device that the
//! server does not know is registered with the admin credentials; one whose secret is unknown
//! or refused gets a new one (`POST /api/v1/devices/{id}/secret`).
//!
//! ## Output
//! Once a second on stderr: devices connected, records sent / acknowledged / failed /
//! buffered, and the acknowledged rate. At the end a summary on stdout (`--format json` for
//! a JSON object, including per-device acknowledged counts). "Sent" counts records handed to
//! the SDK; "acked" those the server acknowledged as stored; at the end the fleet waits up to
//! `--drain` for what is still buffered. Exit code 1 when a record was not acknowledged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stratus_device::{Device, MqttVersion, Record, Stats, Status, Transport};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, UsageError};

/// Run a simulated fleet of devices against a server.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// How many devices.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub devices: usize,
    /// mqtt, http, coap or mixed (round robin over the three).
    #[arg(long, default_value = "mqtt", value_name = "T")]
    pub transport: String,
    /// Records per second per device (a desired config `interval_s` overrides it per device).
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub rate: f64,
    /// How long to run: `30s`, `5m`, `1h` or seconds; `0` runs until Ctrl-C.
    #[arg(long, default_value = "60s", value_name = "D")]
    pub duration: String,
    /// MQTT broker as HOST:PORT [default: the server's host, port 1883].
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt: Option<String>,
    /// CoAP server as HOST:PORT or coap://HOST:PORT, or coaps://HOST:PORT for CoAPS (DTLS 1.2
    /// PSK: each device's key is derived from its secret) [default: the server's host, port
    /// 5683].
    #[arg(long, value_name = "URL")]
    pub coap: Option<String>,
    /// MQTT protocol version: 5 or 3.1.1.
    #[arg(long, default_value = "5", value_name = "V")]
    pub mqtt_version: String,
    /// Device id prefix: devices are PREFIX-0001, PREFIX-0002, …
    #[arg(long, default_value = "sim", value_name = "P")]
    pub prefix: String,
    /// Where the devices' secrets are kept between runs
    /// [default: ./stratus-data/sim-devices.json, or in $STRATUS_SERVER__DATA_DIR when set].
    #[arg(long, value_name = "FILE")]
    pub devices_file: Option<PathBuf>,
    /// How long to wait at the end for records still unacknowledged.
    #[arg(long, default_value = "15s", value_name = "D")]
    pub drain: String,
    /// Summary format: text or json.
    #[arg(long, default_value = "text", value_name = "F")]
    pub format: String,
    #[command(flatten)]
    pub server: admin::ServerArgs,
}

/// `30s`, `5m`, `1h`, `250ms` or plain seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Which transports the fleet uses, device by device.
fn transports(name: &str) -> Result<Vec<Transport>, UsageError> {
    match name {
        "mqtt" => Ok(vec![Transport::Mqtt]),
        "http" => Ok(vec![Transport::Http]),
        "coap" => Ok(vec![Transport::Coap]),
        "mixed" => Ok(vec![Transport::Mqtt, Transport::Http, Transport::Coap]),
        other => Err(UsageError(format!(
            "--transport {other:?}: one of mqtt, http, coap, mixed"
        ))),
    }
}

/// What a fleet is.
pub struct FleetSpec {
    /// The server's base URL.
    pub base: String,
    /// The MQTT broker URL (`mqtt://H:P`), or derived from `base`.
    pub mqtt: Option<String>,
    /// The CoAP server (`coap://H:P`), or derived from `base`.
    pub coap: Option<String>,
    /// Device id prefix.
    pub prefix: String,
    /// How many devices.
    pub count: usize,
    /// Transports, assigned round robin.
    pub transports: Vec<Transport>,
    /// Records per second per device.
    pub rate: f64,
    /// MQTT version.
    pub mqtt_version: MqttVersion,
    /// Where secrets are kept.
    pub devices_file: PathBuf,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

/// The secrets file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DevicesFile {
    #[serde(default)]
    server: String,
    #[serde(default)]
    devices: BTreeMap<String, Known>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Known {
    secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// Epoch ms when the token expires.
    #[serde(default)]
    token_expires_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl DevicesFile {
    fn load(path: &Path) -> DevicesFile {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        // Mode 0600 (a new directory 0700), replaced atomically.
        stratus_server::data_dir::replace_private(path, &serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }
}

/// The admin side of the HTTP API, with a token.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = r.status();
        let bytes = r.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

/// An access token for `id` with `secret` (client credentials): `Ok(None)` when refused.
async fn client_token(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    secret: &str,
) -> anyhow::Result<Option<(String, i64)>> {
    let r = http
        .post(format!("{base}/oauth/token"))
        .basic_auth(admin::form_encode(id), Some(admin::form_encode(secret)))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body("grant_type=client_credentials")
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        let token = body["access_token"]
            .as_str()
            .context("the token endpoint answered no access_token")?
            .to_string();
        let expires_in = body["expires_in"].as_i64().unwrap_or(3600);
        return Ok(Some((token, now_ms() + expires_in * 1000)));
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST {
        return Ok(None);
    }
    anyhow::bail!("token endpoint answered {status} for {id}: {body}")
}

/// A provisioned device: id, transport, secret, token.
struct Provisioned {
    id: String,
    transport: Transport,
    known: Known,
}

/// Makes sure device `id` exists with a secret we know (and a token when cheap).
async fn provision_one(
    api: &Api,
    id: &str,
    transport: Transport,
    known: Option<Known>,
) -> anyhow::Result<Known> {
    let base = &api.base;
    if let Some(k) = known {
        // A cached token that still works costs the server a MAC, not an argon2 hash.
        if let Some(t) = k
            .token
            .as_deref()
            .filter(|_| k.token_expires_ms > now_ms() + 600_000)
        {
            let r = api
                .http
                .get(format!("{base}/api/v1/devices/{id}/config"))
                .bearer_auth(t)
                .send()
                .await
                .with_context(|| format!("cannot reach {base}"))?;
            if r.status().is_success() {
                return Ok(k);
            }
        }
        if let Some((token, exp)) = client_token(&api.http, base, id, &k.secret).await? {
            return Ok(Known {
                secret: k.secret,
                token: Some(token),
                token_expires_ms: exp,
            });
        }
    }
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/devices",
            Some(json!({"id": id, "attributes": {"simulated": true, "transport": transport.to_string()}})),
        )
        .await?;
    let secret = if status == StatusCode::CREATED {
        body["secret"].as_str().map(str::to_string)
    } else if status == StatusCode::CONFLICT {
        let (status, body) = api
            .call(Method::POST, &format!("/api/v1/devices/{id}/secret"), None)
            .await?;
        if !status.is_success() {
            anyhow::bail!(
                "rotating the secret of {id}: {status} {}",
                body["error_description"]
            );
        }
        body["secret"].as_str().map(str::to_string)
    } else {
        anyhow::bail!("registering {id}: {status} {}", body["error_description"]);
    };
    let secret = secret.with_context(|| format!("no secret in the answer for {id}"))?;
    // The first token now, while provisioning runs in parallel (the server verifies a new
    // secret with argon2 once), rather than device by device at start.
    let token = client_token(&api.http, base, id, &secret).await?;
    Ok(Known {
        secret,
        token_expires_ms: token.as_ref().map_or(0, |t| t.1),
        token: token.map(|t| t.0),
    })
}

/// Registers or reuses every device of the fleet, a few at a time (the server hashes each
/// new secret with argon2, on purpose slowly).
async fn provision(api: Arc<Api>, spec: &FleetSpec) -> anyhow::Result<Vec<Provisioned>> {
    let mut file = DevicesFile::load(&spec.devices_file);
    let same_server = file.server == spec.base;
    let width = spec.count.to_string().len().max(4);
    let limit = Arc::new(Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..spec.count {
        let id = format!("{}-{:0width$}", spec.prefix, i + 1);
        if !stratus_device::valid_device_id(&id) {
            return Err(UsageError(format!("--prefix: {id:?} is not a valid device id")).into());
        }
        let transport = spec.transports[i % spec.transports.len()];
        let mut known = file.devices.get(&id).cloned();
        if !same_server {
            if let Some(k) = &mut known {
                k.token = None;
            }
        }
        let api = api.clone();
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let k = provision_one(&api, &id, transport, known).await;
            (i, id, transport, k)
        });
    }
    let mut out: Vec<Option<Provisioned>> = (0..spec.count).map(|_| None).collect();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (i, id, transport, k) = joined.context("provisioning task")?;
        match k {
            Ok(known) => {
                file.devices.insert(id.clone(), known.clone());
                out[i] = Some(Provisioned {
                    id,
                    transport,
                    known,
                });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    file.server = spec.base.clone();
    file.save(&spec.devices_file)
        .with_context(|| format!("writing {}", spec.devices_file.display()))?;
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(out.into_iter().flatten().collect())
}

/// One simulated sensor's state.
struct Sensor {
    rng: rand::rngs::StdRng,
    base: f64,
    humidity: f64,
    battery: f64,
    drain: f64,
}

impl Sensor {
    fn new(seed: u64) -> Sensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Sensor {
            base: rng.random_range(17.0..25.0),
            humidity: rng.random_range(40.0..65.0),
            battery: rng.random_range(60.0..100.0),
            drain: rng.random_range(0.001..0.01),
            rng,
        }
    }

    fn gauss(&mut self) -> f64 {
        // Box–Muller.
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A reading now: temperature peaks mid-afternoon (UTC) with ±4 °C over the day, humidity
    /// moves against it, the battery drains (and is replaced at 5%); one reading in 500 is an
    /// anomaly (a spike of 8–15 °C either way).
    fn sample(&mut self, now_ms: i64) -> Record {
        let day = (now_ms.rem_euclid(86_400_000)) as f64 / 86_400_000.0;
        let cycle = (std::f64::consts::TAU * (day - 0.375)).sin();
        let mut t = self.base + 4.0 * cycle + 0.2 * self.gauss();
        if self.rng.random_ratio(1, 500) {
            let spike = self.rng.random_range(8.0..15.0);
            t += if self.rng.random_bool(0.5) {
                spike
            } else {
                -spike
            };
        }
        let h = (self.humidity - 1.5 * (t - self.base) + 0.8 * self.gauss()).clamp(5.0, 100.0);
        self.battery -= self.drain;
        if self.battery < 5.0 {
            self.battery = 100.0;
        }
        Record::new()
            .with("temperature", (t * 100.0).round() / 100.0)
            .with("humidity", (h * 10.0).round() / 10.0)
            .with("battery", (self.battery * 100.0).round() / 100.0)
    }
}

/// A running fleet.
pub struct Fleet {
    devices: Vec<(Arc<Device>, Transport)>,
    tasks: tokio::task::JoinSet<()>,
    cancel: CancellationToken,
    started: Instant,
    progress: Option<tokio::task::JoinHandle<()>>,
}

/// Fleet totals.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    devices: usize,
    connected: usize,
    sent: u64,
    acked: u64,
    failed: u64,
    dropped: u64,
    buffered: u64,
}

fn totals(devices: &[(Arc<Device>, Transport)]) -> Totals {
    let mut t = Totals {
        devices: devices.len(),
        ..Totals::default()
    };
    for (d, _) in devices {
        let s: Stats = d.stats();
        t.connected += usize::from(s.connected);
        t.sent += s.records_accepted;
        t.acked += s.records_acked;
        t.failed += s.records_failed;
        t.dropped += s.records_dropped;
        t.buffered += s.records_buffered;
    }
    t
}

/// Peak resident memory of this process (Linux), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Fleet {
    /// Provisions the devices (with the admin token `admin_token`) and starts them.
    pub async fn start(spec: FleetSpec, admin_token: String) -> anyhow::Result<Fleet> {
        if !(spec.rate > 0.0 && spec.rate.is_finite()) {
            return Err(UsageError("--rate must be a positive number".into()).into());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("stratus-sim/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("HTTP client")?;
        let api = Arc::new(Api {
            http: http.clone(),
            base: spec.base.clone(),
            token: admin_token,
        });
        let t0 = Instant::now();
        let provisioned = provision(api, &spec).await?;
        tracing::info!(devices = provisioned.len(), took = ?t0.elapsed(), "fleet provisioned");

        let cancel = CancellationToken::new();
        let mut devices = Vec::with_capacity(provisioned.len());
        let mut tasks = tokio::task::JoinSet::new();
        let interval = Duration::from_secs_f64(1.0 / spec.rate);
        for (i, p) in provisioned.into_iter().enumerate() {
            let mut b = Device::builder(&spec.base, &p.id, &p.known.secret)
                .transport(p.transport)
                .mqtt_version(spec.mqtt_version)
                .http_client(http.clone())
                .keep_alive(Duration::from_secs(60))
                .config_poll_interval(Duration::from_secs(10))
                .window(2);
            if let Some(m) = &spec.mqtt {
                b = b.mqtt(m.clone());
            }
            if let Some(c) = &spec.coap {
                b = b.coap(c.clone());
            }
            if let Some(t) = &p.known.token {
                let left = p.known.token_expires_ms - now_ms();
                if left > 60_000 {
                    b = b.access_token(t.clone(), Duration::from_millis(left as u64));
                }
            }
            let device = Arc::new(
                b.build()
                    .await
                    .with_context(|| format!("starting device {}", p.id))?,
            );
            devices.push((device.clone(), p.transport));
            let cancel = cancel.clone();
            tasks.spawn(simulate(device, i as u64, interval, cancel));
        }
        let progress = spec.progress.then(|| {
            let devices = devices.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let mut last = totals(&devices);
                let mut at = Instant::now();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let now = totals(&devices);
                    let rate = (now.acked - last.acked) as f64 / at.elapsed().as_secs_f64();
                    eprintln!(
                        "sim: {}/{} connected, sent {} acked {} failed {} buffered {}, {:.0} records/s",
                        now.connected,
                        now.devices,
                        now.sent,
                        now.acked,
                        now.failed + now.dropped,
                        now.buffered,
                        rate
                    );
                    last = now;
                    at = Instant::now();
                }
            })
        });
        Ok(Fleet {
            devices,
            tasks,
            cancel,
            started: Instant::now(),
            progress,
        })
    }

    /// The fleet's access tokens, to keep for the next run.
    fn remember_tokens(&self, path: &Path, base: &str) {
        let mut file = DevicesFile::load(path);
        if file.server != base {
            return;
        }
        for (d, _) in &self.devices {
            if let (Some(k), Some((token, left))) = (file.devices.get_mut(d.id()), d.access_token())
            {
                k.token = Some(token);
                k.token_expires_ms = now_ms() + left.as_millis() as i64;
            }
        }
        if let Err(e) = file.save(path) {
            tracing::warn!(error = %e, "cannot save the fleet's tokens");
        }
    }

    /// Stops sampling, waits up to `drain` for what is unacknowledged, closes every device;
    /// the summary.
    pub async fn stop(mut self, drain: Duration) -> Summary {
        let ran = self.started.elapsed();
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        if let Some(p) = self.progress.take() {
            let _ = p.await;
        }
        let deadline = Instant::now() + drain;
        for (d, _) in &self.devices {
            let left = deadline.saturating_duration_since(Instant::now());
            if d.flush(left).await.is_err() {
                break;
            }
        }
        let t = totals(&self.devices);
        let mut per_device = Vec::with_capacity(self.devices.len());
        let mut transports: BTreeMap<String, usize> = BTreeMap::new();
        for (d, tr) in &self.devices {
            *transports.entry(tr.to_string()).or_default() += 1;
            let s = d.stats();
            per_device.push(json!({
                "id": d.id(),
                "transport": tr.to_string(),
                "sent": s.records_accepted,
                "acked": s.records_acked,
                "connected": s.connected,
                "status": match d.status() {
                    Status::Connected => "connected".to_string(),
                    Status::Connecting => "connecting".to_string(),
                    Status::Offline(why) => format!("offline: {why}"),
                    Status::Unauthorized(why) => format!("unauthorized: {why}"),
                    Status::Closed => "closed".to_string(),
                },
            }));
        }
        let mut closing = tokio::task::JoinSet::new();
        for (d, _) in self.devices.drain(..) {
            closing.spawn(async move { d.close().await });
        }
        while closing.join_next().await.is_some() {}
        Summary {
            totals: t,
            ran,
            transports,
            per_device,
            peak_rss_kib: peak_rss_kib(),
        }
    }
}

/// One device's life: sample at the configured interval, follow the desired config.
async fn simulate(
    device: Arc<Device>,
    index: u64,
    default_interval: Duration,
    cancel: CancellationToken,
) {
    let mut sensor = Sensor::new(index.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed);
    let mut interval = default_interval;
    let mut config = device.config_watch();
    // Spread the fleet over the first interval.
    let offset = interval.mul_f64(rand::rng().random::<f64>());
    let mut next = tokio::time::Instant::now() + offset;
    let _ = device.report_config(json!({"interval_s": interval.as_secs_f64()}));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                let _ = device.send(sensor.sample(now_ms()));
                next += interval;
                let now = tokio::time::Instant::now();
                if next < now {
                    next = now + interval;
                }
            }
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                let desired = config.borrow_and_update().clone();
                let Some(desired) = desired else { continue };
                let wanted = desired
                    .get("interval_s")
                    .and_then(Value::as_f64)
                    .filter(|s| s.is_finite() && *s >= 0.01 && *s <= 86_400.0)
                    .map(Duration::from_secs_f64)
                    .unwrap_or(default_interval);
                if wanted != interval {
                    interval = wanted;
                    next = tokio::time::Instant::now() + interval;
                }
                let mut reported = desired.config.clone();
                if !reported.is_object() {
                    reported = json!({});
                }
                reported["interval_s"] = json!(interval.as_secs_f64());
                let _ = device.report_config(reported);
            }
        }
    }
}

/// What a fleet did.
pub struct Summary {
    totals: Totals,
    ran: Duration,
    transports: BTreeMap<String, usize>,
    per_device: Vec<Value>,
    peak_rss_kib: Option<u64>,
}

impl Summary {
    /// Whether every record was acknowledged.
    pub fn complete(&self) -> bool {
        let t = &self.totals;
        t.failed == 0 && t.dropped == 0 && t.buffered == 0 && t.acked == t.sent
    }

    fn json(&self) -> Value {
        let t = &self.totals;
        json!({
            "devices": t.devices,
            "transports": self.transports,
            "duration_s": self.ran.as_secs_f64(),
            "records_sent": t.sent,
            "records_acked": t.acked,
            "records_failed": t.failed,
            "records_dropped": t.dropped,
            "records_unacked": t.buffered,
            "acked_per_s": t.acked as f64 / self.ran.as_secs_f64().max(0.001),
            "peak_rss_kib": self.peak_rss_kib,
            "per_device": self.per_device,
        })
    }

    fn text(&self) -> String {
        let t = &self.totals;
        let transports: Vec<String> = self
            .transports
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let mut s = format!(
            "sim: {} devices ({}) for {:.1}s: sent {} acked {} failed {} dropped {} unacked {} ({:.0} records/s)",
            t.devices,
            transports.join(", "),
            self.ran.as_secs_f64(),
            t.sent,
            t.acked,
            t.failed,
            t.dropped,
            t.buffered,
            t.acked as f64 / self.ran.as_secs_f64().max(0.001),
        );
        if let Some(kib) = self.peak_rss_kib {
            s.push_str(&format!(", peak RSS {:.1} MiB", kib as f64 / 1024.0));
        }
        s
    }
}

/// Raises the open-files limit to its hard limit: every MQTT device holds a socket.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// `stratus sim`.
pub fn run(args: SimArgs) -> anyhow::Result<bool> {
    let duration = parse_duration(&args.duration).ok_or_else(|| {
        UsageError(format!(
            "--duration {:?}: a duration such as 30s, 5m, 1h",
            args.duration
        ))
    })?;
    let drain = parse_duration(&args.drain)
        .ok_or_else(|| UsageError(format!("--drain {:?}: a duration such as 10s", args.drain)))?;
    let transports = transports(&args.transport)?;
    let mqtt_version = match args.mqtt_version.as_str() {
        "5" | "5.0" => MqttVersion::V5,
        "3.1.1" | "3" | "4" => MqttVersion::V311,
        other => return Err(UsageError(format!("--mqtt-version {other:?}: 5 or 3.1.1")).into()),
    };
    let json = match args.format.as_str() {
        "json" => true,
        "text" => false,
        other => return Err(UsageError(format!("--format {other:?}: text or json")).into()),
    };
    if args.devices == 0 {
        return Err(UsageError("--devices must be at least 1".into()).into());
    }
    let base = args.server.base_url();
    let secret = args.server.admin_secret()?;
    let mqtt = args.mqtt.clone().map(|m| {
        if m.contains("://") {
            m
        } else {
            format!("mqtt://{m}")
        }
    });
    let devices_file = args
        .devices_file
        .clone()
        .unwrap_or_else(|| admin::default_data_dir().join("sim-devices.json"));
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let http = reqwest::Client::new();
        let admin_token = match client_token(&http, &base, "admin", &secret).await? {
            Some((t, _)) => t,
            None => anyhow::bail!("the server refused the admin secret"),
        };
        let spec = FleetSpec {
            base: base.clone(),
            mqtt,
            coap: args.coap.clone(),
            prefix: args.prefix.clone(),
            count: args.devices,
            transports,
            rate: args.rate,
            mqtt_version,
            devices_file: devices_file.clone(),
            progress: true,
        };
        let fleet = Fleet::start(spec, admin_token).await?;
        let run_for = async {
            if duration.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(duration).await
            }
        };
        tokio::select! {
            _ = run_for => {}
            _ = tokio::signal::ctrl_c() => { eprintln!("sim: interrupted; draining"); }
        }
        fleet.remember_tokens(&devices_file, &base);
        let summary = fleet.stop(drain).await;
        if json {
            println!("{}", summary.json());
        } else {
            println!("{}", summary.text());
        }
        Ok(summary.complete())
    })
}

fn loopback(a: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut a = a;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}

/// `stratus serve --demo`: prints where the dashboard and the admin secret are, then starts
/// a dozen devices (MQTT, HTTP and CoAP in turn) against the
/// server in this process, in the background. Their secrets are kept in
/// `DATA_DIR/demo-devices.json`, so a restart reuses them.
pub fn start_demo(
    server: &stratus_server::Server,
    data_dir: &Path,
) -> tokio::task::JoinHandle<Option<Fleet>> {
    use stratus_server::auth::ADMIN_CLIENT;
    let http = loopback(server.http_addr);
    let mqtt = loopback(server.mqtt_addr);
    let coap = loopback(server.coap_addr);
    println!("dashboard http://{http}/");
    let secret_file = data_dir.join("admin-secret");
    if !secret_file.exists() && std::env::var("STRATUS_ADMIN_SECRET").is_ok_and(|s| !s.is_empty()) {
        println!("admin secret from STRATUS_ADMIN_SECRET (client id admin)");
    } else {
        println!("admin secret in {}", secret_file.display());
    }
    // The fleet registers its devices through the HTTP API like any admin tool, with a token
    // minted in-process (the admin secret may live only in the environment of a former run).
    let token = server
        .auth
        .principal(ADMIN_CLIENT)
        .ok_or_else(|| "no admin client".to_string())
        .and_then(|admin| server.auth.issue(&admin, None))
        .map(|i| i.access_token);
    let spec = FleetSpec {
        base: format!("http://{http}"),
        mqtt: Some(format!("mqtt://{mqtt}")),
        coap: Some(format!("coap://{coap}")),
        prefix: "demo".into(),
        count: 12,
        transports: vec![Transport::Mqtt, Transport::Http, Transport::Coap],
        rate: 1.0,
        mqtt_version: MqttVersion::V5,
        devices_file: data_dir.join("demo-devices.json"),
        progress: false,
    };
    let rules = server.rules.clone();
    tokio::spawn(async move {
        install_demo_rules(&rules).await;
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "the demo fleet has no admin token");
                return None;
            }
        };
        match Fleet::start(spec, token).await {
            Ok(fleet) => {
                tracing::info!(
                    devices = fleet.devices.len(),
                    "demo fleet running: demo-0001… over MQTT, HTTP and CoAP, one record a second each"
                );
                Some(fleet)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the demo fleet could not start");
                None
            }
        }
    })
}

/// The demo's sample rules, installed when no rule of that id exists yet (so they can be
/// edited or deleted and stay that way): a hot spike, a low battery, a silent device.
pub async fn install_demo_rules(rules: &stratus_server::rules::Rules) {
    let samples = [
        serde_json::json!({"id": "demo-hot", "name": "Hot", "condition": "temperature > 30",
            "severity": "major", "selector": {"id_glob": "demo-*"}}),
        serde_json::json!({"id": "demo-battery-low", "name": "Battery low", "condition": "battery < 15",
            "severity": "warning", "selector": {"id_glob": "demo-*"}}),
        serde_json::json!({"id": "demo-silent", "name": "Silent for 60 s", "kind": "silent",
            "silent_s": 60, "severity": "critical", "selector": {"id_glob": "demo-*"}}),
    ];
    for sample in samples {
        let Ok(def) = serde_json::from_value::<stratus_server::rules::RuleDef>(sample) else {
            continue;
        };
        let id = def.id.clone().unwrap_or_default();
        if rules.rule(&id).is_some() {
            continue;
        }
        match rules.put(def).await {
            Ok(_) => tracing::info!(rule = %id, "demo rule installed"),
            Err(e) => tracing::warn!(rule = %id, error = %e, "demo rule not installed"),
        }
    }
}

/// Stops the demo fleet (before the server stops, so its devices leave cleanly).
pub async fn stop_demo(fleet: tokio::task::JoinHandle<Option<Fleet>>) {
    if !fleet.is_finished() {
        fleet.abort();
    }
    if let Ok(Some(fleet)) = fleet.await {
        fleet.stop(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5y"), None);
    }

    #[test]
    fn transports_by_name() {
        assert_eq!(transports("mqtt").unwrap(), vec![Transport::Mqtt]);
        assert_eq!(transports("mixed").unwrap().len(), 3);
        assert_eq!(transports("coap").unwrap(), vec![Transport::Coap]);
        assert!(transports("carrier-pigeon").is_err());
    }

    #[test]
    fn sensors_are_plausible() {
        let mut s = Sensor::new(7);
        let start = 1_700_000_000_000i64;
        for i in 0..2000 {
            let r = s.sample(start + i * 60_000);
            let t = r.fields()["temperature"].as_f64().unwrap();
            let h = r.fields()["humidity"].as_f64().unwrap();
            let b = r.fields()["battery"].as_f64().unwrap();
            assert!((-10.0..50.0).contains(&t), "{t}");
            assert!((5.0..=100.0).contains(&h), "{h}");
            assert!((5.0..=100.0).contains(&b), "{b}");
        }
    }
}
