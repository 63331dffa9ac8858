//! The CoAP transport (RFC 7252 over UDP, or over DTLS 1.2 PSK for `coaps://`): the
//! workspace's sans-IO `stratus-coap` [`Endpoint`] in its client role, driven by one tokio
//! `UdpSocket` — "send what it wants, feed it what arrives, wake it when it asks".
//!
//! Resources (SPEC "CoAP resources"): `POST /telemetry` with the JSON envelope, `GET /config`
//! polled every [`DeviceBuilder::config_poll_interval`](crate::DeviceBuilder::config_poll_interval),
//! `PUT /config/reported`. On plain UDP every request carries the device's access token as
//! `?token=…` (a device token has 59 characters: one item; a longer token would be split
//! over several `token=` items of at most 255 bytes, which the server joins in order). On CoAPS the DTLS session
//! authenticates the device (PSK identity = device id, key derived from the secret, see
//! [`crate::dtls`]) and no token is needed: the handshake runs before the first request and
//! again after a request timed out (the server may have lost the session).
//!
//! Requests are confirmable and retransmitted by the endpoint (1 s initial timeout, 3
//! retransmissions, so an unreachable server is noticed within about 15 s); a retransmitted
//! POST carries the same nonce and the server's deduplication answers it from its cache, so it
//! is stored once. Messages are kept small (about 1 KiB of records, so that a datagram with
//! the token fits a 1280-byte IPv6 MTU), one at a time.
//!
//! Answers: 2.04 settles; 4.01 refreshes the token and retries once; 4.09 (replay) resends
//! with a new envelope; 4.00 and 4.13 split the batch until the bad record is alone, then drop
//! it; 4.03 and 4.04 mean the credentials are wrong; 5.03, other 5.xx and timeouts keep
//! everything and back off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stratus_coap::{Code, ContentFormat, Endpoint, Event, Message, Request, Response};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::dtls::{DtlsClient, HandshakeError};
use crate::poll::{self, Steps, Stop};
use crate::token::TokenError;
use crate::{record, DesiredConfig, Error, Shared, Status};

/// Most bytes of records in one CoAP message.
const MAX_BYTES: usize = 1024;
/// 409s a batch gets before it is split like an invalid one.
const REPLAYS: u8 = 3;
/// The longest `token=` item (a Uri-Query option holds at most 255 bytes).
const TOKEN_CHUNK: usize = 240;

/// CoAP settings.
pub(crate) struct Settings {
    pub peer: SocketAddr,
    pub config_poll: Duration,
    /// CoAPS: (PSK identity, PSK).
    pub dtls: Option<(String, String)>,
}

/// `coap://HOST:PORT`, `coaps://HOST:PORT` or `HOST:PORT` (default port 5683, 5684 for
/// coaps); resolved once. Returns the address and whether it is CoAPS.
pub(crate) async fn resolve(
    url: Option<&str>,
    server: &reqwest::Url,
) -> Result<(SocketAddr, bool), Error> {
    let mut secure = false;
    let target = match url {
        Some(u) => {
            let rest = match u.split_once("://") {
                Some(("coap", rest)) => rest,
                Some(("coaps", rest)) => {
                    secure = true;
                    rest
                }
                Some((scheme, _)) => {
                    return Err(Error::config(
                        "coap",
                        format!("{u:?}: scheme {scheme:?} (coap:// or coaps://)"),
                    ))
                }
                None => u,
            };
            let rest = rest.trim_end_matches('/');
            let has_port = match rest.rfind(']') {
                Some(end) => rest[end..].contains(':'),
                None => rest.contains(':'),
            };
            if has_port {
                rest.to_string()
            } else if secure {
                format!("{rest}:5684")
            } else {
                format!("{rest}:5683")
            }
        }
        None => {
            let host = server.host_str().unwrap_or("127.0.0.1");
            if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:5683")
            } else {
                format!("{host}:5683")
            }
        }
    };
    let found = tokio::net::lookup_host(target.as_str())
        .await
        .map_err(|e| Error::config("coap", format!("{target:?}: {e}")))?
        .next();
    found
        .map(|a| (a, secure))
        .ok_or_else(|| Error::config("coap", format!("{target:?} resolves to nothing")))
}

/// The socket and the endpoint.
pub(crate) struct Client {
    socket: UdpSocket,
    endpoint: Endpoint,
    peer: SocketAddr,
    buf: Vec<u8>,
    /// CoAPS.
    dtls: Option<DtlsClient>,
}

