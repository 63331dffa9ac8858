//! The MQTT listener: accepts TCP connections and drives one [`Connection`] state machine per
//! socket in its own task — read, feed, route, deliver, write, and sleep until the next deadline;
//! a quiet plain-TCP connection leaves its task for the [`parking`] lot.

mod credentials;
mod parking;
mod quota;

pub use credentials::CredentialWatch;
pub use quota::Quotas;

use std::collections::VecDeque;
use std::future::pending;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use stratus_mqtt::{
    CloseReason, ConnectReturnCode, Connection, Event, Limits, Message, MqttStr, PacketId,
    ReasonCode, RetainHandling,
};
use stratus_store::{Completion, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::acl::{Acl, Who};
use crate::auth::{Auth, AuthError, Kind, Principal};
use crate::broker::{AttachRefused, Broker, ClientHandle, Deferred, Express, Owner};
use crate::config::DeviceClientIds;
use crate::ingest::ContentFormat;
use crate::pipeline::{Accepted, Pipeline, Rejected, Source};
use crate::policy::Policy;
use crate::transport::{MqttRead, MqttWrite, StreamReader, StreamWriter, TcpReader, TcpWriter};
use parking::{Parked, ParkingLot};

/// What every MQTT connection task shares.
pub struct MqttContext {
    /// The broker hub.
    pub broker: Arc<Broker>,
    /// Per-connection limits, shared by every connection's state machine.
    pub limits: Arc<Limits>,
    /// Whether clients without credentials may connect.
    pub allow_anonymous: bool,
    /// Simultaneous connections allowed.
    pub max_connections: usize,
    /// Open connections now.
    pub open: AtomicUsize,
    /// How long a publisher waits for a congested subscriber before that subscriber is
    /// disconnected as a slow consumer.
    pub slow_consumer_timeout: std::time::Duration,
    /// Topic access rules from the config.
    pub acl: Acl,
    /// Credentials of devices and applications.
    pub auth: Arc<Auth>,
    /// Failed logins, aggregated for the audit log.
    pub failures: Arc<crate::audit::failures::FailureLog>,
    /// The telemetry pipeline (`devices/{id}/telemetry`).
    pub pipeline: Arc<Pipeline>,
    /// Which client ids a device may use.
    pub device_client_ids: DeviceClientIds,
    /// The credentials of live connections, ended when they stop holding.
    pub credentials: Arc<CredentialWatch>,
    /// Subscriptions per client, connections per principal and per address.
    pub quotas: Quotas,
}

/// Why a connection is refused whatever its CONNECT says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overload {
    /// Room for it.
    No,
    /// Over `[mqtt] max_connections`.
    Server,
    /// Over `[mqtt] max_connections_per_address`.
    Address,
}

/// A refused CONNECT: the MQTT 5.0 reason code (3.1.1 clients get its twin) and why.
struct Refusal {
    code: ReasonCode,
    why: &'static str,
}

impl Refusal {
    fn new(code: ReasonCode, why: &'static str) -> Refusal {
        Refusal { code, why }
    }
}

/// Who a CONNECT authenticated as.
struct Admitted {
    /// What it may publish, subscribe to and receive.
    policy: Policy,
    /// Who its session belongs to.
    owner: Owner,
    /// The device or application, when it is one (its credential is watched).
    principal: Option<Principal>,
}

