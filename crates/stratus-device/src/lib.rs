//! # stratus-device
//!
//! The device side of Stratus: connect a device to a Stratus server over MQTT (3.1.1 or 5.0,
//! TCP or TLS) or HTTP, send telemetry without losing or duplicating it across outages,
//! receive the desired configuration and report the configuration in force.
//!
//! ```no_run
//! use stratus_device::{Device, Record, Transport};
//!
//! # async fn demo() -> Result<(), stratus_device::Error> {
//! let mut device = Device::builder("http://127.0.0.1:8080", "pump-7", "SECRET")
//!     .mqtt("mqtt://127.0.0.1:1883")
//!     .transport(Transport::Mqtt)
//!     .buffer_file("pump-7.buffer")
//!     .build()
//!     .await?;
//! device.send(Record::new().with("temperature", 21.5).with("pressure", 1.02))?;
//! let desired = device.next_config().await?; // the retained desired config comes at once
//! device.report_config(desired.config.clone())?;
//! device.flush(std::time::Duration::from_secs(10)).await?; // everything acknowledged
//! device.close().await;
//! # Ok(()) }
//! ```
//!
//! ## What the SDK promises
//! - **Acknowledged means stored.** A record leaves the buffer only when the server
//!   acknowledged the message carrying it (HTTP 202, MQTT PUBACK — the server sends both only
//!   once the points are durable). Until then it is buffered (bounded by
//!   [`DeviceBuilder::buffer_capacity`], optionally journaled to
//!   [`DeviceBuilder::buffer_file`]) and resent after every reconnect, in order.
//! - **No duplicates.** A record gets its `ts` once, when [`Device::send`] takes it (distinct
//!   per device: a burst within one millisecond gets consecutive milliseconds), and keeps it
//!   on every resend; the server stores the first point per (device, series, `ts`), so a
//!   resend of a message whose acknowledgement was lost stores nothing twice.
//! - **Fresh messages.** Every message is the envelope `{"sent", "nonce", "records": [...]}`
//!   with a new random nonce and the current time per attempt (SPEC "Telemetry record": the
//!   server refuses a reused nonce or a `sent` more than 10 s off). `sent` is corrected by the
//!   server clock seen in the token endpoint's `Date` header when the two differ by more than
//!   2 s. There is deliberately no `seq` field: every top-level number of a record is a series,
//!   and the `ts` is what identifies a record.
//! - **Tokens.** The device obtains an OAuth 2.0 access token with its id and secret (client
//!   credentials, HTTP Basic), refreshes it when 80% of `expires_in` has passed and at once on
//!   a 401, and uses it as the HTTP bearer token and (by default) as the MQTT password, so the
//!   secret crosses the network only to the token endpoint.
//! - **Refusals.** An MQTT 5 PUBACK with an error code, or HTTP 400/413, makes the SDK split
//!   the batch until the refused record is alone; a record refused twice on its own is dropped
//!   and counted in [`Stats::records_failed`]. MQTT 3.1.1 cannot tell a refusal (the server
//!   acknowledges and drops it), so MQTT 5 is the default.
//!
//! ## Transports
//! - [`Transport::Mqtt`]: one connection (clean session, client id = device id, user name =
//!   device id), subscribed to the retained `devices/{id}/config` and `devices/{id}/firmware`;
//!   telemetry is published at QoS 1 on `devices/{id}/telemetry` with up to
//!   [`DeviceBuilder::window`] messages in flight; the reported configuration goes to
//!   `devices/{id}/config/reported`. A connection is a fresh `rumqttc` event loop each time,
//!   so nothing of a dead connection is replayed behind the SDK's back: what was not
//!   acknowledged goes back to the buffer and is resent with a new envelope.
//! - [`Transport::Http`]: `POST /api/v1/telemetry` one batch at a time, the desired
//!   configuration polled with `GET /api/v1/devices/{id}/config` (`If-None-Match`, every
//!   [`DeviceBuilder::config_poll_interval`]), the reported one sent with
//!   `PUT /api/v1/devices/{id}/config/reported`.
//! - [`Transport::Coap`]: RFC 7252 over UDP with the workspace's sans-IO `stratus-coap`
//!   endpoint as the client: `POST /telemetry?token=…` (the device's 59-character access
//!   token), `GET /config` polled, `PUT /config/reported`; small messages
//!   (about 1 KiB of records), confirmable, one at a time. With a `coaps://` URL
//!   ([`DeviceBuilder::coap`]) the same runs over DTLS 1.2 PSK: identity = device id, key =
//!   [`stratus_coap::psk::device_psk`] of the secret (what the server stores at registration
//!   and rotation), no access token.
//!
//! Firmware: a [`FirmwareHandler`] given to [`DeviceBuilder::firmware_handler`] receives the
//! assignment notice of the retained `devices/{id}/firmware` (MQTT); with HTTP or CoAP,
//! [`firmware::FirmwareUpdater::poll_notice`] fetches it. [`firmware::FirmwareUpdater::apply`]
//! checks the signed manifest (trusted key, hardware id, no downgrade), downloads over HTTP
//! (resumed with `Range` after a dropped connection) or CoAP Block2 while hashing, verifies,
//! hands the image to an install callback and reports `downloading`, `verified`, `installed`
//! or `failed` with the reason (see [`firmware`]) — over HTTP/CoAP, or on
//! `devices/{id}/firmware/status` over the device's MQTT connection once
//! [`firmware::FirmwareUpdater::report_over`] ties the updater to an MQTT [`Device`].
//!
//! ## Dependencies, and why
//! - `rumqttc`: a well-kept, widely used MQTT 3.1.1/5.0 client; using it (rather than our own
//!   `stratus-mqtt`) also proves the broker interoperates with a client we did not write. Its
//!   rustls flavour without a bundled crypto provider, so the workspace's `ring` is the only one.
//! - `reqwest` (rustls, JSON): the HTTP transport and the token endpoint; the same client the
//!   `stratus` CLI uses, so no second HTTP stack is built.
//! - `rustls`, `rustls-pki-types`, `webpki-roots`: the TLS configuration for MQTTS — the
//!   Mozilla roots plus any CA given with [`DeviceBuilder::root_certificate_pem`].
//! - `tokio`, `tokio-util`: one task per device (plus one per MQTT connection), cancellation.
//! - `stratus-coap`: the CoAP message layer (codec, retransmission, deduplication) as a
//!   sans-IO state machine; this crate only drives it with a UDP socket and a timer. It also
//!   defines the CoAPS PSK derivation the server uses.
//! - `openssl`: DTLS 1.2 PSK for CoAPS (rustls has no DTLS); the library the server and
//!   libcoap use, driven sans-IO over an in-memory datagram queue as the server drives it.
//! - `serde`, `serde_json`: records, envelopes, configuration documents.
//! - `httpdate`: reads the server's clock from the `Date` header.
//! - `stratus-firmware`: manifest verification, the same code the server and the CLI run.
//! - `parking_lot`: the short locks around the buffer; `rand`: nonces and back-off jitter;
//!   `thiserror`: [`Error`]; `tracing`: logs; `bytes`: MQTT payloads.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod buffer;
mod coap;
mod dtls;
mod error;
pub mod firmware;
mod http;
mod mqtt;
mod poll;
mod record;
mod token;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use buffer::Overflow;
pub use error::Error;
pub use record::Record;

