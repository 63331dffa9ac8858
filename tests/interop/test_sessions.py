"""Persistent sessions, QoS 1/2 redelivery, exactly-once, takeover, keepalive and timeouts
(MQTT 3.1.1 sections 3.1.2.4, 3.1.2.10, 4.1, 4.3, 4.4)."""

import socket
import time

from clients import assert_healthy, unique
from mqtt_raw import (CONNACK, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, UNSUBACK,
                      RawClient, connect, pingreq, puback, publish, pubcomp, pubrec, pubrel,
                      unsubscribe)


# ------------------------------------------------------------------ paho sessions


def test_paho_persistent_session_receives_qos1_and_qos2_messages_sent_while_offline(server, clients):
    cid = unique("paho-persist")
    a = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    assert a.session_present is False
    assert a.subscribe([("ps/q1", 1), ("ps/q2", 2)]) == [1, 2]
    a.disconnect()

    pub = clients.paho(server.mqtt_port)
    pub.publish("ps/q1", b"one", qos=1)
    pub.publish("ps/q2", b"two", qos=2)
    pub.publish("ps/q1", b"three", qos=1)

    b = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    assert b.session_present is True
    got = [(m.topic, m.payload, m.qos) for m in (b.get(), b.get(), b.get())]
    # ordering is only guaranteed per topic [MQTT-4.6.0-6]
    assert [g for g in got if g[0] == "ps/q1"] == [("ps/q1", b"one", 1), ("ps/q1", b"three", 1)]
    assert [g for g in got if g[0] == "ps/q2"] == [("ps/q2", b"two", 2)]
    b.expect_nothing(0.3)


def test_paho_persistent_session_keeps_subscriptions_without_resubscribing(server, clients):
    cid = unique("paho-keep")
    a = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    a.subscribe("keep/t", 1)
    a.disconnect()
    b = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    assert b.session_present
    clients.paho(server.mqtt_port).publish("keep/t", b"live", qos=1)
    assert b.get().payload == b"live"


def test_qos0_message_for_offline_persistent_session_delivered_at_most_once(server, clients):
    cid = unique("q0-offline")
    a = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    a.subscribe("q0off/t", 0)
    a.disconnect()
    pub = clients.paho(server.mqtt_port)
    pub.publish("q0off/t", b"qos0", qos=0)
    b = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    b.subscribe("q0off/sentinel", 1)
    pub.publish("q0off/sentinel", b"s", qos=1)
    # QoS 0 queueing is optional [MQTT-3.1.2-5 note]; delivering it twice or out of order is not
    msgs = [(m.topic, m.payload) for m in b.get_until("q0off/sentinel")]
    assert msgs in ([("q0off/sentinel", b"s")], [("q0off/t", b"qos0"), ("q0off/sentinel", b"s")])


def test_session_takeover_closes_first_connection(server, clients):
    cid = unique("takeover")
    first = clients.paho(server.mqtt_port, client_id=cid)
    first.subscribe("take/t", 1)
    second = clients.paho(server.mqtt_port, client_id=cid)
    assert first.disconnected.wait(5), "first connection was not closed by the takeover [MQTT-3.1.4-2]"
    assert not second.disconnected.is_set()
    second.subscribe("take/t", 1)
    clients.paho(server.mqtt_port).publish("take/t", b"to-second", qos=1)
    assert second.get().payload == b"to-second"
    assert first.messages.empty()


def test_session_takeover_raw_first_socket_sees_eof(server, clients):
    cid = unique("takeover-raw")
    a = clients.raw(server.mqtt_port)
    a.connect(cid)
    b = clients.raw(server.mqtt_port)
    b.connect(cid)
    a.expect_closed(5)
    b.send(pingreq())
    b.expect(PINGRESP)


def test_session_takeover_keeps_persistent_session(server, clients):
    cid = unique("takeover-persist")
    a = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    a.subscribe("tp/t", 1)
    b = clients.paho(server.mqtt_port, client_id=cid, clean_session=False)
    assert a.disconnected.wait(5)
    assert b.session_present is True
    clients.paho(server.mqtt_port).publish("tp/t", b"x", qos=1)
    assert b.get().payload == b"x"


# ------------------------------------------------------------------ raw redelivery