/// Accepts TCP connections until `shutdown` turns true; each runs in a task on `tasks`,
/// which the server waits on at shutdown (every client closed, wills published).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<MqttContext>,
    tls: Option<TlsAcceptor>,
    tasks: TaskTracker,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    // Plain TCP connections park in a lot while quiet; without one each keeps its task.
    let lot = match tls {
        Some(_) => None,
        None => match ParkingLot::start(
            ctx.broker.park_wakes().clone(),
            tasks.clone(),
            shutdown.clone(),
        ) {
            Ok(lot) => Some(lot),
            Err(e) => {
                tracing::warn!(error = %e, "mqtt connections will not be parked");
                None
            }
        },
    };
    let name = if tls.is_some() { "mqtts" } else { "mqtt" };
    let mut backoff = crate::accept::AcceptBackoff::new(name, &ctx.broker.metrics);
    let socket_cap = crate::accept::mqtt_socket_cap(ctx.max_connections);
    loop {
        tokio::select! {
            _ = crate::stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff.accepted();
                    if ctx.open.load(Ordering::Relaxed) >= socket_cap {
                        // Far over max_connections: closed at once, so a flood cannot take
                        // the descriptors the other listeners need (see `accept`).
                        ctx.broker.metrics.connection_refused(name, "fd_budget");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let ctx = ctx.clone();
                    let shutdown = shutdown.clone();
                    match (&tls, &lot) {
                        (None, Some(lot)) => {
                            let driver = Driver::start(ctx, peer, None);
                            // It reads its CONNECT first, then parks once it is quiet.
                            let linger = std::time::Duration::ZERO;
                            tasks.spawn(run_tcp(driver, stream, shutdown, true, linger, lot.clone()));
                        }
                        (None, None) => {
                            let (r, w) = stream.into_split();
                            tasks.spawn(run_connection(ctx, TcpReader::new(r), TcpWriter::new(w), peer, None, shutdown));
                        }
                        (Some(acceptor), _) => {
                            let acceptor = acceptor.clone();
                            tasks.spawn(async move {
                                let handshake = tokio::time::timeout(ctx.limits.connect_timeout, acceptor.accept(stream));
                                match handshake.await {
                                    Ok(Ok(tls)) => {
                                        let identity = crate::tls::peer_common_name(tls.get_ref().1);
                                        let (r, w) = tokio::io::split(tls);
                                        run_connection(ctx, StreamReader(r), StreamWriter(w), peer, identity, shutdown).await;
                                    }
                                    Ok(Err(e)) => {
                                        ctx.broker.metrics.protocol_error("tls_handshake");
                                        tracing::info!(%peer, error = %e, "mqtts handshake failed");
                                    }
                                    Err(_) => {
                                        ctx.broker.metrics.protocol_error("tls_handshake");
                                        tracing::info!(%peer, "mqtts handshake timed out");
                                    }
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    if !backoff.failed(&e, &mut stop).await {
                        break;
                    }
                }
            },
        }
    }
}

/// The client a connection serves, once its CONNECT was accepted.
struct Attachment {
    handle: Arc<ClientHandle>,
    conn: u64,
    /// What it may publish, subscribe to and receive.
    policy: Policy,
    /// The user name access rules see: the CONNECT's, else the TLS identity.
    user: Option<MqttStr>,
}

impl Attachment {
    fn who(&self) -> Who<'_> {
        Who {
            user: self.user.as_deref(),
            client_id: self.handle.id(),
        }
    }
}

struct Driver {
    ctx: Arc<MqttContext>,
    /// The client's address, for logs (as an address and a port: 20 bytes, not 32).
    peer_ip: std::net::IpAddr,
    peer_port: u16,
    conn: Connection,
    /// The name the transport authenticated (TLS client certificate CN).
    identity: Option<Box<MqttStr>>,
    client: Option<Attachment>,
    over_limit: Overload,
    /// More mail can be moved into the connection right away.
    more_mail: bool,
    /// Flow control: messages of this client that congested subscribers, in receive order,
    /// until those subscribers catch up or the slow-consumer timeout passes. A QoS 1/2 one holds
    /// back its acknowledgement; a QoS 0 one stops reading from the client.
    held_acks: HeldAcks,
    /// How many of `held_acks` are QoS 0 (reading is paused while any is).
    held_qos0: u32,
    /// The client's will as stored with its persisted session (boxed: most have none).
    stored_will: Option<Box<Bytes>>,
    /// The will was still pending (delayed) when the connection closed: the store keeps it.
    will_pending: bool,
}

/// The held acknowledgements of a connection, in receive order: a queue kept behind a pointer
/// that exists only once something was held (most connections of a quiet fleet never hold
/// one, and the queue inline would cost each idle connection 24 bytes).
#[derive(Default)]
// The box is the point: the inline queue is what an idle connection must not pay for.
#[allow(clippy::box_collection)]
struct HeldAcks(Option<Box<VecDeque<HeldAck>>>);

impl HeldAcks {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn push_back(&mut self, held: HeldAck) {
        self.0.get_or_insert_default().push_back(held);
    }

    fn pop_front(&mut self) -> Option<HeldAck> {
        self.0.as_mut()?.pop_front()
    }

    fn front_mut(&mut self) -> Option<&mut HeldAck> {
        self.0.as_mut()?.front_mut()
    }
}

/// A message whose acknowledgement is held back: for durability, then for flow control.
struct HeldAck {
    /// The packet id to acknowledge once released; `None` for QoS 0.
    packet_id: Option<PacketId>,
    /// The reason code of the acknowledgement (MQTT 5.0).
    code: ReasonCode,
    /// Resolves when the store has what the message changed.
    durable: Option<Completion>,
    /// A device's telemetry: resolves when the pipeline stored (or refused) it; the message in
    /// `route` is then routed to subscribers (if stored) before the acknowledgement goes.
    verdict: Option<oneshot::Receiver<Result<Accepted, Rejected>>>,
    /// The message to route once `verdict` says it was stored.
    route: Option<Message>,
    subscribers: Vec<Arc<ClientHandle>>,
    deadline: tokio::time::Instant,
}

/// Drives one MQTT connection over any transport (TLS, WebSocket) until it closes. `identity`
/// is the authenticated name from the transport (a TLS client certificate's CN), if any.
pub async fn run_connection<R: MqttRead, W: MqttWrite>(
    ctx: Arc<MqttContext>,
    reader: R,
    writer: W,
    peer: SocketAddr,
    identity: Option<MqttStr>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut d = Driver::start(ctx, peer, identity);
    let mut io = Io::new(reader, writer);
    d.run_busy(&mut io, &mut shutdown, None, false).await;
    d.close(io).await;
}

/// Drives a plain TCP MQTT connection until it closes. Whenever it has been quiet for `linger`
/// it is parked in `lot` as a bare socket and its state, and this task ends; the lot spawns it
/// again (here, with `readable` when input woke it) when there is something to do.
async fn run_tcp(
    mut d: Box<Driver>,
    stream: tokio::net::TcpStream,
    mut shutdown: watch::Receiver<bool>,
    readable: bool,
    linger: std::time::Duration,
    lot: Arc<ParkingLot>,
) {
    let (r, w) = stream.into_split();
    let mut io = Io::new(TcpReader::new(r), TcpWriter::new(w));
    let (mut linger, mut readable) = (Some(linger), readable);
    loop {
        // Boxed: the busy loop's select and handler futures (kilobytes) exist only while the
        // connection has traffic.
        match Box::pin(d.run_busy(&mut io, &mut shutdown, linger, readable)).await {
            Busy::Closed => break,
            Busy::Quiet => {
                d.release_idle_memory();
                let Ok(writer) = io.writer.into_half() else {
                    // The express lane is closed before the busy loop returns; never lose the
                    // connection if not.
                    tracing::error!(peer = %d.peer(), "mqtt socket still shared when parking");
                    return d.close_broken().await;
                };
                let stream = match io.reader.into_half().reunite(writer) {
                    Ok(stream) => stream,
                    Err(e) => {
                        // Halves of one socket always reunite; never lose the connection if not.
                        tracing::error!(peer = %d.peer(), error = %e, "mqtt socket halves did not reunite");
                        return d.close_broken().await;
                    }
                };
                match lot.park(d, stream) {
                    Parked::Yes => return,
                    Parked::Broken(broken) => return broken.close_broken().await,
                    // The lot closed (shutdown): stay here until the connection closes.
                    Parked::No(back, stream) => {
                        d = back;
                        let (r, w) = stream.into_split();
                        io = Io::new(TcpReader::new(r), TcpWriter::new(w));
                        (linger, readable) = (None, false);
                    }
                }
            }
        }
    }
    d.close(io).await;
}

/// Writes `last` and closes the sending direction, for one second at most.
async fn farewell<W: MqttWrite>(writer: &mut W, last: Bytes, metrics: &crate::metrics::Metrics) {
    let goodbye = async {
        let mut rest = &last[..];
        while !rest.is_empty() {
            match writer.write_some(rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    metrics.mqtt_bytes_sent.inc_by(n as u64);
                    rest = &rest[n..];
                }
            }
        }
        let _ = writer.flush().await;
        let _ = writer.close().await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), goodbye).await;
}

