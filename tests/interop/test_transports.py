"""MQTT over TLS (MQTTS), WebSocket (`/mqtt` on the HTTP listener) and WSS, with real
clients: mosquitto_pub/mosquitto_sub with --cafile/--cert, paho-mqtt's websockets transport,
curl. Certificates are generated per test session with openssl; no key is committed."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mqtt_raw import RawClient, connect


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)


def make_leaf(d: Path, ca: str, name: str, cn: str, ext: str):
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_leaf(d, "ca", "server", "localhost",
              "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
              "extendedKeyUsage=serverAuth\n")
    make_leaf(d, "ca", "client", "sensor-client",
              "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    make_leaf(d, "rogue-ca", "rogue", "intruder",
              "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return d


def tls_config(pki: Path, client_ca=False) -> str:
    cfg = ("[mqtt]\ntls_port = 0\n[http]\ntls_port = 0\n[tls]\n"
           f'cert_file = "{pki / "server.pem"}"\nkey_file = "{pki / "server.key"}"\n')
    if client_ca:
        cfg += f'client_ca_file = "{pki / "ca.pem"}"\n'
    return cfg


TLS_LINES = ("mqtt", "http", "mqtts", "https")


def start_tls(start_server, name, **kw):
    srv = start_server(name, start=False, **kw)
    srv.start(wait=TLS_LINES)
    return srv


@pytest.fixture
def tls_server(start_server, pki):
    srv = start_tls(start_server, "tls", config=tls_config(pki))
    ports = srv.listening()
    srv.mqtts_port, srv.https_port = ports["mqtts"], ports["https"]
    return srv


def mosquitto(tool, port, *args, timeout=10):
    return subprocess.run([tool, "-h", "localhost", "-p", str(port), "-V", "mqttv311", *args],
                          capture_output=True, text=True, timeout=timeout)


def sub_then_pub(sub_port, sub_args, pub_port, pub_args, topic, payload):
    """Starts mosquitto_sub for one message, publishes with mosquitto_pub, returns the sub's output."""
    sub = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(sub_port), "-V", "mqttv311",
                            "-t", topic, "-C", "1", "-W", "8", *sub_args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)
    pub = mosquitto("mosquitto_pub", pub_port, "-t", topic, "-m", payload, "-q", "1", *pub_args)
    out, err = sub.communicate(timeout=10)
    return pub, out, err


@pytest.mark.parametrize("version", ["tlsv1.2", "tlsv1.3"])
def test_mosquitto_round_trip_over_mqtts(tls_server, pki, version):
    ca = ["--cafile", str(pki / "ca.pem"), "--tls-version", version]
    topic = unique("tls/t")
    pub, out, err = sub_then_pub(tls_server.mqtts_port, ca, tls_server.mqtts_port, ca, topic, "secret")
    assert pub.returncode == 0, pub.stderr
    assert out.strip() == "secret", err


def test_mqtts_and_plain_clients_share_topics(tls_server, pki):
    topic = unique("mix/t")
    ca = ["--cafile", str(pki / "ca.pem")]
    pub, out, err = sub_then_pub(tls_server.mqtt_port, [], tls_server.mqtts_port, ca, topic, "from-tls")
    assert pub.returncode == 0, pub.stderr
    assert out.strip() == "from-tls", err


def test_mqtts_rejects_a_client_that_does_not_trust_the_server(tls_server, pki):
    r = mosquitto("mosquitto_pub", tls_server.mqtts_port, "--cafile", str(pki / "rogue-ca.pem"),
                  "-t", "x", "-m", "y")
    assert r.returncode != 0


def test_plain_mqtt_on_the_mqtts_port_is_refused_and_server_survives(tls_server):
    with RawClient(tls_server.mqtts_port) as c:
        c.try_send(connect(unique("plain")))
        c.expect_closed(timeout=12)
    assert tls_server.alive()


