"""Thumbnails made once per image file and kept in a cache folder, keyed by the file's identity.

The key hashes the catalogued path, size, modification time (ns) and inode, plus the thumbnail
size: a file replaced in place gets a new thumbnail, an unchanged one is never re-encoded. The
source is decoded with the indexer's reader (EXIF orientation, CMYK, alpha, 16-bit, bombs and
oversized files refused), so a thumbnail shows what was indexed. Cache files are written to a
temporary name and renamed; a cache folder that cannot be written leaves thumbnails made in
memory on every request (slower, never wrong).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

THUMB_SIZE = 192     # longest side, pixels (CelebA's 178x218 faces become 157x192)
JPEG_QUALITY = 82


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

    def key(self, path: str, st: os.stat_result) -> str:
        raw = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{self.size}"
        return hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()

    def get(self, path: str) -> Thumbnail:
        st = identity(path)
        key = self.key(path, st)
        cached = self.folder / key[:2] / f"{key}.jpg"
        try:
            if cached.stat().st_size > 0:
                return Thumbnail(key, st.st_mtime, path=cached)
        except OSError:
            pass
        data = make_thumbnail(path, self.size)
        if self.writable and self._store(cached, data):
            return Thumbnail(key, st.st_mtime, path=cached)
        return Thumbnail(key, st.st_mtime, data=data)

    def _store(self, cached: Path, data: bytes) -> bool:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".thumb-", dir=cached.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, cached)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            log.warning("cannot cache thumbnails in %s (%s); making them in memory", self.folder, err)
            self.writable = False
            return False
        return True


def make_thumbnail(path: str, size: int = THUMB_SIZE) -> bytes:
    """A JPEG of the image at ``path`` shrunk to fit ``size`` pixels; SourceGone when unreadable."""
    from PIL import Image

    from trainer.decode import Unreadable, decode_rgb

    try:
        rgb = decode_rgb(path)
    except Unreadable as err:
        raise SourceGone(f"cannot read the image ({err})") from None
    img = Image.fromarray(rgb)
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def default_cache_folder(index_dir: Path | None) -> Path:
    """``<index>/thumbs`` when the index folder is writable, else ``$FACEFIND_CACHE/thumbs/<hash>``."""
    from db.paths import default_cache_dir

    if index_dir is not None and os.access(index_dir, os.W_OK):
        return Path(index_dir) / "thumbs"
    tag = hashlib.sha1(str(index_dir).encode()).hexdigest()[:12]
    return default_cache_dir() / "thumbs" / tag
