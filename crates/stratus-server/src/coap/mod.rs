//! The CoAP listeners: plain UDP (`coap`, 5683), DTLS 1.2 PSK (`coaps`, 5684) and the opt-in
//! multicast discovery socket, each one tokio task driving one sans-IO
//! [`stratus_coap::Endpoint`], with the device resources of the SPEC.
//!
//! ## One task per socket, nothing blocks it
//! The task loops "receive datagrams → [`Endpoint::handle_datagram`] → send what it wants →
//! route its events → sleep until [`Endpoint::poll_timeout`]". A `POST /telemetry` (one
//! datagram of JSON or CBOR) is ingested by a future the task polls itself
//! (`FuturesUnordered`): it parses and submits its store job at once, and the commit that
//! makes it durable wakes the task once for all the requests it carried. Other handlers that
//! need the store (config, firmware, a reassembled `/upload`) run as spawned tasks and hand
//! their [`Response`] back through a channel. The endpoint then answers piggybacked, or — when
//! a CON request waits longer than a second — with an empty ACK first and a separate CON
//! response later (the endpoint does that by itself, `Config::separate_response_after`).
//! Pending requests are bounded (`[coap] max_pending_requests`; beyond, the endpoint answers
//! 5.03), so the futures and the channel are too. Retransmitted CONs are answered from the
//! endpoint's deduplication cache: a duplicated telemetry POST is stored once.
//!
//! ## Resources
//! | path | methods | answer |
//! | --- | --- | --- |
//! | `/.well-known/core` | GET | RFC 6690 link format with `rt`, `if`, `ct`, `obs`, `sz`; query filters (`?rt=stratus.*`); no credentials needed |
//! | `/telemetry` | POST | a telemetry message (JSON, or CBOR with Content-Format 60) through the one pipeline: 2.04 once durable |
//! | `/config` | GET (Observe) | the desired config document (the payload of the retained MQTT `devices/{id}/config`), ETag = version |
//! | `/config/reported` | PUT, POST | stores the reported config (a JSON object): 2.04 |
//! | `/firmware` | GET, observable | the device's firmware assignment notice (JSON; `null` without one); observers are notified of each new assignment |
//! | `/firmware/{id}` | GET | the firmware image, Block2 blocks read from its file, ETag, Size2 (assigned devices only) |
//! | `/firmware/status` | POST | a firmware status report: a word (`installed`…) or JSON |
//! | `/upload` | PUT, POST | a Block1 upload (reassembled up to `max_body_bytes`), ingested as one telemetry message: the way to send a large buffered batch; 2.04 (PUT) or 2.01 (POST) |
//!
//! Errors: unknown path 4.04, wrong method 4.05 (the endpoint answers unknown method codes
//! itself), no or bad credentials 4.01, a token that is not a device's 4.03, invalid telemetry
//! 4.00 with a diagnostic payload naming the record and field, a replayed message 4.09,
//! too large 4.13 with Size1, the nonce memory full 5.03 with Max-Age 1 (retry), a store
//! failure 5.00, an unsupported Content-Format 4.15.
//!
//! ## Credentials
//! On plain UDP a request carries `?token=ACCESS_TOKEN`, the device's OAuth access token
//! (verified with [`Auth::verify_token`]: a MAC and a map lookup, no store read; the listener
//! keeps the claims of up to 4096 verified tokens, so a known token costs only
//! [`Auth::check_claims`] — expiry, revocation, the device still there with the same
//! credential — on every request). A device's token has 59 characters, so one `?token=` holds
//! it with every client (libcoap's `coap-client` keeps only about the first 100 bytes of a
//! query); a longer token (an application's JWT) may be split over several `token=` items,
//! which are joined in order (a Uri-Query option holds at most 255 bytes, RFC 7252 §5.10).
//! A 4.01 says why: the token was cut short, is malformed, is not ours, expired, was revoked,
//! or predates a credential change. On CoAPS the DTLS session's PSK
//! identity is the device id (see [`dtls`]). `token=` items are removed before link-format
//! filtering.
//!
//! ## Observe
//! `GET /config` with Observe=0 registers the client (peer, token) for its device. The
//! listener subscribes in-process to the broker on `devices/+/config` (the retained
//! desired-config messages the HTTP API publishes on every change) and sends each observer of
//! that device the new document as a notification; a deleted device's observers get 4.04,
//! which ends their observation; an observer whose access token expired or was revoked gets
//! 4.01 instead of the next notification.
//!
//! ## Amplification guard (RFC 7252 §11.3)
//! Until a peer has authenticated (a valid token or a DTLS session), every datagram sent to
//! it is at most `[coap] unverified_response_limit` bytes (default 256, about ten times a
//! minimal request): a larger body, such as `/.well-known/core` answered to a spoofed source
//! address, goes out in small Block2 blocks that the real client asks for one by one. DTLS
//! peers proved their address with the cookie exchange.
//!
//! ## Performance (issue #6: `stratus bench coap`, at least 40,000 requests/s)
//! 64 clients, each with one confirmable `POST /telemetry?token=…` outstanding; a 2.04 goes
//! out only once its record is committed with fsync (group commit, `synchronous=FULL`). Release
//! build, one `stratus serve`, the bench on the same 2-core machine:
//!
//! ```text
//! STRATUS_ADMIN_SECRET=x stratus serve --data-dir D --mqtt-port 18481 --http-port 18480 --coap-port 18483 &
//! STRATUS_ADMIN_SECRET=x stratus bench coap --server http://127.0.0.1:18480 \
//!     --coap coap://127.0.0.1:18483 --server-pid $! --timeout 60
//! ```
//!
//! | | requests/s | p50 | p99 | server CPU | generator CPU | server CPU per request |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | before (quiet machine) | 32,606 / 28,789 | 1.90 ms | 3.63 ms | 139 % of a core | 25 % | ~43 µs |
//! | main at 9edb470 (glibc malloc), 5 consecutive runs, quiet machine | 26,119, 43,696, 42,740, 38,772, 41,632 | 1.37–2.01 ms | 3.51–7.76 ms | 79–106 % | 23–31 % | ~24 µs |
//! | branch with mimalloc (not kept), 20 runs, shared machine | 14,613–56,651, median 39,123 | 1.10–3.72 ms | 2.08–15.3 ms | 44–112 % | 12–39 % | 19–30 µs |
//!
//! 0 timeouts and 0 errors in every run; 4 of the 10 pairs had both runs at 40,000 or more
//! (40,362 / 37,091, 56,651 / 50,704, 46,521 / 43,037, 40,480 / 49,365, 32,551 / 37,884,
//! 33,066 / 35,526, 35,097 / 27,132, 33,419 / 46,548, 55,110 / 55,562, 25,671 / 14,613).
//! Each pair started after 3 s with the CPUs at least 75 % idle, but other builds came and
//! went during the runs: the CPU share the server got (44–112 % of a core) tracks the figure.
//! The machine is shared with other builds, and the spread follows their load: with load 4–7
//! the same binary does 8,000–24,000 requests/s at 21–30 µs of server CPU per request, bounded
//! by the CPU share it gets. Where the CPU went before, and what changed:
//! the access token was verified per request (base64, HMAC, JSON: ~11 % of the server's CPU;
//! now remembered, see Credentials); each request was a spawned task answering through a
//! channel, two more thread hops (now a future on the listener task); the store writer ran
//! per request a series look-up, a rollup upsert, a device update and a savepoint whose
//! sub-journal copied pages (now shared by the jobs of a commit, and a job that cannot fail
//! half-way has no savepoint); malloc and free were ~15 % (mimalloc brought them to ~11 % but kept
//! the idle server's RSS far above its 30 MiB budget, so glibc's malloc stayed); the endpoint
//! copied the 600-byte query three times per request. What bounds it now: the closed loop is
//! latency-bound (throughput = 64 / mean latency; server and generator together used 1.5 of
//! the 2 cores), and a request's time is about half waiting for its commit (a commit takes
//! 0.2 ms at the median and carries 10 jobs at the median, 23 on average) and half UDP and
//! scheduling between three threads (generator, listener task, store writer). The profile
//! is flat: the kernel (UDP send and receive, context switches) about a third of the
//! samples, SQLite's inserts and commits about a fifth, nothing of ours above 2 %.
//!
//! ## Multicast (RFC 7252 §8, RFC 7390 §2; opt-in with `[coap] multicast = true`)
//! A second socket bound to 224.0.1.187 (and ff02::fd when IPv6 is there) on the CoAP port
//! answers only `GET /.well-known/core`, after a random Leisure delay of up to
//! `multicast_leisure_ms`, and never with an error or a reset (§8.1): a discovery whose
//! filter matches nothing gets no answer at all. The group is joined only on the interface of
//! the plain listener's bind address ([`multicast_joins`]): with `--bind 127.0.0.1` discovery
//! is answered on loopback and nowhere else; with a LAN address, on that LAN; with `0.0.0.0`,
//! on the kernel's default multicast interface.

