"""Self-describing checkpoints: everything index, predict and similar need, in one file.

A checkpoint is a ``torch.save`` of a plain dict::

    {"format": "facefind-checkpoint", "format_version": 1,
     "meta": CheckpointMeta as a dict of JSON-able values,
     "model": state_dict, optional "optimizer" / "scheduler" / "extra" (training state)}

It is read back with ``torch.load(weights_only=True)``, so a file can never run code, and every
kind of damage (missing, truncated, random bytes, someone else's torch file, a newer format)
becomes a one-line ModelError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from facefind.db.errors import ModelError
from facefind.db.files import atomic_replace

log = logging.getLogger(__name__)

FORMAT = "facefind-checkpoint"
FORMAT_VERSION = 1
RETRIEVAL_SET = "f1"  # the threshold set bare attribute names use in queries, when a checkpoint has it


@dataclass
class CheckpointMeta:
    """Everything about a trained model except its weights; plain JSON-able values only."""

    arch: str
    attributes: list[str]
    img_size: tuple[int, int]  # (height, width) of the model input
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    dropout: float
    thresholds: list[float]  # per attribute: present when probability >= threshold (the --threshold-metric set)
    pretrained: bool = False
    # Every calibrated set by objective ("accuracy", "f1"), and what each gave per attribute on
    # the split that chose it: {set: {"precision": [...], "recall": [...], "f1": [...]}}. Empty in
    # checkpoints written before both were kept: ``threshold_sets()`` then falls back.
    threshold_sets: dict[str, list[float]] = field(default_factory=dict)
    threshold_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    train_args: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # epochs completed when these weights were saved
    best_epoch: int = 0
    val_metrics: dict[str, Any] | None = None
    test_metrics: dict[str, Any] | None = None
    train_positive_rate: list[float] | None = None  # for the majority-class baseline
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        try:
            self.img_size = (int(self.img_size[0]), int(self.img_size[1]))
            self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
            self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
            self.thresholds = [float(t) for t in self.thresholds]
            self.threshold_sets = {str(k): [float(t) for t in v] for k, v in dict(self.threshold_sets or {}).items()}
            self.threshold_stats = {str(k): {str(m): [float(x) for x in xs] for m, xs in dict(v).items()}
                                    for k, v in dict(self.threshold_stats or {}).items()}
            self.embedding_dim = int(self.embedding_dim)
        except (TypeError, ValueError, IndexError) as err:
            raise ModelError(f"checkpoint meta holds a malformed value ({err}); retrain the model") from None
        if len(self.thresholds) != len(self.attributes):
            raise ModelError(
                f"checkpoint meta has {len(self.thresholds)} thresholds for {len(self.attributes)} attributes"
            )
        problem = self._problem()
        if problem:
            raise ModelError(f"checkpoint meta is invalid: {problem}; retrain the model")

    def _problem(self) -> str | None:
        """What makes these values unusable (a hand-edited or foreign file), or None."""
        if not isinstance(self.attributes, list) or not all(isinstance(a, str) and a for a in self.attributes):
            return f"attributes must be a list of names, got {self.attributes!r:.80}"
        if len({a.lower() for a in self.attributes}) != len(self.attributes):
            return "attribute names repeat (names are case-insensitive)"
        if min(self.img_size) < 1 or self.embedding_dim < 1:
            return f"input size {self.img_size} and embedding size {self.embedding_dim} must be positive"
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            return f"mean {self.mean} and std {self.std} must be 3 values each, std positive"
        if not all(0.0 <= t <= 1.0 for t in self.thresholds):  # NaN fails this too
            return "thresholds must be probabilities in [0, 1]"
        for name, values in self.threshold_sets.items():
            if len(values) != len(self.attributes) or not all(0.0 <= t <= 1.0 for t in values):
                return f"threshold set {name!r} must hold {len(self.attributes)} probabilities in [0, 1]"
        return None

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    def all_threshold_sets(self) -> dict[str, list[float]]:
        """Every threshold set by objective name.

        A checkpoint from before both sets were kept has one: ``thresholds``, named after the
        ``--threshold-metric`` it was trained with (accuracy unless recorded otherwise).
        """
        if self.threshold_sets:
            return dict(self.threshold_sets)
        return {str(self.train_args.get("threshold_metric") or "accuracy"): list(self.thresholds)}

    def query_set(self) -> str:
        """The threshold set queries should use: the retrieval (F1) set, else the only one there is."""
        sets = self.all_threshold_sets()
        return RETRIEVAL_SET if RETRIEVAL_SET in sets else next(iter(sets))

    def all_threshold_stats(self) -> dict[str, dict[str, list[float]]]:
        """Per-attribute val precision/recall/F1 of each set (an old checkpoint: from ``val_metrics``)."""
        if self.threshold_stats or not self.val_metrics:
            return dict(self.threshold_stats)
        rows = (self.val_metrics or {}).get("per_attribute") or {}
        if not all(a in rows for a in self.attributes):
            return {}
        (name,) = self.all_threshold_sets()
        return {name: {key: [float(rows[a].get(key) or 0.0) for a in self.attributes]
                       for key in ("precision", "recall", "f1")}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as err:
            raise ModelError(f"checkpoint meta is incomplete ({err}); retrain the model") from None


def library_versions() -> dict[str, str]:
    """torch, torchvision and facefind versions, recorded in every checkpoint."""
    out = {}
    for name in ("torch", "torchvision", "facefind"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic_replace``: a crash leaves the old checkpoint or the new one."""
    import torch

    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: Path,
    model: Any,
    meta: CheckpointMeta,
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and ``meta`` atomically; training state is optional.

    ``model`` is an AttributeNet (or anything with ``state_dict``); ``extra`` must hold only
    plain values and tensors (it is loaded with ``weights_only=True``).
    """
    if not meta.versions:
        meta.versions = library_versions()
    if not meta.created:
        meta.created = now_iso()
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if optimizer_state is not None:
        payload["optimizer"] = optimizer_state
    if scheduler_state is not None:
        payload["scheduler"] = scheduler_state
    if extra is not None:
        payload["extra"] = extra
    atomic_torch_save(payload, Path(path))
    return Path(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's raw dict (tensors on the CPU), validated; any damage is a ModelError."""
    path = _existing(Path(path))
    return _parse(path, path)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """``load_checkpoint`` and the hex sha256 of the file, from one read of its bytes.

    An index run needs both (the sha256 names the model in the catalog); reading a large checkpoint
    once instead of twice (or three times) keeps it off the critical path.
    """
    path = _existing(Path(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror}") from None
    return _parse(path, io.BytesIO(data)), hashlib.sha256(data).hexdigest()


def _existing(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"no checkpoint at {path}: train one with `facefind train DATA --out {path}`")
    if not path.is_file():
        raise ModelError(f"{path} is not a file: give the path of a .pt checkpoint")
    return path


def _parse(path: Path, source: Path | io.BytesIO) -> dict[str, Any]:
    """torch.load ``source`` (the file at ``path``, or its bytes) and check it is a facefind checkpoint."""
    import torch  # not at the top: facefind.indexer.predict imports this module and stays torch-free

    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, IndexError, OSError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"{path} is not a readable facefind checkpoint (truncated, corrupt or not a torch file: "
            f"{reason[:160]}); retrain or copy the file again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(
            f"{path} is a PyTorch file but not a facefind checkpoint (no {FORMAT!r} marker); "
            "give a model written by `facefind train`"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"{path} has checkpoint format {version!r}, newer than this facefind reads ({FORMAT_VERSION}); "
            "upgrade facefind"
        )
    if not isinstance(payload.get("meta"), dict) or not isinstance(payload.get("model"), dict):
        raise ModelError(f"{path} is a damaged facefind checkpoint (no meta or weights); retrain the model")
    return payload


def load_model(path: Path, device: Any = "cpu") -> tuple[Any, CheckpointMeta]:
    """Rebuild the model from the file alone; returns ``(model in eval mode on device, meta)``."""
    return build_model(load_checkpoint(path), path, device)


def build_model(payload: dict[str, Any], path: Path, device: Any = "cpu") -> tuple[Any, CheckpointMeta]:
    """``load_model`` from an already loaded checkpoint dict (``path`` names it in errors)."""
    import torch  # torch, and the model module that imports it: see _parse

    from facefind.trainer.model import create_model

    meta = CheckpointMeta.from_dict(payload["meta"])
    model = create_model(
        meta.arch, meta.num_attributes, meta.embedding_dim, meta.dropout, pretrained=meta.pretrained,
        download=False,
    )
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelError(f"{path}: weights do not fit a {meta.arch} model ({first}); retrain the model") from None
    model.to(torch.device(device), memory_format=torch.channels_last)
    model.eval()
    return model, meta