/// Reads and discards what the client still sends until it closes too, for one second at
/// most. Closing a socket with unread input makes the kernel answer with RST, and a client
/// that was still writing (pipelining past Receive Maximum, over its rate) could then lose
/// the DISCONNECT and its reason code before reading it: a server that must be heard lingers.
async fn linger<R: MqttRead>(mut reader: R) {
    let drain = async {
        let mut scratch = BytesMut::new();
        loop {
            scratch.clear();
            match reader.read_into(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

/// A connection's transport halves and what sits between them and the state machine.
struct Io<R, W> {
    reader: R,
    writer: W,
    /// Bytes read and not yet decoded; empty (no allocation) while the connection is quiet.
    rbuf: BytesMut,
    /// Bytes were written since the last flush.
    unflushed: bool,
}

impl<R, W> Io<R, W> {
    fn new(reader: R, writer: W) -> Self {
        Io {
            reader,
            writer,
            rbuf: BytesMut::new(),
            unflushed: false,
        }
    }
}

/// How long a connection stays in its busy loop after it fell quiet before it is parked, when
/// it was woken less than this after it last parked: a client that talks several times a
/// second never pays for parking and waking. A new connection, or one woken after a longer
/// rest (a ping, a reading a minute), parks as soon as it is quiet again, so its busy loop's
/// memory is freed while the next connection can reuse it.
pub(crate) const PARK_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// At most this many QoS 0 deliveries of one single-PUBLISH batch are written straight to idle
/// subscribers' sockets by the publisher's task (see `broker::Express`).
const EXPRESS_FANOUT: u8 = 4;

/// A subscriber woken for mail sooner than this after its last mail is in a stream of
/// messages: it drains its mailbox in batches rather than open its express lane.
const LANE_AFTER: std::time::Duration = std::time::Duration::from_micros(100);

/// Why the busy loop returned.
enum Busy {
    /// The connection closed.
    Closed,
    /// Nothing to read, write, deliver or wait for: the connection can be parked.
    Quiet,
}

impl Driver {
    /// A connection just accepted, before its CONNECT.
    fn start(ctx: Arc<MqttContext>, peer: SocketAddr, identity: Option<MqttStr>) -> Box<Driver> {
        let open = ctx.open.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.broker.metrics.mqtt_connections.inc();
        // Counted here and given back in `finish`, whatever happens in between.
        let address_ok = ctx.quotas.address_opened(peer.ip());
        let over_limit = if open > ctx.max_connections {
            Overload::Server
        } else if !address_ok {
            Overload::Address
        } else {
            Overload::No
        };
        Box::new(Driver {
            conn: Connection::new(ctx.limits.clone(), Instant::now()),
            over_limit,
            ctx,
            peer_ip: peer.ip(),
            peer_port: peer.port(),
            identity: identity.map(Box::new),
            client: None,
            more_mail: false,
            held_acks: HeldAcks::default(),
            held_qos0: 0,
            stored_will: None,
            will_pending: false,
        })
    }

    /// Flushes the last words (CONNACK refusals, SUBACKs) with a bound, closes the transport
    /// and hands the session back. Boxed, so its futures take no room in a busy task.
    /// The session is handed back before the linger, so a client taking over does not wait
    /// for it.
    async fn close<R: MqttRead, W: MqttWrite>(mut self: Box<Self>, io: Io<R, W>) {
        let last = self.conn.transmit().split().freeze();
        let Io {
            reader, mut writer, ..
        } = io;
        let metrics = self.ctx.broker.metrics.clone();
        Box::pin(farewell(&mut writer, last, &metrics)).await;
        self.finish();
        Box::pin(linger(reader)).await;
    }

    /// The client's address.
    fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.peer_ip, self.peer_port)
    }

    /// Frees what only a busy connection needs (empty queues and buffers).
    fn release_idle_memory(&mut self) {
        self.conn.release_idle_memory();
        if self.held_acks.is_empty() {
            self.held_acks = HeldAcks::default();
        }
    }

    /// Ends a connection whose socket was lost while it moved in or out of the parking lot.
    async fn close_broken(mut self: Box<Self>) {
        self.conn.close(CloseReason::TransportClosed);
        Box::pin(self.handle_events(&mut BytesMut::new())).await;
        self.finish();
    }

    /// Reads, feeds, routes, delivers and writes until the connection closes or, when it may
    /// park, has been quiet for `linger`. `readable`: input woke the connection, so it reads
    /// before it may call itself quiet.
    async fn run_busy<R: MqttRead, W: MqttWrite>(
        &mut self,
        io: &mut Io<R, W>,
        shutdown: &mut watch::Receiver<bool>,
        linger: Option<std::time::Duration>,
        readable: bool,
    ) -> Busy {
        let parks = linger.is_some();
        let linger = linger.unwrap_or_default();
        let mut may_park = parks && !readable;
        // When the connection last became quiet; it parks once that lasted `linger`.
        let mut quiet_since: Option<Instant> = None;
        // The shutdown watch and the timer are made once and kept across turns: building,
        // registering and dropping them at every turn was a fifth of what a message cost at
        // low rates (callgrind, latency scenario).
        let mut stop = pin!(crate::stopped(shutdown));
        let mut stopping = false;
        let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        // The deadline the timer is set for (`None`: not set, or it fired).
        let mut armed: Option<Instant> = None;
        // The express lane (see `broker::Express`): open in the client's mailbox while the
        // loop waits with nothing to send, taken back at the top of every turn; kept here
        // in between for its buffer.
        let mut lane: Option<Box<Express>> = None;
        let mut lane_open = false;
        // Whether the lane is worth opening: mail comes a message at a time, and not in a
        // stream. A subscriber that drains batches, or wakes for mail again within
        // LANE_AFTER (a fan-out, a burst), leaves it shut, and its mailbox lock to the
        // publishers.
        let mut lane_worth = true;
        let mut last_mail = Instant::now();
        loop {
            if std::mem::take(&mut lane_open) && self.close_lane(&mut lane) > 0 {
                // Deliveries went out through the lane: the connection is not quiet.
                quiet_since = None;
            }
            self.handle_events(&mut io.rbuf).await;
            if self.conn.is_closed() {
                return Busy::Closed;
            }
            // Hand what the events produced to the kernel now when the transport can do so
            // without waiting (plain TCP): a delivery leaves before the loop waits on anything.
            if !self.conn.pending_transmit().is_empty() {
                match io.writer.try_write_now(self.conn.pending_transmit()) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    written => {
                        self.wrote::<W>(written, &mut io.unflushed);
                        if self.conn.is_closed() {
                            continue;
                        }
                    }
                }
            }
            let mut deadline = self.conn.poll_timeout();
            let wants_write = !self.conn.transmit().is_empty();
            if may_park
                && !wants_write
                && !io.unflushed
                && !self.more_mail
                && self.held_acks.is_empty()
                && io.rbuf.is_empty()
            {
                let now = Instant::now();
                let park_at = *quiet_since.get_or_insert(now) + linger;
                if now >= park_at {
                    return Busy::Quiet;
                }
                deadline = Some(deadline.map_or(park_at, |d| d.min(park_at)));
            } else {
                quiet_since = None;
            }
            // A later deadline leaves the timer set for the earlier one: it fires early, finds
            // nothing due, and the next turn sets it again. Deadlines that only move later (the
            // keep-alive limit moves with every packet) so cost no timer work per packet.
            if let Some(d) = deadline {
                if armed.is_none_or(|a| d < a) {
                    timer.as_mut().reset(d.into());
                    armed = Some(d);
                }
            }
            if lane_worth
                && !wants_write
                && !io.unflushed
                && !self.more_mail
                && self.held_acks.is_empty()
            {
                if let Some(socket) = io.writer.shared_socket() {
                    lane_open = self.open_lane(&mut lane, socket);
                }
            }
            // Unbiased: a busy mailbox must not starve reading the client's acknowledgements.
            // (select! drops every future before running a handler, so handlers may mutate `self`.)
            tokio::select! {
                _ = &mut stop, if !stopping => {
                    stopping = true;
                    self.conn.close(CloseReason::ServerShutdown);
                }
                _ = mail(self.client.as_ref().map(|c| &*c.handle)) => {
                    quiet_since = None;
                    let now = Instant::now();
                    lane_worth = self.deliver_mailbox() <= 1 && now - last_mail >= LANE_AFTER;
                    last_mail = now;
                }
                _ = std::future::ready(()), if self.more_mail => {
                    lane_worth = false;
                    self.deliver_mailbox();
                }
                durable = held_released(self.held_acks.front_mut(), self.ctx.broker.max_queued()), if !self.held_acks.is_empty() => self.release_held_ack(durable),
                read = io.reader.read_into(&mut io.rbuf), if self.held_qos0 == 0 => {
                    may_park = parks;
                    quiet_since = None;
                    match read {
                        Ok(0) | Err(_) => self.conn.close(CloseReason::TransportClosed),
                        Ok(n) => {
                            self.received(n, &mut io.rbuf);
                            // A connection that cannot park holds no read buffer between
                            // reads; one that parks keeps it until it parks (freeing and
                            // taking it again at every packet cost an allocation each).
                            if !parks && io.rbuf.is_empty() {
                                io.rbuf = BytesMut::new();
                            }
                        }
                    }
                },
                written = write_or_flush(&mut io.writer, self.conn.pending_transmit()), if wants_write || io.unflushed => {
                    self.wrote::<W>(written, &mut io.unflushed);
                }
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.conn.handle_timeout(Instant::now());
                }
            }
        }
    }
}