pub mod dtls;
pub mod psk;
mod resources;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt as _};
use rand::Rng;
use stratus_coap::{Endpoint, Event, ExchangeId, Response, Stats, Token};
use stratus_store::StoreHandle;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::auth::{now_secs, Auth, Kind, Proof};
use crate::broker::Broker;
use crate::config::CoapConfig;
use crate::pipeline::Pipeline;

pub use resources::link_resources;

/// The CoAP multicast group of IPv4 (RFC 7252 §12.8).
pub const MULTICAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 1, 187);
/// The link-local CoAP multicast group of IPv6 (RFC 7252 §12.8).
pub const MULTICAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfd);

/// The largest datagram read: the UDP maximum, so nothing is ever silently truncated.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams read per wake-up before the task sends, routes and reads the clock again.
const RECV_BATCH: usize = 64;
/// Broker messages taken per wake-up.
const NOTIFY_BATCH: usize = 256;
/// Verified access tokens a listener remembers (see `Driver::tokens`); when full, it starts
/// over.
const TOKEN_CACHE: usize = 4096;
/// Longest diagnostic payload of an error response.
const MAX_DIAGNOSTIC: usize = 160;

/// What every CoAP listener shares.
pub struct CoapContext {
    /// Credentials.
    pub auth: Arc<Auth>,
    /// Failed logins, aggregated for the audit log.
    pub failures: Arc<crate::audit::failures::FailureLog>,
    /// The telemetry pipeline.
    pub pipeline: Arc<Pipeline>,
    /// The store (desired and reported config).
    pub store: StoreHandle,
    /// The broker (config changes).
    pub broker: Arc<Broker>,
    /// `[coap]`.
    pub config: CoapConfig,
    /// The firmware service (notices, images, status reports).
    pub firmware: Arc<crate::firmware::Firmware>,
}

