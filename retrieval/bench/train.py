"""Training throughput: facefind's pipeline against two baselines, on the same data, in one run.

    facefind       decoded uint8 cache (on the GPU when it fits), augmentation on the device,
                   channels_last, bf16 autocast on CUDA, AdamW, the real ``train_one_epoch``
    same_settings  facefind's own ``train_one_epoch`` (same batch, precision, memory layout,
                   optimizer, augmentation and sync policy) fed by a DataLoader whose workers decode
                   every batch from the files with the cache's own decoder: the one thing changed
                   is "decode once into a cache" against "decode every step"
    study_style    what the study's code did: DataLoader workers open each JPEG with PIL, resize,
                   flip and normalise it; fp32, contiguous layout, batch 64, Adam, ``loss.item()``
                   every step

Every loader gets the same worker count (``workers``, default every available CPU) and is
started before the warm-up steps, so no timed step pays for spawning workers. Each row trains the
same architecture at the same input size for the same number of timed steps, after warm-up steps
that are not timed. Cache building is timed separately: it is paid once per dataset and size, not
per epoch. The headline ``speedup`` is over ``same_settings``; ``baselines`` holds every ratio.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from facefind.db.errors import DatasetError
from facefind.trainer.celeba import load_celeba
from facefind.trainer.decode import decode_paths
from facefind.trainer.device import available_cpus, configure, describe_device, resolve_device, synchronize
from facefind.trainer.fit import FitConfig, make_optimizer, make_scheduler, prepare_data, train_one_epoch
from facefind.trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model
from facefind.trainer.synth import synthesize


CELEBA_TRAIN_IMAGES = 162_770  # one epoch of the official train split
BASELINES = ("same_settings", "study_style")


@dataclass(frozen=True)
class BenchRow:
    """One pipeline's settings and its measured rate."""

    name: str
    pipeline: str
    batch_size: int
    precision: str
    memory_format: str
    optimizer: str
    workers: int  # decoder processes per step (facefind: the threads that built the cache once)
    sync: str  # when the loss is read back from the device
    steps: int
    images_per_s: float  # the median over rounds
    runs: tuple[float, ...] = ()  # images/s of each round

    @property
    def epoch_seconds(self) -> float:
        """Time for one epoch of CelebA's official train split at this rate."""
        return CELEBA_TRAIN_IMAGES / self.images_per_s if self.images_per_s > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self), images_per_s=round(self.images_per_s, 1), epoch_seconds=round(self.epoch_seconds, 1))


@dataclass
class TrainBenchResult:
    arch: str
    img_size: tuple[int, int]
    device: str
    images: int
    cache_seconds: float
    cache_reused: bool
    rows: list[BenchRow] = field(default_factory=list)

    def ratio(self, baseline: str) -> float | None:
        """facefind images/s over ``baseline``'s, when both ran."""
        rates = {r.name: r.images_per_s for r in self.rows}
        if "facefind" in rates and rates.get(baseline):
            return rates["facefind"] / rates[baseline]
        return None

    @property
    def speedup(self) -> float | None:
        """The headline: facefind over the same-settings baseline (only the input pipeline differs)."""
        return self.ratio("same_settings")

    def to_json(self) -> dict[str, Any]:
        rows = {r.name: r for r in self.rows}
        facefind = rows.get("facefind")
        baselines = {}
        for name in BASELINES:
            if name in rows:
                ratio = self.ratio(name)
                baselines[name] = dict(rows[name].to_json(), speedup=None if ratio is None else round(ratio, 2))
        return {
            "arch": self.arch, "img_size": list(self.img_size), "device": self.device, "images": self.images,
            "cache_seconds": round(self.cache_seconds, 2), "cache_reused": self.cache_reused,
            "rows": [r.to_json() for r in self.rows],
            "images_per_second": None if facefind is None else round(facefind.images_per_s, 1),
            "baselines": baselines,
            "speedup": None if self.speedup is None else round(self.speedup, 2),
        }


