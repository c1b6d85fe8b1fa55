"""Runs a server command and ends its whole process group when the parent that started it dies.

    python watchdog.py PARENT_PID -- COMMAND ...     (SIGUSR1 to it: SIGTERM to COMMAND alone)

`ServerProcess` starts servers through this, as the leader of a new process group. If the
process that owns the server (a Ray actor) is killed with SIGKILL it cannot stop anything, and
the server would keep its GPU memory forever; the watchdog notices the parent is gone and stops
the group. Standard library only: it starts in milliseconds and needs nothing installed.
"""

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 10.0


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:])  # same process group as this watchdog
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))  # the group got it too: wait for the child
    # SIGUSR1 to this watchdog alone: SIGTERM the server alone (its workers are left to it).
    signal.signal(signal.SIGUSR1, lambda *_: child.poll() is None and child.send_signal(signal.SIGTERM))
    while child.poll() is None:
        if not stopping and not _alive(parent):
            os.killpg(os.getpgrp(), signal.SIGTERM)  # reaches the server and its workers
            deadline = time.monotonic() + GRACE_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.killpg(os.getpgrp(), signal.SIGKILL)  # ends this watchdog too
        time.sleep(POLL_S)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def _alive(pid: int) -> bool:
    # Re-parented (to init or a subreaper) means the starting process is gone.
    return os.getppid() == pid


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
