"""OAuth 2.0 authorization server: client credentials (RFC 6749 §4.4), bearer errors
(RFC 6750), revocation (RFC 7009), introspection (RFC 7662) and the admin bootstrap.

Clients: curl (every endpoint and every error code, with exact headers) and
requests-oauthlib's BackendApplicationClient/OAuth2Session (Basic and form client
authentication). Expired and foreign tokens are forged with the server's own key file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import sqlite3
import stat
import subprocess
import time
import urllib.parse
from dataclasses import dataclass

import pytest
import requests
from oauthlib.oauth2 import BackendApplicationClient
from oauthlib.oauth2.rfc6749 import errors as oauth_errors
from requests.auth import HTTPBasicAuth
from requests_oauthlib import OAuth2Session

from stratus_server import Server

ADMIN_SECRET = "interop-admin-secret"
# The error tables fail logins on purpose, many from one address: without a higher allowance
# they would soon be slowed down (429), which test_quotas.py tests on its own.
ENV = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET, "STRATUS_AUTH__THROTTLE__FREE_FAILURES": "100000"}
# Needs the RFC 6749 §2.3.1 form encoding in Basic credentials: space, '+', '%', ':'.
AWKWARD_SECRET = "s3cret with space+plus%percent:colon/é"
ADMIN_SCOPE_FIELDS = {"active", "scope", "client_id", "sub", "token_type", "exp", "iat", "jti", "iss"}


# ---- helpers -------------------------------------------------------------------------------

@dataclass
class Resp:
    status: int
    headers: dict  # lower-case name -> list of values
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


def curl(url: str, *args: str) -> Resp:
    """POST/GET with curl; returns status, headers and body of the final response."""
    r = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", *args, url],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, f"curl failed: {r.stderr.decode(errors='replace')}"
    raw = r.stdout
    # Skip any interim 100 Continue responses.
    while True:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b"\r\n", 1)[0].split()[1])
        if status != 100:
            break
        raw = rest
    headers: dict = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Resp(status, headers, rest)


def url(srv: Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.http_port}{path}"


def token_curl(srv: Server, *args: str) -> Resp:
    return curl(url(srv, "/oauth/token"), *args)


def admin_token(srv: Server, scope: str | None = None, secret: str = ADMIN_SECRET) -> str:
    args = ["-u", f"admin:{secret}", "-d", "grant_type=client_credentials"]
    if scope:
        args += ["--data-urlencode", f"scope={scope}"]
    r = token_curl(srv, *args)
    assert r.status == 200, r.body
    return r.json()["access_token"]


def introspect(srv: Server, token: str, *auth: str) -> Resp:
    auth = auth or ("-u", f"admin:{ADMIN_SECRET}")
    return curl(url(srv, "/oauth/introspect"), *auth, "--data-urlencode", f"token={token}")


def is_active(srv: Server, token: str) -> bool:
    r = introspect(srv, token)
    assert r.status == 200, r.body
    return r.json()["active"]


def assert_error(r: Resp, status: int, code: str, oauth: bool = True):
    assert r.status == status, (r.status, r.body)
    body = r.json()
    assert body["error"] == code, body
    assert isinstance(body.get("error_description"), str) and body["error_description"], body
    if oauth:
        # RFC 6749 §5.2: error_description is printable ASCII without '"' and '\'.
        assert re.fullmatch(r"[\x20-\x21\x23-\x5b\x5d-\x7e]+", body["error_description"]), body
    assert r.header("content-type").startswith("application/json")


def assert_no_store(r: Resp):
    assert r.header("cache-control") == "no-store", r.headers
    assert r.header("pragma") == "no-cache", r.headers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def credential(srv: Server, key: bytes, kind: str, principal: str) -> str:
    """The fingerprint of a principal's credential a token carries (`cred`): 8 bytes of
    HMAC-SHA-256 under the token key over the length-prefixed kind, id and secret hash."""
    db = sqlite3.connect(f"file:{srv.data_dir / 'stratus.db'}?mode=ro", uri=True, timeout=10)
    try:
        table, column = ("oauth_clients", "client_id") if kind == "client" else ("devices", "id")
        row = db.execute(f"SELECT secret_hash FROM {table} WHERE {column} = ?", (principal,)).fetchone()
    finally:
        db.close()
    mac = hmac.new(key, b"stratus-credential/v1", hashlib.sha256)
    for part in (kind, principal, row[0]):
        data = part.encode()
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.digest()[:8].hex()


def forge(srv: Server, key: bytes | None = None, alg: str = "HS256", **claims) -> str:
    """A JWT like the server's, signed with its token key (or `key`) and bound to the
    principal's current credential."""
    now = int(time.time())
    token_key = (srv.data_dir / "token.key").read_bytes()
    body = {"iss": "stratus", "sub": "admin", "scope": "admin", "kind": "client",
            "iat": now, "exp": now + 600, "jti": "f" * 32,
            "cred": credential(srv, token_key, "client", "admin")}
    body.update(claims)
    head = b64url(json.dumps({"typ": "JWT", "alg": alg}).encode())
    payload = b64url(json.dumps(body).encode())
    if alg == "none":
        return f"{head}.{payload}."
    key = key if key is not None else token_key
    sig = hmac.new(key, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{b64url(sig)}"


def metric(srv: Server, name: str, labels: str) -> float:
    text = requests.get(url(srv, "/metrics"), timeout=10).text
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def audit_rows(srv: Server, action: str, table: str = "audit") -> list:
    """Entries of the chain (`audit`), or failed logins kept beside it (`audit_failures`)."""
    order = "seq" if table == "audit" else "id"
    db = sqlite3.connect(f"file:{srv.data_dir / 'stratus.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            f"SELECT actor, action, target, detail FROM {table} WHERE action = ? ORDER BY {order}",
            (action,)).fetchall()
    finally:
        db.close()
    return [(a, b, c, json.loads(d)) for a, b, c, d in rows]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the read-mostly error tables (their cases do not interfere)."""
    srv = Server(tmp_path_factory.mktemp("oauth"), "oauth-shared",
                 env=ENV)
    srv.start()
    yield srv
    problems = srv.problems()
    srv.stop()
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def shared(shared_server, request):
    request.node._stratus_servers = [shared_server]  # its log goes into failure reports
    return shared_server


@pytest.fixture
def srv(start_server):
    return start_server("oauth", env=ENV)


@pytest.fixture
def insecure_transport(monkeypatch):
    # oauthlib refuses plain http unless told this is a test.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")


def create_client(srv: Server, client_id: str, scopes: list, token: str | None = None) -> str:
    token = token or admin_token(srv)
    r = curl(url(srv, "/api/v1/clients"), "-H", f"Authorization: Bearer {token}",
             "-H", "Content-Type: application/json",
             "--data", json.dumps({"client_id": client_id, "scopes": scopes}))
    assert r.status == 201, r.body
    body = r.json()
    assert body["client_id"] == client_id and body["scopes"] == scopes
    assert r.header("location") == f"/api/v1/clients/{client_id}"
    assert_no_store(r)
    return body["client_secret"]


# ---- POST /oauth/token ---------------------------------------------------------------------

def test_token_with_basic_auth(shared):
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials")
    assert r.status == 200, r.body
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "admin"
    assert body["access_token"].count(".") == 2
    assert r.header("content-type").startswith("application/json")
    assert_no_store(r)


def test_token_with_form_credentials(shared):
    r = token_curl(shared, "-d", "grant_type=client_credentials", "-d", "client_id=admin",
                   "--data-urlencode", f"client_secret={ADMIN_SECRET}")
    assert r.status == 200, r.body
    assert r.json()["scope"] == "admin"
    assert_no_store(r)


def test_token_with_basic_and_matching_form_client_id(shared):
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                   "-d", "client_id=admin")
    assert r.status == 200, r.body


def test_token_content_type_with_charset(shared):
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}",
                   "-H", "Content-Type: application/x-www-form-urlencoded; charset=UTF-8",
                   "--data", "grant_type=client_credentials")
    assert r.status == 200, r.body


def test_scope_narrowing(shared):
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                   "-d", "scope=telemetry:read")
    assert r.status == 200, r.body
    assert r.json()["scope"] == "telemetry:read"
    tok = r.json()["access_token"]
    info = introspect(shared, tok).json()
    assert info["active"] is True and info["scope"] == "telemetry:read"
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                   "--data-urlencode", "scope=telemetry:read devices:write telemetry:read")
    assert r.status == 200, r.body
    assert r.json()["scope"] == "telemetry:read devices:write"


TOKEN_ERRORS = {
    "json body": (["-u", f"admin:{ADMIN_SECRET}", "-H", "Content-Type: application/json",
                   "--data", '{"grant_type": "client_credentials"}'], 400, "invalid_request"),
    "no content type": (["-u", f"admin:{ADMIN_SECRET}", "-H", "Content-Type:",
                         "--data", "grant_type=client_credentials"], 400, "invalid_request"),
    "grant_type missing": (["-u", f"admin:{ADMIN_SECRET}", "-d", "scope=admin"],
                           400, "invalid_request"),
    "grant_type empty": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type="],
                         400, "invalid_request"),
    "grant_type repeated": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                             "-d", "grant_type=client_credentials"], 400, "invalid_request"),
    "scope repeated": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                        "-d", "scope=admin", "-d", "scope=admin"], 400, "invalid_request"),
    "bad escape": (["-u", f"admin:{ADMIN_SECRET}", "--data", "grant_type=client%zzcredentials"],
                   400, "invalid_request"),
    "two auth methods": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                          "-d", "client_id=admin", "-d", f"client_secret={ADMIN_SECRET}"],
                         400, "invalid_request"),
    "basic and another client_id": (["-u", f"admin:{ADMIN_SECRET}", "-d",
                                     "grant_type=client_credentials", "-d", "client_id=other"],
                                    400, "invalid_request"),
    "secret without id": (["-d", "grant_type=client_credentials", "-d", "client_secret=x"],
                          400, "invalid_request"),
    "password grant": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=password",
                        "-d", "username=a", "-d", "password=b"], 400, "unsupported_grant_type"),
    "authorization code grant": (["-u", f"admin:{ADMIN_SECRET}", "-d",
                                  "grant_type=authorization_code", "-d", "code=x"],
                                 400, "unsupported_grant_type"),
    "unknown scope": (["-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=client_credentials",
                       "-d", "scope=bogus"], 400, "invalid_scope"),
    "one unknown scope of two": (["-u", f"admin:{ADMIN_SECRET}", "-d",
                                  "grant_type=client_credentials", "--data-urlencode",
                                  "scope=admin bogus"], 400, "invalid_scope"),
    "device scope for a client": (["-u", f"admin:{ADMIN_SECRET}", "-d",
                                   "grant_type=client_credentials", "-d", "scope=device"],
                                  400, "invalid_scope"),
    "wrong secret (basic)": (["-u", "admin:wrong", "-d", "grant_type=client_credentials"],
                             401, "invalid_client"),
    "wrong secret (form)": (["-d", "grant_type=client_credentials", "-d", "client_id=admin",
                             "-d", "client_secret=wrong"], 401, "invalid_client"),
    "unknown client": (["-u", "nobody:whatever", "-d", "grant_type=client_credentials"],
                       401, "invalid_client"),
    "no credentials": (["-d", "grant_type=client_credentials"], 401, "invalid_client"),
    "id without secret": (["-d", "grant_type=client_credentials", "-d", "client_id=admin"],
                          401, "invalid_client"),
    "malformed basic": (["-H", "Authorization: Basic !!!notbase64", "-d",
                         "grant_type=client_credentials"], 401, "invalid_client"),
    "basic without colon": (["-H", f"Authorization: Basic {base64.b64encode(b'admin').decode()}",
                             "-d", "grant_type=client_credentials"], 401, "invalid_client"),
    "bearer instead of client auth": (["-H", "Authorization: Bearer a.b.c", "-d",
                                       "grant_type=client_credentials"], 401, "invalid_client"),
    "digest scheme": (["-H", "Authorization: Digest username=admin", "-d",
                       "grant_type=client_credentials"], 401, "invalid_client"),
}


@pytest.mark.parametrize("case", list(TOKEN_ERRORS), ids=list(TOKEN_ERRORS))
def test_token_errors(shared, case):
    args, status, code = TOKEN_ERRORS[case]
    r = token_curl(shared, *args)
    assert_error(r, status, code)
    assert_no_store(r)
    if status == 401:
        assert r.header("www-authenticate") == 'Basic realm="stratus"', r.headers
    else:
        assert r.header("www-authenticate") is None


def test_token_get_is_not_allowed(shared):
    r = curl(url(shared, "/oauth/token"))
    assert r.status == 405


def test_token_oversized_body_is_refused(shared, tmp_path):
    big = tmp_path / "big.form"
    big.write_bytes(b"grant_type=client_credentials&pad=" + b"x" * (5 << 20))
    r = token_curl(shared, "-u", f"admin:{ADMIN_SECRET}", "--data-binary", f"@{big}")
    assert r.status == 413, r.status
    assert_error(r, 413, "invalid_request")
    assert wait_for(lambda: is_active(shared, admin_token(shared)))  # still serving


def test_awkward_secret_in_every_encoding(start_server, insecure_transport):
    """RFC 6749 §2.3.1 form-encoded Basic, raw Basic (what most clients send), form fields."""
    srv = start_server("awkward", env={"STRATUS_ADMIN_SECRET": AWKWARD_SECRET})
    q = urllib.parse.quote_plus
    encoded = base64.b64encode(f"{q('admin')}:{q(AWKWARD_SECRET)}".encode()).decode()
    r = token_curl(srv, "-H", f"Authorization: Basic {encoded}", "-d", "grant_type=client_credentials")
    assert r.status == 200, r.body
    raw = base64.b64encode(f"admin:{AWKWARD_SECRET}".encode()).decode()
    r = token_curl(srv, "-H", f"Authorization: Basic {raw}", "-d", "grant_type=client_credentials")
    assert r.status == 200, r.body
    r = token_curl(srv, "-d", "grant_type=client_credentials", "-d", "client_id=admin",
                   "--data-urlencode", f"client_secret={AWKWARD_SECRET}")
    assert r.status == 200, r.body
    r = token_curl(srv, "-H", f"Authorization: Basic {raw[:-4]}", "-d", "grant_type=client_credentials")
    assert_error(r, 401, "invalid_client")
    # requests-oauthlib, both ways.
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin"))
    tok = session.fetch_token(url(srv, "/oauth/token"), client_id="admin",
                              client_secret=AWKWARD_SECRET)
    assert tok["token_type"] == "Bearer"
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin"))
    tok = session.fetch_token(url(srv, "/oauth/token"), client_id="admin",
                              client_secret=AWKWARD_SECRET, include_client_id=True)
    assert tok["token_type"] == "Bearer"


# ---- requests-oauthlib -----------------------------------------------------------------------

@pytest.mark.parametrize("form_auth", [False, True], ids=["basic", "form"])
def test_requests_oauthlib_fetch_token(shared, insecure_transport, form_auth):
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin"))
    kwargs = {"include_client_id": True} if form_auth else {}
    tok = session.fetch_token(url(shared, "/oauth/token"), client_id="admin",
                              client_secret=ADMIN_SECRET, **kwargs)
    assert tok["token_type"] == "Bearer"
    assert tok["expires_in"] == 3600
    assert tok["scope"] == ["admin"]
    assert tok["expires_at"] > time.time() + 3000
    # The session now sends the token as a bearer: introspect its own token with it.
    r = session.post(url(shared, "/oauth/introspect"), data={"token": tok["access_token"]},
                     timeout=10)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["active"] is True and info["sub"] == "admin"


def test_requests_oauthlib_scope_and_errors(shared, insecure_transport):
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin",
                                                            scope=["telemetry:read"]),
                            scope=["telemetry:read"])
    tok = session.fetch_token(url(shared, "/oauth/token"), client_id="admin",
                              client_secret=ADMIN_SECRET)
    assert tok["scope"] == ["telemetry:read"]
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin", scope=["bogus"]),
                            scope=["bogus"])
    with pytest.raises(oauth_errors.InvalidScopeError):
        session.fetch_token(url(shared, "/oauth/token"), client_id="admin",
                            client_secret=ADMIN_SECRET)
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin"))
    with pytest.raises(oauth_errors.InvalidClientError):
        session.fetch_token(url(shared, "/oauth/token"), client_id="admin", client_secret="nope")
    with pytest.raises(oauth_errors.InvalidClientError):
        session.fetch_token(url(shared, "/oauth/token"), client_id="admin", client_secret="nope",
                            include_client_id=True)


def test_requests_revoke_then_introspect_inactive(srv, insecure_transport):
    session = OAuth2Session(client=BackendApplicationClient(client_id="admin"))
    tok = session.fetch_token(url(srv, "/oauth/token"), client_id="admin",
                              client_secret=ADMIN_SECRET)["access_token"]
    basic = HTTPBasicAuth("admin", ADMIN_SECRET)
    r = requests.post(url(srv, "/oauth/introspect"), data={"token": tok}, auth=basic, timeout=10)
    assert r.json()["active"] is True
    r = requests.post(url(srv, "/oauth/revoke"),
                      data={"token": tok, "token_type_hint": "access_token"}, auth=basic, timeout=10)
    assert r.status_code == 200 and r.content == b""
    r = requests.post(url(srv, "/oauth/introspect"), data={"token": tok}, auth=basic, timeout=10)
    assert r.status_code == 200
    assert r.json() == {"active": False}
    # The revoked token no longer authenticates as a bearer either (RFC 6750).
    r = session.post(url(srv, "/oauth/introspect"), data={"token": tok}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


# ---- POST /oauth/introspect -----------------------------------------------------------------

def test_introspect_active_token_claims(shared):
    before = int(time.time())
    tok = admin_token(shared)
    r = introspect(shared, tok)
    assert r.status == 200, r.body
    assert_no_store(r)
    info = r.json()
    assert set(info) == ADMIN_SCOPE_FIELDS
    assert info["active"] is True
    assert info["scope"] == "admin"
    assert info["client_id"] == "admin" and info["sub"] == "admin"
    assert info["token_type"] == "Bearer"
    assert info["iss"] == "stratus"
    assert before - 1 <= info["iat"] <= int(time.time()) + 1
    assert info["exp"] - info["iat"] == 3600
    assert re.fullmatch(r"[0-9a-f]{32}", info["jti"])


def test_introspect_with_form_credentials_and_with_bearer(shared):
    tok = admin_token(shared)
    r = introspect(shared, tok, "-d", "client_id=admin", "--data-urlencode",
                   f"client_secret={ADMIN_SECRET}")
    assert r.status == 200 and r.json()["active"] is True
    r = introspect(shared, tok, "-H", f"Authorization: Bearer {tok}")
    assert r.status == 200 and r.json()["active"] is True


@pytest.mark.parametrize("what", ["garbage", "empty segments", "wrong key", "expired",
                                  "alg none", "other issuer", "unknown subject", "tampered"])
def test_introspect_invalid_tokens_are_inactive(shared, what):
    good = admin_token(shared)
    token = {
        "garbage": "not-a-token",
        "empty segments": "..",
        "wrong key": forge(shared, key=b"k" * 32),
        "expired": forge(shared, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        "alg none": forge(shared, alg="none"),
        "other issuer": forge(shared, iss="someone-else"),
        "unknown subject": forge(shared, sub="ghost"),
        "tampered": good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
    }[what]
    r = introspect(shared, token)
    assert r.status == 200, r.body
    assert r.json() == {"active": False}
    assert_no_store(r)


def test_forged_token_with_the_right_key_is_active(shared):
    # Proves the forging above is faithful, so "expired" fails for its expiry alone.
    assert is_active(shared, forge(shared))


@pytest.mark.parametrize("bearer", ["garbage", "expired", "empty"])
def test_introspect_bad_bearer_is_rfc6750_invalid_token(shared, bearer):
    value = {
        "garbage": "Bearer not-a-token",
        "expired": f"Bearer {forge(shared, exp=int(time.time()) - 10)}",
        "empty": "Bearer ",
    }[bearer]
    r = curl(url(shared, "/oauth/introspect"), "-H", f"Authorization: {value}",
             "--data-urlencode", f"token={admin_token(shared)}")
    assert_error(r, 401, "invalid_token")
    challenge = r.header("www-authenticate")
    assert challenge.startswith("Bearer "), challenge
    assert 'error="invalid_token"' in challenge
    assert 'realm="stratus"' in challenge


INTROSPECT_ERRORS = {
    "no credentials": ([], 401, "invalid_client"),
    "wrong secret": (["-u", "admin:wrong"], 401, "invalid_client"),
    "unknown client (form)": (["-d", "client_id=ghost", "-d", "client_secret=x"],
                              401, "invalid_client"),
    "json body": (["-u", f"admin:{ADMIN_SECRET}", "-H", "Content-Type: application/json"],
                  400, "invalid_request"),
    "token repeated": (["-u", f"admin:{ADMIN_SECRET}", "-d", "token=a"], 400, "invalid_request"),
    "two auth methods": (["-u", f"admin:{ADMIN_SECRET}", "-d", "client_id=admin",
                          "-d", "client_secret=x"], 400, "invalid_request"),
}


@pytest.mark.parametrize("case", list(INTROSPECT_ERRORS), ids=list(INTROSPECT_ERRORS))
def test_introspect_errors(shared, case):
    args, status, code = INTROSPECT_ERRORS[case]
    r = curl(url(shared, "/oauth/introspect"), *args, "-d", "token=abc")
    assert_error(r, status, code)
    assert_no_store(r)
    if code == "invalid_client":
        challenge = r.header("www-authenticate")
        assert challenge.startswith('Basic realm="stratus"'), challenge


def test_introspect_missing_token(shared):
    r = curl(url(shared, "/oauth/introspect"), "-u", f"admin:{ADMIN_SECRET}", "-d", "x=1")
    assert_error(r, 400, "invalid_request")
    r = curl(url(shared, "/oauth/introspect"), "-u", f"admin:{ADMIN_SECRET}", "-d", "token=")
    assert_error(r, 400, "invalid_request")


# ---- POST /oauth/revoke ---------------------------------------------------------------------

def test_revoke_with_curl(srv):
    tok = admin_token(srv)
    other = admin_token(srv)
    r = curl(url(srv, "/oauth/revoke"), "-u", f"admin:{ADMIN_SECRET}",
             "--data-urlencode", f"token={tok}")
    assert r.status == 200, r.body
    assert r.body == b""
    assert_no_store(r)
    assert not is_active(srv, tok)
    assert is_active(srv, other), "revoking one token must not touch another"
    # Revoking again, or something that is no token at all, is still 200 (RFC 7009 §2.2).
    for token in (tok, "garbage", forge(srv, key=b"x" * 32)):
        r = curl(url(srv, "/oauth/revoke"), "-u", f"admin:{ADMIN_SECRET}",
                 "--data-urlencode", f"token={token}", "-d", "token_type_hint=refresh_token")
        assert r.status == 200 and r.body == b"", (token, r.body)
    # Form credentials work as well.
    r = curl(url(srv, "/oauth/revoke"), "-d", "client_id=admin", "--data-urlencode",
             f"client_secret={ADMIN_SECRET}", "--data-urlencode", f"token={other}")
    assert r.status == 200
    assert not is_active(srv, other)
    # The revocation is audited with the token id.
    rows = audit_rows(srv, "token.revoke")
    assert [r[0] for r in rows] == ["admin", "admin"]
    assert all(r[2].startswith("token/") and r[3]["sub"] == "admin" for r in rows)


REVOKE_ERRORS = {
    "no credentials": (["-d", "token=abc"], 401, "invalid_client"),
    "wrong secret": (["-u", "admin:wrong", "-d", "token=abc"], 401, "invalid_client"),
    "bearer is not client auth": (["-H", "Authorization: Bearer a.b.c", "-d", "token=abc"],
                                  401, "invalid_client"),
    "missing token": (["-u", f"admin:{ADMIN_SECRET}", "-d", "token_type_hint=access_token"],
                      400, "invalid_request"),
    "json body": (["-u", f"admin:{ADMIN_SECRET}", "-H", "Content-Type: application/json",
                   "--data", '{"token": "abc"}'], 400, "invalid_request"),
    "token repeated": (["-u", f"admin:{ADMIN_SECRET}", "-d", "token=a", "-d", "token=b"],
                       400, "invalid_request"),
}


@pytest.mark.parametrize("case", list(REVOKE_ERRORS), ids=list(REVOKE_ERRORS))
def test_revoke_errors(shared, case):
    args, status, code = REVOKE_ERRORS[case]
    r = curl(url(shared, "/oauth/revoke"), *args)
    assert_error(r, status, code)
    if status == 401:
        assert r.header("www-authenticate") == 'Basic realm="stratus"'


def test_revocation_survives_restart(srv):
    tok = admin_token(srv)
    keep = admin_token(srv)
    r = curl(url(srv, "/oauth/revoke"), "-u", f"admin:{ADMIN_SECRET}", "--data-urlencode",
             f"token={tok}")
    assert r.status == 200
    srv.restart()
    assert not is_active(srv, tok)
    assert is_active(srv, keep), "tokens are signed with the persisted key"


# ---- clients: isolation between applications ------------------------------------------------

def test_application_client_lifecycle_and_isolation(srv, insecure_transport):
    secret = create_client(srv, "dashboard", ["telemetry:read"])
    app = ["-u", f"dashboard:{secret}"]
    r = token_curl(srv, *app, "-d", "grant_type=client_credentials")
    assert r.status == 200, r.body
    assert r.json()["scope"] == "telemetry:read"
    app_token = r.json()["access_token"]
    # An application may not widen its scope.
    assert_error(token_curl(srv, *app, "-d", "grant_type=client_credentials", "-d", "scope=admin"),
                 400, "invalid_scope")
    # It sees its own token, not the admin's.
    adm = admin_token(srv)
    r = introspect(srv, app_token, *app)
    assert r.json()["active"] is True and r.json()["client_id"] == "dashboard"
    assert introspect(srv, adm, *app).json() == {"active": False}
    assert introspect(srv, adm, "-H", f"Authorization: Bearer {app_token}").json() == {"active": False}
    # The admin sees every token.
    assert introspect(srv, app_token).json()["sub"] == "dashboard"
    # It cannot revoke the admin's token (still 200, nothing happens).
    r = curl(url(srv, "/oauth/revoke"), *app, "--data-urlencode", f"token={adm}")
    assert r.status == 200
    assert is_active(srv, adm)
    # The admin can revoke the application's token.
    second = token_curl(srv, *app, "-d", "grant_type=client_credentials").json()["access_token"]
    r = curl(url(srv, "/oauth/revoke"), "-u", f"admin:{ADMIN_SECRET}", "--data-urlencode",
             f"token={second}")
    assert r.status == 200
    assert not is_active(srv, second)
    # requests-oauthlib works for the application too.
    session = OAuth2Session(client=BackendApplicationClient(client_id="dashboard"))
    tok = session.fetch_token(url(srv, "/oauth/token"), client_id="dashboard", client_secret=secret)
    assert tok["scope"] == ["telemetry:read"]
    # A telemetry:read bearer may not manage clients: RFC 6750 insufficient_scope.
    r = curl(url(srv, "/api/v1/clients"), "-H", f"Authorization: Bearer {app_token}")
    assert_error(r, 403, "insufficient_scope", oauth=False)
    assert 'error="insufficient_scope"' in r.header("www-authenticate")
    # Listing, reading, deleting.
    r = curl(url(srv, "/api/v1/clients"), "-H", f"Authorization: Bearer {adm}")
    assert r.status == 200
    assert {c["client_id"]: c["scopes"] for c in r.json()} == {
        "admin": ["admin"], "dashboard": ["telemetry:read"]}
    assert all("secret" not in json.dumps(c) for c in r.json())
    r = curl(url(srv, "/api/v1/clients/dashboard"), "-H", f"Authorization: Bearer {adm}")
    assert r.status == 200 and r.json()["client_id"] == "dashboard"
    r = curl(url(srv, "/api/v1/clients/dashboard"), "-X", "DELETE", "-H", f"Authorization: Bearer {adm}")
    assert r.status == 204, r.body
    # Deleted: its tokens die at once and its secret no longer works.
    assert not is_active(srv, app_token)
    assert_error(token_curl(srv, *app, "-d", "grant_type=client_credentials"), 401, "invalid_client")
    r = curl(url(srv, "/api/v1/clients/dashboard"), "-H", f"Authorization: Bearer {adm}")
    assert_error(r, 404, "not_found", oauth=False)
    actions = [(a[0], a[1], a[2]) for a in audit_rows(srv, "client.create") + audit_rows(srv, "client.delete")]
    assert actions == [("admin", "client.create", "clients/dashboard"),
                       ("admin", "client.delete", "clients/dashboard")]


def test_client_registry_errors(srv):
    adm = admin_token(srv)
    auth = ["-H", f"Authorization: Bearer {adm}", "-H", "Content-Type: application/json"]
    create_client(srv, "app1", ["devices:write", "firmware:write"], token=adm)
    cases = [
        ({"client_id": "app1", "scopes": ["telemetry:read"]}, 409, "conflict"),
        ({"client_id": "admin", "scopes": ["telemetry:read"]}, 409, "conflict"),
        ({"client_id": "app2", "scopes": ["bogus"]}, 400, "invalid_request"),
        ({"client_id": "app2", "scopes": ["device"]}, 400, "invalid_request"),
        ({"client_id": "app2", "scopes": []}, 400, "invalid_request"),
        ({"client_id": "bad id!", "scopes": ["admin"]}, 400, "invalid_request"),
        ({"scopes": ["admin"]}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        r = curl(url(srv, "/api/v1/clients"), *auth, "--data", json.dumps(body))
        assert r.status == status, (body, r.status, r.body)
        assert r.json()["error"] == code, (body, r.body)
    r = curl(url(srv, "/api/v1/clients"), *auth, "--data", "{not json")
    assert_error(r, 400, "invalid_request", oauth=False)
    r = curl(url(srv, "/api/v1/clients/admin"), "-X", "DELETE", *auth)
    assert_error(r, 409, "conflict", oauth=False)
    r = curl(url(srv, "/api/v1/clients/ghost"), "-X", "DELETE", *auth)
    assert_error(r, 404, "not_found", oauth=False)
    # Without a token: RFC 6750 invalid_token with its challenge.
    r = curl(url(srv, "/api/v1/clients"))
    assert_error(r, 401, "invalid_token", oauth=False)
    assert r.header("www-authenticate").startswith("Bearer ")
    r = curl(url(srv, "/api/v1/clients"), "-H", "Authorization: Bearer garbage")
    assert_error(r, 401, "invalid_token", oauth=False)
    assert 'error="invalid_token"' in r.header("www-authenticate")


# ---- failures are counted and audited -------------------------------------------------------

def test_auth_failures_are_counted_and_audited(srv):
    labels = 'transport="oauth"'
    before = metric(srv, "stratus_auth_failures_total", labels)
    token_curl(srv, "-u", "admin:wrong", "-d", "grant_type=client_credentials")
    token_curl(srv, "-d", "grant_type=client_credentials", "-d", "client_id=mallory",
               "-d", "client_secret=guess")
    token_curl(srv, "-d", "grant_type=client_credentials")
    curl(url(srv, "/oauth/introspect"), "-H", "Authorization: Bearer junk", "-d", "token=x")
    curl(url(srv, "/oauth/revoke"), "-u", "eve%0A:x", "-d", "token=x")
    # Malformed requests are not authentication failures.
    token_curl(srv, "-u", f"admin:{ADMIN_SECRET}", "-d", "grant_type=password")
    assert metric(srv, "stratus_auth_failures_total", labels) == before + 5
    # Failed logins are aggregated per source, identity and endpoint and written when their
    # minute ends, or at shutdown: one entry each here, none in the chain itself.
    assert srv.stop() == 0
    assert audit_rows(srv, "auth.failure") == []
    rows = audit_rows(srv, "auth.failure", table="audit_failures")
    assert [(r[0], r[2]) for r in rows] == [
        ("admin", "oauth/token"), ("mallory", "oauth/token"), ("anonymous", "oauth/token"),
        ("anonymous", "oauth/introspect"), ("eve?", "oauth/revoke")]
    for _, _, _, detail in rows:
        assert detail["reason"]
        assert (detail["count"], detail["throttled"]) == (1, 0), detail
        assert (detail["source"], detail["transport"]) == ("127.0.0.1", "oauth"), detail
        assert re.fullmatch(r"127\.0\.0\.1:\d+", detail["remote"]), detail
    batches = audit_rows(srv, "auth.failures")
    assert len(batches) == 1 and batches[0][3]["entries"] == 5, batches


# ---- admin bootstrap ------------------------------------------------------------------------

ADMIN_LINE = re.compile(r"^\[out\] admin secret (\S+) \(client id admin; saved to (.+)\)$")


def admin_lines(srv: Server) -> list:
    return [m for m in (ADMIN_LINE.match(line) for line in srv.log().splitlines()) if m]


def test_generated_admin_secret(start_server):
    srv = start_server("boot")
    lines = wait_for(lambda: admin_lines(srv))
    assert len(lines) == 1, srv.log()
    secret, saved = lines[0].group(1), lines[0].group(2)
    path = srv.data_dir / "admin-secret"
    assert saved == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == secret
    assert len(secret) >= 32
    tok = admin_token(srv, secret=secret)
    assert introspect(srv, tok, "-u", f"admin:{secret}").json()["scope"] == "admin"

    srv.restart()
    time.sleep(0.3)  # give a (wrong) second announcement the chance to show up
    assert len(admin_lines(srv)) == 1, "the secret must be printed only once"
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    admin_token(srv, secret=secret)
    assert introspect(srv, tok, "-u", f"admin:{secret}").json()["active"] is True


def test_admin_secret_from_environment_is_neither_printed_nor_saved(srv):
    admin_token(srv)
    time.sleep(0.2)
    assert admin_lines(srv) == []
    assert not (srv.data_dir / "admin-secret").exists()
    # A different secret in the environment later changes nothing: the first one stays.
    srv.env["STRATUS_ADMIN_SECRET"] = "another-secret"
    srv.restart()
    admin_token(srv)
    assert_error(token_curl(srv, "-u", "admin:another-secret", "-d", "grant_type=client_credentials"),
                 401, "invalid_client")


# ---- OpenAPI --------------------------------------------------------------------------------

def test_openapi_documents_the_oauth_endpoints(shared):
    doc = requests.get(url(shared, "/api/openapi.json"), timeout=10).json()
    for path in ("/oauth/token", "/oauth/revoke", "/oauth/introspect"):
        op = doc["paths"][path]["post"]
        assert op["tags"] == ["oauth"], path
        assert "application/x-www-form-urlencoded" in op["requestBody"]["content"], path
        assert {"200", "400", "401"} <= set(op["responses"]), path
    assert doc["components"]["securitySchemes"]["client_basic"]["scheme"] == "basic"
    props = doc["components"]["schemas"]["TokenResponse"]["properties"]
    assert set(props) == {"access_token", "token_type", "expires_in", "scope"}
    assert {"get", "post"} <= set(doc["paths"]["/api/v1/clients"])
