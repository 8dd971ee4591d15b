"""Fault injection (issue 7): kill -9 at random points and inside the snapshot save, readers while
an index run writes, broken and mismatched checkpoints, hostile expressions through the CLI, a full
disk. After every fault the index must hold every readable image exactly once, with sidecar files
and FAISS in step with the catalog (after ``facefind check --repair`` or the next run), and every
error must be one ``error:`` line.

Kill points are drawn from ``FACEFIND_FAULT_SEED`` (fixed in CI; the nightly run sets a new one).
The corrupt-input corpus lives in test_reader.py; kill -9 of photos with several faces in
test_photo_faces.py, of sharded runs in test_distributed.py.
Subprocesses run with OMP_NUM_THREADS=1: on a busy 2-core machine two OpenMP threads made the
forward pass ~100x slower.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from facefind.retrieval.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from helpers import (assert_rows_match_clean_run, clean_predictions, reap, stop_when, tiny_checkpoint,  # noqa: E402
                     tiny_faces)

ROOT = Path(__file__).resolve().parents[1]
ATTRS = ["Male", "Smiling", "Eyeglasses", "Young"]
SEED = int(os.environ.get("FACEFIND_FAULT_SEED", "20261128"))
N_SEED = 200  # images in the shared index
CPU_WHOLE = ("--device", "cpu", "--no-detect-face")  # tiny test images: embed the whole image

# Runs ``facefind`` (mode "cli") or one snapshot sync (mode "sync"), after installing the fault
# named by $FACEFIND_TEST_DIE_IN: SIGKILL this process while it writes that snapshot file, before
# the snapshot's garbage collection ("gc"), or limit file sizes ("fsize:BYTES", a full disk).
HOOKS = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path

    def die_half_written(path):
        with open(path, "wb") as f:
            f.write(b"half-written")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def install(stage):
        import facefind.db.snapshot as snapshot
        import facefind.db.vectors as vectors
        if stage.startswith("fsize:"):
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG, like ENOSPC
            limit = int(stage.split(":")[1])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        elif stage == "gc":
            snapshot.write._collect_garbage = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        elif stage in ("vectors.faiss", "CURRENT"):
            import facefind.db.files as files
            module = vectors if stage == "vectors.faiss" else files  # CURRENT: files.atomic_write_text
            real = module.atomic_replace
            def dying(path, fill):
                if Path(path).name == stage:
                    die_half_written(Path(path).with_name(f".{stage}.killed.tmp"))
                return real(path, fill)
            module.atomic_replace = dying
        else:
            real = snapshot.write._write_file
            def dying(path, write):
                if Path(path).name == stage:
                    die_half_written(path)
                return real(path, write)
            snapshot.write._write_file = dying

    if __name__ == "__main__":
        if os.environ.get("FACEFIND_TEST_DIE_IN"):
            install(os.environ["FACEFIND_TEST_DIE_IN"])
        if sys.argv[1] == "cli":
            from facefind.retrieval.cli import app
            sys.argv = ["facefind", *sys.argv[2:]]  # as the facefind command sees it (resume hints quote it)
            app(sys.argv[1:], prog_name="facefind")
        else:
            from facefind.db.catalog import Catalog
            from facefind.db.snapshot import sync_snapshot
            with Catalog.open(sys.argv[2]) as catalog:
                sync_snapshot(catalog, sys.argv[2], reuse_while_indexing=False)
            print("synced")
''')


# ------------------------------------------------------------------------------------------ helpers


def cli(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result: Any, *expected: str) -> str:
    """Assert exit 1 with exactly one ``error:`` line (containing ``expected``) and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def check(idx: Path, *extra: str) -> tuple[int, dict]:
    result = cli("check", "--index", idx, "--json", *extra)
    assert result.exit_code in (0, 1), (result.stdout, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def kinds(report: dict) -> set[str]:
    return {p["kind"] for p in report["problems"]}


def warning_kinds(report: dict) -> set[str]:
    return {w["kind"] for w in report["warnings"]}


def hooks_env(tmp: Path, stage: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACEFIND_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("FACEFIND_DB", None)
    env.pop("FACEFIND_TEST_DIE_IN", None)
    if stage is not None:
        env["FACEFIND_TEST_DIE_IN"] = stage
    return env


def start_index(hooks: Path, folder: Path, idx: Path, model: Path | None, env: dict[str, str], log: Path,
                batch_size: int = 16, workers: int = 0) -> subprocess.Popen:
    """``facefind index`` in its own process group (decoder processes included, when ``workers``)."""
    args = [sys.executable, str(hooks), "cli", "index", str(folder), "--index", str(idx), "--device", "cpu",
            "--workers", str(workers), "--batch-size", str(batch_size)]
    if model is not None:
        args += ["--model", str(model)]
    with open(log, "w") as err:  # a file: decoder processes may outlive a kill -9 for a moment
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)


def assert_exactly_once(idx: Path, readable: list[Path], failed: set[str], backend: Any = None) -> Any:
    """Every readable image once, with one prediction; failures listed; no run left running;
    the snapshot and its vector file hold exactly the catalog's predictions. Returns them.

    ``backend`` (tests/pg.py) names the catalog; default: the index folder's SQLite file."""
    from facefind.db.catalog import Catalog
    from facefind.db.snapshot import load_snapshot
    from facefind.db.vectors import open_flat, stored_fp16
    from pg import Backend

    backend = backend or Backend("sqlite", None)
    rows = backend.rows(idx, "SELECT path FROM images")
    dupes = backend.scalar(idx, "SELECT count(*) FROM (SELECT face_id FROM predictions "
                                "GROUP BY model_id, face_id HAVING count(*) > 1) AS d")
    assert backend.scalar(idx, "SELECT count(*) FROM runs WHERE status = 'running'") == 0
    failures = {Path(p).name for (p,) in backend.rows(idx, "SELECT path FROM failures")}
    paths = [p for (p,) in rows]
    assert len(paths) == len(set(paths)) and dupes == 0, "duplicate rows"
    assert sorted(paths) == sorted(str(p.parent.resolve() / p.name) for p in readable), "images lost or extra"
    assert failures == failed
    with Catalog.open(idx, create=False) as catalog:
        preds = catalog.export(1)[1]
        stamp = catalog.stamp(1)
    assert len(preds.ids) == len(readable)
    snap = load_snapshot(idx, 1)
    assert snap.stamp == stamp
    np.testing.assert_array_equal(snap.ids, preds.ids)
    assert list(snap.paths) == preds.paths
    np.testing.assert_allclose(snap.probs.T, preds.probs, atol=1e-6)
    np.testing.assert_array_equal(snap.emb, stored_fp16(preds.emb))
    assert open_flat(snap.folder / "vectors.faiss").ntotal == len(preds.ids)
    return preds


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def hooks(work: Path) -> Path:
    path = work / "hooks.py"
    path.write_text(HOOKS)
    return path


def _seed(work: Path) -> tuple[list[Path], Path, Path]:
    """N_SEED tiny faces, a model calibrated on them, and their index (an SQLite catalog, whatever
    FACEFIND_DB says while it is built)."""
    from facefind.indexer.pipeline import index_folder

    faces = tiny_faces(work / "faces", N_SEED, seed=1)
    model = tiny_checkpoint(work / "model.pt", ATTRS, calibrate=faces, size=32, dim=16)
    saved = os.environ.pop("FACEFIND_DB", None)
    try:
        report = index_folder(faces[0].parent, model, work / "index", batch_size=16, device="cpu", workers=0)
    finally:
        if saved is not None:
            os.environ["FACEFIND_DB"] = saved
    assert report.indexed == N_SEED
    return faces, model, work / "index"


@pytest.fixture(scope="module")
def shared_seed(build_once) -> tuple[list[Path], Path, Path]:
    """``_seed``, built once per run whichever xdist worker asks first (conftest.build_once)."""
    return build_once("faults-seed", _seed)


@pytest.fixture(scope="module")
def model(shared_seed: tuple[list[Path], Path, Path]) -> Path:
    return shared_seed[1]


@pytest.fixture(scope="module")
def faces(shared_seed: tuple[list[Path], Path, Path]) -> list[Path]:
    return shared_seed[0]


@pytest.fixture(scope="module")
def seeded(shared_seed: tuple[list[Path], Path, Path]) -> Path:
    """The index of ``faces``, shared by every test of the run: tests that change it work on a copy."""
    return shared_seed[2]


@pytest.fixture
def private(seeded: Path, tmp_path: Path) -> Path:
    idx = tmp_path / "index"
    shutil.copytree(seeded, idx)
    return idx


@pytest.fixture
def private_on(catalog_backend: Any, seeded: Path, model: Path, faces: list[Path], tmp_path: Path) -> Path:
    """``private`` on each catalog backend: a copy of the seeded SQLite index, or the same faces
    indexed into the test's fresh PostgreSQL database (FACEFIND_DB is set for the test)."""
    idx = tmp_path / "index"
    if catalog_backend.is_sqlite:
        shutil.copytree(seeded, idx)
        return idx
    from facefind.indexer.pipeline import index_folder

    assert index_folder(faces[0].parent, model, idx, batch_size=16, device="cpu", workers=0).indexed == N_SEED
    return idx


# ------------------------------------------------------------------------------------ crash safety


@pytest.mark.slow
def test_ctrl_c_and_kill_9_at_random_points_then_resume_exactly_once(catalog_backend: Any, hooks: Path, model: Path,
                                                                     tmp_path: Path) -> None:
    """Ctrl-C, then two kill -9 at seeded random moments, one inside the final snapshot save, then
    a clean run; every stored row equals an uninterrupted run's (SQLite and PostgreSQL catalogs).

    One folder, one clean run and five processes for what were two tests (test_indexer's Ctrl-C /
    kill -9 / kill-after-the-last-commit, and the random kills here): the kill inside the final
    snapshot save is the kill right after the last commit, at a known point."""
    from facefind.db.catalog import Catalog
    from facefind.db.snapshot import load_snapshot

    n = 1000
    folder = tmp_path / "faces"
    readable = tiny_faces(folder, n, seed=SEED % 1000)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(readable[0].read_bytes()[:60])
    (folder / "text.jpg").write_text("not a picture\n" * 10)
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    failed = {"empty.jpg", "truncated.jpg", "text.jpg", "dangling.jpg"}
    # CelebA-style annotations above the folder: each readable image's labels must be stored once too.
    (tmp_path / "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(ATTRS)}\n" + "".join(
        f"{p.name} {' '.join('1' if (i >> j) & 1 else '-1' for j in range(len(ATTRS)))}\n" for i, p in enumerate(readable)))
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{p.name} 0\n" for p in readable))
    backend = catalog_backend
    idx, log, env = tmp_path / "index", tmp_path / "stderr.txt", backend.env(hooks_env(tmp_path))

    def committed() -> int:
        return backend.scalar(idx, "SELECT count(*) FROM predictions")

    # Ctrl-C: exit 130 with a resume hint, the run marked interrupted, its snapshot synced on the
    # way out. It decodes in a worker process, which must not outlive it (see helpers.reap).
    rc, err = stop_when(start_index(hooks, folder, idx, model, env, log, workers=1), committed, 32, signal.SIGINT, log)
    assert rc == 130, err
    assert "resume with: facefind index" in err and "Traceback" not in err
    with Catalog.open(idx) as catalog:
        interrupted = catalog.info()["predictions"]
        assert 32 <= interrupted < n
        assert catalog.runs()[0].status == "interrupted"
    assert len(load_snapshot(idx, 1)) == interrupted

    rng = random.Random(SEED)
    kills = 0
    for i in range(2):
        at = committed() + rng.randrange(16, 200)  # this run commits some
        # The first kill lands on a run that decodes in a worker process (see helpers.reap).
        proc = start_index(hooks, folder, idx, None, env, log, workers=int(i == 0))
        deadline = time.monotonic() + 120
        while proc.poll() is None and committed() < at:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside a batch: decoding, inferring, committing
        os.kill(proc.pid, signal.SIGKILL)
        assert reap(proc) == -signal.SIGKILL, log.read_text()
        kills += 1
        code, report = check(idx)
        assert code == 1 and "dead_runs" in kinds(report), report
        assert not kinds(report) & {"catalog_damaged", "foreign_keys", "duplicate_paths",
                                    "duplicate_predictions", "unpredicted_images", "snapshot_inconsistent"}
        if i % 2 == 0:  # repair now, or leave it to the next run
            code, report = check(idx, "--repair")
            assert code == 0, report
            assert any("dead runs interrupted" in line for line in report["repaired"])

    # The last batches commit, then the process dies while writing the snapshot's embeddings.
    proc = start_index(hooks, folder, idx, None, backend.env(hooks_env(tmp_path, "vectors.faiss")), log)
    assert reap(proc) == -signal.SIGKILL, log.read_text()
    kills += 1
    assert committed() == n
    code, report = check(idx)
    assert code == 1 and {"dead_runs", "snapshot_stale"} <= kinds(report), report
    assert "leftovers" in warning_kinds(report)

    proc = start_index(hooks, folder, idx, None, env, log)
    assert reap(proc) == 0, log.read_text()
    assert kills == 3
    preds = assert_exactly_once(idx, readable, failed, backend)
    assert backend.scalar(idx, "SELECT count(*) FROM labels") == n
    code, report = check(idx)
    assert code == 0 and not report["warnings"], report  # the run swept the save's leftovers too
    assert_rows_match_clean_run(preds, clean_predictions(folder, model, tmp_path / "clean"))


SAVE_STAGES = ["ids.npy", "probs.npy", "paths_offsets.npy", "paths.bin", "vectors.faiss",
               "manifest.json", "CURRENT", "gc"]


def _fake_catalog(idx: Path, n: int, k: int = 4, d: int = 32) -> Any:
    """A catalog of ``n`` random predictions (no model, no files) with a synced snapshot."""
    from facefind.db.catalog import Catalog, IndexedImage
    from facefind.db.snapshot import sync_snapshot

    rng = np.random.default_rng(0)
    catalog = Catalog.open(idx)
    mid = catalog.register_model("c" * 64, "fake", ATTRS[:k], [0.5] * k, d, None)
    for start in range(0, n, 5000):
        catalog.write_batch(mid, [IndexedImage(f"/faces/{i:06d}.jpg", 1, 1.0, 20, 24, rng.random(k, dtype=np.float32),
                                               rng.standard_normal(d, dtype=np.float32))
                                  for i in range(start, min(n, start + 5000))])
    sync_snapshot(catalog, idx, mid)
    return catalog


def _assert_consistent_snapshot(idx: Path, expect: set[int]) -> None:
    """What a reader gets now: a whole snapshot of one of the ``expect`` sizes, queryable."""
    from facefind.db.snapshot import load_snapshot
    from facefind.retrieval.engine import Engine

    snap = load_snapshot(idx, 1)
    n = len(snap)
    assert n in expect
    assert snap.probs.shape == (4, n) and snap.emb.shape == (n, 32) and len(snap.paths) == n
    assert np.all(np.diff(snap.ids) > 0) and snap.paths[n - 1]
    engine = Engine(snap)
    assert engine.query("Male and not Smiling", limit=3).total <= n
    probe = int(snap.ids[n // 2])  # searchable: an indexed image is its own nearest neighbour
    assert engine.query(None, like_id=probe, limit=3).hits[0].id == probe


@pytest.mark.parametrize("stage", SAVE_STAGES)
def test_kill_inside_the_snapshot_save(stage: str, hooks: Path, tmp_path: Path) -> None:
    """SIGKILL while each file of a new generation is half written: readers keep the previous
    snapshot (or the new one once CURRENT moved); check reports it, --repair makes it exact."""
    from facefind.db.catalog import IndexedImage

    idx = tmp_path / "index"
    catalog = _fake_catalog(idx, 3000)
    catalog.write_batch(1, [IndexedImage(f"/faces/new{i}.jpg", 1, 1.0, 20, 24, np.full(4, 0.9, np.float32),
                                         np.ones(32, np.float32)) for i in range(10)])
    catalog.close()
    proc = subprocess.run([sys.executable, str(hooks), "sync", str(idx)], cwd=ROOT, env=hooks_env(tmp_path, stage),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    moved = stage == "gc"  # killed after CURRENT was replaced
    _assert_consistent_snapshot(idx, {3010} if moved else {3000})
    code, report = check(idx, "--skip-files")
    assert code == (0 if moved else 1), report
    if not moved:
        assert kinds(report) == {"snapshot_stale"}, report
        assert "leftovers" in warning_kinds(report), report
    code, report = check(idx, "--skip-files", "--repair")
    assert code == 0 and warning_kinds(report) == {"checkpoint_unknown"}, report  # a fake model has no file
    assert report["stats"]["snapshots"]["1"]["count"] == 3010
    _assert_consistent_snapshot(idx, {3010})
    leftovers = [p.name for p in (idx / "model-1").rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []


SYNC_LOOP = textwrap.dedent('''
    import sys
    import numpy as np
    from facefind.db.catalog import Catalog, IndexedImage
    from facefind.db.snapshot import sync_snapshot
    idx = sys.argv[1]
    rng = np.random.default_rng(int(sys.argv[2]))
    with Catalog.open(idx) as catalog:
        for b in range(10_000):
            catalog.write_batch(1, [IndexedImage(f"/faces/{sys.argv[2]}-{b}-{i}.jpg", 1, 1.0, 20, 24,
                                                 rng.random(4, dtype=np.float32),
                                                 rng.standard_normal(32, dtype=np.float32)) for i in range(100)])
            sync_snapshot(catalog, idx, 1, reuse_while_indexing=False)
            print(b, flush=True)
''')


@pytest.mark.slow
def test_kill_9_while_syncing_large_snapshots(tmp_path: Path) -> None:
    """A process that commits 100 rows and rebuilds a 30k-image snapshot in a loop, killed at
    seeded random moments: every kill leaves whole batches and a readable snapshot."""
    idx = tmp_path / "index"
    _fake_catalog(idx, 30_000).close()
    script = tmp_path / "sync_loop.py"
    script.write_text(SYNC_LOOP)
    rng = random.Random(SEED + 1)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(idx), str(round_)], cwd=ROOT,
                                env=hooks_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "0", proc.stderr.read()  # one full cycle done
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.communicate(timeout=60)
        with sqlite3.connect(idx / "catalog.db") as conn:
            n = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
        assert (n - 30_000) % 100 == 0  # whole batches only
        _assert_consistent_snapshot(idx, set(range(30_000, n + 1, 100)))
        code, report = check(idx, "--skip-files", "--repair")
        assert code == 0, report
        _assert_consistent_snapshot(idx, {n})


# ------------------------------------------------------------------------------- readers and writes


@pytest.mark.slow
def test_queries_while_an_index_run_writes(catalog_backend: Any, hooks: Path, model: Path, private_on: Path,
                                           tmp_path: Path) -> None:
    """`facefind query`, engine loads and catalog reads in this process while another process
    indexes 320 more images: never an error, only counts at batch boundaries, never backwards
    (SQLite and PostgreSQL catalogs)."""
    private = private_on
    from facefind.db.catalog import Catalog
    from facefind.db.snapshot import sync_snapshot
    from facefind.retrieval.engine import Engine

    batch, n_new = 8, 320
    folder = tmp_path / "more"
    tiny_faces(folder, n_new, seed=2, prefix="more")
    log = tmp_path / "stderr.txt"
    proc = start_index(hooks, folder, private, model, catalog_backend.env(hooks_env(tmp_path)), log,
                       batch_size=batch)
    allowed = {N_SEED + batch * i for i in range(n_new // batch + 1)}
    seen: dict[str, list[int]] = {"query": [], "engine": [], "catalog": []}
    with Catalog.open(private, create=False) as catalog:
        try:
            while proc.poll() is None:
                result = cli("query", "--index", private, "--json", "--limit", "3", "--", "Male or not Male")
                assert result.exit_code == 0, result.stderr
                out = json.loads(result.stdout)
                assert out["total"] == out["n_indexed"] and len(out["hits"]) == 3
                seen["query"].append(out["n_indexed"])
                snap = sync_snapshot(catalog, private, reuse_while_indexing=False)
                seen["engine"].append(Engine(snap).query("Smiling or not Smiling", limit=0).total)
                assert len(snap.paths) == len(snap.ids) == snap.emb.shape[0]
                seen["catalog"].append(catalog.info()["predictions"])
        finally:
            rc = reap(proc)
    assert rc == 0, log.read_text()
    for reader, counts in seen.items():
        assert set(counts) <= allowed, (reader, sorted(set(counts) - allowed))
        assert counts == sorted(counts), reader
    assert len(set(seen["catalog"])) >= 2, seen  # the reads did overlap the writes
    final = cli("query", "--index", private, "--json", "--limit", "0")
    assert json.loads(final.stdout)["n_indexed"] == N_SEED + n_new
    assert check(private)[0] == 0


# ----------------------------------------------------------------------------- bad models, queries


def _bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    out = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random bytes": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "text": b"this is not a model\n",
    }
    paths = {}
    for kind, blob in out.items():
        paths[kind] = folder / f"{kind.replace(' ', '_')}.pt"
        paths[kind].write_bytes(blob)
    paths["foreign torch file"] = folder / "foreign.pt"
    torch.save({"a": 1}, paths["foreign torch file"])
    paths["a folder"] = folder / "folder.pt"
    paths["a folder"].mkdir()
    return paths


def test_bad_checkpoints_are_one_line_errors(model: Path, faces: list[Path], tmp_path: Path) -> None:
    """Six kinds of broken checkpoint through index, predict and evaluate: exit 1, one line, and
    index creates nothing."""
    bad = _bad_checkpoints(tmp_path / "bad", model)
    for kind, path in bad.items():
        idx = tmp_path / f"index-{path.stem}"
        for args in (["index", faces[0].parent, "--index", idx, "--workers", "0"],
                     ["predict", faces[0]],
                     ["evaluate", path, faces[0].parent]):
            if args[0] != "evaluate":
                args += ["--model", path]
            line = one_error_line(cli(*args, "--device", "cpu"))
            assert path.name in line, (kind, args[0], line)
        assert not idx.exists(), kind  # a broken checkpoint never creates (or registers in) an index


MALFORMED_META = {  # a facefind checkpoint whose meta was edited by hand or written by something else
    "img_size not numbers": {"img_size": "big"},
    "img_size zero": {"img_size": [0, 0]},
    "embedding_dim not a number": {"embedding_dim": "sixteen"},
    "attributes a string": {"attributes": "Male"},
    "attributes repeat": {"attributes": ["Male", "male", "Young", "Smiling"]},
    "mean of one value": {"mean": [0.5]},
    "thresholds not numbers": {"thresholds": ["high"] * 4},
    "thresholds NaN": {"thresholds": [float("nan")] * 4},
}


@pytest.mark.parametrize("kind", list(MALFORMED_META))
def test_checkpoints_with_malformed_meta_are_one_line_errors(kind: str, model: Path, faces: list[Path],
                                                             tmp_path: Path) -> None:
    """These used to escape as a ValueError/TypeError/RuntimeError traceback, or to load and build
    an index whose attribute names are the letters of a string or repeat."""
    import torch

    payload = torch.load(model, weights_only=True)
    payload["meta"].update(MALFORMED_META[kind])
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    one_error_line(cli("predict", faces[0], "--model", path, *CPU_WHOLE), "checkpoint meta")
    one_error_line(cli("index", faces[0].parent, "--model", path, "--index", tmp_path / "index", "--workers", "0",
                       "--device", "cpu"), "checkpoint meta")
    assert not (tmp_path / "index").exists()


def test_like_and_similar_refuse_a_replaced_or_missing_checkpoint(model: Path, private: Path, faces: list[Path],
                                                                   tmp_path: Path) -> None:
    """The index's checkpoint swapped for one with other attribute names (or deleted): `query --like`
    and `similar` refuse with one line; `check` names it; --like-id needs no model and still works."""
    from facefind.db.catalog import Catalog
    from facefind.db.files import file_sha256

    mine = tmp_path / "mine.pt"
    shutil.copy(model, mine)
    with Catalog.open(private) as catalog:  # the same weights, recorded at a path this test may change
        m = catalog.get_model(1)
        catalog.register_model(file_sha256(mine), m.arch, m.attributes, m.thresholds, m.embedding_dim, mine)
    ok = cli("query", "Male or not Male", "--like", faces[3], "--index", private, "--json", *CPU_WHOLE)
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["hits"][0]["path"] == str(faces[3])
    tiny_checkpoint(mine, ["Bald", "Bangs", "Wavy_Hair"], size=32, dim=8, seed=1)
    for args in (["query", "Male", "--like", faces[3]], ["similar", faces[3]]):
        one_error_line(cli(*args, "--index", private, *CPU_WHOLE), "has changed since the index was built")
    code, report = check(private)
    assert code == 1 and kinds(report) == {"checkpoint_changed"}, report
    mine.unlink()
    one_error_line(cli("similar", faces[3], "--index", private, *CPU_WHOLE), "no longer exists")
    assert kinds(check(private)[1]) == {"checkpoint_missing"}
    by_id = cli("query", "Male or not Male", "--like-id", "1", "--index", private, "--json")
    assert by_id.exit_code == 0 and json.loads(by_id.stdout)["hits"][0]["id"] == 1


def test_a_second_model_with_other_attributes_takes_over_cleanly(catalog_backend: Any, model: Path, private_on: Path,
                                                                 faces: list[Path], tmp_path: Path) -> None:
    """Indexing with a checkpoint of other attribute names and embedding size mixes two models in
    one index: queries switch to the new one, the old names are refused with one line, nothing
    mixes the two models' vectors, and check stays healthy (SQLite and PostgreSQL catalogs)."""
    private = private_on
    other = tiny_checkpoint(tmp_path / "other.pt", ["Bald", "Bangs", "Wavy_Hair"], size=32, dim=8, seed=2,
                            calibrate=faces)
    out = cli("index", faces[0].parent, "--model", other, "--index", private, "--workers", "0",
              "--device", "cpu", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["model_id"] == 2
    one_error_line(cli("query", "Eyeglasses", "--index", private), "Eyeglasses")
    hit = cli("query", "Bald or not Bald", "--index", private, "--json", "--limit", "1")
    assert json.loads(hit.stdout)["n_indexed"] == N_SEED
    assert set(json.loads(hit.stdout)["hits"][0]["attributes"]) == {"Bald", "Bangs", "Wavy_Hair"}
    similar = cli("similar", faces[5], "--index", private, "--json", "--limit", "1", *CPU_WHOLE)
    assert similar.exit_code == 0, similar.stderr
    assert json.loads(similar.stdout)["hits"][0]["path"] == str(faces[5])
    code, report = check(private)
    assert code == 0 and report["stats"]["predictions"] == {"1": N_SEED, "2": N_SEED}, report


TOKENS = ATTRS + ["and", "or", "not", "&", "|", "!", "~", "(", ")", ">", ">=", "<", "<=", "==", "0.5",
                  "1e9", "-1", "nan", "inf", "Eyeglases", "männlich", "顔", "\u200b", "\t", "\n", "'", '"', "\\"]
EXPRESSIONS = st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join),
    st.lists(st.sampled_from(TOKENS), max_size=30).map("".join),
    st.text(alphabet=st.sampled_from("()!~&| aA"), min_size=1000, max_size=5000),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(expr=EXPRESSIONS)
@example(expr="Male and " * 20_000 + "Young")
@example(expr="(" * 5000 + "Male" + ")" * 5000)
@example(expr="\x00Male")
@example(expr="--help")
@example(expr="-Male")
@example(expr="")
def test_cli_expression_fuzz_is_a_result_or_one_error_line(seeded: Path, expr: str) -> None:
    result = cli("query", "--index", seeded, "--json", "--limit", "2", "--", expr)
    if result.exit_code == 0:
        out = json.loads(result.stdout)
        assert 0 <= out["total"] <= out["n_indexed"] == N_SEED and len(out["hits"]) == min(2, out["total"])
    else:
        one_error_line(result)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expr=EXPRESSIONS)
def test_engine_expression_fuzz_never_escapes_the_error_family(seeded: Path, expr: str) -> None:
    from facefind.db.errors import QuerySyntaxError

    engine = _engine(seeded)
    try:
        result = engine.query(expr, limit=3)
    except QuerySyntaxError as err:
        assert err.render() and (err.position is None or 0 <= err.position <= len(expr))
    else:
        assert result.total <= len(engine) and len(result.hits) == min(3, result.total)
        assert all(h.score >= -1e-6 for h in result.hits) or result.ranking != "confidence"


_ENGINES: dict[Path, Any] = {}


def _engine(idx: Path) -> Any:
    from facefind.db.snapshot import load_snapshot
    from facefind.retrieval.engine import Engine

    if idx not in _ENGINES:
        _ENGINES[idx] = Engine(load_snapshot(idx, 1))
    return _ENGINES[idx]


# --------------------------------------------------------------------------------- resource limits


def test_index_under_a_regular_file_is_one_line(model: Path, faces: list[Path], tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    one_error_line(cli("index", faces[0].parent, "--model", model, "--index", tmp_path / "plain" / "index",
                       "--device", "cpu"), "cannot create the index folder")
    one_error_line(cli("check", "--index", tmp_path / "plain" / "index"), "no index")


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_keeps_the_index(hooks: Path, model: Path, private: Path,
                                                           faces: list[Path], tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 600 kB fail (EFBIG), as a full disk would, in the
    middle of a run: one error line, committed batches kept, the index queryable and resumable."""
    folder = tmp_path / "more"
    more = tiny_faces(folder, 300, seed=3, prefix="more")
    log = tmp_path / "stderr.txt"
    proc = start_index(hooks, folder, private, model, hooks_env(tmp_path, "fsize:600000"), log)
    assert reap(proc) == 1, log.read_text()
    err = log.read_text()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot write to the catalog" in lines[0], err

    with sqlite3.connect(private / "catalog.db") as conn:
        n = conn.execute("SELECT count(*) FROM predictions").fetchone()[0]
    assert N_SEED <= n < N_SEED + 300 and (n - N_SEED) % 16 == 0  # whole batches only
    code, report = check(private)
    assert kinds(report) <= {"snapshot_stale", "dead_runs"}, report  # nothing damaged
    result = cli("query", "--index", private, "--json", "--limit", "0", "--", "Male or not Male")
    assert result.exit_code == 0 and json.loads(result.stdout)["n_indexed"] == n

    resumed = cli("index", folder, "--index", private, "--device", "cpu", "--workers", "0", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout)["indexed"] == N_SEED + 300 - n
    assert_exactly_once(private, faces + more, set())
    assert check(private)[0] == 0


# --------------------------------------------------------------------------------------- bad input


def test_huge_and_endless_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    """A multi-gigabyte file named .jpg (a video or disk image renamed) was read whole into memory
    before Pillow refused it (2 GiB: 2 GiB of RAM and 9 s; 30 GB would OOM the machine). A named
    pipe or a link to /dev/zero would block or never end: they are not regular files, so skipped."""
    from facefind.indexer.discovery import discover
    from facefind.indexer.routing import decode_files

    tiny_faces(tmp_path, 1, seed=4)
    with open(tmp_path / "huge.jpg", "wb") as fh:  # sparse: costs no disk
        fh.truncate((1 << 30) + 1)
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    found = discover(tmp_path)
    assert [Path(f.path).name for f in found.files] == ["0000.jpg", "huge.jpg"] and not found.failures
    [batch] = decode_files(found.files, (32, 32))
    assert [(Path(f.path).name, f.reason) for f in batch.failures] == [
        ("huge.jpg", "file too large for an image (1,024 MiB, limit 512 MiB)")]
    assert len(batch.entries) == 1
