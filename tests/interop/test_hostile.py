"""Hostile and malformed input. After every case the connection must be closed, the
server alive, and a well-behaved client on another connection must still round-trip."""

import random
import socket
import time

import pytest

from clients import assert_healthy, unique
from mqtt_raw import (CONNACK, PUBACK, PUBLISH, RawClient, connect, mstr, packet, pingreq, publish,
                      pubrel, subscribe, unsubscribe, varint)


def _connected(srv):
    c = RawClient(srv.mqtt_port)
    c.connect(unique("hostile"))
    return c


def _not_accepted(seen):
    return all(not (p.type == CONNACK and p.body[1:2] == b"\x00") for p in seen)


# Each case: (id, needs a CONNECTed session first, bytes to send)
CASES = [
    ("publish-before-connect", False, publish("x/y", b"hi")),
    ("pingreq-before-connect", False, pingreq()),
    ("subscribe-before-connect", False, subscribe(1, [("x", 0)])),
    ("second-connect", True, connect("again")),
    ("remaining-length-5-bytes-0xff-before-connect", False, b"\x10\xff\xff\xff\xff\xff"),
    ("remaining-length-5-bytes-0xff-after-connect", True, b"\x30\xff\xff\xff\xff\xff"),
    ("remaining-length-non-minimal-5th-byte", True, b"\x30\x80\x80\x80\x80\x01"),
    ("subscribe-flags-0", True, subscribe(1, [("x/y", 0)], flags=0x00)),
    ("unsubscribe-flags-0", True, unsubscribe(1, ["x/y"], flags=0x00)),
    ("pubrel-flags-0", True, pubrel(1, flags=0x00)),
    ("pingreq-flags-set", True, b"\xc1\x00"),
    ("publish-invalid-utf8-topic", True, packet(0x30, mstr(b"bad/\xff\xfe") + b"x")),
    ("publish-nul-in-topic", True, packet(0x30, mstr(b"bad/\x00/t") + b"x")),
    ("publish-utf16-surrogate-in-topic", True, packet(0x30, mstr(b"bad/\xed\xa0\x80") + b"x")),
    ("publish-wildcard-plus-in-topic", True, publish("a/+/c", b"x")),
    ("publish-wildcard-hash-in-topic", True, publish("a/#", b"x")),
    ("publish-empty-topic", True, publish("", b"x")),
    ("publish-qos3", True, publish("a/b", b"x", flags=0x06)),
    ("publish-qos1-packet-id-0", True, publish("a/b", b"x", qos=1, pid=0)),
    ("publish-topic-length-beyond-packet", True, packet(0x30, b"\x00\x40abc")),
    ("subscribe-requested-qos-3", True, subscribe(1, [("x/y", 3)])),
    ("subscribe-reserved-option-bits", True, subscribe(1, [("x/y", 0x40)])),
    ("subscribe-without-filters", True, packet(0x82, b"\x00\x01")),
    ("unsubscribe-without-filters", True, packet(0xA2, b"\x00\x01")),
    ("subscribe-invalid-utf8-filter", True, packet(0x82, b"\x00\x01" + mstr(b"\xc3\x28") + b"\x00")),
    ("reserved-packet-type-0", True, b"\x00\x00"),
    ("reserved-packet-type-15", True, b"\xf0\x00"),
    ("server-only-packet-connack", True, b"\x20\x02\x00\x00"),
    ("connect-client-id-length-beyond-packet",
     False, packet(0x10, mstr("MQTT") + b"\x04\x02\x00\x3c\x00\x50ab")),
    ("connect-truncated-header", False, packet(0x10, mstr("MQTT") + b"\x04")),
    ("connect-invalid-utf8-client-id",
     False, packet(0x10, mstr("MQTT") + b"\x04\x02\x00\x3c" + mstr(b"\xff\xfe"))),
]


