//! The CoAP resources: routing by path and method, credentials, and the handlers (see the
//! [module docs](super) for the table).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use stratus_coap::link_format::{self, LinkResource};
use stratus_coap::{Code, ContentFormat, ExchangeId, Message, Response};
use stratus_store::StoreError;

use super::{Done, Driver, Mode, NewObserver, MAX_DIAGNOSTIC};
use crate::api::devices::config::config_payload;
use crate::auth::{now_secs, AuthError, Kind, Proof};
use crate::ingest::{self, IngestError};
use crate::pipeline::{Rejected, Source};
use crate::reported::{parse_config, store_reported};

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    WellKnownCore,
    Telemetry,
    Config,
    ConfigReported,
    Firmware(String),
    FirmwareNotice,
    FirmwareStatus,
    Upload,
    Unknown,
}

fn route(path: &[&str]) -> Route {
    match path {
        [".well-known", "core"] => Route::WellKnownCore,
        ["telemetry"] => Route::Telemetry,
        ["config"] => Route::Config,
        ["config", "reported"] => Route::ConfigReported,
        ["firmware"] => Route::FirmwareNotice,
        ["firmware", "status"] => Route::FirmwareStatus,
        ["firmware", id] if !id.is_empty() => Route::Firmware((*id).to_string()),
        ["upload"] => Route::Upload,
        _ => Route::Unknown,
    }
}

/// The resources `/.well-known/core` describes, for a body limit of `max_body` bytes.
pub fn link_resources(max_body: usize) -> Vec<LinkResource> {
    let json = ContentFormat::JSON.0;
    let cbor = ContentFormat::CBOR.0;
    vec![
        LinkResource::new("/telemetry")
            .rt("stratus.telemetry")
            .interface("core.s")
            .ct(json)
            .ct(cbor)
            .title("telemetry (POST)"),
        LinkResource::new("/config")
            .rt("stratus.config")
            .interface("core.p")
            .ct(json)
            .observable()
            .title("desired configuration (GET, Observe)"),
        LinkResource::new("/config/reported")
            .rt("stratus.config.reported")
            .interface("core.p")
            .ct(json)
            .title("reported configuration (PUT)"),
        LinkResource::new("/upload")
            .rt("stratus.upload")
            .interface("core.s")
            .ct(json)
            .ct(cbor)
            .size(max_body as u64)
            .title("large telemetry batch (Block1 PUT/POST)"),
        LinkResource::new("/firmware")
            .rt("stratus.firmware")
            .ct(json)
            .observable()
            .title("firmware assignment notice (GET, Observe); images at /firmware/{id} (Block2)"),
        LinkResource::new("/firmware/status")
            .rt("stratus.firmware.status")
            .interface("core.s")
            .title("firmware status report (POST)"),
    ]
}

/// An error response with a short UTF-8 diagnostic payload (RFC 7252 §5.5.2).
pub(crate) fn diagnostic(code: Code, why: &str) -> Response {
    let mut end = why.len().min(MAX_DIAGNOSTIC);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    Response::new(code).with_payload(Bytes::copy_from_slice(&why.as_bytes()[..end]))
}

/// 4.29 Too Many Requests (RFC 8516) with Max-Age = the seconds to wait.
pub(crate) fn too_many_requests(why: &str, retry_after_ms: u64) -> Response {
    let mut r = diagnostic(Code::TOO_MANY_REQUESTS, why);
    r.options
        .set_max_age(u32::try_from(retry_after_ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX));
    r
}

/// A `/config` representation: the config document with ETag = version.
pub(crate) fn config_response(doc: Bytes, version: u64) -> Response {
    let mut r = Response::new(Code::CONTENT)
        .with_payload(doc)
        .with_content_format(ContentFormat::JSON);
    r.options.set_etag(&etag(version));
    r
}

/// A `/firmware` representation: the notice JSON (`null` for an empty payload: no
/// assignment).
pub(crate) fn notice_response(notice: Bytes) -> Response {
    let payload = if notice.is_empty() {
        Bytes::from_static(b"null")
    } else {
        notice
    };
    Response::new(Code::CONTENT)
        .with_payload(payload)
        .with_content_format(ContentFormat::JSON)
}

