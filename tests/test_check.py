"""`facefind check`: each kind of damage is found, said in one line, and repaired when derived.

The index here is written through the catalog API (fake predictions, a few real files, a
checkpoint file that is only bytes): the checks look at the catalog, the snapshot, FAISS, the
files and the runs, never at the weights, so no torch is needed. test_faults.py runs check
against indexes damaged by real kills.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.errors import CatalogError
from facefind.db.snapshot import load_snapshot, sync_snapshot, write_snapshot
from facefind.retrieval.cli import app

K, D, N = 3, 8, 12
NAMES = ["Male", "Smiling", "Eyeglasses"]


def rows(paths: list[Path], seed: int = 0) -> list[IndexedImage]:
    rng = np.random.default_rng(seed)
    return [IndexedImage(str(p), 1, 1.0, 20, 24, rng.random(K, dtype=np.float32),
                         rng.standard_normal(D, dtype=np.float32)) for p in paths]


@pytest.fixture
def built(tmp_path: Path) -> dict[str, Any]:
    """A healthy index of N files under pics/, model 1 with a checkpoint file, one finished run."""
    pics = tmp_path / "pics"
    pics.mkdir()
    files = []
    for i in range(N):
        (pics / f"{i:02d}.jpg").write_bytes(b"jpeg")
        files.append(pics / f"{i:02d}.jpg")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    idx = tmp_path / "index"
    with Catalog.open(idx) as catalog:
        mid = catalog.register_model(hashlib.sha256(b"weights").hexdigest(), "tiny", NAMES, [0.5] * K, D, ckpt)
        run = catalog.start_run(mid, pics)
        catalog.write_batch(mid, rows(files))
        catalog.finish_run(run, "finished", {"indexed": N})
        sync_snapshot(catalog, idx, mid)
    return {"idx": idx, "pics": pics, "files": files, "ckpt": ckpt, "model": mid}


def run_check(idx: Path, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["check", "--index", str(idx), "--json", *extra])
    assert result.exit_code in (0, 1), (result.stdout, result.stderr)
    return result.exit_code, json.loads(result.stdout)


def kinds(report: dict, key: str = "problems") -> set[str]:
    return {f["kind"] for f in report[key]}


def sql(idx: Path, *statements: str) -> list[tuple]:
    """Run raw SQL with foreign keys off, as an outside tool (or a bug) could."""
    with sqlite3.connect(idx / "catalog.db") as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        out = []
        for s in statements:
            out = conn.execute(s).fetchall()
        return out


def snapshot_matches_catalog(idx: Path) -> None:
    from facefind.db.vectors import open_flat, stored_fp16

    with Catalog.open(idx, create=False) as catalog:
        stamp, preds = catalog.export(1)
    snap = load_snapshot(idx, 1)
    assert snap.stamp == stamp
    np.testing.assert_array_equal(snap.ids, preds.ids)
    raw = np.asarray(preds.emb, np.float32)
    np.testing.assert_array_equal(snap.emb, stored_fp16(raw))
    np.testing.assert_allclose(np.asarray(snap.emb, np.float32), raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               atol=5e-4)
    assert open_flat(snap.folder / "vectors.faiss").ntotal == len(preds.ids)


def test_a_healthy_index_passes(built: dict) -> None:
    code, report = run_check(built["idx"])
    assert code == 0 and report["healthy"] and report["problems"] == [] and report["warnings"] == []
    assert report["stats"]["images"] == N and report["stats"]["predictions"] == {"1": N}
    assert report["stats"]["snapshots"]["1"]["count"] == report["stats"]["snapshots"]["1"]["vectors"] == N
    text = CliRunner().invoke(app, ["check", "--index", str(built["idx"])])
    assert text.exit_code == 0 and text.stdout.strip().splitlines()[-1] == "healthy"


def _delete_snapshot(b: dict) -> None:
    shutil.rmtree(b["idx"] / "model-1")


def _stale_snapshot(b: dict) -> None:
    (b["pics"] / "new.jpg").write_bytes(b"jpeg")
    with Catalog.open(b["idx"]) as catalog:
        catalog.write_batch(1, rows([b["pics"] / "new.jpg"], seed=5))


def _gen(b: dict) -> Path:
    return load_snapshot(b["idx"], 1).folder


def _delete_faiss(b: dict) -> None:
    (_gen(b) / "vectors.faiss").unlink()


def _faiss_with_other_vectors(b: dict) -> None:
    """Same shape, other rows (rows swapped): only the manifest's CRC-32 can tell."""
    from facefind.db.vectors import write_flat

    snap = load_snapshot(b["idx"], 1)
    write_flat(snap.folder / "vectors.faiss", np.array(snap.emb)[::-1])


