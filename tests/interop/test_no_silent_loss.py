"""No silent loss (issue #20 item 5): every acknowledged record is retrievable.

- Records without a time get receive times that never repeat for their device: a ts-less batch
  of three stores three (curl), and MQTT publishes without `ts` sent back to back all stay
  (`mosquitto_pub -l`, paho).
- Two values of one series at one own time in one message are refused naming the records:
  HTTP 400 (requests), CoAP 4.00 (coap-client), MQTT 5 PUBACK 0x99 (paho).
- A redelivered message is stored once, and the 202 says how many of its points were already
  stored (`duplicates`), so `points` is exactly what a query gains.
- A time more than `[telemetry] max_future_skew_secs` ahead (default 600) is refused naming the
  record and does not pin `/telemetry/latest`, on HTTP, CoAP and MQTT; the bound is configurable
  and `0` turns it off.
"""

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

from cloud import ADMIN_SECRET, Cloud


@pytest.fixture
def cloud(start_server):
    return Cloud(start_server("loss", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False))


@pytest.fixture
def device(cloud):
    dev, secret = cloud.add_device()
    return dev, secret, cloud.token(dev, secret)


def now_ms() -> int:
    return int(time.time() * 1000)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def curl_post(cloud, token: str, body: str):
    """POST /api/v1/telemetry with curl: (status, JSON body)."""
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {token}",
         "-H", "Content-Type: application/json", "--data-binary", body, cloud.url("/api/v1/telemetry")],
        capture_output=True, text=True, timeout=10, check=True)
    text, _, code = out.stdout.rpartition("\n")
    return int(code), json.loads(text)


