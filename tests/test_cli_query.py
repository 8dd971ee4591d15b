"""``facefind query`` and ``facefind similar`` against a real (small) index.

The index is built by the indexer from synthetic CelebA faces with a fresh mobilenet_v3_small
(BatchNorm statistics and median thresholds from the faces, see helpers.tiny_checkpoint), so
attributes split the images and embeddings differ. Checked: hits satisfy the expression and the
total equals a brute-force count; --paths, tables, the gallery; a did-you-mean for typos;
`similar` returns an indexed image first; --eval against the stored labels; one-line errors for
a missing or empty index; and that `query` without --like never imports torch, cv2 or dlib.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facefind.retrieval.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from helpers import Built, build_synthetic_index, check_page  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_FACES = 40


@pytest.fixture(scope="module")
def built(build_once) -> Built:
    """Built once per run, whichever xdist worker asks first (read-only: tests copy it to change it)."""
    return build_once("cli-query-index", lambda base: build_synthetic_index(base, N_FACES))


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok_json(*args: str | Path) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result, expected: str) -> str:
    assert result.exit_code == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    return lines[0]


def _smiling_cut(b: Built) -> float:
    return float(np.percentile([p["Smiling"] for p in b.probs.values()], 80))


def _truth(p: dict[str, float], t: dict[str, float], cut: float) -> bool:
    """``(Eyeglasses and not Male) or Smiling > cut``, by hand."""
    return (p["Eyeglasses"] >= t["Eyeglasses"] and not p["Male"] >= t["Male"]) or p["Smiling"] > np.float32(cut)


# -- query ------------------------------------------------------------------------------------


def test_query_json_matches_brute_force(built: Built) -> None:
    cut = _smiling_cut(built)
    expr = f"(eyeglasses and not Male) or Smiling > {cut!r}"
    out = ok_json("query", expr, "--index", built.index, "--limit", "1000")
    expected = {path for path, p in built.probs.items() if _truth(p, built.thresholds, cut)}
    assert 0 < len(expected) < N_FACES, "the expression should split the images"
    assert out["total"] == len(expected) and out["n_indexed"] == N_FACES
    assert {h["path"] for h in out["hits"]} == expected
    for h in out["hits"]:
        assert _truth(h["attributes"], built.thresholds, cut)
        assert h["attributes"] == pytest.approx(built.probs[h["path"]], abs=0)  # unrounded
        assert h["score"] >= 0.0
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert set(out) >= {"total", "hits"} and set(out["hits"][0]) >= {"id", "path", "score", "attributes"}


def test_query_paths_and_table_agree_with_json(built: Built) -> None:
    args = ("query", "Eyeglasses or Male", "--index", built.index, "--limit", "7", "--offset", "2")
    hits = ok_json(*args)["hits"]
    result = run(*args, "--paths")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [h["path"] for h in hits]
    table = run(*args)
    assert table.exit_code == 0, table.stderr
    total = ok_json(*args)["total"]
    assert f"{total} of {N_FACES} images match" in table.stdout
    assert Path(hits[0]["path"]).name in table.stdout  # long paths wrap, never lose the file name
    ranks = [line.split("│")[1].strip() for line in table.stdout.splitlines() if line.startswith("│")]
    assert [r for r in ranks if r][:2] == ["3", "4"]  # ranks continue after the offset


def test_a_partial_page_says_what_it_shows_and_the_flag_for_more(built: Built) -> None:
    first = run("query", "--index", built.index, "--limit", "7")
    assert first.exit_code == 0 and f"{N_FACES} of {N_FACES} images match" in first.stdout
    assert f"showing 1-7 of {N_FACES}; --offset 7 shows the next 7, --limit {N_FACES} all of them" in first.stdout
    second = run("query", "--index", built.index, "--limit", "7", "--offset", "7")
    assert f"showing 8-14 of {N_FACES}; --offset 14 shows the next 7\n" in second.stdout
    last = run("query", "--index", built.index, "--limit", "7", "--offset", str(N_FACES - 5))
    assert f"showing {N_FACES - 4}-{N_FACES} of {N_FACES}\n" in last.stdout
    past = run("query", "--index", built.index, "--offset", str(N_FACES + 10))
    assert f"--offset {N_FACES + 10} is past the last of the {N_FACES} matches" in past.stdout
    # Piped output keeps stdout to the paths; the note goes to stderr.
    paths = run("query", "--index", built.index, "--limit", "7", "--paths")
    assert len(paths.stdout.splitlines()) == 7 and f"showing 1-7 of {N_FACES}" in paths.stderr
    whole = run("query", "--index", built.index, "--limit", str(N_FACES))
    count = run("query", "--index", built.index, "--limit", "0")
    assert "showing" not in whole.stdout + whole.stderr + count.stdout + count.stderr


def test_typo_suggests_the_attribute(built: Built) -> None:
    line = one_line_error(run("query", "Eyeglases", "--index", built.index), "Eyeglases")
    assert "did you mean Eyeglasses" in line


def test_json_and_paths_are_exclusive(built: Built) -> None:
    one_line_error(run("query", "Male", "--index", built.index, "--json", "--paths"), "--json or --paths")


def test_query_csv_is_the_json_hits_as_a_table(built: Built) -> None:
    import csv
    import io

    args = ("query", "Male and not Eyeglasses", "--index", built.index, "--limit", "7", "--offset", "1")
    hits = ok_json(*args)["hits"]
    result = run(*args, "--csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == len(hits) > 0
    assert list(rows[0]) == ["rank", "id", "path", "face", "box", "score", "matched", *built.attributes]
    for rank, (row, hit) in enumerate(zip(rows, hits), start=2):
        assert (int(row["rank"]), int(row["id"]), row["path"]) == (rank, hit["id"], hit["path"])
        assert (int(row["face"]), row["box"], hit["face"], hit["box"]) == (0, "", 0, None)  # whole-file crops
        assert float(row["score"]) == pytest.approx(hit["score"], abs=1e-9)
        assert row["matched"].split("; ") == hit["matched"]
        for name in built.attributes:  # the stored probabilities, not a re-computation
            assert float(row[name]) == pytest.approx(built.probs[hit["path"]][name], abs=1e-6)
    one_line_error(run(*args, "--csv", "--json"), "--json or --paths or --csv")


def test_gallery_page(built: Built, tmp_path: Path) -> None:
    page = tmp_path / "q.html"
    result = run("query", "Male & !Eyeglasses", "--index", built.index, "--limit", "5", "--gallery", page)
    assert result.exit_code == 0, result.stderr
    checker = check_page(page)
    assert checker.images == min(5, ok_json("query", "Male & !Eyeglasses", "--index", built.index)["total"])
    assert "Male & !Eyeglasses" in " ".join(checker.text)


def test_eval_reports_precision_and_base_rate(built: Built) -> None:
    expr = "Eyeglasses or not Male"
    out = ok_json("query", expr, "--index", built.index, "--limit", "10", "--eval")
    q = out["quality"]
    truth = {p: lab["Eyeglasses"] or not lab["Male"] for p, lab in built.labels.items()}
    relevant = sum(truth[h["path"]] for h in out["hits"])
    assert q["k"] == len(out["hits"]) and q["relevant"] == relevant
    assert q["precision_at_k"] == pytest.approx(relevant / len(out["hits"]))
    assert q["base_rate"] == pytest.approx(sum(truth.values()) / N_FACES)
    assert q["n_labelled"] == N_FACES
    table = run("query", expr, "--index", built.index, "--eval")
    assert table.exit_code == 0 and "precision@" in table.stdout and "base rate" in table.stdout


# -- similarity -------------------------------------------------------------------------------


def test_similar_returns_an_indexed_image_first(built: Built) -> None:
    image = built.images[3]
    out = ok_json("similar", image, "--index", built.index, "--limit", "5", "--device", "cpu")
    hits = out["hits"]
    assert out["ranking"] == "similarity" and out["total"] == N_FACES
    assert out["search"] == "exact"  # a small index carries no approximate one
    forced = ok_json("similar", image, "--index", built.index, "--limit", "5", "--device", "cpu", "--exact",
                     "--nprobe", "4")
    assert [h["id"] for h in forced["hits"]] == [h["id"] for h in hits]
    assert hits[0]["path"] == os.path.abspath(image)
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[1]["score"] < hits[0]["score"] - 1e-3
    # --where restricts; an image that fails the filter is not returned
    have = built.probs[hits[0]["path"]]["Eyeglasses"] >= built.thresholds["Eyeglasses"]
    where = "not Eyeglasses" if have else "Eyeglasses"
    restricted = ok_json("similar", image, "--where", where, "--index", built.index, "--device", "cpu")
    assert restricted["hits"] and all(h["path"] != hits[0]["path"] for h in restricted["hits"])
    assert restricted["total"] == sum(
        (p["Eyeglasses"] >= built.thresholds["Eyeglasses"]) != have for p in built.probs.values())
    # query --like is the same search
    like = ok_json("query", where, "--like", image, "--index", built.index, "--device", "cpu")
    assert [h["id"] for h in like["hits"]] == [h["id"] for h in restricted["hits"]]


def test_like_id_and_predict_agree_with_the_index(built: Built) -> None:
    first = ok_json("query", "--like-id", "1", "--index", built.index, "--limit", "2")
    assert first["hits"][0]["id"] == 1
    # predict gives an indexed image the probabilities the indexer stored: one preprocessing
    path = first["hits"][0]["path"]
    pred = ok_json("predict", path, "--model", built.model, "--device", "cpu")[0]
    assert pred["attributes"] == pytest.approx(built.probs[path], abs=1e-4)


# -- errors and process behaviour -----------------------------------------------------------


def test_missing_or_empty_index_is_one_line(tmp_path: Path) -> None:
    from facefind.db.catalog import Catalog

    one_line_error(run("query", "Male", "--index", tmp_path / "nowhere"), "facefind index")
    Catalog.open(tmp_path / "empty").close()
    one_line_error(run("query", "Male", "--index", tmp_path / "empty"), "facefind index")
    one_line_error(run("similar", tmp_path / "x.jpg", "--index", tmp_path / "nowhere"), "no such image")


def test_missing_default_index_names_the_demo_index_with_a_command_that_works(built: Built, tmp_path: Path) -> None:
    import shlex
    import shutil

    shutil.copytree(built.index, tmp_path / "facefind-demo" / "index")
    env = {k: v for k, v in os.environ.items() if k not in ("FACEFIND_INDEX", "FACEFIND_DB")}
    env["FACEFIND_HOME"] = str(tmp_path / "home")  # no index there
    facefind = str(Path(sys.executable).parent / "facefind")
    proc = subprocess.run([facefind, "query", "Smiling and not Male", "--limit", "3"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert str(tmp_path / "home" / "index") in proc.stderr and "Traceback" not in proc.stderr
    command = shlex.split(proc.stderr.split(": ", 2)[-1])
    assert command[0] == "facefind" and command[-2:] == ["--index", "facefind-demo/index"]
    pasted = subprocess.run([facefind, *command[1:], "--json"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=env)
    assert pasted.returncode == 0, pasted.stderr
    assert json.loads(pasted.stdout)["n_indexed"] == N_FACES
    # Outside the demo's folder the plain message stays.
    (tmp_path / "home").mkdir()
    elsewhere = subprocess.run([facefind, "query", "Smiling"], capture_output=True, text=True, timeout=120,
                               cwd=tmp_path / "home", env=env)
    assert elsewhere.returncode == 1 and "facefind-demo" not in elsewhere.stderr, elsewhere.stderr


def test_index_without_labels_or_checkpoint(built: Built, tmp_path: Path) -> None:
    from facefind.db.catalog import Catalog, IndexedImage

    rng = np.random.default_rng(0)
    with Catalog.open(tmp_path / "bare") as catalog:
        mid = catalog.register_model("0" * 64, "mobilenet_v3_small", built.attributes,
                                     [0.5] * len(built.attributes), 32, None)
        catalog.write_batch(mid, [
            IndexedImage(str(tmp_path / f"{i}.jpg"), 1, 1.0, 178, 218,
                         rng.random(len(built.attributes), dtype=np.float32),
                         rng.standard_normal(32).astype(np.float32))
            for i in range(6)])
    assert ok_json("query", "Male", "--index", tmp_path / "bare")["n_indexed"] == 6
    one_line_error(run("query", "Male", "--eval", "--index", tmp_path / "bare"), "no ground-truth labels")
    one_line_error(run("similar", built.images[0], "--index", tmp_path / "bare", "--device", "cpu"),
                   "re-index")


_PROBE = """
import json, sys
from facefind.retrieval.cli import app
try:
    app(sys.argv[1:])
