"""Training throughput: facefind's pipeline against a study-like baseline, on the same data, in one run.

    facefind   decoded uint8 cache (on the GPU when it fits), augmentation on the device,
               channels_last, bf16 autocast on CUDA, AdamW, the real ``train_one_epoch``
    baseline   what the study did: a torch DataLoader whose workers open each JPEG with PIL,
               resize, flip and normalise it, fp32, batch 64, Adam

Both train the same architecture at the same input size for the same number of timed steps
(after warm-up steps that are not timed). Cache building is timed separately: it is paid once
per dataset and size, not per epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from db.errors import DatasetError
from trainer.device import configure, describe_device, resolve_device, synchronize
from trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model

log = logging.getLogger(__name__)

CELEBA_TRAIN_IMAGES = 162_770  # one epoch of the official train split


@dataclass(frozen=True)
class BenchRow:
    name: str
    pipeline: str
    batch_size: int
    precision: str
    steps: int
    images_per_s: float

    @property
    def epoch_seconds(self) -> float:
        """Time for one epoch of CelebA's official train split at this rate."""
        return CELEBA_TRAIN_IMAGES / self.images_per_s if self.images_per_s > 0 else float("inf")


@dataclass
class TrainBenchResult:
    arch: str
    img_size: tuple[int, int]
    device: str
    images: int
    cache_seconds: float
    cache_reused: bool
    rows: list[BenchRow] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """facefind images/s over the baseline's, when both ran."""
        rates = {r.name: r.images_per_s for r in self.rows}
        if "facefind" in rates and rates.get("baseline"):
            return rates["facefind"] / rates["baseline"]
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch, "img_size": list(self.img_size), "device": self.device, "images": self.images,
            "cache_seconds": round(self.cache_seconds, 2), "cache_reused": self.cache_reused,
            "rows": [dict(vars(r), images_per_s=round(r.images_per_s, 1), epoch_seconds=round(r.epoch_seconds, 1))
                     for r in self.rows],
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
) -> dict[str, Any]:
    """Measure training images/s of facefind's pipeline and (``baseline``) the study-like one.

    ``data`` is a CelebA-format folder; without it, ``n`` synthetic faces are drawn into a
    temporary folder (with its own cache) that is removed afterwards. Returns
    ``TrainBenchResult.to_json()`` plus ``images_per_second`` / ``baseline_images_per_second``.
    """
    if data is None:
        import tempfile

        from trainer.synth import synthesize

        with tempfile.TemporaryDirectory(prefix="facefind-bench-train-") as tmp:
            (progress or (lambda message: None))(f"drawing {n:,} synthetic faces")
            synthesize(Path(tmp) / "faces", n=n, seed=0)
            return run_train_bench(Path(tmp) / "faces", arch, img_size, batch_size, steps, warmup, device, workers,
                                   Path(tmp) / "cache", baseline, baseline_batch_size, n, progress)
    result = _measure(Path(data), arch, img_size, batch_size, steps, warmup, device, workers, cache_dir, baseline,
                      baseline_batch_size, progress)
    out = result.to_json()
    rates = {row["name"]: row["images_per_s"] for row in out["rows"]}
    out["images_per_second"] = rates.get("facefind")
    out["baseline_images_per_second"] = rates.get("baseline")
    return out


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
) -> TrainBenchResult:
    from trainer.fit import (
        FitConfig,
        make_optimizer,
        make_scheduler,
        prepare_data,
        train_one_epoch,
    )

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

    say(f"facefind: {arch}, batch {batch_size}, {steps} steps")
    torch.manual_seed(0)
    model = create_model(arch, len(train_data.attributes)).to(dev, memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, steps)
    criterion = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    size = min(batch_size, len(rows))

    def batches(count: int) -> list[np.ndarray]:
        return [rows[torch.randint(len(rows), (size,), generator=generator).numpy()] for _ in range(count)]

    kwargs = dict(batch_size=size, generator=generator, device=dev, augment=True)
    train_one_epoch(model, train_data, optimizer, scheduler, criterion, batches=batches(warmup), **kwargs)
    stats = train_one_epoch(model, train_data, optimizer, scheduler, criterion, batches=batches(steps), **kwargs)
    precision = "bf16 autocast" if dev.type == "cuda" else "fp32"
    result.rows.append(BenchRow("facefind", "uint8 cache + on-device augmentation, channels_last", size,
                                precision, steps, stats.images_per_s))
    del model, optimizer, train_data
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    if baseline:
        say(f"baseline: PIL DataLoader, fp32, batch {baseline_batch_size}, {steps} steps")
        from trainer.celeba import load_celeba

        ds = load_celeba(data)
        rate = _baseline_rate(ds.paths, ds.labels, arch, cfg.img_size, baseline_batch_size, steps, warmup, dev,
                              workers)
        result.rows.append(BenchRow("baseline", "PIL DataLoader (the study's way)",
                                    min(baseline_batch_size, len(ds)), "fp32", steps, rate))
    return result


class _PilDataset(torch.utils.data.Dataset):
    """The study's input pipeline: PIL open, resize, random flip, to float, normalise, per image."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, size: tuple[int, int]) -> None:
        self.paths, self.labels, self.size = list(paths), labels, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, torch.from_numpy(self.labels[i].astype(np.float32))


def _baseline_rate(
    paths: Sequence[Path], labels: np.ndarray, arch: str, size: tuple[int, int], batch_size: int, steps: int,
    warmup: int, device: torch.device, workers: int | None,
) -> float:
    """Images/s of the study-like loop (timed after ``warmup`` steps)."""
    from trainer.data import _default_workers

    batch_size = min(batch_size, len(paths))  # drop_last with a bigger batch would yield nothing
    if batch_size < 2:
        raise DatasetError("the baseline needs at least 2 images")
    loader = torch.utils.data.DataLoader(
        _PilDataset(paths, labels, size), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers if workers is not None else min(8, _default_workers()),
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    torch.manual_seed(0)
    model = create_model(arch, labels.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    done, seen, start = 0, 0, 0.0
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                synchronize(device)
                start, seen = time.perf_counter(), 0
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the usual per-step logging sync
            done += 1
            seen += len(x)
            if done >= warmup + steps:
                break
    synchronize(device)
    return seen / (time.perf_counter() - start)
