"""Multi-label metrics and per-attribute threshold calibration (numpy only, no torch).

CelebA's attributes are imbalanced (Bald: 2% positive), so one mean accuracy hides a lot: a
model that always answers the majority class scores 0.818. Each attribute therefore gets accuracy,
precision, recall, F1, balanced accuracy, average precision and support; the summary adds macro
means and micro (pooled) precision/recall/F1, and the majority-class baseline for contrast.
A prediction is positive when ``probability >= threshold``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

THRESHOLD_METRICS = ("accuracy", "f1")
PER_ATTRIBUTE_KEYS = ("accuracy", "precision", "recall", "f1", "balanced_accuracy", "average_precision")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@dataclass(frozen=True)
class Metrics:
    """Per-attribute confusion counts on one split at one set of thresholds, and what follows from them."""

    split: str
    attributes: list[str]
    n_images: int
    thresholds: np.ndarray  # (K,)
    tp: np.ndarray  # (K,) int counts
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    average_precision: np.ndarray  # threshold-free; NaN where the split has no positive

    @property
    def support(self) -> np.ndarray:
        """Positives per attribute."""
        return self.tp + self.fn

    @property
    def accuracy(self) -> np.ndarray:
        return _ratio(self.tp + self.tn, np.full(len(self.attributes), self.n_images))

    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> np.ndarray:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def balanced_accuracy(self) -> np.ndarray:
        """Mean of the true-positive and true-negative rates (the one defined when a class is absent)."""
        pos, neg = self.tp + self.fn, self.tn + self.fp
        rates = np.stack([np.where(pos > 0, _ratio(self.tp, pos), np.nan),
                          np.where(neg > 0, _ratio(self.tn, neg), np.nan)])
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: an empty split
            return np.nanmean(rates, axis=0)

    @property
    def mean_accuracy(self) -> float:
        return float(self.accuracy.mean())

    @property
    def macro_precision(self) -> float:
        return float(self.precision.mean())

    @property
    def macro_recall(self) -> float:
        return float(self.recall.mean())

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())

    @property
    def mean_balanced_accuracy(self) -> float:
        values = self.balanced_accuracy
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    @property
    def mean_average_precision(self) -> float:
        ap = self.average_precision[~np.isnan(self.average_precision)]
        return float(ap.mean()) if ap.size else float("nan")

    @property
    def micro_precision(self) -> float:
        return float(_ratio(self.tp.sum(), self.tp.sum() + self.fp.sum()))

    @property
    def micro_recall(self) -> float:
        return float(_ratio(self.tp.sum(), self.tp.sum() + self.fn.sum()))

    @property
    def micro_f1(self) -> float:
        tp = self.tp.sum()
        return float(_ratio(2 * tp, 2 * tp + self.fp.sum() + self.fn.sum()))

    def value(self, name: str) -> float:
        """A headline number by name (``mean_accuracy``, ``macro_f1``, ``micro_f1``, ...)."""
        if name not in SUMMARY_KEYS:
            raise ValueError(f"unknown metric {name!r}: use one of {', '.join(SUMMARY_KEYS)}")
        return float(getattr(self, name))

    def summary(self) -> dict[str, float | None]:
        """The headline numbers (means over attributes and pooled micro scores)."""
        return {key: _clean(self.value(key)) for key in SUMMARY_KEYS}

    def per_attribute(self) -> dict[str, dict[str, Any]]:
        columns = {key: getattr(self, key) for key in PER_ATTRIBUTE_KEYS}
        support = self.support
        out = {}
        for i, name in enumerate(self.attributes):
            row: dict[str, Any] = {key: _clean(float(values[i])) for key, values in columns.items()}
            row["support"] = int(support[i])
            row["threshold"] = float(self.thresholds[i])
            out[name] = row
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``evaluate --json`` schema (issue 3): split, n_images, the means, per_attribute."""
        return {
            "split": self.split,
            "n_images": self.n_images,
            "mean_accuracy": _clean(self.mean_accuracy),
            "macro_f1": _clean(self.macro_f1),
            "micro_precision": _clean(self.micro_precision),
            "micro_recall": _clean(self.micro_recall),
            "micro_f1": _clean(self.micro_f1),
            "mean_balanced_accuracy": _clean(self.mean_balanced_accuracy),
            "per_attribute": self.per_attribute(),
        }

    def select(self, names: Sequence[str]) -> "Metrics":
        """The same metrics restricted to the attributes ``names`` (micro scores pool only those)."""
        idx = [self.attributes.index(n) for n in names]
        return Metrics(
            split=self.split, attributes=[self.attributes[i] for i in idx], n_images=self.n_images,
            thresholds=self.thresholds[idx], tp=self.tp[idx], fp=self.fp[idx], fn=self.fn[idx],
            tn=self.tn[idx], average_precision=self.average_precision[idx],
        )


