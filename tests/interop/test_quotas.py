"""Per-principal quotas and throttled logins, attacked as the issue describes and answered in
each protocol's own words, while a bystander keeps full service:

- MQTT publish rate per client: 5 PUBACK 0x97 (3.1.1: dropped and counted), DISCONNECT 0x96
  when sustained; subscriptions per client (SUBACK 0x97 / 0x80); retained messages per client
  and in total (PUBACK 0x97); connections per principal (CONNACK 0x97) and per address
  (CONNACK 0x9F);
- telemetry series per device (HTTP 429 `quota_exceeded`, MQTT 5 0x97, CoAP 4.29) and
  telemetry requests per second per device (HTTP 429 + Retry-After, CoAP 4.29 + Max-Age);
- CoAP observers per device (declined: answered without Observe);
- failed logins back off per address and per identity (HTTP 429 + Retry-After, MQTT CONNACK
  0x9F, CoAP 4.29), while other addresses and verified clients are served.

Each limit is counted in `stratus_limit_hits_total{limit=…}`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from test_identity import V5, app_client

ENV = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET}


def limit_hits(cloud: Cloud, limit: str) -> float:
    return cloud.metric("stratus_limit_hits", limit=limit)


class Publisher(V5):
    """A V5 client that records the reason code of every PUBACK."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.acks = {}
        self.cond = threading.Condition()
        self.c.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, rc, props):
        with self.cond:
            self.acks[mid] = rc.value if hasattr(rc, "value") else int(rc)
            self.cond.notify_all()

    def publish_all(self, topic, payloads, qos=1, retain=False, timeout=10) -> list:
        infos = [self.c.publish(topic, p, qos=qos, retain=retain) for p in payloads]
        with self.cond:
            assert self.cond.wait_for(lambda: all(i.mid in self.acks for i in infos), timeout)
            return [self.acks[i.mid] for i in infos]


@pytest.fixture
def quota_srv(start_server):
    config = """
[mqtt]
max_publish_rate = 20
rate_sustain_secs = 3
max_subscriptions = 5
max_retained_per_client = 3
max_retained = 8
max_connections_per_principal = 2
max_connections_per_address = 40
device_client_ids = "prefix"

[telemetry]
max_series_per_device = 3
max_requests_per_sec = 5

[coap]
max_observers_per_device = 2
"""
    s = start_server("quotas", env=ENV, anonymous=True, config=config, start=False)
    s.start(wait=("mqtt", "http", "coap"))
    s.coap = s.listening()["coap"]
    return s


def test_a_publisher_over_its_rate_gets_0x97_then_0x96_while_another_keeps_full_service(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    loud, loud_secret = cloud.add_device()
    calm, calm_secret = cloud.add_device()
    a = Publisher(srv.mqtt_port, loud, loud, loud_secret)
    b = Publisher(srv.mqtt_port, calm, calm, calm_secret)
    assert a.connect() == 0 and b.connect() == 0
    try:
        before = limit_hits(cloud, "mqtt_publish_rate")
        codes = a.publish_all(f"devices/{loud}/status", [b"x"] * 60)
        assert codes.count(0x97) >= 30, codes
        assert codes.count(0x10) + codes.count(0) >= 1, codes
        # The bystander, at its own pace, is served in full.
        for _ in range(3):
            assert set(b.publish_all(f"devices/{calm}/status", [b"y"] * 5)) <= {0, 0x10}
            time.sleep(0.5)
        assert limit_hits(cloud, "mqtt_publish_rate") - before >= 30
        # Over the rate three seconds in a row: DISCONNECT 0x96.
        for _ in range(5):
            if a.gone.is_set():
                break
            for _ in range(40):
                a.c.publish(f"devices/{loud}/status", b"x", qos=0)
            time.sleep(1)
        assert a.gone.wait(3), "still connected"
        assert a.disconnect_rc == 0x96
        assert not b.gone.is_set()
    finally:
        a.close()
        b.close()


def test_a_v311_publisher_over_its_rate_is_dropped_and_counted(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    before = limit_hits(cloud, "mqtt_publish_rate")
    lines = "\n".join(f"m{i}" for i in range(60)) + "\n"
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                            "-t", "rate/#", "-W", "6"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                          "-q", "1", "-t", "rate/x", "-l"], input=lines, capture_output=True, text=True,
                         timeout=30)
    assert pub.returncode == 0, pub.stderr
    out, _ = sub.communicate(timeout=20)
    got = out.split()
    assert 10 <= len(got) <= 40, len(got)
    assert limit_hits(cloud, "mqtt_publish_rate") - before >= 20


