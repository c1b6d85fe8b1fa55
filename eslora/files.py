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
        _write(tmp, data, os.O_TRUNC)
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
    try:
        _write(Path(path), data, os.O_APPEND)
    except OSError as err:
        raise FileWriteError(f"cannot write {path}: {err.strerror or err}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """All of `data` into `path` (opened with `mode`), fsynced; on failure cut back to the old size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # not a regular file (or the disk refuses even that): the caller says why
            raise
    finally:
        os.close(fd)


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
