"""The indexer end to end: counts, idempotence, changes, bad files, models, labels, crashes.

A freshly initialised mobilenet_v3_small at 64 px stands in for a trained model (indexing does not
care what the weights learned) and ``facefind.trainer.synth`` supplies a CelebA-format folder. Tests taking
``catalog_backend`` run on SQLite and on a real PostgreSQL server (tests/pg.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facefind.retrieval.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from helpers import build_corpus, tiny_checkpoint  # noqa: E402

N_FACES = 160
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic CelebA root (original layout) with N_FACES images."""
    from facefind.trainer.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "celeba"
    synthesize(root, n=N_FACES, seed=7)
    return root


@pytest.fixture(scope="module")
def attributes(dataset: Path) -> list[str]:
    from facefind.trainer.celeba import read_attributes

    return read_attributes(dataset / "list_attr_celeba.txt").attributes


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, attributes: list[str]) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "model.pt", attributes)


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory: pytest.TempPathFactory, attributes: list[str], dataset: Path) -> Path:
    """Like ``model``, with BatchNorm statistics from real images: its outputs differ between
    images (``model``'s are the same for every image), so a row stored against the wrong image shows."""
    images = sorted((dataset / "img_align_celeba").glob("*.jpg"))[:32]
    return tiny_checkpoint(tmp_path_factory.mktemp("calibrated") / "model.pt", attributes, calibrate=images)


