//! The MQTT transport on `rumqttc` (3.1.1 or 5.0, TCP or TLS).
//!
//! Each connection is a fresh `rumqttc` client and event loop with a clean session: the SDK
//! keeps the only copy of what is unacknowledged (the buffer), so a dropped connection leaves
//! nothing behind to be replayed by the client library with a stale envelope. The event loop
//! runs in its own task and forwards what matters ([`LinkEvent`]) to the device task, which
//! therefore never cancels `EventLoop::poll` half-way.
//!
//! Acknowledgements are matched to messages by packet id: `rumqttc` reports each outgoing
//! PUBLISH with its packet id in the order the requests were made (`Outgoing::Publish`), and
//! the device keeps its window below the client's in-flight limit so packet ids never collide.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{TlsConfiguration, Transport as MqttTransport};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::buffer::Entry;
use crate::firmware::StatusJob;
use crate::{
    record, token::TokenError, Backoff, DesiredConfig, Error, MqttPassword, MqttVersion, Shared,
    Status,
};

/// How many times a record alone in a message may be refused (MQTT 5 reason code) before it
/// is dropped: the first refusal may be a freshness one (a `sent` delayed too long), the
/// second, with a fresh envelope, is about the record.
const REFUSALS: u8 = 2;

/// Connection settings, checked by the builder.
pub(crate) struct Settings {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    version: MqttVersion,
    password: MqttPassword,
    keep_alive: Duration,
    window: usize,
}

impl Settings {
    pub fn new(
        url: Option<&str>,
        server: &reqwest::Url,
        version: MqttVersion,
        password: MqttPassword,
        keep_alive: Duration,
        window: usize,
        roots: &[Vec<u8>],
    ) -> Result<Settings, Error> {
        let (tls, host, port) = match url {
            Some(url) => parse_url(url)?,
            None => {
                let tls = server.scheme() == "https";
                let host = server.host_str().unwrap_or("127.0.0.1");
                let host = host.trim_start_matches('[').trim_end_matches(']');
                (tls, host.to_string(), if tls { 8883 } else { 1883 })
            }
        };
        let tls = if tls { Some(tls_config(roots)?) } else { None };
        Ok(Settings {
            host,
            port,
            tls,
            version,
            password,
            keep_alive,
            window,
        })
    }
}

/// `mqtt://H:P`, `tcp://H:P`, `mqtts://H:P`, `ssl://H:P`, `tls://H:P` or `H:P` →
/// (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), Error> {
    let bad = |why: &str| Error::config("mqtt", format!("{url:?}: {why}"));
    let (tls, rest) = match url.split_once("://") {
        Some(("mqtt" | "tcp", rest)) => (false, rest),
        Some(("mqtts" | "ssl" | "tls", rest)) => (true, rest),
        Some((scheme, _)) => return Err(bad(&format!("unknown scheme {scheme:?}"))),
        None => (false, url),
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        match after.strip_prefix(':') {
            Some(p) => (host, p.parse().map_err(|_| bad("bad port"))?),
            None if after.is_empty() => (host, default_port),
            None => return Err(bad("junk after ]")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("no host"));
    }
    Ok((tls, host.to_string(), port))
}

