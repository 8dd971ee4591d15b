"""Memory-mappable sidecar files: the query engine's read-only view of one model's predictions.

The catalog is the source of truth; a snapshot is derived from it and can always be rebuilt.
Layout under the index folder (one folder per model, one immutable generation per write):

    <index>/PUBLISHED                       with a server catalog (FACEFIND_DB): the hash of its URL
                                            and its catalog id, so queries can trust the snapshots
                                            without connecting (see current_snapshot_fast)
    <index>/model-<id>/CURRENT              name of the live generation folder (replaced atomically)
    <index>/model-<id>/.lock                serialises snapshot writers (flock; readers never lock)
    <index>/model-<id>/gen-<stamp>/         (gen-<stamp>-<n> when that stamp was written before)
        manifest.json   model_id, stamp, count, attributes, thresholds, embedding_dim, arch,
                        checkpoint, sha256, checkpoint_stat, catalog_id, vectors, threshold_set
                        (the set bare names use), threshold_sets, threshold_stats (written last)
        ids.npy         int64 (N,)        catalog face ids (index entries), ascending
        probs.npy       float32 (K, N)    attribute probabilities, column-major for fast filtering
        paths.bin       UTF-8 paths, concatenated; paths_offsets.npy int64 (N+1,) their bounds
                        (read lazily: opening a snapshot never decodes 200k strings)
        vectors.faiss   the embeddings, once: L2-normalised float16 rows in a FAISS flat store that
                        the engine memory-maps and searches; ``Snapshot.emb`` maps the same bytes
        ann.faiss       only from ``facefind.db.vectors.APPROX_MIN`` rows on: an IVF-PQ index over them
                        (see db/vectors.py)
        identity.npy    float16 (N, 128)  dlib identity descriptors (``index --identity``; zeros
                        where identity_mask is False), only when some row has one; the
                        manifest's ``identity`` ({"count", "dim", "dtype"}) says so
        identity_mask.npy  bool (N,)      which rows have a descriptor
        image_ids.npy   int64 (N,)        only when some file has faces of its own (``index
        face_numbers.npy int32 (N,)       --detect-faces`` on photos) or face ids differ from image
        boxes.npy       int32 (N, 4)      ids: each entry's file, its face number, its box x, y, w, h
                                          (-1: the whole file); the manifest's ``faces`` says so.
                                          Without them each entry is a whole file, image id = id

Readers open CURRENT once and then only immutable files, so a reader never sees a half-written
generation while an indexer writes the next one. A writer builds the generation in a hidden
staging folder, fsyncs every file, renames the folder into place, then replaces CURRENT (temp
file + fsync + rename), and finally deletes generations older than the previous one. A crash at
any point leaves the previous snapshot live; the leftover staging folder is removed next time.

Snapshots are identified by the catalog's ``catalog_id``, the model's sha256 and its prediction
``stamp`` (``Catalog.stamp``): ``sync_snapshot`` rebuilds whenever any of them differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from facefind.db.files import fsync_dir
from facefind.db.errors import CatalogError

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the embeddings live only in vectors.faiss (format 1 also had emb.npy)
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
VECTORS = "vectors.faiss"
PUBLISHED = "PUBLISHED"  # <index>/PUBLISHED: which server catalog the snapshots come from
APPROX = "ann.faiss"
_ARRAYS = ("ids.npy", "probs.npy", "paths_offsets.npy")
_LOAD_ATTEMPTS = 3  # a generation deleted between reading CURRENT and opening it: read CURRENT again


class PathList(Sequence[str]):
    """A read-only list of paths decoded on access from one memory-mapped UTF-8 blob.

    Behaves like ``list[str]`` for indexing, slicing, ``len`` and iteration; ``tolist()`` gives a
    real list. Opening costs nothing, whatever the number of paths.
    """

    def __init__(self, blob: np.ndarray | bytes, offsets: np.ndarray) -> None:
        self._blob = blob
        self._offsets = offsets

    @classmethod
    def from_list(cls, paths: Sequence[str]) -> "PathList":
        encoded = [p.encode("utf-8") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def __len__(self) -> int:
        return int(self._offsets.shape[0]) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        return bytes(self._blob[start:stop]).decode("utf-8")

    def tolist(self) -> list[str]:
        """All paths as a list (decodes everything: ~20 ms per 200k paths)."""
        raw = bytes(self._blob[: int(self._offsets[-1])]) if len(self) else b""
        lengths = np.diff(self._offsets)
        out, pos = [], 0
        for length in lengths.tolist():
            out.append(raw[pos:pos + length].decode("utf-8"))
            pos += length
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PathList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(p) for p in self[:3])
        return f"PathList([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


@dataclass(frozen=True)
class Snapshot:
    """One model's predictions, as arrays. ``probs[k, i]`` is attribute k of image ``ids[i]``."""

    model_id: int
    stamp: int                 # the catalog's prediction generation this snapshot was built from
    attributes: list[str]      # K names, in checkpoint order
    thresholds: np.ndarray     # float32 (K,), calibrated decision thresholds
    ids: np.ndarray            # int64 (N,)
    probs: np.ndarray          # float32 (K, N)
    emb: np.ndarray            # float16 (N, D), L2-normalised
    paths: Sequence[str]       # N absolute paths (a lazy PathList when loaded from disk)
    folder: Path | None = None # the generation folder it was loaded from (None when built in memory)
    # Every calibrated threshold set by objective name ("accuracy", "f1"); ``thresholds`` is the
    # one named ``threshold_set``, which bare names use by default. ``threshold_stats`` holds each
    # set's per-attribute val precision/recall/F1 ({set: {"f1": [K floats], ...}}), when known.
    threshold_set: str = "accuracy"
    threshold_sets: dict[str, np.ndarray] = field(default_factory=dict)
    threshold_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    checkpoint: str | None = None  # the model file the predictions came from, and its sha256,
    sha256: str | None = None      # so embedding a reference image needs no catalog
    checkpoint_stat: tuple[int, int] | None = None  # (size, mtime_ns) when that sha256 was verified
    approximate: str | None = None  # factory of the generation's ann.faiss (None: exact only)
    # dlib identity descriptors (``index --identity``), float16 (N, 128), and which rows have one;
    # None when no image of the snapshot has one. float16 moves a distance by < 1e-3 (the
    # same-person threshold is 0.6) and halves the memory.
    identity: np.ndarray | None = None
    has_identity: np.ndarray | None = None
    # Which file and face each entry is (``index --detect-faces``): int64 (N,) image ids, int32 (N,)
    # face numbers, int32 (N, 4) boxes x, y, w, h (-1: the whole file). None: every entry is a
    # whole file whose image id is its id.
    image_ids: np.ndarray | None = None
    face_numbers: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.threshold_sets:  # built without sets (older manifests, tests): the one it has
            object.__setattr__(self, "threshold_sets", {self.threshold_set: np.asarray(self.thresholds, np.float32)})

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def face(self, i: int) -> tuple[int, tuple[int, int, int, int] | None]:
        """Row ``i``'s face number in its file and its box (None: the entry is the whole file)."""
        if self.boxes is None or self.face_numbers is None:
            return 0, None
        box = tuple(int(v) for v in self.boxes[i])
        return int(self.face_numbers[i]), (None if box[2] < 0 else box)  # type: ignore[return-value]


