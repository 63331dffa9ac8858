"""CoAP interop: libcoap's coap-client (notls/openssl/gnutls builds) and Python aiocoap against
`stratus serve` — discovery, telemetry (CON and NON), errors, Observe of the desired config
after an HTTP change, Block1 uploads, a duplicated CON stored once, hostile datagrams, and
CoAPS (DTLS 1.2 PSK, the key derived from the device secret, replaced by a rotation), and
multicast discovery in a network namespace (answers to discovery only, silence otherwise;
only on the interface of the bind address).

A device authenticates on plain UDP with `?token=ACCESS_TOKEN` (59 characters: one item;
these tests also pass it as `-O 15,token=…` options and split, which the server joins).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from stratus_server import clean_env, stratus_bin

aiocoap = pytest.importorskip("aiocoap")

COAP_CONFIG = "[coap]\ndtls = true\ndtls_port = 0\n"
# A non-confirmable request (aiocoap ≥ 0.4.8 spells it transport_tuning).
NON = ({"transport_tuning": aiocoap.Unreliable} if hasattr(aiocoap, "Unreliable")
       else {"mtype": aiocoap.NON})


def coap_client(flavour="notls"):
    path = shutil.which(f"coap-client-{flavour}")
    if path is None:
        pytest.skip(f"coap-client-{flavour} (libcoap3-bin) is not installed")
    return path


def token_query(token: str) -> str:
    return "&".join(f"token={token[i:i + 200]}" for i in range(0, len(token), 200))


def token_opts(token: str) -> list:
    """coap-client (libcoap 4.3) keeps only ~70 bytes of a URI's query: pass the token's
    Uri-Query items (option 15) with -O instead."""
    out = []
    for item in token_query(token).split("&"):
        out += ["-O", f"15,{item}"]
    return out


@pytest.fixture
def srv(start_server):
    s = start_server("coap", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, config=COAP_CONFIG,
                     anonymous=False, start=False)
    s.start(wait=("mqtt", "http", "coap", "coaps"))
    s.coap = s.listening()["coap"]
    s.coaps = s.listening()["coaps"]
    return s


@pytest.fixture
def device(srv):
    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
    token = cloud.token(dev, secret)
    return cloud, dev, secret, token


def run_client(args, flavour="notls", timeout=20, input=None):
    cmd = [coap_client(flavour), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)


def wait_points(cloud, dev, key, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    pts = []
    while time.monotonic() < deadline:
        pts = cloud.points(dev, key)
        if len(pts) >= n:
            return pts
        time.sleep(0.05)
    return pts


# ---- raw datagrams ---------------------------------------------------------------------

def encode_options(options):
    """options: list of (number, bytes), sorted by number."""
    out = b""
    last = 0
    for num, val in sorted(options, key=lambda o: o[0]):
        delta = num - last
        last = num
        def ext(v):
            if v < 13:
                return v, b""
            if v < 269:
                return 13, bytes([v - 13])
            return 14, struct.pack(">H", v - 269)
        d, dx = ext(delta)
        ln, lx = ext(len(val))
        out += bytes([(d << 4) | ln]) + dx + lx + val
    return out


def raw_request(mtype, code, mid, token, path, queries=(), payload=b"", content_format=None):
    opts = [(11, seg.encode()) for seg in path.strip("/").split("/")]
    opts += [(15, q.encode()) for q in queries]
    if content_format is not None:
        opts.append((12, bytes([content_format]) if content_format else b""))
    head = bytes([0x40 | (mtype << 4) | len(token), code]) + struct.pack(">H", mid) + token
    body = encode_options(opts)
    if payload:
        body += b"\xff" + payload
    return head + body


def parse_response(data):
    tkl = data[0] & 0x0F
    code = data[1]
    mtype = (data[0] >> 4) & 3
    mid = struct.unpack(">H", data[2:4])[0]
    marker = data.find(b"\xff", 4 + tkl)
    payload = data[marker + 1:] if marker >= 0 else b""
    return mtype, f"{code >> 5}.{code & 31:02d}", mid, payload


def udp(port, timeout=5.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


# ---- libcoap ---------------------------------------------------------------------------

def test_discovery_with_libcoap_and_filters(srv):
    out = run_client(["-m", "get", f"coap://127.0.0.1:{srv.coap}/.well-known/core"])
    assert out.returncode == 0, out.stderr
    doc = out.stdout
    for href in ("</telemetry>", "</config>", "</config/reported>", "</upload>", "</firmware>"):
        assert href in doc, doc
    assert 'rt="stratus.config"' in doc and ";obs" in doc and 'if="core.p"' in doc and "sz=" in doc
    out = run_client(["-m", "get", f"coap://127.0.0.1:{srv.coap}/.well-known/core?rt=stratus.config"])
    assert out.stdout.strip().startswith('</config>;rt="stratus.config"'), out.stdout
    assert "</telemetry>" not in out.stdout


def test_telemetry_con_and_non_with_libcoap(device):
    cloud, dev, _, token = device
    port = cloud.srv.coap
    url = f"coap://127.0.0.1:{port}/telemetry"
    t = token_opts(token)
    out = run_client([*t, "-m", "post", "-t", "50", "-e", '{"temperature": 20.5}', url])
    assert out.returncode == 0 and "4." not in out.stdout + out.stderr, (out.stdout, out.stderr)
    out = run_client([*t, "-N", "-m", "post", "-t", "50", "-e",
                      '{"date": "2018-04-04", "time": "09:30:00", "temperature": 21.5}', url])
    assert out.returncode == 0, out.stderr
    pts = wait_points(cloud, dev, "temperature", 2)
    assert sorted(p["value"] for p in pts) == [20.5, 21.5], pts


def test_errors_with_libcoap(device):
    cloud, dev, _, token = device
    port = cloud.srv.coap
    q = token_opts(token)
    def code_of(args):
        out = run_client(["-v", "6", *args])
        text = out.stdout + out.stderr
        for line in text.splitlines():
            if "t:ACK" in line or "t:NON c:4" in line or "t:CON c:4" in line:
                if " c:" in line:
                    c = line.split(" c:")[1].split()[0]
                    if c[0] in "245":
                        return c, text
        return None, text
    c, text = code_of(["-m", "get", *q, f"coap://127.0.0.1:{port}/no/such"])
    assert c == "4.04", text
    c, text = code_of(["-m", "get", *q, f"coap://127.0.0.1:{port}/telemetry"])
    assert c == "4.05", text
    c, text = code_of(["-m", "post", "-e", '{"t": 1}', f"coap://127.0.0.1:{port}/telemetry"])
    assert c == "4.01", text
    c, text = code_of(["-m", "post", "-e", '{"t": 1}', f"coap://127.0.0.1:{port}/telemetry?token=bogus"])
    assert c == "4.01", text
    c, text = code_of(["-m", "post", "-e", '{"t": [1]}', *q, f"coap://127.0.0.1:{port}/telemetry"])
    assert c == "4.00", text
    assert 'field \\"t\\"' in text or 'field "t"' in text or "field" in text, text
    admin_token = cloud.token("admin", ADMIN_SECRET)
    c, text = code_of(["-m", "get", *token_opts(admin_token), f"coap://127.0.0.1:{port}/config"])
    assert c == "4.03", text
    c, text = code_of(["-m", "get", *q, f"coap://127.0.0.1:{port}/firmware/fw-1"])
    assert c == "4.04", text


def test_replay_is_4_09(device):
    cloud, dev, _, token = device
    url = f"coap://127.0.0.1:{cloud.srv.coap}/telemetry"
    t = token_opts(token)
    body = json.dumps({"sent": int(time.time() * 1000), "nonce": "coap-n1", "v": 1})
    first = run_client([*t, "-v", "6", "-m", "post", "-t", "50", "-e", body, url])
    assert "c:2.04" in first.stdout + first.stderr, first.stdout + first.stderr
    again = run_client([*t, "-v", "6", "-m", "post", "-t", "50", "-e", body, url])
    assert "c:4.09" in again.stdout + again.stderr, again.stdout + again.stderr
    assert len(cloud.points(dev, "v")) == 1


def test_block1_upload_with_libcoap(device, tmp_path):
    cloud, dev, _, token = device
    records = [{"ts": 1_700_000_000_000 + i, "level": i} for i in range(200)]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(records))
    assert path.stat().st_size > 4096
    url = f"coap://127.0.0.1:{cloud.srv.coap}/upload"
    out = run_client([*token_opts(token), "-v", "6", "-b", "64", "-m", "put", "-t", "50", "-f", str(path), url])
    text = out.stdout + out.stderr
    # Each block is acknowledged 2.31 Continue; the last one's 2.04 carries the final Block1.
    assert out.returncode == 0 and "Block1:0/M/64" in text and "c:2.04" in text, text
    pts = wait_points(cloud, dev, "level", 200)
    assert len(pts) == 200


# ---- raw UDP ---------------------------------------------------------------------------

def test_duplicated_con_is_stored_once(device):
    cloud, dev, _, token = device
    q = token_query(token).split("&")
    mid = random.randrange(65536)
    dgram = raw_request(0, 0x02, mid, b"\x01\x02\x03\x04", "/telemetry", q,
                        b'{"pressure": 1013.25}', content_format=50)
    s = udp(cloud.srv.coap)
    replies = []
    for _ in range(3):
        s.send(dgram)
        replies.append(s.recv(2048))
    s.close()
    assert all(r == replies[0] for r in replies), replies
    mtype, code, rmid, _ = parse_response(replies[0])
    assert (mtype, code, rmid) == (2, "2.04", mid)
    time.sleep(0.3)
    assert len(cloud.points(dev, "pressure")) == 1
    assert cloud.metric("stratus_coap_duplicates") >= 2


def test_hostile_datagrams_leave_the_server_serving(device):
    cloud, dev, _, token = device
    port = cloud.srv.coap
    s = udp(port)
    rnd = random.Random(7)
    junk = [b"", b"\x00", b"\xff" * 3, b"\x80\x01\x00\x01",  # version 2
            b"\x48\x01\x00\x01\x01",  # token length 8, truncated
            b"\x40\x01\x00\x01\xd0",  # option with a missing extended delta
            b"\x40\x01\x00\x01\xff",  # payload marker and no payload
            b"\x4f\x01\x00\x01",  # token length 15 (reserved)
            ]
    junk += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))) for _ in range(300)]
    good = raw_request(0, 0x02, 4242, b"\x09", "/telemetry", token_query(token).split("&"),
                       b'{"after": 1}')
    for j in junk:
        s.send(j)
    s.send(good)
    s.settimeout(5)
    deadline = time.monotonic() + 5
    answered = False
    while time.monotonic() < deadline and not answered:
        try:
            data = s.recv(4096)
        except socket.timeout:
            break
        mtype, code, mid, _ = parse_response(data)
        answered = mid == 4242 and code == "2.04"
    s.close()
    assert answered
    assert cloud.srv.alive()
    assert cloud.metric("stratus_coap_bad_datagrams") >= 5
    out = run_client(["-m", "get", f"coap://127.0.0.1:{port}/.well-known/core"])
    assert "</telemetry>" in out.stdout


# ---- aiocoap ---------------------------------------------------------------------------

def aio(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_aiocoap_get_post_put_and_non(device):
    cloud, dev, _, token = device
    base = f"coap://127.0.0.1:{cloud.srv.coap}"
    q = token_query(token)

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            r = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=f"{base}/.well-known/core")).response
            assert r.code == aiocoap.CONTENT and b"</config>" in r.payload
            r = await ctx.request(aiocoap.Message(
                code=aiocoap.POST, uri=f"{base}/telemetry?{q}", payload=b'{"rpm": 1200}',
                content_format=50)).response
            assert r.code == aiocoap.CHANGED, r
            r = await ctx.request(aiocoap.Message(
                **NON, code=aiocoap.POST, uri=f"{base}/telemetry?{q}",
                payload=b'{"rpm": 1300}')).response
            assert r.code == aiocoap.CHANGED, r
            r = await ctx.request(aiocoap.Message(
                code=aiocoap.PUT, uri=f"{base}/config/reported?{q}",
                payload=b'{"interval": 9}')).response
            assert r.code == aiocoap.CHANGED, r
            r = await ctx.request(aiocoap.Message(code=aiocoap.DELETE, uri=f"{base}/config?{q}")).response
            assert r.code == aiocoap.METHOD_NOT_ALLOWED, r
            r = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=f"{base}/config?{q}")).response
            assert r.code == aiocoap.CONTENT
            doc = json.loads(r.payload)
            assert doc["version"] == 0 and doc["config"] == {}
            assert r.opt.etag == b"\x00"
        finally:
            await ctx.shutdown()

    aio(go())
    assert sorted(p["value"] for p in wait_points(cloud, dev, "rpm", 2)) == [1200, 1300]
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10)
    assert r.json()["reported"]["config"] == {"interval": 9}


def test_aiocoap_observe_gets_http_config_changes(device):
    cloud, dev, _, token = device
    base = f"coap://127.0.0.1:{cloud.srv.coap}"

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            req = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/config?{token_query(token)}", observe=0)
            pr = ctx.request(req)
            first = await pr.response
            assert first.code == aiocoap.CONTENT and first.opt.observe is not None
            assert json.loads(first.payload)["version"] == 0
            notes = pr.observation.__aiter__()
            loop = asyncio.get_running_loop()
            for version, value in ((1, {"interval": 5}), (2, {"interval": 6, "mode": "eco"})):
                r = await loop.run_in_executor(None, lambda: requests.put(
                    cloud.url(f"/api/v1/devices/{dev}/config"), json=value,
                    headers=cloud.admin, timeout=10))
                assert r.status_code == 200, r.text
                n = await asyncio.wait_for(notes.__anext__(), 10)
                doc = json.loads(n.payload)
                assert doc["version"] == version and doc["config"] == value, doc
                assert n.opt.etag == bytes([version])
            # Deleting the device ends the observation with 4.04.
            r = await loop.run_in_executor(None, lambda: requests.delete(
                cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10))
            assert r.status_code in (200, 204), r.text
            try:
                n = await asyncio.wait_for(notes.__anext__(), 10)
                assert n.code == aiocoap.NOT_FOUND
            except (StopAsyncIteration, aiocoap.error.Error):
                pass
        finally:
            await ctx.shutdown()

    aio(go())


def test_libcoap_observe_gets_a_notification(device, tmp_path):
    cloud, dev, _, token = device
    url = f"coap://127.0.0.1:{cloud.srv.coap}/config"
    proc = subprocess.Popen([coap_client(), *token_opts(token), "-s", "6", "-B", "8", "-m", "get", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and cloud.metric("stratus_coap_observers") < 1:
            time.sleep(0.05)
        assert cloud.metric("stratus_coap_observers") >= 1
        r = requests.put(cloud.url(f"/api/v1/devices/{dev}/config"), json={"led": "on"},
                         headers=cloud.admin, timeout=10)
        assert r.status_code == 200, r.text
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    # coap-client prints each representation as it comes, without a separator.
    docs, rest, dec = [], out.strip(), json.JSONDecoder()
    while rest.startswith("{"):
        doc, end = dec.raw_decode(rest)
        docs.append(doc)
        rest = rest[end:].lstrip()
    assert [d["version"] for d in docs][:2] == [0, 1], (out, err)
    assert docs[1]["config"] == {"led": "on"}


# ---- CoAPS -----------------------------------------------------------------------------

def device_psk(dev, secret):
    """The device's CoAPS key as the README documents it: computed from its secret alone."""
    mac = hmac.new(secret.encode(), b"stratus-coap-psk/v1:" + dev.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def cli_psk(dev, secret):
    """`stratus device psk ID --secret S`."""
    out = subprocess.run([stratus_bin(), "device", "psk", dev, "--secret", secret],
                         capture_output=True, text=True, timeout=20, env=clean_env())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def coaps_post(srv, dev, key, body, flavour="openssl", extra=()):
    url = f"coaps://127.0.0.1:{srv.coaps}"
    return run_client([*extra, "-u", dev, "-k", key, "-m", "post", "-t", "50", "-e", body,
                       f"{url}/telemetry"], flavour=flavour)


@pytest.mark.parametrize("flavour", ["openssl", "gnutls"])
def test_dtls_psk_with_libcoap(device, flavour):
    cloud, dev, secret, _ = device
    srv = cloud.srv
    psk = device_psk(dev, secret)
    assert cli_psk(dev, secret) == psk
    url = f"coaps://127.0.0.1:{srv.coaps}"
    out = coaps_post(srv, dev, psk, f'{{"dtls_{flavour}": 1}}', flavour, extra=("-v", "6"))
    text = out.stdout + out.stderr
    assert "c:2.04" in text, text
    assert len(wait_points(cloud, dev, f"dtls_{flavour}", 1)) == 1
    out = run_client(["-u", dev, "-k", psk, "-m", "get", f"{url}/config"], flavour=flavour)
    assert json.loads(out.stdout.strip().splitlines()[-1])["version"] == 0, out.stdout + out.stderr
    # A wrong key, a key derived from a wrong secret, or an unknown identity gets nothing.
    for user, key in ((dev, "not-the-key"), (dev, device_psk(dev, "wrong-secret")),
                      ("nobody", psk)):
        out = run_client(["-B", "3", "-u", user, "-k", key, "-m", "post", "-e", '{"x": 1}',
                          f"{url}/telemetry"], flavour=flavour)
        assert "2.04" not in out.stdout
    assert cloud.points(dev, "x") == []
    assert srv.alive()


def test_dtls_psk_follows_secret_rotation(device):
    cloud, dev, old_secret, _ = device
    srv = cloud.srv
    old_psk = device_psk(dev, old_secret)
    out = coaps_post(srv, dev, old_psk, '{"rot": 1}', extra=("-v", "6"))
    assert "c:2.04" in out.stdout + out.stderr, out.stdout + out.stderr
    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/secret"), headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    new_secret = r.json()["secret"]
    new_psk = device_psk(dev, new_secret)
    assert new_psk != old_psk
    # The old secret's key no longer completes a handshake …
    out = coaps_post(srv, dev, old_psk, '{"rot": 2}', extra=("-B", "3"))
    assert "2.04" not in out.stdout + out.stderr
    # … and the new one does.
    out = coaps_post(srv, dev, new_psk, '{"rot": 3}', extra=("-v", "6"))
    assert "c:2.04" in out.stdout + out.stderr, out.stdout + out.stderr
    values = [p["value"] for p in wait_points(cloud, dev, "rot", 2)]
    assert values == [1, 3], values
    # The database holds the key sealed: neither PSK appears in it in clear.
    db = (srv.data_dir / "stratus.db").read_bytes()
    for wal in srv.data_dir.glob("stratus.db-wal"):
        db += wal.read_bytes()
    assert old_psk.encode() not in db and new_psk.encode() not in db
    assert srv.alive()


# ---- multicast (RFC 7252 §8, RFC 7390 §2) ---------------------------------------------------

MC_PROBE = r'''
import json, os, socket, sys, time
group, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
iface = os.environ.get("MC_IF", "127.0.0.1")  # the interface (by address) the request leaves on
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
s.bind((iface, 0))
for m in sys.argv[4:]:
    s.sendto(bytes.fromhex(m), (group, port))
out, deadline = [], time.monotonic() + wait
while (left := deadline - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        out.append(s.recvfrom(65535)[0].hex())
    except socket.timeout:
        break
print(json.dumps(out))
'''


def coap_msg(mtype, code, mid, path, payload=b"", token=b""):
    """A CoAP message with Uri-Path options (option lengths below 13)."""
    out = bytes([0x40 | (mtype << 4) | len(token), code]) + struct.pack("!H", mid) + token
    delta = 11
    for seg in path.strip("/").split("/"):
        out += bytes([(delta << 4) | len(seg)]) + seg.encode()
        delta = 0
    return out + (b"\xff" + payload if payload else b"")


@pytest.fixture
def netns():
    """A network namespace whose loopback carries IPv4 multicast (the host's `lo` may lack the
    MULTICAST flag), removed by name at the end."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    name = f"stratus-coap-mc-{random.randrange(1 << 30):x}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (root needed): {made.stderr.strip()}")
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "lo", "multicast", "on"],
                    ["ip", "route", "add", "224.0.0.0/4", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_multicast_answers_discovery_only(start_server, netns):
    from stratus_server import Server

    class NsServer(Server):
        def command(self, mqtt_port, http_port):
            return ["ip", "netns", "exec", netns, *super().command(mqtt_port, http_port)]

    s = start_server("mc", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET},
                     config="[coap]\nmulticast = true\nmulticast_leisure_ms = 200\n",
                     anonymous=False, start=False)
    s.__class__ = NsServer
    s.start(wait=("mqtt", "http", "coap"))
    port = s.listening()["coap"]

    def probe(*msgs, group="224.0.1.187", wait=1.5):
        out = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", MC_PROBE, group,
                              str(port), str(wait), *(m.hex() for m in msgs)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return [bytes.fromhex(h) for h in json.loads(out.stdout)]

    # Discovery sent to the group is answered (NON, 2.05, link format) after the Leisure.
    answers = probe(coap_msg(1, 0x01, 0x1001, "/.well-known/core", token=b"\x01\x02"))
    assert len(answers) == 1, answers
    a = answers[0]
    assert a[1] == 0x45 and a[0] >> 4 & 3 == 1 and a[4:6] == b"\x01\x02", a.hex()
    assert b"</telemetry>" in a and b"</config>" in a, a
    # Anything else sent to the group gets no answer at all: no 4.01, 4.04 or 4.05, no RST.
    silent = probe(
        coap_msg(1, 0x02, 0x1002, "/telemetry", payload=b'{"t": 1}', token=b"\x03"),
        coap_msg(1, 0x01, 0x1003, "/nope", token=b"\x04"),
        coap_msg(1, 0x04, 0x1004, "/config", token=b"\x05"),
        coap_msg(0, 0x01, 0x1005, "/nope", token=b"\x06"),
        bytes.fromhex("ffffffff"),
    )
    assert silent == [], [x.hex() for x in silent]
    # The same request to the unicast address is answered 4.04: the silence is multicast's.
    unicast = probe(coap_msg(1, 0x01, 0x1006, "/nope", token=b"\x07"), group="127.0.0.1", wait=1.0)
    assert [x[1] for x in unicast] == [0x84], [x.hex() for x in unicast]
    assert s.alive()


LAN = "10.99.0.1"


@pytest.fixture
def netns_lan(netns):
    """The namespace plus a veth pair standing for a LAN (v0, 10.99.0.1/24), where multicast
    is routed as a host's default route would send it: so the kernel's own choice of
    interface for the group is the LAN, not loopback."""
    for cmd in (["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                ["ip", "addr", "add", f"{LAN}/24", "dev", "v0"],
                ["ip", "link", "set", "v0", "up"], ["ip", "link", "set", "v1", "up"],
                ["ip", "route", "replace", "224.0.0.0/4", "dev", "v0"]):
        made = subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot set up a veth LAN: {' '.join(cmd)}: {made.stderr.strip()}")
    return netns


@pytest.mark.parametrize("bind, other", [("127.0.0.1", LAN), (LAN, "127.0.0.1")])
def test_multicast_is_answered_only_on_the_interface_of_the_bind_address(start_server, netns_lan, bind, other):
    """Issue #19: with `--bind 127.0.0.1` the group is joined on loopback only, never on the
    LAN (where the kernel would put it by default); with a LAN address, on that LAN only."""
    from stratus_server import Server

    class NsServer(Server):
        def command(self, mqtt_port, http_port):
            cmd = super().command(mqtt_port, http_port)
            cmd[cmd.index("--bind") + 1] = bind
            return ["ip", "netns", "exec", netns_lan, *cmd]

    s = start_server("mcbind", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET},
                     config="[coap]\nmulticast = true\nmulticast_leisure_ms = 100\n",
                     anonymous=False, start=False)
    s.__class__ = NsServer
    s.start(wait=("mqtt", "http", "coap"))
    assert f"listening coap {bind}:" in s.log()
    port = s.listening()["coap"]

    def probe(iface, mid):
        msg = coap_msg(1, 0x01, mid, "/.well-known/core", token=b"\x09")
        out = subprocess.run(["ip", "netns", "exec", netns_lan, "python3", "-c", MC_PROBE, "224.0.1.187",
                              str(port), "1.2", msg.hex()],
                             capture_output=True, text=True, timeout=30, env={**clean_env(), "MC_IF": iface})
        assert out.returncode == 0, out.stderr
        return [bytes.fromhex(h) for h in json.loads(out.stdout)]

    answered = probe(bind, 0x2001)
    assert len(answered) == 1 and answered[0][1] == 0x45, [a.hex() for a in answered]
    assert probe(other, 0x2002) == [], f"answered a discovery that came in on {other}"
    assert s.alive()


def dtls_records(d: bytes):
    """(content type, epoch, payload) of each DTLS record in a datagram."""
    out, off = [], 0
    while off + 13 <= len(d):
        length = struct.unpack("!H", d[off + 11:off + 13])[0]
        out.append((d[off], d[off + 3:off + 5], d[off + 13:off + 13 + length]))
        off += 13 + length
    return out


def test_dtls_server_resends_a_lost_flight(device):
    """RFC 6347 §4.2.4 through a lossy proxy: the server's ServerHello flight is dropped the
    first time, and every retransmission of the client's handshake flights is dropped too, so
    only the server's own timer can complete the handshake (coap-client then gets 2.04)."""
    cloud, dev, secret, _ = device
    srv = cloud.srv
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", 0))
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    back.connect(("127.0.0.1", srv.coaps))
    stats = {"server_dropped": 0, "server_resent": 0, "client_dropped": 0}
    stop = threading.Event()

    def key(d):
        return tuple((t, e, p) for t, e, p in dtls_records(d))

    def run():
        client, seen_c, seen_s = None, set(), set()
        front.settimeout(0.05)
        back.settimeout(0.05)
        while not stop.is_set():
            try:
                d, client = front.recvfrom(65535)
                recs = dtls_records(d)
                k = key(d)
                if recs and recs[0][0] == 22 and recs[0][1] == b"\0\0" and k in seen_c:
                    stats["client_dropped"] += 1  # a client retransmission: lost
                else:
                    seen_c.add(k)
                    back.send(d)
            except socket.timeout:
                pass
            try:
                d = back.recv(65535)
                recs = dtls_records(d)
                k = key(d)
                flight = (recs and recs[0][0] == 22 and recs[0][1] == b"\0\0"
                          and recs[0][2][:1] in (b"\x02", b"\x0c", b"\x0e"))
                if flight and k not in seen_s:
                    seen_s.add(k)
                    stats["server_dropped"] += 1  # the first ServerHello flight: lost
                    continue
                if flight:
                    stats["server_resent"] += 1
                if client is not None:
                    front.sendto(d, client)
            except socket.timeout:
                pass

    proxy = threading.Thread(target=run, daemon=True)
    proxy.start()
    try:
        port = front.getsockname()[1]
        out = run_client(["-v", "6", "-u", dev, "-k", device_psk(dev, secret), "-m", "post",
                          "-t", "50", "-e", '{"lossy": 1}',
                          f"coaps://127.0.0.1:{port}/telemetry"], flavour="openssl", timeout=40)
    finally:
        stop.set()
        proxy.join(5)
        front.close()
        back.close()
    text = out.stdout + out.stderr
    assert "c:2.04" in text, (stats, text[-2000:])
    assert stats["server_dropped"] >= 1 and stats["server_resent"] >= 1, stats
    assert len(wait_points(cloud, dev, "lossy", 1)) == 1
    assert srv.alive()
