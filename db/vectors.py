"""The FAISS vector store: L2-normalised embeddings keyed by catalog image id (cosine = inner product).

The store is derived from the catalog and can always be rebuilt (``db.snapshot.load_vectors``
does so when the file is missing or damaged). Exact search (``"Flat"``) is the default and is
right at CelebA scale (202,599 x 512: ~20 ms per unfiltered query on 2 CPU cores, ~2 ms with a
selective attribute filter). ``factory`` accepts any FAISS factory string for an approximate index
on collections far larger than CelebA, e.g. ``"HNSW32"`` or ``"IVF4096,Flat"``; note that graph
indexes lose recall under selective filters (see DESIGN.md), so filtered queries there are best
answered exactly over the filtered subset.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from db.files import atomic_replace

log = logging.getLogger(__name__)

# FAISS 1.15 only uses BLAS for query batches of at least 128,000 vectors, which makes a batch of a
# few hundred queries ~6x slower than it needs to be; BLAS wins from about 20 queries on.
BLAS_THRESHOLD = 20
# Vectors used to train a factory that needs training (IVF, PQ): enough for a few thousand lists.
MAX_TRAIN = 100_000


def configure_faiss() -> None:
    """Apply facefind's FAISS settings (idempotent; called by every function here)."""
    if faiss.cvar.distance_compute_blas_threshold != BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def normalize(emb: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Row-wise L2-normalised float32 array (zero rows stay zero).

    With ``copy=False`` a C-contiguous float32 input is normalised in place and returned.
    """
    x = np.array(emb, dtype=np.float32, order="C", copy=True if copy else None)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if x.size:
        faiss.normalize_L2(x)  # multithreaded, and 40x faster than np.linalg.norm here
    return x


def build_index(
    ids: np.ndarray, emb: np.ndarray, factory: str = "Flat", *, seed: int = 0, in_place: bool = False
) -> faiss.Index:
    """An ``IndexIDMap2`` over ``factory`` (inner product) holding the normalised ``emb`` with ``ids``.

    Factories that need training are trained on up to ``MAX_TRAIN`` vectors sampled with ``seed``.
    ``in_place`` lets a float32 ``emb`` be normalised where it is, saving a copy (400 MB at CelebA size).
    """
    configure_faiss()
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = normalize(emb, copy=not in_place)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"{ids.shape[0]} ids for {x.shape[0]} embeddings")
    if "IDMap" in factory:
        raise ValueError(f"factory {factory!r}: give the index type only, the id map is added here")
    index = faiss.index_factory(x.shape[1], f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if len(x) == 0:
            raise ValueError(f"factory {factory!r} needs training vectors, got none")
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= MAX_TRAIN else x[rng.choice(len(x), MAX_TRAIN, replace=False)]
        index.train(sample)
    if len(x):
        index.add_with_ids(x, ids)
    _tune(index)
    return index


def _tune(index: faiss.Index) -> None:
    """Search-time defaults that give approximate indexes useful recall."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(inner.hnsw.efSearch, 128)
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = max(inner.nprobe, 32)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids stored in an ``IndexIDMap``/``IndexIDMap2``, in insertion order."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> Path:
    """Write ``index`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync dir.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    atomic_replace(path, lambda tmp: faiss.write_index(index, os.fspath(tmp)))
    return path


def load_index(path: str | os.PathLike[str], *, mmap: bool = True) -> faiss.Index:
    """Read an index written by ``save_index``.

    With ``mmap`` a flat index's vectors are mapped from the file instead of copied (~50 ms instead
    of ~1.3 s at 202,599 x 512); the file must then stay unmodified, which ``save_index`` and
    the snapshot layout guarantee (files are replaced, never rewritten in place).
    """
    configure_faiss()
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        index = faiss.read_index(os.fspath(path), flags)
    except RuntimeError:
        if not mmap:
            raise
        index = faiss.read_index(os.fspath(path))  # index types that cannot be mapped
    _tune(index)
    return index


def id_bitmap(allowed_ids: np.ndarray) -> np.ndarray:
    """A little-endian bitmap with bit ``id`` set for each allowed id (FAISS ``IDSelectorBitmap``)."""
    allowed_ids = np.asarray(allowed_ids, dtype=np.int64)
    if len(allowed_ids) == 0:
        return np.zeros(1, dtype=np.uint8)
    if allowed_ids.min() < 0:
        raise ValueError("ids must be non-negative")
    bits = np.zeros(int(allowed_ids.max()) + 1, dtype=bool)
    bits[allowed_ids] = True
    return np.packbits(bits, bitorder="little")


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest stored vectors to each query by cosine similarity.

    Returns ``(scores float32 (Q, k), ids int64 (Q, k))``, best first; when fewer than ``k``
    vectors qualify the rest is padded with score ``-inf`` and id ``-1``. ``allowed_ids``
    restricts the search to those image ids (a FAISS ``IDSelectorBitmap``, evaluated inside the
    scan; exact for a flat index).
    """
    configure_faiss()
    q = normalize(np.atleast_2d(queries))
    if q.shape[1] != index.d:
        raise ValueError(f"queries have dimension {q.shape[1]}, the index {index.d}")
    k = int(k)
    if k <= 0 or index.ntotal == 0:
        return np.full((q.shape[0], max(k, 0)), -np.inf, np.float32), np.full((q.shape[0], max(k, 0)), -1, np.int64)
    params = None
    if allowed_ids is not None:
        bitmap = id_bitmap(allowed_ids)
        # Keep ``bitmap`` and ``selector`` referenced until the search returns: FAISS holds raw pointers.
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params = _params_for(index, selector)
    scores, ids = index.search(q, k, params=params)
    scores[ids < 0] = -np.inf
    return scores, ids


def _params_for(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters of the right subclass, carrying the selector and the index's own tuning."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
    return faiss.SearchParameters(sel=selector)
