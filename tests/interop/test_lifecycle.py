"""Process lifecycle: signals, port 0, configuration precedence and config errors."""

import signal
import socket
import subprocess
import time

import pytest

from clients import assert_healthy, unique
from mqtt_raw import PUBACK, RawClient, publish
from stratus_server import clean_env, free_port, stratus_bin


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_exits_0_within_5s(server, sig):
    t0 = time.monotonic()
    rc = server.stop(sig, timeout=5)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit code {rc} after {sig.name}"
    assert elapsed < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_with_connected_clients_exits_0_within_5s(server, clients, sig):
    p = clients.paho(server.mqtt_port, client_id=unique("stay"), clean_session=False)
    p.subscribe("stay/#", 1)
    raw = clients.raw(server.mqtt_port)
    raw.connect(unique("raw-stay"))
    idle = clients.raw(server.mqtt_port)  # TCP only, no CONNECT
    t0 = time.monotonic()
    rc = server.stop(sig, timeout=5)
    assert rc == 0, f"exit code {rc} after {sig.name}"
    assert time.monotonic() - t0 < 5
    assert p.disconnected.wait(3)
    raw.expect_closed(3)
    idle.expect_closed(3)


def test_two_servers_with_port_0_listen_on_distinct_ports(start_server):
    a = start_server("a", start=False)
    b = start_server("b", start=False)
    # start both before waiting for either
    for s in (a, b):
        s.start(wait=())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(
            {"mqtt", "http"} <= set(s.listening()) for s in (a, b)):
        assert a.alive() and b.alive(), a.log() + b.log()
        time.sleep(0.05)
    la, lb = a.listening(), b.listening()
    assert {"mqtt", "http"} <= set(la) and {"mqtt", "http"} <= set(lb), (la, lb)
    ports = [la["mqtt"], la["http"], lb["mqtt"], lb["http"]]
    assert len(set(ports)) == 4 and 0 not in ports, ports
    a.mqtt_port, b.mqtt_port = la["mqtt"], lb["mqtt"]
    for port in (la["http"], lb["http"]):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert_healthy(a)
    assert_healthy(b)


def test_restart_keeps_same_ports(server):
    mqtt, http = server.mqtt_port, server.http_port
    server.restart()
    assert (server.mqtt_port, server.http_port) == (mqtt, http)
    assert_healthy(server)


def run_serve(tmp_path, *args, env=None, config=None, timeout=10):
    """Run `stratus serve` expecting it to exit on its own (config errors)."""
    cmd = [stratus_bin(), "serve", "--data-dir", str(tmp_path / "data"), "--bind", "127.0.0.1",
           "--mqtt-port", "0", "--http-port", "0", "--allow-anonymous", *args]
    if config is not None:
        path = tmp_path / "stratus.toml"
        path.write_text(config)
        cmd += ["--config", str(path)]
    try:
        return subprocess.run(cmd, cwd=tmp_path, env=clean_env(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"stratus kept running with a bad config: {e.stdout} {e.stderr}") from None


def test_unknown_config_file_key_exits_2_naming_the_key(tmp_path):
    res = run_serve(tmp_path, config="[mqtt]\nmax_packet_size = 4096\nfrobnicate_level = 3\n")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "frobnicate_level" in res.stderr, res.stderr


def test_unknown_config_section_exits_2_naming_it(tmp_path):
    res = run_serve(tmp_path, config="[bogus_section]\nx = 1\n")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "bogus_section" in res.stderr, res.stderr


def test_config_file_with_wrong_value_type_exits_2_naming_the_key(tmp_path):
    res = run_serve(tmp_path, config='[mqtt]\nmax_inflight = "lots"\n')
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "max_inflight" in res.stderr, res.stderr


def test_unparsable_config_file_exits_2(tmp_path):
    res = run_serve(tmp_path, config="[mqtt\nmax_inflight = \n")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.strip()


def test_missing_config_file_exits_2(tmp_path):
    res = run_serve(tmp_path, "--config", str(tmp_path / "does-not-exist.toml"))
    assert res.returncode == 2, (res.returncode, res.stderr)


def test_non_numeric_environment_override_exits_2_naming_the_key(tmp_path):
    res = run_serve(tmp_path, env={"STRATUS_MQTT__MAX_PACKET_SIZE": "notanumber"})
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "max_packet_size" in res.stderr.lower(), res.stderr


def test_non_numeric_port_flag_exits_2(tmp_path):
    res = run_serve(tmp_path, "--mqtt-port", "notaport")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "mqtt-port" in res.stderr or "mqtt_port" in res.stderr, res.stderr


def test_environment_overrides_config_file(start_server):
    # file says 1 MiB, environment says 1024: a 2000-byte packet must be refused
    srv = start_server(config="[mqtt]\nmax_packet_size = 1048576\n",
                       env={"STRATUS_MQTT__MAX_PACKET_SIZE": "1024"})
    with RawClient(srv.mqtt_port) as c:
        c.connect(unique("env-wins"))
        c.try_send(publish("prec/t", b"B" * 2000))
        c.expect_closed()
    assert_healthy(srv)


def test_config_file_limit_applies_without_environment(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n")
    with RawClient(srv.mqtt_port) as c:
        c.connect(unique("file"))
        c.try_send(publish("prec/t", b"B" * 2000))
        c.expect_closed()


def test_environment_raising_file_limit_lets_large_packet_through(start_server):
    srv = start_server(config="[mqtt]\nmax_packet_size = 1024\n",
                       env={"STRATUS_MQTT__MAX_PACKET_SIZE": "1048576"})
    with RawClient(srv.mqtt_port) as c:
        c.connect(unique("env-raise"))
        c.send(publish("prec/t", b"B" * 2000, qos=1, pid=1))
        c.expect(PUBACK)


def test_environment_port_used_when_no_flag(start_server):
    port = free_port()
    srv = start_server(mqtt_port=None, env={"STRATUS_MQTT__PORT": str(port)})
    assert srv.mqtt_port == port
    assert_healthy(srv)


def test_port_flag_overrides_environment(start_server):
    env_port, flag_port = free_port(), free_port()
    while flag_port == env_port:
        flag_port = free_port()
    srv = start_server(mqtt_port=flag_port, env={"STRATUS_MQTT__PORT": str(env_port)})
    assert srv.mqtt_port == flag_port
    assert_healthy(srv)

