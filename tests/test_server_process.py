"""ServerProcess: start/health on 127.0.0.1, log tail on failure, and a stop that leaves nothing."""

import os
import sys
import time

import pytest

from eslora.backends.base import BackendError
from eslora.backends.server import ServerProcess, free_port


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def http_server(port: int, tmp_path, child_ignores_term: bool) -> list[str]:
    """A real HTTP server on 127.0.0.1; optionally it first spawns a child in its group that
    ignores SIGTERM (as server workers that outlive their leader do)."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import http.server, os, signal, subprocess, sys, time\n"
        "if sys.argv[2] == '1':\n"
        "    subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    return [sys.executable, str(script), str(port), "1" if child_ignores_term else "0"]


def test_stop_reaps_children_that_ignore_sigterm(tmp_path):
    port = free_port()
    server = ServerProcess(http_server(port, tmp_path, True), port=port, log_dir=str(tmp_path))
    server.start(timeout_s=30)
    assert server.healthy() and server.url == f"http://127.0.0.1:{port}"
    pgid = server.process.pid
    time.sleep(0.5)  # let the SIGTERM-ignoring child start
    server.stop(grace_s=2.0)
    assert not group_alive(pgid), "a process of the server's group outlived stop()"
    assert not server.alive()


def test_kill_then_stop_is_clean(tmp_path):
    port = free_port()
    server = ServerProcess(http_server(port, tmp_path, False), port=port, log_dir=str(tmp_path))
    server.start(timeout_s=30)
    pgid = server.process.pid
    server.kill()
    assert not server.alive()
    server.stop()
    assert not group_alive(pgid)


def test_failed_start_shows_log_tail(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('model folder is broken'); sys.exit(3)"]
    server = ServerProcess(cmd, port=port, log_dir=str(tmp_path), name="broken")
    with pytest.raises(BackendError, match="code 3(.|\\n)*model folder is broken"):
        server.start(timeout_s=30)


def test_server_dies_with_its_owner(tmp_path):
    """An owner killed with SIGKILL (a Ray actor under ray.kill) cannot stop its server; the
    watchdog must end the server's whole group (here with a SIGTERM-ignoring child) on its own."""
    import signal
    import subprocess

    port = free_port()
    owner_script = tmp_path / "owner.py"
    owner_script.write_text(
        "import sys, time\n"
        "from eslora.backends.server import ServerProcess\n"
        f"s = ServerProcess({http_server(port, tmp_path, True)!r}, port={port}, log_dir={str(tmp_path)!r})\n"
        "s.start(timeout_s=30)\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(owner_script)], stdout=subprocess.PIPE, text=True)
    pgid = int(owner.stdout.readline())
    time.sleep(0.5)
    assert group_alive(pgid)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 30
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(pgid), "the server outlived the process that started it"
