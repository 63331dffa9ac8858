"""Failed logins in the audit log, with real clients: bad bearer tokens (requests, curl), bad
OAuth client credentials (requests, curl), bad MQTT passwords and no credentials (paho,
mosquitto_pub), bad CoAP tokens (coap-client). Attempts are aggregated per source address,
claimed identity, endpoint and window (default a minute) and written beside the hash chain
(`audit_failures`), each window's batch committed to by one chain entry (`auth.failures`).

1000 failed logins add a bounded number of rows and count every attempt, including those the
back-off answered (429, CONNACK 0x9F, 4.29). Failure entries past `[audit]
failure_retention_days` are pruned, the prune is recorded in the chain (`audit.prune`), admin
actions stay, and `stratus audit verify` still exits 0; a failure entry changed, deleted or put
back after its prune makes it exit 1.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
import requests

from cloud import ADMIN_SECRET, Cloud, unique
from stratus_server import clean_env, stratus_bin

COLUMNS = "id, batch, ts_ms, actor, action, target, detail"


def cli(*args, timeout=60):
    return subprocess.run([stratus_bin(), *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def verify(data_dir):
    return cli("audit", "verify", "--data-dir", data_dir)


def read(db_path, sql, args=()):
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def failure_rows(srv) -> list[dict]:
    names = [c.strip() for c in COLUMNS.split(",")]
    rows = read(srv.data_dir / "stratus.db", f"SELECT {COLUMNS} FROM audit_failures ORDER BY id")
    out = [dict(zip(names, r)) for r in rows]
    for r in out:
        r["detail"] = json.loads(r["detail"])
    return out


def chain_actions(srv) -> Counter:
    return Counter(a for (a,) in read(srv.data_dir / "stratus.db", "SELECT action FROM audit"))


def replace_failures(db_path, rows: list[dict]):
    """Rewrites the whole failure table, as someone with write access to the file could."""
    names = [c.strip() for c in COLUMNS.split(",")]
    db = sqlite3.connect(db_path)
    with db:
        db.execute("DELETE FROM audit_failures")
        db.executemany(
            f"INSERT INTO audit_failures ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [tuple(json.dumps(r[n], separators=(",", ":"), sort_keys=True, ensure_ascii=False)
                   if n == "detail" else r[n] for n in names) for r in rows])
    db.close()


def coap_client():
    path = shutil.which("coap-client-notls")
    if path is None:
        pytest.skip("coap-client-notls (libcoap3-bin) is not installed")
    return path


def paho_refused(port, username=None, password=None) -> bool:
    """One paho CONNECT; True when the server refused it."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("c"),
                    protocol=mqtt.MQTTv311)
    if username is not None:
        c.username_pw_set(username, password)
    got = {}
    c.on_connect = lambda cl, u, flags, reason, props: got.setdefault("reason", reason)
    try:
        c.connect("127.0.0.1", port, keepalive=10)
        deadline = time.monotonic() + 5
        while "reason" not in got and time.monotonic() < deadline:
            c.loop(timeout=0.05)
    finally:
        c.disconnect()
        c.loop(timeout=0.01)
    return "reason" in got and got["reason"].is_failure


# ---- 1000 failed logins -----------------------------------------------------------------------

# (how many, client, claimed identity, endpoint, transport)
PLAN = [
    (300, "requests bearer", None, "api", "http"),
    (100, "curl bearer", None, "api", "http"),
    (100, "requests basic", "mallory", "oauth/token", "oauth"),
    (100, "curl basic", "eve", "oauth/token", "oauth"),
    (200, "paho password", "mallory", "mqtt", "mqtt"),
    (50, "paho anonymous", None, "mqtt", "mqtt"),
    (50, "mosquitto_pub password", "nobody", "mqtt", "mqtt"),
    (100, "coap-client token", None, "coap", "coap"),
]


