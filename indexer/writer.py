"""Writer stage: model outputs -> catalog, one transaction per batch, on a background thread.

SQLite commits take milliseconds to tens of milliseconds per batch; done on the main thread they
would stall the forward pass. ``CatalogWriter`` hands each batch to one writer thread through a
short queue, so batches commit in the order they were produced, each atomically
(``Catalog.write_batch``), and the caller only waits when the queue is full. An error in the
thread (disk full, read-only index) is raised in the caller at its next ``put`` or at ``close``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from facefind.db.catalog import Catalog, IndexedImage
from facefind.indexer.discovery import Failure
from facefind.indexer.routing import NO_FACE, Rows

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class WriteJob:
    """One batch to commit: results (row i of ``rows`` -> probs[i], embeddings[i]) and failures.
    A file's rows (its faces) are all in one job, so they commit together."""

    rows: Rows
    probs: np.ndarray
    embeddings: np.ndarray
    failures: Sequence[Failure]


class CatalogWriter:
    """Commit ``WriteJob`` s in order on a background thread (``background=False``: inline)."""

    def __init__(
        self,
        catalog: Catalog,
        model_id: int,
        labels: dict[str, np.ndarray] | None = None,
        label_names: Sequence[str] | None = None,
        splits: dict[str, int] | None = None,
        background: bool = True,
        max_pending: int = 2,
    ) -> None:
        self.catalog = catalog
        self.model_id = model_id
        self.labels = labels or {}
        self.label_names = list(label_names) if label_names is not None else None
        self.splits = splits or {}
        self.seconds = 0.0  # time spent committing (off the critical path when background)
        self.written = 0  # files
        self.faces = 0    # index entries (more than files where photos hold several faces)
        self.labelled = 0
        self.failed = 0
        self.described = 0  # rows whose identity was looked for (--identity)
        self.no_face = 0    # ... and had no detectable face (indexed by attributes only)
        self._error: BaseException | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="facefind-writer", daemon=True)
            self._thread.start()

    def put(self, job: WriteJob) -> None:
        """Queue a batch (blocks while ``max_pending`` batches wait); re-raise a writer error."""
        self._raise_pending()
        if self._thread is None:
            self._commit(job)
        else:
            self._queue.put(job)

    def close(self) -> None:
        """Commit everything queued, stop the thread, and raise its error if it had one."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def abandon(self) -> None:
        """Stop after the queued batches without raising (used while another error propagates)."""
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the caller is already raising something else
            log.debug("writer error while abandoning the run", exc_info=True)

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None:
                continue  # after a failure, drop the rest: the caller stops at its next put
            try:
                self._commit(job)  # type: ignore[arg-type]
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._error = err

    def _commit(self, job: WriteJob) -> None:
        start = time.perf_counter()
        described = job.rows.identities
        rows = [
            IndexedImage(
                path=e.path, size=e.size, mtime=e.mtime, width=int(wh[0]), height=int(wh[1]),
                probs=job.probs[i], embedding=job.embeddings[i], labels=self.labels.get(e.path),
                split=self.splits.get(e.path),
                described=described is not None, identity=None if described is None else described[i],
                face=int(face[0]), box=face[1],
            )
            for i, (e, wh, face) in enumerate(zip(job.rows.entries, job.rows.sizes, job.rows.faces))
        ]
        files = {r.path: r for r in rows}
        labelled = sum(1 for r in files.values() if r.labels is not None)
        if rows:
            self.catalog.write_batch(self.model_id, rows, label_names=self.label_names if labelled else None)
        if job.failures:
            faceless = [f.path for f in job.failures if f.reason == NO_FACE]
            if faceless:  # a photo with no face has no entries: any it had describe other content
                self.catalog.prune(faceless)
            self.catalog.record_failures((f.path, f.reason) for f in job.failures)
        self.written += len(files)
        self.faces += len(rows)
        self.labelled += labelled
        self.failed += len(job.failures)
        self.described += sum(1 for r in rows if r.described)
        self.no_face += sum(1 for r in rows if r.described and r.identity is None)
        self.seconds += time.perf_counter() - start
