//! Byte transports under an MQTT connection: plain TCP, any `AsyncRead`/`AsyncWrite` stream
//! (TLS), and WebSocket binary frames — each as a reader and a writer half whose futures are
//! cancel-safe, so the connection task can wait on both in one `select!`.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// Bytes read from a transport per wake-up at most.
pub const READ_CHUNK: usize = 16 * 1024;

/// The receiving half of a transport.
pub trait MqttRead: Send {
    /// Waits for input and appends it to `buf`; `Ok(0)` means the peer closed. Cancel-safe:
    /// when the future is dropped before completing, nothing was read.
    fn read_into(&mut self, buf: &mut BytesMut) -> impl Future<Output = io::Result<usize>> + Send;
}

/// The sending half of a transport.
pub trait MqttWrite: Send {
    /// Writes some of `data`, returning how much. Cancel-safe: when the future is dropped
    /// before completing, nothing was written.
    fn write_some(&mut self, data: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Pushes out anything the transport buffers itself (TLS records).
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the sending direction after the last bytes.
    fn close(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Whether written bytes may wait in the transport until [`flush`](Self::flush) (TLS
    /// records, WebSocket frames). Plain TCP hands them to the kernel as it writes.
    const BUFFERS: bool = true;

    /// Writes some of `data` at once if the transport can without waiting, else fails with
    /// `WouldBlock` (the default: only plain TCP can).
    fn try_write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        let _ = data;
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// The socket, when publishers may write to it directly (plain TCP only).
    fn shared_socket(&self) -> Option<&Arc<OwnedWriteHalf>> {
        None
    }
}

/// The first read reservation of a TCP connection; it doubles up to [`READ_CHUNK`] while reads
/// fill it. Most connections only ever send a CONNECT, a SUBSCRIBE and pings: a 16 KiB buffer
/// for those, freed at once, still left malloc fragmentation worth ~2 KiB per idle connection.
pub const FIRST_READ: usize = 1024;

/// Plain TCP, reading only when the socket is readable so an idle connection holds no buffer.
pub struct TcpReader {
    half: OwnedReadHalf,
    /// How much to reserve for the next read.
    chunk: usize,
}

impl TcpReader {
    /// The reading half of a TCP connection.
    pub fn new(half: OwnedReadHalf) -> Self {
        TcpReader {
            half,
            chunk: FIRST_READ,
        }
    }

    /// The socket half back, to park an idle connection.
    pub fn into_half(self) -> OwnedReadHalf {
        self.half
    }
}

impl MqttRead for TcpReader {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            // Waits through the socket's one reader waker, not a `readable()` future: that
            // joins and leaves a waiter list (two locks) at every turn of the busy loop.
            let stream = self.half.as_ref();
            std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
            buf.reserve(self.chunk);
            let room = buf.capacity() - buf.len();
            let stream = self.half.as_ref();
            let mut short = None;
            // A read that did not fill the room drained the socket: tell tokio so (the
            // WouldBlock below clears the readiness, unless an event came since), which saves
            // the recv that would only learn it — one syscall per read for a connection that
            // sends a packet at a time.
            let read = stream.try_io(Interest::READABLE, || match stream.try_read_buf(buf) {
                Ok(n) if n > 0 && n < room => {
                    short = Some(n);
                    Err(io::ErrorKind::WouldBlock.into())
                }
                other => other,
            });
            match (read, short) {
                (_, Some(n)) => return Ok(n),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing came after all: a connection that never got busy waits without
                    // holding the reservation (a busy one keeps its buffer: freeing and
                    // reserving it at every drained socket cost a tenth of fan-in throughput).
                    if buf.is_empty() && self.chunk == FIRST_READ {
                        *buf = BytesMut::new();
                    }
                    continue;
                }
                (Ok(n), None) if n == room && self.chunk < READ_CHUNK => {
                    // A busy connection: read in bigger bites from now on.
                    self.chunk = (self.chunk * 2).min(READ_CHUNK);
                    return Ok(n);
                }
                (other, None) => return other,
            }
        }
    }
}

/// Plain TCP, writing half. Shared: while the connection waits with nothing to send, the
/// broker's express lane (`broker::Express`) lets publishers write QoS 0 deliveries to it.
/// Writes take `&self` (readiness, then `try_write`), so sharing needs no lock of its own;
/// the lane is open only while this side does not write.
pub struct TcpWriter(pub Arc<OwnedWriteHalf>);

impl TcpWriter {
    /// The writing half of a TCP connection.
    pub fn new(half: OwnedWriteHalf) -> Self {
        TcpWriter(Arc::new(half))
    }

    /// The half back, once no express lane holds it.
    pub fn into_half(self) -> Result<OwnedWriteHalf, Arc<OwnedWriteHalf>> {
        Arc::try_unwrap(self.0)
    }
}

impl MqttWrite for TcpWriter {
    async fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            let stream: &tokio::net::TcpStream = (*self.0).as_ref();
            std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await?;
            match self.0.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return written,
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    const BUFFERS: bool = false;

    fn try_write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.try_write(data)
    }

    fn shared_socket(&self) -> Option<&Arc<OwnedWriteHalf>> {
        Some(&self.0)
    }

    async fn close(&mut self) -> io::Result<()> {
        match Arc::get_mut(&mut self.0) {
            Some(half) => half.shutdown().await,
            // A lane still holds it (never when the connection closes): the last holder's drop
            // shuts the direction down.
            None => Ok(()),
        }
    }
}

/// Any tokio stream half (used for TLS). Holds a read buffer while waiting.
pub struct StreamReader<R>(pub R);

impl<R: AsyncRead + Unpin + Send> MqttRead for StreamReader<R> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        buf.reserve(READ_CHUNK);
        self.0.read_buf(buf).await
    }
}

/// Any tokio stream half (used for TLS).
pub struct StreamWriter<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> MqttWrite for StreamWriter<W> {
    async fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.write(data).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.0.flush().await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

/// Incoming MQTT bytes carried in WebSocket binary messages (fed by the WebSocket task).
pub struct ChannelReader(pub mpsc::Receiver<Bytes>);

impl MqttRead for ChannelReader {
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            match self.0.recv().await {
                Some(data) if data.is_empty() => continue,
                Some(data) => {
                    buf.extend_from_slice(&data);
                    return Ok(data.len());
                }
                None => return Ok(0),
            }
        }
    }
}

/// Outgoing MQTT bytes handed to the WebSocket task, which sends them as binary messages.
pub struct ChannelWriter(pub mpsc::Sender<Bytes>);

impl MqttWrite for ChannelWriter {
    async fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        // `reserve` is cancel-safe; once a slot is held, sending cannot fail or wait.
        let permit = self
            .0
            .reserve()
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        permit.send(Bytes::copy_from_slice(data));
        Ok(data.len())
    }

    async fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    const BUFFERS: bool = false;

    fn try_write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        match self.0.try_reserve() {
            Ok(permit) => {
                permit.send(Bytes::copy_from_slice(data));
                Ok(data.len())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TrySendError::Closed(())) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
}
