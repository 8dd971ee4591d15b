"""The snapshot's format on disk, and the types a loaded snapshot is made of.

The layout under the index folder (one folder per model, one immutable generation per write):

    <index>/PUBLISHED                       with a server catalog (FACEFIND_DB): the hash of its URL
                                            and its catalog id, so queries can trust the snapshots
                                            without connecting (see current_snapshot_fast)
    <index>/persons.npz                     who each face is (``facefind people``), beside the
                                            generations rather than in them: face_ids int64 (M,)
                                            ascending, person_ids int32 (M,), head (JSON: the
                                            catalog_id and {person id: name}). Replaced atomically
                                            by every people command and grouping after an index
                                            run, so renaming never rewrites a generation; opening
                                            a snapshot maps it onto the rows (Snapshot.persons)
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
        labels.npy      int8 (L, N)       ground truth from the annotated folder (1/0; -1: the entry
        splits.npy      int8 (N,)         has none), and each entry's split (0 train, 1 val, 2 test,
                                          -1 unknown), only when some entry is labelled; the
                                          manifest's ``labels`` ({"attributes", "count", "splits"})
                                          names the L attributes (``label:`` and ``split:`` in queries)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

FORMAT = 2  # 2: the embeddings live only in vectors.faiss (format 1 also had emb.npy)
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
VECTORS = "vectors.faiss"
PERSONS = "persons.npz"  # <index>/persons.npz: persons by face id (facefind.db.snapshot.persons)
PUBLISHED = "PUBLISHED"  # <index>/PUBLISHED: which server catalog the snapshots come from
APPROX = "ann.faiss"
ARRAYS = ("ids.npy", "probs.npy", "paths_offsets.npy")
FACE_FILES = ("image_ids.npy", "face_numbers.npy", "boxes.npy")
TRUTH_FILES = ("labels.npy", "splits.npy")
SPLITS = ("train", "val", "test")  # the codes 0, 1, 2 of CelebA's partition file


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
    # Ground truth (an index built from an annotated folder): the L attribute names, int8 (L, N)
    # labels (1/0, -1 where the entry has none) and int8 (N,) splits (indices into SPLITS, -1
    # unknown). None: no entry is labelled.
    label_attributes: list[str] | None = None
    labels: np.ndarray | None = None
    splits: np.ndarray | None = None
    # Persons (``facefind people``): int32 (N,) the person id of each entry (-1: none), and the
    # names given to persons. None: the faces have not been grouped.
    persons: np.ndarray | None = None
    person_names: dict[int, str] = field(default_factory=dict)

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
            "image_ids": preds.image_ids, "face_numbers": preds.faces, "boxes": preds.boxes,
            "label_names": preds.label_names, "labels": preds.labels, "splits": preds.splits}


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



def model_dir(index_dir: str | os.PathLike[str], model_id: int) -> Path:
    """The folder holding model ``model_id``'s snapshot generations."""
    return Path(index_dir) / f"model-{int(model_id)}"



def truth_arrays(n: int, names: Sequence[str] | None, labels: np.ndarray | None,
                 splits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored form of the ground truth: int8 (L, N) labels and int8 (N,) splits, or None when
    no row is labelled."""
    if names is None or labels is None:
        return None
    stored = np.ascontiguousarray(np.asarray(labels, dtype=np.int8).reshape(len(names), n))
    if not (stored >= 0).any():
        return None
    split_codes = (np.full(n, -1, np.int8) if splits is None
                   else np.asarray(splits, dtype=np.int8).reshape(n))
    return stored, split_codes


def identity_arrays(n: int, identity: np.ndarray | None,
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




def face_arrays(ids: np.ndarray, image_ids: np.ndarray | None, face_numbers: np.ndarray | None,
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


def current_name(folder: Path) -> str | None:
    try:
        return (folder / CURRENT).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None



def manifest_sets(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Snapshot's threshold-set fields from a manifest (older manifests have none: defaults)."""
    sets = manifest.get("threshold_sets")
    if not isinstance(sets, dict) or not sets:
        return {}
    return {"threshold_set": str(manifest.get("threshold_set") or next(iter(sets))),
            "threshold_sets": {str(k): np.asarray(v, dtype=np.float32) for k, v in sets.items()},
            "threshold_stats": dict(manifest.get("threshold_stats") or {})}


def matches(manifest: dict[str, Any], catalog_id: str, sha256: str, stamp: int) -> bool:
    """Whether a snapshot was built from this catalog, this model file and this prediction stamp."""
    return (manifest.get("stamp") == stamp and manifest.get("sha256") == sha256
            and manifest.get("catalog_id") == catalog_id and manifest.get("format") == FORMAT)
