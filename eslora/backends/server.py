"""A local inference server as a child process: start on 127.0.0.1, wait for health, stop.

Shared by the SGLang and vLLM backends. The server runs in its own process group so that
stopping it also stops the workers it spawned (SGLang's scheduler, vLLM's engine core), under a
small watchdog (`watchdog.py`) that stops the group if the process that started it dies without
stopping it (a Ray actor killed with SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Mapping, Optional, Sequence

import requests

from eslora.backends.base import BackendError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One server process. `command` must make the server listen on `self.host:self.port`."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: Optional[Mapping[str, str]] = None,
        health_path: str = "/health",
        name: str = "server",
        log_dir: Optional[str] = None,
    ) -> None:
        self.command = list(command)
        self.host = host
        self.port = port
        self.env = dict(env) if env is not None else None
        self.health_path = health_path
        self.name = name
        log_dir = log_dir or tempfile.gettempdir()
        self.log_path = Path(log_dir) / f"eslora-{name}-{port}.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float) -> float:
        """Start and wait until healthy; returns seconds to healthy. Raises with the log's tail."""
        if self.alive():
            return 0.0
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **(self.env or {})}
        watched = [sys.executable, str(Path(__file__).with_name("watchdog.py")), str(os.getpid()), "--", *self.command]
        self.process = subprocess.Popen(watched, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise BackendError(f"{self.name} exited with code {code} during start-up; last log lines:\n{self.log_tail()}")
            if self.healthy():
                return time.monotonic() - started
            time.sleep(1.0)
        self.stop()
        raise BackendError(f"{self.name} not healthy after {timeout_s:.0f} s; last log lines:\n{self.log_tail()}")

    def healthy(self, timeout_s: float = 5.0) -> bool:
        try:
            return requests.get(self.url + self.health_path, timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0, reap_s: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `grace_s`, and wait until
        the group is empty (a server's workers hold GPU memory the next server needs)."""
        process, self.process = self.process, None
        if process is None:
            return
        pgid = process.pid  # start_new_session: the group id is the leader's pid, even after it exits
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _reap_group(pgid, reap_s)
        process.wait(timeout=10.0)

    def kill(self) -> None:
        """Crash the server on purpose (tests of restart): SIGKILL the whole group, no grace."""
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except FileNotFoundError:
            return "(no log)"


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal every process of the group; False once the group is empty."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _reap_group(pgid: int, timeout_s: float) -> None:
    """SIGKILL the group until no process is left in it (or `timeout_s` passes)."""
    deadline = time.monotonic() + timeout_s
    while _signal_group(pgid, signal.SIGKILL) and time.monotonic() < deadline:
        time.sleep(0.2)