@pytest.mark.parametrize("needs_connect,data", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_or_illegal_packet_closes_connection(server, needs_connect, data):
    c = _connected(server) if needs_connect else RawClient(server.mqtt_port)
    try:
        c.try_send(data)
        seen = c.expect_closed(timeout=5)
        if not needs_connect:
            assert _not_accepted(seen), seen
    finally:
        c.close()
    assert_healthy(server)


def test_truncated_packet_then_close_leaves_server_healthy(server):
    for data in (connect("trunc")[:7], b"\x10", b"\x10\x80", publish("a/b", b"x" * 100)[:20]):
        with RawClient(server.mqtt_port) as c:
            c.send(data)
        with RawClient(server.mqtt_port) as c:
            c.connect(unique("trunc-after"))
            c.send(publish("a/b", b"y" * 100)[:20])
        assert_healthy(server)


def test_connection_reset_by_client_leaves_server_healthy(server):
    c = RawClient(server.mqtt_port)
    c.connect(unique("rst"))
    c.send(subscribe(1, [("rst/#", 1)]))
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # RST instead of FIN
    assert_healthy(server)


def test_packet_larger_than_max_packet_size_closes_connection(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n")
    with RawClient(srv.mqtt_port) as ok:
        ok.connect(unique("small"))
        ok.send(publish("size/t", b"s" * 900, qos=1, pid=1))
        ok.expect(PUBACK)  # under the limit: accepted
    with RawClient(srv.mqtt_port) as big:
        big.connect(unique("big"))
        big.try_send(publish("size/t", b"B" * 2000, qos=1, pid=2))
        seen = big.expect_closed()
        assert all(p.type != PUBACK for p in seen), f"oversized PUBLISH was acknowledged: {seen}"
    assert_healthy(srv)


def test_oversized_declared_length_closes_without_waiting_for_body(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n")
    with RawClient(srv.mqtt_port) as c:
        c.connect(unique("declared"))
        c.send(b"\x30" + varint(100_000_000) + b"\x00\x03a/b")  # body never comes
        c.expect_closed(timeout=3)
    assert_healthy(srv)


def test_oversized_connect_closes_connection(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n")
    with RawClient(srv.mqtt_port) as c:
        c.try_send(connect("x" * 3000))
        seen = c.expect_closed()
        assert _not_accepted(seen), seen
    assert_healthy(srv)


def test_max_packet_size_from_environment(start_server):
    srv = start_server(env={"STRATUS_MQTT__MAX_PACKET_SIZE": "1024"})
    with RawClient(srv.mqtt_port) as big:
        big.connect(unique("big-env"))
        big.try_send(publish("size/t", b"B" * 2000))
        big.expect_closed()
    assert_healthy(srv)


def test_random_garbage_connections_are_closed(start_server):
    srv = start_server(config="[mqtt]\nconnect_timeout_secs = 2\n")
    rng = random.Random(20240311)
    socks = []
    for _ in range(50):
        first = rng.choice([b for b in range(256) if b >> 4 != 1])  # anything but CONNECT
        data = bytes([first]) + rng.randbytes(rng.randint(1, 300))
        c = RawClient(srv.mqtt_port)
        c.try_send(data)
        socks.append(c)
    deadline = time.monotonic() + 5
    still_open = []
    for c in socks:
        try:
            c.expect_closed(timeout=max(0.01, deadline - time.monotonic()))
        except AssertionError:
            still_open.append(c)
        finally:
            c.close()
    assert not still_open, f"{len(still_open)} garbage connections still open after 5s"
    assert_healthy(srv)


def test_random_garbage_after_connect_closes_connection(server):
    rng = random.Random(7)
    for i in range(20):
        c = _connected(server)
        # a complete frame whose reserved type nibble (0 or 15) is a protocol error
        c.try_send(packet(rng.choice([0x00, 0xF0]) | rng.randrange(16), rng.randbytes(50)))
        c.expect_closed()
        c.close()
    assert_healthy(server)


def test_subscriber_keeps_receiving_while_hostile_clients_are_thrown_out(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("steady/t", 1)
    pub = clients.paho(server.mqtt_port)
    rng = random.Random(1)
    for i in range(20):
        bad = RawClient(server.mqtt_port)
        if i % 2:
            bad.connect(unique("bad"))
            bad.try_send(b"\x30\xff\xff\xff\xff\xff")
        else:
            bad.try_send(packet(0x30, rng.randbytes(40)))  # PUBLISH before CONNECT
        pub.publish("steady/t", f"m{i}".encode(), qos=1)
        bad.expect_closed()
        bad.close()
    got = [sub.get().payload for _ in range(20)]
    assert got == [f"m{i}".encode() for i in range(20)]
    assert sub.disconnected.is_set() is False and pub.disconnected.is_set() is False
    assert_healthy(server)


def test_connect_split_into_single_bytes_is_accepted(server):
    with RawClient(server.mqtt_port) as c:
        for b in connect(unique("slow")):
            c.send(bytes([b]))
            time.sleep(0.005)
        ack = c.expect(CONNACK)
        assert ack.body == b"\x00\x00"


def test_several_packets_in_one_segment_all_processed(server):
    with RawClient(server.mqtt_port) as c:
        c.send(connect(unique("batch")) + subscribe(5, [("batch/t", 1)]) + pingreq()
               + publish("batch/t", b"self", qos=1, pid=6))
        assert c.expect(CONNACK).body == b"\x00\x00"
        types = {}
        for _ in range(4):
            p = c.recv_packet()
            types[p.name] = p
        assert set(types) == {"SUBACK", "PINGRESP", "PUBACK", "PUBLISH"}, types
        assert types["SUBACK"].body == b"\x00\x05\x01"
        assert types["PUBLISH"].payload == b"self"


def test_many_idle_connections_do_not_starve_others(start_server):
    srv = start_server(config="[mqtt]\nconnect_timeout_secs = 5\n")
    idle = [socket.create_connection(("127.0.0.1", srv.mqtt_port), timeout=5) for _ in range(100)]
    try:
        assert_healthy(srv)
    finally:
        for s in idle:
            s.close()
