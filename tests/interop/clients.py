"""Real MQTT clients used by the suite: paho-mqtt 2.x (v3.1.1) and the
mosquitto_pub / mosquitto_sub command-line tools, plus a broker health check."""

from __future__ import annotations

import itertools
import os
import queue
import re
import signal
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

from mqtt_raw import PUBACK, PUBLISH, RawClient, puback, publish

HOST = "127.0.0.1"
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


# --------------------------------------------------------------------------- paho


class PahoClient:
    """A paho-mqtt 2.x client speaking MQTT 3.1.1 that never reconnects by itself
    and exposes what arrived through thread-safe queues and events."""

    def __init__(self, port, client_id="", clean_session=True, keepalive=60, will=None,
                 username=None, password=None):
        self.port = port
        self.keepalive = keepalive
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if will is not None:
            topic, payload, qos, retain = will
            self.c.will_set(topic, payload, qos=qos, retain=retain)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.messages: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_flags = None
        self.connect_rc = None
        self.disconnect_rc = None
        self._subacks = {}
        self._suback_cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self._loop_started = False

    # callbacks (paho network thread)
    def _on_connect(self, client, userdata, flags, rc, props):
        self.connect_flags = flags
        self.connect_rc = rc
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, rc, props):
        self.disconnect_rc = rc
        self.disconnected.set()

    def _on_message(self, client, userdata, msg):
        self.messages.put(msg)

    def _on_subscribe(self, client, userdata, mid, rcs, props):
        with self._suback_cond:
            self._subacks[mid] = [r.value for r in rcs]
            self._suback_cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, rcs, props):
        with self._suback_cond:
            self._subacks[mid] = "unsuback"
            self._suback_cond.notify_all()

    # API
    def connect(self, timeout=5.0, expect_success=True):
        self.c.connect(HOST, self.port, keepalive=self.keepalive)
        self.c.loop_start()
        self._loop_started = True
        assert self.connected.wait(timeout) or self.disconnected.is_set(), "no CONNACK from broker"
        if expect_success:
            assert self.connect_rc is not None and self.connect_rc.value == 0, (
                f"connection refused: {self.connect_rc}"
            )
        return self

    @property
    def session_present(self) -> bool:
        return bool(self.connect_flags.session_present)

    def _wait_ack(self, mid, timeout):
        deadline = time.monotonic() + timeout
        with self._suback_cond:
            while mid not in self._subacks:
                left = deadline - time.monotonic()
                assert left > 0, f"no SUBACK/UNSUBACK for mid {mid} within {timeout}s"
                self._suback_cond.wait(left)
            return self._subacks.pop(mid)

    def subscribe(self, topic, qos=0, timeout=5.0):
        """topic: a filter or a list of (filter, qos). Returns the granted codes."""
        if isinstance(topic, list):
            rc, mid = self.c.subscribe(topic)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {rc}"
        return self._wait_ack(mid, timeout)

    def unsubscribe(self, topic, timeout=5.0):
        rc, mid = self.c.unsubscribe(topic)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._wait_ack(mid, timeout)

    def publish(self, topic, payload=b"", qos=0, retain=False, timeout=5.0):
        """Publish and wait until the QoS handshake completes (sent, for QoS 0)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic!r} (QoS {qos}) not acknowledged within {timeout}s"
        return info

    def get(self, timeout=5.0) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message arrived within {timeout}s") from None

    def get_until(self, topic, timeout=5.0) -> list:
        """Collect messages until one on `topic` arrives; return all of them (it last)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.get(max(0.01, deadline - time.monotonic()))
            got.append(msg)
            if msg.topic == topic:
                return got

    def drain(self, within=0.5) -> list:
        """Everything that arrives within `within` seconds."""
        got = []
        deadline = time.monotonic() + within
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                return got

    def expect_nothing(self, within=0.5):
        got = self.drain(within)
        assert not got, f"unexpected messages: {[(m.topic, m.payload) for m in got]}"

    def disconnect(self):
        """Clean DISCONNECT, then stop the network thread."""
        if self.connected.is_set() and not self.disconnected.is_set():
            self.c.disconnect()
            self.disconnected.wait(5)
        self.close()

    def close(self):
        if self._loop_started:
            self._loop_started = False
            if not self.disconnected.is_set():
                self.c.disconnect()
            self.c.loop_stop()


# --------------------------------------------------------------------- mosquitto

MOSQ_TIMEOUT = 10


def mosq_base(port):
    return ["-V", "mqttv311", "-h", HOST, "-p", str(port)]