use buffer::Buffer;
use token::Tokens;

/// How the device talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// MQTT (the default).
    #[default]
    Mqtt,
    /// HTTP (`POST /api/v1/telemetry`).
    Http,
    /// CoAP (RFC 7252) over UDP.
    Coap,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Mqtt => "mqtt",
            Transport::Http => "http",
            Transport::Coap => "coap",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s.to_ascii_lowercase().as_str() {
            "mqtt" => Ok(Transport::Mqtt),
            "http" => Ok(Transport::Http),
            "coap" => Ok(Transport::Coap),
            other => Err(format!("{other:?} is not mqtt, http or coap")),
        }
    }
}

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 3.1.1: the server cannot tell the device that it refused a message.
    V311,
    /// MQTT 5.0 (the default): refusals come back as PUBACK reason codes.
    #[default]
    V5,
}

/// What the MQTT connection uses as its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttPassword {
    /// An access token from the token endpoint (the default; needs the HTTP server too).
    #[default]
    AccessToken,
    /// The device secret itself (MQTT only, no HTTP needed).
    Secret,
}

/// The desired configuration the cloud wants the device to have (SPEC: versioned; the payload
/// of the retained `devices/{id}/config`, the body of `GET /api/v1/devices/{id}/config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredConfig {
    /// Starts at 0 (`{}`) at registration; every change adds one.
    pub version: u64,
    /// A JSON object.
    pub config: Value,
    /// When it was set (RFC 3339).
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl DesiredConfig {
    /// The value of one key of the configuration.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.config.get(key)
    }
}

