"""Benchmark: end-to-end ``facefind index`` beside a naive study-style pipeline, same files, same run.

    run_index_bench(n=2000) -> dict

Generates ``n`` CelebA-size JPEGs (178x218, ~12 KB: synthetic faces with sensor-like noise so
they compress like photos), writes a freshly initialised checkpoint of ``arch`` (weights do not
change the speed), then times

- facefind: ``facefind.indexer.pipeline.index_folder`` into a fresh index (worker decoding, one forward
  pass per batch, bf16 + channels_last on CUDA, background batch transactions, snapshot + FAISS);
- same_settings: the study's pipeline (a PIL ``Dataset`` + ``DataLoader`` with torchvision
  transforms, one SQLite INSERT per image, committed per batch) at facefind's batch size,
  precision (bf16 autocast on CUDA), memory layout (channels_last) and worker count, so that only
  the pipeline differs; the headline ``speedup`` is over this row;
- study_style: the same pipeline as the study's notebooks ran it: fp32, contiguous, batch 64;
- each facefind stage alone on up to 2,048 of the files (decode, infer, write), to show which
  one bounds the pipeline.

The machines are shared and noisy: compare the ratio, not absolute numbers, across runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.errors import DatasetError
from facefind.indexer.discovery import discover
from facefind.indexer.pipeline import index_folder
from facefind.indexer.reader import ImageReader
from facefind.indexer.routing import on_device
from facefind.indexer.runner import load_runner
from facefind.trainer.checkpoint import CheckpointMeta, load_model, save_checkpoint
from facefind.trainer.device import autocast, available_cpus, describe_device, resolve_device, synchronize
from facefind.trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model
from facefind.trainer.synth import synthesize


NATIVE = (218, 178)  # CelebA aligned crops, (height, width)
_UNIQUE = 256  # distinct JPEGs; the rest are byte copies (decoding cost is per file, not per content)
_NAIVE_BATCH = 64


def make_jpegs(folder: Path, n: int, seed: int = 0) -> float:
    """Write ``n`` CelebA-size JPEGs into ``folder`` (flat, ``%06d.jpg``); returns their mean size."""
    folder.mkdir(parents=True, exist_ok=True)
    k = min(n, _UNIQUE)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "s", n=k, seed=seed)
        rng = np.random.default_rng(seed)
        blobs = []
        for path in sorted((Path(tmp) / "s" / "img_align_celeba").glob("*.jpg")):
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.float32)
            noisy = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
    for i in range(n):
        (folder / f"{i + 1:06d}.jpg").write_bytes(blobs[i % k])
    return float(np.mean([len(b) for b in blobs]))


def make_checkpoint(path: Path, arch: str, img_size: tuple[int, int], num_attributes: int = 40) -> Path:
    """A freshly initialised checkpoint (speed does not depend on the weights)."""
    torch.manual_seed(0)
    model = create_model(arch, num_attributes, embedding_dim=512, pretrained=False)
    meta = CheckpointMeta(
        arch=arch, attributes=[f"attr_{i}" for i in range(num_attributes)], img_size=img_size,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding_dim=512, dropout=0.3,
        thresholds=[0.5] * num_attributes,
    )
    return save_checkpoint(path, model, meta)


def run_index_bench(
    n: int = 2000,
    out: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    arch: str = "resnet50",
    img_size: int | None = None,
    workers: int | None = None,
    baseline: bool = True,
    repeats: int = 1,
) -> dict[str, Any]:
    """Time facefind's indexer and the naive pipeline on the same ``n`` generated JPEGs.

    ``img_size`` is a square model input side; None means CelebA's native 218x178 (no resize).
    With ``repeats`` > 1 the pipelines take turns that many times and each reports its median.
    ``out`` keeps the work folder (images, model, indexes); by default a temporary one is removed.
    """
    if repeats < 1:
        raise DatasetError(f"--repeats must be at least 1, got {repeats}")
    dev = resolve_device(device)
    size = NATIVE if img_size is None else (int(img_size), int(img_size))
    work = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="facefind-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = work / "images"
        t = time.perf_counter()
        mean_bytes = make_jpegs(images, n)
        generate_s = time.perf_counter() - t
        model_path = make_checkpoint(work / "model.pt", arch, size)
        settings = {"same_settings": dict(batch_size=batch_size, like_facefind=True),
                    "study_style": dict(batch_size=_NAIVE_BATCH, like_facefind=False)} if baseline else {}
        seconds: dict[str, list[float]] = {"facefind": [], **{name: [] for name in settings}}
        for _ in range(repeats):  # the pipelines take turns, so a change in load hits each alike
            _drop(work / "index")
            report = index_folder(images, model_path, work / "index", batch_size=batch_size, device=str(dev),
                                  workers=workers)
            seconds["facefind"].append(report.seconds)
            for name, kwargs in settings.items():
                seconds[name].append(naive_pipeline(images, model_path, dev, workers, work / f"naive-{name}.db",
                                                    **kwargs))
        rate = {name: n / float(np.median(s)) for name, s in seconds.items()}
        result: dict[str, Any] = {
            "n": n,
            "arch": arch,
            "img_size": list(size),
            "device": describe_device(dev),
            "batch_size": batch_size,
            "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
            "memory_format": "channels_last",
            "workers": workers if workers is not None else available_cpus(),
            "mean_jpeg_bytes": round(mean_bytes),
            "generate_seconds": round(generate_s, 2),
            "indexed": report.indexed,
            "seconds": round(float(np.median(seconds["facefind"])), 3),
            "images_per_second": round(rate["facefind"], 1),
            "runs": [round(n / s, 1) for s in seconds["facefind"]],
            "timings": {k: round(v, 3) for k, v in report.timings.items()},  # the last round's
        }
        result["stage_images_per_second"] = _stages(images, model_path, dev, batch_size, workers, min(n, 2048))
        if baseline:
            result["baselines"] = {
                name: {
                    "batch_size": kwargs["batch_size"],
                    "precision": result["precision"] if kwargs["like_facefind"] else "fp32",
                    "memory_format": "channels_last" if kwargs["like_facefind"] else "contiguous",
                    "workers": result["workers"],
                    "seconds": round(float(np.median(seconds[name])), 3),
                    "images_per_second": round(rate[name], 1),
                    "runs": [round(n / s, 1) for s in seconds[name]],
                    "speedup": round(rate["facefind"] / rate[name], 2),
                }
                for name, kwargs in settings.items()
            }
            result["speedup"] = result["baselines"]["same_settings"]["speedup"]
        return result
    finally:
        if out is None:
            shutil.rmtree(work, ignore_errors=True)


def _stages(
    images: Path, model_path: Path, device: Any, batch_size: int, workers: int | None, n: int
) -> dict[str, float]:
    """Each facefind stage alone, images/s: decode (reader), infer (runner), write (catalog)."""
    files = discover(images).files[:n]
    runner = load_runner(model_path, device)
    on_gpu = device.type == "cuda"
    out: dict[str, float] = {}
    with ImageReader(runner.img_size, batch_size, workers, gpu_jpeg=on_gpu) as reader:
        first = next(reader.batches(files[:batch_size]))  # starts the workers: start-up is not speed
        first_pixels = on_device(first, runner.img_size, device)[1].cpu().numpy()
        t = time.perf_counter()
        count = 0
        for batch in reader.batches(files):
            count += len(on_device(batch, runner.img_size, device)[0])
        synchronize(device)
        out["decode"] = round(count / max(time.perf_counter() - t, 1e-9), 1)
    pixels = torch.from_numpy(np.stack([first_pixels[i % len(first_pixels)] for i in range(batch_size)]))
    runner(pixels)  # warm-up (cuDNN autotuning, lazy init)
    reps = max(1, n // batch_size)
    t = time.perf_counter()
    for _ in range(reps):
        probs, emb = runner(pixels)
    out["infer"] = round(reps * batch_size / (time.perf_counter() - t), 1)
    with tempfile.TemporaryDirectory() as tmp, Catalog.open(tmp) as catalog:
        model_id = catalog.register_model("0" * 64, "bench", [f"a{i}" for i in range(probs.shape[1])],
                                          [0.5] * probs.shape[1], emb.shape[1], None)
        rows = [IndexedImage(f.path, f.size, f.mtime, 178, 218, probs[i % len(probs)], emb[i % len(emb)])
                for i, f in enumerate(files)]
        t = time.perf_counter()
        for start in range(0, len(rows), batch_size):
            catalog.write_batch(model_id, rows[start:start + batch_size])
        out["write"] = round(len(rows) / (time.perf_counter() - t), 1)
    return out


class _PilDataset:
    """The study's loader: PIL open, RGB, torchvision Resize + ToTensor + Normalize, one file per item."""

    def __init__(self, paths: list[str], size: tuple[int, int], mean: Any, std: Any) -> None:
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(size), transforms.ToTensor(), transforms.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), i


