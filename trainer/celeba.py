"""Read CelebA from disk, in either of its published layouts.

    original:  ROOT/img_align_celeba/000001.jpg ...
               ROOT/list_attr_celeba.txt        line 1: count, line 2: names, then "000001.jpg -1  1 ..."
               ROOT/list_eval_partition.txt     "000001.jpg 0|1|2"
               ROOT/identity_CelebA.txt         "000001.jpg 2880" (optional)
    kaggle:    ROOT/img_align_celeba/img_align_celeba/*.jpg  (nested)
               ROOT/list_attr_celeba.csv        "image_id,5_o_Clock_Shadow,..." with -1/1
               ROOT/list_eval_partition.csv     "image_id,partition"
               ROOT/identity_CelebA.txt         (optional)

``load_celeba`` accepts the dataset root or the image folder itself. Attribute names always come
from the annotation header (``5_o_Clock_Shadow`` starts with a digit, so never treat names as
identifiers). A folder holding only some of the images works: the annotated-but-absent ones are
counted in ``missing_images``. This module only reads; it never writes into the dataset folder.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from facefind.db.errors import DatasetError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
Layout = Literal["original", "kaggle"]

_ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
_PARTITION_FILES = {"original": "list_eval_partition.txt", "kaggle": "list_eval_partition.csv"}
_IDENTITY_FILE = "identity_CelebA.txt"


@dataclass(frozen=True)
class Located:
    """Where a CelebA dataset's pieces are on disk (nothing read yet)."""

    root: Path
    image_dir: Path
    layout: Layout
    attr_file: Path
    partition_file: Path
    identity_file: Path | None


@dataclass(frozen=True)
class Annotations:
    """The parsed attribute file: image names, attribute names and -1/1 values as 0/1."""

    names: list[str]
    attributes: list[str]
    labels: np.ndarray  # uint8 (M, K)