/// The ETag of a config version: the version as a CoAP uint (big-endian, no leading zero
/// bytes, at least one byte).
pub(crate) fn etag(version: u64) -> Vec<u8> {
    let bytes = version.to_be_bytes();
    let skip = bytes.iter().take(7).take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// The authenticated device of a request.
struct Device {
    id: String,
    /// What it proved (its DTLS key's credential, or its access token).
    proof: Proof,
}

impl Driver {
    /// Routes one request.
    pub(super) fn on_request(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        exchange: ExchangeId,
        req: Message,
    ) {
        let path = match req.options.uri_path() {
            Ok(p) => p,
            Err(_) => {
                let r = diagnostic(Code::BAD_OPTION, "Uri-Path is not UTF-8");
                return self.respond(now, exchange, r);
            }
        };
        let route = route(&path);
        if matches!(self.mode, Mode::Multicast) {
            return self.on_multicast(now, exchange, &req, &route);
        }
        let allowed: &[Code] = match route {
            Route::WellKnownCore | Route::Config | Route::Firmware(_) | Route::FirmwareNotice => {
                &[Code::GET]
            }
            Route::Telemetry => &[Code::POST],
            Route::FirmwareStatus => &[Code::POST, Code::PUT],
            Route::ConfigReported | Route::Upload => &[Code::PUT, Code::POST],
            Route::Unknown => {
                let r = diagnostic(Code::NOT_FOUND, "no such resource");
                return self.respond(now, exchange, r);
            }
        };
        if !allowed.contains(&req.code) {
            return self.respond(now, exchange, Response::new(Code::METHOD_NOT_ALLOWED));
        }
        if route == Route::WellKnownCore {
            let r = self.well_known_core(&req);
            return self.respond(now, exchange, r);
        }
        let device = match self.authenticate(now, peer, &req) {
            Ok(d) => d,
            Err(r) => return self.respond(now, exchange, r),
        };
        match route {
            Route::Telemetry | Route::Upload => self.telemetry(exchange, &req, device, &route),
            Route::Config => self.get_config(exchange, peer, &req, device),
            Route::ConfigReported => self.put_reported(exchange, &req, device),
            Route::Firmware(id) => self.firmware_block(exchange, &req, device, id),
            Route::FirmwareNotice => self.firmware_notice(exchange, peer, &req, device),
            Route::FirmwareStatus => self.firmware_status(exchange, &req, device),
            Route::WellKnownCore | Route::Unknown => {}
        }
    }

    /// A request that came to the multicast group: only discovery is answered.
    fn on_multicast(&mut self, now: Instant, exchange: ExchangeId, req: &Message, route: &Route) {
        if *route == Route::WellKnownCore && req.code == Code::GET {
            let r = self.well_known_core(req);
            if !r.payload.is_empty() {
                return self.respond_after_leisure(now, exchange, r);
            }
        }
        // Answered at once so the exchange is released; the answer is never sent (§8.1).
        self.respond(now, exchange, Response::new(Code::NOT_FOUND));
    }

    fn well_known_core(&self, req: &Message) -> Response {
        let queries: Vec<&str> = req
            .options
            .uri_query()
            .unwrap_or_default()
            .into_iter()
            .filter(|q| !q.starts_with("token="))
            .collect();
        let body =
            link_format::well_known_core(&link_resources(self.ctx.config.max_body_bytes), &queries);
        if body.is_empty() && !queries.is_empty() {
            // RFC 6690 §4.1: nothing matched the filter.
            return Response::new(Code::NOT_FOUND);
        }
        Response::new(Code::CONTENT)
            .with_payload(body)
            .with_content_format(ContentFormat::LINK_FORMAT)
    }

    /// Counts a failed authentication from `peer` and records it for the audit log
    /// (aggregated: [`crate::audit::failures`]).
    fn auth_failed(&self, peer: SocketAddr, identity: Option<&str>, why: &str, throttled: bool) {
        self.ctx.broker.metrics.auth_failure("coap");
        self.ctx.failures.record(crate::audit::failures::Failure {
            transport: "coap",
            target: self.mode.name(),
            remote: Some(peer),
            identity,
            reason: why,
            throttled,
        });
    }

    /// The device behind a request: its DTLS identity, or its `?token=` access token.
    fn authenticate(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        req: &Message,
    ) -> Result<Device, Response> {
        if let Mode::Dtls(d) = &self.mode {
            let lapse = d
                .proven(peer)
                .map(|(id, proof)| (id, self.ctx.auth.lapse(id, Kind::Device, proof, now_secs())));
            return match lapse {
                Some((id, None)) => Ok(Device {
                    id: id.to_string(),
                    proof: d.proven(peer).map(|(_, p)| p.clone()).unwrap_or_default(),
                }),
                Some((id, Some(lapse))) => {
                    let why = lapse.describe();
                    let id = id.to_string();
                    self.auth_failed(peer, Some(&id), why, false);
                    Err(diagnostic(Code::UNAUTHORIZED, why))
                }
                None => {
                    const WHY: &str = "the DTLS identity is no longer a device";
                    self.auth_failed(peer, None, WHY, false);
                    Err(diagnostic(Code::UNAUTHORIZED, WHY))
                }
            };
        }
        let parts: Vec<&str> = req
            .options
            .uri_query()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|q| q.strip_prefix("token="))
            .collect();
        let token = parts.concat();
        if token.is_empty() {
            const WHY: &str = "credentials required: ?token=ACCESS_TOKEN";
            self.auth_failed(peer, None, WHY, false);
            return Err(diagnostic(Code::UNAUTHORIZED, WHY));
        }
        let verified = match self.tokens.get(&token) {
            Some(c) => match self.ctx.auth.check_claims(c) {
                Ok(credential) => Ok((c.sub.clone(), c.kind, credential, c.jti.clone(), c.exp)),
                Err(e) => {
                    self.tokens.remove(&token);
                    Err(e)
                }
            },
            None => self.ctx.auth.verify_token(&token).map(|(p, c)| {
                if self.tokens.len() >= super::TOKEN_CACHE {
                    self.tokens.clear();
                }
                let verified = (p.id, p.kind, p.proof.credential, c.jti.clone(), c.exp);
                self.tokens.insert(token.clone(), c);
                verified
            }),
        };
        match verified {
            Ok((id, kind, credential, jti, exp)) => {
                // It knows a valid token: it is who it says, at its address (§11.3).
                self.ep.set_verified(now, peer, true);
                if kind != Kind::Device {
                    return Err(diagnostic(
                        Code::FORBIDDEN,
                        "the token is not a device's: CoAP resources are for devices",
                    ));
                }
                Ok(Device {
                    id,
                    proof: Proof {
                        credential,
                        token: Some((jti, exp)),
                    },
                })
            }
            Err(e) => {
                self.ctx.auth.record_failure(Some(peer.ip()), None);
                let why = match e {
                    AuthError::InvalidToken(why) => why,
                    _ => "invalid token",
                };
                // A source that keeps showing bad tokens is told to slow down.
                if let Err(AuthError::Throttled { retry_after_ms }) =
                    self.ctx.auth.check_throttle(Some(peer.ip()), None)
                {
                    self.auth_failed(peer, None, why, true);
                    self.ctx.broker.metrics.limit_hit("auth_throttle", 1);
                    return Err(too_many_requests(
                        "too many failed attempts from this address; retry later",
                        retry_after_ms,
                    ));
                }
                self.auth_failed(peer, None, why, false);
                Err(diagnostic(Code::UNAUTHORIZED, why))
            }
        }
    }

    /// `POST /telemetry`, and `PUT`/`POST /upload` (the same, reassembled from Block1).
    fn telemetry(&mut self, exchange: ExchangeId, req: &Message, device: Device, route: &Route) {
        let format = match req.options.content_format() {
            Ok(None) => ingest::ContentFormat::Json,
            Ok(Some(cf)) => match ingest::ContentFormat::from_coap(cf.0) {
                Some(f) => f,
                None => {
                    let r = diagnostic(
                        Code::UNSUPPORTED_CONTENT_FORMAT,
                        "telemetry is JSON (50) or CBOR (60)",
                    );
                    return self.spawn_done(Done::Respond {
                        exchange,
                        response: r,
                    });
                }
            },
            Err(_) => {
                let r = diagnostic(Code::BAD_OPTION, "bad Content-Format");
                return self.spawn_done(Done::Respond {
                    exchange,
                    response: r,
                });
            }
        };
        let ok = match (route, req.code) {
            (Route::Upload, Code::POST) => Code::CREATED,
            _ => Code::CHANGED,
        };
        let pipeline = self.ctx.pipeline.clone();
        let payload = req.payload.clone();
        let ingest = async move {
            let result = pipeline
                .ingest(&device.id, payload, format, Source::Coap)
                .await;
            let response = match result {
                Ok(_) => Response::new(ok),
                Err(e) => rejection(e),
            };
            Done::Respond { exchange, response }
        };
        if *route == Route::Telemetry {
            // One datagram's worth of JSON or CBOR: parsed right here, and the task waits for
            // the commit beside its other requests (no task, no channel, no thread hop).
            self.inflight.push(Box::pin(ingest));
        } else {
            // A reassembled upload may be large: parsed on another task.
            let tx = self.done_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(ingest.await);
            });
        }
    }

    /// Whether `device` may observe one more resource (`[coap] max_observers_per_device`; a
    /// registration it holds already is a renewal). When not, the request is answered as a
    /// plain GET, without Observe (RFC 7641 §4.1), and counted.
    fn may_observe(&self, device: &str, peer: SocketAddr, token: stratus_coap::Token) -> bool {
        let held = self.by_device.get(device);
        if held.is_some_and(|h| h.contains(&(peer, token)))
            || held.map_or(0, |h| h.len()) < self.ctx.config.max_observers_per_device
        {
            return true;
        }
        self.ctx
            .broker
            .metrics
            .limit_hit("coap_observers_per_device", 1);
        tracing::info!(device, %peer, "coap observe declined: the device has as many observations as it may");
        false
    }

    /// `GET /config`, Observe=0 registering.
    fn get_config(&mut self, exchange: ExchangeId, peer: SocketAddr, req: &Message, d: Device) {
        let observe = matches!(req.options.observe(), Ok(Some(0)))
            && self.may_observe(&d.id, peer, req.token);
        let observer = observe.then(|| NewObserver {
            peer,
            token: req.token,
            proof: d.proof.clone(),
        });
        let etags: Vec<Vec<u8>> = req
            .options
            .etags()
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        self.config_reads.entry(d.id.clone()).or_insert((0, None)).0 += 1;
        let store = self.ctx.store.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let (response, version) = match store.device(&d.id).await {
                Ok(Some(dev)) => {
                    let version = dev.desired.version;
                    let mut r = config_response(config_payload(&dev.desired), version);
                    if etags.iter().any(|e| *e == etag(version)) {
                        // RFC 7252 §5.10.6: the client's copy is current.
                        r = Response::new(Code::VALID);
                        r.options.set_etag(&etag(version));
                    }
                    if observe {
                        r = r.observing();
                    }
                    (r, version)
                }
                Ok(None) => (diagnostic(Code::NOT_FOUND, "the device was deleted"), 0),
                Err(e) => {
                    tracing::error!(device = %d.id, error = %e, "coap: reading the config failed");
                    (diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure"), 0)
                }
            };
            let _ = tx.send(Done::Config {
                exchange,
                response,
                observer,
                device: d.id,
                version,
            });
        });
    }

    /// `PUT /config/reported`.
    fn put_reported(&mut self, exchange: ExchangeId, req: &Message, d: Device) {
        let value = match parse_config(&req.payload) {
            Ok(v) => v,
            Err(e) => {
                let r = diagnostic(Code::BAD_REQUEST, &e.to_string());
                return self.spawn_done(Done::Respond {
                    exchange,
                    response: r,
                });
            }
        };
        let store = self.ctx.store.clone();
        let rules = self.ctx.pipeline.rules().cloned();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let rules = rules.as_deref();
            let response = match store_reported(&store, rules, &d.id, value, Source::Coap).await {
                Ok(_) => Response::new(Code::CHANGED),
                Err(StoreError::NotFound { .. }) => {
                    diagnostic(Code::NOT_FOUND, "the device was deleted")
                }
                Err(StoreError::Invalid(why)) => diagnostic(Code::BAD_REQUEST, &why),
                Err(e) => {
                    tracing::error!(device = %d.id, error = %e, "coap: storing the reported config failed");
                    diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure")
                }
            };
            let _ = tx.send(Done::Respond { exchange, response });
        });
    }

    /// `GET /firmware/{id}`: one Block2 block of the image, read from its file (the block
    /// the request asks for, block 0 of at most 1024 bytes otherwise), with ETag (the first 8
    /// bytes of the SHA-256) and Size2. Only for a device the firmware is assigned to.
    fn firmware_block(&mut self, exchange: ExchangeId, req: &Message, d: Device, id: String) {
        let requested = req.options.block2().ok().flatten();
        let szx = requested.map_or(6, |b| b.szx.min(6));
        let num = requested.map_or(0, |b| b.num);
        let fw = self.ctx.firmware.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let response = firmware_block(&fw, &d.id, &id, num, szx).await;
            let _ = tx.send(Done::Respond { exchange, response });
        });
    }

    /// `GET /firmware`: the device's assignment notice (`null` without one); Observe=0
    /// registers for the next ones.
    fn firmware_notice(
        &mut self,
        exchange: ExchangeId,
        peer: SocketAddr,
        req: &Message,
        d: Device,
    ) {
        let observe = matches!(req.options.observe(), Ok(Some(0)))
            && self.may_observe(&d.id, peer, req.token);
        let observer = observe.then(|| NewObserver {
            peer,
            token: req.token,
            proof: d.proof.clone(),
        });
        self.firmware_reads
            .entry(d.id.clone())
            .or_insert((0, None))
            .0 += 1;
        let fw = self.ctx.firmware.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let mut response = match fw.notice(&d.id).await {
                Ok(notice) => {
                    notice_response(Bytes::from(serde_json::to_vec(&notice).unwrap_or_default()))
                }
                Err(e) => {
                    tracing::error!(device = %d.id, error = %e, "coap: reading the notice failed");
                    diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure")
                }
            };
            if observe && response.code.is_success() {
                response = response.observing();
            }
            let _ = tx.send(Done::Firmware {
                exchange,
                response,
                observer,
                device: d.id,
            });
        });
    }

    /// `POST /firmware/status`: a status report (a word or JSON, as on MQTT).
    fn firmware_status(&mut self, exchange: ExchangeId, req: &Message, d: Device) {
        let report = match crate::firmware::parse_status(&req.payload) {
            Ok(r) => r,
            Err(e) => {
                let r = diagnostic(Code::BAD_REQUEST, &e.to_string());
                return self.spawn_done(Done::Respond {
                    exchange,
                    response: r,
                });
            }
        };
        let store = self.ctx.store.clone();
        let broker = self.ctx.broker.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let response = match crate::firmware::report(&store, &broker, &d.id, report).await {
                Ok(_) => Response::new(Code::CHANGED),
                Err(StoreError::NotFound { kind, id }) => {
                    diagnostic(Code::NOT_FOUND, &format!("{kind} {id:?} not found"))
                }
                Err(StoreError::Invalid(why)) => diagnostic(Code::BAD_REQUEST, &why),
                Err(e) => {
                    tracing::error!(device = %d.id, error = %e, "coap: storing a firmware status failed");
                    diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure")
                }
            };
            let _ = tx.send(Done::Respond { exchange, response });
        });
    }

    /// Queues an answer through the same channel as the handlers' (keeps the order simple).
    fn spawn_done(&mut self, done: Done) {
        let _ = self.done_tx.send(done);
    }
}

