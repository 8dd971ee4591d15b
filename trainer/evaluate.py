"""Evaluation, kept apart from training: a model's outputs on one split, and metrics from them.

``evaluate(model, data, split)`` runs the forward pass once and returns an ``Evaluation`` (labels,
logits, probabilities); its ``metrics(thresholds)`` turns them into ``Metrics`` at any threshold
set, so the epoch loop, the end-of-run report and ``evaluate_checkpoint`` (the eval-only mode
behind `facefind evaluate`) all take the same path from logits to numbers, as torchvision's
references keep ``evaluate`` apart from ``train_one_epoch``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from facefind.db.errors import DatasetError
from facefind.trainer.celeba import load_celeba
from facefind.trainer.checkpoint import CheckpointMeta, load_model
from facefind.trainer.data import DeviceImages, FitEvent, ProgressFn, TrainData, batch_indices, build_cache, find_cache
from facefind.trainer.device import autocast, configure, resolve_device
from facefind.trainer.metrics import (THRESHOLD_METRICS, Metrics, calibrate_thresholds, compute_metrics,
                             majority_baseline)
from facefind.trainer.model import InputSpec, preprocess

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, data: TrainData, rows: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Logits (len(rows), K) as float32 numpy, in ``rows`` order; the model is left in eval mode."""
    model.eval()
    device = data.labels_device.device
    out = []
    for _, images in data.images.batches(batch_indices(rows, batch_size, shuffle=False)):
        with autocast(device):
            logits, _ = model(preprocess(images, data.spec))
        out.append(logits.float().cpu())
    if not out:
        return np.zeros((0, len(data.attributes)), dtype=np.float32)
    return torch.cat(out).numpy()


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, in float64 (the tanh form never overflows)."""
    return 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))


@dataclass(frozen=True)
class Evaluation:
    """A model's outputs on one split: enough to score it at any thresholds without another pass."""

    split: str
    attributes: list[str]
    labels: np.ndarray  # uint8 (N, K)
    logits: np.ndarray  # float32 (N, K)

    @cached_property
    def probs(self) -> np.ndarray:
        return sigmoid(self.logits)

    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    def metrics(self, thresholds: Sequence[float] | np.ndarray | float = 0.5) -> Metrics:
        """All metrics at ``thresholds`` (one number, or one per attribute)."""
        return compute_metrics(self.labels, self.probs, thresholds, self.attributes, self.split)

    def calibrate(self, metric: str) -> np.ndarray:
        """Per-attribute thresholds that maximise ``metric`` (accuracy or f1) on this split."""
        return calibrate_thresholds(self.labels, self.probs, metric)

    def calibrate_sets(self) -> tuple[dict[str, np.ndarray], dict[str, dict[str, list[float]]]]:
        """Thresholds for every objective (accuracy, f1), and the per-attribute precision, recall
        and F1 each gives on this split (stored in the checkpoint for `facefind info`)."""
        sets = {name: self.calibrate(name) for name in THRESHOLD_METRICS}
        stats = {}
        for name, thresholds in sets.items():
            m = self.metrics(thresholds)
            stats[name] = {"precision": m.precision.tolist(), "recall": m.recall.tolist(), "f1": m.f1.tolist()}
        return sets, stats

    def baseline(self, positive_rate: Sequence[float] | None) -> Metrics:
        """The always-majority baseline on this split (majority taken from ``positive_rate``)."""
        return majority_baseline(self.labels, positive_rate, self.attributes, self.split)

    def loss(self, pos_weight: np.ndarray | None = None) -> float:
        """Mean BCE-with-logits, as the training criterion computes it (NaN on an empty split)."""
        if self.logits.size == 0:
            return float("nan")
        criterion = nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else torch.from_numpy(pos_weight))
        return float(criterion(torch.from_numpy(self.logits).double(), torch.from_numpy(self.labels).double()))


def evaluate(model: nn.Module, data: TrainData, split: str, batch_size: int = 256) -> Evaluation:
    """Run ``model`` over the rows of ``split`` once; score the result with ``Evaluation.metrics``."""
    rows = data.rows[split]
    return Evaluation(split=split, attributes=list(data.attributes), labels=data.labels[rows],
                      logits=predict_logits(model, data, rows, batch_size))


