//! The CoAP endpoint of one local UDP socket as a sans-IO state machine: message layer,
//! deduplication, retransmission, separate responses, Observe, Block-wise and the amplification
//! guard, driven with datagrams and instants.
//!
//! # Driving it
//! ```text
//! loop {
//!     select! {
//!         (peer, bytes) = socket.recv() => ep.handle_datagram(now, peer, &bytes),
//!         _ = sleep_until(ep.poll_timeout()) => ep.handle_timeout(now),
//!         (exchange, response) = app_done.recv() => ep.respond(now, exchange, response)?,
//!     }
//!     while let Some(t) = ep.poll_transmit() { socket.send_to(&t.data, t.peer) }
//!     while let Some(ev) = ep.poll_event() { route(ev) }   // requests, failures, cancellations
//! }
//! ```
//!
//! # Server side
//! Each new request (after deduplication, option checks and Block1 reassembly) is one
//! [`Event::Request`] with an [`ExchangeId`]; the application answers it once with
//! [`Endpoint::respond`]. A CON request answered in time gets a piggybacked response in the
//! ACK. If the application calls [`Endpoint::defer`], or does not answer within
//! [`Config::separate_response_after`], or the client retransmits meanwhile, an empty ACK goes
//! out and the response later travels as a separate CON, retransmitted until acknowledged
//! ([`Event::DeliveryFailed`] if never). NON requests get NON responses. Requests the endpoint
//! can answer alone never reach the application: unrecognized critical options (4.02), proxy
//! requests (5.05), unknown methods (4.05), bodies over the limit (4.13), Block1 steps (2.31,
//! 4.08) and Block2 follow-ups served from the body cache.
//!
//! # Deduplication
//! Every received CON and NON is remembered by (peer, message ID) for `EXCHANGE_LIFETIME` (CON)
//! or `NON_LIFETIME` (NON) together with the reply sent to it, so a retransmitted CON gets the
//! byte-identical reply again and the application sees the request once. A retransmission that
//! arrives before the application answered triggers the empty ACK of a separate response.
//!
//! # Block-wise (RFC 7959)
//! The application always answers with the *whole* body. When it is larger than the block size
//! (the smaller of [`Config::block_szx`] and the client's Block2 SZX, further reduced for
//! unverified peers by the amplification guard) the endpoint sends the requested block with an
//! ETag (the application's, or a 64-bit FNV-1a hash of the body) and Size2 on block 0 and
//! whenever the request carried Size2. The body is cached per (peer, method, URI, Accept) for
//! [`Config::block2_lifetime`] after its last use, and follow-up Block2 requests are served
//! from the cache; on a miss (expired, evicted) the request goes to the application, which
//! re-renders, and the ETag tells the client whether the representation changed. A response
//! that already carries a Block2 option is sent as it is (application-managed blocks, e.g. a
//! firmware image read block by block from disk).
//!
//! Block1 request bodies are reassembled per (peer, method, URI): non-final blocks are answered
//! 2.31 Continue (with this endpoint's preferred SZX), a block that does not continue the body
//! gets 4.08 Request Entity Incomplete, a body (or announced Size1) over
//! [`Config::max_body_size`] gets 4.13 with Size1. The application sees one request with the
//! whole body and its response carries the final Block1 option.
//!
//! # Observe (RFC 7641)
//! A GET (or FETCH) with Observe=0 arrives as an ordinary request; answering it with a 2.xx
//! response that carries an Observe option (any value, see [`Response::observing`]) registers
//! the client (peer, token) for the request's path. [`Endpoint::notify`] then sends a
//! notification to every observer of a path, [`Endpoint::notify_observer`] to one.
//! Notifications carry per-observer increasing 24-bit sequence numbers, are NON except every
//! [`Config::observe_con_every`]-th and whenever the last CON one is older than
//! [`Config::observe_con_interval`], and a newer CON notification replaces one still in flight
//! (keeping its retransmission state, RFC 7641 §4.5.2). A RST, a CON notification never
//! acknowledged, or a GET with Observe=1 removes the observer ([`Event::ObserveCancelled`]).
//!
//! # Client side
//! [`Endpoint::send_request`] sends a request with a fresh random token; the response comes
//! back as [`Event::Response`] (several, for an accepted observation), failures as
//! [`Event::RequestFailed`]. Block-wise transfers are left to the caller on this side.
//!
//! # Bounds
//! Every table is capped by [`Config`]: deduplication entries, peers, pending requests, queued
//! CONs per peer, observers, Block1 transfers, Block2 cache entries and bytes, client requests.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::code::{Code, CodeKind};
use crate::codec::{self, EncodeError, Header};
use crate::config::{Config, ConfigError};
use crate::message::{Message, MessageId, MessageType, Request, Response, Token};
use crate::observe::next_sequence;
use crate::option::{self, szx_to_size, BlockOption, OptionNumber, Options};

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub peer: SocketAddr,
    /// The encoded message.
    pub data: Bytes,
}

/// A request delivered to the application, to be answered once with [`Endpoint::respond`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExchangeId(u64);

/// A request this endpoint sent as a client ([`Endpoint::send_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

/// Why a message could not be delivered or a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// A CON was not acknowledged after `MAX_RETRANSMIT` retransmissions, or a request got no
    /// response within `EXCHANGE_LIFETIME`.
    Timeout,
    /// The peer answered with a RST.
    Reset,
    /// Dropped to stay within a [`Config`] bound (peer table or per-peer queue).
    Evicted,
    /// The response carried an unrecognized critical option and was rejected (§5.4.1).
    Rejected,
}

/// Why an observer was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client sent a GET with Observe=1 (the GET itself arrives as a request too).
    Deregistered,
    /// The client rejected a notification with a RST.
    Reset,
    /// A CON notification was never acknowledged.
    Timeout,
    /// Dropped to stay within a [`Config`] bound.
    Evicted,
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new request (deduplicated, Block1-reassembled). Answer with [`Endpoint::respond`].
    Request {
        /// Who sent it.
        peer: SocketAddr,
        /// Handle for the answer.
        exchange: ExchangeId,
        /// The request. Observe=0 in a GET asks for an observation (see the module docs).
        request: Message,
    },
    /// A response to a request sent with [`Endpoint::send_request`]; for an accepted
    /// observation, each notification is another `Response` with the same id.
    Response {
        /// Who sent it.
        peer: SocketAddr,
        /// The request it answers.
        request: RequestId,
        /// The response.
        response: Message,
    },
    /// A request sent with [`Endpoint::send_request`] failed; no response will follow.
    RequestFailed {
        /// The destination.
        peer: SocketAddr,
        /// The request.
        request: RequestId,
        /// Why.
        reason: FailureReason,
    },
    /// An observer was removed; no further notifications go to it.
    ObserveCancelled {
        /// The observer.
        peer: SocketAddr,
        /// The observation's token.
        token: Token,
        /// The observed path.
        resource: String,
        /// Why.
        reason: CancelReason,
    },
    /// A separate (CON) response was never acknowledged or was rejected.
    DeliveryFailed {
        /// The client.
        peer: SocketAddr,
        /// The token of the request it answered.
        token: Token,
        /// Why.
        reason: FailureReason,
    },
}

/// Why [`Endpoint::respond`] or [`Endpoint::defer`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RespondError {
    /// The exchange was already answered, or expired after `EXCHANGE_LIFETIME`.
    #[error("unknown or expired exchange")]
    UnknownExchange,
    /// The response cannot be encoded; a 5.00 was sent in its place.
    #[error("response cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

/// Why [`Endpoint::notify_observer`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotifyError {
    /// No such observer.
    #[error("no such observer")]
    NotObserving,
    /// The notification cannot be encoded.
    #[error("notification cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