def run_train_bench(
    data: Path | None = None,
    arch: str = "resnet50",
    img_size: str | int | Sequence[int] = 224,
    batch_size: int = 256,
    steps: int = 20,
    warmup: int = 3,
    device: str = "auto",
    workers: int | None = None,
    cache_dir: Path | None = None,
    baseline: bool = True,
    baseline_batch_size: int = 64,
    n: int = 512,
    progress: Callable[[str], None] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Measure training images/s of facefind's pipeline and (``baseline``) of both baselines.

    ``data`` is a CelebA-format folder; without it, ``n`` synthetic faces are drawn into a
    temporary folder (with its own cache) that is removed afterwards. ``baseline_batch_size`` is
    the study-style row's batch; the same-settings row uses ``batch_size``. With ``repeats`` > 1
    the rows take turns that many times and each reports its median. Returns
    ``TrainBenchResult.to_json()``.
    """
    if data is None:
        with tempfile.TemporaryDirectory(prefix="facefind-bench-train-") as tmp:
            (progress or (lambda message: None))(f"drawing {n:,} synthetic faces")
            synthesize(Path(tmp) / "faces", n=n, seed=0)
            return run_train_bench(Path(tmp) / "faces", arch, img_size, batch_size, steps, warmup, device, workers,
                                   Path(tmp) / "cache", baseline, baseline_batch_size, n, progress, repeats)
    if repeats < 1:
        raise DatasetError(f"--repeats must be at least 1, got {repeats}")
    result = _measure(Path(data), arch, img_size, batch_size, steps, warmup, device, workers, cache_dir, baseline,
                      baseline_batch_size, progress, repeats)
    return result.to_json()


def _measure(
    data: Path,
    arch: str,
    img_size: str | int | Sequence[int],
    batch_size: int,
    steps: int,
    warmup: int,
    device: str,
    workers: int | None,
    cache_dir: Path | None,
    baseline: bool,
    baseline_batch_size: int,
    progress: Callable[[str], None] | None,
    repeats: int,
) -> TrainBenchResult:
    say = progress or (lambda message: None)
    dev = resolve_device(device)
    configure(dev)
    cfg = FitConfig(data=Path(data), out=Path("bench.pt"), arch=arch, img_size=img_size, batch_size=batch_size,
                    device=str(dev), workers=workers, cache_dir=cache_dir, schedule="constant")
    say("preparing the image cache")
    started = time.perf_counter()
    train_data, _ = prepare_data(cfg, dev)
    cache_seconds = time.perf_counter() - started
    rows = np.concatenate([train_data.rows["train"], train_data.rows["val"]])
    result = TrainBenchResult(arch, cfg.img_size, describe_device(dev), len(rows), cache_seconds,
                              cache_reused=not train_data.cache.built)
    n_workers = workers if workers is not None else available_cpus()
    precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
    size = min(batch_size, len(rows))
    plan = _plan(rows, size, warmup + steps)  # the same row batches for facefind and same_settings

    facefind = BenchRow("facefind", "uint8 cache + on-device augmentation", size, precision, "channels_last",
                        cfg.optimizer, n_workers, "per report", steps, 0.0)
    measures: list[tuple[BenchRow, Callable[[], float]]] = [
        (facefind, lambda: _facefind_rate(cfg, train_data, plan, warmup, dev))]
    if baseline:
        dataset = load_celeba(data)
        paths = dataset.paths
        study_size = min(baseline_batch_size, len(paths))  # drop_last with a bigger batch would yield nothing
        same = dataclasses.replace(facefind, name="same_settings",
                                   pipeline="DataLoader decodes every step + facefind's step")
        study = BenchRow("study_style", "PIL DataLoader (the study's way)", study_size, "fp32", "contiguous", "adam",
                         n_workers, "every step", steps, 0.0)
        measures += [
            (same, lambda: _facefind_rate(cfg, dataclasses.replace(
                train_data, images=_DecodedPerStep(paths, cfg.img_size, plan, n_workers, dev)), plan, warmup, dev)),
            (study, lambda: _study_rate(paths, dataset.labels, arch, cfg.img_size, study_size, steps, warmup, dev,
                                        n_workers)),
        ]
    runs: dict[str, list[float]] = {row.name: [] for row, _ in measures}
    for i in range(repeats):  # rows take turns, so a change in the machine's load hits each alike
        for row, measure in measures:
            say(f"round {i + 1}/{repeats}: {row.name}, batch {row.batch_size}, {steps} steps")
            runs[row.name].append(measure())
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    for row, _ in measures:
        rates = runs[row.name]
        result.rows.append(dataclasses.replace(row, images_per_s=float(np.median(rates)),
                                               runs=tuple(round(r, 1) for r in rates)))
    return result


def _plan(rows: np.ndarray, size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` batches of ``size`` rows drawn with replacement (a benchmark needs no epoch order)."""
    if size < 2:
        raise DatasetError("the benchmark needs at least 2 images")
    generator = torch.Generator().manual_seed(seed)
    return [rows[torch.randint(len(rows), (size,), generator=generator).numpy()] for _ in range(count)]


def _facefind_rate(cfg: Any, data: Any, plan: list[np.ndarray], warmup: int, device: torch.device) -> float:
    """Images/s of ``facefind.trainer.fit.train_one_epoch`` over ``plan[warmup:]``, after ``plan[:warmup]``."""
    torch.manual_seed(0)
    model = create_model(cfg.arch, len(data.attributes)).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(plan))
    kwargs = dict(batch_size=len(plan[0]), generator=torch.Generator().manual_seed(0), device=device, augment=True)
    criterion = nn.BCEWithLogitsLoss()
    train_one_epoch(model, data, optimizer, scheduler, criterion, batches=plan[:warmup], **kwargs)
    stats = train_one_epoch(model, data, optimizer, scheduler, criterion, batches=plan[warmup:], **kwargs)
    return stats.images_per_s


