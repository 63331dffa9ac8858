"""The audit log against an adversary who can write `stratus.db` but not read `audit.key`:
`stratus audit verify` must exit 1, naming the first bad seq or the cut, when an entry is
dropped and the documented chain recomputed, when an entry is edited, when the last entries
are deleted (caught by the head the server exports to `audit.head`, or by a head kept
elsewhere once `audit.head` is gone too); an untouched log exits 0. Also: the head printed by
`stratus audit head` and logged by the server, a replaced head file, a log written before the
chain was keyed, and the running server's own verification after a cut.

The chain (crates/stratus-store/src/audit.rs): E(tag) = tag || f(seq) || f(ts_ms) || f(actor)
|| f(action) || f(target) || f(detail) || f(prev_hash), f(x) = len(x) as u64 BE || x; unkeyed
entries hash = SHA-256(E("stratus-audit-v1")), keyed ones HMAC-SHA-256(key, E("stratus-audit-v2")).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shutil
import sqlite3
import stat
import struct
import subprocess
import time

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from stratus_server import clean_env, stratus_bin

GENESIS = "0" * 64
COLUMNS = "seq, ts_ms, actor, action, target, detail, prev_hash, hash"


def cli(*args, timeout=60):
    return subprocess.run([stratus_bin(), *map(str, args)], capture_output=True, text=True,
                          env=clean_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def encode(tag: bytes, row: dict) -> bytes:
    out = tag
    for field in (str(row["seq"]), str(row["ts_ms"]), row["actor"], row["action"], row["target"],
                  row["detail"], row["prev_hash"]):
        data = field.encode()
        out += struct.pack(">Q", len(data)) + data
    return out


def unkeyed(row: dict) -> str:
    return hashlib.sha256(encode(b"stratus-audit-v1", row)).hexdigest()


def keyed(key: bytes, row: dict) -> str:
    return hmac.new(key, encode(b"stratus-audit-v2", row), hashlib.sha256).hexdigest()


def rows(db_path) -> list[dict]:
    with sqlite3.connect(db_path) as db:
        cur = db.execute(f"SELECT {COLUMNS} FROM audit ORDER BY seq")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def replace(db_path, new_rows: list[dict]):
    """Rewrites the whole audit table, as someone with write access to the file could."""
    db = sqlite3.connect(db_path)
    with db:
        db.execute("DELETE FROM audit")
        db.executemany(f"INSERT INTO audit ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [tuple(r[c.strip()] for c in COLUMNS.split(",")) for r in new_rows])
    db.close()


def rechain(log: list[dict], start: int, rule) -> list[dict]:
    """Renumbers `log` and recomputes every hash from index `start` on with `rule`."""
    out = [dict(r) for r in log]
    for i in range(start, len(out)):
        out[i]["seq"] = i + 1
        out[i]["prev_hash"] = out[i - 1]["hash"] if i else GENESIS
        out[i]["hash"] = rule(out[i])
    return out


def verify(data_dir, *extra):
    return cli("audit", "verify", "--data-dir", data_dir, *extra)


def make_entries(srv) -> int:
    cloud = Cloud(srv)
    for i in range(3):
        cloud.add_device(f"aud-{i}")
    r = requests.put(cloud.url("/api/v1/devices/aud-0/config"), json={"x": 1},
                     headers=cloud.admin, timeout=10)
    assert r.status_code in (200, 201), r.text
    r = requests.delete(cloud.url("/api/v1/devices/aud-2"), headers=cloud.admin, timeout=10)
    assert r.status_code == 204, r.text
    r = requests.get(cloud.url("/api/v1/audit?limit=1000"), headers=cloud.admin, timeout=10)
    return len(r.json()["entries"])


@pytest.fixture
def stopped(start_server):
    """A server that wrote some audit entries and was stopped (its head exported at shutdown)."""
    srv = start_server("audit", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    n = make_entries(srv)
    assert n >= 5
    assert srv.stop() == 0
    return srv, n


def test_an_untouched_log_verifies_and_its_head_is_exported(stopped, tmp_path):
    srv, n = stopped
    data = srv.data_dir
    out = verify(data)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"audit log intact: {n} entries"

    log = rows(data / "stratus.db")
    head = f"{n}:{log[-1]['hash']}"
    out = cli("audit", "head", "--data-dir", data)
    assert out.returncode == 0 and out.stdout.strip() == head
    # The server wrote it to audit.head (MACed) and logged it at shutdown.
    head_file = (data / "audit.head").read_text().splitlines()
    assert head_file[0] == head and re.fullmatch(r"hmac-sha256 [0-9a-f]{64}", head_file[1])
    assert f"audit head {head}" in srv.log()

    # The key is outside the database; every entry is its MAC.
    key_bytes = (data / "audit.key").read_bytes()
    assert len(key_bytes) == 40 and struct.unpack(">Q", key_bytes[32:])[0] == 1
    assert all(r["hash"] == keyed(key_bytes[:32], r) for r in log)
    assert stat.S_IMODE(os.stat(data / "audit.key").st_mode) == 0o600

    # Heads kept elsewhere: given directly, or in a file (an operator's note or a copy).
    assert verify(data, "--head", head).returncode == 0
    assert verify(data, "--head", f"2:{log[1]['hash']}").returncode == 0
    note = tmp_path / "kept-head"
    note.write_text(head + "\n")
    copy = tmp_path / "audit.head.copy"
    shutil.copy(data / "audit.head", copy)
    assert verify(data, "--head-file", note, "--head-file", copy).returncode == 0
    # The key may live elsewhere.
    key_copy = tmp_path / "audit.key"
    shutil.copy(data / "audit.key", key_copy)
    out = verify(data, "--key", key_copy, "--json")
    assert out.returncode == 0
    assert '"head": "' + head + '"' in out.stdout


def test_dropping_an_entry_and_recomputing_the_documented_chain_is_detected(stopped):
    srv, n = stopped
    db = srv.data_dir / "stratus.db"
    log = rows(db)
    del log[2]  # seq 3 goes; 4.. are renumbered and re-chained
    replace(db, rechain(log, 2, unkeyed))
    out = verify(srv.data_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.strip() == (
        "audit log broken at entry 3: its hash follows the unkeyed SHA-256 rule where the keyed "
        "one is required: the chain was recomputed without the key")

    # Recomputed with the keyed rule under a key the adversary made up.
    guess = os.urandom(32)
    replace(db, rechain(log, 2, lambda r: keyed(guess, r)))
    out = verify(srv.data_dir)
    assert out.returncode == 1
    assert out.stdout.strip() == "audit log broken at entry 3: content does not match its hash"

    # The whole log recomputed, head file and all, without the key: still caught at entry 1.
    replace(db, rechain(log, 0, unkeyed))
    out = verify(srv.data_dir)
    assert out.returncode == 1 and out.stdout.startswith("audit log broken at entry 1: ")


def test_an_edited_entry_is_named(stopped):
    srv, n = stopped
    db = srv.data_dir / "stratus.db"
    log = rows(db)
    log[3]["actor"] = "mallory"
    replace(db, log)
    out = verify(srv.data_dir, "--json")
    assert out.returncode == 1
    assert '"broken_at": 4' in out.stdout and "content does not match its hash" in out.stdout
    # Edited and its own hash recomputed: the next link names it.
    log[3]["hash"] = unkeyed(log[3])
    replace(db, log)
    out = verify(srv.data_dir)
    assert out.returncode == 1
    assert out.stdout.strip().startswith("audit log broken at entry 4: its hash follows the unkeyed")


def test_a_cut_tail_is_detected_by_the_exported_head(stopped, tmp_path):
    srv, n = stopped
    data = srv.data_dir
    db = data / "stratus.db"
    log = rows(db)
    kept = f"{n}:{log[-1]['hash']}"  # what an operator noted with `stratus audit head`
    replace(db, log[:-2])
    out = verify(data)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.strip() == (
        f"audit log broken at entry {n - 1}: the log ends at seq {n - 2} but the head says {n}: "
        f"entries were cut (head from {data / 'audit.head'})")
    out = cli("audit", "head", "--data-dir", data)
    assert out.returncode == 1 and "entries were cut" in out.stdout

    # Whoever can delete audit.head too defeats the data dir alone (the chain that is left is
    # intact) but not a head kept elsewhere.
    (data / "audit.head").unlink()
    assert verify(data).returncode == 0
    out = verify(data, "--head", kept)
    assert out.returncode == 1
    assert out.stdout.strip() == (
        f"audit log broken at entry {n - 1}: the log ends at seq {n - 2} but the head says {n}: "
        "entries were cut (head from --head)")
    note = tmp_path / "noted"
    note.write_text(kept + "\n")
    out = verify(data, "--head-file", note)
    assert out.returncode == 1 and f"(head from {note})" in out.stdout


def test_a_replaced_head_file_does_not_verify(stopped):
    srv, n = stopped
    data = srv.data_dir
    db = data / "stratus.db"
    log = rows(db)
    # Cut two entries and put the older head in audit.head, reusing the old MAC line.
    replace(db, log[:-2])
    lines = (data / "audit.head").read_text().splitlines()
    (data / "audit.head").write_text(f"{n - 2}:{log[n - 3]['hash']}\n{lines[1]}\n")
    out = verify(data)
    assert out.returncode == 1
    assert "audit.head: the head's MAC does not verify under the audit key" in out.stdout
    # Without a MAC line it is not accepted from the data dir either.
    (data / "audit.head").write_text(f"{n - 2}:{log[n - 3]['hash']}\n")
    assert verify(data).returncode == 1


def test_usage_errors_exit_2(stopped, tmp_path):
    srv, _ = stopped
    data = srv.data_dir
    out = verify(data, "--head", "12")
    assert out.returncode == 2 and "SEQ:HASH" in out.stderr
    out = verify(data, "--key", tmp_path / "none")
    assert out.returncode == 2 and "no audit key" in out.stderr
    out = verify(tmp_path / "missing")
    assert out.returncode == 2
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 12)
    out = verify(data, "--key", short)
    assert out.returncode == 2 and "32 or 40 bytes" in out.stderr
    for args in (["audit", "verify", "--help"], ["audit", "head", "--help"]):
        out = cli(*args)
        assert out.returncode == 0 and "--key" in out.stdout


def test_a_log_from_before_keying_stays_verifiable(start_server):
    srv = start_server("legacy", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    make_entries(srv)
    srv.stop()
    data = srv.data_dir
    db = data / "stratus.db"
    # Make it look like a data dir of a version without keying: an unkeyed chain, no key.
    old = rechain(rows(db), 0, unkeyed)
    replace(db, old)
    (data / "audit.key").unlink()
    (data / "audit.head").unlink()

    srv.start()
    assert f"the audit log is keyed from seq {len(old) + 1}" in srv.log()
    cloud = Cloud(srv)
    cloud.add_device("after-keying")
    srv.stop()
    key_bytes = (data / "audit.key").read_bytes()
    assert struct.unpack(">Q", key_bytes[32:])[0] == len(old) + 1
    log = rows(db)
    assert log[:len(old)] == old, "older entries are kept as they were"
    assert all(r["hash"] == keyed(key_bytes[:32], r) for r in log[len(old):])
    out = verify(data)
    assert out.returncode == 0 and out.stdout.strip() == f"audit log intact: {len(log)} entries"

    # Recomputing the newer entries with the unkeyed rule is caught where the key begins.
    replace(db, rechain(log, len(old), unkeyed))
    out = verify(data)
    assert out.returncode == 1
    assert out.stdout.startswith(f"audit log broken at entry {len(old) + 1}: its hash follows "
                                 "the unkeyed SHA-256 rule")


def test_the_running_server_holds_the_log_to_its_last_head(start_server):
    srv = start_server("live", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET},
                       config="[audit]\nhead_interval_secs = 1\n")
    n = make_entries(srv)
    cloud = Cloud(srv)
    deadline = time.monotonic() + 10
    while f"audit head {n}:" not in srv.log():
        assert time.monotonic() < deadline, "no head exported within 10 s"
        time.sleep(0.1)
    r = requests.get(cloud.url("/api/v1/audit/verify"), headers=cloud.admin, timeout=10)
    assert r.json()["intact"] is True and r.json()["head"].startswith(f"{n}:")
    # Cut the last entry behind the running server's back.
    with sqlite3.connect(srv.data_dir / "stratus.db", timeout=10) as db:
        db.execute("DELETE FROM audit WHERE seq = ?", (n,))
    r = requests.get(cloud.url("/api/v1/audit/verify"), headers=cloud.admin, timeout=10)
    body = r.json()
    assert body["intact"] is False and body["broken_at"] == n
    assert body["reason"] == f"the log ends at seq {n - 1} but the head says {n}: entries were cut"
    deadline = time.monotonic() + 10
    while "the audit log does not verify" not in srv.log():
        assert time.monotonic() < deadline, "the server did not log the cut"
        time.sleep(0.1)