impl Driver {
    /// Takes in what a write (or, as `Ok(0)`, a flush) did: bytes leave the transmit buffer
    /// (and wait for a flush when the transport buffers them); an error closes the connection.
    fn wrote<W: MqttWrite>(&mut self, written: std::io::Result<usize>, unflushed: &mut bool) {
        match written {
            Ok(0) => *unflushed = false,
            Ok(n) => {
                self.sent(n);
                *unflushed = W::BUFFERS;
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer(), error = %e, "mqtt write failed");
                self.conn.close(CloseReason::TransportClosed);
            }
        }
    }

    /// Opens the client's express lane, if it has subscriptions and its deliveries need no
    /// connection state (see `Connection::qos0_encoder`); true if it is open.
    fn open_lane(
        &mut self,
        slot: &mut Option<Box<Express>>,
        socket: &Arc<tokio::net::tcp::OwnedWriteHalf>,
    ) -> bool {
        let Some(c) = &self.client else {
            return false;
        };
        if self
            .conn
            .session()
            .is_none_or(|s| s.subscriptions.is_empty())
        {
            return false;
        }
        let Some(encoder) = self.conn.qos0_encoder() else {
            return false;
        };
        let lane = match slot.take() {
            Some(mut lane) => {
                lane.reset(encoder);
                lane
            }
            None => Express::new(socket.clone(), encoder, c.conn),
        };
        match c.handle.open_express(lane) {
            Ok(()) => true,
            Err(lane) => {
                *slot = Some(lane);
                false
            }
        }
    }

    /// Takes the express lane back (no publisher writes to the socket after this), counts what
    /// went through it, and puts the tail of a packet the socket took in part first in the
    /// transmit buffer. Returns how many deliveries went through.
    fn close_lane(&mut self, slot: &mut Option<Box<Express>>) -> u32 {
        let Some(c) = &self.client else {
            return 0;
        };
        let Some(mut lane) = c.handle.close_express(c.conn) else {
            return 0;
        };
        let packets = lane.packets();
        self.conn.count_sent_elsewhere(packets);
        let rest = lane.take_rest();
        if !rest.is_empty() {
            let transmit = self.conn.transmit();
            let mut joined = BytesMut::with_capacity(rest.len() + transmit.len());
            joined.extend_from_slice(&rest);
            joined.extend_from_slice(transmit);
            *transmit = joined;
        }
        *slot = Some(lane);
        packets
    }
}

/// Writes some of `data`, or when there is nothing left to write, flushes (returning 0).
async fn write_or_flush<W: MqttWrite>(writer: &mut W, data: &[u8]) -> std::io::Result<usize> {
    if data.is_empty() {
        writer.flush().await.map(|()| 0)
    } else {
        match writer.write_some(data).await? {
            0 => Err(std::io::ErrorKind::WriteZero.into()),
            n => Ok(n),
        }
    }
}

/// How a held acknowledgement ended.
enum Released {
    /// It may go.
    Go,
    /// The store failed: never acknowledge; close.
    StoreFailed,
    /// The telemetry pipeline's answer.
    Telemetry(Result<Accepted, Rejected>),
}

/// Resolves when a held acknowledgement may go: once what it changed is durable (or the
/// telemetry pipeline answered), and every subscriber it congested has room again or its
/// deadline passed (then the laggards are marked as slow consumers); never when nothing is
/// held.
async fn held_released(held: Option<&mut HeldAck>, max_queued: usize) -> Released {
    let Some(held) = held else {
        return pending().await;
    };
    if let Some(completion) = held.durable.as_mut() {
        let result = completion.await;
        held.durable = None;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "store write failed; acknowledgement withheld");
                return Released::StoreFailed;
            }
            Err(_) => {
                tracing::error!("store writer gone; acknowledgement withheld");
                return Released::StoreFailed;
            }
        }
    }
    if let Some(verdict) = held.verdict.as_mut() {
        let result = verdict.await;
        held.verdict = None;
        return match result {
            Ok(r) => Released::Telemetry(r),
            Err(_) => Released::StoreFailed,
        };
    }
    for h in &held.subscribers {
        h.wait_for_space(max_queued, held.deadline).await;
    }
    Released::Go
}

async fn mail(handle: Option<&ClientHandle>) {
    match handle {
        Some(h) => h.notify.notified().await,
        None => pending().await,
    }
}

/// Resolves at `deadline`; never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => pending().await,
    }
}

impl Driver {
    fn received(&mut self, n: usize, rbuf: &mut BytesMut) {
        self.ctx.broker.metrics.mqtt_bytes_received.inc_by(n as u64);
        self.conn.handle_bytes(rbuf, Instant::now());
        // Acknowledgements may have opened the in-flight window.
        self.deliver_mailbox();
    }

    fn sent(&mut self, n: usize) {
        self.ctx.broker.metrics.mqtt_bytes_sent.inc_by(n as u64);
        let buf = self.conn.transmit();
        buf.advance(n);
        let drained = buf.is_empty();
        if drained && buf.capacity() > 64 * 1024 {
            *buf = BytesMut::new();
        }
        if drained {
            // Room again for mail that waited on a full transmit buffer.
            self.deliver_mailbox();
        }
    }

    /// Moves mail into the connection; returns how many messages it moved.
    fn deliver_mailbox(&mut self) -> usize {
        let Some(c) = &self.client else { return 0 };
        match c.handle.eviction(c.conn) {
            None => {}
            Some(None) => {
                self.conn.close(CloseReason::TakenOver);
                return 0;
            }
            Some(Some(code)) => {
                self.conn.close(CloseReason::Violation(
                    code,
                    credentials::eviction_text(code),
                ));
                return 0;
            }
        }
        if c.handle.take_overloaded() {
            self.ctx.broker.metrics.protocol_error("slow_consumer");
            self.conn.close(CloseReason::SlowConsumer);
            return 0;
        }
        let (moved, more) = c
            .handle
            .drain_into(&mut self.conn, self.ctx.broker.max_queued());
        self.more_mail = more;
        moved
    }

    fn release_held_ack(&mut self, released: Released) {
        let telemetry = match released {
            Released::Go => None,
            Released::StoreFailed => {
                self.store_failed();
                return;
            }
            Released::Telemetry(r) => Some(r),
        };
        if let Some(result) = telemetry {
            let Some(held) = self.held_acks.pop_front() else {
                return;
            };
            self.held_qos0 -= u32::from(held.packet_id.is_none());
            let code = match result {
                Ok(_) => {
                    if let Some(message) = held.route {
                        let origin = self.client.as_ref().map(|c| &c.handle);
                        self.ctx.broker.publish(message, origin);
                    }
                    ReasonCode::Success
                }
                Err(Rejected::Store(e)) if !matches!(e, StoreError::Invalid(_)) => {
                    tracing::error!(error = %e, "telemetry could not be stored");
                    self.store_failed();
                    return;
                }
                // MQTT 3.1.1 cannot refuse: the message is acknowledged, dropped and counted.
                Err(Rejected::Replay(r)) if r.is_capacity() => ReasonCode::QuotaExceeded,
                Err(Rejected::Quota { .. }) => ReasonCode::QuotaExceeded,
                Err(_) => ReasonCode::PayloadFormatInvalid,
            };
            if let Some(id) = held.packet_id {
                self.conn.acknowledge_with(id, code);
            }
            return;
        }
        match self.held_acks.pop_front() {
            Some(HeldAck {
                packet_id: Some(id),
                code,
                ..
            }) => self.conn.acknowledge_with(id, code),
            Some(_) => self.held_qos0 -= 1,
            None => {}
        }
    }