/// Why [`Endpoint::send_request`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The code is not a request method.
    #[error("code {0} is not a request method")]
    NotARequest(Code),
    /// [`Config::max_client_requests`] requests are outstanding.
    #[error("too many outstanding requests")]
    TooManyRequests,
    /// The request cannot be encoded.
    #[error("request cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

/// An observer as the application sees it (see [`Endpoint::observers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserverInfo {
    /// The client.
    pub peer: SocketAddr,
    /// The observation's token.
    pub token: Token,
    /// The observed path (`/config`).
    pub resource: String,
    /// The Uri-Query items of the registration (e.g. an access token).
    pub queries: Vec<String>,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to [`Endpoint::handle_datagram`].
    pub datagrams_received: u64,
    /// Datagrams sent (queued for [`Endpoint::poll_transmit`]).
    pub datagrams_sent: u64,
    /// Datagrams that were not valid CoAP (message format errors, other versions).
    pub malformed: u64,
    /// Duplicate CON/NON messages (answered from the cache or ignored).
    pub duplicates: u64,
    /// Requests delivered to the application.
    pub requests: u64,
    /// Requests answered 4.02 or rejected for an unrecognized critical option.
    pub bad_options: u64,
    /// RST messages sent.
    pub resets_sent: u64,
    /// CON retransmissions.
    pub retransmissions: u64,
    /// CONs that were never acknowledged.
    pub timeouts: u64,
    /// ACK/RST/responses that matched nothing.
    pub unmatched: u64,
    /// Entries dropped to stay within a bound (dedup, peers, queues, transfers, cache).
    pub evictions: u64,
    /// Requests refused with 5.03 because too many were pending.
    pub overload: u64,
    /// Exchanges the application never answered.
    pub exchanges_expired: u64,
    /// Notifications sent.
    pub notifications: u64,
    /// Block2 follow-ups served from the body cache.
    pub block2_cache_hits: u64,
}

/// The (peer, method, URI) a Block-wise transfer belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ResourceKey {
    peer: SocketAddr,
    code: u8,
    uri: Vec<u8>,
}

