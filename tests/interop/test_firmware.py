"""Signed firmware end to end against `stratus serve --firmware-pubkey …`: the real CLI for
keygen/sign/verify/upload, the signature checked independently with Python `cryptography`,
curl and requests for multipart uploads and Range/ETag/304/416 downloads, rejections (a
flipped byte, an untrusted key, a downgrade, a truncated upload), the retained assignment
notice seen by mosquitto_sub, coap-client downloading 1 MiB through Block2, and status reports
over MQTT, CoAP and HTTP reflected in the campaign.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import time

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from stratus_server import clean_env, stratus_bin

MIB = 1024 * 1024


def cli(*args, check=True, env=None):
    res = subprocess.run([stratus_bin(), *map(str, args)], capture_output=True, text=True,
                         timeout=60, env=clean_env(env))
    if check:
        assert res.returncode == 0, f"stratus {args} exited {res.returncode}: {res.stdout}{res.stderr}"
    return res


def image_bytes(n: int, seed: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


@pytest.fixture
def keys(tmp_path):
    trusted = tmp_path / "trusted"
    other = tmp_path / "other"
    cli("firmware", "keygen", "--out", trusted)
    cli("firmware", "keygen", "--out", other)
    return trusted, other


@pytest.fixture
def srv(start_server, keys):
    trusted, _ = keys
    s = start_server("fw", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                     args=["--firmware-pubkey", str(trusted / "firmware.pub")], start=False)
    s.start(wait=("mqtt", "http", "coap"))
    s.coap = s.listening()["coap"]
    return s


def make_image(tmp_path, name, size, seed, key_dir, version, hardware=None):
    path = tmp_path / name
    path.write_bytes(image_bytes(size, seed))
    args = ["firmware", "sign", path, "--key", key_dir / "firmware.key", "--version", version]
    if hardware:
        args += ["--hardware", hardware]
    cli(*args)
    manifest = tmp_path / f"{name}.manifest.json"
    assert manifest.is_file()
    return path, manifest


def upload(cloud, image: bytes, manifest: bytes, manifest_first=True):
    files = [("manifest", ("manifest.json", manifest, "application/json")),
             ("image", ("image.bin", image, "application/octet-stream"))]
    if not manifest_first:
        files.reverse()
    return requests.post(cloud.url("/api/v1/firmware"), files=files, headers=cloud.admin, timeout=60)


def firmware_files(srv):
    d = srv.data_dir / "firmware"
    return sorted(p.name for p in d.iterdir() if p.is_file()), sorted(os.listdir(d / "tmp"))


# ---- CLI ---------------------------------------------------------------------------------

def test_cli_keygen_sign_verify_and_an_independent_signature_check(tmp_path, keys):
    trusted, other = keys
    assert stat.S_IMODE(os.stat(trusted / "firmware.key").st_mode) == 0o600
    assert (trusted / "firmware.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = cli("firmware", "keygen", "--out", trusted, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr

    img, man = make_image(tmp_path, "app.bin", 200_000, 1, trusted, "1.2.3", "board-a")
    m = json.loads(man.read_text())
    assert set(m) == {"version", "size", "sha256", "signature", "key_id", "hardware"}
    data = img.read_bytes()
    assert m["size"] == len(data) and m["sha256"] == hashlib.sha256(data).hexdigest()
    assert (m["version"], m["hardware"]) == ("1.2.3", "board-a")

    # An independent implementation (pyca/cryptography over OpenSSL) verifies the signature
    # over the documented canonical bytes, and the key id is sha256(raw key)[:16 hex].
    from cryptography.hazmat.primitives import serialization
    import base64
    pub = serialization.load_pem_public_key((trusted / "firmware.pub").read_bytes())
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert m["key_id"] == hashlib.sha256(raw).hexdigest()[:16]
    canonical = json.dumps({k: v for k, v in m.items() if k != "signature"}, sort_keys=True,
                           separators=(",", ":")).encode()
    pub.verify(base64.b64decode(m["signature"]), canonical)  # raises if invalid

    ok = cli("firmware", "verify", img, man, "--pubkey", trusted / "firmware.pub")
    assert "valid" in ok.stdout

    flipped = tmp_path / "flipped.bin"
    bad = bytearray(data)
    bad[1234] ^= 0x40
    flipped.write_bytes(bytes(bad))
    res = cli("firmware", "verify", flipped, man, "--pubkey", trusted / "firmware.pub", check=False)
    assert res.returncode == 1 and "hash mismatch" in res.stdout, res

    res = cli("firmware", "verify", img, man, "--pubkey", other / "firmware.pub", check=False)
    assert res.returncode == 1 and "unknown key" in res.stdout, res

    tampered = json.loads(man.read_text())
    tampered["version"] = "9.9.9"
    tman = tmp_path / "tampered.json"
    tman.write_text(json.dumps(tampered))
    res = cli("firmware", "verify", img, tman, "--pubkey", trusted / "firmware.pub", check=False)
    assert res.returncode == 1 and "bad signature" in res.stdout, res

    res = cli("firmware", "verify", img, man, "--pubkey", tmp_path / "missing.pub", check=False)
    assert res.returncode == 2
    helptext = cli("firmware", "--help").stdout
    for word in ("keygen", "sign", "verify", "upload"):
        assert word in helptext
    sign_help = cli("firmware", "sign", "--help").stdout
    for flag in ("--key", "--version", "--hardware", "--out"):
        assert flag in sign_help


# ---- upload and download -----------------------------------------------------------------

def test_upload_with_the_cli_and_download_with_range_etag_and_resume(tmp_path, keys, srv):
    trusted, _ = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "fw.bin", MIB + 123, 2, trusted, "1.0.0")
    data = img.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    out = cli("firmware", "upload", img, man, "--server", cloud.base,
              env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    assert out.stdout.strip() == sha
    assert firmware_files(srv) == ([sha], [])

    listed = requests.get(cloud.url("/api/v1/firmware"), headers=cloud.admin, timeout=10).json()
    assert [f["id"] for f in listed["firmware"]] == [sha]
    assert listed["firmware"][0]["version"] == "1.0.0" and listed["firmware"][0]["size"] == len(data)

    url = cloud.url(f"/api/v1/firmware/{sha}")
    full = requests.get(url, headers=cloud.admin, timeout=30)
    assert full.status_code == 200 and full.content == data
    assert full.headers["ETag"] == f'"{sha}"' and full.headers["Accept-Ranges"] == "bytes"
    assert full.headers["Content-Type"] == "application/octet-stream"

    meta = requests.get(url, headers={**cloud.admin, "Accept": "application/json"}, timeout=10)
    assert meta.json()["sha256"] == sha and meta.json()["hardware"] is None
    manifest = requests.get(url + "/manifest", headers=cloud.admin, timeout=10).json()
    assert manifest == json.loads(man.read_text())

    part = requests.get(url, headers={**cloud.admin, "Range": "bytes=1000-1999"}, timeout=10)
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    tail = requests.get(url, headers={**cloud.admin, "Range": "bytes=-100"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-100:]
    none = requests.get(url, headers={**cloud.admin, "Range": f"bytes={len(data)}-"}, timeout=10)
    assert none.status_code == 416 and none.headers["Content-Range"] == f"bytes */{len(data)}"
    same = requests.get(url, headers={**cloud.admin, "If-None-Match": f'"{sha}"'}, timeout=10)
    assert same.status_code == 304 and same.content == b""
    stale = requests.get(url, headers={**cloud.admin, "Range": "bytes=0-9", "If-Range": '"other"'},
                         timeout=30)
    assert stale.status_code == 200 and len(stale.content) == len(data)
    fresh = requests.get(url, headers={**cloud.admin, "Range": "bytes=0-9", "If-Range": f'"{sha}"'},
                         timeout=10)
    assert fresh.status_code == 206 and fresh.content == data[:10]

    # curl resumes a partial download (-C -) with a Range request: byte-exact result.
    partial = tmp_path / "download.bin"
    partial.write_bytes(data[:300_000])
    res = subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(partial), "-H",
                          f"Authorization: {cloud.admin['Authorization']}", url],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == sha

    # The same image again is a conflict (the CLI, with --admin-secret-file, exits 1 saying
    # so); a device without an assignment may not download.
    again = upload(cloud, data, man.read_bytes())
    assert again.status_code == 409, again.text
    secret_file = tmp_path / "admin-secret"
    secret_file.write_text(ADMIN_SECRET + "\n")
    res = cli("firmware", "upload", img, man, "--server", cloud.base, "--admin-secret-file",
              secret_file, check=False)
    assert res.returncode == 1 and "already exists" in res.stderr, res
    dev, secret = cloud.add_device()
    r = requests.get(url, headers=cloud.device_headers(dev, secret), timeout=10)
    assert r.status_code == 403


def test_curl_multipart_upload_image_part_first(tmp_path, keys, srv):
    trusted, _ = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "c.bin", 50_000, 3, trusted, "2.0.0", "board-c")
    res = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}",
                          "-H", f"Authorization: {cloud.admin['Authorization']}",
                          "-F", f"image=@{img};type=application/octet-stream",
                          "-F", f"manifest=@{man};type=application/json",
                          cloud.url("/api/v1/firmware")], capture_output=True, text=True, timeout=60)
    body, _, code = res.stdout.rpartition("\n")
    assert code == "201", res.stdout + res.stderr
    answer = json.loads(body)
    assert answer["id"] == hashlib.sha256(img.read_bytes()).hexdigest()
    assert (answer["version"], answer["hardware"], answer["size"]) == ("2.0.0", "board-c", 50_000)
    assert set(answer) >= {"id", "version", "size", "sha256", "hardware", "key_id", "created"}


def test_rejections_name_the_reason_and_leave_nothing_behind(tmp_path, keys, srv):
    trusted, other = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "base.bin", 100_000, 4, trusted, "1.5.0", "board-r")
    assert upload(cloud, img.read_bytes(), man.read_bytes()).status_code == 201
    stored = firmware_files(srv)

    def refused(image, manifest, reason, status=422):
        r = upload(cloud, image, manifest)
        assert r.status_code == status, r.text
        body = r.json()
        if status == 422:
            assert body["error"] == "invalid_firmware"
        assert reason in body["error_description"], body
        assert firmware_files(srv) == stored

    # a flipped byte
    newer, nman = make_image(tmp_path, "newer.bin", 100_000, 5, trusted, "1.6.0", "board-r")
    bad = bytearray(newer.read_bytes())
    bad[777] ^= 1
    refused(bytes(bad), nman.read_bytes(), "hash mismatch")
    # a truncated image in a complete body
    refused(newer.read_bytes()[:-10], nman.read_bytes(), "size mismatch")
    # signed by a key the server does not trust
    _, uman = make_image(tmp_path, "untrusted.bin", 100_000, 5, other, "1.6.0", "board-r")
    refused(newer.read_bytes(), uman.read_bytes(), "unknown key")
    # a manifest edited after signing
    edited = json.loads(nman.read_text())
    edited["hardware"] = "board-x"
    refused(newer.read_bytes(), json.dumps(edited).encode(), "bad signature")
    # a downgrade (and the same version) for the same hardware
    old, oman = make_image(tmp_path, "old.bin", 100_000, 6, trusted, "1.4.9", "board-r")
    refused(old.read_bytes(), oman.read_bytes(), "downgrade")
    same, sman = make_image(tmp_path, "same.bin", 100_000, 7, trusted, "1.5", "board-r")
    refused(same.read_bytes(), sman.read_bytes(), "downgrade")
    # missing parts and garbage
    r = requests.post(cloud.url("/api/v1/firmware"), files=[("image", ("i", b"x"))],
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 400 and "manifest" in r.json()["error_description"]
    refused(newer.read_bytes(), b"{not json", "malformed")
    r = requests.post(cloud.url("/api/v1/firmware"), data=b"raw", headers=cloud.admin, timeout=10)
    assert r.status_code == 415
    # no token, wrong scope
    assert requests.post(cloud.url("/api/v1/firmware"), timeout=10).status_code == 401
    dev, secret = cloud.add_device()
    r = requests.post(cloud.url("/api/v1/firmware"), files=[("image", ("i", b"x"))],
                      headers=cloud.device_headers(dev, secret), timeout=10)
    assert r.status_code == 403

    # A truncated upload: the connection closes mid-image. Nothing is stored, no temp file.
    boundary = "trunc0123456789"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n"
            ).encode() + nman.read_bytes() + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"x\"\r\n\r\n").encode()
    full_len = len(head) + 100_000 + len(f"\r\n--{boundary}--\r\n")
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:
        s.sendall((f"POST /api/v1/firmware HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: {cloud.admin['Authorization']}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                   f"Content-Length: {full_len}\r\n\r\n").encode() + head
                  + newer.read_bytes()[:50_000])
        time.sleep(0.3)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    if answer:
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    deadline = time.monotonic() + 5
    while firmware_files(srv) != stored and time.monotonic() < deadline:
        time.sleep(0.05)
    assert firmware_files(srv) == stored
    listed = requests.get(cloud.url("/api/v1/firmware"), headers=cloud.admin, timeout=10).json()
    assert [f["version"] for f in listed["firmware"]] == ["1.5.0"]


# ---- assignment, notices, CoAP Block2, status ----------------------------------------------

def coap_client():
    path = shutil.which("coap-client-notls")
    if path is None:
        pytest.skip("coap-client-notls (libcoap3-bin) is not installed")
    return path


def token_opts(token: str) -> list:
    out = []
    for i in range(0, len(token), 200):
        out += ["-O", f"15,token={token[i:i + 200]}"]
    return out


def test_assignment_reaches_mqtt_coap_and_http_and_status_reports_count(tmp_path, keys, srv):
    trusted, _ = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "dev.bin", MIB, 8, trusted, "3.1.0", "board-d")
    data = img.read_bytes()
    fid = upload(cloud, data, man.read_bytes()).json()["id"]
    dev, secret = cloud.add_device(attributes={"hardware": "board-d", "site": "lab"})
    foreign, _ = cloud.add_device(attributes={"hardware": "board-z"})
    current, _ = cloud.add_device(attributes={"hardware": "board-d", "firmware_version": "3.1.0"})

    # wrong hardware and downgrade are refused at assignment
    for d, reason in ((foreign, "wrong hardware"), (current, "downgrade")):
        r = requests.post(cloud.url(f"/api/v1/devices/{d}/firmware"), json={"firmware": fid},
                          headers=cloud.admin, timeout=10)
        assert r.status_code == 422 and reason in r.json()["error_description"], r.text

    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/firmware"), json={"firmware": fid},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 201, r.text
    notice = r.json()
    campaign = notice["campaign"]
    assert notice["firmware"] == fid and notice["manifest"] == json.loads(man.read_text())
    # the notice reads as the manifest too (its fields repeated at the top level)
    assert {k: notice[k] for k in notice["manifest"]} == notice["manifest"]
    assert notice["url"] == cloud.url(f"/api/v1/firmware/{fid}")
    assert notice["coap"] == f"/firmware/{fid}"

    # the retained notice, to the device's own mosquitto_sub
    sub = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port),
                          "-u", dev, "-P", secret, "-i", dev, "-t", f"devices/{dev}/firmware",
                          "-C", "1", "-W", "10", "-v"], capture_output=True, text=True, timeout=20)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    topic, _, payload = sub.stdout.strip().partition(" ")
    assert topic == f"devices/{dev}/firmware" and json.loads(payload) == notice

    # HTTP poll of the notice by the device
    headers = cloud.device_headers(dev, secret)
    assert requests.get(cloud.url(f"/api/v1/devices/{dev}/firmware"), headers=headers,
                        timeout=10).json() == notice

    # CoAP: the notice, then 1 MiB through Block2 with coap-client, byte-exact
    token = cloud.token(dev, secret)
    out = subprocess.run([coap_client(), *token_opts(token), "-m", "get",
                          f"coap://127.0.0.1:{srv.coap}/firmware"],
                         capture_output=True, text=True, timeout=20)
    assert json.loads(out.stdout.strip()) == notice, out.stdout + out.stderr
    status = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port),
                             "-u", dev, "-P", secret, "-i", dev, "-q", "1",
                             "-t", f"devices/{dev}/firmware/status", "-m", "downloading"],
                            capture_output=True, text=True, timeout=20)
    assert status.returncode == 0, status.stderr
    target = tmp_path / "coap-download.bin"
    t0 = time.monotonic()
    out = subprocess.run([coap_client(), *token_opts(token), "-m", "get", "-b", "1024",
                          "-o", str(target), f"coap://127.0.0.1:{srv.coap}/firmware/{fid}"],
                         capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    got = target.read_bytes()
    assert len(got) == MIB and hashlib.sha256(got).hexdigest() == fid, (len(got), took)
    print(f"coap-client Block2 download of 1 MiB: {took:.2f} s")

    # verified over CoAP, installed over HTTP
    out = subprocess.run([coap_client(), *token_opts(token), "-m", "post", "-e",
                          json.dumps({"firmware": fid, "status": "verified"}),
                          f"coap://127.0.0.1:{srv.coap}/firmware/status"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/firmware"), headers=headers,
                      json={"firmware": fid, "status": "installed"}, timeout=10)
    assert r.status_code == 200 and r.json()["assignment"]["state"] == "installed", r.text

    c = requests.get(cloud.url(f"/api/v1/campaigns/{campaign}"), headers=cloud.admin, timeout=10).json()
    assert c["counts"]["installed"] == 1 and c["total"] == 1
    assert [h["state"] for h in c["devices"][0]["history"]] == [
        "assigned", "downloading", "verified", "installed"]
    shown = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10).json()
    assert shown["firmware"]["state"] == "installed"
    assert shown["firmware"]["installed_version"] == "3.1.0"
    # now installed: assigning it again is a downgrade
    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/firmware"), json={"firmware": fid},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 422 and "downgrade" in r.text
    # a bad status word is refused over HTTP
    r = requests.post(cloud.url(f"/api/v1/devices/{dev}/firmware"), headers=headers,
                      json={"status": "exploded"}, timeout=10)
    assert r.status_code == 400


def test_campaign_by_selector_counts_states(tmp_path, keys, srv):
    trusted, _ = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "sel.bin", 10_000, 9, trusted, "4.0.0", "board-s")
    fid = upload(cloud, img.read_bytes(), man.read_bytes()).json()["id"]
    a, asec = cloud.add_device(attributes={"hardware": "board-s", "ring": "canary"})
    b, bsec = cloud.add_device(attributes={"hardware": "board-s", "ring": "canary"})
    z, _ = cloud.add_device(attributes={"hardware": "board-q", "ring": "canary"})
    cloud.add_device(attributes={"hardware": "board-s", "ring": "main"})
    r = requests.post(cloud.url("/api/v1/campaigns"), headers=cloud.admin, timeout=10,
                      json={"firmware": fid, "selector": {"attributes": {"ring": "canary"}}})
    assert r.status_code == 201, r.text
    c = r.json()
    assert sorted(d["device"] for d in c["devices"]) == sorted([a, b])
    assert [s["device"] for s in c["skipped"]] == [z] and "wrong hardware" in c["skipped"][0]["reason"]
    assert c["counts"]["assigned"] == 2
    for dev, sec, word in ((a, asec, "installed"), (b, bsec, "failed")):
        body = word if word == "installed" else json.dumps(
            {"firmware": fid, "status": "failed", "reason": "flash write error"})
        res = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port),
                              "-u", dev, "-P", sec, "-i", dev, "-q", "1",
                              "-t", f"devices/{dev}/firmware/status", "-m", body],
                             capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 5
    while True:
        c = requests.get(cloud.url(f"/api/v1/campaigns/{c['id']}"), headers=cloud.admin,
                         timeout=10).json()
        if c["counts"]["installed"] == 1 and c["counts"]["failed"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert c["counts"] == {"assigned": 0, "downloading": 0, "verified": 0, "installed": 1, "failed": 1}
    failed = [d for d in c["devices"] if d["device"] == b][0]
    assert failed["reason"] == "flash write error"
    listed = requests.get(cloud.url("/api/v1/campaigns"), headers=cloud.admin, timeout=10).json()
    assert c["id"] in [x["id"] for x in listed["campaigns"]]


def test_aiocoap_observes_firmware_notices(tmp_path, keys, srv):
    """A device observing CoAP `/firmware` (aiocoap) gets `null` first, then the notice of a
    new assignment as a notification."""
    aiocoap = pytest.importorskip("aiocoap")
    import asyncio

    trusted, _ = keys
    cloud = Cloud(srv)
    img, man = make_image(tmp_path, "obs.bin", 5_000, 10, trusted, "5.0.0")
    fid = upload(cloud, img.read_bytes(), man.read_bytes()).json()["id"]
    dev, secret = cloud.add_device()
    token = cloud.token(dev, secret)
    query = "&".join(f"token={token[i:i + 200]}" for i in range(0, len(token), 200))

    async def go():
        ctx = await aiocoap.Context.create_client_context()
        try:
            req = aiocoap.Message(code=aiocoap.GET,
                                  uri=f"coap://127.0.0.1:{srv.coap}/firmware?{query}", observe=0)
            pr = ctx.request(req)
            first = await asyncio.wait_for(pr.response, 10)
            assert first.code == aiocoap.CONTENT and first.opt.observe is not None
            assert json.loads(first.payload) is None
            notes = pr.observation.__aiter__()
            loop = asyncio.get_running_loop()
            r = await loop.run_in_executor(None, lambda: requests.post(
                cloud.url(f"/api/v1/devices/{dev}/firmware"), json={"firmware": fid},
                headers=cloud.admin, timeout=10))
            assert r.status_code == 201, r.text
            n = await asyncio.wait_for(notes.__anext__(), 10)
            notice = json.loads(n.payload)
            assert notice == r.json() and notice["firmware"] == fid
        finally:
            await ctx.shutdown()

    asyncio.run(go())


def test_size_limit_extra_parts_and_openapi(tmp_path, keys, start_server):
    trusted, _ = keys
    s = start_server("fwsmall", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False,
                     args=["--firmware-pubkey", str(trusted / "firmware.pub")],
                     config="[firmware]\nmax_image_bytes = 4096\n", start=False)
    s.start(wait=("mqtt", "http"))
    cloud = Cloud(s)
    img, man = make_image(tmp_path, "big.bin", 10_000, 11, trusted, "1.0.0")
    r = upload(cloud, img.read_bytes(), man.read_bytes())
    assert r.status_code == 413 and "max_image_bytes" in r.json()["error_description"], r.text
    assert firmware_files(s) == ([], [])
    small, sman = make_image(tmp_path, "small.bin", 4096, 12, trusted, "1.0.0")
    files = [("manifest", ("m", sman.read_bytes())), ("image", ("i", small.read_bytes())),
             ("extra", ("e", b"x" * 100))]
    r = requests.post(cloud.url("/api/v1/firmware"), files=files, headers=cloud.admin, timeout=10)
    assert r.status_code == 400 and "extra" in r.json()["error_description"], r.text
    assert firmware_files(s) == ([], [])
    assert upload(cloud, small.read_bytes(), sman.read_bytes()).status_code == 201
    # an unknown trusted-key file is a configuration error naming the key (exit 2)
    res = subprocess.run([stratus_bin(), "serve", "--data-dir", str(tmp_path / "x"),
                          "--firmware-pubkey", str(tmp_path / "nope.pub")],
                         capture_output=True, text=True, timeout=20, env=clean_env())
    assert res.returncode == 2 and "firmware.pubkeys" in res.stderr, res.stderr
    # the API description lists the firmware routes
    paths = requests.get(cloud.url("/api/openapi.json"), timeout=10).json()["paths"]
    for p in ("/api/v1/firmware", "/api/v1/firmware/{id}", "/api/v1/firmware/{id}/manifest",
              "/api/v1/devices/{id}/firmware", "/api/v1/campaigns", "/api/v1/campaigns/{id}"):
        assert p in paths, p


def test_mqtt5_bad_reports_and_forged_notices_are_refused_not_fatal(srv):
    """A device's malformed or unknown-firmware status, and a notice it tries to publish
    itself, get PUBACK 0x99 (a bad report) or 0x87 (the notice topic is not the device's to
    publish) on MQTT 5; the connection stays up and nothing is retained."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties  # noqa: F401  (paho 2 API present)

    cloud = Cloud(srv)
    dev, secret = cloud.add_device()
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

        status = f"devices/{dev}/firmware/status"
        assert ack(status, json.dumps({"firmware": "b" * 64, "status": "installed"})) == 0x99
        assert ack(status, "installed") == 0x99          # no assignment to report about
        assert ack(status, "exploded") == 0x99
        # the notice topic is the cloud's: publishing to it is not authorised (0x87)
        assert ack(f"devices/{dev}/firmware", json.dumps({"firmware": "x"}), retain=True) == 0x87
        assert c.is_connected()
    finally:
        c.loop_stop()
        c.disconnect()
    r = requests.get(cloud.url(f"/api/v1/devices/{dev}/firmware"), headers=cloud.admin, timeout=10)
    assert r.status_code == 404
    shown = requests.get(cloud.url(f"/api/v1/devices/{dev}"), headers=cloud.admin, timeout=10).json()
    assert shown["firmware"] is None
    sub = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port),
                          "-u", dev, "-P", secret, "-t", f"devices/{dev}/firmware",
                          "-C", "1", "-W", "2"], capture_output=True, text=True, timeout=20)
    assert sub.stdout == "", "the forged notice was not retained"