def entry_fields(preds: Any) -> dict[str, Any]:
    """The per-entry arrays of a ``facefind.db.catalog.Predictions`` beyond ids, paths, probs and
    embeddings, as ``write_snapshot`` keywords (so that no writer forgets one)."""
    return {"identity": preds.identity, "has_identity": preds.has_identity,
            "image_ids": preds.image_ids, "face_numbers": preds.faces, "boxes": preds.boxes}


def model_threshold_sets(model: Any) -> tuple[str, dict[str, list[float]], dict[str, Any]]:
    """(default set name, every set, per-set val stats) of a catalog model record.

    They live in the model's ``meta`` JSON (written by the indexer from the checkpoint). A model
    registered before sets were recorded has only its ``thresholds`` column, taken as "accuracy"
    (what training calibrated for by default then).
    """
    meta = getattr(model, "meta", None) or {}
    sets = {str(k): [float(t) for t in v] for k, v in (meta.get("threshold_sets") or {}).items()}
    name = str(meta.get("threshold_set") or "accuracy")
    if not sets or name not in sets:
        sets = {name: [float(t) for t in model.thresholds]}
    return name, sets, dict(meta.get("threshold_stats") or {})


# ------------------------------------------------------------------------------------ helpers


def model_dir(index_dir: str | os.PathLike[str], model_id: int) -> Path:
    """The folder holding model ``model_id``'s snapshot generations."""
    return Path(index_dir) / f"model-{int(model_id)}"


