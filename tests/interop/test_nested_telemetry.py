"""Nested telemetry (issue #21 item 7): objects inside a record become dotted series (`loc.lat`)
down to four levels of names, over HTTP (requests, curl), MQTT (mosquitto_pub) and CoAP
(coap-client with JSON, aiocoap with CBOR); arrays and deeper nesting are refused naming the
dotted field; rules name the series the same way (`loc.lat > 55.5`)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud

THINGSBOARD_RECORD = {"temperature": 20.5, "loc": {"lat": 55.9, "lon": -3.2}}


@pytest.fixture
def cloud(start_server):
    return Cloud(start_server("nested", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False))


@pytest.fixture
def device(cloud):
    dev, secret = cloud.add_device()
    return dev, secret, cloud.token(dev, secret)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_points(cloud, dev, key, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    pts = cloud.points(dev, key)
    while len(pts) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        pts = cloud.points(dev, key)
    return pts


def test_a_thingsboard_record_is_stored_as_dotted_series(cloud, device):
    dev, _, token = device
    r = requests.post(cloud.url("/api/v1/telemetry"), json={"ts": 1700000000000, **THINGSBOARD_RECORD},
                      headers=bearer(token), timeout=10)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 1, "points": 3, "duplicates": 0}
    assert cloud.points(dev, "loc.lat") == [{"ts": 1700000000000, "value": 55.9}]
    assert cloud.points(dev, "loc.lon") == [{"ts": 1700000000000, "value": -3.2}]
    latest = cloud.latest(dev)
    assert sorted(latest) == ["loc.lat", "loc.lon", "temperature"]
    # Four levels of names, in an array, with curl; a flat dotted name is the same series.
    body = json.dumps([{"ts": 1700000001000, "a": {"b": {"c": {"d": 1}}}, "gps": {"fix": True, "src": "gnss"}},
                       {"ts": 1700000002000, "loc.lat": 56.0}])
    out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
                          "--data-binary", body, cloud.url("/api/v1/telemetry")],
                         capture_output=True, text=True, timeout=10, check=True)
    assert json.loads(out.stdout) == {"accepted": 2, "points": 4, "duplicates": 0}, out.stdout
    assert cloud.points(dev, "a.b.c.d") == [{"ts": 1700000001000, "value": 1}]
    assert cloud.points(dev, "gps.fix") == [{"ts": 1700000001000, "value": True}]
    assert [p["value"] for p in cloud.points(dev, "loc.lat")] == [55.9, 56.0]


def test_arrays_and_deeper_nesting_are_refused_naming_the_dotted_field(cloud, device):
    dev, _, token = device
    post = lambda b: requests.post(cloud.url("/api/v1/telemetry"), json=b, headers=bearer(token), timeout=10)
    r = post([{"t": 1}, {"t": 2, "loc": {"pts": [1, 2]}}])
    assert r.status_code == 400, r.text
    text = r.json()["error_description"]
    assert text.startswith('record 1, field "loc.pts": an array is not a series value'), text
    r = post({"a": {"b": {"c": {"d": {"e": 1}}}}})
    assert r.status_code == 400, r.text
    assert r.json()["error_description"].startswith('record 0, field "a.b.c.d": objects nest too deep'), r.text
    r = post({"loc": {"lat": 1}, "loc.lat": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error_description"] == 'record 0, field "loc.lat": field appears more than once'
    r = post({"name": {"x" * 100: {"y" * 100: 1}}})
    assert r.status_code == 400 and "longer than 128 bytes" in r.text, r.text
    assert cloud.points(dev, "t") == [] and cloud.latest(dev) == {}


def test_nested_records_over_mqtt_and_coap(cloud, device):
    dev, secret, token = device
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cloud.srv.mqtt_port), "-i", dev, "-u", dev,
                    "-P", secret, "-q", "1", "-t", f"devices/{dev}/telemetry", "-m",
                    json.dumps({"ts": 1700000000000, **THINGSBOARD_RECORD})], check=True, timeout=10)
    assert wait_points(cloud, dev, "loc.lat", 1) == [{"ts": 1700000000000, "value": 55.9}]
    client = shutil.which("coap-client-notls")
    if client is None:
        pytest.skip("coap-client-notls (libcoap3-bin) is not installed")
    out = subprocess.run([client, "-O", f"15,token={token}", "-m", "post", "-t", "50", "-e",
                          json.dumps({"ts": 1700000001000, "loc": {"lat": 56.1}}),
                          f"coap://127.0.0.1:{cloud.srv.coap_port}/telemetry"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert [p["value"] for p in wait_points(cloud, dev, "loc.lat", 2)] == [55.9, 56.1]
    out = subprocess.run([client, "-v", "6", "-O", f"15,token={token}", "-m", "post", "-t", "50", "-e",
                          '{"loc": {"pts": [1]}}', f"coap://127.0.0.1:{cloud.srv.coap_port}/telemetry"],
                         capture_output=True, text=True, timeout=20)
    assert "c:4.00" in out.stdout + out.stderr and "loc.pts" in out.stdout + out.stderr, out.stdout + out.stderr


def cbor_text(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 24
    return bytes([0x60 | len(b)]) + b


def cbor_map(entries: list) -> bytes:
    assert len(entries) < 24
    return bytes([0xA0 | len(entries)]) + b"".join(cbor_text(k) + v for k, v in entries)


def test_nested_cbor_maps_over_coap_with_aiocoap(cloud, device):
    aiocoap = pytest.importorskip("aiocoap")
    dev, _, token = device
    # {"ts": 1700000000000, "gps": {"sats": 7, "fix": {"ok": true}}}
    ts = b"\x1b" + (1700000000000).to_bytes(8, "big")
    payload = cbor_map([("ts", ts), ("gps", cbor_map([("sats", b"\x07"), ("fix", cbor_map([("ok", b"\xf5")]))]))])

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            msg = aiocoap.Message(code=aiocoap.POST, payload=payload, content_format=60,
                                  uri=f"coap://127.0.0.1:{cloud.srv.coap_port}/telemetry?token={token}")
            return await ctx.request(msg).response
        finally:
            await ctx.shutdown()

    r = asyncio.run(asyncio.wait_for(go(), 30))
    assert r.code == aiocoap.CHANGED, (r.code, r.payload)
    assert wait_points(cloud, dev, "gps.sats", 1) == [{"ts": 1700000000000, "value": 7}]
    assert cloud.points(dev, "gps.fix.ok") == [{"ts": 1700000000000, "value": True}]


def test_rules_name_dotted_series_with_dots(cloud, device):
    dev, _, token = device
    r = requests.post(cloud.url("/api/v1/rules"), headers=cloud.admin, timeout=10,
                      json={"id": "north", "condition": "loc.lat > 55.5 && temperature > 20"})
    assert r.status_code == 201, r.text
    r = requests.post(cloud.url("/api/v1/telemetry"), json={"loc": {"lat": 50.1}, "temperature": 21},
                      headers=bearer(token), timeout=10)
    assert r.status_code == 202
    r = requests.post(cloud.url("/api/v1/telemetry"), json=THINGSBOARD_RECORD, headers=bearer(token), timeout=10)
    assert r.status_code == 202
    deadline = time.monotonic() + 10
    alarms = []
    while not alarms and time.monotonic() < deadline:
        alarms = requests.get(cloud.url("/api/v1/alarms"), params={"rule": "north", "state": "active"},
                              headers=cloud.admin, timeout=10).json()["alarms"]
        time.sleep(0.1)
    assert len(alarms) == 1, alarms
    assert alarms[0]["device"] == dev and alarms[0]["value"]["loc.lat"] == 55.9, alarms
