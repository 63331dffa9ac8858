"""Rules, alarms, device status and the live stream (issue #9), against a real server with
real clients: rules made with `requests`, readings from mosquitto_pub / paho / HTTP, a
republished alarm read by mosquitto_sub, webhooks received by a Python http.server, the SSE
stream read with `requests` and a raw socket."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from cloud import ADMIN_SECRET, Cloud, unique


@pytest.fixture
def cloud(start_server):
    srv = start_server("rules", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                       config="[rules]\noffline_after_secs = 3\n")
    return Cloud(srv)


def add_rule(cloud, body, status=201):
    r = requests.post(cloud.url("/api/v1/rules"), json=body, headers=cloud.admin, timeout=10)
    assert r.status_code == status, r.text
    return r.json()


def alarms(cloud, **params):
    r = requests.get(cloud.url("/api/v1/alarms"), params=params, headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["alarms"]


def wait_for(what, fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout}s (last: {last!r})")


def mosq_pub(cloud, dev, secret, payload):
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cloud.srv.mqtt_port), "-u", dev, "-P", secret,
                    "-q", "1", "-t", f"devices/{dev}/telemetry", "-m", json.dumps(payload)],
                   check=True, timeout=10)


def device_json(cloud, dev):
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------ rules and alarms

def test_alarm_lifecycle_from_mosquitto_pub_readings(cloud):
    dev, secret = cloud.add_device()
    rule = add_rule(cloud, {"id": unique("hot"), "name": "Too hot", "condition": "temperature > 30",
                            "severity": "critical", "selector": {"devices": [dev]}})
    assert rule["actions"] == [{"type": "alarm"}] and rule["enabled"] is True
    listed = requests.get(cloud.url("/api/v1/rules"), headers=cloud.admin, timeout=10).json()["rules"]
    assert [r["id"] for r in listed] == [rule["id"]]
    assert requests.get(cloud.url(f"/api/v1/rules/{rule['id']}"), headers=cloud.admin,
                        timeout=10).json()["condition"] == "temperature > 30"

    mosq_pub(cloud, dev, secret, {"temperature": 20})
    mosq_pub(cloud, dev, secret, {"temperature": 31.5, "humidity": 40})
    (alarm,) = wait_for("an active alarm", lambda: alarms(cloud, device=dev, state="active"))
    assert alarm["rule"] == rule["id"] and alarm["device"] == dev
    assert alarm["severity"] == "critical" and alarm["state"] == "active"
    assert alarm["value"] == {"temperature": 31.5, "humidity": 40}
    assert isinstance(alarm["raised_at"], int) and alarm["acked_at"] is None and alarm["cleared_at"] is None
    assert device_json(cloud, dev)["open_alarms"] == 1

    mosq_pub(cloud, dev, secret, {"temperature": 35})  # still hot: still one open alarm
    r = requests.post(cloud.url(f"/api/v1/alarms/{alarm['id']}/ack"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "acknowledged" and isinstance(r.json()["acked_at"], int)
    (open_alarm,) = alarms(cloud, device=dev, state="open")
    assert open_alarm["id"] == alarm["id"] and open_alarm["state"] == "acknowledged"

    mosq_pub(cloud, dev, secret, {"temperature": 22})
    (cleared,) = wait_for("the cleared alarm", lambda: alarms(cloud, device=dev, state="cleared"))
    assert cleared["id"] == alarm["id"] and isinstance(cleared["cleared_at"], int)
    assert cleared["acked_at"] == r.json()["acked_at"]
    assert alarms(cloud, device=dev, state="open") == []
    assert device_json(cloud, dev)["open_alarms"] == 0
    r = requests.post(cloud.url(f"/api/v1/alarms/{alarm['id']}/ack"), headers=cloud.admin, timeout=10)
    assert r.status_code == 409, "cleared is final"
    r = requests.post(cloud.url("/api/v1/alarms/nope/ack"), headers=cloud.admin, timeout=10)
    assert r.status_code == 404

    # A second episode is a new alarm; history is kept, newest first.
    mosq_pub(cloud, dev, secret, {"temperature": 40})
    wait_for("a second alarm", lambda: alarms(cloud, device=dev, state="active"))
    history = alarms(cloud, device=dev)
    assert len(history) == 2 and history[1]["id"] == alarm["id"]
    assert len(alarms(cloud, device=dev, limit=1)) == 1

    r = requests.delete(cloud.url(f"/api/v1/rules/{rule['id']}"), headers=cloud.admin, timeout=10)
    assert r.status_code == 204
    assert requests.get(cloud.url(f"/api/v1/rules/{rule['id']}"), headers=cloud.admin, timeout=10).status_code == 404
    wait_for("its open alarm cleared", lambda: alarms(cloud, device=dev, state="open") == [])
    assert requests.delete(cloud.url(f"/api/v1/rules/{rule['id']}"), headers=cloud.admin,
                           timeout=10).status_code == 404


def test_invalid_rules_are_400_naming_the_position(cloud):
    r = requests.post(cloud.url("/api/v1/rules"), json={"condition": "temperature > "},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "invalid_rule"
    assert "line 1 column 15" in body["error_description"], body
    r = requests.post(cloud.url("/api/v1/rules"), json={"condition": "a > 1 &&\n (b < 2"},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 400 and "line 2 column" in r.json()["error_description"], r.text
    for bad in [{"condition": "t > 1", "severity": "dire"}, {"condition": "t > 1", "bogus": 1},
                {"kind": "silent"}, {"condition": "t > 1", "actions": [{"type": "webhook", "url": "ftp://x"}]}]:
        r = requests.post(cloud.url("/api/v1/rules"), json=bad, headers=cloud.admin, timeout=10)
        assert r.status_code == 400 and r.json()["error"] == "invalid_rule", (bad, r.text)
    for hostile in ["(" * 5000 + "a" + ")" * 5000, "!" * 3000 + "a", " + ".join(["a"] * 200) + " > 1",
                    "a > 1 &&", "'unterminated", "\u0000", "a" * 100000]:
        r = requests.post(cloud.url("/api/v1/rules"), json={"condition": hostile}, headers=cloud.admin, timeout=10)
        assert r.status_code in (400, 413) and r.json()["error"] in ("invalid_rule", "payload_too_large"), r.text
    assert requests.get(cloud.url("/healthz"), timeout=10).status_code == 200
    dev, secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    r = requests.post(cloud.url("/api/v1/rules"), json={"condition": "t > 1"}, headers=h, timeout=10)
    assert r.status_code == 403
    assert requests.get(cloud.url("/api/v1/rules"), timeout=10).status_code == 401
    assert requests.get(cloud.url("/api/v1/rules"), headers=cloud.admin, timeout=10).json() == {"rules": []}


def test_generated_ids_rate_and_for_s_and_rules_survive_restart(cloud):
    dev, secret = cloud.add_device(attributes={"site": "a"})
    h = cloud.device_headers(dev, secret)
    rising = add_rule(cloud, {"condition": "rate(temperature) > 0.5", "selector": {"attributes": {"site": "a"}}})
    assert rising["id"]
    slow = add_rule(cloud, {"id": unique("slow"), "condition": "pressure > 10", "for_s": 2})
    t0 = int(time.time() * 1000)
    assert cloud.post(h, [{"ts": t0 - 20000, "temperature": 20}, {"ts": t0 - 10000, "temperature": 24}]).status_code == 202
    assert cloud.post(h, {"ts": t0, "temperature": 34, "pressure": 11}).status_code == 202
    (a,) = wait_for("the rate alarm", lambda: alarms(cloud, rule=rising["id"], state="active"))
    assert a["value"]["temperature"] == 34
    assert alarms(cloud, rule=slow["id"]) == [], "for_s: not yet"
    (s,) = wait_for("the for_s alarm", lambda: alarms(cloud, rule=slow["id"], state="active"), timeout=6)
    assert s["raised_at"] - t0 >= 1900

    cloud.srv.restart()
    listed = requests.get(cloud.url("/api/v1/rules"), headers=cloud.admin, timeout=10).json()["rules"]
    assert {r["id"] for r in listed} == {rising["id"], slow["id"]}
    assert {x["id"] for x in alarms(cloud, state="open")} == {a["id"], s["id"]}
    h = cloud.device_headers(dev, secret)
    assert cloud.post(h, {"pressure": 5}).status_code == 202
    (cleared,) = wait_for("the restored alarm cleared", lambda: alarms(cloud, rule=slow["id"], state="cleared"))
    assert cleared["id"] == s["id"]


def test_silent_rule_fires_and_clears(cloud):
    dev, secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    rule = add_rule(cloud, {"id": unique("quiet"), "kind": "silent", "silent_s": 2, "severity": "warning",
                            "selector": {"id_glob": dev[:5] + "*"}})
    assert cloud.post(h, {"v": 1}).status_code == 202
    (a,) = wait_for("the silent alarm", lambda: alarms(cloud, rule=rule["id"], state="active"), timeout=8)
    assert a["device"] == dev and "last_seen" in a["value"] and a["severity"] == "warning"
    assert cloud.post(h, {"v": 2}).status_code == 202
    wait_for("the silent alarm cleared", lambda: alarms(cloud, rule=rule["id"], state="cleared"))


# ------------------------------------------------------------------ actions

def test_republish_action_reaches_mosquitto_sub(cloud, clients):
    dev, secret = cloud.add_device()
    add_rule(cloud, {"id": unique("rep"), "condition": "battery < 15", "selector": {"devices": [dev]},
                     "actions": [{"type": "republish", "topic": "alerts/{device}", "qos": 1}]})
    sub = clients.mosq_sub(cloud.srv.mqtt_port, f"alerts/{dev}", qos=1, extra=("-u", "admin", "-P", ADMIN_SECRET))
    mosq_pub(cloud, dev, secret, {"battery": 10})
    messages = sub.wait_for(f"alerts/{dev}")
    payload = json.loads(next(p for t, p in messages if t == f"alerts/{dev}"))
    assert payload["state"] == "active" and payload["device"] == dev and payload["value"] == {"battery": 10}
    mosq_pub(cloud, dev, secret, {"battery": 80})
    sub.wait_messages(2)
    assert json.loads(sub.snapshot()[1][1])["state"] == "cleared"
    assert alarms(cloud, device=dev) == [], "no alarm action: no alarm stored"


class Receiver:
    """A local http.server that records POSTed JSON and answers `status`."""

    def __init__(self, status=200):
        self.bodies: list = []
        self.attempts = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                outer.attempts += 1
                if status == 200:
                    outer.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_webhook_action_posts_the_alarm_and_failures_are_retried_and_counted(cloud):
    ok, failing = Receiver(200), Receiver(500)
    try:
        dev, secret = cloud.add_device()
        h = cloud.device_headers(dev, secret)
        add_rule(cloud, {"id": unique("hook"), "condition": "temperature > 30", "selector": {"devices": [dev]},
                         "actions": [{"type": "alarm"}, {"type": "webhook", "url": ok.url},
                                     {"type": "webhook", "url": failing.url, "timeout_ms": 1000, "retries": 2}]})
        before = cloud.metric("stratus_rules_webhook_attempt_failures")
        assert cloud.post(h, {"temperature": 33}).status_code == 202
        wait_for("the webhook", lambda: ok.bodies)
        assert ok.bodies[0]["device"] == dev and ok.bodies[0]["state"] == "active"
        assert ok.bodies[0]["value"] == {"temperature": 33}
        wait_for("three failed attempts", lambda: failing.attempts >= 3)
        wait_for("the give-up counted", lambda: cloud.metric("stratus_rules_webhook_failures") >= 1)
        assert cloud.metric("stratus_rules_webhook_attempt_failures") - before == 3
        assert failing.attempts == 3, "1 try + 2 retries"
    finally:
        ok.close()
        failing.close()


def test_set_config_action_changes_the_desired_config(cloud):
    dev, secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    add_rule(cloud, {"id": unique("fan"), "condition": "temperature > 30", "selector": {"devices": [dev]},
                     "actions": [{"type": "set_config", "key": "fan", "value": "on"}]})

    def desired():
        r = requests.get(cloud.url(f"/api/v1/devices/{dev}/config"), headers=cloud.admin, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    assert desired()["config"] == {}
    assert cloud.post(h, {"temperature": 31}).status_code == 202
    doc = wait_for("the fan on", lambda: (d := desired())["config"] == {"fan": "on"} and d)
    assert doc["version"] == 1


# ------------------------------------------------------------------ connectivity and the stream

class Stream:
    """`GET /api/v1/stream` read by `requests` (stream=True) in a thread."""

    def __init__(self, cloud, params=None, headers=None):
        self.events: list = []
        self.names: list = []
        self.cond = threading.Condition()
        self.resp = requests.get(cloud.url("/api/v1/stream"), params=params, headers=headers or cloud.admin,
                                 stream=True, timeout=30)
        assert self.resp.status_code == 200, self.resp.text
        assert self.resp.headers["content-type"].startswith("text/event-stream")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        name = None
        try:
            for line in self.resp.iter_lines(decode_unicode=True):
                with self.cond:
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        self.events.append(json.loads(line[5:]))
                        self.names.append(name)
                        name = None
                    self.cond.notify_all()
        except Exception:
            pass

    def wait(self, pred, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [e for e in self.events if pred(e)]
                if hits:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{what} not in the stream: {self.events[-10:]}")
                self.cond.wait(min(left, 0.1))

    def close(self):
        self.resp.close()


def test_stream_carries_telemetry_alarms_and_device_status_with_filters(cloud):
    dev, secret = cloud.add_device()
    other, other_secret = cloud.add_device()
    h, oh = cloud.device_headers(dev, secret), cloud.device_headers(other, other_secret)
    add_rule(cloud, {"id": unique("hot"), "condition": "temperature > 30"})
    everything = Stream(cloud)
    only_dev = Stream(cloud, params={"device": dev, "key": "temperature"})
    reader_token = cloud.token("admin", ADMIN_SECRET, scope="telemetry:read")
    as_reader = Stream(cloud, params=[("device", "x"), ("device", other)],
                       headers={"Authorization": f"Bearer {reader_token}"})
    time.sleep(0.3)
    try:
        assert cloud.post(h, {"ts": 1700000000000, "temperature": 31, "humidity": 5}).status_code == 202
        assert cloud.post(oh, {"ts": 1700000000000, "temperature": 10}).status_code == 202
        (t,) = everything.wait(lambda e: e["type"] == "telemetry" and e["device"] == dev, "telemetry")
        assert t == {"type": "telemetry", "device": dev, "ts": 1700000000000,
                     "values": {"temperature": 31, "humidity": 5}}
        (s,) = everything.wait(lambda e: e["type"] == "device_status" and e["device"] == dev, "device status")
        assert s["online"] is True and s["transport"] == "http" and isinstance(s["last_seen"], int)
        (a,) = everything.wait(lambda e: e["type"] == "alarm", "an alarm")
        assert a["alarm"]["device"] == dev and a["alarm"]["state"] == "active"

        only_dev.wait(lambda e: e["type"] == "alarm", "the alarm (filtered stream)")
        with only_dev.cond:
            tel = [e for e in only_dev.events if e["type"] == "telemetry"]
            assert all(e.get("device", e.get("alarm", {}).get("device")) == dev
                       for e in only_dev.events if e["type"] != "alarm")
        assert tel == [{"type": "telemetry", "device": dev, "ts": 1700000000000, "values": {"temperature": 31}}]
        as_reader.wait(lambda e: e["type"] == "telemetry" and e["device"] == other, "the other device")
        with as_reader.cond:
            assert all(e.get("device") == other for e in as_reader.events), as_reader.events

        # HTTP devices go offline after the configured silence (3 s here).
        (off,) = everything.wait(lambda e: e["type"] == "device_status" and e["device"] == dev
                                 and e["online"] is False, "offline", timeout=8)
        assert off["transport"] is None
    finally:
        for s in (everything, only_dev, as_reader):
            s.close()
    dh = cloud.device_headers(dev, secret)
    assert requests.get(cloud.url("/api/v1/stream"), headers=dh, timeout=10).status_code == 403
    assert requests.get(cloud.url("/api/v1/stream"), timeout=10).status_code == 401


def test_mqtt_devices_are_online_while_connected(cloud):
    dev, secret = cloud.add_device()
    stream = Stream(cloud, params={"device": dev})
    time.sleep(0.2)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev)
    c.username_pw_set(dev, secret)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", cloud.srv.mqtt_port)
    c.loop_start()
    try:
        assert connected.wait(5)
        stream.wait(lambda e: e["type"] == "device_status" and e["online"] and e["transport"] == "mqtt", "online")
        d = device_json(cloud, dev)
        assert d["online"] is True and d["last_seen"] is not None and isinstance(d["last_seen_ms"], int)
        listed = requests.get(cloud.url("/api/v1/devices"), headers=cloud.admin, timeout=10).json()["devices"]
        assert next(x for x in listed if x["id"] == dev)["online"] is True
        time.sleep(4)  # longer than offline_after_secs: MQTT devices stay online while connected
        assert device_json(cloud, dev)["online"] is True
    finally:
        c.loop_stop()
        c.disconnect()
    stream.wait(lambda e: e["type"] == "device_status" and e["online"] is False, "offline")
    stream.close()
    assert device_json(cloud, dev)["online"] is False


def test_an_unread_stream_is_dropped_while_ingestion_continues(cloud):
    dev, secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    token = cloud.admin["Authorization"]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", cloud.srv.http_port))
    s.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n".encode())
    time.sleep(0.3)
    before = cloud.metric("stratus_stream_dropped")
    session = requests.Session()
    started = time.monotonic()
    for i in range(40):  # 40 x 500 records, each event ~300 bytes: far beyond the bus and socket buffers
        batch = [{"ts": 1700000000000 + i * 1000 + j, **{f"k{k}": j for k in range(12)}} for j in range(500)]
        r = session.post(cloud.url("/api/v1/telemetry"), json=batch, headers=h, timeout=10)
        assert r.status_code == 202, r.text
    assert time.monotonic() - started < 60, "ingestion was not held up"
    # Now read: the stream ends with the dropped notice.
    s.settimeout(10)
    data = b""
    deadline = time.monotonic() + 20
    while b"event: dropped" not in data and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert b"HTTP/1.1 200" in data[:100]
    assert b"event: dropped" in data
    assert cloud.metric("stratus_stream_dropped") == before + 1
    assert len(cloud.points(dev, "k0", limit=1000)) > 0
