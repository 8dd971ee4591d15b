"""Reader stage: files on disk -> batches of decoded uint8 images, with bad files reported, not raised.

    discover(folder)          image files (jpg/jpeg/png/webp/bmp, any case) with size and mtime
    split_unchanged(...)      drop files the catalog already holds with the same size and mtime
    ImageReader.batches(...)  decode in worker processes, in order, a bounded number of batches ahead

Every image becomes RGB uint8 (3, H, W) at the checkpoint's input size: EXIF orientation applied,
CMYK / greyscale / palette / 16-bit converted, alpha composited on a neutral grey, animated files
read at their first frame. The resize is ``trainer.model.resize_images``, the function the trainer's
image cache uses, so indexed pixels are the pixels the model was trained on. A file that cannot be
read becomes a ``Failure(path, reason)`` with a specific reason ('empty file', 'truncated JPEG',
'not an image (text file)', 'decompression bomb (N pixels)', 'file vanished', ...); it never raises.

On CUDA (``gpu_jpeg=True``) workers only check JPEG headers and hand the bytes back, and
``decode_on_device`` decodes them in one nvJPEG call; files nvJPEG should not or cannot handle
(EXIF-rotated, CMYK, truncated, other formats) take the CPU path.

Face detection plugs in as ``crop``: a picklable callable RGB uint8 (H, W, 3) -> cropped array, or
None when the image holds no face (recorded as a failure 'no face found').
"""

from __future__ import annotations

import errno
import io
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import stat
import struct
import threading
import time
import warnings
from collections import deque
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from db.errors import DatasetError
from trainer.celeba import IMAGE_EXTENSIONS  # one list of what counts as an image file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKGROUND = (128, 128, 128)  # what transparent pixels become: neutral grey, no colour cast
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
# Larger files are refused unread: even an uncompressed 32-bit BMP at DEFAULT_MAX_PIXELS is ~360 MB,
# and reading a renamed video or disk image whole would exhaust memory.
MAX_FILE_BYTES = 512 << 20

Crop = Callable[[np.ndarray], "np.ndarray | None"]

# Leading bytes of the formats we accept, to name the format of a file that fails to decode.
_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "WebP": (b"RIFF",),
}
_BOMB = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class FileEntry:
    """One image file as discovered: normalised absolute path, size in bytes, mtime in seconds."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Failure:
    """A file that could not be indexed, with a reason a person can act on."""

    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What ``discover`` found: candidate image files, and entries that are already unreadable."""

    files: list[FileEntry]
    failures: list[Failure]


@dataclass
class DecodedBatch:
    """One batch out of the reader. ``pixels[i]`` belongs to ``entries[i]``.

    ``jpeg_entries``/``jpeg_bytes`` are only used on the GPU path: JPEGs still to be decoded on the
    device (see ``decode_on_device``); ``jpeg_sizes`` are their (width, height).
    """

    entries: list[FileEntry]
    pixels: np.ndarray  # uint8 (n, 3, h, w)
    sizes: list[tuple[int, int]]  # original (width, height) after EXIF orientation
    failures: list[Failure] = field(default_factory=list)
    jpeg_entries: list[FileEntry] = field(default_factory=list)
    jpeg_bytes: list[bytes] = field(default_factory=list)
    jpeg_sizes: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0  # worker CPU time spent decoding (summed over workers)


class Unreadable(Exception):
    """Internal: a file cannot become an image; ``str(err)`` is the reason recorded."""


# --------------------------------------------------------------------------------------------
# discovery