def _persistent_raw_subscriber(srv, clients, cid, flt, qos):
    c = clients.raw(srv.mqtt_port)
    assert c.connect(cid, clean=False).body == b"\x00\x00"
    assert c.subscribe([(flt, qos)]) == [qos]
    return c


def test_unacked_qos1_publish_redelivered_with_dup_and_same_id_after_reconnect(server, clients):
    cid = unique("dup1")
    c = _persistent_raw_subscriber(server, clients, cid, "dup/q1", 1)
    clients.paho(server.mqtt_port).publish("dup/q1", b"redeliver-me", qos=1)
    first = c.expect(PUBLISH)
    assert (first.qos, first.dup, first.payload) == (1, False, b"redeliver-me")
    c.close()  # no PUBACK

    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x01\x00"
    again = d.expect(PUBLISH)  # [MQTT-4.4.0-1]
    assert again.dup, f"redelivered PUBLISH must have DUP=1 [MQTT-3.3.1-1]: {again!r}"
    assert (again.pid, again.qos, again.topic, again.payload) == (first.pid, 1, "dup/q1", b"redeliver-me")
    d.send(puback(again.pid))
    d.expect_no_packet(0.3)
    d.close()

    # acknowledged now: not sent a third time
    e = clients.raw(server.mqtt_port)
    assert e.connect(cid, clean=False).body == b"\x01\x00"
    e.expect_no_packet(0.5)


def test_unreceived_qos2_publish_redelivered_with_dup_and_same_id_after_reconnect(server, clients):
    cid = unique("dup2")
    c = _persistent_raw_subscriber(server, clients, cid, "dup/q2", 2)
    clients.paho(server.mqtt_port).publish("dup/q2", b"exactly-once", qos=2)
    first = c.expect(PUBLISH)
    assert (first.qos, first.dup) == (2, False)
    c.close()  # no PUBREC

    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x01\x00"
    again = d.expect(PUBLISH)
    assert again.dup, again
    assert (again.pid, again.qos, again.payload) == (first.pid, 2, b"exactly-once")
    d.send(pubrec(again.pid))
    rel = d.expect(PUBREL)
    assert (rel.flags, rel.pid) == (0x02, again.pid)
    d.send(pubcomp(again.pid))
    d.expect_no_packet(0.3)


def test_qos2_pubrel_resent_after_reconnect_when_pubcomp_missing(server, clients):
    cid = unique("rel")
    c = _persistent_raw_subscriber(server, clients, cid, "rel/q2", 2)
    clients.paho(server.mqtt_port).publish("rel/q2", b"half-done", qos=2)
    msg = c.expect(PUBLISH)
    c.send(pubrec(msg.pid))
    rel = c.expect(PUBREL)
    assert rel.pid == msg.pid
    c.close()  # no PUBCOMP

    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x01\x00"
    again = d.expect(PUBREL)  # the PUBREL, not the PUBLISH [MQTT-4.3.3-1, 4.4.0-1]
    assert (again.flags, again.pid) == (0x02, msg.pid)
    d.send(pubcomp(msg.pid))
    d.expect_no_packet(0.3)


def test_qos2_inbound_duplicate_publish_before_pubrel_delivered_once(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("once/t", 2)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("once-pub"))
    c.send(publish("once/t", b"only-once", qos=2, pid=7))
    assert c.expect(PUBREC).pid == 7
    c.send(publish("once/t", b"only-once", qos=2, pid=7, dup=True))
    assert c.expect(PUBREC).pid == 7
    c.send(pubrel(7))
    comp = c.expect(PUBCOMP)
    assert comp.pid == 7 and comp.flags == 0
    msg = sub.get()
    assert msg.payload == b"only-once"
    sub.expect_nothing(0.5)


def test_qos2_packet_id_reusable_after_pubcomp(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("reuse/t", 2)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("reuse"))
    for payload in (b"first", b"second"):
        c.send(publish("reuse/t", payload, qos=2, pid=7))
        assert c.expect(PUBREC).pid == 7
        c.send(pubrel(7))
        assert c.expect(PUBCOMP).pid == 7
    assert [sub.get().payload, sub.get().payload] == [b"first", b"second"]


def test_qos2_pubrel_for_unknown_id_answered_with_pubcomp(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("unknown-rel"))
    c.send(pubrel(4242))
    assert c.expect(PUBCOMP).pid == 4242  # [MQTT-4.3.3-2]: must respond to PUBREL


