"""The model folder's writer lock: one snapshot writer at a time; readers never lock."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers rarely overlap there
    fcntl = None


@contextlib.contextmanager
def writer_lock(folder: Path) -> Iterator[bool]:
    """Hold the model folder's writer lock (blocks while another process writes a snapshot).

    Yields False, without locking, where the lock file cannot be created (read-only index).
    """
    if fcntl is None:
        yield True
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock
