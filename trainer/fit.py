"""Training: ``fit`` (the whole run) and ``train_one_epoch``; evaluation is ``facefind.trainer.evaluate``.

The official protocol: train on the train split, choose the best epoch and the per-attribute
decision thresholds on val, report test when the folder has test images (the real sample has
none; a folder without val holds out part of train instead, and says so).

Outputs, next to ``--out`` (e.g. ``model.pt``):
    model.pt            the best epoch so far, self-describing (facefind.trainer.checkpoint), saved atomically
    model.history.json  one record per epoch (loss, images/s, val metrics), rewritten each epoch
    model.state.pt      last epoch's weights + optimiser + scheduler, for ``--resume``; removed
                        when the run completes

Every epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a run
resumed after epoch k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from facefind.db.errors import DatasetError, ModelError
from facefind.db.files import atomic_write_json
from facefind.db.paths import default_models_dir
from facefind.trainer import distributed
from facefind.trainer.celeba import load_celeba
from facefind.trainer.checkpoint import (
    CheckpointMeta,
    library_versions,
    load_checkpoint,
    load_model,
    now_iso,
    save_checkpoint,
)
from facefind.trainer.data import (
    DeviceImages,
    FitEvent,
    ImageCache,
    ProgressFn,
    TrainData,
    batch_indices,
    build_shared_cache,
    index_tensor,
    parse_img_size,
    training_input,
)
from facefind.trainer.device import (
    autocast,
    configure,
    describe_device,
    resolve_device,
    synchronize,
)
from facefind.trainer.evaluate import evaluate
from facefind.trainer.metrics import SUMMARY_KEYS, THRESHOLD_METRICS, Metrics
from facefind.trainer.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    check_input_size,
    create_model,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "onecycle", "constant")
CLASS_WEIGHTS = ("none", "pos_weight")
VAL_FRACTION = 0.1  # of train, held out when a folder has no val split
MAX_POS_WEIGHT = 100.0  # caps neg/pos for attributes that are almost never present


@dataclass
class FitConfig:
    """Everything a training run depends on (recorded in the checkpoint as ``train_args``)."""

    data: Path
    out: Path | None = None  # default: <models dir>/<arch>-<img size>.pt
    arch: str = "resnet50"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    dropout: float = 0.3
    embedding_dim: int = 512
    img_size: tuple[int, int] = (224, 224)
    pretrained: bool = False
    augment: bool = True
    class_weights: str = "none"
    threshold_metric: str = "accuracy"
    select_metric: str | None = None  # val metric that picks the best epoch; default follows threshold_metric
    subset: int | None = None
    device: str = "auto"
    workers: int | None = None
    seed: int = 0
    cache_dir: Path | None = None
    eval_batch_size: int = 256
    resume: bool = False

    # Settings a resumed run may change without changing its result.
    RUNTIME = ("data", "out", "device", "workers", "cache_dir", "eval_batch_size", "resume")

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.img_size = parse_img_size(self.img_size)
        if self.out is None:
            self.out = default_models_dir() / f"{self.arch}-{self.img_size[0]}x{self.img_size[1]}.pt"
        self.out = Path(self.out)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        if self.select_metric is None:
            self.select_metric = "mean_accuracy" if self.threshold_metric == "accuracy" else "macro_f1"
        problems = [
            (self.epochs < 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size < 2, f"--batch-size must be at least 2, got {self.batch_size}"),
            (not self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.optimizer not in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}: use {', '.join(OPTIMIZERS)}"),
            (self.schedule not in SCHEDULES, f"unknown schedule {self.schedule!r}: use {', '.join(SCHEDULES)}"),
            (self.class_weights not in CLASS_WEIGHTS,
             f"unknown --class-weights {self.class_weights!r}: use {', '.join(CLASS_WEIGHTS)}"),
            (self.threshold_metric not in THRESHOLD_METRICS,
             f"unknown --threshold-metric {self.threshold_metric!r}: use {', '.join(THRESHOLD_METRICS)}"),
            (self.select_metric not in SUMMARY_KEYS,
             f"unknown selection metric {self.select_metric!r}: use {', '.join(SUMMARY_KEYS)}"),
            (self.subset is not None and self.subset < 2, f"--subset must be at least 2, got {self.subset}"),
        ]
        for bad, message in problems:
            if bad:
                raise ModelError(message)

    def to_args(self) -> dict[str, Any]:
        """JSON-able form (paths as strings, size as a list)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "FitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in names})


