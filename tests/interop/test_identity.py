"""Identities as an attacker tries them (SPEC "Identities"): an MQTT client id belongs to one
principal, so a device, an application or an anonymous client that uses another principal's
client id is refused (v5 0x85/0x87, v3 0x02/0x05) and never resumes, takes over or kicks the
owner's session, before and after a restart; a session stored before owners were recorded is
re-authorized when resumed. Revocation sticks: a rotated, deleted or re-created credential
voids every earlier token across restarts with no same-second window, and ends live MQTT
connections (DISCONNECT 0x87 / 0x98 / 0xA0), CoAP observations (4.01) and SSE streams. An
unknown id costs what a wrong secret costs. Device tokens fit one CoAP `?token=`.

Stock clients throughout: paho-mqtt (3.1.1 and 5), mosquitto_pub/sub, curl-equivalent
`requests`, libcoap's coap-client and aiocoap."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import requests

import mqtt_raw
from cloud import ADMIN_SECRET, Cloud, unique
from mqtt_raw import CONNACK, RawClient

# Logins that fail on purpose here would soon be slowed down (HTTP 429, CONNACK 0x9F): these
# tests are about identities, test_quotas.py is about the back-off.
ENV = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET, "STRATUS_AUTH__THROTTLE__FREE_FAILURES": "100000"}


class V5:
    """A paho-mqtt client (MQTT 5 or 3.1.1) that records what happens to it."""

    def __init__(self, port, client_id, username=None, password=None, v5=True, clean=True,
                 expiry=None):
        self.port = port
        self.v5 = v5
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=proto, reconnect_on_failure=False, **kw)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.clean = clean
        self.expiry = expiry
        self.connack = None
        self.session_present = None
        self.disconnect_rc = None
        self.messages = []
        self.connected = threading.Event()
        self.gone = threading.Event()
        self.acked = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = lambda *a: self.acked.set()

    def _on_connect(self, client, userdata, flags, rc, props):
        self.connack = rc.value if hasattr(rc, "value") else int(rc)
        self.session_present = flags.session_present
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props):
        self.disconnect_rc = rc.value if hasattr(rc, "value") else int(rc)
        self.gone.set()

    def connect(self, timeout=5.0) -> int:
        """Connects; returns the CONNACK code (0 on success)."""
        kw = {}
        if self.v5:
            props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
            if self.expiry is not None:
                props.SessionExpiryInterval = self.expiry
            kw = {"clean_start": self.clean, "properties": props}
        self.c.connect("127.0.0.1", self.port, keepalive=30, **kw)
        self.c.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        return self.connack

    def subscribe(self, topic, qos=1):
        self.acked.clear()
        self.c.subscribe(topic, qos)
        assert self.acked.wait(5), f"no SUBACK for {topic}"

    def wait_topic(self, topic, timeout=5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t == topic for t, _ in self.messages):
                return True
            time.sleep(0.02)
        return False

    def close(self):
        try:
            self.c.disconnect()
        except Exception:
            pass
        self.c.loop_stop()


@pytest.fixture
def srv(start_server):
    return start_server("identity", env=ENV, anonymous=False)


def mqtt_port(srv):
    return srv.mqtt_port


def attempt(srv, client_id, username=None, password=None, v5=True) -> int:
    """One CONNECT with `client_id` asking to resume its session; returns the CONNACK code
    (MQTT 5 through paho; MQTT 3.1.1 as the exact return-code byte, which paho would turn
    into its MQTT 5 twin) and disconnects."""
    if not v5:
        with RawClient(srv.mqtt_port) as raw:
            raw.send(mqtt_raw.connect(client_id, clean=False, username=username,
                                      password=password))
            return raw.expect(CONNACK).body[1]
    c = V5(srv.mqtt_port, client_id, username, password, v5=v5, clean=False, expiry=300)
    try:
        return c.connect()
    finally:
        c.close()


def app_client(cloud: Cloud, scopes) -> tuple[str, str]:
    client_id = unique("app")
    r = requests.post(cloud.url("/api/v1/clients"), json={"client_id": client_id, "scopes": scopes},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 201, r.text
    return client_id, r.json()["client_secret"]


def publish_telemetry(srv, dev, secret, body):
    out = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-V", "mqttv311",
                          "-u", dev, "-P", secret, "-i", dev, "-q", "1",
                          "-t", f"devices/{dev}/telemetry", "-m", json.dumps(body)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr


# ---- client ids belong to their principals -------------------------------------------------

def test_hijacks_of_device_app_and_admin_sessions_are_refused_before_and_after_restart(srv):
    cloud = Cloud(srv)
    a, a_secret = cloud.add_device()
    b, b_secret = cloud.add_device()
    reader, reader_secret = app_client(cloud, ["telemetry:read"])

    # The owners: device b, an app watching every device's telemetry, the admin on '#'.
    dev_b = V5(srv.mqtt_port, b, b, b_secret, clean=False, expiry=3600)
    assert dev_b.connect() == 0
    dev_b.subscribe(f"devices/{b}/config")
    app = V5(srv.mqtt_port, "app-session", reader, reader_secret, clean=False, expiry=3600)
    assert app.connect() == 0
    app.subscribe("devices/+/telemetry")
    admin = V5(srv.mqtt_port, "admin-session", "admin", ADMIN_SECRET, clean=False, expiry=3600)
    assert admin.connect() == 0
    admin.subscribe("#")

    # Device a with its own valid credentials takes none of them (v5 0x85, v3 0x02).
    for victim in (b, "app-session", "admin-session"):
        assert attempt(srv, victim, a, a_secret) == 0x85, victim
        assert attempt(srv, victim, a, a_secret, v5=False) == 2, victim
    # Another application neither (0x87 / 0x05): not a device's id, not another's session.
    other, other_secret = app_client(cloud, ["telemetry:read"])
    for victim in (b, "app-session", "admin-session"):
        assert attempt(srv, victim, other, other_secret) == 0x87, victim
        assert attempt(srv, victim, other, other_secret, v5=False) == 5, victim
    # The admin cannot take a device's client id either.
    assert attempt(srv, b, "admin", ADMIN_SECRET) == 0x87

    # Twenty kick attempts later every owner is still connected and receiving.
    for _ in range(20):
        assert attempt(srv, "app-session", a, a_secret) == 0x85
    assert not (dev_b.gone.is_set() or app.gone.is_set() or admin.gone.is_set())
    publish_telemetry(srv, a, a_secret, {"t": 1})
    assert app.wait_topic(f"devices/{a}/telemetry"), app.messages
    assert admin.wait_topic(f"devices/{a}/telemetry"), admin.messages
    r = requests.put(cloud.url(f"/api/v1/devices/{b}/config"), json={"wifi": "secret"},
                     headers={**cloud.admin, "If-Match": '"0"'}, timeout=10)
    assert r.status_code == 200, r.text
    assert dev_b.wait_topic(f"devices/{b}/config")

    # The stored sessions keep their owners across a restart.
    for c in (dev_b, app, admin):
        c.close()
    srv.restart()
    cloud = Cloud(srv)
    for victim in (b, "app-session", "admin-session"):
        assert attempt(srv, victim, a, a_secret) == 0x85, victim
        assert attempt(srv, victim, other, other_secret) == 0x87, victim
    # ...and the owner resumes its own session (with the telemetry queued meanwhile).
    publish_telemetry(srv, a, a_secret, {"t": 2})
    back = V5(srv.mqtt_port, "app-session", reader, reader_secret, clean=False, expiry=3600)
    try:
        assert back.connect() == 0
        assert back.session_present
        assert back.wait_topic(f"devices/{a}/telemetry"), back.messages
    finally:
        back.close()


def test_anonymous_clients_cannot_use_a_device_id_or_a_named_principals_session(start_server):
    srv = start_server("identity-anon", env=ENV, anonymous=True)
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    owner = V5(srv.mqtt_port, dev, dev, secret, v5=False, clean=False)
    assert owner.connect() == 0
    owner.subscribe(f"devices/{dev}/config")
    admin = V5(srv.mqtt_port, "ops-console", "admin", ADMIN_SECRET, v5=False, clean=False)
    assert admin.connect() == 0
    for _ in range(5):
        assert attempt(srv, dev, v5=False) == 5
        assert attempt(srv, dev) == 0x87
        assert attempt(srv, "ops-console", v5=False) == 5
    # mosquitto_sub with no credentials, as a user would try it.
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port), "-i", dev,
                          "-t", "#", "-W", "2"], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0 and "not authorised" in out.stderr.lower(), out.stderr
    assert not owner.gone.is_set() and not admin.gone.is_set()
    # Anonymous clients may still take over each other's ids (they are one principal).
    assert attempt(srv, "anon-1", v5=False) == 0
    assert attempt(srv, "anon-1", v5=False) == 0
    owner.close()
    admin.close()


def test_devices_connect_with_their_own_id_or_a_configured_prefix(start_server):
    srv = start_server("identity-prefix", env=ENV, anonymous=False,
                       config='[mqtt]\ndevice_client_ids = "prefix"\n')
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    other, other_secret = cloud.add_device()
    assert attempt(srv, dev, dev, secret) == 0
    assert attempt(srv, f"{dev}-pump", dev, secret) == 0
    assert attempt(srv, f"{dev}/valve", dev, secret) == 0
    assert attempt(srv, f"{dev}x", dev, secret) == 0x85
    assert attempt(srv, f"{dev}-pump", other, other_secret) == 0x85
    # With prefixes on, `{id}-…` is the device's: an application cannot use it.
    app, app_secret = app_client(cloud, ["telemetry:read"])
    assert attempt(srv, f"{dev}-pump", app, app_secret) == 0x87
    # The exact default refuses the prefixed form.
    srv2 = start_server("identity-exact", env=ENV, anonymous=False)
    cloud2 = Cloud(srv2)
    d2, s2 = cloud2.add_device()
    assert attempt(srv2, f"{d2}-pump", d2, s2) == 0x85
    # An empty client id: the device is given its own.
    c = V5(srv2.mqtt_port, "", d2, s2)
    try:
        assert c.connect() == 0
    finally:
        c.close()


def test_a_legacy_session_is_reauthorized_when_its_device_resumes_it(start_server):
    """A session stored before owners were recorded, holding a subscription a device may not
    have (what the old hijack left behind): the device resumes it without that subscription
    and receives nothing outside its own tree."""
    srv = start_server("identity-legacy", env=ENV, anonymous=False)
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    spy, spy_secret = cloud.add_device()
    srv.stop()
    db = sqlite3.connect(srv.data_dir / "stratus.db")
    with db:
        db.execute("INSERT INTO mqtt_sessions (client_id, expiry_secs, last_seen_ms, will, owner) "
                   "VALUES (?, NULL, 0, x'', NULL)", (dev,))
        db.execute("INSERT INTO mqtt_subscriptions (client_id, filter, options, subscription_id) "
                   "VALUES (?, '#', 1, NULL)", (dev,))
        db.execute("INSERT INTO mqtt_subscriptions (client_id, filter, options, subscription_id) "
                   "VALUES (?, ?, 1, NULL)", (dev, f"devices/{dev}/config"))
    db.close()
    srv.start()
    cloud = Cloud(srv)
    # Nobody else adopts the device's legacy session.
    assert attempt(srv, dev, spy, spy_secret) == 0x85
    c = V5(srv.mqtt_port, dev, dev, secret, v5=False, clean=False)
    try:
        assert c.connect() == 0 and c.session_present
        publish_telemetry(srv, spy, spy_secret, {"leak": 1})
        r = requests.put(cloud.url(f"/api/v1/devices/{dev}/config"), json={"a": 1},
                         headers={**cloud.admin, "If-Match": '"0"'}, timeout=10)
        assert r.status_code == 200, r.text
        assert c.wait_topic(f"devices/{dev}/config"), c.messages
        time.sleep(0.5)
        assert all(t.startswith(f"devices/{dev}/") for t, _ in c.messages), c.messages
    finally:
        c.close()
    db = sqlite3.connect(f"file:{srv.data_dir / 'stratus.db'}?mode=ro", uri=True)
    filters = [f for (f,) in db.execute("SELECT filter FROM mqtt_subscriptions WHERE client_id = ?", (dev,))]
    owner = db.execute("SELECT owner FROM mqtt_sessions WHERE client_id = ?", (dev,)).fetchone()
    db.close()
    assert filters == [f"devices/{dev}/config"], filters
    assert owner == (f"device:{dev}",), owner


# ---- revocation sticks ---------------------------------------------------------------------

def http_status(cloud: Cloud, token: str) -> int:
    r = requests.post(cloud.url("/api/v1/telemetry"), json={"t": 1},
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
    return r.status_code


def mqtt_rc(srv, dev, token) -> int:
    return attempt(srv, dev, dev, token, v5=False)


def coap_code(srv, token) -> str:
    coap = shutil.which("coap-client-notls") or shutil.which("coap-client")
    if coap is None:
        pytest.skip("libcoap3-bin is not installed")
    out = subprocess.run([coap, "-m", "post", "-e", '{"t":1}', "-v", "6",
                          f"coap://127.0.0.1:{srv.coap}/telemetry?token={token}"],
                         capture_output=True, text=True, timeout=20)
    text = out.stdout + out.stderr
    for code in ("2.04", "4.01"):
        if code in text:
            return code
    return text


@pytest.fixture
def coap_srv(start_server):
    s = start_server("identity-coap", env=ENV, anonymous=False, start=False)
    s.start(wait=("mqtt", "http", "coap"))
    s.coap = s.listening()["coap"]
    return s


def test_rotation_then_restart_voids_earlier_tokens_everywhere(coap_srv):
    srv = coap_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    old = cloud.token(dev, secret)
    assert (http_status(cloud, old), mqtt_rc(srv, dev, old), coap_code(srv, old)) == (202, 0, "2.04")
    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    new_secret = r.json()["secret"]
    for _ in range(2):
        assert http_status(cloud, old) == 401
        assert mqtt_rc(srv, dev, old) == 4
        assert coap_code(srv, old) == "4.01"
        assert mqtt_rc(srv, dev, secret) == 4
        srv.restart()
        srv.coap = srv.listening()["coap"]
        cloud = Cloud(srv)
    new = cloud.token(dev, new_secret)
    assert (http_status(cloud, new), mqtt_rc(srv, dev, new), coap_code(srv, new)) == (202, 0, "2.04")


def test_delete_and_recreate_voids_the_old_devices_tokens_across_a_restart(srv):
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    old = cloud.token(dev, secret)
    assert http_status(cloud, old) == 202
    assert requests.delete(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10).status_code == 204
    dev2, secret2 = cloud.add_device(dev)
    assert dev2 == dev
    for _ in range(2):
        assert http_status(cloud, old) == 401
        assert mqtt_rc(srv, dev, old) == 4
        assert http_status(cloud, cloud.token(dev, secret2)) == 202
        srv.restart()
        cloud = Cloud(srv)


def test_a_token_from_the_same_second_as_a_rotation_dies_with_it(srv):
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    for _ in range(10):
        old = cloud.token(dev, secret)
        r = requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
        secret = r.json()["secret"]
        new = cloud.token(dev, secret)
        assert http_status(cloud, old) == 401
        assert mqtt_rc(srv, dev, old) == 4
        assert http_status(cloud, new) == 202


def test_an_application_secret_rotation_voids_its_tokens_across_a_restart(srv):
    cloud = Cloud(srv)
    app, app_secret = app_client(cloud, ["telemetry:read"])
    old = cloud.token(app, app_secret)

    def reads(tok):
        return requests.get(cloud.url("/api/v1/stream"), headers={"Authorization": f"Bearer {tok}"},
                            timeout=10, stream=True).status_code

    assert reads(old) == 200
    r = requests.post(cloud.url(f"/api/v1/clients/{app}/secret"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["client_id"] == app and body["client_secret"] != app_secret
    assert reads(old) == 401
    srv.restart()
    cloud = Cloud(srv)
    assert reads(old) == 401
    assert reads(cloud.token(app, body["client_secret"])) == 200
    # Only an admin rotates.
    reader = cloud.token(app, body["client_secret"])
    r = requests.post(cloud.url(f"/api/v1/clients/{app}/secret"),
                      headers={"Authorization": f"Bearer {reader}"}, timeout=10)
    assert r.status_code == 403


# ---- live sessions end ---------------------------------------------------------------------

def live_device(srv, cloud, password_is_token=False):
    dev, secret = cloud.add_device()
    password = cloud.token(dev, secret) if password_is_token else secret
    c = V5(srv.mqtt_port, dev, dev, password)
    assert c.connect() == 0
    return dev, secret, password, c


def ended_within(c: V5, seconds: float) -> float:
    t0 = time.monotonic()
    assert c.gone.wait(seconds), "still connected"
    return time.monotonic() - t0


def test_live_mqtt_connections_end_on_rotation_revocation_deletion_and_expiry(start_server):
    srv = start_server("identity-live", env={**ENV, "STRATUS_AUTH__TOKEN_TTL_SECS": "3"},
                       anonymous=False)
    cloud = Cloud(srv)

    dev, _, _, c = live_device(srv, cloud)
    requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
    ended_within(c, 1.5)
    assert c.disconnect_rc == 0x87
    c.close()

    dev, secret, token, c = live_device(srv, cloud, password_is_token=True)
    r = requests.post(cloud.url("/oauth/revoke"), data={"token": token}, auth=(dev, secret), timeout=10)
    assert r.status_code == 200, r.text
    ended_within(c, 1.5)
    assert c.disconnect_rc == 0x87
    c.close()

    dev, _, _, c = live_device(srv, cloud)
    requests.delete(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10)
    ended_within(c, 1.5)
    assert c.disconnect_rc == 0x98
    c.close()

    # A token of 3 s: the connection outlives it by at most about a second.
    dev, _, _, c = live_device(srv, cloud, password_is_token=True)
    took = ended_within(c, 6)
    assert c.disconnect_rc == 0xA0
    assert took <= 5.5, took
    c.close()

    # MQTT 3.1.1 has no DISCONNECT from the server: the socket closes.
    cloud = Cloud(srv)  # the admin's own token lives 3 s too
    dev, secret = cloud.add_device()
    v3 = V5(srv.mqtt_port, dev, dev, secret, v5=False)
    assert v3.connect() == 0
    requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
    ended_within(v3, 1.5)
    v3.close()
    # A secret-authenticated connection of a device that was not rotated stays.
    keep, keep_secret = cloud.add_device()
    k = V5(srv.mqtt_port, keep, keep, keep_secret)
    assert k.connect() == 0
    dev, _, _, c = live_device(srv, cloud)
    requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
    ended_within(c, 1.5)
    time.sleep(0.5)
    assert not k.gone.is_set()
    k.close()
    c.close()


def test_a_coap_observer_gets_4_01_within_a_second_of_a_rotation(coap_srv):
    aiocoap = pytest.importorskip("aiocoap")
    srv = coap_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    token = cloud.token(dev, secret)

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            req = aiocoap.Message(code=aiocoap.GET, observe=0,
                                  uri=f"coap://127.0.0.1:{srv.coap}/config?token={token}")
            pr = ctx.request(req)
            first = await asyncio.wait_for(pr.response, 5)
            assert first.code == aiocoap.CONTENT
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, lambda: requests.post(
                cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10))
            try:
                n = await asyncio.wait_for(pr.observation.__aiter__().__anext__(), 3)
                code = n.code
            except aiocoap.error.ResourceChanged:
                code = None
            except aiocoap.error.Error as e:
                code = getattr(getattr(e, "response", None), "code", e)
            took = time.monotonic() - t0
            return code, took
        finally:
            await ctx.shutdown()

    code, took = asyncio.run(go())
    assert code == aiocoap.UNAUTHORIZED, code
    assert took < 1.5, took


def test_an_sse_stream_closes_when_its_token_is_revoked(srv):
    cloud = Cloud(srv)
    app, app_secret = app_client(cloud, ["telemetry:read"])
    token = cloud.token(app, app_secret)
    r = requests.get(cloud.url("/api/v1/stream"), headers={"Authorization": f"Bearer {token}"},
                     timeout=10, stream=True)
    assert r.status_code == 200
    lines = []

    def read():
        for line in r.iter_lines(decode_unicode=True):
            lines.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t0 = time.monotonic()
    rv = requests.post(cloud.url("/oauth/revoke"), data={"token": token}, auth=(app, app_secret), timeout=10)
    assert rv.status_code == 200
    t.join(3)
    assert not t.is_alive(), "the stream is still open"
    assert time.monotonic() - t0 < 2
    assert "event: revoked" in lines, lines


# ---- no enumeration by timing --------------------------------------------------------------

def timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def alternating_medians(known_fn, unknown_fn, n=15) -> tuple[float, float]:
    """Median times of `n` calls each, the two alternating so the host's load falls on both."""
    known, unknown = [], []
    for i in range(n):
        known.append(timed_ms(known_fn))
        unknown.append(timed_ms(lambda: unknown_fn(i)))
    return statistics.median(known), statistics.median(unknown)


