"""HTTP listener hygiene under attack, with raw sockets, `requests`, paho-mqtt and
mosquitto_pub: slowloris heads, idle keep-alive and trickling bodies are cut by their timers;
connection caps per address (429 + Retry-After) and per listener (503) answer at once; SSE and
WebSocket connections outlive the idle timer but count; and with a low fd limit, a flood of
unfinished HTTP requests leaves MQTT and `/healthz` answering. Each attack is checked for its
limit, its metric, and a bystander that is unharmed.

Loopback has all of 127.0.0.0/8, so "another address" is a client socket bound to 127.0.0.N.
Timeouts are set to a few seconds in the servers' configs so that the tests run in seconds;
one test shows the default header timeout (10 s)."""

from __future__ import annotations

import json
import resource
import socket
import ssl
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
import requests

from cloud import ADMIN_SECRET, Cloud, unique
from clients import assert_healthy
from test_transports import pki, start_tls, tls_config  # noqa: F401  (pki is a fixture)

SHORT = """
[http]
header_read_timeout_secs = 2
idle_timeout_secs = 3
body_timeout_secs = 2
"""
# How late a timer may fire on a loaded machine and still pass.
SLACK = 2.5


def raw(port, source="127.0.0.1", timeout=10.0):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def read_response(s):
    """(status, headers with lower-case names, body) of one HTTP/1.1 response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def get(port, path="/healthz", source="127.0.0.1", headers=""):
    with raw(port, source) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
        return read_response(s)


def is_closed(s) -> bool:
    """True when the peer closed `s` (EOF or reset); never blocks."""
    s.setblocking(False)
    try:
        return s.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def wait_closed(s, within: float) -> float:
    """Seconds until the peer closes `s`; fails after `within`."""
    start = time.monotonic()
    s.settimeout(within)
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        pytest.fail(f"still open after {within} s")
    except OSError:
        pass
    return time.monotonic() - start


def metric(srv, name, **labels) -> float:
    """A metric's value, read from an address no test floods (retried while refused)."""
    deadline = time.monotonic() + 5
    while True:
        status, _, body = get(srv.http_port, "/metrics", source="127.0.0.254")
        if status == 200:
            break
        assert time.monotonic() < deadline, f"/metrics answered {status}"
        time.sleep(0.1)
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.decode().splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{")[0] not in (name, name + "_total"):
            continue
        if "{" + want + "}" in head:
            return float(value)
    return 0.0


def raise_own_fd_limit(want=4096):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def mqtt_publishes(port):
    """mosquitto_pub connects and gets its QoS 1 PUBLISH acknowledged (its own process: paho's
    select() cannot watch descriptors above 1024, which the floods below use up)."""
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv311",
                        "-i", unique("bystander"), "-t", "bystander/t", "-m", "hi", "-q", "1"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


# ---- timers


def test_slowloris_heads_are_cut_at_the_header_timeout_while_others_are_served(start_server):
    srv = start_server("slowloris", config=SHORT)
    # 200 connections from 10 addresses (under the per-address cap), each sending one more
    # header line every second and never the blank line that ends the head.
    socks = []
    for i in range(200):
        s = raw(srv.http_port, source=f"127.0.0.{2 + i % 10}")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    start = time.monotonic()
    closed_at = {}
    served = 0
    while len(closed_at) < len(socks) and time.monotonic() - start < 2 + SLACK + 1:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed_at[i] = time.monotonic() - start
                continue
            if is_closed(s):
                closed_at[i] = time.monotonic() - start
        status, _, _ = get(srv.http_port, source="127.0.0.99")
        assert status == 200
        served += 1
        time.sleep(1.0)
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} slow heads still open"
    assert max(closed_at.values()) <= 2 + SLACK, closed_at
    assert served >= 2
    assert metric(srv, "stratus_http_timeouts", listener="http", kind="header") >= 200
    for s in socks:
        s.close()


def test_a_silent_connection_closes_at_the_default_header_timeout_of_10_s(server):
    s = raw(server.http_port)
    took = wait_closed(s, within=10 + SLACK)
    assert took >= 9.5, f"closed after {took:.1f} s, before the 10 s default"


def test_idle_keep_alive_closes_at_the_idle_timeout_and_a_busy_one_stays(start_server):
    srv = start_server("idle", config=SHORT)
    idle, busy = raw(srv.http_port), raw(srv.http_port)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(idle)[0] == 200
    start = time.monotonic()
    took = None
    # The busy connection asks every second for 6 s (longer than both timers) on one socket.
    for tick in range(24):
        if tick % 4 == 0:
            busy.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(busy)[0] == 200
        if took is None and is_closed(idle):
            took = time.monotonic() - start
        time.sleep(0.25)
    assert took is not None, "the idle connection is still open after 6 s"
    assert 2.5 <= took <= 3 + SLACK, f"idle connection closed after {took:.1f} s (idle timeout 3 s)"
    busy.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(busy)[0] == 200, "a connection in use was cut"
    assert metric(srv, "stratus_http_timeouts", listener="http", kind="idle") >= 1