def state_path(out: Path) -> Path:
    """Where the resumable training state of the run writing ``out`` lives."""
    return Path(out).with_suffix(".state.pt")


def history_path(out: Path) -> Path:
    return Path(out).with_suffix(".history.json")


@dataclass(frozen=True)
class EpochStats:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FitResult:
    """What a run produced: the checkpoint, its epoch, and its val (and test) metrics."""

    checkpoint: Path
    history_file: Path
    best_epoch: int
    epochs: int
    val: Metrics  # best epoch, calibrated thresholds
    val_at_half: Metrics
    baseline_val: Metrics
    test: Metrics | None
    test_at_half: Metrics | None
    history: list[dict[str, Any]]
    seconds: float
    device: str
    cache: Path
    val_note: str = ""
    baseline_test: Metrics | None = None
    val_by_thresholds: dict[str, Metrics] = field(default_factory=dict)  # each calibrated set ("accuracy", "f1")
    test_by_thresholds: dict[str, Metrics] = field(default_factory=dict)

    @property
    def held_out(self) -> tuple[str, Metrics, Metrics]:
        """(split, metrics, majority baseline) to quote: test when there is one, else val.

        Val chose the epoch and the thresholds, so its figures are optimistic; say which it is.
        """
        if self.test is not None and self.baseline_test is not None:
            return "test", self.test, self.baseline_test
        return "val", self.val, self.baseline_val

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "history": str(self.history_file),
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "device": self.device,
            "seconds": round(self.seconds, 2),
            "train_images_per_s": self.history[-1]["images_per_s"] if self.history else None,
            "val": self.val.summary(),
            "val_at_0_5": self.val_at_half.summary(),
            "val_majority_baseline": self.baseline_val.summary(),
            "test": self.test.summary() if self.test else None,
            "test_at_0_5": self.test_at_half.summary() if self.test_at_half else None,
            "test_majority_baseline": self.baseline_test.summary() if self.baseline_test else None,
            "val_by_thresholds": {k: m.summary() for k, m in self.val_by_thresholds.items()},
            "test_by_thresholds": {k: m.summary() for k, m in self.test_by_thresholds.items()} or None,
            "note": self.val_note or None,
        }


def prepare_data(cfg: FitConfig, device: torch.device, progress: ProgressFn | None = None) -> tuple[TrainData, str]:
    """Load the dataset, apply ``--subset``, fix the split rows, and build or reuse the image cache."""
    ds = load_celeba(cfg.data)
    if cfg.subset is not None and cfg.subset < len(ds):
        rng = np.random.default_rng(cfg.seed)
        ds = ds.subset(np.sort(rng.choice(len(ds), size=cfg.subset, replace=False)))
    rows = {name: ds.indices(name) for name in ("train", "val", "test")}
    note = ""
    if len(rows["train"]) < 2:
        raise DatasetError(f"{cfg.data} has {len(rows['train'])} training images: need at least 2 in the train split")
    if len(rows["val"]) == 0:
        rng = np.random.default_rng(cfg.seed + 1)
        take = max(1, int(round(len(rows["train"]) * VAL_FRACTION)))
        held = np.sort(rng.choice(rows["train"], size=take, replace=False))
        rows["train"] = np.setdiff1d(rows["train"], held)
        rows["val"] = held
        note = f"no val split in {cfg.data}: held out {take} training images for validation"
        log.warning(note)
    check_input_size(cfg.arch, cfg.img_size)

    def on_cache(done: int, total: int) -> None:
        if progress:
            progress(FitEvent("cache", done=done, total=total))

    cache = build_shared_cache(ds.paths, cfg.img_size, root=ds.root, cache_dir=cfg.cache_dir, workers=cfg.workers,
                               device=device, progress=on_cache)
    data = TrainData(
        attributes=list(ds.attributes),
        labels=ds.labels,
        labels_device=torch.from_numpy(np.ascontiguousarray(ds.labels)).to(device),
        rows=rows,
        images=DeviceImages(cache, device),
        cache=cache,
        spec=InputSpec(cfg.img_size, IMAGENET_MEAN, IMAGENET_STD),
        root=ds.root,
    )
    log.info("data: %s; train %d, val %d, test %d images; %d attributes", ds.root, len(rows["train"]),
             len(rows["val"]), len(rows["test"]), len(ds.attributes))
    return data, note


