"""One way to make a thumbnail: decode as the indexer did, cut out the face, shrink, JPEG.

The web page's cached thumbnails and the HTML gallery both use it, so a hit looks the same in
both and shows what was indexed: the file is decoded by ``facefind.trainer.decode`` (EXIF and XMP
orientation, CMYK, alpha, 16-bit, bombs refused), and a face entry of a photo (one with a box,
from ``index --detect-faces``) shows that face with some of its surroundings rather than the
whole group photo.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # x, y, width, height in the decoded image
FACE_MARGIN = 0.5   # each side of a face box grows by this fraction of the box's size
JPEG_QUALITY = 82


def face_region(box: Box, width: int, height: int, margin: float = FACE_MARGIN) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the part of a ``width`` x ``height`` image shown for a face
    at ``box``: the box grown by ``margin`` on every side, kept inside the image (never empty)."""
    x, y, w, h = box
    dx, dy = int(round(w * margin)), int(round(h * margin))
    left, top = max(0, x - dx), max(0, y - dy)
    right, bottom = min(width, x + w + dx), min(height, y + h + dy)
    if right <= left or bottom <= top:  # a box outside the image (the file changed): show it all
        return 0, 0, width, height
    return left, top, right, bottom


def thumbnail_jpeg(rgb: np.ndarray, size: int, box: Box | None = None, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of a decoded RGB image (its face at ``box``, when given) shrunk to fit ``size`` pixels."""
    if box is not None:
        left, top, right, bottom = face_region(box, rgb.shape[1], rgb.shape[0])
        rgb = rgb[top:bottom, left:right]
    img = Image.fromarray(np.ascontiguousarray(rgb))
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()
