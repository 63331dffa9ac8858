"""Retained messages (MQTT 3.1.1 section 3.3.1.3)."""

import pytest

from clients import unique
from mqtt_raw import CONNACK, PUBLISH, PUBREL, connect, puback, pubcomp, pubrec


def _ack(c, msg):
    if msg.qos == 1:
        c.send(puback(msg.pid))
    elif msg.qos == 2:
        c.send(pubrec(msg.pid))
        c.expect(PUBREL)
        c.send(pubcomp(msg.pid))


def test_live_delivery_of_retained_publish_has_retain_flag_0(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("live"))
    c.subscribe([("rl/t", 1)])
    clients.paho(server.mqtt_port).publish("rl/t", b"fresh", qos=1, retain=True)
    msg = c.expect(PUBLISH)
    assert msg.payload == b"fresh"
    assert not msg.retain, f"established subscription must get RETAIN=0 [MQTT-3.3.1-9]: {msg!r}"
    _ack(c, msg)


def test_new_subscription_receives_retained_message_with_retain_flag_1(server, clients):
    clients.paho(server.mqtt_port).publish("rn/t", b"stored", qos=1, retain=True)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("new"))
    c.subscribe([("rn/t", 1)])
    msg = c.expect(PUBLISH)
    assert (msg.payload, msg.retain) == (b"stored", True)  # [MQTT-3.3.1-8]
    _ack(c, msg)


def test_paho_sees_retain_flag_only_for_stored_delivery(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("rp/t", 1)
    pub = clients.paho(server.mqtt_port)
    pub.publish("rp/t", b"v1", qos=1, retain=True)
    live = sub.get()
    assert (live.payload, live.retain) == (b"v1", False)
    late = clients.paho(server.mqtt_port)
    late.subscribe("rp/t", 1)
    stored = late.get()
    assert (stored.payload, stored.retain) == (b"v1", True)


@pytest.mark.parametrize("stored_qos,granted_qos", [(2, 1), (2, 0), (1, 2), (0, 2), (1, 1), (2, 2)])
def test_retained_delivery_qos_is_min_of_stored_and_granted(server, clients, stored_qos, granted_qos):
    clients.paho(server.mqtt_port).publish("rq/t", b"x", qos=stored_qos, retain=True)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("rq"))
    assert c.subscribe([("rq/t", granted_qos)]) == [granted_qos]
    msg = c.expect(PUBLISH)
    assert msg.retain
    assert msg.qos == min(stored_qos, granted_qos), msg
    _ack(c, msg)


def test_retained_message_replaced_by_newer_retained_publish(server, clients):
    pub = clients.paho(server.mqtt_port)
    pub.publish("rr/t", b"old", qos=1, retain=True)
    pub.publish("rr/t", b"new", qos=1, retain=True)
    pub.publish("rr/t", b"not-retained", qos=1, retain=False)
    late = clients.paho(server.mqtt_port)
    late.subscribe("rr/t", 1)
    assert late.get().payload == b"new"
    late.expect_nothing(0.3)


def test_empty_retained_publish_clears_and_is_forwarded_to_current_subscribers(server, clients):
    pub = clients.paho(server.mqtt_port)
    pub.publish("rc/t", b"old", qos=1, retain=True)
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("rc/t", 1)
    assert sub.get().payload == b"old"
    pub.publish("rc/t", b"", qos=1, retain=True)
    live = sub.get()  # a zero-byte retained PUBLISH is processed as normal [3.3.1.3]
    assert (live.payload, live.retain) == (b"", False)
    late = clients.paho(server.mqtt_port)
    late.subscribe("rc/t", 1)
    late.expect_nothing(0.5)


def test_resubscribe_resends_retained_messages(server, clients):
    clients.paho(server.mqtt_port).publish("rs/t", b"again", qos=1, retain=True)
    c = clients.raw(server.mqtt_port)
    c.connect(unique("resub"))
    for pid in (1, 2):
        c.subscribe([("rs/#", 1)], pid=pid)
        msg = c.expect(PUBLISH)  # [MQTT-3.8.4-3]
        assert (msg.payload, msg.retain) == (b"again", True)
        c.send(puback(msg.pid))


def test_many_retained_topics_delivered_for_wildcard_subscription(server, clients):
    pub = clients.paho(server.mqtt_port)
    for i in range(50):
        pub.publish(f"many/{i}/state", str(i).encode(), qos=1, retain=True)
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("many/+/state", 1)
    got = sorted(int(sub.get().payload) for _ in range(50))
    assert got == list(range(50))
    sub.expect_nothing(0.3)


def test_will_with_retain_is_stored_as_retained(server, clients):
    c = clients.raw(server.mqtt_port)
    c.send(connect(unique("will-ret"), will=("wr/status", b"offline", 1, True)))
    c.expect(CONNACK)
    c.close()  # no DISCONNECT: the will is published
    late = clients.paho(server.mqtt_port)
    late.subscribe("wr/status", 1)
    msg = late.get()
    assert (msg.payload, msg.retain) == (b"offline", True)
