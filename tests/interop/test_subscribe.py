"""SUBSCRIBE, UNSUBSCRIBE, PINGREQ, topic matching and delivery QoS (MQTT 3.1.1 3.8-3.13, 4.7)."""

import time

import pytest

from clients import unique
from mqtt_raw import (PINGRESP, PUBLISH, PUBREL, UNSUBACK, pingreq, puback, publish, pubcomp,
                      pubrec, unsubscribe)


def test_suback_grants_requested_qos(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("grant"))
    assert c.subscribe([("g/0", 0), ("g/1", 1), ("g/2", 2)], pid=0x1234) == [0, 1, 2]


def test_paho_suback_grants_requested_qos(server, clients):
    p = clients.paho(server.mqtt_port)
    assert p.subscribe([("pg/0", 0), ("pg/1", 1), ("pg/2", 2)]) == [0, 1, 2]


@pytest.mark.parametrize("bad", ["a/#/b", "a+/b", "", "a/b#", "#/a", "a/+b"])
def test_invalid_filter_gets_0x80_while_valid_filters_in_same_packet_are_granted(server, clients, bad):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("badflt"))
    codes = c.subscribe([("ok/first", 1), (bad, 1), ("ok/last", 2)], pid=9)
    assert codes == [1, 0x80, 2]
    # the granted subscriptions really work
    pub = clients.paho(server.mqtt_port)
    pub.publish("ok/last", b"works", qos=1)
    msg = c.expect(PUBLISH)
    assert (msg.topic, msg.payload) == ("ok/last", b"works")
    assert c.is_open()


def test_unsubscribe_acknowledged_and_stops_delivery(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("unsub"))
    assert c.subscribe([("u/t", 1), ("u/keep", 1)]) == [1, 1]
    c.send(unsubscribe(0x0203, ["u/t"]))
    ack = c.expect(UNSUBACK)
    assert ack.flags == 0 and ack.body == b"\x02\x03"
    pub = clients.paho(server.mqtt_port)
    pub.publish("u/t", b"gone", qos=1)
    pub.publish("u/keep", b"kept", qos=1)
    msg = c.expect(PUBLISH)
    assert msg.topic == "u/keep", msg
    c.send(puback(msg.pid))
    c.expect_no_packet(0.3)


def test_unsubscribe_of_unknown_filter_still_acknowledged(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("unsub2"))
    c.send(unsubscribe(77, ["never/subscribed"]))
    assert c.expect(UNSUBACK).pid == 77  # [MQTT-3.10.4-5]


def test_paho_unsubscribe_stops_delivery(server, clients):
    p = clients.paho(server.mqtt_port)
    p.subscribe("pu/t", 1)
    p.unsubscribe("pu/t")
    p.subscribe("pu/sentinel", 1)
    p.publish("pu/t", b"x", qos=1)
    p.publish("pu/sentinel", b"s", qos=1)
    assert [m.topic for m in p.get_until("pu/sentinel")] == ["pu/sentinel"]


def test_pingreq_gets_pingresp(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("ping"))
    for _ in range(3):
        c.send(pingreq())
        resp = c.expect(PINGRESP)
        assert resp.flags == 0 and resp.body == b""


# (filter, topics that match, topics that do not) -- MQTT 3.1.1 section 4.7
MATCHING = [
    ("sport/tennis/player1/#",
     ["sport/tennis/player1", "sport/tennis/player1/ranking", "sport/tennis/player1/score/wimbledon"],
     ["sport/tennis/player2", "sport/tennis"]),
    ("sport/#", ["sport", "sport/tennis"], ["sports", "Sport/tennis"]),
    ("sport/tennis/+", ["sport/tennis/player1", "sport/tennis/"],
     ["sport/tennis/player1/ranking", "sport/tennis"]),
    ("sport/+", ["sport/"], ["sport"]),
    ("+/+", ["/finance", "a/b"], ["a", "a/b/c"]),
    ("/+", ["/finance"], ["finance", "a/finance"]),
    ("+", ["finance"], ["/finance", "a/b"]),
    ("#", ["a", "/", "a/b/c"], []),
]


@pytest.mark.parametrize("flt,yes,no", MATCHING, ids=[m[0] for m in MATCHING])
def test_topic_filter_matching(server, clients, flt, yes, no):
    sub = clients.paho(server.mqtt_port)
    assert sub.subscribe(flt, 1) == [1]
    sub.subscribe("zz-sentinel-zz", 1)
    pub = clients.paho(server.mqtt_port)
    for topic in no + yes:
        pub.publish(topic, topic.encode(), qos=1)
    pub.publish("zz-sentinel-zz", b"end", qos=1)
    got = [m.topic for m in sub.get_until("zz-sentinel-zz")][:-1]
    assert sorted(got) == sorted(yes)