impl ResourceKey {
    fn of(peer: SocketAddr, code: Code, options: &Options) -> ResourceKey {
        // One allocation: the separators and the option values (a query may be long).
        let len: usize = options
            .get_all(OptionNumber::URI_PATH)
            .chain(options.get_all(OptionNumber::URI_QUERY))
            .map(|v| v.len() + 1)
            .sum();
        // The option bytes as they came (no UTF-8 check: the key only has to tell transfers
        // apart).
        let mut uri = Vec::with_capacity(len + 16);
        uri.push(b'/');
        for (i, seg) in options.get_all(OptionNumber::URI_PATH).enumerate() {
            if i > 0 {
                uri.push(b'/');
            }
            uri.extend_from_slice(seg);
        }
        for (i, q) in options.get_all(OptionNumber::URI_QUERY).enumerate() {
            uri.push(if i == 0 { b'?' } else { b'&' });
            uri.extend_from_slice(q);
        }
        if let Some(a) = options.get(OptionNumber::ACCEPT) {
            let accept = option::decode_uint(a).unwrap_or(u32::MAX);
            uri.extend_from_slice(format!(" accept={accept}").as_bytes());
        }
        ResourceKey {
            peer,
            code: code.0,
            uri,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TimerKey {
    Retransmit(SocketAddr, MessageId),
    Exchange(ExchangeId),
    Client(RequestId),
    Block1(ResourceKey),
    Block2(ResourceKey),
}

/// What a received CON/NON was answered with, for its duplicates.
#[derive(Debug)]
enum Reply {
    /// Not answered yet (CON: no ACK sent).
    Pending,
    /// This datagram (a piggybacked response, an empty ACK or a RST) answers duplicates.
    Sent(Bytes),
    /// Duplicates are ignored (NON).
    Nothing,
}

#[derive(Debug)]
struct DedupEntry {
    reply: Reply,
    exchange: Option<ExchangeId>,
    expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObserveRequest {
    None,
    Register,
}

/// A request the application has not answered yet.
#[derive(Debug)]
struct Exchange {
    peer: SocketAddr,
    message_id: MessageId,
    token: Token,
    confirmable: bool,
    acked: bool,
    key: ResourceKey,
    resource: String,
    queries: Vec<String>,
    block2: Option<BlockOption>,
    size2: bool,
    block1: Option<BlockOption>,
    observe: ObserveRequest,
    expires: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutKind {
    Response,
    Notification,
    Request(RequestId),
}

/// An outgoing CON.
#[derive(Debug)]
struct Outgoing {
    message_id: MessageId,
    /// Message IDs of notifications this one replaced; an ACK or RST to them counts.
    replaced: Vec<MessageId>,
    token: Token,
    kind: OutKind,
    data: Bytes,
    retransmits: u32,
    timeout: Duration,
}

#[derive(Debug)]
struct Peer {
    verified: bool,
    inflight: Vec<Outgoing>,
    queue: VecDeque<Outgoing>,
    last_used: Instant,
}

impl Peer {
    fn idle(&self) -> bool {
        self.inflight.is_empty() && self.queue.is_empty()
    }
}

#[derive(Debug)]
struct Observer {
    resource: String,
    queries: Vec<String>,
    key: ResourceKey,
    seq: u32,
    since_con: u32,
    last_con: Instant,
    szx: Option<u8>,
}

#[derive(Debug)]
struct Block1State {
    body: Vec<u8>,
    last: (usize, usize),
    expires: Instant,
    /// Order of creation, to break ties between equal expiry times.
    started: u64,
}

#[derive(Debug)]
struct Block2Entry {
    code: Code,
    options: Options,
    body: Bytes,
    expires: Instant,
    /// Order of last use, to break ties between equal expiry times.
    used: u64,
}

#[derive(Debug)]
struct ClientRequest {
    peer: SocketAddr,
    token: Token,
    message_id: MessageId,
    observe: bool,
}

#[derive(Debug, Clone, Copy)]
enum NonRef {
    Notification(Token),
    Request(RequestId),
}

type ObserverKey = (SocketAddr, Token);

enum Block1Outcome {
    Reply(Response),
    Complete(Bytes),
}

/// The CoAP endpoint of one local socket. See the [module docs](self) for how to drive it.
#[derive(Debug)]
pub struct Endpoint {
    config: Config,
    rng: StdRng,
    next_mid: MessageId,
    next_id: u64,
    timers: crate::timer::Timers<TimerKey>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
    dedup: HashMap<(SocketAddr, MessageId), DedupEntry>,
    /// Expiry order of `dedup`, one queue per lifetime so each is sorted.
    dedup_con: VecDeque<(Instant, SocketAddr, MessageId)>,
    dedup_non: VecDeque<(Instant, SocketAddr, MessageId)>,
    exchanges: HashMap<ExchangeId, Exchange>,
    peers: HashMap<SocketAddr, Peer>,
    observers: HashMap<ObserverKey, Observer>,
    by_resource: HashMap<String, BTreeSet<ObserverKey>>,
    block1: HashMap<ResourceKey, Block1State>,
    block2: HashMap<ResourceKey, Block2Entry>,
    block2_bytes: usize,
    client: HashMap<RequestId, ClientRequest>,
    client_by_token: HashMap<(SocketAddr, Token), RequestId>,
    non_sent: HashMap<(SocketAddr, MessageId), NonRef>,
    non_order: VecDeque<(Instant, SocketAddr, MessageId)>,
}

impl Endpoint {
    /// An endpoint whose randomness (message IDs, tokens, retransmission jitter) comes from
    /// `seed`. Seed it from the OS in production (tokens guard against off-path spoofing,
    /// RFC 7252 §5.3.1) and with a constant in tests.
    pub fn new(config: Config, seed: u64) -> Result<Endpoint, ConfigError> {
        Endpoint::from_rng(config, StdRng::seed_from_u64(seed))
    }

    /// An endpoint using the given random number generator.
    pub fn from_rng(config: Config, mut rng: StdRng) -> Result<Endpoint, ConfigError> {
        config.validate()?;
        let next_mid = rng.random();
        Ok(Endpoint {
            config,
            rng,
            next_mid,
            next_id: 0,
            timers: crate::timer::Timers::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            dedup: HashMap::new(),
            dedup_con: VecDeque::new(),
            dedup_non: VecDeque::new(),
            exchanges: HashMap::new(),
            peers: HashMap::new(),
            observers: HashMap::new(),
            by_resource: HashMap::new(),
            block1: HashMap::new(),
            block2: HashMap::new(),
            block2_bytes: 0,
            client: HashMap::new(),
            client_by_token: HashMap::new(),
            non_sent: HashMap::new(),
            non_order: VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must be called next (`None`: no timer is armed).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Requests delivered to the application and not answered yet.
    pub fn pending_requests(&self) -> usize {
        self.exchanges.len()
    }

    /// Marks `peer` as having proven it owns its address (or not), for the amplification
    /// guard ([`Config::unverified_response_limit`]).
    pub fn set_verified(&mut self, now: Instant, peer: SocketAddr, verified: bool) {
        if verified {
            self.peer_mut(now, peer).verified = true;
        } else if let Some(p) = self.peers.get_mut(&peer) {
            p.verified = false;
            self.drop_peer_if_idle(peer);
        }
    }

    /// Whether `peer` is verified (see [`Endpoint::set_verified`]).
    pub fn is_verified(&self, peer: SocketAddr) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.verified)
    }

    // ------------------------------------------------------------------ input

    /// Handles one received datagram.
    pub fn handle_datagram(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        self.collect_garbage(now);
        let msg = match codec::decode(datagram) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                // §4.2: a CON that cannot be parsed is rejected; §4.3: anything else ignored.
                if let (true, Some(h)) = (e.header_readable(), Header::parse(datagram)) {
                    if h.message_type == MessageType::Confirmable {
                        self.send_reset(peer, h.message_id);
                    }
                }
                return;
            }
        };
        match (msg.code.kind(), msg.message_type) {
            (CodeKind::Empty, MessageType::Confirmable) => {
                // CoAP ping (§4.3).
                self.send_reset(peer, msg.message_id);
            }
            (CodeKind::Empty, MessageType::Acknowledgement)
            | (CodeKind::Response, MessageType::Acknowledgement) => self.on_ack(now, peer, msg),
            (CodeKind::Empty, MessageType::Reset) => self.on_reset(now, peer, msg.message_id),
            (CodeKind::Request, MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_request(now, peer, msg)
            }
            (CodeKind::Response, MessageType::Confirmable | MessageType::NonConfirmable) => {
                self.on_response(now, peer, msg)
            }
            (CodeKind::Reserved, MessageType::Confirmable) => {
                self.stats.malformed += 1;
                self.send_reset(peer, msg.message_id);
            }
            // An empty NON, a request in an ACK, a non-empty RST, a reserved class: format
            // errors of messages that are not CON, silently ignored (§4.3).
            _ => self.stats.malformed += 1,
        }
    }

    /// Handles the deadlines that are due at `now`: retransmissions, separate-response ACKs,
    /// expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.collect_garbage(now);
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                TimerKey::Retransmit(peer, mid) => self.on_retransmit_timer(now, peer, mid),
                TimerKey::Exchange(id) => self.on_exchange_timer(now, id),
                TimerKey::Client(id) => {
                    if let Some(req) = self.remove_client(id) {
                        self.events.push_back(Event::RequestFailed {
                            peer: req.peer,
                            request: id,
                            reason: FailureReason::Timeout,
                        });
                    }
                }
                TimerKey::Block1(key) => {
                    self.block1.remove(&key);
                }
                TimerKey::Block2(key) => self.remove_block2(&key),
            }
        }
    }

    fn on_request(&mut self, now: Instant, peer: SocketAddr, mut msg: Message) {
        if self.dedup_check(now, peer, &msg) {
            return;
        }
        let check = option::check(&mut msg.options);
        if let Some(bad) = check.bad_critical {
            self.stats.bad_options += 1;
            // §5.4.1: 4.02 for a CON request; a NON is rejected (silently).
            if msg.message_type == MessageType::Confirmable {
                let resp = Response::new(Code::BAD_OPTION)
                    .with_payload(format!("unrecognized critical option {}", bad.0));
                self.reply_now(peer, &msg, resp);
            }
            return;
        }
        if !(Code::GET.0..=Code::IPATCH.0).contains(&msg.code.0) {
            self.reply_now(peer, &msg, Response::new(Code::METHOD_NOT_ALLOWED));
            return;
        }
        if msg.options.contains(OptionNumber::PROXY_URI)
            || msg.options.contains(OptionNumber::PROXY_SCHEME)
        {
            // §5.7.2: this endpoint is not a proxy.
            self.reply_now(peer, &msg, Response::new(Code::PROXYING_NOT_SUPPORTED));
            return;
        }
        let (block1, block2) = match (msg.options.block1(), msg.options.block2()) {
            (Ok(b1), Ok(b2)) => (b1, b2),
            _ => {
                // RFC 7959 §2.2: SZX 7 in a request is a 4.00.
                let resp = Response::new(Code::BAD_REQUEST).with_payload("reserved block SZX 7");
                self.reply_now(peer, &msg, resp);
                return;
            }
        };
        let key = ResourceKey::of(peer, msg.code, &msg.options);
        let size2 = msg.options.contains(OptionNumber::SIZE2);

        // A Block2 follow-up for a body in the cache.
        if let (Some(b2), None) = (block2, block1) {
            if b2.num > 0 {
                if let Some(resp) = self.serve_cached_block(now, &key, b2, size2) {
                    self.stats.block2_cache_hits += 1;
                    self.reply_now(peer, &msg, resp);
                    return;
                }
            }
        }

        let mut block1_echo = None;
        if let Some(b1) = block1 {
            let size1 = msg.options.size1().ok().flatten();
            match self.on_block1(now, &key, b1, &msg.payload, size1) {
                Block1Outcome::Reply(resp) => {
                    self.reply_now(peer, &msg, resp);
                    return;
                }
                Block1Outcome::Complete(body) => {
                    msg.payload = body;
                    msg.options.remove(OptionNumber::BLOCK1);
                    msg.options.remove(OptionNumber::SIZE1);
                    block1_echo = Some(BlockOption { more: false, ..b1 });
                }
            }
        } else if msg.payload.len() > self.config.max_body_size {
            self.reply_now(peer, &msg, self.too_large());
            return;
        }

        let observe = if msg.code == Code::GET || msg.code == Code::FETCH {
            match msg.options.observe() {
                Ok(Some(0)) => ObserveRequest::Register,
                Ok(Some(1)) => {
                    self.remove_observer((peer, msg.token), Some(CancelReason::Deregistered));
                    ObserveRequest::None
                }
                _ => ObserveRequest::None,
            }
        } else {
            ObserveRequest::None
        };

        if self.exchanges.len() >= self.config.max_pending_requests {
            self.stats.overload += 1;
            self.reply_now(peer, &msg, Response::new(Code::SERVICE_UNAVAILABLE));
            return;
        }

        let id = ExchangeId(self.fresh_id());
        let confirmable = msg.message_type == MessageType::Confirmable;
        // Only an observer's registration keeps its resource and queries.
        let (resource, queries) = if observe == ObserveRequest::Register {
            let resource = msg.options.uri_path_string().unwrap_or_else(|_| "/".into());
            let queries = msg
                .options
                .uri_query()
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect();
            (resource, queries)
        } else {
            (String::new(), Vec::new())
        };
        let exchange = Exchange {
            peer,
            message_id: msg.message_id,
            token: msg.token,
            confirmable,
            acked: false,
            key,
            resource,
            queries,
            block2,
            size2,
            block1: block1_echo,
            observe,
            expires: now + self.config.exchange_lifetime,
        };
        let deadline = match self.config.separate_response_after {
            Some(after) if confirmable => now + after,
            _ => exchange.expires,
        };
        self.timers.set(TimerKey::Exchange(id), deadline);
        self.exchanges.insert(id, exchange);
        if let Some(entry) = self.dedup.get_mut(&(peer, msg.message_id)) {
            entry.exchange = Some(id);
        }
        self.stats.requests += 1;
        self.events.push_back(Event::Request {
            peer,
            exchange: id,
            request: msg,
        });
    }

    fn on_response(&mut self, now: Instant, peer: SocketAddr, mut msg: Message) {
        if self.dedup_check(now, peer, &msg) {
            return;
        }
        let con = msg.message_type == MessageType::Confirmable;
        let known = self.client_by_token.get(&(peer, msg.token)).copied();
        if let (Some(id), Some(_)) = (known, option::check(&mut msg.options).bad_critical) {
            // §5.4.1: a response with an unrecognized critical option is rejected.
            self.stats.bad_options += 1;
            let rst = self.send_reset(peer, msg.message_id);
            self.set_dedup_reply(peer, msg.message_id, rst);
            self.reject_response(now, peer, id);
            return;
        }
        let Some(id) = known else {
            // Nothing asked for this (e.g. a notification after the client forgot the
            // observation): reject it so the sender stops (§4.2, §4.3, RFC 7641 §3.6).
            self.stats.unmatched += 1;
            let rst = self.send_reset(peer, msg.message_id);
            self.set_dedup_reply(peer, msg.message_id, rst);
            return;
        };
        if con {
            let ack = self.encode_or_empty(&Message::empty(
                MessageType::Acknowledgement,
                msg.message_id,
            ));
            self.transmit(peer, ack.clone());
            self.set_dedup_reply(peer, msg.message_id, ack);
        }
        // A separate response implies the request arrived: stop retransmitting it.
        if let Some(req) = self.client.get(&id) {
            let mid = req.message_id;
            if let Some(out) = self.take_inflight(peer, |o| o.message_id == mid) {
                self.timers
                    .cancel(&TimerKey::Retransmit(peer, out.message_id));
                self.start_queued(now, peer);
            }
        }
        self.deliver_response(peer, id, msg);
    }

    fn on_ack(&mut self, now: Instant, peer: SocketAddr, msg: Message) {
        let mid = msg.message_id;
        let Some(out) =
            self.take_inflight(peer, |o| o.message_id == mid || o.replaced.contains(&mid))
        else {
            self.stats.unmatched += 1;
            return;
        };
        self.timers
            .cancel(&TimerKey::Retransmit(peer, out.message_id));
        if let Some(p) = self.peers.get_mut(&peer) {
            // It received what we sent to its address (RFC 7252 §11.3).
            p.verified = true;
        }
        if let OutKind::Request(id) = out.kind {
            if msg.is_empty() {
                // Separate response to follow; wait for it.
                if self.client.contains_key(&id) {
                    self.timers
                        .set(TimerKey::Client(id), now + self.config.exchange_lifetime);
                }
            } else if msg.token == out.token {
                let mut msg = msg;
                if option::check(&mut msg.options).bad_critical.is_some() {
                    self.stats.bad_options += 1;
                    self.reject_response(now, peer, id);
                } else {
                    self.deliver_response(peer, id, msg);
                }
            } else {
                self.stats.unmatched += 1;
            }
        }
        self.start_queued(now, peer);
    }

    fn on_reset(&mut self, now: Instant, peer: SocketAddr, mid: MessageId) {
        if let Some(out) =
            self.take_inflight(peer, |o| o.message_id == mid || o.replaced.contains(&mid))
        {
            self.timers
                .cancel(&TimerKey::Retransmit(peer, out.message_id));
            self.fail(peer, out, FailureReason::Reset);
            self.start_queued(now, peer);
            return;
        }
        match self.non_sent.remove(&(peer, mid)) {
            Some(NonRef::Notification(token)) => {
                self.remove_observer((peer, token), Some(CancelReason::Reset));
            }
            Some(NonRef::Request(id)) => {
                if let Some(req) = self.remove_client(id) {
                    self.events.push_back(Event::RequestFailed {
                        peer: req.peer,
                        request: id,
                        reason: FailureReason::Reset,
                    });
                }
            }
            None => self.stats.unmatched += 1,
        }
    }

    // ------------------------------------------------------------------ server API

    /// Answers the request of `exchange` with `response` (the whole body; see the module docs
    /// for Block2, Observe and the piggybacked/separate choice).
    pub fn respond(
        &mut self,
        now: Instant,
        exchange: ExchangeId,
        response: Response,
    ) -> Result<(), RespondError> {
        let ex = self
            .exchanges
            .remove(&exchange)
            .ok_or(RespondError::UnknownExchange)?;
        self.timers.cancel(&TimerKey::Exchange(exchange));
        let mut resp = response;
        let observer_key = (ex.peer, ex.token);
        let register = ex.observe == ObserveRequest::Register
            && resp.code.is_success()
            && resp.options.contains(OptionNumber::OBSERVE)
            && (self.observers.contains_key(&observer_key)
                || self.observers.len() < self.config.max_observers);
        if register {
            let seq = self.register_observer(now, &ex);
            resp.options.set_observe(seq);
        } else {
            resp.options.remove(OptionNumber::OBSERVE);
            if ex.observe == ObserveRequest::Register {
                // A failed re-registration ends an existing observation (RFC 7641 §4.1).
                self.remove_observer(observer_key, None);
            }
        }
        if let Some(b1) = ex.block1 {
            resp.options.set_block1(b1);
        }
        let resp = self.block2_response(now, ex.peer, &ex.key, ex.block2, ex.size2, resp);
        let kind = if ex.confirmable && !ex.acked {
            MessageType::Acknowledgement
        } else if ex.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        };
        let mid = if kind == MessageType::Acknowledgement {
            ex.message_id
        } else {
            self.fresh_mid()
        };
        let mut msg = to_message(kind, mid, ex.token, resp);
        let (data, result) = match codec::encode(&msg) {
            Ok(d) => (d, Ok(())),
            Err(e) => {
                msg = to_message(
                    kind,
                    mid,
                    ex.token,
                    Response::new(Code::INTERNAL_SERVER_ERROR),
                );
                (self.encode_or_empty(&msg), Err(RespondError::Encode(e)))
            }
        };
        match kind {
            MessageType::Acknowledgement => {
                self.transmit(ex.peer, data.clone());
                self.set_dedup_reply(ex.peer, ex.message_id, data);
            }
            MessageType::Confirmable => {
                self.queue_con(now, ex.peer, mid, ex.token, OutKind::Response, data);
            }
            _ => self.transmit(ex.peer, data),
        }
        result
    }

