"""A run's folder `run.dir/run.name`: one run per folder, one process per run, nothing destroyed.

- A fresh run (no `resume`) of a folder that already holds a run's results (a checkpoint, a
  metrics line, an adapter) is refused: the earlier run's files stay byte-identical (choose
  another `run.name`, or `resume=true` to continue it). A start that failed before its first
  generation left only config.yaml: that folder may be used again.
- A lock (`.lock`, an flock held for the process's lifetime, released by the kernel even on
  SIGKILL) refuses a second process on the same folder.
- `config.yaml` is written by `accept`, once the driver has checked everything it can.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Optional

from eslora.errors import EsloraError
from eslora.files import write_atomic
from eslora.metrics import METRICS

LOCK = ".lock"
CONFIG = "config.yaml"


class RunFolderError(EsloraError, RuntimeError):
    """A run folder that this run may not use (holds another run, or is in use)."""


class RunFolder:
    """The locked folder of one run; use as a context manager (the lock is released on exit)."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = Path(path)
        self._lock: Optional[IO[str]] = None
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire()
        held = self.results()
        if held and not resume:
            self.release()
            raise RunFolderError(
                f"run folder {self.path} already holds a run ({', '.join(held)}); nothing was changed. "
                "Continue it with resume=true, or choose another run.name"
            )
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")  # who holds it, for the message a second process gets
        self._lock.flush()

    def _acquire(self) -> IO[str]:
        lock = open(self.path / LOCK, "a+")  # "a+": an existing lock file is not changed by opening it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise RunFolderError(f"run folder {self.path} is in use by another eslora run (pid {owner}); "
                                 "wait for it to end or choose another run.name") from None
        return lock

    def results(self) -> list[str]:
        """What of a run's results the folder holds (a start that finished no generation holds none)."""
        metrics = self.path / METRICS
        return [name for name, present in (
            ("checkpoints", any((self.path / "checkpoints").glob("gen_*.pt"))),
            (METRICS, metrics.is_file() and metrics.stat().st_size > 0),
            ("adapter", (self.path / "adapter").exists()),
        ) if present]

    def accept(self, config_yaml: str) -> None:
        """The run starts: write its resolved config (the only write before training)."""
        write_atomic(self.path / CONFIG, config_yaml.encode())

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
