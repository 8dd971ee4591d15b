"""CelebA-style face alignment: detect faces, find 5 landmarks, warp each onto CelebA's template.

CelebA's aligned crops are 178x218 with the eyes and nose in fixed places. A model trained on them
sees a face at one scale, angle and position; a photo gives faces at any of those. This module
finds every face (dlib's HOG detector), its 5 landmarks (dlib's 5-point shape predictor: two
corners of each eye and the base of the nose), and the similarity transform (rotation, uniform
scale, shift; least squares over the 5 points) that puts those landmarks where CelebA's own
alignment put them, then warps the photo into a 178x218 crop. Where the crop leaves the photo the
photo is reflected, as in CelebA's crops.

``CELEBA_TEMPLATE`` is measured, not guessed: ``scripts/celeba_template.py`` runs this very
detector and predictor over the aligned sample (../shared/celeba-sample/img_align_celeba) and
prints the mean landmark positions. The constants live here because users have no sample.

Models come from the ``face-recognition-models`` wheel (CC0), located without importing its
``__init__`` (which needs pkg_resources, gone from current setuptools). Only the 5-point
predictor, the HOG detector and the ResNet descriptor (``facefind.indexer.faces.identity``) are ever loaded: the
68-point predictor in the same package forbids commercial use. dlib is imported on first use, so
``facefind query`` and every import of this module stay light; each process loads its models once.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facefind.db.errors import ModelError


CELEBA_SIZE = (218, 178)  # (height, width) of CelebA's aligned crops

# Mean 5-point landmarks (x, y) in CelebA's 178x218 aligned crops, in dlib's point order: the
# outer and inner corner of the eye on the image's right, the outer and inner corner of the eye on
# its left, the base of the nose. Regenerate: python scripts/celeba_template.py SAMPLE_FOLDER
# (5,258 of the 5,371 crops with a detection; per-point std 1.3-4.4 px).
CELEBA_TEMPLATE = np.array([
    [115.37, 112.49],
    [99.85, 113.57],
    [61.77, 112.43],
    [77.21, 113.56],
    [88.26, 142.71],
], dtype=np.float64)

LANDMARKS_MODEL = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
MODELS_PACKAGE = "face_recognition_models"
# Detection runs on a rescaled copy (boxes scale back): as large as 2x (dlib's one upsampling), so
# that faces down to ~40 px reach HOG's 80 px window, but at most DETECT_PIXELS pixels, since HOG
# costs ~95 ms of CPU per megapixel. A photo larger than that is shrunk, and its smallest findable
# face grows with it: ~80 px * sqrt(pixels / DETECT_PIXELS), e.g. ~200 px in a 12 MP phone photo.
HOG_WINDOW = 80
MAX_UPSCALE = 2.0
DETECT_PIXELS = 2_000_000
MIN_FACE_PIXELS = 32      # faces whose detected box is narrower than this (original pixels) are dropped
ROTATIONS = (-30.0, 30.0)  # when no face is found upright, detection is tried on the photo turned by these

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the original image


@dataclass(frozen=True)
class Face:
    """One detected face: its ``box`` in the photo, 5 ``landmarks`` (float (5, 2), x/y in the
    photo), the 2x3 ``transform`` from photo to crop coordinates, and the aligned 178x218 ``crop``."""

    box: Box
    landmarks: np.ndarray
    transform: np.ndarray
    crop: np.ndarray  # RGB uint8 (218, 178, 3)


# ----------------------------------------------------------------------------------------- models


def _dlib() -> Any:
    """dlib, imported on first use, or a one-line ModelError saying what to install."""
    try:
        import dlib  # optional (the faces extra), and slow to import
    except ImportError:
        raise ModelError("face detection needs dlib: pip install dlib-bin face-recognition-models") from None
    return dlib


def model_file(name: str) -> Path:
    """The path of one model file of the ``face-recognition-models`` package (its ``__init__`` is
    never run: it imports pkg_resources). ModelError when the package or the file is missing."""
    if name == "shape_predictor_68_face_landmarks.dat":
        raise ValueError("the 68-point predictor's licence forbids commercial use: never load it")
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "models" / name
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelError(f"face model {name} is missing{where}: pip install --force-reinstall face-recognition-models")


@functools.lru_cache(maxsize=1)
def _detector() -> Any:
    return _dlib().get_frontal_face_detector()


def load_model(name: str, constructor: str) -> Any:
    """``dlib.<constructor>(model file)``; a missing or unreadable file is a one-line ModelError."""
    path = model_file(name)
    try:
        return getattr(_dlib(), constructor)(str(path))
    except RuntimeError as err:
        raise ModelError(f"cannot load {path} ({err}): pip install --force-reinstall face-recognition-models") from None


@functools.lru_cache(maxsize=1)
def _predictor() -> Any:
    return load_model(LANDMARKS_MODEL, "shape_predictor")


def check_models() -> None:
    """Load dlib and the detection models now, so a missing piece fails before any work starts."""
    _detector()
    _predictor()


# ------------------------------------------------------------------------------------- geometry


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation + uniform scale + shift that maps ``src`` points onto ``dst``
    points with the least squared error (Umeyama 1991, no reflection). Both are float (N, 2)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var = (s ** 2).sum() / len(src)
    scale = float((sig * sign).sum() / var) if var > 0 else 1.0
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points float (N, 2) mapped by a 2x3 affine ``matrix``."""
    points = np.asarray(points, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _invert(matrix: np.ndarray) -> np.ndarray:
    a = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def _cut(rgb: np.ndarray, rect: tuple[int, int, int, int], reflect: bool = True) -> np.ndarray:
    """``rgb[y0:y1, x0:x1]``, reflecting the image where the rectangle leaves it (or filling grey)."""
    x0, y0, x1, y1 = rect
    h, w = rgb.shape[:2]
    pad = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)), (0, 0))
    if any(p for p in pad[0] + pad[1]):
        rgb = np.pad(rgb, pad, mode="symmetric") if reflect else np.pad(rgb, pad, constant_values=128)
        x0, x1, y0, y1 = x0 + pad[1][0], x1 + pad[1][0], y0 + pad[0][0], y1 + pad[0][0]
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def warp(rgb: np.ndarray, matrix: np.ndarray, size: tuple[int, int] = CELEBA_SIZE, reflect: bool = True) -> np.ndarray:
    """The (height, width) = ``size`` crop whose pixel (x, y) is the photo's point mapped there by the
    2x3 ``matrix`` (photo -> crop). Only the photo region under the crop is touched (reflected past
    the borders, or grey with ``reflect=False``); a face much larger than the crop is shrunk with a
    box filter first (no aliasing)."""
    from PIL import Image  # not at the top: every CLI command imports this module, `query` needs no PIL

    height, width = size
    inverse = _invert(matrix)  # crop -> photo
    corners = apply_transform(inverse, np.array([[0, 0], [width, 0], [0, height], [width, height]], float))
    x0, y0 = np.floor(corners.min(0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 2
    region = _cut(rgb, (int(x0), int(y0), int(x1), int(y1)), reflect)
    # crop -> region coordinates
    inverse = inverse.copy()
    inverse[:, 2] -= (x0, y0)
    image = Image.fromarray(region)
    scale = float(np.sqrt(abs(np.linalg.det(inverse[:, :2]))))  # region pixels per crop pixel
    if scale > 1.5:
        shrink = scale  # bring the region to about the crop's resolution before the bicubic warp
        small = (max(1, round(region.shape[1] / shrink)), max(1, round(region.shape[0] / shrink)))
        image = image.resize(small, Image.Resampling.BOX)
        fx, fy = small[0] / region.shape[1], small[1] / region.shape[0]
        inverse = np.diag([fx, fy]) @ inverse
    coeffs = tuple(float(v) for v in inverse.reshape(-1))
    out = image.transform((width, height), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def align(rgb: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(178x218 crop, 2x3 photo->crop matrix) putting 5 dlib ``landmarks`` on CELEBA_TEMPLATE."""
    matrix = similarity_transform(landmarks, CELEBA_TEMPLATE)
    return warp(rgb, matrix), matrix


# ------------------------------------------------------------------------------------ detection


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")


def detection_scale(height: int, width: int, max_pixels: int = DETECT_PIXELS) -> float:
    """The scale detection sees a ``height`` x ``width`` image at (see DETECT_PIXELS)."""
    return min(MAX_UPSCALE, math.sqrt(max_pixels / max(1, height * width)))


def smallest_face(height: int, width: int, max_pixels: int = DETECT_PIXELS) -> int:
    """About the narrowest face (original pixels) detection finds in an image of this size."""
    return int(math.ceil(HOG_WINDOW / detection_scale(height, width, max_pixels)))


def detect(rgb: np.ndarray, min_size: int = MIN_FACE_PIXELS, max_pixels: int = DETECT_PIXELS) -> list[Box]:
    """Boxes of all frontal faces in an RGB uint8 (H, W, 3) image at least ``min_size`` pixels wide,
    largest first (ties: top to bottom, left to right), in original pixels. Detection looks at the
    image rescaled by ``detection_scale`` (at most ``max_pixels``): see ``smallest_face``."""
    from PIL import Image  # see warp

    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    scale = detection_scale(h, w, max_pixels)
    upsample = 1 if scale > 1.0 else 0  # dlib doubles the image itself (and maps boxes back)
    resize = scale / 2 if upsample else scale  # ... we rescale by the rest
    small = rgb
    if abs(resize - 1.0) > 1e-3:
        size = (max(1, round(w * resize)), max(1, round(h * resize)))
        small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX if resize < 1 else
                                                       Image.Resampling.BILINEAR))
        resize = size[0] / w
    else:
        resize = 1.0
    boxes: list[Box] = []
    for r in _detector()(small, upsample):
        x, y = r.left() / resize, r.top() / resize
        bw, bh = r.width() / resize, r.height() / resize
        if bw >= min_size:
            boxes.append((int(round(x)), int(round(y)), int(round(bw)), int(round(bh))))
    boxes.sort(key=lambda b: (-b[2] * b[3], b[1], b[0]))
    return boxes


def landmarks(rgb: np.ndarray, box: Box) -> np.ndarray:
    """The 5 landmarks (float (5, 2), x/y in the photo) of the face in ``box``."""
    dlib = _dlib()
    x, y, bw, bh = box
    shape = _predictor()(rgb, dlib.rectangle(x, y, x + bw - 1, y + bh - 1))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _rotation(angle_deg: float, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, int]]:
    """(2x3 matrix photo -> rotated canvas, canvas (height, width)) turning the photo by ``angle_deg``
    (positive: counter-clockwise as seen) about its centre, the canvas just holding it all."""
    h, w = shape[:2]
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], float) @ rot.T
    low, high = corners.min(0), corners.max(0)
    size = (int(np.ceil(high[1] - low[1])), int(np.ceil(high[0] - low[0])))
    return np.hstack([rot, -low[:, None]]), size


def _located(rgb: np.ndarray, min_size: int) -> list[tuple[Box, np.ndarray]]:
    """(box, landmarks) of the faces HOG finds upright, largest first."""
    return [(box, landmarks(rgb, box)) for box in detect(rgb, min_size)]


def find_faces(rgb: np.ndarray, min_size: int = MIN_FACE_PIXELS, limit: int | None = None) -> list[Face]:
    """Every face of an RGB uint8 image (largest first, at most ``limit``), each aligned like CelebA.

    HOG finds faces tilted up to about 15 degrees; when it finds none upright, the photo is turned
    by each of ``ROTATIONS`` in turn and detection runs again there (landmarks are mapped back, so
    alignment always warps the original pixels once)."""
    check_models()  # a missing model fails on every image, not only on those with a face
    found = _located(rgb, min_size)
    for angle in ROTATIONS:
        if found:
            break
        to_canvas, size = _rotation(angle, rgb.shape)
        turned = warp(rgb, to_canvas, size, reflect=False)
        back = _invert(to_canvas)
        for box, points in _located(turned, min_size):
            x, y, bw, bh = box
            corners = apply_transform(back, np.array([[x, y], [x + bw, y], [x, y + bh], [x + bw, y + bh]], float))
            (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
            found.append(((int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0))),
                          apply_transform(back, points)))
    out = []
    for box, points in found[:limit]:
        crop, matrix = align(rgb, points)
        out.append(Face(box=box, landmarks=points, transform=matrix, crop=crop))
    return out