    /// Tells the endpoint the response to `exchange` will take a while: a CON request is
    /// acknowledged now with an empty ACK, and the response will be a separate CON. No effect
    /// on a NON request or one already acknowledged.
    pub fn defer(&mut self, now: Instant, exchange: ExchangeId) -> Result<(), RespondError> {
        if !self.exchanges.contains_key(&exchange) {
            return Err(RespondError::UnknownExchange);
        }
        self.acknowledge_exchange(now, exchange);
        Ok(())
    }

    /// Sends `response` as a notification to every observer of `resource` (a path as in
    /// [`Options::uri_path_string`], e.g. `/config`). A non-2.xx response ends the
    /// observations. Returns the number of observers notified.
    pub fn notify(&mut self, now: Instant, resource: &str, response: Response) -> usize {
        let keys: Vec<ObserverKey> = self
            .by_resource
            .get(resource)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut sent = 0;
        for (peer, token) in keys {
            if self
                .notify_observer(now, peer, token, response.clone())
                .is_ok()
            {
                sent += 1;
            }
        }
        sent
    }

    /// Sends `response` as a notification to one observer (for per-client representations).
    pub fn notify_observer(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        token: Token,
        response: Response,
    ) -> Result<(), NotifyError> {
        let key = (peer, token);
        let Some(obs) = self.observers.get_mut(&key) else {
            return Err(NotifyError::NotObserving);
        };
        let mut resp = response;
        let ending = !resp.code.is_success();
        obs.since_con += 1;
        let con = ending
            || obs.since_con >= self.config.observe_con_every
            || now.saturating_duration_since(obs.last_con) >= self.config.observe_con_interval;
        if con {
            obs.since_con = 0;
            obs.last_con = now;
        }
        if ending {
            resp.options.remove(OptionNumber::OBSERVE);
        } else {
            obs.seq = next_sequence(obs.seq);
            resp.options.set_observe(obs.seq);
        }
        let block_key = obs.key.clone();
        let requested = obs.szx.and_then(|szx| BlockOption::new(0, false, szx));
        if ending {
            self.remove_observer(key, None);
        }
        let resp = self.block2_response(now, peer, &block_key, requested, false, resp);
        let has_con_in_flight = self.peers.get(&peer).is_some_and(|p| {
            p.inflight
                .iter()
                .chain(p.queue.iter())
                .any(|o| o.kind == OutKind::Notification && o.token == token)
        });
        let kind = if con || has_con_in_flight {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        };
        let mid = self.fresh_mid();
        let data = codec::encode(&to_message(kind, mid, token, resp))?;
        self.stats.notifications += 1;
        if kind == MessageType::NonConfirmable {
            self.transmit(peer, data);
            self.remember_non(now, peer, mid, NonRef::Notification(token));
        } else if !self.replace_notification(peer, token, mid, data.clone()) {
            self.queue_con(now, peer, mid, token, OutKind::Notification, data);
        }
        Ok(())
    }

