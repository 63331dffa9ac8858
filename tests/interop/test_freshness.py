"""Per-device freshness (replay protection, issue #19 point 7): a device whose own policy
`require_freshness` is on gets HTTP 409 / CoAP 4.09 / MQTT v5 0x99 (v3: dropped and counted)
for a message without `sent` and `nonce`, while another device is accepted. The policy is set
with `PATCH /api/v1/devices/{id}` and with `stratus device set` (through the API and on a
stopped server's data dir), shows in the device JSON, and survives a restart."""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from cloud import ADMIN_SECRET, Cloud, unique
from stratus_server import clean_env, stratus_bin


@pytest.fixture
def cloud(start_server):
    srv = start_server("fresh", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                       start=False)
    srv.start(wait=("mqtt", "http", "coap"))
    return Cloud(srv)


def now_ms() -> int:
    return int(time.time() * 1000)


def fresh(**values) -> dict:
    return {"sent": now_ms(), "nonce": unique("n"), **values}


def patch(cloud, dev, body, content_type="application/merge-patch+json"):
    return requests.patch(cloud.url(f"/api/v1/devices/{dev}"), data=json.dumps(body),
                          headers={**cloud.admin, "Content-Type": content_type}, timeout=10)


def device_json(cloud, dev) -> dict:
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def cli(*args, server=None):
    cmd = [stratus_bin(), "device", *args]
    if server is not None:
        cmd += ["--server", server]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env=clean_env({"STRATUS_ADMIN_SECRET": ADMIN_SECRET}))


def test_http_strict_device_gets_409_and_another_device_is_accepted(cloud):
    strict, s_secret = cloud.add_device()
    lax, l_secret = cloud.add_device()
    assert device_json(cloud, strict)["require_freshness"] is False
    r = patch(cloud, strict, {"require_freshness": True})
    assert r.status_code == 200, r.text
    assert r.json()["require_freshness"] is True
    sh, lh = cloud.device_headers(strict, s_secret), cloud.device_headers(lax, l_secret)
    r = cloud.post(sh, {"v": 1})
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "replay"
    assert "sent" in r.json()["error_description"]
    # An array without an envelope carries no sent/nonce either.
    assert cloud.post(sh, [{"v": 1}, {"v": 2}]).status_code == 409
    assert cloud.points(strict, "v") == []
    assert cloud.post(sh, fresh(v=3)).status_code == 202
    env = {"sent": now_ms(), "nonce": unique("n"), "records": [{"v": 4}]}
    assert cloud.post(sh, env).status_code == 202
    assert cloud.post(sh, env).status_code == 409, "the nonce is used"
    assert [p["value"] for p in cloud.points(strict, "v")] == [3, 4]
    assert cloud.post(lh, {"v": 9}).status_code == 202, "the other device needs no freshness"
    assert device_json(cloud, lax)["require_freshness"] is False
    # Switched off: accepted again (application/json is a merge patch too).
    r = patch(cloud, strict, {"require_freshness": False}, content_type="application/json")
    assert r.status_code == 200 and r.json()["require_freshness"] is False
    assert cloud.post(sh, {"v": 5}).status_code == 202


def test_patch_validates_the_flag_and_keeps_attributes(cloud):
    dev, _ = cloud.add_device(attributes={"site": "north"})
    for bad in ({"require_freshness": "yes"}, {"require_freshness": None}, {"require_freshness": 1}):
        r = patch(cloud, dev, bad)
        assert r.status_code == 400, (bad, r.text)
        assert "require_freshness" in r.json()["error_description"]
    r = patch(cloud, dev, {"require_freshness": True, "attributes": {"floor": 2}})
    assert r.status_code == 200, r.text
    assert r.json()["attributes"] == {"site": "north", "floor": 2}
    assert r.json()["require_freshness"] is True
    r = requests.patch(cloud.url(f"/api/v1/devices/{dev}"), json={"require_freshness": False}, timeout=10)
    assert r.status_code == 401
    listed = requests.get(cloud.url("/api/v1/devices"), headers=cloud.admin, timeout=10).json()["devices"]
    assert [d["require_freshness"] for d in listed if d["id"] == dev] == [True]
    audit = requests.get(cloud.url("/api/v1/audit"), headers=cloud.admin, timeout=10)
    if audit.status_code == 200:
        assert "device.update" in audit.text
    # The OpenAPI document describes the flag in the device and in the patch.
    doc = requests.get(cloud.url("/api/openapi.json"), timeout=10).json()
    schemas = doc["components"]["schemas"]
    assert schemas["DeviceView"]["properties"]["require_freshness"]["type"] == "boolean"
    assert "require_freshness" in schemas["DevicePatchBody"]["properties"]
    body = doc["paths"]["/api/v1/devices/{id}"]["patch"]["requestBody"]["content"]
    assert body["application/merge-patch+json"]["schema"]["$ref"].endswith("/DevicePatchBody")