impl Client {
    pub(crate) async fn new(peer: SocketAddr, dtls: Option<DtlsClient>) -> Result<Client, String> {
        let bind: SocketAddr = if peer.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        let config = stratus_coap::Config {
            ack_timeout: Duration::from_secs(1),
            max_retransmit: 3,
            ..stratus_coap::Config::default()
        };
        let endpoint = Endpoint::new(config, rand::random()).map_err(|e| e.to_string())?;
        Ok(Client {
            socket,
            endpoint,
            peer,
            buf: vec![0; 64 * 1024],
            dtls,
        })
    }

    /// Sends one CoAP datagram (sealed on CoAPS). A lost datagram is the endpoint's to
    /// retransmit.
    async fn transmit(&mut self, data: &[u8], to: SocketAddr) {
        match &mut self.dtls {
            Some(d) => {
                for record in d.seal(data) {
                    let _ = self.socket.send_to(&record, to).await;
                }
            }
            None => {
                let _ = self.socket.send_to(data, to).await;
            }
        }
    }

    /// Feeds one received datagram to the endpoint (opened first on CoAPS).
    async fn receive(&mut self, n: usize, from: SocketAddr) {
        let now = std::time::Instant::now();
        match &mut self.dtls {
            Some(d) => {
                if from != self.peer {
                    return;
                }
                let (plain, replies) = d.open(&self.buf[..n]);
                for r in replies {
                    let _ = self.socket.send_to(&r, from).await;
                }
                for p in plain {
                    self.endpoint.handle_datagram(now, from, &p);
                }
            }
            None => self.endpoint.handle_datagram(now, from, &self.buf[..n]),
        }
    }

    /// On CoAPS, makes sure a session is established.
    async fn ensure_session(&mut self) -> Result<(), Stop> {
        let Some(d) = &mut self.dtls else {
            return Ok(());
        };
        if d.is_established() {
            return Ok(());
        }
        match d.handshake(&self.socket, self.peer).await {
            Ok(()) => Ok(()),
            Err(HandshakeError::Refused(why)) => Err(Stop::Unauthorized(why)),
            Err(HandshakeError::Unreachable(why)) => Err(Stop::Transient(why)),
        }
    }

    /// Sends one request and waits for its response.
    pub(crate) async fn exchange(
        &mut self,
        cancel: &tokio_util::sync::CancellationToken,
        request: Request,
    ) -> Result<Message, Stop> {
        tokio::select! {
            _ = cancel.cancelled() => return Err(Stop::Closed),
            r = self.ensure_session() => r?,
        }
        let id = self
            .endpoint
            .send_request(std::time::Instant::now(), self.peer, request)
            .map_err(|e| Stop::Transient(format!("CoAP request: {e}")))?;
        loop {
            while let Some(t) = self.endpoint.poll_transmit() {
                self.transmit(&t.data, t.peer).await;
            }
            while let Some(event) = self.endpoint.poll_event() {
                match event {
                    Event::Response {
                        request, response, ..
                    } if request == id => return Ok(response),
                    Event::RequestFailed {
                        request, reason, ..
                    } if request == id => {
                        // The server may have lost the DTLS session: handshake again.
                        if let Some(d) = &mut self.dtls {
                            d.reset();
                        }
                        return Err(Stop::Transient(format!("CoAP request failed: {reason:?}")));
                    }
                    Event::Request { exchange, .. } => {
                        // A device serves nothing.
                        let _ = self.endpoint.respond(
                            std::time::Instant::now(),
                            exchange,
                            Response::new(Code::NOT_FOUND),
                        );
                    }
                    _ => {}
                }
            }
            while let Some(t) = self.endpoint.poll_transmit() {
                self.transmit(&t.data, t.peer).await;
            }
            let wake = self.endpoint.poll_timeout().map(Instant::from_std);
            let timer = async move {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.endpoint.cancel_request(id);
                    return Err(Stop::Closed);
                }
                received = self.socket.recv_from(&mut self.buf) => {
                    if let Ok((n, from)) = received {
                        self.receive(n, from).await;
                    }
                }
                _ = timer => self.endpoint.handle_timeout(std::time::Instant::now()),
            }
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    client: Client,
    config_version: Option<u64>,
    max_records: usize,
}

/// The device task.
pub(crate) async fn run(shared: Arc<Shared>, s: Settings) {
    let dtls = match s.dtls.as_ref().map(|(id, psk)| DtlsClient::new(id, psk)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            shared.set_status(Status::Offline(format!("no DTLS context: {e}")));
            shared.cancel.cancelled().await;
            shared.set_status(Status::Closed);
            return;
        }
    };
    let client = match Client::new(s.peer, dtls).await {
        Ok(c) => c,
        Err(e) => {
            shared.set_status(Status::Offline(format!("no UDP socket: {e}")));
            shared.cancel.cancelled().await;
            shared.set_status(Status::Closed);
            return;
        }
    };
    let mut w = Worker {
        max_records: shared.batch.max_records,
        shared,
        client,
        config_version: None,
    };
    poll::run(&mut w, s.config_poll).await;
}

