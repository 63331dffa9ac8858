//! CoAPS: DTLS 1.2 with pre-shared keys (RFC 7252 §9.1.3.1), the record layer under the same
//! CoAP endpoint as plain UDP.
//!
//! ## Why OpenSSL
//! DTLS is not in rustls. The candidates were `webrtc-dtls` (pure Rust, async, with PSK
//! suites) and the `openssl` crate. OpenSSL won: it is the DTLS implementation libcoap itself
//! uses (so the interop partner every CoAP user has is the reference), it has served DTLS-PSK
//! for over a decade, and the `openssl` crate lets it run **sans-IO**: each session is an
//! `SslStream` over an in-memory datagram queue, so one task owns the UDP socket, every
//! session and the CoAP endpoint, exactly like the plain listener (no task, channel or lock
//! per peer, and no async DTLS stack with its own listener to demultiplex). `webrtc-dtls`
//! brings its own connection-per-task listener and a large dependency tree built for WebRTC
//! certificates. The cost is a C library at build time (`libssl-dev`, linked dynamically).
//!
//! ## Handshake
//! DTLS 1.2 only; cipher suites `TLS_PSK_WITH_AES_128_CCM_8` (the one RFC 7252 mandates),
//! `TLS_PSK_WITH_AES_128_CCM`, `TLS_PSK_WITH_AES_128_GCM_SHA256`,
//! `TLS_PSK_WITH_AES_256_GCM_SHA384`, `TLS_PSK_WITH_AES_128_CBC_SHA256`. The cookie exchange
//! (HelloVerifyRequest, RFC 6347 §4.2.1) runs before any state is kept for long, so a spoofed
//! source address gets one small datagram and no session; the peer is then address-verified
//! for the CoAP amplification guard. Sessions are bounded (`[coap] max_dtls_sessions`, least
//! recently used evicted); an unfinished handshake is dropped after 30 s, an idle session
//! after an hour. The server retransmits its own handshake flight (ServerHello…ServerHelloDone)
//! when the client's next flight does not come within the timer — 1 s, doubling up to 60 s
//! (RFC 6347 §4.2.4) — by resending the same datagrams; a retransmitted client flight also
//! makes OpenSSL resend its answer. The HelloVerifyRequest is never resent (the client
//! repeats its ClientHello), and the final flight is answered again on the client's
//! retransmitted Finished by OpenSSL.
//!
//! ## PSK identity and key
//! The identity is the **device id**; the key is derived from the device's secret, so the
//! device (and the SDK) computes it without asking anyone:
//!
//! `PSK = base64url_nopad(HMAC-SHA256(key = device secret (UTF-8), "stratus-coap-psk/v1:" ‖ device id))`
//!
//! used as the 43 ASCII bytes of the base64url text ([`stratus_coap::psk::device_psk`], the
//! one definition the server and the SDK share; `stratus device psk ID --secret S` prints
//! it). Text, because tools take PSKs as text (`coap-client -u ID -k PSK`, aiocoap's
//! `{"ascii": …}`).
//!
//! The server keeps only the argon2 hash of a secret, so it cannot compute the key at
//! handshake time. It computes it when it knows the secret in clear — at registration and at
//! secret rotation (HTTP API and `stratus device --data-dir`) — and stores it in the device
//! record sealed with AES-256-GCM under `DATA_DIR/coap-psk.key` ([`super::psk`]), so a
//! stolen database alone yields no key. The PSK callback opens the sealed key of the
//! identity from the in-memory principal directory (no store read in the handshake).
//! Consequences: rotating the secret replaces the PSK (the old one stops working at once);
//! deleting the device ends it; a device registered before keys were stored has no PSK until
//! its next rotation (`POST /api/v1/devices/{id}/secret`); losing `coap-psk.key` voids every
//! stored PSK (rotate the secrets to re-key).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use rand::RngCore;
use stratus_coap::psk::hmac_sha256;