def mqtt_device(port, dev, secret, protocol):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev, protocol=protocol)
    c.username_pw_set(dev, secret)
    acks: queue.Queue = queue.Queue()
    connected = threading.Event()
    c.on_connect = lambda cl, u, f, reason, p: connected.set()
    c.on_publish = lambda cl, u, mid, reason, p: acks.put(reason.value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(5)
    return c, acks


def test_mqtt_v5_strict_device_gets_0x99_and_v3_is_dropped_and_counted(cloud):
    strict, s_secret = cloud.add_device()
    lax, l_secret = cloud.add_device()
    assert patch(cloud, strict, {"require_freshness": True}).status_code == 200
    port = cloud.srv.mqtt_port
    c5, acks = mqtt_device(port, strict, s_secret, mqtt.MQTTv5)
    c5.publish(f"devices/{strict}/telemetry", json.dumps({"v": 1}), qos=1)
    assert acks.get(timeout=5) == 0x99
    c5.publish(f"devices/{strict}/telemetry", json.dumps(fresh(v=2)), qos=1)
    assert acks.get(timeout=5) == 0x00
    c5.loop_stop()
    c5.disconnect()
    l5, lacks = mqtt_device(port, lax, l_secret, mqtt.MQTTv5)
    l5.publish(f"devices/{lax}/telemetry", json.dumps({"v": 7}), qos=1)
    assert lacks.get(timeout=5) == 0x00, "the other device needs no freshness"
    l5.loop_stop()
    l5.disconnect()
    before = cloud.metric("stratus_telemetry_rejected", reason="replay")
    c3, acks3 = mqtt_device(port, strict, s_secret, mqtt.MQTTv311)
    c3.publish(f"devices/{strict}/telemetry", json.dumps({"v": 3}), qos=1)
    acks3.get(timeout=5)  # 3.1.1 cannot refuse: acknowledged, dropped
    c3.loop_stop()
    c3.disconnect()
    assert cloud.metric("stratus_telemetry_rejected", reason="replay") == before + 1
    assert [p["value"] for p in cloud.points(strict, "v")] == [2]
    assert [p["value"] for p in cloud.points(lax, "v")] == [7]


def coap_post(cloud, token, body):
    client = shutil.which("coap-client-notls")
    if client is None:
        pytest.skip("coap-client-notls (libcoap3-bin) is not installed")
    opts = []
    for i in range(0, len(token), 200):
        opts += ["-O", f"15,token={token[i:i + 200]}"]
    url = f"coap://127.0.0.1:{cloud.srv.coap_port}/telemetry"
    out = subprocess.run([client, *opts, "-v", "6", "-m", "post", "-t", "50", "-e", json.dumps(body), url],
                         capture_output=True, text=True, timeout=20)
    return out.stdout + out.stderr


def test_coap_strict_device_gets_4_09_and_another_device_is_accepted(cloud):
    strict, s_secret = cloud.add_device()
    lax, l_secret = cloud.add_device()
    assert patch(cloud, strict, {"require_freshness": True}).status_code == 200
    st, lt = cloud.token(strict, s_secret), cloud.token(lax, l_secret)
    text = coap_post(cloud, st, {"v": 1})
    assert "c:4.09" in text, text
    text = coap_post(cloud, st, fresh(v=2))
    assert "c:2.04" in text, text
    text = coap_post(cloud, lt, {"v": 3})
    assert "c:2.04" in text, text
    assert [p["value"] for p in cloud.points(strict, "v")] == [2]


def test_the_cli_sets_the_policy_and_it_survives_a_restart(cloud):
    srv = cloud.srv
    strict, s_secret = cloud.add_device()
    offline, o_secret = cloud.add_device()
    base = f"http://127.0.0.1:{srv.http_port}"
    out = cli("set", strict, "--require-freshness", "on", server=base)
    assert out.returncode == 0, out.stderr
    assert "freshness:  required" in out.stdout, out.stdout
    shown = cli("show", strict, "--json", server=base)
    assert json.loads(shown.stdout)["require_freshness"] is True
    bad = cli("set", strict, "--require-freshness", "maybe", server=base)
    assert bad.returncode == 2
    nothing = cli("set", strict, server=base)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    # On a stopped server's data dir, then a restart: both policies are in force.
    srv.stop()
    out = cli("set", offline, "--require-freshness", "on", "--data-dir", str(srv.data_dir))
    assert out.returncode == 0, out.stderr
    srv.start(mqtt_port=srv.mqtt_port, http_port=srv.http_port, wait=("mqtt", "http", "coap"))
    cloud = Cloud(srv)
    for dev, secret in ((strict, s_secret), (offline, o_secret)):
        assert device_json(cloud, dev)["require_freshness"] is True
        h = cloud.device_headers(dev, secret)
        assert cloud.post(h, {"v": 1}).status_code == 409, dev
        assert cloud.post(h, fresh(v=2)).status_code == 202, dev
    other, o2 = cloud.add_device()
    assert cloud.post(cloud.device_headers(other, o2), {"v": 1}).status_code == 202
