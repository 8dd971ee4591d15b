"""An index opened for querying: its catalog plus an engine over its current memory-mapped snapshot.

``query``, ``similar``, the demo and any web page use this one entry point. Opening it never
imports torch; ``embed`` (a reference image) loads the index's own checkpoint lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from db.errors import CatalogError, FacefindError

if TYPE_CHECKING:
    import numpy as np

    from db.catalog import Catalog
    from retrieval.engine import Engine, Quality, Result



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
        from retrieval.cli_predict import index_checkpoint, open_predictor

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
