"""The vector store: the flat fp16 file the engine searches, and the approximate path above the cut-over."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from facefind.db import vectors
from facefind.db.snapshot import Snapshot, load_snapshot, write_snapshot
from facefind.retrieval import engine as engine_module
from facefind.retrieval.bench.query import synthetic_snapshot
from facefind.retrieval.engine import Engine

D = 16


def unit16(n: int, d: int = D, seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32) * 3
    return vectors.stored_fp16(x)


def brute_top(emb16: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    """Row positions of the k best inner products, computed in float64 over the stored rows."""
    scores = np.asarray(emb16, np.float64) @ np.asarray(q, np.float64)
    rows = np.arange(len(scores)) if allowed is None else np.flatnonzero(allowed)
    return rows[np.argsort(-scores[rows], kind="stable")[:k]].tolist()


def test_the_flat_file_is_searched_memory_mapped_and_maps_back_as_the_rows(tmp_path: Path) -> None:
    emb16 = unit16(2000)
    path = tmp_path / "vectors.faiss"
    crc = vectors.write_flat(path, emb16)
    assert crc == vectors.file_crc32(path)
    view = vectors.flat_view(path, 2000, D)
    assert isinstance(view, np.memmap) and view.dtype == np.float16
    np.testing.assert_array_equal(view, emb16)
    index = vectors.open_flat(path)
    assert index.ntotal == 2000 and index.d == D
    q = np.asarray(emb16[7], np.float32) + 0.1
    q /= np.linalg.norm(q)
    _, rows = index.search(q[None, :], 10)
    assert rows[0].tolist() == brute_top(emb16, q, 10)


def test_flat_view_refuses_a_file_of_another_shape_or_kind(tmp_path: Path) -> None:
    path = tmp_path / "vectors.faiss"
    vectors.write_flat(path, unit16(100))
    for n, d in ((99, D), (100, D + 1), (200, D)):
        with pytest.raises(ValueError):
            vectors.flat_view(path, n, d)
    path.write_bytes(b"\0garbage" * 1000)
    with pytest.raises(ValueError):
        vectors.flat_view(path, 100, D)


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vectors.faiss"
    vectors.write_flat(path, unit16(50))
    before = path.read_bytes()

    def crash(index: faiss.Index, name: str) -> None:
        Path(name).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError):
        vectors.write_flat(path, unit16(10))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.faiss"]


def test_normalize_leaves_zero_rows_alone_and_the_blas_threshold_is_lowered() -> None:
    faiss.cvar.distance_compute_blas_threshold = 128_000
    x = vectors.normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])
    assert x.dtype == np.float32
    assert faiss.cvar.distance_compute_blas_threshold == vectors.BLAS_THRESHOLD


def test_approx_factory_scales_lists_with_the_collection() -> None:
    assert vectors.approx_factory(1_000_000, 512) == "IVF1024,PQ64"
    assert vectors.approx_factory(20_000, 32) == "IVF128,PQ4"
    assert vectors.approx_factory(1_000, 512) == "IVF25,PQ64"  # k-means needs ~39 points per list


# -- through the engine, on a published snapshot -------------------------------------------------


def publish(folder: Path, snap: Snapshot, approx_min: int | None) -> Snapshot:
    model = SimpleNamespace(id=1, sha256="0" * 64, arch="synthetic", attributes=snap.attributes,
                            thresholds=snap.thresholds, embedding_dim=snap.emb.shape[1], checkpoint=None)
    write_snapshot(folder, model, 0, snap.ids, snap.paths, np.asarray(snap.probs).T, snap.emb,
                   catalog_id="test", approx_min=approx_min)
    return load_snapshot(folder, 1)


@pytest.fixture(scope="module")
def structured() -> Snapshot:
    """20,000 clustered vectors (identities of ~20 images, as the bench's), 32-D."""
    return synthetic_snapshot(n=20_000, d=32, seed=4)[0]


@pytest.fixture(scope="module")
def published(structured: Snapshot, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return publish(tmp_path_factory.mktemp("approx"), structured, approx_min=10_000)


def queries(snap: Snapshot, m: int, seed: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = np.asarray(snap.emb[rng.choice(len(snap), m, replace=False)], np.float32)
    q += rng.standard_normal(q.shape).astype(np.float32) * 0.05
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_below_the_cut_over_a_published_snapshot_answers_exactly_as_before(
        structured: Snapshot, tmp_path: Path) -> None:
    """No approximate index below the cut-over: the memory-mapped store gives the in-memory
    engine's hits, which are the float64 brute force's over the filter."""
    sub = synthetic_snapshot(n=3000, d=32, seed=5)[0]
    snap = publish(tmp_path, sub, approx_min=None)
    assert snap.approximate is None and not (snap.folder / "ann.faiss").exists()
    on_disk, in_memory = Engine(snap), Engine(sub)
    for expr in (None, "Male", "Eyeglasses and not Male"):
        mask = on_disk.mask(on_disk.parse(expr)) if expr else None
        for q in queries(snap, 5):
            got = on_disk.query(expr, like=q, limit=10)
            assert got.search == "exact" and got.to_dict()["search"] == "exact"
            assert [h.id for h in got.hits] == [h.id for h in in_memory.query(expr, like=q, limit=10).hits]
            assert [h.id for h in got.hits] == snap.ids[brute_top(snap.emb, q, 10, mask)].tolist()


def test_above_the_cut_over_unfiltered_queries_are_approximate_with_high_recall(published: Snapshot) -> None:
    assert published.approximate == "IVF128,PQ4" and (published.folder / "ann.faiss").is_file()
    engine = Engine(published)
    recall = []
    for q in queries(published, 40):
        got = engine.query(None, like=q, limit=10, nprobe=16)  # 1/8 of the lists, as the default at 1M
        want = engine.query(None, like=q, limit=10, exact=True)
        assert got.search == "approximate" and want.search == "exact"
        assert [h.id for h in want.hits] == published.ids[brute_top(published.emb, q, 10)].tolist()
        recall.append(len({h.id for h in got.hits} & {h.id for h in want.hits}) / 10)
        scores = [h.score for h in got.hits]
        assert scores == sorted(scores, reverse=True)
    assert np.mean(recall) >= 0.9, np.mean(recall)  # 4-byte codes at 32-D; 512-D figures: docs/SCALING.md


def test_nprobe_trades_recall(published: Snapshot) -> None:
    engine = Engine(published)

    def recall(nprobe: int) -> float:
        out = []
        for q in queries(published, 30, seed=11):
            got = {h.id for h in engine.query(None, like=q, limit=10, nprobe=nprobe).hits}
            out.append(len(got & set(published.ids[brute_top(published.emb, q, 10)].tolist())) / 10)
        return float(np.mean(out))

    assert recall(128) >= 0.95  # every list visited: only the 4-byte PQ shortlist can miss
    assert recall(1) < recall(128)
    with pytest.raises(Exception, match="nprobe"):
        engine.query(None, like=queries(published, 1)[0], nprobe=0)


def test_filters_choose_by_size_and_every_hit_passes(published: Snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide filter goes through the approximate index with a selector (only matching ids come
    back, recall stays high); a selective one is scanned exactly."""
    monkeypatch.setattr(engine_module, "EXACT_SUBSET", 1000)
    engine = Engine(published)
    wide, narrow = "not Male", "Eyeglasses and Bald"
    wide_mask = engine.mask(engine.parse(wide))
    narrow_mask = engine.mask(engine.parse(narrow))
    assert wide_mask.sum() > 1000 >= narrow_mask.sum() > 10
    recall = []
    for q in queries(published, 30, seed=12):
        got = engine.query(wide, like=q, limit=10, nprobe=16)
        assert got.search == "approximate"
        pos, found = engine.positions(np.array([h.id for h in got.hits]))
        assert found.all() and wide_mask[pos].all()
        want = published.ids[brute_top(published.emb, q, 10, wide_mask)].tolist()
        recall.append(len({h.id for h in got.hits} & set(want)) / 10)
        sel = engine.query(narrow, like=q, limit=10)
        assert sel.search == "exact"
        assert [h.id for h in sel.hits] == published.ids[brute_top(published.emb, q, 10, narrow_mask)].tolist()
    assert np.mean(recall) >= 0.9, np.mean(recall)


def test_an_unreadable_approximate_index_falls_back_to_exact(structured: Snapshot, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    snap = publish(tmp_path, structured, approx_min=10_000)
    (snap.folder / "ann.faiss").write_bytes(b"\0garbage" * 100)
    q = queries(snap, 1)[0]
    got = Engine(snap).query(None, like=q, limit=5)
    assert got.search == "exact" and "check --repair" in caplog.text
    assert [h.id for h in got.hits] == snap.ids[brute_top(snap.emb, q, 5)].tolist()