    /// The observers of `resource`.
    pub fn observers(&self, resource: &str) -> Vec<ObserverInfo> {
        self.by_resource
            .get(resource)
            .into_iter()
            .flatten()
            .filter_map(|k| {
                self.observers.get(k).map(|o| ObserverInfo {
                    peer: k.0,
                    token: k.1,
                    resource: o.resource.clone(),
                    queries: o.queries.clone(),
                })
            })
            .collect()
    }

    /// Number of observers in total.
    pub fn observer_count(&self) -> usize {
        self.observers.len()
    }

    /// Whether `peer`'s request with `token` is a registered observer (its registration was
    /// answered with Observe; the table's cap, [`crate::Config::max_observers`], may have
    /// declined it).
    pub fn is_observing(&self, peer: SocketAddr, token: Token) -> bool {
        self.observers.contains_key(&(peer, token))
    }

    /// Removes one observer without telling it (e.g. its credentials were revoked). Returns
    /// whether it existed. The next notification it would have got is not sent.
    pub fn cancel_observer(&mut self, peer: SocketAddr, token: Token) -> bool {
        self.remove_observer((peer, token), None)
    }

    // ------------------------------------------------------------------ client API

    /// Sends a request to `peer` with a fresh token. The response arrives as
    /// [`Event::Response`]; with Observe=0 in the request and an accepted observation, every
    /// notification does too, until [`Endpoint::cancel_request`].
    pub fn send_request(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        request: Request,
    ) -> Result<RequestId, SendError> {
        if !request.code.is_request() {
            return Err(SendError::NotARequest(request.code));
        }
        if self.client.len() >= self.config.max_client_requests {
            return Err(SendError::TooManyRequests);
        }
        // A fresh token; with short tokens the space can run out, so give up after a few tries.
        let token = (0..16)
            .map(|_| Token::from_u64(self.rng.next_u64(), self.config.token_length))
            .find(|t| !self.client_by_token.contains_key(&(peer, *t)))
            .ok_or(SendError::TooManyRequests)?;
        let mid = self.fresh_mid();
        let kind = if request.confirmable {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        };
        let observe = matches!(request.options.observe(), Ok(Some(0)));
        let msg = Message {
            message_type: kind,
            code: request.code,
            message_id: mid,
            token,
            options: request.options,
            payload: request.payload,
        };
        let data = codec::encode(&msg)?;
        let id = RequestId(self.fresh_id());
        self.client.insert(
            id,
            ClientRequest {
                peer,
                token,
                message_id: mid,
                observe,
            },
        );
        self.client_by_token.insert((peer, token), id);
        if request.confirmable {
            self.queue_con(now, peer, mid, token, OutKind::Request(id), data);
        } else {
            self.transmit(peer, data);
            self.remember_non(now, peer, mid, NonRef::Request(id));
            self.timers
                .set(TimerKey::Client(id), now + self.config.exchange_lifetime);
        }
        Ok(id)
    }

    /// Forgets a request (an observation, typically): later responses to it are rejected with
    /// a RST, which ends the observation at the server. Returns whether it was known.
    pub fn cancel_request(&mut self, request: RequestId) -> bool {
        self.remove_client(request).is_some()
    }

    // ------------------------------------------------------------------ internals: replies

    /// Answers a request from the endpoint itself (errors, 2.31, cached blocks).
    fn reply_now(&mut self, peer: SocketAddr, req: &Message, resp: Response) {
        let (kind, mid) = if req.message_type == MessageType::Confirmable {
            (MessageType::Acknowledgement, req.message_id)
        } else {
            (MessageType::NonConfirmable, self.fresh_mid())
        };
        let data = self.encode_or_empty(&to_message(kind, mid, req.token, resp));
        self.transmit(peer, data.clone());
        if kind == MessageType::Acknowledgement {
            self.set_dedup_reply(peer, req.message_id, data);
        }
    }

    fn too_large(&self) -> Response {
        let mut resp = Response::new(Code::REQUEST_ENTITY_TOO_LARGE);
        resp.options
            .set_size1(u32::try_from(self.config.max_body_size).unwrap_or(u32::MAX));
        resp
    }

    fn acknowledge_exchange(&mut self, now: Instant, id: ExchangeId) {
        let Some(ex) = self.exchanges.get_mut(&id) else {
            return;
        };
        if !ex.confirmable || ex.acked {
            return;
        }
        ex.acked = true;
        let (peer, mid, expires) = (ex.peer, ex.message_id, ex.expires);
        let ack = self.encode_or_empty(&Message::empty(MessageType::Acknowledgement, mid));
        self.transmit(peer, ack.clone());
        self.set_dedup_reply(peer, mid, ack);
        self.timers.set(TimerKey::Exchange(id), expires.max(now));
    }

    fn on_exchange_timer(&mut self, now: Instant, id: ExchangeId) {
        let Some(ex) = self.exchanges.get(&id) else {
            return;
        };
        if ex.confirmable && !ex.acked && now < ex.expires {
            self.acknowledge_exchange(now, id);
        } else {
            self.exchanges.remove(&id);
            self.stats.exchanges_expired += 1;
        }
    }