def test_subscriptions_per_client_are_bounded(quota_srv):
    srv = quota_srv
    c = V5(srv.mqtt_port, "subs-5", clean=True)
    granted = []
    done = threading.Event()
    c.c.on_subscribe = lambda cl, u, mid, codes, p: (granted.extend(x.value for x in codes), done.set())
    assert c.connect() == 0
    c.c.subscribe([(f"s/{i}", 1) for i in range(7)])
    assert done.wait(5)
    assert granted == [1] * 5 + [0x97, 0x97], granted
    # Replacing a filter it holds is not a new one.
    done.clear()
    granted.clear()
    c.c.subscribe("s/0", 0)
    assert done.wait(5) and granted == [0]
    c.close()
    raw = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                          *sum((["-t", f"v3/{i}"] for i in range(6)), []), "-W", "1", "-d"],
                         capture_output=True, text=True, timeout=20)
    assert "Subscribed (mid: 1): 0, 0, 0, 0, 0, 128" in raw.stdout + raw.stderr, raw.stdout + raw.stderr


def test_retained_messages_are_bounded_per_client_and_in_total(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    a = Publisher(srv.mqtt_port, "retainer-a")
    b = Publisher(srv.mqtt_port, "retainer-b")
    assert a.connect() == 0 and b.connect() == 0
    try:
        codes = [a.publish_all(f"ret/a/{i}", [b"v"], retain=True)[0] for i in range(4)]
        assert codes[:3] == [0x10] * 3 and codes[3] == 0x97, codes
        # Replacing one it set is no new one; deleting frees its place.
        assert a.publish_all("ret/a/0", [b"w"], retain=True) == [0x10]
        assert a.publish_all("ret/a/0", [b""], retain=True) == [0x10]
        assert a.publish_all("ret/a/9", [b"v"], retain=True) == [0x10]
        # Another client has its own quota, up to the total of 8.
        codes = [b.publish_all(f"ret/b/{i}", [b"v"], retain=True)[0] for i in range(3)]
        assert codes == [0x10] * 3, codes
        c = Publisher(srv.mqtt_port, "retainer-c")
        assert c.connect() == 0
        codes = [c.publish_all(f"ret/c/{i}", [b"v"], retain=True)[0] for i in range(3)]
        assert codes[:2] == [0x10] * 2 and codes[2] == 0x97, codes
        c.close()
        assert limit_hits(cloud, "mqtt_retained") >= 2
        # What was refused is not retained: a new subscriber sees 8.
        out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-t", "ret/#",
                              "-v", "-W", "2"], capture_output=True, text=True, timeout=20)
        assert len(out.stdout.splitlines()) == 8, out.stdout
    finally:
        a.close()
        b.close()