def make_optimizer(cfg: FitConfig, model: nn.Module) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: FitConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """Per-step learning-rate schedule (a LambdaLR, so its state is plain numbers)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        warmup = max(1, int(0.3 * total))
    elif cfg.schedule == "cosine":
        warmup = min(steps_per_epoch, max(1, total // 20))
    else:
        warmup = 0

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            start = 0.04 if cfg.schedule == "onecycle" else 0.0
            return start + (1.0 - start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """The study's class weights: negatives / positives per attribute (capped; 1 when absent)."""
    pos = labels.sum(0).astype(np.float64)
    neg = len(labels) - pos
    weights = np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0)
    return np.clip(weights, 1.0 / MAX_POS_WEIGHT, MAX_POS_WEIGHT)


def train_one_epoch(
    model: nn.Module,
    data: TrainData,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    criterion: nn.Module,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    augment: bool = True,
    on_step: Callable[[int, int, float, float], None] | None = None,
    batches: Sequence[np.ndarray] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> EpochStats:
    """One pass over the train rows; ``on_step(step, steps, mean loss, images/s)`` about twice a second.

    ``batches`` (row indices per step) replaces the shuffled epoch, e.g. for a benchmark. The
    loss is read back from the device only when reported, so the GPU never waits for Python.
    ``shard=(rank, world)``: under DDP every rank draws the same global batches and trains on its
    contiguous part of each (``batch_size`` is the global batch), augmented as one process would.
    """
    model.train()
    if batches is None:
        batches = batch_indices(data.rows["train"], batch_size, shuffle=True, generator=generator, drop_last=True)
    parts = [distributed.shard_slice(len(b), *shard) for b in batches]
    sizes = [len(b) for b in batches]
    batches = [b[part] for b, part in zip(batches, parts)]
    loss_sum = torch.zeros((), device=device)
    seen, last_report = 0, 0.0
    start = time.perf_counter()
    for step, (idx, images) in enumerate(data.images.batches(batches), start=1):
        x = training_input(images, data.spec.mean, data.spec.std, generator if augment else None,
                           part=(parts[step - 1].start, sizes[step - 1]))
        y = data.labels_device.index_select(0, index_tensor(idx, device)).float()
        with autocast(device):
            logits, _ = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        seen += len(idx)
        now = time.perf_counter()
        if on_step and (now - last_report >= 0.5 or step == len(batches)):
            last_report = now
            on_step(step, len(batches), float(loss_sum.item()) / step, seen / max(now - start, 1e-9))
    synchronize(device)
    seconds = time.perf_counter() - start
    return EpochStats(loss=float(loss_sum.item()) / max(1, len(batches)), images=seen, seconds=seconds)


def fit(config: FitConfig, progress: ProgressFn | None = None) -> FitResult:
    """Train, validate every epoch, keep the best checkpoint, report test. See the module docstring.

    Under torchrun this is DDP (facefind.trainer.distributed): every rank trains on its part of each global
    batch, rank 0 validates and writes, and every rank returns rank 0's result.
    """
    with distributed.failures():
        return _fit(config, progress)


def _fit(config: FitConfig, progress: ProgressFn | None) -> FitResult:
    started = time.perf_counter()
    cfg = config
    resume_state: dict[str, Any] | None = None
    if cfg.resume:
        cfg, resume_state = _resume_config(cfg)
    elif state_path(cfg.out).exists():
        log.warning("an interrupted run's state is at %s; starting over (use --resume to continue it)",
                    state_path(cfg.out))

    device = resolve_device(distributed.local_device(cfg.device))
    here = distributed.setup(device)
    progress = progress if here.is_main else None  # one set of progress bars, rank 0's
    if cfg.batch_size < 2 * here.world_size:
        raise ModelError(f"--batch-size {cfg.batch_size} is the global batch: use at least 2 per process "
                         f"({2 * here.world_size} for {here.world_size})")
    configure(device)
    torch.manual_seed(cfg.seed)
    data, note = prepare_data(cfg, device, progress)
    train_labels = data.split_labels("train")
    if resume_state is not None:
        _check_same_data(resume_state, data)

    model = create_model(cfg.arch, len(data.attributes), cfg.embedding_dim, cfg.dropout, cfg.pretrained)
    model.to(device, memory_format=torch.channels_last)
    train_model = distributed.ddp(model, device)
    pos_weight = positive_weights(train_labels) if cfg.class_weights == "pos_weight" else None
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.from_numpy(pos_weight).float().to(device)
    )
    steps = len(batch_indices(data.rows["train"], cfg.batch_size, shuffle=False, drop_last=True))
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, start_epoch = -math.inf, 0, 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        extra = resume_state["extra"]
        history = list(extra["history"])
        best_score, best_epoch, start_epoch = float(extra["best_score"]), int(extra["best_epoch"]), int(extra["epoch"])
        log.info("resuming %s after epoch %d of %d", cfg.out, start_epoch, cfg.epochs)

    base_meta = dict(
        arch=cfg.arch, attributes=data.attributes, img_size=cfg.img_size, mean=data.spec.mean,
        std=data.spec.std, embedding_dim=cfg.embedding_dim, dropout=cfg.dropout, pretrained=cfg.pretrained,
        train_args=cfg.to_args(), train_positive_rate=train_labels.mean(0).tolist(),
        versions=library_versions(),
    )
    emit = progress or (lambda event: None)
    for epoch in range(start_epoch, cfg.epochs):
        generator = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
        torch.manual_seed(_epoch_seed(cfg.seed, epoch) + 1)  # dropout
        emit(FitEvent("epoch", epoch=epoch + 1, epochs=cfg.epochs, steps=steps))

        def on_step(step: int, total: int, loss: float, rate: float, _epoch: int = epoch) -> None:
            emit(FitEvent("step", epoch=_epoch + 1, epochs=cfg.epochs, step=step, steps=total, loss=loss,
                          images_per_s=rate))

        stats = train_one_epoch(train_model, data, optimizer, scheduler, criterion, batch_size=cfg.batch_size,
                                generator=generator, device=device, augment=cfg.augment, on_step=on_step,
                                shard=(here.rank, here.world_size))
        stats = distributed.reduce_stats(stats)
        if not math.isfinite(stats.loss):
            raise ModelError(f"training diverged in epoch {epoch + 1} (the loss is {stats.loss}): "
                             f"lower --lr (now {cfg.lr}) and train again")
        if not here.is_main:
            distributed.barrier()  # rank 0 validates and writes the checkpoints
            continue
        emit(FitEvent("eval", epoch=epoch + 1, epochs=cfg.epochs))
        outputs = evaluate(model, data, "val", cfg.eval_batch_size)
        sets, set_stats = outputs.calibrate_sets()
        thresholds = sets[cfg.threshold_metric]
        val = outputs.metrics(thresholds)
        val_half = outputs.metrics(0.5)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "val_loss": outputs.loss(pos_weight),
            "lr": float(scheduler.get_last_lr()[0]),
            "images_per_s": round(stats.images_per_s, 1),
            "seconds": round(stats.seconds, 2),
            "val": val.summary(),
            "val_at_0_5": val_half.summary(),
            "val_by_thresholds": {name: outputs.metrics(t).summary() for name, t in sets.items()},
        }
        history.append(record)
        score = val.value(cfg.select_metric)
        calibrated = dict(thresholds=thresholds.tolist(), threshold_sets={k: v.tolist() for k, v in sets.items()},
                          threshold_stats=set_stats)
        if score > best_score or best_epoch == 0:
            best_score, best_epoch = score, epoch + 1
            meta = CheckpointMeta(**base_meta, **calibrated, history=history, epoch=epoch + 1,
                                  best_epoch=best_epoch, val_metrics=val.to_json(), created=now_iso())
            save_checkpoint(cfg.out, model, meta)
        last_meta = CheckpointMeta(**base_meta, **calibrated, history=history, epoch=epoch + 1,
                                   best_epoch=best_epoch, val_metrics=val.to_json(), created=now_iso())
        save_checkpoint(state_path(cfg.out), model, last_meta, optimizer.state_dict(), scheduler.state_dict(),
                        extra={"epoch": epoch + 1, "history": history, "best_score": best_score,
                               "best_epoch": best_epoch, "config": cfg.to_args(),
                               "n_rows": {k: int(len(v)) for k, v in data.rows.items()},
                               "attributes": data.attributes})
        atomic_write_json(history_path(cfg.out), {"best_epoch": best_epoch, "select_metric": cfg.select_metric,
                                                  "epochs": history})
        log.debug("epoch %d: %s", epoch + 1, record)
        emit(FitEvent("epoch_end", epoch=epoch + 1, epochs=cfg.epochs, record=record))
        distributed.barrier()

    result = _finish(cfg, data, device, history, best_epoch, pos_weight, note, started, emit) if here.is_main else None
    return distributed.broadcast(result)