class _FileImages(torch.utils.data.Dataset):
    """One file per item, decoded and resized by the cache builder's own function: uint8 (3, H, W)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_paths([self.paths[i]], self.size)[0])


class _DecodedPerStep:
    """``DeviceImages``' interface over files decoded anew for every batch by DataLoader workers.

    The loader walks ``plan`` once; its workers start here, before any step, and keep prefetching
    across the warm-up/timed boundary, as they would across the steps of a real epoch.
    """

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], plan: list[np.ndarray], workers: int,
                 device: torch.device) -> None:
        self.device = device
        loader = torch.utils.data.DataLoader(_FileImages(paths, size), batch_sampler=[b.tolist() for b in plan],
                                             num_workers=workers, pin_memory=device.type == "cuda")
        self._batches = iter(loader)

    def batches(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for idx in batches:
            yield idx, next(self._batches).to(self.device, non_blocking=True)


class _PilDataset(torch.utils.data.Dataset):
    """The study's input pipeline: PIL open, resize, random flip, to float, normalise, per image."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, size: tuple[int, int]) -> None:
        self.paths, self.labels, self.size = list(paths), labels, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, torch.from_numpy(self.labels[i].astype(np.float32))


def _study_rate(
    paths: Sequence[Path], labels: np.ndarray, arch: str, size: tuple[int, int], batch_size: int, steps: int,
    warmup: int, device: torch.device, workers: int,
) -> float:
    """Images/s of the study-like loop (timed after ``warmup`` steps; workers started before them)."""
    plan = _plan(np.arange(len(paths)), batch_size, warmup + steps, seed=1)
    loader = torch.utils.data.DataLoader(
        _PilDataset(paths, labels, size), batch_sampler=[b.tolist() for b in plan], num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(0)
    model = create_model(arch, labels.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    for done, (x, y) in enumerate(loader):
        if done == warmup:
            synchronize(device)
            start, seen = time.perf_counter(), 0
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the study's per-step logging sync
        seen += len(x)
    synchronize(device)
    return seen / (time.perf_counter() - start)
