"""Discovery: which image files a folder holds, and which of them the catalog already has.

    discover(folder)          image files (jpg/jpeg/png/webp/bmp, any case) with size and mtime
    split_unchanged(...)      drop files the catalog already holds with the same size and mtime

A file found but unusable (dangling symlink, loop, no permission) becomes a ``Failure`` with its
reason; it never raises. Only a missing or unreadable folder is an error (DatasetError).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from facefind.db.errors import DatasetError
from facefind.trainer.celeba import IMAGE_EXTENSIONS  # one list of what counts as an image file
from facefind.trainer.decode import os_error_reason

__all__ = ["IMAGE_EXTENSIONS", "Discovery", "Failure", "FileEntry", "discover", "split_unchanged"]


@dataclass(frozen=True)
class FileEntry:
    """One image file as discovered: normalised absolute path, size in bytes, mtime in seconds."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Failure:
    """A file that could not be indexed, with a reason a person can act on."""

    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What ``discover`` found: candidate image files, and entries that are already unreadable."""

    files: list[FileEntry]
    failures: list[Failure]


def discover(folder: str | os.PathLike[str], recursive: bool = False) -> Discovery:
    """List the image files in ``folder`` (and below it when ``recursive``), sorted by path.

    Paths are absolute with the folder resolved, but a symlinked file keeps its own name. Dangling
    symlinks and symlink loops come back as failures; symlinked folders are not followed (no loops).
    Raises DatasetError when ``folder`` is missing, not a folder or unreadable.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"no such folder: {root}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: give the folder that holds the images")
    root = root.resolve()
    files: list[FileEntry] = []
    failures: list[Failure] = []
    pending = [str(root)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as err:
            if current == str(root):
                raise DatasetError(f"cannot read {root}: {err.strerror}: check its permissions") from None
            failures.append(Failure(current, f"unreadable folder ({err.strerror})"))
            continue
        for entry in entries:
            if recursive and entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.normpath(entry.path)
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as err:
                failures.append(Failure(path, os_error_reason(err, entry.is_symlink())))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # a folder named like an image, a socket, ...
            files.append(FileEntry(path, int(st.st_size), float(st.st_mtime)))
    files.sort(key=lambda f: f.path)
    failures.sort(key=lambda f: f.path)
    return Discovery(files, failures)


def split_unchanged(
    files: Sequence[FileEntry], known: dict[str, tuple[int, float]]
) -> tuple[list[FileEntry], int]:
    """Files to (re)index and the number skipped because the catalog has them with equal size+mtime."""
    todo: list[FileEntry] = []
    unchanged = 0
    for f in files:
        seen = known.get(f.path)
        if seen is not None and int(seen[0]) == f.size and math.isclose(float(seen[1]), f.mtime, abs_tol=1e-6):
            unchanged += 1
        else:
            todo.append(f)
    return todo, unchanged
