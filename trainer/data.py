"""Training data on tensors: the decoded-image cache, on-device augmentation and batching.

JPEG decoding is the bottleneck of a naive trainer (DESIGN.md: PIL decodes ~1,000 images/s per
process, an H200 trains resnet50 at ~4,600/s). So each image is decoded once, resized to the
training size and stored in a uint8 ``(N, 3, H, W)`` ``.npy`` file under facefind's cache folder
(never the dataset folder), keyed by dataset root, file list and size, and memory-mapped by every
later run. Epochs then only gather rows, and augmentation (flip, small shift/scale, colour jitter)
runs batched on the training device.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from facefind.db.errors import DatasetError, ImageError
from facefind.db.files import atomic_replace, atomic_write_json
from facefind.db.paths import default_cache_dir
from facefind.trainer import distributed
from facefind.trainer.device import available_cpus
from facefind.trainer.decode import decode_paths
from facefind.trainer.model import InputSpec, normalize

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: pixels from facefind.trainer.decode (EXIF, alpha, CMYK applied)
NATIVE_SIZE = (218, 178)  # CelebA's aligned crops, (height, width)
_CHUNK = 64  # images per decode task

CountCallback = Callable[[int, int], None]  # (done, total)


def parse_img_size(value: str | int | Sequence[int]) -> tuple[int, int]:
    """``64`` -> (64, 64); ``"218x178"`` -> (218, 178) (height x width); ``"native"`` -> CelebA's 218x178."""
    if isinstance(value, int):
        h = w = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "native":
            return NATIVE_SIZE
        try:
            parts = [int(p) for p in text.replace("*", "x").split("x")]
        except ValueError:
            raise DatasetError(f"bad image size {value!r}: use N, HxW (e.g. 218x178) or native") from None
        if len(parts) == 1:
            h = w = parts[0]
        elif len(parts) == 2:
            h, w = parts
        else:
            raise DatasetError(f"bad image size {value!r}: use N, HxW (e.g. 218x178) or native")
    else:
        h, w = (int(v) for v in value)
    if not (8 <= h <= 1024 and 8 <= w <= 1024):
        raise DatasetError(f"image size {h}x{w} is out of range: use 8..1024 pixels per side")
    return int(h), int(w)


@dataclass(frozen=True)
class ImageCache:
    """Decoded images at one size: ``images`` is a read-only memory map of uint8 (N, 3, H, W)."""

    path: Path
    images: np.ndarray
    img_size: tuple[int, int]
    built: bool  # True when this run decoded the images, False when it reused the file

    def __len__(self) -> int:
        return int(self.images.shape[0])


def cache_key(root: Path, paths: Sequence[Path], img_size: Sequence[int]) -> str:
    """Hex key for (dataset root, exact file list, size): a different subset or size is another cache."""
    digest = hashlib.sha256()
    digest.update(f"facefind-cache-v{CACHE_VERSION}\n{Path(root).resolve()}\n{img_size[0]}x{img_size[1]}\n".encode())
    for path in paths:
        digest.update(str(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:24]


def find_cache(
    paths: Sequence[Path], img_size: Sequence[int], *, root: Path, cache_dir: Path | None = None
) -> ImageCache | None:
    """The complete cache for exactly these ``paths`` at ``img_size``, or None when there is none yet."""
    size = (int(img_size[0]), int(img_size[1]))
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).expanduser().resolve()
    key = cache_key(Path(root), paths, size)
    npy, info = folder / f"{key}.npy", folder / f"{key}.json"
    if not (npy.is_file() and info.is_file()):
        return None
    try:
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as err:
        log.warning("image cache %s is unreadable (%s); rebuilding it", npy, err)
        return None
    if images.shape != (len(paths), 3, size[0], size[1]) or images.dtype != np.uint8:
        log.warning("image cache %s has shape %s; rebuilding it", npy, images.shape)
        return None
    return ImageCache(npy, images, size, built=False)