def test_qos2_inbound_state_survives_reconnect_of_persistent_publisher(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("pubstate/t", 2)
    cid = unique("pubstate")
    c = clients.raw(server.mqtt_port)
    c.connect(cid, clean=False)
    c.send(publish("pubstate/t", b"x", qos=2, pid=3))
    assert c.expect(PUBREC).pid == 3
    c.close()
    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body[0] == 1
    d.send(publish("pubstate/t", b"x", qos=2, pid=3, dup=True))  # resend after reconnect
    assert d.expect(PUBREC).pid == 3
    d.send(pubrel(3))
    assert d.expect(PUBCOMP).pid == 3
    assert sub.get().payload == b"x"
    sub.expect_nothing(0.5)


def test_qos1_publish_acknowledged_with_puback_carrying_same_id(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("puback"))
    c.send(publish("ack/t", b"x", qos=1, pid=0xBEEF))
    ack = c.expect(PUBACK)
    assert (ack.flags, ack.body) == (0, b"\xbe\xef")


def test_max_inflight_limits_unacknowledged_outbound_messages(start_server, clients):
    srv = start_server(config="[mqtt]\nmax_inflight = 2\n")
    c = clients.raw(srv.mqtt_port)
    c.connect(unique("inflight"))
    c.subscribe([("inf/t", 1)])
    pub = clients.paho(srv.mqtt_port)
    for i in range(5):
        pub.publish("inf/t", f"m{i}".encode(), qos=1)
    got = [c.expect(PUBLISH), c.expect(PUBLISH)]
    c.expect_no_packet(0.5)  # window full
    assert len({m.pid for m in got}) == 2 and all(m.pid for m in got)
    for m in got:
        c.send(puback(m.pid))
    for _ in range(3):
        m = c.expect(PUBLISH)
        got.append(m)
        c.send(puback(m.pid))
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(5)]


def test_max_queued_bounds_offline_queue_of_persistent_session(start_server, clients):
    srv = start_server(config="[mqtt]\nmax_queued = 3\n")
    cid = unique("queued")
    a = clients.paho(srv.mqtt_port, client_id=cid, clean_session=False)
    a.subscribe("mq/t", 1)
    a.disconnect()
    pub = clients.paho(srv.mqtt_port)
    for i in range(10):
        pub.publish("mq/t", f"m{i}".encode(), qos=1)
    b = clients.paho(srv.mqtt_port, client_id=cid, clean_session=False)
    got = [m.payload for m in b.drain(1.0)]
    assert len(got) == 3, got
    assert_healthy(srv)


# ------------------------------------------------------------------ keepalive and timeouts


def test_keepalive_expiry_closes_connection_and_publishes_will(server, clients):
    watcher = clients.paho(server.mqtt_port)
    watcher.subscribe("ka/will", 1)
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("ka"), keepalive=1, will=("ka/will", b"timed-out", 1, False)))
    c.expect(CONNACK)
    t0 = time.monotonic()
    c.expect_closed(timeout=4)
    elapsed = time.monotonic() - t0
    # one and a half times the keep alive period [MQTT-3.1.2-24]
    assert 1.0 <= elapsed <= 2.5, f"closed after {elapsed:.2f}s"
    msg = watcher.get(3)
    assert (msg.topic, msg.payload) == ("ka/will", b"timed-out")


def test_pingreq_within_keepalive_keeps_connection_open(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("ka-alive"), keepalive=1)
    for _ in range(6):
        time.sleep(0.5)
        c.send(pingreq())
        c.expect(PINGRESP, timeout=2)
    assert c.is_open()


def test_keepalive_zero_disables_timeout(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("ka0"), keepalive=0)
    time.sleep(2.0)
    c.send(pingreq())
    c.expect(PINGRESP)


def test_connection_without_connect_closed_after_connect_timeout(start_server):
    srv = start_server(config="[mqtt]\nconnect_timeout_secs = 1\n")
    s = socket.create_connection(("127.0.0.1", srv.mqtt_port), timeout=5)
    try:
        t0 = time.monotonic()
        s.settimeout(4)
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
        elapsed = time.monotonic() - t0
        assert data == b"", f"unexpected data {data!r}"
        assert elapsed <= 2.5, f"closed after {elapsed:.2f}s with connect_timeout_secs = 1"
    except socket.timeout:
        raise AssertionError("idle connection without CONNECT not closed within 4s") from None
    finally:
        s.close()
    assert_healthy(srv)