/// The Mozilla roots plus the given PEM CAs, on the `ring` provider.
fn tls_config(roots: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut store = rustls::RootCertStore::empty();
    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for pem in roots {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::config("root_certificate_pem", e.to_string()))?;
            store
                .add(cert)
                .map_err(|e| Error::config("root_certificate_pem", e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("mqtt", e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the event-loop task reports.
#[derive(Debug)]
enum LinkEvent {
    Connected,
    /// CONNACK refused; `auth` when for the credentials.
    Refused {
        auth: bool,
        reason: String,
    },
    /// The connection ended.
    Down(String),
    /// A PUBLISH went out with this packet id.
    Sent(u16),
    /// Its PUBACK came back: `None` is success, else the reason.
    Acked(u16, Option<Refusal>),
    /// A message arrived.
    Message(String, Bytes),
}

/// Why an MQTT 5 PUBACK refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Quota exceeded (0x97): the server is busy; retry later.
    Busy,
    /// Anything else (0x99 payload format invalid: invalid, or not fresh).
    Invalid,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// One connection: the client handle and the events of its event-loop task.
struct Link {
    client: Client,
    events: mpsc::Receiver<LinkEvent>,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn transport(s: &Settings) -> MqttTransport {
    match &s.tls {
        Some(c) => MqttTransport::Tls(TlsConfiguration::Rustls(c.clone())),
        None => MqttTransport::Tcp,
    }
}

impl Link {
    fn start(id: &str, s: &Settings, password: &str) -> Link {
        let (tx, events) = mpsc::channel(64);
        // Reports (1) plus the telemetry window, and room for the subscriptions.
        let inflight = (s.window + 2) as u16;
        let capacity = s.window + 8;
        match s.version {
            MqttVersion::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, &s.host, s.port);
                o.set_credentials(id, password)
                    .set_keep_alive(s.keep_alive.max(Duration::from_secs(5)))
                    .set_clean_session(true)
                    .set_inflight(inflight)
                    .set_max_packet_size(1 << 20, 1 << 20)
                    .set_transport(transport(s));
                let (client, mut el) = rumqttc::AsyncClient::new(o, capacity);
                let task = tokio::spawn(async move {
                    loop {
                        let event = match el.poll().await {
                            Ok(e) => match v4_event(e) {
                                Some(e) => e,
                                None => continue,
                            },
                            Err(e) => {
                                let _ = tx.send(v4_error(e)).await;
                                return;
                            }
                        };
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                });
                Link {
                    client: Client::V4(client),
                    events,
                    task,
                }
            }
            MqttVersion::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, &s.host, s.port);
                o.set_credentials(id, password)
                    .set_keep_alive(s.keep_alive)
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(inflight)
                    .set_max_packet_size(Some(1 << 20))
                    .set_transport(transport(s));
                let (client, mut el) = rumqttc::v5::AsyncClient::new(o, capacity);
                let task = tokio::spawn(async move {
                    loop {
                        let event = match el.poll().await {
                            Ok(e) => match v5_event(e) {
                                Some(e) => e,
                                None => continue,
                            },
                            Err(e) => {
                                let _ = tx.send(v5_error(e)).await;
                                return;
                            }
                        };
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                });
                Link {
                    client: Client::V5(client),
                    events,
                    task,
                }
            }
        }
    }

    fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        match &self.client {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .is_ok(),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .is_ok(),
        }
    }

    fn subscribe(&self, topic: String) -> bool {
        match &self.client {
            Client::V4(c) => c.try_subscribe(topic, rumqttc::QoS::AtLeastOnce).is_ok(),
            Client::V5(c) => c
                .try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .is_ok(),
        }
    }

    fn disconnect(&self) {
        match &self.client {
            Client::V4(c) => drop(c.try_disconnect()),
            Client::V5(c) => drop(c.try_disconnect()),
        }
    }
}

fn v4_event(e: rumqttc::Event) -> Option<LinkEvent> {
    use rumqttc::{Event, Outgoing, Packet};
    match e {
        Event::Incoming(Packet::ConnAck(a)) if a.code == rumqttc::ConnectReturnCode::Success => {
            Some(LinkEvent::Connected)
        }
        Event::Incoming(Packet::PubAck(a)) => Some(LinkEvent::Acked(a.pkid, None)),
        Event::Incoming(Packet::Publish(p)) => Some(LinkEvent::Message(p.topic, p.payload)),
        Event::Outgoing(Outgoing::Publish(pkid)) => Some(LinkEvent::Sent(pkid)),
        _ => None,
    }
}

fn v4_error(e: rumqttc::ConnectionError) -> LinkEvent {
    use rumqttc::ConnectReturnCode as C;
    match e {
        rumqttc::ConnectionError::ConnectionRefused(code) => LinkEvent::Refused {
            auth: matches!(code, C::BadUserNamePassword | C::NotAuthorized),
            reason: format!("CONNACK {code:?}"),
        },
        e => LinkEvent::Down(e.to_string()),
    }
}

fn v5_event(e: rumqttc::v5::Event) -> Option<LinkEvent> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason};
    use rumqttc::v5::{Event, Incoming};
    use rumqttc::Outgoing;
    match e {
        Event::Incoming(Incoming::ConnAck(a)) if a.code == ConnectReturnCode::Success => {
            Some(LinkEvent::Connected)
        }
        Event::Incoming(Incoming::PubAck(a)) => {
            let refusal = match a.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                PubAckReason::QuotaExceeded => Some(Refusal::Busy),
                _ => Some(Refusal::Invalid),
            };
            Some(LinkEvent::Acked(a.pkid, refusal))
        }
        Event::Incoming(Incoming::Publish(p)) => Some(LinkEvent::Message(
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.payload,
        )),
        Event::Incoming(Incoming::Disconnect(d)) => Some(LinkEvent::Down(format!(
            "the server disconnected: {:?}",
            d.reason_code
        ))),
        Event::Outgoing(Outgoing::Publish(pkid)) => Some(LinkEvent::Sent(pkid)),
        _ => None,
    }
}

