"""Sidecar snapshots: round trip, staleness, atomic generation swap, damage repair, readers during writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from facefind.db import snapshot as snapshots
from facefind.db import vectors
from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.errors import CatalogError
from facefind.db.snapshot import PathList, load_snapshot, sync_snapshot, write_snapshot

K, D = 4, 8
NAMES = ["Male", "Smiling", "Eyeglasses", "5_o_Clock_Shadow"]


def rows_for(paths: list[str], seed: int = 0) -> list[IndexedImage]:
    rng = np.random.default_rng(seed)
    return [IndexedImage(p, 10, 1.0, 178, 218, rng.random(K, dtype=np.float32),
                         rng.standard_normal(D, dtype=np.float32)) for p in paths]


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture
def catalog(index_dir: Path) -> Catalog:
    cat = Catalog.open(index_dir)
    yield cat
    cat.close()


@pytest.fixture
def model(catalog: Catalog) -> int:
    model_id = catalog.register_model("f" * 64, "resnet18", NAMES, [0.5, 0.4, 0.3, 0.2], D, None)
    catalog.write_batch(model_id, rows_for([f"/faces/{i:03d}.jpg" for i in range(30)], seed=1))
    return model_id


def test_write_then_load_round_trips_memory_mapped(index_dir: Path, catalog: Catalog, model: int) -> None:
    stamp, preds = catalog.export(model)
    folder = write_snapshot(index_dir, catalog.get_model(model), stamp, preds.ids, preds.paths,
                            preds.probs, preds.emb, catalog_id=catalog.catalog_id)
    assert folder == index_dir / f"model-{model}" / f"gen-{stamp}"
    snap = load_snapshot(index_dir, model)
    assert snap.folder == folder and snap.stamp == stamp and snap.model_id == model
    assert snap.attributes == NAMES
    np.testing.assert_allclose(snap.thresholds, [0.5, 0.4, 0.3, 0.2])
    np.testing.assert_array_equal(snap.ids, preds.ids)
    assert snap.probs.shape == (K, 30) and snap.probs.dtype == np.float32
    np.testing.assert_array_equal(snap.probs, preds.probs.T)
    assert snap.emb.dtype == np.float16
    unit = preds.emb / np.linalg.norm(preds.emb, axis=1, keepdims=True)
    np.testing.assert_allclose(snap.emb.astype(np.float32), unit, atol=2e-3)
    assert isinstance(snap.emb, np.memmap) and isinstance(snap.probs, np.memmap)  # mapped, not read
    assert snap.paths == preds.paths and snap.paths[-1] == "/faces/029.jpg" and len(snap) == 30
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == "f" * 64 and manifest["count"] == 30


def test_rows_are_stored_in_id_order_whatever_the_input_order(index_dir: Path, catalog: Catalog, model: int) -> None:
    stamp, preds = catalog.export(model)
    perm = np.random.default_rng(0).permutation(30)
    write_snapshot(index_dir, catalog.get_model(model), stamp, preds.ids[perm], [preds.paths[i] for i in perm],
                   preds.probs[perm], preds.emb[perm])
    snap = load_snapshot(index_dir, model)
    np.testing.assert_array_equal(snap.ids, preds.ids)
    assert snap.paths == preds.paths
    np.testing.assert_array_equal(snap.probs, preds.probs.T)


def test_path_list_behaves_like_a_list() -> None:
    paths = ["/a/b.jpg", "/ü/ñ space.jpg", "/new\nline.jpg", ""]
    pl = PathList.from_list(paths)
    assert len(pl) == 4 and list(pl) == paths and pl.tolist() == paths and pl == paths
    assert pl[1] == "/ü/ñ space.jpg" and pl[-1] == "" and pl[1:3] == paths[1:3]
    with pytest.raises(IndexError):
        pl[4]
    assert PathList.from_list([]).tolist() == []


def test_sync_rebuilds_when_missing_or_stale_and_reuses_when_current(
    index_dir: Path, catalog: Catalog, model: int
) -> None:
    first = sync_snapshot(catalog, index_dir)  # newest model with predictions
    assert first.model_id == model and len(first) == 30 and first.stamp == catalog.stamp(model)
    again = sync_snapshot(catalog, index_dir, model)
    assert again.folder == first.folder  # current: loaded, not rebuilt
    catalog.write_batch(model, rows_for(["/faces/new.jpg"], seed=2))
    newer = sync_snapshot(catalog, index_dir, model)
    assert newer.folder != first.folder and len(newer) == 31 and newer.stamp == catalog.stamp(model)
    assert "/faces/new.jpg" in newer.paths.tolist()


def test_queries_during_an_index_run_reuse_the_last_snapshot(index_dir: Path, catalog: Catalog, model: int) -> None:
    before = sync_snapshot(catalog, index_dir, model)
    run = catalog.start_run(model, "/faces")  # this process is the (live) indexer
    catalog.write_batch(model, rows_for(["/faces/new.jpg"], seed=2))
    during = sync_snapshot(catalog, index_dir, model)
    assert during.folder == before.folder and len(during) == 30
    assert len(sync_snapshot(catalog, index_dir, model, reuse_while_indexing=False)) == 31
    catalog.write_batch(model, rows_for(["/faces/newer.jpg"], seed=3))
    catalog.finish_run(run, "finished")
    after = sync_snapshot(catalog, index_dir, model)
    assert len(after) == 32 and after.stamp == catalog.stamp(model)


def test_sync_rebuilds_for_a_recreated_catalog_with_the_same_stamp(tmp_path: Path, index_dir: Path,
                                                                   catalog: Catalog, model: int) -> None:
    old = sync_snapshot(catalog, index_dir, model)
    (tmp_path / "other").mkdir()
    other = Catalog(f"sqlite:///{tmp_path / 'other' / 'catalog.db'}")
    mid = other.register_model("f" * 64, "resnet18", NAMES, [0.5] * K, D, None)
    other.write_batch(mid, rows_for(["/elsewhere/x.jpg"]))
    assert other.stamp(mid) == old.stamp and mid == model  # same stamp and id, different catalog
    snap = sync_snapshot(other, index_dir, mid)
    assert snap.paths.tolist() == ["/elsewhere/x.jpg"]
    other.close()


@pytest.mark.parametrize("damage", ["truncate vectors", "delete ids", "garbage manifest", "empty CURRENT"])
def test_damaged_snapshot_is_refused_then_rebuilt(index_dir: Path, catalog: Catalog, model: int, damage: str) -> None:
    snap = sync_snapshot(catalog, index_dir, model)
    gen = snap.folder
    del snap
    if damage == "truncate vectors":
        data = (gen / "vectors.faiss").read_bytes()
        (gen / "vectors.faiss").write_bytes(data[: len(data) // 2])
    elif damage == "delete ids":
        (gen / "ids.npy").unlink()
    elif damage == "garbage manifest":
        (gen / "manifest.json").write_text("{not json")
    else:
        (gen.parent / "CURRENT").write_text("")
    with pytest.raises(CatalogError):
        load_snapshot(index_dir, model)
    fixed = sync_snapshot(catalog, index_dir, model)
    assert len(fixed) == 30 and fixed.folder != gen
    assert load_snapshot(index_dir, model).folder == fixed.folder


def test_generation_swap_keeps_old_readers_working_and_collects_garbage(
    index_dir: Path, catalog: Catalog, model: int
) -> None:
    m = catalog.get_model(model)
    _, preds = catalog.export(model)

    def write(stamp: int) -> Path:
        return write_snapshot(index_dir, m, stamp, preds.ids, preds.paths, preds.probs, preds.emb)

    g1 = write(1)
    reader = load_snapshot(index_dir, model)
    folder = index_dir / f"model-{model}"
    # Leftovers of a writer killed mid-save: a staging folder and a temp CURRENT.
    (folder / ".tmp-gen-9-dead").mkdir()
    (folder / ".tmp-gen-9-dead" / "ids.npy").write_bytes(b"partial")
    (folder / ".tmp-CURRENT-dead").write_text("gen-9")
    assert load_snapshot(index_dir, model).folder == g1  # a crash mid-save leaves the old one live

    g2 = write(2)
    assert (folder / "CURRENT").read_text() == "gen-2"
    assert g1.exists()  # the previous generation is kept for readers that just read CURRENT
    assert not (folder / ".tmp-gen-9-dead").exists() and not (folder / ".tmp-CURRENT-dead").exists()
    g3 = write(3)
    assert sorted(p.name for p in folder.glob("gen-*")) == ["gen-2", "gen-3"] and not g1.exists()
    # The reader of gen-1 still reads its (now unlinked) memory-mapped files.
    np.testing.assert_array_equal(reader.ids, preds.ids)
    assert float(np.asarray(reader.emb, np.float32).sum()) == pytest.approx(
        float(np.asarray(load_snapshot(index_dir, model).emb, np.float32).sum()))
    assert reader.paths[0] == preds.paths[0]
    # Writing a stamp that already has a folder gets a fresh one; the live folder is never rewritten.
    g3b = write(3)
    assert g3b != g3 and g3b.name.startswith("gen-3-")
    assert load_snapshot(index_dir, model).folder == g3b and g3.exists() and g2.exists() is False


def test_load_retries_when_its_generation_vanishes(index_dir: Path, catalog: Catalog, model: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sync_snapshot(catalog, index_dir, model)
    real = snapshots.read._load_generation
    calls = []

    def racing(gen: Path):  # the first attempt finds its generation deleted by a writer
        calls.append(gen)
        if len(calls) == 1:
            monkeypatch.setattr(snapshots.read, "_load_generation", real)
            catalog.write_batch(model, rows_for(["/faces/late.jpg"]))
            sync_snapshot(catalog, index_dir, model)
            monkeypatch.setattr(snapshots.read, "_load_generation", racing)
            raise FileNotFoundError(gen)
        return real(gen)

    monkeypatch.setattr(snapshots.read, "_load_generation", racing)
    snap = load_snapshot(index_dir, model)
    assert len(calls) == 2 and calls[0] != calls[1] and len(snap) == 31


def test_the_vector_file_is_the_only_copy_of_the_embeddings(index_dir: Path, catalog: Catalog, model: int) -> None:
    """Snapshot.emb maps the codes of the FAISS file the engine searches: one store, no emb.npy."""
    snap = sync_snapshot(catalog, index_dir, model)
    assert sorted(p.name for p in snap.folder.iterdir()) == [
        "ids.npy", "manifest.json", "paths.bin", "paths_offsets.npy", "probs.npy", "vectors.faiss"]
    assert isinstance(snap.emb, np.memmap) and Path(snap.emb.filename) == (snap.folder / "vectors.faiss").resolve()
    _, preds = catalog.export(model)
    raw = np.asarray(preds.emb, np.float32)
    np.testing.assert_array_equal(snap.emb, (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float16))
    index = vectors.open_flat(snap.folder / "vectors.faiss")
    q = np.asarray(snap.emb[3:4], np.float32)
    scores, rows = index.search(q, 30)
    want = np.asarray(snap.emb, np.float32) @ q[0]
    np.testing.assert_allclose(scores[0], np.sort(want)[::-1], rtol=1e-5, atol=1e-6)
    assert rows[0, 0] == 3


def test_published_vectors_are_the_catalogs_embeddings_normalised_across_read_chunks(
        index_dir: Path, catalog: Catalog, model: int) -> None:
    """A publish turns embeddings into stored float16 rows chunk by chunk as it reads them
    (export(stored=True)): the same rows as converting all of them at once after reading, which
    are the unit vectors numpy computes to one float16 step (FAISS and numpy round differently)."""
    catalog.write_batch(model, rows_for([f"/more/{i:05d}.jpg" for i in range(9_000)], seed=2))  # > 8,192 per read
    _, preds = catalog.export(model)
    raw = np.asarray(preds.emb, np.float32)
    want = vectors.stored_fp16(raw)
    np.testing.assert_allclose(want.astype(np.float32), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=5e-4)
    _, stored = catalog.export(model, stored=True)
    assert stored.emb.dtype == np.float16
    np.testing.assert_array_equal(stored.emb, want)
    np.testing.assert_array_equal(stored.ids, preds.ids)
    snap = sync_snapshot(catalog, index_dir, model)
    np.testing.assert_array_equal(snap.emb, want)


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "other shape"])
def test_a_deleted_or_damaged_vector_file_is_refused_then_rebuilt(
        index_dir: Path, catalog: Catalog, model: int, damage: str) -> None:
    snap = sync_snapshot(catalog, index_dir, model)
    path = snap.folder / "vectors.faiss"
    want = np.array(snap.emb)
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 2000)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    else:
        vectors.write_flat(path, want[:20])
    del snap
    with pytest.raises(CatalogError, match="check --repair|incomplete|damaged"):
        load_snapshot(index_dir, model)
    fixed = sync_snapshot(catalog, index_dir, model)
    np.testing.assert_array_equal(fixed.emb, want)
    assert vectors.open_flat(fixed.folder / "vectors.faiss").ntotal == 30


def test_snapshot_carries_the_checkpoint_identity(index_dir: Path, catalog: Catalog, tmp_path: Path) -> None:
    """The manifest names the checkpoint and its sha256, so a query can verify the file without
    the catalog; a verified (size, mtime_ns) given by the writer's caller is kept too."""
    from facefind.db.files import file_sha256

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights" * 100)
    mid = catalog.register_model(file_sha256(ckpt), "resnet18", NAMES, [0.5] * K, D, str(ckpt))
    catalog.write_batch(mid, rows_for(["/faces/a.jpg", "/faces/b.jpg"]))
    snap = sync_snapshot(catalog, index_dir, mid)
    assert (snap.checkpoint, snap.sha256) == (str(ckpt), file_sha256(ckpt)) and snap.checkpoint_stat is None
    stamp, preds = catalog.export(mid)
    record = catalog.get_model(mid)
    st = ckpt.stat()
    verified = SimpleNamespace(**{f: getattr(record, f) for f in ("id", "sha256", "arch", "attributes", "thresholds",
                                                                   "embedding_dim", "checkpoint")},
                               checkpoint_stat=[st.st_size, st.st_mtime_ns])
    write_snapshot(index_dir, verified, stamp, preds.ids, preds.paths, preds.probs, preds.emb,
                   catalog_id=catalog.catalog_id)
    assert load_snapshot(index_dir, mid).checkpoint_stat == (st.st_size, st.st_mtime_ns)