def test_connect_timeout_configurable_by_environment(start_server):
    srv = start_server(env={"STRATUS_MQTT__CONNECT_TIMEOUT_SECS": "1"})
    with RawClient(srv.mqtt_port) as c:
        t0 = time.monotonic()
        c.expect_closed(timeout=4)
        assert time.monotonic() - t0 <= 2.5


# ------------------------------------------------------------------ durability


def test_will_published_when_server_closes_connection_for_protocol_error(server, clients):
    watcher = clients.paho(server.mqtt_port)
    watcher.subscribe("perr/will", 1)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("perr"), will=("perr/will", b"protocol-error", 1, False))
    c.try_send(b"\x30\xff\xff\xff\xff\xff")  # malformed remaining length
    c.expect_closed()
    msg = watcher.get(3)  # [MQTT-3.1.2-8]: will on protocol-error close
    assert msg.payload == b"protocol-error"


def test_will_not_published_after_disconnect_packet(server, clients):
    watcher = clients.paho(server.mqtt_port)
    watcher.subscribe("nowill/+", 1)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("nowill"), will=("nowill/w", b"must-not-appear", 1, False))
    c.send(b"\xe0\x00")  # DISCONNECT [MQTT-3.14.4-3]: discard the will
    c.expect_closed()
    clients.paho(server.mqtt_port).publish("nowill/sentinel", b"s", qos=1)
    assert [m.topic for m in watcher.get_until("nowill/sentinel")] == ["nowill/sentinel"]


def test_publish_traffic_counts_as_keepalive_activity(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("ka-pub"), keepalive=1)
    for i in range(6):
        time.sleep(0.5)
        c.send(publish("ka/traffic", b"x", qos=1, pid=i + 1))
        assert c.expect(PUBACK, timeout=2).pid == i + 1
    assert c.is_open()


def test_inflight_message_resent_before_queued_ones_after_reconnect(start_server, clients):
    srv = start_server(config="[mqtt]\nmax_inflight = 1\n")
    cid = unique("resend-order")
    c = _persistent_raw_subscriber(srv, clients, cid, "ro/t", 1)
    pub = clients.paho(srv.mqtt_port)
    for i in range(3):
        pub.publish("ro/t", f"m{i}".encode(), qos=1)
    first = c.expect(PUBLISH)
    assert first.payload == b"m0"
    c.expect_no_packet(0.3)  # window of 1 is full
    c.close()  # m0 unacknowledged, m1 and m2 queued
    d = clients.raw(srv.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x01\x00"
    got = []
    for _ in range(3):
        m = d.expect(PUBLISH)
        got.append((m.payload, m.dup))
        d.send(puback(m.pid))
    assert got == [(b"m0", True), (b"m1", False), (b"m2", False)]


def test_clean_session_state_discarded_at_disconnect(server, clients):
    cid = unique("clean-gone")
    c = clients.raw(server.mqtt_port)
    c.connect(cid, clean=True)
    c.subscribe([("cg/t", 1)])
    c.close()
    time.sleep(0.2)
    clients.paho(server.mqtt_port).publish("cg/t", b"x", qos=1)
    d = clients.raw(server.mqtt_port)
    assert d.connect(cid, clean=False).body == b"\x00\x00"  # [MQTT-3.1.2-6]: nothing kept
    d.expect_no_packet(0.5)


def test_persistent_session_unsubscribe_stops_offline_queueing(server, clients):
    cid = unique("unsub-persist")
    c = _persistent_raw_subscriber(server, clients, cid, "up/t", 1)
    c.subscribe([("up/other", 1)], pid=2)
    c.send(unsubscribe(3, ["up/t"]))
    c.expect(UNSUBACK)
    c.close()
    pub = clients.paho(server.mqtt_port)
    pub.publish("up/t", b"dropped", qos=1)
    pub.publish("up/other", b"kept", qos=1)
    d = clients.raw(server.mqtt_port)
    d.connect(cid, clean=False)
    m = d.expect(PUBLISH)
    assert m.payload == b"kept"
    d.send(puback(m.pid))
    d.expect_no_packet(0.3)