    fn send_reset(&mut self, peer: SocketAddr, mid: MessageId) -> Bytes {
        self.stats.resets_sent += 1;
        let data = self.encode_or_empty(&Message::empty(MessageType::Reset, mid));
        self.transmit(peer, data.clone());
        data
    }

    fn transmit(&mut self, peer: SocketAddr, data: Bytes) {
        self.stats.datagrams_sent += 1;
        self.transmits.push_back(Transmit { peer, data });
    }

    /// Encodes a message the endpoint built itself; those always encode, but fall back to
    /// an empty datagram rather than panic.
    fn encode_or_empty(&self, msg: &Message) -> Bytes {
        codec::encode(msg).unwrap_or_default()
    }

    fn fresh_mid(&mut self) -> MessageId {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ------------------------------------------------------------------ internals: dedup

    /// Records a received CON/NON; returns true (after re-sending the cached reply) when it is
    /// a duplicate.
    fn dedup_check(&mut self, now: Instant, peer: SocketAddr, msg: &Message) -> bool {
        let key = (peer, msg.message_id);
        let con = msg.message_type == MessageType::Confirmable;
        if let Some(entry) = self.dedup.get(&key) {
            if entry.expires > now {
                self.stats.duplicates += 1;
                if con {
                    match &entry.reply {
                        Reply::Sent(data) => {
                            let data = data.clone();
                            self.transmit(peer, data);
                        }
                        Reply::Pending => {
                            // The client retransmits while the application works: switch to
                            // a separate response (§5.2.2).
                            if let Some(id) = entry.exchange {
                                self.acknowledge_exchange(now, id);
                            }
                        }
                        Reply::Nothing => {}
                    }
                }
                return true;
            }
        }
        while self.dedup.len() >= self.config.max_dedup_entries {
            if !self.evict_dedup() {
                break;
            }
        }
        let (lifetime, queue) = if con {
            (self.config.exchange_lifetime, &mut self.dedup_con)
        } else {
            (self.config.non_lifetime, &mut self.dedup_non)
        };
        let expires = now + lifetime;
        queue.push_back((expires, peer, msg.message_id));
        self.dedup.insert(
            key,
            DedupEntry {
                reply: if con { Reply::Pending } else { Reply::Nothing },
                exchange: None,
                expires,
            },
        );
        false
    }

    fn set_dedup_reply(&mut self, peer: SocketAddr, mid: MessageId, data: Bytes) {
        if let Some(e) = self.dedup.get_mut(&(peer, mid)) {
            e.reply = Reply::Sent(data);
        }
    }

    /// Evicts the dedup entry that expires first; false when there is none.
    fn evict_dedup(&mut self) -> bool {
        let con_first = match (self.dedup_con.front(), self.dedup_non.front()) {
            (Some(c), Some(n)) => c.0 <= n.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return false,
        };
        let queue = if con_first {
            &mut self.dedup_con
        } else {
            &mut self.dedup_non
        };
        if let Some((expires, peer, mid)) = queue.pop_front() {
            if self
                .dedup
                .get(&(peer, mid))
                .is_some_and(|e| e.expires == expires)
            {
                self.dedup.remove(&(peer, mid));
                self.stats.evictions += 1;
            }
        }
        true
    }

    /// Drops expired dedup and NON bookkeeping entries.
    fn collect_garbage(&mut self, now: Instant) {
        for con in [true, false] {
            loop {
                let queue = if con {
                    &mut self.dedup_con
                } else {
                    &mut self.dedup_non
                };
                match queue.front() {
                    Some(&(expires, peer, mid)) if expires <= now => {
                        queue.pop_front();
                        if self
                            .dedup
                            .get(&(peer, mid))
                            .is_some_and(|e| e.expires == expires)
                        {
                            self.dedup.remove(&(peer, mid));
                        }
                    }
                    _ => break,
                }
            }
        }
        while let Some(&(expires, peer, mid)) = self.non_order.front() {
            if expires > now && self.non_order.len() <= self.config.max_dedup_entries {
                break;
            }
            self.non_order.pop_front();
            self.non_sent.remove(&(peer, mid));
        }
    }

    fn remember_non(&mut self, now: Instant, peer: SocketAddr, mid: MessageId, r: NonRef) {
        self.non_sent.insert((peer, mid), r);
        self.non_order
            .push_back((now + self.config.non_lifetime, peer, mid));
        if self.non_order.len() > self.config.max_dedup_entries {
            if let Some((_, p, m)) = self.non_order.pop_front() {
                self.non_sent.remove(&(p, m));
            }
        }
    }

    // ------------------------------------------------------------------ internals: CON out

    fn peer_mut(&mut self, now: Instant, peer: SocketAddr) -> &mut Peer {
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.max_peers {
            self.evict_peer();
        }
        let p = self.peers.entry(peer).or_insert_with(|| Peer {
            verified: false,
            inflight: Vec::new(),
            queue: VecDeque::new(),
            last_used: now,
        });
        p.last_used = p.last_used.max(now);
        p
    }

    /// Evicts the least recently used peer, preferring one with nothing in flight.
    fn evict_peer(&mut self) {
        let victim = self
            .peers
            .iter()
            .min_by_key(|(a, p)| (!p.idle(), p.last_used, **a))
            .map(|(a, _)| *a);
        let Some(addr) = victim else {
            return;
        };
        self.stats.evictions += 1;
        if let Some(p) = self.peers.remove(&addr) {
            for out in p.inflight.into_iter().chain(p.queue) {
                self.timers
                    .cancel(&TimerKey::Retransmit(addr, out.message_id));
                self.fail(addr, out, FailureReason::Evicted);
            }
        }
    }

    fn drop_peer_if_idle(&mut self, peer: SocketAddr) {
        if self
            .peers
            .get(&peer)
            .is_some_and(|p| p.idle() && !p.verified)
        {
            self.peers.remove(&peer);
        }
    }

    fn queue_con(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mid: MessageId,
        token: Token,
        kind: OutKind,
        data: Bytes,
    ) {
        let out = Outgoing {
            message_id: mid,
            replaced: Vec::new(),
            token,
            kind,
            data,
            retransmits: 0,
            timeout: Duration::ZERO,
        };
        let nstart = self.config.nstart;
        let max_queued = self.config.max_queued_per_peer;
        let p = self.peer_mut(now, peer);
        if p.inflight.len() < nstart {
            self.start(now, peer, out);
            return;
        }
        p.queue.push_back(out);
        if p.queue.len() > max_queued {
            if let Some(old) = p.queue.pop_front() {
                self.stats.evictions += 1;
                self.fail(peer, old, FailureReason::Evicted);
            }
        }
    }

    fn start(&mut self, now: Instant, peer: SocketAddr, mut out: Outgoing) {
        let factor = self.rng.random_range(1.0..=self.config.ack_random_factor);
        out.timeout = self.config.ack_timeout.mul_f64(factor);
        self.timers.set(
            TimerKey::Retransmit(peer, out.message_id),
            now + out.timeout,
        );
        self.transmit(peer, out.data.clone());
        if let Some(p) = self.peers.get_mut(&peer) {
            p.inflight.push(out);
        }
    }

    fn start_queued(&mut self, now: Instant, peer: SocketAddr) {
        let nstart = self.config.nstart;
        loop {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            if p.inflight.len() >= nstart {
                return;
            }
            let Some(next) = p.queue.pop_front() else {
                break;
            };
            self.start(now, peer, next);
        }
        self.drop_peer_if_idle(peer);
    }

    fn take_inflight(
        &mut self,
        peer: SocketAddr,
        pred: impl Fn(&Outgoing) -> bool,
    ) -> Option<Outgoing> {
        let p = self.peers.get_mut(&peer)?;
        let i = p.inflight.iter().position(pred)?;
        Some(p.inflight.swap_remove(i))
    }

    fn on_retransmit_timer(&mut self, now: Instant, peer: SocketAddr, mid: MessageId) {
        let max = self.config.max_retransmit;
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(i) = p.inflight.iter().position(|o| o.message_id == mid) else {
            return;
        };
        if p.inflight[i].retransmits < max {
            let out = &mut p.inflight[i];
            out.retransmits += 1;
            out.timeout = out.timeout.saturating_mul(2);
            let (data, timeout) = (out.data.clone(), out.timeout);
            self.timers
                .set(TimerKey::Retransmit(peer, mid), now + timeout);
            self.stats.retransmissions += 1;
            self.transmit(peer, data);
        } else {
            let out = p.inflight.swap_remove(i);
            self.stats.timeouts += 1;
            self.fail(peer, out, FailureReason::Timeout);
            self.start_queued(now, peer);
        }
    }

    /// Replaces a CON notification to the same observer that is in flight or queued (RFC 7641
    /// §4.5.2). In flight, the new one is sent at once and inherits the retransmission state.
    fn replace_notification(
        &mut self,
        peer: SocketAddr,
        token: Token,
        mid: MessageId,
        data: Bytes,
    ) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        let is_it = |o: &Outgoing| o.kind == OutKind::Notification && o.token == token;
        if let Some(out) = p.inflight.iter_mut().find(|o| is_it(o)) {
            let old = out.message_id;
            out.replaced.push(old);
            if out.replaced.len() > 8 {
                out.replaced.remove(0);
            }
            out.message_id = mid;
            out.data = data.clone();
            if let Some(at) = self.timers.deadline(&TimerKey::Retransmit(peer, old)) {
                self.timers.cancel(&TimerKey::Retransmit(peer, old));
                self.timers.set(TimerKey::Retransmit(peer, mid), at);
            }
            self.transmit(peer, data);
            return true;
        }
        if let Some(out) = p.queue.iter_mut().find(|o| is_it(o)) {
            out.message_id = mid;
            out.data = data;
            return true;
        }
        false
    }

