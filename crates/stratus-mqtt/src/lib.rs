//! # stratus-mqtt
//!
//! MQTT for Stratus as plain state: a zero-copy packet [`codec`] for MQTT 3.1, 3.1.1 and 5.0
//! (with typed 5.0 [`properties`] and [`ReasonCode`]s), topic validation and
//! matching ([`topic`]), the [`SubscriptionTree`] and [`RetainedStore`] that route messages,
//! the per-client [`Session`], and the broker side of one connection as a sans-IO state
//! machine ([`Connection`]).
//!
//! Nothing here does I/O or knows of an async runtime: the server crate owns sockets, timers
//! and threads, and drives these types with bytes, instants and messages. That keeps every
//! protocol rule testable packet by packet on virtual time, and lets fuzzers hit the decoder
//! directly.
//!
//! ## Dependencies
//! - `bytes`: reference-counted buffers, so a payload received once is shared by every
//!   subscriber's outbound packet without copying until the socket write.
//! - `thiserror`: error enums that name the rule a peer broke.
//! - `foldhash`: the hasher of the topic trees' per-level maps. Routing hashes every level of
//!   every topic; SipHash (std's default) was a twentieth of the instructions a message cost
//!   the broker. foldhash is seeded at random per map, which keeps the keys that clients
//!   choose (topic levels) from being aimed at one bucket without seeing hash values.

#![forbid(unsafe_op_in_unsafe_fn)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod connection;
pub mod message;
pub mod packet;
pub mod persist;
pub mod properties;
pub mod reason;
pub mod retained;
pub mod session;
pub mod topic;
pub mod tree;
pub mod types;

pub use codec::{decode, encode, DecodeError, EncodeError};
pub use connection::{
    CloseReason, Connection, Delivered, Delivery, Event, Limits, Qos0Encoder, SessionChange, Stats,
};
pub use message::Message;
pub use packet::*;
pub use properties::{
    AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PayloadFormat,
    PropertyId, PubAckProperties, PublishProperties, SubAckProperties, SubscribeProperties,
    UnsubAckProperties, UnsubscribeProperties, UserProperty, WillProperties,
};
pub use reason::ReasonCode;
pub use retained::{Replaced, RetainedStore};
pub use session::Session;
pub use tree::SubscriptionTree;
pub use types::{MqttStr, PacketId, ProtocolVersion, QoS, Utf8Error};