/// The firmware seam: called with the notice JSON of each firmware assignment (the retained
/// `devices/{id}/firmware`, MQTT only). Parse it with
/// [`firmware::FirmwareNotice::from_json`] and hand it to a [`firmware::FirmwareUpdater`]
/// (from a task of its own: the handler runs on the MQTT event loop).
pub trait FirmwareHandler: Send + Sync + 'static {
    /// A firmware assignment for device `device_id` arrived.
    fn on_firmware_assignment(&self, device_id: &str, manifest: &Value);
}

impl<F: Fn(&str, &Value) + Send + Sync + 'static> FirmwareHandler for F {
    fn on_firmware_assignment(&self, device_id: &str, manifest: &Value) {
        self(device_id, manifest)
    }
}

/// Where the device stands with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting (or waiting to retry).
    Connecting,
    /// Connected (MQTT) or the last request succeeded (HTTP).
    Connected,
    /// The server is unreachable or the connection dropped; buffering and retrying.
    Offline(String),
    /// The server refuses the credentials; retrying slowly (fix the secret).
    Unauthorized(String),
    /// [`Device::close`] was called.
    Closed,
}

/// Counters of one device since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Records taken by [`Device::send`] (plus those found in the buffer file).
    pub records_accepted: u64,
    /// Records the server acknowledged (stored).
    pub records_acked: u64,
    /// Records the server refused for good (dropped).
    pub records_failed: u64,
    /// Records dropped because the buffer was full ([`Overflow::DropOldest`]).
    pub records_dropped: u64,
    /// Records waiting or in flight now.
    pub records_buffered: u64,
    /// Telemetry messages sent (every attempt counts).
    pub messages_sent: u64,
    /// Successful connections (MQTT CONNACKs; HTTP: recoveries from offline, plus one).
    pub connects: u64,
    /// Whether the device is connected now.
    pub connected: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    messages: AtomicU64,
    connects: AtomicU64,
    connected: AtomicBool,
}

/// The reported configuration waiting to be sent: the latest one wins.
#[derive(Default)]
pub(crate) struct ReportSlot {
    pending: Option<Value>,
    in_flight: bool,
}

/// Batch limits of one telemetry message.
#[derive(Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

/// What the device handle and its background task share.
pub(crate) struct Shared {
    pub id: String,
    pub buffer: Mutex<Buffer>,
    pub wake: Notify,
    pub progress: watch::Sender<u64>,
    pub config: watch::Sender<Option<DesiredConfig>>,
    pub status: watch::Sender<Status>,
    pub report: Mutex<ReportSlot>,
    pub counters: Counters,
    pub cancel: CancellationToken,
    pub firmware: Option<Arc<dyn FirmwareHandler>>,
    pub batch: BatchLimits,
    pub tokens: Tokens,
    /// Whether the background task speaks MQTT (firmware status reports can go over it).
    pub mqtt: bool,
    /// Firmware status reports waiting to be published on `devices/{id}/firmware/status`
    /// (MQTT only), each with who waits for its PUBACK.
    pub firmware_status: Mutex<std::collections::VecDeque<firmware::StatusJob>>,
}

impl Shared {
    pub fn set_status(&self, status: Status) {
        self.counters
            .connected
            .store(status == Status::Connected, Ordering::Relaxed);
        self.status.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }

    pub fn connected(&self) {
        if *self.status.borrow() != Status::Connected {
            self.counters.connects.fetch_add(1, Ordering::Relaxed);
        }
        self.set_status(Status::Connected);
    }

    fn bump(&self) {
        self.progress.send_modify(|n| *n += 1);
    }

    /// Records the server acknowledged.
    pub fn acked(&self, entries: &[buffer::Entry]) {
        if let Err(e) = self.buffer.lock().settle(entries) {
            tracing::warn!(device = %self.id, error = %e, "buffer journal");
        }
        self.counters
            .acked
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.bump();
    }