except SystemExit as err:
    code = err.code
heavy = [m for m in ("torch", "torchvision", "cv2", "dlib", "sqlalchemy", "pandas") if m in sys.modules]
print("PROBE " + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("extra", [[], ["--like-id", "2", "--limit", "3"], ["--paths", "--gallery", "GALLERY"]])
def test_query_without_an_image_never_imports_torch(built: Built, tmp_path: Path, extra: list[str]) -> None:
    extra = [str(tmp_path / "g.html") if a == "GALLERY" else a for a in extra]
    args = ["query", "Eyeglasses and not Male", "--index", str(built.index), *extra]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    probe = json.loads(proc.stderr.strip().splitlines()[-1].removeprefix("PROBE "))
    assert probe["code"] in (0, None), proc.stderr
    assert probe["heavy"] == [], f"query imported {probe['heavy']}"


@pytest.mark.parametrize("command", [["similar", "IMAGE"], ["query", "Smiling", "--like", "IMAGE"],
                                     ["predict", "IMAGE", "IMAGE"]])
@pytest.mark.parametrize("image, expected", [("missing.jpg", "no such image"), ("notes.txt", "cannot read image"),
                                             (".", "is a folder")])
def test_a_bad_input_image_fails_before_torch_loads(built: Built, tmp_path: Path, command: list[str], image: str,
                                                    expected: str) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    args = [str(tmp_path / image) if a == "IMAGE" else a for a in command] + ["--index", str(built.index)]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    *said, last = proc.stderr.strip().splitlines()
    probe = json.loads(last.removeprefix("PROBE "))
    assert probe["code"] == 1 and "torch" not in probe["heavy"], proc.stderr
    errors = [line for line in said if line.startswith("error:")]
    assert errors and all(expected in line for line in errors) and "Traceback" not in proc.stderr


def test_fast_snapshot_check_declines_a_stale_snapshot(built: Built, tmp_path: Path) -> None:
    """The SQLAlchemy-free shortcut of the query path is used only while the snapshot is current."""
    import shutil

    from facefind.db.catalog import Catalog, IndexedImage
    from facefind.db.snapshot import current_snapshot_fast
    from facefind.retrieval.index import open_index

    index = tmp_path / "index"
    shutil.copytree(built.index, index)
    fast = current_snapshot_fast(index)
    assert fast is not None and len(fast) == N_FACES

    with Catalog.open(index) as catalog:  # one more prediction: the snapshot is now behind
        model = catalog.latest_model()
        catalog.write_batch(model.id, [IndexedImage(str(tmp_path / "new.jpg"), 1, 1.0, 178, 218,
                                                    np.full(len(built.attributes), 0.5, np.float32),
                                                    np.ones(model.embedding_dim, np.float32))])
    assert current_snapshot_fast(index) is None
    with open_index(index) as opened:  # the full route rebuilds it...
        assert len(opened.engine.snapshot) == N_FACES + 1
    assert len(current_snapshot_fast(index)) == N_FACES + 1  # ...and the shortcut works again


# -- threshold sets ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_sets(built: Built, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, float]]]:
    """The same faces indexed with a checkpoint that carries an accuracy and an F1 set (F1's lower),
    and val figures that make Oval_Face a weak attribute."""
    from facefind.indexer.pipeline import index_folder
    from facefind.trainer.checkpoint import load_checkpoint

    base = tmp_path_factory.mktemp("two-sets")
    payload = load_checkpoint(built.model)
    meta = payload["meta"]
    k = len(meta["attributes"])
    probs = np.array([[p[a] for a in meta["attributes"]] for p in built.probs.values()])
    low = np.percentile(probs, 30, axis=0).tolist()  # more faces pass: the shape of an F1 set
    meta["threshold_sets"] = {"accuracy": meta["thresholds"], "f1": low}
    f1 = [0.05 if a == "Oval_Face" else 0.7 for a in meta["attributes"]]
    meta["threshold_stats"] = {name: {"precision": [0.6] * k, "recall": [0.5] * k, "f1": f1}
                               for name in ("accuracy", "f1")}
    import torch

    torch.save(payload, base / "model.pt")
    index_folder(built.root / "img_align_celeba", base / "model.pt", base / "index", device="cpu", workers=0)
    return base / "index", {"accuracy": dict(zip(meta["attributes"], meta["thresholds"])),
                            "f1": dict(zip(meta["attributes"], low))}


def test_thresholds_option_selects_the_set_and_f1_is_the_default(built: Built, two_sets) -> None:
    index, sets = two_sets
    default = ok_json("query", "Eyeglasses", "--index", index, "--limit", "1000")
    strict = ok_json("query", "Eyeglasses", "--index", index, "--limit", "1000", "--thresholds", "accuracy")
    for out, name in ((default, "f1"), (strict, "accuracy")):
        expected = {p for p, row in built.probs.items() if np.float32(row["Eyeglasses"]) >= np.float32(sets[name]["Eyeglasses"])}
        assert out["thresholds"] == name and {h["path"] for h in out["hits"]} == expected
    assert default["total"] > strict["total"] > 0
    # the similarity command takes it too, for its --where filter
    similar = ok_json("similar", built.images[0], "--where", "Eyeglasses", "--index", index, "--limit", "1000",
                      "--thresholds", "accuracy", "--device", "cpu")
    assert similar["total"] == strict["total"] and similar["thresholds"] == "accuracy"
    one_line_error(run("query", "Eyeglasses", "--index", index, "--thresholds", "recall"), "unknown threshold set")


def test_weak_attribute_warns_and_info_shows_both_sets(two_sets) -> None:
    index, sets = two_sets
    result = run("query", "Oval_Face and Smiling", "--index", index, "--limit", "3")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Oval_Face has val F1 0.05 at the f1 thresholds" in warnings[0]
    info = run("info", "--index", index)
    assert info.exit_code == 0, info.stderr
    assert "bare names use f1" in info.stdout and "val P" in info.stdout and "val R" in info.stdout
    row = next(line for line in info.stdout.splitlines() if line.startswith("Eyeglasses "))
    assert f"{sets['f1']['Eyeglasses']:.2f}" in row and f"{sets['accuracy']['Eyeglasses']:.2f}" in row
    as_json = ok_json("info", "--index", index)["thresholds"]
    assert as_json["default"] == "f1" and as_json["per_attribute"]["Eyeglasses"]["f1"]["recall"] == 0.5


def test_a_one_set_index_uses_its_set(built: Built) -> None:
    out = ok_json("query", "Eyeglasses", "--index", built.index, "--limit", "1000")
    assert out["thresholds"] == "accuracy"
    assert out["total"] == sum(p["Eyeglasses"] >= built.thresholds["Eyeglasses"] for p in built.probs.values())
