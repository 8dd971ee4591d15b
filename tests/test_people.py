"""People (issue 26): faces grouped into persons, named and corrected, and `person:` in queries.

The grouping is checked on seeded synthetic descriptors whose true identities are known, scored
with BCubed computed here by hand (the oracle); corrections through the real CLI on a catalog in
tmp_path, then through regroups and a kill -9 in the middle of a correction's transaction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from facefind.db.catalog import Catalog, IndexedImage
from facefind.db.snapshot import load_snapshot, sync_snapshot
from facefind.indexer.faces import grouping
from facefind.retrieval.bench.people import synthetic_descriptors
from facefind.retrieval.cli import app
from facefind.retrieval.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ["Smiling", "Eyeglasses"]


def bcubed(pred: list[int] | np.ndarray, true: list[int] | np.ndarray) -> tuple[float, float]:
    """BCubed by its definition, item by item: precision = share of an item's group with its
    label, recall = share of its label's items in its group, each averaged over the items."""
    pred, true = list(pred), list(true)
    precision = recall = 0.0
    for i in range(len(pred)):
        group = [j for j in range(len(pred)) if pred[j] == pred[i]]
        label = [j for j in range(len(pred)) if true[j] == true[i]]
        both = [j for j in group if true[j] == true[i]]
        precision += len(both) / len(group)
        recall += len(both) / len(label)
    return precision / len(pred), recall / len(pred)


def identity(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    return (centre + rng.standard_normal((n, 128)) * spread).astype(np.float32)


# ------------------------------------------------------------------------------------ grouping


def test_bcubed_oracle_on_a_hand_example() -> None:
    # groups {0,1,2} {3}, labels {0,1} {2,3}: item 0 precision 2/3 recall 1, item 2 1/3 and 1/2, item 3 1 and 1/2
    p, r = bcubed([0, 0, 0, 1], ["a", "a", "b", "b"])
    assert p == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1) / 4)
    assert r == pytest.approx((1 + 1 + 1 / 2 + 1 / 2) / 4)


def single_link(x: np.ndarray, threshold: float) -> np.ndarray:
    """The naive rule, exactly and by hand: faces closer than ``threshold`` are one person."""
    close = np.linalg.norm(x[:, None] - x[None], axis=2) < threshold
    labels = np.arange(len(x))
    for _ in range(len(x)):
        nxt = np.where(close, labels[None, :], len(x)).min(1)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    return labels


def test_two_close_identities_are_not_chained_where_single_link_chains_them() -> None:
    rng = np.random.default_rng(10)
    a = rng.standard_normal(128).astype(np.float32) * 0.06
    direction = rng.standard_normal(128).astype(np.float32)
    b = a + direction / np.linalg.norm(direction) * 0.5  # look-alikes: their faces ~0.68 apart on average
    x = np.concatenate([identity(rng, a, 22, 0.028), identity(rng, a, 3, 0.04),  # a few odd photos each
                        identity(rng, b, 22, 0.028), identity(rng, b, 3, 0.04)])
    truth = [0] * 25 + [1] * 25
    naive = single_link(x, 0.6)
    assert naive[0] == naive[25], "the test must show the chaining the method avoids"
    labels = grouping.group(x)
    assert not set(labels[:25].tolist()) & set(labels[25:].tolist())
    precision, recall = bcubed(labels, truth)
    assert precision == 1.0 and recall >= 0.85


def test_one_identity_spread_wide_stays_one_person() -> None:
    rng = np.random.default_rng(11)
    centre = rng.standard_normal(128).astype(np.float32) * 0.06
    x = identity(rng, centre, 40, 0.036)  # pairs ~0.58 apart: single link at 0.5 falls apart
    assert len(set(single_link(x, 0.5).tolist())) > 1
    labels = grouping.group(x)
    assert len(set(labels.tolist())) == 1


