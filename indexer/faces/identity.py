"""Who a face is: dlib's 128-D face descriptor (ResNet, 99.38% on LFW), for search by person.

The attribute network's embedding measures look (hair, make-up, expression); two photos of one
person can be far apart in it and two look-alikes close. dlib's descriptor is trained for
identity: photos of one person lie within Euclidean distance ``SAME_PERSON`` (0.6) of each other.

The descriptor expects dlib's own 150x150 face chip, cut from the photo by ``get_face_chip``
from the same 5 landmarks that ``facefind.indexer.faces.align`` finds, so it works from the photo and a
``Face`` (or stored landmarks), not from the 178x218 CelebA crop. It costs ~150 ms per face on one
core, so ``describe`` is a plain module-level function of arrays: it pickles into the indexer
reader's worker processes, and each process loads the model once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from facefind.indexer.faces.align import DESCRIPTOR_MODEL, _dlib, load_model


DIM = 128
SAME_PERSON = 0.6   # dlib's threshold: Euclidean distances below it are the same person
CHIP_SIZE = 150     # the chip the ResNet was trained on
CHIP_PADDING = 0.25


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    return load_model(DESCRIPTOR_MODEL, "face_recognition_model_v1")


def check_model() -> None:
    """Load dlib and the descriptor model now, so a missing piece fails before any work starts."""
    _model()


def chips(rgb: np.ndarray, landmarks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """dlib's 150x150 face chips of ``rgb`` for faces given by their 5 landmarks (float (5, 2))."""
    dlib = _dlib()
    shapes = dlib.full_object_detections()
    for points in landmarks:
        pts = np.asarray(points)
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        rect = dlib.rectangle(int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1)))
        shapes.append(dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in pts]))
    if len(shapes) == 0:
        return []
    return [np.asarray(c) for c in dlib.get_face_chips(np.ascontiguousarray(rgb), shapes, CHIP_SIZE, CHIP_PADDING)]


def describe(rgb: np.ndarray, landmarks: Sequence[np.ndarray]) -> np.ndarray:
    """float32 (F, 128) identity descriptors of the faces of ``rgb`` given by their landmarks
    (``facefind.indexer.faces.align.Face.landmarks``): one batch through dlib's ResNet."""
    cut = chips(rgb, landmarks)
    if not cut:
        return np.zeros((0, DIM), np.float32)
    vectors = _model().compute_face_descriptor(cut)
    return np.asarray([np.asarray(v) for v in vectors], dtype=np.float32).reshape(len(cut), DIM)


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between descriptor ``a`` (128,) or (N, 128) and each row of ``b`` (M, 128)."""
    a2 = np.atleast_2d(np.asarray(a, np.float32))
    b2 = np.atleast_2d(np.asarray(b, np.float32))
    d = np.sqrt(np.maximum(((a2[:, None, :] - b2[None, :, :]) ** 2).sum(-1), 0.0))
    return d[0] if np.ndim(a) == 1 else d