def test_unknown_ids_cost_what_wrong_secrets_cost(srv):
    cloud = Cloud(srv)
    dev, _ = cloud.add_device()

    def token(client_id):
        r = requests.post(cloud.url("/oauth/token"), data={"grant_type": "client_credentials"},
                          auth=(client_id, "wrong-secret"), timeout=10)
        assert r.status_code == 401

    def connect(user):
        assert attempt(srv, user, user, "wrong-secret", v5=False) == 4

    # Before the dummy verification an unknown id answered in 3-5 ms against ~70 ms (HTTP)
    # and 0.4 ms against 41 ms (MQTT): such a gap fails every round. A round spoiled by the
    # host's load (other builds on two cores) is measured again, up to three times.
    for name, known, unknown in (
        ("oauth", lambda: token(dev), lambda i: token(f"nobody-{i}")),
        ("mqtt", lambda: connect(dev), lambda i: connect(f"nobody-{i}")),
    ):
        rounds = []
        for _ in range(3):
            k, u = alternating_medians(known, unknown)
            rounds.append((round(k, 1), round(u, 1)))
            if abs(k - u) <= 0.25 * max(k, u):
                break
        else:
            pytest.fail(f"{name}: known vs unknown median ms {rounds}")


# ---- device tokens fit one CoAP ?token= ------------------------------------------------------

def test_a_device_token_fits_one_plain_query_with_libcoap_and_aiocoap(coap_srv):
    srv = coap_srv
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    token = cloud.token(dev, secret)
    assert len(token) <= 64, token
    assert coap_code(srv, token) == "2.04"
    aiocoap_client = shutil.which("aiocoap-client")
    if aiocoap_client:
        out = subprocess.run([aiocoap_client, "-m", "POST", "--payload", '{"t": 2}',
                              f"coap://127.0.0.1:{srv.coap}/telemetry?token={token}"],
                             capture_output=True, text=True, timeout=30)
        assert "4.01" not in out.stdout + out.stderr and out.returncode == 0, out.stdout + out.stderr
    # A cut token says so.
    coap = shutil.which("coap-client-notls") or shutil.which("coap-client")
    out = subprocess.run([coap, "-m", "post", "-e", '{"t":1}',
                          f"coap://127.0.0.1:{srv.coap}/telemetry?token={token[:30]}"],
                         capture_output=True, text=True, timeout=20)
    assert "cut short" in out.stdout + out.stderr, out.stdout + out.stderr
    # It works as an MQTT password and an HTTP bearer too.
    assert mqtt_rc(srv, dev, token) == 0
    assert http_status(cloud, token) == 202