/// How a listener's socket is used.
pub enum Mode {
    /// Plain CoAP over UDP.
    Plain,
    /// CoAP over DTLS 1.2 PSK.
    Dtls(dtls::DtlsServer),
    /// Multicast discovery only (see the module docs).
    Multicast,
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Plain => "coap",
            Mode::Dtls(_) => "coaps",
            Mode::Multicast => "coap-multicast",
        }
    }
}

/// The endpoint configuration for `[coap]`.
pub fn endpoint_config(c: &CoapConfig, mode: &Mode) -> stratus_coap::Config {
    let guard = match mode {
        // DTLS peers passed the cookie exchange; multicast answers are small and few.
        Mode::Plain => (c.unverified_response_limit > 0).then_some(c.unverified_response_limit),
        Mode::Dtls(_) | Mode::Multicast => None,
    };
    stratus_coap::Config {
        max_body_size: c.max_body_bytes,
        max_pending_requests: c.max_pending_requests,
        max_observers: c.max_observers,
        unverified_response_limit: guard,
        ..stratus_coap::Config::default()
    }
}

/// Binds the plain CoAP socket on `ip:port`. With `reuse` (multicast on), the port may be
/// shared with the multicast socket, and the socket takes no multicast datagrams of groups it
/// did not join itself.
pub fn bind_udp(ip: IpAddr, port: u16, reuse: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::new(ip, port);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        socket.set_reuse_address(true)?;
        if ip.is_ipv4() {
            // Linux: without this a wildcard-bound socket also gets every joined group's traffic.
            let _ = socket.set_multicast_all_v4(false);
        }
    }
    socket.set_nonblocking(true)?;
    // Bursts of small datagrams: a larger receive buffer drops fewer under load.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Where a multicast group is joined: the interface of the address the CoAP listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MulticastJoin {
    /// 224.0.1.187 on the IPv4 interface that has this address (`IP_ADD_MEMBERSHIP` with it as
    /// the interface address); `0.0.0.0`: the kernel's choice, the interface of the route to the
    /// group.
    V4(Ipv4Addr),
    /// ff02::fd on the interface with this index (`IPV6_JOIN_GROUP`); 0: the kernel's choice.
    V6(u32),
}

/// The memberships for a listener bound to `bind`: only on the interface of that address. A
/// wildcard bind (`0.0.0.0`, `::`) joins 224.0.1.187 and ff02::fd on the kernel's default
/// interface, as every multicast listener does; a specific address joins only its own
/// interface, so `--bind 127.0.0.1` answers discovery on loopback and never on the LAN. An
/// IPv6 address's interface is looked up in `/proc/net/if_inet6` (an error when no interface
/// has it).
pub fn multicast_joins(bind: IpAddr) -> std::io::Result<Vec<MulticastJoin>> {
    match bind {
        IpAddr::V4(a) if a.is_unspecified() => Ok(vec![MulticastJoin::V4(a), MulticastJoin::V6(0)]),
        IpAddr::V4(a) => Ok(vec![MulticastJoin::V4(a)]),
        IpAddr::V6(a) if a.is_unspecified() => Ok(vec![
            MulticastJoin::V4(Ipv4Addr::UNSPECIFIED),
            MulticastJoin::V6(0),
        ]),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => multicast_joins(IpAddr::V4(v4)),
            None => {
                let table = std::fs::read_to_string("/proc/net/if_inet6")?;
                match interface_of_v6(&table, a) {
                    Some(index) => Ok(vec![MulticastJoin::V6(index)]),
                    None => Err(std::io::Error::new(
                        std::io::ErrorKind::AddrNotAvailable,
                        format!("no interface has the address {a}"),
                    )),
                }
            }
        },
    }
}

