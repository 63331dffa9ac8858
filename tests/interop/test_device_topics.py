"""The cloud → device topics are the server's (SPEC "MQTT topics"): a device may not publish
its own `devices/{id}/config` (the retained desired config) or `devices/{id}/firmware` (the
firmware notice). MQTT 5 gets PUBACK 0x87 Not authorized, MQTT 3.1.1 (mosquitto_pub) is
acknowledged, dropped and counted in `stratus_mqtt_denied_total{action="publish"}`; the
retained desired config stays the server's, and `devices/{id}/config/reported` still works."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import requests

from cloud import ADMIN_SECRET, Cloud


def denied_publishes(cloud: Cloud) -> int:
    body = requests.get(cloud.url("/metrics"), timeout=5).text
    m = re.search(r'^stratus_mqtt_denied_total\{action="publish"\} (\d+)', body, re.M)
    return int(m.group(1)) if m else 0


def retained_config(srv, dev: str, secret: str) -> str:
    """The retained `devices/{dev}/config`, as mosquitto_sub sees it ("" if none)."""
    sub = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                          "-u", dev, "-P", secret, "-t", f"devices/{dev}/config", "-C", "1", "-W", "3"],
                         capture_output=True, text=True, timeout=20)
    return sub.stdout.strip()


def desired(cloud: Cloud, dev: str) -> dict:
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}/config"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_device_cannot_publish_its_desired_config_but_can_report(start_server):
    srv = start_server("topics", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    r = requests.put(cloud.url(f"/api/v1/devices/{dev}/config"), json={"interval": 5},
                     headers={**cloud.admin, "If-Match": '"0"'}, timeout=10)
    assert r.status_code == 200, r.text
    before = retained_config(srv, dev, secret)
    assert before and json.loads(before)["config"] == {"interval": 5}, before

    # MQTT 5 (paho): 0x87 for the cloud → device topics, success for the reported config
    acks = {}
    cond = threading.Condition()

    def on_publish(client, userdata, mid, reason_code, properties):
        with cond:
            acks[mid] = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
            cond.notify_all()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
    c.username_pw_set(dev, secret)
    c.on_publish = on_publish
    c.connect("127.0.0.1", srv.mqtt_port)
    c.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not c.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.is_connected()

        def ack(topic, payload, retain=False):
            info = c.publish(topic, payload, qos=1, retain=retain)
            with cond:
                assert cond.wait_for(lambda: info.mid in acks, 5), topic
                return acks[info.mid]

        n0 = denied_publishes(cloud)
        forged = json.dumps({"version": 99, "config": {"interval": 1}})
        assert ack(f"devices/{dev}/config", forged, retain=True) == 0x87
        assert ack(f"devices/{dev}/firmware", json.dumps({"firmware": "x"}), retain=True) == 0x87
        assert denied_publishes(cloud) == n0 + 2
        assert ack(f"devices/{dev}/config/reported", json.dumps({"interval": 5})) == 0
        assert c.is_connected(), "a refused publish does not cost the connection"
    finally:
        c.loop_stop()
        c.disconnect()
    shown = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10).json()
    assert shown["reported"]["config"] == {"interval": 5}

    # MQTT 3.1.1 (mosquitto_pub): acknowledged, dropped and counted
    n1 = denied_publishes(cloud)
    pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                          "-u", dev, "-P", secret, "-i", f"{dev}", "-q", "1", "-r",
                          "-t", f"devices/{dev}/config", "-m", forged],
                         capture_output=True, text=True, timeout=20)
    assert pub.returncode == 0, pub.stderr
    deadline = time.monotonic() + 5
    while denied_publishes(cloud) < n1 + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert denied_publishes(cloud) == n1 + 1

    # the retained desired config and the stored one are still the server's
    assert json.loads(retained_config(srv, dev, secret)) == json.loads(before)
    assert desired(cloud, dev)["config"] == {"interval": 5}
    assert desired(cloud, dev)["version"] == 1