def discover(folder: str | os.PathLike[str], recursive: bool = False) -> Discovery:
    """List the image files in ``folder`` (and below it when ``recursive``), sorted by path.

    Paths are absolute with the folder resolved, but a symlinked file keeps its own name. Dangling
    symlinks and symlink loops come back as failures; symlinked folders are not followed (no loops).
    Raises DatasetError when ``folder`` is missing, not a folder or unreadable.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise DatasetError(f"no such folder: {root}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: give the folder that holds the images")
    root = root.resolve()
    files: list[FileEntry] = []
    failures: list[Failure] = []
    pending = [str(root)]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                entries = list(it)
        except OSError as err:
            if current == str(root):
                raise DatasetError(f"cannot read {root}: {err.strerror}: check its permissions") from None
            failures.append(Failure(current, f"unreadable folder ({err.strerror})"))
            continue
        for entry in entries:
            if recursive and entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
                continue
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.normpath(entry.path)
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as err:
                failures.append(Failure(path, _stat_reason(err, entry.is_symlink())))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # a folder named like an image, a socket, ...
            files.append(FileEntry(path, int(st.st_size), float(st.st_mtime)))
    files.sort(key=lambda f: f.path)
    failures.sort(key=lambda f: f.path)
    return Discovery(files, failures)


def _stat_reason(err: OSError, is_link: bool) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop"
    if err.errno == errno.ENOENT:
        return "dangling symlink" if is_link else "file vanished"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot stat ({err.strerror})"


def split_unchanged(
    files: Sequence[FileEntry], known: dict[str, tuple[int, float]]
) -> tuple[list[FileEntry], int]:
    """Files to (re)index and the number skipped because the catalog has them with equal size+mtime."""
    todo: list[FileEntry] = []
    unchanged = 0
    for f in files:
        seen = known.get(f.path)
        if seen is not None and int(seen[0]) == f.size and math.isclose(float(seen[1]), f.mtime, abs_tol=1e-6):
            unchanged += 1
        else:
            todo.append(f)
    return todo, unchanged


# --------------------------------------------------------------------------------------------
# decoding one file (runs in worker processes)


def load_rgb(source: str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read one image file (a path, or its bytes) as RGB uint8 (H, W, 3); raise Unreadable(reason)."""
    data = _read_bytes(source) if isinstance(source, str) else source
    if not data:
        raise Unreadable("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF, palette transparency, big images
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise Unreadable(_bomb_reason(str(err))) from None
        except UnidentifiedImageError:
            raise Unreadable(_unidentified_reason(data)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:  # a broken header
            raise Unreadable(_decode_reason(_sniff(data) or "image", err)) from None
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise Unreadable(f"decompression bomb ({pixels} pixels)")
        if pixels == 0:
            raise Unreadable("image has no pixels (0 width or height)")
        fmt = img.format or _sniff(data) or "image"
        try:
            img.seek(0)  # animated GIF/WebP/PNG: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return np.asarray(to_rgb(img), dtype=np.uint8)
        except Image.DecompressionBombError as err:
            raise Unreadable(_bomb_reason(str(err))) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
            raise Unreadable(_decode_reason(fmt, err)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit scaled to 8, alpha composited on ``BACKGROUND``."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError:
        raise Unreadable(f"unsupported colour mode {img.mode}") from None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = fh.read(MAX_FILE_BYTES + 1) if size <= MAX_FILE_BYTES else b""
    except OSError as err:
        is_link = os.path.islink(path)
        if err.errno == errno.ENOENT and not is_link:
            raise Unreadable("file vanished") from None
        if err.errno == errno.EISDIR:
            raise Unreadable("is a folder") from None
        raise Unreadable(_stat_reason(err, is_link)) from None
    if size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
        raise Unreadable(f"file too large for an image ({max(size, len(data)) / 2**20:,.0f} MiB, "
                         f"limit {MAX_FILE_BYTES >> 20} MiB)")
    return data


def _sniff(data: bytes) -> str | None:
    """The format named by the file's first bytes; a file shorter than a signature matches its prefix."""
    for name, signatures in _MAGIC.items():
        for sig in signatures:
            if data.startswith(sig) or (len(data) < len(sig) and sig.startswith(data)):
                if name == "WebP" and len(data) >= 12 and data[8:12] != b"WEBP":
                    continue
                return name
    return None


def _unidentified_reason(data: bytes) -> str:
    fmt = _sniff(data)
    if fmt is not None:
        return f"truncated {fmt}" if len(data) < 1024 else f"corrupt {fmt} header"
    head = data[:512]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "not an image (text file)"
    return "not an image"


def _decode_reason(fmt: str, err: Exception) -> str:
    msg = str(err)
    if "truncated" in msg.lower() or isinstance(err, EOFError):
        return f"truncated {fmt}"
    if isinstance(err, Unreadable):
        return msg
    return f"corrupt {fmt} ({msg[:80]})" if msg else f"corrupt {fmt}"


def _bomb_reason(msg: str) -> str:
    found = _BOMB.search(msg)
    return f"decompression bomb ({found.group(1)} pixels)" if found else "decompression bomb"


def resize_chw(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (3, h, w) with the trainer's resize (antialiased bilinear)."""
    chw = rgb.transpose(2, 0, 1).copy()  # contiguous and writable (Pillow's arrays are read-only)
    if chw.shape[1:] == tuple(size):
        return chw
    import torch

    from trainer.model import resize_images

    return resize_images(torch.from_numpy(chw)[None], size)[0].numpy()


def _jpeg_for_device(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when nvJPEG can decode ``data`` exactly as the CPU path would, else None.

    Only complete baseline/progressive JPEGs in RGB or greyscale with no EXIF rotation qualify; the
    rest (CMYK, rotated, truncated, garbage after the end marker) go through Pillow.
    """
    if not data.startswith(b"\xff\xd8\xff") or not data.endswith(b"\xff\xd9"):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            if img.width * img.height > max_pixels or img.getexif().get(0x0112, 1) != 1:
                return None
            return img.width, img.height
    except Exception:  # noqa: BLE001 - anything odd: let the CPU path produce the reason
        return None


def decode_files(
    entries: Sequence[FileEntry],
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: Crop | None = None,
    gpu_jpeg: bool = False,
) -> DecodedBatch:
    """Decode ``entries`` to one batch; a bad file becomes a Failure. Runs inside a worker process."""
    start = time.process_time()
    ok: list[FileEntry] = []
    arrays: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    out = DecodedBatch([], np.zeros((0, 3, *size), np.uint8), [])
    for entry in entries:
        try:
            data = _read_bytes(entry.path)
            if gpu_jpeg and crop is None:
                dims = _jpeg_for_device(data, max_pixels)
                if dims is not None:
                    out.jpeg_entries.append(entry)
                    out.jpeg_bytes.append(data)
                    out.jpeg_sizes.append(dims)
                    continue
            rgb = load_rgb(data, max_pixels)
            height, width = rgb.shape[:2]
            if crop is not None:
                cropped = crop(rgb)
                if cropped is None:
                    raise Unreadable("no face found")
                rgb = cropped
            arrays.append(resize_chw(rgb, size))
        except Unreadable as err:
            out.failures.append(Failure(entry.path, str(err)))
            continue
        except MemoryError:
            out.failures.append(Failure(entry.path, "out of memory while decoding"))
            continue
        except Exception as err:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            log.debug("unexpected error decoding %s", entry.path, exc_info=True)
            out.failures.append(Failure(entry.path, f"cannot decode ({type(err).__name__}: {err})"[:200]))
            continue
        ok.append(entry)
        sizes.append((width, height))
    out.entries = ok
    out.sizes = sizes
    if arrays:
        out.pixels = np.stack(arrays)
    out.seconds = time.process_time() - start
    return out


def crop_to_face(rgb: np.ndarray) -> np.ndarray | None:
    """The ``--detect-faces`` crop: aligned CelebA-like crops pass unchanged, any other image is
    cut to its largest face the way ``facefind predict`` does (None: no face found)."""
    from trainer.faces import crop_face, looks_aligned

    return rgb if looks_aligned(rgb) else crop_face(rgb)


def merge_batches(parts: Sequence[DecodedBatch], size: tuple[int, int]) -> DecodedBatch:
    """Concatenate the pieces of one batch decoded by different workers, keeping their order."""
    if len(parts) == 1:
        return parts[0]
    pixels = [p.pixels for p in parts if len(p.entries)]
    return DecodedBatch(
        entries=[e for p in parts for e in p.entries],
        pixels=np.concatenate(pixels) if pixels else np.zeros((0, 3, *size), np.uint8),
        sizes=[s for p in parts for s in p.sizes],
        failures=[f for p in parts for f in p.failures],
        jpeg_entries=[e for p in parts for e in p.jpeg_entries],
        jpeg_bytes=[b for p in parts for b in p.jpeg_bytes],
        jpeg_sizes=[s for p in parts for s in p.jpeg_sizes],
        seconds=sum(p.seconds for p in parts),
    )


# --------------------------------------------------------------------------------------------
# the reader: batches, worker processes, bounded read-ahead


def _worker_init(owner: int) -> None:
    # Ctrl-C is handled by the main process, which stops at a batch boundary; workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_owner, args=(owner,), name="orphan-watch", daemon=True).start()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _exit_with_owner(owner: int) -> None:
    """Exit once the indexer process ``owner`` is gone (e.g. killed with kill -9).

    A pool worker would otherwise wait forever: it holds both ends of its task queue, so it never
    sees end-of-file, and its parent (the fork server) lives as long as any worker does.
    """
    while True:
        time.sleep(0.5)
        if not _alive(owner):
            os._exit(1)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid was reused by someone else's process: ours is gone
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the signal check is all we have


class ImageReader:
    """Decode lists of files into ``DecodedBatch`` es of ``batch_size``, in order.

    ``workers=0`` decodes in this process (simple, used by tests); otherwise each batch is split
    across ``workers`` processes and up to ``prefetch`` batches are decoded ahead of the consumer,
    so decoding overlaps inference without holding a whole collection in memory.
    """

    def __init__(
        self,
        size: tuple[int, int],
        batch_size: int = 256,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        crop: Crop | None = None,
        gpu_jpeg: bool = False,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.size = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        self.workers = available_cpus() if workers is None else max(0, workers)
        self.max_pixels = max_pixels
        self.crop = crop
        self.gpu_jpeg = gpu_jpeg
        self.prefetch = max(1, prefetch)
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (pending work is dropped)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def start(self) -> None:
        """Start the worker processes now, without waiting for them.

        Their start-up (the fork server imports torch once, ~2 s) then overlaps whatever the
        caller does next, such as loading the model onto the GPU.
        """
        if self.workers > 0:
            pool = self._executor()
            for _ in range(self.workers):
                pool.submit(_ready)

    def _executor(self) -> ProcessPoolExecutor:
        if self._closed:
            raise CancelledError("the reader is closed")
        if self._pool is None:
            # forkserver: workers are forked from a clean server process, never from this one
            # (which may hold torch threads or CUDA state); torch is imported there once.
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["indexer.reader", "trainer.model"])
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
            )
        return self._pool

    def _decode(self, chunk: Sequence[FileEntry]) -> DecodedBatch:
        return decode_files(chunk, self.size, self.max_pixels, self.crop, self.gpu_jpeg)

    def batches(self, files: Iterable[FileEntry]) -> Iterator[DecodedBatch]:
        """Yield decoded batches of ``files`` in order."""
        chunks = _chunks(list(files), self.batch_size)
        if self.workers == 0:
            for chunk in chunks:
                yield self._decode(chunk)
            return
        pending: deque[list[tuple[list[FileEntry], Future[DecodedBatch], ProcessPoolExecutor]]] = deque()
        chunk_iter = iter(chunks)

        def submit_next() -> bool:
            chunk = next(chunk_iter, None)
            if chunk is None:
                return False
            per_worker = max(1, math.ceil(len(chunk) / self.workers))
            pool = self._executor()
            pending.append([(piece, self._submit(pool, piece), pool) for piece in _chunks(chunk, per_worker)])
            return True

        for _ in range(self.prefetch):
            if not submit_next():
                break
        while pending:
            parts = pending.popleft()
            submit_next()
            yield merge_batches([self._result(piece, fut, pool) for piece, fut, pool in parts], self.size)

    def _submit(self, pool: ProcessPoolExecutor, piece: Sequence[FileEntry]) -> Future[DecodedBatch]:
        return pool.submit(decode_files, piece, self.size, self.max_pixels, self.crop, self.gpu_jpeg)

    def _result(self, piece: list[FileEntry], fut: Future[DecodedBatch], pool: ProcessPoolExecutor) -> DecodedBatch:
        """A worker's result. When a decoder process died (a file crashed the decoder), the piece is
        retried in a fresh pool, and if it fails again each file is decoded alone to find the culprit."""
        try:
            return fut.result()
        except (BrokenProcessPool, CancelledError):
            if self._closed:  # cancelled by close(), e.g. from another thread after Ctrl-C
                raise
            self._discard_pool(pool)
        fresh = self._executor()
        try:
            return self._submit(fresh, piece).result()
        except (BrokenProcessPool, CancelledError):
            self._discard_pool(fresh)
        log.warning("a decoder process died; decoding %d files one by one to find the culprit", len(piece))
        return merge_batches([self._isolated(entry) for entry in piece], self.size)

    def _discard_pool(self, pool: ProcessPoolExecutor) -> None:
        """Drop a broken pool (its pending work is resubmitted by ``_result``)."""
        pool.shutdown(wait=False, cancel_futures=True)
        if self._pool is pool:
            self._pool = None

    def _isolated(self, entry: FileEntry) -> DecodedBatch:
        """Decode one file in a throw-away process so that a crash costs only that file."""
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            try:
                return self._submit(pool, [entry]).result()
            except BrokenProcessPool:
                return DecodedBatch([], np.zeros((0, 3, *self.size), np.uint8), [],
                                    failures=[Failure(entry.path, "decoder crashed on this file")])


def _ready() -> bool:
    return True


def available_cpus() -> int:
    """CPU cores this process may use (respects affinity / container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _chunks(items: list[FileEntry], n: int) -> list[list[FileEntry]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


# --------------------------------------------------------------------------------------------
# GPU decoding (nvJPEG)


def decode_on_device(
    batch: DecodedBatch, size: tuple[int, int], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[FileEntry], torch.Tensor, list[tuple[int, int]], list[Failure]]:
    """All images of ``batch`` as one uint8 (N, 3, h, w) tensor on ``device``.

    The JPEG bytes go to nvJPEG in one batched call; when it refuses the batch, each file is tried
    alone and the ones it still refuses are decoded by Pillow here. CPU-decoded pixels are copied
    over. Returns (entries, pixels, sizes, extra failures) in matching order.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from trainer.model import resize_images

    entries = list(batch.entries)
    sizes = list(batch.sizes)
    tensors = [torch.from_numpy(batch.pixels).to(device, non_blocking=True)] if len(batch.entries) else []
    failures: list[Failure] = []
    if batch.jpeg_bytes:
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch.jpeg_bytes]
        try:
            decoded: list[torch.Tensor | None] = list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded = []
            for one in raw:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        images: list[torch.Tensor] = []
        for entry, data, dims, img in zip(batch.jpeg_entries, batch.jpeg_bytes, batch.jpeg_sizes, decoded):
            if img is None:  # nvJPEG refused it: Pillow decides
                try:
                    img = torch.from_numpy(resize_chw(load_rgb(data, max_pixels), size)).to(device)
                except Unreadable as err:
                    failures.append(Failure(entry.path, str(err)))
                    continue
            images.append(img)
            entries.append(entry)
            sizes.append(dims)
        if images and all(im.shape == images[0].shape for im in images):
            tensors.append(resize_images(torch.stack(images), size))  # CelebA: one shape, one call
        else:
            tensors.extend(resize_images(im[None], size) for im in images)
    pixels = torch.cat(tensors) if tensors else torch.zeros((0, 3, *size), dtype=torch.uint8, device=device)
    return entries, pixels, sizes, failures
