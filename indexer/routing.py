"""Device routing: which files the CPU decodes and which travel as JPEG bytes to nvJPEG.

A worker process decodes one chunk of files with ``decode_files``. With ``gpu_jpeg`` a file that
``trainer.decode.plain_jpeg`` accepts (and no face crop is asked for) is only read and kept
encoded; every other file is decoded on the CPU by ``trainer.decode``. So a chunk becomes up to two
``DecodedBatch`` es, each carrying ONE payload:

    Pixels(array)   uint8 (n, 3, h, w), decoded on the CPU at the model's size
    Jpegs(data)     the files' bytes, to decode on the device (``on_device``)

``on_device`` turns either into one uint8 tensor on the inference device. Face detection plugs in
as ``crop``: a picklable callable RGB uint8 (H, W, 3) -> cropped array, or None when the image holds
no face (recorded as a failure 'no face found'). ``identify`` (``index --identity``) is a picklable
callable RGB -> 128-D identity descriptor or None (no face), run on the decoded image in the same
worker so that its ~0.1 s per face overlaps the CNN; such files take the CPU path, and a file
without a face is still indexed, with no descriptor (``DecodedBatch.identities``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence, Union

import numpy as np

from indexer.discovery import Failure, FileEntry
from trainer.decode import DEFAULT_MAX_PIXELS, Unreadable, decode_rgb, plain_jpeg, read_bytes, resize_chw

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Crop = Callable[[np.ndarray], "np.ndarray | None"]
Identify = Callable[[np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class Pixels:
    """Images decoded on the CPU: uint8 (n, 3, h, w) at the model's size."""

    array: np.ndarray


@dataclass(frozen=True)
class Jpegs:
    """Plain JPEG files still encoded, for the device's decoder (``trainer.decode.plain_jpeg`` holds)."""

    data: list[bytes]


Payload = Union[Pixels, Jpegs]


@dataclass
class DecodedBatch:
    """One batch out of the reader: ``entries[i]`` is image i of ``payload``; ``sizes[i]`` its
    original (width, height) after EXIF orientation. ``failures`` are files of the same chunk that
    could not be read. ``seconds`` is worker CPU time spent on the batch (summed over workers)."""

    entries: list[FileEntry]
    sizes: list[tuple[int, int]]
    payload: Payload
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    identities: dict[str, np.ndarray | None] = field(default_factory=dict)  # path -> descriptor (identify)

    def __len__(self) -> int:
        return len(self.entries)


def empty_batch(size: tuple[int, int], failures: Sequence[Failure] = ()) -> DecodedBatch:
    """A batch of no images (only ``failures``), shaped for ``size``."""
    return DecodedBatch([], [], Pixels(np.zeros((0, 3, *size), np.uint8)), list(failures))


def decode_files(
    entries: Sequence[FileEntry],
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    crop: Crop | None = None,
    gpu_jpeg: bool = False,
    identify: Identify | None = None,
) -> list[DecodedBatch]:
    """Decode one chunk: a Pixels batch (first, always, with the chunk's failures), then a Jpegs
    batch when ``gpu_jpeg`` routed files to the device. A bad file becomes a Failure; never raises."""
    start = time.process_time()
    cpu = empty_batch(size)
    device = DecodedBatch([], [], Jpegs([]))
    arrays: list[np.ndarray] = []
    for entry in entries:
        try:
            data = read_bytes(entry.path)
            if gpu_jpeg and crop is None and identify is None:
                dims = plain_jpeg(data, max_pixels)
                if dims is not None:
                    device.entries.append(entry)
                    device.sizes.append(dims)
                    device.payload.data.append(data)  # type: ignore[union-attr]
                    continue
            rgb = decode_rgb(data, max_pixels)
            height, width = rgb.shape[:2]
            if identify is not None:
                cpu.identities[entry.path] = identify(rgb)
            if crop is not None:
                cropped = crop(rgb)
                if cropped is None:
                    raise Unreadable("no face found")
                rgb = cropped
            arrays.append(resize_chw(rgb, size))
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
        cpu.entries.append(entry)
        cpu.sizes.append((width, height))
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
    cpu.entries = [e for p in pixels for e in p.entries]
    cpu.sizes = [s for p in pixels for s in p.sizes]
    arrays = [p.payload.array for p in pixels if p.entries]  # type: ignore[union-attr]
    if arrays:
        cpu.payload = Pixels(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
    cpu.seconds = sum(p.seconds for p in parts)
    cpu.identities = {k: v for p in parts for k, v in p.identities.items()}
    if not jpegs:
        return [cpu]
    device = DecodedBatch([e for p in jpegs for e in p.entries], [s for p in jpegs for s in p.sizes],
                          Jpegs([b for p in jpegs for b in p.payload.data]))  # type: ignore[union-attr]
    return [cpu, device]


def on_device(
    batch: DecodedBatch, size: tuple[int, int], device: torch.device, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[FileEntry], torch.Tensor, list[tuple[int, int]], list[Failure]]:
    """``batch``'s images as one uint8 (N, 3, h, w) tensor on ``device``.

    Pixels are copied over; Jpegs are decoded there (``trainer.decode.decode_jpegs_on_device``:
    nvJPEG on CUDA, falling back to the CPU decoder per file). Returns (entries, pixels, sizes,
    failures) in matching order; failures include the batch's own.
    """
    import torch

    from trainer.decode import decode_jpegs_on_device

    if isinstance(batch.payload, Pixels):
        pixels = torch.from_numpy(batch.payload.array)
        if device.type == "cuda":
            pixels = pixels.pin_memory().to(device, non_blocking=True)
        return batch.entries, pixels, batch.sizes, batch.failures
    ok, pixels, bad = decode_jpegs_on_device(batch.payload.data, size, device, max_pixels)
    failures = batch.failures + [Failure(batch.entries[i].path, reason) for i, reason in bad]
    return [batch.entries[i] for i in ok], pixels, [batch.sizes[i] for i in ok], failures


def crop_to_face(rgb: np.ndarray) -> np.ndarray | None:
    """The ``--detect-faces`` crop: aligned CelebA-like crops pass unchanged, any other image is
    cut to its largest face the way ``facefind predict`` does (None: no face found)."""
    from trainer.faces import crop_face, looks_aligned

    return rgb if looks_aligned(rgb) else crop_face(rgb)


def describe_face(rgb: np.ndarray) -> np.ndarray | None:
    """The ``--identity`` hook: the 128-D dlib descriptor of the image's largest face (an aligned
    CelebA crop: of the face in it), or None when no face is found. Picklable (module level)."""
    from trainer.faces import faces_of

    found = faces_of(rgb, identity=True, limit=1)
    return found[0].identity if found else None