def _write_file(path: Path, write: Any) -> None:
    """Create ``path``, let ``write(f)`` fill it, and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[bool]:
    """Hold the model folder's writer lock (blocks while another process writes a snapshot).

    Yields False, without locking, where the lock file cannot be created (read-only index).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; writers rarely overlap there
        yield True
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def _normalized_fp16(emb: np.ndarray) -> np.ndarray:
    from facefind.db.vectors import stored_fp16

    return stored_fp16(emb)


# ------------------------------------------------------------------------------------ writing


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
) -> Path:
    """Write a new generation of ``model``'s snapshot and make it the live one; return its folder.

    ``model`` is a ``facefind.db.catalog.ModelRecord`` (or anything with its fields: id, sha256, arch,
    attributes, thresholds, embedding_dim, checkpoint). ``probs`` is (N, K) float32 as the
    catalog stores it, ``emb`` (N, D) raw embeddings; rows need not be sorted by id. From
    ``approx_min`` rows on (default ``facefind.db.vectors.APPROX_MIN``) an approximate index is built too.
    ``identity`` (N, 128) and ``has_identity`` (N,) bool: the rows' identity descriptors, if any.
    ``image_ids``, ``face_numbers``, ``boxes``: which file and face each row is (see ``Snapshot``).
    """
    folder = model_dir(index_dir, model.id)
    with _writer_lock(folder):
        return _write_locked(folder, model, stamp, ids, paths, probs, emb, catalog_id, approx_min,
                             identity, has_identity, image_ids, face_numbers, boxes)


