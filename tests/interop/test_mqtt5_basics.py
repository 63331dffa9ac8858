"""MQTT 5.0 clients on the same listener as 3.1.1 ones: what works before the v5 broker
features land (issue 4). v5 CONNECT is accepted, messages flow both ways between v5 and
3.1.1 clients, and every QoS round-trips for a v5 client."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class V5:
    def __init__(self, port):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("v5"), protocol=mqtt.MQTTv5)
        self.connected = threading.Event()
        self.reason = None
        self.msgs = []
        self.got = threading.Event()
        self.subscribed = threading.Event()

        def on_connect(c, u, flags, reason, props):
            self.reason = reason
            self.connected.set()

        def on_message(c, u, m):
            self.msgs.append(m)
            self.got.set()

        self.c.on_connect = on_connect
        self.c.on_message = on_message
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_v5_connect_is_accepted(server):
    v = V5(server.mqtt_port)
    try:
        assert not v.reason.is_failure
    finally:
        v.close()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_v5_client_round_trips_each_qos(server, qos):
    v = V5(server.mqtt_port)
    try:
        topic = unique("v5/t")
        v.c.subscribe(topic, qos=qos)
        assert v.subscribed.wait(5)
        v.c.publish(topic, b"x" * 10, qos=qos)
        assert v.got.wait(5)
        assert v.msgs[0].payload == b"x" * 10
        assert v.msgs[0].qos == qos
    finally:
        v.close()


def test_v5_and_v311_clients_exchange_messages(server, clients):
    v = V5(server.mqtt_port)
    try:
        topic = unique("mix")
        v.c.subscribe(topic, qos=1)
        assert v.subscribed.wait(5)
        old = clients.paho(server.mqtt_port)
        old.publish(topic, b"from-311", qos=1)
        assert v.got.wait(5)
        assert v.msgs[0].payload == b"from-311"
        back = unique("mix-back")
        old.subscribe(back, 1)
        v.c.publish(back, b"from-5", qos=1)
        assert old.get().payload == b"from-5"
    finally:
        v.close()


def test_mosquitto_v5_clients_with_user_properties(server):
    topic = unique("mosq5")
    sub = subprocess.Popen(["mosquitto_sub", "-V", "mqttv5", "-p", str(server.mqtt_port), "-h", "127.0.0.1",
                            "-t", topic, "-C", "1", "-W", "8", "-q", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    pub = subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(server.mqtt_port), "-h", "127.0.0.1",
                          "-t", topic, "-m", "five", "-q", "1", "-D", "publish", "user-property", "k", "v"],
                         capture_output=True, text=True, timeout=10)
    out, err = sub.communicate(timeout=10)
    assert pub.returncode == 0, pub.stderr
    assert out.strip() == "five", err