def build_cache(
    paths: Sequence[Path],
    img_size: Sequence[int],
    *,
    root: Path,
    cache_dir: Path | None = None,
    workers: int | None = None,
    device: torch.device | None = None,
    progress: CountCallback | None = None,
) -> ImageCache:
    """Return the cache for ``paths`` at ``img_size``, decoding the images only if it does not exist.

    Images are decoded by ``facefind.trainer.decode`` (EXIF orientation, alpha, CMYK, 16-bit: the very pixels
    the indexer and ``predict`` get) on ``workers`` CPU threads: libjpeg, Pillow's decoders and the
    resize release the GIL, so threads scale without the start-up cost and fork hazards of processes. The cache is built once per dataset and size, so the
    GPU decoder is not worth its complexity here (the indexer uses it). ``device`` is accepted
    for symmetry and ignored. The file is written under a temporary name and renamed when
    complete, so a killed run never leaves a half-written cache that a later run would trust.
    """
    size = (int(img_size[0]), int(img_size[1]))
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder.expanduser().resolve()
    root = Path(root).resolve()
    if folder == root or root in folder.parents:
        raise DatasetError(f"cache folder {folder} is inside the dataset folder {root}: choose another --cache-dir")
    if not paths:
        raise DatasetError(f"no images to cache from {root}")
    existing = find_cache(paths, size, root=root, cache_dir=folder)
    if existing is not None:
        log.info("image cache: reusing %s (%d images at %dx%d)", existing.path, len(paths), *size)
        if progress:
            progress(len(paths), len(paths))
        return existing
    key = cache_key(root, paths, size)
    npy, info = folder / f"{key}.npy", folder / f"{key}.json"
    expected = (len(paths), 3, size[0], size[1])
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"cannot create cache folder {folder}: {err.strerror}; use --cache-dir") from None
    log.info("image cache: decoding %d images at %dx%d into %s", len(paths), size[0], size[1], npy)

    def fill(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=expected)
        try:
            _decode_into(out, paths, size, workers or available_cpus(), progress)
        except ImageError as err:
            raise DatasetError(f"{err}: remove or replace that file (every image is needed to train)") from None
        out.flush()

    atomic_replace(npy, fill)
    atomic_write_json(info, {"version": CACHE_VERSION, "root": str(root), "n": len(paths), "img_size": list(size),
                             "first": str(paths[0]), "last": str(paths[-1])})
    return ImageCache(npy, np.load(npy, mmap_mode="r"), size, built=True)


def build_shared_cache(
    paths: Sequence[Path],
    img_size: Sequence[int],
    *,
    root: Path,
    cache_dir: Path | None = None,
    workers: int | None = None,
    device: torch.device | None = None,
    progress: CountCallback | None = None,
) -> ImageCache:
    """``build_cache`` for every process of a torchrun job: one decode and one file per node.

    Local rank 0 decodes (or reuses) the cache while the other ranks of its node wait at a
    barrier; they then memory-map the same file, so the page cache holds one copy per node
    whatever the number of processes. Outside torchrun this is ``build_cache``.
    """
    here = distributed.info()
    if not here.distributed:
        return build_cache(paths, img_size, root=root, cache_dir=cache_dir, workers=workers, device=device,
                           progress=progress)
    cache = None
    if here.is_local_main:
        cache = build_cache(paths, img_size, root=root, cache_dir=cache_dir, workers=workers, device=device,
                            progress=progress)
    distributed.barrier()
    if cache is None:
        cache = find_cache(paths, img_size, root=root, cache_dir=cache_dir)
        if cache is None:
            raise DatasetError(f"rank {here.rank}: local rank 0 built the image cache but it is not in "
                               f"{cache_dir or default_cache_dir()}: give every process of a node the same --cache-dir")
    return cache


def _decode_into(
    out: np.ndarray,
    paths: Sequence[Path],
    size: tuple[int, int],
    workers: int,
    progress: CountCallback | None,
) -> None:
    """Fill ``out`` with the decoded images, chunk by chunk, reporting progress."""
    chunks = [(start, min(start + _CHUNK, len(paths))) for start in range(0, len(paths), _CHUNK)]
    done = 0

    def task(bounds: tuple[int, int]) -> int:
        start, end = bounds
        out[start:end] = decode_paths(paths[start:end], size)
        return end - start

    threads_before = torch.get_num_threads()
    parallel = workers > 1 and len(chunks) > 1
    if parallel:
        torch.set_num_threads(1)  # one decode per thread; intra-op threads would oversubscribe
    try:
        if parallel:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
                for count in pool.map(task, chunks):
                    done += count
                    if progress:
                        progress(done, len(paths))
        else:
            for bounds in chunks:
                done += task(bounds)
                if progress:
                    progress(done, len(paths))
    finally:
        torch.set_num_threads(threads_before)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without stalling the CPU behind queued GPU work.

    A copy from pageable memory makes CUDA wait for the stream to drain first; from pinned memory
    it is queued like a kernel, so the CPU keeps running ahead of the GPU.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def index_tensor(idx: np.ndarray, device: torch.device) -> torch.Tensor:
    """Row indices as an int64 tensor on ``device``."""
    return to_device(torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)), device)