def _write_locked(
    folder: Path, model: Any, stamp: int, ids: np.ndarray, paths: Sequence[str], probs: np.ndarray,
    emb: np.ndarray, catalog_id: str | None, approx_min: int | None = None,
    identity: np.ndarray | None = None, has_identity: np.ndarray | None = None,
    image_ids: np.ndarray | None = None, face_numbers: np.ndarray | None = None, boxes: np.ndarray | None = None,
) -> Path:
    from facefind.db import vectors

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
        if np.any(ids[1:] == ids[:-1]):
            raise ValueError("image ids repeat")
    emb16 = vectors.stored_fp16(emb)
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
        ident = _identity_arrays(n, identity, has_identity)
        if ident is not None:
            arrays.update({"identity.npy": ident[0], "identity_mask.npy": ident[1]})
        entries = _face_arrays(ids, image_ids, face_numbers, boxes)
        if entries is not None:
            arrays.update(zip(_FACE_FILES, entries))
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
        _write_file(staging / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        fsync_dir(staging)

        name, suffix = f"gen-{int(stamp)}", 0
        while (folder / name).exists():
            suffix += 1
            name = f"gen-{int(stamp)}-{suffix}"
        os.rename(staging, folder / name)
        previous = _current_name(folder)
        tmp = folder / f".tmp-CURRENT-{uuid.uuid4().hex[:8]}"
        _write_file(tmp, lambda f: f.write(name.encode()))
        os.replace(tmp, folder / CURRENT)
        fsync_dir(folder)
    except OSError as err:
        raise CatalogError(
            f"cannot write the index snapshot in {folder}: {err.strerror or err}; check that the "
            "index folder is writable and the disk is not full (the previous snapshot is intact)"
        ) from None
    _collect_garbage(folder, keep={name, previous})
    log.info("snapshot %s/%s: %d images in %.2f s", folder, name, n, time.perf_counter() - t0)
    return folder / name


def _identity_arrays(n: int, identity: np.ndarray | None,
                     has_identity: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored form of the identity descriptors: float16 (N, 128) and bool (N,), or None when
    no row has one."""
    if identity is None or has_identity is None:
        return None
    mask = np.asarray(has_identity, dtype=bool).reshape(n)
    if not mask.any():
        return None
    vectors = np.asarray(identity, dtype=np.float32).reshape(n, -1).astype(np.float16)
    vectors[~mask] = 0
    return vectors, mask


_FACE_FILES = ("image_ids.npy", "face_numbers.npy", "boxes.npy")


def _face_arrays(ids: np.ndarray, image_ids: np.ndarray | None, face_numbers: np.ndarray | None,
                 boxes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The stored form of which file and face each row is, or None when that says nothing the
    ids do not (every row a whole file whose image id is its id: CelebA-style folders)."""
    if image_ids is None or face_numbers is None or boxes is None:
        return None
    n = ids.shape[0]
    image_ids = np.asarray(image_ids, dtype=np.int64).reshape(n)
    face_numbers = np.asarray(face_numbers, dtype=np.int32).reshape(n)
    boxes = np.asarray(boxes, dtype=np.int32).reshape(n, 4)
    if np.array_equal(image_ids, ids) and not face_numbers.any() and bool((boxes[:, 2] < 0).all()):
        return None
    return image_ids, face_numbers, boxes


def _current_name(folder: Path) -> str | None:
    try:
        return (folder / CURRENT).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def _collect_garbage(folder: Path, keep: set[str | None]) -> None:
    """Delete generations other than ``keep`` (the live one and the one before it).

    A reader that opened an older generation keeps its memory maps (POSIX keeps unlinked files
    alive); one that read CURRENT but had not opened the files yet retries with the new CURRENT.
    """
    for gen in folder.glob("gen-*"):
        if gen.name not in keep:
            shutil.rmtree(gen, ignore_errors=True)
    for tmp in folder.glob(".tmp-CURRENT-*"):
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ reading


def load_snapshot(index_dir: str | os.PathLike[str], model_id: int) -> Snapshot:
    """Open the live snapshot of a model, memory-mapped (milliseconds, whatever its size).

    Raises CatalogError when there is none or it is damaged; ``sync_snapshot`` handles both.
    """
    return _load(model_dir(index_dir, model_id))[0]


def _load(folder: Path) -> tuple[Snapshot, dict[str, Any]]:
    for attempt in range(_LOAD_ATTEMPTS):
        name = _current_name(folder)
        if name is None:
            raise CatalogError(f"no snapshot in {folder}: run `facefind index` (or `facefind check --repair`)")
        try:
            return _load_generation(folder / name)
        except FileNotFoundError:
            if attempt == _LOAD_ATTEMPTS - 1 or _current_name(folder) == name:
                raise CatalogError(
                    f"the snapshot {folder / name} is incomplete: run `facefind check --repair` to rebuild it"
                ) from None
    raise AssertionError("unreachable")


def _load_generation(gen: Path) -> tuple[Snapshot, dict[str, Any]]:
    from facefind.db.vectors import flat_view

    try:
        manifest = json.loads((gen / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')}, this facefind reads {FORMAT}")
        n, k, d = int(manifest["count"]), len(manifest["attributes"]), int(manifest["embedding_dim"])
        mode = "r" if n else None  # an empty file cannot be memory-mapped
        ids, probs, offsets = (np.load(gen / a, mmap_mode=mode, allow_pickle=False) for a in _ARRAYS)
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
                                              for a in _FACE_FILES)
            if (image_ids.shape != (n,) or face_numbers.shape != (n,) or boxes.shape != (n, 4)
                    or image_ids.dtype != np.int64 or face_numbers.dtype != np.int32 or boxes.dtype != np.int32):
                raise ValueError(f"face arrays {image_ids.shape} {face_numbers.shape} {boxes.shape}")
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
        **_manifest_sets(manifest),
        checkpoint=manifest.get("checkpoint"),
        sha256=manifest.get("sha256"),
        checkpoint_stat=(int(stat[0]), int(stat[1])) if stat else None,
        approximate=vector_info.get("approximate"),
        identity=identity,
        has_identity=has_identity,
        image_ids=image_ids,
        face_numbers=face_numbers,
        boxes=boxes,
    )
    return snap, manifest


def _manifest_sets(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Snapshot's threshold-set fields from a manifest (older manifests have none: defaults)."""
    sets = manifest.get("threshold_sets")
    if not isinstance(sets, dict) or not sets:
        return {}
    return {"threshold_set": str(manifest.get("threshold_set") or next(iter(sets))),
            "threshold_sets": {str(k): np.asarray(v, dtype=np.float32) for k, v in sets.items()},
            "threshold_stats": dict(manifest.get("threshold_stats") or {})}


def _matches(manifest: dict[str, Any], catalog_id: str, sha256: str, stamp: int) -> bool:
    """Whether a snapshot was built from this catalog, this model file and this prediction stamp."""
    return (manifest.get("stamp") == stamp and manifest.get("sha256") == sha256
            and manifest.get("catalog_id") == catalog_id and manifest.get("format") == FORMAT)


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
            _record_published(Path(index_dir), catalog)
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
    with _writer_lock(folder) as locked:
        found = _try_current(folder, catalog, model, catalog.stamp(model_id))  # built while we waited?
        if found is not None:
            _record_published(Path(index_dir), catalog)
            return found
        stamp, preds = catalog.export(model_id)  # one transaction: the stamp describes exactly these rows
        log.info("rebuilding the snapshot of model %d (stamp %d, %d images)", model_id, stamp, len(preds.ids))
        if locked:
            try:
                _write_locked(folder, model, stamp, preds.ids, preds.paths, preds.probs, preds.emb,
                              catalog.catalog_id, approx_min, **entry_fields(preds))
                _record_published(Path(index_dir), catalog)
                return _load(folder)[0]
            except CatalogError as err:
                log.warning("%s; using an in-memory snapshot", err)
        else:
            log.warning("cannot lock %s (read-only index?); using an in-memory snapshot", folder)
        default_set, sets, stats = model_threshold_sets(model)
        ident = _identity_arrays(len(preds.ids), preds.identity, preds.has_identity)
        entries = _face_arrays(np.asarray(preds.ids, np.int64), preds.image_ids, preds.faces, preds.boxes)
        return Snapshot(
            model_id=model_id, stamp=stamp, attributes=list(model.attributes),
            thresholds=np.asarray(sets[default_set], dtype=np.float32), ids=np.asarray(preds.ids, np.int64),
            probs=np.ascontiguousarray(preds.probs.T),
            emb=_normalized_fp16(preds.emb) if len(preds.ids) else np.zeros((0, model.embedding_dim), np.float16),
            paths=list(preds.paths), folder=None, checkpoint=model.checkpoint, sha256=model.sha256,
            **_manifest_sets({"threshold_set": default_set, "threshold_sets": sets, "threshold_stats": stats}),
            identity=None if ident is None else ident[0], has_identity=None if ident is None else ident[1],
            **({} if entries is None else dict(zip(("image_ids", "face_numbers", "boxes"), entries))),
        )


def current_snapshot_fast(index_dir: str | os.PathLike[str]) -> Snapshot | None:
    """The newest model's snapshot when it can be served without SQLAlchemy; else None.

    The query path's shortcut: importing SQLAlchemy costs ~0.3-0.8 s of a ~1 s command (psycopg
    another 0.4 s). Returns None (the caller then takes the full ``sync_snapshot`` route) whenever
    anything is unusual. Two cases:

    - The index folder's SQLite catalog: the snapshot is served when provably current, checked
      with the stdlib's sqlite3 (three tiny reads): not behind the catalog, same catalog id.
    - A server catalog (``FACEFIND_DB`` set to a non-SQLite URL): the database is not contacted.
      Queries read the *published* snapshot, the one the last index run (or ``check --repair``)
      wrote, as long as ``PUBLISHED`` records that it was published from this very URL. After an
      index run was killed the catalog can be ahead of it; ``facefind check`` reports that as
      ``snapshot_stale`` and ``--repair`` or the next run publishes again. This is what lets
      several machines share one database while queries stay as fast as with SQLite.
    """
    url = os.environ.get("FACEFIND_DB")
    if url and not url.startswith("sqlite"):
        return _published_snapshot(Path(index_dir), url)
    import sqlite3

    path = Path(index_dir) / "catalog.db"
    if url or not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        with conn:  # one read transaction: the three reads see the same catalog state
            conn.execute("BEGIN")
            catalog_id = conn.execute("SELECT value FROM meta WHERE key = 'catalog_id'").fetchone()
            model = conn.execute(
                "SELECT id, sha256, generation, checkpoint FROM models AS m WHERE EXISTS "
                "(SELECT 1 FROM predictions AS p WHERE p.model_id = m.id) ORDER BY id DESC LIMIT 1"
            ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    if catalog_id is None or model is None:
        return None
    model_id, sha256, stamp, checkpoint = model
    try:
        snap, manifest = _load(model_dir(index_dir, model_id))
    except CatalogError:
        return None
    return _with_checkpoint(snap, checkpoint) if _matches(manifest, catalog_id[0], sha256, stamp) else None


def _with_checkpoint(snap: Snapshot, checkpoint: str | None) -> Snapshot:
    """``snap`` naming the catalog's current path of its checkpoint: the same weights may have been
    registered again from another file since the snapshot was written (its stat is then unknown)."""
    if checkpoint == snap.checkpoint:
        return snap
    return dataclasses.replace(snap, checkpoint=checkpoint, checkpoint_stat=None)


def _url_key(url: str) -> str:
    """What ``PUBLISHED`` records of a catalog URL: a hash, so that no password lands on disk."""
    import hashlib

    return hashlib.sha256(url.encode()).hexdigest()


def _record_published(index_dir: Path, catalog: Any) -> None:
    """Note in ``<index>/PUBLISHED`` which server catalog (URL hash, catalog id) the snapshots
    of this folder come from, for ``current_snapshot_fast``. Nothing for SQLite catalogs."""
    url = getattr(catalog, "url", "")
    if not url or url.startswith("sqlite"):
        return
    record = {"url_sha256": _url_key(url), "catalog_id": catalog.catalog_id}
    path = Path(index_dir) / PUBLISHED
    try:
        if json.loads(path.read_text(encoding="utf-8")) == record:
            return
    except (OSError, ValueError):
        pass
    try:
        tmp = path.with_name(f".tmp-{PUBLISHED}-{uuid.uuid4().hex[:8]}")
        _write_file(tmp, lambda f: f.write(json.dumps(record).encode()))
        os.replace(tmp, path)
    except OSError as err:  # a read-only index: queries then take the full route
        log.debug("cannot record %s: %s", path, err)


def _published_snapshot(index_dir: Path, url: str) -> Snapshot | None:
    """The newest model's live snapshot, if ``PUBLISHED`` says it came from the catalog at ``url``."""
    try:
        record = json.loads((index_dir / PUBLISHED).read_text(encoding="utf-8"))
        if record.get("url_sha256") != _url_key(url):
            return None
        model_ids = sorted((int(p.name[6:]) for p in index_dir.glob("model-*")
                            if p.name[6:].isdigit() and (p / CURRENT).exists()), reverse=True)
    except (OSError, ValueError, AttributeError):
        return None
    if not model_ids:
        return None
    try:
        snap, manifest = _load(model_dir(index_dir, model_ids[0]))
    except CatalogError:
        return None
    ok = manifest.get("catalog_id") == record.get("catalog_id") and manifest.get("format") == FORMAT
    return snap if ok else None


def _try_current(folder: Path, catalog: Any, model: Any, stamp: int, *, any_stamp: bool = False) -> Snapshot | None:
    """The live snapshot if it is intact and was built from this catalog and model (and, unless
    ``any_stamp``, from predictions of this ``stamp``)."""
    try:
        snap, manifest = _load(folder)
    except CatalogError as err:
        log.debug("snapshot not usable: %s", err)
        return None
    wanted = manifest.get("stamp") if any_stamp else stamp
    if not _matches(manifest, catalog.catalog_id, model.sha256, wanted):
        return None
    return _with_checkpoint(snap, model.checkpoint)


def snapshot_info(index_dir: str | os.PathLike[str], model_id: int) -> dict[str, Any]:
    """What ``facefind info`` shows about a model's snapshot: stamp, counts, folder, bytes on disk."""
    folder = model_dir(index_dir, model_id)
    try:
        snap, manifest = _load(folder)
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