def test_synthetic_crowd_meets_the_targets_and_beats_single_link() -> None:
    x, truth = synthetic_descriptors(600, seed=3)
    precision, recall = bcubed(grouping.group(x), truth)
    naive_p, _ = bcubed(single_link(x, 0.6), truth)
    assert precision >= 0.98 and recall >= 0.93, (precision, recall)
    assert naive_p < precision


def test_approximate_knn_finds_the_exact_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = synthetic_descriptors(3000, seed=5)
    exact = grouping.knn(x, k=10)
    monkeypatch.setattr(grouping, "FLAT_MAX", 100)
    approx = grouping.knn(x, k=10)
    near = [set(exact.index[i][exact.distance[i] < grouping.STRICT]) for i in range(len(x))]
    found = sum(len(n & set(approx.index[i])) for i, n in enumerate(near)) / sum(len(n) for n in near)
    assert found >= 0.97  # the links that grouping makes (the far tail of the k may differ)
    assert np.all(approx.index != np.arange(len(x))[:, None])  # never a face's own neighbour
    np.testing.assert_allclose(approx.distance[:, 0], np.linalg.norm(x - x[approx.index[:, 0]], axis=1), atol=1e-4)


def test_corrections_hold_inside_the_method() -> None:
    rng = np.random.default_rng(2)
    a = rng.standard_normal(128).astype(np.float32) * 0.06
    b = rng.standard_normal(128).astype(np.float32) * 0.06
    x = np.concatenate([identity(rng, a, 10, 0.026), identity(rng, b, 10, 0.026)])
    plain = grouping.group(x)
    assert plain[0] == plain[9] and plain[0] != plain[10]
    kept = grouping.group(x, must=[[0, 10]], apart=[([3, 4], [0, 1, 2, 5, 6, 7, 8, 9])])
    assert kept[0] == kept[10]          # merged: one person, whatever the distances say
    assert kept[3] == kept[4] != kept[0]  # split off: never with the faces that stayed


# ------------------------------------------------------------------------------ catalog + CLI


def make_index(folder: Path, vectors: np.ndarray, probs: np.ndarray | None = None) -> tuple[Catalog, int]:
    """A catalog of len(vectors) whole-file entries with these identity descriptors, and its snapshot."""
    catalog = Catalog.open(folder)
    model = catalog.register_model("ab" * 32, "test", ATTRIBUTES, [0.5, 0.5], 4, None)
    rng = np.random.default_rng(0)
    probs = rng.random((len(vectors), 2)).astype(np.float32) if probs is None else probs
    rows = [IndexedImage(f"/faces/{i:05d}.jpg", 1, 0.0, 178, 218, probs[i], rng.random(4).astype(np.float32),
                         described=True, identity=v) for i, v in enumerate(vectors)]
    catalog.write_batch(model, rows)
    sync_snapshot(catalog, folder, model)
    return catalog, model