/// The CoAP form of a refused telemetry message.
pub(crate) fn rejection(e: Rejected) -> Response {
    match e {
        Rejected::Invalid(IngestError::TooLarge { len, max }) => {
            let mut r = diagnostic(
                Code::REQUEST_ENTITY_TOO_LARGE,
                &format!("{len} bytes is more than the {max} bytes allowed"),
            );
            r.options.set_size1(u32::try_from(max).unwrap_or(u32::MAX));
            r
        }
        Rejected::Invalid(e) => diagnostic(Code::BAD_REQUEST, &e.to_string()),
        Rejected::Replay(r) if r.is_capacity() => {
            let mut resp = diagnostic(Code::SERVICE_UNAVAILABLE, &r.to_string());
            resp.options.set_max_age(1);
            resp
        }
        Rejected::Replay(r) => diagnostic(Code::CONFLICT, &r.to_string()),
        Rejected::Store(StoreError::NotFound { .. }) => {
            diagnostic(Code::NOT_FOUND, "the device was deleted")
        }
        Rejected::Store(e @ StoreError::Invalid(_)) => {
            diagnostic(Code::BAD_REQUEST, &e.to_string())
        }
        Rejected::Store(e) => {
            tracing::error!(error = %e, "coap: storing telemetry failed");
            diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure")
        }
        Rejected::Quota {
            why,
            retry_after_ms,
            ..
        } => match retry_after_ms {
            Some(ms) => too_many_requests(&why, ms),
            None => diagnostic(Code::TOO_MANY_REQUESTS, &why),
        },
    }
}