def _finish(
    cfg: FitConfig,
    data: TrainData,
    device: torch.device,
    history: list[dict[str, Any]],
    best_epoch: int,
    pos_weight: np.ndarray | None,
    note: str,
    started: float,
    emit: ProgressFn,
) -> FitResult:
    """Reload the best epoch, measure it on val (and test), and write the final checkpoint."""
    model, meta = load_model(cfg.out, device)
    sets = meta.all_threshold_sets()
    val_outputs = evaluate(model, data, "val", cfg.eval_batch_size)
    val, val_half = val_outputs.metrics(meta.thresholds), val_outputs.metrics(0.5)
    val_by_set = {name: val_outputs.metrics(t) for name, t in sets.items()}
    baseline = val_outputs.baseline(meta.train_positive_rate)
    test = test_half = test_baseline = None
    test_by_set: dict[str, Metrics] = {}
    if len(data.rows["test"]):
        emit(FitEvent("test", epoch=best_epoch, epochs=cfg.epochs))
        test_outputs = evaluate(model, data, "test", cfg.eval_batch_size)
        test, test_half = test_outputs.metrics(meta.thresholds), test_outputs.metrics(0.5)
        test_by_set = {name: test_outputs.metrics(t) for name, t in sets.items()}
        test_baseline = test_outputs.baseline(meta.train_positive_rate)
    else:
        log.info("no test images in %s: test metrics are not reported", cfg.data)
    meta.history = history
    meta.val_metrics = val.to_json()
    meta.test_metrics = test.to_json() if test else None
    meta.epoch = len(history)
    save_checkpoint(cfg.out, model, meta)
    atomic_write_json(history_path(cfg.out), {"best_epoch": best_epoch, "select_metric": cfg.select_metric,
                                              "epochs": history, "test": test.summary() if test else None})
    state_path(cfg.out).unlink(missing_ok=True)
    return FitResult(
        checkpoint=cfg.out, history_file=history_path(cfg.out), best_epoch=best_epoch, epochs=len(history),
        val=val, val_at_half=val_half, baseline_val=baseline, test=test, test_at_half=test_half,
        baseline_test=test_baseline, val_by_thresholds=val_by_set, test_by_thresholds=test_by_set,
        history=history, seconds=time.perf_counter() - started, device=describe_device(device),
        cache=data.cache.path, val_note=note,
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**62)