def mosquitto_pub(port, topic, message=None, qos=0, retain=False, null=False,
                  extra=(), check=True, timeout=MOSQ_TIMEOUT):
    cmd = ["mosquitto_pub", *mosq_base(port), "-t", topic, "-q", str(qos)]
    if retain:
        cmd.append("-r")
    if null:
        cmd.append("-n")
    elif message is not None:
        cmd += ["-m", message]
    cmd += list(extra)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    if check:
        assert res.returncode == 0, f"{cmd} exited {res.returncode}: {res.stdout}{res.stderr}"
    return res


PUBLISH_DEBUG_RE = re.compile(
    r"received PUBLISH \(d(\d), q(\d), r(\d), m(\d+), '(.*)', \.\.\. \((\d+) bytes\)\)"
)


class MosquittoSub:
    """A `mosquitto_sub -d -v` process; debug lines tell when it has subscribed
    and give the DUP/QoS/RETAIN flags of each PUBLISH it received."""

    def __init__(self, port, topics, qos=0, client_id=None, extra=(), timeout=MOSQ_TIMEOUT):
        self.client_id = client_id or unique("msub")
        if isinstance(topics, str):
            topics = [topics]
        # stdbuf: mosquitto_sub uses stdio, which is block-buffered on a pipe
        cmd = ["stdbuf", "-oL", "mosquitto_sub", *mosq_base(port), "-d", "-v", "-i", self.client_id,
               "-q", str(qos)]
        for t in topics:
            cmd += ["-t", t]
        cmd += list(extra)
        self.cmd = cmd
        self.timeout = timeout
        self.lines: list[str] = []
        self.messages: list[tuple[str, str]] = []  # (topic, payload)
        self.publishes: list[dict] = []  # flags from debug lines
        self.cond = threading.Condition()
        self.suback = False
        self.connack = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        prefix = f"Client {self.client_id} "
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self.cond:
                self.lines.append(line)
                if line.startswith(prefix):
                    rest = line[len(prefix):]
                    if rest.startswith("received SUBACK"):
                        self.suback = True
                    elif rest.startswith("received CONNACK"):
                        self.connack = rest
                    m = PUBLISH_DEBUG_RE.search(rest)
                    if m:
                        self.publishes.append(dict(
                            dup=int(m.group(1)), qos=int(m.group(2)), retain=int(m.group(3)),
                            mid=int(m.group(4)), topic=m.group(5), size=int(m.group(6))))
                elif line.startswith("Subscribed (mid:") or line.startswith("Timed out"):
                    pass
                else:
                    topic, _, payload = line.partition(" ")
                    self.messages.append((topic, payload))
                self.cond.notify_all()

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"mosquitto_sub: {what} not seen within {timeout}s; output:\n"
                        + "\n".join(self.lines))
                self.cond.wait(min(left, 0.1))

    def wait_subscribed(self, timeout=5.0):
        self._wait(lambda: self.suback, timeout, "SUBACK")
        return self

    def wait_messages(self, n, timeout=5.0) -> list:
        self._wait(lambda: len(self.messages) >= n, timeout, f"{n} message(s)")
        with self.cond:
            return list(self.messages)

    def wait_for(self, topic, timeout=5.0) -> list:
        self._wait(lambda: any(t == topic for t, _ in self.messages), timeout,
                   f"a message on {topic!r}")
        with self.cond:
            return list(self.messages)

    def snapshot(self) -> list:
        with self.cond:
            return list(self.messages)

    def wait_exit(self, timeout=5.0) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(2)
        return rc

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(5)
        self.reader.join(2)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------------- health

_health = itertools.count(1)


def assert_healthy(srv):
    """The server process is alive and a well-behaved client round-trips a QoS 1 message."""
    assert srv.alive(), f"stratus died (exit code {srv.proc.returncode})"
    n = next(_health)
    topic = f"health/{os.getpid()}/{n}"
    with RawClient(srv.mqtt_port) as sub, RawClient(srv.mqtt_port) as pub:
        sub.connect(f"health-sub-{n}")
        assert sub.subscribe([(topic, 1)]) == [1]
        pub.connect(f"health-pub-{n}")
        pub.send(publish(topic, b"ping", qos=1, pid=11))
        ack = pub.expect(PUBACK)
        assert ack.pid == 11
        msg = sub.expect(PUBLISH)
        assert (msg.topic, msg.payload) == (topic, b"ping")
        sub.send(puback(msg.pid))
    assert srv.alive(), "stratus died"
