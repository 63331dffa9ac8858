//! One MQTT connection of the generator: a TCP stream, a large receive buffer split into
//! frames in place, a transmit buffer, and the CONNECT/SUBSCRIBE handshakes.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use bytes::BytesMut;
use stratus_mqtt::{
    decode, encode, MqttStr, Packet, ProtocolVersion, QoS, ReasonCode, SubAck, Subscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wire::{next_frame, Frame, Malformed};

/// Keep-alive the generator announces: long enough that nobody pings during a scenario
/// (rumqttd refuses 0).
pub const KEEP_ALIVE_SECS: u16 = 3600;

/// Receive buffer of a busy connection: one read takes thousands of small PUBLISH packets.
pub const BIG_RX: usize = 256 * 1024;

/// Receive buffer of a connection that only reads acknowledgements.
pub const SMALL_RX: usize = 4 * 1024;

/// Largest packet the generator accepts from a broker.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// Bytes received and not yet consumed; frames are split off in place, and what is left of
/// a partial frame moves to the front before the next read.
#[derive(Debug)]
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    /// A buffer of `capacity` bytes (it grows only for a packet larger than that).
    pub fn new(capacity: usize) -> RecvBuf {
        RecvBuf {
            buf: vec![0; capacity.max(16)],
            start: 0,
            end: 0,
        }
    }

    /// The unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads once from `stream` into the free space; 0 means end of stream.
    pub async fn read_from(&mut self, stream: &mut TcpStream) -> anyhow::Result<usize> {
        let n = stream.read(self.room()?).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads once from a blocking `stream`; 0 means end of stream. A read timeout shows as
    /// an `io::Error` of kind `WouldBlock` or `TimedOut`.
    pub fn read_blocking(&mut self, stream: &mut std::net::TcpStream) -> std::io::Result<usize> {
        use std::io::Read;
        let room = self.room().map_err(std::io::Error::other)?;
        let n = stream.read(room)?;
        self.end += n;
        Ok(n)
    }

    /// The free space after the unconsumed bytes: compacted, or grown for a large packet.
    fn room(&mut self) -> anyhow::Result<&mut [u8]> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_PACKET {
                let grown = (self.buf.len() * 2).min(MAX_PACKET);
                self.buf.resize(grown, 0);
            } else {
                bail!("the broker sent a packet larger than {MAX_PACKET} bytes");
            }
        }
        Ok(&mut self.buf[self.end..])
    }

    /// Calls `f` on every whole frame received so far, consuming each one `f` accepts.
    pub fn frames<E: From<Malformed>>(
        &mut self,
        mut f: impl FnMut(Frame<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(frame) = next_frame(&self.buf[self.start..self.end])? {
            let len = frame.raw.len();
            f(frame)?;
            self.start += len;
        }
        Ok(())
    }
}

/// A connected MQTT client.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    /// Received bytes.
    pub rx: RecvBuf,
    /// Bytes to send at the next [`flush`](Client::flush).
    pub tx: Vec<u8>,
}

