"""Device routing: which files the CPU decodes and which travel as JPEG bytes to nvJPEG.

A worker process decodes one chunk of files with ``decode_files``. With ``gpu_jpeg`` a file that
``facefind.trainer.decode.plain_jpeg`` accepts (and no ``FaceFinder`` is asked for) is only read and kept
encoded; every other file is decoded on the CPU by ``facefind.trainer.decode``. So a chunk becomes up to two
``DecodedBatch`` es, each carrying ONE payload:

    Pixels(array)   uint8 (n, 3, h, w), decoded on the CPU at the model's size
    Jpegs(data)     the files' bytes, to decode on the device (``on_device``)

A batch's ``rows`` say what each row of the payload is: face ``faces[i]`` (number, box) of file
``entries[i]``. Without a ``FaceFinder`` every file is one row (face 0, no box). A ``FaceFinder``
(``index --detect-faces`` / ``--identity``) runs in the worker on the decoded image: with
``detect`` a photo becomes one row per face found, aligned onto CelebA's template (no face: the
file is recorded as a failure 'no face found'), while an aligned CelebA crop stays one row; with
``identity`` each row also gets its 128-D descriptor, computed there so that its ~0.1 s per face
overlaps the CNN. A file's rows always travel in one batch, so the writer commits all of its
faces in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch

from facefind.indexer.discovery import Failure, FileEntry
from facefind.indexer.faces.align import MIN_FACE_PIXELS, Box  # dlib itself loads on first use, in the workers
from facefind.indexer.faces.detect import FaceEntry, faces_of, identity_of
from facefind.trainer.decode import (
    DEFAULT_MAX_PIXELS, Unreadable, decode_jpegs_on_device, decode_rgb, plain_jpeg, read_bytes, resize_chw,
)

log = logging.getLogger(__name__)


NO_FACE = "no face found"  # the failure of a file in which --detect-faces finds no face


@dataclass(frozen=True)
class FaceFinder:
    """What the reader's workers make of a decoded image: its index entries (picklable).

    ``detect``: one entry per face at least ``min_size`` pixels wide, largest first, each aligned
    the way CelebA's crops are; an image that already has CelebA's crop geometry is one entry, as
    it is. Otherwise the whole image is one entry. ``identity``: each entry's 128-D dlib descriptor
    (a whole-image entry: of its largest face; None when it has none).
    """

    detect: bool = False
    identity: bool = False
    min_size: int = MIN_FACE_PIXELS

    def __call__(self, rgb: np.ndarray) -> list[FaceEntry]:
        if self.detect:
            return faces_of(rgb, identity=self.identity, min_size=self.min_size)
        return [FaceEntry(0, None, rgb, identity_of(rgb) if self.identity else None)]


@dataclass(frozen=True)
class Pixels:
    """Images decoded on the CPU: uint8 (n, 3, h, w) at the model's size."""

    array: np.ndarray


@dataclass(frozen=True)
class Jpegs:
    """Plain JPEG files still encoded, for the device's decoder (``facefind.trainer.decode.plain_jpeg`` holds)."""

    data: list[bytes]


Payload = Union[Pixels, Jpegs]


@dataclass
class Rows:
    """What the rows of a batch are: row i is face ``faces[i]`` = (number, box or None) of file
    ``entries[i]``, whose decoded size (after EXIF orientation) is ``sizes[i]`` = (width, height).
    ``identities[i]`` is its descriptor when identities were looked for (None: not looked for)."""

    entries: list[FileEntry] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    faces: list[tuple[int, Box | None]] = field(default_factory=list)
    identities: list[np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: FileEntry, size: tuple[int, int], face: tuple[int, Box | None] = (0, None),
            identity: np.ndarray | None = None) -> None:
        self.entries.append(entry)
        self.sizes.append(size)
        self.faces.append(face)
        if self.identities is not None:  # identities are looked for: None here means no face found
            self.identities.append(identity)

    def take(self, rows: Sequence[int]) -> Rows:
        """These rows, in this order."""
        return Rows([self.entries[i] for i in rows], [self.sizes[i] for i in rows], [self.faces[i] for i in rows],
                    None if self.identities is None else [self.identities[i] for i in rows])

    @staticmethod
    def join(parts: Sequence[Rows]) -> Rows:
        """The rows of ``parts`` one after another (identities: looked for in all or in none)."""
        looked = [p.identities for p in parts if p.entries]
        return Rows([e for p in parts for e in p.entries], [s for p in parts for s in p.sizes],
                    [f for p in parts for f in p.faces],
                    [v for ids in looked for v in ids] if looked and all(i is not None for i in looked) else None)


