"""A server-side close is heard: when the server ends a connection it writes its DISCONNECT
(or refusing CONNACK), closes its sending side and reads what the client still sends before
closing, so a client that keeps writing reads the reason code instead of a reset.

A raw MQTT 5 client pipelines QoS 2 PUBLISHes far past Receive Maximum without reading, then
reads: it must get DISCONNECT 0x93 every time; paho v5 sees reason 0x93 too."""

from __future__ import annotations

import socket
import struct
import threading
import time

import paho.mqtt.client as mqtt

from mqtt_raw import varint


def v5_connect(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + struct.pack("!H", len(cid)) + cid
    return b"\x10" + varint(len(body)) + body


def v5_publish_qos2(pid: int) -> bytes:
    body = b"\x00\x01t" + struct.pack("!H", pid) + b"\x00" + b"x" * 64
    return b"\x34" + varint(len(body)) + body


def read_packets(sock: socket.socket, timeout: float = 5.0) -> list:
    """Every (type, body) until the server closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        raise AssertionError("the server reset the connection: its last words were lost")
    out, i = [], 0
    while i < len(data):
        ptype = data[i] >> 4
        mult, length, j = 1, 0, i + 1
        while True:
            b = data[j]
            length += (b & 0x7F) * mult
            mult *= 128
            j += 1
            if not b & 0x80:
                break
        out.append((ptype, data[j:j + length]))
        i = j + length
    return out


def test_a_client_pipelining_past_receive_maximum_always_reads_disconnect_0x93(start_server):
    srv = start_server("close", config="[mqtt]\nreceive_maximum = 10\nmax_publish_rate = 0\n")
    for attempt in range(5):
        s = socket.create_connection(("127.0.0.1", srv.mqtt_port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(v5_connect(f"pipe-{attempt}"))
        # 2000 QoS 2 PUBLISHes without reading a byte: far past Receive Maximum (10).
        burst = b"".join(v5_publish_qos2(p) for p in range(1, 2001))
        try:
            s.sendall(burst)
        except (BrokenPipeError, ConnectionResetError):
            raise AssertionError("the server reset the connection while the client wrote")
        packets = read_packets(s)
        s.close()
        disconnects = [body for t, body in packets if t == 14]
        assert disconnects, [t for t, _ in packets][:20]
        assert disconnects[-1][0] == 0x93, disconnects[-1]


def test_paho_v5_sees_reason_0x93(start_server):
    srv = start_server("close-paho", config="[mqtt]\nreceive_maximum = 5\nmax_publish_rate = 0\n")
    got = {}
    done = threading.Event()

    def on_disconnect(client, userdata, flags, rc, props):
        got["rc"] = rc.value if hasattr(rc, "value") else int(rc)
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pipe", protocol=mqtt.MQTTv5,
                    reconnect_on_failure=False)
    c.on_disconnect = on_disconnect
    # paho honours the server's Receive Maximum; pretend it announced more.
    c._max_inflight_messages = 1000
    c.connect("127.0.0.1", srv.mqtt_port)
    c.loop_start()
    time.sleep(0.3)
    c._max_inflight_messages = 1000
    for _ in range(200):
        c.publish("t", b"x", qos=2)
    assert done.wait(5)
    c.loop_stop()
    assert got["rc"] == 0x93, got
