"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def tiny_checkpoint(path: Path, attributes: Sequence[str], *, calibrate: Sequence[Path] | None = None,
                    size: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """Save a freshly initialised mobilenet_v3_small checkpoint (``size`` px, ``dim``-d embedding).

    Indexing does not care what a model learned, but similarity and attribute tests do: with
    ``calibrate``, BatchNorm statistics and median thresholds come from those images, so that
    embeddings differ between faces and each attribute splits them.
    """
    import torch
    from torch import nn

    from facefind.trainer.checkpoint import CheckpointMeta, save_checkpoint
    from facefind.trainer.decode import decode_paths
    from facefind.trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model, preprocess

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(attributes), embedding_dim=dim)
    meta = CheckpointMeta(arch="mobilenet_v3_small", attributes=list(attributes), img_size=(size, size),
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding_dim=dim, dropout=0.3,
                          thresholds=[0.5] * len(attributes))
    if calibrate:
        x = preprocess(torch.from_numpy(decode_paths(list(calibrate), (size, size))), meta)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # running stats = this batch's
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            probs = torch.sigmoid(model(x)[0]).numpy()
        meta.thresholds = [float(t) for t in np.median(probs, axis=0)]
    return save_checkpoint(path, model, meta)


@dataclass(frozen=True)
class Built:
    """A small synthetic index built by ``facefind index``, and what it stored, read back."""

    root: Path
    images: list[Path]
    model: Path
    index: Path
    attributes: list[str]
    thresholds: dict[str, float]
    ids: dict[str, int]                 # path -> catalog id
    probs: dict[str, dict[str, float]]  # path -> attribute -> stored probability
    labels: dict[str, dict[str, bool]]  # path -> attribute -> ground truth


def build_synthetic_index(base: Path, n: int, seed: int = 5,
                          adjust: Callable[[Path, Sequence[str]], None] | None = None) -> Built:
    """``n`` synthetic faces -> a calibrated tiny checkpoint (``adjust(path, attributes)`` may rewrite
    it) -> ``index_folder`` into ``base/index``, with every stored probability and label read back."""
    from facefind.db.catalog import Catalog
    from facefind.indexer.pipeline import index_folder
    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.synth import synthesize

    root = base / "celeba"
    synthesize(root, n=n, seed=seed)
    ann = read_attributes(root / "list_attr_celeba.txt")
    images = sorted((root / "img_align_celeba").glob("*.jpg"))
    model = tiny_checkpoint(base / "model.pt", ann.attributes, calibrate=images)
    if adjust is not None:
        adjust(model, ann.attributes)
    report = index_folder(root / "img_align_celeba", model, base / "index", device="cpu", workers=0)
    assert report.indexed == n and report.labelled == n
    with Catalog.open(base / "index", create=False) as catalog:
        record = catalog.latest_model()
        preds = catalog.export(record.id)[1]
    probs = {p: dict(zip(record.attributes, row.tolist())) for p, row in zip(preds.paths, preds.probs)}
    labels = {str(root / "img_align_celeba" / name): dict(zip(ann.attributes, (row > 0).tolist()))
              for name, row in zip(ann.names, ann.labels)}
    return Built(root, images, model, base / "index", list(ann.attributes),
                 dict(zip(record.attributes, record.thresholds)),
                 dict(zip(preds.paths, preds.ids.tolist())), probs, labels)


# -- group photos composed from synthetic faces (every face of a photo is its own entry) ---------

# Where each synthetic face is pasted: (face, left, top, scale) on a light canvas.
GROUP = [(0, 20, 40, 1.0), (1, 300, 60, 1.0), (2, 560, 30, 1.25)]
PAIR = [(5, 30, 30, 1.0), (6, 260, 40, 1.0)]
Layout = Sequence[tuple[int, int, int, float]]