def test_topic_names_are_case_sensitive_and_spaces_allowed(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("Case/Some Space", 1)
    sub.subscribe("zz-sentinel-zz", 1)
    pub = clients.paho(server.mqtt_port)
    pub.publish("case/some space", b"no", qos=1)
    pub.publish("Case/Some Space", b"yes", qos=1)
    pub.publish("zz-sentinel-zz", b"end", qos=1)
    assert [(m.topic, m.payload) for m in sub.get_until("zz-sentinel-zz")][:-1] == [
        ("Case/Some Space", b"yes")]


@pytest.mark.parametrize("pub_qos,sub_qos", [(2, 1), (2, 0), (1, 0), (0, 2), (1, 2), (2, 2)])
def test_delivery_qos_is_min_of_publish_and_subscription(server, clients, pub_qos, sub_qos):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("down"))
    assert c.subscribe([("down/t", sub_qos)]) == [sub_qos]
    p = clients.paho(server.mqtt_port)
    p.publish("down/t", b"x", qos=pub_qos)
    msg = c.expect(PUBLISH)
    assert msg.qos == min(pub_qos, sub_qos), msg
    assert not msg.dup
    if msg.qos == 1:
        c.send(puback(msg.pid))
    elif msg.qos == 2:
        c.send(pubrec(msg.pid))
        rel = c.expect(PUBREL)
        assert rel.flags == 0x02 and rel.pid == msg.pid
        c.send(pubcomp(msg.pid))
    c.expect_no_packet(0.3)


def test_resubscribe_replaces_subscription_qos(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("replace"))
    assert c.subscribe([("rep/t", 0)], pid=1) == [0]
    assert c.subscribe([("rep/t", 2)], pid=2) == [2]
    p = clients.paho(server.mqtt_port)
    p.publish("rep/t", b"once", qos=2)
    msg = c.expect(PUBLISH)
    assert msg.qos == 2  # [MQTT-3.8.4-3]: replaced, not added
    c.send(pubrec(msg.pid))
    c.expect(PUBREL)
    c.send(pubcomp(msg.pid))
    c.expect_no_packet(0.3)


def test_overlapping_subscriptions_deliver_with_maximum_qos(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("overlap"))
    assert c.subscribe([("ov/#", 0), ("ov/t", 2)]) == [0, 2]
    p = clients.paho(server.mqtt_port)
    p.publish("ov/t", b"x", qos=2)
    copies = [c.expect(PUBLISH)]
    try:
        while True:
            copies.append(c.expect(PUBLISH, timeout=0.3))
    except TimeoutError:
        pass
    # one copy per subscription or a single copy are both allowed [MQTT-3.3.5-1]
    assert max(m.qos for m in copies) == 2, copies


def test_qos1_messages_from_one_publisher_arrive_in_order(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("order/t", 1)
    pub = clients.paho(server.mqtt_port)
    infos = [pub.c.publish("order/t", str(i).encode(), qos=1) for i in range(200)]
    for info in infos:
        info.wait_for_publish(5)
    got = [int(sub.get().payload) for _ in range(200)]
    assert got == list(range(200))


def test_binary_and_empty_payloads_round_trip_unchanged(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("bin/#", 2)
    pub = clients.paho(server.mqtt_port)
    blob = bytes(range(256)) * 4
    pub.publish("bin/blob", blob, qos=2)
    pub.publish("bin/empty", b"", qos=1)
    pub.publish("bin/utf8", "température ✓".encode(), qos=0)
    got = {m.topic: m.payload for m in (sub.get(), sub.get(), sub.get())}
    assert got == {"bin/blob": blob, "bin/empty": b"", "bin/utf8": "température ✓".encode()}


def test_anonymous_publish_to_devices_topic_is_not_delivered(server, clients):
    watcher = clients.paho(server.mqtt_port)
    assert watcher.subscribe([("#", 1), ("+/x/telemetry", 1)]) == [1, 1]
    intruder = clients.raw(server.mqtt_port)
    intruder.connect(unique("intruder"))
    intruder.try_send(publish("devices/x/telemetry", b'{"temperature": 99}', qos=0))
    intruder.try_send(publish("devices/x/telemetry", b'{"temperature": 98}', qos=1, pid=5))
    time.sleep(0.2)  # the broker may answer (PUBACK) or disconnect; either way: no delivery
    p = clients.paho(server.mqtt_port)
    p.publish("anon/sentinel", b"s", qos=1)
    got = [(m.topic, m.payload) for m in watcher.get_until("anon/sentinel")]
    assert got == [("anon/sentinel", b"s")]


def test_anonymous_subscribe_to_devices_topics_refused_with_0x80(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("anon-sub"))
    codes = c.subscribe([("devices/#", 1), ("devices/x/config", 0), ("public/t", 1)])
    assert codes == [0x80, 0x80, 1]


def test_unsubscribe_matches_filters_character_by_character(server, clients):
    c = clients.raw(server.mqtt_port)
    c.connect(unique("unsub-exact"))
    assert c.subscribe([("ux/+", 1)]) == [1]
    c.send(unsubscribe(4, ["ux/a", "ux/#"]))  # neither is the subscribed filter [MQTT-3.10.4-1]
    c.expect(UNSUBACK)
    clients.paho(server.mqtt_port).publish("ux/a", b"still", qos=1)
    m = c.expect(PUBLISH)
    assert m.payload == b"still"


def test_large_payload_round_trips_under_default_limit(server, clients):
    sub = clients.paho(server.mqtt_port)
    sub.subscribe("large/t", 1)
    pub = clients.paho(server.mqtt_port)
    blob = bytes(range(256)) * 2048  # 512 KiB
    pub.publish("large/t", blob, qos=1, timeout=10)
    assert sub.get(10).payload == blob
