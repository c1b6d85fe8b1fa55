"""Durable writes of the driver's files: whole or not at all, with the path in any error.

A file is written to a sibling `.tmp`, fsynced, renamed over the target and the folder fsynced,
so a kill or a power cut leaves the old file or the new one, never half of either. A failed
write (disk full) removes its `.tmp` and raises `FileWriteError` naming the file and the cause
("No space left on device").
"""

from __future__ import annotations

import os
from pathlib import Path

from eslora.errors import EsloraError


class FileWriteError(EsloraError, OSError):
    """A run file that could not be written (the message names it and says why)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably (see the module docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise FileWriteError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        _remove(tmp)
        raise


def append_whole(path: Path, data: bytes) -> None:
    """Append `data` (one record) durably; a failed append is cut back, leaving no partial line."""
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError as err:
            f.truncate(size)
            raise FileWriteError(f"cannot write {path}: {err.strerror or err}") from None


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (its directory entry)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
