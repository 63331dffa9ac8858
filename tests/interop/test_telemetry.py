"""Telemetry (issue #5): one ingestion pipeline for HTTP and MQTT — the record format of the
SPEC, all-or-nothing validation naming record and field, freshness (replay) rejection, 413,
queries (raw with paging, aggregation, latest), MQTT devices with credentials and their topic
confinement, and kill -9 in the middle of ingestion."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests
from oauthlib.oauth2 import BackendApplicationClient
from requests_oauthlib import OAuth2Session

from cloud import ADMIN_SECRET, Cloud, unique

# oauthlib insists on https; these tests talk to a loopback server over plain HTTP.
os.environ.setdefault("OAUTHLIB_INSECURE_TRANSPORT", "1")


@pytest.fixture
def cloud(start_server):
    srv = start_server("cloud", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET,
                                     "STRATUS_AUDIT__FAILURE_WINDOW_SECS": "1"}, anonymous=False)
    return Cloud(srv)


@pytest.fixture
def device(cloud):
    dev, secret = cloud.add_device(attributes={"room": "lab"})
    return dev, secret, cloud.device_headers(dev, secret)


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------ the record format

def test_seed_format_is_accepted_verbatim_and_measurement_time_is_not_message_time(cloud, device):
    dev, _, h = device
    r = cloud.post(h, {"date": "2018-04-04", "time": "09:30:00", "temperature": 20.1})
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "points": 1, "duplicates": 0}
    assert cloud.points(dev, "temperature") == [{"ts": 1522834200000, "value": 20.1}]


def test_ts_in_ms_and_rfc3339_arrays_and_envelopes(cloud, device):
    dev, _, h = device
    assert cloud.post(h, [{"ts": 1700000000000, "t": 1}, {"ts": "2023-11-14T22:13:21Z", "t": 2}]).status_code == 202
    env = {"sent": now_ms(), "nonce": unique("n"), "records": [{"ts": 1700000002000, "t": 3, "ok": True, "state": "idle"}]}
    assert cloud.post(h, env).status_code == 202
    assert [p["value"] for p in cloud.points(dev, "t")] == [1, 2, 3]
    latest = cloud.latest(dev)
    assert latest["ok"]["value"] is True and latest["state"]["value"] == "idle"


def test_record_without_time_gets_the_receive_time(cloud, device):
    dev, _, h = device
    before = now_ms()
    assert cloud.post(h, {"pressure": 1013}).status_code == 202
    (p,) = cloud.points(dev, "pressure")
    assert before - 1000 <= p["ts"] <= now_ms() + 1000


def test_one_bad_record_rejects_the_request_naming_index_and_field_and_stores_nothing(cloud, device):
    dev, _, h = device
    r = cloud.post(h, [{"ts": 1700000000000, "a": 1}, {"ts": 1700000001000, "a": 2},
                       {"ts": "yesterday", "a": 3}])
    assert r.status_code == 400
    body = r.json()
    assert body["error"] == "invalid_request"
    assert "record 2" in body["error_description"] and '"ts"' in body["error_description"], body
    r = cloud.post(h, [{"ts": 1700000000000, "a": 1}, {"ts": 1700000001000, "a": [1, 2]}])
    assert r.status_code == 400 and "record 1" in r.json()["error_description"]
    assert cloud.points(dev, "a") == []


def test_malformed_json_is_400(cloud, device):
    _, _, h = device
    r = requests.post(cloud.url("/api/v1/telemetry"), data=b'{"t": 1', headers={**h, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_oversized_body_gets_413(start_server):
    srv = start_server("small", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                       config="[http]\nmax_body_bytes = 2048\n")
    c = Cloud(srv)
    dev, secret = c.add_device()
    h = c.device_headers(dev, secret)
    big = [{"ts": 1700000000000 + i, "v": i} for i in range(200)]
    r = c.post(h, big)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == "payload_too_large"
    assert c.points(dev, "v") == []


# ------------------------------------------------------------------ freshness

def test_same_nonce_twice_is_a_replay_and_nothing_of_it_is_stored(cloud, device):
    dev, _, h = device
    nonce = unique("nonce")
    first = {"sent": now_ms(), "nonce": nonce, "records": [{"ts": 1700000000000, "x": 1}]}
    assert cloud.post(h, first).status_code == 202
    again = {"sent": now_ms(), "nonce": nonce, "records": [{"ts": 1700000005000, "x": 2}]}
    r = cloud.post(h, again)
    assert r.status_code == 409 and r.json()["error"] == "replay"
    assert cloud.points(dev, "x") == [{"ts": 1700000000000, "value": 1}]


def test_message_sent_60_s_ago_is_rejected(cloud, device):
    dev, _, h = device
    r = cloud.post(h, {"sent": now_ms() - 60_000, "nonce": unique("n"), "ts": 1700000000000, "y": 1})
    assert r.status_code == 409, r.text
    assert cloud.points(dev, "y") == []


def test_a_refused_message_does_not_burn_its_nonce(cloud, device):
    dev, _, h = device
    nonce = unique("n")
    bad = {"sent": now_ms(), "nonce": nonce, "records": [{"ts": "nope", "z": 1}]}
    assert cloud.post(h, bad).status_code == 400
    good = {"sent": now_ms(), "nonce": nonce, "records": [{"ts": 1700000000000, "z": 1}]}
    assert cloud.post(h, good).status_code == 202


# ------------------------------------------------------------------ authentication

def test_bad_tokens_get_rfc6750_errors_and_are_counted(cloud):
    before = cloud.metric("stratus_auth_failures", transport="http")
    r = requests.post(cloud.url("/api/v1/telemetry"), json={"t": 1}, timeout=10)
    assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
    r = requests.post(cloud.url("/api/v1/telemetry"), json={"t": 1},
                      headers={"Authorization": "Bearer not.a.token"}, timeout=10)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert r.json()["error"] == "invalid_token"
    assert cloud.metric("stratus_auth_failures", transport="http") >= before + 1


def test_an_application_token_cannot_post_telemetry_and_a_device_cannot_read_others(cloud, device):
    r = cloud.post(cloud.admin, {"t": 1})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    other, _ = cloud.add_device()
    _, _, h = device
    r = requests.get(cloud.url(f"/api/v1/devices/{other}/telemetry/latest"), headers=h, timeout=10)
    assert r.status_code == 403


def test_requests_oauthlib_backend_client_fetches_a_token_and_posts(cloud, device):
    dev, secret, _ = device
    session = OAuth2Session(client=BackendApplicationClient(client_id=dev))
    token = session.fetch_token(token_url=cloud.url("/oauth/token"), client_id=dev, client_secret=secret)
    assert token["token_type"] == "Bearer" and token["expires_in"] > 0
    r = session.post(cloud.url("/api/v1/telemetry"), json={"ts": 1700000000000, "rpm": 900})
    assert r.status_code == 202, r.text
    assert cloud.points(dev, "rpm") == [{"ts": 1700000000000, "value": 900}]


# ------------------------------------------------------------------ queries

def test_raw_queries_with_range_limit_and_paging(cloud, device):
    dev, _, h = device
    assert cloud.post(h, [{"ts": 1700000000000 + i * 1000, "v": i} for i in range(25)]).status_code == 202
    page = requests.get(cloud.url(f"/api/v1/devices/{dev}/telemetry"), headers=cloud.admin, timeout=10,
                        params={"key": "v", "from": 1700000005000, "to": "2023-11-14T22:13:40Z", "limit": 10}).json()
    assert [p["value"] for p in page["points"]] == list(range(5, 15))
    nxt = requests.get(cloud.url(f"/api/v1/devices/{dev}/telemetry"), headers=cloud.admin, timeout=10,
                       params={"key": "v", "from": 1700000005000, "to": "2023-11-14T22:13:40Z", "limit": 10,
                               "after": page["next"]}).json()
    assert [p["value"] for p in nxt["points"]] == list(range(15, 20))
    assert nxt["next"] is None


def test_aggregation_per_minute_bucket(cloud, device):
    dev, _, h = device
    base = 1700000040000  # a minute boundary
    assert base % 60000 == 0
    records = [{"ts": base + i * 10_000, "temp": float(i)} for i in range(12)]  # two minutes
    assert cloud.post(h, records).status_code == 202
    for agg, expected in {"avg": [2.5, 8.5], "min": [0, 6], "max": [5, 11], "sum": [15, 51], "count": [6, 6]}.items():
        r = requests.get(cloud.url(f"/api/v1/devices/{dev}/telemetry"), headers=cloud.admin, timeout=10,
                         params={"key": "temp", "agg": agg, "interval": "1m", "from": base, "to": base + 120_000})
        assert r.status_code == 200, r.text
        buckets = r.json()["buckets"]
        assert [b["ts"] for b in buckets] == [base, base + 60_000]
        assert [b["value"] for b in buckets] == expected, agg
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}/telemetry"), headers=cloud.admin, timeout=10,
                     params={"key": "temp", "agg": "median"})
    assert r.status_code == 400


def test_queries_for_unknown_devices_are_404(cloud):
    r = requests.get(cloud.url("/api/v1/devices/nobody/telemetry/latest"), headers=cloud.admin, timeout=10)
    assert r.status_code == 404


# ------------------------------------------------------------------ MQTT devices

def mqtt_client(port, username=None, password=None, protocol=mqtt.MQTTv311, client_id=None):
    """A paho client; a device (any user name but the admin) connects with its own id."""
    got: queue.Queue = queue.Queue()
    if client_id is None:
        client_id = username if username and username != "admin" else unique("c")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if username:
        c.username_pw_set(username, password)
    rc: dict = {}
    connected = threading.Event()

    def on_connect(cl, u, flags, reason, props):
        rc["reason"] = reason
        connected.set()

    c.on_connect = on_connect
    c.on_message = lambda cl, u, m: got.put(m)
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(5)
    return c, got, rc["reason"]


def test_mqtt_device_telemetry_is_stored_and_reaches_a_telemetry_reader(cloud, device):
    dev, secret, _ = device
    reader, got, reason = mqtt_client(cloud.srv.mqtt_port, "admin", ADMIN_SECRET)
    assert not reason.is_failure
    reader.subscribe("devices/+/telemetry", 1)
    time.sleep(0.3)
    d, _, reason = mqtt_client(cloud.srv.mqtt_port, dev, secret)
    assert not reason.is_failure
    info = d.publish(f"devices/{dev}/telemetry", json.dumps({"ts": 1700000000000, "volts": 3.3}), qos=1)
    info.wait_for_publish(5)
    assert info.is_published()
    assert cloud.points(dev, "volts") == [{"ts": 1700000000000, "value": 3.3}]
    m = got.get(timeout=5)
    assert m.topic == f"devices/{dev}/telemetry"
    for c in (d, reader):
        c.loop_stop()
        c.disconnect()


def test_mqtt_device_with_an_access_token_as_password(cloud, device):
    dev, secret, h = device
    token = h["Authorization"].split()[1]
    d, _, reason = mqtt_client(cloud.srv.mqtt_port, dev, token)
    assert not reason.is_failure
    d.loop_stop()
    d.disconnect()


def test_mqtt_bad_credentials_and_anonymous_are_refused_and_audited(cloud, device):
    dev, _, _ = device
    _, _, reason = mqtt_client(cloud.srv.mqtt_port, dev, "wrong")
    assert reason.is_failure
    _, _, reason = mqtt_client(cloud.srv.mqtt_port)
    assert reason.is_failure
    assert cloud.metric("stratus_auth_failures", transport="mqtt") >= 2
    # Failed logins are written when their window ends (here a second): poll for them.
    deadline = time.monotonic() + 10
    while True:
        r = requests.get(cloud.url("/api/v1/audit/failures"), headers=cloud.admin, timeout=10)
        assert r.status_code == 200, r.text
        got = {(e["actor"], e["target"]) for e in r.json()["entries"]}
        if {(dev, "mqtt"), ("anonymous", "mqtt")} <= got or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {(dev, "mqtt"), ("anonymous", "mqtt")} <= got, r.text
    entry = next(e for e in r.json()["entries"] if e["actor"] == dev)
    assert entry["action"] == "auth.failure"
    assert entry["detail"]["reason"] == "bad credentials"
    assert entry["detail"]["transport"] == "mqtt"
    r = requests.get(cloud.url("/api/v1/audit"), headers=cloud.admin, timeout=10)
    assert "auth.failures" in r.text, r.text


def test_mqtt_device_is_confined_to_its_own_topics(cloud, device):
    dev, secret, _ = device
    other, _ = cloud.add_device()
    d, _, _ = mqtt_client(cloud.srv.mqtt_port, dev, secret)
    granted = queue.Queue()
    d.on_subscribe = lambda c, u, m, codes, p: granted.put([x.value for x in codes])
    _, mid = d.subscribe([(f"devices/{other}/config", 1), (f"devices/{dev}/config", 1), ("#", 0)])
    assert granted.get(timeout=5) == [0x80, 1, 0x80]
    # publishing into another device's tree is dropped (3.1.1) and stores nothing
    info = d.publish(f"devices/{other}/telemetry", json.dumps({"hack": 1}), qos=1)
    info.wait_for_publish(5)
    assert cloud.points(other, "hack") == []
    d.loop_stop()
    d.disconnect()


def test_mqtt_v5_invalid_telemetry_gets_0x99_and_v3_is_dropped_and_counted(cloud, device):
    dev, secret, _ = device
    d5, _, _ = mqtt_client(cloud.srv.mqtt_port, dev, secret, protocol=mqtt.MQTTv5)
    acks = queue.Queue()
    d5.on_publish = lambda c, u, mid, reason, p: acks.put(reason.value)
    d5.publish(f"devices/{dev}/telemetry", b'{"ts": "never", "v": 1}', qos=1)
    assert acks.get(timeout=5) == 0x99
    nonce = unique("n")
    d5.publish(f"devices/{dev}/telemetry", json.dumps({"sent": now_ms(), "nonce": nonce, "v": 2}), qos=1)
    assert acks.get(timeout=5) == 0x00
    d5.publish(f"devices/{dev}/telemetry", json.dumps({"sent": now_ms(), "nonce": nonce, "v": 3}), qos=1)
    assert acks.get(timeout=5) == 0x99, "replay"
    d5.loop_stop()
    d5.disconnect()
    before = cloud.metric("stratus_telemetry_rejected", reason="invalid")
    d3, _, _ = mqtt_client(cloud.srv.mqtt_port, dev, secret)
    info = d3.publish(f"devices/{dev}/telemetry", b"not json", qos=1)
    info.wait_for_publish(5)
    assert info.is_published()  # 3.1.1 cannot refuse: acknowledged, dropped
    assert cloud.metric("stratus_telemetry_rejected", reason="invalid") == before + 1
    assert [p["value"] for p in cloud.points(dev, "v")] == [2]
    d3.loop_stop()
    d3.disconnect()


def test_mosquitto_pub_device_telemetry(cloud, device):
    dev, secret, _ = device
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cloud.srv.mqtt_port), "-u", dev, "-P", secret,
                    "-q", "1", "-t", f"devices/{dev}/telemetry", "-m",
                    '{"date": "2018-04-04", "time": "09:30:00", "temperature": 20.1}'], check=True, timeout=10)
    assert cloud.points(dev, "temperature") == [{"ts": 1522834200000, "value": 20.1}]


# ------------------------------------------------------------------ durability

def test_every_acknowledged_record_survives_kill9_mid_ingest(cloud):
    dev, secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    acked: list[int] = []
    stop = threading.Event()

    def writer(k):
        s = requests.Session()
        i = 0
        while not stop.is_set():
            batch = [{"ts": 1700000000000 + (k * 1_000_000 + i * 10 + j), "n": k * 1_000_000 + i * 10 + j} for j in range(10)]
            try:
                r = s.post(cloud.url("/api/v1/telemetry"), json=batch, headers=h, timeout=5)
            except requests.RequestException:
                return
            if r.status_code == 202:
                acked.extend(b["n"] for b in batch)
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    cloud.srv.kill9()
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) > 100, "the writers got going"
    cloud.srv.start(mqtt_port=cloud.srv.mqtt_port, http_port=cloud.srv.http_port)
    cloud._admin = None
    stored = set()
    after = None
    while True:
        params = {"key": "n", "limit": 10000}
        if after is not None:
            params["after"] = after
        page = requests.get(cloud.url(f"/api/v1/devices/{dev}/telemetry"), params=params,
                            headers=cloud.admin, timeout=30).json()
        stored.update(int(p["value"]) for p in page["points"])
        after = page["next"]
        if after is None:
            break
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged points lost"
    # nothing half-written: every stored batch is complete
    batches = {}
    for n in stored:
        batches.setdefault(n // 10, set()).add(n % 10)
    assert all(len(v) == 10 for v in batches.values())


# ------------------------------------------------------------------ configuration over MQTT

def test_desired_config_reaches_the_device_retained_and_reported_config_is_stored(cloud, device):
    dev, secret, _ = device
    r = requests.put(cloud.url(f"/api/v1/devices/{dev}/config"), json={"interval_s": 30}, headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    d, got, _ = mqtt_client(cloud.srv.mqtt_port, dev, secret)
    d.subscribe(f"devices/{dev}/config", 1)
    m = got.get(timeout=5)  # retained: at once on (re)connect
    assert m.retain and "interval_s" in m.payload.decode()
    r = requests.put(cloud.url(f"/api/v1/devices/{dev}/config"), json={"interval_s": 5}, headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    m = got.get(timeout=5)  # republished on change
    assert '"interval_s": 5' in m.payload.decode().replace('":5', '": 5')
    info = d.publish(f"devices/{dev}/config/reported", json.dumps({"interval_s": 5}), qos=1)
    info.wait_for_publish(5)
    body = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10).json()
    reported = body["reported"]
    assert (reported.get("config") or reported.get("value")) == {"interval_s": 5}, body
    d.loop_stop()
    d.disconnect()


def device_json(cloud, dev):
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_mqtt_reported_config_marks_the_device_as_heard_from(cloud, device):
    """Issue #21 item 5: a reported config over MQTT updates `last_seen`, as over HTTP and CoAP."""
    dev, secret, _ = device
    d, _, reason = mqtt_client(cloud.srv.mqtt_port, dev, secret)
    assert not reason.is_failure
    connected = device_json(cloud, dev)["last_seen_ms"]  # the connection counts too
    time.sleep(1.2)  # a long-lived connection: only the report can move last_seen now
    before = now_ms()
    info = d.publish(f"devices/{dev}/config/reported", json.dumps({"interval_s": 7}), qos=1)
    info.wait_for_publish(5)
    body = device_json(cloud, dev)
    assert body["reported"]["config"] == {"interval_s": 7}, body
    assert body["last_seen_ms"] >= before > (connected or 0), (before, connected, body)
    assert body["online"] is True
    d.loop_stop()
    d.disconnect()
    # mosquitto_pub with the device's own credentials and id.
    before = now_ms()
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cloud.srv.mqtt_port), "-i", dev, "-u", dev,
                    "-P", secret, "-q", "1", "-t", f"devices/{dev}/config/reported", "-m", '{"interval_s": 8}'],
                   check=True, timeout=10)
    body = device_json(cloud, dev)
    assert body["reported"]["config"] == {"interval_s": 8}, body
    assert body["last_seen_ms"] >= before and body["last_seen"].endswith("Z"), body
