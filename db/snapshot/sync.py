"""Keeping a model's snapshot in step with the catalog: reuse the live one, or rebuild it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from facefind.db.errors import CatalogError
from facefind.db.snapshot import write
from facefind.db.snapshot.fast import record_published
from facefind.db.snapshot.format import (
    Snapshot,
    entry_fields,
    face_arrays,
    identity_arrays,
    manifest_sets,
    matches,
    model_dir,
    model_threshold_sets,
    truth_arrays,
)
from facefind.db.snapshot.lock import writer_lock
from facefind.db.snapshot.persons import attach
from facefind.db.snapshot.read import load_current, with_checkpoint

log = logging.getLogger(__name__)


def resolve_model_id(catalog: Any, model_id: int | None = None) -> int:
    """``model_id`` if given, else the newest model with predictions (CatalogError when none)."""
    if model_id is not None:
        return int(model_id)
    model = catalog.latest_model(require_predictions=True)
    if model is None:
        raise CatalogError("the index holds no predictions yet: run `facefind index FOLDER` first")
    return model.id


def sync_snapshot(
    catalog: Any,
    index_dir: str | os.PathLike[str],
    model_id: int | None = None,
    *,
    approx_min: int | None = None,
    reuse_while_indexing: bool = True,
) -> Snapshot:
    """The model's snapshot, in step with the catalog: the live one when current, else rebuilt.

    Rebuilds (and saves) when the snapshot is missing, damaged, or built from another catalog
    state. Concurrent callers rebuild once: the others wait and then load the result. Where the
    index folder is read-only the snapshot is built in memory instead (with a warning).

    While an index run of this model is in progress its predictions change with every batch;
    with ``reuse_while_indexing`` a query then gets the last snapshot (consistent, a little
    behind) instead of paying for a rebuild. The indexer writes a fresh one when it finishes.
    """
    model_id = resolve_model_id(catalog, model_id)
    model = catalog.get_model(model_id)
    folder = model_dir(index_dir, model_id)
    found = _try_current(folder, catalog, model, catalog.stamp(model_id), any_stamp=reuse_while_indexing)
    if found is not None:
        if found.stamp == catalog.stamp(model_id):
            record_published(Path(index_dir), catalog)
            return found
        if any(run.model_id == model_id for run in catalog.active_runs()):
            log.info("an index run is in progress: using the snapshot of stamp %d", found.stamp)
            return found
    if reuse_while_indexing and (hold := catalog.publish_hold(model_id)) is not None:
        # A sharded build is filling the catalog: never publish what only some shards wrote.
        if found is not None:
            log.info("a sharded index build is in progress: using the snapshot of stamp %d", found.stamp)
            return found
        raise CatalogError(
            f"the index is being built in {hold.get('shards', 'several')} shards and none of it is published "
            "yet: run `facefind index FOLDER --finalize` once every shard is done"
        )
    with writer_lock(folder) as locked:
        found = _try_current(folder, catalog, model, catalog.stamp(model_id))  # built while we waited?
        if found is not None:
            record_published(Path(index_dir), catalog)
            return found
        # One transaction: the stamp describes exactly these rows; embeddings come as the store keeps them.
        stamp, preds = catalog.export(model_id, stored=True)
        log.info("rebuilding the snapshot of model %d (stamp %d, %d images)", model_id, stamp, len(preds.ids))
        if locked:
            try:
                write.write_locked(folder, model, stamp, preds.ids, preds.paths, preds.probs, preds.emb,
                              catalog.catalog_id, approx_min, **entry_fields(preds))
                record_published(Path(index_dir), catalog)
                return load_current(folder)[0]
            except CatalogError as err:
                log.warning("%s; using an in-memory snapshot", err)
        else:
            log.warning("cannot lock %s (read-only index?); using an in-memory snapshot", folder)
        default_set, sets, stats = model_threshold_sets(model)
        ident = identity_arrays(len(preds.ids), preds.identity, preds.has_identity)
        entries = face_arrays(np.asarray(preds.ids, np.int64), preds.image_ids, preds.faces, preds.boxes)
        truth = truth_arrays(len(preds.ids), preds.label_names, preds.labels, preds.splits)
        snap = Snapshot(
            model_id=model_id, stamp=stamp, attributes=list(model.attributes),
            thresholds=np.asarray(sets[default_set], dtype=np.float32), ids=np.asarray(preds.ids, np.int64),
            probs=np.ascontiguousarray(preds.probs.T),
            emb=preds.emb if len(preds.ids) else np.zeros((0, model.embedding_dim), np.float16),
            paths=list(preds.paths), folder=None, checkpoint=model.checkpoint, sha256=model.sha256,
            **manifest_sets({"threshold_set": default_set, "threshold_sets": sets, "threshold_stats": stats}),
            identity=None if ident is None else ident[0], has_identity=None if ident is None else ident[1],
            **({} if entries is None else dict(zip(("image_ids", "face_numbers", "boxes"), entries))),
            **({} if truth is None else {"label_attributes": list(preds.label_names or ()),
                                         "labels": truth[0], "splits": truth[1]}),
        )
        return attach(snap, index_dir, catalog.catalog_id)



def _try_current(folder: Path, catalog: Any, model: Any, stamp: int, *, any_stamp: bool = False) -> Snapshot | None:
    """The live snapshot if it is intact and was built from this catalog and model (and, unless
    ``any_stamp``, from predictions of this ``stamp``)."""
    try:
        snap, manifest = load_current(folder)
    except CatalogError as err:
        log.debug("snapshot not usable: %s", err)
        return None
    wanted = manifest.get("stamp") if any_stamp else stamp
    if not matches(manifest, catalog.catalog_id, model.sha256, wanted):
        return None
    return with_checkpoint(snap, model.checkpoint)
