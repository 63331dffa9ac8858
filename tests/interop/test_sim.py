"""`stratus sim` (issue #7): a simulated fleet on the device SDK against a real server —
every record the simulator counts as acknowledged is stored, exactly once; devices are
reused between runs; the desired config's `interval_s` is honoured and reported back; and
`stratus serve --demo` brings its own live fleet."""

from __future__ import annotations

import json
import subprocess
import time

import requests

from cloud import ADMIN_SECRET, Cloud
from stratus_server import clean_env, stratus_bin


def start_cloud(start_server, **kw):
    srv = start_server("cloud", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET}, anonymous=False, **kw)
    return srv, Cloud(srv)


def sim(srv, tmp_path, *args, timeout=120):
    cmd = [
        stratus_bin(), "sim",
        "--server", f"http://127.0.0.1:{srv.http_port}",
        "--mqtt", f"127.0.0.1:{srv.mqtt_port}",
        "--coap", f"127.0.0.1:{srv.coap_port}",
        "--devices-file", str(tmp_path / "sim-devices.json"),
        "--format", "json",
        *args,
    ]
    p = subprocess.run(cmd, env=clean_env({"STRATUS_ADMIN_SECRET": ADMIN_SECRET}),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert p.stdout.strip(), f"no summary (exit {p.returncode})\n{p.stderr[-3000:]}"
    return p, json.loads(p.stdout.strip().splitlines()[-1])


def stored(cloud: Cloud, device_id: str) -> int:
    """Stored temperature points of a device (every simulated record has one)."""
    r = requests.get(cloud.url(f"/api/v1/devices/{device_id}/telemetry"),
                     params={"key": "temperature", "agg": "count", "interval": "1d", "from": "0"},
                     headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    return int(sum(b["value"] for b in r.json()["buckets"]))


def test_sim_100_devices_every_acked_record_is_stored(start_server, tmp_path):
    srv, cloud = start_cloud(start_server)
    p, summary = sim(srv, tmp_path, "--devices", "100", "--transport", "mixed",
                     "--rate", "2", "--duration", "10s", "--prefix", "smoke")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary["devices"] == 100
    assert summary["transports"] == {"coap": 33, "http": 33, "mqtt": 34}
    assert summary["records_failed"] == 0 and summary["records_dropped"] == 0
    assert summary["records_unacked"] == 0
    assert summary["records_acked"] == summary["records_sent"]
    # 100 devices × 2/s × 10 s, give or take the start-up spread.
    assert summary["records_acked"] > 1000, summary
    # progress lines once a second on stderr
    assert p.stderr.count("connected, sent") >= 5, p.stderr[-2000:]
    total = 0
    for d in summary["per_device"]:
        n = stored(cloud, d["id"])
        assert n == d["acked"], (d, n)
        total += n
    assert total == summary["records_acked"]

    # A second run reuses the same devices (their secrets are in the devices file): no new
    # registration, and the series grow.
    devices_before = requests.get(cloud.url("/api/v1/devices"), params={"limit": 1000},
                                  headers=cloud.admin, timeout=10).json()["devices"]
    p, again = sim(srv, tmp_path, "--devices", "100", "--transport", "mixed",
                   "--rate", "1", "--duration", "3s", "--prefix", "smoke")
    assert p.returncode == 0, p.stderr[-3000:]
    devices_after = requests.get(cloud.url("/api/v1/devices"), params={"limit": 1000},
                                 headers=cloud.admin, timeout=10).json()["devices"]
    assert len(devices_after) == len(devices_before) == 100
    first = summary["per_device"][0]
    assert stored(cloud, first["id"]) == first["acked"] + again["per_device"][0]["acked"]


def test_sim_honours_interval_s_and_reports_it(start_server, tmp_path):
    srv, cloud = start_cloud(start_server)
    # Register the devices with a first short run, then slow one of them down.
    p, _ = sim(srv, tmp_path, "--devices", "2", "--transport", "mqtt", "--duration", "1s",
               "--prefix", "cfg")
    assert p.returncode == 0, p.stderr[-3000:]
    r = requests.put(cloud.url("/api/v1/devices/cfg-0001/config"), json={"interval_s": 60},
                     headers=cloud.admin, timeout=10)
    assert r.status_code == 200, r.text
    p, summary = sim(srv, tmp_path, "--devices", "2", "--transport", "mqtt", "--rate", "5",
                     "--duration", "4s", "--prefix", "cfg")
    assert p.returncode == 0, p.stderr[-3000:]
    by_id = {d["id"]: d for d in summary["per_device"]}
    assert by_id["cfg-0001"]["sent"] <= 1, by_id
    assert by_id["cfg-0002"]["sent"] >= 10, by_id
    view = requests.get(cloud.url("/api/v1/devices/cfg-0001"), headers=cloud.admin, timeout=10).json()
    assert view["reported"]["config"]["interval_s"] == 60, view


def test_sim_usage_errors_exit_2(start_server, tmp_path):
    srv, _ = start_cloud(start_server)
    for bad in (["--transport", "pigeon"], ["--duration", "soon"], ["--devices", "0"]):
        p = subprocess.run([stratus_bin(), "sim", *bad, "--server", f"http://127.0.0.1:{srv.http_port}"],
                           env=clean_env({"STRATUS_ADMIN_SECRET": ADMIN_SECRET}),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, (bad, p.stderr)
        assert bad[0] in p.stderr, (bad, p.stderr)


def test_serve_demo_runs_a_live_fleet(start_server):
    srv = start_server("demo", args=["--demo"], anonymous=False)
    # These lines follow the listening lines the start waits for.
    deadline = time.monotonic() + 10
    while "admin secret in" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    out = srv.log()
    assert "dashboard http://127.0.0.1:" in out, out
    assert f"admin secret in {srv.data_dir / 'admin-secret'}" in out, out
    secret = (srv.data_dir / "admin-secret").read_text().strip()
    base = f"http://127.0.0.1:{srv.http_port}"
    token = requests.post(f"{base}/oauth/token", data={"grant_type": "client_credentials"},
                          auth=("admin", secret), timeout=10).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 30
    live = {}
    while time.monotonic() < deadline:
        devices = requests.get(f"{base}/api/v1/devices", headers=headers, timeout=10).json()["devices"]
        live = {}
        for d in devices:
            latest = requests.get(f"{base}/api/v1/devices/{d['id']}/telemetry/latest",
                                  headers=headers, timeout=10).json()["values"]
            if "temperature" in latest:
                live[d["id"]] = d["attributes"].get("transport")
        if len(live) == 12:
            break
        time.sleep(0.5)
    assert len(live) == 12, live
    assert sorted(set(live.values())) == ["coap", "http", "mqtt"], live