/// The index of the interface that has `addr`, from the text of Linux's `/proc/net/if_inet6`
/// (one address a line: 32 hex digits, then the interface index in hex, …, the name).
fn interface_of_v6(table: &str, addr: Ipv6Addr) -> Option<u32> {
    let want = addr
        .octets()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let address = fields.next()?;
        let index = fields.next()?;
        (address.eq_ignore_ascii_case(&want))
            .then(|| u32::from_str_radix(index, 16).ok())
            .flatten()
    })
}

/// Binds the multicast sockets on `port` for a listener bound to `bind`, one per
/// [`multicast_joins`]: the IPv4 group is required (an error when it fails); the IPv6 group of
/// a wildcard bind is skipped quietly when IPv6 is not there. Each socket takes only the
/// datagrams of its own membership (`IP_MULTICAST_ALL`/`IPV6_MULTICAST_ALL` off on Linux), so
/// a group joined on another interface by another socket of the host is not answered.
pub fn bind_multicast(bind: IpAddr, port: u16) -> std::io::Result<Vec<UdpSocket>> {
    let mut out = Vec::new();
    for join in multicast_joins(bind)? {
        match join {
            MulticastJoin::V4(interface) => out.push(bind_multicast_v4(interface, port)?),
            MulticastJoin::V6(index) => match bind_multicast_v6(index, port) {
                Ok(s) => out.push(s),
                Err(e) if index == 0 => {
                    tracing::debug!(error = %e, "no IPv6 CoAP multicast (ff02::fd)")
                }
                Err(e) => return Err(e),
            },
        }
    }
    Ok(out)
}

fn bind_multicast_v4(interface: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    // Linux: without this the socket also gets the group's datagrams from every interface
    // where any socket of the host joined it.
    let _ = s.set_multicast_all_v4(false);
    s.bind(&SocketAddr::new(MULTICAST_V4.into(), port).into())?;
    s.join_multicast_v4(&MULTICAST_V4, &interface)?;
    UdpSocket::from_std(s.into())
}

fn bind_multicast_v6(index: u32, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    let _ = s.set_multicast_all_v6(false);
    // A known interface: bound to the link-local group with its scope, which also ties the
    // socket to that interface; the kernel's choice: the wildcard.
    let local = if index == 0 {
        std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)
    } else {
        std::net::SocketAddrV6::new(MULTICAST_V6, port, 0, index)
    };
    s.bind(&SocketAddr::V6(local).into())?;
    s.join_multicast_v6(&MULTICAST_V6, index)?;
    UdpSocket::from_std(s.into())
}

