"""The FAISS store: exact (filtered) search equals brute force, atomic saves, approximate factories."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from db import vectors

D = 16


def brute_force(emb: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    keep = np.isin(ids, allowed) if allowed is not None else np.ones(len(ids), bool)
    scores = q @ x[keep].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[keep][order]


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(100_000, size=2000, replace=False)).astype(np.int64)  # sparse, like pruned ids
    return ids, rng.standard_normal((2000, D), dtype=np.float32) * 3


def test_unfiltered_search_equals_brute_force(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, emb = data
    index = vectors.build_index(ids, emb)
    queries = np.random.default_rng(4).standard_normal((7, D), dtype=np.float32)
    scores, found = vectors.search(index, queries, 10)
    want_scores, want_ids = brute_force(emb, ids, queries, 10)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.5, 0.05, 0.002])
def test_filtered_search_equals_brute_force_over_the_allowed_subset(
    data: tuple[np.ndarray, np.ndarray], fraction: float
) -> None:
    ids, emb = data
    index = vectors.build_index(ids, emb)
    rng = np.random.default_rng(5)
    allowed = ids[rng.random(len(ids)) < fraction]
    queries = rng.standard_normal((5, D), dtype=np.float32)
    k = 10
    scores, found = vectors.search(index, queries, k, allowed_ids=allowed)
    want_scores, want_ids = brute_force(emb, ids, queries, k, allowed)
    m = want_ids.shape[1]  # fewer than k when the filter is very selective
    np.testing.assert_array_equal(found[:, :m], want_ids)
    np.testing.assert_allclose(scores[:, :m], want_scores, rtol=1e-5, atol=1e-5)
    assert np.all(found[:, m:] == -1) and np.all(np.isneginf(scores[:, m:]))


def test_empty_filter_and_empty_index_return_padding(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, emb = data
    index = vectors.build_index(ids, emb)
    scores, found = vectors.search(index, emb[:2], 3, allowed_ids=np.array([], dtype=np.int64))
    assert found.tolist() == [[-1] * 3] * 2 and np.all(np.isneginf(scores))
    empty = vectors.build_index(np.zeros(0, np.int64), np.zeros((0, D), np.float32))
    assert vectors.search(empty, emb[:1], 4)[1].tolist() == [[-1] * 4]


def test_save_is_atomic_and_load_maps_the_same_index(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, emb = data
    path = tmp_path / "vectors.faiss"
    path.write_bytes(b"old")
    index = vectors.build_index(ids, emb)
    vectors.save_index(index, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.faiss"]  # no temp file left
    for mmap in (True, False):
        loaded = vectors.load_index(path, mmap=mmap)
        assert loaded.ntotal == len(ids)
        np.testing.assert_array_equal(vectors.index_ids(loaded), ids)
        np.testing.assert_array_equal(vectors.search(loaded, emb[:3], 5)[1], vectors.search(index, emb[:3], 5)[1])


def test_failed_save_keeps_the_old_file(tmp_path: Path, data: tuple[np.ndarray, np.ndarray],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ids, emb = data
    path = tmp_path / "vectors.faiss"
    vectors.save_index(vectors.build_index(ids, emb), path)
    before = path.read_bytes()

    def crash(index: faiss.Index, name: str) -> None:
        Path(name).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError):
        vectors.save_index(vectors.build_index(ids[:10], emb[:10]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.faiss"]


def test_blas_threshold_is_lowered(data: tuple[np.ndarray, np.ndarray]) -> None:
    faiss.cvar.distance_compute_blas_threshold = 128_000
    vectors.build_index(*data)
    assert faiss.cvar.distance_compute_blas_threshold == vectors.BLAS_THRESHOLD


def test_normalize_leaves_zero_rows_alone() -> None:
    x = vectors.normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])
    assert x.dtype == np.float32


def test_bad_arguments_are_refused(data: tuple[np.ndarray, np.ndarray]) -> None:
    ids, emb = data
    with pytest.raises(ValueError):
        vectors.build_index(ids[:5], emb)
    with pytest.raises(ValueError):
        vectors.build_index(ids, emb, "IDMap,Flat")
    with pytest.raises(ValueError):
        vectors.search(vectors.build_index(ids, emb), np.zeros((1, D + 1), np.float32), 3)


def clustered(n: int, centres: int, seed: int) -> np.ndarray:
    """Structured vectors (clusters on the sphere), where approximate search can work."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, D), dtype=np.float32)
    return c[rng.integers(0, centres, n)] + 0.15 * rng.standard_normal((n, D), dtype=np.float32)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_approximate_factories_recall_well_on_structured_vectors(tmp_path: Path, factory: str) -> None:
    emb = clustered(4000, 40, seed=6)
    ids = np.arange(10, 4010, dtype=np.int64)
    queries = clustered(50, 40, seed=6)[:50] + 0.05
    exact = vectors.search(vectors.build_index(ids, emb), queries, 10)[1]
    approx_index = vectors.build_index(ids, emb, factory)
    vectors.save_index(approx_index, tmp_path / "a.faiss")
    approx = vectors.search(vectors.load_index(tmp_path / "a.faiss"), queries, 10)[1]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9
    allowed = ids[::3]
    filtered = vectors.search(approx_index, queries, 10, allowed_ids=allowed)[1]
    assert np.isin(filtered[filtered >= 0], allowed).all()