    /// A record the server refused for good.
    pub fn failed(&self, entries: &[buffer::Entry], why: &str) {
        tracing::warn!(device = %self.id, records = entries.len(), reason = why, "the server refused records; dropped");
        if let Err(e) = self.buffer.lock().settle(entries) {
            tracing::warn!(device = %self.id, error = %e, "buffer journal");
        }
        self.counters
            .failed
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.bump();
    }

    /// Records that go back to the buffer, to be resent.
    pub fn requeue(&self, entries: Vec<buffer::Entry>) {
        if !entries.is_empty() {
            self.buffer.lock().requeue(entries);
        }
    }

    /// A batch refused as invalid: split it (by requeueing and shrinking the batch size) until
    /// the culprit is alone; drop a record alone refused `limit` times. Returns the next batch
    /// size limit.
    pub fn refused(&self, mut entries: Vec<buffer::Entry>, limit: u8, why: &str) -> usize {
        for e in &mut entries {
            e.refusals = e.refusals.saturating_add(1);
        }
        if entries.len() == 1 && entries[0].refusals >= limit {
            self.failed(&entries, why);
            return self.batch.max_records;
        }
        let next = (entries.len() / 2).max(1);
        self.requeue(entries);
        next
    }

    /// The next reported configuration to send, marking it in flight.
    pub fn take_report(&self) -> Option<Value> {
        let mut slot = self.report.lock();
        if slot.in_flight {
            return None;
        }
        let v = slot.pending.take()?;
        slot.in_flight = true;
        Some(v)
    }

    /// The reported configuration was stored (or refused for good).
    pub fn report_done(&self) {
        self.report.lock().in_flight = false;
        self.bump();
    }

    /// The reported configuration could not be sent: keep it unless a newer one is waiting.
    pub fn report_back(&self, v: Value) {
        let mut slot = self.report.lock();
        slot.in_flight = false;
        if slot.pending.is_none() {
            slot.pending = Some(v);
        }
    }

    /// A desired configuration arrived (MQTT message or HTTP poll).
    pub fn desired(&self, doc: DesiredConfig) {
        self.config.send_if_modified(|cur| {
            if cur.as_ref() == Some(&doc) {
                false
            } else {
                tracing::debug!(device = %self.id, version = doc.version, "desired configuration");
                *cur = Some(doc);
                true
            }
        });
    }

    fn idle(&self) -> bool {
        let slot = self.report.lock();
        self.buffer.lock().len() == 0 && slot.pending.is_none() && !slot.in_flight
    }
}

/// Retry delays: exponential from 0.5 s to 30 s, with jitter.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn new() -> Backoff {
        Backoff { next: Self::MIN }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next delay (between half and all of the current step).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter: f64 = rand::random::<f64>() * 0.5 + 0.5;
        step.mul_f64(jitter)
    }
}