/// Serves CoAP on `socket` until `shutdown` turns true.
pub async fn serve(
    socket: UdpSocket,
    ctx: Arc<CoapContext>,
    mode: Mode,
    mut shutdown: watch::Receiver<bool>,
) {
    let seed: u64 = rand::rng().random();
    let name = mode.name();
    let ep = match Endpoint::new(endpoint_config(&ctx.config, &mode), seed) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!(error = %e, listener = name, "bad CoAP endpoint configuration");
            return;
        }
    };
    // Only the unicast listeners serve /config observers.
    let config_feed = match mode {
        Mode::Multicast => None,
        _ => ctx
            .broker
            .internal_subscriber(&format!("$coap/{name}"), CONFIG_FILTER),
    };
    let firmware_feed = match mode {
        Mode::Multicast => None,
        _ => ctx
            .broker
            .internal_subscriber(&format!("$coap/{name}/firmware"), FIRMWARE_FILTER),
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut driver = Driver::new(ctx, ep, mode, done_tx);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut credential_check = tokio::time::interval(CREDENTIAL_CHECK);
    credential_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = driver.next_deadline();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let config_changed = async {
            match &config_feed {
                Some(h) => h.notify.notified().await,
                None => std::future::pending().await,
            }
        };
        let firmware_changed = async {
            match &firmware_feed {
                Some(h) => h.notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = crate::stopped(&mut shutdown) => break,
            // Answers first: each one lets a client send its next request.
            Some(done) = driver.inflight.next(), if !driver.inflight.is_empty() => {
                let now = Instant::now();
                driver.on_done(now, done);
                // Every request of the same commit is ready too.
                while let Some(Some(done)) = driver.inflight.next().now_or_never() {
                    driver.on_done(now, done);
                }
            }
            r = socket.recv_from(&mut buf) => {
                match r {
                    Ok((n, peer)) => {
                        driver.on_datagram(Instant::now(), peer, &buf[..n]);
                        // Take what else is already there before answering.
                        for _ in 1..RECV_BATCH {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, peer)) => driver.on_datagram(Instant::now(), peer, &buf[..n]),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(e) => {
                        // ICMP port unreachable from an earlier send surfaces here on Linux.
                        tracing::trace!(error = %e, listener = name, "udp receive error");
                    }
                }
            }
            Some(done) = done_rx.recv() => {
                let now = Instant::now();
                driver.on_done(now, done);
                while let Ok(done) = done_rx.try_recv() {
                    driver.on_done(now, done);
                }
            }
            _ = config_changed => {}
            _ = firmware_changed => {}
            _ = credential_check.tick() => driver.check_credentials(Instant::now()),
            _ = sleep => {}
        }
        for (feed, firmware) in [(&firmware_feed, true), (&config_feed, false)] {
            let Some(h) = feed else { continue };
            loop {
                let batch = h.take_messages(NOTIFY_BATCH);
                if batch.is_empty() {
                    break;
                }
                for m in batch {
                    driver.on_notice(Instant::now(), m.topic.as_str(), &m.payload, firmware);
                }
            }
        }
        driver.on_timers(Instant::now());
        driver.pump(Instant::now());
        for (peer, data) in driver.outgoing.drain(..) {
            if let Err(e) = socket.send_to(&data, peer).await {
                tracing::debug!(error = %e, %peer, listener = name, "udp send failed");
            }
        }
        driver.sync_stats();
    }
    if let Some(h) = &config_feed {
        driver.ctx.broker.unsubscribe(h, CONFIG_FILTER);
    }
    if let Some(h) = &firmware_feed {
        driver.ctx.broker.unsubscribe(h, FIRMWARE_FILTER);
    }
    driver.release_observers();
}

/// How often a listener checks whether a credential its observers or sessions hold lapsed.
const CREDENTIAL_CHECK: Duration = Duration::from_millis(500);

/// The broker filter of desired-config changes.
const CONFIG_FILTER: &str = "devices/+/config";
/// The broker filter of firmware assignment notices.
const FIRMWARE_FILTER: &str = "devices/+/firmware";

/// A handler's answer, sent back to the listener task.
pub(crate) enum Done {
    /// Answer the exchange.
    Respond {
        exchange: ExchangeId,
        response: Response,
    },
    /// Answer a `GET /firmware`; when it asked to observe, remember the observer.
    Firmware {
        exchange: ExchangeId,
        response: Response,
        observer: Option<NewObserver>,
        device: String,
    },
    /// Answer a `GET /config`; when it asked to observe, remember the observer.
    Config {
        exchange: ExchangeId,
        response: Response,
        observer: Option<NewObserver>,
        device: String,
        version: u64,
    },
}

/// An observer to remember once its registration is answered.
pub(crate) struct NewObserver {
    peer: SocketAddr,
    token: Token,
    /// What it proved (its access token, or its DTLS key's credential), checked again
    /// before each notification and whenever a credential changes anywhere.
    proof: Proof,
}

struct Observer {
    device: String,
    proof: Proof,
    /// `/firmware` (the assignment notice) rather than `/config`.
    firmware: bool,
}

/// The state of one listener task, apart from its socket.
pub(crate) struct Driver {
    ctx: Arc<CoapContext>,
    ep: Endpoint,
    mode: Mode,
    done_tx: mpsc::UnboundedSender<Done>,
    /// Telemetry POSTs being ingested, polled by the listener task itself (see
    /// [`serve`]).
    inflight: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    /// Datagrams to send (already sealed for DTLS).
    outgoing: Vec<(SocketAddr, Bytes)>,
    observers: HashMap<(SocketAddr, Token), Observer>,
    by_device: HashMap<String, HashSet<(SocketAddr, Token)>>,
    /// Devices with a `GET /config` being read, and the newest document published for each
    /// meanwhile (so an observer never misses a change that raced its registration).
    config_reads: HashMap<String, (usize, Option<Bytes>)>,
    /// The same for `GET /firmware` and the assignment notices.
    firmware_reads: HashMap<String, (usize, Option<Bytes>)>,
    /// Multicast answers waiting out their Leisure: (due, sequence) → answer.
    leisure: BTreeMap<(Instant, u64), (ExchangeId, Response)>,
    leisure_seq: u64,
    last_stats: Stats,
    /// Claims of the access tokens whose signature this listener verified, by token: a
    /// request with a known token costs a map look-up and [`Auth::check_claims`] (expiry,
    /// revocation, the device still there), not a base64 decode, an HMAC and a JSON parse.
    tokens: HashMap<String, crate::auth::Claims>,
    /// The [`Auth::revision`] the observers and sessions were last checked at.
    seen_revision: u64,
    /// The earliest token expiry among the observers (Unix seconds).
    next_expiry: u64,
}

