"""Faces in photos that are not aligned CelebA crops, aligned the way CelebA's crops are.

``find_face`` / ``require_face`` / ``faces_of`` are what ``predict``, ``similar`` and the
indexer's ``--detect-faces`` call; the work (dlib detection, 5 landmarks, a similarity warp onto
CelebA's measured template) is ``facefind.indexer.faces.align``. Images that already have CelebA's crop geometry
(``looks_aligned``) skip detection and go to the model as they are: aligning them again moves
their landmarks by about a pixel (measured on real CelebA crops), so passing them through is
both exact and free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facefind.db.errors import ImageError, ModelError
from facefind.indexer.faces import identity as ident
from facefind.indexer.faces.align import CELEBA_SIZE, MIN_FACE_PIXELS, Box, Face, detect, find_faces


CELEBA_ASPECT = CELEBA_SIZE[1] / CELEBA_SIZE[0]  # width / height = 0.8165
ASPECT_TOLERANCE = 0.015      # looks_aligned: relative aspect error (a 4:5 portrait is 2% off)
ALIGNED_WIDTHS = (64, 360)    # looks_aligned: widths of CelebA crops and their rescaled copies

__all__ = ["Face", "FaceEntry", "crop_shows_a_face", "faces_of", "find_face", "identity_of", "looks_aligned",
           "require_face"]


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


def crop_shows_a_face(rgb: np.ndarray) -> bool | None:
    """Whether the detector finds a face in an image that ``looks_aligned`` (and so goes to the
    model whole): False for, say, a plain 178x218 picture that only has a crop's size. None when
    face detection is not installed: the check is a courtesy, and the crop is used either way.
    One upright HOG pass (an aligned crop is upright): no landmarks, no rotated retries."""
    try:
        return bool(detect(rgb, min_size=0))
    except ModelError:
        return None


def find_face(rgb: np.ndarray) -> Face | None:
    """The largest face, aligned onto CelebA's template (``Face.crop`` is 178x218), or None."""
    faces = find_faces(rgb, limit=1)
    return faces[0] if faces else None


def require_face(rgb: np.ndarray, name: str) -> Face:
    """``find_face`` for one named image; ImageError that says what to do when there is no face."""
    found = find_face(rgb)
    if found is None:
        raise ImageError(
            f"no face found in {name}: pass an aligned face crop (like CelebA's 178x218), a photo with a "
            "clearly visible frontal face, or --no-detect-face to use the whole image"
        )
    return found


@dataclass(frozen=True)
class FaceEntry:
    """One face of a file as an index entry: its ``number`` in the file (0 = largest), its ``box``
    in the decoded image (None: the whole file is one aligned crop), the 178x218 ``crop`` the
    attribute model sees, and the 128-D ``identity`` descriptor (None unless asked for, or when
    an aligned crop has no detectable face)."""

    number: int
    box: Box | None
    crop: np.ndarray
    identity: np.ndarray | None = None


def faces_of(rgb: np.ndarray, *, identity: bool = False, min_size: int = MIN_FACE_PIXELS,
             limit: int | None = None) -> list[FaceEntry]:
    """The index entries of one decoded image: an aligned CelebA-like crop is one entry (itself);
    any other image has one entry per face found (largest first; none: no face). A module-level
    function of arrays, so the indexer's reader workers can call it and overlap the descriptor's
    ~100 ms per face with the CNN."""
    if looks_aligned(rgb):
        vector = None
        if identity:
            found = find_faces(rgb, min_size=0, limit=1)
            vector = ident.describe(rgb, [found[0].landmarks])[0] if found else None
        return [FaceEntry(0, None, rgb, vector)]
    faces = find_faces(rgb, min_size=min_size, limit=limit)
    vectors = ident.describe(rgb, [f.landmarks for f in faces]) if identity and faces else None
    return [FaceEntry(i, f.box, f.crop, None if vectors is None else vectors[i]) for i, f in enumerate(faces)]


def identity_of(rgb: np.ndarray) -> np.ndarray | None:
    """The 128-D identity descriptor of the largest face in a decoded image (an aligned CelebA
    crop: of the face in it), or None when it has none. The one function behind a whole-image
    entry's ``index --identity``, ``similar IMAGE --by person`` and the web page's person upload."""
    found = faces_of(rgb, identity=True, limit=1)
    return found[0].identity if found else None