/// A reqwest error with its causes.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The API's `error_description`, or the start of the body.
pub(crate) fn error_description(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error_description")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// Whether `id` is a valid device id (`[A-Za-z0-9._-]{1,64}`).
pub fn valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Configures and builds a [`Device`]; see [`Device::builder`].
#[must_use]
pub struct DeviceBuilder {
    server: String,
    id: String,
    secret: String,
    mqtt: Option<String>,
    coap: Option<String>,
    transport: Transport,
    version: MqttVersion,
    password: MqttPassword,
    capacity: usize,
    overflow: Overflow,
    buffer_file: Option<PathBuf>,
    roots: Vec<Vec<u8>>,
    keep_alive: Duration,
    config_poll: Duration,
    batch: BatchLimits,
    window: usize,
    firmware: Option<Arc<dyn FirmwareHandler>>,
    http: Option<reqwest::Client>,
    token: Option<(String, Duration)>,
    request_timeout: Duration,
}

impl DeviceBuilder {
    /// The MQTT broker: `mqtt://HOST:PORT` (TCP; also `tcp://`), `mqtts://HOST:PORT` (TLS; also
    /// `ssl://`, `tls://`), or `HOST:PORT`. Default: the server's host, port 1883 (8883 when
    /// the server URL is `https`).
    pub fn mqtt(mut self, url: impl Into<String>) -> Self {
        self.mqtt = Some(url.into());
        self
    }

    /// The CoAP server: `coap://HOST:PORT` or `HOST:PORT` (default: the server's host, port
    /// 5683), or `coaps://HOST:PORT` (DTLS 1.2 PSK, default port 5684) for CoAPS, where the
    /// device authenticates with the PSK derived from its secret instead of a token.
    pub fn coap(mut self, url: impl Into<String>) -> Self {
        self.coap = Some(url.into());
        self
    }

    /// The transport (default [`Transport::Mqtt`]).
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The MQTT version (default [`MqttVersion::V5`]).
    pub fn mqtt_version(mut self, version: MqttVersion) -> Self {
        self.version = version;
        self
    }

    /// What the MQTT connection sends as its password (default: an access token).
    pub fn mqtt_password(mut self, password: MqttPassword) -> Self {
        self.password = password;
        self
    }

    /// Most records buffered while offline or in flight (default 10 000).
    pub fn buffer_capacity(mut self, records: usize) -> Self {
        self.capacity = records.max(1);
        self
    }

    /// What [`Device::send`] does when the buffer is full (default [`Overflow::DropOldest`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Journals the buffer to this file so a restarted device resends what was not
    /// acknowledged (see the `buffer` module docs for the format).
    pub fn buffer_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.buffer_file = Some(path.into());
        self
    }

    /// Trusts this CA (PEM, one or more certificates) for MQTTS and HTTPS, besides the
    /// Mozilla roots.
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots.push(pem.into());
        self
    }

    /// MQTT keep alive (default 30 s; at least 1 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive.max(Duration::from_secs(1));
        self
    }

    /// HTTP and CoAP: how often the desired configuration is polled (default 30 s).
    pub fn config_poll_interval(mut self, every: Duration) -> Self {
        self.config_poll = every.max(Duration::from_millis(100));
        self
    }

    /// Most records in one telemetry message (default 500; the server takes up to 10 000).
    pub fn max_batch(mut self, records: usize) -> Self {
        self.batch.max_records = records.clamp(1, 10_000);
        self
    }

    /// MQTT: most telemetry messages awaiting their PUBACK at once (default 4).
    pub fn window(mut self, messages: usize) -> Self {
        self.window = messages.clamp(1, 64);
        self
    }

    /// Receives firmware assignments (see [`FirmwareHandler`]).
    pub fn firmware_handler(mut self, handler: impl FirmwareHandler) -> Self {
        self.firmware = Some(Arc::new(handler));
        self
    }

    /// Shares an HTTP client (connection pool) between devices, e.g. in a simulator. Its
    /// TLS roots are its own: [`root_certificate_pem`](Self::root_certificate_pem) then only
    /// applies to MQTTS.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Starts with this access token (valid for `valid_for`) instead of asking for one.
    pub fn access_token(mut self, token: impl Into<String>, valid_for: Duration) -> Self {
        self.token = Some((token.into(), valid_for));
        self
    }

    /// Timeout of one HTTP request (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Checks the settings, loads the buffer file, asks for a first access token and starts the
    /// device's background task. Fails on bad settings and on refused credentials; an
    /// unreachable server is not an error (the device starts offline and retries).
    pub async fn build(self) -> Result<Device, Error> {
        if !valid_device_id(&self.id) {
            return Err(Error::config(
                "id",
                format!("{:?} is not 1 to 64 of A-Z a-z 0-9 . _ -", self.id),
            ));
        }
        if self.secret.is_empty() {
            return Err(Error::config("secret", "empty"));
        }
        let server = reqwest::Url::parse(&self.server)
            .map_err(|e| Error::config("server", format!("{:?}: {e}", self.server)))?;
        if !matches!(server.scheme(), "http" | "https") || server.host_str().is_none() {
            return Err(Error::config(
                "server",
                format!("{:?} is not an http:// or https:// URL", self.server),
            ));
        }
        let base = self.server.trim_end_matches('/').to_string();
        let http = match self.http {
            Some(c) => c,
            None => {
                let mut b = reqwest::Client::builder()
                    .timeout(self.request_timeout)
                    .connect_timeout(Duration::from_secs(10))
                    .user_agent(concat!("stratus-device/", env!("CARGO_PKG_VERSION")));
                for pem in &self.roots {
                    let certs = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| Error::config("root_certificate_pem", e.to_string()))?;
                    for c in certs {
                        b = b.add_root_certificate(c);
                    }
                }
                b.build()
                    .map_err(|e| Error::config("http_client", describe(&e)))?
            }
        };
        let mqtt = if self.transport == Transport::Mqtt {
            Some(mqtt::Settings::new(
                self.mqtt.as_deref(),
                &server,
                self.version,
                self.password,
                self.keep_alive,
                self.window,
                &self.roots,
            )?)
        } else {
            None
        };
        let coap = if self.transport == Transport::Coap {
            Some(coap::resolve(self.coap.as_deref(), &server).await?)
        } else {
            None
        };
        let coaps = coap.is_some_and(|(_, secure)| secure);
        let buffer = Buffer::open(self.capacity, self.overflow, self.buffer_file.as_deref())?;
        let found = buffer.len() as u64;
        let tokens = Tokens::new(http.clone(), &base, &self.id, &self.secret);
        if let Some((token, valid_for)) = self.token {
            tokens.seed(token, valid_for);
        }
        // CoAPS authenticates with the PSK instead.
        let needs_token = match self.transport {
            Transport::Mqtt => self.password == MqttPassword::AccessToken,
            Transport::Coap => !coaps,
            Transport::Http => true,
        };
        if needs_token {
            match tokens.get().await {
                Ok(_) => {}
                Err(token::TokenError::Refused(reason)) => {
                    return Err(Error::Unauthorized {
                        id: self.id.clone(),
                        reason,
                    })
                }
                Err(token::TokenError::Unavailable(why)) => {
                    tracing::info!(device = %self.id, reason = %why, "server unreachable; starting offline");
                }
            }
        }
        let (config_tx, config_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            id: self.id.clone(),
            buffer: Mutex::new(buffer),
            wake: Notify::new(),
            progress: watch::channel(0).0,
            config: config_tx,
            status: watch::channel(Status::Connecting).0,
            report: Mutex::new(ReportSlot::default()),
            counters: Counters::default(),
            cancel: CancellationToken::new(),
            firmware: self.firmware,
            batch: self.batch,
            tokens,
            mqtt: mqtt.is_some(),
            firmware_status: Mutex::new(std::collections::VecDeque::new()),
        });
        shared.counters.accepted.store(found, Ordering::Relaxed);
        let task = match (mqtt, coap) {
            (Some(settings), _) => tokio::spawn(mqtt::run(shared.clone(), settings)),
            (None, Some((peer, secure))) => tokio::spawn(coap::run(
                shared.clone(),
                coap::Settings {
                    peer,
                    config_poll: self.config_poll,
                    dtls: secure.then(|| {
                        (
                            self.id.clone(),
                            stratus_coap::psk::device_psk(&self.secret, &self.id),
                        )
                    }),
                },
            )),
            (None, None) => tokio::spawn(http::run(
                shared.clone(),
                http,
                http::Settings {
                    base,
                    config_poll: self.config_poll,
                },
            )),
        };
        Ok(Device {
            shared,
            task: Mutex::new(Some(task)),
            config_rx,
        })
    }
}

