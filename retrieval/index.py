"""An index opened for querying: its catalog plus an engine over its current memory-mapped snapshot.

``query``, ``similar``, ``predict``, the demo and any web page use this one entry point. Opening it
never imports torch; ``embed`` (a reference image) loads the index's own checkpoint lazily, checked
by sha256 to be the very file the index was built with, and decodes the image with
``trainer.decode`` (through ``Predictor``), the indexer's decoder, so that one-off images get
exactly the pixels indexed ones got.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from db.errors import CatalogError, FacefindError, ModelError

if TYPE_CHECKING:
    import numpy as np

    from db.catalog import Catalog, ModelRecord
    from retrieval.engine import Engine, Quality, Result
    from trainer.predict import Predictor

log = logging.getLogger(__name__)


@dataclass
class OpenIndex:
    """An index opened for querying: an engine over its current snapshot, and its catalog.

    The catalog (SQLAlchemy) is opened only when something needs it (labels, the model record),
    so a plain query whose snapshot is current never pays for importing SQLAlchemy.
    """

    engine: Engine
    index_dir: Path
    _catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            from db.catalog import Catalog

            self._catalog = Catalog.open(self.index_dir, create=False)
        return self._catalog

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    def __enter__(self) -> "OpenIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, image: Path, detect_face: bool | None = None, device: str = "auto") -> np.ndarray:
        """Embed an image file with the index's own checkpoint and preprocessing (loads torch)."""
        model = self.catalog.get_model(self.engine.snapshot.model_id)
        predictor = open_predictor(index_checkpoint(model), device)
        return predictor.embed(str(image), detect_face)

    def quality(self, result: Result) -> Quality:
        """Precision@k, precision/recall of all matches and the base rate, against the ground-truth
        labels stored in the catalog (CatalogError when the index holds none for the expression)."""
        from retrieval.query import literals

        if result.node is None:
            raise FacefindError("--eval needs an expression to check against the labels")
        names = list(dict.fromkeys(lit.name for lit, _ in literals(result.node)))
        label_ids, labels = self.catalog.labels_for(names)
        if label_ids.size == 0:
            raise CatalogError(
                f"the index holds no ground-truth labels for {', '.join(names)}: index a folder with CelebA "
                "annotations (list_attr_celeba.txt next to the images) to measure a query")
        return self.engine.evaluate_quality(result, labels.T, label_ids, names)


def open_index(index_dir: Path | None = None) -> OpenIndex:
    """Open the index (default ``db.paths.default_index_dir()``) and its snapshot, rebuilding
    stale sidecar files; CatalogError saying to run `facefind index` when missing or empty."""
    from db.paths import default_index_dir
    from db.snapshot import current_snapshot_fast
    from retrieval.engine import Engine

    folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    snapshot = current_snapshot_fast(folder)
    if snapshot is not None:
        return OpenIndex(Engine(snapshot), folder)

    from db.catalog import Catalog
    from db.snapshot import sync_snapshot

    catalog = Catalog.open(folder, create=False)
    try:
        engine = Engine(sync_snapshot(catalog, folder))
    except BaseException:
        catalog.close()
        raise
    return OpenIndex(engine, folder, catalog)


def open_predictor(model_path: str | os.PathLike[str], device: str = "auto") -> Predictor:
    """A ``Predictor`` for ``model_path`` (it decodes with ``trainer.decode``, as the indexer does)."""
    from trainer.predict import Predictor

    return Predictor(model_path, device)


def default_model_path(index_dir: Path | None = None) -> Path:
    """The model to predict with when none is given: the newest one in the index, else the newest
    checkpoint in the models folder; ModelError saying what to do when there is neither."""
    from db.catalog import latest_checkpoint
    from db.paths import default_index_dir, default_models_dir

    index_dir = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    recorded = latest_checkpoint(index_dir)
    if recorded is not None:
        if recorded.is_file():
            return recorded
        log.warning("the index's model %s no longer exists; looking in %s", recorded, default_models_dir())
    folder = default_models_dir()
    found = [p for p in folder.glob("*.pt") if not p.name.startswith(".")
             and not p.name.endswith(".state.pt")] if folder.is_dir() else []
    if found:
        return max(found, key=lambda p: (p.stat().st_mtime, p.name))
    raise ModelError(f"no model to predict with (none in the index at {index_dir} nor in {folder}): "
                     "pass --model PATH, or train one with `facefind train DATA`")


def index_checkpoint(model: ModelRecord) -> Path:
    """The checkpoint file an index was built with, checked to be that very file (sha256), so an
    image is embedded exactly like the indexed ones. ModelError when it is gone or has changed."""
    from db.files import file_sha256

    if not model.checkpoint:
        raise ModelError(f"the index does not record where model {model.id} ({model.arch}) is stored: "
                         "re-index with `facefind index FOLDER --model PATH`")
    path = Path(model.checkpoint)
    if not path.is_file():
        raise ModelError(f"the index was built with {path}, which no longer exists: restore it, or "
                         "re-index with `facefind index FOLDER --model PATH`")
    if file_sha256(path) != model.sha256:
        raise ModelError(f"{path} has changed since the index was built with it (its contents differ): "
                         "restore the original, or re-index with `facefind index FOLDER --model "
                         f"{path} --rebuild`")
    return path