/// One Block2 block of firmware `id` for device `device` (see `Driver::firmware_block`).
async fn firmware_block(
    fw: &crate::firmware::Firmware,
    device: &str,
    id: &str,
    num: u32,
    szx: u8,
) -> Response {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    if stratus_store::firmware::check_firmware_id(id).is_err() {
        return diagnostic(Code::NOT_FOUND, "no such firmware");
    }
    match fw.is_assigned(device, id).await {
        Ok(true) => {}
        Ok(false) => {
            return diagnostic(
                Code::FORBIDDEN,
                "this firmware is not assigned to this device",
            )
        }
        Err(e) => {
            tracing::error!(device, error = %e, "coap: reading the assignment failed");
            return diagnostic(Code::INTERNAL_SERVER_ERROR, "store failure");
        }
    }
    let Some(block) = stratus_coap::BlockOption::new(num, false, szx) else {
        return diagnostic(Code::BAD_OPTION, "bad Block2");
    };
    let size = block.size() as u64;
    let offset = u64::from(num) * size;
    let mut file = match tokio::fs::File::open(fw.image_path(id)).await {
        Ok(f) => f,
        Err(_) => return diagnostic(Code::NOT_FOUND, "no such firmware"),
    };
    let total = match file.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return diagnostic(Code::INTERNAL_SERVER_ERROR, "cannot read the image"),
    };
    if offset >= total && !(offset == 0 && total == 0) {
        return diagnostic(Code::BAD_OPTION, "the block is past the end of the image");
    }
    let len = size.min(total - offset);
    let mut buf = vec![0u8; len as usize];
    let read = async {
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        file.read_exact(&mut buf).await
    };
    if let Err(e) = read.await {
        tracing::error!(firmware = %id, error = %e, "coap: reading the image failed");
        return diagnostic(Code::INTERNAL_SERVER_ERROR, "cannot read the image");
    }
    let more = offset + len < total;
    let mut r = Response::new(Code::CONTENT)
        .with_payload(Bytes::from(buf))
        .with_content_format(ContentFormat::OCTET_STREAM);
    r.options
        .set_block2(stratus_coap::BlockOption { num, more, szx });
    // An ETag is at most 8 bytes (RFC 7252 §5.10.6): the first 8 of the SHA-256.
    if let Ok(tag) = hex_prefix(id) {
        r.options.set_etag(&tag);
    }
    if num == 0 {
        r.options
            .set_size2(u32::try_from(total).unwrap_or(u32::MAX));
    }
    r
}

fn hex_prefix(id: &str) -> Result<[u8; 8], ()> {
    let mut out = [0u8; 8];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(id.get(2 * i..2 * i + 2).ok_or(())?, 16).map_err(|_| ())?;
    }
    Ok(out)
}
