"""TLS for users without a PKI and the plaintext policy (issue #19 point 7): `stratus tls init`
makes a local CA and a server certificate wired into the configuration, after which
`stratus serve --config FILE` serves MQTTS and HTTPS that stock clients trust with `ca.pem`
(mosquitto --cafile, curl --cacert, openssl verify), HSTS on HTTPS; and
`[tls] require_encryption`, under which the plain listeners (MQTT, HTTP/WebSocket, CoAP) bind
loopback only while the TLS listeners (MQTTS, HTTPS/WSS, CoAPS) bind the configured address."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import uuid

import pytest
import requests

from cloud import ADMIN_SECRET
from stratus_server import clean_env, stratus_bin


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def tls_init(tmp_path, *extra, names="localhost,127.0.0.1"):
    out = subprocess.run([stratus_bin(), "tls", "init", "--names", names, "--out", str(tmp_path / "tls"),
                          "--config", str(tmp_path / "stratus.toml"), *extra],
                         capture_output=True, text=True, timeout=30, env=clean_env(), cwd=tmp_path)
    return out


TLS_ENV = {"STRATUS_ADMIN_SECRET": ADMIN_SECRET, "STRATUS_MQTT__TLS_PORT": "0", "STRATUS_HTTP__TLS_PORT": "0"}


@pytest.fixture
def initialised(tmp_path):
    out = tls_init(tmp_path)
    assert out.returncode == 0, out.stderr
    return tmp_path, tmp_path / "tls"


def test_tls_init_writes_a_ca_and_a_server_certificate_that_openssl_verifies(initialised):
    tmp, d = initialised
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (d / name).is_file(), name
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE(os.stat(d / key).st_mode) == 0o600, key
    v = subprocess.run(["openssl", "verify", "-CAfile", "ca.pem", "server.pem"], cwd=d,
                       capture_output=True, text=True, timeout=10)
    assert v.returncode == 0 and v.stdout.strip() == "server.pem: OK", v.stdout + v.stderr
    text = subprocess.run(["openssl", "x509", "-in", "server.pem", "-noout", "-text"], cwd=d,
                          capture_output=True, text=True, timeout=10).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text, text
    assert "TLS Web Server Authentication" in text
    ca = subprocess.run(["openssl", "x509", "-in", "ca.pem", "-noout", "-text"], cwd=d,
                        capture_output=True, text=True, timeout=10).stdout
    assert "CA:TRUE" in ca and "Certificate Sign" in ca
    cfg = (tmp / "stratus.toml").read_text()
    assert f'cert_file = "{d / "server.pem"}"' in cfg and f'key_file = "{d / "server.key"}"' in cfg
    # A second run for other names keeps the CA, so what clients trust stays valid.
    before = (d / "ca.pem").read_bytes()
    again = tls_init(tmp, names="iot.example.lan,10.1.2.3")
    assert again.returncode == 0, again.stderr
    assert "reused" in again.stdout
    assert (d / "ca.pem").read_bytes() == before
    v = subprocess.run(["openssl", "verify", "-CAfile", "ca.pem", "server.pem"], cwd=d,
                       capture_output=True, text=True, timeout=10)
    assert v.returncode == 0, v.stdout + v.stderr
    bad = tls_init(tmp, names="not a name")
    assert bad.returncode == 2 and "--names" in bad.stderr


def test_after_tls_init_serve_speaks_mqtts_and_https_with_hsts(start_server, initialised):
    tmp, d = initialised
    ca = str(d / "ca.pem")
    # Nothing but the file tls init wrote (and ports 0 for the test) configures TLS.
    srv = start_server("tlsinit", args=["--config", str(tmp / "stratus.toml")], env=TLS_ENV, start=False)
    srv.start(wait=("mqtt", "http", "mqtts", "https"))
    ports = srv.listening()
    topic = unique("tlsinit/t")
    sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(ports["mqtts"]), "--cafile", ca,
                            "-t", topic, "-C", "1", "-W", "8"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    pub = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(ports["mqtts"]), "--cafile", ca,
                          "-t", topic, "-m", "over-mqtts", "-q", "1"], capture_output=True, text=True, timeout=10)
    out, err = sub.communicate(timeout=10)
    assert pub.returncode == 0, pub.stderr
    assert out.strip() == "over-mqtts", err
    for host in ("localhost", "127.0.0.1"):
        r = subprocess.run(["curl", "-sS", "--cacert", ca, "-D", "-", f"https://{host}:{ports['https']}/healthz"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        head = r.stdout.lower()
        assert head.startswith("http/1.1 200"), r.stdout
        assert "strict-transport-security: max-age=31536000" in head, r.stdout
    # Plain HTTP carries no HSTS (RFC 6797 §7.2).
    plain = requests.get(f"http://127.0.0.1:{ports['http']}/healthz", timeout=10)
    assert "strict-transport-security" not in {k.lower() for k in plain.headers}
    # Without the CA, curl refuses the server: the trust really comes from ca.pem.
    r = subprocess.run(["curl", "-sS", f"https://localhost:{ports['https']}/healthz"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode != 0


def lan_address():
    """A non-loopback IPv4 address of this host, or None."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_require_encryption_keeps_plain_listeners_on_loopback(start_server, tmp_path):
    out = tls_init(tmp_path, "--require-encryption")
    assert out.returncode == 0, out.stderr
    assert "require_encryption = true" in (tmp_path / "stratus.toml").read_text()
    from stratus_server import Server

    class Everywhere(Server):
        def command(self, mqtt_port, http_port):
            cmd = super().command(mqtt_port, http_port)
            cmd[cmd.index("--bind") + 1] = "0.0.0.0"
            return cmd

    srv = start_server("enc", args=["--config", str(tmp_path / "stratus.toml")],
                       env={**TLS_ENV, "STRATUS_COAP__DTLS_PORT": "0"}, start=False)
    srv.__class__ = Everywhere
    srv.start(wait=("mqtt", "http", "coap", "mqtts", "https", "coaps"))
    lines = {}
    for line in srv.log().splitlines():
        if line.startswith("[out] listening "):
            _, name, addr = line[len("[out] "):].split()
            lines[name] = addr
    for plain in ("mqtt", "http", "ws", "coap"):
        assert lines[plain].startswith("127.0.0.1:"), lines
    for secure in ("mqtts", "https", "coaps"):
        assert lines[secure].startswith("0.0.0.0:"), lines
    ports = srv.listening()
    # This host still uses the plain listeners (tools, the CLI, a local bridge).
    r = requests.get(f"http://127.0.0.1:{ports['http']}/healthz", timeout=10)
    assert r.status_code == 200
    lan = lan_address()
    if lan is None:
        pytest.skip("no non-loopback address to connect from")
    # From a non-loopback address the plain listeners are not there; the TLS ones are.
    for name in ("mqtt", "http"):
        with pytest.raises(OSError):
            socket.create_connection((lan, ports[name]), timeout=3).close()
    for name in ("mqtts", "https"):
        socket.create_connection((lan, ports[name]), timeout=3).close()
    r = requests.get(f"https://{lan}:{ports['https']}/healthz", verify=False, timeout=10)
    assert r.status_code == 200 and r.headers.get("Strict-Transport-Security") == "max-age=31536000"
    # A plain CoAP request from the LAN address gets nothing back.
    coap_get = bytes([0x40, 0x01, 0x12, 0x34, 0xBB]) + b".well-known" + bytes([0x04]) + b"core"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(coap_get, (lan, ports["coap"]))
        with pytest.raises(OSError):  # ICMP port unreachable, or silence
            s.recvfrom(1500)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the same on loopback is answered
        s.settimeout(5)
        s.sendto(coap_get, ("127.0.0.1", ports["coap"]))
        assert s.recvfrom(1500)[0][1] == 0x45
    assert srv.alive()


def test_require_encryption_without_a_certificate_is_a_config_error(start_server):
    srv = start_server("encbad", config="[tls]\nrequire_encryption = true\n", start=False)
    r = subprocess.run(srv.command(0, 0), cwd=srv.workdir, capture_output=True, text=True, timeout=20,
                       env=clean_env())
    assert r.returncode == 2
    assert "tls.require_encryption" in r.stderr