def naive_pipeline(
    images: Path, model_path: Path, device: Any, workers: int | None, db_path: Path,
    batch_size: int = _NAIVE_BATCH, like_facefind: bool = False,
) -> float:
    """Seconds for the study-style pipeline over every JPEG in ``images`` (INSERT per image).

    ``like_facefind`` runs the model as facefind does (channels_last, the device's autocast: bf16
    on CUDA); otherwise fp32 in the contiguous layout, as the study did.
    """
    paths = sorted(str(p) for p in images.glob("*.jpg"))
    start = time.perf_counter()
    model, meta = load_model(model_path, device)
    layout = torch.channels_last if like_facefind else torch.contiguous_format
    model = model.to(memory_format=layout)
    loader = DataLoader(
        _PilDataset(paths, meta.img_size, meta.mean, meta.std), batch_size=batch_size,
        num_workers=workers if workers is not None else available_cpus(),
    )
    _drop(db_path)
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE predictions (path TEXT PRIMARY KEY, probs BLOB, embedding BLOB)")
    with torch.no_grad():
        for x, idx in loader:
            with autocast(device) if like_facefind else contextlib.nullcontext():
                logits, emb = model(x.to(device).contiguous(memory_format=layout))
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            emb = emb.float().cpu().numpy()
            for j, i in enumerate(idx.tolist()):
                conn.execute("INSERT INTO predictions VALUES (?, ?, ?)",
                             (paths[i], probs[j].tobytes(), emb[j].tobytes()))
            conn.commit()
    conn.close()
    return time.perf_counter() - start


def _drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
