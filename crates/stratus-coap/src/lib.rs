//! # stratus-coap
//!
//! CoAP for Stratus as plain state: the RFC 7252 message [`codec`], typed [`option`]s and
//! [`Code`]s, and the [`Endpoint`] — the message layer of one local UDP socket with
//! deduplication, retransmission, piggybacked and separate responses, Observe (RFC 7641),
//! Block-wise transfers (RFC 7959) and an amplification guard — as a sans-IO state machine,
//! plus the CoRE [`link_format`] (RFC 6690) for `/.well-known/core`, and the derivation of a
//! device's CoAPS pre-shared key from its secret ([`psk`]).
//!
//! ## Sans-IO
//! Nothing here opens a socket, reads a clock or draws entropy from the OS. The server crate
//! owns the socket and the timer and drives one [`Endpoint`] per local socket, in the manner of
//! `quinn-proto`:
//!
//! 1. every received datagram goes in with [`Endpoint::handle_datagram`]`(now, peer, bytes)`;
//! 2. the server drains [`Endpoint::poll_transmit`] (datagrams to send, with their
//!    destination) and [`Endpoint::poll_event`] ([`Event::Request`]s to route to resource
//!    handlers, failures, observer cancellations);
//! 3. it answers each request with [`Endpoint::respond`] (now or later; a slow handler may
//!    first call [`Endpoint::defer`]) and pushes resource changes with [`Endpoint::notify`];
//! 4. it sleeps until [`Endpoint::poll_timeout`] and then calls [`Endpoint::handle_timeout`],
//!    which retransmits CONs with exponential back-off, sends the empty ACKs of separate
//!    responses and expires exchanges, Block-wise state and caches;
//! 5. after each of these calls it drains transmits and events again.
//!
//! Time is always an `Instant` argument and randomness comes from a seed given to
//! [`Endpoint::new`], so every rule — retransmission timing, deduplication lifetimes,
//! Observe's CON-every-N, Block-wise expiry — is tested datagram by datagram on virtual time,
//! and a fuzzer can drive the endpoint deterministically. The [`endpoint`] module docs describe
//! the behaviour in detail (deduplication, Block2 body cache, Observe registration).
//!
//! ## Input is hostile
//! No input makes this crate panic: the decoder names each malformed case ([`DecodeError`]),
//! a malformed CON is answered with RST (§4.2), other malformed messages and other versions
//! are ignored (§4.3), unrecognized critical options get 4.02, and every table has a bound in
//! [`Config`] with eviction. [`Stats`] counts what happened, for metrics.
//!
//! ## Dependencies
//! - `bytes`: datagrams decode zero-copy (option values and payloads share the received
//!   buffer), and a cached reply or Block2 body is shared by every retransmission and block
//!   without copying.
//! - `rand`: a seeded `StdRng` (ChaCha) for message IDs, unguessable tokens (§5.3.1) and the
//!   `ACK_RANDOM_FACTOR` jitter; seeded by the caller, so tests are deterministic.
//! - `thiserror`: error enums that name the rule that was broken.
//! - `sha2`, `base64`: the CoAPS pre-shared key of a device ([`psk`]), an HMAC-SHA256 of its
//!   secret in base64url, computed here so that the server and the device SDK share one
//!   definition (both already depend on this crate; both already link these two crates).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod code;
pub mod codec;
pub mod config;
pub mod content_format;
pub mod endpoint;
pub mod link_format;
pub mod message;
pub mod observe;
pub mod option;
pub mod psk;
mod timer;

pub use code::{Code, CodeKind};
pub use codec::{decode, decode_bytes, encode, encode_into, DecodeError, EncodeError, Header};
pub use config::{Config, ConfigError};
pub use content_format::ContentFormat;
pub use endpoint::{
    CancelReason, Endpoint, Event, ExchangeId, FailureReason, NotifyError, ObserverInfo, RequestId,
    RespondError, SendError, Stats, Transmit,
};
pub use link_format::LinkResource;
pub use message::{Message, MessageId, MessageType, Request, Response, Token};
pub use option::{BlockOption, CoapOption, OptionError, OptionNumber, Options};