def wait_points(cloud, dev, key, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    pts = cloud.points(dev, key)
    while len(pts) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        pts = cloud.points(dev, key)
    return pts


def paho_v5(cloud, dev, secret):
    """An MQTT 5 device connection (client id = device id) and a queue of PUBACK reason codes."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv5)
    c.username_pw_set(dev, secret)
    acks: queue.Queue = queue.Queue()
    connected = threading.Event()
    c.on_connect = lambda cl, u, flags, reason, props: connected.set()
    c.on_publish = lambda cl, u, mid, reason, props: acks.put(reason.value)
    c.connect("127.0.0.1", cloud.srv.mqtt_port)
    c.loop_start()
    assert connected.wait(5)
    return c, acks


def coap_post(cloud, token, body: str):
    """coap-client POST /telemetry (JSON): the response code and the whole output."""
    client = shutil.which("coap-client-notls")
    if client is None:
        pytest.skip("coap-client-notls (libcoap3-bin) is not installed")
    out = subprocess.run([client, "-v", "6", "-O", f"15,token={token}", "-m", "post", "-t", "50", "-e", body,
                          f"coap://127.0.0.1:{cloud.srv.coap_port}/telemetry"],
                         capture_output=True, text=True, timeout=20)
    text = out.stdout + out.stderr
    for line in text.splitlines():
        if " c:" in line and ("t:ACK" in line or "t:NON" in line or "t:CON" in line):
            code = line.split(" c:")[1].split()[0]
            if code[0] in "245":
                return code, text
    return None, text


# ------------------------------------------------------------------ records without a time

def test_a_batch_without_times_stores_every_record_and_says_so(cloud, device):
    dev, _, token = device
    before = now_ms()
    status, body = curl_post(cloud, token, '[{"x":1},{"x":2},{"x":3}]')
    assert status == 202, body
    assert body == {"accepted": 3, "points": 3, "duplicates": 0}
    pts = cloud.points(dev, "x")
    assert [p["value"] for p in pts] == [1, 2, 3]
    ts = [p["ts"] for p in pts]
    assert ts == [ts[0], ts[0] + 1, ts[0] + 2], "consecutive receive milliseconds, in order"
    assert before - 1000 <= ts[0] <= now_ms() + 1000


def test_mqtt_publishes_without_ts_sent_back_to_back_are_all_kept(cloud, device):
    dev, secret, _ = device
    # mosquitto_pub -l: one message per line, as fast as the connection takes them.
    lines = "".join(json.dumps({"n": i}) + "\n" for i in range(50))
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cloud.srv.mqtt_port), "-i", dev, "-u", dev,
                    "-P", secret, "-q", "1", "-t", f"devices/{dev}/telemetry", "-l"],
                   input=lines, text=True, check=True, timeout=20)
    pts = wait_points(cloud, dev, "n", 50)
    assert sorted(p["value"] for p in pts) == list(range(50))
    assert len({p["ts"] for p in pts}) == 50
    # paho, MQTT 5, QoS 0 and 1 interleaved, without waiting for acknowledgements.
    c, acks = paho_v5(cloud, dev, secret)
    for i in range(40):
        c.publish(f"devices/{dev}/telemetry", json.dumps({"m": i}), qos=i % 2)
    for _ in range(20):
        assert acks.get(timeout=5) == 0
    c.loop_stop()
    c.disconnect()
    pts = wait_points(cloud, dev, "m", 40)
    assert sorted(p["value"] for p in pts) == list(range(40))


# ------------------------------------------------------------------ one series, one time, twice

def test_one_series_twice_at_one_time_in_a_message_is_refused_naming_the_records(cloud, device):
    dev, secret, token = device
    body = [{"ts": 1700000000000, "x": 1, "y": 1}, {"ts": 1700000001000, "x": 2},
            {"ts": 1700000000000, "x": 3}]
    r = requests.post(cloud.url("/api/v1/telemetry"), json=body, headers=bearer(token), timeout=10)
    assert r.status_code == 400, r.text
    text = r.json()["error_description"]
    assert text.startswith('record 2, field "x": record 0 already gives this series a value at 1700000000000'), text
    # Other series at that time are fine.
    ok = [{"ts": 1700000000000, "x": 1}, {"ts": 1700000000000, "y": 2}]
    r = requests.post(cloud.url("/api/v1/telemetry"), json=ok, headers=bearer(token), timeout=10)
    assert r.status_code == 202 and r.json()["points"] == 2, r.text
    # CoAP: 4.00 with the same words.
    code, text = coap_post(cloud, token, json.dumps([{"ts": 1700000005000, "z": 1}, {"ts": 1700000005000, "z": 2}]))
    assert code == "4.00", text
    assert "record 0 already gives this series a value" in text, text
    # MQTT 5: PUBACK 0x99 Payload format invalid.
    c, acks = paho_v5(cloud, dev, secret)
    c.publish(f"devices/{dev}/telemetry", json.dumps([{"ts": 1700000006000, "z": 1}, {"ts": 1700000006000, "z": 2}]),
              qos=1)
    assert acks.get(timeout=5) == 0x99
    c.loop_stop()
    c.disconnect()
    assert cloud.points(dev, "x") == [{"ts": 1700000000000, "value": 1}]
    assert cloud.points(dev, "z") == []


def test_a_redelivered_message_is_stored_once_and_the_answer_counts_the_duplicates(cloud, device):
    dev, _, token = device
    body = [{"ts": 1700000000000, "v": 1}, {"ts": 1700000001000, "v": 2}]
    post = lambda b: requests.post(cloud.url("/api/v1/telemetry"), json=b, headers=bearer(token), timeout=10)
    r = post(body)
    assert r.status_code == 202 and r.json() == {"accepted": 2, "points": 2, "duplicates": 0}, r.text
    r = post(body)  # a retry after a lost answer
    assert r.status_code == 202 and r.json() == {"accepted": 2, "points": 0, "duplicates": 2}, r.text
    r = post([{"ts": 1700000001000, "v": 9}, {"ts": 1700000002000, "v": 3}])
    assert r.status_code == 202 and r.json() == {"accepted": 2, "points": 1, "duplicates": 1}, r.text
    # The first value of a time stays; the query holds exactly the points the 202s counted.
    assert cloud.points(dev, "v") == [{"ts": 1700000000000, "value": 1}, {"ts": 1700000001000, "value": 2},
                                      {"ts": 1700000002000, "value": 3}]


# ------------------------------------------------------------------ times in the future

def test_a_record_dated_9999_is_refused_and_does_not_pin_latest(cloud, device):
    dev, secret, token = device
    post = lambda b: requests.post(cloud.url("/api/v1/telemetry"), json=b, headers=bearer(token), timeout=10)
    assert post({"t": 1}).status_code == 202
    r = post({"date": "9999-01-01", "time": "00:00:00", "t": 2})
    assert r.status_code == 400, r.text
    text = r.json()["error_description"]
    assert text.startswith('record 0, field "date": ') and "ahead of the server clock" in text, text
    assert "at most 600 s ahead is accepted" in text, text
    r = post([{"t": 3}, {"ts": now_ms() + 3 * 3_600_000, "t": 4}])
    assert r.status_code == 400, r.text
    assert r.json()["error_description"].startswith('record 1, field "ts": '), r.text
    assert " h ahead of the server clock" in r.text, r.text
    # A few minutes ahead (a drifting clock) is fine.
    assert post({"ts": now_ms() + 120_000, "u": 1}).status_code == 202
    # CoAP 4.00 and MQTT 5 0x99 alike.
    code, text = coap_post(cloud, token, json.dumps({"ts": "9999-01-01T00:00:00Z", "t": 5}))
    assert code == "4.00" and 'field "ts"' in text, text
    c, acks = paho_v5(cloud, dev, secret)
    c.publish(f"devices/{dev}/telemetry", json.dumps({"ts": "9999-01-01T00:00:00Z", "t": 6}), qos=1)
    assert acks.get(timeout=5) == 0x99
    c.loop_stop()
    c.disconnect()
    latest = cloud.latest(dev)
    assert latest["t"]["value"] == 1 and latest["t"]["ts"] <= now_ms(), latest
    assert [p["value"] for p in cloud.points(dev, "t", to="9999-12-31T00:00:00Z")] == [1]


def test_max_future_skew_is_configurable_and_zero_turns_it_off(start_server):
    tight = Cloud(start_server("tight", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                               config="[telemetry]\nmax_future_skew_secs = 60\n"))
    dev, secret = tight.add_device()
    h = tight.device_headers(dev, secret)
    assert tight.post(h, {"ts": now_ms() + 30_000, "t": 1}).status_code == 202
    r = tight.post(h, {"ts": now_ms() + 120_000, "t": 2})
    assert r.status_code == 400 and "at most 60 s ahead" in r.json()["error_description"], r.text
    off = Cloud(start_server("off", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                             config="[telemetry]\nmax_future_skew_secs = 0\n"))
    dev, secret = off.add_device()
    h = off.device_headers(dev, secret)
    assert off.post(h, {"date": "9999-01-01", "time": "00:00:00", "t": 1}).status_code == 202