/// `?token=…` split into items a Uri-Query option can hold.
pub(crate) fn add_token(options: &mut stratus_coap::Options, token: &str) {
    let mut rest = token;
    while !rest.is_empty() {
        let mut cut = rest.len().min(TOKEN_CHUNK);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (chunk, tail) = rest.split_at(cut);
        options.add_uri_query(&format!("token={chunk}"));
        rest = tail;
    }
}

impl Steps for Worker {
    /// CoAP marks the device connected per answered request instead.
    const CONNECTED_ON_SUCCESS: bool = false;

    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    async fn poll_config(&mut self) -> Result<(), Stop> {
        Worker::poll_config(self).await
    }

    async fn send_report(&mut self) -> Result<(), Stop> {
        Worker::send_report(self).await
    }

    async fn send_batch(&mut self) -> Result<bool, Stop> {
        Worker::send_batch(self).await
    }
}

impl Worker {
    /// One request with the access token; a 4.01 refreshes the token and retries once.
    async fn call(
        &mut self,
        code: Code,
        path: &str,
        body: Option<String>,
    ) -> Result<Message, Stop> {
        let secure = self.client.dtls.is_some();
        for attempt in 0..2 {
            let mut request = Request::new(code, path);
            // On CoAPS the session authenticates the device.
            let token = if secure {
                String::new()
            } else {
                self.shared.tokens.get().await.map_err(|e| match e {
                    TokenError::Refused(r) => Stop::Unauthorized(r),
                    TokenError::Unavailable(r) => Stop::Transient(r),
                })?
            };
            if !secure {
                add_token(&mut request.options, &token);
            }
            if let Some(b) = &body {
                request.options.set_content_format(ContentFormat::JSON);
                request.payload = bytes::Bytes::from(b.clone());
            }
            let answer = self.client.exchange(&self.shared.cancel, request).await?;
            if answer.code.class() != 5 && answer.code != Code::TOO_MANY_REQUESTS {
                self.shared.connected();
            }
            if answer.code == Code::UNAUTHORIZED {
                if secure {
                    return Err(Stop::Unauthorized(diagnostic(&answer)));
                }
                self.shared.tokens.invalidate(&token);
                if attempt == 0 {
                    continue;
                }
                return Err(Stop::Unauthorized(diagnostic(&answer)));
            }
            return Ok(answer);
        }
        Err(Stop::Unauthorized("4.01".into()))
    }

    async fn poll_config(&mut self) -> Result<(), Stop> {
        let a = self.call(Code::GET, "/config", None).await?;
        if a.code.is_success() {
            match serde_json::from_slice::<DesiredConfig>(&a.payload) {
                Ok(doc) => {
                    self.config_version = Some(doc.version);
                    self.shared.desired(doc);
                }
                Err(e) => {
                    tracing::warn!(device = %self.shared.id, error = %e, "unreadable desired configuration")
                }
            }
            return Ok(());
        }
        if a.code == Code::FORBIDDEN || a.code == Code::NOT_FOUND {
            return Err(Stop::Unauthorized(diagnostic(&a)));
        }
        Err(Stop::Transient(format!(
            "GET /config answered {}: {}",
            code_name(a.code),
            diagnostic(&a)
        )))
    }

