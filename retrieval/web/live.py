"""The index a long-lived server answers from, picked up afresh when a new snapshot is published.

``LiveIndex(folder).current()`` returns a ``Live``: one opened snapshot generation (an
``OpenIndex``) plus what the web API derives from it once (ground-truth labels, positive rates).
At most once per ``check_every`` seconds it reads the index's ``model-*/CURRENT`` files (a few
tiny reads); when ``facefind index`` has published a new generation, the next request opens it
and later requests use it. Requests already running keep the generation they started with: its
files stay memory-mapped even after the indexer deletes them.

``FixedIndex(engine)`` serves an in-memory engine that never changes (benchmarks, tests).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from facefind.db.errors import CatalogError
from facefind.db.snapshot.format import PERSONS
from facefind.retrieval.index import OpenIndex, open_index

if TYPE_CHECKING:
    from facefind.retrieval.engine import Engine, Quality, Result

log = logging.getLogger(__name__)


@dataclass
class Labels:
    """Ground truth of the indexed images: ``matrix[i, k]`` (0/1) of image ``ids[i]``, attribute ``names[k]``."""

    ids: np.ndarray
    matrix: np.ndarray
    names: list[str]

    def of(self, image_id: int) -> dict[str, bool] | None:
        at = int(np.searchsorted(self.ids, image_id))
        if at < self.ids.shape[0] and self.ids[at] == image_id:
            return {n: bool(v) for n, v in zip(self.names, self.matrix[at].tolist())}
        return None


@dataclass
class Live:
    """One snapshot generation and what the server derives from it (each computed once)."""

    engine: Engine
    opened: OpenIndex | None = None  # None for an in-memory engine (no catalog behind it)
    key: tuple[Any, ...] = ()
    loaded_at: float = field(default_factory=time.time)
    _derived: dict[str, Any] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)  # one value may derive from another

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed once for this generation and kept with it (labels, rates, ...)."""
        if key not in self._derived:
            with self._lock:
                if key not in self._derived:
                    self._derived[key] = make()
        return self._derived[key]

    @property
    def labels(self) -> Labels | None:
        """The catalog's ground truth for the index's attributes, or None when it holds none."""
        return self.once("labels", self._read_labels)

    def _read_labels(self) -> Labels | None:
        if self.opened is None:
            return None
        names = list(self.engine.attributes)
        try:
            ids, matrix = self.opened.catalog.labels_for(names)
        except CatalogError as err:
            log.warning("cannot read the ground-truth labels: %s", err)
            return None
        if ids.size == 0:
            return None
        order = np.argsort(ids, kind="stable")
        return Labels(ids[order], matrix[order], names)

    def quality(self, result: Result) -> Quality | None:
        """``--eval``'s block for ``result`` against the labels (None without labels or expression)."""
        labels = self.labels
        if labels is None or result.node is None:
            return None
        return self.engine.evaluate_quality(result, labels.matrix.T, labels.ids, labels.names)

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


class Source(Protocol):
    """Where the server's index comes from."""

    def current(self) -> Live: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class FixedIndex:
    """An engine that never changes (an in-memory snapshot), optionally with labels."""

    def __init__(self, engine: Engine, labels: Labels | None = None) -> None:
        self._live = Live(engine, None, ("fixed",))
        self._live.once("labels", lambda: labels)

    def current(self) -> Live:
        return self._live

    def describe(self) -> dict[str, Any]:
        return {"index": None, "snapshot": None, "model": None}

    def close(self) -> None:
        pass


class LiveIndex:
    """The index folder's current snapshot, reopened when a new generation is published."""

    def __init__(self, index_dir: Path, check_every: float = 1.0) -> None:
        self.index_dir = Path(index_dir)
        self.check_every = check_every
        self._lock = threading.Lock()
        self._live = self._open()
        self._checked = time.monotonic()
        self._previous: Live | None = None
        self.on_publish: list[Callable[[Live], None]] = []  # called with each newly served generation

    def _key(self) -> tuple[Any, ...]:
        """The live generation of every model folder (what changes when a snapshot is published)."""
        out = []
        for folder in sorted(self.index_dir.glob("model-*")):
            try:
                out.append((folder.name, (folder / "CURRENT").read_text(encoding="utf-8").strip()))
            except OSError:
                continue
        try:  # `facefind people` replaces the persons file without a new generation
            out.append((PERSONS, (self.index_dir / PERSONS).stat().st_mtime_ns))
        except OSError:
            pass
        return tuple(out)

    def _open(self) -> Live:
        key = self._key()
        opened = open_index(self.index_dir)
        return Live(opened.engine, opened, key)

    def current(self) -> Live:
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return self._live
        with self._lock:
            if now - self._checked < self.check_every:
                return self._live
            self._checked = now
            if self._key() == self._live.key:
                return self._live
            try:
                fresh = self._open()
            except CatalogError as err:  # a half-published or damaged index: keep serving the old one
                log.warning("keeping the loaded snapshot: %s", err)
                return self._live
            log.info("new snapshot generation published; now serving %d images", len(fresh.engine))
            if self._previous is not None:  # requests may still hold the one being replaced
                self._previous.close()
            self._previous, self._live = self._live, fresh
            for listener in self.on_publish:
                listener(fresh)
            return fresh

    def describe(self) -> dict[str, Any]:
        live = self._live
        snap = live.engine.snapshot
        return {"index": str(self.index_dir),
                "snapshot": {"stamp": snap.stamp, "generation": snap.folder.name if snap.folder else None,
                             "model_id": snap.model_id, "loaded_at": live.loaded_at}}

    def close(self) -> None:
        for live in (self._previous, self._live):
            if live is not None:
                live.close()