# ----------------------------------------------------------------------------- evaluate a checkpoint


@dataclass
class EvalReport:
    """A checkpoint measured on one split: at each of its threshold sets, at 0.5, and the majority
    baseline. ``metrics`` is the accuracy set (``primary``): the one compared with the study's and
    the literature's accuracy figures; ``by_thresholds`` holds every set (e.g. also "f1")."""

    model: Path
    meta: CheckpointMeta
    metrics: Metrics
    at_half: Metrics
    baseline: Metrics
    seconds: float
    note: str = ""
    primary: str = "accuracy"
    by_thresholds: dict[str, Metrics] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``evaluate --json`` schema: the primary set's metrics at the top level (as before),
        every set and 0.5 in full under ``by_thresholds``."""
        out = self.metrics.to_json()
        out["model"] = str(self.model)
        out["arch"] = self.meta.arch
        out["thresholds"] = self.primary
        out["at_0_5"] = self.at_half.summary()
        out["majority_baseline"] = self.baseline.summary()
        out["by_thresholds"] = {name: m.to_json() for name, m in {**self.by_thresholds, "0.5": self.at_half}.items()}
        return out


def evaluate_checkpoint(
    model_path: Path,
    data_path: Path,
    split: str | None = None,
    *,
    device: str = "auto",
    batch_size: int = 256,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Measure a checkpoint on a CelebA-format folder (``split`` None: test, or val when test is empty)."""
    started = time.perf_counter()
    dev = resolve_device(device)
    configure(dev)
    model, meta = load_model(model_path, dev)
    ds = load_celeba(data_path)
    missing = [a for a in meta.attributes if a not in ds.attributes]
    if missing:
        raise DatasetError(f"{data_path} lacks {len(missing)} of the model's attributes (first: {missing[0]}): "
                           "evaluate on data annotated with the same attributes")
    columns = [ds.attributes.index(a) for a in meta.attributes]
    note = ""
    if split is None:
        split = "test" if len(ds.indices("test")) else "val"
        if split == "val":
            note = f"no test images in {data_path}: evaluated on val (where the thresholds were chosen)"
            log.warning(note)
    rows = ds.indices(split)
    if not len(rows):
        raise DatasetError(f"the {split} split of {data_path} has no images: choose another --split")
    full = find_cache(ds.paths, meta.img_size, root=ds.root, cache_dir=cache_dir)
    if full is None:  # decode only what this split needs
        ds = ds.subset(rows)
        rows = np.arange(len(ds))

    def on_cache(done: int, total: int) -> None:
        if progress:
            progress(FitEvent("cache", done=done, total=total))

    cache = full or build_cache(ds.paths, meta.img_size, root=ds.root, cache_dir=cache_dir, workers=workers,
                                device=dev, progress=on_cache)
    labels = np.ascontiguousarray(ds.labels[:, columns])
    data = TrainData(
        attributes=list(meta.attributes), labels=labels, labels_device=torch.from_numpy(labels).to(dev),
        rows={split: rows}, images=DeviceImages(cache, dev), cache=cache,
        spec=InputSpec(meta.img_size, meta.mean, meta.std), root=ds.root,
    )
    if progress:
        progress(FitEvent("eval", total=len(rows)))
    outputs = evaluate(model, data, split, batch_size)
    sets = meta.all_threshold_sets()
    if not meta.threshold_sets:
        log.warning("%s has one threshold set (%s): it predates retrieval thresholds; retrain for both",
                    model_path, next(iter(sets)))
    primary = "accuracy" if "accuracy" in sets else next(iter(sets))
    by_set = {name: outputs.metrics(t) for name, t in sets.items()}
    return EvalReport(
        model=Path(model_path), meta=meta, metrics=by_set[primary], at_half=outputs.metrics(0.5),
        baseline=outputs.baseline(meta.train_positive_rate), seconds=time.perf_counter() - started, note=note,
        primary=primary, by_thresholds=by_set,
    )