/// A connected (or connecting) device. Dropping it stops its background task; [`close`]
/// does so gracefully. Every method but [`next_config`](Device::next_config) takes `&self`, so
/// a device can be shared (`Arc<Device>`) between the task that sends and one that watches.
///
/// [`close`]: Device::close
pub struct Device {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
    config_rx: watch::Receiver<Option<DesiredConfig>>,
}

impl Device {
    /// Starts configuring a device that reaches the server's HTTP API at `server` (e.g.
    /// `http://127.0.0.1:8080`; the token endpoint is there) with its id and secret.
    pub fn builder(
        server: impl Into<String>,
        id: impl Into<String>,
        secret: impl Into<String>,
    ) -> DeviceBuilder {
        DeviceBuilder {
            server: server.into(),
            id: id.into(),
            secret: secret.into(),
            mqtt: None,
            coap: None,
            transport: Transport::Mqtt,
            version: MqttVersion::V5,
            password: MqttPassword::AccessToken,
            capacity: 10_000,
            overflow: Overflow::DropOldest,
            buffer_file: None,
            roots: Vec::new(),
            keep_alive: Duration::from_secs(30),
            config_poll: Duration::from_secs(30),
            batch: BatchLimits {
                max_records: 500,
                max_bytes: 256 * 1024,
            },
            window: 4,
            firmware: None,
            http: None,
            token: None,
            request_timeout: Duration::from_secs(30),
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Queues a record for sending; returns at once. The record is stamped now unless it has a
    /// time ([`Record::at`]). Fails on a record the server would refuse for sure, when the
    /// buffer is full under [`Overflow::Reject`], and after [`close`](Device::close).
    pub fn send(&self, record: Record) -> Result<(), Error> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let now = self.shared.tokens.server_now_ms();
        let dropped = self.shared.buffer.lock().push(&record, now)?;
        let c = &self.shared.counters;
        c.accepted.fetch_add(1, Ordering::Relaxed);
        if dropped > 0 {
            c.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Waits until every record and the reported configuration are acknowledged (or refused),
    /// at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), Error> {
        let mut progress = self.shared.progress.subscribe();
        let wait = async {
            loop {
                if self.shared.idle() {
                    return Ok(());
                }
                if progress.changed().await.is_err() {
                    return Err(Error::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout("records still unacknowledged"))?
    }

    /// The next desired configuration not yet returned: the current one at first (MQTT
    /// delivers the retained one right after connecting; HTTP polls), then each change.
    pub async fn next_config(&mut self) -> Result<DesiredConfig, Error> {
        // `changed` resolves at once when a value arrived since the last one returned.
        loop {
            if self.config_rx.changed().await.is_err() {
                return Err(Error::Closed);
            }
            if let Some(c) = self.config_rx.borrow_and_update().clone() {
                return Ok(c);
            }
        }
    }

    /// The latest desired configuration received, if any.
    pub fn config(&self) -> Option<DesiredConfig> {
        self.config_rx.borrow().clone()
    }

    /// A receiver of desired configurations, for callers that select over several sources.
    pub fn config_watch(&self) -> watch::Receiver<Option<DesiredConfig>> {
        self.shared.config.subscribe()
    }

    /// Reports the configuration the device runs (a JSON object); sent as soon as possible
    /// (`devices/{id}/config/reported` or `PUT …/config/reported`). A newer report replaces
    /// one not yet sent. Returns at once; [`flush`](Device::flush) waits for it.
    pub fn report_config(&self, config: Value) -> Result<(), Error> {
        if !config.is_object() {
            return Err(Error::config(
                "report_config",
                "the reported configuration is a JSON object",
            ));
        }
        if self.shared.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        self.shared.report.lock().pending = Some(config);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Where firmware status reports can go over this device's own connection: `Some` when
    /// the transport is MQTT (`devices/{id}/firmware/status`), `None` otherwise. Give it to
    /// [`firmware::FirmwareUpdater::report_over`].
    pub fn firmware_status_link(&self) -> Option<firmware::StatusLink> {
        self.shared
            .mqtt
            .then(|| firmware::StatusLink::new(Arc::downgrade(&self.shared)))
    }

    /// Counters since the device was built.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            records_accepted: c.accepted.load(Ordering::Relaxed),
            records_acked: c.acked.load(Ordering::Relaxed),
            records_failed: c.failed.load(Ordering::Relaxed),
            records_dropped: c.dropped.load(Ordering::Relaxed),
            records_buffered: self.shared.buffer.lock().len() as u64,
            messages_sent: c.messages.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            connected: c.connected.load(Ordering::Relaxed),
        }
    }

    /// Where the device stands now.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn status_watch(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Waits until the device is connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.shared.status.subscribe();
        let connected = tokio::time::timeout(timeout, async {
            rx.wait_for(|s| *s == Status::Connected).await.is_ok()
        })
        .await
        .map_err(|_| Error::Timeout("not connected"))?;
        if connected {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }

    /// The current access token and how long it stays valid (for callers that cache it, as
    /// `stratus sim` does between runs).
    pub fn access_token(&self) -> Option<(String, Duration)> {
        self.shared
            .tokens
            .current()
            .map(|(t, at)| (t, at.saturating_duration_since(std::time::Instant::now())))
    }

    /// Disconnects cleanly and stops the background task; afterwards [`send`](Device::send)
    /// fails with [`Error::Closed`]. Records not acknowledged stay in the buffer file, when
    /// there is one; call [`flush`](Device::flush) first to send them.
    pub async fn close(&self) {
        self.shared.cancel.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.shared.set_status(Status::Closed);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}