    /// Never acknowledge what the store did not take: the client will retry after a reconnect.
    fn store_failed(&mut self) {
        self.ctx.broker.metrics.protocol_error("store_failure");
        self.conn.close(CloseReason::Violation(
            ReasonCode::UnspecifiedError,
            "the server could not store the message",
        ));
    }

    /// A device's telemetry goes through the pipeline, its reported configuration to the
    /// store; the acknowledgement (and the routing to subscribers) waits for the verdict.
    /// Returns the message back when it is neither.
    fn device_message(&mut self, message: Message, packet_id: Option<PacketId>) -> Option<Message> {
        let Some(c) = &self.client else {
            return Some(message);
        };
        let Some(device) = c.policy.device() else {
            return Some(message);
        };
        let suffix = message
            .topic
            .strip_prefix("devices/")
            .and_then(|rest| rest.strip_prefix(device));
        let (tx, rx) = oneshot::channel();
        let device = device.to_string();
        let payload = message.payload.clone();
        match suffix {
            Some("/telemetry") => {
                let format = match message
                    .properties
                    .as_ref()
                    .and_then(|p| p.content_type.as_deref())
                {
                    Some(ct) => ContentFormat::from_media_type(ct).unwrap_or(ContentFormat::Json),
                    None => ContentFormat::Json,
                };
                let pipeline = self.ctx.pipeline.clone();
                tokio::spawn(async move {
                    let result = pipeline
                        .ingest(&device, payload, format, Source::Mqtt)
                        .await;
                    let _ = tx.send(result);
                });
            }
            Some("/config/reported") => {
                // The device's reported configuration (a JSON object): the one path of every
                // transport, which also marks the device as heard from.
                let store = self.ctx.auth.store().clone();
                let rules = self.ctx.pipeline.rules().cloned();
                tokio::spawn(async move {
                    let rules = rules.as_deref();
                    let result =
                        crate::reported::report(&store, rules, &device, &payload, Source::Mqtt)
                            .await
                            .map(|_| Accepted::default())
                            .map_err(Rejected::Store);
                    let _ = tx.send(result);
                });
            }
            Some("/firmware/status") => {
                // A firmware status report (a word or JSON), kept like the HTTP and CoAP ones.
                let store = self.ctx.auth.store().clone();
                let broker = self.ctx.broker.clone();
                tokio::spawn(async move {
                    let result = match crate::firmware::parse_status(&payload) {
                        Ok(report) => crate::firmware::report(&store, &broker, &device, report)
                            .await
                            .map(|_| Accepted::default())
                            // An unknown firmware is the report's fault, not the store's.
                            .map_err(|e| match e {
                                StoreError::NotFound { kind, id } => Rejected::Store(
                                    StoreError::Invalid(format!("{kind} {id:?} not found")),
                                ),
                                other => Rejected::Store(other),
                            }),
                        Err(e) => Err(Rejected::Store(e)),
                    };
                    let _ = tx.send(result);
                });
            }
            _ => return Some(message),
        }
        self.held_qos0 += u32::from(packet_id.is_none());
        self.held_acks.push_back(HeldAck {
            packet_id,
            code: ReasonCode::Success,
            durable: None,
            verdict: Some(rx),
            route: Some(message),
            subscribers: Vec::new(),
            deadline: tokio::time::Instant::now() + self.ctx.slow_consumer_timeout,
        });
        None
    }

    async fn handle_events(&mut self, rbuf: &mut BytesMut) {
        // Subscribers that got mail from this batch of PUBLISHes: signalled once it is routed
        // (and before anything that awaits), so each wakes once per batch.
        // A batch of one PUBLISH (a client that sends a message at a time) may write to up to
        // EXPRESS_FANOUT idle subscribers' sockets itself; larger batches and fan-outs go
        // through mailboxes, where each subscriber writes a batch in one syscall.
        let single = self.conn.pending_events() == 1;
        let later = Deferred::with_express(if single { EXPRESS_FANOUT } else { 0 });
        let signal = |later: &Deferred| {
            for h in later.take() {
                h.signal();
            }
        };
        while let Some(event) = self.conn.poll_event() {
            if !matches!(event, Event::Publish { .. }) {
                signal(&later);
            }
            match event {
                // Boxed, like the subscribe below: their awaits (argon2, the store) are rare and
                // large, and would otherwise size every connection's busy loop.
                Event::Connect(connect) => Box::pin(self.handle_connect(*connect, rbuf)).await,
                Event::Publish { message, packet_id } => {
                    let Some(message) = self.device_message(message, packet_id) else {
                        continue;
                    };
                    let mut stored = false;
                    if let (Some(id), Some(c)) = (packet_id, &self.client) {
                        if message.qos == stratus_mqtt::QoS::ExactlyOnce {
                            // Until PUBREL, so a resent PUBLISH is not routed twice after a restart.
                            stored |= self.ctx.broker.store_inbound_qos2(&c.handle, id);
                        }
                    }
                    let (congested, code, routed_stored) = self.handle_publish(message, &later);
                    stored |= routed_stored;
                    // Only an acknowledgement promises durability; QoS 0 is not waited for.
                    let durable = packet_id
                        .filter(|_| stored)
                        .and_then(|_| self.ctx.broker.persistence().map(|p| p.durable()));
                    if !congested.is_empty() || durable.is_some() {
                        self.held_qos0 += u32::from(packet_id.is_none());
                        self.held_acks.push_back(HeldAck {
                            packet_id,
                            code,
                            durable,
                            verdict: None,
                            route: None,
                            subscribers: congested,
                            deadline: tokio::time::Instant::now() + self.ctx.slow_consumer_timeout,
                        });
                    } else if let Some(id) = packet_id {
                        // Acknowledgements leave in receive order, so this one also waits
                        // behind any held one.
                        self.conn.acknowledge_with(id, code);
                    }
                }
                Event::Session(change) => {
                    if let Some(c) = &self.client {
                        self.ctx.broker.store_session_change(&c.handle, change);
                    }
                }
                Event::Subscribe(sub) => Box::pin(self.handle_subscribe(sub)).await,
                Event::Unsubscribe(filters) => {
                    if let Some(c) = &self.client {
                        for f in &filters {
                            self.ctx.broker.unsubscribe(&c.handle, f);
                        }
                    }
                }
                Event::Closed { reason, will } => self.handle_closed(reason, will),
            }
        }
        signal(&later);
        let stats = self.conn.take_stats();
        let m = &self.ctx.broker.metrics;
        m.mqtt_messages_received
            .inc_by(u64::from(stats.publish_received));
        m.mqtt_messages_sent.inc_by(u64::from(stats.publish_sent));
        m.mqtt_messages_dropped.inc_by(u64::from(stats.dropped));
        m.mqtt_packets_received
            .inc_by(u64::from(stats.packets_received));
        m.mqtt_packets_sent.inc_by(u64::from(stats.packets_sent));
        m.limit_hit("mqtt_publish_rate", u64::from(stats.throttled));
    }