fn v5_error(e: rumqttc::v5::ConnectionError) -> LinkEvent {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::{ConnectionError, StateError};
    let code = match &e {
        ConnectionError::ConnectionRefused(code) => Some(*code),
        ConnectionError::MqttState(StateError::ConnFail { reason }) => Some(*reason),
        _ => None,
    };
    match code {
        Some(code) => LinkEvent::Refused {
            auth: matches!(code, C::BadUserNamePassword | C::NotAuthorized),
            reason: format!("CONNACK {code:?}"),
        },
        None => LinkEvent::Down(e.to_string()),
    }
}

/// A message awaiting its PUBACK.
enum Sent {
    Telemetry(Vec<Entry>),
    Report(Value),
    FirmwareStatus(StatusJob),
}

impl Sent {
    fn give_back(self, shared: &Shared) {
        match self {
            Sent::Telemetry(entries) => shared.requeue(entries),
            Sent::Report(v) => shared.report_back(v),
            // Sent again on the next connection (at least once, as QoS 1 promises).
            Sent::FirmwareStatus(job) => shared.firmware_status.lock().push_front(job),
        }
    }
}

/// How a connection ended.
enum Outcome {
    Cancelled,
    Refused { auth: bool, reason: String },
    Down { connected: bool, reason: String },
}

