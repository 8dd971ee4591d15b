"""File helpers shared by every package: atomic replacement, JSON files, folder fsync, content hashes.

Atomic replacement: a crash leaves the old file or the new one, never a torn one.

Every file facefind writes for users to keep (checkpoints, FAISS indexes, galleries, reports) goes
through ``atomic_replace``: fill a temporary file in the same folder, fsync it, give it the mode a
plain ``open()`` would (umask applied; ``mkstemp`` alone would leave it 0600), rename it over the
target, and fsync the folder so the rename itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_replace(path: str | os.PathLike[str], fill: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Create ``path`` by calling ``fill(tmp)`` on a temporary path beside it, then renaming.

    ``durable=False`` skips both fsyncs: readers still never see a torn file, but a power cut may
    lose the new one. For caches that can be rebuilt (thumbnails), where the fsyncs cost ~7x the
    write itself (1.06 ms against 0.14 ms per thumbnail, measured on this machine)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        fill(tmp)
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (numpy values and paths included, see ``json_default``) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default))


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default`` for what facefind writes: paths as text, numpy (and torch)
    scalars and arrays as numbers and lists. Anything else is a bug: TypeError."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that renames in it are durable (a no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _set_and_restore_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Setting the umask to read it lets another thread (the web server writes thumbnails from several)
# create world-writable files for that moment, so it is done once, at import; where Linux says the
# umask (/proc/self/status), each write reads it there, so a later change is still honoured.
_UMASK_AT_IMPORT = _set_and_restore_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (identifies a checkpoint in the catalog)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
