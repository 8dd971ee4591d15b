"""Measure CelebA's alignment template: the mean 5-point dlib landmarks over aligned CelebA crops.

    python scripts/celeba_template.py ../shared/celeba-sample/img_align_celeba [--limit N]

Runs facefind.indexer.faces.align's own detector and 5-point predictor (the ones alignment uses at run time)
over every 178x218 crop in the folder and prints ``CELEBA_TEMPLATE`` as Python to paste into
indexer/faces/align.py, with how many crops had a detection and the per-point spread. Users have no
CelebA sample, so the measured constants live in the code; this script is how they were made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from facefind.indexer.faces.align import CELEBA_SIZE, detect, landmarks  # needs `pip install -e .`


def measure(folder: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(mean (5, 2), std (5, 2), crops measured, crops tried) over the 178x218 JPEGs of ``folder``."""
    files = sorted(folder.glob("*.jpg"))[:limit]
    points = []
    for path in files:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        if rgb.shape[:2] != CELEBA_SIZE:
            continue
        boxes = detect(rgb, min_size=0)
        if boxes:
            points.append(landmarks(rgb, boxes[0]))
    if not points:
        raise SystemExit(f"no face detected in {len(files)} images of {folder}")
    stack = np.stack(points)
    return stack.mean(0), stack.std(0), len(points), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of aligned CelebA crops (img_align_celeba)")
    parser.add_argument("--limit", type=int, default=None, help="measure only the first N files")
    args = parser.parse_args()
    mean, std, n, tried = measure(args.folder, args.limit)
    print(f"# {n:,} of {tried:,} crops with a detection; per-point std "
          f"{std.min():.1f}-{std.max():.1f} px")
    print("CELEBA_TEMPLATE = np.array([")
    for x, y in mean:
        print(f"    [{x:.2f}, {y:.2f}],")
    print("], dtype=np.float64)")


if __name__ == "__main__":
    main()