@dataclass(frozen=True)
class CelebA:
    """The images of a CelebA-format folder that are present on disk, with their annotations."""

    root: Path
    image_dir: Path
    layout: Layout
    attributes: list[str]
    paths: list[Path]
    labels: np.ndarray  # uint8 (N, K), 1 = attribute present
    splits: np.ndarray  # uint8 (N,), index into SPLITS
    identities: np.ndarray | None  # int32 (N,) or None when identity_CelebA.txt is absent
    missing_images: int = 0  # annotated in the files but absent from image_dir
    annotated_images: int = field(default=0)

    def __len__(self) -> int:
        return len(self.paths)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split ('train', 'val' or 'test')."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        return np.flatnonzero(self.splits == SPLITS.index(split))

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.splits, minlength=len(SPLITS))
        return {name: int(counts[i]) for i, name in enumerate(SPLITS)}

    def positive_rate(self) -> dict[str, float]:
        rates = self.labels.mean(axis=0) if len(self) else np.zeros(len(self.attributes))
        return {name: float(rate) for name, rate in zip(self.attributes, rates)}

    def subset(self, idx: np.ndarray | list[int]) -> CelebA:
        """A view restricted to rows ``idx`` (order kept)."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            paths=[self.paths[i] for i in idx],
            labels=self.labels[idx],
            splits=self.splits[idx],
            identities=None if self.identities is None else self.identities[idx],
        )


def load_celeba(path: str | os.PathLike[str]) -> CelebA:
    """Find the layout under ``path`` (dataset root or image folder) and read it.

    Raises ``DatasetError`` with a one-line explanation for every inconsistency: no images, missing
    annotation files, malformed lines (file:line), duplicate ids, wrong value counts, and images
    present on disk that the annotation file does not list.
    """
    loc = locate(path)
    ann = read_attributes(loc.attr_file)
    partition = read_partition(loc.partition_file)
    identity = _read_name_to_int(loc.identity_file, "identity") if loc.identity_file else None

    present = list_images(loc.image_dir)
    if not present:
        raise DatasetError(f"no images (.jpg/.png/...) in {loc.image_dir}: put the CelebA images there")

    row_of = {name: i for i, name in enumerate(ann.names)}
    unannotated = [name for name in present if name not in row_of]
    if unannotated:
        raise DatasetError(
            f"{len(unannotated)} image(s) in {loc.image_dir} are not listed in {loc.attr_file.name} "
            f"(first: {unannotated[0]}): remove them or add their annotations"
        )
    unpartitioned = [name for name in present if name not in partition]
    if unpartitioned:
        raise DatasetError(
            f"{len(unpartitioned)} image(s) have no split in {loc.partition_file.name} "
            f"(first: {unpartitioned[0]}): the partition file does not match the attribute file"
        )

    rows = np.fromiter((row_of[name] for name in present), dtype=np.int64, count=len(present))
    identities = None
    if identity is not None:
        identities = np.fromiter((identity.get(n, -1) for n in present), dtype=np.int32, count=len(present))
    missing = len(ann.names) - len(present)
    if missing:
        log.info("%d of %d annotated images are not in %s; using the %d present",
                 missing, len(ann.names), loc.image_dir, len(present))
    return CelebA(
        root=loc.root,
        image_dir=loc.image_dir,
        layout=loc.layout,
        attributes=ann.attributes,
        paths=[loc.image_dir / name for name in present],
        labels=ann.labels[rows],
        splits=np.fromiter((partition[n] for n in present), dtype=np.uint8, count=len(present)),
        identities=identities,
        missing_images=missing,
        annotated_images=len(ann.names),
    )


def locate(path: str | os.PathLike[str]) -> Located:
    """Find the dataset root, image folder and annotation files from a root or an image folder."""
    start = Path(path).expanduser()
    if not start.exists():
        raise DatasetError(f"no such folder: {start}")
    if not start.is_dir():
        raise DatasetError(f"{start} is not a folder: give the CelebA root or its img_align_celeba folder")
    start = start.resolve()

    # The annotation files sit in the root, which is the folder given or up to two levels above it
    # (original: root/img_align_celeba; kaggle: root/img_align_celeba/img_align_celeba).
    root = next((d for d in (start, start.parent, start.parent.parent) if find_attr_file(d)), None)
    if root is None:
        raise DatasetError(
            f"no annotation file in {start} or the two folders above it: looked for "
            f"{' or '.join(_ATTR_FILES)} (download them with the CelebA images)"
        )
    attr_file = find_attr_file(root)
    assert attr_file is not None
    layout: Layout = "kaggle" if attr_file.suffix == ".csv" else "original"

    if start != root and list_images(start, limit=1):
        image_dir = start
    else:
        candidates = [root / "img_align_celeba" / "img_align_celeba", root / "img_align_celeba", root]
        image_dir = next((d for d in candidates if d.is_dir() and list_images(d, limit=1)), None)
        if image_dir is None:
            raise DatasetError(
                f"no images found for {attr_file}: looked in "
                + ", ".join(str(c) for c in candidates[:2])
            )

    partition_file = root / _PARTITION_FILES[layout]
    if not partition_file.is_file():
        other = root / _PARTITION_FILES["original" if layout == "kaggle" else "kaggle"]
        if not other.is_file():
            raise DatasetError(
                f"split file missing: looked for {partition_file.name} (or {other.name}) in {root}"
            )
        partition_file = other
    identity_file = root / _IDENTITY_FILE
    return Located(root, image_dir, layout, attr_file, partition_file,
                   identity_file if identity_file.is_file() else None)


def find_attr_file(folder: Path) -> Path | None:
    """The attribute annotation file in ``folder`` (original .txt preferred), or None."""
    for name in _ATTR_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def list_images(folder: Path, limit: int | None = None) -> list[str]:
    """Sorted file names of the images directly in ``folder`` (at most ``limit`` when given)."""
    names: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    names.append(entry.name)
                    if limit is not None and len(names) >= limit:
                        break
    except OSError as err:
        raise DatasetError(f"cannot read {folder}: {err.strerror}") from None
    return sorted(names)


def read_attributes(path: Path) -> Annotations:
    """Parse ``list_attr_celeba.txt`` (original) or ``list_attr_celeba.csv`` (Kaggle)."""
    lines = _read_lines(path)
    if path.suffix == ".csv":
        header_at, data_at = 0, 1
        header = [h.strip() for h in lines[0].split(",")] if lines else []
        if len(header) < 2 or header[0] != "image_id":
            raise DatasetError(f"{path}:1: expected a header 'image_id,<attribute names>'")
        attributes, split = header[1:], _split_csv
    else:
        if len(lines) < 2:
            raise DatasetError(f"{path}: expected a count line and a line of attribute names")
        header_at, data_at = 1, 2
        try:
            declared = int(lines[0].strip())
        except ValueError:
            raise DatasetError(f"{path}:1: expected the number of images, got {lines[0][:40]!r}") from None
        attributes, split = lines[1].split(), str.split
    if not attributes:
        raise DatasetError(f"{path}:{header_at + 1}: no attribute names in the header")
    if len(set(attributes)) != len(attributes):
        raise DatasetError(f"{path}:{header_at + 1}: attribute names repeat")

    k = len(attributes)
    names: list[str] = []
    rows: list[str] = []  # the values of each line, re-joined with single spaces
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines[data_at:], start=data_at + 1):
        parts = split(line)
        if not parts:
            continue
        if len(parts) != k + 1:
            raise DatasetError(
                f"{path}:{lineno}: expected an image name and {k} values, got {len(parts) - 1} values"
            )
        name = parts[0]
        if name in first_line:
            raise DatasetError(f"{path}:{lineno}: duplicate image id {name} (first on line {first_line[name]})")
        first_line[name] = lineno
        names.append(name)
        rows.append(" ".join(parts[1:]))

    raw = _parse_values(" ".join(rows), len(names) * k)
    bad = np.flatnonzero(~np.isin(raw, (-1, 0, 1)).reshape(len(names), k).all(axis=1)) if raw is not None else None
    if raw is None or bad.size:
        row = _first_bad_row(rows) if raw is None else int(bad[0])
        raise DatasetError(f"{path}:{first_line[names[row]]}: expected values of -1 or 1 for {names[row]}")
    raw = raw.reshape(len(names), k)
    if path.suffix != ".csv" and declared != len(names):
        raise DatasetError(
            f"{path}:1: declares {declared} images but lists {len(names)}: the file is truncated or edited"
        )
    return Annotations(names=names, attributes=attributes, labels=(raw > 0).astype(np.uint8))


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a text file: expected a CelebA annotation file") from None
    return text.splitlines()


def _split_csv(line: str) -> list[str]:
    return [p.strip() for p in line.split(",")] if line.strip() else []


def _parse_values(text: str, count: int) -> np.ndarray | None:
    """Whitespace-separated integers -> int8 array, or None when any token is not an integer."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (instead of failing) on a bad token
            values = np.fromstring(text, dtype=np.int16, sep=" ") if text else np.zeros(0, np.int16)
    except (ValueError, DeprecationWarning):
        return None
    if values.size != count:
        return None
    return values.astype(np.int8) if np.abs(values).max(initial=0) <= 1 else values.clip(-2, 2).astype(np.int8)


def _first_bad_row(rows: list[str]) -> int:
    for i, row in enumerate(rows):
        if any(v not in ("-1", "1", "0") for v in row.split()):
            return i
    return 0


def read_partition(path: Path) -> dict[str, int]:
    """``{image name: split}`` from a partition file: 0 train, 1 val, 2 test."""
    return _read_name_to_int(path, "partition", allowed={0, 1, 2})


def _read_name_to_int(path: Path, what: str, allowed: set[int] | None = None) -> dict[str, int]:
    """Parse a two-column 'name value' file (txt with spaces, or csv with a header)."""
    lines = _read_lines(path)
    is_csv = path.suffix == ".csv"
    out: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if is_csv and lineno == 1:
            continue
        parts = _split_csv(line) if is_csv else line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected an image name and a {what}, got {line[:60]!r}")
        try:
            value = int(parts[1])
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: expected an integer {what}, got {parts[1]!r}") from None
        if allowed is not None and value not in allowed:
            raise DatasetError(f"{path}:{lineno}: {what} must be one of {sorted(allowed)}, got {value}")
        if parts[0] in out:
            raise DatasetError(f"{path}:{lineno}: duplicate image id {parts[0]}")
        out[parts[0]] = value
    return out
