"""Helpers for the cloud API tests: an admin session, devices with secrets and tokens,
all over plain HTTP with `requests` (the same calls curl makes)."""

from __future__ import annotations

import uuid

import requests

ADMIN_SECRET = "admin-test-secret"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Cloud:
    """A running server seen through its HTTP API with admin credentials."""

    def __init__(self, srv):
        self.srv = srv
        self.base = f"http://127.0.0.1:{srv.http_port}"
        self._admin = None

    def url(self, path: str) -> str:
        return self.base + path

    def token(self, client_id: str, secret: str, scope: str | None = None) -> str:
        data = {"grant_type": "client_credentials"}
        if scope:
            data["scope"] = scope
        r = requests.post(self.url("/oauth/token"), data=data, auth=(client_id, secret), timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    @property
    def admin(self) -> dict:
        if self._admin is None:
            self._admin = {"Authorization": f"Bearer {self.token('admin', ADMIN_SECRET)}"}
        return self._admin

    def add_device(self, device_id: str | None = None, attributes=None) -> tuple[str, str]:
        device_id = device_id or unique("dev")
        body = {"id": device_id}
        if attributes is not None:
            body["attributes"] = attributes
        r = requests.post(self.url("/api/v1/devices"), json=body, headers=self.admin, timeout=10)
        assert r.status_code == 201, r.text
        return device_id, r.json()["secret"]

    def device_headers(self, device_id: str, secret: str) -> dict:
        return {"Authorization": f"Bearer {self.token(device_id, secret)}"}

    def post(self, headers: dict, body, **kw):
        return requests.post(self.url("/api/v1/telemetry"), json=body, headers=headers, timeout=10, **kw)

    def points(self, device_id: str, key: str, **params) -> list:
        r = requests.get(self.url(f"/api/v1/devices/{device_id}/telemetry"), params={"key": key, **params},
                         headers=self.admin, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["points"]

    def latest(self, device_id: str) -> dict:
        r = requests.get(self.url(f"/api/v1/devices/{device_id}/telemetry/latest"), headers=self.admin, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["values"]

    def metric(self, name: str, **labels) -> float:
        body = requests.get(self.url("/metrics"), timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric = head.split("{")[0]
            if metric in (name, name + "_total") and (not labels or "{" + want + "}" in head):
                return float(value)
        return 0.0
