//! The accept loop of the HTTP and HTTPS listeners: connection caps, timers and hyper.
//!
//! **Caps.** A listener holds at most `[http] max_connections` connections, and one source
//! address at most `max_connections_per_address` across both listeners (an IPv4-mapped IPv6
//! address counts as its IPv4 address). A connection over a cap is answered at once, without
//! reading its request, with a minimal `503 Service Unavailable` (listener full) or `429 Too
//! Many Requests` (that address), both with `Retry-After` and the API's JSON error body, and
//! closed; on HTTPS it is closed without an answer (a TLS handshake is what the flood would
//! cost us). The slot is held by the socket itself ([`Watched`]), so a connection upgraded to
//! a WebSocket, or streaming SSE, still counts until its socket closes.
//!
//! **Timers** (Go's `net/http` split, which hyper's own `header_read_timeout` does not
//! offer: hyper starts that timer whenever the connection waits for a head, so it would also
//! cut every idle keep-alive connection at the header timeout):
//! - *header*: a request's head must be complete `header_read_timeout_secs` after the accept
//!   (TLS handshake included) or, on a kept-alive connection, after its first byte;
//! - *idle*: a kept-alive connection with no request under way closes after
//!   `idle_timeout_secs`;
//! - *body*: a request body must be complete `body_timeout_secs` after its head, plus one
//!   second per `body_min_bytes_per_sec` bytes received (Apache's `mod_reqtimeout` rule, so a
//!   64 MiB firmware upload at a steady rate passes and a trickle does not); a late body
//!   fails for the handler, which answers, and the answer is replaced by `408 Request
//!   Timeout` with `Connection: close`. A handler that does not give up is cut.
//!
//! A request being handled or a response being sent has no timer: SSE streams and slow
//! handlers are exempt, and a WebSocket leaves hyper (and its timers) when it upgrades.
//! Each connection's task keeps one `Sleep`, armed at most the shortest timeout ahead; it
//! wakes, reads the connection's phase (atomics written by the socket wrapper, the service
//! and the body wrappers) and closes the connection or sleeps again. Nothing per request
//! touches the timer wheel.
//!
//! At shutdown a connection finishes its request under way (up to [`SHUTDOWN_DRAIN`]) and
//! closes; an SSE stream closes at once.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::accept::{AcceptBackoff, FdBudget};
use crate::config::HttpConfig;
use crate::metrics::{HttpTimeoutLabel, ListenerLabel, Metrics};

/// How long a connection may take, once shutdown began, to finish the request under way.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// `Retry-After` of a refused connection, in seconds.
const RETRY_AFTER_SECS: u32 = 5;

/// The effective limits of the HTTP listeners (`[http]` fitted to the fd budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections per listener.
    pub max_connections: usize,
    /// Connections per source address, across the HTTP listeners.
    pub max_per_address: usize,
    /// See [`HttpConfig::header_read_timeout_secs`].
    pub header_read_timeout: Duration,
    /// See [`HttpConfig::idle_timeout_secs`].
    pub idle_timeout: Duration,
    /// See [`HttpConfig::body_timeout_secs`].
    pub body_timeout: Duration,
    /// See [`HttpConfig::body_min_bytes_per_sec`].
    pub body_min_bytes_per_sec: u64,
    /// See [`HttpConfig::max_header_bytes`].
    pub max_header_bytes: usize,
}

impl Limits {
    /// `config` with its caps lowered to fit `budget` shared by `listeners` HTTP listeners.
    pub fn new(config: &HttpConfig, budget: FdBudget, listeners: usize) -> Limits {
        let max_connections = budget.http_max_connections(config.max_connections, listeners);
        Limits {
            max_connections,
            max_per_address: FdBudget::http_max_per_address(
                config.max_connections_per_address,
                max_connections,
            ),
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
            body_timeout: Duration::from_secs(config.body_timeout_secs),
            body_min_bytes_per_sec: config.body_min_bytes_per_sec,
            max_header_bytes: config.max_header_bytes,
        }
    }