/// The device task: connect, run the session, back off, reconnect — until cancelled.
pub(crate) async fn run(shared: Arc<Shared>, s: Settings) {
    let mut backoff = Backoff::new();
    let mut auth_refusals = 0u32;
    while !shared.cancel.is_cancelled() {
        let password = match s.password {
            MqttPassword::Secret => shared.tokens.secret().to_string(),
            MqttPassword::AccessToken => match shared.tokens.get().await {
                Ok(t) => t,
                Err(TokenError::Refused(reason)) => {
                    shared.set_status(Status::Unauthorized(reason));
                    pause(&shared, backoff.next_delay().max(Duration::from_secs(5))).await;
                    continue;
                }
                Err(TokenError::Unavailable(reason)) => {
                    shared.set_status(Status::Offline(reason));
                    pause(&shared, backoff.next_delay()).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        let link = Link::start(&shared.id, &s, &password);
        match session(&shared, &s, link).await {
            Outcome::Cancelled => break,
            Outcome::Refused { auth, reason } => {
                if auth {
                    // A token the server no longer takes (a restart with a new key, a
                    // rotation): ask for a new one; twice refused means the secret is wrong.
                    shared.tokens.invalidate(&password);
                    auth_refusals += 1;
                    if auth_refusals >= 2 || s.password == MqttPassword::Secret {
                        shared.set_status(Status::Unauthorized(reason));
                    }
                } else {
                    shared.set_status(Status::Offline(reason));
                }
            }
            Outcome::Down { connected, reason } => {
                if connected {
                    auth_refusals = 0;
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                }
                tracing::debug!(device = %shared.id, %reason, "MQTT connection ended");
                shared.set_status(Status::Offline(reason));
            }
        }
        pause(&shared, backoff.next_delay()).await;
    }
    shared.set_status(Status::Closed);
}

/// Sleeps unless cancelled.
async fn pause(shared: &Shared, d: Duration) {
    tokio::select! {
        _ = shared.cancel.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

struct Session<'a> {
    shared: &'a Shared,
    telemetry_topic: String,
    report_topic: String,
    firmware_status_topic: String,
    window: usize,
    /// Published, packet id not yet known (in request order).
    unnumbered: VecDeque<Sent>,
    /// Published, awaiting the PUBACK.
    in_flight: HashMap<u16, Sent>,
    /// Telemetry messages among the two above.
    telemetry: usize,
    report_out: bool,
    max_records: usize,
    paused_until: Option<Instant>,
}

async fn session(shared: &Shared, s: &Settings, mut link: Link) -> Outcome {
    let id = &shared.id;
    let mut st = Session {
        shared,
        telemetry_topic: format!("devices/{id}/telemetry"),
        report_topic: format!("devices/{id}/config/reported"),
        firmware_status_topic: format!("devices/{id}/firmware/status"),
        window: s.window,
        unnumbered: VecDeque::new(),
        in_flight: HashMap::new(),
        telemetry: 0,
        report_out: false,
        max_records: shared.batch.max_records,
        paused_until: None,
    };
    let mut connected = false;
    let outcome = loop {
        if connected {
            st.pump(&link);
        }
        let paused_until = st.paused_until;
        let pause_over = async move {
            match paused_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.cancel.cancelled() => {
                link.disconnect();
                // Let the DISCONNECT go out (the event loop ends on it).
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while link.events.recv().await.is_some() {}
                }).await;
                break Outcome::Cancelled;
            }
            event = link.events.recv() => match event {
                None => break Outcome::Down { connected, reason: "the MQTT event loop ended".into() },
                Some(LinkEvent::Connected) => {
                    connected = true;
                    shared.connected();
                    link.subscribe(format!("devices/{id}/config"));
                    link.subscribe(format!("devices/{id}/firmware"));
                }
                Some(LinkEvent::Refused { auth, reason }) => break Outcome::Refused { auth, reason },
                Some(LinkEvent::Down(reason)) => break Outcome::Down { connected, reason },
                Some(LinkEvent::Sent(pkid)) => {
                    if let Some(sent) = st.unnumbered.pop_front() {
                        st.in_flight.insert(pkid, sent);
                    }
                }
                Some(LinkEvent::Acked(pkid, refusal)) => {
                    if let Some(sent) = st.in_flight.remove(&pkid) {
                        st.completed(sent, refusal);
                    }
                }
                Some(LinkEvent::Message(topic, payload)) => deliver(shared, &topic, &payload),
            },
            _ = shared.wake.notified(), if connected => {}
            _ = pause_over => { st.paused_until = None; }
        }
    };
    for sent in st.unnumbered.drain(..) {
        sent.give_back(shared);
    }
    for (_, sent) in st.in_flight.drain() {
        sent.give_back(shared);
    }
    outcome
}

impl Session<'_> {
    /// Publishes what the window allows.
    fn pump(&mut self, link: &Link) {
        let shared = self.shared;
        if !self.report_out {
            if let Some(v) = shared.take_report() {
                if link.publish(self.report_topic.clone(), v.to_string().into_bytes()) {
                    self.report_out = true;
                    self.unnumbered.push_back(Sent::Report(v));
                } else {
                    shared.report_back(v);
                }
            }
        }
        loop {
            let Some(job) = shared.firmware_status.lock().pop_front() else {
                break;
            };
            if job.done.is_closed() {
                continue; // nobody waits any more: it went over HTTP/CoAP
            }
            if link.publish(self.firmware_status_topic.clone(), job.payload.clone()) {
                self.unnumbered.push_back(Sent::FirmwareStatus(job));
            } else {
                shared.firmware_status.lock().push_front(job);
                break;
            }
        }
        if self.paused_until.is_some() {
            return;
        }
        while self.telemetry < self.window {
            let batch = shared
                .buffer
                .lock()
                .take(self.max_records, shared.batch.max_bytes);
            if batch.is_empty() {
                break;
            }
            let payload = record::envelope(
                shared.tokens.server_now_ms(),
                batch.iter().map(|e| &*e.json),
            );
            if !link.publish(self.telemetry_topic.clone(), payload.into_bytes()) {
                shared.requeue(batch);
                break;
            }
            shared
                .counters
                .messages
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.telemetry += 1;
            self.unnumbered.push_back(Sent::Telemetry(batch));
        }
    }

    fn completed(&mut self, sent: Sent, refusal: Option<Refusal>) {
        let shared = self.shared;
        match sent {
            Sent::Report(v) => {
                self.report_out = false;
                if refusal == Some(Refusal::Busy) {
                    shared.report_back(v);
                } else {
                    if refusal.is_some() {
                        tracing::warn!(device = %shared.id, "the server refused the reported configuration");
                    }
                    shared.report_done();
                }
            }
            Sent::FirmwareStatus(job) => match refusal {
                None => drop(job.done.send(Ok(()))),
                Some(Refusal::Busy) => shared.firmware_status.lock().push_back(job),
                Some(Refusal::Invalid) => drop(
                    job.done
                        .send(Err("MQTT PUBACK refused the firmware status".into())),
                ),
            },
            Sent::Telemetry(batch) => {
                self.telemetry -= 1;
                match refusal {
                    None => {
                        shared.acked(&batch);
                        self.max_records = (self.max_records * 2).min(shared.batch.max_records);
                    }
                    Some(Refusal::Busy) => {
                        shared.requeue(batch);
                        self.paused_until = Some(Instant::now() + Duration::from_secs(1));
                    }
                    Some(Refusal::Invalid) => {
                        self.max_records =
                            shared.refused(batch, REFUSALS, "MQTT PUBACK refused the message");
                    }
                }
            }
        }
    }
}

/// A message on one of the device's subscriptions.
fn deliver(shared: &Shared, topic: &str, payload: &[u8]) {
    let Some(rest) = topic
        .strip_prefix("devices/")
        .and_then(|r| r.strip_prefix(shared.id.as_str()))
    else {
        return;
    };
    match rest {
        "/config" => match serde_json::from_slice::<DesiredConfig>(payload) {
            Ok(doc) => shared.desired(doc),
            Err(e) if !payload.is_empty() => {
                tracing::warn!(device = %shared.id, error = %e, "unreadable desired configuration")
            }
            Err(_) => {}
        },
        "/firmware" if !payload.is_empty() => match serde_json::from_slice::<Value>(payload) {
            Ok(manifest) => {
                if let Some(h) = &shared.firmware {
                    h.on_firmware_assignment(&shared.id, &manifest);
                } else {
                    tracing::info!(device = %shared.id, "firmware assignment received (no handler)");
                }
            }
            Err(e) => {
                tracing::warn!(device = %shared.id, error = %e, "unreadable firmware assignment")
            }
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_url("mqtts://example.com").unwrap(),
            (true, "example.com".into(), 8883)
        );
        assert_eq!(
            parse_url("localhost:1").unwrap(),
            (false, "localhost".into(), 1)
        );
        assert_eq!(
            parse_url("tcp://[::1]:9").unwrap(),
            (false, "::1".into(), 9)
        );
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("mqtt://x:port").is_err());
        assert!(parse_url("mqtt://:1").is_err());
    }

    #[test]
    fn tls_roots_accept_pem_and_refuse_junk() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert!(tls_config(&[cert.cert.pem().into_bytes()]).is_ok());
        assert!(tls_config(&[
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec()
        ])
        .is_err());
    }
}
