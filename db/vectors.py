"""The snapshot's vector store: the one file the engine searches, and the approximate index above it.

Each snapshot generation holds its embeddings once, in ``vectors.faiss``: a FAISS
``IndexScalarQuantizer`` (``QT_fp16``, inner product) whose codes are the L2-normalised float16
embeddings in snapshot row order, so FAISS labels are row positions (``ids.npy`` maps them to
image ids). The codes are the last ``N * D * 2`` bytes of the file, so the same file serves

  * the engine, which opens it with ``IO_FLAG_MMAP_IFC`` (no copy, no build: ~0.1 ms at 202,599),
  * ``Snapshot.emb``, a numpy memory map of those bytes (``flat_view``; no FAISS import needed).

Exact flat search is the default. Above ``APPROX_MIN`` vectors a generation also carries
``ann.faiss``, an IVF-PQ index (``approx_factory``) over the same rows, built at publish time: it
proposes candidates that the engine re-scores exactly from the flat store (see retrieval/engine.py).
Figures behind the choices are in docs/SCALING.md ("Vector search").
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from facefind.db.files import atomic_replace

log = logging.getLogger(__name__)

# FAISS 1.15 only uses BLAS for query batches of at least 128,000 vectors, which makes a batch of a
# few hundred queries ~6x slower than it needs to be; BLAS wins from about 20 queries on.
BLAS_THRESHOLD = 20
# Collections from this size on also get an approximate index at publish time (docs/SCALING.md:
# an exact fp16 scan of 1M x 512 takes ~100-150 ms on 2 cores, the IVF-PQ path a few ms).
APPROX_MIN = 1_000_000
# Vectors used to train the approximate index (k-means for the lists, PQ codebooks).
MAX_TRAIN = 64 * 1024
APPROX_FLOOR = 1_000  # no approximate index below this, whatever is asked (PQ trains 256 centroids)
# IVF lists a query visits. At 1M (1,024 lists) on the bench's vectors: nprobe 32 / 64 / 128 / 256
# gave recall@10 0.82 / 0.92 / 0.96 / 0.97 at 3.6 / 5.1 / 7.9 / 12.4 ms CPU per query (docs/SCALING.md).
DEFAULT_NPROBE = 128
# Candidates re-scored exactly per query; 1,000 instead of 200 changed recall by < 0.01 at 1M.
RERANK = 200

_HEADER = np.dtype([("fourcc", "S4"), ("d", "<i4"), ("ntotal", "<i8")])  # FAISS's index header
_FOURCC = b"IxSQ"


def configure_faiss() -> Any:
    """Import FAISS with facefind's settings applied (idempotent) and return the module."""
    # Imported on first use, not at the top: loading a snapshot maps vectors.faiss with numpy
    # (flat_view), so `facefind query` by attributes never pays for FAISS and its BLAS.
    import faiss

    if faiss.cvar.distance_compute_blas_threshold != BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss


