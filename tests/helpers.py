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

    from trainer.checkpoint import CheckpointMeta, save_checkpoint
    from trainer.decode import decode_paths
    from trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model, preprocess

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
    from db.catalog import Catalog
    from indexer.pipeline import index_folder
    from trainer.celeba import read_attributes
    from trainer.synth import synthesize

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
        preds = catalog.load_predictions(record.id)
    probs = {p: dict(zip(record.attributes, row.tolist())) for p, row in zip(preds.paths, preds.probs)}
    labels = {str(root / "img_align_celeba" / name): dict(zip(ann.attributes, (row > 0).tolist()))
              for name, row in zip(ann.names, ann.labels)}
    return Built(root, images, model, base / "index", list(ann.attributes),
                 dict(zip(record.attributes, record.thresholds)),
                 dict(zip(preds.paths, preds.ids.tolist())), probs, labels)
