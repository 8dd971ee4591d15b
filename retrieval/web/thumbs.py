"""Thumbnails made once per index entry and kept in a cache folder, keyed by the file's identity.

The key hashes the catalogued path, size, modification time (ns) and inode, the face's box (a
photo's faces each get their own) and the thumbnail size: a file replaced in place gets a new
thumbnail, an unchanged one is never re-encoded. ``facefind.retrieval.thumbnail`` makes them (decoded as
the indexer did, the face cut out), so a thumbnail shows what was indexed. Cache files are written
by ``atomic_replace`` without fsync (a reader never sees half a JPEG; a power cut may cost a thumbnail); a cache folder that cannot be written
leaves thumbnails made in memory on every request (slower, never wrong).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facefind.db.files import atomic_replace
from facefind.db.paths import default_cache_dir
from facefind.retrieval.thumbnail import thumbnail_jpeg
from facefind.trainer.decode import Unreadable, decode_rgb

if TYPE_CHECKING:
    from facefind.retrieval.engine import Engine

log = logging.getLogger(__name__)

THUMB_SIZE = 192     # longest side, pixels (CelebA's 178x218 faces become 157x192)
WARM = 120           # thumbnails made ahead for the page's first view (two pages of 60)


class SourceGone(Exception):
    """The catalogued file cannot be shown (gone, not a regular file, unreadable): the reason."""


@dataclass(frozen=True)
class Thumbnail:
    etag: str
    mtime: float
    path: Path | None = None   # the cached file, when the cache is writable
    data: bytes | None = None  # the bytes, when it is not


def identity(path: str) -> os.stat_result:
    """``os.stat`` of a catalogued file that may be served; SourceGone when it may not."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise SourceGone(f"the file is gone ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):  # a pipe or device under an image's name is never read
        raise SourceGone("not a regular file")
    return st


class ThumbnailCache:
    """``get(path)`` -> a Thumbnail of ``path``, from ``folder`` or freshly made (then stored)."""

    def __init__(self, folder: Path, size: int = THUMB_SIZE) -> None:
        self.folder = Path(folder)
        self.size = size
        self.writable = True

    def key(self, path: str, st: os.stat_result, box: tuple[int, int, int, int] | None = None) -> str:
        raw = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{self.size}"
        if box is not None:
            raw += "\0" + ",".join(map(str, box))
        return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()

    def get(self, path: str, box: tuple[int, int, int, int] | None = None) -> Thumbnail:
        """The thumbnail of the file at ``path`` (of its face at ``box``, when given)."""
        st = identity(path)
        key = self.key(path, st, box)
        cached = self.folder / key[:2] / f"{key}.jpg"
        try:
            if cached.stat().st_size > 0:
                return Thumbnail(key, st.st_mtime, path=cached)
        except OSError:
            pass
        data = make_thumbnail(path, self.size, box)
        if self.writable and self._store(cached, data):
            return Thumbnail(key, st.st_mtime, path=cached)
        return Thumbnail(key, st.st_mtime, data=data)

    def _store(self, cached: Path, data: bytes) -> bool:
        try:
            atomic_replace(cached, lambda tmp: tmp.write_bytes(data), durable=False)  # a cache: no fsync
        except OSError as err:
            log.warning("cannot cache thumbnails in %s (%s); making them in memory", self.folder, err)
            self.writable = False
            return False
        return True


class Warmer:
    """Makes the first view's thumbnails in a background thread as soon as a snapshot generation is
    served (at start, and after each publish), so that no first visitor waits for them: they land
    in the cache folder beside the index, where a restarted server finds them."""

    def __init__(self, cache: ThumbnailCache, n: int = WARM) -> None:
        self.cache, self.n = cache, n
        self.thread: threading.Thread | None = None

    def start(self, engine: Engine) -> threading.Thread:
        self.thread = threading.Thread(target=self.warm, args=(engine,), name="facefind-thumbs", daemon=True)
        self.thread.start()
        return self.thread

    def warm(self, engine: Engine) -> int:
        """Thumbnails of the default view's first ``n`` entries (what the page shows first); how many."""
        start, made = time.perf_counter(), 0
        try:
            hits = engine.query(None, limit=self.n).hits
        except Exception:  # a background nicety: never let it take the server down
            log.exception("cannot list the first view to make its thumbnails")
            return 0
        for hit in hits:
            try:
                self.cache.get(hit.path, None if hit.box is None else tuple(int(v) for v in hit.box))
                made += 1
            except SourceGone:
                continue
        log.info("%d thumbnails of the first view ready in %.1f s", made, time.perf_counter() - start)
        return made


def make_thumbnail(path: str, size: int = THUMB_SIZE, box: tuple[int, int, int, int] | None = None) -> bytes:
    """A JPEG of the image at ``path`` (its face at ``box``) shrunk to fit ``size`` pixels;
    SourceGone when unreadable."""
    try:
        rgb = decode_rgb(path)
    except Unreadable as err:
        raise SourceGone(f"cannot read the image ({err})") from None
    return thumbnail_jpeg(rgb, size, box)


def default_cache_folder(index_dir: Path | None) -> Path:
    """``<index>/thumbs`` when the index folder is writable, else ``$FACEFIND_CACHE/thumbs/<hash>``."""
    if index_dir is not None and os.access(index_dir, os.W_OK):
        return Path(index_dir) / "thumbs"
    tag = hashlib.sha1(str(index_dir).encode()).hexdigest()[:12]
    return default_cache_dir() / "thumbs" / tag