def test_connections_per_principal_and_per_address(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    held = [V5(srv.mqtt_port, f"{dev}-{i}", dev, secret) for i in range(2)]
    try:
        for c in held:
            assert c.connect() == 0
        third = V5(srv.mqtt_port, f"{dev}-2", dev, secret)
        assert third.connect() == 0x97
        third.close()
        held[0].close()
        time.sleep(0.3)
        again = V5(srv.mqtt_port, f"{dev}-3", dev, secret)
        assert again.connect() == 0, "room again once one closed"
        held[0] = again
    finally:
        for c in held:
            c.close()
    # 40 connections from 127.0.0.1 at most (the tests' own included): open until refused.
    socks, refused = [], None
    try:
        for i in range(60):
            c = V5(srv.mqtt_port, f"addr-{i}")
            rc = c.connect()
            socks.append(c)
            if rc != 0:
                refused = rc
                break
        assert refused == 0x9F, refused
        assert limit_hits(cloud, "mqtt_connections_per_address") >= 1
    finally:
        for c in socks:
            c.close()
    time.sleep(0.3)
    assert attempt_ok(srv), "connections from the address are taken again once closed"


def attempt_ok(srv) -> bool:
    c = V5(srv.mqtt_port, "after")
    try:
        return c.connect() == 0
    finally:
        c.close()


def coap(srv, method, path, token, payload=None, observe=False) -> str:
    client = shutil.which("coap-client-notls") or shutil.which("coap-client")
    if client is None:
        pytest.skip("libcoap3-bin is not installed")
    args = [client, "-m", method, "-v", "6"]
    if payload is not None:
        args += ["-e", payload]
    args.append(f"coap://127.0.0.1:{srv.coap}{path}?token={token}")
    out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    return out.stdout + out.stderr


def test_series_per_device_are_bounded_on_every_transport(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    other, other_secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    assert cloud.post(h, {"a": 1, "b": 2, "c": 3}).status_code == 202
    r = cloud.post(h, {"a": 1, "d": 4})
    assert r.status_code == 429 and r.json()["error"] == "quota_exceeded", r.text
    assert "series" in r.json()["error_description"]
    assert cloud.points(dev, "d") == [] and len(cloud.points(dev, "a")) == 1, "nothing of it stored"
    time.sleep(1.1)  # the request rate of 5/s is another quota
    assert cloud.post(h, {"a": 2}).status_code == 202, "existing series still take points"
    assert cloud.post(cloud.device_headers(other, other_secret), {"x": 1, "y": 1, "z": 1}).status_code == 202
    p = Publisher(srv.mqtt_port, dev, dev, secret)
    assert p.connect() == 0
    try:
        assert p.publish_all(f"devices/{dev}/telemetry", [json.dumps({"e": 5})]) == [0x97]
    finally:
        p.close()
    token = cloud.token(dev, secret)
    assert "4.29" in coap(srv, "post", "/telemetry", token, '{"f": 6}')
    assert limit_hits(cloud, "telemetry_series_per_device") >= 3


def test_telemetry_requests_per_device_are_rate_limited_over_http_and_coap(quota_srv):
    srv = quota_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    calm, calm_secret = cloud.add_device()
    h = cloud.device_headers(dev, secret)
    calm_h = cloud.device_headers(calm, calm_secret)
    time.sleep(1 - time.time() % 1)  # start at the top of a second
    codes = [cloud.post(h, {"t": i}) for i in range(12)]
    statuses = [r.status_code for r in codes]
    assert statuses.count(202) <= 10 and 429 in statuses, statuses
    refused = next(r for r in codes if r.status_code == 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 1, refused.headers
    assert cloud.post(calm_h, {"t": 1}).status_code == 202, "another device is not affected"
    # What was accepted is stored, what was refused is not.
    assert len(cloud.points(dev, "t")) == statuses.count(202)
    token = cloud.token(dev, secret)
    time.sleep(1 - time.time() % 1)
    outs = [coap(srv, "post", "/telemetry", token, '{"c": 1}') for _ in range(8)]
    assert any("4.29" in o for o in outs), outs
    assert any("2.04" in o for o in outs), outs
    assert limit_hits(cloud, "telemetry_requests_per_device") >= 2


def test_coap_observers_per_device_are_declined_beyond_the_quota(quota_srv):
    aiocoap = pytest.importorskip("aiocoap")
    import asyncio

    srv = quota_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    other, other_secret = cloud.add_device()
    token, other_token = cloud.token(dev, secret), cloud.token(other, other_secret)

    async def observe(ctx, tok):
        req = aiocoap.Message(code=aiocoap.GET, observe=0,
                              uri=f"coap://127.0.0.1:{srv.coap}/config?token={tok}")
        r = await asyncio.wait_for(ctx.request(req).response, 5)
        return r.code, r.opt.observe

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            first = [await observe(ctx, token) for _ in range(3)]
            theirs = await observe(ctx, other_token)
            return first, theirs
        finally:
            await ctx.shutdown()

    first, theirs = asyncio.run(go())
    assert all(code == aiocoap.CONTENT for code, _ in first), first
    assert [obs is not None for _, obs in first] == [True, True, False], first
    assert theirs[1] is not None, "another device still observes"
    assert limit_hits(cloud, "coap_observers_per_device") >= 1


# ---- throttled authentication --------------------------------------------------------------

def token_status(cloud: Cloud, client_id: str, secret: str, source: str = "127.0.0.1"):
    s = requests.Session()
    s.mount("http://", SourceAdapter(source))
    return s.post(cloud.url("/oauth/token"), data={"grant_type": "client_credentials"},
                  auth=(client_id, secret), timeout=10)


class SourceAdapter(requests.adapters.HTTPAdapter):
    """Connects from a given loopback address (127.0.0.2 is another host to the server)."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *a, **kw):
        kw["source_address"] = (self.source, 0)
        super().init_poolmanager(*a, **kw)


def test_failed_logins_are_slowed_per_address_and_identity_while_others_are_served(start_server):
    srv = start_server("throttle", env=ENV, anonymous=False, start=False)
    srv.start(wait=("mqtt", "http", "coap"))
    srv.coap = srv.listening()["coap"]
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    victim, victim_secret = cloud.add_device()
    # The victim connected once: its secret is verified and remembered.
    v = V5(srv.mqtt_port, victim, victim, victim_secret)
    assert v.connect() == 0
    v.close()
    before = limit_hits(cloud, "auth_throttle")
    t0 = time.monotonic()
    statuses = [token_status(cloud, victim, f"guess-{i}").status_code for i in range(40)]
    took = time.monotonic() - t0
    # Ten free failures a minute, the eleventh earns a ban: every later guess is refused
    # unread (no argon2), so forty guesses take no longer than eleven.
    assert statuses[:11] == [401] * 11, statuses
    assert statuses[11:] == [429] * 29, statuses
    r = token_status(cloud, victim, "guess-x")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.headers
    assert took < 20, took
    # The guesser's address is slowed over MQTT and CoAP too.
    c = V5(srv.mqtt_port, dev, dev, secret)
    assert c.connect() == 0x9F
    c.close()
    client = shutil.which("coap-client-notls") or shutil.which("coap-client")
    out = subprocess.run([client, "-m", "post", "-e", '{"t":1}', "-v", "6",
                          f"coap://127.0.0.1:{srv.coap}/telemetry?token=st1_not-a-token-at-all"],
                         capture_output=True, text=True, timeout=20)
    assert "4.29" in out.stdout + out.stderr, out.stdout + out.stderr
    # Another address and another identity are served at once.
    assert token_status(cloud, dev, secret, source="127.0.0.2").status_code == 200
    # The victim itself, verified before, still connects from its own address.
    v = V5(srv.mqtt_port, victim, victim, victim_secret)
    sock = socket.socket()
    assert v.connect() == 0
    v.close()
    sock.close()
    assert limit_hits(cloud, "auth_throttle") - before >= 29
