//! CoAPS for the device: a DTLS 1.2 PSK client (RFC 7252 §9.1.3.1) under the CoAP client,
//! OpenSSL over an in-memory datagram queue, as the server does it
//! (`stratus_server::coap::dtls`): the CoAP task owns the UDP socket and moves whole
//! datagrams in and out of the session.
//!
//! The identity is the device id and the key is computed from the device secret by
//! [`stratus_coap::psk::device_psk`], the function the server uses when it stores the key.
//!
//! Handshake flights are retransmitted by OpenSSL itself: its DTLS timer (1 s, doubling) is
//! checked whenever the handshake is driven, so the CoAP task drives it every
//! [`TICK`] while it waits, and gives up after [`HANDSHAKE_TIMEOUT`]. A fatal alert from the
//! server (an unknown identity, a device without a stored key) ends the handshake at once as
//! refused. A wrong key cannot be told so fast: the server cannot decrypt our Finished and,
//! as DTLS wants (RFC 6347 §4.1.2.7), drops it silently; a handshake in which the server
//! answered our hello but never our Finished is therefore reported as refused too.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use openssl::error::ErrorStack;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// How often a waiting handshake is driven (OpenSSL retransmits when its timer expired).
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// The longest a handshake may take (OpenSSL's 1 + 2 + 4 + 8 s of retransmissions).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(16);
/// Largest DTLS record this client writes.
const MTU: u32 = 1400;
/// The suites the server offers; `TLS_PSK_WITH_AES_128_CCM_8` is the one RFC 7252 mandates.
const CIPHERS: &str =
    "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-CBC-SHA256";

/// Datagrams in and out of the `SslStream`: every read returns one whole datagram, every
/// write is one datagram.
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

/// Why a handshake did not complete.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The server refused the credentials (or the handshake failed otherwise for good).
    Refused(String),
    /// No answer in time, or the socket failed.
    Unreachable(String),
}

/// The DTLS client of one device: its context and, once established, its session.
pub(crate) struct DtlsClient {
    context: SslContext,
    session: Option<SslStream<Datagrams>>,
    buf: Vec<u8>,
}

impl DtlsClient {
    /// A client with PSK identity `identity` and key `psk`.
    pub(crate) fn new(identity: &str, psk: &str) -> Result<DtlsClient, ErrorStack> {
        let mut b = SslContext::builder(SslMethod::dtls_client())?;
        b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        b.set_cipher_list(CIPHERS)?;
        b.set_verify(SslVerifyMode::NONE);
        b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        let identity = identity.as_bytes().to_vec();
        let psk = psk.as_bytes().to_vec();
        b.set_psk_client_callback(move |_ssl, _hint, identity_out, psk_out| {
            // The identity is written as a C string.
            if identity.len() >= identity_out.len() || psk.len() > psk_out.len() {
                return Err(ErrorStack::get());
            }
            identity_out[..identity.len()].copy_from_slice(&identity);
            identity_out[identity.len()] = 0;
            psk_out[..psk.len()].copy_from_slice(&psk);
            Ok(psk.len())
        });
        Ok(DtlsClient {
            context: b.build(),
            session: None,
            buf: vec![0u8; 65_535],
        })
    }

    /// Whether a session is established.
    pub(crate) fn is_established(&self) -> bool {
        self.session.is_some()
    }

    /// Forgets the session (the next request handshakes again).
    pub(crate) fn reset(&mut self) {
        self.session = None;
    }

    /// Runs a handshake with `peer` over `socket`, replacing any session.
    pub(crate) async fn handshake(
        &mut self,
        socket: &UdpSocket,
        peer: SocketAddr,
    ) -> Result<(), HandshakeError> {
        self.session = None;
        let setup = |ctx: &SslContext| -> Result<SslStream<Datagrams>, ErrorStack> {
            let mut ssl = Ssl::new(ctx)?;
            ssl.set_mtu(MTU)?;
            SslStream::new(ssl, Datagrams::default())
        };
        let mut stream = setup(&self.context)
            .map_err(|e| HandshakeError::Refused(format!("DTLS setup: {e}")))?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        // Flights heard from the server: HelloVerifyRequest, then ServerHello…ServerHelloDone.
        let mut heard = 0usize;
        loop {
            let step = stream.connect();
            for d in stream.get_mut().outgoing.drain(..) {
                socket
                    .send_to(&d, peer)
                    .await
                    .map_err(|e| HandshakeError::Unreachable(format!("send: {e}")))?;
            }
            match step {
                Ok(()) => break,
                Err(e) if is_retry(e.code()) => {}
                Err(e) => {
                    return Err(HandshakeError::Refused(format!(
                        "DTLS handshake refused: {e}"
                    )))
                }
            }
            if Instant::now() >= deadline {
                if heard >= 2 {
                    return Err(HandshakeError::Refused(format!(
                        "{peer} answered the DTLS hello but not the Finished: the PSK (the \
                         device secret) is probably wrong"
                    )));
                }
                return Err(HandshakeError::Unreachable(format!(
                    "no DTLS handshake with {peer} within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )));
            }
            // Wait for the server's flight; on a tick, drive the handshake again so OpenSSL
            // retransmits ours when its timer expired.
            let tick = Instant::now() + TICK;
            while let Ok(received) =
                tokio::time::timeout_at(tick, socket.recv_from(&mut self.buf)).await
            {
                match received {
                    Ok((n, from)) if from == peer => {
                        stream.get_mut().incoming.push_back(self.buf[..n].to_vec());
                        heard += 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(HandshakeError::Unreachable(format!("receive: {e}")));
                    }
                }
            }
        }
        self.session = Some(stream);
        Ok(())
    }

    /// Encrypts one CoAP datagram; the records to send.
    pub(crate) fn seal(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let Some(s) = &mut self.session else {
            return Vec::new();
        };
        if let Err(e) = s.ssl_write(data) {
            tracing::debug!(error = %e, "coaps: cannot encrypt a datagram");
        }
        std::mem::take(&mut s.get_mut().outgoing)
    }

    /// Decrypts one received datagram: the CoAP datagrams in it, and records to send back (a
    /// retransmitted server Finished is answered by OpenSSL). A closed or broken session is
    /// forgotten.
    pub(crate) fn open(&mut self, datagram: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let Some(s) = &mut self.session else {
            return (Vec::new(), Vec::new());
        };
        s.get_mut().incoming.push_back(datagram.to_vec());
        let mut plain = Vec::new();
        let mut ended = false;
        loop {
            match s.ssl_read(&mut self.buf) {
                Ok(n) => plain.push(self.buf[..n].to_vec()),
                Err(e) if is_retry(e.code()) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "coaps: the session ended");
                    ended = true;
                    break;
                }
            }
        }
        let replies = std::mem::take(&mut s.get_mut().outgoing);
        if ended {
            self.session = None;
        }
        (plain, replies)
    }
}

fn is_retry(code: ErrorCode) -> bool {
    code == ErrorCode::WANT_READ || code == ErrorCode::WANT_WRITE
}
