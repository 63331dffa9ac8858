"""Interop with the Eclipse Mosquitto command-line clients (mosquitto_pub / mosquitto_sub, MQTT 3.1.1)."""

import re
import signal
import time

import pytest

from clients import mosquitto_pub, unique


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_sub_round_trip(server, clients, qos):
    sub = clients.mosq_sub(server.mqtt_port, "rt/topic", qos=qos)
    mosquitto_pub(server.mqtt_port, "rt/topic", f"hello qos{qos}", qos=qos)
    assert sub.wait_messages(1) == [("rt/topic", f"hello qos{qos}")]
    assert sub.publishes[0]["qos"] == qos


def test_mosquitto_qos2_messages_arrive_exactly_once(server, clients):
    sub = clients.mosq_sub(server.mqtt_port, "eo/topic", qos=2)
    for i in range(5):
        mosquitto_pub(server.mqtt_port, "eo/topic", f"m{i}", qos=2)
    sub.wait_messages(5)
    time.sleep(0.5)  # any duplicate would show up by now
    assert sub.snapshot() == [("eo/topic", f"m{i}") for i in range(5)]
    assert [p["qos"] for p in sub.publishes] == [2] * 5


def test_mosquitto_retained_message_delivered_to_later_subscriber(server, clients):
    mosquitto_pub(server.mqtt_port, "ret/a", "kept", qos=1, retain=True)
    sub = clients.mosq_sub(server.mqtt_port, "ret/a", extra=["-C", "1", "-W", "5"])
    assert sub.wait_messages(1) == [("ret/a", "kept")]
    assert sub.publishes[0]["retain"] == 1
    assert sub.wait_exit() == 0


def test_mosquitto_retained_message_has_retain_flag_for_paho_subscriber(server, clients):
    mosquitto_pub(server.mqtt_port, "ret/p", "kept", qos=1, retain=True)
    p = clients.paho(server.mqtt_port)
    assert p.subscribe("ret/p", 1) == [1]
    msg = p.get()
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == ("ret/p", b"kept", True, 1)


@pytest.mark.parametrize("flt", ["ret/+/y", "ret/#", "+/x/+", "#"])
def test_mosquitto_retained_message_delivered_through_wildcards(server, clients, flt):
    mosquitto_pub(server.mqtt_port, "ret/x/y", "wild", retain=True)
    sub = clients.mosq_sub(server.mqtt_port, flt, extra=["-C", "1", "-W", "5"])
    assert sub.wait_messages(1) == [("ret/x/y", "wild")]
    assert sub.publishes[0]["retain"] == 1


def test_mosquitto_retained_message_cleared_by_empty_retained_publish(server, clients):
    mosquitto_pub(server.mqtt_port, "ret/clear", "old", qos=1, retain=True)
    mosquitto_pub(server.mqtt_port, "ret/clear", qos=1, retain=True, null=True)
    mosquitto_pub(server.mqtt_port, "ret/other", "still-here", qos=1, retain=True)
    sub = clients.mosq_sub(server.mqtt_port, "ret/#")
    msgs = sub.wait_for("ret/other")
    time.sleep(0.3)
    assert sub.snapshot() == [("ret/other", "still-here")], msgs


def test_mosquitto_single_level_wildcard_matching(server, clients):
    sub = clients.mosq_sub(server.mqtt_port, "a/+/c", qos=1)
    for topic in ["a/b/c", "a/b/d", "a/b/c/d", "a/c", "x/b/c", "a//c", "a/b"]:
        mosquitto_pub(server.mqtt_port, topic, topic, qos=1)
    mosquitto_pub(server.mqtt_port, "a/end/c", "end", qos=1)
    sub.wait_for("a/end/c")
    time.sleep(0.2)
    assert [t for t, _ in sub.snapshot()] == ["a/b/c", "a//c", "a/end/c"]


def test_mosquitto_multi_level_wildcard_matching(server, clients):
    sub = clients.mosq_sub(server.mqtt_port, "a/#", qos=1)
    for topic in ["a", "a/b", "a/b/c/d", "b/a", "ab", "A/b", "/a"]:
        mosquitto_pub(server.mqtt_port, topic, "x", qos=1)
    mosquitto_pub(server.mqtt_port, "a/end", "end", qos=1)
    sub.wait_for("a/end")
    time.sleep(0.2)
    assert [t for t, _ in sub.snapshot()] == ["a", "a/b", "a/b/c/d", "a/end"]


def test_mosquitto_hash_does_not_match_sys_topics(start_server, clients):
    srv = start_server(config="[mqtt]\nsys_interval_secs = 1\n")
    sub = clients.mosq_sub(srv.mqtt_port, ["#", "+/broker/#"])
    # $SYS topics are retained and republished every second: wait > 1 interval
    time.sleep(1.5)
    mosquitto_pub(srv.mqtt_port, "plain/topic", "x")
    sub.wait_for("plain/topic")
    time.sleep(0.2)
    assert [t for t, _ in sub.snapshot()] == ["plain/topic"]