def test_client_certificate_authenticates_without_anonymous_access(start_server, pki):
    srv = start_tls(start_server, "mtls", config=tls_config(pki, client_ca=True), anonymous=False)
    port = srv.listening()["mqtts"]
    cert = ["--cafile", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")]
    topic = unique("mtls/t")
    pub, out, err = sub_then_pub(port, cert, port, cert, topic, "by-cert")
    assert pub.returncode == 0, pub.stderr
    assert out.strip() == "by-cert", err
    # Without a certificate (and without anonymous access) the CONNECT is refused.
    r = mosquitto("mosquitto_pub", port, "--cafile", str(pki / "ca.pem"), "-t", topic, "-m", "no")
    assert r.returncode != 0
    assert "not authori" in (r.stderr + r.stdout).lower()


def test_client_certificate_from_an_untrusted_ca_fails_the_handshake(start_server, pki):
    srv = start_tls(start_server, "mtls2", config=tls_config(pki, client_ca=True), anonymous=False)
    port = srv.listening()["mqtts"]
    r = mosquitto("mosquitto_pub", port, "--cafile", str(pki / "ca.pem"), "--cert", str(pki / "rogue.pem"),
                  "--key", str(pki / "rogue.key"), "-t", "x", "-m", "y")
    assert r.returncode != 0
    assert srv.alive()


class WsClient:
    """paho-mqtt 3.1.1 over its websockets transport."""

    def __init__(self, port, tls_ca=None):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("ws"),
                             protocol=mqtt.MQTTv311, transport="websockets")
        self.c.ws_set_options(path="/mqtt")
        if tls_ca:
            self.c.tls_set(ca_certs=str(tls_ca), cert_reqs=ssl.CERT_REQUIRED)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.messages = []
        self.got = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("localhost", port, keepalive=30)
        self.c.loop_start()
        assert self.connected.wait(5), "websocket CONNECT not acknowledged"

    def _on_message(self, c, u, msg):
        self.messages.append((msg.topic, msg.payload))
        self.got.set()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_paho_websockets_round_trip_and_interop_with_tcp(server, clients):
    ws = WsClient(server.http_port)
    try:
        topic = unique("ws/t")
        ws.c.subscribe(topic, qos=1)
        assert ws.subscribed.wait(5)
        tcp = clients.paho(server.mqtt_port)
        tcp.publish(topic, b"over-tcp", qos=1)
        assert ws.got.wait(5), "TCP publish did not reach the WebSocket subscriber"
        assert ws.messages[0] == (topic, b"over-tcp")
        # And the other way round.
        back = unique("ws/back")
        tcp.subscribe(back, 1)
        ws.c.publish(back, b"over-ws", qos=1)
        assert tcp.get().payload == b"over-ws"
    finally:
        ws.close()


def test_paho_websockets_over_tls(tls_server, pki):
    ws = WsClient(tls_server.https_port, tls_ca=pki / "ca.pem")
    try:
        topic = unique("wss/t")
        ws.c.subscribe(topic, qos=0)
        assert ws.subscribed.wait(5)
        r = mosquitto("mosquitto_pub", tls_server.mqtt_port, "-t", topic, "-m", "to-wss")
        assert r.returncode == 0, r.stderr
        assert ws.got.wait(5)
        assert ws.messages[0] == (topic, b"to-wss")
    finally:
        ws.close()


def ws_upgrade(port, protocol_header):
    """Sends a WebSocket upgrade for /mqtt with `protocol_header` (a full header line or "")
    and returns the answer's head, lower-cased."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((f"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                   f"{protocol_header}\r\n").encode())
        return s.recv(4096).decode(errors="replace").lower()


def test_websocket_upgrade_selects_the_mqtt_subprotocol(server):
    head = ws_upgrade(server.http_port, "Sec-WebSocket-Protocol: mqtt\r\n")
    assert head.startswith("http/1.1 101")
    assert "sec-websocket-protocol: mqtt" in head
    head = ws_upgrade(server.http_port, "Sec-WebSocket-Protocol: chat, mqttv3.1\r\n")
    assert head.startswith("http/1.1 101")
    assert "sec-websocket-protocol: mqttv3.1" in head


@pytest.mark.parametrize("header", ["", "Sec-WebSocket-Protocol: chat\r\n"])
def test_websocket_upgrade_without_the_mqtt_subprotocol_is_refused(server, header):
    """MQTT-6.0.0-3: the client offers `mqtt`. Without it the upgrade is refused with 400 (as
    Mosquitto and EMQX refuse it), no 101; paho's websockets transport (which offers `mqtt`)
    keeps working, see test_paho_websockets_round_trip_and_interop_with_tcp."""
    head = ws_upgrade(server.http_port, header)
    assert head.startswith("http/1.1 400"), head
    assert "upgrade: websocket" not in head
    assert "subprotocol mqtt" in head
    assert server.alive()


def test_https_serves_health_with_the_configured_certificate(tls_server, pki):
    r = subprocess.run(["curl", "-sS", "--cacert", str(pki / "ca.pem"),
                        f"https://localhost:{tls_server.https_port}/healthz"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "ok"


def test_missing_certificate_file_is_a_config_error_naming_the_key(start_server, tmp_path):
    cfg = f'[tls]\ncert_file = "{tmp_path / "nope.pem"}"\nkey_file = "{tmp_path / "nope.key"}"\n'
    srv = start_server("badtls", config=cfg, start=False)
    cmd = srv.command(0, 0)
    r = subprocess.run(cmd, cwd=srv.workdir, capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert "tls.cert_file" in r.stderr