def normalize(emb: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Row-wise L2-normalised float32 array (zero rows stay zero).

    With ``copy=False`` a C-contiguous float32 input is normalised in place and returned.
    """
    x = np.array(emb, dtype=np.float32, order="C", copy=True if copy else None)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    if x.size:
        configure_faiss().normalize_L2(x)  # multithreaded, and 40x faster than np.linalg.norm here
    return x


def stored_fp16(emb: np.ndarray, chunk: int = 65_536, *, out: np.ndarray | None = None) -> np.ndarray:
    """The float16 rows the store keeps for raw embeddings ``emb`` (float32 or float16): normalised,
    then rounded (in chunks, so a large collection never needs a whole float32 copy), into ``out``
    when given (a float16 array of ``emb``'s shape)."""
    emb = np.asarray(emb)
    if out is None:
        out = np.empty(emb.shape, dtype=np.float16)
    for start in range(0, emb.shape[0], chunk):
        out[start:start + chunk] = normalize(emb[start:start + chunk])
    return out


# ------------------------------------------------------------------------------- the flat store


def flat_index(emb16: np.ndarray) -> Any:
    """An in-memory fp16 inner-product index whose codes are exactly the rows of ``emb16``."""
    faiss = configure_faiss()
    emb16 = np.ascontiguousarray(emb16, dtype=np.float16)
    n, d = emb16.shape
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    codes = emb16.view(np.uint8).reshape(-1)
    index.codes.resize(codes.size)
    if codes.size:
        faiss.memcpy(index.codes.data(), faiss.swig_ptr(codes), codes.size)
    index.ntotal = n
    return index


def write_flat(path: str | os.PathLike[str], emb16: np.ndarray) -> int:
    """Write the flat store of ``emb16`` to ``path`` atomically; return the file's CRC-32."""
    index = flat_index(emb16)
    atomic_replace(path, lambda tmp: configure_faiss().write_index(index, os.fspath(tmp)))
    return file_crc32(path)


def flat_view(path: str | os.PathLike[str], n: int, d: int) -> np.ndarray:
    """The float16 (n, d) rows of a flat store, memory-mapped from the file (no FAISS import).

    ValueError when the file is not a flat store of exactly that shape (a damaged or foreign file).
    """
    path = Path(path)
    nbytes = n * d * 2
    size = path.stat().st_size
    if size < _HEADER.itemsize + nbytes + 8:
        raise ValueError(f"{path.name} has {size:,} bytes, too few for {n:,} x {d} float16 vectors")
    head = np.fromfile(path, dtype=_HEADER, count=1)[0]
    tail = np.fromfile(path, dtype="<u8", count=1, offset=size - nbytes - 8)[0]
    if head["fourcc"] != _FOURCC or int(head["d"]) != d or int(head["ntotal"]) != n or int(tail) != nbytes:
        raise ValueError(f"{path.name} is not a float16 store of {n:,} x {d} vectors "
                         f"(header {head['fourcc']!r}, d={int(head['d'])}, ntotal={int(head['ntotal'])})")
    if n == 0:
        return np.zeros((0, d), dtype=np.float16)
    return np.memmap(path, dtype=np.float16, mode="r", offset=size - nbytes, shape=(n, d))


def open_flat(path: str | os.PathLike[str]) -> Any:
    """The flat store as a FAISS index whose codes stay in the file (memory-mapped, read-only)."""
    faiss = configure_faiss()
    return faiss.read_index(os.fspath(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)


def file_crc32(path: str | os.PathLike[str], chunk: int = 1 << 24) -> int:
    """CRC-32 of a file (~1 GB/s): recorded in the manifest so `check` can prove the bytes intact."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


# ---------------------------------------------------------------------------- the approximate index


def approx_factory(n: int, d: int) -> str:
    """The approximate index for ``n`` vectors of dimension ``d``: IVF with ~sqrt(n) lists (a
    power of two, at least 64, and at most n / 39 so that k-means has enough points per list) and
    8-bit PQ codes of ``d / 8`` bytes. Candidates are re-scored from the flat store, so the codes
    only have to rank the right ones into the top ``RERANK``."""
    nlist = max(1, min(2 ** max(6, round(math.log2(max(n, 1) ** 0.5))), n // 39))
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


def build_approx(emb16: np.ndarray, factory: str | None = None, *, seed: int = 0) -> Any:
    """Train and fill the approximate index over the rows of ``emb16`` (labels = row positions)."""
    faiss = configure_faiss()
    n, d = emb16.shape
    factory = factory or approx_factory(n, d)
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # the factory's default: 70 s for 3,000 vectors, unused here
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, min(n, MAX_TRAIN), replace=False))
    index.train(np.asarray(emb16[pick], dtype=np.float32))
    for start in range(0, n, 65_536):
        index.add(np.asarray(emb16[start:start + 65_536], dtype=np.float32))
    set_nprobe(index, DEFAULT_NPROBE)
    return index


def write_approx(path: str | os.PathLike[str], index: Any) -> int:
    """Write an approximate index atomically; return the file's CRC-32."""
    atomic_replace(path, lambda tmp: configure_faiss().write_index(index, os.fspath(tmp)))
    return file_crc32(path)


def open_approx(path: str | os.PathLike[str]) -> Any:
    """Read an approximate index written by ``write_approx``."""
    index = configure_faiss().read_index(os.fspath(path))
    set_nprobe(index, DEFAULT_NPROBE)
    return index


def set_nprobe(index: Any, nprobe: int) -> None:
    """Set the IVF lists visited per query (more: slower, higher recall)."""
    configure_faiss().extract_index_ivf(index).nprobe = int(nprobe)


def approx_candidates(index: Any, q: np.ndarray, k: int, *, nprobe: int | None = None,
                      allowed: np.ndarray | None = None) -> np.ndarray:
    """Row positions of up to ``k`` approximate neighbours of the float32 unit vector ``q``.

    ``allowed`` (a bool mask over rows) is applied inside the IVF scan with ``IDSelectorBitmap``,
    so every candidate passes the filter.
    """
    faiss = configure_faiss()
    ivf = faiss.extract_index_ivf(index)
    bitmap = None
    params = faiss.SearchParametersIVF(nprobe=int(nprobe or ivf.nprobe))
    if allowed is not None:
        bitmap = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
        params.sel = selector  # ``bitmap`` and ``selector`` stay referenced until the search returns
    _, lab = index.search(np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1), int(k), params=params)
    lab = lab[0]
    return lab[lab >= 0]
