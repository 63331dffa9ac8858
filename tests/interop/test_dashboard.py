"""The dashboard's server side, black-box with `requests` and `curl`: the embedded assets
(content types, CSP and other security headers, ETag revalidation), sign-in with an OAuth
client into an HttpOnly session cookie, the CSRF rule for cookie-authenticated changes, and
sign-out revoking the session. The pages themselves are tested in a browser (tests/browser/).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from test_transports import pki, start_tls, tls_config  # noqa: F401 (pki is a fixture)


@pytest.fixture
def cloud(start_server):
    srv = start_server("dashboard", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    return Cloud(srv)


def login(cloud: Cloud, client_id="admin", secret=ADMIN_SECRET, **kw) -> requests.Response:
    return requests.post(cloud.url("/dashboard/login"),
                         json={"client_id": client_id, "client_secret": secret}, timeout=10, **kw)


def signed_in(cloud: Cloud) -> tuple[requests.Session, str]:
    s = requests.Session()
    r = s.post(cloud.url("/dashboard/login"), json={"client_id": "admin", "client_secret": ADMIN_SECRET},
               timeout=10)
    assert r.status_code == 200, r.text
    return s, r.json()["csrf"]


@pytest.mark.parametrize("path,ctype", [
    ("/", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/device.js", "text/javascript; charset=utf-8"),
    ("/app.css", "text/css; charset=utf-8"),
    ("/vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    ("/vendor/uPlot.min.css", "text/css; charset=utf-8"),
])
def test_assets_are_served_with_their_type_and_a_strict_csp(cloud, path, ctype):
    r = requests.get(cloud.url(path), timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"] == ctype
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["etag"].startswith('"')


def test_the_page_loads_only_its_own_scripts(cloud):
    html = requests.get(cloud.url("/"), timeout=10).text
    assert '<script type="module" src="/app.js"></script>' in html
    assert "<script>" not in html and "http://" not in html and "https://" not in html
    assert 'lang="en"' in html and "<main" in html and 'name="viewport"' in html


def test_an_unchanged_asset_revalidates_to_304_with_curl(cloud):
    first = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", cloud.url("/app.js")],
                           capture_output=True, text=True, timeout=10, check=True).stdout
    etag = next(line.split(":", 1)[1].strip() for line in first.splitlines() if line.lower().startswith("etag:"))
    again = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", f"If-None-Match: {etag}",
                            cloud.url("/app.js")], capture_output=True, text=True, timeout=10, check=True)
    assert again.stdout == "304"


def test_healthz_and_metrics_are_untouched(cloud):
    assert requests.get(cloud.url("/healthz"), timeout=10).json()["status"] == "ok"
    assert requests.get(cloud.url("/metrics"), timeout=10).status_code == 200
    r = requests.get(cloud.url("/no/such/page"), timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_login_sets_an_http_only_strict_cookie_and_answers_the_csrf_token(cloud):
    r = login(cloud)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["who"] == "admin" and body["scopes"] == ["admin"] and len(body["csrf"]) == 64
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("stratus_session=")
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert attr in cookie
    assert "Secure" not in cookie  # plain HTTP here; HTTPS adds it
    assert r.headers["cache-control"] == "no-store"
    token = cookie.split(";", 1)[0].split("=", 1)[1]
    assert body["csrf"] not in token and token not in r.text  # the token is never in a body


def test_login_takes_a_form_too_with_curl(cloud):
    out = subprocess.run(["curl", "-s", "-c", "-", "--data-urlencode", "client_id=admin",
                          "--data-urlencode", f"client_secret={ADMIN_SECRET}", cloud.url("/dashboard/login")],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert "#HttpOnly_127.0.0.1" in out and "stratus_session" in out
    assert '"who":"admin"' in out


def test_bad_credentials_and_devices_are_refused_without_a_basic_challenge(cloud):
    r = login(cloud, secret="wrong")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert "set-cookie" not in r.headers
    assert "www-authenticate" not in r.headers  # a browser would pop up its own dialog
    device, secret = cloud.add_device()
    r = login(cloud, device, secret)
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    assert "set-cookie" not in r.headers
    assert requests.post(cloud.url("/dashboard/login"), data="{}", timeout=10).status_code == 400


def test_a_telemetry_read_client_may_sign_in(cloud):
    r = requests.post(cloud.url("/api/v1/clients"), json={"client_id": "viewer", "scopes": ["telemetry:read"]},
                      headers=cloud.admin, timeout=10)
    assert r.status_code == 201, r.text
    r = login(cloud, "viewer", r.json()["client_secret"])
    assert r.status_code == 200 and r.json()["scopes"] == ["telemetry:read"]
    s = requests.Session()
    s.cookies.update(r.cookies)
    assert s.get(cloud.url("/api/v1/devices"), timeout=10).status_code == 403  # scope still applies


def test_the_session_cookie_authenticates_the_api(cloud):
    device, _ = cloud.add_device()
    s, csrf = signed_in(cloud)
    r = s.get(cloud.url("/dashboard/session"), timeout=10)
    assert r.status_code == 200 and r.json()["who"] == "admin" and r.json()["csrf"] == csrf
    r = s.get(cloud.url(f"/api/v1/devices/{device}"), timeout=10)
    assert r.status_code == 200 and r.json()["id"] == device
    assert requests.get(cloud.url(f"/api/v1/devices/{device}"), timeout=10).status_code == 401


def test_cookie_authenticated_changes_need_the_csrf_token_and_our_origin(cloud):
    device, _ = cloud.add_device()
    s, csrf = signed_in(cloud)
    put = lambda **h: s.put(cloud.url(f"/api/v1/devices/{device}/config"), json={"k": 1}, headers=h, timeout=10)
    r = put()
    assert r.status_code == 403 and r.json()["error"] == "invalid_csrf_token"
    assert put(**{"X-CSRF-Token": "0" * 64}).status_code == 403
    host = f"127.0.0.1:{cloud.srv.http_port}"
    assert put(**{"X-CSRF-Token": csrf, "Origin": "http://evil.example"}).status_code == 403
    assert put(**{"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    r = put(**{"X-CSRF-Token": csrf, "Origin": f"http://{host}"})
    assert r.status_code == 200 and r.json()["config"] == {"k": 1}
    # A bearer token needs no CSRF token (no ambient credential).
    r = requests.put(cloud.url(f"/api/v1/devices/{device}/config"), json={"k": 2}, headers=cloud.admin, timeout=10)
    assert r.status_code == 200
    # Nothing changed by the refused requests: versions 1 and 2 only.
    assert requests.get(cloud.url(f"/api/v1/devices/{device}/config"), headers=cloud.admin,
                        timeout=10).json()["version"] == 2


def test_login_from_another_origin_is_refused(cloud):
    r = login(cloud, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_logout_revokes_the_session(cloud):
    s, csrf = signed_in(cloud)
    token = s.cookies["stratus_session"]
    assert s.post(cloud.url("/dashboard/logout"), timeout=10).status_code == 403  # CSRF applies
    r = s.post(cloud.url("/dashboard/logout"), headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 204
    assert "Max-Age=0" in r.headers["set-cookie"]
    r = requests.get(cloud.url("/api/v1/devices"), headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401
    r = requests.get(cloud.url("/dashboard/session"), cookies={"stratus_session": token}, timeout=10)
    assert r.status_code == 401
    assert json.loads(r.text)["error"] == "invalid_token"


def test_the_cookie_is_secure_over_https_with_curl(start_server, pki):  # noqa: F811
    srv = start_tls(start_server, "dash-tls", config=tls_config(pki), env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    base = f"https://localhost:{srv.listening()['https']}"
    r = subprocess.run(["curl", "-sS", "--cacert", str(pki / "ca.pem"), "-D", "-", "-o", "/dev/null",
                        "-H", "Content-Type: application/json",
                        "--data", json.dumps({"client_id": "admin", "client_secret": ADMIN_SECRET}),
                        f"{base}/dashboard/login"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    cookie = next(line for line in r.stdout.splitlines() if line.lower().startswith("set-cookie:"))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and cookie.rstrip().endswith("; Secure")
    token = cookie.split(":", 1)[1].strip().split(";", 1)[0].split("=", 1)[1]
    r = subprocess.run(["curl", "-sS", "--cacert", str(pki / "ca.pem"), "-b", f"stratus_session={token}",
                        f"{base}/dashboard/session"], capture_output=True, text=True, timeout=10)
    assert json.loads(r.stdout)["who"] == "admin"
