"""Device registry, device configuration and the audit log, black-box: the HTTP API with
`requests` and `curl`, the `stratus device` and `stratus audit verify` commands against a
running server and against a stopped server's data dir, and a tampered audit row.

Shapes under test (see crates/stratus-server/src/api/devices.rs):
device = {id, attributes, created_at, last_seen, desired: {version, config, updated_at},
reported: {config, updated_at} | null, firmware}; times are RFC 3339 strings.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time

import pytest
import requests

from stratus_server import clean_env, stratus_bin

ADMIN_SECRET = "s3cret"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DEVICE_KEYS = {
    "id",
    "attributes",
    "created_at",
    "last_seen",
    "desired",
    "reported",
    "firmware",
    # connectivity and alarms (rules engine)
    "online",
    "last_seen_ms",
    "open_alarms",
    # the device's own replay policy (PATCH {"require_freshness": …})
    "require_freshness",
}


class Api:
    """A thin client of one server's HTTP API."""

    def __init__(self, srv):
        self.srv = srv
        self.base = f"http://127.0.0.1:{srv.http_port}"
        self.admin = self.token("admin", ADMIN_SECRET)

    def token(self, client_id, secret, expect=200):
        r = requests.post(f"{self.base}/oauth/token", data={"grant_type": "client_credentials"},
                          auth=(client_id, secret), timeout=30)
        assert r.status_code == expect, r.text
        return r.json().get("access_token")

    def call(self, method, path, token=None, **kw):
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(method, f"{self.base}{path}", headers=headers, timeout=30, **kw)

    def add(self, device_id, attributes=None):
        body = {"id": device_id}
        if attributes is not None:
            body["attributes"] = attributes
        r = self.call("POST", "/api/v1/devices", self.admin, json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def client(self, client_id, scopes):
        """An application client with `scopes`; returns its token."""
        r = self.call("POST", "/api/v1/clients", self.admin,
                      json={"client_id": client_id, "scopes": scopes})
        assert r.status_code == 201, r.text
        return self.token(client_id, r.json()["client_secret"])

    def audit(self):
        r = self.call("GET", "/api/v1/audit?limit=1000", self.admin)
        assert r.status_code == 200, r.text
        return r.json()["entries"]


def assert_error(r, status, code):
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body = r.json()
    assert body["error"] == code, body
    assert body["error_description"], body
    return body


def curl(*args):
    """curl -s -i …: (status, headers lower-cased, body text)."""
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "20", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split()[1])
    headers = {}
    for line in head.split("\n")[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def cli(*args, env=None, cwd=None, timeout=60):
    return subprocess.run([stratus_bin(), *args], capture_output=True, text=True,
                          env=clean_env(env), cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def api(start_server):
    srv = start_server("devices", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    return Api(srv)


# ---- registry -------------------------------------------------------------------------------

def test_register_shows_the_secret_once_and_never_the_hash(api):
    r = api.call("POST", "/api/v1/devices", api.admin,
                 json={"id": "pump-7", "attributes": {"site": "north", "floor": 2}})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/api/v1/devices/pump-7"
    created = r.json()
    assert set(created) == DEVICE_KEYS | {"secret"}
    assert created["id"] == "pump-7"
    assert created["attributes"] == {"site": "north", "floor": 2}
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", created["secret"])
    assert RFC3339.match(created["created_at"])
    assert created["last_seen"] is None and created["reported"] is None
    assert created["desired"]["version"] == 0 and created["desired"]["config"] == {}
    assert RFC3339.match(created["desired"]["updated_at"])

    shown = api.call("GET", "/api/v1/devices/pump-7", api.admin)
    assert shown.status_code == 200
    assert set(shown.json()) == DEVICE_KEYS
    listed = api.call("GET", "/api/v1/devices", api.admin)
    for text in (shown.text, listed.text):
        assert created["secret"] not in text
        assert "argon2" not in text and "secret" not in text
    # the secret works as OAuth client credentials; the token is a device token
    token = api.token("pump-7", created["secret"])
    r = api.call("GET", "/api/v1/devices/pump-7/config", token)
    assert r.status_code == 200, r.text


def test_bad_ids_and_bodies_are_400_naming_the_problem(api):
    for bad in ["bad/id", "x" * 65, "", "sp ace", "..", "é"]:
        body = assert_error(api.call("POST", "/api/v1/devices", api.admin, json={"id": bad}),
                            400, "invalid_request")
        if bad in ("bad/id", "sp ace", ".."):
            assert f'"{bad}"' in body["error_description"], body
    assert_error(api.call("POST", "/api/v1/devices", api.admin,
                          json={"id": "ok", "attributes": [1]}), 400, "invalid_request")
    assert_error(api.call("POST", "/api/v1/devices", api.admin,
                          json={"id": "ok", "secret": "mine"}), 400, "invalid_request")
    assert_error(api.call("POST", "/api/v1/devices", api.admin, json={}), 400, "invalid_request")
    assert_error(api.call("POST", "/api/v1/devices", api.admin, data="{not json"),
                 400, "invalid_request")
    assert_error(api.call("GET", "/api/v1/devices/bad%20id", api.admin), 400, "invalid_request")
    # nothing was created by the failures
    assert api.call("GET", "/api/v1/devices", api.admin).json() == {"devices": [], "next": None}


def test_duplicate_ids_conflict_with_devices_and_clients(api):
    api.add("dup")
    assert_error(api.call("POST", "/api/v1/devices", api.admin, json={"id": "dup"}),
                 409, "conflict")
    assert_error(api.call("POST", "/api/v1/devices", api.admin, json={"id": "admin"}),
                 409, "conflict")


def test_missing_or_bad_tokens_are_401_with_a_bearer_challenge(api):
    url = f"{api.base}/api/v1/devices"
    status, headers, body = curl(url)
    assert status == 401
    assert 'Bearer' in headers["www-authenticate"]
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert json.loads(body)["error"] == "invalid_token"
    status, headers, _ = curl("-H", "Authorization: Bearer not.a.token", url)
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    for method, path in [("POST", "/api/v1/devices"), ("GET", "/api/v1/devices/x"),
                         ("PATCH", "/api/v1/devices/x"), ("DELETE", "/api/v1/devices/x"),
                         ("POST", "/api/v1/devices/x/secret"), ("GET", "/api/v1/devices/x/config"),
                         ("PUT", "/api/v1/devices/x/config"),
                         ("PUT", "/api/v1/devices/x/config/reported"),
                         ("GET", "/api/v1/audit"), ("GET", "/api/v1/audit/verify")]:
        r = api.call(method, path, json={})
        assert_error(r, 401, "invalid_token")
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_scopes_are_enforced_with_403_insufficient_scope(api):
    d = api.add("d1")
    device = api.token("d1", d["secret"])
    reader = api.client("reader", ["telemetry:read"])
    writer = api.client("writer", ["devices:write"])
    for token in (device, reader):
        for method, path, body in [("GET", "/api/v1/devices", None),
                                   ("POST", "/api/v1/devices", {"id": "z"}),
                                   ("GET", "/api/v1/devices/d1", None),
                                   ("PATCH", "/api/v1/devices/d1", {"attributes": {}}),
                                   ("DELETE", "/api/v1/devices/d1", None),
                                   ("POST", "/api/v1/devices/d1/secret", None),
                                   ("PUT", "/api/v1/devices/d1/config", {"a": 1}),
                                   ("GET", "/api/v1/audit", None),
                                   ("GET", "/api/v1/audit/verify", None)]:
            r = api.call(method, path, token, json=body)
            assert_error(r, 403, "insufficient_scope")
            assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # devices:write manages the registry, but the audit log is the admin's
    assert api.call("GET", "/api/v1/devices/d1", writer).status_code == 200
    assert api.call("PUT", "/api/v1/devices/d1/config", writer, json={"a": 1}).status_code == 200
    assert_error(api.call("GET", "/api/v1/audit", writer), 403, "insufficient_scope")
    # telemetry:read may read a desired config
    r = api.call("GET", "/api/v1/devices/d1/config", reader)
    assert r.status_code == 200 and r.json()["config"] == {"a": 1}
    # reported config is the device's own business
    for token in (reader, writer, api.admin):
        assert_error(api.call("PUT", "/api/v1/devices/d1/config/reported", token, json={}),
                     403, "insufficient_scope")
    assert "d1" in [e["target"].split("/")[-1] for e in api.audit()]


def test_unknown_devices_are_404(api):
    for method, path, body in [("GET", "/api/v1/devices/ghost", None),
                               ("PATCH", "/api/v1/devices/ghost", {"attributes": {"a": 1}}),
                               ("DELETE", "/api/v1/devices/ghost", None),
                               ("POST", "/api/v1/devices/ghost/secret", None),
                               ("GET", "/api/v1/devices/ghost/config", None),
                               ("PUT", "/api/v1/devices/ghost/config", {"a": 1})]:
        assert_error(api.call(method, path, api.admin, json=body), 404, "not_found")
    assert not [e for e in api.audit() if e["target"] == "devices/ghost"]


def test_listing_pages_by_id(api):
    for i in range(5):
        api.add(f"dev-{i}")
    seen, after, pages = [], None, 0
    while True:
        q = "?limit=2" + (f"&after={after}" if after else "")
        page = api.call("GET", f"/api/v1/devices{q}", api.admin).json()
        seen += [d["id"] for d in page["devices"]]
        assert all(set(d) == DEVICE_KEYS for d in page["devices"])
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == [f"dev-{i}" for i in range(5)] and pages == 3
    full = api.call("GET", "/api/v1/devices?limit=5", api.admin).json()
    assert len(full["devices"]) == 5 and full["next"] is None
    assert len(api.call("GET", "/api/v1/devices", api.admin).json()["devices"]) == 5
    assert len(api.call("GET", "/api/v1/devices?limit=100000", api.admin).json()["devices"]) == 5
    for bad in ["limit=0", "limit=abc", "limit=-1"]:
        assert_error(api.call("GET", f"/api/v1/devices?{bad}", api.admin), 400, "invalid_request")


def test_patch_is_a_json_merge_patch_of_the_attributes(api):
    api.add("p1", {"site": "north", "loc": {"x": 1, "y": 2}, "gone": True})
    url = f"{api.base}/api/v1/devices/p1"
    status, _, body = curl("-X", "PATCH", "-H", f"Authorization: Bearer {api.admin}",
                           "-H", "Content-Type: application/merge-patch+json",
                           "--data", '{"attributes": {"site": "south", "gone": null, '
                                     '"loc": {"y": null, "z": 3}}}', url)
    assert status == 200, body
    assert json.loads(body)["attributes"] == {"site": "south", "loc": {"x": 1, "z": 3}}
    r = api.call("PATCH", "/api/v1/devices/p1", api.admin, json={"attributes": {"n": 1}})
    assert r.status_code == 200 and r.json()["attributes"]["n"] == 1
    assert api.call("GET", "/api/v1/devices/p1", api.admin).json()["attributes"] == \
        {"site": "south", "loc": {"x": 1, "z": 3}, "n": 1}
    for bad in [{"id": "other"}, {"attributes": "x"}, {"created_at": 1}, [1]]:
        assert_error(api.call("PATCH", "/api/v1/devices/p1", api.admin, json=bad),
                     400, "invalid_request")
    r = api.call("PATCH", "/api/v1/devices/p1", api.admin, data='{"attributes": {}}',
                 headers={"Content-Type": "application/json-patch+json"})
    assert_error(r, 415, "unsupported_media_type")
    r = api.call("PATCH", "/api/v1/devices/p1", api.admin, json={"attributes": None})
    assert r.status_code == 200 and r.json()["attributes"] == {}
    updates = [e for e in api.audit() if e["action"] == "device.update"]
    assert len(updates) == 3 and updates[0]["target"] == "devices/p1"
    assert updates[0]["detail"]["attributes"]["gone"] is None


def test_delete_removes_the_device_and_its_credentials(api):
    d = api.add("del-1")
    token = api.token("del-1", d["secret"])
    r = api.call("DELETE", "/api/v1/devices/del-1", api.admin)
    assert r.status_code == 204 and r.content == b""
    assert_error(api.call("GET", "/api/v1/devices/del-1", api.admin), 404, "not_found")
    assert_error(api.call("GET", "/api/v1/devices/del-1/config", token), 401, "invalid_token")
    api.token("del-1", d["secret"], expect=401)
    assert_error(api.call("DELETE", "/api/v1/devices/del-1", api.admin), 404, "not_found")
    again = api.add("del-1")  # the id is free again, with a fresh config
    assert again["desired"]["version"] == 0


def test_secret_rotation_voids_the_old_secret_and_its_tokens(api):
    d = api.add("rot-1")
    old_token = api.token("rot-1", d["secret"])
    time.sleep(1.1)  # token times have one-second resolution
    r = api.call("POST", "/api/v1/devices/rot-1/secret", api.admin)
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert set(rotated) == {"id", "secret"} and rotated["id"] == "rot-1"
    assert rotated["secret"] != d["secret"]
    api.token("rot-1", d["secret"], expect=401)
    assert_error(api.call("GET", "/api/v1/devices/rot-1/config", old_token), 401, "invalid_token")
    new_token = api.token("rot-1", rotated["secret"])
    assert api.call("GET", "/api/v1/devices/rot-1/config", new_token).status_code == 200
    entries = [e for e in api.audit() if e["action"] == "device.secret.rotate"]
    assert len(entries) == 1 and entries[0]["actor"] == "admin"
    assert rotated["secret"] not in json.dumps(api.audit())


# ---- configuration --------------------------------------------------------------------------

def test_a_device_reads_its_own_config_only(api):
    a = api.add("cfg-a")
    api.add("cfg-b")
    token = api.token("cfg-a", a["secret"])
    r = api.call("GET", "/api/v1/devices/cfg-a/config", token)
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == '"0"'
    doc = r.json()
    assert set(doc) == {"version", "config", "updated_at"}
    assert doc["version"] == 0 and doc["config"] == {}
    for other in ("cfg-b", "no-such-device"):
        assert_error(api.call("GET", f"/api/v1/devices/{other}/config", token),
                     403, "insufficient_scope")
    assert_error(api.call("PUT", "/api/v1/devices/cfg-a/config", token, json={"a": 1}),
                 403, "insufficient_scope")
    r = api.call("GET", "/api/v1/devices/cfg-a/config", token, headers={"If-None-Match": '"0"'})
    assert r.status_code == 304 and r.headers["ETag"] == '"0"'


def test_desired_config_is_versioned_with_if_match(api):
    api.add("cfg-1")
    url = "/api/v1/devices/cfg-1/config"
    r = api.call("PUT", url, api.admin, json={"interval": 5}, headers={"If-Match": '"0"'})
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == '"1"'
    assert r.json()["version"] == 1 and r.json()["config"] == {"interval": 5}
    # a stale If-Match loses: 412 with the current version
    r = api.call("PUT", url, api.admin, json={"interval": 9}, headers={"If-Match": '"0"'})
    assert_error(r, 412, "precondition_failed")
    assert r.headers["ETag"] == '"1"'
    assert api.call("GET", url, api.admin).json()["config"] == {"interval": 5}
    # a bare number, a list and * are accepted; a weak tag never matches If-Match
    assert api.call("PUT", url, api.admin, json={"i": 2}, headers={"If-Match": "1"}).status_code == 200
    r = api.call("PUT", url, api.admin, json={"i": 3}, headers={"If-Match": '"7", "2"'})
    assert r.status_code == 200 and r.json()["version"] == 3
    assert api.call("PUT", url, api.admin, json={"i": 4}, headers={"If-Match": "*"}).status_code == 200
    assert_error(api.call("PUT", url, api.admin, json={"i": 5}, headers={"If-Match": 'W/"4"'}),
                 412, "precondition_failed")
    assert_error(api.call("PUT", url, api.admin, json={"i": 5}, headers={"If-Match": "four"}),
                 400, "invalid_request")
    # without If-Match it always applies
    r = api.call("PUT", url, api.admin, json={"i": 5})
    assert r.status_code == 200 and r.json()["version"] == 5
    for bad in ([1, 2], "text", None):
        assert_error(api.call("PUT", url, api.admin, json=bad), 400, "invalid_request")
    assert_error(api.call("PUT", url, api.admin, data="{"), 400, "invalid_request")
    device = api.call("GET", "/api/v1/devices/cfg-1", api.admin).json()
    assert device["desired"]["version"] == 5 and device["desired"]["config"] == {"i": 5}
    puts = [e for e in api.audit() if e["action"] == "config.put"]
    assert [e["detail"]["version"] for e in puts] == [1, 2, 3, 4, 5]
    assert puts[0]["detail"]["config"] == {"interval": 5} and puts[0]["target"] == "devices/cfg-1"


def test_curl_put_config_with_if_match(api):
    api.add("cfg-c")
    url = f"{api.base}/api/v1/devices/cfg-c/config"
    auth = f"Authorization: Bearer {api.admin}"
    status, headers, body = curl("-X", "PUT", "-H", auth, "-H", "Content-Type: application/json",
                                 "-H", 'If-Match: "0"', "--data", '{"mode": "eco"}', url)
    assert status == 200, body
    assert headers["etag"] == '"1"'
    status, headers, body = curl("-X", "PUT", "-H", auth, "-H", 'If-Match: "0"',
                                 "--data", '{"mode": "max"}', url)
    assert status == 412 and json.loads(body)["error"] == "precondition_failed"


def test_reported_config_comes_from_the_device(api):
    a = api.add("rep-a")
    b = api.add("rep-b")
    token = api.token("rep-a", a["secret"])
    r = api.call("PUT", "/api/v1/devices/rep-a/config/reported", token,
                 json={"interval": 5, "version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["config"] == {"interval": 5, "version": 1}
    assert RFC3339.match(r.json()["updated_at"])
    device = api.call("GET", "/api/v1/devices/rep-a", api.admin).json()
    assert device["reported"]["config"] == {"interval": 5, "version": 1}
    assert RFC3339.match(device["last_seen"])
    assert_error(api.call("PUT", "/api/v1/devices/rep-b/config/reported", token, json={}),
                 403, "insufficient_scope")
    assert_error(api.call("PUT", "/api/v1/devices/rep-a/config/reported", token, json=[1]),
                 400, "invalid_request")
    assert api.call("GET", "/api/v1/devices/rep-b", api.admin).json()["reported"] is None
    assert b["secret"] not in json.dumps(api.audit())


# ---- audit ----------------------------------------------------------------------------------

def test_admin_actions_are_audited_and_verifiable(api):
    d = api.add("aud-1", {"k": "v"})
    api.call("PATCH", "/api/v1/devices/aud-1", api.admin, json={"attributes": {"k": "w"}})
    api.call("PUT", "/api/v1/devices/aud-1/config", api.admin, json={"x": 1})
    rotated = api.call("POST", "/api/v1/devices/aud-1/secret", api.admin).json()
    api.call("DELETE", "/api/v1/devices/aud-1", api.admin)
    entries = api.audit()
    ours = [e for e in entries if e["target"] == "devices/aud-1"]
    assert [e["action"] for e in ours] == ["device.create", "device.update", "config.put",
                                          "device.secret.rotate", "device.delete"]
    assert all(e["actor"] == "admin" and RFC3339.match(e["at"]) for e in ours)
    assert ours[0]["detail"] == {"attributes": {"k": "v"}}
    text = json.dumps(entries)
    assert d["secret"] not in text and rotated["secret"] not in text and "argon2" not in text
    seqs = [e["seq"] for e in entries]
    assert seqs == list(range(1, len(entries) + 1))
    for prev, e in zip(entries, entries[1:]):
        assert e["prev_hash"] == prev["hash"]
    page = api.call("GET", "/api/v1/audit?from=2&limit=2", api.admin).json()
    assert [e["seq"] for e in page["entries"]] == [2, 3] and page["next"] == 4
    r = api.call("GET", "/api/v1/audit/verify", api.admin)
    assert r.status_code == 200
    assert r.json()["intact"] is True and r.json()["entries"] == len(entries)


def test_openapi_describes_the_registry(api):
    doc = requests.get(f"{api.base}/api/openapi.json", timeout=10).json()
    paths = doc["paths"]
    assert {"post", "get"} <= set(paths["/api/v1/devices"])
    assert {"get", "patch", "delete"} <= set(paths["/api/v1/devices/{id}"])
    assert "post" in paths["/api/v1/devices/{id}/secret"]
    assert {"get", "put"} <= set(paths["/api/v1/devices/{id}/config"])
    assert "put" in paths["/api/v1/devices/{id}/config/reported"]
    assert "get" in paths["/api/v1/audit"] and "get" in paths["/api/v1/audit/verify"]
    assert "DeviceView" in doc["components"]["schemas"]


# ---- the command line -----------------------------------------------------------------------

def test_cli_device_commands_against_a_running_server(api):
    server = ["--server", api.base]
    env = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET}
    out = cli("device", "add", "cli-1", "--attr", "site=north", "--attr", "floor=2", *server, env=env)
    assert out.returncode == 0, out.stderr
    secret = re.search(r"secret: (\S+)", out.stdout).group(1)
    api.token("cli-1", secret)  # the printed secret works
    out = cli("device", "add", "cli-2", "--json", *server, env=env)
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["id"] == "cli-2" and len(created["secret"]) == 43

    out = cli("device", "list", *server, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "LAST", "SEEN", "CONFIG", "ATTRIBUTES"]
    assert lines[1].startswith("cli-1 ") and lines[2].startswith("cli-2 ")
    assert lines[-1] == "2 devices"
    listed = json.loads(cli("device", "list", "--json", *server, env=env).stdout)
    assert [d["id"] for d in listed] == ["cli-1", "cli-2"]

    out = cli("device", "show", "cli-1", "--json", *server, env=env)
    shown = json.loads(out.stdout)
    assert shown["attributes"] == {"site": "north", "floor": 2} and "secret" not in shown
    out = cli("device", "show", "cli-1", *server, env=env)
    assert "id:         cli-1" in out.stdout and '"site":"north"' in out.stdout

    out = cli("device", "rotate-secret", "cli-1", "--json", *server, env=env)
    assert out.returncode == 0, out.stderr
    new_secret = json.loads(out.stdout)["secret"]
    api.token("cli-1", secret, expect=401)
    api.token("cli-1", new_secret)

    out = cli("device", "rm", "cli-1", *server, env=env)
    assert out.returncode == 0 and "deleted device cli-1" in out.stdout
    out = cli("device", "show", "cli-1", *server, env=env)
    assert out.returncode == 1 and "not found" in out.stderr and "404" in out.stderr
    out = cli("device", "add", "cli-2", *server, env=env)
    assert out.returncode == 1 and "already exists" in out.stderr

    actions = [e["action"] for e in api.audit() if e["target"].startswith("devices/cli-")]
    assert actions == ["device.create", "device.create", "device.secret.rotate", "device.delete"]


def test_cli_reads_the_admin_secret_file_and_reports_usage_errors(start_server, tmp_path):
    srv = start_server("gen")  # no STRATUS_ADMIN_SECRET: the secret is generated and saved
    secret_file = srv.data_dir / "admin-secret"
    assert secret_file.is_file()
    base = f"http://127.0.0.1:{srv.http_port}"
    out = cli("device", "add", "f-1", "--server", base, "--admin-secret-file", str(secret_file))
    assert out.returncode == 0, out.stderr
    # STRATUS_SERVER__DATA_DIR (as in the container image) says where the secret file is
    out = cli("device", "add", "f-2", "--server", base, cwd=tmp_path,
              env={"STRATUS_SERVER__DATA_DIR": str(srv.data_dir)})
    assert out.returncode == 0, out.stderr
    out = cli("device", "list", "--server", base, "--admin-secret-file", str(tmp_path / "none"))
    assert out.returncode == 2 and "STRATUS_ADMIN_SECRET" in out.stderr
    out = cli("device", "add", "bad/id", "--server", base, "--admin-secret-file", str(secret_file))
    assert out.returncode == 2 and "bad/id" in out.stderr
    out = cli("device", "add", "x", "--attr", "novalue", "--server", base,
              "--admin-secret-file", str(secret_file))
    assert out.returncode == 2 and "KEY=VALUE" in out.stderr
    out = cli("device", "frobnicate")
    assert out.returncode == 2
    out = cli("device", "list", "--server", base, env={"STRATUS_ADMIN_SECRET": "wrong"})
    assert out.returncode == 1 and "invalid_client" in out.stderr
    srv.stop()
    out = cli("device", "list", "--server", base, env={"STRATUS_ADMIN_SECRET": "x"})
    assert out.returncode == 1 and "cannot reach the server" in out.stderr
    for args in (["device", "--help"], ["device", "add", "--help"], ["audit", "verify", "--help"]):
        out = cli(*args)
        assert out.returncode == 0 and "Usage:" in out.stdout


def test_cli_works_on_a_stopped_servers_data_dir(start_server, tmp_path):
    home = tmp_path / "home"  # holds ./stratus-data, for the fallback without --data-dir
    srv = start_server("offline", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET},
                       data_dir=home / "stratus-data")
    api = Api(srv)
    api.add("on-1", {"a": 1})
    srv.stop()
    data = str(srv.data_dir)

    out = cli("device", "list", "--data-dir", data, "--json")
    assert out.returncode == 0, out.stderr
    assert [d["id"] for d in json.loads(out.stdout)] == ["on-1"]
    out = cli("device", "add", "off-1", "--attr", "mode=offline", "--data-dir", data, "--json")
    assert out.returncode == 0, out.stderr
    offline_secret = json.loads(out.stdout)["secret"]
    out = cli("device", "rm", "on-1", "--data-dir", data)
    assert out.returncode == 0 and "deleted device on-1" in out.stdout
    out = cli("device", "show", "on-1", "--data-dir", data)
    assert out.returncode == 1 and "not found" in out.stderr
    out = cli("device", "list", "--data-dir", str(tmp_path / "nothing-here"))
    assert out.returncode == 2 and "no Stratus data" in out.stderr

    # without --server or --data-dir and no server on the default port, ./stratus-data is used
    out = cli("device", "list", "--json", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, cwd=home)
    assert out.returncode == 0, out.stderr
    assert [d["id"] for d in json.loads(out.stdout)] == ["off-1"]
    assert "using the data dir" in out.stderr

    # the restarted server knows the device added offline
    srv.start()
    api = Api(srv)
    token = api.token("off-1", offline_secret)
    assert api.call("GET", "/api/v1/devices/off-1/config", token).json()["version"] == 0
    assert_error(api.call("GET", "/api/v1/devices/on-1", api.admin), 404, "not_found")
    entries = [e for e in api.audit() if e["target"] in ("devices/off-1", "devices/on-1")]
    assert [e["action"] for e in entries] == ["device.create", "device.create", "device.delete"]
    assert entries[0]["actor"] == "admin" and entries[1]["actor"].startswith("cli")


def test_audit_verify_detects_an_edited_row(start_server):
    srv = start_server("audit", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    api = Api(srv)
    api.add("t-1")
    api.add("t-2")
    api.call("PUT", "/api/v1/devices/t-1/config", api.admin, json={"x": 1})
    api.call("DELETE", "/api/v1/devices/t-2", api.admin)
    n = len(api.audit())
    assert n >= 4
    srv.stop()
    data = str(srv.data_dir)

    out = cli("audit", "verify", "--data-dir", data)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"audit log intact: {n} entries"
    out = cli("audit", "verify", "--data-dir", data, "--json")
    assert json.loads(out.stdout)["intact"] is True

    db = sqlite3.connect(srv.data_dir / "stratus.db")
    (seq,) = db.execute("SELECT seq FROM audit WHERE action = 'config.put'").fetchone()
    db.execute("UPDATE audit SET detail = ? WHERE seq = ?", ('{"config":{"x":2},"version":1}', seq))
    db.commit()
    db.close()

    out = cli("audit", "verify", "--data-dir", data)
    assert out.returncode == 1
    assert out.stdout.strip() == f"audit log broken at entry {seq}: content does not match its hash"
    out = cli("audit", "verify", "--data-dir", data, "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"intact": False, "broken_at": seq,
                                      "reason": "content does not match its hash"}
    out = cli("audit", "verify", "--data-dir", data + "-missing")
    assert out.returncode == 2

    # the server sees it too
    srv.start()
    r = Api(srv).call("GET", "/api/v1/audit/verify", Api(srv).admin)
    assert r.json() == {"intact": False, "broken_at": seq,
                        "reason": "content does not match its hash"}
