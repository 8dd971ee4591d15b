"""An index opened for querying: its catalog plus an engine over its current memory-mapped snapshot.

``query``, ``similar``, ``predict``, the demo and any web page use this one entry point. Opening it
never imports torch; ``embed`` (a reference image) loads the index's own checkpoint lazily, checked
to be the very file the index was built with, and decodes the image with ``facefind.trainer.decode``
(through ``Predictor``), the indexer's decoder, so that one-off images get exactly the pixels
indexed ones got. The checkpoint's path and sha256 come from the snapshot's manifest (no catalog
round trip), and the file is hashed again only when its size or mtime differ from those recorded
when the snapshot was published.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facefind.db.errors import CatalogError, FacefindError, ImageError, ModelError
from facefind.db.files import file_sha256
from facefind.db.paths import default_index_dir
from facefind.db.snapshot import current_snapshot_fast
from facefind.retrieval.engine import NO_IDENTITY, Engine, Quality, Result
from facefind.retrieval.query import Tag, literals

if TYPE_CHECKING:
    import numpy as np

    from facefind.db.catalog import Catalog
    from facefind.indexer.predict import Predictor


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
            from facefind.db.catalog import Catalog  # SQLAlchemy: see the class docstring

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
        return open_predictor(self.checkpoint(), device).embed(str(image), detect_face)

    def checkpoint(self) -> Path:
        """The verified checkpoint file of the snapshot's model (ModelError when gone or changed).

        The snapshot manifest names it; only a snapshot built in memory asks the catalog."""
        snap = self.engine.snapshot
        if snap.sha256 is None:
            model = self.catalog.get_model(snap.model_id)
            checkpoint, sha256, stat = model.checkpoint, model.sha256, None
        else:
            checkpoint, sha256, stat = snap.checkpoint, snap.sha256, snap.checkpoint_stat
        return index_checkpoint(checkpoint, sha256, stat, what=f"model {snap.model_id}")

    def require_identity(self) -> None:
        """CatalogError saying to run ``index --identity`` when the index has no identity descriptors."""
        if self.engine.identity is None:
            raise CatalogError(NO_IDENTITY)

    def describe(self, image: Path) -> np.ndarray:
        """The 128-D identity descriptor of the largest face in an image file (``facefind.indexer.faces.detect``,
        the code ``index --identity`` runs; loads dlib, not torch). ImageError when it has no face."""
        from facefind.indexer.faces.detect import identity_of  # PIL and dlib: only for --by person
        from facefind.trainer.decode import read_rgb

        found = identity_of(read_rgb(image))
        if found is None:
            raise ImageError(f"no face found in {image}: --by person needs a clearly visible face "
                             "(use --by look to compare whole images)")
        return found

    def quality(self, result: Result) -> Quality:
        """Precision@k, precision/recall of all matches and the base rate, against the ground-truth
        labels stored in the catalog (CatalogError when the index holds none for the expression)."""
        if result.node is None:
            raise FacefindError("--eval needs an expression to check against the labels")
        names = list(dict.fromkeys(lit.name for lit, _ in literals(result.node) if not isinstance(lit, Tag)))
        label_ids, labels = self.catalog.labels_for(names)
        if label_ids.size == 0:
            raise CatalogError(
                f"the index holds no ground-truth labels for {', '.join(names)}: index a folder with CelebA "
                "annotations (list_attr_celeba.txt next to the images) to measure a query")
        return self.engine.evaluate_quality(result, labels.T, label_ids, names)


def open_index(index_dir: Path | None = None) -> OpenIndex:
    """Open the index (default ``facefind.db.paths.default_index_dir()``) and its snapshot, rebuilding
    stale sidecar files; CatalogError saying to run `facefind index` when missing or empty."""
    folder = Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
    snapshot = current_snapshot_fast(folder)
    if snapshot is not None:
        return OpenIndex(Engine(snapshot), folder)

    from facefind.db.catalog import Catalog  # SQLAlchemy: only when the snapshot is behind the catalog
    from facefind.db.snapshot import sync_snapshot

    catalog = Catalog.open(folder, create=False)
    try:
        engine = Engine(sync_snapshot(catalog, folder))
    except BaseException:
        catalog.close()
        raise
    return OpenIndex(engine, folder, catalog)


def open_predictor(model_path: str | os.PathLike[str], device: str = "auto") -> Predictor:
    """A ``Predictor`` for ``model_path`` (it decodes with ``facefind.trainer.decode``, as the indexer does)."""
    from facefind.indexer.predict import Predictor  # the model's code, only to embed an image

    return Predictor(model_path, device)


def index_checkpoint(checkpoint: str | None, sha256: str, stat: tuple[int, int] | None = None, *,
                     what: str = "the model") -> Path:
    """The checkpoint file an index was built with, checked to be that very file, so an image is
    embedded exactly like the indexed ones. ModelError when it is gone or has changed.

    ``stat`` is the file's (size, mtime_ns) when its sha256 was last verified (the snapshot
    records it at publish time): an unchanged stat skips hashing (~0.1-0.5 s per query for a
    CelebA-size checkpoint); any difference hashes the file.
    """
    if not checkpoint:
        raise ModelError(f"the index does not record where {what} is stored: "
                         "re-index with `facefind index FOLDER --model PATH`")
    path = Path(checkpoint)
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise ModelError(f"the index was built with {path}, which no longer exists: restore it, or "
                         "re-index with `facefind index FOLDER --model PATH`")
    if stat is not None and (st.st_size, st.st_mtime_ns) == tuple(stat):
        return path
    if file_sha256(path) != sha256:
        raise ModelError(f"{path} has changed since the index was built with it (its contents differ): "
                         "restore the original, or re-index with `facefind index FOLDER --model "
                         f"{path} --rebuild`")
    return path