def test_a_trickling_body_gets_408_and_a_long_steady_upload_passes(start_server):
    srv = start_server("body", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                       config=SHORT + "body_min_bytes_per_sec = 500\n")
    cloud = Cloud(srv)
    device, secret = cloud.add_device()
    token = cloud.token(device, secret)

    # One byte every 0.5 s of a form body: far below 500 B/s.
    s = raw(srv.http_port)
    s.sendall(b"POST /oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              b"Content-Length: 200\r\n\r\ng")
    start = time.monotonic()
    status = None
    while time.monotonic() - start < 2 + SLACK + 1:
        s.settimeout(0.5)
        try:
            status, headers, body = read_response(s)
            break
        except socket.timeout:
            s.sendall(b"r")
    took = time.monotonic() - start
    assert status == 408, "a trickling body was not cut"
    assert headers.get("connection") == "close"
    assert json.loads(body)["error"] == "request_timeout"
    assert took <= 2 + SLACK
    assert metric(srv, "stratus_http_timeouts", listener="http", kind="body") >= 1

    # 3,000 records (~90 KB) over 3.5 s, twice the body timeout, at ~26 KB/s: accepted.
    records = [{"ts": 1_700_000_000_000 + i, "t": i} for i in range(3000)]
    payload = json.dumps(records).encode()
    s = raw(srv.http_port)
    s.sendall(f"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
              f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
    chunk = len(payload) // 10 + 1
    start = time.monotonic()
    for i in range(0, len(payload), chunk):
        s.sendall(payload[i:i + chunk])
        time.sleep(0.35)
    assert time.monotonic() - start > 3
    status, _, body = read_response(s)
    assert status == 202, body
    assert len(cloud.points(device, "t", limit=5000)) == 3000


def test_sse_and_websocket_outlive_the_idle_timer_and_count_against_the_caps(start_server):
    srv = start_server("streams", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                       config=SHORT + "max_connections_per_address = 2\n")
    cloud = Cloud(srv)
    token = cloud.token("admin", ADMIN_SECRET)
    sse = raw(srv.http_port, source="127.0.0.3")
    sse.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sse.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head

    ws = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("ws"), transport="websockets",
                     protocol=mqtt.MQTTv311)
    ws.ws_set_options(path="/mqtt")
    ws.username_pw_set("admin", ADMIN_SECRET)
    ws.connect("127.0.0.1", srv.http_port, keepalive=60, bind_address="127.0.0.3")
    ws.loop_start()
    try:
        time.sleep(3 + SLACK)  # past the idle (3 s) and header (2 s) timers
        assert ws.is_connected(), "the WebSocket was cut"
        device, secret = cloud.add_device()
        r = cloud.post(cloud.device_headers(device, secret), {"alive": 1})
        assert r.status_code == 202
        sse.settimeout(5)
        seen = b""
        while device.encode() not in seen:
            data = sse.recv(4096)
            assert data, "the SSE stream was cut"
            seen += data
        # Both count: a third connection from their address is refused.
        status, headers, _ = get(srv.http_port, source="127.0.0.3")
        assert status == 429 and headers["retry-after"] == "5"
        assert metric(srv, "stratus_http_connections", listener="http") >= 2
    finally:
        ws.disconnect()
        ws.loop_stop()
        sse.close()


# ---- caps


def test_the_per_address_cap_answers_429_with_retry_after_and_spares_other_addresses(start_server):
    srv = start_server("peraddr", config="[http]\nmax_connections_per_address = 4\n")
    held = []
    for _ in range(4):
        s = raw(srv.http_port)
        s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n")
        held.append(s)
    time.sleep(0.2)
    status, headers, body = get(srv.http_port)
    assert status == 429
    assert headers["retry-after"] == "5" and headers["connection"] == "close"
    assert json.loads(body)["error"] == "too_many_connections"
    assert get(srv.http_port, source="127.0.0.2")[0] == 200
    held.pop().close()
    deadline = time.monotonic() + 5
    while get(srv.http_port)[0] != 200:
        assert time.monotonic() < deadline, "a slot freed by a close did not come back"
        time.sleep(0.1)
    assert metric(srv, "stratus_connections_refused", listener="http", reason="address_limit") >= 1
    for s in held:
        s.close()


def test_a_full_listener_answers_503_and_mqtt_still_connects(start_server, clients):
    # 8 connections per listener; one address may hold a quarter of them (2).
    srv = start_server("full", config="[http]\nmax_connections = 8\n")
    held = []
    for i in range(8):
        s = raw(srv.http_port, source=f"127.0.0.{10 + i // 2}")
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    time.sleep(0.2)
    status, headers, body = get(srv.http_port, source="127.0.0.50")
    assert status == 503
    assert headers["retry-after"] == "5"
    assert json.loads(body)["error"] == "server_busy"
    mqtt_publishes(srv.mqtt_port)
    assert_healthy(srv)
    for s in held:
        s.close()
    assert metric(srv, "stratus_connections_refused", listener="http", reason="listener_full") >= 1


def test_an_oversized_head_gets_431(server):
    with raw(server.http_port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        assert read_response(s)[0] == 431
    assert get(server.http_port)[0] == 200


# ---- file descriptors


def test_an_fd_flood_from_one_address_leaves_mqtt_and_healthz_answering(start_server, clients):
    raise_own_fd_limit()
    # Soft and hard limit 256: raising cannot help; the caps must fit.
    srv = start_server("fds", nofile=(256, 256))
    flood = []
    try:
        # 1,100 unfinished requests from one address: more than the server has descriptors.
        for _ in range(1100):
            s = raw(srv.http_port)
            s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            flood.append(s)
        start = time.monotonic()
        status, _, _ = get(srv.http_port, source="127.0.0.2")
        assert status == 200
        assert time.monotonic() - start < 2, "/healthz was slow under the flood"
        mqtt_publishes(srv.mqtt_port)
        assert_healthy(srv)
        refused = metric(srv, "stratus_connections_refused", listener="http", reason="address_limit")
        assert refused >= 1000
        assert metric(srv, "stratus_accept_errors", listener="http") == 0
        assert metric(srv, "stratus_accept_errors", listener="mqtt") == 0
    finally:
        for s in flood:
            s.close()
    assert "Too many open files" not in srv.log()
    assert "connection caps lowered to fit the file descriptor limit" in srv.log()


def test_a_flood_from_many_addresses_fills_http_but_not_mqtt(start_server, clients):
    raise_own_fd_limit()
    srv = start_server("fds2", nofile=(256, 256))
    flood = []
    try:
        # 6 per address from 200 addresses: the listener fills (503) long before the fds.
        for i in range(1200):
            s = raw(srv.http_port, source=f"127.0.{1 + i // 6 // 250}.{1 + i // 6 % 250}")
            s.sendall(b"POST /api/v1/telemetry HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
            flood.append(s)
        assert get(srv.http_port, source="127.0.9.9")[0] == 503
        mqtt_publishes(srv.mqtt_port)
        assert_healthy(srv)
    finally:
        for s in flood:
            s.close()
    deadline = time.monotonic() + 5
    while get(srv.http_port, source="127.0.9.9")[0] != 200:
        assert time.monotonic() < deadline, "the listener did not recover after the flood"
        time.sleep(0.1)
    assert metric(srv, "stratus_connections_refused", listener="http", reason="listener_full") >= 1000
    assert metric(srv, "stratus_accept_errors", listener="http") == 0
    assert metric(srv, "stratus_accept_errors", listener="mqtt") == 0
    assert "Too many open files" not in srv.log()


def test_serve_raises_its_soft_fd_limit_to_the_hard_limit(start_server):
    srv = start_server("raise", nofile=(256, 4096))
    assert "raised the file descriptor limit from=256 to=4096" in srv.log()
    assert "fd_limit=4096" in srv.log()


# ---- HTTPS shares the listener


def test_https_silent_and_unfinished_connections_are_cut_and_capped(start_server, pki):  # noqa: F811
    cfg = tls_config(pki).replace("[http]\n", "[http]\nheader_read_timeout_secs = 2\nmax_connections_per_address = 2\n")
    srv = start_tls(start_server, "https", config=cfg)
    port = srv.listening()["https"]
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    # No ClientHello at all, then a finished handshake with no request: both cut at 2 s.
    silent = raw(port, source="127.0.0.5")
    tls = ctx.wrap_socket(raw(port, source="127.0.0.6"), server_hostname="localhost")
    assert wait_closed(silent, within=2 + SLACK) >= 1.5
    assert wait_closed(tls, within=SLACK) >= 0
    # Over the per-address cap an HTTPS connection is closed without an answer.
    held = [ctx.wrap_socket(raw(port, source="127.0.0.7"), server_hostname="localhost") for _ in range(2)]
    extra = raw(port, source="127.0.0.7")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ctx.wrap_socket(extra, server_hostname="localhost")
    r = requests.get(f"https://localhost:{port}/healthz", verify=str(pki / "ca.pem"), timeout=10)
    assert r.status_code == 200
    assert metric(srv, "stratus_connections_refused", listener="https", reason="address_limit") >= 1
    assert metric(srv, "stratus_http_timeouts", listener="https", kind="header") >= 2
    for s in held:
        s.close()


def test_sigterm_with_sse_and_kept_alive_connections_exits_0_within_5_s(start_server):
    srv = start_server("stop", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False)
    token = Cloud(srv).token("admin", ADMIN_SECRET)
    sse = raw(srv.http_port)
    sse.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    assert sse.recv(4096).startswith(b"HTTP/1.1 200")
    kept = raw(srv.http_port)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(kept)[0] == 200
    start = time.monotonic()
    assert srv.stop(timeout=10) == 0
    assert time.monotonic() - start < 5
    assert "abandoning remaining tasks" not in srv.log()
