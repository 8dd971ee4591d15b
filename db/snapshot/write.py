"""Writing a snapshot generation: stage every file, rename the folder into place, move CURRENT.

A writer builds the generation in a hidden staging folder, fsyncs every file, renames the folder
into place, then replaces CURRENT (``atomic_write_text``), and finally deletes generations older
than the previous one. A crash at any point leaves the previous snapshot live; the leftover
staging folder is removed next time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facefind.db import vectors
from facefind.db.errors import CatalogError
from facefind.db.files import atomic_write_text, fsync_dir
from facefind.db.snapshot.format import (
    APPROX,
    CURRENT,
    FACE_FILES,
    SPLITS,
    TRUTH_FILES,
    FORMAT,
    MANIFEST,
    VECTORS,
    PathList,
    current_name,
    face_arrays,
    identity_arrays,
    truth_arrays,
    model_dir,
    model_threshold_sets,
)
from facefind.db.snapshot.lock import writer_lock

log = logging.getLogger(__name__)


def write_snapshot(
    index_dir: str | os.PathLike[str],
    model: Any,
    stamp: int,
    ids: np.ndarray,
    paths: Sequence[str],
    probs: np.ndarray,
    emb: np.ndarray,
    *,
    catalog_id: str | None = None,
    approx_min: int | None = None,
    identity: np.ndarray | None = None,
    has_identity: np.ndarray | None = None,
    image_ids: np.ndarray | None = None,
    face_numbers: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    splits: np.ndarray | None = None,
) -> Path:
    """Write a new generation of ``model``'s snapshot and make it the live one; return its folder.

    ``model`` is a ``facefind.db.catalog.ModelRecord`` (or anything with its fields: id, sha256, arch,
    attributes, thresholds, embedding_dim, checkpoint). ``probs`` is (N, K) float32 as the
    catalog stores it, ``emb`` (N, D) raw float32 embeddings, or float16 rows already as the
    store keeps them (``vectors.stored_fp16``, e.g. from ``Catalog.export(stored=True)``), taken
    as they are; rows need not be sorted by id. From
    ``approx_min`` rows on (default ``facefind.db.vectors.APPROX_MIN``) an approximate index is built too.
    ``identity`` (N, 128) and ``has_identity`` (N,) bool: the rows' identity descriptors, if any.
    ``image_ids``, ``face_numbers``, ``boxes``: which file and face each row is (see ``Snapshot``).
    ``label_names``, ``labels`` int8 (L, N) and ``splits`` int8 (N,): the rows' ground truth, -1
    where a row has none (see ``Snapshot``).
    """
    folder = model_dir(index_dir, model.id)
    with writer_lock(folder):
        return write_locked(folder, model, stamp, ids, paths, probs, emb, catalog_id, approx_min,
                             identity, has_identity, image_ids, face_numbers, boxes, label_names, labels, splits)


def write_locked(
    folder: Path, model: Any, stamp: int, ids: np.ndarray, paths: Sequence[str], probs: np.ndarray,
    emb: np.ndarray, catalog_id: str | None, approx_min: int | None = None,
    identity: np.ndarray | None = None, has_identity: np.ndarray | None = None,
    image_ids: np.ndarray | None = None, face_numbers: np.ndarray | None = None, boxes: np.ndarray | None = None,
    label_names: Sequence[str] | None = None, labels: np.ndarray | None = None, splits: np.ndarray | None = None,
) -> Path:
    t0 = time.perf_counter()
    ids = np.asarray(ids, dtype=np.int64)
    n, k, d = ids.shape[0], len(model.attributes), int(model.embedding_dim)
    probs = np.asarray(probs, dtype=np.float32).reshape(n, k)
    emb = np.asarray(emb).reshape(n, d)
    if len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} ids")
    if n and not np.all(ids[1:] > ids[:-1]):  # the catalog exports in id order: usually a no-op
        order = np.argsort(ids, kind="stable")
        ids, probs, emb, paths = ids[order], probs[order], emb[order], [paths[i] for i in order.tolist()]
        if identity is not None and has_identity is not None:
            identity, has_identity = np.asarray(identity)[order], np.asarray(has_identity)[order]
        if image_ids is not None and face_numbers is not None and boxes is not None:
            image_ids, face_numbers, boxes = (np.asarray(a)[order] for a in (image_ids, face_numbers, boxes))
        if labels is not None:
            labels = np.asarray(labels)[:, order]
        if splits is not None:
            splits = np.asarray(splits)[order]
        if np.any(ids[1:] == ids[:-1]):
            raise ValueError("image ids repeat")
    emb16 = emb if emb.dtype == np.float16 else vectors.stored_fp16(emb)
    approx_min = vectors.APPROX_MIN if approx_min is None else approx_min
    approx, approx_s, factory = None, 0.0, vectors.approx_factory(n, d)
    if n >= max(approx_min, vectors.APPROX_FLOOR):
        t_approx = time.perf_counter()
        approx = vectors.build_approx(emb16, factory)
        approx_s = time.perf_counter() - t_approx
    path_list = PathList.from_list(paths)
    # Hashing the checkpoint here would read it a second time per index run (the run reads it once);
    # a caller that has verified it passes ``checkpoint_stat`` on the model record instead.
    stat = getattr(model, "checkpoint_stat", None)

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-*"):  # staging left by a crashed writer (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        staging = folder / f".tmp-gen-{stamp}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        arrays = {
            "ids.npy": ids,
            "probs.npy": np.ascontiguousarray(probs.T),
            "paths_offsets.npy": path_list._offsets,
        }
        ident = identity_arrays(n, identity, has_identity)
        if ident is not None:
            arrays.update({"identity.npy": ident[0], "identity_mask.npy": ident[1]})
        entries = face_arrays(ids, image_ids, face_numbers, boxes)
        if entries is not None:
            arrays.update(zip(FACE_FILES, entries))
        truth = truth_arrays(n, label_names, labels, splits)
        if truth is not None:
            arrays.update(zip(TRUTH_FILES, truth))
        for name, arr in arrays.items():
            _write_file(staging / name, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        _write_file(staging / "paths.bin", lambda f: f.write(path_list._blob))
        vector_info: dict[str, Any] = {"file": VECTORS, "crc32": vectors.write_flat(staging / VECTORS, emb16)}
        if approx is not None:
            vector_info.update(approximate=factory, approx_file=APPROX,
                               approx_crc32=vectors.write_approx(staging / APPROX, approx),
                               approx_build_s=round(approx_s, 3))
        default_set, sets, stats = model_threshold_sets(model)
        manifest = {
            "format": FORMAT,
            "model_id": int(model.id),
            "stamp": int(stamp),
            "count": int(n),
            "attributes": list(model.attributes),
            "thresholds": sets[default_set],
            "embedding_dim": d,
            "arch": model.arch,
            "checkpoint": model.checkpoint,
            "sha256": model.sha256,
            "checkpoint_stat": stat,
            "catalog_id": catalog_id,
            "vectors": vector_info,
            "created": time.time(),
        }
        manifest.update(threshold_set=default_set, threshold_sets=sets, threshold_stats=stats)
        if ident is not None:
            manifest["identity"] = {"count": int(ident[1].sum()), "dim": int(ident[0].shape[1]), "dtype": "float16"}
        if entries is not None:
            manifest["faces"] = {"boxed": int((entries[2][:, 2] >= 0).sum()),
                                 "files": int(np.unique(entries[0]).shape[0])}
        if truth is not None:
            manifest["labels"] = {"attributes": list(label_names or ()),
                                  "count": int((truth[0] >= 0).any(axis=0).sum()),
                                  "splits": {name: int((truth[1] == i).sum()) for i, name in enumerate(SPLITS)}}
        _write_file(staging / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        fsync_dir(staging)

        name, suffix = f"gen-{int(stamp)}", 0
        while (folder / name).exists():
            suffix += 1
            name = f"gen-{int(stamp)}-{suffix}"
        os.rename(staging, folder / name)
        previous = current_name(folder)
        atomic_write_text(folder / CURRENT, name)
    except OSError as err:
        raise CatalogError(
            f"cannot write the index snapshot in {folder}: {err.strerror or err}; check that the "
            "index folder is writable and the disk is not full (the previous snapshot is intact)"
        ) from None
    _collect_garbage(folder, keep={name, previous})
    log.info("snapshot %s/%s: %d images in %.2f s", folder, name, n, time.perf_counter() - t0)
    return folder / name



def _write_file(path: Path, write: Any) -> None:
    """Create ``path``, let ``write(f)`` fill it, and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())



def _collect_garbage(folder: Path, keep: set[str | None]) -> None:
    """Delete generations other than ``keep`` (the live one and the one before it).

    A reader that opened an older generation keeps its memory maps (POSIX keeps unlinked files
    alive); one that read CURRENT but had not opened the files yet retries with the new CURRENT.
    """
    for gen in folder.glob("gen-*"):
        if gen.name not in keep:
            shutil.rmtree(gen, ignore_errors=True)
    for tmp in [*folder.glob(f".{CURRENT}.*.tmp"), *folder.glob(f".tmp-{CURRENT}-*")]:  # a killed CURRENT write
        tmp.unlink(missing_ok=True)
