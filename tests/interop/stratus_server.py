"""Start and stop `stratus serve` processes for the interop tests."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
LISTEN_RE = re.compile(r"^listening (\w+) (\S+):(\d+)$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def stratus_bin() -> str:
    path = os.environ.get("STRATUS_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR", str(REPO / "target"))
        candidates = [os.path.join(target, p, "stratus") for p in ("ci", "release")]
        path = next((c for c in candidates if os.access(c, os.X_OK)), candidates[0])
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"stratus binary not found at {path!r}: build it with "
            "`cargo build --profile ci -p stratus` and set STRATUS_BIN",
            pytrace=False,
        )
    return path


def clean_env(extra=None) -> dict:
    """The test process environment without any STRATUS_* overrides, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATUS_")}
    env.setdefault("RUST_BACKTRACE", "1")
    env.update(extra or {})
    return env


class ServerStartError(Exception):
    pass


class Server:
    """One `stratus serve` process. Ports and data dir are kept across restart()."""

    def __init__(self, workdir: Path, name: str, args=(), env=None, config=None,
                 anonymous=True, mqtt_port=0, http_port=0, data_dir=None, coap_port=0, nofile=None):
        self.workdir = workdir
        self.name = name
        self.args = list(args)
        self.env = dict(env or {})
        self.anonymous = anonymous
        self.mqtt_port = mqtt_port  # None: do not pass --mqtt-port at all
        self.http_port = http_port
        self.coap_port = coap_port  # None: do not pass --coap-port at all
        self.nofile = nofile  # (soft, hard) RLIMIT_NOFILE for the server process
        self.data_dir = Path(data_dir) if data_dir else workdir / f"{name}-data"
        self.config_path = None
        if config is not None:
            self.config_path = workdir / f"{name}.toml"
            self.config_path.write_text(config)
        self.proc = None
        self.log_lines: list[str] = []
        self._log_lock = threading.Lock()
        self._listening = {}
        self._cond = threading.Condition(self._log_lock)
        self.starts = 0
        self.stopped_on_purpose = False

    # ---- process control
    def command(self, mqtt_port, http_port) -> list:
        cmd = [stratus_bin(), "serve", "--data-dir", str(self.data_dir), "--bind", "127.0.0.1"]
        if mqtt_port is not None:
            cmd += ["--mqtt-port", str(mqtt_port)]
        if http_port is not None:
            cmd += ["--http-port", str(http_port)]
        if self.coap_port is not None:
            cmd += ["--coap-port", str(self.coap_port)]
        if self.anonymous:
            cmd.append("--allow-anonymous")
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.args

    def start(self, mqtt_port=None, http_port=None, wait=("mqtt", "http")):
        mqtt_port = self.mqtt_port if mqtt_port is None else mqtt_port
        http_port = self.http_port if http_port is None else http_port
        cmd = self.command(mqtt_port, http_port)
        self.starts += 1
        self.stopped_on_purpose = False
        self._listening = {}
        self._log(f"### start #{self.starts}: {' '.join(cmd)}")
        preexec = None
        if self.nofile is not None:
            limits = self.nofile

            def preexec():
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=clean_env(self.env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
        )
        for stream, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            threading.Thread(target=self._drain, args=(stream, tag), daemon=True).start()
        if self.coap_port is not None and "mqtt" in wait and "coap" not in wait:
            # The coap line follows the others: wait for it too, or its port is unknown.
            wait = (*wait, "coap")
        deadline = time.monotonic() + START_TIMEOUT
        with self._cond:
            while not all(w in self._listening for w in wait):
                if self.proc.poll() is not None:
                    # let the drain threads catch the last lines
                    self._cond.wait(0.2)
                    raise ServerStartError(
                        f"stratus exited with {self.proc.returncode} before listening\n" + self.log()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill()
                    raise ServerStartError(
                        f"stratus did not print {wait} listening lines within {START_TIMEOUT}s\n"
                        + self.log()
                    )
                self._cond.wait(min(left, 0.1))
        if "mqtt" in self._listening:
            self.mqtt_port = self._listening["mqtt"]
        if "http" in self._listening:
            self.http_port = self._listening["http"]
        if "coap" in self._listening and self.coap_port is not None:
            self.coap_port = self._listening["coap"]
        return self

    def _drain(self, stream, tag):
        for raw in iter(stream.readline, b""):
            line = ANSI_RE.sub("", raw.decode("utf-8", "replace").rstrip("\r\n"))
            with self._cond:
                self.log_lines.append(f"[{tag}] {line}")
                if tag == "out":
                    m = LISTEN_RE.match(line.strip())
                    if m:
                        self._listening[m.group(1)] = int(m.group(3))
                self._cond.notify_all()
        stream.close()

    def _log(self, line):
        with self._cond:
            self.log_lines.append(line)

    def log(self) -> str:
        with self._log_lock:
            return "\n".join(self.log_lines)

    def listening(self) -> dict:
        with self._log_lock:
            return dict(self._listening)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Send `sig`, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.stopped_on_purpose = True
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._log(f"### did not exit within {timeout}s of {sig!r}; SIGKILL")
                self._kill()
            self._log(f"### exited with {self.proc.returncode}")
        return self.proc.returncode

    def _kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def kill9(self):
        self.stopped_on_purpose = True
        self._kill()
        return self.proc.returncode

    def problems(self) -> list:
        """Crashes and panics seen in this server's life, for the fixture teardown."""
        found = []
        if self.proc is not None and self.proc.poll() is not None and not self.stopped_on_purpose:
            found.append(f"stratus {self.name} died during the test (exit code {self.proc.returncode})")
        with self._log_lock:
            panics = [line for line in self.log_lines if "panicked at" in line]
        if panics:
            found.append(f"stratus {self.name} panicked: {panics[0]}")
        return found

    def restart(self, sig=signal.SIGTERM):
        """Stop and start again on the same data dir and the same ports."""
        self.stop(sig)
        return self.start(mqtt_port=self.mqtt_port, http_port=self.http_port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
