"""Fixtures for the MQTT 3.1.1 interop suite.

Every test gets its own `stratus serve` process on OS-picked ports with a
private data dir; the server log is attached to the report of a failed test.
The binary comes from $STRATUS_BIN (see README.md).
"""

from __future__ import annotations

import pytest

from clients import MosquittoSub, PahoClient
from mqtt_raw import RawClient
from stratus_server import Server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in getattr(item, "_stratus_servers", []):
            report.sections.append((f"stratus log: {srv.name}", srv.log() or "(empty)"))


@pytest.fixture
def start_server(tmp_path, request):
    """Factory: start_server(args=(), env=None, config=None, anonymous=True, ...) -> Server."""
    servers = []
    request.node._stratus_servers = servers

    def factory(name=None, start=True, **kw):
        srv = Server(tmp_path, name or f"server{len(servers)}", **kw)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    problems = []
    for srv in servers:
        problems += srv.problems()  # before stop(): a crash must not look like a clean stop
        srv.stop()
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture
def server(start_server):
    """A default server: anonymous allowed, ports picked by the OS."""
    return start_server("main")


@pytest.fixture
def clients():
    """Makes paho, raw-socket and mosquitto_sub clients; all are closed at teardown."""
    made = []

    class Factory:
        def paho(self, port, connect=True, **kw):
            c = PahoClient(port, **kw)
            made.append(c)
            if connect:
                c.connect()
            return c

        def raw(self, port, **kw):
            c = RawClient(port, **kw)
            made.append(c)
            return c

        def mosq_sub(self, port, topics, wait=True, **kw):
            c = MosquittoSub(port, topics, **kw)
            made.append(c)
            if wait:
                c.wait_subscribed()
            return c

    yield Factory()
    for c in made:
        try:
            c.close()
        except Exception:
            pass