def _resume_config(cfg: FitConfig) -> tuple[FitConfig, dict[str, Any]]:
    """The interrupted run's saved config (runtime settings from ``cfg``) and its state."""
    path = state_path(cfg.out)
    if not path.exists():
        if cfg.out.exists():
            raise ModelError(f"{cfg.out} is a finished run (no {path.name} beside it): nothing to resume; "
                             "train again without --resume")
        raise ModelError(f"no interrupted run to resume at {path}: train without --resume")
    state = load_checkpoint(path)
    extra = state.get("extra")
    if not isinstance(extra, dict) or "config" not in extra or "optimizer" not in state or "scheduler" not in state:
        raise ModelError(f"{path} holds no training state; train again without --resume")
    saved = dict(extra["config"])
    for name in FitConfig.RUNTIME:
        saved[name] = getattr(cfg, name)
    saved["resume"] = True
    return FitConfig.from_args(saved), state


def _check_same_data(state: dict[str, Any], data: TrainData) -> None:
    extra = state["extra"]
    rows = {k: int(len(v)) for k, v in data.rows.items()}
    if extra.get("attributes") != data.attributes or extra.get("n_rows") != rows:
        raise ModelError(
            f"the dataset differs from the interrupted run's ({extra.get('n_rows')} rows then, {rows} now): "
            "resume with the same DATA, or train without --resume"
        )