@pytest.fixture
def faces(dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic image folder (annotations included) that a test may change."""
    root = tmp_path / "celeba"
    shutil.copytree(dataset, root)
    return root / "img_align_celeba"


def invoke(*args: str | Path) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def index(folder: Path, index_dir: Path, *extra: str | Path) -> dict:
    return invoke("index", folder, "--index", index_dir, "--workers", "0", "--device", "cpu", "--json", *extra)


def info(index_dir: Path) -> dict:
    return invoke("info", "--index", index_dir, "--json")


def test_index_is_incremental_and_info_agrees(catalog_backend, faces: Path, model: Path, tmp_path: Path) -> None:
    idx = tmp_path / "index"
    first = index(faces, idx, "--model", model, "--batch-size", "64")
    assert (first["indexed"], first["unchanged"], first["failed"]) == (N_FACES, 0, 0)
    assert first["labelled"] == N_FACES  # list_attr_celeba.txt sits above the image folder
    assert first["images_per_second"] > 0 and set(first["timings"]) >= {"read_decode", "infer", "write"}
    summary = info(idx)
    assert (summary["images"], summary["predictions"], summary["vectors"], summary["labels"]) == (N_FACES,) * 4
    assert summary["failures"] == 0 and len(summary["models"]) == 1
    assert summary["models"][0]["thresholds"] == [0.5] * 40

    again = index(faces, idx)  # no --model: the model the index was built with
    assert (again["indexed"], again["unchanged"]) == (0, N_FACES)

    # A modified file (new bytes, new mtime) and an added one are indexed; nothing else is.
    changed = faces / "000003.jpg"
    changed.write_bytes((faces / "000004.jpg").read_bytes())
    os.utime(changed, (time.time() + 5, time.time() + 5))
    shutil.copy(faces / "000001.jpg", faces / "extra face.jpg")
    third = index(faces, idx)
    assert (third["indexed"], third["unchanged"]) == (2, N_FACES - 1)
    assert third["labelled"] == 1  # the changed one is annotated, the new one is not

    # A vanished file stays until --prune.
    (faces / "000010.jpg").unlink()
    assert index(faces, idx)["unchanged"] == N_FACES
    pruned = index(faces, idx, "--prune")
    assert pruned["pruned"] == 1
    summary = info(idx)
    assert (summary["images"], summary["predictions"], summary["vectors"]) == (N_FACES,) * 3
    assert summary["last_run"]["status"] == "finished"


def test_worker_processes_give_the_same_predictions(faces: Path, calibrated_model: Path, tmp_path: Path) -> None:
    """Decoding in worker processes stores the same row for each path as decoding inline (a model
    whose outputs differ between images, so a row stored against the wrong path would show)."""
    from facefind.db.catalog import Catalog

    model = calibrated_model

    index(faces, tmp_path / "a", "--model", model, "--batch-size", "50")
    out = invoke("index", faces, "--index", tmp_path / "b", "--model", model, "--device", "cpu",
                 "--workers", "2", "--batch-size", "50", "--json")
    assert out["indexed"] == N_FACES
    with Catalog.open(tmp_path / "a") as a, Catalog.open(tmp_path / "b") as b:
        pa, pb = a.export(1)[1], b.export(1)[1]
    assert pa.paths == pb.paths
    np.testing.assert_allclose(pa.probs, pb.probs, atol=1e-5)
    # The model's unit embeddings, stored as float16: unit length to float16's precision.
    np.testing.assert_allclose(np.linalg.norm(pa.emb, axis=1), 1.0, atol=1e-3)


def test_bad_files_are_indexed_or_listed(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import facefind.indexer.pipeline

    folder = tmp_path / "corpus"
    expect = build_corpus(folder)
    (folder / "vanishing.jpg").write_bytes((folder / "with space.jpg").read_bytes())
    expect["vanishing.jpg"] = "file vanished"
    real_discover = facefind.indexer.pipeline.discover

    def discover_then_delete(*args: object, **kwargs: object) -> object:
        found = real_discover(*args, **kwargs)
        (folder / "vanishing.jpg").unlink()  # gone between discovery and reading
        return found

    monkeypatch.setattr(facefind.indexer.pipeline, "discover", discover_then_delete)
    out = index(folder, tmp_path / "index", "--model", model, "--batch-size", "8")
    reasons = {Path(f["path"]).name: f["reason"] for f in out["failures"]}
    assert out["failed"] == len(out["failures"]) == len(reasons)
    assert out["indexed"] + out["failed"] == len(expect)
    assert reasons == {name: r for name, r in expect.items() if r is not None}
    summary = info(tmp_path / "index")
    assert summary["images"] == summary["predictions"] == out["indexed"]
    assert summary["failures"] == out["failed"]
    monkeypatch.undo()

    # Fixing a broken file clears its failure on the next run.
    (folder / "empty.jpg").write_bytes((folder / "with space.jpg").read_bytes())
    again = index(folder, tmp_path / "index")
    assert again["indexed"] == 1 and "empty.jpg" not in {Path(f["path"]).name for f in again["failures"]}
    assert info(tmp_path / "index")["failures"] == out["failed"] - 1  # empty.jpg's failure is cleared
    index(folder, tmp_path / "index", "--prune")
    assert info(tmp_path / "index")["failures"] == out["failed"] - 2  # and vanishing.jpg's is pruned


def test_user_errors_are_one_line(model: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    (tmp_path / "nested" / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(b"x")
    cases = [
        (["index", tmp_path / "missing", "--model", model], "no such folder"),
        (["index", tmp_path / "empty", "--model", model], "no images"),
        (["index", tmp_path / "nested", "--model", model], "--recursive"),
        (["index", tmp_path / "pics"], "pass --model"),
        (["index", tmp_path / "pics", "--model", tmp_path / "nope.pt"], "no checkpoint"),
        (["info"], "no index"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, [str(a) for a in [*args, "--index", tmp_path / "idx"]])
        assert result.exit_code == 1, (args, result.stdout)
        lines = result.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and message in lines[-1], (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_detect_faces_keeps_aligned_crops_and_refuses_faceless_photos(
    dataset: Path, model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(dataset / "img_align_celeba" / "000001.jpg", folder / "aligned.jpg")
    Image.new("RGB", (400, 300), (90, 120, 150)).save(folder / "landscape.jpg")
    out = index(folder, tmp_path / "index", "--model", model, "--detect-faces")
    assert out["indexed"] == 1
    assert [(Path(f["path"]).name, f["reason"]) for f in out["failures"]] == [("landscape.jpg", "no face found")]


def test_new_model_adds_predictions_and_rebuild(
    catalog_backend, faces: Path, model: Path, attributes: list[str], tmp_path: Path
) -> None:
    idx = tmp_path / "index"
    index(faces, idx, "--model", model)
    other = tiny_checkpoint(tmp_path / "other.pt", attributes, seed=1)
    second = index(faces, idx, "--model", other)
    assert second["indexed"] == N_FACES and second["model_id"] == 2
    summary = info(idx)
    assert [m["predictions"] for m in summary["models"]] == [N_FACES, N_FACES]
    assert summary["model_id"] == 2 and summary["images"] == N_FACES
    assert index(faces, idx)["model_id"] == 2  # default: the newest model
    rebuilt = index(faces, idx, "--model", model, "--rebuild")
    assert (rebuilt["indexed"], rebuilt["unchanged"], rebuilt["model_id"]) == (N_FACES, 0, 1)


def test_faiss_file_rebuilt_after_deletion(faces: Path, model: Path, tmp_path: Path) -> None:
    import faiss

    from facefind.db.catalog import Catalog
    from facefind.db.snapshot import load_snapshot
    from facefind.db.vectors import stored_fp16

    idx = tmp_path / "index"
    index(faces, idx, "--model", model)
    snap = load_snapshot(idx, 1)
    vectors = snap.folder / "vectors.faiss"
    vectors.unlink()
    assert info(idx)["vectors"] == 0  # info reports the loss
    assert index(faces, idx)["indexed"] == 0
    snap = load_snapshot(idx, 1)
    rebuilt = faiss.read_index(str(snap.folder / "vectors.faiss"))
    assert rebuilt.ntotal == N_FACES
    with Catalog.open(idx, create=False) as catalog:
        np.testing.assert_array_equal(snap.emb, stored_fp16(catalog.export(1)[1].emb))
    assert info(idx)["vectors"] == N_FACES


def test_write_failure_is_one_line_and_keeps_committed_work(
    catalog_backend, faces: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from facefind.db.catalog import Catalog
    from facefind.db.errors import CatalogError
    from facefind.db.snapshot import sync_snapshot

    idx = tmp_path / "index"
    calls = {"n": 0}
    real = Catalog.write_batch

    def fail_on_third(self: Catalog, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise CatalogError("cannot write to the catalog: disk full (simulated)")
        real(self, *args, **kwargs)

    monkeypatch.setattr(Catalog, "write_batch", fail_on_third)
    result = CliRunner().invoke(app, ["index", str(faces), "--index", str(idx), "--model", str(model),
                                      "--workers", "0", "--device", "cpu", "--batch-size", "32"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "error: cannot write to the catalog: disk full (simulated)"
    monkeypatch.setattr(Catalog, "write_batch", real)  # not undo(): that would unset FACEFIND_DB too
    with Catalog.open(idx) as catalog:
        assert catalog.info()["predictions"] == 64  # the two committed batches are kept
        assert catalog.runs()[0].status == "failed"
        assert len(sync_snapshot(catalog, idx, 1)) == 64
    resumed = index(faces, idx)
    assert (resumed["indexed"], resumed["unchanged"]) == (N_FACES - 64, 64)


def test_writer_commits_in_order_and_surfaces_errors() -> None:
    from facefind.db.errors import CatalogError
    from facefind.indexer.discovery import Failure, FileEntry
    from facefind.indexer.routing import Rows
    from facefind.indexer.writer import CatalogWriter, WriteJob

    class FakeCatalog:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []
            self.failures: list[tuple[str, str]] = []

        def write_batch(self, model_id: int, rows: list, label_names: object = None) -> None:
            time.sleep(0.01)  # slower than the producer: the queue must keep the order
            if rows[0].path == "/bad":
                raise CatalogError("disk full")
            self.batches.append([r.path for r in rows])

        def record_failures(self, items: object) -> None:
            self.failures.extend(items)  # type: ignore[arg-type]

    def job(*paths: str, failed: tuple[str, ...] = ()) -> WriteJob:
        rows = Rows([FileEntry(p, 1, 1.0) for p in paths], [(1, 1)] * len(paths), [(0, None)] * len(paths))
        return WriteJob(rows, np.zeros((len(paths), 2)), np.zeros((len(paths), 3)),
                        [Failure(f, "empty file") for f in failed])

    fake = FakeCatalog()
    writer = CatalogWriter(fake, 1)  # type: ignore[arg-type]
    for i in range(6):
        writer.put(job(f"/{i}a", f"/{i}b", failed=(f"/{i}x",)))
    writer.close()
    assert fake.batches == [[f"/{i}a", f"/{i}b"] for i in range(6)]
    assert [p for p, _ in fake.failures] == [f"/{i}x" for i in range(6)]
    assert (writer.written, writer.failed) == (12, 6)

    writer = CatalogWriter(fake, 1)  # type: ignore[arg-type]
    writer.put(job("/bad"))
    with pytest.raises(CatalogError, match="disk full"):
        for _ in range(5):
            writer.put(job("/later"))
        writer.close()
    assert ["/later"] not in fake.batches  # nothing is committed after a failed batch


def test_threaded_prefetch_keeps_order_raises_and_stops() -> None:
    """The producer thread that feeds the GPU path (testable without a GPU)."""
    import threading

    from facefind.indexer.pipeline import _threaded

    assert list(_threaded(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> object:
        yield 1
        raise ValueError("bad batch")

    gen = _threaded(failing(), depth=2)
    assert next(gen) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(gen)

    produced = []
    producers = set()

    def endless() -> object:
        for i in range(10_000):
            producers.add(threading.get_ident())
            produced.append(i)
            yield i

    before = threading.active_count()
    gen = _threaded(endless(), depth=2)
    assert next(gen) == 0
    # it really prefetches, on another thread: depth items queued + one waiting to be put
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 3
    assert producers and threading.get_ident() not in producers
    gen.close()  # the consumer stops early (Ctrl-C): the thread must end, not fill memory
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before
    assert len(produced) < 10


def test_runner_outputs_probabilities_and_unit_embeddings(model: Path) -> None:
    import torch

    from facefind.indexer.runner import load_runner

    runner = load_runner(model, torch.device("cpu"))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3, 80, 70), dtype=np.uint8)  # resized by preprocess
    probs, emb = runner(pixels)
    assert probs.shape == (5, 40) and emb.shape == (5, 32)
    assert probs.dtype == emb.dtype == np.float32
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    probs_t, _ = runner(torch.from_numpy(pixels[:2]))
    np.testing.assert_allclose(probs_t, probs[:2], atol=1e-5)  # batch composition does not matter
    empty = runner(np.zeros((0, 3, 64, 64), np.uint8))
    assert empty[0].shape == (0, 40) and empty[1].shape == (0, 32)


def test_index_benchmark_runs_both_pipelines_on_the_same_files(tmp_path: Path) -> None:
    from facefind.retrieval.bench.index import run_index_bench

    result = run_index_bench(n=24, out=tmp_path / "bench", device="cpu", batch_size=8,
                             arch="mobilenet_v3_small", img_size=64, workers=0, repeats=2)
    assert result["indexed"] == 24 and len(result["runs"]) == 2
    assert 8_000 < result["mean_jpeg_bytes"] < 16_000  # CelebA-like files, ~12 KB
    same, study = result["baselines"]["same_settings"], result["baselines"]["study_style"]
    # Same settings means facefind's batch, precision, layout and workers: only the pipeline differs.
    for key in ("batch_size", "precision", "memory_format", "workers"):
        assert same[key] == result[key], key
    assert (study["batch_size"], study["precision"], study["memory_format"]) == (64, "fp32", "contiguous")
    assert result["images_per_second"] > 0 and same["images_per_second"] > 0 and study["images_per_second"] > 0
    assert result["speedup"] == same["speedup"]
    # Speedups recomputed from the raw rounds (images/s per run): the median run times' ratio. (The
    # report derives them from its own rates; comparing against those would check nothing.)
    def median_seconds(runs: list[float]) -> float:
        return float(np.median([24 / r for r in runs]))

    for row in (same, study):
        assert row["speedup"] == pytest.approx(median_seconds(row["runs"]) / median_seconds(result["runs"]), rel=0.02)
    assert result["seconds"] == pytest.approx(median_seconds(result["runs"]), rel=0.02, abs=1e-3)
    assert len(same["runs"]) == len(study["runs"]) == 2
    assert set(result["stage_images_per_second"]) == {"decode", "infer", "write"}
    for name in ("same_settings", "study_style"):  # each baseline really wrote every image
        with sqlite3.connect(tmp_path / "bench" / f"naive-{name}.db") as conn:
            assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (24,)


_QUERY_PROBE = """
import json, sys
from facefind.retrieval.cli import app
try:
    app(sys.argv[1:])
except SystemExit as err:
    code = err.code
heavy = [m for m in ("torch", "sqlalchemy", "psycopg") if m in sys.modules]
print("PROBE " + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _probe_query(idx: Path, env: dict[str, str]) -> tuple[dict, dict]:
    proc = subprocess.run([sys.executable, "-c", _QUERY_PROBE, "query", "Male or not Male", "--index", str(idx),
                           "--json", "--limit", "0"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    probe = json.loads(proc.stderr.strip().splitlines()[-1].removeprefix("PROBE "))
    assert probe["code"] in (0, None), proc.stderr
    return json.loads(proc.stdout), probe


def test_queries_on_a_postgres_catalog_read_the_published_snapshot(
    pg_server, pg_url: str, faces: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With FACEFIND_DB on a server, `facefind query` serves the snapshot the last run published
    without SQLAlchemy or psycopg (database-independent cold start); it takes the full route when
    the folder's snapshots were published from another URL, and never serves another catalog's."""
    from facefind.db.catalog import Catalog, IndexedImage

    monkeypatch.setenv("FACEFIND_DB", pg_url)
    idx = tmp_path / "index"
    index(faces, idx, "--model", model)
    out, probe = _probe_query(idx, dict(os.environ))
    assert probe["heavy"] == [] and out["n_indexed"] == N_FACES

    with Catalog(pg_url) as catalog:  # a write no run published (as after a kill -9)
        catalog.write_batch(1, [IndexedImage(str(tmp_path / "new.jpg"), 1, 1.0, 178, 218, np.full(40, 0.5, np.float32),
                                             np.ones(32, np.float32))])
    out, probe = _probe_query(idx, dict(os.environ))
    assert probe["heavy"] == [] and out["n_indexed"] == N_FACES  # the published generation
    assert invoke("check", "--index", idx, "--json", "--skip-files", "--repair")["healthy"]
    out, _ = _probe_query(idx, dict(os.environ))
    assert out["n_indexed"] == N_FACES + 1  # --repair published the catalog's state

    # Another catalog publishes into the same folder: each URL gets its own catalog's rows, never
    # the other's (the shortcut declines a folder published from another URL; the full route rebuilds).
    from facefind.db.snapshot import sync_snapshot

    other_url = pg_server.create_database()
    with Catalog(other_url) as other:
        mid = other.register_model("f" * 64, "fake", ["Male"], [0.5], 4, None)
        other.write_batch(mid, [IndexedImage("/elsewhere/a.jpg", 1, 1.0, 9, 9, np.ones(1, np.float32),
                                             np.ones(4, np.float32))])
        sync_snapshot(other, idx, mid)
    out, probe = _probe_query(idx, {**os.environ, "FACEFIND_DB": other_url})
    assert probe["heavy"] == [] and out["n_indexed"] == 1
    out, probe = _probe_query(idx, dict(os.environ))
    assert "sqlalchemy" in probe["heavy"] and out["n_indexed"] == N_FACES + 1
    out, probe = _probe_query(idx, dict(os.environ))
    assert probe["heavy"] == [] and out["n_indexed"] == N_FACES + 1


def test_an_index_run_reads_the_checkpoint_once(faces: Path, model: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """One read of the checkpoint per run: hashed and loaded from the same bytes (it was read three
    times: torch.load for the meta, sha256, torch.load again for the weights)."""
    import builtins

    from facefind.indexer.pipeline import index_folder

    real_open = builtins.open
    target = os.path.realpath(model)
    reads: list[str] = []

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    report = index_folder(faces, model, tmp_path / "index", workers=0, device="cpu")
    assert report.indexed == N_FACES
    assert len(reads) == 1, reads