def compose(faces: Sequence[np.ndarray], layout: Layout, size: tuple[int, int], background: int = 235) -> np.ndarray:
    """A (height, width) photo with ``faces[i]`` (178x218 crops) pasted at each layout position."""
    from PIL import Image

    photo = np.full((*size, 3), background, np.uint8)
    for i, left, top, scale in layout:
        face = Image.fromarray(faces[i])
        if scale != 1.0:
            face = face.resize((round(178 * scale), round(218 * scale)), Image.Resampling.LANCZOS)
        arr = np.asarray(face)
        photo[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
    return photo


def regions(layout: Layout) -> list[tuple[int, int, int, int]]:
    """The pasted regions (x, y, w, h) of ``layout``."""
    return [(left, top, round(178 * scale), round(218 * scale)) for _, left, top, scale in layout]


def inside(box: Sequence[int], region: tuple[int, int, int, int]) -> bool:
    """Whether a detected box's centre lies in a pasted region."""
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    x, y, w, h = region
    return x <= cx <= x + w and y <= cy <= y + h


@dataclass(frozen=True)
class Photos:
    """A folder of composed photos and a calibrated tiny model to index it with."""

    base: Path
    folder: Path
    faces: list[np.ndarray]  # synthetic faces HOG finds, each alone
    model: Path


def detectable_faces(base: Path, n: int = 14, seed: int = 5) -> tuple[list[np.ndarray], Path]:
    """Synthetic faces that dlib's HOG detector finds (each alone), and a tiny model calibrated on all."""
    from PIL import Image

    from facefind.indexer.faces.align import find_faces
    from facefind.trainer.celeba import read_attributes
    from facefind.trainer.synth import synthesize

    synthesize(base / "synth", n=n, seed=seed)
    images = sorted((base / "synth" / "img_align_celeba").glob("*.jpg"))
    drawn = [np.asarray(Image.open(p).convert("RGB")) for p in images]
    faces = [f for f in drawn if len(find_faces(f, min_size=0)) == 1]
    assert len(faces) >= 7, "HOG should detect most synthetic faces"
    ann = read_attributes(base / "synth" / "list_attr_celeba.txt")
    return faces, tiny_checkpoint(base / "model.pt", ann.attributes, calibrate=images)


def compose_photos(base: Path) -> Photos:
    """``base/photos``: a group photo of three faces (GROUP, 800x340 JPEG), a pair (PAIR, 520x300
    PNG), a photo with no face, and an aligned 178x218 crop that is also the group's first face."""
    from PIL import Image

    faces, model = detectable_faces(base)
    folder = base / "photos"
    folder.mkdir()
    Image.fromarray(compose(faces, GROUP, (340, 800))).save(folder / "group.jpg", quality=95)
    Image.fromarray(compose(faces, PAIR, (300, 520))).save(folder / "pair.png")
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(folder / "empty.jpg")
    Image.fromarray(faces[0]).save(folder / "crop.jpg", quality=95)
    return Photos(base, folder, faces, model)


# -- catalog reads and writes that only tests need -----------------------------------------------

import sqlalchemy as sa  # noqa: E402

from facefind.db.paths import normalize_path  # noqa: E402
from facefind.db.schema import identities, images  # noqa: E402


def add_labels(catalog, attribute_names: Sequence[str], by_path: dict[str, np.ndarray]) -> int:
    """Store ground-truth labels for catalogued files (``index`` stores them with each batch);
    return how many were stored. Paths not in the catalog are ignored; ``> 0`` means present."""
    wanted = {normalize_path(p): v for p, v in by_path.items()}
    with catalog._write() as conn:
        ids = dict(conn.execute(sa.select(images.c.path, images.c.id).where(images.c.path.in_(list(wanted)))).all())
        if ids:
            catalog._store_labels(conn, attribute_names, {ids[p]: wanted[p] for p in ids})
    return len(ids)


def identity_count(catalog) -> tuple[int, int]:
    """``(described, with_face)``: entries ``index --identity`` looked at, and those with a face."""
    with catalog._read() as conn:
        looked = conn.execute(sa.select(sa.func.count()).select_from(identities)).scalar()
        found = conn.execute(sa.select(sa.func.count()).select_from(identities)
                             .where(identities.c.descriptor.is_not(None))).scalar()
    return int(looked or 0), int(found or 0)