def _garbage_faiss(b: dict) -> None:
    (_gen(b) / "vectors.faiss").write_bytes(b"\0garbage" * 64)


def _other_ids(b: dict) -> None:
    gen = _gen(b)
    ids = np.load(gen / "ids.npy")
    np.save(gen / "ids.npy", ids + 1000)


def _garbage_manifest(b: dict) -> None:
    (_gen(b) / "manifest.json").write_text("{not json")


def _foreign_manifest(b: dict) -> None:
    manifest = _gen(b) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["catalog_id"] = "someone-else"
    manifest.write_text(json.dumps(data))


def _dead_run(b: dict) -> None:
    sql(b["idx"], "INSERT INTO runs (model_id, root, started, status, host, pid) VALUES "
        f"(1, '{b['pics']}', {time.time()}, 'running', '{socket.gethostname()}', 999999999)")


def _orphan_prediction(b: dict) -> None:
    sql(b["idx"], "INSERT INTO predictions (model_id, face_id, probs, embedding) "
        "SELECT model_id, 4242, probs, embedding FROM predictions LIMIT 1")


DAMAGE: dict[str, tuple[Callable[[dict], None], set[str]]] = {
    "snapshot deleted": (_delete_snapshot, {"snapshot_missing"}),
    "snapshot stale": (_stale_snapshot, {"snapshot_stale"}),
    "faiss deleted": (_delete_faiss, {"vectors"}),
    "faiss holds other vectors": (_faiss_with_other_vectors, {"vectors"}),
    "faiss garbage": (_garbage_faiss, {"vectors"}),
    "sidecar ids rewritten": (_other_ids, {"snapshot_inconsistent"}),
    "manifest garbage": (_garbage_manifest, {"snapshot_damaged"}),
    "manifest of another catalog": (_foreign_manifest, {"snapshot_foreign"}),
    "run left running": (_dead_run, {"dead_runs"}),
    "prediction of no image": (_orphan_prediction, {"foreign_keys"}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_derived_damage_is_found_then_repaired(built: dict, damage: str) -> None:
    apply, expected = DAMAGE[damage]
    apply(built)
    code, report = run_check(built["idx"])
    assert code == 1 and kinds(report) == expected, report
    for problem in report["problems"]:
        assert problem["repairable"] and "--repair" in problem["message"] and "\n" not in problem["message"]

    text = CliRunner().invoke(app, ["check", "--index", str(built["idx"])])
    assert text.exit_code == 1
    assert [line for line in text.stdout.splitlines() if line.startswith("problem: ")] == [
        f"problem: {p['message']}" + (f" [{', '.join(map(repr, p['examples']))}]" if p["count"] > 1 else "")
        for p in report["problems"]]

    code, report = run_check(built["idx"], "--repair")
    assert code == 0 and report["repaired"], report
    assert run_check(built["idx"])[0] == 0
    snapshot_matches_catalog(built["idx"])
    if "dead_runs" in expected:
        with Catalog.open(built["idx"]) as catalog:
            assert [r.status for r in catalog.runs()] == ["interrupted", "finished"]
    if "foreign_keys" in expected:
        assert sql(built["idx"], "SELECT count(*) FROM predictions") == [(N,)]


def test_leftovers_of_an_interrupted_save_are_a_warning_and_removed(built: dict) -> None:
    mdir = built["idx"] / "model-1"
    (mdir / ".tmp-gen-9-dead").mkdir()
    (mdir / ".tmp-gen-9-dead" / "ids.npy").write_bytes(b"partial")
    (mdir / ".tmp-CURRENT-dead").write_text("gen-9")
    (_gen(built) / ".vectors.faiss.x.tmp").write_bytes(b"partial")
    code, report = run_check(built["idx"])
    assert code == 0 and kinds(report, "warnings") == {"leftovers"}
    assert report["warnings"][0]["count"] == 3
    code, report = run_check(built["idx"], "--repair")
    assert code == 0 and report["warnings"] == []
    assert sorted(p.name for p in mdir.iterdir()) == [".lock", "CURRENT", _gen(built).name]


def test_missing_files_are_reported_not_deleted_unless_pruned(built: dict) -> None:
    for f in built["files"][:7]:
        f.unlink()
    code, report = run_check(built["idx"], "--repair")
    assert code == 1 and kinds(report) == {"files_missing"}
    problem = report["problems"][0]
    assert problem["count"] == 7 and len(problem["examples"]) == 5 and not problem["repairable"]
    assert problem["examples"][0] == str(built["files"][0])
    assert f"facefind index {built['pics']} --prune" in problem["message"]
    with Catalog.open(built["idx"]) as catalog:
        assert catalog.info()["images"] == N  # --repair never deletes an image's row

    assert run_check(built["idx"], "--skip-files")[0] == 0
    code, report = run_check(built["idx"], "--prune")
    assert code == 0 and any("forgot 7 images" in line for line in report["repaired"]), report
    assert report["stats"]["images"] == N - 7
    snapshot_matches_catalog(built["idx"])


def test_a_vanished_folder_can_only_be_pruned_by_check(built: dict) -> None:
    shutil.rmtree(built["pics"])
    code, report = run_check(built["idx"])
    message = report["problems"][0]["message"]
    assert code == 1 and "`facefind check --prune`" in message and "facefind index" not in message


def test_checkpoint_missing_or_changed_is_a_problem_for_the_current_model(built: dict) -> None:
    built["ckpt"].write_bytes(b"other weights")
    code, report = run_check(built["idx"], "--repair")
    assert code == 1 and kinds(report) == {"checkpoint_changed"} and not report["repaired"]
    assert str(built["ckpt"]) in report["problems"][0]["message"]
    built["ckpt"].unlink()
    code, report = run_check(built["idx"])
    assert code == 1 and kinds(report) == {"checkpoint_missing"}


def test_an_older_model_only_warns(built: dict, tmp_path: Path) -> None:
    """Model 2 covers a part of the images; model 1's checkpoint is gone and its snapshot stale:
    queries use model 2, so all of that is a warning, not a problem."""
    ckpt2 = tmp_path / "model2.pt"
    ckpt2.write_bytes(b"weights 2")
    with Catalog.open(built["idx"]) as catalog:
        m2 = catalog.register_model(hashlib.sha256(b"weights 2").hexdigest(), "tiny", ["Young"], [0.5], 4, ckpt2)
        rng = np.random.default_rng(1)
        catalog.write_batch(m2, [IndexedImage(str(p), 1, 1.0, 20, 24, rng.random(1, dtype=np.float32),
                                              rng.standard_normal(4, dtype=np.float32)) for p in built["files"][:5]])
        sync_snapshot(catalog, built["idx"], m2)
        catalog.prune([built["files"][11]])  # both models lose it: model 1's snapshot is now stale
        built["files"][11].unlink()
        sync_snapshot(catalog, built["idx"], m2)
    built["ckpt"].unlink()
    code, report = run_check(built["idx"])
    assert code == 0, report
    assert kinds(report, "warnings") == {"checkpoint_missing", "snapshot_stale", "partial_model"}
    partial = next(w for w in report["warnings"] if w["kind"] == "partial_model")
    assert partial["count"] == N - 1 - 5 and str(ckpt2) in partial["message"]
    code, report = run_check(built["idx"], "--repair")
    assert kinds(report, "warnings") == {"checkpoint_missing", "partial_model"}
    assert report["stats"]["snapshots"]["1"]["count"] == N - 1


def test_a_live_run_is_not_dead_and_its_lagging_snapshot_is_fine(built: dict) -> None:
    with Catalog.open(built["idx"]) as catalog:
        run = catalog.start_run(1, built["pics"])  # this process is the (live) indexer
        (built["pics"] / "new.jpg").write_bytes(b"jpeg")
        catalog.write_batch(1, rows([built["pics"] / "new.jpg"], seed=5))
        code, report = run_check(built["idx"])
        assert code == 0 and kinds(report, "warnings") == {"active_run", "snapshot_lagging"}, report
        assert report["stats"]["active_runs"] == [run]
        catalog.finish_run(run, "finished")
    code, report = run_check(built["idx"])
    assert code == 1 and kinds(report) == {"snapshot_stale"}


def test_rows_the_constraints_should_have_stopped(built: dict) -> None:
    """Images without predictions and the same file under two spellings (written by hand here)."""
    pics = built["pics"]
    sql(built["idx"],
        f"INSERT INTO images (path, size, mtime, added) VALUES ('{pics / '00.jpg'}/', 1, 1.0, 0)",
        f"INSERT INTO images (path, size, mtime, added) VALUES ('{pics}/./01.jpg', 1, 1.0, 0)")
    code, report = run_check(built["idx"], "--skip-files")
    assert code == 1 and kinds(report) == {"duplicate_paths", "unpredicted_images"}, report
    dupes = next(p for p in report["problems"] if p["kind"] == "duplicate_paths")
    assert dupes["count"] == 2 and not dupes["repairable"]
    assert kinds(report, "warnings") == {"unnormalised_paths"}


def test_embeddings_of_either_width_pass_any_other_length_is_damaged(built: dict) -> None:
    """Rows written before schema v4 hold float32 embeddings (4*D bytes), newer ones float16 (2*D):
    both are healthy; any other length is a damaged prediction, which --repair removes so that the
    next `facefind index` predicts the file again."""
    raw = np.random.default_rng(5).standard_normal(D, dtype=np.float32)
    sql(built["idx"], f"UPDATE predictions SET embedding = x'{raw.tobytes().hex()}' WHERE face_id = 1",
        f"UPDATE predictions SET embedding = x'{raw[:3].tobytes().hex()}' WHERE face_id = 2")
    assert sorted(n for (n,) in sql(built["idx"], "SELECT length(embedding) FROM predictions")) == [
        12, *[2 * D] * (N - 2), 4 * D]
    code, report = run_check(built["idx"], "--skip-files")
    assert code == 1 and kinds(report) == {"damaged_predictions"}, report
    damaged = report["problems"][0]
    assert damaged["repairable"] and damaged["count"] == 1 and damaged["examples"] == ["face 2"]
    assert f"neither {2 * D} nor {4 * D} bytes" in damaged["message"]
    with Catalog.open(built["idx"], create=False) as catalog, pytest.raises(CatalogError, match="face 2"):
        catalog.export(1)

    code, report = run_check(built["idx"], "--skip-files", "--repair")
    assert kinds(report) == {"unpredicted_images"}, report  # the file is predicted again by `facefind index`
    assert any("removed 1 damaged predictions" in r for r in report["repaired"])
    with Catalog.open(built["idx"], create=False) as catalog:
        stamp, preds = catalog.export(1)
        assert 2 not in preds.ids.tolist() and preds.emb[preds.ids.tolist().index(1)].tobytes() == raw.tobytes()
        assert len(catalog.known_files(1)) == N - 1
    snapshot_matches_catalog(built["idx"])


def test_a_damaged_catalog_file(built: dict) -> None:
    db = built["idx"] / "catalog.db"
    assert not db.with_name("catalog.db-wal").exists() or db.with_name("catalog.db-wal").stat().st_size == 0
    data = bytearray(db.read_bytes())
    page = 16384
    assert len(data) >= 4 * page
    data[2 * page + 100: 3 * page] = np.random.default_rng(0).bytes(page - 100)  # scramble a b-tree page
    db.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["check", "--index", str(built["idx"]), "--repair"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if line.startswith(("problem:", "error:"))]
    assert len(lines) == 1 and "damaged" in lines[0], result.stdout + result.stderr
    assert "page" in lines[0] or "malformed" in lines[0]  # SQLite's own words about what is wrong

    db.write_bytes(np.random.default_rng(1).bytes(3 * page))
    result = CliRunner().invoke(app, ["check", "--index", str(built["idx"])])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "cannot open the catalog" in result.stderr


def test_no_index_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["check", "--index", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and result.stderr.startswith("error: no index at")
    assert not (tmp_path / "nowhere" / "catalog.db").exists()


def test_every_damaged_page_gives_a_result_or_one_line(built: dict) -> None:
    """Scramble each page of the catalog in turn: `query`, `info` and `check` either work or fail
    with one `error:` line (SQLite's 'database disk image is malformed' used to escape as a
    traceback from query and info), and check never crashes."""
    db = built["idx"] / "catalog.db"
    data = db.read_bytes()
    page = 16384
    outcomes = set()
    for number in range(1, len(data) // page):
        shutil.rmtree(built["idx"] / "model-1", ignore_errors=True)  # queries must read the catalog
        damaged = bytearray(data)
        damaged[number * page + 100:(number + 1) * page] = np.random.default_rng(number).bytes(page - 100)
        db.write_bytes(bytes(damaged))
        for args in (["query", "Male"], ["info"], ["check", "--skip-files"]):
            result = CliRunner().invoke(app, [*args, "--index", str(built["idx"])])
            crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
            assert not crashed, (number, args, result.exception)
            assert result.exit_code in (0, 1) and "Traceback" not in result.stderr, (number, args)
            if result.exit_code == 1 and args[0] != "check":
                assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
            outcomes.add((args[0], result.exit_code))
    assert ("check", 1) in outcomes and ("query", 1) in outcomes


@pytest.mark.parametrize("damage", ["garbage", "delete"])
def test_a_damaged_or_missing_approximate_index_is_found_and_rebuilt(tmp_path: Path, damage: str) -> None:
    from facefind.db.check import check_index

    idx, n = tmp_path / "index", 1200
    rng = np.random.default_rng(2)
    with Catalog.open(idx) as catalog:
        mid = catalog.register_model("a" * 64, "tiny", NAMES, [0.5] * K, D, None)
        catalog.write_batch(mid, [IndexedImage(f"/faces/{i:05d}.jpg", 1, 1.0, 20, 24, rng.random(K, dtype=np.float32),
                                               rng.standard_normal(D, dtype=np.float32)) for i in range(n)])
        stamp, preds = catalog.export(mid)
        gen = write_snapshot(idx, catalog.get_model(mid), stamp, preds.ids, preds.paths, preds.probs, preds.emb,
                             catalog_id=catalog.catalog_id, approx_min=n)
    assert check_index(idx, check_files=False).healthy
    if damage == "garbage":
        (gen / "ann.faiss").write_bytes(b"\0garbage" * 64)
    else:
        (gen / "ann.faiss").unlink()
    report = check_index(idx, check_files=False)
    assert [f.kind for f in report.problems] == ["vectors"] and "ann.faiss" in report.problems[0].message
    report = check_index(idx, repair=True, check_files=False)
    assert report.healthy and report.repaired, report.to_dict()
    snap = load_snapshot(idx, mid)
    assert snap.folder != gen and snap.approximate and (snap.folder / "ann.faiss").is_file()


def test_repair_does_not_publish_a_sharded_build_in_progress(built: dict, tmp_path: Path) -> None:
    # Shard 0 of 2 has written more rows; shard 1 has not finished: the snapshot must stay as it was.
    extra = tmp_path / "pics" / "extra.jpg"
    extra.write_bytes(b"jpeg")
    with Catalog.open(built["idx"]) as catalog:
        catalog.hold_publish(built["model"], {"shards": 2, "root": str(built["pics"])})
        catalog.write_batch(built["model"], rows([extra], seed=1))
    before = load_snapshot(built["idx"], built["model"])
    code, report = run_check(built["idx"], "--repair")
    assert code == 1
    held = [f for f in report["problems"] if f["kind"] == "publish_held"]
    assert len(held) == 1 and "--finalize" in held[0]["message"], report
    after = load_snapshot(built["idx"], built["model"])
    assert after.stamp == before.stamp and len(after.ids) == N