use crate::auth::{Auth, Kind, Proof};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The first handshake retransmission timer (RFC 6347 §4.2.4.1).
const INITIAL_RESEND_EVERY: Duration = Duration::from_secs(1);
/// The longest handshake retransmission timer.
const MAX_RESEND_EVERY: Duration = Duration::from_secs(60);
/// Largest DTLS record payload this server writes (a CoAP datagram up to ~1.3 KB fits).
const MTU: u32 = 1400;
const CIPHERS: &str =
    "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CBC-SHA256";

/// Datagrams in and out of one session's `SslStream`: every read returns one whole datagram,
/// every write is one datagram.
#[derive(Default)]
struct Datagrams {
    incoming: VecDeque<Vec<u8>>,
    outgoing: Vec<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.incoming.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outgoing.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Session {
    stream: SslStream<Datagrams>,
    /// The device id, once the handshake is done.
    identity: Option<String>,
    /// The credential the device's key was derived from, at the handshake.
    proof: Option<Proof>,
    started: Instant,
    last_seen: Instant,
    /// The server's last handshake flight, resent until the client's next flight arrives.
    flight: Vec<Bytes>,
    /// When the flight is resent next (`None`: nothing to resend).
    resend_at: Option<Instant>,
    /// The current retransmission interval (1 s, doubling up to 60 s).
    resend_every: Duration,
}

/// The DTLS sessions of one CoAPS socket.
pub struct DtlsServer {
    auth: Arc<Auth>,
    context: SslContext,
    peer_index: Index<Ssl, SocketAddr>,
    sessions: HashMap<SocketAddr, Session>,
    max_sessions: usize,
    next_sweep: Option<Instant>,
    bad_records: u64,
    failed_handshakes: u64,
    /// The earliest `resend_at` of any session.
    next_resend: Option<Instant>,
    resent_flights: u64,
    /// Decryption buffer, reused for every record.
    buf: Vec<u8>,
}

impl DtlsServer {
    /// A DTLS-PSK server whose identities are the devices of `auth` with a stored PSK.
    pub fn new(auth: Arc<Auth>, max_sessions: usize) -> Result<DtlsServer, ErrorStack> {
        let auth_for_sessions = auth.clone();
        let peer_index = Ssl::new_ex_index::<SocketAddr>()?;
        let mut b = SslContext::builder(SslMethod::dtls_server())?;
        b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_cipher_list(CIPHERS)?;
        b.set_verify(SslVerifyMode::NONE);
        b.set_options(
            SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET,
        );
        let mut cookie_key = [0u8; 32];
        rand::rng().fill_bytes(&mut cookie_key);
        let cookie = move |ssl: &openssl::ssl::SslRef| -> [u8; 32] {
            let peer = ssl
                .ex_data(peer_index)
                .map(|p| p.to_string())
                .unwrap_or_default();
            hmac_sha256(&cookie_key, peer.as_bytes())
        };
        let gen = cookie;
        b.set_cookie_generate_cb(move |ssl, out| {
            let c = gen(ssl);
            let n = out.len().min(c.len());
            out[..n].copy_from_slice(&c[..n]);
            Ok(n)
        });
        b.set_cookie_verify_cb(move |ssl, got| {
            let c = cookie(ssl);
            // Constant time is moot here (the cookie is bound to the address), but cheap.
            got.len() == c.len() && got.iter().zip(c.iter()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
        });
        b.set_psk_server_callback(move |_ssl, identity, out| {
            let psk = identity
                .and_then(|i| std::str::from_utf8(i).ok())
                .and_then(|id| auth.coap_psk(id));
            let Some(psk) = psk else {
                tracing::info!(
                    identity = %String::from_utf8_lossy(identity.unwrap_or_default()),
                    "coaps: unknown PSK identity, or a device without a stored PSK"
                );
                return Err(ErrorStack::get());
            };
            let psk = psk.as_bytes();
            if out.len() < psk.len() {
                return Err(ErrorStack::get());
            }
            out[..psk.len()].copy_from_slice(psk);
            Ok(psk.len())
        });
        Ok(DtlsServer {
            auth: auth_for_sessions,
            context: b.build(),
            peer_index,
            sessions: HashMap::new(),
            max_sessions: max_sessions.max(1),
            next_sweep: None,
            bad_records: 0,
            failed_handshakes: 0,
            next_resend: None,
            resent_flights: 0,
            buf: vec![0u8; 65_535],
        })
    }

    /// The device id of `peer`'s established session.
    pub fn identity(&self, peer: SocketAddr) -> Option<&str> {
        self.sessions.get(&peer)?.identity.as_deref()
    }

    /// The device id of `peer`'s established session and the credential its key came from.
    pub fn proven(&self, peer: SocketAddr) -> Option<(&str, &Proof)> {
        let s = self.sessions.get(&peer)?;
        Some((s.identity.as_deref()?, s.proof.as_ref()?))
    }

    /// Ends the sessions whose device's credential no longer holds (its secret rotated, so
    /// its key changed; or it was deleted); returns their peers.
    pub fn end_lapsed(&mut self, now_secs: u64) -> Vec<SocketAddr> {
        let auth = &self.auth;
        let mut ended = Vec::new();
        self.sessions.retain(|peer, s| {
            let lapsed = match (&s.identity, &s.proof) {
                (Some(id), Some(proof)) => auth.lapse(id, Kind::Device, proof, now_secs).is_some(),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if lapsed {
                tracing::info!(%peer, device = s.identity.as_deref().unwrap_or(""), "coaps: session ended: the device's credential changed");
                ended.push(*peer);
            }
            !lapsed
        });
        ended
    }

    /// Sessions kept now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// (undecryptable or unexpected datagrams, failed handshakes) since the last call.
    pub fn take_counts(&mut self) -> (u64, u64) {
        let out = (self.bad_records, self.failed_handshakes);
        self.bad_records = 0;
        self.failed_handshakes = 0;
        out
    }

    /// When [`DtlsServer::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.next_sweep, self.next_resend) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Resends handshake flights whose timer expired (into `outgoing`), drops unfinished
    /// handshakes and idle sessions; returns the peers whose established sessions ended.
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        outgoing: &mut Vec<(SocketAddr, Bytes)>,
    ) -> Vec<SocketAddr> {
        if self.next_resend.is_some_and(|t| t <= now) {
            self.resend_due(now, outgoing);
        }
        if self.next_sweep.is_none_or(|t| t > now) {
            return Vec::new();
        }
        let mut ended = Vec::new();
        self.sessions.retain(|peer, s| {
            let keep = match s.identity {
                Some(_) => now.saturating_duration_since(s.last_seen) < IDLE_TIMEOUT,
                None => now.saturating_duration_since(s.started) < HANDSHAKE_TIMEOUT,
            };
            if !keep && s.identity.is_some() {
                ended.push(*peer);
            }
            keep
        });
        self.next_sweep = (!self.sessions.is_empty()).then(|| now + SWEEP_EVERY);
        ended
    }

    /// RFC 6347 §4.2.4: a flight not followed by the client's next one within the timer is
    /// sent again, with the timer doubled (up to [`MAX_RESEND_EVERY`]). The same datagrams
    /// are resent: the client drops a record it already has (replay window) and takes one it
    /// never received.
    fn resend_due(&mut self, now: Instant, outgoing: &mut Vec<(SocketAddr, Bytes)>) {
        let mut next: Option<Instant> = None;
        for (peer, s) in &mut self.sessions {
            let Some(at) = s.resend_at else {
                continue;
            };
            if s.identity.is_some() || s.flight.is_empty() {
                s.resend_at = None;
                continue;
            }
            if at <= now {
                for d in &s.flight {
                    outgoing.push((*peer, d.clone()));
                }
                self.resent_flights += 1;
                s.resend_every = (s.resend_every * 2).min(MAX_RESEND_EVERY);
                s.resend_at = Some(now + s.resend_every);
                tracing::debug!(%peer, every = ?s.resend_every, "coaps: handshake flight resent");
            }
            next = match (next, s.resend_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        self.next_resend = next;
    }

    /// Handshake flights resent since the server started.
    pub fn resent_flights(&self) -> u64 {
        self.resent_flights
    }

    /// One received datagram from `peer`: handshake progress goes to `outgoing`, decrypted
    /// CoAP datagrams to `plain`. Returns true when this completed `peer`'s handshake.
    pub fn on_datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        data: &[u8],
        plain: &mut Vec<Vec<u8>>,
        outgoing: &mut Vec<(SocketAddr, Bytes)>,
    ) -> bool {
        let hello = is_initial_client_hello(data);
        let fresh = match self.sessions.get(&peer) {
            Some(s) => hello && s.identity.is_some(),
            None => true,
        };
        if fresh {
            if !hello {
                // Not for a session we have (an old one, or noise).
                self.bad_records += 1;
                return false;
            }
            if self.sessions.remove(&peer).is_none() && self.sessions.len() >= self.max_sessions {
                self.evict_one();
            }
            match self.new_session(now, peer) {
                Ok(s) => {
                    self.sessions.insert(peer, s);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "coaps: cannot create a DTLS session");
                    return false;
                }
            }
            if self.next_sweep.is_none() {
                self.next_sweep = Some(now + SWEEP_EVERY);
            }
        }
        let Some(s) = self.sessions.get_mut(&peer) else {
            return false;
        };
        s.last_seen = now;
        s.stream.get_mut().incoming.push_back(data.to_vec());
        let mut established = false;
        let mut remove = false;
        if s.identity.is_none() {
            match s.stream.accept() {
                Ok(()) => {
                    let id = s
                        .stream
                        .ssl()
                        .psk_identity()
                        .map(|i| String::from_utf8_lossy(i).into_owned())
                        .unwrap_or_default();
                    tracing::debug!(%peer, device = %id, "coaps: session established");
                    s.proof = self.auth.device_proof(&id);
                    s.identity = Some(id);
                    established = true;
                }
                Err(e) if is_retry(e.code()) => {}
                Err(e) => {
                    tracing::info!(%peer, error = %e, "coaps: handshake failed");
                    self.failed_handshakes += 1;
                    remove = true;
                }
            }
        }
        if s.identity.is_some() {
            loop {
                match s.stream.ssl_read(&mut self.buf) {
                    Ok(n) => plain.push(self.buf[..n].to_vec()),
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                        // close_notify: the client ended the session.
                        let _ = s.stream.shutdown();
                        remove = true;
                        break;
                    }
                    Err(e) if is_retry(e.code()) => break,
                    Err(_) => {
                        self.bad_records += 1;
                        remove = true;
                        break;
                    }
                }
            }
        }
        let flight: Vec<Bytes> = s
            .stream
            .get_mut()
            .outgoing
            .drain(..)
            .map(Bytes::from)
            .collect();
        outgoing.extend(flight.iter().map(|d| (peer, d.clone())));
        if s.identity.is_some() {
            // The last flight is not timed: the client's retransmitted Finished makes
            // OpenSSL send it again.
            s.flight.clear();
            s.resend_at = None;
        } else if !flight.is_empty() && !is_hello_verify_request(&flight[0]) {
            // A HelloVerifyRequest is not resent (RFC 6347 §4.2.1: the server stays
            // stateless until the cookie comes back).
            s.flight = flight;
            s.resend_every = INITIAL_RESEND_EVERY;
            let at = now + INITIAL_RESEND_EVERY;
            s.resend_at = Some(at);
            self.next_resend = Some(self.next_resend.map_or(at, |t| t.min(at)));
        }
        if remove {
            self.sessions.remove(&peer);
        }
        established
    }