def test_read_only_index_falls_back_to_an_in_memory_snapshot(index_dir: Path, catalog: Catalog, model: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise CatalogError("cannot write the index snapshot: read-only file system")

    monkeypatch.setattr(snapshots.write, "write_locked", refuse)
    snap = sync_snapshot(catalog, index_dir, model)
    assert snap.folder is None and len(snap) == 30 and snap.stamp == catalog.stamp(model)
    assert snap.probs.shape == (K, 30) and snap.emb.dtype == np.float16
    np.testing.assert_array_equal(snap.emb, vectors.stored_fp16(catalog.export(model)[1].emb))
    assert vectors.flat_index(snap.emb).ntotal == 30


def test_empty_model_and_no_model(index_dir: Path, catalog: Catalog) -> None:
    with pytest.raises(CatalogError, match="no predictions"):
        sync_snapshot(catalog, index_dir)
    empty = catalog.register_model("e" * 64, "resnet18", NAMES, [0.5] * K, D, None)
    snap = sync_snapshot(catalog, index_dir, empty)
    assert len(snap) == 0 and snap.probs.shape == (K, 0) and snap.emb.shape == (0, D)
    assert load_snapshot(index_dir, empty).paths.tolist() == []
    assert vectors.open_flat(snap.folder / "vectors.faiss").ntotal == 0
    info = snapshots.snapshot_info(index_dir, empty)
    assert info["count"] == 0 and info["stamp"] == 0


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from facefind.db.catalog import Catalog, IndexedImage
    from facefind.db.snapshot import sync_snapshot
    index_dir, model, batches, k, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    cat = Catalog.open(index_dir)
    rng = np.random.default_rng(0)
    for b in range(batches):
        cat.write_batch(model, [IndexedImage(f"/w/{b}-{i}.jpg", 1, 1.0, 1, 1, rng.random(k, dtype=np.float32),
                                             rng.standard_normal(d, dtype=np.float32)) for i in range(10)])
        if b % 3 == 0:
            sync_snapshot(cat, index_dir, model)
    print("done")
""")


def test_readers_never_fail_or_see_half_a_batch_while_a_process_writes(
    tmp_path: Path, index_dir: Path, catalog: Catalog, model: int
) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(index_dir), str(model), "40", str(K), str(D)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    reader = Catalog.open(index_dir, create=False)
    deadline = time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        snap = sync_snapshot(reader, index_dir, model)
        n = len(snap)
        assert snap.probs.shape == (K, n) and snap.emb.shape == (n, D) and len(snap.paths) == n
        assert (n - 30) % 10 == 0  # whole batches only
        assert np.all(np.diff(snap.ids) > 0)
        seen.append((snap.stamp, n))
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert out.strip() == "done"
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)  # stamps never go backwards
    assert len(seen) >= 2
    final = sync_snapshot(reader, index_dir, model)
    assert len(final) == 30 + 40 * 10
    reader.close()


def test_index_checkpoint_hashes_only_when_the_recorded_stat_differs(tmp_path: Path) -> None:
    from facefind.db.errors import ModelError
    from facefind.retrieval.index import index_checkpoint

    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    st = ckpt.stat()
    # A matching stat is trusted without reading the file (a wrong sha256 is not noticed)...
    assert index_checkpoint(str(ckpt), "0" * 64, (st.st_size, st.st_mtime_ns)) == ckpt
    # ...any other stat makes it hash, and a wrong sha256 is refused with one line.
    with pytest.raises(ModelError, match="has changed"):
        index_checkpoint(str(ckpt), "0" * 64, (st.st_size + 1, st.st_mtime_ns))
    with pytest.raises(ModelError, match="has changed"):
        index_checkpoint(str(ckpt), "0" * 64, None)