impl Driver {
    fn new(
        ctx: Arc<CoapContext>,
        ep: Endpoint,
        mode: Mode,
        done_tx: mpsc::UnboundedSender<Done>,
    ) -> Driver {
        Driver {
            ctx,
            ep,
            mode,
            done_tx,
            inflight: FuturesUnordered::new(),
            outgoing: Vec::new(),
            observers: HashMap::new(),
            by_device: HashMap::new(),
            config_reads: HashMap::new(),
            firmware_reads: HashMap::new(),
            leisure: BTreeMap::new(),
            leisure_seq: 0,
            last_stats: Stats::default(),
            tokens: HashMap::new(),
            seen_revision: 0,
            next_expiry: u64::MAX,
        }
    }

    /// When the task must wake up next.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.ep.poll_timeout();
        if let Some(((at, _), _)) = self.leisure.first_key_value() {
            next = Some(next.map_or(*at, |n| n.min(*at)));
        }
        if let Mode::Dtls(d) = &self.mode {
            if let Some(at) = d.poll_timeout() {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// One received datagram (ciphertext on CoAPS).
    fn on_datagram(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) {
        self.ctx.broker.metrics.coap_datagrams_received.inc();
        match &mut self.mode {
            Mode::Dtls(d) => {
                let mut plain = Vec::new();
                if d.on_datagram(now, peer, data, &mut plain, &mut self.outgoing) {
                    // The cookie exchange proved the address.
                    self.ep.set_verified(now, peer, true);
                }
                for p in plain {
                    self.ep.handle_datagram(now, peer, &p);
                }
            }
            _ => self.ep.handle_datagram(now, peer, data),
        }
        self.pump(now);
    }

    /// Handles due timers of the endpoint, the DTLS sessions and the multicast Leisure.
    fn on_timers(&mut self, now: Instant) {
        while self.ep.poll_timeout().is_some_and(|t| t <= now) {
            self.ep.handle_timeout(now);
        }
        if let Mode::Dtls(d) = &mut self.mode {
            for peer in d.handle_timeout(now, &mut self.outgoing) {
                self.forget_peer(peer);
            }
        }
        while let Some(entry) = self.leisure.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (exchange, response) = entry.remove();
            self.respond(now, exchange, response);
        }
    }

    /// Drains the endpoint's transmits (sealing them for DTLS) and events.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.ep.poll_transmit() {
                progressed = true;
                match &mut self.mode {
                    Mode::Dtls(d) => d.seal(t.peer, &t.data, &mut self.outgoing),
                    // Never an error or a reset in answer to a multicast request (§8.1).
                    Mode::Multicast if !multicast_may_send(&t.data) => {}
                    _ => self.outgoing.push((t.peer, t.data)),
                }
            }
            while let Some(ev) = self.ep.poll_event() {
                progressed = true;
                self.on_event(now, ev);
            }
            if !progressed {
                break;
            }
        }
    }

    fn on_event(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::Request {
                peer,
                exchange,
                request,
            } => self.on_request(now, peer, exchange, request),
            Event::ObserveCancelled { peer, token, .. } => {
                self.remove_observer(peer, token);
            }
            Event::DeliveryFailed { peer, .. } => {
                tracing::debug!(%peer, "coap separate response never acknowledged");
            }
            // This server sends no requests of its own.
            Event::Response { .. } | Event::RequestFailed { .. } => {}
        }
    }

    /// Answers `exchange`, counting the response by code class.
    fn respond(&mut self, now: Instant, exchange: ExchangeId, response: Response) {
        let class = response.code.class();
        if self.ep.respond(now, exchange, response).is_ok() {
            self.ctx.broker.metrics.coap_response(class);
        }
    }

    fn on_done(&mut self, now: Instant, done: Done) {
        match done {
            Done::Respond { exchange, response } => self.respond(now, exchange, response),
            Done::Firmware {
                exchange,
                response,
                observer,
                device,
            } => {
                let fresher = finish_read(&mut self.firmware_reads, &device);
                let observing = observer.is_some() && response.code.is_success();
                let sent = response.payload.clone();
                self.respond(now, exchange, response);
                if let Some(o) = observer.filter(|o| observing && self.registered(o)) {
                    let key = (o.peer, o.token);
                    self.firmware_observer(device, o);
                    // A notice published while the store was read reaches it now.
                    if let Some(doc) = fresher.filter(|d| *d != sent) {
                        self.notify_one(now, key, &doc);
                    }
                }
            }
            Done::Config {
                exchange,
                response,
                observer,
                device,
                version,
            } => {
                let fresher = finish_read(&mut self.config_reads, &device);
                let observing = observer.is_some() && response.code.is_success();
                self.respond(now, exchange, response);
                let Some(o) = observer.filter(|o| observing && self.registered(o)) else {
                    return;
                };
                let key = (o.peer, o.token);
                self.observers.insert(
                    key,
                    Observer {
                        device: device.clone(),
                        proof: o.proof,
                        firmware: false,
                    },
                );
                self.by_device
                    .entry(device.clone())
                    .or_default()
                    .insert(key);
                self.ctx
                    .broker
                    .metrics
                    .coap_observers
                    .set(self.observers.len() as i64);
                // A change published while the document was read reaches it now.
                if let Some(doc) = fresher {
                    if config_version(&doc).is_some_and(|v| v > version) {
                        self.notify_one(now, key, &doc);
                    }
                }
            }
        }
    }

    /// Whether the endpoint took `o`'s registration (its table is full at
    /// `[coap] max_observers`: then the answer went out without Observe, and is counted).
    fn registered(&self, o: &NewObserver) -> bool {
        let taken = self.ep.is_observing(o.peer, o.token);
        if !taken {
            self.ctx.broker.metrics.limit_hit("coap_observers", 1);
        }
        taken
    }

    /// Registers a `/firmware` observer once its first answer went out.
    fn firmware_observer(&mut self, device: String, o: NewObserver) {
        let key = (o.peer, o.token);
        self.observers.insert(
            key,
            Observer {
                device: device.clone(),
                proof: o.proof,
                firmware: true,
            },
        );
        self.by_device.entry(device).or_default().insert(key);
        self.ctx
            .broker
            .metrics
            .coap_observers
            .set(self.observers.len() as i64);
    }

    /// A retained `devices/{id}/firmware` (`firmware`) or `devices/{id}/config` message from
    /// the broker: to that device's `/firmware` or `/config` observers, and to a read of it in
    /// flight.
    fn on_notice(&mut self, now: Instant, topic: &str, payload: &Bytes, firmware: bool) {
        let suffix = if firmware { "/firmware" } else { "/config" };
        let Some(device) = topic
            .strip_prefix("devices/")
            .and_then(|t| t.strip_suffix(suffix))
        else {
            return;
        };
        let reads = if firmware {
            &mut self.firmware_reads
        } else {
            &mut self.config_reads
        };
        if let Some((_, newest)) = reads.get_mut(device) {
            *newest = Some(payload.clone());
        }
        let Some(keys) = self.by_device.get(device) else {
            return;
        };
        let keys: Vec<_> = keys
            .iter()
            .copied()
            .filter(|k| {
                self.observers
                    .get(k)
                    .is_some_and(|o| o.firmware == firmware)
            })
            .collect();
        for key in keys {
            self.notify_one(now, key, payload);
        }
    }

    /// Sends one observer the config document or firmware notice `doc` (empty: the device
    /// is gone, or for `/firmware` the notice was withdrawn).
    fn notify_one(&mut self, now: Instant, key: (SocketAddr, Token), doc: &Bytes) {
        let Some(obs) = self.observers.get(&key) else {
            return;
        };
        let still_valid = self
            .ctx
            .auth
            .lapse(&obs.device, Kind::Device, &obs.proof, now_secs())
            .is_none();
        let firmware = obs.firmware;
        let response = if firmware && still_valid {
            resources::notice_response(doc.clone())
        } else if doc.is_empty() {
            resources::diagnostic(stratus_coap::Code::NOT_FOUND, "the device was deleted")
        } else if !still_valid {
            resources::diagnostic(
                stratus_coap::Code::UNAUTHORIZED,
                "the observation's credentials are no longer valid",
            )
        } else {
            resources::config_response(doc.clone(), config_version(doc).unwrap_or(0))
        };
        let ending = !response.code.is_success();
        match self.ep.notify_observer(now, key.0, key.1, response) {
            Ok(()) => {
                self.ctx.broker.metrics.coap_notifications.inc();
            }
            Err(_) => {
                self.remove_observer(key.0, key.1);
                return;
            }
        }
        if ending {
            self.remove_observer(key.0, key.1);
        }
    }

    fn remove_observer(&mut self, peer: SocketAddr, token: Token) {
        if let Some(o) = self.observers.remove(&(peer, token)) {
            if let Some(set) = self.by_device.get_mut(&o.device) {
                set.remove(&(peer, token));
                if set.is_empty() {
                    self.by_device.remove(&o.device);
                }
            }
            self.ctx
                .broker
                .metrics
                .coap_observers
                .set(self.observers.len() as i64);
        }
    }

    /// Ends what a lapsed credential held (SPEC "Identities"): each observer whose device's
    /// token expired or was revoked, whose secret was rotated or who was deleted gets a final
    /// 4.01 notification; on CoAPS the device's DTLS session ends too (its key came from the
    /// old secret). Runs only when a credential changed somewhere or a token expired.
    fn check_credentials(&mut self, now: Instant) {
        let revision = self.ctx.auth.revision();
        let secs = now_secs();
        if revision == self.seen_revision && self.next_expiry >= secs {
            return;
        }
        self.seen_revision = revision;
        let mut lapsed = Vec::new();
        let mut next = u64::MAX;
        for (key, o) in &self.observers {
            match self.ctx.auth.lapse(&o.device, Kind::Device, &o.proof, secs) {
                Some(lapse) => lapsed.push((*key, lapse)),
                None => {
                    if let Some((_, exp)) = &o.proof.token {
                        next = next.min(*exp);
                    }
                }
            }
        }
        self.next_expiry = next;
        for ((peer, token), lapse) in lapsed {
            tracing::info!(%peer, why = lapse.describe(), "coap observation ended: its credential no longer holds");
            let response =
                resources::diagnostic(stratus_coap::Code::UNAUTHORIZED, lapse.describe());
            if self.ep.notify_observer(now, peer, token, response).is_ok() {
                self.ctx.broker.metrics.coap_notifications.inc();
            }
            self.remove_observer(peer, token);
        }
        self.pump(now);
        if let Mode::Dtls(d) = &mut self.mode {
            for peer in d.end_lapsed(secs) {
                self.forget_peer(peer);
            }
        }
    }

    /// A DTLS session ended: its observers go with it.
    fn forget_peer(&mut self, peer: SocketAddr) {
        let keys: Vec<_> = self
            .observers
            .keys()
            .filter(|k| k.0 == peer)
            .copied()
            .collect();
        for (p, t) in keys {
            self.ep.cancel_observer(p, t);
            self.remove_observer(p, t);
        }
        self.ep.set_verified(Instant::now(), peer, false);
    }

    /// Leaves the observer gauge as if this listener never existed.
    fn release_observers(&mut self) {
        let keys: Vec<_> = self.observers.keys().copied().collect();
        for (p, t) in keys {
            self.remove_observer(p, t);
        }
    }

    /// Mirrors the endpoint's counters into the metrics.
    fn sync_stats(&mut self) {
        let s = self.ep.stats().clone();
        let m = &self.ctx.broker.metrics;
        m.coap_bad_datagrams
            .inc_by(s.malformed.saturating_sub(self.last_stats.malformed));
        m.coap_duplicates
            .inc_by(s.duplicates.saturating_sub(self.last_stats.duplicates));
        if let Mode::Dtls(d) = &mut self.mode {
            let (bad, failed) = d.take_counts();
            m.coap_bad_datagrams.inc_by(bad);
            m.coap_dtls_handshake_failures.inc_by(failed);
        }
        self.last_stats = s;
    }

    /// Schedules a multicast answer after a random Leisure (RFC 7252 §8.2).
    fn respond_after_leisure(&mut self, now: Instant, exchange: ExchangeId, response: Response) {
        let max = self.ctx.config.multicast_leisure_ms;
        let delay = if max == 0 {
            0
        } else {
            rand::rng().random_range(0..=max)
        };
        self.leisure_seq += 1;
        self.leisure.insert(
            (now + Duration::from_millis(delay), self.leisure_seq),
            (exchange, response),
        );
    }
}

/// The desired-config version in a config document.
fn config_version(doc: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Doc {
        version: u64,
    }
    serde_json::from_slice::<Doc>(doc).ok().map(|d| d.version)
}

/// Whether a datagram may answer a multicast request: not a RST, not a 4.xx/5.xx.
fn multicast_may_send(data: &[u8]) -> bool {
    match data {
        [first, code, ..] => {
            let rst = (first >> 4) & 3 == 3;
            let class = code >> 5;
            !rst && class != 4 && class != 5
        }
        _ => false,
    }
}

/// One store read of `device`'s observable document finished: counts it off the reads in flight
/// and returns the newest document published while it ran, if any.
fn finish_read(reads: &mut HashMap<String, (usize, Option<Bytes>)>, device: &str) -> Option<Bytes> {
    let (n, newest) = reads.get_mut(device)?;
    *n -= 1;
    let fresher = newest.clone();
    if *n == 0 {
        reads.remove(device);
    }
    fresher
}

#[cfg(test)]
mod tests;