    /// Reports an outgoing CON that will not be acknowledged.
    fn fail(&mut self, peer: SocketAddr, out: Outgoing, reason: FailureReason) {
        match out.kind {
            OutKind::Response => self.events.push_back(Event::DeliveryFailed {
                peer,
                token: out.token,
                reason,
            }),
            OutKind::Notification => {
                let reason = match reason {
                    FailureReason::Timeout => CancelReason::Timeout,
                    FailureReason::Reset | FailureReason::Rejected => CancelReason::Reset,
                    FailureReason::Evicted => CancelReason::Evicted,
                };
                self.remove_observer((peer, out.token), Some(reason));
            }
            OutKind::Request(id) => {
                if self.remove_client(id).is_some() {
                    self.events.push_back(Event::RequestFailed {
                        peer,
                        request: id,
                        reason,
                    });
                }
            }
        }
    }

    // ------------------------------------------------------------------ internals: observe

    fn register_observer(&mut self, now: Instant, ex: &Exchange) -> u32 {
        let key = (ex.peer, ex.token);
        let mut block_key = ex.key.clone();
        block_key.code = Code::GET.0;
        let szx = ex.block2.map(|b| b.szx);
        if let Some(obs) = self.observers.get_mut(&key) {
            if obs.resource != ex.resource {
                if let Some(set) = self.by_resource.get_mut(&obs.resource) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_resource.remove(&obs.resource);
                    }
                }
                obs.resource = ex.resource.clone();
            }
            obs.queries = ex.queries.clone();
            obs.key = block_key;
            obs.szx = szx;
            obs.seq = next_sequence(obs.seq);
            let seq = obs.seq;
            self.by_resource
                .entry(ex.resource.clone())
                .or_default()
                .insert(key);
            return seq;
        }
        // Start each observation at a random point of the sequence space so a client that
        // re-registers with the same token does not see numbers going backwards.
        let seq = self.rng.random_range(0..(1u32 << 22));
        self.observers.insert(
            key,
            Observer {
                resource: ex.resource.clone(),
                queries: ex.queries.clone(),
                key: block_key,
                seq,
                since_con: 0,
                last_con: now,
                szx,
            },
        );
        self.by_resource
            .entry(ex.resource.clone())
            .or_default()
            .insert(key);
        seq
    }

    fn remove_observer(&mut self, key: ObserverKey, reason: Option<CancelReason>) -> bool {
        let Some(obs) = self.observers.remove(&key) else {
            return false;
        };
        if let Some(set) = self.by_resource.get_mut(&obs.resource) {
            set.remove(&key);
            if set.is_empty() {
                self.by_resource.remove(&obs.resource);
            }
        }
        if let Some(reason) = reason {
            self.events.push_back(Event::ObserveCancelled {
                peer: key.0,
                token: key.1,
                resource: obs.resource,
                reason,
            });
        }
        true
    }

    // ------------------------------------------------------------------ internals: client

    fn deliver_response(&mut self, peer: SocketAddr, id: RequestId, msg: Message) {
        let Some(req) = self.client.get(&id) else {
            return;
        };
        let observing =
            req.observe && msg.code.is_success() && msg.options.contains(OptionNumber::OBSERVE);
        if observing {
            // An observation stays until cancelled or rejected.
            self.timers.cancel(&TimerKey::Client(id));
        } else {
            self.remove_client(id);
        }
        self.events.push_back(Event::Response {
            peer,
            request: id,
            response: msg,
        });
    }

    /// Ends a request whose response was rejected.
    fn reject_response(&mut self, now: Instant, peer: SocketAddr, id: RequestId) {
        if let Some(req) = self.remove_client(id) {
            if let Some(out) = self.take_inflight(peer, |o| o.message_id == req.message_id) {
                self.timers
                    .cancel(&TimerKey::Retransmit(peer, out.message_id));
                self.start_queued(now, peer);
            }
            self.events.push_back(Event::RequestFailed {
                peer,
                request: id,
                reason: FailureReason::Rejected,
            });
        }
    }

    fn remove_client(&mut self, id: RequestId) -> Option<ClientRequest> {
        let req = self.client.remove(&id)?;
        self.client_by_token.remove(&(req.peer, req.token));
        self.timers.cancel(&TimerKey::Client(id));
        Some(req)
    }

    // ------------------------------------------------------------------ internals: blocks

    fn on_block1(
        &mut self,
        now: Instant,
        key: &ResourceKey,
        b1: BlockOption,
        payload: &Bytes,
        size1: Option<u32>,
    ) -> Block1Outcome {
        let size = b1.size();
        if payload.len() > size || (b1.more && payload.len() != size) {
            return Block1Outcome::Reply(
                Response::new(Code::BAD_REQUEST).with_payload("block size does not match SZX"),
            );
        }
        let max = self.config.max_body_size;
        let offset = b1.offset();
        if b1.num == 0 {
            self.block1.remove(key);
            self.timers.cancel(&TimerKey::Block1(key.clone()));
            if size1.is_some_and(|s| s as usize > max) || payload.len() > max {
                return Block1Outcome::Reply(self.too_large());
            }
            if !b1.more {
                return Block1Outcome::Complete(payload.clone());
            }
            if self.block1.len() >= self.config.max_block1_transfers {
                let oldest = self
                    .block1
                    .iter()
                    .min_by_key(|(_, s)| (s.expires, s.started))
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.stats.evictions += 1;
                    self.block1.remove(&k);
                    self.timers.cancel(&TimerKey::Block1(k));
                }
            }
            let started = self.fresh_id();
            self.block1.insert(
                key.clone(),
                Block1State {
                    body: payload.to_vec(),
                    last: (0, payload.len()),
                    expires: now,
                    started,
                },
            );
        } else {
            let Some(state) = self.block1.get_mut(key) else {
                return Block1Outcome::Reply(incomplete());
            };
            if offset == state.body.len() {
                if offset + payload.len() > max {
                    self.block1.remove(key);
                    self.timers.cancel(&TimerKey::Block1(key.clone()));
                    return Block1Outcome::Reply(self.too_large());
                }
                state.body.extend_from_slice(payload);
                state.last = (offset, payload.len());
            } else if (offset, payload.len()) != state.last || !b1.more {
                // Neither the next block nor a repeat of the last one.
                self.block1.remove(key);
                self.timers.cancel(&TimerKey::Block1(key.clone()));
                return Block1Outcome::Reply(incomplete());
            }
        }
        if b1.more {
            let expires = now + self.config.block1_lifetime;
            if let Some(state) = self.block1.get_mut(key) {
                state.expires = expires;
            }
            self.timers.set(TimerKey::Block1(key.clone()), expires);
            let mut resp = Response::new(Code::CONTINUE);
            resp.options.set_block1(BlockOption {
                num: b1.num,
                more: true,
                szx: b1.szx.min(self.config.block_szx),
            });
            Block1Outcome::Reply(resp)
        } else {
            self.timers.cancel(&TimerKey::Block1(key.clone()));
            let body = self
                .block1
                .remove(key)
                .map(|s| Bytes::from(s.body))
                .unwrap_or_default();
            Block1Outcome::Complete(body)
        }
    }

    /// The block size exponent for a response to `peer`: the configured one, the client's if
    /// smaller, and small enough for the amplification guard.
    fn block_szx_for(
        &self,
        peer: SocketAddr,
        requested: Option<BlockOption>,
        overhead: usize,
    ) -> u8 {
        let mut szx = self.config.block_szx.min(6);
        if let Some(r) = requested {
            szx = szx.min(r.szx);
        }
        if let Some(limit) = self.config.unverified_response_limit {
            if !self.is_verified(peer) {
                let budget = limit.saturating_sub(overhead);
                while szx > 0 && szx_to_size(szx) > budget {
                    szx -= 1;
                }
            }
        }
        szx
    }

    /// Applies Block2 to an application response: splits a large body, caches it, adds ETag
    /// and Size2. Responses that already carry Block2 pass unchanged.
    fn block2_response(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        key: &ResourceKey,
        requested: Option<BlockOption>,
        size2_requested: bool,
        mut resp: Response,
    ) -> Response {
        if resp.options.contains(OptionNumber::BLOCK2) {
            return resp;
        }
        // Header, token, options, payload marker, and room for Block2 + Size2 + ETag.
        let overhead = 4
            + 8
            + codec::encoded_len(&Message {
                message_type: MessageType::Acknowledgement,
                code: resp.code,
                message_id: 0,
                token: Token::EMPTY,
                options: resp.options.clone(),
                payload: Bytes::new(),
            })
            + 1
            + 4
            + 6
            + 10;
        let szx = self.block_szx_for(peer, requested, overhead);
        let size = szx_to_size(szx);
        let offset = requested.map_or(0, |r| r.offset());
        if resp.payload.len() <= size && offset == 0 {
            if size2_requested {
                resp.options
                    .set_size2(u32::try_from(resp.payload.len()).unwrap_or(u32::MAX));
            }
            return resp;
        }
        if resp.options.etag().is_none() {
            resp.options.set_etag(&fnv1a64(&resp.payload).to_be_bytes());
        }
        let body = std::mem::take(&mut resp.payload);
        let entry = Block2Entry {
            code: resp.code,
            options: resp.options,
            body,
            expires: now,
            used: 0,
        };
        let block = slice_block(&entry, offset, szx, size2_requested);
        if block.code.is_success() && entry.body.len() > size {
            self.cache_block2(now, key.clone(), entry);
        }
        block
    }

    fn serve_cached_block(
        &mut self,
        now: Instant,
        key: &ResourceKey,
        requested: BlockOption,
        size2: bool,
    ) -> Option<Response> {
        let overhead = self.block2.get(key).map(|e| {
            4 + 8
                + 1
                + 4
                + 6
                + codec::encoded_len(&Message {
                    message_type: MessageType::Acknowledgement,
                    code: e.code,
                    message_id: 0,
                    token: Token::EMPTY,
                    options: e.options.clone(),
                    payload: Bytes::new(),
                })
        })?;
        let szx = self.block_szx_for(key.peer, Some(requested), overhead);
        let expires = now + self.config.block2_lifetime;
        let used = self.fresh_id();
        let entry = self.block2.get_mut(key)?;
        entry.expires = expires;
        entry.used = used;
        let resp = slice_block(entry, requested.offset(), szx, size2);
        self.timers.set(TimerKey::Block2(key.clone()), expires);
        Some(resp)
    }

    fn cache_block2(&mut self, now: Instant, key: ResourceKey, mut entry: Block2Entry) {
        self.remove_block2(&key);
        let len = entry.body.len();
        if len > self.config.max_block2_bytes || self.config.max_block2_entries == 0 {
            return;
        }
        while self.block2.len() >= self.config.max_block2_entries
            || self.block2_bytes + len > self.config.max_block2_bytes
        {
            let oldest = self
                .block2
                .iter()
                .min_by_key(|(_, e)| (e.expires, e.used))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.stats.evictions += 1;
                    self.remove_block2(&k);
                }
                None => break,
            }
        }
        entry.expires = now + self.config.block2_lifetime;
        entry.used = self.fresh_id();
        self.timers
            .set(TimerKey::Block2(key.clone()), entry.expires);
        self.block2_bytes += len;
        self.block2.insert(key, entry);
    }

    fn remove_block2(&mut self, key: &ResourceKey) {
        if let Some(e) = self.block2.remove(key) {
            self.block2_bytes = self.block2_bytes.saturating_sub(e.body.len());
            self.timers.cancel(&TimerKey::Block2(key.clone()));
        }
    }
}