    async fn send_report(&mut self) -> Result<(), Stop> {
        let Some(report) = self.shared.take_report() else {
            return Ok(());
        };
        match self
            .call(Code::PUT, "/config/reported", Some(report.to_string()))
            .await
        {
            Ok(a) if a.code.is_success() => {
                self.shared.report_done();
                Ok(())
            }
            Ok(a) if a.code.class() == 4 && a.code != Code::TOO_MANY_REQUESTS => {
                tracing::warn!(device = %self.shared.id, code = %code_name(a.code), "the server refused the reported configuration: {}", diagnostic(&a));
                self.shared.report_done();
                Ok(())
            }
            Ok(a) => {
                self.shared.report_back(report);
                Err(Stop::Transient(format!(
                    "PUT /config/reported answered {}",
                    code_name(a.code)
                )))
            }
            Err(e) => {
                self.shared.report_back(report);
                Err(e)
            }
        }
    }

    /// Sends one batch; `Ok(true)` when more records wait.
    async fn send_batch(&mut self) -> Result<bool, Stop> {
        let shared = self.shared.clone();
        let batch = shared
            .buffer
            .lock()
            .take(self.max_records, shared.batch.max_bytes.min(MAX_BYTES));
        if batch.is_empty() {
            return Ok(false);
        }
        let body = record::envelope(
            shared.tokens.server_now_ms(),
            batch.iter().map(|e| &*e.json),
        );
        shared
            .counters
            .messages
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let a = match self.call(Code::POST, "/telemetry", Some(body)).await {
            Ok(a) => a,
            Err(e) => {
                shared.requeue(batch);
                return Err(e);
            }
        };
        match a.code {
            c if c.is_success() => {
                shared.acked(&batch);
                self.max_records = (self.max_records * 2).min(shared.batch.max_records);
            }
            Code::CONFLICT => {
                let mut batch = batch;
                let stale = batch.iter().map(|e| e.refusals).max().unwrap_or(0);
                if stale + 1 >= REPLAYS {
                    self.max_records = shared.refused(batch, REPLAYS + 1, "4.09 replay");
                } else {
                    for e in &mut batch {
                        e.refusals += 1;
                    }
                    shared.requeue(batch);
                }
            }
            Code::BAD_REQUEST | Code::REQUEST_ENTITY_TOO_LARGE => {
                let why = format!("{}: {}", code_name(a.code), diagnostic(&a));
                self.max_records = shared.refused(batch, 1, &why);
            }
            Code::FORBIDDEN | Code::NOT_FOUND => {
                shared.requeue(batch);
                return Err(Stop::Unauthorized(diagnostic(&a)));
            }
            c => {
                shared.requeue(batch);
                return Err(Stop::Transient(format!(
                    "POST /telemetry answered {}: {}",
                    code_name(c),
                    diagnostic(&a)
                )));
            }
        }
        let more = shared.buffer.lock().queued() > 0;
        Ok(more)
    }
}

fn code_name(c: Code) -> String {
    format!("{}.{:02}", c.class(), c.detail())
}

/// The diagnostic payload of an error response.
fn diagnostic(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload)
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_tokens_are_split_over_query_items() {
        let token = "a".repeat(600);
        let mut o = stratus_coap::Options::new();
        add_token(&mut o, &token);
        let items = o.uri_query().unwrap();
        assert_eq!(items.len(), 3);
        assert!(items
            .iter()
            .all(|i| i.len() <= 255 && i.starts_with("token=")));
        let joined: String = items.iter().map(|i| &i[6..]).collect();
        assert_eq!(joined, token);
    }

    #[tokio::test]
    async fn coap_urls_resolve() {
        let server = reqwest::Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            resolve(None, &server).await.unwrap(),
            ("127.0.0.1:5683".parse().unwrap(), false)
        );
        assert_eq!(
            resolve(Some("coap://127.0.0.1:9"), &server).await.unwrap(),
            ("127.0.0.1:9".parse().unwrap(), false)
        );
        assert_eq!(
            resolve(Some("127.0.0.1"), &server).await.unwrap(),
            ("127.0.0.1:5683".parse().unwrap(), false)
        );
        assert_eq!(
            resolve(Some("coaps://127.0.0.1"), &server).await.unwrap(),
            ("127.0.0.1:5684".parse().unwrap(), true)
        );
        assert_eq!(
            resolve(Some("coaps://127.0.0.1:7/"), &server)
                .await
                .unwrap(),
            ("127.0.0.1:7".parse().unwrap(), true)
        );
        assert!(resolve(Some("http://127.0.0.1"), &server).await.is_err());
    }
}