    /// Encrypts one CoAP datagram for `peer` (dropped without an established session).
    pub fn seal(&mut self, peer: SocketAddr, data: &[u8], outgoing: &mut Vec<(SocketAddr, Bytes)>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if s.identity.is_none() {
            return;
        }
        if let Err(e) = s.stream.ssl_write(data) {
            tracing::debug!(%peer, error = %e, "coaps: cannot encrypt a datagram");
        }
        for d in s.stream.get_mut().outgoing.drain(..) {
            outgoing.push((peer, Bytes::from(d)));
        }
    }

    fn new_session(&self, now: Instant, peer: SocketAddr) -> Result<Session, ErrorStack> {
        let mut ssl = Ssl::new(&self.context)?;
        ssl.set_ex_data(self.peer_index, peer);
        ssl.set_mtu(MTU)?;
        let stream = SslStream::new(ssl, Datagrams::default())?;
        Ok(Session {
            stream,
            identity: None,
            proof: None,
            started: now,
            last_seen: now,
            flight: Vec::new(),
            resend_at: None,
            resend_every: INITIAL_RESEND_EVERY,
        })
    }

    /// Evicts the least recently used session, preferring an unfinished handshake.
    fn evict_one(&mut self) {
        let victim = self
            .sessions
            .iter()
            .min_by_key(|(_, s)| (s.identity.is_some(), s.last_seen))
            .map(|(p, _)| *p);
        if let Some(p) = victim {
            self.sessions.remove(&p);
        }
    }
}

fn is_retry(code: ErrorCode) -> bool {
    code == ErrorCode::WANT_READ || code == ErrorCode::WANT_WRITE
}

/// Whether `data` starts with a DTLS handshake record holding a HelloVerifyRequest.
fn is_hello_verify_request(data: &[u8]) -> bool {
    data.len() > 13 && data[0] == 22 && data[13] == 3
}

/// Whether `data` starts with a DTLS record holding the first ClientHello of a handshake
/// (content type 22, epoch 0, handshake type 1, message_seq 0).
fn is_initial_client_hello(data: &[u8]) -> bool {
    data.len() > 18
        && data[0] == 22
        && data[3] == 0
        && data[4] == 0
        && data[13] == 1
        && data[17] == 0
        && data[18] == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_detection() {
        let mut hello = vec![0u8; 40];
        hello[0] = 22;
        hello[13] = 1;
        assert!(is_initial_client_hello(&hello));
        hello[18] = 1; // message_seq 1: the hello after HelloVerifyRequest
        assert!(!is_initial_client_hello(&hello));
        assert!(!is_initial_client_hello(&[22, 254, 253]));
    }

    /// A DTLS client over in-memory datagrams (what the device SDK does over a socket).
    fn client(id: &str, psk: &str) -> SslStream<Datagrams> {
        let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
        b.set_max_proto_version(Some(SslVersion::DTLS1_2)).unwrap();
        b.set_cipher_list(CIPHERS).unwrap();
        b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        let (id, psk) = (id.as_bytes().to_vec(), psk.as_bytes().to_vec());
        b.set_psk_client_callback(move |_, _, id_out, psk_out| {
            id_out[..id.len()].copy_from_slice(&id);
            id_out[id.len()] = 0;
            psk_out[..psk.len()].copy_from_slice(&psk);
            Ok(psk.len())
        });
        let mut ssl = Ssl::new(&b.build()).unwrap();
        ssl.set_mtu(MTU).unwrap();
        SslStream::new(ssl, Datagrams::default()).unwrap()
    }

    /// Drives the client one step; the datagrams it wants sent, and whether it is done.
    fn step(c: &mut SslStream<Datagrams>) -> (Vec<Vec<u8>>, bool) {
        let done = match c.connect() {
            Ok(()) => true,
            Err(e) if is_retry(e.code()) => false,
            Err(e) => panic!("client handshake failed: {e}"),
        };
        (std::mem::take(&mut c.get_mut().outgoing), done)
    }

    /// RFC 6347 §4.2.4: the server's ServerHello flight is lost once and the client's own
    /// retransmissions are lost too; only the server's timer can complete the handshake — and
    /// does, 1 s later (virtual time), then after 2 s more for a second loss.
    #[tokio::test]
    async fn the_server_resends_a_lost_flight_on_its_timer() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            stratus_store::StoreHandle::open_sqlite(&dir.path().join("stratus.db")).unwrap();
        let auth = Arc::new(Auth::open(store, dir.path()).await.unwrap());
        let sealed = auth.psk_sealer().seal_for_secret("dev-1", "s3cret");
        auth.register_device("dev-1", "$argon2id$unused", sealed);
        let mut server = DtlsServer::new(auth, 8).unwrap();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let psk = stratus_coap::psk::device_psk("s3cret", "dev-1");
        let mut c = client("dev-1", &psk);
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut plain = Vec::new();

        // ClientHello → HelloVerifyRequest (never resent).
        let (hello, _) = step(&mut c);
        for d in &hello {
            server.on_datagram(t0, peer, d, &mut plain, &mut out);
        }
        assert_eq!(out.len(), 1);
        assert!(is_hello_verify_request(&out[0].1));
        c.get_mut().incoming.push_back(out.remove(0).1.to_vec());
        // ClientHello with the cookie → ServerHello…ServerHelloDone, lost.
        let (hello2, _) = step(&mut c);
        for d in &hello2 {
            server.on_datagram(t0, peer, d, &mut plain, &mut out);
        }
        assert!(!out.is_empty());
        out.clear();
        let first_resend = server.poll_timeout().unwrap();
        assert_eq!(first_resend, t0 + Duration::from_secs(1));
        // Nothing before the timer.
        assert!(server
            .handle_timeout(t0 + Duration::from_millis(900), &mut out)
            .is_empty());
        assert!(out.is_empty());
        // At 1 s the same flight goes out again; lost again. The next is 2 s later.
        server.handle_timeout(t0 + Duration::from_secs(1), &mut out);
        assert!(!out.is_empty());
        out.clear();
        assert_eq!(server.poll_timeout(), Some(t0 + Duration::from_secs(3)));
        // At 3 s it goes out again and this time arrives.
        server.handle_timeout(t0 + Duration::from_secs(3), &mut out);
        assert_eq!(server.resent_flights(), 2);
        for (to, d) in out.drain(..) {
            assert_eq!(to, peer);
            c.get_mut().incoming.push_back(d.to_vec());
        }
        // The client finishes: ClientKeyExchange, ChangeCipherSpec, Finished → the server's
        // Finished; both sides are established and nothing is timed any more.
        let mut done = false;
        let mut established = false;
        for _ in 0..10 {
            let (to_server, finished) = step(&mut c);
            for d in &to_server {
                established |=
                    server.on_datagram(t0 + Duration::from_secs(3), peer, d, &mut plain, &mut out);
            }
            for (_, d) in out.drain(..) {
                c.get_mut().incoming.push_back(d.to_vec());
            }
            if finished {
                done = true;
                break;
            }
        }
        assert!(done && established);
        assert_eq!(server.identity(peer), Some("dev-1"));
        // The stale timer (3 s + 4 s) finds nothing to resend and goes away.
        assert_eq!(server.next_resend, Some(t0 + Duration::from_secs(7)));
        server.handle_timeout(t0 + Duration::from_secs(7), &mut out);
        assert!(out.is_empty(), "nothing is resent after the handshake");
        assert_eq!(server.next_resend, None);
        // Application data flows.
        c.ssl_write(b"coap").unwrap();
        for d in std::mem::take(&mut c.get_mut().outgoing) {
            server.on_datagram(t0 + Duration::from_secs(7), peer, &d, &mut plain, &mut out);
        }
        assert_eq!(plain, vec![b"coap".to_vec()]);
    }
}