SUMMARY_KEYS = (
    "mean_accuracy", "macro_precision", "macro_recall", "macro_f1", "mean_balanced_accuracy",
    "mean_average_precision", "micro_precision", "micro_recall", "micro_f1",
)


def _clean(value: float) -> float | None:
    """NaN -> None so the JSON stays valid."""
    return None if math.isnan(value) else float(value)


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} must both be (N, K)")
    return labels, probs


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    attributes: Sequence[str] | None = None,
    split: str = "",
) -> Metrics:
    """All metrics for ground truth ``labels`` (N, K) 0/1 and ``probs`` (N, K) in [0, 1]."""
    y, p = _check(labels, probs)
    n, k = y.shape
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (k,)).copy()
    pred = p >= thr
    tp = (pred & y).sum(0).astype(np.int64)
    fp = (pred & ~y).sum(0).astype(np.int64)
    fn = (~pred & y).sum(0).astype(np.int64)
    return Metrics(
        split=split,
        attributes=list(attributes) if attributes is not None else [str(i) for i in range(k)],
        n_images=n,
        thresholds=thr,
        tp=tp, fp=fp, fn=fn, tn=n - tp - fp - fn,
        average_precision=np.array([average_precision(y[:, j], p[:, j]) for j in range(k)]),
    )


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision-recall curve (as sklearn's ``average_precision_score``).

    Tied scores form one step. NaN when there is no positive.
    """
    y = np.asarray(labels).astype(bool)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], y[order]
    tp = np.cumsum(y)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = tp[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def calibrate_thresholds(labels: np.ndarray, probs: np.ndarray, metric: str = "accuracy") -> np.ndarray:
    """Per-attribute thresholds that maximise ``metric`` (accuracy or f1) on these labels.

    Every distinct cut of the sorted probabilities is scored exactly (cumulative counts). 0.5 is
    kept unless another threshold is strictly better, and among equally good cuts the one closest
    to 0.5 wins, so the result is never worse than 0.5 on this data and moves no further than it
    must. Cuts sit halfway between neighbouring probabilities, which generalises better than the
    probabilities themselves.
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown threshold metric {metric!r}: use one of {', '.join(THRESHOLD_METRICS)}")
    y, p = _check(labels, probs)
    n, k = y.shape
    out = np.full(k, 0.5)
    if n == 0:
        return out
    for j in range(k):
        order = np.argsort(-p[:, j], kind="mergesort")
        s, t = p[order, j], y[order, j]
        positives = int(t.sum())
        # Predict the top m as positive, for m = 0..n; only cuts between distinct values are real.
        tp = np.r_[0, np.cumsum(t)]
        m = np.arange(n + 1)
        fp = m - tp
        valid = np.ones(n + 1, dtype=bool)
        valid[1:n] = s[:-1] != s[1:]
        cut = np.empty(n + 1)
        cut[0] = np.nextafter(s[0], np.inf)
        cut[n] = s[-1]
        cut[1:n] = (s[:-1] + s[1:]) / 2
        score = _score(tp, fp, positives, n, metric)
        at_half = _score(np.array([(t & (s >= 0.5)).sum()]), np.array([((~t) & (s >= 0.5)).sum()]),
                         positives, n, metric)[0]
        best = score[valid].max()
        if best <= at_half:
            continue
        winners = np.flatnonzero(valid & (score == best))
        out[j] = float(cut[winners[np.argmin(np.abs(cut[winners] - 0.5))]])
    return out


def _score(tp: np.ndarray, fp: np.ndarray, positives: int, n: int, metric: str) -> np.ndarray:
    """Accuracy or F1 from counts (the same formulas as ``compute_metrics``)."""
    fn = positives - tp
    if metric == "accuracy":
        return (tp + (n - positives - fp)) / n
    return _ratio(2 * tp, 2 * tp + fp + fn)


def majority_baseline(
    labels: np.ndarray,
    positive_rate: Sequence[float] | np.ndarray | None = None,
    attributes: Sequence[str] | None = None,
    split: str = "",
) -> Metrics:
    """Metrics of always answering each attribute's majority class.

    The majority comes from ``positive_rate`` (the training split's, stored in the checkpoint)
    when given, else from ``labels`` themselves.
    """
    y = np.asarray(labels)
    rate = np.asarray(positive_rate if positive_rate is not None else y.mean(0), dtype=np.float64)
    probs = np.broadcast_to((rate >= 0.5).astype(np.float64), y.shape)
    return compute_metrics(y, probs, 0.5, attributes, split)
