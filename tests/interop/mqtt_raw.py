"""Byte-exact MQTT 3.1.1 packet builders and a tiny blocking raw-socket client.

Used for hostile-input tests and for checks that need to see exact flags
(DUP, RETAIN, QoS bits), packet identifiers and return codes.
Packet layout follows the OASIS MQTT 3.1.1 specification, section 2 and 3.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

# Control packet types (MQTT 3.1.1 table 2.1).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

TYPE_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT",
}


def varint(n: int) -> bytes:
    """Remaining-length encoding (spec 2.2.3)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(n)
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def mstr(s) -> bytes:
    """UTF-8 string / binary data with a two-byte length prefix (spec 1.5.3)."""
    if isinstance(s, str):
        s = s.encode("utf-8")
    return struct.pack("!H", len(s)) + s


def packet(first_byte: int, body: bytes = b"") -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def connect(
    client_id="",
    clean=True,
    keepalive=60,
    will=None,  # (topic, payload, qos, retain)
    username=None,
    password=None,
    proto_name="MQTT",
    level=4,
    flags=None,  # override the computed connect-flags byte
) -> bytes:
    f = 0
    if clean:
        f |= 0x02
    payload = mstr(client_id)
    if will is not None:
        wt, wp, wq, wr = will
        f |= 0x04 | (wq << 3) | (0x20 if wr else 0)
        payload += mstr(wt) + mstr(wp)
    if username is not None:
        f |= 0x80
        payload += mstr(username)
    if password is not None:
        f |= 0x40
        payload += mstr(password)
    if flags is not None:
        f = flags
    body = mstr(proto_name) + bytes([level, f]) + struct.pack("!H", keepalive) + payload
    return packet(0x10, body)


def publish(topic, payload=b"", qos=0, retain=False, dup=False, pid=None, flags=None) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    f = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    if flags is not None:
        f = flags
    body = mstr(topic)
    if qos > 0:
        body += struct.pack("!H", pid if pid is not None else 1)
    body += payload
    return packet(0x30 | f, body)


def puback(pid) -> bytes:
    return packet(0x40, struct.pack("!H", pid))


def pubrec(pid) -> bytes:
    return packet(0x50, struct.pack("!H", pid))


def pubrel(pid, flags=0x02) -> bytes:
    return packet(0x60 | flags, struct.pack("!H", pid))


def pubcomp(pid) -> bytes:
    return packet(0x70, struct.pack("!H", pid))


def subscribe(pid, filters, flags=0x02) -> bytes:
    """filters: list of (filter, requested_qos)."""
    body = struct.pack("!H", pid)
    for flt, q in filters:
        body += mstr(flt) + bytes([q])
    return packet(0x80 | flags, body)


def unsubscribe(pid, filters, flags=0x02) -> bytes:
    body = struct.pack("!H", pid)
    for flt in filters:
        body += mstr(flt)
    return packet(0xA0 | flags, body)


def pingreq() -> bytes:
    return b"\xc0\x00"


def disconnect() -> bytes:
    return b"\xe0\x00"


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type{self.type}")

    # PUBLISH helpers
    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def topic(self) -> str:
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 : 2 + n].decode("utf-8")

    @property
    def pid(self):
        """Packet identifier: PUBLISH with QoS>0, or any ack-like packet."""
        if self.type == PUBLISH:
            if self.qos == 0:
                return None
            (n,) = struct.unpack("!H", self.body[:2])
            return struct.unpack("!H", self.body[2 + n : 4 + n])[0]
        return struct.unpack("!H", self.body[:2])[0]

    @property
    def payload(self) -> bytes:
        (n,) = struct.unpack("!H", self.body[:2])
        off = 2 + n + (2 if self.qos > 0 else 0)
        return self.body[off:]

    def __repr__(self) -> str:
        if self.type == PUBLISH:
            return (
                f"<PUBLISH d{int(self.dup)} q{self.qos} r{int(self.retain)} pid={self.pid} "
                f"topic={self.topic!r} payload={self.payload[:40]!r}>"
            )
        return f"<{self.name} flags={self.flags:#x} body={self.body.hex()}>"


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class RawClient:
    """A blocking TCP client that speaks MQTT byte by byte."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed = False

    # -- sending
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, tolerating a connection the server already dropped."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    # -- receiving
    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out waiting for data from the broker")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("timed out waiting for data from the broker") from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
            self.closed = True
            raise Closed(str(e)) from None
        if not data:
            self.closed = True
            raise Closed("EOF")
        self.buf += data

    def recv_packet(self, timeout: float = 5.0) -> Packet:
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._parse()
            if pkt is not None:
                return pkt
            self._fill(deadline)

    def _parse(self):
        if len(self.buf) < 2:
            return None
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise ValueError("broker sent a malformed remaining length")
        if len(self.buf) < i + length:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i : i + length])
        del self.buf[: i + length]
        return Packet(first >> 4, first & 0x0F, body)

    def expect(self, ptype: int, timeout: float = 5.0) -> Packet:
        pkt = self.recv_packet(timeout)
        assert pkt.type == ptype, f"expected {TYPE_NAMES[ptype]}, got {pkt!r}"
        return pkt

    def expect_no_packet(self, within: float) -> None:
        """Assert that nothing arrives (and the connection stays open) for `within` seconds."""
        try:
            pkt = self.recv_packet(within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet {pkt!r}")

    def expect_closed(self, timeout: float = 5.0) -> list:
        """Wait until the server closes the connection; return packets seen before that."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen.append(self.recv_packet(max(0.0, deadline - time.monotonic())))
            except Closed:
                return seen
            except TimeoutError:
                raise AssertionError(
                    f"broker did not close the connection within {timeout}s (packets seen: {seen})"
                ) from None

    def is_open(self) -> bool:
        """True if the server has not closed the connection (non-blocking check)."""
        if self.closed:
            return False
        try:
            self.sock.settimeout(0.0)
            data = self.sock.recv(65536, socket.MSG_PEEK)
            return bool(data)
        except (BlockingIOError, socket.timeout):
            return True
        except OSError:
            return False

    # -- conveniences
    def connect(self, client_id="", clean=True, keepalive=60, expect_rc=0, **kw) -> Packet:
        self.send(connect(client_id, clean=clean, keepalive=keepalive, **kw))
        ack = self.expect(CONNACK)
        assert len(ack.body) == 2, f"CONNACK must have remaining length 2: {ack!r}"
        assert ack.body[1] == expect_rc, f"CONNACK return code {ack.body[1]:#x}, expected {expect_rc:#x}"
        return ack

    def subscribe(self, filters, pid=1, timeout=5.0) -> list:
        """Subscribe and return the SUBACK return codes."""
        if isinstance(filters, str):
            filters = [(filters, 0)]
        self.send(subscribe(pid, filters))
        ack = self.expect(SUBACK, timeout)
        assert ack.pid == pid, f"SUBACK packet id {ack.pid} != {pid}"
        return list(ack.body[2:])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