    /// Authentication (SPEC "Identities"): a TLS client certificate; a known device or
    /// client id as user name with its secret or an access token as password; or, with
    /// `--allow-anonymous`, anyone else (a user name that is not a known id is then only a
    /// name for the ACL rules). Without `--allow-anonymous`, an unknown user name costs the
    /// same argon2 verification as a wrong password, so the timing does not tell which exist.
    async fn authenticate(&self, connect: &stratus_mqtt::Connect) -> Result<Admitted, Refusal> {
        match self.over_limit {
            Overload::No => {}
            Overload::Server => {
                return Err(Refusal::new(
                    ReasonCode::ServerUnavailable,
                    "the server has as many connections as it takes",
                ))
            }
            Overload::Address => {
                self.ctx
                    .broker
                    .metrics
                    .limit_hit("mqtt_connections_per_address", 1);
                return Err(Refusal::new(
                    ReasonCode::ConnectionRateExceeded,
                    "too many connections from this address",
                ));
            }
        }
        if let Some(cn) = self.identity.as_deref() {
            // Authenticated by the transport (TLS client certificate).
            return Ok(Admitted {
                policy: Policy::Full,
                owner: Owner::Certificate(cn.as_str().into()),
                principal: None,
            });
        }
        let auth = &self.ctx.auth;
        let password = connect
            .password
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok());
        match connect.username.as_deref() {
            Some(user) if auth.is_known(user) || !self.ctx.allow_anonymous => {
                let source = Some(self.peer_ip);
                let result = match password {
                    Some(pw) => auth.authenticate_password(user, pw, source).await,
                    None => {
                        auth.record_failure(source, Some(user));
                        Err(AuthError::BadCredentials)
                    }
                };
                match result {
                    Ok(principal) => Ok(Admitted {
                        policy: Policy::for_principal(&principal),
                        owner: match principal.kind {
                            Kind::Device => Owner::Device(principal.id.as_str().into()),
                            Kind::Client => Owner::Client(principal.id.as_str().into()),
                        },
                        principal: Some(principal),
                    }),
                    Err(AuthError::BadCredentials | AuthError::InvalidToken(_)) => {
                        self.auth_failed(Some(user), "bad credentials");
                        Err(Refusal::new(ReasonCode::BadUserNameOrPassword, ""))
                    }
                    Err(AuthError::Throttled { .. }) => {
                        const WHY: &str =
                            "too many failed attempts from this address or for this user; retry later";
                        self.ctx.broker.metrics.limit_hit("auth_throttle", 1);
                        self.record_failure(Some(user), WHY, true);
                        Err(Refusal::new(ReasonCode::ConnectionRateExceeded, WHY))
                    }
                    Err(AuthError::Busy) => {
                        self.ctx.broker.metrics.limit_hit("auth_busy", 1);
                        Err(Refusal::new(
                            ReasonCode::ServerBusy,
                            "the server is busy verifying credentials; retry later",
                        ))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "mqtt authentication failed");
                        Err(Refusal::new(ReasonCode::ServerUnavailable, ""))
                    }
                }
            }
            _ if self.ctx.allow_anonymous => Ok(Admitted {
                policy: Policy::Outsider,
                owner: Owner::Anonymous,
                principal: None,
            }),
            _ => {
                self.ctx.auth.record_failure(Some(self.peer_ip), None);
                self.auth_failed(None, "no credentials");
                Err(Refusal::new(ReasonCode::NotAuthorized, ""))
            }
        }
    }

    /// Whether `admitted` may use `client_id` (SPEC "Identities"): a device its own id (or,
    /// with `device_client_ids = "prefix"`, `{id}-…`/`{id}/…`); nobody else a registered
    /// device's. The refusal's MQTT 5.0 code and reason string when not.
    fn client_id_refusal(
        &self,
        admitted: &Admitted,
        client_id: &str,
    ) -> Option<(ReasonCode, &'static str)> {
        let rule = self.ctx.device_client_ids;
        match &admitted.policy {
            Policy::Device(device) if !rule.allows(device, client_id) => Some((
                ReasonCode::ClientIdentifierNotValid,
                "a device connects with its device id as client id",
            )),
            Policy::Device(_) => None,
            _ if rule
                .candidates(client_id)
                .any(|d| self.ctx.auth.is_device(d)) =>
            {
                Some((
                    ReasonCode::NotAuthorized,
                    "the client id belongs to a registered device",
                ))
            }
            _ => None,
        }
    }

    /// Counts a refused CONNECT of `who` (the user name or client id claimed) and records it for
    /// the audit log.
    fn auth_failed(&self, who: Option<&str>, why: &str) {
        self.ctx.broker.metrics.auth_failure("mqtt");
        self.record_failure(who, why, false);
    }

    /// Records a failed login for the audit log (aggregated: [`crate::audit::failures`]).
    fn record_failure(&self, who: Option<&str>, why: &str, throttled: bool) {
        self.ctx.failures.record(crate::audit::failures::Failure {
            transport: "mqtt",
            target: "mqtt",
            remote: Some(self.peer()),
            identity: who,
            reason: why,
            throttled,
        });
    }

    async fn handle_connect(&mut self, connect: stratus_mqtt::Connect, rbuf: &mut BytesMut) {
        let admitted = match self.authenticate(&connect).await {
            Ok(a) => a,
            Err(r) => {
                if r.code != ReasonCode::ServerUnavailable {
                    self.ctx.broker.metrics.denied("connect");
                }
                tracing::info!(peer = %self.peer(), client_id = %connect.client_id, code = ?r.code, why = r.why, "mqtt connect refused");
                self.conn.refuse_with(r.code, r.why);
                return;
            }
        };
        let client_id = if connect.client_id.is_empty() {
            // A device is given its own id; anyone else a random one.
            let id = match admitted.policy.device().map(MqttStr::try_from) {
                Some(Ok(device)) => device,
                _ => assigned_client_id(),
            };
            if connect.protocol.is_v5() {
                self.conn.assign_client_id(id.clone());
            }
            id
        } else {
            connect.client_id.clone()
        };
        if let Some((code, why)) = self.client_id_refusal(&admitted, &client_id) {
            self.refuse_client_id(&client_id, code, why);
            return;
        }
        let Admitted {
            policy,
            owner,
            principal,
        } = admitted;
        // A copy of its own: a slice would keep the whole CONNECT (password included) in
        // memory for the connection's life.
        let user = connect
            .username
            .as_ref()
            .map(MqttStr::compact)
            .or_else(|| self.identity.as_deref().cloned());
        if let Some(will) = &connect.will {
            let who = Who {
                user: user.as_deref(),
                client_id: &client_id,
            };
            if !policy.may_publish(&will.topic) || !self.ctx.acl.may_publish(who, &will.topic) {
                self.ctx.broker.metrics.denied("connect");
                self.conn.refuse(ConnectReturnCode::NotAuthorized);
                return;
            }
        }
        if let Some(p) = &principal {
            let max = self.ctx.quotas.max_connections_per_principal;
            if !self.ctx.credentials.admit(&p.id, max) {
                self.ctx
                    .broker
                    .metrics
                    .limit_hit("mqtt_connections_per_principal", 1);
                self.refuse_client_id(
                    &client_id,
                    ReasonCode::QuotaExceeded,
                    "too many connections with these credentials",
                );
                return;
            }
        }
        let expiry = self.conn.session_expiry();
        let broker = &self.ctx.broker;
        let attached = broker
            .attach_session(
                client_id.clone(),
                &owner,
                connect.clean_session,
                policy.access(),
                expiry,
            )
            .await;
        let mut attached = match attached {
            Ok(a) => a,
            Err(AttachRefused::NotOwner) => {
                if let Some(p) = &principal {
                    self.ctx.credentials.release(&p.id);
                }
                self.refuse_client_id(
                    &client_id,
                    ReasonCode::NotAuthorized,
                    "the client id's session belongs to another principal",
                );
                return;
            }
        };
        if attached.session_present {
            self.reauthorize(&attached.handle, &mut attached.session, &policy, &user);
        }
        let durable = attached.handle.is_durable();
        if durable {
            let will = connect
                .will
                .as_ref()
                .and_then(|w| stratus_mqtt::persist::encode_will(w).ok())
                .unwrap_or_default();
            broker.store_session(&attached.handle, expiry, 0, will.clone());
            self.stored_will = (!will.is_empty()).then(|| Box::new(will));
            self.conn.track_session_changes(true);
        }
        // CONNACK promises the session (a new or resumed persistent one is on disk, an ended
        // one is gone from it): it waits until the store has it.
        if durable || attached.ended_stored {
            if let Err(e) = broker.flush().await {
                tracing::error!(client_id = %client_id, error = %e, "could not store the session");
                broker.detach(
                    &attached.handle,
                    attached.conn,
                    Some(attached.session),
                    true,
                );
                if let Some(p) = &principal {
                    self.ctx.credentials.release(&p.id);
                }
                self.conn.refuse(ConnectReturnCode::ServerUnavailable);
                return;
            }
        }
        tracing::debug!(peer = %self.peer(), client_id = %client_id, resumed = attached.session_present, "mqtt client connected");
        self.conn.accept(attached.session, attached.session_present);
        if let (Some(device), Some(rules)) = (policy.device(), self.ctx.pipeline.rules()) {
            rules.mqtt_connected(device);
        }
        if let Some(p) = &principal {
            self.ctx
                .credentials
                .add(attached.conn, attached.handle.clone(), p);
        }
        self.client = Some(Attachment {
            handle: attached.handle,
            conn: attached.conn,
            policy,
            user,
        });
        self.ctx.broker.metrics.mqtt_clients_connected.inc();
        // Messages that waited while the client was away, then packets pipelined after CONNECT.
        self.deliver_mailbox();
        self.conn.handle_bytes(rbuf, Instant::now());
    }

    /// Refuses a CONNECT for its client id (v5 `code` with `why`; v3 its 3.1.1 twin), counted
    /// and audited like other refused connections.
    fn refuse_client_id(&mut self, client_id: &str, code: ReasonCode, why: &'static str) {
        self.ctx.broker.metrics.denied("connect");
        tracing::info!(peer = %self.peer(), client_id = %client_id, why, "mqtt connect refused");
        self.auth_failed(Some(client_id), why);
        self.conn.refuse_with(code, why);
    }

    /// A resumed session is checked against what its principal may do now: subscriptions it
    /// may no longer hold are removed (from the hub and the store) and queued messages it may
    /// no longer receive are dropped, so a narrowed policy or ACL applies to old sessions too.
    fn reauthorize(
        &self,
        handle: &Arc<ClientHandle>,
        session: &mut stratus_mqtt::Session,
        policy: &Policy,
        user: &Option<MqttStr>,
    ) {
        let who = Who {
            user: user.as_deref(),
            client_id: handle.id(),
        };
        let refused: Vec<MqttStr> = session
            .subscriptions
            .keys()
            .filter(|filter| {
                let inner = match stratus_mqtt::topic::split_shared(filter) {
                    Some(Ok((_, inner))) => inner,
                    Some(Err(())) => return true,
                    None => filter.as_str(),
                };
                !policy.may_subscribe(inner) || !self.ctx.acl.may_subscribe(who, inner)
            })
            .cloned()
            .collect();
        for filter in &refused {
            tracing::info!(client_id = %handle.id(), filter = %filter, "resumed subscription no longer allowed: removed");
            self.ctx.broker.metrics.denied("subscribe");
            self.ctx.broker.unsubscribe(handle, filter);
            session.subscriptions.remove(filter);
        }
        let purged = self
            .ctx
            .broker
            .purge_unreadable(handle, session, |t| policy.may_receive(t));
        if purged > 0 {
            tracing::info!(client_id = %handle.id(), purged, "queued messages the client may no longer receive: dropped");
        }
    }

    /// Routes a client's PUBLISH; returns the subscribers it congested (not the client itself),
    /// the reason code of its acknowledgement for MQTT 5.0 clients, and whether routing wrote
    /// to the store.
    fn handle_publish(
        &mut self,
        message: Message,
        later: &Deferred,
    ) -> (Vec<Arc<ClientHandle>>, ReasonCode, bool) {
        let denied = self.client.as_ref().is_none_or(|c| {
            !c.policy.may_publish(&message.topic)
                || !self.ctx.acl.may_publish(c.who(), &message.topic)
        });
        if denied {
            // MQTT 3.1.1 has no way to refuse a PUBLISH: it is acknowledged and dropped;
            // MQTT 5.0 clients get 0x87 Not authorized.
            self.ctx.broker.metrics.denied("publish");
            tracing::debug!(peer = %self.peer(), topic = %message.topic, "mqtt publish denied");
            return (Vec::new(), ReasonCode::NotAuthorized, false);
        }
        let origin = self.client.as_ref().map(|c| &c.handle);
        let routed = self.ctx.broker.publish_deferred(message, origin, later);
        if routed.refused {
            // Over a retained quota: MQTT 5.0 clients get 0x97 Quota exceeded; a 3.1.1
            // acknowledgement cannot refuse, the message is dropped and counted.
            return (Vec::new(), ReasonCode::QuotaExceeded, false);
        }
        let code = if routed.delivered == 0 {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        };
        let own = self.client.as_ref().map(|c| Arc::as_ptr(&c.handle));
        let mut congested = routed.congested;
        congested.retain(|h| Some(Arc::as_ptr(h)) != own);
        (congested, code, routed.stored)
    }

    async fn handle_subscribe(&mut self, sub: stratus_mqtt::Subscribe) {
        let Some(c) = &self.client else { return };
        let broker = &self.ctx.broker;
        // MQTT 3.1.1 clients see every refusal as 0x80.
        let id = sub.properties.subscription_identifier;
        // Whether retained messages are sent, per filter (Retain Handling; never for shared ones).
        let mut send_retained = Vec::with_capacity(sub.filters.len());
        // Subscriptions per client: a new filter beyond the quota is refused (0x97 Quota
        // exceeded; 3.1.1 clients see 0x80); replacing one it holds is not a new one.
        let held = self.conn.session().map_or(0, |s| s.subscriptions.len());
        let max_subscriptions = self.ctx.quotas.max_subscriptions;
        let mut added = 0usize;
        let codes: Vec<ReasonCode> = sub
            .filters
            .iter()
            .map(|(filter, options)| {
                let shared = stratus_mqtt::topic::split_shared(filter);
                let inner = match shared {
                    Some(Ok((_, inner))) => inner,
                    Some(Err(())) => {
                        send_retained.push(false);
                        return ReasonCode::TopicFilterInvalid;
                    }
                    None => filter.as_str(),
                };
                if !self.conn.filter_acceptable(inner) {
                    send_retained.push(false);
                    ReasonCode::TopicFilterInvalid
                } else if !c.policy.may_subscribe(inner)
                    || !self.ctx.acl.may_subscribe(c.who(), inner)
                {
                    broker.metrics.denied("subscribe");
                    send_retained.push(false);
                    ReasonCode::NotAuthorized
                } else if !self
                    .conn
                    .session()
                    .is_some_and(|s| s.subscriptions.contains_key(filter))
                    && held + added >= max_subscriptions
                {
                    broker.metrics.limit_hit("mqtt_subscriptions", 1);
                    send_retained.push(false);
                    ReasonCode::QuotaExceeded
                } else {
                    if !self
                        .conn
                        .session()
                        .is_some_and(|s| s.subscriptions.contains_key(filter))
                    {
                        added += 1;
                    }
                    let existed = broker.subscribe(&c.handle, filter, *options, id);
                    send_retained.push(
                        shared.is_none()
                            && match options.retain_handling {
                                RetainHandling::SendOnSubscribe => true,
                                RetainHandling::SendIfNew => !existed,
                                RetainHandling::DoNotSend => false,
                            },
                    );
                    ReasonCode::granted(options.qos)
                }
            })
            .collect();
        if c.handle.is_durable() && codes.iter().any(|c| c.granted_qos().is_some()) {
            // SUBACK promises the subscription: it waits until the store has it.
            if let Err(e) = broker.flush().await {
                tracing::error!(client_id = %c.handle.id(), error = %e, "could not store a subscription");
                self.conn.close(CloseReason::Violation(
                    ReasonCode::UnspecifiedError,
                    "the server could not store the subscription",
                ));
                return;
            }
        }
        self.conn.subscribed(&sub, codes.clone());
        let policy = c.policy.clone();
        for (((filter, _), code), send) in sub.filters.iter().zip(codes).zip(send_retained) {
            if let Some(granted) = code.granted_qos().filter(|_| send) {
                let mut retained = broker.retained_for(filter);
                retained.retain(|m| policy.may_receive(&m.topic));
                c.handle
                    .enqueue_retained(retained, granted, id, broker.persistence());
            }
        }
    }

    fn handle_closed(&mut self, reason: CloseReason, will: Option<Message>) {
        let metrics = &self.ctx.broker.metrics;
        match &reason {
            CloseReason::Malformed(e) => {
                metrics.protocol_error(malformed_label(e));
                tracing::warn!(peer = %self.peer(), error = %e, "mqtt connection closed: malformed packet");
            }
            CloseReason::ProtocolViolation(what) => {
                metrics.protocol_error("protocol_violation");
                tracing::warn!(peer = %self.peer(), violation = what, "mqtt connection closed: protocol violation");
            }
            CloseReason::KeepAliveTimeout => {
                metrics.protocol_error("keepalive_timeout");
                tracing::info!(peer = %self.peer(), "mqtt connection closed: keep alive expired");
            }
            CloseReason::ConnectTimeout => {
                metrics.protocol_error("connect_timeout");
                tracing::info!(peer = %self.peer(), "mqtt connection closed: no CONNECT in time");
            }
            other => {
                tracing::debug!(peer = %self.peer(), reason = ?other, "mqtt connection closed")
            }
        }
        if let Some(will) = will {
            let delay = u64::from(self.conn.will_delay().min(self.conn.session_expiry()));
            match (&self.client, delay) {
                (Some(c), d) if d > 0 => {
                    // Will Delay Interval (MQTT 5.0 §3.1.3.2.2): published after the delay, or
                    // when the session ends if sooner, unless the client reconnects first.
                    tracing::debug!(peer = %self.peer(), topic = %will.topic, delay = d, "will delayed");
                    self.will_pending = true;
                    self.ctx.broker.schedule_will(
                        c.handle.clone(),
                        c.conn,
                        will,
                        std::time::Duration::from_secs(d),
                    );
                }
                _ => {
                    tracing::debug!(peer = %self.peer(), topic = %will.topic, "publishing will");
                    // Published as the client's (its retained quota, No Local).
                    let origin = self.client.as_ref().map(|c| &c.handle);
                    self.ctx.broker.publish(will, origin);
                }
            }
        }
    }

    /// Hands the session back to the broker (parked when persistent) after the socket closed.
    fn finish(mut self) {
        self.ctx.open.fetch_sub(1, Ordering::Relaxed);
        self.ctx.quotas.address_closed(self.peer_ip);
        if let Some(c) = self.client.take() {
            self.ctx.broker.metrics.mqtt_clients_connected.dec();
            self.ctx.credentials.remove(c.conn);
            if let (Some(device), Some(rules)) = (c.policy.device(), self.ctx.pipeline.rules()) {
                rules.mqtt_disconnected(device);
            }
            let session = self.conn.take_session();
            // A client evicted by an administrator (its principal deleted, its client id
            // given to a device) loses its session too.
            let expiry = match c.handle.eviction(c.conn) {
                Some(Some(ReasonCode::AdministrativeAction)) => 0,
                _ => self.conn.session_expiry(),
            };
            let will = match self.will_pending {
                true => self.stored_will.take().map(|w| *w).unwrap_or_default(),
                false => Bytes::new(),
            };
            self.ctx
                .broker
                .detach_session(&c.handle, c.conn, session, expiry, will);
            if expiry != 0 && expiry != u32::MAX {
                // Session Expiry Interval: the parked session ends N s after the disconnect
                // unless the client came back.
                self.ctx.broker.schedule_expiry(
                    c.handle,
                    c.conn,
                    std::time::Duration::from_secs(u64::from(expiry)),
                );
            }
        }
    }
}

