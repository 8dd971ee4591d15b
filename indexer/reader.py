"""The reader: lists of files -> ``DecodedBatch`` es, decoded in crash-isolated worker processes.

    ImageReader.batches(files)  decode in worker processes, in order, a bounded number of batches ahead

The reader is one of four modules, one per job:

    facefind.indexer.discovery   which files a folder holds, which are unchanged (FileEntry, Failure, discover)
    facefind.trainer.decode      one file -> RGB uint8 pixels (the contract training and predict share)
    facefind.indexer.routing     per chunk: CPU-decoded Pixels or JPEG bytes for nvJPEG (DecodedBatch)
    facefind.indexer.reader      this pool: processes, read-ahead, and surviving a decoder that crashes

A decoder that kills its process (a segfault in a codec, an out-of-memory kill) costs only its
file: the chunk is retried in a fresh pool, then file by file, and the culprit is recorded as
'decoder crashed on this file'.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, Sequence

import torch

from facefind.db.process import pid_alive
from facefind.indexer.discovery import Failure, FileEntry
from facefind.indexer.routing import DecodedBatch, FaceFinder, decode_files, empty_batch, merge_batches
from facefind.trainer.decode import DEFAULT_MAX_PIXELS
from facefind.trainer.device import available_cpus

log = logging.getLogger(__name__)


def _worker_init(owner: int) -> None:
    # Ctrl-C is handled by the main process, which stops at a batch boundary; workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_owner, args=(owner,), name="orphan-watch", daemon=True).start()
    torch.set_num_threads(1)


def _exit_with_owner(owner: int) -> None:
    """Exit once the indexer process ``owner`` is gone (e.g. killed with kill -9).

    A pool worker would otherwise wait forever: it holds both ends of its task queue, so it never
    sees end-of-file, and its parent (the fork server) lives as long as any worker does.
    """
    while True:
        time.sleep(0.5)
        if not pid_alive(owner, ours=True):
            os._exit(1)


class ImageReader:
    """Decode lists of files into ``DecodedBatch`` es of up to ``batch_size`` files, in order.

    Each chunk of ``batch_size`` files yields a Pixels batch and, with ``gpu_jpeg``, a Jpegs batch
    (``facefind.indexer.routing``); a batch with neither images nor failures is not yielded.

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
        faces: FaceFinder | None = None,
        gpu_jpeg: bool = False,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.size = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        if workers is None:
            workers = available_cpus()
        self.workers = max(0, workers)
        self.max_pixels = max_pixels
        self.faces = faces  # --detect-faces / --identity: each file's entries, found in the workers
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
            ctx.set_forkserver_preload(["facefind.indexer.routing", "facefind.trainer.model", "torchvision.io"])
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
            )
        return self._pool

    def batches(self, files: Iterable[FileEntry]) -> Iterator[DecodedBatch]:
        """Yield decoded batches of ``files`` in order."""
        chunks = _chunks(list(files), self.batch_size)
        if self.workers == 0:
            for chunk in chunks:
                yield from _nonempty(decode_files(chunk, self.size, self.max_pixels, self.faces, self.gpu_jpeg))
            return
        pending: deque[list[tuple[list[FileEntry], Future[list[DecodedBatch]], ProcessPoolExecutor]]] = deque()
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
            pieces = [b for piece, fut, pool in parts for b in self._result(piece, fut, pool)]
            yield from _nonempty(merge_batches(pieces, self.size))

    def _submit(self, pool: ProcessPoolExecutor, piece: Sequence[FileEntry]) -> Future[list[DecodedBatch]]:
        return pool.submit(decode_files, piece, self.size, self.max_pixels, self.faces, self.gpu_jpeg)

    def _result(self, piece: list[FileEntry], fut: Future[list[DecodedBatch]],
                pool: ProcessPoolExecutor) -> list[DecodedBatch]:
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
        return [b for entry in piece for b in self._isolated(entry)]

    def _discard_pool(self, pool: ProcessPoolExecutor) -> None:
        """Drop a broken pool (its pending work is resubmitted by ``_result``)."""
        pool.shutdown(wait=False, cancel_futures=True)
        if self._pool is pool:
            self._pool = None

    def _isolated(self, entry: FileEntry) -> list[DecodedBatch]:
        """Decode one file in a throw-away process so that a crash costs only that file."""
        ctx = mp.get_context("forkserver")
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)) as pool:
            try:
                return self._submit(pool, [entry]).result()
            except BrokenProcessPool:
                return [empty_batch(self.size, [Failure(entry.path, "decoder crashed on this file")])]


def _ready() -> bool:
    return True


def _nonempty(batches: Iterable[DecodedBatch]) -> Iterator[DecodedBatch]:
    return (b for b in batches if b.entries or b.failures)


def _chunks(items: list[FileEntry], n: int) -> list[list[FileEntry]]:
    return [items[i:i + n] for i in range(0, len(items), n)]
