"""Opening the live snapshot of a model: read CURRENT once, then memory-map immutable files.

Readers never lock: a generation deleted between reading CURRENT and opening it (a writer
finished meanwhile) is retried with the new CURRENT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from facefind.db.errors import CatalogError
from facefind.db.snapshot.format import (
    ARRAYS,
    FACE_FILES,
    TRUTH_FILES,
    FORMAT,
    MANIFEST,
    VECTORS,
    PathList,
    Snapshot,
    current_name,
    manifest_sets,
    model_dir,
)
from facefind.db.snapshot.persons import attach
from facefind.db.vectors import flat_view

_LOAD_ATTEMPTS = 3  # a generation deleted between reading CURRENT and opening it: read CURRENT again


def load_snapshot(index_dir: str | os.PathLike[str], model_id: int) -> Snapshot:
    """Open the live snapshot of a model, memory-mapped (milliseconds, whatever its size).

    Raises CatalogError when there is none or it is damaged; ``sync_snapshot`` handles both.
    """
    return load_current(model_dir(index_dir, model_id))[0]


def load_current(folder: Path) -> tuple[Snapshot, dict[str, Any]]:
    for attempt in range(_LOAD_ATTEMPTS):
        name = current_name(folder)
        if name is None:
            raise CatalogError(f"no snapshot in {folder}: run `facefind index` (or `facefind check --repair`)")
        try:
            return _load_generation(folder / name)
        except FileNotFoundError:
            if attempt == _LOAD_ATTEMPTS - 1 or current_name(folder) == name:
                raise CatalogError(
                    f"the snapshot {folder / name} is incomplete: run `facefind check --repair` to rebuild it"
                ) from None
    raise AssertionError("unreachable")


def _load_generation(gen: Path) -> tuple[Snapshot, dict[str, Any]]:
    try:
        manifest = json.loads((gen / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')}, this facefind reads {FORMAT}")
        n, k, d = int(manifest["count"]), len(manifest["attributes"]), int(manifest["embedding_dim"])
        mode = "r" if n else None  # an empty file cannot be memory-mapped
        ids, probs, offsets = (np.load(gen / a, mmap_mode=mode, allow_pickle=False) for a in ARRAYS)
        emb = flat_view(gen / VECTORS, n, d)
        blob: np.ndarray | bytes = np.memmap(gen / "paths.bin", dtype=np.uint8, mode="r") if offsets[-1] else b""
        identity = has_identity = None
        if manifest.get("identity"):
            identity = np.load(gen / "identity.npy", mmap_mode=mode, allow_pickle=False)
            has_identity = np.load(gen / "identity_mask.npy", mmap_mode=mode, allow_pickle=False)
            if (identity.shape != (n, int(manifest["identity"]["dim"])) or identity.dtype != np.float16
                    or has_identity.shape != (n,) or has_identity.dtype != np.bool_):
                raise ValueError(f"identity arrays {identity.shape} {identity.dtype}, {has_identity.shape}")
        image_ids = face_numbers = boxes = None
        if manifest.get("faces"):
            image_ids, face_numbers, boxes = (np.load(gen / a, mmap_mode=mode, allow_pickle=False)
                                              for a in FACE_FILES)
            if (image_ids.shape != (n,) or face_numbers.shape != (n,) or boxes.shape != (n, 4)
                    or image_ids.dtype != np.int64 or face_numbers.dtype != np.int32 or boxes.dtype != np.int32):
                raise ValueError(f"face arrays {image_ids.shape} {face_numbers.shape} {boxes.shape}")
        label_attributes = labels = splits = None
        if manifest.get("labels"):
            label_attributes = list(manifest["labels"]["attributes"])
            labels, splits = (np.load(gen / a, mmap_mode=mode, allow_pickle=False) for a in TRUTH_FILES)
            if (labels.shape != (len(label_attributes), n) or splits.shape != (n,)
                    or labels.dtype != np.int8 or splits.dtype != np.int8):
                raise ValueError(f"label arrays {labels.shape} {labels.dtype}, {splits.shape} {splits.dtype}")
        stat = manifest.get("checkpoint_stat")
        vector_info = manifest.get("vectors") or {}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise CatalogError(f"the snapshot {gen} is damaged ({err}): run `facefind check --repair`") from None
    expected = {"ids": (n,), "probs": (k, n), "emb": (n, d), "paths_offsets": (n + 1,)}
    got = {"ids": ids.shape, "probs": probs.shape, "emb": emb.shape, "paths_offsets": offsets.shape}
    dtypes_ok = (ids.dtype == np.int64 and probs.dtype == np.float32 and emb.dtype == np.float16
                 and offsets.dtype == np.int64)
    if got != expected or not dtypes_ok or len(blob) < int(offsets[-1] if n else 0):
        raise CatalogError(f"the snapshot {gen} is damaged (array shapes {got}, expected {expected}): "
                           "run `facefind check --repair`")
    snap = Snapshot(
        model_id=int(manifest["model_id"]),
        stamp=int(manifest["stamp"]),
        attributes=list(manifest["attributes"]),
        thresholds=np.asarray(manifest["thresholds"], dtype=np.float32),
        ids=ids,
        probs=probs,
        emb=emb,
        paths=PathList(blob, offsets),
        folder=gen,
        **manifest_sets(manifest),
        checkpoint=manifest.get("checkpoint"),
        sha256=manifest.get("sha256"),
        checkpoint_stat=(int(stat[0]), int(stat[1])) if stat else None,
        approximate=vector_info.get("approximate"),
        identity=identity,
        has_identity=has_identity,
        image_ids=image_ids,
        face_numbers=face_numbers,
        boxes=boxes,
        label_attributes=label_attributes,
        labels=labels,
        splits=splits,
    )
    return attach(snap, gen.parent.parent, manifest.get("catalog_id")), manifest



def with_checkpoint(snap: Snapshot, checkpoint: str | None) -> Snapshot:
    """``snap`` naming the catalog's current path of its checkpoint: the same weights may have been
    registered again from another file since the snapshot was written (its stat is then unknown)."""
    if checkpoint == snap.checkpoint:
        return snap
    return dataclasses.replace(snap, checkpoint=checkpoint, checkpoint_stat=None)



def snapshot_info(index_dir: str | os.PathLike[str], model_id: int) -> dict[str, Any]:
    """What ``facefind info`` shows about a model's snapshot: stamp, counts, folder, bytes on disk."""
    folder = model_dir(index_dir, model_id)
    try:
        snap, manifest = load_current(folder)
    except CatalogError as err:
        return {"folder": str(folder), "stamp": None, "count": 0, "vectors": 0, "problem": str(err)}
    return {
        "folder": str(snap.folder),
        "stamp": snap.stamp,
        "count": len(snap),
        "vectors": len(snap),
        "approximate": (manifest.get("vectors") or {}).get("approximate"),
        "disk_bytes": folder_bytes(folder),
    }


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total