def fail(srv, client: str, n: int) -> list:
    """`n` failed logins with `client`; returns the status of each."""
    api = f"http://127.0.0.1:{srv.http_port}/api/v1/devices"
    token = f"http://127.0.0.1:{srv.http_port}/oauth/token"
    if client == "requests bearer":
        with requests.Session() as s:
            return [s.get(api, headers={"Authorization": f"Bearer bad-{i}"}, timeout=10).status_code
                    for i in range(n)]
    if client == "curl bearer":
        # One curl process, n requests on one connection.
        out = subprocess.run(["curl", "-s", "-w", "%{http_code}\\n",
                              "-H", "Authorization: Bearer junk", *["-o", "/dev/null", api] * n],
                             capture_output=True, text=True, timeout=60, check=True)
        return [int(c) for c in out.stdout.split()]
    if client == "requests basic":
        with requests.Session() as s:
            return [s.post(token, data={"grant_type": "client_credentials"},
                           auth=("mallory", f"guess-{i}"), timeout=10).status_code
                    for i in range(n)]
    if client == "curl basic":
        out = subprocess.run(["curl", "-s", "-w", "%{http_code}\\n",
                              "-u", "eve:wrong", "-d", "grant_type=client_credentials",
                              *["-o", "/dev/null", token] * n],
                             capture_output=True, text=True, timeout=60, check=True)
        return [int(c) for c in out.stdout.split()]
    if client == "paho password":
        return [paho_refused(srv.mqtt_port, "mallory", f"guess-{i}") for i in range(n)]
    if client == "paho anonymous":
        return [paho_refused(srv.mqtt_port) for _ in range(n)]
    if client == "mosquitto_pub password":
        return [subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(srv.mqtt_port),
                                "-V", "mqttv311", "-u", "nobody", "-P", "x", "-t", "t", "-m", "m"],
                               capture_output=True, text=True, timeout=10,
                               stdin=subprocess.DEVNULL).returncode
                for _ in range(n)]
    if client == "coap-client token":
        outs = []
        for i in range(n):
            url = f"coap://127.0.0.1:{srv.coap_port}/telemetry?token=bad{i}"
            out = subprocess.run([coap_client(), "-m", "post", "-e", '{"t":1}', "-v", "6", url],
                                 capture_output=True, text=True, timeout=20)
            outs.append(out.stdout + out.stderr)
        return outs
    raise AssertionError(client)