class DeviceImages:
    """The cached images as batches on the training device.

    On CUDA the whole cache is copied to GPU memory when it fits in half of what is free (all of
    CelebA at 218x178 is 23.6 GB: it fits an H200); otherwise each batch is gathered on the CPU,
    pinned, and copied asynchronously while the previous batch trains. On the CPU batches are
    gathered straight from the memory map.
    """

    def __init__(self, cache: ImageCache, device: torch.device, on_device: bool | None = None) -> None:
        self.device = device
        self.cache = cache
        self.resident: torch.Tensor | None = None
        if device.type == "cuda":
            if on_device is None:
                free, _ = torch.cuda.mem_get_info(device)
                on_device = cache.images.nbytes < 0.5 * free
            if on_device:
                self.resident = torch.empty(cache.images.shape, dtype=torch.uint8, device=device)
                step = 1024  # images per pinned staging copy (~150 MB at 224 px)
                for start in range(0, len(cache), step):
                    chunk = torch.from_numpy(np.ascontiguousarray(cache.images[start:start + step]))
                    self.resident[start:start + step].copy_(chunk.pin_memory(), non_blocking=True)
                torch.cuda.synchronize(device)
                log.info("image cache: %.1f GB resident on %s", cache.images.nbytes / 1e9, device)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the device for rows ``idx``."""
        if self.resident is not None:
            return self.resident.index_select(0, index_tensor(idx, self.device))
        rows = torch.from_numpy(self.cache.images[idx])
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows

    def batches(
        self, batches: Sequence[np.ndarray], prefetch: int = 2, background: bool | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(idx, images)`` for each index array.

        ``background`` (default: when batches come from host memory to a GPU) gathers and copies
        the next batches on a helper thread while the current one trains.
        """
        if background is None:
            background = self.resident is None and self.device.type == "cuda"
        if not background:
            for idx in batches:
                yield idx, self.take(idx)
            return
        queue: Queue = Queue(maxsize=prefetch)
        stop = threading.Event()

        def producer() -> None:
            try:
                for idx in batches:
                    if stop.is_set():
                        return
                    queue.put((idx, self.take(idx)))
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                queue.put(err)
                return
            queue.put(None)

        thread = threading.Thread(target=producer, name="batch-prefetch", daemon=True)
        thread.start()
        try:
            while (item := queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    queue.get_nowait()
                except Empty:
                    thread.join(timeout=0.05)


def batch_indices(
    rows: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """Split ``rows`` into batches (shuffled with ``generator`` when asked).

    Training drops a ragged last batch (and never yields a batch of one: BatchNorm cannot train on
    it); evaluation keeps everything.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if shuffle:
        rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
    if drop_last:
        if len(rows) < 2:
            raise DatasetError(f"need at least 2 training images, got {len(rows)}")
        batch_size = min(batch_size, len(rows))
        count = len(rows) // batch_size
        return [rows[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random training transforms (all applied per image, batched)."""

    flip: float = 0.5  # probability of a horizontal flip (CelebA attributes are left/right symmetric)
    scale: float = 0.08  # zoom factor in [1 - scale, 1 + scale]
    shift: float = 0.06  # translation as a fraction of the image size
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    config: AugmentConfig = AugmentConfig(),
    part: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> augmented float in [0, 1], same shape and device.

    Random parameters come from ``generator`` (CPU, seeded per epoch) so a resumed run draws the
    same augmentations as an uninterrupted one. Flip, zoom and shift are one ``grid_sample``.
    ``part=(offset, total)`` says these images are rows offset.. of a global batch of ``total``
    split between DDP ranks: the parameters of the whole batch are drawn and this part's taken,
    so each image gets what a single process would have given it.
    """
    b = images.shape[0]
    device = images.device
    offset, total = part if part is not None else (0, b)
    rows = slice(offset, offset + b)

    def rand() -> torch.Tensor:
        return torch.rand(total, generator=generator)[rows]

    def uniform(spread: float) -> torch.Tensor:
        return (rand() * 2 - 1) * spread

    flip = torch.where(rand() < config.flip, -1.0, 1.0)
    scale = 1.0 + uniform(config.scale)
    tx, ty = uniform(config.shift) * 2, uniform(config.shift) * 2  # grid coordinates span [-1, 1]
    jitter = torch.stack([1.0 + uniform(config.brightness), 1.0 + uniform(config.contrast),
                          1.0 + uniform(config.saturation)], dim=1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    theta, jitter = to_device(theta, device), to_device(jitter, device)

    x = images.float().div_(255.0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness, contrast, saturation = (jitter[:, i].view(b, 1, 1, 1) for i in range(3))
    x = x * brightness
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * saturation + gray
    return x.clamp_(0.0, 1.0)


def training_input(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None,
    config: AugmentConfig = AugmentConfig(),
    part: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 cache rows -> normalised channels_last model input; augmented when ``generator`` is given.

    Without a generator this equals ``facefind.trainer.model.preprocess`` on images already at model size.
    ``part``: see ``augment``.
    """
    x = augment(images, generator, config, part) if generator is not None else images.float().div_(255.0)
    return normalize(x, mean, std).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class FitEvent:
    """Progress of a run, for the CLI's progress bars (the library never prints).

    kind: "cache" (done/total images decoded), "epoch" (an epoch starts: steps known), "step"
    (loss and images/s so far this epoch), "eval" (validating), "epoch_end" (record holds the
    epoch's history entry), "test" (evaluating the best epoch on test).
    """

    kind: str
    epoch: int = 0  # 1-based
    epochs: int = 0
    step: int = 0
    steps: int = 0
    done: int = 0
    total: int = 0
    loss: float | None = None
    images_per_s: float | None = None
    record: dict[str, Any] | None = None


ProgressFn = Callable[[FitEvent], None]


@dataclass
class TrainData:
    """A dataset ready for training: rows of each split, labels on the device, the image cache."""

    attributes: list[str]
    labels: np.ndarray  # uint8 (N, K)
    labels_device: torch.Tensor
    rows: dict[str, np.ndarray]
    images: DeviceImages
    cache: ImageCache
    spec: InputSpec
    root: Path

    def split_labels(self, split: str) -> np.ndarray:
        return self.labels[self.rows[split]]