def people_json(idx: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["people", "--index", str(idx), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cli(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def truth_groups(out: dict, truth: np.ndarray, ids: np.ndarray) -> dict[int, set[int]]:
    """person id -> the true identities of its faces."""
    label = dict(zip(ids.tolist(), truth.tolist()))
    return {p["id"]: {label[f] for f in p["faces"]} for p in out["persons"]}


@pytest.fixture
def crowd(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    x, truth = synthetic_descriptors(300, seed=9)
    idx = tmp_path / "idx"
    catalog, _ = make_index(idx, x)
    ids = np.asarray(catalog.export(catalog.latest_model().id)[1].ids)
    catalog.close()
    return idx, truth, ids


def test_people_lists_persons_with_faces_and_a_representative(crowd) -> None:
    idx, truth, ids = crowd
    out = people_json(idx)
    faces = [f for p in out["persons"] for f in p["faces"]]
    assert sorted(faces) == sorted(ids.tolist())  # every face in exactly one person
    for p in out["persons"]:
        assert p["count"] == len(p["faces"]) and p["representative"] in p["faces"] and p["name"] is None
    by_face = {f: p["id"] for p in out["persons"] for f in p["faces"]}
    precision, recall = bcubed([by_face[f] for f in ids.tolist()], truth)
    assert precision >= 0.98 and recall >= 0.9
    assert [p["count"] for p in out["persons"]] == sorted((p["count"] for p in out["persons"]), reverse=True)
    big = people_json(idx, "--min-faces", "10")
    assert big["persons"] and all(p["count"] >= 10 for p in big["persons"])


def test_names_merges_and_splits_survive_a_regroup(crowd) -> None:
    idx, truth, ids = crowd
    out = people_json(idx)
    first, second = out["persons"][0], out["persons"][1]
    assert cli("people", "name", str(first["id"]), "Ada Lovelace", "--index", str(idx)).exit_code == 0
    assert cli("people", "merge", str(first["id"]), str(second["id"]), "--index", str(idx)).exit_code == 0
    moved = first["faces"][:2]
    result = cli("people", "split", str(first["id"]), "--face", str(moved[0]), "--face", str(moved[1]),
                 "--index", str(idx))
    assert result.exit_code == 0, result.output
    for _ in range(2):  # the listing after the corrections, then after a regroup from scratch
        persons = {p["id"]: p for p in people_json(idx)["persons"]}
        ada = persons[first["id"]]
        assert ada["name"] == "Ada Lovelace"
        assert set(second["faces"]) <= set(ada["faces"])          # merged stays merged
        assert not set(moved) & set(ada["faces"])                  # split stays apart
        assert len({p_id for p_id, p in persons.items() if set(moved) & set(p["faces"])}) == 1
        people_json(idx, "--regroup")


def test_a_named_person_keeps_its_name_when_most_of_its_faces_stay(crowd) -> None:
    idx, _, _ = crowd
    person = people_json(idx)["persons"][3]
    assert cli("people", "name", str(person["id"]), "Grace", "--index", str(idx)).exit_code == 0
    regrouped = {p["id"]: p for p in people_json(idx, "--regroup")["persons"]}
    assert regrouped[person["id"]]["name"] == "Grace"
    assert regrouped[person["id"]]["faces"] == person["faces"]


def test_person_literals_agree_with_a_hand_written_filter(crowd) -> None:
    idx, _, ids = crowd
    out = people_json(idx)
    target = out["persons"][0]
    assert cli("people", "name", str(target["id"]), "Ada", "--index", str(idx)).exit_code == 0
    catalog = Catalog.open(idx, create=False)
    snap = load_snapshot(idx, catalog.latest_model().id)
    catalog.close()
    eng = Engine(snap)
    smiling = snap.probs[0] >= snap.thresholds[0]
    faces = set(target["faces"])
    expect = {int(i) for i, s in zip(snap.ids, smiling) if int(i) in faces and not s}
    for expr in (f"person:{target['id']} and not Smiling", "person:ada and not Smiling",
                 'not Smiling and person:"Ada"'):
        got = {h.id for h in eng.query(expr, limit=len(snap)).hits}
        assert got == expect, expr
    result = CliRunner().invoke(app, ["query", "person:Adda", "--index", str(idx)])
    assert result.exit_code == 1 and "did you mean Ada?" in result.output


def test_bad_input_gets_one_line(crowd) -> None:
    idx, _, _ = crowd
    people_json(idx)
    for args, message in [(["people", "name", "9999", "X"], "no person 9999"),
                          (["people", "merge", "1", "1"], "two different persons"),
                          (["people", "split", "1", "--face", "999999"], "is not one of person 1's faces"),
                          (["people", "name", "1", "2024"], "a name cannot be only digits")]:
        result = cli(*args, "--index", str(idx))
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1 and message in result.output


def test_an_index_without_descriptors_says_how_to_get_them(tmp_path: Path) -> None:
    catalog = Catalog.open(tmp_path / "idx")
    model = catalog.register_model("cd" * 32, "test", ATTRIBUTES, [0.5, 0.5], 4, None)
    catalog.write_batch(model, [IndexedImage("/a.jpg", 1, 0.0, 1, 1, np.zeros(2, np.float32), np.zeros(4, np.float32))])
    catalog.close()
    result = cli("people", "--index", str(tmp_path / "idx"))
    assert result.exit_code == 1 and "index DIR --identity" in result.output


def test_new_faces_join_their_person_or_start_a_new_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal(128).astype(np.float32) * 0.06 for _ in range(2))
    idx = tmp_path / "idx"
    catalog, model = make_index(idx, np.concatenate([identity(rng, a, 12, 0.026), identity(rng, b, 12, 0.026)]))
    before = {p["id"]: set(p["faces"]) for p in people_json(idx)["persons"]}
    assert len(before) == 2
    stranger = rng.standard_normal(128).astype(np.float32) * 0.06
    more = np.concatenate([identity(rng, a, 3, 0.026), identity(rng, stranger, 4, 0.026)])
    rows = [IndexedImage(f"/more/{i}.jpg", 1, 0.0, 178, 218, np.zeros(2, np.float32), np.zeros(4, np.float32),
                         described=True, identity=v) for i, v in enumerate(more)]
    catalog.write_batch(model, rows)
    from facefind.indexer.people import assign_new
    placed = assign_new(catalog, idx)
    catalog.close()
    assert placed.placed == 7
    after = {p["id"]: set(p["faces"]) for p in people_json(idx)["persons"]}
    grown = [pid for pid in before if len(after[pid]) == len(before[pid]) + 3]
    assert len(grown) == 1 and after[grown[0]] >= before[grown[0]]
    new = [faces for pid, faces in after.items() if pid not in before]
    assert [len(f) for f in new] == [4]


# ------------------------------------------------------------------------------------ kill -9

KILLER = textwrap.dedent("""
    import os, signal, sys
    import sqlalchemy as sa
    from facefind.db.catalog import Catalog
    from facefind.indexer import people

    idx, op, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    catalog = Catalog.open(idx, create=False)
    seen = 0

    @sa.event.listens_for(catalog._writer, "after_cursor_execute")
    def _die(conn, cursor, statement, *args):
        global seen
        seen += 1
        if seen == at:  # inside the correction's transaction, before its commit
            os.kill(os.getpid(), signal.SIGKILL)

    if op == "merge":
        people.merge(catalog, idx, int(sys.argv[4]), int(sys.argv[5]))
    else:
        people.split(catalog, idx, int(sys.argv[4]), [int(f) for f in sys.argv[5:]])
    print("statements", seen)
""")


def _persons(idx: Path) -> tuple[dict[int, int], list]:
    from facefind.db import people as store

    catalog = Catalog.open(idx, create=False)
    try:
        st = store.state(catalog)
        return dict(st.person_of), sorted((c.kind, c.faces, c.others) for c in st.constraints)
    finally:
        catalog.close()


def _run_killer(tmp_path: Path, idx: Path, *args: object) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(idx), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("op", ["merge", "split"])
def test_kill_9_inside_a_correction_leaves_it_undone_and_the_catalog_usable(
        op: str, catalog_backend, tmp_path: Path) -> None:
    x, _ = synthetic_descriptors(120, seed=1)
    idx = tmp_path / "idx"
    make_index(idx, x)[0].close()
    listed = people_json(idx)["persons"]
    a, b = listed[0], listed[1]
    args = [a["id"], b["id"]] if op == "merge" else [a["id"], *a["faces"][:2]]
    before = _persons(idx)
    at, killed = 1, 0
    while True:  # kill -9 at statements 1, 2, 3, 5, 8, ... of the transaction until one run completes
        run = _run_killer(tmp_path, idx, op, at, *args)
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        assert _persons(idx) == before, f"half a {op} after kill -9 at statement {at}"
        killed += 1
        at = at + max(1, killed // 2) if at < 3 else int(at * 1.6)
    assert killed >= 3
    person_of, constraints = _persons(idx)
    if op == "merge":
        assert {person_of[f] for f in a["faces"] + b["faces"]} == {a["id"]}
        assert ("same", tuple(sorted(a["faces"] + b["faces"])), ()) in constraints
    else:
        moved = a["faces"][:2]
        assert person_of[moved[0]] == person_of[moved[1]] != a["id"]
        assert {person_of[f] for f in a["faces"][2:]} == {a["id"]}
        assert ("apart", tuple(moved), tuple(a["faces"][2:])) in constraints


# ------------------------------------------------------------------------- after an index run


def test_an_index_run_places_its_new_faces_among_the_persons(people_index, web_index, tmp_path: Path) -> None:
    """The real pipeline (dlib descriptors of synthetic faces): after `facefind people`, a new
    photo of a grouped face joins that face's person when the next `index --identity` ends."""
    import shutil

    from helpers import another_photo

    from facefind.indexer.pipeline import index_folder
    from facefind.indexer.routing import FaceFinder

    idx = tmp_path / "index"
    shutil.copytree(people_index.index, idx)
    listed = people_json(idx)["persons"]
    owner = {f: p["id"] for p in listed for f in p["faces"]}
    original = people_index.ids[str(people_index.original)]
    assert owner[original] == owner[people_index.ids[str(people_index.other)]]
    more = tmp_path / "more"
    more.mkdir()
    (more / "third-photo.png").write_bytes(another_photo(people_index.original))
    report = index_folder(more, web_index.model, idx, device="cpu", workers=0, faces=FaceFinder(identity=True))
    assert report.indexed == 1 and "people" in report.timings
    after = people_json(idx)
    assert after["placed"] == 0  # the index run placed it already
    with Catalog.open(idx, create=False) as catalog:
        preds = catalog.export(catalog.latest_model().id)[1]
    new_id = dict(zip(preds.paths, preds.ids.tolist()))[str(more / "third-photo.png")]
    person = next(p for p in after["persons"] if new_id in p["faces"])
    assert person["id"] == owner[original]


# ----------------------------------------------------------------------------- the benchmark


def test_the_benchmarks_bcubed_and_single_link_agree_with_the_hand_written_ones() -> None:
    from facefind.retrieval.bench.people import bcubed as fast_bcubed, exact_single_link

    rng = np.random.default_rng(8)
    pred, true = rng.integers(0, 7, 200), rng.integers(0, 9, 200)
    assert fast_bcubed(pred, true) == pytest.approx(bcubed(pred, true))
    x, _ = synthetic_descriptors(300, seed=2)
    mine, theirs = exact_single_link(x, 0.6), single_link(x, 0.6)
    assert bcubed(mine, theirs) == pytest.approx((1.0, 1.0))  # the same partition


SAMPLE = ROOT.parent / "shared" / "celeba-sample"


@pytest.mark.skipif(not (SAMPLE / "identity_CelebA.txt").is_file(), reason="no shared CelebA sample here")
def test_bench_people_on_real_faces_reads_a_celeba_folder(tmp_path: Path) -> None:
    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt"):
        (folder / name).symlink_to(SAMPLE / name)
    for image in sorted((SAMPLE / "img_align_celeba").iterdir())[:12]:
        (folder / "img_align_celeba" / image.name).symlink_to(image)
    result = CliRunner().invoke(app, ["bench", "people", "--sample", str(folder), "--cache",
                                      str(tmp_path / "d.npz"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert 10 <= out["faces"] <= 12 and out["splits"]["all"]["faces"] == out["faces"]
    with np.load(tmp_path / "d.npz") as cached:
        assert len(cached["names"]) == 12 and cached["vectors"].shape == (12, 128)