@pytest.mark.parametrize("backoff", [True, False], ids=["backoff", "no-backoff"])
def test_1000_failed_logins_add_a_bounded_number_of_audit_rows(start_server, backoff):
    """The default window (a minute): every attempt is counted, in one entry per (source,
    identity, endpoint, minute). With the default back-off most attempts are answered 429 /
    0x9F / 4.29 and counted as `throttled`; without it every one is checked and refused."""
    coap_client()
    env = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET}
    if not backoff:
        env["STRATUS_AUTH__THROTTLE__FREE_FAILURES"] = "100000"
    srv = start_server("fail1000", env=env, anonymous=False)
    cloud = Cloud(srv)
    admin = cloud.admin  # a valid token is never held back by the back-off
    started = time.monotonic()
    for n, client, _, _, _ in PLAN:
        answers = fail(srv, client, n)
        assert len(answers) == n, (client, answers)
        if client.startswith(("requests", "curl")):
            assert set(answers) <= ({401, 429} if backoff else {401}), (client, Counter(answers))
        elif client.startswith("paho"):
            assert all(answers), client
        elif client.startswith("mosquitto"):
            assert all(rc != 0 for rc in answers), client
        else:
            codes = ("4.01", "4.29") if backoff else ("4.01",)
            assert all(any(c in out for c in codes) for out in answers), answers[:3]
    elapsed = time.monotonic() - started
    total = sum(n for n, *_ in PLAN)
    assert total == 1000
    # Nothing reaches the store before the window ends (a minute) or the server stops.
    r = requests.get(cloud.url("/api/v1/audit?limit=1000"), headers=admin, timeout=10)
    assert r.status_code == 200 and "auth.failure\"" not in r.text
    assert srv.stop() == 0

    rows = failure_rows(srv)
    keys = {(identity or "anonymous", target) for _, _, identity, target, _ in PLAN}
    assert {(r["actor"], r["target"]) for r in rows} == keys
    windows = 1 + int(elapsed // 60) + 1  # the windows the attempts could span
    assert len(rows) <= len(keys) * windows, (len(rows), elapsed)
    assert sum(r["detail"]["count"] for r in rows) == total, "every attempt is counted once"
    per_transport = Counter()
    for r in rows:
        per_transport[r["detail"]["transport"]] += r["detail"]["count"]
        assert r["action"] == "auth.failure"
        assert r["detail"]["source"] == "127.0.0.1"
        assert r["detail"]["reason"], r
        assert r["detail"]["first"] <= r["detail"]["last"]
    want = Counter()
    for n, _, _, _, transport in PLAN:
        want[transport] += n
    assert per_transport == want
    throttled = sum(r["detail"]["throttled"] for r in rows)
    assert (throttled > 0) == backoff, throttled
    actions = chain_actions(srv)
    assert "auth.failure" not in actions
    assert 1 <= actions["auth.failures"] <= windows
    batches = {r["batch"] for r in rows}
    assert len(batches) == actions["auth.failures"]
    print(f"\n1000 failed logins ({throttled} throttled) in {elapsed:.1f} s: {len(rows)} failure entries, "
          f"{actions['auth.failures']} chain entr{'y' if actions['auth.failures'] == 1 else 'ies'}"
          f" (auth.failures); chain {sum(actions.values())} entries in all")
    out = verify(srv.data_dir)
    assert out.returncode == 0, out.stdout + out.stderr

    # Listed over HTTP, paged by id.
    srv.start()
    seen, start = [], 1
    while True:
        r = requests.get(cloud.url(f"/api/v1/audit/failures?from={start}&limit=3"),
                         headers=admin, timeout=10)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += page["entries"]
        if page["next"] is None:
            break
        start = page["next"]
    assert [e["id"] for e in seen] == [r["id"] for r in rows]
    assert seen[0]["action"] == "auth.failure" and seen[0]["at"].endswith("Z")
    r = requests.get(cloud.url("/api/v1/audit/failures"), timeout=10)
    assert r.status_code == 401
    r = requests.get(cloud.url("/api/v1/audit/verify"), headers=admin, timeout=10)
    assert r.json()["intact"] is True, r.text


# ---- retention ------------------------------------------------------------------------------

RETENTION_SECS = 3


def test_failure_entries_past_the_retention_are_pruned_and_the_log_still_verifies(start_server):
    srv = start_server("retention", anonymous=False, env={
        "STRATUS_ADMIN_SECRET": ADMIN_SECRET,
        "STRATUS_AUDIT__FAILURE_WINDOW_SECS": "1",
        "STRATUS_AUDIT__FAILURE_RETENTION_DAYS": f"{RETENTION_SECS / 86400:.9f}",
    })
    cloud = Cloud(srv)
    cloud.add_device("before")
    with requests.Session() as s:
        for i in range(20):
            s.get(cloud.url("/api/v1/devices"), headers={"Authorization": f"Bearer no-{i}"},
                  timeout=10)
    assert paho_refused(srv.mqtt_port, "mallory", "guess")
    cloud.add_device("after")
    # Written within a window or so; kept while younger than the retention.
    deadline = time.monotonic() + 10
    written = []
    while not written and time.monotonic() < deadline:
        written = failure_rows(srv)
        time.sleep(0.05)
    assert {(r["actor"], r["target"]) for r in written} >= {("anonymous", "api"),
                                                             ("mallory", "mqtt")}
    deadline = time.monotonic() + 15
    while failure_rows(srv) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert failure_rows(srv) == []
    r = requests.get(cloud.url("/api/v1/audit?limit=1000"), headers=cloud.admin, timeout=10)
    entries = r.json()["entries"]
    actions = [e["action"] for e in entries]
    assert actions.count("device.create") == 2, "admin actions stay"
    prunes = [e for e in entries if e["action"] == "audit.prune"]
    assert prunes and prunes[0]["actor"] == "system"
    assert sum(p["detail"]["entries"] for p in prunes) == len(written)
    assert "pruned" in srv.log()
    r = requests.get(cloud.url("/api/v1/audit/verify"), headers=cloud.admin, timeout=10)
    assert r.json()["intact"] is True, r.text
    assert srv.stop() == 0
    out = verify(srv.data_dir)
    assert out.returncode == 0, out.stdout + out.stderr

    # Pruned entries put back are not taken for live ones.
    db = srv.data_dir / "stratus.db"
    replace_failures(db, written)
    out = verify(srv.data_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "they were forged or put back" in out.stdout, out.stdout
    replace_failures(db, [])
    assert verify(srv.data_dir).returncode == 0


def test_a_changed_or_deleted_failure_entry_is_caught(start_server):
    srv = start_server("tamper", anonymous=False, env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    for who in ("alice", "bob", "carol"):
        for _ in range(3):
            assert paho_refused(srv.mqtt_port, who, "wrong")
    assert srv.stop() == 0
    db = srv.data_dir / "stratus.db"
    rows = failure_rows(srv)
    assert sorted(r["actor"] for r in rows) == ["alice", "bob", "carol"]
    assert {r["detail"]["count"] for r in rows} == {3}
    batch = rows[0]["batch"]
    assert verify(srv.data_dir).returncode == 0

    # Fewer attempts than were made.
    edited = [dict(r, detail=dict(r["detail"])) for r in rows]
    edited[1]["detail"]["count"] = 1
    replace_failures(db, edited)
    out = verify(srv.data_dir)
    assert out.returncode == 1
    assert out.stdout.strip() == (
        f"audit log broken at entry {batch}: its failure entries do not match the digest it "
        "records: one was changed, added, removed or reordered"), out.stdout
    # One entry deleted, then all of them.
    replace_failures(db, rows[:1] + rows[2:])
    assert verify(srv.data_dir).returncode == 1
    replace_failures(db, [])
    out = verify(srv.data_dir)
    assert out.returncode == 1
    assert "gone, and no audit.prune entry covers it" in out.stdout, out.stdout
    # Put back as they were.
    replace_failures(db, rows)
    out = verify(srv.data_dir)
    assert out.returncode == 0, out.stdout + out.stderr
