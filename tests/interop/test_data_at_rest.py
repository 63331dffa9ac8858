"""Data at rest: `stratus serve` started under umask 0022 keeps its data dir 0700 and every file
in it 0600 (the database with its WAL and shared-memory files, the keys, the admin secret, the
audit head, firmware images), and a data dir an older start left wider is narrowed at the next
start with a warning on stderr.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import requests

from cloud import ADMIN_SECRET, Cloud
from stratus_server import clean_env, stratus_bin


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes(root) -> dict:
    """Every entry under `root` (itself included) and its permission bits."""
    found = {str(root): mode(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[path] = mode(path)
    return found


def cli(*args):
    res = subprocess.run([stratus_bin(), *map(str, args)], capture_output=True, text=True,
                         timeout=60, env=clean_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture
def loose_umask():
    """The test process (and the servers it starts) under umask 0022."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_everything_in_the_data_dir_is_private_under_a_loose_umask(start_server, tmp_path,
                                                                     loose_umask):
    keys = tmp_path / "keys"
    cli("firmware", "keygen", "--out", keys)
    # No STRATUS_ADMIN_SECRET: the generated secret is written to DATA_DIR/admin-secret.
    srv = start_server("private", anonymous=False,
                       args=["--firmware-pubkey", str(keys / "firmware.pub")])
    secret = (srv.data_dir / "admin-secret").read_text().strip()
    token = requests.post(f"http://127.0.0.1:{srv.http_port}/oauth/token",
                          data={"grant_type": "client_credentials"}, auth=("admin", secret),
                          timeout=10).json()["access_token"]
    cloud = Cloud(srv)
    cloud._admin = {"Authorization": f"Bearer {token}"}
    device, dev_secret = cloud.add_device()
    r = cloud.post(cloud.device_headers(device, dev_secret), {"t": 21.5})
    assert r.status_code == 202, r.text
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(4096))
    cli("firmware", "sign", image, "--key", keys / "firmware.key", "--version", "1.0.0")
    manifest = tmp_path / "fw.bin.manifest.json"
    r = requests.post(cloud.url("/api/v1/firmware"), headers=cloud.admin, timeout=30, files=[
        ("manifest", ("manifest.json", manifest.read_bytes(), "application/json")),
        ("image", ("image.bin", image.read_bytes(), "application/octet-stream"))])
    assert r.status_code == 201, r.text

    data = srv.data_dir
    running = modes(data)  # while the WAL and shared-memory files exist
    for name in ("stratus.db", "stratus.db-wal", "stratus.db-shm", "token.key", "coap-psk.key",
                 "audit.key", "admin-secret", "audit.head"):
        assert str(data / name) in running, f"{name} was not created"
    images = [p for p in (data / "firmware").iterdir() if p.is_file()]
    assert len(images) == 1
    assert srv.stop() == 0
    for path, bits in {**running, **modes(data)}.items():
        if not os.path.exists(path):
            continue  # the WAL and shm files go at a clean shutdown
        want = 0o700 if os.path.isdir(path) else 0o600
        assert bits == want, f"{path} is {bits:04o}, not {want:04o}"
    assert f"data dir {data}" not in srv.log(), "a fresh data dir needs no warning"


def test_a_wide_data_dir_is_narrowed_with_a_warning(start_server, loose_umask):
    srv = start_server("wide", env={"STRATUS_ADMIN_SECRET": ADMIN_SECRET})
    srv.stop()
    data = srv.data_dir
    # As an older version under umask 0022 left it.
    os.chmod(data, 0o755)
    os.chmod(data / "stratus.db", 0o644)
    os.chmod(data / "firmware", 0o755)
    srv.start()
    err = [line for line in srv.log().splitlines() if line.startswith("[err]")]
    assert any(f"data dir {data} was mode 0755, open to other users; changed to 0700" in line
               and "WARN" in line for line in err), "\n".join(err)
    assert any("entries of data dir" in line and str(data / "stratus.db") in line
               and "(0644)" in line for line in err), "\n".join(err)
    assert mode(data) == 0o700
    assert mode(data / "stratus.db") == 0o600
    assert mode(data / "firmware") == 0o700
