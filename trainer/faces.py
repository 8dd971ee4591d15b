"""Face detection for photos that are not aligned CelebA crops: find the largest face, crop it like
CelebA, and hand the crop to the usual preprocessing.

Detection uses OpenCV's bundled Haar cascade (``opencv-python-headless<5`` ships it; nothing is
downloaded). cv2 is imported on first use only: it is slow to import and never needed on the query
path or for aligned crops.

CelebA's aligned crops are 178x218 with the face in a fixed place. Running this detector on 379
real crops of ../shared/celeba-sample (400 tried, 21 without a detection) gave a median box
0.584 of the image width wide, centred at (0.503, 0.567) of the width and height (p10-p90 of the
width: 0.52-0.64). ``celeba_crop_rect`` inverts that: from a detected box it cuts the 178:218
rectangle in which the box would sit exactly where CelebA's faces sit, so a model trained on
CelebA sees a face at the scale and position it learned.

``crop_face`` (RGB array -> crop or None) is the hook the indexer's reader takes as ``crop``; it
is a module-level function, so it pickles into worker processes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from db.errors import ImageError

log = logging.getLogger(__name__)

CELEBA_SIZE = (218, 178)      # (height, width) of CelebA's aligned crops
CELEBA_ASPECT = CELEBA_SIZE[1] / CELEBA_SIZE[0]  # width / height = 0.8165
FACE_WIDTH = 0.584            # detected box width / crop width (median over real CelebA crops)
FACE_CENTER = (0.503, 0.567)  # detected box centre in crop coordinates (x, y fractions)
ASPECT_TOLERANCE = 0.015      # looks_aligned: relative aspect error (a 4:5 portrait is 2% off)
ALIGNED_WIDTHS = (64, 360)    # looks_aligned: widths of CelebA crops and their rescaled copies
DETECT_MAX_SIDE = 640         # detection runs on a copy shrunk to this size (speed); boxes scale back
MIN_FACE_FRACTION = 0.05      # ignore detections narrower than this share of the shorter side
CASCADE = "haarcascade_frontalface_default.xml"

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the original image


@dataclass(frozen=True)
class FaceCrop:
    """The largest face of an image: its detected ``box`` and the CelebA-like ``crop`` around it.

    ``rect`` = (x0, y0, x1, y1) is the cut in original pixel coordinates; it may reach past the
    image borders, which are then filled by reflection.
    """

    box: Box
    rect: tuple[int, int, int, int]
    crop: np.ndarray  # RGB uint8 (h, w, 3) with w / h = 178 / 218


def looks_aligned(image: np.ndarray | tuple[int, int]) -> bool:
    """True when an image (RGB array, or its (height, width)) has CelebA's aligned-crop geometry.

    ``predict`` and ``similar`` detect faces automatically only when this is False: CelebA crops
    (178x218) and their rescaled copies (e.g. the 89x109 extras) go straight to the model.
    """
    h, w = (image.shape[:2] if isinstance(image, np.ndarray) else image)
    if h <= 0 or w <= 0:
        return False
    aspect_error = abs((w / h) / CELEBA_ASPECT - 1.0)
    return aspect_error <= ASPECT_TOLERANCE and ALIGNED_WIDTHS[0] <= w <= ALIGNED_WIDTHS[1]


@functools.lru_cache(maxsize=1)
def _cascade() -> Any:
    """The Haar cascade, loaded once per process (cv2 imported here, not at module level)."""
    try:
        import cv2
    except ImportError:
        raise ImageError("face detection needs OpenCV: pip install 'opencv-python-headless<5' "
                         "(or pass an aligned face crop)") from None
    path = cv2.data.haarcascades + CASCADE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ImageError(f"OpenCV's face cascade {path} is missing (opencv-python-headless 5.x dropped "
                         "it): install 'opencv-python-headless<5', or pass aligned face crops")
    return cascade


def detect_faces(rgb: np.ndarray) -> list[Box]:
    """All frontal faces in an RGB uint8 (H, W, 3) image, largest first, in original pixels."""
    import cv2

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_faces expects RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    cascade = _cascade()
    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                          interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    smallest = max(20, int(MIN_FACE_FRACTION * min(gray.shape)))
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    boxes = [tuple(int(round(v / scale)) for v in b) for b in np.asarray(found).reshape(-1, 4)]
    boxes.sort(key=lambda b: (-b[2] * b[3], b[1], b[0]))
    return boxes  # type: ignore[return-value]


def celeba_crop_rect(box: Box) -> tuple[int, int, int, int]:
    """The (x0, y0, x1, y1) rectangle with CelebA's aspect in which ``box`` sits like a CelebA face."""
    x, y, bw, bh = box
    width = bw / FACE_WIDTH
    height = width / CELEBA_ASPECT
    x0 = x + bw / 2 - FACE_CENTER[0] * width
    y0 = y + bh / 2 - FACE_CENTER[1] * height
    return (int(round(x0)), int(round(y0)), int(round(x0 + width)), int(round(y0 + height)))


def _cut(rgb: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``rgb[y0:y1, x0:x1]``, reflecting the image where the rectangle leaves it."""
    x0, y0, x1, y1 = rect
    h, w = rgb.shape[:2]
    pad = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)), (0, 0))
    if any(p for p in pad[0] + pad[1]):
        rgb = np.pad(rgb, pad, mode="symmetric")
        x0, x1, y0, y1 = x0 + pad[1][0], x1 + pad[1][0], y0 + pad[0][0], y1 + pad[0][0]
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def find_face(rgb: np.ndarray) -> FaceCrop | None:
    """The largest face with its CelebA-like crop, or None when the detector finds none."""
    boxes = detect_faces(rgb)
    if not boxes:
        return None
    rect = celeba_crop_rect(boxes[0])
    return FaceCrop(box=boxes[0], rect=rect, crop=_cut(rgb, rect))


def crop_face(rgb: np.ndarray) -> np.ndarray | None:
    """The indexer's ``crop`` hook: the CelebA-like crop of the largest face, or None (no face)."""
    found = find_face(rgb)
    return None if found is None else found.crop


def require_face(rgb: np.ndarray, name: str) -> FaceCrop:
    """``find_face`` for one named image; ImageError that says what to do when there is no face."""
    found = find_face(rgb)
    if found is None:
        raise ImageError(
            f"no face found in {name}: pass an aligned face crop (like CelebA's 178x218), a photo with a "
            "clearly visible frontal face, or --no-detect-face to use the whole image"
        )
    return found