fn malformed_label(e: &stratus_mqtt::DecodeError) -> &'static str {
    use stratus_mqtt::DecodeError as D;
    match e {
        D::PacketTooLarge { .. } => "packet_too_large",
        D::MalformedRemainingLength => "malformed_remaining_length",
        D::ReservedFlagsSet(_) | D::ReservedConnectFlag | D::ReservedSubscriptionBits => {
            "reserved_bits"
        }
        D::InvalidString(_) => "invalid_utf8",
        D::UnsupportedProtocolLevel(_) | D::InvalidProtocolName => "bad_protocol",
        _ => "malformed_packet",
    }
}

/// A server-assigned client id for a zero-length one (MQTT-3.1.3-6).
fn assigned_client_id() -> MqttStr {
    let id = format!("stratus-{:016x}", rand::random::<u64>());
    MqttStr::try_from(id).unwrap_or_default()
}
#[cfg(test)]
mod tests {
    /// The memory budget of an idle connection (≤ 1 KiB of RSS, issue #3): a parked
    /// connection holds its `Driver` and its client's `ClientHandle`. glibc serves a request
    /// of n bytes from a chunk of n + 8 rounded up to 16, so the `Driver` must stay within 504
    /// bytes (a 512-byte chunk) and the handle, with the `Arc`'s two counters, within 248 (a
    /// 256-byte chunk). A field added to either must pay for itself.
    #[test]
    fn idle_connection_state_fits_its_budget() {
        use std::mem::size_of;
        let driver = size_of::<super::Driver>();
        let handle = size_of::<crate::broker::ClientHandle>();
        assert!(driver <= 504, "Driver is {driver} bytes");
        assert!(handle + 16 <= 248, "ClientHandle is {handle} bytes");
    }
}