fn incomplete() -> Response {
    Response::new(Code::REQUEST_ENTITY_INCOMPLETE).with_payload("missing or out-of-order block")
}

/// The block at `offset` of a cached body, as a response; 4.02 when the offset lies beyond the
/// body (RFC 7959 §2.2).
fn slice_block(entry: &Block2Entry, offset: usize, szx: u8, size2: bool) -> Response {
    let size = szx_to_size(szx);
    let len = entry.body.len();
    let num = u32::try_from(offset / size).ok();
    let block = num.and_then(|n| BlockOption::new(n, offset + size < len, szx));
    let Some(block) = block.filter(|_| offset < len || offset == 0) else {
        return Response::new(Code::BAD_OPTION).with_payload("block number beyond the body");
    };
    let mut resp = Response {
        code: entry.code,
        options: entry.options.clone(),
        payload: entry.body.slice(offset..len.min(offset + size)),
    };
    resp.options.set_block2(block);
    if block.num == 0 || size2 {
        resp.options
            .set_size2(u32::try_from(len).unwrap_or(u32::MAX));
    }
    resp
}

fn to_message(kind: MessageType, mid: MessageId, token: Token, resp: Response) -> Message {
    Message {
        message_type: kind,
        code: resp.code,
        message_id: mid,
        token,
        options: resp.options,
        payload: resp.payload,
    }
}

/// 64-bit FNV-1a: a cheap, stable entity tag for a body.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