impl Client {
    /// Connects over TCP, sends CONNECT (clean session, [`KEEP_ALIVE_SECS`]) and waits for an
    /// accepting CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        rx_capacity: usize,
    ) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut client = Client {
            stream,
            rx: RecvBuf::new(rx_capacity),
            tx: Vec::with_capacity(256),
        };
        client.tx.extend_from_slice(&connect_packet(client_id)?);
        client.flush().await?;
        match client.next_control_packet().await? {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok(client),
            Packet::ConnAck(ack) => bail!("the broker refused {client_id}: {}", ack.reason),
            other => bail!("expected CONNACK, got {}", other.name()),
        }
    }

    /// Reads once into the receive buffer; 0 means the broker closed the connection.
    pub async fn read(&mut self) -> anyhow::Result<usize> {
        self.rx.read_from(&mut self.stream).await
    }

    /// Sends and clears the transmit buffer.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.tx.is_empty() {
            self.stream.write_all(&self.tx).await?;
            self.tx.clear();
        }
        Ok(())
    }

    /// Writes `bytes` directly (the QoS 0 burst path, which does not use `tx`).
    pub async fn write_all(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends SUBSCRIBE and waits for its SUBACK; fails when the broker refuses.
    /// Only for a subscriber that expects nothing else before the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> anyhow::Result<()> {
        self.tx.extend_from_slice(&subscribe_packet(filter, qos)?);
        self.flush().await?;
        match self.next_control_packet().await? {
            Packet::SubAck(ack) => check_suback(&ack, filter),
            other => bail!("expected SUBACK, got {}", other.name()),
        }
    }

    /// The same connection on a blocking socket, for an OS thread of its own (see
    /// [`BlockingClient`]). Must be called within the runtime that registered the socket.
    pub fn into_blocking(self) -> anyhow::Result<BlockingClient> {
        let stream = self.stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(BlockingClient {
            stream,
            rx: self.rx,
            tx: self.tx,
        })
    }

    /// Sends DISCONNECT and closes, ignoring errors (the scenario is over).
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xE0, 0]).await;
        let _ = self.stream.shutdown().await;
    }

    /// Reads until one whole packet is there and decodes it with the codec.
    async fn next_control_packet(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(frame) = next_frame(self.rx.data())? {
                let len = frame.raw.len();
                let mut bytes = BytesMut::from(frame.raw);
                let packet = decode(&mut bytes, usize::MAX, ProtocolVersion::V311)?
                    .context("the codec found no packet where the scanner found one")?;
                self.rx.start += len;
                return Ok(packet);
            }
            if self.read().await? == 0 {
                bail!("the broker closed the connection during the handshake");
            }
        }
    }
}

/// A connected client on a blocking socket, driven by an OS thread of its own: nothing but
/// the kernel stands between the socket and the clock, so a latency sample carries no
/// scheduler delay of the generator's runtime.
#[derive(Debug)]
pub struct BlockingClient {
    /// The socket, in blocking mode.
    pub stream: std::net::TcpStream,
    /// Received bytes.
    pub rx: RecvBuf,
    /// Bytes to send.
    pub tx: Vec<u8>,
}

impl BlockingClient {
    /// Sends DISCONNECT and closes, ignoring errors (the scenario is over).
    pub fn disconnect(mut self) {
        use std::io::Write;
        let _ = self.stream.write_all(&[0xE0, 0]);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Fails unless the SUBACK granted the subscription.
pub fn check_suback(ack: &SubAck, filter: &str) -> anyhow::Result<()> {
    match ack.reason_codes.first() {
        Some(code) if code.granted_qos().is_some() => Ok(()),
        _ => bail!("the broker refused the subscription to {filter}"),
    }
}

/// Decodes a whole frame with the codec (control packets only).
pub fn decode_frame(frame: &Frame<'_>) -> anyhow::Result<Packet> {
    let mut bytes = BytesMut::from(frame.raw);
    decode(&mut bytes, usize::MAX, ProtocolVersion::V311)?.context("incomplete frame")
}

/// CONNECT for MQTT 3.1.1, clean session, no credentials.
pub fn connect_packet(client_id: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = BytesMut::new();
    encode(
        &Packet::Connect(stratus_mqtt::Connect {
            protocol: ProtocolVersion::V311,
            clean_session: true,
            keep_alive: KEEP_ALIVE_SECS,
            client_id: MqttStr::try_from(client_id)?,
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        }),
        ProtocolVersion::V311,
        &mut out,
    )?;
    Ok(out.to_vec())
}

/// SUBSCRIBE (packet id 1) to one filter.
pub fn subscribe_packet(filter: &str, qos: QoS) -> anyhow::Result<Vec<u8>> {
    let mut out = BytesMut::new();
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(MqttStr::try_from(filter)?, qos.into())],
            properties: Default::default(),
        }),
        ProtocolVersion::V311,
        &mut out,
    )?;
    Ok(out.to_vec())
}

/// Opens a connection and completes CONNECT/CONNACK with no buffers beyond a few bytes: the
/// idle scenario holds thousands of these.
pub async fn connect_idle(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect_packet(client_id)?).await?;
    let mut ack = [0u8; 4];
    stream
        .read_exact(&mut ack)
        .await
        .with_context(|| format!("waiting for the CONNACK of {client_id}"))?;
    let mut bytes = BytesMut::from(&ack[..]);
    match decode(&mut bytes, usize::MAX, ProtocolVersion::V311)? {
        Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success => Ok(stream),
        Some(Packet::ConnAck(a)) => bail!("the broker refused {client_id}: {}", a.reason),
        _ => bail!("expected CONNACK for {client_id}"),
    }
}