    /// The longest a connection's task sleeps between looks at its phase.
    fn step_ms(&self) -> u64 {
        millis(
            self.header_read_timeout
                .min(self.idle_timeout)
                .min(self.body_timeout),
        )
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the HTTP listeners share: their limits and the per-address table.
pub struct Admission {
    limits: Limits,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

impl Admission {
    /// Admission under `limits`, counted in `metrics`.
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            per_address: Mutex::new(HashMap::new()),
            metrics,
        })
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The listener holds `max_connections`.
    ListenerFull,
    /// The address holds `max_connections_per_address`.
    AddressLimit,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::AddressLimit => "address_limit",
        }
    }

    /// The whole answer, bytes on the wire.
    fn response(self) -> Vec<u8> {
        let (status, error, description) = match self {
            Refusal::ListenerFull => (
                "503 Service Unavailable",
                "server_busy",
                "the server holds as many HTTP connections as it may; retry later",
            ),
            Refusal::AddressLimit => (
                "429 Too Many Requests",
                "too_many_connections",
                "too many connections from this address; close some or retry later",
            ),
        };
        let body = format!(r#"{{"error":"{error}","error_description":"{description}"}}"#);
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: {RETRY_AFTER_SECS}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// One listener: what it serves and how many connections it holds.
struct Listener {
    name: &'static str,
    admission: Arc<Admission>,
    app: Router,
    tls: Option<TlsAcceptor>,
    http: hyper::server::conn::http1::Builder,
    open: AtomicUsize,
    gauge: Gauge,
    refusals: LogThrottle,
    timeouts: LogThrottle,
}

impl Listener {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let limits = &self.admission.limits;
        if self.open.fetch_add(1, Relaxed) >= limits.max_connections {
            self.open.fetch_sub(1, Relaxed);
            return Err(Refusal::ListenerFull);
        }
        let ip = ip.to_canonical();
        {
            let mut table = self.admission.per_address.lock();
            let held = table.entry(ip).or_insert(0);
            if *held >= limits.max_per_address {
                drop(table);
                self.open.fetch_sub(1, Relaxed);
                return Err(Refusal::AddressLimit);
            }
            *held += 1;
        }
        self.gauge.inc();
        Ok(Permit {
            listener: self.clone(),
            ip,
        })
    }

    fn refuse(&self, tcp: TcpStream, peer: SocketAddr, refusal: Refusal, answers: &Answers) {
        self.admission
            .metrics
            .connection_refused(self.name, refusal.reason());
        if let Some(more) = self.refusals.hit() {
            tracing::warn!(
                listener = self.name,
                %peer,
                reason = refusal.reason(),
                refused_since_last_line = more,
                "connection refused"
            );
        }
        if self.tls.is_none() {
            let answer = match refusal {
                Refusal::ListenerFull => &answers.full,
                Refusal::AddressLimit => &answers.address,
            };
            let _ = tcp.try_write(answer);
        }
        // Read what the request already sent, so that closing sends a FIN rather than a RST
        // (which can destroy the answer before the client reads it). Never waits.
        let mut sink = [0u8; 4096];
        for _ in 0..4 {
            match tcp.try_read(&mut sink) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }

    fn timed_out(&self, kind: &'static str, peer: SocketAddr) {
        self.admission
            .metrics
            .http_timeouts
            .get_or_create(&HttpTimeoutLabel {
                listener: self.name,
                kind,
            })
            .inc();
        if let Some(more) = self.timeouts.hit() {
            tracing::info!(
                listener = self.name,
                %peer,
                kind,
                timeouts_since_last_line = more,
                "http connection timed out"
            );
        }
    }
}

/// The refusals, rendered once.
struct Answers {
    full: Vec<u8>,
    address: Vec<u8>,
}

/// One log line per 10 s at most for a kind of event, with how many happened in between.
struct LogThrottle(Mutex<(Option<Instant>, u64)>);

impl LogThrottle {
    fn new() -> LogThrottle {
        LogThrottle(Mutex::new((None, 0)))
    }

    /// Counts an event; `Some(n)` when it should be logged, `n` events after the last line.
    fn hit(&self) -> Option<u64> {
        let mut state = self.0.lock();
        let (last, count) = &mut *state;
        *count += 1;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

/// A connection's slot in its listener and its address's count, given back on drop.
struct Permit {
    listener: Arc<Listener>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let l = &self.listener;
        l.open.fetch_sub(1, Relaxed);
        l.gauge.dec();
        let mut table = l.admission.per_address.lock();
        if let Some(held) = table.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` turns true; each
/// connection is a task of `tasks`. `name` labels metrics and logs (`http`, `https`).
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    admission: Arc<Admission>,
    tasks: TaskTracker,
    shutdown: watch::Receiver<bool>,
) {
    let metrics = admission.metrics.clone();
    let gauge = metrics
        .http_connections
        .get_or_create(&ListenerLabel { listener: name })
        .clone();
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timers are ours (see the module docs); hyper's would need its `timer` too.
    http.header_read_timeout(None::<Duration>)
        .max_header_size(admission.limits.max_header_bytes);
    let this = Arc::new(Listener {
        name,
        admission,
        app,
        tls,
        http,
        open: AtomicUsize::new(0),
        gauge,
        refusals: LogThrottle::new(),
        timeouts: LogThrottle::new(),
    });
    let answers = Answers {
        full: Refusal::ListenerFull.response(),
        address: Refusal::AddressLimit.response(),
    };
    let mut backoff = AcceptBackoff::new(name, &metrics);
    let mut stop = shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = crate::stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if !backoff.failed(&e, &mut stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        backoff.accepted();
        match this.admit(peer.ip()) {
            Ok(permit) => {
                tasks.spawn(connection(
                    this.clone(),
                    tcp,
                    peer,
                    permit,
                    shutdown.clone(),
                ));
            }
            Err(refusal) => this.refuse(tcp, peer, refusal, &answers),
        }
    }
}

async fn connection(
    listener: Arc<Listener>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(ConnState::new());
    let Some(acceptor) = listener.tls.clone() else {
        let io = Watched::new(tcp, state.clone(), permit);
        return drive(&listener, io, state, peer, shutdown).await;
    };
    let handshake = tokio::time::timeout(
        listener.admission.limits.header_read_timeout,
        acceptor.accept(tcp),
    );
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "https handshake failed");
                return;
            }
            Err(_) => {
                listener.timed_out("header", peer);
                return;
            }
        },
        _ = crate::stopped(&mut shutdown) => return,
    };
    let io = Watched::new(tls, state.clone(), permit);
    drive(&listener, io, state, peer, shutdown).await;
}

/// Serves one connection with hyper, under its timers.
async fn drive<S>(
    listener: &Listener,
    io: Watched<S>,
    state: Arc<ConnState>,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = ConnService {
        app: TowerToHyperService::new(listener.app.clone()),
        state: state.clone(),
        peer,
        https: listener.tls.is_some(),
    };
    let conn = listener
        .http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let limits = &listener.admission.limits;
    let step = limits.step_ms();
    let timer = tokio::time::sleep_until(state.instant(step));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "http connection ended");
                }
                return;
            }
            () = timer.as_mut() => {
                let now = state.now_ms();
                match state.check(limits, now) {
                    Verdict::Close(kind) => {
                        if kind != "body" {
                            listener.timed_out(kind, peer);
                        }
                        return;
                    }
                    Verdict::BodyLate => {
                        // The handler sees its body fail at its next read and answers; the
                        // answer becomes a 408. It has one more step to do so.
                        state.body_expired.store(true, Relaxed);
                        listener.timed_out("body", peer);
                        timer.as_mut().reset(state.instant(now.saturating_add(step)));
                    }
                    Verdict::Wait(at) => timer.as_mut().reset(state.instant(at)),
                }
            }
            _ = crate::stopped(&mut shutdown) => break,
        }
    }
    conn.as_mut().graceful_shutdown();
    if !state.streaming.load(Relaxed) {
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, conn).await;
    }
}

/// Waiting for (or reading) a request head.
const HEAD: u8 = 0;
/// Kept alive, waiting for the next request's first byte.
const IDLE: u8 = 1;
/// A request under way: its body, its handler, or its response.
const BUSY: u8 = 2;
/// `body_since_ms` when no request body is being received.
const NO_BODY: u64 = u64::MAX;

/// Where a connection is, written by its socket, service and body wrappers and read by its
/// task's timer. Times are milliseconds since the accept.
struct ConnState {
    epoch: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
    body_since_ms: AtomicU64,
    body_bytes: AtomicU64,
    body_expired: AtomicBool,
    streaming: AtomicBool,
}

/// What a connection's timer found.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Close the connection: this timer (`header`, `idle`, `body`) ran out.
    Close(&'static str),
    /// The request body is late: fail it.
    BodyLate,
    /// Look again at this time.
    Wait(u64),
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            epoch: Instant::now(),
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(0),
            body_since_ms: AtomicU64::new(NO_BODY),
            body_bytes: AtomicU64::new(0),
            body_expired: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn instant(&self, ms: u64) -> tokio::time::Instant {
        // Deadlines are hours away at most; the clamp keeps the sum from overflowing.
        const YEAR_MS: u64 = 365 * 86_400 * 1000;
        let at = self
            .epoch
            .checked_add(Duration::from_millis(ms.min(YEAR_MS)))
            .unwrap_or(self.epoch);
        tokio::time::Instant::from_std(at)
    }

    /// Bytes arrived: an idle connection starts reading a head.
    fn received(&self) {
        if self.phase.load(Relaxed) == IDLE {
            self.since_ms.store(self.now_ms(), Relaxed);
            self.phase.store(HEAD, Relaxed);
        }
    }

    /// A request's head is complete; `body` when a body follows.
    fn request_started(&self, body: bool) {
        self.phase.store(BUSY, Relaxed);
        self.body_expired.store(false, Relaxed);
        self.body_bytes.store(0, Relaxed);
        let since = if body { self.now_ms() } else { NO_BODY };
        self.body_since_ms.store(since, Relaxed);
    }

    /// The response is sent (or abandoned): the connection waits for the next request.
    fn request_done(&self) {
        self.body_since_ms.store(NO_BODY, Relaxed);
        self.streaming.store(false, Relaxed);
        self.since_ms.store(self.now_ms(), Relaxed);
        self.phase.store(IDLE, Relaxed);
    }

    fn check(&self, limits: &Limits, now: u64) -> Verdict {
        let since = self.since_ms.load(Relaxed);
        let deadline = match self.phase.load(Relaxed) {
            HEAD => Some((
                since.saturating_add(millis(limits.header_read_timeout)),
                "header",
            )),
            IDLE => Some((since.saturating_add(millis(limits.idle_timeout)), "idle")),
            _ => match self.body_since_ms.load(Relaxed) {
                NO_BODY => None,
                _ if self.body_expired.load(Relaxed) => return Verdict::Close("body"),
                start => {
                    let bytes = self.body_bytes.load(Relaxed);
                    let earned = match limits.body_min_bytes_per_sec {
                        0 => 0,
                        rate => bytes.saturating_mul(1000) / rate,
                    };
                    let deadline = start
                        .saturating_add(millis(limits.body_timeout))
                        .saturating_add(earned);
                    Some((deadline, "body"))
                }
            },
        };
        let next = now.saturating_add(limits.step_ms());
        match deadline {
            Some((at, "body")) if now >= at => Verdict::BodyLate,
            Some((at, kind)) if now >= at => Verdict::Close(kind),
            Some((at, _)) => Verdict::Wait(at.min(next)),
            None => Verdict::Wait(next),
        }
    }
}

/// A connection's socket: notes arriving bytes for the timers and holds the connection's
/// slot for as long as the socket is open (past a WebSocket upgrade too).
struct Watched<S> {
    inner: S,
    state: Arc<ConnState>,
    _permit: Permit,
}

impl<S> Watched<S> {
    fn new(inner: S, state: Arc<ConnState>, permit: Permit) -> Watched<S> {
        Watched {
            inner,
            state,
            _permit: permit,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.received();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The per-connection hyper service: marks the request's phases, adds the peer address (and
/// the HTTPS marker) to its extensions, times its body and hands it to the router.
struct ConnService {
    app: TowerToHyperService<Router>,
    state: Arc<ConnState>,
    peer: SocketAddr,
    https: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let state = self.state.clone();
        let (mut parts, body) = request.into_parts();
        state.request_started(!body.is_end_stream());
        parts.extensions.insert(ConnectInfo(self.peer));
        if self.https {
            parts.extensions.insert(crate::dashboard::Https);
        }
        let body = Body::new(TimedBody {
            inner: body,
            state: state.clone(),
            open: true,
        });
        let routed = self.app.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let mut response = match routed.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            if state.body_expired.load(Relaxed) {
                response = request_timeout();
            } else if response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"))
            {
                state.streaming.store(true, Relaxed);
            }
            Ok(response.map(|inner| TrackedBody { inner, state }))
        })
    }
}

/// The answer to a request whose body was too slow.
fn request_timeout() -> Response<Body> {
    let body = r#"{"error":"request_timeout","error_description":"the request body did not arrive in time"}"#;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body under its deadline: counts what arrives and fails once the connection's
/// timer found it late.
struct TimedBody {
    inner: Incoming,
    state: Arc<ConnState>,
    open: bool,
}

impl TimedBody {
    fn finish(&mut self) {
        if std::mem::take(&mut self.open) {
            self.state.body_since_ms.store(NO_BODY, Relaxed);
        }
    }
}

/// The error of a body that arrived too slowly.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.open && self.state.body_expired.load(Relaxed) {
            self.finish();
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.state.body_bytes.fetch_add(data.len() as u64, Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A response body that tells the connection when it is done (hyper drops it then).
pub struct TrackedBody {
    inner: Body,
    state: Arc<ConnState>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.state.request_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            max_per_address: 2,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            body_timeout: Duration::from_secs(30),
            body_min_bytes_per_sec: 500,
            max_header_bytes: 16 * 1024,
        }
    }

    #[test]
    fn a_new_connection_has_the_header_timeout_and_wakes_every_step() {
        let (s, l) = (ConnState::new(), limits());
        assert_eq!(s.check(&l, 0), Verdict::Wait(10_000));
        assert_eq!(s.check(&l, 9_999), Verdict::Wait(10_000));
        assert_eq!(s.check(&l, 10_000), Verdict::Close("header"));
    }

    #[test]
    fn idle_then_a_first_byte_starts_the_header_timer() {
        let (s, l) = (ConnState::new(), limits());
        s.request_started(false);
        assert_eq!(s.check(&l, 50_000), Verdict::Wait(60_000), "busy: no timer");
        s.request_done();
        s.since_ms.store(60_000, Relaxed);
        assert_eq!(s.check(&l, 60_000), Verdict::Wait(70_000));
        assert_eq!(s.check(&l, 134_999), Verdict::Wait(135_000));
        assert_eq!(s.check(&l, 135_000), Verdict::Close("idle"));
        s.phase.store(IDLE, Relaxed);
        s.received();
        let since = s.since_ms.load(Relaxed);
        assert_eq!(s.phase.load(Relaxed), HEAD);
        assert_eq!(
            s.check(&l, since + 10_000),
            Verdict::Close("header"),
            "the head has 10 s from its first byte"
        );
    }

    #[test]
    fn a_body_earns_time_at_the_minimum_rate() {
        let (s, l) = (ConnState::new(), limits());
        s.request_started(true);
        s.body_since_ms.store(1_000, Relaxed);
        assert_eq!(s.check(&l, 30_999), Verdict::Wait(31_000));
        assert_eq!(s.check(&l, 31_000), Verdict::BodyLate);
        s.body_bytes.store(5_000, Relaxed); // 10 s more at 500 B/s
        assert_eq!(s.check(&l, 31_000), Verdict::Wait(41_000));
        assert_eq!(s.check(&l, 41_000), Verdict::BodyLate);
        s.body_expired.store(true, Relaxed);
        assert_eq!(
            s.check(&l, 51_000),
            Verdict::Close("body"),
            "the handler did not give up"
        );
        // 64 MiB at 1 MiB/s: far inside its deadline at any point.
        s.request_started(true);
        s.body_since_ms.store(0, Relaxed);
        s.body_bytes.store(63 << 20, Relaxed);
        assert!(matches!(s.check(&l, 63_000), Verdict::Wait(_)));
    }

    #[test]
    fn refusals_are_complete_http_answers() {
        for (r, status) in [
            (Refusal::ListenerFull, "503"),
            (Refusal::AddressLimit, "429"),
        ] {
            let text = String::from_utf8(r.response()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(head.contains("\r\nretry-after: 5"), "{head}");
            assert!(head.contains("\r\nconnection: close"), "{head}");
            assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(json["error"].is_string() && json["error_description"].is_string());
        }
    }

    #[test]
    fn the_log_throttle_counts_what_it_kept_quiet() {
        let t = LogThrottle::new();
        assert_eq!(t.hit(), Some(1));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        t.0.lock().0 = Some(Instant::now() - Duration::from_secs(11));
        assert_eq!(t.hit(), Some(3));
    }
}
