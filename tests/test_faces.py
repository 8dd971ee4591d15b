"""Face detection and CelebA-like cropping (``trainer.faces``).

Haar cascades do not fire on drawn synthetic faces, so detection of a real face uses the CelebA
sample when it is present (and skips otherwise); the no-face error and the crop geometry are
tested always.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from db.errors import ImageError
from trainer.faces import (CELEBA_ASPECT, FACE_CENTER, FACE_WIDTH, celeba_crop_rect, crop_face, find_face,
                           looks_aligned, require_face)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "celeba-sample"
celeba = pytest.mark.skipif(not (SAMPLE / "img_align_celeba").is_dir(), reason="no real CelebA sample")


@pytest.mark.parametrize("shape, aligned", [
    ((218, 178), True),     # CelebA's aligned crops
    ((109, 89), True),      # the half-size extras
    ((436, 356), True),     # twice the size
    ((250, 200), False),    # 4:5 portrait: 2% off the aspect
    ((480, 640), False),    # a landscape photo
    ((2180, 1780), False),  # right aspect, but a photo-sized image
    ((0, 0), False),
])
def test_looks_aligned(shape: tuple[int, int], aligned: bool) -> None:
    assert looks_aligned(shape) is aligned
    if min(shape) > 0:
        assert looks_aligned(np.zeros((*shape, 3), np.uint8)) is aligned


def test_crop_rect_puts_the_face_where_celeba_has_it() -> None:
    # The median CelebA detection in a 178x218 crop must map back to (about) the whole crop.
    w = round(FACE_WIDTH * 178)
    box = (round(FACE_CENTER[0] * 178 - w / 2), round(FACE_CENTER[1] * 218 - w / 2), w, w)
    x0, y0, x1, y1 = celeba_crop_rect(box)
    assert max(abs(x0), abs(y0), abs(x1 - 178), abs(y1 - 218)) <= 2
    # scale and translation carry over
    x0, y0, x1, y1 = celeba_crop_rect((1000 + 2 * box[0], 500 + 2 * box[1], 2 * w, 2 * w))
    assert abs(x0 - 1000) <= 3 and abs(y0 - 500) <= 3 and abs((x1 - x0) - 356) <= 3
    assert abs((x1 - x0) / (y1 - y0) - CELEBA_ASPECT) < 0.01


def test_no_face_is_a_clear_error_and_none_for_the_indexer() -> None:
    blank = np.full((240, 320, 3), 128, np.uint8)
    assert find_face(blank) is None
    assert crop_face(blank) is None
    with pytest.raises(ImageError, match=r"no face found in blank\.png: pass an aligned face crop"):
        require_face(blank, "blank.png")


def test_detection_rejects_wrong_input() -> None:
    from trainer.faces import detect_faces

    with pytest.raises(ValueError):
        detect_faces(np.zeros((10, 10), np.uint8))


def test_importing_faces_does_not_load_opencv() -> None:
    code = "import sys, trainer.faces, trainer.predict; print('cv2' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


@pytest.mark.celeba
@celeba
def test_real_face_pasted_into_a_photo_is_found_and_cropped_like_celeba() -> None:
    found = 0
    for src in sorted((SAMPLE / "img_align_celeba").glob("*.jpg"))[:6]:
        face = np.asarray(Image.open(src).convert("RGB"))
        canvas = np.full((480, 640, 3), 200, np.uint8)
        canvas[:, :, 1] = np.linspace(60, 220, 640, dtype=np.uint8)  # not a flat background
        canvas[120:338, 300:478] = face
        hit = find_face(canvas)
        if hit is None:
            continue
        found += 1
        x, y, w, h = hit.box
        assert 300 <= x and x + w <= 478 and 120 <= y and y + h <= 338
        # the crop lands on the pasted CelebA crop itself
        assert _iou(hit.rect, (300, 120, 478, 338)) > 0.75
        assert abs(hit.crop.shape[1] / hit.crop.shape[0] - CELEBA_ASPECT) < 0.02
        assert crop_face(canvas).shape == hit.crop.shape
    assert found >= 3, "the Haar cascade should find most real CelebA faces"


@pytest.mark.celeba
@celeba
def test_a_face_at_the_border_is_cropped_with_reflected_padding() -> None:
    src = sorted((SAMPLE / "img_align_celeba").glob("*.jpg"))[0]
    face = np.asarray(Image.open(src).convert("RGB"))
    canvas = np.full((300, 400, 3), 90, np.uint8)
    canvas[:218, :178] = face  # top-left corner: the CelebA rect reaches past the border
    hit = find_face(canvas)
    if hit is None:
        pytest.skip("this sample face is not detected at the border")
    x0, y0, x1, y1 = hit.rect
    assert hit.crop.shape == (y1 - y0, x1 - x0, 3)