def test_mosquitto_sys_broker_topics_readable_by_explicit_subscription(server, clients):
    topics = ["$SYS/broker/version", "$SYS/broker/uptime", "$SYS/broker/clients/connected"]
    sub = clients.mosq_sub(server.mqtt_port, topics)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and {t for t, _ in sub.snapshot()} != set(topics):
        time.sleep(0.05)
    got = {}
    for t, payload in sub.snapshot():
        got.setdefault(t, payload)
    assert set(got) == set(topics), f"$SYS topics did not arrive within 3s: {sub.lines}"
    assert got["$SYS/broker/version"].strip(), "empty version"
    assert re.match(r"^\d+", got["$SYS/broker/uptime"]), got["$SYS/broker/uptime"]
    assert re.fullmatch(r"\d+", got["$SYS/broker/clients/connected"]), got
    # retained: delivered at subscription time with RETAIN=1
    first = {}
    for p in sub.publishes:
        first.setdefault(p["topic"], p)
    assert all(first[t]["retain"] == 1 for t in topics), sub.publishes


def test_mosquitto_will_delivered_when_client_killed(server, clients):
    watcher = clients.mosq_sub(server.mqtt_port, "will/+", qos=1)
    doomed = clients.mosq_sub(server.mqtt_port, "unrelated/topic",
                              extra=["--will-topic", "will/doomed", "--will-payload", "gone",
                                     "--will-qos", "1"])
    doomed.kill(signal.SIGKILL)
    assert watcher.wait_messages(1, timeout=5) == [("will/doomed", "gone")]


def test_mosquitto_no_will_after_clean_disconnect(server, clients):
    watcher = clients.mosq_sub(server.mqtt_port, "will/+", qos=1)
    polite = clients.mosq_sub(server.mqtt_port, "polite/topic",
                              extra=["-C", "1", "--will-topic", "will/polite",
                                     "--will-payload", "should-not-appear"])
    mosquitto_pub(server.mqtt_port, "polite/topic", "bye", qos=1)
    assert polite.wait_exit() == 0  # exits normally after one message, sending DISCONNECT
    mosquitto_pub(server.mqtt_port, "will/sentinel", "s", qos=1)
    watcher.wait_for("will/sentinel")
    time.sleep(0.3)
    assert watcher.snapshot() == [("will/sentinel", "s")]


def test_mosquitto_persistent_session_receives_messages_published_while_offline(server, clients):
    cid = unique("persist")
    first = clients.mosq_sub(server.mqtt_port, "offline/q1", qos=1, client_id=cid,
                             extra=["-c", "-E"])
    assert first.wait_exit() == 0  # subscribed, then clean DISCONNECT
    for i in range(3):
        mosquitto_pub(server.mqtt_port, "offline/q1", f"while-away-{i}", qos=1)
    again = clients.mosq_sub(server.mqtt_port, "offline/q1", qos=1, client_id=cid,
                             extra=["-c", "-C", "3", "-W", "5"], wait=False)
    msgs = again.wait_messages(3)
    assert msgs == [("offline/q1", f"while-away-{i}") for i in range(3)]
    assert again.wait_exit() == 0


def test_mosquitto_pub_and_paho_interoperate(server, clients):
    p = clients.paho(server.mqtt_port)
    p.subscribe("mix/#", 2)
    mosquitto_pub(server.mqtt_port, "mix/a", "from-mosquitto", qos=2)
    msg = p.get()
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("mix/a", b"from-mosquitto", 2, False)
    sub = clients.mosq_sub(server.mqtt_port, "mix2/#", qos=1)
    p.publish("mix2/b", b"from-paho", qos=1)
    assert sub.wait_messages(1) == [("mix2/b", "from-paho")]



def test_mosquitto_sys_hash_subscription_receives_broker_topics(server, clients):
    sub = clients.mosq_sub(server.mqtt_port, "$SYS/#")
    msgs = sub.wait_for("$SYS/broker/version", timeout=3)
    assert all(t.startswith("$SYS/broker/") for t, _ in msgs), msgs


def test_sys_clients_connected_counts_connected_clients(start_server, clients):
    srv = start_server(config="[mqtt]\nsys_interval_secs = 1\n")
    extra = [clients.paho(srv.mqtt_port) for _ in range(4)]
    watcher = clients.paho(srv.mqtt_port)
    watcher.subscribe("$SYS/broker/clients/connected", 0)
    deadline = time.monotonic() + 4
    values = []
    while time.monotonic() < deadline:
        for m in watcher.drain(0.2):
            values.append(int(m.payload))
        if values and values[-1] >= len(extra) + 1:
            break
    assert values and values[-1] >= len(extra) + 1, values
    for c in extra:
        c.disconnect()
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        for m in watcher.drain(0.2):
            values.append(int(m.payload))
        if values[-1] <= 2:
            break
    assert values[-1] <= 2, f"disconnected clients still counted: {values}"