@dataclass
class DecodedBatch:
    """One batch out of the reader: ``rows`` say what each image of ``payload`` is; ``failures``
    are files of the same chunk that could not be read (or hold no face). ``seconds`` is worker
    CPU time spent on the batch (summed over workers)."""

    rows: Rows
    payload: Payload
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def entries(self) -> list[FileEntry]:
        return self.rows.entries

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return self.rows.sizes

    def __len__(self) -> int:
        return len(self.rows)


def empty_batch(size: tuple[int, int], failures: Sequence[Failure] = ()) -> DecodedBatch:
    """A batch of no images (only ``failures``), shaped for ``size``."""
    return DecodedBatch(Rows(), Pixels(np.zeros((0, 3, *size), np.uint8)), list(failures))


def decode_files(
    entries: Sequence[FileEntry],
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    faces: FaceFinder | None = None,
    gpu_jpeg: bool = False,
) -> list[DecodedBatch]:
    """Decode one chunk: a Pixels batch (first, always, with the chunk's failures), then a Jpegs
    batch when ``gpu_jpeg`` routed files to the device. A bad file becomes a Failure; never raises."""
    start = time.process_time()
    cpu = empty_batch(size)
    if faces is not None and faces.identity:
        cpu.rows.identities = []
    device = DecodedBatch(Rows(), Jpegs([]))
    arrays: list[np.ndarray] = []
    for entry in entries:
        try:
            data = read_bytes(entry.path)
            if gpu_jpeg and faces is None:
                dims = plain_jpeg(data, max_pixels)
                if dims is not None:
                    device.rows.add(entry, dims)
                    device.payload.data.append(data)  # type: ignore[union-attr]
                    continue
            rgb = decode_rgb(data, max_pixels)
            height, width = rgb.shape[:2]
            found = faces(rgb) if faces is not None else None
            if found is not None and not found:
                raise Unreadable(NO_FACE)
            crops = [resize_chw(f.crop, size) for f in found] if found is not None else [resize_chw(rgb, size)]
        except Unreadable as err:
            cpu.failures.append(Failure(entry.path, str(err)))
            continue
        except MemoryError:
            cpu.failures.append(Failure(entry.path, "out of memory while decoding"))
            continue
        except Exception as err:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            log.debug("unexpected error decoding %s", entry.path, exc_info=True)
            cpu.failures.append(Failure(entry.path, f"cannot decode ({type(err).__name__}: {err})"[:200]))
            continue
        arrays.extend(crops)
        if found is None:
            cpu.rows.add(entry, (width, height))
        for f in found or ():
            cpu.rows.add(entry, (width, height), (f.number, f.box), f.identity)
    if arrays:
        cpu.payload = Pixels(np.stack(arrays))
    cpu.seconds = time.process_time() - start
    return [cpu, device] if device.entries else [cpu]


def merge_batches(parts: Sequence[DecodedBatch], size: tuple[int, int]) -> list[DecodedBatch]:
    """Join the pieces of one chunk decoded by different workers, payload by payload, in order:
    one Pixels batch (with every failure), then one Jpegs batch if any piece has JPEG bytes."""
    pixels = [p for p in parts if isinstance(p.payload, Pixels)]
    jpegs = [p for p in parts if isinstance(p.payload, Jpegs) and p.entries]
    cpu = empty_batch(size, [f for p in parts for f in p.failures])
    cpu.rows = Rows.join([p.rows for p in pixels])
    arrays = [p.payload.array for p in pixels if p.entries]  # type: ignore[union-attr]
    if arrays:
        cpu.payload = Pixels(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    cpu.seconds = sum(p.seconds for p in parts)
    if not jpegs:
        return [cpu]
    device = DecodedBatch(Rows.join([p.rows for p in jpegs]),
                          Jpegs([b for p in jpegs for b in p.payload.data]))  # type: ignore[union-attr]
    return [cpu, device]


def on_device(
    batch: DecodedBatch, size: tuple[int, int], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Rows, torch.Tensor, list[Failure]]:
    """``batch``'s images as one uint8 (N, 3, h, w) tensor on ``device``.

    Pixels are copied over; Jpegs are decoded there (``facefind.trainer.decode.decode_jpegs_on_device``:
    nvJPEG on CUDA, falling back to the CPU decoder per file). Returns (rows, pixels, failures)
    in matching order; failures include the batch's own.
    """
    if isinstance(batch.payload, Pixels):
        pixels = torch.from_numpy(batch.payload.array)
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        return batch.rows, pixels, batch.failures
    ok, pixels, bad = decode_jpegs_on_device(batch.payload.data, size, device, max_pixels)
    failures = batch.failures + [Failure(batch.entries[i].path, reason) for i, reason in bad]
    return batch.rows.take(ok), pixels, failures
